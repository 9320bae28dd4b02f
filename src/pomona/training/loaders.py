"""The loaders of training: the training loader both paths share (images or cached features: shuffled, or drawn by
the weighted sampler, reseeded by `fit` every epoch; a share of every batch per rank), the image loaders of a split,
and those of the device path (store rows augmented on the device, `batch_augment`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config, TrainConfig
from ..data.augment import augment_spec
from ..data.batch_augment import BatchTransform
from ..data.bundle import DataBundle
from ..data.preprocessing import Preprocessing, create_eval_transform, create_train_transform
from .datasets import DecodedImages, DeviceLoader, ImageDataset, ImageStore, RowDataset
from .distributed import SINGLE, DistContext


def create_weighted_sampler(targets: list[int], num_classes: int, generator: torch.Generator,
                            ) -> torch.utils.data.WeightedRandomSampler:
    """Draws each image with weight 1 / (its class's size), with replacement: classes come out about equally
    often. It shares the loader's generator, so the per-epoch seeding covers it."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = torch.tensor(1.0 / np.maximum(counts, 1)[targets], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True,
                                                  generator=generator)


def create_train_loader(dataset: Dataset, targets: list[int], num_classes: int, t: TrainConfig, seed: int = 0,
                        num_workers: int = 0, dist: DistContext = SINGLE) -> DataLoader:
    """The training loader of both paths (images or cached features): shuffled, or drawn by the weighted sampler,
    through its own generator, which `fit` reseeds every epoch. Workers are started anew each epoch (no
    persistent workers), so their random state, drawn from that generator, is the same for an epoch whether or
    not the run was interrupted before it. With several processes each rank gets its share of every batch."""
    generator = torch.Generator()
    drop_last = len(dataset) > t.batch_size
    if dist.enabled:
        from torch.utils.data.distributed import DistributedSampler

        if t.weighted_sampler:
            raise ValueError("--weighted-sampler is not supported with several processes; use "
                             "--class-weighted-loss or --balance")
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=drop_last)
    else:
        sampler = create_weighted_sampler(targets, num_classes, generator) if t.weighted_sampler else None
    return DataLoader(dataset, batch_size=max(1, t.batch_size // dist.world_size), shuffle=sampler is None,
                      sampler=sampler, drop_last=drop_last, generator=generator, num_workers=num_workers)


def create_loaders(bundle: DataBundle, images: DecodedImages, pre: Preprocessing, cfg: Config,
                   dist: DistContext = SINGLE) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of a split; with several processes, each rank validates a disjoint shard."""
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    train_targets = bundle.targets(train_frame)
    transform = create_train_transform(pre, augment_spec(cfg.train))
    train_set = ImageDataset(train_frame["path"], train_targets, images, transform)
    val_set = ImageDataset(val_frame["path"], bundle.targets(val_frame), images, create_eval_transform(pre))
    if dist.enabled:
        from torch.utils.data import Subset

        val_set = Subset(val_set, list(range(dist.rank, len(val_set), dist.world_size)))
    train_loader = create_train_loader(train_set, train_targets, len(bundle.classes), cfg.train, cfg.seed,
                                       cfg.data.num_workers, dist)
    return train_loader, DataLoader(val_set, batch_size=cfg.train.batch_size * 2, num_workers=cfg.data.num_workers)


def use_device_augment(cfg: Config, device: torch.device) -> bool:
    """Whether training decodes into an `ImageStore` and augments batches on the device (--device-augment)."""
    return cfg.train.device_augment == "on" or (cfg.train.device_augment == "auto" and device.type == "cuda")


def create_device_loaders(bundle: DataBundle, store: ImageStore, pre: Preprocessing, cfg: Config,
                          device: torch.device, dist: DistContext = SINGLE) -> tuple[DeviceLoader, DeviceLoader]:
    """The loaders of `create_loaders` for the device path: the same sampling (order, weighted sampler, ranks,
    per-epoch seeding), but of store rows, turned into model inputs on `device` (`DeviceLoader`: the uint8
    store, on the GPU when it fits, then `batch_augment` for training and the exact centre crop for validation)."""
    train_frame, val_frame = bundle.subset("train"), bundle.subset("val")
    train_targets = bundle.targets(train_frame)
    transform = BatchTransform(pre, augment_spec(cfg.train), cfg.model.channels_last)
    val_rows = RowDataset(store.rows(val_frame["path"]), bundle.targets(val_frame))
    if dist.enabled:
        from torch.utils.data import Subset

        val_rows = Subset(val_rows, list(range(dist.rank, len(val_rows), dist.world_size)))
    train_loader = create_train_loader(RowDataset(store.rows(train_frame["path"]), train_targets), train_targets,
                                       len(bundle.classes), cfg.train, cfg.seed, 0, dist)
    images = store.to_device(device)
    return (DeviceLoader(train_loader, images, store.sizes, transform.train, device, targets_on_device=True),
            DeviceLoader(DataLoader(val_rows, batch_size=cfg.train.batch_size * 2), images, store.sizes,
                         transform.eval, device))

