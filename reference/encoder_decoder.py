"""The encoder-decoder Transformer's layers and stacks (torch.nn.Transformer, batch-first),
forward and hand-written backward.

src (B, S, E), tgt (B, T, E), memory (B, S, E); E = d_model, h = nhead, F = dim_feedforward.
For a layer input x, post-LN (norm_first=False):

    encoder:  x = LN1(x + SA(x));  x = LN2(x + FF(x))
    decoder:  x = LN1(x + SA(x));  x = LN2(x + CA(x, memory));  x = LN3(x + FF(x))

and pre-LN (norm_first=True):

    encoder:  x = x + SA(LN1(x));  x = x + FF(LN2(x))
    decoder:  x = x + SA(LN1(x));  x = x + CA(LN2(x), memory);  x = x + FF(LN3(x))

with the sublayers (MHA = multi_head_attention_forward, LN = layer_norm_forward, linear1 and
linear2 affine maps, act = relu or gelu (exact, erf)):

    SA(x)    = dropout1(MHA(x, x, x, attn_mask, key_padding_mask))
    CA(x, m) = dropout2(MHA(x, m, m, memory_mask, memory_key_padding_mask))
    FF(x)    = dropout_out(linear2(dropout(act(linear1(x)))))   dropout_out: the encoder's
                                                               dropout2, the decoder's dropout3

A stack runs its layers in order and then, when it has one, its final LN (``norm``); the
Transformer is memory = encoder(src), out = decoder(tgt, memory).

Masks (True = masked out, as torch.nn): an attention mask is bool or float additive (the
input's dtype, -inf = masked) of shape (Tq, Tk) or torch's (B·h, Tq, Tk), row b·h + head; a key
padding mask is bool (B, Tk), True = padding. ``*_is_causal=True`` masks every key j > i of
query i on top of any mask given (torch.nn reads the flag as a hint that the given mask is
causal; applying it is right either way). A query row whose keys are all masked gets attention
weights 0 (multi_head_attention_forward's rule), so its attention output is out_proj.bias and
every gradient stays finite. torch.nn agrees on its scaled_dot_product_attention path (what its
layers take in training, torch >= 2.5) and gives NaN on its explicit softmax (need_weights=True)
and its inference fast path.

Dropout is explicit: bool keep-masks per site (``transformer_dropout_mask_shapes``), the
attention sites ("self_attn", "multihead_attn") dropping attention weights inside MHA.

Backward: each residual sum passes its gradient to both terms, each LN, MHA, linear, act and
dropout runs its own backward, in the reverse order of the forward; the self-attention's input
gradient is dquery + dkey + dvalue, the cross-attention's memory gradient dkey + dvalue, and
the memory's gradient sums over the decoder layers before it enters the encoder's backward.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from .activations import (
    GeluCache,
    ReluCache,
    gelu_backward,
    gelu_forward,
    relu_backward,
    relu_forward,
)
from .attention import (
    MultiheadAttentionCache,
    multi_head_attention_backward,
    multi_head_attention_forward,
)
from .checks import (
    check_dropout_masks,
    check_float_array,
    check_positive_int,
    check_probability,
    shape_str,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .linear import LinearCache, linear_backward, linear_forward
from .module import Module
from .normalization import (
    LayerNorm,
    LayerNormCache,
    check_factory_kwargs,
    layer_norm_backward,
    layer_norm_forward,
)

ACTIVATIONS = ("relu", "gelu")
_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")

# ----------------------------------------------------------------------------- names and shapes


def _layer_param_shapes(E: int, F: int | str, bias: bool,
                        decoder: bool) -> dict[str, tuple[Any, ...]]:
    """One layer's torch.nn names and shapes, in torch's state-dict order."""
    shapes: dict[str, tuple[Any, ...]] = {}

    def add(name: str, weight: tuple[Any, ...], bias_shape: tuple[Any, ...]) -> None:
        shapes[name + ("_weight" if name.endswith("in_proj") else ".weight")] = weight
        if bias:
            shapes[name + ("_bias" if name.endswith("in_proj") else ".bias")] = bias_shape

    for attention in ("self_attn", "multihead_attn") if decoder else ("self_attn",):
        add(f"{attention}.in_proj", (3 * E, E), (3 * E,))
        add(f"{attention}.out_proj", (E, E), (E,))
    add("linear1", (F, E), (F,))
    add("linear2", (E, F), (E,))
    for norm in ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2"):
        add(norm, (E,), (E,))
    return shapes


def _stack_param_shapes(E: int, F: int | str, bias: bool, num_layers: int, decoder: bool,
                        final_norm: bool) -> dict[str, tuple[Any, ...]]:
    shapes = {f"layers.{i}.{name}": shape
              for i in range(num_layers)
              for name, shape in _layer_param_shapes(E, F, bias, decoder).items()}
    if final_norm:
        shapes["norm.weight"] = (E,)
        if bias:
            shapes["norm.bias"] = (E,)
    return shapes


def transformer_param_shapes(d_model: int, nhead: int, num_encoder_layers: int,
                             num_decoder_layers: int, dim_feedforward: int,
                             bias: bool = True) -> dict[str, tuple[int, ...]]:
    """nn.Transformer's state-dict names and shapes (both final norms included)."""
    E = check_positive_int("d_model", d_model)
    _check_nhead(nhead, E)
    F = check_positive_int("dim_feedforward", dim_feedforward)
    _check_bool("bias", bias)
    shapes = {}
    for stack, layers, decoder in (("encoder", num_encoder_layers, False),
                                   ("decoder", num_decoder_layers, True)):
        n = check_positive_int(f"num_{stack}_layers", layers)
        shapes.update({f"{stack}.{name}": shape for name, shape in
                       _stack_param_shapes(E, F, bias, n, decoder, True).items()})
    return shapes


def _encoder_layer_mask_shapes(B: int, S: int, E: int, h: int,
                               F: int) -> dict[str, tuple[int, ...]]:
    return {"self_attn": (B, h, S, S), "dropout1": (B, S, E), "dropout": (B, S, F),
            "dropout2": (B, S, E)}


def _decoder_layer_mask_shapes(B: int, T: int, S: int, E: int, h: int,
                               F: int) -> dict[str, tuple[int, ...]]:
    return {"self_attn": (B, h, T, T), "dropout1": (B, T, E), "multihead_attn": (B, h, T, S),
            "dropout2": (B, T, E), "dropout": (B, T, F), "dropout3": (B, T, E)}


def _prefixed(prefix: str, shapes: Mapping[str, Any], copies: int) -> dict[str, Any]:
    return {f"{prefix}{i}.{name}": shape for i in range(copies) for name, shape in shapes.items()}


def transformer_dropout_mask_shapes(batch: int, src_len: int, tgt_len: int, *, d_model: int,
                                    nhead: int, num_encoder_layers: int,
                                    num_decoder_layers: int,
                                    dim_feedforward: int) -> dict[str, tuple[int, ...]]:
    """Every dropout site of ``transformer_forward`` and its keep-mask shape."""
    B, S, T = (check_positive_int(name, n) for name, n in
               (("batch", batch), ("src_len", src_len), ("tgt_len", tgt_len)))
    E = check_positive_int("d_model", d_model)
    h = _check_nhead(nhead, E)
    F = check_positive_int("dim_feedforward", dim_feedforward)
    n_enc = check_positive_int("num_encoder_layers", num_encoder_layers)
    n_dec = check_positive_int("num_decoder_layers", num_decoder_layers)
    return {**_prefixed("encoder.layers.", _encoder_layer_mask_shapes(B, S, E, h, F), n_enc),
            **_prefixed("decoder.layers.", _decoder_layer_mask_shapes(B, T, S, E, h, F), n_dec)}


# ----------------------------------------------------------------------------- validation

class _Options(NamedTuple):
    """The validated settings every layer of a call shares."""
    nhead: int
    activation: str
    eps: float
    norm_first: bool
    dropout: float


class _AttentionArgs(NamedTuple):
    """The validated masks of one attention, the causal mask merged into attn_mask."""
    attn_mask: np.ndarray | None         # bool or float, (Tq, Tk) or (B, h, Tq, Tk)
    key_padding_mask: np.ndarray | None  # bool (B, Tk)


def _check_bool(name: str, flag: object) -> bool:
    if not isinstance(flag, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    return bool(flag)


def _check_nhead(nhead: object, d_model: int) -> int:
    heads = check_positive_int("nhead", nhead)
    if d_model % heads:
        raise ValueError(f"nhead: expected a divisor of d_model E = {d_model}, got {heads}")
    return heads


def _check_options(d_model: int, nhead: object, activation: object, layer_norm_eps: object,
                   norm_first: object, dropout: object) -> _Options:
    heads = _check_nhead(nhead, d_model)
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected 'relu' or 'gelu' (a string), "
                        f"got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected 'relu' or 'gelu', got {activation!r}")
    eps = layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"layer_norm_eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"layer_norm_eps: expected a positive finite float, got {eps}")
    return _Options(heads, activation, float(eps), _check_bool("norm_first", norm_first),
                    check_probability("dropout", dropout))


def _check_nonempty(name: str, x: np.ndarray, length: str) -> None:
    """B and the sequence length >= 1, as torch_impl's layers require."""
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (B, {length}, E) (batch-first, B and "
                         f"{length} >= 1), got {shape_str(x.shape)}")


def _check_input(name: str, x: object, batch: int, width: int, dtype: np.dtype,
                 like: str) -> np.ndarray:
    """x (B, L, E) with the batch, width and dtype of the input ``like``."""
    check_float_array(name, x, dtype=dtype)
    if x.ndim != 3 or x.shape[0] != batch or x.shape[2] != width:
        raise ValueError(f"{name}: expected shape (B, L, E) = ({batch}, L, {width}) (the batch "
                         f"and width d_model of {like}), got {shape_str(x.shape)}")
    return x


def _check_attention_args(names: tuple[str, str, str], attn_mask: object,
                          key_padding_mask: object, is_causal: object, batch: int, heads: int,
                          tq: int, tk: int, dtype: np.dtype) -> _AttentionArgs:
    """Validate (attn_mask, key_padding_mask, is_causal), named ``names``; merge causal in."""
    mask_name, padding_name, causal_name = names
    mask = attn_mask
    if mask is not None:
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"{mask_name}: expected a numpy.ndarray (bool, True = masked out, "
                            f"or float additive), got {type(mask).__name__}")
        if mask.dtype != np.bool_ and mask.dtype != dtype:
            raise TypeError(f"{mask_name}: expected dtype bool or {np.dtype(dtype)} (the dtype "
                            f"of the input), got {mask.dtype}")
        if mask.shape == (batch * heads, tq, tk):
            mask = mask.reshape(batch, heads, tq, tk)  # torch's row b·h + head
        elif mask.shape != (tq, tk):
            raise ValueError(f"{mask_name}: expected shape ({tq}, {tk}) or (B·nhead, {tq}, "
                             f"{tk}) = ({batch * heads}, {tq}, {tk}), got {shape_str(mask.shape)}")
        if mask.dtype != np.bool_ and np.any(np.isnan(mask) | (mask == np.inf)):
            raise ValueError(f"{mask_name}: contains NaN or +inf (a float mask is added to the "
                             f"scores; -inf marks a masked key)")
    padding = key_padding_mask
    if padding is not None:
        if not isinstance(padding, np.ndarray) or padding.dtype != np.bool_:
            got = getattr(padding, "dtype", type(padding).__name__)
            raise TypeError(f"{padding_name}: expected a bool numpy.ndarray (True = padding), "
                            f"got {got}")
        if padding.shape != (batch, tk):
            raise ValueError(f"{padding_name}: expected shape (B, {tk}) = ({batch}, {tk}), "
                             f"got {shape_str(padding.shape)}")
    if _check_bool(causal_name, is_causal):
        future = np.triu(np.ones((tq, tk), dtype=bool), k=1)  # key j > query i
        if mask is None:
            mask = future
        elif mask.dtype == np.bool_:
            mask = mask | future
        else:
            mask = np.where(future, -np.inf, mask).astype(dtype)
    return _AttentionArgs(mask, padding)


def _check_keep_masks(masks: object, p: float,
                      shapes: Mapping[str, tuple[int, ...]]) -> Mapping[str, np.ndarray] | None:
    if p == 0:
        if masks is not None:
            raise ValueError("dropout_masks: expected None when dropout == 0, got masks")
        return None
    if masks is None:
        raise ValueError(f"dropout_masks: required when dropout = {p} > 0 (randomness is "
                         f"explicit: a bool keep-mask per site of "
                         f"transformer_dropout_mask_shapes), got None")
    return check_dropout_masks(masks, p, shapes, "transformer_dropout_mask_shapes")


def _infer_sizes(params: Mapping[str, Any], prefix: str) -> tuple[int | str, bool]:
    """(F, bias) of the layers under ``prefix``: F from linear1.weight ("F" if it is missing,
    to be reported as missing), bias if any bias is present (bias=False drops all)."""
    w1 = params.get(f"{prefix}linear1.weight")
    F = w1.shape[0] if isinstance(w1, np.ndarray) and w1.ndim == 2 else "F"
    return F, any(name.startswith(prefix) and name.endswith("bias") for name in params)


def _check_params(params: object, expected: Mapping[str, tuple[Any, ...]],
                  dtype: np.dtype) -> None:
    """Exactly the keys of ``expected``, each float of ``dtype`` with its shape."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    missing = [name for name in expected if name not in params]
    if missing:
        raise ValueError(f"params: missing key {missing[0]!r} (expected shape "
                         f"{shape_str(expected[missing[0]])}); {len(missing)} missing in all "
                         f"(bias=False drops every bias, none may be present)")
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected}")
    for name, shape in expected.items():
        check_float_array(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)


def _sub(tree: Mapping[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    """The entries under ``prefix``, the prefix removed (None stays None)."""
    if tree is None:
        return None
    return {name[len(prefix):]: v for name, v in tree.items() if name.startswith(prefix)}


# ----------------------------------------------------------------------------- caches

class AttentionBlockCache(NamedTuple):
    mha: MultiheadAttentionCache       # MHA(x, m, m)
    dropout: DropoutCache | None       # dropout1 (SA) / dropout2 (CA)


class FeedForwardCache(NamedTuple):
    linear1: LinearCache               # linear1(x)
    act: ReluCache | GeluCache         # act(.)
    dropout: DropoutCache | None       # dropout(.)
    linear2: LinearCache               # linear2(.)
    dropout_out: DropoutCache | None   # dropout2 (encoder) / dropout3 (decoder)
    activation: str


class EncoderLayerCache(NamedTuple):
    norm_first: bool
    self_attn: AttentionBlockCache     # SA
    norm1: LayerNormCache              # LN1
    ff: FeedForwardCache               # FF
    norm2: LayerNormCache              # LN2


class DecoderLayerCache(NamedTuple):
    norm_first: bool
    self_attn: AttentionBlockCache     # SA
    norm1: LayerNormCache              # LN1
    multihead_attn: AttentionBlockCache  # CA
    norm2: LayerNormCache              # LN2
    ff: FeedForwardCache               # FF
    norm3: LayerNormCache              # LN3


class EncoderCache(NamedTuple):
    layers: tuple[EncoderLayerCache, ...]
    norm: LayerNormCache | None        # the final norm, None without one


class DecoderCache(NamedTuple):
    layers: tuple[DecoderLayerCache, ...]
    norm: LayerNormCache | None


class TransformerCache(NamedTuple):
    encoder: EncoderCache
    decoder: DecoderCache
    memory: np.ndarray                 # encoder(src) (B, S, E), read by the decoder


# ----------------------------------------------------------------------------- sublayers

def _dropout(x: np.ndarray, p: float, keep: Mapping[str, np.ndarray] | None,
             site: str) -> tuple[np.ndarray, DropoutCache | None]:
    if keep is None:
        return x, None
    return dropout_forward(x, p, keep[site])


def _dropout_back(dy: np.ndarray, cache: DropoutCache | None) -> np.ndarray:
    return dy if cache is None else dropout_backward(dy, cache)


def _norm_forward(x: np.ndarray, params: Mapping[str, np.ndarray], name: str,
                  eps: float) -> tuple[np.ndarray, LayerNormCache]:
    return layer_norm_forward(x, params[f"{name}.weight"], params.get(f"{name}.bias"), eps)


def _norm_backward(dy: np.ndarray, cache: LayerNormCache, name: str,
                   dparams: dict[str, np.ndarray]) -> np.ndarray:
    dx, dparams[f"{name}.weight"], dbias = layer_norm_backward(dy, cache)
    if dbias is not None:
        dparams[f"{name}.bias"] = dbias
    return dx


def _attention_forward(x: np.ndarray, memory: np.ndarray, params: Mapping[str, np.ndarray],
                       name: str, args: _AttentionArgs, opts: _Options,
                       keep: Mapping[str, np.ndarray] | None,
                       site: str) -> tuple[np.ndarray, AttentionBlockCache]:
    """dropout_site(MHA(x, memory, memory)) with the attention ``name``'s parameters."""
    mha_params = {k: params[f"{name}.{k}"] for k in _MHA_KEYS if f"{name}.{k}" in params}
    (a, _), mha = multi_head_attention_forward(
        x, memory, memory, mha_params, opts.nhead, key_padding_mask=args.key_padding_mask,
        attn_mask=args.attn_mask, dropout=opts.dropout,
        dropout_mask=None if keep is None else keep[name])
    a, drop = _dropout(a, opts.dropout, keep, site)
    return a, AttentionBlockCache(mha, drop)


def _attention_backward(da: np.ndarray, cache: AttentionBlockCache, name: str,
                        dparams: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dmemory): the query's gradient, and the key's plus the value's."""
    da = _dropout_back(da, cache.dropout)
    dquery, dkey, dvalue, dmha = multi_head_attention_backward(da, cache.mha)
    dparams.update({f"{name}.{k}": g for k, g in dmha.items()})
    return dquery, dkey + dvalue


def _feed_forward_forward(x: np.ndarray, params: Mapping[str, np.ndarray], opts: _Options,
                          keep: Mapping[str, np.ndarray] | None,
                          site: str) -> tuple[np.ndarray, FeedForwardCache]:
    """dropout_site(linear2(dropout(act(linear1(x)))))."""
    h, linear1 = linear_forward(x, params["linear1.weight"], params.get("linear1.bias"))
    h, act = relu_forward(h) if opts.activation == "relu" else gelu_forward(h)
    h, drop = _dropout(h, opts.dropout, keep, "dropout")
    y, linear2 = linear_forward(h, params["linear2.weight"], params.get("linear2.bias"))
    y, drop_out = _dropout(y, opts.dropout, keep, site)
    return y, FeedForwardCache(linear1, act, drop, linear2, drop_out, opts.activation)


def _feed_forward_backward(dy: np.ndarray, cache: FeedForwardCache,
                           dparams: dict[str, np.ndarray]) -> np.ndarray:
    dy = _dropout_back(dy, cache.dropout_out)
    dh, dparams["linear2.weight"], db2 = linear_backward(dy, cache.linear2)
    dh = _dropout_back(dh, cache.dropout)
    if cache.activation == "relu":
        dh = relu_backward(dh, cache.act)
    else:
        dh = gelu_backward(dh, cache.act)
    dx, dparams["linear1.weight"], db1 = linear_backward(dh, cache.linear1)
    if db1 is not None:
        dparams["linear1.bias"], dparams["linear2.bias"] = db1, db2
    return dx


# ----------------------------------------------------------------------------- layers

def _encoder_layer_forward(x: np.ndarray, params: Mapping[str, np.ndarray],
                           self_args: _AttentionArgs, opts: _Options,
                           keep: Mapping[str, np.ndarray] | None
                           ) -> tuple[np.ndarray, EncoderLayerCache]:
    eps = opts.eps
    if opts.norm_first:
        h, norm1 = _norm_forward(x, params, "norm1", eps)
        a, sa = _attention_forward(h, h, params, "self_attn", self_args, opts, keep, "dropout1")
        x = x + a                                                  # x + SA(LN1(x))
        h, norm2 = _norm_forward(x, params, "norm2", eps)
        f, ff = _feed_forward_forward(h, params, opts, keep, "dropout2")
        x = x + f                                                  # x + FF(LN2(x))
    else:
        a, sa = _attention_forward(x, x, params, "self_attn", self_args, opts, keep, "dropout1")
        x, norm1 = _norm_forward(x + a, params, "norm1", eps)       # LN1(x + SA(x))
        f, ff = _feed_forward_forward(x, params, opts, keep, "dropout2")
        x, norm2 = _norm_forward(x + f, params, "norm2", eps)       # LN2(x + FF(x))
    return x, EncoderLayerCache(opts.norm_first, sa, norm1, ff, norm2)


def _encoder_layer_backward(dout: np.ndarray, cache: EncoderLayerCache
                            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    dparams: dict[str, np.ndarray] = {}
    if cache.norm_first:
        dh = _feed_forward_backward(dout, cache.ff, dparams)       # x2 = x1 + FF(LN2(x1))
        dx = dout + _norm_backward(dh, cache.norm2, "norm2", dparams)
        dq, dkv = _attention_backward(dx, cache.self_attn, "self_attn", dparams)
        dx = dx + _norm_backward(dq + dkv, cache.norm1, "norm1", dparams)  # x1 = x + SA(LN1(x))
    else:
        ds = _norm_backward(dout, cache.norm2, "norm2", dparams)    # x2 = LN2(x1 + FF(x1))
        dx = ds + _feed_forward_backward(ds, cache.ff, dparams)
        ds = _norm_backward(dx, cache.norm1, "norm1", dparams)      # x1 = LN1(x + SA(x))
        dq, dkv = _attention_backward(ds, cache.self_attn, "self_attn", dparams)
        dx = ds + dq + dkv
    return dx, dparams


def _decoder_layer_forward(x: np.ndarray, memory: np.ndarray, params: Mapping[str, np.ndarray],
                           self_args: _AttentionArgs, cross_args: _AttentionArgs,
                           opts: _Options, keep: Mapping[str, np.ndarray] | None
                           ) -> tuple[np.ndarray, DecoderLayerCache]:
    eps = opts.eps
    if opts.norm_first:
        h, norm1 = _norm_forward(x, params, "norm1", eps)
        a, sa = _attention_forward(h, h, params, "self_attn", self_args, opts, keep, "dropout1")
        x = x + a                                                  # x + SA(LN1(x))
        h, norm2 = _norm_forward(x, params, "norm2", eps)
        c, ca = _attention_forward(h, memory, params, "multihead_attn", cross_args, opts, keep,
                                   "dropout2")
        x = x + c                                                  # x + CA(LN2(x), memory)
        h, norm3 = _norm_forward(x, params, "norm3", eps)
        f, ff = _feed_forward_forward(h, params, opts, keep, "dropout3")
        x = x + f                                                  # x + FF(LN3(x))
    else:
        a, sa = _attention_forward(x, x, params, "self_attn", self_args, opts, keep, "dropout1")
        x, norm1 = _norm_forward(x + a, params, "norm1", eps)       # LN1(x + SA(x))
        c, ca = _attention_forward(x, memory, params, "multihead_attn", cross_args, opts, keep,
                                   "dropout2")
        x, norm2 = _norm_forward(x + c, params, "norm2", eps)       # LN2(x + CA(x, memory))
        f, ff = _feed_forward_forward(x, params, opts, keep, "dropout3")
        x, norm3 = _norm_forward(x + f, params, "norm3", eps)       # LN3(x + FF(x))
    return x, DecoderLayerCache(opts.norm_first, sa, norm1, ca, norm2, ff, norm3)


def _decoder_layer_backward(dout: np.ndarray, cache: DecoderLayerCache
                            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    dparams: dict[str, np.ndarray] = {}
    if cache.norm_first:
        dh = _feed_forward_backward(dout, cache.ff, dparams)       # x3 = x2 + FF(LN3(x2))
        dx = dout + _norm_backward(dh, cache.norm3, "norm3", dparams)
        dh, dmemory = _attention_backward(dx, cache.multihead_attn, "multihead_attn", dparams)
        dx = dx + _norm_backward(dh, cache.norm2, "norm2", dparams)  # x2 = x1 + CA(LN2(x1), m)
        dq, dkv = _attention_backward(dx, cache.self_attn, "self_attn", dparams)
        dx = dx + _norm_backward(dq + dkv, cache.norm1, "norm1", dparams)  # x1 = x + SA(LN1(x))
    else:
        ds = _norm_backward(dout, cache.norm3, "norm3", dparams)    # x3 = LN3(x2 + FF(x2))
        dx = ds + _feed_forward_backward(ds, cache.ff, dparams)
        ds = _norm_backward(dx, cache.norm2, "norm2", dparams)      # x2 = LN2(x1 + CA(x1, m))
        dh, dmemory = _attention_backward(ds, cache.multihead_attn, "multihead_attn", dparams)
        dx = ds + dh
        ds = _norm_backward(dx, cache.norm1, "norm1", dparams)      # x1 = LN1(x + SA(x))
        dq, dkv = _attention_backward(ds, cache.self_attn, "self_attn", dparams)
        dx = ds + dq + dkv
    return dx, dmemory, dparams


def _check_dout(dout: object, shape: tuple[int, ...], dtype: np.dtype) -> None:
    check_float_array("dout", dout, shape=shape, dtype=dtype, finite=False)


def _check_cache(cache: object, kind: type, forward: str) -> None:
    if not isinstance(cache, kind):
        raise TypeError(f"cache: expected the {kind.__name__} of {forward}, "
                        f"got {type(cache).__name__}")


def transformer_encoder_layer_forward(
        src: np.ndarray, params: Mapping[str, np.ndarray], *, nhead: int,
        src_mask: np.ndarray | None = None, src_key_padding_mask: np.ndarray | None = None,
        is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, np.ndarray] | None = None
        ) -> tuple[np.ndarray, EncoderLayerCache]:
    """torch.nn.TransformerEncoderLayer over src (B, S, E) -> (out (B, S, E), cache).

    params: the layer's torch.nn names (self_attn.*, linear1.*, linear2.*, norm1.*, norm2.*),
    every bias or none. src_mask (S, S) or (B·nhead, S, S), bool or float; src_key_padding_mask
    bool (B, S). dropout_masks: bool keep-masks "self_attn" (B, h, S, S), "dropout1" (B, S, E),
    "dropout" (B, S, F), "dropout2" (B, S, E), required iff dropout > 0.
    """
    check_float_array("src", src, shape=("B", "S", "E"))
    _check_nonempty("src", src, "S")
    B, S, E = src.shape
    opts = _check_options(E, nhead, activation, layer_norm_eps, norm_first, dropout)
    F, bias = _infer_sizes(params, "") if isinstance(params, Mapping) else ("F", True)
    _check_params(params, _layer_param_shapes(E, F, bias, decoder=False), src.dtype)
    args = _check_attention_args(("src_mask", "src_key_padding_mask", "is_causal"), src_mask,
                                 src_key_padding_mask, is_causal, B, opts.nhead, S, S, src.dtype)
    keep = _check_keep_masks(dropout_masks, opts.dropout,
                             _encoder_layer_mask_shapes(B, S, E, opts.nhead, F))
    return _encoder_layer_forward(src, params, args, opts, keep)


def transformer_encoder_layer_backward(dout: np.ndarray, cache: EncoderLayerCache
                                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(dsrc (B, S, E), dparams keyed like params) for dout (B, S, E)."""
    _check_cache(cache, EncoderLayerCache, "transformer_encoder_layer_forward")
    _check_dout(dout, cache.norm2.x_hat.shape, cache.norm2.x_hat.dtype)
    return _encoder_layer_backward(dout, cache)


def transformer_decoder_layer_forward(
        tgt: np.ndarray, memory: np.ndarray, params: Mapping[str, np.ndarray], *, nhead: int,
        tgt_mask: np.ndarray | None = None, memory_mask: np.ndarray | None = None,
        tgt_key_padding_mask: np.ndarray | None = None,
        memory_key_padding_mask: np.ndarray | None = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, np.ndarray] | None = None
        ) -> tuple[np.ndarray, DecoderLayerCache]:
    """torch.nn.TransformerDecoderLayer over tgt (B, T, E), memory (B, S, E) -> (out (B, T, E),
    cache).

    params: the encoder layer's names plus multihead_attn.* and norm3.*. tgt_mask (T, T),
    memory_mask (T, S) (or torch's (B·nhead, ., .)), bool or float; key padding masks bool
    (B, T) and (B, S). dropout_masks: "self_attn" (B, h, T, T), "dropout1", "multihead_attn"
    (B, h, T, S), "dropout2", "dropout" (B, T, F), "dropout3", required iff dropout > 0.
    """
    check_float_array("tgt", tgt, shape=("B", "T", "E"))
    _check_nonempty("tgt", tgt, "T")
    B, T, E = tgt.shape
    _check_input("memory", memory, B, E, tgt.dtype, "tgt")
    S = memory.shape[1]
    opts = _check_options(E, nhead, activation, layer_norm_eps, norm_first, dropout)
    F, bias = _infer_sizes(params, "") if isinstance(params, Mapping) else ("F", True)
    _check_params(params, _layer_param_shapes(E, F, bias, decoder=True), tgt.dtype)
    self_args, cross_args = _decoder_attention_args(
        tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
        memory_is_causal, B, opts.nhead, T, S, tgt.dtype)
    keep = _check_keep_masks(dropout_masks, opts.dropout,
                             _decoder_layer_mask_shapes(B, T, S, E, opts.nhead, F))
    return _decoder_layer_forward(tgt, memory, params, self_args, cross_args, opts, keep)


def _decoder_attention_args(tgt_mask: object, memory_mask: object, tgt_key_padding_mask: object,
                            memory_key_padding_mask: object, tgt_is_causal: object,
                            memory_is_causal: object, B: int, h: int, T: int, S: int,
                            dtype: np.dtype) -> tuple[_AttentionArgs, _AttentionArgs]:
    self_args = _check_attention_args(("tgt_mask", "tgt_key_padding_mask", "tgt_is_causal"),
                                      tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                      B, h, T, T, dtype)
    cross_args = _check_attention_args(
        ("memory_mask", "memory_key_padding_mask", "memory_is_causal"), memory_mask,
        memory_key_padding_mask, memory_is_causal, B, h, T, S, dtype)
    return self_args, cross_args


def transformer_decoder_layer_backward(dout: np.ndarray, cache: DecoderLayerCache
                                       ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dtgt (B, T, E), dmemory (B, S, E), dparams keyed like params) for dout (B, T, E)."""
    _check_cache(cache, DecoderLayerCache, "transformer_decoder_layer_forward")
    _check_dout(dout, cache.norm3.x_hat.shape, cache.norm3.x_hat.dtype)
    return _decoder_layer_backward(dout, cache)


# ----------------------------------------------------------------------------- stacks

def _encoder_forward(x: np.ndarray, params: Mapping[str, np.ndarray], num_layers: int,
                     args: _AttentionArgs, opts: _Options,
                     keep: Mapping[str, np.ndarray] | None) -> tuple[np.ndarray, EncoderCache]:
    layers = []
    for i in range(num_layers):
        x, layer = _encoder_layer_forward(x, _sub(params, f"layers.{i}."), args, opts,
                                          _sub(keep, f"layers.{i}."))
        layers.append(layer)
    norm = None
    if "norm.weight" in params:
        x, norm = _norm_forward(x, params, "norm", opts.eps)
    return x, EncoderCache(tuple(layers), norm)


def _encoder_backward(dout: np.ndarray, cache: EncoderCache
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    dparams: dict[str, np.ndarray] = {}
    dx = dout
    if cache.norm is not None:
        dx = _norm_backward(dx, cache.norm, "norm", dparams)
    for i in reversed(range(len(cache.layers))):
        dx, dlayer = _encoder_layer_backward(dx, cache.layers[i])
        dparams.update({f"layers.{i}.{name}": g for name, g in dlayer.items()})
    return dx, dparams


def _decoder_forward(x: np.ndarray, memory: np.ndarray, params: Mapping[str, np.ndarray],
                     num_layers: int, self_args: _AttentionArgs, cross_args: _AttentionArgs,
                     opts: _Options, keep: Mapping[str, np.ndarray] | None
                     ) -> tuple[np.ndarray, DecoderCache]:
    layers = []
    for i in range(num_layers):
        x, layer = _decoder_layer_forward(x, memory, _sub(params, f"layers.{i}."), self_args,
                                          cross_args, opts, _sub(keep, f"layers.{i}."))
        layers.append(layer)
    norm = None
    if "norm.weight" in params:
        x, norm = _norm_forward(x, params, "norm", opts.eps)
    return x, DecoderCache(tuple(layers), norm)


def _decoder_backward(dout: np.ndarray, cache: DecoderCache
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    dparams: dict[str, np.ndarray] = {}
    dx = dout
    if cache.norm is not None:
        dx = _norm_backward(dx, cache.norm, "norm", dparams)
    dmemory = None
    for i in reversed(range(len(cache.layers))):
        dx, dm, dlayer = _decoder_layer_backward(dx, cache.layers[i])
        dmemory = dm if dmemory is None else dmemory + dm  # every layer reads the memory
        dparams.update({f"layers.{i}.{name}": g for name, g in dlayer.items()})
    return dx, dmemory, dparams


def _stack_params(params: object, prefix: str, num_layers: int, E: int, decoder: bool
                  ) -> tuple[dict[str, tuple[Any, ...]], int | str]:
    """The expected names and shapes of a stack under ``prefix`` and its F, read from
    ``params`` (final norm iff '<prefix>norm.weight' is there)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    F, bias = _infer_sizes(params, f"{prefix}layers.0.")
    final_norm = f"{prefix}norm.weight" in params
    shapes = _stack_param_shapes(E, F, bias, num_layers, decoder, final_norm)
    return {prefix + name: shape for name, shape in shapes.items()}, F


def _stack_out_shape(cache: EncoderCache | DecoderCache) -> tuple[tuple[int, ...], np.dtype]:
    last = cache.layers[-1]
    x_hat = (last.norm2 if isinstance(last, EncoderLayerCache) else last.norm3).x_hat
    return x_hat.shape, x_hat.dtype


def transformer_encoder_forward(
        src: np.ndarray, params: Mapping[str, np.ndarray], *, num_layers: int, nhead: int,
        mask: np.ndarray | None = None, src_key_padding_mask: np.ndarray | None = None,
        is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, np.ndarray] | None = None
        ) -> tuple[np.ndarray, EncoderCache]:
    """torch.nn.TransformerEncoder over src (B, S, E) -> (out (B, S, E), cache).

    params: "layers.{i}.<encoder layer name>" for i < num_layers, and "norm.weight"
    ("norm.bias") when the stack ends in a norm. Masks as the encoder layer's (``mask`` is its
    src_mask); dropout_masks: the layer sites under "layers.{i}.".
    """
    check_float_array("src", src, shape=("B", "S", "E"))
    _check_nonempty("src", src, "S")
    B, S, E = src.shape
    n = check_positive_int("num_layers", num_layers)
    opts = _check_options(E, nhead, activation, layer_norm_eps, norm_first, dropout)
    shapes, F = _stack_params(params, "", n, E, decoder=False)
    _check_params(params, shapes, src.dtype)
    args = _check_attention_args(("mask", "src_key_padding_mask", "is_causal"), mask,
                                 src_key_padding_mask, is_causal, B, opts.nhead, S, S, src.dtype)
    keep = _check_keep_masks(dropout_masks, opts.dropout, _prefixed(
        "layers.", _encoder_layer_mask_shapes(B, S, E, opts.nhead, F), n))
    return _encoder_forward(src, params, n, args, opts, keep)


def transformer_encoder_backward(dout: np.ndarray, cache: EncoderCache
                                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(dsrc (B, S, E), dparams keyed like params) for dout (B, S, E)."""
    _check_cache(cache, EncoderCache, "transformer_encoder_forward")
    _check_dout(dout, *_stack_out_shape(cache))
    return _encoder_backward(dout, cache)


def transformer_decoder_forward(
        tgt: np.ndarray, memory: np.ndarray, params: Mapping[str, np.ndarray], *,
        num_layers: int, nhead: int, tgt_mask: np.ndarray | None = None,
        memory_mask: np.ndarray | None = None, tgt_key_padding_mask: np.ndarray | None = None,
        memory_key_padding_mask: np.ndarray | None = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, np.ndarray] | None = None
        ) -> tuple[np.ndarray, DecoderCache]:
    """torch.nn.TransformerDecoder over tgt (B, T, E), memory (B, S, E) -> (out (B, T, E),
    cache); params "layers.{i}.<decoder layer name>" and optionally "norm.*"."""
    check_float_array("tgt", tgt, shape=("B", "T", "E"))
    _check_nonempty("tgt", tgt, "T")
    B, T, E = tgt.shape
    _check_input("memory", memory, B, E, tgt.dtype, "tgt")
    S = memory.shape[1]
    n = check_positive_int("num_layers", num_layers)
    opts = _check_options(E, nhead, activation, layer_norm_eps, norm_first, dropout)
    shapes, F = _stack_params(params, "", n, E, decoder=True)
    _check_params(params, shapes, tgt.dtype)
    self_args, cross_args = _decoder_attention_args(
        tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
        memory_is_causal, B, opts.nhead, T, S, tgt.dtype)
    keep = _check_keep_masks(dropout_masks, opts.dropout, _prefixed(
        "layers.", _decoder_layer_mask_shapes(B, T, S, E, opts.nhead, F), n))
    return _decoder_forward(tgt, memory, params, n, self_args, cross_args, opts, keep)


def transformer_decoder_backward(dout: np.ndarray, cache: DecoderCache
                                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dtgt (B, T, E), dmemory (B, S, E), dparams keyed like params) for dout (B, T, E)."""
    _check_cache(cache, DecoderCache, "transformer_decoder_forward")
    _check_dout(dout, *_stack_out_shape(cache))
    return _decoder_backward(dout, cache)


# ----------------------------------------------------------------------------- Transformer

def transformer_forward(
        src: np.ndarray, tgt: np.ndarray, params: Mapping[str, np.ndarray], *, nhead: int,
        num_encoder_layers: int, num_decoder_layers: int, src_mask: np.ndarray | None = None,
        tgt_mask: np.ndarray | None = None, memory_mask: np.ndarray | None = None,
        src_key_padding_mask: np.ndarray | None = None,
        tgt_key_padding_mask: np.ndarray | None = None,
        memory_key_padding_mask: np.ndarray | None = None, src_is_causal: bool = False,
        tgt_is_causal: bool = False, memory_is_causal: bool = False, activation: str = "relu",
        layer_norm_eps: float = 1e-5, norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, np.ndarray] | None = None
        ) -> tuple[np.ndarray, TransformerCache]:
    """torch.nn.Transformer(batch_first=True) over src (B, S, E), tgt (B, T, E) ->
    (out (B, T, E), cache): memory = encoder(src), out = decoder(tgt, memory).

    params: ``transformer_param_shapes`` names ("encoder.norm.*" / "decoder.norm.*" may be
    left out for a stack without a final norm). Masks as the layers'; memory_mask (T, S) and
    memory_key_padding_mask (B, S) for the cross-attention. dropout_masks:
    ``transformer_dropout_mask_shapes``, required iff dropout > 0.
    """
    check_float_array("src", src, shape=("B", "S", "E"))
    _check_nonempty("src", src, "S")
    B, S, E = src.shape
    _check_input("tgt", tgt, B, E, src.dtype, "src")
    T = tgt.shape[1]
    n_enc = check_positive_int("num_encoder_layers", num_encoder_layers)
    n_dec = check_positive_int("num_decoder_layers", num_decoder_layers)
    opts = _check_options(E, nhead, activation, layer_norm_eps, norm_first, dropout)
    enc_shapes, F_enc = _stack_params(params, "encoder.", n_enc, E, decoder=False)
    dec_shapes, F_dec = _stack_params(params, "decoder.", n_dec, E, decoder=True)
    _check_params(params, {**enc_shapes, **dec_shapes}, src.dtype)
    h = opts.nhead
    src_args = _check_attention_args(("src_mask", "src_key_padding_mask", "src_is_causal"),
                                     src_mask, src_key_padding_mask, src_is_causal,
                                     B, h, S, S, src.dtype)
    tgt_args, memory_args = _decoder_attention_args(
        tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
        memory_is_causal, B, h, T, S, src.dtype)
    keep = _check_keep_masks(dropout_masks, opts.dropout, {
        **_prefixed("encoder.layers.", _encoder_layer_mask_shapes(B, S, E, h, F_enc), n_enc),
        **_prefixed("decoder.layers.", _decoder_layer_mask_shapes(B, T, S, E, h, F_dec), n_dec)})
    memory, encoder = _encoder_forward(src, _sub(params, "encoder."), n_enc, src_args, opts,
                                       _sub(keep, "encoder."))
    out, decoder = _decoder_forward(tgt, memory, _sub(params, "decoder."), n_dec, tgt_args,
                                    memory_args, opts, _sub(keep, "decoder."))
    return out, TransformerCache(encoder, decoder, memory)


def transformer_backward(dout: np.ndarray, cache: TransformerCache,
                         dmemory: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dsrc (B, S, E), dtgt (B, T, E), dparams keyed like params) for dout (B, T, E) and,
    when something else read the memory (``cache.memory``), its gradient dmemory (B, S, E)."""
    _check_cache(cache, TransformerCache, "transformer_forward")
    _check_dout(dout, *_stack_out_shape(cache.decoder))
    if dmemory is not None:
        dmemory = check_float_array("dmemory", dmemory, cache.memory.shape,
                                    dtype=cache.memory.dtype, finite=False)
    dtgt, dmem, ddecoder = _decoder_backward(dout, cache.decoder)
    dmemory = dmem if dmemory is None else dmem + dmemory
    dsrc, dencoder = _encoder_backward(dmemory, cache.encoder)
    dparams = {f"encoder.{name}": g for name, g in dencoder.items()}
    dparams.update({f"decoder.{name}": g for name, g in ddecoder.items()})
    return dsrc, dtgt, dparams


# ----------------------------------------------------------------------------- modules

def _check_batch_first(batch_first: object) -> None:
    if batch_first is not True:
        raise ValueError(f"batch_first: seqtwin is batch-first ((B, T, E) inputs); only "
                         f"batch_first=True is supported, got {batch_first!r}")


def _draw_masks(rng: np.random.Generator, shapes: Mapping[str, tuple[int, ...]],
                p: float) -> dict[str, np.ndarray]:
    """Bool keep-masks, each entry True with probability 1 - p."""
    return {site: rng.random(shape) >= p for site, shape in shapes.items()}


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray:
    return rng.uniform(-bound, bound, shape).astype(dtype)


class _Layer(Module):
    """What the two layer classes share: torch.nn's constructor arguments and init."""

    decoder = False

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, *,
                 device: Any = None, dtype: Any = None, seed: int | None = None) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.dim_feedforward = check_positive_int("dim_feedforward", dim_feedforward)
        opts = _check_options(self.d_model, nhead, activation, layer_norm_eps, norm_first,
                              dropout)
        self.nhead, self.activation, self.layer_norm_eps = opts.nhead, opts.activation, opts.eps
        self.norm_first, self.dropout = opts.norm_first, opts.dropout
        _check_batch_first(batch_first)
        self.bias = _check_bool("bias", bias)
        self.dtype = check_factory_kwargs(device, dtype)
        self.rng = np.random.default_rng(seed)
        self.params = self._init_params()
        self.zero_grad()
        self._cache: Any = None

    def _init_params(self) -> dict[str, np.ndarray]:
        """torch.nn's init: in_proj_weight Xavier-uniform, out_proj.weight and the linears'
        weights and biases U(±1/√fan_in), the attention biases 0, norms weight 1 bias 0."""
        E, F, dtype, rng = self.d_model, self.dim_feedforward, self.dtype, self.rng
        params = {}
        for name, shape in _layer_param_shapes(E, F, self.bias, self.decoder).items():
            if name.endswith("in_proj_weight"):
                params[name] = _uniform(rng, math.sqrt(6.0 / (E + 3 * E)), shape, dtype)
            elif name.startswith("linear") or name.endswith("out_proj.weight"):
                fan_in = F if name.startswith("linear2") else E
                params[name] = _uniform(rng, 1.0 / math.sqrt(fan_in), shape, dtype)
            elif name.startswith("norm") and name.endswith(".weight"):
                params[name] = np.ones(shape, dtype)
            else:
                params[name] = np.zeros(shape, dtype)
        return params

    def _options(self) -> dict[str, Any]:
        """The keyword arguments of the functional forward this layer fixes."""
        return {"nhead": self.nhead, "activation": self.activation,
                "layer_norm_eps": self.layer_norm_eps, "norm_first": self.norm_first}

    def _dropout_args(self, masks: Mapping[str, np.ndarray] | None,
                      shapes: Any) -> tuple[float, Mapping[str, np.ndarray] | None]:
        """(rate, keep-masks): none in eval mode; drawn from ``self.rng`` in training when
        none are given (as reference.MultiheadAttention)."""
        if not self.training or self.dropout == 0:
            return 0.0, None
        if masks is None:
            masks = _draw_masks(self.rng, shapes(), self.dropout)
        return self.dropout, masks

    def _backward_cache(self) -> Any:
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        return cache

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.d_model}, {self.nhead}, dim_feedforward="
                f"{self.dim_feedforward}, dropout={self.dropout}, activation="
                f"{self.activation!r}, norm_first={self.norm_first}, bias={self.bias})")


class TransformerEncoderLayer(_Layer):
    """``torch.nn.TransformerEncoderLayer(batch_first=True)`` in NumPy, with ``backward``.

    TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation="relu", layer_norm_eps=1e-5, batch_first=True, norm_first=False, bias=True, *,
    device=None, dtype=None, seed=None): torch.nn's parameter names and init, dtype float64
    unless given, the init drawn from a Generator seeded with ``seed``. In training with
    dropout > 0, forward uses ``dropout_masks`` or draws keep-masks from that Generator.
    """

    def forward(self, src: np.ndarray, src_mask: np.ndarray | None = None,
                src_key_padding_mask: np.ndarray | None = None, is_causal: bool = False,
                dropout_masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """out (B, S, E) for src (B, S, E); see transformer_encoder_layer_forward."""
        check_float_array("src", src, shape=("B", "S", self.d_model), dtype=self.dtype,
                          finite=False)
        _check_nonempty("src", src, "S")
        B, S, E = src.shape
        p, masks = self._dropout_args(dropout_masks, lambda: _encoder_layer_mask_shapes(
            B, S, E, self.nhead, self.dim_feedforward))
        out, self._cache = transformer_encoder_layer_forward(
            src, self.params, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
            is_causal=is_causal, dropout=p, dropout_masks=masks, **self._options())
        return out

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Fills ``self.grads``; returns dsrc."""
        dsrc, self.grads = transformer_encoder_layer_backward(dout, self._backward_cache())
        return dsrc


class TransformerDecoderLayer(_Layer):
    """``torch.nn.TransformerDecoderLayer(batch_first=True)`` in NumPy, with ``backward``;
    constructor as TransformerEncoderLayer's."""

    decoder = True

    def forward(self, tgt: np.ndarray, memory: np.ndarray, tgt_mask: np.ndarray | None = None,
                memory_mask: np.ndarray | None = None,
                tgt_key_padding_mask: np.ndarray | None = None,
                memory_key_padding_mask: np.ndarray | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False,
                dropout_masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """out (B, T, E) for tgt (B, T, E), memory (B, S, E); see
        transformer_decoder_layer_forward."""
        check_float_array("tgt", tgt, shape=("B", "T", self.d_model), dtype=self.dtype,
                          finite=False)
        _check_nonempty("tgt", tgt, "T")
        B, T, E = tgt.shape
        check_float_array("memory", memory, shape=(B, "S", E), finite=False)
        _check_nonempty("memory", memory, "S")
        S = memory.shape[1]
        p, masks = self._dropout_args(dropout_masks, lambda: _decoder_layer_mask_shapes(
            B, T, S, E, self.nhead, self.dim_feedforward))
        out, self._cache = transformer_decoder_layer_forward(
            tgt, memory, self.params, tgt_mask=tgt_mask, memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal, dropout=p, dropout_masks=masks,
            **self._options())
        return out

    __call__ = forward

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dtgt, dmemory)."""
        dtgt, dmemory, self.grads = transformer_decoder_layer_backward(
            dout, self._backward_cache())
        return dtgt, dmemory


class _Container(Module):
    """A module made of child modules (torch's submodules): ``params`` and ``grads`` are views
    over the children's dicts, keyed "<child>.<name>" as torch's state dicts, so that an update
    in place, ``load_state_dict`` or a child's own backward reach the same arrays."""

    def _children(self) -> dict[str, Module]:
        return self.__dict__.get("children", {})  # empty while Module.__init__ runs

    def _gather(self, attr: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{name}": a for prefix, child in self._children().items()
                for name, a in getattr(child, attr).items()}

    def _scatter(self, attr: str, arrays: Mapping[str, np.ndarray]) -> None:
        for prefix, child in self._children().items():
            setattr(child, attr, _sub(arrays, prefix + "."))

    params = property(lambda self: self._gather("params"),
                      lambda self, arrays: self._scatter("params", arrays))
    grads = property(lambda self: self._gather("grads"),
                     lambda self, arrays: self._scatter("grads", arrays))

    def train(self, mode: bool = True) -> "_Container":
        super().train(mode)
        for child in self._children().values():
            child.train(mode)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As ``Module.load_state_dict`` over the children's parameters together."""
        flat = Module()
        flat.params = self.params
        flat.load_state_dict(state_dict)  # validates every key first, changes nothing on error
        self.params = flat.params


class _Stack(_Container):
    """What the two stacks share: copies of one layer and an optional final LayerNorm."""

    layer_class: type = _Layer
    layer_arg = "layer"

    def __init__(self, layer: _Layer, num_layers: int, norm: LayerNorm | None = None) -> None:
        super().__init__()
        if not isinstance(layer, self.layer_class):
            raise TypeError(f"{self.layer_arg}: expected a {self.layer_class.__name__}, "
                            f"got {type(layer).__name__}")
        self.num_layers = check_positive_int("num_layers", num_layers)
        if norm is not None:
            if not isinstance(norm, LayerNorm):
                raise TypeError(f"norm: expected a LayerNorm or None, got {type(norm).__name__}")
            if norm.normalized_shape != (layer.d_model,) or norm.dtype != layer.dtype:
                raise ValueError(f"norm: expected a LayerNorm({layer.d_model}) of dtype "
                                 f"{layer.dtype} (the layer's d_model and dtype), got "
                                 f"normalized_shape {norm.normalized_shape}, dtype {norm.dtype}")
        self.layers = [copy.deepcopy(layer) for _ in range(self.num_layers)]
        for copied in self.layers:
            copied._cache = None
        self.norm = norm
        self.children = {f"layers.{i}": lay for i, lay in enumerate(self.layers)}
        if norm is not None:
            self.children["norm"] = norm
        self.rng = layer.rng
        self._cache: Any = None

    def _layer_params(self) -> dict[str, np.ndarray]:
        return {name: p for name, p in self.params.items() if name.startswith("layers.")}

    def _dropout_args(self, masks: Mapping[str, np.ndarray] | None,
                      shapes: Any) -> tuple[float, Mapping[str, np.ndarray] | None]:
        layer = self.layers[0]
        if not self.training or layer.dropout == 0:
            return 0.0, None
        if masks is None:
            masks = _draw_masks(self.rng, _prefixed("layers.", shapes(), self.num_layers),
                                layer.dropout)
        return layer.dropout, masks

    def _finish(self, out: np.ndarray) -> np.ndarray:
        return out if self.norm is None else self.norm.forward(out)

    def _backward_cache(self, dout: np.ndarray) -> tuple[Any, np.ndarray]:
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        return cache, dout if self.norm is None else self.norm.backward(dout)

    def _set_grads(self, dlayers: Mapping[str, np.ndarray]) -> None:
        grads = dict(dlayers)
        if self.norm is not None:
            grads.update({f"norm.{name}": g for name, g in self.norm.grads.items()})
        self.grads = grads

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layers[0]!r}, {self.num_layers}, norm={self.norm!r})"


class TransformerEncoder(_Stack):
    """``torch.nn.TransformerEncoder(encoder_layer, num_layers, norm=None)``: num_layers copies
    of the layer, then ``norm`` (a LayerNorm) when given; params "layers.{i}.*", "norm.*"."""

    layer_class, layer_arg = TransformerEncoderLayer, "encoder_layer"

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: LayerNorm | None = None) -> None:
        super().__init__(encoder_layer, num_layers, norm)

    def forward(self, src: np.ndarray, mask: np.ndarray | None = None,
                src_key_padding_mask: np.ndarray | None = None, is_causal: bool = False,
                dropout_masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """out (B, S, E) for src (B, S, E); dropout_masks: the layer sites under
        "layers.{i}."."""
        layer = self.layers[0]
        check_float_array("src", src, shape=("B", "S", layer.d_model), dtype=layer.dtype,
                          finite=False)
        _check_nonempty("src", src, "S")
        B, S, E = src.shape
        p, masks = self._dropout_args(dropout_masks, lambda: _encoder_layer_mask_shapes(
            B, S, E, layer.nhead, layer.dim_feedforward))
        out, self._cache = transformer_encoder_forward(
            src, self._layer_params(), num_layers=self.num_layers, mask=mask,
            src_key_padding_mask=src_key_padding_mask, is_causal=is_causal, dropout=p,
            dropout_masks=masks, **layer._options())
        return self._finish(out)

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Fills ``self.grads`` (and the children's); returns dsrc."""
        cache, dout = self._backward_cache(dout)
        dsrc, dlayers = transformer_encoder_backward(dout, cache)
        self._set_grads(dlayers)
        return dsrc


class TransformerDecoder(_Stack):
    """``torch.nn.TransformerDecoder(decoder_layer, num_layers, norm=None)``."""

    layer_class, layer_arg = TransformerDecoderLayer, "decoder_layer"

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: LayerNorm | None = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)

    def forward(self, tgt: np.ndarray, memory: np.ndarray, tgt_mask: np.ndarray | None = None,
                memory_mask: np.ndarray | None = None,
                tgt_key_padding_mask: np.ndarray | None = None,
                memory_key_padding_mask: np.ndarray | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False,
                dropout_masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """out (B, T, E) for tgt (B, T, E), memory (B, S, E)."""
        layer = self.layers[0]
        check_float_array("tgt", tgt, shape=("B", "T", layer.d_model), dtype=layer.dtype,
                          finite=False)
        _check_nonempty("tgt", tgt, "T")
        B, T, E = tgt.shape
        check_float_array("memory", memory, shape=(B, "S", E), finite=False)
        _check_nonempty("memory", memory, "S")
        S = memory.shape[1]
        p, masks = self._dropout_args(dropout_masks, lambda: _decoder_layer_mask_shapes(
            B, T, S, E, layer.nhead, layer.dim_feedforward))
        out, self._cache = transformer_decoder_forward(
            tgt, memory, self._layer_params(), num_layers=self.num_layers, tgt_mask=tgt_mask,
            memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal, dropout=p, dropout_masks=masks,
            **layer._options())
        return self._finish(out)

    __call__ = forward

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads`` (and the children's); returns (dtgt, dmemory)."""
        cache, dout = self._backward_cache(dout)
        dtgt, dmemory, dlayers = transformer_decoder_backward(dout, cache)
        self._set_grads(dlayers)
        return dtgt, dmemory


class Transformer(_Container):
    """``torch.nn.Transformer(batch_first=True)`` in NumPy, with ``backward``.

    Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation="relu", custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=True, norm_first=False, bias=True, *,
    device=None, dtype=None, seed=None). ``.encoder`` / ``.decoder`` are the stacks (each
    ending in a LayerNorm unless custom); as torch.nn, every parameter with more than one
    dimension is then redrawn Xavier-uniform. state_dict keys equal nn.Transformer's.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu",
                 custom_encoder: TransformerEncoder | None = None,
                 custom_decoder: TransformerDecoder | None = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, *, device: Any = None,
                 dtype: Any = None, seed: int | None = None) -> None:
        super().__init__()
        _check_batch_first(batch_first)
        self.d_model = check_positive_int("d_model", d_model)
        self.nhead = _check_nhead(nhead, self.d_model)
        self.batch_first = True
        rng = np.random.default_rng(seed)
        self.dtype = check_factory_kwargs(device, dtype)
        layer_args = (self.d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                      batch_first, norm_first, bias)
        for name, custom, stack in (("custom_encoder", custom_encoder, TransformerEncoder),
                                    ("custom_decoder", custom_decoder, TransformerDecoder)):
            if custom is not None and not isinstance(custom, stack):
                raise TypeError(f"{name}: expected a {stack.__name__} or None, "
                                f"got {type(custom).__name__}")
        if custom_encoder is None:
            layer = TransformerEncoderLayer(*layer_args, dtype=self.dtype,
                                            seed=int(rng.integers(2**32)))
            custom_encoder = TransformerEncoder(layer, num_encoder_layers, LayerNorm(
                self.d_model, layer_norm_eps, bias=bias, dtype=self.dtype))
        if custom_decoder is None:
            layer = TransformerDecoderLayer(*layer_args, dtype=self.dtype,
                                            seed=int(rng.integers(2**32)))
            custom_decoder = TransformerDecoder(layer, num_decoder_layers, LayerNorm(
                self.d_model, layer_norm_eps, bias=bias, dtype=self.dtype))
        self.encoder, self.decoder = custom_encoder, custom_decoder
        self.children = {"encoder": self.encoder, "decoder": self.decoder}
        # torch.nn's _reset_parameters: Xavier-uniform for every parameter with dim > 1
        for p in self.params.values():
            if p.ndim > 1:
                fan_out, fan_in = p.shape
                p[...] = rng.uniform(-1.0, 1.0, p.shape) * math.sqrt(6.0 / (fan_in + fan_out))
        self.zero_grad()

    def forward(self, src: np.ndarray, tgt: np.ndarray, src_mask: np.ndarray | None = None,
                tgt_mask: np.ndarray | None = None, memory_mask: np.ndarray | None = None,
                src_key_padding_mask: np.ndarray | None = None,
                tgt_key_padding_mask: np.ndarray | None = None,
                memory_key_padding_mask: np.ndarray | None = None, src_is_causal: bool = False,
                tgt_is_causal: bool = False, memory_is_causal: bool = False,
                dropout_masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """out (B, T, E) for src (B, S, E), tgt (B, T, E): memory = encoder(src),
        out = decoder(tgt, memory). dropout_masks: the stacks' sites under "encoder." and
        "decoder." (``transformer_dropout_mask_shapes``)."""
        check_float_array("src", src, shape=("B", "S", self.d_model), dtype=self.dtype)
        _check_nonempty("src", src, "S")
        _check_input("tgt", tgt, src.shape[0], self.d_model, self.dtype, "src")
        if dropout_masks is not None:
            if not isinstance(dropout_masks, Mapping):
                raise TypeError(f"dropout_masks: expected a dict of bool arrays, "
                                f"got {type(dropout_masks).__name__}")
            stray = sorted(k for k in dropout_masks if not k.startswith(("encoder.",
                                                                          "decoder.")))
            if stray:
                raise ValueError(f"dropout_masks: unexpected keys {stray} (every site is under "
                                 f"'encoder.' or 'decoder.')")
        memory = self.encoder.forward(src, src_mask, src_key_padding_mask, src_is_causal,
                                      dropout_masks=_sub(dropout_masks, "encoder."))
        return self.decoder.forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                                    memory_key_padding_mask, tgt_is_causal, memory_is_causal,
                                    dropout_masks=_sub(dropout_masks, "decoder."))

    __call__ = forward

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads`` (and the stacks'); returns (dsrc, dtgt)."""
        dtgt, dmemory = self.decoder.backward(dout)
        return self.encoder.backward(dmemory), dtgt

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: Any = None,
                                        dtype: Any = None) -> np.ndarray:
        """Float (sz, sz): -inf above the diagonal (key j > query i), 0 elsewhere."""
        n = check_positive_int("sz", sz)
        return np.triu(np.full((n, n), -np.inf, dtype=check_factory_kwargs(device, dtype)), k=1)

    def __repr__(self) -> str:
        return f"Transformer(encoder={self.encoder!r}, decoder={self.decoder!r})"
