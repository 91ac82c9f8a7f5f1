"""HomeLLM's checkpoints on disk: writing them atomically, finding and loading them, and the
resume policy train.py follows.

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
import os
import pickle
import re
import shutil
import threading
import warnings
import zipfile
from typing import Optional

import torch

from model import ModelConfig, Transformer, count_params
from system import pid_alive
from tokenizer import Tokenizer, TokenizerError, load_tokenizer

CHECKPOINT_FORMAT = 1


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


def find_checkpoint(out_dir: Optional[str], ckpt: Optional[str] = None) -> str:
    """The checkpoint to load: `ckpt` when given, else the newest in out_dir (see
    checkpoint_candidates): ckpt.pt for single-process and DDP runs, ckpt_STEP/ for FSDP runs.
    out_dir None: the run in the current directory that saved most recently (newest_run)."""
    if ckpt:
        if not os.path.isfile(ckpt) and not is_sharded(ckpt):
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
    return candidates[0]


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
        # The weights-only unpickler names the global it refused ("GLOBAL posix.system"):
        # that is a pickle that wants to build arbitrary objects, i.e. possibly run code.
        culprit = re.search(r"GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and culprit:
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects ({culprit.group(1)}) that could run code when "
                "unpickled, while a checkpoint written by train.py holds only tensors and plain data"
            ) from None
        lines = [line for line in str(err).splitlines() if line.strip()]
        detail = lines[-2] if isinstance(err, pickle.UnpicklingError) and len(lines) > 2 else (lines or [""])[0]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail.strip()})") from None


def checkpoint_tokenizer_path(ckpt: dict, ckpt_path: str) -> str:
    """The tokenizer file of a checkpoint: train.py copies it next to ckpt.pt; a checkpoint moved
    without it falls back to the data directory it was trained on."""
    info = ckpt.get("tokenizer")
    if not isinstance(info, dict):
        raise CheckpointError(f"{ckpt_path} records no tokenizer; it was not written by train.py")
    name = info.get("file") or ""
    here = os.path.dirname(os.path.abspath(ckpt_path))
    data_dir = (ckpt.get("train_config") or {}).get("data_dir") or (ckpt.get("data") or {}).get("data_dir")
    for base_dir in (here, data_dir):
        if base_dir and name and os.path.isfile(os.path.join(base_dir, name)):
            return os.path.join(base_dir, name)
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
    with torch.device(device):  # allocate on the target device directly, no CPU copy first
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(dtype=dtype).eval()


# ----------------------------------------------------------------------------- sharded checkpoints (FSDP)
# An FSDP run saves with torch.distributed.checkpoint (DCP): every rank writes its own shards
# of the weights and optimizer state in parallel, nothing is gathered, and any number of ranks
# (one process included) can load the result. Layout of out_dir/ckpt_STEP/:
#   .metadata, __RANK_0.distcp ...  DCP's index and shards: {"model": ..., "optimizer": ...}
#   train_state.pt                  everything else, as in a .pt checkpoint (torch.save, weights_only)

SHARDED = re.compile(r"ckpt_(\d+)")
TRAIN_STATE = "train_state.pt"


def is_sharded(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def sharded_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete ckpt_STEP/ directories in out_dir, oldest first."""
    found = []
    for name in os.listdir(out_dir):
        m = SHARDED.fullmatch(name)
        if m and is_sharded(os.path.join(out_dir, name)) and os.path.isfile(os.path.join(out_dir, name, TRAIN_STATE)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
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
    that thread. Costs a CPU copy of the rank's shards while they are written."""

    def __init__(self, background: bool = False, timeout_min: float = 30.0):
        self.background = background
        self.timeout_min = timeout_min
        self._group = None  # the writing threads' gloo group, made on the first background save
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
                        self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=self.timeout_min))
                    future = dcp.async_save(shards, checkpoint_id=tmp, process_group=self._group)
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


def _publish_sharded(tmp: str, final: str, old: str, out_dir: str, keep: int, state: dict) -> None:
    """Rank 0, once every shard is written: add train_state.pt, rename tmp into place (an older
    save of the same step is swapped aside, never deleted first), drop the oldest beyond keep."""
    atomic_save(state, os.path.join(tmp, TRAIN_STATE))
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in sharded_checkpoints(out_dir)[: -max(1, keep)]:
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
    single process (no process group) may load it too."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(shards, storage_reader=_SafeReader(path), no_dist=not dist.is_initialized())


def load_train_state(path: str) -> dict:
    """The non-tensor part of a sharded checkpoint (config, step, RNG, tokenizer, ...)."""
    state = load_checkpoint_file(os.path.join(path, TRAIN_STATE))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}/{TRAIN_STATE} is not a HomeLLM training state")
    return {**state, "sharded": True}


def load_sharded_weights(path: str) -> dict:
    """A sharded checkpoint as one in-memory checkpoint dict with the full weights (CPU)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = load_train_state(path)
    try:
        index = _SafeReader(path).read_metadata().state_dict_metadata
        model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in index.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
        load_sharded(path, {"model": model})
    except (pickle.UnpicklingError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable sharded checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return {**state, "model": model}


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's reader, but its index (.metadata) is unpickled with a whitelist: the stock
        reader runs pickle.load on it, and a directory from a stranger must not run code."""

        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(path: str):
    return _safe_reader_class()(path)


class _MetadataUnpickler(pickle.Unpickler):
    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        value = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED or isinstance(value, torch.dtype):
            return value
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed in a checkpoint index")


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
