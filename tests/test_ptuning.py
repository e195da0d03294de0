"""P-tuning v2 prefixes (llmchat.ptuning, REFERENCE.md §2.8 / §3.7)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmchat.errors import LLMChatError
from llmchat.models import chatglm2
from llmchat.ptuning import PrefixEncoder, load_prefix, prefix_kv
from tests.checkpoints import REPO, shared
from tests.models.test_chatglm import GOLDEN_CFG
from tests.models.test_chatglm import Model as GLMModel


# -- ChatGLM-6B against the upstream reference tensors -----------------------------------------
def load_golden_ptuning():
    raw = shared("golden/chatglm.cpp/glm_ptuning_v2_model.data").read_bytes()
    model = GLMModel(GOLDEN_CFG).eval()
    offset = 0

    def take(shape, dtype=np.float32):
        nonlocal offset
        n = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype=dtype, count=n, offset=offset).reshape(shape)
        offset += n * 4
        return torch.from_numpy(arr.copy())

    # chatglm.cpp stores the converted prefix cache in fp16: 5 x 1 layer x 2 x 8 heads x 4 values
    prefix = torch.from_numpy(np.frombuffer(raw, np.float16, count=320).astype(np.float32))
    offset = 640
    names = ["input_layernorm.weight", "input_layernorm.bias",
             "attention.query_key_value.weight", "attention.query_key_value.bias",
             "attention.dense.weight", "attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
             "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
    order = ["transformer.word_embeddings.weight",
             *(f"transformer.layers.0.{n}" for n in names),
             "transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: take(shapes[k]) for k in order}, strict=True)
    steps = []
    for t in (3, 1, 1):
        x = take((1, t), np.int32).long()
        steps.append((x, take((1, t, 32))))
    assert offset == len(raw)
    return model, prefix, steps


LAYOUTS = {
    # (layers*2, heads, P, D), chatglm.cpp's converted layout
    "kv-h-p-d": lambda x: x.reshape(2, 8, 5, 4),
    # (layers*2, P, heads, D)
    "kv-p-h-d": lambda x: x.reshape(2, 5, 8, 4).transpose(1, 2),
}


def golden_prefix_kv(prefix: torch.Tensor, layout: str):
    if layout == "encoder":  # rows are the prefix-encoder output: upstream get_prompt's view
        enc = PrefixEncoder(5, 64, 32, projection=False)
        enc.embedding.weight.data.copy_(prefix.reshape(5, 64))
        return prefix_kv(enc, 1, 8, 4)
    kv = LAYOUTS[layout](prefix)
    return kv[0::2], kv[1::2]


def run_golden(model, k, v, steps, prefix=5):
    captured = []
    model.transformer.final_layernorm.register_forward_hook(lambda m, a, out: captured.append(out))
    cache = model.make_cache(16, dtype=torch.float32, device="cpu")
    cache.set_prefix(k, v)
    with torch.no_grad():
        for x, _ in steps:
            model(x, cache)
    assert cache.offset == prefix + 5
    return captured


def test_chatglm_prefix_matches_upstream_reference_tensors() -> None:
    model, prefix, steps = load_golden_ptuning()
    errs = {}
    for layout in ("encoder", *LAYOUTS):
        k, v = golden_prefix_kv(prefix, layout)
        out = run_golden(load_golden_ptuning()[0], k, v, steps)
        errs[layout] = max((o - w).abs().max().item() for o, (_, w) in zip(out, steps, strict=True))
    best = min(errs, key=errs.get)
    assert errs[best] < 1e-5, errs
    print(errs)
    assert best == "kv-h-p-d"  # the layout prefix_kv produces (then converted to the cache)
    # the encoder path: the same numbers as upstream get_prompt's view of the encoder output
    k, v = golden_prefix_kv(prefix, best)
    enc = PrefixEncoder(5, 64, 32, projection=False)
    # invert prefix_kv: rows (P, layers*2*heads*D) in upstream's flat order ((l*2+kv)*H+h)*D+d
    enc.embedding.weight.data.copy_(torch.stack((k, v), 1).reshape(2, 8, 5, 4)
                                    .permute(2, 0, 1, 3).reshape(5, 64))
    k2, v2 = prefix_kv(enc, 1, 8, 4)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # and the prefix matters: without it the outputs differ
    plain = run_golden(load_golden_ptuning()[0], k[:, :, :0], v[:, :, :0], steps, prefix=0)
    assert (plain[0] - steps[0][1]).abs().max() > 1e-2


# -- ChatGLM2 against a plain reimplementation of the upstream math ----------------------------
def reference_glm2(model, ids, pk, pv):
    """Upstream ChatGLM2 with past_key_values = the prefix: per layer, written out plainly."""
    cfg = model.config
    tr = model.transformer
    h, g, d = cfg.num_heads, cfg.num_kv_groups, cfg.kv_channels
    t = ids.shape[1]
    p = pk.shape[2]

    def rms(x, w):
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps))

    rot = d // 2
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, rot, 2).float() / rot)
    ang = torch.arange(t).float()[:, None] * inv  # positions 0.. (not shifted by the prefix)

    def rope(x):  # (T, n, D): interleaved pairs in the first D/2 dims
        a, b = x[..., :rot:2], x[..., 1:rot:2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        out = torch.stack((a * c - b * s, b * c + a * s), -1).flatten(-2)
        return torch.cat((out, x[..., rot:]), -1)

    x = tr.embedding.word_embeddings.weight[ids[0]]
    allowed = torch.cat((torch.ones(t, p, dtype=torch.bool),
                         torch.ones(t, t, dtype=torch.bool).tril()), 1)
    for li, blk in enumerate(tr.encoder.layers):
        a = rms(x, blk.input_layernorm.weight)
        att = blk.self_attention
        qkv = a @ att.query_key_value.weight.T + att.query_key_value.bias
        q = rope(qkv[:, : h * d].view(t, h, d))
        k = rope(qkv[:, h * d: (h + g) * d].view(t, g, d))
        v = qkv[:, (h + g) * d:].view(t, g, d)
        k = torch.cat((pk[li].permute(1, 0, 2), k), 0)  # prefix keys: no rotary
        v = torch.cat((pv[li].permute(1, 0, 2), v), 0)
        outs = []
        for head in range(h):
            grp = head // (h // g)
            sc = q[:, head] @ k[:, grp].T / math.sqrt(d)
            sc = sc.masked_fill(~allowed, float("-inf"))
            outs.append(sc.softmax(-1) @ v[:, grp])
        x = x + torch.cat(outs, -1) @ att.dense.weight.T
        m = rms(x, blk.post_attention_layernorm.weight)
        gate, up = (m @ blk.mlp.dense_h_to_4h.weight.T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ blk.mlp.dense_4h_to_h.weight.T
    return rms(x, tr.encoder.final_layernorm.weight) @ tr.output_layer.weight.T


def glm2_random(seed=0):
    cfg = chatglm2.Config(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                          kv_channels=16, num_kv_groups=2, ffn_hidden_size=96)
    torch.manual_seed(seed)
    model = chatglm2.Model(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.copy_((1 + 0.1 * torch.randn_like(prm)) if "norm" in name
                      else 0.3 * torch.randn_like(prm))
    return model


@pytest.mark.parametrize("projection", [False, True])
def test_chatglm2_prefix_matches_reference(projection: bool) -> None:
    model = glm2_random()
    cfg = model.config
    kv = cfg.num_layers * 2 * cfg.num_kv_groups * cfg.kv_channels
    torch.manual_seed(1)
    enc = PrefixEncoder(6, kv, cfg.hidden_size, projection)
    with torch.no_grad():
        for prm in enc.parameters():
            prm.copy_(torch.randn_like(prm))
    pk, pv = prefix_kv(enc, cfg.num_layers, cfg.num_kv_groups, cfg.kv_channels)
    assert pk.shape == (2, 2, 6, 16)
    ids = torch.tensor([[5, 9, 3, 7, 11, 2, 8]])
    want = reference_glm2(model, ids, pk, pv)
    cache = model.make_cache(8, dtype=torch.float32, device="cpu")
    cache.limit = 64
    cache.set_prefix(pk, pv)
    with torch.no_grad():
        got = [model(ids[:, :4], cache)[0]]
        for i in range(4, 7):
            got.append(model(ids[:, i:i + 1], cache)[0])
        # the static (captured) decode step computes the same
        cache.reset()
        model(ids[:, :6], cache)
        cache.static, cache.pos = True, torch.tensor(cache.offset)
        static = model(ids[:, 6:7], cache)[0]
        cache.static = False
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static, want[6:], atol=1e-5, rtol=1e-5)
    assert (model(ids)[0] - want).abs().max() > 1e-3  # the prefix matters


# -- checkpoints and the command line ----------------------------------------------------------
def write_prefix(path: Path, width: int, *, p: int = 4, fmt: str = "bin", hidden: int = 64,
                 projection: bool = False, scale: float = 2.0, seed: int = 0,
                 keyprefix: str = "transformer.prefix_encoder.", config: dict | None = None
                 ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {"embedding.weight": scale * torch.randn(p, hidden if projection else width, generator=g)}
    if projection:
        sd.update({"trans.0.weight": torch.randn(hidden, hidden, generator=g) * 0.3,
                   "trans.0.bias": torch.zeros(hidden),
                   "trans.2.weight": torch.randn(width, hidden, generator=g) * scale,
                   "trans.2.bias": torch.zeros(width)})
    sd = {keyprefix + k: v for k, v in sd.items()}
    if fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path / "model.safetensors"))
    cfg = {"pre_seq_len": p, "prefix_projection": projection} if config is None else config
    (path / "config.json").write_text(json.dumps(cfg))
    return path


GLM2_W = 2 * 2 * 2 * 16  # tiny ChatGLM2: layers * 2 * groups * kv_channels
GLM_W = 2 * 2 * 64  # tiny ChatGLM-6B: layers * 2 * hidden
CPU = ["--device", "cpu", "--dtype", "float32"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]


def run_cli(args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llmchat", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tests.checkpoints import chatglm2_checkpoint
    from tests.ckpt_chatglm import chatglm_checkpoint

    root = tmp_path_factory.mktemp("pt")
    return {"glm2": chatglm2_checkpoint(root / "glm2"), "glm": chatglm_checkpoint(root / "glm"),
            "root": root}


def expected(model_dir, questions, prefix=None, quant=16):
    from llmchat.loader import load
    from llmchat.types import Message

    m = load(model_path=model_dir, device="cpu", dtype="float32", quant=quant, ptuning=prefix)
    cfg = m.defaults.with_(temperature=0, max_new_tokens=8)
    hist, out = [], []
    for q in questions:
        r = m.chat([*hist, Message("user", q)], cfg)
        hist += [Message("user", q), Message("assistant", r)]
        out.append(r)
    return out


@pytest.mark.parametrize("family,fmt,projection", [("glm2", "bin", False),
                                                   ("glm", "safetensors", True)])
def test_cli_chat_with_prefix(bases, family, fmt, projection) -> None:
    width = GLM2_W if family == "glm2" else GLM_W
    pre = write_prefix(bases["root"] / f"{family}-{fmt}", width, fmt=fmt, projection=projection)
    qs = ["你好", "what is 1+1?"]
    res = run_cli(["chat", "-p", str(bases[family]), *CPU, *GREEDY, "--ptuning-checkpoint",
                   str(pre), "--verbose"], stdin="\n".join(qs) + "\n")
    assert res.returncode == 0, res.stderr
    with_prefix = expected(bases[family], qs, pre)
    assert [line for line in res.stdout.split("\n") if line] == with_prefix  # -v: blank lines
    assert "prefix:" in res.stderr and str(pre) in res.stderr
    assert with_prefix != expected(bases[family], qs)  # the prefix changes the replies


def test_quant4_with_prefix(bases) -> None:
    pre = write_prefix(bases["root"] / "q4", GLM2_W)
    res = run_cli(["ask", "-p", str(bases["glm2"]), *CPU, *GREEDY, "--quant", "4",
                   "--ptuning-checkpoint", str(pre), "你好"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected(bases["glm2"], ["你好"], pre, quant=4)[0] + "\n"


def test_repl_prefix_switching(bases) -> None:
    from llmchat.loader import load
    from llmchat.types import Message

    a = write_prefix(bases["root"] / "sw-a", GLM2_W, seed=1)
    b = write_prefix(bases["root"] / "sw-b", GLM2_W, seed=2, fmt="safetensors")
    m = load(model_path=bases["glm2"], device="cpu", dtype="float32")
    cfg = m.defaults.with_(temperature=0, max_new_tokens=8)
    msgs = [Message("user", "你好")]
    plain = m.chat(msgs, cfg)
    m.set_prefix(str(a))
    ra = m.chat(msgs, cfg)
    assert m.info.extra["prefix"].startswith(str(a))
    m.set_prefix(str(b))
    rb = m.chat(msgs, cfg)
    m.set_prefix(None)
    assert "prefix" not in m.info.extra and m.chat(msgs, cfg) == plain
    assert len({plain, ra, rb}) == 3
    assert ra == expected(bases["glm2"], ["你好"], a)[0]


def test_repl_prefix_command(bases) -> None:
    from llmchat.loader import load
    from tests.test_repl import chat

    a = write_prefix(bases["root"] / "cmd-a", GLM2_W, seed=3)
    m = load(model_path=bases["glm2"], device="cpu", dtype="float32")
    code, out, _ = chat(m, ["/set max_new_tokens 4", f"/prefix {a}", "你好", "/show",
                            "/prefix nowhere", "/prefix off", "/prefix", "/exit"])
    assert code == 0
    assert f"P-tuning prefix: {a}" in out.replace("\n", "")
    assert "no such directory" in out and "No P-tuning prefix." in out
    assert m.prefix is None


@pytest.mark.parametrize("case,match", [
    ("missing", "no such directory"),
    ("empty", "no pytorch_model.bin or model.safetensors"),
    ("width", "needs"),
    ("family", "needs"),
    ("lora", "LoRA"),
    ("full", "full model"),
    ("pre_seq_len", "pre_seq_len"),
    ("projection", "prefix_projection"),
])
def test_bad_prefix_is_one_clear_error(bases, case, match) -> None:
    root = bases["root"] / f"bad-{case}"
    base = bases["glm2"]
    if case == "missing":
        pre = root
    elif case == "empty":
        root.mkdir()
        pre = root
    elif case == "width":
        pre = write_prefix(root, GLM2_W + 16)
    elif case == "family":  # a ChatGLM2 prefix on a ChatGLM-6B base
        pre, base = write_prefix(root, GLM2_W), bases["glm"]
    elif case in ("lora", "full"):
        root.mkdir()
        key = ("base_model.model.transformer.encoder.layers.0.lora_A.weight" if case == "lora"
               else "transformer.encoder.layers.0.input_layernorm.weight")
        torch.save({key: torch.zeros(4, 4)}, root / "pytorch_model.bin")
        pre = root
    elif case == "pre_seq_len":
        pre = write_prefix(root, GLM2_W, config={"pre_seq_len": 9})
    else:
        pre = write_prefix(root, GLM2_W, config={"pre_seq_len": 4, "prefix_projection": True})
    res = run_cli(["ask", "-p", str(base), *CPU, *GREEDY, "--ptuning-checkpoint", str(pre), "hi"])
    assert res.returncode != 0
    assert match in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_lightning_keys_and_unsupported_base(tmp_path) -> None:
    cfg = chatglm2.Config(num_layers=2, hidden_size=64, num_heads=4, kv_channels=16,
                          num_kv_groups=2, vocab_size=64, ffn_hidden_size=96)
    pre = write_prefix(tmp_path / "l", GLM2_W,
                       keyprefix="_forward_module._TransformerLightningModule__backbone."
                                 "transformer.prefix_encoder.")
    p = load_prefix(pre, "llmchat.models.chatglm2", cfg)
    assert p.k.shape == (2, 2, 4, 16)
    with pytest.raises(LLMChatError, match="ChatGLM-6B and ChatGLM2-6B only"):
        load_prefix(pre, "llmchat.models.qwen", cfg)
    with pytest.raises(LLMChatError, match="only"):
        load_prefix(pre, "llmchat.models.visualglm", cfg)


def test_kv_reuse_with_prefix_equals_fresh_prefill(bases, monkeypatch) -> None:
    """Multi-turn replies reuse the cached turns after the prefix; they equal fresh prefills."""
    qs = ["你好", "what is 1+1?", "再见"]
    pre = write_prefix(bases["root"] / "reuse", GLM2_W, seed=5)
    reused = expected(bases["glm2"], qs, pre)
    monkeypatch.setenv("LLMCHAT_KV_REUSE", "0")
    assert expected(bases["glm2"], qs, pre) == reused
