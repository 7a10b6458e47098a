"""A Transformer encoder-decoder for sequence-to-sequence tasks (Vaswani et al. 2017): the
explicit-cache forward/backward pair, the nn.Module and incremental decoding for ``generate``.

Twin of ``reference/transformer_seq2seq.py`` on torch tensors. For source ids src (B, S) with
lengths n_b, teacher-forced target input tgt_in (B, T), E = d_model, P the position table:

    x      = drop(E_src[src] · √E + P[0..S-1])               (B, S, E)
    y      = drop(E_tgt[tgt_in] · √E + P[0..T-1])            (B, T, E)
    h      = Transformer(x, y)                               (B, T, E), encoder_decoder.py:
             source keys j >= n_b masked in the encoder's self-attention and in the decoder's
             cross-attention; the decoder's self-attention causal
    logits = h W_headᵀ + b_head                              (B, T, V_tgt)
             or, with tie_embeddings, h E_tgtᵀ                (the head is the target embedding)
    loss   = cross_entropy(logits, targets)                  mean over targets != ignore_index

With ``pointer`` (a pointer-generator; one vocabulary), logits := log max(p, tiny) with
p = g · softmax(logits) + (1 - g) · C, the copied mass C of the copy attention over the memory
and the gate g, as in the reference module's docstring.

Positions: "sinusoidal" P[t, 2i] = sin(t / 10000^(2i/E)), P[t, 2i+1] = cos(t / 10000^(2i/E))
(a buffer, not a parameter), or "learned" (``pos_embedding.weight`` (max_len, E)), shared by
source and target. Parameter names, dropout sites and the decoding equations as in the
reference module's docstring. The module computes under autograd through this package's
Transformer (the fused attention and layer-norm ops with their hand-written backwards) and
the fused cross-entropy; ``transformer_seq2seq_forward`` / ``_backward`` chain the
hand-written building blocks with no autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import generation
from .checks import (
    check_float_tensor,
    check_int_tensor,
    check_positive_int,
    check_probability,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .encoder_decoder import (
    Transformer,
    transformer_backward,
    transformer_dropout_mask_shapes,
    transformer_forward,
    transformer_param_shapes,
)
from .generation import GenerateOutput
from .kernels.decode_attention import decode_attention_for
from .kernels.decode_linear import decode_linear_for
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy, cross_entropy_backward, cross_entropy_forward

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


def sinusoidal_positions(length: int, d_model: int, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> Tensor:
    """P (length, d_model): P[t, 2i] = sin(t / 10000^(2i/E)), P[t, 2i+1] = cos(same),
    computed in float64 and rounded to ``dtype``."""
    t = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    frequencies = torch.exp(-math.log(10000.0)
                            * torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
                            / d_model)
    table = torch.zeros(length, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(t * frequencies)
    table[:, 1::2] = torch.cos(t * frequencies[:d_model // 2])
    return table.to(dtype)


# --------------------------------------------------------------------------- validation

def _check_config(config: object) -> TransformerSeq2SeqConfig:
    if not isinstance(config, TransformerSeq2SeqConfig):
        raise TypeError(f"config: expected a TransformerSeq2SeqConfig, "
                        f"got {type(config).__name__}")
    return config


def _check_params(params: object, config: TransformerSeq2SeqConfig) -> torch.dtype:
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors, got {type(params).__name__}")
    shapes = transformer_seq2seq_param_shapes(config)
    missing = sorted(set(shapes) - set(params))
    unexpected = sorted(set(params) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unexpected}")
    dtype = check_float_tensor("params['src_embedding.weight']",
                               params["src_embedding.weight"],
                               shapes["src_embedding.weight"]).dtype
    for name, shape in shapes.items():
        check_float_tensor(f"params[{name!r}]", params[name], shape, dtype=dtype)
    return dtype


def _check_ids(name: str, ids: object, vocab: int, shape: tuple) -> None:
    check_int_tensor(name, ids, shape, low=0, high=vocab)


def _check_src(src: object, src_lengths: object, config: TransformerSeq2SeqConfig) -> Tensor:
    """src (B, S), S <= max_len, and src_lengths (B,) in 1..S (None: every row full)."""
    _check_ids("src", src, config.src_vocab, ("B", "S"))
    B, S = src.shape
    if S > config.max_len:
        raise ValueError(f"src: expected at most max_len = {config.max_len} positions, got "
                         f"S = {S} (truncate the sources or build the model with a larger "
                         f"max_len)")
    if src_lengths is None:
        return torch.full((B,), S, dtype=torch.int64, device=src.device)
    check_int_tensor("src_lengths", src_lengths, (B,), low=1, high=S + 1)
    return src_lengths.to(device=src.device, dtype=torch.int64)


def _check_tgt(tgt_in: object, batch: int, config: TransformerSeq2SeqConfig) -> None:
    _check_ids("tgt_in", tgt_in, config.tgt_vocab, (batch, "T"))
    if tgt_in.shape[1] > config.max_len:
        raise ValueError(f"tgt_in: expected at most max_len = {config.max_len} positions, "
                         f"got T = {tgt_in.shape[1]}")


def _check_inputs(src: object, src_lengths: object, tgt_in: object, targets: object,
                  config: TransformerSeq2SeqConfig) -> tuple[Tensor, int, int, int]:
    """The ids of a forward -> (src_lengths, B, S, T)."""
    src_lengths = _check_src(src, src_lengths, config)
    B, S = src.shape
    _check_tgt(tgt_in, B, config)
    T = tgt_in.shape[1]
    if targets is not None:
        check_int_tensor("targets", targets, (B, T))
    return src_lengths, B, S, T


def _sub(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _padding(src_lengths: Tensor, S: int) -> Tensor:
    """(B, S) bool, True at the padding j >= n_b."""
    return torch.arange(S, device=src_lengths.device)[None, :] >= src_lengths[:, None]


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
    names: tuple                     # params keys, in order, for the order of dparams
    pointer: PointerCache | None


class PointerCache(NamedTuple):
    h: Tensor              # decoder output (B, T, E)
    memory: Tensor         # (B, S, E)
    index: Tensor          # source ids broadcast to (B, T, S)
    w_query: Tensor        # W_ptr (E, E)
    w_gate: Tensor         # w_gate (1, E)
    q: Tensor              # h W_ptrᵀ
    a: Tensor              # copy attention (B, T, S)
    g: Tensor              # P(generate) (B, T, 1)
    P: Tensor              # softmax(logits) (B, T, V)
    C: Tensor              # copied mass (B, T, V)
    p: Tensor              # g P + (1 - g) C, before the floor


def pointer_forward(h: Tensor, memory: Tensor, src: Tensor, padding: Tensor, logits: Tensor,
                    w_query: Tensor, w_gate: Tensor, b_gate: Tensor
                    ) -> tuple[Tensor, PointerCache]:
    """The pointer-generator's output log max(p, tiny) (B, T, V) from the decoder output h
    (B, T, E), the memory (B, S, E), the source ids (B, S) with padding (B, S) True at pads
    (every row has a key) and the generator's logits (B, T, V). Differentiable under autograd
    (the module's path); ``pointer_backward`` is its hand-written backward."""
    B, T, E = h.shape
    q = h @ w_query.t()
    scores = (q @ memory.transpose(1, 2)) / math.sqrt(E)
    a = torch.softmax(scores.masked_fill(padding[:, None, :], float("-inf")), dim=-1)
    g = torch.sigmoid(h @ w_gate.t() + b_gate)
    P = torch.softmax(logits, dim=-1)
    index = src[:, None, :].expand(B, T, src.shape[1])
    C = torch.zeros_like(P).scatter_add(-1, index, a)
    p = g * P + (1.0 - g) * C
    out = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    return out, PointerCache(h, memory, index, w_query, w_gate, q, a, g, P, C, p)


def pointer_backward(dout: Tensor, cache: PointerCache
                     ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """-> (dh, dmemory, dlogits, dparams of the pointer.* weights) for dout (B, T, V)."""
    h, m, a, g, P, C, p = cache.h, cache.memory, cache.a, cache.g, cache.P, cache.C, cache.p
    tiny = torch.finfo(p.dtype).tiny
    dp = torch.where(p > tiny, dout / p.clamp_min(tiny), 0.0)     # out = log p above the floor
    dP = g * dp                                                     # p = g P + (1 - g) C
    dlogits = P * (dP - (P * dP).sum(dim=-1, keepdim=True))         # P = softmax(logits)
    da = ((1.0 - g) * dp).gather(-1, cache.index)                   # C gathers a by source id
    dz = (dp * (P - C)).sum(dim=-1, keepdim=True) * g * (1.0 - g)   # g = σ(z)
    ds = a * (da - (a * da).sum(dim=-1, keepdim=True)) / math.sqrt(h.shape[-1])
    dq = ds @ m                                                     # scores = q mᵀ / √E
    dmemory = ds.transpose(1, 2) @ cache.q
    dh = dq @ cache.w_query + dz @ cache.w_gate
    E = h.shape[-1]
    grads = {"pointer.query.weight": dq.reshape(-1, E).t() @ h.reshape(-1, E),
             "pointer.gate.weight": dz.reshape(-1, 1).t() @ h.reshape(-1, E),
             "pointer.gate.bias": dz.reshape(-1, 1).sum(dim=0)}
    return dh, dmemory, dlogits, grads


def _positions(params: Mapping[str, Tensor], config: TransformerSeq2SeqConfig, length: int,
               like: Tensor) -> Tensor:
    if config.positions == "learned":
        return params["pos_embedding.weight"][:length]
    return sinusoidal_positions(length, config.d_model, like.dtype, like.device)


def _embed(ids: Tensor, weight: Tensor, positions: Tensor, scale: float, p: float,
           mask: Tensor | None) -> tuple[Tensor, EmbeddingCache, DropoutCache | None]:
    e, e_cache = embedding_forward(ids, weight)
    x = e * scale + positions
    if p == 0:
        return x, e_cache, None
    x, d_cache = dropout_forward(x, p, mask)
    return x, e_cache, d_cache


@torch.no_grad()
def transformer_seq2seq_forward(src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                                params: Mapping[str, Tensor], config: TransformerSeq2SeqConfig,
                                targets: Tensor | None = None, ignore_index: int = PAD,
                                dropout_masks: Mapping[str, Tensor] | None = None
                                ) -> tuple[tuple[Tensor, Tensor | None],
                                           TransformerSeq2SeqCache]:
    """-> ((logits (B, T, V_tgt), loss or None), cache); equations in the module docstring.

    src (B, S) right-padded to src_lengths (B,) (None: full), tgt_in (B, T), targets (B, T)
    with ``ignore_index`` where no loss is taken. dropout_masks: every site of
    ``transformer_seq2seq_dropout_mask_shapes`` when config.dropout > 0, else None.
    """
    config = _check_config(config)
    _check_params(params, config)
    src_lengths, B, S, T = _check_inputs(src, src_lengths, tgt_in, targets, config)
    p = config.dropout
    if p > 0 and dropout_masks is None:
        raise ValueError("dropout_masks: required when config.dropout > 0 (randomness is "
                         "explicit: see transformer_seq2seq_dropout_mask_shapes), got None")
    masks = dict(dropout_masks or {})
    scale = math.sqrt(config.d_model)
    weight = params["src_embedding.weight"]
    table = _positions(params, config, max(S, T), weight)
    x, src_e, src_d = _embed(src, weight, table[:S], scale, p, masks.get("src_embedding"))
    y, tgt_e, tgt_d = _embed(tgt_in, params[config.tgt_embedding_key], table[:T], scale, p,
                             masks.get("tgt_embedding"))
    padding = _padding(src_lengths, S)
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
        logits, pointer = pointer_forward(h, t_cache.memory, src, padding, logits,
                                          params["pointer.query.weight"],
                                          params["pointer.gate.weight"],
                                          params["pointer.gate.bias"])
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    return (logits, loss), TransformerSeq2SeqCache(src_e, tgt_e, src_d, tgt_d, t_cache, head,
                                                   loss_cache, config, S, T, tuple(params),
                                                   pointer)


@torch.no_grad()
def transformer_seq2seq_backward(cache: TransformerSeq2SeqCache, dlogits: Tensor | None = None,
                                 dloss: float | Tensor = 1.0) -> dict[str, Tensor]:
    """dparams keyed and ordered like params, from dloss (with targets) and/or dlogits
    (B, T, V_tgt)."""
    c = cache.config
    if dlogits is None and cache.loss is None:
        raise ValueError("dlogits: required when the forward had no targets (no loss)")
    h = cache.head.x
    logits_shape = (*h.shape[:2], c.tgt_vocab)
    if dlogits is None:
        d = h.new_zeros(logits_shape)
    else:
        d = check_float_tensor("dlogits", dlogits, logits_shape, dtype=h.dtype, finite=False)
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
        dpos = dx.new_zeros(c.max_len, c.d_model)
        dpos[:cache.src_len] += dx.sum(dim=0)
        dpos[:cache.tgt_len] += dy.sum(dim=0)
        grads["pos_embedding.weight"] = dpos
    if c.tie_embeddings:
        grads[key] = grads[key] + dw_head
    else:
        grads["head.weight"] = dw_head
        if db_head is not None:
            grads["head.bias"] = db_head
    return {name: grads[name] for name in cache.names}


# --------------------------------------------------------------------------- module

class TransformerSeq2Seq(nn.Module):
    """The Transformer encoder-decoder (module docstring); autograd through the fused ops.

    TransformerSeq2Seq(config, *, device=None, dtype=None). Submodules ``src_embedding``,
    ``tgt_embedding`` (nn.Embedding; none with share_embeddings, where the target reads
    ``src_embedding``), ``pos_embedding`` (learned positions only),
    ``transformer`` (this package's Transformer, batch-first, torch.nn's init) and ``head``
    (nn.Linear, absent with tie_embeddings); with ``pointer``, ``pointer.query``
    (nn.Linear(E, E, bias=False)) and ``pointer.gate`` (nn.Linear(E, 1)). Embeddings are drawn
    from N(0, 1/E), so that E[ids] · √E has unit variance.
    """

    def __init__(self, config: TransformerSeq2SeqConfig, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = c = _check_config(config)
        factory = {"device": device, "dtype": dtype}
        E = c.d_model
        self.src_embedding = nn.Embedding(c.src_vocab, E, **factory)
        if not c.share_embeddings:
            self.tgt_embedding = nn.Embedding(c.tgt_vocab, E, **factory)
        if c.positions == "learned":
            self.pos_embedding = nn.Embedding(c.max_len, E, **factory)
        self.transformer = Transformer(
            E, c.nhead, c.num_encoder_layers, c.num_decoder_layers, c.dim_feedforward,
            c.dropout, c.activation, layer_norm_eps=c.layer_norm_eps, norm_first=c.norm_first,
            bias=c.bias, **factory)
        if not c.tie_embeddings:
            self.head = nn.Linear(E, c.tgt_vocab, bias=c.bias, **factory)
        if c.pointer:
            self.pointer = nn.Module()
            self.pointer.query = nn.Linear(E, E, bias=False, **factory)
            self.pointer.gate = nn.Linear(E, 1, **factory)
        for name in ("src_embedding", "tgt_embedding", "pos_embedding"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, 0.0, 1.0 / math.sqrt(E))
        like = self.src_embedding.weight
        self.register_buffer("positions", sinusoidal_positions(c.max_len, E, like.dtype,
                                                               like.device), persistent=False)

    @property
    def _target_embedding(self) -> nn.Embedding:
        """The embedding of target tokens: the source's with share_embeddings."""
        return self.src_embedding if self.config.share_embeddings else self.tgt_embedding

    def _position_table(self) -> Tensor:
        if self.config.positions == "learned":
            return self.pos_embedding.weight
        return self.positions

    def _logits(self, h: Tensor) -> Tensor:
        if self.config.tie_embeddings:
            return F.linear(h, self._target_embedding.weight)
        return self.head(h)

    def forward(self, src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                targets: Tensor | None = None, ignore_index: int = PAD,
                dropout_masks: Mapping[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """-> (logits (B, T, V_tgt), loss or None); see ``transformer_seq2seq_forward``.
        Dropout only in training mode, with the given keep-masks or Bernoulli(1 - p)
        keep-masks drawn on src's device; in eval mode dropout_masks are ignored."""
        config = self.config
        src_lengths, B, S, T = _check_inputs(src, src_lengths, tgt_in, targets, config)
        p = config.dropout if self.training else 0.0
        if p > 0 and dropout_masks is None:
            shapes = transformer_seq2seq_dropout_mask_shapes(config, B, S, T)
            dropout_masks = {site: torch.empty(shape, device=src.device)
                             .bernoulli_(1.0 - p).bool() for site, shape in shapes.items()}
        masks = dict(dropout_masks or {}) if p > 0 else {}
        scale = math.sqrt(config.d_model)
        table = self._position_table()
        x = self.src_embedding(src) * scale + table[:S]
        y = self._target_embedding(tgt_in) * scale + table[:T]
        if p > 0:
            x = x * masks["src_embedding"] / (1.0 - p)
            y = y * masks["tgt_embedding"] / (1.0 - p)
        padding = _padding(src_lengths, S)
        h, memory = self.transformer(
            x, y, src_key_padding_mask=padding, memory_key_padding_mask=padding,
            tgt_is_causal=True, dropout_masks=_sub(masks, "transformer.") if p > 0 else None,
            return_memory=True)
        logits = self._logits(h)
        if config.pointer:
            ptr = self.pointer
            logits, _ = pointer_forward(h, memory, src, padding, logits, ptr.query.weight,
                                        ptr.gate.weight, ptr.gate.bias)
        if targets is None:
            return logits, None
        loss = cross_entropy(logits, targets, "mean", ignore_index)
        return logits, loss

    # ------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, src: Tensor, src_lengths: Tensor | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: Tensor | None = None, generator: torch.Generator | None = None,
                 return_dict: bool = False, **options: Any) -> Tensor | GenerateOutput:
        """Generate target sequences for the sources ``src`` (B, S) (right-padded to
        ``src_lengths``) as ``transformers``' encoder-decoder ``generate`` does ->
        sequences (B * num_return_sequences, 1 + L): ``decoder_start_token_id`` (an option,
        required: the target BOS) then the new tokens. Options and the other arguments as
        ``GPT.generate``. The encoder and the cross-attention keys and values run once."""
        session, config, ids, uniforms = self._generate_args(
            src, src_lengths, generation_config, options, uniforms, generator)
        return generation.run(session, ids, None, config, self.config.tgt_vocab, uniforms,
                              streamer, return_dict)

    def generate_stream(self, src: Tensor, src_lengths: Tensor | None = None,
                        generation_config: object = None, *, uniforms: Tensor | None = None,
                        generator: torch.Generator | None = None,
                        **options: Any) -> Iterator[Tensor]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's tokens."""
        session, config, ids, uniforms = self._generate_args(
            src, src_lengths, generation_config, options, uniforms, generator)
        tokens = generation.stream(session, ids, None, config, uniforms,
                                   self.config.tgt_vocab)
        return generation.no_grad_iterator(tokens)

    def _generate_args(self, src: object, src_lengths: object, generation_config: object,
                       options: dict[str, Any], uniforms: object, generator: object) -> tuple:
        src_lengths = _check_src(src, src_lengths, self.config)
        config, ids, uniforms = generation.prepare_decoder(
            src.shape[0], generation_config, options, vocab_size=self.config.tgt_vocab,
            weights=((f"params[{name!r}]", w) for name, w in self.named_parameters()),
            uniforms=uniforms, generator=generator, device=src.device)
        if config.max_new_tokens > self.config.max_len:
            raise ValueError(f"max_new_tokens: expected at most max_len = "
                             f"{self.config.max_len} (the decoder's positions), "
                             f"got {config.max_new_tokens}")
        session = _TransformerSeq2SeqSession(self, src, src_lengths, config.max_new_tokens)
        return session, config, ids, uniforms

    def extra_repr(self) -> str:
        return repr(self.config)


# --------------------------------------------------------------------------- decode session

def _t(w: Tensor | None) -> Tensor | None:
    return None if w is None else w.detach().t().contiguous()


class _TransformerSeq2SeqSession:
    """``generate``'s decode session (``generation.DecodeSession``), equations in the reference
    module's docstring: per decoder layer the cross-attention keys and values of the memory,
    computed in ``start`` and shared by a row's beams (never reordered), and a self-attention
    cache (N, h, capacity, d) written in place at slot t and reordered by index. A step is a
    straight line of ATen calls over weights laid out once for few-row products (transposed,
    kept with the model until a weight changes, ``generation.decode_layout``); the
    self-attention writes its cache slot and attends in one native call."""

    def __init__(self, model: TransformerSeq2Seq, src: Tensor, src_lengths: Tensor,
                 capacity: int) -> None:
        self.model, self.config, self.capacity = model, model.config, capacity
        self.src, self.src_lengths = src, src_lengths
        params = [w for _, w in model.named_parameters()]
        self.layout = generation.decode_layout(model, "transformer_seq2seq", params,
                                               self._layout)
        like = model._target_embedding.weight
        self.linear = decode_linear_for(like)
        self.attend = decode_attention_for(like)
        self.cross: list[tuple[Tensor, Tensor]] = []
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.memory_mask: Tensor | None = None
        self.copy: tuple[Tensor, Tensor, Tensor] | None = None   # pointer: memory, ids, pads
        self.t = 0

    def _layout(self) -> dict[str, Any]:
        model, E = self.model, self.config.d_model
        layers = []
        for layer in model.transformer.decoder.layers:
            sa, ca = layer.self_attn, layer.multihead_attn
            ca_bias = ca.in_proj_bias
            layers.append({
                "sa_in": _t(sa.in_proj_weight), "sa_in_bias": sa.in_proj_bias,
                "sa_out": _t(sa.out_proj.weight), "sa_out_bias": sa.out_proj.bias,
                "ca_q": _t(ca.in_proj_weight[:E]),
                "ca_q_bias": None if ca_bias is None else ca_bias[:E].detach(),
                "ca_kv": ca.in_proj_weight[E:].detach(),
                "ca_kv_bias": None if ca_bias is None else ca_bias[E:].detach(),
                "ca_out": _t(ca.out_proj.weight), "ca_out_bias": ca.out_proj.bias,
                "linear1": _t(layer.linear1.weight), "linear1_bias": layer.linear1.bias,
                "linear2": _t(layer.linear2.weight), "linear2_bias": layer.linear2.bias,
                "norms": [(n.weight, n.bias) for n in (layer.norm1, layer.norm2, layer.norm3)],
            })
        head = (model._target_embedding.weight if self.config.tie_embeddings
                else model.head.weight)
        final = model.transformer.decoder.norm
        return {"layers": [{k: (v.detach() if isinstance(v, Tensor) else v)
                            for k, v in layer.items()} for layer in layers],
                "head": _t(head),
                "head_bias": None if self.config.tie_embeddings or model.head.bias is None
                else model.head.bias.detach(),
                "final_norm": (final.weight, final.bias)}

    def start(self, ids: Tensor, mask: Tensor | None, expand: int) -> Tensor:
        model, c = self.model, self.config
        B, S = self.src.shape
        E, h = c.d_model, c.nhead
        d, N = E // h, B * expand
        table = model._position_table()
        x = model.src_embedding(self.src) * math.sqrt(E) + table[:S]
        padding = _padding(self.src_lengths, S)
        memory = model.transformer.encoder(x, src_key_padding_mask=padding)
        for layer in self.layout["layers"]:
            kv = F.linear(memory, layer["ca_kv"], layer["ca_kv_bias"])      # [K_c | V_c]
            k, v = kv.view(B, S, 2, h, d).permute(2, 0, 3, 1, 4)           # (B, h, S, d)
            self.cross.append((k.repeat_interleave(expand, dim=0).contiguous(),
                               v.repeat_interleave(expand, dim=0).contiguous()))
            self.keys.append(x.new_empty(N, h, self.capacity, d))
            self.values.append(x.new_empty(N, h, self.capacity, d))
        # 0 on a row's keys, -inf on its padding (every source has a key: lengths >= 1)
        self.memory_mask = torch.zeros(N, 1, 1, S, dtype=x.dtype, device=x.device).masked_fill(
            padding.repeat_interleave(expand, dim=0)[:, None, None, :], float("-inf"))
        if c.pointer:
            self.copy = (memory.repeat_interleave(expand, dim=0),
                         self.src.repeat_interleave(expand, dim=0),
                         padding.repeat_interleave(expand, dim=0))
        self.positions = table[:self.capacity].detach() * 1.0
        self.scale = math.sqrt(E)
        self.t = 0
        return self.step(ids[:, 0].repeat_interleave(expand))

    def step(self, tokens: Tensor) -> Tensor:
        c, layout, linear, t = self.config, self.layout, self.linear, self.t
        E, eps, N = c.d_model, c.layer_norm_eps, tokens.shape[0]
        h, d = c.nhead, c.d_model // c.nhead
        x = F.embedding(tokens, self.model._target_embedding.weight) * self.scale \
            + self.positions[t]
        relu = c.activation == "relu"
        for i, w in enumerate(layout["layers"]):
            (g1, b1), (g2, b2), (g3, b3) = w["norms"]
            k_c, v_c = self.cross[i]

            def self_attention(a: Tensor) -> Tensor:
                qkv = linear(a, w["sa_in"], w["sa_in_bias"])
                o = self.attend(qkv, self.keys[i], self.values[i], t, None)
                return linear(o, w["sa_out"], w["sa_out_bias"])

            def cross_attention(a: Tensor) -> Tensor:
                q = linear(a, w["ca_q"], w["ca_q_bias"]).view(N, h, 1, d)
                o = F.scaled_dot_product_attention(q, k_c, v_c, attn_mask=self.memory_mask)
                return linear(o.reshape(N, E), w["ca_out"], w["ca_out_bias"])

            def feed_forward(a: Tensor) -> Tensor:
                a = linear(a, w["linear1"], w["linear1_bias"])
                a = torch.relu(a) if relu else F.gelu(a)
                return linear(a, w["linear2"], w["linear2_bias"])

            if c.norm_first:
                x = x + self_attention(F.layer_norm(x, (E,), g1, b1, eps))
                x = x + cross_attention(F.layer_norm(x, (E,), g2, b2, eps))
                x = x + feed_forward(F.layer_norm(x, (E,), g3, b3, eps))
            else:
                x = F.layer_norm(x + self_attention(x), (E,), g1, b1, eps)
                x = F.layer_norm(x + cross_attention(x), (E,), g2, b2, eps)
                x = F.layer_norm(x + feed_forward(x), (E,), g3, b3, eps)
        g, b = layout["final_norm"]
        x = F.layer_norm(x, (E,), g, b, eps)
        self.t = t + 1
        logits = linear(x, layout["head"], layout["head_bias"])
        if self.copy is None:
            return logits
        memory, src, padding = self.copy
        ptr = self.model.pointer
        out, _ = pointer_forward(x[:, None], memory, src, padding, logits[:, None],
                                 ptr.query.weight, ptr.gate.weight, ptr.gate.bias)
        return out[:, 0]

    def reorder(self, index: Tensor) -> None:
        t = self.t
        for cache in (*self.keys, *self.values):
            cache[:, :, :t] = cache[:, :, :t].index_select(0, index)
