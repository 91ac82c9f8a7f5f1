"""What a careful user does to HomeLLM: bad input, kills, full disks, odd files, two runs in
one directory. Nothing may lose data, and every error is one line (exit 2 for a usage error,
1 for a runtime one). Numbers in the test names refer to the items of the issue that asked
for them."""

import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import export_hf
import hf as hflib
import prepare
import sample
import system
import train
from conftest import TINY, pickle_calling, shard_checkpoint, write_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]


def train_exit(argv, capsys) -> tuple[int, str, str]:
    """Run train.main in-process: (exit status, stdout, stderr)."""
    try:
        train.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_py(*args, **kwargs) -> subprocess.CompletedProcess:
    argv = [a if isinstance(a, bytes) else str(a) for a in args]  # bytes stay bytes: not-UTF-8 argv
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, timeout=300, **kwargs)


# ----------------------------------------------------------------------------- data loss


def test_1_overwrite_never_deletes_a_directory_that_is_not_our_dataset(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"документ номер {i}"}) + "\n" for i in range(50)), encoding="utf-8")
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    target = tmp_path / "P"
    (target / "src").mkdir(parents=True)
    (target / "src" / "main.py").write_text("x")
    (target / "meta.json").write_text('{"name": "x"}')
    args = ["--input", corpus, "--tokenizer", tok, "--out_dir", target, "--workers", 1, "--overwrite"]
    assert prepare.main([str(a) for a in args]) == 1
    assert "not a prepare.py dataset" in capsys.readouterr().err
    assert (target / "src" / "main.py").read_text() == "x" and (target / "meta.json").exists()


def run_to_step(dataset, out, max_iters, *extra, capsys=None):
    code, out_text, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", f"--max_iters={max_iters}", *extra], capsys)
    assert code == 0, err
    return out_text


def test_2_auto_resume_uses_the_newest_numbered_copy_when_ckpt_pt_is_gone(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 20, "--eval_interval=10", capsys=capsys)
    os.remove(out / "ckpt.pt")
    before = (out / "metrics.jsonl").read_text()
    log = run_to_step(dataset, out, 30, "--eval_interval=10", capsys=capsys)
    assert "resuming from the newest numbered copy" in log and "resumed from" in log and "at step 20" in log
    assert (out / "metrics.jsonl").read_text().startswith(before)  # the first 20 steps are kept
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 30


def test_2_unreadable_checkpoints_are_refused_not_overwritten(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 10, "--eval_interval=10", capsys=capsys)
    for path in out.glob("ckpt*.pt"):
        path.write_bytes(b"garbage")
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=20"], capsys)
    assert code == 1 and "none of them loads" in one_line_error(err)
    assert (out / "ckpt_000010.pt").read_bytes() == b"garbage"  # left for the user to rescue


def test_2_resume_never_moves_the_earlier_run_aside(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 10, "--eval_interval=10", capsys=capsys)
    old = (out / "ckpt.pt").read_bytes()
    log = run_to_step(dataset, out, 4, "--eval_interval=4", "--resume=never", capsys=capsys)
    [archive] = out.glob("previous-run-*")
    assert str(archive) in log
    assert (archive / "ckpt.pt").read_bytes() == old and (archive / "ckpt_000010.pt").exists() and (archive / "metrics.jsonl").exists()
    # D3: the archived run keeps its tokenizer and config, so it can be sampled once data_dir is gone
    ckpt = checkpoint.load_checkpoint(str(archive / "ckpt.pt"))
    assert checkpoint.checkpoint_tokenizer_path(ckpt, str(archive / "ckpt.pt")) == str(archive / "tokenizer.tiktoken")
    assert (archive / "config.json").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def test_3_no_checkpoint_is_written_during_a_nonfinite_streak(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 4, "--eval_interval=4", capsys=capsys)
    # lr 1e30: the update of step 4 sends the weights to ~1e30, every later loss is inf/nan.
    # Evaluations fall at steps 6 and 9, inside the streak: neither may save.
    code, out_text, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=3",
                                      "--learning_rate=1e30", "--min_lr=1e30", "--warmup_iters=0", "--nonfinite_patience=5"], capsys)
    assert code == 1
    assert "not saving a checkpoint" in out_text
    assert "the last checkpoint (step 4) is from before them" in one_line_error(err)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_w1_nonfinite_weights_or_evaluation_are_never_saved(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_to_step(dataset, out, 4, "--eval_interval=4", capsys=capsys)
    # Step 5's loss is finite, but its update leaves a NaN in the weights (as --learning_rate
    # =1e999 did, now refused as a setting): the evaluation after it must neither save them
    # nor claim an older checkpoint that is not there.
    real_update = train.update

    def update_that_wrecks(run, step, loss, grad_norm):
        finite = real_update(run, step, loss, grad_norm)
        if step + 1 == 5:
            with torch.no_grad():
                run.raw_model.norm.weight[0] = float("nan")
        return finite

    monkeypatch.setattr(train, "update", update_that_wrecks)
    wreck = [*TINY, f"--data_dir={dataset}", "--max_iters=30", "--eval_interval=1"]
    code, _, err = train_exit([*wreck, f"--out_dir={out}"], capsys)
    assert code == 1 and "step 5: the weights hold NaN or inf values; the last checkpoint (step 4) is from before them" in one_line_error(err)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt.pt", "ckpt_000004.pt"]
    code, _, err = train_exit([*wreck, f"--out_dir={tmp_path / 'fresh'}", "--eval_interval=5"], capsys)
    assert code == 1 and "no checkpoint was saved" in one_line_error(err) and not list((tmp_path / "fresh").glob("ckpt*"))
    # An evaluation that is not finite counts as non-finite too.
    monkeypatch.setattr(train, "evaluate", lambda run: {"val_loss": float("nan"), "val_ppl": float("nan"), "val_bpb": float("nan")})
    log = run_to_step(dataset, tmp_path / "nan_eval", 2, "--eval_interval=1", capsys=capsys)
    assert "step 2: not saving a checkpoint (end of training): the validation loss is not finite" in log
    assert not list((tmp_path / "nan_eval").glob("ckpt*"))


def test_w2_sample_and_export_refuse_a_tokenizer_the_checkpoint_was_not_trained_with(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "run"
    run_to_step(data, out, 2, "--eval_interval=2", capsys=capsys)
    # Same size, other text: bytes 0x61 "a" and 0x62 "b" trade ids.
    lines = (out / "tokenizer.tiktoken").read_text().splitlines()
    lines[0x61], lines[0x62] = lines[0x62].split()[0] + " 97", lines[0x61].split()[0] + " 98"
    (out / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    sample.main(["--out_dir", str(out), "--max_new_tokens", "2", "--seed", "1"])  # data_dir still has the right one
    capsys.readouterr()
    shutil.rmtree(data)
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--out_dir", str(out), "--max_new_tokens", "2", "--seed", "1"])
    phrase = f"the tokenizer file {out / 'tokenizer.tiktoken'} is not the one {out / 'ckpt.pt'} was trained with"
    assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:
        export_hf.main(["--out_dir", str(out), "--to", str(tmp_path / "hf")])
    assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err) and not (tmp_path / "hf").exists()


def test_a_sharded_checkpoint_from_a_stranger_cannot_run_code(tmp_path):
    # DCP's own reader unpickles .metadata with pickle.load; ours allows only DCP's index classes.
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt_000001"
    evil.mkdir()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / ".metadata").write_bytes(pickle.dumps(Exploit()))
    torch.save({"step": 1, "model_config": {}, "tokenizer": {}}, evil / "train_state.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"refusing to load .*ckpt_000001/.metadata: it holds Python objects \(posix.system\)"):
        checkpoint.load_checkpoint(str(evil))
    assert not marker.exists()


def plant_sharded(out: Path, name: str, metadata: bytes) -> Path:
    """out/NAME/: a sharded checkpoint directory with a real train_state.pt (from out/ckpt.pt)
    and the given index bytes."""
    planted = out / name
    planted.mkdir()
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["model"], state["optimizer"]
    torch.save(state, planted / "train_state.pt")
    (planted / ".metadata").write_bytes(metadata)
    return planted


def test_s1_a_planted_index_with_a_dotted_global_runs_nothing(dataset, tmp_path, capsys):
    # Protocol 4 lets a pickle name ("torch.distributed.checkpoint.filesystem", "os.system"):
    # an allowed module, and a dotted name that walks to os.system through its imports.
    out = tmp_path / "run"
    run_to_step(dataset, out, 4, "--eval_interval=4", capsys=capsys)
    marker = tmp_path / "pwned"
    plant_sharded(out, "ckpt_999999", pickle_calling("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"))
    refusal = "refusing to load"
    sample.main(["--out_dir", str(out), "--max_new_tokens", "2", "--seed", "1"])
    err = capsys.readouterr().err
    assert "passing over" in err and "ckpt_999999" in err and refusal in err and "ckpt.pt: step 4" in err
    export_hf.main(["--out_dir", str(out), "--to", str(tmp_path / "hf")])
    assert refusal in capsys.readouterr().err and (tmp_path / "hf" / "model.safetensors").exists()
    log = run_to_step(dataset, out, 6, "--eval_interval=2", capsys=capsys)
    assert f"cannot resume from {out / 'ckpt_999999'}: {refusal}" in log and "at step 4" in log
    assert not marker.exists()
    [aside] = out.glob("unloadable-*")  # moved out of the way: the run must not write over it
    assert (aside / "ckpt_999999" / ".metadata").exists()


def test_s2_a_sharded_checkpoints_byte_entries_cannot_run_code(dataset, tmp_path, capsys):
    # DCP's own load planner unpickles non-tensor values with weights_only=False.
    out = tmp_path / "run"
    run_to_step(dataset, out, 4, "--eval_interval=4", capsys=capsys)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard_checkpoint(out / "ckpt.pt", out / "ckpt_000004", weight_decay=Exploit())
    os.remove(out / "ckpt.pt")
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=6"], capsys)
    assert code == 1 and "refusing to load" in one_line_error(err) and "posix.system" in err
    assert not marker.exists()


def sharded_run(dataset, out, capsys) -> None:
    """out/ as an FSDP run leaves it after step 8: ckpt_000004/ and ckpt_000008/, no .pt files."""
    run_to_step(dataset, out, 8, "--eval_interval=4", capsys=capsys)
    for step in (4, 8):
        shard_checkpoint(out / f"ckpt_{step:06d}.pt", out / f"ckpt_{step:06d}")
    for path in out.glob("*.pt"):
        os.remove(path)


@pytest.mark.parametrize("damage, phrase", [
    ("train_state.pt", "incomplete: it has no train_state.pt"),  # D1
    ("__0_0.distcp", "its shard __0_0.distcp is missing"),  # T1
    ("truncate", "its shard __0_0.distcp is truncated"),  # T1
])
def test_d1_t1_a_damaged_sharded_checkpoint_is_passed_over_and_never_written_over(dataset, tmp_path, capsys, damage, phrase):
    out = tmp_path / "run"
    sharded_run(dataset, out, capsys)
    newest = out / "ckpt_000008"
    if damage == "truncate":
        os.truncate(newest / "__0_0.distcp", 1000)
    else:
        os.remove(newest / damage)
    kept = {p.name: p.read_bytes() for p in newest.iterdir()}
    with pytest.raises(SystemExit) as exit_:  # named explicitly: one line, no traceback
        sample.main(["--ckpt", str(newest)])
    assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err)
    sample.main(["--out_dir", str(out), "--max_new_tokens", "2", "--seed", "1"])  # the newest whole one
    assert f"passing over {newest}" in capsys.readouterr().err
    log = run_to_step(dataset, out, 12, "--eval_interval=4", capsys=capsys)
    assert f"cannot resume from {newest}: " in log and phrase in log and "at step 4" in log
    [aside] = out.glob("unloadable-*")
    assert {p.name: p.read_bytes() for p in (aside / "ckpt_000008").iterdir()} == kept
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 12


def test_d1_a_run_whose_sharded_checkpoints_all_lack_their_state_is_refused_untouched(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    sharded_run(dataset, out, capsys)
    for step in (4, 8):
        os.remove(out / f"ckpt_{step:06d}" / "train_state.pt")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=12", "--eval_interval=4"], capsys)
    assert code == 1 and "none of them loads" in one_line_error(err) and "no train_state.pt" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_d4_export_overwrite_refuses_runs_and_datasets(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    sharded_run(dataset, out, capsys)  # an FSDP run: config.json and the tokenizer sit among its ckpt_STEP/
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    targets = {out: "is a training run", ds: "is a prepared dataset"}
    before = {target: {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} for target in targets}
    for target, phrase in targets.items():
        with pytest.raises(SystemExit) as exit_:
            export_hf.main(["--ckpt", str(out / "ckpt_000008"), "--to", str(target), "--overwrite"])
        assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err)
        assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before[target]
    export_hf.main(["--ckpt", str(out / "ckpt_000008"), "--to", str(tmp_path / "hf")])
    with pytest.raises(SystemExit):  # import, too, would have replaced the run's tokenizer
        export_hf.main(["--import_from", str(tmp_path / "hf"), "--to", str(out), "--overwrite"])
    assert "is a training run" in one_line_error(capsys.readouterr().err)
    single = tmp_path / "single"
    run_to_step(dataset, single, 2, "--eval_interval=2", capsys=capsys)
    kept = (single / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit):  # --to FILE.pt over a run's own checkpoint
        export_hf.main(["--out_dir", str(single), "--to", str(single / "ckpt.pt"), "--overwrite"])
    assert "is a training checkpoint" in one_line_error(capsys.readouterr().err) and (single / "ckpt.pt").read_bytes() == kept


# ----------------------------------------------------------------------------- silent wrong results


def test_4_the_cpu_peak_probe_leaves_the_global_rng_alone():
    from hardware import measure_cpu_peak_flops

    torch.manual_seed(0)
    state = torch.get_rng_state()
    measure_cpu_peak_flops(0.01)
    assert torch.equal(torch.get_rng_state(), state)
    # (tests/test_train.py resumes a run with dropout bit-exactly, which needs exactly this)


def test_5_resume_refuses_a_dataset_with_another_tokenizer(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 2, "--eval_interval=2", capsys=capsys)
    # The same vocab size (257) but another id -> bytes mapping.
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    ranks = (other / "tokenizer.tiktoken").read_text().splitlines()
    swapped = [f"{line.split()[0]} {(int(line.split()[1]) + 1) % 256}" for line in ranks]
    (other / "tokenizer.tiktoken").write_text("\n".join(swapped) + "\n")
    kept = (out / "tokenizer.tiktoken").read_bytes()
    code, _, err = train_exit([*TINY, f"--data_dir={other}", f"--out_dir={out}", "--max_iters=4"], capsys)
    message = one_line_error(err)
    assert code == 1 and "not the one this run was trained with" in message and "--init_from=" in message
    assert (out / "tokenizer.tiktoken").read_bytes() == kept  # older checkpoints still decode right


@pytest.mark.parametrize("damage, phrase", [
    ("uint32", "truncated or rewritten"), ("truncate", "truncated or rewritten"), ("delete", "is missing"), ("big ids", "holds token id"),
])
def test_6_shards_are_checked_against_meta_json(dataset, tmp_path, capsys, damage, phrase):
    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    shard = broken / "train_000000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    if damage == "uint32":
        tokens.astype(np.uint32).tofile(shard)
    elif damage == "truncate":
        tokens[:-10].tofile(shard)
    elif damage == "delete":
        shard.unlink()
    else:
        tokens[len(tokens) // 2] = 60000
        tokens.tofile(shard)
    code, _, err = train_exit([*TINY, f"--data_dir={broken}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2"], capsys)
    assert code == 1 and phrase in one_line_error(err)


def test_t7_an_out_of_vocabulary_id_anywhere_in_a_big_shard_is_refused_at_start(dataset, tmp_path, capsys):
    # 3M tokens: a check that samples blocks of the shard (1M tokens in all) misses most of it,
    # and the run then dies with an IndexError whenever a window reaches the bad id.
    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    tokens = np.resize(np.fromfile(broken / "train_000000.bin", dtype=np.uint16), 3_000_000)
    tokens[200_000] = 60000
    tokens.tofile(broken / "train_000000.bin")
    meta = json.loads((broken / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["tokens"] = len(tokens)
    (broken / "meta.json").write_text(json.dumps(meta))
    code, _, err = train_exit([*TINY, f"--data_dir={broken}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2"], capsys)
    assert code == 1 and "train_000000.bin holds token id 60000 but the tokenizer has vocab_size=257" in one_line_error(err)


def test_6_a_vocab_size_below_the_tokenizers_is_refused_at_start(dataset, tmp_path, capsys):
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'run'}", "--vocab_size=100"], capsys)
    assert code == 1 and "is smaller than the dataset tokenizer's vocab_size=257" in one_line_error(err)


def test_7_rotation_keeps_the_newest_steps_by_number_not_name(tmp_path):
    for step in (999998, 999999):
        checkpoint.save_checkpoint({"step": step}, str(tmp_path), step, keep=2)
    checkpoint.save_checkpoint({"step": 1000000}, str(tmp_path), 1000000, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_1000000.pt", "ckpt_999999.pt"]
    assert checkpoint.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt.pt")
    os.remove(tmp_path / "ckpt.pt")
    assert checkpoint.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_1000000.pt")


def test_8_the_numbered_copy_is_independent_of_ckpt_pt(tmp_path):
    checkpoint.save_checkpoint({"step": 5, "w": torch.ones(100)}, str(tmp_path), 5, keep=2)
    assert os.stat(tmp_path / "ckpt.pt").st_ino != os.stat(tmp_path / "ckpt_000005.pt").st_ino
    with open(tmp_path / "ckpt.pt", "r+b") as f:  # damage in place, as a careless tool would
        f.truncate(10)
    assert torch.load(tmp_path / "ckpt_000005.pt", weights_only=True)["step"] == 5


# ----------------------------------------------------------------------------- one line, not a traceback


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "not gzip"])
def test_9_a_broken_gz_input_names_the_file(tmp_path, capsys, kind):
    data = gzip.compress(("".join(json.dumps({"text": f"строка {i} " * 20}) + "\n" for i in range(2000))).encode())
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes({"truncated": data[: len(data) // 2], "corrupt": data[:40] + b"\x00" * 200 + data[240:],
                      "not gzip": b"plain text, not gzip\n" * 10}[kind])
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    code = prepare.main(["--input", str(path), "--tokenizer", str(tok), "--out_dir", str(tmp_path / "out"), "--workers", "1", "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_9_absurdly_nested_json_is_a_counted_bad_line(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("[" * 100_000 + "\n" + json.dumps({"text": "нормальный документ"}) + "\n", encoding="utf-8")
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    code = prepare.main(["--input", str(path), "--tokenizer", str(tok), "--out_dir", str(tmp_path / "out"), "--workers", "1", "--val_fraction", "0"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"] == {"bad_json": 1} and meta["splits"]["train"]["documents"] == 1


def test_9_a_demo_rerun_over_a_corrupt_meta_json_is_one_line(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "meta.json").write_text("{corrupt")
    assert prepare.main(["--out_dir", str(out), "--max_docs", "3"]) == 1
    err = capsys.readouterr().err
    [error] = [line for line in err.splitlines() if "error" in line]
    assert "--overwrite" in error and "Traceback" not in err
    assert prepare.main(["--out_dir", str(out), "--max_docs", "3", "--overwrite"]) == 1
    assert "not a prepare.py dataset" in capsys.readouterr().err and (out / "meta.json").read_text() == "{corrupt"


@pytest.mark.parametrize("flag, phrase", [
    ("--n_kv_head=3", "n_head=4 is not divisible by n_kv_head=3"),
    ("--n_embd=30", "n_embd=30 is not divisible by n_head=4"),
    ("--batch_size=0", "batch_size=0 must be a positive integer"),
    ("--log_interval=0", "log_interval=0"), ("--eval_interval=-1", "eval_interval=-1"),
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps=0"), ("--eval_iters=0", "eval_iters=0"),
    ("--block_size=0", "block_size=0"), ("--learning_rate=-0.1", "learning_rate=-0.1 must not be negative"),
    ("--dropout=1.0", "dropout=1.0 must be in [0, 1)"), ("--device=tpu", "device='tpu' is not one of"),
    ("--out_dir=", "out_dir is empty"), ("--max_iters=-5", "max_iters=-5 must be a positive integer"),
    ("--seed=-1", "seed=-1 must be between 0 and"), ("--seed=" + "9" * 30, "must be between 0 and"),  # T3
    ("--dist_timeout_min=1e12", "dist_timeout_min=1e+12 must be at most 525600"),  # T5: a 128-line C++ trace
    ("--learning_rate=1e999", "learning_rate=inf must be a finite number"), ("--max_time_min=1e999", "max_time_min=inf must be a finite"),
])
def test_10_out_of_range_values_are_usage_errors(dataset, tmp_path, capsys, flag, phrase):
    code, out, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'o'}", flag], capsys)
    assert code == 2 and phrase in one_line_error(err) and out == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script, args, phrase", [
    ("prepare.py", ["--chunk_mb", "nan"], "prepare.py: error: --chunk_mb must be a positive number of MB, got nan"),  # T4
    ("prepare.py", ["--sp_sample_mb", "inf"], "prepare.py: error: --sp_sample_mb must be a positive number of MB, got inf"),
    ("prepare.py", ["--workers", "x"], "prepare.py: error: argument --workers: invalid int value: 'x'"),
    ("sample.py", ["--top_k", "x"], "error: argument --top_k: invalid int value: 'x'"),
    ("export_hf.py", ["--out_dir", "x"], "error: say what to write: --to DIR (Hugging Face), --to FILE.pt, or --gguf FILE.gguf"),
])
def test_bad_flags_are_one_line_without_the_usage_block(script, args, phrase):
    result = run_py(script, *args)
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and err.startswith(phrase) and "usage:" not in err, err


def test_10_an_out_dir_that_is_a_file_is_a_usage_error(dataset, tmp_path, capsys):
    (tmp_path / "f").write_text("not a directory")
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={tmp_path / 'f'}"], capsys)
    assert code == 2 and "is a file" in one_line_error(err)


def test_11_a_torn_last_metrics_line_does_not_block_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_to_step(dataset, out, 4, "--eval_interval=4", capsys=capsys)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 3.1')  # what a power loss mid-write leaves
    run_to_step(dataset, out, 6, "--eval_interval=6", capsys=capsys)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 6]  # train records 1..6, evals at 4 and 6


def test_11_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_to_step(dataset, out, 2, "--eval_interval=2", capsys=capsys)
    before = (out / "ckpt.pt").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"], capsys)
    assert code == 1 and "No space left on device" in one_line_error(err) and "intact" in err
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob("*.tmp.*"))


def make_sample_run(dataset, tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    run_to_step(dataset, out, 2, "--eval_interval=2", capsys=capsys)
    return out


def test_12_sample_refuses_bad_bytes_and_nan_temperature_and_survives_a_tiny_one(dataset, tmp_path, capsys):
    out = make_sample_run(dataset, tmp_path, capsys)
    bad = run_py("sample.py", "--out_dir", out, "--start", b"\xff\xfe caf\xe9")  # not UTF-8, as a Latin-1 terminal sends it
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1 and "not UTF-8" in bad.stderr.decode()
    for value in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit) as exit_:
            sample.main(["--out_dir", str(out), "--temperature", value])
        assert exit_.value.code == 2 and "--temperature" in one_line_error(capsys.readouterr().err)
    sample.main(["--out_dir", str(out), "--start", "кот", "--temperature", "1e-45", "--max_new_tokens", "8", "--seed", "1"])
    tiny = capsys.readouterr().out
    sample.main(["--out_dir", str(out), "--start", "кот", "--temperature", "0", "--max_new_tokens", "8"])
    assert tiny == capsys.readouterr().out  # a vanishing temperature is greedy, not nan


@pytest.mark.parametrize("seed", ["-1", "1" + "0" * 30])
def test_t3_sample_refuses_a_seed_out_of_range_in_one_line(dataset, tmp_path, capsys, seed):
    out = make_sample_run(dataset, tmp_path, capsys)
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--out_dir", str(out), "--seed", seed])
    assert exit_.value.code == 2 and "--seed=" in one_line_error(capsys.readouterr().err)


def test_12_an_absurd_model_config_is_refused_before_allocating(dataset, tmp_path, capsys):
    out = make_sample_run(dataset, tmp_path, capsys)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model_config"].update(n_layer=100_000, n_embd=8192, n_head=64, n_kv_head=64, vocab_size=10_000_000)  # ~80 TB
    torch.save(ckpt, out / "absurd.pt")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--ckpt", str(out / "absurd.pt")])
    assert exit_.value.code == 1 and "does not match its model_config" in one_line_error(capsys.readouterr().err)
    assert time.perf_counter() - start < 30


def hf_dir(tmp_path, config) -> Path:
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return path


LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("config, phrase", [
    ([1, 2, 3], "not an object"),
    (b"\xff\xfe{not utf-8", "not valid UTF-8 JSON"),
    (LLAMA | {"rope_scaling": "linear"}, "rope_scaling="),
    (LLAMA | {"quantization_config": "gptq"}, "quantization_config="),
])
def test_13_import_refuses_odd_configs_in_one_line(tmp_path, capsys, config, phrase):
    path = hf_dir(tmp_path, config)
    with pytest.raises(SystemExit) as exit_:
        export_hf.main(["--import_from", str(path), "--to", str(tmp_path / "out")])
    assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, files, phrase", [  # T6: each was a traceback (MemoryError for the header)
    ({**LLAMA, "rope_theta": [1, 2]}, {}, "rope_theta=[1, 2], which is not a number"),
    ({**LLAMA, "layer_types": 5}, {}, "a field has the wrong JSON type"),
    (LLAMA, {"model.safetensors": (2**45).to_bytes(8, "little") + b"{}"}, "the header claims 35,184,372,088,832 bytes of a 10-byte file"),
    (LLAMA, {"model.safetensors.index.json": b'{"weight_map": [1, 2]}'}, "has no weight_map from tensor names to file names"),
    (LLAMA, {"model.safetensors.index.json": b'{"weight_map": {"a": "../../secret"}}'}, "has no weight_map from tensor names"),
])
def test_t6_malformed_hf_folders_are_one_line(tmp_path, capsys, config, files, phrase):
    path = hf_dir(tmp_path, config)
    for name, data in files.items():
        (path / name).write_bytes(data)
    with pytest.raises(SystemExit) as exit_:
        export_hf.main(["--import_from", str(path), "--to", str(tmp_path / "out")])
    assert exit_.value.code == 1 and phrase in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_13_import_of_a_corrupt_safetensors_file_leaves_nothing_behind(tmp_path, capsys):
    path = hf_dir(tmp_path, LLAMA)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header")
    with pytest.raises(SystemExit):
        export_hf.main(["--import_from", str(path), "--to", str(tmp_path / "out")])
    assert "cannot read" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_13_import_refuses_a_file_as_destination(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from model import ModelConfig, Transformer

    path = hf_dir(tmp_path, LLAMA)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64, tie_embeddings=False))
    state = {hf: model.state_dict()[ours].contiguous() for ours, hf in hflib.hf_names(model.config).items()}
    save_file(state, str(path / "model.safetensors"))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit):
        export_hf.main(["--import_from", str(path), "--to", str(tmp_path / "taken")])
    assert "is a file" in one_line_error(capsys.readouterr().err) and (tmp_path / "taken").read_text() == "a file"
    # The same directory with a tokenizer that cannot be imported: the new --to is removed again.
    with pytest.raises(SystemExit):
        export_hf.main(["--import_from", str(path), "--to", str(tmp_path / "new")])
    assert "no tokenizer" in one_line_error(capsys.readouterr().err) and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- leftovers


def test_h4_symlink_loops_and_fifos_in_the_inputs_do_not_hang(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "a" / "b").mkdir(parents=True)
    (corpus / "a" / "one.jsonl").write_text(json.dumps({"text": "первый документ"}) + "\n", encoding="utf-8")
    (corpus / "a" / "b" / "two.jsonl").write_text(json.dumps({"text": "второй документ"}) + "\n", encoding="utf-8")
    os.symlink("..", corpus / "a" / "up")  # two loops: glob's ** walked 2^depth paths
    os.symlink("../..", corpus / "a" / "b" / "top")
    os.mkfifo(corpus / "a" / "pipe.jsonl")  # opening it for reading would wait for a writer forever
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    args = ["--tokenizer", str(tok), "--workers", "1", "--val_fraction", "0", "--no_progress"]
    for i, pattern in enumerate([f"{corpus}/**/*.jsonl", str(corpus)]):
        assert prepare.main(["--input", pattern, "--out_dir", str(tmp_path / f"ds{i}"), *args]) == 0
        err = capsys.readouterr().err
        assert "ignoring 1 file(s)" in err and "pipe.jsonl" in err
        meta = json.loads((tmp_path / f"ds{i}" / "meta.json").read_text())
        assert meta["splits"]["train"]["documents"] == 2  # each file once, however many links lead to it
    assert prepare.main(["--input", str(corpus / "a" / "pipe.jsonl"), "--out_dir", str(tmp_path / "ds9"), *args]) == 1
    assert "is not a regular file" in capsys.readouterr().err


def test_14_pool_workers_die_with_a_killed_parent(tmp_path):
    # The parent starts prepare.py's pool exactly as prepare.py does, reports the workers' pids,
    # then is killed with SIGKILL: no cleanup code of its own can run.
    script = (
        "import os, sys, time, prepare\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "pool = ProcessPoolExecutor(2, mp_context=prepare.mp_context(), initializer=prepare._default_sigint)\n"
        "futures = [pool.submit(time.sleep, 0.3) for _ in range(4)]\n"
        "[f.result() for f in futures]\n"
        "print(' '.join(str(p) for p in pool._processes), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(system.pid_alive(p) for p in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(system.pid_alive(p) and not is_zombie(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(system.pid_alive(p) and not is_zombie(p) for p in workers)


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_14_stale_work_dirs_of_killed_runs_are_removed_but_not_a_live_runs(tmp_path, capsys):
    import socket

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"строка {i}\n" for i in range(100)), encoding="utf-8")
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    stale, live, foreign = tmp_path / ".ds.tmp-dead", tmp_path / ".ds.tmp-live", tmp_path / ".ds.tmp-foreign"
    for path, owner in ((stale, f"{dead_pid()} {socket.gethostname()}"), (live, f"{os.getpid()} {socket.gethostname()}"), (foreign, None)):
        path.mkdir()
        (path / "train_000000.bin").write_bytes(b"x" * 100)
        if owner:
            (path / ".owner").write_text(owner)
    assert prepare.main(["--input", str(corpus), "--tokenizer", str(tok), "--out_dir", str(tmp_path / "ds"), "--workers", "1", "--val_fraction", "0"]) == 0
    assert not stale.exists() and live.exists() and foreign.exists()
    assert not (tmp_path / "ds" / ".owner").exists()


def test_d2_files_kept_from_a_replaced_dataset_are_never_cleaned_up_later(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"строка {i}\n" for i in range(100)), encoding="utf-8")
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    args = ["--input", str(corpus), "--tokenizer", str(tok), "--out_dir", str(tmp_path / "ds"), "--workers", "1", "--val_fraction", "0"]
    assert prepare.main(args) == 0
    check = prepare._check_out_dir

    def user_adds_a_file_meanwhile(out_dir, overwrite):
        check(out_dir, overwrite)
        (tmp_path / "ds" / "notes.txt").write_text("mine")

    monkeypatch.setattr(prepare, "_check_out_dir", user_adds_a_file_meanwhile)
    assert prepare.main([*args, "--overwrite"]) == 0
    [kept] = tmp_path.glob(".ds.old-*")
    assert f"kept in {kept}/dataset" in capsys.readouterr().err
    assert (kept / "dataset" / "notes.txt").read_text() == "mine" and not (kept / ".owner").exists()  # no longer ours to remove
    monkeypatch.setattr(prepare, "_check_out_dir", check)
    assert prepare.main([*args, "--overwrite"]) == 0
    assert (kept / "dataset" / "notes.txt").read_text() == "mine"


def test_15_stale_save_temp_files_are_removed(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f"ckpt.pt.tmp.{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    log = run_to_step(dataset, out, 2, "--eval_interval=2", capsys=capsys)
    assert not stale.exists() and f"removed {stale.name}" in log


def test_15_a_second_live_run_into_the_same_out_dir_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
         "f.write('pid 4242 on host elsewhere'); f.flush(); print('locked', flush=True); time.sleep(600)", str(out / "train.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = train_exit([*TINY, f"--data_dir={dataset}", f"--out_dir={out}", "--max_iters=2"], capsys)
        assert code == 1 and "in use by another training run (pid 4242 on host elsewhere)" in one_line_error(err)
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run_to_step(dataset, out, 2, "--eval_interval=2", capsys=capsys)  # a dead holder's lock is free at once


def test_16_a_val_split_shorter_than_a_window_is_warned_about(tmp_path, capsys):
    tok = tmp_path / "bytes.tiktoken"
    write_byte_tokenizer(tok)
    (tmp_path / "train.txt").write_text("".join(f"обучающая строка номер {i}\n" for i in range(400)), encoding="utf-8")
    (tmp_path / "val.txt").write_text("коротко\n", encoding="utf-8")
    data = tmp_path / "ds"
    assert prepare.main(["--input", str(tmp_path / "train.txt"), "--val_input", str(tmp_path / "val.txt"), "--tokenizer", str(tok),
                         "--out_dir", str(data), "--workers", "1"]) == 0
    capsys.readouterr()
    log = run_to_step(data, tmp_path / "run", 2, "--eval_interval=2", capsys=capsys)
    assert "warning: the val split" in log and "no val loss" in log and "--val_fraction" in log
