"""Softmax cross-entropy with ignored targets and label smoothing.

Twin of ``reference/loss.py`` on torch tensors. The per-row math, forward and backward by
hand, is the fused op ``seqtwin::cross_entropy`` (``kernels/cross_entropy.py``: Triton on CUDA,
C++ on the CPU, torch elsewhere); this file validates, reduces, and keeps the explicit cache.
Semantics of ``torch.nn.functional.cross_entropy`` with the classes on the last axis. For logits
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
    cross_entropy_rows,
    cross_entropy_rows_backward,
    reduce_losses,
    reduce_losses_backward,
)

__all__ = ["REDUCTIONS", "CrossEntropyCache", "cross_entropy", "cross_entropy_backward",
           "cross_entropy_forward"]


class CrossEntropyCache(NamedTuple):
    logits: torch.Tensor    # x (..., C)
    targets: torch.Tensor   # t (...)
    m: torch.Tensor         # (...) max_c x_c   (float32 for low-precision logits)
    log_z: torch.Tensor     # (...) log Σ_c e^{x_c - m}
    count: int | torch.Tensor  # targets != ignore_index: an int on the CPU (read with the
                               # targets' check), else a 0-d tensor on the device
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
    eps, count = check_cross_entropy_args(logits, targets, reduction, ignore_index,
                                          label_smoothing, finite=True)
    # rows (N, C), (N,) (flatten returns 2-D logits and 1-D targets themselves)
    loss, m, log_z = cross_entropy_rows(logits.flatten(0, -2), targets.flatten(), ignore_index,
                                        eps)
    cache = CrossEntropyCache(logits, targets, m.view_as(targets), log_z.view_as(targets), count,
                              reduction, ignore_index, eps)
    return reduce_losses(loss.view_as(targets), count, reduction).to(logits.dtype), cache


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
    # the op takes one upstream gradient per row: a scalar one is the same for every row
    dloss = reduce_losses_backward(dloss, cache.count, cache.reduction, targets.numel())
    dlogits = cross_entropy_rows_backward(dloss, logits.flatten(0, -2), targets.flatten(),
                                          m.flatten(), cache.log_z.flatten(),
                                          cache.ignore_index, cache.label_smoothing)
    return dlogits.view_as(logits)
