"""CPU float linears (llmchat/cpu_linear.py): oneDNN-packed weights and fp32 prompts from bf16
weights compute the same numbers as torch's own matmul, and the path follows the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmchat import cpu_linear
from llmchat.cpu_linear import (
    CpuLinearPath,
    PackedLinear,
    UpcastLinear,
    onednn_bf16,
    select_cpu_linear,
)
from llmchat.errors import UsageError
from llmchat.loader import load

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16(), reason="oneDNN has no bf16 here")


def filled(cls: type, k: int, n: int, *, bias: bool, dtype: torch.dtype,
           **kw: object) -> torch.nn.Linear:
    lin = cls(k, n, bias, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def upcast(k: int, n: int, *, bias: bool, min_rows: int = 2) -> UpcastLinear:
    lin = filled(UpcastLinear, k, n, bias=bias, dtype=torch.bfloat16, min_rows=min_rows,
                 scratch={})
    assert isinstance(lin, UpcastLinear)
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_prompt_rows_equal_the_fp32_product_rounded_once(monkeypatch: pytest.MonkeyPatch,
                                                         bias: bool) -> None:
    monkeypatch.setattr(cpu_linear, "CHUNK_ELEMS", 64 * 5)  # several blocks, the last one short
    lin = upcast(64, 23, bias=bias)
    x = torch.randn(2, 5, 64).bfloat16()
    ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 23)
    assert torch.equal(out, ref.bfloat16())  # bf16 x bf16 is exact in fp32: one rounding
    # torch's own bf16 GEMM agrees to bf16 rounding
    torch.testing.assert_close(out.float(), F.linear(x, lin.weight, lin.bias).float(),
                               rtol=2 ** -6, atol=1e-2)


def test_decode_rows_take_torchs_bf16_path(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = upcast(64, 23, bias=True, min_rows=4)
    x = torch.randn(1, 3, 64).bfloat16()
    calls = []
    real = cpu_linear.F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    lin(x)  # 3 rows < min_rows: nn.Linear's own bf16 product, not the fp32 blocks
    assert calls == [torch.bfloat16]
    calls.clear()
    lin(torch.randn(4, 64).bfloat16())
    assert calls == [torch.float32]


@pytest.mark.parametrize("dtype", [
    torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
@pytest.mark.parametrize("bias", [False, True])
@needs_onednn
def test_packed_weights_compute_what_nn_linear_computes(dtype: torch.dtype, bias: bool) -> None:
    lin = filled(PackedLinear, 96, 40, bias=bias, dtype=dtype)
    assert isinstance(lin, PackedLinear)
    w = lin.weight.detach().clone()
    b = None if lin.bias is None else lin.bias.detach().clone()
    lin.pack()
    assert lin.weight.is_mkldnn and lin.weight.shape == (40, 96) and lin.weight.dtype == dtype
    assert "weight" not in dict(lin.named_parameters())  # a buffer now, in oneDNN's layout
    lin.pack()  # packing twice is a no-op
    sd = lin.state_dict()  # plain tensors for whoever reads the weights
    assert not sd["weight"].is_mkldnn and torch.equal(sd["weight"], w)
    tol = {"rtol": 2 ** -7, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    for shape in ((1, 96), (1, 1, 96), (3, 7, 96), (130, 96)):  # decode steps and prompts
        x = torch.randn(shape).to(dtype)
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        out = lin(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 40)
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), **tol)


@needs_onednn
def test_packed_weights_refuse_a_backward_pass_instead_of_a_wrong_one() -> None:
    lin = filled(PackedLinear, 32, 8, bias=False, dtype=torch.float32)
    assert isinstance(lin, PackedLinear)
    lin.pack()
    x = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="training=True"):
        lin(x)
    with torch.no_grad():
        lin(x)  # inference through a tensor that requires grad is fine


def test_the_choice_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_linear.ENV, raising=False)
    monkeypatch.setattr(cpu_linear, "_can_pack", lambda: True)
    monkeypatch.setattr(cpu_linear, "onednn_bf16", lambda: False)
    path = select_cpu_linear(CPU, torch.bfloat16)
    assert path is not None and path.name == "upcast" and path.min_rows == cpu_linear.MIN_ROWS
    assert select_cpu_linear(CPU, torch.float32).name == "packed"  # type: ignore[union-attr]
    monkeypatch.setattr(cpu_linear, "onednn_bf16", lambda: True)
    cap = torch.backends.cpu.get_cpu_capability()
    assert select_cpu_linear(CPU, torch.bfloat16) == CpuLinearPath(
        "packed", note=f"oneDNN has bf16 on this CPU, {cap}")
    # training keeps plain weights (no backward through packed ones)
    assert select_cpu_linear(CPU, torch.bfloat16, training=True) is None
    assert select_cpu_linear(CPU, torch.float32, training=True) is None
    monkeypatch.setattr(cpu_linear, "_can_pack", lambda: False)
    assert select_cpu_linear(CPU, torch.bfloat16) is None
    assert select_cpu_linear(CPU, torch.float16) is None
    assert select_cpu_linear(torch.device("meta"), torch.bfloat16) is None
    monkeypatch.setenv(cpu_linear.ENV, "upcast")
    assert select_cpu_linear(CPU, torch.bfloat16).min_rows == 2  # type: ignore[union-attr]
    monkeypatch.setenv(cpu_linear.ENV, "native")
    assert select_cpu_linear(CPU, torch.float32).name == "native"  # type: ignore[union-attr]
    monkeypatch.setenv(cpu_linear.ENV, "fast")
    with pytest.raises(UsageError, match="LLMCHAT_CPU_LINEAR='fast': use native"):
        select_cpu_linear(CPU, torch.float32)


def _modes(dtype: torch.dtype) -> list[str]:
    modes = ["native", "upcast"] if dtype == torch.bfloat16 else ["native"]
    if torch.backends.mkldnn.is_available() and (dtype == torch.float32 or onednn_bf16()):
        modes.append("packed")  # forced by the variable, also off x86-64
    return modes


def test_packing_is_for_x86_64_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_linear.ENV, raising=False)
    monkeypatch.setattr(cpu_linear.torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "aarch64")
    assert select_cpu_linear(CPU, torch.float32) is None  # not measured there: torch as is
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    assert select_cpu_linear(CPU, torch.float32).name == "packed"  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_models_give_the_same_logits_on_every_path(
    glm2_dir: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    ids = torch.tensor([[64790, 64792, *range(100, 140)]])
    outs, sizes = {}, set()
    name = str(dtype).removeprefix("torch.")
    for mode in _modes(dtype):
        monkeypatch.setenv(cpu_linear.ENV, mode)
        m = load(model_path=glm2_dir, device="cpu", dtype=name)
        kinds = {n: type(mod) for n, mod in m.model.named_modules()
                 if isinstance(mod, torch.nn.Linear)}
        want = {"native": torch.nn.Linear, "upcast": UpcastLinear, "packed": PackedLinear}[mode]
        assert kinds and set(kinds.values()) == {want}  # every layer, the output layer too
        assert m.info.extra["cpu_linear"].endswith(f"({cpu_linear.ENV}={mode})")
        sizes.add(m.info.weight_bytes)  # packing keeps the bytes
        with torch.no_grad():
            outs[mode] = m.model(ids).float()
    assert len(sizes) == 1
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    for mode, out in outs.items():
        torch.testing.assert_close(out, outs["native"], rtol=tol, atol=tol, msg=mode)


def test_a_model_loaded_for_training_keeps_plain_weights_that_pass_gradients(
    glm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cpu_linear.ENV, raising=False)
    m = load(model_path=glm2_dir, device="cpu", dtype="float32", training=True)
    assert not any(isinstance(mod, PackedLinear) for mod in m.model.modules())
    assert "cpu_linear" not in m.info.extra
    emb = m.model.transformer.embedding.word_embeddings  # type: ignore[attr-defined]
    x = emb(torch.tensor([[5, 6, 7]])).detach().requires_grad_()
    head = m.model.transformer.output_layer  # type: ignore[attr-defined]
    head(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
