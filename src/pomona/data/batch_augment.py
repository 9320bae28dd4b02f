"""Training augmentation of whole batches on the device: uint8 images (as the decoded-image store keeps them:
N x 3 x H x W, each image in the top-left corner of its slot, with its own height and width) in, normalised
float32 model inputs out.

It is the batched twin of `preprocessing.create_train_transform`: both do what one `augment.AugmentSpec` says,
the same operations in the same order, drawn from the same distributions; this one for a whole batch in a few
tensor operations on whatever device the batch is on (the GPU, or the CPU in tests and CPU measurements):

- geometry, in ONE resampling: the random resized crop (torchvision's `RandomResizedCrop` draw: area fraction
  in `crop_scale`..1, log-uniform aspect ratio in `augment.CROP_RATIO`, 10 tries, then the centre-crop
  fallback), left-right and top-bottom flips, quarter turns, elastic distortion and rotation (with torchvision's
  black fill outside the rotated square) are composed into one sampling grid per image and applied by one
  `grid_sample` (bilinear; the CPU path resamples twice, bicubic then bilinear);
- the colour operations: `augment.colour`, the very code the CPU path runs;
- the normalisation of `preprocessing.normalization`, then random erasing (torchvision's `RandomErasing` draw,
  for every image at once).

What it cannot do it refuses by name (`DEVICE_UNSUPPORTED`, `check_device_support`), never ignores: JPEG
re-encoding needs the loader path (--device-augment off).

Random draws come from `generator` (or the device's default generator, which `training.fit.fit` seeds every epoch),
so a seed gives the same batch. Validation and evaluation never go through here: `center_crop` cuts the exact
pixels of `preprocessing.create_eval_transform` out of the stored images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import (CROP_RATIO, ERASING_RATIO, ERASING_SCALE, AugmentError, AugmentSpec, colour, flag, gaussian_blur,
                      uniform)
from .preprocessing import Preprocessing, normalization

DEVICE_UNSUPPORTED = ("jpeg",)
"""`AugmentSpec` fields the device path cannot do (JPEG coding of a batch on the GPU): refused when on."""


def check_device_support(spec: AugmentSpec | None, device_augment: str = "on") -> None:
    """Refuse (AugmentError, naming the flag) a spec with an operation the device path cannot do; `device_augment`
    is the --device-augment setting that chose this path, for the message."""
    if spec is None:
        return
    how = "--device-augment on" if device_augment == "on" else \
        f"--device-augment {device_augment}, which turns it on with CUDA"
    for name in DEVICE_UNSUPPORTED:
        if getattr(spec, name) > 0:
            raise AugmentError(f"{flag(name)} is not supported by the device augmentation path ({how}); use "
                               f"--device-augment off (per-image augmentation in the data loader) or {flag(name)} 0")


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
    target = area * uniform(n, scale[0], scale[1], device, generator, tries).double()
    log_ratio = uniform(n, math.log(ratio[0]), math.log(ratio[1]), device, generator, tries).double()
    aspect = torch.exp(log_ratio)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.double().argmax(1, keepdim=True)
    found = fits.any(1)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    h, w = h[:, 0], w[:, 0]
    top = torch.floor(uniform(n, 0, 1, device, generator).double() * (h - ch + 1))
    left = torch.floor(uniform(n, 0, 1, device, generator).double() * (w - cw + 1))
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


def _elastic_field(n: int, size: int, alpha: float, device, generator, sigma: float = 5.0) -> torch.Tensor:
    """torchvision's elastic displacement (uniform noise blurred with sigma, times alpha / size), in normalised
    grid units, N x S x S x 2."""
    d = torch.rand(n, 2, size, size, device=device, generator=generator) * 2 - 1
    radius = int(8 * sigma + 1) // 2
    d = gaussian_blur(d, torch.full((n,), sigma, device=device), min(radius, size - 1))
    return (d * (alpha / size)).permute(0, 2, 3, 1)


def sampling_grid(sizes: torch.Tensor, canvas: tuple[int, int], size: int, spec: AugmentSpec,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `grid_sample` grid (N x S x S x 2, normalised canvas coordinates) that crops, flips, turns, distorts
    and rotates every image in one resampling, and the mask of output pixels that rotation or distortion took
    outside the picture (filled black, as torchvision does), or None.

    Output pixel p (normalised square coordinates) reads the crop at Fh Fv Q (R p + d), where R is the rotation,
    d the elastic displacement, Q the quarter turn and Fh, Fv the flips: the image operations crop -> flips ->
    quarter turn -> elastic -> rotation, applied in that order, seen from the output."""
    device = sizes.device
    n, s = len(sizes), size
    boxes = sample_crops(sizes, (spec.crop_scale, 1.0), CROP_RATIO, generator).to(torch.float32)
    flip_x = torch.where(uniform(n, 0, 1, device, generator) < spec.hflip, -1.0, 1.0)
    flip_y = torch.where(uniform(n, 0, 1, device, generator) < spec.vflip, -1.0, 1.0)
    turns = torch.randint(1, 4, (n,), device=device, generator=generator).float()
    turns = torch.where(uniform(n, 0, 1, device, generator) < spec.rot90, turns, torch.zeros_like(turns))
    quarter = torch.round(_rotation(turns * (math.pi / 2)))  # exact 0/+-1 entries
    angle = uniform(n, -spec.rotate, spec.rotate, device, generator) * (math.pi / 180)
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


# ------------------------------------------------------------------------------------------------ batches
class BatchTransform:
    """uint8 store batches -> normalised float32 model inputs on their device: `train` (the augmentation of
    `spec`, or the centre crop when `spec` is None) and `eval` (the centre crop: exactly the pixels of
    `preprocessing.create_eval_transform`). A spec with an operation this path cannot do is refused here."""

    def __init__(self, pre: Preprocessing, spec: AugmentSpec | None, channels_last: bool = True):
        check_device_support(spec)
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
        x = self.normalize(augment_batch(images, sizes, self.pre.input_size, self.spec, generator), unit=1 / 255)
        if self.spec.random_erasing > 0:  # after the normalisation, as on the CPU path: 0 is the mean colour
            x = random_erasing(x, self.spec.random_erasing, generator)
        return x


def augment_batch(images: torch.Tensor, sizes: torch.Tensor, size: int, spec: AugmentSpec,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented RGB values in 0..1 (float32, N x 3 x size x size) of uint8 `images` (N x 3 x H x W, image i in
    the top-left sizes[i] = (height, width) of its slot): the geometry and colour of `spec` (random erasing, which
    follows the normalisation, is `random_erasing`)."""
    check_device_support(spec)
    grid, mask = sampling_grid(sizes.to(images.device), tuple(images.shape[-2:]), size, spec, generator)
    x = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x.mul_(1 / 255)
    if mask is not None:
        x = x.masked_fill_(mask[:, None], 0.0)
    x = colour(x, spec, generator)
    return x.clamp_(0, 1)


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator | None = None,
                   value: float = 0.0, tries: int = 10) -> torch.Tensor:
    """torchvision's `RandomErasing(p, ERASING_SCALE, ERASING_RATIO, value)` for every image of `x` (N x C x H x W,
    changed in place) at once: with probability `p`, the first of `tries` rectangles (area fraction uniform in
    `ERASING_SCALE`, log-uniform aspect ratio in `ERASING_RATIO`) that fits strictly inside is set to `value`."""
    n, _, h, w = x.shape
    device = x.device
    on = uniform(n, 0, 1, device, generator) < p
    target = (h * w) * uniform(n, ERASING_SCALE[0], ERASING_SCALE[1], device, generator, tries).double()
    aspect = torch.exp(uniform(n, math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1]), device, generator,
                               tries).double())
    eh, ew = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (eh < h) & (ew < w)
    first = fits.double().argmax(1, keepdim=True)
    on = on & fits.any(1)
    eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
    top = torch.floor(uniform(n, 0, 1, device, generator).double() * (h - eh + 1))
    left = torch.floor(uniform(n, 0, 1, device, generator).double() * (w - ew + 1))
    rows = torch.arange(h, device=device, dtype=torch.float64)[None, :, None]
    cols = torch.arange(w, device=device, dtype=torch.float64)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None]) &
              (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]) & on[:, None, None])
    return x.masked_fill_(inside[:, None], value)


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
