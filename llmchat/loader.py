"""Load a hub-format checkpoint directory into a native model, memory-lean and safely.

Order: find the directory (local, or the hub cache via huggingface_hub) → read config.json →
``registry.detect`` → ``Config.from_hf`` → tokenizer (fail fast) → build the model on the meta
device → swap in quantized linears (``--quant``) → stream the shards tensor by tensor
(``safetensors.safe_open``, or ``torch.load(weights_only=True, mmap=True)`` for ``.bin``),
casting and moving each tensor to its device as it arrives → strict check for missing keys.

No file from the model directory is ever executed: only JSON, tensors and tokenizer files are
read, and hub downloads skip ``*.py``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import resource
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from llmchat.errors import CheckpointError, DeviceError, UsageError
from llmchat.models.base import ChatModel, LoadInfo, TransformerChatModel, contract
from llmchat.quant import QuantSummary, prepare_model
from llmchat.registry import (
    ModelSpec,
    cached_snapshot,
    detect,
    hub_cache_dir,
    lookup,
    read_tokenizer_config,
    repo_for,
    resolve,
)
from llmchat.safeio import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, inside, read_json
from llmchat.threads import apply_threads
from llmchat.types import parse_quant

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

HUB_PATTERNS = ["*.json", "*.bin", "*.safetensors", "*.model", "*.tiktoken"]  # never *.py
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


# -- device and dtype -----------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"invalid --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: CUDA is not available (torch {torch.__version__}); "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return dev


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_dtype(
    dtype: str, device: torch.device, spec: ModelSpec, quant: int, fp32_bytes: int = 0
) -> torch.dtype:
    """``auto``: the model's upstream CUDA dtype on GPU (bf16 with ``--quant 4``, only where
    supported). On CPU fp32
    (what upstream runs there), unless ``fp32_bytes`` would not fit in the available memory,
    and bf16 with ``--quant 8/4`` because torch's CPU int8/int4 kernels are fast only with bf16."""
    name = (dtype or "auto").strip().lower()
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        if device.type == "cuda":
            name = spec.cuda_dtype
            if quant == 4:  # torch's CUDA int4 kernel takes bfloat16 activations only
                name = "bfloat16"
            if name == "bfloat16" and not torch.cuda.is_bf16_supported():
                name = "float16"
        elif quant != 16:
            name = "bfloat16"
        else:
            free = available_memory_bytes()
            name = "bfloat16" if free and fp32_bytes > 0.8 * free else "float32"
    if name not in DTYPES:
        raise UsageError(f"invalid --dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[name]


# -- finding the checkpoint -----------------------------------------------------------------------
def hub_snapshot(spec: ModelSpec | str, *, download: bool = True) -> Path:
    """A preset's (or a hub repository's) directory in the standard Hugging Face cache,
    downloading it if allowed."""
    repo = spec if isinstance(spec, str) else spec.hub_id
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - declared dependency
        raise CheckpointError("huggingface_hub is not installed; use --model-path DIR") from None
    offline = not download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        path = snapshot_download(
            repo,
            allow_patterns=HUB_PATTERNS,
            local_files_only=offline,
            cache_dir=hub_cache_dir(),
        )
    except Exception as exc:  # hub errors are many and version-dependent
        hint = "it is not in the local cache" if offline else f"download failed: {_short(exc)}"
        raise CheckpointError(
            f"cannot get {repo}: {hint}. Download it, or pass --model-path DIR"
        ) from None
    return Path(path)


def find_checkpoint(
    model: str | None,
    model_path: str | os.PathLike[str] | None,
    *,
    download: bool = True,
    quant: int | str = 16,
) -> Path:
    """The checkpoint directory for ``--model-path`` or ``--model NAME`` (with ``--quant``).

    A preset with ``--quant N`` uses THUDM's official pre-quantized repository where there is one
    (``chatglm2-6b --quant 4`` → THUDM/chatglm2-6b-int4, 3.9 GB instead of 12.5 GB); so does a
    name like ``chatglm2-6b-int4``. Only when that repository is not cached but the fp16 one is,
    the fp16 one is used and quantized as it loads (the same weights, no download).
    """
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise CheckpointError(f"model directory not found: {path}")
        if not path.is_dir():
            raise CheckpointError(f"--model-path must be a directory: {path}")
        return path
    if not model:
        raise UsageError("no model given: use --model NAME or --model-path DIR")
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    spec, named_bits = lookup(model)
    bits = parse_quant(quant)
    if named_bits and bits not in (16, named_bits):
        raise UsageError(
            f"{model} is pre-quantized to int{named_bits}: use --quant {named_bits}, "
            f"or --model {spec.name} --quant {bits}"
        )
    repo = repo_for(spec, named_bits or bits)
    if repo != spec.hub_id and not named_bits and cached_snapshot(repo) is None:
        base = cached_snapshot(spec.hub_id)
        if base is not None:
            return base
    return hub_snapshot(repo, download=download)


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"no config.json in {path}")
    data = read_json(cfg_path, max_bytes=MAX_CONFIG_BYTES, what="config.json")
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    return data


# -- shards ---------------------------------------------------------------------------------------
def read_index(path: Path) -> tuple[str, dict[str, str]] | None:
    """(index file name, weight_map) of a sharded checkpoint, or None when it is not sharded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if not index.exists() and not index.is_symlink():
            continue
        data = read_json(index, max_bytes=MAX_INDEX_BYTES, what=index_name)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_name} has no weight_map of tensor names to shard files")
        for key, name in weight_map.items():
            inside(path, name, what=f"{index_name} entry {key!r}")
        return index_name, weight_map
    return None


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint, in index order; every listed shard must exist."""
    found = read_index(path)
    if found is not None:
        index_name, weight_map = found
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                raise CheckpointError(f"shard {name} listed in {index_name} is missing from {path}")
        return [path / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"no weights in {path} (expected pytorch_model*.bin or *.safetensors)"
        )
    return files


def checkpoint_keys(path: Path, files: list[Path]) -> tuple[list[str], str] | None:
    """The tensor names without reading any tensor (the index, or safetensors headers), and
    where they came from; None for unindexed ``.bin`` files (checked as they stream)."""
    found = read_index(path)
    if found is not None:
        return list(found[1]), f"{found[0]} weight_map"
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open

        keys: list[str] = []
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    keys.extend(st.keys())  # noqa: SIM118 - safe_open has no __iter__
            except Exception:  # unreadable: iter_tensors names the problem
                return None
        return keys, "the safetensors files"
    return None


LAYER_KEY = re.compile(r"^(.+)\.(\d+)\.")


def check_layer_counts(cfg: Any, keys: Iterable[str], source: str) -> None:
    """Each layer stack's size in config.json must match the checkpoint's own layer keys."""
    seen: dict[str, set[int]] = {}
    for key in keys:
        m = LAYER_KEY.match(key)
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, (json_key, n) in cfg.layer_counts().items():
        got = seen.get(prefix, set())
        if got != set(range(n)):
            have = f"layers {min(got)}..{max(got)} ({len(got)} in all)" if got else "no layers"
            raise CheckpointError(
                f"config.json {json_key} is {n} but {source} has {have} under {prefix}.*"
            )


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise CheckpointError(_refused(file, exc)) from None
        raise CheckpointError(_corrupt(file)) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError):
        raise CheckpointError(_corrupt(file)) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file.name} does not hold a state dict")
    return sd


def _refused(file: Path, exc: BaseException) -> str:
    """The weights-only unpickler met something other than tensors: name it, never suggest
    turning the protection off (torch's own hint does)."""
    m = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(exc))
    what = f" ({m.group(1)})" if m else ""
    return (
        f"refusing to load {file.name}: it contains code or objects{what} besides tensors, "
        "which llmchat never loads; use a checkpoint that holds only weights (e.g. safetensors)"
    )


def _corrupt(file: Path) -> str:
    try:
        size = f"{file.stat().st_size:,} bytes"
    except OSError:
        size = "unreadable"
    return (
        f"cannot read {file.name} ({size}): the file is truncated or corrupt; "
        "download it again"
    )


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) shard by shard; each shard is released before the next is opened.
    A tensor name found in two shards is refused (which copy would win is arbitrary)."""
    origin: dict[str, str] = {}

    def once(key: str, file: Path) -> None:
        if key in origin:
            raise CheckpointError(
                f"tensor {key} is in both {origin[key]} and {file.name}; refusing the ambiguity"
            )
        origin[key] = file.name

    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        once(key, file)
                        yield key, f.get_tensor(key)
            except CheckpointError:
                raise
            except Exception:  # SafetensorError and friends
                raise CheckpointError(_corrupt(file)) from None
        else:
            sd = _torch_load(file)
            for key in list(sd):
                t = sd.pop(key)
                if not isinstance(key, str) or not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{file.name}: {key!r} is not a named tensor")
                once(key, file)
                yield key, t
            del sd


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer ``name`` with ``tensor``."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def load_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    checkpoint_key: Callable[[str], str | None],
    *,
    dtype: torch.dtype,
    device: torch.device,
    total_bytes: int = 0,
    progress: Progress | None = None,
    sink: Callable[[str, torch.Tensor, bool], None] | None = None,
) -> None:
    """Stream (key, tensor) pairs into a meta-built model, strictly.

    Each tensor is cast and moved as it arrives (or handed to its quantized linear), so at most
    one checkpoint tensor is held in floating point besides the model being built. ``sink``
    receives every tensor taken, by checkpoint key, as stored (quantized linears: in the upstream
    pre-quantized layout), and whether it was computed here rather than read — the quantized
    cache.
    """
    expected = {n: p for n, p in model.named_parameters()}
    expected.update(dict(model.named_buffers()))
    total = total_bytes
    done = 0
    unexpected: list[str] = []
    for key, t in tensors:
        name = checkpoint_key(key)
        if name is None:
            continue
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            unexpected.append(key)
            continue
        hook = getattr(owner, "load_checkpoint_tensor", None)
        if hook is not None:  # quantized linears take their own tensors
            taken = hook(attr, t, dtype=dtype, device=device, key=key)
            if sink is not None:
                for k, v in taken.items():
                    sink(k, v, v is not t)
        elif name in expected:
            want = expected[name].shape
            if tuple(t.shape) != tuple(want):
                raise CheckpointError(
                    f"{key} has shape {tuple(t.shape)} in the checkpoint but config.json "
                    f"implies {tuple(want)}"
                )
            if sink is not None:
                sink(key, t, False)
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            assign(model, name, t)
        else:
            unexpected.append(key)
        done += t.numel() * t.element_size()
        if progress is not None:
            progress(min(done, total) if total else done, total or done)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" …" if len(unexpected) > 3 else "")
        raise CheckpointError(f"unexpected keys in the checkpoint ({len(unexpected)}): {shown}")
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        raise CheckpointError(f"missing keys in the checkpoint ({len(missing)}): {shown}")


def build_notes(net: nn.Module, summary: QuantSummary) -> dict[str, Any]:
    """What building chose, for ``LoadInfo.extra``: the quant backend and the CPU linear path."""
    return {**summary.extra(), **getattr(net, "cpu_linear_extra", {})}


def build_model(
    module: ModuleType,
    cfg: Any,
    tensors: Iterable[tuple[str, torch.Tensor]],
    **kwargs: Any,
) -> nn.Module:
    """``build_model_and_summary`` without the summary (benchmarks building random models)."""
    return build_model_and_summary(module, cfg, tensors, **kwargs)[0]


def build_model_and_summary(
    module: ModuleType,
    cfg: Any,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    bits: int,
    checkpoint_bits: int,
    dtype: torch.dtype,
    device: torch.device,
    total_bytes: int = 0,
    progress: Progress | None = None,
    sink: Callable[[str, torch.Tensor, bool], None] | None = None,
    training: bool = False,
) -> tuple[nn.Module, QuantSummary]:
    """Build ``module.Model(cfg)`` on the meta device, swap in quantized linears, then fill it
    from ``tensors`` (a checkpoint stream, or random tensors for benchmarks). Returns the model
    and what quantization did. ``training``: gradients will flow through the model (P-tuning),
    so its CPU weights are not packed for oneDNN (``llmchat.cpu_linear``)."""
    with torch.device("meta"):
        net = module.Model(cfg)
    summary = QuantSummary()
    if bits != 16 or checkpoint_bits:
        summary = prepare_model(
            net,
            module.QUANT_LINEARS,
            bits,
            checkpoint_bits=checkpoint_bits,
            dtype=dtype,
            device=device,
            skip=contract(module).quant_skip,
        )
    from llmchat.cpu_linear import finish_cpu_linears, prepare_cpu_linears

    prepare_cpu_linears(net, device, dtype, training=training)  # CPU: oneDNN-packed, fp32 prompts
    load_weights(
        net,
        tensors,
        module.checkpoint_key,
        dtype=dtype,
        device=device,
        total_bytes=total_bytes,
        progress=progress,
        sink=sink,
    )
    finish_cpu_linears(net)
    return net.eval(), summary


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def load(
    model: str | None = None,
    *,
    model_path: str | os.PathLike[str] | None = None,
    quant: int | str = 16,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    download: bool = True,
    ptuning: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    quant_cache: bool | None = None,
    training: bool = False,
) -> ChatModel:
    """Load a preset (``chatglm2``) or a checkpoint directory into a ``ChatModel``.

    ``threads``: torch's CPU thread count (default: the free physical cores, see
    ``llmchat.threads``), set before anything runs and reported as ``info.extra["threads"]``.
    ``quant_cache``: keep (and reuse) the result of quantizing a float checkpoint on the fly
    (``llmchat.quant.cache``; default: on unless ``LLMCHAT_QUANT_CACHE=0``).
    ``training``: the model will be trained through (see ``build_model_and_summary``).
    """
    t0 = time.perf_counter()
    bits = parse_quant(quant)
    n_threads = apply_threads(threads)
    dev = resolve_device(device)
    path = find_checkpoint(model, model_path, download=download, quant=bits)
    hf = read_config(path)
    spec = detect(hf, read_tokenizer_config(path))
    if model and model_path is not None and not Path(model).is_dir():
        asked = resolve(model)
        if asked.name != spec.name:
            raise UsageError(f"--model {model} but {path} holds a {spec.name} checkpoint")
    module = importlib.import_module(spec.module)
    contract(module)  # a module missing part of the model contract fails here, loudly
    cfg = module.Config.from_hf(hf)
    prefix = None
    if ptuning is not None:  # fail on a bad prefix before the (slow) weight load
        from llmchat.ptuning import load_prefix

        prefix = load_prefix(ptuning, spec.module, cfg)
    tokenizer = module.load_tokenizer(path)
    files = checkpoint_files(path)
    listed = checkpoint_keys(path, files)
    if listed is not None:
        check_layer_counts(cfg, *listed)
    fp32_bytes = 2 * sum(f.stat().st_size for f in files)  # checkpoints are fp16
    torch_dtype = resolve_dtype(
        dtype, dev, spec, min(bits, int(hf.get("quantization_bit") or 16)), fp32_bytes
    )
    ckpt_bits = int(hf.get("quantization_bit") or 0)

    def build(weights: list[Path], checkpoint_bits: int, sink: Any = None) -> Any:
        return build_model_and_summary(
            module,
            cfg,
            iter_tensors(weights),
            bits=bits,
            checkpoint_bits=checkpoint_bits,
            dtype=torch_dtype,
            device=dev,
            progress=progress,
            total_bytes=sum(f.stat().st_size for f in weights),
            sink=sink,
            training=training,
        )

    if bits != 16 and not ckpt_bits:  # quantized on the fly: through the cache
        net, summary, cache_note = _build_quantized(build, path, files, bits, spec.module,
                                                    module.QUANT_LINEARS, quant_cache)
    else:
        (net, summary), cache_note = build(files, ckpt_bits), None
    info = LoadInfo(
        path=str(path),
        device=str(dev),
        dtype=str(torch_dtype).removeprefix("torch."),
        quant=bits if bits != 16 else (ckpt_bits or 16),
        weight_bytes=sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()]),
        load_s=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )
    info.extra.update(build_notes(net, summary))  # named by --verbose
    info.extra["threads"] = n_threads
    if cache_note:
        info.extra["quant_cache"] = cache_note
    if (dtype or "auto") == "auto" and dev.type == "cpu" and torch_dtype == torch.bfloat16 and (
        bits == 16 and not ckpt_bits
    ):
        info.extra["note"] = (
            f"float32 needs {fp32_bytes / 2**30:.1f} GiB, more than the free memory allows: "
            "running in bfloat16 (pass --dtype float32 to insist)"
        )
    chat_cls = contract(module).chat_model_class or TransformerChatModel
    chat = chat_cls(spec, module, net, tokenizer, info)
    if prefix is not None:
        chat.use_prefix(prefix)
    return chat


def _build_quantized(
    build: Callable[..., Any],
    path: Path,
    files: list[Path],
    bits: int,
    arch: str,
    linears: tuple[str, ...],
    use_cache: bool | None,
) -> tuple[nn.Module, QuantSummary, str]:
    """Load a float checkpoint quantized to ``bits``: from the quantized cache when it holds
    this checkpoint, else quantizing as it streams and writing the cache entry as it goes."""
    from llmchat.quant import cache

    if not (cache.enabled() if use_cache is None else use_cache):
        net, summary = build(files, 0)
        return net, summary, "quantized on the fly (cache off)"
    entry = cache.QuantCache.for_source(path, files, bits, arch, linears)
    cached = entry.lookup()
    if cached is not None:
        try:
            net, summary = build(cached, bits)
            return net, summary, f"loaded quantized cache {entry.dir}"
        except CheckpointError as exc:  # damaged after its manifest was written: rebuild it
            warnings.warn(f"the quantized cache {entry.dir} is unreadable ({exc}); rebuilding it",
                          cache.QuantCacheWarning, stacklevel=2)
            entry.discard()
    source_bytes = sum(f.stat().st_size for f in files)
    writer = entry.writer(expected_bytes=source_bytes * bits // 16)
    try:
        net, summary = build(files, 0, writer.add if writer else None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None and writer.commit():
        return net, summary, f"quantized on the fly (cached to {entry.dir})"
    return net, summary, "quantized on the fly (not cached)"

