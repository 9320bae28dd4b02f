"""`pomona export`: a run's best model as ONNX (for the ONNX Runtime engine) or TorchScript, checked against
PyTorch before it is kept.

The export goes into the run folder (or `out`) as `model.onnx` / `model.torchscript.pt`, with `export.json`
beside it: per format the file and its SHA-256, the SHA-256 of the weights it came from, the classes, the
preprocessing and the parity check (max |exported - PyTorch| over the logits of a batch). When `out` is another
folder, `run.json` is copied there too, so that folder alone can be served or used with `predict`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, write_json
from .checkpoint import (CLASSES_METADATA, EXPORT_INFO, ONNX_FILE, TORCHSCRIPT_FILE, RunFolderError, copy_run_info,
                         load_run, read_json_file, sha256_file, weights_sha256)
from .engine import OnnxEngine
from .errors import PomonaError
from .onnx_io import export_onnx
from .preprocessing import Preprocessing

FORMATS = ("onnx", "torchscript")


class ExportError(PomonaError, RuntimeError):
    """The exported model does not reproduce the PyTorch model (or could not be written)."""


@dataclass
class ExportResult:
    format: str
    path: str
    max_abs_diff: float
    tolerance: float
    argmax_agree: bool
    batch_sizes: tuple[int, ...]
    opset: int | None
    source_sha256: str
    file_sha256: str = ""


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
               tolerance: float = 1e-3, threads: int | None = None) -> ExportResult:
    """Export the best model of `run_dir` as `fmt` and verify it against PyTorch (batches of 1 and 5);
    raises ExportError, leaving nothing behind, when the logits differ by more than `tolerance`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir, "cpu", engine="torch")
    model = run.module.float().eval()  # the model itself, or the members averaged at the run's temperature
    info = run.info
    batch_sizes = (1, 5)
    batches = [create_check_batch(run.preprocessing, n, seed=n) for n in batch_sizes]
    path = out_dir / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)
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
                          file_sha256=sha256_file(path))
    write_export_info(out_dir, result, info)
    if out_dir.resolve() != run_dir.resolve():
        copy_run_info(run_dir, out_dir)
    return result


def write_export_info(out_dir: Path, result: ExportResult, info: dict) -> Path:
    """Add this format's entry to export.json (other formats' entries are kept)."""
    path = out_dir / EXPORT_INFO
    try:
        data = read_json_file(path) if path.is_file() else {}
    except RunFolderError:  # a damaged export.json is replaced
        data = {}
    data[result.format] = {**asdict(result), "classes": info["classes"], "preprocessing": info["preprocessing"],
                           "torch_version": torch.__version__,
                           "onnxruntime_version": _onnxruntime_version() if result.format == "onnx" else None}
    return write_json(path, data)


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
