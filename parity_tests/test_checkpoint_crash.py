"""Checkpoints survive a kill at any moment: real ``seqtwin train`` processes are SIGKILLed at
every point of a save (``seqtwin.checkpoint.fault_point``) and at random moments; after
every kill ``eval`` and ``generate`` load a complete checkpoint, and ``--resume`` finishes
with parameters, optimizer state and metrics bit for bit those of a run never stopped."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from seqtwin.checkpoint import (
    CHECKPOINTS,
    CURRENT,
    CheckpointError,
    current_checkpoint,
    load_checkpoint,
    read_metrics,
)
from seqtwin.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STEPS, EVERY = 12, 3
TINY = ["--embed", "8", "--hidden", "16", "--block", "16", "--batch", "8", "--lr", "1e-2",
        "--dropout", "0.2", "--eval-every", str(EVERY)]
# every point a save passes, in order (checkpoint.save_checkpoint)
POINTS = [f"{stage}:{name}" for name in ("checkpoint.safetensors", "optimizer.safetensors",
                                         "config.json", "manifest.json")
          for stage in ("mid-write", "fsync")]
POINTS += ["before-rename", "after-rename", "fsync:CURRENT", "before-pointer-rename",
           "after-pointer"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = SHARED_DATA / "tinyshakespeare.txt"
    assert source.is_file(), f"{source} is missing (tests read ../shared/data)"
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(source.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SEQTWIN_CHECKPOINT_FAULT"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_THREAD_TIMEOUT="4")
    if fault:
        env["SEQTWIN_CHECKPOINT_FAULT"] = fault
    return env


def _argv(corpus: Path, out: Path, backend: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seqtwin.cli", "train", "--data", str(corpus), "--out",
            str(out), "--backend", backend, "--steps", str(steps), "--threads", "1", *TINY,
            *extra]


def _train(corpus: Path, out: Path, backend: str, *extra: str, fault: str | None = None,
           steps: int = STEPS) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(corpus, out, backend, steps, *extra), env=_env(fault),
                          capture_output=True, text=True, timeout=300)


def _state(out: Path) -> dict[str, np.ndarray]:
    """Every array of the current checkpoint: parameters and optimizer buffers."""
    where = current_checkpoint(out)
    arrays = {f"param.{k}": v for k, v in load_file(where / "checkpoint.safetensors").items()}
    arrays.update({f"opt.{k}": v for k, v in load_file(where / "optimizer.safetensors").items()})
    return arrays


def _assert_same_run(out: Path, uninterrupted: Path, steps: int = STEPS) -> None:
    assert load_checkpoint(out).config["step"] == steps
    expected, got = _state(uninterrupted), _state(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
    losses = [r["train_loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert losses == [r["train_loss"] for r in read_metrics(uninterrupted / "metrics.jsonl")]


def _assert_no_leftovers(out: Path) -> None:
    assert not list(out.glob(".*.part")), list(out.iterdir())
    assert not list((out / CHECKPOINTS).glob(".*.partial"))
    assert len(list((out / CHECKPOINTS).iterdir())) <= 2      # current and the one before


def _assert_loadable(out: Path, capsys: pytest.CaptureFixture, steps: set[int]) -> int:
    """eval and generate load a complete checkpoint at one of ``steps`` -> its step."""
    step = load_checkpoint(out).config["step"]
    assert step in steps
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--backend", "numpy"]) == 0
    assert f"step {step}" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--backend", "numpy",
                 "--max-new-tokens", "5", "--greedy"]) == 0
    return step


@pytest.fixture(scope="module")
def uninterrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _train(corpus, out, "numpy")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_each_point_of_a_save_leaves_a_loadable_checkpoint_and_resume_is_exact(
        point: str, corpus: Path, uninterrupted: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    killed = _train(corpus, out, "numpy", fault=f"{point}:2")      # in the save of step 6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    committed = point == "after-pointer"
    step = _assert_loadable(out, capsys, {2 * EVERY} if committed else {EVERY})
    assert step == (2 * EVERY if committed else EVERY)
    resumed = _train(corpus, out, "numpy", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(out, uninterrupted)
    _assert_no_leftovers(out)


def test_a_kill_in_the_first_save_leaves_no_checkpoint_and_a_restart_is_allowed(
        corpus: Path, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
        ) -> None:
    out = tmp_path / "run"
    assert _train(corpus, out, "numpy", fault="before-pointer-rename:1").returncode \
        == -signal.SIGKILL
    with pytest.raises(CheckpointError, match=CURRENT):
        load_checkpoint(out)
    assert main(["eval", "--checkpoint", str(out)]) == 2
    again = _train(corpus, out, "numpy")      # no checkpoint yet: the same --out starts over
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_run(out, uninterrupted)
    _assert_no_leftovers(out)


def test_a_torch_run_killed_mid_save_resumes_bit_for_bit_with_dropout(
        corpus: Path, tmp_path: Path) -> None:
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert _train(corpus, whole, "torch").returncode == 0
    assert _train(corpus, out, "torch", fault="mid-write:checkpoint.safetensors:3") \
        .returncode == -signal.SIGKILL
    assert load_checkpoint(out).config["step"] == 2 * EVERY
    resumed = _train(corpus, out, "torch", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(out, whole)


SOAK_STEPS, SOAK_EVERY, SOAK_KILLS = 400, 2, 10


def test_random_kills_soak(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
                           ) -> None:
    """SIGKILL at (seeded) random moments, SOAK_KILLS times, then let the run finish; after
    every kill a complete checkpoint loads, and the end is the uninterrupted run's."""
    often = ("--eval-every", str(SOAK_EVERY))      # a save every other step: kills land in them
    whole = tmp_path / "whole"
    assert _train(corpus, whole, "numpy", *often, steps=SOAK_STEPS).returncode == 0
    rng = random.Random(0)
    out = tmp_path / "run"
    kills, seen = 0, set()
    while True:
        resume = ["--resume"] if (out / CURRENT).exists() else []
        if resume and load_checkpoint(out).config["step"] == SOAK_STEPS:
            break          # killed after its last save, while it drew loss.png
        process = subprocess.Popen(_argv(corpus, out, "numpy", SOAK_STEPS, *often, *resume),
                                   env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            _, err = process.communicate(timeout=rng.uniform(0.25, 0.8)
                                         if kills < SOAK_KILLS else 300)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
            if (out / CURRENT).exists():
                seen.add(_assert_loadable(out, capsys,
                                          set(range(SOAK_EVERY, SOAK_STEPS + 1, SOAK_EVERY))))
            continue
        if process.returncode == 0 and kills < SOAK_KILLS and not resume:
            shutil.rmtree(out)     # finished before the first kill: start over, shorter wait
            continue
        assert process.returncode == 0, err[-2000:]
        break
    assert kills >= 3 and len(seen) >= 2, (kills, seen)
    _assert_same_run(out, whole, SOAK_STEPS)
    _assert_no_leftovers(out)


def test_a_mixed_or_edited_checkpoint_is_refused_naming_the_file(
        uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    where = current_checkpoint(out)
    older = sorted(p for p in (out / CHECKPOINTS).iterdir() if p != where)[-1]
    # the parameters of the step before, beside this step's config: a mixed set
    shutil.copy(older / "checkpoint.safetensors", where / "checkpoint.safetensors")
    for argv in (["eval", "--checkpoint", str(out)],
                 ["train", "--out", str(out), "--resume", "--steps", "20"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "checkpoint.safetensors" in err and "mixed" in err and len(err.splitlines()) == 1
    shutil.copy(older / "config.json", where / "config.json")
    shutil.copy(older / "manifest.json", where / "manifest.json")
    assert main(["eval", "--checkpoint", str(out)]) == 2          # older files, newer name
    assert "step" in capsys.readouterr().err
    (out / CURRENT).write_text("../../etc\n")
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert CURRENT in capsys.readouterr().err


def test_a_kill_mid_line_loses_only_that_metrics_line(uninterrupted: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    path = out / "metrics.jsonl"
    whole = read_metrics(path)
    path.write_bytes(path.read_bytes() + b'{"step": 13, "train_lo')       # torn last line
    assert read_metrics(path) == whole
    start = time.perf_counter()
    assert main(["train", "--out", str(out), "--resume", "--steps", str(STEPS + 1),
                 "--backend", "numpy"]) == 0
    assert time.perf_counter() - start < 120
    steps = [r["step"] for r in read_metrics(path)]
    assert steps == list(range(1, STEPS + 2))
    assert all(line.endswith(b"}") for line in path.read_bytes().splitlines())
    assert json.loads(path.read_bytes().splitlines()[-1])["step"] == STEPS + 1
