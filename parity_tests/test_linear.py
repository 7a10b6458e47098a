"""linear: reference vs finite differences, torch_impl vs reference, reference vs F.linear."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import reference.linear as ref
import torch_impl.linear as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, normal_arrays, shapes, sizes, to_torch
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck


class Case(NamedTuple):
    x: np.ndarray             # (..., I)
    weight: np.ndarray        # (O, I)
    bias: np.ndarray | None   # (O,)
    dy: np.ndarray            # (..., O)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    leading = draw(shapes(min_dims=0, max_dims=2, max_side=3))
    in_features, out_features = draw(sizes(4)), draw(sizes(4))
    bias = draw(st.one_of(st.none(), normal_arrays((out_features,))))
    return Case(draw(normal_arrays(leading + (in_features,))),
                draw(normal_arrays((out_features, in_features))), bias,
                draw(normal_arrays(leading + (out_features,))))


BATCH_ONE = Case(np.array([[0.5, -2.0]]), np.array([[1.0, 3.0], [-0.5, 0.25], [2.0, 1.0]]),
                 np.array([0.1, 0.2, -0.3]), np.array([[1.0, -1.0, 0.5]]))
NO_BIAS_SEQUENCE = Case(np.arange(12.0).reshape(2, 3, 2) / 7, np.array([[1.0, -2.0]]), None,
                        np.linspace(-1, 1, 6).reshape(2, 3, 1))


def grads_dict(dx, dweight, dbias) -> dict:
    grads = {"x": dx, "weight": dweight}
    if dbias is not None:
        grads["bias"] = dbias
    return grads


def inputs_dict(case: Case, convert=lambda a: a) -> dict:
    inputs = {"x": convert(case.x), "weight": convert(case.weight)}
    if case.bias is not None:
        inputs["bias"] = convert(case.bias)
    return inputs


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=NO_BIAS_SEQUENCE)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    inputs = inputs_dict(case)
    _, cache = ref.linear_forward(**inputs)
    analytic = grads_dict(*ref.linear_backward(case.dy, cache))
    gradcheck(lambda **kw: ref.linear_forward(**kw)[0], inputs, case.dy, analytic,
              tol=REF_VS_FINITE_DIFF)


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=NO_BIAS_SEQUENCE)
def test_torch_impl_float64_matches_reference(case: Case) -> None:
    y_ref, cache_ref = ref.linear_forward(**inputs_dict(case))
    y, cache = tim.linear_forward(**inputs_dict(case, to_torch))
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    grads_ref = grads_dict(*ref.linear_backward(case.dy, cache_ref))
    grads = grads_dict(*tim.linear_backward(to_torch(case.dy), cache))
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert grads[name].dtype == torch.float64
        assert_close(grads[name], grads_ref[name], TORCH64_VS_REF64.gradient, f"d{name}")


@given(case=cases())
@example(case=BATCH_ONE)
def test_torch_impl_float32_matches_reference_float64(case: Case) -> None:
    case = Case(*(None if a is None else float32_exact(a) for a in case))
    y_ref, cache_ref = ref.linear_forward(**inputs_dict(case))
    y, cache = tim.linear_forward(**inputs_dict(case, lambda a: to_torch(a, torch.float32)))
    assert y.dtype == torch.float32
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    grads_ref = grads_dict(*ref.linear_backward(case.dy, cache_ref))
    grads = grads_dict(*tim.linear_backward(to_torch(case.dy, torch.float32), cache))
    for name in grads_ref:
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], grads_ref[name], TORCH32_VS_REF64.gradient, f"d{name}")


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=NO_BIAS_SEQUENCE)
def test_reference_matches_torch_nn_functional_linear(case: Case) -> None:
    y_ref, cache_ref = ref.linear_forward(**inputs_dict(case))
    grads_ref = grads_dict(*ref.linear_backward(case.dy, cache_ref))
    inputs = {k: v.requires_grad_() for k, v in inputs_dict(case, to_torch).items()}
    y = F.linear(inputs["x"], inputs["weight"], inputs.get("bias"))
    grads = torch.autograd.grad(y, list(inputs.values()), to_torch(case.dy))
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    for name, grad in zip(inputs, grads):
        assert_close(grads_ref[name], grad, TORCHNN64_VS_OURS64.gradient, f"d{name}")


def test_reference_computes_in_float32_when_given_float32() -> None:
    case = Case(*(a.astype(np.float32) for a in BATCH_ONE))
    y, cache = ref.linear_forward(case.x, case.weight, case.bias)
    dx, dweight, dbias = ref.linear_backward(case.dy, cache)
    assert y.dtype == dx.dtype == dweight.dtype == dbias.dtype == np.float32


BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dbias_is_none_without_bias(backend) -> None:
    module, array = backend
    y, cache = module.linear_forward(array(np.ones((2, 3))), array(np.ones((4, 3))))
    dx, dweight, dbias = module.linear_backward(array(np.ones((2, 4))), cache)
    assert dbias is None
    assert tuple(dx.shape) == (2, 3) and tuple(dweight.shape) == (4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_shape, w_shape, b_shape, error, pattern", [
    ((2, 3), (4, 5), None, ValueError, r"^x: expected shape \(\.\.\., 5\).*got \(2, 3\)"),
    ((2, 3), (12,), None, ValueError, r"^weight: expected shape \(O, I\), got \(12,\)"),
    ((2, 3), (4, 3), (3,), ValueError, r"^bias: expected shape \(4,\), got \(3,\)"),
])
def test_forward_rejects_mismatched_shapes_naming_the_argument(backend, x_shape, w_shape, b_shape,
                                                               error, pattern) -> None:
    module, array = backend
    bias = None if b_shape is None else array(np.ones(b_shape))
    with pytest.raises(error, match=pattern):
        module.linear_forward(array(np.ones(x_shape)), array(np.ones(w_shape)), bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_mixed_dtypes_naming_the_argument(backend) -> None:
    module, array = backend
    with pytest.raises(TypeError, match=r"^x: expected dtype .*float64.*got .*float32"):
        module.linear_forward(array(np.ones((2, 3), np.float32)), array(np.ones((4, 3))))
    with pytest.raises(TypeError, match=r"^bias: expected dtype"):
        module.linear_forward(array(np.ones((2, 3))), array(np.ones((4, 3))),
                              array(np.ones(4, np.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_integer_x_and_non_finite_weight(backend) -> None:
    module, array = backend
    with pytest.raises(TypeError, match=r"^x: expected"):
        module.linear_forward(array(np.ones((2, 3), np.int64)), array(np.ones((4, 3))))
    weight = np.ones((4, 3))
    weight[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"^weight: contains NaN or inf"):
        module.linear_forward(array(np.ones((2, 3))), array(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rejects_misshapen_dy_naming_it(backend) -> None:
    module, array = backend
    _, cache = module.linear_forward(array(np.ones((2, 3))), array(np.ones((4, 3))))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(2, 4\), got \(2, 3\)"):
        module.linear_backward(array(np.ones((2, 3))), cache)
