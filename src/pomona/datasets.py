"""Tensors for the model: preprocessing resolved from the model, colour-safe augmentation, a decoded-image cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .images import BadImageError, load_image

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


def resolve_preprocessing(model: torch.nn.Module, img_size: int | None = None) -> Preprocessing:
    """Preprocessing from the model's pretrained config (`timm.data.resolve_model_data_config`)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = img_size or int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return Preprocessing(input_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=interp if interp in _INTERPOLATION else "bicubic",
                         crop_pct=float(cfg.get("crop_pct", 0.875)))


def create_resize(pre: Preprocessing) -> Callable:
    """PIL image -> uint8 tensor whose shorter side is `pre.resize_size` (what the cache stores)."""
    return T.Compose([T.PILToTensor(), T.Resize(pre.resize_size, interpolation=_INTERPOLATION[pre.interpolation],
                                                  antialias=True)])


def _normalize(pre: Preprocessing) -> T.Transform:
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))])


def create_eval_transform(pre: Preprocessing) -> Callable:
    """Resized uint8 tensor -> centre-cropped, normalised float tensor."""
    return T.Compose([T.CenterCrop(pre.input_size), _normalize(pre)])


class RandomQuarterTurn(torch.nn.Module):
    """With probability `p`, rotate by 90, 180 or 270 degrees (drawn from torch's generator)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        return torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))


def create_train_transform(pre: Preprocessing, hflip: float = 0.5, vflip: float = 0.5, rotate: float = 30.0,
                           crop_scale: float = 0.35, color_jitter: float = 0.0, rot90: float = 0.0,
                           elastic: float = 0.0, normalize: bool = True) -> Callable:
    """Colour-safe augmentation: random resized crop, flips, quarter turns, rotation and elastic distortion;
    colour jitter only when asked. `normalize=False` keeps uint8 images (for previews)."""
    ops: list = [T.RandomResizedCrop(pre.input_size, scale=(crop_scale, 1.0),
                                     interpolation=_INTERPOLATION[pre.interpolation], antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(T.RandomVerticalFlip(vflip))
    if rot90 > 0:
        ops.append(RandomQuarterTurn(rot90))
    if elastic > 0:
        ops.append(T.ElasticTransform(alpha=float(elastic), sigma=5.0))
    if rotate > 0:
        ops.append(T.RandomRotation(rotate, interpolation=T.InterpolationMode.BILINEAR))
    if color_jitter > 0:
        ops.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter))
    if normalize:
        ops.append(_normalize(pre))
    return T.Compose(ops)


class DecodedImages:
    """Decodes each photo once and keeps the resized uint8 tensor in memory, up to `max_bytes`.

    Images past the bound are decoded again whenever asked for, so memory stays bounded on any data size.
    Unreadable files are remembered in `bad` (path -> reason).
    """

    def __init__(self, pre: Preprocessing, max_pixels: int = 64_000_000, max_bytes: int = 4 << 30,
                 enabled: bool = True):
        self.resize = create_resize(pre)
        self.max_pixels = max_pixels
        self.target = pre.resize_size  # large photos are decoded reduced, to at least twice this shorter side
        self.max_bytes = max_bytes if enabled else 0
        self.cache: dict[str, torch.Tensor] = {}
        self.nbytes = 0
        self.bad: dict[str, str] = {}

    def get(self, path: str) -> torch.Tensor:
        """The resized uint8 CHW tensor of `path`; raises BadImageError for an unreadable file."""
        hit = self.cache.get(path)
        if hit is not None:
            return hit
        if path in self.bad:
            raise BadImageError(self.bad[path])
        try:
            x = self.resize(load_image(path, self.max_pixels, self.target))
        except BadImageError as e:
            self.bad[path] = str(e)
            raise
        if self.nbytes + x.numel() <= self.max_bytes:
            self.cache[path] = x
            self.nbytes += x.numel()
        return x

    def scan(self, paths: Sequence[str], desc: str = "decoding") -> list[str]:
        """Decode every path once (filling the cache) and return the unreadable ones."""
        for p in tqdm(paths, desc=desc, unit="img", leave=False, mininterval=1.0, disable=None):
            try:
                self.get(p)
            except BadImageError:
                pass
        return [p for p in paths if p in self.bad]


class ImageDataset(Dataset):
    """(image tensor, class index) pairs for a list of paths; the label of an unlabelled image is -1."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | None, images: DecodedImages,
                 transform: Callable):
        self.paths = list(paths)
        self.targets = list(targets) if targets is not None else [-1] * len(self.paths)
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.get(self.paths[i])), self.targets[i]
