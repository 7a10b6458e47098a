"""Model training steps: a GPT against transformers' GPT2LMHeadModel of the same shape, the
encoder-decoder Transformer against torch.nn.Transformer, and the Seq2Seq model (no anchor:
torch has no ready-made attentional RNN encoder-decoder).

A training step is forward, loss and backward (every parameter's gradient); the optimizer
update, O(parameters) and the same for every implementation, is left out. Parameters are
shared: the transformers model is built from a config (no download) and its state dict is
loaded into torch_impl's and the reference's GPT; the Seq2Seq's torch_impl state dict into
the reference's.

FLOP count per step (3 x forward: the backward is 2 x forward)::

    GPT       forward B T (24 L E^2 + 2 E V + 2 L T E): the 12 L E^2 block weights and the
              tied head, 2 FLOP per weight per token, and causal attention (q k^T and p v,
              4 T E per token and layer, halved by the mask)
    Transformer  forward, E = d_model, F = dim_feedforward, source S, target T (causal):
              B [S Le (8 E^2 + 4 S E + 4 E F) + T Ld (12 E^2 + 2 T E + 4 S E + 4 E F)
              + S Ld 4 E^2]: per layer the projections (2 FLOP per weight per token), the
              attention products and the feed-forward; the decoder's cross-attention keys and
              values are projected from the S memory tokens
    Seq2Seq   forward, one layer, D directions, Hd = D H, Luong "general" attention:
              encoder D 2 B Ts 4H (E + H) + decoder 2 B Tt 4Hd (E + Hd)
              + attention 2 B Tt Hd (Hd + 2 Ts) + combine 2 B Tt 2Hd Hd + head 2 B Tt Hd V

Tokens per step: B T (GPT), B (S + T) (Transformer), B Tt target tokens (Seq2Seq).
Targets: torch_impl GPT training step >= 1.5x transformers, same shape; the torch_impl
Transformer (forward + backward of every parameter and both inputs) >= 1.0x torch.nn.Transformer
at d_model 256, 4 + 4 layers, B16, S 128, T 32.

    python -m benchmarks.bench_models                   # small: GPT L4 h4 E256 T256 B8
    python -m benchmarks.bench_models --sizes tiny
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import reference
import torch_impl
from benchmarks.suite import Impl, Outputs, Settings, Workload, compiled, to_torch
from benchmarks.suite import main as suite_main

HF = "transformers.GPT2LMHeadModel"
NN_TRANSFORMER = "torch.nn.Transformer"
# Pre-LN: with post-LN layers (torch.nn's default) the 8-layer stack's gradients at its input
# come out of float32 with a 3.8e-4 relative error in torch.nn and torch_impl alike (the
# stack's conditioning), over the 1e-4 budget; pre-LN's are within 1.2e-6.
NORM_FIRST = True


@dataclass(frozen=True)
class GPTSizes:
    layers: int
    heads: int
    width: int   # E
    context: int  # T, the block size
    batch: int
    vocab: int


@dataclass(frozen=True)
class Seq2SeqSizes:
    batch: int
    src_steps: int
    tgt_steps: int
    embed: int
    hidden: int  # per encoder direction; bidirectional LSTM encoder, one layer
    vocab: int   # source and target


GPT_SIZES = {
    "tiny": GPTSizes(1, 2, 16, 16, 2, 32),
    "small": GPTSizes(4, 4, 256, 256, 8, 8192),  # the headline shape; the vocabulary is ours
    "medium": GPTSizes(6, 8, 512, 512, 8, 16384),
}
@dataclass(frozen=True)
class TransformerSizes:
    d_model: int
    nhead: int
    layers: int        # encoder layers = decoder layers
    feedforward: int
    batch: int
    src_steps: int
    tgt_steps: int


TRANSFORMER_SIZES = {
    "tiny": TransformerSizes(8, 2, 1, 16, 2, 5, 4),
    "small": TransformerSizes(256, 4, 4, 1024, 16, 128, 32),   # the headline shape
    "medium": TransformerSizes(512, 8, 6, 2048, 16, 256, 64),  # nn.Transformer's defaults
}
SEQ2SEQ_SIZES = {
    "tiny": Seq2SeqSizes(2, 5, 4, 8, 8, 20),
    "small": Seq2SeqSizes(32, 32, 32, 256, 256, 8000),
    "medium": Seq2SeqSizes(64, 48, 48, 512, 512, 16000),
}


def hf_gpt2(s: GPTSizes, device: str) -> torch.nn.Module:
    """transformers' GPT-2 of this shape, built from a config (no download), no dropout,
    no BOS/EOS so that generation never stops early."""
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=s.vocab, n_positions=s.context, n_embd=s.width, n_layer=s.layers,
        n_head=s.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.GPT2LMHeadModel(config).to(device)


def gpt_config(package: object, s: GPTSizes) -> object:
    return package.GPTConfig(vocab_size=s.vocab, block_size=s.context, n_layer=s.layers,
                             n_head=s.heads, n_embd=s.width)


def gpt_train_step(settings: Settings) -> Workload:
    s = GPT_SIZES[settings.sizes]
    B, T = s.batch, s.context
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    ids, targets = rng.integers(0, s.vocab, (B, T)), rng.integers(0, s.vocab, (B, T))
    hf = hf_gpt2(s, settings.device)
    state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        model = reference.GPT(gpt_config(reference, s), dtype=np.dtype(dtype))
        model.load_state_dict(state)

        def run() -> Outputs:
            _, loss = model(ids, targets)
            model.backward()
            return {"out": loss, **model.grads}
        return run

    def torch_run(model: torch.nn.Module, loss_of: Callable[..., torch.Tensor]
                  ) -> Callable[[], Outputs]:
        ids_, targets_ = (to_torch(a, "float32", settings.device) for a in (ids, targets))

        def run() -> Outputs:
            model.zero_grad(set_to_none=True)
            loss = loss_of(model, ids_, targets_)
            loss.backward()
            return {"out": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
        return run

    def ours() -> torch.nn.Module:
        model = torch_impl.GPT(gpt_config(torch_impl, s), device=settings.device)
        model.load_state_dict(state)
        return model

    ours_loss = lambda m, ids, targets: m(ids, targets)[1]  # noqa: E731
    hf_loss = lambda m, ids, targets: F.cross_entropy(  # noqa: E731
        m(ids).logits.flatten(0, 1), targets.flatten())
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(ours(), ours_loss), device=settings.device)]
    if settings.full:
        model = ours()
        compiled_forward = compiled(model)
        impls.append(Impl("torch_impl compiled", "float32",
                          torch_run(model, lambda m, ids, t: compiled_forward(ids, t)[1]),
                          device=settings.device))
    impls.append(Impl(HF, "float32", torch_run(hf.train(), hf_loss), device=settings.device))
    L, E, V = s.layers, s.width, s.vocab
    flops = 3.0 * B * T * (24 * L * E * E + 2 * E * V + 2 * L * T * E)
    return Workload("models", "GPT training step", f"L={L} h={s.heads} E={E} T={T} B={B} V={V}",
                    B * T, flops, impls, oracle=reference_run("float64"), anchor=HF,
                    backward=True,
                    targets=[("torch_impl float32", f"{HF} float32", 1.5),
                             ("torch_impl compiled float32", f"{HF} float32", 1.5)])


def seq2seq_train_step(settings: Settings) -> Workload:
    s = SEQ2SEQ_SIZES[settings.sizes]
    B, Ts, Tt, V = s.batch, s.src_steps, s.tgt_steps, s.vocab
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    src, tgt_in, targets = (rng.integers(1, V, (B, n)) for n in (Ts, Tt, Tt))
    src_lengths = rng.integers(Ts // 2 + 1, Ts + 1, B)
    src_lengths[0] = Ts
    kwargs = dict(src_vocab=V, tgt_vocab=V, embed_size=s.embed, hidden_size=s.hidden,
                  cell="lstm", bidirectional=True, attention="general")
    ours = torch_impl.Seq2Seq(torch_impl.Seq2SeqConfig(**kwargs), device=settings.device)
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        model = reference.Seq2Seq(reference.Seq2SeqConfig(**kwargs), dtype=np.dtype(dtype))
        model.load_state_dict(state)

        def run() -> Outputs:
            _, loss = model(src, src_lengths, tgt_in, targets)
            model.backward()
            return {"out": loss, **model.grads}
        return run

    inputs = [to_torch(a, "float32", settings.device) for a in (src, src_lengths, tgt_in, targets)]

    def torch_run() -> Outputs:
        ours.zero_grad(set_to_none=True)
        _, loss = ours(*inputs)
        loss.backward()
        return {"out": loss.detach(), **{n: p.grad for n, p in ours.named_parameters()}}

    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run, device=settings.device)]
    E, H, Hd = s.embed, s.hidden, 2 * s.hidden
    forward = (2 * 2.0 * B * Ts * 4 * H * (E + H) + 2.0 * B * Tt * 4 * Hd * (E + Hd)
               + 2.0 * B * Tt * Hd * (Hd + 2 * Ts) + 2.0 * B * Tt * 2 * Hd * Hd
               + 2.0 * B * Tt * Hd * V)
    return Workload("models", "Seq2Seq training step",
                    f"LSTM bidir Luong-general B={B} Ts={Ts} Tt={Tt} E={E} H={H} V={V}",
                    B * Tt, 3 * forward, impls, oracle=reference_run("float64"), backward=True)


def transformer_train_step(settings: Settings) -> Workload:
    """Forward and backward of the encoder-decoder Transformer on embedded inputs: a causal
    target, the source's last quarter padded in half the rows, an upstream gradient dout."""
    s = TRANSFORMER_SIZES[settings.sizes]
    B, S, T, E = s.batch, s.src_steps, s.tgt_steps, s.d_model
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    src, tgt, dout = (rng.standard_normal(shape) for shape in ((B, S, E), (B, T, E), (B, T, E)))
    padding = np.zeros((B, S), dtype=bool)
    padding[::2, S - S // 4:] = True
    args = dict(d_model=E, nhead=s.nhead, num_encoder_layers=s.layers,
                num_decoder_layers=s.layers, dim_feedforward=s.feedforward, dropout=0.0,
                batch_first=True, norm_first=NORM_FIRST)
    with warnings.catch_warnings():  # torch.nn's note that pre-LN layers skip nested tensors
        warnings.simplefilter("ignore", UserWarning)
        anchor = torch.nn.Transformer(**args, device=settings.device)
    state = {k: v.detach().cpu() for k, v in anchor.state_dict().items()}

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        model = reference.Transformer(**args, dtype=np.dtype(dtype))
        model.load_state_dict(state)
        src_, tgt_, dout_ = (a.astype(dtype) for a in (src, tgt, dout))

        def run() -> Outputs:
            out = model(src_, tgt_, src_key_padding_mask=padding,
                        memory_key_padding_mask=padding, tgt_is_causal=True)
            dsrc, dtgt = model.backward(dout_)
            return {"out": out, "src": dsrc, "tgt": dtgt, **model.grads}
        return run

    def torch_run(model: torch.nn.Module, causal: torch.Tensor | None) -> Callable[[], Outputs]:
        src_, tgt_ = (to_torch(a, "float32", settings.device, grad=True) for a in (src, tgt))
        dout_ = to_torch(dout, "float32", settings.device)
        padding_ = torch.tensor(padding, device=settings.device)

        def run() -> Outputs:
            model.zero_grad(set_to_none=True)
            src_.grad = tgt_.grad = None
            out = model(src_, tgt_, tgt_mask=causal, src_key_padding_mask=padding_,
                        memory_key_padding_mask=padding_, tgt_is_causal=True)
            out.backward(dout_)
            return {"out": out.detach(), "src": src_.grad, "tgt": tgt_.grad,
                    **{n: p.grad for n, p in model.named_parameters()}}
        return run

    ours = torch_impl.Transformer(**args, device=settings.device)
    ours.load_state_dict(state)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, device=settings.device)
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(ours.train(), None),
                  device=settings.device),
             Impl(NN_TRANSFORMER, "float32", torch_run(anchor.train(), causal),
                  device=settings.device)]
    Le = Ld = s.layers
    F_ = s.feedforward
    forward = B * (S * Le * (8 * E * E + 4 * S * E + 4 * E * F_)
                   + T * Ld * (12 * E * E + 2 * T * E + 4 * S * E + 4 * E * F_)
                   + S * Ld * 4 * E * E)
    return Workload("models", "Transformer training step",
                    f"E={E} h={s.nhead} L={Le}+{Ld} F={F_} B={B} S={S} T={T}", B * (S + T),
                    3.0 * forward, impls, oracle=reference_run("float64"), anchor=NN_TRANSFORMER,
                    backward=True,
                    targets=[("torch_impl float32", f"{NN_TRANSFORMER} float32", 1.0)])


def workloads(settings: Settings) -> list[Workload]:
    return [gpt_train_step(settings), transformer_train_step(settings),
            seq2seq_train_step(settings)]


def notes(settings: Settings) -> list[str]:
    s = GPT_SIZES[settings.sizes]
    return [f"models: training step = forward + loss + backward, no optimizer update; GPT "
            f"vocabulary {s.vocab} (the headline shape fixes L, h, E, T, B, not V); transformers runs "
            "its default (sdpa) attention; the Transformer runs on embedded inputs (no "
            "embedding or loss), pre-LN (norm_first) relu, dropout 0, torch.nn in training mode; "
            "Seq2Seq "
            "has no anchor and no compiled row (its autograd Function runs Python loops)."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_models", default_suite="models")


if __name__ == "__main__":
    raise SystemExit(main())
