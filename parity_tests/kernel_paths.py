"""The paths every kernel test runs (torch_impl/kernels' switch): the torch path, and the
Triton path, on the CPU under TRITON_INTERPRET=1, which conftest sets without a GPU."""

import pytest

from torch_impl.kernels import HAS_TRITON

NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="issue #5: needs triton installed")
TRITON = pytest.param("triton", marks=NEEDS_TRITON)
PATHS = ["torch", TRITON]
