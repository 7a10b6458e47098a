"""Attention over an encoder memory for RNN seq2seq: Bahdanau (additive) and Luong (dot, general,
concat): the forward/backward pairs, their autograd Functions, the Modules.

Twin of ``reference/rnn_attention.py`` on torch tensors; forward and backward by hand.
Queries q_i (decoder states, query (B, Tq, Dq)) attend to the memory m_j (encoder outputs,
memory (B, Tk, Dm)) through a score e_ij:

    additive (Bahdanau):  e_ij = vᵀ tanh(W_q q_i + W_k m_j + b)
    Luong dot:            e_ij = q_i · m_j                               (Dq == Dm)
    Luong general:        e_ij = q_iᵀ W_a m_j = q_i · k_j,   k_j = W_a m_j
    Luong concat:         e_ij = vᵀ tanh(W_c [q_i; m_j]) = vᵀ tanh(W_cq q_i + W_cm m_j)

so concat is the additive score with W_c split by columns into [W_cq, W_cm] and no bias. Then

    a_ij = softmax_j(e_ij)      over the keys j not masked; a_ij = 0 on masked keys
    c_i  = Σ_j a_ij m_j          context (B, Tq, Dm); weights a (B, Tq, Tk)

key_padding_mask (B, Tk) bool, True = masked out (torch.nn.MultiheadAttention's convention). A
query row whose keys are all masked gets weights 0, context 0 and zero gradients, never NaN.

Backward, from dc (B, Tq, Dm) and an optional upstream gradient on the weights, dweights:

    da_ij = dc_i · m_j + dweights_ij
    dm_j  = Σ_i a_ij dc_i                                  (+ the score's path below)
    de_ij = a_ij (da_ij - Σ_k a_ik da_ik)                  (softmax; 0 wherever a_ij = 0)
    additive:  dh_ijk = de_ij v_k (1 - h_ijk²),  h = tanh(W_q q_i + W_k m_j + b)
               dq_i = W_qᵀ Σ_j dh_ij,  dm_j += W_kᵀ Σ_i dh_ij,  db = Σ_ij dh_ij
               dW_q = Σ_i (Σ_j dh_ij) q_iᵀ,  dW_k = Σ_j (Σ_i dh_ij) m_jᵀ,  dv = Σ_ij de_ij h_ij
    dot / general:  dq_i = Σ_j de_ij k_j,  dk_j = Σ_i de_ij q_i,
               general: dm_j += W_aᵀ dk_j, dW_a = Σ_j dk_j m_jᵀ;  dot: dm_j += dk_j
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .activations import SoftmaxCache, TanhCache, softmax, softmax_backward, tanh_backward
from .checks import check_float_tensor, check_positive_int, check_shape, shape_str
from .linear import LinearCache, linear_backward, linear_forward

LUONG_SCORES = ("dot", "general", "concat")


# ----------------------------------------------------------------------------- validation

def _check_query_memory(query: object, memory: object) -> tuple[int, int, int, int, int]:
    """(B, Tq, Tk, Dq, Dm) of query (B, Tq, Dq) and memory (B, Tk, Dm) of one float dtype."""
    check_float_tensor("query", query, ("B", "Tq", "Dq"))
    B, Tq, Dq = query.shape
    check_float_tensor("memory", memory, (B, "Tk", "Dm"), dtype=query.dtype)
    _, Tk, Dm = memory.shape
    if Tk < 1:
        raise ValueError(f"memory: expected at least one key (Tk >= 1), got shape "
                         f"{shape_str(tuple(memory.shape))}")
    return B, Tq, Tk, Dq, Dm


def _check_key_padding_mask(mask: object, batch: int, keys: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask: expected a bool torch.Tensor of shape "
                        f"({batch}, {keys}) (B, Tk), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = masked out), "
                        f"got {mask.dtype}")
    check_shape("key_padding_mask", tuple(mask.shape), (batch, keys))
    return mask


def _check_params(params: object, shapes: Mapping[str, tuple[int, ...]],
                  dtype: torch.dtype) -> None:
    """params must hold exactly the keys of ``shapes``, each of its shape and ``dtype``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict with keys {sorted(shapes)}, "
                        f"got {type(params).__name__}")
    unexpected = sorted(set(params) - set(shapes), key=str)
    if unexpected:
        raise ValueError(f"params: unexpected key {unexpected[0]!r} (expected keys "
                         f"{sorted(shapes)})")
    for key, shape in shapes.items():
        if key not in params:
            raise ValueError(f"params: missing key {key!r} (expected shape {shape_str(shape)})")
        check_float_tensor(f"params[{key!r}]", params[key], shape, dtype=dtype)


def _attention_size(params: object, key: str, columns: int) -> int:
    """A, read off params[key] (A, columns), the first matrix of an additive score."""
    if isinstance(params, Mapping) and key in params:
        return check_float_tensor(f"params[{key!r}]", params[key], ("A", columns),
                                  finite=False).shape[0]
    return 1  # _check_params reports the missing key or the wrong container


def _check_upstream(name: str, grad: object, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if grad is None:
        return like.new_zeros(shape)
    return check_float_tensor(name, grad, shape, dtype=like.dtype, finite=False)


# ----------------------------------------------------------------------------- shared steps

class AttendCache(NamedTuple):
    weights: Tensor  # a (B, Tq, Tk), 0 on masked keys
    memory: Tensor   # m (B, Tk, Dm)


def _attend(scores: Tensor, memory: Tensor, mask: Tensor | None
            ) -> tuple[tuple[Tensor, Tensor], AttendCache]:
    """a = masked softmax_j(e), c = a m."""
    if mask is None:
        weights = softmax(scores)
    else:
        masked = mask[:, None, :]
        # -inf gives exact zeros; a row with no key left is scored unmasked and then zeroed,
        # so it never computes 0/0. No data-dependent branch: no device sync.
        fully_masked = masked.all(dim=-1, keepdim=True)
        weights = softmax(scores.masked_fill(masked & ~fully_masked, float("-inf")))
        weights = weights.masked_fill(masked, 0.0)
    return (weights @ memory, weights), AttendCache(weights, memory)


def _attend_backward(dcontext: Tensor, dweights: Tensor, cache: AttendCache
                     ) -> tuple[Tensor, Tensor]:
    """(dscores, dmemory) of c = a m with a = softmax(e)."""
    weights, memory = cache
    dmemory = weights.transpose(1, 2) @ dcontext
    da = torch.baddbmm(dweights, dcontext, memory.transpose(1, 2))
    # de = a ⊙ (da - Σ a da) is exactly 0 on masked keys and on fully masked rows, where a = 0.
    dscores = softmax_backward(da, SoftmaxCache(weights, -1))
    return dscores, dmemory


class AdditiveScoreCache(NamedTuple):
    query_proj: LinearCache  # W_q q_i            (B, Tq, A)
    key_proj: LinearCache    # W_k m_j + b        (B, Tk, A)
    tanh: TanhCache          # h = tanh(W_q q_i + W_k m_j + b)  (B, Tq, Tk, A)
    energy: LinearCache      # e = vᵀ h           (B, Tq, Tk, 1)


def _additive_scores(query: Tensor, memory: Tensor, w_q: Tensor, w_k: Tensor, b: Tensor | None,
                     v: Tensor) -> tuple[Tensor, AdditiveScoreCache]:
    """e_ij = vᵀ tanh(W_q q_i + W_k m_j + b), (B, Tq, Tk)."""
    qw, query_proj = linear_forward(query, w_q)
    kw, key_proj = linear_forward(memory, w_k, b)
    h = torch.tanh(qw[:, :, None, :] + kw[:, None, :, :])
    scores, energy = linear_forward(h, v)
    return scores.squeeze(-1), AdditiveScoreCache(query_proj, key_proj, TanhCache(h), energy)


def _additive_scores_backward(dscores: Tensor, cache: AdditiveScoreCache) -> tuple:
    """(dquery, dmemory, dW_q, dW_k, db, dv) of the additive score."""
    dh, dv, _ = linear_backward(dscores.unsqueeze(-1), cache.energy)
    dpre = tanh_backward(dh, cache.tanh)
    # q_i reaches every key j of its row and m_j every query i: sum the broadcast axis away.
    dquery, dw_q, _ = linear_backward(dpre.sum(dim=2), cache.query_proj)
    dmemory, dw_k, db = linear_backward(dpre.sum(dim=1), cache.key_proj)
    return dquery, dmemory, dw_q, dw_k, db, dv


# ----------------------------------------------------------------------------- additive

ADDITIVE_KEYS = ("query_proj.weight", "key_proj.weight", "key_proj.bias", "energy.weight")


class AdditiveAttentionCache(NamedTuple):
    score: AdditiveScoreCache
    attend: AttendCache


@torch.no_grad()
def additive_attention_forward(query: Tensor, memory: Tensor, params: Mapping[str, Tensor],
                               key_padding_mask: Tensor | None = None
                               ) -> tuple[tuple[Tensor, Tensor], AdditiveAttentionCache]:
    """Bahdanau attention: e_ij = vᵀ tanh(W_q q_i + W_k m_j + b), a = softmax_j(e), c = a m.

    query (B, Tq, Dq), memory (B, Tk, Dm); params "query_proj.weight" W_q (A, Dq),
    "key_proj.weight" W_k (A, Dm), "key_proj.bias" b (A,), "energy.weight" v (1, A);
    key_padding_mask (B, Tk) bool, True = masked out, or None.
    Returns ((context (B, Tq, Dm), weights (B, Tq, Tk)), cache).
    """
    B, Tq, Tk, Dq, Dm = _check_query_memory(query, memory)
    A = _attention_size(params, "query_proj.weight", Dq)
    _check_params(params, {"query_proj.weight": (A, Dq), "key_proj.weight": (A, Dm),
                           "key_proj.bias": (A,), "energy.weight": (1, A)}, query.dtype)
    mask = _check_key_padding_mask(key_padding_mask, B, Tk)
    scores, score_cache = _additive_scores(query, memory, params["query_proj.weight"],
                                           params["key_proj.weight"], params["key_proj.bias"],
                                           params["energy.weight"])
    (context, weights), attend_cache = _attend(scores, memory, mask)
    return (context, weights), AdditiveAttentionCache(score_cache, attend_cache)


@torch.no_grad()
def additive_attention_backward(dcontext: Tensor | None, cache: AdditiveAttentionCache,
                                dweights: Tensor | None = None
                                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dquery (B, Tq, Dq), dmemory (B, Tk, Dm), dparams keyed like params); None = zeros."""
    weights, memory = cache.attend
    dcontext = _check_upstream("dcontext", dcontext,
                               tuple(weights.shape[:2]) + tuple(memory.shape[2:]), memory)
    dweights = _check_upstream("dweights", dweights, tuple(weights.shape), memory)
    dscores, dmemory = _attend_backward(dcontext, dweights, cache.attend)
    dquery, dmemory_score, dw_q, dw_k, db, dv = _additive_scores_backward(dscores, cache.score)
    dparams = {"query_proj.weight": dw_q, "key_proj.weight": dw_k, "key_proj.bias": db,
               "energy.weight": dv}
    return dquery, dmemory + dmemory_score, dparams


# ----------------------------------------------------------------------------- Luong

class LuongAttentionCache(NamedTuple):
    score: str                           # "dot", "general" or "concat"
    query: Tensor                        # q (B, Tq, Dq)
    keys: Tensor | None                  # k_j: m_j (dot), W_a m_j (general); None (concat)
    key_proj: LinearCache | None         # W_a m_j (general only)
    concat: AdditiveScoreCache | None    # concat only
    attend: AttendCache


def luong_param_keys(score: str) -> tuple[str, ...]:
    """The params keys of a Luong score, in the order LuongAttentionFunction takes them."""
    return {"dot": (), "general": ("weight",),
            "concat": ("concat.weight", "energy.weight")}[score]


def _luong_param_shapes(score: str, params: object, Dq: int, Dm: int
                        ) -> dict[str, tuple[int, ...]]:
    if score == "dot":
        return {}
    if score == "general":
        return {"weight": (Dq, Dm)}
    A = _attention_size(params, "concat.weight", Dq + Dm)
    return {"concat.weight": (A, Dq + Dm), "energy.weight": (1, A)}


def _check_score(score: object) -> str:
    if not isinstance(score, str) or score not in LUONG_SCORES:
        raise ValueError(f"score: expected one of {', '.join(map(repr, LUONG_SCORES))}, "
                         f"got {score!r}")
    return score


@torch.no_grad()
def luong_attention_forward(query: Tensor, memory: Tensor, params: Mapping[str, Tensor],
                            score: str = "dot", key_padding_mask: Tensor | None = None
                            ) -> tuple[tuple[Tensor, Tensor], LuongAttentionCache]:
    """Luong attention: a = softmax_j(e), c = a m, with the score e_ij

        "dot":     q_i · m_j                       params {} (needs Dq == Dm)
        "general": q_iᵀ W_a m_j                    params "weight" W_a (Dq, Dm)
        "concat":  vᵀ tanh(W_c [q_i; m_j])         params "concat.weight" W_c (A, Dq + Dm),
                                                   "energy.weight" v (1, A)

    query (B, Tq, Dq), memory (B, Tk, Dm); key_padding_mask (B, Tk) bool, True = masked out.
    Returns ((context (B, Tq, Dm), weights (B, Tq, Tk)), cache).
    """
    score = _check_score(score)
    B, Tq, Tk, Dq, Dm = _check_query_memory(query, memory)
    if score == "dot" and Dm != Dq:
        raise ValueError(f"memory: score 'dot' needs Dm == Dq = {Dq} (query.shape[2]), got "
                         f"shape {shape_str(tuple(memory.shape))}")
    _check_params(params, _luong_param_shapes(score, params, Dq, Dm), query.dtype)
    mask = _check_key_padding_mask(key_padding_mask, B, Tk)
    keys, key_proj, concat = None, None, None
    if score == "concat":
        w_c = params["concat.weight"]
        scores, concat = _additive_scores(query, memory, w_c[:, :Dq], w_c[:, Dq:], None,
                                          params["energy.weight"])
    else:
        keys, key_proj = (linear_forward(memory, params["weight"]) if score == "general"
                          else (memory, None))               # k_j = W_a m_j or m_j
        scores = query @ keys.transpose(1, 2)              # e_ij = q_i · k_j
    (context, weights), attend_cache = _attend(scores, memory, mask)
    return (context, weights), LuongAttentionCache(score, query, keys, key_proj, concat,
                                                   attend_cache)


@torch.no_grad()
def luong_attention_backward(dcontext: Tensor | None, cache: LuongAttentionCache,
                             dweights: Tensor | None = None
                             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(dquery (B, Tq, Dq), dmemory (B, Tk, Dm), dparams keyed like params); None = zeros."""
    weights, memory = cache.attend
    dcontext = _check_upstream("dcontext", dcontext,
                               tuple(weights.shape[:2]) + tuple(memory.shape[2:]), memory)
    dweights = _check_upstream("dweights", dweights, tuple(weights.shape), memory)
    dscores, dmemory = _attend_backward(dcontext, dweights, cache.attend)
    if cache.score == "concat":
        dquery, dmemory_score, dw_cq, dw_cm, _, dv = _additive_scores_backward(dscores,
                                                                               cache.concat)
        dparams = {"concat.weight": torch.cat([dw_cq, dw_cm], dim=1), "energy.weight": dv}
        return dquery, dmemory + dmemory_score, dparams
    dquery = dscores @ cache.keys                              # e_ij = q_i · k_j
    dkeys = dscores.transpose(1, 2) @ cache.query
    if cache.score == "dot":
        return dquery, dmemory + dkeys, {}
    dmemory_score, dweight, _ = linear_backward(dkeys, cache.key_proj)   # k_j = W_a m_j
    return dquery, dmemory + dmemory_score, {"weight": dweight}


# ----------------------------------------------------------------------------- autograd

class AdditiveAttentionFunction(torch.autograd.Function):
    """(context, weights) = additive attention with the hand-written backward.

    apply(query, memory, key_padding_mask, w_q, w_k, b, v): the params of
    ``additive_attention_forward`` in ADDITIVE_KEYS order; the mask gets no gradient.
    """

    @staticmethod
    def forward(ctx, query, memory, key_padding_mask, *weights):
        (context, attn), cache = additive_attention_forward(
            query, memory, dict(zip(ADDITIVE_KEYS, weights)), key_padding_mask)
        ctx.save_for_backward(query, memory, *weights)  # version-counter checks on the inputs
        ctx.cache = cache
        ctx.set_materialize_grads(False)
        return context, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, dcontext, dweights):
        _ = ctx.saved_tensors  # raises if an input was modified in place since forward
        need = ctx.needs_input_grad
        dquery, dmemory, dparams = additive_attention_backward(dcontext, ctx.cache, dweights)
        return (dquery if need[0] else None, dmemory if need[1] else None, None,
                *(dparams[key] if n else None for key, n in zip(ADDITIVE_KEYS, need[3:])))


class LuongAttentionFunction(torch.autograd.Function):
    """(context, weights) = Luong attention with the hand-written backward.

    apply(query, memory, key_padding_mask, score, *weights), weights the params of
    ``luong_attention_forward`` in ``luong_param_keys(score)`` order.
    """

    @staticmethod
    def forward(ctx, query, memory, key_padding_mask, score, *weights):
        keys = luong_param_keys(_check_score(score))
        (context, attn), cache = luong_attention_forward(
            query, memory, dict(zip(keys, weights)), score, key_padding_mask)
        ctx.save_for_backward(query, memory, *weights)  # version-counter checks on the inputs
        ctx.cache = cache
        ctx.keys = keys
        ctx.set_materialize_grads(False)
        return context, attn

    @staticmethod
    @once_differentiable
    def backward(ctx, dcontext, dweights):
        _ = ctx.saved_tensors  # raises if an input was modified in place since forward
        need = ctx.needs_input_grad
        dquery, dmemory, dparams = luong_attention_backward(dcontext, ctx.cache, dweights)
        return (dquery if need[0] else None, dmemory if need[1] else None, None, None,
                *(dparams[key] if n else None for key, n in zip(ctx.keys, need[4:])))


# ----------------------------------------------------------------------------- modules

class AdditiveAttention(nn.Module):
    """Bahdanau attention through AdditiveAttentionFunction (hand-written backward).

    AdditiveAttention(query_size, memory_size, attention_size, *, device=None, dtype=None).
    Parameters query_proj.weight (A, Dq), key_proj.weight (A, Dm), key_proj.bias (A,),
    energy.weight (1, A), held by nn.Linear submodules (so torch.nn.Linear's init).
    """

    def __init__(self, query_size: int, memory_size: int, attention_size: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.query_size = check_positive_int("query_size", query_size)
        self.memory_size = check_positive_int("memory_size", memory_size)
        self.attention_size = check_positive_int("attention_size", attention_size)
        factory = dict(device=device, dtype=dtype)
        self.query_proj = nn.Linear(query_size, attention_size, bias=False, **factory)
        self.key_proj = nn.Linear(memory_size, attention_size, **factory)
        self.energy = nn.Linear(attention_size, 1, bias=False, **factory)

    def forward(self, query: Tensor, memory: Tensor, key_padding_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """query (B, Tq, Dq), memory (B, Tk, Dm) -> (context (B, Tq, Dm), weights (B, Tq, Tk))."""
        return AdditiveAttentionFunction.apply(query, memory, key_padding_mask,
                                               self.query_proj.weight, self.key_proj.weight,
                                               self.key_proj.bias, self.energy.weight)

    def extra_repr(self) -> str:
        return f"{self.query_size}, {self.memory_size}, {self.attention_size}"


class LuongAttention(nn.Module):
    """Luong attention through LuongAttentionFunction (hand-written backward).

    LuongAttention(query_size, memory_size, score="general", attention_size=None, *,
    device=None, dtype=None). attention_size is A of the "concat" score (default query_size)
    and must be None for "dot" and "general"; "dot" needs query_size == memory_size.
    Parameters: "general": weight (Dq, Dm) ~ U(±1/sqrt(Dm)); "concat": concat.weight
    (A, Dq + Dm), energy.weight (1, A) held by nn.Linear submodules; "dot": none.
    """

    def __init__(self, query_size: int, memory_size: int, score: str = "general",
                 attention_size: int | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.query_size = Dq = check_positive_int("query_size", query_size)
        self.memory_size = Dm = check_positive_int("memory_size", memory_size)
        self.score = _check_score(score)
        if score != "concat" and attention_size is not None:
            raise ValueError(f"attention_size: only the 'concat' score has one, got "
                             f"{attention_size!r} with score {score!r}")
        if score == "dot" and Dq != Dm:
            raise ValueError(f"memory_size: score 'dot' needs memory_size == query_size = {Dq}, "
                             f"got {Dm}")
        factory = dict(device=device, dtype=dtype)
        self.attention_size = None
        if score == "general":
            self.weight = nn.Parameter(torch.empty(Dq, Dm, **factory))
            bound = 1.0 / math.sqrt(Dm)  # W_a acts on m_j, so fan_in = Dm as in nn.Linear
            nn.init.uniform_(self.weight, -bound, bound)
        elif score == "concat":
            A = Dq if attention_size is None else attention_size
            self.attention_size = A = check_positive_int("attention_size", A)
            self.concat = nn.Linear(Dq + Dm, A, bias=False, **factory)
            self.energy = nn.Linear(A, 1, bias=False, **factory)

    def forward(self, query: Tensor, memory: Tensor, key_padding_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """query (B, Tq, Dq), memory (B, Tk, Dm) -> (context (B, Tq, Dm), weights (B, Tq, Tk))."""
        weights = [self.get_parameter(key) for key in luong_param_keys(self.score)]
        return LuongAttentionFunction.apply(query, memory, key_padding_mask, self.score, *weights)

    def extra_repr(self) -> str:
        text = f"{self.query_size}, {self.memory_size}, score={self.score!r}"
        if self.attention_size is not None:
            text += f", attention_size={self.attention_size}"
        return text
