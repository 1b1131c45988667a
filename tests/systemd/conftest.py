"""Fixtures for the systemd tests: ONE container booted per session, htrctl installed in it.

Tests that need it use the ``container`` fixture (booted systemd) or
``installed`` (``htrctl service install`` done, the demo model configured on
CPU). Under CI (HTR_CI=1) a container that cannot boot fails the tests
instead of skipping them (``require_system``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from nspawn_harness import Container, ContainerError, can_boot


def _root_conftest():
    """tests/conftest.py as a module (`import conftest` here would find this file itself)."""
    name = "htr_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


_root = _root_conftest()
REPO, CACHE, require_system = _root.REPO, _root.CACHE, _root.require_system

VENV = Path(sys.prefix)
HTRCTL = VENV / "bin" / "htrctl"
CONFIG = "/etc/htr/htr.yaml"
# Faults and test-only settings for the daemon, read by systemd at every (re)start.
TEST_ENV_FILE = "/run/htr-test.env"
TEST_DROPIN = "/etc/systemd/system/htr.service.d/50-test.conf"


def _under(p: Path, parent: Path) -> bool:
    p, parent = p.resolve(), parent.resolve()
    return p == parent or parent in p.parents


@pytest.fixture(scope="session")
def container(tmp_path_factory):
    ok, what = can_boot()
    require_system(ok, what)
    scratch = tmp_path_factory.mktemp("nspawn")
    binds = [REPO, scratch]
    binds_ro = [Path(sys.base_prefix)]
    for extra in (VENV, CACHE):
        if not _under(extra, REPO):
            binds_ro.append(extra.resolve())
    box = Container(f"htr-test-{os.getpid()}", binds=binds, binds_ro=binds_ro, log=scratch / "nspawn.log")
    box.scratch = scratch
    try:
        box.boot(timeout=90)
    except ContainerError as exc:
        require_system(False, f"a bootable systemd container ({exc})")
    try:
        yield box
    finally:
        box.stop()


TEST_CONFIG = """\
# The systemd tests' config: the demo model on CPU, small limits.
model:
  dir: {model_dir}
  verify_on_start: quick
gpu:
  select: cpu
limits:
  batch_sizes: [1, 2]
  batch_window_ms: 1.0
  drain_timeout_s: 30.0
  request_deadline_s: 60.0
generation:
  max_new_tokens: 8
watchdog:
  generate_timeout_s: 3.0
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
    container.write(CONFIG, TEST_CONFIG.format(model_dir=demo_model_dir), mode="0644")
    res = container.run([str(HTRCTL), "service", "install", "--start"], check=False, timeout=120)
    assert res.returncode == 0, f"install failed: {res.stderr}"
    container.write(TEST_DROPIN, TEST_DROPIN_TEXT)
    container.run(["systemctl", "daemon-reload"])
    container.install_output = res.stderr
    return container


def set_test_env(box: Container, **env: str) -> None:
    """Rewrite the env file the next start of htr.service reads (empty: no faults)."""
    box.write(TEST_ENV_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))


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
