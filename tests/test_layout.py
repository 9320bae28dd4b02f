"""The import rule of DEVELOPERS.md, read from the package tree: every module lives in a layer (a sub-package, or
one of the few top-level modules), imports point one way through the layers, the modules import each other at
load time without a cycle, training never imports optuna or a tracker, only the entry point reads the environment,
serving never loads training, and `import pomona` stays cheap.

Only the order of the layers is written here; the modules are read from the tree, so a new module needs no edit."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pomona"

ORDER = ["core", "config", "data", "models", "inference", "reporting", "serving", "training", "curation", "tuning",
         "tools", "workflows", "cli"]
"""The layers, lowest first: the sub-packages of `pomona` and its top-level modules (`workflows`). A module imports
modules of its own layer and of earlier ones, never of a later one."""
ENTRY = {"pomona": "cli", "pomona.__main__": "cli"}
"""`pomona/__init__.py` and `pomona/__main__.py` sit with the command line, above every other layer."""
SERVING = ["inference", "reporting", "serving"]
"""The layers that use a finished run (predict, export, report, explain, serve): they never load training."""
ENVIRONMENT_READERS = ("pomona.cli", "pomona.__main__", "pomona.core.runtime")
"""The entry point: the only modules (or packages) that may read `os.environ`; the others receive what they need
as parameters (`init_distributed(os.environ)`, `reexec_with_malloc_tuning(os.environ)`, `train_run(env=...)`)."""
TRACKERS = ("optuna", "wandb", "mlflow", "pomona.tuning")
"""What training never imports, directly or through another module: the tuner and the trackers attach through
callbacks (`on_epoch_end`)."""


def _discover() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name: `pomona.config` is its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _discover()


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str | None:
    """The layer of a pomona module (`pomona.data.index` -> 'data'), or None when it lives in none."""
    if module in ENTRY:
        return ENTRY[module]
    unit = module.split(".")[1]
    return unit if unit in ORDER else None


def rank(module: str) -> int:
    return ORDER.index(layer(module))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_from(module: str, node: ast.ImportFrom) -> list[str]:
    """The modules `from ... import ...` imports: each imported name that is a pomona module, else the module the
    names come from (a package's __init__ for `from . import name`); an outside module by its own name."""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    if base.split(".")[0] != "pomona":
        return [base]
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


@cache
def imports(module: str) -> tuple[tuple[str, str], ...]:
    """(imported module, when) for every import of `module`: when is 'load' (runs when the module is imported),
    'lazy' (inside a function) or 'typing' (under `if TYPE_CHECKING:`). Outside modules keep their full name."""
    found = []

    def visit(node: ast.AST, when: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, when) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((m, when) for m in _resolve_from(module, child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "lazy" if when == "load" else when)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), "typing" if when == "load" else when)
                for part in child.orelse:
                    visit(ast.Module(body=[part], type_ignores=[]), when)
            else:
                visit(child, when)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), "load")
    return tuple(found)


def local_imports(module: str, whens=("load", "lazy", "typing")) -> set[str]:
    return {m for m, when in imports(module) if when in whens and m.split(".")[0] == "pomona"}


def test_the_import_reader_reads_every_form(tmp_path, monkeypatch):
    """`from . import a, b` (each name a module or not), `from .x import y`, `from ..pkg.mod import y`,
    `from pomona.x import y`, `import pomona.x.y`, imports inside functions and under `if TYPE_CHECKING:`."""
    source = ("from typing import TYPE_CHECKING\n"
              "import numpy\n"
              "from . import errors, not_a_module\n"
              "from .atomic import write_json\n"
              "from ..data.index import index_folder\n"
              "from pomona.config import Config\n"
              "import pomona.models.tta\n"
              "if TYPE_CHECKING:\n"
              "    from ..training.train import TrainResult\n"
              "def f():\n"
              "    from .. import __version__\n"
              "    from ..inference import loaded, runfolder\n")
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "pomona.core.fake", fake)
    imports.cache_clear()
    try:
        assert set(imports("pomona.core.fake")) == {
            ("typing", "load"), ("numpy", "load"), ("pomona.core.errors", "load"), ("pomona.core", "load"),
            ("pomona.core.atomic", "load"), ("pomona.data.index", "load"), ("pomona.config", "load"),
            ("pomona.models.tta", "load"), ("pomona.training.train", "typing"), ("pomona", "lazy"),
            ("pomona.inference.loaded", "lazy"), ("pomona.inference.runfolder", "lazy")}
    finally:
        imports.cache_clear()


def test_every_module_lives_in_a_layer():
    homeless = sorted(m for m in MODULES if layer(m) is None)
    assert not homeless, f"put these in a sub-package named in ORDER (and in DEVELOPERS.md): {homeless}"
    missing = [unit for unit in ORDER if f"pomona.{unit}" not in MODULES]
    assert not missing, f"ORDER names layers the tree does not have: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_pomona_import_names_a_module(module):
    unknown = sorted(local_imports(module) - set(MODULES))
    assert not unknown, f"{module} imports what is not in the tree: {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    upward = sorted(m for m in local_imports(module) if m in MODULES and rank(m) > rank(module))
    assert not upward, f"{module} (layer {layer(module)}) imports later layers: {upward}"


def test_modules_import_each_other_without_a_cycle():
    """What runs when a module is imported (its top-level imports, not those inside functions or under
    `if TYPE_CHECKING:`) never comes back to the module: a cycle half-initialises one of its modules."""
    graph = {m: sorted(local_imports(m, ("load",)) & set(MODULES) - {m}) for m in MODULES}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in graph:
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_training_never_imports_optuna_or_a_tracker():
    """Not directly, and not through another pomona module (lazy imports included)."""
    found = []
    for start in (m for m in MODULES if layer(m) == "training"):
        seen, todo = {start}, [(start, [start])]
        while todo:
            module, path = todo.pop()
            for m, _ in imports(module):
                if _within(m, TRACKERS):
                    found.append(" -> ".join(path + [m]))
                elif m in MODULES and m not in seen:
                    seen.add(m)
                    todo.append((m, path + [m]))
    assert not found, "training imports the tuner or a tracker: " + "; ".join(found)


def _reads_environment(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _within(m, ENVIRONMENT_READERS)))
def test_no_module_reads_the_environment_but_the_entry_point(module):
    lines = _reads_environment(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    assert not lines, (f"{module} reads the environment (lines {lines}): take the value as a parameter, and let the "
                       f"entry point ({', '.join(ENVIRONMENT_READERS)}) pass os.environ down")


def _modules_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_serving_never_loads_training():
    serving = sorted(m for m in MODULES if layer(m) in SERVING)
    training = [f"pomona.{unit}" for unit in ORDER[ORDER.index(SERVING[-1]) + 1:]]
    training += ["pomona.data.bundle", "pomona.data.balance", "optuna", "Augmentor"]
    loaded = _modules_after("import " + ", ".join(serving))
    assert set(serving) <= loaded
    assert not {m for m in loaded if _within(m, training)}, sorted(m for m in loaded if _within(m, training))


def test_import_pomona_is_cheap_and_load_run_is_there_on_demand():
    assert "torch" not in _modules_after("import pomona")
    loaded = _modules_after("from pomona import load_run\nfrom pomona.inference.loaded import load_run as real\n"
                            "assert load_run is real")
    assert "torch" in loaded and not {m for m in loaded if _within(m, ["pomona.training"])}
