"""The sequence driver shared by RNN, LSTM and GRU.

The math of each cell lives in its own file (``rnn.py``, ``lstm.py``,
``gru.py``) as a *step*: given the input projection ``xw_t = W_ih x_t + b_ih``
of one time step and the previous state, it returns the next state. This file
runs those steps over time, over both directions and over stacked layers, and
applies the three things every recurrent layer shares:

- variable lengths: at a padded step (``t >= lengths[b]``) the state is carried
  unchanged and the output is zero, so the final state is each sequence's own
  last state and the reverse direction starts at ``lengths[b] - 1`` from h0::

      s_t = m_t ⊙ step(xw_t, s_{t-1}) + (1 - m_t) ⊙ s_{t-1},   out_t = m_t ⊙ h_t

- inter-layer dropout with explicit keep-masks: ``x^{k+1} = out^k ⊙ mask_k / (1 - p)``;
- torch.nn's parameter layout: ``weight_ih_l{k}[_reverse]`` ... and states
  ``(L*D, B, H)`` indexed ``k*D + d``.

Performance shape (DESIGN.md): the input projection of all steps is one matrix
product before the time loop, and the weight gradients are one matrix product
after the backward loop; the loops run over time, never over batch items.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .activations import sigmoid
from .checks import (
    check_float_array,
    check_lengths,
    check_positive_int,
    check_probability,
    check_shape,
)
from .module import Module

State = tuple  # (h,) for RNN and GRU, (h, c) for LSTM


class Cell(NamedTuple):
    """What the driver needs to know about one cell type."""
    name: str                 # "rnn", "lstm", "gru" (for messages)
    gates: int                # G: rows of W_ih are G*H
    state_size: int           # 1 for (h,), 2 for (h, c)
    step_forward: Callable    # (xw (B,GH), state, w_hh, b_hh) -> (state, step_cache)
    step_backward: Callable   # (dstate, step_cache, w_hh) -> (dxw (B,GH), dhh (B,GH), dstate_prev)


class Layout(NamedTuple):
    """Sizes inferred from a params dict."""
    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    bias: bool


def param_names(layer: int, direction: int, bias: bool) -> list[str]:
    """torch.nn names of one (layer, direction): weight_ih_l0, ..., bias_hh_l0_reverse."""
    suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
    return [kind + suffix for kind in kinds]


def expected_shapes(cell: Cell, layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every parameter name of ``layout`` and its shape, in torch.nn's order."""
    H, D, GH = layout.hidden_size, layout.num_directions, cell.gates * layout.hidden_size
    shapes = {}
    for k in range(layout.num_layers):
        in_size = layout.input_size if k == 0 else D * H
        for d in range(D):
            names = param_names(k, d, layout.bias)
            shapes[names[0]] = (GH, in_size)
            shapes[names[1]] = (GH, H)
            if layout.bias:
                shapes[names[2]] = (GH,)
                shapes[names[3]] = (GH,)
    return shapes


def infer_layout(cell: Cell, params: object) -> Layout:
    """Read sizes off the params dict and check every tensor's presence and shape."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict of arrays keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    w = params.get("weight_ih_l0")
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"params: expected 'weight_ih_l0' of shape ({cell.gates}*H, I), "
                         f"got {getattr(w, 'shape', w)}")
    if w.shape[0] % cell.gates:
        raise ValueError(f"params['weight_ih_l0']: first dimension must be {cell.gates}*H for "
                         f"{cell.name.upper()}, got shape {w.shape}")
    num_layers = 1
    while f"weight_ih_l{num_layers}" in params:
        num_layers += 1
    layout = Layout(input_size=w.shape[1], hidden_size=w.shape[0] // cell.gates,
                    num_layers=num_layers,
                    num_directions=2 if "weight_ih_l0_reverse" in params else 1,
                    bias="bias_ih_l0" in params)
    expected = expected_shapes(cell, layout)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"params: missing {name!r} of shape {shape}")
        check_float_array(f"params[{name!r}]", params[name], shape, dtype=w.dtype)
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} for a {layout.num_layers}-layer "
                         f"{cell.name.upper()} (expected {list(expected)})")
    return layout


# --------------------------------------------------------------------------- one direction

class DirectionCache(NamedTuple):
    x: np.ndarray              # (B, T, I) input of this layer
    h_prev: np.ndarray         # (B, T, H) h_{t-1} seen by step t
    steps: list                # step caches, indexed by t
    mask: np.ndarray | None    # (B, T) bool, None when every sequence is full length
    reverse: bool


def time_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def direction_forward(cell: Cell, x: np.ndarray, names: list[str], params: dict,
                      state0: State, mask: np.ndarray | None, reverse: bool
                      ) -> tuple[np.ndarray, State, DirectionCache]:
    """Run one direction of one layer: returns out (B, T, H), final state, cache."""
    w_ih, w_hh = params[names[0]], params[names[1]]
    b_ih, b_hh = (params[names[2]], params[names[3]]) if len(names) == 4 else (None, None)
    B, T, _ = x.shape
    H = w_hh.shape[1]
    xw = x @ w_ih.T  # all time steps in one product
    if b_ih is not None:
        xw = xw + b_ih
    out = np.zeros((B, T, H), dtype=x.dtype)
    h_prev = np.empty((B, T, H), dtype=x.dtype)
    steps: list = [None] * T
    state = state0
    for t in time_order(T, reverse):
        h_prev[:, t] = state[0]
        new, steps[t] = cell.step_forward(xw[:, t], state, w_hh, b_hh)
        if mask is None:
            state = new
            out[:, t] = new[0]
        else:
            m = mask[:, t, None]
            state = tuple(np.where(m, s_new, s_old) for s_new, s_old in zip(new, state))
            out[:, t] = np.where(m, new[0], 0.0)
    return out, state, DirectionCache(x, h_prev, steps, mask, reverse)


def direction_backward(cell: Cell, dout: np.ndarray, dstate: State, names: list[str],
                       params: dict, cache: DirectionCache
                       ) -> tuple[np.ndarray, dict[str, np.ndarray], State]:
    """BPTT through one direction: returns dx (B, T, I), parameter grads, dstate0."""
    w_ih, w_hh = params[names[0]], params[names[1]]
    B, T, _ = dout.shape
    dxw = np.zeros((B, T, w_ih.shape[0]), dtype=dout.dtype)
    dhh = np.zeros_like(dxw)
    mask = cache.mask
    for t in time_order(T, not cache.reverse):
        d_new = (dstate[0] + dout[:, t],) + tuple(dstate[1:])
        if mask is not None:
            m = mask[:, t, None]
            # padded steps pass the state gradient straight through and ignore dout
            d_carry = tuple(np.where(m, 0.0, d) for d in dstate)
            d_new = tuple(np.where(m, d, 0.0) for d in d_new)
        dxw[:, t], dhh[:, t], dstate = cell.step_backward(d_new, cache.steps[t], w_hh)
        if mask is not None:
            dstate = tuple(a + b for a, b in zip(dstate, d_carry))
    dx, grads = projection_backward(dxw, dhh, cache.x, cache.h_prev, w_ih, names)
    return dx, grads, dstate


def projection_backward(dxw: np.ndarray, dhh: np.ndarray, x: np.ndarray, h_prev: np.ndarray,
                        w_ih: np.ndarray, names: list[str]
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gradients of xw = x W_ih^T + b_ih and hh = h_prev W_hh^T + b_hh, all steps at once.

    Weight gradients wait until after the time loop so that they are one
    matrix product over every (batch, step) row instead of T small ones.
    """
    GH = dxw.shape[-1]
    dxw2, dhh2 = dxw.reshape(-1, GH), dhh.reshape(-1, GH)
    grads = {names[0]: dxw2.T @ x.reshape(-1, x.shape[-1]),
             names[1]: dhh2.T @ h_prev.reshape(-1, h_prev.shape[-1])}
    if len(names) == 4:
        grads[names[2]] = dxw2.sum(axis=0)
        grads[names[3]] = dhh2.sum(axis=0)
    return dxw @ w_ih, grads


# --------------------------------------------------------------------------- the layer stack

class StackCache(NamedTuple):
    cell: Cell
    layout: Layout
    params: dict
    directions: list           # [layer][direction] -> DirectionCache
    dropout: float
    dropout_masks: list | None


def check_sequence_inputs(cell: Cell, x: object, params: object, states: Sequence[object],
                          state_names: Sequence[str], lengths: object, dropout: float,
                          dropout_masks: object) -> tuple[Layout, list[np.ndarray],
                                                          np.ndarray | None]:
    """Validate every argument of a ``*_forward``; return layout, initial states, mask."""
    layout = infer_layout(cell, params)
    dtype = params["weight_ih_l0"].dtype
    check_float_array("x", x, ("B", "T", layout.input_size), dtype=dtype)
    B, T, _ = x.shape
    if T == 0 or B == 0:
        raise ValueError(f"x: expected a non-empty batch of sequences (B, T, I) with B, T >= 1, "
                         f"got shape {x.shape}")
    LD, H = layout.num_layers * layout.num_directions, layout.hidden_size
    initial = []
    for name, s in zip(state_names, states):
        if s is None:
            initial.append(np.zeros((LD, B, H), dtype=dtype))
        else:
            initial.append(check_float_array(name, s, (LD, B, H), dtype=dtype))
    lengths = check_lengths(lengths, B, T)
    mask = None if lengths is None or np.all(lengths == T) else np.arange(T) < lengths[:, None]
    check_probability("dropout", dropout)
    if dropout > 0 and layout.num_layers > 1:
        if dropout_masks is None:
            raise ValueError("dropout_masks: dropout > 0 with several layers needs explicit "
                             f"keep-masks (randomness is explicit): a list of "
                             f"{layout.num_layers - 1} boolean arrays of shape "
                             f"({B}, {T}, {layout.num_directions * H})")
        if not isinstance(dropout_masks, (list, tuple)) or \
                len(dropout_masks) != layout.num_layers - 1:
            raise ValueError(f"dropout_masks: expected a list of {layout.num_layers - 1} masks, "
                             f"got {type(dropout_masks).__name__} of length "
                             f"{len(dropout_masks) if hasattr(dropout_masks, '__len__') else '?'}")
        for k, mk in enumerate(dropout_masks):
            if not isinstance(mk, np.ndarray) or mk.dtype != np.bool_:
                raise TypeError(f"dropout_masks[{k}]: expected a boolean numpy.ndarray, "
                                f"got {getattr(mk, 'dtype', type(mk).__name__)}")
            check_shape(f"dropout_masks[{k}]", mk.shape, (B, T, layout.num_directions * H))
    elif dropout_masks is not None and len(dropout_masks) > 0:
        raise ValueError("dropout_masks: given, but no dropout applies here (dropout is 0 or "
                         "there is a single layer); pass dropout=p > 0 with the masks")
    return layout, initial, mask


def stack_forward(cell: Cell, x: np.ndarray, params: dict, layout: Layout,
                  initial: list[np.ndarray], mask: np.ndarray | None, dropout: float,
                  dropout_masks: list | None
                  ) -> tuple[np.ndarray, list[np.ndarray], StackCache]:
    """All layers and directions. ``initial`` holds one (L*D, B, H) array per state part."""
    D = layout.num_directions
    final = [np.empty_like(s) for s in initial]
    caches = []
    layer_in = x
    for k in range(layout.num_layers):
        outs, layer_caches = [], []
        for d in range(D):
            state0 = tuple(s[k * D + d] for s in initial)
            out, state, cache = direction_forward(cell, layer_in, param_names(k, d, layout.bias),
                                                  params, state0, mask, reverse=d == 1)
            for part, value in zip(final, state):
                part[k * D + d] = value
            outs.append(out)
            layer_caches.append(cache)
        caches.append(layer_caches)
        layer_out = np.concatenate(outs, axis=-1) if D == 2 else outs[0]
        if k < layout.num_layers - 1 and dropout > 0:
            layer_out = layer_out * dropout_masks[k] / (1.0 - dropout)
        layer_in = layer_out
    cache = StackCache(cell, layout, params, caches, dropout,
                       list(dropout_masks) if dropout > 0 and layout.num_layers > 1 else None)
    return layer_in, final, cache


def stack_backward(dout: np.ndarray | None, dfinal: Sequence[np.ndarray | None],
                   cache: StackCache) -> tuple[np.ndarray, dict[str, np.ndarray],
                                               list[np.ndarray]]:
    """BPTT through every layer, top down: returns dx, dparams, one dstate0 per state part."""
    layout, cell = cache.layout, cache.cell
    D, H = layout.num_directions, layout.hidden_size
    first = cache.directions[0][0]
    B, T, _ = first.x.shape
    dtype = first.x.dtype
    LD = layout.num_layers * D
    dout = np.zeros((B, T, D * H), dtype=dtype) if dout is None else \
        check_float_array("dout", dout, (B, T, D * H), dtype=dtype)
    dfinal = [np.zeros((LD, B, H), dtype=dtype) if g is None else
              check_float_array(name, g, (LD, B, H), dtype=dtype)
              for g, name in zip(dfinal, ["dh_n", "dc_n"])]
    dinitial = [np.empty((LD, B, H), dtype=dtype) for _ in dfinal]
    dparams: dict[str, np.ndarray] = {}
    d_layer_out = dout
    for k in reversed(range(layout.num_layers)):
        if k < layout.num_layers - 1 and cache.dropout > 0:
            d_layer_out = d_layer_out * cache.dropout_masks[k] / (1.0 - cache.dropout)
        d_layer_in = None
        for d in range(D):
            names = param_names(k, d, layout.bias)
            dstate_n = tuple(g[k * D + d] for g in dfinal)
            dx, grads, dstate0 = direction_backward(cell, d_layer_out[..., d * H:(d + 1) * H],
                                                    dstate_n, names, cache.params,
                                                    cache.directions[k][d])
            d_layer_in = dx if d_layer_in is None else d_layer_in + dx
            dparams.update(grads)
            for part, value in zip(dinitial, dstate0):
                part[k * D + d] = value
        d_layer_out = d_layer_in
    ordered = {name: dparams[name] for name in cache.params}
    return d_layer_out, ordered, dinitial


# --------------------------------------------------------------------------- one cell step

class CellCache(NamedTuple):
    x: np.ndarray       # (B, I)
    h: np.ndarray       # (B, H) previous hidden state
    step: Any           # the cell's own step cache
    params: dict
    cell: Cell


CELL_NAMES = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def check_cell_inputs(cell: Cell, x: object, states: Sequence[object],
                      state_names: Sequence[str], params: object) -> None:
    """Validate a ``*_cell_forward`` call (params under nn.*Cell names)."""
    if not isinstance(params, dict):
        raise TypeError(f"params: expected a dict with keys {CELL_NAMES}, "
                        f"got {type(params).__name__}")
    for name in CELL_NAMES[:2]:
        if name not in params:
            raise ValueError(f"params: missing {name!r}")
    w_ih = check_float_array("params['weight_ih']", params["weight_ih"], ("G*H", "I"))
    if w_ih.shape[0] % cell.gates:
        raise ValueError(f"params['weight_ih']: first dimension must be {cell.gates}*H, "
                         f"got shape {w_ih.shape}")
    GH, I = w_ih.shape
    H = GH // cell.gates
    check_float_array("params['weight_hh']", params["weight_hh"], (GH, H), dtype=w_ih.dtype)
    if ("bias_ih" in params) != ("bias_hh" in params):
        raise ValueError("params: give both 'bias_ih' and 'bias_hh' or neither")
    for name in CELL_NAMES[2:]:
        if name in params:
            check_float_array(f"params[{name!r}]", params[name], (GH,), dtype=w_ih.dtype)
    unexpected = sorted(set(params) - set(CELL_NAMES))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} (expected {CELL_NAMES})")
    check_float_array("x", x, ("B", I), dtype=w_ih.dtype)
    for name, s in zip(state_names, states):
        check_float_array(name, s, (x.shape[0], H), dtype=w_ih.dtype)


def cell_forward(cell: Cell, x: np.ndarray, state: State, params: dict
                 ) -> tuple[State, CellCache]:
    """One step from raw input: xw = W_ih x + b_ih, then the cell's step."""
    xw = x @ params["weight_ih"].T
    if "bias_ih" in params:
        xw = xw + params["bias_ih"]
    new, step = cell.step_forward(xw, state, params["weight_hh"], params.get("bias_hh"))
    return new, CellCache(x, state[0], step, params, cell)


def cell_backward(dstate: State, cache: CellCache
                  ) -> tuple[np.ndarray, State, dict[str, np.ndarray]]:
    """Backward of ``cell_forward``: dx, dstate_prev, dparams (nn.*Cell names)."""
    dxw, dhh, dstate_prev = cache.cell.step_backward(dstate, cache.step, cache.params["weight_hh"])
    names = [n for n in CELL_NAMES if n in cache.params]
    dx, grads = projection_backward(dxw, dhh, cache.x, cache.h, cache.params["weight_ih"], names)
    return dx, dstate_prev, grads


# --------------------------------------------------------------------------- model classes

class RecurrentModule(Module):
    """Shared constructor and bookkeeping of ``RNN``, ``LSTM`` and ``GRU``."""

    cell: Cell

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 dtype: Any = np.float64, seed: int | None = None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.dropout = check_probability("dropout", dropout)
        self.bias = bool(bias)
        self.bidirectional = bool(bidirectional)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.rng = np.random.default_rng(seed)
        layout = Layout(self.input_size, self.hidden_size, self.num_layers,
                        2 if self.bidirectional else 1, self.bias)
        bound = 1.0 / np.sqrt(self.hidden_size)  # torch.nn's init: U(-1/sqrt(H), 1/sqrt(H))
        self.params = {name: self.rng.uniform(-bound, bound, shape).astype(self.dtype)
                       for name, shape in expected_shapes(self.cell, layout).items()}
        self.zero_grad()
        self._cache: StackCache | None = None

    def _masks(self, x: np.ndarray, dropout_masks: list | None) -> tuple[float, list | None]:
        """Dropout rate and masks for this call: none in eval mode, drawn if not given."""
        if not self.training or self.dropout == 0 or self.num_layers == 1:
            return 0.0, None
        if dropout_masks is None:
            D = 2 if self.bidirectional else 1
            shape = (x.shape[0], x.shape[1], D * self.hidden_size)
            dropout_masks = [self.rng.random(shape) >= self.dropout
                             for _ in range(self.num_layers - 1)]
        return self.dropout, dropout_masks

    def _store(self, cache: StackCache) -> None:
        self._cache = cache

    def _take_cache(self) -> StackCache:
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        return cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, dropout={self.dropout}, bidirectional={self.bidirectional}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# ----------------------------------------------------------------------------- decoding

class DecodeStack:
    """One time step of a unidirectional stack for decoding, ``(x (N, I), state) ->
    (h of the top layer (N, H), state')``, state (h,) or (h, c) of (L, N, H) arrays;
    per layer k, the equations of the layers' forward (rnn.py, lstm.py, gru.py) at one step:

        RNN:   h' = act(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)
        LSTM:  [i f g o] = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh,  c' = σ(f) c + σ(i) tanh(g),
               h' = σ(o) tanh(c')
        GRU:   [r z n]_x = x W_ihᵀ + b_ih,  [r z n]_h = h W_hhᵀ + b_hh,  r = σ(r_x + r_h),
               z = σ(z_x + z_h),  n = tanh(n_x + r n_h),  h' = (1 - z) n + z h

    Nothing is validated: a decode session builds it from the model's checked parameters
    (torch.nn names) and calls it with activations it made itself.
    """

    def __init__(self, cell: str, params: dict, num_layers: int) -> None:
        self.cell = cell
        self.layers = [tuple(params.get(f"{name}_l{k}") for name in
                             ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                       for k in range(num_layers)]

    def __call__(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        hs, cs = [], []
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.layers):
            h = state[0][k]
            gx, gh = x @ w_ih.T, h @ w_hh.T
            if b_ih is not None:
                gx, gh = gx + b_ih, gh + b_hh
            H = h.shape[1]
            if self.cell == "gru":
                r = sigmoid(gx[:, :H] + gh[:, :H])
                z = sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
                n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
                x = (1.0 - z) * n + z * h
            elif self.cell == "lstm":
                a = gx + gh
                c = (sigmoid(a[:, H:2 * H]) * state[1][k]
                     + sigmoid(a[:, :H]) * np.tanh(a[:, 2 * H:3 * H]))
                x = sigmoid(a[:, 3 * H:]) * np.tanh(c)
                cs.append(c)
            else:
                a = gx + gh
                x = np.tanh(a) if self.cell == "rnn_tanh" else np.maximum(a, 0.0)
            hs.append(x)
        h_n = np.stack(hs)
        return x, ((h_n, np.stack(cs)) if self.cell == "lstm" else (h_n,))
