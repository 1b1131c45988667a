"""Preprocessing in worker processes (htrd.prepool): real htrd daemons on the demo model, real worker processes.

What it must hold: the workers' encoding equals the in-process one; a worker that dies on a file (test fault
``crash_preprocess``) fails that file with ``internal`` while the images beside it are served and the daemon
stays ready; the workers go when htrd goes (SIGTERM or SIGKILL); ``limits.preprocess_workers: 0`` serves from
threads.
"""

from __future__ import annotations

import io
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from daemon_harness import htrd  # noqa: F401 -- the fixture
from helpers import stroke_line, wait_until
from htrd.images import read_header
from htrd.prepool import _from_wire, _to_wire, default_workers, encode_pages

from htrctl import protocol as P


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command (state, ppid, ...); None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> set[int]:
    """Every live process below *pid* (the fork server's workers are its grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = stat(entry.name) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if (fields := stat(p)) and fields[0] != "Z"}


def batch_beside(d, bad: bytes, good: list[bytes]) -> list[dict]:
    """One batch request: good[0], *bad*, good[1]; its items (the request itself must succeed)."""
    files = [("image", ("ok0.png", good[0], "image/png")), ("image", ("bad.png", bad, "image/png")),
             ("image", ("ok1.png", good[1], "image/png"))]
    r = d.post(P.PATH_TRANSCRIBE_BATCH, files=files)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_default_workers_half_the_cores_at_most_8():
    assert [default_workers(n) for n in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]


def test_what_crosses_from_a_worker_is_the_encoding_bit_for_bit():
    from htrd.model import Encoded

    enc = Encoded(input_ids=torch.arange(7), mm_token_type_ids=torch.tensor([0, 1, 1], dtype=torch.int32),
                  pixel_values=torch.randn(5, 12).to(torch.bfloat16), image_grid_thw=torch.tensor([[1, 2, 4]]),
                  preprocess_ms=2.5)
    wire = _to_wire(enc)
    assert wire[2][0] == "shm"
    block = Path("/dev/shm") / wire[2][1].lstrip("/")
    assert block.exists()  # the patches cross through shared memory, the rest pickled
    back = _from_wire(wire)
    assert not block.exists()  # unlinked by the receiver
    for name in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        a, b = getattr(enc, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert back.preprocess_ms == 2.5 and back.grid == (1, 2, 4)


def test_the_patches_go_through_the_pipe_where_shared_memory_lacks_room(monkeypatch):
    from htrd import prepool
    from htrd.model import Encoded

    pixels = torch.randn(64, 12).to(torch.bfloat16)
    enc = Encoded(input_ids=torch.arange(3), mm_token_type_ids=None, pixel_values=pixels,
                  image_grid_thw=torch.tensor([[1, 8, 8]]))
    monkeypatch.setattr(prepool, "_shm_room", lambda: pixels.numel() * 2 * 2 - 1)  # less than twice the block
    before = set(os.listdir("/dev/shm"))
    wire = _to_wire(enc)
    assert wire[2][0] == "inline" and set(os.listdir("/dev/shm")) == before
    back = _from_wire(wire)
    assert torch.equal(back.pixel_values, pixels) and back.mm_token_type_ids is None
    monkeypatch.setattr(prepool, "SHM_DIR", "/nonexistent-shm")  # unreadable: by value as well
    assert _to_wire(enc)[2][0] == "inline"


def test_workers_encode_as_htrd_does_and_survive_a_crashing_file(htrd, demo_model_dir):
    d = htrd(config={"limits": {"preprocess_workers": 2}}, faults="crash_preprocess=777")
    eng = d.status()["engine"]
    assert eng["preprocess_workers"] == 2 and eng["preprocess_in"] == "processes" and eng["preprocess_restarts"] == 0
    workers = descendants(d.pid)
    assert len(workers) >= 3  # the fork server, its two workers (and multiprocessing's resource tracker)

    # The same text as the in-process path (the CPU demo model is deterministic): see test_threads below for
    # the other side; here, each line's text is the same whichever worker took it.
    lines = [png(stroke_line(w, 40, w)) for w in (300, 420, 560, 300)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda b: d.post(P.PATH_TRANSCRIBE, content=b).json()["results"][0]["text"], lines))
    assert texts[0] == texts[3]

    # A file that kills its worker, in a batch beside good ones: that part fails with internal (its pool died
    # twice with it), the good parts are served, the daemon stays ready with new workers.
    items = batch_beside(d, png(stroke_line(777, 40, 1)), lines[:2])
    assert items[1]["error"]["type"] == "internal" and "died" in items[1]["error"]["message"]
    assert [items[0]["results"][0]["text"], items[2]["results"][0]["text"]] == [texts[0], texts[1]]
    assert d.state() == "ready"
    r = d.post(P.PATH_TRANSCRIBE, content=lines[2])
    assert r.status_code == 200 and r.json()["results"][0]["text"] == texts[2]
    assert "preprocessing worker process died" in d.stderr()
    after = descendants(d.pid)
    assert d.stop() == 0
    wait_until(lambda: not alive(after), 30, "htrd's worker processes to exit with it")


def test_a_file_that_hangs_its_worker_fails_alone_after_the_timeout(htrd):
    d = htrd(config={"limits": {"preprocess_workers": 2, "preprocess_timeout_s": 2.0}}, faults="hang_preprocess=555")
    good = [png(stroke_line(w, 40, w)) for w in (310, 430)]
    items = batch_beside(d, png(stroke_line(555, 40, 1)), good)
    assert items[1]["error"]["type"] == "internal" and "hung" in items[1]["error"]["message"], items[1]
    assert items[0]["results"] and items[2]["results"], items
    assert "more than 2 s" in d.stderr()
    eng = d.status()["engine"]
    assert eng["preprocess_in"] == "processes" and eng["preprocess_restarts"] >= 2
    assert d.post(P.PATH_TRANSCRIBE, content=good[1]).status_code == 200  # the new pool serves


def test_htrd_serves_from_threads_when_its_worker_processes_cannot_start(htrd):
    d = htrd(config={"limits": {"preprocess_workers": 2}}, faults="fail_preprocess_start")
    assert d.status()["engine"]["preprocess_in"] == "threads"
    assert "worker processes did not start" in d.stderr() and "preprocessing in" in d.stderr()
    r = d.post(P.PATH_TRANSCRIBE, content=png(stroke_line(300, 40, 300)))
    assert r.status_code == 200, r.text
    wait_until(lambda: not alive(_workers(d.pid)), 30, "the failed workers to be gone")


def _workers(pid: int) -> set[int]:
    """The worker processes of htrd *pid*: the fork server's children (its own children are the fork server and
    multiprocessing's resource tracker, which stay for htrd's life)."""
    return descendants(pid) - _children(pid)


def _children(pid: int) -> set[int]:
    return {p for p in descendants(pid) if (fields := stat(p)) and int(fields[1]) == pid}


def test_a_worker_killed_while_idle_is_replaced_for_the_next_image(htrd):
    """The OOM killer takes a worker between requests: the next image finds the pool broken, a new pool
    serves it."""
    d = htrd(config={"limits": {"preprocess_workers": 1}})
    line = png(stroke_line(300, 40, 300))
    first = d.post(P.PATH_TRANSCRIBE, content=line).json()["results"][0]["text"]
    [worker] = _workers(d.pid)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not alive({worker}), 30, "the worker to die")
    r = d.post(P.PATH_TRANSCRIBE, content=line)
    assert r.status_code == 200 and r.json()["results"][0]["text"] == first, r.text
    assert d.status()["engine"]["preprocess_restarts"] == 1


def test_workers_exit_when_htrd_is_killed(htrd):
    d = htrd(config={"limits": {"preprocess_workers": 1}})
    workers = descendants(d.pid)
    assert workers
    os.kill(d.pid, signal.SIGKILL)
    d.wait_exit(30)
    wait_until(lambda: not alive(workers), 60, "the worker processes of a killed htrd to exit")


def test_threads_when_preprocess_workers_is_0(htrd):
    d = htrd(config={"limits": {"preprocess_workers": 0}})
    assert not descendants(d.pid)  # no fork server, no workers
    eng = d.status()["engine"]
    assert eng["preprocess_workers"] == max(1, min(32, os.cpu_count() or 1)) and eng["preprocess_in"] == "threads"
    ok = png(stroke_line(300, 40, 300))
    r = d.post(P.PATH_TRANSCRIBE, content=ok)
    assert r.status_code == 200, r.text
    # the same text as in worker processes (the other test's first line)
    w = htrd(config={"limits": {"preprocess_workers": 1}})
    assert w.post(P.PATH_TRANSCRIBE, content=ok).json()["results"][0]["text"] == r.json()["results"][0]["text"]
    bad = d.post(P.PATH_TRANSCRIBE, content=ok[:60])
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "bad_image"
    assert w.post(P.PATH_TRANSCRIBE, content=ok[:60]).json() == bad.json()


def test_encode_pages_turns_the_processors_refusal_into_bad_image(demo_model_dir):
    from htrd.api_errors import ApiError
    from htrd.model import ImageEncoder, load_processor

    def refuse(image):
        raise ValueError("absolute aspect ratio must be smaller than 200\nmore")

    ok = png(stroke_line(300, 40, 2))
    header = read_header(ok, max_pixels=1 << 20)
    with pytest.raises(ApiError) as info:
        encode_pages(ok, header, refuse)
    assert info.value.type == "bad_image" and "300x40" in info.value.message and "aspect ratio" in info.value.message
    [(page, e)] = encode_pages(ok, header, ImageEncoder(load_processor(demo_model_dir)).encode)
    assert page == 0 and e.pixel_values.shape[0] == int(e.image_grid_thw.prod())
