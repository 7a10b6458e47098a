"""Fused kernels behind ``torch.library`` custom ops (namespace ``seqtwin::``), one op per file.

Each op has up to three implementations of the same math: Triton kernels for CUDA, native
C++ kernels for the CPU (``kernels/cpu/*.cpp``, built on first use; see ``native.py``), and a
plain-torch path for any device. Which one runs is decided when the op runs (so also inside
``torch.compile``d code), by one process-wide switch:

- ``"auto"`` (default): Triton for CUDA tensors when triton is installed; the native kernels
  for float32/float64 CPU tensors when they build; the torch path otherwise.
- ``"triton"``: always Triton. On CPU tensors this is only valid under ``TRITON_INTERPRET=1``
  set before triton is first imported (triton's interpreter: slow, for tests at small
  shapes); otherwise the op raises.
- ``"native"``: the C++ kernels on CPU tensors (raises if they cannot be built or the tensor
  is not a float32/float64 CPU tensor).
- ``"torch"``: always the plain-torch path, on every device.

    set_kernel_path("torch")            # or, scoped:
    with kernel_path("native"): ...
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from . import native

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no triton; the Triton path says why it cannot run
    triton = tl = None

__all__ = ["KERNEL_PATHS", "kernel_path", "get_kernel_path", "set_kernel_path", "HAS_TRITON",
           "native_available", "flash_attention"]

KERNEL_PATHS = ("auto", "triton", "native", "torch")
HAS_TRITON = triton is not None
# triton picks compiled or interpreted kernels (its own library's too) when it is imported
_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
_path = "auto"


def set_kernel_path(path: str) -> None:
    """Choose the implementation every ``seqtwin::`` kernel op uses: "auto", "triton", "torch"."""
    global _path
    if path not in KERNEL_PATHS:
        raise ValueError(f"path: expected one of {', '.join(map(repr, KERNEL_PATHS))}, "
                         f"got {path!r}")
    _path = path


def get_kernel_path() -> str:
    return _path


@contextmanager
def kernel_path(path: str) -> Iterator[None]:
    """``set_kernel_path(path)`` for the duration of a ``with`` block, then the previous path."""
    previous = _path
    set_kernel_path(path)
    try:
        yield
    finally:
        set_kernel_path(previous)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel accumulates in: float32 for bf16/fp16 and float32, float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs its Triton kernels under the current path (raises if the
    path is "triton" and they cannot run)."""
    if _path in ("torch", "native"):
        return False
    if _path == "auto":
        return HAS_TRITON and x.is_cuda
    if not HAS_TRITON:
        raise RuntimeError("kernel path 'triton': triton is not installed "
                           "(pip install triton, or set_kernel_path('torch'))")
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(f"kernel path 'triton': tensors on {x.device} need triton's "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported); "
                           "use a CUDA device or the 'torch'/'auto' path")
    return True


_NATIVE_DTYPES = (torch.float32, torch.float64)


def native_kernels(name: str, x: torch.Tensor):
    """The built extension of ``kernels/cpu/<name>.cpp`` when an op on ``x`` runs it under the
    current path, else None (raises if the path is "native" and it cannot run)."""
    if _path in ("torch", "triton"):
        return None
    fits = x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES
    if _path == "auto":
        return native.load(name) if fits else None
    if not fits:
        raise RuntimeError(f"kernel path 'native': the C++ kernels take float32/float64 CPU "
                           f"tensors, got {x.dtype} on {x.device}; use the 'auto' path")
    module = native.load(name)
    if module is None:
        raise RuntimeError(f"kernel path 'native': the C++ kernel {name}.cpp is unavailable "
                           f"({native._failure}); use the 'auto' or 'torch' path")
    return module


def native_available(name: str) -> bool:
    """Whether the native CPU kernel ``name`` (e.g. "recurrent") builds and loads here."""
    return native.available(name)


def use_op(x: torch.Tensor) -> bool:
    """Whether a layer's time loop calls a step op through ``torch.ops`` rather than one of the
    op's two implementations directly: under torch.compile, where the op is what the graph
    holds, and for bf16/fp16 (the op computes them in float32). In eager float32/float64 the
    dispatcher's per-call cost (paid T times per layer and direction, and twice with the
    backward) buys nothing: the loop then calls the Triton launch wrapper itself when
    ``use_triton(x)``, else the torch path."""
    return torch.compiler.is_compiling() or x.dtype not in (torch.float32, torch.float64)


def jit(fn):
    """``triton.jit`` when triton is installed; otherwise the plain function (never launched)."""
    return fn if triton is None else triton.jit(fn)


@jit
def tanh(x):
    """tanh(x) = 2σ(2x) - 1 inside a Triton kernel (triton.language has no tanh, and libdevice's
    does not run in the interpreter); exact at ±∞, absolute error ~1 ulp of 1 near 0."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


from .attention import flash_attention  # noqa: E402  (seqtwin::flash_attention's wrapper)
