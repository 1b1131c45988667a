"""Regenerate the sample images shipped in htrctl/data/samples/ (used by `htrctl demo`).

    .venv/bin/python bench/make_samples.py [DEST]

Small line images of rendered text (Pillow's built-in font), like the line
crops an HTR model transcribes, and one 2-page TIFF. Deterministic: the same
Pillow version writes the same bytes. Kept well under 100 KB in total.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LINES = [
    ("line-01.png", "In principio erat verbum"),
    ("line-02.png", "et verbum erat apud deum"),
    ("line-03.jpg", "Pater noster qui es in caelis"),
]
TIFF_PAGES = ["Anno domini millesimo", "quadringentesimo octavo"]


def render_line(text: str, *, height: int = 48) -> Image.Image:
    font = ImageFont.load_default(size=28)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right + 24, height), 255)
    draw = ImageDraw.Draw(img)
    draw.text((12, (height - (bottom - top)) // 2 - top), text, fill=20, font=font)
    # A faint ruled baseline, as on a manuscript page.
    draw.line([(4, height - 8), (img.width - 4, height - 8)], fill=200, width=1)
    return img


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in LINES:
        img = render_line(text)
        if name.endswith(".jpg"):
            img.save(dest / name, quality=85, optimize=True)
        else:
            img.save(dest / name, optimize=True)
    pages = [render_line(t) for t in TIFF_PAGES]
    pages[0].save(dest / "page-2p.tif", save_all=True, append_images=pages[1:], compression="tiff_adobe_deflate")
    total = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    print(f"{dest}: {len(LINES) + 1} files, {total} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "htrctl/data/samples")
