"""CPU decode kernels at ChatGLM2-6B shapes, one token (M=1), bf16 activations: int8 vs int4.

Times ``torch._weight_int8pack_mm`` (unit scales, as llmchat runs it with bf16), torch's CPU int4
kernel ``_weight_int4pack_mm_for_cpu`` at each group size, and a bf16 ``F.linear`` for scale,
alternating the variants within each round (the fastest round is kept: on a shared machine the
others measure the neighbours). Prints ms per call, weights and bytes streamed per second and the
time relative to int8, per thread count; ``sum (read)`` is the memory roofline (a plain read of
int8-sized weights).

    python benchmarks/bench_kernels.py [--threads 1 2] [--rounds 7] [--json]

Findings (torch 2.13 CPU, AVX2, one thread; figures from a shared 2-core machine, fastest of 7
alternating rounds): both weight-only kernels run at about the same number of *weights* per
second — int8 2.1-3.4 G/s, int4 2.3-3.5 G/s (any group size 64-256; 32 is slower) — which is
below a plain vectorized read of the same bytes (3.3-7 GB/s). So neither is bandwidth-bound:
int4 streams half the bytes, but the kernel's per-weight work (nibble unpack, int->float,
group scale/zero, FMA) is the limit, and halving the bytes buys little (0.6-1.05x of int8 here,
0.73-0.81x on the largest 4096x27392 layer). llama.cpp's Q4_0 is faster because it quantizes the
activations to 8 bits and uses integer dot products, which changes the arithmetic; llmchat keeps
upstream's (bf16/fp32 activations, exact weights), so that kernel is not an option.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]  # (K in, N out) per block


def variants(k: int, n: int) -> dict[str, tuple[Any, int]]:
    """name -> (callable on x, weight bytes it streams)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ones = torch.ones(n, dtype=torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 2)
    wbf = (q.float() * 0.01).bfloat16()
    buf = torch.ones(n * k // 4)  # the memory roofline: a vectorized read of n*k bytes
    out: dict[str, tuple[Any, int]] = {
        "sum (read)": (lambda x: buf.sum(), n * k),
        "int8": (lambda x: torch._weight_int8pack_mm(x, w8, ones), n * k),
        "bf16": (lambda x: F.linear(x, wbf), 2 * n * k),
    }
    for gs in (32, 64, 128, 256):
        if k % gs:
            continue
        table = torch.zeros(k // gs, n, 2, dtype=torch.bfloat16)
        table[..., 0] = 1

        def int4(x: torch.Tensor, table: torch.Tensor = table, gs: int = gs) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, table)

        out[f"int4 g{gs}"] = (int4, n * k // 2 + table.numel() * 2)
    return out


def measure(threads: int, rounds: int, inner: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    x = torch.randn(1, 1).bfloat16()
    rows = []
    for k, n in SHAPES:
        vs = variants(k, n)
        x = torch.randn(1, k).bfloat16()
        times: dict[str, list[float]] = {name: [] for name in vs}
        for fn, _ in vs.values():
            fn(x)  # warm-up
        for _ in range(rounds):
            for name, (fn, _) in vs.items():  # alternating within the round
                t = time.perf_counter()
                for _ in range(inner):
                    fn(x)
                times[name].append((time.perf_counter() - t) / inner)
        # the fastest round: on a shared machine the others measure the neighbours
        int8 = min(times["int8"])
        for name, (_, nbytes) in vs.items():
            best = min(times[name])
            rows.append({"threads": threads, "k": k, "n": n, "kernel": name, "ms": 1e3 * best,
                         "ms_median": 1e3 * statistics.median(times[name]),
                         "gweights_s": n * k / best / 1e9, "gb_s": nbytes / best / 1e9,
                         "vs_int8": best / int8})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3, help="calls per timing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [r for t in args.threads for r in measure(t, args.rounds, args.inner)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'thr':>3} {'K x N':>13} {'kernel':<11}{'ms':>8}{'Gw/s':>7}{'GB/s':>7}{'vs int8':>9}")
    for r in rows:
        print(f"{r['threads']:>3} {r['k']:>6}x{r['n']:<6} {r['kernel']:<11}{r['ms']:>8.2f}"
              f"{r['gweights_s']:>7.2f}{r['gb_s']:>7.2f}{r['vs_int8']:>8.2f}x")


if __name__ == "__main__":
    main()
