"""Hypothesis strategies and array helpers for the building-block tests.

Shapes are drawn by Hypothesis; values come from a NumPy generator seeded by a
drawn integer. Hypothesis' own float strategies favour repeated and round
values, which make relative-error checks ill-conditioned rather than wrong
(a constant dy, for instance, gives a softmax gradient that is pure rounding
noise); seeded normal draws keep every comparison well-conditioned, and the
edge cases that matter are pinned with ``@example``.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def sizes(max_value: int = 4, min_value: int = 1) -> st.SearchStrategy[int]:
    """A small dimension size."""
    return st.integers(min_value=min_value, max_value=max_value)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple]:
    """A small array shape with every side >= 1."""
    return st.lists(sizes(max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def normal_arrays(draw: st.DrawFn, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float64 array of ``shape`` with N(0, scale²) entries from a drawn seed."""
    rng = np.random.default_rng(draw(seeds))
    return np.asarray(rng.standard_normal(shape) * scale)  # 0-d stays an ndarray


def float32_exact(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to float32 and held in float64, so that a float32 run and a float64
    reference see the same input and only the arithmetic differs."""
    return a.astype(np.float32).astype(np.float64)


def to_torch(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch copy of ``a`` (floating arrays cast to ``dtype`` when given)."""
    t = torch.from_numpy(np.array(a))
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
