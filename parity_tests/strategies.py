"""Shared Hypothesis strategies for the parity suite, in one module (STYLE.md rule 9).

Hypothesis draws small *configs* (sizes, layout, masks, lengths, a seed); the arrays are then
built from the seed with NumPy. That keeps draws cheap, makes a failing example printable in
one line, and lets ``@example`` give an edge case as a plain config. Values never come from
Hypothesis' own float strategies, which favour repeated and round values and so make
relative-error checks ill-conditioned rather than wrong (a constant dy gives a softmax
gradient that is pure rounding noise); seeded normal draws keep every comparison
well-conditioned.

Sections, one per family of tests:

- recurrent layers: ``RecurrentConfig`` for every cell kind (``"rnn_tanh"``,
  ``"rnn_relu"``, ``"lstm"``, ``"gru"``);
- building blocks: shapes and seeds, and the array helpers (``to_torch``, ``float32_exact``);
- attention: ``AttentionConfig`` and ``MHAConfig``. Masks follow the package convention,
  True = masked out. ``fully_masked_rows=False`` keeps key 0 visible to every query (and
  draws causal only with Tq <= Tk, where key 0 is always in the past) for the torch oracles,
  which return NaN on a row with no visible key;
- the GPT: ``GPTCase`` (sizes, bias, dropout, ignored targets, a seed), every array built in
  float64 under Hugging Face GPT-2's names. Parameters are drawn larger than GPT-2's init
  (weights of scale ``weight_std``, biases and layer-norm weights clearly away from 0 and 1),
  so that a dropped or misplaced term shows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from hypothesis import strategies as st

import reference.transformer as ref
import torch_impl.transformer as tim

# ------------------------------------------------------------------------------- recurrent layers

RECURRENT_KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def num_states(kind: str) -> int:
    """2 for LSTM (h, c), 1 otherwise (h)."""
    return 2 if kind == "lstm" else 1


class RecurrentConfig(NamedTuple):
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    lengths: tuple[int, ...] | None = None  # None: every row has length ``steps``
    dropout: float = 0.0  # > 0 only with num_layers > 1; masks are drawn from ``seed``
    scale: float = 1.0  # multiplies x and the biases: 50 saturates every gate
    seed: int = 0

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


class RecurrentInputs(NamedTuple):
    """Everything one forward + backward call needs, float64 NumPy."""
    config: RecurrentConfig
    x: np.ndarray  # (B, T, I)
    params: dict[str, np.ndarray]  # torch.nn names
    states: tuple[np.ndarray, ...]  # (h0,) or (h0, c0), each (L*D, B, H)
    lengths: np.ndarray | None  # int64 (B,)
    dropout_masks: list[np.ndarray] | None  # L-1 bool keep-masks (B, T, D*H)
    dout: np.ndarray  # (B, T, D*H) upstream gradient, non-zero at padded positions too
    dfinals: tuple[np.ndarray, ...]  # (dh_n,) or (dh_n, dc_n)


class CellConfig(NamedTuple):
    batch: int
    input_size: int
    hidden_size: int
    bias: bool = True
    scale: float = 1.0  # multiplies x and the biases: ~50 saturates every gate
    seed: int = 0


class CellInputs(NamedTuple):
    config: CellConfig
    x: np.ndarray  # (B, I)
    states: tuple[np.ndarray, ...]  # (h,) or (h, c), each (B, H)
    params: dict[str, np.ndarray]  # nn.*Cell names
    dnew: tuple[np.ndarray, ...]  # (dh_new,) or (dh_new, dc_new)


@st.composite
def recurrent_configs(draw: st.DrawFn, max_batch: int = 8, max_steps: int = 24,
                      max_size: int = 32, max_layers: int = 3, dropout: bool | None = False,
                      min_batch: int = 1, min_hidden: int = 1, max_dropout: float = 0.9
                      ) -> RecurrentConfig:
    """Layer configs: unequal lengths or none, bias or not, one or two directions.

    ``dropout=True`` forces ``num_layers >= 2`` and a dropout probability in
    [0.05, max_dropout] with explicit masks; ``False`` means no dropout; ``None``
    draws which of the two.
    """
    if dropout is None:
        dropout = draw(st.booleans())
    batch = draw(st.integers(min_batch, max_batch))
    steps = draw(st.integers(1, max_steps))
    input_size = draw(st.integers(1, max_size))
    hidden_size = draw(st.integers(min_hidden, max_size))
    num_layers = draw(st.integers(2 if dropout else 1, max(max_layers, 2 if dropout else 1)))
    bidirectional = draw(st.booleans())
    bias = draw(st.booleans())
    # Unequal lengths are the harder case: draw them two times in three.
    lengths = None
    if draw(st.integers(0, 2)) > 0:
        lengths = tuple(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
    p = draw(st.floats(0.05, max_dropout)) if dropout else 0.0
    seed = draw(st.integers(0, 2**32 - 1))
    return RecurrentConfig(batch, steps, input_size, hidden_size, num_layers, bidirectional,
                           bias, lengths, p, 1.0, seed)


def float32_configs() -> st.SearchStrategy[RecurrentConfig]:
    """Configs whose float32 gradients are well conditioned enough for a 1e-4 budget.

    At a saturated gate σ'(a) = σ(1 - σ) and tanh'(a) = 1 - tanh² are differences of nearly
    equal float32 numbers (torch.nn computes them the same way), so their relative error is
    ~eps32 / σ'(a); and with hidden_size 1 a gradient tensor has one or two elements, each a sum
    of B*T terms that can cancel. Either makes a whole tensor miss the budget with no bug
    anywhere (seen: hidden 1, input 24 -> 8e-4; hidden 1, dropout 0.75 -> 5e-4). So: x and biases
    scaled so the x-part of a pre-activation (variance ~ I / (3 H) under torch's init) has
    variance <= 1, dropout <= 0.5 (1/(1-p) scales the next layer's input), hidden >= 4 so each
    tensor mixes several units. Saturation and hidden 1 are covered in float64.
    """
    return recurrent_configs(dropout=None, min_hidden=4, max_dropout=0.5).map(
        lambda c: c._replace(scale=min(1.0, float(np.sqrt(3 * c.hidden_size / c.input_size)))))


def tiny_recurrent_configs(dropout: bool | None = False) -> st.SearchStrategy[RecurrentConfig]:
    """Configs small enough for central finite differences (2 forwards per element).

    dropout <= 0.5: 1/(1-p) scales the next layer's input, and at p = 0.875 a one-unit layer
    saturates to tanh' ~ 1e-9, a gradient below the differences' rounding noise (seen).
    """
    return recurrent_configs(max_batch=3, max_steps=4, max_size=3, max_layers=2,
                             dropout=dropout, max_dropout=0.5)


def away_from_zero(a: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """``a`` with every entry moved ``margin`` further from zero, keeping its sign.

    For finite differences: their absolute noise is ~eps64 |L| / eps ~ 1e-10, so a weight
    gradient whose every term is scaled by a near-zero input (dW_ih = Σ da x^T with one valid
    step and x = -0.004, seen) falls below 1e-4 in norm and misses the 1e-6 relative budget
    with no bug anywhere.
    """
    return np.where(a < 0, a - margin, a + margin)


def cell_configs(max_batch: int = 8, max_size: int = 32) -> st.SearchStrategy[CellConfig]:
    """One cell step: sizes, bias or not, a seed."""
    return st.builds(CellConfig, batch=st.integers(1, max_batch),
                     input_size=st.integers(1, max_size), hidden_size=st.integers(1, max_size),
                     bias=st.booleans(), scale=st.just(1.0), seed=st.integers(0, 2**32 - 1))


def param_shapes(kind: str, config: RecurrentConfig) -> dict[str, tuple[int, ...]]:
    """The torch.nn parameter names and shapes of a layer (spec: Params dict keys)."""
    gh, h = GATES[kind] * config.hidden_size, config.hidden_size
    shapes = {}
    for k in range(config.num_layers):
        in_k = config.input_size if k == 0 else config.directions * h
        for s in ("", "_reverse")[:config.directions]:
            shapes[f"weight_ih_l{k}{s}"] = (gh, in_k)
            shapes[f"weight_hh_l{k}{s}"] = (gh, h)
            if config.bias:
                shapes[f"bias_ih_l{k}{s}"] = (gh,)
                shapes[f"bias_hh_l{k}{s}"] = (gh,)
    return shapes


def make_recurrent_inputs(kind: str, config: RecurrentConfig) -> RecurrentInputs:
    """Deterministic float64 inputs for ``config``: torch-like init, non-zero biases,
    random initial states, random upstream gradients on out and final states."""
    rng = np.random.default_rng(config.seed)
    c = config
    bound = 1.0 / np.sqrt(c.hidden_size)
    params = {}
    for name, shape in param_shapes(kind, c).items():
        value = rng.uniform(-bound, bound, shape)
        if name.startswith("bias"):
            # Keep every bias clearly away from zero so a dropped bias term shows.
            value = np.sign(value + 1e-300) * (0.1 + np.abs(value)) * c.scale
        params[name] = value
    x = rng.standard_normal((c.batch, c.steps, c.input_size)) * c.scale
    state_shape = (c.num_layers * c.directions, c.batch, c.hidden_size)
    states = tuple(rng.standard_normal(state_shape) * 0.5 for _ in range(num_states(kind)))
    lengths = None if c.lengths is None else np.asarray(c.lengths, dtype=np.int64)
    masks = None
    if c.dropout > 0:
        masks = [rng.random((c.batch, c.steps, c.directions * c.hidden_size)) >= c.dropout
                 for _ in range(c.num_layers - 1)]
    dout = rng.standard_normal((c.batch, c.steps, c.directions * c.hidden_size))
    dfinals = tuple(rng.standard_normal(state_shape) for _ in range(num_states(kind)))
    return RecurrentInputs(c, x, params, states, lengths, masks, dout, dfinals)


def make_cell_inputs(kind: str, config: CellConfig) -> CellInputs:
    """Deterministic float64 inputs for one cell step (names of nn.RNNCell/LSTMCell/GRUCell)."""
    c = config
    rng = np.random.default_rng(c.seed)
    gh = GATES[kind] * c.hidden_size
    bound = 1.0 / np.sqrt(c.hidden_size)
    params = {"weight_ih": rng.uniform(-bound, bound, (gh, c.input_size)),
              "weight_hh": rng.uniform(-bound, bound, (gh, c.hidden_size))}
    if c.bias:
        for name in ("bias_ih", "bias_hh"):
            value = rng.uniform(-bound, bound, (gh,))
            params[name] = np.sign(value + 1e-300) * (0.1 + np.abs(value)) * c.scale
    x = rng.standard_normal((c.batch, c.input_size)) * c.scale
    shape = (c.batch, c.hidden_size)
    states = tuple(rng.standard_normal(shape) * 0.5 for _ in range(num_states(kind)))
    dnew = tuple(rng.standard_normal(shape) for _ in range(num_states(kind)))
    return CellInputs(c, x, states, params, dnew)


# ------------------------------------------------------------ building blocks (and array helpers)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def sizes(max_value: int = 4, min_value: int = 1) -> st.SearchStrategy[int]:
    """A small dimension size."""
    return st.integers(min_value=min_value, max_value=max_value)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple]:
    """A small array shape with every side >= 1."""
    return st.lists(sizes(max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def normal_arrays(draw: st.DrawFn, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float64 array of ``shape`` with N(0, scale²) entries from a drawn seed."""
    rng = np.random.default_rng(draw(seeds))
    return np.asarray(rng.standard_normal(shape) * scale)  # 0-d stays an ndarray


def float32_exact(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to float32 and held in float64, so that a float32 run and a float64
    reference see the same input and only the arithmetic differs."""
    return a.astype(np.float32).astype(np.float64)


def to_torch(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch copy of ``a`` (floating arrays cast to ``dtype`` when given)."""
    t = torch.from_numpy(np.array(a))
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# -------------------------------------------------------------------------------------- attention

# attn_mask kinds: dtype and shape; "none" for no attn_mask.
MASK_KINDS = ("none", "bool_2d", "bool_4d", "bool_b1", "float_2d", "float_4d", "float_b1")


class MaskConfig(NamedTuple):
    attn_mask: str = "none"          # one of MASK_KINDS
    key_padding: bool = False
    causal: bool = False
    rate: float = 0.3                # probability that a mask entry masks its key
    fully_masked_rows: bool = True   # False: key 0 stays visible to every query
    dropout: float = 0.0             # > 0: a keep-mask is drawn


class AttentionConfig(NamedTuple):
    batch: int
    heads: int
    tq: int
    tk: int
    head_dim: int
    value_dim: int
    masks: MaskConfig = MaskConfig()
    scale: float | None = None
    # M > 0: q = M u + n, k = M u + n / M for a shared unit u, so the scores sit near M² · s
    # (1e4 for M = 100, d = 1) while differing between keys by O(1): large logits whose
    # softmax is not one-hot (a one-hot softmax has exactly zero gradients).
    magnitude: float = 0.0
    seed: int = 0


class AttentionInputs(NamedTuple):
    config: AttentionConfig
    q: np.ndarray                       # (B, h, Tq, d)
    k: np.ndarray                       # (B, h, Tk, d)
    v: np.ndarray                       # (B, h, Tk, dv)
    attn_mask: np.ndarray | None
    key_padding_mask: np.ndarray | None
    causal: bool
    dropout: float
    dropout_mask: np.ndarray | None     # (B, h, Tq, Tk) keep-mask
    dout: np.ndarray                    # (B, h, Tq, dv)

    def kwargs(self) -> dict:
        """The mask arguments of scaled_dot_product_attention_forward, as NumPy arrays."""
        return dict(attn_mask=self.attn_mask, key_padding_mask=self.key_padding_mask,
                    causal=self.causal, dropout=self.dropout, dropout_mask=self.dropout_mask,
                    scale=self.config.scale)


@st.composite
def mask_configs(draw: st.DrawFn, tq: int, tk: int, fully_masked_rows: bool = True,
                 dropout: bool = True) -> MaskConfig:
    causal_ok = fully_masked_rows or tq <= tk
    return MaskConfig(
        attn_mask=draw(st.sampled_from(MASK_KINDS)),
        key_padding=draw(st.booleans()),
        causal=draw(st.booleans()) if causal_ok else False,
        # With key 0 kept visible, rate 1 leaves each query one key: a softmax with exactly
        # zero gradient, which the torch oracles' tests cannot compare (see test_attention).
        rate=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0] if fully_masked_rows else
                                  [0.0, 0.2, 0.5])),
        fully_masked_rows=fully_masked_rows,
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])) if dropout else 0.0)


@st.composite
def attention_configs(draw: st.DrawFn, max_batch: int = 4, max_len: int = 32,
                      max_heads: int = 4, max_head_dim: int = 16,
                      fully_masked_rows: bool = True, dropout: bool = True) -> AttentionConfig:
    """Batch 1..4, lengths 1..32 (Tq and Tk drawn apart), heads 1..4, head dims 1..16."""
    tq = draw(st.integers(1, max_len))
    tk = draw(st.integers(1, max_len))
    return AttentionConfig(
        batch=draw(st.integers(1, max_batch)), heads=draw(st.integers(1, max_heads)),
        tq=tq, tk=tk, head_dim=draw(st.integers(1, max_head_dim)),
        value_dim=draw(st.integers(1, max_head_dim)),
        masks=draw(mask_configs(tq, tk, fully_masked_rows, dropout)),
        scale=draw(st.sampled_from([None, None, 0.5])), seed=draw(seeds))


def build_masks(rng: np.random.Generator, masks: MaskConfig, batch: int, heads: int, tq: int,
                tk: int, dtype: type = np.float64
                ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(attn_mask, key_padding_mask, dropout keep-mask) for a MaskConfig."""
    if masks.causal and not masks.fully_masked_rows and tq > tk:
        raise ValueError("causal with Tq > Tk always masks the first rows completely")
    attn_mask = None
    if masks.attn_mask != "none":
        kind, layout = masks.attn_mask.split("_")
        shape = {"2d": (tq, tk), "4d": (batch, heads, tq, tk), "b1": (batch, 1, tq, tk)}[layout]
        hidden = rng.random(shape) < masks.rate
        if not masks.fully_masked_rows:
            hidden[..., 0] = False
        if kind == "bool":
            attn_mask = hidden
        else:  # additive: a finite bias on visible keys, -inf on masked ones
            attn_mask = np.where(hidden, -np.inf, rng.standard_normal(shape)).astype(dtype)
    key_padding_mask = None
    if masks.key_padding:
        key_padding_mask = rng.random((batch, tk)) < masks.rate
        if not masks.fully_masked_rows:
            key_padding_mask[:, 0] = False
    keep_mask = None
    if masks.dropout > 0:
        keep_mask = rng.random((batch, heads, tq, tk)) >= masks.dropout
    return attn_mask, key_padding_mask, keep_mask


def build_attention_inputs(config: AttentionConfig) -> AttentionInputs:
    """float64 inputs, masks and an upstream gradient from the config's seed."""
    rng = np.random.default_rng(config.seed)
    B, h, tq, tk, d, dv = (config.batch, config.heads, config.tq, config.tk, config.head_dim,
                           config.value_dim)
    q = rng.standard_normal((B, h, tq, d))
    k = rng.standard_normal((B, h, tk, d))
    if config.magnitude > 0:
        u = rng.standard_normal((B, h, 1, d))
        u = u / np.linalg.norm(u, axis=-1, keepdims=True)
        q = config.magnitude * u + q
        k = config.magnitude * u + k / config.magnitude
    v = rng.standard_normal((B, h, tk, dv))
    attn_mask, key_padding_mask, keep_mask = build_masks(rng, config.masks, B, h, tq, tk)
    dout = rng.standard_normal((B, h, tq, dv))
    return AttentionInputs(config, q, k, v, attn_mask, key_padding_mask, config.masks.causal,
                           config.masks.dropout, keep_mask, dout)


def masked_keys(inputs_masks: tuple, tq: int, tk: int) -> np.ndarray:
    """Bool (B|1, h|1, Tq, Tk), True where a query may not see a key, from
    (attn_mask, key_padding_mask, causal): the union the attention applies."""
    attn_mask, key_padding_mask, causal = inputs_masks
    masked = np.zeros((1, 1, tq, tk), dtype=bool)
    if attn_mask is not None:
        masked = masked | (attn_mask if attn_mask.dtype == np.bool_ else np.isneginf(attn_mask))
    if key_padding_mask is not None:
        masked = masked | key_padding_mask[:, None, None, :]
    if causal:
        masked = masked | (np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq))
    return masked


# ----------------------------------------------------------------------------- multi-head

class MHAConfig(NamedTuple):
    batch: int
    heads: int
    head_dim: int           # E = heads · head_dim
    tq: int
    tk: int                 # == tq for self-attention
    self_attention: bool
    bias: bool = True
    masks: MaskConfig = MaskConfig()
    seed: int = 0

    @property
    def embed_dim(self) -> int:
        return self.heads * self.head_dim


class MHAInputs(NamedTuple):
    config: MHAConfig
    query: np.ndarray                   # (B, Tq, E)
    key: np.ndarray                     # (B, Tk, E); the same array as query for self-attention
    value: np.ndarray                   # (B, Tk, E); likewise
    params: dict[str, np.ndarray]       # nn.MultiheadAttention names
    attn_mask: np.ndarray | None
    key_padding_mask: np.ndarray | None
    causal: bool
    dropout: float
    dropout_mask: np.ndarray | None
    dout: np.ndarray                    # (B, Tq, E)

    def kwargs(self) -> dict:
        """The mask arguments of multi_head_attention_forward, as NumPy arrays."""
        return dict(key_padding_mask=self.key_padding_mask, attn_mask=self.attn_mask,
                    causal=self.causal, dropout=self.dropout, dropout_mask=self.dropout_mask)


@st.composite
def mha_configs(draw: st.DrawFn, max_batch: int = 4, max_len: int = 32, max_heads: int = 4,
                max_head_dim: int = 16, fully_masked_rows: bool = True,
                dropout: bool = True) -> MHAConfig:
    """Self- or cross-attention (Tq, Tk drawn apart), bias or not, any masks."""
    self_attention = draw(st.booleans())
    tq = draw(st.integers(1, max_len))
    tk = tq if self_attention else draw(st.integers(1, max_len))
    return MHAConfig(
        batch=draw(st.integers(1, max_batch)), heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.integers(1, max_head_dim)), tq=tq, tk=tk,
        self_attention=self_attention, bias=draw(st.booleans()),
        masks=draw(mask_configs(tq, tk, fully_masked_rows, dropout)), seed=draw(seeds))


def build_mha_inputs(config: MHAConfig) -> MHAInputs:
    """float64 inputs, parameters (non-zero biases), masks and dout from the config's seed."""
    rng = np.random.default_rng(config.seed)
    B, h, tq, tk, E = config.batch, config.heads, config.tq, config.tk, config.embed_dim
    query = rng.standard_normal((B, tq, E))
    if config.self_attention:
        key = value = query
    else:
        key, value = rng.standard_normal((B, tk, E)), rng.standard_normal((B, tk, E))
    # Weights of scale 1/√E keep the scores O(1), as torch's init does.
    params = {"in_proj_weight": rng.standard_normal((3 * E, E)) / np.sqrt(E),
              "out_proj.weight": rng.standard_normal((E, E)) / np.sqrt(E)}
    if config.bias:
        params["in_proj_bias"] = rng.standard_normal(3 * E) * 0.5
        params["out_proj.bias"] = rng.standard_normal(E) * 0.5
    attn_mask, key_padding_mask, keep_mask = build_masks(rng, config.masks, B, h, tq, tk)
    return MHAInputs(config, query, key, value, params, attn_mask, key_padding_mask,
                     config.masks.causal, config.masks.dropout, keep_mask,
                     rng.standard_normal((B, tq, E)))


# ---------------------------------------------------------------------------------------- the GPT

class GPTCase(NamedTuple):
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    batch: int
    steps: int
    bias: bool = True
    dropout: float = 0.0          # > 0: explicit keep-masks drawn from the seed
    ignored: float = 0.0          # fraction of targets set to ignore_index
    ignore_index: int = -100
    targets: bool = True          # False: logits only, no loss
    dlogits: bool = True          # an upstream gradient on the logits besides the loss
    weight_std: float = 0.3
    seed: int = 0

    def config_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, block_size=self.block_size,
                    n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                    dropout=self.dropout, bias=self.bias)

    def reference_config(self) -> ref.GPTConfig:
        return ref.GPTConfig(**self.config_kwargs())

    def torch_impl_config(self) -> tim.GPTConfig:
        return tim.GPTConfig(**self.config_kwargs())


class GPTInputs(NamedTuple):
    case: GPTCase
    params: dict[str, np.ndarray]                 # float64, gpt_param_shapes names
    ids: np.ndarray                               # int64 (B, T)
    targets: np.ndarray | None                    # int64 (B, T), some = ignore_index
    dropout_masks: dict[str, np.ndarray] | None   # bool keep-masks
    dlogits: np.ndarray | None                    # (B, T, V)
    dloss: float


@st.composite
def gpt_cases(draw: st.DrawFn, max_layer: int = 2, max_embd: int = 16, max_steps: int = 8,
              max_vocab: int = 20, max_batch: int = 3) -> GPTCase:
    """n_layer 1..2, n_embd 4..16 with 1..4 heads dividing it, T 1..8, V 2..20."""
    n_embd = draw(st.integers(4, max_embd))
    n_head = draw(st.sampled_from([h for h in range(1, 5) if n_embd % h == 0]))
    steps = draw(st.integers(1, max_steps))
    with_dropout = draw(st.booleans())
    with_targets = draw(st.integers(0, 3)) > 0
    return GPTCase(vocab_size=draw(st.integers(2, max_vocab)),
                   block_size=steps + draw(st.integers(0, 2)),
                   n_layer=draw(st.integers(1, max_layer)), n_head=n_head, n_embd=n_embd,
                   batch=draw(st.integers(1, max_batch)), steps=steps, bias=draw(st.booleans()),
                   dropout=draw(st.floats(0.1, 0.6)) if with_dropout else 0.0,
                   ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
                   ignore_index=draw(st.sampled_from([-100, 0])),
                   targets=with_targets, dlogits=draw(st.booleans()) or not with_targets,
                   seed=draw(st.integers(0, 2**32 - 1)))


def tiny_gpt_cases() -> st.SearchStrategy[GPTCase]:
    """Small enough for central differences on a sample of every parameter tensor."""
    return gpt_cases(max_embd=8, max_steps=3, max_vocab=6, max_batch=2)


def hf_gpt_cases() -> st.SearchStrategy[GPTCase]:
    """What a Hugging Face GPT-2 computes: biases, no dropout."""
    return gpt_cases().map(lambda c: c._replace(bias=True, dropout=0.0))


def make_gpt_inputs(case: GPTCase) -> GPTInputs:
    rng = np.random.default_rng(case.seed)
    c = case
    params = {}
    for name, shape in ref.gpt_param_shapes(case.reference_config()).items():
        if ".ln_" in name and name.endswith(".weight"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.2 * rng.standard_normal(shape)
        else:
            value = c.weight_std * rng.standard_normal(shape)
        params[name] = value
    ids = rng.integers(0, c.vocab_size, (c.batch, c.steps))
    targets = None
    if c.targets:
        targets = rng.integers(0, c.vocab_size, (c.batch, c.steps))
        targets = np.where(rng.random(targets.shape) < c.ignored, c.ignore_index, targets)
    masks = None
    if c.dropout > 0:
        shapes = ref.gpt_dropout_mask_shapes(case.reference_config(), c.batch, c.steps)
        masks = {name: rng.random(shape) >= c.dropout for name, shape in shapes.items()}
    dlogits = rng.standard_normal((c.batch, c.steps, c.vocab_size)) if c.dlogits else None
    return GPTInputs(case, params, ids, targets, masks, dlogits, float(rng.uniform(0.5, 2.0)))
