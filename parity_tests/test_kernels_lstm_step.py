"""seqtwin::lstm_step (torch_impl/kernels/lstm_step.py): every kernel path against reference's
``lstm_step_forward/backward`` with ``recurrent.py``'s masking by length (float64, float32),
new state and gradients of xw, h_{t-1}, c_{t-1}, W_hh, b_hh; opcheck; torch.compile.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.lstm as ref
from parity_tests.kernel_paths import PATHS
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, seeds, sizes, to_torch
from parity_tests.tolerances import (
    FLOAT32_STEP_CONDITION_LIMIT,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
)
from torch_impl.kernels import kernel_path
from torch_impl.kernels.lstm_step import lstm_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class StepCase(NamedTuple):
    xw: np.ndarray             # (B, 4H) W_ih x_t + b_ih
    h_prev: np.ndarray         # (B, H)
    c_prev: np.ndarray         # (B, H)
    w_hh: np.ndarray           # (4H, H)
    b_hh: np.ndarray           # (4H,)
    active: np.ndarray | None  # (B,) bool, t < lengths
    dh: np.ndarray             # (B, H) upstream gradient of h_t
    dc: np.ndarray             # (B, H) upstream gradient of c_t


def make_case(batch: int, hidden: int, seed: int, masked: bool, scale: float = 1.0) -> StepCase:
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    active = rng.random(batch) < 0.6 if masked else None
    return StepCase(scale * normal(batch, 4 * hidden), normal(batch, hidden),
                    normal(batch, hidden), normal(4 * hidden, hidden) / np.sqrt(hidden),
                    scale * normal(4 * hidden), active, normal(batch, hidden),
                    normal(batch, hidden))


@st.composite
def cases(draw: st.DrawFn) -> StepCase:
    return make_case(draw(sizes(4)), draw(sizes(5)), draw(seeds), draw(st.booleans()))


BATCH_ONE_HIDDEN_ONE = make_case(1, 1, 0, masked=False)
ALL_INACTIVE = make_case(3, 2, 1, masked=True)._replace(active=np.zeros(3, bool))
ONE_INACTIVE = make_case(3, 4, 2, masked=True)._replace(active=np.array([True, False, True]))
SATURATED = make_case(2, 3, 3, masked=True, scale=5.0)._replace(active=np.array([True, False]))


def reference_step(case: StepCase):
    """((h, c), {xw, h_prev, c_prev, w_hh, b_hh} grads): the step of reference/lstm.py, masked
    and back-propagated as reference/recurrent.py's direction_forward/backward do."""
    (h, c), cache = ref.lstm_step_forward(case.xw, (case.h_prev, case.c_prev), case.w_hh,
                                          case.b_hh)
    m = np.ones(len(case.xw), bool) if case.active is None else case.active
    m = m[:, None]
    h, c = np.where(m, h, case.h_prev), np.where(m, c, case.c_prev)
    d_new = (np.where(m, case.dh, 0.0), np.where(m, case.dc, 0.0))
    dxw, dhh, (dh_prev, dc_prev) = ref.lstm_step_backward(d_new, cache, case.w_hh)
    grads = {"xw": dxw, "h_prev": dh_prev + np.where(m, 0.0, case.dh),
             "c_prev": dc_prev + np.where(m, 0.0, case.dc), "w_hh": dhh.T @ case.h_prev,
             "b_hh": dhh.sum(axis=0)}
    return (h, c), grads


def state_condition(case: StepCase) -> float:
    """κ of c_t and h_t: the norm of every term's magnitude in them (the gates' pre-activation
    terms through σ' and tanh' bounds) over the norm of the value (FLOAT32_STEP_CONDITION_LIMIT)."""
    sigmoid = lambda a: 1.0 / (1.0 + np.exp(-a))  # noqa: E731
    a = case.xw + case.h_prev @ case.w_hh.T + case.b_hh
    scale = np.abs(case.xw) + np.abs(case.h_prev) @ np.abs(case.w_hh).T + np.abs(case.b_hh)
    (ai, af, ag, ao), (si, sf, sg, so) = np.split(a, 4, axis=1), np.split(scale, 4, axis=1)
    i, f, g, o = sigmoid(ai), sigmoid(af), np.tanh(ag), sigmoid(ao)
    c = f * case.c_prev + i * g
    c_terms = (np.abs(f * case.c_prev) + np.abs(i * g) + np.abs(case.c_prev) * f * (1 - f) * sf
               + np.abs(g) * i * (1 - i) * si + np.abs(i) * (1 - g * g) * sg)
    h = o * np.tanh(c)
    h_terms = o * (1 - np.tanh(c) ** 2) * c_terms + np.abs(np.tanh(c)) * o * (1 - o) * so
    if case.active is not None:  # inactive rows carry their state exactly
        m = case.active[:, None]
        c, c_terms = np.where(m, c, case.c_prev), np.where(m, c_terms, np.abs(case.c_prev))
        h, h_terms = np.where(m, h, case.h_prev), np.where(m, h_terms, np.abs(case.h_prev))
    return max(np.linalg.norm(c_terms) / max(np.linalg.norm(c), 1e-300),
               np.linalg.norm(h_terms) / max(np.linalg.norm(h), 1e-300))


def kernel_step(case: StepCase, dtype: torch.dtype):
    """The same through the fused op, hh = h_{t-1} W_hh^T + b_hh in torch, autograd."""
    leaves = {name: to_torch(getattr(case, name), dtype).to(DEVICE).requires_grad_()
              for name in ("xw", "h_prev", "c_prev", "w_hh", "b_hh")}
    hh = leaves["h_prev"] @ leaves["w_hh"].t() + leaves["b_hh"]
    active = None if case.active is None else to_torch(case.active).to(DEVICE)
    h, c = lstm_step(leaves["xw"], hh, leaves["h_prev"], leaves["c_prev"], active)
    grads = torch.autograd.grad((h, c), list(leaves.values()),
                                (to_torch(case.dh, dtype).to(DEVICE),
                                 to_torch(case.dc, dtype).to(DEVICE)))
    return (h.detach(), c.detach()), dict(zip(leaves, grads))


def assert_matches_reference(path: str, case: StepCase, dtype: torch.dtype, budget) -> None:
    (h_ref, c_ref), grads_ref = reference_step(case)
    with kernel_path(path):
        (h, c), grads = kernel_step(case, dtype)
    assert h.dtype == c.dtype == dtype
    assert_close(h, h_ref, budget.forward, "h")
    assert_close(c, c_ref, budget.forward, "c")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], budget.gradient, f"d{name}")


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE_HIDDEN_ONE)
@example(case=ALL_INACTIVE)
@example(case=ONE_INACTIVE)
@example(case=SATURATED)
def test_lstm_step_kernel_float64_matches_reference(path: str, case: StepCase) -> None:
    assert_matches_reference(path, case, torch.float64, TORCH64_VS_REF64)


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE_HIDDEN_ONE)
@example(case=ONE_INACTIVE)
def test_lstm_step_kernel_float32_matches_reference_float64(path: str, case: StepCase) -> None:
    case = StepCase(*(a if a is None or a.dtype == bool else float32_exact(a) for a in case))
    assume(state_condition(case) <= FLOAT32_STEP_CONDITION_LIMIT)
    assert_matches_reference(path, case, torch.float32, TORCH32_VS_REF64)


def sample_inputs(masked: bool = True):
    generator = torch.Generator().manual_seed(0)
    normal = lambda *shape: torch.randn(*shape, dtype=torch.float64,  # noqa: E731
                                        generator=generator)
    active = torch.tensor([True, False, True]) if masked else None
    return normal(3, 8), normal(3, 8), normal(3, 2), normal(3, 2), active


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_lstm_step_ops_pass_opcheck(masked: bool) -> None:
    xw, hh, h_prev, c_prev, active = sample_inputs(masked)
    with kernel_path("torch"):
        torch.library.opcheck(torch.ops.seqtwin.lstm_step,
                              (xw.requires_grad_(), hh.requires_grad_(), h_prev.requires_grad_(),
                               c_prev.requires_grad_(), active))
        _, c, gates = torch.ops.seqtwin.lstm_step(xw.detach(), hh.detach(), h_prev.detach(),
                                                  c_prev.detach(), active)
        torch.library.opcheck(torch.ops.seqtwin.lstm_step_backward,
                              (torch.randn_like(c), torch.randn_like(c), gates, c_prev.detach(),
                               c, active))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula)
# without a C++ build; a graph break would make fullgraph=True raise.
def test_lstm_step_compiles_fullgraph_without_graph_breaks() -> None:
    def two_steps(xw, hh, h, c, active):
        h, c = lstm_step(xw, hh, h, c, active)
        h, c = lstm_step(xw, hh.tanh(), h, c, None)
        return (h * c).sum()

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
    for name, g, g_eager in zip(("xw", "hh", "h", "c"), grads, grads_eager):
        assert_close(g, g_eager, TORCH64_VS_REF64.gradient, f"d{name}")
