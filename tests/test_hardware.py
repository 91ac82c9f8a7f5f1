"""hardware.py: device and dtype resolution (the CPU bf16 probe behind --dtype auto, its
overrides, the CPU thread default), and the memory plan checked against what autograd really
keeps and what a real training step really uses."""

import math
import re
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import hardware
from hardware import DeviceError, choose_dtype, configure_cpu_threads, cpu_bf16_matmul_speedup, cpu_prefers_bf16
from model import ModelConfig, Transformer, count_params

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Every test sees an unprobed process, no override in the environment, and gets torch's
    thread count back afterwards."""
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    cpu_prefers_bf16.cache_clear()
    yield
    cpu_prefers_bf16.cache_clear()
    torch.set_num_threads(threads)


def test_the_probe_leaves_the_global_rng_and_the_threads_as_they_were():
    torch.set_num_threads(2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    speedup = cpu_bf16_matmul_speedup(rounds=2)
    assert torch.equal(torch.get_rng_state(), before)  # resumed training replays this RNG exactly
    assert torch.get_num_threads() == 2  # it times on one thread, then restores the count
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.parametrize("speedup, dtype", [(4.0, torch.bfloat16), (1.2, torch.float32), (0.01, torch.float32)])
def test_auto_on_cpu_follows_the_probe_for_training_and_inference(monkeypatch, speedup, dtype):
    calls = []
    monkeypatch.setattr(hardware, "cpu_bf16_matmul_speedup", lambda: calls.append(1) or speedup)
    chosen, why = choose_dtype("auto", CPU)
    assert chosen == dtype and f"{speedup:.2g}x" in why
    assert choose_dtype("auto", CPU) == (chosen, why) and len(calls) == 1  # probed once per process
    assert choose_dtype("auto", CPU, training=True) == (chosen, why)  # bf16 autocast where it pays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_peak_is_measured_in_the_dtype_used_and_leaves_the_rng_alone(dtype):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    peak, source = hardware.device_peak_flops(CPU, dtype=dtype)
    assert torch.equal(torch.get_rng_state(), before)
    assert 1e8 < peak < 1e14 and source == f"measured {str(dtype).removeprefix('torch.')} matmul, best of 5"
    assert hardware.device_peak_flops(CPU, override=5e12) == (5e12, "--peak_flops")


def test_the_probe_decision_can_be_overridden(monkeypatch):
    def no_probe():
        raise AssertionError("the probe ran although the choice was made for it")

    monkeypatch.setattr(hardware, "cpu_bf16_matmul_speedup", no_probe)
    assert choose_dtype("float32", CPU) == (torch.float32, "--dtype float32")  # the flag wins
    assert hardware.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")
    assert choose_dtype("auto", CPU) == (torch.bfloat16, f"auto: bfloat16 because {hardware.CPU_BF16_ENV}=1")
    cpu_prefers_bf16.cache_clear()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    assert choose_dtype("auto", CPU)[0] == torch.float32
    cpu_prefers_bf16.cache_clear()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "yes")
    with pytest.raises(DeviceError, match=f"{hardware.CPU_BF16_ENV}='yes' must be 1"):
        choose_dtype("auto", CPU)


def test_thread_default_and_its_overrides(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    assert configure_cpu_threads() == "4 CPU threads (half of 8 CPUs; HOMELLM_THREADS=N to change)"
    assert torch.get_num_threads() == 4
    assert configure_cpu_threads(default=3).startswith("3 CPU threads") and torch.get_num_threads() == 3
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 1)
    assert configure_cpu_threads().startswith("1 CPU thread (") and torch.get_num_threads() == 1
    monkeypatch.setenv(hardware.THREADS_ENV, "2")
    assert configure_cpu_threads(default=1) == f"2 CPU threads ({hardware.THREADS_ENV}=2)"
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(hardware.THREADS_ENV, "0")
    with pytest.raises(DeviceError, match="must be a positive number of threads"):
        configure_cpu_threads()
    monkeypatch.delenv(hardware.THREADS_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch applied it at start-up; that count is kept
    torch.set_num_threads(3)
    assert configure_cpu_threads(default=1) == "3 CPU threads (OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 3



def saved_activation_bytes(block, x, cos, sin, autocast) -> int:
    """Bytes autograd keeps for backward over one block's forward, each storage once, the
    block's weights (and autocast's low-precision copies of them) and RoPE tables left out:
    those are not activations (the plan counts autocast's weight copies separately)."""
    not_activations = {p.untyped_storage().data_ptr() for p in block.parameters()} | {cos.untyped_storage().data_ptr()}
    weight_shapes = {tuple(p.shape) for p in block.parameters()} | {tuple(p.shape[::-1]) for p in block.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in not_activations and tuple(t.shape) not in weight_shapes:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sum(kept.values())


@pytest.mark.parametrize("mode", ["float32", "bfloat16 autocast", "bfloat16 weights (FSDP)", "float32, K/V repeated"])
@pytest.mark.parametrize("shape", [dict(n_embd=256, n_head=4, n_kv_head=2), dict(n_embd=384, n_head=6, n_kv_head=6, ffn_hidden=1000)])
def test_activation_count_matches_what_autograd_keeps(mode, shape, monkeypatch):
    import model as model_module

    expanded = mode.endswith("K/V repeated")  # what attention does on a GPU where flash cannot run
    monkeypatch.setattr(model_module, "expand_kv_for_sdpa", lambda *args: expanded)
    cfg = ModelConfig(vocab_size=100, n_layer=1, max_seq_len=64, **shape)
    model = Transformer(cfg)
    B, T = 3, 64
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    if mode == "bfloat16 weights (FSDP)":  # FSDP's mixed precision: bf16 weights and activations, no autocast
        model = model.to(torch.bfloat16)
        x = torch.randn(B, T, cfg.n_embd, dtype=torch.bfloat16, requires_grad=True)
        a, r, autocast = 2, 2, torch.autocast("cpu", enabled=False)
    else:
        x = torch.randn(B, T, cfg.n_embd, requires_grad=True)
        a, r = (2, 4) if mode == "bfloat16 autocast" else (4, 4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16 autocast")
    measured = saved_activation_bytes(model.layers[0], x, cos, sin, autocast) / (B * T)
    assert hardware.activation_bytes_per_token(cfg, a, r, kv_expanded=expanded) == pytest.approx(measured, rel=0.02)


def test_plan_adds_up_and_shards_the_states_under_fsdp():
    cfg = ModelConfig(vocab_size=32000, n_layer=8, n_head=8, n_embd=512, max_seq_len=1024)
    n = count_params(cfg)["total"]
    ddp = hardware.plan_training_memory(cfg, 8, 1024, world_size=4)
    fsdp = hardware.plan_training_memory(cfg, 8, 1024, world_size=4, fsdp=True, grad_accum=4)
    assert ddp.parts["parameters"] == 4 * n and ddp.parts["optimizer"] == 8 * n
    assert fsdp.parts["parameters"] == 4 * n / 4 and fsdp.parts["optimizer"] == 8 * n / 4
    assert fsdp.parts["no-sync gradients"] == 4 * n  # accumulation keeps unsharded fp32 gradients
    assert ddp.total == pytest.approx(sum(ddp.parts.values())) and ddp.gib()["total"] == pytest.approx(ddp.total / 2**30)
    ckpt = hardware.plan_training_memory(cfg, 8, 1024, world_size=4, grad_checkpoint=True)
    assert ckpt.parts["activations"] < ddp.parts["activations"] / 4
    text = ddp.format()
    assert "parameters" in text and "activations" in text and "total" in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and Linux ru_maxrss units")
def test_a_training_step_uses_about_what_the_plan_says():
    # One process, fp32, on the CPU: peak RSS growth over a real step against the plan (minus
    # the runtime baseline that is already counted in RSS before the model exists).
    # glibc's malloc raises its mmap threshold after large frees and then serves big tensors from
    # a heap that fragments, so RSS creeps above what the step needs (README: Troubleshooting);
    # a fixed threshold makes RSS measure the step itself.
    import os
    import subprocess
    import sys

    script = (
        "import resource, torch, sys\n"
        "from model import ModelConfig, Transformer, make_optimizer\n"
        "torch.set_num_threads(1)\n"
        "def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "def now(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
        "cfg = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, max_seq_len=256)\n"
        "x = torch.randint(0, 8192, (8, 257)); torch.zeros(1).sum()\n"
        "base = now()  # what is resident now, not the peak so far (imports can peak higher)\n"
        "m = Transformer(cfg); [opt] = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95))\n"
        "for _ in range(2):\n"
        "    m(x[:, :-1], x[:, 1:]).backward(); opt.step(); opt.zero_grad(set_to_none=True)\n"
        "print(rss() - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    cfg = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, max_seq_len=256)
    plan = hardware.plan_training_memory(cfg, 8, 256, compute_dtype=torch.float32, device_type="cpu")
    expected = plan.total - plan.parts["overhead"]  # the runtime was already in RSS at the baseline
    assert measured == pytest.approx(expected, rel=0.15), (measured / 2**20, {k: v / 2**20 for k, v in plan.parts.items()})


def test_the_decode_matmul_choice_follows_the_faster_read(monkeypatch):
    """hardware.compile_decode's default measures gemv against a streaming row sum on the model's own
    weights; faked clocks make each side win in turn, and the reason names both rates."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32)).eval()
    rng_state = torch.get_rng_state()
    for slow, loops in (("sum", False), ("linear", True)):
        clock = {"t": 0.0}
        real_linear, real_sum = F.linear, torch.Tensor.sum

        def timed(real, name):
            def run(*args, **kwargs):
                clock["t"] += 2e-6 if name == slow else 1e-6  # seconds per matrix
                return real(*args, **kwargs)
            return run

        monkeypatch.setattr(hardware.time, "perf_counter", lambda: clock["t"])
        monkeypatch.setattr(hardware.F, "linear", timed(real_linear, "linear"))
        monkeypatch.setattr(torch.Tensor, "sum", timed(real_sum, "sum"))
        chose, why = hardware.decode_matmul_choice(m)
        monkeypatch.undo()
        assert chose is loops
        rates = re.fullmatch(r"float32 weights streamed at ([\d.]+) GB/s in a row sum, ([\d.]+) GB/s through BLAS gemv", why)
        assert rates and (float(rates[1]) > float(rates[2])) is loops
    assert torch.equal(torch.get_rng_state(), rng_state)  # ones, not random rows: resumed runs replay the RNG
    monkeypatch.setattr(hardware, "LOOP_MATMUL_MAX_SIDE", 16)  # every matrix here has a side of 32
    assert hardware.decode_matmul_choice(m) == (False, "no weight has both sides within 16, the most Inductor's loops take")


# ----------------------------------------------------------------------------- the GPU path, decided on the CPU
# These run the CUDA branches with torch.cuda's queries patched: what they decide is pure
# logic, and no test may need a GPU.

CUDA = torch.device("cuda", 0)


def fake_gpu(monkeypatch, capability=(8, 0), free_gib=20.0, total_gib=24.0, reserved_gib=0.0, name="NVIDIA Fake"):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), int(total_gib * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved_gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability, training, fsdp, dtype", [
    ((7, 5), True, False, torch.float16),   # T4, RTX 20xx: emulated bf16; fp16 with the loss scaler
    ((7, 0), False, False, torch.float32),  # V100 sampling: no loss scaler there, and bf16 weights could overflow fp16
    ((7, 5), True, True, torch.float32),    # FSDP has no sharded loss scaler
    ((8, 0), True, False, torch.bfloat16),  # A100
    ((8, 6), False, False, torch.bfloat16),  # RTX 30xx
    ((9, 0), True, True, torch.bfloat16),   # H100
])
def test_auto_dtype_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, training, fsdp, dtype):
    fake_gpu(monkeypatch, capability)
    # torch.cuda.is_bf16_supported() counts emulation and would say yes on every one of them
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("emulated bf16 counts as support there"))
    chosen, why = choose_dtype("auto", CUDA, training=training, fsdp=fsdp)
    assert chosen == dtype and f"compute capability {capability[0]}.{capability[1]}" in why


def test_explicit_gpu_dtypes_say_what_they_cost_or_are_refused(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    dtype, why = choose_dtype("bfloat16", CUDA, training=True)
    assert dtype == torch.bfloat16 and "emulated" in why
    with pytest.raises(DeviceError, match="FSDP here trains in float32 or bfloat16"):
        choose_dtype("float16", CUDA, training=True, fsdp=True)
    assert choose_dtype("float16", CUDA, training=True) == (torch.float16, "--dtype float16")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: every GPU PyTorch supports has bf16
    assert choose_dtype("auto", CUDA, training=True)[0] == torch.bfloat16


def test_cpu_offload_gets_the_cpus_torchrun_would_leave_at_one(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for every multi-process launch
    torch.set_num_threads(1)
    assert hardware.configure_training_threads(CUDA, cpu_offload=False, local_ranks=2) == ""  # the GPU computes
    assert torch.get_num_threads() == 1
    assert hardware.configure_training_threads(CUDA, cpu_offload=True, local_ranks=2).startswith("8 CPU threads")
    assert torch.get_num_threads() == 8  # AdamW over the rank's shard runs on the CPU
    torch.set_num_threads(1)  # as torch applied OMP_NUM_THREADS at start-up: CPU ranks share the cores, and keep it
    assert hardware.configure_training_threads(CPU, cpu_offload=False, local_ranks=2) == "1 CPU thread (OMP_NUM_THREADS)"
    monkeypatch.setenv(hardware.THREADS_ENV, "3")
    assert hardware.configure_training_threads(CUDA, cpu_offload=True, local_ranks=2).startswith("3 CPU threads")


def test_expandable_segments_are_set_before_cuda_starts_unless_the_user_chose(monkeypatch):
    for name in (hardware.ALLOC_CONF_ENV, "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "expandable_segments:True" in hardware.configure_cuda_allocator()
    assert hardware.os.environ[hardware.ALLOC_CONF_ENV] == "expandable_segments:True"
    monkeypatch.setenv(hardware.ALLOC_CONF_ENV, "max_split_size_mb:128")
    assert hardware.configure_cuda_allocator() == f"CUDA allocator: {hardware.ALLOC_CONF_ENV}=max_split_size_mb:128 (yours)"
    assert hardware.os.environ[hardware.ALLOC_CONF_ENV] == "max_split_size_mb:128"
    monkeypatch.delenv(hardware.ALLOC_CONF_ENV)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late for the variable: say so, set nothing
    assert "initialised before" in hardware.configure_cuda_allocator() and hardware.ALLOC_CONF_ENV not in hardware.os.environ


def home_200m(**overrides):
    from configurator import TrainConfig, parse_args

    cfg = parse_args(TrainConfig, ["config/home_200m.py", "--device=cuda", *[f"--{k}={v}" for k, v in overrides.items()]])
    return cfg, cfg.model_config(32000)


def test_the_memory_check_compares_with_free_memory_not_the_total(monkeypatch):
    cfg, model_cfg = home_200m(batch_size=4)
    need = hardware.plan_run_memory(cfg, model_cfg, 1, "cuda", torch.bfloat16).total / 2**30
    # A 24 GB card driving a display: the total would hold the run, what is free does not.
    fake_gpu(monkeypatch, free_gib=need - 1.0, total_gib=need + 1.0)
    with pytest.raises(DeviceError, match=rf"NVIDIA Fake has {need - 1.0:.1f} GiB free of {need + 1.0:.1f} GiB; these would fit: --grad_checkpoint=True"):
        hardware.check_memory_fits(cfg, model_cfg, 1, CUDA, torch.bfloat16)
    fake_gpu(monkeypatch, free_gib=need - 1.0, total_gib=need + 1.0, reserved_gib=1.5)  # this process's cached blocks are its own
    hardware.check_memory_fits(cfg, model_cfg, 1, CUDA, torch.bfloat16)


def test_the_plan_for_each_option(monkeypatch):
    cfg = ModelConfig(vocab_size=32000, n_layer=8, n_head=8, n_kv_head=2, n_embd=512, max_seq_len=1024)
    n = count_params(cfg)["total"]
    plan = lambda **k: hardware.plan_training_memory(cfg, 8, 1024, **k)  # noqa: E731
    base = plan(world_size=4, fsdp=True, grad_accum=4)
    every = plan(world_size=4, fsdp=True, grad_accum=4, reduce_every_micro_step=True)
    assert base.parts["no-sync gradients"] == 4 * n and "no-sync gradients" not in every.parts
    assert base.total - every.total == 4 * n and "after every micro-step" in every.why["gradients"]
    offload = plan(world_size=4, fsdp=True, cpu_offload=True)
    assert offload.parts["parameters"] == offload.parts["gradients"] == offload.parts["optimizer"] == 0
    assert offload.host == 16 * n / 4 and "host memory" in offload.format()
    assert plan(world_size=4, fsdp=True, cpu_offload=True, device_type="cpu").host == 0  # nothing to move on a CPU
    # GQA with K/V repeated for the memory-efficient kernel: k and v at n_head width, per layer and token
    expanded = plan(kv_expanded=True)
    extra = 8 * 1024 * cfg.n_layer * 2 * 2 * (cfg.n_head - cfg.n_kv_head) * cfg.head_dim  # tokens x layers x (k, v) x bf16 bytes
    assert expanded.parts["activations"] - plan().parts["activations"] == extra
    assert "K/V repeated" in expanded.why["activations"]
    # which runs repeat K/V: GQA on a GPU where flash cannot run (fp32 anywhere, fp16 before Ampere)
    assert hardware.gqa_expands_kv(cfg, "cuda", torch.float32)
    assert hardware.gqa_expands_kv(cfg, "cuda", torch.float16, (7, 5))
    assert not hardware.gqa_expands_kv(cfg, "cuda", torch.bfloat16, (8, 0))
    assert not hardware.gqa_expands_kv(cfg, "cpu", torch.float32)
    assert not hardware.gqa_expands_kv(ModelConfig(n_head=8, n_embd=512), "cuda", torch.float32)  # no GQA: nothing to repeat


def test_reduce_every_micro_step_is_chosen_when_the_plan_does_not_fit_otherwise(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg, model_cfg = home_200m(parallel="fsdp", gradient_accumulation_steps=4, batch_size=2)
    once = hardware.plan_run_memory(cfg, model_cfg, 2, "cuda", torch.bfloat16).total / 2**30
    every = hardware.plan_run_memory(replace(cfg, fsdp_reduce_every_micro_step=True), model_cfg, 2, "cuda", torch.bfloat16).total / 2**30
    assert every < once
    fake_gpu(monkeypatch, free_gib=(once + every) / 2)
    chosen, note = hardware.fit_to_memory(cfg, model_cfg, 2, CUDA, torch.bfloat16)
    assert chosen.fsdp_reduce_every_micro_step is True and "after every micro-step" in note
    fake_gpu(monkeypatch, free_gib=once + 1)  # fits either way: one reduction per step, less traffic
    assert hardware.fit_to_memory(cfg, model_cfg, 2, CUDA, torch.bfloat16) == (replace(cfg, fsdp_reduce_every_micro_step=False), "")
    fake_gpu(monkeypatch, free_gib=(once + every) / 2)
    with pytest.raises(DeviceError, match=r"these would fit: .*--fsdp_reduce_every_micro_step=True"):
        hardware.fit_to_memory(replace(cfg, fsdp_reduce_every_micro_step=False), model_cfg, 2, CUDA, torch.bfloat16)
    # one GPU too small for the model: CPU offload is the way, and it runs in one process
    one_gpu, model_cfg = home_200m(batch_size=2, grad_checkpoint=True)
    offloaded = hardware.plan_run_memory(replace(one_gpu, parallel="fsdp", fsdp_cpu_offload=True), model_cfg, 1, "cuda", torch.bfloat16)
    assert offloaded.host == 16 * count_params(model_cfg)["total"]  # the whole model's states, in host memory
    fake_gpu(monkeypatch, free_gib=offloaded.total / 2**30 + 0.1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(DeviceError, match=r"these would fit: --parallel=fsdp --fsdp_cpu_offload=True"):
        hardware.check_memory_fits(one_gpu, model_cfg, 1, CUDA, torch.bfloat16)
    assert hardware.uses_fsdp(replace(one_gpu, parallel="fsdp", fsdp_cpu_offload=True), world_size=1)
    assert not hardware.uses_fsdp(replace(one_gpu, parallel="fsdp"), world_size=1)


def test_a_cuda_model_is_compiled_as_a_cuda_graph():
    from types import SimpleNamespace

    calls = []
    gpu_model = SimpleNamespace(embed=SimpleNamespace(weight=SimpleNamespace(device=CUDA)), compile_decode=lambda *a, **k: calls.append((a, k)))
    assert hardware.compile_decode(gpu_model) == "decode step compiled and captured as a CUDA graph (mode=reduce-overhead)"
    assert calls == [((), {"mode": "reduce-overhead"})]
