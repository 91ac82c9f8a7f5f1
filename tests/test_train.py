"""train.py end to end on a tiny generated dataset: loss, accumulation, DDP/FSDP via
torchrun (gloo on CPU), exact resume after kill -9, atomic saves, signals, bad input."""

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import export_hf
import system
import train
from configurator import TrainConfig
from model import ModelConfig
from dataset import TokenShards
from conftest import CHAT_TINY, TINY, shard_checkpoint
from train import get_lr

REPO = Path(__file__).resolve().parents[1]



def run_inprocess(argv: list[str]) -> None:
    train.main(argv)


def metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints its Python stacks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + random.randint(0, 500)), str(REPO / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout=180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:  # the first rank to die says why near its "Fatal Python error"; the tail has the launcher's summary
        fatal = out.find("Fatal Python error")
        pytest.fail((out[max(0, fatal - 500):fatal + 4000] + "\n[...]\n" if fatal >= 0 else "") + out[-3000:])
    return out


# ----------------------------------------------------------------------------- single process


def test_loss_falls_and_outputs_are_written(dataset, tmp_path):
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20"])
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 41))
    assert losses[1] > 4.5 and losses[40] < losses[1] - 1.5  # starts near ln(257), then learns
    records = metrics(out)
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "peak_mem_mb"):
        assert key in records[0]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    meta = json.loads((Path(dataset) / "meta.json").read_text())
    val = meta["splits"]["val"]
    assert evals[1]["val_bpb"] == pytest.approx(evals[1]["val_loss"] / math.log(2) * val["tokens"] / val["bytes"])
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["max_iters"] == 40 and config["model"]["n_kv_head"] == 2
    assert (out / meta["tokenizer"]["file"]).exists()  # sample.py finds the tokenizer here

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "model_config", "train_config", "step", "tokens_seen", "best_val_loss",
                "tokenizer", "rng", "sampler", "world_size", "scaler"):
        assert key in ckpt
    assert ckpt["step"] == 40 and ckpt["world_size"] == 1
    assert ckpt["tokens_seen"] == 40 * 4 * 32
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_000020.pt", "ckpt_000040.pt"]


def test_gradient_accumulation_matches_a_bigger_micro_batch(dataset, tmp_path):
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'a'}", "--max_iters=6", "--eval_interval=100", "--batch_size=4", "--gradient_accumulation_steps=1"])
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'b'}", "--max_iters=6", "--eval_interval=100", "--batch_size=1", "--gradient_accumulation_steps=4"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4)


def test_lr_schedule_warms_up_from_nonzero_and_decays_to_min_lr():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [get_lr(s, cfg) for s in range(120)]
    assert 0 < lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lrs[100] == lrs[119] == 1e-4


def test_weight_decay_only_on_matrices():
    from model import ModelConfig, Transformer, make_optimizer

    m = Transformer(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, qkv_bias=True))
    [opt] = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_global_batch_sampling_is_defined_by_seed_and_step(tmp_path):
    meta = {"dtype": "uint32", "splits": {"train": {"shards": [{"file": "a.bin", "tokens": 50}, {"file": "b.bin", "tokens": 8}, {"file": "c.bin", "tokens": 100}]}}}
    np.arange(50, dtype=np.uint32).tofile(tmp_path / "a.bin")
    np.arange(8, dtype=np.uint32).tofile(tmp_path / "b.bin")
    (np.arange(100, dtype=np.uint32) + 1000).tofile(tmp_path / "c.bin")
    data = TokenShards(str(tmp_path), meta, "train", block_size=9)
    assert data.num_windows == (50 - 9) + 0 + (100 - 9)  # a 10-token window never fits shard b
    picks = data.sample([7, 3], 500)
    assert picks == data.sample([7, 3], 500) and picks != data.sample([7, 4], 500)
    assert {s for s, _ in picks} == {0, 2}
    x, y = data.read(picks[:50], torch.device("cpu"))
    assert x.shape == y.shape == (50, 9)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(x[:, -1] - x[:, 0] == 8)  # contiguous windows, never across a shard boundary


def test_dry_run_prints_a_presets_counts_without_training(tmp_path, capsys):
    from model import count_params

    train.main(["config/home_25m.py", "--vocab_size=1000", "--dry_run", f"--out_dir={tmp_path / 'o'}"])
    out = capsys.readouterr().out
    cfg = TrainConfig(n_layer=8, n_head=8, n_embd=512, block_size=1024).model_config(1000)
    assert f"parameters: {count_params(cfg)['total']:,} total" in out
    assert "FSDP x8" in out and "memory per rank (one process" in out and "step time at an assumed 40% MFU" in out
    for part in ("parameters", "gradients", "optimizer", "activations", "loss", "total"):
        assert re.search(rf"^  {part} +[\d.]+ GiB", out, re.M), part
    assert not (tmp_path / "o").exists()  # nothing was trained or written


def test_a_model_too_big_for_this_machine_is_refused_in_seconds(dataset, tmp_path, capsys):
    # qwen_2_5b (3.2B parameters, ~58 GiB per process) on a CPU box: a message, not an OOM kill.
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        train.main(["config/qwen_2_5b.py", f"--data_dir={dataset}", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and time.perf_counter() - start < 60
    assert re.fullmatch(r"error: this run needs about [\d.]+ GiB per rank \(the most for optimizer: [\d.]+ GiB\) but this machine has [\d.]+ GiB available; these would fit: .*config/tiny_cpu.py.*", err), err
    assert not (tmp_path / "o").exists()


def test_the_memory_check_comes_before_the_model_is_built(dataset, tmp_path, capsys, monkeypatch):
    # --n_layer=100000 used to build 100000 blocks (on the meta device, for minutes) first.
    def built(*args, **kwargs):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(train, "Transformer", built)
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--n_layer=100000", "--n_embd=512", "--n_head=8", f"--data_dir={dataset}", f"--out_dir={tmp_path / 'o'}"])
    assert exit_.value.code == 1 and "error: this run needs about" in capsys.readouterr().err


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no dataset at") and "python prepare.py" in err and "\n" not in err


def test_nonfinite_loss_skips_then_stops_without_touching_the_checkpoint(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=4"])
    before = (out / "ckpt.pt").read_bytes()
    # An absurd learning rate drives the weights to inf within a step or two.
    with pytest.raises(SystemExit) as exit_:
        run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=100",
                       "--learning_rate=1e30", "--min_lr=1e30", "--warmup_iters=0", "--nonfinite_patience=3"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "update skipped (1/3)" in captured.out
    assert "non-finite for 3 steps in a row" in captured.err
    assert (out / "ckpt.pt").read_bytes() == before
    skipped = [r for r in metrics(out) if r.get("loss", 0) is None]
    assert skipped and all(r["step"] > 4 for r in skipped)  # recorded as null, never NaN
    # the skipped step is numbered as its log line and metrics record are
    assert int(re.search(r"step (\d+): non-finite loss", captured.out).group(1)) == skipped[0]["step"]


def test_atomic_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"step": 1}, str(tmp_path), 1, keep=0)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(checkpoint.CheckpointError, match=r"\(disk full\); the checkpoints already there are intact"):
        checkpoint.save_checkpoint({"step": 2}, str(tmp_path), 2, keep=0)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_resume_refuses_another_model_config(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"])
    with pytest.raises(SystemExit):
        run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--n_layer=3"])
    err = capsys.readouterr().err
    assert "the model config differs: n_layer=2 (checkpoint) vs 3 (now)" in err and "--init_from=" in err
    with pytest.raises(SystemExit):  # T2: Muon's state has other entries than AdamW's (a KeyError deep in torch)
        run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--optimizer=muon"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it was trained with --optimizer=adamw, this run asks for muon; use --optimizer=adamw" in err


def test_resume_takes_the_path_of_a_sharded_checkpoint_directory(dataset, tmp_path, capsys):
    # --resume=PATH names any checkpoint, an FSDP run's ckpt_STEP/ directory included.
    out = tmp_path / "run"
    args = [*TINY, f"--data_dir={dataset}", "--eval_interval=4"]
    run_inprocess([*args, f"--out_dir={out}", "--max_iters=4"])
    shard_checkpoint(out / "ckpt.pt", tmp_path / "ckpt_000004")
    run_inprocess([*args, f"--out_dir={tmp_path / 'more'}", "--max_iters=8", f"--resume={tmp_path / 'ckpt_000004'}"])
    assert f"resumed from {tmp_path / 'ckpt_000004'} at step 4" in capsys.readouterr().out
    assert sorted(train_losses(tmp_path / "more")) == [5, 6, 7, 8]
    with pytest.raises(SystemExit):
        run_inprocess([*args, f"--out_dir={tmp_path / 'typo'}", "--max_iters=8", "--resume=nevr"])
    assert "--resume=nevr: no such checkpoint; --resume takes auto, never, or the path of" in capsys.readouterr().err


def test_init_from_a_checkpoint_warm_starts_the_weights(dataset, tmp_path):
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'a'}", "--max_iters=20", "--eval_interval=20"])
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'b'}", "--max_iters=1", "--eval_interval=1",
                   f"--init_from={tmp_path / 'a' / 'ckpt.pt'}"])
    assert train_losses(tmp_path / "b")[1] < train_losses(tmp_path / "a")[1] - 1.0
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 1


def test_max_time_min_stops_cleanly_with_a_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000", "--max_time_min=0.02"])
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 0 < step < 100000
    assert max(train_losses(out)) == step


# ----------------------------------------------------------------------------- subprocesses


def wait_for(path: Path, proc: subprocess.Popen, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children before grandchildren), from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        found += frontier
    return found


def kill_after_first_checkpoint(cmd_proc: subprocess.Popen, out: Path) -> int:
    """kill -9 of a whole run, ranks included, right after its first checkpoint. torchrun puts
    its ranks in sessions of their own, so killpg of the launcher misses them; and ranks that
    outlive the launcher stop gracefully (stop_when_the_launcher_dies), which is not a crash."""
    wait_for(out / "ckpt.pt", cmd_proc)
    os.kill(cmd_proc.pid, signal.SIGSTOP)  # no reaction to its ranks' deaths, no SIGTERM to them
    for pid in [*reversed(descendants(cmd_proc.pid)), cmd_proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cmd_proc.wait()
    return torch.load(out / "ckpt.pt", weights_only=True)["step"]


# Long enough that the kill (right after the first checkpoint appears) lands mid-run even on a busy machine.
RESUME_RUN = [*TINY, "--max_iters=60", "--eval_interval=5", "--block_size=64", "--batch_size=8"]


def comparable(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in records]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_after_kill_is_bit_exact_single_process(dataset, tmp_path, dropout):
    # With dropout every step draws random masks, so this also proves that nothing else (the CPU
    # peak-FLOPs probe at start-up, say) draws from the RNG between restore and training.
    ref, cut = run_killed_and_resumed([*RESUME_RUN, f"--data_dir={dataset}", f"--dropout={dropout}"], tmp_path)
    assert comparable(metrics(cut)) == comparable(metrics(ref))  # exact float equality


def run_killed_and_resumed(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """out_dirs of a run of args, and of the same run killed with SIGKILL (kill -9) right
    after its first checkpoint and resumed to the end."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_inprocess([*args, f"--out_dir={ref}"])
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={cut}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    saved_step = kill_after_first_checkpoint(proc, cut)
    assert proc.returncode == -signal.SIGKILL and saved_step < max(train_losses(ref))
    run_inprocess([*args, f"--out_dir={cut}"])
    return ref, cut


def test_sigterm_finishes_the_step_saves_and_exits_zero(dataset, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output and "(stopped by signal)" in output
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step == max(train_losses(out))


def test_ranks_save_and_stop_when_the_launcher_is_killed(dataset, tmp_path):
    # Issue 21 H5: kill -9 of torchrun left both ranks training, holding train.lock.
    import fcntl

    out = tmp_path / "run"
    proc = torchrun([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"],
                    start_new_session=True)
    try:
        wait_for(out / "metrics.jsonl", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
        output, _ = proc.communicate(timeout=120)  # the ranks hold its stdout: EOF once both have exited
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "received SIGTERM" in output and "(stopped by signal)" in output, output[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == max(train_losses(out))
    with open(out / "train.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: a new run may take out_dir


def test_ddp_two_ranks_equal_one_process_with_double_accumulation_and_resume_exactly(dataset, tmp_path):
    one, ddp, cut = tmp_path / "one", tmp_path / "ddp", tmp_path / "cut"
    args = [*RESUME_RUN, f"--data_dir={dataset}", "--batch_size=4"]
    ref = torchrun([*args, f"--out_dir={ddp}"])
    run_inprocess([*args, f"--out_dir={one}", "--gradient_accumulation_steps=2"])
    log = finish(ref)
    assert "4 x 1 accum x 2 ranks = 8 sequences" in log
    a, b = train_losses(one), train_losses(ddp)
    assert a.keys() == b.keys() == set(range(1, 61))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4)
    # Validation uses the same windows whatever the world size, split over the ranks.
    val_one = [r["val_loss"] for r in metrics(one) if "val_loss" in r]
    val_ddp = [r["val_loss"] for r in metrics(ddp) if "val_loss" in r]
    assert len(val_one) == 12 and val_one == pytest.approx(val_ddp, rel=1e-4)

    proc = torchrun([*args, f"--out_dir={cut}"], start_new_session=True)
    saved_step = kill_after_first_checkpoint(proc, cut)
    assert saved_step < 60
    finish(torchrun([*args, f"--out_dir={cut}"]))
    assert comparable(metrics(cut)) == comparable(metrics(ddp))  # bit-exact across the kill

    # One process with twice the accumulation continues the 2-rank run: the same global batch,
    # so the same windows, and the 2-rank run's losses within reduction-order rounding.
    one_more = tmp_path / "one_more"
    run_inprocess([*args, f"--out_dir={one_more}", "--gradient_accumulation_steps=2", f"--resume={cut / 'ckpt_000055.pt'}"])
    continued, reference = train_losses(one_more), train_losses(ddp)
    assert sorted(continued) == list(range(56, 61))
    for step in continued:
        assert continued[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-4), step


def test_fsdp_saves_sharded_and_resumes_on_any_number_of_ranks(dataset, tmp_path):
    out = tmp_path / "fsdp"
    # eval_iters x batch_size = 3 x 3 = 9 validation windows: rank 0 takes 5, rank 1 takes 4 plus
    # one padding row, which must neither change the mean nor leave FSDP's collectives unmatched.
    # float32: the losses are compared across layouts at fp32 tolerances (--dtype auto may pick bf16).
    common = [*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--eval_interval=4", "--lr_decay_iters=12", "--eval_iters=3",
              "--batch_size=3", "--dtype=float32"]
    fsdp = [*common, "--parallel=fsdp"]
    log = finish(torchrun([*fsdp, "--max_iters=4"]))
    assert "parallel: fsdp" in log
    # Each rank wrote its own shards; nothing was gathered into a ckpt.pt.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt_000004"]
    assert sorted(p.name for p in (out / "ckpt_000004").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ckpt = checkpoint.load_checkpoint(checkpoint.find_checkpoint(str(out)))  # consolidated on the fly, no process group
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and ckpt["parallel"] == "fsdp"
    assert ckpt["model"]["embed.weight"].shape == (257, 32)
    # 2 ranks -> 1 process (same global batch: 2x accumulation) -> 2 ranks again.
    run_inprocess([*common, "--max_iters=8", "--gradient_accumulation_steps=2"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8
    finish(torchrun([*fsdp, "--max_iters=12"]))
    assert checkpoint.find_checkpoint(str(out)) == str(out / "ckpt_000012")
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 13))
    # FSDP and a single process compute the same thing: compare against one process, 2x accumulation.
    single = tmp_path / "single"
    run_inprocess([*common, f"--out_dir={single}", "--max_iters=12", "--gradient_accumulation_steps=2"])
    for step, loss in train_losses(single).items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), step
    val_single = [r["val_loss"] for r in metrics(single) if "val_loss" in r]
    val_fsdp = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(val_single) == 3 and val_fsdp == pytest.approx(val_single, rel=1e-4)
    # sample.py reads the sharded run directly.
    sampled = subprocess.run([sys.executable, "sample.py", "--out_dir", str(out), "--start", "кот", "--max_new_tokens", "5", "--seed", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0 and sampled.stdout.startswith("кот") and "ckpt_000012: step 12" in sampled.stderr
    # ... and export_hf.py consolidates it into one .pt with the same weights (no optimizer state).
    export_hf.main(["--out_dir", str(out), "--to", str(tmp_path / "full" / "model.pt")])
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    assert full["step"] == 12 and "optimizer" not in full and (tmp_path / "full" / "tokenizer.tiktoken").exists()
    sharded = checkpoint.load_checkpoint(str(out / "ckpt_000012"))
    assert all(torch.equal(full["model"][k], v) for k, v in sharded["model"].items())
    # ... and train.py --init_from starts from the shards (learning_rate 0 keeps the start visible).
    run_inprocess([*common, f"--out_dir={tmp_path / 'warm'}", f"--init_from={out / 'ckpt_000012'}", "--max_iters=1", "--eval_interval=1",
                   "--learning_rate=0", "--min_lr=0", "--warmup_iters=0"])
    tuned = torch.load(tmp_path / "warm" / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(tuned["embed.weight"], sharded["model"]["embed.weight"])
    assert torch.equal(tuned["layers.0.attn.q_proj.weight"], sharded["model"]["layers.0.attn.q_proj.weight"])
    # (A GGUF from shards: tests/test_gguf.py, with a tokenizer llama.cpp can load; this one is bytes alone.)


def test_async_checkpoint_writes_in_the_background_the_same_checkpoints(dataset, tmp_path):
    # Saves at steps 2, 4 and 6 are written while training goes on, step 8's is waited for.
    # Each must hold the state of its own step, not of a later one: the same bytes as a run
    # that saves synchronously.
    common = [*TINY, f"--data_dir={dataset}", "--eval_interval=2", "--eval_iters=2", "--max_iters=8", "--parallel=fsdp",
              "--keep_checkpoints=3"]
    background, waited = tmp_path / "background", tmp_path / "waited"
    log = finish(torchrun([*common, f"--out_dir={background}", "--async_checkpoint=True"]))
    finish(torchrun([*common, f"--out_dir={waited}"]))
    assert re.findall(r"saving \S+(ckpt_\d+) in the background \(eval_interval=2; training paused [\d.]+ s to copy the shards\)", log) == ["ckpt_000002", "ckpt_000004", "ckpt_000006"]
    assert re.findall(r"saved \S+(ckpt_\d+) \(written in the background\)", log) == ["ckpt_000002", "ckpt_000004", "ckpt_000006"]
    assert re.search(r"saved \S+ckpt_000008 \(end of training\)", log)
    names = sorted(p.name for p in background.iterdir() if "ckpt" in p.name)
    assert names == ["ckpt_000004", "ckpt_000006", "ckpt_000008"]  # keep=3, nothing half-written left
    assert train_losses(background) == train_losses(waited)
    for step in (4, 6, 8):
        a = checkpoint.load_checkpoint(str(background / f"ckpt_{step:06d}"))
        b = checkpoint.load_checkpoint(str(waited / f"ckpt_{step:06d}"))
        assert a["step"] == b["step"] == step
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    # and the run resumes from a background-written checkpoint
    finish(torchrun([*common, f"--out_dir={background}", "--async_checkpoint=True", "--max_iters=10"]))
    assert sorted(train_losses(background)) == list(range(1, 11))


def test_sharded_saver_in_the_background_keeps_the_state_of_its_step(tmp_path):
    # One process with a process group of one: the copy is taken when save() returns, so
    # changing the weights afterwards (the next training step) does not reach the file.
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        saver = checkpoint.ShardedSaver(background=True)
        weights = {"w": torch.arange(6.0)}
        path = saver.save({"model": weights}, {"step": 3}, str(tmp_path), 3, keep=1, wait=False)
        weights["w"].add_(100.0)  # in place, as an optimizer step would
        assert saver.wait() == path == str(tmp_path / "ckpt_000003")

        def saved_w(step):
            loaded = {"model": {"w": torch.empty(6)}}
            checkpoint.load_sharded(str(tmp_path / f"ckpt_{step:06d}"), loaded)
            return loaded["model"]["w"]

        assert torch.equal(saved_w(3), torch.arange(6.0))
        saver.save({"model": weights}, {"step": 5}, str(tmp_path), 5, keep=1, wait=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000005"]  # keep=1; no .tmp left
        assert torch.equal(saved_w(5), torch.arange(6.0) + 100.0)
        saver.save({"model": {"w": torch.zeros(6)}}, {"step": 7}, str(tmp_path), 7, keep=2, wait=False)
        saver.close()  # what train.py's exit does with a write in flight: let it land
        assert checkpoint.load_train_state(str(tmp_path / "ckpt_000007"))["step"] == 7
        assert torch.equal(saved_w(7), torch.zeros(6))

        # A background write that fails (a full disk) is reported by the next wait, with what to do.
        import concurrent.futures
        import torch.distributed.checkpoint as dcp

        failed = concurrent.futures.Future()
        failed.set_exception(OSError(28, "No space left on device"))
        real_async_save, dcp.async_save = dcp.async_save, lambda *args, **kwargs: failed
        try:
            saver.save({"model": weights}, {"step": 9}, str(tmp_path), 9, keep=2, wait=False)
        finally:
            dcp.async_save = real_async_save
        with pytest.raises(checkpoint.CheckpointError, match=r"\(No space left on device\); the checkpoints already there are intact"):
            saver.wait()
        assert checkpoint.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_000007")
    finally:
        dist.destroy_process_group()


def test_stop_flag_second_ctrl_c_aborts_but_a_forwarded_sigterm_does_not():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        flag = system.StopFlag()
        flag._handle(signal.SIGINT, None)
        assert flag.requested
        flag._handle(signal.SIGTERM, None)  # torchrun forwards SIGTERM after the terminal's SIGINT
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGINT, None)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- status.json and metric sinks


def status(out_dir) -> dict:
    return json.loads((Path(out_dir) / "status.json").read_text())


def test_status_json_says_finished_stopped_or_crashed_and_why(dataset, tmp_path):
    out = tmp_path / "run"
    before = time.time()
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3"])
    s = status(out)
    assert (s["state"], s["reason"], s["step"], s["max_iters"], s["world_size"]) == ("finished", "max_iters", 3, 3, 1)
    assert s["pid"] == os.getpid() and s["host"] == socket.gethostname() and before <= s["started"] <= s["updated"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # written through a temp file and a rename

    # A failure after the run had started in this out_dir: crashed, with train.py's error line.
    with pytest.raises(SystemExit):
        run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=6", "--n_layer=3"])
    s = status(out)
    assert s["state"] == "crashed" and s["reason"].startswith("error: cannot resume") and s["step"] == 3

    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'timed'}", "--max_iters=100000", "--eval_interval=100000", "--max_time_min=0.005"])
    s = status(tmp_path / "timed")
    assert (s["state"], s["reason"]) == ("finished", "time budget")
    assert s["step"] == torch.load(tmp_path / "timed" / "ckpt.pt", weights_only=True)["step"]


def test_no_status_json_where_the_run_never_started(tmp_path):
    with pytest.raises(SystemExit):
        train.main([f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"])
    assert not (tmp_path / "o").exists()


def test_metric_sinks_receive_every_metrics_record(dataset, tmp_path, monkeypatch):
    logged, scalars, flushes = [], [], []

    class FakeWandbRun:
        def log(self, values, step):
            logged.append((step, values))

    def fake_init(project, name, config):
        assert project == "homellm-test" and name == "run" and config["max_iters"] == 4
        return FakeWandbRun()

    class FakeSummaryWriter:
        def __init__(self, log_dir):
            assert log_dir == str(tmp_path / "tb")

        def add_scalar(self, tag, value, step):
            scalars.append((step, tag, value))

        def flush(self):
            flushes.append(len(scalars))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
                   "--wandb_project=homellm-test", f"--tensorboard_dir={tmp_path / 'tb'}"])
    def flat(record):  # per-source dicts become one scalar per source, named key/source
        pairs = [(f"{k}/{sub}", x) for k, v in record.items() if isinstance(v, dict) for sub, x in v.items()]
        return {k: v for k, v in [*record.items(), *pairs] if k != "step" and v is not None and not isinstance(v, dict)}

    expected = [(r["step"], flat(r)) for r in metrics(out)]
    assert len(expected) == 6 and logged == expected  # 4 train records + 2 evaluations, same names and values
    assert logged[3][1][f"source_tokens/{dataset}"] == logged[3][1]["tokens_seen"] == 3 * 4 * 32  # step 3: batch 4 x 32 tokens
    assert logged[-1][1][f"source_val_loss/{dataset}"] == logged[-1][1]["val_loss"]
    assert scalars == [(step, k, v) for step, values in expected for k, v in values.items()]
    assert len(flushes) == 6 and flushes[-1] == len(scalars)  # on disk after every record


@pytest.mark.parametrize("flag, module, package", [
    ("--wandb_project=p", "wandb", "wandb"), ("--tensorboard_dir=tb", "torch.utils.tensorboard", "tensorboard")])
def test_a_missing_sink_package_is_one_line_before_any_work(dataset, tmp_path, monkeypatch, capsys, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to import
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'o'}", flag])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    option = flag.split("=")[0]
    assert err == f"error: {option} needs the {package} package, which is not installed: pip install {package} (or drop {option})\n"
    assert not (tmp_path / "o").exists()


def test_fsdp_ranks_hold_about_their_shard_at_start_not_the_whole_model(dataset, tmp_path):
    # A ~400 MB fp32 model (8 layers x 1024 wide, tiny vocab) on 2 ranks. Built on the meta
    # device and filled shard by shard, each FSDP rank's peak memory at start must be near
    # baseline + half the model; a full copy per rank (as DDP holds) would be baseline + all of it.
    big = [*TINY, "--n_layer=8", "--n_embd=1024", "--n_head=8", "--n_kv_head=8", "--max_iters=1", "--eval_interval=1", "--eval_iters=1"]
    model_mb = 8 * (4 * 1024 * 1024 + 3 * 1024 * 2816) * 4 / 2**20  # 8 layers of attention + SwiGLU weights, fp32

    def start_memory(*extra):
        log = finish(torchrun([*big, f"--data_dir={dataset}", f"--out_dir={tmp_path / str(len(extra))}", *extra]))
        line = next(line for line in log.splitlines() if line.startswith("memory with the model built:"))
        return [float(mb.replace(",", "")) for mb in re.findall(r"rank \d ([\d,]+) MB", line)]

    baseline = start_memory("--n_layer=1", "--n_embd=64", "--n_head=4", "--n_kv_head=2")
    sharded = start_memory("--parallel=fsdp")
    for rank, mb in enumerate(sharded):
        assert mb - baseline[rank] < 0.5 * model_mb + 0.15 * model_mb, (sharded, baseline, model_mb)
    assert 350 < model_mb < 450


def test_a_time_budget_shapes_the_schedule_and_ends_at_min_lr(dataset, tmp_path):
    # --max_iters=None: as many steps as 0.15 minutes allow, the cosine following the clock.
    out = tmp_path / "timed"
    args = [*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=None", "--max_time_min=0.15", "--eval_interval=100000", "--warmup_iters=2"]
    start = time.perf_counter()
    run_inprocess(args)
    took = time.perf_counter() - start
    records = [r for r in metrics(out) if "lr" in r]
    assert len(records) >= 4 and took < 0.15 * 60 + 30  # the budget, plus start-up and the final eval and save
    assert records[-1]["lr"] == pytest.approx(3e-4)  # min_lr on the last step
    lrs = [r["lr"] for r in records[2:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decaying with the clock after warmup
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed[-1] <= 0.15 * 60 + 2 and records[len(records) // 2]["lr"] < 3e-3
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == records[-1]["step"] and ckpt["elapsed_s"] == pytest.approx(elapsed[-1])


def test_a_time_budgeted_run_resumes_on_its_own_clock(dataset, tmp_path):
    out = tmp_path / "timed"
    args = [*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=None", "--max_time_min=0.2", "--eval_interval=5"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    saved = kill_after_first_checkpoint(proc, out)
    saved_elapsed = torch.load(out / "ckpt.pt", weights_only=True)["elapsed_s"]
    run_inprocess(args)
    records = [r for r in metrics(out) if "lr" in r]
    assert [r["step"] for r in records] == list(range(1, records[-1]["step"] + 1)) and records[-1]["step"] > saved
    resumed = [r for r in records if r["step"] > saved]
    assert resumed[0]["elapsed_s"] > saved_elapsed  # the clock went on from the checkpoint's count
    assert records[-1]["lr"] == pytest.approx(3e-4) and records[-1]["elapsed_s"] <= 0.2 * 60 + 2


def test_a_finished_time_budgeted_run_run_again_does_nothing(dataset, tmp_path, capsys):
    # As with max_iters: it used to train one more step per re-run and rotate checkpoints away.
    out = tmp_path / "timed"
    args = [*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=None", "--max_time_min=0.05", "--eval_interval=3"]
    run_inprocess(args)
    files = {p.name: p.read_bytes() for p in out.glob("ckpt*")}
    records = metrics(out)
    capsys.readouterr()
    run_inprocess(args)
    assert f"done: step {records[-1]['step']}," in capsys.readouterr().out
    assert metrics(out) == records and {p.name: p.read_bytes() for p in out.glob("ckpt*")} == files
    assert json.loads((out / "status.json").read_text())["reason"] == "time budget"


def test_muon_takes_the_block_matrices_and_adamw_the_rest(dataset, tmp_path):
    import model as model_lib
    from model import ModelConfig, Transformer, make_optimizer

    m = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, qkv_bias=True, tie_embeddings=False))
    muon, adamw = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), kind="muon")
    assert isinstance(muon, model_lib.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == set(names.values()) - in_muon
    # A run with it learns, saves both optimizers' state and resumes exactly.
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = [*TINY, f"--data_dir={dataset}", "--optimizer=muon", "--eval_interval=5"]
    args += ["--max_iters=30", "--block_size=64", "--batch_size=8"]
    run_inprocess([*args, f"--out_dir={ref}"])
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={cut}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert kill_after_first_checkpoint(proc, cut) < 30
    run_inprocess([*args, f"--out_dir={cut}"])
    assert comparable(metrics(cut)) == comparable(metrics(ref))
    losses = train_losses(ref)
    assert losses[10] < losses[1] - 0.5


def test_orthogonalize_flattens_the_singular_values():
    # Gradient-like matrices whose singular values spread over a decade come out with all of
    # them near 1 (the quintic's coefficients trade exactness for speed: 0.7-1.2 is the design),
    # pointing the way of the exact orthogonal factor U V^T.
    import model as model_lib

    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(192, 64, generator=gen))
    g = u @ torch.diag(torch.logspace(-1, 0, 64)) @ v.t() * 3.0
    for matrix, polar in ((g, u @ v.t()), (g.t(), v @ u.t())):
        out = model_lib.orthogonalize(matrix)
        s = torch.linalg.svdvals(out)
        assert 0.5 < s.min() and s.max() < 1.3, s
        assert torch.nn.functional.cosine_similarity(out.flatten(), polar.flatten(), dim=0) > 0.95


# ----------------------------------------------------------------------------- CPU dtype, MFU


@pytest.mark.parametrize("forced, dtype", [("1", "bfloat16"), ("0", "float32")])
def test_cpu_dtype_auto_is_logged_overridable_and_bf16_training_learns(dataset, tmp_path, capsys, monkeypatch, forced, dtype):
    # HOMELLM_CPU_BF16 stands in for the probe's answer (AMX machine or not); the log says which
    # dtype and why, and bf16 autocast on CPU trains as fp32 does.
    import hardware

    hardware.cpu_prefers_bf16.cache_clear()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, forced)
    out = tmp_path / "run"
    try:
        run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=30"])
    finally:
        hardware.cpu_prefers_bf16.cache_clear()
    log = capsys.readouterr().out
    assert f"dtype: {dtype} (auto: {dtype} because {hardware.CPU_BF16_ENV}={forced})" in log
    assert f"measured {dtype} matmul" in log
    losses = train_losses(out)
    assert losses[30] < losses[1] - 1.0


def test_mfu_never_reads_above_100_percent(dataset, tmp_path, capsys):
    # A peak far below what the CPU does (as a start-up measurement on a busy machine can be):
    # the first log raises it to the rate seen and says so; no record exceeds 1.
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=6", "--log_interval=2", "--peak_flops=1000"])
    log = capsys.readouterr().out
    assert "computed faster than the peak of 1e+03 FLOP/s; MFU is now relative to" in log
    mfus = [r["mfu"] for r in metrics(out) if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m <= 1.0 for m in mfus) and mfus[0] == 1.0


def test_eval_split_scores_every_window_of_the_split_once(dataset, tmp_path):
    """tools/eval_split.py (the quality benchmark's whole-held-out number): consecutive windows
    over every val shard, the loss a plain cross-entropy over the model's logits gives, the
    same for any batch size, and bits per byte from meta.json's bytes per token."""
    sys.path.insert(0, str(REPO / "tools"))
    import eval_split
    import torch.nn.functional as F
    from dataset import load_meta

    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=100000"])
    result = eval_split.evaluate_split(str(out / "ckpt.pt"), dataset, batch_size=5)
    meta = load_meta(dataset)
    shard_tokens = [s["tokens"] for s in meta["splits"]["val"]["shards"]]
    assert result["windows"] == sum((n - 1) // 32 for n in shard_tokens) and result["tokens"] == 32 * result["windows"]
    model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(out / "ckpt.pt")), "cpu", torch.float32)
    windows = torch.from_numpy(eval_split.split_windows(dataset, meta, "val", 32))
    assert torch.equal(windows[1, 0], windows[0, -1])  # each window starts where the last one's targets end
    with torch.no_grad():
        expected = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].reshape(-1)).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert eval_split.evaluate_split(str(out / "ckpt.pt"), dataset, batch_size=64)["loss"] == pytest.approx(expected, rel=1e-5)
    val = meta["splits"]["val"]
    assert result["bpb"] == pytest.approx(expected / math.log(2) * val["tokens"] / val["bytes"], rel=1e-5)

    cli = [sys.executable, str(REPO / "tools" / "eval_split.py"), "--ckpt", str(out / "ckpt.pt"), "--data_dir", dataset]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf".* on the val split of .*: {result['windows']} windows of 32, [\d,]+ tokens: loss {result['loss']:.4f}, "
                        rf"ppl [\d.]+, {result['bpb']:.4f} bits per byte\n", done.stdout)
    too_long = subprocess.run([*cli, "--block_size", "33"], capture_output=True, text=True, cwd=tmp_path)
    assert too_long.returncode == 1 and too_long.stderr == "error: --block_size 33 is longer than the model's context (max_seq_len=32)\n"
    with pytest.raises(eval_split.DatasetError, match="the val split of .* holds no window of"):
        eval_split.split_windows(dataset, meta, "val", max(shard_tokens))


# ----------------------------------------------------------------------------- fine-tuning on conversations


def test_chat_training_learns_the_replies_and_logs_the_masked_mean(chat_dataset, chat_run):
    """The copy task (conftest.copy_conversation): the user turn is random letters around one
    bracketed word, the reply is that word. The loss counts only the replies, so it can fall
    close to zero; with the random letters in it, it never could."""
    from model import Transformer

    losses = train_losses(chat_run)
    assert losses[1] > 2.0 and sum(losses[s] for s in range(351, 401)) / 50 < 0.1
    [evaluation] = [r for r in metrics(chat_run) if "val_loss" in r]
    assert evaluation["val_loss"] < 0.05
    # The logged val loss is the mean over the masked-in targets of the evaluated windows ...
    ckpt = checkpoint.load_checkpoint(os.path.join(chat_run, "ckpt.pt"))
    model = checkpoint.model_from_checkpoint(ckpt, "cpu", torch.float32)
    meta = json.loads((Path(chat_dataset) / "meta.json").read_text())
    val = TokenShards(chat_dataset, meta, "val", 80)
    x, y = val.read(val.sample([1337, 1], 2 * 16), torch.device("cpu"))
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(evaluation["val_loss"], rel=1e-4)
        # ... and the model did not (could not) learn the random text around the word.
        everything = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        assert model(x, everything).item() > 1.0
    assert ckpt["data"]["chat"] is True and ckpt["tokenizer"]["chat_tokens"] == {"<|im_start|>": 257, "<|im_end|>": 258}

    # The first logged loss is the mean over every reply token of step 0's global batch,
    # however they are spread over the micro-batches.
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    with torch.device("meta"):
        fresh = Transformer(cfg)
    checkpoint.materialize(fresh, torch.device("cpu"), None, seed=1337)
    train_data = TokenShards(chat_dataset, meta, "train", 80)
    x, y = train_data.read(train_data.sample([1337, 0], 16), torch.device("cpu"))
    with torch.no_grad():
        assert fresh(x, y).item() == pytest.approx(losses[1], rel=1e-5)


def test_chat_accumulation_weights_every_reply_token_equally(chat_dataset, tmp_path):
    # Replies of 2 to 38 tokens: micro-batches hold different numbers of reply tokens, so the
    # mean of their means would differ from the mean over the global batch, which training computes.
    import prepare

    rng = random.Random(5)
    with open(tmp_path / "chats.jsonl", "w", encoding="utf-8") as f:
        for i in range(300):
            reply = " ".join(["ok"] * rng.randint(1, 13))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i} say ok"}, {"role": "assistant", "content": reply}]}) + "\n")
    data = tmp_path / "ds"
    assert prepare.main(["--input", str(tmp_path / "chats.jsonl"), "--tokenizer", str(Path(chat_dataset) / "tokenizer.tiktoken"),
                         "--out_dir", str(data), "--val_fraction", "0.1", "--workers", "1", "--no_progress"]) == 0
    windows = TokenShards(str(data), json.loads((data / "meta.json").read_text()), "train", 80)
    assert len({windows.count_targets([p]) for p in windows.sample([1337, 0], 8)}) > 3  # step 0's windows differ
    args = [*CHAT_TINY, f"--data_dir={data}", "--max_iters=5", "--eval_interval=5", "--eval_iters=1"]
    run_inprocess([*args, f"--out_dir={tmp_path / 'a'}", "--batch_size=8", "--gradient_accumulation_steps=1"])
    run_inprocess([*args, f"--out_dir={tmp_path / 'b'}", "--batch_size=1", "--gradient_accumulation_steps=8"])
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a.keys() == b.keys() == set(range(1, 6))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)


CHAT_RESUME = [*TINY, "--dtype=float32", "--block_size=80", "--max_iters=40", "--eval_interval=5", "--batch_size=4"]


def test_chat_ddp_equals_one_process_with_double_accumulation_and_resume_is_bit_exact(chat_dataset, tmp_path):
    args = [*CHAT_RESUME, f"--data_dir={chat_dataset}"]
    ddp = torchrun([*args, f"--out_dir={tmp_path / 'ddp'}"])
    run_inprocess([*args, f"--out_dir={tmp_path / 'one'}", "--gradient_accumulation_steps=2"])
    finish(ddp)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "ddp")
    assert one.keys() == two.keys() == set(range(1, 41))
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-4, abs=1e-5), step
    val_one = [r["val_loss"] for r in metrics(tmp_path / "one") if "val_loss" in r]
    val_ddp = [r["val_loss"] for r in metrics(tmp_path / "ddp") if "val_loss" in r]
    assert len(val_one) == 8 and val_one == pytest.approx(val_ddp, rel=1e-4)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={cut}", "--gradient_accumulation_steps=2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert kill_after_first_checkpoint(proc, cut) < 40
    run_inprocess([*args, f"--out_dir={cut}", "--gradient_accumulation_steps=2"])
    assert comparable(metrics(cut)) == comparable(metrics(tmp_path / "one"))  # exact float equality


def test_init_from_a_base_run_grows_the_vocabulary_for_the_chat_tokens(dataset, chat_dataset, tmp_path, capsys):
    base = tmp_path / "base"
    run_inprocess([*TINY, "--block_size=80", f"--data_dir={dataset}", f"--out_dir={base}", "--max_iters=3", "--eval_interval=3"])
    # learning_rate 0: the step changes nothing, so the checkpoint shows the grown weights as they started.
    run_inprocess([*TINY, "--block_size=80", f"--data_dir={chat_dataset}", f"--out_dir={tmp_path / 'chat'}", f"--init_from={base}",
                   "--max_iters=1", "--eval_interval=1", "--learning_rate=0", "--min_lr=0", "--warmup_iters=0"])
    assert "grew the vocabulary from 257 to 259 tokens" in capsys.readouterr().out
    before = torch.load(base / "ckpt.pt", weights_only=True)["model"]["embed.weight"]
    after = torch.load(tmp_path / "chat" / "ckpt.pt", weights_only=True)
    grown = after["model"]["embed.weight"]
    assert after["model_config"]["vocab_size"] == 259 and grown.shape == (259, 32)
    assert torch.equal(grown[:257], before)
    assert torch.allclose(grown[257], before.mean(0)) and torch.allclose(grown[258], before.mean(0))
    # A dataset whose tokenizer is not the run's plus tokens is refused, in one line.
    with pytest.raises(checkpoint.CheckpointError, match="is not the checkpoint's"):
        checkpoint.grow_vocab(after, {"kind": "sentencepiece", "eot_id": 1}, 300)


# ----------------------------------------------------------------------------- the GPU path, on the CPU
# FSDP's CPU offload, its gradient reduction and the logging around evaluations, run here on
# gloo; what is specific to a GPU (where each tensor lands) is checked with a stand-in device.


def fsdp_group_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    return dist


def test_materialize_for_cpu_offload_puts_parameters_on_the_host_and_buffers_where_it_computes():
    from model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32)
    with torch.device("meta"):
        offloaded, plain = Transformer(cfg), Transformer(cfg)
    # FSDP's offload refuses parameters anywhere but the CPU; the RoPE tables are not FSDP's and
    # must be on the GPU. "meta" stands in for the GPU: only where each tensor lands matters here.
    checkpoint.materialize(offloaded, torch.device("meta"), None, seed=3, cpu_offload=True)
    assert {p.device.type for p in offloaded.parameters()} == {"cpu"}
    assert {b.device.type for b in offloaded.buffers()} == {"meta"}
    checkpoint.materialize(plain, torch.device("cpu"), None, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(offloaded.parameters(), plain.parameters()))  # the same init


def test_the_grad_norm_comes_back_on_the_runs_device():
    # Under CPU offload the gradients, and clip_grad_norm_'s result, are on the CPU; the step's
    # statistics are stacked with the loss on the GPU. "meta" stands in for the GPU again.
    from model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=16))
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    run = types.SimpleNamespace(optimizers=[], scaler=torch.amp.GradScaler("cpu", enabled=False), raw_model=model,
                                cfg=TrainConfig(grad_clip=1.0), device=torch.device("meta"))
    assert train.clip_gradients(run).device == torch.device("meta")


@pytest.mark.parametrize("tie", [True, False])
def test_fsdp_keeps_gathered_the_groups_backward_needs_first(tie):
    # The head's group (and with it a tied embedding) and the last block are used first in
    # backward: gathering them again right after forward is wasted traffic.
    from model import ModelConfig, Transformer

    dist = fsdp_group_of_one()
    try:
        with torch.device("meta"):
            model = Transformer(ModelConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32, tie_embeddings=tie))
        train.apply_fsdp(model, TrainConfig(parallel="fsdp"), torch.device("cpu"), None)

        def reshards(module):
            return module._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None

        assert [reshards(block) for block in model.layers] == [True, True, False]
        assert not reshards(model.lm_head) and not reshards(model.norm)
        assert reshards(model.embed) is not tie  # an untied embedding is needed last in backward: freed after forward
    finally:
        dist.destroy_process_group()


def test_cpu_offload_trains_in_one_process_and_over_ranks_as_one_process_does(dataset, tmp_path, capsys):
    # fp32 throughout, so that the runs agree to rounding: one process with 4 micro-steps; FSDP
    # with CPU offload in one process (a group of one: how a model too big for one GPU trains
    # there), killed at step 4 and resumed; and 2 offloaded ranks that reduce-scatter after
    # every micro-step. The same global batch in all three.
    common = [*TINY, f"--data_dir={dataset}", "--dtype=float32", "--eval_interval=4", "--max_iters=8", "--lr_decay_iters=8"]
    single, one, two = tmp_path / "single", tmp_path / "one", tmp_path / "two"
    run_inprocess([*common, f"--out_dir={single}", "--gradient_accumulation_steps=4"])
    offload = [*common, f"--out_dir={one}", "--gradient_accumulation_steps=4", "--parallel=fsdp", "--fsdp_cpu_offload=True"]
    run_inprocess([*offload, "--max_iters=4"])
    capsys.readouterr()
    run_inprocess(offload)
    log = capsys.readouterr().out
    assert "parallel: fsdp" in log and f"resumed from {one / 'ckpt_000004'}" in log
    assert sorted(p.name for p in one.glob("ckpt_*")) == ["ckpt_000004", "ckpt_000008"]  # sharded, as FSDP saves
    log = finish(torchrun([*common, f"--out_dir={two}", "--gradient_accumulation_steps=2", "--parallel=fsdp", "--fsdp_cpu_offload=True",
                           "--fsdp_reduce_every_micro_step=True"]))
    assert "fsdp_reduce_every_micro_step = True" in log
    reference = train_losses(single)
    assert sorted(reference) == list(range(1, 9))
    for run in (one, two):
        losses = train_losses(run)
        assert sorted(losses) == list(range(1, 9))
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), (run.name, step)


def test_offload_needs_fsdp_said_in_one_line(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'o'}", "--fsdp_cpu_offload=True"])
    assert exit_.value.code == 2
    assert "pass --parallel=fsdp too" in capsys.readouterr().err


def test_tokens_per_s_after_an_evaluation_leave_the_evaluation_out(dataset, tmp_path, monkeypatch):
    # The clock jumps 1000 s during every evaluation and save: the log after one must still
    # measure the steps only (it used to divide their tokens by the evaluation's time too).
    clock = {"offset": 0.0}
    real_clock, real_eval_and_save = time.perf_counter, train.eval_and_save

    def slow_eval_and_save(*args, **kwargs):
        real_eval_and_save(*args, **kwargs)
        clock["offset"] += 1000.0

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + clock["offset"])
    monkeypatch.setattr(train, "eval_and_save", slow_eval_and_save)
    out = tmp_path / "run"
    run_inprocess([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--log_interval=2", "--peak_flops=1e15"])
    assert clock["offset"] == 2000.0
    speeds = {r["step"]: r["tokens_per_s"] for r in metrics(out) if "tokens_per_s" in r}
    assert sorted(speeds) == [2, 4] and speeds[4] > 0.1 * speeds[2]  # not 2 x 4 x 32 tokens / 1000 s


def test_background_saves_copy_into_the_same_host_memory(tmp_path, monkeypatch):
    # One stager for every save: it keeps the host copy of each shard (pinned on a GPU machine)
    # and copies the next save into it, instead of allocating (and pinning) it again.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager

    stagers, real_async_save = [], dcp.async_save
    monkeypatch.setattr(dcp, "async_save", lambda *args, **kwargs: stagers.append(kwargs["async_stager"]) or real_async_save(*args, **kwargs))
    dist = fsdp_group_of_one()
    try:
        saver = checkpoint.ShardedSaver(background=True)
        weights = {"w": torch.arange(6.0)}
        for step in (1, 2):
            saver.save({"model": weights}, {"step": step}, str(tmp_path), step, keep=2, wait=False)
            weights["w"].add_(1.0)
        assert saver.wait() == str(tmp_path / "ckpt_000002")
        assert len(stagers) == 2 and stagers[0] is stagers[1] and isinstance(stagers[0], DefaultStager)
        assert stagers[0]._config.use_pinned_memory == torch.cuda.is_available()
        first, second = stagers[0].stage({"w": weights["w"]})["w"], stagers[0].stage({"w": weights["w"]})["w"]
        assert first.data_ptr() == second.data_ptr()  # a copy into the memory of the last one
        loaded = {"model": {"w": torch.empty(6)}}
        checkpoint.load_sharded(str(tmp_path / "ckpt_000002"), loaded)
        assert torch.equal(loaded["model"]["w"], torch.arange(6.0) + 1.0)  # step 2's weights, not later ones
        saver.close()
        assert saver._stager is None
    finally:
        dist.destroy_process_group()
