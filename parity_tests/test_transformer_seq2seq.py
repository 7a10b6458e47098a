"""Parity properties of the Transformer encoder-decoder model: reference/transformer_seq2seq.py
and torch_impl/transformer_seq2seq.py.

Gradients are those of L = dloss · loss + <logits, dlogits> for every parameter tensor, with
unequal source lengths and targets partly PAD (ignored). The properties run over the model's
choices (post-LN / norm_first, relu / gelu, sinusoidal / learned positions, tied / separate
head, with and without biases): the reference against finite differences, torch_impl's
functional pair and its module against the reference (float64 and float32), the same
dropout keep-masks in both; incremental decoding (the KV-cache session of ``generate``)
against the full forward; ``generate`` token for token across the backends.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference.transformer_seq2seq as ref
import torch_impl.transformer_seq2seq as tim
from reference.gradcheck import numerical_gradients

from .parity import assert_all_close, assert_close, assert_gradient_close
from .strategies import to_torch
from .tolerances import (
    FLOAT32_GRADIENT_FLOOR,
    FLOAT32_ZERO_GRADIENT,
    FLOAT64_GRADIENT_FLOOR,
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
)


class Variant(NamedTuple):
    norm_first: bool = False
    activation: str = "relu"
    positions: str = "sinusoidal"
    tie_embeddings: bool = False
    bias: bool = True
    share_embeddings: bool = False
    pointer: bool = False


POINTER = Variant(True, "relu", "sinusoidal", pointer=True)
VARIANTS = [Variant(), Variant(True, "gelu", "learned", True), Variant(False, "gelu", bias=False),
            Variant(True, "relu", "learned", False, False),
            Variant(True, "relu", "sinusoidal", True, True, True), POINTER,
            Variant(False, "gelu", "learned", True, True, True, True)]
VARIANT_IDS = ["post-relu-sin", "pre-gelu-learned-tied", "post-gelu-nobias",
               "pre-relu-learned-nobias", "pre-shared-tied", "pre-pointer",
               "post-pointer-shared-tied"]


class Shape(NamedTuple):
    batch: int
    src_len: int
    tgt_len: int
    seed: int


def config_of(variant: Variant, dropout: float = 0.0, **sizes: int
              ) -> ref.TransformerSeq2SeqConfig:
    base = dict(src_vocab=11, tgt_vocab=9, d_model=8, nhead=2, num_encoder_layers=2,
                num_decoder_layers=2, dim_feedforward=12, dropout=dropout, max_len=16)
    base.update(sizes)
    if variant.share_embeddings or variant.pointer:   # one vocabulary
        base["tgt_vocab"] = base["src_vocab"]
    return ref.TransformerSeq2SeqConfig(**base, **variant._asdict())


def tim_config(config: ref.TransformerSeq2SeqConfig) -> tim.TransformerSeq2SeqConfig:
    return tim.TransformerSeq2SeqConfig(**dataclasses.asdict(config))


@st.composite
def shapes(draw: st.DrawFn, max_batch: int = 3, max_len: int = 5) -> Shape:
    return Shape(draw(st.integers(1, max_batch)), draw(st.integers(1, max_len)),
                 draw(st.integers(1, max_len)), draw(st.integers(0, 2**16)))


SINGLE = Shape(1, 1, 1, 0)       # batch 1, one source token, one target token
UNEQUAL = Shape(3, 5, 2, 1)      # longer sources than targets, padded rows


class Inputs(NamedTuple):
    src: np.ndarray
    src_lengths: np.ndarray
    tgt_in: np.ndarray
    targets: np.ndarray
    dlogits: np.ndarray
    dloss: float
    masks: dict | None


def make_inputs(config: ref.TransformerSeq2SeqConfig, shape: Shape) -> Inputs:
    rng = np.random.default_rng(shape.seed)
    B, S, T = shape.batch, shape.src_len, shape.tgt_len
    src_lengths = rng.integers(1, S + 1, B)
    src_lengths[0] = S                       # one row full, the others padded at random
    src = rng.integers(1, config.src_vocab, (B, S))
    src[np.arange(S)[None, :] >= src_lengths[:, None]] = ref.PAD
    tgt_in = rng.integers(1, config.tgt_vocab, (B, T))
    targets = rng.integers(1, config.tgt_vocab, (B, T))
    targets[rng.random((B, T)) < 0.3] = ref.PAD
    targets[0, 0] = 1                        # at least one target counts
    masks = None
    if config.dropout > 0:
        shapes_ = ref.transformer_seq2seq_dropout_mask_shapes(config, B, S, T)
        masks = {site: rng.random(s) >= config.dropout for site, s in shapes_.items()}
    return Inputs(src, src_lengths, tgt_in, targets,
                  rng.standard_normal((B, T, config.tgt_vocab)), 0.7, masks)


def reference_params(config: ref.TransformerSeq2SeqConfig, seed: int) -> dict[str, np.ndarray]:
    params = ref.TransformerSeq2Seq(config, seed=seed).params
    rng = np.random.default_rng(seed + 1)
    # biases and layer norms away from their init (0 and 1), so their gradients are exercised
    return {k: v + 0.1 * rng.standard_normal(v.shape) if v.ndim == 1 else v
            for k, v in params.items()}


def run_reference(config, params, inputs):
    (logits, loss), cache = ref.transformer_seq2seq_forward(
        inputs.src, inputs.src_lengths, inputs.tgt_in, params, config, inputs.targets,
        dropout_masks=inputs.masks)
    grads = ref.transformer_seq2seq_backward(cache, inputs.dlogits, inputs.dloss)
    return logits, loss, grads


def assert_gradients_close(actual: dict, expected: dict, budget: float, dtype: torch.dtype
                           ) -> None:
    """Every gradient within budget; one whose expected norm is below the dtype's floor (a
    parameter the output does not depend on, e.g. the cross-attention's query side over a
    single source key, where softmax is 1 whatever the query) is held in absolute terms."""
    assert set(actual) == set(expected)
    floor = FLOAT64_GRADIENT_FLOOR if dtype == torch.float64 else FLOAT32_GRADIENT_FLOOR
    for name, e in expected.items():
        if dtype == torch.float32 and not np.any(e):
            worst = float(np.abs(actual[name].detach().double().numpy()).max())
            assert worst <= FLOAT32_ZERO_GRADIENT, f"d{name}: {worst:.3e}, expected 0"
            continue
        assert_gradient_close(actual[name], e, budget, floor, f"d{name}")


def torch_inputs(inputs: Inputs, dtype: torch.dtype, device: str = "cpu") -> dict:
    return {"src": torch.from_numpy(inputs.src).to(device),
            "src_lengths": torch.from_numpy(inputs.src_lengths).to(device),
            "tgt_in": torch.from_numpy(inputs.tgt_in).to(device),
            "targets": torch.from_numpy(inputs.targets).to(device),
            "dlogits": to_torch(inputs.dlogits, dtype).to(device),
            "masks": None if inputs.masks is None
            else {k: torch.from_numpy(v).to(device) for k, v in inputs.masks.items()}}


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(max_batch=2, max_len=3), dropout=st.sampled_from([0.0, 0.25]))
@example(shape=SINGLE, dropout=0.0)
@example(shape=Shape(2, 3, 2, 5), dropout=0.25)
@settings(max_examples=3)  # every parameter element costs two forwards
def test_reference_backward_matches_finite_differences(variant: Variant, shape: Shape,
                                                       dropout: float) -> None:
    config = config_of(variant, dropout, num_encoder_layers=1, num_decoder_layers=1,
                       src_vocab=6, tgt_vocab=5, d_model=4, dim_feedforward=6, max_len=4)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    _, _, grads = run_reference(config, params, inputs)

    def f(**p):
        (logits, loss), _ = ref.transformer_seq2seq_forward(
            inputs.src, inputs.src_lengths, inputs.tgt_in, p, config, inputs.targets,
            dropout_masks=inputs.masks)
        return logits, loss

    numeric = numerical_gradients(f, params, (inputs.dlogits, np.asarray(inputs.dloss)))
    assert_all_close(grads, numeric, REF_VS_FINITE_DIFF, "reference vs finite differences")


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(), dropout=st.sampled_from([0.0, 0.25]))
@example(shape=SINGLE, dropout=0.0)
@example(shape=UNEQUAL, dropout=0.25)
def test_torch_impl_functional_float64_matches_reference(variant: Variant, shape: Shape,
                                                         dropout: float) -> None:
    config = config_of(variant, dropout)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    logits, loss, grads = run_reference(config, params, inputs)
    t = torch_inputs(inputs, torch.float64)
    (t_logits, t_loss), cache = tim.transformer_seq2seq_forward(
        t["src"], t["src_lengths"], t["tgt_in"], {k: to_torch(v) for k, v in params.items()},
        tim_config(config), t["targets"], dropout_masks=t["masks"])
    t_grads = tim.transformer_seq2seq_backward(cache, t["dlogits"], inputs.dloss)
    assert list(t_grads) == list(params)
    assert_close(t_logits, logits, TORCH64_VS_REF64.forward, "logits")
    assert_close(t_loss, loss, TORCH64_VS_REF64.forward, "loss")
    assert_gradients_close(t_grads, grads, TORCH64_VS_REF64.gradient, torch.float64)


BUDGETS = {torch.float64: TORCH64_VS_REF64, torch.float32: TORCH32_VS_REF64}


def check_training_step(dtype: torch.dtype, variant: Variant, shape: Shape, dropout: float,
                        device: str = "cpu") -> None:
    """A torch_impl training step on ``device``: logits, loss and every parameter's gradient
    within the dtype's budget of the float64 reference, all of them on the device."""
    config = config_of(variant, dropout)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    logits, loss, grads = run_reference(config, params, inputs)
    model = tim.TransformerSeq2Seq(tim_config(config), dtype=dtype).train()
    model.load_state_dict({k: to_torch(v, dtype) for k, v in params.items()})
    model.to(device)
    t = torch_inputs(inputs, dtype, device)
    t_logits, t_loss = model(t["src"], t["src_lengths"], t["tgt_in"], t["targets"],
                             dropout_masks=t["masks"])
    (inputs.dloss * t_loss + (t_logits * t["dlogits"]).sum()).backward()
    t_grads = {k: p.grad for k, p in model.named_parameters()}
    off = sorted(k for k, g in t_grads.items() if g.device.type != device)
    assert t_logits.device.type == t_loss.device.type == device and not off, \
        f"outputs or gradients off the device {device}: {off[:3]}"
    budget = BUDGETS[dtype]
    assert_close(t_logits.cpu(), logits, budget.forward, "logits")
    assert_close(t_loss.cpu(), loss, budget.forward, "loss")
    assert_gradients_close({k: g.cpu() for k, g in t_grads.items()}, grads, budget.gradient,
                           dtype)


@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(), dropout=st.sampled_from([0.0, 0.25]))
@example(shape=SINGLE, dropout=0.0)
@example(shape=UNEQUAL, dropout=0.25)
def test_torch_impl_module_matches_reference(dtype, variant: Variant, shape: Shape,
                                             dropout: float) -> None:
    check_training_step(dtype, variant, shape, dropout)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch.nn's, for norm_first
def test_state_dict_keys_are_the_same_in_both_backends_and_torch_nn_loads_the_transformer(
        ) -> None:
    config = config_of(Variant(norm_first=True, positions="learned"))
    ours = tim.TransformerSeq2Seq(tim_config(config), dtype=torch.float64)
    assert set(ours.state_dict()) == set(ref.transformer_seq2seq_param_shapes(config))
    nn_transformer = torch.nn.Transformer(8, 2, 2, 2, 12, 0.0, batch_first=True,
                                          norm_first=True, dtype=torch.float64)
    nn_transformer.load_state_dict(ours.transformer.state_dict())   # strict: same keys


# --------------------------------------------------------------------------- decoding

def teacher_forced_steps(backend, model, src, src_lengths, tgt_in):
    """Logits of the decode session fed tgt_in one token at a time, (B, T, V)."""
    session, *_ = model._generate_args(src, src_lengths, None,
                                       {"max_new_tokens": tgt_in.shape[1],
                                        "decoder_start_token_id": 1}, None, None)
    logits = [session.start(tgt_in[:, :1], None, 1)]
    for t in range(1, tgt_in.shape[1]):
        logits.append(session.step(tgt_in[:, t]))
    return np.stack([np.asarray(x) for x in logits], axis=1) if backend == "numpy" \
        else torch.stack(logits, dim=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@given(shape=shapes(max_len=6))
@example(shape=SINGLE)
@example(shape=UNEQUAL)
def test_incremental_decoding_equals_the_full_forward(variant: Variant, shape: Shape) -> None:
    config = config_of(variant)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    r_model = ref.TransformerSeq2Seq(config, seed=0).eval()
    r_model.params = params
    full, _ = r_model(inputs.src, inputs.src_lengths, inputs.tgt_in)
    steps = teacher_forced_steps("numpy", r_model, inputs.src, inputs.src_lengths,
                                 inputs.tgt_in)
    assert_close(steps, full, TORCH64_VS_REF64.forward, "reference steps")
    t_model = tim.TransformerSeq2Seq(tim_config(config), dtype=torch.float64).eval()
    t_model.load_state_dict({k: to_torch(v) for k, v in params.items()})
    t = torch_inputs(inputs, torch.float64)
    with torch.no_grad():
        t_steps = teacher_forced_steps("torch", t_model, t["src"], t["src_lengths"],
                                       t["tgt_in"])
    assert_close(t_steps, full, TORCH64_VS_REF64.forward, "torch_impl steps")


GENERATE_OPTIONS = [
    {},
    {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.7},
    {"num_beams": 2, "early_stopping": True, "no_repeat_ngram_size": 2},
    {"do_sample": True, "top_k": 4, "top_p": 0.9, "temperature": 0.8},
    {"repetition_penalty": 1.5, "min_new_tokens": 3},
]


def check_generate(dtype: torch.dtype, variant: Variant, options: dict, device: str = "cpu"
                   ) -> None:
    """torch_impl's generate() on ``device`` gives the reference's tokens, on the device
    (peaked weights: no float ties; sampling draws from the same uniforms)."""
    config = config_of(variant)
    params = {k: 3 * v for k, v in reference_params(config, 3).items()}
    inputs = make_inputs(config, UNEQUAL)
    options = {"max_new_tokens": 6, "decoder_start_token_id": 1, "eos_token_id": 2,
               "pad_token_id": 0, **options}
    rows = inputs.src.shape[0] * options.get("num_return_sequences", 1)
    uniforms = np.random.default_rng(0).random((rows, options["max_new_tokens"]))
    r_model = ref.TransformerSeq2Seq(config, seed=0).eval()
    r_model.params = params
    extra = {"uniforms": uniforms} if options.get("do_sample") else {}
    expected = r_model.generate(inputs.src, inputs.src_lengths, **options, **extra)
    assert expected.shape[0] == rows and np.all(expected[:, 0] == 1)
    t_model = tim.TransformerSeq2Seq(tim_config(config), dtype=dtype).eval()
    t_model.load_state_dict({k: to_torch(v, dtype) for k, v in params.items()})
    t_model.to(device)
    t = torch_inputs(inputs, dtype, device)
    extra = {"uniforms": torch.from_numpy(uniforms).to(device)} if options.get("do_sample") \
        else {}
    got = t_model.generate(t["src"], t["src_lengths"], **options, **extra)
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), expected, err_msg=f"{device} {dtype}")


@pytest.mark.parametrize("options", GENERATE_OPTIONS,
                         ids=["greedy", "beam", "beam-early", "sample", "penalties"])
@pytest.mark.parametrize("dtype", list(BUDGETS), ids=["float64", "float32"])
@pytest.mark.parametrize("variant", VARIANTS[:2] + [POINTER], ids=VARIANT_IDS[:2] + ["pointer"])
def test_generate_is_the_same_in_both_backends(variant: Variant, dtype, options: dict) -> None:
    check_generate(dtype, variant, options)


def test_beam_one_equals_greedy_and_rows_equal_their_sources_run_alone() -> None:
    config = config_of(Variant())
    params = reference_params(config, 4)
    inputs = make_inputs(config, UNEQUAL)
    model = tim.TransformerSeq2Seq(tim_config(config), dtype=torch.float64).eval()
    model.load_state_dict({k: to_torch(3 * v) for k, v in params.items()})
    t = torch_inputs(inputs, torch.float64)
    options = {"max_new_tokens": 5, "decoder_start_token_id": 1}
    greedy = model.generate(t["src"], t["src_lengths"], **options)
    assert torch.equal(model.generate(t["src"], t["src_lengths"], num_beams=1, **options),
                       greedy)
    for b in range(t["src"].shape[0]):
        n = int(t["src_lengths"][b])
        alone = model.generate(t["src"][b:b + 1, :n], None, **options)
        assert torch.equal(alone[0], greedy[b]), b


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", [ref, tim], ids=["reference", "torch_impl"])
def test_bad_config_is_refused(backend) -> None:
    with pytest.raises(ValueError, match="nhead"):
        backend.TransformerSeq2SeqConfig(10, 10, d_model=10, nhead=3)
    with pytest.raises(ValueError, match="positions"):
        backend.TransformerSeq2SeqConfig(10, 10, positions="rotary")
    with pytest.raises(ValueError, match="activation"):
        backend.TransformerSeq2SeqConfig(10, 10, activation="tanh")
    with pytest.raises(TypeError, match="config"):
        backend.TransformerSeq2Seq({"src_vocab": 10})
    with pytest.raises(ValueError, match="share_embeddings"):
        backend.TransformerSeq2SeqConfig(10, 12, share_embeddings=True)
    with pytest.raises(ValueError, match="pointer"):
        backend.TransformerSeq2SeqConfig(10, 12, pointer=True)
    with pytest.raises(TypeError, match="pointer"):
        backend.TransformerSeq2SeqConfig(10, 10, pointer=1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@given(shape=shapes())
@example(shape=SINGLE)
@example(shape=UNEQUAL)
def test_pointer_gate_interpolates_between_the_generator_and_copying(backend: str,
                                                                    shape: Shape) -> None:
    """Gate saturated at "generate": the pointer model's rows are log_softmax of the same
    model without the pointer; at "copy": all probability sits on the row's source tokens,
    each getting the copy attention of its positions; always: the rows are distributions."""
    config = config_of(POINTER)
    plain = dataclasses.replace(config, pointer=False)
    params = reference_params(config, shape.seed)
    inputs = make_inputs(config, shape)
    outputs = {}
    for bias in (60.0, -60.0):
        p = {**params, "pointer.gate.bias": np.array([bias]),
             "pointer.gate.weight": np.zeros_like(params["pointer.gate.weight"])}
        if backend == "numpy":
            (logits, _), _ = ref.transformer_seq2seq_forward(
                inputs.src, inputs.src_lengths, inputs.tgt_in, p, config)
            (base, _), _ = ref.transformer_seq2seq_forward(
                inputs.src, inputs.src_lengths, inputs.tgt_in,
                {k: v for k, v in p.items() if not k.startswith("pointer.")}, plain)
        else:
            t = torch_inputs(inputs, torch.float64)
            tp = {k: to_torch(v) for k, v in p.items()}
            (logits, _), _ = tim.transformer_seq2seq_forward(
                t["src"], t["src_lengths"], t["tgt_in"], tp, tim_config(config))
            (base, _), _ = tim.transformer_seq2seq_forward(
                t["src"], t["src_lengths"], t["tgt_in"],
                {k: v for k, v in tp.items() if not k.startswith("pointer.")}, tim_config(plain))
            logits, base = logits.numpy(), base.numpy()
        np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-12)
        outputs[bias] = (logits, base)
    logits, base = outputs[60.0]
    shifted = base - base.max(-1, keepdims=True)
    np.testing.assert_allclose(logits, shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)),
                               atol=1e-12)
    logits, _ = outputs[-60.0]
    for b in range(shape.batch):
        present = np.zeros(config.tgt_vocab, bool)
        present[inputs.src[b, :inputs.src_lengths[b]]] = True
        mass = np.exp(logits[b])
        np.testing.assert_allclose(mass[:, present].sum(-1), 1.0, rtol=1e-12)
        assert np.all(mass[:, ~present] < 1e-20)


def test_shared_embeddings_are_one_parameter_that_both_sides_read() -> None:
    config = config_of(Variant(share_embeddings=True, tie_embeddings=True))
    model = tim.TransformerSeq2Seq(tim_config(config), dtype=torch.float64)
    names = set(dict(model.named_parameters()))
    assert "tgt_embedding.weight" not in names and "head.weight" not in names
    assert names == set(model.state_dict()) == set(ref.transformer_seq2seq_param_shapes(config))


def test_sources_longer_than_the_positions_are_refused() -> None:
    config = config_of(Variant(), max_len=4)
    r_model = ref.TransformerSeq2Seq(config, seed=0)
    t_model = tim.TransformerSeq2Seq(tim_config(config), dtype=torch.float64)
    src, tgt = np.ones((1, 5), dtype=np.int64), np.ones((1, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="src: expected at most max_len = 4"):
        r_model(src, None, tgt)
    with pytest.raises(ValueError, match="src: expected at most max_len = 4"):
        t_model(torch.from_numpy(src), None, torch.from_numpy(tgt))
    with pytest.raises(ValueError, match="max_new_tokens"):
        r_model.generate(src[:, :3], max_new_tokens=5, decoder_start_token_id=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        t_model.generate(torch.from_numpy(src[:, :3]), max_new_tokens=5,
                         decoder_start_token_id=1)
    with pytest.raises(ValueError, match="src_lengths"):
        t_model(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 3]),
                torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt_in"):
        r_model(src[:, :3], None, np.full((1, 2), 99))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        t_model.generate(torch.from_numpy(src[:, :3]), max_new_tokens=2)


def test_functional_params_are_checked() -> None:
    config = config_of(Variant())
    params = reference_params(config, 0)
    inputs = make_inputs(config, SINGLE)
    bad = dict(params)
    del bad["head.weight"]
    with pytest.raises(ValueError, match="missing keys \\['head.weight'\\]"):
        ref.transformer_seq2seq_forward(inputs.src, None, inputs.tgt_in, bad, config)
    bad = dict(params, **{"head.bias": np.full(config.tgt_vocab, np.nan)})
    with pytest.raises(ValueError, match="head.bias"):
        ref.transformer_seq2seq_forward(inputs.src, None, inputs.tgt_in, bad, config)
    with pytest.raises(ValueError, match="dropout_masks"):
        ref.transformer_seq2seq_forward(inputs.src, None, inputs.tgt_in, params,
                                        dataclasses.replace(config, dropout=0.1))
