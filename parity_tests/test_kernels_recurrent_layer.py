"""The whole-layer recurrent op (torch_impl/kernels/recurrent_layer.py and its native C++ kernel
kernels/cpu/recurrent.cpp): the op contract (opcheck), its registered backward against finite
differences, the path it takes, and inputs a layer hands it in unusual layouts.

The layer-level parity properties (against the float64 reference and torch.nn, every cell kind,
lengths, bidirectional, multi-layer, h0/c0, dropout) run on this kernel in test_recurrent.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

import torch_impl
from torch_impl import recurrent as torch_impl_recurrent
from torch_impl.kernels import kernel_path, native
from torch_impl.kernels import recurrent_layer as krl

from .parity import assert_close
from .tolerances import TORCHNN64_VS_OURS64

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
MODULES = {"rnn_tanh": (torch_impl.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
           "rnn_relu": (torch_impl.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
           "lstm": (torch_impl.LSTM, torch.nn.LSTM, {}), "gru": (torch_impl.GRU, torch.nn.GRU, {})}


def op_inputs(cell: str, T: int = 3, B: int = 3, I: int = 2, H: int = 3, lengths=(3, 1, 2),
              bias: bool = True, dtype=torch.float64, requires_grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = krl.NUM_GATES[cell]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return (cell, rand(T, B, I), rand(G * H, I), rand(G * H, H),
            rand(G * H) if bias else None, rand(G * H) if bias else None, rand(B, H),
            rand(B, H) if cell == "lstm" else None,
            None if lengths is None else torch.tensor(lengths, dtype=torch.int64))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, (3, 1, 2)])
def test_recurrent_layer_op_passes_opcheck(cell: str, reverse: bool, lengths) -> None:
    args = op_inputs(cell, lengths=lengths, requires_grad=True)
    torch.library.opcheck(torch.ops.seqtwin.recurrent_layer, (*args, reverse))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_layer_backward_op_passes_opcheck(cell: str) -> None:
    cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths = op_inputs(cell)
    hs, cs, saved = torch.ops.seqtwin.recurrent_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0,
                                                      lengths, False)
    dout = torch.randn(x.shape[0], x.shape[1], h0.shape[1], dtype=x.dtype)
    dc_rows = torch.randn_like(dout) if cell == "lstm" else None
    torch.library.opcheck(torch.ops.seqtwin.recurrent_layer_backward,
                          (cell, dout, dc_rows, h0, c0, w_hh, hs, cs, saved, lengths, False))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_recurrent_layer_op_backward_matches_finite_differences(cell: str, reverse: bool
                                                                ) -> None:
    """Every input's gradient through every output row (h_t and, for the LSTM, c_t, padded
    steps included: the carried state), against torch's float64 finite differences."""
    cell, *tensors, lengths = op_inputs(cell, T=3, B=2, I=2, H=2, lengths=(3, 1),
                                        requires_grad=True, seed=1)

    inputs = tuple(t for t in tensors if t is not None)  # c0 only for the LSTM

    def layer(*inputs):
        c0 = inputs[6:] or (None,)
        hs, cs, _ = torch.ops.seqtwin.recurrent_layer(cell, *inputs[:6], *c0, lengths, reverse)
        return (hs, cs) if cell == "lstm" else hs
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"forward": 0, "backward": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(torch_impl_recurrent, "layer_forward",
                        counting("forward", torch_impl_recurrent.layer_forward))
    monkeypatch.setattr(torch_impl_recurrent, "layer_backward",
                        counting("backward", torch_impl_recurrent.layer_backward))
    return calls


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_auto_path_runs_the_native_kernel_for_cpu_layers(
        cell: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    ours, _, kwargs = MODULES[cell]
    layer = ours(3, 4, num_layers=2, bidirectional=True, dtype=dtype, **kwargs)
    out, _ = layer(torch.randn(2, 5, 3, dtype=dtype), lengths=torch.tensor([5, 2]))
    out.sum().backward()
    assert calls == {"forward": 4, "backward": 4}, (
        f"the native whole-layer kernel ran {calls} times for 2 layers x 2 directions")


def test_the_torch_path_runs_no_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    with kernel_path("torch"):
        out, _ = torch_impl.LSTM(3, 4)(torch.randn(2, 5, 3))
        out.sum().backward()
    assert calls == {"forward": 0, "backward": 0}


def test_the_native_path_raises_when_the_kernel_is_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(native._modules, "recurrent", None)
    monkeypatch.setattr(native, "_failure", "no C++ compiler ('c++' is not on PATH)")
    with kernel_path("native"), pytest.raises(RuntimeError, match="recurrent.cpp is unavailable"
                                                                 ".*no C\\+\\+ compiler"):
        torch_impl.LSTM(3, 4)(torch.randn(2, 5, 3))


def test_without_a_compiler_the_layers_warn_once_and_run_plain_torch(tmp_path) -> None:
    script = """
import warnings
import torch
import torch_impl
torch.manual_seed(0)
ours, theirs = torch_impl.LSTM(3, 4), torch.nn.LSTM(3, 4, batch_first=True)
theirs.load_state_dict(ours.state_dict())
x = torch.randn(2, 5, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out, _ = ours(x)
native = [w for w in caught if "native CPU kernels unavailable" in str(w.message)]
assert len(native) == 1, [str(w.message) for w in caught]
assert "no C++ compiler" in str(native[0].message), native[0].message
assert torch.allclose(out, theirs(x)[0], atol=1e-6)
print("ok")
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               SEQTWIN_KERNEL_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("cell", CELLS)
def test_native_layers_take_non_contiguous_inputs_and_weights(cell: str) -> None:
    """x as a transposed view and every weight a non-contiguous view: the same results as
    contiguous copies, and torch.nn's."""
    ours_cls, theirs_cls, kwargs = MODULES[cell]
    torch.manual_seed(3)
    theirs = theirs_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                        dtype=torch.float64, **kwargs)
    params = {k: v.detach() for k, v in theirs.state_dict().items()}
    strided = {k: v.t().contiguous().t() if v.dim() == 2 else torch.stack([v, v], 1)[:, 0]
               for k, v in params.items()}
    assert not any(v.is_contiguous() for v in strided.values())
    x = torch.randn(5, 2, 3, dtype=torch.float64).transpose(0, 1)   # (B, T, I), non-contiguous
    forward = getattr(torch_impl, f"{cell.split('_')[0]}_forward")
    extra = {"nonlinearity": kwargs["nonlinearity"]} if "nonlinearity" in kwargs else {}
    with kernel_path("native"):
        (out, _), _ = forward(x, strided, **extra)
        (out_contiguous, _), _ = forward(x.contiguous(), params, **extra)
    assert torch.equal(out, out_contiguous)
    assert_close(out, theirs(x)[0].detach(), TORCHNN64_VS_OURS64.forward, "out")


def test_layer_forward_calls_the_op_when_given_no_module() -> None:
    """The op route (what torch.compile's graph holds) and the direct call agree exactly."""
    cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths = op_inputs("lstm")
    module = native.load("recurrent")
    with mock.patch.object(torch.ops.seqtwin, "recurrent_layer",
                           wraps=torch.ops.seqtwin.recurrent_layer) as op:
        via_op = krl.layer_forward(None, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, True)
    assert op.call_count == 1
    direct = krl.layer_forward(module, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, True)
    for a, b in zip(via_op, direct):
        assert torch.equal(a, b)


def test_step_gemm_rejects_an_unknown_mode() -> None:
    module = native.load("recurrent")
    with pytest.raises(RuntimeError, match="step_gemm"):
        module.set_step_gemm("fast")
    assert module.get_step_gemm() == "auto"


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_float32_activations_saturate_and_match_float64(cell: str) -> None:
    """float32 gates use a polynomial exp and tanh = 2σ(2x) - 1: at pre-activations of ±100
    the states saturate to ±1 without NaN, and on ordinary values they follow float64."""
    module = native.load("recurrent")
    T, B, I, H = 5, 3, 4, 6
    G = krl.NUM_GATES[cell]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64)
    w_ih = torch.randn(G * H, I, generator=generator, dtype=torch.float64)
    w_hh = torch.randn(G * H, H, generator=generator, dtype=torch.float64) * 0.3
    h0 = torch.randn(B, H, generator=generator, dtype=torch.float64).tanh()  # |h| <= 1 throughout
    c0 = torch.randn(B, H, generator=generator, dtype=torch.float64) if cell == "lstm" else None
    for scale in (1.0, 100.0):
        runs = [krl.layer_forward(module, cell, (x * scale).to(dtype), w_ih.to(dtype),
                                  w_hh.to(dtype), None, None, h0.to(dtype),
                                  None if c0 is None else c0.to(dtype), None, False)
                for dtype in (torch.float32, torch.float64)]
        assert torch.isfinite(runs[0].hs).all()
        assert runs[0].hs.abs().max() <= 1.0 + 1e-6
        assert_close(runs[0].hs.double(), runs[1].hs, 1e-5, "hs")
