"""One test over every registered model: a fifth model must pass the same checks to land.

Each preset needs a tiny upstream-layout checkpoint builder below (a missing one fails), is
loaded through the real loader, and is checked for: a complete model contract, logit shapes,
prefill + cached decode == one full forward, the static (CUDA-graph) step == the eager step,
quantization swapping exactly the ``QUANT_LINEARS`` modules, and every checkpoint key used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from llmchat.graphs import StaticDecoder
from llmchat.loader import load
from llmchat.models.base import contract
from llmchat.quant import QuantizedLinear
from llmchat.registry import models
from tests.checkpoints import chatglm2_checkpoint
from tests.ckpt_chatglm import chatglm_checkpoint
from tests.ckpt_qwen import qwen_checkpoint
from tests.ckpt_visualglm import visualglm_checkpoint

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "chatglm-6b": chatglm_checkpoint,
    "chatglm2-6b": chatglm2_checkpoint,
    "qwen-7b-chat": qwen_checkpoint,
    "visualglm-6b": visualglm_checkpoint,
}
NAMES = sorted(models())


def test_every_registered_model_has_a_tiny_checkpoint() -> None:
    assert sorted(BUILDERS) == NAMES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = BUILDERS[name](tmp_path_factory.mktemp(name) / name)
        return made[name]

    return get


def prompt_ids(chat) -> list[int]:  # noqa: ANN001
    from llmchat.types import Message

    return chat.encode([Message("user", "你好，介绍一下你自己")])


@pytest.mark.parametrize("name", NAMES)
def test_contract_shapes_and_cache_consistency(name: str, tiny: Callable[[str], Path]) -> None:
    chat = load(model_path=tiny(name), device="cpu", dtype="float32")
    arch = contract(importlib.import_module(models()[name].module))
    assert chat.arch is arch and callable(arch.encode_messages) and arch.quant_linears
    net = chat.model
    assert hasattr(net, "static_key"), "without static_key the CUDA graph step is lost"
    prompt = prompt_ids(chat)
    ids = torch.tensor([[*prompt, 7]])  # the prompt and one generated token
    t = ids.shape[1]

    def cache():  # noqa: ANN202
        return net.make_cache(t + 4, dtype=torch.float32, device="cpu")

    with torch.inference_mode():
        full = net(ids, cache())
        assert full.shape == (1, t, full.shape[-1]) and torch.isfinite(full).all()
        c = cache()
        first = net(ids[:, :-1], c, last_only=True)
        assert first.shape == (1, 1, full.shape[-1])
        step = net(ids[:, -1:], c)
        assert step.shape == (1, 1, full.shape[-1]) and c.offset == t
        torch.testing.assert_close(first[0, -1], full[0, -2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[0, -1], full[0, -1], atol=1e-4, rtol=1e-4)
        # the static step (what CUDA graphs capture) equals the eager one
        eager_cache, static_cache = cache(), cache()
        net(ids[:, :-1], eager_cache)
        net(ids[:, :-1], static_cache)
        dec = StaticDecoder(net, static_cache, capture=False)
        torch.testing.assert_close(dec(7), net(ids[:, -1:], eager_cache), atol=1e-4, rtol=1e-4)
        assert dec.static_steps == 1


@pytest.mark.parametrize("name", NAMES)
def test_quantization_swaps_exactly_the_quant_linears(name: str,
                                                      tiny: Callable[[str], Path]) -> None:
    arch = contract(importlib.import_module(models()[name].module))
    plain = load(model_path=tiny(name), device="cpu", dtype="float32").model
    wanted = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear)
              and n.endswith(arch.quant_linears) and not (arch.quant_skip and arch.quant_skip(n))}
    assert wanted
    quant = load(model_path=tiny(name), device="cpu", quant=8).model
    swapped = {n for n, m in quant.named_modules() if isinstance(m, QuantizedLinear)}
    assert swapped == wanted


@pytest.mark.parametrize("name", NAMES)
def test_every_checkpoint_key_is_used(name: str, tiny: Callable[[str], Path]) -> None:
    from llmchat.loader import checkpoint_files, iter_tensors

    arch = contract(importlib.import_module(models()[name].module))
    net = load(model_path=tiny(name), device="cpu", dtype="float32").model
    params = set(net.state_dict())
    used, dropped = set(), []
    for key, _ in iter_tensors(checkpoint_files(tiny(name))):
        target = arch.checkpoint_key(key)
        if target is None:
            dropped.append(key)
        else:
            used.add(target)
    assert used == params
    # only the unused rotary buffers and a tied output layer are dropped
    assert all("inv_freq" in k or k == "lm_head.weight" for k in dropped)


@pytest.mark.parametrize("name", NAMES)
def test_text_that_is_not_unicode_is_refused_by_one_rule(name: str,
                                                         tiny: Callable[[str], Path]) -> None:
    from llmchat.errors import UsageError
    from llmchat.types import Message

    chat = load(model_path=tiny(name), device="cpu", dtype="float32")
    with pytest.raises(UsageError, match="not valid Unicode"):
        chat.chat([Message("user", "bad \udcff text")], chat.defaults)


@pytest.mark.parametrize("name", NAMES)
def test_nan_weights_are_reported_as_a_broken_checkpoint(name: str,
                                                        tiny: Callable[[str], Path]) -> None:
    from llmchat.errors import CheckpointError
    from llmchat.types import Message

    chat = load(model_path=tiny(name), device="cpu", dtype="float32")
    norm = next(p for n, p in chat.model.named_parameters() if "norm" in n or "ln_" in n)
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.fill_(float("nan"))
    try:
        for temperature in (0, 0.8):
            with pytest.raises(CheckpointError, match="NaN/Inf"):
                chat.chat([Message("user", "hi")], chat.defaults.with_(temperature=temperature))
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_contract_names_missing_model_hooks() -> None:
    """A module whose Model lacks ``static_key`` (or whose Config lacks ``layer_counts``) fails
    when its contract is built, instead of silently losing the captured decode step."""
    import types

    from llmchat.models import chatglm2

    class Model(nn.Module):
        def make_cache(self) -> None: ...

    class Config:
        pass

    fake = types.ModuleType("llmchat.models.fake")
    fake.__dict__.update({k: v for k, v in vars(chatglm2).items() if not k.startswith("_")})
    fake.Model, fake.Config = Model, Config
    with pytest.raises(TypeError, match="Model.static_key.*Config.layer_counts"):
        contract(fake)
