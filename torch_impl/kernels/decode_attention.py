"""The attention of a decode step: one new query per row and head against the preallocated
KV cache (N, heads, capacity, head_dim), the step's key and value written into the cache at
slot t first, keys masked where ``valid`` (N, capacity) is False.

The native CPU kernel (``kernels/cpu/decode_attention.cpp``, the math in its header) does
the cache writes and the attention in one call; elsewhere the same runs as two cache writes
and ``F.scaled_dot_product_attention``. A decode session resolves the path once, with
``decode_attention_for``, and calls the returned function at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from . import native_kernels

Attend = Callable[[Tensor, Tensor, Tensor, int, "Tensor | None"], Tensor]


def _torch_attend(qkv: Tensor, keys: Tensor, values: Tensor, t: int,
                  valid: Tensor | None) -> Tensor:
    N, heads, _, d = keys.shape
    q, k, v = qkv.view(N, 3, heads, 1, d).unbind(1)
    keys[:, :, t:t + 1] = k
    values[:, :, t:t + 1] = v
    mask = None if valid is None else valid[:, None, None, :t + 1]  # True = attend
    a = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1],
                                       attn_mask=mask)
    return a.reshape(N, heads * d)


def decode_attention_for(like: Tensor) -> Attend:
    """``attend(qkv (N, 3E), keys, values, t, valid or None) -> a (N, E)`` for tensors like
    ``like`` under the current kernel path (the native kernel on float32/float64 CPU
    tensors). The returned function trusts its arguments: contiguous, t < capacity, one
    dtype and device (a decode session's cache and activations)."""
    module = native_kernels("decode_attention", like)
    return _torch_attend if module is None else module.attend
