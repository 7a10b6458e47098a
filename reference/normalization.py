"""Layer normalization over the last axis (torch.nn.LayerNorm with normalized_shape = (D,)).

For one row x (D,), with biased variance as in torch:

    μ = (1/D) Σ_i x_i           σ² = (1/D) Σ_i (x_i - μ)²        r = 1 / √(σ² + ε)
    x̂ = (x - μ) r               y = x̂ ⊙ w + b                  (w, b (D,) or None)

Backward, from dy (summing over every leading index n for the parameters):

    dw = Σ_n dy_n ⊙ x̂_n         db = Σ_n dy_n
    dx̂ = dy ⊙ w
    dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂))      (means over the last axis)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_float_array, shape_str


class LayerNormCache(NamedTuple):
    x_hat: np.ndarray            # x̂ (..., D)
    rstd: np.ndarray             # r (..., 1)
    weight: np.ndarray | None    # w (D,)
    has_bias: bool


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return float(eps)


def layer_norm_forward(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
                       eps: float = 1e-5) -> tuple[np.ndarray, LayerNormCache]:
    """y = (x - μ) / √(σ² + ε) ⊙ w + b over the last axis of x (..., D); y (..., D)."""
    check_float_array("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape (..., D) with D >= 1, got {shape_str(x.shape)}")
    features = x.shape[-1]
    if weight is not None:
        check_float_array("weight", weight, shape=(features,), dtype=x.dtype)
    if bias is not None:
        check_float_array("bias", bias, shape=(features,), dtype=x.dtype)
    eps = _check_eps(eps)
    mu = x.mean(axis=-1, keepdims=True)
    centered = x - mu
    var = (centered * centered).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = centered * rstd
    y = x_hat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False), LayerNormCache(x_hat, rstd, weight, bias is not None)


def layer_norm_backward(dy: np.ndarray, cache: LayerNormCache
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(dx (..., D), dweight (D,), dbias (D,)); dweight/dbias None where the forward had none."""
    x_hat, rstd, weight = cache.x_hat, cache.rstd, cache.weight
    check_float_array("dy", dy, shape=x_hat.shape, dtype=x_hat.dtype, finite=False)
    features = x_hat.shape[-1]
    dweight = (dy * x_hat).reshape(-1, features).sum(axis=0) if weight is not None else None
    dbias = dy.reshape(-1, features).sum(axis=0) if cache.has_bias else None
    dx_hat = dy * weight if weight is not None else dy
    dx = rstd * (dx_hat - dx_hat.mean(axis=-1, keepdims=True)
                 - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True))
    return dx.astype(x_hat.dtype, copy=False), dweight, dbias
