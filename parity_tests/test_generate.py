"""``GPT.generate`` in both backends (reference/generation.py, torch_impl/generation.py).

Outside oracle: transformers' ``GPT2LMHeadModel.generate`` on a small random float64 GPT-2
saved with ``save_pretrained`` and read back by each backend's ``load_gpt2``: the same
sequences token for token (and the same ``sequences_scores`` for beam search) for greedy
decoding, beam search under each ``early_stopping`` and several length penalties, the
repetition penalty, the n-gram ban, ``min_new_tokens``, several EOS ids,
``num_return_sequences`` and left-padded batches of unequal prompts. transformers is always
given an ``attention_mask`` and a ``pad_token_id``, as a user of padded batches gives them.

Between the backends: the same tokens for every option, sampling included (the same
uniforms). Properties: top_k = 1 sampling is greedy; a left-padded batch gives each row
what the prompt gives alone; beam search with as many beams as prefixes is the brute-force
best; ``generate`` equals the step-interface decoders with and without the KV cache.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference
import reference.decoding as ref_decoding
import reference.gpt2 as ref_gpt2
import torch_impl
import torch_impl.decoding as tim_decoding
import torch_impl.gpt2 as tim_gpt2
from reference.generation import GenerationConfig

from .parity import assert_close, to_numpy
from .tolerances import TORCH32_VS_REF64

transformers = pytest.importorskip("transformers")

BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])
VOCAB, POSITIONS, NEW = 11, 24, 9
PAD, EOS, EOS2 = 1, 2, 5  # PAD != 0: transformers beam search fills with EOS when pad is 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(GPT2LMHeadModel float64, {backend: our GPT loaded from its save_pretrained dir})."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=8, n_layer=2, n_head=2,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    torch.manual_seed(11)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # away from the init: peaked distributions, EOS at varied lengths
        for p in model.parameters():
            p.add_(0.6 * torch.randn_like(p))
    model = model.double()
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    ours = {"reference": ref_gpt2.load_gpt2(directory),
            "torch_impl": tim_gpt2.load_gpt2(directory, dtype=torch.float64)}
    return model, ours


def prompts(lengths: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of the given lengths: (ids (B, P), mask (B, P)), pad = PAD."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(0, VOCAB, n)
        mask[row, width - n:] = 1
    return ids, mask


def hf_generate(hf, ids: np.ndarray, mask: np.ndarray, **options) -> tuple[np.ndarray, object]:
    options = {"max_new_tokens": NEW, "pad_token_id": PAD, "do_sample": False, **options}
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          return_dict_in_generate=True, output_scores=True, **options)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def generate(backend: str, model, ids: np.ndarray, mask: np.ndarray | None, **options):
    """(sequences, scores or None) as numpy from ``model.generate``."""
    options = {"max_new_tokens": NEW, "pad_token_id": PAD, **options}
    if backend == "torch_impl":
        ids = torch.from_numpy(ids)
        mask = None if mask is None else torch.from_numpy(mask)
        if options.get("uniforms") is not None:
            options["uniforms"] = torch.from_numpy(options["uniforms"])
    out = model.generate(ids, mask, return_dict=True, **options)
    scores = None if out.sequences_scores is None else to_numpy(out.sequences_scores)
    return to_numpy(out.sequences), scores


GREEDY = {
    "plain": {},
    "eos": {"eos_token_id": EOS},
    "two_eos": {"eos_token_id": [EOS, EOS2]},
    "min_new_tokens": {"eos_token_id": [EOS, EOS2], "min_new_tokens": 5},
    "repetition_penalty": {"repetition_penalty": 1.8},
    "repetition_bonus": {"repetition_penalty": 0.6},
    "no_repeat_1gram": {"no_repeat_ngram_size": 1},
    "no_repeat_2gram": {"no_repeat_ngram_size": 2},
    "no_repeat_3gram": {"no_repeat_ngram_size": 3, "eos_token_id": EOS},
}
BEAM = {
    **{f"early_{early}_lp_{lp}": {"num_beams": 4, "eos_token_id": EOS, "early_stopping": early,
                                  "length_penalty": lp}
       for early, lp in itertools.product((True, False, "never"), (1.0, 0.4, 2.5, -1.0))},
    "no_eos": {"num_beams": 3},
    "two_eos": {"num_beams": 3, "eos_token_id": [EOS, EOS2]},
    "return_3_of_4": {"num_beams": 4, "num_return_sequences": 3, "eos_token_id": EOS},
    "repetition_penalty": {"num_beams": 4, "repetition_penalty": 1.5, "eos_token_id": EOS},
    "no_repeat_2gram": {"num_beams": 4, "no_repeat_ngram_size": 2, "eos_token_id": EOS2},
    "min_new_tokens": {"num_beams": 2, "eos_token_id": [EOS, EOS2], "min_new_tokens": 4},
}
PADDED = {
    "greedy": {"eos_token_id": EOS},
    "greedy_two_eos": {"eos_token_id": [EOS, EOS2], "min_new_tokens": 2},
    "beam": {"num_beams": 4, "eos_token_id": EOS, "early_stopping": False},
    "beam_return_2": {"num_beams": 3, "num_return_sequences": 2, "eos_token_id": EOS2,
                      "length_penalty": 0.5},
}
SAMPLING = {
    "plain": {"do_sample": True},
    "temperature_top_k": {"do_sample": True, "temperature": 0.7, "top_k": 3, "eos_token_id": EOS},
    "top_p": {"do_sample": True, "top_p": 0.8, "num_return_sequences": 2},
    "penalties": {"do_sample": True, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                  "min_new_tokens": 3, "eos_token_id": [EOS, EOS2]},
}


def case(table: dict) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("options", list(table.values()), ids=list(table))


@BACKENDS
@case(GREEDY)
def test_greedy_matches_transformers_generate(backend, options, checkpoint) -> None:
    hf, ours = checkpoint
    ids, mask = prompts((4, 4, 4))
    expected, _ = hf_generate(hf, ids, mask, **options)
    actual, _ = generate(backend, ours[backend], ids, None, **options)
    np.testing.assert_array_equal(actual, expected)


@BACKENDS
@case(BEAM)
def test_beam_search_matches_transformers_generate(backend, options, checkpoint) -> None:
    hf, ours = checkpoint
    ids, mask = prompts((3, 3, 3), seed=1)
    expected, expected_scores = hf_generate(hf, ids, mask, **options)
    actual, scores = generate(backend, ours[backend], ids, None, **options)
    np.testing.assert_array_equal(actual, expected)
    # transformers keeps beam scores in float32: the float32 budget
    assert_close(scores, expected_scores, TORCH32_VS_REF64.forward, "sequences_scores")


def test_the_beam_cases_end_hypotheses_at_different_lengths(checkpoint) -> None:
    """The seed makes the beam cases exercise EOS mid-generation, not only at the end."""
    hf, _ = checkpoint
    ids, mask = prompts((3, 3, 3), seed=1)
    sequences, _ = hf_generate(hf, ids, mask, num_beams=4, eos_token_id=EOS,
                               early_stopping=False, num_return_sequences=4)
    ended = [int(np.flatnonzero(row == EOS)[0]) if EOS in row[3:] else None
             for row in sequences[:, 3:]]
    assert len(set(ended)) > 2


@BACKENDS
@case(PADDED)
def test_left_padded_batches_match_transformers_generate(backend, options, checkpoint) -> None:
    hf, ours = checkpoint
    ids, mask = prompts((2, 5, 1, 4), seed=3)
    expected, expected_scores = hf_generate(hf, ids, mask, **options)
    actual, scores = generate(backend, ours[backend], ids, mask, **options)
    np.testing.assert_array_equal(actual, expected)
    if expected_scores is not None:
        assert_close(scores, expected_scores, TORCH32_VS_REF64.forward, "sequences_scores")


@pytest.mark.parametrize("options", [*GREEDY.values(), *BEAM.values(), *PADDED.values(),
                                     *SAMPLING.values()])
def test_both_backends_generate_the_same_tokens(options, checkpoint) -> None:
    _, ours = checkpoint
    ids, mask = prompts((2, 5, 3), seed=4)
    rows = ids.shape[0] * options.get("num_return_sequences", 1)
    if options.get("do_sample"):
        options = {**options, "uniforms": np.random.default_rng(5).random((rows, NEW))}
    expected, expected_scores = generate("reference", ours["reference"], ids, mask, **options)
    actual, scores = generate("torch_impl", ours["torch_impl"], ids, mask, **options)
    np.testing.assert_array_equal(actual, expected)
    if expected_scores is not None:
        assert_close(scores, expected_scores, TORCH32_VS_REF64.forward, "sequences_scores")


@BACKENDS
def test_sampling_with_top_k_1_is_greedy(backend, checkpoint) -> None:
    _, ours = checkpoint
    ids, mask = prompts((3, 1, 4), seed=6)
    uniforms = np.random.default_rng(7).random((3, NEW))
    sampled, _ = generate(backend, ours[backend], ids, mask, do_sample=True, top_k=1,
                          temperature=1.7, uniforms=uniforms, eos_token_id=EOS)
    greedy, _ = generate(backend, ours[backend], ids, mask, eos_token_id=EOS)
    np.testing.assert_array_equal(sampled, greedy)


@BACKENDS
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       beams=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
@example(lengths=[1], beams=1, seed=0)
@example(lengths=[6, 1], beams=3, seed=1)
def test_a_left_padded_batch_gives_each_row_its_prompt_alone(backend, lengths, beams, seed,
                                                             checkpoint) -> None:
    _, ours = checkpoint
    ids, mask = prompts(tuple(lengths), seed=seed)
    options = {"max_new_tokens": 5, "num_beams": beams, "eos_token_id": EOS}
    batch, _ = generate(backend, ours[backend], ids, mask, **options)
    width = ids.shape[1]
    for row, n in enumerate(lengths):
        alone, _ = generate(backend, ours[backend], ids[row:row + 1, width - n:], None, **options)
        new = batch[row, width:]
        np.testing.assert_array_equal(new[:alone.shape[1] - n], alone[0, n:])
        assert np.all(new[alone.shape[1] - n:] == PAD)  # the longer rows' padding


@BACKENDS
def test_beam_search_with_a_beam_per_prefix_finds_the_brute_force_best(backend,
                                                                       checkpoint) -> None:
    """With num_beams >= V^(L-1) every prefix stays live: the best of all V^L continuations
    by Σ log p (no EOS, so every hypothesis has length L) is returned, and so are the next."""
    _, ours = checkpoint
    model, new = ours[backend], 2
    prompt = np.array([[3, 1, 4]])
    continuations = np.array(list(itertools.product(range(VOCAB), repeat=new)))
    full = np.concatenate([np.repeat(prompt, len(continuations), axis=0), continuations], axis=1)
    logits = to_numpy(model(full if backend == "reference" else torch.from_numpy(full))[0])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    steps = np.arange(prompt.shape[1] - 1, full.shape[1] - 1)
    totals = logp[:, steps, :][np.arange(len(full))[:, None], np.arange(new),
                               continuations].sum(axis=1)
    best = np.argsort(-totals, kind="stable")[:3]
    actual, scores = generate(backend, model, prompt, None, max_new_tokens=new,
                              num_beams=VOCAB, num_return_sequences=3)
    np.testing.assert_array_equal(actual[:, 3:], continuations[best])
    assert_close(scores, totals[best] / new, TORCH32_VS_REF64.forward, "sequences_scores")


@BACKENDS
@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_the_step_interface_decoders(backend, kv_cache, beams,
                                                     checkpoint) -> None:
    """generate's greedy = greedy_decode and its beam search without EOS = beam_search's best
    (the two agree when no hypothesis ends early), on prefill + step with or without the
    KV cache."""
    _, ours = checkpoint
    model = ours[backend]
    decoding = ref_decoding if backend == "reference" else tim_decoding
    ids, _ = prompts((4, 4), seed=8)
    as_backend = (lambda a: a) if backend == "reference" else torch.from_numpy
    _, state = model.prefill(as_backend(ids[:, :-1]), kv_cache=kv_cache)
    if beams == 1:
        tokens = decoding.greedy_decode(model.step, state, as_backend(ids[:, -1]), NEW).tokens
    else:
        result = decoding.beam_search(model.step, state, as_backend(ids[:, -1]), NEW, beams)
        tokens = result.tokens[:, 0]
    actual, _ = generate(backend, model, ids, None, num_beams=beams)
    np.testing.assert_array_equal(actual[:, 4:], to_numpy(tokens))


@BACKENDS
def test_streaming_yields_the_tokens_generate_returns(backend, checkpoint) -> None:
    _, ours = checkpoint
    model = ours[backend]
    ids, mask = prompts((3, 2), seed=9)
    options = {"eos_token_id": EOS, "max_new_tokens": NEW, "pad_token_id": PAD}
    expected, _ = generate(backend, model, ids, mask, **options)
    as_backend = (lambda a: a) if backend == "reference" else torch.from_numpy
    streamed = [to_numpy(t) for t in model.generate_stream(as_backend(ids), as_backend(mask),
                                                           **options)]
    np.testing.assert_array_equal(np.stack(streamed, axis=1), expected[:, 3:])
    called = []
    model.generate(as_backend(ids), as_backend(mask), streamer=lambda t: called.append(
        to_numpy(t)), **options)
    np.testing.assert_array_equal(np.stack(called, axis=1), expected[:, 3:])

    class Streamer:  # transformers' streamer protocol: the prompt, each step, then end()
        def __init__(self) -> None:
            self.put_calls, self.ended = [], False

        def put(self, value) -> None:
            self.put_calls.append(to_numpy(value))

        def end(self) -> None:
            self.ended = True

    streamer = Streamer()
    model.generate(as_backend(ids), as_backend(mask), streamer=streamer, **options)
    np.testing.assert_array_equal(streamer.put_calls[0], ids)
    np.testing.assert_array_equal(np.stack(streamer.put_calls[1:], axis=1), expected[:, 3:])
    assert streamer.ended


def test_a_seed_fixes_the_samples_and_a_generator_is_honoured(checkpoint) -> None:
    _, ours = checkpoint
    ids, _ = prompts((3, 3), seed=10)
    for backend, model in ours.items():
        inputs = ids if backend == "reference" else torch.from_numpy(ids)
        first = to_numpy(model.generate(inputs, do_sample=True, seed=3))
        np.testing.assert_array_equal(to_numpy(model.generate(inputs, do_sample=True, seed=3)),
                                      first)
        rng = np.random.default_rng(3) if backend == "reference" else \
            torch.Generator().manual_seed(3)
        second = to_numpy(model.generate(inputs, do_sample=True, generator=rng))
        assert second.shape == first.shape


def test_a_transformers_generation_config_is_accepted(checkpoint) -> None:
    hf, ours = checkpoint
    ids, mask = prompts((3, 3), seed=12)
    config = transformers.GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=EOS,
                                           pad_token_id=PAD, length_penalty=0.7)
    with torch.no_grad():
        expected = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               generation_config=config).numpy()
    for backend, model in ours.items():
        inputs = ids if backend == "reference" else torch.from_numpy(ids)
        np.testing.assert_array_equal(to_numpy(model.generate(inputs, generation_config=config)),
                                      expected)
        ours_config = GenerationConfig(max_new_tokens=6, num_beams=3, eos_token_id=EOS,
                                       pad_token_id=PAD, length_penalty=0.7)
        np.testing.assert_array_equal(
            to_numpy(model.generate(inputs, generation_config=ours_config)), expected)


def test_both_backends_define_the_same_generation_config() -> None:
    """Twins, not one class (the backends stay independent): the same fields and defaults,
    and either one resolves to the other's (the cross-backend use is tested above)."""
    from dataclasses import asdict

    assert asdict(reference.GenerationConfig()) == asdict(torch_impl.GenerationConfig())
    ours = reference.GenerationConfig(num_beams=3, eos_token_id=[2, 5], early_stopping="never")
    twin = torch_impl.generation.resolve_config(ours, {"max_new_tokens": 7})
    assert isinstance(twin, torch_impl.GenerationConfig)
    assert asdict(twin) == {**asdict(ours), "max_new_tokens": 7}


# ----------------------------------------------------------------------------- bad input

BAD_OPTIONS = [
    ({"temperature": 0.0, "do_sample": True}, ValueError, "temperature"),
    ({"temperature": -1.0, "do_sample": True}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 2.5}, TypeError, "top_k"),
    ({"num_beams": 0}, ValueError, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, ValueError, "num_return_sequences"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences"),
    ({"num_beams": 2, "do_sample": True}, ValueError, "do_sample"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"min_new_tokens": -1}, ValueError, "min_new_tokens"),
    ({"early_stopping": "sometimes"}, ValueError, "early_stopping"),
    ({"eos_token_id": VOCAB}, ValueError, "eos_token_id"),
    ({"eos_token_id": [1, -1]}, ValueError, "eos_token_id"),
    ({"eos_token_id": []}, ValueError, "eos_token_id"),
    ({"eos_token_id": "2"}, TypeError, "eos_token_id"),
    ({"pad_token_id": VOCAB + 3}, ValueError, "pad_token_id"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"no_repeat_ngram_size": -2}, ValueError, "no_repeat_ngram_size"),
    ({"length_penalty": float("inf")}, ValueError, "length_penalty"),
    ({"do_sample": 1}, TypeError, "do_sample"),
    ({"beams": 4}, TypeError, "unknown option"),
    ({"max_new_tokens": POSITIONS}, ValueError, "positions"),
]


@BACKENDS
@pytest.mark.parametrize("options,error,name", BAD_OPTIONS,
                         ids=[f"{name}-{i}" for i, (_, _, name) in enumerate(BAD_OPTIONS)])
def test_bad_options_raise_naming_the_option(backend, options, error, name, checkpoint) -> None:
    _, ours = checkpoint
    ids, _ = prompts((3, 3))
    inputs = ids if backend == "reference" else torch.from_numpy(ids)
    with pytest.raises(error, match=name):
        ours[backend].generate(inputs, **options)


def bad_prompts() -> list[tuple[object, object, type, str]]:
    ids, mask = prompts((2, 3))
    right = mask[:, ::-1].copy()
    return [
        (ids.astype(np.float64), None, TypeError, "input_ids"),
        (ids[0], None, ValueError, "input_ids"),
        (ids + VOCAB, None, ValueError, "input_ids"),
        (ids[:, :0], None, ValueError, "input_ids"),
        (ids, mask[:, 1:], ValueError, "attention_mask"),
        (ids, mask * 2, ValueError, "attention_mask"),
        (ids, mask.astype(np.float64), TypeError, "attention_mask"),
        (ids, right, ValueError, "left padding"),
        (ids, np.array([[1, 0, 1], [1, 1, 1]]), ValueError, "padding after a token"),
        (ids, [[1, 1, 1], [1, 1, 1]], TypeError, "attention_mask"),
    ]


@BACKENDS
@pytest.mark.parametrize("index", range(len(bad_prompts())))
def test_bad_prompts_and_masks_raise_naming_them(backend, index, checkpoint) -> None:
    _, ours = checkpoint
    ids, mask, error, name = bad_prompts()[index]
    if backend == "torch_impl":
        ids = torch.from_numpy(ids)
        mask = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
    with pytest.raises(error, match=name):
        ours[backend].generate(ids, mask)


@BACKENDS
def test_bad_uniforms_and_generators_raise_naming_them(backend, checkpoint) -> None:
    _, ours = checkpoint
    ids, _ = prompts((3, 3))
    model = ours[backend]
    inputs = ids if backend == "reference" else torch.from_numpy(ids)
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    with pytest.raises(ValueError, match="uniforms"):
        model.generate(inputs, do_sample=True, uniforms=wrap(np.full((2, 3), 0.5)))
    with pytest.raises(ValueError, match="uniforms"):
        model.generate(inputs, do_sample=True, uniforms=wrap(np.full((2, 20), 1.0)))
    with pytest.raises(ValueError, match="uniforms"):
        model.generate(inputs, uniforms=wrap(np.full((2, 20), 0.5)))
    with pytest.raises(TypeError, match="generator"):
        model.generate(inputs, do_sample=True, generator=3)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(inputs, num_beams=2, streamer=print)


@BACKENDS
def test_non_finite_weights_are_refused_once_per_call(backend, checkpoint, tmp_path) -> None:
    hf, _ = checkpoint
    hf.save_pretrained(tmp_path)
    model = ref_gpt2.load_gpt2(tmp_path) if backend == "reference" else \
        tim_gpt2.load_gpt2(tmp_path, dtype=torch.float64)
    ids, _ = prompts((3, 3))
    if backend == "reference":
        model.params["transformer.h.1.mlp.c_fc.weight"][0, 0] = np.nan
        inputs = ids
    else:
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
        inputs = torch.from_numpy(ids)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        model.generate(inputs)


# ----------------------------------------------------------------------------- RNNLM, Seq2Seq

def recurrent_models(kind: str, cell: str, seed: int = 0) -> dict:
    """A float64 RNNLM or Seq2Seq (Luong "general" attention) in each backend, same weights
    (scaled up from torch's init, so that the distributions are peaked)."""
    if kind == "rnnlm":
        twin = torch_impl.RNNLM(VOCAB, 5, 6, 2, cell, dtype=torch.float64)
        model = reference.RNNLM(VOCAB, 5, 6, 2, cell)
    else:
        config = dict(src_vocab=9, tgt_vocab=VOCAB, embed_size=5, hidden_size=3, num_layers=2,
                      cell=cell, bidirectional=True, attention="general")
        twin = torch_impl.Seq2Seq(torch_impl.Seq2SeqConfig(**config), dtype=torch.float64)
        model = reference.Seq2Seq(reference.Seq2SeqConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(4.0).add_(0.3 * torch.randn_like(p))
    model.load_state_dict(twin.state_dict())
    return {"reference": model, "torch_impl": twin.eval()}


def sources(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([4, 2, 3])
    src = rng.integers(1, 9, (3, 4))
    src[np.arange(4) >= lengths[:, None]] = 0
    return src, lengths


def generate_any(backend: str, kind: str, model, inputs: np.ndarray, extra: np.ndarray | None,
                 **options):
    """model.generate for either kind: (prompt ids, attention_mask) or (src, src_lengths)."""
    if kind == "seq2seq":
        options = {"decoder_start_token_id": 1, **options}
    return generate(backend, model, inputs, extra, **options)


RECURRENT_CASES = {**{f"greedy_{k}": v for k, v in GREEDY.items()},
                   **{f"beam_{k}": v for k, v in BEAM.items() if "lp_1.0" in k or "early" not in k},
                   **{f"sample_{k}": v for k, v in SAMPLING.items()}}


@pytest.mark.parametrize("kind,cell", [("rnnlm", "lstm"), ("rnnlm", "gru"),
                                       ("rnnlm", "rnn_tanh"), ("seq2seq", "gru")])
@pytest.mark.parametrize("options", list(RECURRENT_CASES.values()), ids=list(RECURRENT_CASES))
def test_both_backends_generate_the_same_tokens_from_recurrent_models(kind, cell, options
                                                                      ) -> None:
    models_ = recurrent_models(kind, cell)
    inputs, extra = prompts((2, 5, 3), seed=4) if kind == "rnnlm" else sources()
    rows = inputs.shape[0] * options.get("num_return_sequences", 1)
    if options.get("do_sample"):
        options = {**options, "uniforms": np.random.default_rng(5).random((rows, NEW))}
    expected, expected_scores = generate_any("reference", kind, models_["reference"], inputs,
                                             extra, **options)
    actual, scores = generate_any("torch_impl", kind, models_["torch_impl"], inputs, extra,
                                  **options)
    np.testing.assert_array_equal(actual, expected)
    if expected_scores is not None:
        assert_close(scores, expected_scores, TORCH32_VS_REF64.forward, "sequences_scores")


@BACKENDS
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_left_padded_rnnlm_batch_gives_each_row_its_prompt_alone(backend, cell) -> None:
    model = recurrent_models("rnnlm", cell)[backend]
    lengths = (3, 1, 5)
    ids, mask = prompts(lengths, seed=13)
    options = {"max_new_tokens": 6, "num_beams": 2}
    batch, _ = generate(backend, model, ids, mask, **options)
    for row, n in enumerate(lengths):
        alone, _ = generate(backend, model, ids[row:row + 1, 5 - n:], None, **options)
        np.testing.assert_array_equal(batch[row, 5:], alone[0, n:])


@BACKENDS
@pytest.mark.parametrize("kind,beams", [("rnnlm", 1), ("seq2seq", 1), ("seq2seq", 3)])
def test_recurrent_generate_equals_the_step_interface_decoders(backend, kind, beams) -> None:
    """Not RNNLM beams: the step interface's beam_search reorders states on axis 0 and an
    RNNLM state is (L, B, H); the backend-equality and left-padding tests cover them."""
    model = recurrent_models(kind, "lstm")[backend]
    decoding = ref_decoding if backend == "reference" else tim_decoding
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    if kind == "rnnlm":
        ids, _ = prompts((1, 1, 1), seed=14)
        state, bos, offset = model.init_state(3), wrap(ids[:, 0]), 1
        actual, _ = generate(backend, model, ids, None, num_beams=beams)
    else:
        src, lengths = sources(seed=15)
        state = model.encode(wrap(src), wrap(lengths))
        bos, offset = wrap(np.ones(3, dtype=np.int64)), 1
        actual, _ = generate_any(backend, kind, model, src, lengths, num_beams=beams)
    if beams == 1:
        tokens = decoding.greedy_decode(model.step, state, bos, NEW).tokens
    else:
        tokens = decoding.beam_search(model.step, state, bos, NEW, beams).tokens[:, 0]
    np.testing.assert_array_equal(actual[:, offset:], to_numpy(tokens))


@BACKENDS
def test_seq2seq_generate_needs_the_decoder_start_token(backend) -> None:
    model = recurrent_models("seq2seq", "gru")[backend]
    src, lengths = sources()
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        model.generate(wrap(src), wrap(lengths))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        model.generate(wrap(src), wrap(lengths), decoder_start_token_id=VOCAB)
    with pytest.raises(ValueError, match="src_lengths"):
        model.generate(wrap(src), wrap(lengths + 3), decoder_start_token_id=1)


# ----------------------------------------------------------------------------- decode steps

def teacher_forced_steps(backend: str, kind: str, model, inputs: np.ndarray,
                         extra: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
    """The logits (B, T, V) of ``generate``'s decode session fed ``tokens`` (B, T) one at a
    time: the prompt's first token (RNNLM) or the decoder start (Seq2Seq) starts it."""
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    if kind == "rnnlm":
        module = reference.language_model if backend == "reference" else \
            torch_impl.language_model
        session = module._RNNLMSession(model)
    else:
        module = reference.seq2seq if backend == "reference" else torch_impl.seq2seq
        session = module._Seq2SeqSession(model, wrap(inputs), wrap(extra))
    with torch.no_grad():
        logits = [session.start(wrap(tokens[:, :1]), None, 1)]
        logits += [session.step(wrap(tokens[:, t])) for t in range(1, tokens.shape[1])]
    return np.stack([to_numpy(a) for a in logits], axis=1)


@BACKENDS
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_rnnlm_decode_steps_equal_the_full_forward(backend, cell) -> None:
    model = recurrent_models("rnnlm", cell)[backend]
    ids, _ = prompts((6, 6, 6), seed=21)
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    with torch.no_grad():
        expected = to_numpy(model(wrap(ids))[0])
    actual = teacher_forced_steps(backend, "rnnlm", model, ids, None, ids)
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


@BACKENDS
@pytest.mark.parametrize("attention", [None, "dot", "general", "concat", "bahdanau"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_seq2seq_decode_steps_equal_the_teacher_forced_forward(backend, attention, cell
                                                              ) -> None:
    """Every attention score (with its memory side computed once) and each cell, two
    layers, a bidirectional encoder and sources of unequal lengths (masked keys)."""
    config = dict(src_vocab=9, tgt_vocab=VOCAB, embed_size=5, hidden_size=3, num_layers=2,
                  cell=cell, bidirectional=True, attention=attention)
    torch.manual_seed(22)
    twin = torch_impl.Seq2Seq(torch_impl.Seq2SeqConfig(**config), dtype=torch.float64)
    if backend == "reference":
        model = reference.Seq2Seq(reference.Seq2SeqConfig(**config))
        model.load_state_dict(twin.state_dict())
    else:
        model = twin.eval()
    src, lengths = sources(seed=23)
    tgt = np.random.default_rng(24).integers(1, VOCAB, (3, 6))
    wrap = (lambda a: a) if backend == "reference" else torch.from_numpy
    with torch.no_grad():
        expected = to_numpy(model(wrap(src), wrap(lengths), wrap(tgt))[0])
    actual = teacher_forced_steps(backend, "seq2seq", model, src, lengths, tgt)
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["rnnlm", "seq2seq"])
def test_generate_reads_weights_changed_in_place_since_the_last_call(kind) -> None:
    """torch_impl keeps a decode layout of the weights between calls; an in-place update
    (an optimizer step) must be seen by the next generate."""
    models_ = recurrent_models(kind, "lstm")
    inputs, extra = prompts((3, 3, 3), seed=25) if kind == "rnnlm" else sources(seed=25)
    twin = models_["torch_impl"]
    generate_any("torch_impl", kind, twin, inputs, extra)   # builds the layout
    torch.manual_seed(26)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(2.0 * torch.randn_like(p))
    models_["reference"].load_state_dict(twin.state_dict())
    expected, _ = generate_any("reference", kind, models_["reference"], inputs, extra)
    actual, _ = generate_any("torch_impl", kind, twin, inputs, extra)
    np.testing.assert_array_equal(actual, expected)
