"""Typed config files and --key=value overrides for HomeLLM's scripts, and TrainConfig: the
settings train.py takes (tools/bench.py and studio/studio.py read presets through it too).

    python train.py [config/FILE.py ...] [--key=value ...]

A script's settings are a dataclass. Its defaults are overridden by each config file in
order, then by each --key=value in order. A config file is plain Python run in a namespace of
its own (runpy), so it may compute values (`batch_size = 4 * 2`) but can never touch this
module or the caller; the public names it leaves behind are the keys it sets. Every value is
checked against its field's annotation, and any mistake raises ConfigError, which
parse_args_or_exit turns into one line on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import os
import re
import runpy
import sys
import traceback
import types
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from model import ModelConfig

T = TypeVar("T")
_NO = object()  # _convert's "does not fit", since None is a legitimate value
_CLI = "the command line"


class ConfigError(ValueError):
    """A mistake in a config file or on the command line; the message says how to fix it."""


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """The keys a user may set (init fields) with their types; get_type_hints resolves the string
    annotations that `from __future__ import annotations` leaves behind."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    # One word, e.g. Union[str,list]: --help prints a column of them
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace(", ", ",")


def _convert(value: object, tp: Any) -> object:
    """value as an instance of tp (an int widened for a float field), or _NO when it does not fit."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        return None if value is None else _NO
    if origin is Literal:  # compare types too: True == 1, yet Literal[1] must not take True
        return value if any(value == a and type(value) is type(a) for a in args) else _NO
    if origin is Union or origin is types.UnionType:  # Optional[X] and X | None land here
        for arg in args:
            out = _convert(value, arg)
            if out is not _NO:
                return out
        return _NO
    if tp in (int, float) and isinstance(value, bool):  # bool subclasses int; --n_layer=True is a typo
        return _NO
    if tp is float and isinstance(value, int):
        return float(value)
    cls = origin or tp
    if isinstance(cls, type):
        return value if isinstance(value, cls) else _NO
    return value  # an annotation we cannot check (a TypeVar, a Protocol): trust the value


def _unknown(key: str, known: dict, source: str) -> str:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{near[0]}'?" if near else "run with --help to list the valid keys"
    return f"unknown config key '{key}' in {source}; {hint}"


def _check(cls: type, values: dict[str, object], source: str) -> dict[str, object]:
    """values converted to their fields' types; a ConfigError names the first bad key."""
    known = _fields(cls)
    out: dict[str, object] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(_unknown(key, known, source))
        tp, f = known[key]
        converted = _convert(value, tp)
        if converted is _NO:
            raise ConfigError(
                f"config key '{key}' in {source} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
            )
        choices = f.metadata.get("choices")
        if choices is not None and converted is not None and converted not in choices:
            allowed = ", ".join(map(repr, choices))
            raise ConfigError(f"config key '{key}' in {source} must be one of {allowed}, got {value!r}")
        out[key] = converted
    return out


def _parse_value(raw: str, tp: Any) -> object:
    """A command-line string as a Python literal, true/false for bools, and the raw string where
    the field takes a str, so --out_dir=out-ru and --device=cuda need no quotes."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    if raw in ("true", "false") and _convert(raw == "true", tp) is not _NO:
        return raw == "true"
    if _convert(value, tp) is _NO and _convert(raw, tp) is not _NO:
        return raw  # e.g. --run_name=2024 for a str field stays "2024"
    return value


def read_config_file(path: str) -> dict[str, object]:
    """The public names a config file assigns (modules, functions and classes are skipped)."""
    if not path.endswith(".py"):
        raise ConfigError(f"config file '{path}' is not a .py file; pass a Python config such as config/home_25m.py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; check the path (presets live in config/)")
    try:
        namespace = runpy.run_path(path, run_name="__config__")
    except Exception as err:  # any bug in the file: report where it is, not our traceback
        lines = [fr.lineno for fr in traceback.extract_tb(err.__traceback__) if fr.filename == os.path.abspath(path)]
        where = f" line {lines[-1]}" if lines else ""
        raise ConfigError(f"config file '{path}'{where} failed: {type(err).__name__}: {err}") from err
    skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skip)}


def apply_overrides(cfg: T, values: dict[str, object], source: str) -> T:
    """A new cfg with values type-checked and applied; source names them in error messages.
    Note dataclasses.replace copies every other field as __post_init__ left it."""
    checked = _check(type(cfg), values, source)
    try:
        return dataclasses.replace(cfg, **checked)
    except ValueError as err:  # the dataclass's own __post_init__ validation
        raise ConfigError(f"invalid config from {source}: {err}") from err


def parse_args(cls: type[T], argv: list[str]) -> T:
    """cls built from its defaults <- config files (in order) <- --key=value (in order)."""
    if "-h" in argv or "--help" in argv:
        print(format_help(cls))
        raise SystemExit(0)
    known = _fields(cls)
    files: list[str] = []
    overrides: dict[str, object] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if key not in known:
                raise ConfigError(_unknown(key, known, _CLI))
            tp = known[key][0]
            if not eq and _convert(True, tp) is _NO:
                raise ConfigError(f"--{key} needs a value; write --{key}=VALUE")
            overrides[key] = _parse_value(raw, tp) if eq else True  # a bare --flag means True
        elif arg.endswith(".py"):
            files.append(arg)
        else:
            raise ConfigError(f"unexpected argument '{arg}'; pass a config file ending in .py or --key=value")
    # Merge everything and build once: built step by step, __post_init__ would judge (and fill
    # in) half-applied settings, e.g. a file's n_embd before the command line's n_head.
    values: dict[str, object] = {}
    for path in files:
        values.update(_check(cls, read_config_file(path), path))
    values.update(_check(cls, overrides, _CLI))
    for key, (_, f) in known.items():
        if key not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}' has no default; set it in a config file or with --{key}=VALUE")
    try:
        return cls(**values)
    except ValueError as err:
        source = " + ".join(files + ([_CLI] if overrides else [])) or "the defaults"
        raise ConfigError(f"invalid config from {source}: {err}") from err


def parse_args_or_exit(cls: type[T], argv: Optional[list[str]] = None) -> T:
    """parse_args for a script's main(): a config mistake prints one line and exits 2."""
    try:
        return parse_args(cls, sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


def format_help(cls: type) -> str:
    """Usage plus one aligned row per key: name, type, default, help text and choices."""
    rows = []
    for key, (tp, f) in _fields(cls).items():
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        note = f.metadata.get("help", "")
        if "choices" in f.metadata:
            note = f"{note} (one of {', '.join(map(repr, f.metadata['choices']))})".strip()
        rows.append((f"--{key}", _type_name(tp), default, note))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    lines = [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    prog = os.path.basename(sys.argv[0]) or "script.py"
    return (
        f"usage: python {prog} [config/FILE.py ...] [--key=value ...]\n"
        "Config files apply in order, then --key=value overrides; a bare --flag sets a bool key to True.\n\n"
        "keys (type, default):\n" + "\n".join(lines)
    )


def _json_safe(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)  # a Path, a torch.dtype: a readable record rather than a crash


def config_to_dict(cfg: object) -> dict[str, object]:
    """JSON-safe settings for out_dir/config.json and checkpoints; init fields only, so the dict
    can go back through cls(**d) or apply_overrides."""
    keep = {f.name for f in dataclasses.fields(cfg) if f.init}
    return {k: _json_safe(v) for k, v in dataclasses.asdict(cfg).items() if k in keep}


def format_config(cfg: object) -> str:
    """Aligned `key = value` lines, values as Python literals (pasteable into a config file)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    width = max(map(len, values), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}" for k, v in values.items())


# ----------------------------------------------------------------------------- train.py's settings


def _key(default: Any, help: str, **metadata: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


MAX_DIST_TIMEOUT_MIN = 525_600
MAX_SEED = 2**62


@dataclasses.dataclass
class TrainConfig:
    """Every key train.py accepts, with nanoGPT's names where nanoGPT has one."""

    # data and output
    data_dir: Union[str, list] = _key("data/demo", "a directory made by prepare.py, or a mixture of them with weights: "
                                      "'data/a:0.8,data/b:0.2' (a bare path weighs 1; weights are normalised; a config "
                                      "file may give a list of (path, weight) pairs)")
    out_dir: str = _key("out", "checkpoints, config.json, metrics.jsonl")
    init_from: str = _key("scratch", "scratch | a run's out_dir, a ckpt.pt or a sharded ckpt_STEP/ (weights only: fine-tuning) | hf:DIR (local HF Llama/Qwen2)")
    resume: str = _key("auto", "auto (continue from out_dir's newest checkpoint that loads) | never | PATH (a .pt file or an FSDP run's ckpt_STEP/ directory)")
    keep_checkpoints: int = _key(2, "numbered ckpt_STEP.pt copies to keep besides ckpt.pt (0: none)")
    # model
    vocab_size: Optional[int] = _key(None, "embedding rows; None: the dataset tokenizer's vocabulary size")
    n_layer: int = _key(12, "transformer blocks")
    n_head: int = _key(12, "query heads per attention layer (must divide n_embd)")
    n_kv_head: Optional[int] = _key(None, "key/value heads (grouped-query attention; must divide n_head); None: n_head")
    n_embd: int = _key(768, "hidden size (residual stream width)")
    ffn_hidden: Optional[int] = _key(None, "SwiGLU inner width; None: Llama's rule, ~8/3 n_embd rounded up to 256")
    block_size: int = _key(1024, "training context length (tokens per sequence)")
    max_seq_len: Optional[int] = _key(None, "the model's context window (RoPE table, generation limit); None: block_size")
    rope_theta: float = _key(10000.0, "RoPE base; larger values suit longer contexts (Qwen2.5: 1e6)")
    norm_eps: float = _key(1e-5, "RMSNorm epsilon")
    qkv_bias: bool = _key(False, "biases on the q/k/v projections (Qwen2 has them)")
    tie_embeddings: bool = _key(True, "share one matrix between the token embedding and lm_head")
    dropout: float = _key(0.0, "dropout on attention and residual branches (0 for pretraining)")
    # optimization
    batch_size: int = _key(8, "micro-batch per rank, in sequences")
    gradient_accumulation_steps: int = _key(1, "micro-batches per optimizer step on each rank")
    learning_rate: float = _key(6e-4, "peak learning rate, reached after warmup")
    min_lr: float = _key(6e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = _key(100, "steps of linear warmup")
    lr_decay_iters: Optional[int] = _key(None, "end of the cosine decay; None: max_iters")
    max_iters: Optional[int] = _key(5000, "optimizer steps in the whole run; None: as many as max_time_min allows")
    optimizer: str = _key("adamw", "adamw | muon (Muon for the blocks' matrices, AdamW for the rest; not with FSDP)", choices=("adamw", "muon"))
    weight_decay: float = _key(0.1, "weight decay (decoupled), applied to matrices only")
    beta1: float = _key(0.9, "AdamW beta1")
    beta2: float = _key(0.95, "AdamW beta2")
    grad_clip: float = _key(1.0, "max global grad norm; 0 disables clipping")
    nonfinite_patience: int = _key(5, "consecutive non-finite steps skipped before the run stops")
    # evaluation and logging
    eval_interval: int = _key(500, "evaluate and checkpoint every this many steps")
    eval_iters: int = _key(20, "validation batches per evaluation, split over ranks (eval_iters x batch_size windows)")
    log_interval: int = _key(10, "print and record train metrics every this many steps")
    max_time_min: Optional[float] = _key(None, "a time budget: the learning rate decays over it and the run ends (eval + save) when it is spent; max_iters then only caps the steps")
    peak_flops: Optional[float] = _key(None, "device peak FLOP/s for MFU; None: GPU table or a CPU matmul measurement")
    wandb_project: Optional[str] = _key(None, "also send every metrics.jsonl record to this Weights & Biases project (pip install wandb)")
    tensorboard_dir: Optional[str] = _key(None, "also write every metrics.jsonl record as TensorBoard scalars here (pip install tensorboard)")
    # system
    device: str = _key("auto", "auto (cuda > mps > cpu) | cpu | cuda | mps")
    dtype: str = _key("auto", "auto | float32 | bfloat16 | float16", choices=("auto", "float32", "bfloat16", "float16"))
    compile: Optional[bool] = _key(None, "torch.compile each block; None: on for CUDA, off elsewhere")
    grad_checkpoint: bool = _key(False, "recompute block activations in backward to save memory")
    parallel: str = _key("ddp", "ddp | fsdp (over torchrun's ranks; in one process only with fsdp_cpu_offload)", choices=("ddp", "fsdp"))
    fsdp_reshard_after_forward: bool = _key(True, "True: ZeRO-3-like; False: keep gathered params until backward (ZeRO-2-like)")
    fsdp_cpu_offload: bool = _key(False, "keep FSDP's sharded parameters, gradients and optimizer state in CPU memory (needs parallel=fsdp; works on one GPU too)")
    fsdp_reduce_every_micro_step: Optional[bool] = _key(None, "FSDP with gradient accumulation: True reduce-scatters gradients after every micro-step (only sharded gradients kept), False once per step (the whole model's fp32 gradients kept between micro-steps); None: True only when the memory plan does not fit otherwise")
    async_checkpoint: bool = _key(False, "FSDP runs: write the periodic sharded checkpoints in a background thread while training goes on (DCP async_save; costs a CPU copy of the rank's shards)")
    dist_timeout_min: float = _key(10.0, "a collective waiting longer than this ends the job")
    seed: int = _key(1337, "seeds the initial weights and which windows each step trains on")
    dry_run: bool = _key(False, "print the model's size and memory estimate, then exit without training")

    def __post_init__(self) -> None:
        """Reject values that could only fail later (or silently do nothing), with the fix."""
        for f in dataclasses.fields(self):  # e.g. --learning_rate=1e999 parses as inf
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value} must be a finite number")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "nonfinite_patience")
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer")
        if self.max_iters is None and self.max_time_min is None:
            raise ValueError("max_iters=None needs a time budget: pass --max_time_min=MINUTES, or give max_iters a number")
        for name in ("vocab_size", "n_kv_head", "ffn_hidden", "max_seq_len", "lr_decay_iters", "max_iters"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer, or None")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}; the schedule decays from learning_rate to min_lr")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("max_time_min", "peak_flops", "dist_timeout_min"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be positive")
        if self.dist_timeout_min > MAX_DIST_TIMEOUT_MIN:  # longer overflows the nanoseconds torch.distributed counts in
            raise ValueError(f"dist_timeout_min={self.dist_timeout_min:g} must be at most {MAX_DIST_TIMEOUT_MIN} (a year)")
        if not 0 <= self.seed <= MAX_SEED:  # torch and numpy seeds are unsigned, at most 64 bits; ranks add their rank
            raise ValueError(f"seed={self.seed} must be between 0 and {MAX_SEED} (2**62)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if not self.out_dir.strip():
            raise ValueError("out_dir is empty; name a directory for checkpoints and logs, e.g. --out_dir=out")
        if isinstance(self.data_dir, str) and not self.data_dir.strip():
            raise ValueError("data_dir is empty; pass the directory prepare.py wrote, e.g. --data_dir=data/demo")
        if not self.resume.strip():
            raise ValueError("resume is empty; it takes auto, never, or a checkpoint's path (a .pt file or an FSDP run's ckpt_STEP/ directory)")
        # One string from here on (a list from a config file becomes 'path:weight,...'), so
        # config.json, checkpoints and every reader of data_dir see the form the command line takes.
        sources = parse_data_mixture(self.data_dir)
        if not isinstance(self.data_dir, str):
            self.data_dir = sources[0][0] if len(sources) == 1 else ",".join(f"{path}:{weight!r}" for path, weight in sources)
        if self.fsdp_cpu_offload and self.parallel != "fsdp":
            raise ValueError("fsdp_cpu_offload=True offloads FSDP's shards; pass --parallel=fsdp too (it runs in one process as well)")
        # The architecture checks (heads dividing n_embd, n_kv_head dividing n_head, even
        # head_dim, dropout in [0, 1)) live in ModelConfig; run them now, not after data loading.
        self.model_config(self.vocab_size or 1)

    def data_sources(self) -> list[tuple[str, float]]:
        """data_dir as (path, weight) pairs, the weights normalised to sum to 1."""
        sources = parse_data_mixture(self.data_dir)
        total = sum(weight for _, weight in sources)
        return [(path, weight / total) for path, weight in sources]

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The architecture these keys describe; vocab_size is the dataset tokenizer's, used
        when the config leaves vocab_size unset. This is the one place train keys become a
        ModelConfig."""
        return ModelConfig(
            vocab_size=self.vocab_size or vocab_size, n_layer=self.n_layer, n_head=self.n_head,
            n_kv_head=self.n_kv_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden,
            max_seq_len=self.max_seq_len or self.block_size, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            tie_embeddings=self.tie_embeddings, qkv_bias=self.qkv_bias, dropout=self.dropout,
        )


def parse_data_mixture(value: Union[str, list]) -> list[tuple[str, float]]:
    """data_dir as (path, weight) pairs, the weights as given: 'data/a:0.8,data/b:0.2' (a bare
    path weighs 1) or a config file's list of (path, weight) pairs or bare paths. A ValueError
    says what is wrong with it."""
    entries: list[tuple[str, float]] = []
    if isinstance(value, str):
        parts = [value] if os.path.isdir(value) else value.split(",")  # a directory named "a,b" is one dataset
        for part in parts:
            path, colon, weight = part.strip().rpartition(":")
            try:
                entries.append((path.strip(), float(weight)) if colon and path.strip() else (part.strip(), 1.0))
            except ValueError:  # "C:\\data" or "data/a:b": a colon that is part of the path
                entries.append((part.strip(), 1.0))
    else:
        for item in value:
            pair = item if isinstance(item, (list, tuple)) else (item, 1.0)
            if len(pair) != 2 or not isinstance(pair[0], str) or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)):
                raise ValueError(f"data_dir entry {item!r} is not a path or a (path, weight) pair")
            if "," in pair[0]:
                raise ValueError(f"data_dir path {pair[0]!r} holds a comma, which separates the datasets of a mixture; rename it")
            entries.append((pair[0], float(pair[1])))
    if not entries:
        raise ValueError("data_dir is an empty list; name at least one directory prepare.py wrote")
    for path, weight in entries:
        if not path:
            raise ValueError(f"data_dir {value!r} has an empty entry; write it as 'data/a:0.8,data/b:0.2'")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data_dir gives {path} the weight {weight}; weights must be positive numbers")
    paths = [path for path, _ in entries]
    repeated = next((p for p in paths if paths.count(p) > 1), None)
    if repeated is not None:
        raise ValueError(f"data_dir names {repeated} twice; give each dataset once, with its whole weight")
    return entries
