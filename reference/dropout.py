"""Inverted dropout with an explicit keep-mask.

    y  = x ⊙ mask / (1 - p)          (y = 0 when p = 1)
    dx = dy ⊙ mask / (1 - p)

Randomness is explicit: the mask is an argument, drawn by ``dropout_mask``
from a NumPy Generator (torch_impl draws from a torch Generator, so the two
backends' masks for one seed differ; parity tests pass the same mask to both).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .checks import check_float_array, check_probability, shape_str


def dropout_mask(shape: Sequence[int], p: float, seed: int | np.random.Generator) -> np.ndarray:
    """Boolean keep-mask of ``shape``: each entry True with probability 1 - p.

    ``seed`` is an int, or a ``numpy.random.Generator`` to draw from (its state advances).
    """
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"shape: expected a tuple of ints, got {shape!r}")
    if any(n < 0 for n in shape):
        raise ValueError(f"shape: expected non-negative sizes, got {tuple(shape)}")
    p = check_probability("p", p, allow_one=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, np.random.Generator)):
        raise TypeError(f"seed: expected an int or a numpy.random.Generator, "
                        f"got {type(seed).__name__}")
    if isinstance(seed, (int, np.integer)) and seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed}")
    rng = np.random.default_rng(seed)
    # u in [0, 1): u >= p keeps with probability 1 - p, always for p = 0, never for p = 1.
    return rng.random(tuple(int(n) for n in shape)) >= p


class DropoutCache(NamedTuple):
    mask: np.ndarray  # keep-mask, bool
    scale: float      # 1 / (1 - p), or 0 when p = 1


def dropout_forward(x: np.ndarray, p: float, mask: np.ndarray) -> tuple[np.ndarray, DropoutCache]:
    """y = x ⊙ mask / (1 - p) for x of any shape and a bool keep-mask of the same shape."""
    check_float_array("x", x)
    p = check_probability("p", p, allow_one=True)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(f"mask: expected a bool numpy.ndarray (True = keep), "
                        f"got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != x.shape:
        raise ValueError(f"mask: expected shape {shape_str(x.shape)} (the shape of x), "
                         f"got {shape_str(mask.shape)}")
    # p = 1 drops everything: scale 0 instead of the 1/0 of the formula.
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return _scale_by_mask(x, mask, scale), DropoutCache(mask, scale)


def dropout_backward(dy: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """dx = dy ⊙ mask / (1 - p)."""
    check_float_array("dy", dy, shape=cache.mask.shape, finite=False)
    return _scale_by_mask(dy, cache.mask, cache.scale)


def _scale_by_mask(a: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """a ⊙ mask · scale in the dtype of ``a`` (the forward and the backward are the same map)."""
    return np.where(mask, a * scale, 0.0).astype(a.dtype, copy=False)
