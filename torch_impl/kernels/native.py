"""The native C++ CPU kernels: built just in time, on first use, and cached.

Each op's C++ source lives in ``kernels/cpu/<name>.cpp`` (ATen + ``at::vec``). The first time
an op runs on a CPU tensor, ``load(name)`` builds that file with ``torch.utils.cpp_extension``
(ninja and the system C++ compiler), prints one line while it builds, and keeps the shared
library in a cache directory keyed by a hash of the source, the flags and the torch version,
so later processes load it in milliseconds and a changed source is rebuilt. Why just in time
rather than at install: the flags follow the CPU the code runs on (AVX-512, AVX2 or neither,
as ATen's own kernels), and an editable or wheel-less install needs no build step and no torch
in a build environment.

Without a compiler or ninja, or if the build fails, ``load`` returns None, one warning says
why, and the ops run their plain-torch path. ``SEQTWIN_KERNEL_CACHE`` chooses the cache
directory (default ``~/.cache/seqtwin/kernels``); ``SEQTWIN_NATIVE=0`` disables the native
kernels altogether (the "auto" path then runs plain torch on the CPU).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).parent / "cpu"
_modules: dict[str, ModuleType | None] = {}
_failure: str | None = None  # why the native kernels cannot be built (set once, warned once)


def cache_dir() -> Path:
    return Path(os.environ.get("SEQTWIN_KERNEL_CACHE",
                               Path.home() / ".cache" / "seqtwin" / "kernels"))


def enabled() -> bool:
    """Whether native kernels may be used at all (``SEQTWIN_NATIVE=0`` turns them off)."""
    return os.environ.get("SEQTWIN_NATIVE", "1") != "0"


def _capability_flags() -> list[str]:
    """ATen's vector-capability macros and matching -m flags for this CPU, so that
    ``at::vec::Vectorized`` compiles to the widest vectors it has (and to Sleef's exp/tanh)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                "-mavx512vl", "-mavx512dq", "-mfma", "-mbmi2"]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mbmi2",
                "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _flags() -> list[str]:
    # SEQTWIN_MKL: the kernels call the BLAS that torch's MKL exports (sgemm_/dgemm_) directly,
    # without an op dispatch per time step; without MKL they go through at::addmm_
    blas = ["-DSEQTWIN_MKL"] if torch.backends.mkl.is_available() else []
    return ["-O3", "-fopenmp", "-DNDEBUG", *_capability_flags(), *blas]


def _missing_tool() -> str | None:
    """Why a build cannot start, or None."""
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except (ImportError, RuntimeError):
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    return None


def load(name: str) -> ModuleType | None:
    """The built extension for ``kernels/cpu/<name>.cpp``, building it if needed; None (after
    one warning) when it cannot be built."""
    if name in _modules:
        return _modules[name]
    global _failure
    module = None
    if enabled() and _failure is None:
        _failure = _missing_tool()
    if enabled() and _failure is None:
        try:
            module = _build(name)
        except Exception as error:  # a compiler error: say it once, run plain torch
            _failure = f"building {name}.cpp failed: {str(error).strip().splitlines()[-1]}"
    if module is None and enabled():
        warnings.warn(f"seqtwin: native CPU kernels unavailable ({_failure}); the CPU runs the "
                      f"plain-torch kernels (slower)", RuntimeWarning, stacklevel=3)
    _modules[name] = module
    return module


def _build(name: str) -> ModuleType:
    from torch.utils import cpp_extension

    source = SOURCE_DIR / f"{name}.cpp"
    flags = _flags()
    key = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(),
                 sys.version.encode()):
        key.update(part)
    module_name = f"seqtwin_{name}_{key.hexdigest()[:12]}"
    build_dir = cache_dir() / module_name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{module_name}.so").exists():
        print(f"seqtwin: building the native CPU kernel {name}.cpp (once; cached in "
              f"{build_dir})", file=sys.stderr, flush=True)
    return cpp_extension.load(name=module_name, sources=[str(source)], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                              verbose=False)


def available(name: str) -> bool:
    """Whether ``name``'s native kernels can run (builds them on the first call)."""
    return load(name) is not None
