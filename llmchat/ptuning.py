"""P-tuning v2 prefixes for ChatGLM-6B and ChatGLM2-6B (REFERENCE.md §2.8, §3.7).

THUDM's ``ptuning/main.py`` saves only the trained ``transformer.prefix_encoder.*`` parameters
(``pytorch_model.bin`` or ``model.safetensors``) plus a config.json with ``pre_seq_len`` /
``prefix_projection``. At run time upstream turns the encoder output into per-layer past
keys/values (``get_prompt``); they are input independent, so llmchat computes them once, as
chatglm.cpp does at convert time, and the KV cache holds them in its first ``P`` slots. Prefix
keys carry no rotary, every query sees them, and the prompt's positions do not shift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmchat.errors import CheckpointError, UnsupportedCheckpointError

SUPPORTED = {"llmchat.models.chatglm": "ChatGLM-6B", "llmchat.models.chatglm2": "ChatGLM2-6B"}
KEY = "transformer.prefix_encoder."
FILES = ("pytorch_model.bin", "model.safetensors")


class PrefixEncoder(nn.Module):
    """Upstream's prefix encoder, with its parameter names: ``embedding`` and, with projection,
    ``trans`` = Linear(kv→hidden... ) as upstream: Embedding(P, width) → Linear → Tanh → Linear."""

    def __init__(self, pre_seq_len: int, kv_size: int, hidden: int, projection: bool) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, hidden)
            self.trans = nn.Sequential(
                nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, kv_size)
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)

    def forward(self, prefix: Tensor) -> Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.projection else x


@dataclass(frozen=True)
class Dims:
    glm2: bool
    layers: int
    kv_heads: int  # ChatGLM-6B: all heads; ChatGLM2: the multi-query groups
    head_dim: int
    hidden: int

    @property
    def kv_size(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim


def dims_of(module_name: str, cfg: Any) -> Dims:
    """The prefix dimensions of a ChatGLM-6B or ChatGLM2-6B base config."""
    glm2 = module_name.endswith("chatglm2")
    if glm2:
        return Dims(True, cfg.num_layers, cfg.num_kv_groups, cfg.kv_channels, cfg.hidden_size)
    return Dims(False, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def prefix_kv(encoder: PrefixEncoder, num_layers: int, groups: int, head_dim: int
              ) -> tuple[Tensor, Tensor]:
    """Keys and values of the prefix, each (layers, heads_or_groups, P, D), in fp32.

    Upstream views the output (B, P, layers·2, groups, D), permutes it to
    (layers·2, P, B, groups, D) and gives layer l slot 2l as key and 2l+1 as value.
    """
    p = encoder.embedding.num_embeddings
    with torch.no_grad():
        out = encoder(torch.arange(p, device=encoder.embedding.weight.device)).float()
    kv = out.view(p, num_layers * 2, groups, head_dim).permute(1, 2, 0, 3)  # (L·2, G, P, D)
    return kv[0::2].contiguous(), kv[1::2].contiguous()


@dataclass
class Prefix:
    name: str
    pre_seq_len: int
    projection: bool
    k: Tensor  # (layers, G, P, D)
    v: Tensor

    def to(self, dtype: torch.dtype, device: Any) -> Prefix:
        return Prefix(self.name, self.pre_seq_len, self.projection,
                      self.k.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype))


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"P-tuning checkpoint {path}: cannot read it ({e})") from None
    for wrap in ("state_dict", "module"):  # Lightning .ckpt / deepspeed layouts
        if isinstance(obj, dict) and isinstance(obj.get(wrap), dict):
            obj = obj[wrap]
    if not isinstance(obj, dict):
        raise CheckpointError(f"P-tuning checkpoint {path}: not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The prefix-encoder tensors (keys after ``transformer.prefix_encoder.``) and config.json."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"--ptuning-checkpoint {d}: no such directory")
    files = [d / f for f in FILES if (d / f).is_file()]
    if not files:
        raise CheckpointError(
            f"P-tuning checkpoint {d}: no {' or '.join(FILES)} (as ptuning/main.py saves it)"
        )
    raw = _read_tensors(files[0])
    enc = {k.split(KEY, 1)[1]: v for k, v in raw.items() if KEY in k}
    if not enc:
        kind = "a LoRA checkpoint" if any("lora_" in k for k in raw) else (
            "a full model checkpoint" if any("layers." in k for k in raw) else "no prefix encoder")
        raise CheckpointError(
            f"P-tuning checkpoint {d}: {kind} ({files[0].name} has no {KEY}* tensors)")
    cfg: dict[str, Any] = {}
    if (d / "config.json").is_file():
        try:
            cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"P-tuning checkpoint {d}: bad config.json ({e})") from None
    return enc, cfg


def load_prefix(directory: str | Path, module_name: str, model_cfg: Any) -> Prefix:
    """Read, check against the base model and compute the prefix keys/values (fp32, CPU)."""
    d = Path(directory).expanduser()
    if module_name not in SUPPORTED:
        fam = module_name.rsplit(".", 1)[-1]
        raise UnsupportedCheckpointError(
            f"P-tuning prefixes are supported for ChatGLM-6B and ChatGLM2-6B only, not {fam}")
    enc, cfg = read_checkpoint(d)
    dims = dims_of(module_name, model_cfg)
    glm2, layers, hidden, kv_size = dims.glm2, dims.layers, dims.hidden, dims.kv_size
    emb = enc.get("embedding.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"P-tuning checkpoint {d}: no 2-D prefix_encoder.embedding.weight")
    projection = "trans.0.weight" in enc
    p, width = emb.shape
    want = {"embedding.weight": (p, hidden if projection else kv_size)}
    if projection:
        want.update({"trans.0.weight": (hidden, hidden), "trans.0.bias": (hidden,),
                     "trans.2.weight": (kv_size, hidden), "trans.2.bias": (kv_size,)})
    base = SUPPORTED[module_name]
    for key, shape in want.items():
        got = tuple(enc[key].shape) if key in enc else None
        if got != shape:
            other = _guess_family(width if key == "embedding.weight" else 0, model_cfg, glm2)
            hint = f" (it looks made for {other})" if other else ""
            raise CheckpointError(
                f"P-tuning checkpoint {d}: {KEY}{key} is {list(got) if got else 'missing'}, "
                f"the {base} base ({layers} layers, hidden {hidden}) needs {list(shape)}{hint}")
    extra = sorted(set(enc) - set(want))
    if extra:
        raise CheckpointError(f"P-tuning checkpoint {d}: unexpected {KEY}{extra[0]}")
    if cfg.get("pre_seq_len") not in (None, p):
        raise CheckpointError(
            f"P-tuning checkpoint {d}: config.json pre_seq_len {cfg['pre_seq_len']} but the "
            f"prefix has {p} rows")
    if "prefix_projection" in cfg and bool(cfg["prefix_projection"]) != projection:
        raise CheckpointError(
            f"P-tuning checkpoint {d}: config.json prefix_projection "
            f"{cfg['prefix_projection']} but the tensors say {projection}")
    for k in ("num_layers", "hidden_size"):
        if k in cfg and cfg[k] != getattr(model_cfg, k):
            raise CheckpointError(
                f"P-tuning checkpoint {d}: config.json {k} {cfg[k]} differs from the "
                f"{base} base ({getattr(model_cfg, k)})")
    encoder = PrefixEncoder(p, kv_size, hidden, projection)
    encoder.load_state_dict({k: v.float() for k, v in enc.items()}, strict=True)
    k, v = prefix_kv(encoder, layers, dims.kv_heads, dims.head_dim)
    return Prefix(str(d), p, projection, k, v)


def _guess_family(width: int, cfg: Any, glm2: bool) -> str | None:
    """Which base a prefix embedding width fits: the other ChatGLM family's 6B layout."""
    if not width:
        return None
    if glm2 and width == cfg.num_layers * 2 * cfg.num_heads * cfg.kv_channels:
        return "ChatGLM-6B"
    if not glm2 and width == 28 * 2 * 2 * 128:
        return "ChatGLM2-6B"
    return None
