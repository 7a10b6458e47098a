"""Layer normalization over the last axis (torch.nn.LayerNorm with normalized_shape = (D,)).

For one row x (D,), with biased variance as in torch:

    μ = (1/D) Σ_i x_i           σ² = (1/D) Σ_i (x_i - μ)²        r = 1 / √(σ² + ε)
    x̂ = (x - μ) r               y = x̂ ⊙ w + b                  (w, b (D,) or None)

Backward, from dy (summing over every leading index n for the parameters):

    dw = Σ_n dy_n ⊙ x̂_n         db = Σ_n dy_n
    dx̂ = dy ⊙ w
    dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ ⊙ x̂))      (means over the last axis)

Extreme rows: where the sums of a row overflow its dtype (float32 values near 1e19 and
beyond: μ or σ² would be inf), the row is computed on u = x / 2^e, 2^e the power of two at
its largest |x| (an exact scaling), with μ = 2^e μ_u and r = r_u / 2^e, r_u = 1 / √(σ_u² +
ε / 4^e): the exact-math LayerNorm of the row, finite, the same in both backends (rows whose
values differ by more than the dtype's largest number excepted). torch.nn returns NaN or 0
there.

``LayerNorm`` is the torch.nn.LayerNorm twin (an int normalized_shape) over that pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .checks import check_float_array, shape_str
from .module import Module


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
    with np.errstate(over="ignore", invalid="ignore"):
        mu = x.mean(axis=-1, keepdims=True)
        centered = x - mu
        var = (centered * centered).mean(axis=-1, keepdims=True)
    overflow = ~(np.isfinite(mu) & np.isfinite(var))
    if overflow.any():   # those rows on u = x / 2^e (module docstring); the others e = 0
        top = np.abs(x).max(axis=-1, keepdims=True)
        e = np.where(overflow, np.frexp(top)[1] - 1, 0)
        down = np.ldexp(np.ones_like(top), -e)
        u = x * down
        centered = u - u.mean(axis=-1, keepdims=True)
        var = (centered * centered).mean(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):   # ε / 4^e may underflow to 0: a constant row
            rstd_u = np.where(var > 0, 1.0 / np.sqrt(var + eps * down * down), 0.0)
        x_hat = centered * rstd_u                                  # (σ² = 0) has x̂ = 0
        rstd = np.where(var > 0, rstd_u * down, 1.0 / np.sqrt(eps + 0 * var)).astype(x.dtype)
    else:
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


def check_factory_kwargs(device: Any, dtype: Any) -> np.dtype:
    """The dtype of a module built with torch.nn's ``device=`` / ``dtype=`` keywords: the
    reference runs on the CPU (device None or "cpu") in float32 or float64 (None: float64)."""
    if device is not None and str(device) != "cpu":
        raise ValueError(f"device: the NumPy reference runs on the CPU only (None or 'cpu'), "
                         f"got {device!r}")
    try:
        resolved = np.dtype(np.float64 if dtype is None else dtype)
    except TypeError:
        resolved = None
    if resolved not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected numpy float32 or float64 (or None: float64), "
                        f"got {dtype!r}")
    return resolved


class LayerNorm(Module):
    """``torch.nn.LayerNorm`` over the last axis, D = normalized_shape, with ``backward``.

    LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, device=None,
    dtype=None): parameters ``weight`` (D,) (init 1) and ``bias`` (D,) (init 0) under
    torch.nn's names; ``elementwise_affine=False`` has neither, ``bias=False`` no bias.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)) and len(normalized_shape) == 1:
            normalized_shape = normalized_shape[0]  # torch's one-axis form, (D,)
        if isinstance(normalized_shape, bool) or not isinstance(normalized_shape,
                                                                (int, np.integer)):
            raise TypeError(f"normalized_shape: expected an int D (the last axis), "
                            f"got {normalized_shape!r}")
        if normalized_shape < 1:
            raise ValueError(f"normalized_shape: expected a positive int, got {normalized_shape}")
        for name, flag in (("elementwise_affine", elementwise_affine), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        D = int(normalized_shape)
        self.normalized_shape = (D,)
        self.eps = _check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.dtype = check_factory_kwargs(device, dtype)
        if elementwise_affine:
            self.params["weight"] = np.ones(D, self.dtype)
            if bias:
                self.params["bias"] = np.zeros(D, self.dtype)
        self.zero_grad()
        self._cache: LayerNormCache | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """y (..., D) for x (..., D)."""
        width = self.normalized_shape[0]
        check_float_array("x", x, dtype=self.dtype)
        if x.ndim < 1 or x.shape[-1] != width:
            raise ValueError(f"x: expected shape (..., {width}) (normalized_shape), "
                             f"got {shape_str(x.shape)}")
        y, self._cache = layer_norm_forward(x, self.params.get("weight"), self.params.get("bias"),
                                            self.eps)
        return y

    __call__ = forward

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Fills ``self.grads``; returns dx."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        dx, dweight, dbias = layer_norm_backward(dy, cache)
        self.grads = {name: g for name, g in (("weight", dweight), ("bias", dbias))
                      if g is not None}
        return dx

    def __repr__(self) -> str:
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")
