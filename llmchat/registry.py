"""The four supported models: presets from ``configs/*.toml`` and detection from config.json."""

from __future__ import annotations

import json
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
    quantized: dict[int, str] = field(default_factory=dict)  # bits → official pre-quantized repo
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


PRESET_KEYS = {
    "name", "module", "hub_id", "description", "aliases", "quantized", "supports_images",
    "cuda_dtype", "generation", "memory_gb",
}


def _spec(data: dict[str, Any]) -> ModelSpec:
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:  # a key nothing reads is a mistake in the preset (broken install)
        raise CheckpointError(f"preset {data.get('name')!r} has unknown keys: {unknown}")
    return ModelSpec(
        name=data["name"],
        module=data["module"],
        hub_id=data["hub_id"],
        description=data.get("description", ""),
        aliases=tuple(data.get("aliases", ())),
        quantized={int(bits): str(repo) for bits, repo in data.get("quantized", {}).items()},
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


def _names(spec: ModelSpec) -> dict[str, int]:
    """Every name of a preset → the bits it implies (0: none). ``chatglm2-6b-int4``,
    ``chatglm2-int4`` and ``THUDM/chatglm2-6b-int4`` name the pre-quantized repository."""
    names = {n: 0 for n in (spec.name, *spec.aliases, spec.hub_id.lower())}
    for bits, repo in spec.quantized.items():
        for base in (spec.name, *spec.aliases):
            names.setdefault(f"{base}-int{bits}", bits)
        names.setdefault(repo.lower(), bits)
        names.setdefault(repo.lower().rpartition("/")[2], bits)
    return names


def lookup(name: str) -> tuple[ModelSpec, int]:
    """A preset by name, alias or hub id (case-insensitive), with the bits the name implies:
    ``chatglm2-6b-int4`` → (chatglm2-6b, 4); ``chatglm2`` → (chatglm2-6b, 0)."""
    key = name.strip().lower()
    for spec in models().values():
        bits = _names(spec).get(key)
        if bits is not None:
            return spec, bits
    known = ", ".join(models())
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}")


def resolve(name: str) -> ModelSpec:
    """A preset by name or alias (case-insensitive)."""
    return lookup(name)[0]


def repo_for(spec: ModelSpec, bits: int) -> str:
    """The hub repository for ``--quant bits``: the official pre-quantized one where it exists."""
    return spec.quantized.get(bits, spec.hub_id)


# Newer GLM checkpoints share ChatGLM2's config keys (multi_query_attention, padded_vocab_size):
# they are told apart by their name, vocabulary and tokenizer, and refused by name.
_LATER_GLM = (("chatglm3", "ChatGLM3-6B"), ("glm-4", "GLM-4"), ("glm4", "GLM-4"))
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_VOCAB = 151552


def _later_glm(config: dict[str, Any], tokenizer_config: dict[str, Any]) -> str | None:
    """'ChatGLM3-6B' or 'GLM-4' (with the reason) when a ChatGLM2-shaped checkpoint is one."""
    for key, where in (("_name_or_path", config), ("name_or_path", tokenizer_config)):
        value = str(where.get(key) or "").lower().replace("_", "-")
        for needle, family in _LATER_GLM:
            if needle in value:
                return f"{family} ({key} {where.get(key)!r})"
    vocab = config.get("padded_vocab_size") or config.get("vocab_size") or 0
    if isinstance(vocab, int) and vocab >= GLM4_VOCAB:
        return f"GLM-4 (vocabulary of {vocab} tokens)"
    if isinstance(config.get("eos_token_id"), list):
        return "GLM-4 (several eos_token_id)"
    tok_class = str(tokenizer_config.get("tokenizer_class") or "")
    if tok_class == "ChatGLM4Tokenizer":
        return "GLM-4 (tokenizer_class ChatGLM4Tokenizer)"
    text = json.dumps(tokenizer_config, ensure_ascii=False)
    found = [t for t in _ROLE_TOKENS if t in text]
    if found:
        return f"ChatGLM3-6B (its tokenizer has the role tokens {', '.join(found)})"
    return None


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of a checkpoint directory, or {} (it is optional)."""
    from llmchat.errors import TokenizerError
    from llmchat.safeio import MAX_CONFIG_BYTES, read_json

    file = Path(path) / "tokenizer_config.json"
    if not file.exists() and not file.is_symlink():
        return {}
    data = read_json(file, max_bytes=MAX_CONFIG_BYTES, what="tokenizer_config.json",
                     error=TokenizerError)  # size-capped, regular files only
    return data if isinstance(data, dict) else {}


def detect(config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> ModelSpec:
    """Which preset a checkpoint's config.json (and tokenizer_config.json) belongs to.

    ChatGLM-6B, ChatGLM2-6B and VisualGLM-6B all say ``model_type: chatglm`` and
    ``ChatGLMModel``; they differ in the keys they carry (as chatglm.cpp's converter tells them
    apart): VisualGLM has ``eva_config``, ChatGLM2 has ``multi_query_attention``. ChatGLM3-6B and
    GLM-4 carry ChatGLM2's keys too; they are refused (``_later_glm``).
    """
    tokenizer_config = tokenizer_config or {}
    archs = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    auto_map = " ".join(str(v) for v in (config.get("auto_map") or {}).values())
    supported = (
        "llmchat supports ChatGLM-6B, ChatGLM2-6B, VisualGLM-6B and Qwen-7B-Chat"
    )
    if "QWenLMHeadModel" in archs or model_type == "qwen":
        return resolve("qwen-7b-chat")
    if model_type in ("glm", "glm4") or any(a.startswith(("GlmFor", "Glm4For")) for a in archs):
        what = ", ".join(archs) or model_type
        raise UnsupportedCheckpointError(
            f"GLM-4 checkpoints ({what}) are not supported; {supported}"
        )
    if model_type == "chatglm" or any(a.startswith("ChatGLM") for a in archs):
        if "eva_config" in config or "WithImage" in auto_map:
            return resolve("visualglm-6b")
        if "multi_query_attention" in config or "padded_vocab_size" in config:
            later = _later_glm(config, tokenizer_config)
            if later:
                raise UnsupportedCheckpointError(
                    f"this is a {later} checkpoint, which is not supported; {supported}"
                )
            return resolve("chatglm2-6b")
        if "position_encoding_2d" in config or "inner_hidden_size" in config:
            return resolve("chatglm-6b")
    what = ", ".join(archs) or model_type or "no 'architectures' or 'model_type'"
    raise UnsupportedCheckpointError(f"unsupported architecture ({what}); {supported}")


def cached_snapshot(spec: ModelSpec | str) -> Path | None:
    """The cached directory of a preset (or of a hub repository id), or None (never touches the
    network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    repo = spec if isinstance(spec, str) else spec.hub_id
    hit = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache_dir())
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


def catalog() -> list[dict[str, Any]]:
    """What ``llmchat models`` lists: each preset, its official pre-quantized repositories
    (fetched for ``--quant N``) and which of them are in the local cache."""
    rows = []
    for spec in models().values():
        cached = cached_snapshot(spec)
        rows.append(
            {
                "name": spec.name,
                "aliases": list(spec.aliases),
                "hub_id": spec.hub_id,
                "images": spec.supports_images,
                "memory_gb": spec.memory_gb,
                "cached": str(cached) if cached else None,
                "description": spec.description,
                "quantized": [  # official pre-quantized repos, fetched for --quant N
                    {"name": f"{spec.name}-int{bits}", "quant": bits, "hub_id": repo,
                     "cached": str(c) if (c := cached_snapshot(repo)) else None}
                    for bits, repo in sorted(spec.quantized.items())
                ],
            }
        )
    return rows


def catalog_table(rows: list[dict[str, Any]]) -> Any:
    """``catalog()`` as a rich ``Table`` (name, aliases, hub id, memory, cached)."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("name", "aliases", "hub id", "GPU memory fp16/int8/int4", "cached"):
        table.add_column(col, no_wrap=col in ("name", "hub id"))
    for r in rows:
        mem = "/".join(f"{r['memory_gb'].get(k, '?')}" for k in ("fp16", "int8", "int4")) + " GB"
        table.add_row(
            r["name"],
            ", ".join(r["aliases"]),
            r["hub_id"],
            mem,
            "[green]yes[/]" if r["cached"] else "[dim]no[/]",
        )
        for q in r["quantized"]:
            table.add_row(
                f"  {q['name']}",
                f"--quant {q['quant']}",
                q["hub_id"],
                f"{r['memory_gb'].get('int' + str(q['quant']), '?')} GB",
                "[green]yes[/]" if q["cached"] else "[dim]no[/]",
            )
    return table
