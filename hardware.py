"""What this machine is and what fits on it: device and dtype choice, peak FLOP/s for MFU,
memory readings, and the training memory estimate.

train.py, sample.py and bench.py resolve --device/--dtype here, so "auto" means the same thing
everywhere; where training and inference really differ (fp16 needs a loss scaler, so only
training falls back to it on GPUs without bf16), that is the explicit `training` argument.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from typing import Optional

import torch

from model import ModelConfig, count_params

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


def resolve_dtype(name: str, device: torch.device, training: bool = False) -> torch.dtype:
    """--dtype as a torch dtype; see choose_dtype for what auto means."""
    return choose_dtype(name, device, training)[0]


def choose_dtype(name: str, device: torch.device, training: bool = False) -> tuple[torch.dtype, str]:
    """(dtype, why) for --dtype. auto: bf16 on CUDA GPUs that support it, otherwise fp16 for
    training (with a loss scaler) but fp32 for inference. On CPU, inference uses bf16 weights
    only where a start-up probe finds bf16 matmuls clearly faster than fp32 (AMX or AVX512-BF16;
    on AVX2-only CPUs they are many times slower), training stays fp32. fp16 training needs
    CUDA's loss scaler."""
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "auto: this GPU supports bf16"
            if training:
                return torch.float16, "auto: this GPU lacks bf16; fp16 with a loss scaler"
            return torch.float32, "auto: this GPU lacks bf16"
        if device.type == "cpu" and not training:
            bf16, why = cpu_prefers_bf16()
            return (torch.bfloat16 if bf16 else torch.float32), f"auto: {why}"
        return torch.float32, f"auto: float32 on {device.type}"
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name} is not one of auto, {', '.join(DTYPES)}")
    if training and name == "float16" and device.type != "cuda":
        raise DeviceError("--dtype=float16 needs CUDA (loss scaling); use float32 on this device")
    return DTYPES[name], f"--dtype {name}"


# ----------------------------------------------------------------------------- CPU bf16 probe

BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this much: a near tie is not worth bf16's rounding
CPU_BF16_ENV = "HOMELLM_CPU_BF16"  # 1 / 0: skip the probe and use (or not) bf16 on this CPU


def cpu_bf16_matmul_speedup(rounds: int = 5, m: int = 64, k: int = 512, n: int = 512) -> float:
    """How many times faster a linear layer, (m x k) inputs times a (n x k) weight as
    nn.Linear stores it, runs in bf16 than in fp32 on one core of this CPU (the ratio per
    core carries over to any thread count, and one thread cannot be stalled by a busy second
    core). The layout matters: with a (k x n) weight, bf16 on an AVX2 CPU is another 8x
    slower. Best of alternating rounds, so that a busy moment hits both; the first round is
    a warm-up (library start-up, oneDNN's kernel generation). Takes ~5 ms where bf16 is
    native, ~20 ms where it is emulated (AVX2: ~8x slower), because then the probe stops
    after the first timed round: no later round could change the answer. Inputs come from
    torch.ones, not randn: the global RNG must not move (resumed training replays it)."""
    x32, w32 = torch.ones(m, k), torch.ones(n, k)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(rounds + 1):
            for x, w in ((x32, w32), (x16, w16)):
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                if round_:
                    best[x.dtype] = min(best[x.dtype], time.perf_counter() - start)
            if round_ and best[torch.bfloat16] > 3 * best[torch.float32]:
                break
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


@functools.lru_cache(maxsize=None)
def cpu_prefers_bf16() -> tuple[bool, str]:
    """(use bf16 on this CPU?, the reason, for the start-up log). Probed once per process;
    the HOMELLM_CPU_BF16 environment variable (1 or 0) decides instead when it is set."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{'bfloat16' if forced == '1' else 'float32'} because {CPU_BF16_ENV}={forced}"
    if forced:
        raise DeviceError(f"{CPU_BF16_ENV}={forced!r} must be 1 (use bf16 on this CPU) or 0 (use fp32); or unset it to probe")
    speedup = cpu_bf16_matmul_speedup()
    capability = torch.backends.cpu.get_cpu_capability()
    if speedup >= BF16_MIN_SPEEDUP:
        return True, f"bfloat16: its matmuls ran {speedup:.2g}x as fast as fp32 on this CPU ({capability})"
    return False, (f"float32: bf16 matmuls ran at {speedup:.2g}x the fp32 speed on this CPU ({capability}), "
                   f"not the {BF16_MIN_SPEEDUP}x that would pay; {CPU_BF16_ENV}=1 or --dtype bfloat16 forces bf16")


# ----------------------------------------------------------------------------- CPU threads

THREADS_ENV = "HOMELLM_THREADS"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and container limits
    except AttributeError:
        return os.cpu_count() or 1


def configure_cpu_threads(default: Optional[int] = None) -> str:
    """Set torch's intra-op threads for CPU work; returns a line for the start-up log.

    HOMELLM_THREADS=N decides when set, then OMP_NUM_THREADS (torch has applied it already).
    Otherwise `default`, or half the usable CPUs (at least 1). Why not all of them: PyTorch's
    OpenMP threads meet at a barrier after every parallel op, and GNU OpenMP spins while it
    waits. When another process holds one of the cores, every op waits for the descheduled
    thread while its partner burns CPU spinning: on a shared 2-core machine one-token decoding
    with 2 threads ran 3-5x slower than with 1, using 4x the CPU time (docs/benchmarks.md).
    Decoding is memory-bound, so the threads left out cost little when the machine is idle."""
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise DeviceError(f"{THREADS_ENV}={forced!r} must be a positive number of threads; or unset it")
        torch.set_num_threads(int(forced))
        why = f"{THREADS_ENV}={forced}"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        why = "OMP_NUM_THREADS"  # torch applied it at start-up
    elif default is not None:
        torch.set_num_threads(default)
        why = "the default"
    else:
        torch.set_num_threads(max(1, usable_cpus() // 2))
        why = f"half of {usable_cpus()} CPUs; {THREADS_ENV}=N to change"
    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({why})"


# ----------------------------------------------------------------------------- peak FLOP/s


def measure_cpu_peak_flops(seconds: float = 0.5) -> float:
    """fp32 matmul FLOP/s of this CPU with the threads torch uses: MFU's reference on CPU."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
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


# ----------------------------------------------------------------------------- memory estimate


def estimate_train_memory_gb(
    cfg: ModelConfig, micro_batch: int, seq_len: int, world_size: int = 1, fsdp: bool = False,
    grad_checkpoint: bool = False, compute_bytes: int = 2,
) -> dict[str, float]:
    """Rough per-GPU training memory in GiB (arithmetic, not a measurement).

    states: fp32 weights + grads + AdamW's two moments = 16 bytes/parameter, divided by
    world_size under FSDP. activations: what backward keeps per token and layer in the
    compute dtype: ~7*n_embd + 2*kv_dim + 4*ffn_hidden values (norm outputs, q/k/v, attention
    output, residuals, the four SwiGLU tensors); with checkpointing only each block's input
    plus one block being recomputed. logits: the (tokens x vocab) logits in the compute dtype
    plus their fp32 copy and gradient for the loss. Allocator slack and buffers come on top.
    """
    n = count_params(cfg)["total"]
    states = 16 * n / (world_size if fsdp else 1)
    kv_dim = cfg.n_kv_head * cfg.head_dim
    per_layer = (7 * cfg.n_embd + 2 * kv_dim + 4 * cfg.ffn_hidden) * compute_bytes
    tokens = micro_batch * seq_len
    if grad_checkpoint:
        activations = tokens * (cfg.n_layer * cfg.n_embd * compute_bytes + per_layer)
    else:
        activations = tokens * cfg.n_layer * per_layer
    logits = tokens * cfg.vocab_size * (compute_bytes + 8)
    gib = 2**30
    out = {"states": states / gib, "activations": activations / gib, "logits": logits / gib}
    out["total"] = sum(out.values())
    return out


def memory_table(cfg: ModelConfig, micro_batch: int, seq_len: int, world_size: int) -> str:
    lines = [f"memory per GPU (rough estimate, bf16, micro-batch {micro_batch} x {seq_len} tokens):"]
    for label, fsdp in (("DDP", False), (f"FSDP x{world_size}", True)):
        for ckpt in (False, True):
            m = estimate_train_memory_gb(cfg, micro_batch, seq_len, world_size, fsdp, ckpt)
            lines.append(
                f"  {label:<8} grad_checkpoint={str(ckpt):<5}: {m['total']:6.1f} GiB "
                f"(states {m['states']:.1f} + activations {m['activations']:.1f} + logits {m['logits']:.1f})"
            )
    return "\n".join(lines)
