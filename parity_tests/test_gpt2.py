"""Hugging Face GPT-2 checkpoints: reference/gpt2.py and torch_impl/gpt2.py.

Checkpoints are written by transformers' own ``save_pretrained`` from tiny random models (every
parameter, biases and layer-norm weights included, drawn away from GPT-2's init so that a
swapped or dropped tensor shows), loaded into both backends and compared with transformers'
logits; ``save_gpt2`` is read back by ``GPT2LMHeadModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import example, given
from safetensors.numpy import load_file, save_file

import reference.gpt2 as ref_gpt2
import reference.transformer as ref
import torch_impl.gpt2 as tim_gpt2
import torch_impl.transformer as tim

from .parity import assert_close, to_numpy
from .strategies import GPTCase, hf_gpt_cases, make_gpt_inputs, to_torch
from .tolerances import TORCH32_VS_REF64, TORCHNN64_VS_OURS64

transformers = pytest.importorskip("transformers")

BACKENDS = pytest.mark.parametrize("backend", ["reference", "torch_impl"])
CASE = GPTCase(vocab_size=9, block_size=5, n_layer=2, n_head=2, n_embd=8, batch=2, steps=5,
               seed=7)
ONE_LAYER_ONE_HEAD = GPTCase(vocab_size=2, block_size=1, n_layer=1, n_head=1, n_embd=4,
                             batch=1, steps=1, seed=8)
WEIGHTS = "model.safetensors"


def hf_config(case: GPTCase, **changes) -> transformers.GPT2Config:
    fields = dict(vocab_size=case.vocab_size, n_positions=case.block_size, n_embd=case.n_embd,
                  n_layer=case.n_layer, n_head=case.n_head, activation_function="gelu_new",
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                  eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2Config(**{**fields, **changes})


def write_hf_checkpoint(directory: str, case: GPTCase, model_class=None, **changes):
    """save_pretrained of a random float32 GPT2LMHeadModel (or ``model_class``); returns it."""
    torch.manual_seed(case.seed)
    model = (model_class or transformers.GPT2LMHeadModel)(hf_config(case, **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def load(backend: str, directory: str, dtype=None):
    if backend == "reference":
        return ref_gpt2.load_gpt2(directory)
    return tim_gpt2.load_gpt2(directory, dtype=dtype)


def logits_of(backend: str, model, ids: np.ndarray):
    if backend == "reference":
        return model(ids)[0]
    with torch.no_grad():
        return model(to_torch(ids))[0]


def params_of(model) -> dict[str, np.ndarray]:
    items = model.params.items() if isinstance(model, ref.GPT) else model.state_dict().items()
    return {k: to_numpy(v) for k, v in items}


def rewrite_weights(directory: str, change) -> None:
    """Replace model.safetensors by change(tensors) (a dict of numpy arrays)."""
    file = os.path.join(directory, WEIGHTS)
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


def rewrite_config(directory: str, **changes) -> None:
    file = os.path.join(directory, "config.json")
    with open(file) as f:
        config = json.load(f)
    with open(file, "w") as f:
        json.dump({**config, **changes}, f)


# ----------------------------------------------------------------------------- load

@given(case=hf_gpt_cases())
@example(case=ONE_LAYER_ONE_HEAD)
@example(case=CASE)
def test_load_gpt2_gives_the_logits_of_transformers_in_both_backends(case: GPTCase) -> None:
    ids = make_gpt_inputs(case).ids
    with tempfile.TemporaryDirectory() as directory:
        hf = write_hf_checkpoint(directory, case)
        models = {backend: load(backend, directory) for backend in ("reference", "torch_impl")}
    with torch.no_grad():
        expected = hf(input_ids=to_torch(ids)).logits  # float32
    hf_params = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for backend, model in models.items():
        assert params_of(model).keys() == hf_params.keys()
        for name, value in params_of(model).items():
            np.testing.assert_array_equal(value, hf_params[name], err_msg=name)
        assert_close(logits_of(backend, model, ids), expected, TORCH32_VS_REF64.forward,
                     f"{backend} logits")


@BACKENDS
def test_load_accepts_names_without_the_transformer_prefix(backend: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        hf = write_hf_checkpoint(directory, CASE, transformers.GPT2Model)  # keys "wte.weight", ..
        assert "wte.weight" in load_file(os.path.join(directory, WEIGHTS))
        model = load(backend, directory)
    for name, value in hf.state_dict().items():
        np.testing.assert_array_equal(params_of(model)["transformer." + name], value.numpy())


@BACKENDS
def test_load_ignores_the_causal_mask_buffers_of_old_checkpoints(backend: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        hf = write_hf_checkpoint(directory, CASE)
        T = CASE.block_size
        rewrite_weights(directory, lambda tensors: {
            **tensors, "transformer.h.0.attn.bias": np.tril(np.ones((1, 1, T, T), np.float32)),
            "transformer.h.1.attn.masked_bias": np.array(-1e4, np.float32),
            "lm_head.weight": tensors["transformer.wte.weight"]})  # present and tied: fine
        model = load(backend, directory)
    ids = make_gpt_inputs(CASE).ids
    with torch.no_grad():
        expected = hf(input_ids=to_torch(ids)).logits
    assert_close(logits_of(backend, model, ids), expected, TORCH32_VS_REF64.forward, "logits")


def test_torch_impl_loads_pytorch_model_bin_and_reference_asks_for_safetensors() -> None:
    with tempfile.TemporaryDirectory() as directory:
        hf = write_hf_checkpoint(directory, CASE)
        os.remove(os.path.join(directory, WEIGHTS))
        torch.save(hf.state_dict(), os.path.join(directory, "pytorch_model.bin"))
        model = tim_gpt2.load_gpt2(directory)
        with pytest.raises(ValueError, match=r"pytorch_model.bin, which needs torch .*"
                                             r"model.safetensors"):
            ref_gpt2.load_gpt2(directory)
    ids = make_gpt_inputs(CASE).ids
    with torch.no_grad():
        expected = hf(input_ids=to_torch(ids)).logits
    assert_close(logits_of("torch_impl", model, ids), expected, TORCH32_VS_REF64.forward)


def _garbage(file: str) -> None:
    with open(file, "wb") as f:
        f.write(b"not a safetensors file at all")


def _truncated(file: str) -> None:
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[:len(data) - 17])


def _empty(file: str) -> None:
    open(file, "wb").close()


@BACKENDS
@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _empty],
                         ids=["garbage", "truncated", "empty"])
def test_load_rejects_a_corrupt_safetensors_file(backend: str, corrupt) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_hf_checkpoint(directory, CASE)
        corrupt(os.path.join(directory, WEIGHTS))
        with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors"):
            load(backend, directory)


def _drop(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


@BACKENDS
@pytest.mark.parametrize("change, pattern", [
    (_drop("transformer.h.1.mlp.c_fc.bias"),
     r"missing tensor 'transformer.h.1.mlp.c_fc.bias' \(expected shape \(32,\)\)"),
    (lambda t: {**t, "transformer.wpe.weight": t["transformer.wpe.weight"][:-1]},
     r"tensor 'transformer.wpe.weight': expected shape \(5, 8\) \(from config.json\), "
     r"got \(4, 8\)"),
    (lambda t: {**t, "transformer.h.0.attn.c_attn.weight":
                t["transformer.h.0.attn.c_attn.weight"].T.copy()},
     r"tensor 'transformer.h.0.attn.c_attn.weight': expected shape \(8, 24\)"),
    (lambda t: {**t, "transformer.h.0.ln_1.weight": np.ones(8, np.int32)},
     r"tensor 'transformer.h.0.ln_1.weight': expected a floating dtype"),
    (lambda t: {**t, "transformer.h.0.crossattention.c_attn.weight": np.ones((8, 16),
                                                                           np.float32)},
     r"unexpected tensors \['transformer.h.0.crossattention.c_attn.weight'\]"),
    (lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1},
     r"tensor 'lm_head.weight': must equal 'transformer.wte.weight'"),
    (lambda t: {**t, "wpe.weight": t["transformer.wpe.weight"]},
     r"'wpe.weight' appears both with and without the 'transformer.' prefix"),
], ids=["missing", "misshapen", "transposed", "integer", "unexpected", "untied-head",
        "duplicate"])
def test_load_rejects_bad_tensors_naming_them(backend: str, change, pattern) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_hf_checkpoint(directory, CASE)
        rewrite_weights(directory, change)
        with pytest.raises(ValueError, match=r"model.safetensors: " + pattern):
            load(backend, directory)


@BACKENDS
@pytest.mark.parametrize("changes, pattern", [
    (dict(activation_function="relu"), r"activation_function: expected 'gelu_new' .*'relu'"),
    (dict(activation_function="gelu"), r"activation_function: expected 'gelu_new' .*'gelu'"),
    (dict(n_inner=16), r"n_inner: expected None or 4 \* n_embd = 32 .*got 16"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx: expected"),
    (dict(tie_word_embeddings=False), r"tie_word_embeddings: expected True"),
    (dict(model_type="llama"), r"model_type: expected 'gpt2', got 'llama'"),
    (dict(n_head=3), r"n_head: expected a divisor of n_embd = 8, got 3"),
    (dict(n_positions=0), r"block_size: expected a positive int, got 0 .*n_positions"),
    (dict(attn_pdrop=0.2), r"embd_pdrop, attn_pdrop, resid_pdrop: expected one dropout rate"),
], ids=["relu", "exact-gelu", "n-inner", "layer-scaling", "untied", "model-type", "n-head",
        "n-positions", "pdrops"])
def test_load_rejects_a_config_gpt_does_not_compute(backend: str, changes, pattern) -> None:
    with tempfile.TemporaryDirectory() as directory:
        write_hf_checkpoint(directory, CASE)
        rewrite_config(directory, **changes)
        with pytest.raises(ValueError, match=r"config.json: " + pattern):
            load(backend, directory)


@BACKENDS
def test_load_rejects_a_directory_without_a_checkpoint(backend: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        with pytest.raises(ValueError, match=r"^path: no config.json in"):
            load(backend, directory)
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write("{not json")
        with pytest.raises(ValueError, match=r"config.json: not a readable JSON file"):
            load(backend, directory)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"n_embd": 8, "n_head": 2}, f)
        with pytest.raises(ValueError, match=r"^path: no model.safetensors"):
            load(backend, directory)


# ----------------------------------------------------------------------------- save

def model_with_random_params(backend: str, case: GPTCase):
    params = make_gpt_inputs(case).params
    if backend == "reference":
        model = ref.GPT(case.reference_config())
        model.load_state_dict(params)
    else:
        model = tim.GPT(case.torch_impl_config(), dtype=torch.float64)
        model.load_state_dict({k: to_torch(v) for k, v in params.items()})
    return model


@BACKENDS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_save_gpt2_round_trips_through_transformers(backend: str, bias: bool) -> None:
    case = CASE._replace(bias=bias)
    model = model_with_random_params(backend, case)
    ids = make_gpt_inputs(case).ids
    with tempfile.TemporaryDirectory() as directory:
        (ref_gpt2 if backend == "reference" else tim_gpt2).save_gpt2(model, directory)
        assert sorted(os.listdir(directory)) == ["config.json", WEIGHTS]
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory,
                                                          attn_implementation="eager").eval()
    assert next(hf.parameters()).dtype == torch.float64  # the file keeps the model's dtype
    ours = params_of(model)
    for name, value in hf.state_dict().items():
        expected = ours.get(name if name != "lm_head.weight" else "transformer.wte.weight")
        if expected is None:  # a bias of a bias=False model: written as zeros
            assert name.endswith(".bias") and not value.any(), name
        else:
            np.testing.assert_array_equal(value.numpy(), expected, err_msg=name)
    with torch.no_grad():
        expected = hf(input_ids=to_torch(ids)).logits
    assert_close(logits_of(backend, model, ids), expected, TORCHNN64_VS_OURS64.forward, "logits")


@pytest.mark.parametrize("writer, reader", [("reference", "torch_impl"),
                                            ("torch_impl", "reference")])
def test_save_then_load_is_exact_across_backends(writer: str, reader: str) -> None:
    model = model_with_random_params(writer, CASE)
    with tempfile.TemporaryDirectory() as directory:
        (ref_gpt2 if writer == "reference" else tim_gpt2).save_gpt2(model, directory)
        loaded = load(reader, directory, dtype=torch.float64)
    assert loaded.config.__dict__ == model.config.__dict__
    expected = params_of(model)
    for name, value in params_of(loaded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@BACKENDS
@pytest.mark.parametrize("existing", [False, True], ids=["new-directory", "over-a-checkpoint"])
def test_save_is_atomic_when_writing_fails(backend: str, existing: bool, monkeypatch) -> None:
    module = ref_gpt2 if backend == "reference" else tim_gpt2
    model = model_with_random_params(backend, CASE)

    def failing_save_file(tensors, file, metadata=None):
        with open(file, "wb") as f:
            f.write(b"half a fil")
        raise OSError("No space left on device")

    with tempfile.TemporaryDirectory() as root:
        directory = os.path.join(root, "checkpoint")
        before = {}
        if existing:
            write_hf_checkpoint(directory, CASE)
            for name in os.listdir(directory):
                with open(os.path.join(directory, name), "rb") as f:
                    before[name] = f.read()
        monkeypatch.setattr(module, "save_file", failing_save_file)
        with pytest.raises(OSError, match="No space left"):
            module.save_gpt2(model, directory)
        if not existing:
            assert not os.path.exists(directory)
        else:
            assert sorted(os.listdir(directory)) == sorted(before)  # no temporary file left
            for name, data in before.items():
                with open(os.path.join(directory, name), "rb") as f:
                    assert f.read() == data, name


@BACKENDS
def test_save_rejects_bad_arguments_naming_them(backend: str) -> None:
    module = ref_gpt2 if backend == "reference" else tim_gpt2
    other = tim.GPT(CASE.torch_impl_config()) if backend == "reference" \
        else ref.GPT(CASE.reference_config())
    with tempfile.TemporaryDirectory() as directory:
        with pytest.raises(TypeError, match=r"^model: expected a"):
            module.save_gpt2(other, directory)
        file = os.path.join(directory, "a-file")
        open(file, "w").close()
        with pytest.raises(ValueError, match=r"^path: .* exists and is not a directory"):
            module.save_gpt2(model_with_random_params(backend, CASE), file)
