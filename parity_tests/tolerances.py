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

# Gradient floors (parity.assert_gradient_close). A gradient that is a sum of O(1) terms
# cancelling by construction comes out far smaller than its terms, and rounding of the terms
# is then most of it with no bug anywhere:
# - Seq2Seq attention scores: de_ij = a_ij (da_ij - Σ_k a_ik da_ik) sums to 0 over a row, so
#   with one live key or keys that score alike it cancels to ~1e-8..1e-10. Bahdanau's
#   key_proj.bias gradient, Σ_ij de_ij v (1 - h²), is then ~1e-8 while its terms are O(0.1).
# - A recurrent layer of hidden size 1 (one reverse step, dropout between the layers; the
#   thorough profile's draw): its dgates cancel, so dbias_hh_l0_reverse is -1.76e-9 from terms
#   near 1e-2, and dweight_ih_l0_reverse, those dgates times O(1) inputs, has norm 2.3e-6.
# Such a tensor, of norm below the floor, is held to budget × floor in absolute terms instead
# of budget × its own norm. Finite differences still hold every tensor to its own norm, and
# every other tensor keeps the relative budget.
# float32: its absolute noise (~4e-8 of the O(1) terms) swamps tensors of norm below 1e-3.
FLOAT32_GRADIENT_FLOOR = 1e-3
# float64: the differences seen are |diff| ~1e-17..1.7e-15 on tensors of norm 1e-8..2e-6 (a
# relative 1.5e-10..7e-10, the dgates' own rounding, amplified by their cancellation). Below
# norm 1e-4 the bound is 1e-10 x 1e-4 = 1e-14 absolute: ~6x the largest difference seen and
# ~100 roundings of an O(1) term.
FLOAT64_GRADIENT_FLOOR = 1e-4
# A gradient that is exactly zero in exact arithmetic (a parameter the output does not depend
# on: the query side of an attention over a single key, where softmax is 1 whatever the query,
# e.g. a pre-LN decoder layer's norm2 over a one-token source) is, in float32, the rounding
# residue of O(1) terms that cancel: 1.37e-7 seen. 1e-6 absolute bounds it at ~8 float32 eps.
FLOAT32_ZERO_GRADIENT = 1e-6

# A recurrent step's new state is a sum that can cancel (c_t = f c_{t-1} + i g in the LSTM,
# h_t = (1 - z) n + z h_{t-1} in the GRU): float32's error is then ~6e-8 x κ relative, κ the
# magnitude of the summed terms (pre-activations included) over the state's. The kernel step
# tests keep draws with κ <= 20, where 6e-8 x 20 ~ 1.2e-6 stays 8x inside the forward budget
# (the batch-1, hidden-1 examples have κ 11 and 16, and stay in); the thorough profile drew
# states of -8e-4 from O(1) terms (κ ~ 1e3) that no float32 sum can hold to 1e-5.
FLOAT32_STEP_CONDITION_LIMIT = 20.0
