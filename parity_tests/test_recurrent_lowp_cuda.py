"""torch_impl recurrent layers in bfloat16 / float16 on CUDA vs the float64 reference.

DESIGN.md's low-precision budget (forward 2e-2, gradients 5e-2). The reference
runs on the *same* inputs rounded to the low-precision dtype, so the budget
measures the arithmetic of torch_impl, not the rounding of its inputs.

The relu RNN's gradients are held to the forward budget only where no unit
sits at relu's kink: relu' = [a > 0] is a step, and a pre-activation within
low-precision rounding of 0 (|a| ~ 1e-2 |terms| in bf16) takes the other
branch, flipping that unit's whole gradient (seen on an H100: batch 1, one
step, hidden 4, dx off by 58%). That is not a budget that any bf16
implementation can meet on such inputs, so for ``rnn_relu`` this test checks
the forward (relu is continuous) and leaves the backward to the float32 and
float64 parity tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

from .parity import assert_close
from .recurrent_runners import (
    assert_runs_close,
    reference_functional,
    torch_impl_functional,
    torch_impl_module,
)
from .strategies import RECURRENT_KINDS, RecurrentInputs, float32_configs, make_recurrent_inputs
from .tolerances import LOWP_CUDA_VS_REF64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, fp16 kernels)"),
    pytest.mark.parametrize("kind", RECURRENT_KINDS),
    pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"]),
]


def rounded_to(inputs: RecurrentInputs, dtype: torch.dtype) -> RecurrentInputs:
    """The same inputs with every floating array rounded through ``dtype``."""
    def r(a: np.ndarray) -> np.ndarray:
        return torch.from_numpy(a).to(dtype).double().numpy()
    return inputs._replace(x=r(inputs.x), params={k: r(v) for k, v in inputs.params.items()},
                           states=tuple(r(s) for s in inputs.states), dout=r(inputs.dout),
                           dfinals=tuple(r(d) for d in inputs.dfinals))


@given(config=float32_configs())
def test_torch_impl_low_precision_on_cuda_matches_reference_float64(kind: str,
                                                                    dtype: torch.dtype,
                                                                    config) -> None:
    inputs = rounded_to(make_recurrent_inputs(kind, config), dtype)
    expected = reference_functional(kind, inputs)
    functional = torch_impl_functional(kind, inputs, dtype=dtype, device="cuda")
    module = torch_impl_module(kind, inputs, dtype=dtype, device="cuda")
    assert functional.out.dtype == dtype and functional.out.device.type == "cuda"
    if kind == "rnn_relu":  # forward only: see the module docstring
        for name, run in (("", functional), ("module ", module)):
            assert_close(run.out, expected.out, LOWP_CUDA_VS_REF64.forward, f"{name}out")
            assert_close(run.finals[0], expected.finals[0], LOWP_CUDA_VS_REF64.forward,
                         f"{name}h_n")
        return
    assert_runs_close(functional, expected, LOWP_CUDA_VS_REF64)
    assert_runs_close(module, expected, LOWP_CUDA_VS_REF64, "module ")
