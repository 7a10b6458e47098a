"""seqtwin::layer_norm (torch_impl/kernels/layer_norm.py): every kernel path against reference
(float64, float32), forward and backward; the native C++ kernel (kernels/cpu/layer_norm.cpp)
taken under "auto", against torch.nn.functional.layer_norm at the edges, and deterministic;
opcheck; torch.compile(fullgraph=True) on CPU.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given

import reference.normalization as ref
from parity_tests.kernel_paths import NATIVE_PATHS
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
from torch_impl.kernels import kernel_path, native
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


@pytest.mark.parametrize("path", NATIVE_PATHS)
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
@pytest.mark.parametrize("path", NATIVE_PATHS)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["torch", "native"])
def test_layer_norm_ops_pass_opcheck(path: str, dtype: torch.dtype) -> None:
    x, weight, bias = sample_inputs(dtype)
    with kernel_path(path):
        torch.library.opcheck(torch.ops.seqtwin.layer_norm,
                              (x.requires_grad_(), weight.requires_grad_(), bias, 1e-5))
        _, mean, rstd = torch.ops.seqtwin.layer_norm(x.detach(), weight.detach(), bias, 1e-5)
        torch.library.opcheck(torch.ops.seqtwin.layer_norm_backward,
                              (torch.randn_like(x), x.detach(), weight.detach(), mean, rstd))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula) without
# a C++ build; a graph break would make fullgraph=True raise.
@pytest.mark.parametrize("path", ["torch", "native"])
def test_layer_norm_compiles_fullgraph_without_graph_breaks(path: str) -> None:
    def loss(x, weight, bias):
        return (layer_norm(torch.sin(x), weight, bias) ** 2).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in sample_inputs()]
    with kernel_path(path):
        value = compiled(*inputs)
        grads = torch.autograd.grad(value, inputs)
        value_eager = loss(*inputs)
        grads_eager = torch.autograd.grad(value_eager, inputs)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_close(value, value_eager, TORCH64_VS_REF64.forward, "loss")
    for name, g, g_eager in zip(("x", "weight", "bias"), grads, grads_eager):
        assert_close(g, g_eager, TORCH64_VS_REF64.gradient, f"d{name}")


# --------------------------------------------------------------------------- the native kernel

class CountingKernels:
    """The native module's entries, counting their calls."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, {"forward": 0, "backward": 0, "layer_norm": 0}

    def forward(self, *args):
        self.calls["forward"] += 1
        return self.module.forward(*args)

    def backward(self, *args):
        self.calls["backward"] += 1
        return self.module.backward(*args)

    def layer_norm(self, *args):  # forward, and backward under autograd (tied in C++)
        self.calls["layer_norm"] += 1
        return self.module.layer_norm(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_auto_path_runs_the_native_kernel_on_cpu(monkeypatch, dtype: torch.dtype) -> None:
    module = native.load("layer_norm")
    assert module is not None, f"layer_norm.cpp did not build: {native._failure}"
    counting = CountingKernels(module)
    monkeypatch.setitem(native._modules, "layer_norm", counting)
    x, weight, bias = sample_inputs(dtype)
    weight.requires_grad_()
    with kernel_path("auto"):
        with torch.no_grad():
            layer_norm(x, weight, bias)                           # eager, no autograd
        layer_norm(x, weight, bias).sum().backward()              # eager autograd
        torch.ops.seqtwin.layer_norm(x, weight, bias, 1e-5)[0].sum().backward()  # the op's
    assert counting.calls == {"forward": 2, "backward": 1, "layer_norm": 1}
    assert weight.grad is not None


def torch_nn_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor,
                  layer_norm_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(y, [dx, dweight, dbias]) of ``layer_norm_fn`` over x's last axis, through autograd."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = layer_norm_fn(*leaves)
    return y.detach(), list(torch.autograd.grad(y, leaves, dy))


def edge_inputs(edge: str, dtype: torch.dtype):
    """(x, weight, bias, dy) at one edge of the native kernel's domain."""
    generator = torch.Generator().manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, generator=generator)  # noqa: E731
    if edge == "batch-one":
        x = randn(1, 37)
    elif edge == "one-feature":
        x = randn(6, 1)
    elif edge == "non-contiguous":                    # transposed x, strided parameters
        x = randn(40, 3, 19).transpose(0, 2)
        return x, randn(80)[::2], randn(80)[::2], randn(*x.shape)
    else:                                             # "large": |x| ~ 1e4, rows offset 1e4
        x = 1e4 * (randn(5, 1) + randn(5, 1000))
    features = x.shape[-1]
    return x, randn(features), randn(features), randn(*x.shape)


@pytest.mark.parametrize("edge", ["batch-one", "one-feature", "non-contiguous", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_native_layer_norm_matches_torch_nn_functional(edge: str, dtype: torch.dtype) -> None:
    x, weight, bias, dy = edge_inputs(edge, dtype)
    features = x.shape[-1]
    with kernel_path("native"):
        y, grads = torch_nn_rows(x, weight, bias, dy, lambda x, w, b: layer_norm(x, w, b))
    y_nn, grads_nn = torch_nn_rows(
        x, weight, bias, dy,
        lambda x, w, b: torch.nn.functional.layer_norm(x, (features,), w, b, 1e-5))
    budget = TORCH64_VS_REF64 if dtype == torch.float64 else TORCH32_VS_REF64
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(y, y_nn, budget.forward, "y")
    for name, g, g_nn in zip(("x", "weight", "bias"), grads, grads_nn):
        if name != "bias" and features == 1:
            # x̂ = 0 exactly: dx and dweight are exactly 0 (ATen's float32 leaves ~1e-7 there)
            assert not g.any(), f"d{name}: expected exact zeros, got {g}"
        else:
            assert_close(g, g_nn, budget.gradient, f"d{name}")


def test_native_layer_norm_dweight_is_bit_identical_across_runs_and_thread_counts() -> None:
    generator = torch.Generator().manual_seed(2)
    # 4096 rows of 64: several row blocks, each with its partial dweight and dbias
    x, dy = (torch.randn(4096, 64, generator=generator) for _ in range(2))
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (2, 2, 1):
            torch.set_num_threads(num_threads)
            with kernel_path("native"):
                results.append(torch_nn_rows(x, weight, bias, dy, layer_norm)[1])
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        for name, g, g_first in zip(("x", "weight", "bias"), grads, results[0]):
            assert torch.equal(g, g_first), f"d{name} differs between runs"


def test_native_layer_norm_refuses_double_backward() -> None:
    x, weight, bias = (t.requires_grad_() for t in sample_inputs())
    with kernel_path("native"), pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(layer_norm(x, weight, bias).pow(2).sum(), x, create_graph=True)


def extreme_rows(dtype: torch.dtype, D: int = 8):
    """(x, weight, bias, dy) float64 arrays holding the values of dtype: rows whose direct sums
    overflow dtype (μ or σ² would be inf) beside an ordinary row, and the power of two they
    were built at (float32: near 1e20-1e37; float64: near 1e160-1e300)."""
    rng = np.random.default_rng(0)
    big = 2.0 ** 66 if dtype == torch.float32 else 2.0 ** 540
    huge = 2.0 ** 122 if dtype == torch.float32 else 2.0 ** 1000
    rows = [np.full(D, big),                                   # constant: x̂ = 0
            np.tile([big, -big], D // 2),                      # x̂ = ±1
            big * (3.0 + rng.standard_normal(D)),              # offset and spread
            huge * rng.uniform(-1.0, 1.0, D),                  # near the dtype's max / D
            rng.standard_normal(D)]                            # an ordinary row
    cast = np.float32 if dtype == torch.float32 else np.float64
    x = np.stack(rows).astype(cast).astype(np.float64)
    weight = rng.standard_normal(D).astype(cast).astype(np.float64)
    bias = rng.standard_normal(D).astype(cast).astype(np.float64)
    dy = rng.standard_normal(x.shape).astype(cast).astype(np.float64)
    return x, weight, bias, dy


def exact_layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float):
    """LayerNorm's exact-math value per row, from x scaled down to where float64 holds it: y,
    and x̂ with r for the gradients."""
    e = np.frexp(np.abs(x).max(axis=-1, keepdims=True))[1]
    u = np.ldexp(x, -e)                                        # exact in float64
    centered = u - u.mean(axis=-1, keepdims=True)
    var = (centered ** 2).mean(axis=-1, keepdims=True)
    # a constant row: x̂ = 0 and r = 1 / √ε (ε / 4^e underflows in float64 here)
    constant = var == 0
    rstd_u = 1.0 / np.sqrt(np.where(constant, 1.0, var + np.ldexp(eps, -2 * e)))
    x_hat = np.where(constant, 0.0, centered * rstd_u)
    rstd = np.where(constant, 1.0 / np.sqrt(eps), np.ldexp(rstd_u, -e))
    return x_hat * weight + bias, x_hat, rstd


def exact_backward(dy, x_hat, rstd, weight):
    dx_hat = dy * weight
    dx = rstd * (dx_hat - dx_hat.mean(-1, keepdims=True)
                 - x_hat * (dx_hat * x_hat).mean(-1, keepdims=True))
    return dx, (dy * x_hat).sum(0), dy.sum(0)


# triton's interpreter warns where the direct sums overflow, as designed
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", NATIVE_PATHS + ["reference"])
def test_rows_whose_sums_overflow_get_the_exact_layer_norm_on_every_path(
        path: str, dtype: torch.dtype) -> None:
    """Defined behaviour at extreme magnitudes (the module docstring): the exact-math value,
    finite, forward and backward, wherever the direct sums of a row overflow the dtype;
    torch.nn.functional.layer_norm gives NaN or 0 on these rows."""
    x, weight, bias, dy = extreme_rows(dtype)
    eps = 1e-5
    y_exact, x_hat, rstd = exact_layer_norm(x, weight, bias, eps)
    dx_exact, dw_exact, db_exact = exact_backward(dy, x_hat, rstd, weight)
    if path == "reference":
        cast = np.float32 if dtype == torch.float32 else np.float64
        y, cache = ref.layer_norm_forward(x.astype(cast), weight.astype(cast),
                                          bias.astype(cast), eps)
        dx, dw, db = ref.layer_norm_backward(dy.astype(cast), cache)
    else:
        case = Case(x, weight, bias, dy, eps)
        with kernel_path(path):
            y, grads = run_kernel(case, dtype)
        dx, dw, db = (grads[k].cpu().numpy() for k in ("x", "weight", "bias"))
        y = y.cpu().numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, got, want in (("y", y, y_exact), ("dweight", dw, dw_exact),
                            ("dbias", db, db_exact)):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max(),
                                   err_msg=name)
    # dx per row, relative to the row's own scale (r is ~2^-66 .. 2^-1000 there)
    for row in range(x.shape[0]):
        scale = np.abs(dx_exact[row]).max()
        assert np.all(np.isfinite(dx[row])), row
        np.testing.assert_allclose(dx[row], dx_exact[row], rtol=0, atol=10 * tol * scale,
                                   err_msg=f"dx row {row}")
