"""ONNX in one place: exporting a PyTorch module (`export_onnx`), quantising the file to int8 (`quantize_onnx`)
and opening an ONNX Runtime CPU session on it (`onnx_session`). Used by `pomona export` / the inference engine
and by the frozen-feature fast path."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def static_same_padding(model, example):
    """`model` itself, or a copy in which timm's `Conv2dSame` (TF "same" padding of the tf_ EfficientNets,
    computed from the input size on every call: exported as Shape/Gather/Ceil/Pad nodes) pads by the fixed
    amounts of `example`'s size, which ONNX Runtime folds into the convolution. The exported graph has a fixed
    image size anyway."""
    import copy

    import torch
    import torch.nn.functional as F

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import get_same_padding
    except ImportError:
        return model
    sizes: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: sizes.__setitem__(name, args[0].shape[-2:]))
             for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    if not hooks:
        return model
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()

    class FixedPadConv(torch.nn.Conv2d):
        def forward(self, x):
            return F.conv2d(F.pad(x, self.fixed_pad), self.weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)

    fixed = copy.deepcopy(model)
    for name, (ih, iw) in sizes.items():
        conv = fixed.get_submodule(name)
        ph = get_same_padding(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        conv.__class__ = FixedPadConv
        conv.fixed_pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return fixed


def export_onnx(model, example, path: str | Path, opset: int = 17, metadata: dict[str, str] | None = None,
                input_name: str = "input", output_name: str = "logits") -> Path:
    """Trace `model` on `example` to ONNX with a dynamic batch axis (and the image size of `example`, with static
    "same" padding: `static_same_padding`); `metadata` goes into its metadata_props."""
    import torch

    model = static_same_padding(model, example)
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


WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


def layer_groups(path: str | Path) -> dict[str, list[str]]:
    """The nodes of an exported model grouped by the layer of the PyTorch module that made them, in graph order:
    each block of the backbone (`.../blocks.N`: timm's EfficientNet stages), else the first two parts of the module
    path (`backbone/conv_stem`, `head/head.0`, ...). A group without a convolution or matrix product (an
    activation, the pooling) joins the group before it, so that a layer and its activation stay together. The
    units of the sensitivity sweep of `pomona export` (`quantize_onnx`'s `exclude`)."""
    import re

    import onnx

    groups: dict[str, list] = {}
    for node in onnx.load(str(path)).graph.node:
        parts = [p for p in node.name.split("/") if p][:-1]  # the module path, without the operator's own name
        block = next((i for i, p in enumerate(parts) if re.fullmatch(r"blocks\.\d+", p)), None)
        key = "/".join(parts[:block + 1] if block is not None else parts[:2])
        groups.setdefault(key, []).append(node)
    merged: dict[str, list[str]] = {}
    for key, nodes in groups.items():
        if merged and (not key or not any(n.op_type in WEIGHTED_OPS for n in nodes)):
            key = next(reversed(merged))
        merged.setdefault(key, []).extend(n.name for n in nodes)
    return merged


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calibration: Iterable, exclude: Sequence[str] = (),
                  input_name: str = "input", method: str = "minmax", preprocessed: bool = False) -> Path:
    """Static int8 quantisation of an fp32 ONNX model for ONNX Runtime on x86 (VNNI/AMX): QDQ format, uint8
    activations, int8 weights per output channel, activation ranges calibrated on `calibration` (float32 NCHW
    batches, e.g. training photos preprocessed for the model), the nodes named in `exclude` left in float.
    The model is pre-processed first (shape inference, graph optimisation), as ONNX Runtime recommends, unless
    `preprocessed` says `fp32_path` is already (`preprocess_for_quantization`: once for many quantisations)."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="pomona-quant-") as tmp:
        pre = Path(fp32_path) if preprocessed else preprocess_for_quantization(fp32_path, Path(tmp) / "pre.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], nodes_to_exclude=list(exclude),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return Path(out_path)


def preprocess_for_quantization(fp32_path: str | Path, out_path: str | Path) -> Path:
    """The graph ONNX Runtime recommends quantising: shapes inferred, optimised (`quantize_onnx` does this itself
    unless told the model is already)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)
