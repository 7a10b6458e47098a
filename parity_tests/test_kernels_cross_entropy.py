"""seqtwin::cross_entropy (torch_impl/kernels/cross_entropy.py): every kernel path against
reference (float64, float32), loss and dlogits, every reduction, ignore_index and label
smoothing; opcheck; torch.compile(fullgraph=True) on CPU.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1),
with vocabulary chunks of 2 classes so that the online max/sum crosses chunks.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given

import reference.loss as ref
import torch_impl.kernels.cross_entropy as kce
from parity_tests.kernel_paths import PATHS
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, to_torch
from parity_tests.test_loss import (
    ALL_IGNORED_MEAN,
    ALL_IGNORED_SUM,
    BATCH_ONE,
    IGNORE_A_CLASS,
    LARGE_MEAN,
    LARGE_NONE,
    SINGLE_CLASS,
    Case,
    cases,
)
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64
from torch_impl.kernels import kernel_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_CHUNK = 2  # classes per vocabulary chunk on the Triton path


def run_kernel(case: Case, dtype: torch.dtype):
    """(loss, dlogits) of the fused op through autograd."""
    logits = to_torch(case.logits, dtype).to(DEVICE).requires_grad_()
    loss = kce.cross_entropy(logits, to_torch(case.targets).to(DEVICE), **case.kwargs())
    dloss = to_torch(np.asarray(case.dloss), dtype).to(DEVICE)
    (dlogits,) = torch.autograd.grad(loss, logits, dloss)
    return loss.detach(), dlogits


def assert_matches_reference(path: str, case: Case, dtype: torch.dtype, budget) -> None:
    loss_ref, cache = ref.cross_entropy_forward(case.logits, case.targets, **case.kwargs())
    dlogits_ref = ref.cross_entropy_backward(case.dloss, cache)
    with kernel_path(path), mock.patch.object(kce, "VOCAB_CHUNK", SMALL_CHUNK):
        loss, dlogits = run_kernel(case, dtype)
    assert loss.dtype == dlogits.dtype == dtype
    assert_close(loss, loss_ref, budget.forward, "loss")
    assert_close(dlogits, dlogits_ref, budget.gradient, "dlogits")


@pytest.mark.parametrize("path", PATHS)
@given(case=cases())
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=LARGE_NONE)
@example(case=LARGE_MEAN)
@example(case=ALL_IGNORED_MEAN)
@example(case=ALL_IGNORED_SUM)
@example(case=IGNORE_A_CLASS)
def test_cross_entropy_kernel_float64_matches_reference(path: str, case: Case) -> None:
    assert_matches_reference(path, case, torch.float64, TORCH64_VS_REF64)


# Logits of scale 0.5: see test_loss's float32 test (a tiny loss has no accurate float32 value).
@pytest.mark.parametrize("path", PATHS)
@given(case=cases(scale=0.5))
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=LARGE_NONE)
@example(case=LARGE_MEAN)
def test_cross_entropy_kernel_float32_matches_reference_float64(path: str, case: Case) -> None:
    dloss = float32_exact(np.asarray(case.dloss))
    case = case._replace(logits=float32_exact(case.logits),
                         dloss=dloss if case.reduction == "none" else float(dloss))
    assert_matches_reference(path, case, torch.float32, TORCH32_VS_REF64)


@pytest.mark.parametrize("path", PATHS)
def test_cross_entropy_kernel_mean_with_every_target_ignored_is_zero(path: str) -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.full((3,), -100, device=DEVICE)
    with kernel_path(path):
        loss = kce.cross_entropy(logits, targets)
        (dlogits,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and not dlogits.any()


def sample_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    targets = torch.tensor([0, 6, -100, 3, 1])
    return logits, targets


def test_cross_entropy_ops_pass_opcheck() -> None:
    logits, targets = sample_inputs()
    with kernel_path("torch"):
        torch.library.opcheck(torch.ops.seqtwin.cross_entropy,
                              (logits.requires_grad_(), targets, -100, 0.1))
        _, m, log_z = torch.ops.seqtwin.cross_entropy(logits.detach(), targets, -100, 0.1)
        torch.library.opcheck(torch.ops.seqtwin.cross_entropy_backward,
                              (torch.randn(5, dtype=torch.float64), logits.detach(), targets,
                               m, log_z, -100, 0.1))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula)
# without a C++ build; a graph break would make fullgraph=True raise.
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_compiles_fullgraph_without_graph_breaks(reduction: str) -> None:
    def loss(logits, targets):
        return kce.cross_entropy(2.0 * logits, targets, reduction, label_smoothing=0.1).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    logits, targets = sample_inputs()
    logits.requires_grad_()
    with kernel_path("torch"):
        value = compiled(logits, targets)
        (grad,) = torch.autograd.grad(value, logits)
        value_eager = loss(logits, targets)
        (grad_eager,) = torch.autograd.grad(value_eager, logits)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_close(value, value_eager, TORCH64_VS_REF64.forward, "loss")
    assert_close(grad, grad_eager, TORCH64_VS_REF64.gradient, "dlogits")
