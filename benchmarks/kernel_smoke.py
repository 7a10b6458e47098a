"""One forward and backward of every fused kernel (``torch_impl/kernels``) on the Triton path,
at small shapes with ragged edges (sizes that are not multiples of the block sizes, masks),
checked against the torch path: the program that runs under NVIDIA's compute-sanitizer::

    compute-sanitizer --tool memcheck python -m benchmarks.kernel_smoke
    compute-sanitizer --tool racecheck python -m benchmarks.kernel_smoke --ops attention

Exits 1 if any op's Triton result differs from the torch path by more than 1e-4 (relative,
float32). Without CUDA it runs under TRITON_INTERPRET=1 on the CPU (set it yourself).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from torch_impl.kernels import flash_attention, kernel_path
from torch_impl.kernels.cross_entropy import cross_entropy
from torch_impl.kernels.gru_step import gru_step
from torch_impl.kernels.layer_norm import layer_norm
from torch_impl.kernels.lstm_step import lstm_step

OPS = ("attention", "cross_entropy", "layer_norm", "lstm_step", "gru_step")


def inputs(name: str, device: str, gen: torch.Generator) -> tuple[Callable, list, list]:
    """(function of the float leaves, float leaves, other arguments) for one op."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    if name == "attention":
        padding = torch.zeros(2, 77, dtype=torch.bool)
        padding[1, 60:] = True
        return (lambda q, k, v, pad: flash_attention(q, k, v, causal=True, key_padding_mask=pad),
                [rand(2, 3, 70, 40), rand(2, 3, 77, 40), rand(2, 3, 77, 24)], [padding.to(device)])
    if name == "cross_entropy":
        targets = torch.randint(0, 5003, (37,), generator=gen)
        targets[::5] = -100
        return (lambda x, t: cross_entropy(x, t, label_smoothing=0.1),
                [3 * rand(37, 5003)], [targets.to(device)])
    if name == "layer_norm":
        return (lambda x, w, b: layer_norm(x, w, b), [rand(33, 1000), rand(1000), rand(1000)], [])
    active = (torch.arange(5) < 3).to(device)
    if name == "lstm_step":
        return (lambda xw, hh, h, c, a: lstm_step(xw, hh, h, c, a)[0].sum(-1)
                + lstm_step(xw, hh, h, c, a)[1].sum(-1),
                [rand(5, 4 * 300), rand(5, 4 * 300), rand(5, 300), rand(5, 300)], [active])
    return (lambda xw, hh, h, a: gru_step(xw, hh, h, a),
            [rand(5, 3 * 300), rand(5, 3 * 300), rand(5, 300)], [active])


def run(name: str, path: str, device: str) -> list[torch.Tensor]:
    fn, leaves, rest = inputs(name, device, torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_() for t in leaves]
    with kernel_path(path):
        out = fn(*leaves, *rest)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        out.backward(dout)
    if device == "cuda":
        torch.cuda.synchronize()
    return [out.detach()] + [t.grad for t in leaves]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = False
    for name in (s.strip() for s in args.ops.split(",")):
        if name not in OPS:
            p.error(f"--ops: unknown op {name!r}; expected some of {', '.join(OPS)}")
        fused, plain = run(name, "triton", device), run(name, "torch", device)
        errs = [float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
                for a, b in zip(fused, plain)]
        ok = max(errs) <= 1e-4
        failed |= not ok
        print(f"{name:14s} {'ok  ' if ok else 'FAIL'} worst rel diff triton vs torch "
              f"{max(errs):.1e} over {len(errs)} tensors ({device})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
