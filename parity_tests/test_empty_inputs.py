"""Zero-size batches and zero-length sequences across the public API: both backends do the
same thing, either an empty result of the shape torch.nn gives or a ValueError naming the
argument, and never a signal or a deep error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference as ref
import torch_impl as tim


def _float(backend, shape):
    a = np.random.default_rng(0).standard_normal(shape)
    return a if backend is ref else torch.from_numpy(a.astype(np.float32))


def _ids(backend, shape):
    a = np.zeros(shape, np.int64)
    return a if backend is ref else torch.from_numpy(a)


def _module(backend, cls, *args):
    return getattr(backend, cls)(*args)


def _call(module, *inputs):
    return module.forward(*inputs) if hasattr(module, "params") else module(*inputs)


GPT_SIZES = dict(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=4, dropout=0.0)

# name: (call(backend), torch.nn's result shape or None where we refuse)
PROBES = {
    "linear B=0": lambda b: b.linear_forward(_float(b, (0, 4)), _float(b, (3, 4)),
                                            _float(b, (3,)))[0],
    "embedding B=0": lambda b: b.embedding_forward(_ids(b, (0, 3)), _float(b, (5, 4)))[0],
    "cross_entropy N=0": lambda b: b.cross_entropy_forward(_float(b, (0, 5)),
                                                          _ids(b, (0,)))[0],
    "layer_norm N=0": lambda b: b.layer_norm_forward(_float(b, (0, 4)), _float(b, (4,)),
                                                    _float(b, (4,)))[0],
    "attention B=0": lambda b: b.scaled_dot_product_attention_forward(
        _float(b, (0, 2, 3, 4)), _float(b, (0, 2, 3, 4)), _float(b, (0, 2, 3, 4)))[0],
    "attention Tk=0": lambda b: b.scaled_dot_product_attention_forward(
        _float(b, (1, 2, 3, 4)), _float(b, (1, 2, 0, 4)), _float(b, (1, 2, 0, 4)))[0],
    "MultiheadAttention B=0": lambda b: _call(_module(b, "MultiheadAttention", 4, 2),
                                              _float(b, (0, 3, 4)), _float(b, (0, 3, 4)),
                                              _float(b, (0, 3, 4)))[0],
    "LSTM B=0": lambda b: _call(_module(b, "LSTM", 4, 3), _float(b, (0, 2, 4)))[0],
    "LSTM T=0": lambda b: _call(_module(b, "LSTM", 4, 3), _float(b, (2, 0, 4)))[0],
    "GRU B=0": lambda b: _call(_module(b, "GRU", 4, 3), _float(b, (0, 2, 4)))[0],
    "RNN B=0": lambda b: _call(_module(b, "RNN", 4, 3), _float(b, (0, 2, 4)))[0],
    "TransformerEncoderLayer B=0": lambda b: _call(
        b.TransformerEncoderLayer(4, 2, 8, dropout=0.0), _float(b, (0, 3, 4))),
    "TransformerEncoderLayer S=0": lambda b: _call(
        b.TransformerEncoderLayer(4, 2, 8, dropout=0.0), _float(b, (2, 0, 4))),
    "GPT B=0": lambda b: _call(b.GPT(b.GPTConfig(**GPT_SIZES)), _ids(b, (0, 3)))[0],
    "GPT T=0": lambda b: _call(b.GPT(b.GPTConfig(**GPT_SIZES)), _ids(b, (2, 0)))[0],
    "GPT.generate B=0": lambda b: b.GPT(b.GPTConfig(**GPT_SIZES)).generate(
        _ids(b, (0, 3)), max_new_tokens=2),
    "sample_tokens N=0": lambda b: b.sample_tokens(_float(b, (0, 5)), _float(b, (0,))),
}
# the empty results, with torch.nn's (or torch's functional) shapes
EMPTY = {"linear B=0": (0, 3), "embedding B=0": (0, 3, 4), "cross_entropy N=0": (),
         "layer_norm N=0": (0, 4), "attention B=0": (0, 2, 3, 4),
         "attention Tk=0": (1, 2, 3, 4), "MultiheadAttention B=0": (0, 3, 4),
         "sample_tokens N=0": (0,)}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's mean of nothing
@pytest.mark.parametrize("name", list(PROBES))
def test_empty_inputs_behave_the_same_in_both_backends(name: str) -> None:
    outcomes = []
    for backend in (ref, tim):
        try:
            out = PROBES[name](backend)
        except ValueError as err:
            outcomes.append(("refused", str(err).split(":")[0]))
        else:
            outcomes.append(("shape", tuple(out.shape)))
    assert outcomes[0] == outcomes[1], outcomes
    if name in EMPTY:
        assert outcomes[0] == ("shape", EMPTY[name])
    else:   # refused, naming the input
        assert outcomes[0][0] == "refused" and outcomes[0][1] in (
            "x", "src", "ids", "input_ids"), outcomes
