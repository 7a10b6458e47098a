"""Parity report: every implemented layer run in both backends, side by side.

For each layer the NumPy reference runs forward and backward in float64; the
torch_impl twin runs the same functional API on the same inputs and upstream
gradients in float64 and in float32. The table gives, per layer and config,
the relative error ``||torch_impl - reference|| / max(||reference||, tiny)``
(the max over the forward outputs, and the max over all gradients), the
DESIGN.md budget, PASS/FAIL, and each backend's wall time for one forward +
backward (best of a few runs). The module rows hold the model classes (RNN,
LSTM, GRU, GPT): the reference's explicit ``.backward()`` against torch_impl's
autograd through its custom Functions, both loaded from one state dict.

    python -m benchmarks                    # small sizes, seed 0
    python -m benchmarks --sizes medium --seed 3 --out /tmp/report --threads 1

Exits 1 if any row fails its budget, shape or dtype check, or raises.
Results go to ``<out>/parity_report.json`` and ``<out>/parity_report.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import reference
import reference.activations
import reference.attention
import reference.dropout
import reference.embedding
import reference.gru
import reference.linear
import reference.loss
import reference.lstm
import reference.normalization
import reference.rnn
import reference.rnn_attention
import reference.transformer
import torch_impl
import torch_impl.activations
import torch_impl.attention
import torch_impl.dropout
import torch_impl.embedding
import torch_impl.gru
import torch_impl.linear
import torch_impl.loss
import torch_impl.lstm
import torch_impl.normalization
import torch_impl.rnn
import torch_impl.rnn_attention
import torch_impl.transformer
from parity_tests.parity import relative_error
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64, Budget

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
TORCH_DTYPES = {"f64": torch.float64, "f32": torch.float32}
BUDGETS = {"f64": TORCH64_VS_REF64, "f32": TORCH32_VS_REF64}


@dataclass(frozen=True)
class GPTSizes:
    layers: int
    heads: int
    width: int  # n_embd
    vocab: int
    steps: int  # T, also the block size


@dataclass(frozen=True)
class Sizes:
    batch: int
    steps: int  # T, and Tq of the attention layers
    memory: int  # Tk of attention over another sequence (cross-attention, an encoder memory)
    input: int
    hidden: int
    heads: int  # attention heads; they divide hidden
    layers: int
    vocab: int
    classes: int
    gpt: GPTSizes


SIZES = {
    "small": Sizes(batch=3, steps=5, memory=7, input=4, hidden=6, heads=2, layers=2, vocab=11,
                   classes=7, gpt=GPTSizes(layers=2, heads=2, width=16, vocab=50, steps=12)),
    "medium": Sizes(batch=16, steps=32, memory=40, input=32, hidden=64, heads=4, layers=2,
                    vocab=1000, classes=500,
                    gpt=GPTSizes(layers=2, heads=4, width=64, vocab=1000, steps=32)),
}

Arrays = dict[str, Any]  # names -> arrays (reference: ndarray, torch_impl: Tensor), params dicts
Run = Callable[[Any, Arrays], tuple[Arrays, Arrays]]  # (package, inputs) -> (outputs, grads)


@dataclass
class Case:
    layer: str
    config: str
    inputs: Arrays  # float64 / int64 / bool ndarrays, nested dicts and lists, plain scalars
    run: Run


@dataclass
class Row:
    layer: str
    config: str
    status: str = "FAIL"  # PASS | FAIL
    forward_f64: float | None = None  # relative errors, max over outputs / over gradients
    gradient_f64: float | None = None
    forward_f32: float | None = None
    gradient_f32: float | None = None
    worst_f64: str = ""  # which output and which gradient had the largest error
    worst_f32: str = ""
    ms_reference: float | None = None  # one forward + backward, best of --repeats
    ms_torch_f64: float | None = None
    ms_torch_f32: float | None = None
    note: str = ""  # why the row failed


# ---------------------------------------------------------------- random inputs


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return scale * rng.standard_normal(shape)


def uniform_params(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]],
                   hidden: int) -> dict[str, np.ndarray]:
    """U(-1/sqrt(H), 1/sqrt(H)), torch.nn's recurrent init."""
    bound = 1.0 / np.sqrt(hidden)
    return {name: rng.uniform(-bound, bound, shape) for name, shape in shapes.items()}


def recurrent_params(rng: np.random.Generator, gates: int, s: Sizes,
                     bidirectional: bool) -> dict[str, np.ndarray]:
    """torch.nn-named params of an L-layer recurrent net (G = gates per hidden unit)."""
    directions = 2 if bidirectional else 1
    shapes = {}
    for k in range(s.layers):
        in_k = s.input if k == 0 else directions * s.hidden
        for suffix in ("", "_reverse")[:directions]:
            shapes[f"weight_ih_l{k}{suffix}"] = (gates * s.hidden, in_k)
            shapes[f"weight_hh_l{k}{suffix}"] = (gates * s.hidden, s.hidden)
            shapes[f"bias_ih_l{k}{suffix}"] = (gates * s.hidden,)
            shapes[f"bias_hh_l{k}{suffix}"] = (gates * s.hidden,)
    return uniform_params(rng, shapes, s.hidden)


def cell_params(rng: np.random.Generator, gates: int, s: Sizes) -> dict[str, np.ndarray]:
    shapes = {"weight_ih": (gates * s.hidden, s.input), "weight_hh": (gates * s.hidden, s.hidden),
              "bias_ih": (gates * s.hidden,), "bias_hh": (gates * s.hidden,)}
    return uniform_params(rng, shapes, s.hidden)


def unequal_lengths(rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
    """(B,) lengths in 1..T holding both extremes: one full sequence and one of length 1."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    lengths[-1] = 1
    return lengths.astype(np.int64)


def padding_mask(rng: np.random.Generator, batch: int, keys: int) -> np.ndarray:
    """(B, Tk) bool key_padding_mask, True = masked out: the tails past ``unequal_lengths``."""
    return np.arange(keys) >= unequal_lengths(rng, batch, keys)[:, None]


def keep_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float) -> np.ndarray:
    return rng.random(shape) >= p


# ---------------------------------------------------------------- cases
# Each run function calls one backend's functional forward/backward pair through the same
# module path (``sq.lstm.lstm_forward`` is ``reference.lstm`` or ``torch_impl.lstm``) and
# returns (forward outputs, gradients), both keyed by name.


def activation_case(rng: np.random.Generator, s: Sizes, name: str, **options: Any) -> Case:
    """``options``: keyword arguments of the forward (gelu's ``approximate``)."""
    x = normal(rng, s.batch, s.steps, s.hidden, scale=2.0)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        y, cache = getattr(sq.activations, f"{name}_forward")(a["x"], **options)
        dx = getattr(sq.activations, f"{name}_backward")(a["dy"], cache)
        return {"y": y}, {"x": dx}

    shown = "".join(f" {k}={v}" for k, v in options.items())
    return Case("activations", f"{name}{shown} x{x.shape}",
                {"x": x, "dy": normal(rng, *x.shape)}, run)


def linear_case(rng: np.random.Generator, s: Sizes, bias: bool) -> Case:
    x = normal(rng, s.batch, s.steps, s.input)
    weight = normal(rng, s.hidden, s.input, scale=0.5)
    inputs = {"x": x, "weight": weight, "bias": normal(rng, s.hidden) if bias else None,
              "dy": normal(rng, s.batch, s.steps, s.hidden)}

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        y, cache = sq.linear.linear_forward(a["x"], a["weight"], a["bias"])
        dx, dweight, dbias = sq.linear.linear_backward(a["dy"], cache)
        grads = {"x": dx, "weight": dweight}
        if a["bias"] is not None:
            grads["bias"] = dbias
        return {"y": y}, grads

    return Case("linear", f"x{x.shape} W{weight.shape} bias={bias}", inputs, run)


def embedding_case(rng: np.random.Generator, s: Sizes) -> Case:
    ids = rng.integers(0, s.vocab, size=(s.batch, s.steps)).astype(np.int64)
    ids[0, :2] = 0  # padding_idx occurs, and repeated ids accumulate gradient
    weight = normal(rng, s.vocab, s.hidden)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        y, cache = sq.embedding.embedding_forward(a["ids"], a["weight"], padding_idx=0)
        return {"y": y}, {"weight": sq.embedding.embedding_backward(a["dy"], cache)}

    return Case("embedding", f"ids{ids.shape} V={s.vocab} E={s.hidden} padding_idx=0",
                {"ids": ids, "weight": weight, "dy": normal(rng, *ids.shape, s.hidden)}, run)


def cross_entropy_case(rng: np.random.Generator, s: Sizes, reduction: str,
                       label_smoothing: float, flat: bool) -> Case:
    lead = (s.batch * s.steps,) if flat else (s.batch, s.steps)
    logits = normal(rng, *lead, s.classes, scale=3.0)
    targets = rng.integers(0, s.classes, size=lead).astype(np.int64)
    targets.reshape(-1)[::4] = -100  # ignore_index: excluded from the loss and the mean
    dloss = normal(rng, *lead) if reduction == "none" else np.array(rng.standard_normal())

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        loss, cache = sq.loss.cross_entropy_forward(
            a["logits"], a["targets"], reduction=reduction, label_smoothing=label_smoothing)
        return {"loss": loss}, {"logits": sq.loss.cross_entropy_backward(a["dloss"], cache)}

    return Case("cross_entropy", f"logits{logits.shape} {reduction} ignore=1/4 "
                f"smoothing={label_smoothing}",
                {"logits": logits, "targets": targets, "dloss": dloss}, run)


def dropout_case(rng: np.random.Generator, s: Sizes, p: float) -> Case:
    x = normal(rng, s.batch, s.steps, s.hidden)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        y, cache = sq.dropout.dropout_forward(a["x"], p, a["mask"])
        return {"y": y}, {"x": sq.dropout.dropout_backward(a["dy"], cache)}

    return Case("dropout", f"x{x.shape} p={p} explicit mask",
                {"x": x, "mask": keep_mask(rng, x.shape, p), "dy": normal(rng, *x.shape)}, run)


def layer_norm_case(rng: np.random.Generator, s: Sizes) -> Case:
    x = normal(rng, s.batch, s.steps, s.hidden, scale=2.0) + 1.0  # rows with a non-zero mean
    inputs = {"x": x, "weight": 1.0 + normal(rng, s.hidden, scale=0.3),
              "bias": normal(rng, s.hidden, scale=0.3), "dy": normal(rng, *x.shape)}

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        y, cache = sq.normalization.layer_norm_forward(a["x"], a["weight"], a["bias"])
        dx, dweight, dbias = sq.normalization.layer_norm_backward(a["dy"], cache)
        return {"y": y}, {"x": dx, "weight": dweight, "bias": dbias}

    return Case("layer_norm", f"x{x.shape} weight, bias eps=1e-5", inputs, run)


def recurrent_inputs(rng: np.random.Generator, s: Sizes, gates: int, dropout: float,
                     with_cell: bool) -> Arrays:
    """Bidirectional L-layer inputs, unequal lengths, non-zero initial states, explicit masks."""
    states = (2 * s.layers, s.batch, s.hidden)
    inputs = {
        "x": normal(rng, s.batch, s.steps, s.input),
        "params": recurrent_params(rng, gates, s, bidirectional=True),
        "h0": normal(rng, *states, scale=0.5),
        "lengths": unequal_lengths(rng, s.batch, s.steps),
        "dropout_masks": [keep_mask(rng, (s.batch, s.steps, 2 * s.hidden), dropout)
                          for _ in range(s.layers - 1)],
        "dout": normal(rng, s.batch, s.steps, 2 * s.hidden),
        "dh_n": normal(rng, *states),
    }
    if with_cell:
        inputs["c0"] = normal(rng, *states, scale=0.5)
        inputs["dc_n"] = normal(rng, *states)
    return inputs


def recurrent_config(s: Sizes, a: Arrays, dropout: float) -> str:
    return (f"L={s.layers} bidir B={s.batch} T={s.steps} I={s.input} H={s.hidden} "
            f"len={lengths_text(a['lengths'])} h0!=0 dropout={dropout}")


def lengths_text(lengths: np.ndarray) -> str:
    return (",".join(map(str, lengths)) if len(lengths) <= 4
            else f"{lengths.min()}..{lengths.max()}")


def mask_lengths_text(key_padding_mask: np.ndarray) -> str:
    return lengths_text((~key_padding_mask).sum(axis=1))


def rnn_case(rng: np.random.Generator, s: Sizes, nonlinearity: str, dropout: float) -> Case:
    inputs = recurrent_inputs(rng, s, gates=1, dropout=dropout, with_cell=False)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        (out, h_n), cache = sq.rnn.rnn_forward(
            a["x"], a["params"], h0=a["h0"], lengths=a["lengths"], nonlinearity=nonlinearity,
            dropout=dropout, dropout_masks=a["dropout_masks"])
        dx, dparams, dh0 = sq.rnn.rnn_backward(a["dout"], cache, dh_n=a["dh_n"])
        return {"out": out, "h_n": h_n}, {"x": dx, "h0": dh0, **dparams}

    return Case(f"rnn ({nonlinearity})", recurrent_config(s, inputs, dropout), inputs, run)


def lstm_case(rng: np.random.Generator, s: Sizes, dropout: float) -> Case:
    inputs = recurrent_inputs(rng, s, gates=4, dropout=dropout, with_cell=True)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        (out, (h_n, c_n)), cache = sq.lstm.lstm_forward(
            a["x"], a["params"], h0=a["h0"], c0=a["c0"], lengths=a["lengths"],
            dropout=dropout, dropout_masks=a["dropout_masks"])
        dx, dparams, dh0, dc0 = sq.lstm.lstm_backward(a["dout"], cache, dh_n=a["dh_n"],
                                                      dc_n=a["dc_n"])
        return {"out": out, "h_n": h_n, "c_n": c_n}, {"x": dx, "h0": dh0, "c0": dc0, **dparams}

    return Case("lstm", recurrent_config(s, inputs, dropout), inputs, run)


def gru_case(rng: np.random.Generator, s: Sizes, dropout: float) -> Case:
    inputs = recurrent_inputs(rng, s, gates=3, dropout=dropout, with_cell=False)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        (out, h_n), cache = sq.gru.gru_forward(
            a["x"], a["params"], h0=a["h0"], lengths=a["lengths"], dropout=dropout,
            dropout_masks=a["dropout_masks"])
        dx, dparams, dh0 = sq.gru.gru_backward(a["dout"], cache, dh_n=a["dh_n"])
        return {"out": out, "h_n": h_n}, {"x": dx, "h0": dh0, **dparams}

    return Case("gru", recurrent_config(s, inputs, dropout), inputs, run)


def module_autograd(model: torch.nn.Module, forward: Callable[..., tuple[torch.Tensor, ...]],
                    inputs: dict[str, torch.Tensor], upstream: tuple[torch.Tensor | None, ...]
                    ) -> tuple[tuple[torch.Tensor, ...], Arrays]:
    """The torch_impl side of a module row: ``forward(**leaves)`` under autograd (the report
    times runs under no_grad), then backward from ``upstream`` (one per output; None: no
    gradient into that output). Returns the outputs and the gradients of ``inputs`` and of
    every parameter of ``model``."""
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    with torch.enable_grad():
        outputs = forward(**leaves)
        pairs = [(out, grad) for out, grad in zip(outputs, upstream, strict=True)
                 if grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    grads.update((name, p.grad) for name, p in model.named_parameters())
    return tuple(out.detach() for out in outputs), grads


def module_case(rng: np.random.Generator, s: Sizes, kind: str, dropout: float) -> Case:
    """The recurrent model classes: reference's explicit ``.backward`` against torch_impl's
    autograd (its custom Function), after loading the same state dict into both."""
    with_cell = kind == "lstm"
    inputs = recurrent_inputs(rng, s, {"rnn": 1, "lstm": 4, "gru": 3}[kind], dropout, with_cell)
    states, finals = (("h0", "c0"), ("h_n", "c_n")) if with_cell else (("h0",), ("h_n",))

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        model_class = getattr(getattr(sq, kind), kind.upper())
        sizes = dict(num_layers=s.layers, dropout=dropout, bidirectional=True)
        upstream = (a["dout"], *(a[f"d{n}"] for n in finals))
        if sq is reference:
            model = model_class(s.input, s.hidden, **sizes)
            model.load_state_dict(a["params"])
            out, final = model.forward(a["x"], *(a[n] for n in states), lengths=a["lengths"],
                                       dropout_masks=a["dropout_masks"])
            outputs = (out, *(final if with_cell else (final,)))
            dinputs = model.backward(*upstream)
            grads = {**dict(zip(("x", *states), dinputs, strict=True)), **model.grads}
        else:
            model = model_class(s.input, s.hidden, **sizes, dtype=a["x"].dtype)
            model.load_state_dict(a["params"])

            def forward(x: torch.Tensor, **initial: torch.Tensor) -> tuple[torch.Tensor, ...]:
                out, final = model(x, *initial.values(), lengths=a["lengths"],
                                   dropout_masks=a["dropout_masks"])
                return (out, *(final if with_cell else (final,)))

            outputs, grads = module_autograd(model, forward,
                                             {n: a[n] for n in ("x", *states)}, upstream)
        return dict(zip(("out", *finals), outputs, strict=True)), grads

    return Case(f"{kind.upper()} module", "autograd vs .backward() "
                + recurrent_config(s, inputs, dropout), inputs, run)


def cell_case(rng: np.random.Generator, s: Sizes, kind: str) -> Case:
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[kind]
    inputs = {"x": normal(rng, s.batch, s.input), "h": normal(rng, s.batch, s.hidden, scale=0.5),
              "c": normal(rng, s.batch, s.hidden, scale=0.5), "params": cell_params(rng, gates, s),
              "dh_new": normal(rng, s.batch, s.hidden), "dc_new": normal(rng, s.batch, s.hidden)}

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        if kind == "lstm":
            (h_new, c_new), cache = sq.lstm.lstm_cell_forward(a["x"], a["h"], a["c"], a["params"])
            dx, dh, dc, dparams = sq.lstm.lstm_cell_backward(a["dh_new"], a["dc_new"], cache)
            return {"h_new": h_new, "c_new": c_new}, {"x": dx, "h": dh, "c": dc, **dparams}
        module = getattr(sq, kind)
        h_new, cache = getattr(module, f"{kind}_cell_forward")(a["x"], a["h"], a["params"])
        dx, dh, dparams = getattr(module, f"{kind}_cell_backward")(a["dh_new"], cache)
        return {"h_new": h_new}, {"x": dx, "h": dh, **dparams}

    return Case(f"{kind}_cell", f"B={s.batch} I={s.input} H={s.hidden}", inputs, run)


# ---------------------------------------------------------------- attention and GPT


def sdp_attention_case(rng: np.random.Generator, s: Sizes, masks: str) -> Case:
    """Scaled dot-product attention, q (B, h, Tq, d), k (B, h, Tk, d), v (B, h, Tk, dv).

    masks="causal+padding": Tq = Tk, causal, and a key padding mask hiding key 0 of batch
    item 0 (key 1 stays visible everywhere), so exactly one query row per head, query 0 of that
    item, sees no key: its output and gradient must be exactly 0.
    masks="float": Tq != Tk, an additive float attn_mask (B, 1, Tq, Tk) with some -inf (never
    on key 0), and dropout with an explicit keep-mask.
    """
    B, h, tq, d, dv = s.batch, s.heads, s.steps, s.hidden // s.heads, s.input
    tk = tq if masks == "causal+padding" else s.memory
    if masks == "causal+padding":
        key_padding_mask = rng.random((B, tk)) < 0.3
        key_padding_mask[:, :2] = False
        key_padding_mask[0, 0] = True
        options = {"causal": True, "key_padding_mask": key_padding_mask}
        shown = "causal, key padding leaving one query no key"
    else:
        blocked = rng.random((B, 1, tq, tk)) < 0.2
        blocked[..., 0] = False
        options = {"attn_mask": np.where(blocked, -np.inf, normal(rng, B, 1, tq, tk)),
                   "dropout": 0.2, "dropout_mask": keep_mask(rng, (B, h, tq, tk), 0.2)}
        shown = "float attn_mask (B,1,Tq,Tk) with -inf, dropout=0.2"
    inputs = {"q": normal(rng, B, h, tq, d), "k": normal(rng, B, h, tk, d),
              "v": normal(rng, B, h, tk, dv), "options": options,
              "dout": normal(rng, B, h, tq, dv)}

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        out, cache = sq.attention.scaled_dot_product_attention_forward(
            a["q"], a["k"], a["v"], **a["options"])
        dq, dk, dv = sq.attention.scaled_dot_product_attention_backward(a["dout"], cache)
        return {"out": out}, {"q": dq, "k": dk, "v": dv}

    return Case("sdp_attention", f"B={B} h={h} Tq={tq} Tk={tk} d={d} dv={dv} {shown}",
                inputs, run)


def mha_case(rng: np.random.Generator, s: Sizes, self_attention: bool) -> Case:
    """Multi-head attention (batch-first, torch.nn.MultiheadAttention's params) with a key
    padding mask. Self-attention: one input x serves as query, key and value (its gradient is
    the sum of the three). Cross-attention: over key and value of another length Tk, also
    returning the head-averaged weights."""
    B, E, tq = s.batch, s.hidden, s.steps
    tk = tq if self_attention else s.memory
    sources = ("x",) if self_attention else ("query", "key", "value")
    inputs = {name: normal(rng, B, tq if name in ("x", "query") else tk, E) for name in sources}
    inputs |= {
        "params": {"in_proj_weight": normal(rng, 3 * E, E, scale=1 / np.sqrt(E)),
                   "in_proj_bias": normal(rng, 3 * E, scale=0.5),
                   "out_proj.weight": normal(rng, E, E, scale=1 / np.sqrt(E)),
                   "out_proj.bias": normal(rng, E, scale=0.5)},
        "key_padding_mask": padding_mask(rng, B, tk), "dout": normal(rng, B, tq, E)}
    need_weights = not self_attention

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        query, key, value = (a["x"],) * 3 if self_attention else (a[n] for n in sources)
        (out, weights), cache = sq.attention.multi_head_attention_forward(
            query, key, value, a["params"], s.heads, key_padding_mask=a["key_padding_mask"],
            need_weights=need_weights)
        dquery, dkey, dvalue, dparams = sq.attention.multi_head_attention_backward(a["dout"],
                                                                                  cache)
        grads = ({"x": dquery + dkey + dvalue} if self_attention
                 else {"query": dquery, "key": dkey, "value": dvalue})
        outputs = {"out": out} if weights is None else {"out": out, "weights": weights}
        return outputs, {**grads, **dparams}

    kind = "self" if self_attention else "cross"
    return Case("multihead_attention",
                f"{kind} B={B} Tq={tq} Tk={tk} E={E} heads={s.heads} key padding "
                f"len={mask_lengths_text(inputs['key_padding_mask'])} "
                f"need_weights={need_weights}", inputs, run)


def memory_attention_case(rng: np.random.Generator, s: Sizes, score: str) -> Case:
    """Attention of decoder states (B, Tq, Dq) over an encoder memory (B, Tk, Dm) with a
    source padding mask: Bahdanau's (score="additive") or Luong's (dot, general, concat),
    with upstream gradients on both the context and the weights."""
    B, tq, tk, Dq, A = s.batch, s.steps, s.memory, s.hidden, s.hidden
    Dm = Dq if score == "dot" else s.input
    shapes = {"additive": {"query_proj.weight": (A, Dq), "key_proj.weight": (A, Dm),
                           "key_proj.bias": (A,), "energy.weight": (1, A)},
              "dot": {},
              "general": {"weight": (Dq, Dm)},
              "concat": {"concat.weight": (A, Dq + Dm), "energy.weight": (1, A)}}[score]
    inputs = {"query": normal(rng, B, tq, Dq), "memory": normal(rng, B, tk, Dm),
              "params": {name: normal(rng, *shape, scale=1 / np.sqrt(shape[-1]))
                         for name, shape in shapes.items()},
              "mask": padding_mask(rng, B, tk), "dcontext": normal(rng, B, tq, Dm),
              "dweights": normal(rng, B, tq, tk)}

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        attention = sq.rnn_attention
        if score == "additive":
            (context, weights), cache = attention.additive_attention_forward(
                a["query"], a["memory"], a["params"], a["mask"])
            backward = attention.additive_attention_backward
        else:
            (context, weights), cache = attention.luong_attention_forward(
                a["query"], a["memory"], a["params"], score, a["mask"])
            backward = attention.luong_attention_backward
        dquery, dmemory, dparams = backward(a["dcontext"], cache, a["dweights"])
        return ({"context": context, "weights": weights},
                {"query": dquery, "memory": dmemory, **dparams})

    layer = "additive_attention" if score == "additive" else f"luong_attention ({score})"
    attention_size = f" A={A}" if score in ("additive", "concat") else ""
    return Case(layer, f"B={B} Tq={tq} Tk={tk} Dq={Dq} Dm={Dm}{attention_size} src_len="
                f"{mask_lengths_text(inputs['mask'])} dweights", inputs, run)


IGNORE_INDEX = -100


def gpt_inputs(rng: np.random.Generator, s: Sizes, dropout: float) -> tuple[dict, Arrays]:
    """(GPTConfig fields, inputs): Hugging Face GPT-2-named params, ids, targets with every
    fourth one ignore_index, explicit dropout keep-masks and the loss's upstream gradient.

    Matrices are N(0, 1/fan_in) for the axis they contract (a Conv1D weight (in, out): in;
    wte, also the tied head, and wpe: E), biases and layer-norm weights clearly away from 0 and 1,
    so that every term shows."""
    g = s.gpt
    fields = dict(vocab_size=g.vocab, block_size=g.steps, n_layer=g.layers, n_head=g.heads,
                  n_embd=g.width, dropout=dropout)
    config = reference.transformer.GPTConfig(**fields)
    params = {}
    for name, shape in reference.transformer.gpt_param_shapes(config).items():
        if ".ln_" in name and name.endswith(".weight"):
            params[name] = 1.0 + normal(rng, *shape, scale=0.3)
        elif name.endswith(".bias"):
            params[name] = normal(rng, *shape, scale=0.2)
        else:
            fan_in = shape[0] if ".c_" in name else shape[1]
            params[name] = normal(rng, *shape, scale=1 / np.sqrt(fan_in))
    targets = rng.integers(0, g.vocab, size=(s.batch, g.steps)).astype(np.int64)
    targets.reshape(-1)[::4] = IGNORE_INDEX
    return fields, {
        "ids": rng.integers(0, g.vocab, size=(s.batch, g.steps)).astype(np.int64),
        "targets": targets, "params": params,
        "dropout_masks": reference.transformer.gpt_dropout_masks(config, s.batch, g.steps, rng),
        "dloss": np.array(rng.uniform(0.5, 2.0))}


def gpt_config_text(s: Sizes, dropout: float) -> str:
    g = s.gpt
    return (f"L={g.layers} heads={g.heads} E={g.width} V={g.vocab} B={s.batch} T={g.steps} "
            f"ignore=1/4 dropout={dropout}")


def gpt_case(rng: np.random.Generator, s: Sizes, dropout: float) -> Case:
    """gpt_forward/gpt_backward: logits and loss; gradients of dloss · loss for every param."""
    fields, inputs = gpt_inputs(rng, s, dropout)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        (logits, loss), cache = sq.transformer.gpt_forward(
            a["ids"], a["params"], sq.transformer.GPTConfig(**fields), a["targets"],
            IGNORE_INDEX, a["dropout_masks"])
        return ({"logits": logits, "loss": loss},
                sq.transformer.gpt_backward(cache, dloss=a["dloss"]))

    return Case("gpt", gpt_config_text(s, dropout), inputs, run)


def gpt_module_case(rng: np.random.Generator, s: Sizes, dropout: float) -> Case:
    """The GPT class: reference's explicit ``.backward`` against torch_impl's autograd through
    its Functions, after loading the same state dict into both."""
    fields, inputs = gpt_inputs(rng, s, dropout)

    def run(sq: Any, a: Arrays) -> tuple[Arrays, Arrays]:
        config = sq.transformer.GPTConfig(**fields)
        args = (a["ids"], a["targets"], IGNORE_INDEX, a["dropout_masks"])
        if sq is reference:
            model = reference.transformer.GPT(config)
            model.load_state_dict(a["params"])
            logits, loss = model.forward(*args)
            model.backward(a["dloss"])
            grads = model.grads
        else:
            model = torch_impl.transformer.GPT(config,
                                               dtype=a["params"]["transformer.wte.weight"].dtype)
            model.load_state_dict(a["params"])
            (logits, loss), grads = module_autograd(model, lambda: model(*args), {},
                                                    (None, a["dloss"]))
        return {"logits": logits, "loss": loss}, grads

    return Case("GPT module", "autograd vs .backward() " + gpt_config_text(s, dropout),
                inputs, run)


def all_cases(seed: int, s: Sizes) -> list[Case]:
    """Every case, each drawing its inputs from its own generator so one case's draws never
    shift another's when cases are added or reordered."""
    makers: list[Callable[[np.random.Generator], Case]] = [
        *(lambda rng, n=n: activation_case(rng, s, n)
          for n in ("sigmoid", "tanh", "relu", "softmax", "log_softmax")),
        *(lambda rng, a=a: activation_case(rng, s, "gelu", approximate=a)
          for a in ("none", "tanh")),
        lambda rng: linear_case(rng, s, bias=True),
        lambda rng: linear_case(rng, s, bias=False),
        lambda rng: embedding_case(rng, s),
        lambda rng: cross_entropy_case(rng, s, "mean", 0.1, flat=False),
        lambda rng: cross_entropy_case(rng, s, "sum", 0.0, flat=True),
        lambda rng: cross_entropy_case(rng, s, "none", 0.2, flat=True),
        lambda rng: dropout_case(rng, s, p=0.3),
        lambda rng: layer_norm_case(rng, s),
        lambda rng: cell_case(rng, s, "rnn"),
        lambda rng: cell_case(rng, s, "lstm"),
        lambda rng: cell_case(rng, s, "gru"),
        lambda rng: rnn_case(rng, s, "tanh", dropout=0.25),
        lambda rng: rnn_case(rng, s, "relu", dropout=0.25),
        lambda rng: lstm_case(rng, s, dropout=0.25),
        lambda rng: gru_case(rng, s, dropout=0.25),
        lambda rng: sdp_attention_case(rng, s, "causal+padding"),
        lambda rng: sdp_attention_case(rng, s, "float"),
        lambda rng: mha_case(rng, s, self_attention=True),
        lambda rng: mha_case(rng, s, self_attention=False),
        *(lambda rng, k=k: memory_attention_case(rng, s, k)
          for k in ("additive", "dot", "general", "concat")),
        lambda rng: gpt_case(rng, s, dropout=0.1),
        *(lambda rng, k=k: module_case(rng, s, k, dropout=0.25) for k in ("rnn", "lstm", "gru")),
        lambda rng: gpt_module_case(rng, s, dropout=0.1),
    ]
    return [make(np.random.default_rng([seed, i])) for i, make in enumerate(makers)]


# ---------------------------------------------------------------- running and comparing


def to_torch(value: Any, dtype: torch.dtype) -> Any:
    """The same inputs as torch tensors: floats in ``dtype``, ints and bools unchanged."""
    if isinstance(value, dict):
        return {k: to_torch(v, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [to_torch(v, dtype) for v in value]
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor
    return value


def timed(case: Case, package: Any, inputs: Arrays, repeats: int) -> tuple[Arrays, Arrays, float]:
    """Run the case ``repeats`` times; the first run's results and the best wall time in ms."""
    best = float("inf")
    results = None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            outcome = case.run(package, inputs)
        best = min(best, time.perf_counter() - start)
        if results is None:
            results = outcome
    return results[0], results[1], 1e3 * best


def compare(actual: Arrays, expected: Arrays, dtype: torch.dtype,
            what: str) -> tuple[float, str, list[str]]:
    """Max relative error over the named tensors, the worst name, and any structural problems
    (missing or extra names, non-tensors, shape or dtype mismatches)."""
    problems = []
    if set(actual) != set(expected):
        problems.append(f"{what} names differ: missing {sorted(set(expected) - set(actual))}, "
                        f"extra {sorted(set(actual) - set(expected))}")
    worst, worst_name = 0.0, ""
    for name in sorted(set(actual) & set(expected)):
        a, b = actual[name], expected[name]
        if not isinstance(a, torch.Tensor):
            problems.append(f"{what} {name}: expected a torch.Tensor, got {type(a).__name__}")
            continue
        if tuple(a.shape) != np.shape(b):
            problems.append(f"{what} {name}: shape {tuple(a.shape)} != reference {np.shape(b)}")
            continue
        if a.is_floating_point() and a.dtype != dtype:
            problems.append(f"{what} {name}: dtype {a.dtype} != {dtype}")
        err = relative_error(a, b)
        if not err <= worst:  # a NaN becomes the worst and stays so: it fails the budget
            worst, worst_name = err, name
    return worst, worst_name, problems


def measure(case: Case, repeats: int) -> Row:
    row = Row(case.layer, case.config)
    notes = []
    try:
        ref_out, ref_grads, row.ms_reference = timed(case, reference, case.inputs, repeats)
    except Exception as error:  # report every row even when one backend raises
        traceback.print_exc(file=sys.stderr)
        row.note = f"reference raised {type(error).__name__}: {error}"
        return row
    for tag, dtype in TORCH_DTYPES.items():
        try:
            out, grads, ms = timed(case, torch_impl, to_torch(case.inputs, dtype), repeats)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            notes.append(f"torch_impl {tag} raised {type(error).__name__}: {error}")
            continue
        forward, worst_out, forward_problems = compare(out, ref_out, dtype, "output")
        gradient, worst_grad, grad_problems = compare(grads, ref_grads, dtype, "grad")
        budget: Budget = BUDGETS[tag]
        if not forward <= budget.forward:
            notes.append(f"{tag} forward {forward:.1e} > {budget.forward:.0e} ({worst_out})")
        if not gradient <= budget.gradient:
            notes.append(f"{tag} gradient {gradient:.1e} > {budget.gradient:.0e} ({worst_grad})")
        notes += [f"{tag} {p}" for p in forward_problems + grad_problems]
        setattr(row, f"forward_{tag}", forward)
        setattr(row, f"gradient_{tag}", gradient)
        setattr(row, f"worst_{tag}", f"out:{worst_out} grad:{worst_grad}")
        setattr(row, f"ms_torch_{tag}", ms)
    row.status = "FAIL" if notes else "PASS"
    row.note = "; ".join(notes)
    return row


# ---------------------------------------------------------------- output

COLUMNS = ["layer", "config", "fwd f64", "grad f64", "fwd f32", "grad f32", "budget f64",
           "budget f32", "result", "ref ms", "torch f64 ms", "torch f32 ms"]


def budget_text(budget: Budget) -> str:
    return f"{budget.forward:.0e} / {budget.gradient:.0e}"


def cells(row: Row) -> list[str]:
    def err(x: float | None) -> str:
        return "-" if x is None else f"{x:.1e}"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    return [row.layer, row.config, err(row.forward_f64), err(row.gradient_f64),
            err(row.forward_f32), err(row.gradient_f32), budget_text(BUDGETS["f64"]),
            budget_text(BUDGETS["f32"]), row.status, ms(row.ms_reference),
            ms(row.ms_torch_f64), ms(row.ms_torch_f32)]


def text_table(rows: list[Row]) -> str:
    table = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failures = [f"  {r.layer} [{r.config}]: {r.note}" for r in rows if r.status != "PASS"]
    return "\n".join(lines + (["", "failures:"] + failures if failures else []))


def markdown_table(rows: list[Row], meta: dict[str, Any]) -> str:
    title = f"# seqtwin parity report ({meta['passed']}/{meta['rows']} PASS)"
    setup = (f"`{meta['command']}`: torch {meta['torch']}, numpy {meta['numpy']}, "
             f"{meta['machine']}, {meta['torch_threads']} torch threads.")
    legend = ("Relative error `||torch_impl - reference|| / ||reference||` (max over outputs; max "
              "over all gradients) against the reference in float64. Times: one forward + "
              f"backward, best of {meta['repeats']}.")
    header = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    failures = [f"- **{r.layer}** `{r.config}`: {r.note}" for r in rows if r.status != "PASS"]
    lines = [title, "", setup, "", legend, "", *header, *body]
    if failures:
        lines += ["", "## Failures", "", *failures]
    return "\n".join(lines) + "\n"


def finite_or_text(value: Any) -> Any:
    """Strict JSON has no NaN or inf: write them as text."""
    return str(value) if isinstance(value, float) and not np.isfinite(value) else value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every layer in both backends and report forward/gradient parity "
                    "against the DESIGN.md budgets.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for parity_report.json and parity_report.md "
                             "(default: benchmarks/out/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random input")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="small",
                        help="problem sizes (small: seconds; medium: larger B, T, H, V)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs per backend; the best wall time is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice); 1 gives "
                             "steadier times on a machine busy with other work")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SIZES[args.sizes]
    command = f"python -m benchmarks --sizes {args.sizes} --seed {args.seed}"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        command += f" --threads {args.threads}"
    print(f"# {command}", file=sys.stderr)
    rows = []
    for case in all_cases(args.seed, sizes):
        print(f"[parity] {case.layer:<14} {case.config} ...", end="", file=sys.stderr, flush=True)
        row = measure(case, max(1, args.repeats))
        print(f" {row.status}", file=sys.stderr, flush=True)
        rows.append(row)

    passed = sum(r.status == "PASS" for r in rows)
    meta = {"command": command, "seed": args.seed, "sizes": args.sizes, **asdict(sizes),
            "repeats": args.repeats, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(), "rows": len(rows), "passed": passed,
            "budgets": {tag: budget._asdict() for tag, budget in BUDGETS.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "parity_report.json", args.out / "parity_report.md"
    json_rows = [{k: finite_or_text(v) for k, v in asdict(r).items()} for r in rows]
    json_path.write_text(json.dumps({"meta": meta, "rows": json_rows}, indent=2) + "\n")
    md_path.write_text(markdown_table(rows, meta))

    print(text_table(rows))
    print(f"\n{passed}/{len(rows)} rows PASS; reproduce with: {command}")
    print(f"wrote {json_path} and {md_path}")
    return 0 if passed == len(rows) else 1
