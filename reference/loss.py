"""Softmax cross-entropy with ignored targets and label smoothing.

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
0 with zero gradients (torch returns nan).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_float_array, check_probability, shape_str

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyCache(NamedTuple):
    logits: np.ndarray      # x (..., C)
    targets: np.ndarray     # t (...), ignored positions replaced by 0 so they index safely
    valid: np.ndarray       # (...) bool, t != ignore_index
    m: np.ndarray           # (...) max_c x_c
    log_z: np.ndarray       # (...) log Σ_c e^{x_c - m}
    count: int              # number of valid targets
    reduction: str
    label_smoothing: float  # ε


def _check_targets(targets: object, expected_shape: tuple[int, ...], num_classes: int,
                   ignore_index: int) -> np.ndarray:
    if not isinstance(targets, np.ndarray):
        raise TypeError(f"targets: expected a numpy.ndarray of integers, "
                        f"got {type(targets).__name__}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets: expected an integer dtype, got {targets.dtype}")
    if targets.shape != expected_shape:
        raise ValueError(f"targets: expected shape {shape_str(expected_shape)} "
                         f"(logits.shape[:-1]), got {shape_str(targets.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"targets: values must be in 0..{num_classes - 1} (C = logits.shape[-1])"
                         f" or equal ignore_index = {ignore_index}, got {int(targets[idx])} at "
                         f"index {idx}")
    return targets


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, reduction: str = "mean",
                          ignore_index: int = -100, label_smoothing: float = 0.0
                          ) -> tuple[np.ndarray, CrossEntropyCache]:
    """Cross-entropy of logits (N, C) or (B, T, C) against int targets (N,) or (B, T).

    Returns a 0-d array for "mean"/"sum", or per-target losses (shape of
    targets, 0 at ignored positions) for "none".
    """
    check_float_array("logits", logits)
    if logits.ndim not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape (N, C) or (B, T, C) with C >= 1, "
                         f"got {shape_str(logits.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    eps = check_probability("label_smoothing", label_smoothing, allow_one=True)
    num_classes = logits.shape[-1]
    _check_targets(targets, logits.shape[:-1], num_classes, ignore_index)

    valid = targets != ignore_index
    safe_targets = np.where(valid, targets, 0).astype(np.int64)
    m = logits.max(axis=-1)
    shifted = logits - m[..., None]
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    # nll from the shifted logits: log z - (x_t - m) keeps full relative precision where the
    # loss is tiny, which (log z + m) - x_t would round to the grid of m.
    shifted_t = np.take_along_axis(shifted, safe_targets[..., None], axis=-1)[..., 0]
    loss = log_z - shifted_t
    if eps > 0:
        smooth = log_z - shifted.mean(axis=-1)
        loss = (1.0 - eps) * loss + eps * smooth
    loss = np.where(valid, loss, 0.0).astype(logits.dtype)
    count = int(valid.sum())
    if reduction == "sum":
        loss = np.asarray(loss.sum(), dtype=logits.dtype)
    elif reduction == "mean":
        loss = np.asarray(loss.sum() / max(count, 1), dtype=logits.dtype)
    # m and log z are kept apart: lse = m + log z would lose the low bits of log z at large |m|.
    cache = CrossEntropyCache(logits, safe_targets, valid, m, log_z, count, reduction, eps)
    return loss, cache


def cross_entropy_backward(dloss: np.ndarray | float, cache: CrossEntropyCache) -> np.ndarray:
    """dlogits (..., C) for dloss: a scalar ("mean"/"sum") or shaped like targets ("none")."""
    logits, valid = cache.logits, cache.valid
    if cache.reduction == "none":
        check_float_array("dloss", dloss, shape=valid.shape, dtype=logits.dtype, finite=False)
        row_scale = np.where(valid, dloss, 0.0).astype(logits.dtype)
    else:
        if isinstance(dloss, np.ndarray):
            check_float_array("dloss", dloss, shape=(), dtype=logits.dtype, finite=False)
        elif isinstance(dloss, bool) or not isinstance(dloss, (int, float, np.floating)):
            raise TypeError(f"dloss: expected a float or a 0-d numpy.ndarray for reduction "
                            f"{cache.reduction!r}, got {type(dloss).__name__}")
        scale = float(dloss) / max(cache.count, 1) if cache.reduction == "mean" else float(dloss)
        row_scale = np.where(valid, scale, 0.0).astype(logits.dtype)
    num_classes = logits.shape[-1]
    eps = cache.label_smoothing
    p = np.exp(logits - cache.m[..., None] - cache.log_z[..., None])
    onehot = (np.arange(num_classes) == cache.targets[..., None]).astype(logits.dtype)
    # d loss / dx_c = p_c - (1 - ε)[c = t] - ε / C, grouped so that it is exactly 0 when C = 1
    dlogits = (p - onehot) + eps * (onehot - 1.0 / num_classes)
    return (row_scale[..., None] * dlogits).astype(logits.dtype)
