"""The four supported models: presets from ``configs/*.toml`` and detection from config.json."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from llmchat.errors import CheckpointError, UnknownModelError, UnsupportedCheckpointError
from llmchat.types import GenerationConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    module: str
    hub_id: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    template: str = ""
    supports_images: bool = False
    cuda_dtype: str = "float16"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    memory_gb: dict[str, float] = field(default_factory=dict)


def configs_dir() -> Path:
    """Presets ship inside the wheel as ``llmchat/_configs``; a source checkout has ``configs/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    raise CheckpointError(f"model presets not found next to {here}")  # broken install


def _spec(data: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        name=data["name"],
        module=data["module"],
        hub_id=data["hub_id"],
        description=data.get("description", ""),
        aliases=tuple(data.get("aliases", ())),
        template=data.get("template", ""),
        supports_images=bool(data.get("supports_images", False)),
        cuda_dtype=data.get("cuda_dtype", "float16"),
        generation=GenerationConfig(**data.get("generation", {})),
        memory_gb=dict(data.get("memory_gb", {})),
    )


@cache
def models() -> dict[str, ModelSpec]:
    """All presets, by canonical name, in file-name order."""
    out: dict[str, ModelSpec] = {}
    for path in sorted(configs_dir().glob("*.toml")):
        with path.open("rb") as f:
            spec = _spec(tomllib.load(f))
        out[spec.name] = spec
    return out


def resolve(name: str) -> ModelSpec:
    """A preset by name or alias (case-insensitive)."""
    key = name.strip().lower()
    for spec in models().values():
        if key == spec.name or key in spec.aliases or key == spec.hub_id.lower():
            return spec
    known = ", ".join(models())
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}")


def detect(config: dict[str, Any]) -> ModelSpec:
    """Which preset a checkpoint's config.json belongs to.

    ChatGLM-6B, ChatGLM2-6B and VisualGLM-6B all say ``model_type: chatglm`` and
    ``ChatGLMModel``; they differ in the keys they carry (as chatglm.cpp's converter tells them
    apart): VisualGLM has ``eva_config``, ChatGLM2 has ``multi_query_attention``.
    """
    archs = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    auto_map = " ".join(str(v) for v in (config.get("auto_map") or {}).values())
    if "QWenLMHeadModel" in archs or model_type == "qwen":
        return resolve("qwen-7b-chat")
    if model_type == "chatglm" or any(a.startswith("ChatGLM") for a in archs):
        if "eva_config" in config or "WithImage" in auto_map:
            return resolve("visualglm-6b")
        if "multi_query_attention" in config or "padded_vocab_size" in config:
            return resolve("chatglm2-6b")
        if "position_encoding_2d" in config or "inner_hidden_size" in config:
            return resolve("chatglm-6b")
    what = ", ".join(archs) or model_type or "no 'architectures' or 'model_type'"
    raise UnsupportedCheckpointError(
        f"unsupported architecture ({what}); llmchat supports ChatGLM-6B, ChatGLM2-6B, "
        "VisualGLM-6B and Qwen-7B-Chat"
    )


def cached_snapshot(spec: ModelSpec) -> Path | None:
    """The cached directory for a preset, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    hit = try_to_load_from_cache(spec.hub_id, "config.json", cache_dir=hub_cache_dir())
    return Path(hit).parent if isinstance(hit, str) else None


def hub_cache_dir() -> str:
    """The Hugging Face cache folder as the environment says now (huggingface_hub reads it once,
    at import): HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")
