"""Server benchmark: requests/s and p50/p95 latency of ``llmchat serve`` under a bounded load.

Starts ``llmchat serve`` on a free 127.0.0.1 port (a tiny random ChatGLM2 checkpoint unless
``--model-path`` is given), then sends ``--requests`` chat completions from ``--concurrency``
client threads (greedy, ``--max-tokens`` each; ``--stream`` to measure streamed requests, where
the time to the first content chunk is reported too). The server runs one generation at a time,
so concurrency measures queueing, not batching.

    python benchmarks/bench_server.py [--requests 32] [--concurrency 4] [--max-tokens 32]
                                      [--stream] [--model-path DIR] [--json]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import httpx

    tmp = tempfile.TemporaryDirectory(prefix="llmchat-bench-server-")
    model_path = args.model_path
    if model_path is None:
        from tests.checkpoints import chatglm2_checkpoint

        model_path = str(chatglm2_checkpoint(Path(tmp.name) / "chatglm2-6b"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMCHAT_API_KEY", None)
    log = open(Path(tmp.name) / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmchat", "serve", "-p", model_path, "--device", args.device,
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start: "
                                 + (Path(tmp.name) / "server.log").read_text())
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

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
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
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
