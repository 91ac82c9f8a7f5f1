"""bench.py on tiny inputs: the tables it prints have real, consistent numbers."""

import importlib.util
import json
import random

import pytest
import torch

import bench


def test_train_bench_reports_throughput_and_mfu(tmp_path, capsys):
    out = tmp_path / "bench.md"
    # float32: --dtype auto picks bf16 on CPUs with AMX, whose peak is so high that a tiny
    # model's MFU rounds to 0.0% on a busy machine
    bench.main(["train", "--config", "config/tiny_cpu.py", "--vocab_size", "512", "--batch_size", "2",
                "--block_size", "64", "--steps", "2", "--warmup", "1", "--dtype", "float32", "--append", str(out)])
    text = out.read_text()
    assert text.strip() in capsys.readouterr().out  # what is appended is what was printed
    row = text.strip().splitlines()[-1].split(" | ")
    header = [h.strip(" |") for h in text.strip().splitlines()[-3].split(" | ")]
    values = dict(zip(header, (v.strip(" |") for v in row)))
    assert values["config"] == "config/tiny_cpu.py" and values["batch"] == "2x64" and values["dtype"] == "float32"
    assert float(values["tokens_per_s"]) > 0 and 0 < float(values["mfu_pct"]) < 100
    assert "torch" in text and "CPU:" in text  # machine details go with the numbers


def test_generate_bench_compares_cached_uncached_and_transformers(tmp_path):
    cfg = tmp_path / "small.py"
    cfg.write_text("n_layer = 2\nn_head = 4\nn_kv_head = 2\nn_embd = 32\nblock_size = 64\n")
    rows = bench.bench_generate(str(cfg), bench.pick_device("cpu"), prompt_len=4, new_tokens=8, vocab_size=100, repeats=2)
    with_hf = importlib.util.find_spec("transformers") is not None  # a dev extra: CI has it
    assert [r["mode"] for r in rows] == ["KV cache"] + ["transformers generate"] * with_hf + ["no cache"]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 8 and r["dtype"] == "float32" for r in rows)
    # transformers' LlamaForCausalLM built from our weights picks the very same greedy tokens
    assert all(r["same_tokens"] == "same" for r in rows)
    assert all(r["same_as_transformers"] == "same" for r in rows) if with_hf else all("same_as_transformers" not in r for r in rows)
    assert [r["runs"] for r in rows] == [2] * (1 + with_hf) + [1]
    assert (rows[0]["vs_transformers"] > 0) if with_hf else rows[0]["vs_transformers"] == ""


def test_first_difference_names_the_first_differing_token():
    a = torch.tensor([[1, 2, 3, 4]])
    assert bench.first_difference(a, a.clone()) == "same"
    assert bench.first_difference(a, torch.tensor([[1, 2, 9, 4]])) == "differ from token 2 of 4"
    assert bench.first_difference(a, torch.tensor([[1, 2]])) == "differ from token 2 of 4"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_prepare_bench_rows_on_a_tiny_corpus(tmp_path, suffix):
    rng = random.Random(0)
    words = ["привет", "мир", "дом", "the", "cat", "sat", "on", "a", "mat"]
    docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    path = tmp_path / f"c{suffix}"
    if suffix == ".parquet":  # the parquet reader measured like the others, on the same text
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=50)
    else:
        path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    assert bench.read_documents([str(path)]) == docs
    rows = bench.benchmark_prepare([str(path)], "sp:300", workers=2)
    assert [r["run"].split(" ")[0] for r in rows] == ["raw", "prepare.py", "prepare.py", "reading", "prepare.py"]
    assert rows[3]["MB/s"] > rows[0]["MB/s"]  # reading alone outpaces the tokenizer
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row, as the markdown table needs
    assert all(r["MB/s"] > 0 and r["workers"] == 2 for r in rows)
    assert rows[1]["peak RSS MB, largest process"] > 10
