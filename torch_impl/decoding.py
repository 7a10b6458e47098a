"""Decoders on the step interface: greedy, sampling (temperature, top-k, top-p), beam search.

Twin of ``reference/decoding.py`` on torch tensors; beams, pools and scores stay on the device of
``bos`` (one host sync per step, for the stopping test and the logits check).

A model offers ``step(tokens (N,) int, state) -> (logits (N, V), state)``; a state is any nested
tuple / list / dict / NamedTuple of tensors with the batch on dim 0 (``select_rows`` reorders it).
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

import math
from typing import Any, Callable, NamedTuple

import torch

from .checks import check_float_tensor, check_int_tensor, check_positive_int

Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


class DecodeResult(NamedTuple):
    tokens: torch.Tensor   # (B, T) int64; positions after a row's EOS hold eos_id
    lengths: torch.Tensor  # (B,) int64; generated tokens up to and including the first EOS
    scores: torch.Tensor   # (B,) float64; Σ_t log p(y_t) over the first `lengths` tokens


class BeamResult(NamedTuple):
    tokens: torch.Tensor   # (B, n_best, T) int64; after EOS (or in an empty slot): eos_id or 0
    lengths: torch.Tensor  # (B, n_best) int64; 0 marks an empty slot (fewer hypotheses exist)
    scores: torch.Tensor   # (B, n_best) float64; Σ log p / lengths ** length_penalty, best first


def select_rows(state: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` (N,) of every tensor in a nested tuple/list/dict state (dim 0).

    Leaves that are not tensors (ints, None) are shared by all rows and returned unchanged.
    """
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, dict):
        return {key: select_rows(value, index) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(select_rows(value, index) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(select_rows(value, index) for value in state)
    return state


def _check_common(bos: object, max_new_tokens: object, eos_id: object) -> int:
    check_int_tensor("bos", bos, shape=("B",), low=0)
    check_positive_int("max_new_tokens", max_new_tokens)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)):
        raise TypeError(f"eos_id: expected an int or None, got {type(eos_id).__name__}")
    return bos.shape[0]


def _call_step(step: Step, inputs: torch.Tensor, state: Any, rows: int, first: bool,
               bos: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, Any]:
    """One validated model step; at the first one, bos and eos_id are checked against V."""
    logits, state = step(inputs, state)
    check_float_tensor("logits", logits, shape=(rows, "V"))
    vocab = logits.shape[1]
    if first:
        check_int_tensor("bos", bos, high=vocab)
        if eos_id is not None and not 0 <= eos_id < vocab:
            raise ValueError(f"eos_id: expected a token id in [0, {vocab}) (V from the logits), "
                             f"got {eos_id}")
    return logits, state


def _decode(step: Step, state: Any, bos: torch.Tensor, max_new_tokens: int,
            eos_id: int | None,
            choose: Callable[[torch.Tensor, int], torch.Tensor]) -> DecodeResult:
    """The loop shared by greedy and sampling: ``choose(logits, t) -> tokens (B,)``."""
    batch, steps, device = bos.shape[0], max_new_tokens, bos.device
    pad = 0 if eos_id is None else eos_id
    tokens = torch.full((batch, steps), pad, dtype=torch.int64, device=device)
    lengths = torch.full((batch,), steps, dtype=torch.int64, device=device)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    inputs = bos.to(torch.int64)
    for t in range(steps):
        logits, state = _call_step(step, inputs, state, batch, t == 0, bos, eos_id)
        chosen = torch.where(finished, pad, choose(logits, t).to(device))
        logp = torch.log_softmax(logits.double(), dim=1).gather(1, chosen[:, None].to(
            logits.device))[:, 0].to(device)
        scores = scores + torch.where(finished, 0.0, logp)
        tokens[:, t] = chosen
        if eos_id is not None:
            newly = ~finished & (chosen == eos_id)
            lengths = torch.where(newly, t + 1, lengths)
            finished = finished | newly
            if bool(finished.all()):  # every row frozen: the rest is eos_id already
                break
        inputs = chosen
    return DecodeResult(tokens, lengths, scores)


def greedy_decode(step: Step, state: Any, bos: torch.Tensor, max_new_tokens: int,
                  eos_id: int | None = None) -> DecodeResult:
    """y_t = argmax_i logits_t[i] (ties: lower index) for t < max_new_tokens; bos (B,) int.

    A row that emits ``eos_id`` is frozen: its later positions hold eos_id and add no score.
    """
    _check_common(bos, max_new_tokens, eos_id)
    return _decode(step, state, bos, max_new_tokens, eos_id,
                   lambda logits, t: logits.argmax(dim=1))


def _check_sampling(temperature: object, top_k: object, top_p: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p: expected a float, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p}")


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One inverse-CDF draw per row of logits (N, V) from uniforms u (N,) in [0, 1) (module
    docstring), every argument checked: temperature > 0, top_k None or >= 1, top_p None or in
    (0, 1], logits free of NaN and +inf with a finite value in every row (-inf marks a banned
    token)."""
    check_float_tensor("logits", logits, shape=("N", "V"), finite=False)
    _check_sampling(temperature, top_k, top_p)
    if bool(torch.any(torch.isnan(logits) | (logits == float("inf")))):
        raise ValueError("logits: contains NaN or +inf")
    if logits.shape[1] == 0 or not bool(torch.isfinite(logits).any(dim=1).all()):
        raise ValueError("logits: every row needs a finite value (a token that can be drawn)")
    check_float_tensor("u", u, shape=(logits.shape[0],))
    if u.numel() and not (float(u.min()) >= 0 and float(u.max()) < 1):
        raise ValueError(f"u: values must lie in [0, 1), got min {float(u.min())}, "
                         f"max {float(u.max())}")
    return draw_tokens(logits, u, temperature, top_k, top_p)


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``sample_tokens`` on trusted arguments (the decoders check them once per call)."""
    vocab = logits.shape[1]
    positions = torch.arange(vocab, device=logits.device)
    z = logits / temperature
    p = torch.softmax(z, dim=1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None or top_p is not None:  # the ranks cost a sort of every row
        order = torch.argsort(z, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    if top_k is not None:
        keep &= rank < top_k
    if top_p is not None:
        kept = torch.where(keep, p, 0.0)
        sorted_p = (kept / kept.sum(dim=1, keepdim=True)).gather(1, order)
        mass_before = torch.cumsum(sorted_p, dim=1) - sorted_p
        mass_before[:, 0] = 0.0  # the most likely token is always kept
        keep &= (mass_before < top_p).gather(1, rank)
    q = torch.where(keep, p, 0.0)
    cdf = torch.cumsum(q / q.sum(dim=1, keepdim=True), dim=1)
    count = (cdf <= u.to(cdf)[:, None]).sum(dim=1)
    # rounding can leave c_{V-1} a hair below u: fall back to the last kept token
    last_kept = torch.where(keep, positions, -1).amax(dim=1)
    return torch.minimum(count, last_kept)


def sample_decode(step: Step, state: Any, bos: torch.Tensor, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, eos_id: int | None = None,
                  uniforms: torch.Tensor | None = None, seed: int | None = None) -> DecodeResult:
    """Ancestral sampling; y_t = sample_tokens(logits_t, uniforms[:, t], ...).

    ``uniforms`` (B, max_new_tokens) in [0, 1) make the draw explicit (the same uniforms give the
    same tokens in both backends); when None they come from a CPU ``torch.Generator`` seeded with
    ``seed`` (a stream that differs from the reference's for the same seed). Column t is consumed
    at step t also by frozen rows. Scores are the model's log-probs (temperature 1, unfiltered).
    """
    batch = _check_common(bos, max_new_tokens, eos_id)
    _check_sampling(temperature, top_k, top_p)
    if uniforms is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        uniforms = torch.rand((batch, max_new_tokens), generator=generator,
                              dtype=torch.float64).to(bos.device)
    check_float_tensor("uniforms", uniforms, shape=(batch, max_new_tokens))
    if uniforms.numel() and not (float(uniforms.min()) >= 0 and float(uniforms.max()) < 1):
        raise ValueError(f"uniforms: values must lie in [0, 1), got min {float(uniforms.min())}, "
                         f"max {float(uniforms.max())}")
    return _decode(step, state, bos, max_new_tokens, eos_id,
                   lambda logits, t: draw_tokens(logits, uniforms[:, t], temperature,
                                                   top_k, top_p))


def _stable_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """``argsort(x, dim=1, descending=True, stable=True)[:, :k]`` (the k largest of each row of
    x (N, M), largest first, ties by lower index) without sorting whole rows: the k-th largest
    value by topk, every entry above it and the first ties at it in index order, then a sort
    of those k. A beam step's rows hold beams x vocab entries, where the full sort was most
    of the decoder's time."""
    if k >= x.shape[1] or bool(torch.isnan(x).any()):
        return torch.argsort(x, dim=1, descending=True, stable=True)[:, :k]
    kth = torch.topk(x, k, dim=1).values[:, -1:]
    above, tie = x > kth, x == kth
    keep = above | (tie & (torch.cumsum(tie, dim=1) <= k - above.sum(dim=1, keepdim=True)))
    chosen = keep.nonzero()[:, 1].reshape(x.shape[0], k)  # row-major: ascending per row
    order = torch.argsort(x.gather(1, chosen), dim=1, descending=True, stable=True)
    return chosen.gather(1, order)


def _merge_pool(pool: BeamResult, scores: torch.Tensor, tokens: torch.Tensor,
                length: int) -> BeamResult:
    """Keep the n_best best of the pool and the new hypotheses (B, M); ties keep the older."""
    n_best = pool.scores.shape[1]
    all_scores = torch.cat([pool.scores, scores], dim=1)
    all_tokens = torch.cat([pool.tokens, tokens], dim=1)
    all_lengths = torch.cat([pool.lengths, torch.full_like(scores, length, dtype=torch.int64)],
                            dim=1)
    best = torch.argsort(all_scores, dim=1, descending=True, stable=True)[:, :n_best]
    steps = tokens.shape[2]
    return BeamResult(all_tokens.gather(1, best[:, :, None].expand(-1, -1, steps)),
                      all_lengths.gather(1, best), all_scores.gather(1, best))


def beam_search(step: Step, state: Any, bos: torch.Tensor, max_new_tokens: int,
                beam_size: int, eos_id: int | None = None, length_penalty: float = 1.0,
                n_best: int = 1,
                select_state: Callable[[Any, torch.Tensor], Any] = select_rows) -> BeamResult:
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
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite value, got {length_penalty}")
    steps, alpha, device = max_new_tokens, float(length_penalty), bos.device
    pad = 0 if eos_id is None else eos_id
    rows = torch.arange(batch, device=device)[:, None]
    state = select_state(state, torch.arange(batch, device=device).repeat_interleave(beams))
    inputs = bos.to(torch.int64).repeat_interleave(beams)
    beam_scores = torch.full((batch, beams), -math.inf, dtype=torch.float64, device=device)
    beam_scores[:, 0] = 0.0
    history = torch.full((batch, beams, steps), pad, dtype=torch.int64, device=device)
    pool = BeamResult(torch.full((batch, n_best, steps), pad, dtype=torch.int64, device=device),
                      torch.zeros((batch, n_best), dtype=torch.int64, device=device),
                      torch.full((batch, n_best), -math.inf, dtype=torch.float64, device=device))
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(steps):
        logits, state = _call_step(step, inputs, state, batch * beams, t == 0, bos, eos_id)
        vocab = logits.shape[1]
        logp = torch.log_softmax(logits.double(), dim=1).to(device)
        candidates = beam_scores[:, :, None] + logp.reshape(batch, beams, vocab)
        if eos_id is not None:
            # the beams emitting EOS: EOS extensions ranked among the beam_size best candidates
            flat = candidates.reshape(batch, beams * vocab)
            top = _stable_top(flat, beams)
            ended_scores = torch.where((top % vocab == eos_id) & ~done[:, None],
                                       flat.gather(1, top) / (t + 1) ** alpha, -math.inf)
            ended = history.gather(1, (top // vocab)[:, :, None].expand(-1, -1, steps)).clone()
            ended[:, :, t] = eos_id
            pool = _merge_pool(pool, ended_scores, ended, t + 1)
            candidates[:, :, eos_id] = -math.inf  # an EOS extension is finished, never live
        flat = candidates.reshape(batch, beams * vocab)
        best = _stable_top(flat, beams)
        parent, token = best // vocab, best % vocab
        beam_scores = flat.gather(1, best)
        history = history.gather(1, parent[:, :, None].expand(-1, -1, steps)).clone()
        history[:, :, t] = token
        state = select_state(state, (rows * beams + parent).reshape(-1))
        inputs = token.reshape(-1)
        if t + 1 < steps:
            # s / L**α for s <= 0 is monotone in L, so its best over L in t+2..T is at an end
            reachable = torch.maximum(beam_scores / (t + 2) ** alpha,
                                      beam_scores / steps ** alpha)
            done = done | (pool.scores[:, -1] >= reachable.amax(dim=1))
            if bool(done.all()):
                break
    live_scores = torch.where(done[:, None], -math.inf, beam_scores / steps ** alpha)
    pool = _merge_pool(pool, live_scores, history, steps)
    empty = torch.isneginf(pool.scores)
    return BeamResult(torch.where(empty[:, :, None], pad, pool.tokens),
                      torch.where(empty, 0, pool.lengths), pool.scores)
