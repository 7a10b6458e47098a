"""seqtwin::flash_attention (torch_impl/kernels/attention.py): every kernel path against
reference (float64, float32; fp16/bf16 on the Triton path), out, dq, dk and dv, with causal
masks (Tq != Tk too) and key padding; rows that see no key; opcheck; torch.compile(fullgraph=True)
on CPU.

Without a GPU the "triton" path runs triton's interpreter (conftest sets TRITON_INTERPRET=1),
with blocks of 16 queries and 16 keys, so that lengths up to 40 cross several key blocks and
the causal boundary falls inside a block.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import torch_impl.attention as tim
import torch_impl.kernels.attention as kat
from parity_tests.kernel_paths import PATHS, TRITON
from parity_tests.parity import assert_close
from parity_tests.strategies import (
    AttentionConfig,
    AttentionInputs,
    MaskConfig,
    attention_configs,
    build_attention_inputs,
    masked_keys,
    to_torch,
)
from parity_tests.test_attention import (
    FLOAT32_CONDITION_LIMIT,
    FLOAT64_CONDITION_LIMIT,
    assert_attention_close,
    float32_exact_attention,
    run_reference_attention,
    run_reference_attention_with_condition,
)
from parity_tests.tolerances import LOWP_CUDA_VS_REF64, TORCH32_VS_REF64, TORCH64_VS_REF64
from torch_impl.kernels import kernel_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_BLOCK = 16  # queries and keys per block in these tests (the smallest tl.dot tile)

# ----------------------------------------------------------------------------- edge cases

ONE_QUERY = AttentionConfig(batch=1, heads=1, tq=1, tk=5, head_dim=16, value_dim=16, seed=1)
CAUSAL_ACROSS_BLOCKS = AttentionConfig(2, 2, 21, 40, 16, 8, MaskConfig(key_padding=True,
                                                                       causal=True, rate=0.2),
                                       seed=4)  # Tq != Tk: 3 key blocks, a shifted diagonal
# Tk = Tq + 1: query 15, the last of block 0, sees key 16, the first of block 1 (the bounds that
# skip blocks wholly in the causal future or past must not be off by one)
DIAGONAL_AT_BLOCK_EDGE = AttentionConfig(1, 2, 20, 21, 8, 8, MaskConfig(causal=True), seed=5)
ALL_KEYS_PADDED = AttentionConfig(2, 2, 3, 18, 4, 3, MaskConfig(key_padding=True, rate=1.0))
# causal with Tq > Tk: rows 0 .. Tq - Tk - 1 see no key; padding takes more rows in some items
SOME_ROWS_MASKED = AttentionConfig(2, 2, 20, 17, 5, 4, MaskConfig(key_padding=True, causal=True,
                                                                  rate=0.5), seed=3)
LARGE_LOGITS = AttentionConfig(2, 2, 5, 18, 1, 3, MaskConfig(causal=True,
                                                             fully_masked_rows=False),
                               magnitude=100.0, seed=11)


@st.composite
def kernel_attention_configs(draw: st.DrawFn) -> AttentionConfig:
    """attention_configs without attn_mask or dropout (the kernel has neither), lengths up to
    40 and head dims up to 20 (past 16, so the padded head dim is 32)."""
    config = draw(attention_configs(max_batch=2, max_len=40, max_heads=2, max_head_dim=20,
                                    dropout=False))
    return config._replace(masks=config.masks._replace(attn_mask="none"))


# ----------------------------------------------------------------------------- runners

def run_kernel(inputs: AttentionInputs, path: str, dtype: torch.dtype):
    """(out, (dq, dk, dv)) of the fused op through autograd, with small blocks."""
    q, k, v = (to_torch(a, dtype).to(DEVICE).requires_grad_()
               for a in (inputs.q, inputs.k, inputs.v))
    padding = inputs.key_padding_mask
    padding = None if padding is None else to_torch(padding).to(DEVICE)
    with (kernel_path(path), mock.patch.object(kat, "BLOCK_Q", SMALL_BLOCK),
          mock.patch.object(kat, "BLOCK_K", SMALL_BLOCK)):
        out = kat.flash_attention(q, k, v, causal=inputs.causal, key_padding_mask=padding,
                                  scale=inputs.config.scale)
        grads = torch.autograd.grad(out, (q, k, v), to_torch(inputs.dout, dtype).to(DEVICE))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return out.detach(), grads


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("path", PATHS)
@given(config=kernel_attention_configs())
@example(config=ONE_QUERY)
@example(config=CAUSAL_ACROSS_BLOCKS)
@example(config=DIAGONAL_AT_BLOCK_EDGE)
@example(config=ALL_KEYS_PADDED)
@example(config=SOME_ROWS_MASKED)
@example(config=LARGE_LOGITS)
def test_flash_attention_kernel_float64_matches_reference(path: str,
                                                          config: AttentionConfig) -> None:
    inputs = build_attention_inputs(config)
    expected = run_reference_attention_with_condition(inputs, FLOAT64_CONDITION_LIMIT)
    assert_attention_close(run_kernel(inputs, path, torch.float64), expected, TORCH64_VS_REF64)


# Large logits are a float64 matter (test_attention: float32 scores near 1e4 have no P within
# the budget).
@pytest.mark.parametrize("path", PATHS)
@given(config=kernel_attention_configs())
@example(config=ONE_QUERY)
@example(config=CAUSAL_ACROSS_BLOCKS)
@example(config=SOME_ROWS_MASKED)
def test_flash_attention_kernel_float32_matches_reference_float64(
        path: str, config: AttentionConfig) -> None:
    inputs = float32_exact_attention(build_attention_inputs(config))
    expected = run_reference_attention_with_condition(inputs, FLOAT32_CONDITION_LIMIT)
    assert_attention_close(run_kernel(inputs, path, torch.float32), expected, TORCH32_VS_REF64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_kernel_float32_matches_reference_float64_at_wide_heads(
        path: str, head_dim: int) -> None:
    config = DIAGONAL_AT_BLOCK_EDGE._replace(head_dim=head_dim, value_dim=head_dim,
                                             masks=MaskConfig(key_padding=True, causal=True))
    inputs = float32_exact_attention(build_attention_inputs(config))
    assert_attention_close(run_kernel(inputs, path, torch.float32),
                           run_reference_attention(inputs), TORCH32_VS_REF64)


# DESIGN.md's bf16/fp16 budget is for CUDA; the interpreter runs the same kernel arithmetic
# (inputs, P and dS rounded to the input dtype, float32 accumulation), so it is held to it too.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", [TRITON])
def test_flash_attention_kernel_low_precision_matches_reference_float64(
        path: str, dtype: torch.dtype) -> None:
    inputs = build_attention_inputs(CAUSAL_ACROSS_BLOCKS._replace(head_dim=32, value_dim=32))
    rounded = {name: to_torch(getattr(inputs, name), dtype).double().numpy()
               for name in ("q", "k", "v", "dout")}
    inputs = inputs._replace(**rounded)
    assert_attention_close(run_kernel(inputs, path, dtype), run_reference_attention(inputs),
                           LOWP_CUDA_VS_REF64)


# ----------------------------------------------------------------------------- masked rows

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config", [ALL_KEYS_PADDED, SOME_ROWS_MASKED], ids=["all", "some"])
def test_rows_that_see_no_key_give_zero_output_and_zero_query_gradient(
        path: str, config: AttentionConfig) -> None:
    inputs = build_attention_inputs(config)
    out, grads = run_kernel(inputs, path, torch.float64)
    out, (dq, dk, dv) = out.cpu().numpy(), (g.cpu().numpy() for g in grads)
    masked = masked_keys((None, inputs.key_padding_mask, inputs.causal), config.tq, config.tk)
    dead = np.broadcast_to(masked.all(axis=-1), out.shape[:3])  # rows that see no key
    assert dead.any() and (dead.all() == (config is ALL_KEYS_PADDED))
    for name, value in (("out", out), ("dq", dq)):
        assert not value[dead].any(), name  # exactly 0, and so no NaN
        assert dead.all() or value[~dead].any(), name
    assert np.isfinite(dk).all() and np.isfinite(dv).all()
    if dead.all():
        assert not dk.any() and not dv.any()


@pytest.mark.parametrize("path", PATHS)
def test_one_key_gives_out_v_and_zero_query_and_key_gradients(path: str) -> None:
    # Tq = Tk = 1: P = 1 whatever q and k, so out = v and dq = dk = 0; D = dout · out and
    # dP = dout · v are one number summed two ways, so allow rounding of the terms' size.
    inputs = build_attention_inputs(AttentionConfig(1, 1, 1, 1, 16, 16, seed=2))
    out, (dq, dk, dv) = run_kernel(inputs, path, torch.float64)
    assert_close(out, inputs.v, TORCH64_VS_REF64.forward, "out")
    assert_close(dv, inputs.dout, TORCH64_VS_REF64.gradient, "dv")
    terms = float(np.abs(inputs.dout).sum() * np.abs(inputs.v).max()
                  * max(np.abs(inputs.q).max(), np.abs(inputs.k).max()))
    for name, grad in (("dq", dq), ("dk", dk)):
        assert float(grad.abs().max()) <= 1e-15 * terms, name


@pytest.mark.parametrize("path", [TRITON])
def test_triton_and_torch_paths_save_the_same_log_sum_exp(path: str) -> None:
    # Either path's forward may feed either path's backward: L (and +inf for dead rows) agree.
    inputs = build_attention_inputs(SOME_ROWS_MASKED)
    q, k, v = (to_torch(a).to(DEVICE) for a in (inputs.q, inputs.k, inputs.v))
    padding = to_torch(inputs.key_padding_mask).to(DEVICE)
    saved = {}
    for name in ("torch", path):
        with (kernel_path(name), mock.patch.object(kat, "BLOCK_Q", SMALL_BLOCK),
              mock.patch.object(kat, "BLOCK_K", SMALL_BLOCK)):
            saved[name] = torch.ops.seqtwin.flash_attention(q, k, v, padding, True, 0.5)
    lse_torch, lse_triton = saved["torch"][1], saved[path][1]
    dead = torch.isinf(lse_torch)
    assert dead.any() and torch.equal(dead, torch.isinf(lse_triton))
    assert bool((lse_triton[dead] > 0).all())
    assert_close(lse_triton[~dead], lse_torch[~dead], TORCH64_VS_REF64.forward, "L")
    assert_close(saved[path][0], saved["torch"][0], TORCH64_VS_REF64.forward, "out")


# ----------------------------------------------------------------------------- one decision

def count_triton_launches(monkeypatch) -> dict:
    """Count the Triton forward and backward launches of kernels/attention.py."""
    launches = {"forward": 0, "backward": 0}
    for kind in launches:
        launch = getattr(kat, f"_flash_attention_{kind}_triton")

        def counted(*args, kind=kind, launch=launch):
            launches[kind] += 1
            return launch(*args)
        monkeypatch.setattr(kat, f"_flash_attention_{kind}_triton", counted)
    return launches


@pytest.mark.parametrize("path", [TRITON])
def test_public_attention_runs_the_triton_kernels_exactly_where_they_fit(path: str,
                                                                       monkeypatch) -> None:
    """The one decision of kernels/attention.py serves every entry point: the functional pair
    and the autograd function run the Triton kernels on causal, padded attention, from
    non-contiguous views as a GPT block passes them, and the torch loop on an attn_mask,
    which the kernels cannot hold; all match the reference."""
    inputs = build_attention_inputs(CAUSAL_ACROSS_BLOCKS)
    expected = run_reference_attention(inputs)
    q, k, v = (to_torch(a).transpose(1, 2).contiguous().transpose(1, 2)
               for a in (inputs.q, inputs.k, inputs.v))
    assert not q.is_contiguous()
    dout = to_torch(inputs.dout)
    kwargs = dict(key_padding_mask=to_torch(inputs.key_padding_mask), causal=inputs.causal,
                  scale=inputs.config.scale)
    launches = count_triton_launches(monkeypatch)
    no_mask = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool)
    with (kernel_path(path), mock.patch.object(kat, "BLOCK_Q", SMALL_BLOCK),
          mock.patch.object(kat, "BLOCK_K", SMALL_BLOCK)):
        for attn_mask, triton_launches in ((None, 1), (no_mask, 0)):
            launches.update(forward=0, backward=0)
            out, cache = tim.scaled_dot_product_attention_forward(q, k, v, attn_mask, **kwargs)
            grads = tim.scaled_dot_product_attention_backward(dout, cache)
            assert_attention_close((out, grads), expected, TORCH64_VS_REF64)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = tim.scaled_dot_product_attention(*leaves, attn_mask, **kwargs)
            grads = torch.autograd.grad(out, leaves, dout)
            assert_attention_close((out.detach(), grads), expected, TORCH64_VS_REF64)
            assert launches == {"forward": 2 * triton_launches, "backward": 2 * triton_launches}


# ----------------------------------------------------------------------------- bad input

def test_flash_attention_names_a_misshapen_key_padding_mask() -> None:
    q = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 5\)"):
        kat.flash_attention(q, torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4),
                            key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("path", [TRITON])
def test_flash_attention_triton_path_names_head_dims_it_cannot_hold(path: str) -> None:
    d = kat.MAX_HEAD_DIM + 1
    q = torch.randn(1, 1, 2, d, device=DEVICE)
    with kernel_path(path), pytest.raises(ValueError, match="head dims up to"):
        kat.flash_attention(q, q, q)


# ----------------------------------------------------------------------------- custom op

def sample_inputs():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, tq, width, dtype=torch.float64, generator=generator)
               for tq, width in ((5, 4), (7, 4), (7, 3)))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    return q, k, v, padding


def test_flash_attention_ops_pass_opcheck() -> None:
    q, k, v, padding = sample_inputs()
    with kernel_path("torch"):
        torch.library.opcheck(torch.ops.seqtwin.flash_attention,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                               padding, True, 0.5))
        out, lse = torch.ops.seqtwin.flash_attention(q.detach(), k.detach(), v.detach(),
                                                     padding, True, 0.5)
        torch.library.opcheck(torch.ops.seqtwin.flash_attention_backward,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out,
                               lse, padding, True, 0.5))
        torch.library.opcheck(torch.ops.seqtwin.flash_attention,
                              (q.detach(), k.detach(), v.detach(), None, False, 0.5))


# aot_eager traces what inductor would (dynamo's graph, the fake and the autograd formula)
# without a C++ build; a graph break would make fullgraph=True raise.
def test_flash_attention_compiles_fullgraph_without_graph_breaks() -> None:
    def loss(q, k, v, padding):
        out = kat.flash_attention(torch.sin(q), k, v, causal=True, key_padding_mask=padding)
        return (out ** 2).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    q, k, v, padding = sample_inputs()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with kernel_path("torch"):
        value = compiled(*leaves, padding)
        grads = torch.autograd.grad(value, leaves)
        value_eager = loss(*leaves, padding)
        grads_eager = torch.autograd.grad(value_eager, leaves)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert_close(value, value_eager, TORCH64_VS_REF64.forward, "loss")
    for name, g, g_eager in zip(("q", "k", "v"), grads, grads_eager):
        assert_close(g, g_eager, TORCH64_VS_REF64.gradient, f"d{name}")
