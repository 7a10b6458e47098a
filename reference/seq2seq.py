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

Every piece is an existing forward/backward pair (embedding.py, lstm.py, gru.py,
rnn_attention.py, linear.py, activations.py, loss.py); this file only wires them.

Parameter names: ``encoder.embedding.weight`` (V_src, E), ``encoder.rnn.<torch.nn names>``,
``decoder.embedding.weight`` (V_tgt, E), ``decoder.rnn.<torch.nn names>``,
``decoder.attention.<LuongAttention names>`` ("weight" for "general", "concat.weight" and
"energy.weight" for "concat", none for "dot") or ``decoder.attention.<AdditiveAttention
names>`` for "bahdanau" ("query_proj.weight", "key_proj.weight", "key_proj.bias",
"energy.weight"), ``decoder.combine.weight`` (Hd, 2·Hd),
``decoder.head.weight`` (V_tgt, Hd), ``decoder.head.bias`` (V_tgt,).

Decoding state (``Seq2SeqState``): memory (B, Ts, Hd), key_padding_mask (B, Ts) and the
decoder state (h,) or (h, c) stored batch-first as (B, L, Hd), so every leaf has batch on
axis 0 and ``decoding.select_rows`` reorders it for beam search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from . import generation
from .activations import TanhCache, softmax, tanh_backward, tanh_forward
from .checks import (
    check_dropout_masks,
    check_float_array,
    check_int_array,
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
from .module import Module
from .recurrent import DecodeStack, StackCache
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


# --------------------------------------------------------------------------- validation

def _check_config(config: object) -> Seq2SeqConfig:
    if not isinstance(config, Seq2SeqConfig):
        raise TypeError(f"config: expected a Seq2SeqConfig, got {type(config).__name__}")
    return config


def _check_params(params: object, config: Seq2SeqConfig) -> np.dtype:
    """The fixed-shape tensors; rnn.* and attention.* are checked by their own forwards."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
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
    dtype = check_float_array("params['encoder.embedding.weight']",
                              params["encoder.embedding.weight"], shapes.pop(
                                  "encoder.embedding.weight")).dtype
    for name, shape in shapes.items():
        check_float_array(f"params[{name!r}]", params[name], shape, dtype=dtype)
    return dtype


def _check_src(src: object, src_lengths: object, config: Seq2SeqConfig) -> np.ndarray:
    """src (B, Ts) and src_lengths (B,) in 1..Ts (None: every row full); returns lengths."""
    _check_ids("src", src, config.src_vocab, ("B", "Ts"))
    B, Ts = src.shape
    if src_lengths is None:
        return np.full(B, Ts, dtype=np.int64)
    check_int_array("src_lengths", src_lengths, (B,), low=1, high=Ts + 1)
    return src_lengths.astype(np.int64)


def _check_teacher_mask(teacher_mask: object, tgt_in: np.ndarray) -> np.ndarray | None:
    """teacher_mask bool (B, Tt), True = read tgt_in, with column 0 all True; None passes."""
    if teacher_mask is None:
        return None
    shape = tgt_in.shape
    if not isinstance(teacher_mask, np.ndarray):
        raise TypeError(f"teacher_mask: expected a bool numpy.ndarray of shape {shape} (B, Tt), "
                        f"got {type(teacher_mask).__name__}")
    if teacher_mask.dtype != np.bool_:
        raise TypeError(f"teacher_mask: expected dtype bool (True = read tgt_in, False = the "
                        f"model's previous prediction), got {teacher_mask.dtype}")
    check_shape("teacher_mask", teacher_mask.shape, shape)
    if not teacher_mask[:, 0].all():
        rows = np.flatnonzero(~teacher_mask[:, 0]).tolist()
        raise ValueError(f"teacher_mask: column 0 must be all True (step 0 has no previous "
                         f"prediction to read), got False in rows {rows}")
    return teacher_mask


def _sub(params: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- dropout

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


def _check_dropout_masks(masks: object, config: Seq2SeqConfig, B: int, Ts: int,
                         Tt: int) -> Mapping[str, np.ndarray] | None:
    return check_dropout_masks(masks, config.dropout,
                               seq2seq_dropout_mask_shapes(config, B, Ts, Tt),
                               "seq2seq_dropout_mask_shapes")


def _dropout(x: np.ndarray, p: float, masks: Mapping | None, site: str
             ) -> tuple[np.ndarray, DropoutCache | None]:
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


# --------------------------------------------------------------------------- bridge

def _bridge(state_part: np.ndarray, D: int) -> np.ndarray:
    """(L·D, B, H) indexed k·D + d  ->  (L, B, D·H) = per layer [h_fwd; h_bwd]."""
    LD, B, H = state_part.shape
    return state_part.reshape(LD // D, D, B, H).transpose(0, 2, 1, 3).reshape(LD // D, B, D * H)


def _bridge_backward(dstate_part: np.ndarray, D: int) -> np.ndarray:
    """The inverse reshape: (L, B, D·H) -> (L·D, B, H)."""
    L, B, DH = dstate_part.shape
    H = DH // D
    return dstate_part.reshape(L, B, D, H).transpose(0, 2, 1, 3).reshape(L * D, B, H)


# --------------------------------------------------------------------------- encoder, decoder

class EncoderCache(NamedTuple):
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None  # None without dropout
    rnn: StackCache


def _encoder_forward(src: np.ndarray, src_lengths: np.ndarray, params: Mapping,
                     config: Seq2SeqConfig, masks: Mapping | None = None
                     ) -> tuple[np.ndarray, np.ndarray, tuple, EncoderCache]:
    """(memory m (B, Ts, Hd), key_padding_mask (B, Ts), decoder state s_0, cache); dropout
    with the encoder's keep-masks when ``masks`` is given."""
    x, embedding = embedding_forward(src, params["encoder.embedding.weight"])
    x, embedding_dropout = _dropout(x, config.dropout, masks, "encoder.embedding")
    memory, state_n, rnn = _recurrent_forward(config.cell, x, _sub(params, "encoder.rnn."),
                                              None, src_lengths,
                                              *_rnn_dropout(config, masks, "encoder.rnn"))
    key_padding_mask = np.arange(src.shape[1]) >= src_lengths[:, None]
    state0 = tuple(_bridge(s, config.num_directions) for s in state_n)
    return memory, key_padding_mask, state0, EncoderCache(embedding, embedding_dropout, rnn)


class DecoderCache(NamedTuple):
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None  # None without dropout
    attention: LuongAttentionCache | AdditiveAttentionCache | None   # None without attention
    rnn: StackCache
    combine: LinearCache | None             # W_c [c; h]
    tanh: TanhCache | None                  # h̃ = tanh(W_c [c; h])
    output_dropout: DropoutCache | None     # h̃ ⊙ m / (1 - p); None without dropout
    head: LinearCache


def _decoder_forward(tokens: np.ndarray, state0: tuple, memory: np.ndarray,
                     key_padding_mask: np.ndarray, params: Mapping, config: Seq2SeqConfig,
                     masks: Mapping | None = None
                     ) -> tuple[np.ndarray, tuple, DecoderCache]:
    """(logits (B, T, V_tgt), decoder state s_T, cache) for decoder inputs tokens (B, T).

    Luong or no attention runs all T steps in one RNN call; Bahdanau's query is s_{t-1}, so
    it takes one step (T = 1): this is then the per-step decoder of training and decoding.
    ``masks``: the decoder's keep-masks for these T steps, or None (no dropout).
    """
    y, embedding = embedding_forward(tokens, params["decoder.embedding.weight"])
    y, embedding_dropout = _dropout(y, config.dropout, masks, "decoder.embedding")
    x, context, attention = y, None, None
    if config.attention == "bahdanau":
        query = state0[0][-1][:, None]            # q_t = top layer's h of s_{t-1}  (B, 1, Hd)
        (context, _), attention = additive_attention_forward(
            query, memory, _sub(params, "decoder.attention."), key_padding_mask)
        x = np.concatenate([y, context], axis=-1)  # [E_tgt[y_t]; c_t]
    h, state_n, rnn = _recurrent_forward(config.cell, x, _sub(params, "decoder.rnn."), state0,
                                         None, *_rnn_dropout(config, masks, "decoder.rnn"))
    if config.attention in LUONG_SCORES:
        (context, _), attention = luong_attention_forward(
            h, memory, _sub(params, "decoder.attention."), config.attention, key_padding_mask)
    combine = tanh = None
    h_tilde = h
    if context is not None:
        pre, combine = linear_forward(np.concatenate([context, h], axis=-1),
                                      params["decoder.combine.weight"])
        h_tilde, tanh = tanh_forward(pre)
    h_tilde, output_dropout = _dropout(h_tilde, config.dropout, masks, "decoder.output")
    logits, head = linear_forward(h_tilde, params["decoder.head.weight"],
                                  params["decoder.head.bias"])
    return logits, state_n, DecoderCache(embedding, embedding_dropout, attention, rnn, combine,
                                         tanh, output_dropout, head)


def _decoder_backward(dlogits: np.ndarray, cache: DecoderCache, config: Seq2SeqConfig,
                      dstate_n: tuple | None = None
                      ) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple]:
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
        dcontext, dh = dcat[..., :Hd], dcat[..., Hd:]                    # [c; h]
    if config.attention in LUONG_SCORES:
        dh_score, dmemory, dattention = luong_attention_backward(dcontext, cache.attention)
        dh = dh + dh_score
        dparams.update({"decoder.attention." + k: v for k, v in dattention.items()})
    dx, drnn, dstate0 = _recurrent_backward(config.cell, dh, cache.rnn, dstate_n)
    dy = dx
    if config.attention == "bahdanau":
        E = config.embed_size
        dy, dcontext_in = dx[..., :E], dx[..., E:]                       # [E_tgt[y_t]; c_t]
        dquery, dmemory, dattention = additive_attention_backward(dcontext + dcontext_in,
                                                                  cache.attention)
        dh0 = dstate0[0].copy()
        dh0[-1] += dquery[:, 0]                   # q_t = top layer's h of s_{t-1}
        dstate0 = (dh0,) + dstate0[1:]
        dparams.update({"decoder.attention." + k: v for k, v in dattention.items()})
    if cache.embedding_dropout is not None:
        dy = dropout_backward(dy, cache.embedding_dropout)
    dparams["decoder.embedding.weight"] = embedding_backward(dy, cache.embedding)
    dparams.update({"decoder.rnn." + k: v for k, v in drnn.items()})
    return dparams, dmemory, dstate0


class DecoderStepsCache(NamedTuple):
    steps: list          # the DecoderCache of each step t, each for tokens (B, 1)


def _decoder_steps_forward(tgt_in: np.ndarray, teacher_mask: np.ndarray | None, state0: tuple,
                           memory: np.ndarray, key_padding_mask: np.ndarray, params: Mapping,
                           config: Seq2SeqConfig, masks: Mapping | None = None
                           ) -> tuple[np.ndarray, tuple, DecoderStepsCache]:
    """(logits (B, Tt, V_tgt), decoder state s_n, cache), one step at a time; step t reads
    tgt_in[:, t] where teacher_mask[:, t] (None: everywhere), else argmax(logits[:, t-1]),
    and column t of each decoder keep-mask (B, Tt, ...)."""
    state, logits, steps = state0, [], []
    for t in range(tgt_in.shape[1]):
        tokens = tgt_in[:, t]
        if t > 0 and teacher_mask is not None:
            # The model's own choice: data, not a function of the parameters (no gradient).
            tokens = np.where(teacher_mask[:, t], tokens, logits[-1][:, 0].argmax(axis=-1))
        masks_t = None if masks is None else {
            site: m[:, t:t + 1] for site, m in masks.items() if site.startswith("decoder.")}
        logits_t, state, step = _decoder_forward(tokens[:, None], state, memory,
                                                 key_padding_mask, params, config, masks_t)
        logits.append(logits_t)
        steps.append(step)
    return np.concatenate(logits, axis=1), state, DecoderStepsCache(steps)


def _decoder_steps_backward(dlogits: np.ndarray, cache: DecoderStepsCache,
                            config: Seq2SeqConfig
                            ) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple]:
    """(dparams of the decoder, dmemory or None, dstate0): the steps in reverse, carrying
    dstate from step t back into step t-1 and summing the parameter and memory gradients."""
    dparams: dict[str, np.ndarray] = {}
    dmemory, dstate = None, None
    for t in reversed(range(len(cache.steps))):
        dparams_t, dmemory_t, dstate = _decoder_backward(dlogits[:, t:t + 1], cache.steps[t],
                                                         config, dstate)
        for name, d in dparams_t.items():
            dparams[name] = dparams[name] + d if name in dparams else d
        if dmemory_t is not None:
            dmemory = dmemory_t if dmemory is None else dmemory + dmemory_t
    return dparams, dmemory, dstate


# --------------------------------------------------------------------------- functional

class Seq2SeqCache(NamedTuple):
    config: Seq2SeqConfig
    names: tuple                    # params keys, in order, for the order of dparams
    encoder: EncoderCache
    decoder: DecoderCache | DecoderStepsCache   # one RNN call, or step by step
    loss: CrossEntropyCache | None  # None without targets
    logits_shape: tuple             # (B, Tt, V_tgt)
    dtype: np.dtype


def seq2seq_forward(src: np.ndarray, src_lengths: np.ndarray | None, tgt_in: np.ndarray,
                    params: Mapping[str, np.ndarray], config: Seq2SeqConfig,
                    targets: np.ndarray | None = None, ignore_index: int = PAD,
                    teacher_mask: np.ndarray | None = None,
                    dropout_masks: Mapping[str, np.ndarray] | None = None
                    ) -> tuple[tuple[np.ndarray, np.ndarray | None], Seq2SeqCache]:
    """The encoder-decoder (equations in the module docstring).

    src int (B, Ts), src_lengths int (B,) in 1..Ts or None (all Ts), tgt_in int (B, Tt),
    targets int (B, Tt) or None, teacher_mask bool (B, Tt) with column 0 True, or None (full
    teacher forcing): where False, step t reads argmax(logits[b, t-1]) instead of tgt_in.
    dropout_masks: required iff config.dropout > 0, a dict of bool keep-masks with the keys
    and shapes of ``seq2seq_dropout_mask_shapes(config, B, Ts, Tt)``.
    Returns ((logits (B, Tt, V_tgt), loss 0-d or None), cache).
    """
    config = _check_config(config)
    dtype = _check_params(params, config)
    src_lengths = _check_src(src, src_lengths, config)
    B = src.shape[0]
    _check_ids("tgt_in", tgt_in, config.tgt_vocab, (B, "Tt"))
    if targets is not None:
        check_int_array("targets", targets, tgt_in.shape)
    teacher_mask = _check_teacher_mask(teacher_mask, tgt_in)
    dropout_masks = _check_dropout_masks(dropout_masks, config, B, src.shape[1],
                                         tgt_in.shape[1])
    stepwise = config.attention == "bahdanau" or (teacher_mask is not None
                                                  and not teacher_mask.all())
    return _seq2seq_forward(src, src_lengths, tgt_in, params, config, targets, ignore_index,
                            teacher_mask, stepwise, dtype, dropout_masks)


def _seq2seq_forward(src: np.ndarray, src_lengths: np.ndarray, tgt_in: np.ndarray,
                     params: Mapping[str, np.ndarray], config: Seq2SeqConfig,
                     targets: np.ndarray | None, ignore_index: int,
                     teacher_mask: np.ndarray | None, stepwise: bool, dtype: np.dtype,
                     dropout_masks: Mapping[str, np.ndarray] | None = None
                     ) -> tuple[tuple[np.ndarray, np.ndarray | None], Seq2SeqCache]:
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
                                        logits.shape, dtype)


def seq2seq_backward(cache: Seq2SeqCache, dlogits: np.ndarray | None = None,
                     dloss: float | np.ndarray = 1.0) -> dict[str, np.ndarray]:
    """Gradients of L = dloss · loss + <logits, dlogits>, keyed and ordered like params.

    dlogits (B, Tt, V_tgt) or None (zeros); dloss is unused when the forward had no targets.
    """
    if not isinstance(cache, Seq2SeqCache):
        raise TypeError(f"cache: expected the Seq2SeqCache of seq2seq_forward, "
                        f"got {type(cache).__name__}")
    config = cache.config
    if dlogits is None:
        dlogits = np.zeros(cache.logits_shape, dtype=cache.dtype)
    else:
        check_float_array("dlogits", dlogits, cache.logits_shape, dtype=cache.dtype,
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


# --------------------------------------------------------------------------- model

class Seq2SeqState(NamedTuple):
    """Decoding state; batch on axis 0 of every array (for ``decoding.select_rows``)."""
    memory: np.ndarray             # m (B, Ts, Hd)
    key_padding_mask: np.ndarray   # (B, Ts) bool, True = padding
    hidden: tuple                  # (h,) or (h, c), each (B, L, Hd)


RNN_CLASSES = {"lstm": LSTM, "gru": GRU}


class Seq2Seq(Module):
    """The encoder-decoder in NumPy with ``backward``, ``encode`` and ``step``.

    Seq2Seq(config, dtype=np.float64, seed=None). Init as torch: embeddings N(0, 1), the RNNs,
    the attention and the linear layers U(-1/√fan_in, 1/√fan_in).
    """

    def __init__(self, config: Seq2SeqConfig, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        super().__init__()
        self.config = c = _check_config(config)
        self.rng = rng = np.random.default_rng(seed)
        Hd, E = c.decoder_size, c.embed_size

        def seed_() -> int:
            return int(rng.integers(2**32))

        cls = RNN_CLASSES[c.cell]
        encoder_rnn = cls(E, c.hidden_size, c.num_layers, bidirectional=c.bidirectional,
                          dtype=dtype, seed=seed_())
        # Bahdanau's decoder RNN reads [E_tgt[y_t]; c_t].
        decoder_input = E + Hd if c.attention == "bahdanau" else E
        decoder_rnn = cls(decoder_input, Hd, c.num_layers, dtype=dtype, seed=seed_())
        self.dtype = encoder_rnn.dtype
        p = {"encoder.embedding.weight": rng.standard_normal((c.src_vocab, E))}
        p.update({"encoder.rnn." + k: v for k, v in encoder_rnn.params.items()})
        p["decoder.embedding.weight"] = rng.standard_normal((c.tgt_vocab, E))
        p.update({"decoder.rnn." + k: v for k, v in decoder_rnn.params.items()})
        if c.attention is not None:
            attention = (AdditiveAttention(Hd, Hd, Hd, dtype=dtype, seed=seed_())
                         if c.attention == "bahdanau"
                         else LuongAttention(Hd, Hd, c.attention, dtype=dtype, seed=seed_()))
            p.update({"decoder.attention." + k: v for k, v in attention.params.items()})
            bound = 1.0 / np.sqrt(2 * Hd)
            p["decoder.combine.weight"] = rng.uniform(-bound, bound, (Hd, 2 * Hd))
        bound = 1.0 / np.sqrt(Hd)
        p["decoder.head.weight"] = rng.uniform(-bound, bound, (c.tgt_vocab, Hd))
        p["decoder.head.bias"] = rng.uniform(-bound, bound, c.tgt_vocab)
        self.params = {k: v.astype(self.dtype) for k, v in p.items()}
        self.zero_grad()
        self._cache: Seq2SeqCache | None = None

    def forward(self, src: np.ndarray, src_lengths: np.ndarray | None, tgt_in: np.ndarray,
                targets: np.ndarray | None = None, ignore_index: int = PAD,
                teacher_forcing_ratio: float = 1.0, teacher_mask: np.ndarray | None = None,
                dropout_masks: Mapping[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (logits (B, Tt, V_tgt), loss or None); see ``seq2seq_forward``.

        teacher_mask, when given, wins; else with teacher_forcing_ratio < 1 each (b, t >= 1)
        reads tgt_in with probability teacher_forcing_ratio, drawn from ``self.rng``.
        Dropout only in training mode, with the given keep-masks or masks drawn from
        ``self.rng`` (after the teacher_mask); in eval mode dropout_masks are ignored.
        """
        ratio = check_probability("teacher_forcing_ratio", teacher_forcing_ratio,
                                  allow_one=True)
        if teacher_mask is None and ratio < 1:
            _check_ids("tgt_in", tgt_in, self.config.tgt_vocab, ("B", "Tt"))
            teacher_mask = self.rng.random(tgt_in.shape) < ratio
            teacher_mask[:, 0] = True
        config = self.config
        if not self.training or config.dropout == 0:
            config, dropout_masks = dataclasses.replace(config, dropout=0.0), None
        elif dropout_masks is None:
            _check_ids("src", src, config.src_vocab, ("B", "Ts"))
            _check_ids("tgt_in", tgt_in, config.tgt_vocab, (src.shape[0], "Tt"))
            shapes = seq2seq_dropout_mask_shapes(config, *src.shape, tgt_in.shape[1])
            dropout_masks = {site: self.rng.random(shape) >= config.dropout
                             for site, shape in shapes.items()}
        (logits, loss), self._cache = seq2seq_forward(src, src_lengths, tgt_in, self.params,
                                                      config, targets, ignore_index,
                                                      teacher_mask, dropout_masks)
        return logits, loss

    __call__ = forward

    def backward(self, dloss: float | np.ndarray = 1.0, dlogits: np.ndarray | None = None
                 ) -> None:
        """Fills ``self.grads`` from the last forward."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (its cache is used once)")
        cache, self._cache = self._cache, None
        self.grads = seq2seq_backward(cache, dlogits, dloss)

    # ----------------------------------------------------------------------- generation

    def encode(self, src: np.ndarray, src_lengths: np.ndarray | None = None) -> Seq2SeqState:
        """Run the encoder once, never with dropout: the initial decoding state for ``step``."""
        src_lengths = _check_src(src, src_lengths, self.config)
        memory, mask, state0, _ = _encoder_forward(src, src_lengths, self.params, self.config)
        return Seq2SeqState(memory, mask, tuple(s.transpose(1, 0, 2) for s in state0))

    def step(self, tokens: np.ndarray, state: Seq2SeqState
             ) -> tuple[np.ndarray, Seq2SeqState]:
        """One decoder step, never with dropout: tokens int (B,) -> (logits (B, V_tgt), next
        state)."""
        _check_ids("tokens", tokens, self.config.tgt_vocab, ("B",))
        if not isinstance(state, Seq2SeqState):
            raise TypeError(f"state: expected the Seq2SeqState of encode, "
                            f"got {type(state).__name__}")
        hidden = tuple(h.transpose(1, 0, 2) for h in state.hidden)
        logits, hidden, _ = _decoder_forward(tokens[:, None], hidden, state.memory,
                                             state.key_padding_mask, self.params, self.config)
        return logits[:, 0], state._replace(hidden=tuple(h.transpose(1, 0, 2) for h in hidden))

    # ------------------------------------------------------------------------- generate

    def generate(self, src: np.ndarray, src_lengths: np.ndarray | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: np.ndarray | None = None,
                 generator: np.random.Generator | None = None, return_dict: bool = False,
                 **options: Any) -> np.ndarray | GenerateOutput:
        """Generate target sequences for the sources ``src`` (B, Ts) (right-padded to
        ``src_lengths``) as ``transformers``' encoder-decoder ``generate`` does ->
        sequences (B * num_return_sequences, 1 + L): ``decoder_start_token_id`` (an option,
        required: the target BOS) then the new tokens. Options and the other arguments as
        ``GPT.generate`` (``generation`` module docstring). The encoder runs once."""
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
        return _Seq2SeqSession(self, src, src_lengths), config, ids, uniforms

    def __repr__(self) -> str:
        return f"Seq2Seq({self.config})"


class _Seq2SeqSession:
    """``generate``'s decode session for a Seq2Seq (``generation.DecodeSession``): the
    encoder runs once in ``start``, and with it the memory's side of the attention score
    (Luong "general": k_j = W_a m_j; "concat" and Bahdanau: W_k m_j (+ b)); memory, keys and
    the padding mask are repeated per beam and never reordered (a row's beams share its
    source). The decoder state (h,) or (h, c), each (L, N, Hd), is what a step updates and
    a reorder selects. A step is a straight line of ops (``recurrent.DecodeStack``): the
    equations of ``_decoder_forward`` for one token, validated once per call."""

    def __init__(self, model: Seq2Seq, src: np.ndarray, src_lengths: np.ndarray) -> None:
        self.config, self.params = model.config, model.params
        self.src, self.src_lengths = src, src_lengths
        self.stack = DecodeStack(model.config.cell, _sub(self.params, "decoder.rnn."),
                                 model.config.num_layers)
        self.attention = _sub(self.params, "decoder.attention.")
        self.memory = self.keys = self.additive_mask = None
        self.hidden: tuple = ()

    def start(self, ids: np.ndarray, mask: np.ndarray | None, expand: int) -> np.ndarray:
        memory, key_padding_mask, state0, _ = _encoder_forward(
            self.src, self.src_lengths, self.params, self.config)
        score, p = self.config.attention, self.attention
        keys = memory                                           # "dot": k_j = m_j
        if score == "general":
            keys = memory @ p["weight"].T                       # k_j = W_a m_j   (B, Ts, Dq)
        elif score == "concat":
            keys = memory @ p["concat.weight"][:, self.config.decoder_size:].T     # W_cm m_j
        elif score == "bahdanau":
            keys = memory @ p["key_proj.weight"].T + p["key_proj.bias"]           # W_k m_j + b
        self.memory = np.repeat(memory, expand, axis=0)
        self.keys = np.repeat(keys, expand, axis=0)
        # 0 on a row's keys, -inf on its padding: softmax gives the masked keys exact zeros
        # (every source has a key: lengths >= 1)
        self.additive_mask = np.repeat(np.where(key_padding_mask, -np.inf, 0.0).astype(
            memory.dtype), expand, axis=0)
        self.hidden = tuple(np.repeat(s, expand, axis=1) for s in state0)
        return self.step(np.repeat(ids[:, 0], expand))

    def _context(self, query: np.ndarray) -> np.ndarray:
        """c = softmax_j(e_j) m for the query (N, Dq) -> (N, Dm)."""
        score, p = self.config.attention, self.attention
        if score in ("dot", "general"):
            scores = np.einsum("nd,ntd->nt", query, self.keys)                  # q · k_j
        else:
            w_q = (p["concat.weight"][:, :self.config.decoder_size] if score == "concat"
                   else p["query_proj.weight"])
            scores = np.tanh((query @ w_q.T)[:, None, :] + self.keys) @ p["energy.weight"][0]
        weights = softmax(scores + self.additive_mask, axis=-1)
        return np.einsum("nt,ntd->nd", weights, self.memory)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        p, attention = self.params, self.config.attention
        x = p["decoder.embedding.weight"][tokens]
        context = None
        if attention == "bahdanau":
            context = self._context(self.hidden[0][-1])    # q_t = top layer's h of s_{t-1}
            x = np.concatenate([x, context], axis=1)
        h, self.hidden = self.stack(x, self.hidden)
        if attention is not None:
            if context is None:
                context = self._context(h)
            h = np.tanh(np.concatenate([context, h], axis=1) @ p["decoder.combine.weight"].T)
        return h @ p["decoder.head.weight"].T + p["decoder.head.bias"]

    def reorder(self, index: np.ndarray) -> None:
        self.hidden = tuple(s[:, index] for s in self.hidden)
