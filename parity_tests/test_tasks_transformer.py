"""The Transformer tasks of the command line: translation with ``--model transformer`` (word
and subword vocabularies) and summarisation (``--task summarize``, ``seqtwin summarize``,
ROUGE in ``eval``), and the BBC News loader behind it."""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from seqtwin.checkpoint import current_checkpoint as ckpt
from seqtwin.cli import main
from seqtwin.data import SubwordVocab, lead_baseline, load_summaries, vocab_from_metadata
from seqtwin.tasks import rouge

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRANSFORMER = ["--model", "transformer", "--embed", "16", "--heads", "2", "--layers", "1",
               "--ffn", "24", "--batch", "8", "--lr", "3e-3"]


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    # CI clones the repository with shared/ beside it: a missing corpus is a setup error
    assert path.is_file(), f"{path} is missing (tests read ../shared/data)"
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = _shared("eng-fra.txt").read_text(encoding="utf-8").split("\n")
    path = tmp_path_factory.mktemp("data") / "pairs.txt"
    path.write_text("\n".join(lines[:400]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def news(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 BBC articles, a blank line, a line that is not an object and one without a title."""
    lines = _shared("bbc-news-summary.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    path.write_text("\n".join(lines[:30] + ["", "[1, 2]", json.dumps({"article": "x y"})]
                              + lines[30:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mt_run(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tmt")
    assert main(["train", "--task", "translate", "--data", str(pairs), "--out", str(out),
                 "--steps", "8", "--eval-every", "4", *TRANSFORMER]) == 0
    return out


@pytest.fixture(scope="module")
def sum_run(news: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sum")
    assert main(["train", "--task", "summarize", "--data", str(news), "--out", str(out),
                 "--steps", "6", "--eval-every", "3", "--max-source-len", "48",
                 *TRANSFORMER]) == 0
    return out


# ----------------------------------------------------------------------------- translate

def test_transformer_translation_trains_and_reports_bleu(mt_run: Path) -> None:
    records = _metrics(mt_run)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    evals = [r for r in records if "val_bleu" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(0 <= r["val_bleu"] <= 100 and math.isfinite(r["val_loss"]) for r in evals)
    config = json.loads((ckpt(mt_run) / "config.json").read_text())
    assert config["model"]["kind"] == "transformer"
    assert config["model"]["max_len"] >= 64


@pytest.mark.parametrize("beams", ["1", "3"])
def test_transformer_translate_is_the_same_in_both_backends(
        mt_run: Path, beams: str, capsys: pytest.CaptureFixture) -> None:
    argv = ["translate", "--checkpoint", str(mt_run), "--text", "I am cold.", "--text",
            "Go!", "--beams", beams, "--max-len", "6"]
    torch_lines = _run(capsys, *argv).splitlines()
    assert len(torch_lines) == 2 and all(len(line.split()) <= 6 for line in torch_lines)
    assert _run(capsys, *argv, "--backend", "numpy").splitlines() == torch_lines


def test_a_subword_vocabulary_is_trained_saved_and_used_by_translate(
        pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bpe"
    assert main(["train", "--task", "translate", "--data", str(pairs), "--out", str(out),
                 "--steps", "2", "--eval-every", "2", "--vocab", "bpe", "--vocab-size", "200",
                 *TRANSFORMER]) == 0
    config = json.loads((ckpt(out) / "config.json").read_text())
    vocab = vocab_from_metadata(config["src_vocab"])
    assert isinstance(vocab, SubwordVocab) and len(vocab) <= 200
    assert config["model"]["src_vocab"] == len(vocab)
    lines = _run(capsys, "translate", "--checkpoint", str(out), "--text", "I am cold.",
                 "--beams", "1", "--max-len", "5").splitlines()
    assert len(lines) == 1


def test_a_shared_vocabulary_gives_one_embedding_table(news: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    assert main(["train", "--task", "summarize", "--data", str(news), "--out", str(out),
                 "--steps", "2", "--eval-every", "2", "--max-source-len", "32",
                 "--share-vocab", *TRANSFORMER]) == 0
    config = json.loads((ckpt(out) / "config.json").read_text())
    assert config["src_vocab"] == config["tgt_vocab"]
    assert config["model"]["share_embeddings"] and config["model"]["tie_embeddings"]
    assert config["model"]["src_vocab"] == config["model"]["tgt_vocab"]
    from safetensors.numpy import load_file
    names = set(load_file(str(ckpt(out) / "checkpoint.safetensors")))
    assert "src_embedding.weight" in names and "tgt_embedding.weight" not in names


def test_a_pointer_model_trains_with_one_vocabulary_and_both_backends_summarize_alike(
        news: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pointer"
    assert main(["train", "--task", "summarize", "--data", str(news), "--out", str(out),
                 "--steps", "4", "--eval-every", "2", "--max-source-len", "32",
                 "--pointer", *TRANSFORMER]) == 0
    config = json.loads((ckpt(out) / "config.json").read_text())
    assert config["model"]["pointer"] and config["src_vocab"] == config["tgt_vocab"]
    assert not config["model"]["share_embeddings"]
    from safetensors.numpy import load_file
    names = set(load_file(str(ckpt(out) / "checkpoint.safetensors")))
    assert {"pointer.query.weight", "pointer.gate.weight", "pointer.gate.bias"} <= names
    assert all(math.isfinite(m["loss"]) for m in _metrics(out) if "loss" in m)
    text = "the minister said the bank will raise rates again next year"
    lines = [_run(capsys, "summarize", "--checkpoint", str(out), "--text", text, "--beams",
                  "2", "--max-len", "6", "--backend", backend) for backend in ("torch", "numpy")]
    assert lines[0] == lines[1] and lines[0].strip()


def test_pointer_with_a_recurrent_model_exits_2(news: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--task", "summarize", "--data", str(news), "--out",
                 str(tmp_path / "x"), "--steps", "2", "--pointer", "--model", "lstm"]) == 2
    assert "--pointer" in capsys.readouterr().err


@pytest.mark.parametrize("kind", SubwordVocab.KINDS)
def test_subword_pieces_decode_back_to_the_words(kind: str) -> None:
    sentences = ["je suis tres fatigue .", "tu es tres grossier .", "il fait froid ."] * 20
    vocab = SubwordVocab.train(sentences, 60, kind)
    assert len(vocab) <= 60
    for sentence in sentences[:3]:
        ids = vocab.encode(sentence)
        assert ids.dtype == np.int64 and ids.min() > vocab.UNK
        assert vocab.decode(np.r_[vocab.BOS, ids, vocab.EOS, ids]) == sentence
    again = vocab_from_metadata(json.loads(json.dumps(vocab.to_metadata())))
    assert again.encode(sentences[0]).tolist() == vocab.encode(sentences[0]).tolist()
    with pytest.raises(ValueError, match="vocab_size"):
        SubwordVocab.train(sentences, 3, kind)
    with pytest.raises(ValueError, match="ids"):
        vocab.decode([len(vocab)])


def test_transformer_with_partial_teacher_forcing_exits_2(pairs: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--task", "translate", "--data", str(pairs), "--out",
                 str(tmp_path / "x"), "--steps", "2", "--teacher-forcing", "0.5",
                 *TRANSFORMER]) == 2
    assert "--teacher-forcing" in capsys.readouterr().err


def test_heads_that_do_not_divide_the_width_exit_2(pairs: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--task", "translate", "--data", str(pairs), "--out", str(tmp_path / "x"),
            "--steps", "2", *TRANSFORMER, "--heads", "3"]
    assert main(argv) == 2
    assert "--heads" in capsys.readouterr().err


# ----------------------------------------------------------------------------- summarize

def test_the_loader_reports_bad_lines_with_their_numbers_and_counts_truncations(
        news: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_summaries(news, "title", max_source_len=48, val_fraction=0.1)
    assert [n for n, _ in data.skipped] == [32, 33]
    assert "expected a JSON object" in data.skipped[0][1]
    assert "field 'title'" in data.skipped[1][1]
    assert len(caught) == 1 and "line 32" in str(caught[0].message)
    assert len(data.train_pairs) + len(data.val_pairs) == 60 and len(data.val_pairs) == 6
    assert all(len(a.split()) <= 48 for a, _ in data.train_pairs + data.val_pairs)
    assert data.truncated == 60   # every BBC article is longer than 48 words
    with pytest.warns(UserWarning, match="skipped 2"):
        again = load_summaries(news, "title", max_source_len=48)
    assert again.val_pairs == data.val_pairs            # a fixed, seeded split
    with pytest.warns(UserWarning, match="field 'summary'"):
        summary = load_summaries(news, "summary", max_source_len=48)
    assert np.median([len(t.split()) for _, t in summary.train_pairs]) > \
        np.median([len(t.split()) for _, t in data.train_pairs])


def test_the_loader_refuses_bad_arguments_and_empty_files(tmp_path: Path, news: Path) -> None:
    with pytest.raises(ValueError, match="target"):
        load_summaries(news, "body")
    with pytest.raises(ValueError, match="max_source_len"):
        load_summaries(news, max_source_len=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_summaries(empty)
    one = tmp_path / "one.jsonl"
    one.write_text("[1]\n" + json.dumps({"article": "a b c", "title": "a"}) + "\n",
                   encoding="utf-8")
    with pytest.warns(UserWarning, match="line 1"), \
            pytest.raises(ValueError, match="1 usable example"):
        load_summaries(one)


def test_rouge_and_the_lead_baseline() -> None:
    scores = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert rouge(["dogs bark"], ["the cat sat"])["rouge1"] == 0.0
    # stemming: "running" and "runs" share the stem "run"
    assert rouge(["running fast"], ["runs fast"])["rouge1"] == pytest.approx(100.0)
    assert lead_baseline("a b c d e", 3) == "a b c"
    with pytest.raises(ValueError, match="equal"):
        rouge(["a"], [])


def test_summarization_trains_and_reports_rouge_beside_the_lead_baseline(
        sum_run: Path, capsys: pytest.CaptureFixture) -> None:
    records = _metrics(sum_run)
    evals = [r for r in records if "val_rouge1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        for key in ("val_rouge1", "val_rouge2", "val_rougeL", "lead_rouge1", "lead_rougeL"):
            assert 0 <= r[key] <= 100, key
    assert evals[0]["lead_rouge1"] > 0
    config = json.loads((ckpt(sum_run) / "config.json").read_text())
    assert config["target"] == "title" and config["train"]["max_source_len"] == 48


def test_summarization_eval_is_the_same_in_both_backends(sum_run: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "--checkpoint", str(sum_run), "--json", "--dtype", "float64",
            "--beams", "2"]
    torch_result = json.loads(_run(capsys, *argv))
    numpy_result = json.loads(_run(capsys, *argv, "--backend", "numpy"))
    assert math.isclose(torch_result["val_loss"], numpy_result["val_loss"], rel_tol=1e-10)
    for key in ("val_rouge1", "val_rouge2", "val_rougeL"):
        assert torch_result[key] == numpy_result[key], key
    text = _run(capsys, "eval", "--checkpoint", str(sum_run), "--beams", "1")
    assert "ROUGE-1/2/L" in text and "lead baseline" in text


def test_summarize_reads_an_article_on_stdin(sum_run: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    article = json.loads(_shared("bbc-news-summary.jsonl").read_text(
        encoding="utf-8").splitlines()[100])["article"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(article))
    torch_lines = _run(capsys, "summarize", "--checkpoint", str(sum_run), "--beams", "2",
                       "--max-len", "6").splitlines()
    assert len(torch_lines) == 1 and len(torch_lines[0].split()) <= 6
    monkeypatch.setattr(sys, "stdin", io.StringIO(article))
    assert _run(capsys, "summarize", "--checkpoint", str(sum_run), "--beams", "2",
                "--max-len", "6", "--backend", "numpy").splitlines() == torch_lines


def test_summarize_refuses_a_translation_checkpoint_and_empty_input(
        mt_run: Path, sum_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["summarize", "--checkpoint", str(mt_run), "--text", "a b c"]) == 2
    assert "'summarize'" in capsys.readouterr().err
    assert main(["summarize", "--checkpoint", str(sum_run), "--text", "   "]) == 2
    assert "--text" in capsys.readouterr().err
