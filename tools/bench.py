"""Measure HomeLLM on this machine: training throughput and MFU, generation speed (KV cache
eager and compiled, no cache, and Hugging Face transformers on the same weights), and
prepare.py throughput against the raw tokenizer.

    python tools/bench.py train --config config/home_25m.py            # tokens/s, MFU, peak memory
    python tools/bench.py generate --config config/home_25m.py         # tokens/s, ours vs transformers
    python tools/bench.py prepare --input ../shared/data/ru_literature.jsonl --tokenizer sp:32000
    python tools/bench.py all --append docs/benchmarks.md              # everything, appended as markdown

Models are randomly initialized and fed random tokens: speed does not depend on the
weights, so no dataset or checkpoint is needed. Numbers are printed as a markdown table
with the machine's details so they can go straight into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: prepare.py, config/
sys.path.insert(0, REPO)  # run as `python tools/bench.py` from anywhere

from configurator import TrainConfig, parse_args
from corpus import find_input_files, iter_file_pieces, read_piece
from dataset import load_meta
from hardware import compile_decode, configure_cpu_threads, device_peak_flops, peak_memory_mb, resolve_device, resolve_dtype
from system import usable_cpus
from hf import hf_names
from model import Transformer, estimate_mfu, flops_per_token, make_optimizer
from tokenizer import load_tokenizer


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_details(device: torch.device) -> str:
    parts = [f"CPU: {cpu_model()}, {usable_cpus()} cores, torch threads {torch.get_num_threads()}", f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return "; ".join(parts)


def pick_device(name: str) -> torch.device:
    return resolve_device(name)  # auto: cuda > mps > cpu, with clear errors


def preset(config: str, **overrides: Any) -> TrainConfig:
    """A config/ preset read exactly as train.py reads it, plus overrides (None: keep the preset's)."""
    cfg = parse_args(TrainConfig, [config])
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(config: str, device: torch.device, dtype_name: str, compile_: Optional[bool], batch_size: Optional[int],
                block_size: Optional[int], steps: int, warmup: int, grad_checkpoint: bool, vocab_size: int) -> dict:
    """Forward + backward + AdamW on random tokens, the same step train.py takes."""
    cfg = preset(config, batch_size=batch_size, block_size=block_size, dtype=dtype_name)
    model_cfg = cfg.model_config(vocab_size)
    dtype = resolve_dtype(cfg.dtype, device, training=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_cfg)
    model.grad_checkpoint = grad_checkpoint
    use_compile = compile_ if compile_ is not None else device.type == "cuda"
    if use_compile:
        for block in model.layers:  # per block, as train.py's apply_compile does
            block.compile()
    optimizers = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=device.type == "cuda", kind=cfg.optimizer)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * cfg.batch_size * cfg.block_size / elapsed
    peak, peak_source = device_peak_flops(device, dtype=dtype)
    peak = max(peak, flops_per_token(model_cfg, cfg.block_size) * tokens_per_s)  # a busy moment can make the measured peak low
    return {
        "bench": "train", "config": config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "compile": use_compile, "grad_checkpoint": grad_checkpoint, "batch": f"{cfg.batch_size}x{cfg.block_size}",
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "params_M": round(model.num_params() / 1e6, 2), "tokens_per_s": round(tokens_per_s),
        "mfu_pct": round(100 * estimate_mfu(model_cfg, cfg.block_size, tokens_per_s, peak), 1),
        "peak_flops": f"{peak:.3g} ({peak_source})", "peak_mem_mb": round(peak_memory_mb(device)),
    }


def transformers_twin(model: Transformer, dtype: torch.dtype):
    """The same network as a Hugging Face LlamaForCausalLM (Qwen2ForCausalLM with q/k/v
    biases), built in this process with our weights under hf.hf_names' names; None
    when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()  # no generation-config chatter in the table
    cfg = model.config
    shape = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    if cfg.qkv_bias:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=False, **shape))
    names = hf_names(cfg)
    if cfg.tie_embeddings:
        del names["lm_head.weight"]  # tied: HF shares embed_tokens' tensor
    state = model.state_dict()
    result = hf.load_state_dict({theirs: state[ours] for ours, theirs in names.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers' model does not match ours: {result}")
    hf.generation_config.eos_token_id = None  # run all new_tokens, as ours does
    return hf.to(device=state["embed.weight"].device, dtype=dtype).eval()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """'same', or where two (1, n) rows of tokens first part: 'differ from token 37 of 272'."""
    if a.shape == b.shape and torch.equal(a, b):
        return "same"
    n = min(a.shape[1], b.shape[1])
    differ = (a[0, :n] != b[0, :n]).nonzero()
    return f"differ from token {int(differ[0]) if len(differ) else n} of {max(a.shape[1], b.shape[1])}"


@torch.no_grad()
def bench_generate(config: str, device: torch.device, prompt_len: int, new_tokens: int, vocab_size: int,
                   dtype_name: str = "float32", compile_: bool = False, repeats: int = 5, transformers_: bool = True,
                   uncached_: bool = True, mm_loops: Optional[bool] = None) -> list[dict]:
    """Greedy decoding of one sequence, batch 1: our static KV cache (eager, and with the
    decode step compiled when compile_), Hugging Face transformers' generate() on the same
    weights in the same dtype and threads (when installed), and re-running the whole prefix
    without a cache (uncached_; slow, every step costs the whole prefix). The timed modes run
    alternately, `repeats` rounds, so that a busy moment of a shared machine hits all of them:
    tokens_per_s is the median, vs_transformers the median of the per-round ratios.
    first_run_s is the warm-up run, which for the compiled mode includes compiling.
    same_tokens compares each mode's tokens with ours (eager), same_as_transformers with
    transformers'. mm_loops: as hardware.compile_decode (None: measured)."""
    model_cfg = preset(config).model_config(vocab_size)
    dtype = resolve_dtype(dtype_name, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_cfg).to(dtype).eval()
    prompt = torch.randint(0, model_cfg.vocab_size, (1, prompt_len), device=device)
    compiled = None
    if compile_:
        print(f"generate: {compile_decode(model, mm_loops)}", file=sys.stderr)
        compiled, model.compiled_decode = model.compiled_decode, None

    caches = {}  # a compiled step's KV caches, kept between its rounds as generate() keeps them (CUDA graphs replay on them)

    def ours(compiled_decode):
        def run():
            model.compiled_decode = compiled_decode
            for block, cache in zip(model.layers, caches.get(id(compiled_decode), [])):
                block.attn.cache = cache
            tokens = model.generate(prompt, new_tokens, temperature=0)
            caches[id(compiled_decode)] = [block.attn.cache for block in model.layers]
            return tokens
        return run

    def uncached():
        idx = prompt
        for _ in range(new_tokens):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx

    modes = {"KV cache": ours(None)}
    first_s = {}
    if compiled is not None:
        modes["KV cache, compiled decode"] = ours(compiled)
    hf = transformers_twin(model, dtype) if transformers_ else None
    if hf is not None:
        ones = torch.ones_like(prompt)
        modes["transformers generate"] = lambda: hf.generate(prompt, attention_mask=ones, max_new_tokens=new_tokens, do_sample=False)
    tokens, speed = {}, {name: [] for name in modes}
    for name, fn in modes.items():  # warm-up; for the compiled mode this compiles
        start = time.perf_counter()
        tokens[name] = fn()
        first_s[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in modes.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            speed[name].append(new_tokens / (time.perf_counter() - start))
    model.compiled_decode = None
    if uncached_:
        start = time.perf_counter()  # one run: it is many times slower, and the gap is the point
        tokens["no cache"] = uncached()
        sync(device)
        speed["no cache"] = [new_tokens / (time.perf_counter() - start)]

    base = {"bench": "generate", "config": config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "prompt": prompt_len, "new_tokens": new_tokens}
    rows = []
    for name, runs in speed.items():
        vs = ""
        if hf is not None and name != "transformers generate" and len(runs) == repeats:
            vs = round(statistics.median(a / b for a, b in zip(runs, speed["transformers generate"])), 2)
        rows.append({**base, "mode": name, "tokens_per_s": round(statistics.median(runs), 1), "runs": len(runs),
                     "vs_transformers": vs, "first_run_s": round(first_s[name], 1) if name in first_s else "",
                     "same_tokens": first_difference(tokens[name], tokens["KV cache"])})
        if hf is not None:  # the comparison: the tokens transformers picks on the same weights
            rows[-1]["same_as_transformers"] = first_difference(tokens[name], tokens["transformers generate"])
    return rows


# ----------------------------------------------------------------------------- prepare.py vs the raw tokenizer


DEFAULT_CHUNK_MB = 1.0  # prepare.py's default task size


def read_documents(paths: list[str], text_key: str = "text") -> list[str]:
    """Every document of the corpus files, in memory (corpus.py reads them as prepare.py does)."""
    docs = []
    for file in find_input_files(paths, "line", "train"):
        for first_line, data, _ in iter_file_pieces(file.path, file.kind, 1 << 22, text_key=text_key):
            docs.extend(d for parsed in read_piece(file.kind, data, first_line, text_key) for d in parsed.docs)
    return docs


_RAW: dict[str, Any] = {}  # the baseline's tokenizer, loaded once per process


def _load_raw_tokenizer(info: dict, data_dir: str) -> None:
    if "tokenizer" not in _RAW:  # a forked worker inherits the parent's
        _RAW["tokenizer"] = load_tokenizer(info, data_dir)


def raw_tokenizer_throughput(
    paths: list[str], data_dir: str, workers: int, text_key: str = "text", chunk_mb: float = DEFAULT_CHUNK_MB
) -> dict:
    """Baseline for prepare.py: the bare tokenizer of dataset data_dir in `workers` processes.

    A generous baseline: all documents are parsed into memory first (so use benchmark-sized files
    only) and handed over in the form each library encodes fastest (UTF-8 bytes for SentencePiece,
    str for tiktoken); the timer covers only the encode calls (SentencePiece's batch encode,
    tiktoken's encode_to_numpy) over ~chunk_mb batches on an already started pool, and only
    token counts travel back. cpu_s adds up the CPU time of all processes.
    """
    import multiprocessing
    import resource
    from concurrent.futures import ProcessPoolExecutor

    info = load_meta(data_dir)["tokenizer"]
    _RAW.clear()
    _load_raw_tokenizer(info, data_dir)
    as_bytes = _RAW["tokenizer"].kind == "sentencepiece"
    batches: list[list[Any]] = [[]]
    n_bytes, size = 0, 0
    for text in read_documents(paths, text_key):
        b = text.encode("utf-8")
        batches[-1].append(b if as_bytes else text)
        n_bytes, size = n_bytes + len(b), size + len(b)
        if size >= chunk_mb * 1e6:
            batches.append([])
            size = 0

    def cpu(who: int) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    if workers == 1:
        c0, t0 = cpu(resource.RUSAGE_SELF), time.perf_counter()
        n_tokens = sum(map(_raw_encode, batches))
        seconds, cpu_s = time.perf_counter() - t0, cpu(resource.RUSAGE_SELF) - c0
    else:
        children0 = cpu(resource.RUSAGE_CHILDREN)
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")  # as prepare.py
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_load_raw_tokenizer, initargs=(info, data_dir)) as pool:
            list(pool.map(time.sleep, [0.2] * workers))  # every worker started and loaded
            c0, t0 = cpu(resource.RUSAGE_SELF), time.perf_counter()
            n_tokens = sum(pool.map(_raw_encode, batches))
            seconds, self_cpu = time.perf_counter() - t0, cpu(resource.RUSAGE_SELF) - c0
        cpu_s = self_cpu + cpu(resource.RUSAGE_CHILDREN) - children0  # workers' start-up included
    return {"bytes": n_bytes, "tokens": n_tokens, "seconds": seconds, "mb_per_s": n_bytes / 1e6 / seconds, "cpu_s": cpu_s}


def _raw_encode(docs: list[Any]) -> int:
    tok = _RAW["tokenizer"]
    if tok.kind == "tiktoken":
        return sum(len(tok.impl.encode_to_numpy(d, disallowed_special=())) for d in docs)
    return sum(map(len, tok.impl.encode(docs, out_type=int, num_threads=1)))


def run_watching_memory(cmd: list[str]) -> dict:
    """Run cmd and measure it: wall seconds, CPU seconds of all its processes, the peak RSS of its
    largest single process (exact: getrusage in a fresh wrapper process, so earlier runs do not
    count) and the peak total PSS of its process tree (sampled every 50 ms; PSS counts pages that
    forked workers share with their parent once, where summing RSS would count them per process)."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps([rc, r.ru_maxrss, r.ru_utime + r.ru_stime]))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_tree = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_pss(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    out, err = proc.communicate()
    rc, maxrss_kb, cpu_s = json.loads(out.decode().strip().splitlines()[-1])
    if rc:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {err.decode().strip()[-500:]}")
    return {"seconds": seconds, "cpu_s": cpu_s, "peak_rss_largest_mb": maxrss_kb * 1024 / 1e6,  # kB on Linux
            "peak_pss_total_mb": peak_tree / 1e6}


def _tree_pss(root: int) -> int:
    """Sum of PSS (or RSS where PSS is unavailable) over root's descendants, root excluded."""
    total, stack = 0, _children(root)
    while stack:
        pid = stack.pop()
        stack.extend(_children(pid))
        for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                with open(path) as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
                break
            except (OSError, StopIteration, ValueError):
                continue
    return total


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return kids


def bench_prepare(
    paths: list[str], tokenizer: str = "sp:32000", workers: int = 0, repeats: int = 3,
    work_dir: str | None = None, text_key: str = "text",
) -> dict:
    """prepare.py end to end against the raw tokenizer in the same number of processes.

    1. `prepare.py --tokenizer <tokenizer>` once (includes SentencePiece training for sp:N);
    2. `repeats` times, alternating: `prepare.py --tokenizer <the file made in 1>` (tokenization
       only) and raw_tokenizer_throughput with that same file. We report the best run of each
       and the median of the per-pair ratios: alternating pairs see the same background load,
       which on a shared machine swings throughput by +-20% from minute to minute.
    MB are 1e6 bytes of UTF-8 document text. prepare runs are timed from process start to exit
    (interpreter and pool start-up, reading, parsing, writing); "encode phase" is prepare's own
    timer around its tokenization loop.
    """
    workers = workers or usable_cpus()
    work = work_dir or tempfile.mkdtemp(prefix="bench_prepare-")
    base = [sys.executable, os.path.join(REPO, "prepare.py"), "--input", *paths, "--workers", str(workers),
            "--text_key", text_key, "--overwrite", "--no_progress"]
    first = os.path.join(work, "first")
    trained = run_watching_memory(base + ["--tokenizer", tokenizer, "--out_dir", first])
    meta = load_meta(first)
    tok_file = os.path.join(first, meta["tokenizer"]["file"])
    second = os.path.join(work, "second")
    runs, raws, encode_phase = [], [], []
    for _ in range(repeats):
        runs.append(run_watching_memory(base + ["--tokenizer", tok_file, "--out_dir", second]))
        encode_phase.append(load_meta(second)["timing_s"]["encode_text_mb_per_s"])
        raws.append(raw_tokenizer_throughput(paths, first, workers, text_key))
    t0 = time.perf_counter()
    read_documents(paths, text_key)
    read_s = time.perf_counter() - t0
    meta2 = load_meta(second)
    text_mb = sum(meta2["splits"][s]["bytes"] for s in ("train", "val")) / 1e6
    best = min(runs, key=lambda r: r["seconds"])
    raw = min(raws, key=lambda r: r["seconds"])
    result = {
        "paths": paths, "tokenizer": tokenizer, "vocab_size": meta["vocab_size"], "workers": workers,
        "repeats": repeats, "text_mb": text_mb,
        "tokens": sum(meta2["splits"][s]["tokens"] for s in ("train", "val")),
        "prepare_with_training": {**trained, "mb_per_s": text_mb / trained["seconds"],
                                  "tokenizer_s": meta["timing_s"]["tokenizer"]},
        "prepare": {**best, "mb_per_s": text_mb / best["seconds"], "encode_phase_mb_per_s": max(encode_phase),
                    "all_seconds": [r["seconds"] for r in runs], "all_encode_phase_mb_per_s": encode_phase},
        "raw": {**raw, "all_seconds": [r["seconds"] for r in raws]},
        "read_only_s": read_s,
        "machine": {"cpu": cpu_model(), "cores": usable_cpus(), "python": platform.python_version(),
                    "platform": platform.platform(), "numpy": np.__version__,
                    "sentencepiece": _version("sentencepiece"), "tiktoken": _version("tiktoken"),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result["ratio_end_to_end"] = result["prepare"]["mb_per_s"] / raw["mb_per_s"]  # best vs best
    result["ratio_end_to_end_median"] = median([r["seconds"] / p["seconds"] for p, r in zip(runs, raws, strict=True)])
    result["ratio_encode_phase_median"] = median([e / r["mb_per_s"] for e, r in zip(encode_phase, raws, strict=True)])
    result["ratio_cpu_median"] = median([r["cpu_s"] / p["cpu_s"] for p, r in zip(runs, raws, strict=True)])
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def benchmark_prepare(paths: list[str], tokenizer: str = "sp:32000", workers: int = 0) -> list[dict]:
    """bench_prepare as table rows (what bench.py prints)."""
    r = bench_prepare(paths, tokenizer, workers)
    raw, prep, trained = r["raw"], r["prepare"], r["prepare_with_training"]

    def row(run: str, seconds: float, vs_raw: float, cpu_s: Any = "", rss: Any = "", pss: Any = "") -> dict:
        fmt = lambda x: round(x, 1) if isinstance(x, float) else x  # noqa: E731
        return {"run": run, "workers": r["workers"], "text MB": round(r["text_mb"], 1), "seconds": round(seconds, 2),
                "MB/s": round(r["text_mb"] / seconds, 2), "vs raw": round(vs_raw, 2), "CPU s": fmt(cpu_s),
                "peak RSS MB, largest process": fmt(rss), "peak PSS MB, all processes": fmt(pss)}

    return [
        row(f"raw tokenizer ({r['tokenizer']}), encode calls only", raw["seconds"], 1.0, raw["cpu_s"]),
        row("prepare.py end to end, tokenizer file given", prep["seconds"], r["ratio_end_to_end_median"],
            prep["cpu_s"], prep["peak_rss_largest_mb"], prep["peak_pss_total_mb"]),
        row("prepare.py tokenization phase", r["text_mb"] / prep["encode_phase_mb_per_s"], r["ratio_encode_phase_median"]),
        row("reading and parsing the input only (corpus.py, 1 process)", r["read_only_s"], raw["seconds"] / r["read_only_s"]),
        row(f"prepare.py end to end, --tokenizer {r['tokenizer']}", trained["seconds"],
            trained["mb_per_s"] / raw["mb_per_s"], trained["cpu_s"], trained["peak_rss_largest_mb"],
            trained["peak_pss_total_mb"]),
    ]


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def to_markdown(rows: list[dict]) -> str:
    keys = list(rows[0].keys())
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def true_or_false(text: str) -> bool:
    """A true/false flag's value: 1, true or yes (any case) is True, anything else False."""
    return text.lower() in ("1", "true", "yes")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("train", "generate", "prepare", "all"))
    parser.add_argument("--config", default=None, help="preset (train default: config/tiny_cpu.py; generate: config/home_25m.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--compile", default=None, type=true_or_false, help="true/false; default on for CUDA")
    parser.add_argument("--grad_checkpoint", action="store_true")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab_size", type=int, default=32000, help="for presets that take it from the tokenizer")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="generate: alternating timed rounds per mode (median reported)")
    parser.add_argument("--uncached", default=True, type=true_or_false,
                        help="generate: also time decoding without a KV cache (true/false; default true)")
    parser.add_argument("--mm_loops", default=None, type=true_or_false,
                        help="generate --compile on CPU: one-row matmuls as Inductor loops (true) or BLAS (false); default: measured")
    parser.add_argument("--input", nargs="+", default=None, help="prepare: corpus files")
    parser.add_argument("--tokenizer", default="sp:32000", help="prepare: tokenizer spec as for prepare.py")
    parser.add_argument("--workers", type=int, default=usable_cpus())
    parser.add_argument("--append", default=None, help="append the results as markdown to this file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)

    sections = []
    if args.what in ("train", "all"):
        if device.type == "cpu":  # HOMELLM_THREADS / OMP_NUM_THREADS as train.py reads them; else all usable CPUs
            print(f"train: {configure_cpu_threads(usable_cpus())}, as train.py uses in one process", file=sys.stderr)
        row = bench_train(args.config or "config/tiny_cpu.py", device, args.dtype, args.compile, args.batch_size,
                          args.block_size, args.steps, args.warmup, args.grad_checkpoint, args.vocab_size)
        sections.append(("Training throughput", [row]))
    if args.what in ("generate", "all"):
        compile_gen = args.compile if args.compile is not None else device.type == "cuda"
        if device.type == "cpu":
            print(f"generate: {configure_cpu_threads()}, as sample.py uses", file=sys.stderr)
        sections.append(("Generation", bench_generate(args.config or "config/home_25m.py", device, args.prompt_len, args.new_tokens,
                                                      args.vocab_size, args.dtype, compile_gen, args.repeats,
                                                      uncached_=args.uncached, mm_loops=args.mm_loops)))
    if args.what in ("prepare", "all") and args.input:
        sections.append(("prepare.py throughput", benchmark_prepare(args.input, args.tokenizer, args.workers)))
    elif args.what == "prepare":
        sys.exit("error: tools/bench.py prepare needs --input FILE [FILE ...]")

    command = "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
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
