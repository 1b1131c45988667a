"""Rendering, installing and querying htrd's systemd units.

The templates live in ``systemd/`` (``htr.service``, ``htr.socket`` and the
per-GPU ``htr@.service`` / ``htr@.socket``), shipped in the package as
``htrctl/data/systemd`` (:mod:`htrctl.packaged`); their ``@PLACEHOLDERS@`` are
filled with *this* installation's paths: the environment's ``htrd``, the
config file, the model directory (read-only in the unit), the service user
and group, the GPU device groups present on the host, and -- when Python or
the model lives under ``/home`` or ``/root`` -- read-only bind mounts that let
the service see just those paths while ``ProtectHome=`` hides the rest.

:func:`install` is idempotent: a file is written only when its content
changes, and a re-install that changes nothing says so and does not even
reload systemd. ``root`` (like ``systemctl --root``) writes everything under
another directory and touches neither users nor the running systemd: that is
how the unit tests exercise it without a systemd. ``unit_dir`` alone writes
only the unit files there: no account, no config file, no ``systemctl``.
"""

from __future__ import annotations

import grp
import logging
import math
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, packaged, systemd
from .atomicfile import write_atomic
from .config import SYSTEM_CONFIG, load_settings
from .errors import ConfigError, HtrError, ServiceError, ServicePermissionError

logger = logging.getLogger(__name__)

UNIT_DIR = Path("/etc/systemd/system")
UNITS = ("htr.service", "htr.socket", "htr@.service", "htr@.socket", "htr-gpu-prepare.service")
SERVICE = "htr.service"
# The root oneshot that loads nvidia-uvm and creates the device nodes before htrd's sandbox is
# built (htr.service and htr@.service want it); it runs this script, installed root-owned.
PREPARE_UNIT = "htr-gpu-prepare.service"
PREPARE_SCRIPT_TEMPLATE = "htr-gpu-prepare.sh"
PREPARE_SCRIPT = Path("/usr/local/sbin/htr-gpu-prepare")
SOCKET = "htr.socket"
DEFAULT_USER = "htr"
DEFAULT_GROUP = "htr"
# Groups that own GPU device nodes on common distributions (added when present).
GPU_GROUPS = ("video", "render")
# Directories that ProtectHome= hides.
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
# Directories that PrivateTmp= replaces with the service's own empty ones.
TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
STATE_DIR = Path("/var/lib/htr")
# TimeoutStopSec= = limits.drain_timeout_s + this (uvicorn's shutdown, engine stop).
STOP_MARGIN_S = 30
# First line of every rendered unit: marks the file as ours (uninstall removes only these).
MARKER = "# Rendered by htrctl"
# Characters a path may not contain to be written into a unit file unquoted.
_UNSAFE_PATH = re.compile(r"[\s\"'\\;]")
# What `status` reads from `systemctl show`.
SHOW_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "UnitFileState", "MainPID", "ExecMainStatus",
    "ExecMainCode", "NRestarts", "StatusText", "ActiveEnterTimestamp", "FragmentPath", "DropInPaths",
)


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class UnitContext:
    """The installation-specific values the templates are filled with."""

    htrd: Path
    config: Path
    model_dir: Path
    user: str = DEFAULT_USER
    group: str = DEFAULT_GROUP
    supplementary_groups: tuple[str, ...] = ()
    # Paths under /home, /root, /run/user that the service must still read.
    home_binds: tuple[Path, ...] = ()
    # TimeoutStopSec=: the config's limits.drain_timeout_s plus room to shut down.
    stop_timeout_s: int = 90
    # Where the GPU-preparing script is installed (run as root by htr-gpu-prepare.service).
    gpu_prepare: Path = PREPARE_SCRIPT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: [str(x) for x in v] if isinstance(v, (tuple, list)) else v if isinstance(v, int) else str(v)
                for k, v in d.items()}


def _unit_path(p: Path, what: str) -> str:
    s = str(p)
    if not p.is_absolute():
        raise ServiceError(f"{what} {s!r} is not an absolute path", remedy="give an absolute path")
    if _UNSAFE_PATH.search(s):
        raise ServiceError(
            f"{what} {s!r} contains whitespace, quotes, ';' or backslashes, which a unit file cannot hold safely",
            remedy="move it to a path without them",
        )
    return s.replace("%", "%%")  # systemd specifier escape


def _under_home(p: Path) -> bool:
    return any(p == h or h in p.parents for h in HOME_DIRS)


def _hidden(p: Path) -> bool:
    """Under a directory that ProtectHome= or PrivateTmp= hides from the service."""
    return _under_home(p) or any(t in p.parents for t in TMP_DIRS)


def home_binds_for(paths: Iterable[Path]) -> tuple[Path, ...]:
    """The paths (resolved) under a directory ProtectHome= or PrivateTmp= hides, deduplicated, outermost first."""
    found: list[Path] = []
    for p in paths:
        for cand in {Path(os.path.abspath(p)), Path(os.path.realpath(p))}:
            if _hidden(cand) and cand not in found:
                found.append(cand)
    found.sort(key=lambda x: (len(x.parts), str(x)))
    kept: list[Path] = []
    for p in found:
        if not any(k == p or k in p.parents for k in kept):
            kept.append(p)
    return tuple(sorted(kept, key=str))


def _groups_in(root: Path) -> set[str]:
    """Group names known on the target system (its /etc/group; NSS when root is /)."""
    if root == Path("/"):
        names = set()
        for g in GPU_GROUPS:
            try:
                grp.getgrnam(g)
                names.add(g)
            except KeyError:
                pass
        return names
    etc_group = root / "etc" / "group"
    try:
        return {line.split(":", 1)[0] for line in etc_group.read_text().splitlines() if ":" in line}
    except OSError:
        return set()


def _nvidia_device_group(root: Path) -> str | None:
    """The group owning /dev/nvidiactl when it is not root (some distributions use video)."""
    try:
        gid = (root / "dev" / "nvidiactl").stat().st_gid
    except OSError:
        return None
    if gid == 0 or root != Path("/"):
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def gpu_groups(root: Path = Path("/")) -> tuple[str, ...]:
    """Supplementary groups the service needs for the GPU device nodes, where they exist."""
    present = _groups_in(root)
    groups = [g for g in GPU_GROUPS if g in present]
    dev = _nvidia_device_group(root)
    if dev and dev not in groups:
        groups.append(dev)
    return tuple(groups)


def default_htrd() -> Path:
    """This environment's ``htrd`` (next to the running interpreter's scripts)."""
    return Path(sys.prefix) / "bin" / "htrd"


def python_paths() -> tuple[Path, ...]:
    """Where this environment's Python lives (the venv, the installation it links to), and where the
    htrctl and htrd packages live (outside the venv for an editable install)."""
    import importlib.util

    paths = [Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)]
    for pkg in ("htrctl", "htrd"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin:
            paths.append(Path(spec.origin).parent)
    return tuple(dict.fromkeys(paths))


def make_context(
    *,
    config: Path,
    model_dir: Path,
    htrd: Path | None = None,
    user: str = DEFAULT_USER,
    group: str = DEFAULT_GROUP,
    root: Path = Path("/"),
    supplementary_groups: Sequence[str] | None = None,
    drain_timeout_s: float = 60.0,
) -> UnitContext:
    htrd = Path(htrd) if htrd else default_htrd()
    config = Path(config)
    model_dir = Path(model_dir)
    binds = home_binds_for([*python_paths(), htrd.parent, config.parent, model_dir])
    return UnitContext(
        htrd=htrd,
        config=config,
        model_dir=model_dir,
        user=user,
        group=group,
        supplementary_groups=tuple(supplementary_groups) if supplementary_groups is not None else gpu_groups(root),
        home_binds=binds,
        stop_timeout_s=int(math.ceil(drain_timeout_s)) + STOP_MARGIN_S,
    )


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name):
        raise ServiceError(f"{what} {name!r} is not a valid user/group name", remedy="use e.g. 'htr'")
    return name


def render_unit(template: str, ctx: UnitContext) -> str:
    """Fill one template; every placeholder must be known."""
    if any(_under_home(p) for p in ctx.home_binds):
        protect_home = (
            "# Python or the model lives under a home directory: hide the homes but\n"
            "# these paths (read-only).\n"
            "ProtectHome=tmpfs\n"
        )
    else:
        protect_home = "ProtectHome=yes\n"
    if ctx.home_binds:
        protect_home += (
            "# Paths ProtectHome=/PrivateTmp= would hide, made visible read-only.\n"
            "BindReadOnlyPaths=" + " ".join(_unit_path(p, "path") for p in ctx.home_binds)
        )
    else:
        protect_home = protect_home.rstrip("\n")
    supp = (
        "SupplementaryGroups=" + " ".join(_check_name(g, "group") for g in ctx.supplementary_groups)
        if ctx.supplementary_groups
        else "# (no video/render group on this host: the devices are not group-restricted)"
    )
    values = {
        "HTRD": _unit_path(ctx.htrd, "htrd"),
        "CONFIG": _unit_path(ctx.config, "config file"),
        "MODEL_DIR": _unit_path(ctx.model_dir, "model directory"),
        "USER": _check_name(ctx.user, "user"),
        "GROUP": _check_name(ctx.group, "group"),
        "SUPPLEMENTARY_GROUPS": supp,
        "PROTECT_HOME": protect_home,
        "TIMEOUT_STOP_SEC": str(int(ctx.stop_timeout_s)),
        "GPU_PREPARE": _unit_path(ctx.gpu_prepare, "GPU-preparing script"),
    }

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise ServiceError(f"unit template has an unknown placeholder @{key}@")
        return values[key]

    body = re.sub(r"@([A-Z_]+)@", sub, template)
    header = (
        f"{MARKER} {__version__} (`htrctl service install`); it rewrites this file.\n"
        "# Local changes belong in a drop-in: systemctl edit <unit>\n"
    )
    return header + body


def render_units(ctx: UnitContext) -> dict[str, str]:
    """Every unit file name -> its rendered text."""
    return {name: render_unit(packaged.unit_template(name), ctx) for name in UNITS}


def render_prepare_script() -> str:
    """The GPU-preparing script, marked as ours on its second line (after the #! line)."""
    shebang, _, rest = packaged.unit_template(PREPARE_SCRIPT_TEMPLATE).partition("\n")
    return f"{shebang}\n{MARKER} {__version__} (`htrctl service install`); it rewrites this file.\n{rest}"


# ---------------------------------------------------------------- install


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


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _ensure_account(user: str, group: str, extra_groups: Sequence[str], *, live: bool, dry_run: bool) -> list[Action]:
    actions: list[Action] = []
    if not live:
        actions.append(Action("note", f"user {user}, group {group}", "not created with --root/--unit-dir"))
        return actions
    if _group_exists(group):
        actions.append(Action("keep", f"group {group}", "exists"))
    else:
        if not dry_run:
            systemd.run(["groupadd", "--system", group])
        actions.append(Action("create-group", group, done=not dry_run))
    if _user_exists(user):
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
    try:
        uid: int | None = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = None
    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
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
        from .config import Settings

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
        sockets = [f"htr@{r}.socket" for r in replicas] or [SOCKET]
        services = [f"htr@{r}.service" for r in replicas] or [SERVICE]
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


# ---------------------------------------------------------------- status, logs, restart


def unit_names(instance: str | None) -> tuple[str, str]:
    """(service, socket) for the single unit or one replica."""
    if instance:
        return f"htr@{instance}.service", f"htr@{instance}.socket"
    return SERVICE, SOCKET


@dataclass
class ServiceStatus:
    service: dict[str, str]
    socket: dict[str, str]
    units_current: bool | None  # installed files equal a fresh rendering (None: not checked)
    config_error: str | None = None  # the config file does not load

    @property
    def running(self) -> bool:
        return self.service.get("ActiveState") == "active"

    def exit_code(self) -> int:
        """0 running or waiting for its first request; 3 (like systemctl) otherwise."""
        if self.running:
            return 0
        if self.socket.get("ActiveState") == "active" and self.service.get("ActiveState") == "inactive":
            return 0
        return 3

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "socket": self.socket, "units_current": self.units_current,
                "config_error": self.config_error}


def status(*, instance: str | None = None, config: Path | None = None) -> ServiceStatus:
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
    return ServiceStatus(service=svc_props, socket=systemd.show(sock, SHOW_PROPERTIES), units_current=current, config_error=config_error)


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


def restart(*, instance: str | None = None, no_block: bool = False) -> ServiceStatus:
    """Restart the daemon: it drains in-flight requests first (SIGTERM), the socket keeps clients waiting."""
    svc, sock = unit_names(instance)
    # A unit that hit its start limit refuses to start until reset (e.g. after a config fix).
    systemd.systemctl("reset-failed", svc, sock, check=False)
    argv = ["restart", svc]
    if no_block:
        argv.insert(0, "--no-block")
    systemd.systemctl(*argv, timeout=600)
    return status(instance=instance)
