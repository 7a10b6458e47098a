"""GPT's step interface (``init_state`` / ``prefill`` / ``step``) in both backends, with and
without the KV cache, under the decoders of reference/decoding.py and torch_impl/decoding.py.

Outside oracle: transformers' ``GPT2LMHeadModel.generate`` on a small random float64 model saved
with ``save_pretrained`` and read back by ``load_gpt2``. A prompt (B, P) is continued as
``prefill(prompt[:, :-1])`` then a decoder with ``bos = prompt[:, -1]``, so the first generated
token comes from the logits at the prompt's last position, as in ``generate``. Conventions:

- ``generate`` is given ``attention_mask = ones``: without it, prompt tokens equal to
  ``pad_token_id`` would be masked out as padding.
- Beam search agrees with ``generate(num_beams=4, length_penalty=1.0)`` on tokens and on
  ``sequences_scores`` (Σ log p / L ** length_penalty, L counting the generated tokens with the
  EOS) without an EOS (``eos_token_id=None``) and, with one, for ``early_stopping="never"``:
  our stopping rule (stop once the best pooled score beats what any live beam could still reach)
  is that exact bound. ``early_stopping=True`` stops as soon as num_beams hypotheses have ended
  and can return a worse hypothesis than ours; it is not compared. Our tokens after EOS hold
  eos_id, which is also the pad_token_id given to ``generate``.
- ``sequences_scores`` come out of transformers near float32 precision even for a float64 model,
  so scores against it use the float32 budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference.decoding as ref_decoding
import reference.gpt2 as ref_gpt2
import reference.transformer as ref
import torch_impl.decoding as tim_decoding
import torch_impl.gpt2 as tim_gpt2
import torch_impl.transformer as tim

from .parity import assert_close, to_numpy
from .tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64

BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])
SIZES = dict(vocab_size=11, block_size=9, n_layer=2, n_head=2, n_embd=8)
BATCH, STEPS, BEAMS = 3, 9, 3


def models(seed: int = 0) -> dict:
    """A random float64 GPT in each backend with the same parameters (drawn away from GPT-2's
    init, biases and layer norms included, so that a wrong position or cache shows)."""
    model = ref.GPT(ref.GPTConfig(**SIZES), seed=seed)
    rng = np.random.default_rng(seed + 1)
    model.params = {name: value + 0.3 * rng.standard_normal(value.shape)
                    for name, value in model.params.items()}
    twin = tim.GPT(tim.GPTConfig(**SIZES), dtype=torch.float64).eval()
    twin.load_state_dict({name: torch.from_numpy(value) for name, value in model.params.items()})
    return {"reference": model, "torch_impl": twin}


def ids_of(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (BATCH, STEPS))


def as_backend(backend: str, array: np.ndarray):
    return array if backend == "reference" else torch.from_numpy(array)


def full_logits(backend: str, model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(model(as_backend(backend, ids))[0])


def stepped_logits(backend: str, model, ids: np.ndarray, kv_cache: bool) -> np.ndarray:
    state, logits = model.init_state(ids.shape[0], kv_cache=kv_cache), []
    for t in range(ids.shape[1]):
        step_logits, state = model.step(as_backend(backend, ids[:, t]), state)
        logits.append(to_numpy(step_logits))
    return np.stack(logits, axis=1)


def decoding(backend: str):
    return ref_decoding if backend == "reference" else tim_decoding


def decode(backend: str, model, bos: np.ndarray, kv_cache: bool, beam_size: int | None = None,
           eos_id: int | None = None, state=None):
    """Greedy (beam_size None) or beam search from bos (B,), as numpy results."""
    module = decoding(backend)
    if state is None:
        state = model.init_state(len(bos), kv_cache=kv_cache)
    bos = as_backend(backend, bos)
    if beam_size is None:
        result = module.greedy_decode(model.step, state, bos, STEPS - 1, eos_id=eos_id)
    else:
        result = module.beam_search(model.step, state, bos, STEPS - 1, beam_size, eos_id=eos_id,
                                    n_best=beam_size)
    return type(result)(*(to_numpy(field) for field in result))


def assert_same_tokens(actual, expected, budget: float, name: str) -> None:
    np.testing.assert_array_equal(actual.tokens, expected.tokens, err_msg=f"{name} tokens")
    np.testing.assert_array_equal(actual.lengths, expected.lengths, err_msg=f"{name} lengths")
    finite = np.isfinite(expected.scores)
    np.testing.assert_array_equal(np.isfinite(actual.scores), finite, err_msg=f"{name} slots")
    assert_close(actual.scores[finite], expected.scores[finite], budget, f"{name} scores")


# ----------------------------------------------------------------------------- the step

@BACKENDS
@pytest.mark.parametrize("kv_cache", [True, False])
def test_stepping_token_by_token_reproduces_the_full_forward(backend: str, kv_cache: bool) -> None:
    model, ids = models()[backend], ids_of()
    assert_close(stepped_logits(backend, model, ids, kv_cache), full_logits(backend, model, ids),
                 TORCH64_VS_REF64.forward, f"step logits (kv_cache={kv_cache})")


@BACKENDS
def test_step_with_the_kv_cache_equals_step_without_it(backend: str) -> None:
    model, ids = models()[backend], ids_of(3)
    assert_close(stepped_logits(backend, model, ids, True), stepped_logits(backend, model, ids,
                                                                           False),
                 TORCH64_VS_REF64.forward, "kv-cache step logits")


@BACKENDS
@pytest.mark.parametrize("kv_cache", [True, False])
def test_prefill_then_step_continues_the_full_forward(backend: str, kv_cache: bool) -> None:
    model, ids = models()[backend], ids_of(4)
    full = full_logits(backend, model, ids)
    logits, state = model.prefill(as_backend(backend, ids[:, :5]), kv_cache=kv_cache)
    assert_close(to_numpy(logits), full[:, :5], TORCH64_VS_REF64.forward, "prefill logits")
    assert state.position == 5
    for t in range(5, STEPS):
        step_logits, state = model.step(as_backend(backend, ids[:, t]), state)
        assert_close(to_numpy(step_logits), full[:, t], TORCH64_VS_REF64.forward,
                     f"step logits at {t}")


@BACKENDS
def test_kv_cache_holds_keys_and_values_per_layer_with_batch_first(backend: str) -> None:
    model = models()[backend]
    state = model.init_state(BATCH)
    for t in range(4):
        _, state = model.step(as_backend(backend, ids_of()[:, t]), state)
    d = SIZES["n_embd"] // SIZES["n_head"]
    assert state.position == 4 and state.ids is None
    assert len(state.keys) == len(state.values) == SIZES["n_layer"]
    for cached in state.keys + state.values:
        assert tuple(cached.shape) == (BATCH, SIZES["n_head"], 4, d)


@BACKENDS
@pytest.mark.parametrize("kv_cache", [True, False])
def test_step_past_block_size_raises_naming_tokens(backend: str, kv_cache: bool) -> None:
    model, ids = models()[backend], ids_of()
    _, state = model.prefill(as_backend(backend, ids), kv_cache=kv_cache)  # block_size tokens
    with pytest.raises(ValueError, match=r"tokens: position 9 .*block_size = 9"):
        model.step(as_backend(backend, ids[:, 0]), state)


@BACKENDS
def test_step_rejects_bad_tokens_and_state_naming_them(backend: str) -> None:
    model = models()[backend]
    state = model.init_state(2)
    with pytest.raises(ValueError, match="tokens"):
        model.step(as_backend(backend, np.array([0, 1, 2])), state)  # 3 rows, state has 2
    with pytest.raises(ValueError, match="tokens"):
        model.step(as_backend(backend, np.array([0, SIZES["vocab_size"]])), state)
    with pytest.raises(TypeError, match="state"):
        model.step(as_backend(backend, np.array([0, 1])), {"position": 0})
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)


def test_nan_weights_stop_decoding_with_a_clear_error() -> None:
    """A torch_impl GPT step skips the NaN scans of its weights and intermediates; NaN weights
    still stop decoding: init_state names the weight, and a weight spoiled after it the
    decoder's logits check names the logits, never garbage tokens."""
    model = tim.GPT(tim.GPTConfig(**SIZES), dtype=torch.float64).eval()
    state = model.init_state(2)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits: contains NaN"):
        tim_decoding.greedy_decode(model.step, state, torch.zeros(2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"params\['transformer.h.0.mlp.c_fc.weight'\]"):
        model.init_state(2)


# ----------------------------------------------------------------------------- decoders

@BACKENDS
@pytest.mark.parametrize("beam_size", [None, BEAMS], ids=["greedy", "beam"])
def test_decoding_gives_the_same_tokens_with_and_without_the_kv_cache(
        backend: str, beam_size: int | None) -> None:
    model, bos = models()[backend], ids_of()[:, 0]
    with_cache = decode(backend, model, bos, True, beam_size, eos_id=4)
    without = decode(backend, model, bos, False, beam_size, eos_id=4)
    assert_same_tokens(with_cache, without, TORCH64_VS_REF64.forward, "kv cache vs none")


@pytest.mark.parametrize("beam_size", [None, BEAMS], ids=["greedy", "beam"])
@pytest.mark.parametrize("eos_id", [None, 4])
def test_both_backends_decode_the_same_tokens_and_scores(beam_size: int | None,
                                                         eos_id: int | None) -> None:
    pair, bos = models(5), ids_of(6)[:, 0]
    expected = decode("reference", pair["reference"], bos, True, beam_size, eos_id)
    actual = decode("torch_impl", pair["torch_impl"], bos, True, beam_size, eos_id)
    assert_same_tokens(actual, expected, TORCH64_VS_REF64.forward, "torch_impl vs reference")


# ----------------------------------------------------------------------------- transformers

HF_VOCAB, PROMPT, NEW_TOKENS, HF_EOS = 7, 3, 8, 2


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(GPT2LMHeadModel float64, its save_pretrained directory, prompt (2, PROMPT))."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=HF_VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    torch.manual_seed(5)  # a seed whose beams end at EOS at different lengths
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model = model.double()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    prompt = torch.randint(0, HF_VOCAB, (3, PROMPT))
    return model, directory, prompt


def hf_generate(model, prompt: torch.Tensor, eos_id: int | None, **kwargs):
    """generate's new tokens (B, NEW_TOKENS) padded with eos_id (0 without), and its output."""
    pad = 0 if eos_id is None else eos_id
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=pad, eos_token_id=eos_id,
                         return_dict_in_generate=True, output_scores=True, **kwargs)
    tokens = out.sequences[:, PROMPT:].numpy()
    return np.pad(tokens, ((0, 0), (0, NEW_TOKENS - tokens.shape[1])), constant_values=pad), out


def ours_from_prompt(backend: str, directory, prompt: torch.Tensor, eos_id: int | None,
                     beam_size: int | None):
    if backend == "reference":
        model = ref_gpt2.load_gpt2(directory)
    else:
        model = tim_gpt2.load_gpt2(directory, dtype=torch.float64)
    prompt_np = prompt.numpy()
    _, state = model.prefill(as_backend(backend, prompt_np[:, :-1]))
    module, bos = decoding(backend), as_backend(backend, prompt_np[:, -1])
    if beam_size is None:
        result = module.greedy_decode(model.step, state, bos, NEW_TOKENS, eos_id=eos_id)
    else:
        result = module.beam_search(model.step, state, bos, NEW_TOKENS, beam_size,
                                    eos_id=eos_id, length_penalty=1.0)
    return type(result)(*(to_numpy(field) for field in result))


@BACKENDS
@pytest.mark.parametrize("eos_id", [None, HF_EOS])
def test_greedy_from_a_prompt_matches_transformers_generate(backend: str, eos_id: int | None,
                                                            hf_checkpoint) -> None:
    model, directory, prompt = hf_checkpoint
    expected, _ = hf_generate(model, prompt, eos_id)
    ours = ours_from_prompt(backend, directory, prompt, eos_id, None)
    np.testing.assert_array_equal(ours.tokens, expected)


@BACKENDS
@pytest.mark.parametrize("eos_id", [None, HF_EOS])
def test_beam_search_from_a_prompt_matches_transformers_generate(backend: str,
                                                                 eos_id: int | None,
                                                                 hf_checkpoint) -> None:
    model, directory, prompt = hf_checkpoint
    expected, out = hf_generate(model, prompt, eos_id, num_beams=4, length_penalty=1.0,
                                early_stopping="never")
    ours = ours_from_prompt(backend, directory, prompt, eos_id, 4)
    np.testing.assert_array_equal(ours.tokens[:, 0], expected)
    # transformers' sequences_scores carry float32 rounding: the float32 budget
    assert_close(ours.scores[:, 0], out.sequences_scores.numpy(), TORCH32_VS_REF64.forward,
                 "sequences_scores")
    if eos_id is not None:  # the seed makes this path exercise EOS at different lengths
        assert len(set(ours.lengths[:, 0].tolist())) > 1
