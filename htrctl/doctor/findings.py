"""Findings, the report, and the shared context the checks read from."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExitCode, GpuError
from ..systemd import BOOTED_MARKER
from ..units.render import SERVICE, SOCKET, UNIT_DIR

OK, WARN, FAIL = "ok", "warn", "fail"
SEVERITIES = (OK, WARN, FAIL)
_RANK = {OK: 0, WARN: 1, FAIL: 2}

# The remedy for any broken peer-to-peer path (the incident's second cause).
P2P_REMEDY = (
    "pin the daemon to one GPU (gpu.select: <UUID>, as recommended under 'placement'; never device_map=auto); "
    "for multi-GPU work fix the platform first: IOMMU in passthrough mode (iommu=pt / amd_iommu=pt) or off, "
    "PCIe ACS disabled on the switches/root ports between the GPUs (BIOS), then rerun htrctl doctor -- "
    "the driver's 'P2P OK' is known to be wrong on such hosts"
)


@dataclass
class Finding:
    id: str
    severity: str
    message: str
    remedy: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    section: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "section": self.section, "severity": self.severity, "message": self.message,
                "remedy": self.remedy, "data": self.data}


@dataclass
class DoctorReport:
    findings: list[Finding]
    sections: list[str]
    duration_s: float
    recommendation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=_RANK.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        """0 all ok, 5 warnings only, 1 at least one failure (see README 'Exit codes')."""
        return {OK: ExitCode.OK, WARN: ExitCode.WARNINGS, FAIL: ExitCode.FAILURE}[self.worst].value

    def by_id(self, fid: str) -> Finding | None:
        return next((f for f in self.findings if f.id == fid), None)

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "version": __version__,
            "status": self.worst,
            "exit_code": self.exit_code,
            "summary": {s: self.count(s) for s in SEVERITIES},
            "duration_s": round(self.duration_s, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "sections": self.sections,
            "recommendation": self.recommendation,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class DoctorPaths:
    """Where the host checks look. Defaults are the real system; tests point them into tmp_path."""

    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    dev_root: Path = Path("/dev")
    python_include: Path | None = None  # None: this Python's (sysconfig), where Triton looks for Python.h
    unit_dirs: tuple[Path, ...] = (UNIT_DIR, Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
    service_unit: str = SERVICE
    socket_unit: str = SOCKET
    systemctl: str | None = "systemctl"  # None: do not ask systemd
    systemd_booted_marker: Path = BOOTED_MARKER


class Context:
    """What the checks share: settings, one NVML snapshot, the service environment."""

    def __init__(self, settings, *, paths: DoctorPaths | None = None, p2p: bool = True,
                 p2p_timeout: float = 30.0, nvml_timeout: float = 10.0, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.paths = paths or DoctorPaths()
        self.p2p = p2p
        self.p2p_timeout = p2p_timeout
        self.nvml_timeout = nvml_timeout
        self.env = dict(os.environ if env is None else env)
        self._snapshot = None
        self._snapshot_error: GpuError | None = None
        self._snapshot_read = False
        self._service_env = None
        self.p2p_results: list[dict[str, Any]] | None = None
        self.p2p_failed_pairs: set[tuple[int, int]] = set()
        self.recommendation: dict[str, Any] | None = None
        self.started = time.monotonic()
        # nvidia-uvm as the host had it before doctor ran: doctor's own CUDA probe (p2p) loads it
        # through the set-uid nvidia-modprobe, which the sandboxed service cannot do.
        from ..devnodes import NodeRoots, uvm_state

        self.uvm_before = uvm_state(NodeRoots(dev=self.paths.dev_root, proc=self.paths.proc_root))

    # NVML, read once
    def snapshot(self):
        if not self._snapshot_read:
            self._snapshot_read = True
            from ..nvml import read_host

            try:
                self._snapshot = read_host(timeout=self.nvml_timeout)
            except GpuError as exc:
                self._snapshot_error = exc
        return self._snapshot

    @property
    def snapshot_error(self) -> GpuError | None:
        self.snapshot()
        return self._snapshot_error

    def devices(self):
        """GpuDevice list in PCI bus order ([] without a driver)."""
        from ..gpus import devices_from_snapshot

        snap = self.snapshot()
        return devices_from_snapshot(snap) if snap is not None else []

    def service_env(self):
        if self._service_env is None:
            from .units import read_service_environment

            self._service_env = read_service_environment(self.paths)
        return self._service_env
