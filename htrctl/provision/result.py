"""What a provision did (or, with ``--dry-run``, would do): its actions and totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Action:
    kind: str  # copy | link | resume | fetch | merge | manifest | remove | hash
    path: str
    size: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size": self.size, "source": self.source}


@dataclass
class ProvisionResult:
    source: str
    dest: str
    base: str | None = None
    actions: list[Action] = field(default_factory=list)
    bytes_copied: int = 0
    noop: bool = False
    dry_run: bool = False
    manifest_digest: str | None = None
    files: int = 0
    total_size: int = 0
    seconds: float = 0.0
    merged: bool = False
    transport: str | None = None  # "rsync" | "sftp" for a host:path SOURCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "base": self.base,
            "noop": self.noop,
            "dry_run": self.dry_run,
            "files": self.files,
            "total_size": self.total_size,
            "bytes_copied": self.bytes_copied,
            "manifest_digest": self.manifest_digest,
            "merged": self.merged,
            "transport": self.transport,
            "seconds": round(self.seconds, 3),
            "actions": [a.to_dict() for a in self.actions],
        }

    def summary(self) -> str:
        if self.noop:
            return f"{self.dest}: up to date ({self.files} files, {_gib(self.total_size)}), nothing to do"
        kinds: dict[str, int] = {}
        for a in self.actions:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        verb = "would provision" if self.dry_run else "provisioned"
        return (f"{verb} {self.dest} from {self.source}: {self.files} files, {_gib(self.total_size)}; "
                f"{what}; {_gib(self.bytes_copied)} {'to copy' if self.dry_run else 'copied'}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
