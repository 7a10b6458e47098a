"""LSTM (torch.nn.LSTM): the cell step, the sequence layer, its autograd Function, the Module.

Gate order i, f, g, o (rows of W_ih, W_hh, b_ih, b_hh):

    i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
    f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
    g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
    o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    h_t = o_t ⊙ tanh(c_t)

Backward of one step, from dh_t and dc_t (the gradient reaching c_t from step t+1):
    dgates = ∂L/∂(pre-activations of i, f, g, o)   (both dgates_x and dgates_h)
    dc_{t-1} = dc ⊙ f_t,   dh_{t-1} = dgates W_hh

The pointwise part of the step, forward and backward (the gates, the state update, masking
by length, and dgates), is the fused op ``seqtwin::lstm_step`` (kernels/lstm_step.py, where
its backward equations are written); the W_hh matrix products stay here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .kernels import use_op, use_triton
from .kernels.lstm_step import (
    lstm_step_backward_op,
    lstm_step_backward_torch,
    lstm_step_backward_triton,
    lstm_step_forward_torch,
    lstm_step_forward_triton,
    lstm_step_op,
)
from .recurrent import (
    Cell,
    CellCache,
    Linear,
    RecurrentCache,
    RecurrentModule,
    cell_backward,
    cell_forward,
    check_cell_args,
    check_recurrent_args,
    check_sequence_upstream,
    check_upstream,
    recurrent_backward,
    recurrent_forward,
)


class LSTMStepCache(NamedTuple):
    gates: Tensor            # (B, 4H) the activated gates [i f g o]
    c_prev: Tensor           # (B, H) c_{t-1}
    c: Tensor                # (B, H) c_t
    active: Tensor | None    # (B,) bool, t < lengths[b]; None: every row


def _lstm_step(xw: Tensor, state: tuple[Tensor, Tensor], w_hh: Linear, b_hh: Tensor | None,
               active: Tensor | None, h_out: Tensor | None = None
               ) -> tuple[tuple[Tensor, Tensor], LSTMStepCache]:
    """(h_t, c_t) from xw_t = W_ih x_t + b_ih (B, 4H) and (h_{t-1}, c_{t-1}); h_t is written
    into h_out when given."""
    h_prev, c_prev = state
    if use_op(h_prev):
        h, c, gates = lstm_step_op(xw, w_hh(h_prev, b_hh), h_prev, c_prev, active)
        h = h if h_out is None else h_out.copy_(h)
    elif use_triton(h_prev):  # the op's Triton path, without its dispatch
        h, c, gates = lstm_step_forward_triton(xw, w_hh(h_prev, b_hh), h_prev, c_prev, active,
                                               h_out)
    else:  # the op's torch path, with xw + W_hh h_{t-1} summed by the matmul itself
        gates = w_hh(h_prev, xw)
        if b_hh is not None:
            gates += b_hh
        h, c = lstm_step_forward_torch(gates, h_prev, c_prev, active, h_out)
    return (h, c), LSTMStepCache(gates, c_prev, c, active)


def _lstm_step_backward(dstate: tuple[Tensor, Tensor], cache: LSTMStepCache, w_hh_t: Linear,
                        dgates_out: Tensor | None = None, _: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    dh, dc = dstate
    if use_op(dh):
        dgates, dh_carried, dc_prev = lstm_step_backward_op(dh, dc, *cache)
        dgates = dgates if dgates_out is None else dgates_out.copy_(dgates)
    elif use_triton(dh):
        dgates, dh_carried, dc_prev = lstm_step_backward_triton(dh, dc, *cache, dgates_out)
    else:
        dgates, dh_carried, dc_prev = lstm_step_backward_torch(dh, dc, *cache, dgates_out)
    # h_{t-1} enters the gates through W_hh h_{t-1}; at inactive rows, through the carried state
    return dgates, dgates, (w_hh_t(dgates, dh_carried), dc_prev)


LSTM_CELL = Cell(num_gates=4, num_states=2, step=_lstm_step, step_backward=_lstm_step_backward,
                 separate_dgates_h=False, name="lstm")


# ----------------------------------------------------------------------------- cell

def lstm_cell_forward(x: Tensor, h: Tensor, c: Tensor, params: Mapping[str, Tensor]
                      ) -> tuple[tuple[Tensor, Tensor], CellCache]:
    """One step of torch.nn.LSTMCell (equations in the module docstring).

    x (B, I), h, c (B, H); params weight_ih (4H, I), weight_hh (4H, H), optional bias_ih,
    bias_hh (4H,). Returns ((h_new, c_new), cache).
    """
    bias = check_cell_args(x, {"h": h, "c": c}, params, LSTM_CELL.num_gates)
    (h_new, c_new), cache = cell_forward(LSTM_CELL, x, (h, c), params, bias)
    return (h_new, c_new), cache


def lstm_cell_backward(dh_new: Tensor | None, dc_new: Tensor | None, cache: CellCache
                       ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(dx (B, I), dh (B, H), dc (B, H), dparams) from dh_new, dc_new (B, H); None = zeros."""
    for name, grad in (("dh_new", dh_new), ("dc_new", dc_new)):
        check_upstream(name, grad, tuple(cache.h_prev.shape), cache.x.dtype)
    dx, (dh, dc), dparams = cell_backward((dh_new, dc_new), cache)
    return dx, dh, dc, dparams


# ----------------------------------------------------------------------------- sequence

@torch.no_grad()
def lstm_forward(x: Tensor, params: Mapping[str, Tensor], h0: Tensor | None = None,
                 c0: Tensor | None = None, lengths: Tensor | None = None, dropout: float = 0.0,
                 dropout_masks: Sequence[Tensor] | None = None
                 ) -> tuple[tuple[Tensor, tuple[Tensor, Tensor]], RecurrentCache]:
    """Multi-layer (bidirectional) LSTM over x (B, T, I), as torch.nn.LSTM(batch_first=True).

    params: torch.nn names weight_ih_l{k}[_reverse] (4H, I_k), weight_hh_l{k} (4H, H),
    bias_ih_l{k}, bias_hh_l{k} (4H,); L, D, I, H and bias are read off it.
    h0, c0 (L*D, B, H) or None (zeros); lengths (B,) in 1..T or None; dropout_masks: L-1
    bool keep-masks (B, T, D*H), required when dropout > 0 and L > 1.
    Returns ((out (B, T, D*H), (h_n, c_n) (L*D, B, H)), cache).
    """
    args = check_recurrent_args(x, params, LSTM_CELL.num_gates, {"h0": h0, "c0": c0}, lengths,
                                dropout, dropout_masks)
    (out, (h_n, c_n)), cache = recurrent_forward(LSTM_CELL, x, params, args)
    return (out, (h_n, c_n)), cache


@torch.no_grad()
def lstm_backward(dout: Tensor | None, cache: RecurrentCache, dh_n: Tensor | None = None,
                  dc_n: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """(dx (B, T, I), dparams keyed like params, dh0, dc0 (L*D, B, H)); None upstream = zeros."""
    check_sequence_upstream(cache, dout, {"dh_n": dh_n, "dc_n": dc_n})
    dx, dparams, (dh0, dc0) = recurrent_backward(cache, dout, (dh_n, dc_n))
    return dx, dparams, dh0, dc0


class LSTM(RecurrentModule):
    """torch.nn.LSTM(batch_first=True) with the hand-written backward of lstm.py.

    LSTM(input_size, hidden_size, num_layers=1, bias=True, dropout=0.0,
    bidirectional=False, *, device=None, dtype=None)
    """
    num_gates = 4

    def forward(self, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None,
                lengths: Tensor | None = None, dropout_masks: Sequence[Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, I) -> (out (B, T, D*H), (h_n, c_n) (L*D, B, H))."""
        out, h_n, c_n = self._apply_layer(LSTM_CELL, x, h0, c0, lengths, dropout_masks)
        return out, (h_n, c_n)
