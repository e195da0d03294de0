"""CPU bf16 prompts computed in fp32 (llmchat/prefill.py): same numbers, chosen from the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmchat import prefill
from llmchat.loader import load
from llmchat.prefill import PrefillPath, UpcastLinear, select_prefill

CPU = torch.device("cpu")


def upcast(k: int, n: int, *, bias: bool, min_rows: int = 2) -> UpcastLinear:
    lin = UpcastLinear(k, n, bias, min_rows=min_rows, scratch={}, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


@pytest.mark.parametrize("bias", [False, True])
def test_prompt_rows_equal_the_fp32_product_rounded_once(monkeypatch: pytest.MonkeyPatch,
                                                         bias: bool) -> None:
    monkeypatch.setattr(prefill, "CHUNK_ELEMS", 64 * 5)  # several blocks, the last one short
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
    real = prefill.F.linear
    monkeypatch.setattr(prefill.F, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    lin(x)  # 3 rows < min_rows: nn.Linear's own bf16 product, not the fp32 blocks
    assert calls == [torch.bfloat16]
    calls.clear()
    lin(torch.randn(4, 64).bfloat16())
    assert calls == [torch.float32]


def test_the_choice_follows_onednn_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMCHAT_PREFILL", raising=False)
    monkeypatch.setattr(prefill, "onednn_bf16", lambda: False)
    path = select_prefill(CPU, torch.bfloat16)
    assert path is not None and path.name == "fp32" and path.min_rows == prefill.MIN_ROWS
    monkeypatch.setattr(prefill, "onednn_bf16", lambda: True)
    assert select_prefill(CPU, torch.bfloat16) == PrefillPath(
        "native", note=f"oneDNN has bf16 on this CPU, {torch.backends.cpu.get_cpu_capability()}")
    assert select_prefill(CPU, torch.float32) is None
    assert select_prefill(torch.device("meta"), torch.bfloat16) is None
    monkeypatch.setenv("LLMCHAT_PREFILL", "fp32")
    assert select_prefill(CPU, torch.bfloat16).min_rows == 2  # type: ignore[union-attr]


def test_loaded_bf16_model_prefills_in_fp32_with_the_same_logits(
    glm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.tensor([[64790, 64792, *range(100, 140)]])
    outs = {}
    for mode in ("native", "fp32"):
        monkeypatch.setenv("LLMCHAT_PREFILL", mode)
        m = load(model_path=glm2_dir, device="cpu", dtype="bfloat16")
        swapped = [n for n, mod in m.model.named_modules() if isinstance(mod, UpcastLinear)]
        assert bool(swapped) == (mode == "fp32")
        assert "fp32" in m.info.extra["prefill_path"] or mode == "native"
        with torch.no_grad():
            outs[mode] = m.model(ids).float()
    assert swapped and all("output_layer" not in n for n in swapped)
    torch.testing.assert_close(outs["fp32"], outs["native"], rtol=0.05, atol=0.05)
    m32 = load(model_path=glm2_dir, device="cpu", dtype="float32")
    assert "prefill_path" not in m32.info.extra
