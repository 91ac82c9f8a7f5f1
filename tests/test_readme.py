"""README.md and docs/*.md promise commands and defaults; these tests keep the promises, the
scripts and CI in step with them."""

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
SCRIPTS = ROLES + ("model.py", "tools/eval_split.py", "tools/split_heldout.py", "tools/gpu_check.py")
README_MAX_BYTES = 20_000
MAP_BEFORE = 6_000  # characters: "Read the code" must be on the first screens


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


def test_readme_is_a_front_page():
    """Details live in docs/; the README stays short, and the map of the code comes early."""
    assert len(README.encode("utf-8")) <= README_MAX_BYTES, f"README.md has {len(README.encode())} bytes; move details to docs/"
    assert "\n## Read the code\n" in README
    assert README.index("\n## Read the code\n") < MAP_BEFORE


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


# ----------------------------------------------------------------------------- documented defaults
# A default is documented in one of two forms, in a page or section that belongs to sample.py or
# train.py (docs/sampling.md and docs/training.md as a whole; in README.md, a "## " section whose
# heading names the script):
#   - a table with a "default" column, the flag or key in backticks in the first column;
#   - inline: "`--flag` (default: VALUE)".
# VALUE is a literal (a number, `code`, on/off, none, true/false) compared with what --help
# prints; anything else is a description, which only a default --help prints as None (decided at
# run time) may have.

PAGE_SCRIPT = {"docs/sampling.md": "sample.py", "docs/training.md": "train.py"}
DEFAULTS_OF = ("sample.py", "train.py")


def help_defaults(script: str, text: str) -> dict[str, str]:
    """{flag name without dashes: default as --help prints it}."""
    if script == "train.py":  # aligned rows: --key  type  default  help
        return {m[1]: m[2] for m in re.finditer(r"^\s+--(\w+)\s+\S+\s+('[^']*'|\S+)", text, flags=re.M)}
    # argparse's ArgumentDefaultsHelpFormatter: "... (default: X)" at the end of each option's help
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    found = {}
    for entry in entries:
        name = re.search(r"--(\w+)", entry)
        value = re.search(r"\(default: (.*)\)$", " ".join(entry.split()))
        if name and value:
            found[name[1]] = value[1]
    return found


def balanced(text: str) -> str:
    """text up to the parenthesis that closes the one just before it."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        if ch == ")":
            if depth == 0:
                return text[:i]
            depth -= 1
    return text


def sections(page: str, text: str) -> list[tuple[str, str]]:
    """(script or None, text) for the parts of a page, code blocks left out."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    if page in PAGE_SCRIPT:
        return [(PAGE_SCRIPT[page], text)]
    parts = re.split(r"^(?=## )", text, flags=re.M)
    return [(next((s for s in DEFAULTS_OF if s in part.split("\n", 1)[0]), None), part) for part in parts]


def documented_defaults(page: str, text: str) -> list[tuple[str, str, str, str]]:
    """(script, flag, documented value, page) for every default written in a recognised form."""
    found = []
    for script, section in sections(page, text):
        if script is None:
            continue
        for table in re.findall(r"(?:^\|.*\n?)+", section, flags=re.M):
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]] for row in table.strip().split("\n")]
            header = [c.lower() for c in rows[0]]
            if "default" not in header:
                continue
            for cells in rows[2:]:  # after the |---| line
                names = re.findall(r"`-*(\w+)[^`]*`", cells[0])
                value = cells[header.index("default")]
                values = value.split(" / ") if len(names) > 1 and value.count(" / ") == len(names) - 1 else [value] * len(names)
                found += [(script, name, v, page) for name, v in zip(names, values)]
        prose = " ".join(re.sub(r"^\|.*$", "", section, flags=re.M).split())
        for m in re.finditer(r"`--(\w+)[^`]*`\s*\(default:?\s*", prose):
            found.append((script, m[1], balanced(prose[m.end():]), page))
    return found


def literal(value: str):
    """The literal at the start of a documented default, or None for a description."""
    value = value.strip()
    code = re.match(r"`([^`]*)`", value)
    if code:
        return code[1].strip("'\"")
    word = re.match(r"(on|off|none|true|false)\b", value, flags=re.I)
    if word:
        return word[1].lower()
    number = re.match(r"[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?)", value, flags=re.I)
    return number[0].replace(",", "") if number else None


def same(documented, printed: str) -> bool:
    printed = printed.strip("'\"")
    if documented is None:  # a description: only for what is decided at run time
        return printed == "None"
    words = {"none": {"None"}, "off": {"None", "False"}, "false": {"False"}, "on": {"True"}, "true": {"True"}}
    if documented.lower() in words:
        return printed in words[documented.lower()]
    try:
        return float(documented) == float(printed)
    except ValueError:
        return documented == printed


def default_mismatches(defaults: list[tuple[str, str, str, str]]) -> list[str]:
    problems = []
    for script, flag, value, where in defaults:
        printed = help_defaults(script, help_text(script))
        if flag not in printed:
            problems.append(f"{where}: {script} has no --{flag}")
        elif not same(literal(value), printed[flag]):
            problems.append(f"{where}: {script} --{flag} documented as {value!r}, but --help says {printed[flag]}")
    return problems


def all_documented_defaults() -> list[tuple[str, str, str, str]]:
    return [d for page, text in PAGES.items() for d in documented_defaults(page, text)]


def test_help_defaults_are_read_for_both_scripts():
    sample, train = help_defaults("sample.py", help_text("sample.py")), help_defaults("train.py", help_text("train.py"))
    assert sample["max_new_tokens"] == "None" and sample["temperature"] == "0.8" and sample["start"] == ""
    assert train["data_dir"] == "'data/demo'" and train["max_iters"] == "5000" and train["compile"] == "None"


def test_documented_defaults_match_help():
    defaults = all_documented_defaults()
    documented = {(script, flag) for script, flag, _, _ in defaults}
    for script in DEFAULTS_OF:  # docs/sampling.md and docs/training.md document every flag and key
        assert set(help_defaults(script, help_text(script))) - {"help"} <= {flag for s, flag in documented if s == script}, script
    assert default_mismatches(defaults) == []


def test_a_wrong_documented_default_is_caught():
    page = """## sample.py: planted
`--max_new_tokens` (default: 300) and `--temperature` (default: 0.8, 0 is greedy).

| flag | default | meaning |
|---|---|---|
| `--out_dir` | `out` | where |
| `--top_k` | `200` | k |
| `--seed` | a new one every run | same seed, same output |

## train.py: planted
`--batch_size` (default: 8), `--learning_rate` (default: 3e-4), `--max_time_min` (default: 5), `--n_layers` (default: 12).
"""
    problems = default_mismatches(documented_defaults("PLANTED.md", page))
    assert len(problems) == 5, problems
    for wrong in ("--max_new_tokens documented as '300'", "--out_dir documented as '`out`'", "--learning_rate documented as '3e-4'",
                  "--max_time_min documented as '5'", "train.py has no --n_layers"):
        assert any(wrong in p for p in problems), (wrong, problems)


# ----------------------------------------------------------------------------- links


def slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page (a repeated heading gets -1, -2, ...)."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{counts[slug]}" if slug in counts else slug)
        counts[slug] = counts.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_resolve(page):
    text = re.sub(r"```.*?```", "", PAGES[page], flags=re.S)
    base = (REPO / page).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else REPO / page
        assert file.exists(), f"{page} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in slugs(file.read_text(encoding="utf-8")), f"{page} links to {target}: no such heading"
