"""The quantized cache: a float checkpoint loaded with --quant 8/4 is quantized once, reused."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from llmchat.loader import load
from llmchat.quant import QuantizedLinear, cache
from llmchat.quant.cache import QuantCacheWarning
from llmchat.types import Message
from tests.checkpoints import build_state_dict, chatglm2_checkpoint, chatglm2_config, dense_buffers

IDS = [64790, 64792, 100, 200, 300, 400, 500]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float ChatGLM2-6B (sharded .bin), weights at a gain that gives non-empty replies."""
    from llmchat.models import chatglm2

    sd = build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(chatglm2_config()), seed=1,
                          std=0.05)
    emb = "transformer.embedding.word_embeddings.weight"
    sd[emb] = (sd[emb].float() * 10).half()
    return chatglm2_checkpoint(tmp_path_factory.mktemp("qc") / "fp", state_dict=sd)


@pytest.fixture
def ckpt(source: Path, tmp_path: Path) -> Path:
    """A private copy (tests change its files)."""
    return Path(shutil.copytree(source, tmp_path / "chatglm2-fp"))


def entries() -> list[Path]:
    root = cache.cache_root()
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


def run(path: Path, bits: int = 4, **kw: Any) -> Any:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = load(model_path=path, device="cpu", quant=bits, **kw)
    m.cache_warnings = [str(w.message) for w in seen if issubclass(w.category, QuantCacheWarning)]
    return m


def outputs(m: Any) -> tuple[torch.Tensor, str, dict[str, torch.Tensor]]:
    with torch.no_grad():
        logits = m.model(torch.tensor([IDS])).float()
    reply = m.generate([Message("user", "你好")], m.defaults.with_(temperature=0,
                                                                  max_new_tokens=8)).consume()
    assert reply.stats.completion_tokens > 0
    return logits, reply.text, {n: t.clone() for n, t in dense_buffers(m.model).items()}


def same(a: Any, b: Any) -> None:
    la, ta, ba = outputs(a)
    lb, tb, bb = outputs(b)
    assert torch.equal(la, lb) and ta == tb
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)


@pytest.mark.parametrize("bits", [8, 4])
def test_second_load_comes_from_the_cache_and_is_identical(ckpt: Path, bits: int) -> None:
    first = run(ckpt, bits)
    note = first.info.extra["quant_cache"]
    assert note.startswith("quantized on the fly (cached to ") and not first.cache_warnings
    [entry] = entries()
    assert str(entry) in note and f"-int{bits}-" in entry.name
    assert {p.suffix for p in entry.iterdir()} == {".safetensors", ".json"}
    second = run(ckpt, bits)
    assert second.info.extra["quant_cache"] == f"loaded quantized cache {entry}"
    assert second.info.extra["quant_backend"] == first.info.extra["quant_backend"]
    assert second.info.quant == bits and second.info.dtype == first.info.dtype
    same(first, second)
    off = run(ckpt, bits, quant_cache=False)  # and both equal quantizing without any cache
    assert off.info.extra["quant_cache"] == "quantized on the fly (cache off)"
    same(first, off)


def test_the_cache_is_the_upstream_prequantized_layout(ckpt: Path) -> None:
    from safetensors import safe_open

    m = run(ckpt, 4)
    [entry] = entries()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(entry.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value"
    layer = m.model.get_submodule(qkv)
    assert isinstance(layer, QuantizedLinear)
    assert tensors[qkv + ".weight"].dtype == torch.int8
    assert tensors[qkv + ".weight"].shape == (layer.out_features, layer.in_features // 2)
    assert tensors[qkv + ".weight_scale"].dtype == torch.float16
    assert tensors[qkv + ".bias"].dtype == torch.float16  # as the checkpoint stores it
    from llmchat.quant import dequantize_weight

    assert torch.equal(dequantize_weight(tensors[qkv + ".weight"], tensors[qkv + ".weight_scale"],
                                         4), layer.dequantize())


def test_second_load_does_not_read_the_source_weights(ckpt: Path) -> None:
    run(ckpt, 8)
    ref = run(ckpt, 8)
    for f in ckpt.glob("*.bin"):  # same size and mtime, garbage content: only the cache can load
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    m = run(ckpt, 8)
    assert m.info.extra["quant_cache"].startswith("loaded quantized cache")
    same(ref, m)


def test_a_changed_source_file_invalidates_the_entry(ckpt: Path) -> None:
    run(ckpt, 4)
    [old] = entries()
    shard = sorted(ckpt.glob("*.bin"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    m = run(ckpt, 4)
    assert m.info.extra["quant_cache"].startswith("quantized on the fly (cached to")
    [new] = entries()  # the stale entry is gone, the new one took its place
    assert new != old
    run(ckpt, 8)
    assert len(entries()) == 2  # another width is another entry


def test_a_truncated_entry_is_ignored_and_rebuilt(ckpt: Path) -> None:
    ref = run(ckpt, 4)
    [entry] = entries()
    part = sorted(entry.glob("*.safetensors"))[0]
    part.write_bytes(part.read_bytes()[:100])
    m = run(ckpt, 4)
    assert m.info.extra["quant_cache"].startswith("quantized on the fly (cached to")
    same(ref, m)
    assert run(ckpt, 4).info.extra["quant_cache"].startswith("loaded quantized cache")


def test_an_entry_garbled_in_place_is_rebuilt_with_a_warning(ckpt: Path) -> None:
    ref = run(ckpt, 4)
    [entry] = entries()
    part = sorted(entry.glob("*.safetensors"))[0]
    part.write_bytes(b"\xff" * part.stat().st_size)  # the size still matches the manifest
    m = run(ckpt, 4)
    assert m.cache_warnings and "unreadable" in m.cache_warnings[0]
    assert m.info.extra["quant_cache"].startswith("quantized on the fly (cached to")
    same(ref, m)


def test_a_stale_manifest_is_ignored(ckpt: Path) -> None:
    run(ckpt, 4)
    [entry] = entries()
    (entry / "manifest.json").write_text("{not json")
    m = run(ckpt, 4)
    assert m.info.extra["quant_cache"].startswith("quantized on the fly (cached to")


def test_an_unwritable_cache_dir_warns_once_and_loads(ckpt: Path) -> None:
    home = Path(os.environ["LLMCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "cache").write_text("a file where the cache directory would be")
    m = run(ckpt, 4)
    assert len(m.cache_warnings) == 1 and "not caching" in m.cache_warnings[0]
    assert m.info.extra["quant_cache"] == "quantized on the fly (not cached)"
    same(m, run(ckpt, 4, quant_cache=False))


def test_a_full_disk_mid_write_leaves_nothing_behind(ckpt: Path, monkeypatch: Any) -> None:
    calls = []

    def full(*args: Any, **kw: Any) -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "write_safetensors", full)
    monkeypatch.setattr(cache, "SHARD_BYTES", 1)  # a part file per tensor: it fails early
    m = run(ckpt, 8)
    assert len(m.cache_warnings) == 1 and "No space left" in m.cache_warnings[0]
    assert len(calls) == 1  # gave up at the first failure
    assert m.info.extra["quant_cache"] == "quantized on the fly (not cached)"
    assert list(cache.cache_root().iterdir()) == []  # no entry, no temporary directory
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    m = run(ckpt, 8)
    assert "free" in m.cache_warnings[0] and list(cache.cache_root().iterdir()) == []


def test_env_turns_the_cache_off(ckpt: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("LLMCHAT_QUANT_CACHE", "0")
    m = run(ckpt, 4)
    assert m.info.extra["quant_cache"] == "quantized on the fly (cache off)"
    assert entries() == []


def test_no_cache_for_float_or_prequantized_loads(ckpt: Path, tmp_path: Path) -> None:
    from llmchat.loader import checkpoint_files, iter_tensors
    from tests.test_quant import LINEAR_SUFFIXES, prequantize

    m = load(model_path=ckpt, device="cpu", dtype="float32")
    assert "quant_cache" not in m.info.extra and entries() == []
    sd = prequantize(dict(iter_tensors(checkpoint_files(ckpt))), 4, LINEAR_SUFFIXES)
    pre = chatglm2_checkpoint(tmp_path / "int4", state_dict=sd, quantization_bit=4)
    m = run(pre, 4)
    assert m.info.quant == 4 and "quant_cache" not in m.info.extra and entries() == []


def test_verbose_names_the_path_taken(ckpt: Path) -> None:
    from typer.testing import CliRunner

    from llmchat.cli import app

    args = ["ask", "-p", str(ckpt), "--device", "cpu", "--quant", "4", "--temperature", "0",
            "--max-new-tokens", "4", "--verbose", "hi"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "quantized on the fly (cached to" in " ".join(first.stderr.split())
    second = CliRunner().invoke(app, args)
    assert "loaded quantized cache" in second.stderr and second.stdout == first.stdout


def test_write_safetensors_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randint(-128, 127, (4, 2),
                                                                  dtype=torch.int8),
               "c": torch.randn(7).bfloat16(), "d": torch.tensor(2.5), "e": torch.zeros(0, 3),
               "f": torch.arange(6, dtype=torch.int64).view(2, 3).T}  # not contiguous
    cache.write_safetensors(tmp_path / "x.safetensors", tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as st:
        back = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("name", ["chatglm-6b", "qwen-7b-chat", "visualglm-6b"])
def test_every_other_model_loads_the_same_from_its_cache(name: str, tmp_path: Path) -> None:
    from tests.test_every_model import BUILDERS

    path = BUILDERS[name](tmp_path / name)
    first, second = run(path, 4), run(path, 4)
    assert second.info.extra["quant_cache"].startswith("loaded quantized cache")
    a, b = dense_buffers(first.model), dense_buffers(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = dict(first.model.named_parameters()), dict(second.model.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_a_writer_that_finishes_second_keeps_the_first_entry(ckpt: Path) -> None:
    from llmchat.loader import checkpoint_files
    from llmchat.models import chatglm2

    entry = cache.QuantCache.for_source(ckpt, checkpoint_files(ckpt), 4, "llmchat.models.chatglm2",
                                        chatglm2.QUANT_LINEARS)
    late = entry.writer()  # started before the other process finished
    assert late is not None
    run(ckpt, 4)
    [written] = entries()[-1:]
    stamp = (written / "manifest.json").read_text()
    late.add("x", torch.zeros(2), fresh=True)
    assert late.commit()
    assert (entry.dir / "manifest.json").read_text() == stamp
    assert [p.name for p in cache.cache_root().iterdir()] == [entry.dir.name]  # no tmp left
