"""Scaled dot-product attention, side by side: torch_impl (blocked, hand-written backward)
against F.scaled_dot_product_attention (flash / memory-efficient on CUDA, math or flash on CPU).

FLOP count (the two matrix products of the forward, halved for causal)::

    forward           4 B h Tq Tk d  (x 1/2 causal)
    forward+backward  3.5 x forward  (the backward recomputes S and does four more products)

Run one at a time, e.g.::

    python -m benchmarks.bench_attention                          # CPU, float32, T 256
    python -m benchmarks.bench_attention --device cuda --dtype bfloat16 --lengths 2048,4096 \
        --head-dims 64,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import torch_impl
from benchmarks.harness import (
    announce_command,
    machine_info,
    machine_slug,
    markdown_table,
    time_call,
    write_results,
)

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def flops(B: int, h: int, T: int, d: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * B * h * T * T * d * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def runner(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           dout: torch.Tensor, backward: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(dout)
        return out
    return run


def bench_shape(T: int, d: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    B, h = args.batch, args.heads
    dtype = TORCH_DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v, dout = (torch.randn(B, h, T, d, generator=gen).to(args.device, dtype)
                     for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    if args.padding:
        # every other sequence padded over its last quarter: torch_impl takes the key padding
        # mask, F.sdpa one bool mask (True = attend) of padding and causality together
        pad = torch.zeros(B, T, dtype=torch.bool, device=args.device)
        pad[::2, T - T // 4:] = True
        visible = ~pad[:, None, None, :] & torch.ones(T, T, dtype=torch.bool,
                                                      device=args.device).tril()
        impls = {
            "F.sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible),
            "torch_impl": lambda q, k, v: torch_impl.scaled_dot_product_attention(
                q, k, v, key_padding_mask=pad, causal=True),
        }
    else:
        visible = None
        impls = {
            "F.sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "torch_impl": lambda q, k, v: torch_impl.scaled_dot_product_attention(q, k, v,
                                                                                  causal=True),
        }
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                  attn_mask=visible, is_causal=visible is None)
    rows = []
    for workload, backward in (("forward", False), ("forward+backward", True)):
        for name, fn in impls.items():
            run = runner(fn, q, k, v, dout, backward)
            out = run()
            err = float((out.detach().double() - expected).norm() / expected.norm())
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            timing = time_call(run, args.device, warmup=args.warmup, repeat=args.repeat,
                               min_seconds=args.min_seconds)
            peak = (torch.cuda.max_memory_allocated() / 2**20
                    if args.device.startswith("cuda") else None)
            t = timing["median_s"]
            op = "causal attention" + (", key padding" if args.padding else "")
            rows.append({"op": op, "workload": workload, "impl": name,
                         "shape": {"B": B, "h": h, "T": T, "d": d}, "dtype": args.dtype,
                         "device": args.device, **timing, "tokens_per_s": B * T / t,
                         "tflop_per_s": flops(B, h, T, d, True, backward) / t / 1e12,
                         "peak_mib": peak, "rel_err_vs_float64": err})
            print(f"  T={T:5d} d={d:3d} {workload:16s} {name:10s} {t * 1e3:9.3f} ms "
                  f"{rows[-1]['tflop_per_s']:7.2f} TFLOP/s err {err:.1e}", file=sys.stderr,
                  flush=True)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    key = lambda r: (r["shape"]["T"], r["shape"]["d"], r["workload"])  # noqa: E731
    baseline = {key(r): r["median_s"] for r in rows if r["impl"] == "F.sdpa"}
    return markdown_table(
        ["T", "d", "workload", "impl", "median ms", "TFLOP/s", "vs F.sdpa", "peak MiB",
         "rel err vs f64"],
        [[r["shape"]["T"], r["shape"]["d"], r["workload"], r["impl"], f"{r['median_s'] * 1e3:.3f}",
          f"{r['tflop_per_s']:.2f}", f"{baseline[key(r)] / r['median_s']:.2f}x",
          "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
          f"{r['rel_err_vs_float64']:.1e}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--lengths", default="256", help="comma list of sequence lengths")
    p.add_argument("--head-dims", default="64", help="comma list of head dims")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padding", action="store_true",
                   help="also a key padding mask: every other sequence padded over its last "
                        "quarter")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    command = announce_command("benchmarks.bench_attention", argv)
    rows = []
    for T in (int(s) for s in args.lengths.split(",")):
        for d in (int(s) for s in args.head_dims.split(",")):
            rows += bench_shape(T, d, args)
    table = summary_table(rows)
    out_dir = args.out or Path(__file__).parent / "results" / machine_slug(args.device)
    stem = f"attention_{args.device.split(':')[0]}_{args.dtype}_B{args.batch}_h{args.heads}"
    stem += "_padded" if args.padding else ""
    title = "Causal attention" + (" with key padding" if args.padding else "")
    payload = {"command": command, "machine": machine_info(args.device), "rows": rows}
    paths = write_results(out_dir, stem, payload, f"# {title}\n\n`{command}`\n\n{table}\n")
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
