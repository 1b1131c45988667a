"""The NVIDIA device nodes a CUDA process opens, and whether this process can open them.

libcuda opens ``/dev/nvidiactl``, ``/dev/nvidiaN`` (N: the GPU's minor number)
and ``/dev/nvidia-uvm``. The last is the usual casualty under htr.service's
sandbox: ``NoNewPrivileges=`` and ``ProtectKernelModules=`` stop the set-uid
``nvidia-modprobe`` that libcuda runs to load nvidia-uvm on demand, and
``DeviceAllow=char-nvidia*`` is resolved against ``/proc/devices`` when the
unit starts, so a module loaded later is still refused. NVML does not need
the node -- GPU selection passes -- and torch then fails with an opaque
"CUDA unknown error" (exit 1, restarted until the start limit).

:func:`preflight` opens the nodes before torch is imported and raises
:class:`~htrctl.errors.GpuError` (exit 69, not restarted) naming the node, the
cause and the remedy. :func:`uvm_state` is what ``htrctl doctor`` reports.

**For tests**: ``HTR_TEST_DEV_DIR`` and ``HTR_TEST_PROC_DIR`` stand in for
``/dev`` and ``/proc`` (plain files are enough: they are opened, not used).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import GpuError
from .units.render import PREPARE_UNIT

logger = logging.getLogger(__name__)

ENV_DEV = "HTR_TEST_DEV_DIR"
ENV_PROC = "HTR_TEST_PROC_DIR"
CTL = "nvidiactl"
UVM = "nvidia-uvm"
UVM_REMEDY = (f"load it before htrd starts: `htrctl service install` adds {PREPARE_UNIT}, which htr.service pulls in; "
              "by hand (as root): nvidia-modprobe -u -c 0 (or modprobe nvidia-uvm and create the node), "
              "then systemctl restart the htr unit")


@dataclass(frozen=True)
class NodeRoots:
    """Where ``/dev`` and ``/proc`` are (the real ones unless a test says otherwise)."""

    dev: Path = Path("/dev")
    proc: Path = Path("/proc")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> NodeRoots:
        env = os.environ if env is None else env
        return cls(dev=Path(env.get(ENV_DEV) or "/dev"), proc=Path(env.get(ENV_PROC) or "/proc"))


def char_devices(roots: NodeRoots) -> dict[str, int]:
    """The "Character devices:" section of /proc/devices: driver name -> major number."""
    try:
        text = (roots.proc / "devices").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, int] = {}
    section = None
    for line in text.splitlines():
        s = line.strip()
        if s.endswith(":"):
            section = s
            continue
        parts = s.split()
        if section == "Character devices:" and len(parts) == 2 and parts[0].isdigit():
            out[parts[1]] = int(parts[0])
    return out


def _bus_key(bus_id: str | None) -> tuple[int, ...] | None:
    """ "00000000:41:00.0" (NVML) and "0000:41:00.0" (/proc) -> the same key."""
    if not bus_id:
        return None
    try:
        return tuple(int(p, 16) for p in bus_id.replace(".", ":").split(":"))
    except ValueError:
        return None


def minor_number(gpu, roots: NodeRoots) -> int | None:
    """N of /dev/nvidiaN for *gpu* (a :class:`htrctl.gpus.GpuDevice`): NVML's answer, else the driver's
    /proc/driver/nvidia/gpus/<bus>/information; None when neither says."""
    if getattr(gpu, "minor", None) is not None:
        return int(gpu.minor)
    key = _bus_key(getattr(gpu, "pci_bus_id", None))
    gpus = roots.proc / "driver" / "nvidia" / "gpus"
    if key is None or not gpus.is_dir():
        return None
    for d in gpus.iterdir():
        if _bus_key(d.name) != key:
            continue
        try:
            m = re.search(r"^Device Minor:\s*(\d+)", (d / "information").read_text(errors="replace"), re.MULTILINE)
        except OSError:
            return None
        return int(m.group(1)) if m else None
    return None


def gpu_nodes(minor: int | None, roots: NodeRoots) -> list[Path]:
    nodes = [roots.dev / CTL]
    if minor is not None:
        nodes.append(roots.dev / f"nvidia{minor}")
    nodes.append(roots.dev / UVM)
    return nodes


def _minor_of(node: Path) -> str:
    """nvidiactl is minor 255; nvidiaN is N."""
    return "255" if node.name == CTL else node.name.removeprefix("nvidia")


def _failure(path: Path, err: OSError, roots: NodeRoots) -> GpuError:
    uvm = path.name == UVM
    loaded = UVM in char_devices(roots)
    detail = {"node": str(path), "errno": errno.errorcode.get(err.errno or 0, str(err.errno)),
              "nvidia_uvm_loaded": loaded}
    why = err.strerror or str(err)
    if err.errno == errno.ENOENT:
        if uvm and not loaded:
            return GpuError(f"{path} does not exist: the nvidia-uvm kernel module is not loaded, and CUDA cannot "
                            "start without it (this service may not load kernel modules)", remedy=UVM_REMEDY,
                            detail=detail)
        return GpuError(f"{path} does not exist: CUDA cannot use the GPU without it",
                        remedy=UVM_REMEDY if uvm else f"as root: nvidia-modprobe -c {_minor_of(path)} (or start "
                        f"{PREPARE_UNIT}), then restart htrd", detail=detail)
    if err.errno == errno.EPERM:
        return GpuError(f"opening {path} is refused ({why}): the service's device allow-list does not cover it -- "
                        "systemd resolves DeviceAllow=char-nvidia* when the unit starts, so a module loaded "
                        "afterwards (nvidia-uvm, late) stays refused",
                        remedy=f"systemctl restart the htr unit now; {PREPARE_UNIT} (installed by `htrctl service "
                        "install`) loads the modules before the unit starts at the next boot", detail=detail)
    if err.errno == errno.EACCES:
        try:
            st = path.stat()
            owner = f" (mode {oct(st.st_mode & 0o777)}, group id {st.st_gid})"
        except OSError:
            owner = ""
        return GpuError(f"no permission to open {path}{owner}: this user is not in the group that owns it",
                        remedy="add the service user to that group (htr.service: SupplementaryGroups=, set by "
                        "`htrctl service install` for video/render when they exist), or run htrd as such a user",
                        detail=detail)
    return GpuError(f"cannot open {path}: {why}", remedy="check the NVIDIA driver (nvidia-smi) and the node",
                    detail=detail)


def preflight(gpu, roots: NodeRoots | None = None) -> list[Path]:
    """Open (and close) the device nodes CUDA needs for *gpu*; raise :class:`GpuError` on the first that fails.

    Returns the nodes opened. Call it before torch is imported: afterwards CUDA has failed already.
    """
    roots = roots or NodeRoots.from_env()
    minor = minor_number(gpu, roots)
    nodes = gpu_nodes(minor, roots)
    if minor is None:
        logger.warning("the GPU's minor number is unknown: /dev/nvidiaN is not checked before CUDA starts")
    for path in nodes:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            raise _failure(path, err, roots) from None
        os.close(fd)
    logger.info("device nodes open: %s", ", ".join(str(p) for p in nodes))
    return nodes


@dataclass
class UvmState:
    loaded: bool  # nvidia-uvm registered in /proc/devices (what DeviceAllow= resolves against)
    node: bool  # /dev/nvidia-uvm exists
    major: int | None = None

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "node": self.node, "major": self.major}


def uvm_state(roots: NodeRoots | None = None) -> UvmState:
    roots = roots or NodeRoots.from_env()
    majors = char_devices(roots)
    return UvmState(loaded=UVM in majors, node=os.path.lexists(roots.dev / UVM), major=majors.get(UVM))
