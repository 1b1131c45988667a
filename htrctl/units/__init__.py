"""htrd's systemd units: rendered for this installation, installed, queried.

- :mod:`.render` -- the templates (``systemd/``, shipped as ``htrctl/data/systemd``)
  filled with this installation's paths, user, groups and bind mounts;
- :mod:`.installer` -- ``htrctl service install|uninstall``: the account, the config,
  the unit files and the GPU-preparing script, idempotently;
- :mod:`.control` -- ``htrctl service status|logs|restart``.

Every question to systemd goes through :mod:`htrctl.systemd`. (Doctor's checks of
the running daemon are :mod:`htrctl.doctor.daemon`; the daemon's own state holder
is in ``htrd``.)
"""

from __future__ import annotations

from .control import SHOW_PROPERTIES, UnitStatus, journalctl_argv, logs, restart, status, unit_names
from .installer import Action, InstallResult, UninstallResult, install, uninstall
from .render import (
    DEFAULT_GROUP,
    DEFAULT_USER,
    MARKER,
    PREPARE_SCRIPT,
    PREPARE_SCRIPT_TEMPLATE,
    PREPARE_UNIT,
    SERVICE,
    SOCKET,
    STATE_DIR,
    UNIT_DIR,
    UNITS,
    UnitContext,
    default_htrd,
    gpu_groups,
    home_binds_for,
    make_context,
    python_paths,
    render_prepare_script,
    render_unit,
    render_units,
)

__all__ = [
    "DEFAULT_GROUP", "DEFAULT_USER", "MARKER", "PREPARE_SCRIPT", "PREPARE_SCRIPT_TEMPLATE", "PREPARE_UNIT", "SERVICE",
    "SHOW_PROPERTIES", "SOCKET", "STATE_DIR", "UNITS", "UNIT_DIR", "Action", "InstallResult", "UninstallResult",
    "UnitContext", "UnitStatus", "default_htrd", "gpu_groups", "home_binds_for", "install", "journalctl_argv", "logs",
    "make_context", "python_paths", "render_prepare_script", "render_unit", "render_units", "restart", "status",
    "uninstall", "unit_names",
]
