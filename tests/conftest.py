"""Shared fixtures: environment isolation and the cached demo model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import CACHE, REPO, require_system  # noqa: F401 -- tests import these from helpers.py; kept here too



@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test sees the developer's HTR_*/HF_* settings or the system config."""
    for key in list(os.environ):
        if key.startswith("HTR_") and key not in ("HTR_CI", "HTR_TEST_CACHE"):
            monkeypatch.delenv(key, raising=False)
        if key in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE",
                   "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NOTIFY_SOCKET", "LISTEN_FDS",
                   "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(key, raising=False)
    hf_home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # A path that never exists, so /etc/htr/htr.yaml on a dev box is not read.
    monkeypatch.setattr("htrctl.config.SYSTEM_CONFIG", tmp_path_factory.getbasetemp() / "no-system-config.yaml")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model, built once and cached on disk. Read-only: copy before changing it."""
    from htrctl.demo_model import build_demo_model

    return build_demo_model(CACHE / "demo-model")


@pytest.fixture(scope="session")
def provisioned_model(tmp_path_factory, demo_model_dir) -> Path:
    """The demo model as a server has it: provisioned (with htr-manifest.json). Read-only, shared."""
    from htrctl.provision import provision

    dest = tmp_path_factory.mktemp("provisioned") / "model"
    provision(str(demo_model_dir), str(dest), progress=False)
    return dest


@pytest.fixture(scope="session")
def open_dir():
    """A private directory other uids may enter (tmp_path's parents are 0700 for root): for sockets
    and files that a client running as `nobody` must reach."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="htr-open-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def demo_model_copy(demo_model_dir, tmp_path) -> Path:
    """A private, writable copy of the demo model."""
    dest = tmp_path / "model"
    shutil.copytree(demo_model_dir, dest)
    return dest


def pytest_collection_modifyitems(config, items):
    """GPU tests run only when asked for (`pytest -m gpu` on a GPU host); CI has no GPU."""
    if "gpu" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: run `pytest -m gpu` on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
