"""GPU enumeration and the one-GPU selection policy (no torch; NVML only).

The daemon calls :func:`select_gpu` *before* importing torch, then sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``CUDA_VISIBLE_DEVICES=<uuid>`` so the model
can only ever see that one device. Indices here are in PCI bus order -- the
order CUDA uses under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and nvidia-smi shows.

``gpu.select`` (see configs/htr.yaml):

- ``cpu``        -> ``None`` (no GPU);
- ``most-free``  -> the GPU with the most free memory;
- ``first``      -> the lowest-index GPU (with *required_bytes*: the lowest-index
  GPU that has that much free memory);
- ``N``          -> GPU number N in PCI bus order;
- ``GPU-...``    -> the GPU with that UUID (``MIG-...``: a MIG instance UUID is
  passed through unchanged when NVML lists its parent; it cannot be sized).

Absent, too small or unusable (compute mode "prohibited") raises
:class:`htrctl.errors.GpuError` (exit 69) naming the GPUs that exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import GpuError
from .nvml import GpuInfo, HostSnapshot, read_host

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class GpuDevice:
    index: int  # PCI bus order
    uuid: str
    name: str
    pci_bus_id: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    nvml_index: int = -1
    compute_mode: int | None = None
    minor: int | None = None  # N of /dev/nvidiaN (None: NVML did not say)

    def describe(self) -> str:
        return (f"{self.index}: {self.name} {self.uuid} ({self.pci_bus_id}, "
                f"{self.memory_free / GIB:.1f} of {self.memory_total / GIB:.1f} GiB free)")


def _bus_key(bus_id: str | None) -> tuple[int, ...]:
    """Sort key for "00000000:0A:00.0" (domain:bus:device.function, hex)."""
    if not bus_id:
        return (1 << 62,)
    parts = bus_id.replace(".", ":").split(":")
    try:
        return tuple(int(p, 16) for p in parts)
    except ValueError:
        return (1 << 62,)


def devices_from_snapshot(snap: HostSnapshot) -> list[GpuDevice]:
    """The snapshot's GPUs as :class:`GpuDevice`, indexed in PCI bus order."""
    ordered: list[GpuInfo] = sorted(snap.gpus, key=lambda g: (_bus_key(g.pci_bus_id), g.index))
    return [
        GpuDevice(
            index=i,
            uuid=g.uuid,
            name=g.name or "unknown GPU",
            pci_bus_id=g.pci_bus_id or "?",
            memory_total=g.memory_total or 0,
            memory_free=g.memory_free or 0,
            nvml_index=g.index,
            compute_mode=g.compute_mode,
            minor=g.minor_number,
        )
        for i, g in enumerate(ordered)
    ]


def list_gpus(*, timeout: float = 10.0) -> list[GpuDevice]:
    """The GPUs of this host in PCI bus order. Raises GpuError without a driver."""
    return devices_from_snapshot(read_host(timeout=timeout))


def _inventory(devs: list[GpuDevice]) -> str:
    if not devs:
        return "this host has no NVIDIA GPU"
    return "GPUs here: " + "; ".join(d.describe() for d in devs)


def choose_gpu(devs: list[GpuDevice], select: str, *, required_bytes: int | None = None) -> GpuDevice | None:
    """:func:`select_gpu` on an already listed set of devices (pure; no driver access)."""
    select = str(select).strip()
    if select == "cpu":
        return None
    if not devs:
        raise GpuError(f"gpu.select is '{select}' but this host has no NVIDIA GPU",
                       remedy="set gpu.select: cpu, or install the GPU and its driver")
    usable = [d for d in devs if d.compute_mode != 2]  # 2 = NVML_COMPUTEMODE_PROHIBITED
    need = f"{required_bytes / GIB:.1f} GiB" if required_bytes else ""

    def fits(d: GpuDevice) -> bool:
        return required_bytes is None or d.memory_free >= required_bytes

    chosen: GpuDevice | None
    if select in ("most-free", "first"):
        if not usable:
            raise GpuError("every GPU is in compute mode 'prohibited'",
                           remedy="nvidia-smi -c DEFAULT (as root); " + _inventory(devs))
        if select == "most-free":
            chosen = max(usable, key=lambda d: (d.memory_free, -d.index))
        else:
            chosen = next((d for d in usable if fits(d)), usable[0])
        if not fits(chosen):
            raise GpuError(
                f"no GPU has {need} free for the model (gpu.select: {select})",
                remedy="free memory on a GPU (nvidia-smi shows what uses it) or use a bigger GPU; " + _inventory(devs),
            )
        return chosen
    if select.isdigit():
        idx = int(select)
        chosen = next((d for d in devs if d.index == idx), None)
        what = f"GPU index {idx}"
    elif select.startswith("MIG-"):
        raise GpuError(f"gpu.select '{select}' is a MIG instance; htrctl sizes whole GPUs only",
                       remedy="select the GPU's UUID (GPU-...) or disable MIG; " + _inventory(devs))
    else:
        chosen = next((d for d in devs if d.uuid.lower() == select.lower()), None)
        what = f"GPU {select}"
    if chosen is None:
        raise GpuError(f"gpu.select: {what} does not exist on this host",
                       remedy="set gpu.select to one of them (htrctl doctor recommends one); " + _inventory(devs))
    if chosen.compute_mode == 2:
        raise GpuError(f"gpu.select: {what} is in compute mode 'prohibited' (no process may use it)",
                       remedy="nvidia-smi -i %s -c DEFAULT (as root), or select another GPU" % chosen.uuid)
    if not fits(chosen):
        raise GpuError(
            f"gpu.select: {what} has {chosen.memory_free / GIB:.1f} GiB free, the model needs {need}",
            remedy="select a bigger or emptier GPU (htrctl doctor recommends one); " + _inventory(devs),
        )
    return chosen


def select_gpu(select: str, *, required_bytes: int | None = None) -> GpuDevice | None:
    """Resolve ``gpu.select`` to exactly one GPU (``None`` for ``cpu``); see the module doc."""
    if str(select).strip() == "cpu":
        return None
    dev = choose_gpu(list_gpus(), select, required_bytes=required_bytes)
    logger.info("selected GPU %s", dev.describe() if dev else "cpu")
    return dev
