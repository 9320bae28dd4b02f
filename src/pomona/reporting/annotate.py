"""`pomona predict --save-dir DIR`: each photo written again with its answer drawn on it (as `yolo predict
save=True` does): a dark band along the top holding the verdict (the variety, or "not sure: X or Y" in amber) and
the top-k varieties with their probabilities.

PIL only; never imports training or PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.atomic import atomic_write
from ..data.images import BadImageError, load_image

if TYPE_CHECKING:
    from ..inference.engine import Predictions
    from ..inference.records import Verdict

MAX_SIDE = 1024
"""Annotated photos are shrunk to at most this many pixels on their longer side (the labels stay readable)."""
SURE_COLOUR, UNSURE_COLOUR = (120, 230, 120), (255, 196, 60)


def band_height(width: int, height: int) -> int:
    """Height in pixels of the label band drawn along the top of a `width` x `height` photo."""
    return max(28, min(width, height) // 7)


def annotate_image(image: Image.Image, verdict: Verdict, top: Sequence[tuple[str, float]]) -> Image.Image:
    """A copy of `image` (RGB) with a darkened band along the top: the verdict on the first line (green with the
    probability when sure, amber 'not sure: X or Y' when not), the top-k varieties with their probabilities on
    the second."""
    out = image.convert("RGB").copy()
    out.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    w, h = out.size
    band = band_height(w, h)
    pixels = np.asarray(out, dtype=np.float32).copy()
    pixels[:band] *= 0.25
    out = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    pad = max(3, band // 10)
    unsure = not verdict.sure
    headline = verdict.text if unsure or not top else f"{verdict.text} {top[0][1]:.0%}"
    ranking = "   ".join(f"{c} {p:.0%}" for c, p in top)
    room = w - 4 * pad
    draw.text((pad * 2, pad), headline, fill=UNSURE_COLOUR if unsure else SURE_COLOUR,
              font=_font_fitting(headline, band * 9 // 20, room))
    draw.text((pad * 2, band - pad), ranking, fill="white", font=_font_fitting(ranking, band * 3 // 10, room),
              anchor="ld")
    return out


def _font_fitting(text: str, size: int, width: int) -> ImageFont.FreeTypeFont:
    """PIL's default font at `size`, or smaller until `text` fits in `width` pixels (never below 8)."""
    size = max(8, size)
    font = ImageFont.load_default(size=size)
    while size > 8 and font.getlength(text) > width:
        size -= 1
        font = ImageFont.load_default(size=size)
    return font


def _target_name(path: str, used: set[str]) -> str:
    """The file name of an annotated photo: its own name (JPEG and PNG keep their format, others become PNG),
    with _2, _3, ... when two photos of different folders share a name."""
    p = Path(path)
    suffix = p.suffix.lower() if p.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    name, n = p.stem + suffix, 1
    while name in used:
        n += 1
        name = f"{p.stem}_{n}{suffix}"
    used.add(name)
    return name


def save_annotated(preds: Predictions, save_dir: str | Path, k: int = 3, min_confidence: float = 0.0,
                   max_pixels: int = 64_000_000) -> list[Path]:
    """Write every readable photo of `preds` into `save_dir` with its verdict and top-k drawn on it (see
    `annotate_image`); unreadable photos are left out. Returns the files written, in input order."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for record in preds.records(min_confidence):
        if record.verdict is None:
            continue
        try:
            image = load_image(record.path, max_pixels, target=MAX_SIDE // 2)
        except BadImageError:
            continue
        picture = annotate_image(image, record.verdict, record.top(k))
        target = save_dir / _target_name(record.path, used)
        options = {"quality": 90} if target.suffix in (".jpg", ".jpeg") else {}
        written.append(atomic_write(target, lambda tmp: picture.save(tmp, format="JPEG" if options else "PNG",
                                                                     **options)))
    return written
