"""Tests for prepare.py: tiny corpora generated here, tiny vocabularies, no network, no ../shared."""

import base64
import gzip
import json
import lzma
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import corpus as corpus_module
import dataset
import prepare
import tokenizer
from conftest import load_dataset_tokenizer, token_bytes

REPO = Path(__file__).resolve().parent.parent

RU = (
    "Съешь же ещё этих мягких французских булок да выпей чаю Широкая электрификация южных "
    "губерний даст мощный толчок подъёму сельского хозяйства В чащах юга жил бы цитрус"
).split()
EN = "The quick brown fox jumps over the lazy dog pack my box with five dozen liquor jugs".split()
SEPARATORS = [" ", " ", " ", "  ", "\n", "\t", ", ", ".\n\n", "\n    ", "   "]

# Documents that break tokenizers which normalize or mishandle whitespace.
EDGE_DOCS = [
    "  two leading spaces and trailing ones  ",
    "def f(x):\n    if x:\n\t\treturn 'таб'\n    return None\n",
    "Windows\r\nline\r\nendings\r\n",
    "literal <|endoftext|> and </s> must stay plain text",
    "emoji 😀, math 𝔘, nbsp\u00a0here, ligature ﬁ, ё vs е\u0308, й vs и\u0306",
    "\n\n\nonly newlines around\n\n",
    "ÄÖÜ ß € — «ёлки-палки» №5",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(RU + EN) for _ in range(rng.randint(3, 40))]
        text = words[0]
        for w in words[1:]:
            text += rng.choice(SEPARATORS) + w
        docs.append(f"{i}. {text}")
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}, ensure_ascii=False) + "\n")
    return path


def run(*args: str) -> int:
    return prepare.main([*map(str, args), "--no_progress"])


def read_split(out_dir: Path, split: str) -> list[str]:
    """Decode a split's shards back into documents, checking the EOT layout on the way."""
    meta = dataset.load_meta(str(out_dir))
    tok = load_dataset_tokenizer(str(out_dir))
    parts = [np.memmap(out_dir / s["file"], dtype=meta["dtype"], mode="r") for s in meta["splits"][split]["shards"]]
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=meta["dtype"])
    assert len(ids) == meta["splits"][split]["tokens"]
    docs, start = [], 0
    for end in np.flatnonzero(ids == meta["eot_id"]):
        docs.append(tok.decode(ids[start:end].tolist()))
        start = end + 1
    assert start == len(ids), "every document must end with the EOT token"
    assert len(docs) == meta["splits"][split]["documents"]
    return docs


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.bin"))}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300) + EDGE_DOCS
    return write_jsonl(d / "mixed.jsonl", docs), docs


@pytest.fixture(scope="module")
def sp_dataset(corpus, tmp_path_factory) -> Path:
    """One trained sp:512 dataset shared by tests that only need some SentencePiece model."""
    path, _ = corpus
    out = tmp_path_factory.mktemp("sp") / "ds"
    assert run("--input", path, "--tokenizer", "sp:512", "--out_dir", out, "--workers", 1, "--val_fraction", 0.2) == 0
    return out


# ----------------------------------------------------------------------------- round trips


def test_sentencepiece_round_trip_cyrillic_and_latin(corpus, sp_dataset):
    _, docs = corpus
    meta = json.loads((sp_dataset / "meta.json").read_text(encoding="utf-8"))
    assert meta["format_version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 512
    info = meta["tokenizer"]
    assert info["kind"] == "sentencepiece" and info["spec"] == "sp:512" and info["file"] == "tokenizer.model"
    assert (sp_dataset / "tokenizer.model").is_file()
    assert meta["eot_id"] == info["eot_id"]
    train, val = read_split(sp_dataset, "train"), read_split(sp_dataset, "val")
    assert val, "val_fraction 0.2 of 307 documents must pick some"
    assert sorted(train + val) == sorted(docs)
    val_set = set(val)
    assert train == [d for d in docs if d not in val_set]  # input order is kept
    assert val == [d for d in docs if d in val_set]
    for split, texts in (("train", train), ("val", val)):
        assert meta["splits"][split]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        for shard in meta["splits"][split]["shards"]:
            assert (sp_dataset / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert meta["skipped"] == {} and meta["invalid_utf8"] == 0
    assert meta["inputs"] == [str(corpus[0])] and meta["val_inputs"] == []
    assert "prepare.py" in meta["command"] and meta["created_utc"].endswith("Z")


def test_tokenizer_wrapper_is_exact_on_code_and_cyrillic(sp_dataset):
    tok = load_dataset_tokenizer(str(sp_dataset))
    assert tok.kind == "sentencepiece" and tok.bos_id is None
    for text in EDGE_DOCS + ["Привет,\tмир!\n\n    отступ  и  пробелы  \n"]:
        ids = tok.encode(text)
        assert tok.eot_id not in ids
        assert tok.decode(ids) == text
        assert b"".join(token_bytes(tok, i) for i in ids) == text.encode("utf-8")
    assert token_bytes(tok, tok.eot_id) == b""
    assert tok.encode_batch(["a b", "в г"]) == [tok.encode("a b"), tok.encode("в г")]


def test_sentencepiece_trained_without_spaces_still_round_trips_spaces(tmp_path):
    path = write_jsonl(tmp_path / "nospace.jsonl", ["привет", "мир", "котик"] * 20)
    out = tmp_path / "out"
    assert run("--input", path, "--tokenizer", "sp:300", "--out_dir", out, "--workers", 1, "--val_fraction", 0) == 0
    tok = load_dataset_tokenizer(str(out))
    for text in ("a b  c", "  мир \n\t x"):
        assert tok.decode(tok.encode(text)) == text


def test_existing_sentencepiece_model_is_reused(corpus, sp_dataset, tmp_path):
    path, docs = corpus
    out = tmp_path / "reuse"
    assert run("--input", path, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out,
               "--workers", 1, "--val_fraction", 0.2) == 0
    assert (out / "tokenizer.model").read_bytes() == (sp_dataset / "tokenizer.model").read_bytes()
    assert shard_bytes(out) == shard_bytes(sp_dataset)


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_a_huge_document_is_encoded_in_pieces_to_the_same_tokens(corpus, sp_dataset, tmp_path, monkeypatch, capsys, kind):
    # Issue 21 H3: a tokenizer's memory grows many times faster than its input (a 100 MB
    # document peaked at 3 GB). Documents past LONG_TEXT (made tiny here) are encoded in pieces
    # cut where the tokens stay exactly those of a whole encode.
    if kind == "sentencepiece":
        tok = sp_dataset / "tokenizer.model"
    else:
        tok = tmp_path / "bytes.tiktoken"
        tok.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    _, docs = corpus
    huge = "".join(docs)  # newlines, runs of spaces and tabs, Cyrillic, code: ~30 KB
    path = write_jsonl(tmp_path / "c.jsonl", docs[:50] + [huge] + docs[50:])
    args = ["--input", path, "--tokenizer", tok, "--workers", 1, "--val_fraction", 0]
    assert run(*args, "--out_dir", tmp_path / "whole") == 0
    monkeypatch.setattr(prepare, "LONG_TEXT", 2000)
    assert run(*args, "--out_dir", tmp_path / "pieces") == 0
    assert shard_bytes(tmp_path / "pieces") == shard_bytes(tmp_path / "whole")
    assert "note:" not in capsys.readouterr().err
    # No newline or space to cut at: a counted cut, and the text still comes back whole.
    path = write_jsonl(tmp_path / "c.jsonl", docs[:5] + ["ы" * 5000])
    assert run("--input", path, "--tokenizer", tok, "--workers", 1, "--val_fraction", 0, "--out_dir", tmp_path / "cut") == 0
    assert "found no place that keeps the tokens exactly" in capsys.readouterr().err
    assert read_split(tmp_path / "cut", "train") == docs[:5] + ["ы" * 5000]


def test_txt_gz_lines_directories_globs_and_file_mode(sp_dataset, tmp_path):
    docs = make_docs(40, seed=1)
    flat = [d.replace("\n", " ") for d in docs]  # line mode: one document per line
    src = tmp_path / "src" / "nested"
    src.mkdir(parents=True)
    with gzip.open(src / "a.txt.gz", "wt", encoding="utf-8", newline="") as f:
        f.write("\r\n".join(flat[:20]) + "\r\n")  # CRLF endings are not part of the documents
    (src / "b.txt").write_text("\n".join(flat[20:]), encoding="utf-8")  # no final newline
    (src / "notes.md").write_text("ignored", encoding="utf-8")
    tok = sp_dataset / "tokenizer.model"
    out = tmp_path / "lines"
    assert run("--input", tmp_path / "src", "--tokenizer", tok, "--out_dir", out, "--workers", 1, "--val_fraction", 0) == 0
    assert read_split(out, "train") == flat and read_split(out, "val") == []
    assert dataset.load_meta(str(out))["splits"]["val"]["shards"] == []

    out_glob = tmp_path / "glob"
    assert run("--input", str(tmp_path / "src" / "**" / "*.txt*"), "--tokenizer", tok, "--out_dir", out_glob,
               "--workers", 1, "--val_fraction", 0) == 0
    assert read_split(out_glob, "train") == flat

    # --txt_mode file: each file is one document, newlines and all.
    files = tmp_path / "files"
    files.mkdir()
    for i, d in enumerate(docs[:5]):
        (files / f"{i}.txt").write_text(d, encoding="utf-8", newline="")
    out_files = tmp_path / "whole"
    assert run("--input", files, "--txt_mode", "file", "--tokenizer", tok, "--out_dir", out_files,
               "--workers", 1, "--val_fraction", 0) == 0
    assert read_split(out_files, "train") == docs[:5]


def test_separate_val_input(sp_dataset, tmp_path):
    train_docs, val_docs = make_docs(30, seed=2), make_docs(7, seed=3)
    tr = write_jsonl(tmp_path / "tr.jsonl", train_docs)
    va_gz = tmp_path / "va.jsonl.gz"
    va_gz.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in val_docs).encode()))
    out = tmp_path / "out"
    assert run("--input", tr, "--val_input", va_gz, "--tokenizer", sp_dataset / "tokenizer.model",
               "--out_dir", out, "--workers", 1) == 0
    assert read_split(out, "train") == train_docs
    assert read_split(out, "val") == val_docs
    meta = dataset.load_meta(str(out))
    assert meta["val_inputs"] == [str(va_gz)] and meta["val_fraction"] == 0.0


def test_xz_inputs_and_their_default_out_dir(sp_dataset, tmp_path, monkeypatch):
    docs, lines = make_docs(30, seed=4), [d.replace("\n", " ") for d in make_docs(10, seed=5)]
    src = tmp_path / "src"
    src.mkdir()
    jsonl = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    (src / "books.jsonl.xz").write_bytes(lzma.compress(jsonl.encode()))
    (src / "lines.txt.xz").write_bytes(lzma.compress("\n".join(lines).encode()))
    monkeypatch.chdir(tmp_path)
    assert run("--input", src / "books.jsonl.xz", src / "lines.txt.xz", "--tokenizer", sp_dataset / "tokenizer.model",
               "--workers", 1, "--val_fraction", 0) == 0
    assert read_split(tmp_path / "data" / "books", "train") == docs + lines


# ----------------------------------------------------------------------------- parquet and zstd


def write_parquet_corpus(root: Path) -> tuple[list[str], dict[str, int], list]:
    """Three parquet files in root/pq/ (several row groups each): good rows interleaved with
    nulls, empty strings and invalid UTF-8, a file whose text column holds numbers, and one
    without a text column. Returns the good documents in input order, the expected skips and
    the rows of the first file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = root / "pq"
    src.mkdir()
    docs = make_docs(120, seed=7) + EDGE_DOCS
    rows: list = []
    for i, d in enumerate(docs):
        rows.append(d)
        rows += [None] if i % 9 == 0 else [""] if i % 13 == 0 else []
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), src / "a.parquet", row_group_size=17)
    # b: large_string text with one invalid UTF-8 row (parquet readers do not check UTF-8)
    raw = [d.encode() for d in docs[:5]] + [b"bad \xff byte"]
    offsets = np.cumsum([0] + [len(r) for r in raw]).astype(np.int64)
    bad = pa.LargeStringArray.from_buffers(len(raw), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw)))
    pq.write_table(pa.table({"text": bad}), src / "b.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": [1, None, 3]}), src / "c_numbers.parquet")
    pq.write_table(pa.table({"content": ["no text column", "here"]}), src / "d_other_column.parquet")
    # e: one row group (pandas' default), which several workers still share, a piece each
    many = make_docs(80, seed=9)
    pq.write_table(pa.table({"text": many[:40] + [None] + many[40:]}), src / "e_one_group.parquet")
    good = docs + docs[:5] + ["bad \ufffd byte"] + many
    nulls, empties = sum(r is None for r in rows) + 1, sum(r == "" for r in rows)
    return good, {"empty_text": empties, "missing_text_key": 2, "null_text": nulls + 1, "text_not_string": 2}, rows


def test_parquet_row_groups_and_files_round_trip_count_bad_rows_and_ignore_workers(sp_dataset, tmp_path):
    good, skipped, rows = write_parquet_corpus(tmp_path)
    tok = sp_dataset / "tokenizer.model"
    one_group = corpus_module.find_input_files([str(tmp_path / "pq" / "e_one_group.parquet")], "line", "auto")
    pieces = [p for task, _ in corpus_module.iter_tasks(one_group, 1000, None) for _, _, p in task]
    assert len(pieces) == corpus_module.MAX_PIECES_PER_GROUP and sum(p.rows for p in pieces) == 81
    outs = []
    for workers in (1, 2):  # tiny tasks: two workers read row groups of one file out of order
        out = tmp_path / f"w{workers}"
        assert run("--input", tmp_path / "pq", "--tokenizer", tok, "--out_dir", out, "--workers", workers,
                   "--val_fraction", 0.2, "--chunk_mb", 0.001) == 0
        outs.append(out)
    assert shard_bytes(outs[0]) == shard_bytes(outs[1])
    meta = dataset.load_meta(str(outs[1]))
    assert meta["skipped"] == skipped and meta["invalid_utf8"] == 1
    threshold = prepare.val_threshold(0.2)
    assert read_split(outs[1], "val") == [d for d in good if prepare.is_val_document(d.encode(), threshold)]
    assert read_split(outs[1], "train") == [d for d in good if not prepare.is_val_document(d.encode(), threshold)]
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in good)
    # The same text as .jsonl gives the same shards: parquet is only another container.
    write_jsonl(tmp_path / "good.jsonl", good)
    out = tmp_path / "as_jsonl"
    assert run("--input", tmp_path / "good.jsonl", "--tokenizer", tok, "--out_dir", out, "--workers", 1, "--val_fraction", 0.2) == 0
    assert shard_bytes(out) == shard_bytes(outs[0])
    # --max_docs counts rows, bad ones included; sp:N trains on a parquet sample.
    out = tmp_path / "max"
    assert run("--input", tmp_path / "pq" / "a.parquet", "--tokenizer", "sp:512", "--out_dir", out, "--workers", 2,
               "--val_fraction", 0, "--max_docs", 40, "--chunk_mb", 0.001) == 0
    assert read_split(out, "train") == [r for r in rows[:40] if r]


def test_zstd_jsonl_and_txt_round_trip_and_a_truncated_file_is_named(corpus, sp_dataset, tmp_path, capsys):
    import zstandard

    path, docs = corpus
    lines = [d.replace("\n", " ").replace("\r", " ") for d in make_docs(25, seed=8)]
    data = path.read_bytes()
    # Two concatenated frames, as `cat a.zst b.zst` makes: both are read.
    cut = data.index(b"\n", len(data) // 2) + 1
    zst = tmp_path / "mixed.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(data[:cut]) + zstandard.ZstdCompressor(level=19).compress(data[cut:]))
    txt = tmp_path / "lines.txt.zst"
    txt.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    tok = sp_dataset / "tokenizer.model"
    out = tmp_path / "out"
    assert run("--input", zst, "--tokenizer", tok, "--out_dir", out, "--workers", 2, "--val_fraction", 0.2, "--chunk_mb", 0.002) == 0
    assert shard_bytes(out) == shard_bytes(sp_dataset)  # byte for byte what the plain .jsonl gave
    assert run("--input", txt, "--tokenizer", tok, "--out_dir", tmp_path / "txt", "--workers", 1, "--val_fraction", 0) == 0
    assert read_split(tmp_path / "txt", "train") == lines
    capsys.readouterr()

    truncated = tmp_path / "cut.jsonl.zst"
    truncated.write_bytes(zst.read_bytes()[: len(zst.read_bytes()) - 50])
    garbage = tmp_path / "garbage.txt.zst"
    garbage.write_bytes(b"not zstd at all\n" * 100)
    for bad in (truncated, garbage):
        assert run("--input", bad, "--tokenizer", tok, "--out_dir", tmp_path / "bad", "--workers", 1) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"prepare.py: error: {bad} cannot be decompressed")
        assert "truncated or corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("suffix, package", [(".parquet", "pyarrow"), (".jsonl.zst", "zstandard")])
def test_a_missing_optional_package_is_one_line_naming_it(sp_dataset, tmp_path, monkeypatch, capsys, suffix, package):
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(b"whatever")
    (tmp_path / "plain.jsonl").write_text('{"text": "no package needed"}\n', encoding="utf-8")
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")] or [package]:
        monkeypatch.setitem(sys.modules, module, None)  # `import pyarrow` now fails as if not installed
    with pytest.raises(ImportError):
        __import__(package)
    tok = sp_dataset / "tokenizer.model"
    assert run("--input", tmp_path, "--tokenizer", tok, "--out_dir", tmp_path / "out", "--workers", 1) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"prepare.py: error: reading {suffix[suffix.rindex('.'):]} files ({path}) needs the {package} package, "
                   f"which is not installed: pip install {package}")
    # Nothing else needs it.
    assert run("--input", tmp_path / "plain.jsonl", "--tokenizer", tok, "--out_dir", tmp_path / "out", "--workers", 1,
               "--val_fraction", 0) == 0


def test_an_interrupted_parquet_run_stops_cleanly(sp_dataset, tmp_path, monkeypatch):
    write_parquet_corpus(tmp_path)
    calls = []
    real_write = dataset.ShardWriter.write

    def interrupted_write(self, tokens):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # what Ctrl-C (or prepare.py's SIGTERM handler) raises
        real_write(self, tokens)

    monkeypatch.setattr(dataset.ShardWriter, "write", interrupted_write)
    out = tmp_path / "ds"
    assert run("--input", tmp_path / "pq", "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out,
               "--workers", 2, "--chunk_mb", 0.001) == 130
    assert not out.exists() and no_leftovers(tmp_path)


def test_a_tiny_validation_split_gets_a_warning_that_names_the_fix(corpus, sp_dataset, tmp_path, capsys):
    path, _ = corpus
    tok = sp_dataset / "tokenizer.model"
    assert run("--input", path, "--tokenizer", tok, "--out_dir", tmp_path / "a", "--workers", 1, "--val_fraction", 0.05) == 0
    val_docs = dataset.load_meta(str(tmp_path / "a"))["splits"]["val"]["documents"]
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the validation split")]
    assert len(warning) == 1 and f"({val_docs} documents)" in warning[0]
    assert "raise --val_fraction (now 0.05) or pass --val_input" in warning[0]
    val = write_jsonl(tmp_path / "va.jsonl", make_docs(3, seed=9))
    assert run("--input", path, "--val_input", val, "--tokenizer", tok, "--out_dir", tmp_path / "b", "--workers", 1) == 0
    err = capsys.readouterr().err
    assert "(3 documents)" in err and "so its loss will be noisy; pass a larger --val_input." in err
    # The size the warning compares against is one evaluation with train.py's defaults.
    from configurator import TrainConfig

    c = TrainConfig()
    assert prepare.ONE_EVAL_TOKENS == c.eval_iters * c.batch_size * (c.block_size + 1)


def test_tokenizer_sample_is_bounded_and_spread_over_the_file(tmp_path):
    docs = make_docs(2000, seed=4)
    path = write_jsonl(tmp_path / "big.jsonl", docs)
    files = prepare.find_input_files([str(path)], "line", "auto")
    budget, threshold = 20_000, prepare.val_threshold(0.1)
    sample = list(prepare.sample_documents(files, budget, "text", threshold, None))
    assert 0 < sum(len(s.encode()) for s in sample) <= budget < files[0].size
    picked = [int(s.split(".")[0]) for s in sample]
    assert min(picked) < 100 and max(picked) > 1750  # not just the head of the file
    whole = [s for s in sample if s in set(docs)]
    assert len(sample) - len(whole) <= 8  # at most the last document of each window is cut short
    assert not any(prepare.is_val_document(s.encode(), threshold) for s in whole)
    out = tmp_path / "out"
    assert run("--input", path, "--tokenizer", "sp:400", "--sp_sample_mb", 0.05, "--out_dir", out, "--workers", 1) == 0
    assert sorted(read_split(out, "train") + read_split(out, "val")) == sorted(docs)


def test_max_docs_counts_input_records(sp_dataset, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    out = tmp_path / "out"
    assert run("--input", bad, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out,
               "--workers", 1, "--val_fraction", 0, "--max_docs", 7) == 0
    meta = dataset.load_meta(str(out))
    assert read_split(out, "train") == ["good one"] and sum(meta["skipped"].values()) == 6
    assert meta["max_docs"] == 7


# ----------------------------------------------------------------------------- tiktoken


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    with open(path, "wb") as f:
        for token, rank in ranks.items():
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return path


def test_tiktoken_file_small_vocab_is_uint16(corpus, tmp_path):
    path, docs = corpus
    ranks = {bytes([b]): b for b in range(256)}
    for merge in ("th", "the", " the", "пр".encode("utf-8"), "  ", "    "):
        ranks[merge.encode() if isinstance(merge, str) else merge] = len(ranks)
    out = tmp_path / "tt"
    assert run("--input", path, "--tokenizer", write_tiktoken(tmp_path / "small.tiktoken", ranks),
               "--out_dir", out, "--workers", 1, "--val_fraction", 0.2) == 0
    meta = dataset.load_meta(str(out))
    info = meta["tokenizer"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(ranks) + 1
    assert info["kind"] == "tiktoken" and info["name"] is None and info["file"] == "tokenizer.tiktoken"
    assert info["special_tokens"] == {"<|endoftext|>": len(ranks)} == {"<|endoftext|>": meta["eot_id"]}
    assert info["pat_str"] == tokenizer.DEFAULT_TIKTOKEN_PATTERN
    assert sorted(read_split(out, "train") + read_split(out, "val")) == sorted(docs)
    tok = load_dataset_tokenizer(str(out))
    text = "the Привет"
    assert b"".join(token_bytes(tok, i) for i in tok.encode(text)) == text.encode()
    assert token_bytes(tok, tok.eot_id) == b""


def test_tiktoken_vocab_over_65536_is_uint32(tmp_path):
    # Every 2-byte sequence gets a rank below 65536 and the single bytes come after, so any
    # leftover byte becomes an id > 65535: uint16 would silently corrupt it.
    ranks = {bytes([a, b]): a * 256 + b for a in range(256) for b in range(256)}
    ranks.update({bytes([b]): 65536 + b for b in range(256)})
    docs = ["Ё", "Привет, мир!", "odd", "ab", *EDGE_DOCS]
    out = tmp_path / "big"
    assert run("--input", write_jsonl(tmp_path / "c.jsonl", docs), "--tokenizer",
               write_tiktoken(tmp_path / "big.tiktoken", ranks), "--out_dir", out, "--workers", 1,
               "--val_fraction", 0) == 0
    meta = dataset.load_meta(str(out))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65793 and meta["eot_id"] == 65792
    ids = np.memmap(out / "train_000000.bin", dtype="uint32", mode="r")
    assert ids.max() == 65792 and (ids[ids != 65792] > 65535).any()
    assert (out / "train_000000.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    assert read_split(out, "train") == docs


def test_named_tiktoken_without_cache_fails_fast_before_any_work(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv(tokenizer.OFFLINE_ENV, "1")
    out = tmp_path / "never"
    t0 = time.time()
    assert run("--input", corpus[0], "--tokenizer", "gpt2", "--out_dir", out) == 1
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert "gpt2" in err and "local .tiktoken file" in err and "sp:N" in err
    assert not out.exists() and no_leftovers(tmp_path)


def test_named_tiktoken_is_saved_into_the_dataset(corpus, tmp_path, monkeypatch):
    # Stands in for a cached gpt2: the dataset must carry its ranks, regex and specials itself.
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)} | {b"th": 256, b"the": 257}
    fake = tiktoken.Encoding(name="gpt2", pat_str=tokenizer.DEFAULT_TIKTOKEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 258, "<|fim|>": 259})
    monkeypatch.setattr(tokenizer, "_load_named_tiktoken", lambda name: fake)
    out = tmp_path / "named"
    assert run("--input", corpus[0], "--tokenizer", "gpt2", "--out_dir", out, "--workers", 1, "--val_fraction", 0.2) == 0
    info = dataset.load_meta(str(out))["tokenizer"]
    assert info["name"] == "gpt2" and info["spec"] == "gpt2" and info["eot_id"] == 258
    assert info["special_tokens"] == {"<|endoftext|>": 258, "<|fim|>": 259}
    assert tokenizer.read_tiktoken_ranks(str(out / "tokenizer.tiktoken")) == ranks
    monkeypatch.undo()  # loading the dataset must not need tiktoken's registry or cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv(tokenizer.OFFLINE_ENV, "1")
    assert sorted(read_split(out, "train") + read_split(out, "val")) == sorted(corpus[1])


def test_tokenizer_spec_errors(corpus, tmp_path, capsys):
    path, _ = corpus
    for spec, words in [("sp:100", "between 260"), ("sp:300", "too small"), ("nope", "Unknown --tokenizer"),
                        (str(tmp_path / "missing.model"), "does not exist")]:
        assert run("--input", path, "--tokenizer", spec, "--out_dir", tmp_path / "x", "--workers", 1) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and no_leftovers(tmp_path)
    (tmp_path / "bad.model").write_text("not a model")  # named as given, not as the temp copy (.x.tmp-*/tokenizer.model)
    assert run("--input", path, "--tokenizer", tmp_path / "bad.model", "--out_dir", tmp_path / "x", "--workers", 1) == 1
    err = capsys.readouterr().err
    assert f"Cannot load SentencePiece model {tmp_path / 'bad.model'} (" in err and ".tmp-" not in err
    with pytest.raises(tokenizer.TokenizerError, match="missing"):
        tokenizer.load_tokenizer({"kind": "sentencepiece", "file": "tokenizer.model"}, str(tmp_path))


# ----------------------------------------------------------------------------- determinism


def test_split_is_deterministic_and_independent_of_workers(corpus, sp_dataset, tmp_path):
    path, docs = corpus
    outs = []
    for i, workers in enumerate((1, 2, 2)):
        out = tmp_path / f"w{i}"
        # Tiny tasks so that two workers really interleave many tasks out of order.
        assert run("--input", path, "--tokenizer", "sp:512", "--out_dir", out, "--workers", workers,
                   "--val_fraction", 0.2, "--chunk_mb", 0.002) == 0
        outs.append(out)
    for out in outs:
        assert shard_bytes(out) == shard_bytes(sp_dataset)
        assert (out / "tokenizer.model").read_bytes() == (sp_dataset / "tokenizer.model").read_bytes()
    val = read_split(outs[1], "val")
    threshold = prepare.val_threshold(0.2)
    assert val == [d for d in docs if prepare.is_val_document(d.encode(), threshold)]
    assert 0.1 < len(val) / len(docs) < 0.3


def test_shards_roll_over_at_shard_tokens(corpus, sp_dataset, tmp_path):
    path, docs = corpus
    out = tmp_path / "sharded"
    assert run("--input", path, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out, "--workers", 1,
               "--val_fraction", 0.2, "--shard_tokens", 1000) == 0
    meta = dataset.load_meta(str(out))
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and [s["file"] for s in shards[:2]] == ["train_000000.bin", "train_000001.bin"]
    assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert b"".join(shard_bytes(out)[s["file"]] for s in shards) == shard_bytes(sp_dataset)["train_000000.bin"]
    assert read_split(out, "train") == read_split(sp_dataset, "train")


# ----------------------------------------------------------------------------- bad input


BAD_LINES = [
    b'{"text": "good one"}',
    b'{"text": "broken"',
    b'{"title": "no text here"}',
    b'{"text": 42}',
    b'{"text": ""}',
    b"",
    b"[1, 2]",
    b'{"text": "bad \xff byte"}',
    b'{"text": "lone \\ud800 surrogate"}',
    b'{"text": "good two"}',
]


def test_bad_records_are_skipped_counted_and_reported(sp_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    out = tmp_path / "out"
    assert run("--input", bad, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out,
               "--workers", 1, "--val_fraction", 0) == 0
    meta = dataset.load_meta(str(out))
    assert meta["skipped"] == {"bad_json": 1, "blank_line": 1, "empty_text": 1, "missing_text_key": 1,
                               "not_an_object": 1, "text_not_string": 1}
    assert meta["invalid_utf8"] == 2
    assert read_split(out, "train") == ["good one", "bad \ufffd byte", "lone \ufffd surrogate", "good two"]
    err = capsys.readouterr().err
    for line_no in (2, 3, 4, 5, 6, 7):
        assert f"{bad}:{line_no}:" in err


def test_strict_turns_a_skip_into_an_error(sp_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    out = tmp_path / "out"
    assert run("--input", bad, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", out,
               "--workers", 1, "--val_fraction", 0, "--strict") == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "--strict" in err
    assert not out.exists() and no_leftovers(tmp_path)


def test_input_errors_are_one_clear_line(sp_dataset, tmp_path, capsys):
    tok = str(sp_dataset / "tokenizer.model")
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "all_bad.jsonl").write_text('{"x": 1}\n\n{"text": ""}\n', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    cases = [
        (["--input", tmp_path / "missing.jsonl"], "does not exist"),
        (["--input", tmp_path / "data.csv"], "Unsupported input file"),
        (["--input", tmp_path / "data.parquet"], "data.parquet is not a readable parquet file"),
        (["--input", tmp_path / "empty_dir"], "No .jsonl, .txt (optionally .gz, .xz or .zst) or .parquet files"),
        (["--input", tmp_path / "all_bad.jsonl", "--val_fraction", 0], "No documents found"),
        (["--input", tmp_path / "empty.jsonl", "--val_fraction", 0], "No documents found"),
        (["--input", tmp_path / "all_bad.jsonl", "--val_input", tmp_path / "all_bad.jsonl", "--val_fraction", 0.1],
         "either --val_input or --val_fraction"),
    ]
    for args, words in cases:
        assert run(*args, "--tokenizer", tok, "--out_dir", tmp_path / "out", "--workers", 1) == 1, words
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("prepare.py: error:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_empty_validation_split_is_an_error(sp_dataset, tmp_path, capsys):
    path = write_jsonl(tmp_path / "three.jsonl", ["один", "two", "три"])
    thr = prepare.val_threshold(0.001)
    assert not any(prepare.is_val_document(d.encode(), thr) for d in ["один", "two", "три"])
    assert run("--input", path, "--tokenizer", sp_dataset / "tokenizer.model", "--out_dir", tmp_path / "o",
               "--val_fraction", 0.001, "--workers", 1) == 1
    assert "--val_fraction" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--input", str(tmp_path / "nope.jsonl"),
                        "--out_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("prepare.py: error: Input path") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- atomic output


def test_existing_output_needs_overwrite(corpus, sp_dataset, tmp_path, capsys):
    path, _ = corpus
    tok = sp_dataset / "tokenizer.model"
    out = tmp_path / "ds"
    args = ["--input", path, "--tokenizer", tok, "--out_dir", out, "--workers", 1, "--val_fraction", 0.2]
    assert run(*args) == 0
    assert run(*args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run(*args, "--overwrite") == 0
    assert shard_bytes(out) == shard_bytes(sp_dataset)
    assert no_leftovers(tmp_path)
    # A file we did not write makes even our own dataset off limits: --overwrite never deletes it.
    (out / "marker").write_text("notes")
    assert run(*args, "--overwrite") == 1
    assert "did not write (marker)" in capsys.readouterr().err and (out / "marker").read_text() == "notes"
    # --overwrite refuses to delete a directory that is not a dataset.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert run("--input", path, "--tokenizer", tok, "--out_dir", precious, "--workers", 1, "--overwrite") == 1
    assert "not a prepare.py dataset" in capsys.readouterr().err
    assert (precious / "thesis.tex").exists()


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_dataset(corpus, sp_dataset, tmp_path, monkeypatch, exc):
    path, _ = corpus
    calls = []
    real_write = dataset.ShardWriter.write

    def failing_write(self, tokens):
        calls.append(1)
        if len(calls) > 3:
            raise exc
        real_write(self, tokens)

    monkeypatch.setattr(dataset.ShardWriter, "write", failing_write)
    tok = sp_dataset / "tokenizer.model"
    out = tmp_path / "ds"
    args = ["--input", path, "--tokenizer", tok, "--out_dir", out, "--workers", 1, "--val_fraction", 0.2,
            "--chunk_mb", 0.002]
    def run_and_fail(*extra):
        if isinstance(exc, KeyboardInterrupt):
            assert run(*args, *extra) == 130
        else:
            with pytest.raises(RuntimeError, match="disk on fire"):
                run(*args, *extra)

    run_and_fail()
    assert not out.exists() and no_leftovers(tmp_path)

    # A failed --overwrite run keeps the previous dataset intact.
    monkeypatch.setattr(dataset.ShardWriter, "write", real_write)
    assert run(*args) == 0
    before, meta_before = shard_bytes(out), (out / "meta.json").read_text()
    monkeypatch.setattr(dataset.ShardWriter, "write", failing_write)
    calls.clear()
    run_and_fail("--overwrite")
    assert shard_bytes(out) == before and (out / "meta.json").read_text() == meta_before
    assert no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- demo

DEMO_CORPUS = REPO / "demo" / "ru_literature.jsonl.xz"

# Runs `python prepare.py` with no arguments, as the quick start does, under an audit hook that
# turns opening anything in ../shared or touching the network into a crash: "offline and without
# ../shared" is checked, not assumed. Forked tokenizer workers inherit the hook.
GUARDED_PREPARE = """
import os, sys
repo, shared = sys.argv[1], os.path.realpath(sys.argv[2])
def guard(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        if os.path.realpath(os.fsdecode(args[0])).startswith(shared + os.sep):
            raise RuntimeError(f"prepare.py opened {args[0]!r} in ../shared")
    if event.startswith("socket."):
        raise RuntimeError(f"prepare.py used the network ({event})")
sys.addaudithook(guard)
sys.path.insert(0, repo)
sys.argv = ["prepare.py"]
import prepare
sys.exit(prepare.main())
"""


def shipped_demo() -> list[dict]:
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> tuple[Path, str]:
    """A fresh directory after `python prepare.py`, and what it printed on stderr."""
    cwd = tmp_path_factory.mktemp("quick_start")
    env = {**os.environ, "HOMELLM_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", GUARDED_PREPARE, str(REPO), str(REPO.parent / "shared")],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, r.stderr


def test_prepare_without_arguments_tokenizes_the_shipped_russian_corpus_exactly(quick_start):
    cwd, err = quick_start
    out = cwd / "data" / "demo"
    meta = dataset.load_meta(str(out))
    assert meta["demo"]["name"] == "ru" and meta["inputs"] == [prepare.DEMO_CORPUS]
    assert meta["tokenizer"]["spec"] == prepare.DEMOS["ru"].tokenizer
    shipped = [d["text"] for d in shipped_demo()]
    train, val = read_split(out, "train"), read_split(out, "val")
    # Every shipped document comes back byte for byte, each in exactly one split.
    assert Counter(train) + Counter(val) == Counter(shipped)
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in shipped)
    assert 0.03 < len(val) / len(shipped) < 0.07
    # The validation split is big enough for train.py's evaluations, so no warning about it.
    assert "warning" not in err and "next: python train.py config/tiny_cpu.py" in err


def test_rerunning_the_demo_reuses_it_and_refuses_a_different_one(quick_start, monkeypatch, capsys):
    cwd, _ = quick_start
    monkeypatch.chdir(cwd)
    meta = cwd / "data" / "demo" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert run() == 0
    assert "already holds this demo dataset" in capsys.readouterr().err
    assert meta.stat().st_mtime_ns == stamp
    # Another split, or the python demo aimed at the same directory, is not answered with this one.
    assert run("--val_fraction", 0.1) == 1
    assert "another val_fraction; pass --overwrite" in capsys.readouterr().err
    assert run("--demo", "python", "--out_dir", "data/demo") == 1
    assert "another corpus, tokenizer, val_fraction; pass --overwrite" in capsys.readouterr().err
    assert meta.stat().st_mtime_ns == stamp


def test_demo_corpus_is_whole_works_listed_in_its_provenance():
    docs = shipped_demo()
    text_bytes = sum(len(d["text"].encode()) for d in docs)
    assert 8e6 < text_bytes < 12e6 and DEMO_CORPUS.stat().st_size < 4e6  # the issue's size limits
    provenance = (REPO / "demo" / "PROVENANCE.md").read_text(encoding="utf-8")
    rows = {}
    for line in provenance.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[4].isdigit():  # author | lived | title | kind | documents | bytes | source
            rows[cells[2], cells[6].split("/")[1]] = (int(cells[4]), int(cells[5].replace(",", "")))
    works = {}
    for d in docs:
        n, size = works.get((d["title"], d["author"]), (0, 0))
        works[d["title"], d["author"]] = (n + 1, size + len(d["text"].encode()))
    assert works == rows  # every work, with its documents and bytes, and nothing else
    assert "Gorky" not in {author for _, author in works}  # died 1936: not public domain everywhere


def test_python_demo_builds_data_demo_python_from_the_stdlib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run("--demo", "python", "--max_docs", 25, "--val_fraction", 0.2, "--workers", 1) == 0
    out = tmp_path / prepare.DEMOS["python"].out_dir
    meta = dataset.load_meta(str(out))
    assert "Python standard library" in capsys.readouterr().err
    assert meta["demo"]["name"] == "python" and meta["tokenizer"]["spec"] == prepare.DEMOS["python"].tokenizer
    _, files = prepare.python_demo_files()
    assert meta["inputs"] == files
    sources = [Path(f).read_text(encoding="utf-8") for f in files[:25]]
    train, val = read_split(out, "train"), read_split(out, "val")
    val_set = set(val)
    assert train == [s for s in sources if s not in val_set] and val
    assert sorted(train + val) == sorted(sources)  # exact, indentation and all
    assert run("--demo", "python", "--max_docs", 25, "--val_fraction", 0.2, "--workers", 1) == 0
    assert "already holds this demo dataset" in capsys.readouterr().err
    assert run("--demo", "python", "--input", "x.jsonl") == 1
    assert "no --input" in capsys.readouterr().err


def test_python_demo_corpus_is_stdlib_source_without_tests():
    root, files = prepare.python_demo_files()
    assert files == sorted(files) and len(files) > 300
    for f in files:
        rel = Path(f).relative_to(root)
        assert f.endswith(".py") and Path(f).stat().st_size > 0
        assert not {"test", "tests", "idle_test", "site-packages"} & set(rel.parts[:-1]), f


def test_split_heldout_moves_whole_works(tmp_path):
    # tools/split_heldout.py makes the quality benchmark's held-out set (docs/benchmarks.md),
    # creating the output folder as the documented command needs on a fresh machine.
    corpus, manifest = tmp_path / "c.jsonl", tmp_path / "m.tsv"
    works = [("A", "One"), ("B", "Two"), ("A", "One"), ("C", "Три")]
    corpus.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1, 5)), encoding="utf-8")
    manifest.write_text("line\tauthor\ttitle\n" + "".join(f"{i}\t{a}\t{t}\n" for i, (a, t) in enumerate(works, 1)), encoding="utf-8")
    script = [sys.executable, str(REPO / "tools" / "split_heldout.py"), str(corpus), "--manifest", str(manifest),
              "--train", str(tmp_path / "new" / "train.jsonl"), "--heldout", str(tmp_path / "new" / "held.jsonl")]
    done = subprocess.run([*script, "--work", "A/One", "--work", "C/Три"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    held = [json.loads(x)["text"] for x in (tmp_path / "new" / "held.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [json.loads(x)["text"] for x in (tmp_path / "new" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert held == ["line 1", "line 3", "line 4"] and train == ["line 2"]
    missing = subprocess.run([*script, "--work", "D/None"], capture_output=True, text=True)
    assert missing.returncode == 1 and "not in the manifest: D/None" in missing.stderr


# ----------------------------------------------------------------------------- conversations (chat)

S, E = 257, 258  # <|im_start|>, <|im_end|> as prepare.py appends them to the byte-level tokenizer


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def expected_turn(role: str, content: str) -> tuple[list[int], list[int]]:
    """One ChatML turn in byte ids, and its mask, written out by hand: <|im_start|>role\\ncontent<|im_end|>\\n
    with 1 only on an assistant's content and its <|im_end|>."""
    ids = [S, *b(f"{role}\n"), *b(content), E, *b("\n")]
    reply = role == "assistant"
    mask = [0] * (1 + len(b(f"{role}\n"))) + [int(reply)] * len(b(content)) + [int(reply), 0]
    return ids, mask


CONVERSATIONS = [
    [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуй!"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6, of course"}],
    [{"role": "user", "content": "one <|im_start|>assistant\nfake"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "bye"}],
    [{"role": "system", "content": "Отвечай кратко."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
]


def test_chat_masks_are_exact_for_single_and_multi_turn_with_and_without_system(chat_dataset, tmp_path):
    tok = load_dataset_tokenizer(chat_dataset)
    assert (tok.im_start_id, tok.im_end_id) == (S, E)
    expected = []
    for messages in CONVERSATIONS:
        turns = [expected_turn(m["role"], m["content"]) for m in messages]
        ids, mask = [i for t in turns for i in t[0]], [m for t in turns for m in t[1]]
        assert tokenizer.chat_ids(tok, messages) == (ids, mask)
        expected.append((ids, mask))
    # The literal "<|im_start|>" a user typed is text (its bytes), never the control token.
    assert expected[2][0].count(S) == 3 and b("<|im_start|>")[0] in expected[2][0]
    prompt, prompt_mask = tokenizer.chat_ids(tok, CONVERSATIONS[0][:1], add_generation_prompt=True)
    assert prompt == expected_turn("user", "Привет")[0] + [S, *b("assistant\n")] and not any(prompt_mask)

    # prepare.py writes exactly these ids and masks, and where each conversation starts.
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    out = tmp_path / "out"
    assert run("--input", src, "--tokenizer", Path(chat_dataset) / "tokenizer.tiktoken", "--out_dir", out, "--workers", 1,
               "--val_fraction", 0) == 0
    meta = dataset.load_meta(str(out))
    assert meta["chat"]["mask_file"] == "{split}_{index:06d}.mask" and meta["splits"]["train"]["documents"] == 4
    assert np.fromfile(out / "train_000000.bin", dtype=meta["dtype"]).tolist() == [i for ids, _ in expected for i in ids]
    assert np.fromfile(out / "train_000000.mask", dtype=np.uint8).tolist() == [m for _, mask in expected for m in mask]
    lengths = [len(ids) for ids, _ in expected]
    conv = np.fromfile(out / "train_000000.conv", dtype="<i8").reshape(-1, 2)
    assert conv[:, 0].tolist() == [sum(lengths[:i]) for i in range(4)]
    assert conv[:, 1].tolist() == [mask.index(1) for _, mask in expected]
    assert meta["splits"]["train"]["loss_tokens"] == sum(sum(mask) for _, mask in expected)


def test_a_token_that_merges_the_role_line_into_the_reply_counts_as_the_reply(tmp_path):
    # A tokenizer whose one merge joins "\n" to the reply's first letter ("\ny"): that token carries reply text.
    ranks = {bytes([i]): i for i in range(256)} | {b"\ny": 256}
    tok = tokenizer.make_tiktoken(None, r"(?s).+", ranks, {"<|endoftext|>": 257, "<|im_start|>": 258, "<|im_end|>": 259}, 257)
    tok.im_start_id, tok.im_end_id = 258, 259
    ids, mask = tokenizer.chat_ids(tok, [{"role": "assistant", "content": "yo"}])
    assert ids == [258, *b("assistant"), 256, ord("o"), 259, 10]
    assert mask == [0] * 10 + [1, 1, 1, 0]


CHAT_BAD_LINES = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
    {"text": "a document among conversations"},
    {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]},
]


def test_malformed_conversations_are_skipped_by_reason_and_strict_makes_them_errors(chat_dataset, tmp_path, capsys):
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in CHAT_BAD_LINES), encoding="utf-8")
    out = tmp_path / "out"
    tok_file = Path(chat_dataset) / "tokenizer.tiktoken"
    assert run("--input", src, "--tokenizer", tok_file, "--out_dir", out, "--workers", 1, "--val_fraction", 0) == 0
    meta = dataset.load_meta(str(out))
    assert meta["skipped"] == {"unknown_role": 1, "empty_content": 1, "no_assistant_turn": 1, "messages_not_list": 1,
                               "content_not_string": 1, "no_messages": 1}
    err = capsys.readouterr().err
    assert f"{src}:2: role 'bot' is not one of system, user, assistant" in err
    tok = load_dataset_tokenizer(str(out))
    ids = np.fromfile(out / "train_000000.bin", dtype=meta["dtype"]).tolist()
    sharegpt = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    assert ids == tokenizer.chat_ids(tok, CHAT_BAD_LINES[0]["messages"])[0] + tokenizer.chat_ids(tok, sharegpt)[0]
    assert run("--input", src, "--tokenizer", tok_file, "--out_dir", tmp_path / "strict", "--workers", 1, "--val_fraction", 0,
               "--strict") == 1
    assert f"{src}:2:" in capsys.readouterr().err and not (tmp_path / "strict").exists()
    # --format text reads the same file as documents: only the one with a "text" key is one.
    assert run("--input", src, "--tokenizer", tok_file, "--out_dir", tmp_path / "text", "--workers", 1, "--val_fraction", 0,
               "--format", "text") == 0
    assert read_split(tmp_path / "text", "train") == ["a document among conversations"]


def test_conversations_too_long_for_block_size_are_truncated_or_skipped_and_counted(chat_dataset, tmp_path):
    records = [[{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 50}],  # reply cut by the window
               [{"role": "user", "content": "q" * 60}, {"role": "assistant", "content": "a"}],  # no reply within 40 tokens
               [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records), encoding="utf-8")
    out = tmp_path / "out"
    assert run("--input", src, "--tokenizer", Path(chat_dataset) / "tokenizer.tiktoken", "--out_dir", out, "--workers", 1,
               "--val_fraction", 0, "--block_size", 40) == 0
    meta = dataset.load_meta(str(out))
    assert meta["chat"]["truncated"] == 1 and meta["chat"]["too_long"] == 1 == meta["skipped"]["too_long"]
    assert meta["splits"]["train"]["documents"] == 2 and meta["chat"]["block_size"] == 40
    # train.py's windows at a smaller block_size leave out the first one too, and say so.
    data = dataset.TokenShards(str(out), meta, "train", block_size=25)
    assert data.num_windows == 1 and data.too_long == 1
    warnings = dataset.check_splits(str(out), meta, data, data, 1)
    assert "1 left out (no reply within it)" in warnings[0]


def test_chat_shards_hold_whole_conversations_and_windows_start_at_one(chat_dataset, tmp_path):
    import torch

    src = Path(chat_dataset).parent / "chats.jsonl"
    out = tmp_path / "out"
    assert run("--input", src, "--tokenizer", Path(chat_dataset) / "tokenizer.tiktoken", "--out_dir", out, "--workers", 2,
               "--val_fraction", 0.05, "--shard_tokens", 5000, "--max_docs", 400, "--block_size", 80) == 0
    meta = dataset.load_meta(str(out))
    dataset.verify_shards(str(out), meta)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 5000 for s in shards)
    for i, shard in enumerate(shards):
        ids = np.fromfile(out / shard["file"], dtype=meta["dtype"])
        conv = np.fromfile(out / f"train_{i:06d}.conv", dtype="<i8").reshape(-1, 2)
        assert len(conv) == shard["conversations"] and conv[0, 0] == 0
        assert (ids[conv[:, 0]] == S).all() and ids[-1] == ord("\n") and ids[-2] == E  # whole conversations only
    data = dataset.TokenShards(str(out), meta, "train", block_size=80)
    assert data.num_windows == meta["splits"]["train"]["documents"]
    picks = data.sample([1, 2], 64)
    x, y = data.read(picks, torch.device("cpu"))
    assert (x[:, 0] == S).all()
    kept = y != -1
    assert data.count_targets(picks) == int(kept.sum()) > 0
    assert set(y[kept].tolist()) <= set(range(256)) | {E}  # reply bytes and <|im_end|>, never S or the role lines' \n


def test_sp_tokenizers_reserve_the_chat_tokens_and_older_ones_get_them_appended(corpus, sp_dataset, tmp_path):
    import sentencepiece as spm

    tok = load_dataset_tokenizer(str(sp_dataset))  # sp:512, trained on plain text
    assert (tok.im_start_id, tok.im_end_id) == (2, 3) and {2, 3} <= tok.special_ids
    assert 2 not in tok.encode("<|im_start|>user") and tok.decode([2, *tok.encode("hi"), 3]) == "hi"
    # A SentencePiece model from before the chat tokens: they are appended as control pieces.
    old = tmp_path / "old.model"
    options = {k: v for k, v in tokenizer.SENTENCEPIECE_TRAINER_OPTIONS.items() if k != "control_symbols"}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_docs(300)), model_prefix=str(old)[: -len(".model")],
                                   vocab_size=400, num_threads=1, **options)
    size = spm.SentencePieceProcessor(model_file=str(old)).get_piece_size()
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    out = tmp_path / "out"
    assert run("--input", src, "--tokenizer", old, "--out_dir", out, "--workers", 1, "--val_fraction", 0) == 0
    meta = dataset.load_meta(str(out))
    assert meta["vocab_size"] == size + 2 and meta["chat"]["chat_tokens_added"] == 2
    assert meta["tokenizer"]["chat_tokens"] == {"<|im_start|>": size, "<|im_end|>": size + 1}
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.is_control(size) and sp.id_to_piece(size + 1) == "<|im_end|>"
    assert sp.encode("hello", out_type=int) == spm.SentencePieceProcessor(model_file=str(old)).encode("hello", out_type=int)
    ids = np.fromfile(out / "train_000000.bin", dtype=meta["dtype"]).tolist()
    assert ids.count(size) == sum(len(m) for m in CONVERSATIONS)  # one <|im_start|> per message


def test_chat_demo_is_reproducible_and_fine_tunes_the_ru_demos_tokenizer(sp_dataset, tmp_path, monkeypatch, capsys):
    from make_chat_demo import jsonl

    assert lzma.decompress(Path(prepare.CHAT_DEMO_CORPUS).read_bytes()) == jsonl()  # the shipped file is the tool's output
    monkeypatch.chdir(tmp_path)
    assert run("--demo", "chat", "--workers", 1) == 1
    assert "run `python prepare.py` first" in capsys.readouterr().err
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "tokenizer.model").write_bytes((sp_dataset / "tokenizer.model").read_bytes())
    assert run("--demo", "chat", "--workers", 1, "--max_docs", 500) == 0
    err = capsys.readouterr().err
    assert "synthetic conversations" in err and "python train.py config/sft.py --init_from=out" in err
    meta = dataset.load_meta("data/demo-chat")
    assert meta["demo"]["name"] == "chat" and meta["chat"]["chat_tokens_added"] == 0
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 500
    assert run("--demo", "chat", "--workers", 1, "--max_docs", 500) == 0
    assert "already holds this demo dataset" in capsys.readouterr().err
