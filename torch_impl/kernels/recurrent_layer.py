"""Whole-layer recurrent op: ``seqtwin::recurrent_layer`` and its backward op.

One call runs one direction of one layer over all T steps (the RNN with tanh or relu, the
LSTM, the GRU; equations in ``kernels/cpu/recurrent.cpp`` and in ``rnn.py``, ``lstm.py``,
``gru.py``):

    xw_t = W_ih x_t + b_ih                     one GEMM over all t
    s_t  = step(xw_t, s_{t-1}; W_hh, b_hh)     t = 0 .. T-1 (reverse: T-1 .. 0)

with packed-sequence semantics for ``lengths`` (a row past its length carries its state).
The op returns the states in (T+1, B, H) buffers in the order the steps ran, h0 first, and
what the backward needs; the backward op returns dgates_x = ∂L/∂(W_ih x_t + b_ih) and
dgates_h = ∂L/∂(W_hh h_{t-1} + b_hh) for every t, from which the weight gradients are one
GEMM each (``direction_grads``), and the initial states' gradients.

Its implementation is the native C++ kernel (``kernels/cpu/recurrent.cpp``) on float32 and
float64 CPU tensors. A layer calls it where ``native_kernels("recurrent", x)`` says the
native path runs; elsewhere (CUDA, bf16/fp16, the "torch" and "triton" paths, or no compiler)
the layer runs its per-step loop over the fused step ops (``lstm_step``, ``gru_step``).
In eager mode a layer calls the extension directly, without the op's dispatch; under
``torch.compile`` the graph holds the op (a single node per layer and direction, with a fake).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import native

CELLS = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
NUM_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _module():
    module = native.load("recurrent")
    if module is None:
        raise RuntimeError(f"seqtwin::recurrent_layer: the native CPU kernel is unavailable "
                           f"({native._failure})")
    return module


class LayerOutputs(NamedTuple):
    hs: Tensor      # (T+1, B, H) states in the order the steps ran, h0 first
    cs: Tensor      # (T+1, B, H) the LSTM's cell states, else empty
    saved: Tensor   # LSTM: gates [i f g o] (T, B, 4H); GRU: [r z n hh_n] (T, B, 4H); RNN: empty


def layer_forward(module, cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                  b_hh: Tensor | None, h0: Tensor, c0: Tensor | None, lengths: Tensor | None,
                  reverse: bool) -> LayerOutputs:
    """The native forward of one direction; x (T, B, I) time-major. ``module`` is the loaded
    extension (eager) or None (through the op, e.g. under torch.compile)."""
    if module is None:
        return LayerOutputs(*torch.ops.seqtwin.recurrent_layer(
            cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse))
    return LayerOutputs(*module.forward(
        CELLS[cell], x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh,
        h0.contiguous(), None if c0 is None else c0.contiguous(), lengths, reverse))


def layer_backward(module, cell: str, dout: Tensor | None, dh_n: Tensor | None,
                   dc_n: Tensor | None, w_hh: Tensor, outputs: LayerOutputs,
                   lengths: Tensor | None, reverse: bool, dc_rows: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dgates_x, dgates_h (T, B, G*H), dh0, dc0 (B, H); dc0 None but for the LSTM) of one
    direction, from dout (T, B, H), the gradients of the state rows h_t (a strided view is
    read in place; a layer masks it by length first, as its output is h_t ⊙ [t < lengths]),
    dh_n, dc_n (B, H) or None, and dc_rows (T, B, H), the gradients of the rows c_t, or None."""
    if module is None:
        dgx, dgh, dh0, dc0 = torch.ops.seqtwin.recurrent_layer_backward(
            cell, dout, dc_rows, dh_n, dc_n, w_hh, *outputs, lengths, reverse)
    else:
        dgx, dgh, dh0, dc0 = module.backward(CELLS[cell], dout, dc_rows, dh_n, dc_n,
                                             w_hh.contiguous(), *outputs, lengths, reverse)
    return dgx, (dgh if cell == "gru" else dgx), dh0, (dc0 if cell == "lstm" else None)


def h_prev_of(outputs: LayerOutputs, reverse: bool) -> Tensor:
    """(T, B, H) the state entering each step t: h_{t-1} (forward), h_{t+1} (reverse)."""
    return outputs.hs[1:] if reverse else outputs.hs[:-1]


def h_of(outputs: LayerOutputs, reverse: bool) -> Tensor:
    """(T, B, H) h_t (carried past each row's length)."""
    return outputs.hs[:-1] if reverse else outputs.hs[1:]


def final_of(states: Tensor, reverse: bool) -> Tensor:
    """(B, H) the state after the last step that ran."""
    return states[0] if reverse else states[-1]


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("seqtwin::recurrent_layer", mutates_args=(), device_types="cpu")
def recurrent_layer_op(cell: str, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                       b_hh: Tensor | None, h0: Tensor, c0: Tensor | None,
                       lengths: Tensor | None, reverse: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(hs (T+1, B, H), cs (T+1, B, H) or (0,), saved) of one direction of one layer; cell is
    "rnn_tanh", "rnn_relu", "lstm" or "gru"; x (T, B, I); h0, c0 (B, H); lengths (B,) int64."""
    return tuple(layer_forward(_module(), cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                               reverse))


@recurrent_layer_op.register_fake
def _(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    hs = x.new_empty(T + 1, B, H)
    cs = x.new_empty(T + 1, B, H) if cell == "lstm" else x.new_empty(0)
    saved = x.new_empty(T, B, 4 * H) if cell in ("lstm", "gru") else x.new_empty(0)
    return hs, cs, saved


@torch.library.custom_op("seqtwin::recurrent_layer_backward", mutates_args=(),
                         device_types="cpu")
def recurrent_layer_backward_op(cell: str, dout: Tensor | None, dc_rows: Tensor | None,
                                dh_n: Tensor | None, dc_n: Tensor | None, w_hh: Tensor,
                                hs: Tensor, cs: Tensor, saved: Tensor, lengths: Tensor | None,
                                reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dgates_x (T, B, G*H), dgates_h (T, B, 3H) for the GRU else (0,), dh0 (B, H),
    dc0 (B, H) for the LSTM else (0,))."""
    return tuple(_module().backward(CELLS[cell], dout, dc_rows, dh_n, dc_n, w_hh.contiguous(),
                                    hs, cs, saved, lengths, reverse))


@recurrent_layer_backward_op.register_fake
def _(cell, dout, dc_rows, dh_n, dc_n, w_hh, hs, cs, saved, lengths, reverse):
    T1, B, H = hs.shape
    G = NUM_GATES[cell]
    dgh = hs.new_empty(T1 - 1, B, 3 * H) if cell == "gru" else hs.new_empty(0)
    dc0 = hs.new_empty(B, H) if cell == "lstm" else hs.new_empty(0)
    return hs.new_empty(T1 - 1, B, G * H), dgh, hs.new_empty(B, H), dc0


# --------------------------------------------------------------------------- autograd

def direction_grads(x: Tensor, w_ih: Tensor, h_prev: Tensor, dgates_x: Tensor,
                    dgates_h: Tensor, bias: bool, need_dx: bool = True
                    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx (T, B, I), dW_ih, dW_hh, db_ih, db_hh) of one direction, each one GEMM or sum over
    all T B rows: dW_ih = Σ_t dgates_x_tᵀ x_t, dW_hh = Σ_t dgates_h_tᵀ h_{t-1},
    db = Σ_t dgates, dx_t = dgates_x_t W_ih."""
    T, B, I = x.shape
    H = h_prev.shape[2]
    gx, gh = dgates_x.reshape(T * B, -1), dgates_h.reshape(T * B, -1)
    dw_ih = gx.t() @ x.reshape(T * B, I)
    dw_hh = gh.t() @ h_prev.reshape(T * B, H)
    db_ih = db_hh = None
    if bias:
        db_ih = gx.sum(0)
        # one sum where dgates_h is dgates_x (RNN, LSTM); a copy, so no two gradients alias
        db_hh = db_ih.clone() if gh is gx else gh.sum(0)
    dx = (gx @ w_ih).view(T, B, I) if need_dx else None
    return dx, dw_ih, dw_hh, db_ih, db_hh


def _setup_context(ctx, inputs, output):
    cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse = inputs
    ctx.cell, ctx.reverse, ctx.bias = cell, reverse, b_ih is not None
    ctx.mark_non_differentiable(output[2])  # saved: the backward's cache, not a result
    ctx.save_for_backward(x, w_ih, w_hh, lengths, *output)


def _rows_and_first(d: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """The gradient of a (T+1, B, H) state buffer split into its step rows s_t (T, B, H),
    indexed by t, and its initial row s0 (B, H)."""
    return (d[:-1], d[-1]) if reverse else (d[1:], d[0])


def _backward(ctx, dhs, dcs, dsaved):
    x, w_ih, w_hh, lengths, hs, cs, saved = ctx.saved_tensors
    dout = dc_rows = dh_first = dc_first = None
    if dhs is not None:
        dout, dh_first = _rows_and_first(dhs, ctx.reverse)
    if dcs is not None and ctx.cell == "lstm":
        dc_rows, dc_first = _rows_and_first(dcs, ctx.reverse)
    outputs = LayerOutputs(hs, cs, saved)
    dgx, dgh, dh0, dc0 = layer_backward(None, ctx.cell, dout, None, None, w_hh, outputs,
                                        lengths, ctx.reverse, dc_rows)
    dx, dw_ih, dw_hh, db_ih, db_hh = direction_grads(x, w_ih, h_prev_of(outputs, ctx.reverse),
                                                     dgx, dgh, ctx.bias)
    if dh_first is not None:  # the first row of hs is h0 itself
        dh0 = dh0 + dh_first
    if dc_first is not None:
        dc0 = dc0 + dc_first
    return None, dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0, None, None


recurrent_layer_op.register_autograd(_backward, setup_context=_setup_context)
