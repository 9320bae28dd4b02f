"""The base of the errors pomona reports to a user as one line (exit code 2) instead of a traceback: a bad data
layout, an unreadable image, missing weights, a damaged run folder, a stale export, bad balancing settings, a
missing optional package, ... Each module defines its own subclass next to the code that raises it; the CLI
catches this one class (and turns the rest into one line too, with the traceback behind `--debug`).

`require` checks the optional packages of a command before it does any work, and `explain_error` gives the line
and exit code the CLI prints for any exception. Standard library only."""

from __future__ import annotations

import importlib

EXTRAS = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "python_multipart": "serve",
          "multipart": "serve", "onnx": "serve", "onnxruntime": "serve", "optuna": "tune", "wandb": "tune",
          "plotly": "tune", "mlflow": "mlflow", "cleanlab": "doctor", "imagehash": "doctor"}
"""Optional packages and the extra of pomona that installs them (`pip install 'pomona[EXTRA]'`, or from a clone of
the repository `pip install -e '.[EXTRA]'`)."""

PACKAGE_NAMES = {"python_multipart": "python-multipart", "multipart": "python-multipart"}
"""Import names that differ from the name pip installs."""


class PomonaError(Exception):
    """A problem with the user's data, settings or set-up; the message says what and how to fix it."""


class UsageError(PomonaError):
    """A command line, or settings, that cannot run as given (exit code 2, like argparse's own usage errors)."""


class MissingExtra(PomonaError, ImportError):
    """An optional package a command needs is not installed; the message names the pip command that installs it."""


def missing_extra(module: str, needed_for: str = "this command") -> MissingExtra:
    top = module.split(".")[0]
    package = PACKAGE_NAMES.get(top, top)
    extra = EXTRAS.get(top)
    fix = (f"pip install 'pomona[{extra}]'  (from a clone: pip install -e '.[{extra}]')" if extra
           else f"pip install {package}")
    return MissingExtra(f"{needed_for} needs the Python package {package}, which is not installed: {fix}")


def require(needed_for: str, *modules: str) -> None:
    """Import each module ('a|b': either name) or raise MissingExtra naming the pip command (call it before any
    work is done)."""
    for module in modules:
        names = module.split("|")
        for name in names:
            try:
                importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            raise missing_extra(names[0], needed_for)


def explain_error(error: BaseException) -> tuple[str, int]:
    """The one-line message and exit code the CLI reports for `error`: the message itself and 2 for pomona's own
    errors and file problems, the pip command for a missing optional package (2), and the error's type and first
    line with a pointer to `--debug` for anything unexpected (1)."""
    if isinstance(error, ModuleNotFoundError) and error.name and error.name.split(".")[0] in EXTRAS:
        return str(missing_extra(error.name)), 2
    if isinstance(error, (PomonaError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(error), 2
    if isinstance(error, KeyError):
        return f"missing key {error}", 2
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return (f"{type(error).__name__}{': ' + first if first else ''} (unexpected; run again with --debug for the "
            "traceback)"), 1
