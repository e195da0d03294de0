"""Write tiny random-weight checkpoints in the exact upstream layouts.

Real key names (from the model's own parameter names, which equal the checkpoint's), real
config.json keys (the upstream file with only the sizes shrunk), real tokenizer files, and the
upstream storage formats: sharded ``pytorch_model-0000N-of-0000M.bin`` + index json, a single
``pytorch_model.bin``, or (sharded) safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_ENV = "LLMCHAT_SHARED"
REQUIRE_ENV = (
    "LLMCHAT_REQUIRE_SHARED"  # set by .ci/run: a missing shared/ fails instead of skipping
)


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV, REPO.parent / "shared"))


def shared(rel: str) -> Path:
    """A file under ../shared; skip (or fail in CI) when it is absent."""
    path = shared_dir() / rel
    if not path.exists():
        msg = f"{path} not found: set {SHARED_ENV} to the shared/ folder with the real files"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def upstream_config(name: str) -> dict[str, Any]:
    return json.loads(shared(f"configs-upstream/{name}/config.json").read_text())


def random_state_dict(
    model: torch.nn.Module, *, seed: int = 0, std: float = 0.5, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Random values for every parameter; norm weights near 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if (
            name.endswith("norm.weight")
            or name.endswith("ln_1.weight")
            or name.endswith("ln_2.weight")
            or name.endswith("ln_f.weight")
            or "layernorm.weight" in name
        ):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) * std
        out[name] = t.to(dtype)
    return out


def save_checkpoint(
    path: Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    fmt: str = "bin-sharded",
    shards: int = 2,
    tokenizer_files: tuple[Path, ...] = (),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json``, weights in ``fmt`` and copies of the tokenizer files into ``path``.

    fmt: ``bin-sharded`` | ``bin`` | ``safetensors`` | ``safetensors-sharded``.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for f in tokenizer_files:
        shutil.copy(f, path / f.name)
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    keys = list(state_dict)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    if fmt in ("bin", "safetensors"):
        groups = [keys]
    else:
        n = max(1, min(shards, len(keys)))
        groups = [keys[i * len(keys) // n : (i + 1) * len(keys) // n] for i in range(n)]
    ext = "safetensors" if fmt.startswith("safetensors") else "bin"
    if len(groups) == 1:
        names = ["model.safetensors" if ext == "safetensors" else "pytorch_model.bin"]
    elif ext == "bin":
        names = [f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin" for i in range(len(groups))]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        part = {k: state_dict[k].contiguous() for k in group}
        if ext == "bin":
            torch.save(part, path / name)
        else:
            from safetensors.torch import save_file

            save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    if len(groups) > 1:
        index = "pytorch_model.bin.index.json" if ext == "bin" else "model.safetensors.index.json"
        (path / index).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return path


def build_state_dict(
    model_cls: Callable[[Any], torch.nn.Module], cfg: Any, **kw: Any
) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = model_cls(cfg)
    return random_state_dict(model, **kw)


# -- ChatGLM2-6B ----------------------------------------------------------------------------------
CHATGLM2_TINY = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
    "seq_length": 512,
}


def chatglm2_config(**overrides: Any) -> dict[str, Any]:
    cfg = upstream_config("chatglm2-6b")
    cfg.update(CHATGLM2_TINY)
    cfg.update(overrides)
    return cfg


def chatglm2_checkpoint(
    path: Path,
    *,
    fmt: str = "bin-sharded",
    seed: int = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> Path:
    """A tiny ChatGLM2-6B directory with the real tokenizer and upstream key names."""
    from llmchat.models import chatglm2

    hf = chatglm2_config(**overrides)
    if state_dict is None:
        state_dict = build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(hf), seed=seed)
        # the upstream checkpoints carry the (unused) rotary buffer too
        state_dict["transformer.rotary_pos_emb.inv_freq"] = (
            1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8).half()
        )
    tok = shared("tokenizers/chatglm2-6b")
    return save_checkpoint(
        path,
        hf,
        state_dict,
        fmt=fmt,
        tokenizer_files=(tok / "tokenizer.model", tok / "tokenizer_config.json"),
    )


def dense_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``named_buffers`` with oneDNN-packed weights (``llmchat.cpu_linear``) read back as plain
    tensors, for comparing two loaded models."""
    return {n: t.to_dense() if t.is_mkldnn else t for n, t in model.named_buffers()}
