"""The static (CUDA-graph-capturable) decode step computes what the eager step computes.

On the CPU the static step runs eagerly (``capture=False``): same code, same tensors, no graph.
The graph capture itself is exercised by the ``gpu`` test when CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from llmchat.cache import KVCache
from llmchat.generate import generate_tokens, make_sampler
from llmchat.graphs import StaticDecoder
from llmchat.models import chatglm, chatglm2, qwen
from llmchat.types import GenerationConfig
from tests.checkpoints import build_state_dict


def tiny(module, **cfg):  # noqa: ANN001, ANN201
    c = module.Config(**cfg)
    m = module.Model(c)
    m.load_state_dict(build_state_dict(module.Model, c, seed=11, dtype=torch.float32, std=0.1))
    return m.eval()


MODELS = {
    "chatglm": lambda: tiny(chatglm, vocab_size=130528, hidden_size=32, num_layers=2,
                            num_heads=4, inner_hidden_size=128, max_sequence_length=256),
    "chatglm2": lambda: tiny(chatglm2, vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                             kv_channels=8, num_kv_groups=2, ffn_hidden_size=48, seq_length=256),
    "qwen": lambda: tiny(qwen, vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                         kv_channels=8, intermediate_size=64, seq_length=256, max_positions=512),
}


PROMPTS = {"chatglm": [3, 17, 42, 8, 130001, 130004]}  # GLM v1 prompts end [gMASK] <sop>


def greedy(model, prompt, n, step=None, max_len=64):  # noqa: ANN001, ANN201
    cache = model.make_cache(max_len, dtype=torch.float32, device="cpu")
    sample = make_sampler(GenerationConfig(temperature=0))
    toks = list(generate_tokens(model, prompt, cache, sample=sample, max_new_tokens=n,
                                stop_ids=frozenset(), step=step(model, cache) if step else None))
    return toks, cache


@pytest.mark.parametrize("name", sorted(MODELS))
def test_static_steps_equal_eager_steps(name: str) -> None:
    model = MODELS[name]()
    prompt = PROMPTS.get(name, [3, 17, 42, 8, 5, 60])
    eager, _ = greedy(model, prompt, 20)
    decoders: list[StaticDecoder] = []

    def make(m, c):  # noqa: ANN001, ANN202
        decoders.append(StaticDecoder(m, c, capture=False))
        return decoders[-1]

    static, cache = greedy(model, prompt, 20, step=make)
    assert static == eager
    assert decoders[0].static_steps == 19 and decoders[0].eager_steps == 0
    assert decoders[0].path == "static-eager"
    assert cache.offset == len(prompt) + 19 and not cache.static


@pytest.mark.parametrize("name", sorted(MODELS))
def test_static_logits_match_to_float_precision(name: str) -> None:
    model = MODELS[name]()
    gmask, sop = (130001, 130004) if name == "chatglm" else (71, 2)
    ids = torch.tensor([[5, 9, 33, gmask, sop, 14, 40, 3]])
    with torch.no_grad():
        c1 = model.make_cache(32, dtype=torch.float32, device="cpu")
        model(ids[:, :5], c1)
        eager = [model(ids[:, i : i + 1], c1) for i in range(5, 8)]
        c2 = model.make_cache(32, dtype=torch.float32, device="cpu")
        model(ids[:, :5], c2)
        dec = StaticDecoder(model, c2, capture=False)
        static = [dec(int(ids[0, i])) for i in range(5, 8)]
    for a, b in zip(eager, static, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1.k[:, :, :, :8], c2.k[:, :, :, :8])


def test_glm_static_state_survives_reset_and_tracks_new_prompts() -> None:
    model = MODELS["chatglm"]()
    cache = model.make_cache(32, dtype=torch.float32, device="cpu")
    dec = StaticDecoder(model, cache, capture=False)
    sample = make_sampler(GenerationConfig(temperature=0))
    runs = []
    for prompt in ([3, 17, 130001, 130004], [9, 9, 9, 9, 9, 130001, 130004]):
        cache.reset()
        runs.append(list(generate_tokens(model, prompt, cache, sample=sample, max_new_tokens=8,
                                         stop_ids=frozenset(), step=dec)))
        eager, _ = greedy(model, prompt, 8)
        assert runs[-1] == eager
    assert cache.state_version == 2  # allocated once per tensor, then reused in place


class SimulatedCapture(StaticDecoder):
    """StaticDecoder's capture branch on the CPU: warm up, then 'replay' by running the step."""

    def __init__(self, model, cache) -> None:  # noqa: ANN001
        super().__init__(model, cache, capture=False)
        self.capture = True
        self.captures = 0

    def _capture(self, key: object) -> None:
        self._warm_up()
        self.captures += 1
        dec = self

        class Graph:
            def replay(self) -> None:
                dec.logits = dec._run_static()

        self.graph, self.key = Graph(), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_sequence_leaves_every_step_exact(name: str) -> None:
    """Warm-up runs before a capture advance device state; the next real step must not see it."""
    model = MODELS[name]()
    prompt = PROMPTS.get(name, [3, 17, 42, 8, 5, 60])
    eager, _ = greedy(model, prompt, 12)
    made: list[SimulatedCapture] = []

    def make(m, c):  # noqa: ANN001, ANN202
        made.append(SimulatedCapture(m, c))
        return made[-1]

    assert greedy(model, prompt, 12, step=make)[0] == eager
    assert made[0].captures == 1 and made[0].static_steps == 11


def test_qwen_falls_back_to_eager_past_seq_length() -> None:
    model = tiny(qwen, vocab_size=96, hidden_size=32, num_layers=1, num_heads=4, kv_channels=8,
                 intermediate_size=64, seq_length=8, max_positions=64)
    prompt = [3, 4, 5, 6, 7]
    eager, _ = greedy(model, prompt, 10)
    decoders: list[StaticDecoder] = []

    def make(m, c):  # noqa: ANN001, ANN202
        decoders.append(StaticDecoder(m, c, capture=False))
        return decoders[-1]

    static, _ = greedy(model, prompt, 10, step=make)
    assert static == eager
    d = decoders[0]
    assert d.static_steps == 3 and d.eager_steps == 6  # positions 5..7 static, then logn steps


def test_kv_cache_static_addressing() -> None:
    c = KVCache(1, 1, 2, 6)
    c.offset = 2
    c.pos.fill_(2)
    c.static = True
    k = torch.ones(1, 1, 1, 2)
    full_k, _ = c.update(0, k, k)
    assert full_k.shape == (1, 1, 6, 2) and full_k[0, 0, 2].tolist() == [1.0, 1.0]
    assert c.valid_mask().flatten().tolist() == [True, True, True, False, False, False]
    assert c.positions(1).tolist() == [2]
    c.advance(1)
    assert c.offset == 2 and int(c.pos) == 3  # static steps move the device position only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_graph_decode_equals_eager(name: str) -> None:
    model = MODELS[name]().cuda()
    prompt = PROMPTS.get(name, [3, 17, 42, 8, 5, 60])

    def run(step):  # noqa: ANN001, ANN202
        cache = model.make_cache(64, dtype=torch.float32, device="cuda")
        sample = make_sampler(GenerationConfig(temperature=0), device="cuda")
        dec = step(cache) if step else None
        out = list(generate_tokens(model, prompt, cache, sample=sample, max_new_tokens=30,
                                   stop_ids=frozenset(), step=dec))
        return out, dec

    eager, _ = run(None)
    graph, dec = run(lambda c: StaticDecoder(model, c, capture=True))
    assert graph == eager and dec.path == "cuda-graph"
