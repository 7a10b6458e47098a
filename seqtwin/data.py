"""Corpus loaders shared by both backends: NumPy int64 arrays out.

Two corpora (see ``../shared/data/README.md``):

- Tiny Shakespeare, char level: ``CharVocab``, ``load_char_corpus``, ``char_batches``
  (nanoGPT's ``get_batch``).
- eng-fra sentence pairs, word level: ``normalize_sentence``, ``WordVocab``,
  ``load_translation_pairs``, ``pad_batch``, ``translation_batches``.
- BBC News summaries (JSONL), word level: ``load_summaries`` (article -> title or summary).

``resolve_corpus`` finds a corpus file: a local path as is, or a download into a
checksummed cache. torch_impl callers wrap the arrays with ``torch.from_numpy``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

# ----------------------------------------------------------------------------- corpus files


class CorpusFile(NamedTuple):
    """Where a corpus comes from and the sha256 of the copy in ``shared/data``."""

    file_name: str
    url: str
    sha256: str


TINY_SHAKESPEARE = CorpusFile(
    file_name="tinyshakespeare.txt",
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)

# The url is manythings.org's zip of the *current, full* export (``fra.txt`` inside, with a
# third attribution column); its checksum changes with each export, so the sha256 here is
# that of the shared 18,066-pair subset, and the zip is fetched and unpacked by hand.
ENG_FRA = CorpusFile(
    file_name="eng-fra.txt",
    url="https://www.manythings.org/anki/fra-eng.zip",
    sha256="83c52c40b50fc3e2c8fdaeda0e71b9beee889547b745822b7574dc88ad4f9b76",
)

# Kaggle's "BBC News Summary" is a zip of per-article text files; the JSONL in shared/data is
# built from it (see its README), so the sha256 is the JSONL's and the url where it comes from.
BBC_NEWS_SUMMARY = CorpusFile(
    file_name="bbc-news-summary.jsonl",
    url="https://www.kaggle.com/datasets/pariza/bbc-news-summary",
    sha256="b0f15e3f3b2bd473c5902df912de95b8f43213e288efb7264713efddc1b33388",
)

DEFAULT_CACHE_DIR = Path("~/.cache/seqtwin")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_corpus(path: str | os.PathLike | None = None, url: str | None = None,
                   sha256: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local file for a corpus.

    ``path`` given: used as is (it must exist and be a file; ``sha256`` is not checked).
    Otherwise ``url`` is downloaded to ``cache_dir / <last part of the url>`` (default
    ``~/.cache/seqtwin``), its sha256 checked when ``sha256`` is given, and written
    atomically (temp file + rename). A cached file is reused when its checksum matches (or
    when no ``sha256`` is given); a cached file that does not match is downloaded again. A
    download whose checksum does not match is deleted and raises ``ValueError``.
    """
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists():
            raise FileNotFoundError(f"path: no such file: {str(local)!r}")
        if not local.is_file():
            raise ValueError(f"path: expected a file, got a directory or special file: "
                             f"{str(local)!r}")
        return local
    if url is None:
        raise ValueError("path, url: expected a local path or a url to download, got neither")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256: expected 64 hex digits, got {sha256!r}")
    file_name = Path(urllib.parse.urlparse(url).path).name
    if not file_name:
        raise ValueError(f"url: expected a url ending in a file name, got {url!r}")

    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    target = cache / file_name
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256.lower()):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # The temp file sits beside the target so the rename is atomic (same file system).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=cache)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ValueError(f"sha256: download of {url!r} has sha256 {got}, "
                             f"expected {sha256.lower()}; the download was deleted")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")


# ----------------------------------------------------------------------------- characters


class CharVocab:
    """Character vocabulary: the sorted distinct characters of a text, ids ``0..V-1``."""

    def __init__(self, text: str) -> None:
        self.chars: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``(len(text),)`` int64 ids; a character outside the vocabulary is a ValueError."""
        try:
            return np.array([self.stoi[ch] for ch in text], dtype=np.int64)
        except KeyError as err:
            ch = err.args[0]
            raise ValueError(f"text: character {ch!r} (U+{ord(ch):04X}) at index "
                             f"{text.index(ch)} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of a 1-D sequence of ids, each in ``0..V-1``."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids: expected a 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.chars)):
            bad = int(ids[(ids < 0) | (ids >= len(self.chars))][0])
            raise ValueError(f"ids: values must be in 0..{len(self.chars) - 1}, got {bad}")
        return "".join(self.chars[i] for i in ids.tolist())


class CharCorpus(NamedTuple):
    """A char-level corpus: vocabulary and the ``(N_train,)`` / ``(N_val,)`` int64 ids."""

    vocab: CharVocab
    train: np.ndarray
    val: np.ndarray


def read_text(path: str | os.PathLike) -> str:
    """A data file's text, refused with a ValueError saying what was found when it is not
    text a model can learn from: unreadable, empty (or only whitespace), binary (NUL bytes or
    mostly control characters), not UTF-8, or a single repeated character."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{str(path)!r} is not readable ({err.strerror or err})") from None
    if not data.strip():
        raise ValueError(f"{str(path)!r} is empty" + (f" ({len(data)} bytes of whitespace)"
                                                       if data else ""))
    nul = data.count(0)
    if nul:
        raise ValueError(f"{str(path)!r} looks binary, not text: {nul} NUL bytes in "
                         f"{len(data)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                         f"offset {err.start})") from None
    control = len(re.findall("[\x00-\x08\x0e-\x1f]", text))   # not tab or line breaks
    if control > len(text) // 10:
        raise ValueError(f"{str(path)!r} looks binary, not text: {control} control "
                         f"characters in {len(text)}")
    if len(set(text)) == 1:
        raise ValueError(f"{str(path)!r} holds one distinct character ({text[0]!r} x "
                         f"{len(text)}); there is nothing to model")
    return text


def load_char_corpus(path: str | os.PathLike, val_fraction: float = 0.1) -> CharCorpus:
    """Read a UTF-8 text; the first ``1 - val_fraction`` is train, the rest validation.

    As nanoGPT's ``shakespeare_char/prepare.py``: the vocabulary is every character of
    the whole text, and the split is a cut at ``int(N * (1 - val_fraction))``.
    """
    _check_fraction("val_fraction", val_fraction)
    text = read_text(resolve_corpus(path))
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return CharCorpus(vocab, ids[:n_train], ids[n_train:])


def char_batches(data: np.ndarray, batch_size: int, block_size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One batch of random windows (nanoGPT's ``get_batch``).

    ``x[b] = data[s_b : s_b + block_size]`` and ``y[b] = data[s_b + 1 : s_b + block_size + 1]``
    for start offsets ``s_b`` drawn uniformly from ``rng``; both ``(batch_size, block_size)``
    int64.
    """
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise ValueError(f"data: expected a 1-D numpy.ndarray of ids, got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not 1 <= block_size < len(data):
        raise ValueError(f"block_size: expected 1 <= block_size < len(data) = {len(data)}, "
                         f"got {block_size}")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    offsets = starts[:, None] + np.arange(block_size)[None, :]
    return data[offsets].astype(np.int64), data[offsets + 1].astype(np.int64)


# ----------------------------------------------------------------------------- words

_SENTENCE_END = re.compile(r"([.!?])")


def normalize_sentence(s: str) -> str:
    """Lower-case, accent-free, space-separated tokens.

    1. lower-case; curly apostrophes ``’ ‘`` become ``'``;
    2. strip accents: NFD, then drop combining marks (``é`` -> ``e``, ``ç`` -> ``c``);
    3. ``.``, ``!`` and ``?`` become tokens of their own;
    4. letters (any script: ``œ`` stays), digits and ``'`` are kept; every other
       character (``,`` ``-`` ``:`` quotes, ``« »``, narrow no-break spaces) is a space;
    5. runs of spaces collapse to one, no leading or trailing space.

    ``"Ça alors\u202f!"`` -> ``"ca alors !"``; ``"Qu'est-ce que c'est ?"`` ->
    ``"qu'est ce que c'est ?"``. Apostrophes stay inside words (``l'ont`` is one token).
    """
    s = s.lower().replace("\u2019", "'").replace("\u2018", "'")
    s = "".join(ch for ch in unicodedata.normalize("NFD", s) if not unicodedata.combining(ch))
    s = _SENTENCE_END.sub(r" \1 ", s)
    s = "".join(ch if ch.isalnum() or ch in "'.!?" else " " for ch in s)
    return " ".join(s.split())


class WordVocab:
    """Word vocabulary with ``PAD=0, BOS=1, EOS=2, UNK=3`` and then the words.

    Words seen at least ``min_count`` times, most frequent first (ties alphabetical), so
    ids are the same on every run. Sentences are normalised strings, split on spaces.
    """

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, sentences: Sequence[str], min_count: int = 1) -> None:
        if min_count < 1:
            raise ValueError(f"min_count: expected >= 1, got {min_count}")
        counts = Counter(word for sentence in sentences for word in sentence.split())
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        self.itos: list[str] = list(self.SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.min_count = min_count

    @classmethod
    def from_itos(cls, itos: Sequence[str]) -> "WordVocab":
        """The vocabulary whose id -> word list is ``itos`` (as saved in a checkpoint)."""
        itos = list(itos)
        if itos[:len(cls.SPECIALS)] != list(cls.SPECIALS) or len(set(itos)) != len(itos):
            raise ValueError(f"itos: expected {list(cls.SPECIALS)} then distinct words, got "
                             f"{itos[:6]}...")
        vocab = cls([], 1)
        vocab.itos = itos
        vocab.stoi = {w: i for i, w in enumerate(itos)}
        return vocab

    def __len__(self) -> int:
        return len(self.itos)

    def to_metadata(self) -> list[str]:
        return list(self.itos)

    def encode(self, sentence: str) -> np.ndarray:
        """``(n_words,)`` int64 ids of a normalised sentence; unknown words are ``UNK``."""
        return np.array([self.stoi.get(w, self.UNK) for w in sentence.split()], dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Words joined by spaces: ``PAD`` and ``BOS`` dropped, stops at the first ``EOS``,
        ``UNK`` shown as ``<unk>``."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids: expected a 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.itos)):
            bad = int(ids[(ids < 0) | (ids >= len(self.itos))][0])
            raise ValueError(f"ids: values must be in 0..{len(self.itos) - 1}, got {bad}")
        words = []
        for i in ids.tolist():
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.itos[i])
        return " ".join(words)


class SubwordVocab:
    """A subword vocabulary (BPE or unigram, trained with Hugging Face ``tokenizers``) used
    where a ``WordVocab`` is: the same ``PAD=0, BOS=1, EOS=2, UNK=3`` and then the learned
    pieces. Normalised sentences are split on spaces first (a ``▁`` marks a word start), so
    decoding gives back the space-separated words. Saved in a checkpoint as the tokenizer's
    JSON (``to_metadata``)."""

    PAD, BOS, EOS, UNK = WordVocab.PAD, WordVocab.BOS, WordVocab.EOS, WordVocab.UNK
    SPECIALS = WordVocab.SPECIALS
    KINDS = ("bpe", "unigram")

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in self.SPECIALS]
        if ids != [self.PAD, self.BOS, self.EOS, self.UNK]:
            raise ValueError(f"tokenizer: expected the special tokens {list(self.SPECIALS)} at "
                             f"ids 0..3, got ids {ids}")

    @staticmethod
    def _tokenizers() -> object:
        try:
            import tokenizers
        except ImportError:  # pragma: no cover - the cli extra installs it
            raise ImportError("subword vocabularies need tokenizers: "
                              "pip install 'seqtwin[cli]'") from None
        return tokenizers

    @classmethod
    def train(cls, sentences: Sequence[str], vocab_size: int, kind: str = "bpe"
              ) -> "SubwordVocab":
        """Learn ``vocab_size`` pieces (specials included) from normalised sentences."""
        if kind not in cls.KINDS:
            raise ValueError(f"kind: expected 'bpe' or 'unigram', got {kind!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
                or vocab_size <= len(cls.SPECIALS):
            raise ValueError(f"vocab_size: expected an int > {len(cls.SPECIALS)}, "
                             f"got {vocab_size!r}")
        tk = cls._tokenizers()
        specials = list(cls.SPECIALS)
        if kind == "bpe":
            tokenizer = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
            trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                             show_progress=False)
        else:
            tokenizer = tk.Tokenizer(tk.models.Unigram())
            trainer = tk.trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                 unk_token="<unk>", show_progress=False)
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace()
        tokenizer.decoder = tk.decoders.Metaspace()
        tokenizer.train_from_iterator(list(sentences), trainer)
        return cls(tokenizer)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "SubwordVocab":
        try:
            return cls(cls._tokenizers().Tokenizer.from_str(metadata["tokenizer"]))
        except Exception as err:  # a missing key, or JSON that tokenizers refuses
            raise ValueError(f"a subword vocabulary's metadata does not load: {err}") from None

    def to_metadata(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str()}

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, sentence: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(sentence).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The words: PAD and BOS dropped, stops at the first EOS, unknown pieces dropped."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids: expected a 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = int(ids[(ids < 0) | (ids >= len(self))][0])
            raise ValueError(f"ids: values must be in 0..{len(self) - 1}, got {bad}")
        kept = []
        for i in ids.tolist():
            if i == self.EOS:
                break
            kept.append(i)
        return " ".join(self.tokenizer.decode(kept).split())


def vocab_from_metadata(value: object) -> WordVocab | SubwordVocab:
    """The vocabulary a checkpoint saved: a word list (``WordVocab.itos``) or a subword
    tokenizer (``SubwordVocab.to_metadata``)."""
    if isinstance(value, dict):
        return SubwordVocab.from_metadata(value)
    if isinstance(value, list) and all(isinstance(w, str) for w in value):
        return WordVocab.from_itos(value)
    raise ValueError(f"vocabulary: expected a list of words or a tokenizer object, "
                     f"got {type(value).__name__}")


class TranslationData(NamedTuple):
    """eng-fra pairs, normalised: ``(english, french)`` strings per pair.

    ``skipped`` lists ``(line_number, reason)`` for each line not loaded (1-based).
    """

    src_vocab: WordVocab
    tgt_vocab: WordVocab
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]
    skipped: list[tuple[int, str]]


_FINAL_PUNCTUATION = ".!?…»\""


def _parse_pair_line(line: str) -> tuple[tuple[str, str] | None, str | None]:
    """``((english, french), None)`` for a good line, ``(None, reason)`` for a bad one."""
    columns = line.split("\t")
    # Newer manythings.org exports add a third column: "CC-BY 2.0 (France) Attribution: ...".
    if len(columns) == 3 and ("Attribution" in columns[2] or columns[2].startswith("CC-BY")):
        columns = columns[:2]
    if len(columns) != 2:
        return None, (f"expected 2 tab-separated columns (english, french), "
                      f"got {len(columns)}")
    english, french = (normalize_sentence(c) for c in columns)
    if not english or not french:
        side = "english" if not english else "french"
        return None, f"empty {side} side"
    return (english, french), None


def _is_truncated_last_line(line: str, ends_with_newline: bool) -> bool:
    """A last line is cut short when the file has no final newline, or when its French side
    lacks the sentence-final punctuation that its English side has (``Ils l'ont ``)."""
    if not ends_with_newline:
        return True
    columns = line.split("\t")
    if len(columns) < 2:
        return False  # reported as malformed anyway
    english, french = columns[0].rstrip(), columns[1].rstrip()
    return english[-1:] in (".", "!", "?") and french[-1:] not in _FINAL_PUNCTUATION


def load_translation_pairs(path: str | os.PathLike, max_len: int | None = None,
                           val_fraction: float = 0.1, seed: int = 0,
                           min_count: int = 1) -> TranslationData:
    """Read ``english<TAB>french`` lines, normalise them and split train / validation.

    Malformed lines are skipped and listed in ``skipped`` as ``(line_number, reason)``, with
    one ``warnings.warn`` summary: a line without exactly two columns (a third column is
    dropped when it is the newer exports' attribution, ``CC-BY 2.0 (France) Attribution:
    ...``), a side empty after normalisation, and a truncated last line (see
    ``_is_truncated_last_line``). Blank lines are ignored silently.

    ``max_len`` drops pairs with a side longer than ``max_len`` words (not reported). The
    validation pairs are the first ``N - int(N * (1 - val_fraction))`` of a permutation
    drawn from ``np.random.default_rng(seed)``, so the split is the same on every call. Both
    vocabularies are built from the training pairs only (words seen ``min_count`` times).
    """
    _check_fraction("val_fraction", val_fraction)
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len: expected None or >= 1, got {max_len}")
    file = resolve_corpus(path)
    text = read_text(file)
    lines = text.split("\n")
    ends_with_newline = text.endswith("\n")
    if ends_with_newline:
        lines.pop()  # the empty string after the final newline

    pairs: list[tuple[str, str]] = []
    skipped: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if number == len(lines) and _is_truncated_last_line(line, ends_with_newline):
            skipped.append((number, "truncated last line (cut short mid-sentence)"))
            continue
        pair, reason = _parse_pair_line(line)
        if pair is None:
            skipped.append((number, reason))
            continue
        if max_len is None or max(len(pair[0].split()), len(pair[1].split())) <= max_len:
            pairs.append(pair)
    if skipped:
        first = "; ".join(f"line {n}: {reason}" for n, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"{file.name}: skipped {len(skipped)} malformed line(s): {first}{more}",
                      stacklevel=2)
    if len(pairs) < 2:
        kept = "" if max_len is None else f" of at most {max_len} words (max_len)"
        raise ValueError(f"path: {file.name} holds {len(pairs)} usable pair(s){kept}; a "
                         f"training and a validation split need at least 2 (lines "
                         f"english<TAB>french)")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = len(pairs) - int(len(pairs) * (1.0 - val_fraction))
    val_pairs = [pairs[i] for i in order[:n_val]]
    train_pairs = [pairs[i] for i in order[n_val:]]
    src_vocab = WordVocab([english for english, _ in train_pairs], min_count)
    tgt_vocab = WordVocab([french for _, french in train_pairs], min_count)
    return TranslationData(src_vocab, tgt_vocab, train_pairs, val_pairs, skipped)


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D id sequences into ``ids (B, T)`` int64, ``T`` the longest, padded with
    ``pad_id``; ``lengths (B,)`` int64."""
    if len(sequences) == 0:
        raise ValueError("sequences: expected at least one sequence, got none")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    ids = np.full((len(sequences), int(lengths.max())), pad_id, dtype=np.int64)
    for b, sequence in enumerate(sequences):
        ids[b, :len(sequence)] = sequence
    return ids, lengths


class TranslationBatch(NamedTuple):
    """One batch of pairs. ``tgt_in = BOS + y`` and ``tgt_out = y + EOS`` share
    ``tgt_lengths = len(y) + 1``; padding is ``PAD`` everywhere.

    src_ids (B, S), src_lengths (B,), tgt_in (B, T), tgt_out (B, T), tgt_lengths (B,).
    """

    src_ids: np.ndarray
    src_lengths: np.ndarray
    tgt_in: np.ndarray
    tgt_out: np.ndarray
    tgt_lengths: np.ndarray


def translation_batches(pairs: Sequence[tuple[str, str]], src_vocab: WordVocab,
                        tgt_vocab: WordVocab, batch_size: int,
                        rng: np.random.Generator) -> Iterator[TranslationBatch]:
    """One epoch over ``pairs`` in an order shuffled by ``rng``; the last batch may be
    smaller than ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    order = rng.permutation(len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = [pairs[i] for i in order[start:start + batch_size]]
        src_ids, src_lengths = pad_batch([src_vocab.encode(s) for s, _ in chunk],
                                         WordVocab.PAD)
        targets = [tgt_vocab.encode(t) for _, t in chunk]
        tgt_in, tgt_lengths = pad_batch([np.r_[WordVocab.BOS, y] for y in targets],
                                        WordVocab.PAD)
        tgt_out, _ = pad_batch([np.r_[y, WordVocab.EOS] for y in targets], WordVocab.PAD)
        yield TranslationBatch(src_ids, src_lengths, tgt_in, tgt_out, tgt_lengths)


# ----------------------------------------------------------------------------- summaries

SUMMARY_TARGETS = ("title", "summary")
SUMMARY_FIELDS = ("article",) + SUMMARY_TARGETS


class SummaryData(NamedTuple):
    """BBC News articles and their targets, normalised (``normalize_sentence``):
    ``(article, target)`` strings per example, the article cut to ``max_source_len`` words.

    ``truncated`` counts the loaded articles (train and validation) that were cut;
    ``skipped`` lists ``(line_number, reason)`` for each line not loaded (1-based).
    """

    src_vocab: WordVocab
    tgt_vocab: WordVocab
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]
    skipped: list[tuple[int, str]]
    truncated: int
    max_source_len: int


def _parse_summary_line(line: str, target: str) -> tuple[tuple[str, str] | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    for field in ("article", target):
        if not isinstance(record.get(field), str):
            got = "missing" if field not in record else type(record[field]).__name__
            return None, f"field {field!r}: expected a string, got {got}"
    article, wanted = normalize_sentence(record["article"]), normalize_sentence(record[target])
    if not article or not wanted:
        return None, f"empty {'article' if not article else target}"
    return (article, wanted), None


def load_summaries(path: str | os.PathLike, target: str = "title", max_source_len: int = 400,
                   val_fraction: float = 0.1, seed: int = 0,
                   min_count: int = 2) -> SummaryData:
    """Read the BBC News JSONL (one object a line with ``article``, ``title``, ``summary``):
    ``article`` -> ``target`` (``"title"``, headline generation, or ``"summary"``, the
    extractive summary), normalised, split train / validation.

    Lines that are not JSON objects or lack a string field are skipped and listed in
    ``skipped`` with one ``warnings.warn`` summary; blank lines are ignored. Articles longer
    than ``max_source_len`` words keep their first ``max_source_len`` (``truncated`` counts
    them). The validation examples are the first ``N - int(N * (1 - val_fraction))`` of a
    permutation drawn from ``np.random.default_rng(seed)`` (the same on every call). The
    vocabularies are built from the training examples only (words seen ``min_count`` times;
    the others read as ``<unk>``).
    """
    if target not in SUMMARY_TARGETS:
        raise ValueError(f"target: expected 'title' or 'summary', got {target!r}")
    if isinstance(max_source_len, bool) or not isinstance(max_source_len, int) \
            or max_source_len < 1:
        raise ValueError(f"max_source_len: expected an int >= 1, got {max_source_len!r}")
    _check_fraction("val_fraction", val_fraction)
    file = resolve_corpus(path)
    examples: list[tuple[str, str]] = []
    skipped: list[tuple[int, str]] = []
    truncated = 0
    for number, line in enumerate(read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        example, reason = _parse_summary_line(line, target)
        if example is None:
            skipped.append((number, reason))
            continue
        words = example[0].split()
        if len(words) > max_source_len:
            truncated += 1
            example = (" ".join(words[:max_source_len]), example[1])
        examples.append(example)
    if skipped:
        first = "; ".join(f"line {n}: {reason}" for n, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"{file.name}: skipped {len(skipped)} malformed line(s): {first}{more}",
                      stacklevel=2)
    if len(examples) < 2:
        raise ValueError(f"path: {file.name} holds {len(examples)} usable example(s); a "
                         f"training and a validation split need at least 2 (JSON objects "
                         f"with 'article' and {target!r})")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = len(examples) - int(len(examples) * (1.0 - val_fraction))
    val_pairs = [examples[i] for i in order[:n_val]]
    train_pairs = [examples[i] for i in order[n_val:]]
    src_vocab = WordVocab([a for a, _ in train_pairs], min_count)
    tgt_vocab = WordVocab([t for _, t in train_pairs], min_count)
    return SummaryData(src_vocab, tgt_vocab, train_pairs, val_pairs, skipped, truncated,
                       max_source_len)


def lead_baseline(article: str, words: int) -> str:
    """The first ``words`` words of a normalised article: the lead baseline of summarisation."""
    return " ".join(article.split()[:words])
