"""dropout: reference vs finite differences, torch_impl vs reference (same mask), reference vs
F.dropout given the mask F.dropout drew, and the keep-mask generators."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import reference.dropout as ref
import torch_impl.dropout as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, normal_arrays, seeds, shapes, to_torch
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck

probabilities = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 0.95)


class Case(NamedTuple):
    x: np.ndarray
    p: float
    mask: np.ndarray  # bool keep-mask, shape of x
    dy: np.ndarray


@st.composite
def cases(draw: st.DrawFn) -> Case:
    shape = draw(shapes(min_dims=1, max_dims=3))
    p = draw(probabilities)
    mask = ref.dropout_mask(shape, p, draw(seeds))
    return Case(draw(normal_arrays(shape)), p, mask, draw(normal_arrays(shape)))


BATCH_ONE = Case(np.array([[0.5, -1.5, 2.0]]), 0.25, np.array([[True, False, True]]),
                 np.array([[1.0, 2.0, -3.0]]))
DROP_ALL = Case(np.array([1.0, -2.0]), 1.0, np.array([False, False]), np.array([0.5, 0.5]))


def forward_backward(module, case: Case, convert=lambda a: a):
    y, cache = module.dropout_forward(convert(case.x), case.p, convert(case.mask))
    return y, module.dropout_backward(convert(case.dy), cache)


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=DROP_ALL)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    _, dx = forward_backward(ref, case)
    gradcheck(lambda x: ref.dropout_forward(x, case.p, case.mask)[0], {"x": case.x}, case.dy,
              {"x": dx}, tol=REF_VS_FINITE_DIFF)


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=DROP_ALL)
def test_torch_impl_float64_matches_reference_given_the_same_mask(case: Case) -> None:
    y_ref, dx_ref = forward_backward(ref, case)
    y, dx = forward_backward(tim, case, to_torch)
    assert y.dtype == dx.dtype == torch.float64
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH64_VS_REF64.gradient, "dx")


@given(case=cases())
@example(case=BATCH_ONE)
def test_torch_impl_float32_matches_reference_float64_given_the_same_mask(case: Case) -> None:
    case = case._replace(x=float32_exact(case.x), dy=float32_exact(case.dy))
    y_ref, dx_ref = forward_backward(ref, case)
    y, dx = forward_backward(tim, case, lambda a: to_torch(a, torch.float32))
    assert y.dtype == dx.dtype == torch.float32
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    assert_close(dx, dx_ref, TORCH32_VS_REF64.gradient, "dx")


@given(shape=shapes(min_dims=1, max_dims=3), p=st.floats(0.05, 0.95), seed=seeds)
def test_reference_matches_torch_nn_functional_dropout_given_its_mask(shape, p, seed) -> None:
    # Nonzero inputs so that F.dropout's output reveals the mask it drew.
    x_np = np.random.default_rng(seed).uniform(0.5, 2.0, size=shape)
    dy_np = np.random.default_rng(seed + 1).standard_normal(shape)
    x = to_torch(x_np).requires_grad_()
    with torch.random.fork_rng(devices=[]):  # leave the global generator as it was
        torch.manual_seed(seed)
        y = F.dropout(x, p, training=True)
    (dx,) = torch.autograd.grad(y, x, to_torch(dy_np))
    mask = (y != 0).numpy()
    y_ref, cache = ref.dropout_forward(x_np, p, mask)
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(ref.dropout_backward(dy_np, cache), dx, TORCHNN64_VS_OURS64.gradient, "dx")


MODULES = [pytest.param((ref, lambda a: a), id="reference"),
           pytest.param((tim, to_torch), id="torch_impl")]


@pytest.mark.parametrize("backend", MODULES)
def test_p_one_drops_everything_without_warnings(backend) -> None:
    module, convert = backend
    case = DROP_ALL._replace(mask=np.array([True, False]))  # p = 1 zeroes even kept entries
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, dx = forward_backward(module, case, convert)
    assert not np.asarray(y).any() and not np.asarray(dx).any()


@pytest.mark.parametrize("module", [ref, tim], ids=["reference", "torch_impl"])
@given(shape=shapes(min_dims=1, max_dims=3, max_side=6), p=probabilities, seed=seeds)
def test_dropout_mask_is_a_bool_mask_determined_by_the_seed(module, shape, p, seed) -> None:
    mask = np.asarray(module.dropout_mask(shape, p, seed))
    assert mask.dtype == np.bool_ and mask.shape == shape
    assert np.array_equal(mask, np.asarray(module.dropout_mask(shape, p, seed)))
    if p == 0.0:
        assert mask.all()
    if p == 1.0:
        assert not mask.any()


@pytest.mark.parametrize("module", [ref, tim], ids=["reference", "torch_impl"])
@given(p=st.floats(0.0, 1.0), seed=seeds)
def test_dropout_mask_keeps_a_fraction_one_minus_p(module, p, seed) -> None:
    n = 20_000
    kept = float(np.asarray(module.dropout_mask((100, 200), p, seed)).mean())
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) <= 6 * sigma + 1e-12


@pytest.mark.parametrize("module, generator", [
    (ref, lambda: np.random.default_rng(7)),
    (tim, lambda: torch.Generator().manual_seed(7)),
], ids=["reference", "torch_impl"])
def test_dropout_mask_draws_from_a_given_generator_and_advances_it(module, generator) -> None:
    rng = generator()
    first = np.asarray(module.dropout_mask((4, 50), 0.5, rng))
    second = np.asarray(module.dropout_mask((4, 50), 0.5, rng))
    assert np.array_equal(first, np.asarray(module.dropout_mask((4, 50), 0.5, generator())))
    assert not np.array_equal(first, second)


BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_misshapen_mask_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^mask: expected shape \(2, 3\) .*got \(3, 2\)"):
        module.dropout_forward(array(np.ones((2, 3))), 0.5, array(np.ones((3, 2), bool)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_non_bool_mask_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(TypeError, match=r"^mask: expected a bool"):
        module.dropout_forward(array(np.ones((2, 3))), 0.5, array(np.ones((2, 3))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_forward_and_mask_reject_p_outside_0_1_naming_it(backend, p) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^p: expected a probability in \[0, 1\]"):
        module.dropout_forward(array(np.ones(3)), p, array(np.ones(3, bool)))
    with pytest.raises(ValueError, match=r"^p: expected a probability in \[0, 1\]"):
        module.dropout_mask((3,), p, 0)


@pytest.mark.parametrize("module", [ref, tim], ids=["reference", "torch_impl"])
def test_dropout_mask_rejects_bad_seed_and_shape_naming_them(module) -> None:
    with pytest.raises(TypeError, match=r"^seed: expected an int"):
        module.dropout_mask((3,), 0.5, 1.5)
    with pytest.raises(ValueError, match=r"^seed: expected a non-negative int"):
        module.dropout_mask((3,), 0.5, -1)
    with pytest.raises(TypeError, match=r"^shape: expected a tuple of ints"):
        module.dropout_mask(3, 0.5, 0)
    with pytest.raises(ValueError, match=r"^shape: expected non-negative sizes"):
        module.dropout_mask((2, -1), 0.5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rejects_misshapen_dy_naming_it(backend) -> None:
    module, array = backend
    _, cache = module.dropout_forward(array(np.ones((2, 3))), 0.5, array(np.ones((2, 3), bool)))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(2, 3\), got \(6,\)"):
        module.dropout_backward(array(np.ones(6)), cache)
