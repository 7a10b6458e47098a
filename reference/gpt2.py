"""Hugging Face GPT-2 checkpoints on disk: a directory with config.json and model.safetensors.

config.json holds ``GPT2Config`` fields; a field left out takes GPT2Config's default (as
``from_pretrained`` does). They map onto ``GPTConfig`` as

    vocab_size -> vocab_size    n_positions -> block_size    n_layer, n_head, n_embd,
    layer_norm_epsilon          embd_pdrop = attn_pdrop = resid_pdrop -> dropout

and the checkpoint must compute what ``GPT`` computes, else ValueError naming the field:
activation_function "gelu_new" (GPT-2's tanh approximation; "gelu_pytorch_tanh" is the same
function), n_inner None or 4·n_embd, attention scaled by 1/√d only, no cross-attention, the head
tied to wte. Tensor names may carry the "transformer." prefix (GPT2LMHeadModel) or not
(GPT2Model); the old ``attn.bias`` / ``attn.masked_bias`` mask buffers are ignored.

The NumPy reference reads safetensors only; ``pytorch_model.bin`` needs torch to unpickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .transformer import GPT, GPTConfig, gpt_param_shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "transformer."
# GPT2Config's defaults, used for fields a config.json leaves out.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                 "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
                 "layer_norm_epsilon": 1e-5, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                 "resid_pdrop": 0.1, "scale_attn_weights": True,
                 "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                 "tie_word_embeddings": True}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, its bos and eos token


def _read_config(path: str) -> GPTConfig:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise ValueError(f"path: no {CONFIG_NAME} in {path!r} (expected a Hugging Face GPT-2 "
                         f"checkpoint directory)")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not a readable JSON file ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{file}: model_type: expected 'gpt2', got {raw['model_type']!r}")
    cfg = {**GPT2_DEFAULTS, **raw}

    def unsupported(field: str, expected: str) -> ValueError:
        return ValueError(f"{file}: {field}: expected {expected} (what GPT computes), "
                          f"got {cfg[field]!r}")

    if cfg["activation_function"] not in GELU_TANH:
        raise unsupported("activation_function", "'gelu_new'")
    if cfg["n_inner"] not in (None, 4 * cfg["n_embd"]):
        raise unsupported("n_inner", f"None or 4 * n_embd = {4 * cfg['n_embd']}")
    for field, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if cfg[field] is not value:
            raise unsupported(field, str(value))
    rates = {cfg[field] for field in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
    if len(rates) != 1:
        raise ValueError(f"{file}: embd_pdrop, attn_pdrop, resid_pdrop: expected one dropout "
                         f"rate for all three, got {cfg['embd_pdrop']}, {cfg['attn_pdrop']}, "
                         f"{cfg['resid_pdrop']}")
    try:
        return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                         layer_norm_epsilon=cfg["layer_norm_epsilon"], dropout=rates.pop())
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error} (block_size is n_positions, dropout the pdrops)") \
            from error


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            raise ValueError(f"path: {path!r} holds pytorch_model.bin, which needs torch to read; "
                             f"the NumPy reference reads {WEIGHTS_NAME} (convert with "
                             f"save_pretrained(..., safe_serialization=True), or use torch_impl)")
        raise ValueError(f"path: no {WEIGHTS_NAME} in {path!r} (sharded checkpoints are not "
                         f"supported)")
    try:
        with safe_open(file, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, TypeError, ValueError) as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error})") from error


def _state_dict(tensors: dict[str, np.ndarray], config: GPTConfig,
                file: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under ``gpt_param_shapes`` names, checked and complete."""
    state, head = {}, None
    for name, value in tensors.items():
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if MASK_BUFFER.fullmatch(key):
            continue
        if name == "lm_head.weight":
            head = value
            continue
        if PREFIX + key in state:
            raise ValueError(f"{file}: {name!r} appears both with and without the "
                             f"{PREFIX!r} prefix")
        state[PREFIX + key] = value
    expected = gpt_param_shapes(config)
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{file}: missing tensor {key!r} (expected shape {shape})")
        value = state[key]
        if value.shape != shape:
            raise ValueError(f"{file}: tensor {key!r}: expected shape {shape} (from "
                             f"{CONFIG_NAME}), got {value.shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{file}: tensor {key!r}: expected a floating dtype, "
                             f"got {value.dtype}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{file}: unexpected tensors {unexpected} (not part of GPT-2)")
    if head is not None and not np.array_equal(head, state[PREFIX + "wte.weight"]):
        raise ValueError(f"{file}: tensor 'lm_head.weight': must equal 'transformer.wte.weight'"
                         f" (GPT's head is tied to wte)")
    return state


def load_gpt2(path: str | os.PathLike, *, dtype: Any = np.float64) -> GPT:
    """A ``GPT`` (computing in ``dtype``) from a Hugging Face GPT-2 checkpoint directory."""
    path = os.fspath(path)
    config = _read_config(path)
    state = _state_dict(_read_tensors(path), config, os.path.join(path, WEIGHTS_NAME))
    model = GPT(config, dtype=dtype)
    model.load_state_dict(state)
    return model


def _hf_config(config: GPTConfig, dtype: np.dtype) -> dict[str, Any]:
    eot = EOT_TOKEN if config.vocab_size > EOT_TOKEN else None
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
            "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.layer_norm_epsilon, "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout, "resid_pdrop": config.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
            "dtype": np.dtype(dtype).name}


def save_gpt2(model: GPT, path: str | os.PathLike) -> None:
    """Write config.json and model.safetensors that ``GPT2LMHeadModel.from_pretrained(path)``
    loads, in the model's dtype. A model built with bias=False is written with zero biases
    (GPT-2's format always has them; adding 0 computes the same).

    Atomic per file: each is written to a temporary file in ``path`` and renamed over the
    target only once both are complete; on failure no temporary file is left behind.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model: expected a reference GPT, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} exists and is not a directory")
    config = model.config
    with_biases = gpt_param_shapes(dataclasses.replace(config, bias=True))
    tensors = {name: np.ascontiguousarray(model.params[name]) if name in model.params
               else np.zeros(shape, dtype=model.dtype) for name, shape in with_biases.items()}
    text = json.dumps(_hf_config(config, model.dtype), indent=2, sort_keys=True) + "\n"

    def write_config(file: str) -> None:
        with open(file, "w", encoding="utf-8") as f:
            f.write(text)

    def write_weights(file: str) -> None:
        save_file(tensors, file, metadata={"format": "pt"})  # "pt": transformers requires it

    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    temporary: dict[str, str] = {}
    try:
        for name, write in ((WEIGHTS_NAME, write_weights), (CONFIG_NAME, write_config)):
            fd, temporary[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path)
            os.close(fd)
            write(temporary[name])
        for name, file in temporary.items():
            os.replace(file, os.path.join(path, name))
    finally:
        for file in temporary.values():
            if os.path.exists(file):
                os.remove(file)
        if created and not os.listdir(path):
            os.rmdir(path)
