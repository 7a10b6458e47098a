"""torch_impl scaled dot-product attention on CUDA (float32, bf16, fp16) vs the float64 reference.

The low-precision runs compare against the reference on the same inputs
rounded to that dtype, so DESIGN.md's bf16/fp16 budget measures torch_impl's
arithmetic (float32 inside, as the attention docstring says), not input rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given

import torch_impl.attention as tim

from .strategies import (
    AttentionConfig,
    MaskConfig,
    attention_configs,
    build_attention_inputs,
)
from .test_attention import (
    FLOAT32_CONDITION_LIMIT,
    assert_attention_close,
    float32_exact_attention,
    run_reference_attention_with_condition,
)
from .tolerances import LOWP_CUDA_VS_REF64, TORCH32_VS_REF64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton attention)"),
]

DECODER_STEP = AttentionConfig(2, 3, 1, 6, 4, 4, MaskConfig(key_padding=True, causal=True))
BUDGETS = {torch.float32: TORCH32_VS_REF64, torch.bfloat16: LOWP_CUDA_VS_REF64,
           torch.float16: LOWP_CUDA_VS_REF64}


def rounded(a: np.ndarray | None, dtype: torch.dtype) -> np.ndarray | None:
    if a is None or a.dtype == np.bool_:
        return a
    return torch.from_numpy(a).to(dtype).double().numpy()


def run_on_cuda(inputs, dtype: torch.dtype):
    def cuda(a):
        if isinstance(a, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.cuda() if a.dtype == np.bool_ else t.to("cuda", dtype)
        return a
    q, k, v, dout = (cuda(a) for a in (inputs.q, inputs.k, inputs.v, inputs.dout))
    kwargs = {name: cuda(value) for name, value in inputs.kwargs().items()}
    out, cache = tim.scaled_dot_product_attention_forward(q, k, v, **kwargs)
    assert out.device.type == "cuda" and out.dtype == dtype
    return out, tim.scaled_dot_product_attention_backward(dout, cache)


@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["fp32", "bf16", "fp16"])
@given(config=attention_configs())
@example(config=DECODER_STEP)
def test_torch_impl_attention_on_cuda_matches_reference_float64(dtype: torch.dtype,
                                                                config: AttentionConfig) -> None:
    inputs = float32_exact_attention(build_attention_inputs(config))
    inputs = inputs._replace(q=rounded(inputs.q, dtype), k=rounded(inputs.k, dtype),
                             v=rounded(inputs.v, dtype), dout=rounded(inputs.dout, dtype),
                             attn_mask=rounded(inputs.attn_mask, dtype))
    expected = run_reference_attention_with_condition(inputs, FLOAT32_CONDITION_LIMIT)
    assert_attention_close(run_on_cuda(inputs, dtype), expected, BUDGETS[dtype])
