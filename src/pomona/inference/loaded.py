"""A finished run, loaded to predict: which engine runs it (`choose_engine`: on the CPU the fastest up-to-date
export whose recorded parity with fp32 passes the gate, `parity_passes`), `LoadedRun` and `load_run`. The run
folder's files are read through `pomona.inference.runfolder`, which checks them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..config import MAX_ASPECT
from ..data.preprocessing import Preprocessing
from ..models.model import CPU_MICRO_BATCH, create_model, forward_in_slices, resolve_device
from ..models.tta import average_probs, views_for
from .engine import EngineError, OnnxEngine, Predictions, cpu_supports_bf16, predict_paths, softmax
from .onnx_io import onnxruntime_available
from .runfolder import (CLASSES_METADATA, EXPORT_FILES, EXPORT_INFO, RUN_INFO, RunFolderError, class_mismatch,
                        first_line, member_paths, read_export_info, read_run_info, sha256_file, verify_weights,
                        weights_sha256)

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
        raise class_mismatch(EXPORT_INFO, exported["classes"], info["classes"])
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
        exported = read_export_info(run_dir) if usable else {}
        speeds = {e: (exported.get(e, {}).get("details") or {}).get("img_s") for e in usable}
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
                                         f"{len(self.classes)} classes): {first_line(e)}") from None
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
    (image and left-right flip), False, a list of views (see `pomona.models.tta`), or None = as the run was trained."""
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
            raise class_mismatch(f"the metadata of {name}", json.loads(meta[CLASSES_METADATA]), info["classes"])
    return run
