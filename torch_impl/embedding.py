"""Token embedding: a row lookup, and its scatter-add backward.

Twin of ``reference/embedding.py`` on torch tensors; forward and backward by hand.

    y[n] = W[ids[n]]                         ids int (...), W (V, E), y (..., E)
    dW[v] = Σ_{n : ids[n] = v} dy[n]         (V, E);  dW[padding_idx] = 0

As in torch, the row ``padding_idx`` is still looked up in the forward, but
receives no gradient (so it stays at whatever value it was initialised to).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import check_float_tensor, check_int_tensor, shape_str


class EmbeddingCache(NamedTuple):
    ids: torch.Tensor         # (...), int64
    num_embeddings: int       # V
    padding_idx: int | None   # in 0..V-1 (negative values normalised), or None


def embedding_forward(ids: torch.Tensor, weight: torch.Tensor,
                      padding_idx: int | None = None) -> tuple[torch.Tensor, EmbeddingCache]:
    """y = W[ids] for ids int (...) in 0..V-1 and weight (V, E); y (..., E).

    ``padding_idx`` (in -V..V-1, negative counts from the end, as torch) names
    the row that gets zero gradient.
    """
    check_float_tensor("weight", weight, shape=("V", "E"))
    num_embeddings = weight.shape[0]
    check_int_tensor("ids", ids, low=0, high=num_embeddings)
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx: expected an int or None, "
                            f"got {type(padding_idx).__name__}")
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx: expected a value in {-num_embeddings}.."
                             f"{num_embeddings - 1} (weight has V = {num_embeddings} rows), "
                             f"got {padding_idx}")
        padding_idx = padding_idx % num_embeddings
    # uint8 ids would index as a boolean mask, and index_add_ wants int64: normalise once here.
    ids = ids.long()
    y = weight.index_select(0, ids.reshape(-1)).reshape(*ids.shape, weight.shape[1])
    return y, EmbeddingCache(ids, num_embeddings, padding_idx)


def embedding_backward(dy: torch.Tensor, cache: EmbeddingCache) -> torch.Tensor:
    """dweight (V, E) for dy (..., E): dy scatter-added into the rows named by ids."""
    ids = cache.ids
    check_float_tensor("dy", dy, finite=False)
    if tuple(dy.shape[:-1]) != tuple(ids.shape) or dy.dim() != ids.dim() + 1:
        raise ValueError(f"dy: expected shape {shape_str(tuple(ids.shape) + ('E',))} "
                         f"(ids.shape + (E,)), got {shape_str(tuple(dy.shape))}")
    dweight = dy.new_zeros(cache.num_embeddings, dy.shape[-1])
    dweight.index_add_(0, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    if cache.padding_idx is not None:
        dweight[cache.padding_idx] = 0.0
    return dweight
