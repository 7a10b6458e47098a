"""Multi-layer, bidirectional, variable-length recurrence over one cell step.

A cell (RNN, LSTM or GRU; see rnn.py, lstm.py, gru.py) is a step that maps the
input projection of one time step and the previous state s = (h,) or (h, c) to
the next state (the LSTM and GRU steps' pointwise work is one fused op each,
kernels/lstm_step.py and kernels/gru_step.py). This file runs that step over
time, directions and layers the way torch.nn does, and runs its backward:

    xw_t  = W_ih x_t + b_ih                 for all t in one matmul, before the loop
    s_t   = step(xw_t, s_{t-1}; W_hh, b_hh, active_t)
    out_t = h_t                             forward direction: t = 0 .. T-1, out[..., :H]
                                            reverse direction: t = T-1 .. 0, out[..., H:]
    x^{k+1} = out^k ⊙ mask_k / (1 - p)      input of layer k+1 (inter-layer dropout)

Padding (t >= lengths[b]): row b is not active at step t; it skips the step,
s_t = s_{t-1} (the step itself carries it, fused with the step's pointwise work)
and out_t = 0, so h_n is the state at each sequence's own last step and the
reverse direction starts at t = lengths[b] - 1 from h0.

The backward runs the loops in reverse. Per step the cell's backward gives
dgates_x = ∂L/∂(W_ih x_t + b_ih) and dgates_h = ∂L/∂(W_hh h_{t-1} + b_hh); they
are stacked over time so that each weight gradient is one matmul after the loop:

    dW_ih = Σ_t dgates_x_tᵀ x_t      dW_hh = Σ_t dgates_h_tᵀ h_{t-1}
    db_ih = Σ_t dgates_x_t           db_hh = Σ_t dgates_h_t
    dx_t  = dgates_x_t W_ih

Also here: the parameter layout (torch.nn names, inferred and validated from a
params dict), the validation shared by the three layers, and the nn.Module base.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .checks import (
    _tracing,
    check_finite_tensors,
    check_float_tensor,
    check_lengths,
    check_positive_int,
    check_probability,
    check_shape,
    shape_str,
)
from .kernels import native_kernels
from .kernels.recurrent_layer import (
    LayerOutputs,
    final_of,
    h_of,
    h_prev_of,
    layer_backward,
    layer_forward,
)

SUFFIXES = ("", "_reverse")  # direction d = 0 (forward), 1 (reverse)
_KEY = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?")


class Cell(NamedTuple):
    """One recurrent cell step, written once per cell type and driven by this file."""
    num_gates: int           # G: W_ih is (G*H, I)
    num_states: int          # 1 for (h,), 2 for (h, c)
    # (xw, state, w_hh, b_hh, active, h_out) -> (state_new, step_cache); w_hh: Linear of W_hh;
    # active (B,) bool or None: inactive rows (padding) carry their state; h_t is written into
    # h_out (B, H) when it is not None
    step: Callable
    # (dstate_new, step_cache, w_hh_t, dgates_x_out, dgates_h_out) -> (dgates_x, dgates_h,
    # dstate); w_hh_t: Linear of W_hhᵀ; inactive rows get dgates 0 and pass dstate_new
    # through; dgates are written into the outs (B, G*H) when they are not None (dgates_h_out
    # only where separate_dgates_h)
    step_backward: Callable
    separate_dgates_h: bool  # GRU's r ⊙ (W_hn h + b_hn) makes dgates_h differ from dgates_x
    name: str                # the whole-layer op's cell: "rnn_tanh", "rnn_relu", "lstm", "gru"


# ----------------------------------------------------------------------------- matrix products

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PACK_MIN_ROWS = 2048  # rows through one weight (all its uses) from which packing it pays


class Linear(NamedTuple):
    """a ↦ add + a Wᵀ for one weight W (N, K) of a layer's loops, a (M, K).

    ``packed`` is oneDNN's blocked copy of W for M-row inputs, made once per layer call for
    float32 CPU layers in eager mode: oneDNN's matmul with packed weights beats the BLAS
    addmm on small-M products, and the T products of a time loop share one packing.
    Elsewhere it is None (addmm). W may be a transposed view (the backward's W_hhᵀ, W_ihᵀ):
    addmm reads it in place; the packing is given a contiguous copy, which oneDNN packs
    faster than it reorders a transposed view. Packing pays only when enough rows go
    through the packed weight: it is done when ``uses * rows`` (T B for the time loop's
    products and for the input products alike) reaches PACK_MIN_ROWS (the measurements
    behind the threshold: benchmarks/results/amd-epyc-2core/README.md).
    """
    weight: Tensor          # W (N, K)
    packed: Tensor | None

    @staticmethod
    def of(weight: Tensor, rows: int, uses: int = 1) -> Linear:
        """W for ``uses`` products of ``rows`` rows each."""
        if (_ONEDNN and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and uses * rows >= PACK_MIN_ROWS and not torch.compiler.is_compiling()):
            reorder = torch.ops.mkldnn._reorder_linear_weight
            return Linear(weight, reorder(weight.contiguous(), rows))
        return Linear(weight, None)

    def __call__(self, a: Tensor, add: Tensor | None = None) -> Tensor:
        """add + a Wᵀ; add (N,) (a bias) or (M, N) or None."""
        if self.packed is None:
            return a @ self.weight.t() if add is None else torch.addmm(add, a, self.weight.t())
        linear = torch.ops.mkldnn._linear_pointwise
        if add is None or add.dim() == 1:
            return linear(a, self.packed, add, "none", [], "")
        return linear.binary(a, add.contiguous(), self.packed, None, "add")


# ----------------------------------------------------------------------------- layout

class Layout(NamedTuple):
    num_layers: int      # L
    num_directions: int  # D
    input_size: int      # I = I_0
    hidden_size: int     # H
    bias: bool


def param_keys(num_layers: int, num_directions: int, bias: bool) -> list[str]:
    """torch.nn's parameter names in its flat order: layer, direction, w_ih, w_hh, b_ih, b_hh."""
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
    return [f"{name}_l{k}{suffix}" for k in range(num_layers)
            for suffix in SUFFIXES[:num_directions] for name in names]


def param_shapes(layout: Layout, num_gates: int) -> dict[str, tuple[int, ...]]:
    """{key: shape}: W_ih (G*H, I_k), W_hh (G*H, H), biases (G*H,); I_k = D*H for k > 0."""
    L, D, I, H, _ = layout
    shapes = {}
    for key in param_keys(L, D, layout.bias):
        kind, which, k, _ = _KEY.fullmatch(key).groups()
        if kind == "bias":
            shapes[key] = (num_gates * H,)
        else:
            shapes[key] = (num_gates * H, (I if k == "0" else D * H) if which == "ih" else H)
    return shapes


def infer_layout(params: Mapping[str, Tensor], num_gates: int, dtype: torch.dtype) -> Layout:
    """Read L, D, I, H and bias off a params dict keyed by torch.nn names, and validate it.

    H comes from weight_hh_l0 (G*H, H), I from weight_ih_l0 (G*H, I); every expected
    tensor must then be present with its exact shape and ``dtype``.
    """
    signature = _params_signature(params, num_gates, dtype)
    layout = _LAYOUTS.get(signature) if signature is not None else None
    if layout is not None:
        return layout
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    parsed = []
    for key in params:
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(f"params: unexpected key {key!r} (expected torch.nn names such as "
                             f"'weight_ih_l0', 'bias_hh_l1_reverse')")
        parsed.append(match.groups())
    for key in ("weight_ih_l0", "weight_hh_l0"):
        if key not in params:
            raise ValueError(f"params: missing key {key!r}")
    w_ih = check_float_tensor("params['weight_ih_l0']", params["weight_ih_l0"],
                              (f"{num_gates}*H", "I"), dtype=dtype, finite=False)
    check_float_tensor("params['weight_hh_l0']", params["weight_hh_l0"],
                       (f"{num_gates}*H", "H"), dtype=dtype, finite=False)
    if w_ih.shape[0] == 0 or w_ih.shape[0] % num_gates:
        raise ValueError(f"params['weight_ih_l0']: expected shape ({num_gates}*H, I) with "
                         f"H >= 1, got {shape_str(tuple(w_ih.shape))}")
    # H from weight_ih_l0, as the reference: a wrong weight_hh_l0 is then the one named
    layout = Layout(num_layers=1 + max(int(k) for _, _, k, _ in parsed),
                    num_directions=2 if any(rev for _, _, _, rev in parsed) else 1,
                    input_size=w_ih.shape[1], hidden_size=w_ih.shape[0] // num_gates,
                    bias=any(kind == "bias" for kind, _, _, _ in parsed))
    for key, shape in param_shapes(layout, num_gates).items():
        if key not in params:
            raise ValueError(f"params: missing key {key!r} (expected shape {shape_str(shape)})")
        check_float_tensor(f"params[{key!r}]", params[key], shape, dtype=dtype, finite=False)
    if signature is not None and len(_LAYOUTS) < 1024:
        _LAYOUTS[signature] = layout
    return layout


# Layouts of params dicts that passed infer_layout, by their keys, shapes and dtypes: a layer
# called again with the same weights skips the per-key parsing and checks (~25 us a call).
_LAYOUTS: dict[tuple, Layout] = {}


def _params_signature(params: object, num_gates: int, dtype: torch.dtype) -> tuple | None:
    """What infer_layout's verdict depends on, hashable; None where it cannot be cached
    (not a dict of tensors, or shapes that are symbolic under torch.compile)."""
    if not isinstance(params, dict) or _tracing():
        return None
    entries = []
    for key, p in params.items():
        if type(p) is not nn.Parameter and type(p) is not Tensor:
            return None
        entries.append((key, p.shape, p.dtype))
    return (num_gates, dtype, tuple(entries))


# ----------------------------------------------------------------------------- validation

class RecurrentArgs(NamedTuple):
    """Validated inputs of a sequence forward."""
    layout: Layout
    states0: tuple[Tensor, ...]        # h0 (, c0), each (L*D, B, H), zeros where None was given
    valid: Tensor | None               # (T, B) bool, t < lengths[b]; None: no lengths
    lengths: Tensor | None             # (B,) int64 on x's device
    dropout: float
    dropout_masks: list[Tensor] | None  # L-1 bool keep-masks (B, T, D*H)


def check_recurrent_args(x: Tensor, params: Mapping[str, Tensor], num_gates: int,
                         states0: Mapping[str, Tensor | None], lengths: Tensor | None,
                         dropout: float, dropout_masks: Sequence[Tensor] | None) -> RecurrentArgs:
    """Validate the arguments of rnn/lstm/gru_forward; ``states0`` maps "h0" (, "c0") to tensors."""
    check_float_tensor("x", x, ("B", "T", "I"), finite=False)
    layout = infer_layout(params, num_gates, x.dtype)
    B, T, _ = x.shape
    L, D, I, H, _ = layout
    check_shape("x", x.shape, ("B", "T", I))
    if B == 0 or T == 0:
        raise ValueError(f"x: expected a non-empty batch of sequences (B, T, I) with B, T >= 1, "
                         f"got shape {shape_str(tuple(x.shape))}")
    states = []
    for name, s0 in states0.items():
        if s0 is None:
            states.append(x.new_zeros(L * D, B, H))
        else:
            states.append(check_float_tensor(name, s0, (L * D, B, H), dtype=x.dtype,
                                             finite=False))
    # NaN/inf in x, the given states or any weight: one read back for all of them
    check_finite_tensors([("x", x), *((name, s0) for name, s0 in states0.items()
                                      if s0 is not None),
                          *((f"params[{key!r}]", p) for key, p in params.items())])
    lengths = check_lengths(lengths, B, T)
    valid = None
    # masked whenever lengths are given, even all T: deciding by their values would read them
    # (a device sync, and a graph break under torch.compile)
    if lengths is not None:
        lengths = lengths.to(x.device).contiguous()
        valid = torch.arange(T, device=x.device)[:, None] < lengths[None, :]
    dropout = check_probability("dropout", dropout)
    masks = _check_dropout_masks(dropout_masks, dropout, L, (B, T, D * H), x.device)
    return RecurrentArgs(layout, tuple(states), valid, lengths, dropout, masks)


def _check_dropout_masks(masks: Sequence[Tensor] | None, dropout: float, num_layers: int,
                         shape: tuple[int, int, int], device: torch.device) -> list[Tensor] | None:
    def expected() -> str:  # built only to raise: under torch.compile T may be symbolic
        return f"a list of {num_layers - 1} bool keep-masks of shape {shape_str(shape)}"
    if dropout == 0 or num_layers == 1:
        if masks is not None and not (isinstance(masks, (list, tuple)) and len(masks) == 0):
            raise ValueError("dropout_masks: given, but no dropout applies here (dropout is 0 or "
                             "there is a single layer); pass dropout=p > 0 with the masks")
        return None
    if masks is None:
        raise ValueError(f"dropout_masks: required when dropout > 0 and num_layers > 1 "
                         f"(randomness is explicit): expected {expected()}")
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"dropout_masks: expected {expected()}, got {type(masks).__name__}")
    if len(masks) != num_layers - 1:
        raise ValueError(f"dropout_masks: expected {expected()}, got {len(masks)} masks")
    for j, mask in enumerate(masks):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"dropout_masks[{j}]: expected a bool tensor, "
                            f"got {getattr(mask, 'dtype', type(mask).__name__)}")
        check_shape(f"dropout_masks[{j}]", mask.shape, shape)
    return [mask.to(device) for mask in masks]


def check_upstream(name: str, grad: Tensor | None, shape: tuple[int, ...],
                   dtype: torch.dtype) -> None:
    """An upstream gradient of a backward: None (zeros) or a tensor of the output's shape."""
    if grad is not None:
        check_float_tensor(name, grad, shape, dtype=dtype)


def check_sequence_upstream(cache: RecurrentCache, dout: Tensor | None,
                            dstates_n: Mapping[str, Tensor | None]) -> None:
    """dout (B, T, D*H) and dh_n (, dc_n) (L*D, B, H) of a sequence backward, each may be None."""
    if not isinstance(cache, RecurrentCache):
        raise TypeError(f"cache: expected the RecurrentCache returned by the forward, "
                        f"got {type(cache).__name__}")
    L, D, _, H, _ = cache.layout
    T, B, _ = cache.inputs[0].shape
    dtype = cache.out_dtype
    check_upstream("dout", dout, (B, T, D * H), dtype)
    for name, ds in dstates_n.items():
        check_upstream(name, ds, (L * D, B, H), dtype)


# ----------------------------------------------------------------------------- sequence
# Inside the loops tensors are time-major, (T, B, ·): xw[t], dgates[t] and the stacked states
# are contiguous, and x, h_{t-1} and dgates flatten to (T*B, ·) for the weight gradients.

class DirectionCache(NamedTuple):
    steps: list          # steps[t]: the cell's step cache at time t
    h_prev: Tensor       # (T, B, H) h_{t-1}, the state entering step t, for dW_hh


class RecurrentCache(NamedTuple):
    cell: Cell
    params: Mapping[str, Tensor]
    layout: Layout
    inputs: list[Tensor]            # inputs[k]: x^k (T, B, I_k), layer k's input after dropout
    directions: list  # index k*D + d: DirectionCache, or LayerOutputs of the native kernel
    valid: Tensor | None            # (T, B) t < lengths[b]
    lengths: Tensor | None          # (B,) int64
    dropout_masks: list[Tensor] | None
    dropout_scale: float            # 1 / (1 - p), 0 when p == 1
    out_dtype: torch.dtype          # the caller's dtype; the cache holds the compute dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 layers compute in float32 (as cuDNN accumulates): T steps of rounding in the
    state would otherwise compound, and the gradients are sums of cancelling terms."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@torch.no_grad()
def recurrent_forward(cell: Cell, x: Tensor, params: Mapping[str, Tensor], args: RecurrentArgs
                      ) -> tuple[tuple[Tensor, tuple[Tensor, ...]], RecurrentCache]:
    """out (B, T, D*H) and the final states, each (L*D, B, H), over all layers and directions."""
    L, D, _, H, bias = args.layout
    B, T, _ = x.shape
    scale = 0.0 if args.dropout == 1 else 1.0 / (1.0 - args.dropout)
    out_dtype, compute = x.dtype, compute_dtype(x.dtype)
    if compute != out_dtype:
        x = x.to(compute)
        params = {key: p.to(compute) for key, p in params.items()}
        args = args._replace(states0=tuple(s0.to(compute) for s0 in args.states0))
    inputs, directions = [], []
    finals = [[] for _ in range(cell.num_states)]
    layer_input = x.transpose(0, 1).contiguous()  # (T, B, I)
    native, module = native_path(x)
    for k in range(L):
        hs = []
        for d in range(D):
            s = SUFFIXES[d]
            b_ih, b_hh = (params[f"bias_ih_l{k}{s}"], params[f"bias_hh_l{k}{s}"]) if bias \
                else (None, None)
            if native:  # the whole time loop in one native call
                outputs = layer_forward(module, cell.name, layer_input,
                                        params[f"weight_ih_l{k}{s}"],
                                        params[f"weight_hh_l{k}{s}"], b_ih, b_hh,
                                        *(s0[k * D + d] for s0 in args.states0),
                                        *((None,) if cell.num_states == 1 else ()),
                                        args.lengths, d == 1)
                hs.append(h_of(outputs, d == 1))
                directions.append(outputs)
                for final, states in zip(finals, (outputs.hs, outputs.cs)):
                    final.append(final_of(states, d == 1))
                continue
            w_ih = Linear.of(params[f"weight_ih_l{k}{s}"], T * B)
            xw = w_ih(layer_input.view(T * B, -1), b_ih).view(T, B, -1)  # one matmul for all t
            state0 = tuple(s0[k * D + d] for s0 in args.states0)
            w_hh = Linear.of(params[f"weight_hh_l{k}{s}"], B, uses=T)
            state, h, cache = _direction_forward(cell, xw, state0, w_hh, b_hh, args.valid,
                                                 reverse=d == 1)
            hs.append(h)
            directions.append(cache)
            for final, s_n in zip(finals, state):
                final.append(s_n)
        out = hs[0] if D == 1 else torch.cat(hs, dim=-1)  # (T, B, D*H)
        if args.valid is not None:
            out = out * args.valid.unsqueeze(-1)  # out_t = 0 at padding, where h_t is carried
        inputs.append(layer_input)
        layer_input = out
        if k < L - 1 and args.dropout_masks is not None:
            layer_input = out * args.dropout_masks[k].transpose(0, 1) * scale
    states_n = tuple(torch.stack(final).to(out_dtype) for final in finals)
    cache = RecurrentCache(cell, params, args.layout, inputs, directions, args.valid,
                           args.lengths, args.dropout_masks, scale, out_dtype)
    return (out.transpose(0, 1).to(out_dtype, memory_format=torch.contiguous_format),
            states_n), cache


@torch.compiler.assume_constant_result
def _native_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the native whole-layer kernel runs on such tensors (fixed when compiled)."""
    return native_kernels("recurrent", torch.empty(0, device=device_type, dtype=dtype)) \
        is not None


def native_path(x: Tensor):
    """(whether a layer on x runs the native whole-layer kernel, the extension to call in
    eager mode or None to go through the op, as torch.compile does)."""
    if torch.compiler.is_compiling():
        return _native_runs(x.device.type, x.dtype), None
    module = native_kernels("recurrent", x)
    return module is not None, module


def _direction_forward(cell: Cell, xw: Tensor, state: tuple[Tensor, ...], w_hh: Linear,
                       b_hh: Tensor | None, valid: Tensor | None, reverse: bool
                       ) -> tuple[tuple[Tensor, ...], Tensor, DirectionCache]:
    """One direction of one layer over time: (final state, h (T, B, H), cache).

    The steps write h into one (T+1, B, H) buffer in the order they run, h0 first, so that
    h (T, B, H) and h_prev (T, B, H) are two overlapping views of it, never stacked.
    """
    if torch.compiler.is_compiling():
        return _direction_forward_functional(cell, xw, state, w_hh, b_hh, valid, reverse)
    T = xw.shape[0]
    hs = xw.new_empty(T + 1, *state[0].shape)
    steps = [None] * T
    # forward: hs[t] = h_{t-1}, hs[t+1] = h_t; reverse: hs[t+1] = h_{t+1}, hs[t] = h_t
    h_new = 0 if reverse else 1
    hs[T if reverse else 0] = state[0]
    state = (hs[T if reverse else 0],) + state[1:]
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        state, steps[t] = cell.step(xw[t], state, w_hh, b_hh,
                                    None if valid is None else valid[t], hs[t + h_new])
    h, h_prev = (hs[:T], hs[1:]) if reverse else (hs[1:], hs[:T])
    return state, h, DirectionCache(steps, h_prev)


# Under torch.compile the loops write no rows into shared buffers: functionalization turns each
# row write into a copy of the whole buffer (select_scatter), O(T²) memory traffic, wherever the
# backend does not turn it back into an in-place write (aot_eager, "cudagraphs" do not;
# inductor does). The rows are stacked once after the loop instead.

def _direction_forward_functional(cell: Cell, xw: Tensor, state: tuple[Tensor, ...],
                                  w_hh: Linear, b_hh: Tensor | None, valid: Tensor | None,
                                  reverse: bool
                                  ) -> tuple[tuple[Tensor, ...], Tensor, DirectionCache]:
    """_direction_forward for torch.compile: the h_t stacked after the loop."""
    T = xw.shape[0]
    h0 = state[0]
    hs, steps = [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        state, steps[t] = cell.step(xw[t], state, w_hh, b_hh, None if valid is None else valid[t])
        hs[t] = state[0]
    h = torch.stack(hs)
    # h_prev[t] is the state entering step t: h_{t-1} (forward), h_{t+1} (reverse), h0 first
    h_prev = torch.cat([h[1:], h0[None]]) if reverse else torch.cat([h0[None], h[:-1]])
    return state, h, DirectionCache(steps, h_prev)


@torch.no_grad()
def recurrent_backward(cache: RecurrentCache, dout: Tensor | None,
                       dstates_n: Sequence[Tensor | None], need_dx: bool = True
                       ) -> tuple[Tensor | None, dict[str, Tensor], tuple[Tensor, ...]]:
    """(dx, dparams, dstates0) from dout (B, T, D*H) and dstates_n, each (L*D, B, H) or None.

    ``need_dx=False`` skips the last matmul dx = dgates_x W_ih of layer 0 and returns None.
    """
    cell, params = cache.cell, cache.params
    L, D, _, H, bias = cache.layout
    x = cache.inputs[0]
    T, B, _ = x.shape
    if x.dtype != cache.out_dtype:
        dout = None if dout is None else dout.to(x.dtype)
        dstates_n = [None if ds is None else ds.to(x.dtype) for ds in dstates_n]
    dparams = {}
    # dstates0[j][k*D + d]: filled layer by layer from the top, stacked at the end
    dstates0 = [[None] * (L * D) for _ in range(cell.num_states)]
    dlayer_out = None if dout is None else dout.transpose(0, 1)  # (T, B, D*H)
    native = isinstance(cache.directions[0], LayerOutputs)
    module = native_path(x)[1] if native else None
    dx = None
    for k in range(L - 1, -1, -1):
        layer_input = cache.inputs[k].view(T * B, -1)
        if native and dlayer_out is not None and cache.valid is not None:
            # out_t = h_t ⊙ [t < lengths[b]]: masked once, the kernel reads the view in place
            dlayer_out = torch.where(cache.valid.unsqueeze(-1), dlayer_out, 0.0)
        dx = None
        for d in range(D):
            s = SUFFIXES[d]
            i = k * D + d
            w_ih, w_hh = params[f"weight_ih_l{k}{s}"], params[f"weight_hh_l{k}{s}"]
            dout_d = None if dlayer_out is None else dlayer_out[..., d * H:(d + 1) * H]
            if native:
                outputs = cache.directions[i]
                dgates_x, dgates_h, *dstate0 = layer_backward(
                    module, cell.name, dout_d, *(None if ds is None else ds[i]
                                                 for ds in dstates_n),
                    *((None,) if cell.num_states == 1 else ()), w_hh, outputs, cache.lengths,
                    d == 1)
                dstate0 = dstate0[:cell.num_states]
                h_prev = h_prev_of(outputs, d == 1)
            else:
                dstate = tuple(x.new_zeros(B, H) if ds is None else ds[i] for ds in dstates_n)
                dgates_x, dgates_h, dstate0 = _direction_backward(
                    cell, dout_d, dstate, cache.directions[i], Linear.of(w_hh.t(), B, uses=T),
                    cache.valid, d == 1)
                h_prev = cache.directions[i].h_prev
            for ds0, ds in zip(dstates0, dstate0):
                ds0[i] = ds
            dgates_x, dgates_h = dgates_x.view(T * B, -1), dgates_h.view(T * B, -1)
            # Weight gradients wait until after the time loop: one (G*H, T*B) @ (T*B, ·) matmul.
            dparams[f"weight_ih_l{k}{s}"] = dgates_x.t() @ layer_input
            dparams[f"weight_hh_l{k}{s}"] = dgates_h.t() @ h_prev.reshape(T * B, H)
            if bias:
                db = dparams[f"bias_ih_l{k}{s}"] = dgates_x.sum(0)
                # one sum where dgates_h is dgates_x (RNN, LSTM); a copy, so that no two
                # parameters' .grad alias one tensor
                dparams[f"bias_hh_l{k}{s}"] = (dgates_h.sum(0) if cell.separate_dgates_h
                                               else db.clone())
            if k > 0 or need_dx:
                dx_d = Linear.of(w_ih.t(), T * B)(dgates_x).view(T, B, -1)
                dx = dx_d if dx is None else dx + dx_d
        dlayer_out = dx
        if k > 0 and cache.dropout_masks is not None:
            dlayer_out = dx * cache.dropout_masks[k - 1].transpose(0, 1) * cache.dropout_scale
    to_out = cache.out_dtype
    dparams = {key: dparams[key].to(to_out) for key in params}
    if dx is not None:
        dx = dx.transpose(0, 1).to(to_out, memory_format=torch.contiguous_format)
    return dx, dparams, tuple(torch.stack(d).to(to_out) for d in dstates0)


def _direction_backward(cell: Cell, dout: Tensor | None, dstate: tuple[Tensor, ...],
                        cache: DirectionCache, w_hh_t: Linear, valid: Tensor | None,
                        reverse: bool) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(dgates_x, dgates_h) each (T, B, G*H), and the gradient of the initial state."""
    T, B, H = cache.h_prev.shape
    if dout is not None and valid is not None:
        dout = torch.where(valid.unsqueeze(-1), dout, 0.0)  # out_t = h_t ⊙ [t < lengths[b]]
    order = range(T) if reverse else range(T - 1, -1, -1)
    if torch.compiler.is_compiling():  # stacked after the loop (see _direction_forward_functional)
        rows_x, rows_h = [None] * T, [None] * T
        for t in order:
            dstate_new = dstate if dout is None else (dstate[0] + dout[t],) + dstate[1:]
            rows_x[t], rows_h[t], dstate = cell.step_backward(dstate_new, cache.steps[t], w_hh_t)
        dgates_x = torch.stack(rows_x)
        return dgates_x, torch.stack(rows_h) if cell.separate_dgates_h else dgates_x, dstate
    # the steps write their dgates into rows of (T, B, G*H) buffers: no stacking after the loop
    dgates_x = dstate[0].new_empty(T, B, cell.num_gates * H)
    dgates_h = torch.empty_like(dgates_x) if cell.separate_dgates_h else dgates_x
    for t in order:
        dstate_new = dstate if dout is None else (dstate[0] + dout[t],) + dstate[1:]
        _, _, dstate = cell.step_backward(dstate_new, cache.steps[t], w_hh_t, dgates_x[t],
                                          dgates_h[t] if cell.separate_dgates_h else None)
    return dgates_x, dgates_h, dstate


# ----------------------------------------------------------------------------- cell step

class CellCache(NamedTuple):
    cell: Cell
    x: Tensor           # (B, I)
    h_prev: Tensor      # (B, H)
    step: NamedTuple    # the cell's step cache
    weight_ih: Tensor   # (G*H, I)
    weight_hh: Tensor   # (G*H, H)
    bias: bool


def check_cell_args(x: Tensor, states: Mapping[str, Tensor], params: Mapping[str, Tensor],
                    num_gates: int) -> bool:
    """Validate a cell step's x (B, I), states (B, H) and nn.*Cell params; return whether biased."""
    check_float_tensor("x", x, ("B", "I"))
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict with keys weight_ih, weight_hh[, bias_ih, "
                        f"bias_hh], got {type(params).__name__}")
    unexpected = set(params) - {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    if unexpected:
        raise ValueError(f"params: unexpected key {min(unexpected, key=str)!r} (expected "
                         f"weight_ih, weight_hh, bias_ih, bias_hh)")
    if "weight_hh" not in params:
        raise ValueError("params: missing key 'weight_hh'")
    w_hh = check_float_tensor("params['weight_hh']", params["weight_hh"],
                              (f"{num_gates}*H", "H"), dtype=x.dtype, finite=False)
    B, I = x.shape
    H = w_hh.shape[1]
    bias = "bias_ih" in params or "bias_hh" in params
    shapes = {"weight_ih": (num_gates * H, I), "weight_hh": (num_gates * H, H)}
    if bias:
        shapes.update(bias_ih=(num_gates * H,), bias_hh=(num_gates * H,))
    for key, shape in shapes.items():
        if key not in params:
            raise ValueError(f"params: missing key {key!r} (expected shape {shape_str(shape)})")
        check_float_tensor(f"params[{key!r}]", params[key], shape, dtype=x.dtype)
    for name, state in states.items():
        check_float_tensor(name, state, (B, H), dtype=x.dtype)
    return bias


@torch.no_grad()
def cell_forward(cell: Cell, x: Tensor, state: tuple[Tensor, ...], params: Mapping[str, Tensor],
                 bias: bool) -> tuple[tuple[Tensor, ...], CellCache]:
    """One step: xw = W_ih x + b_ih, then the cell's step from ``state``."""
    xw = F.linear(x, params["weight_ih"], params["bias_ih"] if bias else None)
    state_new, step = cell.step(xw, state, Linear(params["weight_hh"], None),
                                params["bias_hh"] if bias else None, None)
    return state_new, CellCache(cell, x, state[0], step, params["weight_ih"], params["weight_hh"],
                                bias)


@torch.no_grad()
def cell_backward(dstate_new: Sequence[Tensor | None], cache: CellCache
                  ) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Tensor]]:
    """(dx, dstate, dparams) of one step; None upstream gradients are zeros."""
    dstate_new = tuple(torch.zeros_like(cache.h_prev) if ds is None else ds for ds in dstate_new)
    dgates_x, dgates_h, dstate = cache.cell.step_backward(dstate_new, cache.step,
                                                          Linear(cache.weight_hh.t(), None))
    dparams = {"weight_ih": dgates_x.t() @ cache.x, "weight_hh": dgates_h.t() @ cache.h_prev}
    if cache.bias:
        dparams.update(bias_ih=dgates_x.sum(0), bias_hh=dgates_h.sum(0))
    return dgates_x @ cache.weight_ih, dstate, dparams


# ----------------------------------------------------------------------------- autograd

class RecurrentFunction(torch.autograd.Function):
    """(out, *states_n) = the layer of ``cell`` over x with the hand-written backward above:
    (out, h_n) for the RNN and the GRU, (out, h_n, c_n) for the LSTM.

    apply(cell, x, h0, c0, lengths, dropout, dropout_masks, keys, *weights), where weights[j]
    is params[keys[j]]; h0, c0 may be None (c0 always, but for the LSTM); lengths and masks
    get no gradient.
    """

    @staticmethod
    def forward(ctx, cell, x, h0, c0, lengths, dropout, dropout_masks, keys, *weights):
        names = {"h0": h0} if cell.num_states == 1 else {"h0": h0, "c0": c0}
        params = dict(zip(keys, weights))
        args = check_recurrent_args(x, params, cell.num_gates, names, lengths, dropout,
                                    dropout_masks)
        (out, states_n), cache = recurrent_forward(cell, x, params, args)
        ctx.save_for_backward(x, h0, c0, *weights)  # version-counter checks on the inputs
        ctx.cache = cache
        ctx.keys = keys
        ctx.set_materialize_grads(False)
        return (out, *states_n)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dstates_n):
        _ = ctx.saved_tensors  # raises if an input was modified in place since forward
        need = ctx.needs_input_grad
        dx, dparams, dstates0 = recurrent_backward(ctx.cache, dout, dstates_n, need_dx=need[1])
        dweights = [dparams[key] if n else None for key, n in zip(ctx.keys, need[8:])]
        dh0 = dstates0[0] if need[2] else None
        dc0 = dstates0[1] if len(dstates0) > 1 and need[3] else None
        return (None, dx if need[1] else None, dh0, dc0, None, None, None, None, *dweights)


# ----------------------------------------------------------------------------- module

class RecurrentModule(nn.Module):
    """torch.nn-compatible parameters, init and dropout handling shared by RNN, LSTM, GRU.

    Parameters are registered under torch.nn's names, so ``state_dict()`` loads into
    ``torch.nn.LSTM(..., batch_first=True)`` (and back) without renaming. Init is
    torch's: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)).
    """
    num_gates: int

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.dropout = check_probability("dropout", dropout)
        self.bidirectional = bool(bidirectional)
        layout = Layout(self.num_layers, 2 if bidirectional else 1, self.input_size,
                        self.hidden_size, self.bias)
        for key, shape in param_shapes(layout, self.num_gates).items():
            self.register_parameter(key, nn.Parameter(torch.empty(shape, device=device,
                                                                  dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def param_keys(self) -> list[str]:
        return param_keys(self.num_layers, 2 if self.bidirectional else 1, self.bias)

    def _dropout_args(self, x: Tensor, dropout_masks: Sequence[Tensor] | None
                      ) -> tuple[float, Sequence[Tensor] | None]:
        """Dropout is on in training mode only; without masks, draw Bernoulli(1 - p) keep-masks.

        In eval mode, or where no dropout applies (p == 0 or one layer), masks are ignored.
        """
        if not self.training or self.dropout == 0 or self.num_layers == 1:
            return 0.0, None
        if dropout_masks is None:
            check_float_tensor("x", x, ("B", "T", self.input_size), finite=False)
            shape = (x.shape[0], x.shape[1], (2 if self.bidirectional else 1) * self.hidden_size)
            dropout_masks = [torch.empty(shape, device=x.device).bernoulli_(1.0 - self.dropout)
                             .bool() for _ in range(self.num_layers - 1)]
        return self.dropout, dropout_masks

    def _apply_layer(self, cell: Cell, x: Tensor, h0: Tensor | None, c0: Tensor | None,
                     lengths: Tensor | None, dropout_masks: Sequence[Tensor] | None
                     ) -> tuple[Tensor, ...]:
        """(out, *states_n) through RecurrentFunction with this module's parameters."""
        dropout, dropout_masks = self._dropout_args(x, dropout_masks)
        keys = self.param_keys()
        return RecurrentFunction.apply(cell, x, h0, c0, lengths, dropout, dropout_masks,
                                       tuple(keys), *(getattr(self, key) for key in keys))

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text


# ----------------------------------------------------------------------------- decoding

class DecodeStack:
    """One time step of a unidirectional stack for decoding, ``(x (N, I), state) ->
    (h of the top layer (N, H), state')``, state (h,) or (h, c) of (L, N, H) tensors.

    A straight line of ops with the weights laid out once for few-row products
    (kernels/decode_linear.py streams each weight once per step): per layer ``k``

        RNN:   h' = act([x; h] W_kᵀ + b_ih + b_hh)            W_k = [W_ih | W_hh]
        LSTM:  [i f g o] = [x; h] W_kᵀ + b_ih + b_hh,  c' = σ(f) c + σ(i) tanh(g),
               h' = σ(o) tanh(c')
        GRU:   [r z n]_x = x W_ihᵀ + b_ih,  [r z n]_h = h W_hhᵀ + b_hh,  r = σ(r_x + r_h),
               z = σ(z_x + z_h),  n = tanh(n_x + r n_h),  h' = (1 - z) n + z h

    the equations of the layers' forward (rnn.py, lstm.py, gru.py) for one step, with the
    sums in another order (equal within rounding). Nothing is validated: a decode session
    builds it from the model's checked parameters (torch.nn names) and calls it with
    activations it made itself.
    """

    def __init__(self, cell: str, params: Mapping[str, Tensor], num_layers: int) -> None:
        from .kernels.decode_linear import decode_linear_for

        self.cell, self.num_layers = cell, num_layers
        self.linear = decode_linear_for(params["weight_hh_l0"])
        self.layers = []
        for k in range(num_layers):
            w_ih, w_hh = (params[f"weight_{w}_l{k}"].detach() for w in ("ih", "hh"))
            b_ih, b_hh = (params.get(f"bias_{w}_l{k}") for w in ("ih", "hh"))
            b_ih = None if b_ih is None else b_ih.detach().contiguous()
            b_hh = None if b_hh is None else b_hh.detach().contiguous()
            if cell == "gru":
                self.layers.append((w_ih.t().contiguous(), b_ih, w_hh.t().contiguous(), b_hh))
            else:
                bias = None if b_ih is None else (b_ih + b_hh).contiguous()
                self.layers.append((torch.cat([w_ih, w_hh], dim=1).t().contiguous(), bias))

    def __call__(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple]:
        linear, cell = self.linear, self.cell
        hs, cs = [], []
        for k, w in enumerate(self.layers):
            h = state[0][k]
            if cell == "gru":
                gx, gh = linear(x, w[0], w[1]), linear(h, w[2], w[3])
                H = h.shape[1]
                rz = torch.sigmoid(gx[:, :2 * H] + gh[:, :2 * H])
                r, z = rz[:, :H], rz[:, H:]
                n = torch.tanh(torch.addcmul(gx[:, 2 * H:], r, gh[:, 2 * H:]))
                x = torch.lerp(n, h, z)                       # (1 - z) n + z h
            else:
                a = linear(torch.cat([x, h], dim=1), w[0], w[1])
                if cell == "lstm":
                    i, f, g, o = a.chunk(4, dim=1)
                    c = torch.addcmul(torch.sigmoid(f) * state[1][k], torch.sigmoid(i),
                                      torch.tanh(g))
                    x = torch.sigmoid(o) * torch.tanh(c)
                    cs.append(c)
                else:
                    x = torch.tanh(a) if cell == "rnn_tanh" else torch.relu(a)
            hs.append(x)
        h_n = torch.stack(hs)
        return x, ((h_n, torch.stack(cs)) if cell == "lstm" else (h_n,))
