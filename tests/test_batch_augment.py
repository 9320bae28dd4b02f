"""The device path of training on the CPU: batched augmentation (shapes, ranges, seeds, flips and crops doing what
they say, rotation like torchvision's, colour operations keeping hue), every field of the one augmentation spec
done alike by both paths (or refused by name), the uint8 image store, and training through them."""

import colorsys
import json
from dataclasses import dataclass, fields, replace
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from pomona.config import TrainConfig
from pomona.core.errors import PomonaError
from pomona.data.augment import CROP_RATIO, AugmentError, AugmentSpec, augment_spec, colour, flag
from pomona.data.batch_augment import (DEVICE_UNSUPPORTED, BatchTransform, augment_batch, center_crop, sample_crops,
                                       sampling_grid)
from pomona.data.images import image_size, load_image
from pomona.data.preprocessing import Preprocessing, create_eval_transform, create_train_transform, normalization
from pomona.training.datasets import DecodedImages, ImageStore
from pomona.training.train import train_and_evaluate

from conftest import GROCERY, tiny_config

PRE = Preprocessing(input_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PLAIN = AugmentSpec()  # every operation off: the whole (square) image


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
    spec = AugmentSpec(crop_scale=0.35, hflip=0.5, rotate=30, rot90=0.5, elastic=20, colour_jitter=0.3,
                       photometric=0.5, white_balance=0.05, blur=0.5, noise=0.5, random_erasing=0.5)
    x = augment_batch(images, sizes, 64, spec, torch.Generator().manual_seed(0))
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
    spec = AugmentSpec(crop_scale=0.35, rotate=30, rot90=0.5, colour_jitter=0.2, blur=0.5, noise=0.5,
                       random_erasing=0.5)
    transform = BatchTransform(PRE, spec)
    a = transform.train(images, sizes, torch.Generator().manual_seed(3))
    b = transform.train(images, sizes, torch.Generator().manual_seed(3))
    c = transform.train(images, sizes, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)  # without a generator: the default one (what fit.fit seeds every epoch)
    d = transform.train(images, sizes)
    torch.manual_seed(5)
    assert torch.equal(d, transform.train(images, sizes))


def test_flips_do_what_they_say():
    images, sizes = _coordinates(2, 64)
    expected = images.float() / 255
    plain = augment_batch(images, sizes, 64, PLAIN)
    assert torch.allclose(plain, expected, atol=1e-5)  # whole image at its own size: the pixels themselves
    h = augment_batch(images, sizes, 64, replace(PLAIN, hflip=1.0))
    assert torch.allclose(h, expected.flip(-1), atol=1e-5)
    v = augment_batch(images, sizes, 64, replace(PLAIN, vflip=1.0))
    assert torch.allclose(v, expected.flip(-2), atol=1e-5)
    q = augment_batch(images, sizes, 64, replace(PLAIN, rot90=1.0), torch.Generator().manual_seed(0))
    turns = [expected[i].rot90(k, (-2, -1)) for i in range(2) for k in (1, 2, 3)]
    assert all(any(torch.allclose(q[i], t, atol=1e-5) for t in turns[3 * i:3 * i + 3]) for i in range(2))


def test_crops_cut_the_box_they_draw_and_follow_torchvision_statistics():
    images, sizes = _coordinates(64, 200)
    spec = AugmentSpec(crop_scale=0.1)
    boxes = sample_crops(sizes, (0.1, 1.0), CROP_RATIO, torch.Generator().manual_seed(1))
    x = augment_batch(images, sizes, 50, spec, torch.Generator().manual_seed(1)) * 255  # the same draws
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
    grid, mask = sampling_grid(torch.tensor([[128, 128]] * 400), (128, 128), 32, AugmentSpec(rotate=30),
                               torch.Generator().manual_seed(0))
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    reference = np.mean([(T.RandomRotation(30)(white)[0] == 0).float().mean().item() for _ in range(400)])
    assert abs(mask.float().mean().item() - reference) < 0.015


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*[float(v) for v in rgb])[0] * 360


def _hue_diff(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


@pytest.mark.parametrize("op", ["colour_jitter", "photometric", "blur", "noise"])
def test_colour_operations_keep_hue(op):
    colours = [(0.7, 0.2, 0.2), (0.3, 0.6, 0.2), (0.6, 0.55, 0.15), (0.5, 0.3, 0.45)]  # red, green, gold, pink
    x = torch.zeros(8, 3, 32, 32)
    for i, c in enumerate(colours * 2):
        x[i] = torch.tensor(c)[:, None, None]
        x[i, :, 24:, 24:] = 0.5  # a grey corner, so that contrast has a mean to move towards
    strength = {"colour_jitter": 0.4, "photometric": 1.0, "blur": 1.0, "noise": 1.0}[op]
    y = colour(x.clone(), AugmentSpec(**{op: strength}), torch.Generator().manual_seed(0))
    assert not torch.allclose(x, y)  # something happened
    for i, c in enumerate(colours * 2):
        centre = y[i, :, 4:16, 4:16].mean((1, 2))  # the patch, away from the grey corner
        assert _hue_diff(_hue(centre), _hue(c)) < 1.5, (op, c, centre)


def test_white_balance_moves_hue_only_slightly_and_keeps_grey_level():
    x = torch.tensor([0.7, 0.2, 0.2])[None, :, None, None].expand(16, 3, 8, 8).clone()
    y = colour(x, AugmentSpec(white_balance=0.05), torch.Generator().manual_seed(0))
    hues = [_hue(y[i, :, 0, 0]) for i in range(16)]
    assert max(_hue_diff(h, _hue((0.7, 0.2, 0.2))) for h in hues) < 4
    grey = colour(torch.full((4, 3, 8, 8), 0.5), AugmentSpec(white_balance=0.05))
    luma = 0.2989 * grey[:, 0] + 0.587 * grey[:, 1] + 0.114 * grey[:, 2]
    assert torch.allclose(luma, torch.full_like(luma, 0.5), atol=1e-3)


# ------------------------------------------------------------------ one spec, two paths: every field, both paths
def test_augment_spec_reads_every_field_from_the_settings_and_checks_values():
    assert augment_spec(TrainConfig(augment=False)) is None
    default = augment_spec(TrainConfig())
    for f in fields(AugmentSpec):
        other = 0.25 if getattr(default, f.name) != 0.25 else 0.5
        spec = augment_spec(replace(TrainConfig(), **{f.name: other}))  # a TrainConfig field of the same name
        assert getattr(spec, f.name) == other, f.name
        assert f.metadata["kind"] in ("probability", "strength") and f.metadata["doc"], f.name
    probabilities = [f.name for f in fields(AugmentSpec) if f.metadata["kind"] == "probability"]
    assert {"hflip", "vflip", "rot90", "jpeg", "photometric", "blur", "noise", "random_erasing"} == set(probabilities)
    for name in probabilities:
        with pytest.raises(PomonaError, match=flag(name)):
            AugmentSpec(**{name: 1.5})
    with pytest.raises(PomonaError, match="--crop-scale"):
        AugmentSpec(crop_scale=0.0)
    with pytest.raises(PomonaError, match="--rotate"):
        AugmentSpec(rotate=-1.0)


SIDE = 96
"""The test image: red = column, green = row (ramps), blue = 6-pixel checks (something to blur); square, so that
the crop of a spec with every operation off is the whole image on both paths."""


def _test_image() -> torch.Tensor:
    r = torch.arange(SIDE, dtype=torch.float32) * 255 / (SIDE - 1)
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    checks = 64 + 128 * ((rows // 6 + cols // 6) % 2).float()
    return torch.stack([r[None, :].expand(SIDE, SIDE), r[:, None].expand(SIDE, SIDE), checks]).round().to(torch.uint8)


def cpu_path(spec: AugmentSpec, draws: int) -> torch.Tensor:
    """`draws` outputs (normalised, draws x 3 x 64 x 64) of the loader path's transform of the test image."""
    transform = create_train_transform(PRE, spec)
    image = _test_image()
    torch.manual_seed(0)
    return torch.stack([transform(image) for _ in range(draws)])


def device_path(spec: AugmentSpec, draws: int, device: str = "cpu") -> torch.Tensor:
    """The same from the device path: one batch of `draws` copies of the test image on `device`."""
    images = _test_image()[None].expand(draws, 3, SIDE, SIDE).contiguous().to(device)
    sizes = torch.tensor([[SIDE, SIDE]] * draws)
    out = BatchTransform(PRE, spec, channels_last=False).train(images, sizes,
                                                              torch.Generator(device).manual_seed(0))
    return out.cpu()


def _pixels(out: torch.Tensor) -> torch.Tensor:
    """Normalised outputs -> RGB values in 0..1."""
    scale, shift = (torch.from_numpy(a) for a in normalization(PRE))
    return (out - shift) / scale / 255


@dataclass(frozen=True)
class Stat:
    """A statistic of a batch of outputs (normalised) given the outputs of the spec with every operation off
    (`base`, as RGB in 0..1), and how close the two paths must come (absolute)."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tol: float
    expected: float | None = None
    """What it must be on both paths (within `tol`), where the meaning says so."""


def _changed(out, base, threshold: float = 2e-3):  # the fraction of draws the operation visibly changed
    return ((_pixels(out) - base).abs().amax((1, 2, 3)) > threshold).float().mean()


def _touched(out, base):  # the fraction of draws the operation changed at all
    return _changed(out, base, 1e-5)


def _left_right(out, base):  # red runs right to left: flipped
    x = _pixels(out)[:, 0]
    return (x[:, :, -4:].mean((1, 2)) < x[:, :, :4].mean((1, 2))).float().mean()


def _top_bottom(out, base):  # green runs bottom to top
    x = _pixels(out)[:, 1]
    return (x[:, -4:, :].mean((1, 2)) < x[:, :4, :].mean((1, 2))).float().mean()


def _sideways(out, base):  # red runs top to bottom: a 90 or 270 degree turn
    x = _pixels(out)[:, 0]
    return ((x[:, -4:, :].mean((1, 2)) - x[:, :4, :].mean((1, 2))).abs() > 0.5).float().mean()


def _span(out, base):  # the part of the picture's width a crop shows
    x = _pixels(out)[:, 0]
    return (x.amax((1, 2)) - x.amin((1, 2))).mean()


def _displacement(out, base):  # how far the pixels moved (red, green: the coordinates), away from the border
    return (_pixels(out) - base)[:, :2, 8:-8, 8:-8].abs().mean()


def _dark(out, base):  # the black left outside a rotated picture
    return 1 - (_pixels(out).mean((1, 2, 3)) / base.mean((1, 2, 3))).mean()


def _exposure_spread(out, base):  # spread of the overall brightness
    return (_pixels(out).mean((1, 2, 3)) / base.mean((1, 2, 3))).std()


def _balance_spread(out, base):  # spread of the red/green balance
    x = _pixels(out)
    return (x[:, 0].mean((1, 2)) / x[:, 1].mean((1, 2))).std()


def _sharpness(out, base):  # blue-channel detail kept
    def detail(x):
        return (x[:, 2, :, 1:] - x[:, 2, :, :-1]).abs().mean((1, 2))
    return (detail(_pixels(out)) / detail(base)).mean()


def _noise_level(out, base):  # standard deviation of what was added, away from the clipped border
    return (_pixels(out) - base)[:, :, 8:-8, 8:-8].std((1, 2, 3)).mean()


def _erased(out, base):  # the fraction of pixels erased (normalised 0 in every channel)
    return (out == 0).all(1).float().mean()


FIELD_CHECKS: dict[str, tuple[float, dict[str, Stat]]] = {
    "crop_scale": (0.1, {"span": Stat(_span, 0.03)}),
    "hflip": (0.3, {"flipped": Stat(_left_right, 0.07, expected=0.3)}),
    "vflip": (0.3, {"flipped": Stat(_top_bottom, 0.07, expected=0.3)}),
    "rot90": (0.6, {"changed": Stat(_changed, 0.07, expected=0.6),
                    "sideways": Stat(_sideways, 0.07, expected=0.4)}),
    "elastic": (100.0, {"displacement": Stat(_displacement, 0.004)}),
    "rotate": (30.0, {"dark": Stat(_dark, 0.01)}),
    "jpeg": (0.5, {"changed": Stat(_changed, 0.08, expected=0.5)}),
    "colour_jitter": (0.3, {"exposure spread": Stat(_exposure_spread, 0.02)}),
    "photometric": (0.5, {"changed": Stat(_changed, 0.08, expected=0.5),
                          "exposure spread": Stat(_exposure_spread, 0.02)}),
    "white_balance": (0.1, {"changed": Stat(_changed, 0.08, expected=0.5),
                            "balance spread": Stat(_balance_spread, 0.008)}),
    "blur": (0.5, {"changed": Stat(_touched, 0.08, expected=0.47),  # a sigma below ~0.2 changes nothing
                   "sharpness": Stat(_sharpness, 0.05)}),
    "noise": (0.5, {"changed": Stat(_changed, 0.08, expected=0.5), "noise level": Stat(_noise_level, 0.0015)}),
    "random_erasing": (0.5, {"changed": Stat(_changed, 0.08, expected=0.5), "erased": Stat(_erased, 0.012)}),
}
"""For every field of `AugmentSpec`: a value, and the statistics both paths must agree on (and that must move
away from the spec with every operation off). A field added to the spec without an entry here fails."""

DRAWS = {"elastic": 100, "rotate": 400}  # torchvision's elastic distortion and rotation are slow on the CPU
"""Draws per field where not 800."""


def check_field(name: str, device_path_outputs: Callable[[AugmentSpec, int], torch.Tensor]) -> None:
    """Both paths react to spec field `name` with the same statistics (or the device path refuses it by name)."""
    if name not in FIELD_CHECKS:
        pytest.fail(f"AugmentSpec.{name} has no check in FIELD_CHECKS: add one, and do it on both paths")
    value, stats = FIELD_CHECKS[name]
    spec, draws = replace(PLAIN, **{name: value}), DRAWS.get(name, 800)
    if name in DEVICE_UNSUPPORTED:
        with pytest.raises(AugmentError, match=f"{flag(name)} is not supported by the device augmentation path"):
            device_path_outputs(spec, 8)
        paths = {"cpu": cpu_path}
    else:
        paths = {"cpu": cpu_path, "device": device_path_outputs}
    measured = {}
    for path, outputs in paths.items():
        plain = outputs(PLAIN, draws)
        base, out = _pixels(plain), outputs(spec, draws)
        for stat_name, stat in stats.items():
            off, on = float(stat.fn(plain, base)), float(stat.fn(out, base))
            assert abs(on - off) > 2 * stat.tol, f"{path} path ignores {flag(name)}: {stat_name} {off} -> {on}"
            if stat.expected is not None:
                assert on == pytest.approx(stat.expected, abs=stat.tol), (path, name, stat_name)
            measured.setdefault(stat_name, {})[path] = on
    for stat_name, by_path in measured.items():
        if len(by_path) == 2:
            assert by_path["cpu"] == pytest.approx(by_path["device"], abs=FIELD_CHECKS[name][1][stat_name].tol), \
                (name, stat_name, by_path)


def test_every_spec_field_has_a_check():
    assert set(FIELD_CHECKS) == {f.name for f in fields(AugmentSpec)}


@pytest.mark.parametrize("name", [f.name for f in fields(AugmentSpec)])
def test_both_paths_do_each_spec_field_alike(name):
    check_field(name, device_path)


def test_training_refuses_what_the_device_path_cannot_do_before_writing(grocery_small, tmp_path):
    cfg = tiny_config(device_augment="on", jpeg=0.2)
    cfg.data.data_dir = str(grocery_small)
    with pytest.raises(AugmentError, match="--jpeg is not supported by the device augmentation path"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


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
