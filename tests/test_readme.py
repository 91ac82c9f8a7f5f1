"""README.md and docs/*.md promise commands; these tests keep the promises and CI in step with them."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md"))}
PAGES = {"README.md": README, **DOCS}
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")
# Scripts as they are run from the repository root; each answers --help.
ROLES = ("prepare.py", "train.py", "sample.py", "export_hf.py", "tools/bench.py", "studio/studio.py")
SCRIPTS = ROLES + ("model.py", "tools/eval_split.py", "tools/split_heldout.py")


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


def shell_lines(block: str) -> list[str]:
    """The command lines of a ```bash block: continuations joined, heredoc bodies left out."""
    lines, heredoc_end = [], None
    for line in block.replace("\\\n", " ").split("\n"):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        opened = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if opened:
            heredoc_end = opened.group(1)
        lines.append(line)
    return lines


def invocations(text: str) -> list[tuple[str, list[str]]]:
    """(script, flags) for every `python X.py ...` / `torchrun ... X.py ...` in text's ```bash blocks."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in shell_lines(block):
            for part in command.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:  # a line inside a multi-line `python -c "..."` string
                    continue
                script = next((w for w in words if w in SCRIPTS), None)
                if script:
                    flags = [w.split("=")[0] for w in words[words.index(script) + 1 :] if w.startswith("--") and w != "--help"]
                    found.append((script, flags))
    return found


def documented_invocations() -> list[tuple[str, str, list[str]]]:
    return [(page, script, flags) for page, text in PAGES.items() for script, flags in invocations(text)]


def test_readme_has_commands_for_every_role():
    assert {script for script, _ in invocations(README)} >= set(ROLES)


def test_docs_run_the_extras_by_their_paths():
    """bench.py and studio.py live in tools/ and studio/; a command without the folder fails."""
    for page, text in PAGES.items():
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            assert not re.search(r"python (bench|studio)\.py", block), f"{page} runs bench.py or studio.py from the root"


@pytest.mark.parametrize("page, script, flags", documented_invocations(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_flag_in_the_readme_exists(page, script, flags):
    text = help_text(script)
    assert text, f"{script} --help printed nothing"
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{page} uses {script} {flag}, which {script} does not accept"
