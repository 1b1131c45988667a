"""What a provision did (or, with ``--dry-run``, would do): its actions and totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Action:
    kind: str  # copy | link | resume | fetch | merge | manifest | remove | hash
    path: str
    size: int = 0
    source: str = ""


@dataclass
class ProvisionResult:
    """``--json`` prints :meth:`to_dict`: these fields, in this order."""

    source: str
    dest: str
    base: str | None = None
    noop: bool = False
    dry_run: bool = False
    files: int = 0
    total_size: int = 0
    bytes_copied: int = 0
    manifest_digest: str | None = None
    merged: bool = False
    transport: str | None = None  # "rsync" | "sftp" for a host:path SOURCE
    seconds: float = 0.0
    actions: list[Action] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}

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
