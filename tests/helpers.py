"""What the tests share: the repository's paths, polling without sleeps, input files, running htrctl.

Import it by name (pytest puts ``tests/`` on ``sys.path``; a bench script inserts it)::

    from helpers import REPO, SAMPLES, make_inputs, run_htrctl, wait_until

The harnesses that start real components build on it:

- ``daemon_harness.py``: a real ``htrd`` on the demo model (CPU, a Unix socket in tmp_path),
  the ``htrd`` fixture and ``module_daemon``, one daemon shared by a test module;
- ``sshd_harness.py``: a real sshd on loopback (provisioning over ssh/SFTP, remote replicas);
- ``slurm_harness.py``: a private one-node Slurm (munged, slurmctld, slurmd);
- ``systemd/nspawn_harness.py``: a booted systemd in a container;
- ``reliability/hostile.py``: hostile inputs and raw HTTP for the reliability suite.

Fixtures (the demo model, its provisioned copy, environment isolation) are in ``conftest.py``.
Nothing here imports pytest, torch or httpx at module level: bench scripts use it too.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HTR_TEST_CACHE", REPO / ".cache" / "tests"))
SAMPLES = REPO / "htrctl" / "data" / "samples"
IN_CI = os.environ.get("HTR_CI", "") not in ("", "0")


def require_system(condition: bool, what: str) -> None:
    """Skip locally, but fail under CI, when a system prerequisite is missing."""
    import pytest

    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide {what} (installed by `make test`)")
    pytest.skip(f"{what} not available (run `make test` to install it)")


# -- waiting ------------------------------------------------------------------------------------------------
class WaitTimeout(AssertionError):
    """What :func:`wait_until` raises when its time is up (an AssertionError: a test fails with it)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str = "condition", *, interval: float = 0.05) -> T:
    """Poll *predicate* until it returns something truthy (returned) or *timeout* seconds pass (WaitTimeout).

    Never a fixed sleep: the test goes on as soon as the condition holds. An exception from *predicate*
    (a process that died meanwhile) ends the wait at once."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {round(timeout, 1):g}s waiting for {what} (last: {last!r})")
        pause.wait(interval)


# -- processes and ports ------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 60.0, *, group: bool = False) -> int | None:
    """SIGTERM, wait up to *timeout*, then SIGKILL (the process group with *group*); the exit code.
    A process that already ended is left alone."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(10)
    return proc.returncode


def run_htrctl(*args: str, text: bool = True, stdout=subprocess.PIPE, prefix: tuple[str, ...] | list[str] = (),
               input: str | bytes | None = None, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m htrctl ARGS`` from the repository root as a user types it; stdout and stderr captured.
    *prefix*: a command in front (``setpriv ...``); *env*: added to this process's environment."""
    return subprocess.run([*prefix, sys.executable, "-m", "htrctl", *args], input=input, stdout=stdout,
                          stderr=subprocess.PIPE, text=text, timeout=timeout, cwd=REPO,
                          env={**os.environ, **env} if env else None)


# -- inputs and outputs -------------------------------------------------------------------------------------
def sample_lines() -> list[Path]:
    """The line images shipped in htrctl/data/samples (not the multi-page TIFF)."""
    return sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


def make_inputs(root: Path, n: int) -> list[str]:
    """*n* line images in nested directories under *root* (``book-<i % 3>/line-<i>.png``: copies of the
    shipped samples under distinct names); their paths relative to *root*, in order."""
    lines = sample_lines()
    rels = []
    for i in range(n):
        src = lines[i % len(lines)]
        rel = f"book-{i % 3}/line-{i:04d}{src.suffix}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
        rels.append(rel)
    return rels


def line_copies(root: Path, n: int) -> Path:
    """*root*, made, holding *n* copies of one shipped line image, flat (``l00.png``, ``l01.png``, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shutil.copyfile(SAMPLES / "line-01.png", root / f"l{i:02d}.png")
    return root


def output_files(out: Path) -> list[str]:
    """Every file under *out*, relative and sorted ([] when *out* does not exist)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []


def line_png() -> bytes:
    """A synthetic 1200x160 text line (dark strokes on white) as PNG: the shape the GPU checks send."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1200, 160), "white")
    d = ImageDraw.Draw(img)
    for x in range(30, 1170, 45):
        d.line([(x, 130), (x + 25, 30)], fill="black", width=6)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def wait_ready_states(client, proc: subprocess.Popen, timeout: float, log: Path, *, since: float | None = None,
                      interval: float = 0.1) -> list[tuple[str, float]]:
    """Poll htrd's ``/v1/ready`` through the httpx *client* until it answers 200; the states it went through,
    each with the seconds since *since* (default: now) when it was first seen. AssertionError with the end of
    *log* when *proc* exits first or *timeout* (counted from *since*) passes."""
    import httpx

    t0 = time.monotonic() if since is None else since
    states: list[tuple[str, float]] = []

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"htrd exited with {proc.returncode} before READY; log:\n{_tail(log)}")
        try:
            r = client.get("/v1/ready")
            state = r.json().get("state")
        except (httpx.TransportError, ValueError):  # not bound yet, or an answer cut short
            return False
        if not states or states[-1][0] != state:
            states.append((state, round(time.monotonic() - t0, 2)))
        return r.status_code == 200

    try:
        wait_until(ready, timeout - (time.monotonic() - t0), "htrd to be ready", interval=interval)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc}; states {states}; log:\n{_tail(log)}") from None
    return states


def _tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def stroke_line(w: int, h: int, seed: int):
    """A line image of *w* x *h* with 25 random black strokes on white (PIL, RGB): lines of many sizes and
    contents for the generator tests, deterministic per *seed*."""
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        draw.line([(rnd.randrange(w), rnd.randrange(h)), (rnd.randrange(w), rnd.randrange(h))], fill=(0, 0, 0), width=3)
    return img
