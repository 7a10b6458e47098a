"""layer_norm: reference vs finite differences, torch_impl vs reference (float64, float32),
both vs torch.nn.LayerNorm, the autograd Function vs nn.LayerNorm, bad input."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.normalization as ref
import torch_impl.normalization as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import (
    float32_exact,
    normal_arrays,
    seeds,
    shapes,
    sizes,
    to_torch,
)
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck


class Case(NamedTuple):
    x: np.ndarray               # (..., D)
    weight: np.ndarray | None   # (D,)
    bias: np.ndarray | None     # (D,)
    dy: np.ndarray              # (..., D)
    eps: float = 1e-5


@st.composite
def cases(draw: st.DrawFn, max_offset: float = 100.0) -> Case:
    """Rows with a random offset (a mean far from 0 tests the centering) and scale."""
    leading = draw(shapes(min_dims=0, max_dims=2, max_side=4))
    features = draw(sizes(8))
    rng = np.random.default_rng(draw(seeds))
    offset = draw(st.sampled_from([0.0, 1.0, max_offset]))
    scale = draw(st.sampled_from([1.0, 0.1, 10.0]))
    x = offset * rng.standard_normal(leading + (1,)) + scale * rng.standard_normal(
        leading + (features,))
    weight = draw(st.one_of(st.none(), normal_arrays((features,))))
    bias = draw(st.one_of(st.none(), normal_arrays((features,))))
    eps = draw(st.sampled_from([1e-5, 1e-12, 0.5]))
    return Case(x, weight, bias, draw(normal_arrays(leading + (features,))), eps)


BATCH_ONE = Case(np.array([[0.5, -2.0, 1.0]]), np.array([1.0, 3.0, -0.5]),
                 np.array([0.1, 0.2, -0.3]), np.array([[1.0, -1.0, 0.5]]))
ONE_FEATURE = Case(np.array([[2.0], [-3.0]]), np.array([1.5]), np.array([0.25]),
                   np.array([[1.0], [-2.0]]))
SINGLE_ROW_NO_AFFINE = Case(np.array([0.3, -0.7, 1.9, 0.0]), None, None,
                            np.array([1.0, 0.5, -0.25, 2.0]))
LARGE = Case(np.array([[1e4, -1e4, 0.0], [5e3, 1e4, -3e3], [1e4, 1e4, 1e4]]),
             np.array([0.5, -2.0, 1.0]), np.array([0.0, 1.0, 2.0]),
             np.array([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0], [1.0, 1.0, 1.0]]))


def run(module, case: Case, convert=lambda a: a):
    """(y, {dx, dweight, dbias}) from ``module``'s forward/backward pair; absent grads dropped."""
    maybe = lambda a: None if a is None else convert(a)  # noqa: E731
    y, cache = module.layer_norm_forward(convert(case.x), maybe(case.weight), maybe(case.bias),
                                         case.eps)
    dx, dweight, dbias = module.layer_norm_backward(convert(case.dy), cache)
    assert (dweight is None) == (case.weight is None) and (dbias is None) == (case.bias is None)
    grads = {"x": dx, "weight": dweight, "bias": dbias}
    return y, {k: g for k, g in grads.items() if g is not None}


def condition_number(case: Case) -> float:
    """(1 + ν) κ: how much rounding any evaluation of layer norm (ours, torch's, or the finite
    differences') amplifies, worst row.

    ν = |μ| / σ: x - μ loses log10(ν) digits to the offset of a row (an offset of 100 on a
    spread of 0.001 keeps only 11 of float64's 16).
    κ = ||r (|dx̂| + |mean dx̂| + |x̂| |mean(dx̂ x̂)|)|| / ||dx||: how much dx's sum cancels.
    Two features normalize to x̂ ≈ ±1 whatever x is, so dx is ~ε/σ² small and made of nearly
    cancelling terms. Neither is a bug, and no budget on the formula can absorb them.
    """
    x, dy = case.x, case.dy
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    sigma = np.sqrt(var + case.eps)
    # A constant row is exact (x - μ = 0 exactly), whatever its offset.
    nu = float(np.max(np.where(var > 0, np.abs(mu) / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)))
    x_hat = (x - mu) / sigma
    dx_hat = dy if case.weight is None else dy * case.weight
    a, b = dx_hat.mean(axis=-1, keepdims=True), (dx_hat * x_hat).mean(axis=-1, keepdims=True)
    dx = (dx_hat - a - x_hat * b) / sigma
    terms = (np.abs(dx_hat) + np.abs(a) + np.abs(x_hat * b)) / sigma
    kappa = float(np.linalg.norm(terms) / max(np.linalg.norm(dx), 1e-300))
    return (1.0 + nu) * kappa


def well_conditioned(case: Case, limit: float) -> bool:
    """Rounding is amplified at most ``limit``-fold (one feature is exact: x̂ = 0, dx = 0)."""
    return case.x.shape[-1] == 1 or condition_number(case) <= limit


# Float64 rounding (1e-16) amplified 1e4-fold stays 10x below the float64 forward budget;
# float32's (6e-8) and central differences' (~1e-10) allow 100.
FLOAT64_CONDITION_LIMIT = 1e4
COARSE_CONDITION_LIMIT = 100.0


def inputs_dict(case: Case) -> dict:
    inputs = {"x": case.x, "weight": case.weight, "bias": case.bias}
    return {k: v for k, v in inputs.items() if v is not None}


# Finite differences need a well-conditioned row: no large offset, and eps not tiny against a
# constant (one-feature) row, where x̂ jumps between 0 and ±1.
@given(case=cases(max_offset=1.0).filter(lambda c: c.eps != 1e-12))
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    assume(well_conditioned(case, COARSE_CONDITION_LIMIT))
    _, analytic = run(ref, case)
    inputs = inputs_dict(case)

    def forward(x, weight=None, bias=None):
        return ref.layer_norm_forward(x, weight, bias, case.eps)[0]

    gradcheck(forward, inputs, case.dy, analytic, tol=REF_VS_FINITE_DIFF)


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
@example(case=LARGE)
def test_torch_impl_float64_matches_reference(case: Case) -> None:
    assume(well_conditioned(case, FLOAT64_CONDITION_LIMIT))
    y_ref, grads_ref = run(ref, case)
    y, grads = run(tim, case, to_torch)
    assert y.dtype == torch.float64
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], TORCH64_VS_REF64.gradient, f"d{name}")


# A row offset of 100 with spread 0.1 leaves float32 only ~4 significant digits of x - μ, a
# limit of the input's float32 rounding itself; offsets <= 1 keep the comparison meaningful.
@given(case=cases(max_offset=1.0))
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
def test_torch_impl_float32_matches_reference_float64(case: Case) -> None:
    exact = lambda a: None if a is None else float32_exact(a)  # noqa: E731
    case = case._replace(x=exact(case.x), weight=exact(case.weight), bias=exact(case.bias),
                         dy=exact(case.dy))
    assume(well_conditioned(case, COARSE_CONDITION_LIMIT))
    y_ref, grads_ref = run(ref, case)
    y, grads = run(tim, case, lambda a: to_torch(a, torch.float32))
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], TORCH32_VS_REF64.gradient, f"d{name}")


def torch_nn_layer_norm(case: Case):
    """(y, grads) of torch.nn.LayerNorm with the case's parameters, through autograd."""
    features = case.x.shape[-1]
    # nn.LayerNorm cannot hold a bias without a weight: a frozen weight of ones is the same map.
    affine = case.weight is not None or case.bias is not None
    layer = torch.nn.LayerNorm(features, eps=case.eps, elementwise_affine=affine,
                               bias=case.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        if case.weight is not None:
            layer.weight.copy_(to_torch(case.weight))
        elif affine:
            layer.weight.requires_grad_(False)
        if case.bias is not None:
            layer.bias.copy_(to_torch(case.bias))
    x = to_torch(case.x).requires_grad_()
    y = layer(x)
    y.backward(to_torch(case.dy))
    grads = {"x": x.grad, "weight": None if case.weight is None else layer.weight.grad,
             "bias": None if case.bias is None else layer.bias.grad}
    return y.detach(), {k: g for k, g in grads.items() if g is not None}


def assert_grads_close(grads: dict, expected: dict, budget: float, eps: float) -> None:
    assert set(grads) == set(expected)
    for name in expected:
        if name != "bias" and expected[name].shape[-1] == 1:
            # One feature: x̂ = 0, so dx and dweight are exactly 0 in exact arithmetic and a
            # relative error is meaningless; torch's formula leaves rounding residue of
            # ~1e-16 · r, with r = 1/√ε there.
            for side in (grads[name], expected[name]):
                assert float(np.abs(np.asarray(side)).max()) <= 1e-13 / math.sqrt(eps), f"d{name}"
        else:
            assert_close(grads[name], expected[name], budget, f"d{name}")


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
@example(case=LARGE)
def test_reference_matches_torch_nn_layer_norm(case: Case) -> None:
    assume(well_conditioned(case, FLOAT64_CONDITION_LIMIT))
    y_ref, grads_ref = run(ref, case)
    y, grads = torch_nn_layer_norm(case)
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    assert_grads_close(grads_ref, grads, TORCHNN64_VS_OURS64.gradient, case.eps)


@given(case=cases())
@example(case=ONE_FEATURE)
@example(case=LARGE)
def test_layer_norm_function_matches_torch_nn_layer_norm_through_autograd(case: Case) -> None:
    assume(well_conditioned(case, FLOAT64_CONDITION_LIMIT))
    leaves = {"x": to_torch(case.x).requires_grad_()}
    for name in ("weight", "bias"):
        if getattr(case, name) is not None:
            leaves[name] = to_torch(getattr(case, name)).requires_grad_()
    y = tim.LayerNormFunction.apply(leaves["x"], leaves.get("weight"), leaves.get("bias"),
                                    case.eps)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), to_torch(case.dy))))
    grads = {k: g.detach() for k, g in grads.items()}
    y_nn, grads_nn = torch_nn_layer_norm(case)
    assert_close(y, y_nn, TORCHNN64_VS_OURS64.forward, "y")
    assert_grads_close(grads, grads_nn, TORCHNN64_VS_OURS64.gradient, case.eps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_is_finite_and_warning_free_at_magnitude_1e4(dtype) -> None:
    case = LARGE._replace(x=LARGE.x.astype(dtype), weight=LARGE.weight.astype(dtype),
                          bias=LARGE.bias.astype(dtype), dy=LARGE.dy.astype(dtype))
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, grads = run(ref, case)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads.values())
    # A constant row normalizes to x̂ = 0, so y = b there.
    assert_close(y[2], case.bias, 0.0, "y of the constant row")


BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x, weight, bias, eps, error, pattern", [
    (np.ones((2, 3)), np.ones(4), None, 1e-5, ValueError,
     r"^weight: expected shape \(3,\), got \(4,\)"),
    (np.ones((2, 3)), None, np.ones((1, 3)), 1e-5, ValueError,
     r"^bias: expected shape \(3,\), got \(1, 3\)"),
    (np.ones((2, 3)), np.ones(3, np.float32), None, 1e-5, TypeError,
     r"^weight: expected dtype .*float64.*got .*float32"),
    (np.array([[1.0, np.inf, 0.0]]), None, None, 1e-5, ValueError, r"^x: contains NaN or inf"),
    (np.array([[1.0, np.nan, 0.0]]), None, None, 1e-5, ValueError, r"^x: contains NaN or inf"),
    (np.ones((2, 3), np.int64), None, None, 1e-5, TypeError, r"^x: expected"),
    (np.ones(()), None, None, 1e-5, ValueError, r"^x: expected shape \(\.\.\., D\)"),
    (np.ones((2, 3)), None, None, 0.0, ValueError, r"^eps: expected a positive finite float"),
    (np.ones((2, 3)), None, None, "1e-5", TypeError, r"^eps: expected a float"),
], ids=["weight-shape", "bias-shape", "dtype-mismatch", "inf-x", "nan-x", "int-x", "0d-x",
        "zero-eps", "string-eps"])
def test_forward_rejects_bad_input_naming_the_argument(backend, x, weight, bias, eps, error,
                                                       pattern) -> None:
    module, array = backend
    maybe = lambda a: None if a is None else array(a)  # noqa: E731
    with pytest.raises(error, match=pattern):
        module.layer_norm_forward(array(x), maybe(weight), maybe(bias), eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rejects_misshapen_dy_naming_it(backend) -> None:
    module, array = backend
    _, cache = module.layer_norm_forward(array(np.ones((2, 3))), array(np.ones(3)), None)
    with pytest.raises(ValueError, match=r"^dy: expected shape \(2, 3\), got \(3, 2\)"):
        module.layer_norm_backward(array(np.ones((3, 2))), cache)
