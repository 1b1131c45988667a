"""The CLI's contract: fast start without torch, errors as one line + exit code."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "torchvision", "accelerate")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_no_torch():
    mods = _modules_after(
        "import sys\nfrom htrctl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "htrctl.cli" in mods
    assert not [m for m in HEAVY if m in mods], [m for m in HEAVY if m in mods]


def test_client_path_imports_no_torch():
    mods = _modules_after("import htrctl.protocol, htrctl.config, htrctl.errors, htrctl.client, htrctl.transcribe")
    assert "htrctl.protocol" in mods and "htrctl.client" in mods and "htrctl.transcribe" in mods
    assert not [m for m in HEAVY if m in mods]


def test_transcribe_command_imports_no_torch(tmp_path):
    """The whole `htrctl transcribe` path (CLI, client, library) up to the connection: no torch."""
    (tmp_path / "a.png").write_bytes(b"not really")
    mods = _modules_after(
        "from htrctl.cli import main\n"
        f"main(['transcribe', '--socket', {str(tmp_path / 'none.sock')!r}, {str(tmp_path)!r}])"
    )
    assert "htrctl.transcribe" in mods and "httpx" in mods
    assert not [m for m in HEAVY if m in mods], [m for m in HEAVY if m in mods]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "htrctl", *args], capture_output=True, text=True, env=env)


def test_help_exits_0_and_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "config" in r.stdout


def test_config_error_is_one_line_and_exit_78(tmp_path):
    bad = tmp_path / "htr.yaml"
    bad.write_text("gpu: {select: '0,1'}\n")
    r = run_cli("--config", str(bad), "config", "check")
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("htrctl: error: invalid configuration: ")
    assert "gpu.select" in lines[0] and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "htr.yaml"
    bad.write_text("gpu: {select: '0,1'}\n")
    r = run_cli("--debug", "--config", str(bad), "config", "check")
    assert r.returncode == 78
    assert "Traceback" in r.stderr


def test_config_show_json_goes_to_stdout(tmp_path):
    good = tmp_path / "htr.yaml"
    good.write_text("gpu: {select: cpu}\n")
    r = run_cli("--config", str(good), "config", "show", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["settings"]["gpu"]["select"] == "cpu"
    assert data["source"] == str(good)


def test_usage_error_exit_2():
    r = run_cli("config", "show", "--no-such-flag")
    assert r.returncode == 2


def test_every_exit_code_is_documented_once_in_the_readme():
    import re

    from helpers import REPO

    from htrctl.errors import ExitCode

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    documented = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    assert sorted(documented) == sorted(int(c) for c in ExitCode), documented
    assert len(set(documented)) == len(documented)
    # `service status`'s "not running" (LSB, systemctl) is not also the missing-extra code
    assert ExitCode.NOT_RUNNING == 3 and ExitCode.MISSING_EXTRA != ExitCode.NOT_RUNNING
