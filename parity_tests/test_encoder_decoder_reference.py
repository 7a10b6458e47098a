"""Properties of the reference's encoder-decoder Transformer (reference/encoder_decoder.py) and
of its LayerNorm module.

- The hand-written backward of the encoder layer, the decoder layer and the whole Transformer
  against central finite differences (float64), over post-LN / norm_first, relu / gelu, every
  kind of mask and explicit dropout keep-masks.
- Forward and every gradient against torch.nn's TransformerEncoderLayer,
  TransformerDecoderLayer and Transformer (batch_first=True, the same state dict, float64),
  and the reference's modules against the same torch.nn modules.
- Bad input: one test per class of error, the exception type and the argument named.

torch.nn runs in train() mode with dropout=0.0 and inputs that require grad, so its inference
fast path (nested tensors, which zero padded positions) is never taken. Its ``is_causal`` is a
hint that needs the causal mask given too, and it drops the given mask in favour of the hint
when no key padding mask is given, so the causal mask is folded into torch.nn's mask and the
hint passed only when the causal mask is all there is. A query whose keys are all masked gets
attention weights 0 from ours, NaN from some of torch.nn's paths: masks keep key 0 visible for
the comparisons, except in the all-padding test.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as ref
from reference.gradcheck import gradcheck

from .parity import assert_close, assert_gradient_close, to_numpy
from .strategies import seeds, to_torch
from .tolerances import (
    FLOAT64_GRADIENT_FLOOR,
    REF_VS_FINITE_DIFF,
    TORCH32_VS_REF64,
    TORCHNN64_VS_OURS64,
)

E, H, FF = 8, 2, 12  # d_model, nhead, dim_feedforward: tiny, so that finite differences are fast

pytestmark = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True:UserWarning")  # torch.nn's note on norm_first

KINDS = ("encoder_layer", "decoder_layer", "transformer")
# The attentions of each kind: "src" the encoder's self-attention (S, S), "tgt" the decoder's
# (T, T), "memory" its cross-attention (T, S).
ATTENTIONS = {"encoder_layer": ("src",), "decoder_layer": ("tgt", "memory"),
              "transformer": ("src", "tgt", "memory")}
MASK_KINDS = ("none", "bool_2d", "bool_3d", "float_2d", "float_3d")  # 3d: torch's (B·h, Tq, Tk)


class Case(NamedTuple):
    kind: str                  # one of KINDS
    batch: int = 2
    src_len: int = 3           # S: the encoder's input, the decoder layer's memory
    tgt_len: int = 2           # T
    norm_first: bool = False
    activation: str = "relu"
    bias: bool = True
    masks: tuple[str, str, str] = ("none", "none", "none")   # src, tgt, memory: MASK_KINDS
    padding: tuple[bool, bool, bool] = (False, False, False)  # key padding masks
    causal: tuple[bool, bool, bool] = (False, False, False)   # *_is_causal
    dropout: float = 0.0       # > 0: explicit keep-masks drawn from the seed
    all_padding: bool = False  # batch item 0's keys all padding in each padding mask
    layers: tuple[int, int] = (1, 1)  # the Transformer's encoder and decoder layers
    seed: int = 0


class Inputs(NamedTuple):
    case: Case
    arrays: dict[str, np.ndarray]        # "src" / "tgt" / "memory" and "params.<name>"
    attention: dict[str, tuple]          # per attention: (attn_mask, key_padding_mask, causal)
    dropout_masks: dict[str, np.ndarray] | None
    dout: np.ndarray


@st.composite
def cases(draw: st.DrawFn, kind: str, max_batch: int = 3, max_len: int = 4,
          dropout: bool = False, layers: tuple[int, int] = (1, 1)) -> Case:
    def three(strategy: st.SearchStrategy) -> tuple:
        return tuple(draw(strategy) for _ in range(3))

    return Case(kind, draw(st.integers(1, max_batch)), draw(st.integers(1, max_len)),
                draw(st.integers(1, max_len)), draw(st.booleans()),
                draw(st.sampled_from(["relu", "gelu"])), draw(st.booleans()),
                three(st.sampled_from(MASK_KINDS)), three(st.booleans()), three(st.booleans()),
                draw(st.sampled_from([0.0, 0.3])) if dropout else 0.0, False, layers,
                draw(seeds))


def _sub(arrays: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}


def _by_kind(case: Case, tree: dict[str, Any]) -> dict[str, Any]:
    """A Transformer's names cut down to one layer's for the layer kinds."""
    prefix = {"encoder_layer": "encoder.layers.0.", "decoder_layer": "decoder.layers.0.",
              "transformer": ""}[case.kind]
    return _sub(tree, prefix)


def _attention_mask(rng: np.random.Generator, kind: str, batch: int, tq: int,
                    tk: int) -> np.ndarray | None:
    if kind == "none":
        return None
    dtype, layout = kind.split("_")
    shape = (tq, tk) if layout == "2d" else (batch * H, tq, tk)
    hidden = rng.random(shape) < 0.4
    hidden[..., 0] = False  # key 0 stays visible to every query (torch.nn: NaN otherwise)
    if dtype == "bool":
        return hidden
    return np.where(hidden, -np.inf, rng.standard_normal(shape))


def build_inputs(case: Case) -> Inputs:
    """float64 inputs, parameters (biases and norms away from 0 and 1), masks, keep-masks and
    dout from the case's seed."""
    rng = np.random.default_rng(case.seed)
    B, S, T = case.batch, case.src_len, case.tgt_len
    n_enc, n_dec = case.layers
    arrays = {"encoder_layer": {"src": (B, S, E)}, "decoder_layer": {"tgt": (B, T, E),
              "memory": (B, S, E)}, "transformer": {"src": (B, S, E), "tgt": (B, T, E)}}
    arrays = {name: rng.standard_normal(shape) for name, shape in arrays[case.kind].items()}
    shapes = _by_kind(case, ref.transformer_param_shapes(E, H, n_enc, n_dec, FF, case.bias))
    for name, shape in shapes.items():
        if len(shape) == 2:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            value = 0.5 * rng.standard_normal(shape)
        arrays[f"params.{name}"] = value
    attention = {}
    lengths = {"src": (S, S), "tgt": (T, T), "memory": (T, S)}
    for i, name in enumerate(("src", "tgt", "memory")):
        tq, tk = lengths[name]
        mask = _attention_mask(rng, case.masks[i], B, tq, tk)
        padding = None
        if case.padding[i]:
            padding = rng.random((B, tk)) < 0.4
            padding[:, 0] = False
            if case.all_padding:
                padding[0] = True
        attention[name] = (mask, padding, case.causal[i])
    dropout_masks = None
    if case.dropout > 0:
        mask_shapes = ref.transformer_dropout_mask_shapes(
            B, S, T, d_model=E, nhead=H, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
            dim_feedforward=FF)
        dropout_masks = {site: rng.random(shape) >= case.dropout
                         for site, shape in _by_kind(case, mask_shapes).items()}
    out_len = S if case.kind == "encoder_layer" else T
    return Inputs(case, arrays, attention, dropout_masks, rng.standard_normal((B, out_len, E)))


def _mask_names(kind: str, attention: str) -> tuple[str, str, str]:
    if attention == "src":
        causal = "is_causal" if kind == "encoder_layer" else "src_is_causal"
        return "src_mask", "src_key_padding_mask", causal
    return f"{attention}_mask", f"{attention}_key_padding_mask", f"{attention}_is_causal"


def our_masks(inputs: Inputs) -> dict[str, Any]:
    kwargs = {}
    for attention in ATTENTIONS[inputs.case.kind]:
        kwargs.update(zip(_mask_names(inputs.case.kind, attention), inputs.attention[attention]))
    return kwargs


def torch_nn_masks(inputs: Inputs) -> dict[str, Any]:
    """Our masks in torch.nn's form: the causal mask folded into the attention mask (the hint
    alone only where it is the whole mask), the key padding mask of the attention mask's kind
    (torch.nn deprecates mixing them)."""
    kwargs = {}
    for attention in ATTENTIONS[inputs.case.kind]:
        mask, padding, causal = inputs.attention[attention]
        hint = causal and mask is None
        if causal:
            S, T = inputs.case.src_len, inputs.case.tgt_len
            tq, tk = {"src": (S, S), "tgt": (T, T), "memory": (T, S)}[attention]
            future = np.triu(np.ones((tq, tk), dtype=bool), k=1)
            if mask is None:
                mask = future
            elif mask.dtype == np.bool_:
                mask = mask | future
            else:
                mask = np.where(future, -np.inf, mask)
        if mask is not None and mask.dtype != np.bool_ and padding is not None:
            padding = np.where(padding, -np.inf, 0.0)
        names = _mask_names(inputs.case.kind, attention)
        kwargs[names[0]] = None if mask is None else to_torch(mask)
        kwargs[names[1]] = None if padding is None else to_torch(padding)
        kwargs[names[2]] = hint
    return kwargs


def _options(case: Case) -> dict[str, Any]:
    return dict(nhead=H, activation=case.activation, norm_first=case.norm_first,
                dropout=case.dropout)


def reference_forward(inputs: Inputs, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, Any]:
    case, params = inputs.case, _sub(arrays, "params.")
    kwargs = {**_options(case), **our_masks(inputs), "dropout_masks": inputs.dropout_masks}
    if case.kind == "encoder_layer":
        return ref.transformer_encoder_layer_forward(arrays["src"], params, **kwargs)
    if case.kind == "decoder_layer":
        return ref.transformer_decoder_layer_forward(arrays["tgt"], arrays["memory"], params,
                                                     **kwargs)
    return ref.transformer_forward(arrays["src"], arrays["tgt"], params,
                                   num_encoder_layers=case.layers[0],
                                   num_decoder_layers=case.layers[1], **kwargs)


def run_reference(inputs: Inputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(out, gradients keyed like inputs.arrays) of the functional pair."""
    out, cache = reference_forward(inputs, inputs.arrays)
    kind = inputs.case.kind
    if kind == "encoder_layer":
        dsrc, dparams = ref.transformer_encoder_layer_backward(inputs.dout, cache)
        grads = {"src": dsrc}
    elif kind == "decoder_layer":
        dtgt, dmemory, dparams = ref.transformer_decoder_layer_backward(inputs.dout, cache)
        grads = {"tgt": dtgt, "memory": dmemory}
    else:
        dsrc, dtgt, dparams = ref.transformer_backward(inputs.dout, cache)
        grads = {"src": dsrc, "tgt": dtgt}
    grads.update({f"params.{name}": g for name, g in dparams.items()})
    return out, grads


def torch_nn_module(case: Case) -> torch.nn.Module:
    common = dict(dim_feedforward=FF, dropout=0.0, activation=case.activation,
                  batch_first=True, norm_first=case.norm_first, bias=case.bias,
                  dtype=torch.float64)
    if case.kind == "encoder_layer":
        return torch.nn.TransformerEncoderLayer(E, H, **common)
    if case.kind == "decoder_layer":
        return torch.nn.TransformerDecoderLayer(E, H, **common)
    return torch.nn.Transformer(E, H, *case.layers, **common)


def run_torch_nn(inputs: Inputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(out, gradients keyed like inputs.arrays) of the torch.nn module in train mode."""
    module = torch_nn_module(inputs.case).train()
    module.load_state_dict({name: to_torch(a) for name, a in
                            _sub(inputs.arrays, "params.").items()}, strict=True)
    leaves = {name: to_torch(a).requires_grad_() for name, a in inputs.arrays.items()
              if not name.startswith("params.")}
    out = module(*leaves.values(), **torch_nn_masks(inputs))
    leaves.update({f"params.{name}": p for name, p in module.named_parameters()})
    grads = torch.autograd.grad(out, list(leaves.values()), to_torch(inputs.dout))
    return to_numpy(out), {name: to_numpy(g) for name, g in zip(leaves, grads)}


def assert_matches(actual: tuple, expected: tuple, budget: Any) -> None:
    """Forward and every gradient within budget; a gradient that is zero in exact arithmetic
    (the query side of an attention over one visible key, where softmax is 1 whatever the
    query: a pre-LN decoder's norm2 without bias over a memory padded down to one key) is
    held to tolerances.FLOAT64_GRADIENT_FLOOR's absolute bound (ours 0, torch.nn 4e-16)."""
    out, grads = actual
    out_expected, grads_expected = expected
    assert_close(out, out_expected, budget.forward, "out")
    assert set(grads) == set(grads_expected)
    for name in sorted(grads_expected):
        assert_gradient_close(grads[name], grads_expected[name], budget.gradient,
                              FLOAT64_GRADIENT_FLOOR, f"d{name}")


def check_finite_differences(inputs: Inputs, names: list[str] | None = None) -> None:
    """gradcheck of the inputs ``names`` (default: every input and parameter); the others are
    held fixed."""
    _, analytic = run_reference(inputs)
    names = list(inputs.arrays) if names is None else names
    fixed = {name: a for name, a in inputs.arrays.items() if name not in names}

    def forward(**arrays: np.ndarray) -> np.ndarray:
        return reference_forward(inputs, {**fixed, **arrays})[0]

    gradcheck(forward, {name: inputs.arrays[name] for name in names}, inputs.dout,
              {name: analytic[name] for name in names}, tol=REF_VS_FINITE_DIFF)


# --------------------------------------------------------------------- edge cases (explicit)

SINGLE = dict(batch=1, src_len=1, tgt_len=1)  # batch 1, length 1
ALL_MASKS = dict(masks=("float_3d", "bool_2d", "float_2d"), padding=(True, True, True),
                 causal=(True, True, True))
ALL_MASKS_3D = dict(masks=("bool_3d", "float_3d", "bool_3d"), padding=(True, False, True))
UNEQUAL = dict(batch=3, src_len=4, tgt_len=2)     # source longer than target
LONGER_TGT = dict(batch=2, src_len=1, tgt_len=4)  # target longer than source, causal memory
PRE_GELU_NOBIAS = dict(norm_first=True, activation="gelu", bias=False)
DROPOUT = dict(dropout=0.3)
ALL_PADDING = dict(padding=(True, True, True), all_padding=True)


def case(kind: str, *presets: dict, **fields: Any) -> Case:
    """A Case from presets (the dicts above, later ones winning) and fields."""
    merged: dict[str, Any] = {}
    for preset in presets:
        merged.update(preset)
    return Case(kind, **{**merged, **fields})


# ----------------------------------------------------------------------- finite differences

# Each parameter element costs two forwards: a few examples per test keep the file fast.
@settings(max_examples=4)
@given(case=cases("encoder_layer", dropout=True))
@example(case=case("encoder_layer", SINGLE))
@example(case=case("encoder_layer", ALL_MASKS, DROPOUT))
@example(case=case("encoder_layer", ALL_MASKS_3D, PRE_GELU_NOBIAS))
@example(case=case("encoder_layer", ALL_PADDING, PRE_GELU_NOBIAS))
def test_reference_encoder_layer_backward_matches_finite_differences(case: Case) -> None:
    check_finite_differences(build_inputs(case))


@settings(max_examples=3)
@given(case=cases("decoder_layer", dropout=True))
@example(case=case("decoder_layer", SINGLE, norm_first=True))
@example(case=case("decoder_layer", ALL_MASKS, UNEQUAL, DROPOUT))
@example(case=case("decoder_layer", LONGER_TGT, PRE_GELU_NOBIAS,
                   causal=(False, True, True)))
@example(case=case("decoder_layer", ALL_PADDING, activation="gelu"))
def test_reference_decoder_layer_backward_matches_finite_differences(case: Case) -> None:
    check_finite_differences(build_inputs(case))


def one_dimensional(inputs: Inputs) -> list[str]:
    """src, tgt and every bias and norm parameter (the layer tests cover every weight)."""
    return [name for name, a in inputs.arrays.items()
            if not name.startswith("params.") or a.ndim == 1]


# Two decoder layers, so that the memory's gradient sums over the layers before it enters the
# encoder's backward (dsrc checks that sum); the weights of each layer kind are covered above,
# so src, tgt and the one-dimensional parameters here (two forwards per element).
@settings(max_examples=3)
@given(case=cases("transformer", max_batch=2, max_len=3, dropout=True, layers=(1, 2)))
@example(case=case("transformer", SINGLE, layers=(1, 2)))
@example(case=case("transformer", ALL_MASKS, UNEQUAL, DROPOUT, layers=(1, 2)))
@example(case=case("transformer", ALL_PADDING, PRE_GELU_NOBIAS, layers=(1, 2)))
def test_reference_transformer_backward_matches_finite_differences(case: Case) -> None:
    inputs = build_inputs(case)
    check_finite_differences(inputs, one_dimensional(inputs))


def test_reference_transformer_weight_gradients_match_finite_differences() -> None:
    inputs = build_inputs(case("transformer", ALL_MASKS_3D, DROPOUT, batch=1, src_len=2,
                               tgt_len=3, norm_first=True, activation="gelu"))
    check_finite_differences(inputs)


# ------------------------------------------------------------------------- against torch.nn

@given(case=cases("encoder_layer"))
@example(case=case("encoder_layer", SINGLE))
@example(case=case("encoder_layer", ALL_MASKS))
@example(case=case("encoder_layer", ALL_MASKS_3D, PRE_GELU_NOBIAS))
@example(case=case("encoder_layer", causal=(True, False, False)))  # the causal hint alone
@example(case=case("encoder_layer", masks=("float_2d",) * 3, padding=(True,) * 3,
                   activation="gelu", bias=False))
def test_reference_encoder_layer_matches_torch_nn(case: Case) -> None:
    inputs = build_inputs(case)
    assert_matches(run_reference(inputs), run_torch_nn(inputs), TORCHNN64_VS_OURS64)


@given(case=cases("decoder_layer"))
@example(case=case("decoder_layer", SINGLE))
@example(case=case("decoder_layer", ALL_MASKS, UNEQUAL))
@example(case=case("decoder_layer", ALL_MASKS_3D, LONGER_TGT, PRE_GELU_NOBIAS))
@example(case=case("decoder_layer", LONGER_TGT, causal=(False, True, True)))
def test_reference_decoder_layer_matches_torch_nn(case: Case) -> None:
    inputs = build_inputs(case)
    assert_matches(run_reference(inputs), run_torch_nn(inputs), TORCHNN64_VS_OURS64)


@given(case=cases("transformer", layers=(2, 2)))
@example(case=case("transformer", SINGLE))
@example(case=case("transformer", ALL_MASKS, UNEQUAL, layers=(2, 3)))
@example(case=case("transformer", ALL_MASKS_3D, LONGER_TGT, PRE_GELU_NOBIAS))
@example(case=case("transformer", UNEQUAL, norm_first=True, bias=False, layers=(2, 1)))
def test_reference_transformer_matches_torch_nn(case: Case) -> None:
    inputs = build_inputs(case)
    assert_matches(run_reference(inputs), run_torch_nn(inputs), TORCHNN64_VS_OURS64)


@pytest.mark.parametrize("case", [
    case("encoder_layer", ALL_PADDING),
    case("encoder_layer", ALL_PADDING, ALL_MASKS, PRE_GELU_NOBIAS),
    case("decoder_layer", ALL_PADDING, UNEQUAL),
    case("decoder_layer", ALL_PADDING, padding=(False, False, True), norm_first=True),
    case("transformer", ALL_PADDING, UNEQUAL, layers=(2, 2)),
    case("transformer", ALL_PADDING, ALL_MASKS, PRE_GELU_NOBIAS),
], ids=["encoder", "encoder-masks-pre", "decoder", "decoder-memory-pre", "transformer",
        "transformer-masks-pre"])
def test_all_padding_rows_are_finite_and_match_torch_nn_where_it_is_finite(case: Case) -> None:
    """Batch item 0 pads every key. torch.nn's attention gives such a query NaN on its explicit
    softmax (need_weights=True, the inference fast path) but weights 0, our rule, on its
    scaled_dot_product_attention path, which its Transformer layers take in training (torch
    2.5+). Ours is finite everywhere; every batch item torch.nn keeps finite must match, and
    its parameter gradients too when none is NaN."""
    inputs = build_inputs(case)
    (out, grads), (out_nn, grads_nn) = run_reference(inputs), run_torch_nn(inputs)
    for name, value in [("out", out), *grads.items()]:
        assert np.all(np.isfinite(value)), name
    finite = ~np.isnan(out_nn).reshape(len(out_nn), -1).any(axis=1)
    assert finite[1:].all()  # only item 0 is padded throughout
    assert_close(out[finite], out_nn[finite], TORCHNN64_VS_OURS64.forward, "out")
    for name in sorted(grads):
        if not name.startswith("params."):
            assert_close(grads[name][finite], grads_nn[name][finite],
                         TORCHNN64_VS_OURS64.gradient, f"d{name}")
        elif finite.all():
            assert_close(grads[name], grads_nn[name], TORCHNN64_VS_OURS64.gradient, f"d{name}")


def test_float32_inputs_compute_in_float32_near_float64() -> None:
    inputs = build_inputs(case("transformer", ALL_MASKS, UNEQUAL, activation="gelu"))
    out64, grads64 = run_reference(inputs)
    arrays32 = {name: a.astype(np.float32) for name, a in inputs.arrays.items()}
    attention32 = {name: tuple(m.astype(np.float32) if isinstance(m, np.ndarray)
                               and m.dtype == np.float64 else m for m in masks)
                   for name, masks in inputs.attention.items()}
    inputs32 = inputs._replace(arrays=arrays32, attention=attention32,
                               dout=inputs.dout.astype(np.float32))
    out32, grads32 = run_reference(inputs32)
    assert out32.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads32.values())
    # float32 against float64 on the same values: the float32 row of DESIGN.md's table
    assert_close(out32, out64, TORCH32_VS_REF64.forward, "out")
    for name in grads64:
        assert_close(grads32[name], grads64[name], TORCH32_VS_REF64.gradient, f"d{name}")


# ------------------------------------------------------------------------------ the modules

def reference_module(case: Case, dropout: float = 0.0) -> ref.Module:
    common = dict(dim_feedforward=FF, dropout=dropout, activation=case.activation,
                  norm_first=case.norm_first, bias=case.bias)
    if case.kind == "encoder_layer":
        return ref.TransformerEncoderLayer(E, H, **common, seed=0)
    if case.kind == "decoder_layer":
        return ref.TransformerDecoderLayer(E, H, **common, seed=0)
    return ref.Transformer(E, H, *case.layers, **common, seed=0)


def run_reference_module(module: Any, inputs: Inputs, **kwargs: Any) -> tuple:
    """(out, gradients keyed like inputs.arrays) through forward / backward / grads."""
    arrays = {name: a for name, a in inputs.arrays.items() if not name.startswith("params.")}
    out = module(*arrays.values(), **our_masks(inputs), **kwargs)
    dinputs = module.backward(inputs.dout)
    dinputs = dinputs if isinstance(dinputs, tuple) else (dinputs,)
    grads = dict(zip(arrays, dinputs))
    grads.update({f"params.{name}": g for name, g in module.grads.items()})
    return out, grads


@pytest.mark.parametrize("case", [
    case("encoder_layer", ALL_MASKS), case("decoder_layer", ALL_MASKS_3D, UNEQUAL),
    case("transformer", ALL_MASKS, UNEQUAL, PRE_GELU_NOBIAS, layers=(2, 2)),
    case("transformer", SINGLE)], ids=["encoder-layer", "decoder-layer", "transformer",
                                         "transformer-single"])
def test_reference_modules_match_torch_nn_modules(case: Case) -> None:
    inputs = build_inputs(case)
    module = reference_module(case)
    module.load_state_dict(_sub(inputs.arrays, "params."))
    assert_matches(run_reference_module(module, inputs), run_torch_nn(inputs),
                   TORCHNN64_VS_OURS64)
    with pytest.raises(RuntimeError, match="call forward first"):
        module.backward(inputs.dout)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_reference_stacks_match_torch_nn_stacks(decoder: bool, norm: bool) -> None:
    inputs = build_inputs(case("decoder_layer", ALL_MASKS, UNEQUAL, activation="gelu"))
    kwargs = dict(dim_feedforward=FF, dropout=0.0, activation="gelu")
    layer = (ref.TransformerDecoderLayer if decoder else ref.TransformerEncoderLayer)(
        E, H, **kwargs, seed=0)
    stack = (ref.TransformerDecoder if decoder else ref.TransformerEncoder)(
        layer, 2, ref.LayerNorm(E) if norm else None)
    nn_layer = (torch.nn.TransformerDecoderLayer if decoder else torch.nn.TransformerEncoderLayer)(
        E, H, **kwargs, batch_first=True, dtype=torch.float64)
    nn_stack = (torch.nn.TransformerDecoder if decoder else torch.nn.TransformerEncoder)(
        nn_layer, 2, torch.nn.LayerNorm(E, dtype=torch.float64) if norm else None).train()
    nn_stack.load_state_dict({name: to_torch(p) for name, p in stack.state_dict().items()},
                             strict=True)
    assert list(stack.state_dict()) == list(nn_stack.state_dict())
    tgt = to_torch(inputs.arrays["tgt"]).requires_grad_()
    memory = to_torch(inputs.arrays["memory"]).requires_grad_()
    masks = torch_nn_masks(inputs)
    if decoder:
        out = stack(inputs.arrays["tgt"], inputs.arrays["memory"], **our_masks(inputs))
        dinputs = stack.backward(inputs.dout)
        out_nn = nn_stack(tgt, memory, **masks)
        leaves = [tgt, memory]
    else:  # the decoder layer's tgt attention masks, as the encoder's mask
        names = ("tgt_mask", "tgt_key_padding_mask", "tgt_is_causal")
        ours = our_masks(inputs)
        out = stack(inputs.arrays["tgt"], *(ours[n] for n in names))
        dinputs = (stack.backward(inputs.dout),)
        out_nn = nn_stack(tgt, *(masks[n] for n in names))
        leaves = [tgt]
    params = dict(nn_stack.named_parameters())
    grads_nn = torch.autograd.grad(out_nn, leaves + list(params.values()),
                                   to_torch(inputs.dout))
    assert_close(out, out_nn, TORCHNN64_VS_OURS64.forward, "out")
    for d, d_nn, name in zip(dinputs, grads_nn, ["tgt", "memory"]):
        assert_close(d, d_nn, TORCHNN64_VS_OURS64.gradient, f"d{name}")
    assert set(stack.grads) == set(params)
    for name, g in zip(params, grads_nn[len(leaves):]):
        assert_close(stack.grads[name], g, TORCHNN64_VS_OURS64.gradient, f"d{name}")
    # the layers' grads are views of the stack's
    assert_close(stack.layers[1].grads["linear1.weight"], stack.grads["layers.1.linear1.weight"],
                 0.0, "layers[1].grads")


@pytest.mark.parametrize("bias", [True, False])
def test_transformer_state_dict_round_trips_with_torch_nn(bias: bool) -> None:
    model = ref.Transformer(E, H, 2, 1, FF, bias=bias, seed=0)
    nn_model = torch.nn.Transformer(E, H, 2, 1, FF, bias=bias, batch_first=True,
                                    dtype=torch.float64)
    assert list(model.state_dict()) == list(nn_model.state_dict())
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in nn_model.state_dict().items()}
    nn_model.load_state_dict({k: to_torch(v) for k, v in model.state_dict().items()},
                             strict=True)
    back = ref.Transformer(E, H, 2, 1, FF, bias=bias, seed=1)
    back.load_state_dict(nn_model.state_dict())
    for name, p in model.state_dict().items():
        assert_close(back.params[name], p, 0.0, name)
    # load_state_dict reaches the children's arrays
    assert_close(back.encoder.layers[1].params["linear2.weight"],
                 model.params["encoder.layers.1.linear2.weight"], 0.0, "encoder.layers[1]")


def test_transformer_init_follows_torch_nn() -> None:
    """Xavier-uniform for every weight matrix, the attention biases 0, the linear biases
    U(±1/√fan_in), the norms weight 1 and bias 0; independent copies of the layers' weights."""
    model = ref.Transformer(16, 4, 2, 2, 24, seed=0)
    for name, p in model.params.items():
        if p.ndim == 2:
            bound = np.sqrt(6.0 / sum(p.shape))
            assert 0.8 * bound < np.abs(p).max() <= bound, name
        elif name.endswith(("in_proj_bias", "out_proj.bias")):
            assert np.all(p == 0), name
        elif "norm" in name:
            assert np.all(p == (1 if name.endswith(".weight") else 0)), name
        else:
            fan_in = 24 if "linear2" in name else 16
            assert 0 < np.abs(p).max() <= 1 / np.sqrt(fan_in), name
    a, b = (model.params[f"encoder.layers.{i}.linear1.weight"] for i in (0, 1))
    assert not np.array_equal(a, b)


def test_square_subsequent_mask_matches_torch_nn() -> None:
    mask = ref.Transformer.generate_square_subsequent_mask(4)
    expected = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    assert mask.dtype == np.float64
    np.testing.assert_array_equal(mask, expected.numpy())
    assert ref.Transformer.generate_square_subsequent_mask(3, dtype=np.float32).dtype == \
        np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_modules_drop_out_in_training_only(kind: str) -> None:
    inputs = build_inputs(case(kind, ALL_MASKS, UNEQUAL, dropout=0.3))
    module = reference_module(inputs.case, dropout=0.3)
    params = _sub(inputs.arrays, "params.")
    module.load_state_dict(params)
    # given masks: the functional pair's results with them
    expected = run_reference(inputs)
    assert_matches(run_reference_module(module, inputs, dropout_masks=inputs.dropout_masks),
                   expected, TORCHNN64_VS_OURS64)
    # no masks: drawn from the module's Generator, a different dropout each call
    first = run_reference_module(module, inputs)[0]
    second = run_reference_module(module, inputs)[0]
    assert not np.allclose(first, second)
    # eval: no dropout, given masks ignored
    module.eval()
    no_dropout = run_reference(inputs._replace(case=inputs.case._replace(dropout=0.0),
                                               dropout_masks=None))
    assert_matches(run_reference_module(module, inputs, dropout_masks=inputs.dropout_masks),
                   no_dropout, TORCHNN64_VS_OURS64)


# ----------------------------------------------------------------------------- LayerNorm

@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, True)],
                         ids=["affine", "no-bias", "no-affine"])
def test_layer_norm_module_matches_torch_nn(affine: bool, bias: bool) -> None:
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    nn_norm = torch.nn.LayerNorm(5, eps=1e-3, elementwise_affine=affine, bias=bias,
                                 dtype=torch.float64)
    with torch.no_grad():
        for p in nn_norm.parameters():
            p.copy_(to_torch(rng.standard_normal(p.shape)))
    norm = ref.LayerNorm(5, eps=1e-3, elementwise_affine=affine, bias=bias)
    assert list(norm.params) == list(nn_norm.state_dict())
    norm.load_state_dict(nn_norm.state_dict())
    x_t = to_torch(x).requires_grad_()
    y_t = nn_norm(x_t)
    params = dict(nn_norm.named_parameters())
    grads = torch.autograd.grad(y_t, [x_t, *params.values()], to_torch(dy))
    y = norm(x)
    dx = norm.backward(dy)
    assert_close(y, y_t, TORCHNN64_VS_OURS64.forward, "y")
    assert_close(dx, grads[0], TORCHNN64_VS_OURS64.gradient, "dx")
    assert set(norm.grads) == set(params)
    for name, g in zip(params, grads[1:]):
        assert_close(norm.grads[name], g, TORCHNN64_VS_OURS64.gradient, f"d{name}")
    with pytest.raises(RuntimeError, match="call forward first"):
        norm.backward(dy)


# ----------------------------------------------------------------------------- bad input

_GOOD = build_inputs(case("transformer", batch=2, src_len=3, tgt_len=2))
SRC, TGT = _GOOD.arrays["src"], _GOOD.arrays["tgt"]
PARAMS = _sub(_GOOD.arrays, "params.")
ENCODER_LAYER = _sub(PARAMS, "encoder.layers.0.")
DECODER_LAYER = _sub(PARAMS, "decoder.layers.0.")
MEMORY = SRC


def encoder_layer(src=SRC, params=ENCODER_LAYER, **kwargs):
    return ref.transformer_encoder_layer_forward(src, params, **{"nhead": H, **kwargs})


def decoder_layer(tgt=TGT, memory=MEMORY, params=DECODER_LAYER, **kwargs):
    return ref.transformer_decoder_layer_forward(tgt, memory, params, **{"nhead": H, **kwargs})


def encoder(src=SRC, params=None, **kwargs):
    params = _sub(PARAMS, "encoder.") if params is None else params
    return ref.transformer_encoder_forward(src, params, **{"nhead": H, "num_layers": 1,
                                                           **kwargs})


def transformer(src=SRC, tgt=TGT, params=PARAMS, **kwargs):
    return ref.transformer_forward(src, tgt, params, **{
        "nhead": H, "num_encoder_layers": 1, "num_decoder_layers": 1, **kwargs})


def without(params: dict, name: str) -> dict:
    return {k: v for k, v in params.items() if k != name}


NAN_SRC = np.where(SRC > 1, np.nan, SRC)


@pytest.mark.parametrize("call, kwargs, error, pattern", [
    # nhead not dividing d_model
    (encoder_layer, {"nhead": 3}, ValueError, r"^nhead: expected a divisor of d_model E = 8"),
    (transformer, {"nhead": 0}, ValueError, r"^nhead: expected a positive int"),
    # activation
    (encoder_layer, {"activation": "tanh"}, ValueError, r"^activation: expected 'relu' or"),
    (decoder_layer, {"activation": torch.nn.functional.relu}, TypeError, r"^activation:"),
    # mask shapes and dtypes
    (encoder_layer, {"src_mask": np.zeros((4, 3), bool)}, ValueError,
     r"^src_mask: expected shape \(3, 3\) or \(B·nhead, 3, 3\) = \(4, 3, 3\), got \(4, 3\)"),
    (encoder_layer, {"src_mask": np.zeros((2, 3, 3), bool)}, ValueError, r"^src_mask:"),
    (decoder_layer, {"memory_mask": np.zeros((2, 2), bool)}, ValueError,
     r"^memory_mask: expected shape \(2, 3\)"),
    (decoder_layer, {"tgt_mask": np.zeros((2, 2), np.int64)}, TypeError,
     r"^tgt_mask: expected dtype bool or float64"),
    (decoder_layer, {"tgt_mask": np.zeros((2, 2), np.float32)}, TypeError, r"^tgt_mask:"),
    (transformer, {"src_mask": np.full((3, 3), np.nan)}, ValueError,
     r"^src_mask: contains NaN or \+inf"),
    (encoder_layer, {"src_key_padding_mask": np.zeros((2, 2), bool)}, ValueError,
     r"^src_key_padding_mask: expected shape \(B, 3\) = \(2, 3\)"),
    (decoder_layer, {"memory_key_padding_mask": np.zeros((2, 3))}, TypeError,
     r"^memory_key_padding_mask: expected a bool"),
    (transformer, {"tgt_key_padding_mask": np.zeros((1, 2), bool)}, ValueError,
     r"^tgt_key_padding_mask:"),
    (encoder, {"mask": np.zeros((3, 2), bool)}, ValueError, r"^mask: expected shape"),
    (decoder_layer, {"tgt_is_causal": 1}, TypeError, r"^tgt_is_causal: expected a bool"),
    # memory and tgt against d_model and the batch
    (decoder_layer, {"memory": np.ones((2, 3, 6))}, ValueError,
     r"^memory: expected shape \(B, L, E\) = \(2, L, 8\) .*got \(2, 3, 6\)"),
    (decoder_layer, {"memory": np.ones((3, 3, 8))}, ValueError, r"^memory: expected shape"),
    (transformer, {"tgt": np.ones((1, 2, 8))}, ValueError, r"^tgt: expected shape"),
    (decoder_layer, {"memory": MEMORY.astype(np.float32)}, TypeError, r"^memory: expected dtype"),
    # NaN inputs
    (encoder_layer, {"src": NAN_SRC}, ValueError, r"^src: contains NaN or inf"),
    (decoder_layer, {"memory": NAN_SRC}, ValueError, r"^memory: contains NaN or inf"),
    (transformer, {"tgt": np.full_like(TGT, np.inf)}, ValueError, r"^tgt: contains NaN"),
    # parameters
    (encoder_layer, {"params": without(ENCODER_LAYER, "linear2.bias")}, ValueError,
     r"^params: missing key 'linear2.bias' \(expected shape \(8,\)\)"),
    (decoder_layer, {"params": without(DECODER_LAYER, "norm3.weight")}, ValueError,
     r"^params: missing key 'norm3.weight'"),
    (transformer, {"params": without(PARAMS, "decoder.layers.0.linear1.weight")}, ValueError,
     r"^params: missing key 'decoder.layers.0.linear1.weight'"),
    (encoder_layer, {"params": {**ENCODER_LAYER, "norm3.weight": np.ones(8)}}, ValueError,
     r"^params: unexpected keys \['norm3.weight'\]"),
    (encoder, {"num_layers": 2}, ValueError, r"^params: missing key 'layers.1."),
    (encoder_layer, {"params": {**ENCODER_LAYER, "norm1.weight": np.ones(7)}}, ValueError,
     r"^params\['norm1.weight'\]: expected shape \(8,\), got \(7,\)"),
    (decoder_layer, {"params": {**DECODER_LAYER, "linear2.weight": np.ones((8, 12),
                                                                          np.float32)}},
     TypeError, r"^params\['linear2.weight'\]: expected dtype float64"),
    (encoder_layer, {"params": [1, 2]}, TypeError, r"^params: expected a dict"),
    # options and dropout masks
    (encoder_layer, {"layer_norm_eps": 0.0}, ValueError, r"^layer_norm_eps: expected a positive"),
    (encoder_layer, {"norm_first": "yes"}, TypeError, r"^norm_first: expected a bool"),
    (encoder_layer, {"dropout": 1.0}, ValueError, r"^dropout: expected a probability"),
    (encoder_layer, {"dropout": 0.1}, ValueError, r"^dropout_masks: required when dropout"),
    (encoder_layer, {"dropout_masks": {}}, ValueError, r"^dropout_masks: expected None"),
    (encoder_layer, {"dropout": 0.1, "dropout_masks": {"self_attn": np.ones((2, 2, 3, 3),
                                                                            bool)}},
     ValueError, r"^dropout_masks: expected the keys"),
    (transformer, {"num_decoder_layers": 0}, ValueError, r"^num_decoder_layers: expected a"),
], ids=["nhead-not-dividing", "nhead-zero", "activation-name", "activation-callable",
        "src-mask-shape", "src-mask-3d-rows", "memory-mask-shape", "tgt-mask-int",
        "tgt-mask-float32", "src-mask-nan", "padding-shape", "padding-float",
        "tgt-padding-batch", "encoder-mask-shape", "causal-int", "memory-width",
        "memory-batch", "tgt-batch", "memory-dtype", "nan-src", "nan-memory", "inf-tgt",
        "missing-bias", "missing-norm3", "missing-transformer-key", "unexpected-key",
        "missing-layer", "param-shape", "param-dtype", "params-not-dict", "eps-zero",
        "norm-first-str", "dropout-one", "dropout-no-masks", "masks-no-dropout",
        "dropout-mask-keys", "zero-decoder-layers"])
def test_functionals_reject_bad_input_naming_the_argument(call, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        call(**kwargs)


def test_backwards_reject_misshapen_dout_and_foreign_caches() -> None:
    _, cache = encoder_layer()
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 3, 8\), got \(2, 2, 8\)"):
        ref.transformer_encoder_layer_backward(np.ones((2, 2, 8)), cache)
    with pytest.raises(TypeError, match=r"^cache: expected the DecoderLayerCache"):
        ref.transformer_decoder_layer_backward(np.ones((2, 3, 8)), cache)
    _, cache = transformer()
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 2, 8\)"):
        ref.transformer_backward(np.ones((2, 3, 8)), cache)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: ref.TransformerEncoderLayer(8, 3), ValueError, r"^nhead: expected a divisor"),
    (lambda: ref.Transformer(10, 4), ValueError, r"^nhead: expected a divisor of d_model"),
    (lambda: ref.TransformerDecoderLayer(8, 2, activation="swish"), ValueError,
     r"^activation:"),
    (lambda: ref.TransformerEncoderLayer(8, 2, batch_first=False), ValueError,
     r"^batch_first: seqtwin is batch-first"),
    (lambda: ref.TransformerDecoderLayer(8, 2, batch_first=False), ValueError,
     r"^batch_first: seqtwin is batch-first"),
    (lambda: ref.Transformer(8, 2, 1, 1, 12, batch_first=False), ValueError,
     r"^batch_first: seqtwin is batch-first"),
    (lambda: ref.TransformerEncoderLayer(8, 2, device="cuda"), ValueError, r"^device:"),
    (lambda: ref.TransformerEncoderLayer(8, 2, dtype=np.int64), TypeError, r"^dtype:"),
    (lambda: ref.TransformerEncoder(ref.TransformerDecoderLayer(8, 2), 1), TypeError,
     r"^encoder_layer: expected a TransformerEncoderLayer"),
    (lambda: ref.TransformerDecoder(ref.TransformerDecoderLayer(8, 2), 0), ValueError,
     r"^num_layers: expected a positive int"),
    (lambda: ref.TransformerEncoder(ref.TransformerEncoderLayer(8, 2), 1, ref.LayerNorm(6)),
     ValueError, r"^norm: expected a LayerNorm\(8\)"),
    (lambda: ref.Transformer(8, 2, 1, 1, 12, custom_encoder=ref.TransformerEncoderLayer(8, 2)),
     TypeError, r"^custom_encoder: expected a TransformerEncoder"),
    (lambda: ref.LayerNorm(0), ValueError, r"^normalized_shape: expected a positive int"),
    (lambda: ref.LayerNorm((2, 3)), TypeError, r"^normalized_shape: expected an int"),
], ids=["layer-nhead", "transformer-nhead", "activation", "encoder-batch-first",
        "decoder-batch-first", "transformer-batch-first", "device", "dtype", "wrong-layer",
        "zero-layers", "norm-width", "custom-encoder", "layer-norm-zero", "layer-norm-2d"])
def test_module_constructors_reject_bad_arguments_naming_them(make, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        make()


def test_module_forwards_reject_bad_input_naming_the_argument() -> None:
    model = ref.Transformer(E, H, 1, 1, FF, dropout=0.0, seed=0)
    with pytest.raises(ValueError, match=r"^tgt: expected shape \(B, L, E\) = \(2, L, 8\)"):
        model(SRC, TGT[:1])
    with pytest.raises(TypeError, match=r"^src: expected dtype float64"):
        model(SRC.astype(np.float32), TGT)
    with pytest.raises(ValueError, match=r"^src_key_padding_mask: expected shape"):
        model(SRC, TGT, src_key_padding_mask=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match=r"^dropout_masks: unexpected keys \['layers.0"):
        model(SRC, TGT, dropout_masks={"layers.0.dropout": np.ones((2, 3, 12), bool)})
    with pytest.raises(ValueError, match=r"^x: expected shape \(\.\.\., 8\)"):
        ref.LayerNorm(8)(np.ones((2, 3)))


def test_encoder_decoder_names_are_exported() -> None:
    names = {"transformer_encoder_layer_forward", "transformer_encoder_layer_backward",
             "transformer_decoder_layer_forward", "transformer_decoder_layer_backward",
             "transformer_encoder_forward", "transformer_encoder_backward",
             "transformer_decoder_forward", "transformer_decoder_backward",
             "transformer_forward", "transformer_backward", "transformer_param_shapes",
             "transformer_dropout_mask_shapes", "TransformerEncoderLayer",
             "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
             "Transformer", "LayerNorm"}
    assert names <= set(ref.__all__)
    assert all(hasattr(ref, name) for name in names)


def test_param_and_dropout_mask_shapes_name_every_tensor_once() -> None:
    shapes = ref.transformer_param_shapes(E, H, 2, 1, FF, bias=False)
    assert not any(name.endswith("bias") for name in shapes)
    masks = ref.transformer_dropout_mask_shapes(2, 3, 4, d_model=E, nhead=H,
                                                num_encoder_layers=2, num_decoder_layers=1,
                                                dim_feedforward=FF)
    assert masks["encoder.layers.1.self_attn"] == (2, H, 3, 3)
    assert masks["decoder.layers.0.multihead_attn"] == (2, H, 4, 3)
    assert masks["decoder.layers.0.dropout"] == (2, 4, FF)
    assert len(masks) == 2 * 4 + 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn_model = torch.nn.Transformer(E, H, 2, 1, FF, bias=False, batch_first=True)
    assert shapes == {k: tuple(v.shape) for k, v in nn_model.state_dict().items()}
