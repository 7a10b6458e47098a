"""Checkpoints of the ``seqtwin`` command line: written as a whole, made current in one atomic
step, verified when read.

A run directory (``seqtwin train --out DIR``) holds:

- ``CURRENT``: one line, the name of the current checkpoint (``step-00000200``);
- ``checkpoints/step-00000200/``: that checkpoint, every file of it:
  ``checkpoint.safetensors`` (the parameters under the names both backends share),
  ``optimizer.safetensors`` (AdamW's buffers ``exp_avg.<name>`` and ``exp_avg_sq.<name>``),
  ``config.json`` (task, model sizes, vocabulary, dtype, step, training settings and the
  random-number state that resuming needs), optionally ``tokenizer/``, and ``manifest.json``
  (the step and the SHA-256 of every other file);
- ``metrics.jsonl`` (one line per step) and ``loss.png``, for people.

A save writes a complete new checkpoint into a temporary directory (every file flushed to
disk), renames it to ``checkpoints/step-N``, then replaces ``CURRENT`` by an atomic rename:
a process killed at any point leaves ``CURRENT`` naming either the previous checkpoint or the
new one, both complete. The checkpoint before the current one is kept; older ones and any
temporary left by a killed save are removed by the next save. A load reads ``CURRENT`` once,
checks the manifest (every file present, its hash, the step in ``config.json``) and refuses a
mixed or partial set with a ``CheckpointError`` naming the file.

Files are NumPy arrays on disk, so either backend loads what the other saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

CURRENT = "CURRENT"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PARAMS_FILE = "checkpoint.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_BUFFERS = ("exp_avg", "exp_avg_sq")
FORMAT = 1
KEEP = 2          # checkpoints kept: the current one and the one before it
_FAULT_ENV = "SEQTWIN_CHECKPOINT_FAULT"   # tests: "<point>[:<n>]", see fault_point


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, mixed or unreadable."""


class Checkpoint(NamedTuple):
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    directory: Path            # checkpoints/step-N: the optimizer file and tokenizer/ live here


# ----------------------------------------------------------------------------- writing

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named point of a save where the crash tests kill the process.

    With ``SEQTWIN_CHECKPOINT_FAULT=<name>[:<n>]`` in the environment, the n-th time (default
    the first) the save reaches ``name`` the process kills itself with SIGKILL, as a power cut
    or the OOM killer would: no handler, no cleanup, no buffered writes. Unset: nothing."""
    wanted = os.environ.get(_FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.rpartition(":")
    if not nth.isdigit():
        point, nth = wanted, ""
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write, flush and fsync ``data``; a kill part-way leaves a short file (``mid-write``)."""
    with open(path, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        fault_point(f"mid-write:{path.name}")
        f.write(data[half:])
        f.flush()
        fault_point(f"fsync:{path.name}")
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_name)`` then rename over ``path`` (same directory: the rename is atomic);
    a failed write removes its temporary file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    atomic_write(path, lambda name: Path(name).write_bytes(_json_bytes(value)))


def _safetensors_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def write_safetensors(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    data = _safetensors_bytes(arrays)
    atomic_write(path, lambda name: Path(name).write_bytes(data))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(run: Path, config: Mapping[str, Any], params: Mapping[str, np.ndarray],
                    optimizer_buffers: Mapping[str, Mapping[str, np.ndarray]] | None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of ``config["step"]`` as a whole and make it current -> its
    directory. ``extra(directory)`` may add files (a tokenizer) before the manifest."""
    step = int(config["step"])
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{step_name(step)}.", suffix=".partial",
                                    dir=root))
    _write_bytes(staging / PARAMS_FILE, _safetensors_bytes(params))
    if optimizer_buffers is not None:
        flat = {f"{kind}.{name}": value for kind in OPTIMIZER_BUFFERS
                for name, value in optimizer_buffers[kind].items()}
        _write_bytes(staging / OPTIMIZER_FILE, _safetensors_bytes(flat))
    _write_bytes(staging / CONFIG_FILE, _json_bytes(config))
    if extra is not None:
        extra(staging)
        for name in _files(staging):          # what extra wrote, on disk before the manifest
            with open(staging / name, "rb+") as f:
                os.fsync(f.fileno())
    manifest = {"format": FORMAT, "step": step,
                "files": {name: _sha256(staging / name) for name in _files(staging)}}
    _write_bytes(staging / MANIFEST, _json_bytes(manifest))
    _fsync_dir(staging)
    fault_point("before-rename")
    final = root / step_name(step)
    if final.exists():            # a checkpoint of this step that is not current: replaced
        if _current_name(run) == final.name:
            shutil.rmtree(staging)
            raise CheckpointError(f"{str(final)!r} is the current checkpoint; a save of the "
                                  f"same step would overwrite it")
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(root)
    fault_point("after-rename")
    atomic_write_pointer(run, final.name)
    fault_point("after-pointer")
    clean_stale(run)
    return final


def atomic_write_pointer(run: Path, name: str) -> None:
    """Replace ``CURRENT`` by an atomic rename (the commit point of a save)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{CURRENT}.", suffix=".part", dir=run)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(f"{name}\n".encode())
            f.flush()
            fault_point("fsync:CURRENT")
            os.fsync(f.fileno())
        fault_point("before-pointer-rename")
        os.replace(tmp_name, run / CURRENT)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    _fsync_dir(run)


def clean_stale(run: Path) -> list[str]:
    """Remove temporaries of killed saves and all checkpoints but the current one and the one
    before it -> the names removed."""
    removed = []
    for path in run.glob(f".{CURRENT}.*.part"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    for path in run.glob(".*.part"):          # atomic_write temporaries (loss.png)
        path.unlink(missing_ok=True)
        removed.append(path.name)
    root = run / CHECKPOINTS
    if not root.is_dir():
        return removed
    for path in root.glob(".*.partial"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    current = _current_name(run)
    steps = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    if current in steps:
        keep = set(steps[max(0, steps.index(current) - KEEP + 1):steps.index(current) + 1])
        for name in steps:
            if name not in keep:
                shutil.rmtree(root / name, ignore_errors=True)
                removed.append(name)
    return removed


# ----------------------------------------------------------------------------- reading

def _current_name(run: Path) -> str | None:
    try:
        text = (run / CURRENT).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def has_checkpoint(run: Path) -> bool:
    """Whether ``run`` has a current checkpoint (a ``CURRENT`` pointer)."""
    return (run / CURRENT).is_file()


def current_checkpoint(run: Path) -> Path:
    """The directory ``CURRENT`` names, or CheckpointError."""
    if not run.is_dir():
        raise CheckpointError(f"no such directory: {str(run)!r}")
    if not (run / CURRENT).is_file():
        if (run / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{str(run)!r} holds a checkpoint of an older seqtwin layout (config.json "
                f"beside checkpoint.safetensors, no {CURRENT} file), which this version does "
                f"not read; train it again")
        raise CheckpointError(f"{str(run)!r} holds no checkpoint (no {CURRENT} file); write "
                              f"one with `seqtwin train`")
    name = _current_name(run)
    if name is None or "/" in name or "\\" in name or not name.startswith("step-"):
        raise CheckpointError(f"{str(run / CURRENT)!r}: expected the name of a checkpoint "
                              f"such as 'step-00000200', got {name!r}")
    directory = run / CHECKPOINTS / name
    if not directory.is_dir():
        raise CheckpointError(f"{str(run / CURRENT)!r} names {name!r}, which "
                              f"{str(run / CHECKPOINTS)!r} does not hold")
    return directory


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check ``directory`` against its manifest -> the manifest; CheckpointError naming the
    first file that is missing, extra, or not the one the manifest recorded."""
    manifest = read_json(directory / MANIFEST)
    files = manifest.get("files")
    step = manifest.get("step")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) \
            or not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{str(directory / MANIFEST)!r}: expected format {FORMAT} with "
                              f"an int 'step' and a 'files' object")
    for name in (CONFIG_FILE, PARAMS_FILE):
        if name not in files:
            raise CheckpointError(f"{str(directory / MANIFEST)!r} does not list {name}")
    present = set(_files(directory))
    for name, digest in files.items():
        path = directory / name
        if name not in present:
            raise CheckpointError(f"{str(path)!r} is missing: the checkpoint is partial")
        if _sha256(path) != digest:
            raise CheckpointError(f"{str(path)!r} is not the file the manifest recorded for "
                                  f"step {step} (its SHA-256 differs): the checkpoint is mixed "
                                  f"or corrupt")
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{str(directory)!r} holds files its manifest does not list: "
                              f"{', '.join(extra)}")
    return manifest


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


def load_checkpoint(run: Path) -> Checkpoint:
    """The current checkpoint of a run directory, verified against its manifest."""
    directory = current_checkpoint(run)
    manifest = verify_checkpoint(directory)
    if directory.name != step_name(manifest["step"]):
        raise CheckpointError(f"{str(directory / MANIFEST)!r} records step {manifest['step']}, "
                              f"not the step its directory names: the checkpoint is mixed")
    config = read_json(directory / CONFIG_FILE)
    if config.get("step") != manifest["step"]:
        raise CheckpointError(f"{str(directory / CONFIG_FILE)!r} is at step "
                              f"{config.get('step')!r} but its manifest at step "
                              f"{manifest['step']}: the checkpoint is mixed")
    return Checkpoint(config, read_safetensors(directory / PARAMS_FILE), directory)


def load_optimizer_buffers(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """AdamW's ``{"exp_avg": {name: array}, "exp_avg_sq": {...}}`` of a checkpoint directory
    (``Checkpoint.directory``)."""
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


# ----------------------------------------------------------------------------- metrics

class MetricsLog:
    """``metrics.jsonl``, one JSON object per line, each appended by one ``write`` call on a
    file opened for appending: a kill loses at most the line being written. Opening it for a
    run that resumes at ``step`` drops a torn last line and the lines after ``step`` (steps
    the resumed run trains again)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_bytes(b"")
        elif path.is_file():
            kept = [line for line in read_metrics(path) if line.get("step", 0) <= resume_step]
            atomic_write(path, lambda name: Path(name).write_bytes(
                b"".join(json.dumps(r).encode() + b"\n" for r in kept)))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: Mapping[str, Any]) -> None:
        os.write(self._fd, json.dumps(record).encode("utf-8") + b"\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill mid-write) is left out."""
    records = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines) - 1:     # no newline after it: the line a kill cut short
                break
            raise CheckpointError(f"{str(path)!r} line {i + 1} is not JSON") from None
        if isinstance(value, dict):
            records.append(value)
    return records
