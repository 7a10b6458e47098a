"""decoding: greedy, sampling and beam search, reference vs torch_impl on a toy Markov model, and
properties of each decoder (beam 1 = greedy, exhaustive beam = brute force, batch = single runs,
sampled frequencies = softmax, bad input)."""

from __future__ import annotations

import itertools
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference.decoding as ref
import torch_impl.decoding as tim
from parity_tests.parity import assert_close
from parity_tests.strategies import seeds
from parity_tests.tolerances import FLOAT64_REORDERED, TORCH64_VS_REF64
from reference.activations import log_softmax, softmax


class Markov(NamedTuple):
    """A second-order Markov "language model": logits_t = table[prev, token] + time_bias[t % 2]."""
    table: np.ndarray      # (V, V, V)
    time_bias: np.ndarray  # (2, V)
    prev: np.ndarray       # (B,) the token before bos, per prompt
    bos: np.ndarray        # (B,)

    @property
    def vocab(self) -> int:
        return self.table.shape[0]


def make_markov(seed: int, vocab: int, batch: int, scale: float = 2.0) -> Markov:
    rng = np.random.default_rng(seed)
    return Markov(scale * rng.standard_normal((vocab, vocab, vocab)),
                  rng.standard_normal((2, vocab)),
                  rng.integers(0, vocab, batch), rng.integers(0, vocab, batch))


def ref_model(m: Markov) -> tuple[Any, dict, np.ndarray]:
    def step(tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        logits = m.table[state["prev"], tokens] + m.time_bias[state["t"] % 2]
        return logits, {"prev": tokens, "t": state["t"] + 1}
    return step, {"prev": m.prev, "t": np.zeros(len(m.bos), dtype=np.int64)}, m.bos


def torch_model(m: Markov) -> tuple[Any, dict, torch.Tensor]:
    table, time_bias = torch.from_numpy(m.table), torch.from_numpy(m.time_bias)

    def step(tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        logits = table[state["prev"], tokens] + time_bias[state["t"] % 2]
        return logits, {"prev": tokens, "t": state["t"] + 1}
    return step, {"prev": torch.from_numpy(m.prev), "t": torch.zeros(len(m.bos),
                                                                     dtype=torch.int64)}, \
        torch.from_numpy(m.bos)


def assert_same_result(actual: Any, expected: Any, name: str) -> None:
    """Tokens and lengths equal elementwise; scores within the float64 budget (-inf slots equal)."""
    tokens, lengths, scores = (np.asarray(a) for a in actual)
    np.testing.assert_array_equal(tokens, np.asarray(expected.tokens), err_msg=f"{name} tokens")
    np.testing.assert_array_equal(lengths, np.asarray(expected.lengths),
                                  err_msg=f"{name} lengths")
    expected_scores = np.asarray(expected.scores)
    finite = np.isfinite(expected_scores)
    np.testing.assert_array_equal(np.isfinite(scores), finite, err_msg=f"{name} empty slots")
    assert_close(scores[finite], expected_scores[finite], TORCH64_VS_REF64.forward,
                 f"{name} scores")


def eos_ids(vocab: int) -> st.SearchStrategy[int | None]:
    return st.one_of(st.none(), st.integers(0, vocab - 1))


@st.composite
def decode_cases(draw: st.DrawFn, max_vocab: int = 6, max_batch: int = 3,
                 max_steps: int = 5) -> tuple[Markov, int, int | None]:
    vocab = draw(st.integers(2, max_vocab))
    markov = make_markov(draw(seeds), vocab, draw(st.integers(1, max_batch)))
    return markov, draw(st.integers(1, max_steps)), draw(eos_ids(vocab))


# ---------------------------------------------------------------- reference vs torch_impl


@given(decode_cases())
@example((make_markov(0, 2, 1), 1, None))
@example((make_markov(1, 2, 1), 1, 1))
def test_greedy_matches_reference(case: tuple[Markov, int, int | None]) -> None:
    markov, steps, eos_id = case
    expected = ref.greedy_decode(*ref_model(markov), steps, eos_id=eos_id)
    actual = tim.greedy_decode(*torch_model(markov), steps, eos_id=eos_id)
    assert_same_result(actual, expected, "greedy")


@given(decode_cases(), seeds, st.sampled_from([0.5, 1.0, 2.0]),
       st.one_of(st.none(), st.integers(1, 6)),
       st.one_of(st.none(), st.sampled_from([0.3, 0.7, 0.9, 1.0])))
def test_sampling_with_same_uniforms_matches_reference(
        case: tuple[Markov, int, int | None], seed: int, temperature: float,
        top_k: int | None, top_p: float | None) -> None:
    markov, steps, eos_id = case
    uniforms = np.random.default_rng(seed).random((len(markov.bos), steps))
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    expected = ref.sample_decode(*ref_model(markov), steps, uniforms=uniforms, **kwargs)
    actual = tim.sample_decode(*torch_model(markov), steps, uniforms=torch.from_numpy(uniforms),
                               **kwargs)
    assert_same_result(actual, expected, "sample")


@given(decode_cases(), st.integers(1, 5), st.sampled_from([0.0, 0.6, 1.0, 2.0]), st.data())
@example((make_markov(2, 2, 1), 1, None), 1, 1.0, None)
def test_beam_search_matches_reference(case: tuple[Markov, int, int | None], beam_size: int,
                                       length_penalty: float, data: st.DataObject | None) -> None:
    markov, steps, eos_id = case
    n_best = data.draw(st.integers(1, beam_size)) if data is not None else 1
    kwargs = dict(eos_id=eos_id, length_penalty=length_penalty, n_best=n_best)
    expected = ref.beam_search(*ref_model(markov), steps, beam_size, **kwargs)
    actual = tim.beam_search(*torch_model(markov), steps, beam_size, **kwargs)
    assert_same_result(actual, expected, "beam")


# ---------------------------------------------------------------- properties, both backends

BACKENDS = [pytest.param((ref, ref_model), id="reference"),
            pytest.param((tim, torch_model), id="torch_impl")]


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases(), length_penalty=st.sampled_from([0.0, 1.0]))
def test_beam_size_one_equals_greedy(backend: tuple, case: tuple[Markov, int, int | None],
                                     length_penalty: float) -> None:
    """Without EOS any length penalty; with EOS only α = 0, since beam search keeps the EOS
    hypothesis in its pool and may still find a better-normalised longer one."""
    lib, model = backend
    markov, steps, eos_id = case
    if eos_id is not None:
        length_penalty = 0.0
    greedy = lib.greedy_decode(*model(markov), steps, eos_id=eos_id)
    beam = lib.beam_search(*model(markov), steps, 1, eos_id=eos_id,
                           length_penalty=length_penalty)
    np.testing.assert_array_equal(np.asarray(beam.tokens[:, 0]), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(beam.lengths[:, 0]), np.asarray(greedy.lengths))
    normaliser = np.asarray(greedy.lengths, dtype=np.float64) ** length_penalty
    assert_close(np.asarray(beam.scores[:, 0]), np.asarray(greedy.scores) / normaliser,
                 FLOAT64_REORDERED.forward, "beam 1 scores")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases(), seed=seeds, temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_top_k_one_sampling_equals_greedy(backend: tuple, case: tuple[Markov, int, int | None],
                                          seed: int, temperature: float) -> None:
    lib, model = backend
    markov, steps, eos_id = case
    greedy = lib.greedy_decode(*model(markov), steps, eos_id=eos_id)
    sampled = lib.sample_decode(*model(markov), steps, temperature=temperature, top_k=1,
                                eos_id=eos_id, seed=seed)
    assert_same_result(sampled, greedy, "top_k=1")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases(), seed=seeds)
def test_small_temperature_sampling_equals_greedy(backend: tuple,
                                                  case: tuple[Markov, int, int | None],
                                                  seed: int) -> None:
    lib, model = backend
    markov, steps, eos_id = case
    greedy = lib.greedy_decode(*model(markov), steps, eos_id=eos_id)
    sampled = lib.sample_decode(*model(markov), steps, temperature=1e-6, eos_id=eos_id,
                                seed=seed)
    assert_same_result(sampled, greedy, "temperature 1e-6")


def single_rows(markov: Markov) -> list[Markov]:
    return [markov._replace(prev=markov.prev[i:i + 1], bos=markov.bos[i:i + 1])
            for i in range(len(markov.bos))]


def stack_results(results: list[Any]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([np.asarray(r[f]) for r in results]) for f in range(3))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases(max_batch=4), seed=seeds, beam_size=st.integers(1, 4))
def test_batch_of_prompts_equals_single_runs(backend: tuple, case: tuple[Markov, int, int | None],
                                             seed: int, beam_size: int) -> None:
    lib, model = backend
    markov, steps, eos_id = case
    uniforms = np.random.default_rng(seed).random((len(markov.bos), steps))
    to_backend = (lambda a: a) if lib is ref else torch.from_numpy
    runs = {
        "greedy": lambda m, rows: lib.greedy_decode(*model(m), steps, eos_id=eos_id),
        "sample": lambda m, rows: lib.sample_decode(*model(m), steps, top_p=0.8, eos_id=eos_id,
                                                    uniforms=to_backend(uniforms[rows])),
        "beam": lambda m, rows: lib.beam_search(*model(m), steps, beam_size, eos_id=eos_id,
                                                n_best=beam_size),
    }
    for name, run in runs.items():
        batched = run(markov, slice(None))
        singles = stack_results([run(m, slice(i, i + 1))
                                 for i, m in enumerate(single_rows(markov))])
        assert_same_result(singles, batched, f"{name} single vs batch")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=decode_cases(), beam_size=st.integers(2, 6))
def test_beam_hypotheses_are_distinct_and_sorted(backend: tuple,
                                                 case: tuple[Markov, int, int | None],
                                                 beam_size: int) -> None:
    lib, model = backend
    markov, steps, eos_id = case
    result = lib.beam_search(*model(markov), steps, beam_size, eos_id=eos_id, n_best=beam_size)
    tokens, lengths, scores = (np.asarray(a) for a in result)
    assert np.all(scores[:, :-1] >= scores[:, 1:]), f"scores not sorted: {scores}"
    for b in range(len(markov.bos)):
        hyps = [tuple(tokens[b, k, :lengths[b, k]]) for k in range(beam_size) if lengths[b, k]]
        assert len(set(hyps)) == len(hyps), f"row {b}: duplicate hypotheses {hyps}"
        # as many as exist: sequences of length <= T, stopping at the first EOS
        possible = len({h[:h.index(eos_id) + 1] if eos_id in h else h
                        for h in itertools.product(range(markov.vocab), repeat=steps)})
        assert len(hyps) == min(beam_size, possible)


def brute_force(markov: Markov, steps: int, eos_id: int | None,
                length_penalty: float) -> list[tuple[tuple[int, ...], float]]:
    """Every hypothesis of prompt 0 (sequences cut at their first EOS), best first."""
    sequences = np.array(list(itertools.product(range(markov.vocab), repeat=steps)))
    count = len(sequences)
    everyone = markov._replace(prev=np.repeat(markov.prev[:1], count),
                               bos=np.repeat(markov.bos[:1], count))
    step, state, inputs = ref_model(everyone)
    logp = np.zeros((count, steps))
    for t in range(steps):
        logits, state = step(inputs, state)
        logp[:, t] = log_softmax(logits)[np.arange(count), sequences[:, t]]
        inputs = sequences[:, t]
    hypotheses = {}
    for seq, lp in zip(sequences.tolist(), logp):
        length = seq.index(eos_id) + 1 if eos_id in seq else steps
        hypotheses[tuple(seq[:length])] = lp[:length].sum() / length ** length_penalty
    return sorted(hypotheses.items(), key=lambda item: -item[1])


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, vocab=st.integers(3, 4), steps=st.integers(3, 4),
       length_penalty=st.sampled_from([0.0, 0.7, 1.0, 2.0]), data=st.data())
def test_exhaustive_beam_search_finds_brute_force_best(backend: tuple, seed: int, vocab: int,
                                                       steps: int, length_penalty: float,
                                                       data: st.DataObject) -> None:
    lib, model = backend
    eos_id = data.draw(eos_ids(vocab))
    markov = make_markov(seed, vocab, 1)
    n_best = 3
    result = lib.beam_search(*model(markov), steps, vocab ** steps, eos_id=eos_id,
                             length_penalty=length_penalty, n_best=n_best)
    tokens, lengths, scores = (np.asarray(a) for a in result)
    best = brute_force(markov, steps, eos_id, length_penalty)[:n_best]
    found = [tuple(tokens[0, k, :lengths[0, k]].tolist()) for k in range(n_best)]
    assert found == [hyp for hyp, _ in best]
    assert_close(scores[0], np.array([score for _, score in best]), FLOAT64_REORDERED.forward,
                 "exhaustive beam scores")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k, top_p", [(None, None), (2, None), (None, 0.6)])
def test_sampled_first_token_frequencies_match_filtered_softmax(backend: tuple,
                                                                top_k: int | None,
                                                                top_p: float | None) -> None:
    lib, model = backend
    rows, vocab = 20000, 5
    markov = make_markov(7, vocab, 1, scale=1.0)
    markov = markov._replace(prev=np.repeat(markov.prev, rows), bos=np.repeat(markov.bos, rows))
    result = lib.sample_decode(*model(markov), 1, top_k=top_k, top_p=top_p, seed=11)
    frequencies = np.bincount(np.asarray(result.tokens[:, 0]), minlength=vocab) / rows
    p = softmax(markov.table[markov.prev[0], markov.bos[0]] + markov.time_bias[0])
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    kept = np.zeros(vocab, dtype=bool)
    kept[order[:top_k] if top_k else order[mass_before < (top_p or 2.0)]] = True
    expected = np.where(kept, p, 0.0) / p[kept].sum()
    # 20000 draws: standard error <= 0.0036 per token, so 0.02 is over 5 standard errors
    np.testing.assert_allclose(frequencies, expected, atol=0.02)
    assert np.all(frequencies[~kept] == 0), "a filtered token was sampled"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["greedy", "sample", "beam"])
def test_huge_logits_decode_without_warnings(backend: tuple, decoder: str) -> None:
    """Batch 1, one new token, V = 2, logits ±1e4: no overflow, no NaN."""
    lib, model = backend
    markov = Markov(1e4 * np.array([[[1.0, -1.0], [-1.0, 1.0]], [[-1.0, 1.0], [1.0, -1.0]]]),
                    np.zeros((2, 2)), np.array([0]), np.array([1]))
    # underflow of e^{-2e4} to 0 is expected and harmless; overflow, 0/0 and log 0 are not
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        if decoder == "greedy":
            result = lib.greedy_decode(*model(markov), 1, eos_id=1)
        elif decoder == "sample":
            result = lib.sample_decode(*model(markov), 1, top_p=0.5, eos_id=1, seed=0)
        else:
            result = lib.beam_search(*model(markov), 1, 2, eos_id=1, n_best=2)
    tokens, _, scores = (np.asarray(a) for a in result)
    assert tokens.reshape(-1)[0] == 1  # table[prev 0, bos 1] favours token 1 by 2e4
    assert np.isfinite(scores.reshape(-1)[0]) and scores.reshape(-1)[0] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_freezes_a_row_after_eos(backend: tuple) -> None:
    lib, model = backend
    # every token's most likely successor is token 2 = EOS, except after bos 0 (prefers 1)
    table = np.full((3, 3, 3), -5.0)
    table[:, :, 2] = 0.0
    table[:, 0, 1] = 1.0
    markov = Markov(table, np.zeros((2, 3)), np.array([0, 0]), np.array([0, 1]))
    result = lib.greedy_decode(*model(markov), 4, eos_id=2)
    np.testing.assert_array_equal(np.asarray(result.tokens), [[1, 2, 2, 2], [2, 2, 2, 2]])
    np.testing.assert_array_equal(np.asarray(result.lengths), [2, 1])


# ---------------------------------------------------------------- bad input

BAD_INPUTS = [
    ("beam", dict(beam_size=0), ValueError, "beam_size"),
    ("beam", dict(beam_size=2, n_best=3), ValueError, "n_best"),
    ("beam", dict(beam_size=2, length_penalty=float("nan")), ValueError, "length_penalty"),
    ("greedy", dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("greedy", dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    ("greedy", dict(eos_id=3), ValueError, "eos_id"),
    ("sample", dict(temperature=0.0), ValueError, "temperature"),
    ("sample", dict(temperature=-1.0), ValueError, "temperature"),
    ("sample", dict(top_k=0), ValueError, "top_k"),
    ("sample", dict(top_p=0.0), ValueError, "top_p"),
    ("sample", dict(top_p=1.5), ValueError, "top_p"),
    ("sample", dict(uniforms=np.full((2, 3), 0.5)), ValueError, "uniforms"),
    ("sample", dict(uniforms=np.full((1, 2), 1.0)), ValueError, "uniforms"),
    ("sample", dict(uniforms=np.full((1, 2), -0.1)), ValueError, "uniforms"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder, kwargs, error, argument", BAD_INPUTS)
def test_bad_arguments_raise_naming_the_argument(backend: tuple, decoder: str, kwargs: dict,
                                                 error: type, argument: str) -> None:
    lib, model = backend
    markov = make_markov(0, 3, 1)
    kwargs = {"max_new_tokens": 2, **kwargs}
    if "uniforms" in kwargs and lib is tim:
        kwargs["uniforms"] = torch.from_numpy(kwargs["uniforms"])
    decode = {"greedy": lib.greedy_decode, "sample": lib.sample_decode,
              "beam": lib.beam_search}[decoder]
    with pytest.raises(error, match=argument):
        decode(*model(markov), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bos_out_of_vocabulary_raises_at_first_logits(backend: tuple) -> None:
    lib, model = backend
    markov = make_markov(0, 3, 2)
    step, state, bos = model(markov)
    bos = bos.clone() if lib is tim else bos.copy()
    bos[1] = 3

    def clamped(tokens: Any, s: dict) -> tuple[Any, dict]:  # the model itself would not fail
        return step(tokens.clamp(max=2) if lib is tim else np.minimum(tokens, 2), s)
    with pytest.raises(ValueError, match="bos"):
        lib.greedy_decode(clamped, state, bos, 2)
    with pytest.raises(ValueError, match="bos"):
        lib.beam_search(clamped, state, bos, 2, 2)
    with pytest.raises(TypeError, match="bos"):
        lib.sample_decode(step, state, bos * 1.0, 2, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["greedy", "sample", "beam"])
def test_non_finite_logits_raise(backend: tuple, decoder: str) -> None:
    lib, model = backend
    markov = make_markov(0, 3, 2)
    markov.table[:, :, 1] = np.nan
    step, state, bos = model(markov)
    with pytest.raises(ValueError, match="logits"):
        if decoder == "greedy":
            lib.greedy_decode(step, state, bos, 2)
        elif decoder == "sample":
            lib.sample_decode(step, state, bos, 2, seed=0)
        else:
            lib.beam_search(step, state, bos, 2, 2)


# ----------------------------------------------------------------------------- stable top-k

@given(data=st.data(), rows=st.integers(1, 3), width=st.integers(1, 40))
@example(data=None, rows=1, width=1)
def test_stable_top_equals_a_full_stable_sort(data, rows: int, width: int) -> None:
    """Beam search's selection (torch_impl.decoding._stable_top, topk plus a small sort) picks
    what numpy's stable argsort of the whole row picks (the reference's rule): the k best,
    best first, ties by lower index, -inf included."""
    if data is None:  # the explicit example: one entry
        x, k = np.array([[-np.inf]]), 1
    else:
        # few distinct values, so ties are common; -inf as EOS-masked candidates are
        x = np.array(data.draw(st.lists(st.sampled_from([-np.inf, -2.0, -1.0, -0.5, 0.0]),
                                        min_size=rows * width, max_size=rows * width)),
                     dtype=np.float64).reshape(rows, width)
        k = data.draw(st.integers(1, width))
    expected = np.argsort(-x, axis=1, kind="stable")[:, :k]
    actual = tim._stable_top(torch.from_numpy(x), k).numpy()
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("backend", ["reference", "torch_impl"])
def test_sample_tokens_refuses_bad_arguments_naming_them(backend: str) -> None:
    """Each of these once returned tokens, -1 ids or a broadcasting error."""
    sq = ref if backend == "reference" else tim
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    logits, u = wrap(np.array([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]])), wrap(np.array([0.3, 0.9]))
    bad = [({"temperature": 0.0}, ValueError, "temperature"),
           ({"temperature": -1.0}, ValueError, "temperature"),
           ({"top_k": 0}, ValueError, "top_k"),
           ({"top_p": 0.0}, ValueError, "top_p"),
           ({"top_p": 1.5}, ValueError, "top_p")]
    for options, error, name in bad:
        with pytest.raises(error, match=name):
            sq.sample_tokens(logits, u, **options)
    with pytest.raises(ValueError, match="logits: contains NaN"):
        sq.sample_tokens(wrap(np.full((2, 3), np.nan)), u)
    with pytest.raises(ValueError, match="every row needs a finite value"):
        sq.sample_tokens(wrap(np.array([[0.0, 1.0, 2.0], [-np.inf] * 3])), u)
    with pytest.raises(ValueError, match="u: expected shape"):
        sq.sample_tokens(logits, wrap(np.array([0.1, 0.2, 0.3])))
    with pytest.raises(ValueError, match="u: values must lie in"):
        sq.sample_tokens(logits, wrap(np.array([0.1, 1.0])))
    # -inf marks a banned token and stays allowed
    tokens = sq.sample_tokens(wrap(np.array([[-np.inf, 1.0, 0.0], [0.0, -np.inf, 5.0]])), u)
    assert np.asarray(tokens).tolist() == [1, 2]
