"""Generation tokens/s: greedy, sampling and beam search (beam 4) at batch 1 and batch 8, for
the GPT of bench_models: ``GPT.generate`` of the reference and of torch_impl against
``transformers``' ``generate`` on a GPT2LMHeadModel of the same shape and weights (built from
a config, no download), all with the KV cache.

Every row continues one BOS token per prompt (token 0) by exactly N new tokens (no EOS).
Sampling is plain ancestral sampling (temperature 1, no top-k/top-p); reference and
torch_impl read the same uniforms, so their tokens must agree; transformers draws from its
own generator (no error column). Beam search returns the best of 4 beams.

Tokens per call: B N (a beam row counts its N output tokens once). FLOP count per call, the
work a KV-cache decoder needs for R = B (greedy, sampling) or 4 B (beam) rows::

    R N (24 L E^2 + 2 E V) + R 4 L E N (N + 1) / 2

Bytes per call: N W, W the bytes of the weights a step reads (the blocks and the tied head,
4 (12 L E^2 + E V) in float32): every step reads every weight once, whatever the batch.
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
from benchmarks.bench_models import GPT_SIZES, GPTSizes, gpt_config, hf_gpt2
from benchmarks.suite import Impl, Outputs, Settings, Workload
from benchmarks.suite import main as suite_main

BEAMS = 4
HF = "transformers generate"


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
            "so a non-zero sampling error is rounding, not a bug; greedy and beam must agree."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_generation",
                      default_suite="generation")


if __name__ == "__main__":
    raise SystemExit(main())
