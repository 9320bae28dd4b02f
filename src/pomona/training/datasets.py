"""Training data as tensors: a decoded-image cache (each photo decoded once per run) and the dataset over it,
and `ImageStore`, every photo of a run decoded once into one uint8 tensor for batched augmentation on the device
(`pomona.data.batch_augment`). How a photo becomes a model input is described in `pomona.data.preprocessing`."""

from __future__ import annotations

import concurrent.futures
import os
import tempfile
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import MAX_ASPECT
from ..core.progress import Progress
from ..data.images import BadImageError, image_size, load_image
from ..data.preprocessing import Preprocessing, create_resize, create_shrink


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


class ImageStore:
    """Every image of a run decoded once into ONE pre-allocated uint8 tensor, N x 3 x H x W: image i resized as
    `create_resize` does (the shorter side `pre.resize_size`, the pixels the decoded-image cache would hold) and
    kept in the top-left `sizes[i]` = (height, width) of its slot, zeros around it. H x W is the largest resized
    image (read from the file headers before decoding), at most `max_aspect` times the shorter side; a longer
    image is centre-cropped to fit (a panorama past 2:1).

    Built by `scan` (the decoded-image cache's interface: `bad`, `scan`, `get`), decoding in `workers` threads.
    The tensor lives in memory up to `max_bytes`, else in a memory-mapped file in `folder` (deleted with the
    store); data-loader workers forked after the scan read it without a copy (neither is ever written again).
    `loaders.create_device_loaders` gathers batches of rows out of it (on the GPU when it fits there) and augments
    them there (`pomona.data.batch_augment`)."""

    def __init__(self, pre: Preprocessing, max_pixels: int = 64_000_000, max_bytes: int = 4 << 30,
                 folder: str | None = None, workers: int | None = None, max_aspect: float = 2.0):
        self.pre, self.max_pixels, self.max_bytes, self.folder = pre, max_pixels, max_bytes, folder
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.max_aspect = max_aspect
        self.resize = create_resize(pre)
        self.bad: dict[str, str] = {}
        self.index: dict[str, int] = {}
        self.images = torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
        self.sizes = torch.zeros(0, 2, dtype=torch.int64)
        self._mmap = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after `create_resize` (torchvision's rule: shorter side = resize_size)."""
        short, long = sorted((width, height))
        s = self.pre.resize_size
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)

    def scan(self, paths: Sequence[str], desc: str = "decoding") -> list[str]:
        """Decode every path into the store (once: a second scan only reads `bad`) and return the unreadable ones."""
        if not len(self.index):
            self._build(list(dict.fromkeys(paths)), desc)
        return [p for p in paths if p in self.bad]

    def _build(self, paths: list[str], desc: str) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="pomona-store") as pool:
            def probe(path: str):
                try:
                    return self.resized_size(*image_size(path, self.max_pixels))
                except BadImageError as e:
                    self.bad[path] = str(e)
                    return None

            shapes = list(pool.map(probe, paths))
            good = [(p, s) for p, s in zip(paths, shapes) if s is not None]
            limit = int(self.pre.resize_size * self.max_aspect)
            height = min(limit, max((s[0] for _, s in good), default=self.pre.resize_size))
            width = min(limit, max((s[1] for _, s in good), default=self.pre.resize_size))
            self._allocate(len(good), height, width)
            sizes = torch.zeros(len(good), 2, dtype=torch.int64)

            def decode(row: int, path: str) -> None:
                try:
                    x = self.resize(load_image(path, self.max_pixels, self.pre.resize_size))
                except BadImageError as e:
                    self.bad[path] = str(e)
                    return
                h, w = x.shape[-2:]
                top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)  # only past max_aspect
                x = x[:, top:top + height, left:left + width]
                self.images[row, :, :x.shape[1], :x.shape[2]] = x
                sizes[row] = torch.tensor(x.shape[1:])

            with Progress(total=len(good), desc=desc, unit="img") as bar:
                futures = [pool.submit(decode, row, p) for row, (p, _) in enumerate(good)]
                for f in concurrent.futures.as_completed(futures):
                    f.result()
                    bar.update(1)
        self.sizes = sizes
        self.index = {p: row for row, (p, _) in enumerate(good) if p not in self.bad}

    def _allocate(self, n: int, height: int, width: int) -> None:
        nbytes = n * 3 * height * width
        if nbytes <= self.max_bytes:
            self.images = torch.zeros(n, 3, height, width, dtype=torch.uint8)
            return
        import numpy as np

        self._mmap = tempfile.NamedTemporaryFile(prefix="pomona-store-", suffix=".u8", dir=self.folder)
        array = np.memmap(self._mmap.name, dtype=np.uint8, mode="w+", shape=(n, 3, height, width))
        self.images = torch.from_numpy(array)

    def to_device(self, device: torch.device, max_fraction: float = 0.5) -> torch.Tensor:
        """The image tensor on `device` when it takes at most `max_fraction` of the device's free memory (one
        upload; batches are then gathered there), else the tensor where it is (batches are gathered on the host
        and copied over, pinned and asynchronously)."""
        if device.type != "cuda":
            return self.images
        free, _ = torch.cuda.mem_get_info(device)
        return self.images.to(device) if self.nbytes <= max_fraction * free else self.images

    def rows(self, paths: Sequence[str]) -> torch.Tensor:
        """Row of every path in the store (int64)."""
        return torch.tensor([self.index[p] for p in paths], dtype=torch.int64)

    def get(self, path: str) -> torch.Tensor:
        """The resized uint8 CHW tensor of `path` (a view into the store); BadImageError for an unreadable file."""
        if path in self.bad:
            raise BadImageError(self.bad[path])
        row = self.index[path]
        h, w = self.sizes[row].tolist()
        return self.images[row, :, :h, :w]


class RowDataset(Dataset):
    """(store row, class index) pairs: what the device path's loaders draw (the images stay in the store)."""

    def __init__(self, rows: torch.Tensor, targets: Sequence[int]):
        self.rows, self.targets = rows, torch.as_tensor(list(targets), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows[i], self.targets[i]


class DeviceLoader:
    """A loader of store rows made into model inputs on `device`: each batch of rows is gathered out of `images`
    (on the device when the store was uploaded there, else on the host, pinned and copied asynchronously) and
    passed through `transform(uint8 batch, sizes)` on the device. It stands in for the DataLoader it wraps
    (`len`, `generator`, `sampler`, `dataset` are that loader's: `fit.fit` reseeds them every epoch).
    Targets stay on the host unless `targets_on_device`."""

    def __init__(self, loader: DataLoader, images: torch.Tensor, sizes: torch.Tensor,
                 transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                 targets_on_device: bool = False):
        self.loader, self.images, self.transform, self.device = loader, images, transform, device
        self.sizes = sizes.to(device)
        self.targets_on_device = targets_on_device

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self):
        return self.loader.generator

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def __iter__(self):
        for rows, y in self.loader:
            with torch.no_grad():
                on_device = self._to_device(rows)
                if self.images.device == self.device:
                    x = self.images[on_device]
                else:
                    x = self._to_device(self.images[rows])
                x = self.transform(x, self.sizes[on_device])
            yield x, (self._to_device(y) if self.targets_on_device else y)
