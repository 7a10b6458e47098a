"""The torch_impl TransformerSeq2Seq on CUDA (float64, float32) against the float64 reference:
logits, loss and every parameter's gradient of a training step, and the tokens of
``generate()`` (greedy, beam, pointer), with the model, its caches and its outputs on the
device. The CPU runs of the same checks are in test_transformer_seq2seq.py; here only the
device differs (the CUDA kernels: Triton attention and layer norm, cuBLAS products).

Each check is a function of the device, so the same body runs on the CPU where no GPU is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference.transformer_seq2seq as ref
import torch_impl.transformer_seq2seq as tim

from .parity import assert_close
from .strategies import to_torch
from .test_transformer_seq2seq import (
    POINTER,
    SINGLE,
    UNEQUAL,
    VARIANT_IDS,
    VARIANTS,
    Shape,
    Variant,
    assert_gradients_close,
    config_of,
    make_inputs,
    reference_params,
    run_reference,
    shapes,
    tim_config,
    torch_inputs,
)
from .tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64

BUDGETS = {torch.float64: TORCH64_VS_REF64, torch.float32: TORCH32_VS_REF64}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (the Transformer Seq2Seq on the GPU)")


def check_training_step(device: str, dtype: torch.dtype, variant: Variant, shape: Shape,
                        dropout: float) -> None:
    """A training step on ``device``: logits, loss and every gradient within the dtype's
    budget of the float64 reference, every gradient on the device."""
    config = config_of(variant, dropout)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    logits, loss, grads = run_reference(config, params, inputs)
    model = tim.TransformerSeq2Seq(tim_config(config), dtype=dtype).train()
    model.load_state_dict({k: to_torch(v, dtype) for k, v in params.items()})
    model.to(device)
    t = {k: v if v is None or isinstance(v, dict) else v.to(device)
         for k, v in torch_inputs(inputs, dtype).items()}
    if t["masks"] is not None:
        t["masks"] = {k: v.to(device) for k, v in t["masks"].items()}
    t_logits, t_loss = model(t["src"], t["src_lengths"], t["tgt_in"], t["targets"],
                             dropout_masks=t["masks"])
    (inputs.dloss * t_loss + (t_logits * t["dlogits"]).sum()).backward()
    assert t_logits.device.type == device and t_loss.device.type == device
    t_grads = {k: p.grad for k, p in model.named_parameters()}
    off = sorted(k for k, g in t_grads.items() if g.device.type != device)
    assert not off, f"gradients off the device: {off[:3]}"
    budget = BUDGETS[dtype]
    assert_close(t_logits.cpu(), logits, budget.forward, "logits")
    assert_close(t_loss.cpu(), loss, budget.forward, "loss")
    assert_gradients_close({k: g.cpu() for k, g in t_grads.items()}, grads, budget.gradient,
                           dtype)


def check_generate(device: str, dtype: torch.dtype, variant: Variant, options: dict) -> None:
    """generate() on ``device`` gives the reference's tokens (peaked weights: no float ties),
    on the device."""
    config = config_of(variant)
    params = {k: 3 * v for k, v in reference_params(config, 3).items()}
    inputs = make_inputs(config, UNEQUAL)
    options = {"max_new_tokens": 6, "decoder_start_token_id": 1, "eos_token_id": 2,
               "pad_token_id": 0, **options}
    r_model = ref.TransformerSeq2Seq(config, seed=0).eval()
    r_model.params = params
    expected = r_model.generate(inputs.src, inputs.src_lengths, **options)
    model = tim.TransformerSeq2Seq(tim_config(config), dtype=dtype).eval()
    model.load_state_dict({k: to_torch(v, dtype) for k, v in params.items()})
    model.to(device)
    src = torch.from_numpy(inputs.src).to(device)
    lengths = torch.from_numpy(inputs.src_lengths).to(device)
    got = model.generate(src, lengths, **options)
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), expected, err_msg=f"{device} {dtype}")


GENERATE_OPTIONS = [{}, {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.7}]


@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(), dropout=st.sampled_from([0.0, 0.25]))
@example(shape=SINGLE, dropout=0.0)
@example(shape=UNEQUAL, dropout=0.25)
@settings(max_examples=4)
@pytest.mark.gpu
@needs_cuda
def test_training_step_on_cuda_matches_reference(dtype, variant: Variant, shape: Shape,
                                                 dropout: float) -> None:
    check_training_step("cuda", dtype, variant, shape, dropout)


@pytest.mark.parametrize("options", GENERATE_OPTIONS, ids=["greedy", "beam"])
@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS[:2] + [POINTER], ids=VARIANT_IDS[:2] + ["pointer"])
@pytest.mark.gpu
@needs_cuda
def test_generate_on_cuda_gives_the_reference_tokens(variant: Variant, dtype,
                                                     options: dict) -> None:
    check_generate("cuda", dtype, variant, options)


@pytest.mark.parametrize("variant", [VARIANTS[0], POINTER], ids=["post-relu-sin", "pointer"])
def test_the_device_checks_pass_on_the_cpu(variant: Variant) -> None:
    """The bodies of the CUDA tests above, run on the CPU: they are sound checks where they
    can run, so a failure on the GPU is the GPU's."""
    check_training_step("cpu", torch.float32, variant, UNEQUAL, 0.25)
    check_generate("cpu", torch.float32, variant, GENERATE_OPTIONS[1])
