"""Parity properties of the recurrent layers: RNN (tanh, relu), LSTM and GRU.

Files under test: reference/{rnn,lstm,gru,recurrent}.py and their torch_impl
twins. Every test runs for the four cell kinds. Gradients are those of
``L = <out, dout> + Σ <final, dfinal>`` with random upstream tensors, also at
padded positions (where they must be ignored).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from reference.gradcheck import gradcheck
from torch_impl import recurrent as torch_impl_recurrent
from torch_impl.kernels import kernel_path, native

from .kernel_paths import NEEDS_TRITON
from .parity import assert_all_close, assert_close, to_numpy
from .recurrent_runners import (
    RecurrentRun,
    assert_cell_runs_close,
    assert_runs_close,
    cell_pair,
    functional_pair,
    layer_class,
    nonlinearity_kwargs,
    reference_functional,
    reference_module,
    run_backend,
    run_cell,
    torch_impl_functional,
    torch_impl_module,
    torch_nn,
    torch_nn_cell,
    torch_nn_class,
)
from .strategies import (
    RECURRENT_KINDS,
    CellConfig,
    RecurrentConfig,
    RecurrentInputs,
    away_from_zero,
    cell_configs,
    float32_configs,
    make_cell_inputs,
    make_recurrent_inputs,
    num_states,
    recurrent_configs,
    tiny_recurrent_configs,
)
from .tolerances import (
    FLOAT64_REORDERED,
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)

pytestmark = pytest.mark.parametrize("kind", RECURRENT_KINDS)
BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])


@pytest.fixture
def recurrent_path(request: pytest.FixtureRequest):
    """Run the test on one of the CPU layer paths: the native whole-layer kernel
    (kernels/cpu/recurrent.cpp; a build failure fails the test) or the per-step torch loop."""
    with kernel_path(request.param):
        yield request.param


def both_paths(test):
    """Run a layer property on both CPU paths."""
    test = pytest.mark.parametrize("recurrent_path", ["native", "torch"], indirect=True)(test)
    return pytest.mark.usefixtures("recurrent_path")(test)

# Edge cases every layer property also runs (as @example).
ONE_STEP_ONE_UNIT = RecurrentConfig(batch=1, steps=1, input_size=1, hidden_size=1, seed=1)
LENGTH_ONE_BESIDE_FULL = RecurrentConfig(batch=2, steps=6, input_size=3, hidden_size=4,
                                         num_layers=2, bidirectional=True, lengths=(1, 6), seed=2)
# x and biases scaled by 50: gate pre-activations around ±50, every σ/tanh saturated.
SATURATED = RecurrentConfig(batch=3, steps=5, input_size=4, hidden_size=3, num_layers=2,
                            bidirectional=True, lengths=(5, 2, 4), scale=50.0, seed=3)
SATURATED_CELL = CellConfig(batch=3, input_size=4, hidden_size=3, scale=50.0, seed=3)
# The thorough profile's draw whose dgates cancel (dbias_hh_l0_reverse -1.76e-9 from terms near
# 1e-2): float64 rounding leaves those gradients 1e-9..1e-7 relative (FLOAT64_GRADIENT_FLOOR)
BIAS_GRADIENT_CANCELS = RecurrentConfig(batch=2, steps=1, input_size=30, hidden_size=1,
                                        num_layers=2, bidirectional=True, dropout=0.5, seed=1)
TINY_DROPOUT = RecurrentConfig(batch=2, steps=3, input_size=2, hidden_size=2, num_layers=2,
                               bidirectional=True, lengths=(3, 1), dropout=0.5, seed=4)


def _fd_step(kind: str) -> float:
    """Central-difference step. The truncation error grows as eps², the rounding error as
    eps64 / eps: eps ~ cbrt(eps64) ~ 1e-5 balances them (1e-6 leaves ~3e-10 of rounding noise,
    more than the 1e-6 budget allows on the tiny gradient tensors of these tiny layers). relu is
    not smooth: there the smaller step makes straddling a kink ten times rarer."""
    return 1e-6 if kind == "rnn_relu" else 1e-5


def _state_names(kind: str) -> tuple[str, ...]:
    return ("h0", "c0")[:num_states(kind)]


# ----------------------------------------------------------------------------- finite differences

@given(config=tiny_recurrent_configs(dropout=None))
@example(config=ONE_STEP_ONE_UNIT)
@example(config=TINY_DROPOUT)
def test_reference_backward_matches_finite_differences(kind: str, config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    inputs = inputs._replace(x=away_from_zero(inputs.x),
                             states=tuple(away_from_zero(s) for s in inputs.states))
    forward, _ = functional_pair("reference", kind)
    run = reference_functional(kind, inputs)
    extra = nonlinearity_kwargs(kind)
    names = _state_names(kind)

    def layer(x: np.ndarray, **arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        states = {n: arrays.pop(n) for n in names}
        (out, finals), _ = forward(x, arrays, **states, lengths=inputs.lengths,
                                   dropout=config.dropout, dropout_masks=inputs.dropout_masks,
                                   **extra)
        return (out, *finals) if kind == "lstm" else (out, finals)

    wrt = {"x": inputs.x, **dict(zip(names, inputs.states)), **inputs.params}
    analytic = {"x": run.dx, **dict(zip(names, run.dstates)), **run.dparams}
    gradcheck(layer, wrt, (inputs.dout, *inputs.dfinals), analytic, eps=_fd_step(kind),
              tol=REF_VS_FINITE_DIFF)


@given(config=cell_configs(max_batch=3, max_size=3))
@example(config=CellConfig(batch=1, input_size=1, hidden_size=1, bias=False))
def test_reference_cell_backward_matches_finite_differences(kind: str, config: CellConfig) -> None:
    inputs = make_cell_inputs(kind, config)
    inputs = inputs._replace(x=away_from_zero(inputs.x),
                             states=tuple(away_from_zero(s) for s in inputs.states))
    forward, _ = cell_pair("reference", kind)
    run = run_cell("reference", kind, inputs)
    extra = nonlinearity_kwargs(kind)
    names = ("h", "c")[:num_states(kind)]

    def cell(x: np.ndarray, **arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        states = [arrays.pop(n) for n in names]
        new, _ = forward(x, *states, arrays, **extra)
        return tuple(new) if kind == "lstm" else (new,)

    wrt = {"x": inputs.x, **dict(zip(names, inputs.states)), **inputs.params}
    analytic = {"x": run.dx, **dict(zip(names, run.dstates)), **run.dparams}
    gradcheck(cell, wrt, inputs.dnew, analytic, eps=_fd_step(kind),
              tol=REF_VS_FINITE_DIFF)


# ----------------------------------------------------------------------------- cell step

@given(config=cell_configs())
@example(config=CellConfig(batch=1, input_size=1, hidden_size=1))
@example(config=SATURATED_CELL)
def test_torch_impl_cell_matches_torch_nn_cell(kind: str, config: CellConfig) -> None:
    inputs = make_cell_inputs(kind, config)
    assert_cell_runs_close(run_cell("torch_impl", kind, inputs), torch_nn_cell(kind, inputs),
                           TORCHNN64_VS_OURS64)


# ------------------------------------------------------------------------ torch_impl vs reference

@both_paths
@given(config=recurrent_configs(dropout=None))
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
@example(config=BIAS_GRADIENT_CANCELS)
def test_torch_impl_functional_float64_matches_reference(kind: str,
                                                         config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    assert_runs_close(torch_impl_functional(kind, inputs), reference_functional(kind, inputs),
                      TORCH64_VS_REF64)


@both_paths
@given(config=recurrent_configs(dropout=None))
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
def test_torch_impl_module_float64_matches_reference(kind: str, config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    assert_runs_close(torch_impl_module(kind, inputs), reference_functional(kind, inputs),
                      TORCH64_VS_REF64)


@both_paths
@given(config=float32_configs())
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
def test_torch_impl_functional_float32_matches_reference_float64(
        kind: str, config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    run = torch_impl_functional(kind, inputs, dtype=torch.float32)
    assert run.out.dtype == torch.float32 and run.dx.dtype == torch.float32
    assert_runs_close(run, reference_functional(kind, inputs), TORCH32_VS_REF64)


@both_paths
@given(config=float32_configs())
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
def test_torch_impl_module_float32_matches_reference_float64(
        kind: str, config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    run = torch_impl_module(kind, inputs, dtype=torch.float32)
    assert run.out.dtype == torch.float32 and run.dx.dtype == torch.float32
    assert_runs_close(run, reference_functional(kind, inputs), TORCH32_VS_REF64)


# T·B = 2048 rows: float32 layers reach PACK_MIN_ROWS and multiply by oneDNN-packed weights,
# the backward's packed from W_hhᵀ and W_ihᵀ; the hypothesis configs above are all smaller.
ONEDNN_PACKED = RecurrentConfig(batch=32, steps=64, input_size=5, hidden_size=4, num_layers=2,
                                bidirectional=True, dropout=0.25, seed=5,
                                lengths=tuple(64 - 7 * i % 64 for i in range(32)))  # 1..64


NEEDS_ONEDNN = pytest.mark.skipif(not torch_impl_recurrent._ONEDNN,
                                  reason="needs a torch build with oneDNN")


@NEEDS_ONEDNN
@pytest.mark.parametrize("run_layer", [torch_impl_functional, torch_impl_module])
@pytest.mark.parametrize("recurrent_path", ["torch"], indirect=True)
@pytest.mark.usefixtures("recurrent_path")
def test_torch_impl_float32_on_the_onednn_packed_path_matches_reference(
        kind: str, run_layer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ONEDNN_PACKED.batch * ONEDNN_PACKED.steps >= torch_impl_recurrent.PACK_MIN_ROWS
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed = []

    def counting_reorder(weight: torch.Tensor, rows: int) -> torch.Tensor:
        packed.append(tuple(weight.shape))
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", counting_reorder)
    inputs = make_recurrent_inputs(kind, ONEDNN_PACKED)
    run = run_layer(kind, inputs, dtype=torch.float32)
    # forward W_ih, W_hh and backward W_hhᵀ, W_ihᵀ of each of the 4 directions (layer 0's
    # W_ihᵀ too: the runs ask for dx)
    assert len(packed) == 4 * ONEDNN_PACKED.num_layers * ONEDNN_PACKED.directions
    assert_runs_close(run, reference_functional(kind, inputs), TORCH32_VS_REF64)


@pytest.mark.parametrize("run_layer", [torch_impl_functional, torch_impl_module])
@pytest.mark.parametrize("recurrent_path", ["native"], indirect=True)
@pytest.mark.usefixtures("recurrent_path")
def test_torch_impl_float32_with_packed_weights_on_the_native_path_matches_reference(
        kind: str, run_layer) -> None:
    """The native kernel's float32 products through oneDNN-reordered weights (W_hh forward,
    W_hhᵀ backward), forced on: at the small hidden sizes of these configs its own choice is
    the BLAS, which the other tests take."""
    module = native.load("recurrent")
    assert module.get_step_gemm() == "auto"
    before = module.packings()
    inputs = make_recurrent_inputs(kind, ONEDNN_PACKED)
    module.set_step_gemm("onednn")
    try:
        run = run_layer(kind, inputs, dtype=torch.float32)
    finally:
        module.set_step_gemm("auto")
    if torch.backends.mkldnn.is_available():  # the reordered matmul is oneDNN's
        assert module.packings() - before == 2 * ONEDNN_PACKED.num_layers * \
            ONEDNN_PACKED.directions
    assert_runs_close(run, reference_functional(kind, inputs), TORCH32_VS_REF64)


# ----------------------------------------------------------------------------- torch.nn

@given(config=recurrent_configs())
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
def test_reference_matches_torch_nn_with_unequal_lengths(kind: str,
                                                         config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    expected = torch_nn(kind, inputs)
    assert_runs_close(reference_functional(kind, inputs), expected, TORCHNN64_VS_OURS64)
    assert_runs_close(reference_module(kind, inputs), expected, TORCHNN64_VS_OURS64, "module ")


@both_paths
@given(config=recurrent_configs())
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
def test_torch_impl_matches_torch_nn_with_unequal_lengths(kind: str,
                                                          config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    expected = torch_nn(kind, inputs)
    assert_runs_close(torch_impl_functional(kind, inputs), expected, TORCHNN64_VS_OURS64)
    assert_runs_close(torch_impl_module(kind, inputs), expected, TORCHNN64_VS_OURS64, "module ")


# ----------------------------------------------------------------------------- state dict

@given(config=recurrent_configs(max_batch=1, max_steps=1))
def test_state_dict_round_trips_exactly_through_torch_impl_and_torch_nn(
        kind: str, config: RecurrentConfig) -> None:
    c = config
    args = (c.input_size, c.hidden_size)
    kwargs = dict(num_layers=c.num_layers, bias=c.bias, bidirectional=c.bidirectional,
                  **nonlinearity_kwargs(kind))
    original = layer_class("reference", kind)(*args, **kwargs, seed=c.seed).state_dict()
    twin = layer_class("torch_impl", kind)(*args, **kwargs, dtype=torch.float64)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in original.items()})
    builtin = torch_nn_class(kind)(*args, **kwargs, batch_first=True, dtype=torch.float64)
    builtin.load_state_dict(twin.state_dict())
    back = layer_class("reference", kind)(*args, **kwargs, seed=c.seed + 1)
    back.load_state_dict(builtin.state_dict())

    assert set(original) == set(builtin.state_dict()) == set(twin.state_dict())
    for name, value in original.items():
        assert back.params[name].dtype == np.float64
        np.testing.assert_array_equal(back.params[name], value, err_msg=name)


def test_bias_gradients_are_separate_tensors(kind: str) -> None:
    """The LSTM's and RNN's bias_ih and bias_hh gradients are equal (one sum of dgates
    serves both), but each must be its own tensor, in the functional API's dparams and in
    the module's .grad: an in-place update of one (an optimizer's grad.mul_) must not change
    the other."""
    layer = layer_class("torch_impl", kind)(3, 4, num_layers=2, bidirectional=True,
                                            **nonlinearity_kwargs(kind)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    forward, backward = functional_pair("torch_impl", kind)
    (out, _), cache = forward(x, dict(layer.named_parameters()), **nonlinearity_kwargs(kind))
    dparams = backward(torch.ones_like(out), cache)[1]
    layer(x)[0].sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    for where, g in (("dparams", dparams), (".grad", grads)):
        for name in ("l0", "l1_reverse"):
            g_ih, g_hh = g[f"bias_ih_{name}"], g[f"bias_hh_{name}"]
            assert g_ih.data_ptr() != g_hh.data_ptr(), f"{where} {name}"
            if kind != "gru":
                torch.testing.assert_close(g_ih, g_hh, rtol=0, atol=0)
            before = g_hh.clone()
            g_ih.mul_(2.0)
            torch.testing.assert_close(g_hh, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- invariants

def _rows(inputs: RecurrentInputs, rows: slice | list[int], steps: int | None = None,
          keep_lengths: bool = True) -> RecurrentInputs:
    """The sub-batch ``rows`` (first ``steps`` time steps) as inputs of its own."""
    c = inputs.config
    steps = c.steps if steps is None else steps
    lengths = inputs.lengths[rows] if keep_lengths and inputs.lengths is not None else None
    sub_x = inputs.x[rows, :steps]
    config = c._replace(batch=sub_x.shape[0], steps=steps,
                        lengths=None if lengths is None else tuple(int(n) for n in lengths))
    masks = None if inputs.dropout_masks is None else \
        [m[rows, :steps] for m in inputs.dropout_masks]
    return RecurrentInputs(config, sub_x, inputs.params, tuple(s[:, rows] for s in inputs.states),
                           lengths, masks, inputs.dout[rows, :steps],
                           tuple(d[:, rows] for d in inputs.dfinals))


@both_paths
@BACKENDS
@given(config=recurrent_configs(dropout=None, min_batch=2), cut=st.floats(0.0, 1.0))
@example(config=LENGTH_ONE_BESIDE_FULL, cut=0.5)
def test_splitting_the_batch_in_two_gives_the_same_results(backend: str, kind: str,
                                                           config: RecurrentConfig,
                                                           cut: float) -> None:
    inputs = make_recurrent_inputs(kind, config)
    split = 1 + int(cut * (config.batch - 2))
    whole = run_backend(backend, kind, inputs)
    first = run_backend(backend, kind, _rows(inputs, slice(0, split)))
    second = run_backend(backend, kind, _rows(inputs, slice(split, None)))

    def cat(a: object, b: object, axis: int) -> np.ndarray:
        return np.concatenate([to_numpy(a), to_numpy(b)], axis=axis)

    joined = RecurrentRun(
        cat(first.out, second.out, 0),
        tuple(cat(a, b, 1) for a, b in zip(first.finals, second.finals)),
        cat(first.dx, second.dx, 0),
        {k: to_numpy(first.dparams[k]) + to_numpy(second.dparams[k]) for k in whole.dparams},
        tuple(cat(a, b, 1) for a, b in zip(first.dstates, second.dstates)))
    assert_runs_close(joined, whole, FLOAT64_REORDERED)


@both_paths
@BACKENDS
@given(config=recurrent_configs(dropout=None, max_batch=4))
@example(config=LENGTH_ONE_BESIDE_FULL)
def test_padded_batch_equals_each_sequence_run_alone(backend: str, kind: str,
                                                     config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    whole = run_backend(backend, kind, inputs)
    lengths = inputs.lengths if inputs.lengths is not None else [config.steps] * config.batch
    dparams_sum = {k: 0.0 for k in whole.dparams}
    for b, n in enumerate(int(n) for n in lengths):
        alone = run_backend(backend, kind, _rows(inputs, [b], steps=n, keep_lengths=False))
        assert_close(to_numpy(whole.out)[b, :n], to_numpy(alone.out)[0],
                     FLOAT64_REORDERED.forward, f"out[{b}]")
        assert_close(to_numpy(whole.dx)[b, :n], to_numpy(alone.dx)[0],
                     FLOAT64_REORDERED.gradient, f"dx[{b}]")
        for k, (a, e) in enumerate(zip(whole.finals, alone.finals)):
            assert_close(to_numpy(a)[:, b], to_numpy(e)[:, 0], FLOAT64_REORDERED.forward,
                         f"{('h_n', 'c_n')[k]}[:, {b}]")
        for k, (a, e) in enumerate(zip(whole.dstates, alone.dstates)):
            assert_close(to_numpy(a)[:, b], to_numpy(e)[:, 0], FLOAT64_REORDERED.gradient,
                         f"{('dh0', 'dc0')[k]}[:, {b}]")
        for name in dparams_sum:
            dparams_sum[name] = dparams_sum[name] + to_numpy(alone.dparams[name])
    assert_all_close(whole.dparams, dparams_sum, FLOAT64_REORDERED.gradient, "sum of alone d")


@both_paths
@pytest.mark.parametrize("backend", ["reference", "torch_impl", "torch_impl_module"])
@given(config=recurrent_configs(dropout=None))
@example(config=LENGTH_ONE_BESIDE_FULL)
def test_padded_outputs_and_input_gradients_are_exactly_zero(backend: str, kind: str,
                                                             config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    run = torch_impl_module(kind, inputs) if backend == "torch_impl_module" else \
        run_backend(backend, kind, inputs)
    lengths = inputs.lengths if inputs.lengths is not None else [config.steps] * config.batch
    padded = np.arange(config.steps)[None, :] >= np.asarray(lengths)[:, None]  # (B, T)
    out, dx = to_numpy(run.out), to_numpy(run.dx)
    assert np.all(out[padded] == 0.0), f"out is non-zero at padded (b, t) {np.argwhere(padded)}"
    assert np.all(dx[padded] == 0.0), f"dx is non-zero at padded (b, t) {np.argwhere(padded)}"


# ----------------------------------------------------------------------------- dropout

@both_paths
@given(config=recurrent_configs(dropout=True))
@example(config=TINY_DROPOUT)
def test_torch_impl_matches_reference_with_dropout_masks(kind: str,
                                                         config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    expected = reference_functional(kind, inputs)
    assert_runs_close(torch_impl_functional(kind, inputs), expected, TORCH64_VS_REF64)
    assert_runs_close(torch_impl_module(kind, inputs), expected, TORCH64_VS_REF64, "module ")
    assert_runs_close(reference_module(kind, inputs), expected, TORCH64_VS_REF64, "ref module ")


def _layer_params(params: dict, layer: int) -> dict:
    """Layer ``layer``'s parameters renamed as the single layer 0."""
    renamed = {}
    for name, value in params.items():
        m = re.fullmatch(r"(\w+)_l(\d+)(_reverse)?", name)
        if int(m.group(2)) == layer:
            renamed[f"{m.group(1)}_l0{m.group(3) or ''}"] = value
    return renamed


@both_paths
@BACKENDS
@given(config=recurrent_configs(dropout=True))
@example(config=TINY_DROPOUT)
def test_dropout_equals_running_layer_by_layer_with_the_masks(backend: str, kind: str,
                                                              config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    whole = run_backend(backend, kind, inputs)
    forward, backward = functional_pair(backend, kind)
    wrap = np.asarray if backend == "reference" else torch.from_numpy
    extra = nonlinearity_kwargs(kind)
    names, grad_names = _state_names(kind), ("dh_n", "dc_n")[:num_states(kind)]
    L, D, p = config.num_layers, config.directions, config.dropout
    lengths = None if inputs.lengths is None else wrap(inputs.lengths)
    masks = [wrap(m) for m in inputs.dropout_masks]

    layer_in, caches, finals = wrap(inputs.x), [], []
    for k in range(L):
        params = {n: wrap(v) for n, v in _layer_params(inputs.params, k).items()}
        states = {n: wrap(s[k * D:(k + 1) * D]) for n, s in zip(names, inputs.states)}
        (out, final), cache = forward(layer_in, params, **states, lengths=lengths, **extra)
        caches.append(cache)
        finals.append(final if kind == "lstm" else (final,))
        layer_in = out * masks[k] / (1.0 - p) if k < L - 1 else out
    assert_close(layer_in, whole.out, FLOAT64_REORDERED.forward, "out")
    for j, name in enumerate(("h_n", "c_n")[:num_states(kind)]):
        stacked = np.concatenate([to_numpy(f[j]) for f in finals], axis=0)
        assert_close(stacked, whole.finals[j], FLOAT64_REORDERED.forward, name)

    d_out, dparams, dstates = wrap(inputs.dout), {}, [[] for _ in names]
    for k in reversed(range(L)):
        dfinals = {n: wrap(d[k * D:(k + 1) * D]) for n, d in zip(grad_names, inputs.dfinals)}
        dx, dlayer, *dstate = backward(d_out, caches[k], **dfinals)
        dparams.update({n.replace("_l0", f"_l{k}"): g for n, g in dlayer.items()})
        for j, g in enumerate(dstate):
            dstates[j].insert(0, to_numpy(g))
        d_out = dx * masks[k - 1] / (1.0 - p) if k > 0 else dx
    assert_close(d_out, whole.dx, FLOAT64_REORDERED.gradient, "dx")
    assert_all_close(dparams, whole.dparams, FLOAT64_REORDERED.gradient, "d")
    for j, name in enumerate(("dh0", "dc0")[:num_states(kind)]):
        assert_close(np.concatenate(dstates[j], axis=0), whole.dstates[j],
                     FLOAT64_REORDERED.gradient, name)


# ----------------------------------------------------------------------------- the Triton path

@NEEDS_TRITON
@given(config=recurrent_configs(dropout=None, max_batch=3, max_steps=5, max_size=6,
                                max_layers=2))
@example(config=ONE_STEP_ONE_UNIT)
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
@example(config=TINY_DROPOUT)
def test_torch_impl_on_the_triton_path_matches_reference(kind: str,
                                                         config: RecurrentConfig) -> None:
    """The layers' eager time loops launch the LSTM/GRU step kernels themselves, without the
    ops' dispatch (kernels.use_op), writing into the loops' buffers: float64, functional and
    module, on the CPU under triton's interpreter (conftest; compiled on a GPU). RNN layers
    have no step kernel, so for them the Triton path is the torch path."""
    inputs = make_recurrent_inputs(kind, config)
    expected = reference_functional(kind, inputs)
    with kernel_path("triton"):
        functional = torch_impl_functional(kind, inputs)
        module = torch_impl_module(kind, inputs)
    assert_runs_close(functional, expected, TORCH64_VS_REF64)
    assert_runs_close(module, expected, TORCH64_VS_REF64, "module ")


# ----------------------------------------------------------------------------- CUDA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU recurrent paths)")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("lengths_device", ["cpu", "cuda"])
@given(config=recurrent_configs(dropout=None))
@example(config=LENGTH_ONE_BESIDE_FULL)
@example(config=SATURATED)
def test_torch_impl_float64_on_cuda_matches_reference(kind: str, lengths_device: str,
                                                      config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    expected = reference_functional(kind, inputs)
    functional = torch_impl_functional(kind, inputs, device="cuda", lengths_device=lengths_device)
    module = torch_impl_module(kind, inputs, device="cuda", lengths_device=lengths_device)
    assert functional.out.device.type == module.dx.device.type == "cuda"
    assert_runs_close(functional, expected, TORCH64_VS_REF64)
    assert_runs_close(module, expected, TORCH64_VS_REF64, "module ")


@pytest.mark.gpu
@CUDA
@given(config=float32_configs())
def test_torch_impl_float32_on_cuda_matches_reference_float64(kind: str,
                                                              config: RecurrentConfig) -> None:
    inputs = make_recurrent_inputs(kind, config)
    expected = reference_functional(kind, inputs)
    assert_runs_close(torch_impl_functional(kind, inputs, dtype=torch.float32, device="cuda"),
                      expected, TORCH32_VS_REF64)
    assert_runs_close(torch_impl_module(kind, inputs, dtype=torch.float32, device="cuda"),
                      expected, TORCH32_VS_REF64, "module ")
