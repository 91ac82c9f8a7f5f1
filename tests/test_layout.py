"""The repository's shape: role scripts import library modules, never each other; the import
graph has no cycle; every file at the root reads in one sitting."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROLES = {"prepare", "train", "sample", "export_hf", "bench", "studio"}
LIBRARIES = {"model", "configurator", "tokenizer", "dataset", "corpus", "checkpoint", "hardware"}
MAX_LINES = 1000


def root_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(REPO.glob("*.py"))}


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
    assert set(root_modules()) <= ROLES | LIBRARIES, "classify the new file in tests/test_layout.py"


@pytest.mark.parametrize("name", sorted(ROLES & set(root_modules())))
def test_role_scripts_import_only_libraries(name):
    imported = repo_imports(root_modules()[name])
    assert not imported & ROLES, f"{name}.py imports the role script(s) {sorted(imported & ROLES)}; move the shared code into a library"


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


@pytest.mark.parametrize("path", sorted(REPO.glob("*.py")), ids=lambda p: p.name)
def test_root_files_stay_readable_in_one_sitting(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it (limit {MAX_LINES})"
