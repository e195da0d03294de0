"""P-tuning benchmark: decode ms/token with and without a 128-token prefix, alternating.

Builds a random ChatGLM2-shaped model (hidden 4096, 2 KV groups; few layers, small vocabulary)
in memory, then times single-token cached decode steps after a prompt, alternating the plain
cache and one whose first 128 slots hold a prefix, so drift affects both alike.

    python benchmarks/bench_ptuning.py [--layers 2] [--tokens 32] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from llmchat.models import chatglm2
    from llmchat.ptuning import PrefixEncoder, prefix_kv

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    cfg = chatglm2.Config(vocab_size=1024, num_layers=a.layers)
    torch.manual_seed(0)
    model = chatglm2.Model(cfg).eval().to(device=a.device, dtype=dtype)
    enc = PrefixEncoder(a.prefix, cfg.num_layers * 2 * cfg.num_kv_groups * cfg.kv_channels,
                        cfg.hidden_size, projection=False)
    pk, pv = prefix_kv(enc, cfg.num_layers, cfg.num_kv_groups, cfg.kv_channels)
    prompt = torch.randint(0, 1024, (1, 64), device=a.device)
    tok = prompt[:, :1]
    cache = model.make_cache(64 + a.prefix + a.tokens + 8, dtype=dtype, device=a.device)
    results: dict[str, list[float]] = {"plain": [], f"prefix {a.prefix}": []}

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(a.rounds):
            for name in results:
                cache.set_prefix(*((pk, pv) if name != "plain" else (None, None)))
                model(prompt, cache)
                sync()
                t0 = time.perf_counter()
                for _ in range(a.tokens):
                    model(tok, cache)
                sync()
                results[name].append((time.perf_counter() - t0) * 1000 / a.tokens)
    for name, ms in results.items():
        print(f"decode {name:>12}: {statistics.median(ms):7.2f} ms/token "
              f"({a.layers} layers, {a.device}, {str(dtype).removeprefix('torch.')})")


if __name__ == "__main__":
    main()
