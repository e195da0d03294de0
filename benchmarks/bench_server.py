"""Server benchmark: requests/s and p50/p95 latency of ``llmchat serve`` under a bounded load,
and (``--turns N``) what the cross-request prefix cache saves on a growing conversation.

Starts ``llmchat serve`` on a free 127.0.0.1 port (a tiny random ChatGLM2 checkpoint unless
``--model-path`` is given), then sends ``--requests`` chat completions from ``--concurrency``
client threads (greedy, ``--max-tokens`` each; ``--stream`` to measure streamed requests, where
the time to the first content chunk is reported too). The server runs one generation at a time,
so concurrency measures queueing, not batching.

``--turns N`` instead starts two servers on the same checkpoint, one reusing the KV cache across
requests and one recomputing (``LLMCHAT_KV_REUSE=0``), and sends each the same N-turn greedy
conversation as growing ``messages`` arrays, alternating which side goes first each turn. It
prints each turn's latency, prompt and cached tokens (``usage.prompt_tokens_details``) per side,
and the recompute / reuse latency ratio; ``--hidden H`` widens the random checkpoint so prefill
costs something (the default tiny one is all overhead).

    python benchmarks/bench_server.py [--requests 32] [--concurrency 4] [--max-tokens 32]
                                      [--stream] [--model-path DIR] [--json]
    python benchmarks/bench_server.py --turns 8 [--hidden 512] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def start_server(model_path: str, device: str, tmp: str, tag: str,
                 env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("LLMCHAT_API_KEY", None)
    logfile = Path(tmp) / f"server-{tag}.log"
    with logfile.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmchat", "serve", "-p", model_path, "--device", device,
             "--port", str(port), "--no-log"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start: " + logfile.read_text())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def turns_bench(args: argparse.Namespace, model_path: str, tmp: str) -> dict[str, Any]:
    """One growing conversation on a reusing and a recomputing server, alternating sides."""
    import httpx

    sides = {"reuse": {}, "recompute": {"LLMCHAT_KV_REUSE": "0"}}
    procs = {k: start_server(model_path, args.device, tmp, k, env) for k, env in sides.items()}
    rows: list[dict[str, Any]] = []
    try:
        history: dict[str, list[dict[str, str]]] = {k: [] for k in sides}
        question = "请详细介绍一下你自己，以及你能做些什么事情。"
        with httpx.Client(timeout=600) as client:
            for turn in range(args.turns):
                row: dict[str, Any] = {"turn": turn + 1}
                order = list(sides) if turn % 2 == 0 else list(reversed(sides))
                for side in order:
                    msgs = [*history[side], {"role": "user", "content": f"{turn + 1}. {question}"}]
                    t0 = time.perf_counter()
                    r = client.post(procs[side][1] + "/v1/chat/completions", json={
                        "messages": msgs, "temperature": 0, "max_tokens": args.max_tokens})
                    r.raise_for_status()
                    dt = time.perf_counter() - t0
                    data = r.json()
                    usage = data["usage"]
                    reply = data["choices"][0]["message"]["content"]
                    history[side] = [*msgs, {"role": "assistant", "content": reply}]
                    row[f"{side}_s"] = round(dt, 4)
                    row[f"{side}_cached"] = usage["prompt_tokens_details"]["cached_tokens"]
                    row["prompt_tokens"] = usage["prompt_tokens"]
                row["same_reply"] = history["reuse"][-1] == history["recompute"][-1]
                row["ratio"] = round(row["recompute_s"] / row["reuse_s"], 2)
                rows.append(row)
    finally:
        codes = {k: stop_server(p) for k, (p, _) in procs.items()}
    return {"turns": rows, "server_exit_codes": codes,
            "last_turn_ratio": rows[-1]["ratio"] if rows else None,
            "all_replies_equal": all(r["same_reply"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--turns", type=int, default=0, help="the prefix-cache benchmark instead")
    ap.add_argument("--hidden", type=int, default=64, help="random checkpoint width")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import httpx

    tmp = tempfile.TemporaryDirectory(prefix="llmchat-bench-server-")
    model_path = args.model_path
    if model_path is None:
        from tests.checkpoints import chatglm2_checkpoint

        h = args.hidden
        wide = {} if h == 64 else {"hidden_size": h, "num_attention_heads": max(1, h // 64),
                                   "kv_channels": min(h, 64), "ffn_hidden_size": 3 * h}
        model_path = str(chatglm2_checkpoint(Path(tmp.name) / "chatglm2-6b", seq_length=8192,
                                             **wide))
    if args.turns:
        try:
            result = turns_bench(args, model_path, tmp.name)
        finally:
            tmp.cleanup()
        if args.json:
            print(json.dumps(result))
            return
        print(f"{'turn':>4} {'prompt':>6} {'cached':>6} {'reuse s':>8} {'recompute s':>11} "
              f"{'ratio':>5} same")
        for r in result["turns"]:
            print(f"{r['turn']:>4} {r['prompt_tokens']:>6} {r['reuse_cached']:>6} "
                  f"{r['reuse_s']:>8.3f} {r['recompute_s']:>11.3f} {r['ratio']:>5.2f} "
                  f"{'yes' if r['same_reply'] else 'NO'}")
        print(f"exit codes {result['server_exit_codes']}; replies equal: "
              f"{result['all_replies_equal']}")
        return
    proc, url = start_server(model_path, args.device, tmp.name, "load")
    try:
        questions = ["你好", "hello", "介绍一下北京", "what is 1+1?"]
        latencies: list[float] = []
        firsts: list[float] = []
        tokens: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))

        def worker() -> None:
            with httpx.Client(base_url=url + "/v1", timeout=600) as client:
                for i in counter:
                    body: dict[str, Any] = {
                        "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                        "temperature": 0, "max_tokens": args.max_tokens, "stream": args.stream,
                    }
                    if args.stream:
                        body["stream_options"] = {"include_usage": True}
                    t0 = time.perf_counter()
                    first, n = None, 0
                    try:
                        if args.stream:
                            with client.stream("POST", "/chat/completions", json=body) as r:
                                r.raise_for_status()
                                for line in r.iter_lines():
                                    if not line.startswith("data: {"):
                                        continue
                                    chunk = json.loads(line[6:])
                                    if first is None and any(
                                        c["delta"].get("content") for c in chunk["choices"]
                                    ):
                                        first = time.perf_counter() - t0
                                    if chunk.get("usage"):
                                        n = chunk["usage"]["completion_tokens"]
                        else:
                            r = client.post("/chat/completions", json=body)
                            r.raise_for_status()
                            n = r.json()["usage"]["completion_tokens"]
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(str(exc))
                        continue
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        tokens.append(n)
                        if first is not None:
                            firsts.append(first)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        stop_server(proc)
        tmp.cleanup()

    result = {
        "requests": len(latencies), "errors": len(errors), "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "stream": args.stream, "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2) if wall else 0.0,
        "completion_tokens_per_s": round(sum(tokens) / wall, 1) if wall else 0.0,
        "latency_p50_s": round(pct(latencies, 0.5), 4),
        "latency_p95_s": round(pct(latencies, 0.95), 4),
        "server_exit_code": proc.returncode,
    }
    if firsts:
        result["first_content_p50_s"] = round(pct(firsts, 0.5), 4)
        result["first_content_p95_s"] = round(pct(firsts, 0.95), 4)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
