"""Softmax cross-entropy with ignored targets and label smoothing.

Twin of ``reference/loss.py`` on torch tensors. The per-row math, forward and backward by
hand, is the fused op ``seqtwin::cross_entropy`` (``kernels/cross_entropy.py``: Triton on CUDA,
torch elsewhere); this file validates, reduces, and keeps the explicit cache. Semantics of
``torch.nn.functional.cross_entropy`` with the classes on the last axis. For logits
x (..., C) and a target t at one position, with m = max_c x_c and z = Σ_c e^{x_c - m}:

    log p_c  = (x_c - m) - log z
    nll      = -log p_t                  = log z - (x_t - m)
    smooth   = -(1/C) Σ_c log p_c        = log z - (1/C) Σ_c (x_c - m)
    loss     = (1 - ε) nll + ε smooth    (ε = label_smoothing; 0 where t = ignore_index)

    reduction "mean": Σ loss / (number of targets that are not ignore_index)
              "sum" : Σ loss;   "none": loss per position, shape of targets

    dloss/dx_c = p_c - (1 - ε) [c = t] - ε / C     (0 at ignored positions)

Documented deviation from torch: if every target is ignored, "mean" returns
0 with zero gradients (torch returns nan). bfloat16/float16 logits are
computed in float32 and the results cast back.

``cross_entropy`` (the same loss under autograd, through the op's registered backward) is
what the models call; it compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checks import check_float_tensor
from .kernels.cross_entropy import (
    REDUCTIONS,
    check_cross_entropy_args,
    cross_entropy,
    cross_entropy_backward_op,
    cross_entropy_op,
    reduce_losses,
)

__all__ = ["REDUCTIONS", "CrossEntropyCache", "cross_entropy", "cross_entropy_backward",
           "cross_entropy_forward"]


class CrossEntropyCache(NamedTuple):
    logits: torch.Tensor    # x (..., C)
    targets: torch.Tensor   # t (...)
    m: torch.Tensor         # (...) max_c x_c   (float32 for low-precision logits)
    log_z: torch.Tensor     # (...) log Σ_c e^{x_c - m}
    count: torch.Tensor     # () number of targets != ignore_index, kept on the device (no sync)
    reduction: str
    ignore_index: int
    label_smoothing: float  # ε


@torch.no_grad()
def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                          ignore_index: int = -100, label_smoothing: float = 0.0
                          ) -> tuple[torch.Tensor, CrossEntropyCache]:
    """Cross-entropy of logits (N, C) or (B, T, C) against int targets (N,) or (B, T).

    Returns a 0-d tensor for "mean"/"sum", or per-target losses (shape of
    targets, 0 at ignored positions) for "none".
    """
    eps = check_cross_entropy_args(logits, targets, reduction, ignore_index, label_smoothing,
                                   finite=True)
    C = logits.shape[-1]
    loss, m, log_z = cross_entropy_op(logits.reshape(-1, C), targets.reshape(-1), ignore_index,
                                      eps)
    count = (targets != ignore_index).sum()
    shape = tuple(targets.shape)
    cache = CrossEntropyCache(logits, targets, m.reshape(shape), log_z.reshape(shape), count,
                              reduction, ignore_index, eps)
    return reduce_losses(loss.reshape(shape), count, reduction).to(logits.dtype), cache


@torch.no_grad()
def cross_entropy_backward(dloss: torch.Tensor | float, cache: CrossEntropyCache) -> torch.Tensor:
    """dlogits (..., C) for dloss: a scalar ("mean"/"sum") or shaped like targets ("none")."""
    logits, targets, m = cache.logits, cache.targets, cache.m
    if cache.reduction == "none":
        check_float_tensor("dloss", dloss, shape=tuple(targets.shape), dtype=logits.dtype,
                           finite=False)
    elif isinstance(dloss, torch.Tensor):
        check_float_tensor("dloss", dloss, shape=(), dtype=logits.dtype, finite=False)
    elif isinstance(dloss, bool) or not isinstance(dloss, (int, float)):
        raise TypeError(f"dloss: expected a float or a 0-d torch.Tensor for reduction "
                        f"{cache.reduction!r}, got {type(dloss).__name__}")
    dloss = torch.as_tensor(dloss, dtype=m.dtype, device=m.device)
    if cache.reduction == "mean":
        dloss = dloss / cache.count.clamp_min(1).to(m.dtype)
    C = logits.shape[-1]
    # the op takes one upstream gradient per row: a scalar one is the same for every row
    dlogits = cross_entropy_backward_op(dloss.expand(targets.shape).reshape(-1),
                                        logits.reshape(-1, C), targets.reshape(-1),
                                        m.reshape(-1), cache.log_z.reshape(-1),
                                        cache.ignore_index, cache.label_smoothing)
    return dlogits.reshape(logits.shape)
