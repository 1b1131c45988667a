"""Host: IOMMU mode, virtual machine, CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER pitfalls."""

from __future__ import annotations

import re
from pathlib import Path

from .findings import FAIL, OK, WARN, Context, Finding

_VM_VENDORS = ("qemu", "kvm", "vmware", "virtualbox", "innotek", "xen", "microsoft corporation", "amazon ec2",
               "google", "openstack", "bochs", "parallels", "cloud hypervisor", "oracle")


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def iommu_state(ctx: Context) -> dict:
    root = ctx.paths.sys_root
    units = sorted(p.name for p in (root / "class" / "iommu").glob("*")) if (root / "class" / "iommu").is_dir() else []
    types: dict[str, int] = {}
    groups = root / "kernel" / "iommu_groups"
    if groups.is_dir():
        for g in groups.iterdir():
            t = _read(g / "type")
            if t:
                types[t] = types.get(t, 0) + 1
    cmdline = _read(ctx.paths.proc_root / "cmdline") or ""
    flags = [w for w in cmdline.split() if re.match(r"^(intel_iommu|amd_iommu|iommu|iommu\.passthrough|iommu\.strict)"
                                                    r"(=|$)", w)]
    passthrough = any(w in ("iommu=pt", "iommu.passthrough=1", "amd_iommu=pt", "intel_iommu=pt") for w in flags)
    off = any(w in ("intel_iommu=off", "amd_iommu=off", "iommu=off") for w in flags)
    enabled = bool(units) or bool(set(types) - {"identity"})
    return {"enabled": enabled, "units": units, "group_types": types, "cmdline_flags": flags,
            "passthrough_flag": passthrough, "off_flag": off}


def vm_state(ctx: Context) -> dict:
    dmi = ctx.paths.sys_root / "class" / "dmi" / "id"
    vendor = _read(dmi / "sys_vendor") or ""
    product = _read(dmi / "product_name") or ""
    cpuinfo = _read(ctx.paths.proc_root / "cpuinfo") or ""
    hyper = bool(re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M))
    text = f"{vendor} {product}".lower()
    named = next((v for v in _VM_VENDORS if v in text), None)
    return {"vm": hyper or named is not None, "hypervisor_flag": hyper, "sys_vendor": vendor, "product_name": product}


def _cuda_env_findings(env: dict[str, str], where: str, fid: str, devs, *, service: bool) -> list[Finding]:
    out: list[Finding] = []
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    order = env.get("CUDA_DEVICE_ORDER")
    if order and order != "PCI_BUS_ID":
        out.append(Finding(f"{fid}.order", WARN, f"{where}: CUDA_DEVICE_ORDER={order}: CUDA numbers GPUs fastest "
                           "first, not as nvidia-smi and NVML do", remedy="use CUDA_DEVICE_ORDER=PCI_BUS_ID, or "
                           "better select GPUs by UUID"))
    if cvd is None:
        return out
    entries = [e.strip() for e in cvd.split(",") if e.strip()]
    data = {"CUDA_VISIBLE_DEVICES": cvd, "CUDA_DEVICE_ORDER": order}
    if service and len(entries) > 1:
        out.append(Finding(f"{fid}.visible", FAIL, f"{where}: CUDA_VISIBLE_DEVICES={cvd} exposes {len(entries)} GPUs "
                           "to the daemon; the model must live on one", remedy="remove it: htrd pins itself to "
                           "gpu.select (set that to one UUID); one replica per GPU with htr@.service", data=data))
    numeric = [e for e in entries if e.lstrip("-").isdigit()]
    if numeric and order != "PCI_BUS_ID" and len(devs) > 1:
        out.append(Finding(f"{fid}.visible", WARN, f"{where}: CUDA_VISIBLE_DEVICES={cvd} uses indices without "
                           "CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA's index N need not be nvidia-smi's GPU N",
                           remedy="use GPU UUIDs (nvidia-smi -L), or set CUDA_DEVICE_ORDER=PCI_BUS_ID", data=data))
    known = {d.uuid.lower() for d in devs}
    unknown = [e for e in entries if e.upper().startswith("GPU-") and devs and e.lower() not in known]
    if unknown:
        out.append(Finding(f"{fid}.visible", FAIL if service else WARN,
                           f"{where}: CUDA_VISIBLE_DEVICES names {', '.join(unknown)}, which this host does not have",
                           remedy="use a UUID from nvidia-smi -L", data=data))
    if numeric and devs and any(int(e) >= len(devs) for e in numeric):
        out.append(Finding(f"{fid}.visible", FAIL if service else WARN, f"{where}: CUDA_VISIBLE_DEVICES={cvd} names an "
                           f"index beyond the {len(devs)} GPU(s) here", remedy="use a UUID from nvidia-smi -L",
                           data=data))
    if not out:
        out.append(Finding(f"{fid}.visible", OK, f"{where}: CUDA_VISIBLE_DEVICES={cvd}", data=data))
    return out


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    devs = ctx.devices()
    multi = len(devs) > 1
    io = iommu_state(ctx)
    if not io["enabled"]:
        out.append(Finding("host.iommu", OK, "IOMMU off" + (" (kernel command line)" if io["off_flag"] else ""),
                           data=io))
    elif io["passthrough_flag"] or (io["group_types"] and set(io["group_types"]) == {"identity"}):
        out.append(Finding("host.iommu", OK, "IOMMU on, passthrough mode (identity domains): GPU DMA is not "
                           "translated", data=io))
    else:
        mode = ", ".join(f"{k}: {v} groups" for k, v in sorted(io["group_types"].items())) or "translated"
        if multi:
            out.append(Finding("host.iommu", WARN, f"IOMMU on in translated mode ({mode}): PCIe peer-to-peer "
                               "between GPUs is redirected through the IOMMU, where it can hang or return zeros "
                               "while the driver still reports P2P OK",
                               remedy="keep the model on one GPU; for multi-GPU work boot with iommu=pt "
                               "(intel_iommu=on iommu=pt, or amd_iommu=pt) and rerun doctor", data=io))
        else:
            out.append(Finding("host.iommu", OK, f"IOMMU on ({mode}); harmless with one GPU", data=io))
    vm = vm_state(ctx)
    if vm["vm"]:
        what = (vm["sys_vendor"] + " " + vm["product_name"]).strip() or "a hypervisor"
        # the P2P section (run before this one) has the last word on passed-through GPUs
        tested_ok = ctx.p2p_results is not None and not ctx.p2p_failed_pairs and all(
            r.get("problem") is None for r in ctx.p2p_results)
        if multi and tested_ok:
            out.append(Finding("host.vm", OK, f"running in a virtual machine ({what}); the P2P test passed "
                               "between its GPUs", data=vm))
            multi_vm = False
        else:
            multi_vm = True
    if vm["vm"] and multi_vm:
        out.append(Finding("host.vm", WARN if multi else OK,
                           f"running in a virtual machine ({what})" + (": GPU peer-to-peer depends on how the "
                                                                       "hypervisor passes the GPUs through" if multi
                                                                       else ""),
                           remedy="trust the P2P test, not the driver's status" if multi else None, data=vm))
    elif not vm["vm"]:
        out.append(Finding("host.vm", OK, "bare metal (no hypervisor detected)", data=vm))
    out.extend(_cuda_env_findings(ctx.env, "this shell", "host.cuda-env", devs, service=False))
    senv = ctx.service_env()
    if senv.installed:
        out.extend(_cuda_env_findings(senv.env, f"{ctx.paths.service_unit} environment", "host.service-cuda-env",
                                      devs, service=True))
    if not any(f.id.startswith("host.cuda-env") for f in out):
        out.append(Finding("host.cuda-env", OK, "CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER not set in this shell"))
    return out
