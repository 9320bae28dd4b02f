"""Atomic writes of run files: every file pomona writes into a run folder (JSON, CSV, weights, training state,
NumPy arrays) is written to a temporary file in the same folder and then moved over its name with `os.replace`,
so a killed process never leaves a half-written file behind (the data is flushed to disk before the rename, so
neither does a power cut). Standard library only."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` for a temporary file beside `path`, then move it over `path` (same file system,
    so the replacement is atomic). The temporary file is removed when `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so that not even a power cut leaves it empty
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, **kwargs) -> Path:
    return write_text(path, json.dumps(data, indent=2, **kwargs))


def write_csv(path: str | Path, frame) -> Path:
    """A pandas DataFrame as CSV, without the index."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
