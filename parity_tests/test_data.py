"""seqtwin/data.py: the corpus loaders, on the real shared corpora and on small local files.

No test touches the network: downloads are exercised with ``file://`` urls in ``tmp_path``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from seqtwin.data import (
    ENG_FRA,
    TINY_SHAKESPEARE,
    CharVocab,
    WordVocab,
    char_batches,
    load_char_corpus,
    load_translation_pairs,
    normalize_sentence,
    pad_batch,
    resolve_corpus,
    sha256_file,
    translation_batches,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE_PATH = SHARED_DATA / TINY_SHAKESPEARE.file_name
ENG_FRA_PATH = SHARED_DATA / ENG_FRA.file_name


@pytest.fixture(scope="module")
def shakespeare():
    return load_char_corpus(SHAKESPEARE_PATH)


@pytest.fixture(scope="module")
def eng_fra():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_translation_pairs(ENG_FRA_PATH)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("corpus", [TINY_SHAKESPEARE, ENG_FRA], ids=lambda c: c.file_name)
def test_shared_file_sha256_matches_constant(corpus):
    assert sha256_file(SHARED_DATA / corpus.file_name) == corpus.sha256


def test_resolve_corpus_returns_local_path_as_is():
    assert resolve_corpus(SHAKESPEARE_PATH) == SHAKESPEARE_PATH


def test_resolve_corpus_missing_path_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        resolve_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="path: expected a file"):
        resolve_corpus(tmp_path)


def test_resolve_corpus_downloads_verifies_and_reuses_cache(tmp_path):
    source = tmp_path / "source" / "corpus.txt"
    source.parent.mkdir()
    source.write_text("hello corpus\n", encoding="utf-8")
    digest = sha256_file(source)
    cache = tmp_path / "cache"

    got = resolve_corpus(url=source.as_uri(), sha256=digest, cache_dir=cache)
    assert got == cache / "corpus.txt"
    assert got.read_text(encoding="utf-8") == "hello corpus\n"
    assert sorted(p.name for p in cache.iterdir()) == ["corpus.txt"]  # no temp file left

    source.unlink()  # a second call must not download again
    assert resolve_corpus(url=source.as_uri(), sha256=digest, cache_dir=cache) == got


def test_resolve_corpus_checksum_mismatch_raises_and_leaves_no_file(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("not the expected bytes\n", encoding="utf-8")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256: download of .* has sha256"):
        resolve_corpus(url=source.as_uri(), sha256="0" * 64, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_resolve_corpus_redownloads_cached_file_with_wrong_checksum(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("good bytes\n", encoding="utf-8")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "corpus.txt").write_text("stale bytes\n", encoding="utf-8")
    got = resolve_corpus(url=source.as_uri(), sha256=sha256_file(source), cache_dir=cache)
    assert got.read_text(encoding="utf-8") == "good bytes\n"


# ----------------------------------------------------------------------------- characters


def test_tiny_shakespeare_has_65_chars_and_split_adds_up(shakespeare):
    text = SHAKESPEARE_PATH.read_text(encoding="utf-8")
    assert len(shakespeare.vocab) == 65
    assert len(shakespeare.train) + len(shakespeare.val) == len(text)
    assert len(shakespeare.train) == int(len(text) * 0.9)
    assert shakespeare.train.dtype == np.int64


def test_char_encode_decode_round_trip(shakespeare):
    text = SHAKESPEARE_PATH.read_text(encoding="utf-8")[:2000]
    ids = shakespeare.vocab.encode(text)
    assert shakespeare.vocab.decode(ids) == text


def test_char_encode_unknown_char_names_it():
    with pytest.raises(ValueError, match=r"character '~' \(U\+007E\) at index 2"):
        CharVocab("abc").encode("ab~")


def test_char_batches_shapes_and_y_is_x_shifted(shakespeare):
    rng = np.random.default_rng(0)
    x, y = char_batches(shakespeare.train, batch_size=4, block_size=16, rng=rng)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row in range(4):  # each window is a real slice of the data
        text = shakespeare.vocab.decode(np.r_[x[row], y[row, -1]])
        assert text in SHAKESPEARE_PATH.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- words


@pytest.mark.parametrize("raw, normalized", [
    ("Ça alors\u202f!", "ca alors !"),
    ("Qu’est-ce que c'est ?", "qu'est ce que c'est ?"),
    ("Il a été élu.", "il a ete elu ."),
    ("« Bonjour », dit-il.", "bonjour dit il ."),
    ("I'm 42, Tom!", "i'm 42 tom !"),
])
def test_normalize_sentence_examples(raw, normalized):
    assert normalize_sentence(raw) == normalized


def test_eng_fra_reports_truncated_last_line():
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        data = load_translation_pairs(ENG_FRA_PATH)
    assert data.skipped == [(18066, "truncated last line (cut short mid-sentence)")]
    assert len(data.train_pairs) + len(data.val_pairs) == 18065


def test_eng_fra_split_is_deterministic_and_disjoint(eng_fra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_translation_pairs(ENG_FRA_PATH)
    assert again.train_pairs == eng_fra.train_pairs
    assert again.val_pairs == eng_fra.val_pairs
    # Disjoint as line positions; the corpus repeats some pairs verbatim, so compare indices.
    assert len(eng_fra.val_pairs) == 18065 - int(18065 * 0.9)
    lines = ENG_FRA_PATH.read_text(encoding="utf-8").split("\n")[:18065]
    all_pairs = [tuple(normalize_sentence(side) for side in line.split("\t")) for line in lines]
    assert Counter(eng_fra.train_pairs) + Counter(eng_fra.val_pairs) == Counter(all_pairs)


def test_eng_fra_vocab_specials_and_training_split_only(eng_fra):
    for vocab in (eng_fra.src_vocab, eng_fra.tgt_vocab):
        assert [vocab.stoi[w] for w in WordVocab.SPECIALS] == [0, 1, 2, 3]
        assert (vocab.PAD, vocab.BOS, vocab.EOS, vocab.UNK) == (0, 1, 2, 3)
    train_words = {w for english, _ in eng_fra.train_pairs for w in english.split()}
    assert set(eng_fra.src_vocab.itos[4:]) == train_words


def test_word_vocab_min_count_and_round_trip():
    vocab = WordVocab(["the cat .", "the dog .", "a cat"], min_count=2)
    assert vocab.itos[4:] == [".", "cat", "the"]  # count >= 2, most frequent first, ties a-z
    ids = vocab.encode("the bird .")
    assert ids.tolist() == [vocab.stoi["the"], WordVocab.UNK, vocab.stoi["."]]
    assert vocab.decode(np.r_[WordVocab.BOS, ids, WordVocab.EOS, WordVocab.PAD]) == \
        "the <unk> ."


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(
        "Go.\tVa !\n"                                    # 1 good
        "no tab here\n"                                   # 2 no tab
        "\tVide.\n"                                       # 3 empty english
        "Hi.\tSalut !\tCC-BY 2.0 (France) Attribution: tatoeba.org #1 (a) & #2 (b)\n"  # 4 ok
        "a\tb\tc\td\n"                                    # 5 too many columns
        "Run!\t\n"                                        # 6 empty french
        "\n"                                              # 7 blank: ignored
        "Wait.\tAttends",                                 # 8 no final newline: truncated
        encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 5 malformed line"):
        data = load_translation_pairs(path, val_fraction=0.0)
    assert [number for number, _ in data.skipped] == [2, 3, 5, 6, 8]
    reasons = dict(data.skipped)
    assert "got 1" in reasons[2] and "empty english" in reasons[3]
    assert "got 4" in reasons[5] and "empty french" in reasons[6]
    assert "truncated" in reasons[8]
    assert sorted(data.train_pairs) == [("go .", "va !"), ("hi .", "salut !")]


def test_pad_batch_pads_and_returns_lengths():
    ids, lengths = pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1])
    assert ids.dtype == lengths.dtype == np.int64


def test_translation_batches_shift_targets_by_bos_and_eos(eng_fra):
    rng = np.random.default_rng(0)
    batches = list(translation_batches(eng_fra.val_pairs[:10], eng_fra.src_vocab,
                                       eng_fra.tgt_vocab, batch_size=4, rng=rng))
    assert [len(b.src_lengths) for b in batches] == [4, 4, 2]
    for b in batches:
        assert b.src_ids.shape == (len(b.src_lengths), b.src_lengths.max())
        assert b.tgt_in.shape == b.tgt_out.shape == (len(b.tgt_lengths), b.tgt_lengths.max())
        assert np.all(b.tgt_in[:, 0] == WordVocab.BOS)
        words = b.tgt_in[:, 1:] != WordVocab.PAD  # y in both, one step apart
        np.testing.assert_array_equal(b.tgt_in[:, 1:][words], b.tgt_out[:, :-1][words])
        rows = np.arange(len(b.tgt_lengths))
        assert np.all(b.tgt_out[rows, b.tgt_lengths - 1] == WordVocab.EOS)


def test_seqtwin_imports_without_torch():
    code = "import sys, seqtwin; assert 'torch' not in sys.modules, 'seqtwin imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
