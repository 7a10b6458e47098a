"""One shared parity check (STYLE.md rule 16).

``assert_close`` compares an actual tensor with an expected one by the relative
error ``||a - b|| / max(||b||, tiny)`` over the whole tensor and, on failure,
reports the shape, dtype, the worst element, its index, and any NaN/inf.
``assert_all_close`` does the same over dicts of named tensors (gradients).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

TINY = 1e-30


def to_numpy(a: Any) -> np.ndarray:
    """A float64 ndarray from an ndarray, a torch tensor (any device/dtype) or a scalar."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        if a.is_floating_point():
            a = a.double()
        a = a.numpy()
    return np.asarray(a, dtype=np.float64)


def relative_error(actual: Any, expected: Any) -> float:
    a, b = to_numpy(actual), to_numpy(expected)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), TINY))


def assert_close(actual: Any, expected: Any, budget: float, name: str = "tensor") -> float:
    """Assert shape equality, no NaN/inf, and relative error <= budget; return the error."""
    a, b = to_numpy(actual), to_numpy(expected)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {b.shape}")
    if not np.all(np.isfinite(a)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise AssertionError(f"{name}: non-finite value {a[idx]} at index {idx}")
    if not np.all(np.isfinite(b)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(b))[0])
        raise AssertionError(f"{name}: expected holds non-finite value {b[idx]} at index {idx}")
    err = relative_error(a, b)
    if not err <= budget:
        diff = np.abs(a - b)
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape)) \
            if diff.size else ()
        raise AssertionError(
            f"{name}: relative error {err:.3e} > budget {budget:.1e}; shape {a.shape}; "
            f"worst element "
            f"at {idx}: actual {a[idx]!r} expected {b[idx]!r} (|diff| {diff[idx]:.3e})")
    return err


def assert_all_close(actual: Mapping[str, Any], expected: Mapping[str, Any], budget: float,
                     name: str = "") -> dict[str, float]:
    """``assert_close`` over two dicts with the same keys (e.g. parameter gradients)."""
    if set(actual) != set(expected):
        only_actual = sorted(set(actual) - set(expected))
        raise AssertionError(f"{name}: keys differ: only actual {only_actual},"
                             f" only expected {sorted(set(expected) - set(actual))}")
    return {k: assert_close(actual[k], expected[k], budget, f"{name}{k}") for k in sorted(expected)}


def assert_gradient_close(actual: Any, expected: Any, budget: float, floor: float,
                          name: str = "tensor") -> None:
    """``assert_close`` for a gradient, except that one whose expected norm is below ``floor``
    (tolerances.py's gradient floors and their reason) is held to budget × floor absolute."""
    a, e = to_numpy(actual), to_numpy(expected)
    if np.linalg.norm(e) >= floor:
        assert_close(a, e, budget, name)
        return
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    if not np.all(np.isfinite(a)):
        raise AssertionError(f"{name}: non-finite values")
    error = float(np.linalg.norm(a - e))
    if not error <= budget * floor:
        raise AssertionError(f"{name}: |a - e| {error:.3e} > {budget * floor:.1e} (norm "
                             f"{np.linalg.norm(e):.1e} below the floor {floor:.0e})")
