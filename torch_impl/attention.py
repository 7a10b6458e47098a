"""Scaled dot-product attention and multi-head attention: the public functions and module.

Twin of ``reference/attention.py`` on torch tensors. For each batch item and head, queries
q (Tq, d), keys k (Tk, d), values v (Tk, dv):

    S   = q kᵀ · s + A              s = scale (default 1/√d); A the float (additive) attn_mask
    P   = softmax_j(S)              over the keys j a query may see; P = 0 at masked keys
    P̃   = P ⊙ M / (1 - p)           M the dropout keep-mask, p the dropout rate
    out = P̃ v

Masked keys (True = masked out, as in torch.nn.MultiheadAttention; F.scaled_dot_product_attention
reads a boolean mask the other way round): True in a boolean attn_mask or key_padding_mask
(B, Tk), -inf in a float attn_mask, and with causal=True every key j > i + (Tk - Tq) (aligned
bottom-right, for a decoder step with a KV cache; j <= i when Tq = Tk). A query row whose keys
are all masked gets out = 0 and zero gradients.

P is never stored: the forward is FlashAttention's blocked online softmax, saving only the
log-sum-exp L (B, h, Tq), and the backward (FlashAttention-2) recomputes P block by block
from q, k and L. The math, its three implementations (Triton kernels, ATen's fused CPU
kernels, a blocked torch loop) and the one decision of which runs live in
``kernels/attention.py``; this file validates the public arguments, once, and composes.

Multi-head attention (batch-first, torch.nn.MultiheadAttention's parameters):

    Q = query W_qᵀ + b_q            K = key W_kᵀ + b_k            V = value W_vᵀ + b_v
    Q, K, V split into h heads      (B, T, E) -> (B, h, T, E / h)
    out = merge(attention(Q, K, V)) W_oᵀ + b_o
    weights = (1/h) Σ_heads P̃       (B, Tq, Tk), the weights applied to V, as torch returns

``scaled_dot_product_attention`` (torch-only) is the attention under autograd;
``MultiheadAttentionFunction`` ties the multi-head forward to its hand-written backward, and
the ``MultiheadAttention`` module goes through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .checks import check_float_tensor, check_positive_int, check_probability
from .kernels.attention import (
    BLOCK_K,
    AttentionCache,
    attention,
    attention_backward,
    attention_forward,
    attention_probabilities,
    check_attention_args,
    check_attention_masks,
)
from .linear import LinearCache, linear_backward, linear_forward

# ----------------------------------------------------------------------------- attention

@torch.no_grad()
def scaled_dot_product_attention_forward(
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None, causal: bool = False, dropout: float = 0.0,
        dropout_mask: Tensor | None = None, scale: float | None = None, *,
        block_k: int = BLOCK_K) -> tuple[Tensor, AttentionCache]:
    """out (B, h, Tq, dv) = softmax(q kᵀ · s + A) v for q (B, h, Tq, d), k (B, h, Tk, d),
    v (B, h, Tk, dv); masks and dropout as in the module docstring.

    attn_mask: bool (True = masked) or float additive, shape (Tq, Tk), (B, h, Tq, Tk) or
    (B, 1, Tq, Tk). key_padding_mask: bool (B, Tk). dropout_mask: bool keep-mask
    (B, h, Tq, Tk), required when dropout > 0. scale: default 1/√d. block_k (torch-only):
    keys per block of the torch loop's online softmax (the fused kernels tile on their own).
    The cache holds q, k, v, out and L, never P.
    """
    masks, scale, block_k = check_attention_args(q, k, v, attn_mask, key_padding_mask, causal,
                                                 dropout, dropout_mask, scale, block_k)
    return attention_forward(q, k, v, masks, scale, block_k)


@torch.no_grad()
def scaled_dot_product_attention_backward(dout: Tensor, cache: AttentionCache
                                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for dout (B, h, Tq, dv), recomputing P block by block from L."""
    q, v = cache.q, cache.v
    check_float_tensor("dout", dout, shape=tuple(q.shape[:3]) + tuple(v.shape[3:]),
                       dtype=q.dtype, finite=False)
    return attention_backward(dout, cache)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 key_padding_mask: Tensor | None = None, causal: bool = False,
                                 dropout: float = 0.0, dropout_mask: Tensor | None = None,
                                 scale: float | None = None, *, block_k: int = BLOCK_K) -> Tensor:
    """Torch-only convenience: out (B, h, Tq, dv), differentiable in q, k, v by autograd
    through the hand-written backward. Arguments as scaled_dot_product_attention_forward.

    On CUDA, with no attn_mask and no dropout, bf16/fp16/float32 inputs with head dims up to
    128 run the fused Triton kernels (the same math; the kernel path switch "torch" turns this
    off), float32/float64 on the CPU ATen's fused kernels where they fit, the rest the blocked
    torch loop (``kernels/attention.py`` decides). Masks get no gradient.
    """
    masks, scale, block_k = check_attention_args(q, k, v, attn_mask, key_padding_mask, causal,
                                                 dropout, dropout_mask, scale, block_k)
    return attention(q, k, v, masks, scale, block_k)

# ----------------------------------------------------------------------------- multi-head

def mha_param_shapes(embed_dim: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """torch.nn.MultiheadAttention's parameter names and shapes (biases present together)."""
    shapes = {"in_proj_weight": (3 * embed_dim, embed_dim),
              "out_proj.weight": (embed_dim, embed_dim)}
    if bias:
        shapes.update({"in_proj_bias": (3 * embed_dim,), "out_proj.bias": (embed_dim,)})
    return shapes


def _check_mha_params(params: object, embed_dim: int, dtype: torch.dtype) -> bool:
    """Validate ``params`` against nn.MultiheadAttention's names; return whether it has biases."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    bias = "in_proj_bias" in params or "out_proj.bias" in params
    expected = mha_param_shapes(embed_dim, bias)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unexpected} "
                         f"(in_proj_bias and out_proj.bias are present together or not at all)")
    for name, shape in expected.items():
        check_float_tensor(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)
    return bias


def check_num_heads(num_heads: object, embed_dim: int) -> int:
    heads = check_positive_int("num_heads", num_heads)
    if embed_dim % heads:
        raise ValueError(f"num_heads: expected a divisor of embed_dim E = {embed_dim}, "
                         f"got {heads}")
    return heads


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, E) -> (B, h, T, E / h)."""
    batch, steps, width = x.shape
    return x.reshape(batch, steps, heads, width // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, d) -> (B, T, h d)."""
    batch, heads, steps, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, steps, heads * head_dim)


def _head_weights(cache: AttentionCache) -> Tensor:
    """(1/h) Σ_heads P̃ (B, Tq, Tk), recomputed from L: the one (Tq, Tk) output, asked for."""
    return attention_probabilities(cache).mean(dim=1).to(cache.q.dtype)


class MultiheadAttentionCache(NamedTuple):
    q_proj: LinearCache        # Q = query W_qᵀ + b_q
    k_proj: LinearCache        # K = key W_kᵀ + b_k
    v_proj: LinearCache        # V = value W_vᵀ + b_v
    attention: AttentionCache  # over the heads of Q, K, V
    out_proj: LinearCache      # out = O W_oᵀ + b_o
    num_heads: int


@torch.no_grad()
def multi_head_attention_forward(
        query: Tensor, key: Tensor, value: Tensor, params: Mapping[str, Tensor], num_heads: int,
        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
        causal: bool = False, dropout: float = 0.0, dropout_mask: Tensor | None = None,
        need_weights: bool = False, *, block_k: int = BLOCK_K
        ) -> tuple[tuple[Tensor, Tensor | None], MultiheadAttentionCache]:
    """torch.nn.MultiheadAttention(batch_first=True) over query (B, Tq, E), key, value (B, Tk, E).

    params: in_proj_weight (3E, E), out_proj.weight (E, E), and optionally (together)
    in_proj_bias (3E,), out_proj.bias (E,). Masks as in scaled_dot_product_attention_forward,
    with h = num_heads. Returns ((out (B, Tq, E), weights (B, Tq, Tk) averaged over heads, or
    None unless need_weights), cache). For self-attention pass one tensor three times.
    """
    check_float_tensor("query", query, shape=("B", "Tq", "E"))
    batch, tq, embed_dim = query.shape
    check_float_tensor("key", key, shape=(batch, "Tk", embed_dim), dtype=query.dtype)
    tk = key.shape[1]
    check_float_tensor("value", value, shape=(batch, tk, embed_dim), dtype=query.dtype)
    heads = check_num_heads(num_heads, embed_dim)
    bias = _check_mha_params(params, embed_dim, query.dtype)
    masks = check_attention_masks(batch, heads, tq, tk, query.dtype, attn_mask,
                                  key_padding_mask, causal, dropout, dropout_mask)
    block_k = check_positive_int("block_k", block_k)
    w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = params["in_proj_bias"].chunk(3) if bias else (None, None, None)
    q, q_cache = linear_forward(query, w_q, b_q)
    k, k_cache = linear_forward(key, w_k, b_k)
    v, v_cache = linear_forward(value, w_v, b_v)
    o, attention_cache = attention_forward(_split_heads(q, heads), _split_heads(k, heads),
                                           _split_heads(v, heads), masks,
                                           1.0 / math.sqrt(embed_dim // heads), block_k)
    out, out_cache = linear_forward(_merge_heads(o), params["out_proj.weight"],
                                    params.get("out_proj.bias"))
    weights = _head_weights(attention_cache) if need_weights else None
    return (out, weights), MultiheadAttentionCache(q_cache, k_cache, v_cache, attention_cache,
                                                   out_cache, heads)


@torch.no_grad()
def multi_head_attention_backward(dout: Tensor, cache: MultiheadAttentionCache
                                  ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(dquery, dkey, dvalue, dparams) for dout (B, Tq, E); dparams keyed like params.

    For self-attention the gradient of the one input is dquery + dkey + dvalue.
    """
    query = cache.q_proj.x
    check_float_tensor("dout", dout, shape=tuple(query.shape), dtype=query.dtype, finite=False)
    do, dw_o, db_o = linear_backward(dout, cache.out_proj)
    dq, dk, dv = attention_backward(_split_heads(do, cache.num_heads), cache.attention)
    dquery, dw_q, db_q = linear_backward(_merge_heads(dq), cache.q_proj)
    dkey, dw_k, db_k = linear_backward(_merge_heads(dk), cache.k_proj)
    dvalue, dw_v, db_v = linear_backward(_merge_heads(dv), cache.v_proj)
    dparams = {"in_proj_weight": torch.cat([dw_q, dw_k, dw_v]), "out_proj.weight": dw_o}
    if db_o is not None:
        dparams["in_proj_bias"] = torch.cat([db_q, db_k, db_v])
        dparams["out_proj.bias"] = db_o
    return dquery, dkey, dvalue, dparams


class MultiheadAttentionFunction(torch.autograd.Function):
    """(out, weights) = MHA(query, key, value; params) with the hand-written backward.

    apply(query, key, value, key_padding_mask, attn_mask, causal, dropout, dropout_mask,
    need_weights, num_heads, keys, *weights), where weights[j] is params[keys[j]]. The
    projections' and the attention's backwards are all hand-written (multi_head_attention_
    backward); ``weights`` is returned without gradient. For self-attention pass one tensor
    three times and autograd sums its three gradients.
    """

    @staticmethod
    def forward(ctx, query, key, value, key_padding_mask, attn_mask, causal, dropout,
                dropout_mask, need_weights, num_heads, keys, *weights):
        (out, head_weights), cache = multi_head_attention_forward(
            query, key, value, dict(zip(keys, weights)), num_heads, key_padding_mask, attn_mask,
            causal, dropout, dropout_mask, need_weights)
        ctx.save_for_backward(query, key, value, *weights)  # version-counter checks on inputs
        ctx.cache, ctx.keys = cache, keys
        if head_weights is not None:
            ctx.mark_non_differentiable(head_weights)
        return out, head_weights

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dweights):
        _ = ctx.saved_tensors  # raises if an input was modified in place since forward
        dquery, dkey, dvalue, dparams = multi_head_attention_backward(dout, ctx.cache)
        need = ctx.needs_input_grad
        dweights = [dparams[key] if n else None for key, n in zip(ctx.keys, need[11:])]
        return (dquery if need[0] else None, dkey if need[1] else None,
                dvalue if need[2] else None, None, None, None, None, None, None, None, None,
                *dweights)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention(batch_first=True) with the hand-written backward above.

    MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, *, device=None,
    dtype=None). Parameters under torch.nn's names (in_proj_weight, in_proj_bias,
    out_proj.weight, out_proj.bias), so ``state_dict()`` loads into
    torch.nn.MultiheadAttention and back; init as torch. ``out_proj`` is an nn.Linear used
    only to hold its parameters: every matmul, forward and backward, is
    MultiheadAttentionFunction's.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.num_heads = check_num_heads(num_heads, self.embed_dim)
        self.dropout = check_probability("dropout", dropout)
        self.bias = bool(bias)
        E = self.embed_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * E, E, device=device, dtype=dtype))
        if self.bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * E, device=device, dtype=dtype))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(E, E, bias=self.bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's init: Xavier-uniform in_proj_weight, U(-1/√E, 1/√E) out_proj.weight,
        zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.out_proj.reset_parameters()
        if self.bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def param_keys(self) -> list[str]:
        return list(mha_param_shapes(self.embed_dim, self.bias))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                need_weights: bool = False, is_causal: bool = False,
                dropout_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(out (B, Tq, E), weights (B, Tq, Tk) or None). ``is_causal`` applies the causal
        mask (unlike torch.nn's hint). In training with dropout > 0 and no ``dropout_mask``,
        a Bernoulli keep-mask is drawn; in eval mode there is no dropout."""
        dropout = self.dropout if self.training else 0.0
        if dropout == 0:
            dropout_mask = None
        elif dropout_mask is None:
            check_float_tensor("query", query, shape=("B", "Tq", self.embed_dim), finite=False)
            check_float_tensor("key", key, shape=(query.shape[0], "Tk", self.embed_dim),
                               finite=False)
            shape = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
            dropout_mask = torch.empty(shape, device=query.device).bernoulli_(1.0 - dropout) \
                .bool()
        keys = self.param_keys()
        params = dict(self.named_parameters())
        return MultiheadAttentionFunction.apply(
            query, key, value, key_padding_mask, attn_mask, is_causal, dropout, dropout_mask,
            need_weights, self.num_heads, tuple(keys), *(params[k] for k in keys))

    def extra_repr(self) -> str:
        text = f"{self.embed_dim}, {self.num_heads}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if not self.bias:
            text += ", bias=False"
        return text
