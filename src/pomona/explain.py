"""Grad-CAM (Selvaraju et al., 2017) for pomona's EfficientNets: which part of the photo made the model say
"Granny Smith".

The map is taken at the last convolutional stage of the backbone (timm's `forward_features`: conv_head + BN +
activation, the feature map that global pooling averages), weighted by the gradient of the chosen class's logit,
and drawn over the centre crop the model saw, at display resolution.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets import Preprocessing
from .model import AppleNet


class ExplainError(ValueError):
    """A Grad-CAM request that cannot be answered (e.g. a class the model does not know)."""


@dataclass
class Explanation:
    """A Grad-CAM heat map (H x W in [0, 1], model-input resolution) for one class of one photo."""

    cam: np.ndarray
    class_index: int
    class_name: str
    probs: np.ndarray


def grad_cam(model: AppleNet, x: torch.Tensor, class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM of one preprocessed image `x` (1x3xHxW): the ReLU of the feature maps of the last conv stage
    weighted by the spatial mean of d logit / d feature map, upsampled to HxW and scaled to [0, 1].
    `class_index` None = the predicted class. Returns (cam, class index, probabilities)."""
    model.eval()
    backbone = model.backbone
    with torch.no_grad():
        features = backbone.forward_features(x.float())
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(backbone.forward_head(features))
        probs = logits.detach().float().softmax(-1)[0].numpy()
        index = int(probs.argmax()) if class_index is None else int(class_index)
        (grads,) = torch.autograd.grad(logits[0, index], features)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.numpy().astype(np.float32), index, probs


def explain_image(model: AppleNet, image: Image.Image, pre: Preprocessing, classes: list[str],
                  class_name: str | None = None) -> Explanation:
    """Grad-CAM of a decoded RGB photo for `class_name` (default: the predicted class)."""
    from .engine import create_image_transform

    if class_name is not None and class_name not in classes:
        raise ExplainError(f"unknown class {class_name!r}; the model knows {classes}")
    x = torch.from_numpy(create_image_transform(pre)(image))[None]
    cam, index, probs = grad_cam(model, x, None if class_name is None else classes.index(class_name))
    return Explanation(cam, index, classes[index], probs)


def crop_as_model_sees(image: Image.Image, pre: Preprocessing, size: int) -> Image.Image:
    """The centre crop the model sees (shorter side resized, then `input_size` cut out), at `size` x `size`
    pixels taken from the original photo so it stays sharp."""
    w, h = image.size
    side = min(w, h) * pre.input_size / pre.resize_size
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def render_overlay(image: Image.Image, cam: np.ndarray, pre: Preprocessing, size: int = 448,
                   alpha: float = 0.45) -> Image.Image:
    """The heat map (matplotlib's 'jet': red = most important) blended over the model's view of the photo."""
    from matplotlib import colormaps

    base = crop_as_model_sees(image.convert("RGB"), pre, size)
    heat = Image.fromarray((cam * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.BILINEAR)
    colored = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    weight = alpha * (0.25 + 0.75 * np.asarray(heat, dtype=np.float32)[..., None] / 255.0)
    blended = (1 - weight) * np.asarray(base, dtype=np.float32) / 255.0 + weight * colored
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def overlay_png(image: Image.Image, cam: np.ndarray, pre: Preprocessing, size: int = 448) -> bytes:
    buffer = io.BytesIO()
    render_overlay(image, cam, pre, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_overlay(image: Image.Image, cam: np.ndarray, pre: Preprocessing, out: str | Path, size: int = 448) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(overlay_png(image, cam, pre, size))
    return out
