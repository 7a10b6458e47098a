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
(masked, so any head dim up to MAX_HEAD_DIM works); on a GPU the block sizes, warps and
pipeline stages per kernel come from GPU_CONFIGS. Compiled kernels loop to run-time bounds
(key blocks wholly in a query block's causal future, and query blocks wholly before a key
block, are never visited), a loop the compiler can software-pipeline. In triton's interpreter,
run-time loop bounds break with numpy >= 2.4, so there the loops run to compile-time block
counts rounded up to a power of two, skipping blocks past the end by an ``if``.

float64 runs the Triton kernels only in the interpreter (CPU tests); on a GPU it takes the
torch path, since triton cannot compile a float64 tl.dot for NVIDIA GPUs.

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

BLOCK_Q = 64        # queries per program (Triton, interpreted; a GPU takes GPU_CONFIGS)
BLOCK_K = 64        # keys per block (both paths; 64 x 64 score tiles, FlashAttention-2's size)
MAX_HEAD_DIM = 128  # largest head dim the Triton kernels hold in registers (padded to 2^n)
# compiled kernels loop to run-time bounds; triton 3.6's interpreter cannot (see above)
RUNTIME_LOOPS = not _INTERPRETED
DELTA_ROWS = 64     # rows per program of the backward's D = Σ dout ⊙ out
# On a GPU: (BLOCK_Q, BLOCK_K, num_warps, num_stages) per kernel, by padded head dim (the
# smallest key >= it). The forward and dq kernels hold a query block and stream key blocks,
# dkdv holds a key block and streams query blocks. Chosen by benchmarks/tune_attention.py on
# the lent H100 (bf16, causal, T 4096); see benchmarks/results/nvidia-h100-80gb-hbm3/.
GPU_CONFIGS = {
    "forward": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    "dkdv": {64: (128, 128, 8, 2), 128: (32, 64, 4, 4)},
    "dq": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
}
# float32 (IEEE, no tensor cores) holds tiles of twice the bytes: smaller blocks
GPU_CONFIGS_FLOAT32 = {
    "forward": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2)},
    "dkdv": {64: (32, 64, 4, 2), 128: (32, 64, 4, 2)},
    "dq": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2)},
}



# --------------------------------------------------------------------------- Triton kernels

@jit
def _dot(a, b, ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr):
    """a b with operands rounded to the input dtype IN (P and dS are bf16/fp16 products, as in
    FlashAttention), multiplied in DOT (IN itself; float32 for bf16 in the interpreter, whose
    dot multiplies bf16's raw bits) and accumulated in ACC; float32 is IEEE, never TF32."""
    return tl.dot(a.to(IN).to(DOT), b.to(IN).to(DOT), input_precision="ieee", out_dtype=ACC)


@jit
def _tile(ptr, bh, index, n, dims, width, EVEN_D: tl.constexpr):
    """Load the (index, head dim) tile of one batch item and head of a (B h, n, width) tensor,
    0 outside it. With EVEN_D (the head dim fills its padded block) the mask is constant along
    the contiguous axis, which lets the compiler issue 16-byte loads."""
    offsets = bh * n * width + index[:, None] * width + dims[None, :]
    if EVEN_D:
        return tl.load(ptr + offsets, mask=index[:, None] < n, other=0.0)
    return tl.load(ptr + offsets, mask=(index[:, None] < n) & (dims[None, :] < width), other=0.0)


@jit
def _store_tile(ptr, value, bh, index, n, dims, width, EVEN_D: tl.constexpr):
    offsets = bh * n * width + index[:, None] * width + dims[None, :]
    value = value.to(ptr.dtype.element_ty)
    if EVEN_D:
        tl.store(ptr + offsets, value, mask=index[:, None] < n)
    else:
        tl.store(ptr + offsets, value, mask=(index[:, None] < n) & (dims[None, :] < width))


@jit
def _scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk, MASK: tl.constexpr,
            HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
            IN: tl.constexpr, DOT: tl.constexpr):
    """S = q kᵀ · s for a (queries, keys) block, -inf at padded keys, and with MASK also at
    causal-future and absent keys. Blocks run without MASK only where every key exists and is
    in every query's past; their rows past Tq are never stored, or carry L = +inf (P = 0)."""
    s = _dot(q, tl.trans(k), ACC, IN, DOT) * scale
    if MASK:
        visible = (rows[:, None] < Tq) & (cols[None, :] < Tk)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + (Tk - Tq))
        s = tl.where(visible, s, float("-inf"))
    if HAS_PADDING:
        padded = tl.load(padding_ptr + batch * Tk + cols, mask=cols < Tk, other=1)
        s = tl.where((padded == 0)[None, :], s, float("-inf"))
    return s


@jit
def _forward_block(q, m, l, acc, start, k_ptr, v_ptr, padding_ptr, scale, bh, batch, rows, dims,
                   vdims, Tq, Tk, D, DV, MASK: tl.constexpr, HAS_PADDING: tl.constexpr,
                   CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
                   IN: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One key block of the online softmax: (m, l, acc) updated by keys start .. + BLOCK_K."""
    cols = start + tl.arange(0, BLOCK_K)
    k = _tile(k_ptr, bh, cols, Tk, dims, D, EVEN_D)
    v = _tile(v_ptr, bh, cols, Tk, vdims, DV, EVEN_D)
    s = _scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk, MASK, HAS_PADDING, CAUSAL,
                ACC, IN, DOT)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # rows that have seen no visible key keep max -inf: shifting them by 0 instead
    # makes their exponentials exactly 0 rather than NaN
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - shift)          # what was summed under the old max
    p = tl.exp(s - shift[:, None])
    l = l * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + _dot(p, v, ACC, IN, DOT)
    return m_new, l, acc


@jit
def _first_masked_key(q_block, Tq, Tk, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      CAUSAL: tl.constexpr):
    """Keys before the returned multiple of BLOCK_K exist and are visible to every query of
    the block (the block's first query sees keys j <= its index + Tk - Tq)."""
    full = Tk
    if CAUSAL:
        full = tl.maximum(tl.minimum(Tk, q_block * BLOCK_Q + 1 + (Tk - Tq)), 0)
    return (full // BLOCK_K) * BLOCK_K


@jit
def _flash_attention_forward_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, out_ptr,
                                    lse_ptr, heads, Tq, Tk, D, DV, HAS_PADDING: tl.constexpr,
                                    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                                    ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr,
                                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                    KEY_BLOCKS: tl.constexpr, RUNTIME_LOOP: tl.constexpr):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _tile(q_ptr, bh, rows, Tq, dims, D, EVEN_D)
    scale = tl.load(scale_ptr)
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=ACC)
    l = tl.zeros((BLOCK_Q,), dtype=ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), dtype=ACC)
    stop = Tk                                     # keys past stop are in every row's future
    if CAUSAL:
        stop = tl.minimum(Tk, q_block * BLOCK_Q + BLOCK_Q + (Tk - Tq))
    if RUNTIME_LOOP:    # compiled: plain loops the compiler pipelines, unmasked blocks first
        full = _first_masked_key(q_block, Tq, Tk, BLOCK_Q, BLOCK_K, CAUSAL)
        for start in range(0, full, BLOCK_K):
            m, l, acc = _forward_block(q, m, l, acc, start, k_ptr, v_ptr, padding_ptr, scale,
                                       bh, batch, rows, dims, vdims, Tq, Tk, D, DV, False,
                                       HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT, BLOCK_K)
        for start in range(full, stop, BLOCK_K):
            m, l, acc = _forward_block(q, m, l, acc, start, k_ptr, v_ptr, padding_ptr, scale,
                                       bh, batch, rows, dims, vdims, Tq, Tk, D, DV, True,
                                       HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT, BLOCK_K)
    else:               # interpreted: a compile-time bound, an if, every block masked
        for key_block in range(0, KEY_BLOCKS):
            if key_block * BLOCK_K < stop:
                m, l, acc = _forward_block(q, m, l, acc, key_block * BLOCK_K, k_ptr, v_ptr,
                                           padding_ptr, scale, bh, batch, rows, dims, vdims, Tq,
                                           Tk, D, DV, True, HAS_PADDING, CAUSAL, EVEN_D, ACC, IN,
                                           DOT, BLOCK_K)
    seen = l > 0
    l_safe = tl.where(seen, l, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, m + tl.log(l_safe), float("inf"))
    _store_tile(out_ptr, out, bh, rows, Tq, vdims, DV, EVEN_D)
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
def _dkdv_block(k, v, dk, dv, start, q_ptr, padding_ptr, scale, dout_ptr, lse_ptr, delta_ptr, bh,
                batch, cols, dims, vdims, Tq, Tk, D, DV, MASK: tl.constexpr,
                HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                ACC: tl.constexpr, IN: tl.constexpr, DOT: tl.constexpr, BLOCK_Q: tl.constexpr):
    """dk, dv of one key block, accumulated over the queries start .. + BLOCK_Q."""
    rows = start + tl.arange(0, BLOCK_Q)
    q = _tile(q_ptr, bh, rows, Tq, dims, D, EVEN_D)
    dout = _tile(dout_ptr, bh, rows, Tq, vdims, DV, EVEN_D)
    lse = tl.load(lse_ptr + bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Tq + rows, mask=rows < Tq, other=0.0)
    s = _scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk, MASK, HAS_PADDING, CAUSAL,
                ACC, IN, DOT)
    p = tl.exp(s - lse[:, None])          # 0 at masked keys and at rows with L = +inf
    dv += _dot(tl.trans(p), dout, ACC, IN, DOT)                  # out = P v
    dp = _dot(dout, tl.trans(v), ACC, IN, DOT)
    ds = p * (dp - delta[:, None])                               # P = softmax(S)
    dk += _dot(tl.trans(ds), q, ACC, IN, DOT)                    # S = q kᵀ · s
    return dk, dv


@jit
def _flash_attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, dout_ptr, lse_ptr,
                                 delta_ptr, dk_ptr, dv_ptr, heads, Tq, Tk, D, DV,
                                 HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
                                 EVEN_D: tl.constexpr, ACC: tl.constexpr, IN: tl.constexpr,
                                 DOT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                 QUERY_BLOCKS: tl.constexpr, RUNTIME_LOOP: tl.constexpr):
    k_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    key0 = k_block * BLOCK_K
    cols = key0 + tl.arange(0, BLOCK_K)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = _tile(k_ptr, bh, cols, Tk, dims, D, EVEN_D)
    v = _tile(v_ptr, bh, cols, Tk, vdims, DV, EVEN_D)
    scale = tl.load(scale_ptr)
    dk = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_K, BLOCK_DV), dtype=ACC)
    first = 0                                     # queries before first see none of these keys
    if CAUSAL:
        first = tl.maximum(key0 - (Tk - Tq), 0)
    if RUNTIME_LOOP:
        first = (first // BLOCK_Q) * BLOCK_Q
        # query blocks from `full` on see every key of this block (its last key is in the past
        # of their first query), so only [first, full) needs masks; all do if keys run past Tk
        full = first
        if CAUSAL:
            last_key = key0 + BLOCK_K - 1 - (Tk - Tq)
            full = tl.maximum(tl.cdiv(tl.maximum(last_key, 0), BLOCK_Q) * BLOCK_Q, first)
        if key0 + BLOCK_K > Tk:
            full = Tq
        full = tl.minimum(full, Tq)
        for start in range(first, full, BLOCK_Q):
            dk, dv = _dkdv_block(k, v, dk, dv, start, q_ptr, padding_ptr, scale, dout_ptr,
                                 lse_ptr, delta_ptr, bh, batch, cols, dims, vdims, Tq, Tk, D, DV,
                                 True, HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT, BLOCK_Q)
        for start in range(full, Tq, BLOCK_Q):
            dk, dv = _dkdv_block(k, v, dk, dv, start, q_ptr, padding_ptr, scale, dout_ptr,
                                 lse_ptr, delta_ptr, bh, batch, cols, dims, vdims, Tq, Tk, D, DV,
                                 False, HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT, BLOCK_Q)
    else:
        for query_block in range(0, QUERY_BLOCKS):
            start = query_block * BLOCK_Q
            if (start < Tq) & (start + BLOCK_Q > first):
                dk, dv = _dkdv_block(k, v, dk, dv, start, q_ptr, padding_ptr, scale, dout_ptr,
                                     lse_ptr, delta_ptr, bh, batch, cols, dims, vdims, Tq, Tk,
                                     D, DV, True, HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT,
                                     BLOCK_Q)
    _store_tile(dk_ptr, dk * scale, bh, cols, Tk, dims, D, EVEN_D)
    _store_tile(dv_ptr, dv, bh, cols, Tk, vdims, DV, EVEN_D)


@jit
def _dq_block(q, dout, lse, delta, dq, start, k_ptr, v_ptr, padding_ptr, scale, bh, batch, rows,
              dims, vdims, Tq, Tk, D, DV, MASK: tl.constexpr, HAS_PADDING: tl.constexpr,
              CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr, IN: tl.constexpr,
              DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """dq of one query block, accumulated over the keys start .. + BLOCK_K."""
    cols = start + tl.arange(0, BLOCK_K)
    k = _tile(k_ptr, bh, cols, Tk, dims, D, EVEN_D)
    v = _tile(v_ptr, bh, cols, Tk, vdims, DV, EVEN_D)
    s = _scores(q, k, scale, rows, cols, padding_ptr, batch, Tq, Tk, MASK, HAS_PADDING, CAUSAL,
                ACC, IN, DOT)
    p = tl.exp(s - lse[:, None])
    dp = _dot(dout, tl.trans(v), ACC, IN, DOT)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds, k, ACC, IN, DOT)
    return dq


@jit
def _flash_attention_dq_kernel(q_ptr, k_ptr, v_ptr, padding_ptr, scale_ptr, dout_ptr, lse_ptr,
                               delta_ptr, dq_ptr, heads, Tq, Tk, D, DV,
                               HAS_PADDING: tl.constexpr, CAUSAL: tl.constexpr,
                               EVEN_D: tl.constexpr, ACC: tl.constexpr, IN: tl.constexpr,
                               DOT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                               KEY_BLOCKS: tl.constexpr, RUNTIME_LOOP: tl.constexpr):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // heads
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _tile(q_ptr, bh, rows, Tq, dims, D, EVEN_D)
    dout = _tile(dout_ptr, bh, rows, Tq, vdims, DV, EVEN_D)
    lse = tl.load(lse_ptr + bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Tq + rows, mask=rows < Tq, other=0.0)
    scale = tl.load(scale_ptr)
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    stop = Tk
    if CAUSAL:
        stop = tl.minimum(Tk, q_block * BLOCK_Q + BLOCK_Q + (Tk - Tq))
    if RUNTIME_LOOP:
        full = _first_masked_key(q_block, Tq, Tk, BLOCK_Q, BLOCK_K, CAUSAL)
        for start in range(0, full, BLOCK_K):
            dq = _dq_block(q, dout, lse, delta, dq, start, k_ptr, v_ptr, padding_ptr, scale, bh,
                           batch, rows, dims, vdims, Tq, Tk, D, DV, False, HAS_PADDING, CAUSAL,
                           EVEN_D, ACC, IN, DOT, BLOCK_K)
        for start in range(full, stop, BLOCK_K):
            dq = _dq_block(q, dout, lse, delta, dq, start, k_ptr, v_ptr, padding_ptr, scale, bh,
                           batch, rows, dims, vdims, Tq, Tk, D, DV, True, HAS_PADDING, CAUSAL,
                           EVEN_D, ACC, IN, DOT, BLOCK_K)
    else:
        for key_block in range(0, KEY_BLOCKS):
            if key_block * BLOCK_K < stop:
                dq = _dq_block(q, dout, lse, delta, dq, key_block * BLOCK_K, k_ptr, v_ptr,
                               padding_ptr, scale, bh, batch, rows, dims, vdims, Tq, Tk, D, DV,
                               True, HAS_PADDING, CAUSAL, EVEN_D, ACC, IN, DOT, BLOCK_K)
    _store_tile(dq_ptr, dq * scale, bh, rows, Tq, dims, D, EVEN_D)


# --------------------------------------------------------------------------- launch wrappers

def _triton_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _padded_dims(q: Tensor, v: Tensor) -> dict:
    """The head dims rounded up to a power of two >= 16 (BLOCK_D, BLOCK_DV)."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if max(head_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"q, v: the Triton kernels hold head dims up to {MAX_HEAD_DIM}, got "
                         f"d = {head_dim}, dv = {value_dim} (use set_kernel_path('torch'))")
    return dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_DV=max(16, triton.next_power_of_2(value_dim)))


def _block_count(length: int, block: int) -> int:
    return triton.next_power_of_2(triton.cdiv(length, block))


def _launch_config(kernel: str, dims: dict, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BLOCK_Q, BLOCK_K, launch options) of one kernel. The interpreter takes the module's
    BLOCK_Q x BLOCK_K (tests shrink them); a GPU takes GPU_CONFIGS (GPU_CONFIGS_FLOAT32 for
    float32) of the kernel at the padded head dim."""
    if _INTERPRETED:
        return BLOCK_Q, BLOCK_K, {}
    width = max(dims["BLOCK_D"], dims["BLOCK_DV"])
    table = (GPU_CONFIGS_FLOAT32 if dtype == torch.float32 else GPU_CONFIGS)[kernel]
    block_q, block_k, warps, stages = table[min(w for w in table if w >= width)]
    return block_q, block_k, dict(num_warps=warps, num_stages=stages)


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
                 DOT=tl.float32 if interpreted_bf16 else _triton_dtype(q.dtype),
                 RUNTIME_LOOP=RUNTIME_LOOPS)
    return padding, scale_t, flags


def _flash_attention_forward_triton(q: Tensor, k: Tensor, v: Tensor,
                                    key_padding_mask: Tensor | None, causal: bool, scale: float
                                    ) -> tuple[Tensor, Tensor]:
    B, h, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[3]
    dims = _padded_dims(q, v)
    padding, scale_t, flags = _launch_arguments(q, key_padding_mask, causal, scale)
    flags["EVEN_D"] = (D, DV) == (dims["BLOCK_D"], dims["BLOCK_DV"])
    out = q.new_empty(B, h, Tq, DV)
    lse = q.new_empty(B, h, Tq, dtype=scale_t.dtype)
    block_q, block_k, options = _launch_config("forward", dims, q.dtype)
    # compiled loops run to a run-time bound, so KEY_BLOCKS (a compile-time constant) is 1 there
    _flash_attention_forward_kernel[(triton.cdiv(Tq, block_q), B * h)](
        q, k, v, padding, scale_t, out, lse, h, Tq, Tk, D, DV, **flags, **dims,
        BLOCK_Q=block_q, BLOCK_K=block_k,
        KEY_BLOCKS=1 if flags["RUNTIME_LOOP"] else _block_count(Tk, block_k), **options)
    return out, lse


def _flash_attention_backward_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                     lse: Tensor, key_padding_mask: Tensor | None, causal: bool,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, h, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[3]
    dims = _padded_dims(q, v)
    padding, scale_t, flags = _launch_arguments(q, key_padding_mask, causal, scale)
    flags["EVEN_D"] = (D, DV) == (dims["BLOCK_D"], dims["BLOCK_DV"])
    runtime = flags["RUNTIME_LOOP"]
    delta = torch.empty_like(lse)
    rows = B * h * Tq
    _flash_attention_delta_kernel[(triton.cdiv(rows, DELTA_ROWS),)](
        dout, out, delta, rows, DV, ACC=flags["ACC"], BLOCK_ROWS=DELTA_ROWS,
        BLOCK_DV=dims["BLOCK_DV"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_q, block_k, options = _launch_config("dkdv", dims, q.dtype)
    _flash_attention_dkdv_kernel[(triton.cdiv(Tk, block_k), B * h)](
        q, k, v, padding, scale_t, dout, lse, delta, dk, dv, h, Tq, Tk, D, DV, **flags,
        **dims, BLOCK_Q=block_q, BLOCK_K=block_k,
        QUERY_BLOCKS=1 if runtime else _block_count(Tq, block_q), **options)
    block_q, block_k, options = _launch_config("dq", dims, q.dtype)
    _flash_attention_dq_kernel[(triton.cdiv(Tq, block_q), B * h)](
        q, k, v, padding, scale_t, dout, lse, delta, dq, h, Tq, Tk, D, DV, **flags, **dims,
        BLOCK_Q=block_q, BLOCK_K=block_k,
        KEY_BLOCKS=1 if runtime else _block_count(Tk, block_k), **options)
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

def _fused(q: Tensor) -> bool:
    """Whether the op runs the Triton kernels: as ``use_triton``, except that float64 on a GPU
    takes the torch path (triton 3.6 cannot compile a float64 tl.dot for NVIDIA GPUs: its
    pass pipeline fails on sm_90, seen on the lent H100; the interpreter runs it)."""
    return use_triton(q) and (q.dtype != torch.float64 or _INTERPRETED)


@torch.library.custom_op("seqtwin::flash_attention", mutates_args=())
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, h, Tq, dv), L (B, h, Tq) in the compute dtype, +inf where a row sees no key)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _fused(q):
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
    if _fused(q):
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
