"""Generation tokens/s: greedy, sampling and beam search (beam 4) at batch 1 and batch 8,
with and without the KV cache, for the GPT of bench_models: the reference's and torch_impl's
decoders on their GPT's ``init_state`` / ``step`` against ``transformers``' ``generate`` on a
GPT2LMHeadModel of the same shape and weights (built from a config, no download).

Every row starts from one BOS token per prompt (token 0) and generates exactly N new tokens
(no EOS). Sampling is plain ancestral sampling (temperature 1, no top-k/top-p); reference
and torch_impl read the same uniforms, so their tokens must agree; transformers draws from
its own generator (no error column). Beam search returns the best of 4 beams.

Tokens per call: B N (a beam row counts its N output tokens once). FLOP count per call, the
work a KV-cache decoder needs for R = B (greedy, sampling) or 4 B (beam) rows::

    R N (24 L E^2 + 2 E V) + R 4 L E N (N + 1) / 2

(block weights and tied head per token, attention over t + 1 cached keys at step t). A
decoder without the cache redoes the prefix at every step: its GFLOP/s is this useful work
per second, not what it computes.
Target (issue #6): greedy and beam with the KV cache >= 2x transformers.generate, batch 1
and 8.

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


def decode(package: object, model: object, mode: str, bos: object, uniforms: object,
           new_tokens: int, kv_cache: bool) -> object:
    """Generated tokens (B, N) from either backend's decoders (package is reference or
    torch_impl; bos and uniforms are its arrays)."""
    state = model.init_state(bos.shape[0], kv_cache=kv_cache)
    if mode == "greedy":
        return package.greedy_decode(model.step, state, bos, new_tokens).tokens
    if mode == "sample":
        return package.sample_decode(model.step, state, bos, new_tokens,
                                     uniforms=uniforms).tokens
    return package.beam_search(model.step, state, bos, new_tokens, beam_size=BEAMS).tokens[:, 0]


def hf_options(mode: str, new_tokens: int, kv_cache: bool) -> dict[str, object]:
    options = dict(max_new_tokens=new_tokens, use_cache=kv_cache, pad_token_id=0,
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
                    expected[mode, B] = {"tokens": decode(reference, models["float64"], mode,
                                                          bos, uniforms, N, True)}
                return expected[mode, B]

            for kv_cache in (True, False):
                def reference_run(mode: str = mode, bos: np.ndarray = bos,
                                  uniforms: np.ndarray = uniforms, kv: bool = kv_cache
                                  ) -> Outputs:
                    return {"tokens": decode(reference, models["float32"], mode, bos,
                                             uniforms, N, kv)}

                def torch_run(mode: str = mode, bos: torch.Tensor = bos_t,
                              uniforms: torch.Tensor = uniforms_t, kv: bool = kv_cache
                              ) -> Outputs:
                    return {"tokens": decode(torch_impl, ours, mode, bos, uniforms, N, kv)}

                options = hf_options(mode, N, kv_cache)

                def hf_run(bos: torch.Tensor = bos_t, options: dict = options) -> Outputs:
                    with torch.no_grad():
                        out = hf.generate(bos[:, None], attention_mask=torch.ones_like(
                            bos[:, None]), **options)
                    return {"tokens": out[:, 1:]}

                result.append(workload(settings, s, mode, B, N, kv_cache, [
                    Impl("reference", "float32", reference_run, library="numpy"),
                    Impl("torch_impl", "float32", torch_run, device=settings.device),
                    Impl(HF, "float32", hf_run, device=settings.device,
                         check=mode != "sample")], oracle))
    return result


def workload(settings: Settings, s: GPTSizes, mode: str, B: int, N: int, kv_cache: bool,
             impls: list[Impl], oracle: Callable[[], Outputs]) -> Workload:
    rows = B * (BEAMS if mode == "beam" else 1)
    L, E, V = s.layers, s.width, s.vocab
    flops = rows * N * (24.0 * L * E * E + 2.0 * E * V) + rows * 4.0 * L * E * N * (N + 1) / 2
    targets = []
    if kv_cache and mode in ("greedy", "beam"):
        targets = [("torch_impl float32", f"{HF} float32", 2.0)]
    name = f"{mode if mode != 'beam' else f'beam {BEAMS}'} {'kv cache' if kv_cache else 'no cache'}"
    return Workload("generation", name, f"B={B} N={N} (L={L} E={E} V={V})", B * N, flops,
                    impls, oracle=oracle, anchor=HF, targets=targets)


def notes(settings: Settings) -> list[str]:
    sizes = SIZES[settings.sizes]
    return [f"generation: the GPT of the models suite, {sizes.new_tokens} new tokens from one "
            "BOS per prompt, float32; rel err here is the fraction of generated tokens that "
            "differ from the float64 reference's (transformers sampling: its own random "
            "stream, not compared). Sampling is discontinuous in the logits: where a float32 "
            "CDF lands on the other side of a uniform, one token and every later one change, "
            "so a non-zero sampling error is rounding, not a bug; greedy and beam must agree."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_generation",
                      default_suite="generation")


if __name__ == "__main__":
    raise SystemExit(main())
