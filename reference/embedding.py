"""Token embedding: a row lookup, and its scatter-add backward.

    y[n] = W[ids[n]]                         ids int (...), W (V, E), y (..., E)
    dW[v] = Σ_{n : ids[n] = v} dy[n]         (V, E);  dW[padding_idx] = 0

As in torch, the row ``padding_idx`` is still looked up in the forward, but
receives no gradient (so it stays at whatever value it was initialised to).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_float_array, check_int_array, shape_str


class EmbeddingCache(NamedTuple):
    ids: np.ndarray           # (...)
    num_embeddings: int       # V
    padding_idx: int | None   # in 0..V-1 (negative values normalised), or None


def embedding_forward(ids: np.ndarray, weight: np.ndarray,
                      padding_idx: int | None = None) -> tuple[np.ndarray, EmbeddingCache]:
    """y = W[ids] for ids int (...) in 0..V-1 and weight (V, E); y (..., E).

    ``padding_idx`` (in -V..V-1, negative counts from the end, as torch) names
    the row that gets zero gradient.
    """
    check_float_array("weight", weight, shape=("V", "E"))
    num_embeddings = weight.shape[0]
    check_int_array("ids", ids, low=0, high=num_embeddings)
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
            raise TypeError(f"padding_idx: expected an int or None, "
                            f"got {type(padding_idx).__name__}")
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx: expected a value in {-num_embeddings}.."
                             f"{num_embeddings - 1} (weight has V = {num_embeddings} rows), "
                             f"got {padding_idx}")
        padding_idx = int(padding_idx) % num_embeddings
    return weight[ids], EmbeddingCache(ids, num_embeddings, padding_idx)


def embedding_backward(dy: np.ndarray, cache: EmbeddingCache) -> np.ndarray:
    """dweight (V, E) for dy (..., E): dy scatter-added into the rows named by ids."""
    ids = cache.ids
    check_float_array("dy", dy, finite=False)
    if dy.shape[:-1] != ids.shape or dy.ndim != ids.ndim + 1:
        raise ValueError(f"dy: expected shape {shape_str(ids.shape + ('E',))} (ids.shape + (E,)), "
                         f"got {shape_str(dy.shape)}")
    dweight = np.zeros((cache.num_embeddings, dy.shape[-1]), dtype=dy.dtype)
    # add.at accumulates repeated ids; plain fancy-index assignment would keep only the last one.
    np.add.at(dweight, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    if cache.padding_idx is not None:
        dweight[cache.padding_idx] = 0.0
    return dweight
