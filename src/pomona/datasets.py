"""Training data as tensors: a decoded-image cache (each photo decoded once per run) and the dataset over it.
How a photo becomes a model input is described in `pomona.preprocessing`."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .config import MAX_ASPECT
from .images import BadImageError, load_image
from .preprocessing import Preprocessing, create_resize, create_shrink
from .progress import Progress


class DecodedImages:
    """Decodes each photo once and keeps the uint8 tensor in memory, up to `max_bytes`.

    Without `max_side` a photo is kept resized to the model's resize size (shorter side `pre.resize_size`, what
    evaluation crops from). With `max_side`, it is kept as it is when its shorter side is at most `max_side`,
    else shrunk to that: random crops of a small part of the photo then keep their detail, and the evaluation
    transform resizes it as prediction does. Images past the bound are decoded again whenever asked for, so
    memory stays bounded on any data size. Unreadable files are remembered in `bad` (path -> reason).
    """

    def __init__(self, pre: Preprocessing, max_pixels: int = 64_000_000, max_bytes: int = 4 << 30,
                 enabled: bool = True, max_side: int | None = None, max_aspect: float = MAX_ASPECT):
        self.resize = create_resize(pre) if not max_side else create_shrink(pre, max_side)
        self.max_pixels, self.max_aspect = max_pixels, max_aspect
        # large photos are decoded reduced, to at least twice the shorter side kept
        self.target = max_side or pre.resize_size
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
            x = self.resize(load_image(path, self.max_pixels, self.target, self.max_aspect))
        except BadImageError as e:
            self.bad[path] = str(e)
            raise
        if self.nbytes + x.numel() <= self.max_bytes:
            self.cache[path] = x
            self.nbytes += x.numel()
        return x

    def scan(self, paths: Sequence[str], desc: str = "decoding") -> list[str]:
        """Decode every path once (filling the cache) and return the unreadable ones."""
        for p in Progress(paths, desc=desc, unit="img"):
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
