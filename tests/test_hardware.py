"""hardware.py: the CPU bf16 probe behind --dtype auto, its overrides, and the CPU thread default."""

import math

import pytest
import torch

import hardware
from hardware import DeviceError, choose_dtype, configure_cpu_threads, cpu_bf16_matmul_speedup, cpu_prefers_bf16

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
def test_auto_on_cpu_follows_the_probe_for_inference_only(monkeypatch, speedup, dtype):
    calls = []
    monkeypatch.setattr(hardware, "cpu_bf16_matmul_speedup", lambda: calls.append(1) or speedup)
    chosen, why = choose_dtype("auto", CPU)
    assert chosen == dtype and f"{speedup:.2g}x" in why
    assert choose_dtype("auto", CPU) == (chosen, why) and len(calls) == 1  # probed once per process
    assert choose_dtype("auto", CPU, training=True)[0] == torch.float32  # training stays fp32 (for now)


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
