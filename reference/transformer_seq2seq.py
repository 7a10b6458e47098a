"""A Transformer encoder-decoder for sequence-to-sequence tasks (Vaswani et al. 2017), forward
and hand-written backward, with incremental decoding for ``generate``.

For source ids src (B, S) with lengths n_b, teacher-forced target input tgt_in (B, T),
E = d_model, P the position table (P, E):

    x      = drop(E_src[src] · √E + P[0..S-1])               (B, S, E)
    y      = drop(E_tgt[tgt_in] · √E + P[0..T-1])            (B, T, E)
    h      = Transformer(x, y)                               (B, T, E), encoder_decoder.py:
             source keys j >= n_b masked in the encoder's self-attention and in the decoder's
             cross-attention; the decoder's self-attention causal
    logits = h W_headᵀ + b_head                              (B, T, V_tgt)
             or, with tie_embeddings, h E_tgtᵀ                (the head is the target embedding)
    loss   = cross_entropy(logits, targets)                  mean over targets != ignore_index

With ``pointer`` (a pointer-generator, See et al. 2017; one vocabulary for source and target),
the decoder may also copy a source token. With m the encoder's output (B, S, E):

    a      = softmax((h W_ptrᵀ) mᵀ / √E, source padding -inf)      (B, T, S)  copy attention
    g      = σ(h w_gateᵀ + b_gate)                                   (B, T, 1)  P(generate)
    C[v]   = Σ_{j : src_j = v} a_j                                   (B, T, V)  copied mass
    p      = g · softmax(logits) + (1 - g) · C
    logits := log max(p, tiny)                                       the model's output

so the output rows are log-probabilities and the loss (a log_softmax of them) is -log p of
each target; ``tiny`` is the dtype's smallest normal number (its gradient there is 0).

Positions: "sinusoidal" P[t, 2i] = sin(t / 10000^(2i/E)), P[t, 2i+1] = cos(t / 10000^(2i/E))
(a constant), or "learned" (the parameter ``pos_embedding.weight`` (max_len, E)), shared by
source and target. Target padding is handled by the loss alone (PAD = 0): the decoder is
causal, so trailing padding never changes the logits of earlier positions.

Parameter names: ``src_embedding.weight`` (V_src, E), ``tgt_embedding.weight`` (V_tgt, E; absent
with share_embeddings, where the target reads the source's: one vocabulary, one table),
``pos_embedding.weight`` (learned positions only), ``transformer.<torch.nn.Transformer
names>`` and, unless tied, ``head.weight`` (V_tgt, E) and ``head.bias`` (V_tgt,) (no bias with
``bias=False``); with ``pointer`` also ``pointer.query.weight`` (E, E), ``pointer.gate.weight``
(1, E) and ``pointer.gate.bias`` (1,).

Dropout (rate p, explicit bool keep-masks): "src_embedding" (B, S, E), "tgt_embedding"
(B, T, E) and the Transformer's sites under "transformer." (``transformer_seq2seq_dropout_
mask_shapes``).

Incremental decoding (``generate``): the encoder runs once, and with it the cross-attention
keys and values of every decoder layer, K_c = m W_kᵀ + b_k and V_c = m W_vᵀ + b_v split
into heads (B, h, S, d); each row's beams share them. Each decoder layer keeps a
self-attention key and value cache (N, h, capacity, d) written at slot t. A step feeds one
token per row at position t, y_t = E_tgt[token] · √E + P[t], and runs every decoder layer on
that position alone: its self-attention over slots 0..t, its cross-attention over K_c, V_c,
and its feed-forward: the full forward's equations restricted to the last position; with
``pointer`` the memory and the source ids are kept for the copy attention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from . import generation
from .activations import gelu_forward, softmax
from .checks import check_float_array, check_int_array, check_positive_int, check_probability
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .encoder_decoder import (
    transformer_backward,
    transformer_dropout_mask_shapes,
    transformer_encoder_forward,
    transformer_forward,
    transformer_param_shapes,
)
from .generation import GenerateOutput
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .module import Module
from .normalization import layer_norm_forward

POSITIONS = ("sinusoidal", "learned")
ACTIVATIONS = ("relu", "gelu")
PAD = 0


@dataclass(frozen=True)
class TransformerSeq2SeqConfig:
    """Sizes and choices of a TransformerSeq2Seq; the Transformer's fields and defaults are
    torch.nn.Transformer's. ``max_len`` bounds source and target lengths (the positions)."""
    src_vocab: int
    tgt_vocab: int
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    norm_first: bool = False
    bias: bool = True
    max_len: int = 512
    positions: str = "sinusoidal"
    tie_embeddings: bool = False
    share_embeddings: bool = False   # one embedding for source and target (one vocabulary)
    pointer: bool = False            # copy source tokens (pointer-generator; one vocabulary)

    def __post_init__(self) -> None:
        for name in ("src_vocab", "tgt_vocab", "d_model", "nhead", "num_encoder_layers",
                     "num_decoder_layers", "dim_feedforward", "max_len"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.nhead:
            raise ValueError(f"nhead: expected a divisor of d_model = {self.d_model}, "
                             f"got {self.nhead}")
        check_probability("dropout", self.dropout)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected 'relu' or 'gelu', got {self.activation!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"layer_norm_eps: expected a positive float, got {eps!r}")
        for name in ("norm_first", "bias", "tie_embeddings", "share_embeddings", "pointer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions: expected 'sinusoidal' or 'learned', "
                             f"got {self.positions!r}")
        if self.share_embeddings and self.src_vocab != self.tgt_vocab:
            raise ValueError(f"share_embeddings: needs one vocabulary for source and target, "
                             f"got src_vocab {self.src_vocab} and tgt_vocab {self.tgt_vocab}")
        if self.pointer and self.src_vocab != self.tgt_vocab:
            raise ValueError(f"pointer: copying needs one vocabulary for source and target, "
                             f"got src_vocab {self.src_vocab} and tgt_vocab {self.tgt_vocab}")

    @property
    def tgt_embedding_key(self) -> str:
        """The parameter that embeds target tokens (the source's when shared)."""
        return "src_embedding.weight" if self.share_embeddings else "tgt_embedding.weight"

    def transformer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``transformer_forward`` this config fixes."""
        return {"nhead": self.nhead, "num_encoder_layers": self.num_encoder_layers,
                "num_decoder_layers": self.num_decoder_layers, "activation": self.activation,
                "layer_norm_eps": self.layer_norm_eps, "norm_first": self.norm_first}


def transformer_seq2seq_param_shapes(config: TransformerSeq2SeqConfig
                                     ) -> dict[str, tuple[int, ...]]:
    c, E = config, config.d_model
    shapes = {"src_embedding.weight": (c.src_vocab, E)}
    if not c.share_embeddings:
        shapes["tgt_embedding.weight"] = (c.tgt_vocab, E)
    if c.positions == "learned":
        shapes["pos_embedding.weight"] = (c.max_len, E)
    shapes.update({"transformer." + k: v for k, v in transformer_param_shapes(
        E, c.nhead, c.num_encoder_layers, c.num_decoder_layers, c.dim_feedforward,
        c.bias).items()})
    if not c.tie_embeddings:
        shapes["head.weight"] = (c.tgt_vocab, E)
        if c.bias:
            shapes["head.bias"] = (c.tgt_vocab,)
    if c.pointer:
        shapes.update({"pointer.query.weight": (E, E), "pointer.gate.weight": (1, E),
                       "pointer.gate.bias": (1,)})
    return shapes


def transformer_seq2seq_dropout_mask_shapes(config: TransformerSeq2SeqConfig, batch: int,
                                            src_len: int, tgt_len: int
                                            ) -> dict[str, tuple[int, ...]]:
    """Every dropout site and its keep-mask shape (``transformer_seq2seq_forward``)."""
    c, E = config, config.d_model
    shapes = {"src_embedding": (batch, src_len, E), "tgt_embedding": (batch, tgt_len, E)}
    shapes.update({"transformer." + k: v for k, v in transformer_dropout_mask_shapes(
        batch, src_len, tgt_len, d_model=E, nhead=c.nhead,
        num_encoder_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers,
        dim_feedforward=c.dim_feedforward).items()})
    return shapes


def sinusoidal_positions(length: int, d_model: int, dtype: Any = np.float64) -> np.ndarray:
    """P (length, d_model): P[t, 2i] = sin(t / 10000^(2i/E)), P[t, 2i+1] = cos(same)."""
    t = np.arange(length, dtype=np.float64)[:, None]
    frequencies = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((length, d_model))
    table[:, 0::2] = np.sin(t * frequencies)
    table[:, 1::2] = np.cos(t * frequencies[:d_model // 2])
    return table.astype(dtype)


# --------------------------------------------------------------------------- validation

def _check_config(config: object) -> TransformerSeq2SeqConfig:
    if not isinstance(config, TransformerSeq2SeqConfig):
        raise TypeError(f"config: expected a TransformerSeq2SeqConfig, "
                        f"got {type(config).__name__}")
    return config


def _check_params(params: object, config: TransformerSeq2SeqConfig) -> np.dtype:
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    shapes = transformer_seq2seq_param_shapes(config)
    missing = sorted(set(shapes) - set(params))
    unexpected = sorted(set(params) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unexpected}")
    dtype = check_float_array("params['src_embedding.weight']", params["src_embedding.weight"],
                              shapes["src_embedding.weight"]).dtype
    for name, shape in shapes.items():
        check_float_array(f"params[{name!r}]", params[name], shape, dtype=dtype)
    return dtype


def _check_ids(name: str, ids: object, vocab: int, shape: tuple) -> None:
    check_int_array(name, ids, shape, low=0, high=vocab)


def _check_src(src: object, src_lengths: object, config: TransformerSeq2SeqConfig
               ) -> np.ndarray:
    """src (B, S), S <= max_len, and src_lengths (B,) in 1..S (None: every row full)."""
    _check_ids("src", src, config.src_vocab, ("B", "S"))
    B, S = src.shape
    if S > config.max_len:
        raise ValueError(f"src: expected at most max_len = {config.max_len} positions, got "
                         f"S = {S} (truncate the sources or build the model with a larger "
                         f"max_len)")
    if src_lengths is None:
        return np.full(B, S, dtype=np.int64)
    check_int_array("src_lengths", src_lengths, (B,), low=1, high=S + 1)
    return src_lengths.astype(np.int64)


def _check_tgt(tgt_in: object, batch: int, config: TransformerSeq2SeqConfig) -> None:
    _check_ids("tgt_in", tgt_in, config.tgt_vocab, (batch, "T"))
    if tgt_in.shape[1] > config.max_len:
        raise ValueError(f"tgt_in: expected at most max_len = {config.max_len} positions, "
                         f"got T = {tgt_in.shape[1]}")


def _sub(params: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _positions(params: Mapping[str, np.ndarray], config: TransformerSeq2SeqConfig,
               length: int, dtype: np.dtype) -> np.ndarray:
    if config.positions == "learned":
        return params["pos_embedding.weight"][:length]
    return sinusoidal_positions(length, config.d_model, dtype)


# --------------------------------------------------------------------------- forward/backward

class TransformerSeq2SeqCache(NamedTuple):
    src_embedding: EmbeddingCache
    tgt_embedding: EmbeddingCache
    src_dropout: DropoutCache | None
    tgt_dropout: DropoutCache | None
    transformer: Any                 # encoder_decoder.TransformerCache
    head: LinearCache
    loss: CrossEntropyCache | None
    config: TransformerSeq2SeqConfig
    src_len: int
    tgt_len: int
    pointer: PointerCache | None


class PointerCache(NamedTuple):
    h: np.ndarray          # decoder output (B, T, E)
    memory: np.ndarray     # (B, S, E)
    src: np.ndarray        # (B, S) ids
    w_query: np.ndarray    # W_ptr (E, E)
    w_gate: np.ndarray     # w_gate (1, E)
    q: np.ndarray          # h W_ptrᵀ
    a: np.ndarray          # copy attention (B, T, S)
    g: np.ndarray          # P(generate) (B, T, 1)
    P: np.ndarray          # softmax(logits) (B, T, V)
    C: np.ndarray          # copied mass (B, T, V)
    p: np.ndarray          # g P + (1 - g) C, before the floor


def _scatter_copies(a: np.ndarray, src: np.ndarray, V: int) -> np.ndarray:
    """C[b, t, v] = Σ_{j : src[b, j] = v} a[b, t, j]."""
    B, T, S = a.shape
    index = (np.arange(B * T).reshape(B, T, 1) * V + src[:, None, :]).ravel()
    C = np.bincount(index, weights=a.ravel(), minlength=B * T * V)
    return C.reshape(B, T, V).astype(a.dtype, copy=False)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))                       # no overflow for either sign
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def pointer_forward(h: np.ndarray, memory: np.ndarray, src: np.ndarray, padding: np.ndarray,
                    logits: np.ndarray, params: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, PointerCache]:
    """The pointer-generator's output log max(p, tiny) (B, T, V) from the decoder output h
    (B, T, E), the memory (B, S, E), the source ids (B, S) with padding (B, S) True at pads
    (every row has a key) and the generator's logits (B, T, V); equations in the module
    docstring."""
    E = h.shape[-1]
    w_query, w_gate = params["pointer.query.weight"], params["pointer.gate.weight"]
    q = h @ w_query.T
    scores = np.einsum("bte,bse->bts", q, memory) / math.sqrt(E)
    a = softmax(np.where(padding[:, None, :], -np.inf, scores), axis=-1)
    g = _sigmoid(h @ w_gate.T + params["pointer.gate.bias"])
    P = softmax(logits, axis=-1)
    C = _scatter_copies(a, src, logits.shape[-1])
    p = g * P + (1.0 - g) * C
    out = np.log(np.maximum(p, np.finfo(p.dtype).tiny))
    return out, PointerCache(h, memory, src, w_query, w_gate, q, a, g, P, C, p)


def pointer_backward(dout: np.ndarray, cache: PointerCache
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """-> (dh, dmemory, dlogits, dparams of the pointer.* weights) for dout (B, T, V)."""
    h, m, a, g, P, C, p = cache.h, cache.memory, cache.a, cache.g, cache.P, cache.C, cache.p
    tiny = np.finfo(p.dtype).tiny
    dp = np.where(p > tiny, dout / np.maximum(p, tiny), 0.0)      # out = log p above the floor
    dP = g * dp                                                     # p = g P + (1 - g) C
    dlogits = P * (dP - (P * dP).sum(axis=-1, keepdims=True))       # P = softmax(logits)
    T = a.shape[1]
    dC = (1.0 - g) * dp                                             # C gathers a by source id
    da = np.take_along_axis(dC, np.repeat(cache.src[:, None, :], T, axis=1), axis=-1)
    dz = (dp * (P - C)).sum(axis=-1, keepdims=True) * g * (1.0 - g)  # g = σ(z)
    ds = a * (da - (a * da).sum(axis=-1, keepdims=True)) / math.sqrt(h.shape[-1])
    dq = np.einsum("bts,bse->bte", ds, m)                           # scores = q mᵀ / √E
    dmemory = np.einsum("bts,bte->bse", ds, cache.q)
    dh = dq @ cache.w_query + dz @ cache.w_gate
    E = h.shape[-1]
    grads = {"pointer.query.weight": dq.reshape(-1, E).T @ h.reshape(-1, E),
             "pointer.gate.weight": dz.reshape(-1, 1).T @ h.reshape(-1, E),
             "pointer.gate.bias": dz.reshape(-1, 1).sum(axis=0)}
    return dh, dmemory, dlogits.astype(h.dtype, copy=False), grads


def _embed(ids: np.ndarray, weight: np.ndarray, positions: np.ndarray, scale: float,
           p: float, mask: np.ndarray | None
           ) -> tuple[np.ndarray, EmbeddingCache, DropoutCache | None]:
    e, e_cache = embedding_forward(ids, weight)
    x = e * scale + positions
    if p == 0:
        return x, e_cache, None
    x, d_cache = dropout_forward(x, p, mask)
    return x, e_cache, d_cache


def transformer_seq2seq_forward(src: np.ndarray, src_lengths: np.ndarray | None,
                                tgt_in: np.ndarray, params: Mapping[str, np.ndarray],
                                config: TransformerSeq2SeqConfig,
                                targets: np.ndarray | None = None, ignore_index: int = PAD,
                                dropout_masks: Mapping[str, np.ndarray] | None = None
                                ) -> tuple[tuple[np.ndarray, np.ndarray | None],
                                           TransformerSeq2SeqCache]:
    """-> ((logits (B, T, V_tgt), loss or None), cache); equations in the module docstring.

    src (B, S) right-padded to src_lengths (B,) (None: full), tgt_in (B, T), targets (B, T)
    with ``ignore_index`` where no loss is taken. dropout_masks: every site of
    ``transformer_seq2seq_dropout_mask_shapes`` when config.dropout > 0, else None.
    """
    config = _check_config(config)
    dtype = _check_params(params, config)
    src_lengths = _check_src(src, src_lengths, config)
    B, S = src.shape
    _check_tgt(tgt_in, B, config)
    T = tgt_in.shape[1]
    if targets is not None:
        check_int_array("targets", targets, (B, T))
    p = config.dropout
    if p > 0 and dropout_masks is None:
        raise ValueError("dropout_masks: required when config.dropout > 0 (randomness is "
                         "explicit: see transformer_seq2seq_dropout_mask_shapes), got None")
    masks = dict(dropout_masks or {})
    scale = math.sqrt(config.d_model)
    table = _positions(params, config, max(S, T), dtype)
    x, src_e, src_d = _embed(src, params["src_embedding.weight"], table[:S], scale, p,
                             masks.get("src_embedding"))
    y, tgt_e, tgt_d = _embed(tgt_in, params[config.tgt_embedding_key], table[:T], scale, p,
                             masks.get("tgt_embedding"))
    padding = np.arange(S)[None, :] >= src_lengths[:, None]              # (B, S), True = pad
    h, t_cache = transformer_forward(
        x, y, _sub(params, "transformer."), **config.transformer_kwargs(),
        src_key_padding_mask=padding, memory_key_padding_mask=padding, tgt_is_causal=True,
        dropout=p, dropout_masks=_sub(masks, "transformer.") if p > 0 else None)
    if config.tie_embeddings:
        logits, head = linear_forward(h, params[config.tgt_embedding_key])
    else:
        logits, head = linear_forward(h, params["head.weight"], params.get("head.bias"))
    pointer = None
    if config.pointer:
        logits, pointer = pointer_forward(h, t_cache.memory, src, padding, logits, params)
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=ignore_index)
    return (logits, loss), TransformerSeq2SeqCache(src_e, tgt_e, src_d, tgt_d, t_cache, head,
                                                   loss_cache, config, S, T, pointer)


def transformer_seq2seq_backward(cache: TransformerSeq2SeqCache,
                                 dlogits: np.ndarray | None = None, dloss: float = 1.0
                                 ) -> dict[str, np.ndarray]:
    """dparams keyed like params, from dloss (with targets) and/or dlogits (B, T, V_tgt)."""
    c = cache.config
    if dlogits is None and cache.loss is None:
        raise ValueError("dlogits: required when the forward had no targets (no loss)")
    h = cache.head.x
    logits_shape = h.shape[:2] + (c.tgt_vocab,)
    if dlogits is None:
        d = np.zeros(logits_shape, dtype=h.dtype)
    else:
        d = check_float_array("dlogits", dlogits, logits_shape, dtype=h.dtype, finite=False)
    if cache.loss is not None:
        d = d + cross_entropy_backward(dloss, cache.loss)              # loss = CE(logits)
    dh_pointer, dmemory, pointer_grads = None, None, {}
    if cache.pointer is not None:                                      # logits = pointer(...)
        dh_pointer, dmemory, d, pointer_grads = pointer_backward(d, cache.pointer)
    dh, dw_head, db_head = linear_backward(d, cache.head)              # logits = h Wᵀ + b
    if dh_pointer is not None:
        dh = dh + dh_pointer
    dx, dy, dtransformer = transformer_backward(dh, cache.transformer, dmemory)
    grads = {"transformer." + k: v for k, v in dtransformer.items()}
    grads.update(pointer_grads)
    scale = math.sqrt(c.d_model)
    if cache.src_dropout is not None:
        dx = dropout_backward(dx, cache.src_dropout)
        dy = dropout_backward(dy, cache.tgt_dropout)
    # x = E[ids] · √E + P: the embedding gets √E dx, learned positions the sum over the batch
    grads["src_embedding.weight"] = embedding_backward(dx * scale, cache.src_embedding)
    dtgt = embedding_backward(dy * scale, cache.tgt_embedding)
    key = c.tgt_embedding_key      # the source's embedding when shared: the two uses add
    grads[key] = grads[key] + dtgt if key in grads else dtgt
    if c.positions == "learned":
        dpos = np.zeros((c.max_len, c.d_model), dtype=dx.dtype)
        dpos[:cache.src_len] += dx.sum(axis=0)
        dpos[:cache.tgt_len] += dy.sum(axis=0)
        grads["pos_embedding.weight"] = dpos
    if c.tie_embeddings:
        grads[key] = grads[key] + dw_head
    else:
        grads["head.weight"] = dw_head
        if db_head is not None:
            grads["head.bias"] = db_head
    return grads


# --------------------------------------------------------------------------- model

def _xavier(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


class TransformerSeq2Seq(Module):
    """The Transformer encoder-decoder in NumPy, with ``backward`` (module docstring).

    TransformerSeq2Seq(config, *, dtype=float64, seed=None). Init: the Transformer as
    torch.nn.Transformer (Xavier-uniform matrices, in_proj and out_proj biases 0, linear
    biases U(-1/√fan_in, 1/√fan_in), layer norms 1 and 0); embeddings N(0, 1/E), so that
    E[ids] · √E has unit variance; the head U(-1/√E, 1/√E).
    """

    def __init__(self, config: TransformerSeq2SeqConfig, *, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        super().__init__()
        self.config = c = _check_config(config)
        self.dtype = np.dtype(dtype)
        rng = self.rng = np.random.default_rng(seed)
        E = c.d_model
        params: dict[str, np.ndarray] = {}
        for name, shape in transformer_seq2seq_param_shapes(c).items():
            if name.endswith("embedding.weight"):
                params[name] = rng.normal(0.0, 1.0 / math.sqrt(E), shape)
            elif name.startswith("transformer.") and len(shape) > 1:
                params[name] = _xavier(rng, shape)
            elif ".norm" in name and name.endswith(".weight"):
                params[name] = np.ones(shape)
            elif name.endswith(("in_proj_bias", "out_proj.bias")) or ".norm" in name:
                params[name] = np.zeros(shape)
            else:   # linear biases and the head: torch.nn.Linear's U(-1/√fan_in, 1/√fan_in)
                fan_in = params[name[:-len("bias")] + "weight"].shape[1] \
                    if name.endswith("bias") else shape[1]
                bound = 1.0 / math.sqrt(fan_in)
                params[name] = rng.uniform(-bound, bound, shape)
        self.params = {k: v.astype(self.dtype) for k, v in params.items()}
        self.zero_grad()
        self._cache: TransformerSeq2SeqCache | None = None

    def forward(self, src: np.ndarray, src_lengths: np.ndarray | None, tgt_in: np.ndarray,
                targets: np.ndarray | None = None, ignore_index: int = PAD,
                dropout_masks: Mapping[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (logits (B, T, V_tgt), loss or None); see ``transformer_seq2seq_forward``.
        Dropout only in training mode, with the given keep-masks or masks drawn from
        ``self.rng``; in eval mode dropout_masks are ignored."""
        config = self.config
        if not self.training or config.dropout == 0:
            config, dropout_masks = dataclasses.replace(config, dropout=0.0), None
        elif dropout_masks is None:
            _check_ids("src", src, config.src_vocab, ("B", "S"))
            _check_ids("tgt_in", tgt_in, config.tgt_vocab, (src.shape[0], "T"))
            shapes = transformer_seq2seq_dropout_mask_shapes(config, *src.shape,
                                                             tgt_in.shape[1])
            dropout_masks = {site: self.rng.random(shape) >= config.dropout
                             for site, shape in shapes.items()}
        (logits, loss), self._cache = transformer_seq2seq_forward(
            src, src_lengths, tgt_in, self.params, config, targets, ignore_index,
            dropout_masks)
        return logits, loss

    __call__ = forward

    def backward(self, dloss: float | np.ndarray = 1.0, dlogits: np.ndarray | None = None
                 ) -> None:
        """Fills ``self.grads`` from the last forward."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (its cache is used once)")
        cache, self._cache = self._cache, None
        self.grads = transformer_seq2seq_backward(cache, dlogits, dloss)

    # ------------------------------------------------------------------------- generate

    def generate(self, src: np.ndarray, src_lengths: np.ndarray | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: np.ndarray | None = None,
                 generator: np.random.Generator | None = None, return_dict: bool = False,
                 **options: Any) -> np.ndarray | GenerateOutput:
        """Generate target sequences for the sources ``src`` (B, S) (right-padded to
        ``src_lengths``) as ``transformers``' encoder-decoder ``generate`` does ->
        sequences (B * num_return_sequences, 1 + L): ``decoder_start_token_id`` (an option,
        required: the target BOS) then the new tokens. Options and the other arguments as
        ``GPT.generate``. The encoder and the cross-attention keys and values run once."""
        session, config, ids, uniforms = self._generate_args(
            src, src_lengths, generation_config, options, uniforms, generator)
        return generation.run(session, ids, None, config, self.config.tgt_vocab, uniforms,
                              streamer, return_dict)

    def generate_stream(self, src: np.ndarray, src_lengths: np.ndarray | None = None,
                        generation_config: object = None, *, uniforms: np.ndarray | None = None,
                        generator: np.random.Generator | None = None,
                        **options: Any) -> Iterator[np.ndarray]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's tokens."""
        session, config, ids, uniforms = self._generate_args(
            src, src_lengths, generation_config, options, uniforms, generator)
        return generation.stream(session, ids, None, config, uniforms, self.config.tgt_vocab)

    def _generate_args(self, src: object, src_lengths: object, generation_config: object,
                       options: dict[str, Any], uniforms: object, generator: object) -> tuple:
        src_lengths = _check_src(src, src_lengths, self.config)

        def weights() -> None:
            for name, w in self.params.items():
                check_float_array(f"params[{name!r}]", w)

        config, ids, uniforms = generation.prepare_decoder(
            src.shape[0], generation_config, options, vocab_size=self.config.tgt_vocab,
            weights=weights, uniforms=uniforms, generator=generator)
        if config.max_new_tokens > self.config.max_len:
            raise ValueError(f"max_new_tokens: expected at most max_len = "
                             f"{self.config.max_len} (the decoder's positions), "
                             f"got {config.max_new_tokens}")
        session = _TransformerSeq2SeqSession(self.params, self.config, src, src_lengths,
                                             config.max_new_tokens)
        return session, config, ids, uniforms

    def __repr__(self) -> str:
        return f"TransformerSeq2Seq({self.config})"


# --------------------------------------------------------------------------- decode session

def _layer_norm(x: np.ndarray, p: Mapping[str, np.ndarray], name: str, eps: float
                ) -> np.ndarray:
    return layer_norm_forward(x, p[f"{name}.weight"], p.get(f"{name}.bias"), eps)[0]


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x @ weight.T
    return y if bias is None else y + bias


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray,
            additive_mask: np.ndarray | None) -> np.ndarray:
    """softmax(q kᵀ / √d + A) v for one query per row and head: q (N, h, d), keys and values
    (N, h, K, d), A (N, K) or None -> (N, h d)."""
    scores = np.einsum("nhd,nhkd->nhk", q, keys) / math.sqrt(q.shape[-1])
    if additive_mask is not None:
        scores = scores + additive_mask[:, None, :]
    out = np.einsum("nhk,nhkd->nhd", softmax(scores, axis=-1), values)
    return out.reshape(out.shape[0], -1)


class _TransformerSeq2SeqSession:
    """``generate``'s decode session (``generation.DecodeSession``), equations in the module
    docstring: per decoder layer the cross-attention keys and values of the memory, computed
    in ``start`` and shared by a row's beams (never reordered), and a self-attention cache
    (N, h, capacity, d) written in place at slot t and reordered by index."""

    def __init__(self, params: Mapping[str, np.ndarray], config: TransformerSeq2SeqConfig,
                 src: np.ndarray, src_lengths: np.ndarray, capacity: int) -> None:
        self.params, self.config, self.capacity = params, config, capacity
        self.src, self.src_lengths = src, src_lengths
        self.layers = [_sub(params, f"transformer.decoder.layers.{i}.")
                       for i in range(config.num_decoder_layers)]
        dtype = params[config.tgt_embedding_key].dtype
        self.positions = _positions(params, config, capacity, dtype)
        self.cross: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.memory_mask: np.ndarray | None = None
        self.memory: np.ndarray | None = None          # pointer: (N, S, E), ids and padding
        self.copy_src: np.ndarray | None = None
        self.copy_padding: np.ndarray | None = None
        self.t = 0

    def start(self, ids: np.ndarray, mask: np.ndarray | None, expand: int) -> np.ndarray:
        c, p = self.config, self.params
        B, S = self.src.shape
        E, h = c.d_model, c.nhead
        d, N = E // h, B * expand
        dtype = p["src_embedding.weight"].dtype
        x = (p["src_embedding.weight"][self.src] * math.sqrt(E)
             + _positions(p, c, S, dtype))
        padding = np.arange(S)[None, :] >= self.src_lengths[:, None]
        memory, _ = transformer_encoder_forward(
            x, _sub(p, "transformer.encoder."), num_layers=c.num_encoder_layers, nhead=h,
            src_key_padding_mask=padding, activation=c.activation,
            layer_norm_eps=c.layer_norm_eps, norm_first=c.norm_first)
        for layer in self.layers:
            w_q, w_k, w_v = np.split(layer["multihead_attn.in_proj_weight"], 3)
            b = layer.get("multihead_attn.in_proj_bias")
            b_k, b_v = (None, None) if b is None else np.split(b, 3)[1:]
            k = _linear(memory, w_k, b_k).reshape(B, S, h, d).transpose(0, 2, 1, 3)
            v = _linear(memory, w_v, b_v).reshape(B, S, h, d).transpose(0, 2, 1, 3)
            self.cross.append((np.repeat(k, expand, axis=0), np.repeat(v, expand, axis=0)))
            self.keys.append(np.zeros((N, h, self.capacity, d), dtype=dtype))
            self.values.append(np.zeros((N, h, self.capacity, d), dtype=dtype))
        # 0 on a row's keys, -inf on its padding (every source has a key: lengths >= 1)
        self.memory_mask = np.repeat(np.where(padding, -np.inf, 0.0).astype(dtype), expand,
                                     axis=0)
        if c.pointer:
            self.memory = np.repeat(memory, expand, axis=0)
            self.copy_src = np.repeat(self.src, expand, axis=0)
            self.copy_padding = np.repeat(padding, expand, axis=0)
        self.t = 0
        return self.step(np.repeat(ids[:, 0], expand))

    def _self_attention(self, x: np.ndarray, layer: Mapping[str, np.ndarray], i: int
                        ) -> np.ndarray:
        c, t = self.config, self.t
        N, h = x.shape[0], c.nhead
        qkv = _linear(x, layer["self_attn.in_proj_weight"], layer.get("self_attn.in_proj_bias"))
        q, k, v = qkv.reshape(N, 3, h, -1).transpose(1, 0, 2, 3)
        self.keys[i][:, :, t] = k
        self.values[i][:, :, t] = v
        a = _attend(q, self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1], None)
        return _linear(a, layer["self_attn.out_proj.weight"],
                       layer.get("self_attn.out_proj.bias"))

    def _cross_attention(self, x: np.ndarray, layer: Mapping[str, np.ndarray], i: int
                         ) -> np.ndarray:
        N, h = x.shape[0], self.config.nhead
        E = x.shape[1]
        w_q = layer["multihead_attn.in_proj_weight"][:E]
        b = layer.get("multihead_attn.in_proj_bias")
        q = _linear(x, w_q, None if b is None else b[:E]).reshape(N, h, -1)
        keys, values = self.cross[i]
        a = _attend(q, keys, values, self.memory_mask)
        return _linear(a, layer["multihead_attn.out_proj.weight"],
                       layer.get("multihead_attn.out_proj.bias"))

    def _feed_forward(self, x: np.ndarray, layer: Mapping[str, np.ndarray]) -> np.ndarray:
        a = _linear(x, layer["linear1.weight"], layer.get("linear1.bias"))
        a = np.maximum(a, 0) if self.config.activation == "relu" else gelu_forward(a)[0]
        return _linear(a, layer["linear2.weight"], layer.get("linear2.bias"))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        c, p, eps = self.config, self.params, self.config.layer_norm_eps
        x = p[c.tgt_embedding_key][tokens] * math.sqrt(c.d_model) + self.positions[self.t]
        for i, layer in enumerate(self.layers):
            if c.norm_first:
                x = x + self._self_attention(_layer_norm(x, layer, "norm1", eps), layer, i)
                x = x + self._cross_attention(_layer_norm(x, layer, "norm2", eps), layer, i)
                x = x + self._feed_forward(_layer_norm(x, layer, "norm3", eps), layer)
            else:
                x = _layer_norm(x + self._self_attention(x, layer, i), layer, "norm1", eps)
                x = _layer_norm(x + self._cross_attention(x, layer, i), layer, "norm2", eps)
                x = _layer_norm(x + self._feed_forward(x, layer), layer, "norm3", eps)
        x = _layer_norm(x, p, "transformer.decoder.norm", eps)
        self.t += 1
        if c.tie_embeddings:
            logits = x @ p[c.tgt_embedding_key].T
        else:
            logits = _linear(x, p["head.weight"], p.get("head.bias"))
        if not c.pointer:
            return logits
        out, _ = pointer_forward(x[:, None], self.memory, self.copy_src, self.copy_padding,
                                 logits[:, None], p)
        return out[:, 0]

    def reorder(self, index: np.ndarray) -> None:
        t = self.t
        for cache in (*self.keys, *self.values):
            cache[:, :, :t] = cache[index, :, :t]
