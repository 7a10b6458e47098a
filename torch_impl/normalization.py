"""Layer normalization over the last axis (torch.nn.LayerNorm with normalized_shape = (D,)).

Twin of ``reference/normalization.py`` on torch tensors; forward and backward by hand.
For one row x (D,), with biased variance as in torch:

    μ = (1/D) Σ_i x_i           σ² = (1/D) Σ_i (x_i - μ)²        r = 1 / √(σ² + ε)
    x̂ = (x - μ) r               y = x̂ ⊙ w + b                  (w, b (D,) or None)

Backward, from dy (summing over every leading index n for the parameters):

    dw = Σ_n dy_n ⊙ x̂_n         db = Σ_n dy_n
    dx̂ = dy ⊙ w
    dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂))      (means over the last axis)

bf16/fp16 inputs are normalized in float32 (the statistics of a row need it) and the
results cast back, as torch does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .checks import check_float_tensor, shape_str


class LayerNormCache(NamedTuple):
    x_hat: Tensor            # x̂ (..., D), in the compute dtype (float32 for bf16/fp16)
    rstd: Tensor             # r (..., 1), compute dtype
    weight: Tensor | None    # w (D,)
    has_bias: bool


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return float(eps)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float = 1e-5) -> tuple[Tensor, LayerNormCache]:
    """y = (x - μ) / √(σ² + ε) ⊙ w + b over the last axis of x (..., D); y (..., D)."""
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape (..., D) with D >= 1, "
                         f"got {shape_str(tuple(x.shape))}")
    features = x.shape[-1]
    if weight is not None:
        check_float_tensor("weight", weight, shape=(features,), dtype=x.dtype)
    if bias is not None:
        check_float_tensor("bias", bias, shape=(features,), dtype=x.dtype)
    eps = _check_eps(eps)
    xc = x.to(_compute_dtype(x.dtype))
    mu = xc.mean(dim=-1, keepdim=True)
    centered = xc - mu
    var = (centered * centered).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    x_hat = centered * rstd
    y = x_hat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), LayerNormCache(x_hat, rstd, weight, bias is not None)


@torch.no_grad()
def layer_norm_backward(dy: Tensor, cache: LayerNormCache
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx (..., D), dweight (D,), dbias (D,)); dweight/dbias None where the forward had none."""
    x_hat, rstd, weight = cache.x_hat, cache.rstd, cache.weight
    check_float_tensor("dy", dy, shape=tuple(x_hat.shape), finite=False,
                       dtype=None if weight is None else weight.dtype)
    features = x_hat.shape[-1]
    dyc = dy.to(x_hat.dtype)
    dweight = None if weight is None else \
        (dyc * x_hat).reshape(-1, features).sum(dim=0).to(dy.dtype)
    dbias = dyc.reshape(-1, features).sum(dim=0).to(dy.dtype) if cache.has_bias else None
    dx_hat = dyc if weight is None else dyc * weight
    dx = rstd * (dx_hat - dx_hat.mean(dim=-1, keepdim=True)
                 - x_hat * (dx_hat * x_hat).mean(dim=-1, keepdim=True))
    return dx.to(dy.dtype), dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x; w, b, ε) with the hand-written backward above.

    apply(x, weight, bias, eps); weight and bias may be None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, cache = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(cache.x_hat, cache.rstd, weight)
        ctx.has_bias = cache.has_bias
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_hat, rstd, weight = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_backward(dy, LayerNormCache(x_hat, rstd, weight,
                                                                    ctx.has_bias))
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dweight if need[1] else None,
                dbias if need[2] else None, None)

