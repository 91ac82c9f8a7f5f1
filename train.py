"""Pretrain a HomeLLM model on token shards made by prepare.py.

    python train.py config/tiny_cpu.py                      # one CPU or GPU
    python train.py config/home_25m.py --batch_size=16      # any key can be overridden
    torchrun --nproc_per_node=4 train.py config/qwen_2_5b.py --parallel=fsdp
    python train.py config/qwen_2_5b.py --dry_run           # size and memory, no training

The loop in train() is plain PyTorch: sample a global batch, forward/backward over
micro-batches, clip, AdamW step, log, and every eval_interval steps evaluate and checkpoint.
DDP, FSDP2, activation checkpointing and torch.compile are applied to the plain model by the
small functions under "parallelism" below; model.py knows nothing about them.

Exact resume: which windows form step s depends only on (seed, s), the optimizer, grad
scaler and every rank's RNG state are checkpointed, so a run killed after a checkpoint and
resumed continues with bit-identical losses on CPU.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import (
    CHECKPOINT_FORMAT, NUMBERED, SHARDED, CheckpointError, checkpoint_candidates, is_sharded, load_checkpoint,
    ShardedSaver, load_sharded, load_train_state, remove_stale_temp_files, save_checkpoint,
)
from configurator import ConfigError, TrainConfig, config_to_dict, format_config, parse_args, parse_args_or_exit
from dataset import DatasetError, TokenShards, bits_per_byte, file_sha256, load_meta, tokenizer_fingerprint, verify_shards
from hardware import (
    DTYPES, GPU_PEAK_FLOPS, DeviceError, available_memory_bytes, choose_dtype, configure_cpu_threads, cpu_prefers_bf16,
    device_peak_flops, memory_table, peak_memory_mb, plan_run_memory, resolve_device,
)
from hf import load_hf_model
from model import ModelConfig, Transformer, count_params, describe, estimate_mfu, flops_per_token, make_optimizer
from system import usable_cpus
from tokenizer import TokenizerError


class TrainError(RuntimeError):
    """A problem the user can fix; main() prints it as one line and exits 1."""


# Errors from the libraries that are the user's to fix: one line, exit 1, no traceback.
USER_ERRORS = (TrainError, DatasetError, CheckpointError, DeviceError, TokenizerError)


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
    device = resolve_device(cfg.device, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d.enabled:
        # nccl for GPUs, gloo for CPU; the timeout turns a dead or stuck rank into an error
        # instead of an endless hang in the next collective. With FSDP's CPU offload the
        # sharded gradients live in host memory, so gradient clipping and checkpoint gathers
        # run collectives on CPU tensors too: those need gloo next to nccl.
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and cfg.parallel == "fsdp" and cfg.fsdp_cpu_offload:
            backend = "cuda:nccl,cpu:gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=cfg.dist_timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return d, device


def log0(d: Dist, *args) -> None:
    if d.is_main:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- schedule


def get_lr(step: int, cfg: TrainConfig, budget_spent: Optional[float] = None) -> float:
    """Linear warmup (non-zero at step 0), then cosine decay to min_lr at lr_decay_iters
    (default max_iters). A time-budgeted run (max_time_min) decays over its budget instead:
    budget_spent is the fraction of max_time_min used so far (1.0 on the last step), so the
    run ends at min_lr whenever the clock says it ends; warmup still counts steps."""
    if cfg.max_time_min is not None:
        spent = min(1.0, max(0.0, budget_spent or 0.0))
        decayed = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * spent)) * (cfg.learning_rate - cfg.min_lr)
        return min(decayed, cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1))
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


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
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if param_dtype is not None:
        # Compute in bf16, but reduce gradients in fp32 so small updates are not rounded away.
        # Forward inputs are not cast: the blocks' inputs include the RoPE tables, which then
        # stay fp32 exactly as under DDP's autocast (apply_rope computes in fp32 either way).
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
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

    # gradient_as_bucket_view: the gradients live inside DDP's communication buckets instead
    # of beside them, which saves one full copy of the gradients.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


# ----------------------------------------------------------------------------- model and checkpoints


def build_model(cfg: TrainConfig, meta: dict) -> tuple[Transformer, ModelConfig, Optional[dict]]:
    """The plain model on the meta device (shapes only, no memory yet), and the weights to load
    into it from --init_from (None: a fresh init). Parallelism is applied to the meta model,
    then each rank allocates only its own part (see materialize)."""
    init_state = None
    if cfg.init_from == "scratch":
        model_cfg = cfg.model_config(meta["vocab_size"])
        if cfg.vocab_size and cfg.vocab_size != meta["vocab_size"] and not int(os.environ.get("RANK", 0)):
            print(f"note: the config sets vocab_size={cfg.vocab_size} (a preset for another tokenizer, e.g. Qwen's), but the "
                  f"tokenizer of {cfg.data_dir} has {meta['vocab_size']} tokens: rows past it are never trained; "
                  "--vocab_size=None sizes the model to the data", flush=True)
    elif cfg.init_from.startswith("hf:"):
        model_cfg, init_state = load_hf_model(cfg.init_from[3:])
    else:
        ckpt = load_checkpoint(cfg.init_from)
        model_cfg, init_state = ModelConfig.from_dict(ckpt["model_config"]), ckpt["model"]
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise TrainError(
            f"the model's vocab_size={model_cfg.vocab_size} is smaller than the dataset tokenizer's "
            f"vocab_size={meta['vocab_size']}; leave vocab_size unset or prepare the data with the model's tokenizer"
        )
    if model_cfg.max_seq_len < cfg.block_size:
        raise TrainError(f"block_size={cfg.block_size} exceeds the initial model's max_seq_len={model_cfg.max_seq_len}")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return model, model_cfg, init_state


def materialize(model: Transformer, device: torch.device, init_state: Optional[dict], seed: int) -> None:
    """Allocate the (possibly sharded) meta model on device and fill it: with init_state when
    given, else with a fresh init drawn on the CPU from a generator seeded with `seed`, one full
    tensor at a time in the model's parameter order. Either way each rank copies only its own
    part, so memory holds this rank's shards plus one full tensor at most, and the weights are
    the same for any number of ranks and any layout (plain, DDP, FSDP). A mmapped checkpoint
    is read only where this rank's slices lie, so a node reads each byte once."""
    model.to_empty(device=device)
    if model.config.tie_embeddings and model.lm_head.weight is not model.embed.weight:
        model.lm_head.weight = model.embed.weight  # to_empty gives each module its own new tensor
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if init_state is None:
            for name, param in model.named_parameters():
                full = torch.empty(param.shape)
                model.init_parameter(name, full, generator)
                copy_local_part(param, full)
        else:
            expected = model.state_dict()
            missing, unexpected = set(expected) - set(init_state), set(init_state) - set(expected)
            if missing or unexpected:
                raise TrainError(f"the initial weights do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
            for name, param in expected.items():
                copy_local_part(param, init_state[name])
    model.init_rope()


def copy_local_part(param: torch.Tensor, full: torch.Tensor) -> None:
    """param (a plain tensor, or an FSDP shard as a DTensor) <- its part of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    param.to_local().copy_(local)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_training_state(ckpt: dict, path: str, model: Transformer, optimizers: list, scaler, d: Dist, device: torch.device) -> None:
    """Optimizer, loss scaler and RNG from a checkpoint (a sharded one: the weights too). A
    sharded checkpoint loads into any number of ranks; a .pt one's optimizer state is full, and
    each rank keeps its part of it. Each rank takes back its own RNG state; ranks the writer
    did not have keep their fresh seed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict, set_state_dict

    if ckpt.get("sharded"):
        model_state, optim_state = get_state_dict(model, optimizers)
        shards = {"model": model_state, "optimizer": optim_state}
        load_sharded(path, shards)
        set_state_dict(model, optimizers, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    elif all(isinstance(k, int) for k in ckpt["optimizer"].get("state", {})):  # written before names were used
        optimizers[-1].load_state_dict(ckpt["optimizer"])
    else:  # keyed by parameter name: each rank of a sharded model keeps its part
        set_optimizer_state_dict(model, optimizers, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if d.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][d.rank], device)


def find_resume_checkpoint(cfg: TrainConfig, d: Dist) -> tuple[Optional[str], Optional[dict]]:
    """The checkpoint to continue from, loaded: (path, ckpt), or (None, None) to start fresh.
    A sharded checkpoint is loaded without its tensors here (ckpt["sharded"] is True).

    --resume=auto takes the newest checkpoint that loads (ckpt.pt, a numbered copy, or an FSDP
    run's ckpt_STEP/), saying so when it had to pass over a newer one. It never starts over on
    top of checkpoints it cannot read: that would rotate them away. --resume=never moves an
    earlier run's checkpoints and metrics into a subdirectory first, so starting over loses
    nothing."""
    def load(path: str) -> dict:
        return load_train_state(path) if is_sharded(path) else load_checkpoint(path)

    if cfg.resume not in ("auto", "never"):
        return cfg.resume, load(cfg.resume)
    candidates = checkpoint_candidates(cfg.out_dir) if os.path.isdir(cfg.out_dir) else []
    if cfg.resume == "never":
        if candidates and d.is_main:
            archive = os.path.join(cfg.out_dir, time.strftime("previous-run-%Y%m%d-%H%M%S"))
            os.makedirs(archive)
            for name in os.listdir(cfg.out_dir):
                if NUMBERED.fullmatch(name) or SHARDED.fullmatch(name) or name in ("ckpt.pt", "metrics.jsonl", "config.json", "status.json"):
                    os.replace(os.path.join(cfg.out_dir, name), os.path.join(archive, name))
            log0(d, f"--resume=never: moved the earlier run's checkpoints and metrics to {archive}")
        return None, None
    problems = []
    for path in candidates:
        try:
            ckpt = load(path)
        except CheckpointError as err:
            problems.append(str(err))
            log0(d, f"warning: cannot resume from {path}: {err}")
            continue
        latest = os.path.join(cfg.out_dir, "ckpt.pt")
        if NUMBERED.fullmatch(os.path.basename(path)) and not os.path.exists(latest):
            log0(d, f"note: {latest} is missing; resuming from the newest numbered copy that loads, {path}")
        return path, ckpt
    if problems:
        raise TrainError(
            f"{cfg.out_dir} holds checkpoints but none of them loads ({problems[0]}); pass --resume=PATH to pick one, "
            "--resume=never to start over (the old files are moved aside), or another --out_dir"
        )
    return None, None


def check_resumable(ckpt: dict, path: str, model_cfg: ModelConfig, d: Dist, global_batch: int, tokenizer_sha256: str, out_dir_tokenizer: str) -> None:
    if ("optimizer" not in ckpt and not ckpt.get("sharded")) or "world_size" not in ckpt:
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
        # Weights and optimizer state reshard to any number of ranks. Which windows a step reads
        # depends only on (seed, step, global batch), so with the same global batch the data
        # continues exactly; only the per-rank dropout RNG streams cannot be carried over.
        before, now = ckpt.get("sampler", {}).get("global_batch"), global_batch
        same = "the same global batch, so the data order continues exactly" if before == now else (
            f"a global batch of {now} sequences instead of {before}: set batch_size or gradient_accumulation_steps to keep it")
        log0(d, f"note: {path} was written by {ckpt['world_size']} rank(s), this run has {d.world_size}; {same}")
    # Same vocab size is not enough: another tokenizer maps the same ids to other text. Older
    # checkpoints carry no fingerprint; then the tokenizer copy in out_dir stands in for it.
    trained_with = ckpt.get("tokenizer_sha256") or (file_sha256(out_dir_tokenizer) if os.path.isfile(out_dir_tokenizer) else None)
    if trained_with and trained_with != tokenizer_sha256:
        raise TrainError(
            f"cannot resume from {path}: the dataset's tokenizer is not the one this run was trained with "
            f"(sha256 {tokenizer_sha256[:12]} vs {trained_with[:12]}); train on data prepared with the same tokenizer, "
            f"or start a new out_dir with --init_from={path} to continue from these weights on purpose"
        )


def own_out_dir(out_dir: str) -> Any:
    """Take out_dir/train.lock for this run (rank 0), or refuse: two runs writing one out_dir
    would interleave their metrics and checkpoints. flock is released by the kernel when the
    holder dies, even by kill -9, so a stale lock never blocks; the pid and host written into
    the file only make the message useful. Also removes temp files of saves that a kill cut
    short. Returns the open lock file: the lock lasts as long as that object."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "train.lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise TrainError(f"{out_dir} is in use by another training run ({holder}); wait for it or stop it, or choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    lock.flush()
    for name in remove_stale_temp_files(out_dir):
        print(f"removed {name}, left behind by a run killed while saving", flush=True)
    return lock


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop records a killed run wrote after its last checkpoint, so metrics.jsonl
    reads as one run."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:  # a torn last line (power loss mid-write) is dropped, not fatal
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


# ----------------------------------------------------------------------------- what others watch


def write_status(out_dir: str, state: str, reason: Optional[str] = None, **fields: Any) -> None:
    """out_dir/status.json: running, finished, stopped or crashed, and why, for studio.py and
    anyone else watching (a "running" whose pid is gone died without a word, e.g. kill -9).
    Fields not given keep their last value. Written to a temp file and renamed, so a reader
    never sees half of it; a few hundred bytes, cheap enough to rewrite at every log."""
    path = os.path.join(out_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    record.update(fields, state=state, reason=reason, pid=os.getpid(), host=socket.gethostname(), updated=time.time())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def record_crash(out_dir: str, reason: str) -> None:
    """Mark a run that had started in out_dir as crashed; never hides the error being reported."""
    if os.path.exists(os.path.join(out_dir, "status.json")):
        try:
            write_status(out_dir, "crashed", " ".join(reason.split())[:1000])
        except OSError:
            pass


def optional_import(module: str, flag: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainError(f"{flag} needs the {package} package, which is not installed: pip install {package} (or drop {flag})") from None


class MetricSinks:
    """--wandb_project / --tensorboard_dir: every record written to metrics.jsonl also goes to
    Weights & Biases and/or TensorBoard, under the same names. Both packages are optional and
    imported only when asked for, on every rank, so a missing one stops the run before any
    work; only rank 0 writes. W&B's run opens at the first record (a run that fails at start
    leaves no empty W&B run) and finishes at exit by itself; TensorBoard is flushed after each
    record, so nothing needs closing on any of train()'s ways out."""

    def __init__(self, cfg: TrainConfig, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.wandb = optional_import("wandb", "--wandb_project", "wandb") if cfg.wandb_project else None
        self.tensorboard = optional_import("torch.utils.tensorboard", "--tensorboard_dir", "tensorboard") if cfg.tensorboard_dir else None
        self.wandb_run: Any = None
        self.tb_writer: Any = None

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self.wandb is not None:
            if self.wandb_run is None:
                name = os.path.basename(os.path.abspath(self.cfg.out_dir))
                self.wandb_run = self.wandb.init(project=self.cfg.wandb_project, name=name, config=config_to_dict(self.cfg))
            self.wandb_run.log(scalars, step=step)
        if self.tensorboard is not None:
            if self.tb_writer is None:
                self.tb_writer = self.tensorboard.SummaryWriter(log_dir=self.cfg.tensorboard_dir)
            for key, value in scalars.items():
                self.tb_writer.add_scalar(key, value, step)
            self.tb_writer.flush()


# ----------------------------------------------------------------------------- pieces of the loop


@dataclass
class Run:
    """The fixed facts of one run that the functions below share: settings, ranks, device,
    dataset and model description, and how the forward pass is wrapped."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    meta: dict
    model_cfg: ModelConfig
    fsdp: bool
    autocast: Any  # a torch.autocast context, or nullcontext()
    global_batch: int  # sequences per optimizer step, over all ranks and micro-steps
    metrics_path: str
    tokenizer_sha256: str
    sinks: Optional["MetricSinks"] = None  # --wandb_project / --tensorboard_dir
    saver: Optional[ShardedSaver] = None  # writes an FSDP run's sharded checkpoints


@dataclass
class Progress:
    """The counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    elapsed_s: float = 0.0  # wall time of the run so far, across resumes: a time budget's clock


def write_metrics(run: Run, record: dict) -> None:
    """Append one record to metrics.jsonl; NaN/inf become null, which every JSON reader accepts."""
    if run.d.is_main:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(run.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if run.sinks is not None:
            run.sinks.write(clean)


def read_step(run: Run, data: TokenShards, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of `step`: slices of the global batch drawn from (seed, step)."""
    cfg, d = run.cfg, run.d
    picks = data.sample([cfg.seed, step], run.global_batch)
    starts = [(micro * d.world_size + d.rank) * cfg.batch_size for micro in range(cfg.gradient_accumulation_steps)]
    return [data.read(picks[start : start + cfg.batch_size], run.device) for start in starts]


@torch.no_grad()
def evaluate(run: Run, model: nn.Module, data: TokenShards) -> Optional[dict]:
    """Mean loss over one fixed set of eval_iters x batch_size validation windows, the same at
    every evaluation and for any world size: ranks take every world_size-th window and pad
    their last batch with ignored targets (-1) so all run the same number of forwards, as
    FSDP's collectives require."""
    cfg, d = run.cfg, run.d
    if data.num_windows == 0:
        return None
    model.eval()
    picks = data.sample([cfg.seed, 1], cfg.eval_iters * cfg.batch_size)[d.rank :: d.world_size]
    per_rank = math.ceil(cfg.eval_iters * cfg.batch_size / d.world_size)
    filler = picks[:1] or data.sample([cfg.seed, 1], 1)
    padded = picks + filler * (per_rank - len(picks))
    sums = torch.zeros(2, dtype=torch.float64 if run.device.type != "mps" else torch.float32, device=run.device)
    for start in range(0, per_rank, cfg.batch_size):
        x, y = data.read(padded[start : start + cfg.batch_size], run.device)
        y = y.clone()  # y shares storage with x (one window, shifted by one)
        y[max(0, len(picks) - start) :] = -1  # padding rows count for nothing
        with run.autocast:
            loss = model(x, y)
        valid = (y != -1).sum()
        sums += torch.stack([loss.detach() * valid, valid]).to(sums.dtype)  # (a row of padding only: 0 * 0)
    model.train()
    if d.enabled:
        dist.all_reduce(sums)
    loss_total, token_total = sums.tolist()
    val_loss = loss_total / token_total
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": bits_per_byte(val_loss, run.meta["splits"]["val"])}


def checkpoint_state(run: Run, progress: Progress, scaler) -> dict:
    """Everything exact resume needs besides weights and optimizer state. A collective under
    DDP/FSDP (every rank's RNG state is gathered): every rank must call it."""
    cfg, d = run.cfg, run.d
    rngs: list[Any] = [None] * d.world_size
    if d.enabled:
        dist.all_gather_object(rngs, rng_state(run.device))
    else:
        rngs[0] = rng_state(run.device)
    return {
        "format_version": CHECKPOINT_FORMAT, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "model_config": run.model_cfg.to_dict(), "train_config": config_to_dict(cfg),
        "step": progress.step, "tokens_seen": progress.tokens_seen, "best_val_loss": progress.best_val_loss, "elapsed_s": progress.elapsed_s,
        "tokenizer": run.meta["tokenizer"], "tokenizer_sha256": run.tokenizer_sha256,
        "data": {"data_dir": cfg.data_dir, "vocab_size": run.meta["vocab_size"], "eot_id": run.meta["eot_id"]},
        "rng": rngs, "sampler": {"seed": cfg.seed, "next_step": progress.step, "global_batch": run.global_batch},
        "world_size": d.world_size, "parallel": "fsdp" if run.fsdp else "ddp" if d.enabled else "none",
    }


def eval_and_save(run: Run, model: nn.Module, raw_model: Transformer, optimizers: list, scaler,
                  val_data: TokenShards, progress: Progress, reason: str, nonfinite_run: int, background: bool = False) -> bool:
    """Evaluate, record, and write the checkpoint (rank 0), with every rank taking part.
    During a streak of non-finite steps nothing is saved: the weights may already be wrecked,
    and the last checkpoint must stay one from before. Returns whether it saved.
    background: a sharded checkpoint may be written while training goes on (--async_checkpoint);
    the last save of a run is always waited for."""
    result = evaluate(run, model, val_data)
    if result is not None:
        progress.best_val_loss = min(progress.best_val_loss, result["val_loss"])
        log0(run.d, f"step {progress.step}: val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.4f}")
        write_metrics(run, {"step": progress.step, **result})
    if nonfinite_run:
        log0(run.d, f"step {progress.step}: not saving a checkpoint ({reason}): the last {nonfinite_run} step(s) were non-finite")
        return False
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = checkpoint_state(run, progress, scaler)
    if run.fsdp:  # every rank writes its own shards; nothing is gathered
        model_state, optim_state = get_state_dict(raw_model, optimizers)
        previous = run.saver.wait()  # a background save still in flight finishes first
        if previous:
            log0(run.d, f"saved {previous} (written in the background)")
        wait = not (background and run.saver.background)
        t0 = time.perf_counter()
        path = run.saver.save({"model": model_state, "optimizer": optim_state}, state, run.cfg.out_dir, progress.step,
                              run.cfg.keep_checkpoints, wait=wait)
        if not wait:
            log0(run.d, f"saving {path} in the background ({reason}; training paused {time.perf_counter() - t0:.2f} s to copy the shards)")
            return True
    else:
        if run.d.is_main:
            # The optimizer state keyed by parameter name, so that any layout can load it.
            model_state, optim_state = get_state_dict(raw_model, optimizers)
            state.update(model=model_state, optimizer=optim_state)
            path = save_checkpoint(state, run.cfg.out_dir, progress.step, run.cfg.keep_checkpoints)
        if run.d.enabled:
            dist.barrier()
    log0(run.d, f"saved {path if run.d.is_main else ''} ({reason})")
    return True


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


# ----------------------------------------------------------------------------- the run


def warn_about_val_split(cfg: TrainConfig, d: Dist, meta: dict, val_data: TokenShards) -> None:
    """Say so when validation cannot run or would re-read the same few tokens."""
    val_tokens = meta["splits"].get("val", {}).get("tokens", 0)
    read = cfg.eval_iters * cfg.batch_size * (cfg.block_size + 1)
    fix = "re-run prepare.py with a larger --val_fraction or a --val_input"
    if val_data.num_windows == 0:
        log0(d, f"warning: the val split of {cfg.data_dir} ({val_tokens:,} tokens) holds no window of block_size+1="
                f"{cfg.block_size + 1} tokens, so there will be no val loss or bits per byte; {fix}")
    elif val_tokens < read:
        log0(d, f"warning: the val split of {cfg.data_dir} has {val_tokens:,} tokens but one evaluation reads {read:,} "
                f"(eval_iters x batch_size windows), so its windows overlap and val loss is noisy; {fix}, or lower --eval_iters")


def train(cfg: TrainConfig, d: Dist, device: torch.device, saver: Optional[ShardedSaver] = None) -> None:
    sinks = MetricSinks(cfg, d.is_main)  # first: a missing wandb/tensorboard fails before any work
    meta = load_meta(cfg.data_dir)
    verify_shards(cfg.data_dir, meta)
    tokenizer_sha256 = tokenizer_fingerprint(cfg.data_dir, meta)
    train_data = TokenShards(cfg.data_dir, meta, "train", cfg.block_size)
    val_data = TokenShards(cfg.data_dir, meta, "val", cfg.block_size)
    if train_data.num_windows == 0:
        raise TrainError(f"the train split of {cfg.data_dir} has fewer than block_size+1={cfg.block_size + 1} tokens in every shard; lower block_size or add data")
    warn_about_val_split(cfg, d, meta, val_data)
    dtype, dtype_why = choose_dtype(cfg.dtype, device, training=True)
    # Training is compute-bound: all the CPUs, split among the ranks on this host (torchrun
    # already sets OMP_NUM_THREADS=1 per rank, which configure_cpu_threads respects).
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = configure_cpu_threads(max(1, usable_cpus() // local_ranks)) if device.type == "cpu" else ""
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fsdp = d.enabled and cfg.parallel == "fsdp"
    if fsdp and cfg.optimizer == "muon":
        raise TrainError("optimizer=muon needs whole matrices and FSDP shards them; use --parallel=ddp (or one process), or --optimizer=adamw")
    if fsdp and dtype == torch.float16:
        raise TrainError("FSDP here supports float32 and bfloat16; use --dtype=bfloat16 (fp16 would need a sharded loss scaler)")
    if dtype == torch.bfloat16 and device.type == "cpu" and cfg.dtype != "auto":
        prefers_bf16, probe_says = cpu_prefers_bf16()
        if not prefers_bf16:
            log0(d, f"note: --dtype bfloat16 on a CPU where --dtype auto would choose {probe_says}")

    raw_model, model_cfg, init_state = build_model(cfg, meta)  # on the meta device
    check_memory_fits(cfg, model_cfg, d, device, dtype)
    _lock = own_out_dir(cfg.out_dir) if d.is_main else None  # held until train() returns
    resume_path, ckpt = find_resume_checkpoint(cfg, d)
    tok_file = meta["tokenizer"].get("file") or ""
    if ckpt is not None:
        global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * d.world_size
        check_resumable(ckpt, resume_path, model_cfg, d, global_batch, tokenizer_sha256, os.path.join(cfg.out_dir, tok_file))
        init_state = None if ckpt.get("sharded") else ckpt["model"]

    model: nn.Module = raw_model
    if cfg.grad_checkpoint:
        apply_grad_checkpoint(raw_model)
    if use_compile:
        apply_compile(raw_model)
    if fsdp:
        apply_fsdp(raw_model, cfg, device, torch.bfloat16 if dtype == torch.bfloat16 else None)
    materialize(raw_model, device, init_state, cfg.seed)
    if d.enabled and not fsdp:
        model = apply_ddp(raw_model, device)
    optimizers = make_optimizer(raw_model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                fused=device.type == "cuda" and not cfg.fsdp_cpu_offload, kind=cfg.optimizer)
    # FSDP runs its own mixed precision; otherwise autocast does, with a loss scaler for fp16.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not fsdp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Dropout masks differ per rank; restored from the checkpoint on resume.
    torch.manual_seed(cfg.seed + 1 + d.rank)
    ready = [peak_memory_mb(device)] * d.world_size
    if d.enabled:
        dist.all_gather_object(ready, ready[0])
    log0(d, "memory with the model built: " + ", ".join(f"rank {r} {mb:,.0f} MB" for r, mb in enumerate(ready)) + " (peak so far)")

    progress = Progress()
    if ckpt is not None:
        restore_training_state(ckpt, resume_path, raw_model, optimizers, scaler, d, device)
        progress = Progress(ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"], ckpt.get("elapsed_s", 0.0))
        log0(d, f"resumed from {resume_path} at step {progress.step}")
    del ckpt, init_state

    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * d.world_size
    tokens_per_step = global_batch * cfg.block_size
    run = Run(cfg, d, device, meta, model_cfg, fsdp, autocast, global_batch, os.path.join(cfg.out_dir, "metrics.jsonl"), tokenizer_sha256, sinks,
              saver=(saver or ShardedSaver(timeout_min=cfg.dist_timeout_min)) if fsdp else None)
    if cfg.async_checkpoint and not fsdp:
        log0(d, "note: --async_checkpoint applies to FSDP's sharded checkpoints; this run writes .pt checkpoints, synchronously")
    counts = count_params(model_cfg)
    peak_flops, peak_source = device_peak_flops(device, cfg.peak_flops, dtype)
    log0(d, format_config(cfg))
    log0(d, f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {model_cfg.vocab_size}")
    log0(d, f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accum x {d.world_size} ranks = {global_batch} sequences = {tokens_per_step:,} tokens per step")
    log0(d, f"dtype: {str(dtype).removeprefix('torch.')} ({dtype_why}){' | ' + threads if threads else ''}")
    log0(d, f"device: {device} {dtype} | parallel: {'fsdp' if fsdp else 'ddp' if d.enabled else 'none'} | compile: {use_compile} | grad checkpoint: {cfg.grad_checkpoint} | peak {peak_flops:.3g} FLOP/s ({peak_source})")
    if d.is_main:
        with open(os.path.join(cfg.out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": config_to_dict(cfg), "model": model_cfg.to_dict()}, f, indent=2)
        if tok_file:  # sample.py and export_hf.py then need only out_dir
            shutil.copyfile(os.path.join(cfg.data_dir, tok_file), os.path.join(cfg.out_dir, tok_file))
        truncate_metrics(run.metrics_path, progress.step)
        write_status(cfg.out_dir, "running", step=progress.step, max_iters=cfg.max_iters, max_time_min=cfg.max_time_min,
                     elapsed_s=progress.elapsed_s, world_size=d.world_size,
                     started=time.time(), cwd=os.getcwd(), command=sys.argv)
    last_saved = progress.step if resume_path else None

    stop = StopFlag()
    # The clock of a time-budgeted run: wall seconds since the run began (a resumed run goes on
    # from the checkpoint's count), as rank 0 measures it; every rank gets rank 0's value with
    # the step's statistics, so all ranks use the same learning rate and stop at the same step.
    started = time.perf_counter() - progress.elapsed_s
    budget_s = cfg.max_time_min * 60 if cfg.max_time_min is not None else None
    elapsed, step_s, after_eval, decay_s = progress.elapsed_s, None, True, budget_s
    lr, out_of_time = optimizers[0].param_groups[0]["lr"], False  # (for the final line when no step is left)
    nonfinite_run = 0
    model.train()
    t_log, tokens_at_log = time.perf_counter(), progress.tokens_seen
    batches = read_step(run, train_data, progress.step)
    while cfg.max_iters is None or progress.step < cfg.max_iters:
        step = progress.step
        # The step that will cross the budget is the last. The decay aims to end three steps
        # before the budget (never later than before), so that the last step runs at min_lr even
        # when steps take longer than the estimate, as on a busy machine.
        last_by_time = budget_s is not None and step_s is not None and elapsed + step_s >= budget_s
        if budget_s is not None:
            decay_s = min(decay_s, max(budget_s - 3 * (step_s or 0.0), budget_s / 2))
        lr = get_lr(step, cfg, 1.0 if last_by_time else elapsed / decay_s if budget_s else None)
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(batches):
            last = micro == cfg.gradient_accumulation_steps - 1
            # Gradients are reduced across ranks only on the last micro-step.
            if fsdp:
                raw_model.set_requires_gradient_sync(last)
            sync = model.no_sync() if d.enabled and not fsdp and not last else nullcontext()
            with sync:
                with autocast:
                    loss = model(x, y)
                loss_sum += loss.detach().float()
                # Divide so the accumulated gradient is the mean over the whole global batch.
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
        # On a GPU the work above is only queued: read the next step's batches meanwhile.
        batches = read_step(run, train_data, step + 1) if not last_by_time and step + 1 != cfg.max_iters else []
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # Everything the host needs from this step in one small tensor, summed over ranks and
        # read once: the loss, the grad norm (equal on every rank), the stop votes and rank 0's
        # clock. A non-finite loss on any rank makes the sum non-finite: all ranks skip together.
        host = torch.tensor([float(stop.requested), time.perf_counter() - started if d.is_main else 0.0], device=device)
        stats = torch.cat([torch.stack([loss_sum, grad_norm.float()]), host])
        if d.enabled:
            dist.all_reduce(stats)
        loss_total, grad_norm_total, stop_votes, now_elapsed = stats.tolist()
        if not after_eval:  # a step's duration, erring long, for spotting the last one
            step_s = max(now_elapsed - elapsed, 0.8 * (step_s or 0.0))
        elapsed, after_eval = now_elapsed, False
        progress.elapsed_s = elapsed
        out_of_time = budget_s is not None and (last_by_time or elapsed >= budget_s)
        loss_mean = loss_total / (cfg.gradient_accumulation_steps * d.world_size)
        grad_norm = grad_norm_total / d.world_size
        finite = math.isfinite(loss_total) and (scaler.is_enabled() or math.isfinite(grad_norm))
        if finite:  # (under fp16 the scaler itself skips steps whose gradients overflowed)
            nonfinite_run = 0
            for opt in optimizers:
                scaler.step(opt)
        else:
            nonfinite_run += 1
            log0(d, f"step {step}: non-finite loss {loss_mean} / grad norm {grad_norm}; update skipped ({nonfinite_run}/{cfg.nonfinite_patience})")
            if nonfinite_run >= cfg.nonfinite_patience:
                saved = f"the last checkpoint (step {last_saved}) is from before them" if last_saved is not None else "no checkpoint was saved"
                raise TrainError(
                    f"the loss was non-finite for {nonfinite_run} steps in a row (last at step {step}); {saved}; "
                    "lower learning_rate, raise warmup_iters or use --dtype=bfloat16/float32, then resume"
                )
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens_seen += tokens_per_step
        step = progress.step

        if step % cfg.log_interval == 0 or step == cfg.max_iters or out_of_time:
            now = time.perf_counter()
            tokens_per_s = (progress.tokens_seen - tokens_at_log) / (now - t_log) if progress.tokens_seen > tokens_at_log else 0.0
            t_log, tokens_at_log = now, progress.tokens_seen
            mfu = estimate_mfu(model_cfg, cfg.block_size, tokens_per_s / d.world_size, peak_flops)
            if mfu > 1:  # the peak was measured (or given) too low, e.g. on a busy CPU: the rate seen is the better bound
                slow_peak, peak_flops = peak_flops, peak_flops * mfu
                log0(d, f"note: step {step} computed faster than the peak of {slow_peak:.3g} FLOP/s; MFU is now relative to {peak_flops:.3g}")
                mfu = 1.0
            mem = peak_memory_mb(device)
            log0(d, f"step {step}: loss {loss_mean:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | peak mem {mem:,.0f} MB")
            write_metrics(run, {
                "step": step, "loss": loss_mean if finite else None, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_mb": mem, "tokens_seen": progress.tokens_seen,
                "elapsed_s": elapsed,
            })
            if d.is_main:
                write_status(cfg.out_dir, "running", step=step, elapsed_s=elapsed)
        if stop_votes:
            eval_and_save(run, model, raw_model, optimizers, scaler, val_data, progress, "stopped by signal", nonfinite_run)
            if d.is_main:
                write_status(cfg.out_dir, "stopped", "signal", step=step)
            return
        if out_of_time:  # the budget is the schedule's end: the run is complete
            eval_and_save(run, model, raw_model, optimizers, scaler, val_data, progress, "time budget spent", nonfinite_run)
            break
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            reason = "end of training" if step == cfg.max_iters else f"eval_interval={cfg.eval_interval}"
            if eval_and_save(run, model, raw_model, optimizers, scaler, val_data, progress, reason, nonfinite_run,
                             background=step != cfg.max_iters):
                last_saved = step
            after_eval = True
    log0(d, f"done: step {progress.step}, {progress.tokens_seen:,} tokens, {progress.elapsed_s / 60:.1f} min, final lr {lr:.3e}")
    if d.is_main:
        write_status(cfg.out_dir, "finished", "time budget" if out_of_time else "max_iters", step=progress.step)


def dry_run(cfg: TrainConfig) -> None:
    """Print what the config builds, what each rank needs and roughly how long a step takes,
    without allocating anything. Under torchrun the plan is for that many ranks."""
    if int(os.environ.get("RANK", 0)):
        return
    try:
        vocab_size, source = load_meta(cfg.data_dir)["vocab_size"], f"the tokenizer of {cfg.data_dir}"
    except DatasetError:
        vocab_size, source = 32000, f"a default: no dataset at {cfg.data_dir}"
    model_cfg = cfg.model_config(vocab_size)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = cfg.device.split(":")[0] if cfg.device != "auto" else "cuda"
    auto_bf16 = device_type == "cuda" or (device_type == "cpu" and cpu_prefers_bf16()[0])
    dtype = DTYPES.get(cfg.dtype, torch.bfloat16 if auto_bf16 else torch.float32)
    print(f"vocab_size: {model_cfg.vocab_size} ({'set in the config' if cfg.vocab_size else source})")
    print(describe(model_cfg, cfg.block_size))
    print(plan_run_memory(cfg, model_cfg, world_size, device_type, dtype).format())
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size * cfg.block_size
    flops = flops_per_token(model_cfg, cfg.block_size) * tokens_per_step / world_size
    times = ", ".join(f"{gpu} {flops / (GPU_PEAK_FLOPS[gpu] * 0.4):.2f} s" for gpu in ("H100 SXM", "A100", "L40S", "RTX 4090", "L4"))
    print(f"tokens per step: {tokens_per_step:,}; step time at an assumed 40% MFU: {times}")
    print(memory_table(model_cfg, cfg.batch_size, cfg.block_size, max(world_size, 8), cfg.gradient_accumulation_steps))


def check_memory_fits(cfg: TrainConfig, model_cfg: ModelConfig, d: Dist, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before allocating anything, a run whose planned memory exceeds the device's: an
    out-of-memory kill minutes later (or a swapping machine) is worse than a message now."""
    plan = plan_run_memory(cfg, model_cfg, d.world_size, device.type, dtype)
    available, what = available_memory_bytes(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if plan.total <= available:
        return
    options = []
    for flag, change in (("--grad_checkpoint=True", {"grad_checkpoint": True}), (f"--batch_size={max(1, cfg.batch_size // 4)}", {"batch_size": max(1, cfg.batch_size // 4)}),
                         ("--parallel=fsdp", {"parallel": "fsdp"}), ("--fsdp_cpu_offload=True", {"parallel": "fsdp", "fsdp_cpu_offload": True})):
        other = replace(cfg, **change)
        if other != cfg and plan_run_memory(other, model_cfg, d.world_size, device.type, dtype).total <= available:
            options.append(flag)
    if not options:  # which presets would, on this machine and data
        presets_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
        for name in sorted(os.listdir(presets_dir)) if os.path.isdir(presets_dir) else []:
            try:
                preset = parse_args(TrainConfig, [os.path.join(presets_dir, name)])
                preset_model = preset.model_config(model_cfg.vocab_size)
            except (ConfigError, ValueError):
                continue
            if plan_run_memory(preset, preset_model, d.world_size, device.type, dtype).total <= available:
                options.append(f"config/{name}")
    biggest = max(plan.parts, key=plan.parts.get)
    hint = f"these would fit: {', '.join(options)}" if options else "use more GPUs with --parallel=fsdp (see --dry_run)"
    raise TrainError(f"this run needs about {plan.total / 2**30:.1f} GiB per rank (the most for {biggest}: {plan.parts[biggest] / 2**30:.1f} GiB) "
                     f"but {what}; {hint}")


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_args_or_exit(TrainConfig, sys.argv[1:] if argv is None else argv)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        print(f"error: out_dir {cfg.out_dir} is a file, not a directory; choose another --out_dir", file=sys.stderr)
        sys.exit(2)
    if cfg.dry_run:
        dry_run(cfg)
        return
    d = Dist()
    # Made here, so that the finally below can let a background checkpoint write complete
    # before the process group it talks over is destroyed.
    saver = ShardedSaver(background=cfg.async_checkpoint, timeout_min=cfg.dist_timeout_min)
    try:
        d, device = setup_distributed(cfg)
        train(cfg, d, device, saver)
    except USER_ERRORS as err:
        if d.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
            record_crash(cfg.out_dir, f"error: {err}")
        sys.exit(1)
    except OSError as err:  # a full disk, a read-only out_dir: the system's words, on one line
        message = f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}"
        print(message, file=sys.stderr, flush=True)
        if d.is_main:
            record_crash(cfg.out_dir, message)
        sys.exit(1)
    except (Exception, KeyboardInterrupt) as err:  # a bug, out of memory, a second Ctrl-C: the traceback still prints
        if d.is_main:
            record_crash(cfg.out_dir, f"{type(err).__name__}: {err}")
        raise
    finally:
        saver.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
