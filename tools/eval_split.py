"""Score a checkpoint on a whole split of a prepared dataset: the mean loss and bits per byte over
every consecutive, non-overlapping window of block_size tokens, not the random sample of
eval_iters x batch_size windows that train.py evaluates. The quality benchmark in
docs/benchmarks.md quotes both.

    python tools/eval_split.py --ckpt /tmp/bench/out12/ckpt.pt --data_dir /tmp/bench/ru8k

Each window is block_size + 1 tokens read from one shard, so a shard's last partial window and
the first token of every window (it has no context) are left out, and documents run into each
other at their end-of-text tokens as they do in training. Bits per byte use the split's
bytes-per-token ratio from meta.json, as train.py does.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402
from dataset import DatasetError, bits_per_byte, load_meta  # noqa: E402


def split_windows(data_dir: str, meta: dict, split: str, block_size: int) -> np.ndarray:
    """(windows, block_size + 1) int64 token ids: every shard of the split cut into consecutive
    windows that start block_size apart (each window's last token is the next one's first)."""
    rows = []
    for shard in meta["splits"].get(split, {}).get("shards", []):
        tokens = np.memmap(os.path.join(data_dir, shard["file"]), dtype=np.dtype(meta["dtype"]), mode="r")
        count = (len(tokens) - 1) // block_size
        if count > 0:
            starts = np.arange(count) * block_size
            rows.append(np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts]))
    if not rows:
        raise DatasetError(f"the {split} split of {data_dir} holds no window of {block_size + 1} tokens")
    return np.concatenate(rows)


@torch.no_grad()
def evaluate_split(ckpt_path: str, data_dir: str, split: str = "val", batch_size: int = 16,
                   block_size: int | None = None) -> dict:
    """Mean next-token loss, perplexity and bits per byte of the checkpoint over the whole split."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, "cpu", torch.float32, name=ckpt_path)
    block_size = block_size or int((ckpt.get("train_config") or {}).get("block_size") or model.config.max_seq_len)
    if block_size > model.config.max_seq_len:
        raise ValueError(f"--block_size {block_size} is longer than the model's context (max_seq_len={model.config.max_seq_len})")
    meta = load_meta(data_dir)
    if int(meta["vocab_size"]) > model.config.vocab_size:
        raise DatasetError(f"{data_dir}'s tokenizer has {meta['vocab_size']} tokens, more than the model's {model.config.vocab_size}")
    windows = torch.from_numpy(split_windows(data_dir, meta, split, block_size))
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        loss = model(batch[:, :-1], batch[:, 1:])
        total += float(loss) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    loss = total / count
    return {"split": split, "windows": len(windows), "tokens": count, "block_size": block_size,
            "loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(loss, meta["splits"][split])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint train.py wrote (ckpt.pt, ckpt_STEP.pt or an FSDP ckpt_STEP/)")
    p.add_argument("--data_dir", required=True, help="a dataset prepare.py made with the checkpoint's tokenizer")
    p.add_argument("--split", default="val", help="val (default) or train")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the run's block_size)")
    args = p.parse_args(argv)
    try:
        r = evaluate_split(args.ckpt, args.data_dir, args.split, args.batch_size, args.block_size)
    except (CheckpointError, DatasetError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"{args.ckpt} on the {r['split']} split of {args.data_dir}: {r['windows']} windows of {r['block_size']}, "
          f"{r['tokens']:,} tokens: loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, {r['bpb']:.4f} bits per byte")


if __name__ == "__main__":
    main()
