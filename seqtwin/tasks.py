"""The two tasks of the ``seqtwin`` command line, written once for both backends.

- ``CharLMTask`` ("char-lm"): a character-level language model on a text file (Tiny
  Shakespeare by default), model ``rnn_tanh``/``rnn_relu``/``lstm``/``gru`` (``RNNLM``) or
  ``gpt`` (``GPT``); validation loss in nats/char.
- ``TranslateTask`` ("translate"): a ``Seq2Seq`` encoder-decoder with attention or a
  ``TransformerSeq2Seq`` on a TSV of sentence pairs (eng-fra by default); validation loss in
  nats/word and sacrebleu BLEU.
- ``SummarizeTask`` ("summarize"): the same models on the BBC News JSONL, article -> headline
  (default) or extractive summary; validation loss and ROUGE-1/2/L F1 (``rouge-score``,
  stemming on) beside the lead baseline.

A task owns its data and vocabulary and knows how to build its model in either backend
(``build_model``), draw the global training batch of a step (``train_batch``, a pure function
of (seed, step), so resuming replays the same stream), cut it into the rows of one
DistributedDataParallel rank (``shard``), compute the loss, evaluate, and decode.
Batches are NumPy arrays; ``to_backend`` moves them to torch when the backend is torch.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .data import CharVocab, WordVocab, char_batches, lead_baseline, pad_batch

RNN_MODELS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
CHAR_LM_MODELS = RNN_MODELS + ("gpt",)
TRANSLATE_MODELS = ("lstm", "gru", "transformer")
ATTENTIONS = ("none", "dot", "general", "concat", "bahdanau")
EVAL_BATCHES = 8        # validation batches of a periodic char-lm evaluation during training
DECODE_BATCH = 256      # sentences per decoding call
TOKENIZER_DIR = "tokenizer"  # where a checkpoint keeps a Hugging Face tokenizer's files


# ----------------------------------------------------------------------------- backends

def backend_module(name: str) -> Any:
    """The ``reference`` (``numpy``) or ``torch_impl`` (``torch``) package, imported lazily."""
    if name == "torch":
        import torch_impl
        return torch_impl
    if name == "numpy":
        import reference
        return reference
    raise ValueError(f"backend: expected 'numpy' or 'torch', got {name!r}")


def to_backend(backend: str, array: np.ndarray, device: str = "cpu") -> Any:
    if backend == "numpy":
        return array
    import torch
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def no_grad(backend: str) -> contextlib.AbstractContextManager:
    if backend == "numpy":
        return contextlib.nullcontext()
    import torch
    return torch.no_grad()


def build_model(backend: str, model_config: Mapping[str, Any], dtype: str, device: str = "cpu",
                seed: int | None = None) -> Any:
    """An ``RNNLM``, ``GPT`` or ``Seq2Seq`` of ``model_config`` (``{"kind": ..., sizes}``)."""
    sq = backend_module(backend)
    kind = model_config["kind"]
    sizes = {k: v for k, v in model_config.items() if k != "kind"}
    if backend == "numpy":
        factory: dict[str, Any] = {"dtype": np.dtype(dtype), "seed": seed}
    else:
        import torch
        if seed is not None:
            torch.manual_seed(seed)
        factory = {"device": device, "dtype": getattr(torch, dtype)}
    if kind == "rnn":
        return sq.RNNLM(**sizes, **factory)
    if kind == "gpt":
        return sq.GPT(sq.GPTConfig(**sizes), **factory)
    if kind == "seq2seq":
        return sq.Seq2Seq(sq.Seq2SeqConfig(**sizes), **factory)
    if kind == "transformer":
        return sq.TransformerSeq2Seq(sq.TransformerSeq2SeqConfig(**sizes), **factory)
    raise ValueError(f"model_config['kind']: expected 'rnn', 'gpt', 'seq2seq' or "
                     f"'transformer', got {kind!r}")


def parameters(backend: str, model: Any) -> dict[str, Any]:
    """The live parameters by shared name (what the optimizer updates in place)."""
    if backend == "numpy":
        return model.params
    return dict(model.named_parameters())


def arrays_like(backend: str, arrays: Mapping[str, np.ndarray], like: Mapping[str, Any]
                ) -> dict[str, Any]:
    """Saved arrays in the dtype (and on the device) of the same-named entries of ``like``;
    names that ``like`` lacks are kept as they are, for the loader to report."""
    if backend == "numpy":
        return {k: np.asarray(v).astype(like[k].dtype) if k in like else v
                for k, v in arrays.items()}
    import torch
    return {k: torch.from_numpy(np.asarray(v)).to(device=like[k].device, dtype=like[k].dtype)
            if k in like else torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def load_arrays(backend: str, model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy saved arrays into the model, converting to its dtype and device."""
    model.load_state_dict(arrays_like(backend, arrays, parameters(backend, model)))


def _generators(obj: Any, seen: set[int]) -> Iterator[np.random.Generator]:
    """Every NumPy Generator a reference model holds, in a fixed order (attribute names)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.random.Generator):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _generators(item, seen)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _generators(obj[key], seen)
    elif type(obj).__module__.startswith("reference") and hasattr(obj, "__dict__"):
        for key in sorted(vars(obj)):
            yield from _generators(vars(obj)[key], seen)


def rng_state(backend: str, model: Any) -> dict[str, Any]:
    """The random-number state dropout draws from, as JSON: the NumPy model's Generators, or
    torch's CPU (and CUDA) generator state as hex."""
    if backend == "numpy":
        return {"numpy": [g.bit_generator.state for g in _generators(model, set())]}
    import torch
    state = {"torch": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
    return state


def set_rng_state(backend: str, model: Any, state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` saved (a state saved by the other backend is ignored:
    the two draw different streams anyway)."""
    if backend == "numpy":
        saved = state.get("numpy")
        if saved is None:
            return
        generators = list(_generators(model, set()))
        if len(saved) != len(generators):
            raise ValueError(f"rng.numpy: {len(saved)} saved generator states for the "
                             f"model's {len(generators)}")
        for g, s in zip(generators, saved):
            g.bit_generator.state = s
        return
    import torch
    if "torch" in state:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(bytes.fromhex(state["torch"]),
                                                           dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(bytes.fromhex(state["cuda"]),
                                                                dtype=np.uint8).copy()))


def embedding_names(model_config: Mapping[str, Any]) -> list[str]:
    """The parameters ``--freeze-embeddings`` keeps fixed. GPT's head is tied to wte, so
    freezing wte freezes the output layer too."""
    kind = model_config["kind"]
    if kind == "rnn":
        return ["embedding.weight"]
    if kind == "gpt":
        return ["transformer.wte.weight", "transformer.wpe.weight"]
    if kind == "transformer":
        return ["src_embedding.weight", "tgt_embedding.weight"]
    return ["encoder.embedding.weight", "decoder.embedding.weight"]


def _concat(backend: str, a: Any, b: Any) -> Any:
    if backend == "numpy":
        return np.concatenate([a, b], axis=1)
    import torch
    return torch.cat([a, b], dim=1)


def select_layer_state(state: tuple, index: Any) -> tuple:
    """Rows ``index`` of an RNN state ((h,) or (h, c), each (L, B, H): batch on axis 1)."""
    return tuple(s[:, index] for s in state)


class WindowState(NamedTuple):
    """A GPT decoding state that slides: the model's state and every token fed so far."""
    state: Any
    history: Any      # (B, t) ids


def gpt_window_step(backend: str, model: Any) -> Any:
    """A ``step`` for the decoders that runs past GPT's context: when the KV cache is full,
    the state is rebuilt from the last ``block_size // 2`` tokens (nanoGPT crops the same way)
    and decoding goes on."""
    block = model.config.block_size
    keep = max(1, block // 2)

    def step(tokens: Any, window: WindowState) -> tuple[Any, WindowState]:
        state, history = window
        if state.position >= block:
            with no_grad(backend):
                _, state = model.prefill(history[:, -keep:])
        logits, state = model.step(tokens, state)
        return logits, WindowState(state, _concat(backend, history, tokens[:, None]))
    return step


# ----------------------------------------------------------------------------- batches

class Batch(NamedTuple):
    """The arrays of one batch (rows on axis 0) and its number of scored target tokens."""
    arrays: dict[str, np.ndarray]
    tokens: int


def shard(batch: Batch, rank: int, world: int, count: Any) -> Batch:
    """Rank ``rank``'s equal slice of the rows of a global batch (DistributedDataParallel)."""
    rows = len(next(iter(batch.arrays.values())))
    size = rows // world
    arrays = {k: v[rank * size:(rank + 1) * size] for k, v in batch.arrays.items()}
    return Batch(arrays, count(arrays))


# ----------------------------------------------------------------------------- char-lm

class TokenizerVocab:
    """A Hugging Face tokenizer (GPT-2's byte-level BPE, say) used where a ``CharVocab`` is:
    the char-lm task then models its tokens instead of characters (needs ``transformers``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, directory: Any) -> "TokenizerVocab":
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("a checkpoint with a tokenizer needs transformers: "
                              "pip install transformers") from None
        try:
            return cls(AutoTokenizer.from_pretrained(str(directory)))
        except (OSError, ValueError) as err:
            raise ValueError(f"{str(directory)!r} holds no loadable tokenizer ({err})") from None

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


class CharLMTask:
    """Character-level language modelling: next-character cross-entropy, nats/char."""

    name = "char-lm"

    def __init__(self, vocab: CharVocab | TokenizerVocab, train: np.ndarray, val: np.ndarray,
                 model_config: Mapping[str, Any], batch_size: int, block_size: int) -> None:
        self.vocab, self.train, self.val = vocab, train, val
        self.model_config = dict(model_config)
        self.batch_size, self.block_size = batch_size, block_size
        if model_config["kind"] == "gpt" and block_size > model_config["block_size"]:
            raise ValueError(f"block_size: expected <= the GPT's context "
                             f"{model_config['block_size']}, got {block_size}")
        for split, ids in (("train", train), ("validation", val)):
            if block_size >= len(ids):
                raise ValueError(f"the {split} split holds {len(ids)} tokens, not more than "
                                 f"the block of {block_size} (--block): give a longer text "
                                 f"or a smaller --block")

    @property
    def unit(self) -> str:
        return "nats/token" if isinstance(self.vocab, TokenizerVocab) else "nats/char"

    def metadata(self) -> dict[str, Any]:
        if isinstance(self.vocab, TokenizerVocab):  # the files sit in the checkpoint's
            return {"tokenizer": TOKENIZER_DIR}     # tokenizer/ directory
        return {"vocab": self.vocab.chars}

    def train_batch(self, seed: int, step: int) -> Batch:
        x, y = char_batches(self.train, self.batch_size, self.block_size,
                            np.random.default_rng([seed, step]))
        return Batch({"ids": x, "targets": y}, x.size)

    @staticmethod
    def count(arrays: Mapping[str, np.ndarray]) -> int:
        return int(arrays["targets"].size)

    def loss(self, backend: str, model: Any, arrays: Mapping[str, Any]) -> Any:
        """Mean cross-entropy over the batch's characters (RNNLM and GPT both put it 2nd)."""
        return model(arrays["ids"], arrays["targets"])[1]

    def _val_batches(self, full: bool, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not full:  # the same random batches at every evaluation of a run
            rng = np.random.default_rng([seed, 1 << 30])
            for _ in range(EVAL_BATCHES):
                yield char_batches(self.val, self.batch_size, self.block_size, rng)
            return
        T = self.block_size  # every character of the split, in non-overlapping windows
        windows = (len(self.val) - 1) // T
        starts = np.arange(windows) * T
        for i in range(0, windows, self.batch_size):
            chunk = starts[i:i + self.batch_size, None] + np.arange(T)
            yield self.val[chunk], self.val[chunk + 1]

    def evaluate(self, backend: str, model: Any, device: str, seed: int = 0,
                 full: bool = False, **_: Any) -> dict[str, float]:
        """{"val_loss": nats/char}: over EVAL_BATCHES fixed random batches, or with
        ``full`` over the whole validation split cut into windows of ``block_size``."""
        model.eval()
        total, count = 0.0, 0
        with no_grad(backend):
            for x, y in self._val_batches(full, seed):
                loss = self.loss(backend, model, {"ids": to_backend(backend, x, device),
                                                  "targets": to_backend(backend, y, device)})
                total += float(loss) * y.size
                count += y.size
        model.train()
        return {"val_loss": total / count}


# ----------------------------------------------------------------------------- translate

class TranslateTask:
    """Sentence translation with a Seq2Seq: cross-entropy over target words (and EOS), and
    BLEU of decoded validation sentences against their references (sacrebleu)."""

    name = "translate"

    def __init__(self, src_vocab: WordVocab, tgt_vocab: WordVocab,
                 train_pairs: Sequence[tuple[str, str]], val_pairs: Sequence[tuple[str, str]],
                 model_config: Mapping[str, Any], batch_size: int,
                 teacher_forcing: float = 1.0, max_decode_len: int = 30) -> None:
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs)
        self.model_config = dict(model_config)
        self.batch_size = batch_size
        if not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing: expected a ratio in [0, 1], got "
                             f"{teacher_forcing}")
        self.teacher_forcing = teacher_forcing
        self.max_decode_len = max_decode_len
        if not self.train_pairs or not self.val_pairs:
            raise ValueError(f"pairs: expected training and validation pairs, got "
                             f"{len(self.train_pairs)} and {len(self.val_pairs)}")

    unit = "nats/word"

    def metadata(self) -> dict[str, Any]:
        return {"src_vocab": self.src_vocab.to_metadata(),
                "tgt_vocab": self.tgt_vocab.to_metadata()}

    def _arrays(self, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        src, src_lengths = pad_batch([self.src_vocab.encode(s) for s, _ in pairs],
                                     WordVocab.PAD)
        ys = [self.tgt_vocab.encode(t) for _, t in pairs]
        tgt_in, _ = pad_batch([np.r_[WordVocab.BOS, y] for y in ys], WordVocab.PAD)
        tgt_out, _ = pad_batch([np.r_[y, WordVocab.EOS] for y in ys], WordVocab.PAD)
        return {"src": src, "src_lengths": src_lengths, "tgt_in": tgt_in, "targets": tgt_out}

    def train_batch(self, seed: int, step: int) -> Batch:
        rng = np.random.default_rng([seed, step])
        size = min(self.batch_size, len(self.train_pairs))
        index = rng.choice(len(self.train_pairs), size=size, replace=False)
        arrays = self._arrays([self.train_pairs[i] for i in index])
        if self.teacher_forcing < 1.0:
            mask = rng.random(arrays["tgt_in"].shape) < self.teacher_forcing
            mask[:, 0] = True  # the first input (BOS) has no previous prediction
            arrays["teacher_mask"] = mask
        return Batch(arrays, self.count(arrays))

    @staticmethod
    def count(arrays: Mapping[str, np.ndarray]) -> int:
        return int((arrays["targets"] != WordVocab.PAD).sum())

    def loss(self, backend: str, model: Any, arrays: Mapping[str, Any]) -> Any:
        """Mean cross-entropy over the target words that are not PAD."""
        extra = {"teacher_mask": arrays["teacher_mask"]} if "teacher_mask" in arrays else {}
        return model(arrays["src"], arrays["src_lengths"], arrays["tgt_in"], arrays["targets"],
                     **extra)[1]

    def translate(self, backend: str, model: Any, sentences: Sequence[str], device: str,
                  beams: int = 1) -> list[str]:
        return translate(backend, model, self.src_vocab, self.tgt_vocab, sentences, device,
                         beams, self.max_decode_len)

    def evaluate(self, backend: str, model: Any, device: str, beams: int = 1,
                 full: bool = True, **_: Any) -> dict[str, float]:
        """{"val_loss": nats/word (teacher-forced), "val_bleu": sacrebleu corpus BLEU}."""
        val_loss, hypotheses = self._validate(backend, model, device, beams)
        return {"val_loss": val_loss,
                "val_bleu": bleu(hypotheses, [[t] for _, t in self.val_pairs]),
                "val_bleu_multi": bleu(hypotheses, self._all_references())}

    def _validate(self, backend: str, model: Any, device: str, beams: int
                  ) -> tuple[float, list[str]]:
        """(teacher-forced validation loss in nats/word, the decoded validation targets)."""
        model.eval()
        total, count = 0.0, 0
        with no_grad(backend):
            for i in range(0, len(self.val_pairs), DECODE_BATCH):
                arrays = self._arrays(self.val_pairs[i:i + DECODE_BATCH])
                n = self.count(arrays)
                loss = self.loss(backend, model, {k: to_backend(backend, v, device)
                                                  for k, v in arrays.items()})
                total += float(loss) * n
                count += n
        hypotheses = self.translate(backend, model, [s for s, _ in self.val_pairs], device,
                                    beams)
        model.train()
        return total / count, hypotheses

    def _all_references(self) -> list[list[str]]:
        """Per validation pair, every translation of its source sentence in the data (its own
        first): Tatoeba often has several ("you're stubborn ." -> "tu es tetu .", "vous etes
        entetees ." ...), and one reference alone scores a valid one as wrong."""
        translations: dict[str, list[str]] = {}
        for source, target in self.val_pairs + self.train_pairs:
            if target not in translations.setdefault(source, []):
                translations[source].append(target)
        return [[target] + [t for t in translations[source] if t != target]
                for source, target in self.val_pairs]


def translate(backend: str, model: Any, src_vocab: WordVocab, tgt_vocab: WordVocab,
              sentences: Sequence[str], device: str, beams: int = 1, max_len: int = 30,
              length_penalty: float = 1.0) -> list[str]:
    """Normalised, non-empty source sentences -> target sentences with a Seq2Seq's
    ``generate`` (greedy for ``beams == 1``, else beam search), DECODE_BATCH sentences per
    call."""
    out: list[str] = []
    model.eval()
    for i in range(0, len(sentences), DECODE_BATCH):
        chunk = sentences[i:i + DECODE_BATCH]
        src, lengths = pad_batch([src_vocab.encode(s) for s in chunk], WordVocab.PAD)
        with no_grad(backend):
            # early_stopping="never": a row stops when no live beam can beat its finished ones
            tokens = model.generate(
                to_backend(backend, src, device), to_backend(backend, lengths, device),
                max_new_tokens=max_len, num_beams=beams, length_penalty=length_penalty,
                early_stopping="never", decoder_start_token_id=WordVocab.BOS,
                eos_token_id=WordVocab.EOS, pad_token_id=WordVocab.PAD)
        out.extend(tgt_vocab.decode(row) for row in to_numpy(tokens))
    model.train()
    return out


class SummarizeTask(TranslateTask):
    """Summarisation with a Seq2Seq or TransformerSeq2Seq: article -> headline or summary,
    cross-entropy over target words (and EOS), and ROUGE of decoded validation targets
    against their references, beside the lead baseline (the article's first N words, N the
    median training target length)."""

    name = "summarize"

    def __init__(self, src_vocab: WordVocab, tgt_vocab: WordVocab,
                 train_pairs: Sequence[tuple[str, str]], val_pairs: Sequence[tuple[str, str]],
                 model_config: Mapping[str, Any], batch_size: int, target: str,
                 max_source_len: int, max_decode_len: int | None = None) -> None:
        lengths = [len(t.split()) for _, t in train_pairs]
        median = int(np.median(lengths)) if lengths else 1
        if max_decode_len is None:  # room for long references, bounded by the positions
            max_decode_len = int(np.percentile(lengths, 99)) + 1 if lengths else 16
            if model_config.get("kind") == "transformer":
                max_decode_len = min(max_decode_len, model_config["max_len"])
        super().__init__(src_vocab, tgt_vocab, train_pairs, val_pairs, model_config,
                         batch_size, max_decode_len=max_decode_len)
        self.target, self.max_source_len, self.lead_words = target, max_source_len, median

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "target": self.target,
                "max_decode_len": self.max_decode_len}

    def lead(self) -> dict[str, float]:
        """ROUGE of the lead baseline on the validation articles."""
        return rouge([lead_baseline(a, self.lead_words) for a, _ in self.val_pairs],
                     [t for _, t in self.val_pairs])

    def evaluate(self, backend: str, model: Any, device: str, beams: int = 1,
                 full: bool = True, **_: Any) -> dict[str, float]:
        """{"val_loss": nats/word, "val_rouge1"/"val_rouge2"/"val_rougeL": F1 x 100, and the
        lead baseline's "lead_rouge*"}."""
        val_loss, hypotheses = self._validate(backend, model, device, beams)
        scores = rouge(hypotheses, [t for _, t in self.val_pairs])
        return {"val_loss": val_loss, **{f"val_{k}": v for k, v in scores.items()},
                **{f"lead_{k}": v for k, v in self.lead().items()}}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (x 100) of normalised texts, ``rouge-score`` with
    Porter stemming; an empty hypothesis scores 0."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - the cli extra installs it
        raise ImportError("ROUGE needs rouge-score: pip install 'seqtwin[cli]'") from None
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"hypotheses, references: expected equal non-zero counts, got "
                         f"{len(hypotheses)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hypothesis, reference in zip(hypotheses, references):
        for name, score in scorer.score(reference, hypothesis).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * total / len(references) for name, total in totals.items()}


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU of normalised sentences; ``references[i]`` lists the
    reference translations of hypothesis i (one or more)."""
    try:
        import sacrebleu
    except ImportError:  # pragma: no cover - the cli extra installs it
        raise ImportError("BLEU needs sacrebleu: pip install 'seqtwin[cli]'") from None
    most = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    # The sentences are already split into words and punctuation (normalize_sentence), so
    # sacrebleu scores them as they are: tokenize="none".
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="none",
                                       force=True).score)


def perplexity(nats: float) -> float:
    return math.exp(min(nats, 700.0))
