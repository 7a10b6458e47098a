"""``python -m benchmarks``: every implementation side by side, in one command.

With no arguments: the quick CPU suite (layers, models, generation, scaling at the
"small" sizes) and the parity report, a table per suite in the terminal, and under
``--out`` (default benchmarks/out/):

    benchmarks.json        every row, the machine, the measured peaks, the command
    benchmarks.md          the same as tables, with targets and notes
    <suite>.png            tokens/s per workload and implementation (log scale)
    scaling_<layer>.png    time against sequence length, batch and hidden size (log-log)
    parity_report.*        the parity report (benchmarks/parity_report.py)

Each row is one implementation of one workload: ``reference`` (NumPy), ``torch_impl``
(eager), ``torch_impl compiled`` (torch.compile; ``--full`` only: about 30 s of compilation
per graph on a CPU) and the anchors a user would otherwise pick. Its figures:

    median ms     the median over processes of each process's median time per call; the
                  range beside it is the min-max over the processes
    tokens/s      tokens per call / median time
    GFLOP/s       the workload's FLOP count (written next to each workload) / median time
    % peak        GFLOP/s over the machine's GEMM peak for the dtype (the faster of a large
                  torch.mm and numpy matmul), or, for the memory-bound ops (layer norm,
                  cross-entropy), GB/s over the faster large copy; both measured at the start
                  of the same run (harness.measure_peaks). A row above 100% ran GEMMs of its
                  own (oneDNN's packed ones) faster than those two large ones.
    peak MiB      memory one call needs (harness.peak_memory_mib: CUDA's allocator peak; on
                  the CPU the resident-set high-water mark over one call, an approximation)
    rel err       max relative error ||a - b|| / ||b|| over outputs and gradients against
                  the reference in float64 on the same inputs; for generated tokens, the
                  fraction of tokens that differ
    vs anchor     this implementation's speed relative to the anchor (anchor time / its time),
                  same workload and dtype: the median over processes of each process's
                  median over rounds, and the min-max over processes
    target       the target where one applies: met or missed by the median ratio,
                  never a failed test

Method (the project's rule for a noisy machine): this process makes each call once, untimed,
for the error column and once more for the memory column, and times nothing. The timing runs
in ``--processes`` (default 3) fresh worker processes, one after another, each this command
with ``--worker FILE``: it builds the same workloads and, per workload, times all of its
implementations interleaved (harness.interleave: a warm-up call each, then rounds A B C,
C B A, ... until ``rounds`` rounds and ``budget`` seconds were spent), keeping each one's
median time and each ratio's median over rounds. The figures are the median and min-max
over the processes (harness.aggregate). Threads are pinned (torch, NumPy's BLAS and the
workers' OMP/MKL/OpenBLAS environment) and reported, with the BLAS kernel threadpoolctl
found. Inputs are random normal.

    python -m benchmarks                                   # quick CPU suite + parity report
    python -m benchmarks --suite layers --sizes tiny       # one suite, seconds
    python -m benchmarks --full --threads 2                # + torch.compile rows, more rounds
    python -m benchmarks --processes 5                     # ratios over 5 processes
    python -m benchmarks --device cuda --sizes medium

Exit status 1 if a parity row fails, a benchmark row raises, or a row's error is over the
DESIGN.md budget of its dtype.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.harness import (
    aggregate,
    format_ratio,
    interleave,
    machine_info,
    markdown_table,
    measure_peaks,
    peak_memory_mib,
    pin_threads,
    process_summary,
    ratio_key,
    run_processes,
    write_results,
)
from parity_tests.parity import relative_error, to_numpy
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
SUITES = ("layers", "models", "generation", "scaling", "parity")
SIZES = ("tiny", "small", "medium")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
Outputs = dict[str, Any]  # outputs and gradients of one call, by name (arrays or tensors)


@dataclass(frozen=True)
class Settings:
    device: str
    sizes: str
    full: bool        # also the torch.compile rows
    warmup: int       # untimed calls of each implementation before the rounds, per process
    rounds: int       # at least this many interleaved rounds per workload and process
    budget_s: float   # ... and rounds until this many seconds were spent on them
    processes: int    # worker processes the timing is repeated in
    seed: int = 0


TIMING = {  # sizes -> (warmup, rounds, budget_s); --full doubles rounds and budget_s
    "tiny": (1, 3, 0.0),
    "small": (1, 3, 0.3),
    "medium": (1, 5, 1.5),
}


@dataclass
class Impl:
    name: str                      # "reference", "torch_impl", "torch.nn.LSTM", ...
    dtype: str                     # "float32" | "float64"
    run: Callable[[], Outputs]     # one call; returns what the error column compares
    library: str = "torch"         # the library it runs on (recorded in each row): torch | numpy
    device: str = "cpu"
    check: bool = True             # False: nothing to compare (e.g. its own random stream)


@dataclass
class Workload:
    suite: str
    name: str                      # "lstm forward+backward"
    shape: str                     # "B=32 T=64 H=512"
    tokens: int                    # per call
    flops: float                   # per call, by the formula in the suite's docstring
    impls: list[Impl]
    oracle: Callable[[], Outputs] | None = None  # the reference in float64, same inputs
    anchor: str | None = None      # the impl the "vs anchor" column divides by
    bytes: float = 0.0             # per call; > 0 marks a memory-bound op
    backward: bool = False         # gradients in the outputs (the budget's gradient column)
    targets: list[tuple[str, str, float]] = field(default_factory=list)
    # (impl label, anchor label, ratio): "torch_impl float32" must reach ratio x the speed of
    # "torch.nn.LSTM float32"
    sweep: tuple[str, int] | None = None  # scaling rows: (axis, value)


# --------------------------------------------------------------------------- torch runners

def to_torch(array: np.ndarray, dtype: str, device: str, grad: bool = False) -> torch.Tensor:
    tensor = torch.tensor(array, dtype=TORCH_DTYPES[dtype] if array.dtype.kind == "f"
                          else torch.int64, device=device)
    return tensor.requires_grad_(grad)


def autograd_run(forward: Callable[[], torch.Tensor], leaves: dict[str, torch.Tensor],
                 upstream: torch.Tensor | None) -> Callable[[], Outputs]:
    """One call of a torch implementation: the forward under no_grad (``upstream`` None), or
    forward and backward from ``upstream``, returning the output and the leaves' gradients."""
    def run() -> Outputs:
        if upstream is None:
            with torch.no_grad():
                return {"out": forward()}
        for leaf in leaves.values():
            leaf.grad = None
        out = forward()
        out.backward(upstream)
        return {"out": out.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}
    return run


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)



# --------------------------------------------------------------------------- measuring

def is_tokens(value: Any) -> bool:
    """An integer array or tensor (generated tokens), compared by mismatch, not norm."""
    if hasattr(value, "is_floating_point"):
        return not value.is_floating_point()
    return bool(np.issubdtype(np.asarray(value).dtype, np.integer))


def max_error(outputs: Outputs, expected: Outputs) -> float:
    """Max over the names both hold: relative error, or for tokens the fraction that differ."""
    errors = []
    for name in expected.keys() & outputs.keys():
        a, b = outputs[name], expected[name]
        if is_tokens(b):
            errors.append(float(np.mean(to_numpy(a) != to_numpy(b))))
        else:
            errors.append(relative_error(a, b))
    if not errors:
        raise ValueError(f"no outputs to compare: {sorted(outputs)} vs {sorted(expected)}")
    return max(errors)


def budget(row: dict[str, Any], backward: bool) -> float | None:
    """DESIGN.md's budget for a row's error (float32 rows: the torch float32 one)."""
    if row["rel_err"] is None or row.get("tokens_compared"):
        return None
    table = TORCH64_VS_REF64 if row["dtype"] == "float64" else TORCH32_VS_REF64
    return table.gradient if backward else table.forward


def label(impl: Impl) -> str:
    return f"{impl.name} {impl.dtype}"


def check(workload: Workload) -> list[dict[str, Any]]:
    """One row per implementation, with what this process measures: the error of one untimed
    call against the oracle, and the memory of another. The times come from the workers."""
    expected = workload.oracle() if workload.oracle is not None else None
    rows = []
    for impl in workload.impls:
        row: dict[str, Any] = {
            "suite": workload.suite, "workload": workload.name, "shape": workload.shape,
            "impl": impl.name, "dtype": impl.dtype, "device": impl.device,
            "library": impl.library, "tokens": workload.tokens, "flops": workload.flops,
            "bytes": workload.bytes, "sweep": workload.sweep, "rel_err": None, "error": None}
        print(f"[{workload.suite}] {workload.name} {workload.shape} | {impl.name} {impl.dtype}"
              " ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            outputs = impl.run()
            if expected is not None and impl.check:
                row["rel_err"] = max_error(outputs, expected)
                row["tokens_compared"] = any(is_tokens(v) for v in expected.values())
            row["peak_mib"] = peak_memory_mib(impl.run, impl.device)
        except Exception as error:  # report every row even when one implementation raises
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{type(error).__name__}: {error}"
            print(" raised", file=sys.stderr, flush=True)
            rows.append(row)
            continue
        row["budget"] = budget(row, workload.backward)
        err = "-" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
        print(f" err {err} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def ratio_pairs(workload: Workload) -> list[tuple[str, str]]:
    """The (candidate, anchor) labels whose ratio the rows report: each implementation against
    the anchor of its dtype, and the targets' pairs."""
    labels = {label(impl) for impl in workload.impls}
    pairs = []
    if workload.anchor is not None:
        pairs = [(label(i), f"{workload.anchor} {i.dtype}") for i in workload.impls
                 if i.name != workload.anchor and f"{workload.anchor} {i.dtype}" in labels]
    pairs += [(c, a) for c, a, _ in workload.targets
              if c in labels and a in labels and (c, a) not in pairs]
    return pairs


def time_workload(workload: Workload, settings: Settings) -> dict[str, Any]:
    """This process's interleaved timing of every implementation of ``workload`` that does not
    raise on its first warm-up call (those that do are listed under "errors")."""
    calls, errors = {}, {}
    for impl in workload.impls:
        try:
            impl.run()
            calls[label(impl)] = impl.run
        except Exception as error:
            errors[label(impl)] = f"{type(error).__name__}: {error}"
    times = interleave(calls, settings.device, max(settings.warmup - 1, 0), settings.rounds,
                       settings.budget_s)
    pairs = [(c, a) for c, a in ratio_pairs(workload) if c in calls and a in calls]
    return {**process_summary(times, pairs), "errors": errors}


def apply_timing(rows: list[dict[str, Any]], timing: dict[str, Any], anchor: str | None,
                 targets: list[tuple[str, str, float]]) -> None:
    """Fill a workload's rows with its timing over processes (harness.aggregate): times,
    rates, the ratio against the anchor and the targets' verdicts (by the median ratio)."""
    for row in rows:
        t = timing["median_s"].get(f"{row['impl']} {row['dtype']}")
        if row["error"] is None and t is None:
            row["error"] = "timing: " + timing["errors"].get(
                f"{row['impl']} {row['dtype']}", "not timed in every process")
        if row["error"] is not None:
            continue
        row.update(median_s=t["median"], min_s=t["min"], max_s=t["max"],
                   processes=t["processes"], threads=t["threads"], rounds=timing["rounds"])
        row.update(tokens_per_s=row["tokens"] / t["median"],
                   gflop_per_s=row["flops"] / t["median"] / 1e9,
                   gb_per_s=row["bytes"] / t["median"] / 1e9 if row["bytes"] else None)
        if anchor is not None:
            key = ratio_key(f"{row['impl']} {row['dtype']}", f"{anchor} {row['dtype']}")
            row["vs_anchor"] = timing["ratios"].get(key)
    for impl_label, anchor_label, ratio in targets:
        speed = timing["ratios"].get(ratio_key(impl_label, anchor_label))
        row = find(rows, impl_label)
        if speed is None or row is None:
            continue
        met = speed["median"] >= ratio
        verdict = (f">= {ratio:g}x {anchor_label}: {'met' if met else 'missed'}, "
                   f"{format_ratio(speed)} over {speed['processes']} processes")
        # a row held to several targets lists them all and is met only if each is
        row["target"] = f"{row['target']}; {verdict}" if row.get("target") else verdict
        row["target_met"] = met and row.get("target_met", True)


def find(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    """The measured row whose "impl dtype" is ``label``."""
    for row in rows:
        if f"{row['impl']} {row['dtype']}" == label and "median_s" in row:
            return row
    return None


def add_peak_fractions(rows: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    for row in rows:
        if "median_s" not in row:
            continue
        # the machine's peak: the best of the libraries measured (not the row's own library)
        if row["bytes"]:
            peak = max((v for k, v in peaks.items() if k.startswith("copy_")), default=None)
            row["peak_fraction"] = row["gb_per_s"] / peak if peak else None
        else:
            peak = max((v for k, v in peaks.items()
                        if k.startswith("gemm_") and k.endswith(f"_{row['dtype']}")),
                       default=None)
            row["peak_fraction"] = row["gflop_per_s"] / peak if peak else None


# --------------------------------------------------------------------------- output

HEADERS = ["workload", "shape", "impl", "dtype", "median ms", "range ms", "tokens/s", "GFLOP/s",
           "% peak", "peak MiB", "rel err", "vs anchor", "target"]


def cells(row: dict[str, Any]) -> list[str]:
    if row["error"] is not None or "median_s" not in row:
        return [row["workload"], row["shape"], row["impl"], row["dtype"],
                f"raised {(row['error'] or 'not timed')[:60]}"] + [""] * (len(HEADERS) - 5)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    err = fmt(row["rel_err"], ".1e")
    if row.get("budget") is not None and not row["rel_err"] <= row["budget"]:
        err += f" > {row['budget']:.0e}"
    peak = row.get("peak_fraction")
    return [row["workload"], row["shape"], row["impl"], row["dtype"],
            f"{row['median_s'] * 1e3:.2f}", f"{row['min_s'] * 1e3:.2f}-{row['max_s'] * 1e3:.2f}",
            f"{row['tokens_per_s']:,.0f}", f"{row['gflop_per_s']:.1f}",
            fmt(None if peak is None else 100 * peak, ".1f")
            + ("" if peak is None or not row["bytes"] else " (bw)"),
            fmt(row.get("peak_mib"), ".1f"), err,
            format_ratio(row.get("vs_anchor")), row.get("target", "")]


def text_table(rows: list[dict[str, Any]]) -> str:
    table = [HEADERS] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def suite_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars: tokens/s of each implementation, one group per workload row label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "median_s" in r]
    groups = list(dict.fromkeys(f"{r['workload']} {r['shape']}" for r in rows))
    impls = list(dict.fromkeys(f"{r['impl']} {r['dtype']}" for r in rows))
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * len(groups) * max(1, len(impls) / 3)))
    for k, impl in enumerate(impls):
        ys, xs = [], []
        for g, group in enumerate(groups):
            for r in rows:
                if f"{r['workload']} {r['shape']}" == group and f"{r['impl']} {r['dtype']}" == impl:
                    ys.append(g + k * height)
                    xs.append(r["tokens_per_s"])
        ax.barh(ys, xs, height=height, label=impl, color=plt.cm.tab20(k % 20))
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_plot(rows: list[dict[str, Any]], layer: str, path: Path, title: str) -> None:
    """Log-log median time against each swept axis, one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "median_s" in r and r["workload"].startswith(layer + " ")]
    axes_names = list(dict.fromkeys(r["sweep"][0] for r in rows))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4 * len(axes_names), 3.4),
                             squeeze=False)
    for ax, axis in zip(axes[0], axes_names, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = sorted((r["sweep"][1], r["median_s"]) for r in rows
                            if r["sweep"][0] == axis and r["impl"] == impl)
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("median s per call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_sentence(settings: dict[str, Any]) -> str:
    return (f"Timing: {settings['processes']} fresh processes, each timing a workload's "
            f"implementations interleaved (rounds A B, B A, ...) after {settings['warmup']} "
            f"warm-up call(s), for at least {settings['rounds']} rounds and "
            f"{settings['budget_s']:g} s; median ms and ratios are medians over the processes, "
            "ranges their min-max; targets use the median ratio.")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], plots: list[Path],
             notes: list[str]) -> str:
    machine = meta["machine"]
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
                     f"{b.get('num_threads')} threads)" for b in machine["blas"]
                     if b.get("user_api") == "blas")
    lines = ["# seqtwin benchmarks", "", f"`{meta['command']}`", "",
             f"{machine['cpu']}, {machine['cores']} cores"
             + (f", {machine['gpu']}" if "gpu" in machine else "")
             + f"; torch {machine['torch']}, numpy {machine['numpy']}, "
             f"{meta['threads']} threads pinned; numpy BLAS: {blas or 'unknown'}; torch BLAS: "
             f"{machine['torch_blas']} ({machine['torch_cpu_capability']}).", "",
             timing_sentence(meta["settings"]), "",
             "Measured peaks (same run): " + ", ".join(
                 f"{k} {v:.1f} {'GB/s' if k.startswith('copy') else 'GFLOP/s'}"
                 for k, v in meta["peaks"].items()) + ".", ""]
    lines += [f"- {note}" for note in notes] + [""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        lines += [f"## {suite}", "", markdown_table(
            HEADERS, [[c.replace("|", "\\|") for c in cells(r)] for r in rows
                      if r["suite"] == suite]), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None, prog: str, default_suite: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=default_suite,
                   help=f"comma list of {', '.join(SUITES)}, or all (default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--sizes", choices=SIZES, default="small",
                   help="tiny: seconds, for tests; small (default): the headline shapes, "
                        "minutes; medium: larger")
    p.add_argument("--full", action="store_true",
                   help="add the torch.compile rows and double the rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and BLAS threads (default: torch's own count), pinned in every "
                        "process")
    p.add_argument("--processes", type=int, default=3,
                   help="worker processes the timing is repeated in (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results folder (default: benchmarks/out/)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        p.error(f"--suite: unknown {sorted(unknown)}; choose from {', '.join(SUITES)}, all")
    if args.processes < 1:
        p.error("--processes: expected >= 1")
    return args


def command_line(argv: list[str] | None, prog: str = "python -m benchmarks") -> str:
    return " ".join([prog, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def settings_of(args: argparse.Namespace) -> Settings:
    warmup, rounds, budget_s = TIMING[args.sizes]
    if args.full:
        rounds, budget_s = 2 * rounds, 2 * budget_s
    return Settings(args.device, args.sizes, args.full, warmup, rounds, budget_s,
                    args.processes, args.seed)


def workloads_of(suite: str, settings: Settings) -> list[tuple[str, Workload]]:
    """A suite's workloads, each with a key that names it in the workers' results (its index
    too: the scaling sweep's base shape recurs once per axis)."""
    module = importlib.import_module(f"benchmarks.bench_{suite}")
    return [(f"{suite} {i}: {w.name} {w.shape}", w)
            for i, w in enumerate(module.workloads(settings))]


def worker(args: argparse.Namespace, settings: Settings, threads: int) -> int:
    """One timing process: every workload of the suites, its implementations interleaved;
    writes {"threads", "workloads": {key: time_workload's summary, or {"error"}}}."""
    results: dict[str, Any] = {}
    for suite in args.suites:
        if suite == "parity":
            continue
        for key, workload in workloads_of(suite, settings):
            print(f"[worker] {key} ...", end="", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                results[key] = time_workload(workload, settings)
            except Exception as error:  # the parent reports it on the workload's rows
                traceback.print_exc(file=sys.stderr)
                results[key] = {"error": f"{type(error).__name__}: {error}"}
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    args.worker.write_text(json.dumps({"threads": threads, "workloads": results}))
    return 0


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The arguments that make a worker build the same workloads as this process."""
    suites = [s for s in args.suites if s != "parity"]
    return (["--suite", ",".join(suites), "--device", args.device, "--sizes", args.sizes,
             "--seed", str(args.seed)] + (["--full"] if args.full else []))


def time_in_processes(checked: list[tuple[str, str, list[dict[str, Any]], str | None, list]],
                      args: argparse.Namespace, processes: int, threads: int) -> None:
    """Time every checked workload (suite, key, rows, anchor, targets) in ``processes`` fresh
    worker processes and fill its rows with the figures over them."""
    print(f"timing in {processes} processes, {threads} threads ...", file=sys.stderr,
          flush=True)
    results = run_processes("benchmarks", worker_argv(args), processes, threads)
    for _, key, rows, anchor, targets in checked:
        summaries = [result["workloads"][key] for result in results]
        failed = next((s["error"] for s in summaries if "error" in s), None)
        if failed is not None:
            for row in rows:
                row["error"] = row["error"] or f"timing: {failed}"
            continue
        timing = aggregate(summaries, threads)
        timing["errors"] = {k: v for s in summaries for k, v in s["errors"].items()}
        apply_timing(rows, timing, anchor, targets)


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks",
         default_suite: str = "all") -> int:
    """Run the suites; ``prog`` and ``default_suite`` let each bench_*.py script be this
    command for its own suite."""
    args = parse_args(argv, prog, default_suite)
    threads = pin_threads(args.threads)
    settings = settings_of(args)
    if args.worker is not None:
        return worker(args, settings, threads)
    command = command_line(argv, prog).rstrip()
    print(f"# {command}", file=sys.stderr)
    print(f"threads: {threads} (pinned in this process and the {settings.processes} timing "
          "processes)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.sizes == "tiny"
    peaks = measure_peaks(args.device, gemm_size=256 if tiny else 2048,
                          copy_mib=4 if tiny else 256)
    print("peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), file=sys.stderr)

    suites = [s for s in args.suites if s != "parity"]
    checked = []  # (suite, key, rows, anchor, targets) per workload
    for suite in suites:
        for key, workload in workloads_of(suite, settings):
            checked.append((suite, key, check(workload), workload.anchor, workload.targets))
    if checked:
        time_in_processes(checked, args, settings.processes, threads)

    rows, notes, plots = [], [], []
    for suite in suites:
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        suite_rows = [row for s, _, workload_rows, _, _ in checked if s == suite
                      for row in workload_rows]
        add_peak_fractions(suite_rows, peaks)
        rows += suite_rows
        notes += module.notes(settings)
        print(f"\n## {suite}\n{text_table(suite_rows)}\n")
        timed = [r for r in suite_rows if "median_s" in r]
        if suite == "scaling":
            for layer in dict.fromkeys(r["workload"].split()[0] for r in timed):
                path = args.out / f"scaling_{layer}.png"
                scaling_plot(suite_rows, layer, path, f"{layer}: {command}")
                plots.append(path)
        elif timed:
            path = args.out / f"{suite}.png"
            suite_plot(suite_rows, path, f"{suite}: {command}")
            plots.append(path)
    if not args.full and {"layers", "models"} & set(args.suites):
        notes.append("torch_impl compiled rows are left out of the quick suite (torch.compile "
                     "costs about 30 s per graph on a CPU); --full adds them.")

    meta = {"command": command, "machine": machine_info(args.device), "threads": threads,
            "processes": settings.processes, "settings": settings.__dict__, "peaks": peaks,
            "notes": notes}
    failed = [r for r in rows if r["error"] is not None
              or (r.get("budget") is not None and not r["rel_err"] <= r["budget"])]
    if rows:
        write_results(args.out, "benchmarks", {"meta": meta, "rows": rows},
                      markdown(rows, meta, plots, notes).rstrip("\n"))
        print(f"wrote {args.out}/benchmarks.json, benchmarks.md and "
              f"{', '.join(p.name for p in plots)}", file=sys.stderr)
    status = 1 if failed else 0
    for row in failed:
        print(f"FAILED: {row['workload']} {row['shape']} {row['impl']} {row['dtype']}: "
              f"{row['error'] or 'error over budget'}", file=sys.stderr)
    if "parity" in args.suites:
        from benchmarks import parity_report
        parity_argv = ["--sizes", "medium" if args.sizes == "medium" else "small",
                       "--seed", str(args.seed), "--out", str(args.out),
                       "--repeats", "1" if tiny else "5"]
        if args.threads is not None:
            parity_argv += ["--threads", str(args.threads)]
        status = max(status, parity_report.main(parity_argv))
    print(f"reproduce with: {command}")
    return status
