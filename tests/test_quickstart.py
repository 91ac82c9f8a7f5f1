"""The users' three commands, typed as they type them, in a fresh directory:
`python prepare.py`, `torchrun ... train.py config/X.py`, `python sample.py --start "Привет"`.
No --data_dir, no --out_dir: the preset finds the dataset a bare prepare.py wrote, and sample.py
finds the run that was just trained."""

import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A preset as a user would write one: a small model, its own out_dir, data_dir left to the default.
SMALL_PRESET = """
out_dir = "out-small"
n_layer = 2
n_head = 4
n_kv_head = 2
n_embd = 64
block_size = 64
batch_size = 4
max_iters = 6
eval_interval = 6
eval_iters = 2
log_interval = 2
device = "cpu"
compile = False
"""


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=600)
    assert result.returncode == 0, (cmd, result.stdout.decode(errors="replace")[-2000:], result.stderr.decode(errors="replace")[-2000:])
    return result


def test_prepare_then_torchrun_then_sample_in_russian(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "small.py").write_text(SMALL_PRESET)
    # 1. python prepare.py (on the first 60 documents of the shipped corpus, to keep this quick)
    run([sys.executable, str(REPO / "prepare.py"), "--max_docs", "60", "--no_progress"], tmp_path)
    assert (tmp_path / "data" / "demo" / "meta.json").exists()
    # 2. torchrun --nproc_per_node=2 train.py config/small.py
    port = str(29500 + random.randint(600, 900))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
         str(REPO / "train.py"), "config/small.py"], tmp_path)
    assert (tmp_path / "out-small" / "ckpt.pt").exists()
    # 3. python sample.py --start "Привет"
    result = run([sys.executable, str(REPO / "sample.py"), "--start", "Привет", "--seed", "1", "--max_new_tokens", "40"], tmp_path)
    text = result.stdout.decode("utf-8")  # strict: the stream is valid UTF-8
    assert text.startswith("Привет") and len(text) > len("Привет\n")
    note = result.stderr.decode("utf-8")
    assert os.path.join("out-small", "ckpt.pt") in note and "the run here that saved last" in note
