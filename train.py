"""Pretrain a HomeLLM model on token shards made by prepare.py.

    python train.py config/tiny_cpu.py                      # one CPU or GPU
    python train.py config/home_25m.py --batch_size=16      # any key can be overridden
    torchrun --nproc_per_node=4 train.py config/qwen_2_5b.py --parallel=fsdp

The loop is plain PyTorch: sample a global batch, forward/backward over micro-batches,
clip, AdamW step, log, and every eval_interval steps evaluate and checkpoint. DDP, FSDP2,
activation checkpointing and torch.compile are applied to the plain model by the small
functions under "parallelism" below; model.py knows nothing about them.

Exact resume: which windows form step s depends only on (seed, s), the optimizer, grad
scaler and every rank's RNG state are checkpointed, so a run killed after a checkpoint and
resumed continues with bit-identical losses on CPU.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from configurator import config_to_dict, format_config, parse_args_or_exit
from model import ModelConfig, Transformer, count_params, estimate_mfu


@dataclass
class TrainConfig:
    # data and output
    data_dir: str = field(default="data/demo", metadata={"help": "a directory made by prepare.py"})
    out_dir: str = field(default="out", metadata={"help": "checkpoints, config.json, metrics.jsonl"})
    init_from: str = field(default="scratch", metadata={"help": "scratch | path/to/ckpt.pt (weights only) | hf:DIR (local HF Llama/Qwen2)"})
    resume: str = field(default="auto", metadata={"help": "auto (continue if out_dir has ckpt.pt) | never | path/to/ckpt.pt"})
    keep_checkpoints: int = field(default=2, metadata={"help": "numbered ckpt_STEP.pt copies to keep besides ckpt.pt (0: none)"})
    # model (vocab_size None: taken from the dataset's tokenizer)
    vocab_size: Optional[int] = None
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    n_embd: int = 768
    ffn_hidden: Optional[int] = None
    block_size: int = field(default=1024, metadata={"help": "training context length (tokens per sequence)"})
    max_seq_len: Optional[int] = field(default=None, metadata={"help": "the model's context window (RoPE table, generation limit); None: block_size"})
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    # optimization
    batch_size: int = field(default=8, metadata={"help": "micro-batch per rank"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = field(default=None, metadata={"help": "end of the cosine decay; None: max_iters"})
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables clipping"})
    nonfinite_patience: int = field(default=5, metadata={"help": "consecutive non-finite steps skipped before the run stops"})
    # evaluation and logging
    eval_interval: int = field(default=500, metadata={"help": "evaluate and checkpoint every this many steps"})
    eval_iters: int = field(default=20, metadata={"help": "validation batches per evaluation, split over ranks (eval_iters x batch_size windows)"})
    log_interval: int = 10
    max_time_min: Optional[float] = field(default=None, metadata={"help": "stop cleanly (eval + save) after this many minutes"})
    peak_flops: Optional[float] = field(default=None, metadata={"help": "device peak FLOP/s for MFU; None: GPU table or a CPU matmul measurement"})
    # system
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu) | cpu | cuda | mps"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16", "choices": ("auto", "float32", "bfloat16", "float16")})
    compile: Optional[bool] = field(default=None, metadata={"help": "torch.compile each block; None: on for CUDA, off elsewhere"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute block activations in backward to save memory"})
    parallel: str = field(default="ddp", metadata={"help": "ddp | fsdp (multi-process only)", "choices": ("ddp", "fsdp")})
    fsdp_reshard_after_forward: bool = field(default=True, metadata={"help": "True: ZeRO-3-like; False: keep gathered params until backward (ZeRO-2-like)"})
    fsdp_cpu_offload: bool = False
    dist_timeout_min: float = field(default=10.0, metadata={"help": "a collective waiting longer than this ends the job"})
    seed: int = 1337

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size or vocab_size, n_layer=self.n_layer, n_head=self.n_head,
            n_kv_head=self.n_kv_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden,
            max_seq_len=self.max_seq_len or self.block_size, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            tie_embeddings=self.tie_embeddings, qkv_bias=self.qkv_bias, dropout=self.dropout,
        )


class TrainError(RuntimeError):
    """A problem the user can fix; main() prints it as one line and exits 1."""


CHECKPOINT_FORMAT = 1

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name(). Anything else: pass --peak_flops.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 6000 Ada": 364e12, "RTX A6000": 155e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device=cuda was asked for but torch sees no CUDA GPU; use --device=cpu or install a CUDA build of torch")
        torch.cuda.set_device(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    else:
        device = torch.device(name)
    if d.enabled:
        # nccl for GPUs, gloo for CPU; the timeout turns a dead or stuck rank into an error
        # instead of an endless hang in the next collective.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=cfg.dist_timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return d, device


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective (gloo has no AVG, so callers divide)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    if d.enabled:
        dist.all_reduce(t)
    return t.tolist()


def log0(d: Dist, *args) -> None:
    if d.is_main:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- data


class TokenShards:
    """Random windows of block_size + 1 tokens from one split of a prepare.py dataset.

    Window starts are uniform over every position where a whole window fits inside a shard.
    The memmaps are opened per read: a long-lived np.memmap keeps every page it touched
    mapped, so a process reading a 100 GB corpus would appear to grow without bound.
    """

    def __init__(self, data_dir: str, meta: dict, split: str, block_size: int):
        self.window = block_size + 1
        self.dtype = np.dtype(meta["dtype"])
        shards = meta["splits"].get(split, {}).get("shards", [])
        self.paths = [os.path.join(data_dir, s["file"]) for s in shards]
        starts = np.array([max(0, s["tokens"] - self.window + 1) for s in shards], dtype=np.int64)
        self.cum_starts = np.cumsum(starts)
        self.num_windows = int(self.cum_starts[-1]) if len(shards) else 0

    def sample(self, seed: list[int], count: int) -> list[tuple[int, int]]:
        """`count` (shard, offset) pairs drawn from a generator seeded by `seed`."""
        rng = np.random.default_rng(seed)
        flat = rng.integers(0, self.num_windows, size=count)
        shard = np.searchsorted(self.cum_starts, flat, side="right")
        before = np.concatenate([[0], self.cum_starts])[shard]
        return list(zip(shard.tolist(), (flat - before).tolist()))

    def read(self, picks: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((len(picks), self.window), dtype=np.int64)
        for i, (shard, offset) in enumerate(picks):
            tokens = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")
            rows[i] = tokens[offset : offset + self.window]
        batch = torch.from_numpy(rows)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1], batch[:, 1:]


def load_meta(data_dir: str) -> dict:
    """prepare.py's reader (missing, unreadable or other-format datasets are clear errors)."""
    from prepare import DatasetError, load_meta as read_meta

    try:
        return read_meta(data_dir)
    except DatasetError as err:
        raise TrainError(str(err)) from None


# ----------------------------------------------------------------------------- schedule and optimizer


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup (non-zero at step 0), then cosine decay to min_lr at lr_decay_iters."""
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embedding) only: decaying norm
    gains and biases toward zero only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" and not cfg.fsdp_cpu_offload
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


# ----------------------------------------------------------------------------- parallelism
# Each of these takes the plain model and changes how it runs, in the order
# checkpointing -> compile -> DDP/FSDP, so model.py stays free of parallel code.


def apply_grad_checkpoint(model: Transformer) -> None:
    model.grad_checkpoint = True


def apply_compile(model: Transformer) -> None:
    # Per block, in place: each block compiles once and is reused n_layer times, and names
    # stay free of the `_orig_mod.` prefix so checkpoints load without renaming.
    for block in model.layers:
        block.compile()


def apply_fsdp(model: Transformer, cfg: TrainConfig, device: torch.device, param_dtype: Optional[torch.dtype]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if param_dtype is not None:
        # Compute in bf16, but reduce gradients in fp32 so small updates are not rounded away.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, **kwargs)
    if model.config.tie_embeddings:
        # The tied weight is used by embed (first) and lm_head (last): both must live in one
        # FSDP group, or one of the two would see a resharded (freed) parameter.
        fully_shard([model.embed, model.norm, model.lm_head], **kwargs)
    else:
        fully_shard(model.embed, **kwargs)
        fully_shard([model.norm, model.lm_head], **kwargs)
    fully_shard(model, **kwargs)


def apply_ddp(model: Transformer, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- precision and hardware


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls are many times slower than fp32 on AVX2 CPUs
    if cfg.dtype == "float16" and device.type != "cuda":
        raise TrainError("--dtype=float16 needs CUDA (loss scaling); use float32 on this device")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def measure_cpu_peak_flops(seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s of this CPU with the threads torch uses: MFU's reference on CPU."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start)


def device_peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    if cfg.peak_flops:
        return cfg.peak_flops, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():  # ordered: most specific names first
            if key in name:
                return flops, f"{name} bf16 datasheet"
        return float("nan"), f"{name} is not in the peak table; pass --peak_flops for MFU"
    if device.type == "cpu":
        return measure_cpu_peak_flops(), "measured fp32 matmul"
    return float("nan"), "unknown device; pass --peak_flops for MFU"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- checkpoints


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a
    crash at any moment leaves either the old or the new file, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def full_state_dicts(model: nn.Module, raw_model: Transformer, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded, prefix-free model and optimizer state (FSDP: gathered to rank 0 on CPU)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(raw_model, options=opts), get_optimizer_state_dict(raw_model, optimizer, options=opts)
    return raw_model.state_dict(), optimizer.state_dict()


def save_checkpoint(state: dict, out_dir: str, step: int, keep: int) -> str:
    path = os.path.join(out_dir, "ckpt.pt")
    atomic_save(state, path)
    if keep > 0:
        numbered = os.path.join(out_dir, f"ckpt_{step:06d}.pt")
        if os.path.exists(numbered):
            os.remove(numbered)
        try:
            os.link(path, numbered)  # the same bytes under a second name, without a copy
        except OSError:
            shutil.copyfile(path, numbered)
        old = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))
        for name in old[:-keep]:
            os.remove(os.path.join(out_dir, name))
    return path


def load_checkpoint_file(path: str) -> dict:
    """sample.py's loader (weights_only: a .pt from elsewhere cannot run code; mmap: ranks
    share the pages), with its errors as TrainError."""
    from sample import SampleError, load_checkpoint

    try:
        return load_checkpoint(path)
    except SampleError as err:
        raise TrainError(str(err)) from None


def find_resume_checkpoint(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        return path if os.path.exists(path) else None
    return cfg.resume


def check_resumable(ckpt: dict, path: str, model_cfg: ModelConfig, d: Dist) -> None:
    if "optimizer" not in ckpt or "world_size" not in ckpt:
        raise TrainError(
            f"{path} holds weights but no training state (e.g. made by export_hf.py --import_from); "
            f"train into another out_dir with --init_from={path}"
        )
    saved = ModelConfig.from_dict(ckpt["model_config"])
    if saved != model_cfg:
        diffs = [f"{k}={v!r} (checkpoint) vs {getattr(model_cfg, k)!r} (now)" for k, v in asdict(saved).items() if getattr(model_cfg, k) != v]
        raise TrainError(
            f"cannot resume from {path}: the model config differs: {', '.join(diffs)}; use the same settings, "
            f"or start a new out_dir with --init_from={path} to warm-start from its weights"
        )
    if ckpt["world_size"] != d.world_size:
        raise TrainError(
            f"cannot resume from {path}: it was written by {ckpt['world_size']} rank(s) and this run has {d.world_size}; "
            f"exact resume needs the same world size (or use --init_from={path} in a new out_dir for a weights-only warm start)"
        )


# ----------------------------------------------------------------------------- the run


def build_model(cfg: TrainConfig, meta: dict, device: torch.device) -> tuple[Transformer, ModelConfig, Optional[dict]]:
    """The plain model, with weights from --init_from when asked. Returns the weights to
    load (None: keep the fresh init) so that FSDP can load them after sharding."""
    init_state = None
    if cfg.init_from == "scratch":
        model_cfg = cfg.model_config(meta["vocab_size"])
    elif cfg.init_from.startswith("hf:"):
        from export_hf import HFError, load_hf_model

        try:
            model_cfg, init_state = load_hf_model(cfg.init_from[3:])
        except HFError as err:
            raise TrainError(str(err)) from None
    else:
        ckpt = load_checkpoint_file(cfg.init_from)
        model_cfg, init_state = ModelConfig.from_dict(ckpt["model_config"]), ckpt["model"]
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise TrainError(
            f"the model's vocab_size={model_cfg.vocab_size} is smaller than the dataset tokenizer's "
            f"vocab_size={meta['vocab_size']}; leave vocab_size unset or prepare the data with the model's tokenizer"
        )
    if model_cfg.max_seq_len < cfg.block_size:
        raise TrainError(f"block_size={cfg.block_size} exceeds the initial model's max_seq_len={model_cfg.max_seq_len}")
    with torch.device(device):
        model = Transformer(model_cfg)
    return model, model_cfg, init_state


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, save and exit 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # A second Ctrl-C means "now". A SIGTERM after the first signal does not: torchrun
        # forwards one to every worker when the terminal's Ctrl-C reaches it too.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, d: Dist, device: torch.device) -> None:
    meta = load_meta(cfg.data_dir)
    train_data = TokenShards(cfg.data_dir, meta, "train", cfg.block_size)
    val_data = TokenShards(cfg.data_dir, meta, "val", cfg.block_size)
    if train_data.num_windows == 0:
        raise TrainError(f"the train split of {cfg.data_dir} has fewer than block_size+1={cfg.block_size + 1} tokens in every shard; lower block_size or add data")
    dtype = resolve_dtype(cfg, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fsdp = d.enabled and cfg.parallel == "fsdp"
    if fsdp and dtype == torch.float16:
        raise TrainError("FSDP here supports float32 and bfloat16; use --dtype=bfloat16 (fp16 would need a sharded loss scaler)")
    if dtype == torch.bfloat16 and device.type == "cpu":
        log0(d, "note: bfloat16 on CPU is usually several times slower than float32")

    # Same seed on every rank: identical initial weights, which DDP and FSDP require.
    torch.manual_seed(cfg.seed)
    model, model_cfg, init_state = build_model(cfg, meta, device)
    resume_path = find_resume_checkpoint(cfg)
    ckpt = load_checkpoint_file(resume_path) if resume_path else None
    if ckpt is not None:
        check_resumable(ckpt, resume_path, model_cfg, d)
        init_state = ckpt["model"]
    if init_state is not None and not fsdp:
        model.load_state_dict(init_state)
    # Dropout masks differ per rank; restored from the checkpoint on resume.
    torch.manual_seed(cfg.seed + 1 + d.rank)

    raw_model = model
    if cfg.grad_checkpoint:
        apply_grad_checkpoint(model)
    if use_compile:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, cfg, device, torch.bfloat16 if dtype == torch.bfloat16 else None)
    elif d.enabled:
        model = apply_ddp(model, device)
    optimizer = make_optimizer(raw_model, cfg, device)
    if fsdp and init_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Full weights come from rank 0 and are scattered into the shards. (One call per
        # object: the combined set_state_dict with empty dicts on other ranks hangs.)
        set_model_state_dict(raw_model, init_state if d.is_main else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # FSDP runs its own mixed precision; otherwise autocast does, with a loss scaler for fp16.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not fsdp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, tokens_seen, best_val_loss = 0, 0, float("inf")
    if ckpt is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(raw_model, optimizer, ckpt["optimizer"] if d.is_main else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, tokens_seen, best_val_loss = ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"][d.rank], device)
        log0(d, f"resumed from {resume_path} at step {step}")
    del ckpt, init_state

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * d.world_size
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * d.world_size
    counts = count_params(model_cfg)
    peak_flops, peak_source = device_peak_flops(cfg, device)
    log0(d, format_config(cfg))
    log0(d, f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {model_cfg.vocab_size}")
    log0(d, f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accum x {d.world_size} ranks = {global_batch} sequences = {tokens_per_step:,} tokens per step")
    log0(d, f"device: {device} {dtype} | parallel: {'fsdp' if fsdp else 'ddp' if d.enabled else 'none'} | compile: {use_compile} | grad checkpoint: {cfg.grad_checkpoint} | peak {peak_flops:.3g} FLOP/s ({peak_source})")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if d.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": config_to_dict(cfg), "model": model_cfg.to_dict()}, f, indent=2)
        tok_file = meta["tokenizer"].get("file")
        if tok_file and os.path.exists(os.path.join(cfg.data_dir, tok_file)):
            shutil.copyfile(os.path.join(cfg.data_dir, tok_file), os.path.join(cfg.out_dir, tok_file))
        truncate_metrics(metrics_path, step)

    def write_metrics(record: dict) -> None:
        if d.is_main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def micro_batches(s: int):
        """This rank's micro-batches of step s: slices of the global batch drawn from (seed, s)."""
        picks = train_data.sample([cfg.seed, s], global_batch)
        for micro in range(cfg.gradient_accumulation_steps):
            start = (micro * d.world_size + d.rank) * cfg.batch_size
            yield train_data.read(picks[start : start + cfg.batch_size], device)

    @torch.no_grad()
    def evaluate() -> Optional[dict]:
        """Mean loss over one fixed set of eval_iters x batch_size validation windows, the same
        at every evaluation and for any world size: ranks take every world_size-th window and
        pad their last batch with ignored targets (-1) so all run the same number of forwards,
        as FSDP's collectives require."""
        if val_data.num_windows == 0:
            return None
        model.eval()
        picks = val_data.sample([cfg.seed, 1], cfg.eval_iters * cfg.batch_size)[d.rank :: d.world_size]
        per_rank = math.ceil(cfg.eval_iters * cfg.batch_size / d.world_size)
        filler = picks[:1] or val_data.sample([cfg.seed, 1], 1)
        padded = picks + filler * (per_rank - len(picks))
        loss_sum, tokens = 0.0, 0
        for start in range(0, per_rank, cfg.batch_size):
            x, y = val_data.read(padded[start : start + cfg.batch_size], device)
            y = y.clone()  # y shares storage with x (one window, shifted by one)
            y[max(0, len(picks) - start) :] = -1  # padding rows count for nothing
            with autocast:
                loss = model(x, y)[1]
            valid = int((y != -1).sum())
            if valid:
                loss_sum += loss.item() * valid
                tokens += valid
        model.train()
        loss_total, token_total = all_reduce_sum([loss_sum, float(tokens)], d, device)
        val_loss = loss_total / token_total
        val = meta["splits"]["val"]
        bpb = val_loss / math.log(2) * val["tokens"] / val["bytes"] if val.get("bytes") else float("nan")
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": bpb}

    def checkpoint_state() -> dict:
        model_state, optim_state = full_state_dicts(model, raw_model, optimizer, fsdp)
        rngs = [None] * d.world_size
        if d.enabled:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs[0] = rng_state(device)
        return {
            "format_version": CHECKPOINT_FORMAT,
            "model": model_state, "optimizer": optim_state, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "model_config": model_cfg.to_dict(), "train_config": config_to_dict(cfg),
            "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val_loss,
            "tokenizer": meta["tokenizer"], "data": {"data_dir": cfg.data_dir, "vocab_size": meta["vocab_size"], "eot_id": meta["eot_id"]},
            "rng": rngs, "sampler": {"seed": cfg.seed, "next_step": step, "global_batch": global_batch},
            "world_size": d.world_size, "parallel": "fsdp" if fsdp else "ddp" if d.enabled else "none",
        }

    def eval_and_save(reason: str) -> None:
        nonlocal best_val_loss
        result = evaluate()
        if result is not None:
            best_val_loss = min(best_val_loss, result["val_loss"])
            log0(d, f"step {step}: val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.4f}")
            write_metrics({"step": step, **result})
        state = checkpoint_state()  # collective under FSDP/DDP: every rank takes part
        if d.is_main:
            path = save_checkpoint(state, cfg.out_dir, step, cfg.keep_checkpoints)
            log0(d, f"saved {path} ({reason})")
        del state
        if d.enabled:
            dist.barrier()

    stop = StopFlag()
    started = time.perf_counter()
    nonfinite_run = 0
    model.train()
    t_log, tokens_at_log = time.perf_counter(), 0
    while step < cfg.max_iters:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(micro_batches(step)):
            last = micro == cfg.gradient_accumulation_steps - 1
            # Gradients are reduced across ranks only on the last micro-step.
            if fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if d.enabled and not fsdp and not last else nullcontext()
            with sync:
                with autocast:
                    _, loss = model(x, y)
                loss_sum += loss.detach().float()
                # Divide so the accumulated gradient is the mean over the whole global batch.
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        out_of_time = cfg.max_time_min is not None and time.perf_counter() - started > cfg.max_time_min * 60
        # One collective decides for all ranks: the mean loss, whether any rank saw a
        # non-finite value, and whether any rank was asked to stop.
        loss_total, nonfinite, stop_votes = all_reduce_sum(
            [loss_sum.item(), float(not math.isfinite(loss_sum.item())), float(stop.requested or out_of_time)], d, device
        )
        loss_mean = loss_total / (cfg.gradient_accumulation_steps * d.world_size)
        grad_norm = grad_norm.item()
        finite = not nonfinite and (scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:  # (under fp16 the scaler itself skips steps whose gradients overflowed)
            nonfinite_run = 0
            scaler.step(optimizer)
        else:
            nonfinite_run += 1
            log0(d, f"step {step}: non-finite loss {loss_mean} / grad norm {grad_norm}; update skipped ({nonfinite_run}/{cfg.nonfinite_patience})")
            if nonfinite_run >= cfg.nonfinite_patience:
                raise TrainError(
                    f"the loss was non-finite for {nonfinite_run} steps in a row (last at step {step}); the last checkpoint "
                    "is untouched; lower learning_rate, raise warmup_iters or use --dtype=bfloat16/float32, then resume"
                )
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            now = time.perf_counter()
            tokens_per_s = (tokens_seen - tokens_at_log) / (now - t_log) if tokens_seen > tokens_at_log else 0.0
            t_log, tokens_at_log = now, tokens_seen
            mfu = estimate_mfu(model_cfg, cfg.block_size, tokens_per_s / d.world_size, peak_flops)
            mem = peak_memory_mb(device)
            log0(d, f"step {step}: loss {loss_mean:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | peak mem {mem:,.0f} MB")
            write_metrics({
                "step": step, "loss": loss_mean if finite else None, "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens_per_s": tokens_per_s,
                "mfu": mfu, "peak_mem_mb": mem, "tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - started,
            })
        if stop_votes:
            eval_and_save("time budget spent" if out_of_time and not stop.requested else "stopped by signal")
            return
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            eval_and_save("end of training" if step == cfg.max_iters else f"eval_interval={cfg.eval_interval}")
    log0(d, f"done: step {step}, {tokens_seen:,} tokens")


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop records a killed run wrote after its last checkpoint, so metrics.jsonl
    reads as one run."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_args_or_exit(TrainConfig, sys.argv[1:] if argv is None else argv)
    d = Dist()
    try:
        d, device = setup_distributed(cfg)
        train(cfg, d, device)
    except TrainError as err:
        if d.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            # train()'s closures form reference cycles that keep the DDP/FSDP model, and with it
            # the process group, alive until the next gc; a gloo group still alive at interpreter
            # exit can abort the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
