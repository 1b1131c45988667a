"""The units rendered for this installation.

The templates live in ``systemd/`` (``htr.service``, ``htr.socket`` and the
per-GPU ``htr@.service`` / ``htr@.socket``, ``htr-gpu-prepare.service`` and its
script), shipped in the package as ``htrctl/data/systemd``
(:mod:`htrctl.packaged`); their ``@PLACEHOLDERS@`` are filled with *this*
installation's paths: the environment's ``htrd``, the config file, the model
directory (read-only in the unit), the service user and group, the GPU device
groups present on the host, and -- when Python or the model lives under
``/home`` or ``/root`` -- read-only bind mounts that let the service see just
those paths while ``ProtectHome=`` hides the rest.
"""

from __future__ import annotations

import grp
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__, packaged
from ..errors import ServiceError

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


def unit_names(instance: str | None) -> tuple[str, str]:
    """(service, socket) for the single unit or one replica."""
    if instance:
        return f"htr@{instance}.service", f"htr@{instance}.socket"
    return SERVICE, SOCKET


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
