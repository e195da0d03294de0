"""How each weight format's linears compute fastest on this CPU, per phase and prompt length.

One ChatGLM2-6B layer's four linears (4096 -> 4608, 4096 -> 4096, 4096 -> 27392, 13696 -> 4096),
random weights, timed for ``rows`` input rows (1 = a decode step, more = a prompt's prefill)
along each path that llmchat could take:

* bf16 weights: ``bf16`` (torch's bf16 matmul as is) | ``bf16>fp32`` (the weight upcast to
  fp32 into a reused buffer, then fp32 matmul; output rounded to bf16) | ``fp32`` (fp32 weights:
  twice the memory, the reference speed) | ``bf16 packed`` / ``fp32 packed`` (the weight
  reordered once for oneDNN, ``llmchat.cpu_linear``'s ``packed`` path);
* int8 / int4 weights (upstream layout, per-row scale): ``kernel`` (torch's weight-only kernel
  with bf16 activations) | ``>bf16`` (dequantize to bf16, bf16 matmul) | ``>fp32`` (dequantize
  to fp32 into a reused buffer, fp32 matmul) | ``ints>bf16 gemm`` (llmchat's ``integer_gemm``:
  the integers cast exactly to bf16 block by block, bf16 GEMM, row scale after).

Paths alternate within each round (rotating order), medians over ``--rounds``; ratios are to
the first path of each format (what torch does without help). Also prints what decides the
choice: torch's CPU capability, oneDNN and its bf16 support, and the CPU's AVX512/AMX flags.

    python benchmarks/bench_prefill.py [--rows 1,16,128,512] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmchat.cpu_linear import PACK_BATCH  # noqa: E402
from llmchat.quant import QuantizedLinear, quantize_weight, select_backend, unpack_int4  # noqa: E402

SHAPES = ((4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096))  # (in, out) per layer
Fn = Callable[[torch.Tensor], torch.Tensor]


def cpu_report() -> str:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(x for x in f if x.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    have = [f for f in wanted if f in flags]
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
            f", oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'} (bf16 "
            f"{'supported' if bf16 else 'not supported'}), CPU flags: {' '.join(have) or '-'}")


class Layer:
    """Weights of one layer in every format, plus a shared fp32 scratch buffer."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w32 = [torch.randn(n, k, generator=g) * 0.02 for k, n in SHAPES]
        self.wbf = [w.bfloat16() for w in self.w32]
        self.q8 = [quantize_weight(w, 8) for w in self.w32]
        self.q4 = [quantize_weight(w, 4) for w in self.w32]
        self.q4_kernel = [_pack_cpu(q) for q, _ in self.q4]
        self.buf = torch.empty(max(k * n for k, n in SHAPES))
        self.buf_bf16 = torch.empty(self.buf.numel(), dtype=torch.bfloat16)
        self.ones = {n: torch.ones(n, dtype=torch.bfloat16) for _, n in SHAPES}
        self.group = {k: next(g for g in (256, 128, 64, 32) if k % g == 0) for k, _ in SHAPES}
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH) for w in self.wbf]
        self.packed32 = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH)
                         for w in self.w32]
        # llmchat's own int8/int4 layers, forced onto integer_gemm for every row count
        self.exact = {bits: [_quantized(w, bits) for w in self.wbf] for bits in (8, 4)}
        self.tables = {}
        for k, n in SHAPES:
            t = torch.zeros(k // self.group[k], n, 2, dtype=torch.bfloat16)
            t[..., 0] = 1
            self.tables[(k, n)] = t

    def scratch(self, n: int, k: int) -> torch.Tensor:
        return self.buf[: n * k].view(n, k)

    def scratch_bf16(self, n: int, k: int) -> torch.Tensor:
        return self.buf_bf16[: n * k].view(n, k)

    # each path maps bf16 activations (rows, k) to bf16 outputs, for layer i
    def bf16(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wbf[i])

    def bf16_fp32(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w = self.wbf[i]
        buf = self.scratch(*w.shape).copy_(w)
        return F.linear(x.float(), buf).bfloat16()

    def fp32(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.w32[i]).bfloat16()

    def bf16_packed(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[i], None, "none", [], "")

    def fp32_packed(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed32[i], None, "none", [], "")
        return y.bfloat16()

    def int8_exact(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.exact[8][i](x)

    def int4_exact(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.exact[4][i](x)

    def int8_kernel(self, i: int, x: torch.Tensor) -> torch.Tensor:
        q, s = self.q8[i]
        y = torch._weight_int8pack_mm(x, q, self.ones[q.shape[0]])
        return (y.float() * s.float()).bfloat16()

    def int8_bf16(self, i: int, x: torch.Tensor) -> torch.Tensor:
        q, s = self.q8[i]
        w = self.scratch(*q.shape).copy_(q).mul_(s.float()[:, None])
        return F.linear(x, self.scratch_bf16(*q.shape).copy_(w))

    def int8_fp32(self, i: int, x: torch.Tensor) -> torch.Tensor:
        q, s = self.q8[i]
        buf = self.scratch(*q.shape).copy_(q).mul_(s.float()[:, None])
        return F.linear(x.float(), buf).bfloat16()

    def int4_kernel(self, i: int, x: torch.Tensor) -> torch.Tensor:
        k, n = SHAPES[i]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q4_kernel[i], self.group[k],
                                                       self.tables[(k, n)])
        return (y.float() * self.q4[i][1].float()).bfloat16()

    def dequant4(self, i: int) -> torch.Tensor:
        """Upstream packed int4 -> fp32 ``q * scale`` in the scratch buffer (no big temps)."""
        q, s = self.q4[i]
        n, half = q.shape
        w = self.scratch(n, 2 * half)
        pairs = w.view(n, half, 2)
        pairs[..., 0].copy_(q >> 4)  # high nibble: the even column (arithmetic shift)
        pairs[..., 1].copy_((q << 4) >> 4)
        return w.mul_(s.float()[:, None])

    def int4_bf16(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w = self.dequant4(i)
        return F.linear(x, self.scratch_bf16(*w.shape).copy_(w))

    def int4_fp32(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequant4(i)).bfloat16()


def _quantized(w: torch.Tensor, bits: int) -> QuantizedLinear:
    n, k = w.shape
    be = select_backend(bits, k, n, torch.device("cpu"), torch.bfloat16)
    mod = QuantizedLinear(k, n, False, bits, prequantized=False, dtype=torch.bfloat16,
                          device=torch.device("cpu"), backend=replace(be, prompt_rows=1))
    mod.load_checkpoint_tensor("weight", w, dtype=torch.bfloat16, device=torch.device("cpu"),
                               key="weight")
    return mod


def _pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """Upstream packed int4 -> the CPU kernel's layout (nibble + 8, unit scales)."""
    vals = unpack_int4(q).to(torch.int32) + 8
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 2)


FORMATS = {
    "bf16": ("bf16", "bf16_fp32", "fp32", "bf16_packed", "fp32_packed"),
    "int8": ("int8_kernel", "int8_bf16", "int8_fp32", "int8_exact"),
    "int4": ("int4_kernel", "int4_bf16", "int4_fp32", "int4_exact"),
}
LABEL = {"bf16": "bf16", "bf16_fp32": "bf16>fp32", "fp32": "fp32 weights",
         "bf16_packed": "bf16 packed", "fp32_packed": "fp32 packed",
         "int8_kernel": "kernel", "int8_bf16": ">bf16", "int8_fp32": ">fp32",
         "int8_exact": "ints>bf16 gemm",
         "int4_kernel": "kernel", "int4_bf16": ">bf16", "int4_fp32": ">fp32",
         "int4_exact": "ints>bf16 gemm"}


@torch.inference_mode()
def measure(layer: Layer, rows: int, paths: tuple[str, ...], rounds: int) -> dict[str, float]:
    xs = [torch.randn(rows, k).bfloat16() for k, _ in SHAPES]
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(rounds + 1):  # round 0 warms up
        order = paths[r % len(paths):] + paths[: r % len(paths)]
        for p in order:
            fn = getattr(layer, p)
            t0 = time.perf_counter()
            for i, x in enumerate(xs):
                fn(i, x)
            if r:
                times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(v) for p, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,128", help="input rows (prompt lengths), commas")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    formats = [f for f in args.formats.split(",") if f]
    print(cpu_report())
    print(f"one ChatGLM2-6B layer's linears, {torch.get_num_threads()} threads, median of "
          f"{args.rounds}, paths alternating; ms per layer (ratio: first path / this path, "
          "above 1 = faster)")
    layer = Layer()
    for fmt in formats:
        paths = FORMATS[fmt]
        for m in rows:
            res = measure(layer, m, paths, args.rounds)
            base = res[paths[0]]
            cells = "  ".join(f"{LABEL[p]} {1e3 * t:8.1f} ms ({base / t:4.2f}x)"
                              for p, t in res.items())
            tok = f"{m / min(res.values()):8.1f} tok/s best" if m > 1 else ""
            print(f"{fmt:<5} rows {m:>4}: {cells}  {tok}", flush=True)


if __name__ == "__main__":
    main()
