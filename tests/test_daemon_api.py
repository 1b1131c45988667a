"""A real htrd on the demo model (CPU) over a Unix socket: the API, images, batching, metrics."""

from __future__ import annotations

import io
import os
import socket
import stat
import threading

import pytest
from daemon_harness import start_daemon, wait_until
from PIL import Image, ImageDraw

from htrctl import protocol as P


def line_image(text_seed: int = 0, size=(480, 64)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for i in range(12):
        x = 20 + i * 36 + (text_seed * 7) % 11
        d.line([(x, 50), (x + 14 + (i * text_seed) % 9, 12)], fill="black", width=4)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("api")
    # A stale socket file (nothing listens on it) at the configured path must be replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp / "htrd.sock"))
    stale.close()
    d = start_daemon(tmp, demo_model_dir, config={"limits": {"batch_sizes": [1, 2, 4, 8], "batch_window_ms": 150.0}})
    yield d
    code = d.stop()
    assert code == 0, d.stderr()[-3000:]


def test_ready_live_status(daemon):
    r = daemon.get(P.PATH_READY)
    assert r.status_code == 200 and r.json()["state"] == "ready"
    assert daemon.get(P.PATH_LIVE).json()["status"] == "alive"
    st = P.StatusResponse.model_validate(daemon.status())
    assert st.state == "ready" and st.gpu.device == "cpu" and st.model_variant == "adapter"
    assert st.batch_sizes == [1, 2, 4, 8] and st.pid == daemon.pid
    assert "replacing" in daemon.stderr() or "stale socket" in daemon.stderr()


def test_transcription_is_stable_and_greedy(daemon):
    png = encode(line_image(1))
    first = daemon.post(P.PATH_TRANSCRIBE, content=png, headers={P.HEADER_REQUEST_ID: "req-stable-1"})
    assert first.status_code == 200, first.text
    body = P.TranscribeResponse.model_validate(first.json())
    assert body.request_id == "req-stable-1" and first.headers["x-request-id"] == "req-stable-1"
    assert len(body.results) == 1 and body.results[0].tokens > 0 and body.results[0].text
    again = [P.TranscribeResponse.model_validate(daemon.post(P.PATH_TRANSCRIBE, content=png).json()) for _ in range(2)]
    assert {a.results[0].text for a in again} == {body.results[0].text}
    other = daemon.post(P.PATH_TRANSCRIBE, content=encode(Image.new("RGB", (200, 300), "black")))
    assert other.json()["results"][0]["text"] != body.results[0].text  # the output depends on the image
    assert "peer_uid=%d" % os.getuid() in daemon.stderr()
