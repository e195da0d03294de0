"""CPU decode kernels at ChatGLM2-6B shapes, one token (M=1), bf16 activations: int8 vs int4.

Times ``torch._weight_int8pack_mm`` (unit scales, as llmchat runs it with bf16), torch's CPU int4
kernel ``_weight_int4pack_mm_for_cpu`` at each group size, and a bf16 ``F.linear`` for scale,
alternating the variants within each round (medians). Prints ms per call, the weight bytes
streamed per second and int4's time relative to int8, per thread count.

    python benchmarks/bench_kernels.py [--threads 1 2] [--rounds 7] [--json]
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
    out: dict[str, tuple[Any, int]] = {
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
        int8 = statistics.median(times["int8"])
        for name, (_, nbytes) in vs.items():
            med = statistics.median(times[name])
            rows.append({"threads": threads, "k": k, "n": n, "kernel": name, "ms": 1e3 * med,
                         "gb_s": nbytes / med / 1e9, "vs_int8": med / int8})
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
    print(f"{'thr':>3} {'K x N':>13} {'kernel':<10}{'ms':>8}{'GB/s':>7}{'vs int8':>9}")
    for r in rows:
        print(f"{r['threads']:>3} {r['k']:>6}x{r['n']:<6} {r['kernel']:<10}{r['ms']:>8.2f}"
              f"{r['gb_s']:>7.2f}{r['vs_int8']:>8.2f}x")


if __name__ == "__main__":
    main()
