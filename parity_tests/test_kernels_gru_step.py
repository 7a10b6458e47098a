"""seqtwin::gru_step (torch_impl/kernels/gru_step.py): every kernel path against reference's
``gru_step_forward/backward`` with ``recurrent.py``'s masking by length (float64, float32),
new state and gradients of xw, h_{t-1}, W_hh, b_hh (hh's n-part apart from xw's, as the reset
gate requires); opcheck; torch.compile.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.gru as ref
from parity_tests.kernel_paths import PATHS
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, seeds, sizes, to_torch
from parity_tests.tolerances import (
    FLOAT32_STEP_CONDITION_LIMIT,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
)
from torch_impl.kernels import kernel_path
from torch_impl.kernels.gru_step import gru_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class StepCase(NamedTuple):
    xw: np.ndarray             # (B, 3H) W_ih x_t + b_ih
    h_prev: np.ndarray         # (B, H)
    w_hh: np.ndarray           # (3H, H)
    b_hh: np.ndarray           # (3H,)
    active: np.ndarray | None  # (B,) bool, t < lengths
    dh: np.ndarray             # (B, H) upstream gradient of h_t


def make_case(batch: int, hidden: int, seed: int, masked: bool, scale: float = 1.0) -> StepCase:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    active = rng.random(batch) < 0.6 if masked else None
    return StepCase(scale * normal(batch, 3 * hidden), normal(batch, hidden),
                    normal(3 * hidden, hidden) / np.sqrt(hidden), scale * normal(3 * hidden),
                    active, normal(batch, hidden))


@st.composite
def cases(draw: st.DrawFn) -> StepCase:
    return make_case(draw(sizes(4)), draw(sizes(5)), draw(seeds), draw(st.booleans()))


BATCH_ONE_HIDDEN_ONE = make_case(1, 1, 0, masked=False)
ALL_INACTIVE = make_case(3, 2, 1, masked=True)._replace(active=np.zeros(3, bool))
ONE_INACTIVE = make_case(3, 4, 2, masked=True)._replace(active=np.array([True, False, True]))
SATURATED = make_case(2, 3, 3, masked=True, scale=5.0)._replace(active=np.array([True, False]))


def state_condition(case: StepCase) -> float:
    """κ of h_t = (1 - z) n + z h_{t-1}: the norm of every term's magnitude in it (the gates'
    pre-activation terms through σ' and tanh' bounds) over the norm of h_t
    (FLOAT32_STEP_CONDITION_LIMIT)."""
    sigmoid = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    hh = case.h_prev @ case.w_hh.T + case.b_hh
    hh_scale = np.abs(case.h_prev) @ np.abs(case.w_hh).T + np.abs(case.b_hh)
    (xr, xz, xn), (hr, hz, hn) = np.split(case.xw, 3, axis=1), np.split(hh, 3, axis=1)
    (sr, sz, sn) = np.split(hh_scale, 3, axis=1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    n_terms = (1 - n * n) * (np.abs(xn) + r * sn + np.abs(hn) * r * (1 - r) * (np.abs(xr) + sr))
    h = (1 - z) * n + z * case.h_prev
    h_terms = ((1 - z) * n_terms + np.abs((1 - z) * n) + np.abs(z * case.h_prev)
               + np.abs(n - case.h_prev) * z * (1 - z) * (np.abs(xz) + sz))
    if case.active is not None:  # inactive rows carry their state exactly
        m = case.active[:, None]
        h, h_terms = np.where(m, h, case.h_prev), np.where(m, h_terms, np.abs(case.h_prev))
    return float(np.linalg.norm(h_terms) / max(np.linalg.norm(h), 1e-300))


def reference_step(case: StepCase):
    """(h, {xw, h_prev, w_hh, b_hh} grads): the step of reference/gru.py, masked and
    back-propagated as reference/recurrent.py's direction_forward/backward do."""
    (h,), cache = ref.gru_step_forward(case.xw, (case.h_prev,), case.w_hh, case.b_hh)
    m = np.ones(len(case.xw), bool) if case.active is None else case.active
    m = m[:, None]
    h = np.where(m, h, case.h_prev)
    dxw, dhh, (dh_prev,) = ref.gru_step_backward((np.where(m, case.dh, 0.0),), cache, case.w_hh)
    grads = {"xw": dxw, "h_prev": dh_prev + np.where(m, 0.0, case.dh),
             "w_hh": dhh.T @ case.h_prev, "b_hh": dhh.sum(axis=0)}
    return h, grads


def kernel_step(case: StepCase, dtype: torch.dtype):
    """The same through the fused op, hh = h_{t-1} W_hh^T + b_hh in torch, autograd."""
    leaves = {name: to_torch(getattr(case, name), dtype).to(DEVICE).requires_grad_()
              for name in ("xw", "h_prev", "w_hh", "b_hh")}
    hh = leaves["h_prev"] @ leaves["w_hh"].t() + leaves["b_hh"]
    active = None if case.active is None else to_torch(case.active).to(DEVICE)
    h = gru_step(leaves["xw"], hh, leaves["h_prev"], active)
    grads = torch.autograd.grad(h, list(leaves.values()), to_torch(case.dh, dtype).to(DEVICE))
    return h.detach(), dict(zip(leaves, grads))


def assert_matches_reference(path: str, case: StepCase, dtype: torch.dtype, budget) -> None:
    h_ref, grads_ref = reference_step(case)
    with kernel_path(path):
        h, grads = kernel_step(case, dtype)
    assert h.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert_close(h, h_ref, budget.forward, "h")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], budget.gradient, f"d{name}")


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE_HIDDEN_ONE)
@example(case=ALL_INACTIVE)
@example(case=ONE_INACTIVE)
@example(case=SATURATED)
def test_gru_step_kernel_float64_matches_reference(path: str, case: StepCase) -> None:
    assert_matches_reference(path, case, torch.float64, TORCH64_VS_REF64)


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE_HIDDEN_ONE)
@example(case=ONE_INACTIVE)
def test_gru_step_kernel_float32_matches_reference_float64(path: str, case: StepCase) -> None:
    case = StepCase(*(a if a is None or a.dtype == bool else float32_exact(a) for a in case))
    assume(state_condition(case) <= FLOAT32_STEP_CONDITION_LIMIT)
    assert_matches_reference(path, case, torch.float32, TORCH32_VS_REF64)


def sample_inputs(masked: bool = True):
    generator = torch.Generator().manual_seed(0)
    normal = lambda *shape: torch.randn(*shape, dtype=torch.float64,  # noqa: E731
                                        generator=generator)
    active = torch.tensor([True, False, True]) if masked else None
    return normal(3, 6), normal(3, 6), normal(3, 2), active


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_gru_step_ops_pass_opcheck(masked: bool) -> None:
    xw, hh, h_prev, active = sample_inputs(masked)
    with kernel_path("torch"):
        torch.library.opcheck(torch.ops.seqtwin.gru_step,
                              (xw.requires_grad_(), hh.requires_grad_(), h_prev.requires_grad_(),
                               active))
        h, saved = torch.ops.seqtwin.gru_step(xw.detach(), hh.detach(), h_prev.detach(), active)
        torch.library.opcheck(torch.ops.seqtwin.gru_step_backward,
                              (torch.randn_like(h), saved, h_prev.detach(), active))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula)
# without a C++ build; a graph break would make fullgraph=True raise.
def test_gru_step_compiles_fullgraph_without_graph_breaks() -> None:
    def two_steps(xw, hh, h, active):
        h = gru_step(xw, hh, h, active)
        h = gru_step(xw, hh.tanh(), h, None)
        return (h * h).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    *inputs, active = sample_inputs()
    inputs = [t.requires_grad_() for t in inputs]
    with kernel_path("torch"):
        value = compiled(*inputs, active)
        grads = torch.autograd.grad(value, inputs)
        value_eager = two_steps(*inputs, active)
        grads_eager = torch.autograd.grad(value_eager, inputs)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_close(value, value_eager, TORCH64_VS_REF64.forward, "value")
    for name, g, g_eager in zip(("xw", "hh", "h"), grads, grads_eager):
        assert_close(g, g_eager, TORCH64_VS_REF64.gradient, f"d{name}")
