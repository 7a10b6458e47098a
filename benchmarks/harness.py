"""The small shared timing harness: warm-up, repetitions, median and spread.

A ratio between two implementations is measured the way this noisy machine
needs (the project's rule): both interleaved in one process after a warm-up
(``interleave``: rounds A B, B A, A B, ...), the ratio of each round taken and
their median kept (``process_summary``), and the whole comparison repeated in
fresh processes with the thread count pinned (``run_processes``), reported as
the median and the min-max over those processes (``aggregate``). A benchmark
script is its own worker: run with ``--worker FILE`` it measures and writes
one process's summary to FILE.

On CUDA every timed call is bracketed by synchronisation (the host clock is
read only after the device has finished); on the CPU the thread count is
recorded. ``machine_info`` records what a reader needs to trust a number:
CPU/GPU model, library versions, threads, BLAS kernel and the OpenBLAS
overrides of this machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import OPENBLAS_ENV


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str = "cpu", warmup: int = 2, repeat: int = 10,
              min_seconds: float = 0.0) -> dict[str, float]:
    """Median / quartiles / min of ``repeat`` timed calls after ``warmup`` untimed ones.

    ``min_seconds`` keeps repeating (beyond ``repeat``) until that much time
    was measured, so fast calls get enough samples. On CUDA it also gives
    ``host_median_s``, the median time until ``fn`` returned, before the
    synchronisation: the host's share. When it is close to ``median_s`` the
    call is bound by the host (Python, dispatch, kernel launches), not the GPU.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    host: list[float] = []
    total = 0.0
    while len(samples) < repeat or total < min_seconds:
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        sync(device)
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        total += elapsed
        if len(samples) >= 10_000:
            break
    q = (statistics.quantiles(samples, n=4, method="inclusive") if len(samples) >= 2
         else [samples[0]] * 3)
    timing = {"median_s": statistics.median(samples), "q1_s": q[0], "q3_s": q[2],
              "min_s": min(samples), "n": len(samples)}
    if device.startswith("cuda"):
        timing["host_median_s"] = statistics.median(host)
    return timing


# --------------------------------------------------------------------------- interleaved ratios

ROOT = Path(__file__).resolve().parents[1]  # the repository: workers run `-m benchmarks...` here
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def interleave(calls: dict[str, Callable[[], Any]], device: str = "cpu", warmup: int = 1,
               min_rounds: int = 3, budget_s: float = 1.0, max_rounds: int = 1000
               ) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, timed in rounds of one call each.

    Each callable is first called ``warmup`` times. Then every round calls each once, in the
    given order on even rounds and reversed on odd ones (A B, B A, A B, ...: ABBA), so that a
    drift of the machine's speed, and the cost of following another call, fall on all alike.
    Rounds go on until ``min_rounds`` were run and ``budget_s`` seconds were spent on them,
    or ``max_rounds`` were run.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max(min_rounds, max_rounds)):
        if r >= min_rounds and time.perf_counter() - start >= budget_s:
            break
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_key(candidate: str, anchor: str) -> str:
    return f"{candidate} vs {anchor}"


def process_summary(times: dict[str, list[float]], pairs: list[tuple[str, str]]
                    ) -> dict[str, Any]:
    """One process's figures from ``interleave``: each callable's median time, and for each
    (candidate, anchor) pair the candidate's speed relative to the anchor, anchor time /
    candidate time, taken per round (both calls of a round ran side by side) and its median
    over rounds kept."""
    return {"rounds": min((len(t) for t in times.values()), default=0),
            "median_s": {name: statistics.median(t) for name, t in times.items()},
            "ratios": {ratio_key(c, a): statistics.median(
                ta / tc for tc, ta in zip(times[c], times[a], strict=True)) for c, a in pairs}}


def spread(values: list[float], threads: int) -> dict[str, Any]:
    """One figure over processes: its median (what verdicts use) and min-max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "processes": len(values), "threads": threads}


def aggregate(summaries: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """``process_summary`` of one measurement from each process -> each median time and each
    ratio as a ``spread`` over the processes (and the rounds each process ran). A figure that
    some process lacks (its callable raised there) is left out."""
    def over_processes(field: str) -> dict[str, Any]:
        names = [n for n in summaries[0][field] if all(n in s[field] for s in summaries)]
        return {n: spread([s[field][n] for s in summaries], threads) for n in names}
    return {"rounds": [s["rounds"] for s in summaries], "median_s": over_processes("median_s"),
            "ratios": over_processes("ratios")}


def run_processes(module: str, argv: list[str], processes: int, threads: int) -> list[Any]:
    """Run ``python -m <module> <argv> --threads <threads> --worker FILE`` in ``processes``
    fresh processes, one after another (two at once would share the cores), with OpenMP, MKL
    and OpenBLAS pinned to ``threads`` through the environment as well; returns the JSON that
    each wrote to its FILE, ``{"threads": the count it ran with, ...}``. A worker that fails
    raises ``subprocess.CalledProcessError``; one that ran with other threads, RuntimeError."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_ENV})
    for name, value in OPENBLAS_ENV.items():
        env.setdefault(name, value)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(processes):
            path = Path(tmp) / f"process{k}.json"
            print(f"process {k + 1}/{processes}: python -m {module} ...", file=sys.stderr,
                  flush=True)
            subprocess.run([sys.executable, "-m", module, *argv, "--threads", str(threads),
                            "--worker", str(path)], env=env, cwd=ROOT, check=True)
            result = json.loads(path.read_text())
            if result["threads"] != threads:
                raise RuntimeError(f"{module} worker ran with {result['threads']} threads, "
                                   f"not {threads}")
            results.append(result)
    return results


def format_ratio(ratio: dict[str, Any] | None) -> str:
    """``1.04x (0.98-1.10)``: the median over processes and their min-max."""
    if ratio is None:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def announce_command(module: str, argv: list[str] | None) -> str:
    """``python -m <module> <args>`` as a reader would type it (argv, or the process's own
    arguments when None), printed to stderr first, for the results files to record."""
    command = " ".join(["python -m", module] + [shlex.quote(a) for a in
                                                  (sys.argv[1:] if argv is None else argv)])
    print(f"# {command}", file=sys.stderr)
    return command


def pin_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads and every BLAS/OpenMP pool numpy uses to ``threads``
    (None: torch's own count, which follows OMP_NUM_THREADS); returns the count."""
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    return threads


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_memory_mib(fn: Callable[[], Any], device: str = "cpu") -> float | None:
    """Memory one call of ``fn`` needs beyond what was live before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
    CPU: the process's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs) minus its resident set before the call; an approximation
    (allocator caching hides reused memory, page granularity) that covers NumPy and torch
    alike. None where /proc cannot be written (not Linux, a locked-down container).
    """
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(_status_kib("VmHWM") - before, 0) / 1024


def measure_peaks(device: str = "cpu", gemm_size: int = 2048, copy_mib: int = 256
                  ) -> dict[str, float]:
    """The machine's peaks, measured now: GEMM GFLOP/s per library and dtype (an n x n
    product, 2 n^3 FLOP) and copy bandwidth GB/s (read + write of ``copy_mib`` MiB).

    Keys ``gemm_<library>_<dtype>`` and ``copy_<library>``, library "torch" (on ``device``)
    or "numpy" (always the CPU).
    """
    import torch
    n = gemm_size
    peaks: dict[str, float] = {}
    for dtype in ("float32", "float64"):
        a, b = (torch.randn(n, n, dtype=getattr(torch, dtype), device=device) for _ in range(2))
        t = time_call(lambda: torch.mm(a, b), device, warmup=1, repeat=3)["min_s"]
        peaks[f"gemm_torch_{dtype}"] = 2.0 * n**3 / t / 1e9
        an, bn = a.cpu().numpy(), b.cpu().numpy()
        t = time_call(lambda: an @ bn, warmup=1, repeat=3)["min_s"]
        peaks[f"gemm_numpy_{dtype}"] = 2.0 * n**3 / t / 1e9
    elements = copy_mib * 2**20 // 4
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, warmup=1, repeat=5)["min_s"]
    peaks["copy_torch"] = 2.0 * src.numel() * 4 / t / 1e9
    src_np, dst_np = src.cpu().numpy(), dst.cpu().numpy()
    t = time_call(lambda: np.copyto(dst_np, src_np), warmup=1, repeat=5)["min_s"]
    peaks["copy_numpy"] = 2.0 * src_np.nbytes / t / 1e9
    return peaks


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> list[dict[str, Any]]:
    """Which BLAS numpy runs (library, kernel/architecture, threads), via threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    keep = ("user_api", "internal_api", "version", "num_threads", "architecture", "filepath")
    return [{k: info.get(k) for k in keep} for info in threadpool_info()]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
        "platform": platform.platform(), "numpy": np.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "blas": blas_info(),
        # torch's own BLAS (statically linked, so threadpoolctl does not list it) and the
        # vector ISA its CPU kernels dispatched to
        "torch_blas": (re.findall(r"BLAS_INFO=(\w+)", torch.__config__.show()) or [None])[0],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                         "OMP_NUM_THREADS")},
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    # cuDNN's float32 RNNs use TF32 tensor cores unless this is False
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def machine_slug(device: str = "cpu") -> str:
    """A directory name for ``benchmarks/results/<machine>/``."""
    if device.startswith("cuda"):
        import torch
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{cpu_model()}-{os.cpu_count()}core"
    keep = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in keep.split("-") if part)


def write_results(out_dir: Path, stem: str, payload: dict[str, Any], table_md: str) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically (temp file, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(payload, indent=2, default=str)), (".md", table_md)):
        path = out_dir / f"{stem}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
