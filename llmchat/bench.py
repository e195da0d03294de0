"""``llmchat bench``: prefill and decode speed, memory, and achieved weight-streaming bandwidth.

Batch-1 decoding reads every weight once per token, so ``bytes streamed per token / seconds per
token`` is the achieved bandwidth; it is printed next to a memory-copy bandwidth measured in the
same run (a ratio is what survives noisy, shared machines). ``--random SHAPE`` builds a
full-size random-weight model straight on the device through the normal loading path
(quantizing as tensors arrive), so no download is needed.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from llmchat.generate import generate_tokens, make_sampler
from llmchat.graphs import StaticDecoder
from llmchat.loader import (
    build_model_and_summary,
    build_notes,
    peak_rss_bytes,
    resolve_device,
    resolve_dtype,
)
from llmchat.registry import ModelSpec, resolve
from llmchat.types import GenerationConfig, parse_quant


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    quant: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    weight_bytes: int
    bytes_per_token: int
    achieved_gb_per_s: float
    copy_gb_per_s: float
    peak_memory_bytes: int
    threads: int
    decode_path: str = "eager"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_tensors(module: Any, cfg: Any, *, dtype: torch.dtype, device: torch.device,
                   seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint-like (key, tensor) pairs with random values, made on ``device``."""
    with torch.device("meta"):
        ref = module.Model(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in ref.state_dict().items():
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight",
                          "ln_vision.weight")):
            yield name, torch.ones(p.shape, dtype=dtype, device=device)
        elif p.is_floating_point():
            t = torch.empty(p.shape, dtype=dtype, device=device)
            yield name, t.normal_(0.0, 0.02, generator=gen)
        else:
            yield name, torch.zeros(p.shape, dtype=p.dtype, device=device)


def shrink(cfg: Any, layers: int | None) -> Any:
    """The same shapes with fewer layers (to fit a full-width model on a small machine)."""
    if not layers:
        return cfg
    return replace(cfg, num_layers=layers)


def streamed_bytes(model: nn.Module) -> tuple[int, int]:
    """(all weight bytes, bytes read per decoded token): embedding tables are looked up, not
    streamed, unless the output layer reuses them (ChatGLM-6B ties them)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    tied = bool(getattr(model, "tied_output", False))
    emb = sum(m.weight.numel() * m.weight.element_size()
              for m in model.modules() if isinstance(m, nn.Embedding))
    vision = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if n.startswith("image_encoder."))
    return total, total - vision - (0 if tied else emb)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), the practical memory bandwidth."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(cfg: Any, n: int, vocab: int, seed: int = 0) -> list[int]:
    """Random ordinary ids; GLM v1 prompts must end with [gMASK] <sop> (its 2D positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, max(101, min(vocab, 30000)), (n,), generator=g).tolist()
    if hasattr(cfg, "gmask_token_id") and hasattr(cfg, "bos_token_id"):
        ids[-2:] = [cfg.gmask_token_id, cfg.bos_token_id]
    return ids


def run(model_name: str | None = None, *, model_path: str | None = None,
        random_shape: str | None = None, quant: int | str = 16, device: str = "auto",
        dtype: str = "auto", prompt_tokens: int = 128, new_tokens: int = 256,
        layers: int | None = None, warmup: int = 4) -> BenchResult:
    """Load (or build randomly) a model and measure one prefill and ``new_tokens`` decode steps."""
    bits = parse_quant(quant)
    dev = resolve_device(device)
    if random_shape:
        spec: ModelSpec = resolve(random_shape)
        module = importlib.import_module(spec.module)
        cfg = shrink(module.Config(), layers)
        tdtype = resolve_dtype(dtype, dev, spec, bits)
        tensors = random_tensors(module, cfg, dtype=tdtype, device=dev)
        model, summary = build_model_and_summary(module, cfg, tensors, bits=bits,
                                                 checkpoint_bits=0, dtype=tdtype, device=dev)
        name, extra = spec.name, build_notes(model, summary)
    else:
        from llmchat.loader import load

        chat = load(model_name, model_path=model_path, quant=bits, device=device, dtype=dtype)
        model, cfg = chat.model, chat.model.config  # type: ignore[attr-defined]
        tdtype, name, extra = getattr(torch, chat.info.dtype), chat.name, chat.info.extra
    vocab = cfg.vocab_size
    ids = prompt_ids(cfg, prompt_tokens, vocab)
    cache = model.make_cache(prompt_tokens + new_tokens + warmup + 1, dtype=tdtype, device=dev)
    sample = make_sampler(GenerationConfig(temperature=0), device=dev)
    graphs = dev.type == "cuda" and os.environ.get("LLMCHAT_CUDA_GRAPHS", "1") != "0"
    step = StaticDecoder(model, cache, capture=True) if graphs else None  # as chat decodes

    def decode(n: int) -> tuple[float, float]:
        cache.reset()
        sync(dev)
        t0 = time.perf_counter()
        first = None
        for i, _ in enumerate(generate_tokens(model, ids, cache, sample=sample,
                                              max_new_tokens=n, stop_ids=frozenset(), step=step)):
            if i == 0:
                sync(dev)
                first = time.perf_counter()
        sync(dev)
        end = time.perf_counter()
        assert first is not None
        return first - t0, end - first

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    decode(warmup)  # warm-up: allocator, kernels, caches
    ttft, rest = decode(new_tokens)
    steps = max(new_tokens - 1, 1)
    ms_tok = rest / steps * 1000
    total, per_token = streamed_bytes(model)
    kv = cache.nbytes() * (prompt_tokens + new_tokens / 2) / cache.max_len  # average KV read
    per_token = int(per_token + kv)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()
    return BenchResult(
        model=name, device=str(dev), dtype=str(tdtype).removeprefix("torch."), quant=bits,
        prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        prefill_tokens_per_s=prompt_tokens / ttft if ttft else 0.0, ttft_ms=ttft * 1000,
        decode_tokens_per_s=1000 / ms_tok if ms_tok else 0.0, decode_ms_per_token=ms_tok,
        weight_bytes=total, bytes_per_token=per_token,
        achieved_gb_per_s=per_token / (ms_tok / 1000) / 1e9 if ms_tok else 0.0,
        copy_gb_per_s=copy_bandwidth(dev), peak_memory_bytes=int(peak),
        threads=torch.get_num_threads(), extra=dict(extra, layers=cfg.num_layers),
        decode_path=step.path if step is not None else "eager",
    )


def result_table(r: BenchResult) -> Any:
    """``r`` as the rich ``Table`` that ``llmchat bench`` prints."""
    from rich.table import Table

    t = Table(
        title=f"{r.model} · {r.device} · {r.dtype} · quant {r.quant} · "
        f"{r.extra.get('layers')} layers · {r.threads} threads",
        box=None,
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in (
        ("prefill tokens/s", f"{r.prefill_tokens_per_s:,.1f}"),
        ("time to first token", f"{r.ttft_ms:,.1f} ms"),
        ("decode tokens/s", f"{r.decode_tokens_per_s:,.2f}"),
        ("decode ms/token", f"{r.decode_ms_per_token:,.2f}"),
        ("weights", f"{r.weight_bytes / 2**30:,.2f} GiB"),
        ("bytes streamed/token", f"{r.bytes_per_token / 2**20:,.1f} MiB"),
        ("achieved bandwidth", f"{r.achieved_gb_per_s:,.1f} GB/s"),
        ("memory-copy bandwidth", f"{r.copy_gb_per_s:,.1f} GB/s"),
        ("peak memory", f"{r.peak_memory_bytes / 2**30:,.2f} GiB"),
        ("decode path", r.decode_path),
        ("quant backend", str(r.extra.get("quant_backend", ""))),
        ("CPU linears", str(r.extra.get("cpu_linear", ""))),
    ):
        if v:
            t.add_row(k, v)
    return t
