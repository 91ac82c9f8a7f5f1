"""What this machine is and what fits on it: device and dtype choice, CPU threads, peak FLOP/s
for MFU, memory readings, the training memory plan (--dry_run prints it, check_memory_fits
refuses a run that would not fit), how a compiled decode step suits the device, and how a
process group ends without aborting the process (end_distributed).

train.py, sample.py and tools/bench.py resolve --device/--dtype here, so "auto" means the same thing
everywhere; where training and inference really differ (fp16 needs a loss scaler, so only
training falls back to it on GPUs without bf16), that is the explicit `training` argument.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
import time
import traceback
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from configurator import ConfigError, TrainConfig, parse_args
from dataset import DatasetError, load_meta
from model import ModelConfig, count_params, describe, flash_attention_runs, flops_per_token
from system import usable_cpus

if TYPE_CHECKING:
    from model import Transformer

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
    """A --device/--dtype, or a run's memory, this machine cannot honour; the message says what
    to use instead."""


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


def choose_dtype(name: str, device: torch.device, training: bool = False, fsdp: bool = False) -> tuple[torch.dtype, str]:
    """(dtype, why) for --dtype. auto: bf16 on CUDA GPUs that compute it natively (compute
    capability 8.0 and up, see cuda_bf16_is_native), otherwise fp16 for training (with a loss
    scaler; under FSDP, which has no sharded loss scaler here, fp32) but fp32 for inference (a
    model trained in bf16 can overflow fp16's range). On CPU, bf16 (autocast for training,
    weights for inference) only where a start-up probe finds bf16 matmuls clearly faster than
    fp32 (AMX or AVX512-BF16; on AVX2-only CPUs they are many times slower), fp32 otherwise.
    fp16 training needs CUDA's loss scaler."""
    if name == "auto":
        if device.type == "cuda":
            native, capability = cuda_bf16_is_native(device)
            if native:
                return torch.bfloat16, f"auto: this GPU ({capability}) computes bf16 natively"
            if training and not fsdp:
                return torch.float16, f"auto: this GPU ({capability}) has no native bf16; fp16 with a loss scaler"
            return torch.float32, f"auto: this GPU ({capability}) has no native bf16" + ("; FSDP has no fp16 loss scaler" if training else "")
        if device.type == "cpu":
            bf16, why = cpu_prefers_bf16()
            return (torch.bfloat16 if bf16 else torch.float32), f"auto: {why}"
        return torch.float32, f"auto: float32 on {device.type}"
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name} is not one of auto, {', '.join(DTYPES)}")
    if training and name == "float16" and device.type != "cuda":
        raise DeviceError("--dtype=float16 needs CUDA (loss scaling); use float32 on this device")
    if training and name == "float16" and fsdp:
        raise DeviceError("FSDP here trains in float32 or bfloat16 (fp16 would need a sharded loss scaler); use --dtype=float32, "
                          "or bfloat16 on GPUs of compute capability 8.0 and up")
    if name == "bfloat16" and device.type == "cuda" and not cuda_bf16_is_native(device)[0]:
        return torch.bfloat16, f"--dtype bfloat16, emulated on this GPU ({cuda_bf16_is_native(device)[1]}): many times slower than float16/float32"
    if name == "bfloat16" and device.type == "cpu" and training and not cpu_prefers_bf16()[0]:
        return torch.bfloat16, f"--dtype bfloat16, on a CPU where auto would choose {cpu_prefers_bf16()[1]}"
    return DTYPES[name], f"--dtype {name}"


def cuda_bf16_is_native(device: torch.device) -> tuple[bool, str]:
    """(does this GPU compute bf16 in hardware?, its compute capability in words). bf16 tensor
    cores arrived with Ampere (compute capability 8.0). torch.cuda.is_bf16_supported() is no
    guide: by default it counts emulation, so it says yes on a T4 or V100 too, where bf16
    matmuls are emulated many times slower and Inductor does not compile them. ROCm's GPUs
    that PyTorch runs on all have bf16."""
    if torch.version.hip:
        return True, "ROCm"
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 0), f"compute capability {major}.{minor}"


# ----------------------------------------------------------------------------- CPU bf16 probe

BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this much: a near tie is not worth bf16's rounding
CPU_BF16_ENV = "HOMELLM_CPU_BF16"  # 1 / 0: skip the probe and use (or not) bf16 on this CPU


def cpu_bf16_matmul_speedup(rounds: int = 5, m: int = 64, k: int = 512, n: int = 512) -> float:
    """How many times faster a linear layer, (m x k) inputs times a (n x k) weight as
    nn.Linear stores it, runs in bf16 than in fp32 on one core of this CPU (the ratio per
    core carries over to any thread count, and one thread cannot be stalled by a busy second
    core). The layout matters: CPUs without bf16 units run the other layout far slower still,
    which training never does. Best of alternating rounds, so that a busy moment hits both;
    the first round is a warm-up (library start-up, oneDNN's kernel generation). Where bf16 is
    emulated the probe stops after the first timed round, since no later round could change
    the answer: a few tens of ms at most. Inputs come from torch.ones, not randn: the global
    RNG must not move (resumed training replays it)."""
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


def configure_cpu_threads(default: Optional[int] = None, respect_omp: bool = True) -> str:
    """Set torch's intra-op threads for CPU work; returns a line for the start-up log.

    HOMELLM_THREADS=N decides when set, then OMP_NUM_THREADS (torch has applied it already).
    Otherwise `default`, or half the usable CPUs (at least 1). Why not all of them: PyTorch's
    OpenMP threads meet at a barrier after every parallel op, and GNU OpenMP spins while it
    waits. When another process holds one of the cores, every op waits for the descheduled
    thread while its partner burns CPU spinning (docs/benchmarks.md measures it on a shared
    2-core machine). Decoding is memory-bound, so the threads left out cost little when the
    machine is idle."""
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise DeviceError(f"{THREADS_ENV}={forced!r} must be a positive number of threads; or unset it")
        torch.set_num_threads(int(forced))
        why = f"{THREADS_ENV}={forced}"
    elif respect_omp and os.environ.get("OMP_NUM_THREADS", "").strip():
        why = "OMP_NUM_THREADS"  # torch applied it at start-up
    elif default is not None:
        torch.set_num_threads(default)
        why = "the default"
    else:
        torch.set_num_threads(max(1, usable_cpus() // 2))
        why = f"half of {usable_cpus()} CPUs; {THREADS_ENV}=N to change"
    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({why})"


def configure_training_threads(device: torch.device, cpu_offload: bool, local_ranks: int) -> str:
    """Threads for a training run's CPU work; returns a line for the start-up log ("" when the
    CPU only feeds a GPU). Training on the CPU is compute-bound: all usable CPUs, split among
    the ranks on this host (torchrun's OMP_NUM_THREADS=1 per rank is respected there). With
    FSDP's CPU offload on a GPU, the optimizer step over this rank's whole shard runs on the
    CPU: it gets the same split, and torchrun's OMP_NUM_THREADS=1, which it sets for every
    multi-process launch, is ignored (it would leave AdamW on one core); HOMELLM_THREADS still
    decides when set."""
    if device.type != "cpu" and not cpu_offload:
        return ""
    return configure_cpu_threads(max(1, usable_cpus() // local_ranks), respect_omp=device.type == "cpu")


# ----------------------------------------------------------------------------- the CUDA allocator

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def configure_cuda_allocator() -> str:
    """Let PyTorch's CUDA allocator grow its segments in place (expandable_segments:True), as
    torchtitan does: FSDP's gather buffers and the loss's chunks come in many sizes, and with
    fixed segments the freed pieces fragment memory until a run that fits in total fails to
    find one contiguous block. The allocator reads the setting once, when CUDA first allocates,
    so this must run before that (train.py calls it first thing); a setting of the user's
    (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF) is left alone. Returns a line for the log."""
    for name in (ALLOC_CONF_ENV, "PYTORCH_ALLOC_CONF"):
        if os.environ.get(name, "").strip():
            return f"CUDA allocator: {name}={os.environ[name]} (yours)"
    if torch.cuda.is_initialized():
        return "CUDA allocator: default settings (CUDA was initialised before they could be set)"
    os.environ[ALLOC_CONF_ENV] = "expandable_segments:True"
    return f"CUDA allocator: {ALLOC_CONF_ENV}=expandable_segments:True (set yours to change it)"


# ----------------------------------------------------------------------------- compiled decode


# Inductor's decompose_mm_pass rewrites a one-row matmul on CPU only when the weight's sides
# are both at most this (torch._inductor.fx_passes.decompose_mem_bound_mm).
LOOP_MATMUL_MAX_SIDE = 2048


def compile_decode(model: "Transformer", mm_loops: Optional[bool] = None, **options) -> str:
    """model.compile_decode() with the Inductor options that suit its device; returns a line
    for the log that says how the step was compiled.

    On CPU the graph's wrapper is C++ (Inductor's cpp_wrapper): a Python wrapper costs a
    visible share of a small model's step. And a decode step multiplies one row by every
    weight, so it is bound by how fast the weights stream from memory: Inductor can do each
    one-row matmul as a multiply-and-sum loop of its own ("decompose_mm_pass", for matrices up
    to LOOP_MATMUL_MAX_SIDE on a side) instead of a BLAS gemv call, and which of the two
    streams faster depends on the CPU, the BLAS and the dtype (docs/benchmarks.md has both
    cases). mm_loops=None measures it on this model's weights (decode_matmul_choice); True or
    False decides outright. options: more Inductor options.

    On a CUDA GPU the step is captured as a CUDA graph (mode="reduce-overhead"): a small
    model's step is a few hundred short kernels, whose launches from Python would take longer
    than the kernels themselves; the graph replays them all with one launch. (The step's
    shapes are fixed and its KV cache keeps its address, which is what a graph needs.)"""
    note = "decode step compiled"
    if model.embed.weight.device.type == "cuda" and not options:
        model.compile_decode(mode="reduce-overhead")
        return note + " and captured as a CUDA graph (mode=reduce-overhead)"
    if model.embed.weight.device.type == "cpu":
        if mm_loops is None:
            mm_loops, why = decode_matmul_choice(model)
        else:
            why = f"mm_loops={mm_loops}"
        loops = {"post_grad_fusion_options": {"decompose_mm_pass": {}}} if mm_loops else {}
        options = {"cpp_wrapper": True, **loops, **options}
        note += f", one-row matmuls {'as Inductor loops' if mm_loops else 'through BLAS'} ({why})"
    model.compile_decode(options)
    return note


def decode_matmul_choice(model: torch.nn.Module, rounds: int = 3, max_mb: float = 128) -> tuple[bool, str]:
    """(one-row matmuls as Inductor loops?, why) for a compiled CPU decode step. Reads the
    model's own weights (those the loops would take, up to max_mb) two ways, with the threads
    torch uses: F.linear of one row, which is the BLAS gemv the step calls otherwise, and a row
    sum, which streams each weight the way the loop does, minus the multiply. Loops when the
    sum is at least as fast. Best of `rounds` alternating rounds after a warm-up, so that a
    busy moment hits both; about 0.1 s for home_25m."""
    weights, seen, total = [], set(), 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(w) not in seen and max(w.shape) <= LOOP_MATMUL_MAX_SIDE:
            seen.add(id(w))
            weights.append(w.detach())
            total += w.numel() * w.element_size()
            if total >= max_mb * 2**20:
                break
    if not weights:
        return False, f"no weight has both sides within {LOOP_MATMUL_MAX_SIDE}, the most Inductor's loops take"
    rows = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    reads = {"gemv": lambda w: F.linear(rows[w.shape[1]], w), "sum": lambda w: w.sum(1)}
    best = {name: float("inf") for name in reads}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for name, read in reads.items():
                start = time.perf_counter()
                for w in weights:
                    read(w)
                if round_:  # round 0 warms up
                    best[name] = min(best[name], time.perf_counter() - start)
    gemv, loop = total / best["gemv"] / 1e9, total / best["sum"] / 1e9
    return loop >= gemv, f"{str(weights[0].dtype).removeprefix('torch.')} weights streamed at {loop:.1f} GB/s in a row sum, {gemv:.1f} GB/s through BLAS gemv"


# ----------------------------------------------------------------------------- peak FLOP/s


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, trials: int = 5, seconds: float = 0.1) -> float:
    """Matmul FLOP/s of this CPU in `dtype` with the threads torch uses: MFU's reference on CPU.
    The best of several short trials, not one long one: another process taking a core for a
    moment slows some trials, and the fastest one is the closest to what the CPU can do.
    Its own generator: drawing from the global one would shift every later random number (dropout
    masks), and a resumed run must draw exactly what the uninterrupted one drew."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=gen).to(dtype)
    b = torch.randn(1024, 1024, generator=gen).to(dtype)
    # a @ b.T, as nn.Linear multiplies by its (out, in) weight: CPUs without bf16 units run
    # bf16 matmuls in the other layout many times slower still, which training never does.
    matmul = torch.nn.functional.linear
    matmul(a, b)  # warm-up: thread pool, oneDNN kernel generation
    best = 0.0
    for _ in range(trials):
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            matmul(a, b)
            n += 1
        best = max(best, 2 * 1024**3 * n / (time.perf_counter() - start))
    return best


def device_peak_flops(device: torch.device, override: Optional[float] = None, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from): --peak_flops, the GPU table (bf16 dense), or
    a measurement of this CPU's matmuls in the dtype the run computes in."""
    if override:
        return override, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} bf16 datasheet"
        return float("nan"), f"{name} is not in the peak table; pass --peak_flops for MFU"
    if device.type == "cpu":
        name = str(dtype).removeprefix("torch.")
        return measure_cpu_peak_flops(dtype), f"measured {name} matmul, best of 5"
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
    tensor is allocated). `parts` keeps the printing order; `why` says what each part is.
    host: what FSDP's CPU offload keeps in host memory instead (0 without it)."""

    parts: dict[str, float]
    why: dict[str, str]
    summary: str  # e.g. "FSDP over 8 ranks, bfloat16, micro-batch 1 x 4096"
    host: float = 0.0

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
        if self.host:
            lines.append(f"  {'host memory':<{width}}  {self.host / GIB:8.2f} GiB  the offloaded fp32 weights, gradients and AdamW moments")
        return "\n".join(lines)


def activation_bytes_per_token(cfg: ModelConfig, compute_bytes: int, residual_bytes: int, kv_expanded: bool = False) -> float:
    """What backward keeps per token for one block: counted from the tensors autograd saves
    (tests/test_hardware.py checks the count against autograd's saved tensors). Under autocast a
    norm's output is kept as one low-precision copy per projection that reads it (autocast casts
    activations per use). Attention keeps q, k, v after RoPE, its output and a logsumexp per
    head (flash and memory-efficient kernels alike; k and v at n_head width where GQA repeats
    them for the memory-efficient kernel, see model.expand_kv_for_sdpa); SwiGLU keeps four
    ffn-wide tensors."""
    d, f, a, r = cfg.n_embd, cfg.ffn_hidden, compute_bytes, residual_bytes
    kv = (cfg.n_head if kv_expanded else cfg.n_kv_head) * cfg.head_dim
    # Each norm: its input in fp32 (a copy when the residual is not fp32), 1/rms, the normalized
    # values in the residual dtype; then its output, once (no autocast) or as 3 + 2 casts.
    norms = 2 * (4 * d + 4 + r * d) + (2 * r * d if a == r else 5 * a * d)
    attention = a * (2 * d + 2 * kv) + 4 * cfg.n_head
    return norms + attention + 4 * f * a


def plan_training_memory(
    cfg: ModelConfig, micro_batch: int, seq_len: int, *, world_size: int = 1, fsdp: bool = False,
    grad_checkpoint: bool = False, compute_dtype: torch.dtype = torch.bfloat16, grad_accum: int = 1,
    reshard_after_forward: bool = True, cpu_offload: bool = False, device_type: str = "cuda",
    reduce_every_micro_step: bool = False, kv_expanded: bool = False,
) -> MemoryPlan:
    """Per-rank memory of one training step as train.py runs it (AdamW, fp32 master weights,
    autocast or FSDP mixed precision, the chunked loss). FSDP divides weights, gradients and
    optimizer state by world_size (or, with cpu_offload, moves them to host memory) but adds
    the compute-dtype copies of the blocks it gathers. Gradient accumulation under FSDP keeps
    unsharded fp32 gradients between micro-steps, unless reduce_every_micro_step reduce-scatters
    them after each one. kv_expanded: GQA attention repeats K/V (model.expand_kv_for_sdpa)."""
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

    offloaded = cpu_offload and fsdp and device_type == "cuda"  # (offload moves states from a GPU to the host)
    on_device = 0 if offloaded else 1
    add("parameters", on_device * 4 * n / shard, "fp32 master weights" + (f", 1/{shard} each" if fsdp else "") + (" (offloaded to CPU)" if offloaded else ""))
    add("gradients", on_device * 4 * n / shard, "fp32" + (", reduce-scattered to shards" if fsdp else ", inside DDP's buckets" if world_size > 1 else "")
        + (" after every micro-step" if fsdp and grad_accum > 1 and reduce_every_micro_step else ""))
    add("optimizer", on_device * 8 * n / shard, "AdamW's two fp32 moments")
    if fsdp:
        per_block = count_params(cfg)["per_layer"] * a
        root = cfg.vocab_size * cfg.n_embd * a * (1 if cfg.tie_embeddings else 2)
        gathered = n * a if not reshard_after_forward else root + 2 * per_block
        add("gathered weights", gathered, "compute-dtype copies FSDP all-gathers: " + ("every block, kept from forward to backward" if not reshard_after_forward else "the embedding group and two blocks in flight"))
        if grad_accum > 1 and not reduce_every_micro_step:
            add("no-sync gradients", 4 * n, f"unsharded fp32 gradients held across {grad_accum} micro-steps (--fsdp_reduce_every_micro_step=True drops them)")
    if a < 4 and not fsdp:  # autocast keeps its low-precision copy of each matrix until backward
        matrices = n - (2 * cfg.n_layer + 1) * cfg.n_embd
        add("autocast weight copies", matrices * a, f"{str(compute_dtype).removeprefix('torch.')} copies of the matrices, kept for backward")
    per_token_layer = activation_bytes_per_token(cfg, a, residual, kv_expanded)
    if grad_checkpoint:
        activations = tokens * (cfg.n_layer * cfg.n_embd * residual + per_token_layer)
        how = "each block's input, plus one block recomputed in backward"
    else:
        activations = tokens * cfg.n_layer * per_token_layer
        how = f"{per_token_layer / 1024:.1f} KiB per token and layer kept for backward"
    add("activations", activations, how + (" (K/V repeated for the memory-efficient kernel)" if kv_expanded else ""))
    chunk = min(tokens, max(1, LOSS_CHUNK_VALUES // cfg.vocab_size))
    loss = tokens * cfg.n_embd * (3 * residual + residual) + cfg.vocab_size * cfg.n_embd * 4 + chunk * cfg.vocab_size * (4 + residual)
    add("loss", loss, f"final norm, dL/dh, fp32 dL/dW of lm_head and one chunk of {chunk:,} x {cfg.vocab_size:,} logits")
    add("overhead", (0.75 * GIB if device_type == "cuda" else 0.35 * GIB) + 0.1 * activations,
        ("CUDA context and kernels" if device_type == "cuda" else "the Python and PyTorch runtime") + ", plus 10% of activations for allocator slack")
    summary = f"{'FSDP over ' + str(world_size) + ' rank' + 's' * (world_size > 1) if fsdp else 'DDP over ' + str(world_size) + ' ranks' if world_size > 1 else 'one process'}, " \
              f"{str(compute_dtype).removeprefix('torch.')}, micro-batch {micro_batch} x {seq_len}, grad_checkpoint={grad_checkpoint}"
    return MemoryPlan(parts, why, summary, host=16 * n / shard if offloaded else 0.0)


def uses_fsdp(cfg: TrainConfig, world_size: int) -> bool:
    """Whether train.py shards with FSDP: --parallel=fsdp over several ranks, or in one process
    when --fsdp_cpu_offload asks for it (that is how a model too big for one GPU trains there)."""
    return cfg.parallel == "fsdp" and (world_size > 1 or cfg.fsdp_cpu_offload)


def gqa_expands_kv(cfg: ModelConfig, device_type: str, compute_dtype: torch.dtype, capability: Optional[tuple[int, int]] = None) -> bool:
    """Whether training attention repeats K/V on this device (model.expand_kv_for_sdpa);
    capability None: a GPU of compute capability 8.0 or newer."""
    return (cfg.n_kv_head != cfg.n_head and device_type == "cuda"
            and not flash_attention_runs(compute_dtype, capability or (8, 0), cfg.head_dim, training=True))


def plan_run_memory(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, device_type: str, compute_dtype: torch.dtype,
                    capability: Optional[tuple[int, int]] = None) -> MemoryPlan:
    """plan_training_memory for what train.py would run with these settings (on a GPU of this
    compute capability; None: 8.0 or newer)."""
    return plan_training_memory(
        model_cfg, cfg.batch_size, cfg.block_size, world_size=world_size, fsdp=uses_fsdp(cfg, world_size),
        grad_checkpoint=cfg.grad_checkpoint, compute_dtype=compute_dtype, grad_accum=cfg.gradient_accumulation_steps,
        reshard_after_forward=cfg.fsdp_reshard_after_forward, cpu_offload=cfg.fsdp_cpu_offload, device_type=device_type,
        reduce_every_micro_step=bool(cfg.fsdp_reduce_every_micro_step), kv_expanded=gqa_expands_kv(model_cfg, device_type, compute_dtype, capability),
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
    """Memory one rank may use on device: what the GPU has free now (a desktop GPU that drives a
    display has 0.5-1.5 GB less than its total, other processes may hold more), counting this
    process's own cached blocks as free; or the host's available memory shared by the ranks on
    this machine."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device)
        name = torch.cuda.get_device_name(device)
        return float(free), f"{name} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
    if device.type == "mps":
        return float(torch.mps.recommended_max_memory()), "MPS's recommended maximum"
    return host_available_bytes(local_ranks)


def host_available_bytes(local_ranks: int = 1) -> tuple[float, str]:
    """The host's available memory (MemAvailable), shared by the ranks on this machine."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf"), "unknown (no /proc/meminfo)"
    return available / local_ranks, f"this machine has {available / GIB:.1f} GiB available" + (f", shared by {local_ranks} ranks" if local_ranks > 1 else "")


# ----------------------------------------------------------------------------- a run's plan, before it starts


def dry_run(cfg: TrainConfig) -> None:
    """Print what the config builds, what each rank needs and roughly how long a step takes,
    without allocating anything. Under torchrun the plan is for that many ranks."""
    if int(os.environ.get("RANK", 0)):
        return
    data_dir = cfg.data_sources()[0][0]  # a mixture's datasets share one tokenizer
    try:
        vocab_size, source = load_meta(data_dir)["vocab_size"], f"the tokenizer of {data_dir}"
    except DatasetError:
        vocab_size, source = 32000, f"a default: no dataset at {data_dir}"
    model_cfg = cfg.model_config(vocab_size)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = cfg.device.split(":")[0] if cfg.device != "auto" else "cuda"
    # On this machine's GPU when it has one; otherwise the plan is for one of compute capability
    # 8.0 or newer (bf16, flash attention).
    capability = torch.cuda.get_device_capability() if device_type == "cuda" and torch.cuda.is_available() else None
    if device_type == "cuda":  # what choose_dtype picks for auto
        auto = torch.bfloat16 if (capability or (8, 0)) >= (8, 0) else torch.float32 if uses_fsdp(cfg, world_size) else torch.float16
    else:
        auto = torch.bfloat16 if device_type == "cpu" and cpu_prefers_bf16()[0] else torch.float32
    dtype = DTYPES.get(cfg.dtype, auto)
    print(f"vocab_size: {model_cfg.vocab_size} ({'set in the config' if cfg.vocab_size else source})")
    print(describe(model_cfg, cfg.block_size))
    print(plan_run_memory(cfg, model_cfg, world_size, device_type, dtype, capability).format())
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size * cfg.block_size
    flops = flops_per_token(model_cfg, cfg.block_size) * tokens_per_step / world_size
    times = ", ".join(f"{gpu} {flops / (GPU_PEAK_FLOPS[gpu] * 0.4):.2f} s" for gpu in ("H100 SXM", "A100", "L40S", "RTX 4090", "L4"))
    print(f"tokens per step: {tokens_per_step:,}; step time at an assumed 40% MFU: {times}")
    print(memory_table(model_cfg, cfg.batch_size, cfg.block_size, max(world_size, 8), cfg.gradient_accumulation_steps))


def fit_to_memory(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, device: torch.device, dtype: torch.dtype) -> tuple[TrainConfig, str]:
    """The config to run, checked against the memory there is (check_memory_fits), with
    fsdp_reduce_every_micro_step=None decided: True only for an FSDP run with gradient
    accumulation whose plan does not fit otherwise (reduce-scattering after every micro-step
    sends the gradients grad_accum times per step instead of once). Returns (config, a line
    for the log that says so, or "")."""
    note = ""
    if cfg.fsdp_reduce_every_micro_step is None:
        once = replace(cfg, fsdp_reduce_every_micro_step=False)
        needed = uses_fsdp(cfg, world_size) and cfg.gradient_accumulation_steps > 1 and not memory_fits(once, model_cfg, world_size, device, dtype)[0]
        cfg = replace(cfg, fsdp_reduce_every_micro_step=needed)
        if needed:
            note = ("FSDP reduce-scatters the gradients after every micro-step (auto: holding the whole model's fp32 gradients "
                    "across micro-steps would not fit; --fsdp_reduce_every_micro_step=False insists)")
    check_memory_fits(cfg, model_cfg, world_size, device, dtype)
    return cfg, note


def memory_fits(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, device: torch.device, dtype: torch.dtype) -> tuple[bool, MemoryPlan, str]:
    """(does the run fit?, its plan, what the device and, under CPU offload, the host have):
    the plan against the device's free memory, and the offloaded states against the host's."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    plan = plan_run_memory(cfg, model_cfg, world_size, device.type, dtype, capability)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    available, what = available_memory_bytes(device, local_ranks)
    fits = plan.total <= available
    if plan.host:
        host, host_what = host_available_bytes(local_ranks)
        fits = fits and plan.host <= host
        what += f" and {host_what} for the {plan.host / GIB:.1f} GiB offloaded per rank"
    return fits, plan, what


def check_memory_fits(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before allocating anything, a run whose planned memory exceeds what the device
    has free (or, under CPU offload, what the host has): an out-of-memory kill minutes later
    (or a swapping machine) is worse than a message now. The message names settings that
    would fit."""
    fits, plan, what = memory_fits(cfg, model_cfg, world_size, device, dtype)
    if fits:
        return
    options = []
    smaller = max(1, cfg.batch_size // 4)
    for flag, change in (("--grad_checkpoint=True", {"grad_checkpoint": True}), (f"--batch_size={smaller}", {"batch_size": smaller}),
                         ("--fsdp_reduce_every_micro_step=True", {"fsdp_reduce_every_micro_step": True}),
                         ("--parallel=fsdp", {"parallel": "fsdp"}), ("--parallel=fsdp --fsdp_cpu_offload=True", {"parallel": "fsdp", "fsdp_cpu_offload": True})):
        other = replace(cfg, **change)
        if other != cfg and memory_fits(other, model_cfg, world_size, device, dtype)[0]:
            options.append(flag)
    if not options:  # which presets would, on this machine and data
        presets_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
        for name in sorted(os.listdir(presets_dir)) if os.path.isdir(presets_dir) else []:
            try:
                preset = parse_args(TrainConfig, [os.path.join(presets_dir, name)])
                preset_model = preset.model_config(model_cfg.vocab_size)
            except (ConfigError, ValueError):
                continue
            if memory_fits(preset, preset_model, world_size, device, dtype)[0]:
                options.append(f"config/{name}")
    biggest = max(plan.parts, key=plan.parts.get)
    hint = f"these would fit: {', '.join(options)}" if options else "use more GPUs with --parallel=fsdp (see --dry_run)"
    raise DeviceError(f"this run needs about {plan.total / 2**30:.1f} GiB per rank (the most for {biggest}: {plan.parts[biggest] / 2**30:.1f} GiB) "
                      f"but {what}; {hint}")


def end_distributed(error: Optional[BaseException]) -> None:
    """Destroy the process groups and join gloo's threads while Python still runs. A gloo thread
    lets go of a collective just after wait() returns; when Python is already exiting by then,
    freeing the collective's tensors cannot take the GIL and the rank aborts ("terminate called
    without an active exception", exit -6, after a run that went well). So the last references
    go here: the tracebacks' (which hold the model), the wrappers' (DDP/FSDP, in cycles), then
    the group's own, whose destructor joins the threads with the GIL released."""
    import torch.distributed as dist

    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__
    if dist.is_initialized():
        world = dist.group.WORLD  # kept until the wrappers' references are gone, so that its own is the last
        dist.destroy_process_group(world)
        gc.collect()
        del world
