"""train.py on a weighted mixture of two prepared datasets (--data_dir="a:0.75,b:0.25"): the
windows drawn follow the weights, every source is evaluated, DDP equals one process, kill -9 and
resume is bit-exact, and datasets with different tokenizers are refused."""

import base64
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
from conftest import TINY
from dataset import open_mixture
from test_train import finish, metrics, run_inprocess, run_killed_and_resumed, torchrun, train_losses

DIGITS = set(b"0123456789 \n")


@pytest.fixture(scope="module")
def digits(dataset, tmp_path_factory) -> str:
    """A second dataset with the first one's (byte-level) tokenizer whose text is only digits and
    spaces, so that every window shows which dataset it came from."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    with open(root / "digits.txt", "w", encoding="utf-8") as f:
        for _ in range(600):
            f.write(" ".join(str(n) for n in rng.integers(0, 10_000, size=rng.integers(5, 30))) + "\n")
    out = root / "ds"
    assert prepare.main(["--input", str(root / "digits.txt"), "--tokenizer", os.path.join(dataset, "tokenizer.tiktoken"),
                         "--out_dir", str(out), "--val_fraction", "0.1", "--workers", "1", "--no_progress"]) == 0
    return str(out)


def is_digits(row: torch.Tensor) -> bool:
    return set(row.tolist()) <= DIGITS | {256}  # 256: the byte tokenizer's EOT


def test_a_step_draws_its_windows_by_weight_from_seed_and_step_alone(dataset, digits):
    train_data, val_data, _, _ = open_mixture([(dataset, 0.75), (digits, 0.25)], block_size=16, windows_per_eval=8)
    drawn = np.zeros(2, dtype=np.int64)
    for step in range(40):
        picks = train_data.sample([1337, step], 10)
        assert picks == train_data.sample([1337, step], 10) and picks != train_data.sample([1337, step + 1], 10)
        sources = [k for k, _, _ in picks]
        drawn += np.bincount(sources, minlength=2)
        assert abs(drawn[1] - 0.25 * 10 * (step + 1)) <= 1  # within one window of the weight at every step
        x, y = train_data.read(picks, torch.device("cpu"))  # rows come back in the order picked
        assert [int(is_digits(row)) for row in x] == sources and torch.equal(x[:, 1:], y[:, :-1])
    counts = train_data.count_tokens({}, 0, 40, 10)
    assert counts == {dataset: int(drawn[0]) * 16, digits: int(drawn[1]) * 16}
    assert train_data.count_tokens(train_data.count_tokens({}, 0, 17, 10), 17, 40, 10) == counts
    # One source draws exactly what its own TokenShards would: runs on one dataset are unchanged.
    single, _, _, _ = open_mixture([(dataset, 1.0)], block_size=16, windows_per_eval=8)
    assert [p[1:] for p in single.sample([1, 2], 7)] == single.sources[0].sample([1, 2], 7)
    assert len(val_data.sources) == 2 and val_data.sources[1].num_windows > 0


MIXED = [*TINY, "--dtype=float32", "--max_iters=50", "--eval_interval=10", "--batch_size=8"]


def test_a_mixture_trains_on_its_weights_and_reports_every_source(dataset, digits, tmp_path):
    out = tmp_path / "mix"
    run_inprocess([*MIXED, f"--data_dir={dataset}:0.75,{digits}:0.25", f"--out_dir={out}"])
    records = metrics(out)
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == 50 and sum(last["source_tokens"].values()) == last["tokens_seen"] == 50 * 8 * 32
    share = last["source_tokens"][digits] / last["tokens_seen"]
    assert share == pytest.approx(0.25, abs=0.01)  # 400 windows: within a few percent of the weight
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 5
    for r in evals:
        losses, bpbs = r["source_val_loss"], r["source_val_bpb"]
        assert set(losses) == set(bpbs) == {dataset, digits} and all(v > 0 for v in [*losses.values(), *bpbs.values()])
        assert r["val_loss"] == pytest.approx(0.75 * losses[dataset] + 0.25 * losses[digits], rel=1e-12)
        assert r["val_bpb"] == pytest.approx(0.75 * bpbs[dataset] + 0.25 * bpbs[digits], rel=1e-12)
    assert evals[-1]["source_val_loss"][digits] < evals[0]["source_val_loss"][digits]  # it learns both


def comparable(records: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("source_tokens"), r.get("source_val_loss")) for r in records]


def test_a_mixture_resumes_bit_exact_after_kill_9(dataset, digits, tmp_path):
    ref, cut = run_killed_and_resumed([*MIXED, f"--data_dir={dataset}:3,{digits}", "--block_size=64", "--eval_interval=5"], tmp_path)
    assert comparable(metrics(cut)) == comparable(metrics(ref))  # source_tokens included: right after the resume
    assert metrics(ref)[-1]["source_val_loss"].keys() == {dataset, digits}


def test_a_mixture_on_two_ranks_equals_one_process(dataset, digits, tmp_path):
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    args = [*MIXED, f"--data_dir={dataset}:0.75,{digits}:0.25", "--batch_size=4", "--max_iters=20"]
    proc = torchrun([*args, f"--out_dir={ddp}"])
    run_inprocess([*args, f"--out_dir={one}", "--gradient_accumulation_steps=2"])
    finish(proc)
    a, b = train_losses(one), train_losses(ddp)
    assert a.keys() == b.keys() == set(range(1, 21))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), step
    assert [r["source_tokens"] for r in metrics(one) if "loss" in r] == [r["source_tokens"] for r in metrics(ddp) if "loss" in r]
    val_one = [r["source_val_loss"] for r in metrics(one) if "val_loss" in r]
    val_ddp = [r["source_val_loss"] for r in metrics(ddp) if "val_loss" in r]
    assert len(val_one) == 2
    for x, y in zip(val_one, val_ddp, strict=True):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-4) for k in x)


def test_datasets_with_different_tokenizers_are_refused_naming_the_odd_one(dataset, digits, tmp_path, capsys):
    # The same bytes, numbered in another order: the same vocab size, a different tokenizer.
    other = tmp_path / "reversed.tiktoken"
    other.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {255 - b}\n" for b in range(256)))
    odd = tmp_path / "odd"
    (tmp_path / "t.txt").write_text("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n" * 50)
    assert prepare.main(["--input", str(tmp_path / "t.txt"), "--tokenizer", str(other), "--out_dir", str(odd),
                         "--val_fraction", "0", "--workers", "1", "--no_progress"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_inprocess([*TINY, f"--data_dir={dataset}:0.5,{digits}:0.3,{odd}:0.2", f"--out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and "\n" not in err
    assert err.startswith(f"error: {odd} was prepared with another tokenizer than {dataset}")
    assert f"--tokenizer {Path(dataset) / 'tokenizer.tiktoken'}" in err
    assert not (tmp_path / "o" / "ckpt.pt").exists()
