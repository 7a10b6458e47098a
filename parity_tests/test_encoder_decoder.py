"""Parity properties of the encoder-decoder Transformer: torch_impl/encoder_decoder.py held to
torch.nn's Transformer modules, its functional pairs to its modules, both backends' functional
pairs to each other (reference/encoder_decoder.py); torch.compile equals eager; bad input raises
naming the argument.

Five kinds run through one set of helpers: "encoder_layer", "decoder_layer", "encoder",
"decoder" (stacks of ``num_layers`` layers, a final norm or none) and "transformer". A ``Case``
holds the sizes (E = 8, F = 12, lengths <= 5), the options and every mask (``MASK_FORMS``:
bool or float, 2-d (Tq, Tk) or torch.nn's 3-d (B h, Tq, Tk), key padding, causal flags); the
arrays are built from its seed with NumPy. Gradients are those of <out, dout> for a random dout,
with respect to the inputs (src / tgt / memory) and every parameter.

A query that sees no key gets attention weights 0 in ours; torch.nn gave NaN there (the torch
here, 2.13, gives the same zeros as ours), so the drawn masks keep key 0 visible to every query
and such rows are tested apart: ours finite, and equal to torch.nn where it is finite. torch.nn
runs in train mode with dropout 0.0: in eval mode its fast path (nested tensors) zeroes padded
positions. It takes a causal flag as a hint that the mask given is causal, while ours applies
the causal mask on top of any mask: torch.nn is given the union (and, where no other mask is
given, its square-subsequent mask with the hint).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import AotEagerAndRecordGraphs

import reference
import torch_impl as tim

from .parity import assert_all_close, assert_close, assert_gradient_close
from .strategies import float32_exact, seeds, to_torch
from .tolerances import (
    FLOAT32_GRADIENT_FLOOR,
    FLOAT64_GRADIENT_FLOOR,
    FLOAT64_REORDERED,
    TORCH32_VS_REF64,
    TORCH64_VS_REF64,
    TORCHNN64_VS_OURS64,
)

pytestmark = [
    # torch.nn warns when a bool key padding mask meets a float attention mask (still supported)
    pytest.mark.filterwarnings("ignore:Support for mismatched"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor"),
    pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd"),
]

D_MODEL, DIM_FF = 8, 12
KINDS = ("encoder_layer", "decoder_layer", "encoder", "decoder", "transformer")
ACTIVATIONS = ("relu", "gelu")
MASK_FORMS = ("none", "bool_2d", "bool_3d", "float_2d", "float_3d")
PADDING_NAMES = ("src_key_padding_mask", "tgt_key_padding_mask", "memory_key_padding_mask")


class Case(NamedTuple):
    batch: int = 2
    src_len: int = 3
    tgt_len: int = 4
    nhead: int = 2
    num_layers: int = 1          # layers per stack
    activation: str = "relu"
    norm_first: bool = False
    bias: bool = True
    final_norm: bool = True      # the stacks' final LayerNorm (the Transformer always has both)
    eps: float = 1e-5
    src_mask: str = "none"       # one of MASK_FORMS
    tgt_mask: str = "none"
    memory_mask: str = "none"
    src_padding: bool = False
    tgt_padding: bool = False
    memory_padding: bool = False
    src_causal: bool = False
    tgt_causal: bool = False
    memory_causal: bool = False  # key j > query i, aligned top-left (T and S may differ)
    dropout: float = 0.0         # > 0: explicit keep-masks drawn from the seed
    seed: int = 0


class Inputs(NamedTuple):
    case: Case
    src: np.ndarray                             # (B, S, E)
    tgt: np.ndarray                             # (B, T, E)
    memory: np.ndarray                          # (B, S, E), the decoders' memory
    params: dict[str, np.ndarray]               # transformer_param_shapes' keys
    masks: dict[str, np.ndarray | None]         # transformer_forward's mask keywords
    dropout_masks: dict[str, np.ndarray] | None  # transformer_dropout_mask_shapes' keys
    dsrc_out: np.ndarray                        # upstream gradient of an encoder's output
    dtgt_out: np.ndarray                        # ... of a decoder's (and the Transformer's)


@st.composite
def cases(draw: st.DrawFn, dropout: bool = False) -> Case:
    masks = st.sampled_from(MASK_FORMS)
    return Case(
        batch=draw(st.integers(1, 3)), src_len=draw(st.integers(1, 5)),
        tgt_len=draw(st.integers(1, 5)), nhead=draw(st.sampled_from([1, 2, 2, 4])),
        num_layers=draw(st.integers(1, 2)), activation=draw(st.sampled_from(ACTIVATIONS)),
        norm_first=draw(st.booleans()), bias=draw(st.booleans()),
        final_norm=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-5, 1e-2])),
        src_mask=draw(masks), tgt_mask=draw(masks), memory_mask=draw(masks),
        src_padding=draw(st.booleans()), tgt_padding=draw(st.booleans()),
        memory_padding=draw(st.booleans()), src_causal=draw(st.booleans()),
        tgt_causal=draw(st.booleans()), memory_causal=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.3])) if dropout else 0.0, seed=draw(seeds))


# Edge cases every property also runs.
BATCH1_LENGTH1 = Case(batch=1, src_len=1, tgt_len=1, seed=1)
UNEQUAL_LENGTHS = Case(batch=2, src_len=5, tgt_len=2, nhead=4, num_layers=2, src_mask="float_3d",
                       tgt_mask="bool_2d", memory_mask="float_2d", src_padding=True,
                       memory_padding=True, tgt_causal=True, memory_causal=True, seed=2)
PRE_LN_GELU_NO_BIAS = Case(batch=3, src_len=4, tgt_len=3, norm_first=True, activation="gelu",
                           bias=False, final_norm=False, src_mask="bool_3d",
                           tgt_mask="float_3d", memory_mask="bool_3d", tgt_padding=True,
                           src_causal=True, eps=1e-2, seed=3)
CAUSAL_HINTS = Case(batch=2, src_len=4, tgt_len=4, src_causal=True, tgt_causal=True,
                    memory_causal=True, src_padding=True, seed=4)
LONG_TARGET = Case(batch=2, src_len=2, tgt_len=5, num_layers=2, memory_causal=True,
                   memory_mask="bool_2d", tgt_mask="float_2d", tgt_causal=True, seed=5)
DROPOUT = Case(batch=2, src_len=4, tgt_len=3, num_layers=2, dropout=0.3, src_padding=True,
               tgt_causal=True, memory_mask="float_3d", seed=6)
DROPOUT_PRE_LN = DROPOUT._replace(norm_first=True, activation="gelu", bias=False, seed=7)


# ----------------------------------------------------------------------------- inputs

def _attn_mask(rng: np.random.Generator, form: str, batch: int, nhead: int, tq: int,
               tk: int) -> np.ndarray | None:
    """A mask of ``form`` hiding ~30% of the keys, key 0 visible to every query."""
    if form == "none":
        return None
    kind, layout = form.split("_")
    shape = (tq, tk) if layout == "2d" else (batch * nhead, tq, tk)
    hidden = rng.random(shape) < 0.3
    hidden[..., 0] = False
    if kind == "bool":
        return hidden
    return np.where(hidden, -np.inf, rng.standard_normal(shape))


def _padding(rng: np.random.Generator, on: bool, batch: int, tk: int) -> np.ndarray | None:
    if not on:
        return None
    padded = rng.random((batch, tk)) < 0.3
    padded[:, 0] = False
    return padded


def make_inputs(case: Case) -> Inputs:
    c = case
    rng = np.random.default_rng(c.seed)
    B, S, T, E = c.batch, c.src_len, c.tgt_len, D_MODEL
    params = {}
    for name, shape in tim.transformer_param_shapes(E, c.nhead, c.num_layers, c.num_layers,
                                                    DIM_FF, c.bias).items():
        if ".norm" in name:  # layer norms: weights near 1
            value = (1.0 if name.endswith("weight") else 0.0) + 0.3 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            value = 0.3 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(shape[1])
        params[name] = value
    masks = {
        "src_mask": _attn_mask(rng, c.src_mask, B, c.nhead, S, S),
        "tgt_mask": _attn_mask(rng, c.tgt_mask, B, c.nhead, T, T),
        "memory_mask": _attn_mask(rng, c.memory_mask, B, c.nhead, T, S),
        "src_key_padding_mask": _padding(rng, c.src_padding, B, S),
        "tgt_key_padding_mask": _padding(rng, c.tgt_padding, B, T),
        "memory_key_padding_mask": _padding(rng, c.memory_padding, B, S),
    }
    dropout_masks = None
    if c.dropout > 0:
        shapes = tim.transformer_dropout_mask_shapes(
            B, S, T, d_model=E, nhead=c.nhead, num_encoder_layers=c.num_layers,
            num_decoder_layers=c.num_layers, dim_feedforward=DIM_FF)
        dropout_masks = {name: rng.random(shape) >= c.dropout for name, shape in shapes.items()}
    return Inputs(c, rng.standard_normal((B, S, E)), rng.standard_normal((B, T, E)),
                  rng.standard_normal((B, S, E)), params, masks, dropout_masks,
                  rng.standard_normal((B, S, E)), rng.standard_normal((B, T, E)))


def float32_inputs(inputs: Inputs) -> Inputs:
    """Every float array rounded to float32 (held in float64): a float32 run and a float64
    oracle then see the same numbers and only the arithmetic differs."""
    def rounded(a):
        return a if a is None or a.dtype == np.bool_ else float32_exact(a)
    return inputs._replace(
        src=rounded(inputs.src), tgt=rounded(inputs.tgt), memory=rounded(inputs.memory),
        params={k: rounded(v) for k, v in inputs.params.items()},
        masks={k: rounded(v) for k, v in inputs.masks.items()},
        dsrc_out=rounded(inputs.dsrc_out), dtgt_out=rounded(inputs.dtgt_out))

# ----------------------------------------------------------------------------- one kind's view

_PREFIX = {"encoder_layer": "encoder.layers.0.", "decoder_layer": "decoder.layers.0.",
           "encoder": "encoder.", "decoder": "decoder.", "transformer": ""}


def kind_params(kind: str, inputs: Inputs) -> dict[str, np.ndarray]:
    """The kind's parameters under its own state-dict keys."""
    prefix = _PREFIX[kind]
    params = {k[len(prefix):]: v for k, v in inputs.params.items() if k.startswith(prefix)}
    if kind in ("encoder", "decoder") and not inputs.case.final_norm:
        params = {k: v for k, v in params.items() if not k.startswith("norm.")}
    return params


def kind_dropout_masks(kind: str, inputs: Inputs) -> dict[str, np.ndarray] | None:
    if inputs.dropout_masks is None:
        return None
    prefix = _PREFIX[kind]
    return {k[len(prefix):]: v for k, v in inputs.dropout_masks.items() if k.startswith(prefix)}


def kind_arrays(kind: str, inputs: Inputs) -> dict[str, np.ndarray]:
    """The differentiable inputs, in the forward's positional order."""
    if kind.startswith("encoder"):
        return {"src": inputs.src}
    if kind.startswith("decoder"):
        return {"tgt": inputs.tgt, "memory": inputs.memory}
    return {"src": inputs.src, "tgt": inputs.tgt}


def kind_dout(kind: str, inputs: Inputs) -> np.ndarray:
    return inputs.dsrc_out if kind.startswith("encoder") else inputs.dtgt_out


def kind_masks(kind: str, inputs: Inputs) -> dict[str, object]:
    """The kind's mask keywords (torch.nn's names) as NumPy arrays and bools."""
    m, c = inputs.masks, inputs.case
    decoder = dict(tgt_mask=m["tgt_mask"], memory_mask=m["memory_mask"],
                   tgt_key_padding_mask=m["tgt_key_padding_mask"],
                   memory_key_padding_mask=m["memory_key_padding_mask"],
                   tgt_is_causal=c.tgt_causal, memory_is_causal=c.memory_causal)
    if kind == "encoder_layer":
        return dict(src_mask=m["src_mask"], src_key_padding_mask=m["src_key_padding_mask"],
                    is_causal=c.src_causal)
    if kind == "encoder":
        return dict(mask=m["src_mask"], src_key_padding_mask=m["src_key_padding_mask"],
                    is_causal=c.src_causal)
    if kind.startswith("decoder"):
        return decoder
    return dict(src_mask=m["src_mask"], src_key_padding_mask=m["src_key_padding_mask"],
                src_is_causal=c.src_causal, **decoder)


# (mask keyword, causal keyword, query length, key length) of each attention
_CAUSAL_PAIRS = (("src_mask", "is_causal", "S", "S"), ("mask", "is_causal", "S", "S"),
                 ("src_mask", "src_is_causal", "S", "S"), ("tgt_mask", "tgt_is_causal", "T", "T"),
                 ("memory_mask", "memory_is_causal", "T", "S"))


def torch_nn_masks(kind: str, inputs: Inputs) -> dict[str, object]:
    """torch.nn's keywords for the same masking: a causal flag folded into its mask (the
    union; or, with no other mask, torch.nn's own square-subsequent mask and the hint)."""
    kwargs = kind_masks(kind, inputs)
    lengths = {"S": inputs.case.src_len, "T": inputs.case.tgt_len}
    for mask_name, causal_name, q, k in _CAUSAL_PAIRS:
        if mask_name not in kwargs or causal_name not in kwargs:
            continue
        if not kwargs[causal_name]:
            continue
        tq, tk = lengths[q], lengths[k]
        future = np.triu(np.ones((tq, tk), dtype=bool), 1)
        mask = kwargs[mask_name]
        if mask is None:
            kwargs[mask_name] = np.where(future, -np.inf, 0.0)
            continue  # the hint stays: torch.nn then runs its causal attention
        kwargs[mask_name] = mask | future if mask.dtype == np.bool_ else \
            np.where(future, -np.inf, mask)
        kwargs[causal_name] = False
    return kwargs

# ----------------------------------------------------------------------------- runs

class Run(NamedTuple):
    out: object
    dinputs: dict      # gradients of the kind's arrays, by name
    dparams: dict      # by state-dict key


def build(backend, kind: str, case: Case, dtype: torch.dtype) -> nn.Module:
    """The kind's module from ``backend`` (torch.nn or torch_impl), in train mode."""
    c, E = case, D_MODEL
    layer_kw = dict(dim_feedforward=DIM_FF, dropout=c.dropout, activation=c.activation,
                    layer_norm_eps=c.eps, batch_first=True, norm_first=c.norm_first,
                    bias=c.bias, dtype=dtype)
    stack_kw = {"enable_nested_tensor": False} if backend is nn else {}

    def norm():
        return backend.LayerNorm(E, eps=c.eps, bias=c.bias, dtype=dtype) if c.final_norm \
            else None
    if kind == "encoder_layer":
        model = backend.TransformerEncoderLayer(E, c.nhead, **layer_kw)
    elif kind == "decoder_layer":
        model = backend.TransformerDecoderLayer(E, c.nhead, **layer_kw)
    elif kind == "encoder":
        model = backend.TransformerEncoder(backend.TransformerEncoderLayer(E, c.nhead, **layer_kw),
                                           c.num_layers, norm(), **stack_kw)
    elif kind == "decoder":
        model = backend.TransformerDecoder(backend.TransformerDecoderLayer(E, c.nhead, **layer_kw),
                                           c.num_layers, norm())
    else:
        model = backend.Transformer(E, c.nhead, c.num_layers, c.num_layers, **layer_kw)
    return model.train()


def _tensor(a, dtype: torch.dtype):
    return to_torch(a, dtype) if isinstance(a, np.ndarray) else a


def run_module(model: nn.Module, kind: str, inputs: Inputs, masks: dict[str, object],
               dtype: torch.dtype, dropout_masks: dict | None = None,
               params: nn.Module | None = None) -> Run:
    """out and the gradients of <out, dout>; ``params``: the module whose parameters to read
    (a compiled model's own are renamed)."""
    arrays = {n: to_torch(a, dtype).requires_grad_() for n, a in kind_arrays(kind, inputs).items()}
    kwargs = {k: _tensor(v, dtype) for k, v in masks.items()}
    if dropout_masks is not None:
        kwargs["dropout_masks"] = {k: to_torch(v) for k, v in dropout_masks.items()}
    out = model(*arrays.values(), **kwargs)
    out.backward(to_torch(kind_dout(kind, inputs), dtype))
    return Run(out.detach(), {n: a.grad for n, a in arrays.items()},
               {n: p.grad for n, p in (params or model).named_parameters()})


def run_torch_nn(kind: str, inputs: Inputs, dtype: torch.dtype = torch.float64) -> Run:
    model = build(nn, kind, inputs.case, dtype)
    state = {k: to_torch(v, dtype) for k, v in kind_params(kind, inputs).items()}
    model.load_state_dict(state, strict=True)
    return run_module(model, kind, inputs, torch_nn_masks(kind, inputs), dtype)


def run_torch_impl_module(kind: str, inputs: Inputs, dtype: torch.dtype) -> Run:
    """Ours, its weights loaded from a torch.nn module's state dict (and that module's loaded
    from ours first: state dicts move both ways, strictly)."""
    ours = build(tim, kind, inputs.case, dtype)
    theirs = build(nn, kind, inputs.case, dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    state = {k: to_torch(v, dtype) for k, v in kind_params(kind, inputs).items()}
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return run_module(ours, kind, inputs, kind_masks(kind, inputs), dtype,
                      kind_dropout_masks(kind, inputs))


def run_functional(sq, kind: str, inputs: Inputs, dtype: torch.dtype | None) -> Run:
    """``sq``'s functional pair (sq = torch_impl with a dtype, or reference in float64)."""
    c = inputs.case

    def convert(a):
        if dtype is None or not isinstance(a, np.ndarray):
            return a
        return to_torch(a, dtype)
    params = {k: convert(v) for k, v in kind_params(kind, inputs).items()}
    arrays = {n: convert(a) for n, a in kind_arrays(kind, inputs).items()}
    masks = {k: convert(v) for k, v in kind_masks(kind, inputs).items()}
    drop = kind_dropout_masks(kind, inputs)
    options = dict(nhead=c.nhead, activation=c.activation, layer_norm_eps=c.eps,
                   norm_first=c.norm_first, dropout=c.dropout,
                   dropout_masks=None if drop is None else {k: convert(v)
                                                            for k, v in drop.items()})
    dout = convert(kind_dout(kind, inputs))
    if kind == "encoder_layer":
        out, cache = sq.transformer_encoder_layer_forward(arrays["src"], params, **masks,
                                                          **options)
        dsrc, dparams = sq.transformer_encoder_layer_backward(dout, cache)
        return Run(out, {"src": dsrc}, dparams)
    if kind == "decoder_layer":
        out, cache = sq.transformer_decoder_layer_forward(arrays["tgt"], arrays["memory"],
                                                          params, **masks, **options)
        dtgt, dmemory, dparams = sq.transformer_decoder_layer_backward(dout, cache)
        return Run(out, {"tgt": dtgt, "memory": dmemory}, dparams)
    if kind == "encoder":
        out, cache = sq.transformer_encoder_forward(arrays["src"], params,
                                                    num_layers=c.num_layers, **masks, **options)
        dsrc, dparams = sq.transformer_encoder_backward(dout, cache)
        return Run(out, {"src": dsrc}, dparams)
    if kind == "decoder":
        out, cache = sq.transformer_decoder_forward(arrays["tgt"], arrays["memory"], params,
                                                    num_layers=c.num_layers, **masks, **options)
        dtgt, dmemory, dparams = sq.transformer_decoder_backward(dout, cache)
        return Run(out, {"tgt": dtgt, "memory": dmemory}, dparams)
    out, cache = sq.transformer_forward(arrays["src"], arrays["tgt"], params,
                                        num_encoder_layers=c.num_layers,
                                        num_decoder_layers=c.num_layers, **masks, **options)
    dsrc, dtgt, dparams = sq.transformer_backward(dout, cache)
    return Run(out, {"src": dsrc, "tgt": dtgt}, dparams)


def assert_runs_close(actual: Run, expected: Run, budget, float32: bool = False,
                      query_only: set[str] = frozenset()) -> None:
    """out within the forward budget, every gradient within the gradient budget: one of norm
    below tolerances.py's floor to budget x floor absolute (``assert_gradient_close``), and
    ``query_only``'s tensors (``query_only_norms``) below QUERY_ONLY_FLOOR likewise."""
    assert_close(actual.out, expected.out, budget.forward, "out")
    floor = FLOAT32_GRADIENT_FLOOR if float32 else FLOAT64_GRADIENT_FLOOR
    for group in ("dinputs", "dparams"):
        got, want = getattr(actual, group), getattr(expected, group)
        assert set(got) == set(want), f"{group}: keys differ: {sorted(set(got) ^ set(want))}"
        for name in want:
            name_floor = QUERY_ONLY_FLOOR[float32] if name in query_only else floor
            assert_gradient_close(got[name], want[name], budget.gradient, name_floor,
                                  f"d{name}")


def query_only_norms(kind: str, inputs: Inputs) -> set[str]:
    """The decoders' pre-LN norm2 parameters: LN2 feeds only the cross-attention's query, so
    their gradient is the softmax's query gradient alone, dS = P (dP - D), O(1) terms that
    cancel by construction (exactly 0 where every query sees one key, small where one key
    dominates or the keys look alike). ``assert_runs_close`` gives them QUERY_ONLY_FLOOR."""
    if kind.startswith("encoder") or not inputs.case.norm_first:
        return set()
    return {name for name in kind_params(kind, inputs)
            if name.split(".")[-2] == "norm2" and not name.startswith("encoder.")}


# Gradient floors (parity.assert_gradient_close) for query_only_norms' tensors, by float32.
# Seen: exactly-0 gradients computed as 5e-15 (float64) and 1.6e-7 (float32) of noise, and a
# float32 one of norm 9e-3 whose O(1) terms cancel ~100-fold, where torch.nn's own float32 has
# relative error 6.9e-5 against float64 and ours 1.1e-4. Below these norms a tensor is held
# to budget x floor absolute: 1e-12 (float64), 1e-5 (float32), ~100 roundings of O(1) terms.
QUERY_ONLY_FLOOR = {False: 1e-2, True: 1e-1}


DTYPES = {"float64": (torch.float64, TORCHNN64_VS_OURS64),
          "float32": (torch.float32, TORCH32_VS_REF64)}

# ----------------------------------------------------------------------------- against torch.nn

@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@given(case=cases())
@example(case=BATCH1_LENGTH1)
@example(case=UNEQUAL_LENGTHS)
@example(case=PRE_LN_GELU_NO_BIAS)
@example(case=CAUSAL_HINTS)
@example(case=LONG_TARGET)
def test_modules_match_torch_nn_outputs_and_every_gradient(kind: str, dtype_name: str,
                                                           case: Case) -> None:
    """Same state dict (loaded both ways, strict), same masks: out, the inputs' gradients and
    every parameter's, float64 against float64 and float32 against torch.nn in float64."""
    dtype, budget = DTYPES[dtype_name]
    inputs = make_inputs(case)
    if dtype == torch.float32:
        inputs = float32_inputs(inputs)
    expected = run_torch_nn(kind, inputs)
    actual = run_torch_impl_module(kind, inputs, dtype)
    assert_runs_close(actual, expected, budget, dtype == torch.float32,
                      query_only_norms(kind, inputs))


def _fully_padded_first_item(kind: str, inputs: Inputs) -> Inputs:
    """Every key of batch item 0 padded, in each padding mask the kind takes."""
    masks = dict(inputs.masks)
    for name in PADDING_NAMES:
        if name in kind_masks(kind, inputs):
            masks[name] = masks[name].copy()
            masks[name][0] = True
    return inputs._replace(masks=masks)


def _batch_slice(inputs: Inputs, rows: slice) -> Inputs:
    """The batch items ``rows`` (the case has no attention masks, whose 3-d form mixes the
    batch with the heads)."""
    masks = {k: None if v is None else v[rows] for k, v in inputs.masks.items()}
    return inputs._replace(case=inputs.case._replace(batch=inputs.src[rows].shape[0]),
                           src=inputs.src[rows], tgt=inputs.tgt[rows],
                           memory=inputs.memory[rows], masks=masks,
                           dsrc_out=inputs.dsrc_out[rows], dtgt_out=inputs.dtgt_out[rows])


def _assert_finite(run: Run) -> None:
    for name, value in [("out", run.out), *run.dinputs.items(), *run.dparams.items()]:
        assert torch.isfinite(value).all(), f"{name}: not finite"


def _torch_nn_finite(run: Run) -> bool:
    return all(bool(torch.isfinite(v).all())
               for v in [run.out, *run.dinputs.values(), *run.dparams.values()])


@pytest.mark.parametrize("kind", KINDS)
def test_fully_padded_batch_item_is_finite_and_matches_torch_nn(kind: str) -> None:
    """Batch item 0 has every key padded. Ours gives its queries attention weights 0 and finite
    values everywhere. The torch here (2.13) does the same and is held to everything; a torch
    whose softmax over no key gives NaN (there, and through it in every parameter gradient) is
    held to the other items, and to our parameter gradients with item 0's upstream gradient
    zero against its own over the other items alone."""
    case = Case(batch=3, src_len=4, tgt_len=3, num_layers=2, src_padding=True, tgt_padding=True,
                memory_padding=True, src_causal=kind == "transformer", seed=11)
    inputs = _fully_padded_first_item(kind, make_inputs(case))
    ours = run_torch_impl_module(kind, inputs, torch.float64)
    _assert_finite(ours)
    theirs = run_torch_nn(kind, inputs)
    budget = TORCHNN64_VS_OURS64
    if _torch_nn_finite(theirs):
        assert_runs_close(ours, theirs, budget)
        return
    assert_close(ours.out[1:], theirs.out[1:], budget.forward, "out[1:]")
    silent = inputs._replace(dsrc_out=inputs.dsrc_out.copy(), dtgt_out=inputs.dtgt_out.copy())
    silent.dsrc_out[0] = 0.0
    silent.dtgt_out[0] = 0.0
    ours = run_torch_impl_module(kind, silent, torch.float64)
    rest = run_torch_nn(kind, _batch_slice(silent, slice(1, None)))
    assert_all_close({k: v[1:] for k, v in ours.dinputs.items()}, rest.dinputs, budget.gradient,
                     "d")
    assert_all_close(ours.dparams, rest.dparams, budget.gradient, "d")


@pytest.mark.parametrize("kind, mask_name", [("encoder_layer", "src_mask"),
                                             ("decoder_layer", "tgt_mask"),
                                             ("decoder_layer", "memory_mask")])
def test_fully_masked_query_row_is_finite_and_matches_torch_nn(kind: str,
                                                               mask_name: str) -> None:
    """A 2-d mask hiding every key from query 0: ours finite (its attention weights 0), equal
    to the torch here in everything; a torch giving NaN in row 0 is held to the other rows,
    which a single layer keeps apart."""
    case = Case(batch=2, src_len=4, tgt_len=4, seed=12, **{mask_name: "bool_2d"})
    inputs = make_inputs(case)
    mask = inputs.masks[mask_name].copy()
    mask[0] = True
    inputs = inputs._replace(masks={**inputs.masks, mask_name: mask})
    ours = run_torch_impl_module(kind, inputs, torch.float64)
    _assert_finite(ours)
    theirs = run_torch_nn(kind, inputs)
    if _torch_nn_finite(theirs):
        assert_runs_close(ours, theirs, TORCHNN64_VS_OURS64)
    else:
        assert_close(ours.out[:, 1:], theirs.out[:, 1:], TORCHNN64_VS_OURS64.forward,
                     "out[:, 1:]")


@pytest.mark.parametrize("elementwise_affine, bias", [(True, True), (True, False),
                                                      (False, True)])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_layer_norm_module_matches_torch_nn(elementwise_affine: bool, bias: bool,
                                            dtype_name: str) -> None:
    dtype, budget = DTYPES[dtype_name]
    rng = np.random.default_rng(13)
    x = float32_exact(rng.standard_normal((2, 3, 5)) * 3 + 1)
    dy = float32_exact(rng.standard_normal((2, 3, 5)))
    weight, bias_value = (float32_exact(1 + rng.standard_normal(5)),
                          float32_exact(rng.standard_normal(5)))
    runs = []
    for backend, run_dtype in ((tim, dtype), (nn, torch.float64)):
        norm = backend.LayerNorm(5, eps=1e-3, elementwise_affine=elementwise_affine, bias=bias,
                                 dtype=run_dtype)
        with torch.no_grad():
            for p, value in zip(norm.parameters(), (weight, bias_value)):
                p.copy_(to_torch(value))
        xt = to_torch(x, run_dtype).requires_grad_()
        y = norm(xt)
        y.backward(to_torch(dy, run_dtype))
        runs.append(Run(y.detach(), {"x": xt.grad},
                        {n: p.grad for n, p in norm.named_parameters()}))
    assert_runs_close(runs[0], runs[1], budget, dtype == torch.float32)
    assert list(tim.LayerNorm(5, bias=bias).state_dict()) == \
        list(nn.LayerNorm(5, bias=bias).state_dict())

# ---------------------------------------------------------------- functional pairs, reference

@pytest.mark.parametrize("kind", KINDS)
@given(case=cases(dropout=True))
@example(case=BATCH1_LENGTH1)
@example(case=UNEQUAL_LENGTHS)
@example(case=PRE_LN_GELU_NO_BIAS)
@example(case=DROPOUT)
@example(case=DROPOUT_PRE_LN)
def test_functional_pairs_match_the_modules_under_autograd(kind: str, case: Case) -> None:
    """The explicit-cache forward/backward against the module's autograd (its packed GEMMs and
    fused ops), with the same explicit dropout keep-masks, in float64."""
    inputs = make_inputs(case)
    functional = run_functional(tim, kind, inputs, torch.float64)
    module = run_torch_impl_module(kind, inputs, torch.float64)
    assert_runs_close(functional, module, FLOAT64_REORDERED,
                      query_only=query_only_norms(kind, inputs))
    assert list(functional.dparams) == list(kind_params(kind, inputs))  # keyed like params


REFERENCE_DTYPES = {"float64": (torch.float64, TORCH64_VS_REF64),
                    "float32": (torch.float32, TORCH32_VS_REF64)}


@pytest.mark.parametrize("dtype_name", list(REFERENCE_DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@given(case=cases(dropout=True))
@example(case=BATCH1_LENGTH1)
@example(case=UNEQUAL_LENGTHS)
@example(case=PRE_LN_GELU_NO_BIAS)
@example(case=LONG_TARGET)
@example(case=DROPOUT)
@example(case=DROPOUT_PRE_LN)
def test_torch_impl_functional_matches_reference(kind: str, dtype_name: str,
                                                 case: Case) -> None:
    """torch_impl's functional pairs against reference/encoder_decoder.py's (float64 NumPy),
    the same explicit dropout masks on both sides."""
    dtype, budget = REFERENCE_DTYPES[dtype_name]
    inputs = make_inputs(case)
    if dtype == torch.float32:
        inputs = float32_inputs(inputs)
    expected = run_functional(reference, kind, inputs, None)
    actual = run_functional(tim, kind, inputs, dtype)
    assert_runs_close(actual, expected, budget, dtype == torch.float32,
                      query_only_norms(kind, inputs))


ENCODER_DECODER_NAMES = (
    "LayerNorm", "transformer_encoder_layer_forward", "transformer_encoder_layer_backward",
    "transformer_decoder_layer_forward", "transformer_decoder_layer_backward",
    "transformer_encoder_forward", "transformer_encoder_backward", "transformer_decoder_forward",
    "transformer_decoder_backward", "transformer_forward", "transformer_backward",
    "transformer_param_shapes", "transformer_dropout_mask_shapes", "TransformerEncoderLayer",
    "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer")


def test_both_backends_export_the_encoder_decoder_names() -> None:
    assert set(ENCODER_DECODER_NAMES) <= set(tim.__all__)
    missing = sorted(set(ENCODER_DECODER_NAMES) - set(reference.__all__))
    assert not missing, f"reference.__all__ lacks {missing}"

# ---------------------------------------------------------------- the modules themselves

def test_param_shapes_are_torch_nn_transformer_state_dict() -> None:
    for bias in (True, False):
        theirs = nn.Transformer(D_MODEL, 2, 2, 1, DIM_FF, bias=bias, batch_first=True)
        expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        shapes = tim.transformer_param_shapes(D_MODEL, 2, 2, 1, DIM_FF, bias=bias)
        assert list(shapes.items()) == list(expected.items())
        ours = tim.Transformer(D_MODEL, 2, 2, 1, DIM_FF, bias=bias)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
        assert list(ours.state_dict()) == list(shapes)


def test_dropout_mask_shapes_name_every_site() -> None:
    shapes = tim.transformer_dropout_mask_shapes(2, 5, 3, d_model=8, nhead=2,
                                                 num_encoder_layers=2, num_decoder_layers=1,
                                                 dim_feedforward=12)
    assert len(shapes) == 2 * 4 + 6
    assert shapes["encoder.layers.1.self_attn"] == (2, 2, 5, 5)
    assert shapes["encoder.layers.0.dropout"] == (2, 5, 12)
    assert shapes["decoder.layers.0.self_attn"] == (2, 2, 3, 3)
    assert shapes["decoder.layers.0.multihead_attn"] == (2, 2, 3, 5)
    assert shapes["decoder.layers.0.dropout3"] == (2, 3, 8)


def test_train_mode_draws_dropout_masks_and_eval_mode_drops_nothing() -> None:
    torch.manual_seed(0)
    model = tim.Transformer(D_MODEL, 2, 1, 1, DIM_FF, dropout=0.5, dtype=torch.float64)
    src, tgt = torch.randn(2, 4, D_MODEL, dtype=torch.float64), torch.randn(2, 3, D_MODEL,
                                                                            dtype=torch.float64)
    torch.manual_seed(1)
    first = model(src, tgt)
    torch.manual_seed(1)
    again = model(src, tgt)
    second = model(src, tgt)
    assert torch.equal(first, again) and not torch.allclose(first, second)
    model.eval()
    params = {k: v.detach() for k, v in model.state_dict().items()}
    expected, _ = tim.transformer_forward(src, tgt, params, nhead=2, num_encoder_layers=1,
                                          num_decoder_layers=1)
    assert_close(model(src, tgt), expected, FLOAT64_REORDERED.forward, "eval out")


def test_initialization_follows_torch_nn() -> None:
    """Transformer: every parameter of dim > 1 Xavier-uniform, the rest torch.nn's (zero
    attention biases, layer-norm weights 1 and biases 0; linear biases U(±1/√fan_in))."""
    torch.manual_seed(0)
    model = tim.Transformer(16, 4, 2, 2, 24)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else
                               torch.zeros_like(p)), name
        elif "_attn." in name:
            assert not p.any(), name
        else:
            assert p.abs().max() <= 1 / math.sqrt(16 if "linear1" in name else 24), name


def test_square_subsequent_mask_equals_torch_nn() -> None:
    for size in (1, 4):
        assert torch.equal(tim.Transformer.generate_square_subsequent_mask(size),
                           nn.Transformer.generate_square_subsequent_mask(size))
    assert tim.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64).dtype == \
        torch.float64

# ----------------------------------------------------------------------------- torch.compile

def test_compiled_transformer_matches_eager_with_no_graph_break() -> None:
    """torch.compile(fullgraph=True) of a small Transformer in train mode with explicit dropout
    masks, key padding and causal flags: one graph, the fused layer-norm op in the forward and
    backward graphs, out and every gradient within float32's budget of eager (``aot_eager``:
    what inductor traces, without a C++ build; see test_compile.py)."""
    case = Case(batch=2, src_len=5, tgt_len=4, num_layers=1, activation="gelu", dropout=0.25,
                src_padding=True, memory_padding=True, tgt_causal=True, seed=21)
    inputs = make_inputs(case)
    model = build(tim, "transformer", case, torch.float32)
    model.load_state_dict({k: to_torch(v, torch.float32) for k, v in inputs.params.items()})
    masks, drop = kind_masks("transformer", inputs), inputs.dropout_masks

    def run(m: nn.Module) -> Run:
        model.zero_grad(set_to_none=True)
        return run_module(m, "transformer", inputs, masks, torch.float32, drop, model)
    eager = run(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = AotEagerAndRecordGraphs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = run(torch.compile(model, fullgraph=True, backend=backend))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(backend.graphs) == 1
    targets = {str(node.target) for graphs in (backend.fw_graphs, backend.bw_graphs)
               for gm in graphs for node in gm.graph.nodes}
    assert {"seqtwin.layer_norm.default", "seqtwin.layer_norm_backward.default"} <= targets
    assert_runs_close(compiled, eager, TORCH32_VS_REF64, float32=True)

# ----------------------------------------------------------------------------- bad input

def _raises(error: type, argument: str, call, *args, **kwargs) -> None:
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert argument in str(info.value), f"{argument!r} not named in: {info.value}"


E = D_MODEL


def test_encoder_layer_rejects_bad_arguments() -> None:
    _raises(ValueError, "nhead", tim.TransformerEncoderLayer, E, 3)
    _raises(ValueError, "activation", tim.TransformerEncoderLayer, E, 2, activation="tanh")
    _raises(TypeError, "activation", tim.TransformerEncoderLayer, E, 2, activation=torch.relu)
    _raises(ValueError, "batch_first", tim.TransformerEncoderLayer, E, 2, batch_first=False)
    _raises(ValueError, "dropout", tim.TransformerEncoderLayer, E, 2, dropout=1.0)
    layer = tim.TransformerEncoderLayer(E, 2, DIM_FF)
    src = torch.randn(2, 3, E)
    _raises(ValueError, "src", layer, torch.randn(2, 3, E + 1))
    _raises(ValueError, "src", layer, torch.randn(3, E))
    _raises(TypeError, "src", layer, src.double())
    _raises(ValueError, "src", layer, src.clone().index_fill_(1, torch.tensor([1]), math.nan))
    _raises(ValueError, "src_mask", layer, src, src_mask=torch.zeros(3, 4, dtype=torch.bool))
    _raises(ValueError, "src_mask", layer, src, src_mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    _raises(TypeError, "src_mask", layer, src, src_mask=torch.zeros(3, 3, dtype=torch.int64))
    _raises(TypeError, "src_mask", layer, src, src_mask=torch.zeros(3, 3, dtype=torch.float64))
    _raises(ValueError, "src_mask", layer, src,
            src_mask=torch.full((3, 3), math.nan))
    _raises(TypeError, "src_key_padding_mask", layer, src,
            src_key_padding_mask=torch.zeros(2, 3))
    _raises(ValueError, "src_key_padding_mask", layer, src,
            src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    _raises(TypeError, "is_causal", layer, src, is_causal=1)
    with torch.no_grad():
        layer.linear1.weight[0, 0] = math.inf
    _raises(ValueError, "params['linear1.weight']", layer, src)


def test_decoder_layer_rejects_bad_arguments() -> None:
    _raises(ValueError, "nhead", tim.TransformerDecoderLayer, E, 5)
    _raises(ValueError, "batch_first", tim.TransformerDecoderLayer, E, 2, batch_first=False)
    layer = tim.TransformerDecoderLayer(E, 2, DIM_FF)
    tgt, memory = torch.randn(2, 3, E), torch.randn(2, 5, E)
    _raises(ValueError, "memory", layer, tgt, torch.randn(2, 5, E + 2))
    _raises(ValueError, "memory", layer, tgt, torch.randn(3, 5, E))
    _raises(ValueError, "memory", layer, tgt, memory.clone().fill_(math.nan))
    _raises(ValueError, "tgt", layer, torch.randn(2, 3, 4), memory)
    _raises(ValueError, "memory_mask", layer, tgt, memory,
            memory_mask=torch.zeros(3, 3, dtype=torch.bool))
    _raises(ValueError, "memory_mask", layer, tgt, memory,
            memory_mask=torch.zeros(2 * 3, 3, 5, dtype=torch.bool))
    _raises(TypeError, "tgt_mask", layer, tgt, memory, tgt_mask=torch.zeros(3, 3).half())
    _raises(ValueError, "tgt_key_padding_mask", layer, tgt, memory,
            tgt_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    _raises(ValueError, "memory_key_padding_mask", layer, tgt, memory,
            memory_key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    _raises(TypeError, "memory_is_causal", layer, tgt, memory, memory_is_causal="yes")


def test_encoder_rejects_bad_arguments() -> None:
    _raises(TypeError, "encoder_layer", tim.TransformerEncoder, nn.Linear(E, E), 2)
    layer = tim.TransformerEncoderLayer(E, 2, DIM_FF, dropout=0.3)
    _raises(ValueError, "num_layers", tim.TransformerEncoder, layer, 0)
    _raises(TypeError, "norm", tim.TransformerEncoder, layer, 1, norm="layer_norm")
    encoder = tim.TransformerEncoder(layer, 2).train()
    src = torch.randn(2, 3, E)
    _raises(ValueError, "mask", encoder, src, mask=torch.zeros(4, 4, dtype=torch.bool))
    _raises(ValueError, "src", encoder, torch.randn(2, 0, E))
    shapes = encoder._mask_shapes(2, 3, 3)
    masks = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    del masks["layers.1.dropout2"]
    _raises(ValueError, "dropout_masks", encoder, src, dropout_masks=masks)
    masks["layers.1.dropout2"] = torch.ones(2, 3, E + 1, dtype=torch.bool)
    _raises(ValueError, "dropout_masks['layers.1.dropout2']", encoder, src,
            dropout_masks=masks)


def test_decoder_rejects_bad_arguments() -> None:
    _raises(TypeError, "decoder_layer", tim.TransformerDecoder,
            tim.TransformerEncoderLayer(E, 2), 2)
    decoder = tim.TransformerDecoder(tim.TransformerDecoderLayer(E, 2, DIM_FF), 2,
                                     tim.LayerNorm(E))
    tgt, memory = torch.randn(2, 3, E), torch.randn(2, 4, E)
    _raises(ValueError, "memory", decoder, tgt, torch.randn(1, 4, E))
    _raises(ValueError, "memory", decoder, tgt, torch.randn(2, 4, E - 1))
    _raises(ValueError, "tgt_mask", decoder, tgt, memory, tgt_mask=torch.zeros(3, 4))
    _raises(TypeError, "memory_key_padding_mask", decoder, tgt, memory,
            memory_key_padding_mask=torch.zeros(2, 4, dtype=torch.int32))
    _raises(TypeError, "memory", decoder, tgt, memory.numpy())


def test_transformer_rejects_bad_arguments() -> None:
    _raises(ValueError, "nhead", tim.Transformer, E, 3, 1, 1, DIM_FF)
    _raises(ValueError, "activation", tim.Transformer, E, 2, 1, 1, DIM_FF, activation="silu")
    _raises(ValueError, "batch_first", tim.Transformer, E, 2, 1, 1, DIM_FF, batch_first=False)
    _raises(TypeError, "custom_encoder", tim.Transformer, E, 2, 1, 1, DIM_FF,
            custom_encoder=nn.Identity())
    model = tim.Transformer(E, 2, 1, 1, DIM_FF)
    src, tgt = torch.randn(2, 4, E), torch.randn(2, 3, E)
    _raises(ValueError, "tgt", model, src, torch.randn(3, 3, E))
    _raises(ValueError, "tgt", model, src, torch.randn(2, 3, E + 1))
    _raises(ValueError, "src", model, torch.randn(2, 4, 2 * E), tgt)
    _raises(ValueError, "memory_mask", model, src, tgt,
            memory_mask=torch.zeros(3, 3, dtype=torch.bool))
    _raises(ValueError, "src_mask", model, src, tgt, src_mask=torch.zeros(3, 4, 4))
    _raises(TypeError, "src_is_causal", model, src, tgt, src_is_causal=torch.tensor(True))
    with torch.no_grad():
        model.decoder.norm.weight[0] = math.nan
    _raises(ValueError, "params['decoder.norm.weight']", model, src, tgt)


def test_layer_norm_rejects_bad_arguments() -> None:
    _raises(TypeError, "normalized_shape", tim.LayerNorm, (2, 3))
    _raises(ValueError, "normalized_shape", tim.LayerNorm, 0)
    _raises(ValueError, "eps", tim.LayerNorm, 4, eps=0.0)
    _raises(ValueError, "x", tim.LayerNorm(4), torch.randn(2, 5))


def test_functional_api_rejects_bad_arguments() -> None:
    inputs = make_inputs(Case(batch=2, src_len=3, tgt_len=2, num_layers=2))
    params = {k: to_torch(v) for k, v in inputs.params.items()}
    src, tgt = to_torch(inputs.src), to_torch(inputs.tgt)
    options = dict(nhead=2, num_encoder_layers=2, num_decoder_layers=2)
    missing = dict(params)
    del missing["decoder.layers.1.linear2.bias"]
    _raises(ValueError, "decoder.layers.1.linear2.bias", tim.transformer_forward, src, tgt,
            missing, **options)
    _raises(ValueError, "params", tim.transformer_forward, src, tgt,
            {**params, "encoder.extra": params["encoder.norm.bias"]}, **options)
    _raises(ValueError, "params['encoder.layers.0.linear1.bias']", tim.transformer_forward, src,
            tgt, {**params, "encoder.layers.0.linear1.bias": torch.zeros(DIM_FF + 1,
                                                                         dtype=torch.float64)},
            **options)
    _raises(TypeError, "params['decoder.norm.weight']", tim.transformer_forward, src, tgt,
            {**params, "decoder.norm.weight": params["decoder.norm.weight"].float()}, **options)
    _raises(TypeError, "params", tim.transformer_forward, src, tgt, list(params), **options)
    _raises(ValueError, "nhead", tim.transformer_forward, src, tgt, params, nhead=3,
            num_encoder_layers=2, num_decoder_layers=2)
    _raises(ValueError, "activation", tim.transformer_forward, src, tgt, params,
            activation="swish", **options)
    _raises(ValueError, "dropout_masks", tim.transformer_forward, src, tgt, params,
            dropout=0.2, **options)
    _raises(ValueError, "dropout_masks", tim.transformer_forward, src, tgt, params,
            dropout_masks={}, **options)
    _raises(ValueError, "src", tim.transformer_forward, src.clone().fill_(math.inf), tgt, params,
            **options)
    _raises(ValueError, "tgt", tim.transformer_forward, src, tgt[:1], params, **options)
    layer = {k[len("decoder.layers.0."):]: v for k, v in params.items()
             if k.startswith("decoder.layers.0.")}
    _raises(ValueError, "memory", tim.transformer_decoder_layer_forward, tgt, src[:, :, :4],
            layer, nhead=2)
    _raises(ValueError, "memory", tim.transformer_decoder_layer_forward, tgt, src[:1], layer,
            nhead=2)
    _raises(ValueError, "params", tim.transformer_encoder_layer_forward, src, layer, nhead=2)
    out, cache = tim.transformer_forward(src, tgt, params, **options)
    _raises(ValueError, "dout", tim.transformer_backward, out[:, :1], cache)
    _raises(TypeError, "cache", tim.transformer_encoder_backward, out, cache)
    _raises(ValueError, "nhead", tim.transformer_param_shapes, E, 3, 1, 1, DIM_FF)
    _raises(ValueError, "dim_feedforward", tim.transformer_dropout_mask_shapes, 2, 3, 2,
            d_model=E, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=0)
