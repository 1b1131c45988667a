"""Decode request bytes into RGB pages, safely.

- Formats: PNG, JPEG, TIFF (every page of a multi-page TIFF), WebP -- sniffed
  from the magic bytes, and Pillow is told to try only that format.
- Limits: :func:`read_header` reads only the headers (every page's declared
  width x height, the page count) and refuses a bomb, an empty or extreme
  geometry or too many pages before any pixel is decoded; the server adds up
  the headers of a whole request and admits it against its pixel budgets
  (:mod:`htrd.budget`) before it decodes anything. :func:`iter_pages` then
  decodes one page at a time, so a multi-page TIFF never holds all its pages.
- EXIF orientation is applied; 1-bit, grayscale, 16/32-bit grayscale, palette,
  CMYK (through its ICC profile when it has one; a profile that does not fit
  -- another colour space, a broken file -- falls back to the plain formula),
  YCbCr, LAB and alpha images become 8-bit RGB (alpha composited on white,
  like paper).
- Every failure is an :class:`~htrd.api_errors.ApiError` with a 4xx status and a
  message that says what was wrong -- whatever Pillow, one of its plugins or
  ImageCms raised (:func:`_as_api_error`); a MemoryError is ``out_of_memory``.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .api_errors import ApiError

logger = logging.getLogger(__name__)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half

SUPPORTED = "PNG, JPEG, TIFF or WebP"
# What Pillow's decoders are known to raise on malformed input (a mutated TIFF header gives TypeError "Missing
# dimensions", a bad IFD KeyError/struct.error...): each is the client's bad_image, logged at INFO. Anything
# else a decoder raises is bad_image too, with a WARNING naming the type (see _as_api_error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error,
                  ZeroDivisionError, OverflowError)
# Qwen-VL's image processor (smart_resize) refuses a longer side more than 200x the shorter one.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageHeader:
    """What the headers of one image file declare, read without decoding a pixel."""

    format: str
    sizes: tuple[tuple[int, int], ...]  # (width, height) of every page, in order

    @property
    def pages(self) -> int:
        return len(self.sizes)

    @property
    def pixels(self) -> int:
        return sum(w * h for w, h in self.sizes)


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
    """Decode *data* into one :class:`Page` per image (TIFF: per page). Holds every page at once: the server
    uses :func:`read_header` and :func:`iter_pages` instead."""
    return list(iter_pages(data, read_header(data, max_pixels=max_pixels, max_pages=max_pages)))


def _open(data: bytes, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    except UnidentifiedImageError:
        raise ApiError("bad_image", f"the body looks like {fmt} but its header cannot be read (corrupt file?)") from None
    except Exception as exc:  # noqa: BLE001 -- whatever the plugin raised: the client's file, see _as_api_error
        raise _as_api_error(exc, f"cannot read the {fmt} header") from None


def read_header(data: bytes, *, max_pixels: int, max_pages: int = 256) -> ImageHeader:
    """The format and every page's declared size, without decoding a pixel; refuses (:class:`ApiError`) what
    is not a supported image, a page over *max_pixels* or of an extreme geometry, and more than *max_pages*."""
    if not data:
        raise ApiError("bad_image", "the request body is empty; send the image file's bytes", status=400)
    fmt = sniff(data)
    if fmt is None:
        raise ApiError("bad_image", f"unsupported image format: {_describe(data)}; send {SUPPORTED}", status=415)
    img = _open(data, fmt)
    try:
        try:
            # Not getattr(img, "n_frames", 1): it would turn an AttributeError inside the property into 1 page.
            n_frames = int(img.n_frames) if fmt == "TIFF" else 1  # animated WebP/PNG: the first frame is the image
        except Exception as exc:  # noqa: BLE001 -- see _as_api_error
            raise _as_api_error(exc, f"the {fmt} page directory cannot be read") from None
        if n_frames > max_pages:
            raise ApiError(
                "too_large", f"the TIFF has {n_frames} pages; at most {max_pages} per request (limits.max_images_per_request)",
                detail={"pages": n_frames, "max_images_per_request": max_pages},
            )
        sizes = []
        for index in range(n_frames):
            if index:
                try:
                    img.seek(index)  # reads the page's IFD, not its pixels
                except Exception as exc:  # noqa: BLE001 -- see _as_api_error
                    raise _as_api_error(exc, f"TIFF page {index} cannot be read") from None
            _check_size(img, fmt, index, max_pixels)
            sizes.append(tuple(img.size))
        return ImageHeader(fmt, tuple(sizes))
    finally:
        img.close()


def iter_pages(data: bytes, header: ImageHeader) -> Iterator[Page]:
    """Decode the pages *header* (from :func:`read_header` on the same *data*) describes, one at a time: a
    caller that drops each page before taking the next holds one decoded page at once. A page whose decoded
    size differs from its header (a file that lies) is refused before its pixels are decoded."""
    img = _open(data, header.format)
    try:
        for index, declared in enumerate(header.sizes):
            where = f" page {index}" if index else ""
            try:
                if index:
                    img.seek(index)
                if tuple(img.size) != declared:
                    raise ApiError("bad_image", f"the {header.format} image{where} changed its size between reads")
                img.load()
                mode = img.mode
                out = ImageOps.exif_transpose(img) or img  # a copy: the file object moves on to the next page
                rgb = _convert(out)
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 -- whatever the decoder raised, see _as_api_error
                raise _as_api_error(exc, f"cannot decode the {header.format} image{where}") from None
            yield Page(rgb, index, header.format, mode)
            del out, rgb
    finally:
        img.close()


def _as_api_error(exc: BaseException, what: str) -> ApiError:
    """What a decoder raised on the client's bytes, as that image's error. Pillow, its plugins and ImageCms raise
    many types on malformed input (OSError, SyntaxError, struct.error, PyCMSError, RuntimeError...); every one
    is the image's ``bad_image`` (422), never a 500 that would also lose the other parts of a batch. A bomb
    is ``too_large``; a MemoryError ``out_of_memory`` (507). A type not in the known list is logged as a WARNING
    so that it gets a look (it may be a bug on our side), without a traceback in the log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ApiError("too_large", f"{what}: refused before decoding: {exc}")
    if isinstance(exc, MemoryError):
        return ApiError("out_of_memory", f"{what}: out of memory while decoding; retry later or send a smaller image",
                        retry_after=5)
    if not isinstance(exc, _DECODE_ERRORS):
        logger.warning("image decoder raised %s.%s: %s (answered as bad_image)", type(exc).__module__,
                       type(exc).__qualname__, str(exc)[:200])
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ApiError("bad_image", f"{what}: {reason}")


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

        return ImageCms.applyTransform(  # a PyCMSError here becomes bad_image (_as_api_error)
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
    """CMYK through its embedded ICC profile; the documented fallback, the plain formula, when there is none or
    it cannot convert this image: a broken profile, or one of another colour space (sRGB, Lab) embedded in a
    CMYK file, which littleCMS refuses with PyCMSError."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms
        except ImportError:  # Pillow built without littleCMS
            return img.convert("RGB")
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            logger.info("the CMYK image's ICC profile cannot convert it (%s); using the plain conversion",
                        str(exc)[:200])
    return img.convert("RGB")
