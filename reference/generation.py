"""``generate()``: Hugging Face-style generation over a model's decode session.

A model's ``generate(input_ids, attention_mask=None, generation_config=None, **options)``
validates its arguments once, opens a *decode session* (a cache preallocated for the whole
call) and runs one of the loops below. A session offers

    start(ids (B, P) int64, mask (B, P) bool or None, expand) -> logits (B * expand, V)
        the prompt's forward, each row then repeated ``expand`` times (beams, or returned
        sequences); the logits are those at the prompt's last position
    step(tokens (N,) int64) -> logits (N, V)      one new token per row
    reorder(index (N,) int64)                      row i of the state becomes row index[i]

The options are those of ``transformers.GenerationConfig`` and mean what they mean there:

- every step's logits are processed in float32 (as transformers does), in this order:
  repetition_penalty (a logit s of a token seen in the row, prompt included, becomes s / r
  if s > 0 else s * r), no_repeat_ngram_size (a token that would repeat an n-gram of the
  row is banned), min_new_tokens (EOS banned before that many new tokens). Beam search
  applies them to the log-probabilities, as transformers does;
- greedy: the argmax (ties: the lower index). Sampling (``do_sample=True``): one draw per
  row and step from the processed logits under temperature, top_k and top_p, by
  ``decoding.sample_tokens`` (in float64) from a uniform per row and step: explicit
  ``uniforms`` give the same tokens in both backends; else ``generator`` or ``seed`` draw
  them;
- a row that emits one of ``eos_token_id`` is finished: its later positions hold
  ``pad_token_id`` (EOS's first id when None) and generation stops when every row is;
- beam search (``num_beams > 1``) is transformers' algorithm: each step keeps the
  ``max(2, 1 + #EOS) * num_beams`` best continuations of all beams; those ending in EOS
  among the best ``num_beams`` join the row's finished hypotheses, scored
  ``Σ log p / L ** length_penalty`` (L = new tokens, EOS included), the best non-EOS
  ``num_beams`` stay live, and at ``max_new_tokens`` the live beams are finished too.
  ``early_stopping``: True stops a row once it has ``num_beams`` finished hypotheses;
  False once no live beam at its current length can beat the worst of them; "never" once
  none could at any length (the exact bound when ``length_penalty > 0``);
- left-padded prompts of unequal lengths: ``attention_mask`` (B, P) of 0 (padding, on the
  left) and 1; each row's positions count its own tokens only and padding is never
  attended, so a row's tokens are that prompt's alone.

The result is ``sequences`` (B * num_return_sequences, P + L) int64, the prompt then the new
tokens (L = the longest; shorter rows padded with ``pad_token_id``), or with
``return_dict=True`` a ``GenerateOutput`` that adds the beam scores.

Where this departs from transformers: sampling never reproduces its random stream (the
draw is an inverse CDF of our own uniforms); the repetition penalty and the n-gram ban skip
left padding, where transformers counts the pad tokens of a padded prompt; beam search with
sampling is not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol

import numpy as np

from .activations import log_softmax
from .checks import check_float_array, check_int_array, check_positive_int
from .decoding import draw_tokens

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # transformers' score of a hypothesis that must not be chosen


class DecodeSession(Protocol):
    def start(self, ids: np.ndarray, mask: np.ndarray | None, expand: int) -> np.ndarray: ...
    def step(self, tokens: np.ndarray) -> np.ndarray: ...
    def reorder(self, index: np.ndarray) -> None: ...


class GenerateOutput(NamedTuple):
    sequences: np.ndarray                # (B * num_return_sequences, P + L) int64
    sequences_scores: np.ndarray | None  # beam search: (B * num_return_sequences,) float32


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= 0, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return int(value)


@dataclass(frozen=True)
class GenerationConfig:
    """The options of ``generate``; validated on construction (ValueError/TypeError naming
    the field). Field names and meanings follow ``transformers.GenerationConfig``; ``top_k``
    None or 0 and ``top_p`` 1.0 filter nothing."""
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    decoder_start_token_id: int | None = None  # an encoder-decoder's first decoder input

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        _count("min_new_tokens", self.min_new_tokens)
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample: expected a bool, got {type(self.do_sample).__name__}")
        temperature = _number("temperature", self.temperature)
        if self.do_sample and not temperature > 0:
            raise ValueError(f"temperature: expected a value > 0 with do_sample=True, "
                             f"got {temperature}")
        if self.top_k is not None:
            _count("top_k", self.top_k)
        top_p = _number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a probability in (0, 1], got {top_p}")
        beams = check_positive_int("num_beams", self.num_beams)
        _number("length_penalty", self.length_penalty)
        if not any(self.early_stopping is v for v in EARLY_STOPPING[:2]) \
                and self.early_stopping != "never":
            raise ValueError(f"early_stopping: expected True, False or 'never', "
                             f"got {self.early_stopping!r}")
        eos = self.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if isinstance(eos, bool) or not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"eos_token_id: expected an int, a sequence of ints or None, "
                            f"got {eos!r}")
        if eos is not None and not ids:
            raise ValueError("eos_token_id: expected at least one id (None for no EOS)")
        if self.pad_token_id is not None:
            _count("pad_token_id", self.pad_token_id)
        returns = check_positive_int("num_return_sequences", self.num_return_sequences)
        if beams > 1 and returns > beams:
            raise ValueError(f"num_return_sequences: expected at most num_beams ({beams}), "
                             f"got {returns}")
        if beams == 1 and not self.do_sample and returns > 1:
            raise ValueError(f"num_return_sequences: greedy decoding returns one sequence per "
                             f"prompt, got {returns} (use num_beams or do_sample)")
        if beams > 1 and self.do_sample:
            raise ValueError("do_sample: beam search with sampling is not offered; use "
                             "num_beams=1 to sample or do_sample=False for beam search")
        penalty = _number("repetition_penalty", self.repetition_penalty)
        if not penalty > 0:
            raise ValueError(f"repetition_penalty: expected a value > 0, got {penalty}")
        _count("no_repeat_ngram_size", self.no_repeat_ngram_size)
        if self.decoder_start_token_id is not None:
            _count("decoder_start_token_id", self.decoder_start_token_id)
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(self.seed).__name__}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def pad_id(self) -> int | None:
        """What fills a finished row: pad_token_id, else EOS's first id, else None."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None

    @classmethod
    def from_transformers(cls, config: Any, **overrides: Any) -> GenerationConfig:
        """The fields of a ``transformers.GenerationConfig`` (or any object with those
        attributes) that this config has; ``max_length`` is not read (give
        ``max_new_tokens``). ``overrides`` win."""
        values = {}
        for f in fields(cls):
            if hasattr(config, f.name) and getattr(config, f.name) is not None:
                values[f.name] = getattr(config, f.name)
        if values.get("top_k") == 0:
            values["top_k"] = None
        return cls(**{**values, **overrides})


def resolve_config(config: object, options: dict[str, Any]) -> GenerationConfig:
    """``config`` (ours, transformers', or None) with keyword ``options`` applied over it."""
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"generate: unknown option(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(sorted(names))}")
    if config is None:
        return GenerationConfig(**options)
    if isinstance(config, GenerationConfig):
        return replace(config, **options)
    if type(config).__name__ == "GenerationConfig":
        return GenerationConfig.from_transformers(config, **options)
    raise TypeError(f"generation_config: expected a GenerationConfig (seqtwin's or "
                    f"transformers'), got {type(config).__name__}")


# ----------------------------------------------------------------------------- arguments

def check_prompt(input_ids: object, attention_mask: object, vocab_size: int,
                 context: int | None, max_new_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids (B, P) int64, mask (B, P) bool or None when nothing is padded).

    The mask must be left padding: per row zeros then ones, the last position a token.
    ``context`` (a model's positions) bounds P + max_new_tokens - 1, the tokens it is fed."""
    check_int_array("input_ids", input_ids, shape=("B", "P"), low=0, high=vocab_size)
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids: expected a prompt of at least one token per row, got "
                         f"shape ({batch}, {length})")
    if context is not None and length + max_new_tokens - 1 > context:
        raise ValueError(f"input_ids: a prompt of {length} tokens and max_new_tokens = "
                         f"{max_new_tokens} need {length + max_new_tokens - 1} positions, "
                         f"more than the model's {context}")
    ids = input_ids.astype(np.int64)
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, np.ndarray):
        raise TypeError(f"attention_mask: expected a numpy.ndarray of 0/1 or bool, got "
                        f"{type(attention_mask).__name__}")
    if not (attention_mask.dtype == bool or np.issubdtype(attention_mask.dtype, np.integer)):
        raise TypeError(f"attention_mask: expected an integer or bool dtype, got "
                        f"{attention_mask.dtype}")
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask: expected shape ({batch}, {length}) (that of "
                         f"input_ids), got {attention_mask.shape}")
    if attention_mask.dtype != bool and np.any((attention_mask != 0) & (attention_mask != 1)):
        raise ValueError("attention_mask: values must be 0 (padding) or 1 (a token)")
    mask = attention_mask.astype(bool)
    if not mask[:, -1].all():
        row = int(np.flatnonzero(~mask[:, -1])[0])
        raise ValueError(f"attention_mask: row {row} ends in padding; expected left padding "
                         f"(zeros, then the prompt's ones, the last position a token)")
    after = (mask[:, :-1] & ~mask[:, 1:]).any(axis=1)
    if after.any():
        raise ValueError(f"attention_mask: row {int(np.flatnonzero(after)[0])} has padding "
                         f"after a token; expected left padding (zeros, then ones)")
    return ids, None if mask.all() else mask


def check_token_ids(config: GenerationConfig, vocab_size: int) -> None:
    for name, ids in (("eos_token_id", config.eos_ids),
                      ("pad_token_id", () if config.pad_token_id is None
                       else (config.pad_token_id,)),
                      ("decoder_start_token_id", () if config.decoder_start_token_id is None
                       else (config.decoder_start_token_id,))):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{name}: expected token ids in [0, {vocab_size}), got {bad[0]}")


def draw_uniforms(config: GenerationConfig, rows: int, uniforms: object,
                  generator: object) -> np.ndarray | None:
    """The (rows, max_new_tokens) uniforms a sampling run consumes (column t at step t)."""
    if not config.do_sample:
        if uniforms is not None:
            raise ValueError("uniforms: only used with do_sample=True")
        return None
    shape = (rows, config.max_new_tokens)
    if uniforms is not None:
        check_float_array("uniforms", uniforms, shape=shape)
        if not np.all((uniforms >= 0) & (uniforms < 1)):
            raise ValueError("uniforms: values must lie in [0, 1)")
        return uniforms.astype(np.float64)
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator: expected a numpy.random.Generator, got "
                        f"{type(generator).__name__}")
    if generator is None:
        generator = np.random.default_rng(config.seed)
    return generator.random(shape)


def prepare(input_ids: object, attention_mask: object, generation_config: object,
            options: dict[str, Any], *, vocab_size: int, context: int | None,
            weights: Callable[[], None], uniforms: object, generator: object
            ) -> tuple[GenerationConfig, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Every check of a ``generate`` call, once: the options, the prompt and its mask, the
    token ids, the weights (``weights()`` raises on a non-finite one) and the uniforms."""
    config = resolve_config(generation_config, options)
    check_token_ids(config, vocab_size)
    ids, mask = check_prompt(input_ids, attention_mask, vocab_size, context,
                             config.max_new_tokens)
    weights()
    rows = ids.shape[0] * config.num_return_sequences
    return config, ids, mask, draw_uniforms(config, rows, uniforms, generator)


def prepare_decoder(batch: int, generation_config: object, options: dict[str, Any], *,
                    vocab_size: int, weights: Callable[[], None], uniforms: object,
                    generator: object) -> tuple[GenerationConfig, np.ndarray,
                                                np.ndarray | None]:
    """``prepare`` for an encoder-decoder, whose decoder starts from
    ``decoder_start_token_id`` alone -> (config, ids (batch, 1), uniforms)."""
    config = resolve_config(generation_config, options)
    if config.decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id: an encoder-decoder's generate needs the "
                         "token its decoder starts from (the target vocabulary's BOS id)")
    check_token_ids(config, vocab_size)
    weights()
    ids = np.full((batch, 1), config.decoder_start_token_id, dtype=np.int64)
    rows = batch * config.num_return_sequences
    return config, ids, draw_uniforms(config, rows, uniforms, generator)


# ----------------------------------------------------------------------------- processors

class _History:
    """The tokens of each row so far (prompt and new, padding excluded) in the form the
    processors need: a (N, V) seen-token mask for the repetition penalty and the sequence
    with its validity for the n-grams. Reordered with the beams."""

    def __init__(self, config: GenerationConfig, ids: np.ndarray, mask: np.ndarray | None,
                 vocab_size: int, capacity: int) -> None:
        rows, length = ids.shape
        self.config, self.vocab_size, self.length = config, vocab_size, length
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = np.zeros((rows, vocab_size + 1), dtype=bool)
            marked = ids if mask is None else np.where(mask, ids, vocab_size)
            np.put_along_axis(self.seen, marked, True, axis=1)
            self.seen = self.seen[:, :vocab_size]
        self.tokens = self.valid = None
        if config.no_repeat_ngram_size > 0:
            self.tokens = np.zeros((rows, capacity), dtype=np.int64)
            self.tokens[:, :length] = ids
            self.valid = np.ones((rows, capacity), dtype=bool)
            if mask is not None:
                self.valid[:, :length] = mask

    def push(self, tokens: np.ndarray) -> None:
        if self.seen is not None:
            self.seen[np.arange(tokens.shape[0]), tokens] = True
        if self.tokens is not None:
            self.tokens[:, self.length] = tokens
        self.length += 1

    def reorder(self, index: np.ndarray) -> None:
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.tokens is not None:
            self.tokens, self.valid = self.tokens[index], self.valid[index]

    def process(self, scores: np.ndarray, new_tokens: int) -> np.ndarray:
        """Scores (N, V) float32 after the penalty, the n-gram ban and min_new_tokens."""
        config = self.config
        if self.seen is not None:
            r = np.float32(config.repetition_penalty)
            scores = np.where(self.seen, np.where(scores < 0, scores * r, scores / r), scores)
        n = config.no_repeat_ngram_size
        if self.tokens is not None and self.length >= n:  # else no whole n-gram yet
            scores = np.where(self._banned(n), np.float32(-np.inf), scores)
        if new_tokens < config.min_new_tokens and config.eos_ids:
            scores = scores.copy()
            scores[:, list(config.eos_ids)] = -np.inf
        return scores

    def _banned(self, n: int) -> np.ndarray:
        """(N, V) True for a token that would complete an n-gram already in the row."""
        tokens, valid = self.tokens[:, :self.length], self.valid[:, :self.length]
        rows = tokens.shape[0]
        banned = np.zeros((rows, self.vocab_size + 1), dtype=bool)
        if n == 1:  # every token seen so far
            np.put_along_axis(banned, np.where(valid, tokens, self.vocab_size), True, axis=1)
            return banned[:, :self.vocab_size]
        windows = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=1)  # (N, L-n+1, n)
        whole = np.lib.stride_tricks.sliding_window_view(valid, n, axis=1).all(axis=2)
        tail = tokens[:, self.length - n + 1:]            # the last n - 1 tokens
        tail_valid = valid[:, self.length - n + 1:].all(axis=1, keepdims=True)
        match = (windows[:, :, :-1] == tail[:, None, :]).all(axis=2) & whole & tail_valid
        np.put_along_axis(banned, np.where(match, windows[:, :, -1], self.vocab_size), True,
                          axis=1)
        return banned[:, :self.vocab_size]


# ----------------------------------------------------------------------------- loops

def _stream_tokens(session: DecodeSession, ids: np.ndarray, mask: np.ndarray | None,
                   config: GenerationConfig, uniforms: np.ndarray | None, vocab_size: int
                   ) -> Iterator[np.ndarray]:
    """Greedy or sampling: yields each step's tokens (N,), finished rows holding the pad."""
    returns = config.num_return_sequences
    logits = session.start(ids, mask, returns)
    if returns > 1:
        ids = np.repeat(ids, returns, axis=0)
        mask = None if mask is None else np.repeat(mask, returns, axis=0)
    rows, length = ids.shape
    history = _History(config, ids, mask, vocab_size, length + config.max_new_tokens)
    eos = np.array(config.eos_ids, dtype=np.int64)
    pad = config.pad_id
    unfinished = np.ones(rows, dtype=bool)
    top_k = config.top_k or None
    top_p = None if config.top_p >= 1.0 else config.top_p
    for t in range(config.max_new_tokens):
        scores = history.process(logits.astype(np.float32), t)
        if uniforms is None:
            tokens = scores.argmax(axis=1)
        else:
            tokens = draw_tokens(scores.astype(np.float64), uniforms[:, t],
                                   config.temperature, top_k, top_p)
        if eos.size:
            tokens = np.where(unfinished, tokens, pad)
        yield tokens
        if eos.size:
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any():
                return
        if t + 1 < config.max_new_tokens:
            history.push(tokens)
            logits = session.step(tokens)


def sample_or_greedy(session: DecodeSession, ids: np.ndarray, mask: np.ndarray | None,
                     config: GenerationConfig, uniforms: np.ndarray | None, vocab_size: int,
                     streamer: Callable[[np.ndarray], Any] | None = None) -> np.ndarray:
    """The whole sequences (N, P + L) of greedy decoding or sampling."""
    prompt = np.repeat(ids, config.num_return_sequences, axis=0)
    new = []
    for tokens in _stream_tokens(session, ids, mask, config, uniforms, vocab_size):
        new.append(tokens)
        if streamer is not None:
            streamer(tokens)
    return np.concatenate([prompt, np.stack(new, axis=1)], axis=1)


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k largest per row, in decreasing order (ties: lower index)."""
    index = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(x, index, axis=1), index


def beam_search(session: DecodeSession, ids: np.ndarray, mask: np.ndarray | None,
                config: GenerationConfig, vocab_size: int) -> GenerateOutput:
    """transformers' beam search (module docstring) over B prompts of ``num_beams`` beams."""
    batch, length = ids.shape
    beams, V = config.num_beams, vocab_size
    steps, alpha, early = config.max_new_tokens, config.length_penalty, config.early_stopping
    eos = np.array(config.eos_ids, dtype=np.int64)
    keep = max(2, 1 + eos.size) * beams
    is_top = np.arange(keep) < beams
    fill = config.pad_id if config.pad_id is not None else 0
    offsets = (np.arange(batch) * beams)[:, None]
    neg = np.float32(NEG)

    running = np.full((batch, beams, length + steps), fill, dtype=np.int64)
    running[:, :, :length] = ids[:, None, :]
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = neg
    done_seqs, done_scores = running.copy(), np.full((batch, beams), neg, dtype=np.float32)
    done_lengths = np.zeros((batch, beams), dtype=np.int64)
    done = np.zeros((batch, beams), dtype=bool)
    open_ = np.ones((batch, 1), dtype=bool)  # a row whose hypotheses can still improve
    rows_mask = None if mask is None else np.repeat(mask, beams, axis=0)
    history = _History(config, np.repeat(ids, beams, axis=0), rows_mask, V, length + steps)
    logits = session.start(ids, mask, beams)
    for t in range(steps):
        logp = history.process(log_softmax(logits.astype(np.float32), axis=1), t)
        candidates = (logp.reshape(batch, beams, V) + running_scores[:, :, None]) \
            .reshape(batch, beams * V)
        top_scores, top_index = _topk(candidates, keep)
        parent, token = top_index // V, top_index % V
        top_seqs = np.take_along_axis(running, parent[:, :, None], axis=1)
        top_seqs[:, :, length + t] = token
        hits = np.isin(token, eos) if eos.size else np.zeros(token.shape, dtype=bool)
        if t + 1 == steps:
            hits = np.ones_like(hits)
        # the live beams: the best candidates that did not just end
        live_scores = top_scores + hits.astype(np.float32) * neg
        live = _topk(live_scores, beams)[1]
        running = np.take_along_axis(top_seqs, live[:, :, None], axis=1)
        running_scores = np.take_along_axis(live_scores, live, axis=1)
        # the finished hypotheses: merge those just ended among the best num_beams
        ended = hits & is_top[None, :]
        scores = top_scores / np.float32(float(t + 1) ** alpha)
        scores = scores + (done.all(axis=1, keepdims=True) & (early is True)) * neg
        scores = scores + (~open_) * neg + (~ended) * neg
        pooled = np.concatenate([done_scores, scores.astype(np.float32)], axis=1)
        done_scores, merged = _topk(pooled, beams)
        done_seqs = np.take_along_axis(np.concatenate([done_seqs, top_seqs], axis=1),
                                       merged[:, :, None], axis=1)
        done_lengths = np.take_along_axis(
            np.concatenate([done_lengths, np.full_like(token, t + 1)], axis=1), merged, axis=1)
        done = np.take_along_axis(np.concatenate([done, ended], axis=1), merged, axis=1)
        # can a live beam still beat the worst finished hypothesis?
        best_length = steps if (early == "never" and alpha > 0) else t + 1
        best_possible = running_scores[:, :1] / np.float32(float(best_length) ** alpha)
        worst = np.where(done, done_scores.min(axis=1, keepdims=True), neg)
        open_ = open_ & (best_possible > worst).any(axis=1, keepdims=True)
        if not (open_.any() and not (done.all() and early is True) and not hits.all()):
            break
        index = (np.take_along_axis(parent, live, axis=1) + offsets).reshape(-1)
        session.reorder(index)
        history.reorder(index)
        tokens = running[:, :, length + t].reshape(-1)
        history.push(tokens)
        logits = session.step(tokens)
    returns = config.num_return_sequences
    width = length + int(done_lengths[:, :returns].max())
    return GenerateOutput(done_seqs[:, :returns, :width].reshape(batch * returns, width),
                          done_scores[:, :returns].reshape(-1))


def run(session: DecodeSession, ids: np.ndarray, mask: np.ndarray | None,
        config: GenerationConfig, vocab_size: int, uniforms: np.ndarray | None,
        streamer: object, return_dict: bool) -> np.ndarray | GenerateOutput:
    """The loop ``config`` asks for, after the model validated everything."""
    if config.num_beams > 1:
        if streamer is not None:
            raise ValueError("streamer: streaming is not offered with num_beams > 1 (a beam's "
                             "tokens are only final at the end)")
        out = beam_search(session, ids, mask, config, vocab_size)
        return out if return_dict else out.sequences
    callback = as_callback(streamer, ids)
    sequences = sample_or_greedy(session, ids, mask, config, uniforms, vocab_size, callback)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return GenerateOutput(sequences, None) if return_dict else sequences


def as_callback(streamer: object, ids: np.ndarray) -> Callable[[np.ndarray], Any] | None:
    """A callable streamer is called with each step's tokens (N,); an object with ``put``
    and ``end`` (transformers' streamers) gets the prompt first, as there."""
    if streamer is None:
        return None
    if hasattr(streamer, "put") and hasattr(streamer, "end"):
        streamer.put(ids)
        return streamer.put
    if callable(streamer):
        return streamer
    raise TypeError(f"streamer: expected a callable or an object with put() and end(), got "
                    f"{type(streamer).__name__}")


def stream(session: DecodeSession, ids: np.ndarray, mask: np.ndarray | None,
           config: GenerationConfig, uniforms: np.ndarray | None, vocab_size: int
           ) -> Iterator[np.ndarray]:
    """The iterator form of greedy decoding and sampling: each step's tokens (N,)."""
    if config.num_beams > 1:
        raise ValueError("num_beams: streaming is not offered with num_beams > 1 (a beam's "
                         "tokens are only final at the end)")
    return _stream_tokens(session, ids, mask, config, uniforms, vocab_size)
