"""What this machine is and what fits on it: device and dtype choice, peak FLOP/s for MFU,
memory readings, and the training memory estimate.

train.py, sample.py and bench.py resolve --device/--dtype here, so "auto" means the same thing
everywhere; where training and inference really differ (fp16 needs a loss scaler, so only
training falls back to it on GPUs without bf16), that is the explicit `training` argument.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from model import ModelConfig, count_params

if TYPE_CHECKING:
    from configurator import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name(); ordered so that more specific names match first.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 6000 Ada": 364e12, "RTX A6000": 155e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


class DeviceError(RuntimeError):
    """A --device/--dtype this machine cannot honour; the message says what to use instead."""


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: cuda > mps > cpu. Plain "cuda" means this process's GPU: LOCAL_RANK under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"--device {name} is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for but this PyTorch sees no CUDA GPU; use --device cpu "
                              "or install a CUDA build of torch (README: Installing PyTorch with CUDA)")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"--device {name}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        return torch.device("cuda", int(index) if index else local_rank)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name} was asked for but MPS is not available here; use --device cpu")
    return torch.device(kind)


def resolve_dtype(name: str, device: torch.device, training: bool) -> torch.dtype:
    """--dtype auto: bf16 on CUDA GPUs that support it; otherwise fp16 for training (with a loss
    scaler) but fp32 for inference; fp32 elsewhere (bf16 matmuls are many times slower than fp32
    on AVX2-only CPUs). fp16 training needs CUDA's loss scaler."""
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float16 if training else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name} is not one of auto, {', '.join(DTYPES)}")
    if training and name == "float16" and device.type != "cuda":
        raise DeviceError("--dtype=float16 needs CUDA (loss scaling); use float32 on this device")
    return DTYPES[name]


# ----------------------------------------------------------------------------- peak FLOP/s


def measure_cpu_peak_flops(seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s of this CPU with the threads torch uses: MFU's reference on CPU.
    Its own generator: drawing from the global one would shift every later random number (dropout
    masks), and a resumed run must draw exactly what the uninterrupted one drew."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start)


def device_peak_flops(device: torch.device, override: Optional[float] = None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): --peak_flops, the GPU table, or a CPU measurement."""
    if override:
        return override, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} bf16 datasheet"
        return float("nan"), f"{name} is not in the peak table; pass --peak_flops for MFU"
    if device.type == "cpu":
        return measure_cpu_peak_flops(), "measured fp32 matmul"
    return float("nan"), "unknown device; pass --peak_flops for MFU"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: the CUDA allocator's peak, or the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- memory plan

GIB = 2**30


@dataclass
class MemoryPlan:
    """Per-rank training memory by what holds it, in bytes, computed from the config alone (no
    tensor is allocated). `parts` keeps the printing order; `why` says what each part is."""

    parts: dict[str, float]
    why: dict[str, str]
    summary: str  # e.g. "FSDP over 8 ranks, bfloat16, micro-batch 1 x 4096"

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {**{k: v / GIB for k, v in self.parts.items()}, "total": self.total / GIB}

    def format(self) -> str:
        width = max(map(len, self.parts))
        lines = [f"memory per rank ({self.summary}):"]
        lines += [f"  {name:<{width}}  {size / GIB:8.2f} GiB  {self.why[name]}" for name, size in self.parts.items()]
        lines.append(f"  {'total':<{width}}  {self.total / GIB:8.2f} GiB")
        return "\n".join(lines)


def activation_bytes_per_token(cfg: ModelConfig, compute_bytes: int, residual_bytes: int) -> float:
    """What backward keeps per token for one block: counted from the tensors autograd saves
    (tests/test_hardware.py checks the count against autograd's saved tensors). Under autocast a
    norm's output is kept as one low-precision copy per projection that reads it (autocast casts
    activations per use). Attention keeps q, k, v after RoPE, its output and a logsumexp per
    head; SwiGLU keeps four ffn-wide tensors."""
    d, kv, f, a, r = cfg.n_embd, cfg.n_kv_head * cfg.head_dim, cfg.ffn_hidden, compute_bytes, residual_bytes
    # Each norm: its input in fp32 (a copy when the residual is not fp32), 1/rms, the normalized
    # values in the residual dtype; then its output, once (no autocast) or as 3 + 2 casts.
    norms = 2 * (4 * d + 4 + r * d) + (2 * r * d if a == r else 5 * a * d)
    attention = a * (2 * d + 2 * kv) + 4 * cfg.n_head
    return norms + attention + 4 * f * a


def plan_training_memory(
    cfg: ModelConfig, micro_batch: int, seq_len: int, *, world_size: int = 1, fsdp: bool = False,
    grad_checkpoint: bool = False, compute_dtype: torch.dtype = torch.bfloat16, grad_accum: int = 1,
    reshard_after_forward: bool = True, cpu_offload: bool = False, device_type: str = "cuda",
) -> MemoryPlan:
    """Per-rank memory of one training step as train.py runs it (AdamW, fp32 master weights,
    autocast or FSDP mixed precision, the chunked loss). FSDP divides weights, gradients and
    optimizer state by world_size but adds the compute-dtype copies of the blocks it gathers;
    gradient accumulation under FSDP keeps unsharded fp32 gradients between micro-steps."""
    from model import LOSS_CHUNK_VALUES

    n = count_params(cfg)["total"]
    a = torch.empty(0, dtype=compute_dtype).element_size()
    shard = world_size if fsdp else 1
    # Under autocast the residual stream stays fp32; FSDP's mixed precision computes in a.
    residual = a if fsdp else 4
    tokens = micro_batch * seq_len
    parts, why = {}, {}

    def add(name: str, size: float, reason: str) -> None:
        parts[name], why[name] = size, reason

    on_device = 0 if cpu_offload and fsdp and device_type == "cuda" else 1  # (offload moves states from a GPU to the host)
    add("parameters", on_device * 4 * n / shard, "fp32 master weights" + (f", 1/{shard} each" if fsdp else "") + (" (offloaded to CPU)" if cpu_offload else ""))
    add("gradients", on_device * 4 * n / shard, "fp32" + (", reduce-scattered to shards" if fsdp else ", inside DDP's buckets" if world_size > 1 else ""))
    add("optimizer", on_device * 8 * n / shard, "AdamW's two fp32 moments")
    if fsdp:
        per_block = count_params(cfg)["per_layer"] * a
        root = cfg.vocab_size * cfg.n_embd * a * (1 if cfg.tie_embeddings else 2)
        gathered = n * a if not reshard_after_forward else root + 2 * per_block
        add("gathered weights", gathered, "compute-dtype copies FSDP all-gathers: " + ("every block, kept from forward to backward" if not reshard_after_forward else "the embedding group and two blocks in flight"))
        if grad_accum > 1:
            add("no-sync gradients", 4 * n, f"unsharded fp32 gradients held across {grad_accum} micro-steps")
    if a < 4 and not fsdp:  # autocast keeps its low-precision copy of each matrix until backward
        matrices = n - (2 * cfg.n_layer + 1) * cfg.n_embd
        add("autocast weight copies", matrices * a, f"{str(compute_dtype).removeprefix('torch.')} copies of the matrices, kept for backward")
    per_token_layer = activation_bytes_per_token(cfg, a, residual)
    if grad_checkpoint:
        activations = tokens * (cfg.n_layer * cfg.n_embd * residual + per_token_layer)
        how = "each block's input, plus one block recomputed in backward"
    else:
        activations = tokens * cfg.n_layer * per_token_layer
        how = f"{per_token_layer / 1024:.1f} KiB per token and layer kept for backward"
    add("activations", activations, how)
    chunk = min(tokens, max(1, LOSS_CHUNK_VALUES // cfg.vocab_size))
    loss = tokens * cfg.n_embd * (3 * residual + residual) + cfg.vocab_size * cfg.n_embd * 4 + chunk * cfg.vocab_size * (4 + residual)
    add("loss", loss, f"final norm, dL/dh, fp32 dL/dW of lm_head and one chunk of {chunk:,} x {cfg.vocab_size:,} logits")
    add("overhead", (0.75 * GIB if device_type == "cuda" else 0.35 * GIB) + 0.1 * activations,
        ("CUDA context and kernels" if device_type == "cuda" else "the Python and PyTorch runtime") + ", plus 10% of activations for allocator slack")
    summary = f"{'FSDP over ' + str(world_size) + ' ranks' if fsdp else 'DDP over ' + str(world_size) + ' ranks' if world_size > 1 else 'one process'}, " \
              f"{str(compute_dtype).removeprefix('torch.')}, micro-batch {micro_batch} x {seq_len}, grad_checkpoint={grad_checkpoint}"
    return MemoryPlan(parts, why, summary)


def plan_run_memory(cfg: "TrainConfig", model_cfg: ModelConfig, world_size: int, device_type: str, compute_dtype: torch.dtype) -> MemoryPlan:
    """plan_training_memory for what train.py would run with these settings."""
    return plan_training_memory(
        model_cfg, cfg.batch_size, cfg.block_size, world_size=world_size, fsdp=cfg.parallel == "fsdp" and world_size > 1,
        grad_checkpoint=cfg.grad_checkpoint, compute_dtype=compute_dtype, grad_accum=cfg.gradient_accumulation_steps,
        reshard_after_forward=cfg.fsdp_reshard_after_forward, cpu_offload=cfg.fsdp_cpu_offload, device_type=device_type,
    )


def memory_table(cfg: ModelConfig, micro_batch: int, seq_len: int, world_size: int, grad_accum: int = 1) -> str:
    """Total per-GPU memory (bf16) for DDP and FSDP over world_size ranks, with and without
    activation checkpointing: the quick comparison --dry_run ends with."""
    lines = [f"memory per GPU (bf16, micro-batch {micro_batch} x {seq_len}, {grad_accum} micro-step(s) per step):"]
    for label, fsdp in (("DDP", False), (f"FSDP x{world_size}", True)):
        for ckpt in (False, True):
            plan = plan_training_memory(cfg, micro_batch, seq_len, world_size=world_size, fsdp=fsdp, grad_checkpoint=ckpt, grad_accum=grad_accum)
            lines.append(f"  {label:<8} grad_checkpoint={str(ckpt):<5}: {plan.total / GIB:6.1f} GiB")
    return "\n".join(lines)


def available_memory_bytes(device: torch.device, local_ranks: int = 1) -> tuple[float, str]:
    """Memory one rank may use on device: the GPU's total, or the host's available memory
    shared by the ranks on this machine."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), f"{props.name} has {props.total_memory / GIB:.1f} GiB"
    if device.type == "mps":
        return float(torch.mps.recommended_max_memory()), "MPS's recommended maximum"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf"), "unknown (no /proc/meminfo)"
    return available / local_ranks, f"this machine has {available / GIB:.1f} GiB available" + (f", shared by {local_ranks} ranks" if local_ranks > 1 else "")
