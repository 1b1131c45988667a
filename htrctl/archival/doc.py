"""What PAGE and ALTO documents have in common: text lines with geometry, in reading order."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArchivalError
from .crop import LineGeometry, Point

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
MAX_POINTS = 100_000  # per polygon; far more than any real line has


def parse_points(text: str | None, where: str) -> list[Point] | None:
    """``"x1,y1 x2,y2 ..."`` (PAGE) or ``"x1 y1 x2 y2 ..."`` (ALTO) as points; None when absent or empty."""
    if text is None or not text.strip():
        return None
    nums = _NUMBER.findall(text)
    if len(nums) % 2 or len(nums) > 2 * MAX_POINTS:
        raise ArchivalError(f"{where}: cannot read the points {text[:80]!r}"
                            + ("..." if len(text) > 80 else ""))
    vals = [float(n) for n in nums]
    if not all(math.isfinite(v) for v in vals):
        raise ArchivalError(f"{where}: the points {text[:80]!r} are not finite numbers")
    return list(zip(vals[0::2], vals[1::2]))


def area(points: list[Point]) -> float:
    """The polygon's area (shoelace formula)."""
    n = len(points)
    return abs(sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]
                   for i in range(n))) / 2.0


def usable_polygon(points: list[Point] | None) -> list[Point] | None:
    """*points* when they bound an area; None for a missing or degenerate outline (some producers repeat
    the baseline in ``Coords`` when they have no polygon)."""
    if not points or len(points) < 3 or area(points) < 4.0:
        return None
    return points


def localname(el: Any) -> str:
    tag = el.tag
    if not isinstance(tag, str):
        return ""  # comments, processing instructions
    return tag.rsplit("}", 1)[-1]


@dataclass
class Line:
    """One text line of a document: its element, where it is, whether it already has a text."""

    id: str
    element: Any  # lxml element
    geometry: LineGeometry
    text: str | None = None  # the text the file already has (None or "" when none)

    @property
    def has_text(self) -> bool:
        return bool(self.text and self.text.strip())


@dataclass
class Document:
    """A parsed PAGE or ALTO file (see :mod:`.page`, :mod:`.alto` for the concrete ones)."""

    kind: str  # "page" | "alto"
    version: str  # e.g. "PAGE 2019-07-15", "ALTO v4"
    tree: Any
    name: str  # as shown in messages
    image_name: str | None
    declared_size: tuple[float, float] | None  # the page size the coordinates refer to
    lines: list[Line] = field(default_factory=list)  # in reading order
    warnings: list[str] = field(default_factory=list)

    def scale_to(self, size: tuple[int, int]) -> None:
        """Rescale every line's geometry when the image is not the size the file declares (a scan that was
        downscaled, an ALTO file measured in mm10 or inch1200)."""
        if not self.declared_size:
            return
        dw, dh = self.declared_size
        if dw <= 0 or dh <= 0:
            return
        sx, sy = size[0] / dw, size[1] / dh
        if abs(sx - 1) < 1e-6 and abs(sy - 1) < 1e-6:
            return
        if self.kind == "page" or abs(sx - sy) > 0.02 * max(sx, sy):
            self.warnings.append(f"the page image is {size[0]}x{size[1]} pixels, the file says {dw:g}x{dh:g}; "
                                 "coordinates scaled to the image")
        for ln in self.lines:
            g = ln.geometry
            if g.polygon:
                g.polygon = [(x * sx, y * sy) for x, y in g.polygon]
            if g.baseline:
                g.baseline = [(x * sx, y * sy) for x, y in g.baseline]

    # Implemented by PageDocument / AltoDocument:
    def set_text(self, line: Line, text: str) -> None:
        raise NotImplementedError

    def finish(self, changed: list[Line], *, model_digest: str | None, software_version: str) -> None:
        """After the texts are set: region texts made consistent, a processing step naming htrctl."""
        raise NotImplementedError
