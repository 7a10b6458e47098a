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
"""

from __future__ import annotations

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
