"""seqtwin's backend-independent application plumbing: corpus loaders (NumPy arrays
out, for either backend). Imports numpy, never torch.
"""

from .data import (
    ENG_FRA,
    TINY_SHAKESPEARE,
    CharCorpus,
    CharVocab,
    CorpusFile,
    TranslationBatch,
    TranslationData,
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

__all__ = [
    "ENG_FRA",
    "TINY_SHAKESPEARE",
    "CharCorpus",
    "CharVocab",
    "CorpusFile",
    "TranslationBatch",
    "TranslationData",
    "WordVocab",
    "char_batches",
    "load_char_corpus",
    "load_translation_pairs",
    "normalize_sentence",
    "pad_batch",
    "resolve_corpus",
    "sha256_file",
    "translation_batches",
]
