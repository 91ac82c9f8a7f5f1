"""Measure HomeLLM on this machine: training throughput and MFU, generation speed with and
without the KV cache, and prepare.py throughput against the raw tokenizer.

    python bench.py train --config config/home_25m.py            # tokens/s, MFU, peak memory
    python bench.py generate --config config/home_25m.py         # tokens/s, cached vs uncached
    python bench.py prepare --input ../shared/data/ru_literature.jsonl --tokenizer sp:32000
    python bench.py all --append docs/benchmarks.md              # everything, appended as markdown

Models are randomly initialized and fed random tokens: speed does not depend on the
weights, so no dataset or checkpoint is needed. Numbers are printed as a markdown table
with the machine's details so they can go straight into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional

import torch

import train as train_mod
from configurator import read_config_file
from model import Transformer, estimate_mfu, model_config_from_preset


def machine_details(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}", f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return "; ".join(parts)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(config: str, device: torch.device, dtype_name: str, compile_: Optional[bool], batch_size: Optional[int],
                block_size: Optional[int], steps: int, warmup: int, grad_checkpoint: bool, vocab_size: int) -> dict:
    """Forward + backward + AdamW on random tokens, the same step train.py takes."""
    values = read_config_file(config)
    cfg = train_mod.TrainConfig(**{k: v for k, v in values.items() if k in train_mod.TrainConfig.__dataclass_fields__})
    cfg.batch_size = batch_size or cfg.batch_size
    cfg.block_size = block_size or cfg.block_size
    cfg.dtype = dtype_name
    model_cfg = model_config_from_preset({**values, "block_size": cfg.block_size, "max_seq_len": max(cfg.block_size, values.get("max_seq_len") or 0)}, vocab_size)
    dtype = train_mod.resolve_dtype(cfg, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_cfg)
    if grad_checkpoint:
        train_mod.apply_grad_checkpoint(model)
    use_compile = compile_ if compile_ is not None else device.type == "cuda"
    if use_compile:
        train_mod.apply_compile(model)
    optimizer = train_mod.make_optimizer(model, cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * cfg.batch_size * cfg.block_size / elapsed
    peak, peak_source = train_mod.device_peak_flops(cfg, device)
    return {
        "bench": "train", "config": config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "compile": use_compile, "grad_checkpoint": grad_checkpoint, "batch": f"{cfg.batch_size}x{cfg.block_size}",
        "params_M": round(model.num_params() / 1e6, 2), "tokens_per_s": round(tokens_per_s),
        "mfu_pct": round(100 * estimate_mfu(model_cfg, cfg.block_size, tokens_per_s, peak), 1),
        "peak_flops": f"{peak:.3g} ({peak_source})", "peak_mem_mb": round(train_mod.peak_memory_mb(device)),
    }


@torch.no_grad()
def bench_generate(config: str, device: torch.device, prompt_len: int, new_tokens: int, vocab_size: int) -> list[dict]:
    """Greedy decoding of one sequence: the static KV cache vs re-running the whole prefix."""
    values = read_config_file(config)
    model_cfg = model_config_from_preset(values, vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_cfg).eval()
    prompt = torch.randint(0, model_cfg.vocab_size, (1, prompt_len), device=device)

    def cached():
        return model.generate(prompt, new_tokens, temperature=0)

    def uncached():
        idx = prompt
        for _ in range(new_tokens):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx

    rows = []
    for name, fn in (("KV cache", cached), ("no cache", uncached)):
        fn()  # warm-up
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        elapsed = time.perf_counter() - start
        rows.append({"bench": "generate", "config": config, "device": str(device), "mode": name,
                     "prompt": prompt_len, "new_tokens": new_tokens, "tokens_per_s": round(new_tokens / elapsed, 1)})
        rows[-1]["_tokens"] = out
    assert torch.equal(rows[0].pop("_tokens"), rows[1].pop("_tokens")), "cached and uncached greedy tokens differ"
    return rows


def bench_prepare(inputs: list[str], tokenizer: str, workers: int) -> list[dict]:
    import prepare

    return prepare.benchmark(inputs, tokenizer, workers)


def to_markdown(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("train", "generate", "prepare", "all"))
    parser.add_argument("--config", default=None, help="preset (train default: config/tiny_cpu.py; generate: config/home_25m.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--compile", default=None, type=lambda s: s.lower() in ("1", "true", "yes"), help="true/false; default on for CUDA")
    parser.add_argument("--grad_checkpoint", action="store_true")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=32000, help="for presets that take it from the tokenizer")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--input", nargs="+", default=None, help="prepare: corpus files")
    parser.add_argument("--tokenizer", default="sp:32000", help="prepare: tokenizer spec as for prepare.py")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--append", default=None, help="append the results as markdown to this file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)

    sections = []
    if args.what in ("train", "all"):
        row = bench_train(args.config or "config/tiny_cpu.py", device, args.dtype, args.compile, args.batch_size,
                          args.block_size, args.steps, args.warmup, args.grad_checkpoint, args.vocab_size)
        sections.append(("Training throughput", [row]))
    if args.what in ("generate", "all"):
        sections.append(("Generation", bench_generate(args.config or "config/home_25m.py", device, args.prompt_len, args.new_tokens, args.vocab_size)))
    if args.what in ("prepare", "all") and args.input:
        sections.append(("prepare.py throughput", bench_prepare(args.input, args.tokenizer, args.workers)))
    elif args.what == "prepare":
        sys.exit("error: bench.py prepare needs --input FILE [FILE ...]")

    command = "python bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = [f"_{time.strftime('%Y-%m-%d')}: `{command}`_  \n_{machine_details(device)}_\n"]
    for title, rows in sections:
        text.append(f"**{title}**\n\n{to_markdown(rows)}\n")
    report = "\n".join(text)
    print(report)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
