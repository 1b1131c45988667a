"""A thin, typed wrapper over NVML (nvidia-ml-py's ``pynvml``).

Everything the project reads from the driver goes through :func:`read_host`,
which returns plain dataclasses (:class:`HostSnapshot`). Every NVML call is
guarded: a call the GPU does not support, or one that fails, leaves its field
``None`` and records the error under ``errors`` -- it never raises. Only a
driver that cannot be initialised at all raises :class:`htrctl.errors.GpuError`
("no NVIDIA driver found"), and a driver that does not answer within *timeout*
seconds raises it too (the call runs in a daemon thread, so a wedged driver
cannot hang the caller).

**For tests**: with ``HTR_NVML_FAKE=/path/snapshot.json`` in the environment,
:func:`read_host` replays a snapshot captured on a real host
(``python -m htrctl.doctor.capture > snapshot.json``) instead of talking to the
driver. Captured hosts live in ``tests/data/gpu-hosts/``. A snapshot may also
carry a ``probe`` section that tells the P2P probe how to behave for a pair
(``"hang"``, ``"zeros"``, ``"mismatch"``) -- used to construct broken hosts.
It is never consulted unless that variable is set.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import GpuError

logger = logging.getLogger(__name__)

ENV_FAKE = "HTR_NVML_FAKE"
SNAPSHOT_SCHEMA = "htrctl-nvml-snapshot/1"
NO_DRIVER = "no NVIDIA driver found"

# nvmlDeviceGetTopologyCommonAncestor levels -> nvidia-smi topo -m names.
TOPOLOGY_NAMES = {0: "SELF", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
# P2P capability indices (NVML_P2P_CAPS_INDEX_*). READ is a one-element tuple in
# nvidia-ml-py (a typo upstream): these are the plain integers.
P2P_CAPS = {"read": 0, "write": 1, "nvlink": 2, "atomics": 3, "prop": 4}
P2P_STATUS_NAMES = {
    0: "OK",
    1: "CNS",  # chipset not supported
    2: "GNS",  # GPU not supported
    3: "TNS",  # IOH topology not supported
    4: "DISABLED_BY_REGKEY",
    5: "NS",  # not supported
    6: "U",  # unknown
}
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}


@dataclass
class ProcessInfo:
    pid: int
    used_memory: int | None = None  # bytes
    name: str | None = None


@dataclass
class RemappedRows:
    correctable: int = 0
    uncorrectable: int = 0
    pending: bool = False
    failure: bool = False


@dataclass
class GpuInfo:
    """One GPU as NVML sees it (index = NVML's enumeration index)."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total: int | None = None  # bytes
    memory_free: int | None = None
    memory_used: int | None = None
    persistence_mode: bool | None = None
    compute_mode: int | None = None
    mig_mode: list[int] | None = None  # [current, pending]
    ecc_mode: list[int] | None = None  # [current, pending]
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    remapped_rows: RemappedRows | None = None
    processes: list[ProcessInfo] = field(default_factory=list)
    pcie_gen: int | None = None
    pcie_width: int | None = None
    nvlinks_active: int | None = None
    numa_node: int | None = None
    minor_number: int | None = None  # N of /dev/nvidiaN
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def compute_mode_name(self) -> str | None:
        return None if self.compute_mode is None else COMPUTE_MODES.get(self.compute_mode, str(self.compute_mode))

    @property
    def mig_enabled(self) -> bool:
        return bool(self.mig_mode and self.mig_mode[0])


@dataclass
class PairInfo:
    """What the driver says about one GPU pair (by NVML index)."""

    a: int
    b: int
    common_ancestor: int | None = None  # NVML_TOPOLOGY_* level
    nvlink: bool = False  # joined by NVLink (common ancestor then reads NV#)
    p2p: dict[str, int | None] = field(default_factory=dict)  # caps name -> NVML_P2P_STATUS_*
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def link(self) -> str:
        if self.nvlink:
            return "NVLink"
        if self.common_ancestor is None:
            return "unknown"
        return TOPOLOGY_NAMES.get(self.common_ancestor, str(self.common_ancestor))

    def p2p_name(self, cap: str) -> str:
        v = self.p2p.get(cap)
        return "?" if v is None else P2P_STATUS_NAMES.get(v, str(v))


@dataclass
class HostSnapshot:
    driver_version: str | None = None
    cuda_driver_version: int | None = None  # e.g. 13000 for 13.0
    nvml_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    pairs: list[PairInfo] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    source: str = "nvml"  # "nvml" or the fake snapshot's path

    @property
    def cuda_driver_version_str(self) -> str | None:
        v = self.cuda_driver_version
        return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"

    def pair(self, a: int, b: int) -> PairInfo | None:
        for p in self.pairs:
            if {p.a, p.b} == {a, b}:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- real NVML


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


class _Guard:
    """Run NVML calls, recording failures in an ``errors`` dict instead of raising."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors

    def __call__(self, key: str, fn, *args, default=None):
        try:
            return fn(*args)
        except Exception as exc:  # NVMLError_* subclasses, ctypes errors: a finding, not a crash
            self.errors[key] = _err(exc)
            return default


def _read_gpu(nv, index: int) -> GpuInfo | None:
    errors: dict[str, str] = {}
    g = _Guard(errors)
    h = g("handle", nv.nvmlDeviceGetHandleByIndex, index)
    if h is None:
        logger.warning("NVML: GPU %d has no handle: %s", index, errors.get("handle"))
        return GpuInfo(index=index, uuid=f"unknown-{index}", errors=errors)
    info = GpuInfo(index=index, uuid=_text(g("uuid", nv.nvmlDeviceGetUUID, h)) or f"unknown-{index}", errors=errors)
    info.name = _text(g("name", nv.nvmlDeviceGetName, h))
    pci = g("pci", nv.nvmlDeviceGetPciInfo, h)
    if pci is not None:
        info.pci_bus_id = _text(getattr(pci, "busId", None))
    mem = g("memory", nv.nvmlDeviceGetMemoryInfo, h)
    if mem is not None:
        info.memory_total, info.memory_free, info.memory_used = int(mem.total), int(mem.free), int(mem.used)
    pm = g("persistence_mode", nv.nvmlDeviceGetPersistenceMode, h)
    info.persistence_mode = None if pm is None else bool(pm)
    info.compute_mode = g("compute_mode", nv.nvmlDeviceGetComputeMode, h)
    mig = g("mig_mode", nv.nvmlDeviceGetMigMode, h)
    info.mig_mode = None if mig is None else [int(x) for x in mig]
    ecc = g("ecc_mode", nv.nvmlDeviceGetEccMode, h)
    info.ecc_mode = None if ecc is None else [int(x) for x in ecc]
    if info.ecc_mode and info.ecc_mode[0]:
        unc = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        info.ecc_uncorrected_volatile = g("ecc_volatile", nv.nvmlDeviceGetTotalEccErrors, h, unc, nv.NVML_VOLATILE_ECC)
        info.ecc_uncorrected_aggregate = g("ecc_aggregate", nv.nvmlDeviceGetTotalEccErrors, h, unc,
                                           nv.NVML_AGGREGATE_ECC)
    rr = g("remapped_rows", nv.nvmlDeviceGetRemappedRows, h)
    if rr is not None:
        corr, unc_rows, pending, failure = rr
        info.remapped_rows = RemappedRows(int(corr), int(unc_rows), bool(pending), bool(failure))
    procs = g("processes", nv.nvmlDeviceGetComputeRunningProcesses, h, default=[]) or []
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        info.processes.append(ProcessInfo(pid=int(p.pid), used_memory=None if used is None else int(used)))
    info.pcie_gen = g("pcie_gen", nv.nvmlDeviceGetCurrPcieLinkGeneration, h)
    info.pcie_width = g("pcie_width", nv.nvmlDeviceGetCurrPcieLinkWidth, h)
    active = 0
    for link in range(int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            if nv.nvmlDeviceGetNvLinkState(h, link):
                active += 1
        except Exception:  # link absent / not supported (PCIe boards): stop counting
            break
    info.nvlinks_active = active
    numa = g("numa_node", getattr(nv, "nvmlDeviceGetNumaNodeId", lambda _h: None), h)
    info.numa_node = None if numa is None else int(numa)
    minor = g("minor_number", getattr(nv, "nvmlDeviceGetMinorNumber", lambda _h: None), h)
    info.minor_number = None if minor is None else int(minor)
    # "not supported" is a normal answer for many of these on consumer/virtual GPUs:
    # keep it in errors (the capture shows it) but do not log it as a problem.
    return info


def _read_pair(nv, handles: dict[int, Any], a: int, b: int, gpus: dict[int, GpuInfo]) -> PairInfo:
    errors: dict[str, str] = {}
    g = _Guard(errors)
    pair = PairInfo(a=a, b=b, errors=errors)
    ha, hb = handles.get(a), handles.get(b)
    if ha is None or hb is None:
        errors["handle"] = "no handle"
        return pair
    pair.common_ancestor = g("common_ancestor", nv.nvmlDeviceGetTopologyCommonAncestor, ha, hb)
    for cap, idx in P2P_CAPS.items():
        pair.p2p[cap] = g(f"p2p_{cap}", nv.nvmlDeviceGetP2PStatus, ha, hb, idx)
    nvl = pair.p2p.get("nvlink")
    pair.nvlink = nvl == 0  # the NVLink capability is OK only when the two are joined by NVLink
    return pair


def _read_real() -> HostSnapshot:
    try:
        import pynvml as nv
    except ImportError as exc:
        raise GpuError(f"{NO_DRIVER} (python package nvidia-ml-py is not installed: {exc})",
                       remedy="pip install nvidia-ml-py") from exc
    try:
        nv.nvmlInit()
    except Exception as exc:
        raise GpuError(f"{NO_DRIVER} (NVML could not initialise: {_text(str(exc))})",
                       remedy="install the NVIDIA driver (nvidia-smi must work), or set gpu.select: cpu") from exc
    try:
        errors: dict[str, str] = {}
        g = _Guard(errors)
        snap = HostSnapshot(errors=errors)
        snap.driver_version = _text(g("driver_version", nv.nvmlSystemGetDriverVersion))
        snap.cuda_driver_version = g("cuda_driver_version", nv.nvmlSystemGetCudaDriverVersion)
        snap.nvml_version = _text(g("nvml_version", nv.nvmlSystemGetNVMLVersion))
        count = g("device_count", nv.nvmlDeviceGetCount, default=0) or 0
        handles: dict[int, Any] = {}
        for i in range(count):
            info = _read_gpu(nv, i)
            if info is not None:
                snap.gpus.append(info)
            try:
                handles[i] = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception:  # recorded by _read_gpu already
                pass
        by_index = {gi.index: gi for gi in snap.gpus}
        for i in range(count):
            for j in range(i + 1, count):
                snap.pairs.append(_read_pair(nv, handles, i, j, by_index))
        return snap
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:  # shutting down a half-initialised NVML is best effort
            pass


# --------------------------------------------------------------------------- fake (tests)


def _build(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def snapshot_from_dict(data: dict[str, Any], source: str = "<dict>") -> HostSnapshot:
    """Build a :class:`HostSnapshot` from a captured JSON document (see module doc)."""
    if data.get("init_error"):
        raise GpuError(f"{NO_DRIVER} (NVML could not initialise: {data['init_error']})",
                       remedy="install the NVIDIA driver (nvidia-smi must work), or set gpu.select: cpu")
    nvml = data.get("nvml", data)
    gpus = []
    for gd in nvml.get("gpus", []):
        gd = dict(gd)
        if isinstance(gd.get("remapped_rows"), dict):
            gd["remapped_rows"] = _build(RemappedRows, gd["remapped_rows"])
        gd["processes"] = [_build(ProcessInfo, p) for p in gd.get("processes") or []]
        gpus.append(_build(GpuInfo, gd))
    pairs = [_build(PairInfo, dict(p)) for p in nvml.get("pairs", [])]
    snap = _build(HostSnapshot, {k: v for k, v in nvml.items() if k not in ("gpus", "pairs")})
    snap.gpus, snap.pairs, snap.source = gpus, pairs, source
    return snap


def load_fake(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GpuError(f"${ENV_FAKE}={p}: cannot read the NVML snapshot: {exc}",
                       remedy=f"unset {ENV_FAKE} (it is for tests only)") from exc


def fake_path(env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get(ENV_FAKE) or None


# --------------------------------------------------------------------------- entry point


def read_host(*, timeout: float = 10.0) -> HostSnapshot:
    """Everything NVML says about this host, bounded by *timeout* seconds.

    Raises :class:`GpuError` when there is no usable driver (or it does not answer).
    """
    fp = fake_path()
    if fp:
        data = load_fake(fp)
        if (data.get("behaviour") or {}).get("nvml") == "hang":
            return _with_timeout(lambda: threading.Event().wait(), timeout)  # a wedged driver, for tests
        return snapshot_from_dict(data, source=fp)
    return _with_timeout(_read_real, timeout)


def _with_timeout(fn, timeout: float) -> HostSnapshot:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed over to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="nvml-read", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise GpuError(f"the NVIDIA driver did not answer within {timeout:g} s (NVML query hung)",
                       remedy="check `nvidia-smi`, dmesg for Xid errors; reboot or reload the driver")
    if "error" in box:
        raise box["error"]
    if not isinstance(box.get("value"), HostSnapshot):
        raise GpuError(f"{NO_DRIVER} (NVML returned nothing)")
    return box["value"]
