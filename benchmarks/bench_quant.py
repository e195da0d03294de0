"""Quantization benchmark: load memory for --quant 16/8/4 and CPU decode speed per weight format.

Writes a random ChatGLM2-shaped checkpoint (hidden 4096, ffn 13696, 2 KV groups; few layers and
a small vocabulary so the quantized linears dominate) as fp16 ``.bin`` shards to a temp dir,
then, each in its own subprocess so peaks do not mix:

* ``load`` rows — ``llmchat.loader.load(quant=16|8|4)`` on the CPU: checkpoint bytes, peak RSS
  of the process during the load (VmHWM, minus the RSS before loading), final model bytes;
* ``decode`` rows — ms per token of single-token forward passes with a KV cache for fp32,
  bf16, int8 and int4 (bf16 activations, the default for --quant on CPU), as ratios to fp32.

    python benchmarks/bench_quant.py [--layers 2] [--tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {  # name -> (quant, dtype)
    "fp32": (16, "float32"), "bf16": (16, "bfloat16"), "int8": (8, "bfloat16"),
    "int4": (4, "bfloat16"),
}


def write_checkpoint(path: Path, layers: int, vocab: int) -> int:
    import torch

    from llmchat.models import chatglm2
    from tests.checkpoints import chatglm2_config, random_state_dict, save_checkpoint

    hf = chatglm2_config(hidden_size=4096, num_attention_heads=32, kv_channels=128,
                         ffn_hidden_size=13696, num_layers=layers, padded_vocab_size=vocab)
    with torch.device("meta"):
        model = chatglm2.Model(chatglm2.Config.from_hf(hf))
    sd = random_state_dict(model, std=0.02)
    tok = REPO.parent / "shared" / "tokenizers" / "chatglm2-6b"
    save_checkpoint(path, hf, sd, fmt="bin-sharded", shards=layers,
                    tokenizer_files=(tok / "tokenizer.model",))
    return sum(f.stat().st_size for f in path.glob("*.bin"))


def child(path: str, mode: str, tokens: int) -> dict[str, Any]:
    """Runs in a fresh process: load in ``mode``, then time single-token decode steps."""
    import torch

    from llmchat.loader import load

    quant, dtype = MODES[mode]
    base = _rss_now()
    t0 = time.perf_counter()
    m = load(model_path=path, device="cpu", dtype=dtype, quant=quant)
    load_s = time.perf_counter() - t0
    peak = _vm_hwm()
    net = m.model
    cache = net.make_cache(tokens + 8, dtype=getattr(torch, dtype), device="cpu")
    ids = torch.tensor([[1, 2, 3]])  # the vocabulary is shrunk
    times = []
    with torch.inference_mode():
        net(ids, cache, last_only=True)  # prefill
        tok = torch.tensor([[100]])
        for _ in range(tokens):
            t = time.perf_counter()
            net(tok, cache, last_only=True)
            times.append(time.perf_counter() - t)
    times.sort()
    return {
        "mode": mode, "load_s": load_s, "peak_rss_load": peak - base,
        "model_bytes": m.info.weight_bytes, "backend": m.info.extra.get("quant_backend", "-"),
        "ms_per_token": 1e3 * times[len(times) // 2],
    }


def _vm_hwm() -> int:
    """Peak RSS of this process image. Not ru_maxrss: Linux carries the parent's peak across
    fork + exec into it, and the parent held the random checkpoint."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=12, help="decode steps timed per mode")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.tokens)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    try:
        ckpt_bytes = write_checkpoint(tmp / "ckpt", args.layers, args.vocab)
        rows = []
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(tmp / "ckpt"), mode,
                 "--tokens", str(args.tokens)],
                capture_output=True, text=True, cwd=REPO)
            if out.returncode:
                sys.exit(f"{mode} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fp32 = rows[0]["ms_per_token"]
    for r in rows:
        r["speedup_vs_fp32"] = fp32 / r["ms_per_token"]
    result = {"layers": args.layers, "hidden": 4096, "ffn": 13696, "vocab": args.vocab,
              "checkpoint_bytes": ckpt_bytes, "threads": _threads(), "modes": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mib = 1 << 20
    print(f"ChatGLM2 shapes, {args.layers} layers, vocab {args.vocab}: checkpoint (fp16 .bin) "
          f"{ckpt_bytes / mib:.0f} MiB, {result['threads']} threads")
    print(f"{'mode':<6}{'backend':<18}{'load peak RSS':>15}{'model':>11}{'load s':>8}"
          f"{'ms/token':>10}{'vs fp32':>9}")
    for r in rows:
        print(f"{r['mode']:<6}{r['backend']:<18}{r['peak_rss_load'] / mib:>11.0f} MiB"
              f"{r['model_bytes'] / mib:>7.0f} MiB{r['load_s']:>8.1f}{r['ms_per_token']:>10.1f}"
              f"{r['speedup_vs_fp32']:>8.2f}x")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
