"""optim: SGD / Adam / AdamW and clip_grad_norm against torch.optim and torch.nn.utils in both
backends, cosine_schedule's properties, state_dict resumption, a tiny GPT trained in both
backends, and bad input."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference.optim as ref
import reference.transformer as ref_gpt
import torch_impl.optim as tim
import torch_impl.transformer as tim_gpt
from parity_tests.parity import assert_all_close, assert_close, to_numpy
from parity_tests.strategies import seeds, shapes, to_torch
from parity_tests.tolerances import TORCH64_VS_REF64

STEPS = 10


class OptimCase(NamedTuple):
    kind: str                       # "SGD", "Adam" or "AdamW"
    kwargs: dict[str, Any]          # constructor arguments, lr included
    params: dict[str, np.ndarray]   # initial values, float64
    grads: list[dict[str, np.ndarray]]  # one dict per step


@st.composite
def optim_cases(draw: st.DrawFn, kind: str | None = None) -> OptimCase:
    kind = kind or draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    kwargs: dict[str, Any] = dict(
        lr=draw(st.sampled_from([1e-3, 0.1]) | st.floats(1e-4, 1.0)),
        weight_decay=draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.5)))
    if kind == "SGD":
        momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99))
        nesterov = momentum > 0 and draw(st.booleans())
        kwargs.update(momentum=momentum, nesterov=nesterov,
                      dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.5])))
    else:
        kwargs.update(betas=(draw(st.sampled_from([0.9, 0.0]) | st.floats(0.0, 0.99)),
                             draw(st.sampled_from([0.999, 0.0]) | st.floats(0.0, 0.999))),
                      eps=draw(st.sampled_from([1e-8, 1e-3])))
    param_shapes = draw(st.lists(shapes(), min_size=1, max_size=3))
    rng = np.random.default_rng(draw(seeds))
    params = {f"p{i}": rng.standard_normal(s) for i, s in enumerate(param_shapes)}
    grads = [{k: rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(STEPS)]
    return OptimCase(kind, kwargs, params, grads)


SGD_NESTEROV = OptimCase("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
                         {"w": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": np.array([0.5])},
                         [{"w": np.full((2, 3), 0.1 * s) - 0.3, "b": np.array([1.0 - s])}
                          for s in range(STEPS)])
ADAM_DEFAULTS = SGD_NESTEROV._replace(kind="Adam", kwargs=dict(lr=1e-3))
ADAMW_DEFAULTS = SGD_NESTEROV._replace(kind="AdamW", kwargs=dict(lr=1e-3))


def run_torch_optim(case: OptimCase) -> dict[str, torch.Tensor]:
    """The oracle: torch.optim on leaf tensors whose .grad is set by hand."""
    params = {k: to_torch(p).requires_grad_() for k, p in case.params.items()}
    optimizer = getattr(torch.optim, case.kind)(list(params.values()), **case.kwargs)
    for grads in case.grads:
        for k, p in params.items():
            p.grad = to_torch(grads[k])
        optimizer.step()
    return params


def run_ours(module, case: OptimCase, convert, steps: range = range(STEPS),
             params: dict | None = None, optimizer=None):
    """Run ``module``'s optimizer over ``steps`` of the case's gradients.

    Returns (params, optimizer)."""
    if params is None:
        params = {k: convert(p) for k, p in case.params.items()}
    if optimizer is None:
        optimizer = getattr(module, case.kind)(params, **case.kwargs)
    for i in steps:
        optimizer.step({k: convert(g) for k, g in case.grads[i].items()})
    return params, optimizer


BACKENDS = [pytest.param((ref, np.array), id="reference"),
            pytest.param((tim, to_torch), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=optim_cases())
@example(case=SGD_NESTEROV)
@example(case=ADAM_DEFAULTS)
@example(case=ADAMW_DEFAULTS)
def test_optimizer_matches_torch_optim_over_ten_steps(backend, case: OptimCase) -> None:
    module, convert = backend
    expected = run_torch_optim(case)
    params, _ = run_ours(module, case, convert)
    assert_all_close(params, expected, TORCH64_VS_REF64.forward, f"{case.kind} ")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=optim_cases())
@example(case=SGD_NESTEROV)
@example(case=ADAMW_DEFAULTS)
def test_state_dict_round_trip_resumes_exactly(backend, case: OptimCase) -> None:
    module, convert = backend
    straight, _ = run_ours(module, case, convert)
    half = STEPS // 2
    params, first = run_ours(module, case, convert, range(half))
    saved = first.state_dict()
    params = {k: convert(to_numpy(p)) for k, p in params.items()}
    first.step({k: convert(g) for k, g in case.grads[half].items()})  # must not touch `saved`
    fresh = getattr(module, case.kind)(params, **case.kwargs)
    fresh.load_state_dict(saved)
    resumed, _ = run_ours(module, case, convert, range(half, STEPS), params, fresh)
    for k in straight:
        assert np.array_equal(np.asarray(resumed[k]), np.asarray(straight[k])), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_updates_parameters_in_place_including_nn_parameters(backend) -> None:
    module, convert = backend
    params = {"w": convert(np.ones((2, 2)))}
    if module is tim:
        params = dict(torch.nn.Linear(2, 2, bias=False, dtype=torch.float64).named_parameters())
        params = {"w": params["weight"]}
    before = params["w"]
    module.AdamW(params, lr=0.1).step({"w": convert(np.ones((2, 2)))})
    assert params["w"] is before
    if module is tim:
        assert before.requires_grad and before.grad is None


@st.composite
def clip_cases(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], float]:
    rng = np.random.default_rng(draw(seeds))
    grads = {f"g{i}": rng.standard_normal(s) * draw(st.sampled_from([0.01, 1.0, 10.0]))
             for i, s in enumerate(draw(st.lists(shapes(), min_size=1, max_size=3)))}
    return grads, draw(st.sampled_from([0.0, 1.0, 1e6]) | st.floats(0.0, 20.0))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=clip_cases())
def test_clip_grad_norm_matches_torch_nn_utils(backend, case) -> None:
    module, convert = backend
    grads, max_norm = case
    oracle = {k: to_torch(g).requires_grad_() for k, g in grads.items()}
    for k, p in oracle.items():
        p.grad = to_torch(grads[k])
    expected_norm = torch.nn.utils.clip_grad_norm_(list(oracle.values()), max_norm)
    ours = {k: convert(g) for k, g in grads.items()}
    norm = module.clip_grad_norm(ours, max_norm)
    assert_close(norm, expected_norm, TORCH64_VS_REF64.forward, "total_norm")
    assert_all_close(ours, {k: p.grad for k, p in oracle.items()}, TORCH64_VS_REF64.forward,
                     "clipped ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_leaves_small_gradients_unchanged(backend) -> None:
    module, convert = backend
    grads = {"a": convert(np.array([0.3, -0.4]))}
    norm = module.clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(0.5, rel=1e-15)
    assert np.array_equal(np.asarray(grads["a"]), [0.3, -0.4])


@st.composite
def schedules(draw: st.DrawFn) -> dict[str, Any]:
    warmup = draw(st.integers(0, 20))
    base_lr = draw(st.sampled_from([1e-3, 6e-4]) | st.floats(1e-6, 10.0))
    return dict(base_lr=base_lr, warmup_steps=warmup,
                total_steps=warmup + draw(st.integers(0, 100)),
                min_lr=base_lr * draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0)))


def lrs(module, schedule: dict[str, Any]) -> list[float]:
    return [module.cosine_schedule(step, **schedule)
            for step in range(schedule["total_steps"] + 3)]


@given(schedule=schedules())
@example(schedule=dict(base_lr=6e-4, warmup_steps=3, total_steps=20, min_lr=6e-5))
def test_cosine_schedule_warms_up_peaks_decays_and_rests_at_min_lr(schedule) -> None:
    base_lr, min_lr = schedule["base_lr"], schedule["min_lr"]
    warmup, total = schedule["warmup_steps"], schedule["total_steps"]
    values = lrs(ref, schedule)
    if warmup:
        assert 0 < values[0] <= base_lr
        assert all(0 < v <= base_lr for v in values[:warmup])
        assert values[warmup - 1] == base_lr
    if total > warmup:
        assert values[warmup] == base_lr
    after = values[max(warmup - 1, 0):]
    assert all(a >= b for a, b in zip(after, after[1:])), after
    assert values[total] == min_lr and values[-1] == min_lr
    assert all(v >= min_lr for v in values[warmup:])


@given(schedule=schedules())
def test_cosine_schedule_is_identical_in_both_backends(schedule) -> None:
    assert lrs(ref, schedule) == lrs(tim, schedule)


def test_training_a_tiny_gpt_with_adamw_clipping_and_cosine_matches_across_backends() -> None:
    config = dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    ref_model = ref_gpt.GPT(ref_gpt.GPTConfig(**config), seed=0)
    tim_model = tim_gpt.GPT(tim_gpt.GPTConfig(**config), dtype=torch.float64)
    tim_model.load_state_dict({k: to_torch(p) for k, p in ref_model.params.items()})
    ref_opt = ref.AdamW(ref_model.params, lr=0.0, weight_decay=0.1)
    tim_params = dict(tim_model.named_parameters())
    tim_opt = tim.AdamW(tim_params, lr=0.0, weight_decay=0.1)
    rng = np.random.default_rng(0)
    total = 20
    # This model's gradient norms run 0.5 to 1.0, so max_norm 1.0 would never clip: 0.6 clips on
    # about half of the steps and leaves the others alone, exercising both branches.
    max_norm = 0.6
    for step in range(total):
        ids = rng.integers(0, 11, size=(3, 8))
        targets = rng.integers(0, 11, size=(3, 8))
        ref_opt.lr = tim_opt.lr = ref.cosine_schedule(step, 1e-2, 3, total, 1e-3)

        ref_model.forward(ids, targets)
        ref_model.backward(1.0)
        ref_norm = ref.clip_grad_norm(ref_model.grads, max_norm)
        ref_opt.step(ref_model.grads)

        _, loss = tim_model(to_torch(ids), to_torch(targets))
        loss.backward()
        tim_grads = {n: p.grad for n, p in tim_params.items()}
        tim_norm = tim.clip_grad_norm(tim_grads, max_norm)
        tim_opt.step(tim_grads)
        tim_model.zero_grad(set_to_none=True)
        assert_close(tim_norm, ref_norm, TORCH64_VS_REF64.gradient, f"step {step} grad norm")
    assert_all_close(tim_params, ref_model.params, TORCH64_VS_REF64.gradient, "trained ")
    # The run must have moved the weights well past the budget, or the check proves nothing.
    initial = ref_gpt.GPT(ref_gpt.GPTConfig(**config), seed=0).params
    moved = max(np.linalg.norm(ref_model.params[k] - initial[k]) / np.linalg.norm(initial[k])
                for k in initial if np.linalg.norm(initial[k]) > 0)
    assert moved > 1e-3


# ---- bad input ---------------------------------------------------------------------------------

def _params(convert) -> dict:
    return {"w": convert(np.ones((2, 3)))}


BAD_CONSTRUCTORS = [
    ("SGD", dict(lr=-0.1), ValueError, "lr"),
    ("SGD", dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    ("SGD", dict(lr=0.1, momentum=-0.5), ValueError, "momentum"),
    ("SGD", dict(lr=0.1, weight_decay=float("nan")), ValueError, "weight_decay"),
    ("Adam", dict(lr=-1e-3), ValueError, "lr"),
    ("Adam", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("AdamW", dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("AdamW", dict(betas=0.9), TypeError, "betas"),
    ("Adam", dict(eps=0.0), ValueError, "eps"),
    ("AdamW", dict(weight_decay=-0.01), ValueError, "weight_decay"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, kwargs, error, match", BAD_CONSTRUCTORS)
def test_bad_hyperparameters_are_rejected_naming_the_argument(backend, kind, kwargs, error,
                                                              match) -> None:
    module, convert = backend
    with pytest.raises(error, match=match):
        getattr(module, kind)(_params(convert), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_setting_a_negative_lr_is_rejected(backend) -> None:
    module, convert = backend
    optimizer = module.Adam(_params(convert))
    with pytest.raises(ValueError, match="lr"):
        optimizer.lr = -1.0
    optimizer.lr = 0.5
    assert optimizer.lr == 0.5


BAD_GRADS = [
    ({}, ValueError, r"grads: missing keys \['w'\]"),
    ({"w": np.ones((2, 3)), "extra": np.ones(1)}, ValueError, r"grads: .*unexpected keys"),
    ({"w": np.ones((3, 2))}, ValueError, r"grads\['w'\]: expected shape \(2, 3\)"),
    ({"w": np.ones((2, 3), np.float32)}, TypeError, r"grads\['w'\]: expected dtype"),
    ({"w": np.array([[1.0, np.nan, 0.0], [0.0, 0.0, 0.0]])}, ValueError,
     r"grads\['w'\]: contains NaN"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("grads, error, match", BAD_GRADS)
def test_bad_grads_are_rejected_and_nothing_changes(backend, kind, grads, error, match) -> None:
    module, convert = backend
    params = _params(convert)
    optimizer = getattr(module, kind)(params, lr=0.1)
    with pytest.raises(error, match=match):
        optimizer.step({k: convert(g) for k, g in grads.items()})
    assert np.array_equal(np.asarray(params["w"]), np.ones((2, 3)))
    assert optimizer.state_dict()["step"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_clip_grad_norm_input_is_rejected(backend) -> None:
    module, convert = backend
    with pytest.raises(ValueError, match="max_norm"):
        module.clip_grad_norm({"w": convert(np.ones(2))}, -1.0)
    with pytest.raises(ValueError, match=r"grads\['w'\]: contains NaN or inf"):
        module.clip_grad_norm({"w": convert(np.array([1.0, np.inf]))}, 1.0)
    with pytest.raises(TypeError, match=r"grads\['b'\]: expected dtype"):
        module.clip_grad_norm({"w": convert(np.ones(2)),
                               "b": convert(np.ones(2, np.float32))}, 1.0)


BAD_SCHEDULES = [
    (dict(step=-1, base_lr=1.0, warmup_steps=2, total_steps=5), "step"),
    (dict(step=0, base_lr=-1.0, warmup_steps=2, total_steps=5), "base_lr"),
    (dict(step=0, base_lr=1.0, warmup_steps=6, total_steps=5), "total_steps"),
    (dict(step=0, base_lr=1.0, warmup_steps=-1, total_steps=5), "warmup_steps"),
    (dict(step=0, base_lr=1.0, warmup_steps=2, total_steps=5, min_lr=2.0), "min_lr"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, match", BAD_SCHEDULES)
def test_bad_schedule_arguments_are_rejected(backend, kwargs, match) -> None:
    module, _ = backend
    with pytest.raises(ValueError, match=match):
        module.cosine_schedule(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_rejects_misshapen_buffers(backend) -> None:
    module, convert = backend
    optimizer = module.Adam(_params(convert))
    state = {"step": 1, "exp_avg": {"w": convert(np.ones(3))},
             "exp_avg_sq": {"w": convert(np.ones((2, 3)))}}
    with pytest.raises(ValueError, match=r"state_dict\['exp_avg'\]\['w'\]: expected shape"):
        optimizer.load_state_dict(state)
