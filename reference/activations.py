"""Pointwise activations and (log-)softmax, each a forward/backward pair.

All are numerically stable for |x| up to 1e4 and beyond: no exp of a large
positive number is ever taken, so no overflow warnings.

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

import numpy as np

from .checks import check_float_array


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) without overflow: e^{-|x|} is always <= 1."""
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


class SigmoidCache(NamedTuple):
    y: np.ndarray  # σ(x)


def sigmoid_forward(x: np.ndarray) -> tuple[np.ndarray, SigmoidCache]:
    """y = σ(x), any shape."""
    check_float_array("x", x)
    y = sigmoid(x)
    return y, SigmoidCache(y)


def sigmoid_backward(dy: np.ndarray, cache: SigmoidCache) -> np.ndarray:
    """dx = dy ⊙ σ(x) (1 - σ(x))."""
    return dy * cache.y * (1.0 - cache.y)


class TanhCache(NamedTuple):
    y: np.ndarray  # tanh(x)


def tanh_forward(x: np.ndarray) -> tuple[np.ndarray, TanhCache]:
    """y = tanh(x), any shape."""
    check_float_array("x", x)
    y = np.tanh(x)
    return y, TanhCache(y)


def tanh_backward(dy: np.ndarray, cache: TanhCache) -> np.ndarray:
    """dx = dy ⊙ (1 - tanh²(x))."""
    return dy * (1.0 - cache.y * cache.y)


class ReluCache(NamedTuple):
    positive: np.ndarray  # [x > 0]


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, ReluCache]:
    """y = max(x, 0), any shape."""
    check_float_array("x", x)
    positive = x > 0
    return np.where(positive, x, 0.0).astype(x.dtype), ReluCache(positive)


def relu_backward(dy: np.ndarray, cache: ReluCache) -> np.ndarray:
    """dx = dy ⊙ [x > 0] (the subgradient at 0 is 0, as in torch)."""
    return np.where(cache.positive, dy, 0.0).astype(dy.dtype)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax along ``axis``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax along ``axis``."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class SoftmaxCache(NamedTuple):
    y: np.ndarray  # softmax(x)
    axis: int


def softmax_forward(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, SoftmaxCache]:
    """y = softmax(x) along ``axis``."""
    check_float_array("x", x)
    y = softmax(x, axis)
    return y, SoftmaxCache(y, axis)


def softmax_backward(dy: np.ndarray, cache: SoftmaxCache) -> np.ndarray:
    """dx = y ⊙ (dy - Σ_j dy_j y_j)."""
    y = cache.y
    return y * (dy - (dy * y).sum(axis=cache.axis, keepdims=True))


class LogSoftmaxCache(NamedTuple):
    y: np.ndarray  # log_softmax(x); softmax is recomputed as exp(y)
    axis: int


def log_softmax_forward(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, LogSoftmaxCache]:
    """y = log_softmax(x) along ``axis``."""
    check_float_array("x", x)
    y = log_softmax(x, axis)
    return y, LogSoftmaxCache(y, axis)


def log_softmax_backward(dy: np.ndarray, cache: LogSoftmaxCache) -> np.ndarray:
    """dx = dy - softmax(x) Σ_j dy_j."""
    return dy - np.exp(cache.y) * dy.sum(axis=cache.axis, keepdims=True)


# math.erfc vectorised: the float64 budget needs erfc to ~1 ulp, which NumPy lacks (and scipy is
# not a dependency); ~0.15 µs per element is fast enough for the oracle.
_erfc = np.vectorize(math.erfc, otypes=[np.float64])
GELU_APPROXIMATIONS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715


class GeluCache(NamedTuple):
    x: np.ndarray
    cdf: np.ndarray  # Φ(x), or its tanh approximation c = σ(2u)
    approximate: str


def gelu_forward(x: np.ndarray, approximate: str = "none") -> tuple[np.ndarray, GeluCache]:
    """y = x Φ(x) (approximate="none") or its tanh approximation (GPT-2's "gelu_new")."""
    check_float_array("x", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {', '.join(map(repr, GELU_APPROXIMATIONS))}"
                         f", got {approximate!r}")
    # erfc(-x/√2) and σ(2u) rather than 1 + erf(x/√2) and 1 + tanh u: no cancellation in the
    # negative tail, so y keeps full relative precision there.
    if approximate == "none":
        cdf = (0.5 * _erfc(-x / math.sqrt(2.0))).astype(x.dtype)
    else:
        cdf = sigmoid(2.0 * _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x * x * x))
    return x * cdf, GeluCache(x, cdf, approximate)


def gelu_backward(dy: np.ndarray, cache: GeluCache) -> np.ndarray:
    """dx = dy ⊙ (Φ(x) + x φ(x)), or dy ⊙ (c + 2 x c (1 - c) du/dx) for the tanh form."""
    x, cdf = cache.x, cache.cdf
    if cache.approximate == "none":
        # e^{-x²/2} underflows to 0 for |x| > ~39, the intended value; no overflow is possible.
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return dy * (cdf + x * pdf)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * x * x)
    return dy * (cdf + 2.0 * x * cdf * (1.0 - cdf) * du_dx)
