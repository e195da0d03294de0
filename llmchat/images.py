"""Image input: open a picture (a local file or bytes from a ``data:`` URI), check it, and
convert it to RGB the way upstream VisualGLM does (``Image.open(p).convert("RGB")``).

Every refusal is an ``ImageError`` with one line: missing or non-regular files, URLs (nothing
is fetched), data that is no image, truncated or corrupt data, over-large images (pixel count,
decompression-bomb guard) and over-large ``data:`` payloads. The model's own preprocessing
(resize, normalise) stays in ``llmchat.models.blip2.preprocess``.

For ``llmchat serve``: ``read_image_url`` turns an OpenAI ``image_url`` into bytes (``data:``
URIs; local files only inside an allowed folder; never the network) and ``ImageFiles`` keeps
what clients sent as private files for the model to read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmchat.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024  # decompression-bomb guard: larger images are refused
MAX_DATA_BYTES = 16 * 1024 * 1024  # a decoded data: URI image
MAX_FILE_BYTES = 64 * 1024 * 1024  # a file read for a client (--allow-local-images)
EXTENSIONS_HINT = "PNG, JPEG, GIF, BMP, WebP, TIFF"
# What images sent over the network may be (Pillow's format names; a phone's MPO opens as
# JPEG). Local files given on the command line may be any format Pillow reads; what a client
# sends is kept to the common formats, so no rarely used decoder (or EPS's Ghostscript) runs.
NETWORK_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),",
                       re.ASCII)


class ImageRefused(ImageError):
    """An image source that is not allowed: a URL to fetch, a path outside the allowed folder."""


@dataclass
class ImageInfo:
    """What was opened, and any conversion applied on the way to RGB (shown to the user)."""

    path: str  # the file, or a description of in-memory bytes
    format: str
    size: tuple[int, int]
    mode: str
    frames: int = 1
    notes: list[str] = field(default_factory=list)


def decode_data_uri(uri: str, *, max_bytes: int = MAX_DATA_BYTES) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URI; ``ImageError`` (one line) otherwise.

    The size is checked on the encoded length before anything is decoded."""
    m = _DATA_URI.match(uri)
    if m is None:
        raise ImageError("not a data: URI (expected data:image/...;base64,...)")
    mime = (m["mime"] or "").lower()
    if not mime.startswith("image/"):
        raise ImageError(f"a data: URI of type {mime or 'text/plain'!r} is not an image")
    if "base64" not in (p.strip().lower() for p in m["params"].split(";")):
        raise ImageError("a data: URI image must be base64-encoded (data:image/...;base64,...)")
    payload = uri[m.end():]
    if (len(payload) // 4) * 3 > max_bytes + 3:
        raise ImageError(f"the data: URI image is over {_size(max_bytes)}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URI is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageError(f"the data: URI image is over {_size(max_bytes)}")
    if not data:
        raise ImageError("the data: URI image is empty")
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def open_image(source: str | Path | bytes, *, formats: Sequence[str] | None = None,
               name: str | None = None) -> tuple[Image.Image, ImageInfo]:
    """Open an image fully (a local path, or the bytes of one) and convert it to RGB, or raise
    ``ImageError`` (one line). ``formats`` limits the Pillow formats accepted; ``name`` is what
    messages call in-memory bytes (default "the data").

    Refused: URLs, missing files, directories, unreadable or non-image data, truncated or
    corrupt data, and images over ``MAX_PIXELS``. Converted, like upstream's
    ``Image.open(p).convert("RGB")``: palette, greyscale, CMYK (naive, no ICC profile) and
    RGBA/LA (alpha dropped, not composited: what upstream feeds the model). Animated files use
    their first frame, as upstream. Departure: 16/32-bit greyscale and float images are scaled
    to 8 bits first, where upstream's conversion clips them to near-white. EXIF orientation is
    not applied (upstream does not either).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes | bytearray | memoryview):
        text = name or "the data"
        fp: io.BytesIO | Path = io.BytesIO(bytes(source))
    else:
        text = str(source)
        if "://" in text:
            raise ImageError(f"{text}: image URLs are not fetched; download it and pass the "
                             "file path")
        fp = Path(text).expanduser()
        if not fp.exists():
            raise ImageError(f"image not found: {text}")
        if fp.is_dir():
            raise ImageError(f"{text} is a directory, not an image file")
        if not fp.is_file():
            raise ImageError(f"{text} is not a regular file")
    hint = ", ".join(formats) if formats else f"{EXTENSIONS_HINT}, …"
    try:
        with warnings.catch_warnings():  # over Pillow's warning size: our own limit speaks
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=list(formats) if formats else None)
    except UnidentifiedImageError:
        raise ImageError(f"{text} is not an image Pillow can read ({hint})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{text}: image dimensions are too large (decompression-bomb guard)"
                         ) from None
    except OSError as exc:
        raise ImageError(f"cannot read {text}: {exc.strerror or exc}") from None
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(
                f"{text} is {w}x{h} pixels ({w * h / 1e6:.0f} MP), over the "
                f"{MAX_PIXELS / 1e6:.0f} MP limit; scale it down first"
            )
        info = ImageInfo(text, img.format or "?", (w, h), img.mode,
                         int(getattr(img, "n_frames", 1) or 1))
        if info.frames > 1:
            info.notes.append(f"animated ({info.frames} frames): using the first frame")
        try:
            img.seek(0)
            img.load()
            rgb = _to_rgb(img, info)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{text} is truncated or corrupt ({exc})") from None
    return rgb, info


def _to_rgb(img: Image.Image, info: ImageInfo) -> Image.Image:
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        info.notes.append(f"{mode} greyscale scaled to 8 bits")
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        info.notes.append(f"{mode}: transparency dropped, as upstream")
    elif mode == "CMYK":
        info.notes.append("CMYK converted to RGB without a colour profile")
    return img.convert("RGB")


def load_image(source: str | Path | bytes) -> Image.Image:
    """The image (a path or its bytes) as an RGB ``PIL.Image``; ``ImageError`` if unusable."""
    return open_image(source)[0]


def check_image(source: str | Path | bytes, *, formats: Sequence[str] | None = None,
                name: str | None = None) -> ImageInfo:
    """Validate an image before it is attached; its ``notes`` say how it will be converted."""
    return open_image(source, formats=formats, name=name)[1]


# -- images that clients send (llmchat serve) ------------------------------------------------
def read_image_url(url: str, allow_dir: Path | None) -> tuple[bytes, str | None]:
    """The bytes of an OpenAI ``image_url``: a ``data:`` URI, or (only when ``allow_dir`` is
    given) a ``file://`` URL or absolute path inside that folder after resolving symlinks;
    ``http(s)`` is always ``ImageRefused`` (nothing is fetched). Returns the bytes and, for a
    file, its resolved path."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url), None
    if scheme in ("http", "https"):
        raise ImageRefused("image URLs are not fetched (the server makes no network requests): "
                           "send the image as a data:image/...;base64 URI")
    if scheme != "file" and not url.startswith("/"):
        raise ImageRefused("an image must be a data:image/...;base64 URI"
                           + (" or a file:// URL / absolute path in the --allow-local-images "
                              "folder" if allow_dir else ""))
    if allow_dir is None:
        raise ImageRefused("local image paths are refused: only data: URIs are accepted unless "
                           "the server runs with --allow-local-images DIR")
    raw = url
    if scheme == "file":
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageRefused(f"file URL for host {parts.netloc!r} refused: only local files "
                               "are read")
        raw = unquote(parts.path)
    try:
        real = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise ImageError(f"image not found: {raw}") from None
    if not real.is_relative_to(allow_dir):
        raise ImageRefused(f"{raw} is outside the --allow-local-images folder")
    try:  # no symlink now, no blocking on a FIFO
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(f"cannot read {raw}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{raw} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{raw} is over {_size(MAX_FILE_BYTES)}")
        return f.read(MAX_FILE_BYTES + 1), str(real)


class ImageFiles:
    """Images a client sent, kept as private files named by their sha256 in a folder of this
    process's own (0700, removed at exit), so that VisualGLM reads them exactly as
    ``llmchat image`` reads a file and a conversation that sends the same image every turn
    reuses its embeddings. Only the newest ``keep`` stay: ``put`` (one thread at a time: the
    server's generation thread) writes and drops them, so the running reply's file stays."""

    def __init__(self, keep: int = 8) -> None:
        import threading

        self.keep = keep
        self.dir: str | None = None
        self.recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # requests are parsed in several threads

    def path(self, data: bytes, fmt: str) -> tuple[str, str]:
        """Where ``data`` will be kept, and its sha256."""
        with self._lock:
            if self.dir is None:
                import atexit
                import tempfile

                self.dir = tempfile.mkdtemp(prefix="llmchat-images-")
                atexit.register(self.close)
        digest = hashlib.sha256(data).hexdigest()
        return os.path.join(self.dir, f"{digest}.{fmt.lower()}"), digest

    def put(self, files: dict[str, bytes]) -> None:
        import uuid

        for path, data in files.items():
            if not os.path.exists(path):
                tmp = f"{path}.{uuid.uuid4().hex}.part"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            self.recent[path] = None
            self.recent.move_to_end(path)
        while len(self.recent) > max(self.keep, len(files)):
            old, _ = self.recent.popitem(last=False)
            try:
                os.unlink(old)
            except OSError:
                pass

    def close(self) -> None:
        import shutil

        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.recent.clear()
