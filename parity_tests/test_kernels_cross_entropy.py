"""seqtwin::cross_entropy (torch_impl/kernels/cross_entropy.py): every kernel path (torch, the
native C++ kernels, Triton) against reference (float64, float32), loss and dlogits, every
reduction, ignore_index and label smoothing; the native kernels against F.cross_entropy, taken
under "auto", and within two (N, C) tensors of memory; opcheck; torch.compile(fullgraph=True)
on CPU.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1).
The native and Triton paths run with vocabulary chunks of 2 classes so that the online max/sum
crosses chunks.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from torch._C._profiler import _EventType

import reference.loss as ref
import torch_impl.kernels.cross_entropy as kce
import torch_impl.loss as tim
from parity_tests.kernel_paths import NATIVE_PATHS
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
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64, TORCHNN64_VS_OURS64
from torch_impl.kernels import kernel_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_CHUNK = 2  # classes per vocabulary chunk on the Triton and native paths


def device_for(path: str) -> str:
    """The native kernels take CPU tensors only; the other paths run on DEVICE."""
    return "cpu" if path == "native" else DEVICE


def run_kernel(case: Case, dtype: torch.dtype, device: str = DEVICE):
    """(loss, dlogits) of the fused op through autograd."""
    logits = to_torch(case.logits, dtype).to(device).requires_grad_()
    loss = kce.cross_entropy(logits, to_torch(case.targets).to(device), **case.kwargs())
    dloss = to_torch(np.asarray(case.dloss), dtype).to(device)
    (dlogits,) = torch.autograd.grad(loss, logits, dloss)
    return loss.detach(), dlogits


def assert_matches_reference(path: str, case: Case, dtype: torch.dtype, budget) -> None:
    loss_ref, cache = ref.cross_entropy_forward(case.logits, case.targets, **case.kwargs())
    dlogits_ref = ref.cross_entropy_backward(case.dloss, cache)
    with kernel_path(path), mock.patch.object(kce, "VOCAB_CHUNK", SMALL_CHUNK):
        loss, dlogits = run_kernel(case, dtype, device_for(path))
    assert loss.dtype == dlogits.dtype == dtype
    assert_close(loss, loss_ref, budget.forward, "loss")
    assert_close(dlogits, dlogits_ref, budget.gradient, "dlogits")


@pytest.mark.parametrize("path", NATIVE_PATHS)
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
@pytest.mark.parametrize("path", NATIVE_PATHS)
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


@pytest.mark.parametrize("path", NATIVE_PATHS)
def test_cross_entropy_kernel_mean_with_every_target_ignored_is_zero(path: str) -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, device=device_for(path), requires_grad=True)
    targets = torch.full((3,), -100, device=device_for(path))
    with kernel_path(path):
        loss = kce.cross_entropy(logits, targets)
        (dlogits,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and not dlogits.any()


# ------------------------------------------------------------------------ the native kernels

def nn_case(shape: tuple[int, ...], scale: float = 3.0, seed: int = 0, ignored: float = 0.3,
            ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) of ``shape`` (..., C), a fraction ``ignored`` of targets ignored."""
    rng = np.random.default_rng(seed)
    logits = float32_exact(scale * rng.standard_normal(shape))
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    return logits, np.where(rng.random(shape[:-1]) < ignored, ignore_index, targets)


def one_row_ignored() -> tuple[np.ndarray, np.ndarray]:
    logits, targets = nn_case((3, 4, 9), ignored=0.0)
    targets[1] = -100
    return logits, targets


LARGE_LOGITS = (np.array([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 5e3, 1e4 - 2.0],
                          [1e4, 1e4 - 2.0, -1e4, -1e4]]), np.array([1, 3, 0]))
# (logits, targets, ignore_index, vocabulary chunk or None for the default)
NN_CASES = {
    "small": (*nn_case((6, 11)), -100, None),
    "ignore_a_real_class": (*nn_case((7, 5), ignore_index=0), 0, None),
    "one_class": (*nn_case((4, 1), ignored=0.0), -100, None),
    "one_row": (*nn_case((1, 13), ignored=0.0), -100, None),
    "large_logits": (*LARGE_LOGITS, -100, None),
    "a_sequence_all_ignored": (*one_row_ignored(), -100, None),
    "every_target_ignored": (*nn_case((3, 6), ignored=1.0), -100, None),
    # vector loops, their tails and several chunks: 300 = 3 x 100, 100 = 6 x 16 + 4
    "chunks_of_100": (*nn_case((5, 300)), -100, 100),
    "default_chunks": (*nn_case((3, 5000)), -100, None),
}


# torch's mean over zero targets is nan: our documented deviation, tested separately
NN_PARAMS = [pytest.param(name, reduction, id=f"{name}-{reduction}") for name in NN_CASES
             for reduction in kce.REDUCTIONS
             if not (name == "every_target_ignored" and reduction == "mean")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize(("name", "reduction"), NN_PARAMS)
def test_native_cross_entropy_matches_torch_nn_functional(name: str, reduction: str,
                                                          label_smoothing: float,
                                                          dtype: torch.dtype) -> None:
    logits, targets, ignore_index, chunk = NN_CASES[name]
    kwargs = dict(reduction=reduction, ignore_index=ignore_index,
                  label_smoothing=label_smoothing)
    dloss = torch.from_numpy(np.random.default_rng(1).standard_normal(targets.shape))
    if reduction != "none":
        dloss = dloss[(0,) * targets.ndim]
    # the oracle: torch.nn in float64 on the same (float32-exact) values, classes on dim 1
    x = torch.from_numpy(logits).requires_grad_()
    C = logits.shape[-1]
    expected = F.cross_entropy(x.reshape(-1, C), torch.from_numpy(targets).reshape(-1), **kwargs)
    expected = expected.reshape(targets.shape) if reduction == "none" else expected
    (dexpected,) = torch.autograd.grad(expected, x, dloss)
    ours = x.detach().to(dtype).requires_grad_()
    with kernel_path("native"), mock.patch.object(kce, "VOCAB_CHUNK", chunk or kce.VOCAB_CHUNK):
        loss = kce.cross_entropy(ours, torch.from_numpy(targets), **kwargs)
        (dlogits,) = torch.autograd.grad(loss, ours, dloss.to(dtype))
    budget = TORCHNN64_VS_OURS64 if dtype == torch.float64 else TORCH32_VS_REF64
    assert loss.dtype == dlogits.dtype == dtype
    assert_close(loss, expected, budget.forward, "loss")
    assert_close(dlogits, dexpected, budget.gradient, "dlogits")


def counting_native_kernels(calls: list[str]):
    """kernels.native_kernels, with the module it returns counting its calls into ``calls``."""
    unpatched = kce.native_kernels

    def native_kernels(name: str, x: torch.Tensor):
        module = unpatched(name, x)
        if module is None:
            return None
        return SimpleNamespace(
            forward=lambda *args: calls.append("forward") or module.forward(*args),
            backward=lambda *args: calls.append("backward") or module.backward(*args))
    return native_kernels


@pytest.mark.parametrize("api", ["autograd", "explicit_cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_path_runs_the_native_kernels_on_cpu(dtype: torch.dtype, api: str) -> None:
    logits = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    targets = torch.tensor([[0, 4, -100], [1, 1, 2], [3, -100, 0], [2, 2, 2]])
    calls: list[str] = []
    with kernel_path("auto"), mock.patch.object(kce, "native_kernels",
                                                counting_native_kernels(calls)):
        if api == "autograd":
            torch.autograd.grad(tim.cross_entropy(logits, targets, label_smoothing=0.1), logits)
        else:
            _, cache = tim.cross_entropy_forward(logits.detach(), targets, label_smoothing=0.1)
            tim.cross_entropy_backward(1.0, cache)
    assert calls == ["forward", "backward"], f"the native kernels ran {calls} under 'auto'"


def seqtwin_ops_dispatched(fn) -> list[str]:
    """The seqtwin:: ops the dispatcher ran during ``fn()``, as torch.profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({event.name for event in prof.events() if event.name.startswith("seqtwin::")})


def run_api(api: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """One forward (and backward, except "no_grad") through the public API ``api``."""
    if api == "autograd":
        torch.autograd.grad(tim.cross_entropy(logits, targets, label_smoothing=0.1), logits)
    elif api == "no_grad":
        with torch.no_grad():
            tim.cross_entropy(logits, targets, label_smoothing=0.1)
    else:
        _, cache = tim.cross_entropy_forward(logits.detach(), targets, label_smoothing=0.1)
        tim.cross_entropy_backward(1.0, cache)


@pytest.mark.parametrize("api", ["autograd", "no_grad", "explicit_cache"])
def test_auto_path_in_eager_code_runs_the_native_kernels_without_the_custom_ops(api: str
                                                                                ) -> None:
    # the ops' Python dispatch costs more than the kernels at small N; compiled graphs still
    # hold the ops (test_compile)
    logits = torch.randn(4, 3, 5, requires_grad=True)
    targets = torch.tensor([[0, 4, -100], [1, 1, 2], [3, -100, 0], [2, 2, 2]])
    calls: list[str] = []
    with kernel_path("auto"), mock.patch.object(kce, "native_kernels",
                                                counting_native_kernels(calls)):
        ops = seqtwin_ops_dispatched(lambda: run_api(api, logits, targets))
    assert calls == (["forward"] if api == "no_grad" else ["forward", "backward"]), calls
    assert ops == [], f"eager code dispatched {ops}"


def test_torch_path_dispatches_the_custom_ops_the_profiler_sees() -> None:
    # the converse of the test above, so that its empty list is not the profiler's blindness
    logits = torch.randn(4, 5, requires_grad=True)
    with kernel_path("torch"):
        ops = seqtwin_ops_dispatched(lambda: run_api("autograd", logits, torch.arange(4)))
    assert ops == ["seqtwin::cross_entropy", "seqtwin::cross_entropy_backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", kce.REDUCTIONS)
@pytest.mark.parametrize("ignored", [0.0, 0.3, 1.0])
def test_eager_native_path_equals_the_custom_op_bit_for_bit(reduction: str, ignored: float,
                                                              dtype: torch.dtype) -> None:
    logits, targets = (torch.from_numpy(a) for a in nn_case((5, 7, 33), ignored=ignored))
    dloss = torch.randn(targets.shape if reduction == "none" else (), dtype=dtype)
    x = logits.to(dtype).requires_grad_()
    with kernel_path("native"):
        fast = kce.cross_entropy(x, targets, reduction, label_smoothing=0.1)
        (dfast,) = torch.autograd.grad(fast, x, dloss)
        # the op under autograd, reduced as compiled code reduces it (count on the device)
        rows, _, _ = kce.cross_entropy_op(x.flatten(0, 1), targets.flatten(), -100, 0.1)
        count = (targets != -100).sum()
        op = kce.reduce_losses(rows.view_as(targets), count, reduction)
        (dop,) = torch.autograd.grad(op, x, dloss)
    assert torch.equal(fast, op) and torch.equal(dfast, dop)


def test_eager_native_path_refuses_a_second_backward() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    dloss = torch.tensor(1.0, requires_grad=True)  # so that dlogits could depend on it
    with kernel_path("native"):
        (dlogits,) = torch.autograd.grad(kce.cross_entropy(logits, torch.arange(4)), logits,
                                         dloss, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dlogits.sum().backward()


def peak_allocated_bytes(fn) -> int:
    """The most bytes the CPU allocator held during ``fn()`` beyond what it held before:
    every allocation and free, the C++ kernels' own included, as torch.profiler sees them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))  # < 0: a free
        stack.extend(event.children)
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("api", ["autograd", "explicit_cache"])
def test_native_forward_and_backward_hold_at_most_two_logits_sized_tensors(api: str) -> None:
    # F.cross_entropy holds three: log-softmax, nll's one-hot gradient, dlogits
    logits = torch.randn(256, 2048, requires_grad=True)
    targets = torch.randint(0, 2048, (256,))
    targets[::5] = -100

    def forward_backward():
        if api == "autograd":
            return torch.autograd.grad(tim.cross_entropy(logits, targets, "sum", -100, 0.1),
                                       logits)
        _, cache = tim.cross_entropy_forward(logits.detach(), targets, "sum", -100, 0.1)
        return tim.cross_entropy_backward(1.0, cache)

    with kernel_path("native"):
        forward_backward()  # builds or loads the kernels outside the measurement
        peak = peak_allocated_bytes(forward_backward)
    # dlogits must be seen, else the measurement saw nothing
    assert logits.nbytes <= peak < 2 * logits.nbytes, \
        f"peak {peak / logits.nbytes:.2f} (N, C) tensors"


def sample_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    targets = torch.tensor([0, 6, -100, 3, 1])
    return logits, targets


@pytest.mark.parametrize("path", ["torch", "native"])
def test_cross_entropy_ops_pass_opcheck(path: str) -> None:
    logits, targets = sample_inputs()
    with kernel_path(path):
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
