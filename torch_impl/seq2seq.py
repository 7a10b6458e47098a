"""An RNN encoder-decoder with Luong (Luong, Pham & Manning 2015) or Bahdanau (Bahdanau, Cho
& Bengio 2015) attention.

For source ids src (B, Ts) with lengths n_b, teacher-forced target input tgt_in (B, Tt),
cell ∈ {"lstm", "gru"}, D = 2 if bidirectional else 1, H the encoder size per direction:

    x          = E_src[src]                              (B, Ts, E)
    m, s_enc   = encoder-RNN(x; lengths n)               m (B, Ts, D·H), 0 at t >= n_b
    s_0        = bridge(s_enc)                           per layer [h_fwd; h_bwd] -> (L, B, D·H)
    y          = E_tgt[tgt_in]                           (B, Tt, E)
    h, s_n     = decoder-RNN(y, s_0)                     h (B, Tt, Hd), Hd = D·H
    c, a       = luong_attention(h, m; score, mask)      keys t >= n_b masked out
    h̃          = tanh(W_c [c; h])                         W_c (Hd, 2·Hd), no bias
    logits     = h̃ W_headᵀ + b_head                      (B, Tt, V_tgt)
    loss       = cross_entropy(logits, targets)          mean over targets != ignore_index

With ``attention=None`` the attention and W_c are skipped: h̃ = h.

With ``attention="bahdanau"`` the attention comes before the decoder RNN and its query is the
previous state, so the decoder runs one step at a time; for t = 1..Tt, with s_0 as above and
q_t = h^(L)_{t-1} the top layer's h of s_{t-1} (B, Hd):

    c_t, a_t   = additive_attention(q_t, m; mask)        e_tj = vᵀ tanh(W_q q_t + W_k m_j + b)
    h_t, s_t   = decoder-RNN([E_tgt[y_t]; c_t], s_{t-1})  one step, input size E + Hd
    h̃_t        = tanh(W_c [c_t; h_t])                     the same W_c (Hd, 2·Hd) as Luong's
    logits_t   = h̃_t W_headᵀ + b_head                    (B, V_tgt)

W_q (A, Hd), W_k (A, Hd), b (A,), v (1, A), A = Hd.

Bridge: the decoder's hidden size is D·H and its initial state, per layer, is the encoder's
final forward and backward states concatenated (h and, for the LSTM, c), so the bridge is a
reshape with no parameters (simpler than a learned tanh(W [h_fwd; h_bwd] + b) projection,
and the memory m and the decoder's h have the same size D·H, which the "dot" score needs).

Teacher forcing: the decoder input at step t is

    y_t[b] = tgt_in[b, t]                  where teacher_mask[b, t]  (None: everywhere)
             argmax_v logits[b, t-1, v]    elsewhere: the model's own previous prediction

with column 0 all True (step 0 has no previous prediction). The argmax is a choice, not a
function of the parameters: it carries no gradient, and the embedding rows actually read get
theirs. Two paths compute the decoder: Luong or no attention under full teacher forcing reads
the whole tgt_in in one RNN call; Bahdanau, or a teacher_mask with a False, runs the decoder
step by step (``_decoder_steps_forward``, the same per-step decoder as ``Seq2Seq.step``),
and its backward runs the steps in reverse carrying dstate.
Target padding is handled by the loss only (targets == ignore_index, PAD = 0 by default);
the decoder is causal, so trailing padding never changes the logits of earlier positions.

Dropout (rate p = config.dropout; inverted, with explicit bool keep-masks, see dropout.py):

    x          = E_src[src]  ⊙ m["encoder.embedding"] / (1 - p)      (B, Ts, E)
    y          = E_tgt[tgt_in] ⊙ m["decoder.embedding"] / (1 - p)    (B, Tt, E)
    x^{k+1}    = out^k ⊙ m["encoder.rnn.l{k}"] / (1 - p)             between stacked layers,
                 (and m["decoder.rnn.l{k}"] in the decoder RNN)       k < L - 1, (B, T, Hd)
    logits     = (h̃ ⊙ m["decoder.output"] / (1 - p)) W_headᵀ + b_head  (B, Tt, Hd)

``seq2seq_dropout_mask_shapes`` lists the sites and shapes. The step-by-step decoder reads
column t of each decoder mask at step t. Attention reads the top layer's h undropped.
``encode`` / ``step`` (decoding) never drop.

``seq2seq_forward`` / ``seq2seq_backward`` wire the existing hand-written pairs
(embedding.py, lstm.py, gru.py, rnn_attention.py, linear.py, activations.py, loss.py); the
``Seq2Seq`` module holds torch.nn-named parameters and runs that pair through
``Seq2SeqFunction``, so its backward is the hand-written one.

Parameter names: ``encoder.embedding.weight`` (V_src, E), ``encoder.rnn.<torch.nn names>``,
``decoder.embedding.weight`` (V_tgt, E), ``decoder.rnn.<torch.nn names>``,
``decoder.attention.<LuongAttention names>`` ("weight" for "general", "concat.weight" and
"energy.weight" for "concat", none for "dot") or ``decoder.attention.<AdditiveAttention
names>`` for "bahdanau" ("query_proj.weight", "key_proj.weight", "key_proj.bias",
"energy.weight"), ``decoder.combine.weight`` (Hd, 2·Hd),
``decoder.head.weight`` (V_tgt, Hd), ``decoder.head.bias`` (V_tgt,).

Decoding state (``Seq2SeqState``): memory (B, Ts, Hd), key_padding_mask (B, Ts) and the
decoder state (h,) or (h, c) stored batch-first as (B, L, Hd), so every leaf has batch on
axis 0 and the decoders can reorder it for beam search.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import generation
from .activations import TanhCache, tanh_backward, tanh_forward
from .checks import (
    check_dropout_masks,
    check_float_tensor,
    check_int_tensor,
    check_positive_int,
    check_probability,
    check_shape,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .generation import GenerateOutput
from .gru import GRU
from .language_model import _check_ids, _recurrent_backward, _recurrent_forward
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .lstm import LSTM
from .recurrent import DecodeStack, RecurrentCache
from .rnn_attention import (
    LUONG_SCORES,
    AdditiveAttention,
    AdditiveAttentionCache,
    LuongAttention,
    LuongAttentionCache,
    additive_attention_backward,
    additive_attention_forward,
    luong_attention_backward,
    luong_attention_forward,
)

SEQ2SEQ_CELLS = ("lstm", "gru")
ATTENTION_SCORES = (None, "dot", "general", "concat")   # the Luong decoder's scores, or none
ATTENTIONS = ATTENTION_SCORES + ("bahdanau",)           # every decoder Seq2SeqConfig accepts
PAD = 0


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Sizes and choices of a Seq2Seq model; ``attention`` is a Luong score, "bahdanau" or
    None (one of ATTENTIONS)."""
    src_vocab: int
    tgt_vocab: int
    embed_size: int
    hidden_size: int            # H, per encoder direction; the decoder has D·H
    num_layers: int = 1         # of the encoder and of the decoder
    cell: str = "lstm"
    bidirectional: bool = False
    attention: str | None = "general"
    dropout: float = 0.0        # p of every dropout site (seq2seq_dropout_mask_shapes)

    def __post_init__(self) -> None:
        for name in ("src_vocab", "tgt_vocab", "embed_size", "hidden_size", "num_layers"):
            check_positive_int(name, getattr(self, name))
        if self.cell not in SEQ2SEQ_CELLS:
            raise ValueError(f"cell: expected one of {', '.join(map(repr, SEQ2SEQ_CELLS))}, "
                             f"got {self.cell!r}")
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got "
                            f"{type(self.bidirectional).__name__}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of "
                             f"{', '.join(map(repr, ATTENTIONS))}, got {self.attention!r}")
        check_probability("dropout", self.dropout)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def decoder_size(self) -> int:
        """Hd = D·H: the decoder holds the concatenated final states of both directions."""
        return self.num_directions * self.hidden_size


# ----------------------------------------------------------------------------- validation

def _check_config(config: object) -> Seq2SeqConfig:
    if not isinstance(config, Seq2SeqConfig):
        raise TypeError(f"config: expected a Seq2SeqConfig, got {type(config).__name__}")
    return config


def _check_params(params: object, config: Seq2SeqConfig) -> torch.dtype:
    """The fixed-shape tensors; rnn.* and attention.* are checked by their own forwards."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors, got {type(params).__name__}")
    Hd, V_tgt = config.decoder_size, config.tgt_vocab
    shapes = {"encoder.embedding.weight": (config.src_vocab, config.embed_size),
              "decoder.embedding.weight": (V_tgt, config.embed_size),
              "decoder.head.weight": (V_tgt, Hd), "decoder.head.bias": (V_tgt,)}
    prefixes = ["encoder.rnn.", "decoder.rnn."]
    if config.attention is not None:
        shapes["decoder.combine.weight"] = (Hd, 2 * Hd)
        prefixes.append("decoder.attention.")
    for name in shapes:
        if name not in params:
            raise ValueError(f"params: missing {name!r}")
    unexpected = sorted(k for k in params
                        if k not in shapes and not k.startswith(tuple(prefixes)))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} for attention="
                         f"{config.attention!r} (expected {list(shapes)} and {prefixes}*)")
    dtype = check_float_tensor("params['encoder.embedding.weight']",
                               params["encoder.embedding.weight"], shapes.pop(
                                   "encoder.embedding.weight")).dtype
    for name, shape in shapes.items():
        check_float_tensor(f"params[{name!r}]", params[name], shape, dtype=dtype)
    return dtype


def _check_src(src: object, src_lengths: object, config: Seq2SeqConfig) -> Tensor:
    """src (B, Ts) and src_lengths (B,) in 1..Ts (None: every row full); returns lengths."""
    _check_ids("src", src, config.src_vocab, ("B", "Ts"))
    B, Ts = src.shape
    if src_lengths is None:
        return torch.full((B,), Ts, dtype=torch.int64, device=src.device)
    check_int_tensor("src_lengths", src_lengths, (B,), low=1, high=Ts + 1)
    return src_lengths.to(device=src.device, dtype=torch.int64)


def _check_teacher_mask(teacher_mask: object, tgt_in: Tensor) -> Tensor | None:
    """teacher_mask bool (B, Tt), True = read tgt_in, with column 0 all True; None passes."""
    if teacher_mask is None:
        return None
    shape = tuple(tgt_in.shape)
    if not isinstance(teacher_mask, Tensor):
        raise TypeError(f"teacher_mask: expected a bool torch.Tensor of shape {shape} (B, Tt), "
                        f"got {type(teacher_mask).__name__}")
    if teacher_mask.dtype != torch.bool:
        raise TypeError(f"teacher_mask: expected dtype torch.bool (True = read tgt_in, False = "
                        f"the model's previous prediction), got {teacher_mask.dtype}")
    check_shape("teacher_mask", teacher_mask.shape, shape)
    if teacher_mask.device != tgt_in.device:
        raise ValueError(f"teacher_mask: expected the device of tgt_in ({tgt_in.device}), got "
                         f"{teacher_mask.device}")
    # compiled code cannot read the mask to raise on (column 0 is then not checked)
    if not torch.compiler.is_compiling() and not bool(teacher_mask[:, 0].all()):
        rows = torch.nonzero(~teacher_mask[:, 0]).flatten().tolist()
        raise ValueError(f"teacher_mask: column 0 must be all True (step 0 has no previous "
                         f"prediction to read), got False in rows {rows}")
    return teacher_mask


def _sub(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- dropout

def seq2seq_dropout_mask_shapes(config: Seq2SeqConfig, batch: int, src_steps: int,
                                tgt_steps: int) -> dict[str, tuple[int, ...]]:
    """The dropout sites and their keep-mask shapes, for src (batch, src_steps) and tgt_in
    (batch, tgt_steps); "{encoder,decoder}.rnn.l{k}" is on layer k's output (k < L - 1)."""
    config = _check_config(config)
    B, Ts, Tt = (check_positive_int(name, n) for name, n in
                 (("batch", batch), ("src_steps", src_steps), ("tgt_steps", tgt_steps)))
    E, Hd, L = config.embed_size, config.decoder_size, config.num_layers
    shapes = {"encoder.embedding": (B, Ts, E)}
    shapes.update({f"encoder.rnn.l{k}": (B, Ts, Hd) for k in range(L - 1)})   # D·H = Hd
    shapes["decoder.embedding"] = (B, Tt, E)
    shapes.update({f"decoder.rnn.l{k}": (B, Tt, Hd) for k in range(L - 1)})
    shapes["decoder.output"] = (B, Tt, Hd)
    return shapes


def _check_dropout_masks(masks: object, config: Seq2SeqConfig, B: int, Ts: int, Tt: int,
                         device: torch.device) -> Mapping[str, Tensor] | None:
    return check_dropout_masks(masks, config.dropout,
                               seq2seq_dropout_mask_shapes(config, B, Ts, Tt),
                               "seq2seq_dropout_mask_shapes", device)


def _dropout(x: Tensor, p: float, masks: Mapping | None, site: str
             ) -> tuple[Tensor, DropoutCache | None]:
    """x ⊙ masks[site] / (1 - p), or x unchanged without masks."""
    if masks is None:
        return x, None
    return dropout_forward(x, p, masks[site])


def _rnn_dropout(config: Seq2SeqConfig, masks: Mapping | None, prefix: str
                 ) -> tuple[float, list | None]:
    """The (dropout, masks) arguments of the RNN: its inter-layer masks, in layer order."""
    if masks is None or config.num_layers == 1:
        return 0.0, None
    return config.dropout, [masks[f"{prefix}.l{k}"] for k in range(config.num_layers - 1)]


# ----------------------------------------------------------------------------- bridge

def _bridge(state_part: Tensor, D: int) -> Tensor:
    """(L·D, B, H) indexed k·D + d  ->  (L, B, D·H) = per layer [h_fwd; h_bwd]."""
    LD, B, H = state_part.shape
    return state_part.reshape(LD // D, D, B, H).transpose(1, 2).reshape(LD // D, B, D * H)


def _bridge_backward(dstate_part: Tensor, D: int) -> Tensor:
    """The inverse reshape: (L, B, D·H) -> (L·D, B, H)."""
    L, B, DH = dstate_part.shape
    H = DH // D
    return dstate_part.reshape(L, B, D, H).transpose(1, 2).reshape(L * D, B, H)


# ----------------------------------------------------------------------------- encoder, decoder

class EncoderCache(NamedTuple):
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None  # None without dropout
    rnn: RecurrentCache


def _encoder_forward(src: Tensor, src_lengths: Tensor, params: Mapping, config: Seq2SeqConfig,
                     masks: Mapping | None = None
                     ) -> tuple[Tensor, Tensor, tuple, EncoderCache]:
    """(memory m (B, Ts, Hd), key_padding_mask (B, Ts), decoder state s_0, cache); dropout
    with the encoder's keep-masks when ``masks`` is given."""
    x, embedding = embedding_forward(src, params["encoder.embedding.weight"])
    x, embedding_dropout = _dropout(x, config.dropout, masks, "encoder.embedding")
    memory, state_n, rnn = _recurrent_forward(config.cell, x, _sub(params, "encoder.rnn."),
                                              None, src_lengths,
                                              *_rnn_dropout(config, masks, "encoder.rnn"))
    key_padding_mask = torch.arange(src.shape[1], device=src.device) >= src_lengths[:, None]
    state0 = tuple(_bridge(s, config.num_directions) for s in state_n)
    return memory, key_padding_mask, state0, EncoderCache(embedding, embedding_dropout, rnn)


class DecoderCache(NamedTuple):
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None  # None without dropout
    attention: LuongAttentionCache | AdditiveAttentionCache | None   # None without attention
    rnn: RecurrentCache
    combine: LinearCache | None             # W_c [c; h]
    tanh: TanhCache | None                  # h̃ = tanh(W_c [c; h])
    output_dropout: DropoutCache | None     # h̃ ⊙ m / (1 - p); None without dropout
    head: LinearCache


def _decoder_forward(tokens: Tensor, state0: tuple, memory: Tensor, key_padding_mask: Tensor,
                     params: Mapping, config: Seq2SeqConfig, masks: Mapping | None = None
                     ) -> tuple[Tensor, tuple, DecoderCache]:
    """(logits (B, T, V_tgt), decoder state s_T, cache) for decoder inputs tokens (B, T).

    Luong or no attention runs all T steps in one RNN call; Bahdanau's query is s_{t-1}, so
    it takes one step (T = 1): this is then the per-step decoder of training and decoding.
    ``masks``: the decoder's keep-masks for these T steps, or None (no dropout).
    """
    y, embedding = embedding_forward(tokens, params["decoder.embedding.weight"])
    y, embedding_dropout = _dropout(y, config.dropout, masks, "decoder.embedding")
    x, context, attention = y, None, None
    if config.attention == "bahdanau":
        query = state0[0][-1].unsqueeze(1)        # q_t = top layer's h of s_{t-1}  (B, 1, Hd)
        (context, _), attention = additive_attention_forward(
            query, memory, _sub(params, "decoder.attention."), key_padding_mask)
        x = torch.cat([y, context], dim=-1)       # [E_tgt[y_t]; c_t]
    h, state_n, rnn = _recurrent_forward(config.cell, x, _sub(params, "decoder.rnn."), state0,
                                         None, *_rnn_dropout(config, masks, "decoder.rnn"))
    if config.attention in LUONG_SCORES:
        (context, _), attention = luong_attention_forward(
            h, memory, _sub(params, "decoder.attention."), config.attention, key_padding_mask)
    combine = tanh = None
    h_tilde = h
    if context is not None:
        pre, combine = linear_forward(torch.cat([context, h], dim=-1),
                                      params["decoder.combine.weight"])
        h_tilde, tanh = tanh_forward(pre)
    h_tilde, output_dropout = _dropout(h_tilde, config.dropout, masks, "decoder.output")
    logits, head = linear_forward(h_tilde, params["decoder.head.weight"],
                                  params["decoder.head.bias"])
    return logits, state_n, DecoderCache(embedding, embedding_dropout, attention, rnn, combine,
                                         tanh, output_dropout, head)


def _decoder_backward(dlogits: Tensor, cache: DecoderCache, config: Seq2SeqConfig,
                      dstate_n: tuple | None = None
                      ) -> tuple[dict[str, Tensor], Tensor | None, tuple]:
    """(dparams of the decoder, dmemory or None, dstate0) from dlogits and dstate_n (None:
    zeros), the gradient on the final decoder state."""
    dh_tilde, dhead_weight, dhead_bias = linear_backward(dlogits, cache.head)
    dparams = {"decoder.head.weight": dhead_weight, "decoder.head.bias": dhead_bias}
    if cache.output_dropout is not None:
        dh_tilde = dropout_backward(dh_tilde, cache.output_dropout)
    dcontext, dh, dmemory = None, dh_tilde, None
    if cache.combine is not None:
        dpre = tanh_backward(dh_tilde, cache.tanh)                       # h̃ = tanh(pre)
        dcat, dparams["decoder.combine.weight"], _ = linear_backward(dpre, cache.combine)
        Hd = config.decoder_size
        dcontext, dh = dcat[..., :Hd].contiguous(), dcat[..., Hd:]       # [c; h]
    if config.attention in LUONG_SCORES:
        dh_score, dmemory, dattention = luong_attention_backward(dcontext, cache.attention)
        dh = dh + dh_score
        dparams.update({"decoder.attention." + k: v for k, v in dattention.items()})
    dx, drnn, dstate0 = _recurrent_backward(config.cell, dh.contiguous(), cache.rnn, dstate_n)
    dy = dx
    if config.attention == "bahdanau":
        E = config.embed_size
        dy, dcontext_in = dx[..., :E].contiguous(), dx[..., E:]         # [E_tgt[y_t]; c_t]
        dquery, dmemory, dattention = additive_attention_backward(dcontext + dcontext_in,
                                                                  cache.attention)
        dh0 = dstate0[0]                          # q_t = top layer's h of s_{t-1}
        dh0 = torch.cat([dh0[:-1], (dh0[-1] + dquery[:, 0])[None]])
        dstate0 = (dh0,) + tuple(dstate0[1:])
        dparams.update({"decoder.attention." + k: v for k, v in dattention.items()})
    if cache.embedding_dropout is not None:
        dy = dropout_backward(dy, cache.embedding_dropout)
    dparams["decoder.embedding.weight"] = embedding_backward(dy, cache.embedding)
    dparams.update({"decoder.rnn." + k: v for k, v in drnn.items()})
    return dparams, dmemory, dstate0


class DecoderStepsCache(NamedTuple):
    steps: list          # the DecoderCache of each step t, each for tokens (B, 1)


def _decoder_steps_forward(tgt_in: Tensor, teacher_mask: Tensor | None, state0: tuple,
                           memory: Tensor, key_padding_mask: Tensor, params: Mapping,
                           config: Seq2SeqConfig, masks: Mapping | None = None
                           ) -> tuple[Tensor, tuple, DecoderStepsCache]:
    """(logits (B, Tt, V_tgt), decoder state s_n, cache), one step at a time; step t reads
    tgt_in[:, t] where teacher_mask[:, t] (None: everywhere), else argmax(logits[:, t-1]),
    and column t of each decoder keep-mask (B, Tt, ...)."""
    state, logits, steps = state0, [], []
    for t in range(tgt_in.shape[1]):
        tokens = tgt_in[:, t]
        if t > 0 and teacher_mask is not None:
            # The model's own choice: data, not a function of the parameters (no gradient).
            tokens = torch.where(teacher_mask[:, t], tokens.long(),
                                 logits[-1][:, 0].argmax(dim=-1))
        masks_t = None if masks is None else {
            site: m[:, t:t + 1].contiguous() for site, m in masks.items()
            if site.startswith("decoder.")}
        logits_t, state, step = _decoder_forward(tokens.unsqueeze(1), state, memory,
                                                 key_padding_mask, params, config, masks_t)
        logits.append(logits_t)
        steps.append(step)
    return torch.cat(logits, dim=1), state, DecoderStepsCache(steps)


def _decoder_steps_backward(dlogits: Tensor, cache: DecoderStepsCache, config: Seq2SeqConfig
                            ) -> tuple[dict[str, Tensor], Tensor | None, tuple]:
    """(dparams of the decoder, dmemory or None, dstate0): the steps in reverse, carrying
    dstate from step t back into step t-1 and summing the parameter and memory gradients."""
    dparams: dict[str, Tensor] = {}
    dmemory, dstate = None, None
    for t in reversed(range(len(cache.steps))):
        dparams_t, dmemory_t, dstate = _decoder_backward(dlogits[:, t:t + 1].contiguous(),
                                                         cache.steps[t], config, dstate)
        for name, d in dparams_t.items():
            dparams[name] = dparams[name] + d if name in dparams else d
        if dmemory_t is not None:
            dmemory = dmemory_t if dmemory is None else dmemory + dmemory_t
    return dparams, dmemory, dstate


# ----------------------------------------------------------------------------- functional

class Seq2SeqCache(NamedTuple):
    config: Seq2SeqConfig
    names: tuple                    # params keys, in order, for the order of dparams
    encoder: EncoderCache
    decoder: DecoderCache | DecoderStepsCache   # one RNN call, or step by step
    loss: CrossEntropyCache | None  # None without targets
    logits_shape: tuple             # (B, Tt, V_tgt)
    dtype: torch.dtype


@torch.no_grad()
def seq2seq_forward(src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                    params: Mapping[str, Tensor], config: Seq2SeqConfig,
                    targets: Tensor | None = None, ignore_index: int = PAD,
                    teacher_mask: Tensor | None = None,
                    dropout_masks: Mapping[str, Tensor] | None = None
                    ) -> tuple[tuple[Tensor, Tensor | None], Seq2SeqCache]:
    """The encoder-decoder (equations in the module docstring).

    src int (B, Ts), src_lengths int (B,) in 1..Ts or None (all Ts), tgt_in int (B, Tt),
    targets int (B, Tt) or None, teacher_mask bool (B, Tt) with column 0 True, or None (full
    teacher forcing): where False, step t reads argmax(logits[b, t-1]) instead of tgt_in.
    dropout_masks: required iff config.dropout > 0, a dict of bool keep-masks on src's device
    with the keys and shapes of ``seq2seq_dropout_mask_shapes(config, B, Ts, Tt)``.
    Returns ((logits (B, Tt, V_tgt), loss 0-d or None), cache).
    """
    config = _check_config(config)
    dtype = _check_params(params, config)
    src_lengths = _check_src(src, src_lengths, config)
    B = src.shape[0]
    _check_ids("tgt_in", tgt_in, config.tgt_vocab, (B, "Tt"))
    if targets is not None:
        check_int_tensor("targets", targets, tuple(tgt_in.shape))
    teacher_mask = _check_teacher_mask(teacher_mask, tgt_in)
    dropout_masks = _check_dropout_masks(dropout_masks, config, B, src.shape[1],
                                         tgt_in.shape[1], src.device)
    # a mask with no False computes what the one-call decoder does; compiled code cannot read
    # the mask to find out, and takes the step-by-step decoder for any mask
    stepwise = config.attention == "bahdanau" or (
        teacher_mask is not None
        and (torch.compiler.is_compiling() or not bool(teacher_mask.all())))
    return _seq2seq_forward(src, src_lengths, tgt_in, params, config, targets, ignore_index,
                            teacher_mask, stepwise, dtype, dropout_masks)


@torch.no_grad()
def _seq2seq_forward(src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                     params: Mapping[str, Tensor], config: Seq2SeqConfig,
                     targets: Tensor | None, ignore_index: int, teacher_mask: Tensor | None,
                     stepwise: bool, dtype: torch.dtype,
                     dropout_masks: Mapping[str, Tensor] | None = None
                     ) -> tuple[tuple[Tensor, Tensor | None], Seq2SeqCache]:
    """seq2seq_forward on checked inputs; ``stepwise`` picks the step-by-step decoder, which
    Luong and no attention take only for a teacher_mask with a False (tests force it)."""
    memory, key_padding_mask, state0, encoder = _encoder_forward(src, src_lengths, params,
                                                                 config, dropout_masks)
    if stepwise:
        logits, _, decoder = _decoder_steps_forward(tgt_in, teacher_mask, state0, memory,
                                                    key_padding_mask, params, config,
                                                    dropout_masks)
    else:
        logits, _, decoder = _decoder_forward(tgt_in, state0, memory, key_padding_mask,
                                              params, config, dropout_masks)
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    return (logits, loss), Seq2SeqCache(config, tuple(params), encoder, decoder, loss_cache,
                                        tuple(logits.shape), dtype)


@torch.no_grad()
def seq2seq_backward(cache: Seq2SeqCache, dlogits: Tensor | None = None,
                     dloss: float | Tensor = 1.0) -> dict[str, Tensor]:
    """Gradients of L = dloss · loss + <logits, dlogits>, keyed and ordered like params.

    dlogits (B, Tt, V_tgt) or None (zeros); dloss is unused when the forward had no targets.
    """
    if not isinstance(cache, Seq2SeqCache):
        raise TypeError(f"cache: expected the Seq2SeqCache of seq2seq_forward, "
                        f"got {type(cache).__name__}")
    config = cache.config
    if dlogits is None:
        dlogits = torch.zeros(cache.logits_shape, dtype=cache.dtype,
                              device=cache.encoder.embedding.ids.device)
    else:
        check_float_tensor("dlogits", dlogits, cache.logits_shape, dtype=cache.dtype,
                           finite=False)
    if cache.loss is not None:
        dlogits = dlogits + cross_entropy_backward(dloss, cache.loss)
    if isinstance(cache.decoder, DecoderStepsCache):
        dparams, dmemory, dstate0 = _decoder_steps_backward(dlogits, cache.decoder, config)
    else:
        dparams, dmemory, dstate0 = _decoder_backward(dlogits, cache.decoder, config)
    # s_0 = bridge(s_enc): the decoder's dstate0 is the encoder's dstate_n, reshaped back.
    dstate_n = tuple(_bridge_backward(d, config.num_directions) for d in dstate0)
    dx, drnn, _ = _recurrent_backward(config.cell, dmemory, cache.encoder.rnn, dstate_n)
    if cache.encoder.embedding_dropout is not None:
        dx = dropout_backward(dx, cache.encoder.embedding_dropout)
    dparams["encoder.embedding.weight"] = embedding_backward(dx, cache.encoder.embedding)
    dparams.update({"encoder.rnn." + k: v for k, v in drnn.items()})
    return {name: dparams[name] for name in cache.names}


class Seq2SeqFunction(torch.autograd.Function):
    """(logits, loss) of ``seq2seq_forward`` with ``seq2seq_backward`` as the backward.

    apply(src, src_lengths, tgt_in, targets, config, ignore_index, teacher_mask, dropout_masks,
    names, *weights): the params as parallel ``names`` / ``weights``. Without targets, loss is
    a 0-d zero.
    """

    @staticmethod
    def forward(ctx, src, src_lengths, tgt_in, targets, config, ignore_index, teacher_mask,
                dropout_masks, names, *weights):
        (logits, loss), cache = seq2seq_forward(src, src_lengths, tgt_in,
                                                dict(zip(names, weights)), config, targets,
                                                ignore_index, teacher_mask, dropout_masks)
        ctx.save_for_backward(*weights)  # version-counter checks on the parameters
        ctx.cache = cache
        ctx.set_materialize_grads(False)
        return logits, logits.new_zeros(()) if loss is None else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogits, dloss):
        _ = ctx.saved_tensors  # raises if a parameter was modified in place since forward
        dparams = seq2seq_backward(ctx.cache, dlogits, 0.0 if dloss is None else dloss)
        need = ctx.needs_input_grad[9:]
        return (None,) * 9 + tuple(d if n else None for d, n in zip(dparams.values(), need))


# ----------------------------------------------------------------------------- module

class Seq2SeqState(NamedTuple):
    """Decoding state; batch on axis 0 of every tensor (for beam reordering)."""
    memory: Tensor             # m (B, Ts, Hd)
    key_padding_mask: Tensor   # (B, Ts) bool, True = padding
    hidden: tuple              # (h,) or (h, c), each (B, L, Hd)


class Seq2Seq(nn.Module):
    """The encoder-decoder; autograd through ``Seq2SeqFunction`` (hand-written backward).

    Seq2Seq(config, *, device=None, dtype=None). Submodules ``encoder.embedding``,
    ``encoder.rnn``, ``decoder.embedding``, ``decoder.rnn``, ``decoder.attention`` (this
    package's LuongAttention, or AdditiveAttention(Hd, Hd, Hd) for "bahdanau"),
    ``decoder.combine`` (nn.Linear, no bias) and ``decoder.head`` (nn.Linear), with torch's
    default init.
    """

    def __init__(self, config: Seq2SeqConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = c = _check_config(config)
        factory = {"device": device, "dtype": dtype}
        Hd, E = c.decoder_size, c.embed_size
        cls = LSTM if c.cell == "lstm" else GRU
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(c.src_vocab, E, **factory)
        self.encoder.rnn = cls(E, c.hidden_size, c.num_layers, bidirectional=c.bidirectional,
                               **factory)
        self.decoder = nn.Module()
        self.decoder.embedding = nn.Embedding(c.tgt_vocab, E, **factory)
        # Bahdanau's decoder RNN reads [E_tgt[y_t]; c_t].
        decoder_input = E + Hd if c.attention == "bahdanau" else E
        self.decoder.rnn = cls(decoder_input, Hd, c.num_layers, **factory)
        if c.attention is not None:
            self.decoder.attention = (AdditiveAttention(Hd, Hd, Hd, **factory)
                                      if c.attention == "bahdanau"
                                      else LuongAttention(Hd, Hd, c.attention, **factory))
            self.decoder.combine = nn.Linear(2 * Hd, Hd, bias=False, **factory)
        self.decoder.head = nn.Linear(Hd, c.tgt_vocab, **factory)

    def forward(self, src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                targets: Tensor | None = None, ignore_index: int = PAD,
                teacher_forcing_ratio: float = 1.0, teacher_mask: Tensor | None = None,
                dropout_masks: Mapping[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """-> (logits (B, Tt, V_tgt), loss or None); see ``seq2seq_forward``.

        teacher_mask, when given, wins; else with teacher_forcing_ratio < 1 each (b, t >= 1)
        reads tgt_in with probability teacher_forcing_ratio, drawn from torch's default
        generator on tgt_in's device. Dropout only in training mode, with the given keep-masks
        or Bernoulli(1 - p) keep-masks drawn on src's device (after the teacher_mask); in eval
        mode dropout_masks are ignored.
        """
        ratio = check_probability("teacher_forcing_ratio", teacher_forcing_ratio,
                                  allow_one=True)
        if teacher_mask is None and ratio < 1:
            _check_ids("tgt_in", tgt_in, self.config.tgt_vocab, ("B", "Tt"))
            teacher_mask = torch.rand(tgt_in.shape, device=tgt_in.device) < ratio
            teacher_mask[:, 0] = True
        config = self.config
        if not self.training or config.dropout == 0:
            config, dropout_masks = dataclasses.replace(config, dropout=0.0), None
        elif dropout_masks is None:
            _check_ids("src", src, config.src_vocab, ("B", "Ts"))
            _check_ids("tgt_in", tgt_in, config.tgt_vocab, (src.shape[0], "Tt"))
            shapes = seq2seq_dropout_mask_shapes(config, *src.shape, tgt_in.shape[1])
            dropout_masks = {site: torch.empty(shape, device=src.device)
                             .bernoulli_(1.0 - config.dropout).bool()
                             for site, shape in shapes.items()}
        names, weights = zip(*self.named_parameters())
        logits, loss = Seq2SeqFunction.apply(src, src_lengths, tgt_in, targets, config,
                                             ignore_index, teacher_mask, dropout_masks, names,
                                             *weights)
        return logits, None if targets is None else loss

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def encode(self, src: Tensor, src_lengths: Tensor | None = None) -> Seq2SeqState:
        """Run the encoder once, never with dropout: the initial decoding state for ``step``."""
        src_lengths = _check_src(src, src_lengths, self.config)
        memory, mask, state0, _ = _encoder_forward(src, src_lengths,
                                                   dict(self.named_parameters()), self.config)
        return Seq2SeqState(memory, mask, tuple(s.transpose(0, 1) for s in state0))

    @torch.no_grad()
    def step(self, tokens: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        """One decoder step, never with dropout: tokens int (B,) -> (logits (B, V_tgt), next
        state)."""
        _check_ids("tokens", tokens, self.config.tgt_vocab, ("B",))
        if not isinstance(state, Seq2SeqState):
            raise TypeError(f"state: expected the Seq2SeqState of encode, "
                            f"got {type(state).__name__}")
        hidden = tuple(h.transpose(0, 1).contiguous() for h in state.hidden)
        logits, hidden, _ = _decoder_forward(tokens[:, None], hidden, state.memory,
                                             state.key_padding_mask,
                                             dict(self.named_parameters()), self.config)
        return logits[:, 0], state._replace(hidden=tuple(h.transpose(0, 1) for h in hidden))

    # ------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, src: Tensor, src_lengths: Tensor | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: Tensor | None = None, generator: torch.Generator | None = None,
                 return_dict: bool = False, **options: Any) -> Tensor | GenerateOutput:
        """Generate target sequences for the sources ``src`` (B, Ts) (right-padded to
        ``src_lengths``) as ``transformers``' encoder-decoder ``generate`` does ->
        sequences (B * num_return_sequences, 1 + L): ``decoder_start_token_id`` (an option,
        required: the target BOS) then the new tokens. Options and the other arguments as
        ``GPT.generate`` (``generation`` module docstring). The encoder runs once; its memory
        is shared by a row's beams."""
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
        return _Seq2SeqSession(self, src, src_lengths), config, ids, uniforms

    def extra_repr(self) -> str:
        return repr(self.config)


class _Seq2SeqSession:
    """``generate``'s decode session for a Seq2Seq (``generation.DecodeSession``): the
    encoder runs once in ``start``, and with it the memory's side of the attention score
    (Luong "general": k_j = W_a m_j; "concat" and Bahdanau: W_k m_j (+ b)); memory, keys and
    the padding mask are repeated per beam and never reordered (a row's beams share its
    source). The decoder state (h,) or (h, c), each (L, N, Hd), is what a step updates and
    a reorder selects. A step is a straight line of ops over weights laid out once
    (``recurrent.DecodeStack``; the head, W_c and W_q transposed for few-row products): the
    equations of ``_decoder_forward`` for one token, validated once per call."""

    def __init__(self, model: Seq2Seq, src: Tensor, src_lengths: Tensor) -> None:
        self.config, self.params = model.config, dict(model.named_parameters())
        self.src, self.src_lengths = src, src_lengths
        self.layout = generation.decode_layout(
            model, "seq2seq", list(self.params.values()), self._layout)
        self.linear = self.layout["stack"].linear
        self.memory = self.keys = self.additive_mask = None
        self.hidden: tuple = ()

    def _layout(self) -> dict[str, Any]:
        config, p = self.config, {k: v.detach() for k, v in self.params.items()}
        attention = _sub(p, "decoder.attention.")
        layout = {"stack": DecodeStack(config.cell, _sub(p, "decoder.rnn."), config.num_layers),
                  "embedding": p["decoder.embedding.weight"],
                  "head": p["decoder.head.weight"].t().contiguous(),
                  "head_bias": p["decoder.head.bias"]}
        if config.attention is not None:
            layout["combine"] = p["decoder.combine.weight"].t().contiguous()
        if config.attention == "concat":
            Dq = config.decoder_size
            w_c = attention["concat.weight"]
            layout.update(w_q=w_c[:, :Dq].t().contiguous(), w_k=w_c[:, Dq:], b_k=None,
                          v=attention["energy.weight"][0])
        elif config.attention == "bahdanau":
            layout.update(w_q=attention["query_proj.weight"].t().contiguous(),
                          w_k=attention["key_proj.weight"], b_k=attention["key_proj.bias"],
                          v=attention["energy.weight"][0])
        elif config.attention == "general":
            layout["w_a"] = attention["weight"]
        return layout

    def start(self, ids: Tensor, mask: Tensor | None, expand: int) -> Tensor:
        memory, key_padding_mask, state0, _ = _encoder_forward(
            self.src, self.src_lengths, self.params, self.config)
        layout, score = self.layout, self.config.attention
        keys = memory                                       # "dot": k_j = m_j
        if score == "general":
            keys = memory @ layout["w_a"].t()               # k_j = W_a m_j   (B, Ts, Dq)
        elif score in ("concat", "bahdanau"):
            keys = F.linear(memory, layout["w_k"], layout["b_k"])  # W_k m_j (+ b)  (B, Ts, A)
        self.memory = memory.repeat_interleave(expand, dim=0)
        self.keys = keys.repeat_interleave(expand, dim=0)
        # 0 on a row's keys, -inf on its padding: softmax gives the masked keys exact zeros
        # (every source has a key: lengths >= 1)
        self.additive_mask = torch.zeros(key_padding_mask.shape, dtype=memory.dtype,
                                         device=memory.device).masked_fill(
            key_padding_mask, float("-inf")).repeat_interleave(expand, dim=0)
        self.hidden = tuple(s.repeat_interleave(expand, dim=1) for s in state0)
        return self.step(ids[:, 0].repeat_interleave(expand))

    def _context(self, query: Tensor) -> Tensor:
        """c = softmax_j(e_j) m for the query (N, Dq) -> (N, Dm)."""
        layout = self.layout
        if self.config.attention in ("dot", "general"):
            scores = torch.bmm(self.keys, query[:, :, None])[:, :, 0]          # q · k_j
        else:
            qw = self.linear(query, layout["w_q"], None)                        # W_q q
            scores = torch.tanh(qw[:, None, :] + self.keys) @ layout["v"]       # vᵀ tanh(.)
        weights = torch.softmax(scores + self.additive_mask, dim=-1)
        return torch.bmm(weights[:, None, :], self.memory)[:, 0]

    def step(self, tokens: Tensor) -> Tensor:
        layout, attention = self.layout, self.config.attention
        x = F.embedding(tokens, layout["embedding"])
        context = None
        if attention == "bahdanau":
            context = self._context(self.hidden[0][-1])    # q_t = top layer's h of s_{t-1}
            x = torch.cat([x, context], dim=1)
        h, self.hidden = layout["stack"](x, self.hidden)
        if attention is not None:
            if context is None:
                context = self._context(h)
            h = torch.tanh(self.linear(torch.cat([context, h], dim=1), layout["combine"], None))
        return self.linear(h, layout["head"], layout["head_bias"])

    def reorder(self, index: Tensor) -> None:
        self.hidden = tuple(s.index_select(1, index) for s in self.hidden)
