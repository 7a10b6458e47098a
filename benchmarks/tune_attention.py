"""Choose the GPU launch configurations of the fused attention kernels (``GPU_CONFIGS`` and
``GPU_CONFIGS_FLOAT32`` in ``torch_impl/kernels/attention.py``): for each kernel (forward,
dkdv, dq) and head dim, time candidate (BLOCK_Q, BLOCK_K, num_warps, num_stages) with the
other kernels at their current configuration, check every candidate's output and gradients
against F.sdpa, and print the fastest as a literal for the table. Needs a CUDA device::

    python -m benchmarks.tune_attention --dtype bfloat16 --length 4096

Timings are triton.testing.do_bench medians (CUDA events, after warm-up).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import torch_impl.kernels.attention as kat

CANDIDATES = {
    "forward": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3),
                (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 128, 4, 3),
                (128, 64, 4, 4), (128, 128, 8, 2)],
    "dkdv": [(16, 64, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 3),
             (64, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4), (128, 128, 8, 2),
             (64, 128, 8, 2), (32, 128, 8, 3)],
    "dq": [(64, 32, 4, 2), (32, 32, 4, 2), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
           (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 8, 3)],
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> int:
    from triton.testing import do_bench
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--head-dims", default="64,128")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    best = {kernel: {} for kernel in CANDIDATES}
    configs = kat.GPU_CONFIGS_FLOAT32 if dtype == torch.float32 else kat.GPU_CONFIGS
    for d in (int(s) for s in args.head_dims.split(",")):
        B, h, T = args.batch, args.heads, args.length
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(B, h, T, d, device="cuda", dtype=dtype, generator=gen)
                         for _ in range(4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*leaves, is_causal=True)
        expected.backward(dout)
        expected_grads = [t.grad.clone() for t in leaves]
        out, lse = kat.flash_attention_op(q, k, v, None, True, d ** -0.5)
        for kernel, candidates in CANDIDATES.items():
            width = max(16, d)
            saved = configs[kernel].get(width)
            results = []
            for config in candidates:
                configs[kernel][width] = config
                try:
                    if kernel == "forward":
                        fn = lambda: kat.flash_attention_op(q, k, v, None, True, d ** -0.5)  # noqa
                        err = rel(fn()[0], expected)
                    else:
                        fn = lambda: kat.flash_attention_backward_op(  # noqa: E731
                            dout, q, k, v, out, lse, None, True, d ** -0.5)
                        err = max(rel(g, e) for g, e in zip(fn(), expected_grads))
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                except Exception as exc:  # a configuration that does not compile (resources)
                    print(f"  d={d:3d} {kernel:7s} {config}: failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:80]})", file=sys.stderr, flush=True)
                    continue
                ok = err < (2e-2 if dtype != torch.float32 else 1e-3)
                results.append((ms, config, err, ok))
                print(f"  d={d:3d} {kernel:7s} {config}: {ms:8.3f} ms  err vs sdpa {err:.1e}"
                      f"{'' if ok else '  WRONG'}", file=sys.stderr, flush=True)
            configs[kernel][width] = saved
            good = sorted(r for r in results if r[3])
            if good:
                best[kernel][width] = good[0][1]
                print(f"best d={d} {kernel}: {good[0][1]} {good[0][0]:.3f} ms "
                      f"(current {saved}: "
                      f"{next((f'{r[0]:.3f} ms' for r in results if r[1] == saved), '-')})",
                      flush=True)
    print("GPU_CONFIGS_FLOAT32 =" if dtype == torch.float32 else "GPU_CONFIGS =", best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
