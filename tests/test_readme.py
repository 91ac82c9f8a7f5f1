"""README.md promises commands; these tests keep the promises and CI in step with it."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")
SCRIPTS = ("prepare.py", "train.py", "sample.py", "export_hf.py", "bench.py", "studio.py", "model.py")


def quick_start_commands() -> tuple[str, str]:
    """The two commands near the top: the first two ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_opens_with_the_two_fresh_machine_commands():
    main_job, tests = quick_start_commands()
    assert README.index(main_job) < 1500  # near the top, right after the introduction
    for step in ("pip install -r requirements.txt", "python prepare.py", "python train.py config/tiny_cpu.py", "python sample.py"):
        assert step in main_job
    assert "pip install -r requirements-dev.txt" in tests and "python -m pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = quick_start_commands()
    install_and_test = tests.split(". .venv/bin/activate && ", 1)[1]
    assert install_and_test in CI.splitlines()


def test_ci_runs_each_step_of_the_quick_start():
    main_job, _ = quick_start_commands()
    ci_lines = [line.strip() for line in CI.splitlines()]
    for step in main_job.split(" && ")[2:]:  # after venv creation and activation
        assert any(line == step or line.startswith(step + " ") for line in ci_lines), step


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return out.stdout


def readme_invocations() -> list[tuple[str, list[str]]]:
    """(script, flags) for every `python X.py ...` / `torchrun ... X.py ...` line in the README."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for command in block.replace("\\\n", " ").split("\n"):
            for part in command.split("&&"):
                words = shlex.split(part.split("#")[0]) if part.strip() else []
                script = next((w for w in words if w in SCRIPTS), None)
                if script:
                    flags = [w.split("=")[0] for w in words[words.index(script) + 1 :] if w.startswith("--") and w != "--help"]
                    found.append((script, flags))
    return found


def test_readme_has_commands_for_every_role():
    assert {script for script, _ in readme_invocations()} >= {"prepare.py", "train.py", "sample.py", "export_hf.py", "bench.py", "studio.py"}


@pytest.mark.parametrize("script, flags", readme_invocations(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_flag_in_the_readme_exists(script, flags):
    text = help_text(script)
    assert text, f"{script} --help printed nothing"
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"README uses {script} {flag}, which {script} does not accept"
