"""The quantized cache: what ``--quant 8/4`` made of a float checkpoint, kept for the next start.

An entry is ``data_dir()/cache/quantized/<name>-int<bits>-<key>/``: safetensors files in the
upstream pre-quantized layout under the checkpoint's own key names (int8 ``weight`` or packed
int4, fp16 ``weight_scale``, every other tensor as the checkpoint stores it) and a
``manifest.json``. It loads the way an official pre-quantized checkpoint does, so it gives the
very same weights as quantizing again. ``key`` hashes what the result depends on and what is
cheap to read: the weight files' resolved paths, sizes and mtimes, the width, the architecture's
quantized linears and ``FORMAT_VERSION`` (no hashing of gigabytes).

Caching never costs a start: an entry is written to a temporary directory and renamed into place
only when complete; a full disk or a read-only directory skips it with one warning; an entry
that does not match its manifest is ignored, removed and rebuilt. ``LLMCHAT_QUANT_CACHE=0``
turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT_VERSION = 1  # bump when the meaning of a cached tensor changes
ENV = "LLMCHAT_QUANT_CACHE"
SHARD_BYTES = 256 << 20  # tensors held before a part file is written (bounds the extra memory)
STALE_TMP_S = 24 * 3600  # a temporary directory this old belongs to a run that died
MANIFEST = "manifest.json"


class QuantCacheWarning(UserWarning):
    """The quantized cache could not be written or read (the load goes on without it)."""


def enabled() -> bool:
    """False when ``LLMCHAT_QUANT_CACHE`` is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    """``cache/quantized`` in llmchat's data dir (``$LLMCHAT_HOME``, else the platform's)."""
    from llmchat.paths import data_dir

    return data_dir() / "cache" / "quantized"


def _stat(path: Path) -> dict[str, Any]:
    real = path.resolve()
    st = real.stat()
    return {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class QuantCache:
    """The cache entry for one float checkpoint quantized to ``bits``."""

    dir: Path
    source: dict[str, Any]  # what the key hashes (also kept in the manifest)

    @classmethod
    def for_source(cls, checkpoint: Path, files: Sequence[Path], bits: int, arch: str,
                   linears: Sequence[str], root: Path | None = None) -> QuantCache:
        source = {
            "format": FORMAT_VERSION, "bits": bits, "arch": arch, "linears": list(linears),
            "checkpoint": str(checkpoint.resolve()), "files": [_stat(f) for f in files],
        }
        digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint.resolve().name)[:48] or "model"
        return cls((root or cache_root()) / f"{name}-int{bits}-{digest}", source)

    def lookup(self) -> list[Path] | None:
        """The entry's weight files when it is complete and matches its source, else None (an
        entry that does not match is removed)."""
        if not self.dir.is_dir():
            return None
        files = self._check()
        if files is None:
            self.discard()
        return files

    def _check(self) -> list[Path] | None:
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("source") != self.source:
                return None
            files = []
            for entry in manifest["files"]:
                f = self.dir / Path(str(entry["name"])).name
                if f.stat().st_size != int(entry["size"]):
                    return None
                files.append(f)
            return files or None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def writer(self, expected_bytes: int = 0) -> CacheWriter | None:
        """A writer for this entry, or None (with one warning) when it cannot be written."""
        root = self.dir.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            _sweep(root)
            free = shutil.disk_usage(root).free
            if expected_bytes and free < expected_bytes:
                _warn(f"not caching the quantized weights: {root} has {free / 2**30:.1f} GiB "
                      f"free, about {expected_bytes / 2**30:.1f} GiB needed")
                return None
            tmp = root / f".tmp-{self.dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as exc:
            _warn(f"not caching the quantized weights in {root}: {exc.strerror or exc}")
            return None
        return CacheWriter(self, tmp)


class CacheWriter:
    """Collects the checkpoint-layout tensors of one load and writes them as an entry."""

    def __init__(self, cache: QuantCache, tmp: Path) -> None:
        self.cache, self.tmp = cache, tmp
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[dict[str, Any]] = []
        self.failed = False

    def add(self, key: str, tensor: Tensor, fresh: bool = False) -> None:
        """Keep one tensor; every ``SHARD_BYTES`` a part file is written. A tensor that is not
        ``fresh`` (one read from the checkpoint) is copied unless written at once: a reference
        would keep its whole memory-mapped shard resident."""
        if self.failed:
            return
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        if not fresh and size >= SHARD_BYTES:  # a big one (the embeddings): a file of its own
            self._flush()
            self.pending[key] = t
            self._flush()
            return
        self.pending[key] = t if fresh else t.clone()
        self.pending_bytes += size
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending or self.failed:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        try:
            write_safetensors(self.tmp / name, self.pending)
            self.files.append({"name": name, "size": (self.tmp / name).stat().st_size})
        except (OSError, RuntimeError, ValueError) as exc:  # ENOSPC, EROFS, …
            self._fail(exc)
        self.pending, self.pending_bytes = {}, 0

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.pending = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        msg = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        _warn(f"not caching the quantized weights in {self.cache.dir.parent}: {msg}")

    def commit(self) -> bool:
        """Write what is left and the manifest, then move the entry into place."""
        self._flush()
        if self.failed:
            return False
        manifest = {"source": self.cache.source, "files": self.files, "created": time.time()}
        final = self.cache.dir
        try:
            if self.cache._check() is not None:  # another process wrote it meanwhile: keep it
                shutil.rmtree(self.tmp, ignore_errors=True)
                return True
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            _drop_older(final, self.cache.source)
            shutil.rmtree(final, ignore_errors=True)  # a broken entry of the same key
            os.replace(self.tmp, final)
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def abort(self) -> None:
        self.failed = True
        shutil.rmtree(self.tmp, ignore_errors=True)


ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
             torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write a safetensors file straight from the tensors' memory (``safetensors.torch.save_file``
    first copies every tensor into a bytes object, doubling the memory held)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().flatten().view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _drop_older(final: Path, source: dict[str, Any]) -> None:
    """Remove other entries of the same checkpoint and width (its files changed since)."""
    same = {k: source[k] for k in ("checkpoint", "bits", "arch")}
    for other in final.parent.iterdir():
        if other == final or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            theirs = json.loads((other / MANIFEST).read_text(encoding="utf-8"))["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if {k: theirs.get(k) for k in same} == same:
            shutil.rmtree(other, ignore_errors=True)


def _sweep(root: Path) -> None:
    """Remove temporary directories left by runs that died mid-write."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _warn(msg: str) -> None:
    warnings.warn(msg, QuantCacheWarning, stacklevel=3)
