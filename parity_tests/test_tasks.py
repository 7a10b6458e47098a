"""The command line's tasks (seqtwin/tasks.py, seqtwin/checkpoint.py) end to end: the GPT
char-lm, translation with a Seq2Seq, ``eval``, ``--init-from`` fine-tuning with frozen
embeddings, corrupt checkpoints, and DistributedDataParallel under torchrun.

Runs are tiny (a few steps of models of width 8 to 16): they prove the paths work and that
both backends agree, not that the models learn (README's quality runs do that).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from seqtwin.checkpoint import current_checkpoint as ckpt
from seqtwin.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT = ["--model", "gpt", "--embed", "16", "--heads", "2", "--layers", "2", "--block", "16",
       "--batch", "8", "--lr", "1e-2"]
SEQ2SEQ = ["--task", "translate", "--model", "gru", "--embed", "8", "--hidden", "8",
           "--batch", "16", "--lr", "1e-2"]


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    # CI clones the repository with shared/ beside it: a missing corpus is a setup error
    assert path.is_file(), f"{path} is missing (tests read ../shared/data)"
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 6,000 characters of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(_shared("tinyshakespeare.txt").read_text(encoding="utf-8")[:6000],
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 eng-fra lines and the shared file's cut-off last line."""
    lines = _shared("eng-fra.txt").read_text(encoding="utf-8").split("\n")
    path = tmp_path_factory.mktemp("data") / "pairs.txt"
    path.write_text("\n".join(lines[:600] + [lines[-1]]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt_run(text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt")
    assert main(["train", "--data", str(text), "--out", str(out), "--steps", "12",
                 "--eval-every", "6", *GPT]) == 0
    return out


@pytest.fixture(scope="module")
def mt_run(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mt")
    assert main(["train", "--data", str(pairs), "--out", str(out), "--steps", "12",
                 "--eval-every", "6", "--attention", "general", "--bidirectional",
                 *SEQ2SEQ]) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- GPT char-lm

def test_gpt_training_writes_a_gpt_checkpoint_and_its_loss_falls(gpt_run: Path) -> None:
    config = json.loads((ckpt(gpt_run) / "config.json").read_text())
    assert config["model"]["kind"] == "gpt" and config["model"]["block_size"] == 16
    records = _metrics(gpt_run)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    saved = load_file(ckpt(gpt_run) / "checkpoint.safetensors")
    assert "transformer.h.1.attn.c_attn.weight" in saved


@pytest.mark.parametrize("mode", [("--greedy",), ("--beams", "3"),
                                  ("--seed", "4", "--top-p", "0.9")])
def test_gpt_generation_past_its_context_is_the_same_in_both_backends(
        gpt_run: Path, mode: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    # 40 new characters after a 5-character prompt: the 16-position context slides twice.
    argv = ["generate", "--checkpoint", str(gpt_run), "--prompt", "First",
            "--max-new-tokens", "40", *mode]
    torch_text = _run(capsys, *argv, "--backend", "torch")
    numpy_text = _run(capsys, *argv, "--backend", "numpy")
    assert torch_text.startswith("First") and len(torch_text) == len("First") + 40 + 1
    assert numpy_text == torch_text


def test_rnn_beam_search_text_is_the_same_in_both_backends(
        text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gru"
    assert main(["train", "--data", str(text), "--out", str(out), "--steps", "5",
                 "--model", "gru", "--embed", "8", "--hidden", "16", "--block", "16",
                 "--batch", "4"]) == 0
    argv = ["generate", "--checkpoint", str(out), "--prompt", "Ci", "--max-new-tokens",
            "20", "--beams", "4"]
    assert _run(capsys, *argv) == _run(capsys, *argv, "--backend", "numpy")


def test_char_eval_covers_the_whole_validation_split_in_both_backends(
        gpt_run: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "--checkpoint", str(gpt_run), "--json", "--dtype", "float64"]
    torch_result = json.loads(_run(capsys, *argv))
    numpy_result = json.loads(_run(capsys, *argv, "--backend", "numpy"))
    assert torch_result["task"] == "char-lm" and torch_result["step"] == 12
    # a barely trained model of 65-ish characters: between "perfect" and "uniform" + slack
    assert 0 < torch_result["val_loss"] < math.log(65) + 1
    assert math.isclose(torch_result["val_loss"], numpy_result["val_loss"], rel_tol=1e-10)
    assert math.isclose(torch_result["val_perplexity"], math.exp(torch_result["val_loss"]))


# ----------------------------------------------------------------------------- init-from

def test_init_from_fine_tunes_with_frozen_embeddings(
        gpt_run: Path, text: Path, tmp_path: Path) -> None:
    new_text = tmp_path / "new.txt"  # the lines in reverse: new text, the same characters
    lines = text.read_text(encoding="utf-8").splitlines()
    new_text.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    out = tmp_path / "tuned"
    assert main(["train", "--data", str(new_text), "--out", str(out), "--steps", "4",
                 "--init-from", str(gpt_run), "--freeze-embeddings", "--batch", "4",
                 "--block", "16", "--lr", "1e-2", "--backend", "numpy"]) == 0
    before = load_file(ckpt(gpt_run) / "checkpoint.safetensors")
    after = load_file(ckpt(out) / "checkpoint.safetensors")
    config = json.loads((ckpt(out) / "config.json").read_text())
    assert config["step"] == 4 and config["init_from"] == str(gpt_run)
    assert config["vocab"] == json.loads((ckpt(gpt_run) / "config.json").read_text())["vocab"]
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        np.testing.assert_array_equal(after[name], before[name])
    changed = [k for k in before if not np.array_equal(after[k], before[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    assert len(changed) == len(before) - 2
    optimizer = load_file(ckpt(out) / "optimizer.safetensors")
    assert "exp_avg.transformer.wte.weight" not in optimizer


def test_init_from_text_outside_the_vocabulary_exits_2(
        gpt_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    new_text = tmp_path / "new.txt"
    new_text.write_text("Zoë and the € " * 40, encoding="utf-8")
    argv = ["train", "--data", str(new_text), "--out", str(tmp_path / "x"), "--steps", "2",
            "--init-from", str(gpt_run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "€" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT2LMHeadModel saved by transformers, with a byte-level GPT-2 tokenizer of 256
    byte tokens and no merges (so it is built offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = tmp_path_factory.mktemp("hf-gpt2")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = 256
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=256, eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def test_init_from_a_transformers_gpt2_fine_tunes_on_its_tokens(
        hf_gpt2: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    from seqtwin.data import char_batches
    out = tmp_path / "tuned"
    assert main(["train", "--data", str(text), "--out", str(out), "--steps", "3",
                 "--init-from", str(hf_gpt2), "--freeze-embeddings", "--block", "16",
                 "--batch", "4", "--lr", "1e-2", "--dropout", "0"]) == 0
    # The first step's loss is transformers' loss on that batch: the weights were loaded.
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2).eval()
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    token_of_byte = {b: i for i, b in enumerate(bytes_to_unicode())}  # the fixture's vocab
    ids = np.array([token_of_byte[b] for b in text.read_bytes()])  # no merges: a token a byte
    x, y = char_batches(ids[:int(len(ids) * 0.9)], 4, 16, np.random.default_rng([0, 0]))
    with torch.no_grad():
        logits = hf(torch.from_numpy(x)).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 torch.from_numpy(y).flatten()).item()
    assert math.isclose(_metrics(out)[0]["train_loss"], expected, rel_tol=1e-5)
    assert json.loads((ckpt(out) / "config.json").read_text())["model"]["dropout"] == 0.0
    before = {k: v.numpy() for k, v in hf.state_dict().items()}
    after = load_file(ckpt(out) / "checkpoint.safetensors")
    np.testing.assert_array_equal(after["transformer.wte.weight"],
                                  before["transformer.wte.weight"])
    assert not np.array_equal(after["transformer.h.0.mlp.c_fc.weight"],
                              before["transformer.h.0.mlp.c_fc.weight"])
    assert (ckpt(out) / "tokenizer" / "tokenizer.json").is_file()
    argv = ["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--greedy",
            "--max-new-tokens", "24"]
    torch_text = _run(capsys, *argv)
    assert torch_text.startswith("ROMEO:")
    assert _run(capsys, *argv, "--backend", "numpy") == torch_text


# ----------------------------------------------------------------------------- translate

def test_translation_training_reports_loss_and_bleu(mt_run: Path) -> None:
    records = _metrics(mt_run)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    evals = [r for r in records if "val_bleu" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0 <= r["val_bleu"] <= 100 and math.isfinite(r["val_loss"]) for r in evals)
    config = json.loads((ckpt(mt_run) / "config.json").read_text())
    assert config["src_vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.mark.parametrize("beams", ["1", "3"])
def test_translate_gives_the_same_sentences_in_both_backends(
        mt_run: Path, beams: str, capsys: pytest.CaptureFixture) -> None:
    argv = ["translate", "--checkpoint", str(mt_run), "--text", "I am cold.", "--text",
            "Go!", "--text", "Who are you?", "--beams", beams, "--max-len", "8"]
    torch_lines = _run(capsys, *argv).splitlines()
    assert len(torch_lines) == 3
    assert all(len(line.split()) <= 8 for line in torch_lines)
    assert _run(capsys, *argv, "--backend", "numpy").splitlines() == torch_lines


def test_translate_reads_stdin(mt_run: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("I am cold.\n\nGo!\n"))
    assert len(_run(capsys, "translate", "--checkpoint", str(mt_run)).splitlines()) == 2


def test_bleu_scores_against_every_reference_given() -> None:
    from seqtwin.tasks import bleu
    assert bleu(["tu es tetu ."], [["tu es tetu ."]]) == pytest.approx(100.0)
    single = bleu(["tu es tetu ."], [["vous etes tetus ."]])
    assert single < 50
    assert bleu(["tu es tetu ."], [["vous etes tetus .", "tu es tetu ."]]) == pytest.approx(100)
    # a ragged list: the second sentence has one reference, the first two
    two = bleu(["a b c d", "e f g h"], [["a b c x", "a b c d"], ["e f g h"]])
    assert two == pytest.approx(100.0)


def test_translation_eval_gives_the_same_loss_and_bleu_in_both_backends(
        mt_run: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "--checkpoint", str(mt_run), "--json", "--dtype", "float64",
            "--beams", "2"]
    torch_result = json.loads(_run(capsys, *argv))
    numpy_result = json.loads(_run(capsys, *argv, "--backend", "numpy"))
    assert math.isclose(torch_result["val_loss"], numpy_result["val_loss"], rel_tol=1e-10)
    assert torch_result["val_bleu"] == numpy_result["val_bleu"]
    assert torch_result["val_bleu_multi"] == numpy_result["val_bleu_multi"]


@pytest.mark.parametrize("attention", ["none", "bahdanau"])
def test_translation_trains_with_each_decoder_partial_teacher_forcing_and_dropout(
        pairs: Path, attention: str, tmp_path: Path) -> None:
    out = tmp_path / attention
    assert main(["train", "--data", str(pairs), "--out", str(out), "--steps", "3",
                 "--eval-every", "3", "--attention", attention, "--teacher-forcing", "0.5",
                 "--dropout", "0.2",
                 *SEQ2SEQ[:2], "--model", "lstm", *SEQ2SEQ[4:]]) == 0
    config = json.loads((ckpt(out) / "config.json").read_text())
    assert config["train"]["teacher_forcing"] == 0.5
    assert config["model"]["attention"] == (None if attention == "none" else attention)
    assert config["model"]["dropout"] == 0.2
    assert all(math.isfinite(r["train_loss"]) for r in _metrics(out))


def test_a_torch_translation_run_resumes_in_numpy_on_the_same_batches(
        pairs: Path, mt_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(mt_run, out)
    (out / "metrics.jsonl").unlink()
    assert main(["train", "--out", str(out), "--steps", "14", "--resume",
                 "--backend", "numpy"]) == 0
    assert [r["step"] for r in _metrics(out)] == [13, 14]


# ----------------------------------------------------------------------------- bad files

def test_a_corrupt_checkpoint_file_exits_2_naming_it(gpt_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(gpt_run, bad)
    good = (ckpt(bad) / "checkpoint.safetensors").read_bytes()
    (ckpt(bad) / "checkpoint.safetensors").write_bytes(good[:len(good) // 2])  # cut short
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "checkpoint.safetensors" in err and "SHA-256" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_corrupt_config_exits_2(gpt_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(gpt_run, bad)
    (ckpt(bad) / "config.json").write_text("{not json", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_translation_checkpoint_is_refused_by_generate(
        mt_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--checkpoint", str(mt_run)]) == 2
    assert "'translate'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- torchrun

def _torchrun(nproc: int, argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "seqtwin.cli", *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_torchrun_processes_train_like_one_on_the_same_global_batch(
        pairs: Path, tmp_path: Path) -> None:
    """gloo on CPU. Translation rows hold unequal numbers of target words, so this also
    checks the loss weighting that makes the ranks' averaged gradient the global batch's."""
    argv = ["train", "--data", str(pairs), "--steps", "4", "--eval-every", "4",
            "--dtype", "float64", *SEQ2SEQ]
    _torchrun(1, [*argv, "--out", str(tmp_path / "one")])
    _torchrun(2, [*argv, "--out", str(tmp_path / "two")])
    one = load_file(ckpt(tmp_path / "one") / "checkpoint.safetensors")
    two = load_file(ckpt(tmp_path / "two") / "checkpoint.safetensors")
    assert one.keys() == two.keys()
    for name in one:  # equal up to the order of floating-point sums (float64)
        np.testing.assert_allclose(two[name], one[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    losses_one = [r["train_loss"] for r in _metrics(tmp_path / "one")]
    losses_two = [r["train_loss"] for r in _metrics(tmp_path / "two")]
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-10)
    assert not np.array_equal(one["decoder.head.weight"],
                              np.zeros_like(one["decoder.head.weight"]))


def test_torchrun_with_the_numpy_backend_exits_2(pairs: Path, tmp_path: Path) -> None:
    env = dict(os.environ, WORLD_SIZE="2", RANK="0")
    done = subprocess.run([sys.executable, "-m", "seqtwin.cli", "train", "--data", str(pairs),
                           "--out", str(tmp_path / "x"), "--backend", "numpy", *SEQ2SEQ],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--backend" in done.stderr
