"""Activations: reference vs finite differences, torch_impl vs reference, both vs torch.nn."""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.activations as ref
import torch_impl.activations as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, normal_arrays, shapes, to_torch
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck


class Activation(NamedTuple):
    name: str
    torch_nn: Callable[[torch.Tensor, int], torch.Tensor]  # (x, axis) -> y, the outside oracle
    has_axis: bool


ACTIVATIONS = [
    Activation("sigmoid", lambda x, axis: torch.sigmoid(x), False),
    Activation("tanh", lambda x, axis: torch.tanh(x), False),
    Activation("relu", lambda x, axis: F.relu(x), False),
    Activation("softmax", lambda x, axis: F.softmax(x, dim=axis), True),
    Activation("log_softmax", lambda x, axis: F.log_softmax(x, dim=axis), True),
]
IDS = [a.name for a in ACTIVATIONS]


def run(module, act: Activation, x, axis: int, dy):
    """(y, dx) from ``module``'s forward/backward pair for ``act``."""
    forward = getattr(module, f"{act.name}_forward")
    backward = getattr(module, f"{act.name}_backward")
    y, cache = forward(x, axis) if act.has_axis else forward(x)
    return y, backward(dy, cache)


class Case(NamedTuple):
    x: np.ndarray
    dy: np.ndarray
    axis: int


@st.composite
def cases(draw: st.DrawFn, scale: float = 1.0) -> Case:
    shape = draw(shapes(min_dims=1, max_dims=3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return Case(draw(normal_arrays(shape, scale)), draw(normal_arrays(shape)), axis)


# Large-magnitude and batch-1 cases; mixed so the gradient is not all zeros.
LARGE = Case(np.array([[1e4, -1e4, 0.0, 3.0, 9999.5]]), np.array([[0.5, -1.0, 2.0, 0.25, -0.75]]),
             -1)
LARGE_COLUMN = Case(np.array([[1e4], [-1e4], [9999.0]]), np.array([[1.0], [2.0], [-3.0]]), 0)
SINGLE = Case(np.array([[0.7]]), np.array([[1.5]]), -1)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@given(case=cases())
@example(case=SINGLE)
def test_reference_backward_matches_finite_differences(act: Activation, case: Case) -> None:
    x = case.x
    if act.name == "relu":
        # relu has a kink at 0, where central differences average the two slopes.
        x = np.where(np.abs(x) < 1e-3, 0.5, x)
    _, dx = run(ref, act, x, case.axis, case.dy)
    gradcheck(lambda x: run(ref, act, x, case.axis, case.dy)[0], {"x": x}, case.dy, {"x": dx},
              tol=REF_VS_FINITE_DIFF)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@given(case=cases())
@example(case=LARGE)
@example(case=LARGE_COLUMN)
@example(case=SINGLE)
def test_torch_impl_float64_matches_reference(act: Activation, case: Case) -> None:
    y_ref, dx_ref = run(ref, act, case.x, case.axis, case.dy)
    y, dx = run(tim, act, to_torch(case.x), case.axis, to_torch(case.dy))
    assert y.dtype == dx.dtype == torch.float64
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH64_VS_REF64.gradient, "dx")


def backward_cancellation(act: Activation, x: np.ndarray, axis: int, dy: np.ndarray) -> float:
    """κ = ||Σ |terms| || / ||dx||: how much the backward's sum cancels (1 for pointwise ops).

    Each term carries a float32 rounding of ~6e-8, so no float32 evaluation of the formula
    (ours or torch's) can land closer than about κ · 6e-8 to the exact gradient.
    """
    if act.name == "softmax":
        y = ref.softmax(x, axis)
        s = (dy * y).sum(axis=axis, keepdims=True)
        dx, terms = y * (dy - s), y * (np.abs(dy) + np.abs(s))
    elif act.name == "log_softmax":
        p, total = ref.softmax(x, axis), dy.sum(axis=axis, keepdims=True)
        dx, terms = dy - p * total, np.abs(dy) + p * np.abs(total)
    else:
        return 1.0
    return float(np.linalg.norm(terms) / max(np.linalg.norm(dx), 1e-300))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@given(case=cases())
@example(case=LARGE)
@example(case=SINGLE)
def test_torch_impl_float32_matches_reference_float64(act: Activation, case: Case) -> None:
    x, dy = float32_exact(case.x), float32_exact(case.dy)
    # The float32 gradient budget 1e-4 presumes a well-conditioned gradient (κ <= 100); dy
    # nearly constant along the softmax axis cancels far more and is a float32 limit, not a bug.
    assume(backward_cancellation(act, x, case.axis, dy) <= 100)
    y_ref, dx_ref = run(ref, act, x, case.axis, dy)
    y, dx = run(tim, act, to_torch(x, torch.float32), case.axis, to_torch(dy, torch.float32))
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH32_VS_REF64.gradient, "dx")


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@given(case=cases())
@example(case=LARGE)
@example(case=LARGE_COLUMN)
@example(case=SINGLE)
def test_reference_matches_torch_nn_functional(act: Activation, case: Case) -> None:
    y_ref, dx_ref = run(ref, act, case.x, case.axis, case.dy)
    x = to_torch(case.x).requires_grad_()
    y = act.torch_nn(x, case.axis)
    (dx,) = torch.autograd.grad(y, x, to_torch(case.dy))
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(dx_ref, dx, TORCHNN64_VS_OURS64.gradient, "dx")


@pytest.mark.parametrize("name", ["sigmoid", "softmax", "log_softmax"])
@given(case=cases())
@example(case=LARGE)
def test_torch_impl_plain_helpers_match_reference(name: str, case: Case) -> None:
    args = () if name == "sigmoid" else (case.axis,)
    expected = getattr(ref, name)(case.x, *args)
    assert_close(getattr(tim, name)(to_torch(case.x), *args), expected, TORCH64_VS_REF64.forward,
                 name)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_is_finite_and_warning_free_at_magnitude_1e4(act: Activation, dtype) -> None:
    x = np.array([[1e4, -1e4, 0.0, -9999.0], [-1e4, -1e4, -1e4, -1e4]], dtype=dtype)
    dy = np.ones_like(x)
    # Underflow to 0 is the intended result of e^{-1e4}; overflow, 0/0 and log(0) are not.
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, dx = run(ref, act, x, -1, dy)
    assert y.dtype == dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@pytest.mark.parametrize("module", [ref, tim], ids=["reference", "torch_impl"])
def test_relu_gradient_at_zero_is_zero_as_in_torch(module) -> None:
    x = np.array([-1.0, 0.0, 2.0])
    x_in = x if module is ref else to_torch(x)
    dy = np.ones(3) if module is ref else torch.ones(3, dtype=torch.float64)
    _, cache = module.relu_forward(x_in)
    x_torch = to_torch(x).requires_grad_()
    (expected,) = torch.autograd.grad(F.relu(x_torch), x_torch, torch.ones(3, dtype=torch.float64))
    assert_close(module.relu_backward(dy, cache), expected, 0.0, "dx")


BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_integer_x_naming_it(act: Activation, backend) -> None:
    module, array = backend
    with pytest.raises(TypeError, match=r"^x: .*dtype"):
        getattr(module, f"{act.name}_forward")(array([1, 2, 3]))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_non_finite_x_naming_it(act: Activation, backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^x: contains NaN or inf"):
        getattr(module, f"{act.name}_forward")(array([1.0, float("nan"), 3.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_non_array_x_naming_it(backend) -> None:
    module, _ = backend
    with pytest.raises(TypeError, match=r"^x: expected a"):
        module.sigmoid_forward([1.0, 2.0])


# ----------------------------------------------------------------------------- GELU
# gelu_forward(x, approximate) / gelu_backward: exact (erf) and tanh ("gelu_new") forms.

APPROXIMATIONS = ["none", "tanh"]


def run_gelu(module, x, approximate: str, dy):
    """(y, dx) from ``module``'s gelu pair."""
    y, cache = module.gelu_forward(x, approximate)
    return y, module.gelu_backward(dy, cache)


def gelu_cancellation(x: np.ndarray, approximate: str, dy: np.ndarray) -> float:
    """κ = ||dy (|c| + |x c'|)|| / ||dx||: how much the GELU's slope c + x c' cancels.

    Around x ≈ -0.75 the slope is 0, so a dx made only of such elements is rounding noise
    relative to itself in any float32 evaluation (and in finite differences).
    """
    y, cache = ref.gelu_forward(x, approximate)
    dx = ref.gelu_backward(dy, cache)
    slope_sum = ref.gelu_backward(np.ones_like(x), cache)
    terms = np.abs(dy) * (np.abs(cache.cdf) + np.abs(slope_sum - cache.cdf))
    return float(np.linalg.norm(terms) / max(np.linalg.norm(dx), 1e-300))


def torch_gelu_is_resolved(x: np.ndarray, approximate: str, dy: np.ndarray) -> bool:
    """Whether F.gelu is accurate enough here to serve as a float64 oracle.

    F.gelu computes x · ½ (1 + erf(x/√2)) (or ½ (1 + tanh u)): in the negative tail the 1 + ...
    cancels, leaving an absolute error ~ε |x| / 2 in y and ~ε |dy| / 2 in dx however small the
    true values are. Ours (erfc, σ(2u)) has no such loss; compare only where torch's error is
    100x below the budget.
    """
    y, cache = ref.gelu_forward(x, approximate)
    dx = ref.gelu_backward(dy, cache)
    eps = np.finfo(np.float64).eps
    return bool(eps * np.linalg.norm(x) / 2 <= 0.01 * TORCHNN64_VS_OURS64.forward
                * np.linalg.norm(y)
                and eps * np.linalg.norm(dy) / 2 <= 0.01 * TORCHNN64_VS_OURS64.gradient
                * np.linalg.norm(dx))


GELU_TAILS = Case(np.array([[-12.0, -6.0, -3.0, 0.0, 3.0, 6.0, 12.0]]),
                  np.array([[1.0, -0.5, 2.0, 0.25, -1.5, 1.0, 0.5]]), -1)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases(scale=2.0))
@example(case=SINGLE)
@example(case=GELU_TAILS)
def test_gelu_reference_backward_matches_finite_differences(approximate: str, case: Case) -> None:
    assume(gelu_cancellation(case.x, approximate, case.dy) <= 100)
    _, dx = run_gelu(ref, case.x, approximate, case.dy)
    gradcheck(lambda x: ref.gelu_forward(x, approximate)[0], {"x": case.x}, case.dy, {"x": dx},
              tol=REF_VS_FINITE_DIFF)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases(scale=2.0))
@example(case=SINGLE)
@example(case=GELU_TAILS)
@example(case=LARGE)
def test_gelu_torch_impl_float64_matches_reference(approximate: str, case: Case) -> None:
    y_ref, dx_ref = run_gelu(ref, case.x, approximate, case.dy)
    y, dx = run_gelu(tim, to_torch(case.x), approximate, to_torch(case.dy))
    assert y.dtype == dx.dtype == torch.float64
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH64_VS_REF64.gradient, "dx")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases(scale=2.0))
@example(case=SINGLE)
@example(case=GELU_TAILS)
@example(case=LARGE)
def test_gelu_torch_impl_float32_matches_reference_float64(approximate: str, case: Case) -> None:
    x, dy = float32_exact(case.x), float32_exact(case.dy)
    assume(gelu_cancellation(x, approximate, dy) <= 100)  # the float32 budget presumes it
    y_ref, dx_ref = run_gelu(ref, x, approximate, dy)
    y, dx = run_gelu(tim, to_torch(x, torch.float32), approximate, to_torch(dy, torch.float32))
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH32_VS_REF64.gradient, "dx")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases(scale=2.0))
@example(case=SINGLE)
@example(case=GELU_TAILS)
@example(case=LARGE)
def test_gelu_reference_matches_torch_nn_functional_gelu(approximate: str, case: Case) -> None:
    assume(torch_gelu_is_resolved(case.x, approximate, case.dy))
    y_ref, dx_ref = run_gelu(ref, case.x, approximate, case.dy)
    x = to_torch(case.x).requires_grad_()
    y = F.gelu(x, approximate=approximate)
    (dx,) = torch.autograd.grad(y, x, to_torch(case.dy))
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(dx_ref, dx, TORCHNN64_VS_OURS64.gradient, "dx")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases(scale=2.0))
@example(case=GELU_TAILS)
def test_gelu_function_matches_torch_nn_functional_gelu_through_autograd(approximate: str,
                                                                          case: Case) -> None:
    assume(torch_gelu_is_resolved(case.x, approximate, case.dy))
    x = to_torch(case.x).requires_grad_()
    y = tim.GeluFunction.apply(x, approximate)
    (dx,) = torch.autograd.grad(y, x, to_torch(case.dy))
    x_nn = to_torch(case.x).requires_grad_()
    y_nn = F.gelu(x_nn, approximate=approximate)
    (dx_nn,) = torch.autograd.grad(y_nn, x_nn, to_torch(case.dy))
    assert_close(y, y_nn, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(dx, dx_nn, TORCHNN64_VS_OURS64.gradient, "dx")


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_reference_is_finite_and_warning_free_at_magnitude_1e4(approximate: str,
                                                                    dtype) -> None:
    x = np.array([[1e4, -1e4, 0.0, -9999.0, 50.0, -50.0]], dtype=dtype)
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, dx = run_gelu(ref, x, approximate, np.ones_like(x))
    assert y.dtype == dx.dtype == dtype
    # Far tails: gelu(x) = x and slope 1 above, 0 and slope 0 below.
    assert_close(y, np.array([[1e4, 0.0, 0.0, 0.0, 50.0, 0.0]]), 0.0, "y")
    assert_close(dx, np.array([[1.0, 0.0, 0.5, 0.0, 1.0, 0.0]]), 0.0, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_forward_rejects_unknown_approximate_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^approximate: expected one of 'none', 'tanh', "
                                         r"got 'erf'"):
        module.gelu_forward(array([1.0, 2.0]), "erf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_forward_rejects_non_finite_and_integer_x_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^x: contains NaN or inf"):
        module.gelu_forward(array([1.0, float("inf")]))
    with pytest.raises(TypeError, match=r"^x: .*dtype"):
        module.gelu_forward(array([1, 2]))
