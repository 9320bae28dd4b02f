"""Grad-CAM (Selvaraju et al., 2017) for pomona's EfficientNets: which part of the photo made the model say
"Granny Smith".

The map is taken at the last convolutional stage of the backbone (timm's `forward_features`: conv_head + BN +
activation, the feature map that global pooling averages), weighted by the gradient of the chosen class's logit,
and drawn over the centre crop the model saw, at display resolution, with a legend (the colour scale and the
class shown with its probability). The probabilities come from the run's own prediction path
(`LoadedRun.predict_probs`: its engine, test-time views and members), so the class explained by default is the
one `pomona predict` gives; the map itself is computed on the (first member's) PyTorch model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.atomic import atomic_write
from ..core.errors import PomonaError
from ..data.preprocessing import Preprocessing, create_eval_transform_np
from ..inference.loaded import LoadedRun
from ..models.model import AppleNet


class ExplainError(PomonaError, ValueError):
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


def explain_image(run: LoadedRun, image: Image.Image, class_name: str | None = None) -> Explanation:
    """Grad-CAM of a decoded RGB photo for `class_name` (default: the class `run` predicts for it)."""
    classes = run.classes
    if class_name is not None and class_name not in classes:
        raise ExplainError(f"unknown class {class_name!r}; the model knows {classes}")
    x = create_eval_transform_np(run.preprocessing)(image)[None]
    probs = run.predict_probs(x)[0]
    index = int(probs.argmax()) if class_name is None else classes.index(class_name)
    cam, _, _ = grad_cam(run.model.cpu(), torch.from_numpy(x), index)
    return Explanation(cam, index, classes[index], probs)


def crop_as_model_sees(image: Image.Image, pre: Preprocessing, size: int) -> Image.Image:
    """The centre crop the model sees (shorter side resized, then `input_size` cut out), at `size` x `size`
    pixels taken from the original photo so it stays sharp."""
    w, h = image.size
    side = min(w, h) * pre.input_size / pre.resize_size
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def render_overlay(image: Image.Image, cam: np.ndarray, pre: Preprocessing, size: int = 448,
                   alpha: float = 0.4, caption: str | None = None, legend: bool = True) -> Image.Image:
    """The heat map (matplotlib's 'jet': red = most important) blended over the model's view of the photo, with a
    legend band at the bottom: the colour scale and `caption` (e.g. the class and its probability). The blend
    stays readable: the heat map's colour makes up `alpha` (40%) of a pixel where the model looked most and a
    quarter of that where it looked least, so the photo shows through everywhere."""
    from matplotlib import colormaps

    base = crop_as_model_sees(image.convert("RGB"), pre, size)
    heat = Image.fromarray((cam * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.BILINEAR)
    colored = colormaps["jet"](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    weight = alpha * (0.25 + 0.75 * np.asarray(heat, dtype=np.float32)[..., None] / 255.0)
    blended = (1 - weight) * np.asarray(base, dtype=np.float32) / 255.0 + weight * colored
    overlay = Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    return draw_legend(overlay, caption) if legend else overlay


def draw_legend(overlay: Image.Image, caption: str | None) -> Image.Image:
    """A darkened band along the bottom of `overlay` holding `caption` and the colour scale ('jet', from "less"
    to "more" important)."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    w, h = overlay.size
    band = max(18, h // 9)
    pixels = np.asarray(overlay, dtype=np.float32).copy()
    pixels[h - band:] *= 0.3
    out = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    pad, bar_w, bar_h = max(2, band // 8), w // 3, max(4, band // 3)
    small = ImageFont.load_default(size=max(8, band // 4))
    ramp = (np.asarray(colormaps["jet"](np.linspace(0, 1, bar_w)))[:, :3] * 255).astype(np.uint8)
    left, top = w - bar_w - pad, h - band + pad
    out.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0), "RGB"), (left, top))
    draw.text((left, top + bar_h + 1), "less", fill="white", font=small)
    draw.text((w - pad, top + bar_h + 1), "more important", fill="white", font=small, anchor="ra")
    if caption:
        font = ImageFont.load_default(size=max(9, band * 2 // 5))
        draw.text((pad * 2, h - band / 2), caption, fill="white", font=font, anchor="lm")
    return out


def overlay_png(image: Image.Image, explanation: Explanation, pre: Preprocessing, size: int = 448) -> bytes:
    """The overlay of an explanation as PNG bytes, captioned with its class and probability."""
    caption = f"Grad-CAM: {explanation.class_name} {explanation.probs[explanation.class_index]:.0%}"
    buffer = io.BytesIO()
    render_overlay(image, explanation.cam, pre, size, caption=caption).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def save_overlay(image: Image.Image, explanation: Explanation, pre: Preprocessing, out: str | Path,
                 size: int = 448) -> Path:
    png = overlay_png(image, explanation, pre, size)
    return atomic_write(out, lambda tmp: Path(tmp).write_bytes(png))
