"""Where SOURCE, DEST and ``--base`` are: a local path, ``[user@]host:path`` or ``hf://org/name``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProvisionError


@dataclass(frozen=True)
class Local:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Remote:
    host: str  # [user@]host
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass(frozen=True)
class Hub:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")


_REMOTE = re.compile(r"^(?P<host>(?:[^@:/\s]+@)?[^@:/\s\[]+):(?P<path>.*)$")


def parse_location(spec: str) -> Local | Remote | Hub:
    """``hf://org/name[@rev]``, ``[user@]host:/path`` or a local path."""
    if spec.startswith("hf://"):
        rest = spec[len("hf://"):]
        repo, _, rev = rest.partition("@")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise ProvisionError(f"{spec!r}: not a hub repository id", remedy="write it as hf://org/name[@revision]")
        return Hub(repo, rev or None)
    m = _REMOTE.match(spec)
    if m and not os.path.exists(spec) and not spec.startswith(("./", "/", "~")):
        return Remote(m.group("host"), m.group("path") or ".")
    return Local(Path(spec).expanduser())
