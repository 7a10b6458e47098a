"""The ``seqtwin`` command line, task "char-lm": train and sample a character-level RNNLM.

    seqtwin train --data tinyshakespeare --out runs/lstm --steps 200
    seqtwin generate --checkpoint runs/lstm --prompt "ROMEO:" --backend numpy

``--backend numpy|torch`` picks ``reference`` or ``torch_impl``, imported lazily. A checkpoint
directory holds ``checkpoint.safetensors`` (parameters under the shared names), ``optimizer.
safetensors`` (AdamW's ``exp_avg.<name>`` / ``exp_avg_sq.<name>``), ``config.json`` (model
sizes, vocabulary, step) and ``metrics.jsonl`` (one line per step); each file is written
atomically, so either backend loads what the other saved. Training batches are drawn from
``np.random.default_rng([seed, step])``, so ``--resume`` continues the exact batch stream.

Usage errors (bad arguments, a missing file, a prompt outside the vocabulary) print one line on
stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .data import TINY_SHAKESPEARE, CharVocab, char_batches, load_char_corpus, resolve_corpus

TASK = "char-lm"
CORPORA = {"tinyshakespeare": TINY_SHAKESPEARE}
CHECKPOINT_FILES = ("config.json", "checkpoint.safetensors")
EVAL_BATCHES = 4
CLIP_NORM = 1.0
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqtwin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a char-level language model")
    train.add_argument("--task", choices=[TASK], default=TASK)
    train.add_argument("--data", required=True,
                       help="a UTF-8 text file, or 'tinyshakespeare' (downloaded, sha256-checked)")
    train.add_argument("--out", required=True, help="checkpoint directory")
    train.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    train.add_argument("--device", default="cpu", help="torch device (torch backend only)")
    train.add_argument("--cell", choices=["rnn_tanh", "rnn_relu", "lstm", "gru"], default="lstm")
    train.add_argument("--embed", type=_int_at_least(1), default=64)
    train.add_argument("--hidden", type=_int_at_least(1), default=128)
    train.add_argument("--layers", type=_int_at_least(1), default=1)
    train.add_argument("--block", type=_int_at_least(1), default=64)
    train.add_argument("--batch", type=_int_at_least(1), default=32)
    train.add_argument("--steps", type=_int_at_least(1), default=200,
                       help="total steps (with --resume: the step to stop at)")
    train.add_argument("--lr", type=_positive_float, default=3e-3)
    train.add_argument("--warmup", type=_int_at_least(0), default=None,
                       help="linear warmup steps (default min(100, steps // 10))")
    train.add_argument("--weight-decay", type=float, default=1e-2)
    train.add_argument("--seed", type=_int_at_least(0), default=0)
    train.add_argument("--eval-every", type=_int_at_least(1), default=50)
    train.add_argument("--log-every", type=_int_at_least(1), default=10,
                       help="steps between progress lines when tqdm is not installed")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")

    generate = commands.add_parser("generate", help="sample text from a checkpoint")
    generate.add_argument("--checkpoint", required=True, help="a directory written by train")
    generate.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    generate.add_argument("--prompt", default="\n")
    generate.add_argument("--max-new-tokens", type=_int_at_least(1), default=200)
    generate.add_argument("--temperature", type=_positive_float, default=0.8)
    generate.add_argument("--top-k", type=_int_at_least(0), default=0, help="0: no top-k filter")
    generate.add_argument("--seed", type=_int_at_least(0), default=0)
    generate.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's own errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message; hand the code back
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return train(args) if args.command == "train" else generate(args)
    except UsageError as err:
        print(f"seqtwin {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


# ----------------------------------------------------------------------------- backends

def _backend(name: str) -> Any:
    """The ``reference`` or ``torch_impl`` package, imported on first use."""
    if name == "torch":
        import torch_impl
        return torch_impl
    import reference
    return reference


def _build_model(backend: str, model_config: dict, dtype: str, device: str = "cpu",
                 seed: int | None = None) -> Any:
    sq = _backend(backend)
    if backend == "numpy":
        return sq.RNNLM(**model_config, dtype=np.dtype(dtype), seed=seed)
    import torch
    if seed is not None:
        torch.manual_seed(seed)
    return sq.RNNLM(**model_config, device=device, dtype=getattr(torch, dtype))


def _params(backend: str, model: Any) -> dict[str, Any]:
    """The live parameters, by shared name (what AdamW updates in place)."""
    if backend == "numpy":
        return model.params
    return {name: p for name, p in model.named_parameters()}


def _to_numpy(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)
            for name, t in tensors.items()}


def _from_numpy(backend: str, arrays: dict[str, np.ndarray], like: dict[str, Any]
                ) -> dict[str, Any]:
    """Arrays on the device (and in the dtype) of the matching entry of ``like``."""
    if backend == "numpy":
        return {k: v.astype(like[k].dtype) for k, v in arrays.items()}
    import torch
    return {k: torch.from_numpy(v).to(device=like[k].device, dtype=like[k].dtype)
            for k, v in arrays.items()}


def _as_backend_ids(backend: str, ids: np.ndarray, device: str) -> Any:
    if backend == "numpy":
        return ids
    import torch
    return torch.from_numpy(ids).to(device)


def _train_step(backend: str, model: Any, optimizer: Any, x: Any, y: Any) -> float:
    """One AdamW step on a batch with the global gradient norm clipped to 1; the loss."""
    sq = _backend(backend)
    if backend == "numpy":
        _, loss, _ = model(x, y)
        model.backward()
        grads = model.grads
    else:
        optimizer_params = optimizer.params
        for p in optimizer_params.values():
            p.grad = None
        _, loss, _ = model(x, y)
        loss.backward()
        loss = loss.detach()
        grads = {name: p.grad for name, p in optimizer_params.items()}
    sq.clip_grad_norm(grads, CLIP_NORM)
    optimizer.step(grads)
    return float(loss)


def _eval_loss(backend: str, model: Any, val: np.ndarray, batch: int, block: int, seed: int,
               device: str) -> float:
    """Mean cross-entropy (nats/char) over EVAL_BATCHES fixed validation batches."""
    rng = np.random.default_rng([seed, 1 << 30])  # the same batches at every evaluation
    model.eval()
    losses = []
    for _ in range(EVAL_BATCHES):
        x, y = char_batches(val, batch, block, rng)
        if backend == "numpy":
            _, loss, _ = model(x, y)
        else:
            import torch
            with torch.no_grad():
                _, loss, _ = model(_as_backend_ids(backend, x, device),
                                   _as_backend_ids(backend, y, device))
        losses.append(float(loss))
    model.train()
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- checkpoint files

def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp_name)`` then rename over ``path`` (same directory: the rename is atomic)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _write_json(path: Path, value: dict) -> None:
    def write(name: str) -> None:
        Path(name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    _atomic_write(path, write)


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    _atomic_write(path, lambda name: save_file(arrays, name))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def save_checkpoint(out: Path, config: dict, params: dict[str, np.ndarray],
                    optimizer_state: dict[str, Any]) -> None:
    """Parameters and optimizer buffers first, config.json (which names the step) last."""
    _write_safetensors(out / "checkpoint.safetensors", params)
    buffers = {f"{kind}.{name}": value for kind in ("exp_avg", "exp_avg_sq")
               for name, value in _to_numpy(optimizer_state[kind]).items()}
    _write_safetensors(out / "optimizer.safetensors", buffers)
    _write_json(out / "config.json", config)


def load_checkpoint(directory: Path, argument: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, parameters as arrays); a UsageError naming ``argument`` when files are missing."""
    if not directory.is_dir():
        raise UsageError(f"{argument}: no such directory: {str(directory)!r}")
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise UsageError(f"{argument}: {str(directory)!r} holds no checkpoint "
                         f"(missing {', '.join(missing)}); write one with `seqtwin train`")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("task") != TASK:
        raise UsageError(f"{argument}: checkpoint task is {config.get('task')!r}, "
                         f"expected {TASK!r}")
    return config, _read_safetensors(directory / "checkpoint.safetensors")


def _load_optimizer_state(out: Path, step: int) -> dict[str, Any]:
    path = out / "optimizer.safetensors"
    if not path.is_file():
        raise UsageError(f"--resume: {str(out)!r} has no optimizer.safetensors")
    state: dict[str, Any] = {"step": step, "exp_avg": {}, "exp_avg_sq": {}}
    for key, value in _read_safetensors(path).items():
        kind, name = key.split(".", 1)
        state[kind][name] = value
    return state


def _plot_losses(out: Path) -> str:
    """Write out/loss.png from metrics.jsonl; returns a one-line note of what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "note: matplotlib is not installed, skipped loss.png (pip install 'seqtwin[cli]')"
    records = [json.loads(line) for line in
               (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in records], [r["train_loss"] for r in records], label="train")
    evals = [r for r in records if "val_loss" in r]
    axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/char)")
    axes.legend()
    _atomic_write(out / "loss.png", lambda name: figure.savefig(name, format="png", dpi=100))
    plt.close(figure)
    return f"wrote {out / 'loss.png'}"


# ----------------------------------------------------------------------------- train

def _resolve_data(data: str) -> Path:
    if data in CORPORA and not Path(data).exists():
        corpus = CORPORA[data]
        try:
            return resolve_corpus(url=corpus.url, sha256=corpus.sha256)
        except (OSError, ValueError) as err:  # no network, or a corrupted download
            raise UsageError(f"--data: could not fetch {data!r} from {corpus.url}: {err}"
                             ) from None
    path = Path(data).expanduser()
    if not path.is_file():
        raise UsageError(f"--data: no such file: {data!r} (give a text file or one of "
                         f"{', '.join(CORPORA)})")
    return path


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


def _progress(start: int, stop: int) -> tuple[Any, bool]:
    """(an iterable of steps, whether it is a tqdm bar)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return range(start, stop), False
    return tqdm(range(start, stop), initial=start, total=stop, desc="train", unit="step"), True


def train(args: argparse.Namespace) -> int:
    """``seqtwin train``: see the module docstring and ``seqtwin train --help``."""
    _check_device(args.backend, args.device)
    corpus = load_char_corpus(_resolve_data(args.data))
    out = Path(args.out).expanduser()
    has_checkpoint = all((out / name).is_file() for name in CHECKPOINT_FILES)
    if has_checkpoint and not args.resume:
        raise UsageError(f"--out: {str(out)!r} already holds a checkpoint; pass --resume to "
                         f"continue it or choose another --out")

    optimizer_state = None
    if args.resume:
        config, saved_params = load_checkpoint(out, "--resume")
        if config["vocab"] != corpus.vocab.chars:
            raise UsageError(f"--data: its vocabulary differs from the checkpoint's in "
                             f"{str(out)!r}; resume with the corpus it was trained on")
        optimizer_state = _load_optimizer_state(out, config["step"])
        model_config, dtype, start = config["model"], config["dtype"], config["step"]
    else:
        model_config = {"vocab_size": len(corpus.vocab), "embed_size": args.embed,
                        "hidden_size": args.hidden, "num_layers": args.layers,
                        "cell": args.cell}
        dtype, start = "float32", 0
    for name, split in (("train", corpus.train), ("validation", corpus.val)):
        if args.block >= len(split):
            raise UsageError(f"--block: expected < {len(split)} (the {name} split's length), "
                             f"got {args.block}")
    if start >= args.steps:
        raise UsageError(f"--steps: the checkpoint is at step {start} already; "
                         f"give --steps > {start} to train further")

    sq = _backend(args.backend)
    model = _build_model(args.backend, model_config, dtype, args.device, args.seed)
    params = _params(args.backend, model)
    if args.resume:
        live = _from_numpy(args.backend, saved_params, params)
        model.load_state_dict(live)
    optimizer = sq.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if optimizer_state is not None:
        for kind in ("exp_avg", "exp_avg_sq"):
            optimizer_state[kind] = _from_numpy(args.backend, optimizer_state[kind], params)
        optimizer.load_state_dict(optimizer_state)
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    warmup = min(warmup, args.steps)

    out.mkdir(parents=True, exist_ok=True)
    config = {"task": TASK, "model": model_config, "dtype": dtype, "vocab": corpus.vocab.chars,
              "step": start, "data": str(args.data), "backend": args.backend,
              "train": {"lr": args.lr, "warmup": warmup, "steps": args.steps,
                        "batch": args.batch, "block": args.block, "seed": args.seed,
                        "weight_decay": args.weight_decay, "clip_norm": CLIP_NORM}}

    def checkpoint(step: int) -> None:
        config["step"] = step
        save_checkpoint(out, config, _to_numpy(params), optimizer.state_dict())

    steps, is_bar = _progress(start, args.steps)
    tokens_per_step = args.batch * args.block
    step, loss, val_loss = start, float("nan"), None
    tick, tick_step = time.perf_counter(), start
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        try:
            for step in steps:
                optimizer.lr = sq.cosine_schedule(step, args.lr, warmup, args.steps,
                                                  min_lr=args.lr / 10)
                x, y = char_batches(corpus.train, args.batch, args.block,
                                    np.random.default_rng([args.seed, step]))
                loss = _train_step(args.backend, model, optimizer,
                                   _as_backend_ids(args.backend, x, args.device),
                                   _as_backend_ids(args.backend, y, args.device))
                record = {"step": step + 1, "train_loss": loss, "lr": optimizer.lr}
                done = step + 1
                if done % args.eval_every == 0 or done == args.steps:
                    val_loss = _eval_loss(args.backend, model, corpus.val, args.batch,
                                          args.block, args.seed, args.device)
                    record["val_loss"] = val_loss
                    checkpoint(done)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                elapsed = time.perf_counter() - tick
                tokens_per_s = tokens_per_step * (done - tick_step) / max(elapsed, 1e-9)
                if is_bar:
                    steps.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                elif done % args.log_every == 0 or "val_loss" in record:
                    val = f" | val loss {val_loss:.4f}" if "val_loss" in record else ""
                    print(f"step {done:>6} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s{val}",
                          flush=True)
                    tick, tick_step = time.perf_counter(), done
        except KeyboardInterrupt:
            saved = optimizer.step_count
            checkpoint(saved)
            print(f"\ninterrupted: saved step {saved} to {out}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if is_bar:
                steps.close()
    print(f"done: step {args.steps} | train loss {loss:.4f} | val loss {val_loss:.4f} "
          f"nats/char | checkpoint {out}")
    print(_plot_losses(out))
    return 0


# ----------------------------------------------------------------------------- generate

def generate(args: argparse.Namespace) -> int:
    """``seqtwin generate``: prompt + max_new_tokens characters on stdout.

    Runs in float64 on the CPU in either backend, so a checkpoint gives the same greedy text in
    both; sampling draws its uniforms from ``np.random.default_rng(seed)``, the same in both.
    """
    config, saved_params = load_checkpoint(Path(args.checkpoint).expanduser(), "--checkpoint")
    vocab = CharVocab("".join(config["vocab"]))
    if not args.prompt:
        raise UsageError("--prompt: expected at least one character")
    unknown = sorted(set(args.prompt) - set(vocab.chars))
    if unknown:
        raise UsageError(f"--prompt: characters {''.join(unknown)!r} are not in the "
                         f"checkpoint's vocabulary of {len(vocab)} characters")
    sq = _backend(args.backend)
    model = _build_model(args.backend, config["model"], "float64")
    model.load_state_dict(_from_numpy(args.backend, saved_params, _params(args.backend, model)))
    model.eval()

    prompt = vocab.encode(args.prompt)
    state = model.init_state(1)
    if len(prompt) > 1:  # run the prompt but its last character, which the decoder feeds
        context = _as_backend_ids(args.backend, prompt[None, :-1], "cpu")
        if args.backend == "numpy":
            _, _, state = model(context, state=state)
        else:
            import torch
            with torch.no_grad():
                _, _, state = model(context, state=state)
    bos = _as_backend_ids(args.backend, prompt[-1:], "cpu")
    if args.greedy:
        result = sq.greedy_decode(model.step, state, bos, args.max_new_tokens)
    else:
        uniforms = np.random.default_rng(args.seed).random((1, args.max_new_tokens))
        result = sq.sample_decode(model.step, state, bos, args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k or None,
                                  uniforms=_as_backend_ids(args.backend, uniforms, "cpu"))
    tokens = np.asarray(_to_numpy({"tokens": result.tokens})["tokens"][0])
    print(args.prompt + vocab.decode(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
