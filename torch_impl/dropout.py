"""Inverted dropout with an explicit keep-mask.

Twin of ``reference/dropout.py`` on torch tensors; forward and backward by hand.

    y  = x ⊙ mask / (1 - p)          (y = 0 when p = 1)
    dx = dy ⊙ mask / (1 - p)

Randomness is explicit: the mask is an argument, drawn by ``dropout_mask``
from a torch Generator (reference draws from a NumPy Generator, so the two
backends' masks for one seed differ; parity tests pass the same mask to both).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .checks import check_float_tensor, check_probability, shape_str


def dropout_mask(shape: Sequence[int], p: float, seed: int | torch.Generator) -> torch.Tensor:
    """Boolean keep-mask of ``shape``: each entry True with probability 1 - p.

    ``seed`` is an int, or a ``torch.Generator`` to draw from (its state
    advances; the mask is made on its device, else on the CPU).
    """
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}")
    if any(n < 0 for n in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {tuple(shape)}")
    p = check_probability("p", p, allow_one=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Generator)):
        raise TypeError(f"seed: expected an int or a torch.Generator, got {type(seed).__name__}")
    if isinstance(seed, int) and seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed}")
    if isinstance(seed, torch.Generator):
        generator = seed
    else:
        generator = torch.Generator().manual_seed(seed)
    # u in [0, 1): u >= p keeps with probability 1 - p, always for p = 0, never for p = 1.
    uniform = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return uniform >= p


class DropoutCache(NamedTuple):
    mask: torch.Tensor  # keep-mask, bool
    scale: float        # 1 / (1 - p), or 0 when p = 1


def dropout_forward(x: torch.Tensor, p: float,
                    mask: torch.Tensor) -> tuple[torch.Tensor, DropoutCache]:
    """y = x ⊙ mask / (1 - p) for x of any shape and a bool keep-mask of the same shape."""
    check_float_tensor("x", x)
    p = check_probability("p", p, allow_one=True)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool torch.Tensor (True = keep), "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != x.shape:
        raise ValueError(f"mask: expected shape {shape_str(tuple(x.shape))} (the shape of x), "
                         f"got {shape_str(tuple(mask.shape))}")
    # p = 1 drops everything: scale 0 instead of the 1/0 of the formula.
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return _scale_by_mask(x, mask, scale), DropoutCache(mask, scale)


def dropout_backward(dy: torch.Tensor, cache: DropoutCache) -> torch.Tensor:
    """dx = dy ⊙ mask / (1 - p)."""
    check_float_tensor("dy", dy, shape=tuple(cache.mask.shape), finite=False)
    return _scale_by_mask(dy, cache.mask, cache.scale)


def _scale_by_mask(a: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """a ⊙ mask · scale (the forward and the backward are the same map)."""
    return torch.where(mask, a * scale, 0.0)
