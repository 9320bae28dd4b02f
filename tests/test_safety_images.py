"""Safe decoding of untrusted files (issue "Safe with untrusted files and clients", point 2): thin strips are refused
from the header, large photos are decoded reduced, in training, predict and serve alike, and ordinary photos give
the same model input as before."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pomona.data.images import BadImageError, load_image
from pomona.data.preprocessing import Preprocessing, create_eval_transform_np
from pomona.inference.loaded import load_run
from pomona.training.datasets import DecodedImages

from conftest import GROCERY, SERVE_CLASSES, held_out_photo, requires_grocery

PRE = Preprocessing(input_size=128, mean=(0.5,) * 3, std=(0.5,) * 3)  # resize_size 146
SRC = Path(__file__).resolve().parents[1] / "src"


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize("size", [(16000, 1), (1, 16000), (2100, 100)])
def test_thin_strips_are_refused_from_the_header(tmp_path, size):
    path = _save(Image.new("L", size, 90), tmp_path / "strip.png")
    assert path.stat().st_size < 2000  # a tiny file that would resize to a huge one
    with pytest.raises(BadImageError, match=r"extreme aspect ratio .* the limit is 20:1"):
        load_image(path)
    with pytest.raises(BadImageError, match="extreme aspect ratio"):
        load_image(path.read_bytes(), target=146)


def test_the_aspect_bound_is_a_parameter(tmp_path):
    path = _save(Image.new("RGB", (400, 20), (200, 30, 30)), tmp_path / "wide.png")
    assert load_image(path).size == (400, 20)  # 20:1 is accepted by default
    with pytest.raises(BadImageError, match="limit is 10:1"):
        load_image(path, max_aspect=10)


def test_training_and_predict_skip_strips_with_the_reason(tmp_path, apple_run):
    strip = str(_save(Image.new("RGB", (16000, 1), (90, 160, 40)), tmp_path / "strip.png"))
    photo = str(held_out_photo("Pink-Lady"))
    images = DecodedImages(PRE)  # the training path
    assert images.scan([photo, strip]) == [strip] and "aspect ratio" in images.bad[strip]
    preds = load_run(apple_run, device="cpu", engine="onnx").predict([photo, strip])  # predict (ONNX engine)
    assert preds.labels == ["Pink-Lady", ""] and "aspect ratio" in preds.bad[strip]


@requires_grocery
def test_large_photos_are_decoded_reduced_but_never_below_twice_the_target(tmp_path):
    photo = Image.open(held_out_photo("Granny-Smith")).convert("RGB")  # 348 x 348
    big = photo.resize((2784, 2784), Image.BICUBIC)
    jpeg = _save(big, tmp_path / "big.jpg", quality=92)
    png = _save(big, tmp_path / "big.png")
    for path in (jpeg, png):
        reduced = load_image(path, target=146)
        assert 292 <= min(reduced.size) < 2 * 292 and reduced.mode == "RGB", (path, reduced.size)
    assert load_image(jpeg, target=146).size == (348, 348)  # JPEG: the decoder's own 1/8 scale
    assert load_image(png, target=146).size == (310, 310)  # PNG: reduced by 9 right after decoding
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: orientation still applied to the reduced image
    wide = _save(big.resize((2784, 1392)), tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(wide, target=146).size == (348, 696)  # 1/4 scale: the short side stays >= 292


@requires_grocery
def test_ordinary_photos_give_the_same_input_and_large_ones_the_same_prediction(tmp_path, apple_run):
    run = load_run(apple_run, device="cpu", engine="onnx", tta=False)
    transform = create_eval_transform_np(run.preprocessing)
    photos = [p for c in SERVE_CLASSES for p in sorted((GROCERY / "val" / c).iterdir())[:5]]
    default = Preprocessing(input_size=320, mean=(0.5,) * 3, std=(0.5,) * 3)  # the default recipe: resize 365
    for p in photos:  # grocery photos are 348 px: not reduced, bit for bit the same image as before
        full = np.asarray(load_image(p))
        assert np.array_equal(np.asarray(load_image(p, target=run.preprocessing.resize_size)), full)
        assert np.array_equal(np.asarray(load_image(p, target=default.resize_size)), full)
    worst = 0.0
    for i, p in enumerate(photos):  # the same photos at 4x: decoded reduced, the model sees nearly the same
        big = _save(Image.open(p).convert("RGB").resize((1392, 1392), Image.BICUBIC), tmp_path / f"{i}.jpg",
                    quality=95)
        full = run.predict_probs(transform(load_image(big))[None])[0]
        reduced = run.predict_probs(transform(load_image(big, target=run.preprocessing.resize_size))[None])[0]
        assert reduced.argmax() == full.argmax()
        worst = max(worst, float(np.abs(full - reduced).max()))
    print(f"largest probability difference, reduced vs full decode of 4x photos: {worst:.4f}")
    assert worst < 0.02


def _peak_mb_of_decode(path: Path, target: int | None) -> float:
    """Peak RSS growth (MB) of one decode, in a fresh process."""
    code = textwrap.dedent(f"""
        from pomona.data.images import load_image
        def peak():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
        before = peak()
        image = load_image({str(path)!r}, target={target!r})
        print(peak() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, check=True)
    return float(out.stdout.strip())


def test_a_large_jpeg_costs_memory_in_proportion_to_the_output(tmp_path):
    path = _save(Image.new("RGB", (6000, 6000), (90, 160, 40)), tmp_path / "36mp.jpg", quality=90)
    assert path.stat().st_size < 1_000_000
    full, reduced = _peak_mb_of_decode(path, None), _peak_mb_of_decode(path, 146)
    print(f"36-MP JPEG decode: {full:.0f} MB at full size, {reduced:.0f} MB reduced")
    assert full > 100 and reduced < 20
