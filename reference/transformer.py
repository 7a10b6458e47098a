"""GPT in GPT-2's architecture, forward and hand-written backward through the whole model.

For token ids (B, T), E = n_embd, h = n_head, d = E / h, V = vocab_size:

    x     = drop(wte[ids] + wpe[0..T-1])                          (B, T, E)
    for every block:
        q, k, v = split(LN_1(x) W_attn + b_attn)                   each (B, h, T, d)
        a       = attention(q, k, v, causal) merged to (B, T, E)
        x       = x + drop(a W_proj + b_proj)
        x       = x + drop(gelu_tanh(LN_2(x) W_fc + b_fc) W_mproj + b_mproj)
    logits = LN_f(x) wteᵀ                                         (B, T, V), head tied to wte
    loss   = cross_entropy(logits, targets, ignore_index)         mean over non-ignored targets

attention(q, k, v, causal) = softmax(q kᵀ / √d + causal mask) v, with dropout on the weights.
Weights are in GPT-2's Conv1D orientation (W (in, out), y = x W + b), under the Hugging Face
names, so a ``GPT2LMHeadModel`` state dict loads with no renaming or transposing.

The backward runs the same chain in reverse, each step the backward of the building block that
made it (linear, layer norm, gelu, attention, dropout, embedding, cross-entropy); the residual
stream adds the gradient of each branch to the gradient flowing past it, and wte's gradient is
the sum of its two uses (the lookup and the head).
Generation (``GPT.init_state`` / ``prefill`` / ``step``, for the decoders): a step at position t
feeds one token per row, x = wte[token] + wpe[t]; with the KV cache each block computes only the
new q, k, v, appends k, v to the layer's cache (B, h, t + 1, d) and lets q attend over all of it
(the causal mask aligned bottom-right); without it the forward reruns on the prefix (B, t + 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from . import generation
from .activations import GeluCache, gelu_backward, gelu_forward, softmax
from .attention import (
    AttentionCache,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
)
from .checks import (
    check_dropout_masks,
    check_float_array,
    check_int_array,
    check_positive_int,
    check_probability,
    shape_str,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward, dropout_mask
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .generation import GenerateOutput
from .linear import LinearCache, linear_backward, linear_forward
from .loss import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .module import Module
from .normalization import LayerNormCache, layer_norm_backward, layer_norm_forward

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


def _init_params(config: GPTConfig, rng: np.random.Generator,
                 dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """GPT-2's init: weights N(0, 0.02²), the two residual projections (``c_proj``)
    N(0, (0.02/√(2 n_layer))²), biases 0, layer-norm weights 1."""
    params = {}
    for name, shape in gpt_param_shapes(config).items():
        if ".ln_" in name:
            value = np.ones(shape) if name.endswith(".weight") else np.zeros(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            # Each block adds two c_proj outputs to the residual stream: scaling them keeps the
            # stream's variance independent of depth.
            std = INIT_STD / np.sqrt(2 * config.n_layer) if ".c_proj." in name else INIT_STD
            value = rng.normal(0.0, std, shape)
        params[name] = value.astype(dtype)
    return params


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
                      seed: int | np.random.Generator) -> dict[str, np.ndarray]:
    """Bool keep-masks for every dropout site, drawn with ``dropout_mask(shape, config.dropout,
    seed)`` (a Generator's state advances; an int seeds one Generator for all the masks)."""
    rng = np.random.default_rng(seed)
    return {name: dropout_mask(shape, config.dropout, rng)
            for name, shape in gpt_dropout_mask_shapes(config, batch, steps).items()}


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
    """The decoding state of ``GPT.step``; batch on axis 0 of every array (``select_rows``)."""
    keys: tuple[np.ndarray, ...] | None    # per layer, k of positions 0..t-1 (B, h, t, d)
    values: tuple[np.ndarray, ...] | None  # per layer, v of positions 0..t-1 (B, h, t, d)
    ids: np.ndarray | None                 # without the KV cache: the tokens so far (B, t)
    position: int                          # t, the number of tokens seen


# ----------------------------------------------------------------------------- Conv1D

def _conv1d_forward(x: np.ndarray, weight: np.ndarray,
                    bias: np.ndarray | None) -> tuple[np.ndarray, LinearCache]:
    # GPT-2's Conv1D stores W as (in, out): x W + b is the linear map x (Wᵀ)ᵀ + b.
    return linear_forward(x, weight.T, bias)


def _conv1d_backward(dy: np.ndarray, cache: LinearCache
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    dx, dweight_t, dbias = linear_backward(dy, cache)
    return dx, np.ascontiguousarray(dweight_t.T), dbias


def _dropout(x: np.ndarray, p: float, masks: Mapping[str, np.ndarray] | None,
             name: str) -> tuple[np.ndarray, DropoutCache | None]:
    if masks is None:
        return x, None
    return dropout_forward(x, p, masks[name])


def _dropout_back(dy: np.ndarray, cache: DropoutCache | None) -> np.ndarray:
    return dy if cache is None else dropout_backward(dy, cache)


# ----------------------------------------------------------------------------- block

def _block_forward(x: np.ndarray, params: Mapping[str, np.ndarray], prefix: str,
                   config: GPTConfig, masks: Mapping[str, np.ndarray] | None,
                   past: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, BlockCache]:
    """x + attn(LN_1(x)), then + mlp(LN_2(.)) for x (B, T, E).

    past: the keys and values (B, h, t, d) of t earlier positions (a KV cache): the T queries
    attend over [past; new] (B, h, t + T, d), kept in the cache's ``attn.k`` / ``attn.v``.
    """
    B, T, E = x.shape
    nh, eps, p = config.n_head, config.layer_norm_epsilon, config.dropout

    def param(name: str) -> np.ndarray | None:
        return params.get(f"{prefix}.{name}")

    h, ln_1 = layer_norm_forward(x, param("ln_1.weight"), param("ln_1.bias"), eps)
    qkv, c_attn = _conv1d_forward(h, param("attn.c_attn.weight"), param("attn.c_attn.bias"))
    # (B, T, 3E) -> three (B, nh, T, d) tensors: heads become a batch axis of the attention.
    q, k, v = qkv.reshape(B, T, 3, nh, E // nh).transpose(2, 0, 3, 1, 4)
    if past is not None:
        k, v = np.concatenate([past[0], k], axis=2), np.concatenate([past[1], v], axis=2)
    # causal is aligned bottom-right: query i (position t + i) sees keys 0..t + i
    attn_keep = None if masks is None else masks[f"{prefix}.attn.attn_dropout"]
    a, attn = scaled_dot_product_attention_forward(q, k, v, causal=True,
                                                   dropout=p, dropout_mask=attn_keep)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, E)
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


def _block_backward(dx: np.ndarray, cache: BlockCache, prefix: str, n_head: int,
                    dparams: dict[str, np.ndarray]) -> np.ndarray:
    """dx of the block's input from dx of its output; parameter gradients go into dparams."""
    B, T, E = dx.shape

    def put(name: str, dweight: np.ndarray, dbias: np.ndarray | None) -> None:
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
    da = da.reshape(B, T, n_head, E // n_head).transpose(0, 2, 1, 3)
    dq, dk, dv = scaled_dot_product_attention_backward(da, cache.attn)
    # the inverse of the split: three (B, nh, T, d) gradients back to (B, T, 3E)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * E)
    dh, dw, db = _conv1d_backward(dqkv, cache.c_attn)
    put("attn.c_attn", dw, db)
    dh, dw, db = layer_norm_backward(dh, cache.ln_1)
    put("ln_1", dw, db)
    return dx + dh


# ----------------------------------------------------------------------------- model

def _check_params(params: object, config: GPTConfig) -> None:
    """Exactly the keys of ``gpt_param_shapes(config)``, each float with its shape, one dtype."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays keyed by GPT-2 names, "
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
        check_float_array(f"params[{name!r}]", params[name], shape=shape, dtype=dtype)
        dtype = params[name].dtype


def _check_dropout_masks(masks: object, config: GPTConfig, batch: int, steps: int) -> None:
    check_dropout_masks(masks, config.dropout, gpt_dropout_mask_shapes(config, batch, steps),
                        "gpt_dropout_masks")


def _check_ids(ids: object, config: GPTConfig) -> tuple[int, int]:
    check_int_array("ids", ids, shape=("B", "T"), low=0, high=config.vocab_size)
    B, T = ids.shape
    if B < 1 or not 1 <= T <= config.block_size:
        raise ValueError(f"ids: expected shape (B, T) with B >= 1 and 1 <= T <= "
                         f"{config.block_size} (config.block_size), got {shape_str(ids.shape)}")
    return B, T


def gpt_forward(ids: np.ndarray, params: Mapping[str, np.ndarray], config: GPTConfig,
                targets: np.ndarray | None = None, ignore_index: int = -100,
                dropout_masks: Mapping[str, np.ndarray] | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray | None], GPTCache]:
    """GPT over ids int (B, T) in 0..V-1, T <= block_size (equations in the module docstring).

    params: ``gpt_param_shapes(config)`` names. targets int (B, T) or None; the loss is the
    mean cross-entropy over targets != ignore_index (0 if all are ignored). dropout_masks:
    bool keep-masks keyed as ``gpt_dropout_mask_shapes``, required iff config.dropout > 0.
    Returns ((logits (B, T, V), loss 0-d or None), cache).
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
    _check_params(params, config)
    B, T = _check_ids(ids, config)
    if targets is not None:
        check_int_array("targets", targets, shape=(B, T))
    _check_dropout_masks(dropout_masks, config, B, T)
    return _gpt_forward(ids, params, config, targets, ignore_index, dropout_masks)


def _gpt_forward(ids: np.ndarray, params: Mapping[str, np.ndarray], config: GPTConfig,
                 targets: np.ndarray | None = None, ignore_index: int = -100,
                 dropout_masks: Mapping[str, np.ndarray] | None = None, start: int = 0,
                 past: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None
                 ) -> tuple[tuple[np.ndarray, np.ndarray | None], GPTCache]:
    """gpt_forward on trusted inputs, for ids at positions start..start+T-1 after the per-layer
    keys and values ``past`` of positions 0..start-1 (None: start = 0, no past)."""
    T = ids.shape[1]
    p, eps = config.dropout, config.layer_norm_epsilon

    tok, wte = embedding_forward(ids, params["transformer.wte.weight"])
    pos, wpe = embedding_forward(np.arange(start, start + T), params["transformer.wpe.weight"])
    x, drop = _dropout(tok + pos, p, dropout_masks, "transformer.drop")
    blocks = []
    for i in range(config.n_layer):
        x, block = _block_forward(x, params, f"transformer.h.{i}", config, dropout_masks,
                                  None if past is None else past[i])
        blocks.append(block)
    x, ln_f = layer_norm_forward(x, params["transformer.ln_f.weight"],
                                 params.get("transformer.ln_f.bias"), eps)
    logits, lm_head = linear_forward(x, params["transformer.wte.weight"])  # tied: x wteᵀ
    loss, loss_cache = None, None
    if targets is not None:
        loss, loss_cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
    cache = GPTCache(config, wte, wpe, drop, tuple(blocks), ln_f, lm_head, loss_cache)
    return (logits, loss), cache


def gpt_backward(cache: GPTCache, dlogits: np.ndarray | None = None,
                 dloss: float | np.ndarray = 1.0) -> dict[str, np.ndarray]:
    """Gradients of L = dloss · loss + <logits, dlogits> for every parameter.

    dlogits (B, T, V) or None (zeros); dloss scales the loss gradient and is unused when the
    forward had no targets. Returns dparams keyed (and ordered) like ``gpt_param_shapes``.
    """
    if not isinstance(cache, GPTCache):
        raise TypeError(f"cache: expected the GPTCache of gpt_forward, "
                        f"got {type(cache).__name__}")
    config, head = cache.config, cache.lm_head
    wte = head.weight
    logits_shape = head.x.shape[:-1] + (config.vocab_size,)
    if dlogits is None:
        dlogits = np.zeros(logits_shape, dtype=wte.dtype)
    else:
        check_float_array("dlogits", dlogits, shape=logits_shape, dtype=wte.dtype, finite=False)
    if cache.loss is not None:
        dlogits = dlogits + cross_entropy_backward(dloss, cache.loss)

    dparams: dict[str, np.ndarray] = {}
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
    dparams["transformer.wpe.weight"] = embedding_backward(dx.sum(axis=0), cache.wpe)
    return {name: dparams[name] for name in gpt_param_shapes(config)}


class GPT(Module):
    """A GPT-2-style language model in NumPy, with ``backward``.

    GPT(config, dtype=np.float64, seed=None); params under Hugging Face GPT-2 names
    (``gpt_param_shapes``), initialised as GPT-2 (``_init_params``).
    """

    def __init__(self, config: GPTConfig, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.rng = np.random.default_rng(seed)
        self.params = _init_params(config, self.rng, self.dtype)
        self.zero_grad()
        self._cache: GPTCache | None = None

    def forward(self, ids: np.ndarray, targets: np.ndarray | None = None,
                ignore_index: int = -100,
                dropout_masks: Mapping[str, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """ids (B, T) -> (logits (B, T, V), loss or None). Dropout only in training mode,
        with the given masks or masks drawn from the model's Generator."""
        config = self.config
        if not self.training or config.dropout == 0:
            config, dropout_masks = dataclasses.replace(config, dropout=0.0), None
        elif dropout_masks is None:
            check_int_array("ids", ids, shape=("B", "T"))
            dropout_masks = gpt_dropout_masks(config, ids.shape[0], ids.shape[1], self.rng)
        (logits, loss), self._cache = gpt_forward(ids, self.params, config, targets,
                                                  ignore_index, dropout_masks)
        return logits, loss

    __call__ = forward

    def backward(self, dloss: float | np.ndarray = 1.0,
                 dlogits: np.ndarray | None = None) -> None:
        """Fills ``self.grads`` with the gradients of dloss · loss + <logits, dlogits>."""
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        self.grads = gpt_backward(cache, dlogits, dloss)

    # ------------------------------------------------------------------------- generation
    # A decoder feeds its ``bos`` first. To continue a prompt (B, P), P >= 2:
    #     _, state = model.prefill(prompt[:, :-1])
    #     greedy_decode(model.step, state, prompt[:, -1], max_new_tokens)
    # (P = 1: state = model.init_state(B), bos = prompt[:, 0]). Steps never use dropout.

    def init_state(self, batch_size: int, kv_cache: bool = True) -> GPTState:
        """The state before any token: an empty KV cache per layer, or an empty prefix (B, 0).
        The weights are checked finite here, as every forward (``prefill``, ``step``) checks
        them."""
        B = check_positive_int("batch_size", batch_size)
        for name, w in self.params.items():
            check_float_array(f"params[{name!r}]", w)
        if not kv_cache:
            return GPTState(None, None, np.zeros((B, 0), dtype=np.int64), 0)
        nh, E = self.config.n_head, self.config.n_embd
        empty = tuple(np.zeros((B, nh, 0, E // nh), dtype=self.dtype)
                      for _ in range(self.config.n_layer))
        return GPTState(empty, empty, None, 0)

    def prefill(self, ids: np.ndarray, kv_cache: bool = True) -> tuple[np.ndarray, GPTState]:
        """One forward over ids (B, T) -> (logits (B, T, V), the state after those T tokens)."""
        config = dataclasses.replace(self.config, dropout=0.0)
        T = _check_ids(ids, config)[1]
        for name, w in self.params.items():
            check_float_array(f"params[{name!r}]", w)
        (logits, _), cache = _gpt_forward(ids, self.params, config)
        if not kv_cache:
            return logits, GPTState(None, None, ids.astype(np.int64), T)
        return logits, GPTState(tuple(block.attn.k for block in cache.blocks),
                                tuple(block.attn.v for block in cache.blocks), None, T)

    def step(self, tokens: np.ndarray, state: GPTState) -> tuple[np.ndarray, GPTState]:
        """tokens int (B,) at position t = state.position -> (logits (B, V), state at t + 1).

        With the KV cache only the new token's q, k, v are computed, its k, v appended to the
        cache, and its query attends over all t + 1 keys; without it, the forward reruns on
        the whole prefix (B, t + 1) and the last position's logits are returned.
        """
        config = dataclasses.replace(self.config, dropout=0.0)
        if not isinstance(state, GPTState):
            raise TypeError(f"state: expected the GPTState of init_state or prefill, "
                            f"got {type(state).__name__}")
        rows = state.ids if state.keys is None else state.keys[0]
        check_int_array("tokens", tokens, shape=(rows.shape[0],), low=0, high=config.vocab_size)
        t = state.position
        if t >= config.block_size:
            raise ValueError(f"tokens: position {t} is past the context, config.block_size = "
                             f"{config.block_size} (the state has seen {t} tokens)")
        if state.keys is None:
            ids = np.concatenate([state.ids, tokens[:, None].astype(np.int64)], axis=1)
            (logits, _), _ = _gpt_forward(ids, self.params, config)
            return logits[:, -1], GPTState(None, None, ids, t + 1)
        (logits, _), cache = _gpt_forward(tokens[:, None], self.params, config, start=t,
                                          past=tuple(zip(state.keys, state.values)))
        return logits[:, 0], GPTState(tuple(block.attn.k for block in cache.blocks),
                                      tuple(block.attn.v for block in cache.blocks), None, t + 1)

    # ------------------------------------------------------------------------- generate

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 generation_config: object = None, *, streamer: object = None,
                 uniforms: np.ndarray | None = None,
                 generator: np.random.Generator | None = None, return_dict: bool = False,
                 **options: Any) -> np.ndarray | GenerateOutput:
        """Continue the prompts ``input_ids`` (B, P) as ``transformers``' ``generate`` does
        (``generation`` module docstring for every option) -> sequences
        (B * num_return_sequences, P + L) int64, or a ``GenerateOutput`` with
        ``return_dict=True``.

        ``attention_mask`` (B, P) of 0/1 marks left padding. Options come as keywords
        (``max_new_tokens=32, num_beams=4``) or as a ``generation_config`` (seqtwin's
        ``GenerationConfig`` or transformers'), keywords winning. Sampling draws from
        ``uniforms`` (B * num_return_sequences, max_new_tokens) when given, else from
        ``generator`` or the config's ``seed``. ``streamer``: a callable given each step's
        tokens, or a transformers-style streamer (``put``/``end``). Every argument and the
        weights are checked once per call; the steps check nothing."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        session = _GPTSession(self, ids.shape[1] + config.max_new_tokens - 1)
        return generation.run(session, ids, mask, config, self.config.vocab_size, uniforms,
                              streamer, return_dict)

    def generate_stream(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                        generation_config: object = None, *, uniforms: np.ndarray | None = None,
                        generator: np.random.Generator | None = None,
                        **options: Any) -> Iterator[np.ndarray]:
        """``generate``'s greedy decoding or sampling as an iterator of each step's new tokens
        (B * num_return_sequences,) int64, yielded as soon as they are chosen; a finished row
        yields ``pad_token_id``. The arguments are checked before the first ``next``."""
        config, ids, mask, uniforms = self._generate_args(
            input_ids, attention_mask, generation_config, options, uniforms, generator)
        session = _GPTSession(self, ids.shape[1] + config.max_new_tokens - 1)
        return generation.stream(session, ids, mask, config, uniforms, self.config.vocab_size)

    def _generate_args(self, input_ids: object, attention_mask: object,
                       generation_config: object, options: dict[str, Any], uniforms: object,
                       generator: object) -> tuple:
        def weights() -> None:
            for name, w in self.params.items():
                check_float_array(f"params[{name!r}]", w)

        return generation.prepare(
            input_ids, attention_mask, generation_config, options,
            vocab_size=self.config.vocab_size, context=self.config.block_size,
            weights=weights, uniforms=uniforms, generator=generator)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As ``Module.load_state_dict``; a ``GPT2LMHeadModel`` state dict's ``lm_head.weight``
        is accepted when it equals ``transformer.wte.weight`` (the tied head)."""
        if isinstance(state_dict, Mapping) and "lm_head.weight" in state_dict:
            state_dict = dict(state_dict)
            head = _as_numpy(state_dict.pop("lm_head.weight"))
            wte = _as_numpy(state_dict.get("transformer.wte.weight"))
            if wte is None or head.shape != wte.shape or not np.array_equal(head, wte):
                raise ValueError("state_dict['lm_head.weight']: must equal "
                                 "'transformer.wte.weight' (this GPT's head is tied to wte)")
        super().load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"GPT({self.config})"


def _as_numpy(value: Any) -> np.ndarray | None:
    if value is not None and hasattr(value, "detach"):  # a torch tensor, read without torch
        value = value.detach().cpu().numpy()
    return None if value is None else np.asarray(value)


# ----------------------------------------------------------------------------- decode session

def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None
            ) -> np.ndarray:
    """softmax(q kᵀ / √d, keys where ``allowed`` (broadcast to (N, h, Tq, Tk))) v."""
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]).astype(q.dtype)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return softmax(scores) @ v


class _GPTSession:
    """``generate``'s decode session for a GPT (``generation.DecodeSession``): per layer a
    preallocated key and value cache (N, h, capacity, d), N = rows (batch x beams), written in
    place at slot t.

    With left padding each row's positions count its own tokens (``cumsum(mask) - 1``) and
    ``valid`` (N, capacity) marks the slots holding a token; a padded query attends to itself
    alone, so that its output stays finite. A step: x = wte[token] + wpe[pos], per block
    LN_1, the qkv product, the new k, v written at slot t, attention over slots 0..t, the
    projection, LN_2, the MLP; LN_f and the tied head for the new position only.
    """

    def __init__(self, model: GPT, capacity: int) -> None:
        self.config, self.capacity, self.params = model.config, capacity, model.params
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.valid: np.ndarray | None = None  # (N, capacity); None when nothing is padded
        self.pos: np.ndarray | None = None
        self.t = 0

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        bias = self.params.get(f"{name}.bias")
        y = x @ self.params[f"{name}.weight"]
        return y if bias is None else y + bias

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm_forward(x, self.params.get(f"{name}.weight"),
                                  self.params.get(f"{name}.bias"),
                                  self.config.layer_norm_epsilon)[0]

    def _block(self, x: np.ndarray, i: int, attend: Any) -> np.ndarray:
        """x + attn(LN_1(x)) + mlp(LN_2(.)) for x (N, T, E); ``attend(q, k, v)`` writes the
        new k, v into layer i's cache and returns the attention (N, h, T, d)."""
        N, T, E = x.shape
        nh, prefix = self.config.n_head, f"transformer.h.{i}"
        qkv = self._linear(self._norm(x, f"{prefix}.ln_1"), f"{prefix}.attn.c_attn")
        q, k, v = qkv.reshape(N, T, 3, nh, E // nh).transpose(2, 0, 3, 1, 4)
        a = attend(i, q, k, v).transpose(0, 2, 1, 3).reshape(N, T, E)
        x = x + self._linear(a, f"{prefix}.attn.c_proj")
        m = self._linear(self._norm(x, f"{prefix}.ln_2"), f"{prefix}.mlp.c_fc")
        m = gelu_forward(m, approximate="tanh")[0]
        return x + self._linear(m, f"{prefix}.mlp.c_proj")

    def _head(self, x: np.ndarray) -> np.ndarray:
        return self._norm(x, "transformer.ln_f") @ self.params["transformer.wte.weight"].T

    def start(self, ids: np.ndarray, mask: np.ndarray | None, expand: int) -> np.ndarray:
        """The prompt's forward (B, P) -> logits (B * expand, V) at its last position; the
        caches hold its keys and values, each row repeated ``expand`` times."""
        B, P = ids.shape
        config, params = self.config, self.params
        nh, d = config.n_head, config.n_embd // config.n_head
        causal = np.tril(np.ones((P, P), dtype=bool))
        if mask is None:
            pos = np.broadcast_to(np.arange(P), (B, P))
            allowed = causal
        else:
            pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            allowed = ((causal & mask[:, None, :]) | np.eye(P, dtype=bool))[:, None]
            self.valid = np.ones((B * expand, self.capacity), dtype=bool)
            self.valid[:, :P] = np.repeat(mask, expand, axis=0)
        dtype = params["transformer.wte.weight"].dtype

        def attend(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            for cache, new in ((self.keys, k), (self.values, v)):
                full = np.empty((B * expand, nh, self.capacity, d), dtype=dtype)
                full[:, :, :P] = np.repeat(new, expand, axis=0)
                cache.append(full)
            return _attend(q, k, v, allowed)

        x = params["transformer.wte.weight"][ids] + params["transformer.wpe.weight"][pos]
        for i in range(config.n_layer):
            x = self._block(x, i, attend)
        self.t, self.pos = P, np.repeat(pos[:, -1] + 1, expand)
        return np.repeat(self._head(x[:, -1]), expand, axis=0)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One token per row (N,) at slot t -> logits (N, V)."""
        t, params = self.t, self.params
        allowed = None if self.valid is None else self.valid[:, None, None, :t + 1]

        def attend(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            self.keys[i][:, :, t:t + 1] = k
            self.values[i][:, :, t:t + 1] = v
            return _attend(q, self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1],
                           allowed)

        x = (params["transformer.wte.weight"][tokens]
             + params["transformer.wpe.weight"][self.pos])[:, None]
        for i in range(self.config.n_layer):
            x = self._block(x, i, attend)
        self.t, self.pos = t + 1, self.pos + 1
        return self._head(x[:, 0])

    def reorder(self, index: np.ndarray) -> None:
        """Row i of the state becomes row ``index[i]`` (beams)."""
        t = self.t
        for cache in (*self.keys, *self.values):
            cache[:, :, :t] = cache[index, :, :t]
        self.pos = self.pos[index]
        if self.valid is not None:
            self.valid = self.valid[index]
