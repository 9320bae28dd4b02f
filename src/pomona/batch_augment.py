"""Training augmentation of whole batches on the device: uint8 images (as the decoded-image store keeps them:
N x 3 x H x W, each image in the top-left corner of its slot, with its own height and width) in, normalised
float32 model inputs out.

It is the batched twin of `preprocessing.create_train_transform`: the same operations in the same order, drawn
from the same distributions, done for a whole batch in a few tensor operations on whatever device the batch is
on (the GPU, or the CPU in tests and CPU measurements):

- geometry, in ONE resampling: the random resized crop (torchvision's `RandomResizedCrop` draw: area fraction
  in `crop_scale`, log-uniform aspect ratio in `ratio`, 10 tries, then the centre-crop fallback), left-right and
  top-bottom flips, quarter turns, elastic distortion and rotation (with torchvision's black fill outside the
  rotated square) are composed into one sampling grid per image and applied by one `grid_sample` (bilinear; the
  CPU path resamples twice, bicubic then bilinear);
- photometric operations that keep the hue of every pixel: brightness (x * f), contrast (blend with the image's
  mean grey), gamma on the value channel (each pixel scaled by V**gamma / V), grey noise (the same on the three
  channels), Gaussian blur; and mild white-balance gains, the one operation that moves hue, slightly (gains
  within 1 +- `white_balance`, renormalised to keep the luminance);
- the normalisation of `preprocessing.normalization`.

Random draws come from `generator` (or the device's default generator, which `train.fit` seeds every epoch),
so a seed gives the same batch. Validation and evaluation never go through here: `center_crop` cuts the exact
pixels of `preprocessing.create_eval_transform` out of the stored images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .preprocessing import Preprocessing, normalization

if TYPE_CHECKING:
    from .config import TrainConfig

LUMA = (0.2989, 0.587, 0.114)
"""Grey-level weights (torchvision's `rgb_to_grayscale`)."""


@dataclass(frozen=True)
class BatchAugment:
    """What `augment_batch` does to a batch; `from_train_config` reads it from the training settings."""

    size: int
    """Output side in pixels."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Area fraction of the random resized crop."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of the random resized crop."""
    hflip: float = 0.5
    """Probability of a left-right flip."""
    vflip: float = 0.5
    """Probability of a top-bottom flip."""
    rot90: float = 0.0
    """Probability of a quarter turn (90, 180 or 270 degrees)."""
    rotate: float = 0.0
    """Largest rotation in degrees (uniform in +-rotate), black outside the rotated square."""
    elastic: float = 0.0
    """Elastic distortion strength (torchvision's alpha, sigma 5); 0 = off."""
    brightness: float = 0.0
    """Brightness factor uniform in 1 +- brightness (x * f: hue kept)."""
    contrast: float = 0.0
    """Contrast factor uniform in 1 +- contrast (blend with the mean grey: hue kept)."""
    gamma: float = 0.0
    """Gamma exp(uniform(+-gamma)) applied to the value channel (each pixel scaled: hue kept)."""
    white_balance: float = 0.0
    """Per-channel gains uniform in 1 +- white_balance, renormalised to keep the luminance (moves hue slightly)."""
    blur: float = 0.0
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    """Range of the blur's sigma in output pixels."""
    noise: float = 0.0
    """Largest standard deviation of grey Gaussian noise (pixel values in 0..1); the std is uniform in 0..noise."""

    @property
    def photometric(self) -> bool:
        return any((self.brightness, self.contrast, self.gamma, self.white_balance, self.blur, self.noise))


def from_train_config(pre: Preprocessing, t: "TrainConfig") -> BatchAugment:
    """The batch augmentation of training settings `t` (the same operations as `create_train_transform`).
    `colour_jitter` sets brightness and contrast, as torchvision's ColorJitter does on the CPU path; the
    photometric settings `brightness`, `contrast`, `gamma`, `white_balance`, `blur`, `noise` are read when the
    settings have them."""
    jitter = float(t.colour_jitter)

    def setting(name: str, default: float = 0.0) -> float:
        return float(getattr(t, name, default) or 0.0)

    return BatchAugment(
        size=pre.input_size, crop_scale=(float(t.crop_scale), 1.0), hflip=float(t.hflip), vflip=float(t.vflip),
        rot90=float(t.rot90), rotate=float(t.rotate), elastic=float(t.elastic),
        brightness=max(jitter, setting("brightness")), contrast=max(jitter, setting("contrast")),
        gamma=setting("gamma"), white_balance=setting("white_balance"), blur=setting("blur"),
        noise=setting("noise"))


def _uniform(n: int, low: float, high: float, device, generator, *shape) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, device=device, generator=generator)


# ------------------------------------------------------------------------------------------------ geometry
def sample_crops(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None = None, tries: int = 10) -> torch.Tensor:
    """Random resized crop boxes (top, left, height, width), int64 N x 4, for images of `sizes` (N x 2: height,
    width): torchvision's `RandomResizedCrop.get_params` for every image at once (the first of `tries` draws
    that fits, else the centre crop of the largest box within `ratio`)."""
    device = sizes.device
    n = len(sizes)
    h, w = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = h * w
    target = area * _uniform(n, scale[0], scale[1], device, generator, tries).double()
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), device, generator, tries).double()
    aspect = torch.exp(log_ratio)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.double().argmax(1, keepdim=True)
    found = fits.any(1)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    h, w = h[:, 0], w[:, 0]
    top = torch.floor(_uniform(n, 0, 1, device, generator).double() * (h - ch + 1))
    left = torch.floor(_uniform(n, 0, 1, device, generator).double() * (w - cw + 1))
    # the fallback: the whole image, cut to the nearest ratio in range, centred
    in_ratio = w / h
    fw = torch.where(in_ratio < ratio[0], w, torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w))
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.where(found, top, torch.div(h - ch, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(w - cw, 2, rounding_mode="floor"))
    return torch.stack([top, left, ch, cw], 1).long()


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """2 x 2 rotation matrices (N x 2 x 2) of angles in radians."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (N x (2 radius + 1)) of per-image `sigma`."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding), as one grouped convolution."""
    n, c, hh, ww = x.shape
    k = _gaussian_kernels(sigma, radius).repeat_interleave(c, 0)  # (n*c) x K
    y = x.reshape(1, n * c, hh, ww)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)


def _elastic_field(n: int, size: int, alpha: float, device, generator, sigma: float = 5.0) -> torch.Tensor:
    """torchvision's elastic displacement (uniform noise blurred with sigma, times alpha / size), in normalised
    grid units, N x S x S x 2."""
    d = torch.rand(n, 2, size, size, device=device, generator=generator) * 2 - 1
    radius = int(8 * sigma + 1) // 2
    d = _blur(d, torch.full((n,), sigma, device=device), min(radius, size - 1))
    return (d * (alpha / size)).permute(0, 2, 3, 1)


def sampling_grid(sizes: torch.Tensor, canvas: tuple[int, int], spec: BatchAugment,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `grid_sample` grid (N x S x S x 2, normalised canvas coordinates) that crops, flips, turns, distorts
    and rotates every image in one resampling, and the mask of output pixels that rotation or distortion took
    outside the picture (filled black, as torchvision does), or None.

    Output pixel p (normalised square coordinates) reads the crop at Fh Fv Q (R p + d), where R is the rotation,
    d the elastic displacement, Q the quarter turn and Fh, Fv the flips: the image operations crop -> flips ->
    quarter turn -> elastic -> rotation, applied in that order, seen from the output."""
    device = sizes.device
    n, s = len(sizes), spec.size
    boxes = sample_crops(sizes, spec.crop_scale, spec.ratio, generator).to(torch.float32)
    flip_x = torch.where(_uniform(n, 0, 1, device, generator) < spec.hflip, -1.0, 1.0)
    flip_y = torch.where(_uniform(n, 0, 1, device, generator) < spec.vflip, -1.0, 1.0)
    turns = torch.randint(1, 4, (n,), device=device, generator=generator).float()
    turns = torch.where(_uniform(n, 0, 1, device, generator) < spec.rot90, turns, torch.zeros_like(turns))
    quarter = torch.round(_rotation(turns * (math.pi / 2)))  # exact 0/+-1 entries
    angle = _uniform(n, -spec.rotate, spec.rotate, device, generator) * (math.pi / 180)
    rotation = _rotation(angle)
    height, width = canvas
    top, left, ch, cw = boxes.unbind(1)
    linear = torch.diag_embed(torch.stack([cw / width, ch / height], 1)) @ \
        torch.diag_embed(torch.stack([flip_x, flip_y], 1)) @ quarter
    offset = torch.stack([(2 * left + cw) / width - 1, (2 * top + ch) / height - 1], 1)
    # output pixel centres (align_corners=False); each grid coordinate is a_x u + a_y v + b per image, summed from
    # an N x 1 x S and an N x S x 1 part (no N x S x S x 3 base grid)
    axis = (torch.arange(s, device=device, dtype=torch.float32) * 2 + 1) / s - 1
    u, v = axis[None, None, :], axis[None, :, None]

    def affine(m: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both coordinates of the map p -> m p + b on the output grid, N x S x S each."""
        return tuple((m[:, i, 0, None, None] * u) + (m[:, i, 1, None, None] * v + b[:, i, None, None])
                     for i in (0, 1))

    gx, gy = affine(linear @ rotation, offset)
    mask = None
    if spec.rotate > 0 or spec.elastic > 0:
        qx, qy = affine(rotation, torch.zeros(n, 2, device=device))  # R p, where the rotated square reads
        if spec.elastic > 0:
            d = _elastic_field(n, s, spec.elastic, device, generator)
            qx, qy = qx + d[..., 0], qy + d[..., 1]
            gx = gx + linear[:, 0, 0, None, None] * d[..., 0] + linear[:, 0, 1, None, None] * d[..., 1]
            gy = gy + linear[:, 1, 0, None, None] * d[..., 0] + linear[:, 1, 1, None, None] * d[..., 1]
        mask = (qx.abs() > 1) | (qy.abs() > 1)
    # stay on the picture's own pixel centres (edge pixels repeat, as in torchvision's resize), never the padding
    h, w = sizes[:, 0].float(), sizes[:, 1].float()
    gx = torch.minimum(gx.clamp_(min=1 / width - 1), ((2 * w - 1) / width - 1)[:, None, None])
    gy = torch.minimum(gy.clamp_(min=1 / height - 1), ((2 * h - 1) / height - 1)[:, None, None])
    grid = torch.stack([gx, gy], -1)
    return grid, mask


# ------------------------------------------------------------------------------------------------ colour
def _grey(rgb: torch.Tensor) -> torch.Tensor:
    """Grey level of the last axis (R, G, B), with Python-number weights (no host-to-device copy)."""
    r, g, b = rgb.unbind(-1)
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


def photometric(x: torch.Tensor, spec: BatchAugment, generator: torch.Generator | None = None) -> torch.Tensor:
    """The photometric operations of `spec` on RGB values in 0..1 (N x 3 x H x W, changed in place), clamped to
    0..1: brightness, white balance and contrast as one per-image, per-channel linear map (clamped once, where
    torchvision clamps after each), then gamma, blur and noise."""
    n, device = len(x), x.device

    def per_image(low: float, high: float) -> torch.Tensor:
        return _uniform(n, low, high, device, generator)

    if spec.brightness > 0 or spec.white_balance > 0 or spec.contrast > 0:
        gain = torch.ones(n, 3, device=device)
        if spec.brightness > 0:
            gain = gain * per_image(1 - spec.brightness, 1 + spec.brightness)[:, None]
        if spec.white_balance > 0:
            wb = _uniform(n, 1 - spec.white_balance, 1 + spec.white_balance, device, generator, 3)
            gain = gain * (wb / _grey(wb)[:, None])
        bias = torch.zeros(n, 1, device=device)
        if spec.contrast > 0:
            factor = per_image(1 - spec.contrast, 1 + spec.contrast)[:, None]
            mean = _grey(x.mean((2, 3)) * gain)  # the mean grey after the gains
            gain, bias = gain * factor, (1 - factor) * mean[:, None]
        x = torch.addcmul(bias[:, :, None, None], x, gain[:, :, None, None]).clamp_(0, 1)
    if spec.gamma > 0:
        value = x.amax(1, keepdim=True).clamp_min_(1e-4)  # each pixel scaled by V**gamma / V: V -> V**gamma
        exponent = (torch.exp(per_image(-spec.gamma, spec.gamma)) - 1)[:, None, None, None]
        x = x.mul_(value.pow_(exponent)).clamp_(0, 1)
    if spec.blur > 0:
        sigma = per_image(*spec.blur_sigma)
        chosen = per_image(0, 1) < spec.blur
        radius = min(int(math.ceil(3 * spec.blur_sigma[1])), x.shape[-1] - 1)
        if device.type == "cpu":  # blur only the chosen images (on a GPU all of them: no wait for the device)
            picked = chosen.nonzero()[:, 0]
            if len(picked):
                x[picked] = _blur(x[picked], sigma[picked], radius).clamp_(0, 1)
        else:
            x = _blur(x, torch.where(chosen, sigma, torch.zeros_like(sigma)), radius).clamp_(0, 1)
    if spec.noise > 0:
        std = per_image(0, spec.noise)[:, None, None, None]
        noise = torch.randn(n, 1, *x.shape[2:], device=device, generator=generator)
        x = x.add_(noise.mul_(std)).clamp_(0, 1)
    return x


# ------------------------------------------------------------------------------------------------ batches
class BatchTransform:
    """uint8 store batches -> normalised float32 model inputs on their device: `train` (the augmentation of
    `spec`, or the centre crop when `spec` is None) and `eval` (the centre crop: exactly the pixels of
    `preprocessing.create_eval_transform`)."""

    def __init__(self, pre: Preprocessing, spec: BatchAugment | None, channels_last: bool = True):
        self.pre, self.spec, self.channels_last = pre, spec, channels_last
        scale, shift = normalization(pre)
        self._norm = {"cpu": (torch.from_numpy(scale), torch.from_numpy(shift))}

    def normalize(self, x: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
        """`x` (pixel values times `unit`, e.g. 1/255 for 0..1) -> the model's normalised float input."""
        key = str(x.device)
        if key not in self._norm:
            scale, shift = self._norm["cpu"]
            self._norm[key] = (scale.to(x.device), shift.to(x.device))
        scale, shift = self._norm[key]
        out = torch.addcmul(shift, x.to(torch.float32), scale / unit)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def eval(self, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return self.normalize(center_crop(images, sizes, self.pre.input_size))

    def train(self, images: torch.Tensor, sizes: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
        if self.spec is None:
            return self.eval(images, sizes)
        return self.normalize(augment_batch(images, sizes, self.spec, generator), unit=1 / 255)


def augment_batch(images: torch.Tensor, sizes: torch.Tensor, spec: BatchAugment,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented RGB values in 0..1 (float32, N x 3 x S x S) of uint8 `images` (N x 3 x H x W, image i in the
    top-left sizes[i] = (height, width) of its slot)."""
    grid, mask = sampling_grid(sizes.to(images.device), tuple(images.shape[-2:]), spec, generator)
    x = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x.mul_(1 / 255)
    if mask is not None:
        x = x.masked_fill_(mask[:, None], 0.0)
    if spec.photometric:
        x = photometric(x, spec, generator)
    return x.clamp_(0, 1)


def center_crop(images: torch.Tensor, sizes: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` x `size` pixels (uint8, N x 3 x size x size) of each image, exactly where torchvision's
    `CenterCrop` cuts them (offsets rounded half to even, as Python's round)."""
    sizes = sizes.to(images.device)
    top = torch.round((sizes[:, 0] - size).double() / 2).long()
    left = torch.round((sizes[:, 1] - size).double() / 2).long()
    if (top < 0).any() or (left < 0).any():
        raise ValueError(f"an image is smaller than the {size} px crop")
    r = torch.arange(size, device=images.device)
    rows = (top[:, None] + r)[:, None, :, None]
    cols = (left[:, None] + r)[:, None, None, :]
    n = torch.arange(len(images), device=images.device)[:, None, None, None]
    c = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[n, c, rows, cols]
