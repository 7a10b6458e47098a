"""Parity properties of the recurrent language model: reference/language_model.py and
torch_impl/language_model.py.

Gradients are those of L = dloss · loss + <logits, dlogits> + <state_n, dstate> for every
parameter tensor and the initial state, with targets partly ignored and unequal lengths.
Every property runs for every cell kind ("rnn_tanh", "rnn_relu", "lstm", "gru").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference.language_model as ref
import torch_impl.language_model as tim
from reference.gradcheck import numerical_gradients

from .parity import assert_all_close, assert_close, relative_error
from .strategies import float32_exact, seeds, to_torch
from .tolerances import FLOAT64_REORDERED, REF_VS_FINITE_DIFF, TORCH32_VS_REF64, TORCH64_VS_REF64

CELLS = ref.CELLS


class LMCase(NamedTuple):
    cell: str
    vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    steps: int
    padded: bool        # unequal lengths
    given_state: bool   # a random initial state instead of zeros
    dropout: float
    ignore_index: int
    seed: int


@st.composite
def lm_cases(draw: st.DrawFn, cell: str, max_side: int = 4) -> LMCase:
    side = st.integers(1, max_side)
    return LMCase(cell=cell, vocab=draw(st.integers(2, 6)), embed=draw(side),
                  hidden=draw(side), layers=draw(st.integers(1, 2)), batch=draw(side),
                  steps=draw(side), padded=draw(st.booleans()), given_state=draw(st.booleans()),
                  dropout=draw(st.sampled_from([0.0, 0.3])),
                  ignore_index=draw(st.sampled_from([-100, 0])), seed=draw(seeds))


class LMInputs(NamedTuple):
    case: LMCase
    params: dict
    ids: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray | None
    state: tuple | None
    masks: dict | None
    dlogits: np.ndarray
    dloss: float
    dstate: tuple


def make_inputs(case: LMCase) -> LMInputs:
    rng = np.random.default_rng(case.seed)
    model = ref.RNNLM(case.vocab, case.embed, case.hidden, case.layers, case.cell,
                      seed=case.seed)
    B, T, H, L = case.batch, case.steps, case.hidden, case.layers
    ids = rng.integers(0, case.vocab, (B, T))
    targets = rng.integers(0, case.vocab, (B, T))
    targets[rng.random((B, T)) < 0.3] = case.ignore_index  # ignore_index 0 also hits real ids
    lengths = rng.integers(1, T + 1, B) if case.padded else None
    k = ref.num_states(case.cell)
    state = tuple(rng.standard_normal((L, B, H)) * 0.5 for _ in range(k)) \
        if case.given_state else None
    masks = None
    if case.dropout > 0:
        masks = {"embedding": rng.random((B, T, case.embed)) >= case.dropout,
                 "rnn": [rng.random((B, T, H)) >= case.dropout for _ in range(L - 1)],
                 "output": rng.random((B, T, H)) >= case.dropout}
    return LMInputs(case, model.params, ids, targets, lengths, state, masks,
                    rng.standard_normal((B, T, case.vocab)), float(rng.uniform(0.5, 2.0)),
                    tuple(rng.standard_normal((L, B, H)) for _ in range(k)))


class LMRun(NamedTuple):
    logits: object
    loss: object
    state: tuple
    grads: dict       # parameter gradients, plus "state[i]" for the initial state


def run_reference(inputs: LMInputs) -> LMRun:
    c = inputs.case
    (logits, loss, state), cache = ref.rnn_lm_forward(
        inputs.ids, inputs.params, c.cell, inputs.state, inputs.lengths, inputs.targets,
        c.ignore_index, c.dropout, inputs.masks)
    dparams, dstate0 = ref.rnn_lm_backward(cache, inputs.dlogits, inputs.dloss, inputs.dstate)
    dparams.update({f"state[{i}]": d for i, d in enumerate(dstate0)})
    return LMRun(logits, loss, state, dparams)


def _torch(inputs: LMInputs, dtype: torch.dtype) -> dict:
    def t(a):
        return None if a is None else to_torch(a, dtype)
    masks = inputs.masks
    return dict(params={k: t(v) for k, v in inputs.params.items()}, ids=t(inputs.ids),
                targets=t(inputs.targets), lengths=t(inputs.lengths),
                state=None if inputs.state is None else tuple(t(s) for s in inputs.state),
                masks=None if masks is None else {"embedding": t(masks["embedding"]),
                                                  "rnn": [t(m) for m in masks["rnn"]],
                                                  "output": t(masks["output"])},
                dlogits=t(inputs.dlogits), dstate=tuple(t(s) for s in inputs.dstate))


def run_torch_functional(inputs: LMInputs, dtype: torch.dtype) -> LMRun:
    c, a = inputs.case, _torch(inputs, dtype)
    (logits, loss, state), cache = tim.rnn_lm_forward(
        a["ids"], a["params"], c.cell, a["state"], a["lengths"], a["targets"], c.ignore_index,
        c.dropout, a["masks"])
    dparams, dstate0 = tim.rnn_lm_backward(cache, a["dlogits"], inputs.dloss, a["dstate"])
    dparams.update({f"state[{i}]": d for i, d in enumerate(dstate0)})
    return LMRun(logits, loss, state, dparams)


def run_torch_module(inputs: LMInputs, dtype: torch.dtype) -> LMRun:
    c, a = inputs.case, _torch(inputs, dtype)
    model = tim.RNNLM(c.vocab, c.embed, c.hidden, c.layers, c.cell, c.dropout, dtype=dtype)
    model.load_state_dict(a["params"])
    state = a["state"] if a["state"] is not None else model.init_state(c.batch)
    state = tuple(s.clone().requires_grad_() for s in state)
    logits, loss, state_n = model(a["ids"], a["targets"], state, a["lengths"], c.ignore_index,
                                  a["masks"])
    outputs = [loss, logits, *state_n]
    upstream = [torch.tensor(inputs.dloss, dtype=dtype), a["dlogits"], *a["dstate"]]
    torch.autograd.backward(outputs, upstream)
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads.update({f"state[{i}]": s.grad for i, s in enumerate(state)})
    return LMRun(logits.detach(), loss.detach(), tuple(s.detach() for s in state_n), grads)


def assert_runs_close(actual: LMRun, expected: LMRun, budget) -> None:
    assert_close(actual.logits, expected.logits, budget.forward, "logits")
    assert_close(actual.loss, expected.loss, budget.forward, "loss")
    for i, (a, e) in enumerate(zip(actual.state, expected.state, strict=True)):
        assert_close(a, e, budget.forward, f"state_n[{i}]")
    assert_all_close(actual.grads, expected.grads, budget.gradient, "d")


def float32_inputs(inputs: LMInputs) -> LMInputs:
    """Inputs rounded to float32 (held in float64) so that only the arithmetic differs."""
    def r(a):
        return None if a is None else float32_exact(a)
    return inputs._replace(params={k: r(v) for k, v in inputs.params.items()},
                           state=None if inputs.state is None else tuple(map(r, inputs.state)),
                           dlogits=r(inputs.dlogits), dstate=tuple(map(r, inputs.dstate)),
                           dloss=float(np.float32(inputs.dloss)))


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_reference_backward_matches_finite_differences(cell: str, data: st.DataObject) -> None:
    # Central differences on 2 sampled elements of every parameter tensor and initial state.
    inputs = make_inputs(data.draw(lm_cases(cell, max_side=3)))
    c = inputs.case
    run = run_reference(inputs)
    rng = np.random.default_rng(c.seed)
    state0 = inputs.state or tuple(np.zeros_like(d) for d in inputs.dstate)
    full = dict(inputs.params, **{f"state[{i}]": s for i, s in enumerate(state0)})
    picks = {name: rng.choice(p.size, size=min(2, p.size), replace=False)
             for name, p in full.items()}

    def model(**sampled: np.ndarray) -> tuple:
        values = {name: p.copy() for name, p in full.items()}
        for name, v in sampled.items():
            values[name].flat[picks[name]] = v
        params = {k: v for k, v in values.items() if not k.startswith("state")}
        state = tuple(values[f"state[{i}]"] for i in range(len(state0)))
        (logits, loss, state_n), _ = ref.rnn_lm_forward(
            inputs.ids, params, c.cell, state, inputs.lengths, inputs.targets, c.ignore_index,
            c.dropout, inputs.masks)
        return logits, loss, state_n

    wrt = {name: p.flat[picks[name]] for name, p in full.items()}
    numeric = numerical_gradients(model, wrt, (inputs.dlogits, np.asarray(inputs.dloss),
                                               inputs.dstate))
    analytic = np.concatenate([run.grads[name].flat[picks[name]] for name in wrt])
    error = relative_error(analytic, np.concatenate([numeric[name] for name in wrt]))
    assert error <= REF_VS_FINITE_DIFF, f"sampled gradients: relative error {error:.3e}"


# ----------------------------------------------------------------------------- torch_impl

@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_torch_impl_float64_matches_reference(cell: str, data: st.DataObject) -> None:
    inputs = make_inputs(data.draw(lm_cases(cell)))
    expected = run_reference(inputs)
    assert_runs_close(run_torch_functional(inputs, torch.float64), expected, TORCH64_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_torch_impl_float32_matches_reference_float64(cell: str, data: st.DataObject) -> None:
    # hidden >= 4, as strategies.float32_configs for the layers: with hidden 1 a bias gradient
    # is one element, a sum of B*T terms that can cancel, and float32 rounding alone missed
    # the 1e-4 budget (1.02e-4 on drnn.bias_hh_l0, thorough profile); float64 covers hidden 1.
    case = data.draw(lm_cases(cell).map(lambda c: c._replace(hidden=max(c.hidden, 4))))
    inputs = float32_inputs(make_inputs(case))
    expected = run_reference(inputs)
    assert_runs_close(run_torch_functional(inputs, torch.float32), expected, TORCH32_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float32), expected, TORCH32_VS_REF64)


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_round_trips_between_backends(cell: str) -> None:
    torch_model = tim.RNNLM(7, 3, 4, 2, cell, dtype=torch.float64)
    ref_model = ref.RNNLM(7, 3, 4, 2, cell, seed=1)
    assert list(torch_model.state_dict()) == list(ref_model.state_dict())
    ref_model.load_state_dict(torch_model.state_dict())
    back = tim.RNNLM(7, 3, 4, 2, cell, dtype=torch.float64)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ref_model.state_dict().items()})
    for name, p in torch_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    ids = np.array([[1, 2, 3], [6, 0, 5]])
    logits_ref = ref_model.eval()(ids)[0]
    logits_torch = back.eval()(torch.from_numpy(ids))[0]
    assert_close(logits_torch, logits_ref, TORCH64_VS_REF64.forward, "logits")


# ----------------------------------------------------------------------------- step interface

def _models(case: LMCase) -> tuple:
    ref_model = ref.RNNLM(case.vocab, case.embed, case.hidden, case.layers, case.cell,
                          seed=case.seed).eval()
    torch_model = tim.RNNLM(case.vocab, case.embed, case.hidden, case.layers, case.cell,
                            dtype=torch.float64).eval()
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in ref_model.params.items()})
    return ref_model, torch_model


@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_step_from_init_state_reproduces_forward_at_every_position(cell: str,
                                                                   data: st.DataObject) -> None:
    case = data.draw(lm_cases(cell))
    inputs = make_inputs(case)
    for model, ids in zip(_models(case), (inputs.ids, torch.from_numpy(inputs.ids))):
        logits, _, final = model(ids)
        state = model.init_state(case.batch)
        for t in range(case.steps):
            step_logits, state = model.step(ids[:, t], state)
            assert_close(step_logits, logits[:, t], FLOAT64_REORDERED.forward, f"logits[:, {t}]")
        for i, (s, f) in enumerate(zip(state, final, strict=True)):
            assert_close(s, f, FLOAT64_REORDERED.forward, f"state[{i}]")


@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_step_from_given_state_equals_forward_with_that_state(cell: str,
                                                              data: st.DataObject) -> None:
    case = data.draw(lm_cases(cell))._replace(given_state=True)
    inputs = make_inputs(case)
    ref_model, torch_model = _models(case)
    ref_state = inputs.state
    torch_state = tuple(torch.from_numpy(s) for s in ref_state)
    for model, ids, state in ((ref_model, inputs.ids, ref_state),
                              (torch_model, torch.from_numpy(inputs.ids), torch_state)):
        logits, _, final = model(ids, state=state)
        for t in range(case.steps):
            step_logits, state = model.step(ids[:, t], state)
            assert_close(step_logits, logits[:, t], FLOAT64_REORDERED.forward, f"logits[:, {t}]")
    with torch.no_grad():
        assert_close(torch_model(torch.from_numpy(inputs.ids), state=torch_state)[0],
                     ref_model(inputs.ids, state=ref_state)[0], TORCH64_VS_REF64.forward,
                     "logits")


@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data(), position=st.integers(0, 3), new_token=st.integers(0, 5))
def test_changing_token_t_never_changes_logits_before_t(cell: str, data: st.DataObject,
                                                        position: int, new_token: int) -> None:
    case = data.draw(lm_cases(cell))._replace(steps=4)
    inputs = make_inputs(case)
    changed = inputs.ids.copy()
    changed[:, position] = new_token % case.vocab
    for model, to in zip(_models(case), (np.asarray, torch.from_numpy)):
        before = model(to(inputs.ids))[0][:, :position]
        after = model(to(changed))[0][:, :position]
        assert (before == after).all()


# ----------------------------------------------------------------------------- bad input

BACKENDS = [(ref, np.asarray, {}), (tim, torch.as_tensor, {"dtype": torch.float64})]


@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_bad_inputs_raise_errors_naming_the_argument(module, to, factory) -> None:
    model = module.RNNLM(5, 3, 4, 2, "gru", **factory)
    ids = to(np.array([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="ids"):
        model(to(np.array([[1, 5]])))          # out of range
    with pytest.raises(ValueError, match="ids"):
        model(to(np.array([[-1, 2]])))
    with pytest.raises(TypeError, match="ids"):
        model(to(np.array([[1.0, 2.0]])))      # not integers
    with pytest.raises(ValueError, match="ids"):
        model(to(np.array([1, 2])))            # not (B, T)
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=to(np.array([[1, 2, 3]])))
    with pytest.raises(ValueError, match="lengths"):
        model(ids, lengths=to(np.array([3, 1])))
    with pytest.raises(TypeError, match="state"):
        model(ids, state=model.init_state(2) * 2)   # (h, h): a GRU's state is (h,)
    with pytest.raises(ValueError, match=r"state\[0\]"):
        model(ids, state=model.init_state(3))       # batch 3 != 2
    with pytest.raises(ValueError, match="tokens"):
        model.step(to(np.array([5, 0])), model.init_state(2))
    with pytest.raises(ValueError, match="cell"):
        module.RNNLM(5, 3, 4, 1, "transformer", **factory)
    with pytest.raises(ValueError, match="cell"):
        module.rnn_lm_forward(ids, dict(model.state_dict()), "lstm2")
    with pytest.raises(ValueError, match="dropout"):
        module.RNNLM(5, 3, 4, 1, "lstm", dropout=1.5, **factory)
    with pytest.raises(ValueError, match="params"):
        module.rnn_lm_forward(ids, {"embedding.weight": model.state_dict()["embedding.weight"]},
                              "gru")
