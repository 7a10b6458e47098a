"""Parity properties of the RNN encoder-decoder: reference/seq2seq.py and torch_impl/seq2seq.py.

Gradients are those of L = dloss · loss + <logits, dlogits> for every parameter tensor, with
unequal source lengths and targets partly PAD (ignored). The parity properties run for every
cell ("lstm", "gru") × attention score (None, "dot", "general", "concat") × direction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference.seq2seq as ref
import torch_impl.seq2seq as tim
from reference.decoding import select_rows
from reference.gradcheck import numerical_gradients

from .parity import assert_all_close, assert_close, relative_error, to_numpy
from .strategies_blocks import float32_exact, seeds, to_torch
from .tolerances import FLOAT64_REORDERED, REF_VS_FINITE_DIFF, TORCH32_VS_REF64, TORCH64_VS_REF64

CELLS = ref.SEQ2SEQ_CELLS
SCORES = ref.ATTENTION_SCORES
SCORE_IDS = [str(s) for s in SCORES]


class Seq2SeqCase(NamedTuple):
    cell: str
    attention: str | None
    bidirectional: bool
    src_vocab: int
    tgt_vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    src_steps: int
    tgt_steps: int
    seed: int

    def config(self, backend) -> object:
        return backend.Seq2SeqConfig(self.src_vocab, self.tgt_vocab, self.embed, self.hidden,
                                     self.layers, self.cell, self.bidirectional, self.attention)


@st.composite
def seq2seq_cases(draw: st.DrawFn, cell: str, attention: str | None,
                  bidirectional: bool | None = None) -> Seq2SeqCase:
    side = st.integers(1, 3)
    if bidirectional is None:
        bidirectional = draw(st.booleans())
    return Seq2SeqCase(cell=cell, attention=attention, bidirectional=bidirectional,
                       src_vocab=draw(st.integers(2, 6)), tgt_vocab=draw(st.integers(2, 6)),
                       embed=draw(side), hidden=draw(side), layers=draw(st.integers(1, 2)),
                       batch=draw(st.integers(2, 3)), src_steps=draw(st.integers(2, 4)),
                       tgt_steps=draw(side), seed=draw(seeds))


class Seq2SeqInputs(NamedTuple):
    case: Seq2SeqCase
    params: dict
    src: np.ndarray
    src_lengths: np.ndarray   # unequal: row 0 is full, the last row has length 1
    tgt_in: np.ndarray
    targets: np.ndarray       # about a third PAD (0), ignored
    dlogits: np.ndarray
    dloss: float


def make_inputs(case: Seq2SeqCase) -> Seq2SeqInputs:
    rng = np.random.default_rng(case.seed)
    model = ref.Seq2Seq(case.config(ref), seed=case.seed)
    B, Ts, Tt = case.batch, case.src_steps, case.tgt_steps
    lengths = rng.integers(1, Ts + 1, B)
    lengths[0], lengths[-1] = Ts, 1
    targets = rng.integers(0, case.tgt_vocab, (B, Tt))
    targets[rng.random((B, Tt)) < 0.3] = ref.PAD
    return Seq2SeqInputs(case, model.params, rng.integers(0, case.src_vocab, (B, Ts)), lengths,
                         rng.integers(0, case.tgt_vocab, (B, Tt)), targets,
                         rng.standard_normal((B, Tt, case.tgt_vocab)),
                         float(rng.uniform(0.5, 2.0)))


class Seq2SeqRun(NamedTuple):
    logits: object
    loss: object
    grads: dict


def run_reference(inputs: Seq2SeqInputs) -> Seq2SeqRun:
    (logits, loss), cache = ref.seq2seq_forward(inputs.src, inputs.src_lengths, inputs.tgt_in,
                                                inputs.params, inputs.case.config(ref),
                                                inputs.targets)
    return Seq2SeqRun(logits, loss, ref.seq2seq_backward(cache, inputs.dlogits, inputs.dloss))


def run_torch_functional(inputs: Seq2SeqInputs, dtype: torch.dtype) -> Seq2SeqRun:
    params = {k: to_torch(v, dtype) for k, v in inputs.params.items()}
    (logits, loss), cache = tim.seq2seq_forward(
        to_torch(inputs.src), to_torch(inputs.src_lengths), to_torch(inputs.tgt_in), params,
        inputs.case.config(tim), to_torch(inputs.targets))
    grads = tim.seq2seq_backward(cache, to_torch(inputs.dlogits, dtype), inputs.dloss)
    return Seq2SeqRun(logits, loss, grads)


def run_torch_module(inputs: Seq2SeqInputs, dtype: torch.dtype) -> Seq2SeqRun:
    model = tim.Seq2Seq(inputs.case.config(tim), dtype=dtype)
    model.load_state_dict({k: to_torch(v, dtype) for k, v in inputs.params.items()})
    logits, loss = model(to_torch(inputs.src), to_torch(inputs.src_lengths),
                         to_torch(inputs.tgt_in), to_torch(inputs.targets))
    torch.autograd.backward([loss, logits], [torch.tensor(inputs.dloss, dtype=dtype),
                                             to_torch(inputs.dlogits, dtype)])
    grads = {name: p.grad for name, p in model.named_parameters()}
    return Seq2SeqRun(logits.detach(), loss.detach(), grads)


def assert_runs_close(actual: Seq2SeqRun, expected: Seq2SeqRun, budget) -> None:
    assert_close(actual.logits, expected.logits, budget.forward, "logits")
    assert_close(actual.loss, expected.loss, budget.forward, "loss")
    assert list(actual.grads) == list(expected.grads)
    assert_all_close(actual.grads, expected.grads, budget.gradient, "d")


def float32_inputs(inputs: Seq2SeqInputs) -> Seq2SeqInputs:
    """Inputs rounded to float32 (held in float64) so that only the arithmetic differs."""
    return inputs._replace(params={k: float32_exact(v) for k, v in inputs.params.items()},
                           dlogits=float32_exact(inputs.dlogits),
                           dloss=float(np.float32(inputs.dloss)))


# The attention-score gradients go through de_ij = a_ij (da_ij - Σ_k a_ik da_ik), which sums
# to 0 over a row: with one live key (length 1) or keys that score alike they cancel to
# ~1e-8..1e-10 although inputs and upstream are O(1), and float32's absolute noise (~4e-8 of
# the O(1) terms) is then most of them, with no bug anywhere (test_rnn_attention.py's
# argument). So in float32 only, a gradient tensor of norm below this floor is held to the
# budget times the floor (an absolute bound) instead of times its own norm; the float64 and
# finite-difference tests hold every tensor to its own norm.
FLOAT32_GRADIENT_FLOOR = 1e-3


def assert_float32_runs_close(actual: Seq2SeqRun, expected: Seq2SeqRun) -> None:
    budget = TORCH32_VS_REF64
    assert_close(actual.logits, expected.logits, budget.forward, "logits")
    assert_close(actual.loss, expected.loss, budget.forward, "loss")
    assert list(actual.grads) == list(expected.grads)
    for name, e in expected.grads.items():
        a, e = to_numpy(actual.grads[name]), to_numpy(e)
        if np.linalg.norm(e) >= FLOAT32_GRADIENT_FLOOR:
            assert_close(a, e, budget.gradient, f"d{name}")
        else:
            assert np.isfinite(a).all(), f"d{name}: non-finite"
            error = float(np.linalg.norm(a - e))
            assert error <= budget.gradient * FLOAT32_GRADIENT_FLOOR, \
                f"d{name}: |a - e| {error:.3e} > {budget.gradient * FLOAT32_GRADIENT_FLOOR:.1e}"

# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("attention", SCORES, ids=SCORE_IDS)
@given(data=st.data())
def test_reference_backward_matches_finite_differences(attention: str | None,
                                                       data: st.DataObject) -> None:
    # Central differences on one sampled element of every parameter tensor (the cell and the
    # direction are drawn, to keep the suite fast; the parity tests enumerate them).
    cell = data.draw(st.sampled_from(CELLS))
    inputs = make_inputs(data.draw(seq2seq_cases(cell, attention)))
    run = run_reference(inputs)
    rng = np.random.default_rng(inputs.case.seed)
    picks = {name: rng.choice(p.size, size=1) for name, p in inputs.params.items()}
    config = inputs.case.config(ref)

    def model(**sampled: np.ndarray) -> tuple:
        params = {name: p.copy() for name, p in inputs.params.items()}
        for name, v in sampled.items():
            params[name].flat[picks[name]] = v
        return ref.seq2seq_forward(inputs.src, inputs.src_lengths, inputs.tgt_in, params,
                                   config, inputs.targets)[0]

    wrt = {name: p.flat[picks[name]] for name, p in inputs.params.items()}
    numeric = numerical_gradients(model, wrt, (inputs.dlogits, np.asarray(inputs.dloss)))
    analytic = np.concatenate([run.grads[name].flat[picks[name]] for name in wrt])
    error = relative_error(analytic, np.concatenate([numeric[name] for name in wrt]))
    assert error <= REF_VS_FINITE_DIFF, f"sampled gradients: relative error {error:.3e}"


# ----------------------------------------------------------------------------- torch_impl

@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("attention", SCORES, ids=SCORE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_torch_impl_float64_matches_reference(cell: str, attention: str | None,
                                              bidirectional: bool, data: st.DataObject) -> None:
    inputs = make_inputs(data.draw(seq2seq_cases(cell, attention, bidirectional)))
    expected = run_reference(inputs)
    assert_runs_close(run_torch_functional(inputs, torch.float64), expected, TORCH64_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("attention", SCORES, ids=SCORE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_torch_impl_float32_matches_reference_float64(cell: str, attention: str | None,
                                                      bidirectional: bool,
                                                      data: st.DataObject) -> None:
    inputs = float32_inputs(make_inputs(data.draw(seq2seq_cases(cell, attention,
                                                                bidirectional))))
    expected = run_reference(inputs)
    assert_float32_runs_close(run_torch_functional(inputs, torch.float32), expected)
    assert_float32_runs_close(run_torch_module(inputs, torch.float32), expected)


def test_state_dict_round_trips_between_backends() -> None:
    config = dict(src_vocab=5, tgt_vocab=7, embed_size=3, hidden_size=2, num_layers=2,
                  cell="lstm", bidirectional=True, attention="concat")
    torch_model = tim.Seq2Seq(tim.Seq2SeqConfig(**config), dtype=torch.float64)
    ref_model = ref.Seq2Seq(ref.Seq2SeqConfig(**config), seed=1)
    assert list(torch_model.state_dict()) == list(ref_model.state_dict())
    ref_model.load_state_dict(torch_model.state_dict())
    src, lengths, tgt_in = np.array([[1, 2, 3], [4, 0, 0]]), np.array([3, 1]), np.array([[1, 6]])
    tgt_in = np.repeat(tgt_in, 2, axis=0)
    with torch.no_grad():
        logits_torch = torch_model(torch.from_numpy(src), torch.from_numpy(lengths),
                                   torch.from_numpy(tgt_in))[0]
    assert_close(logits_torch, ref_model(src, lengths, tgt_in)[0], TORCH64_VS_REF64.forward,
                 "logits")


# ----------------------------------------------------------------------------- step interface

def _models(case: Seq2SeqCase) -> tuple:
    ref_model = ref.Seq2Seq(case.config(ref), seed=case.seed)
    torch_model = tim.Seq2Seq(case.config(tim), dtype=torch.float64)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in ref_model.params.items()})
    return ref_model, torch_model


@pytest.mark.parametrize("attention", SCORES, ids=SCORE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_step_from_encode_reproduces_teacher_forced_logits(cell: str, attention: str | None,
                                                           data: st.DataObject) -> None:
    inputs = make_inputs(data.draw(seq2seq_cases(cell, attention)))
    arrays = (inputs.src, inputs.src_lengths, inputs.tgt_in)
    for model, to in zip(_models(inputs.case), (np.asarray, torch.from_numpy)):
        src, lengths, tgt_in = map(to, arrays)
        with torch.no_grad():
            logits = model(src, lengths, tgt_in)[0]
        state = model.encode(src, lengths)
        for t in range(inputs.case.tgt_steps):
            step_logits, state = model.step(tgt_in[:, t], state)
            assert_close(step_logits, logits[:, t], FLOAT64_REORDERED.forward, f"logits[:, {t}]")


@given(data=st.data())
def test_select_rows_reorders_the_decoding_state_like_the_batch(data: st.DataObject) -> None:
    inputs = make_inputs(data.draw(seq2seq_cases("lstm", "general")))
    model = _models(inputs.case)[0]
    order = np.random.default_rng(inputs.case.seed).permutation(inputs.case.batch)
    state = model.encode(inputs.src, inputs.src_lengths)
    tokens = inputs.tgt_in[:, 0]
    logits = model.step(tokens, state)[0]
    reordered = model.step(tokens[order], select_rows(state, order))[0]
    assert_close(reordered, logits[order], FLOAT64_REORDERED.forward, "logits")


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("attention", SCORES, ids=SCORE_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(data=st.data())
def test_source_tokens_beyond_each_length_change_nothing(cell: str, attention: str | None,
                                                         data: st.DataObject) -> None:
    inputs = make_inputs(data.draw(seq2seq_cases(cell, attention)))
    c = inputs.case
    padded = np.arange(c.src_steps) >= inputs.src_lengths[:, None]
    changed = inputs._replace(src=np.where(padded, (inputs.src + 1) % c.src_vocab, inputs.src))
    before, after = run_reference(inputs), run_reference(changed)
    assert (before.logits == after.logits).all()
    assert before.loss == after.loss
    for name in before.grads:
        assert (before.grads[name] == after.grads[name]).all(), name
    before_t = run_torch_functional(inputs, torch.float64)
    after_t = run_torch_functional(changed, torch.float64)
    assert torch.equal(before_t.logits, after_t.logits)
    assert_all_close(after_t.grads, before_t.grads, FLOAT64_REORDERED.gradient, "d")


# ----------------------------------------------------------------------------- bad input

BACKENDS = [(ref, np.asarray, {}), (tim, torch.as_tensor, {"dtype": torch.float64})]


@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_bad_inputs_raise_errors_naming_the_argument(module, to, factory) -> None:
    config = module.Seq2SeqConfig(5, 6, 3, 2, 1, "gru", True, "dot")
    model = module.Seq2Seq(config, **factory)
    src, lengths, tgt_in = to(np.array([[1, 2, 3], [4, 0, 0]])), to(np.array([3, 1])), \
        to(np.array([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="src"):
        model(to(np.array([[1, 5, 0]])), to(np.array([3])), to(np.array([[1]])))  # 5 >= V_src
    with pytest.raises(TypeError, match="src"):
        model(to(np.array([[1.0, 2.0]])), None, to(np.array([[1]])))
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, to(np.array([4, 1])), tgt_in)      # longer than Ts = 3
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, to(np.array([0, 1])), tgt_in)
    with pytest.raises(ValueError, match="src_lengths"):
        model(src, to(np.array([3, 1, 1])), tgt_in)   # batch 3 != 2
    with pytest.raises(ValueError, match="tgt_in"):
        model(src, lengths, to(np.array([[1, 6], [0, 0]])))   # 6 >= V_tgt
    with pytest.raises(ValueError, match="tgt_in"):
        model(src, lengths, to(np.array([[1, 2]])))           # batch 1 != 2
    with pytest.raises(ValueError, match="targets"):
        model(src, lengths, tgt_in, to(np.array([[1, 2, 3], [1, 2, 3]])))
    with pytest.raises(ValueError, match="tokens"):
        model.step(to(np.array([6, 0])), model.encode(src, lengths))
    with pytest.raises(TypeError, match="state"):
        model.step(to(np.array([1, 0])), (src,))
    with pytest.raises(ValueError, match="cell"):
        module.Seq2SeqConfig(5, 6, 3, 2, 1, "rnn_tanh")
    with pytest.raises(ValueError, match="attention"):
        module.Seq2SeqConfig(5, 6, 3, 2, 1, "lstm", False, "additive")
    with pytest.raises(ValueError, match="hidden_size"):
        module.Seq2SeqConfig(5, 6, 3, 0)
    with pytest.raises(TypeError, match="config"):
        module.Seq2Seq({"src_vocab": 5}, **factory)
    params = dict(model.state_dict())
    with pytest.raises(ValueError, match="params"):
        module.seq2seq_forward(src, lengths, tgt_in, {"decoder.head.bias": params[
            "decoder.head.bias"]}, config)
    with pytest.raises(ValueError, match="params"):
        module.seq2seq_forward(src, lengths, tgt_in, dict(params, **{"extra.weight": params[
            "decoder.head.bias"]}), config)
    with pytest.raises(ValueError, match="decoder.head.weight"):
        module.seq2seq_forward(src, lengths, tgt_in, dict(params, **{
            "decoder.head.weight": params["decoder.head.bias"]}), config)
    with pytest.raises(TypeError, match="cache"):
        module.seq2seq_backward(None)
