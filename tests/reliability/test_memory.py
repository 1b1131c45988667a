"""Memory per request (issue 14): htrd admits a request on what its image headers declare, against a per-request
and a daemon-wide budget of decoded pixels, before it decodes anything.

Against a real htrd (demo model, CPU): the largest request the limits allow, sent to an idle daemon, at small
limits and at the defaults (derived from this machine's memory): its peak RSS over idle (``VmHWM`` reset through
``/proc/PID/clear_refs`` first), against the budget's 64 bytes per pixel; many requests of that worst shape from
concurrent clients: every one answered 200 or 503 (the in-flight budget full), RSS flat; and the 503 itself
while the budget is held. ``HTR_MEMORY_REQUESTS`` sets the number of requests (200 here; the figure in
docs/RELIABILITY.md comes from a run with 1000).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest
from daemon_harness import htrd  # noqa: F401 -- htrd is a fixture
from helpers import wait_until
from htrd.budget import BYTES_PER_PIXEL

from . import hostile as H

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]

REQUESTS = int(os.environ.get("HTR_MEMORY_REQUESTS", "200"))
# Small limits, as in the report: 8 images per request, 1 Mpx each, 4 Mpx per request, 8 in flight.
SMALL = {"limits": {"max_images_per_request": 8, "max_image_pixels": 1_000_000, "max_request_pixels": 4_000_000,
                    "max_pixels_in_flight": 8_000_000, "batch_sizes": [1, 2, 4, 8], "queue_length": 64,
                    "max_body_bytes": 8 * 1024 * 1024},
         "generation": {"max_new_tokens": 8}, "log": {"level": "INFO"}}
DEFAULT = {"limits": {"batch_sizes": [1, 2, 4, 8], "queue_length": 64}, "generation": {"max_new_tokens": 8},
           "log": {"level": "INFO"}}


def _kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(key)


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    assert _kib(pid, "VmHWM") <= _kib(pid, "VmRSS") + 1024


def _limits(d) -> dict[str, int]:
    m = d.metrics()
    return {scope: int(H.metric_sample(m, "htrd_pixel_limit", scope=scope)) for scope in ("image", "request", "in_flight")}


def _worst_request(limits: dict[str, int]) -> list[tuple]:
    """The largest request the limits allow, in the shape that holds the most at once: as many parts as fit, each
    one RGB image of the largest allowed size (parts are decoded concurrently; TIFF pages one at a time)."""
    per_image, budget = limits["image"], limits["request"]
    n = max(1, budget // per_image)
    width = 1000 if per_image <= 4_000_000 else 8000
    height = per_image // width
    body = H.deflate_tiff(1, (width, height), mode="RGB")
    return [("image", (f"part{i}.tif", body, "image/tiff")) for i in range(n)], n * width * height


@pytest.mark.parametrize("which", ["small", "default"])
def test_peak_rss_of_the_largest_legal_request(htrd, record, which):  # noqa: F811
    d = htrd(config=SMALL if which == "small" else DEFAULT)
    limits = _limits(d)
    parts, pixels = _worst_request(limits)
    assert limits["request"] - limits["image"] < pixels <= limits["request"]
    d.post("/v1/transcribe", content=H.encode(H.line_image()), timeout=120).raise_for_status()  # warm
    idle = _kib(d.pid, "VmRSS")
    _reset_peak(d.pid)
    t0 = time.monotonic()
    r = d.post("/v1/transcribe/batch", files=parts, timeout=300)
    seconds = time.monotonic() - t0
    assert r.status_code == 200, r.text[:300]
    assert all(i["results"] and not i["error"] for i in r.json()["items"]), r.text[:300]
    peak_mib = (_kib(d.pid, "VmHWM") - idle) / 1024
    bound_mib = pixels * BYTES_PER_PIXEL / 2**20
    assert peak_mib < bound_mib, f"peak {peak_mib:.0f} MiB over idle for {pixels} px (budget {bound_mib:.0f} MiB)"
    # one pixel more than the request budget is refused on the headers
    over = parts + [("image", ("extra.png", H.encode(H.line_image((64, 32))), "image/png"))]
    extra = 64 * 32
    r2 = d.post("/v1/transcribe/batch", files=over, timeout=120)
    if pixels + extra > limits["request"]:
        assert r2.status_code == 413 and r2.json()["error"]["detail"]["pixels"] == pixels + extra, r2.text[:300]
    record("memory", f"largest legal request, {which} limits", limits=limits, parts=len(parts), pixels=pixels,
           body_bytes=sum(len(p[1][1]) for p in parts), seconds=round(seconds, 2), idle_rss_mib=round(idle / 1024),
           peak_over_idle_mib=round(peak_mib), bytes_per_pixel=round(peak_mib * 2**20 / pixels, 1),
           bound_mib=round(bound_mib), one_more_image=r2.status_code)


def test_in_flight_budget_is_a_503_with_retry_after_while_full(htrd, record):  # noqa: F811
    """8 Mpx in flight, 4 per request: two 4-Mpx requests held in a slow generate fill it; a third is refused at
    once (503 queue_full + Retry-After) without being decoded; once they finish it is served."""
    d = htrd(config=SMALL, faults="slow_generate=2")
    parts, pixels = _worst_request(_limits(d))
    assert pixels == 4_000_000
    results: dict[int, int] = {}

    def send(i: int) -> None:
        results[i] = d.post("/v1/transcribe/batch", files=parts, timeout=120).status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: H.metric_sample(d.metrics(), "htrd_pixels_in_flight") == 8_000_000, 60, what="8 Mpx in flight")
    r = d.post("/v1/transcribe/batch", files=parts, timeout=60)
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "queue_full" and err["detail"] == {"pixels": 4_000_000, "pixels_in_flight": 8_000_000,
                                                             "max_pixels_in_flight": 8_000_000}, err
    for t in threads:
        t.join(120)
    assert results == {0: 200, 1: 200}
    assert H.metric_sample(d.metrics(), "htrd_pixels_in_flight") == 0
    assert d.post("/v1/transcribe/batch", files=parts, timeout=120).status_code == 200
    record("memory", "in-flight budget full", limits=_limits(d), status=503, retry_after=r.headers["Retry-After"],
           message=err["message"][:200])


def test_rss_is_flat_over_many_requests_of_the_worst_legal_shape(htrd, record):  # noqa: F811
    d = htrd(config=SMALL)
    limits = _limits(d)
    parts, pixels = _worst_request(limits)
    d.post("/v1/transcribe/batch", files=parts, timeout=120).raise_for_status()
    idle = _kib(d.pid, "VmRSS")
    _reset_peak(d.pid)
    statuses: dict[int, int] = {}
    series = []
    lock = threading.Lock()
    done = [0]

    def one(_i: int) -> None:
        while True:
            r = d.post("/v1/transcribe/batch", files=parts, timeout=300)
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code != 503:
                break
            threading.Event().wait(float(r.headers.get("Retry-After", "1")) / 4)  # a client backing off
        with lock:
            done[0] += 1
            if done[0] % max(1, REQUESTS // 10) == 0:
                series.append({"answered": done[0], "rss_mib": round(_kib(d.pid, "VmRSS") / 1024)})

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(REQUESTS)))
    seconds = time.monotonic() - t0
    assert set(statuses) <= {200, 503} and statuses.get(200) == REQUESTS, statuses
    peak_mib = (_kib(d.pid, "VmHWM") - idle) / 1024
    bound_mib = limits["in_flight"] * BYTES_PER_PIXEL / 2**20
    assert peak_mib < bound_mib, f"peak {peak_mib:.0f} MiB over idle, budget {bound_mib:.0f} MiB"
    first, last = series[0]["rss_mib"], series[-1]["rss_mib"]
    # bounded: what is left after the run is within the in-flight budget over idle, and it has levelled off
    # (the second half of the run peaks within 10 % of the first half's peak: glibc's arenas settle, no leak)
    assert last - idle / 1024 < bound_mib, series
    half = len(series) // 2
    assert max(s["rss_mib"] for s in series[half:]) <= max(s["rss_mib"] for s in series[:half]) * 1.10, series
    assert H.metric_sample(d.metrics(), "htrd_requests_total", code="500", endpoint="/v1/transcribe/batch") == 0
    record("memory", f"{REQUESTS} requests of the worst legal shape, 4 clients", limits=limits, pixels=pixels,
           statuses={str(k): v for k, v in sorted(statuses.items())}, seconds=round(seconds, 1),
           idle_rss_mib=round(idle / 1024), peak_over_idle_mib=round(peak_mib), bound_mib=round(bound_mib),
           rss=series, rss_growth_pct=round((last - first) * 100.0 / first, 2))
