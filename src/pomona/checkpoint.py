"""Run folders: the one place that writes and reads `run.json`, model weights and the resumable training state,
and `load_run`, which gives a finished run ready to predict.

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

Every file is written atomically (`pomona.atomic`). `check_new_run_folder` / `clear_run_folder` guard an existing
run against being replaced by a new one (`pomona train --out` without `--overwrite`). This module never imports
training (train, data, balance, tune, distributed): serving, export and predict read runs through it alone.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write, write_json
from .config import MAX_ASPECT
from .engine import EngineError, OnnxEngine, Predictions, cpu_supports_bf16, predict_paths, softmax
from .errors import PomonaError
from .model import CPU_MICRO_BATCH, create_model, forward_in_slices, resolve_device
from .onnx_io import onnxruntime_available
from .preprocessing import Preprocessing
from .tta import average_probs, views_for

RUN_INFO = "run.json"
WEIGHTS = "model.safetensors"
TRAINING_STATE = "last.pt"
PROBE_WEIGHTS = "probe.safetensors"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
EXPORT_INFO = "export.json"
SPLIT_FILE = "split.csv"
EXPORT_FILES = {"onnx": ONNX_FILE, "onnx-int8": ONNX_INT8_FILE, "torchscript": TORCHSCRIPT_FILE, "torch-bf16": None}
"""What `pomona export --format F` writes into a run folder (torch-bf16: no file, only its parity in export.json)."""
ENGINES = ("auto", "onnx", "onnx-int8", "torch", "torch-bf16")
AUTO_ENGINES = ("onnx-int8", "torch-bf16", "onnx")
"""The CPU engines `--engine auto` tries, fastest first (benchmarks/inference.py); a low-precision one only when
its recorded parity passes (`parity_passes`), else the next; PyTorch fp32 when none can be used."""
PARITY_MIN_TOP1_AGREEMENT = 0.99
"""A low-precision engine's top-1 must agree with fp32 on at least this fraction of held-out photos ..."""
PARITY_MAX_MACRO_F1_DIFF = 0.005
"""... and its macro-F1 on them may differ from fp32's by at most this much ..."""
PARITY_MIN_PHOTOS = 20
"""... measured on at least this many held-out photos (never the run's training photos): with fewer, one photo
moves the agreement by more than the gate's margin, and the export refuses to measure."""
PARITY_PHOTOS = 200
"""The held-out photos parity should be measured on: with fewer (but at least PARITY_MIN_PHOTOS) all are used, and
the parity records and prints a warning."""
CLASSES_METADATA = "pomona.classes"
"""Key of the class list in the safetensors metadata of weights files and in the ONNX metadata of exports."""
RUN_FILES = ("config.json", "split.csv", "bad_images.json", "balance.json", "history.csv", RUN_INFO, WEIGHTS,
             TRAINING_STATE, ONNX_FILE, ONNX_INT8_FILE, TORCHSCRIPT_FILE, EXPORT_INFO, "report.html", "members", "eval", "folds",
             "folds.csv", "oof.csv", "cv.json", "probe.safetensors", "test", "val_probs.npy",
             "teacher", "pseudo_labels.csv", "groups.csv", "groups.json")
"""What a training run writes (and its evaluation, test score, report and exports): what `--overwrite` removes."""
RUN_FOLDER_PATTERN = re.compile(r"student-\d+")
"""... and the folders of a self-trained run's intermediate students (student-1, student-2, ...: one per round)."""
_KEPT_PARTS: ContextVar[frozenset] = ContextVar("pomona_kept_run_parts", default=frozenset())
RUN_MARKERS = ("config.json", RUN_INFO, TRAINING_STATE, "split.csv")
"""Files that make a folder a pomona run folder."""


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
        raise RunFolderError(f"{path} is damaged ({_first_line(e)}); the run cannot be resumed from it") from None
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
            raise _class_mismatch(TRAINING_STATE, state["classes"], classes)
    return state


# ------------------------------------------------------------------------------------------------ reading
def _first_line(error: BaseException) -> str:
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


def _class_mismatch(where: str, theirs, classes: list[str]) -> RunFolderError:
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
            raise RunFolderError(f"{path} is not a readable safetensors file ({_first_line(e)}): the weights are "
                                 "damaged or truncated. Restore the file, or retrain") from None
        if CLASSES_METADATA in metadata and json.loads(metadata[CLASSES_METADATA]) != classes:
            raise _class_mismatch(path.name, json.loads(metadata[CLASSES_METADATA]), classes)
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


def find_current_export(run_dir: str | Path, fmt: str = "onnx") -> tuple[Path | None, str]:
    """The exported model file of `run_dir` (for torch-bf16, which writes none: export.json) when it exists and
    matches the run's current weights, else None and the reason."""
    run_dir = Path(run_dir)
    name = EXPORT_FILES[fmt]
    path = run_dir / (name or EXPORT_INFO)
    if not path.is_file():
        return None, f"no {path.name} in {run_dir} (run `pomona export {run_dir} --format {fmt}`)"
    if not (run_dir / EXPORT_INFO).is_file():
        return None, f"{path} has no {EXPORT_INFO} beside it; export again"
    exported = read_export_info(run_dir).get(fmt)
    if exported is None:
        return None, f"{EXPORT_INFO} in {run_dir} has no {fmt} entry (run `pomona export {run_dir} --format {fmt}`)"
    info = read_run_info(run_dir)
    current = weights_sha256(run_dir, info)
    if current is not None and exported.get("source_sha256") != current:
        return None, f"{path if name else fmt + ' in ' + str(run_dir)} was exported from other weights than the " \
                     f"run's; export again"
    if exported.get("file_sha256") and exported["file_sha256"] != sha256_file(path):
        return None, f"{path} was changed after it was exported (its SHA-256 differs from {EXPORT_INFO}); export again"
    if "classes" in exported and exported["classes"] != info["classes"]:
        raise _class_mismatch(EXPORT_INFO, exported["classes"], info["classes"])
    return path, ""


def parity_passes(entry: dict) -> tuple[bool, str]:
    """Whether a low-precision export's recorded parity with fp32 (export.json) passes the gate: top-1 agreement
    >= PARITY_MIN_TOP1_AGREEMENT and |macro-F1 difference| <= PARITY_MAX_MACRO_F1_DIFF on at least
    PARITY_MIN_PHOTOS held-out photos."""
    parity = entry.get("parity") or {}
    if not parity.get("n"):
        return False, "no parity measured on held-out photos"
    if parity["n"] < PARITY_MIN_PHOTOS:
        return False, (f"parity with fp32 was measured on only {parity['n']} photos (at least {PARITY_MIN_PHOTOS} "
                       "needed): export again with --parity-data FOLDER")
    agree, diff = parity["top1_agreement"], abs(parity["macro_f1_diff"])
    if agree < PARITY_MIN_TOP1_AGREEMENT or diff > PARITY_MAX_MACRO_F1_DIFF:
        return False, (f"parity with fp32 fails: top-1 agreement {agree:.3f} (>= {PARITY_MIN_TOP1_AGREEMENT}), "
                       f"|macro-F1 difference| {diff:.4f} (<= {PARITY_MAX_MACRO_F1_DIFF}) on {parity['n']} photos")
    return True, ""


def engine_usable(run_dir: str | Path, engine: str, device: torch.device | None = None,
                  gate: bool = True) -> tuple[bool, str]:
    """Whether `engine` can run `run_dir` on `device` (its export current, its package installed, its hardware
    there; with `gate`, a low-precision engine's recorded parity passing), else why not."""
    cpu = device is None or device.type == "cpu"
    if engine == "torch":
        return True, ""
    if engine == "torch-bf16":
        if cpu and not cpu_supports_bf16():
            return False, "this CPU has no native bfloat16 (avx512_bf16 or amx_bf16)"
    else:
        if not onnxruntime_available():
            return False, f"--engine {engine} needs `pip install onnxruntime`"
        if not cpu:
            return False, f"--engine {engine} runs on the CPU; use --device cpu or --engine torch"
    export, why = find_current_export(run_dir, engine)
    if export is None:
        return False, why
    if gate and engine != "onnx":
        return parity_passes(read_export_info(run_dir)[engine])
    return True, ""


def choose_engine(run_dir: str | Path, requested: str = "auto", device: torch.device | None = None) -> str:
    """The engine for `requested`: 'auto' = on the CPU the fastest usable engine of AUTO_ENGINES by the img/s each
    recorded when it was exported (else the first usable in that order; a low-precision engine only when its
    recorded parity with fp32 passes), else 'torch'; a named engine as asked (its parity is not
    checked: asking for it is the user's call), or EngineError when it cannot be used here."""
    if requested not in ENGINES:
        raise EngineError(f"unknown engine {requested!r}: choose from {', '.join(ENGINES)}")
    if requested == "auto":
        if device is not None and device.type != "cpu":
            return "torch"
        usable = [e for e in AUTO_ENGINES if engine_usable(run_dir, e, device)[0]]
        speeds = {e: (read_export_info(run_dir).get(e, {}).get("details") or {}).get("img_s") for e in usable}
        if usable and all(speeds.values()):  # each timed when exported: the fastest
            return max(usable, key=lambda e: speeds[e])
        return next(iter(usable), "torch")
    usable, why = engine_usable(run_dir, requested, device, gate=False)
    if not usable:
        raise EngineError(f"--engine {requested}: {why}")
    return requested


class MemberAverage(nn.Module):
    """The members of a run (and its temperature) as one module whose softmax is the run's probabilities: the log
    of the mean of the members' softmax(logits / temperature)."""

    def __init__(self, models: Sequence[nn.Module], temperature: float):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([(m(x).float() / self.temperature).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


@dataclass(eq=False)
class LoadedRun:
    """A finished run, loaded once and ready to predict: `predict(paths)` for photos, `predict_probs(batch)` for
    preprocessed float32 NCHW batches. Probabilities average the run's members and the test-time views, at the
    run's temperature, on ONNX Runtime (an up-to-date export, `engine='onnx'`) or PyTorch.

    `models` (the PyTorch members) are loaded on first use; the ONNX engine does not need them."""

    run_dir: Path
    info: dict
    device: torch.device
    engine_name: str = "torch"
    views: tuple[str, ...] = ("identity", "hflip")
    threads: int | None = None
    batch_size: int = 32
    _models: list = field(default_factory=list, repr=False)
    _module: nn.Module | None = field(default=None, repr=False)
    _onnx: OnnxEngine | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.info["preprocessing"])

    @property
    def temperature(self) -> float:
        return float(self.info["temperature"])

    @property
    def tta(self) -> bool:
        return len(self.views) > 1

    @property
    def max_pixels(self) -> int:
        return self.info.get("config", {}).get("data", {}).get("max_pixels", 64_000_000)

    @property
    def max_aspect(self) -> float:
        return self.info.get("config", {}).get("data", {}).get("max_aspect", MAX_ASPECT)

    @property
    def models(self) -> list:
        """The PyTorch model of every member, in eval mode on `device`."""
        if not self._models:
            m = self.info["model"]
            for path in member_paths(self.run_dir, self.info):
                if not path.is_file():
                    raise RunFolderError(f"{path}, named in {RUN_INFO}, is missing: the PyTorch engine needs it")
                model = create_model(m["name"], len(self.classes), m["out_features"], m["dropout"], weights="none",
                                     drop_path_rate=0.0)
                try:
                    model.load_state_dict(load_file(str(path)))
                except RuntimeError as e:
                    raise RunFolderError(f"{path} does not fit the model run.json describes ({m['name']}, "
                                         f"{len(self.classes)} classes): {_first_line(e)}") from None
                self._models.append(model.to(self.device).eval().to(memory_format=torch.channels_last))
        return self._models

    @property
    def model(self):
        """The first member (the model itself for a plain run): what Grad-CAM looks into."""
        return self.models[0]

    @property
    def module(self) -> nn.Module:
        """One PyTorch module whose softmax gives the run's probabilities for one view: the model itself for a
        plain run at temperature 1, else the members averaged at the temperature (what `pomona export` writes)."""
        if self._module is None:
            plain = len(self.models) == 1 and self.temperature == 1.0
            self._module = self.models[0] if plain else MemberAverage(self.models, self.temperature).eval()
        return self._module

    def predict_probs(self, x) -> np.ndarray:
        """Class probabilities (float32, N x classes) of a preprocessed batch (numpy or torch, N x 3 x H x W)."""
        if self._onnx is not None:
            x = np.asarray(x, dtype=np.float32)
            return average_probs(lambda v: softmax(self._onnx.logits(v)), x, self.views, together=True)
        module = self.module
        bf16 = self.engine_name == "torch-bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).to(self.device)
            t = t.contiguous(memory_format=torch.channels_last)
            size = CPU_MICRO_BATCH if self.device.type == "cpu" else 0  # as fast, a quarter of the memory
            return average_probs(lambda v: forward_in_slices(module, v, size).float().softmax(-1), t,
                                 self.views).cpu().numpy()

    def predict(self, paths: Sequence[str | Path], batch_size: int | None = None) -> Predictions:
        """Probabilities for photo files, in input order, each decoded once (in threads, while the model runs on
        the previous batch); unreadable files get a row of NaN and are listed in `bad`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="pomona-decode")
        paths = [str(p) for p in paths]
        probs, bad = predict_paths(self.predict_probs, paths, self.preprocessing, len(self.classes),
                                   self.max_pixels, batch_size or self.batch_size, pool=self._pool,
                                   max_aspect=self.max_aspect)
        return Predictions(paths, probs, self.classes, bad)


def load_run(run_dir: str | Path, device: str = "auto", engine: str = "auto", tta: bool | Sequence[str] | None = None,
             threads: int | None = None, batch_size: int = 32) -> LoadedRun:
    """A finished run folder, ready to predict (`from pomona import load_run`).

    `engine`: 'onnx' (ONNX Runtime on the run's model.onnx), 'onnx-int8' (model.int8.onnx), 'torch',
    'torch-bf16', or 'auto' (`choose_engine`: on the CPU the fastest up-to-date export whose parity passes). `tta`: True
    (image and left-right flip), False, a list of views (see `pomona.tta`), or None = as the run was trained."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    dev = resolve_device(device)
    if tta is None:
        tta = info.get("config", {}).get("train", {}).get("tta", True)
    verify_weights(run_dir, info)
    run = LoadedRun(run_dir, info, dev, choose_engine(run_dir, engine, dev), views_for(tta), threads, batch_size)
    if run.engine_name in ("onnx", "onnx-int8"):
        name = EXPORT_FILES[run.engine_name]
        run._onnx = OnnxEngine(run_dir / name, threads)
        meta = run._onnx.session.get_modelmeta().custom_metadata_map
        if CLASSES_METADATA in meta and json.loads(meta[CLASSES_METADATA]) != info["classes"]:
            raise _class_mismatch(f"the metadata of {name}", json.loads(meta[CLASSES_METADATA]), info["classes"])
    return run
