"""Fused softmax cross-entropy, chunked over the vocabulary: ``seqtwin::cross_entropy`` and
its backward op, the math behind ``loss.py`` (torch's ``F.cross_entropy``, classes last).

For logits x (C,) of one row and its target t, with m = max_c x_c and z = Σ_c e^{x_c - m}:

    log p_c  = (x_c - m) - log z
    nll      = log z - (x_t - m)
    smooth   = log z - (1/C) Σ_c (x_c - m)
    loss     = (1 - ε) nll + ε smooth            (0 where t = ignore_index)

    dloss/dx_c = p_c - (1 - ε) [c = t] - ε / C  (0 at ignored rows)

Three implementations, chosen per call (``kernels/__init__.py``): Triton kernels (CUDA), the
C++ kernels of ``kernels/cpu/cross_entropy.cpp`` (float32/float64 on the CPU), and plain torch.

One row is read in vocabulary chunks with an online max and sum: after each chunk
m' = max(m, max_chunk x), z' = z e^{m - m'} + Σ_chunk e^{x - m'}; so no (N, C) intermediate
exists in the forward, which writes three numbers per row: the loss, m and log z (kept apart:
m + log z would lose the low bits of log z at large |m|).

Recompute, not save: the gradient is recomputed in the backward from x, m and log z
(one read of x, one write of dx; the torch path lets ATen's softmax recompute m and z, which
is faster on the CPU than three elementwise passes) instead of being computed in the forward
and saved
(Liger-style). Saving it would hold a second (N, C) tensor from forward to backward, since a
custom op may not overwrite its input logits in place the way Liger does; recomputing keeps
the saved state at 2N numbers, and a forward without backward (evaluation) never pays for the
gradient.

The op returns per-row losses; the reduction ("mean" over non-ignored rows, 0 when every
target is ignored, "sum", "none"; ``reduce_losses``) is plain torch around it, so the op's
backward receives the per-row upstream gradient for every reduction alike
(``reduce_losses_backward``).

Eager code on the native kernels skips the op's dispatch, whose Python machinery costs more
than the kernels at small N: ``cross_entropy`` goes through ``_EagerCrossEntropy``, an
``autograd.Function`` over the op's bodies and the reduction, and the explicit-cache pair
calls the bodies (``cross_entropy_rows``). Under torch.compile the op is what the graph holds.

Also here: the validation of the public arguments (``check_cross_entropy_args``, which also
counts the targets that are not ignored), shared by ``cross_entropy`` below and ``loss.py``'s
explicit-cache pair.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..checks import check_float_tensor, check_probability, shape_str
from . import compute_dtype, jit, native_kernels, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

VOCAB_CHUNK = 4096  # classes one program holds at a time (a power of two)
# classes per chunk of the C++ kernel: 8 KiB of float32 stays in L1 between the chunk's two
# passes (max, then exp); measured fastest of 256..8192 at C = 8192 (float64: flat from 1024)
NATIVE_VOCAB_CHUNK = 2048
REDUCTIONS = ("mean", "sum", "none")



# --------------------------------------------------------------------------- Triton kernels

@jit
def _cross_entropy_forward_kernel(logits_ptr, targets_ptr, smoothing_ptr, loss_ptr, m_ptr,
                                  log_z_ptr, C, ignore_index, ACC: tl.constexpr,
                                  BLOCK_C: tl.constexpr, N_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * C
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # first chunk: start m, z and Σ x
    cols = tl.arange(0, BLOCK_C)
    x = tl.load(row_ptr + cols, mask=cols < C, other=float("-inf")).to(ACC)
    m = tl.max(x, axis=0)
    z = tl.sum(tl.exp(x - m), axis=0)
    sum_x = tl.sum(tl.where(cols < C, x, 0.0), axis=0)
    for k in range(1, N_CHUNKS):                 # online max and rescaled sum over the rest
        cols = k * BLOCK_C + tl.arange(0, BLOCK_C)
        x = tl.load(row_ptr + cols, mask=cols < C, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sum_x += tl.sum(tl.where(cols < C, x, 0.0), axis=0)
        m = m_new
    log_z = tl.log(z)
    x_t = tl.load(row_ptr + tl.where(valid, target, 0)).to(ACC)
    eps = tl.load(smoothing_ptr)
    nll = log_z - (x_t - m)
    smooth = log_z - (sum_x / C - m)
    loss = tl.where(valid, (1.0 - eps) * nll + eps * smooth, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(m_ptr + row, m)
    tl.store(log_z_ptr + row, log_z)


@jit
def _cross_entropy_backward_kernel(dloss_ptr, logits_ptr, targets_ptr, m_ptr, log_z_ptr,
                                   smoothing_ptr, dlogits_ptr, C, ignore_index,
                                   ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                                   N_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target != ignore_index, tl.load(dloss_ptr + row).to(ACC), 0.0)
    m = tl.load(m_ptr + row)
    log_z = tl.load(log_z_ptr + row)
    eps = tl.load(smoothing_ptr)
    for k in range(0, N_CHUNKS):
        cols = k * BLOCK_C + tl.arange(0, BLOCK_C)
        x = tl.load(logits_ptr + row * C + cols, mask=cols < C, other=0.0).to(ACC)
        p = tl.exp(x - m - log_z)
        onehot = tl.where(cols == target, 1.0, 0.0).to(ACC)
        # p_c - (1 - ε)[c = t] - ε/C, grouped so that it is exactly 0 when C = 1
        dx = scale * ((p - onehot) + eps * ((onehot * C - 1.0) / C))
        tl.store(dlogits_ptr + row * C + cols, dx.to(dlogits_ptr.dtype.element_ty),
                 mask=cols < C)


# --------------------------------------------------------------------------- launch wrappers

def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _chunking(C: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(C), VOCAB_CHUNK)
    return block, triton.cdiv(C, block)


def _cross_entropy_forward_triton(logits: Tensor, targets: Tensor, ignore_index: int,
                                  label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    N, C = logits.shape
    acc = compute_dtype(logits.dtype)
    loss, m, log_z = (torch.empty(N, dtype=acc, device=logits.device) for _ in range(3))
    # ε travels as a tensor: a Python float argument would reach the kernel as float32
    smoothing = torch.full((1,), label_smoothing, dtype=acc, device=logits.device)
    block, chunks = _chunking(C)
    _cross_entropy_forward_kernel[(N,)](
        logits, targets, smoothing, loss, m, log_z, C, ignore_index,
        ACC=_triton_dtype(acc), BLOCK_C=block, N_CHUNKS=chunks)
    return loss, m, log_z


def _cross_entropy_backward_triton(dloss: Tensor, logits: Tensor, targets: Tensor, m: Tensor,
                                   log_z: Tensor, ignore_index: int, label_smoothing: float
                                   ) -> Tensor:
    N, C = logits.shape
    dlogits = torch.empty_like(logits)
    smoothing = torch.full((1,), label_smoothing, dtype=m.dtype, device=logits.device)
    block, chunks = _chunking(C)
    _cross_entropy_backward_kernel[(N,)](
        dloss.contiguous(), logits, targets, m, log_z, smoothing, dlogits, C, ignore_index,
        ACC=_triton_dtype(m.dtype), BLOCK_C=block, N_CHUNKS=chunks)
    return dlogits


def _cross_entropy_forward_torch(logits: Tensor, targets: Tensor, ignore_index: int,
                                 label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    # Eager torch materialises (N, C) temporaries here, which it cannot avoid anyway.
    x = logits.to(compute_dtype(logits.dtype))
    valid = targets != ignore_index
    m = x.amax(dim=-1)
    shifted = x - m.unsqueeze(-1)
    log_z = torch.exp(shifted).sum(dim=-1).log()
    # nll from the shifted logits: log z - (x_t - m) keeps full relative precision where the
    # loss is tiny, which (log z + m) - x_t would round to the grid of m.
    safe_targets = torch.where(valid, targets, 0).long()
    loss = log_z - shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        smooth = log_z - shifted.mean(dim=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    return torch.where(valid, loss, 0.0), m, log_z


def _cross_entropy_backward_torch(dloss: Tensor, logits: Tensor, targets: Tensor, m: Tensor,
                                  log_z: Tensor, ignore_index: int, label_smoothing: float
                                  ) -> Tensor:
    valid = targets != ignore_index
    # p = softmax(x): ATen's fused kernel is one read of x and one write here, where
    # exp(x - m - log z) from the saved m and log z takes three passes and two temporaries
    dlogits = torch.softmax(logits.to(m.dtype), dim=-1)
    # p_c - (1 - ε)[c = t] - ε/C, grouped as (p_c - [c = t]) + ε([c = t] - 1/C) so that it is
    # exactly 0 when C = 1
    index = torch.where(valid, targets, 0).long().unsqueeze(-1)
    dlogits.scatter_add_(-1, index, dlogits.new_full(index.shape, -1.0))
    if label_smoothing > 0:
        dlogits -= label_smoothing / logits.shape[-1]
        dlogits.scatter_add_(-1, index, dlogits.new_full(index.shape, label_smoothing))
    dlogits *= torch.where(valid, dloss.to(m.dtype), 0.0).unsqueeze(-1)
    return dlogits.to(logits.dtype)


# --------------------------------------------------------------------------- custom ops

def _cross_entropy_forward(logits: Tensor, targets: Tensor, ignore_index: int,
                           label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """The current path's forward of contiguous rows logits (N, C), targets (N,): the op's
    body."""
    native = native_kernels("cross_entropy", logits)
    if native is not None:
        # the chunk is an argument so that a patched (smaller) VOCAB_CHUNK chunks it too
        return native.forward(logits, targets.long(), ignore_index, label_smoothing,
                              min(VOCAB_CHUNK, NATIVE_VOCAB_CHUNK))
    if use_triton(logits):
        return _cross_entropy_forward_triton(logits, targets, ignore_index, label_smoothing)
    return _cross_entropy_forward_torch(logits, targets, ignore_index, label_smoothing)


@torch.library.custom_op("seqtwin::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (N,), m (N,), log z (N,)) for logits (N, C) and targets (N,); loss 0 at ignored
    rows; all three in the compute dtype."""
    return _cross_entropy_forward(logits.contiguous(), targets.contiguous(), ignore_index,
                                  label_smoothing)


@cross_entropy_op.register_fake
def _(logits, targets, ignore_index, label_smoothing):
    acc = compute_dtype(logits.dtype)
    return tuple(logits.new_empty(logits.shape[:1], dtype=acc) for _ in range(3))


def _cross_entropy_backward(dloss: Tensor, logits: Tensor, targets: Tensor, m: Tensor,
                            log_z: Tensor, ignore_index: int, label_smoothing: float) -> Tensor:
    """The current path's backward of contiguous rows logits (N, C), targets (N,): the backward
    op's body."""
    native = native_kernels("cross_entropy", logits)
    if native is not None:
        # dloss may be strided (a reduction's expanded gradient): the kernel reads its stride
        return native.backward(dloss.to(m.dtype), logits, targets.long(), m, log_z,
                               ignore_index, label_smoothing)
    if use_triton(logits):
        return _cross_entropy_backward_triton(dloss, logits, targets, m, log_z, ignore_index,
                                              label_smoothing)
    return _cross_entropy_backward_torch(dloss, logits, targets, m, log_z, ignore_index,
                                         label_smoothing)


@torch.library.custom_op("seqtwin::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(dloss: Tensor, logits: Tensor, targets: Tensor, m: Tensor,
                              log_z: Tensor, ignore_index: int, label_smoothing: float
                              ) -> Tensor:
    """dlogits (N, C) for the per-row upstream gradient dloss (N,)."""
    return _cross_entropy_backward(dloss, logits.contiguous(), targets.contiguous(), m, log_z,
                                   ignore_index, label_smoothing)


@cross_entropy_backward_op.register_fake
def _(dloss, logits, targets, m, log_z, ignore_index, label_smoothing):
    return torch.empty_like(logits)


# --------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, label_smoothing = inputs
    _, m, log_z = output
    ctx.save_for_backward(logits, targets, m, log_z)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _backward(ctx, dloss, dm, dlog_z):
    logits, targets, m, log_z = ctx.saved_tensors
    dlogits = torch.ops.seqtwin.cross_entropy_backward(dloss, logits, targets, m, log_z,
                                                       ctx.ignore_index, ctx.label_smoothing)
    return dlogits, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCrossEntropy(torch.autograd.Function):
    """The op's autograd (the same bodies, the same saved x, t, m and log z) with the reduction
    inside, for eager code on the native kernels, where the custom ops' Python machinery and
    the reduction's autograd nodes would cost several times the kernels at small sizes.
    apply(logits (N, C) contiguous, targets (N,)
    contiguous, count (an int, check_targets'), reduction, ignore_index, label_smoothing) ->
    the reduced loss."""

    @staticmethod
    def forward(ctx, logits, targets, count, reduction, ignore_index, label_smoothing):
        loss, m, log_z = _cross_entropy_forward(logits, targets, ignore_index, label_smoothing)
        ctx.save_for_backward(logits, targets, m, log_z)
        ctx.count, ctx.reduction = count, reduction
        ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
        return reduce_losses(loss, count, reduction)

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: results that refuse a second backward
            return once_differentiable(_eager_backward)(ctx, dout)
        # a plain backward already runs without grad, where once_differentiable's no_grad
        # wrapper would only add ~10 µs, a tenth of forward and backward at 64 rows of 1000
        return _eager_backward(ctx, dout)


def _eager_backward(ctx, dout):
    logits, targets, m, log_z = ctx.saved_tensors
    dloss = reduce_losses_backward(dout, ctx.count, ctx.reduction, logits.shape[0])
    dlogits = _cross_entropy_backward(dloss, logits, targets, m, log_z, ctx.ignore_index,
                                      ctx.label_smoothing)
    return dlogits, None, None, None, None, None


def _eager_native(logits: Tensor) -> bool:
    """Whether a call on logits runs the op's bodies without the op: in eager code (a compiled
    graph holds the op) on the native kernels."""
    return (not torch.compiler.is_compiling()
            and native_kernels("cross_entropy", logits) is not None)


def cross_entropy_rows(logits: Tensor, targets: Tensor, ignore_index: int,
                       label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """``seqtwin::cross_entropy`` of logits (N, C), targets (N,) for callers that need no
    autograd through it (the explicit-cache pair): in eager code on the native kernels, the
    op's body without its dispatch, which costs more than the kernel at small N."""
    if _eager_native(logits):
        return _cross_entropy_forward(logits.contiguous(), targets.contiguous(), ignore_index,
                                      label_smoothing)
    return cross_entropy_op(logits, targets, ignore_index, label_smoothing)


def cross_entropy_rows_backward(dloss: Tensor, logits: Tensor, targets: Tensor, m: Tensor,
                                log_z: Tensor, ignore_index: int, label_smoothing: float
                                ) -> Tensor:
    """``seqtwin::cross_entropy_backward``: in eager code on the native kernels, its body
    without the op's dispatch (as ``cross_entropy_rows``)."""
    if _eager_native(logits):
        return _cross_entropy_backward(dloss, logits.contiguous(), targets.contiguous(), m,
                                       log_z, ignore_index, label_smoothing)
    return cross_entropy_backward_op(dloss, logits, targets, m, log_z, ignore_index,
                                     label_smoothing)


# --------------------------------------------------------------------------- public entry

def check_targets(targets: object, expected_shape: tuple[int, ...], num_classes: int,
                  ignore_index: int) -> int | Tensor:
    """Validate targets; returns how many are not ignore_index (the mean's count). On the CPU
    that is an int, read along with the range check (a read costs nothing there, an op µs);
    elsewhere a 0-d int64 tensor left on the device, as under torch.compile, where values
    cannot be read and out-of-range targets go unchecked."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets: expected a torch.Tensor of integers, "
                        f"got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != expected_shape:
        raise ValueError(f"targets: expected shape {shape_str(expected_shape)} "
                         f"(logits.shape[:-1]), got {shape_str(tuple(targets.shape))}")
    compiling = torch.compiler.is_compiling()
    if compiling or targets.device.type != "cpu":
        counted = targets != ignore_index
        if targets.numel() and not compiling:  # one read (a device sync)
            if bool((counted & ((targets < 0) | (targets >= num_classes))).any()):
                _raise_out_of_range(targets, counted, num_classes, ignore_index)
        return counted.sum()
    if not targets.numel():
        return 0
    # the common case in one op: every target a class, so none is ignored unless
    # ignore_index is a class too
    low, high = targets.aminmax()
    if int(low) >= 0 and int(high) < num_classes:
        if not 0 <= ignore_index < num_classes:
            return targets.numel()
        return int((targets != ignore_index).count_nonzero())
    counted = targets != ignore_index
    low, high = torch.where(counted, targets, 0).aminmax()
    if int(low) < 0 or int(high) >= num_classes:
        _raise_out_of_range(targets, counted, num_classes, ignore_index)
    return int(counted.count_nonzero())


def _raise_out_of_range(targets: Tensor, counted: Tensor, num_classes: int,
                        ignore_index: int) -> None:
    """Raise the ValueError naming the first counted target outside 0..C-1."""
    bad = counted & ((targets < 0) | (targets >= num_classes))
    idx = tuple(int(i) for i in torch.nonzero(bad)[0])
    raise ValueError(f"targets: values must be in 0..{num_classes - 1} "
                     f"(C = logits.shape[-1]) or equal ignore_index = {ignore_index}, "
                     f"got {int(targets[idx])} at index {idx}")


def check_cross_entropy_args(logits: object, targets: object, reduction: str,
                             ignore_index: int, label_smoothing: float, finite: bool
                             ) -> tuple[float, int | Tensor]:
    """Validate the public arguments of a cross-entropy; returns label_smoothing as a float
    and the count of targets that are not ignore_index (``check_targets``). ``finite`` also
    rejects NaN/inf logits (a read of the values, skipped when compiling)."""
    check_float_tensor("logits", logits, finite=finite)
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (N, C) or (B, T, C) with C >= 1, "
                         f"got {shape_str(tuple(logits.shape))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    eps = check_probability("label_smoothing", label_smoothing, allow_one=True)
    count = check_targets(targets, tuple(logits.shape[:-1]), logits.shape[-1], ignore_index)
    return eps, count


def reduce_losses(loss: Tensor, count: int | Tensor, reduction: str) -> Tensor:
    """The per-row losses reduced: "mean" (Σ / count, 0 when count = 0), "sum", "none"."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if isinstance(count, Tensor):  # on the device
            return loss.sum() / count.clamp_min(1)
        # a CPU count (check_targets): an int divisor needs no clamp, and with every target
        # counted mean() is one op, ATen's CPU mean being this same sum and division
        return loss.mean() if count == loss.numel() else loss.sum() / max(count, 1)
    return loss


def reduce_losses_backward(dout: Tensor, count: int | Tensor, reduction: str, rows: int
                           ) -> Tensor:
    """dloss (rows,), the gradient of each row's loss, from dout, that of the reduced loss:
    dout / count per row for "mean", dout per row for "sum" (both expanded, not copied), dout
    itself for "none"."""
    if reduction == "none":
        return dout.flatten()
    if reduction == "mean":
        dout = dout / (count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1))
    return dout.expand(rows)


def cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean",
                  ignore_index: int = -100, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of logits (N, C) or (B, T, C) against int targets (N,) or (B, T).

    Returns a 0-d tensor for "mean"/"sum", or per-target losses (shape of targets, 0 at
    ignored positions) for "none"; differentiable in logits through the fused backward op (in
    eager code on the native CPU kernels, through the same kernels without the op's dispatch).
    """
    eps, count = check_cross_entropy_args(logits, targets, reduction, ignore_index,
                                          label_smoothing, finite=False)
    # rows (N, C), (N,): flatten returns (N, C) logits and (N,) targets themselves, where a
    # reshape would cost as much as a small op
    rows, row_targets = logits.flatten(0, -2), targets.flatten()
    if not _eager_native(rows):
        loss, _, _ = cross_entropy_op(rows, row_targets, ignore_index, eps)
        return reduce_losses(loss.view_as(targets), count, reduction).to(logits.dtype)
    rows, row_targets = rows.contiguous(), row_targets.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = _EagerCrossEntropy.apply(rows, row_targets, count, reduction, ignore_index, eps)
    else:
        loss, _, _ = _cross_entropy_forward(rows, row_targets, ignore_index, eps)
        loss = reduce_losses(loss, count, reduction)
    # the native dtypes are their own compute dtype: nothing to cast back
    return loss.view_as(targets) if reduction == "none" else loss
