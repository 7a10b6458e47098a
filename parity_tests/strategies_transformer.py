"""Hypothesis strategies and inputs for the GPT tests (test_transformer.py, test_gpt2.py).

Hypothesis draws a small ``GPTCase`` (sizes, bias, dropout, ignored targets, a seed); every
array is then built from the seed with NumPy, in float64, under Hugging Face GPT-2's names.
Parameters are drawn larger than GPT-2's init (weights of scale ``weight_std``, biases and
layer-norm weights clearly away from 0 and 1) so that a dropped or misplaced term shows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import reference.transformer as ref
import torch_impl.transformer as tim


class GPTCase(NamedTuple):
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    batch: int
    steps: int
    bias: bool = True
    dropout: float = 0.0          # > 0: explicit keep-masks drawn from the seed
    ignored: float = 0.0          # fraction of targets set to ignore_index
    ignore_index: int = -100
    targets: bool = True          # False: logits only, no loss
    dlogits: bool = True          # an upstream gradient on the logits besides the loss
    weight_std: float = 0.3
    seed: int = 0

    def config_kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, block_size=self.block_size,
                    n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                    dropout=self.dropout, bias=self.bias)

    def reference_config(self) -> ref.GPTConfig:
        return ref.GPTConfig(**self.config_kwargs())

    def torch_impl_config(self) -> tim.GPTConfig:
        return tim.GPTConfig(**self.config_kwargs())


class GPTInputs(NamedTuple):
    case: GPTCase
    params: dict[str, np.ndarray]                 # float64, gpt_param_shapes names
    ids: np.ndarray                               # int64 (B, T)
    targets: np.ndarray | None                    # int64 (B, T), some = ignore_index
    dropout_masks: dict[str, np.ndarray] | None   # bool keep-masks
    dlogits: np.ndarray | None                    # (B, T, V)
    dloss: float


@st.composite
def gpt_cases(draw: st.DrawFn, max_layer: int = 2, max_embd: int = 16, max_steps: int = 8,
              max_vocab: int = 20, max_batch: int = 3) -> GPTCase:
    """n_layer 1..2, n_embd 4..16 with 1..4 heads dividing it, T 1..8, V 2..20."""
    n_embd = draw(st.integers(4, max_embd))
    n_head = draw(st.sampled_from([h for h in range(1, 5) if n_embd % h == 0]))
    steps = draw(st.integers(1, max_steps))
    with_dropout = draw(st.booleans())
    with_targets = draw(st.integers(0, 3)) > 0
    return GPTCase(vocab_size=draw(st.integers(2, max_vocab)),
                   block_size=steps + draw(st.integers(0, 2)),
                   n_layer=draw(st.integers(1, max_layer)), n_head=n_head, n_embd=n_embd,
                   batch=draw(st.integers(1, max_batch)), steps=steps, bias=draw(st.booleans()),
                   dropout=draw(st.floats(0.1, 0.6)) if with_dropout else 0.0,
                   ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
                   ignore_index=draw(st.sampled_from([-100, 0])),
                   targets=with_targets, dlogits=draw(st.booleans()) or not with_targets,
                   seed=draw(st.integers(0, 2**32 - 1)))


def tiny_gpt_cases() -> st.SearchStrategy[GPTCase]:
    """Small enough for central differences on a sample of every parameter tensor."""
    return gpt_cases(max_embd=8, max_steps=3, max_vocab=6, max_batch=2)


def hf_gpt_cases() -> st.SearchStrategy[GPTCase]:
    """What a Hugging Face GPT-2 computes: biases, no dropout."""
    return gpt_cases().map(lambda c: c._replace(bias=True, dropout=0.0))


def make_gpt_inputs(case: GPTCase) -> GPTInputs:
    rng = np.random.default_rng(case.seed)
    c = case
    params = {}
    for name, shape in ref.gpt_param_shapes(case.reference_config()).items():
        if ".ln_" in name and name.endswith(".weight"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.2 * rng.standard_normal(shape)
        else:
            value = c.weight_std * rng.standard_normal(shape)
        params[name] = value
    ids = rng.integers(0, c.vocab_size, (c.batch, c.steps))
    targets = None
    if c.targets:
        targets = rng.integers(0, c.vocab_size, (c.batch, c.steps))
        targets = np.where(rng.random(targets.shape) < c.ignored, c.ignore_index, targets)
    masks = None
    if c.dropout > 0:
        shapes = ref.gpt_dropout_mask_shapes(case.reference_config(), c.batch, c.steps)
        masks = {name: rng.random(shape) >= c.dropout for name, shape in shapes.items()}
    dlogits = rng.standard_normal((c.batch, c.steps, c.vocab_size)) if c.dlogits else None
    return GPTInputs(case, params, ids, targets, masks, dlogits, float(rng.uniform(0.5, 2.0)))
