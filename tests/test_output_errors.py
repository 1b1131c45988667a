"""Every OS error a first user meets is one line, a documented exit code and the fix (issue 15, row 3).

Real failures, no mocks: stdout is /dev/full or a pipe whose reader has gone (`| head -1`), the
output or provision directory is one the user may not write (uid 65534 through setpriv), and the
transcriptions come from a real htrd on the demo model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from daemon_harness import module_daemon
from helpers import REPO, SAMPLES, line_copies, require_system, run_htrctl

from htrctl.errors import ExitCode

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


htrctl = run_htrctl


def _one_clean_line(err: str) -> str:
    """The error line; besides it at most transcribe's summary of what was done."""
    assert "Traceback" not in err and "Exception" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("htrctl: transcribed ")]
    assert len(lines) == 1, err
    return lines[0]


def _as_nobody() -> None:
    require_system(os.geteuid() == 0 and shutil.which("setpriv") is not None, "root and setpriv")


@pytest.fixture
def root_owned_dir(open_dir, tmp_path):
    """A directory other users may enter but not write (root's, 0755)."""
    d = open_dir / f"ro-{tmp_path.name}"
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- without a daemon
@pytest.mark.parametrize("argv", [["config", "template"], ["config", "show", "--json"], ["--help"]])
def test_full_stdout_is_one_line_and_exit_74(argv):
    with open("/dev/full", "w") as full:
        r = htrctl(*argv, stdout=full)
    assert r.returncode == ExitCode.IO, r.stderr
    line = _one_clean_line(r.stderr)
    assert line == "htrctl: error: stdout: No space left on device -- free space on that filesystem, or write " \
                   "somewhere else"


def test_unwritable_provision_dest_is_one_line_and_exit_77(demo_model_dir, root_owned_dir):
    _as_nobody()
    r = htrctl("provision", str(demo_model_dir), str(root_owned_dir / "model"), prefix=tuple(NOBODY))
    assert r.returncode == ExitCode.PERMISSION, r.stderr
    line = _one_clean_line(r.stderr)
    assert line.startswith(f"htrctl: error: {root_owned_dir}/") and "Permission denied" in line, line
    assert "sudo" in line
    assert list(root_owned_dir.iterdir()) == []


# ---------------------------------------------------------------- with a daemon
daemon = module_daemon("output-errors")


@pytest.mark.slow
def test_transcribe_to_full_stdout_fails_with_one_line(daemon):
    """Was: a thread traceback and exit 0."""
    with open("/dev/full", "w") as full:
        r = htrctl("transcribe", "-s", str(daemon.socket_path), "-f", "txt", str(SAMPLES / "line-01.png"), stdout=full)
    assert r.returncode == ExitCode.IO, r.stderr
    assert _one_clean_line(r.stderr).startswith("htrctl: error: stdout: No space left on device")


@pytest.mark.slow
def test_transcribe_into_head_ends_quietly(daemon, tmp_path):
    """`htrctl transcribe many | head -1`: no BrokenPipeError tracebacks, nothing on stderr, exit 141 (SIGPIPE)."""
    src = line_copies(tmp_path / "in", 40)
    r = subprocess.run(f"{sys.executable} -m htrctl transcribe -q -s {daemon.socket_path} -j 4 {src} | head -1; "
                       "echo \"rc=${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash", capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    assert len(r.stdout.splitlines()) == 1 and '"text"' in r.stdout
    assert r.stderr.strip() == f"rc={int(ExitCode.PIPE)}", r.stderr


@pytest.mark.slow
def test_transcribe_into_an_unwritable_out_is_one_line_and_exit_77(daemon, root_owned_dir):
    _as_nobody()
    out = root_owned_dir / "texts"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), str(SAMPLES / "line-01.png"),
               prefix=tuple(NOBODY))
    assert r.returncode == ExitCode.PERMISSION, r.stderr
    line = _one_clean_line(r.stderr)
    assert line.startswith(f"htrctl: error: {out}: Permission denied"), line
    assert not out.exists()
