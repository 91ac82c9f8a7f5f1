"""The dataset format prepare.py writes and train.py reads: token shards plus meta.json.

    <data_dir>/meta.json                  format_version, tokenizer record, vocab_size, dtype,
                                          eot_id, splits: {train|val: {shards, tokens, documents, bytes}}
    <data_dir>/train_000000.bin ...       raw little-endian uint16/uint32 token ids, documents
    <data_dir>/val_000000.bin ...         separated by eot_id
    <data_dir>/tokenizer.model|.tiktoken  the tokenizer the ids come from

Conversations (chat data; meta.json then has a "chat" section) add two files beside each shard:
    <data_dir>/train_000000.mask          uint8 loss mask, one per token: 1 on the assistant's
                                          replies (and their closing <|im_end|>), 0 elsewhere
    <data_dir>/train_000000.conv          little-endian int64 pairs, one per conversation: its
                                          first token's offset in the shard and the offset of
                                          its first reply token from there
A conversation never continues from one shard into the next; training windows start at a
conversation's first token.

ShardWriter writes the shards (prepare.py), load_meta reads and checks meta.json, TokenShards
samples training windows from the shards, and Mixture from several datasets by weight (train.py,
--data_dir="data/a:0.8,data/b:0.2"; open_mixture opens and checks them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Optional

from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:  # torch is imported where it is used: prepare.py never needs it
    import torch

FORMAT_VERSION = 1
# Where chat data keeps a shard's mask and conversation index (str.format with split, index).
CHAT_FILES = {"mask_file": "{split}_{index:06d}.mask", "conv_file": "{split}_{index:06d}.conv"}


class DatasetError(RuntimeError):
    """A prepared dataset directory is missing or unreadable; the message says what to do."""


def load_meta(data_dir: str) -> dict:
    """Read <data_dir>/meta.json written by prepare.py."""
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"no dataset at {data_dir} ({path} is missing); run `python prepare.py` first or pass --data_dir") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"Cannot read {path} ({e}); re-run prepare.py for this dataset.") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DatasetError(f"{path} has format_version {version}, this code reads {FORMAT_VERSION}; re-run prepare.py.")
    try:  # the fields readers rely on, so a hand-edited meta.json fails here and not mid-run
        np.dtype(meta["dtype"])
        int(meta["vocab_size"]), int(meta["eot_id"]), meta["tokenizer"]["kind"]
        for split in meta["splits"].values():
            [(str(s["file"]), int(s["tokens"]), int(s.get("conversations", 0))) for s in split["shards"]]
        if meta.get("chat") and {k: meta["chat"][k] for k in CHAT_FILES} != CHAT_FILES:
            raise ValueError(f"chat file names {[meta['chat'][k] for k in CHAT_FILES]} are not this code's {list(CHAT_FILES.values())}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path} is incomplete or malformed ({type(e).__name__}: {e}); re-run prepare.py.") from None
    return meta


def bits_per_byte(loss_nats: float, split_meta: dict) -> float:
    """A split's mean loss per token (nats) as bits per byte of its UTF-8 text, from the token
    and byte counts prepare.py recorded for it: comparable across tokenizers, unlike the loss.
    Chat data counts only what the loss covers, the replies. NaN for datasets whose meta.json
    has no byte count."""
    tokens, size = split_meta.get("loss_tokens", split_meta.get("tokens")), split_meta.get("loss_bytes", split_meta.get("bytes"))
    if not size:
        return float("nan")
    return loss_nats / math.log(2) * tokens / size


def chat_file(key: str, split: str, index: int) -> str:
    """The name of a chat shard's mask ("mask_file") or conversation index ("conv_file")."""
    return CHAT_FILES[key].format(split=split, index=index)


def verify_shards(data_dir: str, meta: dict) -> None:
    """Check the shards against meta.json before training on them: every shard exists and
    holds exactly tokens x itemsize bytes (a uint32 file under a uint16 meta, a truncated copy
    or a missing shard fails here), and every id in it is below vocab_size: one out-of-range id
    anywhere would stop the run with an IndexError whenever a window reaches it. The max is
    taken in chunks of 64M tokens, at memory speed (seconds for billions of tokens)."""
    dtype = np.dtype(meta["dtype"])
    for split, info in meta["splits"].items():
        for index, shard in enumerate(info.get("shards", [])):
            path = os.path.join(data_dir, shard["file"])
            try:
                size = os.path.getsize(path)
            except OSError:
                raise DatasetError(f"{path} is missing but listed in {data_dir}/meta.json; re-run prepare.py for this dataset") from None
            if size != shard["tokens"] * dtype.itemsize:
                raise DatasetError(
                    f"{path} has {size:,} bytes but meta.json promises {shard['tokens']:,} {dtype.name} tokens "
                    f"({shard['tokens'] * dtype.itemsize:,} bytes); the shard was truncated or rewritten: re-run prepare.py"
                )
            if meta.get("chat"):
                _verify_chat_files(data_dir, split, index, shard)
            if shard["tokens"] == 0 or np.iinfo(dtype).max < meta["vocab_size"]:
                continue  # (the dtype cannot hold an id that large)
            tokens = np.memmap(path, dtype=dtype, mode="r")
            chunk = 1 << 26
            top = max(int(tokens[start : start + chunk].max()) for start in range(0, len(tokens), chunk))
            del tokens
            if top >= meta["vocab_size"]:
                raise DatasetError(
                    f"{path} holds token id {top} but the tokenizer has vocab_size={meta['vocab_size']}; "
                    "the shard does not belong to this meta.json: re-run prepare.py"
                )


def _verify_chat_files(data_dir: str, split: str, index: int, shard: dict) -> None:
    """A chat shard's mask holds a byte per token and its index 16 bytes per conversation."""
    for key, size in (("mask_file", shard["tokens"]), ("conv_file", 16 * shard.get("conversations", 0))):
        path = os.path.join(data_dir, chat_file(key, split, index))
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise DatasetError(f"{path} is missing or not {size:,} bytes as meta.json implies; re-run prepare.py for this dataset")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_fingerprint(data_dir: str, meta: dict) -> str:
    """SHA-256 of the dataset's tokenizer file: two datasets with equal vocab sizes can still
    map ids to different text, and a checkpoint must keep decoding with the one it learned."""
    path = os.path.join(data_dir, meta["tokenizer"].get("file") or "")
    try:
        return file_sha256(path)
    except OSError as err:
        raise DatasetError(f"cannot read the tokenizer file {path} ({err.strerror}); re-run prepare.py for this dataset") from None


class TokenShards:
    """Random windows of block_size + 1 tokens from one split of a prepare.py dataset.

    Window starts are uniform over every position where a whole window fits inside a shard.
    Chat data instead starts every window at a conversation's first token (uniform over the
    conversations), pads a window that runs past the shard's end, and gives targets -1 (no
    loss) wherever the loss mask is 0. A conversation whose first reply token lies beyond the
    window is left out (too_long); one that is longer than the window is cut (truncated).
    The memmaps are opened per read: a long-lived np.memmap keeps every page it touched
    mapped, so a process reading a 100 GB corpus would appear to grow without bound.
    """

    def __init__(self, data_dir: str, meta: dict, split: str, block_size: int):
        self.window = block_size + 1
        self.dtype = np.dtype(meta["dtype"])
        shards = meta["splits"].get(split, {}).get("shards", [])
        self.paths = [os.path.join(data_dir, s["file"]) for s in shards]
        self.chat = bool(meta.get("chat"))
        self.too_long = self.truncated = 0  # chat: conversations left out / cut at this block_size
        if self.chat:
            self.pad_id = int(meta["eot_id"])  # fills a window that runs past the shard's end (no loss there)
            self.mask_paths = [os.path.join(data_dir, chat_file("mask_file", split, i)) for i in range(len(shards))]
            self.conversation_starts = []
            for i, shard in enumerate(shards):
                conv = np.fromfile(os.path.join(data_dir, chat_file("conv_file", split, i)), dtype="<i8").reshape(-1, 2)
                # Kept: a reply token among the window's targets (positions 1..block_size).
                fits, lengths = conv[:, 1] < self.window, np.diff(np.append(conv[:, 0], shard["tokens"]))
                self.too_long += int((~fits).sum())
                self.truncated += int((fits & (lengths > self.window)).sum())
                self.conversation_starts.append(conv[fits, 0])
            starts = np.array([len(c) for c in self.conversation_starts], dtype=np.int64)
        else:
            starts = np.array([max(0, s["tokens"] - self.window + 1) for s in shards], dtype=np.int64)
        self.cum_starts = np.cumsum(starts)
        self.num_windows = int(self.cum_starts[-1]) if len(shards) else 0

    def sample(self, seed: list[int], count: int) -> list[tuple[int, int]]:
        """`count` (shard, offset) pairs drawn from a generator seeded by `seed`."""
        rng = np.random.default_rng(seed)
        flat = rng.integers(0, self.num_windows, size=count)
        shard = np.searchsorted(self.cum_starts, flat, side="right")
        before = np.concatenate([[0], self.cum_starts])[shard]
        if self.chat:
            return [(s, int(self.conversation_starts[s][i])) for s, i in zip(shard.tolist(), (flat - before).tolist())]
        return list(zip(shard.tolist(), (flat - before).tolist()))

    def read(self, picks: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the picked windows, each (len(picks), block_size); targets are
        -1 where the loss mask is 0."""
        import torch

        rows = np.full((len(picks), self.window), self.pad_id if self.chat else 0, dtype=np.int64)
        masks = np.zeros((len(picks), self.window), dtype=bool) if self.chat else None
        for i, (shard, offset) in enumerate(picks):
            tokens = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")[offset : offset + self.window]
            rows[i, : len(tokens)] = tokens
            if self.chat:
                masks[i, : len(tokens)] = np.memmap(self.mask_paths[shard], dtype=np.uint8, mode="r")[offset : offset + self.window]
        if self.chat:  # (a fresh tensor for the targets: they no longer share x's storage)
            targets = torch.from_numpy(np.where(masks[:, 1:], rows[:, 1:], -1))
            return _to_device(torch.from_numpy(rows[:, :-1].copy()), device), _to_device(targets, device)
        batch = _to_device(torch.from_numpy(rows), device)
        return batch[:, :-1], batch[:, 1:]

    def count_targets(self, picks: list[tuple[int, int]]) -> int:
        """How many targets of these windows count in the loss: all of them, or for chat data
        those the mask keeps. The loss of a step is the mean over its global batch's targets."""
        if not self.chat:
            return len(picks) * (self.window - 1)
        return sum(int(np.memmap(self.mask_paths[s], dtype=np.uint8, mode="r")[o + 1 : o + self.window].sum()) for s, o in picks)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def check_splits(data_dir: str, meta: dict, train_data: TokenShards, val_data: TokenShards, windows_per_eval: int) -> list[str]:
    """Refuse a train split without a single window; return warnings about the rest: chat data
    that does not fit block_size, and a val split too small for windows_per_eval windows."""
    if train_data.num_windows == 0:
        if train_data.chat:
            raise DatasetError(f"no conversation of {data_dir} has a reply within block_size={train_data.window - 1} tokens; raise block_size")
        raise DatasetError(f"the train split of {data_dir} has fewer than block_size+1={train_data.window} tokens in every shard; "
                           "lower block_size or add data")
    warnings = []
    if train_data.too_long or train_data.truncated:
        warnings.append(f"at block_size={train_data.window - 1}, {train_data.truncated:,} training conversation(s) are cut short and "
                        f"{train_data.too_long:,} left out (no reply within it); a larger block_size keeps more of them")
    warning = val_split_warning(data_dir, meta, val_data, windows_per_eval)
    return warnings + [warning] if warning else warnings


def val_split_warning(data_dir: str, meta: dict, val_data: TokenShards, windows_per_eval: int) -> Optional[str]:
    """Why validation cannot run, or would re-read the same few tokens at every evaluation of
    windows_per_eval windows; None when the val split is big enough."""
    val_tokens = meta["splits"].get("val", {}).get("tokens", 0)
    read = windows_per_eval * val_data.window
    fix = "re-run prepare.py with a larger --val_fraction or a --val_input"
    if val_data.num_windows == 0:
        return (f"the val split of {data_dir} ({val_tokens:,} tokens) holds no window of block_size+1={val_data.window} tokens, "
                f"so there will be no val loss or bits per byte; {fix}")
    if val_tokens < read:
        return (f"the val split of {data_dir} has {val_tokens:,} tokens but one evaluation reads {read:,} "
                f"(eval_iters x batch_size windows), so its windows overlap and val loss is noisy; {fix}, or lower --eval_iters")
    return None


class Mixture:
    """Windows from several prepared datasets (sources) in fixed proportions, with TokenShards'
    sample/read interface; a picked window is (source, shard, offset). One source draws exactly
    what its TokenShards would.

    sample(seed=[run seed, step], count) gives step `step` the windows step*count ... (step+1)*count-1
    of the run's schedule, in which source k holds round(n * (w_1 + ... + w_k)) - round(n * (w_1 +
    ... + w_{k-1})) of the first n windows: every source's share stays within one window of its
    weight at every step, with no randomness in the counts. Each source then draws its windows
    from a generator seeded by (seed, source), and a last generator shuffles the batch, so that
    every rank and micro-batch sees the mix. All of it depends only on (seed, step, count): DDP
    equals one process, and a resumed run draws what the uninterrupted one would have."""

    def __init__(self, paths: list[str], weights: list[float], metas: list[dict], sources: list[TokenShards], widest: int = 0):
        self.paths, self.weights, self.metas, self.sources = paths, weights, metas, sources
        self.meta = metas[widest]  # the tokenizer and vocabulary of them all (see widest_tokenizer)
        self.window = sources[0].window
        bounds = np.cumsum(weights)
        bounds[-1] = 1.0  # exactly: the last source takes what rounding leaves
        self.bounds = np.concatenate([[0.0], bounds])

    def windows_before(self, n: int) -> np.ndarray:
        """How many of the run's first n windows each source supplies."""
        return np.diff(np.floor(n * self.bounds + 0.5).astype(np.int64))

    def sample(self, seed: list[int], count: int) -> list[tuple[int, int, int]]:
        if len(self.sources) == 1:
            return [(0, shard, offset) for shard, offset in self.sources[0].sample(seed, count)]
        step = seed[-1]
        counts = self.windows_before((step + 1) * count) - self.windows_before(step * count)
        picks = [(k, shard, offset) for k, source in enumerate(self.sources)
                 for shard, offset in source.sample([*seed, k], int(counts[k]))]
        order = np.random.default_rng([*seed, len(self.sources)]).permutation(len(picks))
        return [picks[i] for i in order]

    def read(self, picks: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the picked windows, in the order picked: each source reads its own."""
        import torch

        if len(self.sources) == 1:
            return self.sources[0].read([(shard, offset) for _, shard, offset in picks], device)
        rows: list[int] = []
        xs, ys = [], []
        for k, source in enumerate(self.sources):
            mine = [i for i, pick in enumerate(picks) if pick[0] == k]
            if mine:
                x, y = source.read([picks[i][1:] for i in mine], torch.device("cpu"))
                rows += mine
                xs.append(x)
                ys.append(y)
        where = torch.empty(len(rows), dtype=torch.long)
        where[torch.tensor(rows)] = torch.arange(len(rows))  # row i of the batch is row where[i] of the parts
        x, y = torch.cat(xs)[where], torch.cat(ys)[where]
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    @property
    def chat(self) -> bool:
        """Whether any source holds conversations (a loss mask on the replies)."""
        return any(source.chat for source in self.sources)

    def count_targets(self, picks: list[tuple[int, int, int]]) -> int:
        """How many targets of the picked windows count in the loss (see TokenShards.count_targets)."""
        return sum(source.count_targets([pick[1:] for pick in picks if pick[0] == k]) for k, source in enumerate(self.sources))

    def val_metrics(self, losses: dict[str, float]) -> dict:
        """An evaluation's record from each source's mean val loss (sources without val windows
        left out): val_loss and val_bpb are the means weighted as the mixture is, the same as
        the source's own for one source; source_val_loss and source_val_bpb hold each source's."""
        picked = [k for k, path in enumerate(self.paths) if path in losses]
        total = sum(self.weights[k] for k in picked)
        bpbs = {self.paths[k]: bits_per_byte(losses[self.paths[k]], self.metas[k]["splits"]["val"]) for k in picked}
        val_loss = sum(self.weights[k] / total * losses[self.paths[k]] for k in picked)
        val_bpb = sum(self.weights[k] / total * bpbs[self.paths[k]] for k in picked)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": val_bpb,
                "source_val_loss": losses, "source_val_bpb": bpbs}

    def count_tokens(self, counts: dict[str, int], first_step: int, last_step: int, global_batch: int) -> dict[str, int]:
        """counts plus the tokens each source supplies to steps first_step ... last_step - 1 (a
        window trains block_size tokens), keyed by the source's path as data_dir gives it."""
        windows = self.windows_before(last_step * global_batch) - self.windows_before(first_step * global_batch)
        out = dict(counts)
        for path, n in zip(self.paths, windows.tolist()):
            out[path] = out.get(path, 0) + n * (self.window - 1)
        return out


def open_mixture(sources: list[tuple[str, float]], block_size: int, windows_per_eval: int) -> tuple[Mixture, Mixture, str, list[str]]:
    """The train and val windows of the datasets in `sources` ((path, weight) pairs, weights
    summing to 1), each checked against its meta.json, their tokenizer's fingerprint, and
    warnings about their val splits. All sources must share one tokenizer, byte for byte: a
    DatasetError names the odd one out."""
    metas, train, val, warnings = [], [], [], []
    fingerprint = ""
    for path, _ in sources:
        meta = load_meta(path)
        verify_shards(path, meta)
        sha = tokenizer_fingerprint(path, meta)
        if fingerprint and sha != fingerprint:
            first = sources[0][0]
            raise DatasetError(f"{path} was prepared with another tokenizer than {first} (sha256 {sha[:12]} vs {fingerprint[:12]}); "
                               f"the datasets of a mixture share one: prepare {path} again with --tokenizer {os.path.join(first, metas[0]['tokenizer'].get('file') or '')}")
        fingerprint = sha
        metas.append(meta)
        train.append(TokenShards(path, meta, "train", block_size))
        val.append(TokenShards(path, meta, "val", block_size))
        warnings += check_splits(path, meta, train[-1], val[-1], windows_per_eval)
    paths, weights = [p for p, _ in sources], [w for _, w in sources]
    widest = widest_tokenizer(paths, metas)
    return (Mixture(paths, weights, metas, train, widest), Mixture(paths, weights, metas, val, widest), fingerprint, warnings)


def widest_tokenizer(paths: list[str], metas: list[dict]) -> int:
    """Which source's meta.json describes the tokenizer of them all. With one tokenizer file,
    a chat dataset's record may hold more special tokens than a text dataset's (prepare.py
    appends the chat tokens to a tiktoken encoding's record): the model needs room for every id,
    so the record with most tokens wins, provided the others number their special tokens as it
    does. Anything else is another tokenizer: a DatasetError."""
    widest = max(range(len(metas)), key=lambda k: metas[k]["vocab_size"])
    specials = (metas[widest]["tokenizer"].get("special_tokens") or {}).items()
    for path, meta in zip(paths, metas):
        if meta["eot_id"] != metas[widest]["eot_id"] or not (meta["tokenizer"].get("special_tokens") or {}).items() <= specials:
            raise DatasetError(f"{path} numbers its special tokens differently from {paths[widest]}; the datasets of a mixture share "
                               f"one tokenizer: prepare {path} again with --tokenizer {os.path.join(paths[widest], metas[widest]['tokenizer'].get('file') or '')}")
    return widest


class ShardWriter:
    """Appends token arrays to <prefix>_000000.bin, <prefix>_000001.bin, ... of shard_tokens each.

    Documents may continue from one shard into the next; every shard except the last is full.
    chat=True: write_conversations keeps each conversation inside one shard (a shard ends
    before the conversation that would overflow it) and writes the mask and index files.
    """

    def __init__(self, out_dir: str, prefix: str, dtype: str, shard_tokens: int, chat: bool = False) -> None:
        self.out_dir, self.prefix, self.dtype, self.shard_tokens = out_dir, prefix, np.dtype(dtype), shard_tokens
        self.chat = chat
        self.shards: list[dict] = []
        self._files: list[Any] = []  # the open shard's .bin (and for chat .mask, .conv)

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if not self._files or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._append(part)

    def write_conversations(self, tokens: np.ndarray, mask: np.ndarray, conversations: np.ndarray) -> None:
        """tokens and their loss mask, holding whole conversations; conversations: (n, 2) int64
        rows of (start offset in tokens, offset of the first reply token from that start)."""
        bounds = np.append(conversations[:, 0], len(tokens))
        i = 0
        while i < len(conversations):
            used = self.shards[-1]["tokens"] if self._files else 0
            if not self._files or (used and used + bounds[i + 1] - bounds[i] > self.shard_tokens):
                self._open_next()
                used = 0
            # As many whole conversations as fit in the room left, and at least one.
            j = max(i + 1, int(np.searchsorted(bounds, bounds[i] + self.shard_tokens - used, side="right")) - 1)
            j = min(j, len(conversations))
            begin, end = bounds[i], bounds[j]
            index = conversations[i:j] - [begin - used, 0]
            self._files[2].write(index.astype("<i8").tobytes())
            self.shards[-1]["conversations"] += j - i
            self._files[1].write(mask[begin:end].astype(np.uint8).tobytes())
            self._append(tokens[begin:end])
            i = j

    def _append(self, part: np.ndarray) -> None:
        # "<" = little-endian on disk whatever the machine, as meta.json promises.
        self._files[0].write(part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self.close()
        index = len(self.shards)
        name = f"{self.prefix}_{index:06d}.bin"
        self._files = [open(os.path.join(self.out_dir, name), "wb")]
        self.shards.append({"file": name, "tokens": 0})
        if self.chat:
            self._files += [open(os.path.join(self.out_dir, chat_file(key, self.prefix, index)), "wb") for key in CHAT_FILES]
            self.shards[-1]["conversations"] = 0

    def close(self) -> list[dict]:
        for f in self._files:
            f.close()
        self._files = []
        return self.shards
