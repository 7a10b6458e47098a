"""Affine map, the building block of every projection.

    y = x Wᵀ + b                     x (..., I), W (O, I), b (O,), y (..., O)

    dx = dy W                        (..., I)
    dW = Σ_n dy_nᵀ x_n               (O, I), summed over every leading index n
    db = Σ_n dy_n                    (O,)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_float_array, shape_str


class LinearCache(NamedTuple):
    x: np.ndarray       # (..., I)
    weight: np.ndarray  # W (O, I)
    has_bias: bool


def linear_forward(x: np.ndarray, weight: np.ndarray,
                   bias: np.ndarray | None = None) -> tuple[np.ndarray, LinearCache]:
    """y = x Wᵀ + b for x (..., I), weight (O, I), bias (O,) or None; y (..., O)."""
    check_float_array("weight", weight, shape=("O", "I"))
    out_features, in_features = weight.shape
    check_float_array("x", x, dtype=weight.dtype)
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected shape (..., {in_features}) (I = weight.shape[1]), "
                         f"got {shape_str(x.shape)}")
    if bias is not None:
        check_float_array("bias", bias, shape=(out_features,), dtype=weight.dtype)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y, LinearCache(x, weight, bias is not None)


def linear_backward(dy: np.ndarray,
                    cache: LinearCache) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(dx, dweight, dbias) for dy (..., O); dbias is None when the forward had no bias."""
    x, weight = cache.x, cache.weight
    check_float_array("dy", dy, shape=x.shape[:-1] + weight.shape[:1], dtype=weight.dtype,
                      finite=False)
    dx = dy @ weight
    # Flattening the leading dims makes dW one matmul over all positions at once.
    dy_2d = dy.reshape(-1, weight.shape[0])
    dweight = dy_2d.T @ x.reshape(-1, weight.shape[1])
    dbias = dy_2d.sum(axis=0) if cache.has_bias else None
    return dx, dweight, dbias
