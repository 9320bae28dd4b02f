"""A pytest plugin (loaded by conftest.py): every skipped test is listed at the end, loudly; under CI=true a skip
of a real component (PostgreSQL, Chromium, Selenium, MLflow, the shared data) fails the run, because a green CI
must not have tested less than it claims. Skips for hardware these machines cannot have (a GPU) stay skips."""

from __future__ import annotations

import os

ALLOWED_SKIPS = ("CUDA", "GPU", "cuda", "no accelerator")
"""Skips that stay skips in CI: what these machines cannot have (a GPU). Every other skip (PostgreSQL, Chromium,
Selenium, MLflow, the shared data) means CI tested less than it claims, so under CI=true it fails the run."""
_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    real = [(node, why) for node, why in _SKIPPED if not any(word in why for word in ALLOWED_SKIPS)]
    if not real:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    strict = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    title = "SKIPPED a real component (CI=true: this fails the run)" if strict else \
        "SKIPPED (these tests did not run here; CI=true would fail on them)"
    if reporter is not None:
        reporter.section(title, sep="!", bold=True, red=True)
        for node, why in real:
            reporter.write_line(f"{node}: {why}")
    if strict and session.exitstatus == 0:
        session.exitstatus = 1
