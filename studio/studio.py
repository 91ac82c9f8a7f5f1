"""HomeLLM studio: a local web page to watch, start, stop, resume, compare and sample runs.

    python studio/studio.py                              # http://127.0.0.1:8501/?token=...
    python studio/studio.py --runs_dir ~/runs --port 8600

A run is any directory under --runs_dir that holds metrics.jsonl, ckpt.pt or status.json,
whether the studio started it or a terminal did: everything shown is read from those files
(status.json says running / finished / stopped / crashed; a "running" run whose process is
gone crashed). Runs are started as child processes, `python train.py ...` or `torchrun`,
from an argument list, never a shell string; their console output goes to out_dir/console.log,
so they keep training when the studio exits. Stop is SIGTERM, which train.py answers by
finishing the step and saving. Sampling runs sample.py and streams what it prints. Reading run
folders (finding them, their files, their state) is runs.py.

The page (studio.html) polls small JSON endpoints. Files are read incrementally: a cursor
(byte offset + fingerprint of the bytes before it) returns only the complete lines written
since, and notices a file that was truncated or rewritten (train.py drops records past the
checkpoint on resume) so the page starts that run over.

Security, since the server can start processes: it binds 127.0.0.1 unless --host says
otherwise; every /api/ request needs the random token printed in the URL (as Jupyter does);
a request whose Host or Origin is not this server's is refused (DNS rebinding, cross-site
POSTs); run names and every path a run's config names must resolve inside --runs_dir; a bad
request gets a 4xx with a one-line JSON error and never takes the server down. A run folder
may be downloaded or hand-edited: what its files say is type-checked before it is shown or
used, and Stop signals only the train.py that holds that run's train.lock.
"""

from __future__ import annotations

import argparse
import codecs
import hmac
import json
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import torch

REPO = Path(__file__).resolve().parents[1]  # the repository: train.py, sample.py, config/
sys.path.insert(0, str(REPO))  # run as `python studio/studio.py` from anywhere

from configurator import ConfigError, TrainConfig, config_to_dict, parse_args, parse_data_mixture, read_config_file
from dataset import DatasetError, load_meta
from hardware import DTYPES, plan_run_memory
from model import ModelConfig, count_params
from runs import (
    HOST, Job, RequestError, Summary, find_runs, has_checkpoint, number, parse_records, preset_of, read_json, read_new_lines,
    resolve_inside, run_name, run_state, string, trains_here, whole,
)
from system import usable_cpus

PAGE = Path(__file__).resolve().parent / "studio.html"
MAX_BODY_BYTES = 1 << 20
CONSOLE_TAIL_BYTES = 64 << 10  # a page opening a long console.log starts this far from its end
MAX_SAMPLERS = 2  # sample.py processes at once


def utf8_chunks(fd: int) -> Iterator[str]:
    """Text read from fd as it arrives, each chunk whole UTF-8 characters: a character whose
    bytes straddle two reads waits for its last byte instead of turning into U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(fd, 4096):
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail



# ----------------------------------------------------------------------------- presets and estimates


def preset_comment(path: Path) -> str:
    """The comment lines a preset opens with: what it is and what it needs."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def memory_plan(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int) -> dict:
    """Per-GPU training memory for a config (GiB by part, and "total"): the one place the studio
    asks hardware.py, with the same plan train.py --dry_run prints and checks before a run."""
    on_cpu = cfg.device == "cpu"
    dtype = DTYPES.get(cfg.dtype, torch.float32 if on_cpu else torch.bfloat16)
    return plan_run_memory(cfg, model_cfg, world_size, "cpu" if on_cpu else "cuda", dtype).gib()


def describe_config(cfg: TrainConfig, vocab_size: int, world_size: int) -> dict:
    """Parameters and memory estimate of what cfg builds; a bad shape is a RequestError."""
    try:
        model_cfg = cfg.model_config(vocab_size)
        counts, memory_gb = count_params(model_cfg), memory_plan(cfg, model_cfg, world_size)
        if not all(map(math.isfinite, memory_gb.values())):  # JSON cannot carry inf, and no machine trains it
            raise OverflowError
    except ValueError as err:
        raise RequestError(400, f"error: invalid model config: {err}") from None
    except OverflowError:
        raise RequestError(400, "error: this model is too large to estimate; check n_layer, n_embd, block_size and batch_size") from None
    return {
        "params": counts["total"], "non_embedding": counts["non_embedding"], "vocab_size": model_cfg.vocab_size,
        "memory_gb": memory_gb, "tokens_per_step": cfg.batch_size * cfg.gradient_accumulation_steps * world_size * cfg.block_size,
        "model": model_cfg.to_dict(),
    }


def split_overrides(overrides: Any) -> list[str]:
    """The form's free --key=value text as arguments. Config files (.py) run code, so only the
    listed presets may name one; --help would print instead of validating."""
    if isinstance(overrides, list) and all(isinstance(a, str) for a in overrides):
        args = list(overrides)
    elif isinstance(overrides, str) or overrides is None:
        try:
            args = shlex.split(overrides or "")
        except ValueError as err:
            raise RequestError(400, f"error: cannot split the overrides: {err}") from None
    else:
        raise RequestError(400, "error: overrides must be text (--key=value ...) or a list of such strings")
    for arg in args:
        if not arg.startswith("--") or arg == "--help":
            raise RequestError(400, f"error: unexpected argument '{arg}'; overrides are --key=value")
    return args


def config_paths(values: dict) -> dict[str, list[str]]:
    """The files and directories a train config's values name, by key: every *_dir (data_dir:
    each dataset of a mixture, "data/a:0.8,data/b:0.2"; out_dir, tensorboard_dir), init_from (a
    checkpoint, a run or sharded ckpt_STEP/ directory, or hf:DIR) and resume=PATH. The studio
    resolves each inside --runs_dir before it launches anything: a request, a preset or a
    planted config.json must not make train.py read a checkpoint or a dataset from, or write
    anywhere, elsewhere on the disk. A bad data_dir mixture is a ValueError."""
    paths = {}
    for key, value in values.items():
        if not isinstance(value, str):
            continue
        if key == "data_dir":
            paths[key] = [path for path, _ in parse_data_mixture(value)]
        elif key == "init_from" and value != "scratch":
            paths[key] = [value.removeprefix("hf:")]
        elif key == "resume" and value not in ("auto", "never"):
            paths[key] = [value]
        elif key.endswith(("_dir", "_path", "_file")):
            paths[key] = [value]
    return paths


def max_processes() -> int:
    """The most processes Start or Resume launches: one per GPU, or per usable CPU core."""
    return max(torch.cuda.device_count(), usable_cpus())


def check_processes(nproc: Any, limit: int, source: str) -> int:
    if whole(nproc) is None or not 1 <= nproc <= limit:
        raise RequestError(400, f"error: {source} must be a whole number from 1 to {limit} (GPUs or CPU cores here), got {nproc!r}")
    return nproc


def bounded(body: dict, key: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    """body[key] (default when absent) if it is a number in [low, high]: JSON also carries
    1e400 (inf), 2.5 for a count, "10" and true, none of which may reach sample.py."""
    value = body.get(key, default)
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    if number(value) is None or (integer and not isinstance(value, int)) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise RequestError(400, f"error: {key} must be {kind} from {low} to {high}, got {repr(value)[:40]}")
    return value


# ----------------------------------------------------------------------------- the studio


class Studio:
    """Everything the request handlers share: the runs directory, the token, the children."""

    def __init__(self, runs_dir: Path, token: str, allowed_hosts: set[str]):
        self.root = runs_dir.resolve()
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.lock = threading.Lock()
        self.jobs: dict[Path, Job] = {}
        self.stopping_pids: dict[Path, int] = {}  # runs not started here that we sent SIGTERM
        self.summaries: dict[Path, Summary] = {}
        self.samplers = threading.BoundedSemaphore(MAX_SAMPLERS)

    # -- reading

    def summary(self, run_dir: Path) -> Summary:
        with self.lock:
            s = self.summaries.get(run_dir) or Summary()
            more = True
            while more:  # a long metrics.jsonl is read once, in slices; after that only new lines
                lines, cursor, reset, more = read_new_lines(run_dir / "metrics.jsonl", s.cursor)
                if reset:
                    s = Summary()
                for record in parse_records(lines):
                    s.add(record)
                s.cursor = cursor
            self.summaries[run_dir] = s
            return s

    def describe_run(self, run_dir: Path) -> dict:
        """One row of the runs table. Every value read from the run's files is type-checked
        (number, whole, text): a hand-edited or damaged file shows blanks, not an error."""
        status = read_json(run_dir / "status.json")
        config = read_json(run_dir / "config.json") or {}
        train_cfg = config.get("train") if isinstance(config.get("train"), dict) else {}
        model = config.get("model") if isinstance(config.get("model"), dict) else None
        job = self.jobs.get(run_dir)
        if job is not None and status is not None and (number(status.get("updated")) or 0) < job.started:
            status = None  # left by an earlier run in this out_dir; ours has not written yet
        st = status or {}
        s = self.summary(run_dir)
        max_iters = whole(st.get("max_iters", train_cfg.get("max_iters")))
        state, reason = run_state(run_dir, status, job, s.step, max_iters)
        pid = whole(st.get("pid"))
        if state == "running" and pid is not None and self.stopping_pids.get(run_dir) == pid:
            state, reason = "stopping", "SIGTERM sent: finishing the step, then saving"
        try:
            params = count_params(ModelConfig.from_dict(model))["total"] if model else None
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            params = None
        step = s.step
        if whole(st.get("step")) is not None and state in ("stopped", "finished", "running"):
            step = st["step"]  # the saved step once stopped; metrics may run a line ahead of it
        files = [f for f in ("ckpt.pt", "metrics.jsonl", "console.log") if (run_dir / f).exists()]
        started = number(st.get("started")) or (job.started if job else None)
        if started is None and (run_dir / "config.json").exists():
            started = (run_dir / "config.json").stat().st_mtime
        return {
            "name": run_name(self.root, run_dir), "state": state, "reason": reason,
            "step": step, "max_iters": max_iters, "max_time_min": number(st.get("max_time_min", train_cfg.get("max_time_min"))),
            "elapsed_s": number(st.get("elapsed_s")), "loss": s.loss, "best_val_loss": s.best_val_loss,
            "val_bpb": s.val_bpb, "tokens_per_s": s.tokens_per_s, "mfu": s.mfu, "params": params,
            "preset": (job.preset if job else None) or preset_of(st.get("command")),
            "data_dir": string(train_cfg.get("data_dir")), "started": started, "updated": number(st.get("updated")),
            "pid": pid, "host": string(st.get("host")), "world_size": whole(st.get("world_size")),
            "from_studio": job is not None, "files": files, "checkpoint": has_checkpoint(run_dir),
        }

    def runs(self) -> list[dict]:
        with self.lock:
            dirs = set(find_runs(self.root)) | set(self.jobs)
        runs = []
        for run_dir in dirs:
            try:
                runs.append(self.describe_run(run_dir))
            except Exception as err:  # one damaged run folder costs its own row, never the page
                print(f"studio: cannot read {run_dir}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                runs.append({"name": run_name(self.root, run_dir), "state": "unknown", "files": [], "checkpoint": False,
                             "reason": f"cannot read this run's files: {type(err).__name__}: {err}"})
        runs.sort(key=lambda r: -(r.get("started") or r.get("updated") or 0))  # newest first; rows do not hop as runs log
        return runs

    def datasets(self) -> list[dict]:
        found = []
        for meta_path in sorted((self.root / "data").glob("*/meta.json")):
            name = run_name(self.root, meta_path.parent)
            try:
                meta = load_meta(str(meta_path.parent))
                tok, splits = meta["tokenizer"], meta["splits"]
                found.append({
                    "name": name, "tokenizer": string(tok.get("spec") or tok.get("name") or tok.get("kind")),
                    "vocab_size": whole(meta.get("vocab_size")),
                    "train_tokens": whole((splits.get("train") or {}).get("tokens")),
                    "val_tokens": whole((splits.get("val") or {}).get("tokens")),
                    "documents": sum(whole((splits.get(s) or {}).get("documents")) or 0 for s in ("train", "val")),
                })
            except DatasetError as err:
                found.append({"name": name, "error": str(err)})
            except (AttributeError, TypeError) as err:  # load_meta checks what training reads; this is the rest
                found.append({"name": name, "error": f"{meta_path} is malformed ({type(err).__name__}: {err}); re-run prepare.py"})
        return found

    def presets(self) -> list[dict]:
        out = []
        for path in sorted((REPO / "config").glob("*.py")):
            try:
                cfg = parse_args(TrainConfig, [str(path)])
            except ConfigError as err:
                out.append({"name": path.stem, "error": str(err)})
                continue
            out.append({"name": path.stem, "file": f"config/{path.name}", "comment": preset_comment(path),
                        "sets": sorted(read_config_file(str(path))), "config": config_to_dict(cfg)})
        return out

    # -- building a train.py command line

    def check_paths(self, cfg: TrainConfig) -> dict[str, Path]:
        """Every path cfg names (config_paths), resolved as train.py will see it (its cwd is
        runs_dir); a 403 for the first one outside --runs_dir. One path per key: of a mixture,
        the first dataset (they share one tokenizer)."""
        return {key: [resolve_inside(self.root, path, key) for path in paths][0]
                for key, paths in config_paths(config_to_dict(cfg)).items()}

    def build(self, body: dict, need_out_dir: bool) -> tuple[TrainConfig, list[str], dict]:
        """The form as train.py arguments, validated by configurator.py exactly as train.py's
        command line is; returns the config, the arguments and its size/memory description."""
        preset = body.get("preset") or None
        args: list[str] = []
        if preset is not None:
            if not isinstance(preset, str) or "/" in preset or "\\" in preset or not (REPO / "config" / f"{preset}.py").is_file():
                raise RequestError(400, f"error: unknown preset {preset!r}; pick one of config/*.py")
            args.append(str(REPO / "config" / f"{preset}.py"))
        for key in ("data_dir", "out_dir"):
            if body.get(key) and not isinstance(body[key], str):
                raise RequestError(400, f"error: {key} must be text, got {repr(body[key])[:40]}")
            if body.get(key):
                args.append(f"--{key}={body[key]}")
        args += split_overrides(body.get("overrides", ""))
        # an estimate may plan for a bigger machine; Start launches only what this one has
        nproc = check_processes(body.get("nproc", 1), max_processes() if need_out_dir else 1024, "processes")
        try:
            cfg = parse_args(TrainConfig, args)
        except ConfigError as err:
            raise RequestError(400, f"error: {err}") from None
        for key, value in config_to_dict(cfg).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise RequestError(400, f"error: {key}={value} is not a finite number")
        paths = self.check_paths(cfg)
        if paths["out_dir"] == self.root:
            raise RequestError(400, "error: out_dir must be a directory inside --runs_dir, not --runs_dir itself "
                               "(its runs would become one run's subdirectories); name one, e.g. out")
        try:
            vocab_size, vocab_source = int(load_meta(str(paths["data_dir"]))["vocab_size"]), "the dataset"
        except DatasetError as err:
            if need_out_dir:
                raise RequestError(400, f"error: {err}") from None
            vocab_size, vocab_source = 32000, "a default: no dataset at data_dir"
        info = describe_config(cfg, vocab_size, nproc)
        info["vocab_source"] = "set in the config" if cfg.vocab_size else vocab_source
        if need_out_dir or body.get("out_dir"):
            info["out_dir"] = paths["out_dir"]
            info["resumes"] = cfg.resume == "auto" and has_checkpoint(paths["out_dir"])
        return cfg, args, info

    def launch(self, out_dir: Path, args: list[str], nproc: int, preset: Optional[str]) -> Job:
        """Start train.py in out_dir (cwd: runs_dir), its output appended to console.log."""
        with self.lock:
            old = self.jobs.get(out_dir)
            if (old is not None and old.alive) or self._running_elsewhere(out_dir):
                raise RequestError(409, f"error: {run_name(self.root, out_dir)} is already training; stop it first")
            train_py = str(REPO / "train.py")
            if nproc == 1:
                command = [sys.executable, train_py, *args]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", train_py, *args]
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "console.log", "ab") as log:
                log.write(f"\n$ {shlex.join(command)}\n".encode())
                log.flush()
                proc = subprocess.Popen(command, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            job = Job(proc, command, preset)
            self.jobs[out_dir] = job
            self.stopping_pids.pop(out_dir, None)
            return job

    def _running_elsewhere(self, run_dir: Path) -> bool:
        status = read_json(run_dir / "status.json")
        return bool(status and status.get("state") == "running" and status.get("host") == HOST and trains_here(run_dir, status.get("pid")))

    # -- actions

    def start(self, body: dict) -> dict:
        cfg, args, info = self.build(body, need_out_dir=True)
        self.launch(info["out_dir"], args, body.get("nproc", 1), body.get("preset") or None)
        return {"run": run_name(self.root, info["out_dir"]), "resumes": info["resumes"], "command": args}

    def stop(self, run_dir: Path) -> dict:
        """SIGTERM to rank 0 (train.py finishes the step, every rank saves and exits 0), or to
        our child while it has not written status.json yet (torchrun forwards it). A pid read
        from status.json is signalled only if it is the train.py holding this run's lock."""
        with self.lock:
            job = self.jobs.get(run_dir)
            status = read_json(run_dir / "status.json") or {}
            pid = status.get("pid")
            ours = job is not None and job.alive
            fresh = status.get("state") == "running" and status.get("host") == HOST and trains_here(run_dir, pid)
            if ours and not (fresh and (number(status.get("updated")) or 0) >= job.started):
                pid = job.proc.pid
            elif not fresh:
                raise RequestError(409, f"error: {run_name(self.root, run_dir)} is not training")
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                raise RequestError(409, f"error: {run_name(self.root, run_dir)} has just ended") from None
            if ours:
                job.stopping = True
            else:
                self.stopping_pids[run_dir] = pid
        return {"run": run_name(self.root, run_dir), "pid": pid, "state": "stopping"}

    def resume(self, run_dir: Path) -> dict:
        """Start train.py again with the run's own config.json and --resume=auto, on as many
        processes as status.json says it had. Both files may have been edited or planted, so
        what they say passes the checks a Start does: configurator.py's, every path inside
        --runs_dir, a process count this machine can run."""
        name = run_name(self.root, run_dir)
        config = read_json(run_dir / "config.json")
        if not config or not isinstance(config.get("train"), dict):
            raise RequestError(400, f"error: {name} has no config.json to resume from")
        if not has_checkpoint(run_dir):
            raise RequestError(400, f"error: {name} has no checkpoint yet (ckpt.pt or ckpt_STEP/); start it again instead")
        status = read_json(run_dir / "status.json") or {}
        nproc = check_processes(status.get("world_size", 1), max_processes(), f"{name}'s status.json world_size")
        base = Path(status["cwd"]) if isinstance(status.get("cwd"), str) else self.root
        defaults = config_to_dict(TrainConfig())
        args = []
        for key, value in config["train"].items():
            try:
                paths = config_paths({key: value}).get(key)
            except ValueError as err:
                raise RequestError(400, f"error: invalid config.json of {name}: {err}") from None
            if key in ("out_dir", "resume", "dry_run") or (paths is None and defaults.get(key, object()) == value):
                continue
            # Paths are written relative to the run's own cwd; train.py will run in runs_dir.
            if key == "data_dir" and paths is not None:  # every dataset of a mixture, as (path, weight) pairs
                value = [(str(base / path), weight) for path, weight in parse_data_mixture(value)]
            elif paths is not None:
                value = value[: len(value) - len(paths[0])] + str(base / paths[0])  # keeps init_from's "hf:"
            args.append(f"--{key}={value!r}")  # a literal, so "None" or "123" in a text key stays text
        args += [f"--out_dir={run_dir}", "--resume=auto"]
        try:
            cfg = parse_args(TrainConfig, args)
        except ConfigError as err:
            raise RequestError(400, f"error: {err}") from None
        self.check_paths(cfg)
        self.launch(run_dir, args, nproc, preset_of(status.get("command")))
        return {"run": name, "command": args}

    def sample_command(self, run_dir: Path, body: dict, prompt_file: str) -> list[str]:
        if not has_checkpoint(run_dir):
            raise RequestError(400, f"error: {run_name(self.root, run_dir)} has no checkpoint yet")
        temperature = bounded(body, "temperature", 0.8, 0, 10)
        top_k = bounded(body, "top_k", 200, 0, 1 << 24, integer=True)  # beyond any vocabulary: 0 and that both mean "all"
        max_new_tokens = bounded(body, "max_new_tokens", 200, 1, 4096, integer=True)
        # The prompt travels in a file (--start FILE:...): any text arrives exactly, even one
        # that itself starts with "FILE:", is long, or holds characters argv cannot carry.
        return [sys.executable, str(REPO / "sample.py"), "--out_dir", str(run_dir), "--start", f"FILE:{prompt_file}",
                "--temperature", str(temperature), "--top_k", str(top_k), "--max_new_tokens", str(max_new_tokens)]


# ----------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "HomeLLMStudio/1"
    timeout = 60  # seconds a socket may sit idle: a client that never sends its body costs one thread a minute
    studio: Studio  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per poll would bury the URL; errors are printed where they happen

    # -- plumbing

    def send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.common_headers()
        self.end_headers()
        self.wfile.write(body)

    def common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                         "script-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")

    def check_origin(self) -> None:
        """Host must name this server (a DNS-rebinding page reaches us under its own name), and
        so must Origin when the browser sends one (a cross-site POST carries the other site's)."""
        allowed = self.studio.allowed_hosts
        if self.headers.get("Host", "").lower() not in allowed:
            raise RequestError(403, f"refused: Host {self.headers.get('Host')!r} is not this studio's address")
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin.lower())
            if parts.scheme != "http" or parts.netloc not in allowed:
                raise RequestError(403, f"refused: a request from the page {origin!r}, not from the studio")

    def check_token(self, query: dict) -> None:
        given = self.headers.get("X-Studio-Token") or (query.get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.studio.token.encode()):
            raise RequestError(403, "refused: missing or wrong token; open the URL with ?token=... that studio.py printed")

    def read_body(self) -> dict:
        """The JSON object a POST carries, checked before a byte is read: Content-Length must be
        plain digits and at most MAX_BODY_BYTES (int("-1") would have read to the end)."""
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not (raw.isascii() and raw.isdigit()):
            raise RequestError(400, f"bad Content-Length {raw[:20]!r}: a byte count is required")
        if len(raw) > 9 or int(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body too large: more than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(int(raw)) or b"{}")
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's depth
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def handle_safely(self, method: str) -> None:
        try:
            self.check_origin()
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if method == "GET" and url.path in ("/", "/index.html"):
                self.send_page()
                return
            if not url.path.startswith("/api/"):
                raise RequestError(404, f"no such page: {url.path}")
            self.check_token(query)
            route = getattr(self, f"{method.lower()}_{url.path[5:].replace('/', '_')}", None)
            if route is None:
                raise RequestError(404 if method == "GET" else 405, f"no such endpoint: {method} {url.path}")
            if method == "POST":
                route(self.read_body())
            else:
                route({k: v[-1] for k, v in query.items()})
        except RequestError as err:
            self.send_json(err.status, {"error": str(err)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-answer
        except Exception as err:  # a bug must cost one request, not the server
            print(f"studio: {method} {self.path} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
            try:
                self.send_json(500, {"error": f"internal error: {type(err).__name__}: {err}"})
            except OSError:
                pass

    def do_GET(self) -> None:
        self.handle_safely("GET")

    def do_POST(self) -> None:
        self.handle_safely("POST")

    def send_page(self) -> None:
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.common_headers()
        self.end_headers()
        self.wfile.write(body)

    def run_dir(self, params: dict) -> Path:
        path = resolve_inside(self.studio.root, params.get("run", ""))
        if not path.is_dir() and path not in self.studio.jobs:
            raise RequestError(404, f"no run {params.get('run')!r} in --runs_dir")
        return path

    # -- endpoints: GET /api/NAME -> get_NAME, POST /api/NAME -> post_NAME

    def get_runs(self, params: dict) -> None:
        self.send_json(200, {"runs": self.studio.runs(), "runs_dir": str(self.studio.root), "host": HOST})

    def get_setup(self, params: dict) -> None:
        self.send_json(200, {"presets": self.studio.presets(), "datasets": self.studio.datasets(),
                             "defaults": config_to_dict(TrainConfig()), "cpus": os.cpu_count(),
                             "max_nproc": max_processes()})

    def get_metrics(self, params: dict) -> None:
        lines, cursor, reset, more = read_new_lines(self.run_dir(params) / "metrics.jsonl", params.get("cursor", ""))
        self.send_json(200, {"records": parse_records(lines), "cursor": cursor, "reset": reset, "more": more})

    def get_console(self, params: dict) -> None:
        lines, cursor, reset, more = read_new_lines(self.run_dir(params) / "console.log", params.get("cursor", ""), tail=CONSOLE_TAIL_BYTES)
        self.send_json(200, {"text": "".join(line + "\n" for line in lines), "cursor": cursor, "reset": reset, "more": more})

    def post_estimate(self, body: dict) -> None:
        cfg, args, info = self.studio.build(body, need_out_dir=False)
        info.pop("out_dir", None)
        self.send_json(200, {**info, "config": config_to_dict(cfg), "args": args})

    def post_start(self, body: dict) -> None:
        self.send_json(200, self.studio.start(body))

    def post_stop(self, body: dict) -> None:
        self.send_json(200, self.studio.stop(self.run_dir(body)))

    def post_resume(self, body: dict) -> None:
        self.send_json(200, self.studio.resume(self.run_dir(body)))

    def post_sample(self, body: dict) -> None:
        """Stream sample.py's output as JSON lines: {"text": ...} per chunk of whole UTF-8
        characters, then {"done": true, "exit_code", "note", "error"}."""
        run_dir = self.run_dir(body)
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise RequestError(400, "error: the prompt must be text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" decodes to a lone surrogate, which no file can hold
            raise RequestError(400, "error: the prompt is not valid Unicode text (it holds a lone surrogate)") from None
        if not self.studio.samplers.acquire(blocking=False):
            raise RequestError(429, f"error: {MAX_SAMPLERS} samples are already running; wait for one to finish")
        try:
            with tempfile.TemporaryDirectory(prefix="studio-prompt-") as tmp:
                prompt_file = os.path.join(tmp, "prompt.txt")
                with open(prompt_file, "w", encoding="utf-8", newline="") as f:
                    f.write(prompt)
                command = self.studio.sample_command(run_dir, body, prompt_file)
                self.stream_process(command)
        finally:
            self.studio.samplers.release()

    def stream_process(self, command: list[str]) -> None:
        proc = subprocess.Popen(command, cwd=self.studio.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.common_headers()
        self.end_headers()
        try:
            for text in utf8_chunks(proc.stdout.fileno()):
                self.wfile.write((json.dumps({"text": text}) + "\n").encode())
                self.wfile.flush()
            proc.wait()
            reader.join(timeout=5)
            err_lines = b"".join(errors).decode("utf-8", errors="replace").strip().splitlines()
            error = next((line for line in reversed(err_lines) if line.startswith("error:")), None)
            if proc.returncode and error is None:
                error = err_lines[-1] if err_lines else f"sample.py exited with status {proc.returncode}"
            note = err_lines[0] if err_lines and not err_lines[0].startswith("error:") else None
            self.wfile.write((json.dumps({"done": True, "exit_code": proc.returncode, "note": note, "error": error}) + "\n").encode())
        finally:
            if proc.poll() is None:  # the page closed the stream: stop generating
                proc.kill()
                proc.wait()
            proc.stdout.close()


# ----------------------------------------------------------------------------- main


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values (host:port) that name this server."""
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    if host not in ("127.0.0.1", "localhost", "::1"):
        names |= {HOST, socket.getfqdn()}
        try:
            names |= set(socket.gethostbyname_ex(HOST)[2])
        except OSError:
            pass
    names = {n.lower() for n in names}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


def make_server(studio: Studio, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("StudioHandler", (Handler,), {"studio": studio})
    server_cls = type("StudioServer", (ThreadingHTTPServer,), {
        "daemon_threads": True, "request_queue_size": 64,  # a page polls several endpoints at once
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server = server_cls((host, port), handler)
    studio.allowed_hosts = allowed_hosts(host, server.server_address[1])
    return server


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="HomeLLM studio: watch, start, stop and compare training runs in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501; 0 picks a free one)")
    p.add_argument("--runs_dir", default=".", help="where the out_dirs live, and data/ with the datasets (default: here)")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"error: --runs_dir {args.runs_dir} is not a directory", file=sys.stderr)
        sys.exit(2)
    studio = Studio(runs_dir, secrets.token_urlsafe(24), set())
    try:
        server = make_server(studio, args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror}); pass another --port", file=sys.stderr)
        sys.exit(1)
    port = server.server_address[1]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, not only this machine: anyone who can reach it and has the "
              "token can start processes as you. Prefer an SSH tunnel to a 127.0.0.1 studio.", file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else (f"[{args.host}]" if ":" in args.host else args.host)
    print(f"HomeLLM studio: runs in {studio.root}\nopen http://{shown}:{port}/?token={studio.token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        alive = [run_name(studio.root, d) for d, job in studio.jobs.items() if job.alive]
        if alive:
            print(f"studio stopped; still training (stop them from a new studio or with kill -TERM): {', '.join(alive)}")


if __name__ == "__main__":
    main()
