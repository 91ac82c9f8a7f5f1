"""prepare.py: turn a text corpus into token shards that train.py reads with np.memmap.

    python prepare.py                                   # built-in demo: 11 MB of Russian classics -> data/demo
    python prepare.py --demo python                     # the other demo: Python stdlib source -> data/demo-python
    python prepare.py --input corpus.jsonl.xz           # -> data/corpus, SentencePiece BPE sp:32000
    python prepare.py --input texts/ --tokenizer sp:16000 --out_dir data/ru --workers 8
    python prepare.py --input web.jsonl --tokenizer cl100k_base
    python prepare.py --input fineweb2/ --out_dir data/fineweb2_ru  # a directory of .parquet files (pip install pyarrow)
    python prepare.py --input chats.jsonl --tokenizer out/tokenizer.model   # conversations -> data/chats

Conversation JSONL ({"messages": [{"role": "user", "content": ...}, ...]} per line, or ShareGPT's
{"conversations": [{"from": "human", "value": ...}, ...]}) is recognised by its first record, or
forced with --format chat: each conversation is written in the ChatML template (tokenizer.chat_ids)
with a loss mask beside the shards, for fine-tuning with config/sft.py.

The pipeline streams: the main process reads ~1 MB blocks of whole lines (of a parquet file: only
its footer, to cut it into runs of row groups) and hands them to a pool of worker processes that
parse (read the row groups), split train/val, tokenize and return numpy arrays; the main process
writes those arrays, in input order, to raw little-endian shard files. Nothing holds a whole input
file (unless --txt_mode file makes it one document) or the token stream in memory, and the output
does not depend on --workers.

Output layout (dataset.py describes the format and reads it; _prepare_into lists every
meta.json field):
    <out_dir>/train_000000.bin ...  val_000000.bin ...  tokenizer.model|tokenizer.tiktoken  meta.json

Reading and parsing the input files lives in corpus.py, tokenizers (loading, sp:N training,
tiktoken files, hf: conversion) in tokenizer.py. `python tools/bench.py prepare` measures this script
against the bare tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from corpus import (
    COMPRESSED, PARQUET_SUFFIXES, CorpusError, InputFile, Parsed, Piece, conversation_text, detect_format, find_input_files, is_val_document, iter_tasks,
    parse_piece, preload_readers, read_piece, sample_documents, utf8_document, val_threshold,
)
from dataset import CHAT_FILES, FORMAT_VERSION, DatasetError, ShardWriter, load_meta
from system import OneLineParser, die_with_parent, pid_alive, usable_cpus
from tokenizer import (
    DEFAULT_TIKTOKEN_PATTERN, LONG_TEXT, TIKTOKEN_NAMES, Tokenizer, TokenizerError, TokenizerPlan, add_chat_tokens, chat_ids,
    load_tokenizer, normalizes_text, pieces_for_encoding, resolve_tokenizer, save_tokenizer, train_sentencepiece,
)

DEFAULT_TOKENIZER = "sp:32000"  # user corpora: a 32k BPE fits Russian (or mixed ru/en) text well
DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_SP_SAMPLE_MB = 100.0  # SentencePiece needs ~8x this in RAM while training
DEFAULT_CHUNK_MB = 1.0
DEFAULT_BLOCK_SIZE = 1024  # chat: the context conversations are fitted to (train.py's default block_size)

MAX_REPORTED_SKIPS = 10

# One evaluation with train.py's defaults reads eval_iters x batch_size windows of block_size + 1
# tokens (20 x 8 x 1025; a test keeps this in step with TrainConfig). A validation split under a
# quarter of that (a few documents) is read over and over, and its loss says little: we warn.
ONE_EVAL_TOKENS = 20 * 8 * 1025


@dataclass(frozen=True)
class Demo:
    """A built-in corpus that `python prepare.py` tokenizes when no --input is given."""

    out_dir: str
    tokenizer: str
    val_fraction: float


DEMOS = {
    # The default: 11 MB of Russian classics shipped in demo/ (demo/PROVENANCE.md lists the works).
    # sp:8192 (6.2 bytes/token) beat sp:4096 (5.5) on the quick start's model, per step and per
    # FLOP (docs/benchmarks.md). 5% of the ~1,050 documents (~0.4 MB) go to validation.
    "ru": Demo("data/demo", "sp:8192", 0.05),
    # The Python standard library's own source (~730 files, 12 MB, tests excluded); a 4k vocabulary
    # still merges common identifiers and indentation runs, and 2% keeps ~15 files for validation.
    "python": Demo("data/demo-python", "sp:4096", 0.02),
    # Synthetic Russian conversations (demo/chat_synthetic.jsonl.xz, made by tools/make_chat_demo.py)
    # in the tokenizer of the ru demo, so that the quick start's model can be fine-tuned on them.
    "chat": Demo("data/demo-chat", os.path.join("data", "demo", "tokenizer.model"), 0.05),
}
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_CORPUS = os.path.join(DEMO_DIR, "ru_literature.jsonl.xz")
CHAT_DEMO_CORPUS = os.path.join(DEMO_DIR, "chat_synthetic.jsonl.xz")
PYTHON_DEMO_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class PrepareError(Exception):
    """A problem with the user's input or flags; main() prints it as one line, no traceback."""


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class SampleSpec:
    """Where the sp:N training sample comes from; see sample_documents."""

    files: list[InputFile]
    budget_bytes: int
    text_key: str
    threshold: int  # validation documents are left out of the sample
    max_docs: int | None
    fmt: str = "text"  # "chat": conversations, sampled as their text


def sample_and_train_sentencepiece(sample: SampleSpec, vocab_size: int, path: str) -> float:
    """Collect the training sample and train sp:N on it; returns the sample size in MB."""
    texts = list(sample_documents(sample.files, sample.budget_bytes, sample.text_key, sample.threshold, sample.max_docs, sample.fmt))
    if not texts:
        raise PrepareError("No documents found in the input to train the tokenizer on; check --input and --text_key.")
    mb = sum(len(t.encode("utf-8", "replace")) for t in texts) / 1e6
    _log(f"training SentencePiece BPE with {vocab_size} pieces on a {mb:.1f} MB sample ...")
    train_sentencepiece(texts, vocab_size, path)
    return mb


def materialize_tokenizer(
    plan: TokenizerPlan, out_dir: str, sample: SampleSpec, log: Callable[[str], None]
) -> tuple[dict, Tokenizer]:
    """Create the tokenizer file inside out_dir (training sp:N on a sample of the input first);
    returns the meta["tokenizer"] record and the loaded tokenizer."""
    if plan.train_vocab is not None:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        t0 = time.time()
        # Train in a child process: the sample plus SentencePiece's tables take several times
        # the sample size in RAM, which CPython would not give back after training, and the
        # forked tokenizer workers would then all start out that big.
        try:
            with ProcessPoolExecutor(1, mp_context=mp_context(), initializer=_default_sigint) as child:
                target = os.path.join(out_dir, "tokenizer.model")
                mb = child.submit(sample_and_train_sentencepiece, sample, plan.train_vocab, target).result()
        except BrokenProcessPool:
            raise PrepareError("The tokenizer training process died (most likely out of memory); lower --sp_sample_mb.") from None
        log(f"trained the tokenizer on a {mb:.1f} MB sample in {time.time() - t0:.1f} s")
    info, tok = save_tokenizer(plan, out_dir)
    if sample.fmt == "chat" and not info.get("chat_tokens"):
        before = tok.vocab_size
        info, added = add_chat_tokens(info, out_dir)
        tok = load_tokenizer(info, out_dir)
        info["chat_tokens_added"] = added
        log(f"note: the tokenizer had no chat tokens; added <|im_start|> and <|im_end|> as ids {before} and {before + 1} "
            f"(vocabulary {before} -> {tok.vocab_size}; train.py --init_from grows a model trained on {before})")
    if plan.train_vocab is not None and tok.vocab_size < plan.train_vocab:
        log(f"warning: the sample only supports {tok.vocab_size} pieces, so the vocabulary is {tok.vocab_size} instead of {plan.train_vocab}")
    if normalizes_text(tok):
        log("warning: this tokenizer normalizes text, so decoding the shards will not give back the exact input")
    return info, tok


# ----------------------------------------------------------------------------- demo corpora


def python_demo_files() -> tuple[str, list[str]]:
    """The python demo corpus: the Python standard library's own .py files, minus tests, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        str(p)
        for p in root.rglob("*.py")
        if p.is_file()
        and p.stat().st_size > 0  # empty __init__.py files are not documents
        and not PYTHON_DEMO_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise PrepareError(f"No Python standard library sources found under {root}; pass --input with your own corpus.")
    return str(root), files


def demo_inputs(name: str) -> tuple[list[InputFile], str]:
    """The input files of built-in demo `name` and a line that describes them."""
    shipped = {
        "ru": (DEMO_CORPUS, "the Russian literature shipped in {} (11 MB of text, 200 works by 11 authors, "
                            "1820s-1920s; demo/PROVENANCE.md lists them)"),
        "chat": (CHAT_DEMO_CORPUS, "{}: synthetic conversations (greetings, arithmetic, capitals, authors, repeating a word, "
                                   "remembering a name) that show the fine-tuning pipeline, not a conversational model"),
    }
    if name in shipped:
        path, about = shipped[name]
        if not os.path.isfile(path):
            raise PrepareError(f"The demo corpus {path} is missing; restore it with `git checkout demo/` or pass --input.")
        return [InputFile(path, "jsonl", "auto", os.path.getsize(path))], about.format(path)
    root, paths = python_demo_files()
    files = [InputFile(p, "file", "auto", os.path.getsize(p)) for p in paths]
    mb = sum(f.size for f in files) / 1e6
    return files, f"the Python standard library source ({root}, {len(files)} .py files, {mb:.1f} MB, tests excluded)"


# ----------------------------------------------------------------------------- workers


@dataclass
class TaskResult:
    train: np.ndarray
    val: np.ndarray
    train_docs: int = 0
    train_bytes: int = 0
    val_docs: int = 0
    val_bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, int, str, str]] = field(default_factory=list)  # (file index, line, reason, detail)
    invalid_utf8: int = 0
    unchecked_cuts: int = 0  # cuts inside long documents not checked to keep their tokens (see _tokens_with_eot)
    # Chat data, per split: the loss mask (uint8, beside train/val), the conversations as (n, 2)
    # int64 rows (start offset, offset of the first reply token) and the replies' UTF-8 bytes.
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    conversations: dict[str, np.ndarray] = field(default_factory=dict)
    reply_bytes: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # conversations longer than block_size + 1 tokens: a window cuts their end


@dataclass
class WorkerSetup:
    tokenizer_info: dict
    base_dir: str
    files: list[InputFile]
    text_key: str
    threshold: int
    dtype: str
    fmt: str = "text"  # "text" | "chat"
    block_size: int = DEFAULT_BLOCK_SIZE  # chat: a conversation must have a reply token within it


_WORKER: dict[str, Any] = {}


def init_worker(setup: WorkerSetup) -> None:
    """Pool initializer: load the tokenizer once per process, not once per task. A forked worker
    finds it already loaded by the parent (see use_tokenizer_in_workers) and skips the load."""
    _WORKER["setup"] = setup
    if _WORKER.get("source") != (setup.tokenizer_info, setup.base_dir):
        use_tokenizer_in_workers(load_tokenizer(setup.tokenizer_info, setup.base_dir), setup)


def use_tokenizer_in_workers(tok: Tokenizer, setup: WorkerSetup) -> None:
    _WORKER["tokenizer"], _WORKER["source"] = tok, (setup.tokenizer_info, setup.base_dir)


def process_task(pieces: list[Piece]) -> TaskResult:
    """Parse, split and tokenize one task; returns token arrays with EOT after every document."""
    setup: WorkerSetup = _WORKER["setup"]
    tok: Tokenizer = _WORKER["tokenizer"]
    if setup.fmt == "chat":
        return process_chat_task(pieces, setup, tok)
    # SentencePiece takes UTF-8 bytes directly, which saves it re-encoding every document
    # (~3% of its time); tiktoken wants str.
    as_bytes = tok.kind == "sentencepiece"
    result = TaskResult(np.empty(0, setup.dtype), np.empty(0, setup.dtype))
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for file_index, first_line, data in pieces:
        file = setup.files[file_index]
        # A parquet piece comes in batches of rows: each is tokenized before the next is read.
        for parsed in read_piece(file.kind, data, first_line, setup.text_key, as_bytes):
            count_skips(result, parsed, file_index)
            texts: dict[str, list[Any]] = {"train": [], "val": []}
            for text in parsed.docs:
                # parquet hands SentencePiece its documents as checked UTF-8 bytes already
                b, text, bad = (text, "", 0) if isinstance(text, bytes) else utf8_document(text)
                result.invalid_utf8 += bad
                to_val = file.split == "val" or (file.split == "auto" and is_val_document(b, setup.threshold))
                texts["val" if to_val else "train"].append(b if as_bytes else text)
                if to_val:
                    result.val_bytes += len(b)
                else:
                    result.train_bytes += len(b)
            for split in ("train", "val"):
                tokens, cuts = _tokens_with_eot(tok, texts[split], setup.dtype)
                parts[split].append(tokens)
                result.unchecked_cuts += cuts
            result.train_docs, result.val_docs = result.train_docs + len(texts["train"]), result.val_docs + len(texts["val"])
    result.train = np.concatenate(parts["train"]) if parts["train"] else result.train
    result.val = np.concatenate(parts["val"]) if parts["val"] else result.val
    return result


def count_skips(result: TaskResult, parsed: Parsed, file_index: int) -> None:
    """Add one parsed piece's skipped records (counts, and the first few by line) to result."""
    result.invalid_utf8 += parsed.invalid_utf8
    for reason, count in parsed.skipped.items():
        result.skipped[reason] = result.skipped.get(reason, 0) + count
    room = MAX_REPORTED_SKIPS - len(result.examples)
    result.examples += [(file_index, line, reason, detail) for line, reason, detail in parsed.examples[:room]]


def process_chat_task(pieces: list[Piece], setup: WorkerSetup, tok: Tokenizer) -> TaskResult:
    """process_task for conversations: each in the chat template with its loss mask (no EOT:
    the template delimits them). One without a reply token among the first block_size + 1
    tokens is skipped (too_long); a longer one is kept, and windows cut its end (truncated)."""
    parts: dict[str, list[tuple[list[int], list[int], int]]] = {"train": [], "val": []}
    result = TaskResult(np.empty(0, setup.dtype), np.empty(0, setup.dtype), reply_bytes={"train": 0, "val": 0})
    for file_index, first_line, data in pieces:
        file = setup.files[file_index]
        parsed = parse_piece(file.kind, data, first_line, setup.text_key, "chat")
        count_skips(result, parsed, file_index)
        for messages in parsed.docs:
            fixed = [utf8_document(m["content"]) for m in messages]  # lone surrogates -> U+FFFD
            result.invalid_utf8 += any(bad for _, _, bad in fixed)
            messages = [{"role": m["role"], "content": text} for m, (_, text, _) in zip(messages, fixed)]
            ids, mask = chat_ids(tok, messages)
            first_reply = mask.index(1)
            if first_reply > setup.block_size:
                result.skipped["too_long"] = result.skipped.get("too_long", 0) + 1
                continue
            result.truncated += len(ids) > setup.block_size + 1
            text = conversation_text(messages).encode("utf-8")
            split = "val" if file.split == "val" or (file.split == "auto" and is_val_document(text, setup.threshold)) else "train"
            parts[split].append((ids, mask, first_reply))
            setattr(result, f"{split}_bytes", getattr(result, f"{split}_bytes") + len(text))
            result.reply_bytes[split] += sum(len(b) for (b, _, _), m in zip(fixed, messages) if m["role"] == "assistant")
    for split, convs in parts.items():
        setattr(result, f"{split}_docs", len(convs))
        starts = np.cumsum([0] + [len(ids) for ids, _, _ in convs[:-1]], dtype=np.int64) if convs else np.empty(0, np.int64)
        setattr(result, split, np.array([i for ids, _, _ in convs for i in ids], dtype=setup.dtype))
        result.masks[split] = np.array([m for _, mask, _ in convs for m in mask], dtype=np.uint8)
        result.conversations[split] = np.stack([starts, np.array([f for _, _, f in convs], dtype=np.int64)], axis=1)
    return result


def _encode_with_eot(tok: Tokenizer, docs: list[Any], dtype: str) -> np.ndarray:
    """All docs' token ids, each document followed by EOT, as one array of dtype."""
    if not docs:
        return np.empty(0, dtype)
    if tok.kind == "tiktoken":
        # encode_to_numpy skips building a Python int object per token (~1/3 of tiktoken's time);
        # disallowed_special=() makes it treat "<|endoftext|>" in text as text, like encode_ordinary.
        eot = np.array([tok.eot_id], np.uint32)
        parts = []
        for d in docs:
            parts.append(tok.impl.encode_to_numpy(d, disallowed_special=()))
            parts.append(eot)
        return np.concatenate(parts).astype(dtype, copy=False)
    encoded = tok.encode_batch(docs)
    out = np.empty(sum(map(len, encoded)) + len(encoded), dtype)
    pos = 0
    for ids in encoded:  # slice assignment from lists is the fastest list -> array path we found
        n = len(ids)
        out[pos : pos + n] = ids
        out[pos + n] = tok.eot_id
        pos += n + 1
    return out


def _tokens_with_eot(tok: Tokenizer, docs: list[Any], dtype: str) -> tuple[np.ndarray, int]:
    """_encode_with_eot, but a document longer than LONG_TEXT is encoded in pieces
    (pieces_for_encoding): memory then holds the document plus one piece's encoding, not an
    encoding many times the document's size. Also returns how many cuts were not checked to
    leave the tokens as they were."""
    parts, short, unchecked_cuts = [], [], 0
    for d in docs:
        if len(d) <= LONG_TEXT:
            short.append(d)
            continue
        parts.append(_encode_with_eot(tok, short, dtype))
        short = []
        for piece, clean in pieces_for_encoding(d, lambda text: _encode_with_eot(tok, [text], dtype)[:-1], LONG_TEXT):
            parts.append(_encode_with_eot(tok, [piece], dtype)[:-1])
            unchecked_cuts += not clean
        parts.append(np.array([tok.eot_id], dtype))
    parts.append(_encode_with_eot(tok, short, dtype))
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), unchecked_cuts


# ----------------------------------------------------------------------------- driver


@dataclass
class PrepareConfig:
    """Everything prepare() needs; the command-line flags map one to one onto these fields."""

    inputs: list[str] = field(default_factory=list)  # empty -> a built-in demo corpus
    demo: str | None = None  # a key of DEMOS; None -> "ru" when inputs is empty
    val_inputs: list[str] = field(default_factory=list)
    val_fraction: float | None = None  # None -> DEFAULT_VAL_FRACTION (the demo's own for a demo)
    text_key: str = "text"
    txt_mode: str = "line"  # "line" | "file"
    format: str = "auto"  # "auto" (chat if the first record has "messages"/"conversations") | "text" | "chat"
    block_size: int = DEFAULT_BLOCK_SIZE  # chat: conversations are fitted to windows of this many tokens
    tokenizer: str | None = None  # None -> DEFAULT_TOKENIZER (the demo's own for a demo)
    tiktoken_pattern: str = DEFAULT_TIKTOKEN_PATTERN
    sp_sample_mb: float = DEFAULT_SP_SAMPLE_MB
    out_dir: str | None = None  # None -> data/<stem of first input>, or the demo's own
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 0  # 0 -> number of usable CPU cores
    chunk_mb: float = DEFAULT_CHUNK_MB
    max_docs: int | None = None
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    command: str = ""


def mp_context() -> Any:
    """Process start method for our pools. On Linux we fork: workers start in ~0.1 s instead of
    re-importing everything (~0.5 s each, a visible share of a small corpus). That is safe because
    we only fork while this process runs no threads of ours (see _prepare_into); the threads that
    importing pyarrow starts (for parquet input) are fork-safe: Arrow and its allocator re-create
    them in a child, as every fork-based data loader over parquet relies on. Elsewhere: spawn."""
    import multiprocessing

    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_out_dir(inputs: list[str], demo: str | None = None) -> str:
    if demo:
        return DEMOS[demo].out_dir
    name = os.path.basename(os.path.normpath(inputs[0].split("*")[0])) or "dataset"
    for suffix in (*COMPRESSED, *PARQUET_SUFFIXES, ".jsonl", ".ndjson", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return os.path.join("data", name or "dataset")


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline; returns the meta.json dict. Raises PrepareError/TokenizerError."""
    t_start = time.time()
    demo = cfg.demo or (None if cfg.inputs else "ru")
    if (demo and cfg.inputs) or demo not in (None, *DEMOS):
        raise PrepareError(f"--demo takes one of {', '.join(DEMOS)} and no --input (it picks a built-in corpus).")
    if cfg.val_inputs and cfg.val_fraction is not None:
        raise PrepareError("Pass either --val_input or --val_fraction, not both.")
    if demo and cfg.val_inputs:
        raise PrepareError("--val_input needs --input as well (the demo corpus has its own split).")
    val_fraction = cfg.val_fraction
    if val_fraction is None:
        val_fraction = DEMOS[demo].val_fraction if demo else DEFAULT_VAL_FRACTION
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}.")
    if cfg.val_inputs:
        val_fraction = 0.0
    if cfg.shard_tokens < 1 or not 0 < cfg.chunk_mb < float("inf") or not 0 < cfg.sp_sample_mb < float("inf"):
        raise PrepareError("--shard_tokens, --chunk_mb and --sp_sample_mb must be positive.")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise PrepareError("--max_docs must be at least 1.")
    if cfg.txt_mode not in ("line", "file"):
        raise PrepareError("--txt_mode must be 'line' or 'file'.")
    if cfg.format not in ("auto", "text", "chat") or cfg.block_size < 2:
        raise PrepareError("--format must be auto, text or chat, and --block_size at least 2.")
    workers = cfg.workers or usable_cpus()
    spec = cfg.tokenizer or (DEMOS[demo].tokenizer if demo else DEFAULT_TOKENIZER)
    if demo == "chat" and not os.path.isfile(spec):
        raise PrepareError(f"--demo chat tokenizes with the ru demo's tokenizer ({spec}), so that the quick start's model can be "
                           "fine-tuned on it: run `python prepare.py` first, or pass --tokenizer sp:2048 to train a new one (and train from scratch).")
    out_dir = os.path.abspath(cfg.out_dir or default_out_dir(cfg.inputs, demo))

    # Inputs and the tokenizer are checked before anything is written or trained.
    demo_record = None
    if demo:
        files, about = demo_inputs(demo)
        # The digest of the corpus tells a changed demo (a new release of it) from the one on disk;
        # the chat demo's also covers the tokenizer file it borrows.
        sources = [f.path for f in files] + ([spec] if demo == "chat" and os.path.isfile(spec) else [])
        digest = hashlib.sha256(b"".join(hashlib.sha256(Path(path).read_bytes()).digest() for path in sources))
        demo_record = {"name": demo, "sha256": digest.hexdigest()}
        if not cfg.overwrite:
            wanted = {"demo": demo_record, "tokenizer": spec, "val_fraction": val_fraction, "max_docs": cfg.max_docs}
            meta = existing_demo(out_dir, wanted)
            if meta is not None:
                return meta
        _log(f"{'No --input given' if cfg.demo is None else f'--demo {demo}'}: building the demo dataset from {about}.")
    else:
        files = find_input_files(cfg.inputs, cfg.txt_mode, "train" if cfg.val_inputs else "auto")
    val_files = find_input_files(cfg.val_inputs, cfg.txt_mode, "val") if cfg.val_inputs else []
    fmt = detect_format(files) if cfg.format == "auto" else cfg.format
    if fmt == "chat" and any(f.kind != "jsonl" for f in files + val_files):
        raise PrepareError("conversations are read from .jsonl files (one {\"messages\": [...]} per line); pass only .jsonl inputs with --format chat.")
    plan = resolve_tokenizer(spec, cfg.tiktoken_pattern)

    _check_out_dir(out_dir, cfg.overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # Build everything in a hidden sibling directory and rename it into place at the very end:
    # an interrupted run leaves at most a ".<name>.tmp-*" directory, never a half-written dataset.
    _remove_stale_work_dirs(out_dir)
    tmp_dir = _make_owned_dir(f".{os.path.basename(out_dir)}.tmp-", parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private (0700); a dataset is not
    try:
        meta = _prepare_into(cfg, tmp_dir, files, val_files, plan, val_fraction, workers, demo_record, t_start, fmt)
        _commit(tmp_dir, out_dir)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    s = meta["splits"]
    _log(
        f"wrote {out_dir}: train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} docs, {meta['dtype']}, "
        f"vocab {meta['vocab_size']}, {meta['timing_s']['total']:.1f} s"
    )
    data_dir = shlex.quote(cfg.out_dir or default_out_dir(cfg.inputs, demo))
    if fmt == "chat":
        _log(f"next: python train.py config/sft.py --init_from=out --data_dir={data_dir} --out_dir=out-chat "
             "(--init_from: your base run; leave it out to train from scratch)")
    elif out_dir == os.path.abspath(DEMOS["ru"].out_dir):  # where the presets look by default
        _log("next: python train.py config/tiny_cpu.py")
    else:
        _log(f"next: python train.py config/{'tiny_cpu' if demo else '<preset>'}.py --data_dir={data_dir}")
    return meta


def existing_demo(out_dir: str, wanted: dict) -> dict | None:
    """Re-running the quick start must not fail on the dataset its first run made: the meta of the
    same demo dataset in out_dir, or None if there is none. Another dataset there is an error."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        have = {k: meta.get(k) for k in wanted} | {"tokenizer": meta["tokenizer"]["spec"]}
    except (OSError, ValueError, TypeError, KeyError):
        return None  # nothing there, or not ours: _check_out_dir says what to do
    differ = [k if k != "demo" else "corpus" for k in wanted if have[k] != wanted[k]]
    if differ:
        raise PrepareError(f"{out_dir} already holds a dataset with another {', '.join(differ)}; "
                           "pass --overwrite to rebuild it or choose another --out_dir.")
    _log(f"{out_dir} already holds this demo dataset; using it (--overwrite rebuilds it).")
    return meta


# Every file prepare.py writes into a dataset directory; --overwrite replaces only directories
# that hold nothing else, and deletes only these names.
DATASET_FILES = re.compile(r"(train|val)_\d{6}\.(bin|mask|conv)|meta\.json|tokenizer\.(model|tiktoken)")


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise PrepareError(f"--out_dir {out_dir} exists and is not a directory; choose another --out_dir.")
    if not overwrite:
        raise PrepareError(
            f"Output directory {out_dir} already exists; pass --overwrite to replace it or choose another --out_dir."
        )
    if not os.listdir(out_dir):
        return
    # --overwrite replaces a directory only when it verifiably is one of our datasets.
    try:
        load_meta(out_dir)
    except DatasetError:
        raise PrepareError(
            f"{out_dir} has no readable prepare.py meta.json: it is not a prepare.py dataset, so --overwrite will not touch it; "
            "remove it yourself or choose another --out_dir."
        ) from None
    foreign = sorted(name for name in os.listdir(out_dir) if not DATASET_FILES.fullmatch(name))
    if foreign:
        raise PrepareError(
            f"{out_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
            "so --overwrite will not replace it; move them out or choose another --out_dir."
        )


def _commit(tmp_dir: str, out_dir: str) -> None:
    """Rename the finished dataset into place; an old one (--overwrite, checked by _check_out_dir)
    is moved aside first and then only the files we write are deleted from it."""
    os.remove(os.path.join(tmp_dir, OWNER_FILE))  # the dataset holds only dataset files
    if not os.path.exists(out_dir):
        os.rename(tmp_dir, out_dir)
        return
    old = _make_owned_dir(f".{os.path.basename(out_dir)}.old-", os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "dataset"))
    os.rename(tmp_dir, out_dir)
    for name in os.listdir(os.path.join(old, "dataset")):
        if DATASET_FILES.fullmatch(name):
            os.remove(os.path.join(old, "dataset", name))
    try:
        os.rmdir(os.path.join(old, "dataset"))
    except OSError:  # something we did not write appeared meanwhile: keep it, and disown the
        # folder, or a later run would remove it as the leftover of a killed one
        os.remove(os.path.join(old, OWNER_FILE))
        _log(f"note: {out_dir} was replaced; files prepare.py did not write were kept in {old}/dataset")
        return
    os.remove(os.path.join(old, OWNER_FILE))
    os.rmdir(old)


# A hidden working directory (.NAME.tmp-*, .NAME.old-*) carries the pid and host of the run that
# made it, so a later run can delete the ones whose run was killed, and never a live run's.
OWNER_FILE = ".owner"


def _make_owned_dir(prefix: str, parent: str) -> str:
    import platform

    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(path, OWNER_FILE), "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {platform.node()}\n")
    return path


def _remove_stale_work_dirs(out_dir: str) -> None:
    import platform

    parent, name = os.path.split(out_dir)
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        if not entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            continue
        try:
            with open(os.path.join(parent, entry, OWNER_FILE), encoding="utf-8") as f:
                pid, host = f.read().split()
        except (OSError, ValueError):
            continue  # not one of ours, or an older version's: leave it
        if host == platform.node() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            _log(f"removed {os.path.join(parent, entry)}, left behind by a prepare.py run that was killed")


def _prepare_into(
    cfg: PrepareConfig, tmp_dir: str, files: list[InputFile], val_files: list[InputFile],
    plan: TokenizerPlan, val_fraction: float, workers: int, demo: dict | None, t_start: float, fmt: str = "text",
) -> dict:
    threshold = val_threshold(val_fraction)
    sample_budget = int(cfg.sp_sample_mb * 1e6)
    sample = SampleSpec(files, sample_budget, cfg.text_key, threshold, cfg.max_docs, fmt)
    info, tok = materialize_tokenizer(plan, tmp_dir, sample, _log)
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    t_tokenizer = time.time() - t_start

    all_files = files + val_files
    setup = WorkerSetup(info, tmp_dir, all_files, cfg.text_key, threshold, dtype, fmt, cfg.block_size)
    use_tokenizer_in_workers(tok, setup)  # workers=1 runs here; forked workers inherit it
    preload_readers(all_files)  # pyarrow too: imported once here rather than in every worker
    writers = {s: ShardWriter(tmp_dir, s, dtype, cfg.shard_tokens, chat=fmt == "chat") for s in ("train", "val")}
    totals = {s: {"documents": 0, "bytes": 0, **({"loss_tokens": 0, "loss_bytes": 0} if fmt == "chat" else {})} for s in ("train", "val")}
    truncated = 0
    skipped: dict[str, int] = {}
    invalid_utf8, reported, n_docs, n_tokens, unchecked_cuts = 0, 0, 0, 0, 0
    total_disk = sum(f.size for f in all_files)

    from tqdm import tqdm

    # tqdm's monitor thread would make this process multi-threaded, and we fork workers below
    # (SentencePiece training ran in a child process, so no thread of it lives here either).
    tqdm.monitor_interval = 0
    bar = tqdm(total=total_disk, unit="B", unit_scale=True, desc="tokenizing", disable=not cfg.progress,
               file=sys.stderr, mininterval=1.0, smoothing=0.1)
    t_encode = time.time()

    def handle(result: TaskResult, disk: int) -> None:
        nonlocal invalid_utf8, reported, n_docs, n_tokens, truncated, unchecked_cuts
        for file_index, line, _reason, detail in result.examples:
            where = f"{all_files[file_index].path}:{line}"
            if cfg.strict:
                raise PrepareError(
                    f"{where}: {detail} (--strict stops at the first skipped record; drop --strict to skip and count it)."
                )
            if reported < MAX_REPORTED_SKIPS:
                bar.write(f"skipped {where}: {detail}", file=sys.stderr)
                reported += 1
        for reason, count in result.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        invalid_utf8 += result.invalid_utf8
        truncated += result.truncated
        unchecked_cuts += result.unchecked_cuts
        write_result(result, writers, totals)
        n_docs += result.train_docs + result.val_docs
        n_tokens += len(result.train) + len(result.val)
        bar.update(disk)
        # The bar counts bytes read from disk (compressed for .gz, which keeps its ETA right);
        # the postfix adds the rate in document text, the unit of the benchmarks.
        text_mb = (totals["train"]["bytes"] + totals["val"]["bytes"]) / 1e6
        rate = text_mb / max(time.time() - t_encode, 1e-9)
        bar.set_postfix(docs=f"{n_docs:,}", tokens=f"{n_tokens:,}", text=f"{text_mb:,.0f}MB@{rate:.1f}MB/s", refresh=False)

    tasks = iter_tasks(all_files, max(1, int(cfg.chunk_mb * 1e6)), cfg.max_docs, cfg.text_key)
    try:
        if workers == 1:  # no pool: simpler to debug, and no process start-up cost
            init_worker(setup)
            for pieces, disk in tasks:
                handle(process_task(pieces), disk)
        else:
            _run_pool(setup, workers, tasks, handle)
    finally:
        bar.close()
    shards = {s: w.close() for s, w in writers.items()}
    if unchecked_cuts:
        _log(f"note: {unchecked_cuts} cut(s) inside documents longer than {LONG_TEXT:,} characters found no place that keeps "
             "the tokens exactly (no newline or space nearby); the tokens at those cuts may differ slightly from a whole encode")
    t_done = time.time()
    check_totals(n_docs, totals, shards, skipped, invalid_utf8, val_fraction, bool(val_files))

    text_mb = (totals["train"]["bytes"] + totals["val"]["bytes"]) / 1e6
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": info,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "byte_order": "little",
        "eot_id": tok.eot_id,
        "splits": {
            s: {"shards": shards[s], "tokens": sum(x["tokens"] for x in shards[s]), **totals[s]}
            for s in ("train", "val")
        },
        "skipped": dict(sorted(skipped.items())),
        "invalid_utf8": invalid_utf8,
        "chat": chat_meta(cfg, info, truncated, skipped) if fmt == "chat" else None,
        "demo": demo,
        "inputs": [f.path for f in files],
        "val_inputs": [f.path for f in val_files],
        "val_fraction": val_fraction,
        "text_key": cfg.text_key,
        "txt_mode": "file" if demo and demo["name"] == "python" else cfg.txt_mode,
        "shard_tokens": cfg.shard_tokens,
        "max_docs": cfg.max_docs,
        "command": cfg.command,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timing_s": {
            "tokenizer": round(t_tokenizer, 3),
            "encode": round(t_done - t_encode, 3),
            "total": round(time.time() - t_start, 3),
            "encode_text_mb_per_s": round(text_mb / max(t_done - t_encode, 1e-9), 3),
            "workers": workers,
        },
    }
    with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return meta


def write_result(result: TaskResult, writers: dict[str, ShardWriter], totals: dict) -> None:
    """Append one task's tokens (for chat data with masks and conversations) to the shards."""
    for split in ("train", "val"):
        tokens = getattr(result, split)
        if split in result.conversations:
            writers[split].write_conversations(tokens, result.masks[split], result.conversations[split])
            totals[split]["loss_tokens"] += int(result.masks[split].sum())
            totals[split]["loss_bytes"] += result.reply_bytes[split]
        else:
            writers[split].write(tokens)
        totals[split]["documents"] += getattr(result, f"{split}_docs")
        totals[split]["bytes"] += getattr(result, f"{split}_bytes")


def chat_meta(cfg: PrepareConfig, info: dict, truncated: int, skipped: dict) -> dict:
    """meta.json's "chat": how conversations are stored and what fitting them to block_size did."""
    return {"template": "chatml", **CHAT_FILES, "block_size": cfg.block_size, "truncated": truncated,
            "too_long": skipped.get("too_long", 0), "chat_tokens_added": info.get("chat_tokens_added", 0)}


def check_totals(n_docs: int, totals: dict, shards: dict, skipped: dict, invalid_utf8: int, val_fraction: float, val_input: bool) -> None:
    """After tokenizing: refuse a corpus without documents or a split that picked no validation
    document; warn about a validation split too small to say much, and report what was skipped."""
    if n_docs == 0:
        what = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "the input is empty"
        raise PrepareError(f"No documents found in the input ({what}); check --input, --text_key and --txt_mode.")
    if val_fraction > 0 and totals["val"]["documents"] == 0:
        raise PrepareError(
            f"No document was picked for validation out of {n_docs} (--val_fraction {val_fraction}); "
            "raise --val_fraction or pass --val_input."
        )
    val_tokens = sum(x["tokens"] for x in shards["val"])
    if 0 < val_tokens < ONE_EVAL_TOKENS / 4:
        fix = "pass a larger --val_input" if val_input else f"raise --val_fraction (now {val_fraction:g}) or pass --val_input"
        _log(f"warning: the validation split has only {val_tokens:,} tokens ({totals['val']['documents']:,} documents), under "
             f"a quarter of the {ONE_EVAL_TOKENS:,} that one evaluation with train.py's defaults reads, so its loss "
             f"will be noisy; {fix}.")
    if skipped:
        _log("skipped records: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    if invalid_utf8:
        _log(f"note: {invalid_utf8} record(s) had invalid UTF-8 and were decoded with U+FFFD replacement characters")


def _default_sigint() -> None:
    """Child processes die on Ctrl-C at once (even inside C++ code such as SentencePiece training)
    instead of each printing a KeyboardInterrupt traceback; the main process cleans up. They
    also die with the main process: after a kill -9 of it, nobody would ever collect their
    results, and each holds its tokenizer and tasks in memory."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that `kill` (SIGTERM) also removes the temporary directory


def _init_pool_worker(setup: WorkerSetup) -> None:
    _default_sigint()
    init_worker(setup)


def _run_pool(
    setup: WorkerSetup, workers: int, tasks: Iterator[tuple[list[Piece], int]],
    handle: Callable[[TaskResult, int], None],
) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # ProcessPoolExecutor rather than multiprocessing.Pool: if a worker dies (OOM killer) or its
    # initializer fails, Pool silently respawns and waits forever; the executor raises instead.
    pool = ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=_init_pool_worker, initargs=(setup,))
    # executor.map would queue the whole input at once if the workers fall behind the reader, so we
    # keep at most 3 tasks per worker in flight ourselves (enough that a slow task at the head of
    # the queue does not leave the other workers idle), and consume results strictly in order.
    pending: deque[tuple[Any, int]] = deque()
    try:
        for pieces, disk in tasks:
            pending.append((pool.submit(process_task, pieces), disk))
            if len(pending) >= 3 * workers:
                future, d = pending.popleft()
                handle(future.result(), d)
        while pending:
            future, d = pending.popleft()
            handle(future.result(), d)
    except BrokenProcessPool:
        raise PrepareError(
            "A tokenizer worker process died (most likely out of memory); use fewer --workers or a smaller --chunk_mb."
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> PrepareConfig:
    p = OneLineParser(
        prog="prepare.py", error_prefix="prepare.py: error: ",
        description="Tokenize a .jsonl/.txt (.gz/.xz/.zst) or .parquet corpus into uint16/uint32 token shards for train.py. "
        "With no --input, builds the demo dataset from the Russian literature shipped in demo/.",
    )
    p.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="files, directories (recursive) or globs of .jsonl/.txt, optionally .gz, .xz or .zst "
                   "(zstd needs pip install zstandard), and .parquet (needs pip install pyarrow)")
    p.add_argument("--demo", choices=tuple(DEMOS), default=None,
                   help="build a built-in demo instead of --input: ru (the default without --input; Russian "
                   f"literature -> {DEMOS['ru'].out_dir}), python (the Python standard library source -> "
                   f"{DEMOS['python'].out_dir}) or chat (synthetic conversations to fine-tune the ru demo's model on -> "
                   f"{DEMOS['chat'].out_dir}; a pipeline demo)")
    p.add_argument("--val_input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="separate validation corpus (then every --input document goes to train)")
    p.add_argument("--val_fraction", type=float, default=None,
                   help=f"fraction of documents picked for val by a hash of their text "
                   f"(default {DEFAULT_VAL_FRACTION}, demos {DEMOS['ru'].val_fraction} / {DEMOS['python'].val_fraction})")
    p.add_argument("--text_key", default="text", help="JSON key (.jsonl) or column (.parquet) holding the document text (default text)")
    p.add_argument("--txt_mode", choices=("line", "file"), default="line",
                   help=".txt: one document per line (default), or the whole file as one document")
    p.add_argument("--format", choices=("auto", "text", "chat"), default="auto",
                   help="chat: .jsonl conversations ({\"messages\": [{\"role\", \"content\"}, ...]} or ShareGPT's "
                   "{\"conversations\": [...]}) with a loss mask on the replies; auto (default): chat if the first record is one")
    p.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="chat: the block_size you will train with; a conversation longer than it is truncated, one whose "
                   f"first reply starts past it skipped, both counted in meta.json (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--tokenizer", default=None,
                   help=f"sp:N (train SentencePiece BPE), a .model file, a .tiktoken file, hf:DIR (a local HF model's tokenizer), or one of "
                   f"{', '.join(TIKTOKEN_NAMES)} (default {DEFAULT_TOKENIZER}, demos {DEMOS['ru'].tokenizer} / {DEMOS['python'].tokenizer})")
    p.add_argument("--tiktoken_pattern", default=DEFAULT_TIKTOKEN_PATTERN,
                   help="pre-split regex for a bare .tiktoken file (default: the cl100k_base pattern)")
    p.add_argument("--sp_sample_mb", type=float, default=DEFAULT_SP_SAMPLE_MB,
                   help=f"MB of text sampled from the input to train sp:N "
                   f"(default {DEFAULT_SP_SAMPLE_MB:g}; RAM use is ~8x this)")
    p.add_argument("--out_dir", default=None,
                   help=f"output directory (default data/<first input name>, demos {DEMOS['ru'].out_dir} / {DEMOS['python'].out_dir})")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all CPU cores)")
    p.add_argument("--chunk_mb", type=float, default=DEFAULT_CHUNK_MB,
                   help=f"MB of input per worker task (default {DEFAULT_CHUNK_MB:g})")
    p.add_argument("--max_docs", type=int, default=None,
                   help="stop after this many input records (lines, parquet rows, or files with --txt_mode file), for quick trials")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument("--strict", action="store_true", help="stop with an error at the first skipped record")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.workers < 0:
        p.error("--workers must be >= 0")
    for flag in ("chunk_mb", "sp_sample_mb"):  # float() also takes nan and inf
        if not 0 < getattr(a, flag) < float("inf"):
            p.error(f"--{flag} must be a positive number of MB, got {getattr(a, flag)}")
    if a.shard_tokens < 1:
        p.error(f"--shard_tokens must be positive, got {a.shard_tokens}")
    return PrepareConfig(
        inputs=a.input, demo=a.demo, val_inputs=a.val_input, val_fraction=a.val_fraction, text_key=a.text_key,
        txt_mode=a.txt_mode, format=a.format, block_size=a.block_size, tokenizer=a.tokenizer, tiktoken_pattern=a.tiktoken_pattern,
        sp_sample_mb=a.sp_sample_mb, out_dir=a.out_dir, shard_tokens=a.shard_tokens, workers=a.workers,
        chunk_mb=a.chunk_mb, max_docs=a.max_docs, overwrite=a.overwrite, strict=a.strict,
        progress=not a.no_progress, command=shlex.join(["python", "prepare.py", *argv]),
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    import threading

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        prepare(cfg)
    except (PrepareError, CorpusError, TokenizerError) as e:
        _log(f"prepare.py: error: {e}")
        return 1
    except OSError as e:  # disk full, permission denied, ...: the system's message says it all
        _log(f"prepare.py: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "") + ".")
        return 1
    except KeyboardInterrupt:
        _log("prepare.py: interrupted; no dataset was written.")
        return 130
    finally:
        if on_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
