"""Run one recurrent layer forward and backward, the same way in every backend.

Each runner takes a kind (``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"``, ``"gru"``)
and ``RecurrentInputs`` and returns a ``RecurrentRun``: the forward results
and the gradients of ``L = <out, dout> + Σ <final_k, dfinal_k>`` with respect
to x, every parameter and every initial state. Backends:

- ``reference_functional`` / ``reference_module``: reference/*.py
- ``torch_impl_functional``: the hand-written torch_impl *_forward/*_backward
- ``torch_impl_module``: the torch_impl Module, gradients through autograd
- ``torch_nn``: torch.nn.RNN/LSTM/GRU(batch_first=True) with the same state
  dict; unequal lengths go through pack_padded_sequence(enforce_sorted=False)
  and pad_packed_sequence(total_length=T).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .parity import assert_all_close, assert_close, assert_gradient_close
from .strategies import CellInputs, RecurrentInputs
from .tolerances import FLOAT64_GRADIENT_FLOOR, TORCH64_VS_REF64, Budget


class RecurrentRun(NamedTuple):
    out: Any  # (B, T, D*H)
    finals: tuple  # (h_n,) or (h_n, c_n)
    dx: Any
    dparams: dict[str, Any]
    dstates: tuple  # (dh0,) or (dh0, dc0)


def nonlinearity_kwargs(kind: str) -> dict[str, str]:
    """``{"nonlinearity": "tanh"|"relu"}`` for the RNN kinds, ``{}`` otherwise."""
    return {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}


def _state_kwargs(kind: str, states: tuple) -> dict[str, Any]:
    return dict(zip(("h0", "c0"), states)) if kind == "lstm" else {"h0": states[0]}


def _final_grad_kwargs(kind: str, dfinals: tuple) -> dict[str, Any]:
    return dict(zip(("dh_n", "dc_n"), dfinals)) if kind == "lstm" else {"dh_n": dfinals[0]}


def _split_finals(kind: str, finals: Any) -> tuple:
    return tuple(finals) if kind == "lstm" else (finals,)


# ----------------------------------------------------------------------------- functional

def _file(kind: str) -> str:
    return {"rnn_tanh": "rnn", "rnn_relu": "rnn", "lstm": "lstm", "gru": "gru"}[kind]


def backend_module(backend: str, kind: str) -> Any:
    """``reference.lstm`` / ``torch_impl.gru`` ...: imported on use, so each kind's tests run
    as soon as its file lands."""
    return importlib.import_module(f"{backend}.{_file(kind)}")


def functional_pair(backend: str, kind: str) -> tuple[Callable, Callable]:
    """(``*_forward``, ``*_backward``) of ``kind`` in ``"reference"`` or ``"torch_impl"``."""
    module = backend_module(backend, kind)
    return getattr(module, f"{_file(kind)}_forward"), getattr(module, f"{_file(kind)}_backward")


def cell_pair(backend: str, kind: str) -> tuple[Callable, Callable]:
    """(``*_cell_forward``, ``*_cell_backward``) of ``kind``."""
    module = backend_module(backend, kind)
    return (getattr(module, f"{_file(kind)}_cell_forward"),
            getattr(module, f"{_file(kind)}_cell_backward"))


def torch_nn_class(kind: str) -> type:
    """torch.nn.RNN / LSTM / GRU."""
    return getattr(torch.nn, _file(kind).upper())


def layer_class(backend: str, kind: str) -> type:
    """``RNN`` / ``LSTM`` / ``GRU`` of a backend."""
    return getattr(backend_module(backend, kind), _file(kind).upper())


def run_functional(forward: Callable, backward: Callable, kind: str, x: Any,
                   params: dict[str, Any], states: tuple | None, lengths: Any, dropout: float,
                   masks: list | None, dout: Any, dfinals: tuple | None) -> RecurrentRun:
    """One forward and one backward through a functional pair, in any backend."""
    state_kwargs = {} if states is None else _state_kwargs(kind, states)
    (out, finals), cache = forward(x, params, **state_kwargs, lengths=lengths, dropout=dropout,
                                   dropout_masks=masks, **nonlinearity_kwargs(kind))
    grad_kwargs = {} if dfinals is None else _final_grad_kwargs(kind, dfinals)
    dx, dparams, *dstates = backward(dout, cache, **grad_kwargs)
    return RecurrentRun(out, _split_finals(kind, finals), dx, dparams, tuple(dstates))


def run_backend(backend: str, kind: str, inputs: RecurrentInputs) -> RecurrentRun:
    """float64 functional forward + backward in ``"reference"`` or ``"torch_impl"``."""
    runner = reference_functional if backend == "reference" else torch_impl_functional
    return runner(kind, inputs)


def reference_functional(kind: str, inputs: RecurrentInputs,
                         dtype: np.dtype = np.float64) -> RecurrentRun:
    forward, backward = functional_pair("reference", kind)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return run_functional(
        forward, backward, kind, cast(inputs.x), {k: cast(v) for k, v in inputs.params.items()},
        tuple(cast(s) for s in inputs.states), inputs.lengths, inputs.config.dropout,
        inputs.dropout_masks, cast(inputs.dout), tuple(cast(d) for d in inputs.dfinals))


def to_torch(a: np.ndarray, dtype: torch.dtype = torch.float64,
             device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def _torch_masks(inputs: RecurrentInputs, device: str = "cpu") -> list[torch.Tensor] | None:
    if inputs.dropout_masks is None:
        return None
    return [torch.from_numpy(m).to(device) for m in inputs.dropout_masks]


def _torch_lengths(inputs: RecurrentInputs, device: str = "cpu") -> torch.Tensor | None:
    return None if inputs.lengths is None else torch.from_numpy(inputs.lengths).to(device)


def torch_impl_functional(kind: str, inputs: RecurrentInputs, dtype: torch.dtype = torch.float64,
                          device: str = "cpu", lengths_device: str | None = None
                          ) -> RecurrentRun:
    """The hand-written torch_impl pair; ``lengths_device`` defaults to ``device``."""
    forward, backward = functional_pair("torch_impl", kind)
    cast = lambda a: to_torch(a, dtype, device)  # noqa: E731
    return run_functional(
        forward, backward, kind, cast(inputs.x), {k: cast(v) for k, v in inputs.params.items()},
        tuple(cast(s) for s in inputs.states), _torch_lengths(inputs, lengths_device or device),
        inputs.config.dropout, _torch_masks(inputs, device), cast(inputs.dout),
        tuple(cast(d) for d in inputs.dfinals))


# ----------------------------------------------------------------------------- modules

def _module_args(kind: str, inputs: RecurrentInputs) -> tuple[tuple, dict[str, Any]]:
    c = inputs.config
    kwargs = dict(num_layers=c.num_layers, bias=c.bias, dropout=c.dropout,
                  bidirectional=c.bidirectional, **nonlinearity_kwargs(kind))
    return (c.input_size, c.hidden_size), kwargs


def reference_module(kind: str, inputs: RecurrentInputs) -> RecurrentRun:
    """The reference class: load_state_dict, forward, backward, .grads."""
    cls = layer_class("reference", kind)
    args, kwargs = _module_args(kind, inputs)
    layer = cls(*args, **kwargs, dtype=np.float64, seed=0)
    layer.load_state_dict(inputs.params)
    layer.train()
    out, finals = layer.forward(inputs.x, **_state_kwargs(kind, inputs.states),
                                lengths=inputs.lengths, dropout_masks=inputs.dropout_masks)
    dx, *dstates = layer.backward(inputs.dout, **_final_grad_kwargs(kind, inputs.dfinals))
    return RecurrentRun(out, _split_finals(kind, finals), dx, dict(layer.grads), tuple(dstates))


def _autograd_run(kind: str, inputs: RecurrentInputs, module: torch.nn.Module,
                  call: Callable, dtype: torch.dtype, device: str = "cpu") -> RecurrentRun:
    """Seed L = <out, dout> + Σ <final, dfinal> and take every gradient by autograd."""
    x = to_torch(inputs.x, dtype, device).requires_grad_()
    states = tuple(to_torch(s, dtype, device).requires_grad_() for s in inputs.states)
    out, finals = call(x, states)
    finals = _split_finals(kind, finals)
    loss = (out * to_torch(inputs.dout, dtype, device)).sum()
    for final, dfinal in zip(finals, inputs.dfinals):
        loss = loss + (final * to_torch(dfinal, dtype, device)).sum()
    names = [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *states, *module.parameters()])
    dstates = tuple(grads[1:1 + len(states)])
    return RecurrentRun(out.detach(), tuple(f.detach() for f in finals), grads[0],
                        dict(zip(names, grads[1 + len(states):])), dstates)


def torch_impl_module(kind: str, inputs: RecurrentInputs, dtype: torch.dtype = torch.float64,
                      device: str = "cpu", lengths_device: str | None = None) -> RecurrentRun:
    """The torch_impl Module (custom autograd Function) with the inputs' state dict."""
    cls = layer_class("torch_impl", kind)
    args, kwargs = _module_args(kind, inputs)
    layer = cls(*args, **kwargs, device=device, dtype=dtype)
    layer.load_state_dict({k: to_torch(v, dtype) for k, v in inputs.params.items()})
    layer.train()
    lengths = _torch_lengths(inputs, lengths_device or device)
    masks = _torch_masks(inputs, device)

    def call(x: torch.Tensor, states: tuple) -> tuple:
        return layer(x, **_state_kwargs(kind, states), lengths=lengths, dropout_masks=masks)

    return _autograd_run(kind, inputs, layer, call, dtype, device)


def torch_nn(kind: str, inputs: RecurrentInputs) -> RecurrentRun:
    """torch.nn.RNN/LSTM/GRU(batch_first=True), float64, with the inputs' state dict."""
    c = inputs.config
    if c.dropout:
        raise ValueError("torch.nn draws its own dropout masks: compare without dropout")
    cls = torch_nn_class(kind)
    args, kwargs = _module_args(kind, inputs)
    layer = cls(*args, **kwargs, batch_first=True, dtype=torch.float64)
    layer.load_state_dict({k: to_torch(v) for k, v in inputs.params.items()})

    def call(x: torch.Tensor, states: tuple) -> tuple:
        hx = states if kind == "lstm" else states[0]
        if inputs.lengths is None:
            return layer(x, hx)
        packed = pack_padded_sequence(x, torch.from_numpy(inputs.lengths), batch_first=True,
                                      enforce_sorted=False)
        out, finals = layer(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=c.steps)
        return out, finals

    return _autograd_run(kind, inputs, layer, call, torch.float64)


# ----------------------------------------------------------------------------- cell step

class CellRun(NamedTuple):
    new_states: tuple  # (h_new,) or (h_new, c_new)
    dx: Any
    dstates: tuple  # (dh,) or (dh, dc)
    dparams: dict[str, Any]


def run_cell(backend: str, kind: str, inputs: CellInputs,
             dtype: torch.dtype = torch.float64) -> CellRun:
    """One cell step forward and backward with ``*_cell_forward`` / ``*_cell_backward``."""
    forward, backward = cell_pair(backend, kind)
    cast = (lambda a: a) if backend == "reference" else (lambda a: to_torch(a, dtype))
    x, states = cast(inputs.x), tuple(cast(s) for s in inputs.states)
    params = {k: cast(v) for k, v in inputs.params.items()}
    new, cache = forward(x, *states, params, **nonlinearity_kwargs(kind))
    dx, *dstates, dparams = backward(*(cast(d) for d in inputs.dnew), cache)
    return CellRun(_split_finals(kind, new), dx, tuple(dstates), dparams)


def torch_nn_cell(kind: str, inputs: CellInputs) -> CellRun:
    """torch.nn.RNNCell/LSTMCell/GRUCell in float64, gradients by autograd."""
    c = inputs.config
    cell = getattr(torch.nn, _file(kind).upper() + "Cell")(
        c.input_size, c.hidden_size, bias=c.bias, dtype=torch.float64, **nonlinearity_kwargs(kind))
    cell.load_state_dict({k: to_torch(v) for k, v in inputs.params.items()})
    x = to_torch(inputs.x).requires_grad_()
    states = tuple(to_torch(s).requires_grad_() for s in inputs.states)
    new = _split_finals(kind, cell(x, states if kind == "lstm" else states[0]))
    loss = sum((n * to_torch(d)).sum() for n, d in zip(new, inputs.dnew))
    names = [name for name, _ in cell.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *states, *cell.parameters()])
    return CellRun(tuple(n.detach() for n in new), grads[0], tuple(grads[1:1 + len(states)]),
                   dict(zip(names, grads[1 + len(states):])))


def assert_cell_runs_close(actual: CellRun, expected: CellRun, budget: Budget) -> None:
    for k, (a, b) in enumerate(zip(actual.new_states, expected.new_states, strict=True)):
        assert_close(a, b, budget.forward, ("h_new", "c_new")[k])
    assert_close(actual.dx, expected.dx, budget.gradient, "dx")
    for k, (a, b) in enumerate(zip(actual.dstates, expected.dstates, strict=True)):
        assert_close(a, b, budget.gradient, ("dh", "dc")[k])
    assert_all_close(actual.dparams, expected.dparams, budget.gradient, "d")


# ----------------------------------------------------------------------------- comparison

def assert_runs_close(actual: RecurrentRun, expected: RecurrentRun, budget: Budget,
                      name: str = "") -> None:
    """Every forward tensor within budget.forward, every gradient within budget.gradient; a
    float64 parameter gradient that cancels below FLOAT64_GRADIENT_FLOOR (tolerances.py) to
    budget.gradient × the floor, absolute."""
    assert_close(actual.out, expected.out, budget.forward, f"{name}out")
    for k, (a, b) in enumerate(zip(actual.finals, expected.finals, strict=True)):
        assert_close(a, b, budget.forward, f"{name}{('h_n', 'c_n')[k]}")
    assert_close(actual.dx, expected.dx, budget.gradient, f"{name}dx")
    if set(actual.dparams) != set(expected.dparams):
        raise AssertionError(f"{name}d: parameter keys differ: {sorted(actual.dparams)} vs "
                             f"{sorted(expected.dparams)}")
    floor = FLOAT64_GRADIENT_FLOOR if budget.gradient <= TORCH64_VS_REF64.gradient else 0.0
    for key in sorted(expected.dparams):
        assert_gradient_close(actual.dparams[key], expected.dparams[key], budget.gradient,
                              floor, f"{name}d{key}")
    for k, (a, b) in enumerate(zip(actual.dstates, expected.dstates, strict=True)):
        assert_close(a, b, budget.gradient, f"{name}{('dh0', 'dc0')[k]}")
