"""Scaled dot-product attention, every implementation and the one decision of which runs.

For each batch item and head, queries q (Tq, d), keys k (Tk, d), values v (Tk, dv):

    S   = q kᵀ · s + A              s = scale (default 1/√d); A the float (additive) attn_mask
    P   = softmax_j(S)              over the keys j a query may see; P = 0 at masked keys
    P̃   = P ⊙ M / (1 - p)           M the dropout keep-mask, p the dropout rate
    out = P̃ v

Masked keys (True = masked out, as torch.nn.MultiheadAttention's masks): True in a boolean
attn_mask or key_padding_mask (B, Tk), -inf in a float attn_mask, and with causal=True every
key j > i + (Tk - Tq) (aligned bottom-right, for a decoder step with a KV cache; j <= i when
Tq = Tk). A query row whose keys are all masked gets out = 0 and zero gradients, never NaN.

P is never stored. The forward walks the keys in blocks with an online softmax: per row a
running max m, sum l = Σ_j e^{S_j - m} and accumulator acc = Σ_j e^{S_j - m} M_j v_j / (1 - p);
after a block, m' = max(m, max_block S), l' = l e^{m - m'} + Σ_block e^{S - m'}, likewise acc.
It writes out = acc / l and saves only the log-sum-exp L = m + log l (B, h, Tq) (L = +inf for
a row that sees no key, which makes every e^{S - L} = 0). The backward (FlashAttention-2)
recomputes each block of P = e^{S - L} from q, k and L:

    D   = Σ_c dout_c ⊙ out_c        (B, h, Tq)  (= Σ_j P_j dP_j, the softmax backward's sum)
    dv  = P̃ᵀ dout                   out = P̃ v
    dP  = (dout vᵀ) ⊙ M / (1 - p)
    dS  = P ⊙ (dP - D)              P = softmax(S)
    dq  = dS k · s                  S = q kᵀ · s
    dk  = dSᵀ q · s

so no (Tq, Tk) tensor larger than one block exists in either pass. Saved from forward to
backward: q, k, v, out and L (``AttentionCache``).

Three implementations of that math, and ``_implementation``, the one function that picks one
for each call (forward and backward alike, so also inside ``torch.compile``d code):

- "triton": the Triton kernels below, for the masks a kernel holds in registers (causal and
  key padding; no attn_mask, no dropout), on CUDA under the kernel path "auto" or "triton",
  or in triton's interpreter under "triton" (CPU tests); head dims up to MAX_HEAD_DIM.
- "aten": ATen's fused CPU flash-attention forward and backward (what
  F.scaled_dot_product_attention runs on the CPU): the same blocked online softmax in C++, with
  the causal future skipped, 2-3x the Python loop; float32/float64 CPU tensors, dv = d and no
  dropout (ATen draws its own), the masks as one additive mask.
- "loop": the blocked loop in plain torch, any device, dtype and mask: BLOCK_K keys at a time
  (or the caller's block_k), scores and statistics in the compute dtype (float32 for bf16/fp16).

The three agree on L (ATen writes L = 0 rather than +inf for a row with no visible key; either
way its P = e^{-inf - L} = 0), so any implementation's forward feeds any backward.

Public here, for ``attention.py`` and the models (internals: the arguments are trusted):
``attention_forward`` / ``attention_backward`` (the explicit-cache pair), ``attention`` (the
same under autograd) and ``attention_probabilities`` (P̃, for MHA's head weights); for the
public entry points, ``check_attention_args`` / ``check_attention_masks``; and
``flash_attention``, the validating torch-only wrapper of the ``seqtwin::flash_attention`` op.

Triton details. Forward: one program per (query block, batch · head). Backward: dk and dv from
one program per key block, looping over query blocks; dq from one program per query block,
looping over key blocks (S recomputed once more instead of atomics, so the result is
deterministic); D from a preprocess kernel. Scores, softmax statistics and accumulators are
float32 for bf16/fp16/float32 inputs (float64 for float64); bf16/fp16 P and dS are cast to the
input dtype for their matrix products, as FlashAttention does. float32 products use IEEE
float32, not TF32 (DESIGN.md's 1e-5 budget). Blocks: BLOCK_Q queries by BLOCK_K keys by the
head dim rounded up to a power of two >= 16 (masked, so any head dim up to MAX_HEAD_DIM works)
in the interpreter; on a GPU the block sizes, warps and pipeline stages per kernel come from
GPU_CONFIGS. Compiled kernels loop to run-time bounds (key blocks wholly in a query block's
causal future, and query blocks wholly before a key block, are never visited), a loop the
compiler can software-pipeline. In triton's interpreter, run-time loop bounds break with
numpy >= 2.4, so there the loops run to compile-time block counts rounded up to a power of
two, skipping blocks past the end by an ``if``. float64 runs the Triton kernels only in the
interpreter: triton cannot compile a float64 tl.dot for NVIDIA GPUs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..checks import (
    check_float_tensor,
    check_positive_int,
    check_probability,
    check_shape,
    shape_str,
)
from . import _INTERPRETED, compute_dtype, get_kernel_path, jit, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BLOCK_Q = 64        # queries per program (Triton, interpreted; a GPU takes GPU_CONFIGS)
BLOCK_K = 128       # keys per block: the torch loop's (Tq, 128) score tiles, and the
                    # interpreted Triton kernels' key block (a GPU takes GPU_CONFIGS)
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


class AttentionMasks(NamedTuple):
    """The masking and dropout of one attention call (validated by ``check_attention_masks``
    at a public entry point, or built by a model from masks it made itself)."""
    attn_mask: Tensor | None = None         # bool (True = masked) or float additive; 2-d or 4-d
    key_padding_mask: Tensor | None = None  # bool (B, Tk), True = padding
    causal: bool = False
    keep_mask: Tensor | None = None         # dropout keep-mask M (B, h, Tq, Tk); None: no dropout
    keep_scale: float = 1.0                 # 1 / (1 - p)


class AttentionCache(NamedTuple):
    q: Tensor              # (B, h, Tq, d)
    k: Tensor              # (B, h, Tk, d)
    v: Tensor              # (B, h, Tk, dv)
    out: Tensor            # (B, h, Tq, dv)
    lse: Tensor            # L (B, h, Tq), compute dtype; where a row sees no key, +inf (Triton,
                           # the loop) or 0 (ATen): P = exp(-inf - L) = 0 either way
    masks: AttentionMasks
    scale: float           # s
    block_k: int           # keys per block of the torch loop


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


# --------------------------------------------------------------------------- ATen's CPU kernels

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


def _aten_forward(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float
                  ) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, _aten_is_causal(q, k, masks), attn_mask=_aten_mask(q, k, masks),
        scale=scale)[:2]
    return out, lse


def _aten_backward(dout: Tensor, cache: AttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse, masks, scale, _ = cache
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out, lse, 0.0, _aten_is_causal(q, k, masks),
        attn_mask=_aten_mask(q, k, masks), scale=scale)


# --------------------------------------------------------------------------- the torch loop

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


def _loop_forward(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float,
                  block_k: int) -> tuple[Tensor, Tensor]:
    compute = compute_dtype(q.dtype)
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
    return out.to(q.dtype), lse


def _loop_backward(dout: Tensor, cache: AttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse, masks, scale, block_k = cache
    compute = compute_dtype(q.dtype)
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


# --------------------------------------------------------------------------- which one runs

def _triton_fits(q: Tensor, v: Tensor, masks: AttentionMasks) -> bool:
    """No attn_mask or dropout (the kernels hold neither), the kernel path's Triton (raises
    under "triton" where it cannot run), float64 only in the interpreter (triton 3.6 cannot
    compile a float64 tl.dot for NVIDIA GPUs: its pass pipeline fails on sm_90), and head
    dims up to MAX_HEAD_DIM (past it, the path "triton" raises naming them)."""
    return (masks.attn_mask is None and masks.keep_mask is None and use_triton(q)
            and (q.dtype != torch.float64 or _INTERPRETED)
            and (max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM or get_kernel_path() == "triton"))


def _aten_fits(q: Tensor, v: Tensor, masks: AttentionMasks) -> bool:
    """CPU float32/float64, dv = d and no dropout (ATen draws its own dropout)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and q.shape[-1] == v.shape[-1] and masks.keep_mask is None)


def _implementation(q: Tensor, v: Tensor, masks: AttentionMasks) -> str:
    """The one decision of what computes this attention: "triton", "aten" or "loop" (see the
    module docstring). Empty queries or keys take the loop, which gives what torch.nn gives
    (an empty output, or zeros where no key exists) where ATen's fused CPU kernel would divide
    by zero."""
    if q.shape[-2] == 0 or v.shape[-2] == 0:
        return "loop"
    if _triton_fits(q, v, masks):
        return "triton"
    if _aten_fits(q, v, masks):
        return "aten"
    return "loop"


# --------------------------------------------------------------------------- forward, backward

def attention_forward(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float,
                      block_k: int = BLOCK_K) -> tuple[Tensor, AttentionCache]:
    """out (B, h, Tq, dv) for q (B, h, Tq, d), k (B, h, Tk, d), v (B, h, Tk, dv), and the
    cache of q, k, v, out and L. Trusts its arguments (validated at the public entry points)."""
    implementation = _implementation(q, v, masks)
    if implementation == "triton":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _flash_attention_forward_triton(q, k, v, masks.key_padding_mask,
                                                   masks.causal, scale)
    elif implementation == "aten":
        out, lse = _aten_forward(q, k, v, masks, scale)
    else:
        out, lse = _loop_forward(q, k, v, masks, scale, block_k)
    return out, AttentionCache(q, k, v, out, lse, masks, scale, block_k)


def attention_backward(dout: Tensor, cache: AttentionCache) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for dout (B, h, Tq, dv), recomputing P block by block from L."""
    q, k, v, out, lse, masks, scale, _ = cache
    implementation = _implementation(q, v, masks)
    if implementation == "triton":
        return _flash_attention_backward_triton(
            dout.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
            out.contiguous(), lse, masks.key_padding_mask, masks.causal, scale)
    if implementation == "aten":
        return _aten_backward(dout, cache)
    return _loop_backward(dout, cache)


def attention_probabilities(cache: AttentionCache) -> Tensor:
    """P̃ (B, h, Tq, Tk) in the compute dtype, recomputed from q, k and L: the one (Tq, Tk)
    tensor, for callers that ask for the attention weights."""
    q, k, lse, masks = cache.q, cache.k, cache.lse, cache.masks
    compute = compute_dtype(q.dtype)
    tk = k.shape[-2]
    p = torch.exp(_block_scores(q.to(compute), k.to(compute), 0, tk, masks, cache.scale)
                  - lse[..., None])
    return _dropped(p, masks, 0, tk)


# --------------------------------------------------------------------------- custom ops

def _op_masks(key_padding_mask: Tensor | None, causal: bool) -> AttentionMasks:
    return AttentionMasks(key_padding_mask=key_padding_mask, causal=causal)


@torch.library.custom_op("seqtwin::flash_attention", mutates_args=())
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, h, Tq, dv), L (B, h, Tq) in the compute dtype, +inf where a row sees no key)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, cache = attention_forward(q, k, v, _op_masks(key_padding_mask, causal), scale, BLOCK_K)
    return out, cache.lse


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
    cache = AttentionCache(q, k, v, out, lse, _op_masks(key_padding_mask, causal), scale,
                           BLOCK_K)
    return attention_backward(dout, cache)


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


class _AttentionFunction(torch.autograd.Function):
    """out = attention(q, k, v) through attention_forward / attention_backward, for what the
    op cannot hold (attn_mask, dropout) and eager code off the Triton path.

    apply(q, k, v, attn_mask, key_padding_mask, causal, keep_mask, keep_scale, scale,
    block_k); masks get no gradient (a float attn_mask is treated as a constant). Saves q, k,
    v, out, L and the caller's masks: no (Tq, Tk) tensor of its own.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, key_padding_mask, causal, keep_mask, keep_scale,
                scale, block_k):
        masks = AttentionMasks(attn_mask, key_padding_mask, causal, keep_mask, keep_scale)
        out, cache = attention_forward(q, k, v, masks, scale, block_k)
        ctx.save_for_backward(q, k, v, out, cache.lse, attn_mask, key_padding_mask, keep_mask)
        ctx.causal, ctx.keep_scale, ctx.scale, ctx.block_k = causal, keep_scale, scale, block_k
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, attn_mask, key_padding_mask, keep_mask = ctx.saved_tensors
        masks = AttentionMasks(attn_mask, key_padding_mask, ctx.causal, keep_mask,
                               ctx.keep_scale)
        dq, dk, dv = attention_backward(dout, AttentionCache(q, k, v, out, lse, masks,
                                                             ctx.scale, ctx.block_k))
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None, None, None, None)


def attention(q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float,
              block_k: int = BLOCK_K) -> Tensor:
    """out (B, h, Tq, dv), differentiable in q, k, v: attention_forward under autograd.
    Trusts its arguments. Without autograd (a decoder step) the forward runs bare; compiled,
    or eager with gradients on the Triton path, it runs the ``seqtwin::flash_attention`` op
    (what a graph holds); otherwise ``_AttentionFunction``."""
    if not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad))):
        return attention_forward(q, k, v, masks, scale, block_k)[0]
    if _implementation(q, v, masks) == "triton":
        return flash_attention_op(q, k, v, masks.key_padding_mask, masks.causal, scale)[0]
    return _AttentionFunction.apply(q, k, v, masks.attn_mask, masks.key_padding_mask,
                                    masks.causal, masks.keep_mask, masks.keep_scale, scale,
                                    block_k)


# --------------------------------------------------------------------------- validation

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
        if attn_mask.dtype != torch.bool and not torch.compiler.is_compiling() and bool(
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


def check_attention_args(q: object, k: object, v: object, attn_mask: object,
                         key_padding_mask: object, causal: object, dropout: object,
                         dropout_mask: object, scale: object, block_k: object
                         ) -> tuple[AttentionMasks, float, int]:
    """Validate a scaled dot-product attention's public arguments: (masks, s, block_k)."""
    check_float_tensor("q", q, shape=("B", "h", "Tq", "d"))
    batch, heads, tq, head_dim = q.shape
    check_float_tensor("k", k, shape=(batch, heads, "Tk", head_dim), dtype=q.dtype)
    tk = k.shape[2]
    check_float_tensor("v", v, shape=(batch, heads, tk, "dv"), dtype=q.dtype)
    masks = check_attention_masks(batch, heads, tq, tk, q.dtype, attn_mask, key_padding_mask,
                                  causal, dropout, dropout_mask)
    return masks, _check_scale(scale, head_dim), check_positive_int("block_k", block_k)


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
    _, scale, _ = check_attention_args(q, k, v, None, key_padding_mask, causal, 0.0, None, scale,
                                       BLOCK_K)
    out, _ = flash_attention_op(q, k, v, key_padding_mask, causal, scale)
    return out
