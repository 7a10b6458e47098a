"""The paths kernel tests run (torch_impl/kernels' switch): the torch path; the native C++
CPU kernels, for the ops that have them (built on first use: a test on this path fails, never
skips, when they cannot be built, so CI always exercises them); and the Triton path, on the
CPU under TRITON_INTERPRET=1, which conftest sets without a GPU."""

import pytest

from torch_impl.kernels import HAS_TRITON

NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")
TRITON = pytest.param("triton", marks=NEEDS_TRITON)
PATHS = ["torch", TRITON]
NATIVE_PATHS = ["torch", "native", TRITON]  # ops with a kernels/cpu/<op>.cpp
