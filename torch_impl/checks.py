"""Validation at the public boundary (STYLE.md rule 5).

Every public function of ``torch_impl`` checks its arguments once, here, and
raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, range or value) with a message that names the argument, what it got and
what was expected. Internals trust their inputs.

Value checks (finiteness, index ranges) read the data, which costs a device
sync on CUDA; they are skipped while ``torch.compile`` traces, where data is
symbolic. Models validate their inputs and weights at their entry points and then call the
ops' internals, which check nothing.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def shape_str(shape: Sequence[object]) -> str:
    """``(2, 3)`` style text for a shape that may hold symbolic names."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float_tensor(name: str, x: object, shape: Sequence[object] | None = None,
                       dtype: torch.dtype | None = None, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of the expected shape.

    ``shape`` entries are ints (must match) or strings (any size, named in the
    message). ``dtype``, when given, must match exactly (all floating inputs of
    one call share a dtype). ``finite`` rejects NaN and inf.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float64, bfloat16, "
                        f"float16), got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the other inputs), "
                        f"got {x.dtype}")
    if shape is not None:
        check_shape(name, x.shape, shape)
    # a finite sum means finite elements (NaN and ±inf propagate), and the sum reads x once
    # (~40x cheaper than isfinite(x).all()); only a non-finite sum, which all-finite huge
    # values can also overflow to, pays for the exact elementwise check
    if finite and not _tracing() and not bool(torch.isfinite(x.sum())):
        nonfinite = ~torch.isfinite(x)
        if bool(nonfinite.any()):
            bad = torch.nonzero(nonfinite)[0]
            raise ValueError(f"{name}: contains NaN or inf (first at index "
                             f"{tuple(int(i) for i in bad)})")
    return x


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError naming the first of the ``(name, tensor)`` pairs (a model's weights)
    that holds NaN or inf. One sum per tensor and a single read back for all of them; only a
    non-finite total pays for the per-tensor checks that find the culprit."""
    if _tracing():
        return
    named = list(named)
    if not named:
        return
    with torch.no_grad():
        total = torch.stack([x.sum() for _, x in named]).sum()
    if not bool(torch.isfinite(total)):
        for name, x in named:
            check_float_tensor(name, x)


def check_shape(name: str, got: Sequence[int], expected: Sequence[object]) -> None:
    """Raise ValueError unless ``got`` matches ``expected`` (ints fixed, strings free)."""
    ok = len(got) == len(expected) and all(
        isinstance(e, str) or int(g) == int(e) for g, e in zip(got, expected))
    if not ok:
        raise ValueError(f"{name}: expected shape {shape_str(expected)}, "
                         f"got {shape_str(tuple(got))}")


def check_int_tensor(name: str, x: object, shape: Sequence[object] | None = None,
                     low: int | None = None, high: int | None = None) -> torch.Tensor:
    """Check an integer tensor (token ids, lengths) and its range ``low <= x < high``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if shape is not None:
        check_shape(name, x.shape, shape)
    if x.numel() and not _tracing():
        if low is not None and int(x.min()) < low:
            raise ValueError(f"{name}: values must be >= {low}, got {int(x.min())}")
        if high is not None and int(x.max()) >= high:
            raise ValueError(f"{name}: values must be < {high}, got {int(x.max())}")
    return x


def check_lengths(lengths: object, batch: int, steps: int) -> torch.Tensor | None:
    """Check a ``(B,)`` vector of sequence lengths, each in ``1..T``; ``None`` passes."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        lengths = torch.as_tensor(lengths)
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer torch.Tensor of shape ({batch},), "
                        f"got {getattr(lengths, 'dtype', type(lengths).__name__)}")
    check_shape("lengths", lengths.shape, (batch,))
    if lengths.numel() and not _tracing():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > steps:
            raise ValueError(f"lengths: every length must be in 1..{steps} (the sequence "
                             f"length T), got min {lo}, max {hi}")
    return lengths.to(torch.int64)


def check_probability(name: str, p: float, allow_one: bool = False) -> float:
    """Check a dropout-style probability in ``[0, 1)`` (or ``[0, 1]``)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(p).__name__}")
    upper_ok = p <= 1 if allow_one else p < 1
    if not (p >= 0 and upper_ok):
        raise ValueError(f"{name}: expected a probability in [0, 1{']' if allow_one else ')'}, "
                         f"got {p}")
    return float(p)


def check_positive_int(name: str, n: object) -> int:
    """Check a size argument (hidden_size, num_layers, ...)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: expected a positive int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name}: expected a positive int, got {n}")
    return int(n)


def check_dropout_masks(masks: object, p: float, expected: Mapping[str, tuple[int, ...]],
                        helper: str, device: torch.device | None = None
                        ) -> Mapping[str, torch.Tensor] | None:
    """The explicit keep-masks of a model with dropout rate p: None when p == 0, else a dict
    with exactly the keys and shapes of ``expected`` (``helper`` names where they come from),
    on ``device`` when one is given."""
    if p == 0:
        if masks is not None:
            raise ValueError("dropout_masks: expected None when config.dropout == 0, got masks")
        return None
    if masks is None:
        raise ValueError(f"dropout_masks: required when config.dropout = {p} > 0 "
                         f"(randomness is explicit: see {helper})")
    if not isinstance(masks, Mapping):
        raise TypeError(f"dropout_masks: expected a dict of bool tensors, "
                        f"got {type(masks).__name__}")
    if set(masks) != set(expected):
        raise ValueError(f"dropout_masks: expected the keys {sorted(expected)}, missing "
                         f"{sorted(set(expected) - set(masks))}, unexpected "
                         f"{sorted(set(masks) - set(expected))}")
    for name, shape in expected.items():
        mask = masks[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"dropout_masks[{name!r}]: expected a bool torch.Tensor "
                            f"(True = keep), got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"dropout_masks[{name!r}]: expected shape {shape_str(shape)}, "
                             f"got {shape_str(tuple(mask.shape))}")
        if device is not None and mask.device != device:
            raise ValueError(f"dropout_masks[{name!r}]: expected the device of src ({device}), "
                             f"got {mask.device}")
    return masks
