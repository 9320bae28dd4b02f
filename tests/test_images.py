import io

import numpy as np
import torch
import pytest
from PIL import Image

from pomona.data.images import BadImageError, load_image
from pomona.training.datasets import DecodedImages, Preprocessing

PRE = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _jpeg_bytes(size=(64, 48), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["empty", "truncated", "not_image", "too_large", "missing"])
def test_bad_images_raise_with_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_jpeg_bytes((256, 256))[:600])
    elif kind == "not_image":
        path.write_text("img_id,label\n1,Fuji\n")
    elif kind == "too_large":
        Image.new("RGB", (300, 300)).save(path)
    with pytest.raises(BadImageError) as e:
        load_image(path, max_pixels=50_000)
    assert str(e.value)


def test_modes_become_rgb(tmp_path):
    gray = Image.new("L", (4, 4), 128)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    pal = Image.new("RGB", (4, 4), (0, 0, 255)).convert("P")
    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    cases = {"g.png": (gray, (128, 128, 128)), "a.png": (rgba, (255, 255, 255)), "c.jpg": (cmyk, (255, 0, 0)),
             "p.png": (pal, (0, 0, 255)), "s.png": (sixteen, (127, 127, 127))}
    for name, (img, expected) in cases.items():
        img.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB", name
        assert np.abs(np.asarray(out)[1, 1].astype(int) - expected).max() <= 3, (name, np.asarray(out)[1, 1])


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg").size == (20, 40)


def test_decoded_cache_remembers_bad_files_and_stays_bounded(tmp_path):
    good = [tmp_path / f"{i}.jpg" for i in range(3)]
    for p in good:
        p.write_bytes(_jpeg_bytes())
    (tmp_path / "bad.jpg").write_bytes(b"")
    paths = [str(p) for p in good] + [str(tmp_path / "bad.jpg")]
    images = DecodedImages(PRE, max_bytes=1)  # nothing fits: decoded on the fly
    assert images.scan(paths) == [str(tmp_path / "bad.jpg")]
    assert images.nbytes == 0 and not images.cache
    assert images.get(paths[0]).dtype == torch.uint8
    cached = DecodedImages(PRE)
    cached.scan(paths)
    assert set(cached.cache) == {str(p) for p in good}
    assert min(cached.get(paths[0]).shape[1:]) == PRE.resize_size
