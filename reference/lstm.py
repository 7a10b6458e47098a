"""LSTM in torch.nn's formulation (gate order i, f, g, o), forward and hand-written BPTT.

    i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
    f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
    g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
    o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    h_t = o_t ⊙ tanh(c_t)

``W_ih = [W_ii; W_if; W_ig; W_io]`` is (4H, I) and ``W_hh`` is (4H, H), as in
``torch.nn.LSTM``. The step is written once, here; ``recurrent.py`` runs it over
time, directions, layers and lengths.
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


class LSTMStepCache(NamedTuple):
    c_prev: np.ndarray   # c_{t-1}
    i: np.ndarray
    f: np.ndarray
    g: np.ndarray
    o: np.ndarray
    tanh_c: np.ndarray   # tanh(c_t)


def lstm_step_forward(xw: np.ndarray, state: tuple, w_hh: np.ndarray, b_hh: np.ndarray | None
                      ) -> tuple[tuple[np.ndarray, np.ndarray], LSTMStepCache]:
    """One step given xw = W_ih x_t + b_ih (B, 4H) and (h_{t-1}, c_{t-1})."""
    h_prev, c_prev = state
    a = xw + h_prev @ w_hh.T
    if b_hh is not None:
        a = a + b_hh
    H = h_prev.shape[-1]
    i = sigmoid(a[:, :H])
    f = sigmoid(a[:, H:2 * H])
    g = np.tanh(a[:, 2 * H:3 * H])
    o = sigmoid(a[:, 3 * H:])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return (h, c), LSTMStepCache(c_prev, i, f, g, o, tanh_c)


def lstm_step_backward(dstate: tuple, cache: LSTMStepCache, w_hh: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Backward of one step: (dxw, dhh, (dh_{t-1}, dc_{t-1})); dxw == dhh for the LSTM."""
    dh, dc = dstate
    i, f, g, o, tanh_c = cache.i, cache.f, cache.g, cache.o, cache.tanh_c
    do = dh * tanh_c                                  # h_t = o ⊙ tanh(c_t)
    dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
    di, df, dg = dc * g, dc * cache.c_prev, dc * i    # c_t = f ⊙ c_{t-1} + i ⊙ g
    da = np.concatenate([di * i * (1.0 - i),          # σ' and tanh' of the four gates
                         df * f * (1.0 - f),
                         dg * (1.0 - g * g),
                         do * o * (1.0 - o)], axis=-1)
    return da, da, (da @ w_hh, dc * f)


LSTM_CELL = Cell("lstm", gates=4, state_size=2,
                 step_forward=lstm_step_forward, step_backward=lstm_step_backward)


def lstm_cell_forward(x: np.ndarray, h: np.ndarray, c: np.ndarray, params: dict
                      ) -> tuple[tuple[np.ndarray, np.ndarray], CellCache]:
    """One LSTM step from x (B, I), h, c (B, H); params under ``nn.LSTMCell`` names."""
    check_cell_inputs(LSTM_CELL, x, (h, c), ("h", "c"), params)
    return cell_forward(LSTM_CELL, x, (h, c), params)


def lstm_cell_backward(dh_new: np.ndarray, dc_new: np.ndarray, cache: CellCache
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Returns dx (B, I), dh (B, H), dc (B, H), dparams."""
    dx, (dh, dc), dparams = cell_backward((dh_new, dc_new), cache)
    return dx, dh, dc, dparams


def lstm_forward(x: np.ndarray, params: dict, h0: np.ndarray | None = None,
                 c0: np.ndarray | None = None, lengths: np.ndarray | None = None,
                 dropout: float = 0.0, dropout_masks: list | None = None
                 ) -> tuple[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]], StackCache]:
    """Multi-layer (bidirectional) LSTM over x (B, T, I).

    Returns ``((out, (h_n, c_n)), cache)``: out (B, T, D*H), h_n and c_n
    (L*D, B, H) as in torch.nn. See ``recurrent.py`` for lengths and dropout.
    """
    layout, initial, mask = check_sequence_inputs(LSTM_CELL, x, params, (h0, c0), ("h0", "c0"),
                                                  lengths, dropout, dropout_masks)
    out, (h_n, c_n), cache = stack_forward(LSTM_CELL, x, params, layout, initial, mask,
                                           dropout, dropout_masks)
    return (out, (h_n, c_n)), cache


def lstm_backward(dout: np.ndarray | None, cache: StackCache, dh_n: np.ndarray | None = None,
                  dc_n: np.ndarray | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """BPTT: returns dx (B, T, I), dparams, dh0, dc0 (L*D, B, H)."""
    dx, dparams, (dh0, dc0) = stack_backward(dout, (dh_n, dc_n), cache)
    return dx, dparams, dh0, dc0


class LSTM(RecurrentModule):
    """``torch.nn.LSTM(batch_first=True)`` in NumPy, with ``backward``."""

    cell = LSTM_CELL

    def forward(self, x: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                lengths: np.ndarray | None = None, dropout_masks: list | None = None
                ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        dropout, masks = self._masks(x, dropout_masks)
        y, cache = lstm_forward(x, self.params, h0, c0, lengths, dropout, masks)
        self._store(cache)
        return y

    def backward(self, dout: np.ndarray | None, dh_n: np.ndarray | None = None,
                 dc_n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dx, dh0, dc0)."""
        dx, self.grads, dh0, dc0 = lstm_backward(dout, self._take_cache(), dh_n, dc_n)
        return dx, dh0, dc0
