"""Run folders: the one place that writes and reads `run.json`, model weights and the resumable training state
(`loaded.load_run` gives a finished run ready to predict).

`run.json` describes the model of a run folder:

  classes, preprocessing     what the model tells apart, and how a photo becomes its input
  model                      timm name, head width and dropout (enough to rebuild the network)
  members                    weight files relative to the folder: ["model.safetensors"] for a plain run, one per
                             member for an ensemble (e.g. members/0/model.safetensors, ...); their probabilities
                             are averaged
  temperature                probabilities are softmax(logits / temperature) (1.0 = as trained)
  config, best_epoch, ...    the full config and what training recorded

  member_sha256              the SHA-256 of each member's weights file, checked whenever the run is loaded

Run folders written before `members`, `temperature` and `member_sha256` existed load as one member
`model.safetensors` at temperature 1, unchecked. Each weights file also carries the classes in its safetensors
metadata (`pomona.classes`), as the ONNX export and export.json do: `load_run` refuses a run whose run.json
disagrees with any of them (reordered classes would silently give wrong labels), whose weights are damaged or
replaced, or whose head has another number of outputs than run.json has classes, each with a `RunFolderError`
naming the file and the fix. The training state `last.pt` holds tensors and plain values only and is read with
`torch.load(weights_only=True)`: a planted pickle payload is refused, never run.

The names of a run folder's files are declared once, on `runfiles.RunFolder` (which also says which of them
`--overwrite` removes). Every file is written atomically (`pomona.core.atomic`). `check_new_run_folder` /
`clear_run_folder` guard an existing run against being replaced by a new one (`pomona train --out` without
`--overwrite`). This module never imports training (`pomona.training`, `pomona.tuning`, the data bundle or
balancing): serving, export and predict read runs through it alone.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.atomic import atomic_write, write_json
from ..core.errors import PomonaError
from ..data.preprocessing import Preprocessing
from .runfiles import (EXPORT_FILES, EXPORT_INFO, ONNX_FILE, ONNX_INT8_FILE, PROBE_WEIGHTS, RUN_FILES,
                       RUN_FOLDER_PATTERN, RUN_INFO, RUN_MARKERS, SPLIT_FILE, TORCHSCRIPT_FILE, TRAINING_STATE,
                       WEIGHTS, RunFolder)  # the names of a run's files, declared in `runfiles` (re-exported here)

CLASSES_METADATA = "pomona.classes"
"""Key of the class list in the safetensors metadata of weights files and in the ONNX metadata of exports."""
_KEPT_PARTS: ContextVar[frozenset] = ContextVar("pomona_kept_run_parts", default=frozenset())


class RunFolderError(PomonaError, ValueError):
    """A run folder that cannot be used as it is (missing, damaged or inconsistent files), or an existing run in
    the way of a new one; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------ a new run folder
def check_new_run_folder(run_dir: str | Path, overwrite: bool = False) -> None:
    """Raise RunFolderError when `run_dir` cannot take a new run: it holds a run (or other files) and
    `overwrite` is off, or it is a file. Reads only; call it before any work, and `clear_run_folder` right before
    the first file of the new run is written."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a folder: choose another --out")
    if overwrite:
        return
    markers = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if markers:
        raise RunFolderError(f"{run_dir} already holds a pomona run ({', '.join(markers)}): choose a new --out, "
                             f"continue it with --resume {run_dir}, or replace it with --overwrite")
    others = sorted(p.name for p in run_dir.iterdir())
    if others:
        listing = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise RunFolderError(f"{run_dir} is not empty ({listing}): choose a new or empty --out, or write into it "
                             "anyway with --overwrite (pomona's run files there are replaced, the others kept)")


@contextmanager
def keeping_run_parts(*paths: str | Path) -> Iterator[None]:
    """Within the block `clear_run_folder` leaves `paths` alone: parts the run being trained has already written
    into its own folder (a self-trained run's teacher/ and earlier students, while its last student is trained
    into the folder itself and clears what an earlier run left there)."""
    token = _KEPT_PARTS.set(_KEPT_PARTS.get() | {Path(p).resolve() for p in paths})
    try:
        yield
    finally:
        _KEPT_PARTS.reset(token)


def clear_run_folder(run_dir: str | Path) -> None:
    """Remove the files of an earlier run from `run_dir` (`RUN_FILES` and `RUN_FOLDER_PATTERN`; run.json first, so
    that a half-cleared folder never claims to be a finished run); other files are kept, and so are the parts of
    the run being trained (`keeping_run_parts`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    students = sorted(p.name for p in run_dir.iterdir() if RUN_FOLDER_PATTERN.fullmatch(p.name))
    for name in (RUN_INFO, *[n for n in RUN_FILES if n != RUN_INFO], *students):
        path = run_dir / name
        if path.resolve() in _KEPT_PARTS.get():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ------------------------------------------------------------------------------------------------ writing
def state_dict_cpu(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(path: str | Path, module: nn.Module, classes: Sequence[str] | None = None) -> Path:
    """A module's weights as safetensors (atomically); `classes` go into the file's metadata."""
    state = state_dict_cpu(module)
    metadata = {CLASSES_METADATA: json.dumps(list(classes))} if classes is not None else None
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_weights(path: str | Path) -> dict:
    """Weights written by `save_weights` (safetensors: no code can hide in them)."""
    return load_file(str(path))


def save_run(run_dir: str | Path, models: nn.Module | Sequence[nn.Module], classes: list[str],
             pre: Preprocessing, model_settings: dict, config: dict, extra: dict | None = None,
             temperature: float = 1.0) -> Path:
    """Write the weights of every member (one model: model.safetensors; several: members/<i>/model.safetensors)
    and then run.json, so that a run.json always names complete weights."""
    run_dir = Path(run_dir)
    models = [models] if not isinstance(models, (list, tuple)) else list(models)
    members = [WEIGHTS] if len(models) == 1 else [f"members/{i}/{WEIGHTS}" for i in range(len(models))]
    digests = [sha256_file(save_weights(run_dir / name, model, classes)) for name, model in zip(members, models)]
    info = {"classes": list(classes), "preprocessing": pre.to_dict(), "model": model_settings, "config": config,
            "members": members, "temperature": float(temperature), "member_sha256": digests, **(extra or {})}
    return write_json(run_dir / RUN_INFO, info)


def save_ensemble(run_dir: str | Path, member_dirs: Sequence[str | Path], temperature: float = 1.0,
                  extra: dict | None = None) -> Path:
    """run.json of an ensemble whose members are finished runs below `run_dir` (e.g. the fold runs of a
    cross-validation): their weights, averaged, at `temperature`. The members must agree on classes,
    preprocessing and network."""
    run_dir = Path(run_dir)
    infos = [read_run_info(d) for d in member_dirs]
    first = infos[0]
    for d, info in zip(member_dirs, infos):
        for key in ("classes", "preprocessing", "model"):
            if info[key] != first[key]:
                raise ValueError(f"ensemble member {d} has other {key} than {member_dirs[0]}")
    members = [str((Path(d) / m).relative_to(run_dir)) for d, info in zip(member_dirs, infos)
               for m in info["members"]]
    digests = [sha256_file(run_dir / m) for m in members]
    info = {"classes": first["classes"], "preprocessing": first["preprocessing"], "model": first["model"],
            "config": first["config"], "members": members, "temperature": float(temperature),
            "member_sha256": digests, **(extra or {})}
    return write_json(run_dir / RUN_INFO, info)


STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "best", "stopped", "classes")


def save_training_state(path: str | Path, state: dict) -> Path:
    """The resumable state of a training run (tensors, numbers, strings, lists and dicts only: it is read back
    with `torch.load(weights_only=True)`, which never unpickles code)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict:
    """The state `save_training_state` wrote. Read with `torch.load(weights_only=True)`: tensors and plain values
    only, so a file carrying pickled code is refused (RunFolderError) without running it; so is a damaged one."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"nothing to resume in {path.parent} (no {path.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise RunFolderError(f"{path} holds {what}, not just tensors and numbers: refused, nothing in it was run. "
                             "A pomona training state never holds code; if you did not write this file, delete "
                             "it (the run's weights and run.json are unaffected)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RunFolderError(f"{path} is damaged ({first_line(e)}); the run cannot be resumed from it") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunFolderError(f"{path} is not a pomona training state (missing {', '.join(missing)})")
    return state


def load_resumable_state(run_dir: str | Path) -> dict:
    """last.pt of an interrupted run, checked against its run.json (when one was written: the same classes in the
    same order)."""
    run_dir = Path(run_dir)
    state = load_training_state(run_dir / TRAINING_STATE)
    if (run_dir / RUN_INFO).is_file():
        classes = read_run_info(run_dir)["classes"]
        if classes != state["classes"]:
            raise class_mismatch(TRAINING_STATE, state["classes"], classes)
    return state


# ------------------------------------------------------------------------------------------------ reading
def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def read_json_file(path: str | Path, what: str = "") -> dict:
    """A JSON object from a run folder's file; RunFolderError (not a traceback) for an empty, truncated or broken
    file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        state = "empty" if not path.read_bytes().strip() else f"not valid JSON ({e.msg} at line {e.lineno})"
        raise RunFolderError(f"{path} is {state}: the file is damaged{what}") from None
    except UnicodeDecodeError:
        raise RunFolderError(f"{path} is not a text file: the file is damaged{what}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} does not hold a JSON object: the file is damaged{what}")
    return data


def read_run_info(run_dir: str | Path, check: bool = True) -> dict:
    """run.json of a finished run, checked for shape (unless `check` is off: what a report shows of it), with
    `members` and `temperature` filled in for older run folders."""
    path = Path(run_dir) / RUN_INFO
    if not Path(run_dir).exists():
        raise RunFolderError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a finished pomona run (no {RUN_INFO})")
    info = read_json_file(path, " (retrain, or restore it from a copy)")
    info.setdefault("members", [WEIGHTS])
    info.setdefault("temperature", 1.0)
    if not check:
        return info
    classes = info.get("classes")
    problems = []
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        problems.append("'classes' must list at least two class names")
    elif len(set(classes)) != len(classes):
        problems.append(f"'classes' repeats a name: {classes}")
    for key in ("preprocessing", "model"):
        if not isinstance(info.get(key), dict):
            problems.append(f"'{key}' is missing")
    members = info["members"]
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)) or \
            any(Path(m).is_absolute() or ".." in Path(m).parts for m in members):
        problems.append("'members' must list weight files inside the run folder")
    if not isinstance(info["temperature"], (int, float)) or not info["temperature"] > 0:
        problems.append("'temperature' must be a positive number")
    if problems:
        raise RunFolderError(f"{path}: " + "; ".join(problems))
    return info


def copy_run_info(run_dir: str | Path, out_dir: str | Path) -> Path:
    """run.json of `run_dir` written into `out_dir` (so that an export folder alone can be served)."""
    return write_json(Path(out_dir) / RUN_INFO, read_run_info(run_dir))


def member_paths(run_dir: str | Path, info: dict | None = None) -> list[Path]:
    info = info or read_run_info(run_dir)
    return [Path(run_dir) / m for m in info["members"]]


_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file (remembered per path, size and modification time, so one load hashes once)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def member_digests(run_dir: str | Path, info: dict) -> list[str | None]:
    """Each member's SHA-256: of its file when present, else the one run.json records (None when neither)."""
    recorded = info.get("member_sha256") or [None] * len(info["members"])
    return [sha256_file(p) if p.is_file() else r for p, r in zip(member_paths(run_dir, info), recorded)]


def weights_sha256(run_dir: str | Path, info: dict | None = None) -> str | None:
    """The identity of a run's weights: the SHA-256 of model.safetensors for one member, else of the members'
    digests and the temperature (what an export must match to be used). Without the weights files (an export
    folder) it comes from run.json's `member_sha256`; None when that is missing too."""
    info = info or read_run_info(run_dir)
    digests = member_digests(run_dir, info)
    if any(d is None for d in digests):
        return None
    if len(digests) == 1 and float(info["temperature"]) == 1.0:
        return digests[0]
    parts = digests + [repr(float(info["temperature"]))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def class_mismatch(where: str, theirs, classes: list[str]) -> RunFolderError:
    return RunFolderError(f"run.json lists the classes {classes} but {where} has {theirs}: one of them was edited "
                          "or reordered, and predictions would carry wrong labels. Restore the file, or retrain")


def verify_weights(run_dir: str | Path, info: dict) -> None:
    """Check every member's weights file that is present against run.json: the SHA-256 it records, a readable
    safetensors header, the classes in the file's metadata, and as many outputs as classes. RunFolderError
    naming the file otherwise."""
    from safetensors import safe_open

    classes = info["classes"]
    recorded = info.get("member_sha256") or [None] * len(info["members"])
    for path, digest in zip(member_paths(run_dir, info), recorded):
        if not path.is_file():
            continue
        if digest is not None and sha256_file(path) != digest:
            raise RunFolderError(f"{path} does not match the SHA-256 that {RUN_INFO} records for it: the weights "
                                 "were damaged or replaced. Restore the file, or retrain")
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                heads = sorted((k for k in f.keys() if re.fullmatch(r"head\.\d+\.weight", k)),
                               key=lambda k: int(k.split(".")[1]))
                outputs = f.get_slice(heads[-1]).get_shape()[0] if heads else None
        except Exception as e:  # safetensors raises its own error types for truncated or broken files
            raise RunFolderError(f"{path} is not a readable safetensors file ({first_line(e)}): the weights are "
                                 "damaged or truncated. Restore the file, or retrain") from None
        if CLASSES_METADATA in metadata and json.loads(metadata[CLASSES_METADATA]) != classes:
            raise class_mismatch(path.name, json.loads(metadata[CLASSES_METADATA]), classes)
        if outputs is not None and outputs != len(classes):
            raise RunFolderError(f"run.json lists {len(classes)} classes but {path} has {outputs} outputs: run.json "
                                 "does not belong to these weights. Restore it, or retrain")


def read_export_info(run_dir: str | Path) -> dict:
    """export.json of a run folder (one entry per exported format), or {} when nothing was exported."""
    path = Path(run_dir) / EXPORT_INFO
    return read_json_file(path, "; export again") if path.is_file() else {}


def read_split(run_dir: str | Path):
    """split.csv of a run (path, label, group, subset of every image), or None for a folder without one (an
    export folder)."""
    import pandas as pd

    path = Path(run_dir) / SPLIT_FILE
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None
