"""The device path of training on the CPU: batched augmentation (shapes, ranges, seeds, flips and crops doing what
they say, rotation like torchvision's, photometric operations keeping hue), the uint8 image store, and training
through them."""

import colorsys
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from pomona.batch_augment import (BatchAugment, BatchTransform, augment_batch, center_crop, from_train_config,
                                  photometric, sample_crops, sampling_grid)
from pomona.config import TrainConfig
from pomona.datasets import DecodedImages, ImageStore
from pomona.images import image_size, load_image
from pomona.preprocessing import Preprocessing, create_eval_transform
from pomona.train import train_and_evaluate

from conftest import GROCERY, tiny_config

PRE = Preprocessing(input_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PLAIN = dict(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0)


def _coordinates(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose red channel is the column and green channel the row of each pixel, and their sizes."""
    r = torch.arange(size, dtype=torch.uint8)
    image = torch.stack([r[None, :].expand(size, size), r[:, None].expand(size, size),
                         torch.full((size, size), 128, dtype=torch.uint8)])
    return image.expand(n, 3, size, size).clone(), torch.tensor([[size, size]] * n)


def test_shapes_ranges_dtype_and_memory_format():
    images, sizes = _coordinates(5, 96)
    images[2:, :, 80:, :] = 0  # smaller images in the same canvas: 80 x 96
    sizes[2:] = torch.tensor([80, 96])
    spec = BatchAugment(64, rotate=30, rot90=0.5, elastic=20, brightness=0.3, contrast=0.3, gamma=0.3,
                        white_balance=0.05, blur=0.5, noise=0.05)
    x = augment_batch(images, sizes, spec, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    out = BatchTransform(PRE, spec).train(images, sizes, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 64, 64) and out.is_contiguous(memory_format=torch.channels_last)
    lo = (0 - np.array(PRE.mean)) / np.array(PRE.std)
    hi = (1 - np.array(PRE.mean)) / np.array(PRE.std)
    for c in range(3):
        assert lo[c] - 1e-4 <= out[:, c].min() and out[:, c].max() <= hi[c] + 1e-4


def test_a_seed_gives_the_same_batch():
    images, sizes = _coordinates(4, 80)
    spec = BatchAugment(64, rotate=30, rot90=0.5, brightness=0.2, blur=0.5, noise=0.05)
    a = augment_batch(images, sizes, spec, torch.Generator().manual_seed(3))
    b = augment_batch(images, sizes, spec, torch.Generator().manual_seed(3))
    c = augment_batch(images, sizes, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)  # without a generator: the default one (what train.fit seeds every epoch)
    d = augment_batch(images, sizes, spec)
    torch.manual_seed(5)
    assert torch.equal(d, augment_batch(images, sizes, spec))


def test_flips_do_what_they_say():
    images, sizes = _coordinates(2, 64)
    expected = images.float() / 255
    plain = augment_batch(images, sizes, BatchAugment(64, **PLAIN))
    assert torch.allclose(plain, expected, atol=1e-5)  # whole image at its own size: the pixels themselves
    h = augment_batch(images, sizes, BatchAugment(64, **{**PLAIN, "hflip": 1.0}))
    assert torch.allclose(h, expected.flip(-1), atol=1e-5)
    v = augment_batch(images, sizes, BatchAugment(64, **{**PLAIN, "vflip": 1.0}))
    assert torch.allclose(v, expected.flip(-2), atol=1e-5)
    q = augment_batch(images, sizes, BatchAugment(64, **PLAIN, rot90=1.0), torch.Generator().manual_seed(0))
    turns = [expected[i].rot90(k, (-2, -1)) for i in range(2) for k in (1, 2, 3)]
    assert all(any(torch.allclose(q[i], t, atol=1e-5) for t in turns[3 * i:3 * i + 3]) for i in range(2))


def test_crops_cut_the_box_they_draw_and_follow_torchvision_statistics():
    images, sizes = _coordinates(64, 200)
    spec = BatchAugment(50, crop_scale=(0.1, 0.5), hflip=0.0, vflip=0.0)
    boxes = sample_crops(sizes, spec.crop_scale, spec.ratio, torch.Generator().manual_seed(1))
    x = augment_batch(images, sizes, spec, torch.Generator().manual_seed(1)) * 255  # the same draws
    top, left, h, w = boxes.T.float()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and (left + w <= 200).all()
    # red = column, green = row: the first and last output pixel centres sit half an output pixel inside the box
    # edges (bilinear sampling of a ramp is exact)
    half_w, half_h = w / 100, h / 100
    assert torch.allclose(x[:, 0, 0, 0], left + half_w - 0.5, atol=0.02)
    assert torch.allclose(x[:, 0, 0, -1], left + w - half_w - 0.5, atol=0.02)
    assert torch.allclose(x[:, 1, 0, 0], top + half_h - 0.5, atol=0.02)
    assert torch.allclose(x[:, 1, -1, 0], top + h - half_h - 0.5, atol=0.02)
    many = sample_crops(torch.tensor([[240, 320]] * 1500), (0.35, 1.0), (3 / 4, 4 / 3),
                        torch.Generator().manual_seed(0)).double()
    area = (many[:, 2] * many[:, 3] / (240 * 320)).numpy()
    reference = np.array([h * w / (240 * 320) for _, _, h, w in
                          (T.RandomResizedCrop.get_params(torch.zeros(3, 240, 320), [0.35, 1.0], [3 / 4, 4 / 3])
                           for _ in range(1500))])
    assert abs(area.mean() - reference.mean()) < 0.02 and area.min() >= 0.34
    # a tall image and a ratio range that cannot hold it: torchvision's centre fallback
    tall = sample_crops(torch.tensor([[400, 100]]), (1.0, 1.0), (3 / 4, 4 / 3))
    assert tall.tolist() == [list(T.RandomResizedCrop.get_params(torch.zeros(3, 400, 100), [1.0, 1.0],
                                                                 [3 / 4, 4 / 3]))]


def test_rotation_fills_black_as_torchvision_does():
    grid, mask = sampling_grid(torch.tensor([[128, 128]] * 400), (128, 128), BatchAugment(32, rotate=30),
                               torch.Generator().manual_seed(0))
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    reference = np.mean([(T.RandomRotation(30)(white)[0] == 0).float().mean().item() for _ in range(400)])
    assert abs(mask.float().mean().item() - reference) < 0.015


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*[float(v) for v in rgb])[0] * 360


def _hue_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


@pytest.mark.parametrize("op", ["brightness", "contrast", "gamma", "blur", "noise"])
def test_photometric_operations_keep_hue(op):
    colours = [(0.7, 0.2, 0.2), (0.3, 0.6, 0.2), (0.6, 0.55, 0.15), (0.5, 0.3, 0.45)]  # red, green, gold, pink
    x = torch.zeros(8, 3, 32, 32)
    for i, c in enumerate(colours * 2):
        x[i] = torch.tensor(c)[:, None, None]
        x[i, :, 24:, 24:] = 0.5  # a grey corner, so that contrast has a mean to move towards
    strength = {"brightness": 0.3, "contrast": 0.4, "gamma": 0.4, "blur": 1.0, "noise": 0.03}[op]
    y = photometric(x.clone(), BatchAugment(32, **{op: strength}), torch.Generator().manual_seed(0))
    assert not torch.allclose(x, y)  # something happened
    for i, c in enumerate(colours * 2):
        centre = y[i, :, 4:16, 4:16].mean((1, 2))  # the patch, away from the grey corner
        assert _hue_diff(_hue(centre), _hue(c)) < 1.5, (op, c, centre)


def test_white_balance_moves_hue_only_slightly_and_keeps_grey_level():
    x = torch.tensor([0.7, 0.2, 0.2])[None, :, None, None].expand(16, 3, 8, 8).clone()
    y = photometric(x, BatchAugment(8, white_balance=0.05), torch.Generator().manual_seed(0))
    hues = [_hue(y[i, :, 0, 0]) for i in range(16)]
    assert max(_hue_diff(h, _hue((0.7, 0.2, 0.2))) for h in hues) < 4
    grey = photometric(torch.full((4, 3, 8, 8), 0.5), BatchAugment(8, white_balance=0.05))
    luma = 0.2989 * grey[:, 0] + 0.587 * grey[:, 1] + 0.114 * grey[:, 2]
    assert torch.allclose(luma, torch.full_like(luma, 0.5), atol=1e-3)


def test_from_train_config_reads_the_recipe():
    t = TrainConfig(crop_scale=0.5, hflip=0.2, vflip=0.0, rotate=10, rot90=0.25, elastic=0.0, colour_jitter=0.1)
    spec = from_train_config(PRE, t)
    assert (spec.size, spec.crop_scale, spec.hflip, spec.vflip, spec.rotate, spec.rot90) == \
        (64, (0.5, 1.0), 0.2, 0.0, 10.0, 0.25)
    assert spec.brightness == spec.contrast == 0.1 and spec.gamma == 0.0


@pytest.fixture(scope="module")
def photos() -> list[str]:
    if not GROCERY.is_dir():
        pytest.skip("../shared/data/grocery-apples not present")
    every = sorted(str(p) for p in GROCERY.rglob("*.jpg"))
    tall = [p for p in every if Image.open(p).size != (348, 348)]  # a few 348x464 photos
    return every[:4] + tall[:3]


@pytest.mark.parametrize("max_bytes", [4 << 30, 1], ids=["memory", "memmap"])
def test_store_holds_the_cache_pixels_and_crops_like_evaluation(photos, tmp_path, max_bytes):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    paths = photos + [str(tmp_path / "broken.jpg")]
    pre = Preprocessing(input_size=100, mean=PRE.mean, std=PRE.std)
    store = ImageStore(pre, max_bytes=max_bytes, folder=str(tmp_path), workers=2)
    assert store.scan(paths) == [str(tmp_path / "broken.jpg")] and len(store) == len(photos)
    cache = DecodedImages(pre)
    sizes = {tuple(store.sizes[store.index[p]].tolist()) for p in photos}
    assert (114, 114) in sizes and len(sizes) > 1 and all(min(s) == 114 for s in sizes)  # shorter side resized
    assert store.images.shape[-2:] == tuple(max(s[i] for s in sizes) for i in (0, 1))  # the largest image
    for p in photos:
        assert torch.equal(store.get(p), cache.get(p))
    rows = store.rows(photos)
    crops = BatchTransform(pre, None).eval(store.images[rows], store.sizes[rows])
    expected = torch.stack([create_eval_transform(pre)(cache.get(p)) for p in photos])
    assert torch.allclose(crops, expected, atol=1e-5)
    odd = torch.zeros(1, 3, 101, 103, dtype=torch.uint8).random_(0, 255, generator=torch.Generator().manual_seed(0))
    assert torch.equal(center_crop(odd, torch.tensor([[101, 103]]), 64)[0], T.CenterCrop(64)(odd[0]))


def test_image_size_reads_exif_orientation(tmp_path):
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: upright it is 40 x 60
    image.save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == load_image(tmp_path / "turned.jpg").size == (40, 60)


def test_device_path_trains_like_the_loader_path_without_augmentation(grocery_small, tmp_path):
    """--no-augment: both paths feed the same pixels in the same order, so they train the same model."""
    histories = {}
    for mode in ("off", "on"):
        cfg = tiny_config(epochs=2, augment=False, device_augment=mode)
        cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
        histories[mode] = pd.DataFrame(train_and_evaluate(cfg, tmp_path / mode).history)
    for col in ("train_loss", "val_loss", "val_macro_f1"):
        assert histories["on"][col].tolist() == pytest.approx(histories["off"][col].tolist(), rel=1e-4), col


def test_device_path_with_augmentation_and_bf16_is_seeded(grocery_small, tmp_path):
    cfg = tiny_config(epochs=2, device_augment="on", amp="bf16", rotate=20, rot90=0.5, elastic=10.0)
    cfg.data.data_dir, cfg.data.val_fraction = str(grocery_small), 0.34
    a = train_and_evaluate(cfg, tmp_path / "a").history
    b = train_and_evaluate(cfg, tmp_path / "b").history
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["device_augment"] == "on"
    assert not list((tmp_path / "a").glob("pomona-store-*"))  # no store file left in the run folder
