"""Recurrent sweep: torch_impl's RNN, LSTM and GRU against torch.nn and the NumPy reference.

RNN (tanh), LSTM and GRU over a grid of batch B, length T and hidden size H (input size
I = H), in float32 and float64, on the CPU.

Workloads: forward+backward for every cell, and forward alone for the LSTM. At each point
the three implementations run on the same weights and inputs (torch_impl's module and the
reference load torch.nn's state dict): ``torch_impl.LSTM(H, H)``, ``nn.LSTM(H, H,
batch_first=True)`` and ``reference.LSTM(H, H)``, input (B, T, H).

Method (harness.py): every point is timed in ``--processes`` fresh processes (this command
with ``--worker FILE``, one cell and dtype per process), each calling the implementations
interleaved (``--warmup`` calls each, then rounds A B C, C B A, ... for at least ``--rounds``
rounds and until ``--budget`` seconds were spent); threads pinned in each. A ratio is
torch_impl's speed relative to the other, the other's time / torch_impl's time (> 1:
torch_impl is faster), per round, its median over rounds per process; reported are the
median over the processes and the min-max over them. Verdict per point: "met" when the
median ratio is >= 1.0 against torch.nn and against the reference.

The reference is not run above ``--reference-max-gflop`` GFLOP per call (default 50; marked
"not run", and the verdict is then against torch.nn alone): there its time is that of its
GEMMs, the same products torch_impl runs, so "never below the reference" says little, and
its calls would add some 25 minutes to the full sweep. FLOP count: bench_recurrent.flops.

Outputs in ``--out`` (default benchmarks/out/): recurrent_sweep.json (every point: times,
rates, ratios, processes, threads, machine, torch version, the command), recurrent_sweep.md
(a verdict count per cell, workload and dtype, then every point) and two log-log plots,
recurrent_sweep.png (GFLOP/s against GFLOP per call) and recurrent_sweep_ratios.png. They
are rewritten after each cell and dtype, so an interrupted sweep keeps what it finished.

The full default grid (384 points, 3 processes) takes about 70 minutes (60-80, estimated
from the suite's rates) on the idle 2-core EPYC, some 20 of them float32; the large float64
points dominate: B64 T256 H1024 LSTM forward+backward is 825 GFLOP, some 15 s per call at
torch's ~50 GFLOP/s in float64, and each process makes 4 calls of each implementation there.
Run it on an idle machine: with 2 threads pinned on 2 shared cores, any other load stalls
the OpenMP regions (tens of ms per call at the small points).

    python -m benchmarks.bench_recurrent_sweep
    python -m benchmarks.bench_recurrent_sweep --cells lstm --dtypes float32 --B 32 --T 64 \
        --H 512 --budget 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.bench_recurrent import (
    NN_CLASSES,
    OURS,
    flops,
    reference_runner,
    torch_runner,
)
from benchmarks.harness import (
    aggregate,
    announce_command,
    format_ratio,
    interleave,
    machine_info,
    markdown_table,
    pin_threads,
    process_summary,
    ratio_key,
    run_processes,
    write_results,
)

MODULE = "benchmarks.bench_recurrent_sweep"
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
WORKLOADS = {"rnn": ("forward+backward",), "lstm": ("forward+backward", "forward"),
             "gru": ("forward+backward",)}
DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}
IMPLS = ("torch_impl", "torch.nn", "reference")
RATIOS = {"vs_torch_nn": "torch_impl vs torch.nn", "vs_reference": "torch_impl vs reference"}


def point_key(p: dict[str, Any]) -> str:
    return f"{p['cell']} {p['workload']} {p['dtype']} B={p['B']} T={p['T']} H={p['H']}"


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every point of the sweep, in the order a worker runs it (H outermost: the layers are
    built once per H)."""
    points = []
    for cell in args.cells:
        for dtype in args.dtypes:
            for H in args.H:
                for B in args.B:
                    for T in args.T:
                        for workload in WORKLOADS[cell]:
                            n = flops(cell, B, T, H, H, workload == "forward+backward")
                            points.append({"cell": cell, "workload": workload, "dtype": dtype,
                                           "B": B, "T": T, "H": H, "I": H, "tokens": B * T,
                                           "flops": n,
                                           "reference_run": n <= args.reference_max_gflop * 1e9})
    return points


def build_layers(cell: str, dtype: str, H: int, seed: int) -> tuple[Any, Any, Any]:
    """torch.nn's layer, torch_impl's and the reference's, with the same weights."""
    torch_dtype, numpy_dtype = DTYPES[dtype]
    torch.manual_seed(seed)
    nn_layer = NN_CLASSES[cell](H, H, batch_first=True, dtype=torch_dtype)
    ours_class, ref_class = OURS[cell]
    ours = ours_class(H, H, dtype=torch_dtype)
    ours.load_state_dict(nn_layer.state_dict())
    ref = ref_class(H, H, dtype=numpy_dtype)
    ref.load_state_dict({k: v.detach().numpy() for k, v in nn_layer.state_dict().items()})
    return ours, nn_layer, ref


def calls_at(p: dict[str, Any], layers: tuple[Any, Any, Any], seed: int
             ) -> dict[str, Callable[[], Any]]:
    """One call of each implementation at point ``p`` (the reference's only if it runs)."""
    ours, nn_layer, ref = layers
    backward = p["workload"] == "forward+backward"
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p["B"], p["T"], p["H"], generator=gen, dtype=DTYPES[p["dtype"]][0])
    dout = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x.requires_grad_(backward)
    calls = {"torch_impl": torch_runner(ours, x, dout, backward),
             "torch.nn": torch_runner(nn_layer, x, dout, backward)}
    if p["reference_run"]:
        calls["reference"] = reference_runner(ref, x.detach().numpy(), dout.numpy(), backward)
    return calls


def worker(args: argparse.Namespace, threads: int) -> int:
    """Time every point of the grid in this process; write {"threads", "points": {key:
    harness.process_summary}} to ``args.worker``."""
    points = grid(args)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    layers, built = None, None
    for i, p in enumerate(points):
        if built != (p["cell"], p["dtype"], p["H"]):
            built = (p["cell"], p["dtype"], p["H"])
            layers = build_layers(*built, args.seed)
        calls = calls_at(p, layers, args.seed)
        times = interleave(calls, "cpu", args.warmup, args.rounds, args.budget)
        summary = process_summary(times, [("torch_impl", other) for other in calls
                                          if other != "torch_impl"])
        results[point_key(p)] = summary
        ratios = ", ".join(f"{r:.2f}x vs {key.split(' vs ')[1]}"
                           for key, r in summary["ratios"].items())
        print(f"  [{i + 1}/{len(points)} {time.perf_counter() - start:7.1f} s] {point_key(p)}: "
              + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in summary["median_s"].items())
              + f"; {ratios} ({summary['rounds']} rounds)", file=sys.stderr, flush=True)
    args.worker.write_text(json.dumps({"threads": threads, "points": results}))
    return 0


def point_row(p: dict[str, Any], summaries: list[dict[str, Any]], threads: int
              ) -> dict[str, Any]:
    """A point's figures over processes and its verdict."""
    timing = aggregate(summaries, threads)
    times = timing["median_s"]
    row = dict(p, processes=len(summaries), threads=threads, rounds=timing["rounds"],
               times_s=times,
               tokens_per_s={n: p["tokens"] / t["median"] for n, t in times.items()},
               gflop_per_s={n: p["flops"] / t["median"] / 1e9 for n, t in times.items()},
               vs_torch_nn=timing["ratios"][ratio_key("torch_impl", "torch.nn")],
               vs_reference=timing["ratios"].get(ratio_key("torch_impl", "reference"),
                                                 "not run"))
    met = row["vs_torch_nn"]["median"] >= 1.0 and (
        row["vs_reference"] == "not run" or row["vs_reference"]["median"] >= 1.0)
    row["verdict"] = "met" if met else "missed"
    return row


# --------------------------------------------------------------------------- output

def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], total: int) -> str:
    machine = meta["machine"]
    lines = ["# Recurrent sweep: torch_impl vs torch.nn and the NumPy reference", "",
             f"`{meta['command']}`", "",
             f"{machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, numpy "
             f"{machine['numpy']}; {meta['threads']} threads pinned; {len(rows)} of {total} "
             "points done.", "",
             f"Each point: {meta['processes']} fresh processes, each timing the implementations "
             f"interleaved (rounds A B C, C B A, ...) after {meta['settings']['warmup']} warm-up "
             f"call(s), >= {meta['settings']['rounds']} rounds and "
             f"{meta['settings']['budget']:g} s. Times: median over processes of each "
             "process's median. Ratios: torch_impl's speed relative to the other (its time / "
             "torch_impl's), median over processes of each process's median over rounds, "
             "(min-max over processes). Verdict: met when both median ratios are >= 1.0. The "
             f"reference is not run above {meta['settings']['reference_max_gflop']:g} GFLOP "
             "per call.", "", "## Verdicts", ""]
    def group(r: dict[str, Any]) -> tuple[str, str, str]:
        return r["cell"], r["workload"], r["dtype"]

    counts = [[*g, sum(r["verdict"] == "met" for r in rows if group(r) == g),
               sum(group(r) == g for r in rows)] for g in dict.fromkeys(map(group, rows))]
    lines += [markdown_table(["cell", "workload", "dtype", "met", "points"], counts), "",
              "## Summary", "", summary_table(rows), "", "## Points", ""]

    def ms(row: dict[str, Any], impl: str) -> str:
        t = row["times_s"].get(impl)
        return "not run" if t is None else f"{t['median'] * 1e3:.2f}"

    table = [[r["cell"], r["workload"], r["dtype"], r["B"], r["T"], r["H"],
              f"{r['flops'] / 1e9:.3g}", *(ms(r, impl) for impl in IMPLS),
              format_ratio(r["vs_torch_nn"]),
              "not run" if r["vs_reference"] == "not run" else format_ratio(r["vs_reference"]),
              r["verdict"]] for r in rows]
    lines.append(markdown_table(["cell", "workload", "dtype", "B", "T", "H", "GFLOP",
                                 "torch_impl ms", "torch.nn ms", "reference ms",
                                 "vs torch.nn", "vs reference", "verdict"], table))
    lines += ["", "![GFLOP/s](recurrent_sweep.png)", "",
              "![ratios](recurrent_sweep_ratios.png)"]
    return "\n".join(lines)


HEADLINE_POINT = {"B": 32, "T": 64, "H": 512}


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Per cell, workload and dtype: the points at >= 1.0x torch.nn and at >= 1.0x the
    reference (median ratios), the lowest median ratio against torch.nn and where, and the
    ratio at B32 T64 H512 (the README's headline is this table)."""
    def ratio(r: dict[str, Any], key: str) -> float | None:
        value = r[key]
        return None if value == "not run" else value["median"]

    table = []
    for group in dict.fromkeys((r["cell"], r["workload"], r["dtype"]) for r in rows):
        panel = [r for r in rows if (r["cell"], r["workload"], r["dtype"]) == group]
        vs_nn = sum(ratio(r, "vs_torch_nn") >= 1.0 for r in panel)
        ran = [r for r in panel if ratio(r, "vs_reference") is not None]
        vs_ref = sum(ratio(r, "vs_reference") >= 1.0 for r in ran)
        worst = min(panel, key=lambda r: ratio(r, "vs_torch_nn"))
        head = [r for r in panel if all(r[k] == v for k, v in HEADLINE_POINT.items())]
        table.append([*group, f"{vs_nn} of {len(panel)}", f"{vs_ref} of {len(ran)}",
                      f"{ratio(worst, 'vs_torch_nn'):.2f}x (B{worst['B']} T{worst['T']} "
                      f"H{worst['H']})",
                      format_ratio(head[0]["vs_torch_nn"]) if head else "not run"])
    return markdown_table(["cell", "workload", "dtype", ">= 1.0x torch.nn",
                           ">= 1.0x reference", "lowest vs torch.nn", "B32 T64 H512 vs torch.nn"],
                          table)


def plot(rows: list[dict[str, Any]], path: Path, ratios: bool, title: str) -> None:
    """Log-log, one panel per cell+workload (rows) and dtype (columns), against GFLOP per
    call: each implementation's GFLOP/s, or (``ratios``) torch_impl's median ratios with
    their min-max over processes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["cell"], r["workload"]) for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(groups), len(dtypes), squeeze=False,
                             figsize=(5 * len(dtypes), 3 * len(groups)))
    for (g, group), (d, dtype) in ((a, b) for a in enumerate(groups) for b in enumerate(dtypes)):
        ax = axes[g][d]
        panel = [r for r in rows if (r["cell"], r["workload"]) == group and r["dtype"] == dtype]
        if not panel:  # not run yet (an unfinished sweep)
            ax.set_axis_off()
            continue
        series = RATIOS if ratios else IMPLS
        for k, name in enumerate(series):
            if ratios:
                done = [r for r in panel if isinstance(r[name], dict)]
                y = np.array([r[name]["median"] for r in done])
                low = y - np.array([r[name]["min"] for r in done])
                high = np.array([r[name]["max"] for r in done]) - y
                ax.errorbar([r["flops"] / 1e9 for r in done], y, yerr=[low, high], fmt="o",
                            ms=3, capsize=2, label=RATIOS[name],
                            color=plt.cm.tab10(k))
            else:
                done = [r for r in panel if name in r["gflop_per_s"]]
                ax.scatter([r["flops"] / 1e9 for r in done],
                           [r["gflop_per_s"][name] for r in done], s=10, label=name,
                           color=plt.cm.tab10(k))
        if ratios:
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{group[0]} {group[1]}, {dtype}", fontsize=9)
        ax.set_xlabel("GFLOP per call")
        ax.set_ylabel("speed ratio" if ratios else "GFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], total: int,
                  out: Path) -> list[Path]:
    paths = write_results(out, "recurrent_sweep", {"meta": meta, "points": rows},
                          markdown(rows, meta, total))
    for name, ratios in (("recurrent_sweep.png", False), ("recurrent_sweep_ratios.png", True)):
        plot(rows, out / name, ratios, meta["command"])
        paths.append(out / name)
    return paths


# --------------------------------------------------------------------------- driver

def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma list of rnn,lstm,gru")
    p.add_argument("--dtypes", default="float32,float64", help="comma list of float32,float64")
    p.add_argument("--B", type=int_list, default=[1, 8, 32, 64], help="batch sizes")
    p.add_argument("--T", type=int_list, default=[8, 64, 256], help="sequence lengths")
    p.add_argument("--H", type=int_list, default=[64, 256, 512, 1024],
                   help="hidden sizes (= input size)")
    p.add_argument("--processes", type=int, default=3, help="processes per point (default 3)")
    p.add_argument("--threads", type=int, default=2, help="threads, pinned (default 2)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="seconds of rounds per point and process, once --rounds are done")
    p.add_argument("--rounds", type=int, default=3, help="at least this many rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls of each (default 1)")
    p.add_argument("--reference-max-gflop", type=float, default=50.0,
                   help="run the reference only up to this many GFLOP per call (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results folder (default: benchmarks/out/)")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="time nothing: rewrite the Markdown and plots of a sweep's JSON into "
                        "--out")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cells, args.dtypes = args.cells.split(","), args.dtypes.split(",")
    if set(args.cells) - set(WORKLOADS) or set(args.dtypes) - set(DTYPES):
        p.error(f"--cells from {','.join(WORKLOADS)}; --dtypes from {','.join(DTYPES)}")
    if args.processes < 1:
        p.error("--processes: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        total = len(grid(argparse.Namespace(**saved["meta"]["settings"])))
        paths = write_outputs(saved["points"], saved["meta"], total, args.out)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
        return 0
    threads = pin_threads(args.threads)
    if args.worker is not None:
        return worker(args, threads)
    command = announce_command(MODULE, argv)
    points = grid(args)
    print(f"threads: {threads}; {len(points)} points, each in {args.processes} processes",
          file=sys.stderr)
    settings = {k: getattr(args, k) for k in ("cells", "dtypes", "B", "T", "H", "budget",
                                              "rounds", "warmup", "reference_max_gflop",
                                              "seed")}
    meta = {"command": command, "machine": machine_info(), "torch": torch.__version__,
            "threads": threads, "processes": args.processes, "settings": settings}
    argv = list(sys.argv[1:] if argv is None else argv)
    summaries: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    chunks = [(cell, dtype) for cell in args.cells for dtype in args.dtypes]
    for k, (cell, dtype) in enumerate(chunks):
        print(f"[{k + 1}/{len(chunks)}] {cell} {dtype}, {(time.perf_counter() - start) / 60:.1f}"
              " min so far", file=sys.stderr, flush=True)
        for result in run_processes(MODULE, argv + ["--cells", cell, "--dtypes", dtype],
                                    args.processes, threads):
            for key, summary in result["points"].items():
                summaries.setdefault(key, []).append(summary)
        rows = [point_row(p, summaries[point_key(p)], threads) for p in points
                if point_key(p) in summaries]
        paths = write_outputs(rows, meta, len(points), args.out)
    met = sum(r["verdict"] == "met" for r in rows)
    print(f"{met} of {len(rows)} points met (median ratio >= 1.0 against torch.nn and the "
          f"reference); {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    print(f"reproduce with: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
