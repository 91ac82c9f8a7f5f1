"""What a training run tells those who watch it, beside its checkpoints: out_dir/status.json
(running, finished, stopped or crashed, and why), the records of metrics.jsonl, and their
mirrors in Weights & Biases or TensorBoard. studio/ and any script read these files; nothing
here needs the run's model.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import time
from typing import Any, Optional

from configurator import config_to_dict


class RunLogError(RuntimeError):
    """A logging option that cannot work here (its optional package is missing)."""


def write_status(out_dir: str, state: str, reason: Optional[str] = None, **fields: Any) -> None:
    """out_dir/status.json: running, finished, stopped or crashed, and why, for studio.py and
    anyone else watching (a "running" whose pid is gone died without a word, e.g. kill -9).
    Fields not given keep their last value. Written to a temp file and renamed, so a reader
    never sees half of it; a few hundred bytes, cheap enough to rewrite at every log."""
    path = os.path.join(out_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    record.update(fields, state=state, reason=reason, pid=os.getpid(), host=socket.gethostname(), updated=time.time())
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def record_crash(out_dir: str, reason: str) -> None:
    """Mark a run that had started in out_dir as crashed; never hides the error being reported."""
    if os.path.exists(os.path.join(out_dir, "status.json")):
        try:
            write_status(out_dir, "crashed", " ".join(reason.split())[:1000])
        except OSError:
            pass


def optional_import(module: str, flag: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RunLogError(f"{flag} needs the {package} package, which is not installed: pip install {package} (or drop {flag})") from None


def finite_or_null(record: dict) -> dict:
    """A metrics record with NaN and inf, also inside per-source dicts, as None: JSON has no
    NaN, and null is what every JSON reader accepts."""
    return {k: finite_or_null(v) if isinstance(v, dict) else None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


class MetricSinks:
    """--wandb_project / --tensorboard_dir: every record written to metrics.jsonl also goes to
    Weights & Biases and/or TensorBoard, under the same names. Both packages are optional and
    imported only when asked for, on every rank, so a missing one stops the run before any
    work; only rank 0 writes. W&B's run opens at the first record (a run that fails at start
    leaves no empty W&B run) and finishes at exit by itself; TensorBoard is flushed after each
    record, so nothing needs closing on any of train()'s ways out."""

    def __init__(self, cfg: Any, is_main: bool):
        self.cfg, self.is_main = cfg, is_main
        self.wandb = optional_import("wandb", "--wandb_project", "wandb") if cfg.wandb_project else None
        self.tensorboard = optional_import("torch.utils.tensorboard", "--tensorboard_dir", "tensorboard") if cfg.tensorboard_dir else None
        self.wandb_run: Any = None
        self.tb_writer: Any = None

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        step = record["step"]
        # A dict of per-source values (source_tokens, source_val_loss, ...) becomes one scalar
        # per source: "source_val_loss/data/ru_books".
        flat = {f"{k}/{sub}" if isinstance(v, dict) else k: x for k, v in record.items()
                for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])}
        scalars = {k: v for k, v in flat.items() if k != "step" and v is not None}
        if self.wandb is not None:
            if self.wandb_run is None:
                name = os.path.basename(os.path.abspath(self.cfg.out_dir))
                self.wandb_run = self.wandb.init(project=self.cfg.wandb_project, name=name, config=config_to_dict(self.cfg))
            self.wandb_run.log(scalars, step=step)
        if self.tensorboard is not None:
            if self.tb_writer is None:
                self.tb_writer = self.tensorboard.SummaryWriter(log_dir=self.cfg.tensorboard_dir)
            for key, value in scalars.items():
                self.tb_writer.add_scalar(key, value, step)
            self.tb_writer.flush()


def append_metrics(path: str, record: dict, sinks: MetricSinks) -> None:
    """Append one record to metrics.jsonl (NaN/inf as null) and pass it to the mirrors."""
    clean = finite_or_null(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean) + "\n")
    sinks.write(clean)
