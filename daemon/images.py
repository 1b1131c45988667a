"""Decode request bytes into RGB pages, safely.

- Formats: PNG, JPEG, TIFF (every page of a multi-page TIFF), WebP -- sniffed
  from the magic bytes, and Pillow is told to try only that format.
- Limits: the declared width x height of every page is checked against
  ``max_pixels`` *before* any pixel is decoded (decompression bombs); the page
  count against ``max_pages``.
- EXIF orientation is applied; 1-bit, grayscale, 16/32-bit grayscale, palette,
  CMYK (through its ICC profile when it has one), YCbCr, LAB and alpha images
  become 8-bit RGB (alpha composited on white, like paper).
- Every failure is an :class:`~htrd.api_errors.ApiError` with a 4xx status and a
  message that says what was wrong.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .api_errors import ApiError

logger = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half

SUPPORTED = "PNG, JPEG, TIFF or WebP"
# What Pillow's decoders raise on malformed input (a mutated TIFF header gives TypeError "Missing
# dimensions", a bad IFD KeyError/struct.error...): each is the client's bad_image, never a 500.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error,
                  ZeroDivisionError, OverflowError)
# Qwen-VL's image processor (smart_resize) refuses a longer side more than 200x the shorter one.
MAX_ASPECT_RATIO = 200


@dataclass
class Page:
    image: Image.Image  # RGB, 8-bit
    index: int  # page number (0 unless a multi-page TIFF)
    source_format: str
    source_mode: str


def sniff(data: bytes) -> str | None:
    """The Pillow format name from the magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    if data[:5] == b"%PDF-":
        return "a PDF document"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image"
    if data[:2] == b"BM":
        return "a BMP image"
    if data.lstrip()[:1] in (b"{", b"<"):
        return "text (JSON/XML/HTML?)"
    return f"unknown data starting with {data[:8].hex()}"


def decode_image(data: bytes, *, max_pixels: int, max_pages: int = 256) -> list[Page]:
    """Decode *data* into one :class:`Page` per image (TIFF: per page)."""
    if not data:
        raise ApiError("bad_image", "the request body is empty; send the image file's bytes", status=400)
    fmt = sniff(data)
    if fmt is None:
        raise ApiError("bad_image", f"unsupported image format: {_describe(data)}; send {SUPPORTED}", status=415)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError("too_large", f"{fmt} image refused before decoding: {exc}") from None
    except UnidentifiedImageError:
        raise ApiError("bad_image", f"the body looks like {fmt} but its header cannot be read (corrupt file?)") from None
    except _DECODE_ERRORS as exc:
        raise ApiError("bad_image", f"cannot read the {fmt} header: {exc}") from None
    try:
        try:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
        except _DECODE_ERRORS as exc:
            raise ApiError("bad_image", f"the {fmt} page directory cannot be read: {exc}") from None
        if fmt != "TIFF":
            n_frames = 1  # animated WebP/PNG: the first frame is the image
        if n_frames > max_pages:
            raise ApiError(
                "too_large", f"the TIFF has {n_frames} pages; at most {max_pages} per request (limits.max_images_per_request)"
            )
        pages = []
        for index in range(n_frames):
            if index:
                try:
                    img.seek(index)
                except _DECODE_ERRORS as exc:
                    raise ApiError("bad_image", f"TIFF page {index} cannot be read: {exc}") from None
            _check_size(img, fmt, index, max_pixels)
            pages.append(Page(_to_rgb(img, fmt, index), index, fmt, img.mode))
        return pages
    finally:
        img.close()


def _check_size(img: Image.Image, fmt: str, index: int, max_pixels: int) -> None:
    w, h = img.size
    where = f" (page {index})" if index else ""
    if w <= 0 or h <= 0:
        raise ApiError("bad_image", f"{fmt} image{where} declares an empty size {w}x{h}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ApiError(
            "bad_image",
            f"{fmt} image{where} is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):.0f}:1; the model takes at "
            f"most {MAX_ASPECT_RATIO}:1 -- crop it or pad the short side",
            detail={"width": w, "height": h, "max_aspect_ratio": MAX_ASPECT_RATIO},
        )
    if w * h > max_pixels:
        raise ApiError(
            "too_large",
            f"{fmt} image{where} declares {w}x{h} = {w * h} pixels, more than limits.max_image_pixels "
            f"({max_pixels}); refused before decoding -- scale it down or split it into lines",
            detail={"width": w, "height": h, "max_pixels": max_pixels},
        )


def _to_rgb(img: Image.Image, fmt: str, index: int) -> Image.Image:
    where = f" page {index}" if index else ""
    try:
        img.load()
        out = ImageOps.exif_transpose(img) or img
        return _convert(out)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError("too_large", f"{fmt} image refused: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ApiError("bad_image", f"cannot decode the {fmt} image{where}: {exc}") from None


def _convert(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode in ("1", "L", "YCbCr", "HSV"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray(img)
    if mode == "CMYK":
        return _cmyk(img)
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(
            img, ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        )
    if mode == "P":
        if "transparency" in img.info:
            return _flatten(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _flatten(img.convert("RGBA"))
    if mode == "RGBX":
        return img.convert("RGB")
    raise ApiError("bad_image", f"unsupported pixel mode {mode!r}; send 8/16-bit grayscale, RGB, CMYK or palette images",
                   status=415)


def _flatten(rgba: Image.Image) -> Image.Image:
    """Composite on white: transparent parchment scans read as paper, not black."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_gray(img: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale -> 8 bits by scaling, not clipping (convert('L') clips at 255)."""
    import numpy as np

    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else (255.0 / (hi - lo) if hi > lo else 1.0)
        base = 0.0 if hi <= 1.0 and lo >= 0.0 else lo
        out = np.clip((np.nan_to_num(arr) - base) * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        top = 65535 if img.mode.startswith("I;16") or int(arr.max(initial=0)) <= 65535 else int(arr.max())
        out = np.clip(arr, 0, top) * 255.0 / top
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L").convert("RGB")


def _cmyk(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (OSError, ValueError, ImportError) as exc:  # a broken profile: fall back to the plain formula
            logger.debug("CMYK ICC conversion failed (%s); using the plain conversion", exc)
    return img.convert("RGB")
