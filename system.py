"""What the operating system says about this process and others: the CPUs it may use, whether
another process is alive, dying with the parent, signals asking a run to stop, and the
command-line parser whose errors are one line with exit status 2.

No torch here: prepare.py, which never needs torch, shares these with train.py, checkpoint.py
and the studio.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Optional


def usable_cpus() -> int:
    """CPUs this process may run on: respects taskset and container limits, unlike os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pid_alive(pid: object, command_contains: Optional[bytes] = None) -> bool:
    """Whether a process with this id runs on this machine (signal 0 only checks). With
    command_contains, where /proc exists its command line must also contain those bytes, so a
    pid the kernel recycled for another program does not count. Anything but a positive int is
    no process: os.kill(0, ...) and os.kill(-1, ...) would address whole process groups."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    except OverflowError:
        return False
    if command_contains is not None and os.path.exists("/proc/self/cmdline"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return command_contains in f.read()
        except OSError:
            return False
    return True


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits, however the parent
    ends (kill -9 included): a child whose results nobody will collect must not live on. On
    Linux this is prctl(PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent's pid."""
    parent_pid = os.getppid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
            raise OSError
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os.kill(os.getpid(), sig)


def stop_when_the_launcher_dies() -> None:
    """Under torchrun: SIGTERM this rank when the launcher process dies, however it dies (kill -9
    included). StopFlag then has the ranks finish the step, save and exit, which releases the
    run's train.lock; without it the orphaned ranks would train on, holding it."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGTERM)


class StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the current step, save and exit 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # A second Ctrl-C means "now". A SIGTERM after the first signal does not: torchrun
        # forwards one to every worker when the terminal's Ctrl-C reaches it too.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits 2: `error_prefix`
    + argparse's message, e.g. "error: argument --top_k: invalid int value: 'x'"."""

    def __init__(self, *args, error_prefix: str = "error: ", **kwargs):
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):
        self.exit(2, f"{self.error_prefix}{' '.join(message.split())} (--help lists the options)\n")
