"""embedding: reference vs finite differences, torch_impl vs reference, reference vs F.embedding."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import reference.embedding as ref
import torch_impl.embedding as tim
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
    ids: np.ndarray             # int (...)
    weight: np.ndarray          # (V, E)
    padding_idx: int | None     # in -V..V-1
    dy: np.ndarray              # (..., E)


@st.composite
def cases(draw: st.DrawFn, padding: bool = True) -> Case:
    vocab, dim = draw(sizes(6)), draw(sizes(3))
    ids_shape = draw(shapes(min_dims=1, max_dims=2, max_side=4))
    # A small vocabulary makes repeated ids (accumulated gradients) common.
    ids = np.random.default_rng(draw(seeds)).integers(0, vocab, size=ids_shape)
    padding_idx = draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1))) if padding else None
    return Case(ids, draw(normal_arrays((vocab, dim))), padding_idx,
                draw(normal_arrays(ids_shape + (dim,))))


REPEATED = Case(np.array([[2, 2, 2], [0, 2, 1]]), np.arange(8.0).reshape(4, 2) / 3, 0,
                np.linspace(-1, 1, 12).reshape(2, 3, 2))
BATCH_ONE = Case(np.array([3]), np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]), -1,
                 np.array([[1.0, -2.0]]))
SINGLE_ROW = Case(np.zeros((2, 2), dtype=np.int32), np.array([[1.5, -0.5, 2.0]]), None,
                  np.arange(12.0).reshape(2, 2, 3))


@given(case=cases(padding=False))
@example(case=REPEATED._replace(padding_idx=None))
@example(case=SINGLE_ROW)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    _, cache = ref.embedding_forward(case.ids, case.weight)
    dweight = ref.embedding_backward(case.dy, cache)
    gradcheck(lambda weight: ref.embedding_forward(case.ids, weight)[0], {"weight": case.weight},
              case.dy, {"weight": dweight}, tol=REF_VS_FINITE_DIFF)


@pytest.mark.parametrize("module", [ref, tim], ids=["reference", "torch_impl"])
@given(case=cases())
@example(case=REPEATED)
def test_padding_row_gets_zero_gradient_and_other_rows_are_unchanged(module, case: Case) -> None:
    convert = (lambda a: a) if module is ref else to_torch
    ids, weight, dy = convert(case.ids), convert(case.weight), convert(case.dy)
    y_pad, cache_pad = module.embedding_forward(ids, weight, case.padding_idx)
    y, cache = module.embedding_forward(ids, weight)
    assert_close(y_pad, y, 0.0, "y")  # the padding row is still looked up, as in torch
    dweight_pad = module.embedding_backward(dy, cache_pad)
    expected = module.embedding_backward(dy, cache)
    if case.padding_idx is not None:
        expected[case.padding_idx] = 0.0
    assert_close(dweight_pad, expected, 0.0, "dweight")


@given(case=cases())
@example(case=REPEATED)
@example(case=BATCH_ONE)
@example(case=SINGLE_ROW)
def test_torch_impl_float64_matches_reference(case: Case) -> None:
    y_ref, cache_ref = ref.embedding_forward(case.ids, case.weight, case.padding_idx)
    y, cache = tim.embedding_forward(to_torch(case.ids), to_torch(case.weight), case.padding_idx)
    assert_close(y, y_ref, TORCH64_VS_REF64.forward, "y")
    dweight = tim.embedding_backward(to_torch(case.dy), cache)
    assert dweight.dtype == torch.float64
    assert_close(dweight, ref.embedding_backward(case.dy, cache_ref), TORCH64_VS_REF64.gradient,
                 "dweight")


@given(case=cases())
@example(case=REPEATED)
def test_torch_impl_float32_matches_reference_float64(case: Case) -> None:
    weight, dy = float32_exact(case.weight), float32_exact(case.dy)
    y_ref, cache_ref = ref.embedding_forward(case.ids, weight, case.padding_idx)
    y, cache = tim.embedding_forward(to_torch(case.ids), to_torch(weight, torch.float32),
                                     case.padding_idx)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, TORCH32_VS_REF64.forward, "y")
    dweight = tim.embedding_backward(to_torch(dy, torch.float32), cache)
    assert dweight.dtype == torch.float32
    assert_close(dweight, ref.embedding_backward(dy, cache_ref), TORCH32_VS_REF64.gradient,
                 "dweight")


@given(case=cases())
@example(case=REPEATED)
@example(case=BATCH_ONE)
def test_reference_matches_torch_nn_functional_embedding(case: Case) -> None:
    y_ref, cache_ref = ref.embedding_forward(case.ids, case.weight, case.padding_idx)
    weight = to_torch(case.weight).requires_grad_()
    y = F.embedding(to_torch(case.ids), weight, padding_idx=case.padding_idx)
    (dweight,) = torch.autograd.grad(y, weight, to_torch(case.dy))
    assert_close(y_ref, y, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(ref.embedding_backward(case.dy, cache_ref), dweight, TORCHNN64_VS_OURS64.gradient,
                 "dweight")


BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_ids", [[0, 4], [-1, 2]], ids=["too-large", "negative"])
def test_forward_rejects_ids_out_of_range_naming_ids(backend, bad_ids) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^ids: values must be"):
        module.embedding_forward(array(np.array(bad_ids)), array(np.ones((4, 2))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_float_ids_naming_ids(backend) -> None:
    module, array = backend
    with pytest.raises(TypeError, match=r"^ids: expected an integer dtype"):
        module.embedding_forward(array(np.array([0.0, 1.0])), array(np.ones((4, 2))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_idx", [4, -5])
def test_forward_rejects_padding_idx_out_of_range_naming_it(backend, padding_idx) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^padding_idx: expected a value in -4\.\.3"):
        module.embedding_forward(array(np.array([0, 1])), array(np.ones((4, 2))), padding_idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_rejects_one_dimensional_weight_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^weight: expected shape \(V, E\), got \(4,\)"):
        module.embedding_forward(array(np.array([0, 1])), array(np.ones(4)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rejects_misshapen_dy_naming_it(backend) -> None:
    module, array = backend
    _, cache = module.embedding_forward(array(np.array([[0, 1, 2]])), array(np.ones((4, 2))))
    with pytest.raises(ValueError, match=r"^dy: expected shape \(1, 3, E\)"):
        module.embedding_backward(array(np.ones((3, 2))), cache)
