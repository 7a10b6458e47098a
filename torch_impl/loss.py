"""Softmax cross-entropy with ignored targets and label smoothing.

Twin of ``reference/loss.py`` on torch tensors; forward and backward by hand.
Semantics of ``torch.nn.functional.cross_entropy`` with the classes on the
last axis. For logits x (..., C) and a target t at one position, with
m = max_c x_c and z = Σ_c e^{x_c - m}:

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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .checks import check_float_tensor, check_probability, shape_str

REDUCTIONS = ("mean", "sum", "none")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class CrossEntropyCache(NamedTuple):
    logits: torch.Tensor    # x (..., C)
    targets: torch.Tensor   # t (...) int64, ignored positions replaced by 0 so they index safely
    valid: torch.Tensor     # (...) bool, t != ignore_index
    m: torch.Tensor         # (...) max_c x_c   (float32 for low-precision logits)
    log_z: torch.Tensor     # (...) log Σ_c e^{x_c - m}
    count: torch.Tensor     # () number of valid targets, kept on the device (no sync)
    reduction: str
    label_smoothing: float  # ε


def _check_targets(targets: object, expected_shape: tuple[int, ...], num_classes: int,
                   ignore_index: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor of integers, "
                        f"got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != expected_shape:
        raise ValueError(f"targets: expected shape {shape_str(expected_shape)} "
                         f"(logits.shape[:-1]), got {shape_str(tuple(targets.shape))}")
    if targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"targets: values must be in 0..{num_classes - 1} "
                             f"(C = logits.shape[-1]) or equal ignore_index = {ignore_index}, "
                             f"got {int(targets[idx])} at index {idx}")
    return targets


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                          ignore_index: int = -100, label_smoothing: float = 0.0
                          ) -> tuple[torch.Tensor, CrossEntropyCache]:
    """Cross-entropy of logits (N, C) or (B, T, C) against int targets (N,) or (B, T).

    Returns a 0-d tensor for "mean"/"sum", or per-target losses (shape of
    targets, 0 at ignored positions) for "none".
    """
    check_float_tensor("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (N, C) or (B, T, C) with C >= 1, "
                         f"got {shape_str(tuple(logits.shape))}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    eps = check_probability("label_smoothing", label_smoothing, allow_one=True)
    _check_targets(targets, tuple(logits.shape[:-1]), logits.shape[-1], ignore_index)

    x = logits.float() if logits.dtype in _LOW_PRECISION else logits
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long()
    m = x.amax(dim=-1)
    shifted = x - m.unsqueeze(-1)
    log_z = torch.exp(shifted).sum(dim=-1).log()
    # nll from the shifted logits: log z - (x_t - m) keeps full relative precision where the
    # loss is tiny, which (log z + m) - x_t would round to the grid of m.
    shifted_t = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    loss = log_z - shifted_t
    if eps > 0:
        smooth = log_z - shifted.mean(dim=-1)
        loss = (1.0 - eps) * loss + eps * smooth
    loss = torch.where(valid, loss, 0.0)
    count = valid.sum()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / count.clamp_min(1).to(loss.dtype)
    # m and log z are kept apart: lse = m + log z would lose the low bits of log z at large |m|.
    cache = CrossEntropyCache(logits, safe_targets, valid, m, log_z, count, reduction, eps)
    return loss.to(logits.dtype), cache


def cross_entropy_backward(dloss: torch.Tensor | float, cache: CrossEntropyCache) -> torch.Tensor:
    """dlogits (..., C) for dloss: a scalar ("mean"/"sum") or shaped like targets ("none")."""
    logits, valid = cache.logits, cache.valid
    x = logits.float() if logits.dtype in _LOW_PRECISION else logits
    if cache.reduction == "none":
        check_float_tensor("dloss", dloss, shape=tuple(valid.shape), dtype=logits.dtype,
                           finite=False)
    elif isinstance(dloss, torch.Tensor):
        check_float_tensor("dloss", dloss, shape=(), dtype=logits.dtype, finite=False)
    elif isinstance(dloss, bool) or not isinstance(dloss, (int, float)):
        raise TypeError(f"dloss: expected a float or a 0-d torch.Tensor for reduction "
                        f"{cache.reduction!r}, got {type(dloss).__name__}")
    dloss = torch.as_tensor(dloss, dtype=x.dtype, device=x.device)
    if cache.reduction == "mean":
        dloss = dloss / cache.count.clamp_min(1).to(x.dtype)
    row_scale = torch.where(valid, dloss, 0.0)
    num_classes = logits.shape[-1]
    eps = cache.label_smoothing
    dlogits = torch.exp(x - cache.m.unsqueeze(-1) - cache.log_z.unsqueeze(-1))
    # d loss / dx_c = p_c - (1 - ε)[c = t] - ε / C, grouped as (p_c - [c = t]) + ε([c = t] - 1/C)
    # so that it is exactly 0 when C = 1
    index = cache.targets.unsqueeze(-1)
    dlogits.scatter_add_(-1, index, dlogits.new_full(index.shape, -1.0))
    if eps > 0:
        dlogits -= eps / num_classes
        dlogits.scatter_add_(-1, index, dlogits.new_full(index.shape, eps))
    dlogits *= row_scale.unsqueeze(-1)
    return dlogits.to(logits.dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """loss = cross_entropy(logits, targets, "mean", ignore_index) with the hand-written
    backward above (its validation and its 0-when-all-ignored mean included); the models'
    autograd entry to the loss."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, cache = cross_entropy_forward(logits, targets, "mean", ignore_index)
        ctx.cache = cache
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        return cross_entropy_backward(dloss, ctx.cache), None, None
