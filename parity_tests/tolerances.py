"""The tolerance budgets of DESIGN.md, in one place (relative error over the whole tensor).

Loosening a budget is a design decision: it needs a written reason next to the number.
"""

from __future__ import annotations

from typing import NamedTuple


class Budget(NamedTuple):
    forward: float
    gradient: float


TORCH64_VS_REF64 = Budget(forward=1e-12, gradient=1e-10)
TORCH32_VS_REF64 = Budget(forward=1e-5, gradient=1e-4)
LOWP_CUDA_VS_REF64 = Budget(forward=2e-2, gradient=5e-2)
REF_VS_FINITE_DIFF = 1e-6  # reference backward vs central differences, float64

# torch.nn in float64 computes the same math in another order: hold it to the float64 budget.
TORCHNN64_VS_OURS64 = TORCH64_VS_REF64

# One backend against itself with the work split differently (a batch cut in two, each sequence
# alone, layer by layer): the same float64 math summed in another order, so the float64 budget.
FLOAT64_REORDERED = TORCH64_VS_REF64
