"""Central finite differences, the check every hand-written backward must pass.

For f(**inputs) returning an array or a (nested) tuple of arrays y_1 .. y_K
(flattened in order) and upstream gradients u_1 .. u_K, the scalar

    L = Σ_k <y_k, u_k>                      (a None u_k counts as zero)

has gradient dL/dθ = the vector-Jacobian product a backward computes for
dy_k = u_k. Each element θ_i of each input is estimated by

    dL/dθ_i ≈ (L(θ + ε e_i) - L(θ - ε e_i)) / (2 ε)

and compared with the analytic gradient by ||analytic - numeric|| / max(||numeric||, 1e-30).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .checks import shape_str

TINY = 1e-30


def _flatten(tree: Any) -> list[Any]:
    """Leaves of a nested tuple/list of arrays (None leaves kept), depth first, in order."""
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _flatten(item)]
    return [tree]


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    return float(eps)


def numerical_gradients(f: Callable[..., Any], inputs: Mapping[str, np.ndarray], upstream: Any,
                        eps: float = 1e-6) -> dict[str, np.ndarray]:
    """dL/dθ by central differences for every element of every input (all float64).

    ``upstream`` mirrors the structure of f's output (an array, or a nested
    tuple of arrays and Nones). The inputs are copied, never modified.
    """
    eps = _check_eps(eps)
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.float64:
            got = getattr(value, "dtype", type(value).__name__)
            raise TypeError(f"inputs[{name!r}]: expected a float64 numpy.ndarray (finite "
                            f"differences need double precision), got {got}")
    upstream_leaves = _flatten(upstream)
    probe = {name: value.copy() for name, value in inputs.items()}

    def objective() -> float:
        outputs = _flatten(f(**probe))
        if len(outputs) != len(upstream_leaves):
            raise ValueError(f"upstream: expected {len(outputs)} arrays (one per output of f), "
                             f"got {len(upstream_leaves)}")
        total = 0.0
        for k, (y, u) in enumerate(zip(outputs, upstream_leaves)):
            if u is None:
                continue
            if y is None:
                raise ValueError(f"upstream: leaf {k} is not None, but output {k} of f is None")
            y, u = np.asarray(y, dtype=np.float64), np.asarray(u, dtype=np.float64)
            if y.shape != u.shape:
                raise ValueError(f"upstream: leaf {k} has shape {shape_str(u.shape)}, but "
                                 f"output {k} of f has shape {shape_str(y.shape)}")
            total += float(np.sum(y * u))
        return total

    grads = {}
    for name, theta in probe.items():
        grad = np.zeros_like(theta)
        flat, grad_flat = theta.reshape(-1), grad.reshape(-1)  # views: writes reach probe
        for i in range(flat.size):
            original = flat[i]
            flat[i] = original + eps
            loss_plus = objective()
            flat[i] = original - eps
            loss_minus = objective()
            flat[i] = original
            grad_flat[i] = (loss_plus - loss_minus) / (2.0 * eps)
        grads[name] = grad
    return grads


def gradcheck(f: Callable[..., Any], inputs: Mapping[str, np.ndarray], upstream: Any,
              analytic: Mapping[str, np.ndarray], eps: float = 1e-6,
              tol: float = 1e-6) -> dict[str, float]:
    """Relative error of ``analytic`` against central differences, per input.

    Raises AssertionError naming the worst input, its worst element and both
    values if any error exceeds ``tol`` or any gradient holds NaN/inf.
    """
    if set(analytic) != set(inputs):
        raise ValueError(f"analytic: expected the keys of inputs {sorted(inputs)}, "
                         f"got {sorted(analytic)}")
    for name in inputs:
        got = np.shape(analytic[name])
        if got != inputs[name].shape:
            raise ValueError(f"analytic[{name!r}]: expected shape {shape_str(inputs[name].shape)}, "
                             f"got {shape_str(got)}")
    numeric = numerical_gradients(f, inputs, upstream, eps)
    errors = {}
    for name in inputs:
        a = np.asarray(analytic[name], dtype=np.float64)
        for label, g in (("analytic", a), ("numeric", numeric[name])):
            if not np.all(np.isfinite(g)):
                idx = tuple(int(i) for i in np.argwhere(~np.isfinite(g))[0])
                raise AssertionError(f"gradcheck: {label} gradient of {name!r} holds {g[idx]} "
                                     f"at index {idx}")
        errors[name] = float(np.linalg.norm(a - numeric[name]) /
                             max(float(np.linalg.norm(numeric[name])), TINY))
    worst = max(errors, key=errors.get, default=None)
    if worst is not None and errors[worst] > tol:
        a, n = np.asarray(analytic[worst], dtype=np.float64), numeric[worst]
        diff = np.abs(a - n)
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
        raise AssertionError(f"gradcheck: gradient of {worst!r} has relative error "
                             f"{errors[worst]:.3e} > tol {tol:.1e}; worst element at {idx}: "
                             f"analytic {a[idx]!r}, numeric {n[idx]!r}; all errors {errors}")
    return errors
