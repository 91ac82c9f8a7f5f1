"""A run folder as the studio reads it: finding runs under --runs_dir, their files read
without trusting them (metrics.jsonl incrementally, status.json, config.json), and the state a
run is in. Nothing here starts or signals a process; studio.py does (a Job records one it
started).

A run folder may be downloaded or hand-edited, so every value is type-checked before it is
shown or used, no read blocks (a FIFO named metrics.jsonl is refused), and a path a request
names must resolve inside --runs_dir (resolve_inside).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from checkpoint import numbered_checkpoints, sharded_checkpoints
from system import pid_alive

RUN_FILES = ("metrics.jsonl", "ckpt.pt", "status.json")
SKIP_DIRS = {"node_modules", "__pycache__", "site-packages"}
MAX_JSON_BYTES = 1 << 20  # status.json and config.json are far smaller
MAX_READ_BYTES = 4 << 20  # per metrics request; the page asks again at once when there is more
HOST = socket.gethostname()
CURSOR = re.compile(r"[0-9]{1,18}:[0-9a-f]{16}")  # what read_new_lines hands out: offset:fingerprint


class RequestError(Exception):
    """A request the studio refuses: HTTP status and a one-line message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- paths and files


def resolve_inside(root: Path, name: str, key: Optional[str] = None) -> Path:
    """root/name with every symlink resolved, refused unless the result stays inside root, so
    neither `../` nor a symlink can reach the rest of the disk. `root` is already resolved;
    key: the config key that named the path, for the message."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise RequestError(400, "a run or path name is required")
    try:
        path = (root / name).resolve()
        path.exists()  # raises for what no later check should meet: a name too long, no permission
    except (OSError, ValueError, RuntimeError) as err:  # ... a lone surrogate, a symlink loop
        raise RequestError(400, f"{name!r} is not a usable path ({type(err).__name__})") from None
    if path != root and root not in path.parents:
        named = f"{key}={name!r}" if key else repr(name)
        raise RequestError(403, f"error: {named} is outside --runs_dir ({root}); run names and paths must stay inside it")
    return path


def run_name(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def open_regular(path: Path):
    """path opened for binary reading, or OSError unless it is a regular file: a FIFO planted as
    metrics.jsonl or status.json would block its reader (and the lock it holds) forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return open(fd, "rb")


def read_json(path: Path) -> Optional[dict]:
    """A small JSON file as a dict, or None when it is missing, unreadable or half-written."""
    try:
        with open_regular(path) as f:
            value = json.loads(f.read(MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def number(value: Any) -> Optional[float]:
    """value if it is a finite int or float (not a bool), else None. What a run's files hold is
    shown, never trusted: "yesterday", NaN or a list where a number belongs shows as nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def whole(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def string(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _fingerprint(f, offset: int) -> str:
    f.seek(max(0, offset - 256))
    return hashlib.sha1(f.read(min(offset, 256))).hexdigest()[:16]


def read_new_lines(path: Path, cursor: str = "", limit: int = MAX_READ_BYTES, tail: Optional[int] = None) -> tuple[list[str], str, bool, bool]:
    """The complete lines appended to `path` since `cursor`: (lines, new cursor, reset, more).

    A cursor is "offset:fingerprint", the fingerprint being a hash of the 256 bytes before the
    offset. If the file is now shorter than the offset, or those bytes changed (the file was
    rewritten, e.g. truncated on resume and written again), reading restarts at byte 0 and
    `reset` says so; a cursor not of that form is a RequestError. A last line without its
    newline is still being written: it is left for the next call. `tail` (a first read only)
    starts that many bytes before the end."""
    if cursor and not CURSOR.fullmatch(cursor):
        raise RequestError(400, f"error: bad cursor {cursor[:40]!r}; pass the one the last answer gave, or none to read from the start")
    try:
        f = open_regular(path)
    except OSError:  # missing, or not a file: nothing to read
        return [], "", bool(cursor), False
    with f:
        size = os.fstat(f.fileno()).st_size
        offset, reset = 0, False
        if cursor:
            raw_offset, _, mark = cursor.partition(":")
            offset = int(raw_offset)
            if offset > size or _fingerprint(f, offset) != mark:
                offset, reset = 0, True
        if offset == 0 and tail is not None and size > tail:
            f.seek(size - tail)
            f.readline()  # start at a line boundary
            offset = f.tell()
        f.seek(offset)
        data = f.read(limit)
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) == limit:
            end = len(data)  # one enormous line: pass it on rather than stall forever
        new_offset = offset + end
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        # more: only when the slice was full. A torn last line is not "more" (it is still being
        # written): asking again at once would spin on it forever.
        more = len(data) == limit and new_offset < size
        return lines, f"{new_offset}:{_fingerprint(f, new_offset)}", reset, more


def parse_records(lines: list[str]) -> list[dict]:
    """metrics.jsonl lines as dicts of plain values: NaN/inf (an MFU without a known peak) become
    null, which JSON can carry, and so does anything nested, which no chart draws, except a
    mixture's per-dataset numbers ({"source_val_loss": {"data/a": 2.1, ...}})."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a damaged line costs that line, not the chart
        if isinstance(record, dict) and whole(record.get("step")) is not None:
            records.append({k: plain_value(k, v) for k, v in record.items()})
    return records


def plain_value(key: str, value: Any) -> Any:
    """A metrics field as the page may draw it: a string, a bool, a number or None, or for a
    source_* key (train.py's per-dataset numbers of a mixture) a dict of numbers or None."""
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, dict) and key.startswith("source_"):
        return {str(k): number(v) for k, v in value.items()}
    return number(value)


def train_alive(pid: Any) -> bool:
    """Whether pid is a live train.py process on this machine (its command line says so where
    /proc exists, so a recycled pid does not keep a dead run "running")."""
    return pid_alive(pid, command_contains=b"train.py")


def trains_here(run_dir: Path, pid: Any) -> bool:
    """Whether pid is the live train.py training run_dir: only then is the run "running" and may
    Stop signal it, so a status.json naming any other process (planted, or stale with a
    recycled pid) gets nobody signalled. train.py's rank 0 holds an exclusive flock on
    out_dir/train.lock while it runs and writes "pid N on host H" into it: the lock must be
    held (a non-blocking attempt of ours fails), name this pid and, where /proc exists, be
    one of that process's open files (a link to another run's lock is not)."""
    import fcntl  # POSIX only, as train.py's lock is

    lock_path = run_dir / "train.lock"
    if not train_alive(pid):
        return False
    try:
        with open_regular(lock_path) as f:
            holder = f.read(256).split()
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False  # nobody holds it (closing the file lets go of ours)
            except BlockingIOError:
                pass
    except OSError:
        return False
    if holder[:2] != [b"pid", str(pid).encode()]:
        return False
    return not os.path.isdir("/proc/self/fd") or str(lock_path) in open_files(pid)


def open_files(pid: int) -> set[str]:
    """The paths of the files a process has open (Linux /proc; empty when it cannot be read)."""
    fd_dir = f"/proc/{pid}/fd"
    paths = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return paths
    for name in names:
        try:
            paths.add(os.readlink(os.path.join(fd_dir, name)))
        except OSError:
            pass  # closed since the listing
    return paths


def has_checkpoint(run_dir: Path) -> bool:
    """Whether run_dir holds any checkpoint train.py or sample.py would find: ckpt.pt, numbered
    ckpt_STEP.pt copies or an FSDP run's sharded ckpt_STEP/ directories (listing only; nothing
    is loaded)."""
    try:
        return (run_dir / "ckpt.pt").is_file() or bool(numbered_checkpoints(str(run_dir)) or sharded_checkpoints(str(run_dir)))
    except OSError:
        return False


# ----------------------------------------------------------------------------- runs


@dataclass
class Summary:
    """What the runs table shows from metrics.jsonl, updated from the new lines only."""

    cursor: str = ""
    step: Optional[int] = None
    loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    val_bpb: Optional[float] = None  # at the best val loss
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None

    def add(self, record: dict) -> None:
        """One parse_records record; a value of the wrong type (`"val_loss": "bad"`) is skipped."""
        self.step = max(self.step or 0, record["step"])
        if number(record.get("loss")) is not None:
            self.loss = record["loss"]
        if number(record.get("tokens_per_s")) is not None:
            self.tokens_per_s, self.mfu = record["tokens_per_s"], number(record.get("mfu"))
        val = number(record.get("val_loss"))
        if val is not None and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss, self.val_bpb = val, number(record.get("val_bpb"))


@dataclass
class Job:
    """A train.py (or torchrun) child this studio started; its output goes to console.log."""

    proc: subprocess.Popen
    command: list[str]
    preset: Optional[str]
    started: float = field(default_factory=time.time)
    stopping: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def find_runs(root: Path, max_depth: int = 3) -> list[Path]:
    """Directories under root holding a run file; hidden and package directories and symlinks
    are not entered, nor a run's own subdirectories, except root's: a run trained with
    --out_dir=. right in --runs_dir must not hide the others."""
    found = []

    def visit(directory: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        if any(e.name in RUN_FILES for e in entries):
            found.append(directory)
            if depth > 0:
                return
        if depth < max_depth:
            for e in entries:
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in SKIP_DIRS:
                    visit(Path(e.path), depth + 1)

    visit(root, 0)
    return found


def preset_of(command: Any) -> Optional[str]:
    """The config file in a train.py command line (status.json's `command`), if any."""
    if isinstance(command, list):
        files = [c for c in command[1:] if isinstance(c, str) and c.endswith(".py") and not c.startswith("-")]
        return Path(files[0]).stem if files else None
    return None


def run_state(run_dir: Path, status: Optional[dict], job: Optional[Job], last_step: Optional[int], max_iters: Optional[int]) -> tuple[str, Optional[str]]:
    """(state, reason): running / stopping / finished / stopped / crashed / unknown."""
    if job is not None and job.alive:
        if job.stopping:
            return "stopping", "SIGTERM sent: finishing the step, then saving"
        return "running", None if status else "starting: train.py has not written status.json yet"
    state = status.get("state") if status else None
    if state == "running":
        if status.get("host") != HOST:
            return "unknown", f"running on another host ({string(status.get('host'))}); cannot check its process"
        if trains_here(run_dir, status.get("pid")):
            return "running", None
        return "crashed", f"process {whole(status.get('pid'))} ended without saving a final state (killed?)"
    if state in ("finished", "stopped", "crashed"):
        return state, string(status.get("reason"))
    if job is not None:  # exited before writing any status: it failed at start
        return "crashed", f"exited with status {job.proc.returncode} before training started; see the console"
    if last_step is not None and max_iters is not None and last_step >= max_iters:
        return "finished", "no status.json; metrics reach max_iters"
    return "unknown", "no status.json (a run from before studio existed)"
