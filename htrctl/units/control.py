"""The installed units at work: their state (``htrctl service status``), their journal, a restart."""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import packaged, systemd
from ..config import SYSTEM_CONFIG, load_settings
from ..errors import ConfigError, ExitCode, HtrError, ServiceError
from .render import make_context, render_unit, unit_names

logger = logging.getLogger(__name__)

# What `status` reads from `systemctl show`.
SHOW_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "UnitFileState", "MainPID", "ExecMainStatus",
    "ExecMainCode", "NRestarts", "StatusText", "ActiveEnterTimestamp", "FragmentPath", "DropInPaths",
)


@dataclass
class UnitStatus:
    service: dict[str, str]
    socket: dict[str, str]
    units_current: bool | None  # installed files equal a fresh rendering (None: not checked)
    config_error: str | None = None  # the config file does not load

    @property
    def running(self) -> bool:
        return self.service.get("ActiveState") == "active"

    def exit_code(self) -> ExitCode:
        """OK when running or waiting for its first request (the socket listens); NOT_RUNNING (3, like
        ``systemctl status`` and LSB's "program is not running") otherwise."""
        if self.running:
            return ExitCode.OK
        if self.socket.get("ActiveState") == "active" and self.service.get("ActiveState") == "inactive":
            return ExitCode.OK
        return ExitCode.NOT_RUNNING

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "socket": self.socket, "units_current": self.units_current,
                "config_error": self.config_error}


def status(*, instance: str | None = None, config: Path | None = None) -> UnitStatus:
    """The units' state from systemd, and whether the installed files are current."""
    svc, sock = unit_names(instance)
    current: bool | None = None
    config_error: str | None = None
    svc_props = systemd.show(svc, SHOW_PROPERTIES)
    frag = svc_props.get("FragmentPath") or ""
    try:
        cfg = Path(config) if config else SYSTEM_CONFIG
        settings = load_settings(cfg, env={}) if cfg.exists() else None
        if settings is not None and frag:
            ctx = make_context(config=cfg, model_dir=settings.model.dir,
                               drain_timeout_s=settings.limits.drain_timeout_s)
            tmpl = "htr@.service" if instance else "htr.service"
            current = Path(frag).read_text(encoding="utf-8") == render_unit(packaged.unit_template(tmpl), ctx)
    except ConfigError as exc:  # a broken config is what status must still report on
        config_error = exc.one_line()
    except (OSError, HtrError) as exc:
        logger.debug("cannot compare the installed units: %s", exc)
    return UnitStatus(service=svc_props, socket=systemd.show(sock, SHOW_PROPERTIES), units_current=current, config_error=config_error)


def journalctl_argv(*, instance: str | None = None, lines: int | None = 100, follow: bool = False,
                    since: str | None = None) -> list[str]:
    svc, sock = unit_names(instance)
    argv = ["journalctl", "--no-pager", "-u", svc, "-u", sock, "-o", "short-iso"]
    if lines is not None:
        argv += ["-n", str(lines)]
    if since:
        argv += ["--since", since]
    if follow:
        argv.append("-f")
    return argv


def logs(*, instance: str | None = None, lines: int | None = 100, follow: bool = False, since: str | None = None) -> int:
    """Show the units' journal on this process's stdout; returns journalctl's exit status."""
    if shutil.which("journalctl") is None:
        raise ServiceError("journalctl not found", remedy="this needs systemd's journal")
    argv = journalctl_argv(instance=instance, lines=lines, follow=follow, since=since)
    try:
        return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL).returncode
    except KeyboardInterrupt:  # -f ends with Ctrl-C
        return 0


def restart(*, instance: str | None = None, no_block: bool = False) -> UnitStatus:
    """Restart the daemon: it drains in-flight requests first (SIGTERM), the socket keeps clients waiting."""
    svc, sock = unit_names(instance)
    # A unit that hit its start limit refuses to start until reset (e.g. after a config fix).
    systemd.systemctl("reset-failed", svc, sock, check=False)
    argv = ["restart", svc]
    if no_block:
        argv.insert(0, "--no-block")
    systemd.systemctl(*argv, timeout=600)
    return status(instance=instance)
