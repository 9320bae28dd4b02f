"""The import rule of DEVELOPERS.md: imports point one way through the layers, serving never loads training, and
`import pomona` stays cheap."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pomona"

LAYERS = [
    ["config", "errors", "atomic", "progress", "runtime"],
    ["images", "index", "split", "data", "balance"],
    ["model", "augment", "preprocessing", "tta", "metrics", "batch_augment"],
    ["onnx_io", "engine", "checkpoint"],
    ["datasets", "distributed", "extract", "groups", "plan", "train", "features", "selftrain", "cv"],
    ["predict", "annotate", "report", "explain", "export", "serve"],
    ["study", "tune", "tracking", "ablate", "preview", "fetch", "doctor", "doctor_checks", "doctor_page", "suggest",
     "workflows"],
    ["cli", "cliargs", "__main__", "__init__"],
]
LAYER = {module: i for i, modules in enumerate(LAYERS) for module in modules}


def _local_imports(path: Path) -> set[str]:
    """Every pomona module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pomona"):
            found.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), f"add to LAYERS (and DEVELOPERS.md): {sorted(modules ^ set(LAYER))}"


@pytest.mark.parametrize("module", sorted(LAYER))
def test_imports_point_one_way(module):
    if module in ("cli", "__main__"):
        return  # the command line knows every module
    upward = {m for m in _local_imports(PACKAGE / f"{module}.py") if LAYER[m] > LAYER[module]}
    assert not upward, f"{module} (layer {LAYER[module]}) imports later layers: {sorted(upward)}"


def _modules_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


def test_serving_never_loads_training():
    loaded = _modules_after("import pomona.serve, pomona.predict, pomona.export, pomona.engine, pomona.checkpoint, "
                            "pomona.explain, pomona.report, pomona.annotate")
    training = {"pomona.train", "pomona.balance", "pomona.data", "pomona.tune", "pomona.study",
                "pomona.distributed", "pomona.features", "optuna", "Augmentor"}
    assert not loaded & training, sorted(loaded & training)


def test_import_pomona_is_cheap_and_load_run_is_there_on_demand():
    assert "torch" not in _modules_after("import pomona")
    loaded = _modules_after("from pomona import load_run\nfrom pomona.checkpoint import load_run as real\n"
                            "assert load_run is real")
    assert "torch" in loaded and "pomona.train" not in loaded
