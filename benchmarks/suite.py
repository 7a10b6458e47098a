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
    vs anchor     anchor's median / this median, same workload and dtype
    target       issue #6's target where one applies: met or missed, never a failed test

Method: each call is made once untimed (its outputs give the error column), then
harness.time_call: warm-up calls, then at least ``repeat`` timed calls and at least
``min_seconds`` of them; median and quartiles. Threads are pinned (torch and NumPy's BLAS)
and reported, with the BLAS kernel threadpoolctl found. Inputs are random normal.

    python -m benchmarks                                   # quick CPU suite + parity report
    python -m benchmarks --suite layers --sizes tiny       # one suite, seconds
    python -m benchmarks --full --threads 2                # + torch.compile rows, more repeats
    python -m benchmarks --device cuda --sizes medium

Exit status 1 if a parity row fails, a benchmark row raises, or a row's error is over the
DESIGN.md budget of its dtype.
"""

from __future__ import annotations

import argparse
import importlib
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
    machine_info,
    markdown_table,
    measure_peaks,
    peak_memory_mib,
    pin_threads,
    time_call,
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
    full: bool  # also the torch.compile rows
    warmup: int
    repeat: int
    min_seconds: float
    seed: int = 0


TIMING = {  # sizes -> (warmup, repeat, min_seconds); --full doubles repeat and min_seconds
    "tiny": (0, 2, 0.0),
    "small": (1, 3, 0.5),
    "medium": (1, 5, 1.0),
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


def measure(workload: Workload, settings: Settings) -> list[dict[str, Any]]:
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
            row.update(time_call(impl.run, impl.device, settings.warmup, settings.repeat,
                                 settings.min_seconds))
            row["peak_mib"] = peak_memory_mib(impl.run, impl.device)
        except Exception as error:  # report every row even when one implementation raises
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{type(error).__name__}: {error}"
            print(" raised", file=sys.stderr, flush=True)
            rows.append(row)
            continue
        t = row["median_s"]
        row.update(tokens_per_s=workload.tokens / t, gflop_per_s=workload.flops / t / 1e9,
                   gb_per_s=workload.bytes / t / 1e9 if workload.bytes else None)
        row["budget"] = budget(row, workload.backward)
        print(f" {t * 1e3:.2f} ms, {row['tokens_per_s']:,.0f} tok/s"
              f" ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    for impl_label, anchor_label, ratio in workload.targets:
        attach_target(rows, impl_label, anchor_label, ratio)
    if workload.anchor is not None:
        for row in rows:
            anchor = find(rows, f"{workload.anchor} {row['dtype']}")
            if anchor is not None and "median_s" in row:
                row["vs_anchor"] = anchor["median_s"] / row["median_s"]
    return rows


def find(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    """The measured row whose "impl dtype" is ``label``."""
    for row in rows:
        if f"{row['impl']} {row['dtype']}" == label and "median_s" in row:
            return row
    return None


def attach_target(rows: list[dict[str, Any]], impl_label: str, anchor_label: str,
                  ratio: float) -> None:
    row, anchor = find(rows, impl_label), find(rows, anchor_label)
    if row is None or anchor is None:
        return
    speed = anchor["median_s"] / row["median_s"]
    verdict = "met" if speed >= ratio else "missed"
    row["target"] = f">= {ratio:g}x {anchor_label}: {verdict} ({speed:.2f}x)"
    row["target_met"] = speed >= ratio


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

HEADERS = ["workload", "shape", "impl", "dtype", "median ms", "IQR ms", "tokens/s", "GFLOP/s",
           "% peak", "peak MiB", "rel err", "vs anchor", "target"]


def cells(row: dict[str, Any]) -> list[str]:
    if row["error"] is not None:
        return [row["workload"], row["shape"], row["impl"], row["dtype"],
                f"raised {row['error'][:60]}"] + [""] * (len(HEADERS) - 5)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    err = fmt(row["rel_err"], ".1e")
    if row.get("budget") is not None and not row["rel_err"] <= row["budget"]:
        err += f" > {row['budget']:.0e}"
    peak = row.get("peak_fraction")
    return [row["workload"], row["shape"], row["impl"], row["dtype"],
            f"{row['median_s'] * 1e3:.2f}", f"{row['q1_s'] * 1e3:.2f}-{row['q3_s'] * 1e3:.2f}",
            f"{row['tokens_per_s']:,.0f}", f"{row['gflop_per_s']:.1f}",
            fmt(None if peak is None else 100 * peak, ".1f")
            + ("" if peak is None or not row["bytes"] else " (bw)"),
            fmt(row.get("peak_mib"), ".1f"), err,
            fmt(row.get("vs_anchor"), ".2f") + ("x" if row.get("vs_anchor") else ""),
            row.get("target", "")]


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
                   help="tiny: seconds, for tests; small (default): the issue's shapes, "
                        "minutes; medium: larger")
    p.add_argument("--full", action="store_true",
                   help="add the torch.compile rows and double the repetitions")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and BLAS threads (default: torch's own count)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results folder (default: benchmarks/out/)")
    args = p.parse_args(argv)
    args.suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        p.error(f"--suite: unknown {sorted(unknown)}; choose from {', '.join(SUITES)}, all")
    return args


def command_line(argv: list[str] | None, prog: str = "python -m benchmarks") -> str:
    return " ".join([prog, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks",
         default_suite: str = "all") -> int:
    """Run the suites; ``prog`` and ``default_suite`` let each bench_*.py script be this
    command for its own suite."""
    args = parse_args(argv, prog, default_suite)
    command = command_line(argv, prog).rstrip()
    print(f"# {command}", file=sys.stderr)
    threads = pin_threads(args.threads)
    warmup, repeat, min_seconds = TIMING[args.sizes]
    if args.full:
        repeat, min_seconds = 2 * repeat, 2 * min_seconds
    settings = Settings(args.device, args.sizes, args.full, warmup, repeat, min_seconds,
                        args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.sizes == "tiny"
    peaks = measure_peaks(args.device, gemm_size=256 if tiny else 2048,
                          copy_mib=4 if tiny else 256)
    print("peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), file=sys.stderr)

    rows, notes, plots = [], [], []
    for suite in args.suites:
        if suite == "parity":
            continue
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        suite_rows = []
        for workload in module.workloads(settings):
            suite_rows += measure(workload, settings)
        add_peak_fractions(suite_rows, peaks)
        rows += suite_rows
        notes += module.notes(settings)
        print(f"\n## {suite}\n{text_table(suite_rows)}\n")
        if suite == "scaling":
            for layer in dict.fromkeys(r["workload"].split()[0] for r in suite_rows):
                path = args.out / f"scaling_{layer}.png"
                scaling_plot(suite_rows, layer, path, f"{layer}: {command}")
                plots.append(path)
        elif suite_rows:
            path = args.out / f"{suite}.png"
            suite_plot(suite_rows, path, f"{suite}: {command}")
            plots.append(path)
    if not args.full and {"layers", "models"} & set(args.suites):
        notes.append("torch_impl compiled rows are left out of the quick suite (torch.compile "
                     "costs about 30 s per graph on a CPU); --full adds them.")

    meta = {"command": command, "machine": machine_info(args.device), "threads": threads,
            "settings": settings.__dict__, "peaks": peaks, "notes": notes}
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
