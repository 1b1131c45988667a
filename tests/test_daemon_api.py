"""A real htrd on the demo model (CPU) over a Unix socket: the API, images, batching, metrics."""

from __future__ import annotations

import concurrent.futures
import grp
import io
import os
import re
import struct
import zlib
import socket
import stat
import threading

import pytest
from daemon_harness import htrd, start_daemon  # noqa: F401 -- htrd is a fixture
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


def usable_group() -> grp.struct_group | None:
    """A group other than our primary one that this process may give the socket to."""
    if os.geteuid() == 0:
        candidates = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    else:
        candidates = [grp.getgrgid(g) for g in os.getgroups() if g != os.getgid()]
    return candidates[0] if candidates else None


GROUP = usable_group()
MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("api")
    # A stale socket file (nothing listens on it) at the configured path must be replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp / "htrd.sock"))
    stale.close()
    config = {
        "limits": {"batch_sizes": [1, 2, 4, 8], "batch_window_ms": 150.0, "max_body_bytes": MAX_BODY,
                   "max_image_pixels": 4_000_000, "max_images_per_request": 6},
        "socket": {"group": GROUP.gr_name if GROUP else None, "mode": "0o660"},
    }
    d = start_daemon(tmp, demo_model_dir, config=config)
    yield d
    code = d.stop()
    assert code == 0, d.stderr()[-3000:]


def test_ready_live_and_status_report_a_ready_cpu_daemon(daemon):
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
    t = body.results[0].timings
    assert t.generate_ms > 0 and t.preprocess_ms > 0
    assert t.total_ms == pytest.approx(t.preprocess_ms + t.queue_ms + t.generate_ms)
    again = [P.TranscribeResponse.model_validate(daemon.post(P.PATH_TRANSCRIBE, content=png).json()) for _ in range(2)]
    assert {a.results[0].text for a in again} == {body.results[0].text}
    other = daemon.post(P.PATH_TRANSCRIBE, content=encode(Image.new("RGB", (200, 300), "black")))
    assert other.json()["results"][0]["text"] != body.results[0].text  # the output depends on the image
    assert "peer_uid=%d" % os.getuid() in daemon.stderr()


def test_the_socket_is_0660_and_owned_by_the_configured_group(daemon):
    require_group()
    st = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == GROUP.gr_gid


def require_group():
    if GROUP is None:
        pytest.skip("this user belongs to no second group to give the socket to")


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(r"^" + re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)$",
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_requests_are_batched(daemon):
    before = daemon.metrics()
    n_before = metric(before, "htrd_batch_size_count")
    images = [encode(line_image(i)) for i in range(6)]
    barrier = threading.Barrier(len(images))

    def send(png):
        barrier.wait(10)
        return daemon.post(P.PATH_TRANSCRIBE, content=png)

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(send, images))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    sizes = [r.json()["results"][0]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes  # at least two requests shared one generate call
    after = daemon.metrics()
    batches = metric(after, "htrd_batch_size_count") - n_before
    assert 1 <= batches < len(images)  # fewer generate calls than requests
    assert metric(after, "htrd_batch_size_sum") - metric(before, "htrd_batch_size_sum") == len(images)
    # a batched result equals the same image transcribed alone (left padding is exact)
    alone = daemon.post(P.PATH_TRANSCRIBE, content=images[0]).json()["results"][0]
    assert alone["batch_size"] == 1 and alone["text"] == responses[0].json()["results"][0]["text"]


def test_batch_endpoint_answers_each_part_and_each_tiff_page(daemon):
    pages = [line_image(i).convert("L") for i in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    files = [
        ("image", ("l1.png", encode(line_image(1)), "image/png")),
        ("image", ("bad.png", b"not an image at all", "image/png")),
        ("image", ("page.tif", buf.getvalue(), "image/tiff")),
        ("image", ("l2.jpg", encode(line_image(2), "JPEG", quality=90), "image/jpeg")),
    ]
    r = daemon.post(P.PATH_TRANSCRIBE_BATCH, files=files)
    assert r.status_code == 200, r.text
    body = P.BatchResponse.model_validate(r.json())
    assert [i.filename for i in body.items] == ["l1.png", "bad.png", "page.tif", "l2.jpg"]
    assert body.items[1].error is not None and body.items[1].error.type == "bad_image"
    assert "unsupported image format" in body.items[1].error.message
    assert [p.page for p in body.items[2].results] == [0, 1, 2]
    assert body.items[0].results[0].text and body.items[3].results[0].text
    single = daemon.post(P.PATH_TRANSCRIBE, content=encode(line_image(1))).json()["results"][0]["text"]
    assert body.items[0].results[0].text == single
    # a multi-page TIFF on the single endpoint: one result per page
    r = daemon.post(P.PATH_TRANSCRIBE, content=buf.getvalue())
    assert [p["page"] for p in r.json()["results"]] == [0, 1, 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries (almost) no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "empty": (b"", 400, "bad_image", "empty"),
    "text": (b"hello, this is not an image", 415, "bad_image", "unsupported image format"),
    "pdf": (b"%PDF-1.7\n...", 415, "bad_image", "PDF"),
    "gif": (b"GIF89a" + b"\0" * 20, 415, "bad_image", "GIF"),
    "truncated_png": (None, 422, "bad_image", "cannot decode"),
    "corrupt_header": (b"\x89PNG\r\n\x1a\n" + b"\xff" * 40, 422, "bad_image", "PNG"),
    "bomb": (png_header_only(30000, 30000), 413, "too_large", "refused before decoding"),
    "too_many_pages": (None, 413, "too_large", "pages"),
    "body_too_large": (None, 413, "too_large", "max_body_bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_clear_4xx_and_daemon_stays_ready(daemon, case):
    data, status, etype, words = BAD_IMAGES[case]
    if case == "truncated_png":
        full = encode(line_image(3))
        data = full[: len(full) // 2]
    elif case == "too_many_pages":
        frames = [Image.new("L", (40, 20), v) for v in range(0, 240, 30)]  # 8 pages > 6
        buf = io.BytesIO()
        frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
        data = buf.getvalue()
    elif case == "body_too_large":
        data = os.urandom(MAX_BODY + 1)
    r = daemon.post(P.PATH_TRANSCRIBE, content=data)
    assert r.status_code == status, r.text
    err = P.ErrorEnvelope.model_validate(r.json()).error
    assert err.type == etype and words in err.message, err.message
    assert daemon.get(P.PATH_READY).status_code == 200
    assert "\\x89PNG" not in daemon.stderr()  # never log image bytes


def test_every_image_format_and_pixel_mode_is_transcribed(daemon):
    rgb = line_image(4)
    variants = {
        "png-rgb": encode(rgb),
        "png-gray": encode(rgb.convert("L")),
        "png-1bit": encode(rgb.convert("1")),
        "png-palette": encode(rgb.convert("P")),
        "png-alpha": encode(rgb.convert("RGBA")),
        "jpeg": encode(rgb, "JPEG", quality=95),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "webp": encode(rgb, "WEBP", lossless=True),
        "tiff": encode(rgb, "TIFF"),
    }
    texts = {}
    for name, data in variants.items():
        r = daemon.post(P.PATH_TRANSCRIBE, content=data)
        assert r.status_code == 200, (name, r.text)
        texts[name] = r.json()["results"][0]["text"]
    # lossless encodings of the same pixels give the same transcription
    assert texts["png-rgb"] == texts["webp"] == texts["tiff"] == texts["png-alpha"]


def test_errors_use_the_envelope(daemon):
    r = daemon.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = daemon.get(P.PATH_TRANSCRIBE)
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
    r = daemon.post(P.PATH_TRANSCRIBE + "?max_new_tokens=lots", content=encode(line_image(0)))
    assert r.status_code == 422 and r.json()["error"]["type"] == "bad_request"
    assert "max_new_tokens" in r.json()["error"]["message"]
    r = daemon.post(P.PATH_TRANSCRIBE + "?max_new_tokens=100000", content=encode(line_image(0)))
    assert r.status_code == 400 and "generation.max_new_tokens" in r.json()["error"]["message"]
    r = daemon.post(P.PATH_TRANSCRIBE_BATCH, files=[("file", ("a.png", encode(line_image(0)), "image/png"))])
    assert r.status_code == 400 and "'image'" in r.json()["error"]["message"]
    r = daemon.post(P.PATH_TRANSCRIBE_BATCH, content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "bad_request"
    r = daemon.post(P.PATH_TRANSCRIBE_BATCH, files=[("image", (f"{i}.png", b"x", "image/png")) for i in range(7)])
    assert r.status_code == 413 and "max_images_per_request" in r.json()["error"]["message"]
    assert daemon.get(P.PATH_READY).status_code == 200


def test_max_new_tokens_is_honoured_and_openapi_and_metrics_are_served(daemon):
    r = daemon.post(P.PATH_TRANSCRIBE + "?max_new_tokens=3", content=encode(line_image(5)))
    assert r.status_code == 200 and r.json()["results"][0]["tokens"] <= 3
    spec = daemon.get(P.PATH_OPENAPI).json()
    for path in (P.PATH_TRANSCRIBE, P.PATH_TRANSCRIBE_BATCH, P.PATH_STATUS, P.PATH_READY, P.PATH_LIVE):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"][P.PATH_TRANSCRIBE_BATCH]["post"]["requestBody"]["content"]
    text = daemon.metrics()
    for name in ("htrd_requests_total", "htrd_request_duration_seconds_bucket", "htrd_batch_size_bucket",
                 "htrd_queue_depth", "htrd_generation_tokens_per_second", "htrd_generated_tokens_total",
                 "htrd_state"):
        assert name in text, name
    assert metric(text, "htrd_state", 'htrd_state="ready"') == 1.0
    assert metric(text, "htrd_generated_tokens_total") > 0
    # the loaded heap was frozen before READY (htrd.heap): the demo model's ~0.4 M objects, never walked again
    assert metric(text, "htrd_gc_frozen_objects") > 100_000
    assert "htrd_gc_pause_seconds_count" in text


@pytest.mark.slow
def test_default_fast_generator_gives_the_plain_paths_text(daemon, htrd):
    """The default (generation.static_cache: auto -> the fast generator, continuous batching) serves the
    same greedy text as the reference path (static_cache: false, HF generate on the unmerged adapter); so does
    the fast generator with mixed steps (generation.mixed_steps)."""
    plain = htrd(config={"generation": {"static_cache": False}})
    images = [encode(line_image(i)) for i in range(3)]
    want = [plain.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"] for b in images]
    got = [daemon.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"] for b in images]
    assert got == want
    assert daemon.status()["engine"]["generator"] == "fast" and plain.status()["engine"]["generator"] == "plain"
    assert "generator=FastGenerator" in daemon.stderr() and "generator=PlainGenerator" in plain.stderr()
    eng = daemon.status()["engine"]
    assert eng["slots"] == 8 and eng["preprocess_ms_per_image"] > 0 and eng["kv_cache_bytes"] > 0
    assert eng["decode_attention"] == "sdpa" and plain.status()["engine"]["decode_attention"] is None  # CPU
    assert eng["prefill_layout"] == "packed" and plain.status()["engine"]["prefill_layout"] is None
    assert eng["prefill_tokens_per_step"] is None and eng["mixed_steps"] == 0 and eng["prefill_waiting"] is None
    # generation.mixed_steps: prompts prefilled inside the decode steps -- the same text
    mixed = htrd(config={"generation": {"mixed_steps": True, "prefill_tokens": 64}})
    assert [mixed.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"] for b in images] == want
    eng_m = mixed.status()["engine"]
    assert eng_m["prefill_layout"] == "mixed" and eng_m["prefill_tokens_per_step"] == 64
    assert eng_m["mixed_steps"] > 0 and eng_m["prefill_waiting"] == 0
    # graphs are a GPU's: nothing captured ahead of need, nothing failed (the fields are served all the same)
    assert eng["prefill_precaptured"] == 0 and eng["prefill_direct_capture_failures"] == 0
    # where start -> READY went (the CPU captures no decode graphs)
    assert eng["load_s"] > 0 and eng["warmup_s"] > 0 and eng["warmup_graphs"] == 0 and eng["warmup_graphs_s"] >= 0


@pytest.mark.slow
def test_merged_variant_is_loaded_and_gives_the_same_text(daemon, htrd, demo_model_copy):
    """A directory with merged/ (provision --merge) is served from the merged weights, without PEFT."""
    from htrctl.merge import merge_adapter

    merge_adapter(demo_model_copy)
    merged = htrd(model_dir=demo_model_copy)
    assert merged.status()["model_variant"] == "merged"
    images = [encode(line_image(i)) for i in range(2)]
    want = [daemon.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"] for b in images]
    got = [merged.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"] for b in images]
    assert got == want


def test_batch_page_budget_spans_parts(daemon):
    """limits.max_images_per_request counts TIFF pages over all parts (6 here): the part that overflows fails alone."""
    frames = [line_image(i).convert("L") for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    files = [("image", (f"p{i}.tif", buf.getvalue(), "image/tiff")) for i in range(2)]
    r = daemon.post(P.PATH_TRANSCRIBE_BATCH, files=files)
    assert r.status_code == 200, r.text
    first, second = r.json()["items"]
    assert first["error"] is None and len(first["results"]) == 4
    assert second["error"]["type"] == "too_large" and "max_images_per_request" in second["error"]["message"]
