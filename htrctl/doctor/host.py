"""Host: IOMMU mode, virtual machine, CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER pitfalls, nvidia-uvm
(loaded, node present: the sandboxed service cannot load it), and -- when the decode step is compiled --
the C compiler, the Python headers and exec-able, writable compile caches that Triton needs."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sysconfig
from pathlib import Path

from .findings import FAIL, OK, WARN, Context, Finding
from .units import _service_lines, find_unit

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
    out.extend(_uvm_findings(ctx, devs))
    out.extend(_compile_findings(ctx))
    return out


# -- nvidia-uvm ---------------------------------------------------------------------------------------------------
def _uvm_findings(ctx: Context, devs) -> list[Finding]:
    from ..devnodes import PREPARE_UNIT, UVM_REMEDY, NodeRoots, uvm_state

    if str(ctx.settings.gpu.select) == "cpu" or not devs:
        return []  # no GPU in use (or no driver: the driver section says so)
    before = ctx.uvm_before
    now = uvm_state(NodeRoots(dev=ctx.paths.dev_root, proc=ctx.paths.proc_root))
    data = {"before_doctor": before.to_dict(), "now": now.to_dict(),
            "prepare_unit": str(find_unit(ctx.paths, PREPARE_UNIT) or "") or None}
    if before.loaded and before.node:
        return [Finding("host.nvidia-uvm", OK, f"nvidia-uvm loaded (major {before.major}), "
                        f"{ctx.paths.dev_root / 'nvidia-uvm'} present", data=data)]
    what = ("nvidia-uvm is not loaded" if not before.loaded
            else f"nvidia-uvm is loaded but {ctx.paths.dev_root / 'nvidia-uvm'} does not exist")
    if now.loaded and now.node:
        what += " (it was, before doctor's own CUDA probe loaded it through nvidia-modprobe)"
    svc_installed = ctx.service_env().installed
    if data["prepare_unit"]:
        return [Finding("host.nvidia-uvm", WARN, f"{what}; {PREPARE_UNIT} loads it before htrd starts",
                        remedy=f"check it: systemctl status {PREPARE_UNIT}", data=data)]
    return [Finding("host.nvidia-uvm", FAIL if svc_installed else WARN,
                    f"{what}: CUDA needs it, and the sandboxed service cannot load it (htrd exits 69)",
                    remedy=UVM_REMEDY, data=data)]


# -- torch.compile: compiler, headers, caches -------------------------------------------------------------------
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's PATH for system services


def _unit_directives(ctx: Context, key: str) -> list[str]:
    senv = ctx.service_env()
    values: list[str] = []
    for f in ([senv.unit_path] if senv.unit_path else []) + list(senv.dropins):
        try:
            text = Path(f).read_text(encoding="utf-8")
        except OSError:
            continue
        for k, v in _service_lines(text):
            if k == key:
                values = [] if v == "" else values + v.split()
    return values


def _specifiers(value: str) -> str:
    """The unit specifiers the cache paths use (%S state, %C cache; system units)."""
    return value.replace("%S", "/var/lib").replace("%C", "/var/cache").replace("%%", "%")


def compile_cache_dirs(ctx: Context) -> dict[str, Path | None]:
    """Where the service's inductor and triton caches go, as htrd decides (htrd.fastgen.configure_compile_cache):
    the unit's environment wins, then generation.compile_cache_dir, then torch's defaults (None)."""
    senv = ctx.service_env()
    env = senv.env if senv.installed else ctx.env
    root = ctx.settings.generation.compile_cache_dir
    out: dict[str, Path | None] = {}
    for name, var, sub in (("inductor", "TORCHINDUCTOR_CACHE_DIR", "inductor"), ("triton", "TRITON_CACHE_DIR", "triton")):
        if env.get(var):
            out[name] = Path(_specifiers(env[var]))
        else:
            out[name] = Path(root) / sub if root else None
    return out


def _nearest(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _may(path: Path, uid: int | None, gids: set[int], bits: int) -> bool:
    """Whether *uid* (None: this process) may access *path* with rwx *bits* (root always may)."""
    if uid is None:
        return os.access(path, (os.W_OK if bits & 2 else 0) | (os.X_OK if bits & 1 else 0) | os.F_OK)
    if uid == 0:
        return True
    st = path.stat()
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    return (st.st_mode >> shift) & bits == bits


def _cache_finding(ctx: Context, name: str, path: Path | None, noexec_units: list[str], uid, gids) -> Finding:
    fid = f"host.compile.cache-{name}"
    if path is None:
        return Finding(fid, OK, f"the {name} cache is torch's default (under /tmp or $HOME; not checked); "
                       "the installed unit puts it under /var/lib/htr")
    data = {"path": str(path)}
    for entry in noexec_units:
        p = Path(_specifiers(entry.lstrip("-+")))
        if path == p or p in path.parents:
            return Finding(fid, FAIL, f"the {name} cache {path} is under NoExecPaths={entry} of the unit: Triton "
                           "cannot load what it compiles (\"failed to map segment from shared object\")",
                           remedy="remove that NoExecPaths= entry (or add ExecPaths= for the cache)", data=data)
    existing = _nearest(path)
    data["checked"] = str(existing)
    try:
        noexec = bool(os.statvfs(existing).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = False
    if noexec:
        return Finding(fid, FAIL, f"the {name} cache {path} is on a noexec mount: Triton cannot load what it "
                       "compiles (\"failed to map segment from shared object\")",
                       remedy="move generation.compile_cache_dir (or the unit's cache variables) to a mount "
                       "without noexec", data=data)
    state_dirs = (Path("/var/lib/htr"), Path("/var/cache/htr"))
    if existing != path and any(path == d or d in path.parents for d in state_dirs):
        return Finding(fid, OK, f"the {name} cache {path} will be created in the unit's own directory "
                       "(writable, executable)", data=data)
    if not _may(existing, uid, gids, 0o3):
        who = f"user {ctx.service_env().user}" if uid is not None else "this user"
        return Finding(fid, FAIL, f"the {name} cache {path}: {who} cannot write to {existing}",
                       remedy="make it writable for the service user, or choose another compile_cache_dir", data=data)
    return Finding(fid, OK, f"the {name} cache {path} is writable and executable", data=data)


def python_include() -> Path:
    """Where Triton looks for Python.h (triton/runtime/build.py: the default scheme, Debian's posix_local
    read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    return Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])


def _compile_findings(ctx: Context) -> list[Finding]:
    gen = ctx.settings.generation
    if not (gen.compile and gen.fast_generator) or str(ctx.settings.gpu.select) == "cpu":
        return []  # torch.compile is not used: nothing to build
    senv = ctx.service_env()
    env = senv.env if senv.installed else ctx.env
    out: list[Finding] = []
    path = env.get("PATH") or (SERVICE_PATH if senv.installed else ctx.env.get("PATH", SERVICE_PATH))
    # Triton's own choice (triton/runtime/build.py): $CC, else gcc, else clang.
    cc = env.get("CC") or next((c for c in ("gcc", "clang") if shutil.which(c, path=path)), None)
    found = shutil.which(cc, path=path) if cc else None
    if found:
        out.append(Finding("host.compile.cc", OK, f"C compiler for Triton: {found}", data={"cc": found}))
    else:
        out.append(Finding("host.compile.cc", FAIL, "no C compiler (gcc, clang or $CC): torch.compile fails at "
                           "warm-up, Triton builds its launchers with one", remedy="install gcc (Debian/Ubuntu: "
                           "apt install gcc; RHEL: dnf install gcc), or set generation.compile: false",
                           data={"cc": env.get("CC"), "path": path}))
    include = ctx.paths.python_include or python_include()
    if (include / "Python.h").is_file():
        out.append(Finding("host.compile.headers", OK, f"Python headers: {include / 'Python.h'}",
                           data={"include": str(include)}))
    else:
        out.append(Finding("host.compile.headers", FAIL, f"no Python.h in {include}: Triton's launcher build fails "
                           "(torch.compile at warm-up)", remedy="install the headers of this Python (Debian/Ubuntu: "
                           "apt install python3-dev; RHEL: dnf install python3-devel), or set generation.compile: "
                           "false", data={"include": str(include)}))
    uid: int | None = None
    gids: set[int] = set()
    if senv.user:
        try:
            pw = pwd.getpwnam(senv.user)
            uid, gids = pw.pw_uid, {pw.pw_gid}
        except KeyError:
            uid = None
    noexec_units = _unit_directives(ctx, "NoExecPaths")
    for name, p in compile_cache_dirs(ctx).items():
        out.append(_cache_finding(ctx, name, p, noexec_units, uid, gids))
    return out
