"""Check HomeLLM's whole GPU path on this machine, in under 10 minutes on one GPU, and print
the result as a markdown table. Run it first on new hardware (and paste the table into an
issue or docs/benchmarks.md):

    python tools/gpu_check.py                  # every check; the FSDP one over all GPUs
    python tools/gpu_check.py --keep runs/gc   # keep the data, checkpoints and logs there

What it runs, each as the user would (train.py and torchrun in subprocesses, on a demo dataset
it builds with prepare.py into a temporary directory):

- home_25m and home_200m, bf16 with torch.compile, a few dozen steps each: tokens/s, MFU
  against the card's datasheet peak, and the CUDA allocator's peak against the plan that
  `train.py --dry_run` prints (presets that would not fit get --grad_checkpoint or a smaller
  batch, and say so);
- FSDP under `torchrun --nproc_per_node=<all GPUs>`: a run killed (SIGKILL) after its first
  checkpoint and resumed must reproduce the uninterrupted run's losses (one GPU: a single
  process does the same, since FSDP needs two ranks or --fsdp_cpu_offload);
- --parallel=fsdp --fsdp_cpu_offload=True in one process: steps that run, and their memory;
- sample.py's decode (--compile: a CUDA graph) against transformers' generate() on the same
  weights (exported with hf.py), tokens/s and whether the greedy tokens agree;
- the dtype `--dtype auto` picks and the attention kernel, checked against PyTorch's own
  can_use_flash_attention, and the CUDA allocator's settings.

A failing check becomes a FAILED row with the end of its log; the others still run.
--cpu_rehearsal runs the same checks with a tiny model on the CPU: it tests this script on a
machine without a GPU (the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python tools/gpu_check.py` from anywhere

from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from hardware import choose_dtype, compile_decode
from model import attention_kernel, flash_attention_runs

GIB = 2**30
# What --cpu_rehearsal trains instead of a preset's model: seconds per run on a laptop.
TINY_MODEL = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64", "--batch_size=4",
              "--gradient_accumulation_steps=1", "--device=cpu", "--dtype=float32", "--compile=False"]


@dataclass
class Row:
    check: str
    result: str
    details: str
    ok: bool = True


@dataclass
class Setup:
    """Where the checks run and with what."""

    work: str  # temporary (or --keep) directory: data, runs, logs
    data_dir: str
    rehearsal: bool
    gpus: int  # ranks for the FSDP check
    free_gib: float  # free memory of GPU 0 before anything ran (rehearsal: inf)

    def model_args(self, preset: str) -> list[str]:
        """A preset, as this check trains it: the preset's model, or the tiny one in rehearsal."""
        return [f"config/{preset}.py", *(TINY_MODEL if self.rehearsal else ["--device=cuda", "--dtype=bfloat16"])]


# ----------------------------------------------------------------------------- running the repo's commands


def run(cmd: list[str], log: str, timeout_s: float, env: Optional[dict] = None) -> str:
    """Run a command of the repository, its output into `log`; returns the output. Raises
    RuntimeError with the log's last lines when it fails."""
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    output = open(log, encoding="utf-8").read()
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {tail(output)}")
    return output


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if r.get("loss") is not None}


def dry_run_plan(args: list[str], world_size: int = 1) -> dict[str, float]:
    """The per-rank plan `train.py ... --dry_run` prints, in GiB by part (and "total")."""
    out = subprocess.run([sys.executable, "train.py", *args, "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WORLD_SIZE": str(world_size)})
    if out.returncode != 0:
        raise RuntimeError(f"--dry_run failed: {tail(out.stdout + out.stderr)}")
    block = out.stdout.split("memory per rank", 1)[1].split("\ntokens per step", 1)[0]
    return {name.strip(): float(gib) for name, gib in re.findall(r"^  (\S[\w /-]*?)\s+([\d.]+) GiB", block, re.M)}


def speed(records: list[dict]) -> tuple[float, Optional[float], float]:
    """(tokens/s, MFU, peak MB) of a run's log records: the median over the logs after the
    first, which includes start-up and compiling."""
    logged = [r for r in records if r.get("tokens_per_s")]
    steady = logged[1:] or logged
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return (statistics.median(r["tokens_per_s"] for r in steady), statistics.median(mfus) if mfus else None,
            max(r.get("peak_mem_mb") or 0 for r in logged))


def markdown_table(rows: list[Row]) -> str:
    lines = ["| check | result | details |", "|---|---|---|"]
    for row in rows:
        cells = [row.check, row.result if row.ok else f"**FAILED** {row.result}", row.details]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the checks


def check_training(setup: Setup, preset: str, steps: int) -> Row:
    """A preset in bf16 with torch.compile: speed, MFU and peak memory against the plan."""
    args = [*setup.model_args(preset), f"--data_dir={setup.data_dir}", f"--out_dir={os.path.join(setup.work, preset)}",
            f"--max_iters={steps}", f"--eval_interval={steps}", "--eval_iters=2", "--log_interval=5", "--warmup_iters=5",
            "--gradient_accumulation_steps=1", "--resume=never"]
    if not setup.rehearsal:
        args.append("--compile=True")
    plan, fitted = dry_run_plan(args), ""
    for change in ("--grad_checkpoint=True", "--batch_size=4", "--batch_size=2", "--batch_size=1"):
        if plan["total"] <= setup.free_gib - 0.5:
            break
        args.append(change)  # the preset does not fit this GPU: what check_memory_fits would suggest
        fitted += f" {change}"
        plan = dry_run_plan(args)
    start = time.perf_counter()
    log = run([sys.executable, "train.py", *args], os.path.join(setup.work, f"{preset}.log"), 900)
    tokens_per_s, mfu, peak_mb = speed(metrics(os.path.join(setup.work, preset)))
    kernel = re.search(r"^dtype: (\S+) .*\| attention: ([^|]+)", log, re.M)
    tensors_gib = plan["total"] - plan.get("overhead", 0.0)
    details = (f"peak {peak_mb / 1024:.2f} GiB allocated vs plan {tensors_gib:.2f} GiB of tensors ({plan['total']:.2f} GiB with "
               f"context and slack); {kernel[1] if kernel else '?'}, attention {kernel[2].strip() if kernel else '?'}; "
               f"{steps} steps{', with' + fitted + ' to fit' if fitted else ''}; {time.perf_counter() - start:.0f} s")
    return Row(f"train {preset}", f"{tokens_per_s:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}", details)


def check_kill_and_resume(setup: Setup) -> Row:
    """FSDP over every GPU: a run SIGKILLed after its step-6 checkpoint and resumed gives the
    losses of the uninterrupted run."""
    nproc = setup.gpus
    fsdp = nproc > 1
    common = [*setup.model_args("home_25m"), f"--data_dir={setup.data_dir}", "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=6",
              "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--compile=False", "--keep_checkpoints=3",
              *([] if setup.rehearsal else ["--batch_size=4", "--block_size=512", "--gradient_accumulation_steps=2"]),
              *(["--parallel=fsdp"] if fsdp else [])]
    whole, cut = os.path.join(setup.work, "whole"), os.path.join(setup.work, "cut")
    start = time.perf_counter()
    run([*torchrun(nproc), "train.py", *common, f"--out_dir={whole}"], os.path.join(setup.work, "whole.log"), 600)
    # The run to kill: SIGKILL to torchrun and its ranks once step 7 is logged (after the
    # step-6 checkpoint), then any later checkpoint is removed, so the resume starts at 6
    # however far the run got: exactly what a crash just after the save leaves.
    with open(os.path.join(setup.work, "cut.log"), "w", encoding="utf-8") as log:
        proc = subprocess.Popen([*torchrun(nproc), "train.py", *common, f"--out_dir={cut}"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and 7 not in safe_losses(cut):
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            kill_tree(proc.pid)
        proc.wait()
    reached = max(safe_losses(cut), default=0)
    for name in os.listdir(cut):
        match = re.fullmatch(r"ckpt_(\d+)(\.pt)?", name)
        if match and int(match[1]) > 6:
            path = os.path.join(cut, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not fsdp and os.path.exists(os.path.join(cut, "ckpt.pt")) and load_checkpoint(os.path.join(cut, "ckpt.pt"))["step"] > 6:
        shutil.copyfile(os.path.join(cut, "ckpt_000006.pt"), os.path.join(cut, "ckpt.pt"))
    log = run([*torchrun(nproc), "train.py", *common, f"--out_dir={cut}"], os.path.join(setup.work, "resumed.log"), 600)
    resumed_at = re.search(r"resumed from (\S+) at step (\d+)", log)
    reference, resumed = train_losses(whole), train_losses(cut)
    worst = max((abs(resumed[s] - loss) for s, loss in reference.items() if s in resumed), default=float("nan"))
    ok = bool(resumed_at) and sorted(resumed) == sorted(reference) == list(range(1, 13)) and worst <= 1e-3
    what = f"FSDP over {nproc} {'ranks' if setup.rehearsal else 'GPUs'}" if fsdp else "one GPU, so one process (FSDP needs 2 ranks)"
    how = f"killed after step {reached}" if killed else f"ended (step {reached}) before the kill, its checkpoints after step 6 removed"
    details = f"{what}; {how}; {'resumed at step ' + resumed_at[2] if resumed_at else 'did not resume'}; {time.perf_counter() - start:.0f} s"
    return Row("kill -9 and resume", f"max |loss difference| {worst:.2g} over steps 1-12", details, ok)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, as a crash would end them: torchrun starts
    each rank in a session of its own, so killing torchrun's process group would miss them."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{entry}/stat", encoding="utf-8").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def safe_losses(out_dir: str) -> dict[int, float]:
    try:
        return train_losses(out_dir)
    except (OSError, ValueError):  # not written yet, or a line being written
        return {}


def check_cpu_offload(setup: Setup) -> Row:
    """--fsdp_cpu_offload in one process: FSDP over a group of one, states in host memory."""
    out = os.path.join(setup.work, "offload")
    args = [*setup.model_args("home_25m"), f"--data_dir={setup.data_dir}", f"--out_dir={out}", "--parallel=fsdp", "--fsdp_cpu_offload=True",
            "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--log_interval=1", "--compile=False", "--resume=never",
            *([] if setup.rehearsal else ["--batch_size=4", "--gradient_accumulation_steps=2"])]
    plan = dry_run_plan(args)
    start = time.perf_counter()
    log = run([sys.executable, "train.py", *args], os.path.join(setup.work, "offload.log"), 600)
    tokens_per_s, _, peak_mb = speed(metrics(out))
    losses = train_losses(out)
    threads = re.search(r"(\d+) CPU threads?", log)
    ok = "parallel: fsdp" in log and sorted(losses) == [1, 2, 3, 4]
    return Row("--fsdp_cpu_offload step", f"{tokens_per_s:,.0f} tok/s, loss {losses.get(4, float('nan')):.3f} at step 4",
               f"peak {peak_mb / 1024:.2f} GiB on the device vs plan {plan['total'] - plan.get('overhead', 0.0):.2f} GiB of tensors, "
               f"{plan.get('host memory', 0.0):.2f} GiB in host memory; AdamW on {threads[1] if threads else '?'} CPU threads; "
               f"{time.perf_counter() - start:.0f} s", ok)


def timed_generate(generate, device: torch.device, rounds: int = 3) -> tuple[float, torch.Tensor]:
    """(best seconds of `rounds` calls after a warm-up, the warm-up's tokens)."""
    tokens = generate()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        generate()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, tokens


def check_decode(setup: Setup, new_tokens: int = 256) -> Row:
    """sample.py's path (model_from_checkpoint, compile_decode) against transformers' generate
    on the same weights, greedy, batch 1, in bf16."""
    from hf import export_hf

    device = torch.device("cpu" if setup.rehearsal else "cuda")
    dtype = torch.float32 if setup.rehearsal else torch.bfloat16
    path = find_checkpoint(os.path.join(setup.work, "home_25m"))
    model = model_from_checkpoint(load_checkpoint(path), device, dtype, name=path)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    new_tokens = min(new_tokens, model.config.max_seq_len - 16)
    eager_s, ours = timed_generate(lambda: model.generate(prompt, new_tokens, temperature=0), device)
    how = "eager"
    if not setup.rehearsal:  # (on a CPU, compiling needs a C++ compiler and tens of seconds)
        how = compile_decode(model)
    compiled_s, compiled = timed_generate(lambda: model.generate(prompt, new_tokens, temperature=0), device)
    row = f"{new_tokens / compiled_s:,.0f} tok/s ours ({how.removeprefix('decode step ')})"
    details = f"eager {new_tokens / eager_s:,.0f} tok/s; compiled tokens {'equal' if torch.equal(compiled, ours) else 'differ from'} eager's"
    try:
        import transformers
    except ImportError:
        return Row("decode (sample.py --compile)", row, details + "; transformers is not installed: pip install transformers to compare")
    transformers.logging.set_verbosity_error()
    hf_dir = os.path.join(setup.work, "hf")
    export_hf(path, hf_dir, dtype=dtype, overwrite=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # run all new tokens, as ours does
    ones = torch.ones_like(prompt)
    with torch.no_grad():
        hf_s, theirs = timed_generate(lambda: hf.generate(prompt, attention_mask=ones, max_new_tokens=new_tokens, do_sample=False,
                                                          pad_token_id=0), device)
    same = int((theirs[0, : ours.shape[1]] == ours[0]).cumprod(0).sum()) - prompt.shape[1]
    return Row("decode (sample.py --compile)", f"{row} vs {new_tokens / hf_s:,.0f} tok/s transformers ({hf_s / compiled_s:.1f}x)",
               f"{details}; the first {same} of {new_tokens} greedy tokens agree with transformers'")


def check_dtype_and_kernel(setup: Setup) -> Row:
    """What --dtype auto picks here and the attention kernel for it, with PyTorch's own verdict
    on flash attention for the same shapes; and the allocator settings train.py ran with."""
    if setup.rehearsal:
        device = torch.device("cpu")
        return Row("dtype and attention", str(choose_dtype("auto", device, training=True)[1]), "CPU rehearsal: no CUDA kernels to check")
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    from configurator import TrainConfig, parse_args

    device = torch.device("cuda", 0)
    dtype, why = choose_dtype("auto", device, training=True)
    model_cfg = parse_args(TrainConfig, ["config/home_200m.py"]).model_config(8192)
    capability = torch.cuda.get_device_capability(device)
    verdicts = []
    for check_dtype in (dtype, torch.float32):
        q = torch.zeros(1, model_cfg.n_head, 128, model_cfg.head_dim, device=device, dtype=check_dtype, requires_grad=True)
        kv = torch.zeros(1, model_cfg.n_kv_head, 128, model_cfg.head_dim, device=device, dtype=check_dtype)
        torch_says = can_use_flash_attention(SDPAParams(q, kv, kv, None, 0.0, True, True))
        ours = flash_attention_runs(check_dtype, capability, model_cfg.head_dim, training=True)
        verdicts.append(f"{str(check_dtype).removeprefix('torch.')}: {attention_kernel(device, check_dtype, model_cfg)}"
                        f"{'' if torch_says == ours else f' (PyTorch disagrees: can_use_flash_attention={torch_says})'}")
    ok = "disagrees" not in " ".join(verdicts)
    allocator = re.search(r"^CUDA allocator: .*$", open(os.path.join(setup.work, "home_25m.log"), encoding="utf-8").read(), re.M)
    return Row("dtype and attention", f"{str(dtype).removeprefix('torch.')} ({why})",
               f"home_200m attention in {'; '.join(verdicts)}; {allocator[0] if allocator else 'no allocator line in the log'}", ok)


# ----------------------------------------------------------------------------- the whole check


def gpu_facts() -> dict:
    """This machine's GPUs, read in a child process, so that this one holds no CUDA context
    (memory) while the training runs it starts measure theirs."""
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); free, total = torch.cuda.mem_get_info(0); "
            "print(json.dumps({'count': torch.cuda.device_count(), 'name': p.name, 'capability': f'{p.major}.{p.minor}', "
            "'free_gib': free / 2**30, 'total_gib': total / 2**30, 'cuda': torch.version.cuda}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"gpu_check.py: error: could not read the GPU's properties: {tail(out.stderr, 1)}")
    return json.loads(out.stdout)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check HomeLLM's GPU path on this machine (under 10 minutes on one GPU); prints a markdown table.")
    p.add_argument("--keep", default=None, help="keep the data, runs and logs in this directory (default: a temporary one, removed)")
    p.add_argument("--cpu_rehearsal", action="store_true", help="run the same checks with a tiny model on the CPU, to test this script without a GPU")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if not args.cpu_rehearsal and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU or driver found"
        print(f"gpu_check.py: error: PyTorch {torch.__version__} sees no CUDA GPU here ({build}); run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch", file=sys.stderr)
        sys.exit(1)
    begin = time.perf_counter()
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    if args.cpu_rehearsal:
        facts = {"count": 2, "name": "CPU rehearsal", "capability": "-", "free_gib": float("inf"), "total_gib": float("inf"), "cuda": None}
    else:
        facts = gpu_facts()
    header = (f"{facts['count']} x {facts['name']} (compute capability {facts['capability']}, {facts['total_gib']:.1f} GiB, "
              f"{facts['free_gib']:.1f} GiB free), torch {torch.__version__}, CUDA {facts['cuda']}")
    print(f"gpu_check: {header}; working in {work}", file=sys.stderr, flush=True)
    rows = []
    try:
        data_dir = os.path.join(work, "data")
        run([sys.executable, "prepare.py", "--demo", "ru", "--out_dir", data_dir, "--overwrite", "--no_progress"],
            os.path.join(work, "prepare.log"), 600)
        setup = Setup(work, data_dir, args.cpu_rehearsal, facts["count"], facts["free_gib"])
        steps = 10 if args.cpu_rehearsal else 40
        checks = [("train home_25m", lambda: check_training(setup, "home_25m", steps)),
                  ("train home_200m", lambda: check_training(setup, "home_200m", steps * 3 // 4)),
                  ("kill -9 and resume", lambda: check_kill_and_resume(setup)),
                  ("--fsdp_cpu_offload step", lambda: check_cpu_offload(setup)),
                  ("decode (sample.py --compile)", lambda: check_decode(setup)),  # in this process: CUDA starts here
                  ("dtype and attention", lambda: check_dtype_and_kernel(setup))]
        for name, check in checks:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(check())
            except Exception as err:  # the row says what failed; the other checks still run
                rows.append(Row(name, f"{type(err).__name__}: {str(err)[:300]}", f"logs in {work}" if args.keep else "rerun with --keep DIR for the logs", ok=False))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"**{header}**, {time.perf_counter() - begin:.0f} s (`python tools/gpu_check.py`{' --cpu_rehearsal' if args.cpu_rehearsal else ''})\n")
    print(markdown_table(rows))
    sys.exit(0 if all(row.ok for row in rows) else 1)


if __name__ == "__main__":
    main()
