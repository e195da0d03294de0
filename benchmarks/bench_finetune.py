"""P-tuning v2 training benchmark: peak memory and steps/s per base mode, full width.

Builds a random full-width ChatGLM2-6B (or ChatGLM-6B) with few layers through the normal
loading path (``loader.build_model``, quantizing as tensors arrive) and runs training steps of
``llmchat.finetune`` (prefix forward with gradient checkpointing, backward, HF AdamW) on one
seed-like example: a ~40-token comment, a 1-token label, ``--pre_seq_len 128``, batch 1.

Each mode runs in its own process (so one mode's allocations do not inflate another's peak),
alternating the order over ``--rounds``. Reported per mode: weights resident after the build,
the peak during training above that (activations, recomputation, optimizer state, from the
first step on; CPU: the
process's VmHWM after resetting it; CUDA: ``max_memory_allocated``), and steps/s. Ratios to
the bf16 base measured in the same run are what to compare across machines.

Modes: fp32 (float32 base), bf16 (bfloat16 base), int8 / int4 (bfloat16 activations through
``--quantization_bit`` linears, backward through their inputs). On CUDA, fp16 replaces fp32.

    python benchmarks/bench_finetune.py [--model chatglm2] [--layers 2] [--steps 3] \\
        [--rounds 1] [--device cpu] [--json]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {"fp32": ("float32", 16), "fp16": ("float16", 16), "bf16": ("bfloat16", 16),
         "int8": ("bfloat16", 8), "int4": ("bfloat16", 4)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one(mode: str, a: argparse.Namespace) -> dict[str, float | str]:
    """Build the model and time ``a.steps`` training steps in this process."""
    import torch

    from llmchat.bench import random_tensors, shrink
    from llmchat.finetune.data import Features
    from llmchat.finetune.train import (
        collate,
        dims_of,
        make_optimizer,
        new_encoder,
        prefix_loss,
    )
    from llmchat.loader import build_model

    module_name = f"llmchat.models.{a.model}"
    import importlib

    module = importlib.import_module(module_name)
    dtype_name, bits = MODES[mode]
    dtype = getattr(torch, dtype_name)
    dev = torch.device(a.device)
    cfg = shrink(module.Config(), a.layers)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    model = build_model(module, cfg, random_tensors(module, cfg, dtype=dtype, device=dev),
                        bits=bits, checkpoint_bits=0, dtype=dtype, device=dev, training=True)
    model.requires_grad_(False)
    d = dims_of(module_name, cfg)
    enc = new_encoder(d, a.pre_seq_len, False, seed=0).to(dev)
    opt = make_optimizer(enc, argparse.Namespace(weight_decay=0.0, learning_rate=2e-2,
                                                 adam_beta1=0.9, adam_beta2=0.999,
                                                 adam_epsilon=1e-8))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 60000, (a.prompt,), generator=g).tolist()
    if d.glm2:
        ids = [64790, 64792, *prompt, 30939, 2]
        labels = [-100] * (len(ids) - 2) + ids[-2:]
    else:
        ids = [*prompt, 130001, 130004, 9, 130005]
        labels = [-100] * (len(prompt) + 1) + ids[-3:]
    x, y = collate([Features(ids, labels)], 0, dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        prefix_loss(model, d, enc, x, y, dtype=dtype).backward()
        torch.nn.utils.clip_grad_norm_(list(enc.parameters()), 1.0)
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = _rss_kib("VmRSS") * 1024
        try:  # reset VmHWM (peak RSS) so the build's own peak does not count
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    step()  # warm-up (allocates the optimizer state); its peak counts, its time does not
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else _rss_kib("VmHWM") * 1024)
    return {"mode": mode, "resident_gib": base / 2**30,
            "train_peak_over_resident_gib": max(peak - base, 0) / 2**30,
            "steps_per_s": a.steps / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("chatglm2", "chatglm"), default="chatglm2")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", default=None, help="comma-separated (default: all)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    modes = a.modes.split(",") if a.modes else (
        ["fp16", "bf16", "int8", "int4"] if a.device.startswith("cuda")
        else ["fp32", "bf16", "int8", "int4"])
    results: dict[str, list[dict[str, float | str]]] = {m: [] for m in modes}
    passthrough = [f"--model={a.model}", f"--layers={a.layers}", f"--steps={a.steps}",
                   f"--prompt={a.prompt}", f"--pre-seq-len={a.pre_seq_len}",
                   f"--threads={a.threads}", f"--device={a.device}"]
    for r in range(a.rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):  # alternate the order
            res = subprocess.run([sys.executable, __file__, f"--one={m}", *passthrough],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if res.returncode:
                sys.exit(f"{m}: {res.stderr.strip().splitlines()[-1]}")
            results[m].append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = "bf16"
    rows = []
    for m in modes:
        rs = results[m]
        row = {"mode": m,
               "resident_gib": round(statistics.median(x["resident_gib"] for x in rs), 3),
               "train_peak_over_resident_gib": round(statistics.median(
                   x["train_peak_over_resident_gib"] for x in rs), 3),
               "steps_per_s": round(statistics.median(x["steps_per_s"] for x in rs), 4)}
        rows.append(row)
    by = {r["mode"]: r for r in rows}
    for r in rows:
        if ref in by:
            r["speed_vs_bf16"] = round(r["steps_per_s"] / by[ref]["steps_per_s"], 3)
    if a.json:
        print(json.dumps({"model": a.model, "layers": a.layers, "device": a.device,
                          "pre_seq_len": a.pre_seq_len, "rows": rows}))
        return
    print(f"{a.model}, full width, {a.layers} layers, {a.device}, pre_seq_len {a.pre_seq_len}, "
          f"{a.prompt}-token prompt, batch 1, {a.steps} steps x {a.rounds} round(s)")
    print(f"{'mode':6} {'resident GiB':>13} {'train peak +GiB':>16} {'steps/s':>9} "
          f"{'vs bf16':>8}")
    for r in rows:
        print(f"{r['mode']:6} {r['resident_gib']:13.3f} {r['train_peak_over_resident_gib']:16.3f} "
              f"{r['steps_per_s']:9.4f} {r.get('speed_vs_bf16', float('nan')):8.3f}")


if __name__ == "__main__":
    main()
