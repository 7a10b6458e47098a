"""seqtwin::layer_norm (torch_impl/kernels/layer_norm.py): every kernel path against reference
(float64, float32), forward and backward; opcheck; torch.compile(fullgraph=True) on CPU.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given

import reference.normalization as ref
from parity_tests.kernel_paths import PATHS
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, to_torch
from parity_tests.test_normalization import (
    BATCH_ONE,
    COARSE_CONDITION_LIMIT,
    FLOAT64_CONDITION_LIMIT,
    LARGE,
    ONE_FEATURE,
    SINGLE_ROW_NO_AFFINE,
    Case,
    cases,
    well_conditioned,
)
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64
from torch_impl.kernels import kernel_path
from torch_impl.kernels.layer_norm import layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_kernel(case: Case, dtype: torch.dtype):
    """(y, {dx, dweight, dbias}) of the fused op through autograd; absent parameters dropped."""
    inputs = {name: to_torch(a, dtype).to(DEVICE).requires_grad_() for name, a in
              (("x", case.x), ("weight", case.weight), ("bias", case.bias)) if a is not None}
    y = layer_norm(inputs["x"], inputs.get("weight"), inputs.get("bias"), case.eps)
    grads = torch.autograd.grad(y, list(inputs.values()), to_torch(case.dy, dtype).to(DEVICE))
    return y.detach(), dict(zip(inputs, grads))


def assert_matches_reference(case: Case, dtype: torch.dtype, budget) -> None:
    y_ref, cache = ref.layer_norm_forward(case.x, case.weight, case.bias, case.eps)
    dx, dweight, dbias = ref.layer_norm_backward(case.dy, cache)
    grads_ref = {k: g for k, g in (("x", dx), ("weight", dweight), ("bias", dbias))
                 if g is not None}
    y, grads = run_kernel(case, dtype)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert_close(y, y_ref, budget.forward, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], budget.gradient, f"d{name}")


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
@example(case=LARGE)
def test_layer_norm_kernel_float64_matches_reference(path: str, case: Case) -> None:
    assume(well_conditioned(case, FLOAT64_CONDITION_LIMIT))
    with kernel_path(path):
        assert_matches_reference(case, torch.float64, TORCH64_VS_REF64)


# Row offsets <= 1: see test_normalization's float32 test for why larger ones are meaningless.
@pytest.mark.parametrize("path", PATHS)
@given(case=cases(max_offset=1.0))
@example(case=BATCH_ONE)
@example(case=ONE_FEATURE)
@example(case=SINGLE_ROW_NO_AFFINE)
def test_layer_norm_kernel_float32_matches_reference_float64(path: str, case: Case) -> None:
    exact = lambda a: None if a is None else float32_exact(a)  # noqa: E731
    case = case._replace(x=exact(case.x), weight=exact(case.weight), bias=exact(case.bias),
                         dy=exact(case.dy))
    assume(well_conditioned(case, COARSE_CONDITION_LIMIT))
    with kernel_path(path):
        assert_matches_reference(case, torch.float32, TORCH32_VS_REF64)


def sample_inputs(dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=dtype, generator=generator)
    weight = torch.randn(5, dtype=dtype, generator=generator)
    bias = torch.randn(5, dtype=dtype, generator=generator)
    return x, weight, bias


def test_layer_norm_ops_pass_opcheck() -> None:
    x, weight, bias = sample_inputs()
    with kernel_path("torch"):
        torch.library.opcheck(torch.ops.seqtwin.layer_norm,
                              (x.requires_grad_(), weight.requires_grad_(), bias, 1e-5))
        _, mean, rstd = torch.ops.seqtwin.layer_norm(x.detach(), weight.detach(), bias, 1e-5)
        torch.library.opcheck(torch.ops.seqtwin.layer_norm_backward,
                              (torch.randn_like(x), x.detach(), weight.detach(), mean, rstd))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula) without
# a C++ build; a graph break would make fullgraph=True raise.
def test_layer_norm_compiles_fullgraph_without_graph_breaks() -> None:
    def loss(x, weight, bias):
        return (layer_norm(torch.sin(x), weight, bias) ** 2).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in sample_inputs()]
    with kernel_path("torch"):
        value = compiled(*inputs)
        grads = torch.autograd.grad(value, inputs)
        value_eager = loss(*inputs)
        grads_eager = torch.autograd.grad(value_eager, inputs)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_close(value, value_eager, TORCH64_VS_REF64.forward, "loss")
    for name, g, g_eager in zip(("x", "weight", "bias"), grads, grads_eager):
        assert_close(g, g_eager, TORCH64_VS_REF64.gradient, f"d{name}")
