"""FlashAttention-style scaled dot-product attention: ``seqtwin::flash_attention`` and its
backward op. Semantics of ``attention.py``'s attention, restricted to the masks a kernel holds
in registers: causal and key padding (no attn_mask, no dropout; see below).

For one batch item and head, queries q (Tq, d), keys k (Tk, d), values v (Tk, dv):

    S   = q kᵀ · s                  s = scale (default 1/√d)
    P   = softmax_j(S)              over the keys j a query may see; P = 0 at masked keys
    out = P v

Masked keys: key_padding_mask (B, Tk) True = padding (torch.nn.MultiheadAttention's
convention), and with causal=True every key j > i + (Tk - Tq) (aligned bottom-right, as
``attention.py``: j <= i when Tq = Tk). A query that sees no key gets out = 0 and zero
gradients, never NaN.

Forward, one program per (query block, batch · head), walking the keys in blocks with an online
softmax: per row a running max m, sum l = Σ_j e^{S_j - m} and accumulator acc = Σ_j e^{S_j - m} v_j;
after a block, m' = max(m, max_block S), l' = l e^{m - m'} + Σ_block e^{S - m'}, likewise acc.
It writes out = acc / l and the log-sum-exp L = m + log l (B, h, Tq) (L = +inf for a row that
sees no key, which makes every e^{S - L} = 0 in the backward). P is never stored.

Backward (FlashAttention-2), recomputing each block of P = e^{S - L} from q, k and L:

    D   = Σ_c dout_c ⊙ out_c        (B, h, Tq), = Σ_j P_j dP_j (a preprocess kernel)
    dv  = Pᵀ dout                   out = P v
    dP  = dout vᵀ
    dS  = P ⊙ (dP - D)              P = softmax(S)
    dq  = dS k · s                  S = q kᵀ · s
    dk  = dSᵀ q · s

dk and dv come from one program per key block, looping over query blocks; dq from one program
per query block, looping over key blocks (S recomputed once more instead of atomics, so the
result is deterministic). Saved from forward to backward: q, k, v, out and L, nothing (Tq, Tk).

Precision: scores, softmax statistics and accumulators are float32 for bf16/fp16/float32 inputs
(float64 for float64); bf16/fp16 P and dS are cast to the input dtype for their matrix products,
as FlashAttention does. float32 products use IEEE float32, not TF32 (DESIGN.md's 1e-5 budget).

Blocks: BLOCK_Q queries by BLOCK_K keys by the head dim rounded up to a power of two >= 16
(masked, so any head dim up to MAX_HEAD_DIM works). Loop bounds are compile-time block counts
rounded up to a power of two (runtime loop bounds break triton 3.6's interpreter with
numpy >= 2.4, and a power of two keeps the number of compiled variants small); blocks past the
end, and key blocks wholly in a query block's causal future, are skipped by an ``if``.

Dropout and attn_mask stay on ``attention.py``'s path (``scaled_dot_product_attention``): the
kernel has no random keep-mask and no (Tq, Tk) mask input. On CPU tensors (path "auto" or
"torch") the op runs ``attention.py``'s blocked torch forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention import AttentionCache, AttentionMasks, _check_attention_args
from ..attention import _attention_backward as _attention_backward_torch
from ..attention import _attention_forward as _attention_forward_torch
from . import _INTERPRETED, compute_dtype, jit, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BLOCK_Q = 64        # queries per program (Triton)
BLOCK_K = 64        # keys per block (both paths; 64 x 64 score tiles, FlashAttention-2's size)
MAX_HEAD_DIM = 128  # largest head dim the Triton kernels hold in registers (padded to 2^n)



# --------------------------------------------------------------------------- Triton kernels

@jit
def _dot(a, b, ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr):
    """a b with operands rounded to the input dtype IN (P and dS are bf16/fp16 products, as in
    FlashAttention), multiplied in DOT (IN itself; float32 for bf16 in the interpreter, whose
    dot multiplies bf16's raw bits) and accumulated in ACC; float32 is IEEE, never TF32."""
    return tl.dot(a.to(IN).to(DOT), b.to(IN).to(DOT), input_precision="ieee", out_dtype=ACC)


@jit
def _masked_scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk,
                   HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
                   IN: tl.constexpr, DOT: tl.constexpr):
    """S = q kᵀ · s for a (queries, keys) block, -inf at masked, causal-future and absent keys."""
    s = _dot(q, tl.trans(k), ACC, IN, DOT) * scale
    visible = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    if HAS_PADDING:
        padded = tl.load(padding_ptr + batch * Tk + cols, mask=cols < Tk, other=1)
        visible = visible & (padded == 0)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (Tk - Tq))
    return tl.where(visible, s, float("-inf"))


@jit
def _flash_attention_forward_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, out_ptr,
                                    lse_ptr, heads, Tq, Tk, D, DV, HAS_PADDING: tl.constexpr,
                                    CAUSAL: tl.constexpr, ACC: tl.constexpr, IN: tl.constexpr,
                                    DOT: tl.constexpr, BLOCK_Q: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                                    BLOCK_DV: tl.constexpr, KEY_BLOCKS: tl.constexpr):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * Tq * D + rows[:, None] * D + dims[None, :],
                mask=(rows[:, None] < Tq) & (dims[None, :] < D), other=0.0)
    scale = tl.load(scale_ptr)
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_Q,), dtype=ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), dtype=ACC)
    stop = Tk                                     # keys past stop are in every row's future
    if CAUSAL:
        stop = tl.minimum(Tk, q_block * BLOCK_Q + BLOCK_Q + (Tk - Tq))
    for key_block in range(0, KEY_BLOCKS):
        start = key_block * BLOCK_K
        if start < stop:
            cols = start + tl.arange(0, BLOCK_K)
            k = tl.load(k_ptr + bh * Tk * D + cols[:, None] * D + dims[None, :],
                        mask=(cols[:, None] < Tk) & (dims[None, :] < D), other=0.0)
            v = tl.load(v_ptr + bh * Tk * DV + cols[:, None] * DV + vdims[None, :],
                        mask=(cols[:, None] < Tk) & (vdims[None, :] < DV), other=0.0)
            s = _masked_scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk,
                               HAS_PADDING, CAUSAL, ACC, IN, DOT)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # rows that have seen no visible key keep max -inf: shifting them by 0 instead
            # makes their exponentials exactly 0 rather than NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m - shift)          # what was summed under the old max
            p = tl.exp(s - shift[:, None])
            l = l * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + _dot(p, v, ACC, IN, DOT)
            m = m_new
    seen = l > 0
    l_safe = tl.where(seen, l, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(l_safe), float("inf"))
    tl.store(out_ptr + bh * Tq * DV + rows[:, None] * DV + vdims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < Tq) & (vdims[None, :] < DV))
    tl.store(lse_ptr + bh * Tq + rows, lse, mask=rows < Tq)


@jit
def _flash_attention_delta_kernel(dout_ptr, out_ptr, delta_ptr, n_rows, DV, ACC: tl.constexpr,
                                  BLOCK_ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """D = Σ_c dout_c ⊙ out_c for BLOCK_ROWS rows of the flattened (B h Tq, dv)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    vdims = tl.arange(0, BLOCK_DV)
    inside = (rows[:, None] < n_rows) & (vdims[None, :] < DV)
    offsets = rows[:, None] * DV + vdims[None, :]
    dout = tl.load(dout_ptr + offsets, mask=inside, other=0.0).to(ACC)
    out = tl.load(out_ptr + offsets, mask=inside, other=0.0).to(ACC)
    tl.store(delta_ptr + rows, tl.sum(dout * out, axis=1), mask=rows < n_rows)


@jit
def _flash_attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, dout_ptr, lse_ptr,
                                 delta_ptr, dk_ptr, dv_ptr, heads, Tq, Tk, D, DV,
                                 HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
                                 ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr,
                                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                 QUERY_BLOCKS: tl.constexpr):
    k_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + bh * Tk * D + cols[:, None] * D + dims[None, :],
                mask=(cols[:, None] < Tk) & (dims[None, :] < D), other=0.0)
    v = tl.load(v_ptr + bh * Tk * DV + cols[:, None] * DV + vdims[None, :],
                mask=(cols[:, None] < Tk) & (vdims[None, :] < DV), other=0.0)
    scale = tl.load(scale_ptr)
    dk = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_K, BLOCK_DV), dtype=ACC)
    first = 0                                     # queries before first see none of these keys
    if CAUSAL:
        first = k_block * BLOCK_K - (Tk - Tq)
    for query_block in range(0, QUERY_BLOCKS):
        start = query_block * BLOCK_Q
        if (start < Tq) & (start + BLOCK_Q > first):
            rows = start + tl.arange(0, BLOCK_Q)
            q = tl.load(q_ptr + bh * Tq * D + rows[:, None] * D + dims[None, :],
                        mask=(rows[:, None] < Tq) & (dims[None, :] < D), other=0.0)
            dout = tl.load(dout_ptr + bh * Tq * DV + rows[:, None] * DV + vdims[None, :],
                           mask=(rows[:, None] < Tq) & (vdims[None, :] < DV), other=0.0)
            lse = tl.load(lse_ptr + bh * Tq + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(delta_ptr + bh * Tq + rows, mask=rows < Tq, other=0.0)
            s = _masked_scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk,
                               HAS_PADDING, CAUSAL, ACC, IN, DOT)
            p = tl.exp(s - lse[:, None])          # 0 at masked keys and at rows with L = +inf
            dv += _dot(tl.trans(p), dout, ACC, IN, DOT)         # out = P v
            dp = _dot(dout, tl.trans(v), ACC, IN, DOT)
            ds = p * (dp - delta[:, None])                               # P = softmax(S)
            dk += _dot(tl.trans(ds), q, ACC, IN, DOT)           # S = q kᵀ · s
    inside_k = (cols[:, None] < Tk) & (dims[None, :] < D)
    tl.store(dk_ptr + bh * Tk * D + cols[:, None] * D + dims[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=inside_k)
    tl.store(dv_ptr + bh * Tk * DV + cols[:, None] * DV + vdims[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=(cols[:, None] < Tk) & (vdims[None, :] < DV))


@jit
def _flash_attention_dq_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, dout_ptr, lse_ptr,
                               delta_ptr, dq_ptr, heads, Tq, Tk, D, DV,
                               HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
                               ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                               KEY_BLOCKS: tl.constexpr):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * Tq * D + rows[:, None] * D + dims[None, :],
                mask=(rows[:, None] < Tq) & (dims[None, :] < D), other=0.0)
    dout = tl.load(dout_ptr + bh * Tq * DV + rows[:, None] * DV + vdims[None, :],
                   mask=(rows[:, None] < Tq) & (vdims[None, :] < DV), other=0.0)
    lse = tl.load(lse_ptr + bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Tq + rows, mask=rows < Tq, other=0.0)
    scale = tl.load(scale_ptr)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    stop = Tk
    if CAUSAL:
        stop = tl.minimum(Tk, q_block * BLOCK_Q + BLOCK_Q + (Tk - Tq))
    for key_block in range(0, KEY_BLOCKS):
        start = key_block * BLOCK_K
        if start < stop:
            cols = start + tl.arange(0, BLOCK_K)
            k = tl.load(k_ptr + bh * Tk * D + cols[:, None] * D + dims[None, :],
                        mask=(cols[:, None] < Tk) & (dims[None, :] < D), other=0.0)
            v = tl.load(v_ptr + bh * Tk * DV + cols[:, None] * DV + vdims[None, :],
                        mask=(cols[:, None] < Tk) & (vdims[None, :] < DV), other=0.0)
            s = _masked_scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk,
                               HAS_PADDING, CAUSAL, ACC, IN, DOT)
            p = tl.exp(s - lse[:, None])
            dp = _dot(dout, tl.trans(v), ACC, IN, DOT)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds, k, ACC, IN, DOT)
    tl.store(dq_ptr + bh * Tq * D + rows[:, None] * D + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=(rows[:, None] < Tq) & (dims[None, :] < D))


# --------------------------------------------------------------------------- launch wrappers

def _triton_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _block_sizes(q: Tensor, v: Tensor) -> dict:
    """The compile-time sizes every kernel shares: blocks of queries, keys and (padded) dims."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if max(head_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"q, v: the Triton kernels hold head dims up to {MAX_HEAD_DIM}, got "
                         f"d = {head_dim}, dv = {value_dim} (use set_kernel_path('torch'))")
    return dict(BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_DV=max(16, triton.next_power_of_2(value_dim)))


def _block_count(length: int, block: int) -> int:
    return triton.next_power_of_2(triton.cdiv(length, block))


def _launch_arguments(q: Tensor, key_padding_mask: Tensor | None, causal: bool, scale: float
                      ) -> tuple[Tensor, Tensor, dict]:
    """(padding as uint8 or a dummy pointer, scale as a 1-element tensor, flags)."""
    acc = compute_dtype(q.dtype)
    padding = q if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    # s travels as a tensor: a Python float argument would reach the kernel as float32
    scale_t = torch.full((1,), scale, dtype=acc, device=q.device)
    interpreted_bf16 = _INTERPRETED and q.dtype == torch.bfloat16
    flags = dict(HAS_PADDING=key_padding_mask is not None, CAUSAL=causal,
                 ACC=_triton_dtype(acc), IN=_triton_dtype(q.dtype),
                 DOT=tl.float32 if interpreted_bf16 else _triton_dtype(q.dtype))
    return padding, scale_t, flags


def _flash_attention_forward_triton(q: Tensor, k: Tensor, v: Tensor,
                                    key_padding_mask: Tensor | None, causal: bool, scale: float
                                    ) -> tuple[Tensor, Tensor]:
    B, h, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[3]
    blocks = _block_sizes(q, v)
    padding, scale_t, flags = _launch_arguments(q, key_padding_mask, causal, scale)
    out = q.new_empty(B, h, Tq, DV)
    lse = q.new_empty(B, h, Tq, dtype=scale_t.dtype)
    _flash_attention_forward_kernel[(triton.cdiv(Tq, BLOCK_Q), B * h)](
        q, k, v, padding, scale_t, out, lse, h, Tq, Tk, D, DV, **flags, **blocks,
        KEY_BLOCKS=_block_count(Tk, BLOCK_K))
    return out, lse


def _flash_attention_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                     lse: Tensor, key_padding_mask: Tensor | None, causal: bool,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, h, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[3]
    blocks = _block_sizes(q, v)
    padding, scale_t, flags = _launch_arguments(q, key_padding_mask, causal, scale)
    delta = torch.empty_like(lse)
    rows = B * h * Tq
    _flash_attention_delta_kernel[(triton.cdiv(rows, BLOCK_Q),)](
        dout, out, delta, rows, DV, ACC=flags["ACC"], BLOCK_ROWS=BLOCK_Q,
        BLOCK_DV=blocks["BLOCK_DV"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attention_dkdv_kernel[(triton.cdiv(Tk, BLOCK_K), B * h)](
        q, k, v, padding, scale_t, dout, lse, delta, dk, dv, h, Tq, Tk, D, DV, **flags,
        **blocks, QUERY_BLOCKS=_block_count(Tq, BLOCK_Q))
    _flash_attention_dq_kernel[(triton.cdiv(Tq, BLOCK_Q), B * h)](
        q, k, v, padding, scale_t, dout, lse, delta, dq, h, Tq, Tk, D, DV, **flags, **blocks,
        KEY_BLOCKS=_block_count(Tk, BLOCK_K))
    return dq, dk, dv


# The torch path is attention.py's blocked forward/backward pair (the math written once per
# backend), with the same L convention, so either path's forward feeds either path's backward.

def _torch_masks(key_padding_mask: Tensor | None, causal: bool) -> AttentionMasks:
    return AttentionMasks(None, key_padding_mask, causal, None, 1.0)


def _flash_attention_forward_torch(q: Tensor, k: Tensor, v: Tensor,
                                   key_padding_mask: Tensor | None, causal: bool, scale: float
                                   ) -> tuple[Tensor, Tensor]:
    out, cache = _attention_forward_torch(q, k, v, _torch_masks(key_padding_mask, causal),
                                          scale, BLOCK_K)
    return out, cache.lse


def _flash_attention_backward_torch(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                    lse: Tensor, key_padding_mask: Tensor | None, causal: bool,
                                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    cache = AttentionCache(q, k, v, out, lse, _torch_masks(key_padding_mask, causal), scale,
                           BLOCK_K)
    return _attention_backward_torch(dout, cache)


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("seqtwin::flash_attention", mutates_args=())
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, h, Tq, dv), L (B, h, Tq) in the compute dtype, +inf where a row sees no key)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if use_triton(q):
        return _flash_attention_forward_triton(q, k, v, key_padding_mask, causal, scale)
    return _flash_attention_forward_torch(q, k, v, key_padding_mask, causal, scale)


@flash_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale):
    return (q.new_empty(*q.shape[:3], v.shape[3]),
            q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype)))


@torch.library.custom_op("seqtwin::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, key_padding_mask: Tensor | None, causal: bool,
                                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for dout (B, h, Tq, dv), recomputing P block by block from L."""
    dout = dout.to(q.dtype).contiguous()
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    if use_triton(q):
        return _flash_attention_backward_triton(dout, q, k, v, out, lse, key_padding_mask,
                                                causal, scale)
    return _flash_attention_backward_torch(dout, q, k, v, out, lse, key_padding_mask, causal,
                                           scale)


@flash_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# --------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.seqtwin.flash_attention_backward(dout, q, k, v, out, lse,
                                                            key_padding_mask, ctx.causal,
                                                            ctx.scale)
    return dq, dk, dv, None, None, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    key_padding_mask: Tensor | None = None, scale: float | None = None
                    ) -> Tensor:
    """out (B, h, Tq, dv) = softmax(q kᵀ · s) v for q (B, h, Tq, d), k (B, h, Tk, d),
    v (B, h, Tk, dv), differentiable in q, k, v through the fused backward op.

    causal: mask keys j > i + (Tk - Tq) (bottom-right aligned). key_padding_mask: bool (B, Tk),
    True = padding. scale: default 1/√d. A row with no visible key gives out = 0 and zero
    gradients. For dropout or an attn_mask use ``torch_impl.attention``'s
    ``scaled_dot_product_attention``.
    """
    _, scale, _ = _check_attention_args(q, k, v, None, key_padding_mask, causal, 0.0, None, scale,
                                        BLOCK_K)
    out, _ = flash_attention_op(q, k, v, key_padding_mask, causal, scale)
    return out
