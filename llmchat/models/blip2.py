"""VisualGLM-6B's vision tower (BLIP-2: EVA ViT + Q-Former + ``glm_proj``), native PyTorch.

Pipeline (REFERENCE.md §5.1, upstream ``visual.py`` on the sat layer code):

1. ``preprocess``: RGB, resize to the ViT's image size with bicubic resampling, scale to [0, 1],
   normalise with the CLIP mean/std. Pillow's resize is what torchvision's ``Resize`` calls for
   PIL input, and the arithmetic follows ``ToTensor`` + ``Normalize`` in float32.
2. EVA ViT: a 14x14 patch conv, one learned cls embedding in front, learned positions, pre-LN
   blocks (exact GELU, contiguous ``[q | k | v]``), no final LayerNorm; then ``ln_vision``
   (``nn.LayerNorm`` default eps 1e-5) over all tokens.
3. Q-Former: the learned query embeddings go through sat's "post" layers: the residual is taken
   around the *normalised* input, and layers flagged ``is_decoder`` cross-attend into the ViT
   output; a final LayerNorm closes it. There are no position embeddings and no masks.
4. ``glm_proj``: Linear(Q-Former hidden -> LM hidden): (B, num_queries, hidden).

Module names equal the checkpoint keys below ``image_encoder.`` (sat names, e.g.
``vit.mixins.patch_embedding.proj``). Shapes: B batch, N tokens, M encoder tokens, H heads,
D head dim, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.errors import UnsupportedCheckpointError
from llmchat.models.layers import BIG, Range, check_values, require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _unsupported(what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"unsupported VisualGLM config: {what}")


def _check(d: dict[str, Any], ranges: dict[str, Range], where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in d:
            raise UnsupportedCheckpointError(
                f"VisualGLM config.json: {where} incomplete (no {key!r})"
            )
    check_values(d, ranges, "VisualGLM", f"{where}.")


@dataclass(frozen=True)
class EvaConfig:
    num_layers: int = 39
    hidden_size: int = 1408
    num_heads: int = 16
    inner_hidden_size: int = 6144
    vocab_size: int = 1  # rows of the cls embedding table
    eps: float = 1e-6
    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 14
    in_channels: int = 3

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def seq_len(self) -> int:
        """cls + patches: the rows of ``position_embeddings`` (sat derives it the same way)."""
        return 1 + self.grid[0] * self.grid[1]

    _RANGES: ClassVar[dict[str, Range]] = {
        "num_layers": (int, 1, 256), "hidden_size": (int, 1, 1 << 16),
        "num_attention_heads": (int, 1, 1024), "inner_hidden_size": (int, 1, BIG),
        "vocab_size": (int, 1, 1), "layernorm_epsilon": (float, 0.0, 1.0),
        "patch_size": (int, 1, 4096), "in_channels": (int, 1, 16),
    }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> EvaConfig:
        _check(d, cls._RANGES, "eva_config", ("num_layers", "hidden_size", "num_attention_heads"))
        if d.get("layernorm_order", "pre") != "pre":
            raise _unsupported("eva_config.layernorm_order must be 'pre'")
        if d.get("use_final_layernorm", False):
            raise _unsupported("eva_config.use_final_layernorm must be false")
        if d.get("pre_len", 1) != 1 or d.get("post_len", 0) != 0:
            raise _unsupported("eva_config needs pre_len 1 and post_len 0")
        size = d.get("image_size", [224, 224])
        size = (size, size) if isinstance(size, int) else tuple(size)
        require(len(size) == 2, "VisualGLM", f"eva_config.image_size is {size!r}: [height, width]")
        for side in size:
            check_values({"image_size": side}, {"image_size": (int, 1, 4096)}, "VisualGLM",
                         "eva_config.")
        cfg = cls(
            num_layers=d["num_layers"], hidden_size=d["hidden_size"],
            num_heads=d["num_attention_heads"],
            inner_hidden_size=d.get("inner_hidden_size") or 4 * d["hidden_size"],
            vocab_size=d.get("vocab_size", 1), eps=d.get("layernorm_epsilon", 1e-6),
            image_size=(int(size[0]), int(size[1])), patch_size=d.get("patch_size", 14),
            in_channels=d.get("in_channels", 3),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise _unsupported("eva_config hidden_size must be a multiple of the heads")
        if min(cfg.grid) < 1:
            raise _unsupported("eva_config image_size is smaller than one patch")
        return cfg


@dataclass(frozen=True)
class QFormerConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    num_queries: int = 32  # "vocab_size": the learned query embeddings
    inner_hidden_size: int = 3072
    eps: float = 1e-12
    is_decoder: tuple[bool, ...] = (True, False) * 6  # cross-attention on these layers
    cross_hidden_size: int = 1408  # width of the ViT output it attends into

    _RANGES: ClassVar[dict[str, Range]] = {
        "num_layers": (int, 1, 256), "hidden_size": (int, 1, 1 << 16),
        "num_attention_heads": (int, 1, 1024), "vocab_size": (int, 1, 4096),
        "inner_hidden_size": (int, 1, BIG), "layernorm_epsilon": (float, 0.0, 1.0),
        "cross_attn_hidden_size": (int, 1, 1 << 16),
    }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QFormerConfig:
        _check(d, cls._RANGES, "qformer_config",
               ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"))
        if d.get("layernorm_order", "post") != "post":
            raise _unsupported("qformer_config.layernorm_order must be 'post'")
        if not d.get("use_final_layernorm", True):
            raise _unsupported("qformer_config.use_final_layernorm must be true")
        n = d["num_layers"]
        flags = d.get("is_decoder", False)
        flags = tuple(bool(f) for f in flags) if isinstance(flags, list) else (bool(flags),) * n
        if len(flags) != n:
            raise _unsupported("qformer_config.is_decoder needs one flag per layer")
        cfg = cls(
            num_layers=n, hidden_size=d["hidden_size"], num_heads=d["num_attention_heads"],
            num_queries=d["vocab_size"],
            inner_hidden_size=d.get("inner_hidden_size") or 4 * d["hidden_size"],
            eps=d.get("layernorm_epsilon", 1e-12), is_decoder=flags,
            cross_hidden_size=d.get("cross_attn_hidden_size") or d["hidden_size"],
        )
        if cfg.hidden_size % cfg.num_heads:
            raise _unsupported("qformer_config hidden_size must be a multiple of the heads")
        return cfg


def preprocess(image: Any, size: tuple[int, int]) -> Tensor:
    """PIL image -> normalised float32 pixels (1, 3, H, W), as upstream's eval processor."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # (C, H, W)
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).unsqueeze(0)


def _heads(x: Tensor, h: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)  # (B, H, N, D)


def _merge(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, H*D)


class SelfAttention(nn.Module):
    """Full (unmasked) attention with a fused contiguous ``[q | k | v]`` projection."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.query_key_value(x).chunk(3, dim=-1))
        return self.dense(_merge(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from the Q-Former, contiguous ``[k | v]`` from the ViT output."""

    def __init__(self, hidden: int, enc_hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(enc_hidden, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, enc: Tensor) -> Tensor:
        q = _heads(self.query(x), self.heads)  # (B, H, N, D)
        k, v = (_heads(t, self.heads) for t in self.key_value(enc).chunk(2, dim=-1))  # (B,H,M,D)
        return self.dense(_merge(F.scaled_dot_product_attention(q, k, v)))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, inner)
        self.dense_4h_to_h = nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU


class EvaBlock(nn.Module):
    """Pre-LN: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: EvaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg.hidden_size, cfg.inner_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class QFormerBlock(nn.Module):
    """sat "post" order: each residual adds to the LayerNorm'ed input, not the raw one."""

    def __init__(self, cfg: QFormerConfig, cross: bool) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = nn.LayerNorm(h, eps=cfg.eps)
        self.attention = SelfAttention(h, cfg.num_heads)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=cfg.eps)
        if cross:
            self.cross_attention = CrossAttention(h, cfg.cross_hidden_size, cfg.num_heads)
            self.post_cross_attention_layernorm = nn.LayerNorm(h, eps=cfg.eps)
        self.cross = cross
        self.mlp = MLP(h, cfg.inner_hidden_size)

    def forward(self, x: Tensor, enc: Tensor) -> Tensor:
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(a + self.attention(a))
        if self.cross:
            m = self.post_cross_attention_layernorm(m + self.cross_attention(m, enc))
        return m + self.mlp(m)


class Table(nn.Module):
    """A bare ``weight`` matrix under a sat name (cls token, positions, query embeddings)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: EvaConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)


class LNVision(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.ln_vision = nn.LayerNorm(hidden)  # nn.LayerNorm's default eps 1e-5, as upstream


class EvaTransformer(nn.Module):
    def __init__(self, cfg: EvaConfig) -> None:
        super().__init__()
        self.word_embeddings = Table(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Table(cfg.seq_len, cfg.hidden_size)
        self.layers = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.num_layers))


class EvaViT(nn.Module):
    def __init__(self, cfg: EvaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = EvaTransformer(cfg)
        self.mixins = nn.ModuleDict(
            {"patch_embedding": PatchEmbedding(cfg), "cls": LNVision(cfg.hidden_size)}
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1 + patches, hidden), after ``ln_vision``."""
        tr = self.transformer
        x = self.mixins["patch_embedding"].proj(pixels)  # (B, hidden, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, patches, hidden), row-major over the grid
        cls = tr.word_embeddings.weight[:1].expand(x.shape[0], 1, -1)  # input id 0
        x = torch.cat((cls, x), dim=1) + tr.position_embeddings.weight  # (B, N, hidden)
        for block in tr.layers:
            x = block(x)
        return self.mixins["cls"].ln_vision(x)


class QFormerTransformer(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = Table(cfg.num_queries, cfg.hidden_size)
        self.layers = nn.ModuleList(QFormerBlock(cfg, c) for c in cfg.is_decoder)
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.transformer = QFormerTransformer(cfg)

    def forward(self, enc: Tensor) -> Tensor:
        """ViT output (B, M, C) -> query states (B, num_queries, hidden)."""
        tr = self.transformer
        x = tr.word_embeddings.weight.expand(enc.shape[0], -1, -1)  # (B, Q, hidden)
        for block in tr.layers:
            x = block(x, enc)
        return tr.final_layernorm(x)


class BLIP2(nn.Module):
    """``image_encoder``: pixels (B, 3, H, W) -> LM input embeddings (B, num_queries, lm_hidden)."""

    def __init__(self, eva: EvaConfig, qformer: QFormerConfig, lm_hidden: int) -> None:
        super().__init__()
        if qformer.cross_hidden_size != eva.hidden_size:
            raise _unsupported("qformer cross_attn_hidden_size must equal the ViT hidden_size")
        self.vit = EvaViT(eva)
        self.qformer = QFormer(qformer)
        self.glm_proj = nn.Linear(qformer.hidden_size, lm_hidden)

    def forward(self, pixels: Tensor) -> Tensor:
        w = self.vit.mixins["patch_embedding"].proj.weight
        return self.glm_proj(self.qformer(self.vit(pixels.to(w.device, w.dtype))))
