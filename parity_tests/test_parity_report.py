"""The parity report (``python -m benchmarks``, benchmarks/parity_report.py) at small sizes:
it exits 0, covers every layer, and every row it writes is within the DESIGN.md budgets."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.parity_report import main
from parity_tests.tolerances import TORCH32_VS_REF64, TORCH64_VS_REF64

EXPECTED_LAYERS = {
    "activations", "linear", "embedding", "cross_entropy", "dropout", "layer_norm",
    "rnn_cell", "lstm_cell", "gru_cell", "rnn (tanh)", "rnn (relu)", "lstm", "gru",
    "sdp_attention", "multihead_attention", "additive_attention", "luong_attention (dot)",
    "luong_attention (general)", "luong_attention (concat)", "gpt",
    "RNN module", "LSTM module", "GRU module", "GPT module",
}


def test_report_at_small_sizes_passes_every_row_within_budget(tmp_path: Path) -> None:
    assert main(["--sizes", "small", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "parity_report.json").read_text())
    assert (tmp_path / "parity_report.md").read_text().startswith("# seqtwin parity report")
    rows = report["rows"]
    missing = EXPECTED_LAYERS - {row["layer"] for row in rows}
    assert not missing, f"layers missing from the report: {sorted(missing)}"
    activations = " ".join(row["config"] for row in rows if row["layer"] == "activations")
    assert "gelu approximate=none" in activations and "gelu approximate=tanh" in activations
    configs = " ".join(row["config"] for row in rows if row["layer"] == "multihead_attention")
    assert "self " in configs and "cross " in configs
    for row in rows:
        name = f"{row['layer']} [{row['config']}]"
        assert row["status"] == "PASS", f"{name}: {row['note']}"
        for tag, budget in (("f64", TORCH64_VS_REF64), ("f32", TORCH32_VS_REF64)):
            assert row[f"forward_{tag}"] <= budget.forward, name
            assert row[f"gradient_{tag}"] <= budget.gradient, name
    assert report["meta"]["rows"] == report["meta"]["passed"] == len(rows)
