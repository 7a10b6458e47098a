"""Elman RNN (torch.nn.RNN): the cell step, the sequence layer, its autograd Function, the Module.

    h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),   act = tanh or relu

Backward of one step (a = the pre-activation):
    da = dh_t ⊙ act'(a),  act'(a) = 1 - h_t² (tanh) or [h_t > 0] (relu)
    dh_{t-1} = da W_hh;   da is both dgates_x and dgates_h.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

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

NONLINEARITIES = ("tanh", "relu")


class RNNStepCache(NamedTuple):
    h: Tensor                # (B, H) h_t = act(a) (h_{t-1} at inactive rows)
    active: Tensor | None    # (B,) bool, t < lengths[b]; None: every row


def _rnn_step(xw: Tensor, state: tuple[Tensor], w_hh: Linear, b_hh: Tensor | None,
              active: Tensor | None, h_out: Tensor | None = None, *, nonlinearity: str
              ) -> tuple[tuple[Tensor], RNNStepCache]:
    """h_t = act(xw_t + W_hh h_{t-1} + b_hh), xw_t = W_ih x_t + b_ih already computed;
    written into h_out when given."""
    (h_prev,) = state
    a = w_hh(h_prev, xw) if b_hh is None else w_hh(h_prev, xw) + b_hh
    if active is None:
        h = torch.tanh(a, out=h_out) if nonlinearity == "tanh" else torch.clamp_min(a, 0.0,
                                                                                   out=h_out)
    else:  # inactive rows carry their state
        h = torch.where(active.unsqueeze(1), torch.tanh(a) if nonlinearity == "tanh"
                        else torch.relu(a), h_prev, out=h_out)
    return (h,), RNNStepCache(h, active)


def _rnn_step_backward(dstate: tuple[Tensor], cache: RNNStepCache, w_hh_t: Linear,
                       da_out: Tensor | None = None, _: Tensor | None = None, *,
                       nonlinearity: str) -> tuple[Tensor, Tensor, tuple[Tensor]]:
    (dh,) = dstate
    h = cache.h
    if nonlinearity == "tanh":  # act'(a)
        da = torch.mul(dh, 1.0 - h * h, out=da_out)
    else:
        da = torch.mul(dh, h > 0, out=da_out)
    if cache.active is None:
        return da, da, (w_hh_t(da),)  # dh_{t-1} = da W_hh
    active = cache.active.unsqueeze(1)  # inactive rows: no gradient into the step, dh carried
    da = da.masked_fill_(~active, 0.0)
    return da, da, (torch.where(active, w_hh_t(da), dh),)


RNN_CELLS = {act: Cell(num_gates=1, num_states=1, step=partial(_rnn_step, nonlinearity=act),
                       step_backward=partial(_rnn_step_backward, nonlinearity=act),
                       separate_dgates_h=False, name=f"rnn_{act}")
             for act in NONLINEARITIES}


def _check_nonlinearity(nonlinearity: object) -> str:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


# ----------------------------------------------------------------------------- cell

def rnn_cell_forward(x: Tensor, h: Tensor, params: Mapping[str, Tensor],
                     nonlinearity: str = "tanh") -> tuple[Tensor, CellCache]:
    """One step of torch.nn.RNNCell: h_new = act(W_ih x + b_ih + W_hh h + b_hh).

    x (B, I), h (B, H); params weight_ih (H, I), weight_hh (H, H), optional bias_ih,
    bias_hh (H,). Returns h_new (B, H) and the cache for rnn_cell_backward.
    """
    cell = RNN_CELLS[_check_nonlinearity(nonlinearity)]
    bias = check_cell_args(x, {"h": h}, params, cell.num_gates)
    (h_new,), cache = cell_forward(cell, x, (h,), params, bias)
    return h_new, cache


def rnn_cell_backward(dh_new: Tensor | None, cache: CellCache
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dx (B, I), dh (B, H), dparams) from dh_new (B, H); None means zeros."""
    check_upstream("dh_new", dh_new, tuple(cache.h_prev.shape), cache.x.dtype)
    dx, (dh,), dparams = cell_backward((dh_new,), cache)
    return dx, dh, dparams


# ----------------------------------------------------------------------------- sequence

@torch.no_grad()
def rnn_forward(x: Tensor, params: Mapping[str, Tensor], h0: Tensor | None = None,
                lengths: Tensor | None = None, nonlinearity: str = "tanh", dropout: float = 0.0,
                dropout_masks: Sequence[Tensor] | None = None
                ) -> tuple[tuple[Tensor, Tensor], RecurrentCache]:
    """Multi-layer (bidirectional) RNN over x (B, T, I), as torch.nn.RNN(batch_first=True).

        h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)

    params: torch.nn names weight_ih_l{k}[_reverse] (H, I_k), weight_hh_l{k} (H, H),
    bias_ih_l{k}, bias_hh_l{k} (H,); L, D, I, H and bias are read off it.
    h0 (L*D, B, H) or None (zeros); lengths (B,) in 1..T or None; dropout_masks: L-1
    bool keep-masks (B, T, D*H), required when dropout > 0 and L > 1.
    Returns ((out (B, T, D*H), h_n (L*D, B, H)), cache).
    """
    cell = RNN_CELLS[_check_nonlinearity(nonlinearity)]
    args = check_recurrent_args(x, params, cell.num_gates, {"h0": h0}, lengths, dropout,
                                dropout_masks)
    (out, (h_n,)), cache = recurrent_forward(cell, x, params, args)
    return (out, h_n), cache


@torch.no_grad()
def rnn_backward(dout: Tensor | None, cache: RecurrentCache, dh_n: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(dx (B, T, I), dparams keyed like params, dh0 (L*D, B, H)); None upstream = zeros."""
    check_sequence_upstream(cache, dout, {"dh_n": dh_n})
    dx, dparams, (dh0,) = recurrent_backward(cache, dout, (dh_n,))
    return dx, dparams, dh0


class RNN(RecurrentModule):
    """torch.nn.RNN(batch_first=True) with the hand-written backward of rnn.py."""
    num_gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, dropout: float = 0.0,
                 bidirectional: bool = False, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, dropout, bidirectional,
                         device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, x: Tensor, h0: Tensor | None = None, lengths: Tensor | None = None,
                dropout_masks: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, I) -> (out (B, T, D*H), h_n (L*D, B, H))."""
        return self._apply_layer(RNN_CELLS[self.nonlinearity], x, h0, None, lengths,
                                 dropout_masks)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.nonlinearity == "tanh" else text + ", nonlinearity='relu'"
