"""htrd.images in-process: every format and pixel mode becomes correct 8-bit RGB; bad input is a clear 4xx."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from htrd.api_errors import ApiError
from htrd.faults import Faults
from htrd.images import decode_image, sniff

LIMIT = 10_000_000


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def one(data: bytes) -> Image.Image:
    pages = decode_image(data, max_pixels=LIMIT)
    assert len(pages) == 1
    assert pages[0].image.mode == "RGB"
    return pages[0].image


def test_sniff():
    assert sniff(enc(Image.new("RGB", (4, 4)), "PNG")) == "PNG"
    assert sniff(enc(Image.new("RGB", (4, 4)), "JPEG")) == "JPEG"
    assert sniff(enc(Image.new("RGB", (4, 4)), "TIFF")) == "TIFF"
    assert sniff(enc(Image.new("RGB", (4, 4)), "WEBP")) == "WEBP"
    assert sniff(b"GIF89a....") is None


def test_sixteen_bit_gray_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256).repeat(4, axis=0)
    for fmt in ("PNG", "TIFF"):
        img = one(enc(Image.fromarray(ramp), fmt))
        row = np.asarray(img)[0, :, 0]
        assert row[0] == 0 and row[-1] == 255
        assert row[128] in (127, 128)  # mid-grey stays mid-grey (convert('L') would give 255)


def test_cmyk_jpeg_and_tiff_become_rgb():
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    for fmt in ("JPEG", "TIFF"):
        r, g, b = one(enc(red, fmt)).getpixel((8, 8))
        assert r > 200 and g < 60 and b < 60, (fmt, r, g, b)


def test_alpha_and_palette_transparency_composite_on_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert one(enc(clear, "PNG")).getpixel((1, 1)) == (255, 255, 255)
    assert one(enc(clear.convert("LA"), "PNG")).getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert one(enc(pal, "PNG", transparency=0)).getpixel((1, 1)) == (255, 255, 255)
    pal.paste(1, (0, 0, 8, 8))
    assert one(enc(pal, "PNG")).getpixel((1, 1)) == (10, 20, 30)


def test_one_bit_and_gray():
    assert one(enc(Image.new("1", (8, 8), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert one(enc(Image.new("L", (8, 8), 77), "TIFF")).getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 10), "white")
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red block on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = one(enc(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (10, 40)
    r, g, b = out.getpixel((5, 5))  # the red block is now at the top
    assert r > 200 and g < 60


def test_multipage_tiff_pages_and_limit():
    frames = [Image.new("L", (20, 10), v) for v in (10, 120, 240)]
    data = enc(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    pages = decode_image(data, max_pixels=LIMIT)
    assert [p.index for p in pages] == [0, 1, 2]
    assert [p.image.getpixel((0, 0))[0] for p in pages] == [10, 120, 240]
    with pytest.raises(ApiError) as exc:
        decode_image(data, max_pixels=LIMIT, max_pages=2)
    assert exc.value.status == 413 and "3 pages" in exc.value.message


def test_pixel_limit_checked_on_the_declared_size():
    data = enc(Image.new("L", (300, 200)), "PNG")
    with pytest.raises(ApiError) as exc:
        decode_image(data, max_pixels=300 * 200 - 1)
    assert exc.value.status == 413 and "300x200" in exc.value.message
    assert one(data).size == (300, 200)


@pytest.mark.parametrize("data,status", [(b"", 400), (b"BM\x00\x00", 415), (b"\x89PNG\r\n\x1a\nnonsense", 422),
                                         (b"RIFF\x00\x00\x00\x00WEBPVP8 junk", 422)])
def test_bad_bytes(data, status):
    with pytest.raises(ApiError) as exc:
        decode_image(data, max_pixels=LIMIT)
    assert exc.value.status == status
    assert exc.value.type == "bad_image" and exc.value.message


def test_faults_parse():
    f = Faults.parse("hang_generate, slow_load=1.5,oom=2,slow_generate=0.25,crash")
    assert f.hang_generate and f.crash and f.slow_load_s == 1.5 and f.slow_generate_s == 0.25
    assert [f.take_oom(), f.take_oom(), f.take_oom()] == [True, True, False]
    assert not Faults.parse(None).active and not Faults.parse("").active
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.parse("meteor")
    with pytest.raises(ValueError, match="slow_load"):
        Faults.parse("slow_load=soon")
