"""Generation tokens/s: greedy, sampling and beam search (beam 4) at batch 1 and batch 8, for
the GPT of bench_models: ``GPT.generate`` of the reference and of torch_impl against
``transformers``' ``generate`` on a GPT2LMHeadModel of the same shape and weights (built from
a config, no download), all with the KV cache. Then the recurrent models, greedy and beam 4
at batch 1 and 8: an LSTM ``RNNLM.generate`` against the decode loop a torch.nn user writes
(nn.Embedding, a stateful nn.LSTM called one token at a time, nn.Linear, argmax; greedy
only), and the Seq2Seq of bench_models (bidirectional LSTM encoder, Luong "general"
attention; 32-token sources) against the reference alone (torch has no ready-made
attentional encoder-decoder).

Every row continues one BOS token per prompt (token 0) by exactly N new tokens (no EOS).
Sampling is plain ancestral sampling (temperature 1, no top-k/top-p); reference and
torch_impl read the same uniforms, so their tokens must agree; transformers draws from its
own generator (no error column). Beam search returns the best of 4 beams.

Tokens per call: B N (a beam row counts its N output tokens once). FLOP count per call, the
work a KV-cache decoder needs for R = B (greedy, sampling) or 4 B (beam) rows::

    R N (24 L E^2 + 2 E V) + R 4 L E N (N + 1) / 2

Recurrent models, G = 4 gates, R rows as above: the RNNLM (L layers, E, H, V) does
R N 2 G H (E + H + (L - 1) 2 H) + R N 2 H V; the Seq2Seq decoder (Hd = 2 H) does
R N (2 G Hd (E + Hd) + 4 Hd Ts + 4 Hd^2 + 2 Hd V) after its encoder, B 2 2 Ts G H (E + H).

Bytes per call: N W, W the bytes of the weights a step reads (the blocks and the tied head,
4 (12 L E^2 + E V) in float32; for the recurrent models their recurrent, combine and head
weights): every step reads every weight once, whatever the batch.
The "% peak (bw)" column is then the **weight-read bound fraction**: the rate at which a
call streams its weights over the copy bandwidth measured in the same run, i.e. its tokens/s
over the tokens/s of a decoder that did nothing but read the weights once per step. A value
above 100% means the weights (W = 21 MiB for "small") were served from the caches.

    python -m benchmarks.bench_generation              # small: 32 new tokens, B 1 and 8
    python -m benchmarks.bench_generation --sizes tiny
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import reference
import torch_impl
from benchmarks.bench_models import (
    GPT_SIZES,
    SEQ2SEQ_SIZES,
    GPTSizes,
    Seq2SeqSizes,
    gpt_config,
    hf_gpt2,
)
from benchmarks.suite import Impl, Outputs, Settings, Workload
from benchmarks.suite import main as suite_main

BEAMS = 4
HF = "transformers generate"
NN_LOOP = "torch.nn decode loop"
# The RNNLM's weights are torch's init times this: at the init itself its next-token
# distributions are near uniform over V, and beam 4's float32 scores then meet ties that
# numpy's and torch's roundings break differently (about half the tokens differed from the
# float64 reference; none at this scale).
WEIGHT_SCALE = 4.0


@dataclass(frozen=True)
class GenerationSizes:
    model: GPTSizes
    new_tokens: int
    batches: tuple[int, ...]


SIZES = {
    "tiny": GenerationSizes(GPT_SIZES["tiny"], 6, (1, 2)),
    "small": GenerationSizes(GPT_SIZES["small"], 32, (1, 8)),
    "medium": GenerationSizes(GPT_SIZES["medium"], 128, (1, 8)),
}


@dataclass(frozen=True)
class RNNLMSizes:
    layers: int
    embed: int   # E
    hidden: int  # H
    vocab: int   # V


RNNLM_SIZES = {
    "tiny": RNNLMSizes(2, 8, 8, 32),
    "small": RNNLMSizes(2, 256, 512, 8192),
    "medium": RNNLMSizes(2, 512, 1024, 16000),
}


def generate(model: object, mode: str, bos: object, uniforms: object,
             new_tokens: int) -> object:
    """The new tokens (B, N) of either backend's ``GPT.generate`` (bos and uniforms are
    that backend's arrays)."""
    options = dict(max_new_tokens=new_tokens, do_sample=mode == "sample",
                   num_beams=BEAMS if mode == "beam" else 1)
    if mode == "sample":
        options["uniforms"] = uniforms
    return model.generate(bos[:, None], **options)[:, 1:]


def hf_options(mode: str, new_tokens: int) -> dict[str, object]:
    options = dict(max_new_tokens=new_tokens, use_cache=True, pad_token_id=0,
                   do_sample=mode == "sample", num_beams=BEAMS if mode == "beam" else 1)
    if mode == "sample":
        options.update(top_k=0, top_p=1.0, temperature=1.0)
    if mode == "beam":
        options.update(length_penalty=1.0, early_stopping=False)
    return options


def workloads(settings: Settings) -> list[Workload]:
    sizes = SIZES[settings.sizes]
    s, N = sizes.model, sizes.new_tokens
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    hf = hf_gpt2(s, settings.device).eval()
    state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    models = {}
    for dtype in ("float32", "float64"):
        models[dtype] = reference.GPT(gpt_config(reference, s), dtype=np.dtype(dtype))
        models[dtype].load_state_dict(state)
    ours = torch_impl.GPT(gpt_config(torch_impl, s), device=settings.device).eval()
    ours.load_state_dict(state)
    expected: dict[tuple[str, int], Outputs] = {}  # (mode, B) -> the float64 reference's tokens

    result = []
    for mode in ("greedy", "sample", "beam"):
        for B in sizes.batches:
            bos = np.zeros(B, dtype=np.int64)
            uniforms = rng.random((B, N))
            bos_t = torch.zeros(B, dtype=torch.int64, device=settings.device)
            uniforms_t = torch.tensor(uniforms, device=settings.device)

            def oracle(mode: str = mode, B: int = B, bos: np.ndarray = bos,
                       uniforms: np.ndarray = uniforms) -> Outputs:
                if (mode, B) not in expected:
                    expected[mode, B] = {"tokens": generate(models["float64"], mode, bos,
                                                            uniforms, N)}
                return expected[mode, B]

            def reference_run(mode: str = mode, bos: np.ndarray = bos,
                              uniforms: np.ndarray = uniforms) -> Outputs:
                return {"tokens": generate(models["float32"], mode, bos, uniforms, N)}

            def torch_run(mode: str = mode, bos: torch.Tensor = bos_t,
                          uniforms: torch.Tensor = uniforms_t) -> Outputs:
                return {"tokens": generate(ours, mode, bos, uniforms, N)}

            def hf_run(bos: torch.Tensor = bos_t, options: dict = hf_options(mode, N)
                       ) -> Outputs:
                with torch.no_grad():
                    out = hf.generate(bos[:, None], attention_mask=torch.ones_like(
                        bos[:, None]), **options)
                return {"tokens": out[:, 1:]}

            result.append(workload(settings, s, mode, B, N, [
                Impl("reference", "float32", reference_run, library="numpy"),
                Impl("torch_impl", "float32", torch_run, device=settings.device),
                Impl(HF, "float32", hf_run, device=settings.device,
                     check=mode != "sample")], oracle))
    return result + rnnlm_workloads(settings) + seq2seq_workloads(settings)


class NNLanguageModel(torch.nn.Module):
    """The LSTM language model as a torch.nn user writes it; its state dict's names are
    those of torch_impl.RNNLM."""

    def __init__(self, s: RNNLMSizes) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(s.vocab, s.embed)
        self.rnn = torch.nn.LSTM(s.embed, s.hidden, s.layers, batch_first=True)
        self.head = torch.nn.Linear(s.hidden, s.vocab)

    @torch.no_grad()
    def greedy(self, bos: torch.Tensor, new_tokens: int) -> torch.Tensor:
        token, state, out = bos, None, []
        for _ in range(new_tokens):
            y, state = self.rnn(self.embedding(token[:, None]), state)
            token = self.head(y[:, 0]).argmax(dim=-1)
            out.append(token)
        return torch.stack(out, dim=1)


def recurrent_options(mode: str, new_tokens: int) -> dict[str, object]:
    return dict(max_new_tokens=new_tokens, num_beams=BEAMS if mode == "beam" else 1)


def rnnlm_workloads(settings: Settings) -> list[Workload]:
    s, N = RNNLM_SIZES[settings.sizes], SIZES[settings.sizes].new_tokens
    torch.manual_seed(settings.seed)
    ours = torch_impl.RNNLM(s.vocab, s.embed, s.hidden, s.layers, "lstm",
                            device=settings.device).eval()
    with torch.no_grad():  # peaked next-token distributions (see notes)
        for p in ours.parameters():
            p.mul_(WEIGHT_SCALE)
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    models = {}
    for dtype in ("float32", "float64"):
        models[dtype] = reference.RNNLM(s.vocab, s.embed, s.hidden, s.layers, "lstm",
                                        dtype=np.dtype(dtype))
        models[dtype].load_state_dict(state)
    nn_model = NNLanguageModel(s).to(settings.device).eval()
    nn_model.load_state_dict(state)
    G, L, E, H, V = 4, s.layers, s.embed, s.hidden, s.vocab
    weights = G * H * (E + H + (L - 1) * 2 * H) + H * V
    result = []
    for mode in ("greedy", "beam"):
        for B in SIZES[settings.sizes].batches:
            bos = np.zeros((B, 1), dtype=np.int64)
            bos_t = torch.zeros((B, 1), dtype=torch.int64, device=settings.device)
            options = recurrent_options(mode, N)

            def oracle(bos: np.ndarray = bos, options: dict = options) -> Outputs:
                return {"tokens": models["float64"].generate(bos, **options)[:, 1:]}

            impls = [Impl("reference", "float32", lambda bos=bos, options=options: {
                         "tokens": models["float32"].generate(bos, **options)[:, 1:]},
                          library="numpy"),
                     Impl("torch_impl", "float32", lambda bos=bos_t, options=options: {
                         "tokens": ours.generate(bos, **options)[:, 1:]},
                          device=settings.device)]
            targets = [("torch_impl float32", "reference float32", 1.0)]
            if mode == "greedy":
                impls.append(Impl(NN_LOOP, "float32", lambda bos=bos_t: {
                    "tokens": nn_model.greedy(bos[:, 0], N)}, device=settings.device))
                targets.insert(0, ("torch_impl float32", f"{NN_LOOP} float32", 1.0))
            rows = B * (BEAMS if mode == "beam" else 1)
            result.append(Workload(
                "generation", f"rnnlm {mode if mode != 'beam' else f'beam {BEAMS}'}",
                f"LSTM B={B} N={N} (L={L} E={E} H={H} V={V})", B * N,
                rows * N * 2.0 * weights, impls, oracle=oracle,
                anchor=NN_LOOP if mode == "greedy" else "reference", bytes=N * 4.0 * weights,
                targets=targets))
    return result


def seq2seq_workloads(settings: Settings) -> list[Workload]:
    s: Seq2SeqSizes = SEQ2SEQ_SIZES[settings.sizes]
    N, Ts, V = SIZES[settings.sizes].new_tokens, s.src_steps, s.vocab
    kwargs = dict(src_vocab=V, tgt_vocab=V, embed_size=s.embed, hidden_size=s.hidden,
                  cell="lstm", bidirectional=True, attention="general")
    torch.manual_seed(settings.seed)
    ours = torch_impl.Seq2Seq(torch_impl.Seq2SeqConfig(**kwargs), device=settings.device).eval()
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    models = {}
    for dtype in ("float32", "float64"):
        models[dtype] = reference.Seq2Seq(reference.Seq2SeqConfig(**kwargs),
                                          dtype=np.dtype(dtype))
        models[dtype].load_state_dict(state)
    rng = np.random.default_rng(settings.seed)
    G, E, H, Hd = 4, s.embed, s.hidden, 2 * s.hidden
    weights = G * Hd * (E + Hd) + 2 * Hd * Hd + Hd * V
    result = []
    for mode in ("greedy", "beam"):
        for B in SIZES[settings.sizes].batches:
            src = rng.integers(1, V, (B, Ts))
            lengths = rng.integers(Ts // 2 + 1, Ts + 1, B)
            lengths[0] = Ts
            src[np.arange(Ts) >= lengths[:, None]] = 0
            src_t, lengths_t = (torch.tensor(a, device=settings.device) for a in (src, lengths))
            options = {**recurrent_options(mode, N), "decoder_start_token_id": 1}

            def oracle(src: np.ndarray = src, lengths: np.ndarray = lengths,
                       options: dict = options) -> Outputs:
                return {"tokens": models["float64"].generate(src, lengths, **options)[:, 1:]}

            impls = [Impl("reference", "float32", lambda src=src, lengths=lengths,
                          options=options: {"tokens": models["float32"].generate(
                              src, lengths, **options)[:, 1:]}, library="numpy"),
                     Impl("torch_impl", "float32", lambda src=src_t, lengths=lengths_t,
                          options=options: {"tokens": ours.generate(
                              src, lengths, **options)[:, 1:]}, device=settings.device)]
            rows = B * (BEAMS if mode == "beam" else 1)
            flops = (rows * N * 2.0 * (G * Hd * (E + Hd) + 2 * Hd * Ts + 2 * Hd * Hd + Hd * V)
                     + B * 2 * 2.0 * Ts * G * H * (E + H))
            result.append(Workload(
                "generation", f"seq2seq {mode if mode != 'beam' else f'beam {BEAMS}'}",
                f"LSTM bidir Luong-general B={B} Ts={Ts} N={N} (E={E} H={H} V={V})", B * N,
                flops, impls, oracle=oracle, anchor="reference", bytes=N * 4.0 * weights,
                targets=[("torch_impl float32", "reference float32", 1.0)]))
    return result


def weight_bytes(s: GPTSizes) -> float:
    """W: the float32 bytes of the weights one decode step reads (blocks and tied head)."""
    return 4.0 * (12 * s.layers * s.width**2 + s.width * s.vocab)


def workload(settings: Settings, s: GPTSizes, mode: str, B: int, N: int,
             impls: list[Impl], oracle: Callable[[], Outputs]) -> Workload:
    rows = B * (BEAMS if mode == "beam" else 1)
    L, E, V = s.layers, s.width, s.vocab
    flops = rows * N * (24.0 * L * E * E + 2.0 * E * V) + rows * 4.0 * L * E * N * (N + 1) / 2
    ratio = 2.0 if mode == "beam" else 3.0
    targets = [("torch_impl float32", f"{HF} float32", ratio),
               ("torch_impl float32", "reference float32", 1.0)]
    name = f"{mode if mode != 'beam' else f'beam {BEAMS}'} kv cache"
    return Workload("generation", name, f"B={B} N={N} (L={L} E={E} V={V})", B * N, flops,
                    impls, oracle=oracle, anchor=HF, bytes=N * weight_bytes(s),
                    targets=targets)


def notes(settings: Settings) -> list[str]:
    sizes = SIZES[settings.sizes]
    mib = weight_bytes(sizes.model) / 2**20
    return [f"generation: the GPT of the models suite, {sizes.new_tokens} new tokens from one "
            f"BOS per prompt with generate(), float32; % peak (bw) is the weight-read bound "
            f"fraction (each step reads the {mib:.0f} MiB of weights once; copy bandwidth of "
            f"this run); peak MiB is what one call allocates beyond the model; rel err here "
            "is the fraction of generated tokens that "
            "differ from the float64 reference's (transformers sampling: its own random "
            "stream, not compared). Sampling is discontinuous in the logits: where a float32 "
            "CDF lands on the other side of a uniform, one token and every later one change, "
            "so a non-zero sampling error is rounding, not a bug; greedy and beam must agree.",
            f"generation, recurrent models: no EOS, exactly {sizes.new_tokens} new tokens; "
            f"the {NN_LOOP} is nn.Embedding, a stateful nn.LSTM fed one token per call and "
            "nn.Linear, greedy only; the RNNLM's weights are torch's init x 4 (peaked "
            "distributions; near-uniform ones make float32 ties in beam scores); the "
            "Seq2Seq rows are held to the reference alone."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_generation",
                      default_suite="generation")


if __name__ == "__main__":
    raise SystemExit(main())
