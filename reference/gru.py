"""GRU in torch.nn's formulation (gate order r, z, n), forward and hand-written BPTT.

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Unlike the LSTM, the reset gate multiplies the *recurrent* projection of n,
so the gradient reaching ``W_hn`` is ``dn_pre ⊙ r`` while the one reaching
``W_in`` is ``dn_pre``: the step returns the two separately (dxw, dhh).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activations import sigmoid
from .recurrent import (
    Cell,
    CellCache,
    RecurrentModule,
    StackCache,
    cell_backward,
    cell_forward,
    check_cell_inputs,
    check_sequence_inputs,
    stack_backward,
    stack_forward,
)


class GRUStepCache(NamedTuple):
    h_prev: np.ndarray   # h_{t-1}
    r: np.ndarray
    z: np.ndarray
    n: np.ndarray
    hn: np.ndarray       # W_hn h_{t-1} + b_hn, the term r multiplies


def gru_step_forward(xw: np.ndarray, state: tuple, w_hh: np.ndarray, b_hh: np.ndarray | None
                     ) -> tuple[tuple[np.ndarray], GRUStepCache]:
    """One step given xw = W_ih x_t + b_ih (B, 3H) and (h_{t-1},)."""
    (h_prev,) = state
    hh = h_prev @ w_hh.T
    if b_hh is not None:
        hh = hh + b_hh
    H = h_prev.shape[-1]
    r = sigmoid(xw[:, :H] + hh[:, :H])
    z = sigmoid(xw[:, H:2 * H] + hh[:, H:2 * H])
    hn = hh[:, 2 * H:]
    n = np.tanh(xw[:, 2 * H:] + r * hn)
    h = (1.0 - z) * n + z * h_prev
    return (h,), GRUStepCache(h_prev, r, z, n, hn)


def gru_step_backward(dstate: tuple, cache: GRUStepCache, w_hh: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray]]:
    """Backward of one step: (dxw, dhh, (dh_{t-1},))."""
    (dh,) = dstate
    r, z, n = cache.r, cache.z, cache.n
    dn = dh * (1.0 - z)                      # h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
    dz = dh * (cache.h_prev - n)
    dn_pre = dn * (1.0 - n * n)              # n = tanh(xw_n + r ⊙ hn)
    dr_pre = dn_pre * cache.hn * r * (1.0 - r)
    dz_pre = dz * z * (1.0 - z)
    dxw = np.concatenate([dr_pre, dz_pre, dn_pre], axis=-1)
    dhh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=-1)
    return dxw, dhh, (dh * z + dhh @ w_hh,)


GRU_CELL = Cell("gru", gates=3, state_size=1,
                step_forward=gru_step_forward, step_backward=gru_step_backward)


def gru_cell_forward(x: np.ndarray, h: np.ndarray, params: dict
                     ) -> tuple[np.ndarray, CellCache]:
    """One GRU step from x (B, I), h (B, H); params under ``nn.GRUCell`` names."""
    check_cell_inputs(GRU_CELL, x, (h,), ("h",), params)
    (h_new,), cache = cell_forward(GRU_CELL, x, (h,), params)
    return h_new, cache


def gru_cell_backward(dh_new: np.ndarray, cache: CellCache
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Returns dx (B, I), dh (B, H), dparams."""
    dx, (dh,), dparams = cell_backward((dh_new,), cache)
    return dx, dh, dparams


def gru_forward(x: np.ndarray, params: dict, h0: np.ndarray | None = None,
                lengths: np.ndarray | None = None, dropout: float = 0.0,
                dropout_masks: list | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], StackCache]:
    """Multi-layer (bidirectional) GRU over x (B, T, I).

    Returns ``((out, h_n), cache)``: out (B, T, D*H), h_n (L*D, B, H).
    """
    layout, initial, mask = check_sequence_inputs(GRU_CELL, x, params, (h0,), ("h0",), lengths,
                                                  dropout, dropout_masks)
    out, (h_n,), cache = stack_forward(GRU_CELL, x, params, layout, initial, mask, dropout,
                                       dropout_masks)
    return (out, h_n), cache


def gru_backward(dout: np.ndarray | None, cache: StackCache, dh_n: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """BPTT: returns dx (B, T, I), dparams, dh0 (L*D, B, H)."""
    dx, dparams, (dh0,) = stack_backward(dout, (dh_n,), cache)
    return dx, dparams, dh0


class GRU(RecurrentModule):
    """``torch.nn.GRU(batch_first=True)`` in NumPy, with ``backward``."""

    cell = GRU_CELL

    def forward(self, x: np.ndarray, h0: np.ndarray | None = None,
                lengths: np.ndarray | None = None, dropout_masks: list | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        dropout, masks = self._masks(x, dropout_masks)
        y, cache = gru_forward(x, self.params, h0, lengths, dropout, masks)
        self._store(cache)
        return y

    def backward(self, dout: np.ndarray | None, dh_n: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dx, dh0)."""
        dx, self.grads, dh0 = gru_backward(dout, self._take_cache(), dh_n)
        return dx, dh0
