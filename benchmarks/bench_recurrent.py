"""Recurrent layers, side by side: reference (NumPy), torch_impl (eager), torch.nn (oneDNN/cuDNN).

Each row is one implementation of one layer on one workload (forward only, or
forward + backward) at one shape, with tokens/s, achieved GFLOP/s, its speed
relative to torch.nn and the relative error of its output against torch.nn on
the same inputs.

Timing (harness.py): this process makes one untimed call of each implementation
for the error column; ``--processes`` fresh worker processes (this command with
``--worker FILE``) then each time a workload's implementations interleaved
(``--warmup`` calls each, then rounds A B C, C B A, ... for at least ``--rounds``
rounds and ``--budget`` seconds). Times and ratios are the median over the processes of
each process's median, with the min-max over the processes; threads are pinned
in every process.

FLOP count (matrix products only; the pointwise work is O(B T G H) and left
out), per layer and direction with G gates (RNN 1, LSTM 4, GRU 3)::

    forward   2 B T G H (I + H)
    backward  2 x forward (one product for the input gradient, one for the weights)

Run one at a time, e.g.::

    python -m benchmarks.bench_recurrent                      # CPU, float32, B32 T64 H512
    python -m benchmarks.bench_recurrent --device cuda --dtype bfloat16 --batch 64 \
        --length 128 --hidden 1024 --no-reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import reference
import torch_impl
from benchmarks.harness import (
    aggregate,
    announce_command,
    format_ratio,
    interleave,
    machine_info,
    machine_slug,
    markdown_table,
    pin_threads,
    process_summary,
    ratio_key,
    run_processes,
    write_results,
)

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
NN_CLASSES = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": (torch_impl.RNN, reference.RNN), "lstm": (torch_impl.LSTM, reference.LSTM),
        "gru": (torch_impl.GRU, reference.GRU)}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def flops(cell: str, B: int, T: int, I: int, H: int, backward: bool) -> float:
    forward = 2.0 * B * T * GATES[cell] * H * (I + H)
    return forward * (3.0 if backward else 1.0)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def torch_runner(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor,
                 backward: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        if not backward:
            with torch.no_grad():
                return module(x)[0]
        x.grad = None
        out = module(x)[0]
        out.backward(dout)
        return out
    return run


def compiled_runner(module: Callable, x: torch.Tensor, dout: torch.Tensor,
                    backward: bool) -> Callable[[], torch.Tensor]:
    """torch_runner for a torch.compile'd module; marks each call a new step, which CUDA-graph
    backends ("cudagraphs", inductor's "reduce-overhead") need to reuse their memory pool."""
    run = torch_runner(module, x, dout, backward)

    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return run()
    return step


def reference_runner(module: Any, x: np.ndarray, dout: np.ndarray,
                     backward: bool) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        out = module(x)[0]
        if backward:
            module.backward(dout)
        return out
    return run


def implementations(cell: str, args: argparse.Namespace
                    ) -> tuple[list[tuple[str, Callable[[bool], Callable[[], Any]]]], torch.Tensor]:
    """Every implementation of one layer on the same weights and inputs, as (name, runner of
    a workload: forward only (False) or forward+backward (True)), and torch.nn's forward
    output. Seeded, so that every process builds the same ones."""
    B, T, H = args.batch, args.length, args.hidden
    I = args.input or H
    dtype = TORCH_DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    nn_layer = NN_CLASSES[cell](I, H, num_layers=args.layers, batch_first=True)
    nn_layer = nn_layer.to(device=args.device, dtype=dtype)
    ours_cls, ref_cls = OURS[cell]
    ours = ours_cls(I, H, num_layers=args.layers).to(device=args.device, dtype=dtype)
    ours.load_state_dict(nn_layer.state_dict())
    x = torch.randn(B, T, I, generator=gen).to(device=args.device, dtype=dtype)
    x.requires_grad_(True)
    dout = torch.randn(B, T, H, generator=gen).to(device=args.device, dtype=dtype)

    with torch.no_grad():
        expected = nn_layer(x)[0]
    impls: list[tuple[str, Callable[[bool], Callable[[], Any]]]] = [
        ("torch.nn", lambda bw: torch_runner(nn_layer, x, dout, bw)),
        ("torch_impl", lambda bw: torch_runner(ours, x, dout, bw)),
    ]
    for backend in args.compile:
        compiled = torch.compile(ours, backend=backend, fullgraph=True)
        impls.append((f"torch_impl+compile({backend})",
                      lambda bw, compiled=compiled: compiled_runner(compiled, x, dout, bw)))
    if args.reference:
        ref_dtype = np.float64 if args.dtype == "float64" else np.float32
        ref = ref_cls(I, H, num_layers=args.layers, dtype=ref_dtype)
        ref.load_state_dict({k: v.detach().float().cpu().numpy() for k, v in
                             nn_layer.state_dict().items()})
        x_np = x.detach().float().cpu().numpy().astype(ref_dtype)
        dout_np = dout.float().cpu().numpy().astype(ref_dtype)
        impls.append(("reference", lambda bw: reference_runner(ref, x_np, dout_np, bw)))
    return impls, expected


WORKLOADS = (("forward", False), ("forward+backward", True))


def check_cell(cell: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per workload and implementation with its error against torch.nn (one untimed
    call); the workers add the times."""
    B, T, H = args.batch, args.length, args.hidden
    I = args.input or H
    impls, expected = implementations(cell, args)
    rows = []
    for workload, backward in WORKLOADS:
        for name, make in impls:
            err = relative_error(torch.as_tensor(make(backward)()), expected)
            rows.append({"layer": cell, "workload": workload, "impl": name,
                         "shape": {"B": B, "T": T, "I": I, "H": H, "layers": args.layers},
                         "dtype": args.dtype, "device": args.device,
                         "flops": flops(cell, B, T, I, H, backward) * args.layers,
                         "rel_err_vs_torch_nn": err})
    return rows


def time_cell(cell: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker's timing of a layer: per workload, its implementations interleaved."""
    impls, _ = implementations(cell, args)
    summaries = {}
    for workload, backward in WORKLOADS:
        calls = {name: make(backward) for name, make in impls}
        times = interleave(calls, args.device, args.warmup, args.rounds, args.budget)
        summaries[f"{cell} {workload}"] = process_summary(
            times, [(name, "torch.nn") for name in calls if name != "torch.nn"])
        print(f"  [worker] {cell} {workload}: " + ", ".join(
            f"{name} {statistics.median(t) * 1e3:.2f} ms" for name, t in times.items()),
              file=sys.stderr, flush=True)
    return summaries


def add_times(rows: list[dict[str, Any]], processes: list[dict[str, Any]], threads: int) -> None:
    """The workers' times and ratios, over processes, into the rows."""
    for r in rows:
        timing = aggregate([p["workloads"][f"{r['layer']} {r['workload']}"] for p in processes],
                           threads)
        t = timing["median_s"][r["impl"]]
        B, T = r["shape"]["B"], r["shape"]["T"]
        r.update(median_s=t["median"], min_s=t["min"], max_s=t["max"],
                 processes=t["processes"], threads=threads, rounds=timing["rounds"],
                 tokens_per_s=B * T / t["median"], gflop_per_s=r["flops"] / t["median"] / 1e9,
                 vs_torch_nn=timing["ratios"].get(ratio_key(r["impl"], "torch.nn")))
        print(f"  {r['layer']:4s} {r['workload']:16s} {r['impl']:10s} {t['median'] * 1e3:9.2f} ms"
              f"  {r['tokens_per_s']:12,.0f} tok/s  {format_ratio(r['vs_torch_nn'])}  "
              f"err {r['rel_err_vs_torch_nn']:.1e}", file=sys.stderr, flush=True)


def summary_table(rows: list[dict[str, Any]]) -> str:
    table = [[r["layer"], r["workload"], r["impl"], f"{r['median_s'] * 1e3:.2f}",
              f"{r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['gflop_per_s']:.1f}",
              "1.00x" if r["impl"] == "torch.nn" else format_ratio(r["vs_torch_nn"]),
              f"{r['rel_err_vs_torch_nn']:.1e}"] for r in rows]
    return markdown_table(["layer", "workload", "impl", "median ms", "range ms", "tokens/s",
                           "GFLOP/s", "vs torch.nn", "rel err vs torch.nn"], table)


def set_tf32(mode: str) -> dict[str, bool]:
    """TF32 for float32 products on CUDA: "on" or "off" sets both torch's matmul flag (which
    torch_impl's products follow) and cuDNN's (which torch.nn's RNNs follow) to the same value,
    so the two sides compute alike; "default" keeps torch's defaults (matmul off, cuDNN on).
    Returns the flags in force, for the results."""
    if mode != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "on"
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
    p.add_argument("--cells", default="lstm,gru", help="comma list of rnn,lstm,gru")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--input", type=int, default=0, help="input size (default: = hidden)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls of each implementation per process (default 2)")
    p.add_argument("--rounds", type=int, default=5,
                   help="at least this many interleaved rounds per workload and process")
    p.add_argument("--budget", type=float, default=2.0,
                   help="... and rounds until this many seconds were spent (default 2)")
    p.add_argument("--processes", type=int, default=3,
                   help="processes the timing is repeated in (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and BLAS threads, pinned in every process (default: torch's "
                        "own count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="",
                   help="comma list of torch.compile backends to add as torch_impl rows, e.g. "
                        "cudagraphs (CUDA graphs over the whole time loop), inductor")
    p.add_argument("--tf32", default="default", choices=("default", "off", "on"),
                   help="float32 on CUDA: TF32 for both sides (on), for neither (off), or torch's "
                        "defaults (matmul off, cuDNN on: torch.nn's RNNs in TF32, ours not)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the NumPy reference (slow at large sizes; CPU only)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: benchmarks/results/<machine>)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.compile = [b.strip() for b in args.compile.split(",") if b.strip()]
    if args.dtype in ("bfloat16", "float16"):
        args.reference = False  # NumPy has no bfloat16/float16 reference to time
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tf32 = set_tf32(args.tf32)
    threads = pin_threads(args.threads)
    cells = [cell.strip() for cell in args.cells.split(",")]
    if args.worker is not None:
        workloads = {k: v for cell in cells for k, v in time_cell(cell, args).items()}
        args.worker.write_text(json.dumps({"threads": threads, "workloads": workloads}))
        return 0
    command = announce_command("benchmarks.bench_recurrent", argv)
    print(f"threads: {threads}, timing in {args.processes} processes", file=sys.stderr)
    rows = [row for cell in cells for row in check_cell(cell, args)]
    processes = run_processes("benchmarks.bench_recurrent",
                              list(sys.argv[1:] if argv is None else argv), args.processes,
                              threads)
    add_times(rows, processes, threads)
    table = summary_table(rows)
    out_dir = args.out or Path(__file__).parent / "results" / machine_slug(args.device)
    device = args.device.split(":")[0]
    stem = f"recurrent_{device}_{args.dtype}_B{args.batch}_T{args.length}_H{args.hidden}"
    flags = ""
    if device == "cuda" and args.dtype == "float32":
        stem += "" if args.tf32 == "default" else f"_tf32{args.tf32}"
        flags = ("TF32: torch matmul {matmul_allow_tf32}, cuDNN {cudnn_allow_tf32}\n\n"
                 .format(**tf32))
    payload = {"command": command, "machine": machine_info(args.device), "tf32": tf32,
               "threads": threads, "processes": args.processes, "rows": rows}
    method = (f"{threads} threads; {args.processes} processes, each timing the implementations "
              f"interleaved after {args.warmup} warm-up calls, >= {args.rounds} rounds and "
              f"{args.budget:g} s per workload; median over processes, range min-max over "
              "processes.\n\n")
    md = f"# Recurrent layers\n\n`{command}`\n\n{flags}{method}{table}\n"
    paths = write_results(out_dir, stem, payload, md)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    print(f"reproduce with: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
