"""The decode-step kernels (torch_impl/kernels/decode_linear.py, decode_attention.py) on the
torch and native paths: against torch.addmm / F.scaled_dot_product_attention in float64 and
against the float64 result in float32, at the shapes a decode step has (1..40 rows, column
counts with and without a vector tail, masked keys, t = 0), and ``generate`` taking the
native kernels on the auto path (a test fails, never skips, when they cannot be built)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import torch_impl
from torch_impl.kernels import kernel_path, native
from torch_impl.kernels.decode_attention import decode_attention_for
from torch_impl.kernels.decode_linear import decode_linear_for

from .parity import assert_close
from .tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64

PATHS = pytest.mark.parametrize("path", ["torch", "native"])


def budget(dtype: torch.dtype) -> float:
    return TORCH64_VS_REF64.forward if dtype == torch.float64 else TORCH32_VS_REF64.forward


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(M=st.integers(1, 40), K=st.integers(1, 70), N=st.integers(1, 300), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@example(M=1, K=1, N=1, bias=True, seed=0)
@example(M=8, K=256, N=1024, bias=True, seed=1)
@example(M=13, K=5, N=17, bias=False, seed=2)
def test_decode_linear_matches_addmm(path, dtype, M, K, N, bias, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(M, K, generator=g, dtype=torch.float64), \
        torch.randn(K, N, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    expected = x @ weight if b is None else torch.addmm(b, x, weight)
    with kernel_path(path):
        linear = decode_linear_for(weight.to(dtype))
    actual = linear(x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype))
    assert actual.dtype == dtype and actual.shape == (M, N)
    assert_close(actual, expected, budget(dtype), "y")


def attention_inputs(N: int, heads: int, d: int, t: int, masked: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    C = t + 3
    qkv = torch.randn(N, 3 * heads * d, generator=g, dtype=torch.float64)
    keys = torch.randn(N, heads, C, d, generator=g, dtype=torch.float64)
    values = torch.randn(N, heads, C, d, generator=g, dtype=torch.float64)
    valid = None
    if masked:
        valid = torch.rand(N, C, generator=g) < 0.6
        valid[:, t] = True  # the new token's slot always holds a token
    return qkv, keys, values, valid


def sdpa_rows(qkv, keys, values, t, valid):
    """The oracle: the new k, v written at slot t, then F.sdpa over slots 0..t (float64)."""
    N, heads, _, d = keys.shape
    q, k, v = qkv.view(N, 3, heads, 1, d).unbind(1)
    keys, values = keys.clone(), values.clone()
    keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
    mask = None if valid is None else valid[:, None, None, :t + 1]
    a = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1],
                                       attn_mask=mask)
    return a.reshape(N, heads * d), keys, values


@PATHS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(N=st.integers(1, 9), heads=st.integers(1, 4), d=st.integers(1, 40), t=st.integers(0, 30),
       masked=st.booleans(), seed=st.integers(0, 2**16))
@example(N=1, heads=1, d=1, t=0, masked=False, seed=0)
@example(N=4, heads=4, d=64, t=17, masked=True, seed=1)
def test_decode_attention_matches_sdpa_and_writes_the_cache(path, dtype, N, heads, d, t,
                                                            masked, seed) -> None:
    qkv, keys, values, valid = attention_inputs(N, heads, d, t, masked, seed)
    expected, expected_keys, expected_values = sdpa_rows(qkv, keys, values, t, valid)
    keys_d, values_d = keys.to(dtype), values.to(dtype)
    with kernel_path(path):
        attend = decode_attention_for(keys_d)
    actual = attend(qkv.to(dtype), keys_d, values_d, t, valid)
    assert actual.dtype == dtype and actual.shape == (N, heads * d)
    assert_close(actual, expected, budget(dtype), "a")
    assert_close(keys_d, expected_keys, budget(dtype), "keys")      # slot t written,
    assert_close(values_d, expected_values, budget(dtype), "values")  # the rest untouched


class Counting:
    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.calls = module, name, 0

    def __getattr__(self, attribute):
        function = getattr(self.module, attribute)

        def counted(*args):
            self.calls += 1
            return function(*args)
        return counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_generate_runs_the_native_decode_kernels_on_the_auto_path(monkeypatch, dtype) -> None:
    counters = {}
    for name in ("decode_linear", "decode_attention"):
        module = native.load(name)
        assert module is not None, f"{name}.cpp did not build: {native._failure}"
        counters[name] = Counting(module, name)
        monkeypatch.setitem(native._modules, name, counters[name])
    config = torch_impl.GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=8)
    model = torch_impl.GPT(config, dtype=dtype).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with kernel_path("auto"):
        fast = model.generate(prompt, max_new_tokens=5)
    with kernel_path("torch"):
        plain = model.generate(prompt, max_new_tokens=5)
    # 4 steps after the prompt: 2 layers x 4 products + the head per step (+ the prompt's head)
    assert counters["decode_linear"].calls == 4 * (2 * 4 + 1) + 1
    assert counters["decode_attention"].calls == 4 * 2
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
