"""Installing and uninstalling the units (and the account, the config, the GPU-preparing script).

:func:`install` is idempotent: a file is written only when its content
changes, and a re-install that changes nothing says so and does not even
reload systemd. ``root`` (like ``systemctl --root``) writes everything under
another directory and touches neither users nor the running systemd: that is
how the unit tests exercise it without a systemd. ``unit_dir`` alone writes
only the unit files there: no account, no config file, no ``systemctl``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import packaged, systemd
from ..atomicfile import write_atomic
from ..config import SYSTEM_CONFIG, Settings, load_settings
from ..errors import ServiceError, ServicePermissionError
from .render import (
    DEFAULT_GROUP,
    DEFAULT_USER,
    MARKER,
    PREPARE_SCRIPT,
    PREPARE_UNIT,
    SERVICE,
    SOCKET,
    STATE_DIR,
    UNIT_DIR,
    UNITS,
    UnitContext,
    default_htrd,
    gpu_groups,
    make_context,
    render_prepare_script,
    render_units,
    unit_names,
)


@dataclass
class Action:
    what: str  # "write", "keep", "create-user", "daemon-reload", ...
    target: str
    detail: str = ""
    done: bool = True  # False in dry-run / skipped

    def line(self) -> str:
        mark = "" if self.done or self.what in ("keep", "note", "warn") else " (dry run: not done)"
        return f"{self.what:<14} {self.target}" + (f"  ({self.detail})" if self.detail else "") + mark


@dataclass
class InstallResult:
    context: UnitContext
    unit_dir: Path
    units: dict[str, str]
    actions: list[Action] = field(default_factory=list)
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return any(a.what not in ("keep", "note", "warn") and a.done for a in self.actions)

    def summary(self) -> str:
        if self.dry_run:
            return "dry run: nothing written"
        if not self.changed:
            return "already installed: nothing changed"
        return "installed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "dry_run": self.dry_run,
            "summary": self.summary(),
            "unit_dir": str(self.unit_dir),
            "context": self.context.to_dict(),
            "actions": [asdict(a) for a in self.actions],
        }


def _under(root: Path, p: Path) -> Path:
    return root / p.relative_to("/") if p.is_absolute() else root / p


def _permission(exc: OSError, path: Path) -> ServicePermissionError:
    return ServicePermissionError(
        f"cannot write {path}: {exc.strerror}", remedy="run it as root: sudo htrctl service install"
    )


def _uid(user: str) -> int | None:
    """The user's id on this host; None when there is no such user."""
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _gid(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _ensure_account(user: str, group: str, extra_groups: Sequence[str], *, live: bool, dry_run: bool) -> list[Action]:
    actions: list[Action] = []
    if not live:
        actions.append(Action("note", f"user {user}, group {group}", "not created with --root/--unit-dir"))
        return actions
    if _gid(group) is not None:
        actions.append(Action("keep", f"group {group}", "exists"))
    else:
        if not dry_run:
            systemd.run(["groupadd", "--system", group])
        actions.append(Action("create-group", group, done=not dry_run))
    if _uid(user) is not None:
        actions.append(Action("keep", f"user {user}", "exists"))
    else:
        argv = [
            "useradd", "--system", "--gid", group, "--home-dir", str(STATE_DIR), "--no-create-home",
            "--shell", "/usr/sbin/nologin", "--comment", "HTR inference daemon",
        ]
        if extra_groups:
            argv += ["--groups", ",".join(extra_groups)]
        if not dry_run:
            systemd.run([*argv, user])
        actions.append(
            Action("create-user", user, f"system user, groups {', '.join([group, *extra_groups])}", done=not dry_run)
        )
    return actions


def _unreadable(paths: Iterable[Path], uid: int | None, gid: int | None, limit: int = 10_000) -> list[Path]:
    """Files/directories among *paths* that the service (uid, gid) could not read (or enter)."""
    bad: list[Path] = []
    for i, p in enumerate(paths):
        if i >= limit:
            break
        try:
            st = p.lstat()
        except OSError:
            continue
        need = 0o5 if p.is_dir() else 0o4
        if st.st_uid == uid:
            ok = (st.st_mode >> 6) & need == need
        elif st.st_gid == gid:
            ok = (st.st_mode >> 3) & need == need
        else:
            ok = st.st_mode & need == need
        if not ok:
            bad.append(p)
    return bad


def _readability_warnings(cfg_file: Path, model_dir: Path, user: str, group: str) -> list[Action]:
    """Warn (do not change) when the service user could not read the config or the model."""
    uid, gid = _uid(user), _gid(group)
    out: list[Action] = []
    if cfg_file.exists() and _unreadable([cfg_file], uid, gid):
        out.append(Action("warn", str(cfg_file), f"user {user} cannot read it: chgrp {group} {cfg_file} && "
                          f"chmod 640 {cfg_file}", done=False))
    if model_dir.is_dir():
        bad = _unreadable([model_dir, *sorted(model_dir.rglob("*"))], uid, gid)
        if bad:
            out.append(Action("warn", str(model_dir), f"user {user} cannot read {len(bad)} entries (e.g. {bad[0]}): "
                              f"chmod -R a+rX {model_dir} (or chgrp -R {group} + chmod -R g+rX)", done=False))
    else:
        out.append(Action("warn", str(model_dir), "model.dir does not exist yet: htrd exits 65 until it is "
                          "provisioned (htrctl provision SOURCE DIR)", done=False))
    return out


def install(
    *,
    config: Path | None = None,
    htrd: Path | None = None,
    user: str = DEFAULT_USER,
    group: str = DEFAULT_GROUP,
    root: Path | None = None,
    unit_dir: Path | None = None,
    enable: bool = False,
    start: bool = False,
    replicas: Sequence[str] = (),
    dry_run: bool = False,
) -> InstallResult:
    """Render the units with this installation's paths and install them (see the module docstring).

    ``enable`` enables the socket(s) and the service(s) (the model loads at
    boot); ``start`` starts the socket(s) now, the first request then starts
    the daemon. ``replicas`` (GPU UUIDs or indices) use ``htr@.service``
    instead of ``htr.service``.
    """
    # --root or --unit-dir: only write files (no account, no systemctl); --unit-dir alone not even the config.
    live = root is None and unit_dir is None
    units_only = root is None and unit_dir is not None
    root = Path(root) if root else Path("/")
    if not live and (enable or start):
        raise ServiceError("--enable/--start act on the running systemd and cannot be combined with --root/--unit-dir")
    booted = live and systemd.booted()
    if live and not booted and (enable or start):
        raise ServiceError("systemd is not running on this machine: cannot --enable/--start",
                           remedy="install without them (the units take effect when systemd runs), or run htrd directly")
    if live and not dry_run and os.geteuid() != 0:
        raise ServicePermissionError(
            "installing the service needs root (it writes /etc/systemd/system, creates the htr user, runs systemctl)",
            remedy="sudo htrctl service install (or --dry-run to see what it would do)",
        )
    given_config = Path(config) if config else None
    config = Path(config) if config else SYSTEM_CONFIG
    if not config.is_absolute():
        config = Path(os.path.abspath(config))
    htrd_path = Path(htrd) if htrd else default_htrd()
    if not htrd_path.exists():
        raise ServiceError(
            f"htrd not found at {htrd_path}", remedy="install the daemon into this environment: pip install 'htrctl[daemon]'"
        )
    for r in replicas:
        if not re.fullmatch(r"[0-9]+|(GPU|MIG)-[0-9A-Za-z-]+", r):
            raise ServiceError(f"replica {r!r} is neither a GPU index nor a GPU UUID", remedy="see `nvidia-smi -L`")

    # The account first: the config file and the units name its group.
    extra_groups = gpu_groups(root)
    actions: list[Action] = _ensure_account(user, group, extra_groups, live=live, dry_run=dry_run)
    # The config: written from the documented defaults when absent, never overwritten.
    # Under --root, a -c FILE of this host that the root lacks is its content (model.dir included).
    cfg_file = _under(root, config)
    seed = given_config if (given_config is not None and not live and given_config.is_file()) else None
    seed_settings = load_settings(seed, env={}) if seed is not None else None  # invalid: refused before writing
    if cfg_file.exists():
        actions.append(Action("keep", str(cfg_file), "config exists"))
    elif units_only:
        actions.append(Action("note", str(cfg_file), "absent: the units use the defaults' model.dir; "
                              "not written with --unit-dir", done=False))
    else:
        text = seed.read_text(encoding="utf-8") if seed is not None else packaged.config_template()
        if not dry_run:
            try:
                write_atomic(cfg_file, text, mode=0o640, group=group if live else None)
            except PermissionError as exc:
                raise _permission(exc, cfg_file) from exc
        what = f"config from {seed}" if seed is not None else "config from the documented defaults; set model.dir"
        actions.append(Action("write", str(cfg_file), what, done=not dry_run))
    if seed_settings is not None and not cfg_file.exists():  # dry run
        settings = seed_settings
    elif cfg_file.exists():
        settings = load_settings(cfg_file, env={})
    else:  # dry run on a fresh machine: the defaults it would write
        settings = Settings()
    model_dir = settings.model.dir

    if live:
        actions += _readability_warnings(cfg_file, Path(model_dir), user, group)
    ctx = make_context(
        config=config, model_dir=model_dir, htrd=htrd_path, user=user, group=group, supplementary_groups=extra_groups,
        drain_timeout_s=settings.limits.drain_timeout_s,
    )
    units = render_units(ctx)
    target_dir = Path(unit_dir) if unit_dir else _under(root, UNIT_DIR)
    result = InstallResult(context=ctx, unit_dir=target_dir, units=units, dry_run=dry_run)

    units_changed = False
    files = [(target_dir / name, text, 0o644) for name, text in units.items()]
    if units_only:  # --unit-dir: nothing outside that directory, the host's /usr/local/sbin included
        actions.append(Action("note", str(ctx.gpu_prepare), "not written with --unit-dir", done=False))
    else:
        files.append((_under(root, ctx.gpu_prepare), render_prepare_script(), 0o755))  # root-owned: a root unit runs it
    for path, text, mode in files:
        try:
            current = path.read_text(encoding="utf-8") if path.exists() else None
        except OSError:
            current = None
        if current == text:
            actions.append(Action("keep", str(path), "unchanged"))
            continue
        if not dry_run:
            try:
                write_atomic(path, text, mode=mode)
            except PermissionError as exc:
                raise _permission(exc, path) from exc
            except OSError as exc:  # e.g. a read-only /usr for the script
                raise ServiceError(f"cannot write {path}: {exc.strerror}",
                                   remedy="make that directory writable for the install") from exc
        units_changed = True
        actions.append(Action("write", str(path), "new" if current is None else "updated", done=not dry_run))

    if live and not booted:
        actions.append(Action("note", "systemd", "not running here: no daemon-reload; the units apply at its next start",
                              done=False))
    if booted:
        if units_changed:
            if not dry_run:
                systemd.systemctl("daemon-reload")
            actions.append(Action("daemon-reload", "systemd", done=not dry_run))
            if not dry_run and systemd.is_active(SERVICE):
                actions.append(Action("note", SERVICE, "running the old units: `htrctl service restart` applies them"))
        sockets = [unit_names(r)[1] for r in replicas] or [SOCKET]
        services = [unit_names(r)[0] for r in replicas] or [SERVICE]
        if enable:
            todo = [u for u in [*sockets, *services] if dry_run or not systemd.is_enabled(u)]
            if todo:
                if not dry_run:
                    systemd.systemctl("enable", *todo)
                actions.append(Action("enable", " ".join(todo), done=not dry_run))
            else:
                actions.append(Action("keep", " ".join([*sockets, *services]), "enabled"))
        if start:
            todo = [u for u in sockets if dry_run or not systemd.is_active(u)]
            if todo:
                if not dry_run:
                    systemd.systemctl("start", *todo)
                actions.append(Action("start", " ".join(todo), "the first request starts the daemon", done=not dry_run))
            else:
                actions.append(Action("keep", " ".join(sockets), "listening"))
    result.actions = actions
    return result


# ---------------------------------------------------------------- uninstall


@dataclass
class UninstallResult:
    actions: list[Action] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"actions": [asdict(a) for a in self.actions]}


def _instances() -> list[str]:
    """Loaded htr@*.service / htr@*.socket instances."""
    out = systemd.systemctl("list-units", "--all", "--plain", "--no-legend", "htr@*", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def uninstall(*, root: Path | None = None, unit_dir: Path | None = None, dry_run: bool = False) -> UninstallResult:
    """Stop and disable the units and remove the files ``install`` wrote.

    The config (/etc/htr), the state and cache directories, the model and the
    ``htr`` account are kept: they are data, and a re-install reuses them.
    With ``root`` or ``unit_dir`` only files are removed (no ``systemctl``).
    """
    live = root is None and unit_dir is None
    units_only = root is None and unit_dir is not None
    root = Path(root) if root else Path("/")
    target_dir = Path(unit_dir) if unit_dir else _under(root, UNIT_DIR)
    res = UninstallResult()
    if live and systemd.booted():
        units = [SOCKET, SERVICE, *_instances(), PREPARE_UNIT]
        if not dry_run:
            systemd.systemctl("disable", "--now", *units, check=False, timeout=180)
        res.actions.append(Action("stop+disable", " ".join(units), done=not dry_run))
    removed = False
    for path in [*(target_dir / name for name in UNITS), *([] if units_only else [_under(root, PREPARE_SCRIPT)])]:
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[:2]
        if not any(line.startswith(MARKER) for line in lines):  # the script's marker follows its #! line
            res.actions.append(Action("keep", str(path), "not written by htrctl"))
            continue
        if not dry_run:
            try:
                path.unlink()
            except PermissionError as exc:
                raise _permission(exc, path) from exc
        removed = True
        res.actions.append(Action("remove", str(path), done=not dry_run))
    if live and removed and systemd.booted():
        if not dry_run:
            systemd.systemctl("daemon-reload")
            systemd.systemctl("reset-failed", SERVICE, SOCKET, check=False)
        res.actions.append(Action("daemon-reload", "systemd", done=not dry_run))
    res.actions.append(Action("keep", f"{SYSTEM_CONFIG}, {STATE_DIR}, user {DEFAULT_USER}", "data is never removed"))
    return res
