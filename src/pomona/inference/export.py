"""`pomona export`: a run's best model as ONNX (for the ONNX Runtime engine), int8 ONNX, bf16 PyTorch or
TorchScript, checked against PyTorch fp32 before it is used.

The export goes into the run folder (or `out`) as `model.onnx` / `model.int8.onnx` / `model.torchscript.pt`
(torch-bf16 writes no file), with `export.json` beside it: per format the file, the SHA-256 of the weights it
came from, the SHA-256 of the file itself, the classes, the preprocessing and the check against PyTorch fp32:

- fp32 formats (onnx, torchscript): max |exported - PyTorch| over the logits of seeded batches, refused above
  the tolerance;
- low-precision formats (onnx-int8, torch-bf16): `parity` on held-out photos (the held-out rows of the run's
  split.csv, or `parity_data`; never a photo any model of the run trained on, and at least PARITY_MIN_PHOTOS of
  them, with a recorded and printed warning below PARITY_PHOTOS): top-1 agreement with fp32, macro-F1 of both and
  its difference, max |probability difference|, and whether it `passed` the gate of `loaded.parity_passes`.
  A failing export is kept (it can be forced with `--engine`) but `--engine auto` does not use it. onnx-int8 is
  quantised statically with activation ranges calibrated on the run's training photos, the layers it hurts most
  left in float when needed (`quantize.quantize_with_sweep`). Every export is timed (img/s in export.json), and
  `--engine auto` uses the fastest that passes (`export_auto`: what `pomona export` does without --format).

When `out` is another folder, `run.json` is copied there too, so that folder alone can be served or used with
`predict`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.atomic import atomic_write, write_json
from ..core.errors import PomonaError
from ..data.preprocessing import Preprocessing
from ..models.metrics import macro_f1
from .engine import OnnxEngine, cpu_supports_bf16, iter_batches, softmax
from .loaded import PARITY_MIN_PHOTOS, PARITY_PHOTOS, find_current_export, load_run, parity_passes
from .onnx_io import export_onnx
from .quantize import quantize_with_sweep, training_views
from .runfolder import (CLASSES_METADATA, EXPORT_FILES, EXPORT_INFO, RunFolderError, copy_run_info, member_paths,
                        read_json_file, read_run_info, read_split, sha256_file, weights_sha256)

FORMATS = ("auto", "onnx", "onnx-int8", "torch-bf16", "torchscript")
LOW_PRECISION = ("onnx-int8", "torch-bf16")


class ExportError(PomonaError, RuntimeError):
    """The exported model does not reproduce the PyTorch model (or could not be written)."""


@dataclass
class ExportResult:
    format: str
    path: str
    max_abs_diff: float | None
    tolerance: float | None
    argmax_agree: bool | None
    batch_sizes: tuple[int, ...]
    opset: int | None
    source_sha256: str
    parity: dict | None = None
    """Low-precision formats: agreement with fp32 on held-out photos (`measure_parity`)."""
    passed: bool | None = None
    """Low-precision formats: whether `parity` passes the gate of `--engine auto`."""
    details: dict = field(default_factory=dict)
    """How it was made (onnx-int8: calibration photos, nodes left in float, seconds)."""
    file_sha256: str = ""
    """SHA-256 of the exported file (checked whenever it is loaded)."""


def create_check_batch(pre: Preprocessing, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded batch shaped like real inputs (normalised pixels are roughly standard normal)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, pre.input_size, pre.input_size, generator=g)


def export_torchscript_file(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """Trace and freeze `model` (batch size stays free: EfficientNet has no batch-dependent shapes)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
        torch.jit.save(traced, str(path))


def compare_logits(reference: torch.nn.Module, run_exported, batches: list[torch.Tensor]) -> tuple[float, bool]:
    """Max |exported - reference| over the logits of every batch, and whether the top class always agrees."""
    worst, agree = 0.0, True
    with torch.no_grad():
        for x in batches:
            ref = reference(x).numpy()
            got = np.asarray(run_exported(x))
            worst = max(worst, float(np.abs(ref - got).max()))
            agree &= bool((ref.argmax(1) == got.argmax(1)).all())
    return worst, agree


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, opset: int = 17,
               tolerance: float = 1e-3, threads: int | None = None, calibration: int = 64,
               parity_data: str | Path | None = None) -> ExportResult:
    """Export the best model of `run_dir` as `fmt`. fp32 formats are verified against PyTorch (batches of 1 and 5;
    ExportError, leaving nothing behind, when the logits differ by more than `tolerance`); low-precision formats
    get their parity with fp32 on held-out photos recorded (see the module's docstring)."""
    if fmt not in FORMATS or fmt == "auto":
        raise ExportError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS[1:])} (or export_auto)")
    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt in LOW_PRECISION:
        result = export_low_precision(run_dir, fmt, out_dir, opset, tolerance, threads, calibration, parity_data)
        write_export_info(out_dir, result, read_run_info(run_dir))
        if out_dir.resolve() != run_dir.resolve():
            copy_run_info(run_dir, out_dir)
        return result
    run = load_run(run_dir, "cpu", engine="torch")
    model = run.module.float().eval()  # the model itself, or the members averaged at the run's temperature
    info = run.info
    batch_sizes = (1, 5)
    batches = [create_check_batch(run.preprocessing, n, seed=n) for n in batch_sizes]
    path = out_dir / EXPORT_FILES[fmt]
    checked: dict = {}

    def write_checked(tmp: str) -> None:
        """Write the export to `tmp` and compare it with PyTorch; refused (nothing kept) beyond the tolerance."""
        if fmt == "onnx":
            export_onnx(model, batches[0], tmp, opset, metadata={
                CLASSES_METADATA: json.dumps(info["classes"]),
                "pomona.preprocessing": json.dumps(info["preprocessing"]),
                "pomona.model": json.dumps(info["model"])})
            engine = OnnxEngine(tmp, threads)
            diff, agree = compare_logits(model, lambda x: engine.logits(x.numpy()), batches)
            checked["img_s"] = images_per_second(engine.logits, create_check_batch(run.preprocessing,
                                                                                   SPEED_BATCH).numpy())
        else:
            export_torchscript_file(model, batches[0], tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                loaded = torch.jit.load(tmp, map_location="cpu")
            diff, agree = compare_logits(model, lambda x: loaded(x).numpy(), batches)
        if not diff <= tolerance:
            raise ExportError(f"{fmt} export of {run_dir} disagrees with PyTorch: max |logit difference| "
                              f"{diff:.2e} > tolerance {tolerance:.0e}; nothing was written")
        checked.update(diff=diff, agree=agree)

    atomic_write(path, write_checked)
    result = ExportResult(fmt, path.name, checked["diff"], tolerance, checked["agree"], batch_sizes,
                          opset if fmt == "onnx" else None, weights_sha256(run_dir, info),
                          details={"img_s": checked["img_s"]} if "img_s" in checked else {},
                          file_sha256=sha256_file(path))
    write_export_info(out_dir, result, info)
    if out_dir.resolve() != run_dir.resolve():
        copy_run_info(run_dir, out_dir)
    return result


SPEED_BATCH = 32
"""Images per call when an export's speed is measured (img/s in export.json, which `--engine auto` compares)."""


def images_per_second(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, calls: int = 3) -> float:
    """Throughput of `fn` on the batch `x`: the best of `calls` timed calls after one warm-up call (other jobs on
    the machine only ever slow a call down)."""
    fn(x)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def export_auto(run_dir: str | Path, out: str | Path | None = None, opset: int = 17, tolerance: float = 1e-3,
                threads: int | None = None, calibration: int = 64, parity_data: str | Path | None = None,
                ) -> list[ExportResult]:
    """`pomona export` with no --format: every CPU engine this machine can run, each timed (img/s in export.json)
    and the low-precision ones checked for parity with fp32: ONNX fp32, int8 ONNX, and bf16 PyTorch where the
    CPU computes bf16 natively. `--engine auto` then uses the fastest whose parity passes."""
    formats = ["onnx", "onnx-int8"] + (["torch-bf16"] if cpu_supports_bf16() else [])
    return [export_run(run_dir, fmt, out, opset, tolerance, threads, calibration, parity_data) for fmt in formats]


def describe_export(result: ExportResult, out: Path, chosen: bool = False) -> str:
    """What `pomona export` prints for one format: the check against fp32 and, with `chosen` (after the last format
    of `export_auto`), which engine `--engine auto` now uses and the speeds it chose by."""
    if result.parity is None:
        text = (f"wrote {out / result.path}: max |{result.format} - PyTorch| logit difference "
                f"{result.max_abs_diff:.2e} (tolerance {result.tolerance:.0e}; batches {list(result.batch_sizes)}; "
                f"top class agrees: {result.argmax_agree}); classes and preprocessing in {out / EXPORT_INFO}")
    else:
        p, floats = result.parity, result.details.get("float_layers")
        what = f"wrote {out / result.path}" if result.path else f"{result.format} (PyTorch, no file)"
        text = (f"{what}: parity with fp32 on {p['n']} held-out photos ({p['photos']}): top-1 agreement "
                f"{p['top1_agreement']:.1%}, macro-F1 {p['macro_f1']:.4f} vs {p['macro_f1_fp32']:.4f} (difference "
                f"{p['macro_f1_diff']:+.4f}), max |probability difference| {p['max_prob_diff']:.4f}"
                + (f"; left in float by the sensitivity sweep: {', '.join(floats)}" if floats else "") + "; "
                + ("passes: `--engine auto` may use it" if result.passed else
                   "FAILS the gate (top-1 agreement >= 99%, |macro-F1 difference| <= 0.005): `--engine auto` will "
                   "not use it") + f"; recorded in {out / EXPORT_INFO}")
    if chosen:
        from .loaded import choose_engine

        speeds = {f: e.get("details", {}).get("img_s") for f, e in read_json_file(out / EXPORT_INFO).items()}
        text += (f"\n--engine auto (predict, serve) now uses {choose_engine(out, 'auto')}: the fastest engine whose "
                 "parity passes (" + ", ".join(f"{f} {v:.0f} img/s" for f, v in speeds.items() if v)
                 + "; batches of 32 on this machine)")
    return text


def write_export_info(out_dir: Path, result: ExportResult, info: dict) -> Path:
    """Add this format's entry to export.json (other formats' entries are kept)."""
    path = out_dir / EXPORT_INFO
    try:
        data = read_json_file(path) if path.is_file() else {}
    except RunFolderError:  # a damaged export.json is replaced
        data = {}
    data[result.format] = {**asdict(result), "classes": info["classes"], "preprocessing": info["preprocessing"],
                           "torch_version": torch.__version__,
                           "onnxruntime_version": _onnxruntime_version() if "onnx" in result.format else None}
    return write_json(path, data)


# ------------------------------------------------------------------------------------------------ low precision
def held_out_photos(run_dir: Path, classes: list[str], parity_data: str | Path | None = None,
                    ) -> tuple[list[str], np.ndarray, str]:
    """The labelled photos parity is measured on, their class indices and where they came from: `parity_data` (a
    folder per class; refused when it holds any photo a model of the run trained on), else the held-out rows of
    the run's split.csv (validation and test: never a 'train' row). All of them are used; fewer than
    PARITY_MIN_PHOTOS are refused (ExportError naming --parity-data)."""
    training = training_photos(run_dir)
    if parity_data:
        from ..data.index import index_folder

        table, source = index_folder(parity_data), f"--parity-data {parity_data}"
        seen = same_photos(list(table["path"]), training)
        if seen:
            raise ExportError(f"--parity-data {parity_data} holds {len(seen)} of the run's training photos (e.g. "
                              f"{seen[0]}): parity with fp32 is measured on held-out photos only; remove them, or "
                              "give another folder")
    else:
        split = read_split(run_dir)
        table = split[split["subset"] != "train"] if split is not None else split
        if table is not None:  # a photo listed as training photo too (of the run or a member) is not held out
            trained = {_resolved(p) for p in training}
            table = table[[_resolved(p) not in trained for p in table["path"]]]
        if table is None or not len(table):
            raise ExportError(f"{run_dir} has no held-out photos in split.csv to measure parity with fp32 on; give "
                              f"--parity-data FOLDER (one sub-folder per class, {PARITY_PHOTOS} or more photos the "
                              "run never trained on)")
        source = "the run's held-out photos (split.csv: " + ", ".join(sorted(set(table["subset"]))) + ")"
    if len(table) < PARITY_MIN_PHOTOS:
        raise ExportError(f"parity with fp32 needs at least {PARITY_MIN_PHOTOS} held-out photos, and {source} has "
                          f"{len(table)}: give --parity-data FOLDER (one sub-folder per class, {PARITY_PHOTOS} or "
                          "more photos the run never trained on)")
    unknown = sorted(set(table["label"]) - set(classes))
    if unknown:
        raise ExportError(f"parity photos of classes the model does not know: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    return list(table["path"]), np.array([index[c] for c in table["label"]], dtype=np.int64), source


def training_photos(run_dir: Path) -> list[str]:
    """Every photo a model of the run trained on: the 'train' rows of the split.csv of the run and of each
    member's folder (a --folds run's fold models, whose training folds together hold all its photos)."""
    folders = {Path(run_dir), *(p.parent for p in member_paths(run_dir))}
    splits = [read_split(folder) for folder in sorted(folders)]
    return sorted({p for split in splits if split is not None for p in split.loc[split["subset"] == "train", "path"]})


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def same_photos(candidates: Sequence[str], training: Sequence[str]) -> list[str]:
    """The `candidates` that are training photos: the same file (after links), or a copy of one (same bytes;
    only files of equal size are hashed)."""
    trained = {_resolved(p) for p in training}
    sizes: dict[int, list[str]] = {}
    for p in training:
        if Path(p).is_file():
            sizes.setdefault(Path(p).stat().st_size, []).append(p)
    found = []
    for p in candidates:
        size = Path(p).stat().st_size if Path(p).is_file() else None
        if _resolved(p) in trained or any(sha256_file(p) == sha256_file(t) for t in sizes.get(size, [])):
            found.append(p)
    return found


def calibration_photos(run_dir: Path, n: int) -> list[str]:
    """Up to `n` training photos of the run (split.csv), spread evenly over its classes and files."""
    split = read_split(run_dir)
    if split is None or not (split["subset"] == "train").any():
        raise ExportError(f"onnx-int8 calibrates on the run's training photos, and {run_dir} has no split.csv")
    train = split[split["subset"] == "train"].sort_values(["label", "path"])
    picks = np.unique(np.linspace(0, len(train) - 1, num=min(n, len(train))).round().astype(int))
    return list(train["path"].iloc[picks])


def held_out_batches(paths: Sequence[str], pre: Preprocessing, max_pixels: int, batch_size: int = 32,
                     ) -> list[tuple[list[int], np.ndarray]]:
    """The readable parity photos, decoded and preprocessed once: (indices into `paths`, batch) pairs."""
    return [(indices, x) for indices, x, _ in iter_batches(paths, pre, max_pixels, batch_size) if x is not None]


def measure_parity(reference: list[np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                   batches: list[tuple[list[int], np.ndarray]], labels: np.ndarray, n_paths: int) -> dict:
    """Agreement of `candidate` (preprocessed batch -> logits) with the `reference` logits of each of the
    `held_out_batches`, one view, on labelled photos: top-1 agreement, macro-F1 of each on the labels and the
    difference, max |probability difference|, and a `warning` when fewer than PARITY_PHOTOS could be read
    (ExportError below PARITY_MIN_PHOTOS; `n_paths` photos were given)."""
    kept = [i for indices, _ in batches for i in indices]
    if len(kept) < PARITY_MIN_PHOTOS:
        raise ExportError(f"only {len(kept)} of the {n_paths} parity photos could be read; parity with fp32 needs "
                          f"at least {PARITY_MIN_PHOTOS}: give --parity-data FOLDER")
    ref = np.concatenate([softmax(np.asarray(r, dtype=np.float64)) for r in reference])
    new = np.concatenate([softmax(np.asarray(candidate(x), dtype=np.float64)) for _, x in batches])
    y = labels[kept]
    f1_ref, f1_new = macro_f1(y, ref.argmax(1)), macro_f1(y, new.argmax(1))
    parity = {"n": len(kept), "top1_agreement": float((ref.argmax(1) == new.argmax(1)).mean()),
              "macro_f1_fp32": f1_ref, "macro_f1": f1_new, "macro_f1_diff": f1_new - f1_ref,
              "max_prob_diff": float(np.abs(ref - new).max())}
    if len(kept) < PARITY_PHOTOS:
        parity["warning"] = (f"parity measured on only {len(kept)} held-out photos (fewer than {PARITY_PHOTOS}): one "
                             f"photo moves top-1 agreement by {1 / len(kept):.1%}; give --parity-data FOLDER with "
                             f"{PARITY_PHOTOS} or more photos the run never trained on")
    return parity


def export_low_precision(run_dir: Path, fmt: str, out_dir: Path, opset: int, tolerance: float,
                         threads: int | None, calibration: int, parity_data: str | Path | None) -> ExportResult:
    """onnx-int8 (model.int8.onnx) or torch-bf16 (no file), with its parity against PyTorch fp32."""
    run = load_run(run_dir, "cpu", engine="torch")
    model = run.module.float().eval()
    pre, info = run.preprocessing, run.info
    paths, labels, source = held_out_photos(run_dir, run.classes, parity_data)

    def fp32(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

    held = held_out_batches(paths, pre, run.max_pixels)  # decoded once, fp32 run once, whatever is compared
    reference = [fp32(x) for _, x in held]

    def parity_of(candidate: Callable[[np.ndarray], np.ndarray]) -> dict:
        return {**measure_parity(reference, candidate, held, labels, len(paths)), "photos": source}

    start = time.perf_counter()
    details: dict = {}
    if fmt == "torch-bf16":
        def bf16(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

        parity, path_name = parity_of(bf16), None
        details["cpu_bf16_native"] = cpu_supports_bf16()
        details["img_s"] = images_per_second(bf16, create_check_batch(pre, SPEED_BATCH).numpy())
    else:
        fp32_onnx, _ = find_current_export(out_dir, "onnx") if (out_dir / EXPORT_INFO).is_file() else (None, "")
        if fp32_onnx is None:
            export_run(run_dir, "onnx", out_dir, opset, tolerance, threads)
            fp32_onnx = out_dir / EXPORT_FILES["onnx"]
        photos = calibration_photos(run_dir, 2 * calibration)
        calib = [x for _, x, _ in iter_batches(photos[::2], pre, run.max_pixels, 16) if x is not None]
        probe = training_views(photos[1::2], pre, info, run.max_pixels, views=4)
        details["calibration_photos"] = int(sum(len(b) for b in calib))
        details["sweep_views"] = int(sum(len(b) for b in probe))

        def quantize(tmp: str) -> None:
            details.update(quantize_with_sweep(fp32_onnx, tmp, calib, probe, threads))
            engine = OnnxEngine(tmp, threads)
            details["parity"] = parity_of(engine.logits)
            if not details["float_layers"] and not parity_passes({"parity": details["parity"]})[0]:
                # every layer in int8 agreed on the training views but fails on held-out photos: sweep (the
                # layers are chosen on the training views; the held-out photos only say that it is needed)
                details["parity_all_int8"] = details["parity"]
                details.update(quantize_with_sweep(fp32_onnx, tmp, calib, probe, threads, sweep=True))
                engine = OnnxEngine(tmp, threads)
                details["parity"] = parity_of(engine.logits)
            details["img_s"] = images_per_second(engine.logits, create_check_batch(pre, SPEED_BATCH).numpy())

        atomic_write(out_dir / EXPORT_FILES[fmt], quantize)
        parity, path_name = details.pop("parity"), EXPORT_FILES[fmt]
    details["seconds"] = time.perf_counter() - start
    return ExportResult(fmt, path_name or "", None, None, None, (), opset if fmt == "onnx-int8" else None,
                        weights_sha256(run_dir, info), parity, parity_passes({"parity": parity})[0], details,
                        file_sha256=sha256_file(out_dir / path_name) if path_name else "")


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
