"""The ``seqtwin`` command line: train, generate, translate and eval, in either backend.

    seqtwin train --task char-lm --model lstm --data tinyshakespeare --out runs/lstm
    seqtwin train --task char-lm --model gpt --out runs/gpt --init-from runs/pretrained
    seqtwin train --task translate --model gru --attention bahdanau --data eng-fra --out runs/mt
    seqtwin train --task translate --model transformer --embed 256 --heads 4 --out runs/tmt
    seqtwin train --task summarize --model transformer --data bbc-news.jsonl --out runs/sum
    seqtwin generate --checkpoint runs/lstm --prompt "ROMEO:" --backend numpy
    seqtwin translate --checkpoint runs/mt --text "I am cold." --beams 4
    seqtwin summarize --checkpoint runs/sum < article.txt
    seqtwin eval --checkpoint runs/mt

``--backend numpy|torch`` picks ``reference`` or ``torch_impl``, imported lazily. Checkpoints
(``seqtwin/checkpoint.py``) are NumPy arrays in safetensors files plus ``config.json``, so
either backend loads what the other saved; each save writes a whole new checkpoint and makes
it current in one atomic rename, so a run killed at any moment resumes from a complete one.
Training batches are a pure function of (seed, step) and the checkpoint keeps the dropout
random-number state, so ``--resume`` continues the exact run, with the saved settings: one
process resumed is bit for bit the run that was never stopped.

Under ``torchrun --nproc_per_node N -m seqtwin.cli train ...`` the torch backend trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA): every rank draws the same global batch of
``--batch`` rows and trains on its ``batch / N`` rows, the loss is scaled so the averaged
gradient is the global batch's, and rank 0 alone evaluates and writes files, so the result is
the one-process run's up to the order of floating-point sums.

Usage errors (bad arguments, a missing or corrupt file, a prompt outside the vocabulary) print
one line on stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import tasks as tk
from .checkpoint import (
    CHECKPOINTS,
    CURRENT,
    CheckpointError,
    MetricsLog,
    atomic_write,
    clean_stale,
    has_checkpoint,
    load_checkpoint,
    load_optimizer_buffers,
    read_metrics,
    save_checkpoint,
)
from .data import (
    BBC_NEWS_SUMMARY,
    ENG_FRA,
    SUMMARY_TARGETS,
    TINY_SHAKESPEARE,
    CharVocab,
    SubwordVocab,
    WordVocab,
    load_char_corpus,
    load_summaries,
    load_translation_pairs,
    normalize_sentence,
    read_text,
    resolve_corpus,
    vocab_from_metadata,
)
from .schema import check_checkpoint_config

TASKS = ("char-lm", "translate", "summarize")
CORPORA = {"tinyshakespeare": TINY_SHAKESPEARE, "eng-fra": ENG_FRA,
           "bbc-news": BBC_NEWS_SUMMARY}
DEFAULT_DATA = {"char-lm": "tinyshakespeare", "translate": "eng-fra", "summarize": "bbc-news"}
TRANSFORMER_MIN_POSITIONS = 64  # a translation Transformer's positions: this or the data's
CLIP_NORM = 1.0
EVAL_EVERY = 50
LOG_EVERY = 10
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with the user's arguments or files: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- argument types

def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and value <= high):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{low}, {high}], "
                                             f"got {text}")
        return value
    return parse


_positive_float = _float_in(0.0, math.inf, low_open=True)


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--device", default="cpu", help="torch device (torch backend only)")
    parser.add_argument("--threads", type=_int_at_least(1), default=None,
                        help="intra-op threads of torch and of NumPy's BLAS (default: the "
                             "libraries' own; on a small CPU, 1 is often fastest for small "
                             "models)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqtwin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model (char-level LM or translation)",
        description="Train a char-level language model or a Seq2Seq translator. With --resume "
                    "or --init-from the model sizes and vocabulary come from the checkpoint.")
    train.add_argument("--task", choices=TASKS, default=None,
                       help="default char-lm, or the checkpoint's task")
    train.add_argument("--data", default=None,
                       help="char-lm: a UTF-8 text file; translate: english<TAB>french lines; "
                            "or 'tinyshakespeare' / 'eng-fra' (downloaded, sha256-checked). "
                            "Default: the task's corpus")
    train.add_argument("--out", required=True, help="checkpoint directory")
    _add_runtime(train)
    train.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    train.add_argument("--model", default="lstm",
                       help=f"char-lm: one of {', '.join(tk.CHAR_LM_MODELS)}; translate and "
                            f"summarize: {', '.join(tk.TRANSLATE_MODELS)} (default lstm)")
    train.add_argument("--embed", type=_int_at_least(1), default=64,
                       help="embedding size (GPT: the width n_embd; transformer: d_model)")
    train.add_argument("--hidden", type=_int_at_least(1), default=128,
                       help="recurrent hidden size (translate: per encoder direction)")
    train.add_argument("--layers", type=_int_at_least(1), default=1)
    train.add_argument("--heads", type=_int_at_least(1), default=4,
                       help="attention heads (gpt, transformer)")
    train.add_argument("--ffn", type=_int_at_least(1), default=None,
                       help="transformer: feed-forward size (default 4 x --embed)")
    train.add_argument("--norm-first", action="store_true",
                       help="transformer: pre-LN layers (default post-LN, as torch.nn)")
    train.add_argument("--positions", choices=["sinusoidal", "learned"], default="sinusoidal",
                       help="transformer: position encoding")
    train.add_argument("--vocab", choices=["word", "bpe", "unigram"], default="word",
                       help="translate, summarize: word vocabularies, or subword pieces "
                            "learned on the training split (tokenizers), saved with the "
                            "checkpoint")
    train.add_argument("--share-vocab", action="store_true",
                       help="translate, summarize: one vocabulary for source and target; the "
                            "transformer then uses one embedding table for its encoder, "
                            "decoder and output layer")
    train.add_argument("--pointer", action="store_true",
                       help="transformer: a pointer-generator that can copy source words into "
                            "the output (one vocabulary for source and target)")
    train.add_argument("--vocab-size", type=_int_at_least(8), default=8000,
                       help="--vocab bpe/unigram: pieces per side, specials included")
    train.add_argument("--target", choices=SUMMARY_TARGETS, default="title",
                       help="summarize: generate the headline (title) or the extractive "
                            "summary")
    train.add_argument("--max-source-len", type=_int_at_least(1), default=400,
                       help="summarize: articles keep their first this many words")
    train.add_argument("--dropout", type=_float_in(0.0, 0.99), default=None,
                       help="dropout rate (default 0; with --init-from: the checkpoint's)")
    train.add_argument("--block", type=_int_at_least(1), default=64,
                       help="char-lm: characters per training sequence (GPT: its context)")
    train.add_argument("--attention", choices=tk.ATTENTIONS, default="general",
                       help="translate: the decoder's attention")
    train.add_argument("--bidirectional", action="store_true", help="translate: encoder")
    train.add_argument("--teacher-forcing", type=_float_in(0.0, 1.0), default=1.0,
                       help="translate: the fraction of decoder inputs that are gold tokens; "
                            "the others are the model's own previous predictions")
    train.add_argument("--max-len", type=_int_at_least(1), default=None,
                       help="translate: drop pairs with a side longer than this many words")
    train.add_argument("--batch", type=_int_at_least(1), default=32,
                       help="global batch rows (split across torchrun ranks)")
    train.add_argument("--steps", type=_int_at_least(1), default=200,
                       help="total steps (with --resume: the step to stop at)")
    train.add_argument("--lr", type=_positive_float, default=3e-3)
    train.add_argument("--warmup", type=_int_at_least(0), default=None,
                       help="linear warmup steps (default min(100, steps // 10))")
    train.add_argument("--weight-decay", type=_float_in(0.0, math.inf), default=1e-2)
    train.add_argument("--seed", type=_int_at_least(0), default=0)
    train.add_argument("--eval-every", type=_int_at_least(1), default=None,
                       help=f"steps between evaluations and checkpoints (default "
                            f"{EVAL_EVERY}; with --resume: the run's)")
    train.add_argument("--log-every", type=_int_at_least(1), default=None,
                       help=f"steps between progress lines when tqdm is not installed "
                            f"(default {LOG_EVERY}; with --resume: the run's)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    start.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                       help="start from a trained checkpoint's parameters (fine-tuning on "
                            "--data); its vocabulary is kept")
    train.add_argument("--freeze-embeddings", action="store_true",
                       help="keep the embeddings fixed (GPT: wte and wpe, and so the tied head)")

    generate = commands.add_parser("generate", help="continue a prompt with a char-lm model")
    generate.add_argument("--checkpoint", required=True, help="a directory written by train")
    _add_runtime(generate)
    generate.add_argument("--prompt", default="\n")
    generate.add_argument("--max-new-tokens", type=_int_at_least(1), default=200)
    generate.add_argument("--temperature", type=_positive_float, default=0.8)
    generate.add_argument("--top-k", type=_int_at_least(0), default=0, help="0: no top-k filter")
    generate.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=None)
    generate.add_argument("--seed", type=_int_at_least(0), default=0)
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    mode.add_argument("--beams", type=_int_at_least(2), default=None,
                      help="beam search with this many beams instead of sampling")

    translate = commands.add_parser("translate", help="translate sentences with a checkpoint")
    translate.add_argument("--checkpoint", required=True, help="a directory written by train")
    _add_runtime(translate)
    translate.add_argument("--text", action="append", default=None,
                           help="a sentence (repeatable); default: one sentence per stdin line")
    translate.add_argument("--beams", type=_int_at_least(1), default=4, help="1: greedy")
    translate.add_argument("--max-len", type=_int_at_least(1), default=30,
                           help="most generated words")

    evaluate = commands.add_parser("eval", help="validation loss (and BLEU) of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a directory written by train")
    _add_runtime(evaluate)
    evaluate.add_argument("--data", default=None, help="default: the data it was trained on")
    evaluate.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    evaluate.add_argument("--beams", type=_int_at_least(1), default=4,
                          help="translate: beams for the BLEU decode (1: greedy)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON line")

    summarize = commands.add_parser("summarize", help="summarize articles with a checkpoint")
    summarize.add_argument("--checkpoint", required=True, help="a directory written by train")
    _add_runtime(summarize)
    summarize.add_argument("--text", action="append", default=None,
                           help="an article (repeatable); default: all of stdin, one article")
    summarize.add_argument("--beams", type=_int_at_least(1), default=4, help="1: greedy")
    summarize.add_argument("--max-len", type=_int_at_least(1), default=None,
                           help="most generated words (default: the checkpoint's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's own errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message; hand the code back
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    commands = {"train": train, "generate": generate, "translate": translate,
                "eval": evaluate, "summarize": summarize}
    try:
        _set_threads(args.backend, args.threads)
        return commands[args.command](args)
    except (UsageError, CheckpointError) as err:
        print(f"seqtwin {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# ----------------------------------------------------------------------------- runtime

def _set_threads(backend: str, threads: int | None) -> None:
    if threads is None:
        return
    if backend == "torch":
        import torch
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(threads)


def _check_device(backend: str, device: str) -> None:
    if backend == "numpy":
        if device != "cpu":
            raise UsageError(f"--device: the numpy backend runs on cpu only, got {device!r}")
        return
    import torch
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device: not a torch device: {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {device!r} asked for, but CUDA is not available")


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, backend: str, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world == 1:
            return
        if backend != "torch":
            raise UsageError("--backend: a torchrun job (WORLD_SIZE > 1) needs the torch "
                             "backend")
        import torch
        import torch.distributed as dist
        cuda = torch.device(device).type == "cuda"
        if cuda:  # one GPU per rank
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: Any) -> Any:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)

    def global_mean(self, local_sum: float) -> float:
        """Σ over ranks of ``local_sum`` (the ranks' token-weighted losses)."""
        if self.world == 1:
            return local_sum
        import torch
        import torch.distributed as dist
        total = torch.tensor([local_sum], dtype=torch.float64,
                             device=self.device if "cuda" in self.device else "cpu")
        dist.all_reduce(total)
        return float(total.item())

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data and tasks

def _resolve_data(data: str, argument: str = "--data") -> Path:
    if data in CORPORA and not Path(data).exists():
        corpus = CORPORA[data]
        try:
            return resolve_corpus(url=corpus.url, sha256=corpus.sha256)
        except (OSError, ValueError) as err:  # no network, or a corrupted download
            raise UsageError(f"{argument}: could not fetch {data!r} from {corpus.url}: {err}"
                             ) from None
    path = Path(data).expanduser()
    if not path.is_file():
        raise UsageError(f"{argument}: no such file: {data!r} (give a file or one of "
                         f"{', '.join(CORPORA)})")
    return path.resolve()


def _char_data(path: Path, metadata: dict[str, Any] | None
               ) -> tuple[Any, np.ndarray, np.ndarray]:
    """(vocabulary, train ids, validation ids): the text's own characters, or the
    checkpoint's characters or tokenizer (``metadata``)."""
    if metadata and "tokenizer" in metadata:
        vocab = metadata["tokenizer"]
        ids = vocab.encode(read_text(path))
        n_train = int(len(ids) * 0.9)  # load_char_corpus's cut
        return vocab, ids[:n_train], ids[n_train:]
    corpus = load_char_corpus(path)
    if metadata is None:
        return corpus.vocab, corpus.train, corpus.val
    vocab = CharVocab("".join(metadata["vocab"]))
    unknown = sorted(set(corpus.vocab.chars) - set(vocab.chars))
    if unknown:
        raise UsageError(f"--data: characters {''.join(unknown)!r} are not in the "
                         f"checkpoint's vocabulary of {len(vocab)} characters")
    remap = vocab.encode("".join(corpus.vocab.chars))  # corpus id -> checkpoint id
    return vocab, remap[corpus.train], remap[corpus.val]


def _model_config_from_args(args: argparse.Namespace, task: str, vocab: dict[str, int]
                            ) -> dict[str, Any]:
    if task == "char-lm":
        if args.model not in tk.CHAR_LM_MODELS:
            raise UsageError(f"--model: the char-lm task takes one of "
                             f"{', '.join(tk.CHAR_LM_MODELS)}, got {args.model!r}")
        if args.model == "gpt":
            if args.embed % args.heads:
                raise UsageError(f"--heads: expected a divisor of --embed {args.embed}, "
                                 f"got {args.heads}")
            return {"kind": "gpt", "vocab_size": vocab["vocab"], "block_size": args.block,
                    "n_layer": args.layers, "n_head": args.heads, "n_embd": args.embed,
                    "dropout": args.dropout or 0.0}
        return {"kind": "rnn", "vocab_size": vocab["vocab"], "embed_size": args.embed,
                "hidden_size": args.hidden, "num_layers": args.layers, "cell": args.model,
                "dropout": args.dropout or 0.0}
    if args.model not in tk.TRANSLATE_MODELS:
        raise UsageError(f"--model: the {task} task takes one of "
                         f"{', '.join(tk.TRANSLATE_MODELS)}, got {args.model!r}")
    if args.model == "transformer":
        if args.embed % args.heads:
            raise UsageError(f"--heads: expected a divisor of --embed {args.embed}, "
                             f"got {args.heads}")
        if args.teacher_forcing < 1.0:
            raise UsageError("--teacher-forcing: the transformer trains with full teacher "
                             "forcing (all target positions in one pass); expected 1.0")
        return {"kind": "transformer", "src_vocab": vocab["src"], "tgt_vocab": vocab["tgt"],
                "d_model": args.embed, "nhead": args.heads, "num_encoder_layers": args.layers,
                "num_decoder_layers": args.layers, "dim_feedforward": args.ffn or 4 * args.embed,
                "dropout": args.dropout or 0.0, "norm_first": args.norm_first,
                "max_len": vocab["positions"], "positions": args.positions,
                "share_embeddings": args.share_vocab, "tie_embeddings": args.share_vocab,
                "pointer": args.pointer}
    if args.pointer:
        raise UsageError(f"--pointer: only the transformer copies source words, "
                         f"got --model {args.model}")
    return {"kind": "seq2seq", "src_vocab": vocab["src"], "tgt_vocab": vocab["tgt"],
            "embed_size": args.embed, "hidden_size": args.hidden, "num_layers": args.layers,
            "cell": args.model, "bidirectional": args.bidirectional,
            "attention": None if args.attention == "none" else args.attention,
            "dropout": args.dropout or 0.0}


def _make_task(name: str, data: str, settings: dict[str, Any],
               model_config: dict[str, Any] | None, metadata: dict[str, Any] | None,
               args: argparse.Namespace | None = None) -> Any:
    """The task on ``data``: with the checkpoint's vocabulary (``metadata``) and model, or
    with a vocabulary built from the data and a model from ``args``."""
    path = _resolve_data(data)
    try:
        if name == "char-lm":
            vocab, train_ids, val_ids = _char_data(path, metadata)
            if model_config is None:
                model_config = _model_config_from_args(args, name, {"vocab": len(vocab)})
            return tk.CharLMTask(vocab, train_ids, val_ids, model_config, settings["batch"],
                                 settings["block"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if name == "summarize":
                pairs = load_summaries(path, settings["target"], settings["max_source_len"])
            else:
                pairs = load_translation_pairs(path, max_len=settings.get("max_len"))
        for warning in caught:  # malformed lines: reported, skipped, never fatal
            print(f"note: {warning.message}", file=sys.stderr)
        src_vocab, tgt_vocab = pairs.src_vocab, pairs.tgt_vocab
        if metadata is not None:
            src_vocab = vocab_from_metadata(metadata["src_vocab"])
            tgt_vocab = vocab_from_metadata(metadata["tgt_vocab"])
        elif args is not None and (args.vocab != "word" or args.share_vocab or args.pointer):
            # learned from the training split only: one vocabulary per side, or one for both
            sides = ([a for a, _ in pairs.train_pairs], [b for _, b in pairs.train_pairs])
            if args.share_vocab or args.pointer:
                sides = (sides[0] + sides[1],)
            if args.vocab == "word":
                vocabs = [WordVocab(text, 2 if name == "summarize" else 1) for text in sides]
            else:
                vocabs = [SubwordVocab.train(text, args.vocab_size, args.vocab)
                          for text in sides]
            src_vocab, tgt_vocab = vocabs[0], vocabs[-1]
        if model_config is None:
            longest = max(max(len(src_vocab.encode(a)), len(tgt_vocab.encode(b)) + 1)
                          for a, b in pairs.train_pairs + pairs.val_pairs)
            model_config = _model_config_from_args(
                args, name, {"src": len(src_vocab), "tgt": len(tgt_vocab),
                             "positions": max(longest, TRANSFORMER_MIN_POSITIONS)})
        if name == "summarize":
            if args is not None and pairs.truncated:  # training: say what the data lost
                print(f"note: {pairs.truncated} of "
                      f"{len(pairs.train_pairs) + len(pairs.val_pairs)} articles cut to their "
                      f"first {pairs.max_source_len} words (--max-source-len)", file=sys.stderr)
            return tk.SummarizeTask(src_vocab, tgt_vocab, pairs.train_pairs, pairs.val_pairs,
                                    model_config, settings["batch"], settings["target"],
                                    settings["max_source_len"])
        return tk.TranslateTask(src_vocab, tgt_vocab, pairs.train_pairs, pairs.val_pairs,
                                model_config, settings["batch"],
                                settings.get("teacher_forcing", 1.0),
                                max_decode_len=_decode_limit(model_config))
    except ValueError as err:  # a data/size mismatch the task found
        raise UsageError(f"--data: {err}") from None


def _decode_limit(model_config: dict[str, Any], wanted: int = 30) -> int:
    """Most words a translation decodes: ``wanted``, within a Transformer's positions."""
    if model_config.get("kind") == "transformer":
        return min(wanted, model_config["max_len"])
    return wanted


def _is_hf_gpt2(directory: Path) -> bool:
    """A Hugging Face GPT-2 directory (its config.json says model_type gpt2)?"""
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "gpt2"
    except (OSError, ValueError, AttributeError):
        return False


def _load_hf_gpt2(directory: Path, argument: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A Hugging Face GPT-2 checkpoint (config.json + model.safetensors, and its tokenizer)
    as a seqtwin char-lm checkpoint whose vocabulary is the tokenizer."""
    import dataclasses

    import reference
    try:
        model = reference.load_gpt2(directory, dtype=np.float32)
        tokenizer = tk.TokenizerVocab.load(directory)
    except (ImportError, OSError, ValueError) as err:
        raise UsageError(f"{argument}: {err}") from None
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"{argument}: its tokenizer has {len(tokenizer)} tokens, more than "
                         f"the model's vocab_size {model.config.vocab_size}")
    config = {"task": "char-lm", "step": 0, "data": None, "tokenizer": tokenizer,
              "model": {"kind": "gpt", **dataclasses.asdict(model.config)}}
    return config, dict(model.params)


def _load(directory: str, argument: str) -> tuple[dict, dict[str, np.ndarray], Path | None]:
    """(config, parameters, the checkpoint's own directory) of a seqtwin run directory (or,
    for --init-from, a Hugging Face GPT-2 directory, whose directory is None); a tokenizer
    the checkpoint names is loaded into config["tokenizer"]."""
    path = Path(directory).expanduser()
    if argument == "--init-from" and _is_hf_gpt2(path):
        return (*_load_hf_gpt2(path, argument), None)
    try:
        config, params, where = load_checkpoint(path)
        check_checkpoint_config(config, params, str(where / "config.json"))
        if "tokenizer" in config:
            config["tokenizer"] = tk.TokenizerVocab.load(where / config["tokenizer"])
    except (CheckpointError, ImportError, ValueError) as err:
        raise UsageError(f"{argument}: {err}") from None
    return config, params, where


def _metadata(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("vocab", "tokenizer", "src_vocab", "tgt_vocab")
            if k in config}


# ----------------------------------------------------------------------------- train

def _progress(start: int, stop: int, enabled: bool) -> tuple[Any, bool]:
    """(an iterable of steps, whether it is a tqdm bar)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return range(start, stop), False
    if not enabled:
        return range(start, stop), False
    return tqdm(range(start, stop), initial=start, total=stop, desc="train", unit="step"), True


def _plot_losses(out: Path, unit: str) -> str:
    """Write out/loss.png from metrics.jsonl; returns a one-line note of what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "note: matplotlib is not installed, skipped loss.png (pip install 'seqtwin[cli]')"
    records = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in records], [r["train_loss"] for r in records], label="train")
    evals = [r for r in records if "val_loss" in r]
    axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss ({unit})")
    axes.legend()
    atomic_write(out / "loss.png", lambda name: figure.savefig(name, format="png", dpi=100))
    plt.close(figure)
    return f"wrote {out / 'loss.png'}"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    return {"lr": args.lr, "warmup": min(warmup, args.steps), "steps": args.steps,
            "batch": args.batch, "block": args.block, "seed": args.seed,
            "weight_decay": args.weight_decay, "clip_norm": CLIP_NORM,
            "teacher_forcing": args.teacher_forcing, "max_len": args.max_len,
            "freeze_embeddings": args.freeze_embeddings, "target": args.target,
            "max_source_len": args.max_source_len,
            "eval_every": EVAL_EVERY if args.eval_every is None else args.eval_every,
            "log_every": LOG_EVERY if args.log_every is None else args.log_every}


RUN_NAMES = {CURRENT, CHECKPOINTS, "metrics.jsonl", "loss.png"}


def _check_out(out: Path, resume: bool) -> None:
    """--out: a new or empty directory, or a seqtwin run directory (with --resume: one with a
    checkpoint); anything else exits 2 before any file is written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a file; expected a directory for the "
                         f"checkpoints")
    if resume:
        return  # _load says what is wrong with the directory
    if has_checkpoint(out):
        raise UsageError(f"--out: {str(out)!r} already holds a checkpoint; pass --resume to "
                         f"continue it or choose another --out")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out: {str(out)!r} is not writable")
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in RUN_NAMES and not p.name.endswith(".part"))
        if foreign:
            raise UsageError(f"--out: {str(out)!r} exists and is not a seqtwin run directory "
                             f"(it holds {', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty "
                             f"directory")
    else:
        parent = next((p for p in out.parents if p.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"--out: cannot create {str(out)!r} ({str(parent)!r} is not a "
                             f"writable directory)")


def train(args: argparse.Namespace) -> int:
    """``seqtwin train``: see the module docstring and ``seqtwin train --help``."""
    _check_device(args.backend, args.device)
    dist = Distributed(args.backend, args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: Distributed) -> int:
    out = Path(args.out).expanduser()
    _check_out(out, args.resume)
    base, saved, optimizer_buffers = None, None, None
    if args.resume:
        base, saved, where = _load(args.out, "--resume")
        # the run's own settings; --eval-every / --log-every given now override the saved
        settings = {"eval_every": EVAL_EVERY, "log_every": LOG_EVERY, **base["train"],
                    "steps": args.steps}
        for name in ("eval_every", "log_every"):
            if getattr(args, name) is not None:
                settings[name] = getattr(args, name)
        start, dtype = base["step"], base["dtype"]
        try:
            optimizer_buffers = load_optimizer_buffers(where)
        except CheckpointError as err:
            raise UsageError(f"--resume: {err}") from None
    else:
        settings, start, dtype = _settings(args), 0, args.dtype
        if args.init_from:
            base, saved, _ = _load(args.init_from, "--init-from")
            if args.dropout is not None and "dropout" in base["model"]:
                base["model"]["dropout"] = args.dropout  # a rate, not a size: may change
    name = base["task"] if base else (args.task or "char-lm")
    if args.task and base and args.task != name:
        raise UsageError(f"--task: the checkpoint's task is {name!r}, got {args.task!r}")
    if start >= settings["steps"]:
        raise UsageError(f"--steps: the checkpoint is at step {start} already; "
                         f"give --steps > {start} to train further")
    data = (args.data or base["data"]) if args.resume else args.data
    task = _make_task(name, data or DEFAULT_DATA[name], settings,
                      base and base["model"], base and _metadata(base), args)
    if settings["batch"] % dist.world:
        raise UsageError(f"--batch: expected a multiple of the {dist.world} torchrun ranks, "
                         f"got {settings['batch']}")

    sq = tk.backend_module(args.backend)
    model = tk.build_model(args.backend, task.model_config, dtype, dist.device, settings["seed"])
    if saved is not None:
        try:
            tk.load_arrays(args.backend, model, saved)
        except (KeyError, ValueError, RuntimeError) as err:
            raise UsageError(f"--{'resume' if args.resume else 'init-from'}: its parameters "
                             f"do not fit the model: {err}") from None
    params = tk.parameters(args.backend, model)
    frozen = set(tk.embedding_names(task.model_config)) if settings["freeze_embeddings"] else set()
    trainable = {k: p for k, p in params.items() if k not in frozen}
    if args.backend == "torch":
        for k in frozen:
            params[k].requires_grad_(False)
    optimizer = sq.AdamW(trainable, lr=settings["lr"], weight_decay=settings["weight_decay"])
    if optimizer_buffers is not None:
        state: dict[str, Any] = {"step": start}
        for kind, arrays in optimizer_buffers.items():
            state[kind] = tk.arrays_like(args.backend, arrays, trainable)
        optimizer.load_state_dict(state)
    if args.resume and "rng" in base:
        try:
            tk.set_rng_state(args.backend, model, base["rng"])
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"--resume: its random-number state does not fit the model: "
                             f"{err}") from None
    runner = dist.wrap(model) if args.backend == "torch" else model

    config = {"task": name, "model": task.model_config, "dtype": dtype, **task.metadata(),
              "step": start, "data": str(_resolve_data(data or DEFAULT_DATA[name])),
              "backend": args.backend, "init_from": base.get("init_from") if args.resume
              else args.init_from, "train": settings}
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)       # what a killed save left behind
    extra = None
    if isinstance(getattr(task, "vocab", None), tk.TokenizerVocab):
        def extra(directory: Path) -> None:
            task.vocab.tokenizer.save_pretrained(str(directory / tk.TOKENIZER_DIR))

    def checkpoint(step: int) -> None:
        config["step"] = step
        config["rng"] = tk.rng_state(args.backend, model)
        save_checkpoint(out, config, {k: tk.to_numpy(v) for k, v in params.items()},
                        {kind: {k: tk.to_numpy(v) for k, v in buffers.items()}
                         for kind, buffers in optimizer.state_dict().items()
                         if kind != "step"}, extra)

    return _loop(args, dist, task, model, runner, optimizer, trainable, settings, start, out,
                 checkpoint, sq)


def _train_step(backend: str, task: Any, model: Any, runner: Any, optimizer: Any,
                trainable: dict[str, Any], batch: tk.Batch, dist: Distributed, sq: Any) -> float:
    """One AdamW step on this rank's rows; returns the global batch's mean loss."""
    local = tk.shard(batch, dist.rank, dist.world, task.count) if dist.world > 1 else batch
    # DDP averages gradients over ranks: weigh each rank's mean loss by its share of tokens.
    scale = dist.world * local.tokens / batch.tokens
    arrays = {k: tk.to_backend(backend, v, dist.device) for k, v in local.arrays.items()}
    if backend == "numpy":
        loss = task.loss(backend, model, arrays)
        model.backward(dloss=scale)
        grads = {k: model.grads[k] for k in trainable}
    else:
        for p in trainable.values():
            p.grad = None
        loss = task.loss(backend, runner, arrays)
        (loss * scale if scale != 1.0 else loss).backward()
        grads = {k: p.grad for k, p in trainable.items()}
    sq.clip_grad_norm(grads, CLIP_NORM)
    optimizer.step(grads)
    loss = float(loss) if backend == "numpy" else float(loss.detach())
    return dist.global_mean(loss * local.tokens / batch.tokens)


def _loop(args: argparse.Namespace, dist: Distributed, task: Any, model: Any, runner: Any,
          optimizer: Any, trainable: dict[str, Any], settings: dict[str, Any], start: int,
          out: Path, checkpoint: Callable[[int], None], sq: Any) -> int:
    steps_total, lr, warmup = settings["steps"], settings["lr"], settings["warmup"]
    steps, is_bar = _progress(start, steps_total, dist.main)
    step, loss, metrics_now = start, float("nan"), {}
    tick, tick_tokens = time.perf_counter(), 0
    began = tick  # "seconds" in metrics.jsonl: wall time of this invocation, evaluations included
    metrics = MetricsLog(out / "metrics.jsonl", start if args.resume else None) \
        if dist.main else None
    eval_every, log_every = settings["eval_every"], settings["log_every"]
    try:
        for step in steps:
            optimizer.lr = sq.cosine_schedule(step, lr, warmup, steps_total, min_lr=lr / 10)
            batch = task.train_batch(settings["seed"], step)
            loss = _train_step(args.backend, task, model, runner, optimizer, trainable, batch,
                               dist, sq)
            done = step + 1
            tick_tokens += batch.tokens
            tokens_per_s = tick_tokens / max(time.perf_counter() - tick, 1e-9)
            if not dist.main:
                continue
            record: dict[str, Any] = {"step": done, "train_loss": loss, "lr": optimizer.lr,
                                      "seconds": round(time.perf_counter() - began, 3)}
            evaluate = done % eval_every == 0 or done == steps_total
            if evaluate:
                metrics_now = task.evaluate(args.backend, model, dist.device,
                                            seed=settings["seed"], full=False)
                record.update(metrics_now)
            metrics.write(record)    # before the checkpoint: a resume drops lines past it
            if evaluate:
                checkpoint(done)
            if is_bar:
                steps.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                  **{k: f"{v:.3f}" for k, v in metrics_now.items()})
            elif done % log_every == 0 or "val_loss" in record:
                shown = "".join(f" | {k} {v:.4f}" for k, v in metrics_now.items()
                                if k in record)
                print(f"step {done:>6} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s{shown}",
                      flush=True)
                tick, tick_tokens = time.perf_counter(), 0
    except KeyboardInterrupt:
        if dist.main:
            saved = optimizer.step_count
            checkpoint(saved)
            print(f"\ninterrupted: saved step {saved} to {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if is_bar:
            steps.close()
        if metrics is not None:
            metrics.close()
    if dist.main:
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics_now.items())
        print(f"done: step {steps_total} | train loss {loss:.4f} | {shown} "
              f"({task.unit}) | checkpoint {out}")
        print(_plot_losses(out, task.unit))
    return 0


# ----------------------------------------------------------------------------- inference

def _inference_model(args: argparse.Namespace, task_name: str | None,
                     dtype: str = "float64") -> tuple[dict, Any]:
    """(config, model in eval mode) of ``--checkpoint``; its task must be ``task_name``
    unless that is None."""
    _check_device(args.backend, args.device)
    config, saved, _ = _load(args.checkpoint, "--checkpoint")
    if task_name and config["task"] != task_name:
        raise UsageError(f"--checkpoint: its task is {config['task']!r}; `seqtwin "
                         f"{args.command}` needs a {task_name!r} checkpoint")
    model = tk.build_model(args.backend, config["model"], dtype, args.device)
    try:
        tk.load_arrays(args.backend, model, saved)
    except (KeyError, ValueError, RuntimeError) as err:
        raise UsageError(f"--checkpoint: its parameters do not fit its config.json: {err}"
                         ) from None
    model.eval()
    return config, model


def _generate_past_the_context(args: argparse.Namespace, model: Any, prompt: np.ndarray,
                               uniforms: np.ndarray) -> np.ndarray:
    """A GPT's text longer than its context: the step decoders on a sliding window
    (``tasks.gpt_window_step``), the last ``block_size - 1`` prompt tokens prefilled."""
    backend, device, n = args.backend, args.device, args.max_new_tokens
    sq = tk.backend_module(backend)
    with tk.no_grad(backend):
        keep = model.config.block_size - 1
        history = tk.to_backend(backend, prompt[None, -keep - 1:-1], device)
        state = (model.prefill(history)[1] if history.shape[1] else model.init_state(1))
        step, state = tk.gpt_window_step(backend, model), tk.WindowState(state, history)
        bos = tk.to_backend(backend, prompt[-1:], device)
        if args.greedy:
            tokens = sq.greedy_decode(step, state, bos, n).tokens[0]
        elif args.beams:
            tokens = sq.beam_search(step, state, bos, n, args.beams,
                                    select_state=sq.select_rows).tokens[0, 0]
        else:
            tokens = sq.sample_decode(step, state, bos, n, temperature=args.temperature,
                                      top_k=args.top_k or None, top_p=args.top_p,
                                      uniforms=tk.to_backend(backend, uniforms, device)
                                      ).tokens[0]
    return tk.to_numpy(tokens)


def generate(args: argparse.Namespace) -> int:
    """``seqtwin generate``: prompt + max_new_tokens characters on stdout.

    Runs in float64 in either backend, so a checkpoint gives the same greedy and beam text in
    both; sampling draws its uniforms from ``np.random.default_rng(seed)``, the same in both.
    The model's ``generate`` continues the prompt; a GPT whose text would outgrow its
    context slides a window instead (``tasks.gpt_window_step``).
    """
    config, model = _inference_model(args, "char-lm")
    vocab = config.get("tokenizer") or CharVocab("".join(config["vocab"]))
    if not args.prompt:
        raise UsageError("--prompt: expected at least one character")
    unknown = sorted(set(args.prompt) - set(getattr(vocab, "chars", args.prompt)))
    if unknown:
        raise UsageError(f"--prompt: characters {''.join(unknown)!r} are not in the "
                         f"checkpoint's vocabulary of {len(vocab)} characters")
    backend, device = args.backend, args.device
    prompt = vocab.encode(args.prompt)
    if len(prompt) == 0:
        raise UsageError(f"--prompt: {args.prompt!r} gives no tokens")
    n = args.max_new_tokens
    uniforms = np.random.default_rng(args.seed).random((1, n))
    gpt = config["model"]["kind"] == "gpt"
    if not gpt or len(prompt) + n - 1 <= model.config.block_size:
        if args.greedy:
            options = {}
        elif args.beams:
            options = {"num_beams": args.beams}
        else:
            options = {"do_sample": True, "temperature": args.temperature,
                       "top_k": args.top_k or None, "top_p": args.top_p or 1.0,
                       "uniforms": tk.to_backend(backend, uniforms, device)}
        out = model.generate(tk.to_backend(backend, prompt[None], device), max_new_tokens=n,
                             **options)
        tokens = tk.to_numpy(out)[0, len(prompt):]
    else:
        tokens = _generate_past_the_context(args, model, prompt, uniforms)
    print(args.prompt + vocab.decode(tk.to_numpy(tokens)))
    return 0


def translate(args: argparse.Namespace) -> int:
    """``seqtwin translate``: one translation per input sentence on stdout."""
    config, model = _inference_model(args, "translate")
    lines = args.text if args.text is not None else sys.stdin.read().splitlines()
    sentences = [normalize_sentence(line) for line in lines if line.strip()]
    if not sentences:
        raise UsageError("--text: expected at least one non-empty sentence (or lines on stdin)")
    src_vocab = vocab_from_metadata(config["src_vocab"])
    tgt_vocab = vocab_from_metadata(config["tgt_vocab"])
    _check_source_lengths(config, src_vocab, sentences, "--text")
    for line in tk.translate(args.backend, model, src_vocab, tgt_vocab, sentences,
                             args.device, args.beams, _decode_limit(config["model"],
                                                                    args.max_len)):
        print(line)
    return 0


def _check_source_lengths(config: dict[str, Any], vocab: Any, sentences: list[str],
                          argument: str) -> None:
    limit = config["model"].get("max_len") if config["model"]["kind"] == "transformer" else None
    for i, sentence in enumerate(sentences):
        if limit is not None and len(vocab.encode(sentence)) > limit:
            raise UsageError(f"{argument}: input {i + 1} has {len(sentence.split())} words; "
                             f"the model's positions end at {limit}")


def summarize(args: argparse.Namespace) -> int:
    """``seqtwin summarize``: one summary (or headline) per article on stdout."""
    config, model = _inference_model(args, "summarize")
    texts = args.text if args.text is not None else [sys.stdin.read()]
    limit = config["train"]["max_source_len"]
    articles = [" ".join(normalize_sentence(t).split()[:limit]) for t in texts if t.strip()]
    if not articles:
        raise UsageError("--text: expected at least one non-empty article (or text on stdin)")
    src_vocab = vocab_from_metadata(config["src_vocab"])
    tgt_vocab = vocab_from_metadata(config["tgt_vocab"])
    _check_source_lengths(config, src_vocab, articles, "--text")
    max_len = _decode_limit(config["model"], args.max_len or config["max_decode_len"])
    for line in tk.translate(args.backend, model, src_vocab, tgt_vocab, articles, args.device,
                             args.beams, max_len):
        print(line)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``seqtwin eval``: loss over the whole validation split (translate: and BLEU)."""
    config, model = _inference_model(args, None, args.dtype)
    settings = dict(config["train"])
    task = _make_task(config["task"], args.data or config["data"], settings, config["model"],
                      _metadata(config))
    started = time.perf_counter()
    result = task.evaluate(args.backend, model, args.device, seed=settings["seed"], full=True,
                           beams=args.beams)
    result = {"task": config["task"], "step": config["step"], "unit": task.unit, **result,
              "val_perplexity": tk.perplexity(result["val_loss"]),
              "seconds": round(time.perf_counter() - started, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"step {result['step']}: val loss {result['val_loss']:.4f} {task.unit} "
              f"(perplexity {result['val_perplexity']:.2f})"
              + (f", BLEU {result['val_bleu']:.2f} ({result['val_bleu_multi']:.2f} against "
                 f"every reference; {args.beams} beams)" if "val_bleu" in result else "")
              + (f", ROUGE-1/2/L {result['val_rouge1']:.1f}/{result['val_rouge2']:.1f}/"
                 f"{result['val_rougeL']:.1f} (lead baseline {result['lead_rouge1']:.1f}/"
                 f"{result['lead_rouge2']:.1f}/{result['lead_rougeL']:.1f}; {args.beams} "
                 f"beams)" if "val_rouge1" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
