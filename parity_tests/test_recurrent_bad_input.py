"""Bad input to the recurrent layers raises ValueError/TypeError naming the argument.

Both backends, all four kinds. Each case starts from one valid call (a 2-layer
bidirectional layer with unequal lengths) and breaks one thing; the error
message must name what was broken (STYLE.md rule 5).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from .recurrent_runners import cell_pair, functional_pair, layer_class, nonlinearity_kwargs
from .strategies import (
    RECURRENT_KINDS,
    CellConfig,
    RecurrentConfig,
    make_cell_inputs,
    make_recurrent_inputs,
)

BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])
KINDS = pytest.mark.parametrize("kind", RECURRENT_KINDS)
VALID = RecurrentConfig(batch=2, steps=3, input_size=2, hidden_size=3, num_layers=2,
                        bidirectional=True, lengths=(3, 2), seed=0)
B, T, I, H, LD = 2, 3, 2, 3, 4


def _to_backend(backend: str, value: Any) -> Any:
    """ndarrays (also inside dicts and lists) become tensors for torch_impl; the rest stays."""
    if backend == "reference":
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _to_backend(backend, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_backend(backend, v) for v in value]
    return value


def _valid_forward_call(kind: str) -> dict[str, Any]:
    inputs = make_recurrent_inputs(kind, VALID)
    call = {"x": inputs.x, "params": dict(inputs.params), "h0": inputs.states[0],
            "lengths": inputs.lengths, "dropout": 0.0, "dropout_masks": None}
    if kind == "lstm":
        call["c0"] = inputs.states[1]
    return call


def _forward(backend: str, kind: str, call: dict[str, Any]) -> Any:
    forward, _ = functional_pair(backend, kind)
    return forward(**_to_backend(backend, call), **nonlinearity_kwargs(kind))


def _with_first(a: np.ndarray, value: float = np.nan) -> np.ndarray:
    a = a.copy()
    a.flat[0] = value
    return a


def _params_edit(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda call: edit(call["params"])


def _masks(p: float, count: int, shape: tuple[int, ...]) -> Callable[[dict], None]:
    return lambda call: call.update(dropout=p, dropout_masks=[np.ones(shape, dtype=bool)] * count)


# (id, edit of a valid forward call, exception, pattern the message must match)
FORWARD_CASES = [
    ("x_not_3d", lambda c: c.update(x=c["x"][:, 0]), ValueError, r"\bx\b"),
    ("x_wrong_feature_size", lambda c: c.update(x=np.concatenate([c["x"], c["x"]], axis=-1)),
     ValueError, r"\bx\b|weight_ih_l0"),
    ("x_not_an_array", lambda c: c.update(x=c["x"].tolist()), TypeError, r"\bx\b"),
    ("x_integer", lambda c: c.update(x=c["x"].astype(np.int64)), TypeError, r"\bx\b"),
    ("x_nan", lambda c: c.update(x=_with_first(c["x"])), ValueError, r"\bx\b"),
    ("x_inf", lambda c: c.update(x=_with_first(c["x"], np.inf)), ValueError, r"\bx\b"),
    ("x_float32_params_float64", lambda c: c.update(x=c["x"].astype(np.float32)), TypeError,
     r"\bx\b|weight_ih_l0"),
    ("h0_wrong_batch", lambda c: c.update(h0=c["h0"][:, :1]), ValueError, r"\bh0\b"),
    ("h0_wrong_layers", lambda c: c.update(h0=c["h0"][:LD - 1]), ValueError, r"\bh0\b"),
    ("h0_2d", lambda c: c.update(h0=c["h0"][0]), ValueError, r"\bh0\b"),
    ("h0_float32", lambda c: c.update(h0=c["h0"].astype(np.float32)), TypeError, r"\bh0\b"),
    ("h0_nan", lambda c: c.update(h0=_with_first(c["h0"])), ValueError, r"\bh0\b"),
    ("lengths_zero", lambda c: c.update(lengths=np.array([3, 0])), ValueError, r"\blengths\b"),
    ("lengths_longer_than_T", lambda c: c.update(lengths=np.array([T + 1, 2])), ValueError,
     r"\blengths\b"),
    ("lengths_wrong_shape", lambda c: c.update(lengths=np.array([3, 2, 1])), ValueError,
     r"\blengths\b"),
    ("lengths_float", lambda c: c.update(lengths=np.array([3.0, 2.0])), TypeError,
     r"\blengths\b"),
    ("param_missing", _params_edit(lambda p: p.pop("weight_hh_l0")), ValueError, "weight_hh_l0"),
    ("param_missing_in_layer_1", _params_edit(lambda p: p.pop("bias_ih_l1_reverse")), ValueError,
     "bias_ih_l1_reverse"),
    ("param_misshapen", _params_edit(lambda p: p.update(weight_hh_l1=p["weight_hh_l1"][:, :-1])),
     ValueError, "weight_hh_l1"),
    ("bias_misshapen", _params_edit(lambda p: p.update(bias_hh_l0=p["bias_hh_l0"][:-1])),
     ValueError, "bias_hh_l0"),
    ("param_float32", _params_edit(lambda p: p.update(
        weight_ih_l1=p["weight_ih_l1"].astype(np.float32))), TypeError, "weight_ih_l1"),
    ("param_nan", _params_edit(lambda p: p.update(weight_hh_l1=_with_first(p["weight_hh_l1"]))),
     ValueError, "weight_hh_l1"),
    ("param_unexpected", _params_edit(lambda p: p.update(weight_ih_l0_extra=p["weight_ih_l0"])),
     ValueError, "weight_ih_l0_extra"),
    ("dropout_without_masks", lambda c: c.update(dropout=0.5), ValueError, r"\bdropout_masks\b"),
    ("dropout_masks_without_dropout", _masks(0.0, 1, (B, T, 2 * H)), ValueError,
     r"\bdropout_masks\b"),
    ("dropout_masks_wrong_count", _masks(0.5, 2, (B, T, 2 * H)), ValueError,
     r"\bdropout_masks\b"),
    ("dropout_mask_wrong_shape", _masks(0.5, 1, (B, T, H)), ValueError, r"\bdropout_masks\b"),
    ("dropout_above_one", lambda c: c.update(dropout=1.5), ValueError, r"\bdropout\b"),
    ("dropout_negative", lambda c: c.update(dropout=-0.1), ValueError, r"\bdropout\b"),
]


@BACKENDS
@KINDS
@pytest.mark.parametrize("edit,error,pattern", [pytest.param(*case[1:], id=case[0])
                                                for case in FORWARD_CASES])
def test_forward_rejects_bad_input_naming_the_argument(backend: str, kind: str, edit: Callable,
                                                       error: type, pattern: str) -> None:
    call = _valid_forward_call(kind)
    _forward(backend, kind, call)  # the unbroken call is valid
    edit(call)
    with pytest.raises(error, match=pattern):
        _forward(backend, kind, call)


LSTM_CASES = [
    ("c0_wrong_batch", lambda c: c.update(c0=c["c0"][:, :1]), ValueError, r"\bc0\b"),
    ("c0_wrong_hidden", lambda c: c.update(c0=c["c0"][..., :1]), ValueError, r"\bc0\b"),
    ("c0_float32", lambda c: c.update(c0=c["c0"].astype(np.float32)), TypeError, r"\bc0\b"),
    ("c0_inf", lambda c: c.update(c0=_with_first(c["c0"], -np.inf)), ValueError, r"\bc0\b"),
]


@BACKENDS
@pytest.mark.parametrize("edit,error,pattern", [pytest.param(*case[1:], id=case[0])
                                                for case in LSTM_CASES])
def test_lstm_forward_rejects_bad_c0_naming_it(backend: str, edit: Callable, error: type,
                                               pattern: str) -> None:
    call = _valid_forward_call("lstm")
    edit(call)
    with pytest.raises(error, match=pattern):
        _forward(backend, "lstm", call)


@BACKENDS
@KINDS
@pytest.mark.parametrize("name,shape", [("dout", (B, T, H)), ("dh_n", (LD, B, H + 1)),
                                        ("dc_n", (LD, B + 1, H))])
def test_backward_rejects_misshapen_upstream_gradient_naming_it(backend: str, kind: str,
                                                                name: str,
                                                                shape: tuple[int, ...]) -> None:
    if name == "dc_n" and kind != "lstm":
        name = "dh_n"
    _, backward = functional_pair(backend, kind)
    _, cache = _forward(backend, kind, _valid_forward_call(kind))
    dout = np.ones(shape) if name == "dout" else None
    dfinal = {} if name == "dout" else {name: np.ones(shape)}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        backward(_to_backend(backend, dout), cache, **_to_backend(backend, dfinal))


# ----------------------------------------------------------------------------- modules

def _module_kwargs(kind: str) -> dict[str, Any]:
    return dict(num_layers=2, bidirectional=True, **nonlinearity_kwargs(kind))


@BACKENDS
@KINDS
def test_module_forward_rejects_x_of_the_wrong_feature_size(backend: str, kind: str) -> None:
    layer = layer_class(backend, kind)(I, H, **_module_kwargs(kind))
    # each backend's default dtype: float64 in reference, torch's default float32 in torch_impl
    x = np.ones((B, T, I + 1)) if backend == "reference" else torch.ones(B, T, I + 1)
    with pytest.raises(ValueError, match=r"\bx\b"):
        layer(x)


@BACKENDS
@KINDS
@pytest.mark.parametrize("arg,value,error", [("hidden_size", 0, ValueError),
                                             ("num_layers", 0, ValueError),
                                             ("input_size", 2.5, TypeError),
                                             ("dropout", 1.5, ValueError)])
def test_module_constructor_rejects_bad_arguments_naming_them(backend: str, kind: str, arg: str,
                                                              value: Any, error: type) -> None:
    kwargs = {"input_size": I, "hidden_size": H, **_module_kwargs(kind), arg: value}
    with pytest.raises(error, match=rf"\b{arg}\b"):
        layer_class(backend, kind)(**kwargs)


@KINDS
@pytest.mark.parametrize("edit,pattern", [
    (lambda sd: sd.pop("weight_hh_l1_reverse"), "weight_hh_l1_reverse"),
    (lambda sd: sd.update(bias_ih_l0=sd["bias_ih_l0"][:-1]), "bias_ih_l0"),
    (lambda sd: sd.update(weight_ih_l1=sd["weight_ih_l1"].T), "weight_ih_l1"),
    (lambda sd: sd.update(weight_ih_l5=sd["weight_ih_l1"]), "weight_ih_l5"),
], ids=["missing", "misshapen_bias", "transposed_weight", "unexpected"])
def test_reference_load_state_dict_rejects_bad_dict_naming_the_key(kind: str, edit: Callable,
                                                                   pattern: str) -> None:
    layer = layer_class("reference", kind)(I, H, **_module_kwargs(kind), seed=0)
    state_dict = layer.state_dict()
    edit(state_dict)
    before = layer.state_dict()
    with pytest.raises(ValueError, match=pattern):
        layer.load_state_dict(state_dict)
    for name, value in before.items():  # nothing changed
        np.testing.assert_array_equal(layer.params[name], value)


# ----------------------------------------------------------------------------- cell step

def _valid_cell_call(kind: str) -> dict[str, Any]:
    inputs = make_cell_inputs(kind, CellConfig(batch=B, input_size=I, hidden_size=H, seed=0))
    call = {"x": inputs.x, "h": inputs.states[0], "params": dict(inputs.params)}
    if kind == "lstm":
        call["c"] = inputs.states[1]
    return call


CELL_CASES = [
    ("x_wrong_feature_size", lambda c: c.update(x=c["x"][:, :1]), ValueError,
     r"\bx\b|weight_ih"),
    ("x_3d", lambda c: c.update(x=c["x"][None]), ValueError, r"\bx\b"),
    ("h_wrong_batch", lambda c: c.update(h=c["h"][:1]), ValueError, r"\bh\b"),
    ("h_float32", lambda c: c.update(h=c["h"].astype(np.float32)), TypeError, r"\bh\b"),
    ("h_nan", lambda c: c.update(h=_with_first(c["h"])), ValueError, r"\bh\b"),
    ("weight_hh_missing", _params_edit(lambda p: p.pop("weight_hh")), ValueError, "weight_hh"),
    ("bias_hh_misshapen", _params_edit(lambda p: p.update(bias_hh=p["bias_hh"][:-1])),
     ValueError, "bias_hh"),
]


@BACKENDS
@KINDS
@pytest.mark.parametrize("edit,error,pattern", [pytest.param(*case[1:], id=case[0])
                                                for case in CELL_CASES])
def test_cell_forward_rejects_bad_input_naming_the_argument(backend: str, kind: str,
                                                            edit: Callable, error: type,
                                                            pattern: str) -> None:
    forward, _ = cell_pair(backend, kind)
    call = _valid_cell_call(kind)
    edit(call)
    with pytest.raises(error, match=pattern):
        forward(**_to_backend(backend, call), **nonlinearity_kwargs(kind))


@BACKENDS
def test_lstm_cell_forward_rejects_misshapen_c_naming_it(backend: str) -> None:
    forward, _ = cell_pair(backend, "lstm")
    call = _valid_cell_call("lstm")
    call["c"] = call["c"][:, :1]
    with pytest.raises(ValueError, match=r"\bc\b"):
        forward(**_to_backend(backend, call))


@BACKENDS
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_dropout_of_one_is_refused_by_both_backends(backend: str, cls: str) -> None:
    """p = 1 would scale the kept activations by 1 / (1 - p) = inf; the twins once disagreed
    (one accepted it)."""
    import reference
    import torch_impl
    package = reference if backend == "reference" else torch_impl
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\)"):
        getattr(package, cls)(2, 3, num_layers=2, dropout=1.0)


@BACKENDS
def test_a_wrong_weight_hh_is_named_itself(backend: str) -> None:
    """The hidden size comes from weight_ih_l0 (4H rows for the LSTM), so a weight_hh_l0 of
    the wrong width is the tensor the error names, in both backends."""
    import reference
    import torch_impl
    rng = np.random.default_rng(0)
    params = {"weight_ih_l0": rng.standard_normal((4 * H, I)),
              "weight_hh_l0": rng.standard_normal((4 * H, H + 1))}
    x = rng.standard_normal((B, T, I))
    if backend == "reference":
        call = lambda: reference.lstm_forward(x, params)  # noqa: E731
    else:
        call = lambda: torch_impl.lstm_forward(  # noqa: E731
            torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in params.items()})
    with pytest.raises(ValueError, match=r"params\['weight_hh_l0'\]: expected shape "
                                         rf"\({4 * H}, {H}\)"):
        call()
