"""Decoders on the step interface: greedy, sampling (temperature, top-k, top-p), beam search.

A model offers ``step(tokens (N,) int, state) -> (logits (N, V), state)``; a state is any nested
tuple / list / dict / NamedTuple of arrays with the batch on axis 0 (``select_rows`` reorders it).
Every decoder feeds ``bos`` first, then its own choices; every score is a sum of the model's
log-probabilities ``log softmax(logits_t)[y_t]`` (temperature 1, no filtering) over the generated
tokens, the EOS token included, nothing after it. Scores accumulate in float64.

Sampling is driven by explicit uniforms ``u (B, T)`` in [0, 1): at step t, row b,

    z        = logits / temperature
    p        = softmax(z)
    rank     = position in the order of decreasing z, ties broken by the lower token index
    top-k:     keep i iff rank_i < k
    top-p:     over the kept tokens renormalised, p' sorted by rank: keep i iff the mass of the
               tokens ranked before it is < top_p (the smallest prefix with mass >= top_p; the
               first token is always kept)
    q        = p on the kept tokens, renormalised;  c_i = Σ_{j <= i} q_j  (token index order)
    y        = min(#{i : c_i <= u}, last kept index)     (inverse CDF: the first i with c_i > u)

Beam search keeps ``beam_size`` live hypotheses per row. Each step scores every extension
``s + log p`` (ties: lower beam, then lower token index); the EOS extensions among the
``beam_size`` best go to the row's pool of finished hypotheses with score
``s / L ** length_penalty`` (L = generated length, the EOS counted), and the ``beam_size`` best
non-EOS extensions stay live (as in fairseq / Hugging Face, which take the top 2 * beam_size).
A row stops once its n_best-th pooled score is >= the best any live beam could still reach
(log-probs are <= 0, so s only decreases); at ``max_new_tokens`` the live beams are pooled as
they are, scored ``s / T ** length_penalty``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from .activations import log_softmax, softmax
from .checks import check_float_array, check_int_array, check_positive_int

Step = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]


class DecodeResult(NamedTuple):
    tokens: np.ndarray   # (B, T) int64; positions after a row's EOS hold eos_id
    lengths: np.ndarray  # (B,) int64; generated tokens up to and including the first EOS
    scores: np.ndarray   # (B,) float64; Σ_t log p(y_t) over the first `lengths` tokens


class BeamResult(NamedTuple):
    tokens: np.ndarray   # (B, n_best, T) int64; after EOS (or in an empty slot): eos_id or 0
    lengths: np.ndarray  # (B, n_best) int64; 0 marks an empty slot (fewer hypotheses exist)
    scores: np.ndarray   # (B, n_best) float64; Σ log p / lengths ** length_penalty, best first


def select_rows(state: Any, index: np.ndarray) -> Any:
    """Rows ``index`` (N,) of every array in a nested tuple/list/dict state (axis 0).

    Leaves that are not arrays (ints, None) are shared by all rows and returned unchanged.
    """
    if isinstance(state, np.ndarray):
        return state[index]
    if isinstance(state, dict):
        return {key: select_rows(value, index) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(select_rows(value, index) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(select_rows(value, index) for value in state)
    return state


def _check_common(bos: object, max_new_tokens: object, eos_id: object) -> int:
    check_int_array("bos", bos, shape=("B",), low=0)
    check_positive_int("max_new_tokens", max_new_tokens)
    if eos_id is not None and (isinstance(eos_id, bool)
                               or not isinstance(eos_id, (int, np.integer))):
        raise TypeError(f"eos_id: expected an int or None, got {type(eos_id).__name__}")
    return bos.shape[0]


def _call_step(step: Step, inputs: np.ndarray, state: Any, rows: int, first: bool,
               bos: np.ndarray, eos_id: int | None) -> tuple[np.ndarray, Any]:
    """One validated model step; at the first one, bos and eos_id are checked against V."""
    logits, state = step(inputs, state)
    check_float_array("logits", logits, shape=(rows, "V"))
    vocab = logits.shape[1]
    if first:
        check_int_array("bos", bos, high=vocab)
        if eos_id is not None and not 0 <= eos_id < vocab:
            raise ValueError(f"eos_id: expected a token id in [0, {vocab}) (V from the logits), "
                             f"got {eos_id}")
    return logits, state


def _decode(step: Step, state: Any, bos: np.ndarray, max_new_tokens: int, eos_id: int | None,
            choose: Callable[[np.ndarray, int], np.ndarray]) -> DecodeResult:
    """The loop shared by greedy and sampling: ``choose(logits, t) -> tokens (B,)``."""
    batch, steps = bos.shape[0], max_new_tokens
    pad = 0 if eos_id is None else eos_id
    tokens = np.full((batch, steps), pad, dtype=np.int64)
    lengths = np.full(batch, steps, dtype=np.int64)
    scores = np.zeros(batch, dtype=np.float64)
    finished = np.zeros(batch, dtype=bool)
    inputs = bos.astype(np.int64)
    for t in range(steps):
        logits, state = _call_step(step, inputs, state, batch, t == 0, bos, eos_id)
        chosen = np.where(finished, pad, choose(logits, t))
        logp = np.take_along_axis(log_softmax(logits.astype(np.float64)), chosen[:, None],
                                  axis=1)[:, 0]
        scores += np.where(finished, 0.0, logp)
        tokens[:, t] = chosen
        if eos_id is not None:
            newly = ~finished & (chosen == eos_id)
            lengths[newly] = t + 1
            finished |= newly
            if finished.all():  # every row frozen: the rest is eos_id already
                break
        inputs = chosen
    return DecodeResult(tokens, lengths, scores)


def greedy_decode(step: Step, state: Any, bos: np.ndarray, max_new_tokens: int,
                  eos_id: int | None = None) -> DecodeResult:
    """y_t = argmax_i logits_t[i] (ties: lower index) for t < max_new_tokens; bos (B,) int.

    A row that emits ``eos_id`` is frozen: its later positions hold eos_id and add no score.
    """
    _check_common(bos, max_new_tokens, eos_id)
    return _decode(step, state, bos, max_new_tokens, eos_id,
                   lambda logits, t: logits.argmax(axis=1))


def _check_sampling(temperature: object, top_k: object, top_p: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p: expected a float, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p}")


def sample_tokens(logits: np.ndarray, u: np.ndarray, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """One inverse-CDF draw per row of logits (N, V) from uniforms u (N,) in [0, 1) (module
    docstring), every argument checked: temperature > 0, top_k None or >= 1, top_p None or in
    (0, 1], logits free of NaN and +inf with a finite value in every row (-inf marks a banned
    token)."""
    check_float_array("logits", logits, shape=("N", "V"), finite=False)
    _check_sampling(temperature, top_k, top_p)
    if np.any(np.isnan(logits) | (logits == np.inf)):
        raise ValueError("logits: contains NaN or +inf")
    if logits.shape[1] == 0 or not np.all(np.isfinite(logits).any(axis=1)):
        raise ValueError("logits: every row needs a finite value (a token that can be drawn)")
    check_float_array("u", u, shape=(logits.shape[0],))
    if u.size and not (u.min() >= 0 and u.max() < 1):
        raise ValueError(f"u: values must lie in [0, 1), got min {u.min()}, max {u.max()}")
    return draw_tokens(logits, u, temperature, top_k, top_p)


def draw_tokens(logits: np.ndarray, u: np.ndarray, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """``sample_tokens`` on trusted arguments (the decoders check them once per call)."""
    vocab = logits.shape[1]
    z = logits / temperature
    p = softmax(z)
    order = np.argsort(-z, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(vocab), order.shape), axis=1)
    keep = np.ones(p.shape, dtype=bool)
    if top_k is not None:
        keep &= rank < top_k
    if top_p is not None:
        kept = np.where(keep, p, 0.0)
        sorted_p = np.take_along_axis(kept / kept.sum(axis=1, keepdims=True), order, axis=1)
        mass_before = np.cumsum(sorted_p, axis=1) - sorted_p
        mass_before[:, 0] = 0.0  # the most likely token is always kept
        keep &= np.take_along_axis(mass_before < top_p, rank, axis=1)
    q = np.where(keep, p, 0.0)
    cdf = np.cumsum(q / q.sum(axis=1, keepdims=True), axis=1)
    count = (cdf <= u[:, None]).sum(axis=1)
    # rounding can leave c_{V-1} a hair below u: fall back to the last kept token
    last_kept = np.where(keep, np.arange(vocab), -1).max(axis=1)
    return np.minimum(count, last_kept).astype(np.int64)


def sample_decode(step: Step, state: Any, bos: np.ndarray, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, eos_id: int | None = None,
                  uniforms: np.ndarray | None = None, seed: int | None = None) -> DecodeResult:
    """Ancestral sampling; y_t = sample_tokens(logits_t, uniforms[:, t], ...).

    ``uniforms`` (B, max_new_tokens) in [0, 1) make the draw explicit (the same uniforms give the
    same tokens in both backends); when None they come from ``np.random.default_rng(seed)``
    (a stream that differs from torch_impl's for the same seed). Column t is consumed at step t
    also by frozen rows. Scores are the model's log-probs (temperature 1, unfiltered).
    """
    batch = _check_common(bos, max_new_tokens, eos_id)
    _check_sampling(temperature, top_k, top_p)
    if uniforms is None:
        uniforms = np.random.default_rng(seed).random((batch, max_new_tokens))
    check_float_array("uniforms", uniforms, shape=(batch, max_new_tokens))
    if uniforms.size and not (uniforms.min() >= 0 and uniforms.max() < 1):
        raise ValueError(f"uniforms: values must lie in [0, 1), got min {uniforms.min()}, "
                         f"max {uniforms.max()}")
    return _decode(step, state, bos, max_new_tokens, eos_id,
                   lambda logits, t: draw_tokens(logits, uniforms[:, t], temperature,
                                                 top_k, top_p))


def _merge_pool(pool: BeamResult, scores: np.ndarray, tokens: np.ndarray,
                length: int) -> BeamResult:
    """Keep the n_best best of the pool and the new hypotheses (B, M); ties keep the older."""
    n_best = pool.scores.shape[1]
    all_scores = np.concatenate([pool.scores, scores], axis=1)
    all_tokens = np.concatenate([pool.tokens, tokens], axis=1)
    all_lengths = np.concatenate([pool.lengths, np.full(scores.shape, length)], axis=1)
    best = np.argsort(-all_scores, axis=1, kind="stable")[:, :n_best]
    return BeamResult(np.take_along_axis(all_tokens, best[:, :, None], axis=1),
                      np.take_along_axis(all_lengths, best, axis=1),
                      np.take_along_axis(all_scores, best, axis=1))


def beam_search(step: Step, state: Any, bos: np.ndarray, max_new_tokens: int, beam_size: int,
                eos_id: int | None = None, length_penalty: float = 1.0, n_best: int = 1,
                select_state: Callable[[Any, np.ndarray], Any] = select_rows) -> BeamResult:
    """Batched beam search (module docstring): one step call of B * beam_size rows per step.

    Row b * beam_size + k of the model's batch is beam k of prompt b. Only beam 0 is live at the
    start (the others score -inf), so the first step expands one beam into distinct ones.
    Hypotheses are distinct; if fewer than n_best exist, the empty slots score -inf, length 0.
    """
    batch = _check_common(bos, max_new_tokens, eos_id)
    beams = check_positive_int("beam_size", beam_size)
    check_positive_int("n_best", n_best)
    if n_best > beams:
        raise ValueError(f"n_best: expected at most beam_size ({beams}), got {n_best}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty: expected a float, got {type(length_penalty).__name__}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite value, got {length_penalty}")
    steps, alpha = max_new_tokens, float(length_penalty)
    pad = 0 if eos_id is None else eos_id
    rows = np.arange(batch)[:, None]
    state = select_state(state, np.repeat(np.arange(batch), beams))
    inputs = np.repeat(bos.astype(np.int64), beams)
    beam_scores = np.full((batch, beams), -np.inf)
    beam_scores[:, 0] = 0.0
    history = np.full((batch, beams, steps), pad, dtype=np.int64)
    pool = BeamResult(np.full((batch, n_best, steps), pad, dtype=np.int64),
                      np.zeros((batch, n_best), dtype=np.int64),
                      np.full((batch, n_best), -np.inf))
    done = np.zeros(batch, dtype=bool)
    for t in range(steps):
        logits, state = _call_step(step, inputs, state, batch * beams, t == 0, bos, eos_id)
        vocab = logits.shape[1]
        candidates = beam_scores[:, :, None] + log_softmax(logits.astype(np.float64)).reshape(
            batch, beams, vocab)
        if eos_id is not None:
            # the beams emitting EOS: EOS extensions ranked among the beam_size best candidates
            top = np.argsort(-candidates.reshape(batch, -1), axis=1, kind="stable")[:, :beams]
            ended_scores = np.where((top % vocab == eos_id) & ~done[:, None],
                                    candidates.reshape(batch, -1)[rows, top] / (t + 1) ** alpha,
                                    -np.inf)
            ended = history[rows, top // vocab]
            ended[:, :, t] = eos_id
            pool = _merge_pool(pool, ended_scores, ended, t + 1)
            candidates[:, :, eos_id] = -np.inf  # an EOS extension is finished, never live
        flat = candidates.reshape(batch, beams * vocab)
        best = np.argsort(-flat, axis=1, kind="stable")[:, :beams]
        parent, token = best // vocab, best % vocab
        beam_scores = np.take_along_axis(flat, best, axis=1)
        history = np.take_along_axis(history, parent[:, :, None], axis=1)
        history[:, :, t] = token
        state = select_state(state, (rows * beams + parent).reshape(-1))
        inputs = token.reshape(-1)
        if t + 1 < steps:
            # s / L**α for s <= 0 is monotone in L, so its best over L in t+2..T is at an end
            reachable = np.maximum(beam_scores / (t + 2) ** alpha, beam_scores / steps ** alpha)
            done |= pool.scores[:, -1] >= reachable.max(axis=1)
            if done.all():
                break
    live_scores = np.where(done[:, None], -np.inf, beam_scores / steps ** alpha)
    pool = _merge_pool(pool, live_scores, history, steps)
    empty = np.isneginf(pool.scores)
    return BeamResult(np.where(empty[:, :, None], pad, pool.tokens),
                      np.where(empty, 0, pool.lengths), pool.scores)
