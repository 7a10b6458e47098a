"""Attention: scaled dot-product and multi-head, forward and every gradient.

Reference vs finite differences; torch_impl (float64, float32) vs reference; outside oracles
F.scaled_dot_product_attention and torch.nn.MultiheadAttention; fully masked rows; logits of
1e4; the torch_impl Function never saving a (Tq, Tk) tensor; state dicts; bad input.
"""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import reference.attention as ref
import torch_impl.attention as tim
import torch_impl.kernels.attention as kat
from parity_tests.parity import assert_close, to_numpy
from parity_tests.strategies import (
    AttentionConfig,
    AttentionInputs,
    MaskConfig,
    MHAConfig,
    MHAInputs,
    attention_configs,
    build_attention_inputs,
    build_mha_inputs,
    float32_exact,
    masked_keys,
    mha_configs,
    to_torch,
)
from parity_tests.tolerances import (
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)
from reference.gradcheck import gradcheck

# ----------------------------------------------------------------------------- edge cases

SINGLE = AttentionConfig(batch=1, heads=1, tq=1, tk=1, head_dim=1, value_dim=1)  # dq = dk = 0
SINGLE_QUERY = AttentionConfig(batch=1, heads=1, tq=1, tk=3, head_dim=1, value_dim=1, seed=1)
ALL_KEYS_MASKED = AttentionConfig(2, 2, 3, 4, 2, 3, MaskConfig("bool_4d", key_padding=True,
                                                               rate=1.0))
SOME_ROWS_MASKED = AttentionConfig(3, 2, 5, 3, 2, 2, MaskConfig("float_b1", key_padding=True,
                                                                causal=True, rate=0.5,
                                                                dropout=0.3), seed=3)
DECODER_STEP = AttentionConfig(2, 3, 1, 6, 4, 4, MaskConfig(key_padding=True, causal=True,
                                                            rate=0.3,
                                                            fully_masked_rows=False), seed=3)
LARGE_LOGITS = AttentionConfig(2, 2, 5, 6, 1, 3, MaskConfig("bool_2d", causal=True,
                                                            fully_masked_rows=False),
                               magnitude=100.0, seed=11)

MHA_SINGLE = MHAConfig(batch=1, heads=1, head_dim=1, tq=1, tk=1, self_attention=True)
MHA_ALL_KEYS_MASKED = MHAConfig(2, 2, 3, 3, 4, False, masks=MaskConfig(key_padding=True,
                                                                       rate=1.0))
MHA_CAUSAL_SELF = MHAConfig(2, 2, 3, 5, 5, True, masks=MaskConfig(
    "float_4d", key_padding=True, causal=True, fully_masked_rows=False), seed=5)
MHA_CROSS_NO_BIAS = MHAConfig(3, 4, 2, 4, 7, False, bias=False, masks=MaskConfig(
    "bool_b1", key_padding=True, fully_masked_rows=False), seed=9)


# ----------------------------------------------------------------------------- runners

def torch_kwargs(kwargs: dict, dtype: torch.dtype = torch.float64) -> dict:
    """NumPy mask arguments as torch tensors (float masks in ``dtype``, bool masks as bool)."""
    return {name: to_torch(value, dtype) if isinstance(value, np.ndarray) else value
            for name, value in kwargs.items()}


def run_reference_attention(inputs: AttentionInputs):
    """(out, (dq, dk, dv)) from the reference pair."""
    out, cache = ref.scaled_dot_product_attention_forward(inputs.q, inputs.k, inputs.v,
                                                          **inputs.kwargs())
    return out, ref.scaled_dot_product_attention_backward(inputs.dout, cache)


def run_torch_impl_attention(inputs: AttentionInputs, dtype: torch.dtype = torch.float64,
                             block_k: int = tim.BLOCK_K):
    """(out, (dq, dk, dv)) from the torch_impl pair."""
    q, k, v, dout = (to_torch(a, dtype) for a in (inputs.q, inputs.k, inputs.v, inputs.dout))
    out, cache = tim.scaled_dot_product_attention_forward(
        q, k, v, **torch_kwargs(inputs.kwargs(), dtype), block_k=block_k)
    return out, tim.scaled_dot_product_attention_backward(dout, cache)


def run_reference_attention_with_condition(inputs: AttentionInputs, limit: float):
    """run_reference_attention, rejecting the example unless κ <= limit (see
    softmax_backward_condition)."""
    out, cache = ref.scaled_dot_product_attention_forward(inputs.q, inputs.k, inputs.v,
                                                          **inputs.kwargs())
    assume(softmax_backward_condition(cache, inputs.dout) <= limit)
    return out, ref.scaled_dot_product_attention_backward(inputs.dout, cache)


def assert_attention_close(actual, expected, budget) -> None:
    out, grads = actual
    out_ref, grads_ref = expected
    assert_close(out, out_ref, budget.forward, "out")
    for name, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(grad, grad_ref, budget.gradient, name)


def torch_sdpa_mask(inputs: AttentionInputs) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention, whose boolean mask means
    True = attend (ours: True = masked out), so the union of our masks is inverted."""
    tq, tk = inputs.q.shape[2], inputs.k.shape[2]
    only_causal = inputs.attn_mask is None and inputs.key_padding_mask is None
    if only_causal and (not inputs.causal or tq == tk):
        return None, inputs.causal  # torch's is_causal is top-left aligned: equal for Tq == Tk
    masked = masked_keys((inputs.attn_mask, inputs.key_padding_mask, inputs.causal), tq, tk)
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != np.bool_:
        return to_torch(np.where(masked, -np.inf, inputs.attn_mask)), False
    return to_torch(~masked), False


def run_torch_sdpa(inputs: AttentionInputs):
    leaves = [to_torch(a).requires_grad_() for a in (inputs.q, inputs.k, inputs.v)]
    attn_mask, is_causal = torch_sdpa_mask(inputs)
    out = F.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=inputs.config.scale)
    return out.detach(), torch.autograd.grad(out, leaves, to_torch(inputs.dout))


def softmax_backward_condition(cache: ref.AttentionCache, dout: np.ndarray) -> float:
    """κ = max over dq, dk of ||(P ⊙ (|dP| + |D|)) |k||| / ||dS k|| (and likewise for dk).

    dS = P ⊙ (dP - D) cancels where a row's weight sits on few keys: with one visible key
    dS = 0 exactly, as are dq and dk. The reference gets D = Σ_j P_j dP_j from the same
    products as dP and so cancels exactly; torch_impl's D = Σ_c dout_c out_c (FlashAttention,
    no P stored) is the same number summed another way, so it leaves rounding of the size
    of the terms, ε · ||P (|dP| + |D|)||. Relative to dq that is ε κ: compare where
    κ keeps it well inside the budget (and pin the exactly-degenerate case separately).
    """
    p, keep = cache.p, cache.masks.keep_mask
    scale = np.where(keep, cache.masks.keep_scale, 0.0) if keep is not None else 1.0
    dp = (dout @ cache.v.swapaxes(-1, -2)) * scale
    delta = (p * dp).sum(axis=-1, keepdims=True)
    terms, ds = p * (np.abs(dp) + np.abs(delta)), p * (dp - delta)
    worst = 1.0
    for t, d, x in ((terms, ds, cache.k), (terms.swapaxes(-1, -2), ds.swapaxes(-1, -2),
                                            cache.q)):
        bound, value = np.linalg.norm(t @ np.abs(x)), np.linalg.norm(d @ x)
        if bound > 0:
            worst = max(worst, bound / value if value > 0 else np.inf)
    return float(worst)


# ε κ stays >= 10x inside the gradient budget: 1e-16 · 1e5 vs 1e-10 (float64; logits of 1e4
# over keys u + n/100 apart cancel ~5e4-fold in dq = Σ_j dS_j k_j), 6e-8 · 100 vs 1e-4 (float32).
FLOAT64_CONDITION_LIMIT = 1e5
FLOAT32_CONDITION_LIMIT = 100.0


def assume_finite_differences_resolve(analytic: dict, out: np.ndarray, dout: np.ndarray) -> None:
    """Central differences of L = <out, dout> carry an absolute error ~ε Σ|out ⊙ dout| / h
    (1e-10 of it for h = 1e-6), so a gradient far smaller than Σ|out ⊙ dout| (a softmax
    nearly one-hot, or one whose scores barely move L) cannot be resolved to 1e-6; an exactly
    zero one (out independent of the input) can."""
    scale = float(np.abs(out * dout).sum())
    for grad in analytic.values():
        norm = float(np.linalg.norm(grad))
        assume(norm == 0.0 or norm >= 1e-3 * scale)


def tiny_attention_configs() -> st.SearchStrategy[AttentionConfig]:
    return attention_configs(max_batch=2, max_len=4, max_heads=2, max_head_dim=3)


# ----------------------------------------------------------------------------- attention

@given(config=tiny_attention_configs())
@example(config=SINGLE)
@example(config=SINGLE_QUERY)
@example(config=ALL_KEYS_MASKED)
@example(config=SOME_ROWS_MASKED)
def test_reference_attention_backward_matches_finite_differences(config: AttentionConfig) -> None:
    inputs = build_attention_inputs(config)
    out, (dq, dk, dv) = run_reference_attention(inputs)
    assume_finite_differences_resolve({"q": dq, "k": dk, "v": dv}, out, inputs.dout)
    gradcheck(lambda q, k, v: ref.scaled_dot_product_attention_forward(q, k, v,
                                                                       **inputs.kwargs())[0],
              {"q": inputs.q, "k": inputs.k, "v": inputs.v}, inputs.dout,
              {"q": dq, "k": dk, "v": dv}, tol=REF_VS_FINITE_DIFF)


@given(config=attention_configs(), block_k=st.sampled_from([1, 3, 8, tim.BLOCK_K]))
@example(config=SINGLE_QUERY, block_k=tim.BLOCK_K)
@example(config=ALL_KEYS_MASKED, block_k=3)
@example(config=SOME_ROWS_MASKED, block_k=2)
@example(config=DECODER_STEP, block_k=4)
@example(config=LARGE_LOGITS, block_k=4)
def test_torch_impl_attention_float64_matches_reference(config: AttentionConfig,
                                                         block_k: int) -> None:
    inputs = build_attention_inputs(config)
    expected = run_reference_attention_with_condition(inputs, FLOAT64_CONDITION_LIMIT)
    actual = run_torch_impl_attention(inputs, block_k=block_k)
    assert actual[0].dtype == torch.float64
    assert_attention_close(actual, expected, TORCH64_VS_REF64)


@given(config=attention_configs(), block_k=st.sampled_from([1, 3, 8, tim.BLOCK_K]))
@example(config=LARGE_LOGITS, block_k=4)
@example(config=SINGLE_QUERY, block_k=1)
def test_blocked_loop_matches_reference_where_aten_kernels_would_run(config: AttentionConfig,
                                                                    block_k: int) -> None:
    """The CPU sends float attention with dv = d and no dropout to ATen's flash kernels
    (kernels/attention.py's _aten_fits; masks as one additive mask); the blocked Python loop,
    forced here, still matches the reference on those inputs, so both paths stay tested
   ."""
    inputs = build_attention_inputs(config)
    expected = run_reference_attention_with_condition(inputs, FLOAT64_CONDITION_LIMIT)
    with mock.patch.object(kat, "_aten_fits", lambda *args: False):
        actual = run_torch_impl_attention(inputs, block_k=block_k)
    assert_attention_close(actual, expected, TORCH64_VS_REF64)


def float32_exact_attention(inputs: AttentionInputs) -> AttentionInputs:
    mask = inputs.attn_mask
    if mask is not None and mask.dtype != np.bool_:
        mask = float32_exact(mask)
    return inputs._replace(q=float32_exact(inputs.q), k=float32_exact(inputs.k),
                           v=float32_exact(inputs.v), dout=float32_exact(inputs.dout),
                           attn_mask=mask)


# Large logits are a float64 matter: scores near 1e4 carry an absolute float32 rounding of 1e-3,
# so P itself has no float32 value within the budget.
@given(config=attention_configs(), block_k=st.sampled_from([1, 3, 8, tim.BLOCK_K]))
@example(config=SINGLE_QUERY, block_k=tim.BLOCK_K)
@example(config=ALL_KEYS_MASKED, block_k=3)
@example(config=SOME_ROWS_MASKED, block_k=2)
@example(config=DECODER_STEP, block_k=4)
def test_torch_impl_attention_float32_matches_reference_float64(config: AttentionConfig,
                                                                 block_k: int) -> None:
    inputs = float32_exact_attention(build_attention_inputs(config))
    expected = run_reference_attention_with_condition(inputs, FLOAT32_CONDITION_LIMIT)
    actual = run_torch_impl_attention(inputs, torch.float32, block_k)
    assert actual[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in actual[1])
    assert_attention_close(actual, expected, TORCH32_VS_REF64)


@given(config=attention_configs(fully_masked_rows=False, dropout=False))
@example(config=SINGLE_QUERY)
@example(config=DECODER_STEP)
@example(config=LARGE_LOGITS)
@example(config=AttentionConfig(2, 2, 6, 6, 3, 2, MaskConfig(causal=True)))
def test_reference_attention_matches_torch_scaled_dot_product_attention(
        config: AttentionConfig) -> None:
    inputs = build_attention_inputs(config)
    # torch's math backend forms D its own way, too: the same κ bounds its rounding.
    expected = run_reference_attention_with_condition(inputs, FLOAT64_CONDITION_LIMIT)
    assert_attention_close(expected, run_torch_sdpa(inputs), TORCHNN64_VS_OURS64)


@given(config=attention_configs(fully_masked_rows=False, dropout=False),
       block_k=st.sampled_from([1, 3, tim.BLOCK_K]))
@example(config=DECODER_STEP, block_k=2)
@example(config=LARGE_LOGITS, block_k=4)
def test_attention_function_matches_torch_scaled_dot_product_attention_through_autograd(
        config: AttentionConfig, block_k: int) -> None:
    inputs = build_attention_inputs(config)
    run_reference_attention_with_condition(inputs, FLOAT64_CONDITION_LIMIT)
    leaves = [to_torch(a).requires_grad_() for a in (inputs.q, inputs.k, inputs.v)]
    out = tim.scaled_dot_product_attention(*leaves, **torch_kwargs(inputs.kwargs()),
                                           block_k=block_k)
    grads = torch.autograd.grad(out, leaves, to_torch(inputs.dout))
    assert_attention_close((out.detach(), grads), run_torch_sdpa(inputs), TORCHNN64_VS_OURS64)


def run_attention_function(inputs: AttentionInputs):
    leaves = [to_torch(a).requires_grad_() for a in (inputs.q, inputs.k, inputs.v)]
    out = tim.scaled_dot_product_attention(*leaves, **torch_kwargs(inputs.kwargs()), block_k=2)
    return out.detach(), torch.autograd.grad(out, leaves, to_torch(inputs.dout))


ATTENTION_RUNNERS = [pytest.param(run_reference_attention, id="reference"),
                     pytest.param(run_torch_impl_attention, id="torch_impl"),
                     pytest.param(run_attention_function, id="torch_impl-function")]


@pytest.mark.parametrize("run", ATTENTION_RUNNERS)
def test_all_keys_masked_gives_zero_output_and_zero_gradients(run) -> None:
    out, grads = run(build_attention_inputs(ALL_KEYS_MASKED))
    for name, value in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert not np.asarray(value).any(), name  # exactly 0, and so no NaN


@pytest.mark.parametrize("run", ATTENTION_RUNNERS)
def test_fully_masked_rows_give_zero_output_and_zero_query_gradient(run) -> None:
    inputs = build_attention_inputs(SOME_ROWS_MASKED)
    out, (dq, dk, dv) = run(inputs)
    tq, tk = SOME_ROWS_MASKED.tq, SOME_ROWS_MASKED.tk
    masked = masked_keys((inputs.attn_mask, inputs.key_padding_mask, inputs.causal), tq, tk)
    dead = np.broadcast_to(masked.all(axis=-1), out.shape[:3])  # rows that see no key
    assert dead.any() and not dead.all()  # the example has both kinds of rows
    for name, value in (("out", out), ("dq", dq)):
        value = np.asarray(value)
        assert not value[dead].any() and value[~dead].any(), name
    assert all(np.all(np.isfinite(np.asarray(g))) for g in (dk, dv))


@pytest.mark.parametrize("run", ATTENTION_RUNNERS)
def test_one_visible_key_per_row_gives_zero_query_and_key_gradients(run) -> None:
    # P = 1 on the one key, whatever q and k: out = v_j and dq = dk = 0. The reference cancels
    # exactly; torch_impl's D = Σ dout ⊙ out may leave rounding of the terms' size (~1e-16).
    for config in (SINGLE, AttentionConfig(3, 2, 4, 1, 5, 3, seed=1),
                   AttentionConfig(2, 2, 4, 4, 3, 2, MaskConfig("bool_2d", rate=0.0), seed=2)):
        inputs = build_attention_inputs(config)
        if config.tk > 1:  # the identity as attn_mask: row i sees key i only
            inputs = inputs._replace(attn_mask=~np.eye(config.tk, dtype=bool))
        out, (dq, dk, dv) = run(inputs)
        assert_close(out, np.broadcast_to(inputs.v, out.shape) if config.tk == 1 else inputs.v,
                     TORCH64_VS_REF64.forward, "out")
        terms = float(np.abs(inputs.dout).max() * np.abs(inputs.v).max()
                      * max(np.abs(inputs.q).max(), np.abs(inputs.k).max()))
        for name, grad in (("dq", dq), ("dk", dk)):
            assert float(np.abs(np.asarray(grad)).max()) <= 1e-14 * terms, name
        assert np.asarray(dv).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("magnitude", [100.0, 1e3])
def test_reference_attention_is_finite_and_warning_free_at_logits_1e4(dtype,
                                                                      magnitude: float) -> None:
    # magnitude 100 puts the scores near 1e4 with O(1) differences; 1e3 near 1e6, one-hot.
    inputs = build_attention_inputs(LARGE_LOGITS._replace(magnitude=magnitude))
    inputs = inputs._replace(q=inputs.q.astype(dtype), k=inputs.k.astype(dtype),
                             v=inputs.v.astype(dtype), dout=inputs.dout.astype(dtype))
    with np.errstate(over="raise", divide="raise", invalid="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out, grads = run_reference_attention(inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("magnitude", [100.0, 1e3])
def test_torch_impl_attention_is_finite_at_logits_1e4(dtype, magnitude: float) -> None:
    inputs = build_attention_inputs(LARGE_LOGITS._replace(magnitude=magnitude))
    out, grads = run_torch_impl_attention(inputs, dtype, block_k=2)
    assert all(bool(torch.isfinite(t).all()) for t in (out, *grads))


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor inside nested tuples / NamedTuples / dicts / lists."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def query_by_key_tensors(grad_fn, tq: int, tk: int) -> list[torch.Tensor]:
    """Tensors held by an autograd node (saved tensors and ctx attributes) whose last two
    dimensions are (Tq, Tk)."""
    held = tensors_in(tuple(grad_fn.saved_tensors)) + tensors_in(list(vars(grad_fn).values()))
    return [t for t in held if t.dim() >= 2 and tuple(t.shape[-2:]) == (tq, tk)]


def test_attention_function_saves_no_query_by_key_tensor() -> None:
    B, h, tq, tk, d = 2, 3, 5, 7, 4  # Tq, Tk, d, dv all distinct, so shapes cannot collide
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, t, width, generator=gen, dtype=torch.float64,
                           requires_grad=True) for t, width in ((tq, d), (tk, d), (tk, 6)))
    padding = torch.zeros(B, tk, dtype=torch.bool)
    padding[0, -2:] = True
    out = tim.scaled_dot_product_attention(q, k, v, key_padding_mask=padding, causal=True,
                                           block_k=3)
    assert query_by_key_tensors(out.grad_fn, tq, tk) == []
    # With (Tq, Tk)-shaped inputs the only such tensors held are those inputs themselves.
    attn_mask = torch.rand(B, h, tq, tk, generator=gen) < 0.2
    keep = torch.rand(B, h, tq, tk, generator=gen) >= 0.1
    out = tim.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout=0.1,
                                           dropout_mask=keep)
    held = query_by_key_tensors(out.grad_fn, tq, tk)
    assert {t.data_ptr() for t in held} <= {attn_mask.data_ptr(), keep.data_ptr()}
    out.sum().backward()  # and the backward runs from what was saved
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


def test_multihead_attention_function_saves_no_query_by_key_tensor() -> None:
    module = tim.MultiheadAttention(8, 2, dtype=torch.float64)
    query = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    out, weights = module(query, memory, memory, need_weights=True, is_causal=True)
    assert weights.shape == (2, 5, 7) and not weights.requires_grad
    assert query_by_key_tensors(out.grad_fn, 5, 7) == []


# ----------------------------------------------------------------------------- multi-head

def run_reference_mha(inputs: MHAInputs):
    """(out, weights, grads) from the reference pair; grads keyed "x" (self-attention) or
    "query", "key", "value", then "params.<name>"."""
    (out, weights), cache = ref.multi_head_attention_forward(
        inputs.query, inputs.key, inputs.value, inputs.params, inputs.config.heads,
        **inputs.kwargs(), need_weights=True)
    dquery, dkey, dvalue, dparams = ref.multi_head_attention_backward(inputs.dout, cache)
    return out, weights, mha_grads(inputs.config, dquery, dkey, dvalue, dparams)


def assume_mha_well_conditioned(inputs: MHAInputs, limit: float) -> None:
    """Reject the example unless the inner attention's κ <= limit (softmax_backward_condition),
    e.g. cross-attention over one key, where dquery = dkey = 0 exactly. Self-attention's one
    input gets dquery + dkey + dvalue (and in_proj_weight all three blocks' gradients), which
    the dvalue part keeps away from 0: no gate there."""
    if inputs.config.self_attention:
        return
    (_, _), cache = ref.multi_head_attention_forward(
        inputs.query, inputs.key, inputs.value, inputs.params, inputs.config.heads,
        **inputs.kwargs())
    B, tq, E = inputs.dout.shape
    heads = inputs.config.heads
    do = (inputs.dout @ inputs.params["out_proj.weight"]).reshape(B, tq, heads, E // heads)
    assume(softmax_backward_condition(cache.attention, do.transpose(0, 2, 1, 3)) <= limit)


def mha_grads(config: MHAConfig, dquery, dkey, dvalue, dparams) -> dict:
    grads = ({"x": dquery + dkey + dvalue} if config.self_attention
             else {"query": dquery, "key": dkey, "value": dvalue})
    grads.update({f"params.{name}": grad for name, grad in dparams.items()})
    return grads


def run_torch_impl_mha(inputs: MHAInputs, dtype: torch.dtype = torch.float64):
    (out, weights), cache = tim.multi_head_attention_forward(
        *(to_torch(a, dtype) for a in (inputs.query, inputs.key, inputs.value)),
        {name: to_torch(p, dtype) for name, p in inputs.params.items()}, inputs.config.heads,
        **torch_kwargs(inputs.kwargs(), dtype), need_weights=True)
    dquery, dkey, dvalue, dparams = tim.multi_head_attention_backward(
        to_torch(inputs.dout, dtype), cache)
    return out, weights, mha_grads(inputs.config, dquery, dkey, dvalue, dparams)


def assert_mha_close(actual, expected, budget) -> None:
    out, weights, grads = actual
    out_ref, weights_ref, grads_ref = expected
    assert_close(out, out_ref, budget.forward, "out")
    assert_close(weights, weights_ref, budget.forward, "weights")
    assert set(grads) == set(grads_ref)
    for name in sorted(grads_ref):
        assert_close(grads[name], grads_ref[name], budget.gradient, f"d{name}")


def tiny_mha_configs() -> st.SearchStrategy[MHAConfig]:
    return mha_configs(max_batch=2, max_len=3, max_heads=2, max_head_dim=2)


@given(config=tiny_mha_configs())
@example(config=MHA_SINGLE)
@example(config=MHA_ALL_KEYS_MASKED._replace(head_dim=1, tk=3))
@example(config=MHA_CAUSAL_SELF._replace(head_dim=1, tq=3, tk=3))
def test_reference_mha_backward_matches_finite_differences(config: MHAConfig) -> None:
    inputs = build_mha_inputs(config)
    out, _, analytic = run_reference_mha(inputs)
    assume_finite_differences_resolve(analytic, out, inputs.dout)
    heads, kwargs = config.heads, inputs.kwargs()

    def forward(**arrays):
        params = {name[len("params."):]: a for name, a in arrays.items()
                  if name.startswith("params.")}
        if config.self_attention:
            query = key = value = arrays["x"]
        else:
            query, key, value = arrays["query"], arrays["key"], arrays["value"]
        return ref.multi_head_attention_forward(query, key, value, params, heads, **kwargs)[0][0]

    arrays = ({"x": inputs.query} if config.self_attention
              else {"query": inputs.query, "key": inputs.key, "value": inputs.value})
    arrays.update({f"params.{name}": p for name, p in inputs.params.items()})
    gradcheck(forward, arrays, inputs.dout, analytic, tol=REF_VS_FINITE_DIFF)


@given(config=mha_configs())
@example(config=MHA_SINGLE)
@example(config=MHA_ALL_KEYS_MASKED)
@example(config=MHA_CAUSAL_SELF)
@example(config=MHA_CROSS_NO_BIAS)
def test_torch_impl_mha_float64_matches_reference(config: MHAConfig) -> None:
    inputs = build_mha_inputs(config)
    assume_mha_well_conditioned(inputs, FLOAT64_CONDITION_LIMIT)
    actual = run_torch_impl_mha(inputs)
    assert actual[0].dtype == actual[1].dtype == torch.float64
    assert_mha_close(actual, run_reference_mha(inputs), TORCH64_VS_REF64)


@given(config=mha_configs())
@example(config=MHA_SINGLE)
@example(config=MHA_ALL_KEYS_MASKED)
@example(config=MHA_CAUSAL_SELF)
@example(config=MHA_CROSS_NO_BIAS)
def test_torch_impl_mha_float32_matches_reference_float64(config: MHAConfig) -> None:
    inputs = build_mha_inputs(config)
    mask = inputs.attn_mask
    if mask is not None and mask.dtype != np.bool_:
        mask = float32_exact(mask)
    query = float32_exact(inputs.query)
    key, value = ((query, query) if config.self_attention
                  else (float32_exact(inputs.key), float32_exact(inputs.value)))
    inputs = inputs._replace(query=query, key=key, value=value, attn_mask=mask,
                             params={n: float32_exact(p) for n, p in inputs.params.items()},
                             dout=float32_exact(inputs.dout))
    assume_mha_well_conditioned(inputs, FLOAT32_CONDITION_LIMIT)
    actual = run_torch_impl_mha(inputs, torch.float32)
    assert actual[0].dtype == actual[1].dtype == torch.float32
    assert_mha_close(actual, run_reference_mha(inputs), TORCH32_VS_REF64)


def torch_nn_mha_masks(inputs: MHAInputs) -> dict:
    """Our masks in torch.nn.MultiheadAttention's form: 3-d attn_mask (B·h, Tq, Tk), the
    causal mask folded into attn_mask, key_padding_mask of attn_mask's kind."""
    config = inputs.config
    B, h, tq, tk = config.batch, config.heads, config.tq, config.tk
    attn_mask, padding = inputs.attn_mask, inputs.key_padding_mask
    if inputs.causal:
        future = np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq)
        if attn_mask is None:
            attn_mask = future
        elif attn_mask.dtype == np.bool_:
            attn_mask = attn_mask | future
        else:
            attn_mask = np.where(future, -np.inf, attn_mask)
    if attn_mask is not None and attn_mask.ndim == 4:
        attn_mask = np.broadcast_to(attn_mask, (B, h, tq, tk)).reshape(B * h, tq, tk)
    if attn_mask is not None and attn_mask.dtype != np.bool_ and padding is not None:
        padding = np.where(padding, -np.inf, 0.0)  # torch deprecates mixing kinds
    return {"attn_mask": None if attn_mask is None else to_torch(attn_mask),
            "key_padding_mask": None if padding is None else to_torch(padding)}


def torch_nn_mha(config: MHAConfig) -> torch.nn.MultiheadAttention:
    return torch.nn.MultiheadAttention(config.embed_dim, config.heads, bias=config.bias,
                                       batch_first=True, dtype=torch.float64)


def run_module_with_autograd(module, inputs: MHAInputs, call) -> tuple:
    """(out, weights, grads) of ``call(module, query, key, value)`` through autograd."""
    config = inputs.config
    if config.self_attention:
        leaves = {"x": to_torch(inputs.query).requires_grad_()}
        qkv = (leaves["x"],) * 3
    else:
        leaves = {name: to_torch(getattr(inputs, name)).requires_grad_()
                  for name in ("query", "key", "value")}
        qkv = tuple(leaves.values())
    leaves.update({f"params.{name}": p for name, p in module.named_parameters()})
    out, weights = call(module, *qkv)
    grads = torch.autograd.grad(out, list(leaves.values()), to_torch(inputs.dout))
    return out.detach(), weights.detach(), dict(zip(leaves, grads))


def run_torch_nn_mha(inputs: MHAInputs):
    module = torch_nn_mha(inputs.config)
    module.load_state_dict({name: to_torch(p) for name, p in inputs.params.items()})
    masks = torch_nn_mha_masks(inputs)
    return run_module_with_autograd(module, inputs, lambda m, q, k, v: m(
        q, k, v, need_weights=True, average_attn_weights=True, **masks))


@given(config=mha_configs(fully_masked_rows=False, dropout=False))
@example(config=MHA_SINGLE)
@example(config=MHA_CAUSAL_SELF)
@example(config=MHA_CROSS_NO_BIAS)
def test_reference_mha_matches_torch_nn_multihead_attention(config: MHAConfig) -> None:
    inputs = build_mha_inputs(config)
    assume_mha_well_conditioned(inputs, FLOAT64_CONDITION_LIMIT)
    assert_mha_close(run_reference_mha(inputs), run_torch_nn_mha(inputs), TORCHNN64_VS_OURS64)


@given(config=mha_configs(fully_masked_rows=False, dropout=False))
@example(config=MHA_SINGLE)
@example(config=MHA_CAUSAL_SELF)
@example(config=MHA_CROSS_NO_BIAS)
def test_torch_impl_module_matches_torch_nn_multihead_attention(config: MHAConfig) -> None:
    inputs = build_mha_inputs(config)
    assume_mha_well_conditioned(inputs, FLOAT64_CONDITION_LIMIT)
    module = tim.MultiheadAttention(config.embed_dim, config.heads, bias=config.bias,
                                    dtype=torch.float64)
    module.load_state_dict({name: to_torch(p) for name, p in inputs.params.items()})
    masks = torch_kwargs(inputs.kwargs())
    actual = run_module_with_autograd(module, inputs, lambda m, q, k, v: m(
        q, k, v, key_padding_mask=masks["key_padding_mask"], attn_mask=masks["attn_mask"],
        need_weights=True, is_causal=masks["causal"]))
    assert_mha_close(actual, run_torch_nn_mha(inputs), TORCHNN64_VS_OURS64)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_module_state_dict_round_trips_with_torch_nn(bias: bool) -> None:
    module = ref.MultiheadAttention(6, 3, bias=bias, seed=0)
    nn_module = torch.nn.MultiheadAttention(6, 3, bias=bias, batch_first=True,
                                            dtype=torch.float64)
    nn_module.load_state_dict({name: to_torch(p) for name, p in module.state_dict().items()})
    back = ref.MultiheadAttention(6, 3, bias=bias, seed=1)
    back.load_state_dict(nn_module.state_dict())
    assert set(back.params) == set(nn_module.state_dict())
    for name, p in module.params.items():
        assert_close(back.params[name], p, 0.0, name)


@pytest.mark.parametrize("bias", [True, False])
def test_torch_impl_module_state_dict_round_trips_with_torch_nn(bias: bool) -> None:
    module = tim.MultiheadAttention(6, 3, bias=bias, dtype=torch.float64)
    nn_module = torch.nn.MultiheadAttention(6, 3, bias=bias, batch_first=True,
                                            dtype=torch.float64)
    nn_module.load_state_dict(module.state_dict())
    back = tim.MultiheadAttention(6, 3, bias=bias, dtype=torch.float64)
    back.load_state_dict(nn_module.state_dict())
    assert set(back.state_dict()) == set(nn_module.state_dict())
    for name, p in module.state_dict().items():
        assert_close(back.state_dict()[name], p, 0.0, name)


def test_reference_module_backward_fills_grads_like_the_functional_pair() -> None:
    inputs = build_mha_inputs(MHA_CROSS_NO_BIAS._replace(bias=True))
    module = ref.MultiheadAttention(inputs.config.embed_dim, inputs.config.heads, seed=0)
    module.load_state_dict(inputs.params)
    masks = inputs.kwargs()
    out, weights = module(inputs.query, inputs.key, inputs.value,
                          key_padding_mask=masks["key_padding_mask"],
                          attn_mask=masks["attn_mask"], need_weights=True)
    dquery, dkey, dvalue = module.backward(inputs.dout)
    expected = run_reference_mha(inputs)
    assert_mha_close((out, weights, mha_grads(inputs.config, dquery, dkey, dvalue, module.grads)),
                     expected, TORCH64_VS_REF64)
    with pytest.raises(RuntimeError, match="call forward first"):
        module.backward(inputs.dout)


@pytest.mark.parametrize("backend", ["reference", "torch_impl"])
def test_modules_apply_dropout_in_training_only(backend: str) -> None:
    inputs = build_mha_inputs(MHA_CAUSAL_SELF._replace(masks=MaskConfig(dropout=0.5)))
    E, heads = inputs.config.embed_dim, inputs.config.heads
    if backend == "reference":
        module, x, mask = ref.MultiheadAttention(E, heads, dropout=0.5, seed=0), inputs.query, \
            inputs.dropout_mask
        functional = lambda **kw: ref.multi_head_attention_forward(  # noqa: E731
            x, x, x, module.params, heads, **kw)[0][0]
    else:
        module = tim.MultiheadAttention(E, heads, dropout=0.5, dtype=torch.float64)
        x, mask = to_torch(inputs.query), to_torch(inputs.dropout_mask)
        params = {name: p.detach() for name, p in module.named_parameters()}
        functional = lambda **kw: tim.multi_head_attention_forward(  # noqa: E731
            x, x, x, params, heads, **kw)[0][0]
    out, _ = module(x, x, x, dropout_mask=mask)
    assert_close(out, functional(dropout=0.5, dropout_mask=mask), 0.0, "training, given mask")
    drawn, _ = module(x, x, x)  # a mask is drawn: some weights are dropped
    assert np.abs(to_numpy(drawn) - to_numpy(functional())).max() > 0
    module.eval()
    out, _ = module(x, x, x, dropout_mask=mask)  # eval ignores masks
    assert_close(out, functional(), 0.0, "eval")


# ----------------------------------------------------------------------------- bad input

BACKENDS = [pytest.param((ref, np.asarray), id="reference"),
            pytest.param((tim, torch.as_tensor), id="torch_impl")]

Q, K, V = np.ones((2, 2, 3, 4)), np.ones((2, 2, 5, 4)), np.ones((2, 2, 5, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q, k, v, kwargs, error, pattern", [
    (Q, K, V, {"attn_mask": np.zeros((3, 4), bool)}, ValueError,
     r"^attn_mask: expected shape \(Tq, Tk\) = \(3, 5\), \(B, h, Tq, Tk\) = \(2, 2, 3, 5\) or "
     r"\(B, 1, Tq, Tk\) = \(2, 1, 3, 5\), got \(3, 4\)"),
    (Q, K, V, {"attn_mask": np.zeros((2, 3, 5), bool)}, ValueError, r"^attn_mask: expected shape"),
    (Q, K, V, {"attn_mask": np.zeros((3, 5), np.float32)}, TypeError,
     r"^attn_mask: expected dtype .*bool.*float64"),
    (Q, K, V, {"attn_mask": np.array([[0.0, np.nan, 0, 0, 0]] * 3)}, ValueError,
     r"^attn_mask: contains NaN or \+inf"),
    (Q, K, V, {"key_padding_mask": np.zeros((2, 3), bool)}, ValueError,
     r"^key_padding_mask: expected shape \(2, 5\), got \(2, 3\)"),
    (Q, K, V, {"key_padding_mask": np.zeros((2, 5))}, TypeError,
     r"^key_padding_mask: expected a bool"),
    (Q, K.astype(np.float32), V, {}, TypeError, r"^k: expected dtype .*float64"),
    (Q, K, V.astype(np.float32), {}, TypeError, r"^v: expected dtype .*float64"),
    (Q, np.ones((2, 2, 5, 3)), V, {}, ValueError, r"^k: expected shape \(2, 2, Tk, 4\), got"),
    (Q, K, np.ones((2, 2, 4, 6)), {}, ValueError, r"^v: expected shape \(2, 2, 5, dv\), got"),
    (np.ones((2, 3, 4)), K, V, {}, ValueError, r"^q: expected shape \(B, h, Tq, d\), got"),
    (np.where(Q > 0, np.inf, 0.0), K, V, {}, ValueError, r"^q: contains NaN or inf"),
    (Q, np.where(K > 0, np.nan, 0.0), V, {}, ValueError, r"^k: contains NaN or inf"),
    (Q, K, V, {"dropout": 0.1}, ValueError, r"^dropout_mask: required when dropout > 0"),
    (Q, K, V, {"dropout_mask": np.ones((2, 2, 3, 5), bool)}, ValueError,
     r"^dropout_mask: expected None when dropout == 0"),
    (Q, K, V, {"dropout": 0.1, "dropout_mask": np.ones((2, 1, 3, 5), bool)}, ValueError,
     r"^dropout_mask: expected shape \(2, 2, 3, 5\)"),
    (Q, K, V, {"dropout": 0.1, "dropout_mask": np.ones((2, 2, 3, 5))}, TypeError,
     r"^dropout_mask: expected a bool"),
    (Q, K, V, {"dropout": 1.0}, ValueError, r"^dropout: expected a probability in \[0, 1\)"),
    (Q, K, V, {"causal": 1}, TypeError, r"^causal: expected a bool"),
    (Q, K, V, {"scale": float("inf")}, ValueError, r"^scale: expected a finite float"),
], ids=["attn-mask-shape", "attn-mask-3d", "attn-mask-dtype", "attn-mask-nan", "padding-shape",
        "padding-float", "k-dtype", "v-dtype", "k-width", "v-length", "q-3d", "q-inf", "k-nan",
        "dropout-no-mask", "mask-no-dropout", "dropout-mask-shape", "dropout-mask-float",
        "dropout-one", "causal-int", "scale-inf"])
def test_attention_forward_rejects_bad_input_naming_the_argument(backend, q, k, v, kwargs, error,
                                                                 pattern) -> None:
    module, array = backend
    kwargs = {name: array(value) if isinstance(value, np.ndarray) else value
              for name, value in kwargs.items()}
    with pytest.raises(error, match=pattern):
        module.scaled_dot_product_attention_forward(array(q), array(k), array(v), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_rejects_misshapen_dout_naming_it(backend) -> None:
    module, array = backend
    _, cache = module.scaled_dot_product_attention_forward(array(Q), array(K), array(V))
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 2, 3, 6\), got"):
        module.scaled_dot_product_attention_backward(array(np.ones((2, 2, 3, 4))), cache)


def mha_params(E: int = 6, bias: bool = True) -> dict:
    return {name: np.ones(shape) * 0.1 for name, shape in ref.mha_param_shapes(E, bias).items()}


X, MEMORY = np.ones((2, 3, 6)), np.ones((2, 5, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("query, key, params, num_heads, kwargs, error, pattern", [
    (X, MEMORY, mha_params(), 4, {}, ValueError,
     r"^num_heads: expected a divisor of embed_dim E = 6, got 4"),
    (X, MEMORY, mha_params(), 0, {}, ValueError, r"^num_heads: expected a positive int"),
    (X, MEMORY, {k: v for k, v in mha_params().items() if k != "out_proj.bias"}, 2, {},
     ValueError, r"^params: missing keys \['out_proj.bias'\]"),
    (X, MEMORY, {**mha_params(), "bias_k": np.ones(6)}, 2, {}, ValueError,
     r"^params: missing keys \[\], unexpected keys \['bias_k'\]"),
    (X, MEMORY, {**mha_params(), "in_proj_weight": np.ones((6, 6))}, 2, {}, ValueError,
     r"^params\['in_proj_weight'\]: expected shape \(18, 6\), got \(6, 6\)"),
    (X, MEMORY, {**mha_params(), "out_proj.weight": np.ones((6, 6), np.float32)}, 2, {},
     TypeError, r"^params\['out_proj.weight'\]: expected dtype"),
    (X, MEMORY.astype(np.float32), mha_params(), 2, {}, TypeError, r"^key: expected dtype"),
    (X, np.ones((2, 5, 4)), mha_params(), 2, {}, ValueError,
     r"^key: expected shape \(2, Tk, 6\), got \(2, 5, 4\)"),
    (np.where(X > 0, np.nan, 0.0), MEMORY, mha_params(), 2, {}, ValueError,
     r"^query: contains NaN or inf"),
    (X, MEMORY, mha_params(), 2, {"attn_mask": np.zeros((5, 3), bool)}, ValueError,
     r"^attn_mask: expected shape \(Tq, Tk\) = \(3, 5\)"),
    (X, MEMORY, mha_params(), 2, {"key_padding_mask": np.zeros((2, 3), bool)}, ValueError,
     r"^key_padding_mask: expected shape \(2, 5\)"),
    (X, MEMORY, mha_params(), 2, {"dropout": 0.5}, ValueError,
     r"^dropout_mask: required when dropout > 0 .*\(2, 2, 3, 5\)"),
], ids=["heads-not-dividing", "zero-heads", "missing-bias", "unexpected-key", "misshapen-weight",
        "weight-dtype", "key-dtype", "key-width", "nan-query", "attn-mask-shape", "padding-shape",
        "dropout-no-mask"])
def test_mha_forward_rejects_bad_input_naming_the_argument(backend, query, key, params,
                                                           num_heads, kwargs, error,
                                                           pattern) -> None:
    module, array = backend
    kwargs = {name: array(value) if isinstance(value, np.ndarray) else value
              for name, value in kwargs.items()}
    with pytest.raises(error, match=pattern):
        module.multi_head_attention_forward(array(query), array(key), array(key),
                                            {n: array(p) for n, p in params.items()}, num_heads,
                                            **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_value_must_match_key_naming_it(backend) -> None:
    module, array = backend
    with pytest.raises(ValueError, match=r"^value: expected shape \(2, 5, 6\), got \(2, 4, 6\)"):
        module.multi_head_attention_forward(array(X), array(MEMORY), array(np.ones((2, 4, 6))),
                                            {n: array(p) for n, p in mha_params().items()}, 2)


@pytest.mark.parametrize("module_class", [ref.MultiheadAttention, tim.MultiheadAttention],
                         ids=["reference", "torch_impl"])
def test_module_rejects_heads_not_dividing_embed_dim(module_class) -> None:
    with pytest.raises(ValueError, match=r"^num_heads: expected a divisor of embed_dim E = 10"):
        module_class(10, 4)


@pytest.mark.parametrize("tq, tk", [(3, 0), (0, 3), (0, 0)])
def test_empty_queries_or_keys_give_what_torch_nn_gives_in_both_backends(tq: int, tk: int
                                                                         ) -> None:
    """Tk = 0: every query sees no key, so its output is 0 (as F.scaled_dot_product_attention
    and nn.MultiheadAttention give); Tq = 0: an empty output. Gradients are zeros of the
    inputs' shapes. (torch_impl's fused CPU path divided by zero here: the process died.)"""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in ((2, 2, tq, 4), (2, 2, tk, 4),
                                                        (2, 2, tk, 4)))
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)))
    ref_out, cache = ref.scaled_dot_product_attention_forward(q, k, v, causal=True)
    ref_grads = ref.scaled_dot_product_attention_backward(np.ones_like(ref_out), cache)
    leaves = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    out = tim.scaled_dot_product_attention(*leaves, causal=True)
    out.sum().backward()
    for got in (ref_out, out.detach().numpy()):
        assert got.shape == tuple(expected.shape) and not np.any(got)
    for grads in (ref_grads, [t.grad.numpy() for t in leaves]):
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        assert not any(np.any(g) for g in grads)
    # the module forms: out = out_proj(0) = its bias where no key exists
    module = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((2, max(tq, 1), 8)))[:, :tq]
    memory = torch.from_numpy(rng.standard_normal((2, tk, 8)))
    expected = module(x, memory, memory)[0].detach().numpy()
    ours = tim.MultiheadAttention(8, 2, dtype=torch.float64)
    ours.load_state_dict(module.state_dict())
    np.testing.assert_allclose(ours(x, memory, memory)[0].detach().numpy(), expected, atol=1e-15)
    ref_module = ref.MultiheadAttention(8, 2)
    ref_module.load_state_dict({k_: v_.numpy() for k_, v_ in module.state_dict().items()})
    np.testing.assert_allclose(ref_module(x.numpy(), memory.numpy(), memory.numpy())[0],
                               expected, atol=1e-15)
