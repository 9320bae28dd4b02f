"""Under CI=true a skipped real component fails the run; a missing GPU does not; without CI skips are listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, ci: bool, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text("import pytest\n\n" + body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skipped_real_component_fails_under_ci_and_is_listed_otherwise(tmp_path):
    body = ("def test_ok():\n    assert 1 + 1 == 2\n\n"
            "def test_db():\n    pytest.skip('PostgreSQL server binaries not installed')\n")
    ci = run_pytest(tmp_path, True, body)
    assert ci.returncode == 1, ci.stdout
    assert "SKIPPED a real component" in ci.stdout and "PostgreSQL server binaries" in ci.stdout
    local = run_pytest(tmp_path, False, body)
    assert local.returncode == 0, local.stdout
    assert "did not run here" in local.stdout and "test_db" in local.stdout


def test_a_missing_gpu_stays_a_skip_under_ci(tmp_path):
    body = "def test_gpu():\n    pytest.skip('needs a CUDA device')\n"
    ci = run_pytest(tmp_path, True, body)
    assert ci.returncode == 0, ci.stdout
    assert "SKIPPED a real component" not in ci.stdout
