"""An RNN encoder-decoder with Luong attention (Luong, Pham & Manning 2015).

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

Bridge: the decoder's hidden size is D·H and its initial state, per layer, is the encoder's
final forward and backward states concatenated (h and, for the LSTM, c), so the bridge is a
reshape with no parameters (simpler than a learned tanh(W [h_fwd; h_bwd] + b) projection,
and the memory m and the decoder's h have the same size D·H, which the "dot" score needs).

Teacher forcing is full (ratio 1.0): the decoder reads the whole gold tgt_in in one RNN call.
Target padding is handled by the loss only (targets == ignore_index, PAD = 0 by default);
the decoder is causal, so trailing padding never changes the logits of earlier positions.

``seq2seq_forward`` / ``seq2seq_backward`` wire the existing hand-written pairs
(embedding.py, lstm.py, gru.py, rnn_attention.py, linear.py, activations.py, loss.py); the
``Seq2Seq`` module holds torch.nn-named parameters and runs that pair through
``Seq2SeqFunction``, so its backward is the hand-written one.

Parameter names: ``encoder.embedding.weight`` (V_src, E), ``encoder.rnn.<torch.nn names>``,
``decoder.embedding.weight`` (V_tgt, E), ``decoder.rnn.<torch.nn names>``,
``decoder.attention.<LuongAttention names>`` ("weight" for "general", "concat.weight" and
"energy.weight" for "concat", none for "dot"), ``decoder.combine.weight`` (Hd, 2·Hd),
``decoder.head.weight`` (V_tgt, Hd), ``decoder.head.bias`` (V_tgt,).

Decoding state (``Seq2SeqState``): memory (B, Ts, Hd), key_padding_mask (B, Ts) and the
decoder state (h,) or (h, c) stored batch-first as (B, L, Hd), so every leaf has batch on
axis 0 and the decoders can reorder it for beam search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .activations import TanhCache, tanh_backward, tanh_forward
from .checks import check_float_tensor, check_int_tensor, check_positive_int
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .gru import GRU
from .language_model import _check_ids, _recurrent_backward, _recurrent_forward
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .lstm import LSTM
from .recurrent import RecurrentCache
from .rnn_attention import (
    LuongAttention,
    LuongAttentionCache,
    luong_attention_backward,
    luong_attention_forward,
)

SEQ2SEQ_CELLS = ("lstm", "gru")
ATTENTION_SCORES = (None, "dot", "general", "concat")
PAD = 0


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Sizes and choices of a Seq2Seq model; ``attention`` is a Luong score or None."""
    src_vocab: int
    tgt_vocab: int
    embed_size: int
    hidden_size: int            # H, per encoder direction; the decoder has D·H
    num_layers: int = 1         # of the encoder and of the decoder
    cell: str = "lstm"
    bidirectional: bool = False
    attention: str | None = "general"

    def __post_init__(self) -> None:
        for name in ("src_vocab", "tgt_vocab", "embed_size", "hidden_size", "num_layers"):
            check_positive_int(name, getattr(self, name))
        if self.cell not in SEQ2SEQ_CELLS:
            raise ValueError(f"cell: expected one of {', '.join(map(repr, SEQ2SEQ_CELLS))}, "
                             f"got {self.cell!r}")
        if not isinstance(self.bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got "
                            f"{type(self.bidirectional).__name__}")
        if self.attention not in ATTENTION_SCORES:
            raise ValueError(f"attention: expected one of "
                             f"{', '.join(map(repr, ATTENTION_SCORES))}, got {self.attention!r}")

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


def _sub(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


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
    rnn: RecurrentCache


def _encoder_forward(src: Tensor, src_lengths: Tensor, params: Mapping,
                     config: Seq2SeqConfig) -> tuple[Tensor, Tensor, tuple, EncoderCache]:
    """(memory m (B, Ts, Hd), key_padding_mask (B, Ts), decoder state s_0, cache)."""
    x, embedding = embedding_forward(src, params["encoder.embedding.weight"])
    memory, state_n, rnn = _recurrent_forward(config.cell, x, _sub(params, "encoder.rnn."),
                                              None, src_lengths, 0.0, None)
    key_padding_mask = torch.arange(src.shape[1], device=src.device) >= src_lengths[:, None]
    state0 = tuple(_bridge(s, config.num_directions) for s in state_n)
    return memory, key_padding_mask, state0, EncoderCache(embedding, rnn)


class DecoderCache(NamedTuple):
    embedding: EmbeddingCache
    rnn: RecurrentCache
    attention: LuongAttentionCache | None   # None without attention
    combine: LinearCache | None             # W_c [c; h]
    tanh: TanhCache | None                  # h̃ = tanh(W_c [c; h])
    head: LinearCache


def _decoder_forward(tgt_in: Tensor, state0: tuple, memory: Tensor, key_padding_mask: Tensor,
                     params: Mapping, config: Seq2SeqConfig
                     ) -> tuple[Tensor, tuple, DecoderCache]:
    """(logits (B, Tt, V_tgt), decoder state s_n, cache) for teacher-forced tgt_in."""
    y, embedding = embedding_forward(tgt_in, params["decoder.embedding.weight"])
    h, state_n, rnn = _recurrent_forward(config.cell, y, _sub(params, "decoder.rnn."), state0,
                                         None, 0.0, None)
    attention = combine = tanh = None
    h_tilde = h
    if config.attention is not None:
        (context, _), attention = luong_attention_forward(
            h, memory, _sub(params, "decoder.attention."), config.attention, key_padding_mask)
        pre, combine = linear_forward(torch.cat([context, h], dim=-1),
                                      params["decoder.combine.weight"])
        h_tilde, tanh = tanh_forward(pre)
    logits, head = linear_forward(h_tilde, params["decoder.head.weight"],
                                  params["decoder.head.bias"])
    return logits, state_n, DecoderCache(embedding, rnn, attention, combine, tanh, head)


def _decoder_backward(dlogits: Tensor, cache: DecoderCache, config: Seq2SeqConfig
                      ) -> tuple[dict[str, Tensor], Tensor | None, tuple]:
    """(dparams of the decoder, dmemory or None, dstate0 of the decoder)."""
    dh_tilde, dhead_weight, dhead_bias = linear_backward(dlogits, cache.head)
    dparams = {"decoder.head.weight": dhead_weight, "decoder.head.bias": dhead_bias}
    dmemory, dh = None, dh_tilde
    if cache.attention is not None:
        dpre = tanh_backward(dh_tilde, cache.tanh)                       # h̃ = tanh(pre)
        dcat, dparams["decoder.combine.weight"], _ = linear_backward(dpre, cache.combine)
        Hd = config.decoder_size
        dcontext, dh = dcat[..., :Hd], dcat[..., Hd:]                    # [c; h]
        dh_score, dmemory, dattention = luong_attention_backward(dcontext.contiguous(),
                                                                 cache.attention)
        dh = dh + dh_score
        dparams.update({"decoder.attention." + k: v for k, v in dattention.items()})
    dy, drnn, dstate0 = _recurrent_backward(config.cell, dh.contiguous(), cache.rnn, None)
    dparams["decoder.embedding.weight"] = embedding_backward(dy, cache.embedding)
    dparams.update({"decoder.rnn." + k: v for k, v in drnn.items()})
    return dparams, dmemory, dstate0


# ----------------------------------------------------------------------------- functional

class Seq2SeqCache(NamedTuple):
    config: Seq2SeqConfig
    names: tuple                    # params keys, in order, for the order of dparams
    encoder: EncoderCache
    decoder: DecoderCache
    loss: CrossEntropyCache | None  # None without targets


@torch.no_grad()
def seq2seq_forward(src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                    params: Mapping[str, Tensor], config: Seq2SeqConfig,
                    targets: Tensor | None = None, ignore_index: int = PAD
                    ) -> tuple[tuple[Tensor, Tensor | None], Seq2SeqCache]:
    """The encoder-decoder (equations in the module docstring), fully teacher-forced.

    src int (B, Ts), src_lengths int (B,) in 1..Ts or None (all Ts), tgt_in int (B, Tt),
    targets int (B, Tt) or None. Returns ((logits (B, Tt, V_tgt), loss 0-d or None), cache).
    """
    config = _check_config(config)
    _check_params(params, config)
    src_lengths = _check_src(src, src_lengths, config)
    B = src.shape[0]
    _check_ids("tgt_in", tgt_in, config.tgt_vocab, (B, "Tt"))
    if targets is not None:
        check_int_tensor("targets", targets, tuple(tgt_in.shape))

    memory, key_padding_mask, state0, encoder = _encoder_forward(src, src_lengths, params,
                                                                 config)
    logits, _, decoder = _decoder_forward(tgt_in, state0, memory, key_padding_mask, params,
                                          config)
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    return (logits, loss), Seq2SeqCache(config, tuple(params), encoder, decoder, loss_cache)


@torch.no_grad()
def seq2seq_backward(cache: Seq2SeqCache, dlogits: Tensor | None = None,
                     dloss: float | Tensor = 1.0) -> dict[str, Tensor]:
    """Gradients of L = dloss · loss + <logits, dlogits>, keyed and ordered like params.

    dlogits (B, Tt, V_tgt) or None (zeros); dloss is unused when the forward had no targets.
    """
    if not isinstance(cache, Seq2SeqCache):
        raise TypeError(f"cache: expected the Seq2SeqCache of seq2seq_forward, "
                        f"got {type(cache).__name__}")
    config, head = cache.config, cache.decoder.head
    weight = head.weight
    logits_shape = tuple(head.x.shape[:-1]) + (weight.shape[0],)
    if dlogits is None:
        dlogits = weight.new_zeros(logits_shape)
    else:
        check_float_tensor("dlogits", dlogits, logits_shape, dtype=weight.dtype, finite=False)
    if cache.loss is not None:
        dlogits = dlogits + cross_entropy_backward(dloss, cache.loss)
    dparams, dmemory, dstate0 = _decoder_backward(dlogits, cache.decoder, config)
    # s_0 = bridge(s_enc): the decoder's dstate0 is the encoder's dstate_n, reshaped back.
    dstate_n = tuple(_bridge_backward(d, config.num_directions) for d in dstate0)
    dx, drnn, _ = _recurrent_backward(config.cell, dmemory, cache.encoder.rnn, dstate_n)
    dparams["encoder.embedding.weight"] = embedding_backward(dx, cache.encoder.embedding)
    dparams.update({"encoder.rnn." + k: v for k, v in drnn.items()})
    return {name: dparams[name] for name in cache.names}


class Seq2SeqFunction(torch.autograd.Function):
    """(logits, loss) of ``seq2seq_forward`` with ``seq2seq_backward`` as the backward.

    apply(src, src_lengths, tgt_in, targets, config, ignore_index, names, *weights): the
    params as parallel ``names`` / ``weights``. Without targets, loss is a 0-d zero.
    """

    @staticmethod
    def forward(ctx, src, src_lengths, tgt_in, targets, config, ignore_index, names, *weights):
        (logits, loss), cache = seq2seq_forward(src, src_lengths, tgt_in,
                                                dict(zip(names, weights)), config, targets,
                                                ignore_index)
        ctx.save_for_backward(*weights)  # version-counter checks on the parameters
        ctx.cache = cache
        ctx.set_materialize_grads(False)
        return logits, logits.new_zeros(()) if loss is None else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dlogits, dloss):
        _ = ctx.saved_tensors  # raises if a parameter was modified in place since forward
        dparams = seq2seq_backward(ctx.cache, dlogits, 0.0 if dloss is None else dloss)
        need = ctx.needs_input_grad[7:]
        return (None,) * 7 + tuple(d if n else None for d, n in zip(dparams.values(), need))


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
    package's LuongAttention), ``decoder.combine`` (nn.Linear, no bias) and ``decoder.head``
    (nn.Linear), with torch's default init.
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
        self.decoder.rnn = cls(E, Hd, c.num_layers, **factory)
        if c.attention is not None:
            self.decoder.attention = LuongAttention(Hd, Hd, c.attention, **factory)
            self.decoder.combine = nn.Linear(2 * Hd, Hd, bias=False, **factory)
        self.decoder.head = nn.Linear(Hd, c.tgt_vocab, **factory)

    def forward(self, src: Tensor, src_lengths: Tensor | None, tgt_in: Tensor,
                targets: Tensor | None = None, ignore_index: int = PAD
                ) -> tuple[Tensor, Tensor | None]:
        """-> (logits (B, Tt, V_tgt), loss or None); see ``seq2seq_forward``."""
        names, weights = zip(*self.named_parameters())
        logits, loss = Seq2SeqFunction.apply(src, src_lengths, tgt_in, targets, self.config,
                                             ignore_index, names, *weights)
        return logits, None if targets is None else loss

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def encode(self, src: Tensor, src_lengths: Tensor | None = None) -> Seq2SeqState:
        """Run the encoder once: the initial decoding state for ``step``."""
        src_lengths = _check_src(src, src_lengths, self.config)
        memory, mask, state0, _ = _encoder_forward(src, src_lengths,
                                                   dict(self.named_parameters()), self.config)
        return Seq2SeqState(memory, mask, tuple(s.transpose(0, 1) for s in state0))

    @torch.no_grad()
    def step(self, tokens: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        """One decoder step: tokens int (B,) -> (logits (B, V_tgt), next state)."""
        _check_ids("tokens", tokens, self.config.tgt_vocab, ("B",))
        if not isinstance(state, Seq2SeqState):
            raise TypeError(f"state: expected the Seq2SeqState of encode, "
                            f"got {type(state).__name__}")
        hidden = tuple(h.transpose(0, 1).contiguous() for h in state.hidden)
        logits, hidden, _ = _decoder_forward(tokens[:, None], hidden, state.memory,
                                             state.key_padding_mask,
                                             dict(self.named_parameters()), self.config)
        return logits[:, 0], state._replace(hidden=tuple(h.transpose(0, 1) for h in hidden))

    def extra_repr(self) -> str:
        return repr(self.config)
