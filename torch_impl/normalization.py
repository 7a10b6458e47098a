"""Layer normalization over the last axis (torch.nn.LayerNorm with normalized_shape = (D,)).

Twin of ``reference/normalization.py`` on torch tensors. The math below, forward and backward
by hand, is the fused op ``seqtwin::layer_norm`` (``kernels/layer_norm.py``: Triton on CUDA,
torch elsewhere); this file validates and keeps the explicit cache. For one row x (D,), with
biased variance as in torch:

    μ = (1/D) Σ_i x_i           σ² = (1/D) Σ_i (x_i - μ)²        r = 1 / √(σ² + ε)
    x̂ = (x - μ) r               y = x̂ ⊙ w + b                  (w, b (D,) or None)

Backward, from dy (summing over every leading index n for the parameters):

    dw = Σ_n dy_n ⊙ x̂_n         db = Σ_n dy_n
    dx̂ = dy ⊙ w
    dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂))      (means over the last axis)

bf16/fp16 inputs are normalized in float32 (the statistics of a row need it) and the
results cast back, as torch does. The cache holds μ and r per row, not x̂: the backward
recomputes x̂ = (x - μ) r from x.

``layer_norm`` (the same function under autograd, through the op's registered backward) is
what the models call; it compiles with ``torch.compile(fullgraph=True)``. ``LayerNorm`` is the
torch.nn.LayerNorm twin (an int normalized_shape) whose forward is that op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .checks import check_float_tensor, shape_str
from .kernels.layer_norm import layer_norm, layer_norm_backward_op, layer_norm_op

__all__ = ["LayerNorm", "LayerNormCache", "LayerNormFunction", "layer_norm",
           "layer_norm_backward", "layer_norm_forward"]


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return float(eps)


class LayerNormCache(NamedTuple):
    x: Tensor                # x (..., D)
    weight: Tensor | None    # w (D,)
    has_bias: bool
    mean: Tensor             # μ (N,) per row of x (N = x.numel() / D), compute dtype
    rstd: Tensor             # r (N,), compute dtype (float32 for bf16/fp16)


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
    # absent affine parameters are the identity (w = 1, b = 0): exact, and one op for all cases
    y, mean, rstd = layer_norm_op(x.reshape(-1, features),
                                  x.new_ones(features) if weight is None else weight,
                                  x.new_zeros(features) if bias is None else bias, eps)
    return y.reshape(x.shape), LayerNormCache(x, weight, bias is not None, mean, rstd)


@torch.no_grad()
def layer_norm_backward(dy: Tensor, cache: LayerNormCache
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dx (..., D), dweight (D,), dbias (D,)); dweight/dbias None where the forward had none."""
    x, weight = cache.x, cache.weight
    check_float_tensor("dy", dy, shape=tuple(x.shape), finite=False,
                       dtype=None if weight is None else weight.dtype)
    features = x.shape[-1]
    dx, dweight, dbias = layer_norm_backward_op(
        dy.reshape(-1, features), x.reshape(-1, features),
        x.new_ones(features) if weight is None else weight, cache.mean, cache.rstd)
    return (dx.reshape(x.shape), None if weight is None else dweight,
            dbias if cache.has_bias else None)


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x; w, b, ε) through the explicit-cache pair above, under autograd.

    apply(x, weight, bias, eps); weight and bias may be None. (The models call ``layer_norm``,
    the op's own autograd; this Function is the pair's autograd twin.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, cache = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, cache.mean, cache.rstd)
        ctx.has_bias = cache.has_bias
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = layer_norm_backward(dy, LayerNormCache(x, weight, ctx.has_bias,
                                                                    mean, rstd))
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dweight if need[1] else None,
                dbias if need[2] else None, None)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, D = normalized_shape, through the fused op.

    LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, device=None,
    dtype=None): parameters ``weight`` (D,) (init 1) and ``bias`` (D,) (init 0) under
    torch.nn's names, so state dicts move both ways; ``elementwise_affine=False`` has neither,
    ``bias=False`` no bias. The forward is ``layer_norm`` (``seqtwin::layer_norm`` and its
    hand-written backward), which checks x's type and width, not its values.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1:
            normalized_shape = normalized_shape[0]  # torch's one-axis form, (D,)
        if isinstance(normalized_shape, bool) or not isinstance(normalized_shape, int):
            raise TypeError(f"normalized_shape: expected an int D (the last axis), "
                            f"got {normalized_shape!r}")
        if normalized_shape < 1:
            raise ValueError(f"normalized_shape: expected a positive int, got {normalized_shape}")
        for name, flag in (("elementwise_affine", elementwise_affine), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        self.normalized_shape = (normalized_shape,)
        self.eps = _check_eps(eps)
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = (nn.Parameter(torch.empty(normalized_shape, **factory))
                       if elementwise_affine else None)
        self.bias = (nn.Parameter(torch.empty(normalized_shape, **factory))
                     if elementwise_affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's init: weight 1, bias 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """y (..., D) for x (..., D)."""
        width = self.normalized_shape[0]
        check_float_tensor("x", x, finite=False)
        if x.dim() < 1 or x.shape[-1] != width:
            raise ValueError(f"x: expected shape (..., {width}) (normalized_shape), "
                             f"got {shape_str(tuple(x.shape))}")
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")
