"""How a photo becomes a model input: one description, `Preprocessing`, and every transform made from it.

The description comes from the model (timm's `resolve_model_data_config`: input size, mean, std, interpolation,
crop fraction) and is stored in every run folder. From it:

- `create_resize`: PIL image -> uint8 tensor whose shorter side is `resize_size` (what the decoded-image cache
  keeps);
- `create_eval_transform` (torch) and `create_eval_transform_np` (numpy) -- twins: centre crop, then the same
  normalisation `x * scale + shift` (`normalization`), the torch one on resized tensors (training's validation),
  the numpy one from the PIL image (serving: no torch tensors on the hot path of ONNX Runtime);
- `create_train_transform`: the colour-safe training augmentation of an `augment.AugmentSpec`, per image, ending
  in the same normalisation (its batched twin on the device: `batch_augment`).

Serving imports this module; it never imports training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.v2 as T

from .augment import CROP_RATIO, ERASING_RATIO, ERASING_SCALE, JPEG_QUALITY, AugmentSpec, colour

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


def create_shrink(pre: Preprocessing, max_side: int) -> Callable:
    """PIL image -> uint8 tensor, shrunk (never enlarged) so that its shorter side is at most `max_side`."""
    to_tensor, interpolation = T.PILToTensor(), _INTERPOLATION[pre.interpolation]

    def shrink(image) -> torch.Tensor:
        x = to_tensor(image)
        if min(x.shape[-2:]) > max_side:
            x = T.functional.resize(x, max_side, interpolation=interpolation, antialias=True)
        return x

    return shrink


def create_eval_transform(pre: Preprocessing) -> Callable:
    """Decoded uint8 tensor -> resized (shorter side `resize_size`; nothing to do when the cache already holds
    it at that size), centre-cropped, normalised float tensor (the numpy twin: `create_eval_transform_np`)."""
    return T.Compose([T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation], antialias=True),
                      T.CenterCrop(pre.input_size), Normalize(pre)])


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


class ColourAugment(torch.nn.Module):
    """The colour operations of an `AugmentSpec` (`augment.colour`, the code the device path runs, on a batch of
    one, drawn from torch's generator): uint8 or float (0-255) CHW in, float32 (0-255) out."""

    def __init__(self, spec: AugmentSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return colour(x[None].to(torch.float32).div_(255.0), self.spec)[0].mul_(255.0)


class RandomJPEG(torch.nn.Module):
    """With probability `p`, re-encode a uint8 image as JPEG at a random quality in `JPEG_QUALITY`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._jpeg = T.JPEG(JPEG_QUALITY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._jpeg(x) if torch.rand(()) < self.p else x


def create_train_transform(pre: Preprocessing, spec: AugmentSpec | None, normalize: bool = True) -> Callable:
    """Resized uint8 tensor -> augmented input, per image (the loader path; `batch_augment` is its batched twin
    on the device): the operations of `spec` (`augment.augment_spec` of the training settings) in the order of
    `pomona.data.augment`; with no spec (--no-augment), the evaluation transform. `normalize=False` keeps uint8 images
    and leaves out random erasing (for previews)."""
    if spec is None:
        return create_eval_transform(pre) if normalize else T.CenterCrop(pre.input_size)
    ops: list = [T.RandomResizedCrop(pre.input_size, scale=(spec.crop_scale, 1.0), ratio=CROP_RATIO,
                                     interpolation=_INTERPOLATION[pre.interpolation], antialias=True)]
    if spec.hflip > 0:
        ops.append(T.RandomHorizontalFlip(spec.hflip))
    if spec.vflip > 0:
        ops.append(T.RandomVerticalFlip(spec.vflip))
    if spec.rot90 > 0:
        ops.append(RandomQuarterTurn(spec.rot90))
    if spec.elastic > 0:
        ops.append(T.ElasticTransform(alpha=spec.elastic, sigma=5.0))
    if spec.rotate > 0:
        ops.append(T.RandomRotation(spec.rotate, interpolation=T.InterpolationMode.BILINEAR))
    if spec.jpeg > 0:
        ops.append(RandomJPEG(spec.jpeg))
    if spec.colour:
        ops.append(ColourAugment(spec))
    if normalize:
        ops.append(Normalize(pre))
        if spec.random_erasing > 0:
            ops.append(T.RandomErasing(spec.random_erasing, scale=ERASING_SCALE, ratio=ERASING_RATIO, value=0))
    elif spec.colour:
        ops.append(_to_uint8)
    return T.Compose(ops)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float 0-255 -> uint8, rounded."""
    return x.round().clamp_(0, 255).to(torch.uint8)
