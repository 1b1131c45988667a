"""Hostile request bodies and raw HTTP, built in memory (no fixtures on disk)."""

from __future__ import annotations

import io
import socket
import struct
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw


def line_image(size=(480, 64), mode: str = "RGB", seed: int = 0) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for x in range(10 + seed % 7, size[0] - 20, 37):
        d.line([(x, size[1] - 12), (x + 15, 10)], fill="black", width=3)
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, mode_byte: int = 0) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRCs) with a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_zero_bomb(side: int) -> bytes:
    """A real PNG of side x side black pixels: tiny on the wire, side**2 pixels decoded."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * side
    parts = [raw.compress(row) for _ in range(side)]
    parts.append(raw.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to declare width x height."""
    data = bytearray(encode(line_image((64, 32)), "JPEG", quality=80))
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def tiff_declaring(width: int, height: int) -> bytes:
    """A minimal little-endian TIFF whose IFD declares width x height (8-bit gray, one tiny strip)."""
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16),
    ]
    ifd_off = 8
    data_off = ifd_off + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_off) + struct.pack("<H", len(entries)))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = data_off
        if typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0) + b"\x00" * 16
    return bytes(out)


def webp_declaring(width: int, height: int) -> bytes:
    """A VP8X WebP header declaring a width x height canvas (no real frame)."""
    vp8x = bytes([0, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def multipage_tiff(pages: int, size=(16, 8)) -> bytes:
    imgs = [line_image(size, seed=i) for i in range(pages)]
    buf = io.BytesIO()
    imgs[0].save(buf, "TIFF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def deflate_tiff(pages: int, size=(1000, 1000), mode: str = "L") -> bytes:
    """A few KB of Deflate TIFF that decodes to pages x size pixels: the amplification case of issue 14."""
    frames = [Image.new(mode, size, "white") for _ in range(pages)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:], compression="tiff_adobe_deflate")
    return buf.getvalue()


def icc_profile(space: str) -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()


def colour_profile_cases() -> dict[str, bytes]:
    """CMYK files whose embedded ICC profile belongs to another colour space (littleCMS refuses to build the
    transform: PyCMSError) or is no profile at all: the plain CMYK conversion, transcribed (200)."""
    cmyk = line_image((240, 40)).convert("CMYK")
    out = {}
    for fmt in ("JPEG", "TIFF"):
        out[f"CMYK {fmt} with an sRGB ICC profile"] = encode(cmyk, fmt, icc_profile=icc_profile("sRGB"))
        out[f"CMYK {fmt} with a Lab ICC profile"] = encode(cmyk, fmt, icc_profile=icc_profile("LAB"))
        out[f"CMYK {fmt} with a garbage ICC profile"] = encode(cmyk, fmt, icc_profile=b"acsp" * 64)
    return out


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def bomb_cases() -> dict[str, bytes]:
    return {
        "png declares 100000x100000": png_declaring(100_000, 100_000),
        "png declares 2^31-1 x 1": png_declaring(2**31 - 1, 1),
        "png declares 0x0": png_declaring(0, 0),
        "png 5000x5000 zeros (25 Mpx, ~25 KB)": png_zero_bomb(5000),
        "jpeg declares 65500x65500": jpeg_declaring(65_500, 65_500),
        "tiff declares 200000x200000": tiff_declaring(200_000, 200_000),
        "tiff declares 0x10": tiff_declaring(0, 10),
        "webp declares 16384x16384": webp_declaring(16_384, 16_384),
        "tiff with 300 pages": multipage_tiff(300),
    }


def truncated_cases() -> dict[str, bytes]:
    png = encode(line_image(), "PNG")
    jpg = encode(line_image(), "JPEG", quality=90)
    tif = encode(line_image(), "TIFF", compression="tiff_lzw")
    webp = encode(line_image(), "WEBP")
    return {
        "png signature only": png[:8],
        "png cut in IHDR": png[:20],
        "png cut at 50%": truncated(png, 0.5),
        "png cut at 90%": truncated(png, 0.9),
        "jpeg SOI only": jpg[:3],
        "jpeg cut at 30%": truncated(jpg, 0.3),
        "jpeg cut at 90%": truncated(jpg, 0.9),
        "tiff header only": tif[:8],
        "tiff cut at 50%": truncated(tif, 0.5),
        "webp cut at 50%": truncated(webp, 0.5),
        "png with a flipped byte in IDAT": _flip(png, len(png) // 2),
    }


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def non_image_cases() -> dict[str, bytes]:
    return {
        "zero bytes (empty body)": b"",
        "1000 NUL bytes": b"\x00" * 1000,
        "PDF document": b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n",
        "GIF image": encode(line_image((32, 16)), "GIF"),
        "BMP image": encode(line_image((32, 16)), "BMP"),
        "JSON text": b'{"path": "/etc/passwd", "image": "line.png"}',
        "HTML": b"<html><body><img src=file:///etc/shadow></body></html>",
        "ELF executable": Path(sys.executable).resolve().read_bytes()[:4096],
        "ZIP archive": b"PK\x03\x04" + b"\x00" * 60,
        "random bytes": bytes((i * 7919 + 13) % 256 for i in range(4096)),
        "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"/>',
    }


def aspect_cases() -> dict[str, bytes]:
    return {
        "1x300 (300:1)": encode(Image.new("L", (1, 300), 255)),
        "3000x10 (300:1)": encode(Image.new("L", (3000, 10), 255)),
        "4x2000 (500:1)": encode(Image.new("RGB", (4, 2000), "white")),
        "20000x1 (20000:1)": encode(Image.new("1", (20000, 1), 1)),
    }


def odd_mode_cases() -> dict[str, bytes]:
    """Valid images in unusual pixel modes: each is converted to RGB and transcribed (200)."""
    base = line_image((240, 40))
    pal = base.convert("P")
    out = {
        "mode 1 (bilevel PNG)": encode(base.convert("1")),
        "mode L (gray PNG)": encode(base.convert("L")),
        "mode LA (gray+alpha PNG)": encode(base.convert("LA")),
        "mode P with transparency (PNG)": encode(pal, transparency=0),
        "mode I;16 (16-bit gray PNG)": encode(base.convert("I").point(lambda v: v * 200).convert("I;16")),
        "mode I (32-bit TIFF)": encode(base.convert("I"), "TIFF"),
        "mode F (float TIFF)": encode(base.convert("F"), "TIFF"),
        "mode CMYK (JPEG)": encode(base.convert("CMYK"), "JPEG"),
        "mode CMYK (TIFF)": encode(base.convert("CMYK"), "TIFF"),
        "mode RGBA (fully transparent PNG)": encode(Image.new("RGBA", (240, 40), (0, 0, 0, 0))),
        "mode YCbCr (TIFF)": encode(base.convert("YCbCr"), "TIFF") if _can_save(base.convert("YCbCr"), "TIFF") else None,
        "mode LAB (TIFF)": encode(base.convert("LAB"), "TIFF") if _can_save(base.convert("LAB"), "TIFF") else None,
        "1x1 pixel": encode(Image.new("L", (1, 1), 0)),
    }
    return {k: v for k, v in out.items() if v is not None}


def _can_save(img: Image.Image, fmt: str) -> bool:
    try:
        encode(img, fmt)
        return True
    except (OSError, KeyError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ raw HTTP
MALFORMED: dict[str, bytes] = {
    "binary garbage": b"\x00\x01\x02garbage\xff\r\n\r\n",
    "request line without version": b"GET /v1/ready\r\n\r\n",
    "NUL in method": b"G\x00T /v1/ready HTTP/1.1\r\nHost: x\r\n\r\n",
    "no Host header": b"GET /v1/ready HTTP/1.1\r\n\r\n",
    "non-numeric Content-Length": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative Content-Length": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two Content-Lengths": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    "Content-Length + chunked": (b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bad chunk size": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "unknown Transfer-Encoding": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "HTTP/3.0 version": b"GET /v1/ready HTTP/3.0\r\nHost: x\r\n\r\n",
    "header without colon": b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nBadHeader\r\n\r\n",
    "space before colon": b"GET /v1/ready HTTP/1.1\r\nHost : x\r\n\r\n",
    "absolute URI": b"GET http://evil.example/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    "dot-dot path": b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "percent-encoded dot-dot": b"GET /v1/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "Content-Length 10^14": b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n",
    "unknown method": b"BREW /v1/transcribe HTTP/1.1\r\nHost: x\r\n\r\n",
    "CONNECT": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    "websocket upgrade": (b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
    "h2c upgrade": (b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
    "64 KiB header value": b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
    "1000 headers": b"GET /v1/ready HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(1000)) + b"\r\n",
    "bad X-Request-Id": b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nX-Request-Id: ../../\x7f<script>\r\n\r\n",
}


# Unusual but well-formed requests: served (or 404/405) like any other, the oddity ignored.
VALID_BUT_ODD = {"1000 headers", "64 KiB header value", "HTTP/3.0 version", "bad X-Request-Id", "websocket upgrade",
                 "h2c upgrade", "CONNECT", "HTTP/2 preface", "absolute URI", "dot-dot path", "percent-encoded dot-dot",
                 "unknown method"}


@contextmanager
def connection(sock_path: Path, data: bytes = b"", *, timeout: float):
    """A fresh connection to the Unix socket *sock_path* (socket timeout *timeout*) with *data* sent on it;
    closed when the block ends."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        if data:
            s.sendall(data)
        yield s
    finally:
        s.close()


def raw_exchange(sock_path: Path, data: bytes, *, timeout: float = 15.0) -> tuple[bytes, float]:
    """Send *data* on a fresh connection (then half-close), read until the server closes; (reply, seconds)."""
    t0 = time.monotonic()
    with connection(sock_path, data, timeout=timeout) as s:
        out = b""
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if _complete_response(out):
                break
        return out, time.monotonic() - t0


def disconnect_mid_body(sock_path: Path, path: str = "/v1/transcribe", declared: int = 100_000,
                        sent: bytes = b"\x89PNG\r\n\x1a\n" + b"\x00" * 92, ctype: str = "image/png") -> None:
    """Send headers promising *declared* body bytes and only *sent* of them, then close the connection."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\nContent-Type: {ctype}\r\n\r\n"
    with connection(sock_path, head.encode() + sent, timeout=10.0):
        pass


def _complete_response(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length" and v.strip().isdigit():
            return len(body) >= int(v.strip())
    return False


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1."):
        return None
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def metric_sample(metrics: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, _, value = line.rpartition(" ")
            got = head[len(name):].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(value)
    return 0.0
