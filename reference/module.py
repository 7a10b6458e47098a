"""The small base class of every reference model: named parameters and gradients.

``params`` and ``grads`` are plain dicts of ndarrays keyed by the torch.nn
parameter names, so ``state_dict()`` moves between ``reference``,
``torch_impl`` and torch.nn with no renaming.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class Module:
    """Holds ``params`` / ``grads`` and the train/eval flag."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.training = True

    def train(self, mode: bool = True) -> "Module":
        self.training = bool(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters under their torch.nn names."""
        return {name: p.copy() for name, p in self.params.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load arrays (or CPU torch tensors, read through ``np.asarray``) by name.

        Every parameter must be present with its exact shape and no extra key
        may appear; values are cast to the module's dtype. Nothing is changed
        unless the whole dict is valid.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping of names to arrays, "
                            f"got {type(state_dict).__name__}")
        missing = sorted(set(self.params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected}")
        loaded = {}
        for name, p in self.params.items():
            value = state_dict[name]
            if hasattr(value, "detach"):  # a torch tensor: read it without importing torch
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            if value.shape != p.shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {p.shape}, "
                                 f"got {value.shape}")
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"state_dict[{name!r}]: expected a floating array, "
                                f"got {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"state_dict[{name!r}]: contains NaN or inf")
            loaded[name] = value.astype(p.dtype, copy=True)
        self.params.update(loaded)
