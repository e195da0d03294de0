"""Quantized layers on prompts (``integer_gemm``: the exact integers through a float GEMM) and
weights memory-mapped at unaligned addresses."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llmchat.quant import backends
from llmchat.quant.backends import Int4PackCPU, Int4Packed, Int8PackMM, aligned, select_backend
from llmchat.quant.layout import dequantize_weight, pack_int4, quantize_weight, unpack_int4
from llmchat.quant.linear import QuantizedLinear

CPU = torch.device("cpu")


def loaded(bits: int, k: int, n: int, backend: Any, *, bias: bool) -> tuple[QuantizedLinear, Any]:
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    mod = QuantizedLinear(k, n, bias, bits, prequantized=False, dtype=torch.bfloat16, device=CPU,
                          backend=backend)
    mod.load_checkpoint_tensor("weight", w, dtype=torch.bfloat16, device=CPU, key="w")
    if bias:
        mod.load_checkpoint_tensor("bias", torch.randn(n, generator=g).half(),
                                   dtype=torch.bfloat16, device=CPU, key="b")
    return mod, w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_prompt_gemm_gives_the_kernels_numbers(bits: int, bias: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    k, n = 128, 320  # int4: five blocks of 64 rows (AVX512 layout) or ten of 32 (AVX2)
    kernel = select_backend(bits, k, n, CPU, torch.bfloat16)
    kernel = replace(kernel, prompt_rows=None)
    mod, w = loaded(bits, k, n, kernel, bias=bias)
    x = torch.randn(6, k).bfloat16()
    by_kernel = mod(x)
    object.__setattr__(mod, "backend", replace(kernel, prompt_rows=4))
    calls: list[int] = []
    real = backends.integer_gemm
    monkeypatch.setattr(backends, "integer_gemm",
                        lambda layer, x: calls.append(x.shape[0]) or real(layer, x))
    by_gemm = mod(x)
    mod(x[:3])  # fewer rows than prompt_rows: the kernel
    assert calls == [6]
    assert by_gemm.dtype == torch.bfloat16 and by_gemm.shape == (6, n)
    # both round x @ q.T once to bf16, then the scaled sum once: they differ by summation order
    q, s = quantize_weight(w, bits)
    exact = F.linear(x.float(), dequantize_weight(q, s, bits, torch.float32),
                     None if mod.bias is None else mod.bias.float())
    mag = F.linear(x.float().abs(), dequantize_weight(q, s, bits, torch.float32).abs(),
                   None if mod.bias is None else mod.bias.float().abs())
    for out in (by_kernel, by_gemm):
        err = (out.float() - exact).abs()
        assert (err <= 2.02 * 2.0 ** -8 * (mag + exact.abs())).all(), err.max()


def test_int4_cpu_layout_unpacks_by_planes_exactly() -> None:
    k, n = 96, 16 * 23  # 368 rows: whole 64- or 32-row blocks, then a shorter tail
    be = select_backend(4, k, n, CPU, torch.bfloat16)
    assert isinstance(be, Int4PackCPU)
    assert be._block_rows(k) in (32, 64)  # torch 2.x packs plain row blocks: the fast path runs
    mod, w = loaded(4, k, n, be, bias=False)
    q = unpack_int4(quantize_weight(w, 4)[0])  # what was stored, in the upstream layout
    for r0, r1 in [(0, n), (0, 128), (128, 256), (256, n)]:
        generic = Int4Packed.int_rows(be, mod, r0, r1)  # the layout-agnostic read-back
        assert torch.equal(generic, q[r0:r1])
        assert torch.equal(be.int_rows(mod, r0, r1), generic)  # planes where the blocks allow
        assert torch.equal(be.float_rows(mod, r0, r1, torch.float32), generic.float())


def test_prompt_rows_only_where_onednn_has_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "onednn_bf16", lambda: True)
    assert select_backend(8, 4096, 4096, CPU, torch.bfloat16).prompt_rows == 16
    assert select_backend(4, 4096, 4096, CPU, torch.bfloat16).prompt_rows == 80
    assert select_backend(8, 4096, 4096, CPU, torch.float32).prompt_rows is None
    monkeypatch.setattr(backends, "onednn_bf16", lambda: False)
    assert select_backend(8, 4096, 4096, CPU, torch.bfloat16) == Int8PackMM()
    assert select_backend(4, 4096, 4096, CPU, torch.bfloat16).prompt_rows is None


def test_unaligned_mapped_weights_are_copied_to_an_aligned_address() -> None:
    raw = torch.randint(-127, 128, (64 * 32 + 8,), dtype=torch.int8)
    off = raw[8:].view(64, 32)  # like a tensor memory-mapped 8 bytes past a 64-byte boundary
    assert off.data_ptr() % 64 == 8
    got = aligned(off)
    assert got.data_ptr() % 64 == 0 and torch.equal(got, off)
    ok = raw[:2048].view(64, 32)
    assert aligned(ok).data_ptr() == ok.data_ptr()  # aligned ones are not copied
    mod = QuantizedLinear(32, 64, False, 8, prequantized=True, dtype=torch.bfloat16, device=CPU,
                          backend=Int8PackMM())
    mod.load_checkpoint_tensor("weight", off, dtype=torch.bfloat16, device=CPU, key="w")
    mod.load_checkpoint_tensor("weight_scale", torch.full((64,), 0.01).half(),
                               dtype=torch.bfloat16, device=CPU, key="s")
    assert mod.weight.data_ptr() % 64 == 0
    x = torch.randn(1, 32).bfloat16()
    torch.testing.assert_close(mod(x).float(), (x.float() @ off.float().T) * 0.01,
                               rtol=2 ** -7, atol=1e-2)


def test_int4_pack_of_an_unaligned_source_is_lossless() -> None:
    q = torch.randint(-8, 8, (64, 64), dtype=torch.int8)
    packed = pack_int4(q)
    raw = torch.empty(packed.numel() + 8, dtype=torch.int8)
    raw[8:].copy_(packed.flatten())
    be = select_backend(4, 64, 64, CPU, torch.bfloat16)
    mod = QuantizedLinear(64, 64, False, 4, prequantized=True, dtype=torch.bfloat16, device=CPU,
                          backend=be)
    mod.load_checkpoint_tensor("weight", raw[8:].view(64, 32), dtype=torch.bfloat16, device=CPU,
                               key="w")
    assert torch.equal(be.int_rows(mod, 0, 64), q)
