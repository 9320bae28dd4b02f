"""Backbone features of a list of photos: the pooled features of a frozen backbone under the evaluation
preprocessing (seen through a test-time view), computed in batches with ONNX Runtime (CPU) or PyTorch. The
frozen-feature fast path caches them (`pomona.training.features`); the probe that initialises the head before
fine-tuning (`train --head-init probe`) trains on them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.progress import Progress, write
from ..data.preprocessing import Preprocessing, create_eval_transform
from ..inference.onnx_io import export_onnx, onnx_session, onnxruntime_available
from ..models.tta import apply_view
from .datasets import DecodedImages, ImageDataset


def resolve_engine(engine: str, device: torch.device) -> str:
    """auto -> onnx on CPU when onnxruntime is installed, else torch."""
    if engine not in ("auto", "onnx", "torch"):
        raise ValueError(f"unknown feature engine {engine!r}: auto, onnx or torch")
    if engine == "auto":
        return "onnx" if device.type == "cpu" and onnxruntime_available() else "torch"
    return engine


def create_extractor(backbone: nn.Module, pre: Preprocessing, engine: str, device: torch.device,
                     workdir: Path) -> tuple[Callable[[torch.Tensor], np.ndarray], str]:
    """A function batch -> pooled features, on ONNX Runtime (exported once) or PyTorch; falls back to PyTorch,
    with a message, when the ONNX export or session fails."""
    backbone = backbone.eval()
    if engine == "onnx":
        try:
            path = export_onnx(backbone.cpu(), torch.zeros(2, 3, pre.input_size, pre.input_size),
                               workdir / "backbone.onnx", input_name="x", output_name="features")
            session = onnx_session(path)
            return (lambda x: session.run(None, {"x": x.numpy()})[0]), "onnx"
        except Exception as e:  # exporter and runtime raise many types
            write(f"ONNX Runtime unavailable for this backbone ({type(e).__name__}: {str(e)[:200]}); using PyTorch")
    model = backbone.to(device).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    return run, "torch"


def extract_features(extract: Callable[[torch.Tensor], np.ndarray], paths: list[str], images: DecodedImages,
                     pre: Preprocessing, batch_size: int = 8, view: str = "identity", desc: str = "features",
                     ) -> np.ndarray:
    """Features of `paths` under the validation preprocessing, seen through a test-time `view`. Batches of 8 are
    as fast as 32 on the CPU (PyTorch and ONNX Runtime) and hold a quarter of the activations; ONNX Runtime's
    arena keeps the largest batch's memory until its session ends (benchmarks/memory.py)."""
    loader = DataLoader(ImageDataset(paths, None, images, create_eval_transform(pre)), batch_size=batch_size)
    out = [extract(apply_view(x, view).contiguous()) for x, _ in Progress(loader, desc=desc, unit="batch",
                                                                           count=lambda batch: len(batch[1]))]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
