"""`htrctl service`: rendering and installing the units into a directory (no systemd needed).

What a real systemd makes of the installed units is in test_systemd_units.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from htrctl import systemd
from htrctl.config import SYSTEM_CONFIG
from htrctl.units import control, installer, render
from htrctl.errors import ServiceError


def _ctx(**kw):
    base = dict(htrd=Path("/opt/htr/bin/htrd"), config=Path("/etc/htr/htr.yaml"), model_dir=Path("/srv/models/htr"),
                supplementary_groups=("video", "render"))
    base.update(kw)
    return render.UnitContext(**base)


def _directives(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_render_fills_every_placeholder_with_this_installation():
    units = render.render_units(_ctx())
    assert set(units) == {"htr.service", "htr.socket", "htr@.service", "htr@.socket", "htr-gpu-prepare.service"}
    for name, text in units.items():
        assert not re.search(r"@[A-Z_]+@", text), name
        assert text.startswith(render.MARKER)
    svc = units["htr.service"]
    assert "ExecStart=/opt/htr/bin/htrd --config /etc/htr/htr.yaml\n" in svc
    assert "ReadOnlyPaths=-/srv/models/htr\n" in svc
    assert "SupplementaryGroups=video render\n" in svc
    assert "ProtectHome=yes\n" in svc and "BindReadOnlyPaths" not in svc
    assert "SocketGroup=htr\n" in units["htr.socket"] and "SocketMode=0660\n" in units["htr.socket"]
    assert "ListenStream=/run/htr/htr-%i.sock\n" in units["htr@.socket"]
    assert "TimeoutStopSec=90s\n" in svc  # limits.drain_timeout_s (60) + 30
    assert "Environment=HTR_GPU__SELECT=%i HTR_SOCKET__PATH=/run/htr/htr-%i.sock\n" in units["htr@.service"]


def test_required_supervision_and_hardening_directives():
    svc = _directives(render.render_units(_ctx())["htr.service"])
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "RestartPreventExitStatus=65 69 78",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "PrivateNetwork=yes",
                 "RestrictAddressFamilies=AF_UNIX", "SystemCallFilter=@system-service", "CapabilityBoundingSet=",
                 "DevicePolicy=closed", "RuntimeDirectory=htr", "RuntimeDirectoryPreserve=yes", "StateDirectory=htr",
                 "UMask=0077", "User=htr", "Group=htr"):
        assert line in svc, line
    assert not any(ln.startswith("MemoryDenyWriteExecute") for ln in svc), "CUDA/Triton JIT need W+X memory"
    env = " ".join(ln for ln in svc if ln.startswith("Environment="))
    for kv in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "CUDA_DEVICE_ORDER=PCI_BUS_ID",
               "TORCHINDUCTOR_CACHE_DIR=%S/htr/", "TRITON_CACHE_DIR=%S/htr/"):
        assert kv in env, kv
    # The no-restart codes are the ones htrctl.errors documents.
    from htrctl.errors import NO_RESTART_EXIT_CODES

    assert "RestartPreventExitStatus=" + " ".join(str(int(c)) for c in sorted(NO_RESTART_EXIT_CODES)) in svc


def test_template_unit_keeps_in_step_with_the_single_unit():
    units = render.render_units(_ctx())
    one = _directives(units["htr.service"])
    many = _directives(units["htr@.service"])
    # Only these may differ: the description, the socket it needs, the replica's GPU/socket and [Install]'s Also=.
    differ = re.compile(r"^(Description|Requires|After|Also|Environment=HTR_)")
    assert [ln for ln in one if not differ.match(ln)] == [ln for ln in many if not differ.match(ln)]
    assert _directives(units["htr.socket"])[2:] != []
    sock_one = [ln for ln in _directives(units["htr.socket"]) if not ln.startswith(("Description", "ListenStream"))]
    sock_many = [ln for ln in _directives(units["htr@.socket"]) if not ln.startswith(("Description", "ListenStream"))]
    assert sock_one == sock_many


def test_python_under_a_home_directory_is_bound_read_only_instead_of_hidden():
    binds = render.home_binds_for([Path("/root/.pyenv/versions/3.11.7"), Path("/root/.pyenv/versions/3.11.7/lib"),
                                    Path("/opt/venv"), Path("/home/alice/models/htr")])
    assert binds == (Path("/home/alice/models/htr"), Path("/root/.pyenv/versions/3.11.7"))
    text = render.render_units(_ctx(home_binds=binds))["htr.service"]
    assert "ProtectHome=tmpfs\n" in text
    assert "BindReadOnlyPaths=/home/alice/models/htr /root/.pyenv/versions/3.11.7\n" in text
    assert "ProtectHome=yes" not in text


def test_this_environment_is_found():
    ctx = render.make_context(config=Path("/etc/htr/htr.yaml"), model_dir=Path("/var/lib/htr/model"))
    assert ctx.htrd == Path(sys.prefix) / "bin" / "htrd"
    under_home = [p for p in render.python_paths() if render._under_home(Path(p).resolve())]
    assert bool(ctx.home_binds) == bool(under_home)


@pytest.mark.parametrize("bad", ["/srv/my models", "/srv/a;b", 'relative/path'])
def test_paths_a_unit_cannot_hold_are_refused(bad):
    with pytest.raises(ServiceError, match="path|unit file"):
        render.render_units(_ctx(model_dir=Path(bad)))


def test_percent_in_a_path_is_escaped():
    assert "ReadOnlyPaths=-/srv/100%%/model\n" in render.render_units(_ctx(model_dir=Path("/srv/100%/model")))["htr.service"]


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_install_into_a_root_is_idempotent(tmp_path):
    root = tmp_path / "root"
    first = installer.install(root=root)
    assert first.changed and first.summary() == "installed"
    units = root / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == ["htr-gpu-prepare.service", "htr.service", "htr.socket",
                                                       "htr@.service", "htr@.socket"]
    script = root / "usr/local/sbin/htr-gpu-prepare"
    assert oct(script.stat().st_mode & 0o777) == "0o755"
    cfg = root / "etc/htr/htr.yaml"
    assert cfg.read_text() == (REPO / "configs/htr.yaml").read_text()
    assert oct(cfg.stat().st_mode & 0o777) == "0o640"
    before = _snapshot(root)

    again = installer.install(root=root)
    assert not again.changed
    assert again.summary() == "already installed: nothing changed"
    assert _snapshot(root) == before  # not even rewritten with the same bytes


def test_install_keeps_an_edited_config_and_follows_its_model_dir(tmp_path):
    root = tmp_path / "root"
    installer.install(root=root)
    cfg = root / "etc/htr/htr.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["model"]["dir"] = "/srv/models/glagolitic"
    data["limits"]["drain_timeout_s"] = 300.5
    cfg.write_text(yaml.safe_dump(data))
    res = installer.install(root=root)
    assert cfg.read_text() == yaml.safe_dump(data)  # never overwritten
    written = {Path(a.target).name for a in res.actions if a.what == "write"}
    assert written == {"htr.service", "htr@.service"}
    unit = (root / "etc/systemd/system/htr.service").read_text()
    assert "ReadOnlyPaths=-/srv/models/glagolitic\n" in unit
    assert "TimeoutStopSec=331s\n" in unit  # the stop timeout follows the drain timeout


def test_dry_run_writes_nothing(tmp_path):
    root = tmp_path / "root"
    res = installer.install(root=root, dry_run=True)
    assert not root.exists()
    assert res.summary() == "dry run: nothing written"
    assert all(not a.done for a in res.actions if a.what == "write")
    assert "Type=notify" in res.units["htr.service"]


def test_paths_under_tmp_are_bound_into_the_private_tmp():
    """A checkout (venv, model) under /tmp stays visible to a PrivateTmp=yes service, read-only."""
    binds = render.home_binds_for([Path("/tmp/ci/.venv/bin"), Path("/tmp/ci/.venv/bin/../lib"),
                                    Path("/var/tmp/models/htr"), Path("/opt/htr/bin")])
    assert binds == (Path("/tmp/ci/.venv/bin"), Path("/tmp/ci/.venv/lib"), Path("/var/tmp/models/htr"))
    text = render.render_units(_ctx(home_binds=binds))["htr.service"]
    assert "ProtectHome=yes\n" in text and "ProtectHome=tmpfs" not in text
    assert "BindReadOnlyPaths=/tmp/ci/.venv/bin /tmp/ci/.venv/lib /var/tmp/models/htr\n" in text
    assert "PrivateTmp=yes" in text


def test_install_refuses_a_missing_htrd(tmp_path):
    with pytest.raises(ServiceError, match="htrd not found"):
        installer.install(root=tmp_path, htrd=tmp_path / "nope" / "htrd")


def test_live_actions_are_refused_with_root(tmp_path):
    with pytest.raises(ServiceError, match="--root"):
        installer.install(root=tmp_path, start=True)


def test_uninstall_removes_only_what_htrctl_wrote(tmp_path):
    root = tmp_path / "root"
    installer.install(root=root)
    units = root / "etc/systemd/system"
    (units / "htr@.socket").write_text("[Socket]\nListenStream=/run/mine.sock\n")  # an admin's own file
    res = installer.uninstall(root=root)
    assert sorted(p.name for p in units.iterdir()) == ["htr@.socket"]
    assert any(a.what == "keep" and a.target.endswith("htr@.socket") for a in res.actions)
    assert not (root / "usr/local/sbin/htr-gpu-prepare").exists()
    assert (root / "etc/htr/htr.yaml").exists()  # data stays


def test_journalctl_argv_names_both_units():
    argv = control.journalctl_argv(instance="GPU-1", lines=20, follow=True)
    assert argv[:2] == ["journalctl", "--no-pager"]
    assert ["-u", "htr@GPU-1.service", "-u", "htr@GPU-1.socket"] == argv[2:6]
    assert argv[-1] == "-f" and "20" in argv


def test_cli_dry_run_prints_the_units_on_stdout(tmp_path, capsys):
    from htrctl.cli import main

    rc = main(["service", "install", "--root", str(tmp_path / "r"), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.count("# ==> ") == 5 and "[Service]\nType=notify" in out
    assert "dry run: nothing written" in err
    assert not (tmp_path / "r").exists()


def test_cli_without_systemd_says_so(tmp_path, capsys, monkeypatch):
    from htrctl.cli import main

    monkeypatch.setattr(systemd, "booted", lambda *a: False)
    rc = main(["service", "status"])
    assert rc == 1
    assert "systemd is not running" in capsys.readouterr().err


def test_live_install_needs_root(monkeypatch):
    from htrctl.errors import ServicePermissionError

    monkeypatch.setattr(installer.os, "geteuid", lambda: 1000)
    with pytest.raises(ServicePermissionError, match="needs root") as err:
        installer.install()
    assert err.value.exit_code == 77


def test_live_enable_without_systemd_is_refused(monkeypatch):
    monkeypatch.setattr(systemd, "booted", lambda *a: False)
    with pytest.raises(ServiceError, match="systemd is not running"):
        installer.install(enable=True)


def test_unreadable_model_files_are_reported(tmp_path):
    model = tmp_path / "model"
    (model / "final_model").mkdir(parents=True)
    ok = model / "config.json"
    ok.write_text("{}")
    ok.chmod(0o644)
    secret = model / "model-00001-of-00002.safetensors"
    secret.write_bytes(b"x")
    secret.chmod(0o600)  # root-owned 0600: what a mkstemp-based copy leaves behind
    nobody = 65534
    assert installer._unreadable([model, ok, secret, model / "final_model"], nobody, nobody) == [secret]
    acts = installer._readability_warnings(tmp_path / "absent.yaml", model, "htr", "htr")
    assert len(acts) == 1 and acts[0].what == "warn" and "chmod -R a+rX" in acts[0].detail
    missing = installer._readability_warnings(tmp_path / "absent.yaml", tmp_path / "nope", "htr", "htr")
    assert "does not exist" in missing[0].detail


# ---------------------------------------------------------------- the GPU-preparing oneshot


def test_every_htrd_unit_wants_and_follows_the_gpu_preparing_oneshot():
    units = render.render_units(_ctx())
    for name in ("htr.service", "htr@.service"):
        lines = _directives(units[name])
        assert "Wants=htr-gpu-prepare.service" in lines, name
        after = next(ln for ln in lines if ln.startswith("After="))
        assert "htr-gpu-prepare.service" in after.split("=", 1)[1].split(), name
    prep = _directives(units["htr-gpu-prepare.service"])
    assert "Type=oneshot" in prep and "RemainAfterExit=yes" in prep
    assert "ExecStart=/bin/sh /usr/local/sbin/htr-gpu-prepare" in prep
    assert not any(ln.startswith(("User=", "NoNewPrivileges", "ProtectKernelModules")) for ln in prep)  # root


def test_unit_comments_state_what_was_measured():
    """The claims issue 16 corrected: MemoryDenyWriteExecute breaks oneDNN on the CPU, not CUDA; persistenced
    does not create the uvm nodes; the compile caches must be executable."""
    svc = (REPO / "systemd" / "htr.service").read_text()
    assert "could not create a primitive" in svc and "torch fails to initialise CUDA" not in svc
    assert "--uvm-persistence-mode" in svc and "nvidia-persistenced or" not in svc
    assert "NoExecPaths=" in svc and "python3-dev" in svc


def test_install_writes_the_prepare_script_marked_and_idempotent(tmp_path):
    root = tmp_path / "root"
    installer.install(root=root)
    script = (root / "usr/local/sbin/htr-gpu-prepare").read_text()
    first, second = script.splitlines()[:2]
    assert first == "#!/bin/sh" and second.startswith(render.MARKER)
    again = installer.install(root=root)
    assert any(a.what == "keep" and a.target.endswith("htr-gpu-prepare") for a in again.actions)


def test_templates_come_from_the_package_and_are_the_source_files():
    """One source of truth: the packaged data are the top-level systemd/ and configs/htr.yaml (symlinked)."""
    from htrctl import packaged

    for name in (*render.UNITS, render.PREPARE_SCRIPT_TEMPLATE):
        assert packaged.unit_template(name) == (REPO / "systemd" / name).read_text()
    assert packaged.config_template() == (REPO / "configs" / "htr.yaml").read_text()
    assert (REPO / "htrctl/data/systemd").resolve() == (REPO / "systemd").resolve()


def test_config_template_command_prints_the_documented_config(capsys):
    from htrctl.cli import main

    assert main(["config", "template"]) == 0
    out = capsys.readouterr().out
    assert out == (REPO / "configs" / "htr.yaml").read_text()
    assert yaml.safe_load(out)["model"]["dir"] == "/var/lib/htr/model"


def _no_host_changes(monkeypatch):
    """Fail the test if install tries to run groupadd/useradd/systemctl on this host."""
    def refuse(argv, **kw):
        raise AssertionError(f"ran {argv} on the host")

    monkeypatch.setattr(systemd, "run", refuse)


def test_unit_dir_only_writes_the_unit_files(tmp_path, monkeypatch):
    _no_host_changes(monkeypatch)
    units = tmp_path / "units"
    cfg = tmp_path / "etc" / "htr.yaml"  # absent: must stay absent
    system_cfg_existed = SYSTEM_CONFIG.exists()
    res = installer.install(unit_dir=units, config=cfg)
    assert sorted(p.name for p in units.iterdir()) == sorted(render.UNITS)
    assert not cfg.exists() and not cfg.parent.exists()
    assert SYSTEM_CONFIG.exists() == system_cfg_existed
    assert not any(a.what in ("create-user", "create-group", "daemon-reload") for a in res.actions)
    assert [a.target for a in res.actions if a.what == "write"] == [str(units / n) for n in render.UNITS]
    assert any(a.what == "note" and a.target == str(render.PREPARE_SCRIPT) for a in res.actions)  # not on the host
    # without -c either: /etc/htr/htr.yaml is never written
    res = installer.install(unit_dir=tmp_path / "u2")
    assert SYSTEM_CONFIG.exists() == system_cfg_existed
    assert not any(a.what == "write" and "htr.yaml" in a.target for a in res.actions)


def test_unit_dir_follows_an_existing_config(tmp_path, monkeypatch):
    _no_host_changes(monkeypatch)
    cfg = tmp_path / "htr.yaml"
    cfg.write_text("model:\n  dir: /srv/models/from-c\n")
    installer.install(unit_dir=tmp_path / "units", config=cfg)
    unit = (tmp_path / "units" / "htr.service").read_text()
    assert "ReadOnlyPaths=-/srv/models/from-c\n" in unit
    assert f"--config {cfg}\n" in unit
    assert cfg.read_text() == "model:\n  dir: /srv/models/from-c\n"


def test_root_takes_the_config_named_with_c(tmp_path, monkeypatch):
    """`htrctl -c FILE service install --root DIR`: FILE's settings (model.dir) reach the units and the root."""
    from htrctl.cli import main

    _no_host_changes(monkeypatch)
    cfg = tmp_path / "site" / "htr.yaml"
    cfg.parent.mkdir()
    cfg.write_text("model:\n  dir: /srv/models/glagolitic\nlimits:\n  drain_timeout_s: 10\n")
    root = tmp_path / "root"
    assert main(["-c", str(cfg), "service", "install", "--root", str(root)]) == 0
    unit = (root / "etc/systemd/system/htr.service").read_text()
    assert "ReadOnlyPaths=-/srv/models/glagolitic\n" in unit
    assert "TimeoutStopSec=40s\n" in unit
    assert f"--config {cfg}\n" in unit
    assert (root / cfg.relative_to("/")).read_text() == cfg.read_text()


def test_root_refuses_an_invalid_c_config_before_writing(tmp_path):
    from htrctl.errors import ConfigError

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  colour: blue\n")
    with pytest.raises(ConfigError, match="colour"):
        installer.install(root=tmp_path / "root", config=cfg)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(("service", "socket", "code"), [
    ("active", "active", 0),  # running
    ("inactive", "active", 0),  # socket-activated, waiting for its first request
    ("failed", "active", 3),
    ("inactive", "inactive", 3),  # stopped, or not installed (LoadState=not-found)
])
def test_service_status_exit_code_is_lsb_not_running(service, socket, code):
    st = control.UnitStatus(service={"ActiveState": service}, socket={"ActiveState": socket}, units_current=None)
    assert st.exit_code() == code
