"""Scaled dot-product attention and multi-head attention (torch.nn.MultiheadAttention).

Scaled dot-product attention, for each batch item and head, with queries q (Tq, d), keys
k (Tk, d) and values v (Tk, dv):

    S   = q kᵀ · s + A              s = scale (default 1/√d); A the float (additive) attn_mask
    P   = softmax_j(S)              over the keys j a query may see; P = 0 at masked keys
    P̃   = P ⊙ M / (1 - p)           M the dropout keep-mask, p the dropout rate
    out = P̃ v

Masked keys (True = masked out, as in torch.nn.MultiheadAttention; torch's
F.scaled_dot_product_attention reads a boolean mask the other way round): True in a
boolean attn_mask or in key_padding_mask (B, Tk), -inf in a float attn_mask, and with
causal=True every key j > i + (Tk - Tq) (aligned bottom-right, so a query block at the end
of a longer key sequence, a decoder step with a KV cache, sees its past; j <= i for Tq = Tk).
A query row whose keys are all masked gets P = 0, out = 0 and zero gradients.

Backward, from dout (the softmax backward between dP and dS):

    dv = P̃ᵀ dout
    dP = (dout vᵀ) ⊙ M / (1 - p)
    dS = P ⊙ (dP - Σ_j P_j dP_j)
    dq = dS k · s                   dk = dSᵀ q · s

Multi-head attention (batch-first) over query (B, Tq, E) and key, value (B, Tk, E), with
[W_q; W_k; W_v] = in_proj_weight (3E, E), [b_q; b_k; b_v] = in_proj_bias, W_o = out_proj.weight,
b_o = out_proj.bias and h heads of width d = E / h:

    Q = query W_qᵀ + b_q            K = key W_kᵀ + b_k            V = value W_vᵀ + b_v
    Q, K, V split into heads        (B, T, E) -> (B, h, T, d)
    O = attention(Q, K, V)          heads merged back to (B, Tq, E)
    out = O W_oᵀ + b_o
    weights = (1/h) Σ_heads P̃       (B, Tq, Tk), the weights applied to V, as torch returns

Its backward is the chain of the linear backwards around the attention backward.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from .checks import check_float_array, check_positive_int, check_probability, check_shape, shape_str
from .linear import LinearCache, linear_backward, linear_forward
from .module import Module

# ----------------------------------------------------------------------------- validation


class AttentionMasks(NamedTuple):
    """The validated masking and dropout arguments of one attention call."""
    attn_mask: np.ndarray | None         # bool (True = masked) or float additive; 2-d or 4-d
    key_padding_mask: np.ndarray | None  # bool (B, Tk), True = padding
    causal: bool
    keep_mask: np.ndarray | None         # dropout keep-mask M (B, h, Tq, Tk), None without dropout
    keep_scale: float                    # 1 / (1 - p)


def check_attention_masks(batch: int, heads: int, tq: int, tk: int, dtype: np.dtype,
                          attn_mask: object, key_padding_mask: object, causal: object,
                          dropout: object, dropout_mask: object) -> AttentionMasks:
    """Validate the masks of an attention over (B, h, Tq, Tk) scores of ``dtype``."""
    if attn_mask is not None:
        if not isinstance(attn_mask, np.ndarray):
            raise TypeError(f"attn_mask: expected a numpy.ndarray (bool, True = masked out, or "
                            f"float additive), got {type(attn_mask).__name__}")
        if attn_mask.dtype != np.bool_ and attn_mask.dtype != dtype:
            raise TypeError(f"attn_mask: expected dtype bool or {np.dtype(dtype)} (the dtype "
                            f"of the queries), got {attn_mask.dtype}")
        shapes = ((tq, tk), (batch, heads, tq, tk), (batch, 1, tq, tk))
        if attn_mask.shape not in shapes:
            raise ValueError(f"attn_mask: expected shape (Tq, Tk) = {shape_str(shapes[0])}, "
                             f"(B, h, Tq, Tk) = {shape_str(shapes[1])} or (B, 1, Tq, Tk) = "
                             f"{shape_str(shapes[2])}, got {shape_str(attn_mask.shape)}")
        if attn_mask.dtype != np.bool_ and np.any(np.isnan(attn_mask) | (attn_mask == np.inf)):
            raise ValueError("attn_mask: contains NaN or +inf (a float mask is added to the "
                             "scores; -inf marks a masked key)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, np.ndarray) or key_padding_mask.dtype != np.bool_:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise TypeError(f"key_padding_mask: expected a bool numpy.ndarray (True = padding), "
                            f"got {got}")
        check_shape("key_padding_mask", key_padding_mask.shape, (batch, tk))
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    p = check_probability("dropout", dropout)
    if p > 0 and dropout_mask is None:
        raise ValueError(f"dropout_mask: required when dropout > 0 (randomness is explicit: pass "
                         f"a bool keep-mask of shape (B, h, Tq, Tk) = "
                         f"{shape_str((batch, heads, tq, tk))}), got None")
    if p == 0 and dropout_mask is not None:
        raise ValueError("dropout_mask: expected None when dropout == 0, got a mask")
    if dropout_mask is not None:
        if not isinstance(dropout_mask, np.ndarray) or dropout_mask.dtype != np.bool_:
            got = getattr(dropout_mask, "dtype", type(dropout_mask).__name__)
            raise TypeError(f"dropout_mask: expected a bool numpy.ndarray (True = keep), "
                            f"got {got}")
        check_shape("dropout_mask", dropout_mask.shape, (batch, heads, tq, tk))
    return AttentionMasks(attn_mask, key_padding_mask, bool(causal), dropout_mask,
                          1.0 / (1.0 - p))


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return float(scale)


# ----------------------------------------------------------------------------- attention

class AttentionCache(NamedTuple):
    q: np.ndarray          # (B, h, Tq, d)
    k: np.ndarray          # (B, h, Tk, d)
    v: np.ndarray          # (B, h, Tk, dv)
    p: np.ndarray          # P (B, h, Tq, Tk), before dropout; the oracle keeps it
    masks: AttentionMasks
    scale: float           # s


def _masked_keys(masks: AttentionMasks, tq: int, tk: int) -> np.ndarray | None:
    """Bool (B|1, h|1, Tq, Tk): True where a query may not see a key; None if none is masked."""
    masked = None
    attn_mask = masks.attn_mask
    if attn_mask is not None:
        masked = attn_mask if attn_mask.dtype == np.bool_ else np.isneginf(attn_mask)
    if masks.key_padding_mask is not None:
        padding = masks.key_padding_mask[:, None, None, :]
        masked = padding if masked is None else masked | padding
    if masks.causal:
        future = np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq)
        masked = future if masked is None else masked | future
    return masked


def _attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, masks: AttentionMasks,
                       scale: float) -> tuple[np.ndarray, AttentionCache]:
    tq, tk = q.shape[-2], k.shape[-2]
    scores = q @ k.swapaxes(-1, -2) * scale
    if masks.attn_mask is not None and masks.attn_mask.dtype != np.bool_:
        scores = scores + masks.attn_mask
    masked = _masked_keys(masks, tq, tk)
    if masked is not None:
        scores = np.where(masked, -np.inf, scores)
    # The max over the visible keys keeps every exponent <= 0; a row with no visible key (or
    # no key at all, Tk = 0) has max -inf, shifted by 0 instead so that its exponentials are
    # exactly 0 (never NaN) and its output 0.
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(scores - row_max)
    total = e.sum(axis=-1, keepdims=True)
    p = (e / np.where(total > 0, total, 1.0)).astype(q.dtype, copy=False)
    out = _dropped(p, masks) @ v
    return out, AttentionCache(q, k, v, p, masks, scale)


def _dropped(p: np.ndarray, masks: AttentionMasks) -> np.ndarray:
    """P̃ = P ⊙ M / (1 - p) (P itself without dropout)."""
    if masks.keep_mask is None:
        return p
    return np.where(masks.keep_mask, p * masks.keep_scale, 0.0).astype(p.dtype, copy=False)


def _attention_backward(dout: np.ndarray, cache: AttentionCache
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q, k, v, p, masks, scale = cache
    dv = _dropped(p, masks).swapaxes(-1, -2) @ dout            # out = P̃ v
    dp = _dropped(dout @ v.swapaxes(-1, -2), masks)           # P̃ = P ⊙ M / (1 - p)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))      # P = softmax(S)
    dq = ds @ k * scale                                       # S = q kᵀ · s + A
    dk = ds.swapaxes(-1, -2) @ q * scale
    return dq, dk, dv


def scaled_dot_product_attention_forward(
        q: np.ndarray, k: np.ndarray, v: np.ndarray, attn_mask: np.ndarray | None = None,
        key_padding_mask: np.ndarray | None = None, causal: bool = False, dropout: float = 0.0,
        dropout_mask: np.ndarray | None = None, scale: float | None = None
        ) -> tuple[np.ndarray, AttentionCache]:
    """out (B, h, Tq, dv) = softmax(q kᵀ · s + A) v for q (B, h, Tq, d), k (B, h, Tk, d),
    v (B, h, Tk, dv); masks and dropout as in the module docstring.

    attn_mask: bool (True = masked) or float additive, shape (Tq, Tk), (B, h, Tq, Tk) or
    (B, 1, Tq, Tk). key_padding_mask: bool (B, Tk). dropout_mask: bool keep-mask
    (B, h, Tq, Tk), required when dropout > 0. scale: default 1/√d.
    """
    check_float_array("q", q, shape=("B", "h", "Tq", "d"))
    batch, heads, tq, head_dim = q.shape
    check_float_array("k", k, shape=(batch, heads, "Tk", head_dim), dtype=q.dtype)
    tk = k.shape[2]
    check_float_array("v", v, shape=(batch, heads, tk, "dv"), dtype=q.dtype)
    masks = check_attention_masks(batch, heads, tq, tk, q.dtype, attn_mask, key_padding_mask,
                                  causal, dropout, dropout_mask)
    return _attention_forward(q, k, v, masks, _check_scale(scale, head_dim))


def scaled_dot_product_attention_backward(dout: np.ndarray, cache: AttentionCache
                                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) for dout (B, h, Tq, dv)."""
    q, v = cache.q, cache.v
    check_float_array("dout", dout, shape=q.shape[:3] + v.shape[3:], dtype=q.dtype, finite=False)
    return _attention_backward(dout, cache)


# ----------------------------------------------------------------------------- multi-head

IN_PROJ, OUT_PROJ = ("in_proj_weight", "in_proj_bias"), ("out_proj.weight", "out_proj.bias")


def mha_param_shapes(embed_dim: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """torch.nn.MultiheadAttention's parameter names and shapes (biases present together)."""
    shapes = {"in_proj_weight": (3 * embed_dim, embed_dim),
              "out_proj.weight": (embed_dim, embed_dim)}
    if bias:
        shapes.update({"in_proj_bias": (3 * embed_dim,), "out_proj.bias": (embed_dim,)})
    return shapes


def _check_mha_params(params: object, embed_dim: int, dtype: np.dtype) -> bool:
    """Validate ``params`` against nn.MultiheadAttention's names; return whether it has biases."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    bias = "in_proj_bias" in params or "out_proj.bias" in params
    expected = mha_param_shapes(embed_dim, bias)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unexpected} "
                         f"(in_proj_bias and out_proj.bias are present together or not at all)")
    for name, shape in expected.items():
        check_float_array(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)
    return bias


def check_num_heads(num_heads: object, embed_dim: int) -> int:
    heads = check_positive_int("num_heads", num_heads)
    if embed_dim % heads:
        raise ValueError(f"num_heads: expected a divisor of embed_dim E = {embed_dim}, "
                         f"got {heads}")
    return heads


def _split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, T, E) -> (B, h, T, E / h)."""
    batch, steps, width = x.shape
    return x.reshape(batch, steps, heads, width // heads).transpose(0, 2, 1, 3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, h, T, d) -> (B, T, h d)."""
    batch, heads, steps, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, steps, heads * head_dim)


class MultiheadAttentionCache(NamedTuple):
    q_proj: LinearCache        # Q = query W_qᵀ + b_q
    k_proj: LinearCache        # K = key W_kᵀ + b_k
    v_proj: LinearCache        # V = value W_vᵀ + b_v
    attention: AttentionCache  # over the heads of Q, K, V
    out_proj: LinearCache      # out = O W_oᵀ + b_o
    num_heads: int


def multi_head_attention_forward(
        query: np.ndarray, key: np.ndarray, value: np.ndarray, params: Mapping[str, np.ndarray],
        num_heads: int, key_padding_mask: np.ndarray | None = None,
        attn_mask: np.ndarray | None = None, causal: bool = False, dropout: float = 0.0,
        dropout_mask: np.ndarray | None = None, need_weights: bool = False
        ) -> tuple[tuple[np.ndarray, np.ndarray | None], MultiheadAttentionCache]:
    """torch.nn.MultiheadAttention(batch_first=True) over query (B, Tq, E), key, value (B, Tk, E).

    params: in_proj_weight (3E, E), out_proj.weight (E, E), and optionally (together)
    in_proj_bias (3E,), out_proj.bias (E,). Masks as in scaled_dot_product_attention_forward,
    with h = num_heads. Returns ((out (B, Tq, E), weights (B, Tq, Tk) averaged over heads, or
    None unless need_weights), cache). For self-attention pass one array three times.
    """
    check_float_array("query", query, shape=("B", "Tq", "E"))
    batch, tq, embed_dim = query.shape
    check_float_array("key", key, shape=(batch, "Tk", embed_dim), dtype=query.dtype)
    tk = key.shape[1]
    check_float_array("value", value, shape=(batch, tk, embed_dim), dtype=query.dtype)
    heads = check_num_heads(num_heads, embed_dim)
    bias = _check_mha_params(params, embed_dim, query.dtype)
    masks = check_attention_masks(batch, heads, tq, tk, query.dtype, attn_mask,
                                  key_padding_mask, causal, dropout, dropout_mask)
    w_q, w_k, w_v = np.split(params["in_proj_weight"], 3)
    b_q, b_k, b_v = np.split(params["in_proj_bias"], 3) if bias else (None, None, None)
    q, q_cache = linear_forward(query, w_q, b_q)
    k, k_cache = linear_forward(key, w_k, b_k)
    v, v_cache = linear_forward(value, w_v, b_v)
    o, attention_cache = _attention_forward(_split_heads(q, heads), _split_heads(k, heads),
                                            _split_heads(v, heads), masks,
                                            1.0 / math.sqrt(embed_dim // heads))
    out, out_cache = linear_forward(_merge_heads(o), params["out_proj.weight"],
                                    params.get("out_proj.bias"))
    weights = _dropped(attention_cache.p, masks).mean(axis=1) if need_weights else None
    return (out, weights), MultiheadAttentionCache(q_cache, k_cache, v_cache, attention_cache,
                                                   out_cache, heads)


def multi_head_attention_backward(dout: np.ndarray, cache: MultiheadAttentionCache
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                             dict[str, np.ndarray]]:
    """(dquery, dkey, dvalue, dparams) for dout (B, Tq, E); dparams keyed like params.

    For self-attention the gradient of the one input is dquery + dkey + dvalue.
    """
    query_shape = cache.q_proj.x.shape
    check_float_array("dout", dout, shape=query_shape, dtype=cache.q_proj.x.dtype, finite=False)
    do, dw_o, db_o = linear_backward(dout, cache.out_proj)
    heads = cache.num_heads
    dq, dk, dv = _attention_backward(_split_heads(do, heads), cache.attention)
    dquery, dw_q, db_q = linear_backward(_merge_heads(dq), cache.q_proj)
    dkey, dw_k, db_k = linear_backward(_merge_heads(dk), cache.k_proj)
    dvalue, dw_v, db_v = linear_backward(_merge_heads(dv), cache.v_proj)
    dparams = {"in_proj_weight": np.concatenate([dw_q, dw_k, dw_v]), "out_proj.weight": dw_o}
    if db_o is not None:
        dparams["in_proj_bias"] = np.concatenate([db_q, db_k, db_v])
        dparams["out_proj.bias"] = db_o
    return dquery, dkey, dvalue, dparams


class MultiheadAttention(Module):
    """``torch.nn.MultiheadAttention(batch_first=True)`` in NumPy, with ``backward``.

    MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, dtype=np.float64,
    seed=None). Init as torch: in_proj_weight Xavier-uniform, out_proj.weight
    U(-1/√E, 1/√E), biases 0. ``state_dict()`` loads into torch.nn.MultiheadAttention and back.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 dtype: Any = np.float64, seed: int | None = None) -> None:
        super().__init__()
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.num_heads = check_num_heads(num_heads, self.embed_dim)
        self.dropout = check_probability("dropout", dropout)
        self.bias = bool(bias)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.rng = np.random.default_rng(seed)
        E = self.embed_dim
        xavier = math.sqrt(6.0 / (E + 3 * E))
        self.params = {
            "in_proj_weight": self.rng.uniform(-xavier, xavier, (3 * E, E)).astype(self.dtype),
            "out_proj.weight": self.rng.uniform(-1 / math.sqrt(E), 1 / math.sqrt(E),
                                                (E, E)).astype(self.dtype)}
        if self.bias:
            self.params["in_proj_bias"] = np.zeros(3 * E, self.dtype)
            self.params["out_proj.bias"] = np.zeros(E, self.dtype)
        self.zero_grad()
        self._cache: MultiheadAttentionCache | None = None

    def forward(self, query: np.ndarray, key: np.ndarray, value: np.ndarray,
                key_padding_mask: np.ndarray | None = None, attn_mask: np.ndarray | None = None,
                need_weights: bool = False, is_causal: bool = False,
                dropout_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(out (B, Tq, E), weights (B, Tq, Tk) or None). ``is_causal`` applies the causal mask
        (unlike torch.nn's hint). In training with dropout > 0 and no ``dropout_mask``, a keep-mask
        is drawn from the module's generator; in eval mode there is no dropout."""
        dropout = self.dropout if self.training else 0.0
        if dropout == 0:
            dropout_mask = None
        elif dropout_mask is None:
            check_float_array("query", query, shape=("B", "Tq", self.embed_dim), finite=False)
            check_float_array("key", key, shape=(query.shape[0], "Tk", self.embed_dim),
                              finite=False)
            shape = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
            dropout_mask = self.rng.random(shape) >= dropout
        (out, weights), self._cache = multi_head_attention_forward(
            query, key, value, self.params, self.num_heads, key_padding_mask, attn_mask,
            is_causal, dropout, dropout_mask, need_weights)
        return out, weights

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dquery, dkey, dvalue)."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        dquery, dkey, dvalue, self.grads = multi_head_attention_backward(dout, cache)
        return dquery, dkey, dvalue

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray | None]:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"MultiheadAttention({self.embed_dim}, {self.num_heads}, dropout={self.dropout}, "
                f"bias={self.bias})")
