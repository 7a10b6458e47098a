"""What a checkpoint's ``config.json`` must hold, checked before anything is built from it.

``check_checkpoint_config(config, params, where)`` raises ``ValueError`` naming the file and
the key: a missing or unknown key, a value of the wrong type or out of range, a vocabulary
whose length is not the model's, or a parameter set whose names are not the model's.
Model sizes are checked by the reference backend's own config classes (``import reference``
needs no torch), so the rules are the ones the models enforce.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import numpy as np

TASKS = ("char-lm", "translate", "summarize")
DTYPES = ("float32", "float64")
_TRAIN_INTS = ("steps", "batch", "seed", "warmup")
_TRAIN_FLOATS = ("lr", "weight_decay")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model_class(kind: str) -> tuple[Any, bool]:
    """(the reference class or config dataclass of a model kind, whether it is a dataclass)."""
    import reference
    classes = {"rnn": (reference.RNNLM, False), "gpt": (reference.GPTConfig, True),
               "seq2seq": (reference.Seq2SeqConfig, True),
               "transformer": (reference.TransformerSeq2SeqConfig, True)}
    return classes[kind]


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, Mapping):
        raise ValueError(f"{where}: 'model': expected an object, got {_type_name(model)}")
    kind = model.get("kind")
    if kind not in ("rnn", "gpt", "seq2seq", "transformer"):
        raise ValueError(f"{where}: model.kind: expected 'rnn', 'gpt', 'seq2seq' or "
                         f"'transformer', got {kind!r}")
    cls, is_dataclass = _model_class(kind)
    if is_dataclass:
        fields = {f.name: f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING
                  for f in dataclasses.fields(cls)}
    else:
        signature = inspect.signature(cls.__init__).parameters
        fields = {name: p.default is inspect.Parameter.empty for name, p in signature.items()
                  if name not in ("self", "dtype", "seed") and p.kind is p.POSITIONAL_OR_KEYWORD}
    sizes = {k: v for k, v in model.items() if k != "kind"}
    missing = sorted(name for name, required in fields.items()
                     if required and name not in sizes)
    unknown = sorted(set(sizes) - set(fields))
    if missing or unknown:
        raise ValueError(f"{where}: model ({kind}): "
                         + "; ".join(part for part in (
                             f"missing {', '.join(map(repr, missing))}" if missing else "",
                             f"unknown {', '.join(map(repr, unknown))}" if unknown else "")
                             if part))
    try:
        if is_dataclass:
            cls(**sizes)
        else:
            _check_rnn_sizes(sizes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: model ({kind}): {err}") from None


def _check_rnn_sizes(sizes: Mapping[str, Any]) -> None:
    from reference.checks import check_positive_int, check_probability
    for name in ("vocab_size", "embed_size", "hidden_size", "num_layers"):
        if name in sizes:
            check_positive_int(name, sizes[name])
    if sizes.get("cell", "lstm") not in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        raise ValueError(f"cell: expected 'rnn_tanh', 'rnn_relu', 'lstm' or 'gru', "
                         f"got {sizes['cell']!r}")
    if "dropout" in sizes:
        check_probability("dropout", sizes["dropout"])


def _vocab_size(model: Mapping[str, Any], side: str) -> int:
    kind = model["kind"]
    if kind in ("rnn", "gpt"):
        return model["vocab_size"]
    return model["src_vocab" if side == "src" else "tgt_vocab"]


def _check_vocabulary(config: Mapping[str, Any], where: str) -> None:
    model = config["model"]
    if config["task"] == "char-lm":
        if model["kind"] not in ("rnn", "gpt"):
            raise ValueError(f"{where}: model.kind: a char-lm checkpoint holds an 'rnn' or "
                             f"'gpt', got {model['kind']!r}")
        if "tokenizer" in config:
            if not isinstance(config["tokenizer"], str) or "/" in config["tokenizer"]:
                raise ValueError(f"{where}: 'tokenizer': expected the name of the "
                                 f"checkpoint's tokenizer directory, got "
                                 f"{config['tokenizer']!r}")
            return   # its length is checked against vocab_size when it is loaded
        chars = config.get("vocab")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise ValueError(f"{where}: 'vocab': expected a list of characters, got "
                             f"{_type_name(chars)}")
        if len(chars) != model["vocab_size"]:
            raise ValueError(f"{where}: 'vocab' has {len(chars)} characters but "
                             f"model.vocab_size is {model['vocab_size']}")
        return
    if model["kind"] not in ("seq2seq", "transformer"):
        raise ValueError(f"{where}: model.kind: a {config['task']} checkpoint holds a "
                         f"'seq2seq' or 'transformer', got {model['kind']!r}")
    from .data import vocab_from_metadata
    for side in ("src", "tgt"):
        key = f"{side}_vocab"
        if key not in config:
            raise ValueError(f"{where}: missing {key!r} (the {config['task']} vocabulary)")
        try:
            size = len(vocab_from_metadata(config[key]))
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{where}: {key!r}: {err}") from None
        if size != _vocab_size(model, side):
            raise ValueError(f"{where}: {key!r} has {size} entries but model.{key} is "
                             f"{_vocab_size(model, side)}")


def _check_train(train: Any, where: str) -> None:
    if not isinstance(train, Mapping):
        raise ValueError(f"{where}: 'train': expected an object of training settings, got "
                         f"{_type_name(train)}")
    for name in _TRAIN_INTS:
        value = train.get(name)
        if not _is_int(value) or value < (1 if name in ("steps", "batch") else 0):
            raise ValueError(f"{where}: train.{name}: expected an int >= "
                             f"{1 if name in ('steps', 'batch') else 0}, got {value!r}")
    for name in _TRAIN_FLOATS:
        value = train.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not np.isfinite(value) or value < 0:
            raise ValueError(f"{where}: train.{name}: expected a finite number >= 0, "
                             f"got {value!r}")
    for name in ("eval_every", "log_every"):
        if name in train and (not _is_int(train[name]) or train[name] < 1):
            raise ValueError(f"{where}: train.{name}: expected an int >= 1, "
                             f"got {train[name]!r}")


def check_checkpoint_config(config: Mapping[str, Any], params: Mapping[str, np.ndarray],
                            where: str) -> None:
    """Validate a checkpoint's config.json (``where`` names it in errors) and that ``params``
    carries exactly the model's parameter names; see the module docstring."""
    for key in ("task", "model", "step", "dtype", "train"):
        if key not in config:
            raise ValueError(f"{where}: missing {key!r}; it was not written by `seqtwin "
                             f"train`")
    if config["task"] not in TASKS:
        raise ValueError(f"{where}: 'task': expected one of {', '.join(TASKS)}, got "
                         f"{config['task']!r}")
    if not _is_int(config["step"]) or config["step"] < 0:
        raise ValueError(f"{where}: 'step': expected an int >= 0, got {config['step']!r}")
    if config["dtype"] not in DTYPES:
        raise ValueError(f"{where}: 'dtype': expected 'float32' or 'float64', got "
                         f"{config['dtype']!r}")
    _check_model(config["model"], where)
    _check_vocabulary(config, where)
    _check_train(config["train"], where)
    if "rng" in config and not isinstance(config["rng"], Mapping):
        raise ValueError(f"{where}: 'rng': expected an object, got {_type_name(config['rng'])}")
    _check_param_names(config["model"], params, where)


def _check_param_names(model: Mapping[str, Any], params: Mapping[str, np.ndarray],
                       where: str) -> None:
    """The saved tensors against the names and shapes the reference model has (built lazily:
    the config dataclasses give the shapes without allocating a model where they can)."""
    import reference
    kind, sizes = model["kind"], {k: v for k, v in model.items() if k != "kind"}
    if kind == "transformer":
        shapes = reference.transformer_seq2seq_param_shapes(
            reference.TransformerSeq2SeqConfig(**sizes))
    else:
        return   # the other models' loaders name a missing or misshapen tensor themselves
    missing = sorted(set(shapes) - set(params))
    unexpected = sorted(set(params) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{where}: the saved parameters do not fit model ({kind}): missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"{where}: parameter {name!r} has shape "
                             f"{tuple(params[name].shape)}, model ({kind}) expects {shape}")
