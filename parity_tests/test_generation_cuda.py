"""Generation on CUDA: the torch_impl GPT's KV cache and the beams stay on the device, and
greedy / beam search give the tokens and scores of the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_impl.decoding as tim_decoding

from .test_generation import BEAMS, STEPS, assert_same_tokens, decode, ids_of, models
from .tolerances import TORCH64_VS_REF64

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (beam search on the GPU)"),
]


@pytest.mark.parametrize("beam_size", [None, BEAMS], ids=["greedy", "beam"])
@pytest.mark.parametrize("eos_id", [None, 3])
def test_torch_impl_decoding_on_cuda_matches_reference(beam_size, eos_id) -> None:
    pair = models()
    gpt = pair["torch_impl"].cuda()
    bos = ids_of()[:, 0]
    seen_devices = set()

    def step(tokens: torch.Tensor, state):
        seen_devices.add(tokens.device.type)
        seen_devices.update(k.device.type for k in state.keys)
        return gpt.step(tokens, state)

    state = gpt.init_state(len(bos), kv_cache=True)
    bos_cuda = torch.from_numpy(bos).cuda()
    if beam_size is None:
        result = tim_decoding.greedy_decode(step, state, bos_cuda, STEPS - 1, eos_id=eos_id)
    else:
        result = tim_decoding.beam_search(step, state, bos_cuda, STEPS - 1, beam_size,
                                          eos_id=eos_id, n_best=beam_size)
    assert seen_devices == {"cuda"}, f"tokens or KV cache left the device: {seen_devices}"
    assert all(field.device.type == "cuda" for field in result)
    actual = type(result)(*(field.cpu().double().numpy() if field.is_floating_point()
                            else field.cpu().numpy() for field in result))
    expected = decode("reference", pair["reference"], bos, kv_cache=True, beam_size=beam_size,
                      eos_id=eos_id)
    assert_same_tokens(actual, expected, TORCH64_VS_REF64.forward, "cuda vs reference")
    assert np.all(actual.lengths >= 1)
