"""Topology: for every GPU pair, the common ancestor (PIX/PXB/PHB/NODE/SYS or NVLink) and
NVML's P2P status per capability (read, write, nvlink, atomics, prop)."""

from __future__ import annotations

from ..nvml import P2P_CAPS
from .findings import OK, WARN, Context, Finding

# Paths that cross a PCIe host bridge or the CPU interconnect: where the driver's
# "P2P OK" has been wrong (IOMMU/ACS redirect, the incident's 2x L40S host).
RISKY = ("PHB", "NODE", "SYS")
LINK_TEXT = {
    "NVLink": "NVLink",
    "PIX": "PCIe, one switch (PIX)",
    "PXB": "PCIe, several switches (PXB)",
    "PHB": "PCIe through the host bridge (PHB)",
    "NODE": "PCIe across host bridges in one NUMA node (NODE)",
    "SYS": "PCIe across NUMA nodes (SYS)",
    "SELF": "same board (internal)",
}


def pairs_by_bus_index(ctx: Context):
    """[(i, j, PairInfo)] with i < j in PCI bus order."""
    snap = ctx.snapshot()
    if snap is None:
        return []
    devs = ctx.devices()
    by_nvml = {d.nvml_index: d.index for d in devs}
    out = []
    for p in snap.pairs:
        i, j = by_nvml.get(p.a), by_nvml.get(p.b)
        if i is None or j is None:
            continue
        out.append((min(i, j), max(i, j), p))
    return sorted(out, key=lambda t: (t[0], t[1]))


def check(ctx: Context) -> list[Finding]:
    devs = ctx.devices()
    if len(devs) < 2:
        return [Finding("topology", OK, f"{len(devs)} GPU(s): no GPU pair to connect",
                        data={"gpus": len(devs)})]
    out = []
    for i, j, p in pairs_by_bus_index(ctx):
        caps = {c: p.p2p_name(c) for c in P2P_CAPS}
        data = {"a": i, "b": j, "link": p.link, "common_ancestor": p.common_ancestor, "p2p": caps,
                "errors": p.errors}
        text = LINK_TEXT.get(p.link, p.link)
        drv = f"driver P2P read {caps['read']}, write {caps['write']}"
        if p.link in RISKY and caps["read"] == "OK":
            sev = WARN if not ctx.p2p else OK
            msg = (f"GPU {i} <-> GPU {j}: {text}; {drv} -- the driver's 'OK' is not trustworthy on this path; "
                   + ("the P2P test below decides" if ctx.p2p else "run the P2P test (without --no-p2p)"))
            out.append(Finding(f"topology.{i}-{j}", sev, msg,
                               remedy=None if ctx.p2p else "htrctl doctor --section p2p", data=data))
        else:
            if caps["read"] != "OK":
                drv += " (CUDA copies between them go through host memory: slower, but safe)"
            out.append(Finding(f"topology.{i}-{j}", OK, f"GPU {i} <-> GPU {j}: {text}; {drv}", data=data))
    return out
