"""The kernel path switch of torch_impl/kernels/__init__.py."""

from __future__ import annotations

import pytest
import torch

import torch_impl.kernels as kernels
from torch_impl.kernels.layer_norm import layer_norm


def test_kernel_path_rejects_unknown_names() -> None:
    expected = "path: expected one of 'auto', 'triton', 'native', 'torch'"
    with pytest.raises(ValueError, match=expected):
        kernels.set_kernel_path("cuda")


def test_kernel_path_context_restores_the_previous_path() -> None:
    assert kernels.get_kernel_path() == "auto"
    with kernels.kernel_path("torch"):
        assert kernels.get_kernel_path() == "torch"
        with kernels.kernel_path("triton"):
            assert kernels.get_kernel_path() == "triton"
        assert kernels.get_kernel_path() == "torch"
    assert kernels.get_kernel_path() == "auto"


def test_auto_path_takes_torch_on_cpu() -> None:
    assert not kernels.use_triton(torch.zeros(1))


def test_triton_path_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    with kernels.kernel_path("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer_norm(torch.randn(2, 3))
