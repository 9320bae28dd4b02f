"""Decoding photos safely: EXIF orientation, any colour mode to RGB, and bad files reported instead of crashing."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import MAX_ASPECT
from ..core.errors import PomonaError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class BadImageError(PomonaError, ValueError):
    """A file that cannot be used as an image; the message says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit and 32-bit greys are rescaled (not clipped), transparency is
    composited on white (the background of studio apple photos)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img



REDUCE_MARGIN = 2
"""A reduced decode keeps the shorter side at least REDUCE_MARGIN times the target, so the resize that follows
still has pixels to average and predictions on ordinary photos do not change."""

# Modes `Image.reduce` averages correctly; the others (palette, 1-bit, 16-bit) are converted to RGB first.
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"}


def reduction_factor(size: tuple[int, int], target: int | None) -> int:
    """The largest integer factor an image of `size` can be shrunk by while its shorter side stays at least
    REDUCE_MARGIN * `target` (1 = decode at full size)."""
    if not target:
        return 1
    return max(1, min(size) // (REDUCE_MARGIN * int(target)))


def check_size(size: tuple[int, int], max_pixels: int, max_aspect: float = MAX_ASPECT) -> None:
    """Raise BadImageError for an image of `size` (from its header) with too many pixels or too thin a shape."""
    w, h = size
    if w * h > max_pixels:
        raise BadImageError(f"too many pixels ({w}x{h} > {max_pixels})")
    if min(w, h) < 1:
        raise BadImageError(f"cannot decode: empty image ({w}x{h})")
    if max(w, h) > max_aspect * min(w, h):
        raise BadImageError(f"extreme aspect ratio ({w}x{h} is {max(w, h) / min(w, h):.0f}:1, the limit is "
                            f"{max_aspect:g}:1)")


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    if factor <= 1:
        return img
    if img.mode not in _REDUCIBLE:
        img = _to_rgb(img)
    return img.reduce(factor)


@contextlib.contextmanager
def _reading():
    """Turn every way a file can fail to be an image into BadImageError (and keep PIL's bomb warning an error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except FileNotFoundError as e:
        raise BadImageError("file not found") from e
    except UnidentifiedImageError as e:
        raise BadImageError("not an image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"too many pixels: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken headers
        raise BadImageError(f"cannot decode: {e}") from e


def _open(path: str | Path | bytes, max_pixels: int, max_aspect: float) -> Image.Image:
    """The opened (not yet decoded) image, its size and shape checked from the header (`check_size`)."""
    if isinstance(path, bytes):
        if not path:
            raise BadImageError("empty file (0 bytes)")
        source = io.BytesIO(path)
    else:
        source = Path(path)
        if source.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
    img = Image.open(source)
    try:
        check_size(img.size, max_pixels, max_aspect)
    except BadImageError:
        img.close()
        raise
    return img


def load_image(path: str | Path | bytes, max_pixels: int = 64_000_000, target: int | None = None,
               max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Open `path` (or the bytes of an upload) as an upright RGB image or raise BadImageError (empty, truncated,
    not an image, too many pixels, longer side more than `max_aspect` times the shorter). Size and shape are
    checked from the header, before anything is decoded.

    `target`: the shorter side the caller will resize to (`Preprocessing.resize_size`). Large images are then
    decoded reduced, to a shorter side of at least 2 * `target` (never below it): JPEGs by the decoder itself
    (1/2, 1/4, 1/8 scale, `Image.draft`), other formats by `Image.reduce` right after decoding, before any
    colour conversion or rotation, so memory past the decode scales with the output. Without `target` the image
    is returned at full size."""
    with _reading(), _open(path, max_pixels, max_aspect) as img:
        if reduction_factor(img.size, target) > 1 and img.format in ("JPEG", "MPO"):
            img.draft(None, (REDUCE_MARGIN * target, REDUCE_MARGIN * target))
        img.load()
        img = _reduce(img, reduction_factor(img.size, target))
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def image_size(path: str | Path, max_pixels: int = 64_000_000, max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """Width and height of the upright image (EXIF orientation applied), read from the header without decoding
    the pixels; raises BadImageError as `load_image` would for what the header already shows."""
    with _reading(), _open(path, max_pixels, max_aspect) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
