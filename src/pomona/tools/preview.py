"""`pomona augment-preview`: one photo under the augmentation pipelines, as a PNG grid (people would rather
look than read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..core.atomic import atomic_write
from ..data.augment import augment_spec
from ..data.balance import augment_one, create_pipeline, image_seed, parse_operations
from ..data.images import load_image
from ..data.preprocessing import create_resize, create_train_transform, resolve_preprocessing


def online_samples(image_path: str | Path, cfg: Config, n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` draws of the training-time (online) augmentation of `cfg.train`, as uint8 HWC arrays, with the model's
    own preprocessing (size, interpolation, crop) as training uses it."""
    pre = resolve_preprocessing(cfg.model.name, cfg.model.img_size)
    x = create_resize(pre)(load_image(image_path, cfg.data.max_pixels))
    transform = create_train_transform(pre, augment_spec(cfg.train), normalize=False)
    torch.manual_seed(seed)
    return [transform(x).permute(1, 2, 0).numpy() for _ in range(n)]


def balance_samples(image_path: str | Path, cfg: Config, n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """`n` images the Augmentor balancing operations of `cfg.balance` would generate from this photo, with
    the operations that fired."""
    pipeline = create_pipeline(parse_operations(cfg.balance.operations, cfg.balance.allow_colour))
    image = load_image(image_path, cfg.data.max_pixels)
    out = []
    for i in range(n):
        images, ops = augment_one(pipeline, [image], image_seed(seed, "preview", i))
        out.append((np.asarray(images[0].convert("RGB")), "+".join(ops)))
    return out


def write_augment_preview(image_path: str | Path, out: str | Path, cfg: Config, n: int = 11, seed: int = 0,
                          which: str = "both") -> Path:
    """A grid: the original photo, then `n` online-augmentation draws and/or `n` Augmentor balancing images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if which not in ("online", "balance", "both"):
        raise ValueError(f"which must be online, balance or both, got {which!r}")
    rows: list[list[tuple[np.ndarray, str]]] = []
    original = np.asarray(load_image(image_path, cfg.data.max_pixels))
    if which in ("online", "both"):
        rows.append([(original, "original")] + [(a, f"online #{i + 1}")
                                                for i, a in enumerate(online_samples(image_path, cfg, n, seed))])
    if which in ("balance", "both"):
        rows.append([(original, "original")] + [(a, ops.replace("random_distortion", "distort")
                                                 .replace("flip_", "").replace("+", "\n"))
                                                for a, ops in balance_samples(image_path, cfg, n, seed)])
    cols = min(6, n + 1)
    lines = sum(-(-len(r) // cols) for r in rows)
    fig, axes = plt.subplots(lines, cols, figsize=(2.2 * cols, 2.5 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    line = 0
    for r in rows:
        for i, (img, title) in enumerate(r):
            ax = axes[line + i // cols, i % cols]
            ax.imshow(img)
            ax.set_title(title, fontsize=7)
        line += -(-len(r) // cols)
    fig.suptitle(f"{Path(image_path).name}: top online (training-time) augmentation, "
                 f"bottom Augmentor balancing" if which == "both" else Path(image_path).name, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return Path(out)
