"""Shared Hypothesis strategies for the parity suite (STYLE.md rule 9).

Hypothesis draws small *configs* (sizes, layout, lengths, a seed); the arrays
are then built from the seed with NumPy. That keeps draws cheap, makes a
failing example printable in one line, and lets ``@example`` give an edge case
as a plain ``RecurrentConfig`` that works for every cell kind.

Recurrent kinds: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"``, ``"gru"``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

RECURRENT_KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def num_states(kind: str) -> int:
    """2 for LSTM (h, c), 1 otherwise (h)."""
    return 2 if kind == "lstm" else 1


class RecurrentConfig(NamedTuple):
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    lengths: tuple[int, ...] | None = None  # None: every row has length ``steps``
    dropout: float = 0.0  # > 0 only with num_layers > 1; masks are drawn from ``seed``
    scale: float = 1.0  # multiplies x and the biases: 50 saturates every gate
    seed: int = 0

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


class RecurrentInputs(NamedTuple):
    """Everything one forward + backward call needs, float64 NumPy."""
    config: RecurrentConfig
    x: np.ndarray  # (B, T, I)
    params: dict[str, np.ndarray]  # torch.nn names
    states: tuple[np.ndarray, ...]  # (h0,) or (h0, c0), each (L*D, B, H)
    lengths: np.ndarray | None  # int64 (B,)
    dropout_masks: list[np.ndarray] | None  # L-1 bool keep-masks (B, T, D*H)
    dout: np.ndarray  # (B, T, D*H) upstream gradient, non-zero at padded positions too
    dfinals: tuple[np.ndarray, ...]  # (dh_n,) or (dh_n, dc_n)


class CellConfig(NamedTuple):
    batch: int
    input_size: int
    hidden_size: int
    bias: bool = True
    scale: float = 1.0  # multiplies x and the biases: ~50 saturates every gate
    seed: int = 0


class CellInputs(NamedTuple):
    config: CellConfig
    x: np.ndarray  # (B, I)
    states: tuple[np.ndarray, ...]  # (h,) or (h, c), each (B, H)
    params: dict[str, np.ndarray]  # nn.*Cell names
    dnew: tuple[np.ndarray, ...]  # (dh_new,) or (dh_new, dc_new)


@st.composite
def recurrent_configs(draw: st.DrawFn, max_batch: int = 8, max_steps: int = 24,
                      max_size: int = 32, max_layers: int = 3, dropout: bool | None = False,
                      min_batch: int = 1, min_hidden: int = 1, max_dropout: float = 0.9
                      ) -> RecurrentConfig:
    """Layer configs: unequal lengths or none, bias or not, one or two directions.

    ``dropout=True`` forces ``num_layers >= 2`` and a dropout probability in
    [0.05, max_dropout] with explicit masks; ``False`` means no dropout; ``None``
    draws which of the two.
    """
    if dropout is None:
        dropout = draw(st.booleans())
    batch = draw(st.integers(min_batch, max_batch))
    steps = draw(st.integers(1, max_steps))
    input_size = draw(st.integers(1, max_size))
    hidden_size = draw(st.integers(min_hidden, max_size))
    num_layers = draw(st.integers(2 if dropout else 1, max(max_layers, 2 if dropout else 1)))
    bidirectional = draw(st.booleans())
    bias = draw(st.booleans())
    # Unequal lengths are the harder case: draw them two times in three.
    lengths = None
    if draw(st.integers(0, 2)) > 0:
        lengths = tuple(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
    p = draw(st.floats(0.05, max_dropout)) if dropout else 0.0
    seed = draw(st.integers(0, 2**32 - 1))
    return RecurrentConfig(batch, steps, input_size, hidden_size, num_layers, bidirectional,
                           bias, lengths, p, 1.0, seed)


def float32_configs() -> st.SearchStrategy[RecurrentConfig]:
    """Configs whose float32 gradients are well conditioned enough for a 1e-4 budget.

    At a saturated gate σ'(a) = σ(1 - σ) and tanh'(a) = 1 - tanh² are differences of nearly
    equal float32 numbers (torch.nn computes them the same way), so their relative error is
    ~eps32 / σ'(a); and with hidden_size 1 a gradient tensor has one or two elements, each a sum
    of B*T terms that can cancel. Either makes a whole tensor miss the budget with no bug
    anywhere (seen: hidden 1, input 24 -> 8e-4; hidden 1, dropout 0.75 -> 5e-4). So: x and biases
    scaled so the x-part of a pre-activation (variance ~ I / (3 H) under torch's init) has
    variance <= 1, dropout <= 0.5 (1/(1-p) scales the next layer's input), hidden >= 4 so each
    tensor mixes several units. Saturation and hidden 1 are covered in float64.
    """
    return recurrent_configs(dropout=None, min_hidden=4, max_dropout=0.5).map(
        lambda c: c._replace(scale=min(1.0, float(np.sqrt(3 * c.hidden_size / c.input_size)))))


def tiny_recurrent_configs(dropout: bool | None = False) -> st.SearchStrategy[RecurrentConfig]:
    """Configs small enough for central finite differences (2 forwards per element).

    dropout <= 0.5: 1/(1-p) scales the next layer's input, and at p = 0.875 a one-unit layer
    saturates to tanh' ~ 1e-9, a gradient below the differences' rounding noise (seen).
    """
    return recurrent_configs(max_batch=3, max_steps=4, max_size=3, max_layers=2,
                             dropout=dropout, max_dropout=0.5)


def away_from_zero(a: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """``a`` with every entry moved ``margin`` further from zero, keeping its sign.

    For finite differences: their absolute noise is ~eps64 |L| / eps ~ 1e-10, so a weight
    gradient whose every term is scaled by a near-zero input (dW_ih = Σ da x^T with one valid
    step and x = -0.004, seen) falls below 1e-4 in norm and misses the 1e-6 relative budget
    with no bug anywhere.
    """
    return np.where(a < 0, a - margin, a + margin)


def cell_configs(max_batch: int = 8, max_size: int = 32) -> st.SearchStrategy[CellConfig]:
    """One cell step: sizes, bias or not, a seed."""
    return st.builds(CellConfig, batch=st.integers(1, max_batch),
                     input_size=st.integers(1, max_size), hidden_size=st.integers(1, max_size),
                     bias=st.booleans(), scale=st.just(1.0), seed=st.integers(0, 2**32 - 1))


def param_shapes(kind: str, config: RecurrentConfig) -> dict[str, tuple[int, ...]]:
    """The torch.nn parameter names and shapes of a layer (spec: Params dict keys)."""
    gh, h = GATES[kind] * config.hidden_size, config.hidden_size
    shapes = {}
    for k in range(config.num_layers):
        in_k = config.input_size if k == 0 else config.directions * h
        for s in ("", "_reverse")[:config.directions]:
            shapes[f"weight_ih_l{k}{s}"] = (gh, in_k)
            shapes[f"weight_hh_l{k}{s}"] = (gh, h)
            if config.bias:
                shapes[f"bias_ih_l{k}{s}"] = (gh,)
                shapes[f"bias_hh_l{k}{s}"] = (gh,)
    return shapes


def make_recurrent_inputs(kind: str, config: RecurrentConfig) -> RecurrentInputs:
    """Deterministic float64 inputs for ``config``: torch-like init, non-zero biases,
    random initial states, random upstream gradients on out and final states."""
    rng = np.random.default_rng(config.seed)
    c = config
    bound = 1.0 / np.sqrt(c.hidden_size)
    params = {}
    for name, shape in param_shapes(kind, c).items():
        value = rng.uniform(-bound, bound, shape)
        if name.startswith("bias"):
            # Keep every bias clearly away from zero so a dropped bias term shows.
            value = np.sign(value + 1e-300) * (0.1 + np.abs(value)) * c.scale
        params[name] = value
    x = rng.standard_normal((c.batch, c.steps, c.input_size)) * c.scale
    state_shape = (c.num_layers * c.directions, c.batch, c.hidden_size)
    states = tuple(rng.standard_normal(state_shape) * 0.5 for _ in range(num_states(kind)))
    lengths = None if c.lengths is None else np.asarray(c.lengths, dtype=np.int64)
    masks = None
    if c.dropout > 0:
        masks = [rng.random((c.batch, c.steps, c.directions * c.hidden_size)) >= c.dropout
                 for _ in range(c.num_layers - 1)]
    dout = rng.standard_normal((c.batch, c.steps, c.directions * c.hidden_size))
    dfinals = tuple(rng.standard_normal(state_shape) for _ in range(num_states(kind)))
    return RecurrentInputs(c, x, params, states, lengths, masks, dout, dfinals)


def make_cell_inputs(kind: str, config: CellConfig) -> CellInputs:
    """Deterministic float64 inputs for one cell step (names of nn.RNNCell/LSTMCell/GRUCell)."""
    c = config
    rng = np.random.default_rng(c.seed)
    gh = GATES[kind] * c.hidden_size
    bound = 1.0 / np.sqrt(c.hidden_size)
    params = {"weight_ih": rng.uniform(-bound, bound, (gh, c.input_size)),
              "weight_hh": rng.uniform(-bound, bound, (gh, c.hidden_size))}
    if c.bias:
        for name in ("bias_ih", "bias_hh"):
            value = rng.uniform(-bound, bound, (gh,))
            params[name] = np.sign(value + 1e-300) * (0.1 + np.abs(value)) * c.scale
    x = rng.standard_normal((c.batch, c.input_size)) * c.scale
    shape = (c.batch, c.hidden_size)
    states = tuple(rng.standard_normal(shape) * 0.5 for _ in range(num_states(kind)))
    dnew = tuple(rng.standard_normal(shape) for _ in range(num_states(kind)))
    return CellInputs(c, x, states, params, dnew)
