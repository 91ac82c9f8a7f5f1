"""tools/gpu_check.py without a GPU: it refuses in one line, and its --cpu_rehearsal runs every
check (prepare, train, torchrun with a kill -9 and a resume, CPU offload, decode against
transformers) on the CPU and prints the table. No test here needs, or uses, a GPU."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_check
import pytest

REPO = Path(__file__).resolve().parents[1]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a machine that has one


def test_it_refuses_in_one_line_where_pytorch_sees_no_gpu():
    done = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120, env=NO_GPU)
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(r"gpu_check\.py: error: PyTorch \S+ sees no CUDA GPU here \([^)]*\); run it on a machine with an NVIDIA GPU "
                        r"and a CUDA build of torch\n", done.stderr), done.stderr


def test_the_table_escapes_cells_and_marks_failures():
    rows = [gpu_check.Row("a", "1 | 2", "x"), gpu_check.Row("b", "exit 1", "y\nz", ok=False)]
    assert gpu_check.markdown_table(rows).splitlines() == [
        "| check | result | details |", "|---|---|---|", "| a | 1 \\| 2 | x |", "| b | **FAILED** exit 1 | y z |"]


def test_the_plan_is_read_from_dry_runs_output():
    plan = gpu_check.dry_run_plan(["config/home_200m.py", "--device=cuda", "--batch_size=4", "--data_dir=/nonexistent"])
    assert {"parameters", "gradients", "optimizer", "activations", "loss", "overhead", "total"} <= set(plan)
    assert abs(plan["total"] - sum(v for k, v in plan.items() if k != "total")) < 0.05  # (each part rounded to 0.01 GiB)
    offload = gpu_check.dry_run_plan(["config/home_200m.py", "--device=cuda", "--parallel=fsdp", "--fsdp_cpu_offload=True", "--data_dir=/nonexistent"])
    assert offload["parameters"] == 0 and offload["host memory"] > 3.0  # 16 bytes for each of ~220M parameters


@pytest.mark.slow
def test_a_cpu_rehearsal_runs_every_check(tmp_path):
    """The script's whole plumbing on the CPU: data, the two presets (as tiny models), the
    kill -9 of a 2-rank FSDP run and its resume, CPU offload in one process, decode against
    transformers. What it prints is the table a GPU run prints."""
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu_rehearsal", "--keep", str(tmp_path / "runs")], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=NO_GPU)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [row.split(" | ")[0] for row in rows] == ["| train home_25m", "| train home_200m", "| kill -9 and resume", "| --fsdp_cpu_offload step",
                                                       "| decode (sample.py --compile)", "| dtype and attention"]
    assert "FAILED" not in done.stdout
    train, _, resume, offload, decode, _ = rows
    assert re.search(r"[\d,]+ tok/s, MFU [\d.]+%", train) and "peak" in train and "vs plan" in train
    assert "max \\|loss difference\\| 0 over steps 1-12" in resume and "FSDP over 2 ranks" in resume and "resumed at step 6" in resume
    assert re.search(r"loss [\d.]+ at step 4", offload) and "in host memory" in offload
    if importlib.util.find_spec("transformers"):  # a dev extra: CI has it
        assert re.search(r"tok/s transformers", decode) and re.search(r"the first (\d+) of \1 greedy tokens agree", decode)
    assert (tmp_path / "runs" / "cut" / "ckpt_000012").is_dir()  # --keep kept the runs
