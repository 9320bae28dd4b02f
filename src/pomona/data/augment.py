"""The training augmentation, described once: `AugmentSpec`, which `augment_spec` reads from the training settings,
and the colour operations both paths run.

Two paths consume the one spec, with the same operations, order and distributions:

- `preprocessing.create_train_transform`: per image, in the data loader (--device-augment off; the default on the
  CPU): torchvision's geometry, JPEG, then `colour` on a batch of one, the normalisation, random erasing;
- `batch_augment`: whole uint8 batches on the training device (--device-augment on; auto = on with CUDA): the
  geometry as one `grid_sample`, then `colour`, the normalisation, random erasing. It refuses by name what it
  cannot do (`batch_augment.DEVICE_UNSUPPORTED`: JPEG), never ignores it.

Each field of the spec is either a probability (how often an operation happens, 0..1) or a strength (how much it
changes an image when it happens); the fixed ranges the operations draw from are the constants below, shared by
both paths. `tests/test_batch_augment.py` checks every field on both paths by distribution statistics, and fails
on a field it has no check for.

The order: random resized crop -> flips -> quarter turn -> elastic distortion -> rotation -> JPEG -> colour
(colour jitter, exposure and contrast, white balance as one linear map per image; blur; noise) -> normalisation
-> random erasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.errors import PomonaError

if TYPE_CHECKING:
    from ..config import TrainConfig

CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratio range of the random resized crop (log-uniform; torchvision's default)."""
PHOTOMETRIC_STRENGTH = 0.3
"""--photometric: exposure and contrast factors uniform in 1 +- this."""
WHITE_BALANCE_P = 0.5
"""--white-balance: the probability that an image's channel gains change."""
BLUR_SIGMA = (0.1, 1.5)
"""--blur: range of the Gaussian's sigma in output pixels."""
NOISE_STD = 0.03
"""--noise: largest standard deviation of the grey noise (pixel values in 0..1); the std is uniform in 0..this."""
JPEG_QUALITY = (30, 90)
"""--jpeg: range of the JPEG quality."""
ERASING_SCALE = (0.02, 0.25)
"""--random-erasing: area fraction of the erased rectangle (torchvision's RandomErasing draw)."""
ERASING_RATIO = (0.3, 3.3)
"""--random-erasing: aspect ratio range of the erased rectangle."""
LUMA = (0.2989, 0.587, 0.114)
"""Grey-level weights (torchvision's `rgb_to_grayscale`)."""

PROBABILITY, STRENGTH = "probability", "strength"


def _probability(doc: str):
    return field(default=0.0, metadata={"kind": PROBABILITY, "doc": doc})


def _strength(doc: str, default: float = 0.0, high: float = math.inf):
    return field(default=default, metadata={"kind": STRENGTH, "doc": doc, "high": high})


class AugmentError(PomonaError, ValueError):
    """An augmentation setting out of range, or one that the chosen augmentation path cannot do."""


def flag(name: str) -> str:
    """The command-line flag of a spec field (the field of `TrainConfig` of the same name)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class AugmentSpec:
    """What the training augmentation does to an image. The defaults switch every operation off (the random
    resized crop then takes the whole image, or its centre within `CROP_RATIO`)."""

    crop_scale: float = _strength("smallest area fraction of the random resized crop (the largest is 1)", 1.0, 1.0)
    hflip: float = _probability("a left-right flip")
    vflip: float = _probability("a top-bottom flip")
    rot90: float = _probability("a quarter turn (90, 180 or 270 degrees, equally likely)")
    elastic: float = _strength("elastic distortion: torchvision's alpha (sigma 5); 0 = off")
    rotate: float = _strength("largest rotation in degrees (uniform in +-rotate; black outside the picture)",
                              high=180.0)
    jpeg: float = _probability("re-encoding as JPEG at a quality uniform in `JPEG_QUALITY`")
    colour_jitter: float = _strength("brightness and contrast factors uniform in 1 +- this, on every image")
    photometric: float = _probability("an exposure and contrast change (factors uniform in 1 +- "
                                      "`PHOTOMETRIC_STRENGTH`) that keeps each pixel's hue")
    white_balance: float = _strength("largest relative change of a channel's gain (renormalised to keep the grey "
                                     "level), on an image with probability `WHITE_BALANCE_P`", high=1.0)
    blur: float = _probability("a Gaussian blur (sigma uniform in `BLUR_SIGMA`)")
    noise: float = _probability("grey Gaussian noise (the same on the three channels: hue kept), std uniform in "
                                "0..`NOISE_STD`")
    random_erasing: float = _probability("erasing a rectangle (`ERASING_SCALE` of the crop) to the mean colour "
                                         "(0 after the normalisation)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                raise AugmentError(f"{flag(f.name)} must be a number, not {value!r}")
            if f.metadata["kind"] == PROBABILITY and not 0 <= value <= 1:
                raise AugmentError(f"{flag(f.name)} is a probability: between 0 and 1, not {value}")
            if f.metadata["kind"] == STRENGTH and not 0 <= value <= f.metadata["high"]:
                raise AugmentError(f"{flag(f.name)} must be between 0 and {f.metadata['high']}, not {value}")
        if self.crop_scale <= 0:
            raise AugmentError(f"--crop-scale must be above 0, not {self.crop_scale}")
        if self.white_balance >= 1:
            raise AugmentError(f"--white-balance must be below 1, not {self.white_balance}")

    @property
    def colour(self) -> bool:
        """Whether any colour operation is on."""
        return any((self.colour_jitter, self.photometric, self.white_balance, self.blur, self.noise))


def augment_spec(t: "TrainConfig") -> AugmentSpec | None:
    """The training augmentation of settings `t`; None with --no-augment (training then takes the evaluation
    crop). Every field is read by name: a setting missing from `t` is an error, never a silent 0."""
    if not t.augment:
        return None
    return AugmentSpec(crop_scale=float(t.crop_scale), hflip=float(t.hflip), vflip=float(t.vflip),
                       rot90=float(t.rot90), elastic=float(t.elastic), rotate=float(t.rotate), jpeg=float(t.jpeg),
                       colour_jitter=float(t.colour_jitter), photometric=float(t.photometric),
                       white_balance=float(t.white_balance), blur=float(t.blur), noise=float(t.noise),
                       random_erasing=float(t.random_erasing))


# ------------------------------------------------------------------------------------------------ batched draws
def uniform(n: int, low: float, high: float, device, generator, *shape) -> torch.Tensor:
    """n x shape draws uniform in low..high."""
    return low + (high - low) * torch.rand(n, *shape, device=device, generator=generator)


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """Grey level of the last axis (R, G, B), with Python-number weights (no host-to-device copy)."""
    r, g, b = rgb.unbind(-1)
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (N x (2 radius + 1)) of per-image `sigma`."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding), as one grouped convolution."""
    n, c, hh, ww = x.shape
    k = gaussian_kernels(sigma, radius).repeat_interleave(c, 0)  # (n*c) x K
    y = x.reshape(1, n * c, hh, ww)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)


# ------------------------------------------------------------------------------------------------ colour
def colour(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """The colour operations of `spec` on RGB values in 0..1 (N x 3 x H x W, changed in place), clamped to 0..1,
    with per-image draws from `generator` (or the device's default generator):

    - colour jitter (brightness x * f and contrast, a blend with the image's mean grey), exposure and contrast of
      --photometric, and the white-balance gains, composed into one linear map per image and channel (clamped
      once, where torchvision clamps after each; a brightness and a contrast change commute without clamping);
    - Gaussian blur, with the same sigma on the three channels;
    - grey noise, the same on the three channels.

    Everything but the white balance keeps each pixel's hue (up to clipping); the white balance moves it slightly,
    keeping the grey level. Used by both paths: the loader path calls it on a batch of one."""
    n, device = len(x), x.device
    if not spec.colour:
        return x

    def per_image(low: float, high: float) -> torch.Tensor:
        return uniform(n, low, high, device, generator)

    def chosen(p: float) -> torch.Tensor:
        return per_image(0, 1) < p

    if spec.colour_jitter > 0 or spec.photometric > 0 or spec.white_balance > 0:
        gain, bias = torch.ones(n, 3, device=device), torch.zeros(n, 3, device=device)
        mean = x.mean((2, 3))  # the mean of the linear map's output is gain * mean + bias

        def brightness(f: torch.Tensor) -> None:
            nonlocal gain, bias
            gain, bias = gain * f[:, None], bias * f[:, None]

        def contrast(c: torch.Tensor) -> None:
            nonlocal gain, bias
            level = grey(gain * mean + bias)[:, None]  # the mean grey so far
            gain, bias = gain * c[:, None], bias * c[:, None] + (1 - c[:, None]) * level

        if spec.colour_jitter > 0:  # torchvision's ColorJitter(brightness=s, contrast=s): factors >= 0
            s = spec.colour_jitter
            brightness(per_image(max(0.0, 1 - s), 1 + s))
            contrast(per_image(max(0.0, 1 - s), 1 + s))
        if spec.photometric > 0:
            on = chosen(spec.photometric)
            s = PHOTOMETRIC_STRENGTH
            exposure, factor = per_image(1 - s, 1 + s), per_image(1 - s, 1 + s)
            contrast(torch.where(on, factor, torch.ones_like(factor)))
            brightness(torch.where(on, exposure, torch.ones_like(exposure)))
        if spec.white_balance > 0:
            on = chosen(WHITE_BALANCE_P)
            wb = uniform(n, 1 - spec.white_balance, 1 + spec.white_balance, device, generator, 3)
            wb = torch.where(on[:, None], wb / grey(wb)[:, None], torch.ones_like(wb))
            gain, bias = gain * wb, bias * wb
        x = torch.addcmul(bias[:, :, None, None], x, gain[:, :, None, None]).clamp_(0, 1)
    if spec.blur > 0:
        sigma = per_image(*BLUR_SIGMA)
        on = chosen(spec.blur)
        radius = min(int(math.ceil(3 * BLUR_SIGMA[1])), x.shape[-1] - 1, x.shape[-2] - 1)
        if device.type == "cpu":  # blur only the chosen images (on a GPU all of them: no wait for the device)
            picked = on.nonzero()[:, 0]
            if len(picked):
                x[picked] = gaussian_blur(x[picked], sigma[picked], radius).clamp_(0, 1)
        else:  # on a GPU: blur all of them (no wait for the device), keep the others exactly (TF32 convolutions)
            x = torch.where(on[:, None, None, None], gaussian_blur(x, sigma, radius).clamp_(0, 1), x)
    if spec.noise > 0:
        std = per_image(0, NOISE_STD)
        on = chosen(spec.noise)
        std = torch.where(on, std, torch.zeros_like(std))[:, None, None, None]
        noise = torch.randn(n, 1, *x.shape[2:], device=device, generator=generator)
        x = x.add_(noise.mul_(std)).clamp_(0, 1)
    return x
