"""Weight-only INT8/INT4: upstream layout bit for bit, kernels vs the reference, loading."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmchat import quant
from llmchat.errors import CheckpointError, QuantizationError, UsageError
from llmchat.loader import load
from llmchat.quant import (
    Backend,
    Dequant,
    Int4PackCPU,
    Int8PackMM,
    QuantizationWarning,
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    prepare_model,
    quantize_weight,
    select_backend,
    unpack_int4,
)
from llmchat.types import Message
from tests.checkpoints import (
    build_state_dict,
    chatglm2_checkpoint,
    chatglm2_config,
    dense_buffers,
)

GREEDY = {"temperature": 0, "max_new_tokens": 8}
CPU = torch.device("cpu")
LINEAR_SUFFIXES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


# -- an independent quantizer (the rule of REFERENCE.md §2.7 written out plainly) ------------------
def ref_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's op order in fp16; int4 packed byte by byte from the rule."""
    w16 = w.half()
    scale = (w16.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w16 / scale[:, None]).to(torch.int8)
    if bits == 8:
        return q, scale
    rows = []
    for row in q.tolist():
        # python ints: (negative << 4) | nibble is already the two's-complement int8 value
        rows.append([(row[2 * j] << 4) | (row[2 * j + 1] & 0xF) for j in range(len(row) // 2)])
    return torch.tensor(rows, dtype=torch.int8), scale


def prequantize(sd: dict[str, torch.Tensor], bits: int, suffixes: tuple[str, ...]
                ) -> dict[str, torch.Tensor]:
    """An fp16 state dict → upstream's pre-quantized layout (weight int8 + weight_scale fp16)."""
    out = {}
    for key, t in sd.items():
        owner = key.rpartition(".")[0]
        if key.endswith(".weight") and owner.endswith(suffixes) and ".layers." in key:
            out[key], out[owner + ".weight_scale"] = ref_quantize(t, bits)
        else:
            out[key] = t.half()
    return out


def layer(bits: int, k: int, n: int, *, dtype: torch.dtype, backend: Backend | None = None,
          bias: bool = True, seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor, torch.Tensor]:
    """A loaded QuantizedLinear, its float weight and bias (quantized on arrival)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g).half()
    backend = backend or select_backend(bits, k, n, CPU, dtype)
    mod = QuantizedLinear(k, n, bias, bits, prequantized=False, dtype=dtype, device=CPU,
                          backend=backend)
    mod.load_checkpoint_tensor("weight", w.half(), dtype=dtype, device=CPU, key="w")
    if bias:
        mod.load_checkpoint_tensor("bias", b, dtype=dtype, device=CPU, key="b")
    return mod, w, b


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, bits: int) -> torch.Tensor:
    q, s = ref_quantize(w, bits)
    return F.linear(x.float(), dequantize_weight(q, s, bits), None if b is None else b.float())


# -- layout ----------------------------------------------------------------------------------------
def test_pack_unpack_round_trip() -> None:
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 2)  # all 16 nibbles, both positions
    assert torch.equal(unpack_int4(pack_int4(every)), every)
    b = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).view(4, 64)  # every byte
    assert torch.equal(pack_int4(unpack_int4(b)), b)


def test_int4_bytes_by_hand() -> None:
    # even column → high nibble, odd column → low nibble, two's complement nibbles
    q = torch.tensor([[1, -2, 7, -8], [-1, 0, 0, 3]], dtype=torch.int8)
    expected = torch.tensor([[0x1E, 0x78], [0xF0 - 256, 0x03]], dtype=torch.int8)
    assert torch.equal(pack_int4(q), expected)


def test_quantize_weight_by_hand() -> None:
    u8 = 2.0 ** -7  # absmax 127·2^-7 → scale exactly 2^-7; halves round to even like torch.round
    w8 = torch.tensor([[127, 2.5, -2.5, 3.5, 0, -1], [0, 0, 0, 0, 0, 0]]) * u8
    q8, s8 = quantize_weight(w8, 8)
    assert torch.equal(q8, torch.tensor([[127, 2, -2, 4, 0, -1], [0] * 6], dtype=torch.int8))
    assert s8.dtype == torch.float16 and s8.tolist() == [u8, 0.0]
    u4 = 2.0 ** -4  # absmax 7·2^-4 → scale 2^-4: q = [7, -7, 2, 0, 1, -1]
    w4 = torch.tensor([[7, -7, 2.5, -0.5, 1, -1]]) * u4
    q4, s4 = quantize_weight(w4, 4)
    assert q4.tolist() == [[0x79, 0x20, 0x1F]] and s4.tolist() == [u4]  # (7,-7)(2,0)(1,-1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_matches_the_independent_rule(bits: int, monkeypatch: Any) -> None:
    w = torch.randn(40, 64) * 0.1
    q, s = ref_quantize(w, bits)
    monkeypatch.setattr(quant.layout, "CHUNK_ELEMS", 64 * 7)  # several row blocks
    got_q, got_s = quantize_weight(w, bits)
    assert torch.equal(got_q, q) and torch.equal(got_s, s)
    assert got_q.shape == (40, 64 * bits // 8)


def test_quantize_fp32_weight_goes_through_fp16_first() -> None:
    w = torch.randn(8, 32, dtype=torch.float64)
    pairs = zip(quantize_weight(w, 8), quantize_weight(w.half(), 8), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_int4_cpu_packing_in_row_blocks_is_lossless(monkeypatch: Any) -> None:
    monkeypatch.setattr(quant.layout, "CHUNK_ELEMS", 1 << 30)
    mod, w, _ = layer(4, 64, 272, dtype=torch.bfloat16)
    assert mod.backend.name == "int4pack_mm_cpu" and mod.weight.dtype == torch.uint8
    monkeypatch.setattr(quant.layout, "CHUNK_ELEMS", 64)  # 128-row blocks: 128 + 128 + 16
    blocked, _, _ = layer(4, 64, 272, dtype=torch.bfloat16)
    assert torch.equal(blocked.weight, mod.weight)
    q, s = ref_quantize(w, 4)
    assert torch.equal(mod.dequantize(), dequantize_weight(q, s, 4))


# -- kernels vs the reference ----------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_activations_equal_the_dequantized_reference(bits: int, rows: int) -> None:
    mod, w, b = layer(bits, 96, 64, dtype=torch.float32)
    x = torch.randn(2, rows, 96)
    torch.testing.assert_close(mod(x), reference(x, w, b, bits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [Int8PackMM(), Int8PackMM(max_rows=0), Dequant()],
                         ids=["kernel", "dequant-rows", "ref"])
def test_int8_paths_fp32(backend: Backend) -> None:
    mod, w, b = layer(8, 64, 32, dtype=torch.float32, backend=backend)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), reference(x, w, b, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,backend", [(8, "int8pack_mm"), (4, "int4pack_mm_cpu"),
                                          (8, "dequant"), (4, "dequant")])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_paths_within_bf16_rounding(bits: int, backend: str, bias: bool) -> None:
    chosen = select_backend(bits, 128, 64, CPU, torch.bfloat16)
    be = chosen if backend != "dequant" else Dequant()
    assert be.name == backend
    mod, w, b = layer(bits, 128, 64, dtype=torch.bfloat16, backend=be, bias=bias)
    x = torch.randn(4, 128).bfloat16()
    out = mod(x)
    assert out.dtype == torch.bfloat16
    ref = reference(x, w, b if bias else None, bits)
    # bf16 rounding (unit 2^-8): the kernels round x @ q.T once and the scaled result once;
    # the reference path rounds each weight once and the result once. Both stay within
    # 2^-8 · (|x| @ |W|.T + |b|) + 2^-8 · |y|.
    q, s = ref_quantize(w, bits)
    mag = F.linear(x.float().abs(), dequantize_weight(q, s, bits).abs(),
                   b.float().abs() if bias else None)
    err = (out.float() - ref).abs()
    assert (err <= 1.01 * 2.0 ** -8 * (mag + ref.abs())).all(), err.max()
    assert (err > 0).any()  # it is a bf16 path, not an fp32 one


def test_int4_kernel_equals_the_reference_exactly_in_fp32_terms() -> None:
    """bf16 activations with exactly representable inputs: kernel and reference agree to 1e-5."""
    mod, w, b = layer(4, 64, 32, dtype=torch.bfloat16, bias=False)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 3] = 1  # picks column 3: the result is one dequantized weight, rounded to bf16 once
    q, s = ref_quantize(w, 4)
    want = dequantize_weight(q, s, 4)[:, 3].bfloat16()
    assert torch.equal(mod(x)[0], want)


def test_select_backend_cpu(monkeypatch: Any) -> None:
    monkeypatch.setattr(quant.backends, "onednn_bf16", lambda: False)  # no prompt_rows
    assert select_backend(8, 4096, 4096, CPU, torch.bfloat16) == Int8PackMM()
    assert select_backend(8, 4096, 4096, CPU, torch.float32).max_rows == 2
    be = select_backend(4, 13696, 4096, CPU, torch.bfloat16)
    assert be.name == "int4pack_mm_cpu" and 13696 % be.group_size == 0
    slow = select_backend(4, 4096, 4096, CPU, torch.float32)
    assert slow.fallback and "bfloat16" in slow.note
    odd = select_backend(4, 48, 64, CPU, torch.bfloat16)
    assert odd.fallback and "in_features % 32" in odd.note


def test_select_backend_cuda(monkeypatch: Any) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    be = select_backend(4, 13696, 27392, cuda, torch.bfloat16)
    assert (be.name, be.group_size, be.inner_k_tiles) == ("int4pack_mm_cuda", 128, 8)
    fp16 = select_backend(4, 4096, 4096, cuda, torch.float16)
    assert fp16.fallback and "bfloat16" in fp16.note
    assert select_backend(8, 4096, 4096, cuda, torch.float16).name == "int8pack_mm"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "8.0" in select_backend(4, 4096, 4096, cuda, torch.bfloat16).note


# -- prepare_model ---------------------------------------------------------------------------------
def glm2_meta() -> nn.Module:
    from llmchat.models import chatglm2

    with torch.device("meta"):
        return chatglm2.Model(chatglm2.Config.from_hf(chatglm2_config()))


def test_prepare_model_swaps_exactly_the_block_linears() -> None:
    from llmchat.models import chatglm2

    net = glm2_meta()
    before = {n: type(m) for n, m in net.named_modules()}
    summary = prepare_model(net, chatglm2.QUANT_LINEARS, 4, dtype=torch.bfloat16, device=CPU)
    swapped = {n for n, m in net.named_modules() if isinstance(m, QuantizedLinear)}
    want = {f"transformer.encoder.layers.{i}.{p}" for i in range(2) for p in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h")}
    assert swapped == want
    for n, m in net.named_modules():  # everything else is the very same kind of module
        if n not in want:
            assert type(m) is before[n], n
    assert type(net.transformer.output_layer) is nn.Linear
    assert summary.extra() == {"quant_backend": "int4pack_mm_cpu", "quant_layers": 8}
    assert summary.bits == 4 and set(summary.layers) == {"int4pack_mm_cpu"}
    assert sorted(summary.layers["int4pack_mm_cpu"]) == sorted(want)
    assert not hasattr(net, "quant_extra")  # what it did is the return value, not an attribute
    qkv = net.transformer.encoder.layers[0].self_attention.query_key_value
    assert qkv.bias is not None and qkv.weight.shape == (128, 32) and qkv.weight.is_meta


def test_prepare_model_skip_and_16_bits() -> None:
    from llmchat.models import chatglm2

    net = glm2_meta()
    assert prepare_model(net, chatglm2.QUANT_LINEARS, 16).extra() == {}
    assert not any(isinstance(m, QuantizedLinear) for m in net.modules())
    prepare_model(net, chatglm2.QUANT_LINEARS, 8, skip=lambda n: ".layers.1." in n)
    names = {n for n, m in net.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(names) == 4 and all(".layers.0." in n for n in names)


def test_width_rules() -> None:
    from llmchat.models import chatglm2

    with pytest.raises(QuantizationError, match="pre-quantized to int4.*use --quant 4"):
        prepare_model(glm2_meta(), chatglm2.QUANT_LINEARS, 8, checkpoint_bits=4)
    with pytest.raises(QuantizationError, match="invalid --quant 3"):
        prepare_model(glm2_meta(), chatglm2.QUANT_LINEARS, 3)
    with pytest.raises(QuantizationError, match="quantization_bit 2"):
        prepare_model(glm2_meta(), chatglm2.QUANT_LINEARS, 16, checkpoint_bits=2)
    with pytest.raises(QuantizationError, match="no linear layer"):
        prepare_model(glm2_meta(), ("nothing.here",), 8)
    net = glm2_meta()  # --quant 16 on a pre-quantized checkpoint: the checkpoint's width
    prepare_model(net, chatglm2.QUANT_LINEARS, 16, checkpoint_bits=4)
    assert {m.bits for m in net.modules() if isinstance(m, QuantizedLinear)} == {4}


def test_int4_odd_in_features_is_a_clear_error() -> None:
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(33, 16, device="meta"))
    with pytest.raises(QuantizationError, match="33 input features.*--quant 8"):
        prepare_model(net, ("proj",), 4)


def test_bad_checkpoint_tensors_are_clear_errors() -> None:
    be = Dequant()
    mod = QuantizedLinear(32, 16, True, 4, prequantized=True, dtype=torch.float32, device=CPU,
                          backend=be)
    kw = {"dtype": torch.float32, "device": CPU, "key": "l.weight"}
    with pytest.raises(CheckpointError, match=r"shape \(16, 32\).*\(16, 16\)"):
        mod.load_checkpoint_tensor("weight", torch.zeros(16, 32, dtype=torch.int8), **kw)
    with pytest.raises(CheckpointError, match="pre-quantized"):
        mod.load_checkpoint_tensor("weight", torch.zeros(16, 32), **kw)
    fresh = QuantizedLinear(32, 16, False, 8, prequantized=False, dtype=torch.float32,
                            device=CPU, backend=be)
    with pytest.raises(CheckpointError, match="no quantization_bit"):
        fresh.load_checkpoint_tensor("weight", torch.zeros(16, 32, dtype=torch.int8), **kw)
    with pytest.raises(CheckpointError, match="unexpected"):
        fresh.load_checkpoint_tensor("bias", torch.zeros(16), **kw)


# -- end to end through the loader -----------------------------------------------------------------
def chat(m: Any, text: str = "你好") -> tuple[str, int]:
    """The greedy reply and its token count (random weights may well reply with nothing)."""
    out = m.generate([Message("user", text)], m.defaults.with_(**GREEDY)).consume()
    assert out.stats.completion_tokens > 0
    return out.text, out.stats.completion_tokens


def logits(m: Any, ids: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return m.model(torch.tensor([list(ids)])).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


GLM2_IDS = (64790, 64792, 100, 200, 300, 400, 500)


@pytest.fixture(scope="module")
def glm2_sd() -> dict[str, torch.Tensor]:
    """Block weights at a realistic gain (std 0.05 at width 64) so int4 error stays model-like."""
    from llmchat.models import chatglm2

    sd = build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(chatglm2_config()), seed=1,
                          std=0.05)
    emb = "transformer.embedding.word_embeddings.weight"
    sd[emb] = (sd[emb].float() * 10).half()
    return sd


@pytest.fixture(scope="module")
def glm2_fp(glm2_sd: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chatglm2_checkpoint(tmp_path_factory.mktemp("q") / "fp", state_dict=glm2_sd)


@pytest.mark.parametrize("bits", [8, 4])
def test_chatglm2_quantized_load(glm2_fp: Path, bits: int) -> None:
    ref = load(model_path=glm2_fp, device="cpu", dtype="float32")
    m = load(model_path=glm2_fp, device="cpu", quant=bits)  # auto dtype: bf16 on CPU
    assert m.info.quant == bits and m.info.dtype == "bfloat16"
    assert m.info.extra["quant_backend"] == {8: "int8pack_mm", 4: "int4pack_mm_cpu"}[bits]
    assert cosine(logits(m, GLM2_IDS), logits(ref, GLM2_IDS)) > 0.99
    assert chat(m)
    assert not any(t.is_meta for t in m.model.buffers())
    q_bytes = sum(mod.weight.numel() * mod.weight.element_size() for mod in m.model.modules()
                  if isinstance(mod, QuantizedLinear))
    assert q_bytes == sum(t.numel() for _, t in glm2_sd_items(glm2_fp)) * bits // 8


def glm2_sd_items(path: Path) -> list[tuple[str, torch.Tensor]]:
    from llmchat.loader import checkpoint_files, iter_tensors

    return [(k, t) for k, t in iter_tensors(checkpoint_files(path))
            if ".layers." in k and k.endswith(tuple(s + ".weight" for s in LINEAR_SUFFIXES))]


@pytest.mark.parametrize("bits", [8, 4])
def test_fp32_quantized_model_equals_float_model_with_dequantized_weights(
        glm2_fp: Path, glm2_sd: dict, tmp_path: Path, bits: int) -> None:
    m = load(model_path=glm2_fp, device="cpu", dtype="float32", quant=bits)
    deq = {}
    for key, t in glm2_sd.items():
        owner = key.rpartition(".")[0]
        if ".layers." in key and key.endswith(".weight") and owner.endswith(LINEAR_SUFFIXES):
            deq[key] = dequantize_weight(*ref_quantize(t, bits), bits)
        else:
            deq[key] = t.float()
    ref = load(model_path=chatglm2_checkpoint(tmp_path / "deq", state_dict=deq), device="cpu",
               dtype="float32")
    torch.testing.assert_close(logits(m, GLM2_IDS), logits(ref, GLM2_IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_prequantized_chatglm2_equals_on_the_fly(glm2_sd: dict, glm2_fp: Path, tmp_path: Path,
                                                 bits: int) -> None:
    sd = prequantize(glm2_sd, bits, LINEAR_SUFFIXES)
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4).half()
    pre = chatglm2_checkpoint(tmp_path / f"int{bits}", state_dict=sd, quantization_bit=bits)
    index = json.loads((pre / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight_scale" in index
    a = load(model_path=pre, device="cpu")  # --quant 16: as stored
    b = load(model_path=glm2_fp, device="cpu", quant=bits)
    assert a.info.quant == bits and a.info.dtype == "bfloat16"
    bufs = zip(dense_buffers(a.model).items(), dense_buffers(b.model).items(), strict=True)
    for (na, ta), (nb, tb) in bufs:
        assert na == nb and torch.equal(ta, tb), na
    assert chat(a) == chat(b)


def test_prequantized_checkpoint_errors(glm2_sd: dict, tmp_path: Path) -> None:
    sd = prequantize(glm2_sd, 4, LINEAR_SUFFIXES)
    pre = chatglm2_checkpoint(tmp_path / "int4", state_dict=sd, quantization_bit=4)
    with pytest.raises(QuantizationError, match="pre-quantized to int4.*use --quant 4"):
        load(model_path=pre, device="cpu", quant=8)
    with pytest.raises(UsageError, match="invalid --quant '3'"):
        load(model_path=pre, device="cpu", quant="3")
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight_scale"
    del sd[key]
    broken = chatglm2_checkpoint(tmp_path / "broken", state_dict=sd, quantization_bit=4)
    with pytest.raises(CheckpointError, match="missing keys.*weight_scale"):
        load(model_path=broken, device="cpu")


def test_int4_fallback_is_named(glm2_fp: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load(model_path=glm2_fp, device="cpu", dtype="float32", quant=4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)]
    assert msgs and "dequantize+matmul fallback" in msgs[0] and "--dtype bfloat16" in msgs[0]
    assert m.info.extra["quant_backend"] == "dequant"
    assert "bfloat16" in m.info.extra["quant_fallback"]
    assert chat(m)


# -- the other models ------------------------------------------------------------------------------
def _other(name: str) -> Any:
    pytest.importorskip(f"llmchat.models.{name}")
    return pytest.importorskip(f"tests.ckpt_{name}")


@pytest.fixture(scope="module")
def glm1_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ChatGLM-6B: an fp16 checkpoint and the same weights pre-quantized to int4."""
    ck = _other("chatglm")
    from llmchat.models import chatglm

    hf = ck.chatglm_config()
    sd = build_state_dict(chatglm.Model, chatglm.Config.from_hf(hf), seed=2, std=0.05)
    emb = "transformer.word_embeddings.weight"
    sd[emb] = (sd[emb].float() * 10).half()
    sd["lm_head.weight"] = sd[emb].clone()
    base = tmp_path_factory.mktemp("glm1")
    fp = ck.chatglm_checkpoint(base / "fp", state_dict=sd)
    pre = ck.chatglm_checkpoint(base / "int4", state_dict=prequantize(
        sd, 4, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
        quantization_bit=4)
    return fp, pre


def test_chatglm_quantized_load(glm1_dirs: tuple[Path, Path]) -> None:
    fp, _ = glm1_dirs
    ids = (5, 6, 7, 130001, 130004)
    ref = logits(load(model_path=fp, device="cpu", dtype="float32"), ids)
    for bits in (8, 4):
        m = load(model_path=fp, device="cpu", quant=bits)
        assert m.info.quant == bits
        assert sum(isinstance(x, QuantizedLinear) for x in m.model.modules()) == 8
        assert cosine(logits(m, ids), ref) > 0.99
        chat(m)


def test_prequantized_chatglm_int4_equals_on_the_fly(glm1_dirs: tuple[Path, Path]) -> None:
    fp, pre = glm1_dirs
    a = load(model_path=pre, device="cpu", quant=4)
    b = load(model_path=fp, device="cpu", quant=4)
    bufs = zip(dense_buffers(a.model).items(), dense_buffers(b.model).items(), strict=True)
    for (na, ta), (nb, tb) in bufs:
        assert na == nb and torch.equal(ta, tb), na
    assert chat(a) == chat(b)


def test_qwen_quantized_load(tmp_path: Path) -> None:
    ck = _other("qwen")
    from llmchat.models import qwen

    sd = build_state_dict(qwen.Model, qwen.Config.from_hf(ck.qwen_config()), seed=4, std=0.05)
    sd["transformer.wte.weight"] = (sd["transformer.wte.weight"].float() * 10).half()
    path = ck.qwen_checkpoint(tmp_path / "qwen", state_dict=sd)
    ids = (100, 200, 300, 151644, 151645)
    ref = logits(load(model_path=path, device="cpu", dtype="float32"), ids)
    for bits in (8, 4):
        m = load(model_path=path, device="cpu", quant=bits)
        names = {n.rpartition(".")[2] for n, x in m.model.named_modules()
                 if isinstance(x, QuantizedLinear)}
        assert names == {"c_attn", "c_proj", "w1", "w2"}
        assert sum(isinstance(x, QuantizedLinear) for x in m.model.modules()) == 10
        assert cosine(logits(m, ids), ref) > 0.99
        chat(m)


def test_visualglm_vision_tower_stays_float(tmp_path: Path) -> None:
    ck = _other("visualglm")
    m = load(model_path=ck.visualglm_checkpoint(tmp_path / "vglm"), device="cpu", quant=4)
    swapped = [n for n, x in m.model.named_modules() if isinstance(x, QuantizedLinear)]
    assert swapped and all(n.startswith("transformer.layers.") for n in swapped)
    vision = [x for n, x in m.model.named_modules() if n.startswith("image_encoder.")]
    assert vision and not any(isinstance(x, QuantizedLinear) for x in vision)


# -- backward through the quantized weights (frozen) -----------------------------------------------
BACKWARD_CASES = [(8, Int8PackMM()), (8, Dequant()), (4, Dequant()),
                  (4, Int4PackCPU(group_size=64))]


@pytest.mark.parametrize("bits,backend", BACKWARD_CASES,
                         ids=["int8-kernel", "int8-dequant", "int4-dequant", "int4-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("blocks", [1, 3], ids=["one-block", "row-blocks"])
def test_grad_input_equals_a_linear_holding_the_dequantized_weight(
        bits: int, backend: Backend, dtype: torch.dtype, blocks: int, monkeypatch: Any) -> None:
    k, n = 64, 272  # 272 = 2 whole 128-row groups of the CPU int4 layout + a 16-row tail
    mod, _, b = layer(bits, k, n, dtype=dtype, backend=backend)
    if blocks > 1:
        # row blocks 0:128, 128:256, 256:272
        monkeypatch.setattr(quant.layout, "CHUNK_ELEMS", 128 * k)
    assert len(mod.row_blocks()) == blocks
    ref = nn.Linear(k, n, dtype=dtype)
    ref.weight = nn.Parameter(mod.dequantize(dtype), requires_grad=False)
    ref.bias = nn.Parameter(b.to(dtype), requires_grad=False)
    x = torch.randn(2, 3, k).to(dtype)
    gy = torch.randn(2, 3, n).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mod(xa), ref(xb)
    with torch.inference_mode():
        assert torch.equal(ya.detach(), mod(x))  # the forward is the inference one, bit for bit
    ya.backward(gy)
    yb.backward(gy)
    assert xa.grad is not None and xa.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    else:  # both sum in fp32 and round once to bf16: at most one bf16 step apart
        torch.testing.assert_close(xa.grad, xb.grad, rtol=2.0 ** -7, atol=1e-6)
        assert (xa.grad == xb.grad).float().mean() > 0.9
    assert list(mod.parameters()) == []
    assert all(not t.requires_grad and t.grad is None for t in mod.buffers())


def test_no_graph_without_input_grad() -> None:
    mod, _, _ = layer(4, 64, 32, dtype=torch.bfloat16)
    y = mod(torch.randn(1, 64).bfloat16())
    assert y.grad_fn is None and not y.requires_grad


def test_int4_layout_read_back_without_the_kernel(monkeypatch: Any) -> None:
    """Rows decode from the CPU kernel's own layout (found by probing it) exactly as the upstream
    values; the identity-matmul fallback gives the same."""
    mod, w, _ = layer(4, 64, 272, dtype=torch.bfloat16)
    want = unpack_int4(ref_quantize(w, 4)[0])
    assert torch.equal(mod.backend.int_rows(mod, 0, 272), want)
    assert torch.equal(mod.backend.int_rows(mod, 128, 272), want[128:])
    monkeypatch.setattr(Int4PackCPU, "_nibble_order", lambda self, rows, k, device: None)
    fresh, _, _ = layer(4, 64, 272, dtype=torch.bfloat16)
    assert torch.equal(fresh.backend.int_rows(fresh, 0, 272), want)
