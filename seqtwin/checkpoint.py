"""Checkpoint directories of the ``seqtwin`` command line, read and written atomically.

A checkpoint directory holds:

- ``checkpoint.safetensors``: the parameters under the names both backends share;
- ``optimizer.safetensors``: AdamW's buffers, ``exp_avg.<name>`` and ``exp_avg_sq.<name>``;
- ``config.json``: task, model sizes, vocabulary, dtype, step and training settings;
- ``metrics.jsonl`` (one line per step) and ``loss.png``, for people.

Every file is written to a temporary name in the same directory and renamed over the old one,
so an interrupted write never leaves a partial file; ``config.json``, which names the step, is
written last. Files are NumPy arrays on disk, so either backend loads what the other saved.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

CHECKPOINT_FILES = ("config.json", "checkpoint.safetensors")
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_BUFFERS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or unreadable."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_name)`` then rename over ``path`` (same directory: the rename is atomic)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    def write(name: str) -> None:
        Path(name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    atomic_write(path, write)


def write_safetensors(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    atomic_write(path, lambda name: save_file(contiguous, name))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file; CheckpointError naming the file if it is corrupt."""
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file "
                              f"({type(err).__name__}: {err})") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r}: expected a JSON object, got "
                              f"{type(value).__name__}")
    return value


def has_checkpoint(directory: Path) -> bool:
    return all((directory / name).is_file() for name in CHECKPOINT_FILES)


def save_checkpoint(directory: Path, config: Mapping[str, Any],
                    params: Mapping[str, np.ndarray],
                    optimizer_buffers: Mapping[str, Mapping[str, np.ndarray]] | None) -> None:
    """Parameters and optimizer buffers first, ``config.json`` (which names the step) last."""
    write_safetensors(directory / "checkpoint.safetensors", params)
    if optimizer_buffers is not None:
        flat = {f"{kind}.{name}": value for kind in OPTIMIZER_BUFFERS
                for name, value in optimizer_buffers[kind].items()}
        write_safetensors(directory / OPTIMIZER_FILE, flat)
    write_json(directory / "config.json", config)


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, parameters as arrays) of a checkpoint directory, or CheckpointError."""
    if not directory.is_dir():
        raise CheckpointError(f"no such directory: {str(directory)!r}")
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{str(directory)!r} holds no checkpoint (missing "
                              f"{', '.join(missing)}); write one with `seqtwin train`")
    config = read_json(directory / "config.json")
    for key in ("task", "model", "step"):
        if key not in config:
            raise CheckpointError(f"{str(directory / 'config.json')!r} has no {key!r} entry; "
                                  f"it was not written by `seqtwin train`")
    return config, read_safetensors(directory / "checkpoint.safetensors")


def load_optimizer_buffers(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """AdamW's ``{"exp_avg": {name: array}, "exp_avg_sq": {...}}`` of a checkpoint."""
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {OPTIMIZER_FILE}")
    buffers: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in OPTIMIZER_BUFFERS}
    for key, value in read_safetensors(path).items():
        kind, _, name = key.partition(".")
        if kind not in buffers or not name:
            raise CheckpointError(f"{str(path)!r}: unexpected entry {key!r}")
        buffers[kind][name] = value
    return buffers
