"""Hostile input against a real htrd (demo model, CPU, Unix socket): every one gets a 4xx with a message
(or, for valid images in odd pixel modes, a transcription), never a 500 or a hang, and the daemon stays ready.

Bodies: decompression bombs (huge declared dimensions in PNG/JPEG/TIFF/WebP headers, a real 25 Mpx PNG of
zeros), truncated PNG/JPEG/TIFF/WebP, zero bytes, non-images, extreme aspect ratios, a body over the
limit (declared and chunked), odd pixel modes. Connections: malformed HTTP as raw bytes, and slow clients
(slowloris) that trickle their headers or body or send nothing: the daemon closes them or answers 408 within
``limits.read_timeout_s`` while other clients are served.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from . import hostile as H
from .conftest import SHARED_CONFIG

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # one shared htrd (15-40 s to start)

READ_TIMEOUT_S = SHARED_CONFIG["limits"]["read_timeout_s"]


def _post(d, body: bytes, path: str = "/v1/transcribe", **kw) -> httpx.Response:
    return d.post(path, content=body, timeout=60.0, **kw)


def _assert_ready(d) -> None:
    r = d.get("/v1/ready", timeout=10.0)
    assert r.status_code == 200 and r.json()["state"] == "ready", r.text


def _check_refused(d, record, category: str, case: str, body: bytes, *, expect: set[int]) -> dict:
    r = _post(d, body)
    text = r.text
    assert r.status_code in expect, f"{case}: {r.status_code} {text[:300]}"
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("bad_image", "too_large", "bad_request"), err
    _assert_ready(d)
    return record("hostile", case, category=category, bytes=len(body), status=r.status_code, type=err["type"],
                  message=err["message"][:160], ready_after=True)


CATEGORIES = {
    "decompression bomb": (H.bomb_cases, {413, 422}),
    "truncated image": (H.truncated_cases, {422}),
    "not an image": (H.non_image_cases, {400, 415, 422}),
    "extreme aspect ratio": (H.aspect_cases, {422}),
}


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_hostile_bodies_get_a_4xx_with_a_message(shared_daemon, record, category):
    make, expect = CATEGORIES[category]
    cases = make()
    assert cases
    for case, body in cases.items():
        _check_refused(shared_daemon, record, category, case, body, expect=expect)
    if category == "decompression bomb":  # nothing was decoded: the daemon's memory did not jump
        rss = _rss_mib(shared_daemon.pid)
        assert rss < 3000, f"htrd RSS {rss:.0f} MiB after the bombs"


def test_odd_pixel_modes_are_transcribed(shared_daemon, record):
    """Valid images in unusual modes are converted to RGB and transcribed (200), one result each."""
    for case, body in H.odd_mode_cases().items():
        r = _post(shared_daemon, body)
        assert r.status_code == 200, f"{case}: {r.status_code} {r.text[:300]}"
        results = r.json()["results"]
        assert len(results) == 1 and results[0]["tokens"] >= 0
        record("hostile", case, category="odd pixel mode", bytes=len(body), status=200, type="transcribed",
               message="converted to RGB and transcribed", ready_after=True)
    _assert_ready(shared_daemon)


def test_body_over_the_limit_declared_and_chunked(shared_daemon, record):
    limit = SHARED_CONFIG["limits"]["max_body_bytes"]
    big = H.encode(H.line_image((64, 32))) + b"\x00" * (limit + 1)
    r = _post(shared_daemon, big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text
    assert str(limit) in r.json()["error"]["message"]
    record("hostile", "body over the limit (Content-Length)", category="body over the limit", bytes=len(big),
           status=413, type="too_large", message=r.json()["error"]["message"][:160], ready_after=True)

    def chunks():  # no Content-Length: refused while streaming, not after buffering everything
        for _ in range(limit // 65536 + 8):
            yield b"\x89PNG" + b"\x00" * 65532

    r = _post(shared_daemon, chunks())
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text
    record("hostile", "body over the limit (chunked, no length)", category="body over the limit",
           bytes=(limit // 65536 + 8) * 65536, status=413, type="too_large",
           message=r.json()["error"]["message"][:160], ready_after=True)
    r = shared_daemon.post("/v1/transcribe/batch", files=[("image", ("a.png", big, "image/png"))], timeout=60)
    assert r.status_code == 413, r.text
    record("hostile", "batch body over the limit", category="body over the limit", bytes=len(big), status=413,
           type=r.json()["error"]["type"], message=r.json()["error"]["message"][:160], ready_after=True)
    _assert_ready(shared_daemon)


def test_bad_parameters_and_batch_shapes(shared_daemon, record):
    png = H.encode(H.line_image())
    cases = [
        ("max_new_tokens=0", dict(params={"max_new_tokens": 0}), {400}),
        ("max_new_tokens=10^12", dict(params={"max_new_tokens": 10**12}), {400}),
        ("max_new_tokens=abc", dict(params={"max_new_tokens": "abc"}), {422}),
        ("GET on the transcribe endpoint", "GET", {405}),
    ]
    for case, kw, expect in cases:
        if kw == "GET":
            r = shared_daemon.get("/v1/transcribe")
        else:
            r = _post(shared_daemon, png, **kw)
        assert r.status_code in expect, f"{case}: {r.status_code} {r.text[:200]}"
        err = r.json()["error"]
        assert err["message"], r.text
        record("hostile", case, category="bad parameters", bytes=len(png), status=r.status_code, type=err["type"],
               message=err["message"][:160], ready_after=True)
    batch = [
        ("batch without multipart", lambda: _post(shared_daemon, png, path="/v1/transcribe/batch"), {415}),
        ("batch with a wrong part name", lambda: shared_daemon.post(
            "/v1/transcribe/batch", files=[("file", ("a.png", png, "image/png"))]), {400}),
        ("batch with a broken multipart boundary", lambda: shared_daemon.post(
            "/v1/transcribe/batch", content=b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"}), {400, 422}),
        ("batch with 300 parts", lambda: shared_daemon.post(
            "/v1/transcribe/batch", files=[("image", (f"{i}.png", b"x", "image/png")) for i in range(300)]), {400, 413}),
    ]
    for case, call, expect in batch:
        r = call()
        assert r.status_code in expect, f"{case}: {r.status_code} {r.text[:200]}"
        body = r.json()
        err = body.get("error") or next(i["error"] for i in body["items"] if i.get("error"))
        record("hostile", case, category="bad parameters", bytes=None, status=r.status_code, type=err["type"],
               message=err["message"][:160], ready_after=True)
    # a batch mixing good and hostile parts: the good part is transcribed, each bad one gets its own error
    parts = [("image", ("good.png", png, "image/png")), ("image", ("bomb.png", H.png_declaring(10**5, 10**5), "image/png")),
             ("image", ("trunc.jpg", H.truncated_cases()["jpeg cut at 30%"], "image/jpeg"))]
    r = shared_daemon.post("/v1/transcribe/batch", files=parts, timeout=60)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert items[0]["results"] and items[1]["error"]["type"] == "too_large" and items[2]["error"]["type"] == "bad_image"
    record("hostile", "batch: one good part, a bomb and a truncated JPEG", category="bad parameters", bytes=None,
           status=200, type="per-item", message="good part transcribed; bomb 413-type too_large, truncated bad_image",
           ready_after=True)
    _assert_ready(shared_daemon)


@pytest.mark.parametrize("case", sorted(H.MALFORMED))
def test_malformed_http_is_a_4xx_and_never_a_500(shared_daemon, record, case):
    reply, seconds = H.raw_exchange(shared_daemon.socket_path, H.MALFORMED[case], timeout=READ_TIMEOUT_S + 12)
    status = H.status_of(reply)
    if status is None:
        # no answer at all: the connection must have been closed by the daemon, not left hanging
        assert seconds < READ_TIMEOUT_S + 10, f"{case}: connection held {seconds:.1f}s"
        outcome = f"connection closed without a reply after {seconds:.1f}s"
    else:
        assert status < 500, f"{case}: {reply[:300]!r}"
        if case in H.VALID_BUT_ODD:
            assert status in (200, 404, 405), f"{case}: {reply[:300]!r}"
        else:  # broken HTTP: refused
            assert 400 <= status < 500, f"{case}: {reply[:300]!r}"
        outcome = reply.split(b"\r\n", 1)[0].decode("latin-1")
    _assert_ready(shared_daemon)
    record("hostile", case, category="malformed HTTP", bytes=len(H.MALFORMED[case]), status=status,
           type="raw", message=outcome[:160], ready_after=True)


def _trickle(sock_path, prefix: bytes, stop: threading.Event, result: dict, step: bytes = b"") -> None:
    t0 = time.monotonic()
    with H.connection(sock_path, prefix, timeout=0.5) as s:
        got = b""
        while not stop.is_set():
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            except socket.timeout:
                if step:
                    try:
                        s.sendall(step)  # one more byte, slower than any real client
                    except OSError:
                        break
                continue
            except OSError:
                break
        result["reply"] = got
        result["seconds"] = time.monotonic() - t0
        result["closed"] = not stop.is_set()


SLOW = {
    "connect and send nothing": (b"", b""),
    "trickle the headers (1 byte / 0.5 s)": (b"POST /v1/transcribe HTTP/1.1\r\n", b"X"),
    "headers, then trickle the body": (b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n\x89PNG", b"\x00"),
    "incomplete headers, then silence": (b"GET /v1/status HTTP/1.1\r\nHost: x\r\n", b""),
}


def test_slow_clients_are_cut_off_and_others_are_served(shared_daemon, record):
    """Slowloris: 8 connections of each kind (32 in all) held open by slow clients; each is closed (or answered
    408) within limits.read_timeout_s plus a margin, and a normal client is served while they hang on."""
    stop = threading.Event()
    runs: list[tuple[str, dict, threading.Thread]] = []
    for name, (prefix, step) in SLOW.items():
        for _ in range(8):
            res: dict = {}
            t = threading.Thread(target=_trickle, args=(shared_daemon.socket_path, prefix, stop, res, step), daemon=True)
            t.start()
            runs.append((name, res, t))
    try:
        t0 = time.monotonic()
        r = _post(shared_daemon, H.encode(H.line_image()))  # served while 32 slow clients hold connections
        served_s = time.monotonic() - t0
        assert r.status_code == 200, r.text
        deadline = READ_TIMEOUT_S * 2 + 10
        for name, res, t in runs:
            t.join(deadline)
            assert not t.is_alive(), f"{name}: the daemon held the connection past {deadline:g}s"
    finally:
        stop.set()
    for name in SLOW:
        mine = [res for n, res, _ in runs if n == name]
        assert all(res.get("closed") for res in mine), f"{name}: {mine}"
        statuses = sorted({H.status_of(res["reply"]) or 0 for res in mine})
        longest = max(res["seconds"] for res in mine)
        assert longest < READ_TIMEOUT_S * 2 + 8, f"{name}: held for {longest:.1f}s"
        if "body" in name:
            assert statuses == [408], f"{name}: {statuses}"
            msg = json.loads(mine[0]["reply"].partition(b"\r\n\r\n")[2])["error"]["message"]
        else:
            assert statuses == [0], f"{name}: {statuses}"  # closed without a reply
            msg = "connection closed"
        record("hostile", f"slowloris: {name} (x8)", category="slow client", bytes=None,
               status=statuses[0] or None, type="408" if statuses == [408] else "closed",
               message=f"{msg[:100]}; cut off after at most {longest:.1f}s (limits.read_timeout_s={READ_TIMEOUT_S:g})",
               ready_after=True)
    record("hostile", "a normal client during the slowloris", category="slow client", bytes=None, status=200,
           type="transcribed", message=f"served in {served_s:.2f}s while 32 slow connections were open",
           ready_after=True)
    _assert_ready(shared_daemon)


# -- memory before decoding (issue 14) ------------------------------------------------------------------------
def _proc_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_amplification_is_refused_on_the_headers_before_decoding(shared_daemon, record):
    """8 parts, each ~12 KB of Deflate TIFF declaring 8 pages of 1000x1000: 64 Mpx for a ~100 KB request. Before
    issue 14 every part was decoded with its own page allowance (0.8 -> 3.2 GiB RSS). Now the request is refused
    as a whole (413, with what it asked and what is allowed) on its headers; nothing is decoded."""
    limit = SHARED_CONFIG["limits"]["max_request_pixels"]
    tiff = H.deflate_tiff(8)
    assert len(tiff) < 32_000
    parts = [("image", (f"{i}.tif", tiff, "image/tiff")) for i in range(8)]
    rss0 = _proc_kib(shared_daemon.pid, "VmRSS")
    r = shared_daemon.post("/v1/transcribe/batch", files=parts, timeout=60)
    assert r.status_code == 413, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "too_large" and err["detail"] == {"pixels": 64_000_000, "pages": 64,
                                                            "max_request_pixels": limit}, err
    assert "64000000" in err["message"] and str(limit) in err["message"]
    grew_mib = (_proc_kib(shared_daemon.pid, "VmRSS") - rss0) / 1024
    assert grew_mib < 64, f"RSS grew {grew_mib:.0f} MiB for a request refused on its headers"
    record("hostile", "batch: 8 x 8-page Deflate TIFF, 64 Mpx in 100 KB", category="memory amplification",
           bytes=8 * len(tiff), status=413, type=err["type"], message=err["message"][:160], ready_after=True)
    # the same through the single-image endpoint: one TIFF of 20 such pages
    big = H.deflate_tiff(20)
    r = _post(shared_daemon, big)
    assert r.status_code == 413 and r.json()["error"]["detail"]["pixels"] == 20_000_000, r.text[:300]
    record("hostile", "one 20-page Deflate TIFF, 20 Mpx", category="memory amplification", bytes=len(big),
           status=413, type="too_large", message=r.json()["error"]["message"][:160], ready_after=True)
    # within the budget: 2 such parts (16 Mpx) are decoded a page at a time and transcribed, RSS bounded
    hwm0 = _proc_kib(shared_daemon.pid, "VmHWM")
    r = shared_daemon.post("/v1/transcribe/batch", files=parts[:2], timeout=120)
    assert r.status_code == 200, r.text[:300]
    items = r.json()["items"]
    assert [len(i["results"] or []) for i in items] == [8, 8] and not any(i["error"] for i in items), items
    peak_mib = (_proc_kib(shared_daemon.pid, "VmHWM") - rss0) / 1024
    assert peak_mib < 16 * 64, f"peak RSS {peak_mib:.0f} MiB over idle for 16 Mpx"  # 64 B/px: htrd.budget
    record("hostile", "batch: 2 x 8-page Deflate TIFF, 16 Mpx (the request limit)", category="memory amplification",
           bytes=2 * len(tiff), status=200, type="transcribed",
           message=f"16 pages transcribed; peak RSS {max(0.0, peak_mib):.0f} MiB over idle (high-water mark "
                   f"{hwm0 // 1024} -> {_proc_kib(shared_daemon.pid, 'VmHWM') // 1024} MiB)", ready_after=True)
    _assert_ready(shared_daemon)


def test_cmyk_with_a_foreign_colour_profile_is_transcribed_alone_and_in_a_batch(shared_daemon, record):
    """A CMYK JPEG/TIFF whose ICC profile is sRGB or Lab made ImageCms raise PyCMSError: a 500, and in a batch
    the good parts' results were lost with it. Now: the plain CMYK conversion (the documented fallback)."""
    cases = H.colour_profile_cases()
    for case, body in cases.items():
        r = _post(shared_daemon, body)
        assert r.status_code == 200, f"{case}: {r.status_code} {r.text[:300]}"
        assert len(r.json()["results"]) == 1
        record("hostile", case, category="colour profile", bytes=len(body), status=200, type="transcribed",
               message="plain CMYK conversion (the profile cannot convert it); transcribed", ready_after=True)
    good = H.encode(H.line_image())
    parts = [("image", ("good.png", good, "image/png"))]
    parts += [("image", (f"{i}.bin", body, "application/octet-stream")) for i, body in enumerate(cases.values())]
    parts += [("image", ("trunc.png", good[: len(good) // 2], "image/png"))]
    r = shared_daemon.post("/v1/transcribe/batch", files=parts, timeout=120)
    assert r.status_code == 200, r.text[:300]
    items = r.json()["items"]
    assert all(i["results"] and not i["error"] for i in items[:-1]), items
    assert items[-1]["error"]["type"] == "bad_image" and not items[-1]["results"]
    record("hostile", f"batch: a good PNG, the {len(cases)} CMYK files above and a truncated PNG",
           category="colour profile", bytes=None, status=200, type="per-item",
           message=f"{len(items) - 1} parts transcribed; the truncated one alone got bad_image", ready_after=True)
    _assert_ready(shared_daemon)


def test_client_disconnect_and_protocol_error_are_not_server_errors(shared_daemon, record):
    """A client that disconnects mid-body, or sends a bad chunk-size line: one log line each, no traceback,
    counted as htrd_client_disconnects_total{kind} and code 499 / 400 -- never htrd_requests_total{code="500"}."""
    before = shared_daemon.metrics()
    logged = len(shared_daemon.stderr())
    for _ in range(3):
        H.disconnect_mid_body(shared_daemon.socket_path)
    H.disconnect_mid_body(shared_daemon.socket_path, path="/v1/transcribe/batch",
                          ctype="multipart/form-data; boundary=b0undary", sent=b"--b0undary\r\n")
    reply, _ = H.raw_exchange(shared_daemon.socket_path, H.MALFORMED["bad chunk size"])
    assert H.status_of(reply) == 400, reply[:200]

    def counted():
        m = shared_daemon.metrics()
        gone = H.metric_sample(m, "htrd_client_disconnects_total", kind="disconnect") - \
            H.metric_sample(before, "htrd_client_disconnects_total", kind="disconnect")
        proto = H.metric_sample(m, "htrd_client_disconnects_total", kind="protocol_error") - \
            H.metric_sample(before, "htrd_client_disconnects_total", kind="protocol_error")
        return (m, gone, proto) if gone >= 4 and proto >= 1 else None

    from helpers import wait_until

    after, gone, proto = wait_until(counted, 20, what="the disconnects counted")
    assert (gone, proto) == (4, 1)
    for endpoint in ("/v1/transcribe", "/v1/transcribe/batch"):
        assert H.metric_sample(after, "htrd_requests_total", code="500", endpoint=endpoint) == \
            H.metric_sample(before, "htrd_requests_total", code="500", endpoint=endpoint), endpoint
    d499 = (H.metric_sample(after, "htrd_requests_total", code="499", endpoint="/v1/transcribe")
            - H.metric_sample(before, "htrd_requests_total", code="499", endpoint="/v1/transcribe"))
    assert d499 == 3
    logs = wait_until(lambda: (t := shared_daemon.stderr()[logged:]).count("client disconnected") >= 4 and t,
                      10, what="the disconnect log lines")
    assert "Traceback" not in logs and "ClientDisconnect" not in logs and " ERROR " not in logs, logs[-3000:]
    lines = [ln for ln in logs.splitlines() if "client disconnected" in ln]
    assert len(lines) == 4 and all(" INFO " in ln and "-> 499" in ln for ln in lines), lines
    assert sum("HTTP protocol error" in ln and "-> 400" in ln for ln in logs.splitlines()) == 1
    record("hostile", "client disconnects mid-body (x4), bad chunk-size line (x1)", category="client disconnect",
           bytes=None, status=499, type="disconnect",
           message=f"metrics: htrd_client_disconnects_total disconnect +{gone:.0f}, protocol_error +{proto:.0f}; "
                   f"htrd_requests_total code=499 +{d499:.0f}, code=500 +0; one INFO line each, no traceback",
           ready_after=True)
    _assert_ready(shared_daemon)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0
