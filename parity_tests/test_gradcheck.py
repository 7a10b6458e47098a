"""gradcheck: the finite-difference checkers of both backends find right gradients right and
wrong gradients wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

# the packages export the functions gradcheck / numerical_gradients under the module's name
import reference as ref
import torch_impl as tim
from parity_tests.parity import assert_close, to_numpy
from parity_tests.strategies import normal_arrays, shapes, to_torch
from parity_tests.tolerances import REF_VS_FINITE_DIFF


def product_and_square_np(a: np.ndarray, b: np.ndarray):
    """(a ⊙ b, (a², sum(b))): a nested tuple of outputs."""
    return a * b, (a * a, b.sum())


def product_and_square_torch(a: torch.Tensor, b: torch.Tensor):
    return a * b, (a * a, b.sum())


def product_and_square_vjp(a, b, u_prod, u_square, u_sum):
    """Analytic gradients of Σ <outputs, upstream> for ``product_and_square``."""
    return {"a": u_prod * b + 2 * a * u_square, "b": u_prod * a + u_sum}


MODULES = [pytest.param((ref, product_and_square_np, lambda a: a), id="reference"),
           pytest.param((tim, product_and_square_torch, to_torch), id="torch_impl")]


@pytest.mark.parametrize("backend", MODULES)
@given(data=st.data())
def test_numerical_gradients_match_analytic_vjp_of_nested_outputs(backend, data) -> None:
    module, f, convert = backend
    shape = data.draw(shapes(min_dims=0, max_dims=2), label="shape")
    a, b, u_prod, u_square = (data.draw(normal_arrays(shape)) for _ in range(4))
    u_sum = data.draw(st.floats(-2.0, 2.0), label="u_sum")
    numeric = module.numerical_gradients(
        f, {"a": convert(a), "b": convert(b)}, (convert(u_prod), (convert(u_square), u_sum)))
    expected = product_and_square_vjp(a, b, u_prod, u_square, u_sum)
    for name in ("a", "b"):
        assert_close(numeric[name], expected[name], REF_VS_FINITE_DIFF, name)


@pytest.mark.parametrize("backend", MODULES)
def test_none_upstream_counts_as_zero(backend) -> None:
    module, f, convert = backend
    a, b, u_prod = np.array([1.0, -2.0]), np.array([0.5, 3.0]), np.array([2.0, 1.0])
    numeric = module.numerical_gradients(f, {"a": convert(a), "b": convert(b)},
                                         (convert(u_prod), (None, None)))
    assert_close(numeric["a"], u_prod * b, REF_VS_FINITE_DIFF, "a")
    assert_close(numeric["b"], u_prod * a, REF_VS_FINITE_DIFF, "b")


@pytest.mark.parametrize("backend", MODULES)
def test_gradcheck_passes_a_right_gradient_and_returns_per_input_errors(backend) -> None:
    module, f, convert = backend
    a, b = np.array([[1.0, -2.0, 0.5]]), np.array([[0.5, 3.0, -1.0]])
    u_prod, u_square = np.ones((1, 3)), np.full((1, 3), -0.5)
    analytic = product_and_square_vjp(a, b, u_prod, u_square, 2.0)
    errors = module.gradcheck(f, {"a": convert(a), "b": convert(b)},
                              (convert(u_prod), (convert(u_square), 2.0)),
                              {k: convert(v) for k, v in analytic.items()})
    assert set(errors) == {"a", "b"}
    assert all(0.0 <= e <= REF_VS_FINITE_DIFF for e in errors.values())


@pytest.mark.parametrize("backend", MODULES)
def test_gradcheck_raises_on_a_wrong_gradient_naming_input_and_element(backend) -> None:
    module, f, convert = backend
    a, b = np.array([[1.0, -2.0, 0.5]]), np.array([[0.5, 3.0, -1.0]])
    u_prod, u_square = np.ones((1, 3)), np.full((1, 3), -0.5)
    analytic = product_and_square_vjp(a, b, u_prod, u_square, 2.0)
    analytic["b"][0, 1] += 1e-3  # one element of one input slightly off
    with pytest.raises(AssertionError, match=r"gradient of 'b' .*worst element at \(0, 1\)"):
        module.gradcheck(f, {"a": convert(a), "b": convert(b)},
                         (convert(u_prod), (convert(u_square), 2.0)),
                         {k: convert(v) for k, v in analytic.items()})


@pytest.mark.parametrize("backend", MODULES)
def test_gradcheck_raises_on_a_nan_gradient(backend) -> None:
    module, f, convert = backend
    a, b = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    analytic = product_and_square_vjp(a, b, np.ones(2), np.ones(2), 0.0)
    analytic["a"][1] = np.nan
    with pytest.raises(AssertionError, match=r"analytic gradient of 'a' holds nan at index \(1,\)"):
        module.gradcheck(f, {"a": convert(a), "b": convert(b)},
                         (convert(np.ones(2)), (convert(np.ones(2)), 0.0)),
                         {k: convert(v) for k, v in analytic.items()}, tol=1e300)


@pytest.mark.parametrize("backend", MODULES)
def test_numerical_gradients_leave_inputs_unchanged(backend) -> None:
    module, f, convert = backend
    a, b = convert(np.array([1.0, 2.0])), convert(np.array([3.0, 4.0]))
    a_before, b_before = to_numpy(a).copy(), to_numpy(b).copy()
    module.numerical_gradients(f, {"a": a, "b": b}, (convert(np.ones(2)), (None, 1.0)))
    assert np.array_equal(to_numpy(a), a_before) and np.array_equal(to_numpy(b), b_before)


@pytest.mark.parametrize("backend", MODULES)
def test_inputs_must_be_float64_naming_the_input(backend) -> None:
    module, f, convert = backend
    a = convert(np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"^inputs\['a'\]: expected a float64"):
        module.numerical_gradients(f, {"a": a, "b": convert(np.ones(2))}, (None, (None, None)))


@pytest.mark.parametrize("backend", MODULES)
def test_upstream_must_mirror_the_outputs(backend) -> None:
    module, f, convert = backend
    inputs = {"a": convert(np.ones(2)), "b": convert(np.ones(2))}
    with pytest.raises(ValueError, match=r"^upstream: expected 3 .*got 2"):
        module.numerical_gradients(f, inputs, (convert(np.ones(2)), None))
    with pytest.raises(ValueError, match=r"^upstream: leaf 0 has shape \(3,\)"):
        module.numerical_gradients(f, inputs, (convert(np.ones(3)), (None, None)))


@pytest.mark.parametrize("backend", MODULES)
def test_gradcheck_rejects_analytic_with_other_keys_or_shapes(backend) -> None:
    module, f, convert = backend
    inputs = {"a": convert(np.ones(2)), "b": convert(np.ones(2))}
    upstream = (convert(np.ones(2)), (None, None))
    with pytest.raises(ValueError, match=r"^analytic: expected the keys of inputs"):
        module.gradcheck(f, inputs, upstream, {"a": convert(np.ones(2))})
    with pytest.raises(ValueError, match=r"^analytic\['b'\]: expected shape \(2,\), got \(3,\)"):
        module.gradcheck(f, inputs, upstream, {"a": convert(np.ones(2)), "b": convert(np.ones(3))})


@given(x=normal_arrays((2, 3)), upstream=normal_arrays((2, 3)))
def test_torch_impl_numerical_gradients_match_torch_autograd(x, upstream) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * x.sum(dim=-1, keepdim=True)

    x_t = to_torch(x).requires_grad_()
    (expected,) = torch.autograd.grad(f(x_t), x_t, to_torch(upstream))
    numeric = tim.numerical_gradients(f, {"x": to_torch(x)}, to_torch(upstream))
    assert_close(numeric["x"], expected, REF_VS_FINITE_DIFF, "x")
