"""``llmchat.images`` on bytes and ``data:`` URIs: the same checks and one-line errors as for
files (the file cases are in tests/models/test_visualglm.py)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llmchat import images
from llmchat.errors import ImageError


def png_bytes(w: int = 12, h: int = 9) -> bytes:
    noise = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries (almost) no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bytes_open_like_the_file(tmp_path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from_file, info_f = images.open_image(tmp_path / "a.png")
    from_bytes, info_b = images.open_image((tmp_path / "a.png").read_bytes(), name="upload")
    assert np.array_equal(np.asarray(from_file), np.asarray(from_bytes))
    assert info_b.notes == info_f.notes and info_b.path == "upload"
    assert (info_b.format, info_b.size, info_b.mode) == ("PNG", (8, 8), "RGBA")


@pytest.mark.parametrize("data, match", [
    (b"", "not an image"),
    (b"hello, world", "not an image"),
    (png_bytes(64, 64)[:2000], "truncated or corrupt"),
    (png_header_only(9000, 9000), r"9000x9000 pixels .*limit"),
    (png_header_only(30000, 30000), "too large"),
])
def test_bad_bytes_get_one_clear_line(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match) as info:
        images.check_image(data, name="the upload")
    assert "\n" not in str(info.value) and "the upload" in str(info.value)


def test_network_formats_exclude_the_rare_decoders() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PPM")
    assert images.check_image(buf.getvalue()).format == "PPM"  # any format Pillow reads
    with pytest.raises(ImageError, match="not an image"):
        images.check_image(buf.getvalue(), formats=images.NETWORK_FORMATS)
    assert images.check_image(png_bytes(), formats=images.NETWORK_FORMATS).format == "PNG"


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_uri_decodes() -> None:
    data = png_bytes()
    assert images.decode_data_uri(uri(data)) == data
    assert images.decode_data_uri(uri(data, "image/jpeg")) == data  # Pillow reads the bytes
    spaced = uri(data).replace(",", ",\n", 1)
    assert images.decode_data_uri(spaced) == data


@pytest.mark.parametrize("text, match", [
    ("http://example.com/a.png", "not a data: URI"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:,hello", "not an image"),
    ("data:image/png,rawbytes", "base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,", "empty"),
    ("data:image/png;base64," + "A" * 4000, "over 1000 bytes"),
])
def test_bad_data_uris(text: str, match: str) -> None:
    with pytest.raises(ImageError, match=match) as info:
        images.decode_data_uri(text, max_bytes=1000 if "AAAA" in text else 1 << 20)
    assert "\n" not in str(info.value)


def test_image_files_are_private_bounded_and_removed() -> None:
    import os
    import stat

    files = images.ImageFiles(keep=2)
    blobs = [png_bytes(8 + i, 8) for i in range(3)]
    paths = [files.path(b, "PNG")[0] for b in blobs]
    assert files.path(blobs[0], "PNG")[0] == paths[0]  # named by content
    for p, b in zip(paths, blobs, strict=True):
        files.put({p: b})
    assert stat.S_IMODE(os.stat(files.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(paths[2]).st_mode) == 0o600
    assert [os.path.exists(p) for p in paths] == [False, True, True]  # the oldest went
    assert open(paths[2], "rb").read() == blobs[2]
    folder = files.dir
    files.close()
    assert not os.path.exists(folder)
