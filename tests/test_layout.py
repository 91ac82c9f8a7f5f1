"""The repository's shape: the root holds the role scripts and their libraries, extras (the
studio, benchmarks, tools) live in folders of their own; role scripts and extras import library
modules, never a role; the import graph has no cycle; every file reads in one sitting, and no
function of a role script is longer than a screenful or two."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROLES = {"prepare", "train", "sample", "export_hf"}
LIBRARIES = {"model", "configurator", "tokenizer", "dataset", "corpus", "checkpoint", "hardware", "hf", "gguf_export", "system", "runlog"}
EXTRAS = ("studio", "tools")  # folders of scripts that use the libraries; nothing imports them
MAX_LINES = 1000
MAX_ROLE_FUNCTION_LINES = 120


def root_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(REPO.glob("*.py"))}


def extra_scripts() -> list[Path]:
    return sorted(p for folder in EXTRAS for p in (REPO / folder).glob("*.py"))


def repo_imports(path: Path) -> set[str]:
    """Root modules that `path` imports anywhere (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(root_modules())


def test_every_root_module_is_a_role_or_a_library():
    assert set(root_modules()) <= ROLES | LIBRARIES, "classify the new file in tests/test_layout.py (or move an extra into studio/ or tools/)"


def test_the_extras_live_in_their_own_folders():
    assert (REPO / "studio" / "studio.py").is_file() and (REPO / "studio" / "studio.html").is_file()
    assert (REPO / "tools" / "bench.py").is_file()
    assert not {"studio", "bench"} & set(root_modules())


@pytest.mark.parametrize("path", [root_modules()[n] for n in sorted(ROLES & set(root_modules()))] + extra_scripts(),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_roles_and_extras_import_only_libraries(path):
    imported = repo_imports(path)
    assert not imported & ROLES, f"{path.name} imports the role script(s) {sorted(imported & ROLES)}; move the shared code into a library"


def test_the_import_graph_has_no_cycle():
    graph = {name: repo_imports(path) for name, path in root_modules().items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_a_role_script_detects_a_planted_cycle_and_role_import(tmp_path, monkeypatch):
    # The checks above must be able to fail: plant a library cycle and a role-to-role import.
    (tmp_path / "model.py").write_text("import hardware\n")
    (tmp_path / "hardware.py").write_text("def f():\n    from model import x\n")
    (tmp_path / "train.py").write_text("import sample\n")
    (tmp_path / "sample.py").write_text("import model\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert repo_imports(tmp_path / "train.py") & ROLES == {"sample"}
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*model.*hardware.*model|import cycle: .*hardware.*model.*hardware"):
        test_the_import_graph_has_no_cycle()


@pytest.mark.parametrize("path", sorted(REPO.glob("*.py")) + extra_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_files_stay_readable_in_one_sitting(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it (limit {MAX_LINES})"


def long_functions(path: Path, limit: int) -> list[str]:
    """name (lines) of every function or method in path longer than limit lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("name", sorted(ROLES))
def test_role_functions_read_in_one_sitting(name):
    too_long = long_functions(root_modules()[name], MAX_ROLE_FUNCTION_LINES)
    assert not too_long, f"{name}.py: {', '.join(too_long)} longer than {MAX_ROLE_FUNCTION_LINES} lines; split it"


def test_long_function_check_can_fail(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n" + "    x = 1\n" * 130)
    assert long_functions(path, MAX_ROLE_FUNCTION_LINES) == ["f (131 lines)"]


def test_train_py_stays_short():
    # The loop a forker reads first: setup, loop and finish fit in one file of this size.
    lines = len((REPO / "train.py").read_text(encoding="utf-8").splitlines())
    assert lines <= 700, f"train.py has {lines} lines; move what is not the loop into a library"
