"""cross_entropy: reference vs finite differences, torch_impl vs reference, reference vs
F.cross_entropy (reduction, ignore_index, label_smoothing)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.loss as ref
import torch_impl.loss as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import float32_exact, normal_arrays, seeds, sizes, to_torch
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck


class Case(NamedTuple):
    logits: np.ndarray          # (N, C) or (B, T, C)
    targets: np.ndarray         # (N,) or (B, T)
    reduction: str
    ignore_index: int
    label_smoothing: float
    dloss: np.ndarray | float   # scalar for mean/sum, shaped like targets for none

    def kwargs(self) -> dict:
        return dict(reduction=self.reduction, ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing)


@st.composite
def cases(draw: st.DrawFn, scale: float = 3.0) -> Case:
    leading = draw(st.one_of(st.tuples(sizes(5)), st.tuples(sizes(3), sizes(3))))
    num_classes = draw(sizes(5))
    rng = np.random.default_rng(draw(seeds))
    targets = rng.integers(0, num_classes, size=leading)
    # ignore_index is either torch's default or a real class (e.g. a padding token id).
    ignore_index = draw(st.sampled_from([-100, 0]))
    ignored_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets = np.where(rng.random(leading) < ignored_fraction, ignore_index, targets)
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    label_smoothing = draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
    dloss = draw(normal_arrays(leading)) if reduction == "none" else float(rng.standard_normal())
    return Case(draw(normal_arrays(leading + (num_classes,), scale)), targets, reduction,
                ignore_index, label_smoothing, dloss)


BATCH_ONE = Case(np.array([[0.3, -1.2, 2.0]]), np.array([1]), "mean", -100, 0.0, 1.0)
SINGLE_CLASS = Case(np.array([[[0.5], [-2.0]], [[3.0], [0.0]]]), np.zeros((2, 2), np.int64), "sum",
                    -100, 0.2, -1.5)
LARGE_NONE = Case(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [1e4, 1e4 - 2.0, -1e4]]),
                  np.array([1, 2, 0]), "none", -100, 0.1, np.array([1.0, -0.5, 2.0]))
LARGE_MEAN = Case(np.array([[[-1e4, 1e4], [1e4, 9999.0]], [[0.0, -1e4], [1e4, -1e4]]]),
                  np.array([[0, 1], [0, -100]]), "mean", -100, 0.0, 0.7)
ALL_IGNORED_MEAN = Case(np.array([[1.0, 2.0], [0.5, -0.5]]), np.array([-100, -100]), "mean", -100,
                        0.3, 1.0)
ALL_IGNORED_SUM = ALL_IGNORED_MEAN._replace(reduction="sum")
IGNORE_A_CLASS = Case(np.array([[0.2, 0.1, -0.4], [1.0, -1.0, 0.5], [0.0, 0.3, 0.9]]),
                      np.array([0, 2, 0]), "mean", 0, 0.25, 2.0)


def loss_and_grad(module, case: Case, convert=lambda a: a):
    """(loss, dlogits) from ``module``'s forward/backward pair."""
    loss, cache = module.cross_entropy_forward(convert(case.logits), convert(case.targets),
                                               **case.kwargs())
    dloss = convert(case.dloss) if isinstance(case.dloss, np.ndarray) else case.dloss
    return loss, module.cross_entropy_backward(dloss, cache)


# Logits of scale 1: a margin of ~10 makes the gradient ~1e-5 while the loss still rounds at
# 1e-16, which central differences cannot resolve to 1e-6 (the analytic side is fine).
@given(case=cases(scale=1.0))
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=ALL_IGNORED_MEAN)
@example(case=IGNORE_A_CLASS)
def test_reference_backward_matches_finite_differences(case: Case) -> None:
    _, dlogits = loss_and_grad(ref, case)
    gradcheck(lambda logits: ref.cross_entropy_forward(logits, case.targets, **case.kwargs())[0],
              {"logits": case.logits}, case.dloss, {"logits": dlogits}, tol=REF_VS_FINITE_DIFF)


@pytest.mark.parametrize("case", [LARGE_NONE, LARGE_MEAN], ids=["none", "mean"])
def test_reference_backward_matches_finite_differences_at_logits_1e4(case: Case) -> None:
    # At |x| = 1e4 one rounding of the loss is ~2e-12, which eps = 1e-6 would turn into a 2e-6
    # gradient error; eps = 1e-4 keeps both rounding and truncation error near 1e-8.
    _, dlogits = loss_and_grad(ref, case)
    gradcheck(lambda logits: ref.cross_entropy_forward(logits, case.targets, **case.kwargs())[0],
              {"logits": case.logits}, case.dloss, {"logits": dlogits}, eps=1e-4,
              tol=REF_VS_FINITE_DIFF)


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=LARGE_NONE)
@example(case=LARGE_MEAN)
@example(case=ALL_IGNORED_MEAN)
@example(case=IGNORE_A_CLASS)
def test_torch_impl_float64_matches_reference(case: Case) -> None:
    loss_ref, dlogits_ref = loss_and_grad(ref, case)
    loss, dlogits = loss_and_grad(tim, case, to_torch)
    assert loss.dtype == dlogits.dtype == torch.float64
    assert_close(loss, loss_ref, TORCH64_VS_REF64.forward, "loss")
    assert_close(dlogits, dlogits_ref, TORCH64_VS_REF64.gradient, "dlogits")


# float32 resolves log z only to ~6e-8, so a loss far below that (a very confident, correct
# prediction) has no accurate float32 value at all; logits of scale 0.5 keep every loss well
# above it. Large logits are covered by the examples, whose losses are large or exactly 0.
@given(case=cases(scale=0.5))
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=LARGE_NONE)
@example(case=LARGE_MEAN)
def test_torch_impl_float32_matches_reference_float64(case: Case) -> None:
    dloss = float32_exact(np.asarray(case.dloss))
    case = case._replace(logits=float32_exact(case.logits),
                         dloss=dloss if case.reduction == "none" else float(dloss))
    loss_ref, dlogits_ref = loss_and_grad(ref, case)
    loss, dlogits = loss_and_grad(tim, case, lambda a: to_torch(a, torch.float32))
    assert loss.dtype == dlogits.dtype == torch.float32
    assert_close(loss, loss_ref, TORCH32_VS_REF64.forward, "loss")
    assert_close(dlogits, dlogits_ref, TORCH32_VS_REF64.gradient, "dlogits")


@given(case=cases())
@example(case=BATCH_ONE)
@example(case=SINGLE_CLASS)
@example(case=LARGE_NONE)
@example(case=LARGE_MEAN)
@example(case=ALL_IGNORED_SUM)
@example(case=IGNORE_A_CLASS)
def test_reference_matches_torch_nn_functional_cross_entropy(case: Case) -> None:
    # torch's mean over zero targets is nan: our documented deviation, tested separately.
    assume(not (case.reduction == "mean" and np.all(case.targets == case.ignore_index)))
    loss_ref, dlogits_ref = loss_and_grad(ref, case)
    num_classes = case.logits.shape[-1]
    logits = to_torch(case.logits).requires_grad_()
    # torch.nn puts classes on dim 1; ours are last, so flatten to (N, C) for the oracle.
    loss = F.cross_entropy(logits.reshape(-1, num_classes), to_torch(case.targets).reshape(-1),
                           **case.kwargs())
    if case.reduction == "none":
        loss = loss.reshape(case.targets.shape)
    (dlogits,) = torch.autograd.grad(loss, logits, to_torch(np.asarray(case.dloss)))
    assert_close(loss_ref, loss, TORCHNN64_VS_OURS64.forward, "loss")
    assert_close(dlogits_ref, dlogits, TORCHNN64_VS_OURS64.gradient, "dlogits")


MODULES = [pytest.param((ref, lambda a: a), id="reference"),
           pytest.param((tim, to_torch), id="torch_impl")]


@pytest.mark.parametrize("backend", MODULES)
def test_all_ignored_mean_gives_zero_loss_and_zero_gradient(backend) -> None:
    module, convert = backend
    loss, dlogits = loss_and_grad(module, ALL_IGNORED_MEAN, convert)
    assert float(loss) == 0.0
    assert tuple(dlogits.shape) == ALL_IGNORED_MEAN.logits.shape
    assert not np.asarray(dlogits).any()


@pytest.mark.parametrize("backend", MODULES)
def test_reduction_none_is_zero_exactly_at_ignored_positions(backend) -> None:
    module, convert = backend
    case = IGNORE_A_CLASS._replace(reduction="none", dloss=np.ones(3))
    loss, dlogits = loss_and_grad(module, case, convert)
    ignored = case.targets == case.ignore_index
    assert np.all(np.asarray(loss)[ignored] == 0.0) and np.all(np.asarray(loss)[~ignored] > 0.0)
    assert not np.asarray(dlogits)[ignored].any() and np.asarray(dlogits)[~ignored].any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reference_is_finite_and_warning_free_at_logits_1e4(reduction: str, dtype) -> None:
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    targets = np.array([1, 0, 2])
    dloss = np.ones(3, dtype) if reduction == "none" else 1.0
    # Underflow to 0 is the intended result of e^{-2e4}; overflow, 0/0 and log(0) are not.
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, cache = ref.cross_entropy_forward(logits, targets, reduction, label_smoothing=0.1)
        dlogits = ref.cross_entropy_backward(dloss, cache)
    assert loss.dtype == dlogits.dtype == dtype
    assert np.all(np.isfinite(dlogits))
    # By hand: 0.9 nll + 0.1 (log z + m - mean_c x_c) per row.
    per_target = np.array([0.9 * 2e4 + 0.1 * 1e4, np.log(3.0),
                           0.9 * (2e4 + np.log(2.0)) + 0.1 * (1e4 + np.log(2.0) - 1e4 / 3)])
    expected = {"none": per_target, "sum": per_target.sum(), "mean": per_target.mean()}[reduction]
    budget = 1e-12 if dtype == np.float64 else 1e-6  # float32: a few ulps (6e-8) of each loss
    assert_close(loss, expected, budget, "loss")


@pytest.mark.parametrize("backend", MODULES)
@pytest.mark.parametrize("logits, targets, kwargs, error, pattern", [
    (np.ones((3, 4)), np.zeros(2, np.int64), {}, ValueError, r"^targets: expected shape \(3,\)"),
    (np.ones((2, 3, 4)), np.zeros((2, 2), np.int64), {}, ValueError,
     r"^targets: expected shape \(2, 3\) .*got \(2, 2\)"),
    (np.ones((3, 4)), np.array([0, 4, 1]), {}, ValueError,
     r"^targets: values must be in 0\.\.3 .*ignore_index = -100, got 4"),
    (np.ones((3, 4)), np.array([0, -1, 1]), {}, ValueError, r"^targets: values must be in 0\.\.3"),
    (np.ones((3, 4)), np.zeros(3), {}, TypeError, r"^targets: expected an integer dtype"),
    (np.ones(4), np.zeros((), np.int64), {}, ValueError,
     r"^logits: expected shape \(N, C\) or \(B, T, C\)"),
    (np.array([[0.0, np.nan]]), np.zeros(1, np.int64), {}, ValueError,
     r"^logits: contains NaN or inf"),
    (np.array([[0.0, -np.inf]]), np.zeros(1, np.int64), {}, ValueError,
     r"^logits: contains NaN or inf"),
    (np.ones((3, 4), np.int64), np.zeros(3, np.int64), {}, TypeError, r"^logits: expected"),
    (np.ones((3, 4)), np.zeros(3, np.int64), {"reduction": "avg"}, ValueError,
     r"^reduction: expected one of 'mean', 'sum', 'none', got 'avg'"),
    (np.ones((3, 4)), np.zeros(3, np.int64), {"label_smoothing": 1.5}, ValueError,
     r"^label_smoothing: expected a probability in \[0, 1\], got 1\.5"),
    (np.ones((3, 4)), np.zeros(3, np.int64), {"label_smoothing": -0.1}, ValueError,
     r"^label_smoothing: expected a probability"),
    (np.ones((3, 4)), np.zeros(3, np.int64), {"ignore_index": 1.0}, TypeError,
     r"^ignore_index: expected an int"),
], ids=["targets-N", "targets-BT", "target-too-large", "target-negative", "float-targets",
        "1d-logits", "nan-logits", "inf-logits", "int-logits", "bad-reduction",
        "smoothing-above-1", "smoothing-below-0", "float-ignore-index"])
def test_forward_rejects_bad_input_naming_the_argument(backend, logits, targets, kwargs, error,
                                                       pattern) -> None:
    module, convert = backend
    with pytest.raises(error, match=pattern):
        module.cross_entropy_forward(convert(logits), convert(targets), **kwargs)


@pytest.mark.parametrize("backend", MODULES)
@pytest.mark.parametrize("reduction, dloss_shape, pattern", [
    ("none", (2,), r"^dloss: expected shape \(3,\), got \(2,\)"),
    ("mean", (3,), r"^dloss: expected shape \(\), got \(3,\)"),
])
def test_backward_rejects_misshapen_dloss_naming_it(backend, reduction, dloss_shape,
                                                    pattern) -> None:
    module, convert = backend
    _, cache = module.cross_entropy_forward(convert(np.ones((3, 4))),
                                            convert(np.zeros(3, np.int64)), reduction)
    with pytest.raises(ValueError, match=pattern):
        module.cross_entropy_backward(convert(np.ones(dloss_shape)), cache)


def test_reference_rejects_float16_logits_naming_them() -> None:
    with pytest.raises(TypeError, match=r"^logits: expected dtype float32 or float64, got float16"):
        ref.cross_entropy_forward(np.ones((2, 3), np.float16), np.zeros(2, np.int64))
