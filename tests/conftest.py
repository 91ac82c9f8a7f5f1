"""Fixtures and helpers shared by the role tests."""

import base64
import json
import random
from typing import Iterable, Iterator, Sequence

import pytest
import regex  # tiktoken's dependency
import torch

import prepare
from dataset import load_meta
from sample import TextStreamer
from tokenizer import Tokenizer, load_tokenizer

# A small model that still has every feature on: GQA, qkv bias, untied head would be
# another variant; these runs take well under a second per step on 2 cores.
TINY = [
    "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--block_size=32",
    "--batch_size=4", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=3",
    "--eval_iters=2", "--log_interval=1", "--device=cpu", "--compile=False",
]


def write_byte_tokenizer(path) -> None:
    """A byte-level .tiktoken file: 256 single-byte tokens (then <|endoftext|> = 256)."""
    ranks = {bytes([i]): i for i in range(256)}
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))


def learn_bpe_ranks(texts: Iterable[str], pat_str: str, merges: int) -> dict[bytes, int]:
    """A small byte-level BPE, as tiktoken ranks: the 256 bytes in a shuffled rank order (as in
    real encodings), then `merges` learned merges of the pieces pat_str splits texts into."""
    byte_order = list(range(256))
    random.Random(1).shuffle(byte_order)
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    words: dict[tuple[bytes, ...], int] = {}
    for piece in regex.findall(pat_str, "\n".join(texts)):
        word = tuple(bytes([b]) for b in piece.encode("utf-8"))
        words[word] = words.get(word, 0) + 1
    for _ in range(merges):
        pairs: dict[tuple[bytes, bytes], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        ranks.setdefault(best[0] + best[1], len(ranks))  # two merges may spell the same bytes
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return ranks


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    """A byte-level tiktoken dataset of patterned Latin and Cyrillic text."""
    root = tmp_path_factory.mktemp("data")
    write_byte_tokenizer(root / "bytes.tiktoken")
    rng = random.Random(0)
    words = ["привет", "мир", "кот", "спит", "the", "cat", "sat", "on", "mat", "дом", "и", "a"]
    with open(root / "corpus.txt", "w", encoding="utf-8") as f:
        for _ in range(1500):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "\n")
    out = root / "ds"
    prepare.main([
        "--input", str(root / "corpus.txt"), "--tokenizer", str(root / "bytes.tiktoken"),
        "--out_dir", str(out), "--val_fraction", "0.1", "--workers", "1",
    ])
    return str(out)


def load_dataset_tokenizer(data_dir: str) -> Tokenizer:
    """The tokenizer a prepared dataset was built with."""
    return load_tokenizer(load_meta(data_dir)["tokenizer"], data_dir)


def token_bytes(tok: Tokenizer, id: int) -> bytes:
    """Raw bytes that token id stands for; special and control tokens stand for no bytes."""
    id = int(id)
    if id in tok.special_ids:
        return b""
    if tok.kind == "tiktoken":
        return tok.impl.decode_single_token_bytes(id)
    sp = tok.impl
    if sp.is_byte(id):  # byte-fallback piece "<0xNN>"
        return bytes([int(sp.id_to_piece(id)[3:5], 16)])
    return sp.id_to_piece(id).replace("\u2581", " ").encode("utf-8")


def stream_decode(tokenizer, ids: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
    """Yield correctly decoded text chunks for ids as they arrive (see TextStreamer)."""
    streamer = TextStreamer(tokenizer, context)
    for token_id in ids:
        chunk = streamer.put(token_id)
        if chunk:
            yield chunk
    tail = streamer.end()
    if tail:
        yield tail


def shard_checkpoint(pt_path, dest, **param_group) -> None:
    """The .pt checkpoint at pt_path rewritten as an FSDP run writes one: dest/ (ckpt_STEP/)
    with DCP's .metadata and shards of {"model", "optimizer"}, plus train_state.pt with the
    rest. param_group: values put into the optimizer's first param group (as bytes entries)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = torch.load(pt_path, weights_only=True)
    shards = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
    shards["optimizer"]["param_groups"][0].update(param_group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(shards, checkpoint_id=str(dest), no_dist=True)
    torch.save(state, f"{dest}/train_state.pt")


def pickle_calling(module: str, qualname: str, arg: str) -> bytes:
    """A protocol-4 pickle that calls module.qualname(arg) when loaded. STACK_GLOBAL takes a
    dotted qualname, which pickle resolves attribute by attribute: ("some.allowed.module",
    "os.system") reaches os.system through that module's own `import os`."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(qualname) + b"\x93" + text(arg) + b"\x85R."  # STACK_GLOBAL, TUPLE1, REDUCE, STOP


# ----------------------------------------------------------------------------- chat

COPY_WORDS = ["apple", "brick", "cloud", "delta", "eagle", "flute", "grape", "honey"]
CHAT_TINY = [
    "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=80", "--batch_size=16",
    "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=10", "--eval_iters=2", "--log_interval=1",
    "--device=cpu", "--compile=False", "--dtype=float32", "--weight_decay=0.0",
]


def copy_conversation(rng: random.Random) -> tuple[str, str]:
    """A user message that is mostly random letters with one word in brackets, and the reply
    that word: only the loss on the reply can fall near zero, the random text is unlearnable."""
    def noise() -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz    ") for _ in range(rng.randint(4, 12))).strip() or "x"

    word = rng.choice(COPY_WORDS)
    return f"{noise()} [{word}] {noise()}", word


def write_copy_conversations(path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            message, word = copy_conversation(rng)
            system = [{"role": "system", "content": "copy"}] if i % 3 == 0 else []
            f.write(json.dumps({"messages": [*system, {"role": "user", "content": message}, {"role": "assistant", "content": word}]}) + "\n")


@pytest.fixture(scope="session")
def chat_dataset(tmp_path_factory) -> str:
    """Copy-task conversations tokenized with the byte-level tiktoken file: prepare.py appends
    <|im_start|> = 257 and <|im_end|> = 258 after <|endoftext|> = 256."""
    root = tmp_path_factory.mktemp("chat")
    write_byte_tokenizer(root / "bytes.tiktoken")
    write_copy_conversations(root / "chats.jsonl", 3000, seed=0)
    out = root / "ds"
    assert prepare.main(["--input", str(root / "chats.jsonl"), "--tokenizer", str(root / "bytes.tiktoken"), "--out_dir", str(out),
                         "--val_fraction", "0.05", "--workers", "1", "--no_progress", "--block_size", "80"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def chat_run(chat_dataset, tmp_path_factory) -> str:
    """A tiny model trained from scratch on chat_dataset until it copies the word: its out_dir."""
    import train

    out = tmp_path_factory.mktemp("chat-run") / "run"
    train.main([*CHAT_TINY, f"--data_dir={chat_dataset}", f"--out_dir={out}", "--max_iters=400", "--eval_interval=400"])
    return str(out)
