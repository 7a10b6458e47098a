"""Where one recurrent time step's cost goes: host (Python, dispatch, kernel launches) against
device, per component of torch_impl's LSTM and GRU steps, at one layer size.

A layer's time loop runs, per step and direction, the recurrent product (``torch.addmm``) and
the fused pointwise step (a Triton kernel on CUDA, called directly in eager mode; through
``torch.ops.seqtwin`` under torch.compile). This times each piece on its own::

    python -m benchmarks.step_costs --device cuda --batch 64 --hidden 1024

Columns, per call (µs):

- ``host``: the time to issue one call, without waiting for the device (the mean over
  ``--calls`` calls issued back to back, few enough to stay inside the launch queue);
- ``total``: the same calls with one synchronisation at the end: the throughput when the
  calls run back to back, as in a time loop;
- ``device`` (CUDA): the calls captured once in a CUDA graph and replayed: the device's own
  time, with no host cost at all.

When ``host`` is close to ``total`` the piece is host-bound, and a time loop of such pieces
runs at the host's pace: that is what to cut. The layer rows are whole forward (and
forward+backward) calls divided by the number of steps. Results go to stdout and, with
``--out``, to ``step_costs_<device>_<dtype>_B<B>_H<H>.{json,md}``. On the CPU only the torch
pieces run (the Triton ones need CUDA, or triton's interpreter, which times nothing useful).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import torch_impl
from benchmarks.harness import (
    announce_command,
    machine_info,
    markdown_table,
    sync,
    write_results,
)
from torch_impl.kernels import HAS_TRITON
from torch_impl.kernels.gru_step import (
    gru_step_backward_torch,
    gru_step_backward_triton,
    gru_step_forward_torch,
    gru_step_forward_triton,
)
from torch_impl.kernels.lstm_step import (
    lstm_step_backward_torch,
    lstm_step_backward_triton,
    lstm_step_forward_torch,
    lstm_step_forward_triton,
)

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def per_call_us(fn: Callable[[], Any], device: str, calls: int, graphs: bool
                ) -> dict[str, float | None]:
    """{host, total, device} µs per call of ``fn`` (device None where no CUDA graph is taken)."""
    for _ in range(3):
        fn()
    sync(device)
    hosts, totals = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        hosts.append(time.perf_counter() - start)
        sync(device)
        totals.append(time.perf_counter() - start)
    result = {"host": min(hosts) / calls * 1e6, "total": min(totals) / calls * 1e6,
              "device": None}
    if graphs and device.startswith("cuda"):
        result["device"] = _graph_us(fn, calls)
    return result


def _graph_us(fn: Callable[[], Any], calls: int) -> float | None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as error:  # a piece that synchronises cannot be captured: say so
        print(f"  (not capturable: {str(error).splitlines()[0]})", file=sys.stderr)
        return None
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) * 1e3 / calls)
    return best


def pieces(cell: str, B: int, H: int, device: str, dtype: torch.dtype
           ) -> list[tuple[str, Callable[[], Any], bool]]:
    """(name, call, capturable) for each piece of one step of ``cell`` ("lstm" or "gru")."""
    G = 4 if cell == "lstm" else 3
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (0.5 * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)
    xw, hh, w_hh, b_hh = rand(B, G * H), rand(B, G * H), rand(G * H, H), rand(G * H)
    h, c, h_out, dh, dc = rand(B, H), rand(B, H), rand(B, H), rand(B, H), rand(B, H)
    w_hh_t = w_hh.t().contiguous()
    dgates = rand(B, G * H)
    out = [("addmm h W_hhᵀ + b_hh", lambda: torch.addmm(b_hh, h, w_hh.t()), True),
           ("addmm dgates W_hh + dh", lambda: torch.addmm(dh, dgates, w_hh_t.t()), True)]
    use_triton = HAS_TRITON and device.startswith("cuda")
    if cell == "lstm":
        gates = torch.sigmoid(rand(B, 4 * H))
        out += [("step forward, torch", lambda: lstm_step_forward_torch(xw + hh, h, c, None),
                 True),
                ("step backward, torch",
                 lambda: lstm_step_backward_torch(dh, dc, gates, c, c, None), True)]
        if use_triton:
            out += [("step forward, Triton",
                     lambda: lstm_step_forward_triton(xw, hh, h, c, None, h_out), True),
                    ("step backward, Triton",
                     lambda: lstm_step_backward_triton(dh, dc, gates, c, c, None), True),
                    ("step forward, torch.ops (op dispatch)",
                     lambda: torch.ops.seqtwin.lstm_step(xw, hh, h, c, None), True)]
    else:
        saved = torch.sigmoid(rand(B, 4 * H))
        out += [("step forward, torch", lambda: gru_step_forward_torch(xw, hh, h, None), True),
                ("step backward, torch", lambda: gru_step_backward_torch(dh, saved, h, None),
                 True)]
        if use_triton:
            out += [("step forward, Triton",
                     lambda: gru_step_forward_triton(xw, hh, h, None, h_out), True),
                    ("step backward, Triton",
                     lambda: gru_step_backward_triton(dh, saved, h, None), True),
                    ("step forward, torch.ops (op dispatch)",
                     lambda: torch.ops.seqtwin.gru_step(xw, hh, h, None), True)]
    return out


def layer_pieces(cell: str, B: int, T: int, H: int, device: str, dtype: torch.dtype
                 ) -> list[tuple[str, Callable[[], Any], bool]]:
    """Whole-layer calls (per step: divided by T afterwards); they validate their inputs,
    which synchronises, so they are not captured."""
    layer = (torch_impl.LSTM if cell == "lstm" else torch_impl.GRU)(H, H).to(device, dtype)
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x.requires_grad_(True)
    dout = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer(x)[0].backward(dout)
    return [(f"layer forward / T (T={T})", forward, False),
            (f"layer forward+backward / T (T={T})", forward_backward, False)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES),
                   help="the compute dtype of the step (bf16/fp16 layers compute in float32)")
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--length", type=int, default=128, help="T of the whole-layer rows")
    p.add_argument("--calls", type=int, default=100,
                   help="calls per timing (kept below the launch queue's depth)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: none)")
    args = p.parse_args(argv)
    command = announce_command("benchmarks.step_costs", argv)
    dtype = TORCH_DTYPES[args.dtype]
    rows = []
    for cell in (s.strip() for s in args.cells.split(",")):
        if cell not in ("lstm", "gru"):
            p.error(f"--cells: expected lstm and/or gru, got {cell!r}")
        for name, fn, capturable in pieces(cell, args.batch, args.hidden, args.device, dtype):
            rows.append({"cell": cell, "piece": name,
                         **per_call_us(fn, args.device, args.calls, capturable)})
        for name, fn, _ in layer_pieces(cell, args.batch, args.length, args.hidden,
                                        args.device, dtype):
            us = per_call_us(fn, args.device, 2, graphs=False)
            rows.append({"cell": cell, "piece": name,
                         **{k: None if v is None else v / args.length for k, v in us.items()}})
        print(f"  {cell}: {len(rows)} rows so far", file=sys.stderr, flush=True)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"
    table = markdown_table(["cell", "piece", "host µs", "total µs", "device µs"],
                           [[r["cell"], r["piece"], fmt(r["host"]), fmt(r["total"]),
                             fmt(r["device"])] for r in rows])
    print(table)
    if args.out is not None:
        stem = f"step_costs_{args.device.split(':')[0]}_{args.dtype}_B{args.batch}_H{args.hidden}"
        md = f"# Per-step costs\n\n`{command}`\n\n{table}\n"
        paths = write_results(args.out, stem, {"command": command,
                                               "machine": machine_info(args.device),
                                               "rows": rows}, md)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
