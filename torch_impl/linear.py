"""Affine map, the building block of every projection.

Twin of ``reference/linear.py`` on torch tensors; forward and backward by hand.

    y = x Wᵀ + b                     x (..., I), W (O, I), b (O,), y (..., O)

    dx = dy W                        (..., I)
    dW = Σ_n dy_nᵀ x_n               (O, I), summed over every leading index n
    db = Σ_n dy_n                    (O,)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import check_float_tensor, shape_str


class LinearCache(NamedTuple):
    x: torch.Tensor       # (..., I)
    weight: torch.Tensor  # W (O, I)
    has_bias: bool


def linear_forward(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, LinearCache]:
    """y = x Wᵀ + b for x (..., I), weight (O, I), bias (O,) or None; y (..., O)."""
    check_float_tensor("weight", weight, shape=("O", "I"))
    out_features, in_features = weight.shape
    check_float_tensor("x", x, dtype=weight.dtype)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected shape (..., {in_features}) (I = weight.shape[1]), "
                         f"got {shape_str(tuple(x.shape))}")
    if bias is not None:
        check_float_tensor("bias", bias, shape=(out_features,), dtype=weight.dtype)
    x_2d = x.reshape(-1, in_features)
    # addmm fuses the bias add into the matmul.
    y_2d = x_2d @ weight.t() if bias is None else torch.addmm(bias, x_2d, weight.t())
    return y_2d.reshape(*x.shape[:-1], out_features), LinearCache(x, weight, bias is not None)


def linear_backward(dy: torch.Tensor, cache: LinearCache
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dweight, dbias) for dy (..., O); dbias is None when the forward had no bias."""
    x, weight = cache.x, cache.weight
    check_float_tensor("dy", dy, shape=tuple(x.shape[:-1]) + tuple(weight.shape[:1]),
                       dtype=weight.dtype, finite=False)
    # Flattening the leading dims makes dW one matmul over all positions at once.
    dy_2d = dy.reshape(-1, weight.shape[0])
    dx = (dy_2d @ weight).reshape(x.shape)
    dweight = dy_2d.t() @ x.reshape(-1, weight.shape[1])
    dbias = dy_2d.sum(dim=0) if cache.has_bias else None
    return dx, dweight, dbias
