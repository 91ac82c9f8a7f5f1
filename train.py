"""Pretrain a HomeLLM model on token shards made by prepare.py.

    python train.py config/tiny_cpu.py                      # one CPU or GPU
    python train.py config/home_25m.py --batch_size=16      # any key can be overridden
    torchrun --nproc_per_node=4 train.py config/qwen_2_5b.py --parallel=fsdp
    python train.py config/qwen_2_5b.py --dry_run           # size and memory, no training

Read train() first: setup, then the loop, then the finish. The loop is plain PyTorch: draw
this step's global batch, forward/backward over micro-batches, clip, optimizer step, log, and
every eval_interval steps evaluate and checkpoint. DDP, FSDP2, activation checkpointing and
torch.compile are applied to the plain model by the small apply_* functions under
"parallelism"; model.py knows nothing about them. Checkpoint files and the resume policy live
in checkpoint.py, device, dtype and the memory plan in hardware.py.

Exact resume: which windows form step s depends only on (seed, s), the optimizer, grad
scaler and every rank's RNG state are checkpointed, so a run killed after a checkpoint and
resumed continues with bit-identical losses on CPU.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import (
    CHECKPOINT_FORMAT, CheckpointError, ShardedSaver, check_resumable, count_nonfinite, find_resume_checkpoint, grow_vocab,
    load_init_checkpoint, materialize, nonfinite_advice, own_out_dir, restore_training_state, rng_state, save_checkpoint, truncate_metrics,
)
from configurator import TrainConfig, config_to_dict, format_config, parse_args_or_exit
from dataset import DatasetError, Mixture, TokenShards, open_mixture
from hardware import (
    DeviceError, choose_dtype, configure_cuda_allocator, configure_training_threads, device_peak_flops, dry_run, end_distributed,
    fit_to_memory, peak_memory_mb, resolve_device, uses_fsdp,
)
from hf import load_hf_model
from model import ModelConfig, Transformer, attention_kernel, count_params, estimate_mfu, make_optimizer
from runlog import MetricSinks, RunLogError, append_metrics, record_crash, write_status
from system import StopFlag, stop_when_the_launcher_dies
from tokenizer import TokenizerError


class TrainError(RuntimeError):
    """A problem the user can fix; main() prints it as one line and exits 1."""


# Errors from the libraries that are the user's to fix: one line, exit 1, no traceback.
USER_ERRORS = (TrainError, DatasetError, CheckpointError, DeviceError, TokenizerError, RunLogError)


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, d: Dist, device: torch.device, saver: Optional[ShardedSaver] = None) -> None:
    """This rank's whole run: setup, the loop over steps, the finish. Every rank runs the same
    steps; a step ends (stop, time budget, evaluation) on all ranks together."""
    run, progress = setup(cfg, d, device, saver)
    stop = StopFlag()
    clock = TimeBudget(cfg, progress.elapsed_s)
    lr = run.optimizers[0].param_groups[0]["lr"]  # (for the final line when no step is left)
    run.model.train()
    run.speed_mark = (time.perf_counter(), progress.tokens_seen)
    batches = read_step(run, progress.step)
    while (cfg.max_iters is None or progress.step < cfg.max_iters) and not clock.out_of_time:
        step = progress.step
        lr = clock.lr(step)
        for group in (g for opt in run.optimizers for g in opt.param_groups):
            group["lr"] = lr
        loss_sum = forward_backward(run, batches)
        # On a GPU the work above is only queued: read the next step's batches meanwhile.
        batches = read_step(run, step + 1) if not clock.last_step and step + 1 != cfg.max_iters else []
        grad_norm = clip_gradients(run)
        loss, grad_norm, stop_asked, elapsed_s = step_statistics(run, loss_sum, grad_norm, stop, clock)
        elapsed_s = clock.step_done(elapsed_s)
        finite = update(run, step, loss, grad_norm)
        progress.step, progress.tokens_seen, progress.elapsed_s = step + 1, progress.tokens_seen + run.tokens_per_step, elapsed_s
        progress.source_tokens = run.train_data.count_tokens(progress.source_tokens, step, step + 1, run.global_batch)

        step = progress.step
        if step % cfg.log_interval == 0 or step == cfg.max_iters or clock.out_of_time:
            log_step(run, progress, lr, loss, grad_norm, finite)
        if stop_asked:
            eval_and_save(run, progress, "stopped by signal")
            if d.is_main:
                write_status(cfg.out_dir, "stopped", "signal", step=step)
            return
        if clock.out_of_time:  # the budget is the schedule's end: the run is complete
            eval_and_save(run, progress, "time budget spent")
            break
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            reason = "end of training" if step == cfg.max_iters else f"eval_interval={cfg.eval_interval}"
            eval_and_save(run, progress, reason, background=step != cfg.max_iters)
            # The evaluation's (and save's) time is not a step's, nor part of the next tok/s and MFU.
            clock.paused, run.speed_mark = True, (time.perf_counter(), progress.tokens_seen)
    log0(d, f"done: step {progress.step}, {progress.tokens_seen:,} tokens, {progress.elapsed_s / 60:.1f} min, final lr {lr:.3e}")
    if d.is_main:
        write_status(cfg.out_dir, "finished", "time budget" if clock.out_of_time else "max_iters", step=progress.step)


# ----------------------------------------------------------------------------- one step


def read_step(run: Run, step: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """This rank's micro-batches of `step`: slices of the global batch drawn from (seed, step),
    each with its weight: its share of the global batch's targets that count in the loss (all
    of them, or with chat data the replies'), times world_size to undo DDP's average."""
    cfg, d, data = run.cfg, run.d, run.train_data
    picks = data.sample([cfg.seed, step], run.global_batch)
    total = max(1, data.count_targets(picks))
    starts = [(micro * d.world_size + d.rank) * cfg.batch_size for micro in range(cfg.gradient_accumulation_steps)]
    return [(*data.read(p, run.device), data.count_targets(p) * d.world_size / total) for p in (picks[i : i + cfg.batch_size] for i in starts)]


def forward_backward(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; returns the sum of their weighted
    losses. Gradients are reduced across ranks on the last micro-step only (FSDP: every one
    with --fsdp_reduce_every_micro_step)."""
    cfg = run.cfg
    loss_sum = torch.zeros((), device=run.device)
    for micro, (x, y, weight) in enumerate(batches):
        last = micro == cfg.gradient_accumulation_steps - 1
        if run.fsdp:
            run.raw_model.set_requires_gradient_sync(last or cfg.fsdp_reduce_every_micro_step)
        sync = run.model.no_sync() if run.d.enabled and not run.fsdp and not last else nullcontext()
        with sync:
            with run.autocast:
                loss = run.model(x, y)  # the mean over this micro-batch's targets
            loss_sum += loss.detach().float() * weight
            run.scaler.scale(loss * weight).backward()  # accumulates the gradient of the global batch's mean
    return loss_sum


def clip_gradients(run: Run) -> torch.Tensor:
    """Unscale (fp16) and clip the gradients; returns their global norm before clipping, on the
    run's device (FSDP's CPU offload leaves gradients, and so their norm, on the CPU)."""
    for opt in run.optimizers:
        run.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf"))
    return (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).to(run.device)


def step_statistics(run: Run, loss_sum: torch.Tensor, grad_norm: torch.Tensor, stop: StopFlag, clock: TimeBudget) -> tuple[float, float, bool, float]:
    """(mean loss, grad norm, whether any rank was asked to stop, rank 0's clock): everything
    the host needs from this step in one small tensor, summed over ranks and read once. A
    non-finite loss on any rank makes the sum non-finite, so all ranks skip the step together."""
    host = torch.tensor([float(stop.requested), clock.read() if run.d.is_main else 0.0], device=run.device)
    stats = torch.cat([torch.stack([loss_sum, grad_norm.float()]), host])
    if run.d.enabled:
        dist.all_reduce(stats)
    loss_total, grad_norm_total, stop_votes, elapsed_s = stats.tolist()
    return loss_total / run.d.world_size, grad_norm_total / run.d.world_size, stop_votes > 0, elapsed_s


def update(run: Run, step: int, loss: float, grad_norm: float) -> bool:
    """Step the optimizers, unless the loss (or, without fp16's loss scaler, the gradient norm)
    is not finite: then the update is skipped, and after nonfinite_patience such steps in a
    row the run stops. Returns whether the step was finite."""
    finite = math.isfinite(loss) and (run.scaler.is_enabled() or math.isfinite(grad_norm))
    if finite:  # (under fp16 the scaler itself skips steps whose gradients overflowed)
        run.nonfinite_steps = 0
        for opt in run.optimizers:
            run.scaler.step(opt)
    else:
        run.nonfinite_steps += 1
        patience = run.cfg.nonfinite_patience
        log0(run.d, f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped ({run.nonfinite_steps}/{patience})")
        if run.nonfinite_steps >= patience:
            raise TrainError(f"the loss was non-finite for {run.nonfinite_steps} steps in a row (last at step {step + 1}); {nonfinite_advice(run.last_saved)}")
    run.scaler.update()
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    return finite


def log_step(run: Run, progress: Progress, lr: float, loss: float, grad_norm: float, finite: bool) -> None:
    """The line every log_interval steps: on rank 0's stdout, in metrics.jsonl and status.json.
    tokens/s is measured since the previous line; MFU against run.peak_flops."""
    d = run.d
    now, (then, tokens_then) = time.perf_counter(), run.speed_mark
    tokens_per_s = (progress.tokens_seen - tokens_then) / (now - then) if progress.tokens_seen > tokens_then else 0.0
    run.speed_mark = (now, progress.tokens_seen)
    mfu = estimate_mfu(run.model_cfg, run.cfg.block_size, tokens_per_s / d.world_size, run.peak_flops)
    if mfu > 1:  # the peak was measured (or given) too low, e.g. on a busy CPU: the rate seen is the better bound
        slow_peak, run.peak_flops = run.peak_flops, run.peak_flops * mfu
        log0(d, f"note: step {progress.step} computed faster than the peak of {slow_peak:.3g} FLOP/s; MFU is now relative to {run.peak_flops:.3g}")
        mfu = 1.0
    mem = peak_memory_mb(run.device)
    log0(d, f"step {progress.step}: loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu * 100:.1f}% | peak mem {mem:,.0f} MB")
    write_metrics(run, {
        "step": progress.step, "loss": loss if finite else None, "lr": lr, "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_mb": mem, "tokens_seen": progress.tokens_seen,
        "elapsed_s": progress.elapsed_s, "source_tokens": progress.source_tokens,
    })
    if d.is_main:
        write_status(run.cfg.out_dir, "running", step=progress.step, elapsed_s=progress.elapsed_s)


# ----------------------------------------------------------------------------- schedule


def get_lr(step: int, cfg: TrainConfig, budget_spent: Optional[float] = None) -> float:
    """Linear warmup (non-zero at step 0), then cosine decay to min_lr at lr_decay_iters
    (default max_iters). A time-budgeted run (max_time_min) decays over its budget instead:
    budget_spent is the fraction of max_time_min used so far (1.0 on the last step), so the
    run ends at min_lr whenever the clock says it ends; warmup still counts steps."""
    if cfg.max_time_min is not None:
        spent = min(1.0, max(0.0, budget_spent or 0.0))
        decayed = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * spent)) * (cfg.learning_rate - cfg.min_lr)
        return min(decayed, cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1))
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


class TimeBudget:
    """The clock of a run (--max_time_min makes it a time budget): it sets each step's learning
    rate, spots the step that will cross the budget (the last, run at min_lr) and says when the
    budget is spent. A step-budgeted run only asks it for get_lr's value.

    The clock counts wall seconds since the run began, as rank 0 measures it (a resumed run
    goes on from the checkpoint's count); every rank gets rank 0's reading with the step's
    statistics, so all ranks use the same learning rate and stop at the same step."""

    def __init__(self, cfg: TrainConfig, elapsed_s: float):
        self.cfg = cfg
        self.budget_s = cfg.max_time_min * 60 if cfg.max_time_min is not None else None
        self.decay_s = self.budget_s  # where the cosine ends: a little before the budget
        self.started = time.perf_counter() - elapsed_s
        self.elapsed_s = elapsed_s
        self.step_s: Optional[float] = None  # a step's duration, erring long
        self.paused = True  # the next step's time includes start-up or an evaluation: not a step's
        self.last_step = False
        self.out_of_time = self.budget_s is not None and elapsed_s >= self.budget_s  # a finished run: nothing to do

    def lr(self, step: int) -> float:
        """The learning rate of `step`; also decides whether it is the budget's last step."""
        if self.budget_s is None:
            return get_lr(step, self.cfg)
        # The step that will cross the budget is the last. The decay aims to end three steps
        # before the budget (never later than before), so that the last step runs at min_lr even
        # when steps take longer than the estimate, as on a busy machine.
        self.last_step = self.step_s is not None and self.elapsed_s + self.step_s >= self.budget_s
        self.decay_s = min(self.decay_s, max(self.budget_s - 3 * (self.step_s or 0.0), self.budget_s / 2))
        return get_lr(step, self.cfg, 1.0 if self.last_step else self.elapsed_s / self.decay_s)

    def read(self) -> float:
        """Seconds since the run began, on this process's clock (only rank 0's counts)."""
        return time.perf_counter() - self.started

    def step_done(self, elapsed_s: float) -> float:
        """Rank 0's reading at the end of a step; returns the clock to record, which reads the
        whole budget once it is spent: a finished run, run again, then has nothing left to do."""
        if not self.paused:
            self.step_s = max(elapsed_s - self.elapsed_s, 0.8 * (self.step_s or 0.0))
        self.elapsed_s, self.paused = elapsed_s, False
        self.out_of_time = self.budget_s is not None and (self.last_step or elapsed_s >= self.budget_s)
        return max(elapsed_s, self.budget_s) if self.out_of_time else elapsed_s


# ----------------------------------------------------------------------------- evaluation and checkpoints


@torch.no_grad()
def evaluate(run: Run) -> Optional[dict]:
    """Val loss and bits per byte of every data source with val windows, and their means
    weighted as the mixture is: val_loss and val_bpb (one source: its own)."""
    val = run.val_data
    losses = {path: evaluate_source(run, data) for path, data in zip(val.paths, val.sources) if data.num_windows}
    return val.val_metrics(losses) if losses else None


def evaluate_source(run: Run, data: TokenShards) -> float:
    """Mean loss over one fixed set of eval_iters x batch_size validation windows, the same at
    every evaluation and for any world size: ranks take every world_size-th window and pad
    their last batch with ignored targets (-1) so all run the same number of forwards, as
    FSDP's collectives require."""
    cfg, d, model = run.cfg, run.d, run.model
    model.eval()
    picks = data.sample([cfg.seed, 1], cfg.eval_iters * cfg.batch_size)[d.rank :: d.world_size]
    per_rank = math.ceil(cfg.eval_iters * cfg.batch_size / d.world_size)
    filler = picks[:1] or data.sample([cfg.seed, 1], 1)
    padded = picks + filler * (per_rank - len(picks))
    sums = torch.zeros(2, dtype=torch.float64 if run.device.type != "mps" else torch.float32, device=run.device)
    for start in range(0, per_rank, cfg.batch_size):
        x, y = data.read(padded[start : start + cfg.batch_size], run.device)
        y = y.clone()  # y shares storage with x (one window, shifted by one)
        y[max(0, len(picks) - start) :] = -1  # padding rows count for nothing
        with run.autocast:
            loss = model(x, y)
        valid = (y != -1).sum()
        sums += torch.stack([loss.detach() * valid, valid]).to(sums.dtype)  # (a row of padding only: 0 * 0)
    model.train()
    if d.enabled:
        dist.all_reduce(sums)
    loss_total, token_total = sums.tolist()
    return loss_total / token_total


def checkpoint_state(run: Run, progress: Progress) -> dict:
    """Everything exact resume needs besides weights and optimizer state. A collective under
    DDP/FSDP (every rank's RNG state is gathered): every rank must call it."""
    cfg, d = run.cfg, run.d
    rngs: list[Any] = [None] * d.world_size
    if d.enabled:
        dist.all_gather_object(rngs, rng_state(run.device))
    else:
        rngs[0] = rng_state(run.device)
    return {
        "format_version": CHECKPOINT_FORMAT, "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "model_config": run.model_cfg.to_dict(), "train_config": config_to_dict(cfg),
        "step": progress.step, "tokens_seen": progress.tokens_seen, "best_val_loss": progress.best_val_loss, "elapsed_s": progress.elapsed_s,
        "source_tokens": progress.source_tokens,
        "tokenizer": run.meta["tokenizer"], "tokenizer_sha256": run.tokenizer_sha256,
        "data": {"data_dir": cfg.data_dir, "vocab_size": run.meta["vocab_size"], "eot_id": run.meta["eot_id"], "chat": run.train_data.chat},
        "rng": rngs, "sampler": {"seed": cfg.seed, "next_step": progress.step, "global_batch": run.global_batch},
        "world_size": d.world_size, "parallel": "fsdp" if run.fsdp else "ddp" if d.enabled else "none",
    }


def eval_and_save(run: Run, progress: Progress, reason: str, background: bool = False) -> None:
    """Evaluate, record, and write the checkpoint (rank 0), with every rank taking part.
    Non-finite weights are never saved (the run stops), nor is anything during a streak of
    non-finite steps or after a non-finite evaluation: the weights may already be wrecked,
    and the last checkpoint must stay one from before.
    background: a sharded checkpoint may be written while training goes on (--async_checkpoint);
    the last save of a run is always waited for."""
    result = evaluate(run)
    if result is not None:
        progress.best_val_loss = min(progress.best_val_loss, result["val_loss"])
        log0(run.d, f"step {progress.step}: val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.4f}")
        write_metrics(run, {"step": progress.step, **result})
    if count_nonfinite(run.raw_model):  # no later step can repair them: stop, and never save them
        raise TrainError(f"step {progress.step}: the weights hold NaN or inf values; {nonfinite_advice(run.last_saved)}")
    if run.nonfinite_steps or (result is not None and not math.isfinite(result["val_loss"])):
        log0(run.d, f"step {progress.step}: not saving a checkpoint ({reason}): the last {run.nonfinite_steps} step(s) were non-finite"
             if run.nonfinite_steps else f"step {progress.step}: not saving a checkpoint ({reason}): the validation loss is not finite")
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = checkpoint_state(run, progress)
    run.last_saved = progress.step
    if run.fsdp:  # every rank writes its own shards; nothing is gathered
        model_state, optim_state = get_state_dict(run.raw_model, run.optimizers)
        previous = run.saver.wait()  # a background save still in flight finishes first
        if previous:
            log0(run.d, f"saved {previous} (written in the background)")
        wait = not (background and run.saver.background)
        t0 = time.perf_counter()
        path = run.saver.save({"model": model_state, "optimizer": optim_state}, state, run.cfg.out_dir, progress.step,
                              run.cfg.keep_checkpoints, wait=wait)
        if not wait:
            log0(run.d, f"saving {path} in the background ({reason}; training paused {time.perf_counter() - t0:.2f} s to copy the shards)")
            return
    else:
        if run.d.is_main:
            # The optimizer state keyed by parameter name, so that any layout can load it.
            model_state, optim_state = get_state_dict(run.raw_model, run.optimizers)
            state.update(model=model_state, optimizer=optim_state)
            path = save_checkpoint(state, run.cfg.out_dir, progress.step, run.cfg.keep_checkpoints)
        if run.d.enabled:
            dist.barrier()
    log0(run.d, f"saved {path if run.d.is_main else ''} ({reason})")


# ----------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, d: Dist, device: torch.device, saver: Optional[ShardedSaver]) -> tuple[Run, Progress]:
    """Everything before the first step: data, precision, the model (from scratch, --init_from
    or the checkpoint being resumed) with parallelism applied, optimizers and the start-up log."""
    sinks = MetricSinks(cfg, d.is_main)  # first: a missing wandb/tensorboard fails before any work
    # data_dir's datasets (one, or a weighted mixture with one tokenizer), each checked against its meta.json
    train_data, val_data, tokenizer_sha256, warnings = open_mixture(cfg.data_sources(), cfg.block_size, cfg.eval_iters * cfg.batch_size)
    meta = train_data.meta  # the tokenizer and vocabulary of them all
    for warning in warnings:
        log0(d, f"warning: {warning}")
    fsdp = uses_fsdp(cfg, d.world_size)
    dtype, dtype_why = choose_dtype(cfg.dtype, device, training=True, fsdp=fsdp)
    if fsdp and cfg.optimizer == "muon":
        raise TrainError("optimizer=muon needs whole matrices and FSDP shards them; use --parallel=ddp (or one process), or --optimizer=adamw")
    threads = configure_training_threads(device, fsdp and cfg.fsdp_cpu_offload, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"

    model_cfg, init_state = initial_weights(cfg, meta, d)
    cfg, memory_note = fit_to_memory(cfg, model_cfg, d.world_size, device, dtype)  # before building anything: refused in seconds
    with torch.device("meta"):  # shapes only; parallelism applies to it, then each rank allocates its part (materialize)
        raw_model = Transformer(model_cfg)
    lock = own_out_dir(cfg.out_dir) if d.is_main else None  # held as long as the Run lives
    resume_path, ckpt = find_resume_checkpoint(cfg.out_dir, cfg.resume, lambda line: log0(d, line), d.is_main)
    tok_file = meta["tokenizer"].get("file") or ""
    if ckpt is not None:
        global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * d.world_size
        check_resumable(ckpt, resume_path, model_cfg, d.world_size, global_batch, tokenizer_sha256,
                        os.path.join(cfg.out_dir, tok_file), lambda line: log0(d, line), cfg.optimizer)
        init_state = None if ckpt.get("sharded") else ckpt["model"]

    model: nn.Module = raw_model
    if cfg.grad_checkpoint:
        apply_grad_checkpoint(raw_model)
    if use_compile:
        apply_compile(raw_model)
    if fsdp:
        apply_fsdp(raw_model, cfg, device, torch.bfloat16 if dtype == torch.bfloat16 else None)
    materialize(raw_model, device, init_state, cfg.seed, cpu_offload=fsdp and cfg.fsdp_cpu_offload)
    if d.enabled and not fsdp:
        model = apply_ddp(raw_model, device)
    optimizers = make_optimizer(raw_model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                fused=device.type == "cuda" or (fsdp and cfg.fsdp_cpu_offload), kind=cfg.optimizer)
    # FSDP runs its own mixed precision; otherwise autocast does, with a loss scaler for fp16.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not fsdp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout masks differ per rank; restored on resume
    ready = [peak_memory_mb(device)] * d.world_size
    if d.enabled:
        dist.all_gather_object(ready, ready[0])
    log0(d, "memory with the model built: " + ", ".join(f"rank {r} {mb:,.0f} MB" for r, mb in enumerate(ready)) + " (peak so far)")

    progress = Progress()
    if ckpt is not None:
        restore_training_state(ckpt, resume_path, raw_model, optimizers, scaler, d.rank, device)
        progress = Progress(ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"], ckpt.get("elapsed_s", 0.0),
                            ckpt.get("source_tokens") or train_data.count_tokens({}, 0, ckpt["step"], global_batch))
        log0(d, f"resumed from {resume_path} at step {progress.step}")
    del ckpt, init_state

    peak_flops, peak_source = device_peak_flops(device, cfg.peak_flops, dtype)
    run = Run(cfg, d, device, meta, tokenizer_sha256, train_data, val_data, model_cfg, raw_model, model, optimizers, scaler,
              autocast, fsdp, peak_flops, sinks, saver=(saver or ShardedSaver(timeout_min=cfg.dist_timeout_min)) if fsdp else None,
              metrics_path=os.path.join(cfg.out_dir, "metrics.jsonl"), last_saved=progress.step if resume_path else None,
              lock=lock)
    if cfg.async_checkpoint and not fsdp:
        log0(d, "note: --async_checkpoint applies to FSDP's sharded checkpoints; this run writes .pt checkpoints, synchronously")
    counts = count_params(model_cfg)
    log0(d, format_config(cfg))
    log0(d, f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {model_cfg.vocab_size}")
    log0(d, f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accum x {d.world_size} ranks = {run.global_batch} sequences = {run.tokens_per_step:,} tokens per step")
    log0(d, f"dtype: {str(dtype).removeprefix('torch.')} ({dtype_why}) | attention: {attention_kernel(device, dtype, model_cfg)}{' | ' + threads if threads else ''}")
    log0(d, f"device: {device} {dtype} | parallel: {'fsdp' if fsdp else 'ddp' if d.enabled else 'none'} | compile: {use_compile} | grad checkpoint: {cfg.grad_checkpoint} | peak {peak_flops:.3g} FLOP/s ({peak_source})"
         + (f"\n{memory_note}" if memory_note else ""))
    if d.is_main:
        with open(os.path.join(cfg.out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"train": config_to_dict(cfg), "model": model_cfg.to_dict(), "chat": train_data.chat}, f, indent=2)
        if tok_file:  # sample.py and export_hf.py then need only out_dir
            shutil.copyfile(os.path.join(train_data.paths[0], tok_file), os.path.join(cfg.out_dir, tok_file))
        truncate_metrics(run.metrics_path, progress.step)
        write_status(cfg.out_dir, "running", step=progress.step, max_iters=cfg.max_iters, max_time_min=cfg.max_time_min,
                     elapsed_s=progress.elapsed_s, world_size=d.world_size,
                     started=time.time(), cwd=os.getcwd(), command=sys.argv)
    return run, progress


# ----------------------------------------------------------------------------- the run's state


@dataclass
class Run:
    """What one training run works with, built once by setup() and shared by the functions
    below: settings, ranks and device, data, the model (plain and as wrapped for forward), the
    optimizers, and the few counters the loop keeps between steps."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    meta: dict
    tokenizer_sha256: str
    train_data: Mixture  # one dataset, or several by weight
    val_data: Mixture
    model_cfg: ModelConfig
    raw_model: Transformer  # the plain (maybe FSDP-sharded) model: parameters and state dicts
    model: nn.Module  # what forward runs through: the DDP wrapper, or raw_model itself
    optimizers: list
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast: Any  # a torch.autocast context, or nullcontext()
    fsdp: bool
    peak_flops: float  # MFU's reference; raised if a step ever computes faster
    sinks: MetricSinks  # --wandb_project / --tensorboard_dir
    saver: Optional[ShardedSaver] = None  # writes an FSDP run's sharded checkpoints
    metrics_path: str = ""
    last_saved: Optional[int] = None  # step of the newest checkpoint this run wrote or resumed from
    nonfinite_steps: int = 0  # non-finite steps in a row, just before now
    speed_mark: tuple[float, int] = (0.0, 0)  # (time, tokens_seen) at the last log line
    lock: Any = None  # out_dir's train.lock (rank 0): held while the Run lives

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all ranks and micro-steps."""
        return self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.d.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.cfg.block_size


@dataclass
class Progress:
    """The counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = float("inf")
    elapsed_s: float = 0.0  # wall time of the run so far, across resumes: a time budget's clock
    source_tokens: dict = field(default_factory=dict)  # tokens drawn from each dataset of data_dir


def write_metrics(run: Run, record: dict) -> None:
    if run.d.is_main:
        append_metrics(run.metrics_path, record, run.sinks)


# ----------------------------------------------------------------------------- parallelism
# Each of these takes the plain model and changes how it runs, in the order
# checkpointing -> compile -> DDP/FSDP, so model.py stays free of parallel code.


def apply_grad_checkpoint(model: Transformer) -> None:
    model.grad_checkpoint = True


def apply_compile(model: Transformer) -> None:
    # Per block, in place: each block compiles once and is reused n_layer times, and names
    # stay free of the `_orig_mod.` prefix so checkpoints load without renaming.
    for block in model.layers:
        block.compile()


def apply_fsdp(model: Transformer, cfg: TrainConfig, device: torch.device, param_dtype: Optional[torch.dtype]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if param_dtype is not None:
        # Compute in bf16, but reduce gradients in fp32 so small updates are not rounded away.
        # Forward inputs are not cast: the blocks' inputs include the RoPE tables, which then
        # stay fp32 exactly as under DDP's autocast (apply_rope computes in fp32 either way).
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if cfg.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")  # (pinning needs CUDA)
    # The groups backward needs first (the head's, which holds a tied embedding too, and the
    # last block) stay gathered after forward rather than being gathered again at once.
    keep = {**kwargs, "reshard_after_forward": False}
    for i, block in enumerate(model.layers):
        fully_shard(block, **(keep if i == len(model.layers) - 1 else kwargs))
    if model.config.tie_embeddings:
        # The tied weight is used by embed (first) and lm_head (last): both must live in one
        # FSDP group, or one of the two would see a resharded (freed) parameter.
        fully_shard([model.embed, model.norm, model.lm_head], **keep)
    else:
        fully_shard(model.embed, **kwargs)
        fully_shard([model.norm, model.lm_head], **keep)
    fully_shard(model, **kwargs)


def apply_ddp(model: Transformer, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: the gradients live inside DDP's communication buckets instead
    # of beside them, which saves one full copy of the gradients.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


# ----------------------------------------------------------------------------- the model's weights


def initial_weights(cfg: TrainConfig, meta: dict, d: Dist) -> tuple[ModelConfig, Optional[dict]]:
    """The model's config and the weights to start from: --init_from's (a run directory, a
    checkpoint or a HF directory; grown by the chat tokens prepare.py appended to its
    tokenizer), or None for a fresh init."""
    init_state = None
    if cfg.init_from == "scratch":
        model_cfg = cfg.model_config(meta["vocab_size"])
        if cfg.vocab_size and cfg.vocab_size != meta["vocab_size"]:
            log0(d, f"note: the config sets vocab_size={cfg.vocab_size} (a preset for another tokenizer, e.g. Qwen's), but the tokenizer of "
                 f"{cfg.data_dir} has {meta['vocab_size']} tokens: rows past it are never trained; --vocab_size=None sizes the model to the data")
    else:
        if cfg.init_from.startswith("hf:"):  # no tokenizer record: prepare.py read the directory's own tokenizer
            model_cfg, init_state = load_hf_model(cfg.init_from[3:])
            ckpt = {"model_config": model_cfg.to_dict(), "model": init_state}
        else:
            ckpt = load_init_checkpoint(cfg.init_from)
            model_cfg, init_state = ModelConfig.from_dict(ckpt["model_config"]), ckpt["model"]
        # Grow only by the chat tokens prepare.py appended to the model's tokenizer; any other
        # shortfall means another tokenizer, refused below.
        if 0 < meta["vocab_size"] - model_cfg.vocab_size <= meta["tokenizer"].get("chat_tokens_added", 0):
            model_cfg, init_state = grow_vocab(ckpt, meta["tokenizer"], meta["vocab_size"])
            log0(d, f"grew the vocabulary from {ckpt['model_config']['vocab_size']} to {model_cfg.vocab_size} tokens for the dataset's tokenizer: new embedding/output rows = mean of the old")
    if model_cfg.vocab_size < meta["vocab_size"]:
        raise TrainError(f"the model's vocab_size={model_cfg.vocab_size} is smaller than the dataset tokenizer's "
                         f"vocab_size={meta['vocab_size']}; leave vocab_size unset or prepare the data with the model's tokenizer")
    if model_cfg.max_seq_len < cfg.block_size:
        raise TrainError(f"block_size={cfg.block_size} exceeds the initial model's max_seq_len={model_cfg.max_seq_len}")
    return model_cfg, init_state


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process (in a group of one for FSDP's offload)."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    device = resolve_device(cfg.device, d.local_rank)
    if device.type == "cuda":
        log0(d, configure_cuda_allocator())  # before CUDA allocates anything
        torch.cuda.set_device(device)
    if uses_fsdp(cfg, d.world_size) or d.enabled:
        # nccl for GPUs, gloo for CPU; the timeout turns a dead or stuck rank into an error
        # instead of an endless hang in the next collective. With FSDP's CPU offload the
        # sharded gradients live in host memory, so gradient clipping and checkpoint gathers
        # run collectives on CPU tensors too: those need gloo next to nccl.
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and cfg.parallel == "fsdp" and cfg.fsdp_cpu_offload:
            backend = "cuda:nccl,cpu:gloo"
        alone = {} if "MASTER_ADDR" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}  # not under torchrun
        # Imported before the group exists: its functions take group=group.WORLD as a default,
        # and imported later (DDP imports it through torch._dynamo) they would hold the group
        # until Python exits, out of end_distributed's reach.
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=cfg.dist_timeout_min),
                                device_id=device if device.type == "cuda" else None, **alone)
    return d, device


def log0(d: Dist, *args) -> None:
    if d.is_main:
        print(*args, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_args_or_exit(TrainConfig, sys.argv[1:] if argv is None else argv)
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        print(f"error: out_dir {cfg.out_dir} is a file, not a directory; choose another --out_dir", file=sys.stderr)
        sys.exit(2)
    if cfg.dry_run:
        dry_run(cfg)
        return
    stop_when_the_launcher_dies()
    d = Dist()
    # Made here, so that the finally below can let a background checkpoint write complete
    # before the process group it talks over is destroyed.
    saver = ShardedSaver(background=cfg.async_checkpoint, timeout_min=cfg.dist_timeout_min)
    try:
        d, device = setup_distributed(cfg)
        train(cfg, d, device, saver)
    except USER_ERRORS as err:
        if d.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
            record_crash(cfg.out_dir, f"error: {err}")
        sys.exit(1)
    except OSError as err:  # a full disk, a read-only out_dir: the system's words, on one line
        message = f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}"
        print(message, file=sys.stderr, flush=True)
        if d.is_main:
            record_crash(cfg.out_dir, message)
        sys.exit(1)
    except (Exception, KeyboardInterrupt) as err:  # a bug, out of memory, a second Ctrl-C: the traceback still prints
        if d.is_main:
            record_crash(cfg.out_dir, f"{type(err).__name__}: {err}")
        raise
    finally:
        saver.close()  # a background save in flight completes before the process group goes
        end_distributed(sys.exc_info()[1])


if __name__ == "__main__":
    main()
