"""How a photo becomes a model input: one description, `Preprocessing`, and every transform made from it.

The description comes from the model (timm's `resolve_model_data_config`: input size, mean, std, interpolation,
crop fraction) and is stored in every run folder. From it:

- `create_resize`: PIL image -> uint8 tensor whose shorter side is `resize_size` (what the decoded-image cache
  keeps);
- `create_eval_transform` (torch) and `create_eval_transform_np` (numpy) -- twins: centre crop, then the same
  normalisation `x * scale + shift` (`normalization`), the torch one on resized tensors (training's validation),
  the numpy one from the PIL image (serving: no torch tensors on the hot path of ONNX Runtime);
- `create_train_transform`: the colour-safe training augmentation, ending in the same normalisation.

Serving imports this module; it never imports training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T

if TYPE_CHECKING:
    from .config import TrainConfig

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclass
class Preprocessing:
    """How a photo becomes a model input; stored with every checkpoint so a run folder is self-contained."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's convention: input_size / crop_pct)."""
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(input_size=int(d["input_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bicubic"), crop_pct=float(d.get("crop_pct", 0.875)))


def resolve_preprocessing(model: torch.nn.Module | str, img_size: int | None = None) -> Preprocessing:
    """The preprocessing of a timm model (or of a timm model name, without building it), from its pretrained
    config (`timm.data.resolve_model_data_config`); `img_size` overrides the input size."""
    import timm.data
    import timm.models

    if isinstance(model, str):
        cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(model).to_dict())
    else:
        cfg = timm.data.resolve_model_data_config(model)
    size = img_size or int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(input_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=interp if interp in _INTERPOLATION else "bicubic",
                         crop_pct=float(cfg.get("crop_pct", 0.875)))


def normalization(pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), 3x1x1 float32 each, with `uint8 pixel * scale + shift == (pixel / 255 - mean) / std`."""
    std = np.asarray(pre.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std))[:, None, None].astype(np.float32)
    shift = (-np.asarray(pre.mean, dtype=np.float32) / std)[:, None, None].astype(np.float32)
    return scale, shift


class Normalize(torch.nn.Module):
    """uint8 CHW tensor -> normalised float32 tensor (`normalization`)."""

    def __init__(self, pre: Preprocessing):
        super().__init__()
        scale, shift = normalization(pre)
        self.scale, self.shift = torch.from_numpy(scale), torch.from_numpy(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self.scale + self.shift


def create_resize(pre: Preprocessing) -> Callable:
    """PIL image -> uint8 tensor whose shorter side is `pre.resize_size` (what the cache stores)."""
    return T.Compose([T.PILToTensor(), T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation],
                                                  antialias=True)])


def create_eval_transform(pre: Preprocessing) -> Callable:
    """Resized uint8 tensor -> centre-cropped, normalised float tensor (the numpy twin: `create_eval_transform_np`)."""
    return T.Compose([T.CenterCrop(pre.input_size), Normalize(pre)])


def create_eval_transform_np(pre: Preprocessing) -> Callable:
    """PIL image -> float32 CHW array: `create_resize`, then the same crop and normalisation as
    `create_eval_transform`, the normalisation as one in-place multiply-add on the cropped pixels."""
    resize, crop = create_resize(pre), T.CenterCrop(pre.input_size)
    scale, shift = normalization(pre)

    def transform(image) -> np.ndarray:
        x = crop(resize(image)).numpy().astype(np.float32)
        x *= scale
        x += shift
        return x

    return transform


class RandomQuarterTurn(torch.nn.Module):
    """With probability `p`, rotate by 90, 180 or 270 degrees (drawn from torch's generator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        return torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))


def create_train_transform(pre: Preprocessing, t: "TrainConfig", normalize: bool = True) -> Callable:
    """Resized uint8 tensor -> augmented input: the random resized crop, flips, quarter turns, elastic distortion
    and rotation of the training settings `t`, colour jitter only when asked; without `t.augment`, the
    evaluation transform. `normalize=False` keeps uint8 images (for previews)."""
    if not t.augment:
        return create_eval_transform(pre) if normalize else T.CenterCrop(pre.input_size)
    ops: list = [T.RandomResizedCrop(pre.input_size, scale=(t.crop_scale, 1.0),
                                     interpolation=_INTERPOLATION[pre.interpolation], antialias=True)]
    if t.hflip > 0:
        ops.append(T.RandomHorizontalFlip(t.hflip))
    if t.vflip > 0:
        ops.append(T.RandomVerticalFlip(t.vflip))
    if t.rot90 > 0:
        ops.append(RandomQuarterTurn(t.rot90))
    if t.elastic > 0:
        ops.append(T.ElasticTransform(alpha=float(t.elastic), sigma=5.0))
    if t.rotate > 0:
        ops.append(T.RandomRotation(t.rotate, interpolation=T.InterpolationMode.BILINEAR))
    if t.colour_jitter > 0:
        ops.append(T.ColorJitter(brightness=t.colour_jitter, contrast=t.colour_jitter))
    if normalize:
        ops.append(Normalize(pre))
    return T.Compose(ops)
