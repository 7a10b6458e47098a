"""GRU (torch.nn.GRU): the cell step, the sequence layer, its autograd Function, the Module.

Gate order r, z, n (rows of W_ih, W_hh, b_ih, b_hh):

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Backward of one step, from dh_t: the gradients of the pre-activations, apart for the two
projections because r_t multiplies W_hn h_{t-1} + b_hn,
    dgates_x = ∂L/∂(W_ih x_t + b_ih),   dgates_h = ∂L/∂(W_hh h_{t-1} + b_hh)
    dh_{t-1} = dh_t ⊙ z_t + dgates_h W_hh

The pointwise part of the step, forward and backward (the gates, the state update, masking
by length, dgates_x, dgates_h and dh_t ⊙ z_t), is the fused op ``seqtwin::gru_step``
(kernels/gru_step.py, where its backward equations are written); the W_hh matrix products
stay here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .kernels import use_op, use_triton
from .kernels.gru_step import (
    gru_step_backward_op,
    gru_step_backward_torch,
    gru_step_backward_triton,
    gru_step_forward_torch,
    gru_step_forward_triton,
    gru_step_op,
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


class GRUStepCache(NamedTuple):
    saved: Tensor            # (B, 4H) [r z n hn], hn = W_hn h_{t-1} + b_hn
    h_prev: Tensor           # (B, H) h_{t-1}
    active: Tensor | None    # (B,) bool, t < lengths[b]; None: every row


def _gru_step(xw: Tensor, state: tuple[Tensor], w_hh: Linear, b_hh: Tensor | None,
              active: Tensor | None, h_out: Tensor | None = None
              ) -> tuple[tuple[Tensor], GRUStepCache]:
    """h_t from xw_t = W_ih x_t + b_ih (B, 3H) and h_{t-1}; written into h_out when given."""
    (h_prev,) = state
    hh = w_hh(h_prev, b_hh)
    if use_op(h_prev):
        h, saved = gru_step_op(xw, hh, h_prev, active)
        h = h if h_out is None else h_out.copy_(h)
    elif use_triton(h_prev):  # the op's Triton path, without its dispatch
        h, saved = gru_step_forward_triton(xw, hh, h_prev, active, h_out)
    else:  # the op's torch path
        h, saved = gru_step_forward_torch(xw, hh, h_prev, active, h_out)
    return (h,), GRUStepCache(saved, h_prev, active)


def _gru_step_backward(dstate: tuple[Tensor], cache: GRUStepCache, w_hh_t: Linear,
                       dgates_x_out: Tensor | None = None, dgates_h_out: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, tuple[Tensor]]:
    (dh,) = dstate
    if use_op(dh):
        dgates_x, dgates_h, dh_carried = gru_step_backward_op(dh, *cache)
        if dgates_x_out is not None:
            dgates_x, dgates_h = dgates_x_out.copy_(dgates_x), dgates_h_out.copy_(dgates_h)
    elif use_triton(dh):
        dgates_x, dgates_h, dh_carried = gru_step_backward_triton(dh, *cache, dgates_x_out,
                                                                  dgates_h_out)
    else:
        dgates_x, dgates_h, dh_carried = gru_step_backward_torch(dh, *cache, dgates_x_out,
                                                                 dgates_h_out)
    return dgates_x, dgates_h, (w_hh_t(dgates_h, dh_carried),)


GRU_CELL = Cell(num_gates=3, num_states=1, step=_gru_step, step_backward=_gru_step_backward,
                separate_dgates_h=True, name="gru")


# ----------------------------------------------------------------------------- cell

def gru_cell_forward(x: Tensor, h: Tensor, params: Mapping[str, Tensor]
                     ) -> tuple[Tensor, CellCache]:
    """One step of torch.nn.GRUCell (equations in the module docstring).

    x (B, I), h (B, H); params weight_ih (3H, I), weight_hh (3H, H), optional bias_ih,
    bias_hh (3H,). Returns h_new (B, H) and the cache for gru_cell_backward.
    """
    bias = check_cell_args(x, {"h": h}, params, GRU_CELL.num_gates)
    (h_new,), cache = cell_forward(GRU_CELL, x, (h,), params, bias)
    return h_new, cache


def gru_cell_backward(dh_new: Tensor | None, cache: CellCache
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dx (B, I), dh (B, H), dparams) from dh_new (B, H); None means zeros."""
    check_upstream("dh_new", dh_new, tuple(cache.h_prev.shape), cache.x.dtype)
    dx, (dh,), dparams = cell_backward((dh_new,), cache)
    return dx, dh, dparams


# ----------------------------------------------------------------------------- sequence

@torch.no_grad()
def gru_forward(x: Tensor, params: Mapping[str, Tensor], h0: Tensor | None = None,
                lengths: Tensor | None = None, dropout: float = 0.0,
                dropout_masks: Sequence[Tensor] | None = None
                ) -> tuple[tuple[Tensor, Tensor], RecurrentCache]:
    """Multi-layer (bidirectional) GRU over x (B, T, I), as torch.nn.GRU(batch_first=True).

    params: torch.nn names weight_ih_l{k}[_reverse] (3H, I_k), weight_hh_l{k} (3H, H),
    bias_ih_l{k}, bias_hh_l{k} (3H,); L, D, I, H and bias are read off it.
    h0 (L*D, B, H) or None (zeros); lengths (B,) in 1..T or None; dropout_masks: L-1
    bool keep-masks (B, T, D*H), required when dropout > 0 and L > 1.
    Returns ((out (B, T, D*H), h_n (L*D, B, H)), cache).
    """
    args = check_recurrent_args(x, params, GRU_CELL.num_gates, {"h0": h0}, lengths, dropout,
                                dropout_masks)
    (out, (h_n,)), cache = recurrent_forward(GRU_CELL, x, params, args)
    return (out, h_n), cache


@torch.no_grad()
def gru_backward(dout: Tensor | None, cache: RecurrentCache, dh_n: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(dx (B, T, I), dparams keyed like params, dh0 (L*D, B, H)); None upstream = zeros."""
    check_sequence_upstream(cache, dout, {"dh_n": dh_n})
    dx, dparams, (dh0,) = recurrent_backward(cache, dout, (dh_n,))
    return dx, dparams, dh0


class GRU(RecurrentModule):
    """torch.nn.GRU(batch_first=True) with the hand-written backward of gru.py.

    GRU(input_size, hidden_size, num_layers=1, bias=True, dropout=0.0,
    bidirectional=False, *, device=None, dtype=None)
    """
    num_gates = 3

    def forward(self, x: Tensor, h0: Tensor | None = None, lengths: Tensor | None = None,
                dropout_masks: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, I) -> (out (B, T, D*H), h_n (L*D, B, H))."""
        return self._apply_layer(GRU_CELL, x, h0, None, lengths, dropout_masks)
