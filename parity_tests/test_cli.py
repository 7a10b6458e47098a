"""The ``seqtwin`` command line (seqtwin/cli.py), run in-process through ``main(argv)``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from seqtwin.checkpoint import current_checkpoint as ckpt
from seqtwin.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--embed", "8", "--hidden", "16", "--block", "16", "--batch", "8", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4,000 characters of Tiny Shakespeare."""
    source = SHARED_DATA / "tinyshakespeare.txt"
    # CI clones the repository with shared/ beside it: a missing corpus is a setup error
    assert source.is_file(), f"{source} is missing (tests read ../shared/data)"
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(source.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of 20 torch steps."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", str(corpus), "--out", str(out), "--backend", "torch",
            "--steps", "20", "--eval-every", "10", *TINY]
    assert main(argv) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _generate(checkpoint: Path, backend: str, capsys: pytest.CaptureFixture, *extra: str
              ) -> str:
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(checkpoint), "--backend", backend,
            "--prompt", "First", "--max-new-tokens", "40", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_train_writes_checkpoint_files_and_the_loss_falls(trained: Path) -> None:
    for name in ("checkpoint.safetensors", "optimizer.safetensors", "config.json",
                 "manifest.json"):
        assert (ckpt(trained) / name).is_file(), name
    assert (trained / "metrics.jsonl").is_file()
    config = json.loads((ckpt(trained) / "config.json").read_text())
    assert config["step"] == 20 and config["task"] == "char-lm"
    records = _metrics(trained)
    assert [r["step"] for r in records] == list(range(1, 21))
    first, last = records[0]["train_loss"], records[-1]["train_loss"]
    assert math.isfinite(last) and last < first
    assert math.isfinite(records[-1]["val_loss"])


def test_a_torch_checkpoint_gives_the_same_greedy_text_in_both_backends(
        trained: Path, capsys: pytest.CaptureFixture) -> None:
    torch_text = _generate(trained, "torch", capsys, "--greedy")
    numpy_text = _generate(trained, "numpy", capsys, "--greedy")
    assert torch_text.startswith("First") and len(torch_text) == len("First") + 40 + 1
    assert numpy_text == torch_text


def test_sampling_with_one_seed_gives_the_same_text_in_both_backends(
        trained: Path, capsys: pytest.CaptureFixture) -> None:
    extra = ("--temperature", "0.8", "--top-k", "5", "--seed", "3")
    assert _generate(trained, "numpy", capsys, *extra) == _generate(trained, "torch", capsys,
                                                                     *extra)


def test_resume_continues_from_the_saved_step(corpus: Path, trained: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    argv = ["train", "--data", str(corpus), "--out", str(out), "--backend", "torch",
            "--steps", "25", "--eval-every", "10", "--resume", *TINY]
    assert main(argv) == 0
    assert json.loads((ckpt(out) / "config.json").read_text())["step"] == 25
    assert [r["step"] for r in _metrics(out)] == list(range(1, 26))


def test_training_into_a_used_directory_without_resume_is_refused(
        corpus: Path, trained: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--data", str(corpus), "--out", str(trained), "--steps", "30", *TINY]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["train", "--data", "no/such/file.txt", "--out", "x"], "--data"),
    (["train", "--data", "x", "--out", "x", "--steps", "0"], "--steps"),
    (["train", "--data", "x", "--out", "x", "--backend", "jax"], "--backend"),
    (["train", "--out", "x", "--task", "poetry"], "--task"),
    (["train", "--data", "x", "--out", "x", "--teacher-forcing", "1.5"], "--teacher-forcing"),
    (["train", "--out", "x", "--resume", "--init-from", "y"], "--init-from"),
    (["generate", "--checkpoint", "x", "--greedy", "--beams", "3"], "--beams"),
    (["translate", "--checkpoint", "x", "--beams", "0"], "--beams"),
    (["eval", "--checkpoint", "x", "--dtype", "float16"], "--dtype"),
    (["generate", "--checkpoint", "x", "--temperature", "-1"], "--temperature"),
])
def test_bad_arguments_exit_2_with_a_message_naming_the_argument(
        argv: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_a_checkpoint_directory_without_files_exits_2(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "CURRENT" in err and len(err.splitlines()) == 1


def test_a_prompt_outside_the_vocabulary_exits_2(trained: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "Zoë€"]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "€" in err and len(err.splitlines()) == 1


def test_a_torch_checkpoint_resumes_with_the_numpy_backend(corpus: Path, trained: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "metrics.jsonl").unlink()
    argv = ["train", "--data", str(corpus), "--out", str(out), "--backend", "numpy",
            "--steps", "22", "--resume", *TINY]
    assert main(argv) == 0
    records = _metrics(out)
    assert [r["step"] for r in records] == [21, 22]
    assert all(math.isfinite(r["train_loss"]) for r in records)


def test_keyboard_interrupt_saves_a_checkpoint_at_the_last_finished_step(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import seqtwin.cli as cli

    train_step = cli._train_step
    calls = []

    def interrupted_on_the_fourth_step(*args: object) -> float:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return train_step(*args)

    monkeypatch.setattr(cli, "_train_step", interrupted_on_the_fourth_step)
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--steps", "20", *TINY]
    assert main(argv) == 130
    assert json.loads((ckpt(out) / "config.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("content, found", [
    (b"", "is empty"),
    (b"  \n\t\n", "whitespace"),
    (b"\x00" * 4000, "NUL bytes"),
    (b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "one distinct character"),
    ("caf\u00e9 ".encode("latin-1") * 400, "not UTF-8"),
    (bytes(range(1, 9)) * 500, "control characters"),
    (b"to be or not to be", "--block"),
])
@pytest.mark.parametrize("task", ["char-lm", "translate", "summarize"])
def test_a_data_file_that_is_not_text_to_learn_from_exits_2_saying_what_it_holds(
        task: str, content: bytes, found: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    if found == "--block" and task != "char-lm":
        found = "0 usable"      # the pair and article loaders find no usable line in it
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    out = tmp_path / "out"
    assert main(["train", "--task", task, "--data", str(data), "--out", str(out),
                 "--steps", "2", *TINY]) == 2
    *notes, err = capsys.readouterr().err.splitlines()       # notes: lines it skipped
    assert "--data" in err and found in err, err
    assert all(note.startswith("note: ") for note in notes), notes
    assert not out.exists()                       # refused before anything was written


def test_an_out_that_is_a_file_or_a_foreign_directory_exits_2(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    for out, found in ((tmp_path / "file", "is a file"),
                       (tmp_path / "file" / "run", "not a writable directory"),
                       (tmp_path / "home", "not a seqtwin run directory")):
        assert main(["train", "--data", str(corpus), "--out", str(out), "--steps", "2",
                     *TINY]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and found in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "x"),
                 "--steps", "2", *TINY]) == 2                   # a directory as --data
    assert "--data" in capsys.readouterr().err


def _edit_config(run: Path, edit) -> None:
    """Rewrite the current checkpoint's config.json and its manifest entry, as a tool that
    writes its own checkpoints would: the set stays consistent, the content is what is
    tested."""
    import hashlib
    where = ckpt(run)
    config = json.loads((where / "config.json").read_text())
    edit(config)
    (where / "config.json").write_text(json.dumps(config))
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["files"]["config.json"] = hashlib.sha256(
        (where / "config.json").read_bytes()).hexdigest()
    (where / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, found", [
    (lambda c: c["model"].pop("hidden_size"), "missing 'hidden_size'"),
    (lambda c: c["model"].update(hidden=3), "unknown 'hidden'"),
    (lambda c: c.pop("vocab"), "'vocab'"),
    (lambda c: c.pop("train"), "'train'"),
    (lambda c: c.update(task="poetry"), "'task'"),
    (lambda c: c.update(vocab=c["vocab"][:-3]), "model.vocab_size"),
    (lambda c: c["model"].update(dropout="high"), "dropout"),
    (lambda c: c["model"].update(num_layers=0), "num_layers"),
    (lambda c: c.update(step=-1), "step"),
    (lambda c: c.update(dtype="float16"), "'dtype'"),
    (lambda c: c["train"].update(lr="fast"), "train.lr"),
    (lambda c: c["model"].update(kind="mamba"), "model.kind"),
])
def test_a_config_json_that_breaks_the_schema_exits_2_naming_the_key(
        trained: Path, tmp_path: Path, edit, found: str, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _edit_config(run, edit)
    for argv in (["eval", "--checkpoint", str(run)],
                 ["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "config.json" in err and found in err and len(err.splitlines()) == 1, err
