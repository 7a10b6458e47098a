"""A recurrent language model: embedding, a stack of RNN/LSTM/GRU layers, a linear head.

For ids (B, T) in 0..V-1 and cell ∈ {"rnn_tanh", "rnn_relu", "lstm", "gru"}:

    x      = E[ids] ⊙ m_emb / (1 - p)                 E (V, E_dim), x (B, T, E_dim)
    out, s = cell-RNN(x, s_0; lengths)                out (B, T, H), s = (h_n,) or (h_n, c_n)
    u      = out ⊙ m_out / (1 - p)                    (inter-layer dropout inside the RNN too)
    logits = u W_headᵀ + b_head                       (B, T, V); 0 at padded positions
    loss   = cross_entropy(logits, targets)           mean over targets != ignore_index
                                                      and t < lengths[b]

This is PyTorch's word_language_model (dropout on the embedding, between layers and on the
output). Every piece is an existing forward/backward pair (embedding.py, rnn.py, lstm.py,
gru.py, dropout.py, linear.py, loss.py); this file only wires them.

The recurrent state is a tuple of (L, B, H) arrays: ``(h,)`` for the RNN and GRU cells and
``(h, c)`` for the LSTM, as in ``init_state``. Parameter names: ``embedding.weight`` (V, E),
``rnn.<torch.nn.LSTM/GRU/RNN names>`` (``rnn.weight_ih_l0`` ...), ``head.weight`` (V, H),
``head.bias`` (V,), so a state dict moves to and from torch_impl's ``RNNLM`` unchanged.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from . import generation
from .checks import check_float_array, check_int_array, check_positive_int, check_probability
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .generation import GenerateOutput
from .gru import GRU, gru_backward, gru_forward
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .lstm import LSTM, lstm_backward, lstm_forward
from .module import Module
from .recurrent import DecodeStack, StackCache
from .rnn import RNN, rnn_backward, rnn_forward

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
DROPOUT_KEYS = ("embedding", "rnn", "output")


def check_cell(cell: object) -> str:
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(map(repr, CELLS))}, got {cell!r}")
    return cell


def num_states(cell: str) -> int:
    return 2 if cell == "lstm" else 1


# --------------------------------------------------------------------------- the recurrent core

def _recurrent_forward(cell: str, x: np.ndarray, params: dict, state: tuple | None,
                       lengths: np.ndarray | None, dropout: float, masks: list | None
                       ) -> tuple[np.ndarray, tuple, StackCache]:
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


def _recurrent_backward(cell: str, dout: np.ndarray, cache: StackCache, dstate: tuple | None
                        ) -> tuple[np.ndarray, dict, tuple]:
    """Dispatch to rnn/lstm/gru_backward: (dx, dparams, dstate0 as a tuple)."""
    if dstate is None:
        dstate = (None,) * num_states(cell)
    if cell == "lstm":
        dx, dparams, dh0, dc0 = lstm_backward(dout, cache, dstate[0], dstate[1])
        return dx, dparams, (dh0, dc0)
    backward = gru_backward if cell == "gru" else rnn_backward
    dx, dparams, dh0 = backward(dout, cache, dstate[0])
    return dx, dparams, (dh0,)


# --------------------------------------------------------------------------- validation

def _check_params(params: object) -> tuple[int, int, int, np.dtype]:
    """(V, E, H, dtype) from a params dict; the rnn.* tensors are checked by the RNN itself."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    for name in ("embedding.weight", "head.weight", "head.bias"):
        if name not in params:
            raise ValueError(f"params: missing {name!r}")
    unexpected = sorted(k for k in params if not (k.startswith("rnn.") or k in
                                                  ("embedding.weight", "head.weight",
                                                   "head.bias")))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} (expected 'embedding.weight', "
                         f"'rnn.*', 'head.weight', 'head.bias')")
    emb = check_float_array("params['embedding.weight']", params["embedding.weight"], ("V", "E"))
    V, E = emb.shape
    head = check_float_array("params['head.weight']", params["head.weight"], (V, "H"),
                             dtype=emb.dtype)
    check_float_array("params['head.bias']", params["head.bias"], (V,), dtype=emb.dtype)
    return V, E, head.shape[1], emb.dtype


def _check_ids(name: str, ids: object, V: int, shape: tuple) -> np.ndarray:
    check_int_array(name, ids, shape, low=0, high=V)
    if ids.size == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {ids.shape}")
    return ids


def _check_state(cell: str, state: object, shape: tuple, dtype: np.dtype) -> tuple | None:
    if state is None:
        return None
    k = num_states(cell)
    if not isinstance(state, tuple) or len(state) != k:
        form = "(h, c)" if k == 2 else "(h,)"
        raise TypeError(f"state: expected a tuple {form} of arrays {shape} for cell {cell!r}, "
                        f"got {type(state).__name__} of length "
                        f"{len(state) if hasattr(state, '__len__') else '?'}")
    for i, s in enumerate(state):
        check_float_array(f"state[{i}]", s, shape, dtype=dtype)
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


# --------------------------------------------------------------------------- functional

class RNNLMCache(NamedTuple):
    cell: str
    embedding: EmbeddingCache
    embedding_dropout: DropoutCache | None
    rnn: StackCache
    output_dropout: DropoutCache | None
    head: LinearCache
    valid: np.ndarray | None           # (B, T) bool t < lengths[b]; None without padding
    loss: CrossEntropyCache | None     # None without targets


def rnn_lm_forward(ids: np.ndarray, params: Mapping[str, np.ndarray], cell: str,
                   state: tuple | None = None, lengths: np.ndarray | None = None,
                   targets: np.ndarray | None = None, ignore_index: int = -100,
                   dropout: float = 0.0, dropout_masks: Mapping[str, Any] | None = None
                   ) -> tuple[tuple[np.ndarray, np.ndarray | None, tuple], RNNLMCache]:
    """The language model over ids int (B, T) (equations in the module docstring).

    state: None (zeros) or a tuple (h0,) / (h0, c0) of (L, B, H) arrays. lengths (B,) in 1..T
    or None. targets int (B, T) or None. dropout_masks: required iff dropout > 0, a dict of
    bool keep-masks {"embedding": (B, T, E), "rnn": L-1 masks (B, T, H), "output": (B, T, H)}.
    Returns ((logits (B, T, V), loss 0-d or None, final state), cache).
    """
    cell = check_cell(cell)
    V, _, H, dtype = _check_params(params)
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
    valid = None
    if lengths is not None:  # the RNN has validated lengths
        valid = np.arange(T) < np.asarray(lengths)[:, None]
        logits = np.where(valid[..., None], logits, 0.0)  # padded positions output zeros
    loss, loss_cache = None, None
    if targets is not None:
        check_int_array("targets", targets, (B, T))
        if valid is not None:  # padded positions are never scored
            targets = np.where(valid, targets, ignore_index)
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    cache = RNNLMCache(cell, emb, emb_drop, rnn, out_drop, head, valid, loss_cache)
    return (logits, loss, state_n), cache


def rnn_lm_backward(cache: RNNLMCache, dlogits: np.ndarray | None = None,
                    dloss: float | np.ndarray = 1.0, dstate: tuple | None = None
                    ) -> tuple[dict[str, np.ndarray], tuple]:
    """Gradients of L = dloss · loss + <logits, dlogits> + <state_n, dstate>.

    dlogits (B, T, V) or None (zeros; ignored at padded positions); dloss is unused when the
    forward had no targets; dstate a tuple like the final state, or None (zeros).
    Returns (dparams keyed like params, dstate0 a tuple (dh0,) or (dh0, dc0) of (L, B, H)).
    """
    if not isinstance(cache, RNNLMCache):
        raise TypeError(f"cache: expected the RNNLMCache of rnn_lm_forward, "
                        f"got {type(cache).__name__}")
    head = cache.head
    logits_shape = head.x.shape[:-1] + head.weight.shape[:1]
    if dlogits is None:
        dlogits = np.zeros(logits_shape, dtype=head.weight.dtype)
    else:
        check_float_array("dlogits", dlogits, logits_shape, dtype=head.weight.dtype,
                          finite=False)
    if cache.valid is not None:
        dlogits = np.where(cache.valid[..., None], dlogits, 0.0)
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


# --------------------------------------------------------------------------- model

RNN_CLASSES = {"rnn_tanh": RNN, "rnn_relu": RNN, "lstm": LSTM, "gru": GRU}


class RNNLM(Module):
    """Embedding + RNN/LSTM/GRU + linear head in NumPy, with ``backward`` and ``step``.

    RNNLM(vocab_size, embed_size, hidden_size, num_layers=1, cell="lstm", dropout=0.0,
    dtype=np.float64, seed=None). Init as torch: embedding N(0, 1), the RNN and the head
    U(-1/√H, 1/√H).
    """

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int = 1,
                 cell: str = "lstm", dropout: float = 0.0, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        super().__init__()
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.embed_size = check_positive_int("embed_size", embed_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.cell = check_cell(cell)
        self.dropout = check_probability("dropout", dropout)
        self.rng = np.random.default_rng(seed)
        extra = {"nonlinearity": cell[4:]} if cell.startswith("rnn_") else {}
        rnn = RNN_CLASSES[cell](embed_size, hidden_size, num_layers, dtype=dtype,
                                seed=int(self.rng.integers(2**32)), **extra)
        self.dtype = rnn.dtype
        bound = 1.0 / np.sqrt(hidden_size)
        self.params = {"embedding.weight":
                       self.rng.standard_normal((vocab_size, embed_size)).astype(self.dtype)}
        self.params.update({"rnn." + k: v for k, v in rnn.params.items()})
        self.params["head.weight"] = self.rng.uniform(-bound, bound, (vocab_size, hidden_size)
                                                      ).astype(self.dtype)
        self.params["head.bias"] = self.rng.uniform(-bound, bound, vocab_size).astype(self.dtype)
        self.zero_grad()
        self._cache: RNNLMCache | None = None

    def _draw_masks(self, B: int, T: int) -> dict[str, Any] | None:
        if not self.training or self.dropout == 0:
            return None
        p, E, H = self.dropout, self.embed_size, self.hidden_size
        return {"embedding": self.rng.random((B, T, E)) >= p,
                "rnn": [self.rng.random((B, T, H)) >= p for _ in range(self.num_layers - 1)],
                "output": self.rng.random((B, T, H)) >= p}

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None,
                state: tuple | None = None, lengths: np.ndarray | None = None,
                ignore_index: int = -100, dropout_masks: Mapping[str, Any] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, tuple]:
        """ids (B, T) -> (logits (B, T, V), loss or None, final state). Dropout in training
        mode only, with the given masks or masks drawn from the model's generator."""
        dropout = self.dropout if self.training else 0.0
        if dropout > 0 and dropout_masks is None:
            _check_ids("ids", ids, self.vocab_size, ("B", "T"))
            dropout_masks = self._draw_masks(*ids.shape)
        if dropout == 0:
            dropout_masks = None
        (logits, loss, state_n), self._cache = rnn_lm_forward(
            ids, self.params, self.cell, state, lengths, targets, ignore_index, dropout,
            dropout_masks)
        return logits, loss, state_n

    __call__ = forward

    def backward(self, dloss: float | np.ndarray = 1.0, dlogits: np.ndarray | None = None,
                 dstate: tuple | None = None) -> tuple:
        """Fills ``self.grads`` from the last forward; returns dstate0."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (its cache is used once)")
        cache, self._cache = self._cache, None
        self.grads, dstate0 = rnn_lm_backward(cache, dlogits, dloss, dstate)
        return dstate0

    # ----------------------------------------------------------------------- generation

    def init_state(self, batch_size: int) -> tuple:
        """Zeros: (h,) or (h, c), each (L, batch_size, H)."""
        B = check_positive_int("batch_size", batch_size)
        shape = (self.num_layers, B, self.hidden_size)
        return tuple(np.zeros(shape, dtype=self.dtype) for _ in range(num_states(self.cell)))

    def step(self, tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
        """One time step, never with dropout: tokens int (B,) -> (logits (B, V), state)."""
        _check_ids("tokens", tokens, self.vocab_size, ("B",))
        (logits, _, state_n), _ = rnn_lm_forward(tokens[:, None], self.params, self.cell, state)
        return logits[:, 0], state_n

    # ------------------------------------------------------------------------- generate

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: np.ndarray | None = None,
                 generator: np.random.Generator | None = None, return_dict: bool = False,
                 **options: Any) -> np.ndarray | GenerateOutput:
        """Continue the prompts ``input_ids`` (B, P) as ``transformers``' ``generate`` does;
        arguments, options and result as ``GPT.generate`` (``generation`` module docstring).
        A left-padded row is run from its first token (the padding never enters the state)."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        return generation.run(_RNNLMSession(self), ids, mask, config, self.vocab_size,
                              uniforms, streamer, return_dict)

    def generate_stream(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                        generation_config: object = None, *, uniforms: np.ndarray | None = None,
                        generator: np.random.Generator | None = None,
                        **options: Any) -> Iterator[np.ndarray]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's tokens."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        return generation.stream(_RNNLMSession(self), ids, mask, config, uniforms,
                                 self.vocab_size)

    def _generate_args(self, input_ids: object, attention_mask: object,
                       generation_config: object, options: dict[str, Any], uniforms: object,
                       generator: object) -> tuple:
        def weights() -> None:
            for name, w in self.params.items():
                check_float_array(f"params[{name!r}]", w)

        return generation.prepare(
            input_ids, attention_mask, generation_config, options,
            vocab_size=self.vocab_size, context=None, weights=weights, uniforms=uniforms,
            generator=generator)

    def __repr__(self) -> str:
        return (f"RNNLM({self.vocab_size}, {self.embed_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}, cell={self.cell!r}, dropout={self.dropout})")


class _RNNLMSession:
    """``generate``'s decode session for an RNNLM (``generation.DecodeSession``): the state
    (h,) or (h, c), each (L, N, H). A left-padded prompt is shifted to start at t = 0 and run
    with its length through ``rnn_lm_forward``, so its state is that of the prompt alone; a
    step is a straight line of ops (``recurrent.DecodeStack`` and the head), validated once
    per call."""

    def __init__(self, model: RNNLM) -> None:
        self.cell, self.params = model.cell, model.params
        self.stack = DecodeStack(self.cell, {k[4:]: v for k, v in self.params.items()
                                             if k.startswith("rnn.")}, model.num_layers)
        self.state: tuple = ()

    def start(self, ids: np.ndarray, mask: np.ndarray | None, expand: int) -> np.ndarray:
        B, P = ids.shape
        lengths = None
        if mask is not None:
            lengths = mask.sum(axis=1)
            shift = (np.arange(P) + (P - lengths)[:, None]) % P
            ids = np.take_along_axis(ids, shift, axis=1)  # row b's tokens, then its padding
        (logits, _, state), _ = rnn_lm_forward(ids, self.params, self.cell, None, lengths)
        last = P - 1 if lengths is None else lengths - 1
        self.state = tuple(np.repeat(s, expand, axis=1) for s in state)
        return np.repeat(logits[np.arange(B), last], expand, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        p = self.params
        h, self.state = self.stack(p["embedding.weight"][tokens], self.state)
        return h @ p["head.weight"].T + p["head.bias"]

    def reorder(self, index: np.ndarray) -> None:
        self.state = tuple(s[:, index] for s in self.state)
