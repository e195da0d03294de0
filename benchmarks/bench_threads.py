"""CPU thread-count benchmark: decode tokens/s with llmchat's default ``--threads`` versus torch's
own default (every logical CPU) while other processes keep some CPUs busy.

A random ChatGLM2-shaped model (narrow, few layers: it runs in seconds) decodes greedily on the
CPU. ``--busy`` busy-loop processes run for the whole measurement; the two thread counts are then
measured in alternating rounds (ABAB…, the first side swapping each round) so a drift in the
machine's load hits both sides alike, and the ratio of the medians is printed.

    python benchmarks/bench_threads.py [--busy 1] [--rounds 4] [--tokens 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(hidden: int, layers: int) -> tuple[Any, Any, Any]:
    import torch

    from llmchat.bench import random_tensors
    from llmchat.loader import build_model
    from llmchat.models import chatglm2

    cfg = chatglm2.Config(vocab_size=8192, hidden_size=hidden, num_layers=layers,
                          num_heads=hidden // 128, ffn_hidden_size=hidden * 27 // 8,
                          seq_length=1024)
    dev = torch.device("cpu")
    model = build_model(chatglm2, cfg, random_tensors(chatglm2, cfg, dtype=torch.float32,
                                                      device=dev),
                        bits=16, checkpoint_bits=0, dtype=torch.float32, device=dev)
    return model, cfg, dev


def decode_rate(model: Any, cfg: Any, dev: Any, tokens: int, threads: int) -> float:
    """Tokens/s of ``tokens`` greedy decode steps after a 16-token prompt."""
    import torch

    from llmchat.bench import prompt_ids
    from llmchat.generate import generate_tokens, make_sampler
    from llmchat.types import GenerationConfig

    torch.set_num_threads(threads)
    ids = prompt_ids(cfg, 16, cfg.vocab_size)
    cache = model.make_cache(16 + tokens + 2, dtype=torch.float32, device=dev)
    sample = make_sampler(GenerationConfig(temperature=0), device=dev)
    first = None
    with torch.inference_mode():
        for i, _ in enumerate(generate_tokens(model, ids, cache, sample=sample,
                                              max_new_tokens=tokens, stop_ids=frozenset())):
            if i == 0:
                first = time.perf_counter()
    assert first is not None
    return (tokens - 1) / (time.perf_counter() - first)


def start_busy(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=None,
                    help="busy-loop processes (default: half the usable CPUs, at least 1)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from llmchat.threads import default_threads, usable_cpus

    logical = os.cpu_count() or 1  # what torch uses by default
    busy_n = args.busy if args.busy is not None else max(1, len(usable_cpus()) // 2)
    model, cfg, dev = build(args.hidden, args.layers)
    decode_rate(model, cfg, dev, 4, 1)  # warm-up
    procs = start_busy(busy_n)
    try:
        time.sleep(0.5)  # let the busy loops show up in /proc/stat
        chosen = default_threads()
        sides = {"default": chosen, "all": logical}
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for side in order:
                rates[side].append(decode_rate(model, cfg, dev, args.tokens, sides[side]))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "busy_processes": busy_n, "usable_cpus": len(usable_cpus()), "logical_cpus": logical,
        "threads": sides, "tokens_per_s": rates, "median_tokens_per_s": med,
        "ratio_default_over_all": med["default"] / med["all"] if med["all"] else None,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{busy_n} busy-loop process(es) on {len(usable_cpus())} usable / {logical} logical "
          f"CPUs; model hidden {args.hidden}, {args.layers} layers, fp32")
    for side, n in sides.items():
        runs = ", ".join(f"{v:.1f}" for v in rates[side])
        print(f"  {side:>7} ({n:>2} threads): median {med[side]:7.1f} tok/s  [{runs}]")
    print(f"  ratio default/all: {out['ratio_default_over_all']:.2f}x")


if __name__ == "__main__":
    main()
