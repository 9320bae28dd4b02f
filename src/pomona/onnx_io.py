"""ONNX in one place: exporting a PyTorch module (`export_onnx`) and opening an ONNX Runtime CPU session on the
file (`onnx_session`). Used by `pomona export` / the inference engine and by the frozen-feature fast path."""

from __future__ import annotations

import warnings
from pathlib import Path


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model, example, path: str | Path, opset: int = 17, metadata: dict[str, str] | None = None,
                input_name: str = "input", output_name: str = "logits") -> Path:
    """Trace `model` on `example` to ONNX with a dynamic batch axis; `metadata` goes into its metadata_props."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about the TorchScript-based exporter
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[input_name],
                          output_names=[output_name], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    if metadata:
        import onnx

        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))
    return Path(path)


def onnx_session(path: str | Path, threads: int | None = None, spin: bool = False):
    """An ONNX Runtime CPU session, fully graph-optimised, sequential. `threads`: intra-op threads (None = one per
    core); `spin`: let idle threads busy-wait, only worth it when nothing else runs between calls -- idle
    spinning threads steal the cores that decode the next batch (measured on 2 cores: files->probabilities
    68 -> 81 img/s with one decoding thread, single photos 24 -> 41 img/s without spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
