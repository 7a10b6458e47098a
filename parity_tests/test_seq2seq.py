"""Parity properties of the RNN encoder-decoder: reference/seq2seq.py and torch_impl/seq2seq.py.

Gradients are those of L = dloss · loss + <logits, dlogits> for every parameter tensor, with
unequal source lengths and targets partly PAD (ignored). The parity properties run for every
cell ("lstm", "gru") × attention (None, Luong "dot", "general", "concat", and "bahdanau") ×
direction. Teacher forcing with a ratio < 1 is given as a teacher_mask (False: step t reads
the model's own argmax at t - 1): its properties hold both backends to each other, the
reference to finite differences, the step-by-step decoder to the one-RNN-call decoder, and
the Bahdanau decoder to a plain torch.nn/autograd re-implementation. Dropout is given as
explicit keep-masks (one per site of seq2seq_dropout_mask_shapes), the same to both backends.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import reference.seq2seq as ref
import torch_impl.seq2seq as tim
from reference.decoding import select_rows
from reference.gradcheck import numerical_gradients

from .parity import (
    assert_all_close,
    assert_close,
    assert_gradient_close,
    relative_error,
    to_numpy,
)
from .strategies import float32_exact, seeds, to_torch
from .tolerances import (
    FLOAT32_GRADIENT_FLOOR,
    FLOAT64_GRADIENT_FLOOR,
    FLOAT64_REORDERED,
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)

CELLS = ref.SEQ2SEQ_CELLS
ATTENTIONS = ref.ATTENTIONS
ATTENTION_IDS = [str(a) for a in ATTENTIONS]
ONE_CALL_ATTENTIONS = ref.ATTENTION_SCORES   # Luong or none: the decoder has a one-call path
ONE_CALL_IDS = [str(a) for a in ONE_CALL_ATTENTIONS]


class Seq2SeqShape(NamedTuple):
    """Sizes and a seed, the same for every cell and attention (so an @example fits all)."""
    src_vocab: int
    tgt_vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    src_steps: int
    tgt_steps: int
    seed: int


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
    dropout: float = 0.0

    def config(self, backend) -> object:
        return backend.Seq2SeqConfig(self.src_vocab, self.tgt_vocab, self.embed, self.hidden,
                                     self.layers, self.cell, self.bidirectional, self.attention,
                                     self.dropout)


def seq2seq_case(cell: str, attention: str | None, bidirectional: bool,
                 shape: Seq2SeqShape) -> Seq2SeqCase:
    return Seq2SeqCase(cell, attention, bidirectional, *shape)


@st.composite
def seq2seq_shapes(draw: st.DrawFn, min_tgt_steps: int = 1) -> Seq2SeqShape:
    side = st.integers(1, 3)
    return Seq2SeqShape(src_vocab=draw(st.integers(2, 6)), tgt_vocab=draw(st.integers(2, 6)),
                        embed=draw(side), hidden=draw(side), layers=draw(st.integers(1, 2)),
                        batch=draw(st.integers(2, 3)), src_steps=draw(st.integers(2, 4)),
                        tgt_steps=draw(st.integers(min_tgt_steps, 3)), seed=draw(seeds))


# Edge cases pinned with @example: everything of size 1 (one key, so the attention weights
# are exactly 1 and the score gets no gradient), and batch 1 with hidden 1 carried through
# two layers and three decoder steps.
SINGLE = Seq2SeqShape(src_vocab=2, tgt_vocab=2, embed=1, hidden=1, layers=1, batch=1,
                      src_steps=1, tgt_steps=1, seed=0)
THIN = Seq2SeqShape(src_vocab=3, tgt_vocab=3, embed=1, hidden=1, layers=2, batch=1,
                    src_steps=2, tgt_steps=3, seed=1)
# Bahdanau's key_proj.bias gradient cancels to ~1e-8 here (FLOAT64_GRADIENT_FLOOR's reason)
BIAS_CANCELS = Seq2SeqShape(src_vocab=6, tgt_vocab=3, embed=3, hidden=1, layers=2, batch=3,
                            src_steps=4, tgt_steps=3, seed=810)


class Seq2SeqInputs(NamedTuple):
    case: Seq2SeqCase
    params: dict
    src: np.ndarray
    src_lengths: np.ndarray   # unequal: row 0 is full, the last row has length 1
    tgt_in: np.ndarray
    targets: np.ndarray       # about a third PAD (0), ignored
    dlogits: np.ndarray
    dloss: float
    teacher_mask: np.ndarray | None = None   # None: full teacher forcing
    dropout_masks: dict | None = None        # None: no dropout


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


def with_teacher_mask(inputs: Seq2SeqInputs) -> Seq2SeqInputs:
    """A random teacher_mask: column 0 True, about half False elsewhere and at least one False
    (the last step of the last row) when there are two steps or more."""
    B, Tt = inputs.tgt_in.shape
    mask = np.random.default_rng(inputs.case.seed + 1).random((B, Tt)) < 0.5
    mask[:, 0] = True
    if Tt > 1:
        mask[-1, -1] = False
    return inputs._replace(teacher_mask=mask)


# Finite differences move the logits by ~eps·|∂logits/∂θ| ≈ 1e-6 and the two backends differ
# by ~1e-15: where the top two logits that a masked step's argmax reads are closer than this,
# the compared runs could read different tokens, which is a different function (a step of the
# argmax), not a wrong gradient. Such near-ties are skipped.
ARGMAX_GAP = 1e-4


def argmax_gap(logits: np.ndarray, teacher_mask: np.ndarray | None) -> float:
    """The smallest top-2 gap of the logits[:, t-1] read where teacher_mask[:, t] is False."""
    if teacher_mask is None or teacher_mask.all():
        return np.inf
    top2 = np.sort(logits[:, :-1], axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0])[~teacher_mask[:, 1:]].min())


def with_dropout(inputs: Seq2SeqInputs, p: float = 0.4) -> Seq2SeqInputs:
    """Dropout at rate p with random keep-masks for every site."""
    case = inputs.case._replace(dropout=p)
    rng = np.random.default_rng(case.seed + 2)
    shapes = ref.seq2seq_dropout_mask_shapes(case.config(ref), case.batch, case.src_steps,
                                             case.tgt_steps)
    return inputs._replace(case=case, dropout_masks={site: rng.random(shape) >= p
                                                     for site, shape in shapes.items()})


class Seq2SeqRun(NamedTuple):
    logits: object
    loss: object
    grads: dict


def run_reference(inputs: Seq2SeqInputs) -> Seq2SeqRun:
    (logits, loss), cache = ref.seq2seq_forward(inputs.src, inputs.src_lengths, inputs.tgt_in,
                                                inputs.params, inputs.case.config(ref),
                                                inputs.targets,
                                                teacher_mask=inputs.teacher_mask,
                                                dropout_masks=inputs.dropout_masks)
    return Seq2SeqRun(logits, loss, ref.seq2seq_backward(cache, inputs.dlogits, inputs.dloss))


def _torch_mask(inputs: Seq2SeqInputs) -> torch.Tensor | None:
    return None if inputs.teacher_mask is None else to_torch(inputs.teacher_mask)


def _torch_dropout_masks(inputs: Seq2SeqInputs) -> dict | None:
    masks = inputs.dropout_masks
    return None if masks is None else {site: to_torch(m) for site, m in masks.items()}


def run_torch_functional(inputs: Seq2SeqInputs, dtype: torch.dtype) -> Seq2SeqRun:
    params = {k: to_torch(v, dtype) for k, v in inputs.params.items()}
    (logits, loss), cache = tim.seq2seq_forward(
        to_torch(inputs.src), to_torch(inputs.src_lengths), to_torch(inputs.tgt_in), params,
        inputs.case.config(tim), to_torch(inputs.targets), teacher_mask=_torch_mask(inputs),
        dropout_masks=_torch_dropout_masks(inputs))
    grads = tim.seq2seq_backward(cache, to_torch(inputs.dlogits, dtype), inputs.dloss)
    return Seq2SeqRun(logits, loss, grads)


def run_torch_module(inputs: Seq2SeqInputs, dtype: torch.dtype) -> Seq2SeqRun:
    model = tim.Seq2Seq(inputs.case.config(tim), dtype=dtype)
    model.load_state_dict({k: to_torch(v, dtype) for k, v in inputs.params.items()})
    logits, loss = model(to_torch(inputs.src), to_torch(inputs.src_lengths),
                         to_torch(inputs.tgt_in), to_torch(inputs.targets),
                         teacher_mask=_torch_mask(inputs),
                         dropout_masks=_torch_dropout_masks(inputs))
    torch.autograd.backward([loss, logits], [torch.tensor(inputs.dloss, dtype=dtype),
                                             to_torch(inputs.dlogits, dtype)])
    grads = {name: p.grad for name, p in model.named_parameters()}
    return Seq2SeqRun(logits.detach(), loss.detach(), grads)


def run_reference_steps(inputs: Seq2SeqInputs) -> Seq2SeqRun:
    """run_reference through the step-by-step decoder, forced even where the one-call decoder
    would serve (Luong or none, no False in the mask)."""
    lengths = inputs.src_lengths.astype(np.int64)
    (logits, loss), cache = ref._seq2seq_forward(
        inputs.src, lengths, inputs.tgt_in, inputs.params, inputs.case.config(ref),
        inputs.targets, ref.PAD, inputs.teacher_mask, True, np.dtype(np.float64),
        inputs.dropout_masks)
    assert isinstance(cache.decoder, ref.DecoderStepsCache)
    return Seq2SeqRun(logits, loss, ref.seq2seq_backward(cache, inputs.dlogits, inputs.dloss))


def run_torch_steps(inputs: Seq2SeqInputs) -> Seq2SeqRun:
    """run_torch_functional (float64) through the forced step-by-step decoder."""
    params = {k: to_torch(v) for k, v in inputs.params.items()}
    (logits, loss), cache = tim._seq2seq_forward(
        to_torch(inputs.src), to_torch(inputs.src_lengths).long(), to_torch(inputs.tgt_in),
        params, inputs.case.config(tim), to_torch(inputs.targets), tim.PAD,
        _torch_mask(inputs), True, torch.float64, _torch_dropout_masks(inputs))
    assert isinstance(cache.decoder, tim.DecoderStepsCache)
    grads = tim.seq2seq_backward(cache, to_torch(inputs.dlogits), inputs.dloss)
    return Seq2SeqRun(logits, loss, grads)


def assert_runs_close(actual: Seq2SeqRun, expected: Seq2SeqRun, budget,
                      floor: float | None = None) -> None:
    """Logits and loss to the budget; each gradient tensor to the budget times its own norm,
    or, when its norm is below ``floor`` (default FLOAT64_GRADIENT_FLOOR), times the floor."""
    floor = FLOAT64_GRADIENT_FLOOR if floor is None else floor
    assert_close(actual.logits, expected.logits, budget.forward, "logits")
    assert_close(actual.loss, expected.loss, budget.forward, "loss")
    assert list(actual.grads) == list(expected.grads)
    for name, e in expected.grads.items():
        assert_gradient_close(actual.grads[name], e, budget.gradient, floor, f"d{name}")


def float32_inputs(inputs: Seq2SeqInputs) -> Seq2SeqInputs:
    """Inputs rounded to float32 (held in float64) so that only the arithmetic differs."""
    return inputs._replace(params={k: float32_exact(v) for k, v in inputs.params.items()},
                           dlogits=float32_exact(inputs.dlogits),
                           dloss=float(np.float32(inputs.dloss)))




def assert_float32_runs_close(actual: Seq2SeqRun, expected: Seq2SeqRun) -> None:
    assert_runs_close(actual, expected, TORCH32_VS_REF64, FLOAT32_GRADIENT_FLOOR)


def assert_reference_matches_finite_differences(inputs: Seq2SeqInputs) -> None:
    """Central differences on one sampled element of every parameter tensor."""
    run = run_reference(inputs)
    rng = np.random.default_rng(inputs.case.seed)
    picks = {name: rng.choice(p.size, size=1) for name, p in inputs.params.items()}
    config = inputs.case.config(ref)

    def model(**sampled: np.ndarray) -> tuple:
        params = {name: p.copy() for name, p in inputs.params.items()}
        for name, v in sampled.items():
            params[name].flat[picks[name]] = v
        return ref.seq2seq_forward(inputs.src, inputs.src_lengths, inputs.tgt_in, params,
                                   config, inputs.targets, teacher_mask=inputs.teacher_mask,
                                   dropout_masks=inputs.dropout_masks)[0]

    wrt = {name: p.flat[picks[name]] for name, p in inputs.params.items()}
    numeric = numerical_gradients(model, wrt, (inputs.dlogits, np.asarray(inputs.dloss)))
    analytic = np.concatenate([run.grads[name].flat[picks[name]] for name in wrt])
    error = relative_error(analytic, np.concatenate([numeric[name] for name in wrt]))
    assert error <= REF_VS_FINITE_DIFF, f"sampled gradients: relative error {error:.3e}"


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS), bidirectional=st.booleans())
@example(shape=SINGLE, cell="lstm", bidirectional=False)
@example(shape=THIN, cell="gru", bidirectional=True)
def test_reference_backward_matches_finite_differences(attention: str | None,
                                                       shape: Seq2SeqShape, cell: str,
                                                       bidirectional: bool) -> None:
    # The cell and the direction are drawn, to keep the suite fast; the parity tests
    # enumerate them.
    assert_reference_matches_finite_differences(
        make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))


# ----------------------------------------------------------------------------- torch_impl

@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(shape=seq2seq_shapes())
@example(shape=SINGLE)
@example(shape=THIN)
@example(shape=BIAS_CANCELS)
def test_torch_impl_float64_matches_reference(cell: str, attention: str | None,
                                              bidirectional: bool, shape: Seq2SeqShape) -> None:
    inputs = make_inputs(seq2seq_case(cell, attention, bidirectional, shape))
    expected = run_reference(inputs)
    assert_runs_close(run_torch_functional(inputs, torch.float64), expected, TORCH64_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(shape=seq2seq_shapes())
@example(shape=SINGLE)
@example(shape=THIN)
def test_torch_impl_float32_matches_reference_float64(cell: str, attention: str | None,
                                                      bidirectional: bool,
                                                      shape: Seq2SeqShape) -> None:
    inputs = float32_inputs(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    expected = run_reference(inputs)
    assert_float32_runs_close(run_torch_functional(inputs, torch.float32), expected)
    assert_float32_runs_close(run_torch_module(inputs, torch.float32), expected)


@pytest.mark.parametrize("attention", ["concat", "bahdanau"])
def test_state_dict_round_trips_between_backends(attention: str) -> None:
    config = dict(src_vocab=5, tgt_vocab=7, embed_size=3, hidden_size=2, num_layers=2,
                  cell="lstm", bidirectional=True, attention=attention)
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


# ----------------------------------------------------------------------------- teacher forcing

@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@given(shape=seq2seq_shapes(min_tgt_steps=2), cell=st.sampled_from(CELLS),
       bidirectional=st.booleans())
@example(shape=THIN, cell="lstm", bidirectional=True)
def test_teacher_mask_torch_impl_float64_matches_reference(attention: str | None,
                                                           shape: Seq2SeqShape, cell: str,
                                                           bidirectional: bool) -> None:
    inputs = with_teacher_mask(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    expected = run_reference(inputs)
    assume(argmax_gap(expected.logits, inputs.teacher_mask) > ARGMAX_GAP)  # see ARGMAX_GAP
    assert_runs_close(run_torch_functional(inputs, torch.float64), expected, TORCH64_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@given(shape=seq2seq_shapes(min_tgt_steps=2), cell=st.sampled_from(CELLS),
       bidirectional=st.booleans())
@example(shape=THIN, cell="gru", bidirectional=False)
def test_teacher_mask_reference_backward_matches_finite_differences(
        attention: str | None, shape: Seq2SeqShape, cell: str, bidirectional: bool) -> None:
    inputs = with_teacher_mask(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    logits = run_reference(inputs).logits
    assume(argmax_gap(logits, inputs.teacher_mask) > ARGMAX_GAP)  # see ARGMAX_GAP
    assert_reference_matches_finite_differences(inputs)


@pytest.mark.parametrize("attention", ONE_CALL_ATTENTIONS, ids=ONE_CALL_IDS)
@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS), bidirectional=st.booleans())
@example(shape=SINGLE, cell="gru", bidirectional=False)
@example(shape=THIN, cell="lstm", bidirectional=True)
def test_step_by_step_decoder_with_an_all_true_mask_matches_the_one_call_decoder(
        attention: str | None, shape: Seq2SeqShape, cell: str, bidirectional: bool) -> None:
    inputs = make_inputs(seq2seq_case(cell, attention, bidirectional, shape))
    inputs = inputs._replace(teacher_mask=np.ones(inputs.tgt_in.shape, dtype=bool))
    _, cache = ref.seq2seq_forward(inputs.src, inputs.src_lengths, inputs.tgt_in, inputs.params,
                                   inputs.case.config(ref), teacher_mask=inputs.teacher_mask)
    assert isinstance(cache.decoder, ref.DecoderCache)   # all True: the one-call decoder
    assert_runs_close(run_reference_steps(inputs), run_reference(inputs), FLOAT64_REORDERED)
    assert_runs_close(run_torch_steps(inputs), run_torch_functional(inputs, torch.float64),
                      FLOAT64_REORDERED)


@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@given(shape=seq2seq_shapes(min_tgt_steps=2), cell=st.sampled_from(CELLS),
       bidirectional=st.booleans())
@example(shape=THIN, cell="gru", bidirectional=True)
def test_masked_steps_read_the_models_own_previous_predictions(
        attention: str | None, shape: Seq2SeqShape, cell: str, bidirectional: bool) -> None:
    # Build, with ``step``, the inputs a masked run reads: tgt_in where the mask is True, the
    # previous step's argmax where it is False. A teacher-forced run on those inputs must give
    # the masked run's logits, and the gold tokens at masked positions (replaced here by
    # tokens the model did not choose) must never be read.
    inputs = with_teacher_mask(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    mask, V = inputs.teacher_mask, inputs.case.tgt_vocab
    for model, to in zip(_models(inputs.case), (np.asarray, torch.from_numpy)):
        src, lengths = to(inputs.src), to(inputs.src_lengths)
        read = inputs.tgt_in.copy()
        logits, state = model.step(to(read[:, 0]), model.encode(src, lengths))
        for t in range(1, inputs.case.tgt_steps):
            read[:, t] = np.where(mask[:, t], read[:, t], to_numpy(logits).argmax(axis=-1))
            logits, state = model.step(to(read[:, t]), state)
        unread = np.where(mask, inputs.tgt_in, (read + 1) % V)
        with torch.no_grad():
            forced = model(src, lengths, to(read))[0]
            assume(argmax_gap(to_numpy(forced), mask) > ARGMAX_GAP)  # see ARGMAX_GAP
            masked = model(src, lengths, to(unread), teacher_mask=to(mask))[0]
        assert_close(masked, forced, FLOAT64_REORDERED.forward, "logits")


# ----------------------------------------------------------------------------- plain torch

def run_plain_torch_bahdanau(inputs: Seq2SeqInputs) -> Seq2SeqRun:
    """The Bahdanau model in torch.nn.LSTM/GRU (packed sequences for the source lengths) and
    torch.nn.functional ops, differentiated by torch's autograd: an oracle that shares no code
    with either backend."""
    c = inputs.case
    D, L = 2 if c.bidirectional else 1, c.layers
    Hd = D * c.hidden
    P = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.params.items()}
    rnn = nn.LSTM if c.cell == "lstm" else nn.GRU
    encoder = rnn(c.embed, c.hidden, L, batch_first=True, bidirectional=c.bidirectional,
                  dtype=torch.float64)
    decoder = rnn(c.embed + Hd, Hd, L, batch_first=True, dtype=torch.float64)

    def sub(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in P.items() if k.startswith(prefix)}

    src, tgt_in = torch.from_numpy(inputs.src), torch.from_numpy(inputs.tgt_in)
    lengths = torch.from_numpy(inputs.src_lengths)
    B, Ts = src.shape
    packed = pack_padded_sequence(F.embedding(src, P["encoder.embedding.weight"]), lengths,
                                  batch_first=True, enforce_sorted=False)
    packed_memory, enc_state = functional_call(encoder, sub("encoder.rnn."), (packed,))
    memory = pad_packed_sequence(packed_memory, batch_first=True, total_length=Ts)[0]
    enc_state = enc_state if c.cell == "lstm" else (enc_state,)
    # (L·D, B, H) -> per layer [h_fwd; h_bwd] (L, B, D·H)
    state = tuple(s.reshape(L, D, B, c.hidden).permute(0, 2, 1, 3).reshape(L, B, Hd)
                  for s in enc_state)
    padding = torch.arange(Ts) >= lengths[:, None]
    w_q, w_k = P["decoder.attention.query_proj.weight"], P["decoder.attention.key_proj.weight"]
    b_k, v = P["decoder.attention.key_proj.bias"], P["decoder.attention.energy.weight"]
    mask = _torch_mask(inputs)
    steps = []
    for t in range(c.tgt_steps):
        tokens = tgt_in[:, t]
        if t > 0 and mask is not None:
            tokens = torch.where(mask[:, t], tokens, steps[-1].detach().argmax(dim=-1))
        query = state[0][-1]                                                # (B, Hd)
        scores = (torch.tanh((query @ w_q.T)[:, None] + memory @ w_k.T + b_k) @ v.T)[..., 0]
        weights = torch.softmax(scores.masked_fill(padding, -torch.inf), dim=-1)
        context = torch.bmm(weights[:, None], memory)[:, 0]                 # (B, Hd)
        x = torch.cat([F.embedding(tokens, P["decoder.embedding.weight"]), context], dim=-1)
        h, state = functional_call(decoder, sub("decoder.rnn."),
                                   (x[:, None], state if c.cell == "lstm" else state[0]))
        state = state if c.cell == "lstm" else (state,)
        h_tilde = torch.tanh(torch.cat([context, h[:, 0]], dim=-1)
                             @ P["decoder.combine.weight"].T)
        steps.append(h_tilde @ P["decoder.head.weight"].T + P["decoder.head.bias"])
    logits = torch.stack(steps, dim=1)
    targets = torch.from_numpy(inputs.targets)
    count = max(int((targets != ref.PAD).sum()), 1)   # the package's mean over no target is 0
    loss = F.cross_entropy(logits.reshape(-1, c.tgt_vocab), targets.reshape(-1),
                           ignore_index=ref.PAD, reduction="sum") / count
    torch.autograd.backward([loss, logits], [torch.tensor(inputs.dloss, dtype=torch.float64),
                                             torch.from_numpy(inputs.dlogits)])
    return Seq2SeqRun(logits.detach(), loss.detach(), {k: p.grad for k, p in P.items()})


@pytest.mark.parametrize("cell", CELLS)
@given(shape=seq2seq_shapes(), bidirectional=st.booleans(), masked=st.booleans())
@example(shape=SINGLE, bidirectional=False, masked=False)
@example(shape=THIN, bidirectional=True, masked=True)
def test_bahdanau_reference_matches_plain_torch_autograd(cell: str, shape: Seq2SeqShape,
                                                         bidirectional: bool,
                                                         masked: bool) -> None:
    inputs = make_inputs(seq2seq_case(cell, "bahdanau", bidirectional, shape))
    if masked:
        inputs = with_teacher_mask(inputs)
    expected = run_reference(inputs)
    assume(argmax_gap(expected.logits, inputs.teacher_mask) > ARGMAX_GAP)  # see ARGMAX_GAP
    assert_runs_close(run_plain_torch_bahdanau(inputs), expected, TORCHNN64_VS_OURS64)


# ----------------------------------------------------------------------------- step interface

def _models(case: Seq2SeqCase) -> tuple:
    ref_model = ref.Seq2Seq(case.config(ref), seed=case.seed)
    torch_model = tim.Seq2Seq(case.config(tim), dtype=torch.float64)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in ref_model.params.items()})
    return ref_model, torch_model


@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(shape=seq2seq_shapes(), bidirectional=st.booleans())
@example(shape=THIN, bidirectional=True)
def test_step_from_encode_reproduces_teacher_forced_logits(cell: str, attention: str | None,
                                                           shape: Seq2SeqShape,
                                                           bidirectional: bool) -> None:
    inputs = make_inputs(seq2seq_case(cell, attention, bidirectional, shape))
    arrays = (inputs.src, inputs.src_lengths, inputs.tgt_in)
    for model, to in zip(_models(inputs.case), (np.asarray, torch.from_numpy)):
        src, lengths, tgt_in = map(to, arrays)
        with torch.no_grad():
            logits = model(src, lengths, tgt_in)[0]
        state = model.encode(src, lengths)
        for t in range(inputs.case.tgt_steps):
            step_logits, state = model.step(tgt_in[:, t], state)
            assert_close(step_logits, logits[:, t], FLOAT64_REORDERED.forward, f"logits[:, {t}]")


@pytest.mark.parametrize("attention", ["general", "bahdanau"])
@given(shape=seq2seq_shapes())
def test_select_rows_reorders_the_decoding_state_like_the_batch(attention: str,
                                                                shape: Seq2SeqShape) -> None:
    inputs = make_inputs(seq2seq_case("lstm", attention, False, shape))
    model = _models(inputs.case)[0]
    order = np.random.default_rng(inputs.case.seed).permutation(inputs.case.batch)
    state = model.encode(inputs.src, inputs.src_lengths)
    tokens = inputs.tgt_in[:, 0]
    logits = model.step(tokens, state)[0]
    reordered = model.step(tokens[order], select_rows(state, order))[0]
    assert_close(reordered, logits[order], FLOAT64_REORDERED.forward, "logits")


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("attention", ATTENTIONS, ids=ATTENTION_IDS)
@pytest.mark.parametrize("cell", CELLS)
@given(shape=seq2seq_shapes(), bidirectional=st.booleans())
@example(shape=THIN, bidirectional=False)
def test_source_tokens_beyond_each_length_change_nothing(cell: str, attention: str | None,
                                                         shape: Seq2SeqShape,
                                                         bidirectional: bool) -> None:
    inputs = make_inputs(seq2seq_case(cell, attention, bidirectional, shape))
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


# ----------------------------------------------------------------------------- module: ratio

BACKENDS = [(ref, np.asarray, {}), (tim, torch.as_tensor, {"dtype": torch.float64})]


def _module_run(module, model, *args, **kwargs) -> tuple:
    """(logits, loss, grads) of the module's forward and backward, as arrays."""
    logits, loss = model(*args, **kwargs)
    if module is ref:
        model.backward()
        return logits, loss, model.grads
    model.zero_grad()
    loss.backward()
    return logits.detach(), loss.detach(), {k: p.grad for k, p in model.named_parameters()}


def _functional_run(module, model, src, lengths, tgt_in, targets, mask) -> tuple:
    params = dict(model.state_dict())
    (logits, loss), cache = module.seq2seq_forward(src, lengths, tgt_in, params, model.config,
                                                   targets, teacher_mask=mask)
    return logits, loss, module.seq2seq_backward(cache)


@pytest.mark.parametrize("attention", ["general", "bahdanau"])
@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_module_teacher_forcing_ratio_draws_the_mask_and_a_given_mask_wins(
        module, to, factory, attention: str) -> None:
    config = module.Seq2SeqConfig(5, 6, 3, 2, 2, "lstm", True, attention)
    model = module.Seq2Seq(config, **factory)
    if module is ref:
        model.rng = np.random.default_rng(3)
    rng = np.random.default_rng(4)
    src, lengths = to(rng.integers(0, 5, (3, 4))), to(np.array([4, 2, 1]))
    tgt_in, targets = to(rng.integers(0, 6, (3, 5))), to(rng.integers(0, 6, (3, 5)))
    shape = tuple(tgt_in.shape)
    first_only = np.zeros(shape, dtype=bool)
    first_only[:, 0] = True
    given_mask = rng.random(shape) < 0.5
    given_mask[:, 0] = True

    def same(actual: tuple, expected: tuple) -> None:
        assert_close(actual[0], expected[0], FLOAT64_REORDERED.forward, "logits")
        assert_close(actual[1], expected[1], FLOAT64_REORDERED.forward, "loss")
        assert_all_close(actual[2], expected[2], FLOAT64_REORDERED.gradient, "d")

    args = (src, lengths, tgt_in, targets)
    # ratio 0: every step after the first reads the model's own previous prediction.
    same(_module_run(module, model, *args, teacher_forcing_ratio=0.0),
         _functional_run(module, model, *args, to(first_only)))
    # An explicit mask wins over the ratio.
    same(_module_run(module, model, *args, teacher_forcing_ratio=0.0,
                     teacher_mask=to(given_mask)),
         _functional_run(module, model, *args, to(given_mask)))
    # 0 < ratio < 1: the mask comes from the module's generator (reference: self.rng;
    # torch_impl: torch's default generator), with column 0 True.
    if module is ref:
        drawn = copy.deepcopy(model.rng).random(shape) < 0.5
    else:
        torch.manual_seed(5)
        drawn = (torch.rand(shape) < 0.5).numpy()
        torch.manual_seed(5)
    drawn[:, 0] = True
    same(_module_run(module, model, *args, teacher_forcing_ratio=0.5),
         _functional_run(module, model, *args, to(drawn)))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_bad_teacher_forcing_raises_errors_naming_the_argument(module, to, factory) -> None:
    config = module.Seq2SeqConfig(5, 6, 3, 2, 1, "lstm", False, "bahdanau")
    model = module.Seq2Seq(config, **factory)
    src, lengths, tgt_in = to(np.array([[1, 2, 3], [4, 0, 0]])), to(np.array([3, 1])), \
        to(np.array([[1, 2], [3, 4]]))
    mask = np.array([[True, False], [True, True]])
    with pytest.raises(TypeError, match="teacher_mask"):
        model(src, lengths, tgt_in, teacher_mask=to(mask.astype(np.int64)))   # not bool
    with pytest.raises(TypeError, match="teacher_mask"):
        model(src, lengths, tgt_in, teacher_mask=mask.tolist())
    with pytest.raises(ValueError, match="teacher_mask"):
        model(src, lengths, tgt_in, teacher_mask=to(mask[:, :1]))             # (2, 1) != (2, 2)
    with pytest.raises(ValueError, match="teacher_mask"):
        model(src, lengths, tgt_in, teacher_mask=to(mask[:1]))                # (1, 2) != (2, 2)
    with pytest.raises(ValueError, match="teacher_mask.*column 0"):
        model(src, lengths, tgt_in, teacher_mask=to(~mask))                   # row 1 False at 0
    with pytest.raises(ValueError, match="teacher_forcing_ratio"):
        model(src, lengths, tgt_in, teacher_forcing_ratio=1.5)
    with pytest.raises(ValueError, match="teacher_forcing_ratio"):
        model(src, lengths, tgt_in, teacher_forcing_ratio=-0.1)
    with pytest.raises(TypeError, match="teacher_forcing_ratio"):
        model(src, lengths, tgt_in, teacher_forcing_ratio="0.5")
    params = dict(model.state_dict())
    with pytest.raises(ValueError, match="teacher_mask.*column 0"):
        module.seq2seq_forward(src, lengths, tgt_in, params, config,
                               teacher_mask=to(np.zeros((2, 2), dtype=bool)))


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


# ----------------------------------------------------------------------------- dropout

@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS),
       attention=st.sampled_from(ATTENTIONS), bidirectional=st.booleans(),
       masked=st.booleans())
@example(shape=THIN, cell="lstm", attention="bahdanau", bidirectional=True, masked=True)
@example(shape=THIN, cell="gru", attention="general", bidirectional=False, masked=True)
@example(shape=THIN, cell="lstm", attention=None, bidirectional=True, masked=False)
def test_dropout_torch_impl_float64_matches_reference_with_the_same_masks(
        shape: Seq2SeqShape, cell: str, attention: str | None, bidirectional: bool,
        masked: bool) -> None:
    # The one-call decoder (Luong or none, no teacher_mask) and the step-by-step decoder
    # (Bahdanau, or a teacher_mask with a False), functional and module (training mode).
    inputs = with_dropout(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    if masked:
        inputs = with_teacher_mask(inputs)
    expected = run_reference(inputs)
    assume(argmax_gap(expected.logits, inputs.teacher_mask) > ARGMAX_GAP)  # see ARGMAX_GAP
    assert_runs_close(run_torch_functional(inputs, torch.float64), expected, TORCH64_VS_REF64)
    assert_runs_close(run_torch_module(inputs, torch.float64), expected, TORCH64_VS_REF64)


@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS),
       attention=st.sampled_from(ONE_CALL_ATTENTIONS), bidirectional=st.booleans())
@example(shape=THIN, cell="gru", attention="concat", bidirectional=True)
def test_dropout_step_by_step_decoder_reads_column_t_of_the_masks_like_the_one_call_decoder(
        shape: Seq2SeqShape, cell: str, attention: str | None, bidirectional: bool) -> None:
    inputs = with_dropout(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    assert_runs_close(run_reference_steps(inputs), run_reference(inputs), FLOAT64_REORDERED)
    assert_runs_close(run_torch_steps(inputs), run_torch_functional(inputs, torch.float64),
                      FLOAT64_REORDERED)


@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS),
       attention=st.sampled_from(ATTENTIONS), bidirectional=st.booleans(),
       masked=st.booleans())
@example(shape=THIN, cell="lstm", attention="bahdanau", bidirectional=True, masked=True)
@example(shape=THIN, cell="gru", attention="dot", bidirectional=False, masked=False)
def test_dropout_reference_backward_matches_finite_differences(
        shape: Seq2SeqShape, cell: str, attention: str | None, bidirectional: bool,
        masked: bool) -> None:
    inputs = with_dropout(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    if masked:
        inputs = with_teacher_mask(inputs)
    assume(argmax_gap(run_reference(inputs).logits, inputs.teacher_mask) > ARGMAX_GAP)
    assert_reference_matches_finite_differences(inputs)


def _fold_dropout_scale(params: dict, case: Seq2SeqCase) -> dict:
    """The params with 1 / (1 - p) moved into the weights that read each dropout site: the
    embeddings, the input weights of every layer above the first, and the head."""
    scale = 1.0 / (1.0 - case.dropout)
    scaled = ("encoder.embedding.weight", "decoder.embedding.weight", "decoder.head.weight")
    layers = [f"rnn.weight_ih_l{k}" for k in range(1, case.layers)]
    layers += [name + "_reverse" for name in layers]
    return {name: p * scale if name in scaled or name.split(".", 1)[1] in layers else p
            for name, p in params.items()}


@given(shape=seq2seq_shapes(), cell=st.sampled_from(CELLS),
       attention=st.sampled_from(ATTENTIONS), bidirectional=st.booleans())
@example(shape=THIN, cell="lstm", attention="bahdanau", bidirectional=True)
def test_all_true_dropout_masks_equal_no_dropout_with_the_scale_in_the_weights(
        shape: Seq2SeqShape, cell: str, attention: str | None, bidirectional: bool) -> None:
    inputs = with_dropout(make_inputs(seq2seq_case(cell, attention, bidirectional, shape)))
    keep_all = {site: np.ones_like(m) for site, m in inputs.dropout_masks.items()}
    kept = inputs._replace(dropout_masks=keep_all)
    no_dropout = inputs._replace(case=inputs.case._replace(dropout=0.0), dropout_masks=None,
                                 params=_fold_dropout_scale(inputs.params, inputs.case))
    for run in (run_reference, lambda i: run_torch_functional(i, torch.float64)):
        actual, expected = run(kept), run(no_dropout)
        assert_close(actual.logits, expected.logits, FLOAT64_REORDERED.forward, "logits")
        assert_close(actual.loss, expected.loss, FLOAT64_REORDERED.forward, "loss")


def test_dropout_mask_shapes_are_the_same_in_both_backends() -> None:
    config = dict(src_vocab=5, tgt_vocab=6, embed_size=3, hidden_size=2, num_layers=3,
                  cell="gru", bidirectional=True, attention="bahdanau", dropout=0.2)
    shapes = ref.seq2seq_dropout_mask_shapes(ref.Seq2SeqConfig(**config), 4, 5, 6)
    assert shapes == tim.seq2seq_dropout_mask_shapes(tim.Seq2SeqConfig(**config), 4, 5, 6)
    assert shapes == {"encoder.embedding": (4, 5, 3), "encoder.rnn.l0": (4, 5, 4),
                      "encoder.rnn.l1": (4, 5, 4), "decoder.embedding": (4, 6, 3),
                      "decoder.rnn.l0": (4, 6, 4), "decoder.rnn.l1": (4, 6, 4),
                      "decoder.output": (4, 6, 4)}


def _dropout_model(module, factory, attention: str):
    config = module.Seq2SeqConfig(5, 6, 3, 2, 2, "lstm", True, attention, 0.5)
    model = module.Seq2Seq(config, **factory)
    rng = np.random.default_rng(4)
    args = (rng.integers(0, 5, (3, 4)), np.array([4, 2, 1]), rng.integers(0, 6, (3, 5)),
            rng.integers(0, 6, (3, 5)))
    return model, args


@pytest.mark.parametrize("attention", ["general", "bahdanau"])
@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_module_draws_dropout_masks_in_training_mode_only(module, to, factory,
                                                          attention: str) -> None:
    model, args = _dropout_model(module, factory, attention)
    args = tuple(map(to, args))
    src, lengths, tgt_in, targets = args
    p = model.config.dropout
    shapes = module.seq2seq_dropout_mask_shapes(model.config, 3, 4, 5)

    def seed(n: int) -> None:   # the module's generator (reference: self.rng; torch: global)
        if module is ref:
            model.rng = np.random.default_rng(n)
        else:
            torch.manual_seed(n)

    def same(actual: tuple, expected: tuple) -> None:
        assert_close(actual[0], expected[0], FLOAT64_REORDERED.forward, "logits")
        assert_close(actual[1], expected[1], FLOAT64_REORDERED.forward, "loss")
        assert_all_close(actual[2], expected[2], FLOAT64_REORDERED.gradient, "d")

    # Training mode: masks drawn from the module's generator, one per site in the order of
    # seq2seq_dropout_mask_shapes, and the hand-written backward applies them.
    seed(3)
    if module is ref:
        rng = copy.deepcopy(model.rng)
        drawn = {site: rng.random(shape) >= p for site, shape in shapes.items()}
    else:
        drawn = {site: torch.empty(shape).bernoulli_(1.0 - p).bool()
                 for site, shape in shapes.items()}
        seed(3)
    train = _module_run(module, model, *args)
    params = dict(model.state_dict())
    (logits, loss), cache = module.seq2seq_forward(src, lengths, tgt_in, params, model.config,
                                                   targets, dropout_masks=drawn)
    same(train, (logits, loss, module.seq2seq_backward(cache)))
    seed(3)
    same(_module_run(module, model, *args), train)           # the same seed, the same masks
    # Eval mode: no dropout, given masks ignored, the same as a model with dropout 0.
    model.eval()
    evaluated = _module_run(module, model, *args, dropout_masks=drawn)
    assert relative_error(to_numpy(evaluated[0]), to_numpy(train[0])) > 1e-3
    no_dropout = dataclasses.replace(model.config, dropout=0.0)
    (logits, loss), cache = module.seq2seq_forward(src, lengths, tgt_in, params, no_dropout,
                                                   targets)
    same(evaluated, (logits, loss, module.seq2seq_backward(cache)))
    # encode / step never drop, in training mode too.
    model.train()
    state = model.encode(src, lengths)
    for t in range(tgt_in.shape[1]):
        step_logits, state = model.step(tgt_in[:, t], state)
        assert_close(step_logits, evaluated[0][:, t], FLOAT64_REORDERED.forward,
                     f"logits[:, {t}]")


@pytest.mark.parametrize("module,to,factory", BACKENDS, ids=["reference", "torch_impl"])
def test_bad_dropout_raises_errors_naming_the_argument(module, to, factory) -> None:
    model, args = _dropout_model(module, factory, "general")
    src, lengths, tgt_in, targets = map(to, args)
    config, params = model.config, dict(model.state_dict())
    good = {site: to(np.ones(shape, dtype=bool))
            for site, shape in module.seq2seq_dropout_mask_shapes(config, 3, 4, 5).items()}

    def forward(masks, config=config):
        return module.seq2seq_forward(src, lengths, tgt_in, params, config, targets,
                                      dropout_masks=masks)

    forward(good)
    with pytest.raises(ValueError, match="dropout_masks.*required"):
        forward(None)
    with pytest.raises(ValueError, match="dropout_masks.*missing.*decoder.output"):
        forward({k: v for k, v in good.items() if k != "decoder.output"})
    with pytest.raises(ValueError, match="dropout_masks.*unexpected.*encoder.rnn.l1"):
        forward(dict(good, **{"encoder.rnn.l1": good["encoder.rnn.l0"]}))
    with pytest.raises(ValueError, match=r"dropout_masks\['decoder.embedding'\].*shape"):
        forward(dict(good, **{"decoder.embedding": good["decoder.embedding"][:, :4]}))
    with pytest.raises(TypeError, match=r"dropout_masks\['encoder.rnn.l0'\].*bool"):
        forward(dict(good, **{"encoder.rnn.l0": to(np.ones((3, 4, 4)))}))
    with pytest.raises(TypeError, match="dropout_masks"):
        forward(list(good.values()))
    with pytest.raises(ValueError, match="dropout_masks.*dropout == 0"):
        forward(good, dataclasses.replace(config, dropout=0.0))
    with pytest.raises(ValueError, match="dropout_masks"):   # the module checks given masks
        model(src, lengths, tgt_in, dropout_masks={"decoder.output": good["decoder.output"]})
    with pytest.raises(ValueError, match="dropout"):
        module.Seq2SeqConfig(5, 6, 3, 2, dropout=1.0)
    with pytest.raises(TypeError, match="dropout"):
        module.Seq2SeqConfig(5, 6, 3, 2, dropout="0.1")
    with pytest.raises(ValueError, match="batch"):
        module.seq2seq_dropout_mask_shapes(config, 0, 4, 5)
