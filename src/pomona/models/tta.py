"""Test-time augmentation: the views of a batch and the average of a model's probabilities over them.

One list of views serves torch tensors and numpy arrays alike (NCHW batches: flips and quarter turns act on the
last two axes). Training's validation, `predict` (PyTorch and ONNX Runtime), the frozen-feature fast path and
`explain` all average through `average_probs`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, get_args

from ..config import View

VIEWS: tuple[str, ...] = get_args(View)
"""Every view `apply_view` knows: the image, its left-right and top-bottom flips, its quarter turns."""
FLIP = ("identity", "hflip")
"""The default test-time augmentation: the image and its left-right flip."""


def views_for(tta: bool | Sequence[str]) -> tuple[str, ...]:
    """The views of a `tta` setting: True = `FLIP`, False = the image alone, or an explicit list of views."""
    if tta is True:
        return FLIP
    if tta is False or tta is None:
        return ("identity",)
    unknown = [v for v in tta if v not in VIEWS]
    if unknown or not len(tta):
        raise ValueError(f"unknown test-time views {unknown}; known: {', '.join(VIEWS)}" if unknown else
                         "no test-time views given; the image alone is ['identity']")
    return tuple(tta)


def apply_view(x: Any, view: str) -> Any:
    """`x` (a torch tensor or numpy array, ...xHxW) seen through `view`."""
    if view == "identity":
        return x
    if hasattr(x, "dim"):  # torch
        import torch

        if view in ("hflip", "vflip"):
            return torch.flip(x, dims=[-1 if view == "hflip" else -2])
        return torch.rot90(x, _quarter_turns(view), dims=(-2, -1))
    import numpy as np

    if view in ("hflip", "vflip"):
        return np.flip(x, axis=-1 if view == "hflip" else -2)
    return np.rot90(x, _quarter_turns(view), axes=(-2, -1))


def _quarter_turns(view: str) -> int:
    turns = {"rot90": 1, "rot180": 2, "rot270": 3}
    if view not in turns:
        raise ValueError(f"unknown test-time view {view!r}; known: {', '.join(VIEWS)}")
    return turns[view]


def average_probs(fn: Callable[[Any], Any], x: Any, views: Sequence[str] = FLIP,
                  view: Callable[[Any, str], Any] = apply_view, together: bool = False) -> Any:
    """The mean over `views` of `fn(view(x, v))`, where `fn` maps a batch to class probabilities.

    `view` says where a view comes from: by default it is computed from `x`; the fast path passes features
    already computed per view. `together=True` makes one call of `fn` on all views stacked along the batch axis
    (one ONNX Runtime call instead of several)."""
    views = tuple(views)
    if together and len(views) > 1:
        parts = [view(x, v) for v in views]
        if hasattr(x, "dim"):
            import torch

            probs = fn(torch.cat(parts))
        else:
            import numpy as np

            probs = fn(np.concatenate(parts))
        n = len(probs) // len(views)
        outs = [probs[i * n:(i + 1) * n] for i in range(len(views))]
    else:
        outs = [fn(view(x, v)) for v in views]
    total = outs[0]
    for p in outs[1:]:
        total = total + p
    return total / len(views) if len(views) > 1 else total
