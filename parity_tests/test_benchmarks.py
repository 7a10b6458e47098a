"""``python -m benchmarks`` at tiny sizes: every suite runs and writes what it promises (JSON
rows with their figures, a Markdown table, the PNG plots), and every row's error column is
within its budget. Outputs only, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.suite import main

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

FIGURES = {"median_s", "q1_s", "q3_s", "tokens_per_s", "gflop_per_s", "peak_fraction",
           "peak_mib", "rel_err"}
LADDERS = {  # suite -> implementations every workload of it must have
    "layers": {"reference", "torch_impl"},
    "models": {"reference", "torch_impl"},
    "generation": {"reference", "torch_impl", "transformers generate"},
    "scaling": {"reference", "torch_impl"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("benchmarks")
    suites = ",".join(LADDERS)
    assert main(["--sizes", "tiny", "--threads", "1", "--suite", suites, "--out", str(out)]) == 0
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
    for suite, ladder in LADDERS.items():
        for workload in {r["workload"] for r in rows if r["suite"] == suite}:
            impls = {r["impl"] for r in rows if r["workload"] == workload}
            assert ladder <= impls, f"{workload}: {sorted(impls)}"
    assert payload["meta"]["peaks"]["gemm_torch_float32"] > 0
    assert payload["meta"]["threads"] == 1


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
    assert all(r["target"].split(": ")[1].startswith(("met", "missed")) for r in targets)


def test_markdown_table_and_plots_are_written(report: tuple[Path, dict]) -> None:
    out, _ = report
    md = (out / "benchmarks.md").read_text()
    assert md.startswith("# seqtwin benchmarks")
    for suite in LADDERS:
        assert f"## {suite}" in md
    assert "| workload | shape | impl | dtype | median ms |" in md
    for name in ("layers", "models", "generation", "scaling_lstm", "scaling_gru", "scaling_mha"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in md


def test_parity_suite_runs_the_parity_report(tmp_path: Path) -> None:
    assert main(["--sizes", "tiny", "--suite", "parity", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "parity_report.json").read_text())
    assert report["meta"]["rows"] == report["meta"]["passed"] > 0


def test_kernel_benchmark_writes_every_op_with_small_errors(tmp_path: Path) -> None:
    """benchmarks.bench_kernels (issue #5) at tiny sizes: both implementations of every op,
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
    pytest.importorskip("triton", reason="issue #5: needs triton installed")
    from benchmarks import kernel_smoke
    assert kernel_smoke.main(["--ops", "layer_norm,lstm_step,gru_step"]) == 0


def test_step_costs_times_every_piece_of_both_steps(tmp_path: Path) -> None:
    """benchmarks.step_costs (issue #5: where a GPU time step's cost goes) at tiny sizes on the
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
    and the TF32 flags in force (which only the CUDA float32 rows depend on)."""
    from benchmarks import bench_recurrent
    assert bench_recurrent.main(["--batch", "2", "--length", "3", "--hidden", "8", "--repeat",
                                 "1", "--warmup", "0", "--min-seconds", "0",
                                 "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "recurrent_cpu_float32_B2_T3_H8.json").read_text())
    assert set(payload["tf32"]) == {"matmul_allow_tf32", "cudnn_allow_tf32"}
    rows = payload["rows"]
    assert {(r["layer"], r["workload"], r["impl"]) for r in rows} == {
        (cell, w, impl) for cell in ("lstm", "gru") for w in ("forward", "forward+backward")
        for impl in ("torch.nn", "torch_impl", "reference")}
    for r in rows:
        assert r["median_s"] > 0 and r["rel_err_vs_torch_nn"] < 1e-5, r
        assert "host_median_s" not in r  # a CUDA-only column
