"""Follow-up latency over a long chat: time to first token per turn, with and without KV reuse.

Builds a random-weight model of a preset's full widths (``--layers`` of them) with the real
tokenizer from ``../shared/tokenizers``, then runs the same greedy conversation twice, turn by
turn, alternating the two sides (KV reuse on / off) so machine noise hits both alike. Prints each
turn's TTFT and the ratio turn N / turn 2 for each side (the target: ≤ 1.2 with reuse).

    python -m benchmarks.bench_turns --model chatglm2-6b --layers 1 --turns 10
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch

from llmchat.bench import random_tensors, shrink
from llmchat.conversation import Conversation
from llmchat.loader import build_model
from llmchat.models.base import LoadInfo, TransformerChatModel
from llmchat.registry import resolve

TOKENIZERS = {"chatglm2-6b": "chatglm2-6b", "qwen-7b-chat": "qwen-7b-chat"}


def make_chat(name: str, layers: int) -> TransformerChatModel:
    spec = resolve(name)
    module = importlib.import_module(spec.module)
    cfg = shrink(module.Config(), layers)
    dev = torch.device("cpu")
    net = build_model(module, cfg, random_tensors(module, cfg, dtype=torch.float32, device=dev),
                      bits=16, checkpoint_bits=0, dtype=torch.float32, device=dev)
    shared = Path(os.environ.get("LLMCHAT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    tok = module.load_tokenizer(shared / "tokenizers" / TOKENIZERS[spec.name])
    return TransformerChatModel(spec, module, net, tok, LoadInfo(dtype="float32"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="chatglm2-6b", choices=sorted(TOKENIZERS))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    chat = make_chat(args.model, args.layers)
    config = chat.defaults.with_(temperature=0, max_new_tokens=args.new_tokens)
    sides = {"reuse": Conversation(chat, config), "recompute": Conversation(chat, config)}
    ttft: dict[str, list[float]] = {k: [] for k in sides}
    prompts: list[int] = []
    question = "请详细介绍一下你自己，以及你能做些什么事情。" * 2
    for turn in range(args.turns):
        order = list(sides) if turn % 2 == 0 else list(reversed(sides))
        for side in order:
            chat.kv_reuse = side == "reuse"
            # the other side's reply left its own ids in the cache: start each side afresh
            # from its own conversation (reuse finds its common prefix; recompute ignores it)
            reply = sides[side].send(f"{turn + 1}. {question}").consume()
            ttft[side].append(reply.stats.ttft_s)
            if side == "reuse":
                prompts.append(reply.stats.prompt_tokens)
        print(f"turn {turn + 1:2d}  prompt {prompts[-1]:5d} tokens  "
              f"TTFT reuse {ttft['reuse'][-1] * 1000:8.1f} ms  "
              f"recompute {ttft['recompute'][-1] * 1000:8.1f} ms", flush=True)
    for side, t in ttft.items():
        print(f"{side}: turn {args.turns} / turn 2 TTFT = {t[-1] / t[1]:.2f}")
    print(f"turn {args.turns}: recompute / reuse TTFT = "
          f"{ttft['recompute'][-1] / ttft['reuse'][-1]:.2f}")


if __name__ == "__main__":
    main()
