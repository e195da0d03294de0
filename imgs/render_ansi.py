"""Render a terminal capture (``tmux capture-pane -e -p``) to PNG: how imgs/repl.png is made.

    python imgs/render_ansi.py capture.ansi imgs/repl.png --cols 100

Needs pyte and Pillow, DejaVu Sans Mono and WenQuanYi Micro Hei Mono (Debian: fonts-dejavu-core,
fonts-wqy-microhei). Each terminal cell is drawn on a fixed grid, so CJK (two cells) lines up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyte
from PIL import Image, ImageDraw, ImageFont

FONTS = Path("/usr/share/fonts/truetype")
BG, FG = (30, 31, 40), (220, 223, 228)
PALETTE = {  # a dark theme for the 16 named colours
    "black": (40, 42, 54), "red": (255, 85, 85), "green": (80, 250, 123),
    "brown": (241, 250, 140), "blue": (120, 160, 255), "magenta": (255, 121, 198),
    "cyan": (139, 233, 253), "white": (220, 223, 228),
}
PALETTE |= {f"bright{k}": v for k, v in PALETTE.items()}
PALETTE["yellow"] = PALETTE["brown"]


def color(name: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if name == "default":
        return default
    if name in PALETTE:
        return PALETTE[name]
    try:
        return tuple(int(name[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return default


def render(ansi: str, out: Path, cols: int, size: int = 18, pad: int = 18) -> None:
    pyte.graphics.TEXT[2] = "+blink"  # pyte drops SGR 2 (dim); carry it as "blink"
    pyte.graphics.TEXT[22] = "-blink"
    lines = ansi.rstrip("\n").split("\n")
    screen = pyte.Screen(cols, len(lines))
    pyte.Stream(screen).feed("\r\n".join(lines))
    rows = len(lines)
    while rows > 1 and not "".join(screen.buffer[rows - 1][x].data for x in range(cols)).strip():
        rows -= 1
    mono = ImageFont.truetype(str(FONTS / "dejavu/DejaVuSansMono.ttf"), size)
    bold = ImageFont.truetype(str(FONTS / "dejavu/DejaVuSansMono-Bold.ttf"), size)
    cw, ch = round(mono.getlength("M")), round(size * 1.35)
    cjk_size = 2 * cw - 2  # a CJK glyph fills its two cells
    cjk = ImageFont.truetype(str(FONTS / "wqy/wqy-microhei.ttc"), cjk_size, index=1)
    img = Image.new("RGB", (cols * cw + 2 * pad, rows * ch + 2 * pad), BG)
    draw = ImageDraw.Draw(img)
    for y in range(rows):
        for x in range(cols):
            c = screen.buffer[y][x]
            if not c.data:
                continue
            fg, bg = color(c.fg, FG), color(c.bg, BG)
            if c.reverse:
                fg, bg = bg, fg
            if c.blink:  # dim: halfway to the background
                fg = tuple((a + b) // 2 for a, b in zip(fg, BG, strict=True))
            wide = ord(c.data[0]) > 0x2E80
            left, top = pad + x * cw, pad + y * ch
            if bg != BG:
                draw.rectangle([left, top, left + cw * (1 + wide) - 1, top + ch - 1], fill=bg)
            font = cjk if wide or not mono.getmask(c.data).getbbox() else (bold if c.bold else mono)
            dy = (ch - (cjk_size if font is cjk else size)) // 2
            draw.text((left + (font is cjk and wide), top + dy), c.data, font=font, fill=fg)
    img.save(out, optimize=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("capture", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--cols", type=int, default=100)
    args = ap.parse_args()
    render(args.capture.read_text(encoding="utf-8"), args.png, args.cols)
