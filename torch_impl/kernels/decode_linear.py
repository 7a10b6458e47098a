"""The products of a decode step: y = x W + b for the few rows (M = batch x beams) of one
generated token per sequence, W (K, N) in GPT-2's Conv1D orientation.

The native CPU kernel (``kernels/cpu/decode_linear.cpp``) streams W once per call with
register-blocked FMAs instead of packing it as a BLAS GEMM does (the math and the measured
reason are in its header); elsewhere (CUDA, other dtypes, the "torch" path, no compiler)
``torch.addmm`` computes the same. A decode session resolves the path once, with
``decode_linear_for``, and calls the returned function at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import native_kernels

Linear = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _torch_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def decode_linear_for(weight: Tensor) -> Linear:
    """``linear(x (M, K), weight (K, N), bias (N,) or None) -> (M, N)`` for tensors like
    ``weight`` under the current kernel path (the native kernel on float32/float64 CPU
    tensors). The returned function trusts its arguments: contiguous, one dtype and
    device (a decode session's weights and activations)."""
    module = native_kernels("decode_linear", weight)
    return _torch_linear if module is None else module.linear
