"""The fused kernels (``torch_impl.kernels``), each against what a user would call
instead, forward and forward+backward, with the error of both against float64.

- attention: ``kernels.flash_attention`` (Triton on CUDA) vs ``F.scaled_dot_product_attention``
  (its flash backend on CUDA, whatever it picks on the CPU); causal, TFLOP/s counted as in
  bench_attention (4 B h T² d / 2 forward, 3.5x that forward+backward).
- cross-entropy: ``kernels.cross_entropy`` vs eager ``F.cross_entropy`` on (N, V) logits; the
  row that matters is peak memory beyond the logits (``peak MiB``), and GB/s counted as one
  read of the logits forward and one read plus one write backward.
- layer norm: ``kernels.layer_norm`` vs ``F.layer_norm``; GB/s over x and y (and dy, dx).

Errors are measured at the benchmark's own sizes ("parity at real sizes"): every output and
gradient against float64 torch on the same inputs (attention: on the first batch item and two
heads, which are independent of the rest, so the float64 scores fit in memory).

Run, e.g.::

    python -m benchmarks.bench_kernels                       # CPU, small shapes
    python -m benchmarks.bench_kernels --device cuda --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    announce_command,
    machine_info,
    machine_slug,
    markdown_table,
    peak_memory_mib,
    time_call,
    write_results,
)
from torch_impl.kernels import cross_entropy as kce
from torch_impl.kernels import flash_attention
from torch_impl.kernels import layer_norm as kln

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
OPS = ("attention", "cross_entropy", "layer_norm")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sdpa_backend(device: str, dtype: torch.dtype) -> tuple[str, Any]:
    """(label, context) restricting F.sdpa on CUDA to its flash backend (the yardstick),
    or to the memory-efficient one for float32, which flash does not take."""
    if not device.startswith("cuda"):
        return "F.sdpa", nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if dtype in (torch.float16, torch.bfloat16):
        return "F.sdpa (flash)", sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return "F.sdpa (mem-efficient)", sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)


def grads_of(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
             dout: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def time_impl(args: argparse.Namespace, row: dict[str, Any], fn: Callable[..., torch.Tensor],
              inputs: list[torch.Tensor], dout: torch.Tensor,
              amount: Callable[[bool], tuple[float, str]], err: float, gerr: float
              ) -> list[dict[str, Any]]:
    """The forward and forward+backward rows of one implementation: ``row`` (op, impl, shape,
    dtype) plus timing, peak memory and rate = amount(backward) per second (amount is
    (FLOP or bytes, unit)). The backward run frees its gradients, so peak MiB counts them."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    rows = []
    for workload, backward in (("forward", False), ("forward+backward", True)):
        def run(backward: bool = backward) -> None:
            if not backward:
                with torch.no_grad():
                    fn(*inputs)
                return
            fn(*leaves).backward(dout)
            for t in leaves:
                t.grad = None
        run()
        timing = time_call(run, args.device, warmup=args.warmup, repeat=args.repeat,
                           min_seconds=args.min_seconds)
        timing["peak_mib"] = peak_memory_mib(run, args.device)
        scale, unit = amount(backward)
        rows.append(dict(row, workload=workload, **timing, rate=scale / timing["median_s"],
                         rate_unit=unit, err_out=err, err_grad=gerr if backward else None))
        report(rows[-1])
    return rows


# --------------------------------------------------------------------------- attention

def bench_attention(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    B, h = args.batch, args.heads
    for T in args.lengths:
        for d in args.head_dims:
            gen = torch.Generator().manual_seed(args.seed)
            q, k, v, dout = (torch.randn(B, h, T, d, generator=gen).to(args.device, dtype)
                             for _ in range(4))
            label, backend = sdpa_backend(args.device, dtype)
            impls = {
                label: lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "seqtwin flash_attention": lambda q, k, v: flash_attention(q, k, v, causal=True),
            }
            # float64 on one batch item and two heads (independent of the rest)
            part = [t[:1, :2].double() for t in (q, k, v)]
            out64, grads64 = grads_of(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), part,
                dout[:1, :2].double())
            flop = 4.0 * B * h * T * T * d * 0.5 / 1e12          # causal forward, TFLOP
            for name, fn in impls.items():
                with backend if name == label else nullcontext():
                    out, grads = grads_of(fn, [q, k, v], dout)
                    rows += time_impl(
                        args, dict(op="attention", impl=name, shape=f"B{B} h{h} T{T} d{d}",
                                   dtype=str(dtype)[6:]), fn, [q, k, v], dout,
                        lambda bw: (flop * (3.5 if bw else 1.0), "TFLOP/s"),
                        rel_err(out[:1, :2], out64),
                        max(rel_err(g[:1, :2], g64) for g, g64 in zip(grads, grads64)))
    return rows


# --------------------------------------------------------------------------- cross-entropy

def bench_cross_entropy(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    N, V = args.rows, args.vocab
    gen = torch.Generator().manual_seed(args.seed)
    logits = (3 * torch.randn(N, V, generator=gen)).to(args.device, dtype)
    targets = torch.randint(0, V, (N,), generator=gen).to(args.device)
    targets[::17] = -100                                     # some ignored rows
    one = torch.tensor(1.0, dtype=dtype, device=args.device)
    loss64, (grad64,) = grads_of(lambda x: F.cross_entropy(x, targets), [logits.double()],
                                 one.double())
    impls = {"F.cross_entropy": lambda x: F.cross_entropy(x, targets),
             "seqtwin cross_entropy": lambda x: kce.cross_entropy(x, targets)}
    gbytes = N * V * logits.element_size() / 1e9          # one pass over the logits
    for name, fn in impls.items():
        loss, (grad,) = grads_of(fn, [logits], one)
        err, gerr = rel_err(loss, loss64), rel_err(grad, grad64)
        del grad
        rows += time_impl(args, dict(op="cross_entropy", impl=name, shape=f"N{N} V{V}",
                                     dtype=str(dtype)[6:]), fn, [logits], one,
                          lambda bw: (gbytes * (3 if bw else 1), "GB/s"), err, gerr)
    return rows


# --------------------------------------------------------------------------- layer norm

def bench_layer_norm(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    N, D = args.rows, args.features
    gen = torch.Generator().manual_seed(args.seed)
    x, dy = (torch.randn(N, D, generator=gen).to(args.device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(args.device, dtype)
    b = (0.1 * torch.randn(D, generator=gen)).to(args.device, dtype)
    ln64 = lambda x, w, b: F.layer_norm(x, (D,), w, b)  # noqa: E731
    out64, grads64 = grads_of(ln64, [t.double() for t in (x, w, b)], dy.double())
    impls = {"F.layer_norm": lambda x, w, b: F.layer_norm(x, (D,), w, b),
             "seqtwin layer_norm": lambda x, w, b: kln.layer_norm(x, w, b)}
    gbytes = N * D * x.element_size() / 1e9               # one pass over x
    for name, fn in impls.items():
        out, grads = grads_of(fn, [x, w, b], dy)
        rows += time_impl(args, dict(op="layer_norm", impl=name, shape=f"N{N} D{D}",
                                     dtype=str(dtype)[6:]), fn, [x, w, b], dy,
                          lambda bw: (gbytes * (5 if bw else 2), "GB/s"), rel_err(out, out64),
                          max(rel_err(g, g64) for g, g64 in zip(grads, grads64)))
    return rows


# --------------------------------------------------------------------------- output

def report(row: dict[str, Any]) -> None:
    print(f"  {row['op']:13s} {row['shape']:18s} {row['dtype']:8s} {row['workload']:16s} "
          f"{row['impl']:24s} {row['median_s'] * 1e3:9.3f} ms {row['rate']:8.1f} "
          f"{row['rate_unit']}  peak {row['peak_mib'] or 0:8.0f} MiB  err {row['err_out']:.1e}",
          file=sys.stderr, flush=True)


def summary_table(rows: list[dict[str, Any]]) -> str:
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["workload"])  # noqa: E731
    baseline = {key(r): r for r in rows if not r["impl"].startswith("seqtwin")}
    table = []
    for r in rows:
        base = baseline[key(r)]
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        table.append([r["op"], r["shape"], r["dtype"], r["workload"], r["impl"],
                      f"{r['median_s'] * 1e3:.3f}", f"{r['rate']:.1f} {r['rate_unit']}",
                      f"{base['median_s'] / r['median_s']:.2f}x", peak,
                      f"{r['err_out']:.1e}",
                      "-" if r["err_grad"] is None else f"{r['err_grad']:.1e}"])
    return markdown_table(["op", "shape", "dtype", "workload", "impl", "median ms", "rate",
                           "speed vs baseline", "peak MiB", "err out vs f64",
                           "err grad vs f64"], table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    p.add_argument("--dtypes", default="float32", help="comma list of " + ", ".join(TORCH_DTYPES))
    p.add_argument("--batch", type=int, default=None, help="attention batch (CUDA 4, CPU 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (CUDA 16, CPU 4)")
    p.add_argument("--lengths", default=None, help="attention lengths (CUDA 2048,4096,8192)")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--rows", type=int, default=None,
                   help="cross-entropy and layer-norm rows (CUDA 8192, CPU 1024)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--features", type=int, default=None, help="layer-norm D (CUDA 4096, CPU 768)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.batch = args.batch or (4 if cuda else 2)
    args.heads = args.heads or (16 if cuda else 4)
    args.lengths = [int(s) for s in (args.lengths or ("2048,4096,8192" if cuda else "256"))
                    .split(",")]
    args.head_dims = [int(s) for s in args.head_dims.split(",")]
    args.rows = args.rows or (8192 if cuda else 1024)
    args.features = args.features or (4096 if cuda else 768)
    args.ops = [s.strip() for s in args.ops.split(",")]
    for op in args.ops:
        if op not in OPS:
            p.error(f"--ops: unknown op {op!r}; expected some of {', '.join(OPS)}")
    args.dtypes = [s.strip() for s in args.dtypes.split(",")]
    for dt in args.dtypes:
        if dt not in TORCH_DTYPES:
            p.error(f"--dtypes: unknown dtype {dt!r}; expected some of {', '.join(TORCH_DTYPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = announce_command("benchmarks.bench_kernels", argv)
    benches = {"attention": bench_attention, "cross_entropy": bench_cross_entropy,
               "layer_norm": bench_layer_norm}
    rows = []
    for op in args.ops:
        for dt in args.dtypes:
            rows += benches[op](args, TORCH_DTYPES[dt])
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    table = summary_table(rows)
    out_dir = args.out or Path(__file__).parent / "results" / machine_slug(args.device)
    stem = f"kernels_{args.device.split(':')[0]}_{'_'.join(args.dtypes)}"
    payload = {"command": command, "machine": machine_info(args.device), "rows": rows}
    paths = write_results(out_dir, stem, payload, f"# Fused kernels\n\n`{command}`\n\n{table}\n")
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
