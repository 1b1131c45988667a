"""Fixtures for the systemd tests: ONE container booted per session, htrctl installed in it.

Tests that need it use the ``container`` fixture (booted systemd) or
``installed`` (``htrctl service install`` done, the demo model configured on
CPU). Under CI (HTR_CI=1) a container that cannot boot fails the tests
instead of skipping them (``require_system``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import CACHE, REPO, require_system
from nspawn_harness import CONFIG, HTRCTL, TEST_ENV_FILE, Container, ContainerError, can_boot, set_test_env

VENV = Path(sys.prefix)
TEST_DROPIN = "/etc/systemd/system/htr.service.d/50-test.conf"


def _under(p: Path, parent: Path) -> bool:
    p, parent = p.resolve(), parent.resolve()
    return p == parent or parent in p.parents


def _pth_dirs() -> list[Path]:
    """Directories the environment adds through .pth files (a venv that reuses another's packages)."""
    import site

    out = []
    for sp in site.getsitepackages():
        for pth in Path(sp).glob("*.pth"):
            for line in pth.read_text(errors="replace").splitlines():
                p = Path(line.strip())
                if line.strip() and not line.startswith(("#", "import")) and p.is_absolute() and p.is_dir():
                    out.append(p)
    return out


@pytest.fixture(scope="session")
def container():
    ok, what = can_boot()
    require_system(ok, what)
    # Not under /tmp: the service's PrivateTmp=yes would hide it (as it would a real model there).
    scratch = CACHE / f"nspawn-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    # /usr is the host's, read-only: a writable /usr/local/sbin for htr-gpu-prepare's script.
    (scratch / "sbin").mkdir()
    binds = [REPO, scratch, Path(f"{scratch / 'sbin'}:/usr/local/sbin")]
    binds_ro = [Path(sys.base_prefix)]
    for extra in (VENV, CACHE, *_pth_dirs()):
        if not _under(extra, REPO):
            binds_ro.append(extra.resolve())
    box = Container(f"htr-test-{os.getpid()}", binds=binds, binds_ro=binds_ro, log=scratch / "nspawn.log")
    box.scratch = scratch
    try:
        box.boot(timeout=90)
    except ContainerError as exc:
        require_system(False, f"a bootable systemd container ({exc})")
    # The container's /root is its own tmpfs (0750): let the unprivileged test users (nobody,
    # a member of group htr) reach the Python installation bound under it. The service itself
    # does not need this (ProtectHome=tmpfs + BindReadOnlyPaths=, rendered by the installer).
    if any(Path(p) == Path("/root") or Path("/root") in Path(p).parents for p in binds_ro):
        box.run(["chmod", "0755", "/root"])
    try:
        yield box
    finally:
        box.stop()
        shutil.rmtree(scratch, ignore_errors=True)


TEST_CONFIG = """\
# The systemd tests' config: the demo model on CPU, small limits.
model:
  dir: {model_dir}
  verify_on_start: quick
gpu:
  select: cpu
limits:
  batch_sizes: [1]
  batch_window_ms: 1.0
  drain_timeout_s: 30.0
  request_deadline_s: 60.0
generation:
  max_new_tokens: 8
watchdog:
  generate_timeout_s: 10.0
"""

TEST_DROPIN_TEXT = f"""\
# Test-only: faults and overrides come from {TEST_ENV_FILE}, which systemd
# reads at every (re)start; a test rewrites it and the next start sees it.
[Service]
EnvironmentFile=-{TEST_ENV_FILE}
WatchdogSec=10s
RestartSec=1s
"""


@pytest.fixture(scope="session")
def installed(container, demo_model_dir):
    """``htrctl service install --start`` inside the container, with the demo model configured."""
    # A copy in the bound scratch directory, readable by the service user (as a provisioned
    # model directory must be; the cached build keeps its weights 0600).
    model_dir = container.scratch / "demo-model"
    shutil.copytree(demo_model_dir, model_dir)
    for p in [model_dir, *model_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    container.write(CONFIG, TEST_CONFIG.format(model_dir=model_dir), mode="0644")
    res = container.run([str(HTRCTL), "service", "install", "--start"], check=False, timeout=120)
    assert res.returncode == 0, f"install failed: {res.stderr}"
    container.write(TEST_DROPIN, TEST_DROPIN_TEXT)
    container.run(["systemctl", "daemon-reload"])
    container.install_output = res.stderr
    return container


@pytest.fixture
def clean_service(installed):
    """htr.service stopped and reset, no faults, before and after the test."""

    def reset() -> None:
        set_test_env(installed)
        installed.run(["systemctl", "stop", "htr.service"], check=False, timeout=90)
        installed.run(["systemctl", "reset-failed", "htr.service", "htr.socket"], check=False)
        installed.run(["systemctl", "start", "htr.socket"])

    reset()
    yield installed
    reset()
