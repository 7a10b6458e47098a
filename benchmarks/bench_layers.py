"""Layers, forward and forward+backward: reference, torch_impl (eager, and compiled with
--full) and the torch anchors, on the same random inputs and parameters.

FLOP count per call (backward = 2 x forward everywhere: one product for the input gradient,
one for the weights; recomputation inside a backward is not counted)::

    lstm, gru       forward 2 B T G H (I + H), G = 4 (LSTM) or 3 (GRU) gates, I = H;
                    the pointwise cell work, O(B T G H), is left out
    causal sdpa     forward 4 B h T^2 d / 2 (q k^T and p v; half the scores are masked)
    causal mha      forward 8 B T E^2 (q, k, v, out projections) + 2 B T^2 E (the sdpa)
    layer norm      forward 8 N D (mean, variance, normalise, scale, shift), backward 10 N D;
                    memory-bound: bytes forward 2 N D s (read x, write y), backward
                    3 N D s (read x and dy, write dx); s bytes per element
    cross-entropy   forward 4 N C (max, subtract, exp, sum), backward 3 N C;
                    memory-bound: bytes forward N C s (read logits), backward 2 N C s
                    (read logits, write dlogits)

Tokens per call: B T (recurrent, attention), N rows (layer norm, cross-entropy).
Targets: torch_impl LSTM/GRU forward+backward >= 1.0x torch.nn float32, and the
reference's float64 LSTM forward+backward >= 0.5x torch.nn float64.

    python -m benchmarks.bench_layers                  # small: B32 T64 H512 (the headline shape)
    python -m benchmarks.bench_layers --sizes tiny
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import reference
import reference.loss
import reference.normalization
import torch_impl
import torch_impl.loss
import torch_impl.normalization
from benchmarks.suite import (
    TORCH_DTYPES,
    Impl,
    Outputs,
    Settings,
    Workload,
    autograd_run,
    compiled,
    to_torch,
)
from benchmarks.suite import main as suite_main

GATES = {"lstm": 4, "gru": 3}
NN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"lstm": (torch_impl.LSTM, reference.LSTM), "gru": (torch_impl.GRU, reference.GRU)}


@dataclass(frozen=True)
class LayerSizes:
    B: int           # recurrent layers: batch, length, hidden (= input) size
    T: int
    H: int
    attn_B: int      # attention: batch, heads, length, head size (MHA: E = heads x head_dim)
    heads: int
    attn_T: int
    head_dim: int
    norm_rows: int   # layer norm: rows N and features D
    norm_D: int
    ce_rows: int     # cross-entropy: rows N and classes C
    classes: int


SIZES = {
    "tiny": LayerSizes(2, 4, 8, 1, 2, 8, 4, 16, 8, 16, 10),
    "small": LayerSizes(32, 64, 512, 8, 4, 256, 64, 8192, 1024, 2048, 8192),
    "medium": LayerSizes(64, 128, 1024, 8, 8, 1024, 64, 16384, 2048, 4096, 16384),
}


# --------------------------------------------------------------------------- workloads

def recurrent(cell: str, s: LayerSizes, backward: bool, settings: Settings) -> Workload:
    B, T, H = s.B, s.T, s.H
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    state = {k: v.double().numpy() for k, v in NN[cell](H, H).state_dict().items()}
    x, dout = rng.standard_normal((B, T, H)), rng.standard_normal((B, T, H))
    ours_class, ref_class = OURS[cell]
    anchor = f"torch.nn.{cell.upper()}"

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        model = ref_class(H, H, dtype=np.dtype(dtype))
        model.load_state_dict(state)
        x_, dout_ = x.astype(dtype), dout.astype(dtype)

        def run() -> Outputs:
            out, _ = model(x_)
            if not backward:
                return {"out": out}
            dx = model.backward(dout_)[0]
            return {"out": out, "x": dx, **model.grads}
        return run

    def torch_run(module: torch.nn.Module, dtype: str, wrap: Callable[..., Any] = lambda m: m
                  ) -> Callable[[], Outputs]:
        module.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
        x_ = to_torch(x, dtype, settings.device, grad=backward)
        forward = wrap(module)
        return autograd_run(lambda: forward(x_)[0], {"x": x_, **dict(module.named_parameters())},
                            to_torch(dout, dtype, settings.device) if backward else None)

    impls = []
    for dtype in ("float32", "float64") if backward else ("float32",):
        factory = {"dtype": TORCH_DTYPES[dtype], "device": settings.device}
        impls += [Impl("reference", dtype, reference_run(dtype), library="numpy")]
        impls += [Impl("torch_impl", dtype, torch_run(ours_class(H, H, **factory), dtype),
                       device=settings.device)]
        if settings.full:
            impls += [Impl("torch_impl compiled", dtype,
                           torch_run(ours_class(H, H, **factory), dtype, compiled),
                           device=settings.device)]
        impls += [Impl(anchor, dtype, torch_run(NN[cell](H, H, batch_first=True, **factory),
                                                 dtype), device=settings.device)]
    targets = []
    if backward:
        targets = [("torch_impl float32", f"{anchor} float32", 1.0),
                   ("torch_impl compiled float32", f"{anchor} float32", 1.0)]
        if cell == "lstm":
            targets.append(("reference float64", f"{anchor} float64", 0.5))
    flops = 2.0 * B * T * GATES[cell] * H * (H + H) * (3 if backward else 1)
    return Workload("layers", f"{cell} {'forward+backward' if backward else 'forward'}",
                    f"B={B} T={T} H={H}", B * T, flops, impls,
                    oracle=reference_run("float64"), anchor=anchor, backward=backward,
                    targets=targets)


def sdpa(s: LayerSizes, backward: bool, settings: Settings) -> Workload:
    B, h, T, d = s.attn_B, s.heads, s.attn_T, s.head_dim
    rng = np.random.default_rng(settings.seed)
    q, k, v, dout = (rng.standard_normal((B, h, T, d)) for _ in range(4))

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        q_, k_, v_, dout_ = (a.astype(dtype) for a in (q, k, v, dout))

        def run() -> Outputs:
            out, cache = reference.scaled_dot_product_attention_forward(q_, k_, v_, causal=True)
            if not backward:
                return {"out": out}
            dq, dk, dv = reference.scaled_dot_product_attention_backward(dout_, cache)
            return {"out": out, "q": dq, "k": dk, "v": dv}
        return run

    def torch_run(fn: Callable[..., torch.Tensor]) -> Callable[[], Outputs]:
        leaves = {n: to_torch(a, "float32", settings.device, backward)
                  for n, a in (("q", q), ("k", k), ("v", v))}
        return autograd_run(lambda: fn(*leaves.values()), leaves,
                            to_torch(dout, "float32", settings.device) if backward else None)

    ours = lambda q, k, v: torch_impl.scaled_dot_product_attention(q, k, v, causal=True)  # noqa: E731
    anchor = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(ours), device=settings.device)]
    if settings.full:
        impls.append(Impl("torch_impl compiled", "float32", torch_run(compiled(ours)),
                          device=settings.device))
    impls.append(Impl("F.scaled_dot_product_attention", "float32", torch_run(anchor),
                      device=settings.device))
    flops = 4.0 * B * h * T * T * d / 2 * (3 if backward else 1)
    return Workload("layers", f"causal sdpa {'forward+backward' if backward else 'forward'}",
                    f"B={B} h={h} T={T} d={d}", B * T, flops, impls,
                    oracle=reference_run("float64"), anchor="F.scaled_dot_product_attention",
                    backward=backward)


def mha(s: LayerSizes, backward: bool, settings: Settings) -> Workload:
    B, h, T, E = s.attn_B, s.heads, s.attn_T, s.heads * s.head_dim
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    nn_state = torch.nn.MultiheadAttention(E, h, batch_first=True).state_dict()
    # torch.nn initialises the biases to zero: random ones exercise their gradients too
    state = {k: (p.double().numpy() + 0.1 * rng.standard_normal(p.shape) if "bias" in k
                 else p.double().numpy()) for k, p in nn_state.items()}
    x, dout = rng.standard_normal((B, T, E)), rng.standard_normal((B, T, E))
    causal_mask = torch.ones(T, T, dtype=torch.bool, device=settings.device).triu(1)

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        params = {k: v.astype(dtype) for k, v in state.items()}
        x_, dout_ = x.astype(dtype), dout.astype(dtype)

        def run() -> Outputs:
            (out, _), cache = reference.multi_head_attention_forward(x_, x_, x_, params, h,
                                                                     causal=True)
            if not backward:
                return {"out": out}
            dq, dk, dv, dparams = reference.multi_head_attention_backward(dout_, cache)
            return {"out": out, "x": dq + dk + dv, **dparams}
        return run

    def torch_run(module: torch.nn.Module, call: Callable[..., torch.Tensor]
                  ) -> Callable[[], Outputs]:
        module.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
        x_ = to_torch(x, "float32", settings.device, backward)
        return autograd_run(lambda: call(module, x_), {"x": x_, **dict(module.named_parameters())},
                            to_torch(dout, "float32", settings.device) if backward else None)

    factory = {"dtype": torch.float32, "device": settings.device}
    ours = lambda m, x: m(x, x, x, is_causal=True)[0]  # noqa: E731
    anchor = lambda m, x: m(x, x, x, attn_mask=causal_mask, need_weights=False)[0]  # noqa: E731
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(torch_impl.MultiheadAttention(E, h, **factory),
                                                     ours), device=settings.device)]
    if settings.full:
        impls.append(Impl("torch_impl compiled", "float32",
                          torch_run(torch_impl.MultiheadAttention(E, h, **factory),
                                    compiled(ours)), device=settings.device))
    impls.append(Impl("nn.MultiheadAttention", "float32",
                      torch_run(torch.nn.MultiheadAttention(E, h, batch_first=True, **factory),
                                anchor), device=settings.device))
    flops = (8.0 * B * T * E * E + 2.0 * B * T * T * E) * (3 if backward else 1)
    return Workload("layers", f"causal mha {'forward+backward' if backward else 'forward'}",
                    f"B={B} T={T} E={E} h={h}", B * T, flops, impls,
                    oracle=reference_run("float64"), anchor="nn.MultiheadAttention",
                    backward=backward)


def layer_norm(s: LayerSizes, backward: bool, settings: Settings) -> Workload:
    N, D = s.norm_rows, s.norm_D
    rng = np.random.default_rng(settings.seed)
    x = rng.standard_normal((N, D)) * 2 + 1
    weight, bias = 1 + 0.3 * rng.standard_normal(D), 0.3 * rng.standard_normal(D)
    dy = rng.standard_normal((N, D))

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        x_, w_, b_, dy_ = (a.astype(dtype) for a in (x, weight, bias, dy))

        def run() -> Outputs:
            y, cache = reference.normalization.layer_norm_forward(x_, w_, b_)
            if not backward:
                return {"out": y}
            dx, dw, db = reference.normalization.layer_norm_backward(dy_, cache)
            return {"out": y, "x": dx, "weight": dw, "bias": db}
        return run

    def torch_run(fn: Callable[..., torch.Tensor]) -> Callable[[], Outputs]:
        leaves = {n: to_torch(a, "float32", settings.device, backward)
                  for n, a in (("x", x), ("weight", weight), ("bias", bias))}
        return autograd_run(lambda: fn(*leaves.values()), leaves,
                            to_torch(dy, "float32", settings.device) if backward else None)

    ours = lambda x, w, b: torch_impl.normalization.layer_norm(x, w, b)  # noqa: E731
    anchor = lambda x, w, b: F.layer_norm(x, (D,), w, b)  # noqa: E731
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(ours), device=settings.device)]
    if settings.full:
        impls.append(Impl("torch_impl compiled", "float32", torch_run(compiled(ours)),
                          device=settings.device))
    impls.append(Impl("nn.LayerNorm", "float32", torch_run(anchor), device=settings.device))
    return Workload("layers", f"layer norm {'forward+backward' if backward else 'forward'}",
                    f"N={N} D={D}", N, (18.0 if backward else 8.0) * N * D, impls,
                    oracle=reference_run("float64"), anchor="nn.LayerNorm",
                    bytes=(5 if backward else 2) * N * D * 4, backward=backward)


def cross_entropy(s: LayerSizes, backward: bool, settings: Settings) -> Workload:
    N, C = s.ce_rows, s.classes
    rng = np.random.default_rng(settings.seed)
    logits = 3 * rng.standard_normal((N, C))
    targets = rng.integers(0, C, N)

    def reference_run(dtype: str) -> Callable[[], Outputs]:
        logits_ = logits.astype(dtype)

        def run() -> Outputs:
            loss, cache = reference.loss.cross_entropy_forward(logits_, targets)
            if not backward:
                return {"out": loss}
            return {"out": loss, "logits": reference.loss.cross_entropy_backward(1.0, cache)}
        return run

    def torch_run(fn: Callable[..., torch.Tensor]) -> Callable[[], Outputs]:
        leaves = {"logits": to_torch(logits, "float32", settings.device, backward)}
        targets_ = to_torch(targets, "float32", settings.device)
        return autograd_run(lambda: fn(leaves["logits"], targets_), leaves,
                            torch.ones((), device=settings.device) if backward else None)

    ours = torch_impl.loss.cross_entropy
    impls = [Impl("reference", "float32", reference_run("float32"), library="numpy"),
             Impl("torch_impl", "float32", torch_run(ours), device=settings.device)]
    if settings.full:
        impls.append(Impl("torch_impl compiled", "float32", torch_run(compiled(ours)),
                          device=settings.device))
    impls.append(Impl("F.cross_entropy", "float32", torch_run(F.cross_entropy),
                      device=settings.device))
    return Workload("layers", f"cross-entropy {'forward+backward' if backward else 'forward'}",
                    f"N={N} C={C}", N, (7.0 if backward else 4.0) * N * C, impls,
                    oracle=reference_run("float64"), anchor="F.cross_entropy",
                    bytes=(3 if backward else 1) * N * C * 4, backward=backward)


def workloads(settings: Settings) -> list[Workload]:
    s = SIZES[settings.sizes]
    return [make(*args, backward, settings)
            for make, *args in ((recurrent, "lstm", s), (recurrent, "gru", s), (sdpa, s),
                                (mha, s), (layer_norm, s), (cross_entropy, s))
            for backward in (False, True)]


def notes(settings: Settings) -> list[str]:
    return ["layers: float32 except the float64 recurrent forward+backward rows (the "
            "reference float64 target); FLOP counts in benchmarks/bench_layers.py; "
            "layer norm and cross-entropy are held against the copy bandwidth (bw)."]


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, prog="python -m benchmarks.bench_layers", default_suite="layers")


if __name__ == "__main__":
    raise SystemExit(main())
