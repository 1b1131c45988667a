"""htrd.images in-process: every format and pixel mode becomes correct 8-bit RGB; bad input is a clear 4xx."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from htrd.api_errors import ApiError
from htrd.faults import Faults
from htrd.images import decode_image, iter_pages, read_header, sniff
from PIL import Image

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


def test_sniff_names_the_supported_formats_and_nothing_else():
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


def test_one_bit_and_gray_images_become_rgb():
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


def test_a_multipage_tiff_gives_every_page_and_too_many_pages_are_a_413():
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
def test_undecodable_bytes_are_a_bad_image_4xx(data, status):
    with pytest.raises(ApiError) as exc:
        decode_image(data, max_pixels=LIMIT)
    assert exc.value.status == status
    assert exc.value.type == "bad_image" and exc.value.message


def test_fault_specs_parse_and_unknown_ones_are_refused():
    f = Faults.parse("hang_generate, slow_load=1.5,oom=2,slow_generate=0.25,crash")
    assert f.hang_generate and f.crash and f.slow_load_s == 1.5 and f.slow_generate_s == 0.25
    assert [f.take_oom(), f.take_oom(), f.take_oom()] == [True, True, False]
    assert not Faults.parse(None).active and not Faults.parse("").active
    with pytest.raises(ValueError, match="unknown fault"):
        Faults.parse("meteor")
    with pytest.raises(ValueError, match="slow_load"):
        Faults.parse("slow_load=soon")


# -- headers before pixels ---------------------------------------------------------------------------------
def deflate_tiff(pages: int, size=(1000, 1000)) -> bytes:
    """The amplification case of issue 14: a few KB of Deflate TIFF that decodes to pages x size pixels."""
    frames = [Image.new("L", size, 255) for _ in range(pages)]
    return enc(frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_adobe_deflate")


def test_read_header_counts_every_page_without_decoding():
    data = deflate_tiff(8)
    assert len(data) < 64_000
    header = read_header(data, max_pixels=LIMIT, max_pages=16)
    assert header.format == "TIFF" and header.pages == 8 and header.pixels == 8_000_000
    # Proof that nothing was decoded: the same headers over garbage pixel data read just as well.
    garbage = bytearray(data)
    first_ifd = struct.unpack("<I", data[4:8])[0]
    garbage[8:first_ifd] = b"\xa5" * (first_ifd - 8)  # page 0's compressed strips, destroyed
    assert read_header(bytes(garbage), max_pixels=LIMIT, max_pages=16) == header
    with pytest.raises(ApiError) as exc:
        list(iter_pages(bytes(garbage), header))
    assert exc.value.type == "bad_image"


def test_read_header_refuses_too_many_pages_and_large_pages_up_front():
    data = deflate_tiff(3, (100, 100))
    with pytest.raises(ApiError) as exc:
        read_header(data, max_pixels=LIMIT, max_pages=2)
    assert exc.value.status == 413 and exc.value.detail == {"pages": 3, "max_images_per_request": 2}
    with pytest.raises(ApiError) as exc:
        read_header(data, max_pixels=100 * 100 - 1, max_pages=8)
    assert exc.value.status == 413 and "100x100" in exc.value.message


def test_iter_pages_decodes_one_page_at_a_time():
    frames = [Image.new("RGB", (30, 10), (v, v, v)) for v in (10, 120, 240)]
    data = enc(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    pages = iter_pages(data, read_header(data, max_pixels=LIMIT))
    first = next(pages)
    assert first.image.getpixel((0, 0)) == (10, 10, 10)
    second = next(pages)  # an RGB page is its own image, not the file object that moved on
    assert first.image.getpixel((0, 0)) == (10, 10, 10) and second.image.getpixel((0, 0)) == (120, 120, 120)
    assert [p.index for p in pages] == [2]


# -- colour profiles ---------------------------------------------------------------------------------------
def _profile(space: str) -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize("space", ["sRGB", "LAB", "junk"])
def test_cmyk_with_a_profile_of_another_space_falls_back_to_the_plain_conversion(fmt, space):
    """A CMYK file whose embedded ICC profile is sRGB or Lab (littleCMS: PyCMSError "cannot build transform"), or
    no profile at all: the documented fallback, the plain CMYK formula -- not a 500."""
    icc = b"junk" * 40 if space == "junk" else _profile(space)
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    r, g, b = one(enc(red, fmt, icc_profile=icc)).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60, (fmt, space, r, g, b)


# -- every exception a decoder can raise is the image's 4xx ------------------------------------------------
# Raised without a `raise` statement in PIL's Python code: by its C decoders, struct, zlib, the interpreter.
IMPLICIT = (struct.error, KeyError, IndexError, ZeroDivisionError, OverflowError, MemoryError, RecursionError,
            UnicodeDecodeError, AttributeError, AssertionError, zlib.error, BufferError, LookupError, ArithmeticError)


def pillow_exception_types() -> list[type[BaseException]]:
    """Every exception class named in a `raise` statement of PIL's modules (ImageCms and the plugins included),
    resolved to its class, plus IMPLICIT."""
    import ast
    import builtins
    import importlib
    import pkgutil
    import subprocess

    import PIL

    root = Path(PIL.__file__).parent
    names = set()
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                e = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(e, ast.Name):
                    names.add(e.id)
                elif isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "subprocess":
                    names.add("subprocess." + e.attr)
    modules = []
    for info in pkgutil.iter_modules([str(root)]):
        try:
            modules.append(importlib.import_module(f"PIL.{info.name}"))
        except ImportError:  # optional parts (ImageQt, ImageTk...) not built here
            continue
    found: set[type[BaseException]] = set(IMPLICIT)
    for name in names:
        if name.startswith("subprocess."):
            candidates = [getattr(subprocess, name.split(".", 1)[1], None)]
        else:
            candidates = [getattr(builtins, name, None)] + [getattr(m, name, None) for m in modules]
        found |= {c for c in candidates if isinstance(c, type) and issubclass(c, BaseException)}
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def make_exception(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, UnicodeDecodeError):
        return cls("utf-8", b"\xff", 0, 1, "injected")
    if cls.__name__ == "CalledProcessError":
        return cls(1, ["injected"])
    return cls("injected")


EXCEPTION_TYPES = pillow_exception_types()


def test_the_exception_list_covers_pillow_and_imagecms():
    from PIL import ImageCms

    names = {c.__name__ for c in EXCEPTION_TYPES}
    assert {"PyCMSError", "SyntaxError", "OSError", "EOFError", "ValueError", "NotImplementedError", "RuntimeError",
            "DecompressionBombError", "UnidentifiedImageError", "error"} <= names, names
    assert ImageCms.PyCMSError in EXCEPTION_TYPES


STAGES = {
    # where in decoding the exception is raised: the header, a TIFF page's directory, the pixels, the colour
    "open": ("PIL.Image.open", "PNG"),
    "seek": ("PIL.TiffImagePlugin.TiffImageFile.seek", "TIFF"),
    "load": ("PIL.ImageFile.ImageFile.load", "PNG"),
    "lab": ("PIL.ImageCms.applyTransform", "LAB"),
}


def _sample(kind: str) -> bytes:
    if kind == "TIFF":
        frames = [Image.new("L", (20, 10), v) for v in (10, 200)]
        return enc(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    if kind == "LAB":
        return enc(Image.new("RGB", (20, 10), "white").convert("LAB"), "TIFF")
    return enc(Image.new("RGB", (20, 10), "white"), kind)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_decoder_exception_is_that_images_4xx(monkeypatch, stage):
    target, kind = STAGES[stage]
    data = _sample(kind)
    assert decode_image(data, max_pixels=LIMIT)  # the sample itself decodes
    checked = 0
    for cls in EXCEPTION_TYPES:
        if not issubclass(cls, Exception):
            continue  # SystemExit, KeyboardInterrupt, GeneratorExit: not a decoder's to raise, never swallowed
        exc = make_exception(cls)

        def boom(*args, _exc=exc, **kwargs):
            raise _exc

        with monkeypatch.context() as m:
            m.setattr(target, boom)
            with pytest.raises(ApiError) as caught:
                decode_image(data, max_pixels=LIMIT)
        err = caught.value
        if cls is MemoryError:
            assert err.type == "out_of_memory" and err.status == 507, (stage, cls)
        elif issubclass(cls, Image.DecompressionBombError):
            assert err.type == "too_large" and err.status == 413, (stage, cls)
        else:
            assert err.type == "bad_image" and 400 <= err.status < 500, (stage, cls, err.type, err.status)
        assert err.message, (stage, cls)
        checked += 1
    assert checked >= 20


def test_cmyk_profile_failure_of_any_type_falls_back(monkeypatch):
    """ImageCms raising anything it raises (PyCMSError, OSError...) during a CMYK conversion: the plain formula."""
    from PIL import ImageCms

    data = enc(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", icc_profile=_profile("sRGB"))
    for cls in (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        with monkeypatch.context() as m:
            m.setattr("PIL.ImageCms.profileToProfile", lambda *a, _c=cls, **k: (_ for _ in ()).throw(_c("injected")))
            r, g, b = one(data).getpixel((8, 8))
        assert r > 200 and g < 60 and b < 60, cls
