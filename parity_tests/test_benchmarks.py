"""``python -m benchmarks`` at tiny sizes: every suite runs and writes what it promises (JSON
rows with their figures, a Markdown table, the PNG plots), and every row's error column is
within its budget; the shared harness times interleaved rounds and aggregates processes; the
recurrent sweep writes its points. Outputs and structure only, never timings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.harness import aggregate, interleave, process_summary
from benchmarks.suite import main

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

FIGURES = {"median_s", "min_s", "max_s", "processes", "tokens_per_s", "gflop_per_s",
           "peak_fraction", "peak_mib", "rel_err"}
PROCESSES = 2  # timing processes in these tests (3 by default)
LADDERS = {  # suite -> implementations every workload of it must have
    "layers": {"reference", "torch_impl"},
    "models": {"reference", "torch_impl"},
    "generation": {"reference", "torch_impl"},
    "scaling": {"reference", "torch_impl"},
}
OUTSIDE_ANCHORS = {  # generation workload prefix -> the outside implementation it is timed against
    "rnnlm greedy": "torch.nn decode loop",
    "rnnlm": None,
    "seq2seq": None,
    "": "transformers generate",  # the GPT rows
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("benchmarks")
    suites = ",".join(LADDERS)
    assert main(["--sizes", "tiny", "--threads", "1", "--suite", suites, "--processes",
                 str(PROCESSES), "--out", str(out)]) == 0
    return out, json.loads((out / "benchmarks.json").read_text())


def test_every_suite_writes_rows_with_every_figure(report: tuple[Path, dict]) -> None:
    _, payload = report
    rows = payload["rows"]
    assert {r["suite"] for r in rows} == set(LADDERS)
    for row in rows:
        name = f"{row['workload']} {row['shape']} {row['impl']} {row['dtype']}"
        assert row["error"] is None, name
        assert FIGURES <= row.keys(), name
        assert row["median_s"] > 0 and row["tokens_per_s"] > 0, name
        assert row["min_s"] <= row["median_s"] <= row["max_s"], name
        assert row["processes"] == PROCESSES and len(row["rounds"]) == PROCESSES, name
    for suite, ladder in LADDERS.items():
        for workload in {r["workload"] for r in rows if r["suite"] == suite}:
            impls = {r["impl"] for r in rows if r["workload"] == workload}
            assert ladder <= impls, f"{workload}: {sorted(impls)}"
            if suite == "generation":
                outside = next(impl for prefix, impl in OUTSIDE_ANCHORS.items()
                               if workload.startswith(prefix))
                assert outside is None or outside in impls, f"{workload}: {sorted(impls)}"
    assert payload["meta"]["peaks"]["gemm_torch_float32"] > 0
    assert payload["meta"]["threads"] == 1 and payload["meta"]["processes"] == PROCESSES


def test_every_ratio_carries_its_median_range_processes_and_threads(
        report: tuple[Path, dict]) -> None:
    _, payload = report
    ratios = [r for r in payload["rows"] if r.get("vs_anchor") is not None]
    assert {r["suite"] for r in ratios} == set(LADDERS)
    for row in ratios:
        ratio = row["vs_anchor"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"], row
        assert ratio["processes"] == PROCESSES and ratio["threads"] == 1, row
    anchors = [r for r in payload["rows"] if r["impl"] in ("torch.nn.LSTM", "F.cross_entropy")]
    assert anchors and all(r.get("vs_anchor") is None for r in anchors)


def test_error_column_is_within_budget_and_tokens_agree(report: tuple[Path, dict]) -> None:
    _, payload = report
    for row in payload["rows"]:
        name = f"{row['workload']} {row['shape']} {row['impl']} {row['dtype']}"
        if row["suite"] == "scaling":
            assert row["rel_err"] is None, name  # bench_layers holds the error column
        elif row["suite"] == "generation":
            assert row["rel_err"] in (0.0, None), name  # tokens equal the reference's
        else:
            assert row["rel_err"] <= row["budget"], name


def test_targets_are_reported_as_met_or_missed(report: tuple[Path, dict]) -> None:
    _, payload = report
    targets = [r for r in payload["rows"] if "target" in r]
    labels = {(r["workload"], r["impl"], r["dtype"]) for r in targets}
    assert ("lstm forward+backward", "torch_impl", "float32") in labels
    assert ("lstm forward+backward", "reference", "float64") in labels
    assert ("GPT training step", "torch_impl", "float32") in labels
    assert ("beam 4 kv cache", "torch_impl", "float32") in labels
    assert ("rnnlm greedy", "torch_impl", "float32") in labels
    assert ("seq2seq beam 4", "torch_impl", "float32") in labels
    assert all(r["target"].split(": ")[1].startswith(("met", "missed")) for r in targets)
    assert all(f"over {PROCESSES} processes" in r["target"] for r in targets)


def test_markdown_table_and_plots_are_written(report: tuple[Path, dict]) -> None:
    out, _ = report
    md = (out / "benchmarks.md").read_text()
    assert md.startswith("# seqtwin benchmarks")
    for suite in LADDERS:
        assert f"## {suite}" in md
    assert "| workload | shape | impl | dtype | median ms | range ms |" in md
    assert f"Timing: {PROCESSES} fresh processes" in md
    for name in ("layers", "models", "generation", "scaling_lstm", "scaling_gru", "scaling_mha"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in md


def test_parity_suite_runs_the_parity_report(tmp_path: Path) -> None:
    assert main(["--sizes", "tiny", "--suite", "parity", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "parity_report.json").read_text())
    assert report["meta"]["rows"] == report["meta"]["passed"] > 0


def test_kernel_benchmark_writes_every_op_with_small_errors(tmp_path: Path) -> None:
    """benchmarks.bench_kernels at tiny sizes: both implementations of every op,
    forward and forward+backward, each with a rate and errors against float64 that float32
    arithmetic meets."""
    from benchmarks import bench_kernels
    assert bench_kernels.main(["--lengths", "32", "--head-dims", "16", "--rows", "16",
                               "--vocab", "300", "--features", "32", "--repeat", "1",
                               "--warmup", "0", "--min-seconds", "0",
                               "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels_cpu_float32.json").read_text())["rows"]
    seen = {(r["op"], r["impl"].startswith("seqtwin"), r["workload"]) for r in rows}
    assert seen == {(op, ours, workload) for op in bench_kernels.OPS for ours in (False, True)
                    for workload in ("forward", "forward+backward")}
    for r in rows:
        assert r["median_s"] > 0 and r["rate"] > 0
        assert r["err_out"] < 1e-5, r
        assert r["err_grad"] is None or r["err_grad"] < 1e-5, r


def test_kernel_smoke_finds_triton_and_torch_paths_agree() -> None:
    """benchmarks.kernel_smoke, the program compute-sanitizer runs on a GPU, exits 0 (every
    op's Triton path agrees with its torch path); here under triton's interpreter."""
    pytest.importorskip("triton", reason="needs triton installed")
    from benchmarks import kernel_smoke
    assert kernel_smoke.main(["--ops", "layer_norm,lstm_step,gru_step"]) == 0


def test_step_costs_times_every_piece_of_both_steps(tmp_path: Path) -> None:
    """benchmarks.step_costs (where a GPU time step's cost goes) at tiny sizes on the
    CPU: every torch piece and both whole-layer rows of each cell, with a host time that the
    synchronised total includes, written to JSON and Markdown."""
    from benchmarks import step_costs
    assert step_costs.main(["--device", "cpu", "--batch", "2", "--hidden", "8", "--length",
                            "3", "--calls", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "step_costs_cpu_float32_B2_H8.json").read_text())["rows"]
    for cell in ("lstm", "gru"):
        pieces = {r["piece"] for r in rows if r["cell"] == cell}
        assert {"step forward, torch", "step backward, torch", "layer forward / T (T=3)",
                "layer forward+backward / T (T=3)"} <= pieces
    for r in rows:
        assert 0 < r["host"] <= r["total"] and r["device"] is None, r
    assert (tmp_path / "step_costs_cpu_float32_B2_H8.md").read_text().startswith("# Per-step")


@pytest.mark.parametrize("padding", [False, True])
def test_attention_benchmark_rows_agree_with_float64(tmp_path: Path, padding: bool) -> None:
    """benchmarks.bench_attention at a tiny size, with and without key padding: both
    implementations, both workloads, each within float32 rounding of float64 SDPA."""
    from benchmarks import bench_attention
    argv = ["--lengths", "12", "--head-dims", "8", "--batch", "2", "--heads", "2", "--repeat",
            "1", "--warmup", "0", "--min-seconds", "0", "--out", str(tmp_path)]
    assert bench_attention.main(argv + (["--padding"] if padding else [])) == 0
    stem = "attention_cpu_float32_B2_h2" + ("_padded" if padding else "")
    rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    assert {(r["impl"], r["workload"]) for r in rows} == {
        (impl, w) for impl in ("F.sdpa", "torch_impl") for w in ("forward", "forward+backward")}
    for r in rows:
        assert r["op"].endswith("key padding") == padding
        assert r["median_s"] > 0 and r["rel_err_vs_float64"] < 1e-5, r


def test_recurrent_benchmark_records_its_rows_and_tf32_flags(tmp_path: Path) -> None:
    """benchmarks.bench_recurrent at a tiny size on the CPU: torch.nn, torch_impl and the
    reference for both cells and workloads, errors against torch.nn within float32 rounding,
    times and ratios over the processes, and the TF32 flags in force (which only the CUDA
    float32 rows depend on)."""
    from benchmarks import bench_recurrent
    assert bench_recurrent.main(["--batch", "2", "--length", "3", "--hidden", "8", "--rounds",
                                 "3", "--budget", "0", "--warmup", "1", "--processes",
                                 str(PROCESSES), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "recurrent_cpu_float32_B2_T3_H8.json").read_text())
    assert set(payload["tf32"]) == {"matmul_allow_tf32", "cudnn_allow_tf32"}
    rows = payload["rows"]
    assert {(r["layer"], r["workload"], r["impl"]) for r in rows} == {
        (cell, w, impl) for cell in ("lstm", "gru") for w in ("forward", "forward+backward")
        for impl in ("torch.nn", "torch_impl", "reference")}
    for r in rows:
        assert r["median_s"] > 0 and r["rel_err_vs_torch_nn"] < 1e-5, r
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["processes"] == PROCESSES, r
        assert r["rounds"] == [3] * PROCESSES, r
        ratio = r["vs_torch_nn"]
        if r["impl"] == "torch.nn":
            assert ratio is None
        else:
            assert ratio["min"] <= ratio["median"] <= ratio["max"], r
            assert ratio["processes"] == PROCESSES, r


# --------------------------------------------------------------------------- the harness

def test_interleave_alternates_the_order_of_each_round_after_the_warmup() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "ab"}
    times = interleave(calls, warmup=1, min_rounds=4, budget_s=0.0)
    assert order == ["a", "b"] + ["a", "b", "b", "a"] * 2
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_interleave_runs_min_rounds_then_stops_at_budget_or_max_rounds() -> None:
    def nap() -> None:
        time.sleep(0.001)
    assert len(interleave({"a": nap}, warmup=0, min_rounds=3, budget_s=0.0)["a"]) == 3
    capped = interleave({"a": nap}, warmup=0, min_rounds=2, budget_s=60.0, max_rounds=5)
    assert len(capped["a"]) == 5


def test_ratio_of_a_callable_against_itself_is_near_one() -> None:
    def work() -> float:
        return sum(i * i for i in range(2000))
    summary = process_summary(interleave({"a": work, "b": work}, min_rounds=20, budget_s=0.0),
                              [("a", "b")])
    assert summary["rounds"] == 20
    assert summary["median_s"]["a"] > 0 and summary["median_s"]["b"] > 0
    assert 0.3 < summary["ratios"]["a vs b"] < 3  # loose: the machine is shared


def test_aggregate_gives_the_median_and_range_over_processes() -> None:
    summaries = [{"rounds": n, "median_s": {"a": t, "b": 2 * t}, "ratios": {"a vs b": r}}
                 for n, t, r in ((3, 1.0, 2.0), (4, 3.0, 1.5), (5, 2.0, 3.0))]
    timing = aggregate(summaries, threads=2)
    assert timing["rounds"] == [3, 4, 5]
    assert timing["median_s"]["a"] == {"median": 2.0, "min": 1.0, "max": 3.0, "processes": 3,
                                       "threads": 2}
    assert timing["ratios"]["a vs b"] == {"median": 2.0, "min": 1.5, "max": 3.0,
                                          "processes": 3, "threads": 2}


def test_a_worker_times_the_others_when_one_implementation_raises() -> None:
    from benchmarks.suite import Impl, Settings, Workload, time_workload

    def broken() -> dict:
        raise RuntimeError("no kernel")
    impls = [Impl(name, "float32", run) for name, run in (
        ("reference", lambda: {}), ("torch_impl", broken), ("anchor", lambda: {}))]
    workload = Workload("layers", "op", "N=1", 1, 1.0, impls, anchor="anchor")
    summary = time_workload(workload, Settings("cpu", "tiny", False, 1, 3, 0.0, 1))
    assert summary["errors"] == {"torch_impl float32": "RuntimeError: no kernel"}
    assert set(summary["median_s"]) == {"reference float32", "anchor float32"}
    assert set(summary["ratios"]) == {"reference float32 vs anchor float32"}
    assert summary["rounds"] == 3


# --------------------------------------------------------------------------- the sweep

def test_recurrent_sweep_writes_every_point_with_ratios_over_processes(tmp_path: Path) -> None:
    """benchmarks.bench_recurrent_sweep on a one-point grid in 2 processes: both LSTM
    workloads, times and ratios over the processes, a verdict, the reference "not run" above
    its FLOP cap (here between the forward, 512 FLOP, and the forward+backward, 1536), and the
    JSON, Markdown and both PNGs."""
    from benchmarks import bench_recurrent_sweep
    assert bench_recurrent_sweep.main([
        "--B", "1", "--T", "2", "--H", "4", "--cells", "lstm", "--dtypes", "float32",
        "--processes", str(PROCESSES), "--threads", "1", "--budget", "0.2",
        "--reference-max-gflop", "1e-6", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "recurrent_sweep.json").read_text())
    assert payload["meta"]["threads"] == 1 and payload["meta"]["processes"] == PROCESSES
    assert payload["meta"]["command"].startswith("python -m benchmarks.bench_recurrent_sweep")
    points = {p["workload"]: p for p in payload["points"]}
    assert set(points) == {"forward", "forward+backward"}
    for p in points.values():
        assert (p["cell"], p["dtype"], p["B"], p["T"], p["H"], p["I"]) == (
            "lstm", "float32", 1, 2, 4, 4)
        assert p["verdict"] in ("met", "missed")
        for figure in (p["vs_torch_nn"], *p["times_s"].values()):
            assert figure["min"] <= figure["median"] <= figure["max"], p
            assert figure["processes"] == PROCESSES and figure["threads"] == 1, p
        assert len(p["rounds"]) == PROCESSES and min(p["rounds"]) >= 3
    assert set(points["forward"]["times_s"]) == {"torch_impl", "torch.nn", "reference"}
    assert points["forward"]["vs_reference"]["processes"] == PROCESSES
    assert set(points["forward+backward"]["times_s"]) == {"torch_impl", "torch.nn"}
    assert points["forward+backward"]["vs_reference"] == "not run"
    md = (tmp_path / "recurrent_sweep.md").read_text()
    assert "## Verdicts" in md and "| vs torch.nn | vs reference | verdict |" in md
    assert "not run" in md
    for name in ("recurrent_sweep.png", "recurrent_sweep_ratios.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_generation_memory_benchmark_reports_the_peak_beside_the_cache(tmp_path: Path) -> None:
    """benchmarks.bench_generation_memory at two lengths: a row per decoding and length, the
    cache it preallocates growing with the length."""
    from benchmarks import bench_generation_memory
    out = tmp_path / "memory.json"
    assert bench_generation_memory.main(["--new-tokens", "2,6", "--batch", "1",
                                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["num_beams"], r["new_tokens"]) for r in rows] == [(1, 2), (1, 6), (4, 2), (4, 6)]
    assert rows[1]["cache_mib"] == 3 * rows[0]["cache_mib"] > 0
    assert all(r["peak_mib"] is None or r["peak_mib"] >= 0 for r in rows)
