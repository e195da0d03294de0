"""VisualGLM-6B: prompt ids, preprocessing, the vision tower, the image splice, chat, bad images."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llmchat import images
from llmchat.errors import ImageError, UnsupportedCheckpointError
from llmchat.models import blip2, chatglm, visualglm
from llmchat.tokenizers import chatglm as glm_text
from llmchat.types import GenerationConfig, Message
from tests.checkpoints import REPO, shared, upstream_config
from tests.ckpt_visualglm import visualglm_checkpoint, visualglm_config

GREEDY = GenerationConfig(temperature=0, max_new_tokens=6, max_length=512)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and far faster when the cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return visualglm_checkpoint(tmp_path_factory.mktemp("vg") / "visualglm-6b", dtype=torch.float32)


@pytest.fixture(scope="module")
def vg(vg_dir: Path) -> visualglm.VisualGLMChatModel:
    from llmchat.loader import load

    model = load(model_path=vg_dir, device="cpu", dtype="float32")
    assert isinstance(model, visualglm.VisualGLMChatModel)
    return model


@pytest.fixture(scope="module")
def tok() -> glm_text.ChatGLMTokenizer:
    return chatglm.load_tokenizer(shared("tokenizers/chatglm-6b"))


def noise_image(path: Path, size: tuple[int, int] = (60, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# -- prompt --------------------------------------------------------------------------------------
def test_prompt_ids_match_reference_vectors(tok: glm_text.ChatGLMTokenizer) -> None:
    msgs = [Message("user", "描述这张图片。", "pic.png")]
    ids, start = visualglm.encode_with_image(tok, msgs)
    # REFERENCE.md §6: encode("<img>") + 32 x unk + encode("</img>问：…答：") + [gMASK, sop]
    tail = [98, 2265, 33, 64286, 12, 67194, 74366, 65842, 63823, 4, 67342, 12]
    assert ids == [46, 2265, 33] + [0] * 32 + tail + [130001, 130004]
    assert len(ids) == 49 and start == 3
    assert visualglm.encode_messages(tok, msgs) == ids


def test_prompt_text_multi_turn_and_fallback(tok: glm_text.ChatGLMTokenizer) -> None:
    turns = [Message("user", "q1", "a.png"), Message("assistant", "r1"), Message("user", "q2")]
    assert visualglm.build_prompt(turns) == "<img></img>问：q1\n答：r1\n问：q2\n答："
    text_only = [Message("user", "q1"), Message("assistant", "r1"), Message("user", "q2")]
    assert visualglm.build_prompt(text_only) == "问：q1\n答：r1\n问：q2\n答："
    ids, start = visualglm.encode_with_image(tok, text_only)
    assert start is None  # upstream falls back to tokenizer([prompt]) in one piece
    assert ids == [*tok.encode("问：q1\n答：r1\n问：q2\n答："), 130001, 130004]


def test_conversation_image_is_the_latest_and_keeps_history() -> None:
    msgs = [Message("user", "q1", "a.png"), Message("assistant", "r1"),
            Message("user", "q2", "b.png")]
    assert visualglm.conversation_image(msgs) == "b.png"
    assert visualglm.conversation_image(msgs[:1]) == "a.png"
    assert visualglm.build_prompt(msgs).startswith("<img></img>问：q1\n答：r1\n问：q2")
    assert visualglm.conversation_image([Message("user", "q")]) is None


def test_user_text_never_moves_the_image_slot(tok: glm_text.ChatGLMTokenizer) -> None:
    msgs = [Message("user", "what is <img>x.png</img>?", "a.png")]
    ids, start = visualglm.encode_with_image(tok, msgs)
    assert start == 3 and ids[3:35] == [0] * 32 and 0 not in ids[35:]


# -- config and keys ----------------------------------------------------------------------------
def test_config_from_upstream_file() -> None:
    cfg = visualglm.Config.from_hf(upstream_config("visualglm-6b"))
    assert (cfg.hidden_size, cfg.num_layers, cfg.image_length) == (4096, 28, 32)
    assert cfg.eva == blip2.EvaConfig()  # 39 x 1408, 16 heads, 224 px, patch 14
    assert cfg.eva.seq_len == 257
    assert cfg.qformer.is_decoder == (True, False) * 6
    assert (cfg.qformer.hidden_size, cfg.qformer.inner_hidden_size, cfg.qformer.eps) == (
        768, 3072, 1e-12)


def test_module_names_equal_every_upstream_key() -> None:
    hf = upstream_config("visualglm-6b")
    index = json.loads(shared("configs-upstream/visualglm-6b/pytorch_model.bin.index.json")
                       .read_text())["weight_map"]
    with torch.device("meta"):
        model = visualglm.Model(visualglm.Config.from_hf(hf))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    loaded = {visualglm.checkpoint_key(k) for k in index} - {None}
    assert loaded == set(shapes)
    assert visualglm.checkpoint_key("lm_head.weight") is None
    assert shapes["image_encoder.vit.transformer.position_embeddings.weight"] == (257, 1408)
    assert shapes["image_encoder.qformer.transformer.layers.2.cross_attention.key_value.weight"] \
        == (1536, 1408)
    assert shapes["image_encoder.glm_proj.weight"] == (4096, 768)
    assert not list(model.buffers())


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("eva_config"), "eva_config"),
    (lambda c: c.update(image_length=16), "image_length"),
    (lambda c: c["eva_config"].update(layernorm_order="post"), "layernorm_order"),
    (lambda c: c["qformer_config"].update(is_decoder=[True]), "is_decoder"),
    (lambda c: c["qformer_config"].pop("hidden_size"), "incomplete"),
])
def test_config_rejects_what_it_does_not_implement(change, match) -> None:  # type: ignore[no-untyped-def]
    hf = visualglm_config()
    change(hf)
    with pytest.raises(UnsupportedCheckpointError, match=match):
        visualglm.Config.from_hf(hf)


def test_quant_leaves_the_vision_tower_alone(vg_dir: Path, tmp_path: Path) -> None:
    from llmchat.loader import load

    QuantizedLinear = pytest.importorskip("llmchat.quant").QuantizedLinear  # noqa: N806
    # the vision tower's linears end in the same suffixes as the LM's; quant_skip keeps them
    assert visualglm.quant_skip("image_encoder.vit.transformer.layers.0.attention.query_key_value")
    assert not visualglm.quant_skip("transformer.layers.0.attention.query_key_value")
    model = load(model_path=vg_dir, device="cpu", dtype="bfloat16", quant=8)
    net = model.model
    quantized = [n for n, m in net.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * 2 and all(n.startswith("transformer.layers.") for n in quantized)
    vision = [m for n, m in net.named_modules() if n.startswith("image_encoder.")]
    assert not any(isinstance(m, QuantizedLinear) for m in vision)
    assert net.image_encoder.glm_proj.weight.dtype == torch.bfloat16
    msgs = [Message("user", "这张图片里有什么？", str(noise_image(tmp_path / "q.png")))]
    assert model.chat(msgs, GREEDY).strip()  # bf16 + int8 end to end, image included


# -- preprocessing -------------------------------------------------------------------------------
def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)  # Pillow's bicubic kernel (a = -0.5)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a bicubic resize, the kernel widened when shrinking (antialias)
    and cut at the borders then renormalised, as Pillow's resampler does."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        c = (o + 0.5) * scale
        lo, hi = max(int(c - 2 * widen + 0.5), 0), min(int(c + 2 * widen + 0.5), n_in)
        k = _cubic((np.arange(lo, hi) - c + 0.5) / widen)
        w[o, lo:hi] = k / k.sum()
    return w


def reference_preprocess(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resize (rows after columns, 8-bit in between), ToTensor, Normalize; (H, W, 3)."""
    t = np.einsum("ow,hwc->hoc", _resample(rgb.shape[1], w), rgb.astype(np.float64))
    t = np.einsum("oh,hwc->owc", _resample(rgb.shape[0], h), np.clip(np.rint(t), 0, 255))
    x = np.clip(np.rint(t), 0, 255) / 255
    return (x - np.array(blip2.CLIP_MEAN)) / np.array(blip2.CLIP_STD)


@pytest.mark.parametrize("src, size", [((61, 37), (224, 224)), ((500, 300), (224, 224)),
                                       ((61, 37), (28, 40))])
def test_preprocess_matches_an_independent_computation(tmp_path: Path, src, size) -> None:  # type: ignore[no-untyped-def]
    img = Image.open(noise_image(tmp_path / "n.png", src))
    got = blip2.preprocess(img, size)
    assert got.shape == (1, 3, *size) and got.dtype == torch.float32
    ref = reference_preprocess(np.asarray(img), *size)
    diff = np.abs(got[0].permute(1, 2, 0).numpy() - ref)
    # Pillow's fixed-point arithmetic may round a pixel one level the other way
    one_level = 1 / 255 / min(blip2.CLIP_STD) + 1e-6
    assert diff.max() <= one_level and (diff > 1e-5).mean() < 1e-3


def test_preprocess_uses_the_vit_image_size_and_rgb() -> None:
    grey = Image.fromarray(np.full((10, 20), 128, dtype=np.uint8), "L")
    x = blip2.preprocess(grey, (28, 28))
    assert x.shape == (1, 3, 28, 28)
    want = (128 / 255 - np.array(blip2.CLIP_MEAN)) / np.array(blip2.CLIP_STD)
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), want, atol=1e-6)


# -- vision tower ----------------------------------------------------------------------------------
def test_vision_tower_shapes(vg: visualglm.VisualGLMChatModel) -> None:
    enc = vg.model.image_encoder
    pixels = torch.randn(2, 3, 28, 28)
    vit = enc.vit(pixels)
    assert vit.shape == (2, 5, 48)  # cls + 2x2 patches, ViT width
    assert enc.qformer(vit).shape == (2, 32, 32)  # 32 queries, Q-Former width
    assert vg.model.encode_image(pixels).shape == (2, 32, 32)  # LM width
    # ln_vision covers every token, cls included: zero mean per token before its affine
    ln = enc.vit.mixins["cls"].ln_vision
    assert ln.eps == 1e-5
    norm = (vit - ln.bias) / ln.weight
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_vision_tower_matches_transformers_blip2() -> None:
    """Oracle: transformers' BLIP-2 ViT and Q-Former with the sat weights mapped onto them."""
    tr = pytest.importorskip("transformers")
    cfg = visualglm.Config.from_hf(visualglm_config())
    torch.manual_seed(0)
    enc = blip2.BLIP2(cfg.eva, cfg.qformer, cfg.hidden_size)
    for name, p in enc.named_parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    sd = dict(enc.state_dict())
    e, q = cfg.eva, cfg.qformer

    vit = tr.Blip2VisionModel(tr.Blip2VisionConfig(
        hidden_size=e.hidden_size, intermediate_size=e.inner_hidden_size,
        num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads,
        image_size=e.image_size[0], patch_size=e.patch_size, layer_norm_eps=e.eps,
        hidden_act="gelu")).eval()
    v = {"embeddings.class_embedding": sd["vit.transformer.word_embeddings.weight"][None],
         "embeddings.position_embedding": sd["vit.transformer.position_embeddings.weight"][None],
         "embeddings.patch_embedding.weight": sd["vit.mixins.patch_embedding.proj.weight"],
         "embeddings.patch_embedding.bias": sd["vit.mixins.patch_embedding.proj.bias"],
         "post_layernorm.weight": torch.ones(e.hidden_size),
         "post_layernorm.bias": torch.zeros(e.hidden_size)}
    names = {"self_attn.qkv": "attention.query_key_value",
             "self_attn.projection": "attention.dense",
             "layer_norm1": "input_layernorm", "layer_norm2": "post_attention_layernorm",
             "mlp.fc1": "mlp.dense_h_to_4h", "mlp.fc2": "mlp.dense_4h_to_h"}
    for i in range(e.num_layers):
        for hf_name, ours in names.items():
            for w in ("weight", "bias"):
                v[f"encoder.layers.{i}.{hf_name}.{w}"] = \
                    sd[f"vit.transformer.layers.{i}.{ours}.{w}"]
    vit.load_state_dict(v)

    qf = tr.Blip2QFormerModel(tr.Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads, intermediate_size=q.inner_hidden_size,
        encoder_hidden_size=q.cross_hidden_size, cross_attention_frequency=2,
        layer_norm_eps=q.eps, hidden_act="gelu")).eval()
    p = "qformer.transformer."
    # sat's "post" LayerNorms sit one step earlier than BERT's: layer i's input_layernorm is
    # BERT's embedding LayerNorm (i = 0) or layer i-1's output LayerNorm.
    s = {"layernorm.weight": sd[p + "layers.0.input_layernorm.weight"],
         "layernorm.bias": sd[p + "layers.0.input_layernorm.bias"]}
    for i in range(q.num_layers):
        lp, hp = f"{p}layers.{i}.", f"encoder.layer.{i}."
        last = i + 1 == q.num_layers
        nxt = f"{p}final_layernorm" if last else f"{p}layers.{i + 1}.input_layernorm"
        for w in ("weight", "bias"):
            for name, t in zip(("query", "key", "value"),
                               sd[f"{lp}attention.query_key_value.{w}"].chunk(3), strict=True):
                s[f"{hp}attention.attention.{name}.{w}"] = t
            s[f"{hp}attention.output.dense.{w}"] = sd[f"{lp}attention.dense.{w}"]
            s[f"{hp}attention.output.LayerNorm.{w}"] = sd[f"{lp}post_attention_layernorm.{w}"]
            s[f"{hp}intermediate_query.dense.{w}"] = sd[f"{lp}mlp.dense_h_to_4h.{w}"]
            s[f"{hp}output_query.dense.{w}"] = sd[f"{lp}mlp.dense_4h_to_h.{w}"]
            s[f"{hp}output_query.LayerNorm.{w}"] = sd[f"{nxt}.{w}"]
            if q.is_decoder[i]:
                s[f"{hp}crossattention.attention.query.{w}"] = sd[f"{lp}cross_attention.query.{w}"]
                k, val = sd[f"{lp}cross_attention.key_value.{w}"].chunk(2)
                s[f"{hp}crossattention.attention.key.{w}"] = k
                s[f"{hp}crossattention.attention.value.{w}"] = val
                s[f"{hp}crossattention.output.dense.{w}"] = sd[f"{lp}cross_attention.dense.{w}"]
                s[f"{hp}crossattention.output.LayerNorm.{w}"] = \
                    sd[f"{lp}post_cross_attention_layernorm.{w}"]
    missing, unexpected = qf.load_state_dict(s, strict=False)
    assert not unexpected and all(".intermediate." in k or ".output." in k for k in missing)

    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours_vit = enc.vit(pixels)
        hf_hidden = vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        ln = enc.vit.mixins["cls"].ln_vision
        torch.testing.assert_close(ours_vit, ln(hf_hidden), atol=1e-5, rtol=1e-5)
        queries = sd[p + "word_embeddings.weight"][None].expand(2, -1, -1)
        hf_q = qf(query_embeds=queries, encoder_hidden_states=ours_vit).last_hidden_state
        torch.testing.assert_close(enc.qformer(ours_vit), hf_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc(pixels), enc.glm_proj(hf_q), atol=1e-5, rtol=1e-5)


# -- the splice ----------------------------------------------------------------------------------
def test_image_embeddings_replace_the_placeholders(vg: visualglm.VisualGLMChatModel,
                                                    tmp_path: Path) -> None:
    msgs = [Message("user", "描述这张图片。", str(noise_image(tmp_path / "a.png")))]
    ids, start = visualglm.encode_with_image(vg.tokenizer, msgs)
    x = torch.tensor([ids])
    img = torch.randn(1, 32, 32)
    emb = vg.model.embed(x, img, start)
    plain = vg.model.transformer.word_embeddings(x)
    assert torch.equal(emb[0, 3:35], img[0])
    assert torch.equal(emb[0, :3], plain[0, :3]) and torch.equal(emb[0, 35:], plain[0, 35:])


def test_image_sits_in_the_bidirectional_prefix(vg: visualglm.VisualGLMChatModel,
                                                 tmp_path: Path) -> None:
    a, b = noise_image(tmp_path / "a.png", seed=1), noise_image(tmp_path / "b.png", seed=2)
    out = []
    for path in (a, b):
        msgs = [Message("user", "描述这张图片。", str(path))]
        ids, start = visualglm.encode_with_image(vg.tokenizer, msgs)
        x = torch.tensor([ids])
        with torch.inference_mode():
            emb = vg.model.embed(x, vg.image_embeds(str(path)), start)
            out.append(vg.model(x, input_embeds=emb))
    # position 0 comes before the image: it only sees the image through the prefix-LM mask
    assert not torch.allclose(out[0][0, 0], out[1][0, 0], atol=1e-4)


def test_cached_decode_equals_uncached_with_an_image(vg: visualglm.VisualGLMChatModel,
                                                      tmp_path: Path) -> None:
    msgs = [Message("user", "描述这张图片。", str(noise_image(tmp_path / "c.png")))]
    ids, start = visualglm.encode_with_image(vg.tokenizer, msgs)
    model = vg.model
    cache = model.make_cache(128, dtype=torch.float32, device="cpu")
    seq = list(ids)
    with torch.inference_mode():
        img = vg.image_embeds(msgs[0].image or "")
        x = torch.tensor([seq])
        logits = model(x, cache, input_embeds=model.embed(x, img, start))[0, -1]
        for _ in range(5):
            token = int(logits.argmax())
            seq.append(token)
            full_ids = torch.tensor([seq])
            full = model(full_ids, input_embeds=model.embed(full_ids, img, start))[0, -1]
            logits = model(torch.tensor([[token]]), cache)[0, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


# -- chat through the loader ---------------------------------------------------------------------
def manual_greedy(vg: visualglm.VisualGLMChatModel, msgs: list[Message], n: int) -> str:
    """Independent reference: uncached full forwards, the image spliced every time."""
    ids, start = visualglm.encode_with_image(vg.tokenizer, msgs)
    img = vg.image_embeds(visualglm.conversation_image(msgs) or "") if start is not None else None
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor([seq])
            logits = vg.model(x, input_embeds=vg.model.embed(x, img, start or 0))[0, -1]
            token = int(logits.argmax())
            if token == vg.tokenizer.eos_id:
                break
            seq.append(token)
    return chatglm.postprocess(vg.tokenizer.decode(seq[len(ids):]))


def test_chat_one_shot_and_multi_turn(vg: visualglm.VisualGLMChatModel, tmp_path: Path) -> None:
    pic, other = noise_image(tmp_path / "p.png", seed=3), noise_image(tmp_path / "q.png", seed=4)
    first = [Message("user", "这张图片里有什么？", str(pic))]
    out = vg.generate(first, GREEDY).consume()
    reply = out.text
    assert reply and reply == manual_greedy(vg, first, 6)
    assert out.stats.prompt_tokens == len(vg.encode(first))

    second = [*first, Message("assistant", reply), Message("user", "颜色呢？")]
    reply2 = vg.chat(second, GREEDY)
    assert reply2 == manual_greedy(vg, second, 6)

    # switching the image keeps the text history and changes what the model sees
    switched = [*first, Message("assistant", reply), Message("user", "颜色呢？", str(other))]
    assert vg.encode(switched) == vg.encode(second)
    assert vg.chat(switched, GREEDY) == manual_greedy(vg, switched, 6)
    assert not torch.equal(vg.image_embeds(str(pic)), vg.image_embeds(str(other)))

    # without an image: the text fallback, still the VisualGLM template
    text = [Message("user", "你好")]
    assert vg.chat(text, GREEDY) == manual_greedy(vg, text, 6)


def test_upstream_min_length_does_not_trip_the_nan_guard(vg: visualglm.VisualGLMChatModel,
                                                         tmp_path: Path) -> None:
    msgs = [Message("user", "这张图片里有什么？", str(noise_image(tmp_path / "m.png", seed=8)))]
    preset = vg.defaults.with_(temperature=0, max_new_tokens=5)
    assert preset.min_length == 100 and preset.repetition_penalty == 1.2
    reply = vg.chat(msgs, preset)
    # <eop> is banned (-inf) until 100 tokens; a nan/inf guard would then emit id 5 ("▁") only
    assert reply.strip() and reply == vg.chat(msgs, preset.with_(min_length=0))


def test_bad_image_fails_before_generation(vg: visualglm.VisualGLMChatModel,
                                           tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not an image"):
        vg.chat([Message("user", "hi", str(tmp_path / "x.jpg"))], GREEDY)


# -- bad images -----------------------------------------------------------------------------------
def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (no pixel data needed to trip the guard)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def truncated(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.png", "image not found"),
    (lambda d: d, "is a directory"),
    (lambda d: (d / "a.txt").write_text("hello") and d / "a.txt", "not an image"),
    (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "not an image"),
    (lambda d: truncated(d / "t.png", "PNG"), "truncated or corrupt"),
    (lambda d: truncated(d / "t.jpg", "JPEG"), "truncated or corrupt"),
    (lambda d: png_header_only(d / "big.png", 9000, 9000), r"9000x9000 pixels .*limit"),
    (lambda d: png_header_only(d / "big2.png", 12000, 12000), r"12000x12000 pixels .*limit"),
    (lambda d: "/dev/null", "not a regular file"),
    (lambda d: png_header_only(d / "bomb.png", 30000, 30000), "too large"),
    (lambda d: "https://example.com/cat.jpg", "URLs are not fetched"),
])
def test_bad_images_get_one_clear_line(tmp_path: Path, make, match) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(ImageError, match=match) as info:
        images.check_image(path)
    assert "\n" not in str(info.value)


def test_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    info = images.check_image(tmp_path / "a.gif")
    assert info.frames == 3 and any("first frame" in n for n in info.notes)
    assert images.load_image(tmp_path / "a.gif").getpixel((8, 8)) == (255, 0, 0)


def test_mode_conversions_are_documented_and_as_upstream(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img, info = images.open_image(tmp_path / "rgba.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgba[..., :3])  # alpha dropped
    assert any("transparency" in n for n in info.notes)

    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    img, info = images.open_image(tmp_path / "cmyk.jpg")
    assert img.mode == "RGB" and any("CMYK" in n for n in info.notes)
    assert img.getpixel((4, 4))[1] < 30 and img.getpixel((4, 4))[0] > 200  # magenta-ish

    for mode in ("L", "P", "1", "LA"):
        Image.new(mode, (8, 8)).save(tmp_path / f"m{mode}.png")
        assert images.load_image(tmp_path / f"m{mode}.png").mode == "RGB"

    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    img, info = images.open_image(tmp_path / "g16.png")
    got = np.asarray(img)[..., 0].astype(int)
    np.testing.assert_allclose(got, np.rint(grey16 / 257.0), atol=1)  # scaled, not clipped
    assert any("8 bits" in n for n in info.notes)


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_image_one_shot(vg_dir: Path, tmp_path: Path) -> None:
    pic = noise_image(tmp_path / "pic.png", seed=7)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmchat", "image", str(pic), "这张图片里有什么？",
           "--model-path", str(vg_dir), "--device", "cpu", "--dtype", "float32",
           "--temperature", "0", "--max-new-tokens", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_cli_image_bad_file_is_one_line(vg_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmchat.cli import app

    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    for bad, match in ((tmp_path / "nope.png", "image not found"),
                       (tmp_path / "x.png", "not an image")):
        res = CliRunner().invoke(app, ["image", str(bad), "q", "--model-path", str(vg_dir),
                                       "--device", "cpu"])
        assert res.exit_code != 0 and not isinstance(res.exception, ImageError)
        assert re.search(match, " ".join(res.output.split()))
        assert "Traceback" not in res.output


def test_repl_image_switch_keeps_text_history(vg: visualglm.VisualGLMChatModel,
                                              tmp_path: Path) -> None:
    """The REPL on the real tiny VisualGLM: /image attaches, a second /image switches, and the
    model sees the whole text history with the newest image."""
    import io

    from rich.console import Console

    from llmchat.repl import run_repl

    pic, other = noise_image(tmp_path / "p.png", seed=5), noise_image(tmp_path / "q.png", seed=6)
    lines = iter([f"/image {pic}", "这是什么？", f"/image {other}", "换了一张呢？"])
    seen: list[list[Message]] = []
    real = vg.generate

    def spy(messages, config):  # type: ignore[no-untyped-def]
        seen.append(list(messages))
        return real(messages, config)

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    vg.generate = spy  # type: ignore[method-assign]
    try:
        code = run_repl(vg, GREEDY, read=read, console=Console(file=io.StringIO(), width=100),
                        history_file=tmp_path / "history")
    finally:
        del vg.generate
    assert code == 0 and len(seen) == 2
    first, second = seen
    assert [m.image for m in first if m.role == "user"] == [str(pic.resolve())]
    assert [(m.role, m.content) for m in second[:2]] == [("user", "这是什么？"),
                                                       ("assistant", vg.chat(first, GREEDY))]
    assert second[-1].content == "换了一张呢？" and second[-1].image == str(other.resolve())
    assert vg.chat(second, GREEDY) == manual_greedy(vg, second, 6)
