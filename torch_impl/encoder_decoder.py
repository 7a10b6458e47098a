"""The encoder-decoder Transformer's layers and stacks as torch.nn builds them (batch-first).

Twin of ``reference/encoder_decoder.py`` on torch tensors. src (B, S, E), tgt (B, T, E),
memory (B, S, E); E = d_model, h = nhead, F = dim_feedforward. For a layer input x:

    post-LN (norm_first=False):
        encoder  x = LN1(x + SA(x));  x = LN2(x + FF(x))
        decoder  x = LN1(x + SA(x));  x = LN2(x + CA(x, mem));  x = LN3(x + FF(x))
    pre-LN (norm_first=True):
        encoder  x = x + SA(LN1(x));  x = x + FF(LN2(x))
        decoder  x = x + SA(LN1(x));  x = x + CA(LN2(x), mem);  x = x + FF(LN3(x))

    SA(x)    = dropout1(MHA(x, x, x; mask, key_padding_mask))
    CA(x, m) = dropout2(MHA(x, m, m; memory_mask, memory_key_padding_mask))
    FF(x)    = dropoutN(linear2(dropout(act(linear1(x)))))    act = relu or exact gelu
               (dropoutN: dropout2 in the encoder, dropout3 in the decoder)

MHA is torch.nn.MultiheadAttention's (``attention.py``), its weights' dropout the site named
after the attention ("self_attn", "multihead_attn"). A stack applies its layers in turn and
then its final LayerNorm ("norm.*") when it has one; the Transformer is
decoder(tgt, encoder(src)), both stacks with final norms.

Masks (as torch.nn): an attention mask is bool (True = masked out) or float additive (-inf =
masked), shape (Tq, Tk) or (B h, Tq, Tk) (row b h + head), taken as (B, h, Tq, Tk); key
padding masks are bool (B, Tk), True = padding. ``*_is_causal=True`` applies the causal mask
(key j > query i masked, aligned top-left, also for memory_is_causal with T != S) on top of
any mask given, where torch.nn takes it as a hint that the given mask is causal: either way the
result is right. A query that sees no key gets attention weights 0 (its attention output is
the out-projection's bias); older torch.nn gives NaN there, the torch 2.13 tested here zeros.

Dropout (rate p, scale 1/(1-p)): explicit bool keep-masks keyed by site, "self_attn"
(B, h, Tq, Tq), "dropout1", "multihead_attn" (B, h, T, S), "dropout2", "dropout" (B, Tq, F),
"dropout3", prefixed "layers.{i}." in a stack and "encoder." / "decoder." in the Transformer
(``transformer_dropout_mask_shapes``).

Two forms of the same function:

- the functional ``*_forward`` / ``*_backward`` pairs chain the explicit-cache building blocks
  (``multi_head_attention_forward``, ``linear_forward``, ``layer_norm_forward``, ...; no
  autograd): each backward runs its chain in reverse, a residual stream adding its branch's
  gradient to the one flowing past it, and self-attention summing its query, key and value
  gradients;
- the modules (``TransformerEncoderLayer`` ... ``Transformer``, torch.nn's constructors,
  forward signatures and state-dict keys) compute it under autograd, over rows (B T, E): the
  packed q, k, v projections as one GEMM (F.linear), the heads through
  ``kernels/attention.py``'s attention (its hand-written backward; ATen's fused CPU flash
  kernels where they fit), layer norm through the fused ``seqtwin::layer_norm`` op, relu /
  gelu as ATen's ops, dropout as x ⊙ M / (1 - p) with the given or a drawn keep-mask M. The
  outermost module called validates its inputs, masks and weights once; the layers inside
  trust them. Train mode with dropout > 0 draws the keep-masks unless ``dropout_masks`` gives
  them; eval mode drops nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ReluCache, gelu_backward, gelu_forward, relu_backward, relu_forward
from .attention import (
    MultiheadAttention,
    MultiheadAttentionCache,
    multi_head_attention_backward,
    multi_head_attention_forward,
)
from .checks import (
    check_dropout_masks,
    check_finite_tensors,
    check_float_tensor,
    check_positive_int,
    check_probability,
    shape_str,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .kernels.attention import AttentionMasks, attention
from .linear import LinearCache, linear_backward, linear_forward
from .normalization import LayerNorm, LayerNormCache, layer_norm_backward, layer_norm_forward

ACTIVATIONS = ("relu", "gelu")
_MHA_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_MASKS_HELPER = "transformer_dropout_mask_shapes"

# ----------------------------------------------------------------------------- shapes

def _layer_param_shapes(decoder: bool, d_model: int, dim_feedforward: int | str,
                        bias: bool) -> dict[str, tuple]:
    """torch.nn.Transformer{Encoder,Decoder}Layer's state-dict keys and shapes, in order."""
    E, F_ = d_model, dim_feedforward
    shapes: dict[str, tuple] = {}

    def add(name: str, weight: tuple, bias_shape: tuple) -> None:
        shapes[f"{name}weight"] = weight
        if bias:
            shapes[f"{name}bias"] = bias_shape

    for attn in ("self_attn", "multihead_attn") if decoder else ("self_attn",):
        add(f"{attn}.in_proj_", (3 * E, E), (3 * E,))
        add(f"{attn}.out_proj.", (E, E), (E,))
    add("linear1.", (F_, E), (F_,))
    add("linear2.", (E, F_), (E,))
    for norm in ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2"):
        add(f"{norm}.", (E,), (E,))
    return shapes


def _stack_param_shapes(decoder: bool, num_layers: int, d_model: int, dim_feedforward: int | str,
                        bias: bool, norm: bool) -> dict[str, tuple]:
    layer = _layer_param_shapes(decoder, d_model, dim_feedforward, bias)
    shapes = {f"layers.{i}.{name}": shape for i in range(num_layers)
              for name, shape in layer.items()}
    if norm:
        shapes["norm.weight"] = (d_model,)
        if bias:
            shapes["norm.bias"] = (d_model,)
    return shapes


def transformer_param_shapes(d_model: int, nhead: int, num_encoder_layers: int,
                             num_decoder_layers: int, dim_feedforward: int,
                             bias: bool = True) -> dict[str, tuple]:
    """torch.nn.Transformer's state-dict keys and shapes, in its order (both final norms;
    ``bias=False`` drops every bias, the attention, linear and layer-norm ones)."""
    E = check_positive_int("d_model", d_model)
    _check_nhead(nhead, E)
    ne = check_positive_int("num_encoder_layers", num_encoder_layers)
    nd = check_positive_int("num_decoder_layers", num_decoder_layers)
    F_ = check_positive_int("dim_feedforward", dim_feedforward)
    bias = _check_bool("bias", bias)
    shapes = {f"encoder.{k}": s for k, s in _stack_param_shapes(False, ne, E, F_, bias,
                                                                  True).items()}
    shapes.update({f"decoder.{k}": s for k, s in _stack_param_shapes(True, nd, E, F_, bias,
                                                                       True).items()})
    return shapes


def _layer_mask_shapes(decoder: bool, batch: int, tq: int, tk: int, d_model: int, nhead: int,
                       dim_feedforward: int) -> dict[str, tuple[int, ...]]:
    """The dropout sites of one layer over queries (B, Tq, E) (and memory of length Tk)."""
    B, E, h, F_ = batch, d_model, nhead, dim_feedforward
    if not decoder:
        return {"self_attn": (B, h, tq, tq), "dropout1": (B, tq, E), "dropout": (B, tq, F_),
                "dropout2": (B, tq, E)}
    return {"self_attn": (B, h, tq, tq), "dropout1": (B, tq, E),
            "multihead_attn": (B, h, tq, tk), "dropout2": (B, tq, E),
            "dropout": (B, tq, F_), "dropout3": (B, tq, E)}


def _stack_mask_shapes(decoder: bool, num_layers: int, *shape_args: int
                       ) -> dict[str, tuple[int, ...]]:
    layer = _layer_mask_shapes(decoder, *shape_args)
    return {f"layers.{i}.{site}": shape for i in range(num_layers)
            for site, shape in layer.items()}


def transformer_dropout_mask_shapes(batch: int, src_len: int, tgt_len: int, *, d_model: int,
                                    nhead: int, num_encoder_layers: int,
                                    num_decoder_layers: int,
                                    dim_feedforward: int) -> dict[str, tuple[int, ...]]:
    """Every dropout site of a Transformer over src (B, S, E), tgt (B, T, E) and its keep-mask
    shape: "encoder.layers.{i}.<site>" and "decoder.layers.{i}.<site>" (module docstring)."""
    B = check_positive_int("batch", batch)
    S = check_positive_int("src_len", src_len)
    T = check_positive_int("tgt_len", tgt_len)
    E = check_positive_int("d_model", d_model)
    h = _check_nhead(nhead, E)
    ne = check_positive_int("num_encoder_layers", num_encoder_layers)
    nd = check_positive_int("num_decoder_layers", num_decoder_layers)
    F_ = check_positive_int("dim_feedforward", dim_feedforward)
    shapes = {f"encoder.{k}": s for k, s in _stack_mask_shapes(False, ne, B, S, S, E, h,
                                                                 F_).items()}
    shapes.update({f"decoder.{k}": s for k, s in _stack_mask_shapes(True, nd, B, T, S, E, h,
                                                                      F_).items()})
    return shapes

# ----------------------------------------------------------------------------- validation

class _Options(NamedTuple):
    """The keywords every layer of a call shares."""
    nhead: int
    activation: str
    eps: float
    norm_first: bool
    dropout: float


class _Masks(NamedTuple):
    """One attention's validated masks: attn_mask (Tq, Tk) or (B, h, Tq, Tk), bool or float
    additive; key_padding_mask bool (B, Tk); causal only where Tq = Tk (else folded into
    attn_mask), where the attention's bottom-right causal mask is this j > i."""
    attn_mask: Tensor | None = None
    key_padding_mask: Tensor | None = None
    causal: bool = False


def _check_bool(name: str, flag: object) -> bool:
    if not isinstance(flag, bool):
        raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    return flag


def _check_nhead(nhead: object, d_model: int) -> int:
    heads = check_positive_int("nhead", nhead)
    if d_model % heads:
        raise ValueError(f"nhead: expected a divisor of d_model E = {d_model}, got {heads}")
    return heads


def _check_activation(activation: object) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected 'relu' or 'gelu' (a string; seqtwin takes no "
                        f"callables), got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected 'relu' or 'gelu' (exact, erf), "
                         f"got {activation!r}")
    return activation


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"layer_norm_eps: expected a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"layer_norm_eps: expected a positive finite float, got {eps}")
    return float(eps)


def _check_batch_first(batch_first: object) -> None:
    if batch_first is not True:
        raise ValueError(f"batch_first: seqtwin is batch-first (src (B, S, E), tgt (B, T, E)); "
                         f"expected True, got {batch_first!r}")


def _check_options(nhead: object, d_model: int, activation: object, layer_norm_eps: object,
                   norm_first: object, dropout: object) -> _Options:
    return _Options(_check_nhead(nhead, d_model), _check_activation(activation),
                    _check_eps(layer_norm_eps), _check_bool("norm_first", norm_first),
                    check_probability("dropout", dropout))


def _check_input(name: str, x: object, length: str, d_model: int | None = None,
                 dtype: torch.dtype | None = None, batch: int | None = None,
                 batch_of: str = "src") -> Tensor:
    """A float sequence (B, length, E), batch-first, E = d_model, finite."""
    check_float_tensor(name, x, dtype=dtype, finite=False)
    width = "E" if d_model is None else d_model
    if x.dim() != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected shape (B, {length}, E) = (B, {length}, {width}) "
                         f"(batch-first, B and {length} >= 1), got {shape_str(tuple(x.shape))}")
    if d_model is not None and x.shape[2] != d_model:
        raise ValueError(f"{name}: expected width E = d_model = {d_model}, shape (B, {length}, "
                         f"{d_model}), got {shape_str(tuple(x.shape))}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name}: expected batch size B = {batch} (that of {batch_of}), "
                         f"got shape {shape_str(tuple(x.shape))}")
    return check_float_tensor(name, x)


def _future(tq: int, tk: int, device: torch.device) -> Tensor:
    """bool (Tq, Tk), True where key j > query i: the causal mask, aligned top-left."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).triu(1)


def _check_masks(names: tuple[str, str, str], attn_mask: object, key_padding_mask: object,
                 causal: object, batch: int, nhead: int, tq: int, tk: int, dtype: torch.dtype,
                 device: torch.device) -> _Masks:
    """One attention's masks, named as the caller's arguments (attn, padding, causal)."""
    mask_name, padding_name, causal_name = names
    if causal is None:  # torch.nn's "no hint"; the masks given are applied either way
        causal = False
    causal = _check_bool(causal_name, causal)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{mask_name}: expected a torch.Tensor (bool, True = masked out, or "
                            f"float additive), got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            raise TypeError(f"{mask_name}: expected dtype torch.bool (True = masked out) or "
                            f"{dtype} (additive, the dtype of the inputs), got {attn_mask.dtype}")
        shapes = ((tq, tk), (batch * nhead, tq, tk))
        if tuple(attn_mask.shape) not in shapes:
            raise ValueError(f"{mask_name}: expected shape (Tq, Tk) = {shape_str(shapes[0])} "
                             f"or (B * nhead, Tq, Tk) = {shape_str(shapes[1])}, got "
                             f"{shape_str(tuple(attn_mask.shape))}")
        if attn_mask.dtype != torch.bool and not torch.compiler.is_compiling() and bool(
                (torch.isnan(attn_mask) | (attn_mask == math.inf)).any()):
            raise ValueError(f"{mask_name}: contains NaN or +inf (a float mask is added to the "
                             f"scores; -inf marks a masked key)")
        if attn_mask.dim() == 3:  # torch.nn's row b h + head
            attn_mask = attn_mask.reshape(batch, nhead, tq, tk)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise TypeError(f"{padding_name}: expected a bool torch.Tensor of shape (B, Tk) = "
                            f"{shape_str((batch, tk))} (True = padding), got {got}")
        if tuple(key_padding_mask.shape) != (batch, tk):
            raise ValueError(f"{padding_name}: expected shape (B, Tk) = {shape_str((batch, tk))}"
                             f", got {shape_str(tuple(key_padding_mask.shape))}")
    if causal and tq != tk:  # the attention's own causal mask is aligned bottom-right
        future = _future(tq, tk, device)
        if attn_mask is None:
            attn_mask = future
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | future
        else:
            attn_mask = attn_mask.masked_fill(future, -math.inf)
        causal = False
    return _Masks(attn_mask, key_padding_mask, causal)


def _check_mapping(params: object) -> Mapping[str, Tensor]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors keyed by torch.nn names, "
                        f"got {type(params).__name__}")
    return params


def _has_bias(params: Mapping[str, Tensor]) -> bool:
    """bias=False drops every bias (torch.nn): any bias key means all of them are expected."""
    return any(name.endswith("bias") for name in params)


def _feedforward_size(params: Mapping[str, Tensor], key: str) -> int | str:
    """F from linear1.weight (F, E); "F" (any) when it is absent or malformed (the key checks
    then say what is wrong)."""
    weight = params.get(key)
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else "F"


def _check_params(params: Mapping[str, Tensor], expected: Mapping[str, tuple],
                  dtype: torch.dtype) -> None:
    """Exactly the keys of ``expected``, each a float tensor of its shape and ``dtype``."""
    missing = [name for name in expected if name not in params]
    if missing:
        raise ValueError(f"params: missing key {missing[0]!r} (expected shape "
                         f"{shape_str(expected[missing[0]])}); {len(missing)} missing in all")
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)} in all; "
                         f"bias=False drops every bias, a stack's final norm is 'norm.*')")
    for name, shape in expected.items():
        check_float_tensor(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)


def _check_masks_dict(masks: object, p: float, expected: dict[str, tuple[int, ...]]
                      ) -> Mapping[str, Tensor] | None:
    return check_dropout_masks(masks, p, expected, _MASKS_HELPER)

# ----------------------------------------------------------------------------- caches

class AttentionBlockCache(NamedTuple):
    attention: MultiheadAttentionCache  # MHA(x, m, m)
    dropout: DropoutCache | None        # dropout1 / dropout2 of its output; None without


class FeedForwardCache(NamedTuple):
    linear1: LinearCache                # z = x W_1ᵀ + b_1
    activation: tuple                   # a = act(z): ReluCache or GeluCache
    dropout: DropoutCache | None        # a' = dropout(a)
    linear2: LinearCache                # y = a' W_2ᵀ + b_2
    dropout_out: DropoutCache | None    # FF(x) = dropout2(y) (encoder), dropout3(y) (decoder)


class EncoderLayerCache(NamedTuple):
    norm_first: bool
    norm1: LayerNormCache               # LN1(x) (pre-LN) or LN1(x + SA(x)) (post-LN)
    self_attn: AttentionBlockCache      # SA
    norm2: LayerNormCache
    feedforward: FeedForwardCache       # FF
    param_keys: tuple[str, ...]         # the layer's params, in torch.nn's order


class DecoderLayerCache(NamedTuple):
    norm_first: bool
    norm1: LayerNormCache
    self_attn: AttentionBlockCache      # SA
    norm2: LayerNormCache
    multihead_attn: AttentionBlockCache  # CA, over the memory
    norm3: LayerNormCache
    feedforward: FeedForwardCache       # FF
    param_keys: tuple[str, ...]


class EncoderCache(NamedTuple):
    layers: tuple[EncoderLayerCache, ...]
    norm: LayerNormCache | None         # the final norm; None without one
    param_keys: tuple[str, ...]


class DecoderCache(NamedTuple):
    layers: tuple[DecoderLayerCache, ...]
    norm: LayerNormCache | None
    param_keys: tuple[str, ...]


class TransformerCache(NamedTuple):
    encoder: EncoderCache               # memory = encoder(src)
    decoder: DecoderCache               # out = decoder(tgt, memory)
    param_keys: tuple[str, ...]
    memory: Tensor                      # encoder(src) (B, S, E)

# ----------------------------------------------------------------------------- functional blocks

def _norm(x: Tensor, params: Mapping[str, Tensor], name: str,
          eps: float) -> tuple[Tensor, LayerNormCache]:
    return layer_norm_forward(x, params[f"{name}.weight"], params.get(f"{name}.bias"), eps)


def _put(dparams: dict[str, Tensor], name: str, dweight: Tensor | None,
         dbias: Tensor | None) -> None:
    dparams[f"{name}.weight"] = dweight
    if dbias is not None:
        dparams[f"{name}.bias"] = dbias


def _norm_backward(dy: Tensor, cache: LayerNormCache, name: str,
                   dparams: dict[str, Tensor]) -> Tensor:
    dx, dweight, dbias = layer_norm_backward(dy, cache)
    _put(dparams, name, dweight, dbias)
    return dx


def _dropout(x: Tensor, p: float, masks: Mapping[str, Tensor] | None,
             name: str) -> tuple[Tensor, DropoutCache | None]:
    if masks is None:
        return x, None
    return dropout_forward(x, p, masks[name])


def _dropout_back(dy: Tensor, cache: DropoutCache | None) -> Tensor:
    return dy if cache is None else dropout_backward(dy, cache)


def _attention_forward(x: Tensor, memory: Tensor, params: Mapping[str, Tensor], prefix: str,
                       attn: str, opts: _Options, m: _Masks, masks: Mapping[str, Tensor] | None,
                       out_site: str) -> tuple[Tensor, AttentionBlockCache]:
    """dropout_out(MHA(x, memory, memory)) with the weights params[prefix + attn + ".*"]."""
    weights = {k: params[f"{prefix}{attn}.{k}"] for k in _MHA_KEYS
               if f"{prefix}{attn}.{k}" in params}
    keep = None if masks is None else masks[prefix + attn]
    (y, _), mha = multi_head_attention_forward(
        x, memory, memory, weights, opts.nhead, m.key_padding_mask, m.attn_mask, m.causal,
        opts.dropout if keep is not None else 0.0, keep)
    y, drop = _dropout(y, opts.dropout, masks, prefix + out_site)
    return y, AttentionBlockCache(mha, drop)


def _attention_backward(dy: Tensor, cache: AttentionBlockCache, prefix: str, attn: str,
                        dparams: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(dx, dmemory) from dy; dmemory = dkey + dvalue (memory feeds both)."""
    dy = _dropout_back(dy, cache.dropout)
    dquery, dkey, dvalue, dweights = multi_head_attention_backward(dy, cache.attention)
    for k, g in dweights.items():
        dparams[f"{prefix}{attn}.{k}"] = g
    return dquery, dkey + dvalue


def _feedforward_forward(x: Tensor, params: Mapping[str, Tensor], prefix: str, opts: _Options,
                         masks: Mapping[str, Tensor] | None,
                         out_site: str) -> tuple[Tensor, FeedForwardCache]:
    """FF(x) = dropout_out(linear2(dropout(act(linear1(x)))))."""
    z, linear1 = linear_forward(x, params[f"{prefix}linear1.weight"],
                                params.get(f"{prefix}linear1.bias"))
    a, act = relu_forward(z) if opts.activation == "relu" else gelu_forward(z)
    a, drop = _dropout(a, opts.dropout, masks, prefix + "dropout")
    y, linear2 = linear_forward(a, params[f"{prefix}linear2.weight"],
                                params.get(f"{prefix}linear2.bias"))
    y, drop_out = _dropout(y, opts.dropout, masks, prefix + out_site)
    return y, FeedForwardCache(linear1, act, drop, linear2, drop_out)


def _feedforward_backward(dy: Tensor, cache: FeedForwardCache, prefix: str,
                          dparams: dict[str, Tensor]) -> Tensor:
    dy = _dropout_back(dy, cache.dropout_out)
    da, dweight, dbias = linear_backward(dy, cache.linear2)
    _put(dparams, f"{prefix}linear2", dweight, dbias)
    da = _dropout_back(da, cache.dropout)
    act = cache.activation
    dz = relu_backward(da, act) if isinstance(act, ReluCache) else gelu_backward(da, act)
    dx, dweight, dbias = linear_backward(dz, cache.linear1)
    _put(dparams, f"{prefix}linear1", dweight, dbias)
    return dx


def _encoder_layer_forward(x: Tensor, params: Mapping[str, Tensor], prefix: str,
                           opts: _Options, m: _Masks, masks: Mapping[str, Tensor] | None,
                           keys: tuple[str, ...]) -> tuple[Tensor, EncoderLayerCache]:
    eps = opts.eps
    if opts.norm_first:  # x = x + SA(LN1(x)); x = x + FF(LN2(x))
        h, norm1 = _norm(x, params, f"{prefix}norm1", eps)
        a, sa = _attention_forward(h, h, params, prefix, "self_attn", opts, m, masks,
                                   "dropout1")
        x = x + a
        h, norm2 = _norm(x, params, f"{prefix}norm2", eps)
        f, ff = _feedforward_forward(h, params, prefix, opts, masks, "dropout2")
        x = x + f
    else:                # x = LN1(x + SA(x)); x = LN2(x + FF(x))
        a, sa = _attention_forward(x, x, params, prefix, "self_attn", opts, m, masks,
                                   "dropout1")
        x, norm1 = _norm(x + a, params, f"{prefix}norm1", eps)
        f, ff = _feedforward_forward(x, params, prefix, opts, masks, "dropout2")
        x, norm2 = _norm(x + f, params, f"{prefix}norm2", eps)
    return x, EncoderLayerCache(opts.norm_first, norm1, sa, norm2, ff, keys)


def _encoder_layer_backward(dout: Tensor, cache: EncoderLayerCache, prefix: str,
                            dparams: dict[str, Tensor]) -> Tensor:
    if cache.norm_first:
        dh = _feedforward_backward(dout, cache.feedforward, prefix, dparams)
        dx = dout + _norm_backward(dh, cache.norm2, f"{prefix}norm2", dparams)
        dquery, dkv = _attention_backward(dx, cache.self_attn, prefix, "self_attn", dparams)
        return dx + _norm_backward(dquery + dkv, cache.norm1, f"{prefix}norm1", dparams)
    ds = _norm_backward(dout, cache.norm2, f"{prefix}norm2", dparams)
    dx = ds + _feedforward_backward(ds, cache.feedforward, prefix, dparams)
    ds = _norm_backward(dx, cache.norm1, f"{prefix}norm1", dparams)
    dquery, dkv = _attention_backward(ds, cache.self_attn, prefix, "self_attn", dparams)
    return ds + dquery + dkv


def _decoder_layer_forward(x: Tensor, memory: Tensor, params: Mapping[str, Tensor],
                           prefix: str, opts: _Options, self_m: _Masks, cross_m: _Masks,
                           masks: Mapping[str, Tensor] | None,
                           keys: tuple[str, ...]) -> tuple[Tensor, DecoderLayerCache]:
    eps = opts.eps
    if opts.norm_first:  # x = x + SA(LN1(x)); x = x + CA(LN2(x), mem); x = x + FF(LN3(x))
        h, norm1 = _norm(x, params, f"{prefix}norm1", eps)
        a, sa = _attention_forward(h, h, params, prefix, "self_attn", opts, self_m, masks,
                                   "dropout1")
        x = x + a
        h, norm2 = _norm(x, params, f"{prefix}norm2", eps)
        c, ca = _attention_forward(h, memory, params, prefix, "multihead_attn", opts, cross_m,
                                   masks, "dropout2")
        x = x + c
        h, norm3 = _norm(x, params, f"{prefix}norm3", eps)
        f, ff = _feedforward_forward(h, params, prefix, opts, masks, "dropout3")
        x = x + f
    else:                # x = LN1(x + SA(x)); x = LN2(x + CA(x, mem)); x = LN3(x + FF(x))
        a, sa = _attention_forward(x, x, params, prefix, "self_attn", opts, self_m, masks,
                                   "dropout1")
        x, norm1 = _norm(x + a, params, f"{prefix}norm1", eps)
        c, ca = _attention_forward(x, memory, params, prefix, "multihead_attn", opts, cross_m,
                                   masks, "dropout2")
        x, norm2 = _norm(x + c, params, f"{prefix}norm2", eps)
        f, ff = _feedforward_forward(x, params, prefix, opts, masks, "dropout3")
        x, norm3 = _norm(x + f, params, f"{prefix}norm3", eps)
    return x, DecoderLayerCache(opts.norm_first, norm1, sa, norm2, ca, norm3, ff, keys)


def _decoder_layer_backward(dout: Tensor, cache: DecoderLayerCache, prefix: str,
                            dparams: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(dx, dmemory) of the layer's input and memory."""
    if cache.norm_first:
        dh = _feedforward_backward(dout, cache.feedforward, prefix, dparams)
        dx = dout + _norm_backward(dh, cache.norm3, f"{prefix}norm3", dparams)
        dh, dmemory = _attention_backward(dx, cache.multihead_attn, prefix, "multihead_attn",
                                          dparams)
        dx = dx + _norm_backward(dh, cache.norm2, f"{prefix}norm2", dparams)
        dquery, dkv = _attention_backward(dx, cache.self_attn, prefix, "self_attn", dparams)
        return dx + _norm_backward(dquery + dkv, cache.norm1, f"{prefix}norm1",
                                   dparams), dmemory
    ds = _norm_backward(dout, cache.norm3, f"{prefix}norm3", dparams)
    dx = ds + _feedforward_backward(ds, cache.feedforward, prefix, dparams)
    ds = _norm_backward(dx, cache.norm2, f"{prefix}norm2", dparams)
    dh, dmemory = _attention_backward(ds, cache.multihead_attn, prefix, "multihead_attn",
                                      dparams)
    dx = ds + dh
    ds = _norm_backward(dx, cache.norm1, f"{prefix}norm1", dparams)
    dquery, dkv = _attention_backward(ds, cache.self_attn, prefix, "self_attn", dparams)
    return ds + dquery + dkv, dmemory


def _encoder_forward(x: Tensor, params: Mapping[str, Tensor], prefix: str, num_layers: int,
                     opts: _Options, m: _Masks, masks: Mapping[str, Tensor] | None,
                     keys: tuple[str, ...]) -> tuple[Tensor, EncoderCache]:
    layer_keys = tuple(_layer_param_shapes(False, 0, 0, _has_bias(params)))
    layers = []
    for i in range(num_layers):
        x, layer = _encoder_layer_forward(x, params, f"{prefix}layers.{i}.", opts, m, masks,
                                          layer_keys)
        layers.append(layer)
    norm = None
    if f"{prefix}norm.weight" in params:
        x, norm = _norm(x, params, f"{prefix}norm", opts.eps)
    return x, EncoderCache(tuple(layers), norm, keys)


def _encoder_backward(dout: Tensor, cache: EncoderCache, prefix: str,
                      dparams: dict[str, Tensor]) -> Tensor:
    dx = dout
    if cache.norm is not None:
        dx = _norm_backward(dx, cache.norm, f"{prefix}norm", dparams)
    for i in reversed(range(len(cache.layers))):
        dx = _encoder_layer_backward(dx, cache.layers[i], f"{prefix}layers.{i}.", dparams)
    return dx


def _decoder_forward(x: Tensor, memory: Tensor, params: Mapping[str, Tensor], prefix: str,
                     num_layers: int, opts: _Options, self_m: _Masks, cross_m: _Masks,
                     masks: Mapping[str, Tensor] | None,
                     keys: tuple[str, ...]) -> tuple[Tensor, DecoderCache]:
    layer_keys = tuple(_layer_param_shapes(True, 0, 0, _has_bias(params)))
    layers = []
    for i in range(num_layers):
        x, layer = _decoder_layer_forward(x, memory, params, f"{prefix}layers.{i}.", opts,
                                          self_m, cross_m, masks, layer_keys)
        layers.append(layer)
    norm = None
    if f"{prefix}norm.weight" in params:
        x, norm = _norm(x, params, f"{prefix}norm", opts.eps)
    return x, DecoderCache(tuple(layers), norm, keys)


def _decoder_backward(dout: Tensor, cache: DecoderCache, prefix: str,
                      dparams: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(dtgt, dmemory); every layer's cross-attention adds to dmemory."""
    dx, dmemory = dout, None
    if cache.norm is not None:
        dx = _norm_backward(dx, cache.norm, f"{prefix}norm", dparams)
    for i in reversed(range(len(cache.layers))):
        dx, dm = _decoder_layer_backward(dx, cache.layers[i], f"{prefix}layers.{i}.", dparams)
        dmemory = dm if dmemory is None else dmemory + dm
    return dx, dmemory


def _ordered(dparams: dict[str, Tensor], keys: Iterable[str]) -> dict[str, Tensor]:
    return {name: dparams[name] for name in keys}


def _check_dout(dout: object, like: Tensor) -> Tensor:
    return check_float_tensor("dout", dout, shape=tuple(like.shape), dtype=like.dtype,
                              finite=False)

# ----------------------------------------------------------------------------- functional API

_SRC_NAMES = ("src_mask", "src_key_padding_mask", "is_causal")
_TGT_NAMES = ("tgt_mask", "tgt_key_padding_mask", "tgt_is_causal")
_MEMORY_NAMES = ("memory_mask", "memory_key_padding_mask", "memory_is_causal")


@torch.no_grad()
def transformer_encoder_layer_forward(
        src: Tensor, params: Mapping[str, Tensor], *, nhead: int, src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None, is_causal: bool = False,
        activation: str = "relu", layer_norm_eps: float = 1e-5, norm_first: bool = False,
        dropout: float = 0.0, dropout_masks: Mapping[str, Tensor] | None = None
        ) -> tuple[Tensor, EncoderLayerCache]:
    """torch.nn.TransformerEncoderLayer(batch_first=True) over src (B, S, E) -> (out (B, S, E),
    cache). params: the layer's torch.nn keys ("self_attn.in_proj_weight", "linear1.weight",
    "norm1.weight", ...; no biases at all for bias=False). dropout_masks: bool keep-masks for
    "self_attn" (B, h, S, S), "dropout1", "dropout2" (B, S, E), "dropout" (B, S, F), required
    iff dropout > 0."""
    src = _check_input("src", src, "S")
    B, S, E = src.shape
    opts = _check_options(nhead, E, activation, layer_norm_eps, norm_first, dropout)
    params = _check_mapping(params)
    F_ = _feedforward_size(params, "linear1.weight")
    expected = _layer_param_shapes(False, E, F_, _has_bias(params))
    _check_params(params, expected, src.dtype)
    m = _check_masks(_SRC_NAMES, src_mask, src_key_padding_mask, is_causal, B, opts.nhead, S, S,
                     src.dtype, src.device)
    _check_masks_dict(dropout_masks, opts.dropout,
                      _layer_mask_shapes(False, B, S, S, E, opts.nhead, F_))
    return _encoder_layer_forward(src, params, "", opts, m, dropout_masks, tuple(expected))


@torch.no_grad()
def transformer_encoder_layer_backward(dout: Tensor, cache: EncoderLayerCache
                                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """(dsrc (B, S, E), dparams keyed like params) for dout (B, S, E)."""
    if not isinstance(cache, EncoderLayerCache):
        raise TypeError(f"cache: expected the EncoderLayerCache of "
                        f"transformer_encoder_layer_forward, got {type(cache).__name__}")
    _check_dout(dout, cache.self_attn.attention.q_proj.x)
    dparams: dict[str, Tensor] = {}
    dsrc = _encoder_layer_backward(dout, cache, "", dparams)
    return dsrc, _ordered(dparams, cache.param_keys)


@torch.no_grad()
def transformer_decoder_layer_forward(
        tgt: Tensor, memory: Tensor, params: Mapping[str, Tensor], *, nhead: int,
        tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, Tensor] | None = None) -> tuple[Tensor, DecoderLayerCache]:
    """torch.nn.TransformerDecoderLayer(batch_first=True) over tgt (B, T, E) and memory
    (B, S, E) -> (out (B, T, E), cache). params: the layer's torch.nn keys (the encoder
    layer's, "multihead_attn.*" and "norm3.*"). dropout_masks: "self_attn" (B, h, T, T),
    "dropout1", "multihead_attn" (B, h, T, S), "dropout2", "dropout" (B, T, F), "dropout3"."""
    tgt = _check_input("tgt", tgt, "T")
    B, T, E = tgt.shape
    memory = _check_input("memory", memory, "S", E, tgt.dtype, B, "tgt")
    S = memory.shape[1]
    opts = _check_options(nhead, E, activation, layer_norm_eps, norm_first, dropout)
    params = _check_mapping(params)
    F_ = _feedforward_size(params, "linear1.weight")
    expected = _layer_param_shapes(True, E, F_, _has_bias(params))
    _check_params(params, expected, tgt.dtype)
    self_m = _check_masks(_TGT_NAMES, tgt_mask, tgt_key_padding_mask, tgt_is_causal, B,
                          opts.nhead, T, T, tgt.dtype, tgt.device)
    cross_m = _check_masks(_MEMORY_NAMES, memory_mask, memory_key_padding_mask,
                           memory_is_causal, B, opts.nhead, T, S, tgt.dtype, tgt.device)
    _check_masks_dict(dropout_masks, opts.dropout,
                      _layer_mask_shapes(True, B, T, S, E, opts.nhead, F_))
    return _decoder_layer_forward(tgt, memory, params, "", opts, self_m, cross_m, dropout_masks,
                                  tuple(expected))


@torch.no_grad()
def transformer_decoder_layer_backward(dout: Tensor, cache: DecoderLayerCache
                                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dtgt (B, T, E), dmemory (B, S, E), dparams) for dout (B, T, E)."""
    if not isinstance(cache, DecoderLayerCache):
        raise TypeError(f"cache: expected the DecoderLayerCache of "
                        f"transformer_decoder_layer_forward, got {type(cache).__name__}")
    _check_dout(dout, cache.self_attn.attention.q_proj.x)
    dparams: dict[str, Tensor] = {}
    dtgt, dmemory = _decoder_layer_backward(dout, cache, "", dparams)
    return dtgt, dmemory, _ordered(dparams, cache.param_keys)


def _stack_expected(params: Mapping[str, Tensor], decoder: bool, num_layers: int, d_model: int
                    ) -> tuple[dict[str, tuple], int | str]:
    """The keys a stack's params must have: its layers', and the final norm's iff
    "norm.weight" is given."""
    F_ = _feedforward_size(params, "layers.0.linear1.weight")
    return _stack_param_shapes(decoder, num_layers, d_model, F_, _has_bias(params),
                               "norm.weight" in params), F_


@torch.no_grad()
def transformer_encoder_forward(
        src: Tensor, params: Mapping[str, Tensor], *, num_layers: int, nhead: int,
        mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, Tensor] | None = None) -> tuple[Tensor, EncoderCache]:
    """torch.nn.TransformerEncoder over src (B, S, E) -> (out (B, S, E), cache). params:
    "layers.{i}.<layer key>" and, for a final norm, "norm.weight" (and "norm.bias");
    dropout_masks: the layers' sites under "layers.{i}."."""
    src = _check_input("src", src, "S")
    B, S, E = src.shape
    num_layers = check_positive_int("num_layers", num_layers)
    opts = _check_options(nhead, E, activation, layer_norm_eps, norm_first, dropout)
    params = _check_mapping(params)
    expected, F_ = _stack_expected(params, False, num_layers, E)
    _check_params(params, expected, src.dtype)
    m = _check_masks(("mask", "src_key_padding_mask", "is_causal"), mask, src_key_padding_mask,
                     is_causal, B, opts.nhead, S, S, src.dtype, src.device)
    _check_masks_dict(dropout_masks, opts.dropout,
                      _stack_mask_shapes(False, num_layers, B, S, S, E, opts.nhead, F_))
    return _encoder_forward(src, params, "", num_layers, opts, m, dropout_masks,
                            tuple(expected))


@torch.no_grad()
def transformer_encoder_backward(dout: Tensor, cache: EncoderCache
                                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """(dsrc (B, S, E), dparams keyed like params) for dout (B, S, E)."""
    if not isinstance(cache, EncoderCache):
        raise TypeError(f"cache: expected the EncoderCache of transformer_encoder_forward, "
                        f"got {type(cache).__name__}")
    _check_dout(dout, cache.layers[0].self_attn.attention.q_proj.x)
    dparams: dict[str, Tensor] = {}
    dsrc = _encoder_backward(dout, cache, "", dparams)
    return dsrc, _ordered(dparams, cache.param_keys)


@torch.no_grad()
def transformer_decoder_forward(
        tgt: Tensor, memory: Tensor, params: Mapping[str, Tensor], *, num_layers: int,
        nhead: int, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
        memory_is_causal: bool = False, activation: str = "relu", layer_norm_eps: float = 1e-5,
        norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, Tensor] | None = None) -> tuple[Tensor, DecoderCache]:
    """torch.nn.TransformerDecoder over tgt (B, T, E), memory (B, S, E) -> (out (B, T, E),
    cache); params and dropout_masks keyed as transformer_encoder_forward's."""
    tgt = _check_input("tgt", tgt, "T")
    B, T, E = tgt.shape
    memory = _check_input("memory", memory, "S", E, tgt.dtype, B, "tgt")
    S = memory.shape[1]
    num_layers = check_positive_int("num_layers", num_layers)
    opts = _check_options(nhead, E, activation, layer_norm_eps, norm_first, dropout)
    params = _check_mapping(params)
    expected, F_ = _stack_expected(params, True, num_layers, E)
    _check_params(params, expected, tgt.dtype)
    self_m = _check_masks(_TGT_NAMES, tgt_mask, tgt_key_padding_mask, tgt_is_causal, B,
                          opts.nhead, T, T, tgt.dtype, tgt.device)
    cross_m = _check_masks(_MEMORY_NAMES, memory_mask, memory_key_padding_mask,
                           memory_is_causal, B, opts.nhead, T, S, tgt.dtype, tgt.device)
    _check_masks_dict(dropout_masks, opts.dropout,
                      _stack_mask_shapes(True, num_layers, B, T, S, E, opts.nhead, F_))
    return _decoder_forward(tgt, memory, params, "", num_layers, opts, self_m, cross_m,
                            dropout_masks, tuple(expected))


@torch.no_grad()
def transformer_decoder_backward(dout: Tensor, cache: DecoderCache
                                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dtgt (B, T, E), dmemory (B, S, E), dparams) for dout (B, T, E)."""
    if not isinstance(cache, DecoderCache):
        raise TypeError(f"cache: expected the DecoderCache of transformer_decoder_forward, "
                        f"got {type(cache).__name__}")
    _check_dout(dout, cache.layers[0].self_attn.attention.q_proj.x)
    dparams: dict[str, Tensor] = {}
    dtgt, dmemory = _decoder_backward(dout, cache, "", dparams)
    return dtgt, dmemory, _ordered(dparams, cache.param_keys)


@torch.no_grad()
def transformer_forward(
        src: Tensor, tgt: Tensor, params: Mapping[str, Tensor], *, nhead: int,
        num_encoder_layers: int, num_decoder_layers: int, src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None, src_is_causal: bool = False,
        tgt_is_causal: bool = False, memory_is_causal: bool = False, activation: str = "relu",
        layer_norm_eps: float = 1e-5, norm_first: bool = False, dropout: float = 0.0,
        dropout_masks: Mapping[str, Tensor] | None = None) -> tuple[Tensor, TransformerCache]:
    """torch.nn.Transformer(batch_first=True): out (B, T, E) = decoder(tgt, encoder(src)) for
    src (B, S, E), tgt (B, T, E). params: ``transformer_param_shapes``' keys; dropout_masks:
    ``transformer_dropout_mask_shapes``' keys, required iff dropout > 0."""
    src = _check_input("src", src, "S")
    B, S, E = src.shape
    tgt = _check_input("tgt", tgt, "T", E, src.dtype, B, "src")
    T = tgt.shape[1]
    opts = _check_options(nhead, E, activation, layer_norm_eps, norm_first, dropout)
    ne = check_positive_int("num_encoder_layers", num_encoder_layers)
    nd = check_positive_int("num_decoder_layers", num_decoder_layers)
    params = _check_mapping(params)
    F_ = _feedforward_size(params, "encoder.layers.0.linear1.weight")
    expected = {f"encoder.{k}": s for k, s in _stack_param_shapes(
        False, ne, E, F_, _has_bias(params), True).items()}
    expected.update({f"decoder.{k}": s for k, s in _stack_param_shapes(
        True, nd, E, F_, _has_bias(params), True).items()})
    _check_params(params, expected, src.dtype)
    src_m = _check_masks(("src_mask", "src_key_padding_mask", "src_is_causal"), src_mask,
                         src_key_padding_mask, src_is_causal, B, opts.nhead, S, S, src.dtype,
                         src.device)
    self_m = _check_masks(_TGT_NAMES, tgt_mask, tgt_key_padding_mask, tgt_is_causal, B,
                          opts.nhead, T, T, src.dtype, src.device)
    cross_m = _check_masks(_MEMORY_NAMES, memory_mask, memory_key_padding_mask,
                           memory_is_causal, B, opts.nhead, T, S, src.dtype, src.device)
    _check_masks_dict(dropout_masks, opts.dropout, transformer_dropout_mask_shapes(
        B, S, T, d_model=E, nhead=opts.nhead, num_encoder_layers=ne, num_decoder_layers=nd,
        dim_feedforward=F_))
    keys = tuple(expected)
    memory, encoder = _encoder_forward(src, params, "encoder.", ne, opts, src_m, dropout_masks,
                                       keys)
    out, decoder = _decoder_forward(tgt, memory, params, "decoder.", nd, opts, self_m, cross_m,
                                    dropout_masks, keys)
    return out, TransformerCache(encoder, decoder, keys, memory)


@torch.no_grad()
def transformer_backward(dout: Tensor, cache: TransformerCache, dmemory: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dsrc (B, S, E), dtgt (B, T, E), dparams keyed like params) for dout (B, T, E) and,
    when something else read the memory (``cache.memory``), its gradient dmemory (B, S, E):
    the memory's gradient, summed over every decoder layer, flows back through the encoder."""
    if not isinstance(cache, TransformerCache):
        raise TypeError(f"cache: expected the TransformerCache of transformer_forward, "
                        f"got {type(cache).__name__}")
    _check_dout(dout, cache.decoder.layers[0].self_attn.attention.q_proj.x)
    if dmemory is not None:
        dmemory = check_float_tensor("dmemory", dmemory, tuple(cache.memory.shape),
                                     dtype=cache.memory.dtype, finite=False)
    dparams: dict[str, Tensor] = {}
    dtgt, dmem = _decoder_backward(dout, cache.decoder, "decoder.", dparams)
    dmemory = dmem if dmemory is None else dmem + dmemory
    dsrc = _encoder_backward(dmemory, cache.encoder, "encoder.", dparams)
    return dsrc, dtgt, _ordered(dparams, cache.param_keys)

# ----------------------------------------------------------------------------- modules: blocks

# The modules keep every sequence as rows (B T, E): each projection is then one GEMM whose
# output is a fresh tensor (no view), which lets relu and the residual adds work in place
# (autograd saves neither a GEMM's output nor a dropout's), saving an allocation each.

def _drop(x: Tensor, p: float, masks: Mapping[str, Tensor] | None, name: str) -> Tensor:
    """dropout(x) = x ⊙ M / (1 - p), M the given keep-mask (B, T, width) read as rows, or one
    drawn as u >= p for u ~ U[0, 1) (as ``dropout_mask``): on the CPU a uniform draw costs
    half of ATen's Bernoulli draw, which made F.dropout ~1.4x this (fwd + bwd, seen)."""
    if p == 0.0:
        return x
    keep = torch.rand_like(x) >= p if masks is None else masks[name].reshape(x.shape)
    return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - p))


def _attend(attn: MultiheadAttention, x: Tensor, memory: Tensor, batch: int,
            self_attention: bool, m: _Masks, training: bool,
            masks: Mapping[str, Tensor] | None, site: str) -> Tensor:
    """MHA(x, memory, memory) with ``attn``'s weights for rows x (B Tq, E), memory (B Tk, E):
    self-attention's q, k, v as one GEMM, cross-attention's k, v as one; the heads are strided
    views of the GEMMs' outputs, which the attention reads in place, and its output
    (B, h, Tq, d) is laid out (B, Tq, h, d), so merging the heads is free too."""
    E, h = x.shape[1], attn.num_heads
    Tq, Tk, d = x.shape[0] // batch, memory.shape[0] // batch, E // h
    w, b = attn.in_proj_weight, attn.in_proj_bias
    if self_attention:
        q, k, v = F.linear(x, w, b).view(batch, Tq, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        q = F.linear(x, w[:E], None if b is None else b[:E]).view(batch, Tq, h, d) \
            .transpose(1, 2)
        k, v = F.linear(memory, w[E:], None if b is None else b[E:]) \
            .view(batch, Tk, 2, h, d).permute(2, 0, 3, 1, 4)
    p = attn.dropout if training else 0.0
    keep = None
    if p > 0:
        keep = masks[site] if masks is not None else \
            torch.rand(batch, h, Tq, Tk, device=x.device) >= p
    o = attention(q, k, v, AttentionMasks(m.attn_mask, m.key_padding_mask, m.causal, keep,
                                          1.0 / (1.0 - p)), 1.0 / math.sqrt(d))
    return F.linear(o.transpose(1, 2).reshape(batch * Tq, E), attn.out_proj.weight,
                    attn.out_proj.bias)


def _feedforward(layer: nn.Module, x: Tensor, p: float, masks: Mapping[str, Tensor] | None,
                 prefix: str, out_site: str) -> Tensor:
    """FF(x) = dropout_out(linear2(dropout(act(linear1(x))))) for rows x (B T, E)."""
    z = F.linear(x, layer.linear1.weight, layer.linear1.bias)
    z = torch.relu_(z) if layer.activation == "relu" else F.gelu(z)
    z = _drop(z, p, masks, prefix + "dropout")
    return _drop(F.linear(z, layer.linear2.weight, layer.linear2.bias), p, masks,
                 prefix + out_site)


def _check_weights(module: nn.Module) -> torch.dtype:
    """NaN/inf in any parameter raises naming it (one read back for all); returns their
    dtype."""
    named = list(module.named_parameters())
    check_finite_tensors((f"params[{name!r}]", w) for name, w in named)
    return named[0][1].dtype


def _module_masks(module: nn.Module, masks: object, expected: dict[str, tuple[int, ...]]
                  ) -> Mapping[str, Tensor] | None:
    """The keep-masks a module's forward uses: None in eval mode or without dropout (the
    layers then drop nothing, or draw their own), else the given dict, checked."""
    rates = [m.dropout for m in module.modules()
             if isinstance(m, (_LayerBase, MultiheadAttention))]
    p = max(rates) if module.training and rates else 0.0
    if p == 0 or masks is None:
        return None
    return _check_masks_dict(masks, p, expected)


class _LayerBase(nn.Module):
    """What the encoder and decoder layers share: torch.nn's constructor and submodules."""

    def __init__(self, decoder: bool, d_model: int, nhead: int, dim_feedforward: int,
                 dropout: float, activation: str, layer_norm_eps: float, batch_first: bool,
                 norm_first: bool, bias: bool, device: torch.device | str | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        _check_batch_first(batch_first)
        E = check_positive_int("d_model", d_model)
        self.d_model, self.nhead = E, _check_nhead(nhead, E)
        self.dim_feedforward = check_positive_int("dim_feedforward", dim_feedforward)
        self.dropout = check_probability("dropout", dropout)
        self.activation = _check_activation(activation)
        eps = _check_eps(layer_norm_eps)
        self.norm_first = _check_bool("norm_first", norm_first)
        bias = _check_bool("bias", bias)
        self.batch_first = True
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(E, self.nhead, dropout=self.dropout, bias=bias,
                                            **factory)
        if decoder:
            self.multihead_attn = MultiheadAttention(E, self.nhead, dropout=self.dropout,
                                                     bias=bias, **factory)
        self.linear1 = nn.Linear(E, self.dim_feedforward, bias=bias, **factory)
        self.linear2 = nn.Linear(self.dim_feedforward, E, bias=bias, **factory)
        self.norm1 = LayerNorm(E, eps=eps, bias=bias, **factory)
        self.norm2 = LayerNorm(E, eps=eps, bias=bias, **factory)
        if decoder:
            self.norm3 = LayerNorm(E, eps=eps, bias=bias, **factory)

    def _mask_shapes(self, batch: int, tq: int, tk: int) -> dict[str, tuple[int, ...]]:
        return _layer_mask_shapes(hasattr(self, "multihead_attn"), batch, tq, tk, self.d_model,
                                  self.nhead, self.dim_feedforward)

    def extra_repr(self) -> str:
        return (f"activation={self.activation!r}, dropout={self.dropout}, "
                f"norm_first={self.norm_first}")


class TransformerEncoderLayer(_LayerBase):
    """torch.nn.TransformerEncoderLayer (batch-first; module docstring for the equations).

    TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation="relu", layer_norm_eps=1e-5, batch_first=True, norm_first=False, bias=True, *,
    device=None, dtype=None); submodules self_attn, linear1, linear2, norm1, norm2 under
    torch.nn's names and init, so state dicts load both ways.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(False, d_model, nhead, dim_feedforward, dropout, activation,
                         layer_norm_eps, batch_first, norm_first, bias, device, dtype)

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False,
                dropout_masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """out (B, S, E) for src (B, S, E); masks as in the module docstring; dropout_masks
        keyed "self_attn", "dropout1", "dropout", "dropout2" (train mode only)."""
        dtype = _check_weights(self)
        src = _check_input("src", src, "S", self.d_model, dtype)
        B, S, _ = src.shape
        m = _check_masks(_SRC_NAMES, src_mask, src_key_padding_mask, is_causal, B, self.nhead,
                         S, S, dtype, src.device)
        masks = _module_masks(self, dropout_masks, self._mask_shapes(B, S, S))
        return self._run(src.reshape(B * S, -1), B, m, masks, "").view(src.shape)

    def _run(self, x: Tensor, batch: int, m: _Masks, masks: Mapping[str, Tensor] | None,
             prefix: str) -> Tensor:
        """The layer over rows x (B S, E)."""
        p, training = (self.dropout if self.training else 0.0), self.training
        if self.norm_first:  # x = x + SA(LN1(x)); x = x + FF(LN2(x))
            h = self.norm1(x)
            x = _drop(_attend(self.self_attn, h, h, batch, True, m, training, masks,
                              prefix + "self_attn"), p, masks, prefix + "dropout1").add_(x)
            return _feedforward(self, self.norm2(x), p, masks, prefix, "dropout2").add_(x)
        # x = LN1(x + SA(x)); x = LN2(x + FF(x))
        x = self.norm1(_drop(_attend(self.self_attn, x, x, batch, True, m, training, masks,
                                     prefix + "self_attn"), p, masks, prefix + "dropout1")
                       .add_(x))
        return self.norm2(_feedforward(self, x, p, masks, prefix, "dropout2").add_(x))


class TransformerDecoderLayer(_LayerBase):
    """torch.nn.TransformerDecoderLayer (batch-first; module docstring for the equations).

    Constructor as TransformerEncoderLayer's; submodules self_attn, multihead_attn, linear1,
    linear2, norm1, norm2, norm3.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(True, d_model, nhead, dim_feedforward, dropout, activation,
                         layer_norm_eps, batch_first, norm_first, bias, device, dtype)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False,
                dropout_masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """out (B, T, E) for tgt (B, T, E) and memory (B, S, E)."""
        dtype = _check_weights(self)
        tgt, memory, self_m, cross_m = _check_decoder_inputs(
            self, dtype, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
            memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        B, T, _ = tgt.shape
        masks = _module_masks(self, dropout_masks, self._mask_shapes(B, T, memory.shape[1]))
        return self._run(tgt.reshape(B * T, -1), memory.reshape(-1, memory.shape[2]), B,
                         self_m, cross_m, masks, "").view(tgt.shape)

    def _run(self, x: Tensor, memory: Tensor, batch: int, self_m: _Masks, cross_m: _Masks,
             masks: Mapping[str, Tensor] | None, prefix: str) -> Tensor:
        """The layer over rows x (B T, E) and memory (B S, E)."""
        p, training = (self.dropout if self.training else 0.0), self.training
        sa, ca = prefix + "self_attn", prefix + "multihead_attn"
        if self.norm_first:  # x = x + SA(LN1(x)); x = x + CA(LN2(x), mem); x = x + FF(LN3(x))
            h = self.norm1(x)
            x = _drop(_attend(self.self_attn, h, h, batch, True, self_m, training, masks, sa),
                      p, masks, prefix + "dropout1").add_(x)
            x = _drop(_attend(self.multihead_attn, self.norm2(x), memory, batch, False,
                              cross_m, training, masks, ca), p, masks,
                      prefix + "dropout2").add_(x)
            return _feedforward(self, self.norm3(x), p, masks, prefix, "dropout3").add_(x)
        # x = LN1(x + SA(x)); x = LN2(x + CA(x, mem)); x = LN3(x + FF(x))
        x = self.norm1(_drop(_attend(self.self_attn, x, x, batch, True, self_m, training,
                                     masks, sa), p, masks, prefix + "dropout1").add_(x))
        x = self.norm2(_drop(_attend(self.multihead_attn, x, memory, batch, False, cross_m,
                                     training, masks, ca), p, masks, prefix + "dropout2")
                       .add_(x))
        return self.norm3(_feedforward(self, x, p, masks, prefix, "dropout3").add_(x))


def _check_decoder_inputs(layer: _LayerBase, dtype: torch.dtype, tgt: object, memory: object,
                          tgt_mask: object, memory_mask: object, tgt_key_padding_mask: object,
                          memory_key_padding_mask: object, tgt_is_causal: object,
                          memory_is_causal: object) -> tuple[Tensor, Tensor, _Masks, _Masks]:
    tgt = _check_input("tgt", tgt, "T", layer.d_model, dtype)
    memory = _check_input("memory", memory, "S", layer.d_model, dtype, tgt.shape[0], "tgt")
    return (tgt, memory, *_check_decoder_masks(
        layer, dtype, tgt, memory.shape[1], tgt_mask, memory_mask, tgt_key_padding_mask,
        memory_key_padding_mask, tgt_is_causal, memory_is_causal))


def _check_decoder_masks(layer: _LayerBase, dtype: torch.dtype, tgt: Tensor, S: int,
                         tgt_mask: object, memory_mask: object, tgt_key_padding_mask: object,
                         memory_key_padding_mask: object, tgt_is_causal: object,
                         memory_is_causal: object) -> tuple[_Masks, _Masks]:
    """(self-attention masks, cross-attention masks) of a decoder over tgt (B, T, E) and a
    memory of length S."""
    B, T, _ = tgt.shape
    self_m = _check_masks(_TGT_NAMES, tgt_mask, tgt_key_padding_mask, tgt_is_causal, B,
                          layer.nhead, T, T, dtype, tgt.device)
    cross_m = _check_masks(_MEMORY_NAMES, memory_mask, memory_key_padding_mask,
                           memory_is_causal, B, layer.nhead, T, S, dtype, tgt.device)
    return self_m, cross_m

# ----------------------------------------------------------------------------- modules: stacks

def _check_norm(norm: object) -> nn.Module | None:
    if norm is not None and not isinstance(norm, nn.Module):
        raise TypeError(f"norm: expected a LayerNorm or None, got {type(norm).__name__}")
    return norm


class TransformerEncoder(nn.Module):
    """torch.nn.TransformerEncoder: ``num_layers`` copies of ``encoder_layer`` in turn, then
    ``norm`` (a LayerNorm) when given. TransformerEncoder(encoder_layer, num_layers,
    norm=None); state-dict keys "layers.{i}.*", "norm.*"."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise TypeError(f"encoder_layer: expected a TransformerEncoderLayer, "
                            f"got {type(encoder_layer).__name__}")
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.norm = _check_norm(norm)

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False,
                dropout_masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """out (B, S, E) for src (B, S, E); dropout_masks keyed "layers.{i}.<site>"."""
        dtype = _check_weights(self)
        layer = self.layers[0]
        src = _check_input("src", src, "S", layer.d_model, dtype)
        B, S, _ = src.shape
        m = _check_masks(("mask", "src_key_padding_mask", "is_causal"), mask,
                         src_key_padding_mask, is_causal, B, layer.nhead, S, S, dtype,
                         src.device)
        masks = _module_masks(self, dropout_masks, self._mask_shapes(B, S, S))
        return self._run(src.reshape(B * S, -1), B, m, masks, "").view(src.shape)

    def _run(self, x: Tensor, batch: int, m: _Masks, masks: Mapping[str, Tensor] | None,
             prefix: str) -> Tensor:
        """The stack over rows x (B S, E)."""
        for i, layer in enumerate(self.layers):
            x = layer._run(x, batch, m, masks, f"{prefix}layers.{i}.")
        return x if self.norm is None else self.norm(x)

    def _mask_shapes(self, batch: int, tq: int, tk: int) -> dict[str, tuple[int, ...]]:
        return {f"layers.{i}.{site}": shape for i, layer in enumerate(self.layers)
                for site, shape in layer._mask_shapes(batch, tq, tk).items()}


class TransformerDecoder(nn.Module):
    """torch.nn.TransformerDecoder: ``num_layers`` copies of ``decoder_layer`` over
    (tgt, memory), then ``norm`` when given. TransformerDecoder(decoder_layer, num_layers,
    norm=None)."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(decoder_layer, TransformerDecoderLayer):
            raise TypeError(f"decoder_layer: expected a TransformerDecoderLayer, "
                            f"got {type(decoder_layer).__name__}")
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.norm = _check_norm(norm)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False,
                dropout_masks: Mapping[str, Tensor] | None = None) -> Tensor:
        """out (B, T, E) for tgt (B, T, E) and memory (B, S, E)."""
        dtype = _check_weights(self)
        tgt, memory, self_m, cross_m = _check_decoder_inputs(
            self.layers[0], dtype, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
            memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        B, T, _ = tgt.shape
        masks = _module_masks(self, dropout_masks, self._mask_shapes(B, T, memory.shape[1]))
        return self._run(tgt.reshape(B * T, -1), memory.reshape(-1, memory.shape[2]), B,
                         self_m, cross_m, masks, "").view(tgt.shape)

    def _run(self, x: Tensor, memory: Tensor, batch: int, self_m: _Masks, cross_m: _Masks,
             masks: Mapping[str, Tensor] | None, prefix: str) -> Tensor:
        """The stack over rows x (B T, E) and memory (B S, E)."""
        for i, layer in enumerate(self.layers):
            x = layer._run(x, memory, batch, self_m, cross_m, masks, f"{prefix}layers.{i}.")
        return x if self.norm is None else self.norm(x)

    def _mask_shapes(self, batch: int, tq: int, tk: int) -> dict[str, tuple[int, ...]]:
        return {f"layers.{i}.{site}": shape for i, layer in enumerate(self.layers)
                for site, shape in layer._mask_shapes(batch, tq, tk).items()}


class Transformer(nn.Module):
    """torch.nn.Transformer (batch-first): out (B, T, E) = decoder(tgt, encoder(src)).

    Transformer(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
    dim_feedforward=2048, dropout=0.1, activation="relu", custom_encoder=None,
    custom_decoder=None, layer_norm_eps=1e-5, batch_first=True, norm_first=False, bias=True, *,
    device=None, dtype=None). ``encoder`` / ``decoder`` are a TransformerEncoder /
    TransformerDecoder with final norms (or the custom ones, which must be those classes);
    init as torch.nn: every parameter with more than one dimension Xavier-uniform.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", custom_encoder: TransformerEncoder | None = None,
                 custom_decoder: TransformerDecoder | None = None, layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_batch_first(batch_first)
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                      batch_first, norm_first, bias)
        factory = {"device": device, "dtype": dtype}
        if custom_encoder is None:
            layer = TransformerEncoderLayer(*layer_args, **factory)
            self.encoder = TransformerEncoder(layer, num_encoder_layers, LayerNorm(
                layer.d_model, eps=layer_norm_eps, bias=bias, **factory))
        elif isinstance(custom_encoder, TransformerEncoder):
            self.encoder = custom_encoder
        else:
            raise TypeError(f"custom_encoder: expected a TransformerEncoder or None, "
                            f"got {type(custom_encoder).__name__}")
        if custom_decoder is None:
            layer = TransformerDecoderLayer(*layer_args, **factory)
            self.decoder = TransformerDecoder(layer, num_decoder_layers, LayerNorm(
                layer.d_model, eps=layer_norm_eps, bias=bias, **factory))
        elif isinstance(custom_decoder, TransformerDecoder):
            self.decoder = custom_decoder
        else:
            raise TypeError(f"custom_decoder: expected a TransformerDecoder or None, "
                            f"got {type(custom_decoder).__name__}")
        self.d_model = self.encoder.layers[0].d_model
        if self.decoder.layers[0].d_model != self.d_model:
            raise ValueError(f"custom_decoder: expected d_model {self.d_model} (the encoder's), "
                             f"got {self.decoder.layers[0].d_model}")
        self.nhead = self.encoder.layers[0].nhead
        self.batch_first = True
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch.nn.Transformer's init: Xavier-uniform for every parameter of dim > 1."""
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: torch.device | str | None = None,
                                        dtype: torch.dtype | None = None) -> Tensor:
        """float (sz, sz): -inf above the diagonal (key j > query i), 0 elsewhere, as torch.nn
        (float32 on the CPU unless told)."""
        sz = check_positive_int("sz", sz)
        return torch.triu(torch.full((sz, sz), -math.inf, dtype=dtype or torch.float32,
                                     device=device or "cpu"), diagonal=1)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, src_is_causal: bool = False,
                tgt_is_causal: bool = False, memory_is_causal: bool = False,
                dropout_masks: Mapping[str, Tensor] | None = None, *,
                return_memory: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """out (B, T, E) for src (B, S, E), tgt (B, T, E); masks as in the module docstring,
        dropout_masks keyed as ``transformer_dropout_mask_shapes`` (train mode only).
        return_memory: -> (out, memory (B, S, E)), the encoder's output the decoder read.

        Validates everything once, the weights included; the layers trust it."""
        dtype = _check_weights(self)
        encoder_layer = self.encoder.layers[0]
        src = _check_input("src", src, "S", self.d_model, dtype)
        B, S, _ = src.shape
        tgt = _check_input("tgt", tgt, "T", self.d_model, dtype, B, "src")
        src_m = _check_masks(("src_mask", "src_key_padding_mask", "src_is_causal"), src_mask,
                             src_key_padding_mask, src_is_causal, B, encoder_layer.nhead, S, S,
                             dtype, src.device)
        self_m, cross_m = _check_decoder_masks(
            self.decoder.layers[0], dtype, tgt, S, tgt_mask, memory_mask, tgt_key_padding_mask,
            memory_key_padding_mask, tgt_is_causal, memory_is_causal)
        T = tgt.shape[1]
        expected = {f"encoder.{k}": s for k, s in self.encoder._mask_shapes(B, S, S).items()}
        expected.update({f"decoder.{k}": s
                         for k, s in self.decoder._mask_shapes(B, T, S).items()})
        masks = _module_masks(self, dropout_masks, expected)
        memory = self.encoder._run(src.reshape(B * S, -1), B, src_m, masks, "encoder.")
        out = self.decoder._run(tgt.reshape(B * T, -1), memory, B, self_m, cross_m, masks,
                                "decoder.").view(tgt.shape)
        return (out, memory.view(src.shape)) if return_memory else out
