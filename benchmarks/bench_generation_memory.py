"""Peak memory of ``GPT.generate`` against the number of new tokens: what one call allocates
beyond the model, next to what the decode session preallocates (the KV cache, sized for the
whole call) and the O(B V) logits, for the GPT of bench_models ("small": L4 E256 V8192,
float32) at batch 8, greedy and beam 4.

The cache is 2 L rows (P + N - 1) E 4 bytes (rows = batch x beams); the session also keeps
a (E, V) copy of the tied head, made once per set of weights (4 E V bytes, outside a call
after the first). A generation whose peak follows the cache and not N's square, and stays
flat once the cache is accounted for, does not grow with the steps.

    python -m benchmarks.bench_generation_memory            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import torch_impl
from benchmarks.bench_models import GPT_SIZES, gpt_config
from benchmarks.harness import peak_memory_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generation_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", default="16,64,128,224",
                        help="comma list of max_new_tokens (default 16,64,128,224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    s = GPT_SIZES["small"]
    model = torch_impl.GPT(gpt_config(torch_impl, s)).eval()
    prompt = torch.zeros(args.batch, 1, dtype=torch.int64)
    model.generate(prompt, max_new_tokens=2)  # the head copy, the kernels' first load
    rows = []
    print(f"# python -m benchmarks.bench_generation_memory --new-tokens {args.new_tokens} "
          f"--batch {args.batch}\n")
    print("| decoding | B | new tokens | peak MiB | KV cache MiB | logits MiB |")
    print("|---|---|---|---|---|---|")
    for beams in (1, 4):
        for n in (int(v) for v in args.new_tokens.split(",")):
            cache = 2 * s.layers * args.batch * beams * n * s.width * 4 / 2**20
            logits = args.batch * beams * s.vocab * 4 / 2**20
            peak = peak_memory_mib(lambda n=n, beams=beams: model.generate(
                prompt, max_new_tokens=n, num_beams=beams))
            rows.append({"num_beams": beams, "batch": args.batch, "new_tokens": n,
                         "peak_mib": peak, "cache_mib": cache, "logits_mib": logits})
            name = "greedy" if beams == 1 else f"beam {beams}"
            print(f"| {name} | {args.batch} | {n} | {peak:.1f} | {cache:.1f} | {logits:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
