"""Fused GRU step (the pointwise part): ``seqtwin::gru_step`` and its backward op.

Given the two projections of one step, xw = W_ih x_t + b_ih and hh = W_hh h_{t-1} + b_hh
(both (B, 3H), gate order r, z, n as in ``gru.py`` / torch.nn.GRU):

    r = σ(xw_r + hh_r)
    z = σ(xw_z + hh_z)
    n = tanh(xw_n + r ⊙ hh_n)          (r multiplies the recurrent part hh_n = W_hn h + b_hn)
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

masked by length as in ``recurrent.py``: a row whose step is not active (t >= lengths[b])
keeps its state, h_t = h_{t-1}.

Backward, from dh_t, for an active row (an inactive one passes dh to h_{t-1} and has zero
gate gradients):

    dn = dh ⊙ (1 - z)   dz = dh ⊙ (h_{t-1} - n)        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    dn_pre = dn ⊙ (1 - n²)                             n = tanh(xw_n + r ⊙ hh_n)
    dr_pre = dn_pre ⊙ hh_n ⊙ r(1 - r)   dz_pre = dz ⊙ z(1 - z)
    dxw = [dr_pre, dz_pre, dn_pre]     dhh = [dr_pre, dz_pre, dn_pre ⊙ r]
    dh_{t-1} = dh ⊙ z                  (plus dhh W_hh, the caller's matrix product)

Because r multiplies hh_n, dxw and dhh differ in their n-part: the op takes xw and hh apart
and its backward returns both.

Saved for the backward: [r z n hh_n] (B, 4H), the op's only extra output (hh_n copied so that
the (B, 3H) hh need not stay alive); h_{t-1} is the step's input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_float_tensor, shape_str
from . import compute_dtype, jit, tanh, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None



# --------------------------------------------------------------------------- Triton kernels

@jit
def _gru_step_forward_kernel(xw_ptr, hh_ptr, h_prev_ptr, active_ptr, h_ptr, saved_ptr, H,
                             HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    gate = row * 3 * H + cols                    # offsets of gate r; z, n follow by H
    hh_n = tl.load(hh_ptr + gate + 2 * H, mask=in_h).to(ACC)
    r = tl.sigmoid(tl.load(xw_ptr + gate, mask=in_h).to(ACC)
                   + tl.load(hh_ptr + gate, mask=in_h).to(ACC))
    z = tl.sigmoid(tl.load(xw_ptr + gate + H, mask=in_h).to(ACC)
                   + tl.load(hh_ptr + gate + H, mask=in_h).to(ACC))
    n = tanh(tl.load(xw_ptr + gate + 2 * H, mask=in_h).to(ACC) + r * hh_n)
    state = row * H + cols
    h_prev = tl.load(h_prev_ptr + state, mask=in_h).to(ACC)
    h = (1.0 - z) * n + z * h_prev
    if HAS_MASK:                                 # inactive rows carry their state
        h = tl.where(tl.load(active_ptr + row) != 0, h, h_prev)
    tl.store(h_ptr + state, h.to(h_ptr.dtype.element_ty), mask=in_h)
    out = saved_ptr.dtype.element_ty
    saved = row * 4 * H + cols
    tl.store(saved_ptr + saved, r.to(out), mask=in_h)
    tl.store(saved_ptr + saved + H, z.to(out), mask=in_h)
    tl.store(saved_ptr + saved + 2 * H, n.to(out), mask=in_h)
    tl.store(saved_ptr + saved + 3 * H, hh_n.to(out), mask=in_h)


@jit
def _gru_step_backward_kernel(dh_ptr, saved_ptr, h_prev_ptr, active_ptr, dxw_ptr, dhh_ptr,
                              dh_prev_ptr, H, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    saved = row * 4 * H + cols
    r = tl.load(saved_ptr + saved, mask=in_h).to(ACC)
    z = tl.load(saved_ptr + saved + H, mask=in_h).to(ACC)
    n = tl.load(saved_ptr + saved + 2 * H, mask=in_h).to(ACC)
    hh_n = tl.load(saved_ptr + saved + 3 * H, mask=in_h).to(ACC)
    state = row * H + cols
    dh = tl.load(dh_ptr + state, mask=in_h).to(ACC)
    dn = dh * (1.0 - z)                          # h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    dz = dh * (tl.load(h_prev_ptr + state, mask=in_h).to(ACC) - n)
    dn_pre = dn * (1.0 - n * n)                  # n = tanh(xw_n + r ⊙ hh_n)
    dr_pre = dn_pre * hh_n * r * (1.0 - r)
    dz_pre = dz * z * (1.0 - z)
    dhh_n = dn_pre * r
    dh_prev = dh * z
    if HAS_MASK:                                 # inactive rows: no gate gradient, dh carried
        active = tl.load(active_ptr + row) != 0
        dr_pre = tl.where(active, dr_pre, 0.0)
        dz_pre = tl.where(active, dz_pre, 0.0)
        dn_pre = tl.where(active, dn_pre, 0.0)
        dhh_n = tl.where(active, dhh_n, 0.0)
        dh_prev = tl.where(active, dh_prev, dh)
    out = dxw_ptr.dtype.element_ty
    gate = row * 3 * H + cols
    tl.store(dxw_ptr + gate, dr_pre.to(out), mask=in_h)
    tl.store(dxw_ptr + gate + H, dz_pre.to(out), mask=in_h)
    tl.store(dxw_ptr + gate + 2 * H, dn_pre.to(out), mask=in_h)
    tl.store(dhh_ptr + gate, dr_pre.to(out), mask=in_h)
    tl.store(dhh_ptr + gate + H, dz_pre.to(out), mask=in_h)
    tl.store(dhh_ptr + gate + 2 * H, dhh_n.to(out), mask=in_h)
    tl.store(dh_prev_ptr + state, dh_prev.to(dh_prev_ptr.dtype.element_ty), mask=in_h)


# --------------------------------------------------------------------------- launch wrappers

def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(B: int, H: int) -> tuple[tuple[int, int], int]:
    block = min(triton.next_power_of_2(H), 1024)
    return (B, triton.cdiv(H, block)), block


def gru_step_forward_triton(xw: Tensor, hh: Tensor, h_prev: Tensor, active: Tensor | None,
                            h_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(h_t, saved) by the Triton kernel, h_t written into ``h_out`` (contiguous) when given.
    A layer's eager loop calls this directly, without the op's dispatch (see
    ``kernels.use_op``)."""
    xw, hh, h_prev = xw.contiguous(), hh.contiguous(), h_prev.contiguous()
    B, H = h_prev.shape
    h = torch.empty_like(h_prev) if h_out is None else h_out
    saved = xw.new_empty(B, 4 * H)
    grid, block = _grid(B, H)
    _gru_step_forward_kernel[grid](
        xw, hh, h_prev, active, h, saved, H, HAS_MASK=active is not None,
        ACC=_triton_dtype(compute_dtype(xw.dtype)), BLOCK_H=block)
    return h, saved


def gru_step_backward_triton(dh: Tensor, saved: Tensor, h_prev: Tensor, active: Tensor | None,
                             dxw_out: Tensor | None = None, dhh_out: Tensor | None = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dxw, dhh, dh_{t-1} not counting the path through hh) by the Triton kernel, dxw and dhh
    written into ``dxw_out``, ``dhh_out`` (contiguous) when given."""
    dh, saved, h_prev = dh.contiguous(), saved.contiguous(), h_prev.contiguous()
    B, H = h_prev.shape
    dxw = saved.new_empty(B, 3 * H) if dxw_out is None else dxw_out
    dhh = saved.new_empty(B, 3 * H) if dhh_out is None else dhh_out
    dh_prev = torch.empty_like(dh)
    grid, block = _grid(B, H)
    _gru_step_backward_kernel[grid](
        dh, saved, h_prev, active, dxw, dhh, dh_prev, H, HAS_MASK=active is not None,
        ACC=_triton_dtype(compute_dtype(saved.dtype)), BLOCK_H=block)
    return dxw, dhh, dh_prev


def gru_step_forward_torch(xw: Tensor, hh: Tensor, h_prev: Tensor, active: Tensor | None,
                           h_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch path, in the inputs' dtype (the layer's eager loop calls it directly, without
    the op's dispatch, and has h_t written into ``h_out``, its row of the layer's (T+1, B, H)
    buffer of states): each gate is written into its slice of saved, never concatenated."""
    B, H = h_prev.shape
    saved = xw.new_empty(B, 4 * H)                           # [r z n hh_n]
    r, z, n, hh_n = saved.chunk(4, dim=1)
    torch.add(xw[:, :2 * H], hh[:, :2 * H], out=saved[:, :2 * H]).sigmoid_()  # r, z
    hh_n.copy_(hh[:, 2 * H:])
    torch.addcmul(xw[:, 2 * H:], r, hh_n, out=n).tanh_()    # n = tanh(xw_n + r ⊙ hh_n)
    if active is None:                                       # h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
        return torch.lerp(n, h_prev, z, out=h_out), saved
    return torch.where(active.unsqueeze(1), torch.lerp(n, h_prev, z), h_prev, out=h_out), saved


def gru_step_backward_torch(dh: Tensor, saved: Tensor, h_prev: Tensor, active: Tensor | None,
                            dxw: Tensor | None = None, dhh: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The torch path: (dxw, dhh (B, 3H), dh_{t-1} not counting the path through hh), written
    into ``dxw``, ``dhh`` when given (a layer's loop passes row t of its (T, B, 3H) buffers)."""
    B, H = h_prev.shape
    r, z, n, hh_n = saved.chunk(4, dim=1)
    if dxw is None:
        dxw, dhh = saved.new_empty(B, 3 * H), saved.new_empty(B, 3 * H)
    dr_pre, dz_pre, dn_pre = dxw.chunk(3, dim=1)
    torch.mul(dh * (1.0 - z), 1.0 - n * n, out=dn_pre)      # h_t = (1 - z) ⊙ n + z ⊙ h_{t-1},
    torch.mul(dn_pre, hh_n, out=dr_pre)                     # n = tanh(xw_n + r ⊙ hh_n)
    torch.mul(dh, h_prev - n, out=dz_pre)
    rz = saved[:, :2 * H]                                   # σ' = s(1 - s) of r and z at once
    dxw[:, :2 * H].mul_(rz * (1.0 - rz))
    dhh[:, :2 * H].copy_(dxw[:, :2 * H])
    torch.mul(dn_pre, r, out=dhh[:, 2 * H:])
    dh_prev = dh * z
    if active is not None:
        m = active.unsqueeze(1)
        dxw, dhh = dxw.masked_fill_(~m, 0.0), dhh.masked_fill_(~m, 0.0)
        dh_prev = torch.where(m, dh_prev, dh)
    return dxw, dhh, dh_prev


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("seqtwin::gru_step", mutates_args=())
def gru_step_op(xw: Tensor, hh: Tensor, h_prev: Tensor, active: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """(h_t (B, H), saved [r z n hh_n] (B, 4H)) from xw, hh (B, 3H), h_{t-1} (B, H) and
    active (B,) bool or None (every row active)."""
    if use_triton(xw):
        return gru_step_forward_triton(xw, hh, h_prev, active)
    acc = compute_dtype(xw.dtype)
    h, saved = gru_step_forward_torch(xw.to(acc), hh.to(acc), h_prev.to(acc), active)
    return h.to(h_prev.dtype), saved.to(xw.dtype)


@gru_step_op.register_fake
def _(xw, hh, h_prev, active):
    return torch.empty_like(h_prev), xw.new_empty(h_prev.shape[0], 4 * h_prev.shape[1])


@torch.library.custom_op("seqtwin::gru_step_backward", mutates_args=())
def gru_step_backward_op(dh: Tensor, saved: Tensor, h_prev: Tensor, active: Tensor | None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(dxw (B, 3H), dhh (B, 3H), dh_{t-1} (B, H) not counting the path through hh)."""
    if use_triton(saved):
        return gru_step_backward_triton(dh, saved, h_prev, active)
    acc = compute_dtype(saved.dtype)
    dxw, dhh, dh_prev = gru_step_backward_torch(dh.to(acc), saved.to(acc), h_prev.to(acc),
                                                active)
    return dxw.to(saved.dtype), dhh.to(saved.dtype), dh_prev.to(dh.dtype)


@gru_step_backward_op.register_fake
def _(dh, saved, h_prev, active):
    B, H = h_prev.shape
    return saved.new_empty(B, 3 * H), saved.new_empty(B, 3 * H), torch.empty_like(dh)


# --------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    _, _, h_prev, active = inputs
    _, saved = output
    ctx.save_for_backward(saved, h_prev, active)


def _backward(ctx, dh, dsaved):
    saved, h_prev, active = ctx.saved_tensors
    dxw, dhh, dh_prev = torch.ops.seqtwin.gru_step_backward(dh, saved, h_prev, active)
    return dxw, dhh, dh_prev, None


gru_step_op.register_autograd(_backward, setup_context=_setup_context)


def gru_step(xw: Tensor, hh: Tensor, h_prev: Tensor, active: Tensor | None = None) -> Tensor:
    """h_t (B, H) of one GRU step from xw = W_ih x_t + b_ih and hh = W_hh h_{t-1} + b_hh
    (B, 3H), h_{t-1} (B, H) and active (B,) bool (t < lengths; None: every row).

    Differentiable in xw, hh and h_prev through the fused backward op.
    """
    check_float_tensor("h_prev", h_prev, finite=False)
    if h_prev.dim() != 2:
        raise ValueError(f"h_prev: expected shape (B, H), got {shape_str(tuple(h_prev.shape))}")
    B, H = h_prev.shape
    check_float_tensor("xw", xw, shape=(B, 3 * H), dtype=h_prev.dtype, finite=False)
    check_float_tensor("hh", hh, shape=(B, 3 * H), dtype=h_prev.dtype, finite=False)
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (B,)):
        raise ValueError(f"active: expected a bool tensor of shape ({B},), got "
                         f"{active.dtype} {shape_str(tuple(active.shape))}")
    h, _ = gru_step_op(xw, hh, h_prev, active)
    return h
