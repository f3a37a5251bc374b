"""The package's shape: imports flow one way, from the commands down to the method, with no cycles.

Three floors (docs/architecture.md):

* the method: what a newcomer reads to understand the probe and the selection;
* putting it to work: settings, data, models, the one selection path, timing, evaluation, files;
* the commands: one module per CLI command, and the CLI, which nothing imports.

Every relative import of every module is read with ``ast``, function-local ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aletheia_lora

SRC = Path(aletheia_lora.__file__).parent

METHOD = {
    "architecture",
    "batches",
    "contribution",
    "costmodel",
    "io",
    "lora_config",
    "presets",
    "probe",
    "schedules",
    "scores",
    "selection",
    "truncation",
}
WORK = {
    "callbacks",
    "card",
    "code_exec",
    "data",
    "evaluation",
    "export",
    "finetune",
    "hub",
    "lm_eval_bridge",
    "models",
    "plan",
    "report",
    "runs",
    "settings",
    "stats",
    "suites",
    "time_to_target",
    "timing",
}
COMMANDS = {"train", "bench", "study", "oracle", "race", "eval", "cli", "__main__"}
FLOOR = {**dict.fromkeys(METHOD, 0), **dict.fromkeys(WORK, 1), **dict.fromkeys(COMMANDS, 2)}
# The CLI imports each command when it is asked for, so `aletheia-lora` answers without torch.
LAZY_SIBLING_IMPORTS_ALLOWED = {"cli", "__init__"}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(SRC.glob("*.py"))}


def _sibling_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(module imported, whether the import is inside a function or an ``if``) for each ``from .x import``."""
    out = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            modules = [a.name if (SRC / f"{a.name}.py").is_file() else "__init__" for a in node.names]
            names = [node.module] if node.module else modules
            out += [(name.split(".")[0], id(node) not in top) for name in names]
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {dep for dep, _ in _sibling_imports(tree)} - {name} for name, tree in _modules().items()}


def test_every_module_has_a_floor():
    assert set(_modules()) - {"__init__"} == set(FLOOR), (
        "add the new module to a floor (docs/architecture.md too)"
    )


def test_imports_only_go_down_or_sideways_within_the_work_floor():
    bad = []
    for name, deps in _graph().items():
        if name == "__init__":
            continue
        for dep in deps:
            if dep == "__init__" or FLOOR[dep] < FLOOR[name]:
                continue
            if FLOOR[dep] == FLOOR[name] and FLOOR[name] < 2:
                continue  # siblings on one floor; the cycle test keeps them acyclic
            if name in ("cli", "__main__"):
                continue  # the CLI is the top: it calls every command (`python -m` calls the CLI)
            bad.append(f"{name} -> {dep}")
    assert not bad, f"imports that go up a floor or between commands: {bad}"


def test_no_module_imports_the_cli_and_the_method_imports_no_command():
    graph = _graph()
    assert not [name for name, deps in graph.items() if "cli" in deps and name != "__main__"]
    core = {"architecture", "probe", "selection", "scores", "lora_config", "costmodel"}
    bad = {name: deps & (WORK | COMMANDS) for name, deps in graph.items() if name in core}
    assert not any(bad.values()), bad


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_sibling_imports_are_at_module_level():
    hidden = [
        name
        for name, tree in _modules().items()
        if name not in LAZY_SIBLING_IMPORTS_ALLOWED
        for dep, local in _sibling_imports(tree)
        if local and not _type_checking_only(tree, dep)
    ]
    assert not hidden, f"function-local sibling imports hide the import graph: {hidden}"


def _type_checking_only(tree: ast.Module, dep: str) -> bool:
    """Whether ``from .dep import`` appears only under ``if TYPE_CHECKING:`` (no runtime import)."""
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            if any(
                isinstance(n, ast.ImportFrom) and n.level == 1 and n.module == dep for n in ast.walk(node)
            ):
                return True
    return False


def test_a_cycle_is_caught(monkeypatch):
    # the detector itself: a graph with a cycle must fail
    import pytest

    monkeypatch.setitem(globals(), "_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    with pytest.raises(AssertionError, match="a -> b -> c -> a"):
        test_the_import_graph_has_no_cycle()


def test_private_names_are_not_imported_across_modules():
    crossing = [
        f"{name}: from .{node.module} import {alias.name}"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not crossing, crossing


def test_scripts_use_only_public_names():
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    private = [
        f"{path.name}: {node.module}.{alias.name}"
        for path in sorted(scripts.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aletheia_lora")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private, private
