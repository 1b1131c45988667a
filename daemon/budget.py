"""Pixel budgets: how much decoded image one request, and all requests together, may hold.

Memory in htrd grows with the decoded pixels of the images in flight, not with
the bytes on the wire: a 9 KB Deflate TIFF can declare 8 pages of 1000x1000.
So every transcription request is admitted on what its image *headers*
declare (:func:`htrd.images.read_header`), before a pixel is decoded:

- ``limits.max_request_pixels``: the declared pixels of all the images and
  pages of one request; more is a 413 that says what was asked and what is
  allowed;
- ``limits.max_pixels_in_flight``: the declared pixels of every request being
  decoded, preprocessed, queued or generated at once (a :class:`PixelBudget`);
  a request that does not fit now is a 503 with Retry-After.

Both default (``null``) to figures derived from the host's memory -- the
smaller of physical memory and the service's cgroup limit (``MemoryMax=``):
:data:`HOST_MEMORY_FRACTION` of it, divided by :data:`BYTES_PER_PIXEL`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Peak memory per decoded pixel of one image through decoding and the Qwen3-VL image processor (its real
# size limits, 16.7 Mpx): 45-57 bytes measured for RGB/L/16-bit PNG, RGB TIFF and CMYK JPEG of 2-10 Mpx
# (decoding 6-32 B/px, then float32 tensors with the temporal patch doubled); 25-45 B/px stay held until
# the image is generated. Rounded up for the allocator's slack. See bench/request_memory.py.
BYTES_PER_PIXEL = 64
# The share of the host's memory (or the cgroup's limit) that decoded images may take together.
HOST_MEMORY_FRACTION = 0.25
# One request may take this share of the in-flight budget by default (but always one largest image).
REQUEST_SHARE = 0.25


def host_memory_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process may use: physical memory, or its cgroup's limit (v2 ``memory.max`` of its
    cgroup and every parent, v1 ``memory.limit_in_bytes``) when smaller. None when nothing can be read."""
    found: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        groups = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        groups = []
    for line in groups:
        hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if hid == "0" and controllers == "":  # cgroup v2: the limit of this cgroup and of every parent applies
            parts = [p for p in rel.split("/") if p]
            for depth in range(len(parts), -1, -1):
                found += _read_limit(cgroup_root.joinpath(*parts[:depth], "memory.max"))
        elif "memory" in controllers.split(","):  # cgroup v1; in a container the hierarchy's root is its own group
            for where in {rel, ""}:
                found += _read_limit(cgroup_root / "memory" / where / "memory.limit_in_bytes")
    return min(found) if found else None


def _read_limit(path: Path) -> list[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return []
    if not text.isdigit() or int(text) >= 1 << 60:  # "max", or v1's "no limit" (a page-rounded 2^63)
        return []
    return [int(text)]


@dataclass(frozen=True)
class PixelLimits:
    """The effective pixel limits of a daemon, and where they came from (logged at start)."""

    image_pixels: int  # one image or page (limits.max_image_pixels, capped by request_pixels)
    request_pixels: int  # all images and pages of one request
    in_flight_pixels: int  # all requests being served at once
    source: str

    def describe(self) -> str:
        return (f"pixel limits: {self.image_pixels / 1e6:.1f} Mpx per image, {self.request_pixels / 1e6:.1f} Mpx "
                f"per request, {self.in_flight_pixels / 1e6:.1f} Mpx in flight ({self.source})")


def resolve_limits(limits, memory_bytes: int | None = None) -> PixelLimits:
    """The effective limits from ``settings.limits``: configured values as they are, ``null`` ones derived from
    *memory_bytes* (default: :func:`host_memory_bytes`). A request may always carry one image of
    ``max_image_pixels`` unless the in-flight budget itself is smaller; a request budget above the in-flight
    budget could never be admitted, so it is capped there."""
    in_flight = limits.max_pixels_in_flight
    sources = []
    if in_flight is None:
        mem = memory_bytes if memory_bytes is not None else host_memory_bytes()
        if mem is None:
            mem = 8 << 30
            sources.append("host memory unknown, 8 GiB assumed")
        else:
            sources.append(f"derived from {mem / 2**30:.1f} GiB of memory: {HOST_MEMORY_FRACTION:.0%} at "
                           f"{BYTES_PER_PIXEL} B/px")
        in_flight = max(1024, int(mem * HOST_MEMORY_FRACTION / BYTES_PER_PIXEL))
    else:
        sources.append("limits.max_pixels_in_flight")
    request = limits.max_request_pixels
    if request is None:
        request = max(limits.max_image_pixels, int(in_flight * REQUEST_SHARE))
    else:
        sources.append("limits.max_request_pixels")
    request = min(request, in_flight)
    return PixelLimits(image_pixels=min(limits.max_image_pixels, request), request_pixels=request,
                       in_flight_pixels=in_flight, source="; ".join(sources))


class PixelBudget:
    """Declared pixels in flight across the daemon. :meth:`try_acquire` never waits: a request that does not fit
    now is refused (the server answers 503 + Retry-After), so waiting requests cannot pile up in memory."""

    def __init__(self, capacity: int, on_change=None) -> None:
        if capacity < 1:
            raise ValueError("a pixel budget needs a positive capacity")
        self.capacity = int(capacity)
        self._in_use = 0
        self._lock = threading.Lock()
        self._on_change = on_change  # called with the pixels in use after every change (a metrics gauge)

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self, pixels: int) -> bool:
        if pixels < 0:
            raise ValueError("negative pixels")
        with self._lock:
            if self._in_use + pixels > self.capacity:
                return False
            self._in_use += pixels
            in_use = self._in_use
        if self._on_change is not None:
            self._on_change(in_use)
        return True

    def release(self, pixels: int) -> None:
        with self._lock:
            if pixels > self._in_use:
                raise RuntimeError(f"releasing {pixels} pixels, only {self._in_use} held")
            self._in_use -= pixels
            in_use = self._in_use
        if self._on_change is not None:
            self._on_change(in_use)

