"""Vanilla (Elman) RNN in torch.nn's formulation, forward and hand-written BPTT.

    h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),   φ = tanh or relu
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import numpy as np

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

NONLINEARITIES = ("tanh", "relu")


class RNNStepCache(NamedTuple):
    h: np.ndarray   # h_t = φ(a_t); both derivatives are read off it


def rnn_step_forward(xw: np.ndarray, state: tuple, w_hh: np.ndarray, b_hh: np.ndarray | None,
                     nonlinearity: str) -> tuple[tuple[np.ndarray], RNNStepCache]:
    """One step given xw = W_ih x_t + b_ih (B, H) and (h_{t-1},)."""
    (h_prev,) = state
    a = xw + h_prev @ w_hh.T
    if b_hh is not None:
        a = a + b_hh
    h = np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0.0)
    return (h,), RNNStepCache(h)


def rnn_step_backward(dstate: tuple, cache: RNNStepCache, w_hh: np.ndarray, nonlinearity: str
                      ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray]]:
    """Backward of one step: (dxw, dhh, (dh_{t-1},)); tanh' = 1 - h², relu' = [h > 0]."""
    (dh,) = dstate
    h = cache.h
    da = dh * (1.0 - h * h) if nonlinearity == "tanh" else np.where(h > 0, dh, 0.0)
    return da, da, (da @ w_hh,)


def rnn_cell_type(nonlinearity: str) -> Cell:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return Cell(f"rnn_{nonlinearity}", gates=1, state_size=1,
                step_forward=partial(rnn_step_forward, nonlinearity=nonlinearity),
                step_backward=partial(rnn_step_backward, nonlinearity=nonlinearity))


def rnn_cell_forward(x: np.ndarray, h: np.ndarray, params: dict, nonlinearity: str = "tanh"
                     ) -> tuple[np.ndarray, CellCache]:
    """One RNN step from x (B, I), h (B, H); params under ``nn.RNNCell`` names."""
    cell = rnn_cell_type(nonlinearity)
    check_cell_inputs(cell, x, (h,), ("h",), params)
    (h_new,), cache = cell_forward(cell, x, (h,), params)
    return h_new, cache


def rnn_cell_backward(dh_new: np.ndarray, cache: CellCache
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Returns dx (B, I), dh (B, H), dparams."""
    dx, (dh,), dparams = cell_backward((dh_new,), cache)
    return dx, dh, dparams


def rnn_forward(x: np.ndarray, params: dict, h0: np.ndarray | None = None,
                lengths: np.ndarray | None = None, nonlinearity: str = "tanh",
                dropout: float = 0.0, dropout_masks: list | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], StackCache]:
    """Multi-layer (bidirectional) RNN over x (B, T, I).

    Returns ``((out, h_n), cache)``: out (B, T, D*H), h_n (L*D, B, H).
    """
    cell = rnn_cell_type(nonlinearity)
    layout, initial, mask = check_sequence_inputs(cell, x, params, (h0,), ("h0",), lengths,
                                                  dropout, dropout_masks)
    out, (h_n,), cache = stack_forward(cell, x, params, layout, initial, mask, dropout,
                                       dropout_masks)
    return (out, h_n), cache


def rnn_backward(dout: np.ndarray | None, cache: StackCache, dh_n: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """BPTT: returns dx (B, T, I), dparams, dh0 (L*D, B, H)."""
    dx, dparams, (dh0,) = stack_backward(dout, (dh_n,), cache)
    return dx, dparams, dh0


class RNN(RecurrentModule):
    """``torch.nn.RNN(batch_first=True)`` in NumPy, with ``backward``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        self.cell = rnn_cell_type(nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, dropout, bidirectional,
                         dtype, seed)

    def forward(self, x: np.ndarray, h0: np.ndarray | None = None,
                lengths: np.ndarray | None = None, dropout_masks: list | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        dropout, masks = self._masks(x, dropout_masks)
        y, cache = rnn_forward(x, self.params, h0, lengths, self.nonlinearity, dropout, masks)
        self._store(cache)
        return y

    def backward(self, dout: np.ndarray | None, dh_n: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dx, dh0)."""
        dx, self.grads, dh0 = rnn_backward(dout, self._take_cache(), dh_n)
        return dx, dh0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"
