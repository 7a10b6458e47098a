"""Pointwise activations and (log-)softmax, each a forward/backward pair.

Twin of ``reference/activations.py`` on torch tensors. The forwards use torch's
stable built-ins (no exp of a large positive number, so |x| up to 1e4 and
beyond is safe); the backwards are written by hand from the equations:

    σ(x)            = 1 / (1 + e^{-x})            dσ/dx = σ (1 - σ)
    tanh(x)                                        dtanh/dx = 1 - tanh²
    relu(x)         = max(x, 0)                    drelu/dx = [x > 0]
    softmax(x)_i    = e^{x_i - m} / Σ_j e^{x_j - m},  m = max_j x_j
                      dx = y ⊙ (dy - Σ_j dy_j y_j)
    log_softmax(x)  = x - m - log Σ_j e^{x_j - m}
                      dx = dy - softmax(x) Σ_j dy_j
    gelu(x)         = x Φ(x),  Φ(x) = ½ erfc(-x/√2)            (approximate="none")
                      dgelu/dx = Φ(x) + x φ(x),  φ(x) = e^{-x²/2} / √(2π)
                    ≈ x c,  c = ½ (1 + tanh u) = σ(2u),  u = √(2/π) (x + 0.044715 x³)
                                                                  (approximate="tanh")
                      dgelu/dx = c + 2 x c (1 - c) du/dx,  du/dx = √(2/π) (1 + 3·0.044715 x²)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .checks import check_float_tensor


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """σ(x) without overflow."""
    return torch.sigmoid(x)


class SigmoidCache(NamedTuple):
    y: torch.Tensor  # σ(x)


def sigmoid_forward(x: torch.Tensor) -> tuple[torch.Tensor, SigmoidCache]:
    """y = σ(x), any shape."""
    check_float_tensor("x", x)
    y = sigmoid(x)
    return y, SigmoidCache(y)


def sigmoid_backward(dy: torch.Tensor, cache: SigmoidCache) -> torch.Tensor:
    """dx = dy ⊙ σ(x) (1 - σ(x))."""
    return dy * cache.y * (1.0 - cache.y)


class TanhCache(NamedTuple):
    y: torch.Tensor  # tanh(x)


def tanh_forward(x: torch.Tensor) -> tuple[torch.Tensor, TanhCache]:
    """y = tanh(x), any shape."""
    check_float_tensor("x", x)
    y = torch.tanh(x)
    return y, TanhCache(y)


def tanh_backward(dy: torch.Tensor, cache: TanhCache) -> torch.Tensor:
    """dx = dy ⊙ (1 - tanh²(x))."""
    return dy * (1.0 - cache.y * cache.y)


class ReluCache(NamedTuple):
    positive: torch.Tensor  # [x > 0]


def relu_forward(x: torch.Tensor) -> tuple[torch.Tensor, ReluCache]:
    """y = max(x, 0), any shape."""
    check_float_tensor("x", x)
    positive = x > 0
    return torch.where(positive, x, 0.0), ReluCache(positive)


def relu_backward(dy: torch.Tensor, cache: ReluCache) -> torch.Tensor:
    """dx = dy ⊙ [x > 0] (the subgradient at 0 is 0, as in torch)."""
    return torch.where(cache.positive, dy, 0.0)


def softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Stable softmax along ``axis``."""
    return torch.softmax(x, dim=axis)


def log_softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Stable log-softmax along ``axis``."""
    return torch.log_softmax(x, dim=axis)


class SoftmaxCache(NamedTuple):
    y: torch.Tensor  # softmax(x)
    axis: int


def softmax_forward(x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, SoftmaxCache]:
    """y = softmax(x) along ``axis``."""
    check_float_tensor("x", x)
    y = softmax(x, axis)
    return y, SoftmaxCache(y, axis)


def softmax_backward(dy: torch.Tensor, cache: SoftmaxCache) -> torch.Tensor:
    """dx = y ⊙ (dy - Σ_j dy_j y_j)."""
    y = cache.y
    return y * (dy - (dy * y).sum(dim=cache.axis, keepdim=True))


class LogSoftmaxCache(NamedTuple):
    y: torch.Tensor  # log_softmax(x); softmax is recomputed as exp(y)
    axis: int


def log_softmax_forward(x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, LogSoftmaxCache]:
    """y = log_softmax(x) along ``axis``."""
    check_float_tensor("x", x)
    y = log_softmax(x, axis)
    return y, LogSoftmaxCache(y, axis)


def log_softmax_backward(dy: torch.Tensor, cache: LogSoftmaxCache) -> torch.Tensor:
    """dx = dy - softmax(x) Σ_j dy_j."""
    return dy - torch.exp(cache.y) * dy.sum(dim=cache.axis, keepdim=True)


GELU_APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715


class GeluCache(NamedTuple):
    x: torch.Tensor
    cdf: torch.Tensor  # Φ(x), or its tanh approximation c = σ(2u)
    approximate: str


def _gelu_cdf(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Φ(x), or its tanh approximation c = σ(2u) with u = √(2/π) (x + 0.044715 x³)."""
    # erfc(-x/√2) and σ(2u) rather than 1 + erf(x/√2) and 1 + tanh u: no cancellation in the
    # negative tail, so y keeps full relative precision there.
    if approximate == "none":
        return 0.5 * torch.special.erfc(-x * math.sqrt(0.5))
    return torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x * x * x))


def gelu_forward(x: torch.Tensor, approximate: str = "none") -> tuple[torch.Tensor, GeluCache]:
    """y = x Φ(x) (approximate="none") or its tanh approximation (GPT-2's "gelu_new")."""
    check_float_tensor("x", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {', '.join(map(repr, GELU_APPROXIMATIONS))}"
                         f", got {approximate!r}")
    cdf = _gelu_cdf(x, approximate)
    return x * cdf, GeluCache(x, cdf, approximate)


def gelu_backward(dy: torch.Tensor, cache: GeluCache) -> torch.Tensor:
    """dx = dy ⊙ (Φ(x) + x φ(x)), or dy ⊙ (c + 2 x c (1 - c) du/dx) for the tanh form."""
    x, cdf = cache.x, cache.cdf
    if cache.approximate == "none":
        pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
        return dy * (cdf + x * pdf)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * x * x)
    return dy * (cdf + 2.0 * x * cdf * (1.0 - cdf) * du_dx)


class GeluFunction(torch.autograd.Function):
    """y = gelu(x, approximate) with the hand-written backward above. apply(x, approximate).
    For the models, which validate at their entry points: it trusts its arguments."""

    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)  # the cdf is recomputed: cheap next to the matmuls around it
        ctx.approximate = approximate
        return x * _gelu_cdf(x, approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        cache = GeluCache(x, _gelu_cdf(x, ctx.approximate), ctx.approximate)
        return gelu_backward(dy, cache), None
