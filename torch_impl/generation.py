"""``generate()``: Hugging Face-style generation over a model's decode session.

Twin of ``reference/generation.py`` on torch tensors, which documents the options, the decode
session a model offers and the algorithms. ``GenerationConfig`` is the same dataclass in both
backends; either backend's ``generate`` accepts either one (or transformers'). Everything
here runs on the model's device under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .checks import check_finite_tensors, check_int_tensor, check_positive_int
from .decoding import draw_tokens

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # transformers' score of a hypothesis that must not be chosen


class DecodeSession(Protocol):
    def start(self, ids: Tensor, mask: Tensor | None, expand: int) -> Tensor: ...
    def step(self, tokens: Tensor) -> Tensor: ...
    def reorder(self, index: Tensor) -> None: ...


class GenerateOutput(NamedTuple):
    sequences: Tensor                # (B * num_return_sequences, P + L) int64
    sequences_scores: Tensor | None  # beam search: (B * num_return_sequences,) float32


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
                 context: int | None, max_new_tokens: int, device: torch.device
                 ) -> tuple[Tensor, Tensor | None]:
    """(ids (B, P) int64, mask (B, P) bool or None when nothing is padded) on ``device``.

    The mask must be left padding: per row zeros then ones, at least one 1. ``context``
    (a model's positions) bounds P + max_new_tokens - 1, the tokens the model is fed."""
    check_int_tensor("input_ids", input_ids, shape=("B", "P"), low=0, high=vocab_size)
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids: expected a prompt of at least one token per row, got "
                         f"shape ({batch}, {length})")
    if context is not None and length + max_new_tokens - 1 > context:
        raise ValueError(f"input_ids: a prompt of {length} tokens and max_new_tokens = "
                         f"{max_new_tokens} need {length + max_new_tokens - 1} positions, "
                         f"more than the model's {context}")
    ids = input_ids.to(device=device, dtype=torch.int64)
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor of 0/1 or bool, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask: expected an integer or bool dtype, got "
                        f"{attention_mask.dtype}")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask: expected shape ({batch}, {length}) (that of "
                         f"input_ids), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and bool(
            ((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask: values must be 0 (padding) or 1 (a token)")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if not bool(mask[:, -1].all()):
        row = int((~mask[:, -1]).nonzero()[0])
        raise ValueError(f"attention_mask: row {row} ends in padding; expected left padding "
                         f"(zeros, then the prompt's ones, the last position a token)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        row = int((mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask: row {row} has padding after a token; expected "
                         f"left padding (zeros, then ones)")
    return ids, None if bool(mask.all()) else mask


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
                  generator: object, device: torch.device) -> Tensor | None:
    """The (rows, max_new_tokens) uniforms a sampling run consumes (column t at step t)."""
    if not config.do_sample:
        if uniforms is not None:
            raise ValueError("uniforms: only used with do_sample=True")
        return None
    shape = (rows, config.max_new_tokens)
    if uniforms is not None:
        if not isinstance(uniforms, Tensor) or not uniforms.dtype.is_floating_point:
            raise TypeError(f"uniforms: expected a floating torch.Tensor of shape {shape}, "
                            f"got {getattr(uniforms, 'dtype', type(uniforms).__name__)}")
        if tuple(uniforms.shape) != shape:
            raise ValueError(f"uniforms: expected shape {shape} (rows = batch x "
                             f"num_return_sequences, max_new_tokens), got "
                             f"{tuple(uniforms.shape)}")
        if not bool(((uniforms >= 0) & (uniforms < 1)).all()):
            raise ValueError("uniforms: values must lie in [0, 1)")
        return uniforms.to(device=device, dtype=torch.float64)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got "
                        f"{type(generator).__name__}")
    if generator is None:
        generator = torch.Generator()
        if config.seed is None:
            generator.seed()
        else:
            generator.manual_seed(config.seed)
    return torch.rand(shape, generator=generator, dtype=torch.float64,
                      device=generator.device).to(device)


def prepare(input_ids: object, attention_mask: object, generation_config: object,
            options: dict[str, Any], *, vocab_size: int, context: int | None,
            weights: Iterable[tuple[str, Tensor]], uniforms: object, generator: object,
            device: torch.device) -> tuple[GenerationConfig, Tensor, Tensor | None,
                                           Tensor | None]:
    """Every check of a ``generate`` call, once: the options, the prompt and its mask, the
    token ids, the weights (finite) and the uniforms -> (config, ids, mask, uniforms)."""
    config = resolve_config(generation_config, options)
    check_token_ids(config, vocab_size)
    ids, mask = check_prompt(input_ids, attention_mask, vocab_size, context,
                             config.max_new_tokens, device)
    check_finite_tensors(weights)
    rows = ids.shape[0] * config.num_return_sequences
    return config, ids, mask, draw_uniforms(config, rows, uniforms, generator, device)


def prepare_decoder(batch: int, generation_config: object, options: dict[str, Any], *,
                    vocab_size: int, weights: Iterable[tuple[str, Tensor]], uniforms: object,
                    generator: object, device: torch.device
                    ) -> tuple[GenerationConfig, Tensor, Tensor | None]:
    """``prepare`` for an encoder-decoder, whose decoder starts from
    ``decoder_start_token_id`` alone -> (config, ids (batch, 1), uniforms)."""
    config = resolve_config(generation_config, options)
    if config.decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id: an encoder-decoder's generate needs the "
                         "token its decoder starts from (the target vocabulary's BOS id)")
    check_token_ids(config, vocab_size)
    check_finite_tensors(weights)
    ids = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.int64,
                     device=device)
    rows = batch * config.num_return_sequences
    return config, ids, draw_uniforms(config, rows, uniforms, generator, device)


# ----------------------------------------------------------------------------- processors

class _History:
    """The tokens of each row so far (prompt and new, padding excluded) in the form the
    processors need: a (N, V) seen-token mask for the repetition penalty and the sequence
    with its validity for the n-grams. Reordered with the beams."""

    def __init__(self, config: GenerationConfig, ids: Tensor, mask: Tensor | None,
                 vocab_size: int, capacity: int) -> None:
        rows, length = ids.shape
        self.config, self.vocab_size, self.length = config, vocab_size, length
        self.seen = None
        if config.repetition_penalty != 1.0:
            marked = ids if mask is None else torch.where(mask, ids, vocab_size)
            self.seen = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=ids.device)
            self.seen.scatter_(1, marked, True)
            self.seen = self.seen[:, :vocab_size]
        self.tokens = self.valid = None
        if config.no_repeat_ngram_size > 0:
            self.tokens = torch.zeros(rows, capacity, dtype=torch.int64, device=ids.device)
            self.tokens[:, :length] = ids
            self.valid = torch.ones(rows, capacity, dtype=torch.bool, device=ids.device)
            if mask is not None:
                self.valid[:, :length] = mask

    def push(self, tokens: Tensor) -> None:
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        if self.tokens is not None:
            self.tokens[:, self.length] = tokens
        self.length += 1

    def reorder(self, index: Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
            self.valid = self.valid.index_select(0, index)

    def process(self, scores: Tensor, new_tokens: int) -> Tensor:
        """Scores (N, V) float32 after the penalty, the n-gram ban and min_new_tokens."""
        config = self.config
        if self.seen is not None:
            r = config.repetition_penalty
            scores = torch.where(self.seen, torch.where(scores < 0, scores * r, scores / r),
                                 scores)
        n = config.no_repeat_ngram_size
        if self.tokens is not None and self.length >= n:  # else no whole n-gram yet
            scores = scores.masked_fill(self._banned(n), -math.inf)
        if new_tokens < config.min_new_tokens and config.eos_ids:
            scores = scores.clone()
            scores[:, list(config.eos_ids)] = -math.inf
        return scores

    def _banned(self, n: int) -> Tensor:
        """(N, V) True for a token that would complete an n-gram already in the row."""
        tokens, valid = self.tokens[:, :self.length], self.valid[:, :self.length]
        banned = torch.zeros(tokens.shape[0], self.vocab_size + 1, dtype=torch.bool,
                             device=tokens.device)
        if n == 1:  # every token seen so far
            banned.scatter_(1, torch.where(valid, tokens, self.vocab_size), True)
            return banned[:, :self.vocab_size]
        windows = tokens.unfold(1, n, 1)                  # (N, L - n + 1, n)
        whole = valid.unfold(1, n, 1).all(dim=2)
        tail = tokens[:, self.length - n + 1:]            # the last n - 1 tokens
        tail_valid = valid[:, self.length - n + 1:].all(dim=1, keepdim=True)
        match = (windows[:, :, :-1] == tail[:, None, :]).all(dim=2) & whole & tail_valid
        banned.scatter_(1, torch.where(match, windows[:, :, -1], self.vocab_size), True)
        return banned[:, :self.vocab_size]


# ----------------------------------------------------------------------------- loops

def _stream_tokens(session: DecodeSession, ids: Tensor, mask: Tensor | None,
                   config: GenerationConfig, uniforms: Tensor | None, vocab_size: int
                   ) -> Iterator[Tensor]:
    """Greedy or sampling: yields each step's tokens (N,), finished rows holding the pad."""
    returns = config.num_return_sequences
    logits = session.start(ids, mask, returns)
    if returns > 1:
        ids = ids.repeat_interleave(returns, dim=0)
        mask = None if mask is None else mask.repeat_interleave(returns, dim=0)
    rows, length = ids.shape
    history = _History(config, ids, mask, vocab_size, length + config.max_new_tokens)
    eos = torch.tensor(config.eos_ids, dtype=torch.int64, device=ids.device)
    pad = config.pad_id
    unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
    top_k = config.top_k or None
    top_p = None if config.top_p >= 1.0 else config.top_p
    for t in range(config.max_new_tokens):
        scores = history.process(logits.float(), t)
        if uniforms is None:
            tokens = scores.argmax(dim=1)
        else:
            tokens = draw_tokens(scores.double(), uniforms[:, t], config.temperature, top_k,
                                   top_p)
        if eos.numel():
            tokens = torch.where(unfinished, tokens, pad)
        yield tokens
        if eos.numel():
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                return
        if t + 1 < config.max_new_tokens:
            history.push(tokens)
            logits = session.step(tokens)


def sample_or_greedy(session: DecodeSession, ids: Tensor, mask: Tensor | None,
                     config: GenerationConfig, uniforms: Tensor | None, vocab_size: int,
                     streamer: Callable[[Tensor], Any] | None = None) -> Tensor:
    """The whole sequences (N, P + L) of greedy decoding or sampling."""
    prompt = ids.repeat_interleave(config.num_return_sequences, dim=0)
    new = []
    for tokens in _stream_tokens(session, ids, mask, config, uniforms, vocab_size):
        new.append(tokens)
        if streamer is not None:
            streamer(tokens)
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)


def beam_search(session: DecodeSession, ids: Tensor, mask: Tensor | None,
                config: GenerationConfig, vocab_size: int) -> GenerateOutput:
    """transformers' beam search (module docstring) over B prompts of ``num_beams`` beams."""
    batch, length = ids.shape
    beams, V, device = config.num_beams, vocab_size, ids.device
    steps, alpha, early = config.max_new_tokens, config.length_penalty, config.early_stopping
    eos = torch.tensor(config.eos_ids, dtype=torch.int64, device=device)
    keep = max(2, 1 + eos.numel()) * beams
    is_top = torch.arange(keep, device=device) < beams
    fill = config.pad_id if config.pad_id is not None else 0
    offsets = (torch.arange(batch, device=device) * beams)[:, None]

    running = torch.full((batch, beams, length + steps), fill, dtype=torch.int64, device=device)
    running[:, :, :length] = ids[:, None, :]
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = NEG
    done_seqs, done_scores = running.clone(), torch.full((batch, beams), NEG, device=device)
    done_lengths = torch.zeros(batch, beams, dtype=torch.int64, device=device)
    done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    open_ = torch.ones(batch, 1, dtype=torch.bool, device=device)  # improvement possible
    rows_mask = None if mask is None else mask.repeat_interleave(beams, dim=0)
    history = _History(config, ids.repeat_interleave(beams, dim=0), rows_mask, V,
                       length + steps)
    logits = session.start(ids, mask, beams)
    for t in range(steps):
        logp = history.process(torch.log_softmax(logits.float(), dim=1), t)
        candidates = (logp.reshape(batch, beams, V) + running_scores[:, :, None]) \
            .reshape(batch, beams * V)
        top_scores, top_index = torch.topk(candidates, keep, dim=1)
        parent, token = top_index // V, top_index % V
        top_seqs = running.gather(1, parent[:, :, None].expand(-1, -1, running.shape[2])) \
            .clone()
        top_seqs[:, :, length + t] = token
        hits = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=bool)
        if t + 1 == steps:
            hits = torch.ones_like(hits)
        # the live beams: the best candidates that did not just end
        live = torch.topk(top_scores + hits.float() * NEG, beams, dim=1).indices
        running = top_seqs.gather(1, live[:, :, None].expand(-1, -1, running.shape[2]))
        running_scores = (top_scores + hits.float() * NEG).gather(1, live)
        # the finished hypotheses: merge those just ended among the best num_beams
        ended = hits & is_top[None, :]
        scores = top_scores / float(t + 1) ** alpha
        scores = scores + (done.all(dim=1, keepdim=True) & (early is True)).float() * NEG
        scores = scores + (~open_).float() * NEG + (~ended).float() * NEG
        merged = torch.topk(torch.cat([done_scores, scores], dim=1), beams, dim=1).indices
        done_seqs = torch.cat([done_seqs, top_seqs], dim=1).gather(
            1, merged[:, :, None].expand(-1, -1, running.shape[2]))
        done_scores = torch.cat([done_scores, scores], dim=1).gather(1, merged)
        done_lengths = torch.cat([done_lengths, torch.full_like(token, t + 1)], dim=1) \
            .gather(1, merged)
        done = torch.cat([done, ended], dim=1).gather(1, merged)
        # can a live beam still beat the worst finished hypothesis?
        best_length = steps if (early == "never" and alpha > 0) else t + 1
        best_possible = running_scores[:, :1] / float(best_length) ** alpha
        worst = torch.where(done, done_scores.min(dim=1, keepdim=True).values, NEG)
        open_ = open_ & (best_possible > worst).any(dim=1, keepdim=True)
        if not (bool(open_.any()) and not (bool(done.all()) and early is True)
                and not bool(hits.all())):
            break
        index = (parent.gather(1, live) + offsets).reshape(-1)
        session.reorder(index)
        history.reorder(index)
        tokens = running[:, :, length + t].reshape(-1)
        history.push(tokens)
        logits = session.step(tokens)
    returns = config.num_return_sequences
    width = length + int(done_lengths[:, :returns].max())
    return GenerateOutput(done_seqs[:, :returns, :width].reshape(batch * returns, width),
                          done_scores[:, :returns].reshape(-1))


def run(session: DecodeSession, ids: Tensor, mask: Tensor | None, config: GenerationConfig,
        vocab_size: int, uniforms: Tensor | None, streamer: object,
        return_dict: bool) -> Tensor | GenerateOutput:
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


def as_callback(streamer: object, ids: Tensor) -> Callable[[Tensor], Any] | None:
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


def stream(session: DecodeSession, ids: Tensor, mask: Tensor | None,
           config: GenerationConfig, uniforms: Tensor | None, vocab_size: int
           ) -> Iterator[Tensor]:
    """The iterator form of greedy decoding and sampling: each step's tokens (N,)."""
    if config.num_beams > 1:
        raise ValueError("num_beams: streaming is not offered with num_beams > 1 (a beam's "
                         "tokens are only final at the end)")
    return _stream_tokens(session, ids, mask, config, uniforms, vocab_size)


def no_grad_iterator(tokens: Iterator[Tensor]) -> Iterator[Tensor]:
    """``tokens`` advanced under torch.no_grad (the session's steps build no graph)."""
    while True:
        with torch.no_grad():
            try:
                value = next(tokens)
            except StopIteration:
                return
        yield value


def decode_layout(owner: object, name: str, weights: Sequence[Tensor],
                  build: Callable[[], Any]) -> Any:
    """``build()`` (a decode session's copy of ``weights`` in the layout its steps read,
    e.g. transposed for few-row products), kept on ``owner`` under ``name`` while every one
    of ``weights`` is unchanged: the same storage and version counter, which every in-place
    update bumps. The copy is as large as the weights it lays out; it saves their
    re-layout (about one decode step of memory traffic) at every generate call."""
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
    cache = owner.__dict__.setdefault("_decode_layouts", {})
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        cache.pop(name, None)  # the old copy is freed before the new one is built
        entry = cache[name] = (key, build())
    return entry[1]
