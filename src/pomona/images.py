"""Decoding photos safely: EXIF orientation, any colour mode to RGB, and bad files reported instead of crashing."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PomonaError

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


def _open(path: str | Path | bytes, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, its pixel count checked against `max_pixels` from the header."""
    if isinstance(path, bytes):
        if not path:
            raise BadImageError("empty file (0 bytes)")
        source = io.BytesIO(path)
    else:
        source = Path(path)
        if source.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
    img = Image.open(source)
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadImageError(f"too many pixels ({w}x{h} > {max_pixels})")
    return img


def load_image(path: str | Path | bytes, max_pixels: int = 64_000_000) -> Image.Image:
    """Open `path` (or the bytes of an upload) as an upright RGB image or raise BadImageError (empty, truncated,
    not an image, too large). The pixel count is checked from the header, before anything is decoded."""
    with _reading(), _open(path, max_pixels) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def image_size(path: str | Path, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """Width and height of the upright image (EXIF orientation applied), read from the header without decoding
    the pixels; raises BadImageError as `load_image` would for what the header already shows."""
    with _reading(), _open(path, max_pixels) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
