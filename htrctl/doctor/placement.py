"""Placement: how much GPU memory the model needs (from the index / safetensors headers,
without loading anything), which single GPU should hold it, and whether the configured
``gpu.select`` can. ``write_recommendation`` puts the recommended UUID into the config file.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..atomicfile import write_atomic
from ..errors import ConfigError, GpuError
from ..gpus import GIB, choose_gpu
from ..modeldir import kv_cache_bytes, model_footprint, slots_that_fit
from .findings import FAIL, OK, WARN, Context, Finding

logger = logging.getLogger(__name__)
MANY_SLOTS = 64  # fewer slots than this (when more were configured): a warning -- lines/s under load suffer


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.1f} MiB"


def _healthy(ctx: Context, dev) -> list[str]:
    """Reasons this GPU should not be recommended (empty when fine)."""
    g = next((x for x in ctx.snapshot().gpus if x.uuid == dev.uuid), None)
    why = []
    if g is None:
        return why
    if g.compute_mode == 2:
        why.append("compute mode prohibited")
    if g.ecc_uncorrected_volatile:
        why.append("uncorrected ECC errors")
    if g.remapped_rows and (g.remapped_rows.pending or g.remapped_rows.failure):
        why.append("row remapping pending/failed")
    if g.mig_enabled:
        why.append("MIG enabled")
    return why


def serving_kv_bytes(s, slots: int | None = None) -> int:
    """The KV cache htrd's fast generator allocates for *slots* lines (0 for the plain generator). Default: the
    smallest of ``limits.batch_sizes`` -- what a GPU must hold at least; htrd serves the largest that fits."""
    if not s.generation.fast_generator:
        return 0
    return kv_cache_bytes(Path(s.model.dir), s.model.variant, slots=slots or min(s.limits.batch_sizes),
                          max_cache_len=s.generation.max_cache_len)


def _slots_finding(s, weights_bytes: int, dev) -> Finding | None:
    """The slots htrd would serve on *dev* (a :class:`~htrctl.gpus.GpuDevice`) as it is now: the largest of
    ``limits.batch_sizes`` whose KV cache fits beside the weights (:func:`htrctl.modeldir.slots_that_fit`, as
    htrd sizes it). None for the plain generator or a model without a readable config."""
    per_slot = serving_kv_bytes(s, slots=1)
    if not per_slot:
        return None
    fits = slots_that_fit(s.limits.batch_sizes, per_slot, dev.memory_free - weights_bytes, dev.memory_total)
    n = fits[-1] if fits else 0
    largest = max(s.limits.batch_sizes)
    kv = max(n, 1) * per_slot  # the cache is linear in the slots (kv_cache_bytes)
    data = {"uuid": dev.uuid, "slots": n, "largest_batch_size": largest, "kv_cache_bytes": kv if n else 0}
    if n == largest:
        return Finding("placement.slots", OK, f"GPU {dev.index} holds {n} slots (lines decoding at once; "
                       f"{_size(kv)} of KV cache)", data=data)
    few = n < min(MANY_SLOTS, largest)
    return Finding("placement.slots", WARN if few else OK,
                   f"GPU {dev.index} holds about {n} slots of limits.batch_sizes' {largest} (lines decoding at "
                   f"once; {_size(kv)} of KV cache in what the weights leave free)"
                   + ("; fewer slots: fewer lines/s under a deep queue" if few else ""),
                   remedy=("lower generation.max_cache_len (every slot holds that many positions), or free the GPU "
                           "/ use a bigger one") if few else None, data=data)


def check(ctx: Context) -> list[Finding]:
    s = ctx.settings
    out: list[Finding] = []
    model_dir = Path(s.model.dir)
    headroom = int(s.gpu.min_free_headroom_gib * GIB)
    fp = model_footprint(model_dir, s.model.variant) if model_dir.is_dir() else None
    kv = serving_kv_bytes(s) if fp else 0
    need = (fp["weights_bytes"] + kv + headroom) if fp and fp["weights_bytes"] else None
    if fp is None:
        out.append(Finding("placement.size", WARN, f"model directory {model_dir} does not exist: cannot size the model",
                           remedy="provision it (htrctl provision SRC " + str(model_dir) + ")"))
    elif not fp["weights_bytes"]:
        out.append(Finding("placement.size", WARN, f"no safetensors weights found in {model_dir}", data=fp))
    else:
        cache = (f" + {_size(kv)} of KV cache (at least {min(s.limits.batch_sizes)} slot(s) x "
                 f"{s.generation.max_cache_len} positions; htrd serves as many of limits.batch_sizes as fit)"
                 ) if kv else ""
        out.append(Finding("placement.size", OK, f"model ({fp['variant']}) needs {_size(fp['weights_bytes'])} "
                           f"of weights{cache} + {s.gpu.min_free_headroom_gib:g} GiB headroom = {_size(need)}",
                           data={**fp, "kv_cache_bytes": kv, "headroom_bytes": headroom, "required_bytes": need}))
    devs = ctx.devices()
    if s.gpu.select == "cpu":
        sev = WARN if devs else OK
        out.append(Finding("placement.config", sev, "gpu.select is 'cpu': the daemon runs on the CPU"
                           + (" although this host has GPUs (slow: minutes per page)" if devs else ""),
                           remedy="set gpu.select to a GPU UUID (htrctl doctor --write-config)" if devs else None))
    if not devs:
        if s.gpu.select != "cpu":
            out.append(Finding("placement.recommend", FAIL, "no GPU to place the model on",
                               remedy="see the driver section; or set gpu.select: cpu"))
        return out
    # the recommendation: healthy, fits, most free memory, fewest other processes
    procs = {g.uuid: len(g.processes) for g in ctx.snapshot().gpus}
    candidates = [d for d in devs if not _healthy(ctx, d) and (need is None or d.memory_free >= need)]
    excluded = {d.uuid: _healthy(ctx, d) for d in devs if _healthy(ctx, d)}
    # GPUs whose peer path failed are still fine alone: the model lives on one GPU.
    target = None  # the GPU whose slots are reported
    if candidates:
        best = max(candidates, key=lambda d: (procs.get(d.uuid, 0) == 0, d.memory_free, -d.index))
        ctx.recommendation = {"uuid": best.uuid, "index": best.index, "name": best.name,
                              "memory_free": best.memory_free, "required_bytes": need,
                              "config": {"gpu": {"select": best.uuid}}}
        target = best
        out.append(Finding("placement.recommend", OK,
                           f"recommended: GPU {best.index} {best.name} {best.uuid} "
                           f"({best.memory_free / GIB:.1f} GiB free) -- one GPU, by UUID",
                           remedy=None if s.gpu.select == best.uuid else
                           f"set gpu.select: {best.uuid} (htrctl doctor --write-config does it)",
                           data={**ctx.recommendation, "excluded": excluded}))
    else:
        biggest = max(devs, key=lambda d: d.memory_free)
        out.append(Finding("placement.recommend", FAIL,
                           "no single GPU can hold the model"
                           + (f": it needs {need / GIB:.1f} GiB, the most free is {biggest.memory_free / GIB:.1f} GiB"
                              if need else " (every GPU is unusable)"),
                           remedy="free a GPU (nvidia-smi shows what uses it), use a bigger GPU, or lower "
                           "gpu.min_free_headroom_gib; never split the model across GPUs",
                           data={"required_bytes": need, "excluded": excluded}))
    # the configured GPU
    if s.gpu.select != "cpu":
        try:
            chosen = choose_gpu(devs, s.gpu.select, required_bytes=need)
        except GpuError as exc:
            out.append(Finding("placement.config", FAIL, exc.message, remedy=exc.remedy,
                               data={"select": s.gpu.select, "required_bytes": need}))
        else:
            bad = _healthy(ctx, chosen) if chosen else []
            if bad:
                out.append(Finding("placement.config", FAIL, f"gpu.select: {s.gpu.select} resolves to GPU "
                                   f"{chosen.index} ({chosen.uuid}), which has: {', '.join(bad)}",
                                   remedy="select another GPU (see placement.recommend)",
                                   data={"select": s.gpu.select, "uuid": chosen.uuid}))
            else:
                if s.gpu.select.lower() == chosen.uuid.lower():
                    policy = ""
                elif s.gpu.select.isdigit():
                    policy = " (by index: a UUID stays right when GPUs are added or moved)"
                else:
                    policy = (" (a policy: it may pick another GPU after a reboot or when memory use changes; "
                              "a UUID is stable)")
                out.append(Finding("placement.config", OK,
                                   f"gpu.select: {s.gpu.select} -> GPU {chosen.index} {chosen.uuid}{policy}",
                                   data={"select": s.gpu.select, "uuid": chosen.uuid}))
                target = chosen
    # the slots htrd will serve there (the configured GPU, else the recommended one)
    if target is not None and fp and fp["weights_bytes"]:
        slots = _slots_finding(s, fp["weights_bytes"], target)
        if slots is not None:
            out.append(slots)
    senv = ctx.service_env()
    sel_env = senv.env.get("HTR_GPU__SELECT") if senv.installed else None
    if sel_env is not None and sel_env != s.gpu.select:
        out.append(Finding("placement.service-override", WARN, f"the service sets HTR_GPU__SELECT={sel_env}, "
                           f"overriding gpu.select: {s.gpu.select} from {s.source}",
                           remedy="keep the GPU choice in one place (the config file)",
                           data={"files": senv.files()}))
    return out


# --------------------------------------------------------------------------- --write-config

_SECTION_RE = re.compile(r"^([A-Za-z_][\w-]*)\s*:\s*(#.*)?$")


def set_gpu_select_text(text: str, uuid: str) -> str:
    """*text* (a YAML config) with ``gpu.select`` set to *uuid*, everything else (comments too) kept."""
    lines = text.splitlines(keepends=True)
    gpu_start = None
    for i, line in enumerate(lines):
        m = _SECTION_RE.match(line.rstrip("\r\n"))
        if m and not line[0].isspace():
            if m.group(1) == "gpu":
                gpu_start = i
                break
    if gpu_start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return text + sep + f"gpu:\n  select: {uuid}  # written by htrctl doctor --write-config\n"
    # the gpu section's body: indented lines (and blanks/comments) until the next top-level key
    end = len(lines)
    for j in range(gpu_start + 1, len(lines)):
        ln = lines[j]
        if ln.strip() and not ln[0].isspace() and not ln.lstrip().startswith("#"):
            end = j
            break
    indent = "  "
    for j in range(gpu_start + 1, end):
        ln = lines[j]
        if ln.strip() and not ln.lstrip().startswith("#"):
            indent = ln[: len(ln) - len(ln.lstrip())]
            break
    sel = re.compile(rf"^{re.escape(indent)}select\s*:\s*([^#\n]*?)(\s*#.*)?(\r?\n)?$")
    for j in range(gpu_start + 1, end):
        m = sel.match(lines[j])
        if m:
            nl = m.group(3) or ""
            lines[j] = f"{indent}select: {uuid}{m.group(2) or ''}{nl}"
            return "".join(lines)
    lines.insert(gpu_start + 1, f"{indent}select: {uuid}  # written by htrctl doctor --write-config\n")
    return "".join(lines)


def write_recommendation(config_path: str | os.PathLike, uuid: str) -> Path:
    """Set ``gpu.select: <uuid>`` in *config_path*, atomically, keeping the rest of the file.

    The new text is validated with the real loader before it replaces the file.
    """
    from ..config import load_settings

    path = Path(config_path)
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", remedy="run as a user who may edit it") from exc
    new = set_gpu_select_text(old, uuid)

    def check(tmp: Path) -> None:
        settings = load_settings(tmp, env={})
        if settings.gpu.select != uuid:
            raise ConfigError(f"{path}: could not set gpu.select (the edited file reads {settings.gpu.select!r})",
                              remedy=f"edit it by hand: gpu:\\n  select: {uuid}")

    try:
        write_atomic(path, new, mode=mode, check=check)
    except PermissionError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}", remedy="run as root (sudo)") from exc
    logger.info("wrote gpu.select: %s to %s", uuid, path)
    return path
