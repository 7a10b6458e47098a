"""Hypothesis strategies for the attention tests (scaled dot-product and multi-head).

As in ``strategies.py``, Hypothesis draws small configs (sizes, mask kinds, a seed) and the
arrays are built from the seed with NumPy, so a failing example prints in one line and an
edge case is a plain config in ``@example``.

Masks follow the package convention: True = masked out. ``fully_masked_rows=False`` keeps
key 0 visible to every query (and draws causal only with Tq <= Tk, where key 0 is always in
the past), for the torch oracles, which return NaN on a row with no visible key.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

from parity_tests.strategies_blocks import seeds

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
