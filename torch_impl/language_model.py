"""A recurrent language model: embedding, a stack of RNN/LSTM/GRU layers, a linear head.

For ids (B, T) in 0..V-1 and cell ∈ {"rnn_tanh", "rnn_relu", "lstm", "gru"}:

    x      = E[ids] ⊙ m_emb / (1 - p)                 E (V, E_dim), x (B, T, E_dim)
    out, s = cell-RNN(x, s_0; lengths)                out (B, T, H), s = (h_n,) or (h_n, c_n)
    u      = out ⊙ m_out / (1 - p)                    (inter-layer dropout inside the RNN too)
    logits = u W_headᵀ + b_head                       (B, T, V); 0 at padded positions
    loss   = cross_entropy(logits, targets)           mean over targets != ignore_index
                                                      and t < lengths[b]

PyTorch's word_language_model layout (dropout on the embedding, between layers and on the
output). ``rnn_lm_forward`` / ``rnn_lm_backward`` wire the existing hand-written pairs
(embedding.py, rnn.py, lstm.py, gru.py, dropout.py, linear.py, loss.py) with an explicit
cache; the ``RNNLM`` module is nn.Embedding + this package's RNN/LSTM/GRU module (its
hand-written backward) + nn.Linear, with the hand-written cross-entropy.

The recurrent state is a tuple of (L, B, H) tensors: ``(h,)`` for the RNN and GRU cells and
``(h, c)`` for the LSTM. Parameter names: ``embedding.weight`` (V, E), ``rnn.<torch.nn
names>`` (``rnn.weight_ih_l0`` ...), ``head.weight`` (V, H), ``head.bias`` (V,), so a state
dict moves to and from reference's ``RNNLM`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import generation
from .checks import check_float_tensor, check_int_tensor, check_positive_int, check_probability
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .generation import GenerateOutput
from .gru import GRU, gru_backward, gru_forward
from .linear import LinearCache, linear_backward, linear_forward
from .loss import (
    CrossEntropyCache,
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_forward,
)
from .lstm import LSTM, lstm_backward, lstm_forward
from .recurrent import DecodeStack, RecurrentCache
from .rnn import RNN, rnn_backward, rnn_forward

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
DROPOUT_KEYS = ("embedding", "rnn", "output")


def check_cell(cell: object) -> str:
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(map(repr, CELLS))}, got {cell!r}")
    return cell


def num_states(cell: str) -> int:
    return 2 if cell == "lstm" else 1


# ----------------------------------------------------------------------------- recurrent core

def _recurrent_forward(cell: str, x: Tensor, params: Mapping[str, Tensor],
                       state: tuple | None, lengths: Tensor | None, dropout: float,
                       masks: list | None) -> tuple[Tensor, tuple, RecurrentCache]:
    """Dispatch to rnn/lstm/gru_forward; the final state comes back as a tuple."""
    h0 = None if state is None else state[0]
    if cell == "lstm":
        c0 = None if state is None else state[1]
        (out, (h_n, c_n)), cache = lstm_forward(x, params, h0, c0, lengths, dropout, masks)
        return out, (h_n, c_n), cache
    if cell == "gru":
        (out, h_n), cache = gru_forward(x, params, h0, lengths, dropout, masks)
    else:
        (out, h_n), cache = rnn_forward(x, params, h0, lengths, cell[4:], dropout, masks)
    return out, (h_n,), cache


def _recurrent_backward(cell: str, dout: Tensor, cache: RecurrentCache, dstate: tuple | None
                        ) -> tuple[Tensor, dict, tuple]:
    """Dispatch to rnn/lstm/gru_backward: (dx, dparams, dstate0 as a tuple)."""
    if dstate is None:
        dstate = (None,) * num_states(cell)
    if cell == "lstm":
        dx, dparams, dh0, dc0 = lstm_backward(dout, cache, dstate[0], dstate[1])
        return dx, dparams, (dh0, dc0)
    backward = gru_backward if cell == "gru" else rnn_backward
    dx, dparams, dh0 = backward(dout, cache, dstate[0])
    return dx, dparams, (dh0,)


# ----------------------------------------------------------------------------- validation

def _check_params(params: object) -> tuple[int, int, torch.dtype]:
    """(V, H, dtype) from a params dict; the rnn.* tensors are checked by the RNN itself."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors, got {type(params).__name__}")
    fixed = ("embedding.weight", "head.weight", "head.bias")
    for name in fixed:
        if name not in params:
            raise ValueError(f"params: missing {name!r}")
    unexpected = sorted(k for k in params if not (k.startswith("rnn.") or k in fixed))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} (expected 'embedding.weight', "
                         f"'rnn.*', 'head.weight', 'head.bias')")
    emb = check_float_tensor("params['embedding.weight']", params["embedding.weight"],
                             ("V", "E"))
    V = emb.shape[0]
    head = check_float_tensor("params['head.weight']", params["head.weight"], (V, "H"),
                              dtype=emb.dtype)
    check_float_tensor("params['head.bias']", params["head.bias"], (V,), dtype=emb.dtype)
    return V, head.shape[1], emb.dtype


def _check_ids(name: str, ids: object, V: int, shape: tuple) -> Tensor:
    check_int_tensor(name, ids, shape, low=0, high=V)
    if ids.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(ids.shape)}")
    return ids


def _check_state(cell: str, state: object, shape: tuple, dtype: torch.dtype) -> tuple | None:
    if state is None:
        return None
    k = num_states(cell)
    if not isinstance(state, tuple) or len(state) != k:
        form = "(h, c)" if k == 2 else "(h,)"
        raise TypeError(f"state: expected a tuple {form} of tensors {shape} for cell {cell!r}, "
                        f"got {type(state).__name__} of length "
                        f"{len(state) if hasattr(state, '__len__') else '?'}")
    for i, s in enumerate(state):
        check_float_tensor(f"state[{i}]", s, shape, dtype=dtype)
    return state


def _check_dropout_masks(masks: object, dropout: float) -> Mapping | None:
    if dropout == 0:
        if masks is not None:
            raise ValueError("dropout_masks: given, but dropout is 0")
        return None
    if not isinstance(masks, Mapping) or set(masks) != set(DROPOUT_KEYS):
        raise ValueError(f"dropout_masks: dropout > 0 needs explicit keep-masks (randomness is "
                         f"explicit): a dict with keys {list(DROPOUT_KEYS)}: 'embedding' "
                         f"(B, T, E), 'rnn' a list of L-1 (B, T, H), 'output' (B, T, H); got "
                         f"{sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__}")
    return masks


def _valid(lengths: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """(B, T) bool t < lengths[b], or None without padding (the RNN validates lengths)."""
    if lengths is None:
        return None
    return torch.arange(T, device=device) < torch.as_tensor(lengths).to(device)[:, None]


# ----------------------------------------------------------------------------- functional

class RNNLMCache(NamedTuple):
    cell: str
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None
    rnn: RecurrentCache
    output_dropout: DropoutCache | None
    head: LinearCache
    valid: Tensor | None               # (B, T) bool t < lengths[b]; None without padding
    loss: CrossEntropyCache | None     # None without targets


@torch.no_grad()
def rnn_lm_forward(ids: Tensor, params: Mapping[str, Tensor], cell: str,
                   state: tuple | None = None, lengths: Tensor | None = None,
                   targets: Tensor | None = None, ignore_index: int = -100,
                   dropout: float = 0.0, dropout_masks: Mapping[str, Any] | None = None
                   ) -> tuple[tuple[Tensor, Tensor | None, tuple], RNNLMCache]:
    """The language model over ids int (B, T) (equations in the module docstring).

    state: None (zeros) or a tuple (h0,) / (h0, c0) of (L, B, H) tensors. lengths (B,) in
    1..T or None. targets int (B, T) or None. dropout_masks: required iff dropout > 0, a dict
    of bool keep-masks {"embedding": (B, T, E), "rnn": L-1 masks (B, T, H), "output": (B, T, H)}.
    Returns ((logits (B, T, V), loss 0-d or None, final state), cache).
    """
    cell = check_cell(cell)
    V, H, dtype = _check_params(params)
    ids = _check_ids("ids", ids, V, ("B", "T"))
    B, T = ids.shape
    rnn_params = {k[4:]: v for k, v in params.items() if k.startswith("rnn.")}
    num_layers = sum(k.startswith("weight_ih_l") for k in rnn_params)
    state = _check_state(cell, state, (num_layers, B, H), dtype)
    dropout = check_probability("dropout", dropout)
    masks = _check_dropout_masks(dropout_masks, dropout)

    x, emb = embedding_forward(ids, params["embedding.weight"])
    emb_drop = None
    if masks is not None:
        x, emb_drop = dropout_forward(x, dropout, masks["embedding"])
    rnn_masks = None if masks is None or num_layers == 1 else masks["rnn"]
    out, state_n, rnn = _recurrent_forward(cell, x, rnn_params, state, lengths, dropout,
                                           rnn_masks)
    out_drop = None
    if masks is not None:
        out, out_drop = dropout_forward(out, dropout, masks["output"])
    logits, head = linear_forward(out, params["head.weight"], params["head.bias"])
    valid = _valid(lengths, T, logits.device)
    if valid is not None:
        logits = torch.where(valid[..., None], logits, 0.0)  # padded positions output zeros
    loss, loss_cache = None, None
    if targets is not None:
        check_int_tensor("targets", targets, (B, T))
        if valid is not None:  # padded positions are never scored
            targets = torch.where(valid, targets, ignore_index)
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    cache = RNNLMCache(cell, emb, emb_drop, rnn, out_drop, head, valid, loss_cache)
    return (logits, loss, state_n), cache


@torch.no_grad()
def rnn_lm_backward(cache: RNNLMCache, dlogits: Tensor | None = None,
                    dloss: float | Tensor = 1.0, dstate: tuple | None = None
                    ) -> tuple[dict[str, Tensor], tuple]:
    """Gradients of L = dloss · loss + <logits, dlogits> + <state_n, dstate>.

    dlogits (B, T, V) or None (zeros; ignored at padded positions); dloss is unused when the
    forward had no targets; dstate a tuple like the final state, or None (zeros).
    Returns (dparams keyed like params, dstate0 a tuple (dh0,) or (dh0, dc0) of (L, B, H)).
    """
    if not isinstance(cache, RNNLMCache):
        raise TypeError(f"cache: expected the RNNLMCache of rnn_lm_forward, "
                        f"got {type(cache).__name__}")
    head = cache.head
    weight = head.weight
    logits_shape = tuple(head.x.shape[:-1]) + (weight.shape[0],)
    if dlogits is None:
        dlogits = weight.new_zeros(logits_shape)
    else:
        check_float_tensor("dlogits", dlogits, logits_shape, dtype=weight.dtype, finite=False)
    if cache.valid is not None:
        dlogits = torch.where(cache.valid[..., None], dlogits, 0.0)
    if cache.loss is not None:
        dlogits = dlogits + cross_entropy_backward(dloss, cache.loss)
    dout, dhead_weight, dhead_bias = linear_backward(dlogits, head)
    if cache.output_dropout is not None:
        dout = dropout_backward(dout, cache.output_dropout)
    dx, drnn, dstate0 = _recurrent_backward(cache.cell, dout, cache.rnn, dstate)
    if cache.embedding_dropout is not None:
        dx = dropout_backward(dx, cache.embedding_dropout)
    dparams = {"embedding.weight": embedding_backward(dx, cache.embedding)}
    dparams.update({"rnn." + k: v for k, v in drnn.items()})
    dparams["head.weight"] = dhead_weight
    dparams["head.bias"] = dhead_bias
    return dparams, dstate0


# ----------------------------------------------------------------------------- module

class RNNLM(nn.Module):
    """Embedding + RNN/LSTM/GRU + linear head; autograd through the hand-written backward of
    the recurrent layer and of the cross-entropy.

    RNNLM(vocab_size, embed_size, hidden_size, num_layers=1, cell="lstm", dropout=0.0, *,
    device=None, dtype=None). Submodules ``embedding`` (nn.Embedding), ``rnn`` (this
    package's RNN/LSTM/GRU) and ``head`` (nn.Linear), with torch's default init.
    """

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int = 1,
                 cell: str = "lstm", dropout: float = 0.0, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.embed_size = check_positive_int("embed_size", embed_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.cell = check_cell(cell)
        self.dropout = check_probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, embed_size, **factory)
        if cell == "lstm":
            self.rnn = LSTM(embed_size, hidden_size, num_layers, dropout=dropout, **factory)
        elif cell == "gru":
            self.rnn = GRU(embed_size, hidden_size, num_layers, dropout=dropout, **factory)
        else:
            self.rnn = RNN(embed_size, hidden_size, num_layers, nonlinearity=cell[4:],
                           dropout=dropout, **factory)
        self.head = nn.Linear(hidden_size, vocab_size, **factory)

    def _draw_masks(self, B: int, T: int, device: torch.device) -> dict[str, Any]:
        keep = 1.0 - self.dropout

        def draw(size: int) -> Tensor:
            return torch.empty(B, T, size, device=device).bernoulli_(keep).bool()
        return {"embedding": draw(self.embed_size),
                "rnn": [draw(self.hidden_size) for _ in range(self.num_layers - 1)],
                "output": draw(self.hidden_size)}

    def forward(self, ids: Tensor, targets: Tensor | None = None, state: tuple | None = None,
                lengths: Tensor | None = None, ignore_index: int = -100,
                dropout_masks: Mapping[str, Any] | None = None
                ) -> tuple[Tensor, Tensor | None, tuple]:
        """ids (B, T) -> (logits (B, T, V), loss or None, final state). Dropout in training
        mode only, with the given masks or Bernoulli(1 - p) keep-masks drawn on the device."""
        weight = self.embedding.weight
        _check_ids("ids", ids, self.vocab_size, ("B", "T"))
        B, T = ids.shape
        state = _check_state(self.cell, state, (self.num_layers, B, self.hidden_size),
                             weight.dtype)
        if targets is not None:
            check_int_tensor("targets", targets, (B, T))
        p = self.dropout if self.training else 0.0
        if p == 0:
            masks = None
        else:
            masks = _check_dropout_masks(dropout_masks, p) if dropout_masks is not None \
                else self._draw_masks(B, T, ids.device)
        x = self.embedding(ids)
        if masks is not None:
            x = dropout_forward(x, p, masks["embedding"])[0]
        rnn_masks = None if masks is None or self.num_layers == 1 else masks["rnn"]
        h0 = None if state is None else state[0]
        if self.cell == "lstm":
            c0 = None if state is None else state[1]
            out, state_n = self.rnn(x, h0, c0, lengths, rnn_masks)
        else:
            out, h_n = self.rnn(x, h0, lengths, rnn_masks)
            state_n = (h_n,)
        if masks is not None:
            out = dropout_forward(out, p, masks["output"])[0]
        logits = self.head(out)
        valid = _valid(lengths, T, logits.device)
        if valid is not None:
            logits = torch.where(valid[..., None], logits, 0.0)
        loss = None
        if targets is not None:
            if valid is not None:
                targets = torch.where(valid, targets, ignore_index)
            loss = cross_entropy(logits, targets, "mean", ignore_index)
        return logits, loss, tuple(state_n)

    # ------------------------------------------------------------------------- generation

    def init_state(self, batch_size: int) -> tuple:
        """Zeros: (h,) or (h, c), each (L, batch_size, H), on the model's device and dtype."""
        B = check_positive_int("batch_size", batch_size)
        weight = self.embedding.weight
        return tuple(weight.new_zeros(self.num_layers, B, self.hidden_size)
                     for _ in range(num_states(self.cell)))

    @torch.no_grad()
    def step(self, tokens: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        """One time step, never with dropout: tokens int (B,) -> (logits (B, V), state)."""
        _check_ids("tokens", tokens, self.vocab_size, ("B",))
        params = dict(self.named_parameters())
        (logits, _, state_n), _ = rnn_lm_forward(tokens[:, None], params, self.cell, state)
        return logits[:, 0], state_n

    # ------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: Tensor | None = None, generator: torch.Generator | None = None,
                 return_dict: bool = False, **options: Any) -> Tensor | GenerateOutput:
        """Continue the prompts ``input_ids`` (B, P) as ``transformers``' ``generate`` does;
        arguments, options and result as ``GPT.generate`` (``generation`` module docstring).
        A left-padded row is run from its first token (the padding never enters the state)."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        return generation.run(_RNNLMSession(self), ids, mask, config, self.vocab_size,
                              uniforms, streamer, return_dict)

    def generate_stream(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        generation_config: object = None, *, uniforms: Tensor | None = None,
                        generator: torch.Generator | None = None,
                        **options: Any) -> Iterator[Tensor]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's tokens."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        tokens = generation.stream(_RNNLMSession(self), ids, mask, config, uniforms,
                                   self.vocab_size)
        return generation.no_grad_iterator(tokens)

    def _generate_args(self, input_ids: object, attention_mask: object,
                       generation_config: object, options: dict[str, Any], uniforms: object,
                       generator: object) -> tuple:
        return generation.prepare(
            input_ids, attention_mask, generation_config, options,
            vocab_size=self.vocab_size, context=None,
            weights=((f"params[{name!r}]", w) for name, w in self.named_parameters()),
            uniforms=uniforms, generator=generator, device=self.embedding.weight.device)

    def extra_repr(self) -> str:
        return f"cell={self.cell!r}, dropout={self.dropout}"


class _RNNLMSession:
    """``generate``'s decode session for an RNNLM (``generation.DecodeSession``): the state
    (h,) or (h, c), each (L, N, H). A left-padded prompt is shifted to start at t = 0 and
    run with its length (packed semantics) through ``rnn_lm_forward``, so its state is that
    of the prompt alone; a step is a straight line of ops over weights laid out once
    (``recurrent.DecodeStack`` and the head as a (H, V) copy), validated once per call."""

    def __init__(self, model: RNNLM) -> None:
        self.cell, self.params = model.cell, dict(model.named_parameters())
        weights = list(self.params.values())
        self.stack, self.head = generation.decode_layout(model, "rnnlm", weights, lambda: (
            DecodeStack(self.cell, {k[4:]: v for k, v in self.params.items()
                                    if k.startswith("rnn.")}, model.num_layers),
            self.params["head.weight"].detach().t().contiguous()))
        self.embedding = self.params["embedding.weight"].detach()
        self.head_bias = self.params["head.bias"].detach()
        self.state: tuple = ()

    def start(self, ids: Tensor, mask: Tensor | None, expand: int) -> Tensor:
        B, P = ids.shape
        lengths = None
        if mask is not None:
            lengths = mask.sum(dim=1)
            shift = (torch.arange(P, device=ids.device) + (P - lengths)[:, None]) % P
            ids = ids.gather(1, shift)  # row b's tokens first, its padding after them
        (logits, _, state), _ = rnn_lm_forward(ids, self.params, self.cell, None, lengths)
        last = P - 1 if lengths is None else lengths - 1
        logits = logits[torch.arange(B, device=ids.device), last]
        self.state = tuple(s.repeat_interleave(expand, dim=1) for s in state)
        return logits.repeat_interleave(expand, dim=0)

    def step(self, tokens: Tensor) -> Tensor:
        h, self.state = self.stack(F.embedding(tokens, self.embedding), self.state)
        return self.stack.linear(h, self.head, self.head_bias)

    def reorder(self, index: Tensor) -> None:
        self.state = tuple(s.index_select(1, index) for s in self.state)
