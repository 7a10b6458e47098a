"""GPT in GPT-2's architecture: the explicit-cache forward/backward pair and the nn.Module.

Twin of ``reference/transformer.py`` on torch tensors. For token ids (B, T), E = n_embd,
h = n_head, d = E / h, V = vocab_size:

    x     = drop(wte[ids] + wpe[0..T-1])                          (B, T, E)
    for every block:
        q, k, v = split(LN_1(x) W_attn + b_attn)                   each (B, h, T, d)
        a       = attention(q, k, v, causal) merged to (B, T, E)
        x       = x + drop(a W_proj + b_proj)
        x       = x + drop(gelu_tanh(LN_2(x) W_fc + b_fc) W_mproj + b_mproj)
    logits = LN_f(x) wteᵀ                                         (B, T, V), head tied to wte
    loss   = cross_entropy(logits, targets, ignore_index)         mean over non-ignored targets

Weights are in GPT-2's Conv1D orientation (W (in, out), y = x W + b), under the Hugging Face
names, so a ``GPT2LMHeadModel`` state dict loads with no renaming or transposing.

``gpt_forward`` / ``gpt_backward`` chain the hand-written building blocks (no autograd); the
backward runs the chain in reverse, the residual stream adding each branch's gradient to the one
flowing past it, and wte's gradient summing its two uses. The ``GPT`` module computes the same
function under autograd: layer norm and the loss are the fused custom ops
``seqtwin::layer_norm`` and ``seqtwin::cross_entropy`` (registered hand-written backwards; both
paths share them), attention is ``kernels/attention.py``'s ``attention`` (its hand-written
backward), gelu goes through its autograd Function (which trusts its input), the Conv1D
projections and lookups are plain torch ops. Both validate their arguments once, at the entry
(``gpt_forward`` and ``GPT.forward`` the inputs and weights, ``prefill`` and ``step`` the
tokens and state); the blocks call internals, which trust them.
Generation (``GPT.init_state`` / ``prefill`` / ``step``, for the decoders): a step at position t
feeds one token per row, x = wte[token] + wpe[t]; with the KV cache each block computes only the
new q, k, v, appends k, v to the layer's cache (B, h, t + 1, d) and lets q attend over all of it
(the causal mask aligned bottom-right); without it the forward reruns on the prefix (B, t + 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import generation
from .activations import GeluCache, GeluFunction, gelu_backward, gelu_forward
from .checks import (
    check_dropout_masks,
    check_finite_tensors,
    check_float_tensor,
    check_int_tensor,
    check_positive_int,
    check_probability,
    shape_str,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward, dropout_mask
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .generation import GenerateOutput
from .kernels.attention import (
    BLOCK_K,
    AttentionCache,
    AttentionMasks,
    attention,
    attention_backward,
    attention_forward,
)
from .kernels.decode_attention import decode_attention_for
from .kernels.decode_linear import decode_linear_for
from .linear import LinearCache, linear_backward, linear_forward
from .loss import (
    CrossEntropyCache,
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_forward,
)
from .normalization import (
    LayerNormCache,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)

INIT_STD = 0.02  # GPT-2's initializer_range


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a GPT; validated on construction (ValueError/TypeError naming the field).

    ``bias=False`` drops every bias, those of the layer norms included (as nanoGPT).
    ``dropout`` is the rate of every dropout site (embeddings, attention weights, residuals).
    """
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: expected a divisor of n_embd = {self.n_embd}, "
                             f"got {self.n_head}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"layer_norm_epsilon: expected a float, got {type(eps).__name__}")
        if not eps > 0:
            raise ValueError(f"layer_norm_epsilon: expected a positive float, got {eps}")
        check_probability("dropout", self.dropout)
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(self.bias).__name__}")


def gpt_param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face GPT-2 parameter names and shapes (no ``lm_head``: it is tied to wte)."""
    E, bias = config.n_embd, config.bias
    shapes = {"transformer.wte.weight": (config.vocab_size, E),
              "transformer.wpe.weight": (config.block_size, E)}

    def add(name: str, weight: tuple[int, ...], bias_size: int) -> None:
        shapes[f"{name}.weight"] = weight
        if bias:
            shapes[f"{name}.bias"] = (bias_size,)

    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        add(f"{block}.ln_1", (E,), E)
        add(f"{block}.attn.c_attn", (E, 3 * E), 3 * E)
        add(f"{block}.attn.c_proj", (E, E), E)
        add(f"{block}.ln_2", (E,), E)
        add(f"{block}.mlp.c_fc", (E, 4 * E), 4 * E)
        add(f"{block}.mlp.c_proj", (4 * E, E), E)
    add("transformer.ln_f", (E,), E)
    return shapes


def _init_(name: str, param: Tensor, config: GPTConfig) -> None:
    """GPT-2's init: weights N(0, 0.02²), the two residual projections (``c_proj``)
    N(0, (0.02/√(2 n_layer))²), biases 0, layer-norm weights 1."""
    with torch.no_grad():
        if ".ln_" in name:
            param.fill_(1.0 if name.endswith(".weight") else 0.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            # Each block adds two c_proj outputs to the residual stream: scaling them keeps the
            # stream's variance independent of depth.
            std = INIT_STD / math.sqrt(2 * config.n_layer) if ".c_proj." in name else INIT_STD
            param.normal_(0.0, std)


def gpt_dropout_mask_shapes(config: GPTConfig, batch: int,
                            steps: int) -> dict[str, tuple[int, ...]]:
    """The dropout sites, named after Hugging Face GPT-2's dropout modules, and mask shapes."""
    B, T, E = batch, steps, config.n_embd
    shapes = {"transformer.drop": (B, T, E)}
    for i in range(config.n_layer):
        shapes[f"transformer.h.{i}.attn.attn_dropout"] = (B, config.n_head, T, T)
        shapes[f"transformer.h.{i}.attn.resid_dropout"] = (B, T, E)
        shapes[f"transformer.h.{i}.mlp.dropout"] = (B, T, E)
    return shapes


def gpt_dropout_masks(config: GPTConfig, batch: int, steps: int,
                      seed: int | torch.Generator) -> dict[str, Tensor]:
    """Bool keep-masks for every dropout site, drawn with ``dropout_mask(shape, config.dropout,
    seed)`` (a Generator's state advances, masks on its device; an int seeds one CPU Generator
    for all the masks). The reference's masks for the same seed differ."""
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Generator)):
        raise TypeError(f"seed: expected an int or a torch.Generator, got {type(seed).__name__}")
    if isinstance(seed, int):
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed}")
        seed = torch.Generator().manual_seed(seed)
    return {name: dropout_mask(shape, config.dropout, seed)
            for name, shape in gpt_dropout_mask_shapes(config, batch, steps).items()}


# ----------------------------------------------------------------------------- validation

def _check_config(config: object) -> GPTConfig:
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
    return config


def _check_params(params: object, config: GPTConfig) -> None:
    """Exactly the keys of ``gpt_param_shapes(config)``, each float with its shape, one dtype."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of tensors keyed by GPT-2 names, "
                        f"got {type(params).__name__}")
    expected = gpt_param_shapes(config)
    missing = [name for name in expected if name not in params]
    if missing:
        raise ValueError(f"params: missing key {missing[0]!r} (expected shape "
                         f"{shape_str(expected[missing[0]])}); {len(missing)} missing in all")
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"params: unexpected keys {unexpected} (config: n_layer = "
                         f"{config.n_layer}, bias = {config.bias}; the head is tied to wte)")
    dtype = None
    for name, shape in expected.items():
        check_float_tensor(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)
        dtype = params[name].dtype


def _check_inputs(ids: object, targets: object, config: GPTConfig) -> tuple[int, int]:
    """ids int (B, T) in 0..V-1 with 1 <= T <= block_size; targets None or int (B, T)
    (their values are checked by the loss, which knows ignore_index)."""
    check_int_tensor("ids", ids, shape=("B", "T"), low=0, high=config.vocab_size)
    B, T = ids.shape
    if B < 1 or not 1 <= T <= config.block_size:
        raise ValueError(f"ids: expected shape (B, T) with B >= 1 and 1 <= T <= "
                         f"{config.block_size} (config.block_size), got "
                         f"{shape_str(tuple(ids.shape))}")
    if targets is not None:
        check_int_tensor("targets", targets, shape=(B, T))
    return B, T


def _check_dropout_masks(masks: object, config: GPTConfig, batch: int, steps: int) -> None:
    check_dropout_masks(masks, config.dropout, gpt_dropout_mask_shapes(config, batch, steps),
                        "gpt_dropout_masks")


# ----------------------------------------------------------------------------- caches

class BlockCache(NamedTuple):
    ln_1: LayerNormCache             # LN_1(x)
    c_attn: LinearCache              # [q k v] = LN_1(x) W_attn + b_attn
    attn: AttentionCache             # attention(q, k, v, causal)
    c_proj: LinearCache              # a W_proj + b_proj
    resid_dropout: DropoutCache | None  # drop(.) of the attention branch
    ln_2: LayerNormCache             # LN_2(x)
    c_fc: LinearCache                # LN_2(x) W_fc + b_fc
    gelu: GeluCache                  # gelu_tanh(.)
    mlp_c_proj: LinearCache          # gelu(.) W_mproj + b_mproj
    mlp_dropout: DropoutCache | None    # drop(.) of the MLP branch


class GPTCache(NamedTuple):
    config: GPTConfig
    wte: EmbeddingCache              # wte[ids]
    wpe: EmbeddingCache              # wpe[0..T-1]
    drop: DropoutCache | None        # drop(wte[ids] + wpe); None without dropout
    blocks: tuple[BlockCache, ...]
    ln_f: LayerNormCache             # LN_f(x)
    lm_head: LinearCache             # logits = LN_f(x) wteᵀ
    loss: CrossEntropyCache | None   # cross_entropy(logits, targets); None without targets


class GPTState(NamedTuple):
    """The decoding state of ``GPT.step``; batch on dim 0 of every tensor (``select_rows``)."""
    keys: tuple[Tensor, ...] | None    # per layer, k of positions 0..t-1 (B, h, t, d)
    values: tuple[Tensor, ...] | None  # per layer, v of positions 0..t-1 (B, h, t, d)
    ids: Tensor | None                 # without the KV cache: the tokens so far (B, t)
    position: int                      # t, the number of tokens seen


# ----------------------------------------------------------------------------- functional

def _conv1d_forward(x: Tensor, weight: Tensor,
                    bias: Tensor | None) -> tuple[Tensor, LinearCache]:
    # GPT-2's Conv1D stores W as (in, out): x W + b is the linear map x (Wᵀ)ᵀ + b.
    return linear_forward(x, weight.t(), bias)


def _conv1d_backward(dy: Tensor, cache: LinearCache
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    dx, dweight_t, dbias = linear_backward(dy, cache)
    return dx, dweight_t.t().contiguous(), dbias


def _dropout(x: Tensor, p: float, masks: Mapping[str, Tensor] | None,
             name: str) -> tuple[Tensor, DropoutCache | None]:
    if masks is None:
        return x, None
    return dropout_forward(x, p, masks[name])


def _dropout_back(dy: Tensor, cache: DropoutCache | None) -> Tensor:
    return dy if cache is None else dropout_backward(dy, cache)


def _causal_masks(keep_mask: Tensor | None, p: float) -> AttentionMasks:
    """A GPT's attention masks: causal, and dropout's keep-mask M (None without dropout)."""
    return AttentionMasks(causal=True, keep_mask=keep_mask, keep_scale=1.0 / (1.0 - p))


def _block_forward(x: Tensor, params: Mapping[str, Tensor], prefix: str, config: GPTConfig,
                   masks: Mapping[str, Tensor] | None) -> tuple[Tensor, BlockCache]:
    """x + attn(LN_1(x)), then + mlp(LN_2(.)) for x (B, T, E)."""
    B, T, E = x.shape
    nh, eps, p = config.n_head, config.layer_norm_epsilon, config.dropout

    def param(name: str) -> Tensor | None:
        return params.get(f"{prefix}.{name}")

    h, ln_1 = layer_norm_forward(x, param("ln_1.weight"), param("ln_1.bias"), eps)
    qkv, c_attn = _conv1d_forward(h, param("attn.c_attn.weight"), param("attn.c_attn.bias"))
    # (B, T, 3E) -> three (B, nh, T, d) tensors: heads become a batch axis of the attention.
    q, k, v = qkv.reshape(B, T, 3, nh, E // nh).permute(2, 0, 3, 1, 4)
    attn_keep = None if masks is None else masks[f"{prefix}.attn.attn_dropout"]
    a, attn = attention_forward(q, k, v, _causal_masks(attn_keep, p), 1.0 / math.sqrt(E // nh),
                                BLOCK_K)
    a = a.transpose(1, 2).reshape(B, T, E)
    a, c_proj = _conv1d_forward(a, param("attn.c_proj.weight"), param("attn.c_proj.bias"))
    a, resid_dropout = _dropout(a, p, masks, f"{prefix}.attn.resid_dropout")
    x = x + a

    h, ln_2 = layer_norm_forward(x, param("ln_2.weight"), param("ln_2.bias"), eps)
    m, c_fc = _conv1d_forward(h, param("mlp.c_fc.weight"), param("mlp.c_fc.bias"))
    m, gelu = gelu_forward(m, approximate="tanh")
    m, mlp_c_proj = _conv1d_forward(m, param("mlp.c_proj.weight"), param("mlp.c_proj.bias"))
    m, mlp_dropout = _dropout(m, p, masks, f"{prefix}.mlp.dropout")
    return x + m, BlockCache(ln_1, c_attn, attn, c_proj, resid_dropout, ln_2, c_fc, gelu,
                             mlp_c_proj, mlp_dropout)


def _block_backward(dx: Tensor, cache: BlockCache, prefix: str, n_head: int,
                    dparams: dict[str, Tensor]) -> Tensor:
    """dx of the block's input from dx of its output; parameter gradients go into dparams."""
    B, T, E = dx.shape

    def put(name: str, dweight: Tensor, dbias: Tensor | None) -> None:
        dparams[f"{prefix}.{name}.weight"] = dweight
        if dbias is not None:
            dparams[f"{prefix}.{name}.bias"] = dbias

    # x_out = x_mid + drop(gelu(LN_2(x_mid) W_fc + b_fc) W_mproj + b_mproj)
    dm = _dropout_back(dx, cache.mlp_dropout)
    dm, dw, db = _conv1d_backward(dm, cache.mlp_c_proj)
    put("mlp.c_proj", dw, db)
    dm = gelu_backward(dm, cache.gelu)
    dh, dw, db = _conv1d_backward(dm, cache.c_fc)
    put("mlp.c_fc", dw, db)
    dh, dw, db = layer_norm_backward(dh, cache.ln_2)
    put("ln_2", dw, db)
    dx = dx + dh

    # x_mid = x_in + drop(attention(split(LN_1(x_in) W_attn + b_attn)) W_proj + b_proj)
    da = _dropout_back(dx, cache.resid_dropout)
    da, dw, db = _conv1d_backward(da, cache.c_proj)
    put("attn.c_proj", dw, db)
    da = da.reshape(B, T, n_head, E // n_head).transpose(1, 2)
    dq, dk, dv = attention_backward(da, cache.attn)
    # the inverse of the split: three (B, nh, T, d) gradients back to (B, T, 3E)
    dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * E)
    dh, dw, db = _conv1d_backward(dqkv, cache.c_attn)
    put("attn.c_attn", dw, db)
    dh, dw, db = layer_norm_backward(dh, cache.ln_1)
    put("ln_1", dw, db)
    return dx + dh


@torch.no_grad()
def gpt_forward(ids: Tensor, params: Mapping[str, Tensor], config: GPTConfig,
                targets: Tensor | None = None, ignore_index: int = -100,
                dropout_masks: Mapping[str, Tensor] | None = None
                ) -> tuple[tuple[Tensor, Tensor | None], GPTCache]:
    """GPT over ids int (B, T) in 0..V-1, T <= block_size (equations in the module docstring).

    params: ``gpt_param_shapes(config)`` names. targets int (B, T) or None; the loss is the
    mean cross-entropy over targets != ignore_index (0 if all are ignored). dropout_masks:
    bool keep-masks keyed as ``gpt_dropout_mask_shapes``, required iff config.dropout > 0.
    Returns ((logits (B, T, V), loss 0-d or None), cache).
    """
    _check_config(config)
    _check_params(params, config)
    B, T = _check_inputs(ids, targets, config)
    _check_dropout_masks(dropout_masks, config, B, T)
    p, eps = config.dropout, config.layer_norm_epsilon
    wte_weight = params["transformer.wte.weight"]

    tok, wte = embedding_forward(ids, wte_weight)
    positions = torch.arange(T, device=wte_weight.device)
    pos, wpe = embedding_forward(positions, params["transformer.wpe.weight"])
    x, drop = _dropout(tok + pos, p, dropout_masks, "transformer.drop")
    blocks = []
    for i in range(config.n_layer):
        x, block = _block_forward(x, params, f"transformer.h.{i}", config, dropout_masks)
        blocks.append(block)
    x, ln_f = layer_norm_forward(x, params["transformer.ln_f.weight"],
                                 params.get("transformer.ln_f.bias"), eps)
    logits, lm_head = linear_forward(x, wte_weight)  # tied: x wteᵀ
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    cache = GPTCache(config, wte, wpe, drop, tuple(blocks), ln_f, lm_head, loss_cache)
    return (logits, loss), cache


@torch.no_grad()
def gpt_backward(cache: GPTCache, dlogits: Tensor | None = None,
                 dloss: float | Tensor = 1.0) -> dict[str, Tensor]:
    """Gradients of L = dloss · loss + <logits, dlogits> for every parameter.

    dlogits (B, T, V) or None (zeros); dloss scales the loss gradient and is unused when the
    forward had no targets. Returns dparams keyed (and ordered) like ``gpt_param_shapes``.
    """
    if not isinstance(cache, GPTCache):
        raise TypeError(f"cache: expected the GPTCache of gpt_forward, "
                        f"got {type(cache).__name__}")
    config, head = cache.config, cache.lm_head
    wte = head.weight
    logits_shape = tuple(head.x.shape[:-1]) + (config.vocab_size,)
    if dlogits is None:
        dlogits = wte.new_zeros(logits_shape)
    else:
        check_float_tensor("dlogits", dlogits, shape=logits_shape, dtype=wte.dtype, finite=False)
    if cache.loss is not None:
        dlogits = dlogits + cross_entropy_backward(dloss, cache.loss)

    dparams: dict[str, Tensor] = {}
    dx, dwte_head, _ = linear_backward(dlogits, head)
    dx, dw, db = layer_norm_backward(dx, cache.ln_f)
    dparams["transformer.ln_f.weight"] = dw
    if db is not None:
        dparams["transformer.ln_f.bias"] = db
    for i in reversed(range(config.n_layer)):
        dx = _block_backward(dx, cache.blocks[i], f"transformer.h.{i}", config.n_head, dparams)
    dx = _dropout_back(dx, cache.drop)
    # wte is used twice, as the lookup table and as the head: its gradient sums both.
    dparams["transformer.wte.weight"] = embedding_backward(dx, cache.wte) + dwte_head
    dparams["transformer.wpe.weight"] = embedding_backward(dx.sum(dim=0), cache.wpe)
    return {name: dparams[name] for name in gpt_param_shapes(config)}


# ----------------------------------------------------------------------------- module

class _Conv1D(nn.Module):
    """GPT-2's Conv1D: y = x W + b with W (in, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 factory: dict[str, Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x_2d = x.reshape(-1, x.shape[-1])
        # addmm fuses the bias add into the matmul.
        y = x_2d @ self.weight if self.bias is None else torch.addmm(self.bias, x_2d, self.weight)
        return y.reshape(*x.shape[:-1], self.weight.shape[1])


class _LayerNorm(nn.Module):
    def __init__(self, features: int, eps: float, bias: bool, factory: dict[str, Any]) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(features, **factory))
        self.bias = nn.Parameter(torch.empty(features, **factory)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def _drop(x: Tensor, p: float, masks: Mapping[str, Tensor] | None, name: str) -> Tensor:
    return x if masks is None else dropout_forward(x, p, masks[name])[0]


class _Attention(nn.Module):
    def __init__(self, config: GPTConfig, factory: dict[str, Any]) -> None:
        super().__init__()
        E = config.n_embd
        self.n_head = config.n_head
        self.c_attn = _Conv1D(E, 3 * E, config.bias, factory)
        self.c_proj = _Conv1D(E, E, config.bias, factory)

    def forward(self, x: Tensor, p: float, masks: Mapping[str, Tensor] | None, prefix: str,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(output, (k, v)); with past (k, v) (B, h, t, d) of earlier positions the T queries
        attend over [past; new] keys (B, h, t + T, d), which are returned for the KV cache."""
        B, T, E = x.shape
        q, k, v = self.c_attn(x).reshape(B, T, 3, self.n_head, E // self.n_head) \
            .permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attn_keep = None if masks is None else masks[f"{prefix}.attn_dropout"]
        # causal is aligned bottom-right: query i (position t + i) sees keys 0..t + i
        a = attention(q, k, v, _causal_masks(attn_keep, p), 1.0 / math.sqrt(E // self.n_head))
        a = self.c_proj(a.transpose(1, 2).reshape(B, T, E))
        return _drop(a, p, masks, f"{prefix}.resid_dropout"), (k, v)


class _MLP(nn.Module):
    def __init__(self, config: GPTConfig, factory: dict[str, Any]) -> None:
        super().__init__()
        E = config.n_embd
        self.c_fc = _Conv1D(E, 4 * E, config.bias, factory)
        self.c_proj = _Conv1D(4 * E, E, config.bias, factory)

    def forward(self, x: Tensor, p: float, masks: Mapping[str, Tensor] | None,
                prefix: str) -> Tensor:
        m = self.c_proj(GeluFunction.apply(self.c_fc(x), "tanh"))
        return _drop(m, p, masks, f"{prefix}.dropout")


class _Block(nn.Module):
    def __init__(self, config: GPTConfig, factory: dict[str, Any]) -> None:
        super().__init__()
        eps, E = config.layer_norm_epsilon, config.n_embd
        self.ln_1 = _LayerNorm(E, eps, config.bias, factory)
        self.attn = _Attention(config, factory)
        self.ln_2 = _LayerNorm(E, eps, config.bias, factory)
        self.mlp = _MLP(config, factory)

    def forward(self, x: Tensor, p: float, masks: Mapping[str, Tensor] | None, prefix: str,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), p, masks, f"{prefix}.attn", past)
        x = x + a
        return x + self.mlp(self.ln_2(x), p, masks, f"{prefix}.mlp"), kv


class GPT(nn.Module):
    """A GPT-2-style language model; ``state_dict()`` has Hugging Face GPT-2's keys and
    orientation (``gpt_param_shapes``; no lm_head: it is tied to wte).

    GPT(config, *, device=None, dtype=None); initialised as GPT-2 (weights N(0, 0.02²),
    c_proj weights N(0, (0.02/√(2 n_layer))²), biases 0, layer-norm weights 1).
    """

    def __init__(self, config: GPTConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = _check_config(config)
        factory = {"device": device, "dtype": dtype}
        E = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, E, **factory),
            wpe=nn.Embedding(config.block_size, E, **factory),
            h=nn.ModuleList(_Block(config, factory) for _ in range(config.n_layer)),
            ln_f=_LayerNorm(E, config.layer_norm_epsilon, config.bias, factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            _init_(name, param, self.config)

    def forward(self, ids: Tensor, targets: Tensor | None = None, ignore_index: int = -100,
                dropout_masks: Mapping[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """ids (B, T) -> (logits (B, T, V), loss or None). Dropout only in training mode,
        with the given masks or Bernoulli(1 - p) keep-masks drawn on the device.

        The inputs and the weights (NaN/inf, named as gpt_forward's params) are validated
        here, once; the blocks call the ops' internals, which trust them."""
        config = self.config
        B, T = _check_inputs(ids, targets, config)
        check_finite_tensors((f"params[{name!r}]", w) for name, w in self.named_parameters())
        p = config.dropout if self.training else 0.0
        if p == 0:
            dropout_masks = None
        elif dropout_masks is None:
            dropout_masks = {name: torch.empty(shape, device=ids.device).bernoulli_(1.0 - p).bool()
                             for name, shape in gpt_dropout_mask_shapes(config, B, T).items()}
        else:
            _check_dropout_masks(dropout_masks, config, B, T)
        logits, _ = self._logits(ids, p, dropout_masks)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, "mean", ignore_index)
        return logits, loss

    def _logits(self, ids: Tensor, p: float = 0.0, masks: Mapping[str, Tensor] | None = None,
                start: int = 0, past: tuple[tuple[Tensor, Tensor], ...] | None = None
                ) -> tuple[Tensor, tuple[tuple[Tensor, Tensor], ...]]:
        """(logits (B, T, V), per-layer (k, v) of positions 0..start+T-1) for ids (B, T) at
        positions start..start+T-1 after the per-layer keys and values ``past``."""
        transformer = self.transformer
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = _drop(transformer.wte(ids) + transformer.wpe(positions), p, masks,
                  "transformer.drop")
        kvs = []
        for i, block in enumerate(transformer.h):
            x, kv = block(x, p, masks, f"transformer.h.{i}", None if past is None else past[i])
            kvs.append(kv)
        return transformer.ln_f(x) @ transformer.wte.weight.t(), tuple(kvs)  # head tied to wte

    # ------------------------------------------------------------------------- generation
    # A decoder feeds its ``bos`` first. To continue a prompt (B, P), P >= 2:
    #     _, state = model.prefill(prompt[:, :-1])
    #     greedy_decode(model.step, state, prompt[:, -1], max_new_tokens)
    # (P = 1: state = model.init_state(B), bos = prompt[:, 0]). Steps never use dropout, and
    # run under torch.no_grad with the state on the parameters' device.

    @torch.no_grad()
    def init_state(self, batch_size: int, kv_cache: bool = True) -> GPTState:
        """The state before any token: an empty KV cache per layer, or an empty prefix (B, 0).
        The weights are checked finite here and in ``prefill``, where a decode starts; ``step``
        trusts them (no scan per token)."""
        B = check_positive_int("batch_size", batch_size)
        check_finite_tensors((f"params[{name!r}]", w) for name, w in self.named_parameters())
        weight = self.transformer.wte.weight
        if not kv_cache:
            return GPTState(None, None, torch.zeros(B, 0, dtype=torch.int64,
                                                    device=weight.device), 0)
        nh, E = self.config.n_head, self.config.n_embd
        empty = tuple(weight.new_zeros(B, nh, 0, E // nh) for _ in range(self.config.n_layer))
        return GPTState(empty, empty, None, 0)

    @torch.no_grad()
    def prefill(self, ids: Tensor, kv_cache: bool = True) -> tuple[Tensor, GPTState]:
        """One forward over ids (B, T) -> (logits (B, T, V), the state after those T tokens)."""
        T = _check_inputs(ids, None, self.config)[1]
        check_finite_tensors((f"params[{name!r}]", w) for name, w in self.named_parameters())
        logits, kvs = self._logits(ids)
        if not kv_cache:
            return logits, GPTState(None, None, ids.long(), T)
        return logits, GPTState(tuple(k for k, _ in kvs), tuple(v for _, v in kvs), None, T)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: GPTState) -> tuple[Tensor, GPTState]:
        """tokens int (B,) at position t = state.position -> (logits (B, V), state at t + 1).

        With the KV cache only the new token's q, k, v are computed, its k, v appended to the
        cache, and its query attends over all t + 1 keys; without it, the forward reruns on
        the whole prefix (B, t + 1) and the last position's logits are returned. Checks the
        tokens and the state; the weights were checked by ``init_state`` / ``prefill``.
        """
        config = self.config
        if not isinstance(state, GPTState):
            raise TypeError(f"state: expected the GPTState of init_state or prefill, "
                            f"got {type(state).__name__}")
        rows = state.ids if state.keys is None else state.keys[0]
        check_int_tensor("tokens", tokens, shape=(rows.shape[0],), low=0,
                         high=config.vocab_size)
        t = state.position
        if t >= config.block_size:
            raise ValueError(f"tokens: position {t} is past the context, config.block_size = "
                             f"{config.block_size} (the state has seen {t} tokens)")
        tokens = tokens.long().to(rows.device)
        if state.keys is None:
            ids = torch.cat([state.ids, tokens[:, None]], dim=1)
            logits, _ = self._logits(ids)
            return logits[:, -1], GPTState(None, None, ids, t + 1)
        logits, kvs = self._logits(tokens[:, None], start=t,
                                   past=tuple(zip(state.keys, state.values)))
        return logits[:, 0], GPTState(tuple(k for k, _ in kvs), tuple(v for _, v in kvs),
                                      None, t + 1)

    # ------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: Tensor | None = None, generator: torch.Generator | None = None,
                 return_dict: bool = False, **options: Any) -> Tensor | GenerateOutput:
        """Continue the prompts ``input_ids`` (B, P) as ``transformers``' ``generate`` does
        (``generation`` module docstring for every option) -> sequences
        (B * num_return_sequences, P + L) int64, or a ``GenerateOutput`` with
        ``return_dict=True``.

        ``attention_mask`` (B, P) of 0/1 marks left padding. Options come as keywords
        (``max_new_tokens=32, num_beams=4``) or as a ``generation_config`` (seqtwin's
        ``GenerationConfig`` or transformers'), keywords winning. Sampling draws from
        ``uniforms`` (B * num_return_sequences, max_new_tokens) when given (the same tokens
        as the reference's ``generate``), else from ``generator`` or the config's ``seed``.
        ``streamer``: a callable given each step's tokens (B * num_return_sequences,), or a
        transformers streamer (``put``/``end``). Every argument and the weights are checked
        once per call; the steps check nothing."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        session = _GPTSession(self, ids.shape[1] + config.max_new_tokens - 1)
        return generation.run(session, ids, mask, config, self.config.vocab_size, uniforms,
                              streamer, return_dict)

    def generate_stream(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                        generation_config: object = None, *, uniforms: Tensor | None = None,
                        generator: torch.Generator | None = None,
                        **options: Any) -> Iterator[Tensor]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's new tokens
        (B * num_return_sequences,) int64, yielded as soon as they are chosen; a finished row
        yields ``pad_token_id``. The arguments are checked before the first ``next``."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        session = _GPTSession(self, ids.shape[1] + config.max_new_tokens - 1)
        tokens = generation.stream(session, ids, mask, config, uniforms, self.config.vocab_size)
        return generation.no_grad_iterator(tokens)

    def _decode_head(self) -> Tensor:
        """The tied head as a (E, V) copy of wteᵀ, the layout a few-row product streams
        fastest (kernels/decode_linear.py); kept while wte is unchanged (same storage and
        version counter, which every in-place update bumps)."""
        wte = self.transformer.wte.weight
        key = (wte.data_ptr(), wte._version, wte.dtype, wte.device)
        cached = getattr(self, "_decode_head_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, wte.detach().t().contiguous())
            self._decode_head_cache = cached
        return cached[1]

    def _generate_args(self, input_ids: object, attention_mask: object,
                       generation_config: object, options: dict[str, Any], uniforms: object,
                       generator: object) -> tuple:
        weight = self.transformer.wte.weight
        return generation.prepare(
            input_ids, attention_mask, generation_config, options,
            vocab_size=self.config.vocab_size, context=self.config.block_size,
            weights=((f"params[{name!r}]", w) for name, w in self.named_parameters()),
            uniforms=uniforms, generator=generator, device=weight.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``; a ``GPT2LMHeadModel`` state dict's
        ``lm_head.weight`` is accepted when it equals ``transformer.wte.weight`` (tied)."""
        if isinstance(state_dict, Mapping) and "lm_head.weight" in state_dict:
            state_dict = dict(state_dict)
            head = state_dict.pop("lm_head.weight")
            wte = state_dict.get("transformer.wte.weight")
            if wte is None or head.shape != wte.shape or not torch.equal(head.cpu(), wte.cpu()):
                raise ValueError("state_dict['lm_head.weight']: must equal "
                                 "'transformer.wte.weight' (this GPT's head is tied to wte)")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return str(self.config)


# ----------------------------------------------------------------------------- decode session

class _GPTSession:
    """``generate``'s decode session for a GPT (``generation.DecodeSession``): per layer a
    preallocated key and value cache (N, h, capacity, d), N = rows (batch x beams), written in
    place at slot t; nothing grows and a step allocates only its activations.

    With left padding each row's positions count its own tokens (``cumsum(mask) - 1``) and
    ``valid`` (N, capacity) marks the slots holding a token; a padded query attends to itself
    alone, so that no NaN reaches a cache slot that other rows' queries mask out.
    A step is a straight line of ATen calls: x = wte[token] + wpe[pos], and per block
    LN_1, the qkv GEMM, two writes into the cache, one fused attention over slots 0..t,
    the projection, LN_2, the MLP; LN_f and the tied head for the new position only.
    """

    def __init__(self, model: GPT, capacity: int) -> None:
        config = model.config
        self.config, self.capacity = config, capacity
        self.E, self.nh, self.eps = config.n_embd, config.n_head, config.layer_norm_epsilon
        t = model.transformer
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.blocks = [tuple(None if w is None else w.contiguous() for w in (
            b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
            b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
            b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias))
            for b in t.h]
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        self.head = model._decode_head()
        self.linear = decode_linear_for(self.wte)
        self.attend = decode_attention_for(self.wte)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.valid: Tensor | None = None  # (N, capacity) bool; None when nothing is padded
        self.pos = self.t = None

    @staticmethod
    def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x @ weight if bias is None else torch.addmm(bias, x, weight)

    def _head(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (self.E,), self.ln_f[0], self.ln_f[1], self.eps)
        return self.linear(x, self.head, None)

    def start(self, ids: Tensor, mask: Tensor | None, expand: int) -> Tensor:
        """The prompt's forward (B, P) -> logits (B * expand, V) at its last position; the
        caches hold its keys and values, each row repeated ``expand`` times."""
        B, P = ids.shape
        E, nh, d, N = self.E, self.nh, self.E // self.nh, B * expand
        if mask is None:
            pos = torch.arange(P, device=ids.device).expand(B, P)
            attend, causal = None, True
        else:
            pos = (mask.long().cumsum(1) - 1).clamp(min=0)
            causal_ = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
            eye = torch.eye(P, dtype=torch.bool, device=ids.device)
            attend, causal = ((causal_ & mask[:, None, :]) | eye)[:, None], False
            self.valid = torch.ones(N, self.capacity, dtype=torch.bool, device=ids.device)
            self.valid[:, :P] = mask.repeat_interleave(expand, dim=0)
        x = (F.embedding(ids, self.wte) + F.embedding(pos, self.wpe)).reshape(B * P, E)
        for w in self.blocks:
            h = F.layer_norm(x, (E,), w[0], w[1], self.eps)
            q, k, v = self._linear(h, w[2], w[3]).reshape(B, P, 3, nh, d).permute(2, 0, 3, 1, 4)
            cache_k = x.new_empty(N, nh, self.capacity, d)
            cache_v = x.new_empty(N, nh, self.capacity, d)
            cache_k.view(B, expand, nh, self.capacity, d)[:, :, :, :P] = k[:, None]
            cache_v.view(B, expand, nh, self.capacity, d)[:, :, :, :P] = v[:, None]
            self.keys.append(cache_k)
            self.values.append(cache_v)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, is_causal=causal)
            x = x + self._linear(a.transpose(1, 2).reshape(B * P, E), w[4], w[5])
            h = F.layer_norm(x, (E,), w[6], w[7], self.eps)
            m = F.gelu(self._linear(h, w[8], w[9]), approximate="tanh")
            x = x + self._linear(m, w[10], w[11])
        logits = self._head(x.reshape(B, P, E)[:, -1])
        self.t = P
        self.pos = (pos[:, -1] + 1).repeat_interleave(expand)
        return logits.repeat_interleave(expand, dim=0) if expand > 1 else logits

    def step(self, tokens: Tensor) -> Tensor:
        """One token per row (N,) at slot t -> logits (N, V)."""
        E, t = self.E, self.t
        x = F.embedding(tokens, self.wte) + F.embedding(self.pos, self.wpe)
        linear, attend, valid = self.linear, self.attend, self.valid
        for w, cache_k, cache_v in zip(self.blocks, self.keys, self.values):
            h = F.layer_norm(x, (E,), w[0], w[1], self.eps)
            a = attend(linear(h, w[2], w[3]), cache_k, cache_v, t, valid)
            x = x + linear(a, w[4], w[5])
            h = F.layer_norm(x, (E,), w[6], w[7], self.eps)
            m = F.gelu(linear(h, w[8], w[9]), approximate="tanh")
            x = x + linear(m, w[10], w[11])
        self.t = t + 1
        self.pos = self.pos + 1
        return self._head(x)

    def reorder(self, index: Tensor) -> None:
        """Row i of the state becomes row ``index[i]`` (beams), in place in the caches."""
        t = self.t
        for cache in (*self.keys, *self.values):
            cache[:, :, :t] = cache[:, :, :t].index_select(0, index)
        self.pos = self.pos.index_select(0, index)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)

