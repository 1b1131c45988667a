"""Fixtures of the reliability suite, and the recorder that writes its results.

``record(section, name, **fields)`` adds one observation (a fault and its
recovery, a hostile input and its answer, a load figure...). Each record is
tied to the test that made it; after the test runs it gets that test's
outcome (``passed`` / ``failed``), so a failing check shows up in the report as
failed, never as a silent gap. At the end of the session the records are
merged into ``$HTR_RELIABILITY_RESULTS`` (default
``.cache/reliability/results.json``): records of the tests that ran this
session replace their older ones, the others are kept, so running one file
updates its part. ``bench/reliability_report.py`` renders the file into
``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO

RESULTS = Path(os.environ.get("HTR_RELIABILITY_RESULTS", REPO / ".cache" / "reliability" / "results.json"))

_records: list[dict] = []
_ran: set[str] = set()
_outcomes: dict[str, str] = {}
_durations: dict[str, float] = {}
_session_started = time.time()


@pytest.fixture
def record(request):
    """``record(section, name, **fields)``: one observation for docs/RELIABILITY.md."""
    nodeid = request.node.nodeid

    def add(section: str, name: str, **fields) -> dict:
        entry = {"section": section, "name": name, "test": nodeid, **fields}
        _records.append(entry)
        return entry

    return add


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if "reliability" not in item.nodeid:
        return
    _ran.add(item.nodeid)
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        _outcomes[item.nodeid] = rep.outcome
        _durations[item.nodeid] = round(getattr(rep, "duration", 0.0), 2)
    elif rep.when == "teardown" and rep.outcome == "failed":
        _outcomes[item.nodeid] = "failed"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_sessionfinish(session, exitstatus):
    if not _ran:
        return
    try:
        old = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        old = {}
    kept = [r for r in old.get("records", []) if r.get("test") not in _ran]
    new = []
    for r in _records:
        r = dict(r)
        r["outcome"] = _outcomes.get(r["test"], "not run")
        new.append(r)
    tests = {k: v for k, v in old.get("tests", {}).items() if k not in _ran}
    for nodeid in _ran:
        tests[nodeid] = {"outcome": _outcomes.get(nodeid, "not run"), "seconds": _durations.get(nodeid),
                         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ci": os.environ.get("HTR_CI", "") not in ("", "0")},
        "session_seconds": round(time.time() - _session_started, 1),
        "tests": dict(sorted(tests.items())),
        "records": kept + new,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, RESULTS)


# ------------------------------------------------------------------------------------------------ fixtures
class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


@pytest.fixture(scope="session")
def trapped_marker(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "PICKLE-WAS-LOADED"


@pytest.fixture(scope="session")
def trapped_model(tmp_path_factory, demo_model_dir, trapped_marker) -> Path:
    """A copy of the demo model (no manifest: verify only warns) with booby-trapped pickle weights planted
    next to the safetensors. The shared daemon serves from it; nothing may ever unpickle them."""
    import pickle

    dest = tmp_path_factory.mktemp("rel-trapped") / "model"
    shutil.copytree(demo_model_dir, dest)
    payload = pickle.dumps({"state_dict": _Trap(trapped_marker)})
    for rel in ("pytorch_model.bin", "training_args.pt", "final_model/adapter_model.bin"):
        (dest / rel).write_bytes(payload)
    return dest


def _group_or_none(name: str) -> str | None:
    import grp

    try:
        grp.getgrnam(name)
        return name
    except KeyError:
        return None


# The shared socket's group: one that uid 65534 is not in (test_security); Debian and Ubuntu have 'daemon'.
SOCKET_GROUP = _group_or_none("daemon")

# One daemon for the hostile-input, fuzzing and security tests (starting one costs 15-40 s here).
SHARED_CONFIG = {
    "limits": {"max_body_bytes": 2 * 1024 * 1024, "max_image_pixels": 4_000_000, "read_timeout_s": 3.0,
               "max_request_pixels": 16_000_000, "max_pixels_in_flight": 64_000_000,
               "batch_sizes": [1, 2, 4], "queue_length": 64, "request_deadline_s": 60.0},
    "socket": {"group": SOCKET_GROUP},
    "generation": {"max_new_tokens": 8},
    "log": {"level": "DEBUG"},
}


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory, trapped_model, trapped_marker, open_dir):
    from daemon_harness import start_daemon

    tmp = tmp_path_factory.mktemp("rel-shared")
    d = start_daemon(tmp, trapped_model, config=SHARED_CONFIG, socket_path=open_dir / "htr.sock")
    assert not trapped_marker.exists(), "loading the model unpickled a planted pickle"
    yield d
    code = d.stop()
    assert code == 0, d.stderr()[-3000:]


def outputs_exactly_once(out: Path, rels: list[str], fmt: str = "txt") -> dict:
    """Assert every input has exactly one complete output (no temp files, nothing extra); a summary."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(f"{rel}.{fmt}" for rel in rels)
    assert files == expected, f"outputs differ: missing {sorted(set(expected) - set(files))[:5]}, " \
                              f"extra {sorted(set(files) - set(expected))[:5]}"
    empty = [f for f in files if not (out / f).read_text().strip()]
    assert not empty, f"empty outputs: {empty[:5]}"
    return {"inputs": len(rels), "outputs": len(files), "exactly_once": True}
