"""Split one collection over N independent runs (``htrctl transcribe --shard I/N``).

The partition is a pure function of the set of input *names* (the relative
output names, unique within a run) and N: the names are sorted by code point
(no locale, no file-system order) and input k of that list goes to shard
``k mod N``. So N runs over the same inputs, on any machines, in any order,
cover every input exactly once, and the shards differ in size by at most one.
The arguments' order and how the paths are spelled (relative, absolute) do
not matter; adding or removing files between the runs of one array does.

``--shard slurm`` takes I and N from a Slurm array task's environment:
``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` (divided by
``SLURM_ARRAY_TASK_STEP``) of ``SLURM_ARRAY_TASK_COUNT`` tasks. A sparse array
(``--array=1,4,9``) has no such dense index and is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import UsageError

T = TypeVar("T")

SLURM = "slurm"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard *index* (0-based) of *count*."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"shard {self.index}/{self.count} does not exist (I must be 0 … N-1, N ≥ 1)",
                             remedy="pass --shard I/N with 0 <= I < N, e.g. --shard 0/4")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, items: Sequence[T], key) -> list[T]:
        """The items of this shard, in their original order (*key* gives each item's unique name)."""
        ranked = sorted(range(len(items)), key=lambda i: key(items[i]))
        mine = {i for rank, i in enumerate(ranked) if rank % self.count == self.index}
        return [it for i, it in enumerate(items) if i in mine]


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"${name}={raw!r} is not a number") from None


def from_slurm(env: Mapping[str, str] | None = None) -> Shard:
    """The shard of this Slurm array task (see the module docstring)."""
    env = os.environ if env is None else env
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        raise UsageError(
            "--shard slurm: not inside a Slurm array task ($SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT unset)",
            remedy="submit with sbatch --array=0-N (htrctl slurm script writes the script), or pass --shard I/N",
        )
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    first = 0 if first is None else first
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
    last = _env_int(env, "SLURM_ARRAY_TASK_MAX")
    if last is not None and (last - first) // step + 1 != count or (task - first) % step:
        raise UsageError(
            f"--shard slurm: the array ({first}-{last}:{step}, {count} tasks) is not a contiguous range",
            remedy="submit a range such as --array=0-N (a throttle like %4 is fine), or pass --shard I/N",
        )
    return Shard((task - first) // step, count)


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``"I/N"`` or ``"slurm"`` (None: no sharding)."""
    if spec is None or spec == "":
        return None
    if spec.strip().lower() == SLURM:
        return from_slurm(env)
    m = _SPEC.match(spec)
    if not m:
        raise UsageError(f"--shard {spec!r}: expected I/N (e.g. 0/4) or 'slurm'")
    return Shard(int(m.group(1)), int(m.group(2)))


def names_digest(names: Sequence[str]) -> str:
    """A short digest of the whole input list (sorted): equal in every shard of one collection."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def shard_inputs(shard: Shard, items: Sequence[T], missing: Sequence[tuple[str, str]]) -> tuple[list[T], list]:
    """This shard's inputs (by their unique relative output name) and the missing arguments (shard 0 reports them)."""
    if any(getattr(it, "path", True) is None for it in items):
        raise UsageError("--shard cannot split stdin (-): each shard would read it", remedy="pass files or directories")
    return shard.select(items, key=lambda it: it.rel), list(missing) if shard.index == 0 else []
