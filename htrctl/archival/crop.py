"""Cutting text lines out of a page image (Pillow, numpy).

A line is given by its outline polygon, by its baseline alone, or by a box
(ALTO ``HPOS/VPOS/WIDTH/HEIGHT``). The crop is the polygon's bounding box
with everything outside the polygon filled with the page's background colour
(the median colour of the page), so neighbouring lines do not leak into it. A
line whose baseline is inclined is rotated about it so that the baseline is
horizontal ("straightened"); a curved baseline is straightened along the line
from its first to its last point only (no dewarping). A line with only a
baseline gets a band around it: :data:`ASCENT` of the line height above,
:data:`DESCENT` below, the height being the distance to the neighbouring
baseline (see :func:`estimate_heights`). Coordinates outside the image are
clipped; a line that is empty once clipped gives ``None``.
"""

from __future__ import annotations

import io
import math
import statistics
import warnings
from dataclasses import dataclass

from ..errors import ArchivalError, require

Point = tuple[float, float]

ASCENT = 0.8  # of the estimated line height, above the baseline
DESCENT = 0.35  # below it (descenders; a little overlap with the next line is harmless)
MIN_ANGLE_DEG = 0.5  # straighten only lines inclined more than this
FALLBACK_HEIGHT_FRACTION = 0.03  # of the page height, when no neighbour tells the line height


@dataclass
class LineGeometry:
    """What a file says about where a line is, in page image pixels."""

    polygon: list[Point] | None = None
    baseline: list[Point] | None = None
    height: float | None = None  # for baseline-only lines: filled in by estimate_heights


def _pil():
    return require("PIL.Image", "archival", "cutting lines out of page images")


def open_page_image(data: bytes, name: str):
    """The page image decoded (RGB or L); a clear error when it is not an image or is absurdly large."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            # Scans of large folios pass Pillow's 89 Mpx warning; twice that is still refused below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError as exc:
        raise ArchivalError(f"{name}: the page image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ArchivalError(f"{name}: the page image cannot be read: {exc}") from None
    if img.mode in ("1", "I;16", "I;16B", "I;16L", "I", "F"):
        img = img.convert("L")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def background(img) -> int | tuple[int, ...]:
    """The page's background colour: the median colour of a thumbnail (parchment and paper dominate)."""
    np = require("numpy", "archival", "cutting lines out of page images")
    thumb = img.copy()
    thumb.thumbnail((256, 256))
    a = np.asarray(thumb)
    if a.ndim == 2:
        return int(np.median(a))
    return tuple(int(v) for v in np.median(a.reshape(-1, a.shape[-1]), axis=0))


def _mean_y(pts: list[Point]) -> float:
    return sum(y for _, y in pts) / len(pts)


def _x_range(pts: list[Point]) -> tuple[float, float]:
    xs = [x for x, _ in pts]
    return min(xs), max(xs)


def _poly_height(pts: list[Point]) -> float:
    ys = [y for _, y in pts]
    return max(ys) - min(ys)


def estimate_heights(lines: list[LineGeometry], page_height: int) -> None:
    """Give every baseline-only line a height: the vertical distance to the nearest baseline above or below
    it that overlaps it horizontally; else the median of those found on the page; else the median height
    of the page's polygons; else :data:`FALLBACK_HEIGHT_FRACTION` of the page height."""
    based = [g for g in lines if g.baseline]
    found: dict[int, float] = {}
    for i, g in enumerate(based):
        x0, x1 = _x_range(g.baseline)
        y = _mean_y(g.baseline)
        best = None
        for j, h in enumerate(based):
            if i == j:
                continue
            hx0, hx1 = _x_range(h.baseline)
            if hx1 < x0 or hx0 > x1:
                continue
            d = abs(_mean_y(h.baseline) - y)
            if d > 2 and (best is None or d < best):
                best = d
        if best is not None:
            found[id(g)] = best
    polys = [_poly_height(g.polygon) for g in lines if g.polygon and len(g.polygon) >= 3]
    if found:
        default = statistics.median(found.values())
    elif polys:
        default = statistics.median(polys)
    else:
        default = FALLBACK_HEIGHT_FRACTION * page_height
    for g in lines:
        if g.polygon is None and g.baseline and g.height is None:
            g.height = found.get(id(g), default)


def baseline_angle(baseline: list[Point] | None) -> float:
    """The inclination of the baseline in degrees (image coordinates, y down), first to last point.

    A baseline drawn right to left (as some tools do for right-to-left scripts) gives the same angle as
    the same line drawn left to right; a vertical one gives +-90 (its writing direction)."""
    if not baseline or len(baseline) < 2:
        return 0.0
    (x0, y0), (x1, y1) = baseline[0], baseline[-1]
    if x0 == x1 and y0 == y1:
        return 0.0
    deg = math.degrees(math.atan2(y1 - y0, x1 - x0))
    if deg > 135:
        deg -= 180
    elif deg < -135:
        deg += 180
    return deg


def band_polygon(baseline: list[Point], height: float) -> list[Point]:
    """A polygon around *baseline*: ASCENT*height above it, DESCENT*height below (perpendicular to the
    line from its first to its last point)."""
    a = math.radians(baseline_angle(baseline))
    # the normal pointing "up" from the text: rotate the direction (cos a, sin a) by -90 degrees
    nx, ny = math.sin(a), -math.cos(a)
    up = [(x + nx * ASCENT * height, y + ny * ASCENT * height) for x, y in baseline]
    down = [(x - nx * DESCENT * height, y - ny * DESCENT * height) for x, y in baseline]
    return up + down[::-1]


def outline(g: LineGeometry) -> list[Point] | None:
    """The polygon that bounds the line (its own, or a band around its baseline)."""
    if g.polygon and len(g.polygon) >= 3:
        return g.polygon
    if g.baseline and len(g.baseline) >= 2 and g.height:
        return band_polygon(g.baseline, g.height)
    return None


def crop_line(img, g: LineGeometry, fill) -> object | None:
    """The line's image (a PIL image), straightened; ``None`` when it has no area inside the page."""
    Image = _pil()
    from PIL import ImageDraw

    poly = outline(g)
    if poly is None:
        return None
    w, h = img.size
    xs = [x for x, _ in poly]
    ys = [y for _, y in poly]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(w, math.ceil(max(xs)) + 1), min(h, math.ceil(max(ys)) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    region = img.crop((x0, y0, x1, y1))
    mask = Image.new("L", region.size, 0)
    ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in poly], fill=255, outline=255)
    if mask.getbbox() is None:
        return None
    flat = Image.new(region.mode, region.size, fill)
    line = Image.composite(region, flat, mask)
    angle = baseline_angle(g.baseline)
    if abs(angle) <= MIN_ANGLE_DEG:
        box = mask.getbbox()
        return line.crop(box) if box[2] - box[0] >= 2 and box[3] - box[1] >= 2 else None
    # Straighten with one affine map: output x runs along the baseline, output y along its normal; the
    # output is exactly the straightened polygon's box (clipped to the page), so nothing else is resampled.
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    pts = [(min(max(x, x0), x1) - x0, min(max(y, y0), y1) - y0) for x, y in poly]
    us = [x * cos + y * sin for x, y in pts]
    vs = [-x * sin + y * cos for x, y in pts]
    u0, v0 = min(us), min(vs)
    size = (math.ceil(max(us) - u0), math.ceil(max(vs) - v0))
    if size[0] < 2 or size[1] < 2:
        return None
    ox, oy = u0 * cos - v0 * sin, u0 * sin + v0 * cos
    return line.transform(size, Image.Transform.AFFINE, (cos, -sin, ox, sin, cos, oy),
                          resample=Image.Resampling.BILINEAR, fillcolor=fill)


def to_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
