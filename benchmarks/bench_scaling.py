"""Scaling: how the cost of forward+backward grows with sequence length T, batch B and
hidden size H, one axis at a time around a base shape, for the LSTM, the GRU and causal
multi-head attention (H = E, 4 heads), float32: reference, torch_impl and the torch.nn
anchor. One log-log plot per layer (scaling_<layer>.png); the workloads, FLOP counts and
runners are bench_layers' (no error column here: bench_layers has it).

Expected slopes: recurrent layers linear in T and B, quadratic in H once the products
dominate; attention quadratic in T, quadratic in E through the projections.

    python -m benchmarks.bench_scaling                 # small: base B8 T32 H256, x1/4..x2
    python -m benchmarks.bench_scaling --sizes tiny
"""

from __future__ import annotations

import dataclasses

from benchmarks import bench_layers
from benchmarks.bench_layers import LayerSizes
from benchmarks.suite import Settings, Workload
from benchmarks.suite import main as suite_main

HEADS = 4
BASE = {"tiny": {"B": 2, "T": 4, "H": 8}, "small": {"B": 8, "T": 32, "H": 256},
        "medium": {"B": 16, "T": 64, "H": 512}}
FACTORS = {"tiny": (1, 2), "small": (0.25, 0.5, 1, 2), "medium": (0.25, 0.5, 1, 2, 4)}


def layer_sizes(B: int, T: int, H: int) -> LayerSizes:
    return LayerSizes(B=B, T=T, H=H, attn_B=B, heads=HEADS, attn_T=T, head_dim=H // HEADS,
                      norm_rows=1, norm_D=1, ce_rows=1, classes=1)


def workloads(settings: Settings) -> list[Workload]:
    base = BASE[settings.sizes]
    result = []
    for axis in ("T", "B", "H"):
        for factor in FACTORS[settings.sizes]:
            value = max(HEADS if axis == "H" else 1, int(base[axis] * factor))
            shape = dict(base, **{axis: value})
            s = layer_sizes(**shape)
            for layer in (bench_layers.recurrent(c, s, True, settings) for c in ("lstm", "gru")):
                result.append(scaling(layer, axis, value))
            result.append(scaling(bench_layers.mha(s, True, settings), axis, value))
    return result


def scaling(w: Workload, axis: str, value: int) -> Workload:
    """The float32 rows of a bench_layers workload, tagged with the swept axis."""
    name = w.name.replace("causal mha", "mha")
    return dataclasses.replace(w, suite="scaling", name=name, oracle=None, targets=[],
                               impls=[i for i in w.impls if i.dtype == "float32"],
                               sweep=(axis, value))


def notes(settings: Settings) -> list[str]:
    base = BASE[settings.sizes]
    return [f"scaling: forward+backward float32 around B={base['B']} T={base['T']} "
            f"H={base['H']}, factors {FACTORS[settings.sizes]} per axis; mha has 4 heads "
            "and E = H."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_scaling", default_suite="scaling")


if __name__ == "__main__":
    raise SystemExit(main())
