"""`pomona predict --save-dir`: each photo written again with its verdict and top-3 drawn in a band along the top
(`pomona.reporting.annotate`), the rest of the photo untouched."""

import numpy as np
from PIL import Image

from pomona.inference.engine import Predictions
from pomona.reporting.annotate import MAX_SIDE, band_height, save_annotated

CLASSES = ["Fuji", "Gala", "Granny-Smith"]


def _photo(path, size=(600, 400)):
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], np.full_like(x, 90)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _text_pixels(band: np.ndarray) -> int:
    """Bright pixels in a band darkened to a quarter (at most 64 before the text was drawn)."""
    return int((band.max(axis=-1) > 150).sum())


def test_each_photo_gets_its_verdict_and_top3_drawn_on_top(tmp_path):
    sure, unsure = _photo(tmp_path / "a" / "apple.jpg"), _photo(tmp_path / "b" / "apple.jpg")
    big, broken = _photo(tmp_path / "big.png", (3000, 2000)), tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    probs = np.array([[0.9, 0.06, 0.04], [0.45, 0.4, 0.15], [0.2, 0.7, 0.1], [np.nan] * 3], np.float32)
    preds = Predictions([str(sure), str(unsure), str(big), str(broken)], probs, CLASSES, {str(broken): "not an image"})
    written = save_annotated(preds, tmp_path / "out", 3, min_confidence=0.6)
    assert [p.name for p in written] == ["apple.jpg", "apple_2.jpg", "big.png"]  # same names kept apart; broken left out
    assert max(Image.open(written[2]).size) == MAX_SIDE  # large photos are shrunk
    for drawn_path, original_path in zip(written[:2], [sure, unsure]):
        drawn = np.asarray(Image.open(drawn_path).convert("RGB"), dtype=np.int16)
        original = np.asarray(Image.open(original_path).convert("RGB"), dtype=np.int16)
        assert drawn.shape == original.shape
        band = band_height(600, 400)
        assert np.abs(drawn[band + 4:] - original[band + 4:]).mean() < 3  # the photo below the band is untouched
        assert np.abs(drawn[:band] - original[:band]).mean() > 40  # the band is darkened ...
        assert _text_pixels(drawn[:band]) > 300  # ... and carries the label text
    sure_band = np.asarray(Image.open(written[0]).convert("RGB"), dtype=np.int16)[:band_height(600, 400)]
    unsure_band = np.asarray(Image.open(written[1]).convert("RGB"), dtype=np.int16)[:band_height(600, 400)]
    green = ((sure_band[..., 1] > 150) & (sure_band[..., 0] < 170)).sum()  # "Fuji 90%" in green
    amber = ((unsure_band[..., 0] > 200) & (unsure_band[..., 2] < 120)).sum()  # "not sure: Fuji or Gala" in amber
    assert green > 50 and amber > 50
