"""The torch_impl TransformerSeq2Seq on CUDA (float64, float32) against the float64 reference:
logits, loss and every parameter's gradient of a training step, and the tokens of
``generate()`` (greedy, beam, sampling, pointer), with the model, its caches and its outputs on
the device. The checks are test_transformer_seq2seq.py's, which run them on the CPU; here only
the device differs (Triton attention and layer norm, cuBLAS products).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from .test_transformer_seq2seq import (
    BUDGETS,
    GENERATE_OPTIONS,
    POINTER,
    SINGLE,
    UNEQUAL,
    VARIANT_IDS,
    VARIANTS,
    Shape,
    Variant,
    check_generate,
    check_training_step,
    shapes,
)

NO_CUDA = not torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(NO_CUDA, reason="needs CUDA (the Transformer Seq2Seq on a GPU)"),
]


@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(), dropout=st.sampled_from([0.0, 0.25]))
@example(shape=SINGLE, dropout=0.0)
@example(shape=UNEQUAL, dropout=0.25)
@settings(max_examples=4)
def test_training_step_on_cuda_matches_reference(dtype, variant: Variant, shape: Shape,
                                                 dropout: float) -> None:
    check_training_step(dtype, variant, shape, dropout, device="cuda")


@pytest.mark.parametrize("options", GENERATE_OPTIONS[:2] + GENERATE_OPTIONS[3:4],
                         ids=["greedy", "beam", "sample"])
@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS[:2] + [POINTER], ids=VARIANT_IDS[:2] + ["pointer"])
def test_generate_on_cuda_gives_the_reference_tokens(variant: Variant, dtype,
                                                     options: dict) -> None:
    check_generate(dtype, variant, options, device="cuda")
