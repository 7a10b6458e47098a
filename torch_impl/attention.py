"""Scaled dot-product attention (FlashAttention-style, blocked over keys) and multi-head attention.

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

P is never stored. The forward walks the keys in blocks of ``block_k`` with an online softmax,
keeping per query row the running max m, the running sum l = Σ_j e^{S_j - m} and the running
output; it saves only the log-sum-exp L = m + log l (B, h, Tq) (L = +inf for a row with no
visible key, which makes every e^{S - L} = 0). The backward recomputes each block of
P = e^{S - L} from q, k and L (FlashAttention-2):

    D   = Σ_c dout_c ⊙ out_c        (B, h, Tq)  (= Σ_j P_j dP_j, the softmax backward's sum)
    dv  = P̃ᵀ dout                   per key block
    dP  = (dout vᵀ) ⊙ M / (1 - p)
    dS  = P ⊙ (dP - D)
    dq += dS k · s                  accumulated over key blocks;   dk = dSᵀ q · s per block

so no (Tq, Tk) tensor larger than one (Tq, block_k) block exists in either pass. bf16/fp16
inputs are computed in float32 (scores, softmax statistics, accumulators) and cast back.

On the CPU, float32/float64 attention with dv = d and no mask but a causal one with Tq = Tk
(no attn_mask, key padding or dropout) runs ATen's fused CPU flash-attention forward and
backward instead of the Python loop (``_aten_flash_fits``): the same blocked online softmax,
saving the same L, in C++ and with the causal future skipped, 2-3x faster. On CUDA,
``scaled_dot_product_attention`` sends the mask-free and causal cases to the Triton kernels of
``kernels/attention.py``.

Multi-head attention (batch-first, torch.nn.MultiheadAttention's parameters):

    Q = query W_qᵀ + b_q            K = key W_kᵀ + b_k            V = value W_vᵀ + b_v
    Q, K, V split into h heads      (B, T, E) -> (B, h, T, E / h)
    out = merge(attention(Q, K, V)) W_oᵀ + b_o
    weights = (1/h) Σ_heads P̃       (B, Tq, Tk), the weights applied to V, as torch returns

``ScaledDotProductAttentionFunction`` and ``MultiheadAttentionFunction`` tie the forwards to
their hand-written backwards for autograd; ``scaled_dot_product_attention`` (torch-only) and
the ``MultiheadAttention`` module go through them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .checks import (
    _tracing,
    check_float_tensor,
    check_positive_int,
    check_probability,
    check_shape,
    shape_str,
)
from .linear import LinearCache, linear_backward, linear_forward

BLOCK_K = 128  # keys per block: (Tq, 128) score tiles at a time

# ----------------------------------------------------------------------------- validation


class AttentionMasks(NamedTuple):
    """The validated masking and dropout arguments of one attention call."""
    attn_mask: Tensor | None         # bool (True = masked) or float additive; 2-d or 4-d
    key_padding_mask: Tensor | None  # bool (B, Tk), True = padding
    causal: bool
    keep_mask: Tensor | None         # dropout keep-mask M (B, h, Tq, Tk), None without dropout
    keep_scale: float                # 1 / (1 - p)


def check_attention_masks(batch: int, heads: int, tq: int, tk: int, dtype: torch.dtype,
                          attn_mask: object, key_padding_mask: object, causal: object,
                          dropout: object, dropout_mask: object) -> AttentionMasks:
    """Validate the masks of an attention over (B, h, Tq, Tk) scores of ``dtype``."""
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor (bool, True = masked out, or "
                            f"float additive), got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            raise TypeError(f"attn_mask: expected dtype torch.bool or {dtype} (the dtype of the "
                            f"queries), got {attn_mask.dtype}")
        shapes = ((tq, tk), (batch, heads, tq, tk), (batch, 1, tq, tk))
        if tuple(attn_mask.shape) not in shapes:
            raise ValueError(f"attn_mask: expected shape (Tq, Tk) = {shape_str(shapes[0])}, "
                             f"(B, h, Tq, Tk) = {shape_str(shapes[1])} or (B, 1, Tq, Tk) = "
                             f"{shape_str(shapes[2])}, got {shape_str(tuple(attn_mask.shape))}")
        if attn_mask.dtype != torch.bool and not _tracing() and bool(
                (torch.isnan(attn_mask) | (attn_mask == math.inf)).any()):
            raise ValueError("attn_mask: contains NaN or +inf (a float mask is added to the "
                             "scores; -inf marks a masked key)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise TypeError(f"key_padding_mask: expected a bool torch.Tensor (True = padding), "
                            f"got {got}")
        check_shape("key_padding_mask", key_padding_mask.shape, (batch, tk))
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    p = check_probability("dropout", dropout)
    if p > 0 and dropout_mask is None:
        raise ValueError(f"dropout_mask: required when dropout > 0 (randomness is explicit: pass "
                         f"a bool keep-mask of shape (B, h, Tq, Tk) = "
                         f"{shape_str((batch, heads, tq, tk))}), got None")
    if p == 0 and dropout_mask is not None:
        raise ValueError("dropout_mask: expected None when dropout == 0, got a mask")
    if dropout_mask is not None:
        if not isinstance(dropout_mask, Tensor) or dropout_mask.dtype != torch.bool:
            got = getattr(dropout_mask, "dtype", type(dropout_mask).__name__)
            raise TypeError(f"dropout_mask: expected a bool torch.Tensor (True = keep), "
                            f"got {got}")
        check_shape("dropout_mask", dropout_mask.shape, (batch, heads, tq, tk))
    return AttentionMasks(attn_mask, key_padding_mask, causal, dropout_mask, 1.0 / (1.0 - p))


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return float(scale)


def _check_block_k(block_k: object) -> int:
    return check_positive_int("block_k", block_k)


# ----------------------------------------------------------------------------- attention

class AttentionCache(NamedTuple):
    q: Tensor              # (B, h, Tq, d)
    k: Tensor              # (B, h, Tk, d)
    v: Tensor              # (B, h, Tk, dv)
    out: Tensor            # (B, h, Tq, dv)
    lse: Tensor            # L (B, h, Tq), compute dtype; where a row sees no key, +inf (the
                           # blocked loop) or 0 (ATen's kernels): P = exp(-inf - L) = 0 both ways
    masks: AttentionMasks
    scale: float           # s
    block_k: int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 (softmax statistics need it), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def _block_scores(q: Tensor, k_block: Tensor, start: int, tk: int, masks: AttentionMasks,
                  scale: float) -> Tensor:
    """S for keys start .. start + block - 1: (B, h, Tq, block), -inf at masked keys."""
    stop = start + k_block.shape[-2]
    scores = (q @ k_block.transpose(-1, -2)) * scale
    attn_mask = masks.attn_mask
    masked = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = attn_mask[..., start:stop]
        else:  # -inf entries make -inf scores, masked like the rest
            scores = scores + attn_mask[..., start:stop]
    if masks.key_padding_mask is not None:
        padding = masks.key_padding_mask[:, None, None, start:stop]
        masked = padding if masked is None else masked | padding
    if masks.causal:
        tq = q.shape[-2]
        rows = torch.arange(tq, device=q.device)[:, None]
        cols = torch.arange(start, stop, device=q.device)[None, :]
        future = cols > rows + (tk - tq)
        masked = future if masked is None else masked | future
    return scores if masked is None else scores.masked_fill(masked, -math.inf)


def _dropped(p: Tensor, masks: AttentionMasks, start: int, stop: int) -> Tensor:
    """P̃ = P ⊙ M / (1 - p) on a key block (P itself without dropout)."""
    if masks.keep_mask is None:
        return p
    return torch.where(masks.keep_mask[..., start:stop], p * masks.keep_scale, 0.0)


def _aten_flash_fits(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks) -> bool:
    """Whether ATen's fused CPU flash-attention kernels compute exactly this attention: CPU
    float32/float64, dv = d and no dropout (ATen draws its own dropout). attn_mask, key
    padding and a causal mask that ATen's is_causal cannot express go to it as one additive
    mask (``_aten_mask``). A row that sees no key gets out 0 there too, and L = 0 rather than
    this module's +inf: either way its P = exp(-inf - L) is 0 in the backward and in the head
    weights, so ATen's (out, logsumexp) serve as (out, L)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and q.shape[-1] == v.shape[-1] and masks.keep_mask is None)


def _aten_is_causal(q: Tensor, k: Tensor, masks: AttentionMasks) -> bool:
    """ATen's is_causal aligns the mask top-left, this module bottom-right: they agree when
    Tq = Tk. With Tq = 1 (a decoder step) the one query sees every key: no mask at all."""
    return masks.causal and 1 < q.shape[-2] == k.shape[-2]


def _aten_mask(q: Tensor, k: Tensor, masks: AttentionMasks) -> Tensor | None:
    """attn_mask, the key padding and a causal mask with 1 < Tq != Tk as the one additive 4-d
    mask ATen's CPU flash kernels take (0 where a key is visible, -inf where masked, a float
    attn_mask as given), size 1 along what none varies by; None when there is none."""
    tq, tk = q.shape[-2], k.shape[-2]
    hidden = [masks.attn_mask] if masks.attn_mask is not None else []
    if masks.key_padding_mask is not None:
        hidden.append(masks.key_padding_mask[:, None, None, :])
    if masks.causal and tq not in (1, tk):  # query i sees keys j <= i + Tk - Tq
        hidden.append(torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1))
    mask = None
    for part in hidden:
        if part.dtype == torch.bool:
            part = torch.zeros(part.shape, dtype=q.dtype, device=q.device).masked_fill_(
                part, -math.inf)
        part = part if part.dim() == 4 else part[None, None]
        mask = part if mask is None else mask + part
    return mask


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float,
                       block_k: int) -> tuple[Tensor, AttentionCache]:
    if _aten_flash_fits(q, k, v, masks):
        # the same blocked online softmax in ATen's C++ (what F.scaled_dot_product_attention
        # runs on the CPU), with causal blocks skipped: 2-3x the Python loop below
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, _aten_is_causal(q, k, masks), attn_mask=_aten_mask(q, k, masks),
            scale=scale)[:2]
        return out, AttentionCache(q, k, v, out, lse, masks, scale, block_k)
    compute = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    tk = k.shape[-2]
    row_max = torch.full(q.shape[:-1], -math.inf, dtype=compute, device=q.device)  # m
    row_sum = torch.zeros(q.shape[:-1], dtype=compute, device=q.device)            # l
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=compute, device=q.device)  # l · out
    for start in range(0, tk, block_k):
        stop = min(start + block_k, tk)
        scores = _block_scores(qc, kc[..., start:stop, :], start, tk, masks, scale)
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        # Rows that have seen no visible key yet keep max -inf; shifting them by 0 instead
        # makes their exponentials exactly 0 rather than NaN.
        shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
        rescale = torch.exp(row_max - shift)  # what was summed under the old max
        p = torch.exp(scores - shift[..., None])
        row_sum = row_sum * rescale + p.sum(dim=-1)
        acc = acc * rescale[..., None] + _dropped(p, masks, start, stop) @ vc[..., start:stop, :]
        row_max = new_max
    seen = row_sum > 0
    out = torch.where(seen[..., None], acc / torch.where(seen, row_sum, 1.0)[..., None], 0.0)
    lse = torch.where(seen, row_max + torch.log(torch.where(seen, row_sum, 1.0)), math.inf)
    out = out.to(q.dtype)
    return out, AttentionCache(q, k, v, out, lse, masks, scale, block_k)


def _attention_backward(dout: Tensor, cache: AttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse, masks, scale, block_k = cache
    if _aten_flash_fits(q, k, v, masks) and lse.dtype == q.dtype:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse, 0.0, _aten_is_causal(q, k, masks),
            attn_mask=_aten_mask(q, k, masks), scale=scale)
    compute = _compute_dtype(q.dtype)
    qc, kc, vc, do = q.to(compute), k.to(compute), v.to(compute), dout.to(compute)
    tk = k.shape[-2]
    delta = (do * out.to(compute)).sum(dim=-1, keepdim=True)  # D = Σ_j P_j dP_j
    dq = torch.zeros_like(qc)
    dk, dv = torch.empty_like(kc), torch.empty_like(vc)
    for start in range(0, tk, block_k):
        stop = min(start + block_k, tk)
        k_block, v_block = kc[..., start:stop, :], vc[..., start:stop, :]
        p = torch.exp(_block_scores(qc, k_block, start, tk, masks, scale) - lse[..., None])
        dv[..., start:stop, :] = _dropped(p, masks, start, stop).transpose(-1, -2) @ do
        dp = _dropped(do @ v_block.transpose(-1, -2), masks, start, stop)
        ds = p * (dp - delta)
        dq += ds @ k_block
        dk[..., start:stop, :] = ds.transpose(-1, -2) @ qc
    return (dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype)


def _check_attention_args(q: object, k: object, v: object, attn_mask: object,
                          key_padding_mask: object, causal: object, dropout: object,
                          dropout_mask: object, scale: object, block_k: object
                          ) -> tuple[AttentionMasks, float, int]:
    check_float_tensor("q", q, shape=("B", "h", "Tq", "d"))
    batch, heads, tq, head_dim = q.shape
    check_float_tensor("k", k, shape=(batch, heads, "Tk", head_dim), dtype=q.dtype)
    tk = k.shape[2]
    check_float_tensor("v", v, shape=(batch, heads, tk, "dv"), dtype=q.dtype)
    masks = check_attention_masks(batch, heads, tq, tk, q.dtype, attn_mask, key_padding_mask,
                                  causal, dropout, dropout_mask)
    return masks, _check_scale(scale, head_dim), _check_block_k(block_k)


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
    keys per block of the online softmax. The cache holds q, k, v, out and L, never P.
    """
    masks, scale, block_k = _check_attention_args(q, k, v, attn_mask, key_padding_mask, causal,
                                                   dropout, dropout_mask, scale, block_k)
    return _attention_forward(q, k, v, masks, scale, block_k)


@torch.no_grad()
def scaled_dot_product_attention_backward(dout: Tensor, cache: AttentionCache
                                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for dout (B, h, Tq, dv), recomputing P block by block from L."""
    q, v = cache.q, cache.v
    check_float_tensor("dout", dout, shape=tuple(q.shape[:3]) + tuple(v.shape[3:]),
                       dtype=q.dtype, finite=False)
    return _attention_backward(dout, cache)


class ScaledDotProductAttentionFunction(torch.autograd.Function):
    """out = attention(q, k, v) with the FlashAttention-style hand-written backward.

    apply(q, k, v, attn_mask, key_padding_mask, causal, dropout, dropout_mask, scale, block_k);
    masks get no gradient (a float attn_mask is treated as a constant). Saves q, k, v, out,
    L and the caller's masks: no (Tq, Tk) tensor of its own.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, key_padding_mask, causal, dropout, dropout_mask,
                scale, block_k):
        out, cache = scaled_dot_product_attention_forward(
            q, k, v, attn_mask, key_padding_mask, causal, dropout, dropout_mask, scale,
            block_k=block_k)
        masks = cache.masks
        ctx.save_for_backward(q, k, v, out, cache.lse, masks.attn_mask,
                              masks.key_padding_mask, masks.keep_mask)
        ctx.causal, ctx.keep_scale, ctx.scale, ctx.block_k = (masks.causal, masks.keep_scale,
                                                             cache.scale, cache.block_k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, attn_mask, key_padding_mask, keep_mask = ctx.saved_tensors
        masks = AttentionMasks(attn_mask, key_padding_mask, ctx.causal, keep_mask,
                               ctx.keep_scale)
        dq, dk, dv = _attention_backward(dout, AttentionCache(q, k, v, out, lse, masks,
                                                              ctx.scale, ctx.block_k))
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None, None, None, None)


def _fused_attention_fits(q: object, v: object, attn_mask: object, dropout: object,
                          block_k: object) -> bool:
    """Whether scaled_dot_product_attention can run the fused CUDA kernels (see there)."""
    if not (isinstance(q, Tensor) and isinstance(v, Tensor) and q.is_cuda and q.dim() == 4
            and v.dim() == 4 and attn_mask is None and dropout == 0 and block_k == BLOCK_K
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    from .kernels import use_triton
    from .kernels.attention import MAX_HEAD_DIM
    return use_triton(q) and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 key_padding_mask: Tensor | None = None, causal: bool = False,
                                 dropout: float = 0.0, dropout_mask: Tensor | None = None,
                                 scale: float | None = None, *, block_k: int = BLOCK_K) -> Tensor:
    """Torch-only convenience: out (B, h, Tq, dv), differentiable in q, k, v by autograd.
    Arguments as scaled_dot_product_attention_forward.

    On CUDA, with no attn_mask, no dropout and the default block_k, bf16/fp16/float32 inputs
    with head dims up to 128 go to the fused Triton kernels (``kernels.flash_attention``, the
    same math; the kernel path switch "torch" turns this off); everything else goes through
    ``ScaledDotProductAttentionFunction``'s blocked torch forward and backward.
    """
    if _fused_attention_fits(q, v, attn_mask, dropout, block_k):
        from .kernels.attention import flash_attention  # here: kernels imports this module
        return flash_attention(q, k, v, causal, key_padding_mask, scale)
    return ScaledDotProductAttentionFunction.apply(q, k, v, attn_mask, key_padding_mask, causal,
                                                   dropout, dropout_mask, scale, block_k)


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
    q, k, lse, masks = cache.q, cache.k, cache.lse, cache.masks
    compute = _compute_dtype(q.dtype)
    tk = k.shape[-2]
    p = torch.exp(_block_scores(q.to(compute), k.to(compute), 0, tk, masks, cache.scale)
                  - lse[..., None])
    return _dropped(p, masks, 0, tk).mean(dim=1).to(q.dtype)


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
    block_k = _check_block_k(block_k)
    w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = params["in_proj_bias"].chunk(3) if bias else (None, None, None)
    q, q_cache = linear_forward(query, w_q, b_q)
    k, k_cache = linear_forward(key, w_k, b_k)
    v, v_cache = linear_forward(value, w_v, b_v)
    o, attention_cache = _attention_forward(_split_heads(q, heads), _split_heads(k, heads),
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
    dq, dk, dv = _attention_backward(_split_heads(do, cache.num_heads), cache.attention)
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
