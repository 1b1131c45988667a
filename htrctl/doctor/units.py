"""Read the installed htr.service (and its drop-ins) the way systemd would.

Doctor judges the *service's* environment (HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES,
HTR_* overrides), not its own: the admin's shell is not what the daemon gets.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class ServiceEnvironment:
    unit_path: Path | None = None
    dropins: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_files: list[str] = field(default_factory=list)
    user: str | None = None
    group: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        return self.unit_path is not None

    def files(self) -> list[str]:
        return [str(p) for p in ([self.unit_path] if self.unit_path else []) + self.dropins]


def find_unit(paths, name: str) -> Path | None:
    for d in paths.unit_dirs:
        p = Path(d) / name
        if p.is_file():
            return p
    return None


def _service_lines(text: str):
    """(key, value) pairs of the [Service] section, continuation lines joined."""
    section = None
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if buf:
            line = buf + line.lstrip()
            buf = ""
        if line.endswith("\\"):
            buf = line[:-1] + " "
            continue
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            section = s[1:-1]
            continue
        if section == "Service" and "=" in s:
            k, _, v = s.partition("=")
            yield k.strip(), v.strip()


def _parse_assignments(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        words = shlex.split(value, posix=True)
    except ValueError:
        words = value.split()
    for w in words:
        if "=" in w:
            k, _, v = w.partition("=")
            out[k] = v
    return out


def _read_env_file(path: str, env: dict[str, str], problems: list[str]) -> None:
    optional = path.startswith("-")
    p = Path(path.lstrip("-"))
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        if not optional:
            problems.append(f"EnvironmentFile {p} cannot be read: {exc.strerror}")
        return
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;" or "=" not in s:
            continue
        k, _, v = s.partition("=")
        k = k.strip()
        if k.startswith("export "):
            k = k[len("export "):].strip()
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        env[k] = v


def read_service_environment(paths, name: str | None = None) -> ServiceEnvironment:
    """The unit's Environment=/EnvironmentFile=/User=/Group=, drop-ins applied in order."""
    name = name or paths.service_unit
    out = ServiceEnvironment()
    unit = find_unit(paths, name)
    if unit is None:
        return out
    out.unit_path = unit
    dropins: dict[str, Path] = {}
    for d in reversed(paths.unit_dirs):  # /etc overrides /usr/lib for a drop-in of the same name
        dd = Path(d) / f"{name}.d"
        if dd.is_dir():
            for f in dd.glob("*.conf"):
                dropins[f.name] = f
    out.dropins = [dropins[k] for k in sorted(dropins)]
    env_assign: dict[str, str] = {}
    env_files: list[str] = []
    for f in [unit, *out.dropins]:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            out.problems.append(f"{f} cannot be read: {exc.strerror}")
            continue
        for k, v in _service_lines(text):
            if k == "Environment":
                if v == "":
                    env_assign.clear()  # an empty assignment resets the list
                else:
                    env_assign.update(_parse_assignments(v))
            elif k == "EnvironmentFile":
                if v == "":
                    env_files.clear()
                else:
                    env_files.append(v)
            elif k == "User":
                out.user = v or None
            elif k == "Group":
                out.group = v or None
    env = dict(env_assign)
    for ef in env_files:  # EnvironmentFile= settings override Environment= (systemd.exec(5))
        _read_env_file(ef, env, out.problems)
    out.env, out.env_files = env, env_files
    return out
