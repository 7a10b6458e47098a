"""Attention over an encoder memory for RNN seq2seq: Bahdanau (additive) and Luong (dot, general,
concat), each a forward/backward pair, and the model classes that wrap them.

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

from typing import Any, Mapping, NamedTuple

import numpy as np

from .activations import SoftmaxCache, TanhCache, softmax, softmax_backward, tanh_backward
from .checks import check_float_array, check_positive_int, check_shape, shape_str
from .linear import LinearCache, linear_backward, linear_forward
from .module import Module

LUONG_SCORES = ("dot", "general", "concat")


# ----------------------------------------------------------------------------- validation

def _check_query_memory(query: object, memory: object) -> tuple[int, int, int, int, int]:
    """(B, Tq, Tk, Dq, Dm) of query (B, Tq, Dq) and memory (B, Tk, Dm) of one float dtype."""
    check_float_array("query", query, ("B", "Tq", "Dq"))
    B, Tq, Dq = query.shape
    check_float_array("memory", memory, (B, "Tk", "Dm"), dtype=query.dtype)
    _, Tk, Dm = memory.shape
    if Tk < 1:
        raise ValueError(f"memory: expected at least one key (Tk >= 1), got shape "
                         f"{shape_str(memory.shape)}")
    return B, Tq, Tk, Dq, Dm


def _check_key_padding_mask(mask: object, batch: int, keys: int) -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"key_padding_mask: expected a bool numpy.ndarray of shape "
                        f"({batch}, {keys}) (B, Tk), got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"key_padding_mask: expected dtype bool (True = masked out), "
                        f"got {mask.dtype}")
    check_shape("key_padding_mask", mask.shape, (batch, keys))
    return mask


def _check_params(params: object, shapes: Mapping[str, tuple[int, ...]],
                  dtype: np.dtype) -> None:
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
        check_float_array(f"params[{key!r}]", params[key], shape, dtype=dtype)


def _attention_size(params: object, key: str, columns: int) -> int:
    """A, read off params[key] (A, columns), the first matrix of an additive score."""
    if isinstance(params, Mapping) and key in params:
        return check_float_array(f"params[{key!r}]", params[key], ("A", columns),
                                 finite=False).shape[0]
    return 1  # _check_params reports the missing key or the wrong container


def _check_upstream(name: str, grad: object, shape: tuple[int, ...],
                    dtype: np.dtype) -> np.ndarray:
    if grad is None:
        return np.zeros(shape, dtype)
    return check_float_array(name, grad, shape, dtype=dtype, finite=False)


# ----------------------------------------------------------------------------- shared steps

class AttendCache(NamedTuple):
    weights: np.ndarray  # a (B, Tq, Tk), 0 on masked keys
    memory: np.ndarray   # m (B, Tk, Dm)


def _attend(scores: np.ndarray, memory: np.ndarray, mask: np.ndarray | None
            ) -> tuple[tuple[np.ndarray, np.ndarray], AttendCache]:
    """a = masked softmax_j(e), c = a m."""
    if mask is None:
        weights = softmax(scores)
    else:
        masked = mask[:, None, :]
        # -inf gives exact zeros; a row with no key left is scored unmasked and then zeroed,
        # so it never computes 0/0.
        fully_masked = masked.all(axis=-1, keepdims=True)
        weights = softmax(np.where(masked & ~fully_masked, -np.inf, scores))
        weights = np.where(masked, 0.0, weights).astype(scores.dtype)
    return (weights @ memory, weights), AttendCache(weights, memory)


def _attend_backward(dcontext: np.ndarray, dweights: np.ndarray, cache: AttendCache
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(dscores, dmemory) of c = a m with a = softmax(e)."""
    weights, memory = cache
    dmemory = weights.transpose(0, 2, 1) @ dcontext
    da = dcontext @ memory.transpose(0, 2, 1) + dweights
    # de = a ⊙ (da - Σ a da) is exactly 0 on masked keys and on fully masked rows, where a = 0.
    dscores = softmax_backward(da, SoftmaxCache(weights, -1))
    return dscores, dmemory


class AdditiveScoreCache(NamedTuple):
    query_proj: LinearCache  # W_q q_i            (B, Tq, A)
    key_proj: LinearCache    # W_k m_j + b        (B, Tk, A)
    tanh: TanhCache          # h = tanh(W_q q_i + W_k m_j + b)  (B, Tq, Tk, A)
    energy: LinearCache      # e = vᵀ h           (B, Tq, Tk, 1)


def _additive_scores(query: np.ndarray, memory: np.ndarray, w_q: np.ndarray, w_k: np.ndarray,
                     b: np.ndarray | None, v: np.ndarray
                     ) -> tuple[np.ndarray, AdditiveScoreCache]:
    """e_ij = vᵀ tanh(W_q q_i + W_k m_j + b), (B, Tq, Tk)."""
    qw, query_proj = linear_forward(query, w_q)
    kw, key_proj = linear_forward(memory, w_k, b)
    h = np.tanh(qw[:, :, None, :] + kw[:, None, :, :])
    scores, energy = linear_forward(h, v)
    return scores[..., 0], AdditiveScoreCache(query_proj, key_proj, TanhCache(h), energy)


def _additive_scores_backward(dscores: np.ndarray, cache: AdditiveScoreCache) -> tuple:
    """(dquery, dmemory, dW_q, dW_k, db, dv) of the additive score."""
    dh, dv, _ = linear_backward(dscores[..., None], cache.energy)
    dpre = tanh_backward(dh, cache.tanh)
    # q_i reaches every key j of its row and m_j every query i: sum the broadcast axis away.
    dquery, dw_q, _ = linear_backward(dpre.sum(axis=2), cache.query_proj)
    dmemory, dw_k, db = linear_backward(dpre.sum(axis=1), cache.key_proj)
    return dquery, dmemory, dw_q, dw_k, db, dv


# ----------------------------------------------------------------------------- additive

class AdditiveAttentionCache(NamedTuple):
    score: AdditiveScoreCache
    attend: AttendCache


def additive_attention_forward(query: np.ndarray, memory: np.ndarray, params: Mapping,
                               key_padding_mask: np.ndarray | None = None
                               ) -> tuple[tuple[np.ndarray, np.ndarray], AdditiveAttentionCache]:
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


def additive_attention_backward(dcontext: np.ndarray | None, cache: AdditiveAttentionCache,
                                dweights: np.ndarray | None = None
                                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dquery (B, Tq, Dq), dmemory (B, Tk, Dm), dparams keyed like params); None = zeros."""
    weights, memory = cache.attend
    dtype = memory.dtype
    dcontext = _check_upstream("dcontext", dcontext, weights.shape[:2] + memory.shape[2:], dtype)
    dweights = _check_upstream("dweights", dweights, weights.shape, dtype)
    dscores, dmemory = _attend_backward(dcontext, dweights, cache.attend)
    dquery, dmemory_score, dw_q, dw_k, db, dv = _additive_scores_backward(dscores, cache.score)
    dparams = {"query_proj.weight": dw_q, "key_proj.weight": dw_k, "key_proj.bias": db,
               "energy.weight": dv}
    return dquery, dmemory + dmemory_score, dparams


# ----------------------------------------------------------------------------- Luong

class LuongAttentionCache(NamedTuple):
    score: str                               # "dot", "general" or "concat"
    query: np.ndarray                        # q (B, Tq, Dq)
    keys: np.ndarray | None                  # k_j: m_j (dot), W_a m_j (general); None (concat)
    key_proj: LinearCache | None             # W_a m_j (general only)
    concat: AdditiveScoreCache | None        # concat only
    attend: AttendCache


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


def luong_attention_forward(query: np.ndarray, memory: np.ndarray, params: Mapping,
                            score: str = "dot", key_padding_mask: np.ndarray | None = None
                            ) -> tuple[tuple[np.ndarray, np.ndarray], LuongAttentionCache]:
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
                         f"shape {shape_str(memory.shape)}")
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
        scores = query @ keys.transpose(0, 2, 1)           # e_ij = q_i · k_j
    (context, weights), attend_cache = _attend(scores, memory, mask)
    return (context, weights), LuongAttentionCache(score, query, keys, key_proj, concat,
                                                   attend_cache)


def luong_attention_backward(dcontext: np.ndarray | None, cache: LuongAttentionCache,
                             dweights: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dquery (B, Tq, Dq), dmemory (B, Tk, Dm), dparams keyed like params); None = zeros."""
    weights, memory = cache.attend
    dtype = memory.dtype
    dcontext = _check_upstream("dcontext", dcontext, weights.shape[:2] + memory.shape[2:], dtype)
    dweights = _check_upstream("dweights", dweights, weights.shape, dtype)
    dscores, dmemory = _attend_backward(dcontext, dweights, cache.attend)
    if cache.score == "concat":
        dquery, dmemory_score, dw_cq, dw_cm, _, dv = _additive_scores_backward(dscores,
                                                                               cache.concat)
        dparams = {"concat.weight": np.concatenate([dw_cq, dw_cm], axis=1), "energy.weight": dv}
        return dquery, dmemory + dmemory_score, dparams
    dquery = dscores @ cache.keys                              # e_ij = q_i · k_j
    dkeys = dscores.transpose(0, 2, 1) @ cache.query
    if cache.score == "dot":
        return dquery, dmemory + dkeys, {}
    dmemory_score, dweight, _ = linear_backward(dkeys, cache.key_proj)   # k_j = W_a m_j
    return dquery, dmemory + dmemory_score, {"weight": dweight}


# ----------------------------------------------------------------------------- modules

def _init_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                  dtype: np.dtype) -> np.ndarray:
    """torch.nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(dtype)


class _MemoryAttention(Module):
    """Constructor bookkeeping and the one-shot cache of the two attention modules."""

    def __init__(self, query_size: int, memory_size: int, dtype: Any, seed: int | None) -> None:
        super().__init__()
        self.query_size = check_positive_int("query_size", query_size)
        self.memory_size = check_positive_int("memory_size", memory_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.rng = np.random.default_rng(seed)
        self._cache: Any = None

    def _take_cache(self) -> Any:
        if self._cache is None:
            raise RuntimeError("backward: call forward first (the cache of the last forward "
                               "is used once)")
        cache, self._cache = self._cache, None
        return cache

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class AdditiveAttention(_MemoryAttention):
    """Bahdanau attention with ``backward``; parameters as ``additive_attention_forward``'s.

    AdditiveAttention(query_size, memory_size, attention_size, dtype=np.float64, seed=None);
    init as torch.nn.Linear: U(±1/sqrt(fan_in)).
    """

    def __init__(self, query_size: int, memory_size: int, attention_size: int,
                 dtype: Any = np.float64, seed: int | None = None) -> None:
        super().__init__(query_size, memory_size, dtype, seed)
        self.attention_size = A = check_positive_int("attention_size", attention_size)
        Dq, Dm, rng = self.query_size, self.memory_size, self.rng
        self.params = {"query_proj.weight": _init_uniform(rng, (A, Dq), Dq, self.dtype),
                       "key_proj.weight": _init_uniform(rng, (A, Dm), Dm, self.dtype),
                       "key_proj.bias": _init_uniform(rng, (A,), Dm, self.dtype),
                       "energy.weight": _init_uniform(rng, (1, A), A, self.dtype)}
        self.zero_grad()

    def forward(self, query: np.ndarray, memory: np.ndarray,
                key_padding_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """query (B, Tq, Dq), memory (B, Tk, Dm) -> (context (B, Tq, Dm), weights (B, Tq, Tk))."""
        out, self._cache = additive_attention_forward(query, memory, self.params,
                                                      key_padding_mask)
        return out

    def backward(self, dcontext: np.ndarray | None, dweights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dquery, dmemory)."""
        dquery, dmemory, self.grads = additive_attention_backward(dcontext, self._take_cache(),
                                                                  dweights)
        return dquery, dmemory

    def extra_repr(self) -> str:
        return f"{self.query_size}, {self.memory_size}, {self.attention_size}"


class LuongAttention(_MemoryAttention):
    """Luong attention with ``backward``; parameters as ``luong_attention_forward``'s.

    LuongAttention(query_size, memory_size, score="general", attention_size=None,
    dtype=np.float64, seed=None). attention_size is A of the "concat" score (default
    query_size) and must be None for "dot" and "general"; "dot" needs query_size ==
    memory_size. Init as torch.nn.Linear: U(±1/sqrt(fan_in)).
    """

    def __init__(self, query_size: int, memory_size: int, score: str = "general",
                 attention_size: int | None = None, dtype: Any = np.float64,
                 seed: int | None = None) -> None:
        super().__init__(query_size, memory_size, dtype, seed)
        self.score = _check_score(score)
        Dq, Dm, rng = self.query_size, self.memory_size, self.rng
        if score != "concat" and attention_size is not None:
            raise ValueError(f"attention_size: only the 'concat' score has one, got "
                             f"{attention_size!r} with score {score!r}")
        if score == "dot" and Dq != Dm:
            raise ValueError(f"memory_size: score 'dot' needs memory_size == query_size = {Dq}, "
                             f"got {Dm}")
        self.attention_size = None
        if score == "general":
            self.params = {"weight": _init_uniform(rng, (Dq, Dm), Dm, self.dtype)}
        elif score == "concat":
            A = Dq if attention_size is None else attention_size
            self.attention_size = A = check_positive_int("attention_size", A)
            self.params = {"concat.weight": _init_uniform(rng, (A, Dq + Dm), Dq + Dm, self.dtype),
                           "energy.weight": _init_uniform(rng, (1, A), A, self.dtype)}
        self.zero_grad()

    def forward(self, query: np.ndarray, memory: np.ndarray,
                key_padding_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """query (B, Tq, Dq), memory (B, Tk, Dm) -> (context (B, Tq, Dm), weights (B, Tq, Tk))."""
        out, self._cache = luong_attention_forward(query, memory, self.params, self.score,
                                                   key_padding_mask)
        return out

    def backward(self, dcontext: np.ndarray | None, dweights: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Fills ``self.grads``; returns (dquery, dmemory)."""
        dquery, dmemory, self.grads = luong_attention_backward(dcontext, self._take_cache(),
                                                               dweights)
        return dquery, dmemory

    def extra_repr(self) -> str:
        text = f"{self.query_size}, {self.memory_size}, score={self.score!r}"
        if self.attention_size is not None:
            text += f", attention_size={self.attention_size}"
        return text
