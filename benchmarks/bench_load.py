"""Start-up benchmark of the quantized cache: ``--quant 8/4`` on a float checkpoint, first start
(quantize on the fly and write the cache) vs second start (load the cache), vs no cache at all.

Writes a random ChatGLM2-shaped checkpoint (full widths: hidden 4096, ffn 13696, 2 KV groups; few
layers and a small vocabulary) as fp16 ``.bin`` shards, then per round and per width runs, each
in a fresh process, alternating: ``off`` (``LLMCHAT_QUANT_CACHE=0``), ``first`` (empty cache),
``second`` (the cache ``first`` wrote). Each child reports the wall time of ``loader.load`` and
``start`` = load + one forward pass, and its peak RSS (VmHWM minus the RSS before loading);
medians over the rounds, ratios to ``off``.

    python benchmarks/bench_load.py [--layers 2] [--rounds 3] [--bits 4 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_quant import _rss_now, _vm_hwm, write_checkpoint  # noqa: E402

SIDES = ("off", "first", "second")


def child(path: str, bits: int) -> dict[str, Any]:
    """Load, then one forward pass: a cached weight read lazily (mmap) is paid for here too."""
    import torch

    from llmchat.loader import load

    base = _rss_now()
    t0 = time.perf_counter()
    m = load(model_path=path, device="cpu", quant=bits)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        m.model(torch.tensor([[1, 2, 3]]))  # the vocabulary is shrunk
    return {"load_s": load_s, "start_s": time.perf_counter() - t0,
            "peak_rss": _vm_hwm() - base, "path": m.info.extra.get("quant_cache", "")}


def run_child(ckpt: Path, bits: int, home: Path, side: str) -> dict[str, Any]:
    env = {**os.environ, "LLMCHAT_HOME": str(home), "LLMCHAT_QUANT_CACHE": "0" if side == "off"
           else "1", "PYTHONPATH": str(REPO)}
    if side == "first":
        shutil.rmtree(home / "cache", ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(bits)],
                         capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        sys.exit(f"{side} int{bits} failed:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    want = {"off": "cache off", "first": "cached to", "second": "loaded quantized cache"}[side]
    if want not in row["path"]:
        sys.exit(f"{side} int{bits} took another path: {row['path']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "BITS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    try:
        ckpt_bytes = write_checkpoint(tmp / "ckpt", args.layers, args.vocab)
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            b: {s: [] for s in SIDES} for b in args.bits}
        for _ in range(args.rounds):
            for bits in args.bits:
                for side in SIDES:  # alternating: off, first, second, off, first, …
                    runs[bits][side].append(run_child(tmp / "ckpt", bits, tmp / "home", side))
        cache_bytes = {}
        for bits in args.bits:  # the entry of the last width written is still there
            run_child(tmp / "ckpt", bits, tmp / "home", "first")
            cache_bytes[bits] = sum(f.stat().st_size for f in (tmp / "home").rglob("*")
                                    if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for bits in args.bits:
        keys = ("load_s", "start_s", "peak_rss")
        off = {k: statistics.median(r[k] for r in runs[bits]["off"]) for k in keys}
        for side in SIDES:
            med = {k: statistics.median(r[k] for r in runs[bits][side]) for k in keys}
            rows.append({"bits": bits, "side": side, **med, "time_vs_off": med["start_s"]
                         / off["start_s"], "rss_vs_off": med["peak_rss"] / off["peak_rss"],
                         "cache_bytes": cache_bytes[bits]})
    result = {"layers": args.layers, "hidden": 4096, "ffn": 13696, "vocab": args.vocab,
              "rounds": args.rounds, "checkpoint_bytes": ckpt_bytes, "threads": _threads(),
              "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mib = 1 << 20
    print(f"ChatGLM2 widths, {args.layers} layers, vocab {args.vocab}: fp16 .bin checkpoint "
          f"{ckpt_bytes / mib:.0f} MiB, {result['threads']} threads, medians of {args.rounds}")
    print(f"{'quant':<7}{'start':<8}{'load s':>8}{'start s':>9}{'vs off':>8}{'peak RSS':>12}"
          f"{'vs off':>8}{'cache':>10}")
    for r in rows:
        print(f"int{r['bits']:<4}{r['side']:<8}{r['load_s']:>8.2f}{r['start_s']:>9.2f}"
              f"{r['time_vs_off']:>7.2f}x"
              f"{r['peak_rss'] / mib:>8.0f} MiB{r['rss_vs_off']:>7.2f}x"
              f"{r['cache_bytes'] / mib:>6.0f} MiB")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
