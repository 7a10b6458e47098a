"""Fused LSTM step (the pointwise part): ``seqtwin::lstm_step`` and its backward op.

Given the two projections of one step, xw = W_ih x_t + b_ih and hh = W_hh h_{t-1} + b_hh
(both (B, 4H), gate order i, f, g, o as in ``lstm.py`` / torch.nn.LSTM), a = xw + hh and

    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

masked by length as in ``recurrent.py``: a row whose step is not active (t >= lengths[b])
keeps its state, s_t = m_t ⊙ step(...) + (1 - m_t) ⊙ s_{t-1}.

Backward, from (dh_t, dc_t), for an active row (an inactive one passes dh, dc straight to
h_{t-1}, c_{t-1} and has dgates = 0):

    do = dh ⊙ tanh(c_t)                          h_t = o ⊙ tanh(c_t)
    dc = dc_t + dh ⊙ o ⊙ (1 - tanh²(c_t))
    di = dc ⊙ g   df = dc ⊙ c_{t-1}   dg = dc ⊙ i    c_t = f ⊙ c_{t-1} + i ⊙ g
    da = [di i(1-i), df f(1-f), dg (1-g²), do o(1-o)]   (dxw = dhh = da)
    dc_{t-1} = dc ⊙ f

h_{t-1} reaches the step only through hh (its gradient da W_hh is the caller's matrix
product) and, for inactive rows, through the carried state.

Saved for the backward: the activated gates [i f g o] (B, 4H), the op's only extra output;
c_{t-1} and c_t are the step's input and output, alive anyway, and tanh(c_t) is recomputed.
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
def _lstm_step_forward_kernel(xw_ptr, hh_ptr, h_prev_ptr, c_prev_ptr, active_ptr, h_ptr, c_ptr,
                              gates_ptr, H, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    gate = row * 4 * H + cols                    # offsets of gate i; f, g, o follow by H
    a_i = tl.load(xw_ptr + gate, mask=in_h).to(ACC) + tl.load(hh_ptr + gate, mask=in_h).to(ACC)
    a_f = (tl.load(xw_ptr + gate + H, mask=in_h).to(ACC)
           + tl.load(hh_ptr + gate + H, mask=in_h).to(ACC))
    a_g = (tl.load(xw_ptr + gate + 2 * H, mask=in_h).to(ACC)
           + tl.load(hh_ptr + gate + 2 * H, mask=in_h).to(ACC))
    a_o = (tl.load(xw_ptr + gate + 3 * H, mask=in_h).to(ACC)
           + tl.load(hh_ptr + gate + 3 * H, mask=in_h).to(ACC))
    i = tl.sigmoid(a_i)
    f = tl.sigmoid(a_f)
    g = tanh(a_g)
    o = tl.sigmoid(a_o)
    state = row * H + cols
    c_prev = tl.load(c_prev_ptr + state, mask=in_h).to(ACC)
    c = f * c_prev + i * g
    h = o * tanh(c)
    if HAS_MASK:                                 # inactive rows carry their state
        active = tl.load(active_ptr + row) != 0
        h = tl.where(active, h, tl.load(h_prev_ptr + state, mask=in_h).to(ACC))
        c = tl.where(active, c, c_prev)
    tl.store(h_ptr + state, h.to(h_ptr.dtype.element_ty), mask=in_h)
    tl.store(c_ptr + state, c.to(c_ptr.dtype.element_ty), mask=in_h)
    out = gates_ptr.dtype.element_ty
    tl.store(gates_ptr + gate, i.to(out), mask=in_h)
    tl.store(gates_ptr + gate + H, f.to(out), mask=in_h)
    tl.store(gates_ptr + gate + 2 * H, g.to(out), mask=in_h)
    tl.store(gates_ptr + gate + 3 * H, o.to(out), mask=in_h)


@jit
def _lstm_step_backward_kernel(dh_ptr, dc_ptr, gates_ptr, c_prev_ptr, c_ptr, active_ptr,
                               dgates_ptr, dh_prev_ptr, dc_prev_ptr, H, HAS_MASK: tl.constexpr,
                               ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = cols < H
    gate = row * 4 * H + cols
    state = row * H + cols
    i = tl.load(gates_ptr + gate, mask=in_h).to(ACC)
    f = tl.load(gates_ptr + gate + H, mask=in_h).to(ACC)
    g = tl.load(gates_ptr + gate + 2 * H, mask=in_h).to(ACC)
    o = tl.load(gates_ptr + gate + 3 * H, mask=in_h).to(ACC)
    dh = tl.load(dh_ptr + state, mask=in_h).to(ACC)
    dc_next = tl.load(dc_ptr + state, mask=in_h).to(ACC)
    tanh_c = tanh(tl.load(c_ptr + state, mask=in_h).to(ACC))
    do = dh * tanh_c                                         # h_t = o ⊙ tanh(c_t)
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    di = dc * g                                              # c_t = f ⊙ c_{t-1} + i ⊙ g
    df = dc * tl.load(c_prev_ptr + state, mask=in_h).to(ACC)
    dg = dc * i
    da_i = di * i * (1.0 - i)                                # σ' and tanh' of the gates
    da_f = df * f * (1.0 - f)
    da_g = dg * (1.0 - g * g)
    da_o = do * o * (1.0 - o)
    dc_prev = dc * f
    dh_prev = tl.zeros((BLOCK_H,), dtype=ACC)
    if HAS_MASK:                                 # inactive rows: dgates 0, dstate carried
        active = tl.load(active_ptr + row) != 0
        da_i = tl.where(active, da_i, 0.0)
        da_f = tl.where(active, da_f, 0.0)
        da_g = tl.where(active, da_g, 0.0)
        da_o = tl.where(active, da_o, 0.0)
        dc_prev = tl.where(active, dc_prev, dc_next)
        dh_prev = tl.where(active, dh_prev, dh)
    out = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + gate, da_i.to(out), mask=in_h)
    tl.store(dgates_ptr + gate + H, da_f.to(out), mask=in_h)
    tl.store(dgates_ptr + gate + 2 * H, da_g.to(out), mask=in_h)
    tl.store(dgates_ptr + gate + 3 * H, da_o.to(out), mask=in_h)
    tl.store(dh_prev_ptr + state, dh_prev.to(dh_prev_ptr.dtype.element_ty), mask=in_h)
    tl.store(dc_prev_ptr + state, dc_prev.to(dc_prev_ptr.dtype.element_ty), mask=in_h)


# --------------------------------------------------------------------------- launch wrappers

def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(B: int, H: int) -> tuple[tuple[int, int], int]:
    block = min(triton.next_power_of_2(H), 1024)
    return (B, triton.cdiv(H, block)), block


def lstm_step_forward_triton(xw: Tensor, hh: Tensor, h_prev: Tensor, c_prev: Tensor,
                             active: Tensor | None, h_out: Tensor | None = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(h_t, c_t, gates) by the Triton kernel, h_t written into ``h_out`` (contiguous) when
    given. A layer's eager loop calls this directly, without the op's dispatch (see
    ``kernels.use_op``)."""
    xw, hh, h_prev, c_prev = (t.contiguous() for t in (xw, hh, h_prev, c_prev))
    B, H = h_prev.shape
    h = torch.empty_like(h_prev) if h_out is None else h_out
    c, gates = torch.empty_like(c_prev), torch.empty_like(xw)
    grid, block = _grid(B, H)
    _lstm_step_forward_kernel[grid](
        xw, hh, h_prev, c_prev, active, h, c, gates, H, HAS_MASK=active is not None,
        ACC=_triton_dtype(compute_dtype(xw.dtype)), BLOCK_H=block)
    return h, c, gates


def lstm_step_backward_triton(dh: Tensor, dc: Tensor, gates: Tensor, c_prev: Tensor, c: Tensor,
                              active: Tensor | None, dgates_out: Tensor | None = None
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(dgates, dh_{t-1} through the carried state, dc_{t-1}) by the Triton kernel, dgates
    written into ``dgates_out`` (contiguous) when given."""
    dh, dc, gates, c_prev, c = (t.contiguous() for t in (dh, dc, gates, c_prev, c))
    B, H = c.shape
    dgates = torch.empty_like(gates) if dgates_out is None else dgates_out
    dh_prev, dc_prev = torch.empty_like(c), torch.empty_like(c)
    grid, block = _grid(B, H)
    _lstm_step_backward_kernel[grid](
        dh, dc, gates, c_prev, c, active, dgates, dh_prev, dc_prev, H,
        HAS_MASK=active is not None, ACC=_triton_dtype(compute_dtype(gates.dtype)),
        BLOCK_H=block)
    return dgates, dh_prev, dc_prev


def _tanh(x: Tensor, inplace: bool = False) -> Tensor:
    """tanh(x); in float32 as 2σ(2x) - 1 (ATen's CPU tanh is ~5x slower than its sigmoid here;
    absolute error ~1 ulp of 1, like the Triton kernels' tanh). Float64 keeps tanh: its budget
    is relative, and 2σ(2x) - 1 cancels near 0."""
    if x.dtype != torch.float32:
        return x.tanh_() if inplace else torch.tanh(x)
    two_x = x.mul_(2.0) if inplace else torch.mul(x, 2.0)
    return two_x.sigmoid_().mul_(2.0).sub_(1.0)


def lstm_step_forward_torch(a: Tensor, h_prev: Tensor, c_prev: Tensor, active: Tensor | None,
                            h_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch path: (h_t, c_t) from the pre-activations a = xw + hh (B, 4H), which become
    the gates [i f g o] in place (a layer computes a with one addmm into a fresh tensor; the
    layer's eager loop calls this directly, without the op's dispatch, and has h_t written
    into ``h_out``, its row of the layer's (T+1, B, H) buffer of states)."""
    H = c_prev.shape[1]
    i, f, g, o = a.chunk(4, dim=1)
    a[:, :2 * H].sigmoid_()                                  # i, f (adjacent: one kernel)
    _tanh(g, inplace=True)
    o.sigmoid_()
    c = torch.addcmul(f * c_prev, i, g)                      # c_t = f ⊙ c_{t-1} + i ⊙ g
    if active is None:
        return torch.mul(_tanh(c), o, out=h_out), c        # h_t = o ⊙ tanh(c_t)
    m = active.unsqueeze(1)
    h = torch.where(m, _tanh(c).mul_(o), h_prev, out=h_out)
    return h, torch.where(m, c, c_prev)


def lstm_step_backward_torch(dh: Tensor, dc: Tensor, gates: Tensor, c_prev: Tensor, c: Tensor,
                             active: Tensor | None, dgates: Tensor | None = None
                             ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The torch path: (dgates (B, 4H), dh_{t-1} through the carried state (None when no row
    is masked: it is zero), dc_{t-1}); dgates is written gate by gate, never concatenated,
    into ``dgates`` when given (a layer's loop passes dgates[t] of its (T, B, 4H) buffer)."""
    i, f, g, o = gates.chunk(4, dim=1)
    if dgates is None:
        dgates = torch.empty_like(gates)
    da_i, da_f, da_g, da_o = dgates.chunk(4, dim=1)
    tanh_c = _tanh(c)
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c)
    # the gradients reaching i, f, o (c_t = f ⊙ c_{t-1} + i ⊙ g, h_t = o ⊙ tanh(c_t)), then
    # σ' = s(1 - s) on the whole row at once (few ops count on the CPU: each costs µs at any
    # size); g's slot, multiplied too, is then written with dg ⊙ tanh'(g)
    torch.mul(dc_total, g, out=da_i)
    torch.mul(dc_total, c_prev, out=da_f)
    torch.mul(dh, tanh_c, out=da_o)
    dgates.mul_(gates * (1.0 - gates))
    torch.mul(dc_total * i, 1.0 - g * g, out=da_g)
    dc_prev = dc_total * f
    if active is None:
        return dgates, None, dc_prev
    m = active.unsqueeze(1)
    return (dgates.masked_fill_(~m, 0.0), torch.where(m, 0.0, dh),
            torch.where(m, dc_prev, dc))


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("seqtwin::lstm_step", mutates_args=())
def lstm_step_op(xw: Tensor, hh: Tensor, h_prev: Tensor, c_prev: Tensor, active: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(h_t (B, H), c_t (B, H), gates [i f g o] (B, 4H)) from xw, hh (B, 4H), h_{t-1},
    c_{t-1} (B, H) and active (B,) bool or None (every row active)."""
    if use_triton(xw):
        return lstm_step_forward_triton(xw, hh, h_prev, c_prev, active)
    acc = compute_dtype(xw.dtype)
    gates = xw.to(acc) + hh.to(acc)
    h, c = lstm_step_forward_torch(gates, h_prev.to(acc), c_prev.to(acc), active)
    return h.to(h_prev.dtype), c.to(c_prev.dtype), gates.to(xw.dtype)


@lstm_step_op.register_fake
def _(xw, hh, h_prev, c_prev, active):
    return torch.empty_like(h_prev), torch.empty_like(c_prev), torch.empty_like(xw)


@torch.library.custom_op("seqtwin::lstm_step_backward", mutates_args=())
def lstm_step_backward_op(dh: Tensor, dc: Tensor, gates: Tensor, c_prev: Tensor, c: Tensor,
                          active: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dgates (B, 4H), dh_{t-1} (B, H) through the carried state only, dc_{t-1} (B, H))."""
    if use_triton(gates):
        return lstm_step_backward_triton(dh, dc, gates, c_prev, c, active)
    acc = compute_dtype(gates.dtype)
    dgates, dh_prev, dc_prev = lstm_step_backward_torch(*(t.to(acc) for t in (dh, dc, gates,
                                                                                c_prev, c)),
                                                        active)
    dh_prev = torch.zeros_like(dh) if dh_prev is None else dh_prev.to(dh.dtype)
    return dgates.to(gates.dtype), dh_prev, dc_prev.to(c.dtype)


@lstm_step_backward_op.register_fake
def _(dh, dc, gates, c_prev, c, active):
    return torch.empty_like(gates), torch.empty_like(c), torch.empty_like(c)


# --------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    _, _, _, c_prev, active = inputs
    _, c, gates = output
    ctx.save_for_backward(gates, c_prev, c, active)


def _backward(ctx, dh, dc, dgates_out):
    gates, c_prev, c, active = ctx.saved_tensors
    dgates, dh_prev, dc_prev = torch.ops.seqtwin.lstm_step_backward(dh, dc, gates, c_prev, c,
                                                                    active)
    return dgates, dgates, dh_prev, dc_prev, None


lstm_step_op.register_autograd(_backward, setup_context=_setup_context)


def lstm_step(xw: Tensor, hh: Tensor, h_prev: Tensor, c_prev: Tensor,
              active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(h_t, c_t) (B, H) of one LSTM step from xw = W_ih x_t + b_ih and hh = W_hh h_{t-1} + b_hh
    (B, 4H), the previous state (B, H) and active (B,) bool (t < lengths; None: all rows).

    Differentiable in xw, hh, h_prev and c_prev through the fused backward op.
    """
    check_float_tensor("h_prev", h_prev, finite=False)
    if h_prev.dim() != 2:
        raise ValueError(f"h_prev: expected shape (B, H), got {shape_str(tuple(h_prev.shape))}")
    B, H = h_prev.shape
    check_float_tensor("c_prev", c_prev, shape=(B, H), dtype=h_prev.dtype, finite=False)
    check_float_tensor("xw", xw, shape=(B, 4 * H), dtype=h_prev.dtype, finite=False)
    check_float_tensor("hh", hh, shape=(B, 4 * H), dtype=h_prev.dtype, finite=False)
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (B,)):
        raise ValueError(f"active: expected a bool tensor of shape ({B},), got "
                         f"{active.dtype} {shape_str(tuple(active.shape))}")
    h, c, _ = lstm_step_op(xw, hh, h_prev, c_prev, active)
    return h, c
