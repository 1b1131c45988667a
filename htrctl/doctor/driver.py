"""Driver and GPUs: NVML reachable, driver/CUDA versions vs the torch build, per-GPU health."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..gpus import GIB
from .findings import FAIL, OK, WARN, Context, Finding


def torch_build() -> dict | None:
    """torch's version and CUDA build, read from torch/version.py *without importing torch* (fast)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    vfile = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = vfile.read_text(encoding="utf-8")
    except OSError:
        return {"version": None, "cuda": None}

    def grab(name: str) -> str | None:
        m = re.search(rf"^{name}\s*(?::\s*[^=]+)?=\s*['\"]([^'\"]*)['\"]", text, re.M)
        return m.group(1) if m else None

    return {"version": grab("__version__"), "cuda": grab("cuda")}


def _ver(s: str) -> tuple[int, int]:
    parts = (s.split(".") + ["0"])[:2]
    return int(parts[0]), int(parts[1])


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    cpu = ctx.settings.gpu.select == "cpu"
    err = ctx.snapshot_error
    snap = ctx.snapshot()
    if err is not None or snap is None:
        msg = err.message if err else "no NVIDIA driver found"
        if cpu:
            out.append(Finding("driver.nvml", WARN, msg + "; gpu.select is 'cpu', so the daemon runs on the CPU (slow)",
                               remedy=err.remedy if err else None))
        else:
            out.append(Finding("driver.nvml", FAIL, msg, remedy=(err.remedy if err else None)
                               or "install the NVIDIA driver (nvidia-smi must work), or set gpu.select: cpu"))
        return out
    tb = torch_build()
    data = {"driver_version": snap.driver_version, "cuda_driver_version": snap.cuda_driver_version_str,
            "nvml_version": snap.nvml_version, "gpus": len(snap.gpus), "torch": tb, "source": snap.source}
    out.append(Finding("driver.nvml", OK, f"NVIDIA driver {snap.driver_version}, CUDA {snap.cuda_driver_version_str}, "
                       f"{len(snap.gpus)} GPU(s)", data=data))
    if not snap.gpus:
        out.append(Finding("driver.gpus", WARN if cpu else FAIL, "the driver is loaded but sees no GPU",
                           remedy="check `nvidia-smi`, dmesg (Xid errors), or set gpu.select: cpu"))
    # torch's CUDA build against the driver
    if tb is None:
        out.append(Finding("driver.torch", WARN, "torch is not installed here (the daemon needs the 'model' extra)",
                           remedy="pip install 'htrctl[daemon]' in the daemon's environment", data={"torch": None}))
    elif not tb.get("cuda"):
        sev = OK if cpu else FAIL
        out.append(Finding("driver.torch", sev, f"torch {tb.get('version')} is a CPU-only build",
                           remedy=None if cpu else "install a CUDA build of torch matching the driver "
                           f"(driver supports CUDA {snap.cuda_driver_version_str})", data=tb))
    elif snap.cuda_driver_version_str:
        try:
            t, d = _ver(tb["cuda"]), _ver(snap.cuda_driver_version_str)
        except ValueError:
            t = d = (0, 0)
        if t[0] > d[0]:
            out.append(Finding("driver.torch", FAIL,
                               f"torch {tb['version']} is built for CUDA {tb['cuda']}, the driver supports only "
                               f"CUDA {snap.cuda_driver_version_str}",
                               remedy="upgrade the NVIDIA driver or install a torch build for an older CUDA", data=tb))
        elif t > d:
            out.append(Finding("driver.torch", WARN,
                               f"torch is built for CUDA {tb['cuda']}, newer than the driver's "
                               f"{snap.cuda_driver_version_str} (minor-version compatibility; JIT of new PTX fails)",
                               remedy="upgrade the NVIDIA driver", data=tb))
        else:
            out.append(Finding("driver.torch", OK, f"torch {tb['version']} (CUDA {tb['cuda']}) runs on this driver",
                               data=tb))
    for dev in ctx.devices():
        out.extend(_gpu_findings(ctx, dev))
    return out


def _gpu_findings(ctx: Context, dev) -> list[Finding]:
    g = next(x for x in ctx.snapshot().gpus if x.uuid == dev.uuid)
    base = f"gpu.{dev.index}"
    who = f"GPU {dev.index} ({g.name}, {g.uuid})"
    data = {"index": dev.index, "nvml_index": g.index, "uuid": g.uuid, "name": g.name, "pci_bus_id": g.pci_bus_id,
            "memory_total": g.memory_total, "memory_free": g.memory_free, "persistence_mode": g.persistence_mode,
            "compute_mode": g.compute_mode_name, "mig_mode": g.mig_mode, "ecc_mode": g.ecc_mode,
            "ecc_uncorrected_volatile": g.ecc_uncorrected_volatile,
            "ecc_uncorrected_aggregate": g.ecc_uncorrected_aggregate,
            "remapped_rows": None if g.remapped_rows is None else vars(g.remapped_rows),
            "processes": [vars(p) for p in g.processes], "pcie": [g.pcie_gen, g.pcie_width],
            "nvlinks_active": g.nvlinks_active, "errors": g.errors}
    issues: list[Finding] = []
    if g.compute_mode == 2:
        issues.append(Finding(f"{base}.compute-mode", FAIL, f"{who} is in compute mode 'Prohibited': no process may use it",
                              remedy=f"nvidia-smi -i {g.uuid} -c DEFAULT (as root), or use another GPU"))
    elif g.compute_mode in (1, 3):
        issues.append(Finding(f"{base}.compute-mode", WARN,
                              f"{who} is in compute mode '{g.compute_mode_name}': only one process may use it "
                              "(the daemon must be that process)",
                              remedy=f"nvidia-smi -i {g.uuid} -c DEFAULT unless that is intended"))
    if g.ecc_uncorrected_volatile:
        issues.append(Finding(f"{base}.ecc", FAIL,
                              f"{who} has {g.ecc_uncorrected_volatile} uncorrected ECC error(s) since the driver loaded",
                              remedy="do not use this GPU: drain it, reset it (nvidia-smi -r -i ...) or reboot; "
                              "if errors return, have the GPU replaced"))
    elif g.ecc_uncorrected_aggregate:
        issues.append(Finding(f"{base}.ecc", WARN,
                              f"{who} has {g.ecc_uncorrected_aggregate} uncorrected ECC error(s) over its lifetime",
                              remedy="watch it (nvidia-smi -q -d ECC); replace the GPU if the count grows"))
    rr = g.remapped_rows
    if rr is not None and (rr.pending or rr.failure):
        issues.append(Finding(f"{base}.remapped-rows", FAIL,
                              f"{who}: row remapping {'failed' if rr.failure else 'is pending'} "
                              f"({rr.uncorrectable} rows remapped for uncorrectable errors)",
                              remedy="reset the GPU (nvidia-smi -r) or reboot to apply the remap; "
                              "a remapping failure means the GPU needs replacing"))
    elif rr is not None and rr.uncorrectable:
        issues.append(Finding(f"{base}.remapped-rows", WARN,
                              f"{who}: {rr.uncorrectable} rows remapped for uncorrectable errors",
                              remedy="watch the count; replace the GPU if it keeps growing"))
    if g.mig_enabled:
        issues.append(Finding(f"{base}.mig", WARN, f"{who} has MIG enabled: the model needs a whole GPU or a "
                              "MIG instance large enough, selected by its MIG UUID",
                              remedy=f"nvidia-smi -i {g.uuid} -mig 0 (as root) unless MIG is intended"))
    if g.processes:
        used = sum(p.used_memory or 0 for p in g.processes)
        issues.append(Finding(f"{base}.processes", WARN,
                              f"{who} is used by {len(g.processes)} process(es) (pids "
                              f"{', '.join(str(p.pid) for p in g.processes[:5])}; {used / GIB:.1f} GiB)",
                              remedy="fine if one of them is htrd; otherwise they compete for memory and time"))
    if g.persistence_mode is False:
        issues.append(Finding(f"{base}.persistence", OK, f"{who}: persistence mode is off (each CUDA start "
                              "re-initialises the GPU; nvidia-persistenced helps)"))
    for f in issues:
        f.data = {"index": dev.index, "uuid": g.uuid}
    free = "" if g.memory_free is None else f", {g.memory_free / GIB:.1f} of {(g.memory_total or 0) / GIB:.1f} GiB free"
    summary = Finding(base, OK, f"{who} at {g.pci_bus_id}{free}, compute mode {g.compute_mode_name}", data=data)
    return [summary, *issues]
