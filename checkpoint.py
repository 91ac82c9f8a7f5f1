"""A run's checkpoints on disk: HomeLLM's checkpoints (written atomically, found and loaded)
and the resume policy train.py follows. What others watch while it trains (status.json,
metrics.jsonl and its W&B/TensorBoard mirrors) is runlog.py's.

    save_checkpoint(state, out_dir, step, keep)  # atomic ckpt.pt plus numbered copies
    path = find_checkpoint(out_dir)               # ckpt.pt, or the newest numbered copy
    ckpt = load_checkpoint(path)                  # weights_only: a stranger's .pt cannot run code
    ShardedSaver(background=True).save(shards, state, out_dir, step, keep)  # FSDP: DCP, each rank its part
    tok = load_checkpoint_tokenizer(ckpt, path)   # the tokenizer it was trained with

A checkpoint is a dict of tensors and plain data: model (state dict without wrapper prefixes),
model_config, tokenizer (the dataset's tokenizer record) and, when train.py wrote it, the
training state (optimizer, scaler, rng, step, ...). train.py copies the tokenizer file next to
ckpt.pt, so an out_dir is self-contained. Hugging Face directories are hf.py's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import time
import warnings
import zipfile
from typing import Any, Callable, Optional

import torch

from configurator import parse_data_mixture
from dataset import file_sha256
from model import ModelConfig, Transformer, count_params
from system import pid_alive
from tokenizer import Tokenizer, TokenizerError, load_tokenizer

CHECKPOINT_FORMAT = 1


def print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or foreign; the message says what to do."""


# ----------------------------------------------------------------------------- writing


def atomic_save(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a
    crash at any moment leaves either the old or the new file, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_copy(src: str, dst: str) -> None:
    """Copy src to dst through a temp file and a rename: dst is either old or complete."""
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)  # copy_file_range on Linux: a reflink where the filesystem can
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


NUMBERED = re.compile(r"ckpt_(\d+)\.pt")


def numbered_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the ckpt_STEP.pt copies in out_dir, oldest step first. Sorted by the
    number, not the name: ckpt_1000000.pt comes after ckpt_999999.pt."""
    found = [(int(m.group(1)), os.path.join(out_dir, name)) for name in os.listdir(out_dir) if (m := NUMBERED.fullmatch(name))]
    return sorted(found)


def save_checkpoint(state: dict, out_dir: str, step: int, keep: int) -> str:
    """state -> out_dir/ckpt.pt (atomically), plus an independent copy ckpt_STEP.pt; only the
    newest `keep` numbered copies are kept. A copy, not a hard link: whatever later happens to
    ckpt.pt (truncated, overwritten in place) cannot reach the numbered copy."""
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        atomic_save(state, path)
        if keep > 0:
            atomic_copy(path, os.path.join(out_dir, f"ckpt_{step:06d}.pt"))
            for _, old in numbered_checkpoints(out_dir)[:-keep]:
                os.remove(old)
    except OSError as err:
        raise CheckpointError(
            f"could not write a checkpoint into {out_dir} ({err.strerror or err}); the checkpoints already "
            "there are intact: free disk space or fix permissions, then run again to resume"
        ) from None
    return path


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete NAME.tmp.PID files that a killed writer left behind (PID no longer running), and
    unfinished sharded saves (.ckpt_STEP.tmp/; the caller holds out_dir's lock, so no live
    run is writing one)."""
    removed = []
    for name in os.listdir(out_dir):
        m = re.fullmatch(r".+\.tmp\.(\d+)", name)
        if m and not pid_alive(int(m.group(1))):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
        elif re.fullmatch(r"\.ckpt_\d+\.(tmp|old)", name) and os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name))
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------- reading


def find_checkpoint(out_dir: Optional[str], ckpt: Optional[str] = None, log: Callable[[str], None] = print_stderr) -> str:
    """The checkpoint to load: `ckpt` when given, else the newest in out_dir (see
    checkpoint_candidates): ckpt.pt for single-process and DDP runs, ckpt_STEP/ for FSDP runs;
    a damaged ckpt_STEP/ is passed over with a note through `log`.
    out_dir None: the run in the current directory that saved most recently (newest_run)."""
    if ckpt:
        if not os.path.exists(ckpt):
            raise CheckpointError(f"checkpoint {ckpt} does not exist")
        return ckpt
    if out_dir is None:
        out_dir = newest_run(".")
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"no checkpoint: the directory {out_dir} does not exist; run train.py first or pass --ckpt PATH")
    candidates = checkpoint_candidates(out_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint at {os.path.join(out_dir, 'ckpt.pt')} (nor a numbered or sharded ckpt_STEP one); "
                              "run train.py first (it writes them into --out_dir) or pass --ckpt PATH")
    for path in candidates[:-1]:
        if is_sharded(path):
            try:
                load_train_state(path)  # its records and index: cheap, no weights
            except CheckpointError as err:
                log(f"note: passing over {path}: {err}")
                continue
        return path
    return candidates[-1]  # loading it says what is wrong


def newest_run(root: str) -> str:
    """The directory under root (root itself, or one level down) whose checkpoint was written
    last: after `python train.py config/X.py` that is X's out_dir, whatever the preset named it."""
    runs = [root] + [os.path.join(root, name) for name in sorted(os.listdir(root)) if not name.startswith(".")]
    newest, when = None, -1.0
    for run in runs:
        if not os.path.isdir(run):
            continue
        for name in os.listdir(run):
            if name == "ckpt.pt" or NUMBERED.fullmatch(name) or SHARDED.fullmatch(name):
                mtime = os.path.getmtime(os.path.join(run, name))
                if mtime > when:
                    newest, when = run, mtime
    if newest is None:
        raise CheckpointError(f"no checkpoint in {os.path.abspath(root)} or the directories in it; run train.py first, "
                              "or pass --out_dir DIR (where train.py wrote its checkpoints) or --ckpt PATH")
    return os.path.normpath(newest)


def checkpoint_candidates(out_dir: str) -> list[str]:
    """Every checkpoint in out_dir, newest first: ckpt.pt, the numbered ckpt_STEP.pt copies and
    the sharded ckpt_STEP/ directories of FSDP runs (a run may have both, e.g. FSDP resumed on
    one process). The higher step wins; at equal steps ckpt.pt comes first. ckpt.pt's step is
    read from the file; if it cannot be read it is listed first, so that the caller's load
    reports why."""
    found = [(step, 0, path) for step, path in numbered_checkpoints(out_dir)]
    found += [(step, 1, path) for step, path in sharded_checkpoints(out_dir)]
    latest = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(latest):
        try:
            step = int(load_checkpoint(latest).get("step", 0))
        except CheckpointError:
            step = 1 << 62
        found.append((step, 2, latest))
    return [path for _, _, path in sorted(found, reverse=True)]


def load_checkpoint(path: str) -> dict:
    """A checkpoint as a dict with at least "model" (the weights) and "model_config". A .pt file
    is read with weights_only=True (see load_checkpoint_file); a sharded checkpoint (an FSDP
    run's ckpt_STEP/ directory) is consolidated on the fly: the full weights, on the CPU,
    without a process group; its optimizer state is not read."""
    ckpt = load_sharded_weights(path) if is_sharded(path) else load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
        raise CheckpointError(f"{path} is not a HomeLLM checkpoint: expected a dict with 'model' and 'model_config', as train.py writes")
    return ckpt


def load_checkpoint_file(path: str) -> object:
    """torch.load with weights_only=True: a checkpoint is tensors and plain data, and a .pt from
    a stranger must not be able to run code while it is unpickled."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle-protocol notes: stderr stays one line
            # mmap (zip format only, which torch.save writes): only the tensors we touch are
            # read, so the optimizer state in a training checkpoint costs no memory here.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:
        raise unreadable(path, err) from None


def load_init_checkpoint(path: str) -> dict:
    """The checkpoint that train.py --init_from names: a run directory (its newest checkpoint, see
    find_checkpoint), a .pt file or an FSDP run's sharded ckpt_STEP/ directory (a directory that
    holds DCP's index or train_state.pt; whether it is whole, loading says)."""
    sharded = any(os.path.isfile(os.path.join(path, name)) for name in (".metadata", TRAIN_STATE))
    return load_checkpoint(find_checkpoint(path) if os.path.isdir(path) and not sharded else path)


def grow_vocab(ckpt: dict, tokenizer: dict, vocab_size: int) -> tuple[ModelConfig, dict]:
    """The model config and weights of `ckpt` with room for vocab_size tokens, for fine-tuning
    on data whose tokenizer is the checkpoint's plus a few tokens (prepare.py appends the chat
    tokens to one that lacks them). The embedding and an untied lm_head get new rows equal to
    the mean of their old rows: a neutral start, near every token rather than near none."""
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    before = ckpt.get("tokenizer") or {}
    if before and (before.get("kind"), before.get("eot_id")) != (tokenizer.get("kind"), tokenizer.get("eot_id")):
        raise CheckpointError(
            f"the dataset's tokenizer ({tokenizer.get('kind')}, {vocab_size} tokens) is not the checkpoint's "
            f"({before.get('kind')}, {cfg.vocab_size} tokens) with tokens added; prepare the data with --tokenizer set to the "
            "tokenizer file of the run you start from (e.g. out/tokenizer.model)"
        )
    state = dict(ckpt["model"])
    for name in ("embed.weight", "lm_head.weight"):
        old = state[name]
        if name == "lm_head.weight" and cfg.tie_embeddings:
            state[name] = state["embed.weight"]  # one tensor, as in the model
            continue
        mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)
        state[name] = torch.cat([old, mean.expand(vocab_size - old.shape[0], -1)])
    return ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": vocab_size}), state


def checkpoint_tokenizer_path(ckpt: dict, ckpt_path: str) -> str:
    """The tokenizer file of a checkpoint: train.py copies it next to ckpt.pt; a checkpoint moved
    without it falls back to the data directory it was trained on. A file whose SHA-256 is not
    the one the checkpoint recorded is not its tokenizer, whatever its name and size: another
    tokenizer maps the same ids to other text, and would turn every sample into garbage."""
    info = ckpt.get("tokenizer")
    if not isinstance(info, dict):
        raise CheckpointError(f"{ckpt_path} records no tokenizer; it was not written by train.py")
    name = info.get("file") or ""
    here = os.path.dirname(os.path.abspath(ckpt_path))
    data_dir = (ckpt.get("train_config") or {}).get("data_dir") or (ckpt.get("data") or {}).get("data_dir")
    try:  # a mixture's datasets ("data/a:0.8,data/b:0.2") share the tokenizer
        data_dirs = [path for path, _ in parse_data_mixture(data_dir)] if isinstance(data_dir, str) and data_dir else []
    except ValueError:
        data_dirs = [data_dir]
    trained_with = ckpt.get("tokenizer_sha256")
    foreign = []
    for base_dir in (here, *data_dirs):
        path = os.path.join(base_dir, name) if base_dir and name else ""
        if path and os.path.isfile(path):
            if not trained_with or file_sha256(path) == trained_with:
                return path
            foreign.append(path)
    if foreign:
        raise CheckpointError(
            f"the tokenizer file {foreign[0]} is not the one {ckpt_path} was trained with (its sha256 differs from the "
            f"recorded {trained_with[:12]}); copy {name} from the dataset it was trained on into {here}"
        )
    raise CheckpointError(
        f"the tokenizer file {name or '(none recorded)'} of {ckpt_path} is neither next to it nor in its "
        f"data_dir {data_dir}; copy {name or 'it'} from the prepared dataset into {here}"
    )


def load_checkpoint_tokenizer(ckpt: dict, ckpt_path: str) -> Tokenizer:
    """The tokenizer the checkpoint was trained with (see checkpoint_tokenizer_path)."""
    path = checkpoint_tokenizer_path(ckpt, ckpt_path)
    try:
        return load_tokenizer(ckpt["tokenizer"], os.path.dirname(path))
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None  # the message already names the file and the fix


def model_from_checkpoint(ckpt: dict, device: str | torch.device, dtype: torch.dtype, name: str = "the checkpoint") -> Transformer:
    """The Transformer described by ckpt["model_config"] with ckpt["model"] loaded strictly, in
    eval mode. Everything is checked before anything is allocated: a model_config that asks for
    a size the stored weights do not have is refused, not built. `name` (the checkpoint's path)
    only makes error messages clearer."""
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name} has an invalid model_config: {err}") from None
    state = ckpt["model"]
    stored = sum(t.numel() for k, t in state.items() if isinstance(t, torch.Tensor) and not (cfg.tie_embeddings and k == "lm_head.weight"))
    wanted = count_params(cfg)["total"]
    if stored != wanted:
        raise CheckpointError(f"{name} does not match its model_config: the config describes {wanted:,} parameters, the file holds {stored:,}")
    # Compare keys and shapes ourselves: load_state_dict's own error is a multi-line dump.
    expected = expected_shapes(cfg)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(getattr(state[k], 'shape', ()))}, the config needs {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and getattr(state[k], "shape", None) != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{name} does not match its model_config: {'; '.join(problems[:3])}{more}")
    # Shapes only, then each stored tensor cast straight into its final dtype and place: no
    # random init, and never the whole model in fp32 on the device (a 3B model in bf16 then
    # loads on a 12 GB GPU, which its fp32 copy alone would fill).
    with torch.device("meta"):
        model = Transformer(cfg)
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if cfg.tie_embeddings:
        cast["lm_head.weight"] = cast["embed.weight"]
    model.load_state_dict(cast, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # one Parameter, as Transformer() ties them
    allocate_buffers(model, device)  # the RoPE tables: derived from the config, never stored
    model.init_rope()
    return model.to(dtype=dtype).eval()


# ----------------------------------------------------------------------------- weights into a (sharded) model


def materialize(model: Transformer, device: torch.device, init_state: Optional[dict], seed: int, cpu_offload: bool = False) -> None:
    """Allocate the (possibly sharded) meta model on device and fill it: with init_state when
    given, else with a fresh init drawn on the CPU from a generator seeded with `seed`, one full
    tensor at a time in the model's parameter order. Either way each rank copies only its own
    part, so memory holds this rank's shards plus one full tensor at most, and the weights are
    the same for any number of ranks and any layout (plain, DDP, FSDP). A mmapped checkpoint
    is read only where this rank's slices lie, so a node reads each byte once.
    cpu_offload: FSDP's CPU offload keeps the sharded parameters in host memory and refuses
    any elsewhere, so they are allocated on the CPU; the buffers (RoPE tables) are not FSDP's
    and go where the model computes."""
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    if cpu_offload:
        allocate_buffers(model, device)
    if model.config.tie_embeddings and model.lm_head.weight is not model.embed.weight:
        model.lm_head.weight = model.embed.weight  # to_empty gives each module its own new tensor
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if init_state is None:
            for name, param in model.named_parameters():
                full = torch.empty(param.shape)
                model.init_parameter(name, full, generator)
                copy_local_part(param, full)
        else:
            expected = model.state_dict()
            missing, unexpected = set(expected) - set(init_state), set(init_state) - set(expected)
            if missing or unexpected:
                raise CheckpointError(f"the initial weights do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
            for name, param in expected.items():
                copy_local_part(param, init_state[name])
    model.init_rope()


def allocate_buffers(model: Transformer, device: torch.device) -> None:
    """Give every buffer of the model (the RoPE tables) fresh, unfilled memory on device."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.empty_like(buffer, device=device), persistent=False)


def copy_local_part(param: torch.Tensor, full: torch.Tensor) -> None:
    """param (a plain tensor, or an FSDP shard as a DTensor) <- its part of the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    param.to_local().copy_(local)


# ----------------------------------------------------------------------------- resuming
# The policy train.py follows: which checkpoint to continue from, whether it may, and how the
# training state comes back. One run per out_dir at a time (own_out_dir).


def own_out_dir(out_dir: str) -> Any:
    """Take out_dir/train.lock for this run (rank 0), or refuse: two runs writing one out_dir
    would interleave their metrics and checkpoints. flock is released by the kernel when the
    holder dies, even by kill -9, so a stale lock never blocks; the pid and host written into
    the file only make the message useful. Also removes temp files of saves that a kill cut
    short. Returns the open lock file: the lock lasts as long as that object."""
    import fcntl

    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "train.lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise CheckpointError(f"{out_dir} is in use by another training run ({holder}); wait for it or stop it, or choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    lock.flush()
    for name in remove_stale_temp_files(out_dir):
        print(f"removed {name}, left behind by a run killed while saving", flush=True)
    return lock


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop records a killed run wrote after its last checkpoint, so metrics.jsonl
    reads as one run."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:  # a torn last line (power loss mid-write) is dropped, not fatal
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def find_resume_checkpoint(out_dir: str, resume: str, log: Callable[[str], None], is_main: bool = True) -> tuple[Optional[str], Optional[dict]]:
    """The checkpoint to continue from, loaded: (path, ckpt), or (None, None) to start fresh.
    A sharded checkpoint is loaded without its tensors here (ckpt["sharded"] is True), but
    checked to be whole (load_train_state).

    --resume=auto takes the newest checkpoint that loads (ckpt.pt, a numbered copy, or an FSDP
    run's ckpt_STEP/), saying so when it had to pass over newer ones; those are moved into
    unloadable-TIME/, since the run will reach their steps again and must not write over them.
    It never starts over on top of checkpoints it cannot read: that would rotate them away.
    --resume=never moves an earlier run's checkpoints, metrics, config and tokenizer into
    previous-run-TIME/ first, so starting over loses nothing and the old run can still be
    sampled there. --resume=PATH: that checkpoint (a .pt file or a ckpt_STEP/ directory).
    log: how notes reach the user (train.py's prints on rank 0 only)."""
    def load(path: str) -> dict:
        return load_train_state(path) if is_sharded(path) else load_checkpoint(path)

    if resume not in ("auto", "never"):
        if not os.path.exists(resume):
            raise CheckpointError(f"--resume={resume}: no such checkpoint; --resume takes auto, never, or the path of a .pt file or ckpt_STEP/ directory")
        return resume, load(resume)
    candidates = checkpoint_candidates(out_dir) if os.path.isdir(out_dir) else []
    if resume == "never":
        if candidates and is_main:
            names = [name for name in os.listdir(out_dir) if NUMBERED.fullmatch(name) or SHARDED.fullmatch(name) or name in RUN_RECORDS]
            archive = move_aside(out_dir, "previous-run-", names)
            for name in TOKENIZER_FILES & set(os.listdir(out_dir)):  # copied: the new run needs its own
                shutil.copyfile(os.path.join(out_dir, name), os.path.join(archive, name))
            log(f"--resume=never: moved the earlier run's checkpoints, metrics and config to {archive}")
        return None, None
    problems, passed_over = [], []
    for path in candidates:
        try:
            ckpt = load(path)
        except CheckpointError as err:
            problems.append(str(err))
            passed_over.append(os.path.basename(path))
            log(f"warning: cannot resume from {path}: {err}")
            continue
        latest = os.path.join(out_dir, "ckpt.pt")
        if NUMBERED.fullmatch(os.path.basename(path)) and not os.path.exists(latest):
            log(f"note: {latest} is missing; resuming from the newest numbered copy that loads, {path}")
        if passed_over and is_main:
            aside = move_aside(out_dir, "unloadable-", passed_over)
            log(f"note: moved {', '.join(passed_over)} to {aside}: this run goes on from {path} and must not write over them")
        return path, ckpt
    if problems:
        raise CheckpointError(
            f"{out_dir} holds checkpoints but none of them loads ({problems[0]}); pass --resume=PATH to pick one, "
            "--resume=never to start over (the old files are moved aside), or another --out_dir"
        )
    return None, None


RUN_RECORDS = ("ckpt.pt", "metrics.jsonl", "config.json", "status.json")
TOKENIZER_FILES = {"tokenizer.model", "tokenizer.tiktoken"}  # the names prepare.py gives a dataset's tokenizer


def move_aside(out_dir: str, prefix: str, names: list[str]) -> str:
    """Move out_dir/NAME for each name into a new out_dir/PREFIX<time>/; returns its path."""
    aside = os.path.join(out_dir, time.strftime(f"{prefix}%Y%m%d-%H%M%S"))
    while os.path.exists(aside):  # twice in one second
        aside += "-"
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


def check_resumable(ckpt: dict, path: str, model_cfg: ModelConfig, world_size: int, global_batch: int, tokenizer_sha256: str,
                    out_dir_tokenizer: str, log: Callable[[str], None], optimizer: str = "adamw") -> None:
    """Refuse to resume from a checkpoint that holds no training state or belongs to another
    model, optimizer or tokenizer; say what changes when the number of ranks did."""
    if ("optimizer" not in ckpt and not ckpt.get("sharded")) or "world_size" not in ckpt:
        raise CheckpointError(
            f"{path} holds weights but no training state (e.g. made by export_hf.py --import_from); "
            f"train into another out_dir with --init_from={path}"
        )
    saved = ModelConfig.from_dict(ckpt["model_config"])
    if saved != model_cfg:
        diffs = [f"{k}={v!r} (checkpoint) vs {getattr(model_cfg, k)!r} (now)" for k, v in saved.to_dict().items() if getattr(model_cfg, k) != v]
        raise CheckpointError(
            f"cannot resume from {path}: the model config differs: {', '.join(diffs)}; use the same settings, "
            f"or start a new out_dir with --init_from={path} to warm-start from its weights"
        )
    trained_with_optimizer = (ckpt.get("train_config") or {}).get("optimizer", "adamw")
    if trained_with_optimizer != optimizer:  # its state has other entries (Muon: momentum only)
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with --optimizer={trained_with_optimizer}, this run asks for {optimizer}; "
            f"use --optimizer={trained_with_optimizer}, or start a new out_dir with --init_from={path} to switch with its weights"
        )
    if ckpt["world_size"] != world_size:
        # Weights and optimizer state reshard to any number of ranks. Which windows a step reads
        # depends only on (seed, step, global batch), so with the same global batch the data
        # continues exactly; only the per-rank dropout RNG streams cannot be carried over.
        before, now = ckpt.get("sampler", {}).get("global_batch"), global_batch
        same = "the same global batch, so the data order continues exactly" if before == now else (
            f"a global batch of {now} sequences instead of {before}: set batch_size or gradient_accumulation_steps to keep it")
        log(f"note: {path} was written by {ckpt['world_size']} rank(s), this run has {world_size}; {same}")
    # Same vocab size is not enough: another tokenizer maps the same ids to other text. Older
    # checkpoints carry no fingerprint; then the tokenizer copy in out_dir stands in for it.
    trained_with = ckpt.get("tokenizer_sha256") or (file_sha256(out_dir_tokenizer) if os.path.isfile(out_dir_tokenizer) else None)
    if trained_with and trained_with != tokenizer_sha256:
        raise CheckpointError(
            f"cannot resume from {path}: the dataset's tokenizer is not the one this run was trained with "
            f"(sha256 {tokenizer_sha256[:12]} vs {trained_with[:12]}); train on data prepared with the same tokenizer, "
            f"or start a new out_dir with --init_from={path} to continue from these weights on purpose"
        )


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_training_state(ckpt: dict, path: str, model: Transformer, optimizers: list, scaler, rank: int, device: torch.device) -> None:
    """Optimizer, loss scaler and RNG from a checkpoint (a sharded one: the weights too). A
    sharded checkpoint loads into any number of ranks; a .pt one's optimizer state is full, and
    each rank keeps its part of it. Each rank takes back its own RNG state; ranks the writer
    did not have keep their fresh seed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict, set_state_dict

    try:
        if ckpt.get("sharded"):
            model_state, optim_state = get_state_dict(model, optimizers)
            shards = {"model": model_state, "optimizer": optim_state}
            load_sharded(path, shards)
            set_state_dict(model, optimizers, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
        elif all(isinstance(k, int) for k in ckpt["optimizer"].get("state", {})):  # written before names were used
            optimizers[-1].load_state_dict(ckpt["optimizer"])
        else:  # keyed by parameter name: each rank of a sharded model keeps its part
            set_optimizer_state_dict(model, optimizers, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if rank < len(ckpt["rng"]):
            set_rng_state(ckpt["rng"][rank], device)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # a state that does not fit this run's optimizer
        raise CheckpointError(f"cannot restore the training state of {path} ({type(err).__name__}: {str(err)[:200]}); it does not "
                              f"fit this run's model and optimizer: start a new out_dir with --init_from={path}") from None


# ----------------------------------------------------------------------------- sharded checkpoints (FSDP)
# An FSDP run saves with torch.distributed.checkpoint (DCP): every rank writes its own shards
# of the weights and optimizer state in parallel, nothing is gathered, and any number of ranks
# (one process included) can load the result. Layout of out_dir/ckpt_STEP/:
#   .metadata, __RANK_0.distcp ...  DCP's index and shards: {"model": ..., "optimizer": ...}
#   train_state.pt                  everything else, as in a .pt checkpoint (torch.save, weights_only)

SHARDED = re.compile(r"ckpt_(\d+)")
TRAIN_STATE = "train_state.pt"


def is_sharded(path: str) -> bool:
    """A checkpoint that is a directory is a sharded one (whole or not: loading says)."""
    return os.path.isdir(path)


def sharded_checkpoints(out_dir: str, complete: bool = False) -> list[tuple[int, str]]:
    """(step, path) of the ckpt_STEP/ directories in out_dir, oldest first; complete=True:
    only those holding both .metadata and train_state.pt, the ones rotation may remove. An
    incomplete one (a copy cut short, a file deleted by hand) still holds weights: it is
    listed, so that resuming passes over it with a word instead of starting over on top."""
    found = []
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if (m := SHARDED.fullmatch(name)) and os.path.isdir(path):
            if not complete or (os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, TRAIN_STATE))):
                found.append((int(m.group(1)), path))
    return sorted(found)


class ShardedSaver:
    """Writes ckpt_STEP/ directories with DCP, each rank its own part, plus `state` (plain
    data, rank 0). Atomic like save_checkpoint: everything goes into .ckpt_STEP.tmp/ and is
    renamed at the end, so a kill at any moment leaves the earlier checkpoints as they were.
    Keeps the newest max(1, keep) such directories.

    background=True writes with DCP's async_save: each rank's shards are first copied to CPU
    memory (the only pause training sees), then a thread writes them while training goes on,
    talking to the other ranks over a gloo group of its own so as not to cross training's
    collectives. When the writes are complete, rank 0 renames the directory into place from
    that thread. Costs a CPU copy of the rank's shards, kept for the next save: one stager
    copies every save into the same host memory, pinned when there is a GPU (fast to copy
    into, and pinned once rather than allocated and pinned again at every save)."""

    def __init__(self, background: bool = False, timeout_min: float = 30.0):
        self.background = background
        self.timeout_min = timeout_min
        self._group = None  # the writing threads' gloo group, made on the first background save
        self._stager = None  # the host copy of the shards, made on the first background save
        self._pending: Optional[tuple] = None  # (published Event, problems list, out_dir, final path)

    def save(self, shards: dict, state: dict, out_dir: str, step: int, keep: int, wait: bool = True) -> str:
        """Write ckpt_STEP/, after finishing the save in flight if there is one. A collective:
        every rank calls it. With background=True and wait=False it returns once the shards
        are copied; the path returned is where the checkpoint will be."""
        import datetime

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.wait()
        rank = dist.get_rank()
        final = os.path.join(out_dir, f"ckpt_{step:06d}")
        tmp, old = os.path.join(out_dir, f".ckpt_{step:06d}.tmp"), os.path.join(out_dir, f".ckpt_{step:06d}.old")
        with _sharded_save_advice(out_dir):
            if rank == 0:
                for path in (tmp, old):
                    shutil.rmtree(path, ignore_errors=True)
                os.makedirs(tmp)
            dist.barrier()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP's notes about overwriting, planners and experimental features
                if self.background:
                    if self._group is None:
                        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=self.timeout_min))
                        # The copy happens here, before save() returns (no staging thread); the
                        # previous save's write has finished (wait() above), so its memory is free.
                        self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                                                    use_async_staging=False, use_non_blocking_copy=False))
                    future = dcp.async_save(shards, checkpoint_id=tmp, process_group=self._group, async_stager=self._stager)
                else:
                    dcp.save(shards, checkpoint_id=tmp)
                    future = None
        published, problems = threading.Event(), []

        def publish(written=None) -> None:
            try:
                if written is not None:
                    written.result()  # raises what the write raised; DCP writes .metadata after every rank's shards
                if rank == 0:
                    _publish_sharded(tmp, final, old, out_dir, keep, state)
            except BaseException as err:
                problems.append(err)
            finally:
                published.set()

        self._pending = (published, problems, out_dir, final)
        if future is None:
            publish()
        else:
            future.add_done_callback(publish)
        if wait:
            self.wait()
            dist.barrier()  # every rank returns with the checkpoint in place
        return final

    def wait(self) -> Optional[str]:
        """Block until the save in flight (if any) is written and in place; returns its path.
        Raises CheckpointError if writing it failed (the earlier checkpoints are intact)."""
        if self._pending is None:
            return None
        published, problems, out_dir, final = self._pending
        self._pending = None
        published.wait()
        if problems:
            with _sharded_save_advice(out_dir):
                raise problems[0]
        return final

    def close(self) -> None:
        """When the run ends by an error: give a background write in flight up to timeout_min
        to complete, so that the checkpoint it holds is not lost, then let it go. Never raises:
        the error that ended the run matters more."""
        if self._pending is not None:
            self._pending[0].wait(self.timeout_min * 60)
            self._pending = None
        self._group = None  # the group's threads end with its last reference (train.end_distributed)
        if self._stager is not None:
            self._stager.close()  # unpins and frees the host copy
            self._stager = None


def _publish_sharded(tmp: str, final: str, old: str, out_dir: str, keep: int, state: dict) -> None:
    """Rank 0, once every shard is written: add train_state.pt, rename tmp into place (an older
    save of the same step is swapped aside, never deleted first), drop the oldest beyond keep."""
    atomic_save(state, os.path.join(tmp, TRAIN_STATE))
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in sharded_checkpoints(out_dir, complete=True)[: -max(1, keep)]:
        shutil.rmtree(stale)


@contextlib.contextmanager
def _sharded_save_advice(out_dir: str):
    """A failed sharded write (DCP gathers every rank's error into a CheckpointException) as
    one line that says the earlier checkpoints are intact and what to do."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, CheckpointException) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"could not write a sharded checkpoint into {out_dir} ({why}); the checkpoints already "
            "there are intact: free disk space or fix permissions, then run again to resume"
        ) from None


def load_sharded(path: str, shards: dict) -> None:
    """Fill `shards` (state dicts of the current model and optimizer, sharded or not) from the
    sharded checkpoint at path. DCP reshards as needed: 2 ranks may load what 4 wrote, and a
    single process (no process group) may load it too. Nothing in the directory can run code:
    the index is read by read_sharded_index, the byte entries (an optimizer's param-group
    settings) are unpickled with weights_only=True (_safe_load_planner)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_sharded_index(path)  # its problems as one clear line, before DCP wraps them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(shards, storage_reader=_SafeReader(path), planner=_safe_load_planner(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # (a BaseException): every rank's failures, gathered
        raise unreadable(path, err, "sharded checkpoint") from None


def load_train_state(path: str) -> dict:
    """The non-tensor part of a sharded checkpoint (config, step, RNG, tokenizer, ...), once
    the directory is checked to be whole (read_sharded_index): a damaged one is reported here,
    where resuming can still pass over it to an older one."""
    if not os.path.isfile(os.path.join(path, TRAIN_STATE)):
        raise CheckpointError(f"{path} is incomplete: it has no {TRAIN_STATE} (the step, RNG and tokenizer records); it cannot be resumed or sampled")
    state = load_checkpoint_file(os.path.join(path, TRAIN_STATE))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}/{TRAIN_STATE} is not a HomeLLM training state")
    read_sharded_index(path)
    return {**state, "sharded": True}


def load_sharded_weights(path: str) -> dict:
    """A sharded checkpoint as one in-memory checkpoint dict with the full weights (CPU)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = load_train_state(path)
    index = read_sharded_index(path).state_dict_metadata
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in index.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    load_sharded(path, {"model": model})
    return {**state, "model": model}


def read_sharded_index(path: str) -> Any:
    """DCP's index (.metadata) of a sharded checkpoint, checked against the directory: every
    shard file it names is a plain file of this directory, present and long enough for the
    bytes it should hold. The index is unpickled with an allow-list (_MetadataUnpickler):
    DCP's own reader runs pickle.load on it, and a directory from a stranger must not run code."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete: it has no .metadata (the index of its shards)") from None
    except Exception as err:  # anything a torn or foreign pickle raises
        raise unreadable(os.path.join(path, ".metadata"), err, "sharded checkpoint index") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}/.metadata is not a sharded checkpoint index")
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        if not name or os.path.basename(name) != name or name.startswith("."):
            raise CheckpointError(f"{path}/.metadata names {name!r} as a shard, which is not a file of this directory")
        if name not in sizes:
            try:
                sizes[name] = os.path.getsize(os.path.join(path, name))
            except OSError:
                raise CheckpointError(f"{path} is damaged: its shard {name} is missing; resume from an older checkpoint") from None
        if sizes[name] < info.offset + info.length:
            raise CheckpointError(f"{path} is damaged: its shard {name} is truncated ({sizes[name]:,} bytes, the index needs "
                                  f"{info.offset + info.length:,}); resume from an older checkpoint")
    return metadata


def unreadable(path: str, err: BaseException, what: str = "PyTorch checkpoint") -> CheckpointError:
    """The one-line error for a file that would not load. A pickle that names a global the
    safe unpickler refuses ("GLOBAL posix.system") wants to build arbitrary objects, i.e.
    possibly run code: that is said plainly."""
    culprit = re.search(r"GLOBAL (\S+)", str(err))
    if culprit:
        return CheckpointError(
            f"refusing to load {path}: it holds Python objects ({culprit.group(1)}) that could run code when "
            "unpickled, while a checkpoint written by train.py holds only tensors and plain data"
        )
    lines = [line for line in str(err).splitlines() if line.strip()]
    detail = lines[-2] if isinstance(err, pickle.UnpicklingError) and len(lines) > 2 else (lines or [""])[0]
    return CheckpointError(f"{path} is not a readable {what} ({type(err).__name__}: {detail.strip()[:300]})")


def _safe_load_planner():
    """DCP's default load planner, except that byte entries (the non-tensor values of a state
    dict) are unpickled with weights_only=True; DCP's own planner uses weights_only=False."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
            if not self.flatten_state_dict:
                self.state_dict[read_item.dest_index.fqn] = loaded
                return
            *parents, last = self.mappings[read_item.dest_index.fqn]
            node = self.original_state_dict
            for key in parents:  # the path exists: only keys of the state dict being filled are read
                node = node[key]
            node[last] = loaded

    return SafeLoadPlanner()


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's reader, but its index is read by read_sharded_index."""

        def read_metadata(self, *args, **kwargs):
            metadata = read_sharded_index(str(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(path: str):
    return _safe_reader_class()(path)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's index (.metadata) allowing only the exact (module, name) pairs such an
    index holds: DCP's metadata records, torch.Size, dtypes, layouts and paths. The pair is
    checked before anything is imported or looked up, and names are plain attributes: with
    pickle protocol 4 a name may be dotted ("os.system" under an allowed module), which
    resolves through that module's own imports to anything at all."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
            "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if name not in self.ALLOWED.get(module, ()):  # a dotted name is in no list
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a checkpoint index")
        return getattr(importlib.import_module(module), name)


def count_nonfinite(model: torch.nn.Module) -> int:
    """How many parameters hold a NaN or an infinity (for a sharded model, in this rank's part),
    summed over the ranks when a process group is up: then a collective, every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    count = torch.tensor([sum(not bool(torch.isfinite(p).all()) for p in params)], device=params[0].device)
    if dist.is_initialized():
        dist.all_reduce(count)
    return int(count.item())


def nonfinite_advice(last_saved: Optional[int]) -> str:
    """What a run stopped by non-finite numbers tells the user: its checkpoint is from before."""
    saved = f"the last checkpoint (step {last_saved}) is from before them" if last_saved is not None else "no checkpoint was saved"
    return f"{saved}; lower learning_rate, raise warmup_iters or use --dtype=bfloat16/float32, then resume"


def holds_training_state(path: str) -> bool:
    """Whether the .pt file at path is a checkpoint train.py can resume (it has optimizer state)."""
    try:
        ckpt = load_checkpoint_file(path)  # mmapped: the optimizer state is not read
    except CheckpointError:
        return False
    return isinstance(ckpt, dict) and "optimizer" in ckpt


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Shapes of our state dict, taken from model.py itself (on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Transformer(cfg).state_dict().items()}


def consolidate(ckpt_path: str, dest: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> None:
    """One HomeLLM .pt file from any checkpoint, e.g. an FSDP run's sharded ckpt_STEP/: the full
    weights and the run's records (config, tokenizer, step), without the optimizer state, which
    only resuming needs (and resuming reads the sharded directory itself). The tokenizer file is
    copied next to it, so sample.py --ckpt dest works anywhere."""
    if os.path.exists(dest) and not overwrite:
        raise CheckpointError(f"{dest} exists; pass --overwrite to replace it, or choose another --to")
    if os.path.isdir(dest) or (os.path.isfile(dest) and holds_training_state(dest)):
        raise CheckpointError(f"{dest} is {'a directory' if os.path.isdir(dest) else 'a training checkpoint'}; --overwrite replaces "
                              "only a file an export wrote: choose another --to")
    ckpt = load_checkpoint(ckpt_path)
    tokenizer_src = checkpoint_tokenizer_path(ckpt, ckpt_path)
    state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "sharded")}
    if dtype is not None:
        state["model"] = {name: tensor.to(dtype) for name, tensor in ckpt["model"].items()}
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    atomic_save(state, dest)
    tokenizer_dest = os.path.join(os.path.dirname(os.path.abspath(dest)), os.path.basename(tokenizer_src))
    if not os.path.exists(tokenizer_dest):
        shutil.copyfile(tokenizer_src, tokenizer_dest)
