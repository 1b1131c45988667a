"""The GPU's device nodes on CPU: htrd's preflight (htrctl.devnodes) against nodes faked with files,
htrd itself exiting 69 before torch when /dev/nvidia-uvm is missing (NVML replayed from a captured
host), the chown-under-a-syscall-filter message, and htr-gpu-prepare's script with its commands
replaced by recorders (what it would run on a GPU host, with and without nvidia-modprobe)."""

from __future__ import annotations

import errno
import json
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from daemon_harness import launch
from helpers import REPO

from htrctl.devnodes import ENV_DEV, ENV_PROC, NodeRoots, _failure, minor_number, preflight, uvm_state
from htrctl.errors import ExitCode, GpuError
from htrctl.gpus import GpuDevice
from htrctl.nvml import ENV_FAKE

HOST = REPO / "tests" / "data" / "gpu-hosts" / "h100x1.json"
SCRIPT = REPO / "systemd" / "htr-gpu-prepare.sh"
BUS = "00000000:41:00.0"

DEVICES = "Character devices:\n  1 mem\n195 nvidia\n195 nvidiactl\n{uvm}\nBlock devices:\n  8 sd\n"


def fake_host(tmp_path: Path, *, uvm_loaded: bool = True, nodes=("nvidiactl", "nvidia0", "nvidia-uvm"),
              minor: int | None = 0) -> NodeRoots:
    """/dev with the named nodes as plain files, /proc/devices (and the driver's GPU info when *minor*)."""
    dev, proc = tmp_path / "dev", tmp_path / "proc"
    dev.mkdir()
    (proc / "driver" / "nvidia" / "gpus").mkdir(parents=True)
    for n in nodes:
        (dev / n).write_bytes(b"")
    (proc / "devices").write_text(DEVICES.format(uvm="508 nvidia-uvm" if uvm_loaded else ""))
    if minor is not None:
        info = proc / "driver" / "nvidia" / "gpus" / "0000:41:00.0"
        info.mkdir()
        (info / "information").write_text(f"Model: \t\t NVIDIA H100\nDevice Minor: \t {minor}\n")
    return NodeRoots(dev=dev, proc=proc)


def gpu(minor: int | None = None) -> GpuDevice:
    return GpuDevice(index=0, uuid="GPU-0", name="H100", pci_bus_id=BUS, memory_total=80, memory_free=80, minor=minor)


# --------------------------------------------------------------------------- preflight


def test_preflight_opens_ctl_the_gpu_and_uvm(tmp_path):
    roots = fake_host(tmp_path, nodes=("nvidiactl", "nvidia3", "nvidia-uvm"), minor=3)
    opened = preflight(gpu(), roots)  # no minor from NVML: the driver's /proc entry says 3
    assert [p.name for p in opened] == ["nvidiactl", "nvidia3", "nvidia-uvm"]
    assert minor_number(gpu(minor=5), roots) == 5  # NVML's answer wins


def test_missing_uvm_with_the_module_not_loaded_names_the_cause_and_the_remedy(tmp_path):
    roots = fake_host(tmp_path, uvm_loaded=False, nodes=("nvidiactl", "nvidia0"))
    with pytest.raises(GpuError) as e:
        preflight(gpu(minor=0), roots)
    err = e.value
    assert err.exit_code == ExitCode.GPU == 69
    assert "nvidia-uvm kernel module is not loaded" in err.message and str(roots.dev / "nvidia-uvm") in err.message
    assert "htr-gpu-prepare.service" in err.remedy and "nvidia-modprobe -u -c 0" in err.remedy
    assert err.detail["nvidia_uvm_loaded"] is False and err.detail["errno"] == "ENOENT"


def test_missing_gpu_node_names_its_minor(tmp_path):
    roots = fake_host(tmp_path, nodes=("nvidiactl", "nvidia-uvm"), minor=None)
    with pytest.raises(GpuError, match="nvidia2 does not exist") as e:
        preflight(gpu(minor=2), roots)
    assert "nvidia-modprobe -c 2" in e.value.remedy


def test_refusals_the_cpu_cannot_produce_are_told_apart(tmp_path):
    """EPERM is the device cgroup (a module loaded after the unit started); EACCES the node's group. Neither
    can be produced here (root, no cgroup), so the classification is fed the errors directly."""
    roots = fake_host(tmp_path)
    uvm = roots.dev / "nvidia-uvm"
    cg = _failure(uvm, PermissionError(errno.EPERM, "Operation not permitted"), roots)
    assert "device allow-list" in cg.message and "DeviceAllow=char-nvidia*" in cg.message
    assert cg.remedy.startswith("systemctl restart") and cg.exit_code == 69
    node = roots.dev / "nvidia0"
    node.chmod(0o660)
    perm = _failure(node, PermissionError(errno.EACCES, "Permission denied"), roots)
    assert "no permission to open" in perm.message and "mode 0o660" in perm.message
    assert "SupplementaryGroups=" in perm.remedy


def test_unknown_minor_still_checks_ctl_and_uvm(tmp_path):
    roots = fake_host(tmp_path, nodes=("nvidiactl",), minor=None)
    with pytest.raises(GpuError, match="nvidia-uvm"):
        preflight(gpu(minor=None), roots)


def test_uvm_state_reads_proc_devices_and_dev(tmp_path):
    roots = fake_host(tmp_path)
    assert uvm_state(roots).to_dict() == {"loaded": True, "node": True, "major": 508}
    (roots.dev / "nvidia-uvm").unlink()
    (roots.proc / "devices").write_text(DEVICES.format(uvm=""))
    assert uvm_state(roots).to_dict() == {"loaded": False, "node": False, "major": None}


def _captured_host(tmp_path: Path) -> Path:
    """The captured H100 host with its GPU on the bus the fake /proc names."""
    doc = json.loads(HOST.read_text())
    nv = doc.get("nvml", doc)
    nv["gpus"] = nv["gpus"][:1]
    nv["gpus"][0]["pci_bus_id"] = BUS
    nv["gpus"][0]["memory_free"] = nv["gpus"][0]["memory_total"]
    p = tmp_path / "host.json"
    p.write_text(json.dumps(doc))
    return p


def test_htrd_exits_69_before_torch_when_uvm_is_missing(tmp_path, demo_model_dir):
    """The whole daemon: NVML (replayed) selects the GPU, then the preflight stops it -- exit 69 with the
    remedy, instead of torch's "CUDA unknown error" and a restart loop."""
    roots = fake_host(tmp_path, uvm_loaded=False, nodes=("nvidiactl", "nvidia0"))
    env = {ENV_FAKE: str(_captured_host(tmp_path)), ENV_DEV: str(roots.dev), ENV_PROC: str(roots.proc)}
    d = launch(tmp_path, demo_model_dir, config={"gpu": {"select": "0"}, "log": {"level": "DEBUG"}}, env=env)
    code = d.wait_exit(60)
    err = d.stderr()
    assert code == ExitCode.GPU, err
    assert "nvidia-uvm kernel module is not loaded" in err and "htr-gpu-prepare.service" in err
    assert "selected GPU 0" in err  # NVML worked; the preflight stopped it before anything else
    assert "socket: listening" not in err and "loading the model" not in err
    # and with the nodes in place it gets past the preflight (then fails later: this machine has no GPU)
    (roots.dev / "nvidia-uvm").write_bytes(b"")
    (roots.proc / "devices").write_text(DEVICES.format(uvm="508 nvidia-uvm"))
    sub = tmp_path / "again"
    sub.mkdir()
    d2 = launch(sub, demo_model_dir, config={"gpu": {"select": "0"}, "log": {"level": "DEBUG"}}, env=env)
    d2.wait_exit(120)
    out = d2.stderr()
    assert "device nodes open: " in out and str(roots.dev / "nvidia-uvm") in out
    assert out.index("device nodes open: ") < out.index("device: cuda:0")  # checked before CUDA is pinned


# --------------------------------------------------------------------------- chown under a syscall filter

# seccomp: chown, fchown, lchown, fchownat -> EPERM (what SystemCallFilter=~@privileged does to them)
_CHOWN_FILTER = textwrap.dedent("""
    import ctypes, struct, sys
    sys.path[:0] = {path!r}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    ins = [(0x20, 0, 0, 0)]                                   # A = syscall number
    for nr in (92, 93, 94, 260):                              # x86-64 chown fchown lchown fchownat
        ins += [(0x15, 0, 1, nr), (0x06, 0, 0, 0x00050000 | 1)]
    ins += [(0x06, 0, 0, 0x7FFF0000)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf)))
    assert libc.prctl(38, 1, 0, 0, 0) == 0
    assert libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0
    import grp, os
    from pathlib import Path
    from htrctl.errors import ConfigError
    from htrd.sock import bind_socket
    try:
        bind_socket(Path({sock!r}), mode=0o660, group=grp.getgrgid(os.getegid()).gr_name)
    except ConfigError as exc:
        print(exc.one_line())
        sys.exit(int(exc.exit_code))
    """)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter names x86-64 system call numbers")
def test_chown_refused_by_a_syscall_filter_says_so(tmp_path):
    sock = tmp_path / "s.sock"
    code = _CHOWN_FILTER.format(path=sys.path, sock=str(sock))
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == ExitCode.CONFIG, res.stderr
    assert "system-call filter forbids chown" in res.stdout and "~@privileged" in res.stdout, res.stdout
    assert "socket.group: null" in res.stdout
    assert not sock.exists() and list(tmp_path.iterdir()) == []  # nor its temporary name


# --------------------------------------------------------------------------- htr-gpu-prepare's script


def _script_host(tmp_path: Path, *, nvidia: bool, modprobe_tool: bool, minors=(0, 1), register_uvm: bool = True):
    sysfs, procfs, devfs, bin_, log = (tmp_path / n for n in ("sys", "proc", "dev", "bin", "calls.log"))
    for d in (sysfs, procfs, devfs, bin_):
        d.mkdir()
    for i, vendor in enumerate(["0x8086", *(["0x10de"] if nvidia else [])]):
        pci = sysfs / "bus" / "pci" / "devices" / f"0000:0{i}:00.0"
        pci.mkdir(parents=True)
        (pci / "vendor").write_text(vendor + "\n")
    (procfs / "devices").write_text(DEVICES.format(uvm=""))
    for m in minors:
        g = procfs / "driver" / "nvidia" / "gpus" / f"0000:{m + 0x41:02x}:00.0"
        g.mkdir(parents=True)
        (g / "information").write_text(f"Model: \t\t NVIDIA H200\nDevice Minor: \t {m}\nIRQ: 12\n")
    # Recorders for the commands that change the system; only cat and sed are real.
    rec = f'#!/bin/sh\necho "$(basename "$0") $*" >> {log}\n'
    names = ["modprobe", "mknod"] + (["nvidia-modprobe"] if modprobe_tool else [])
    for name in names:
        extra = ""
        if name == "modprobe" and register_uvm:  # a loaded nvidia-uvm registers its major
            extra = f'if [ "$1" = nvidia-uvm ]; then echo "508 nvidia-uvm" >> {procfs}/devices; fi\n'
        (bin_ / name).write_text(rec + extra)
        (bin_ / name).chmod(0o755)
    for real in ("cat", "sed", "basename"):
        (bin_ / real).symlink_to(shutil.which(real))
    env = {"PATH": str(bin_), "SYSFS": str(sysfs), "PROCFS": str(procfs), "DEVFS": str(devfs)}
    res = subprocess.run(["/bin/sh", str(SCRIPT)], check=False, env=env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, calls, devfs


def test_prepare_script_uses_nvidia_modprobe_per_gpu_minor(tmp_path):
    res, calls, _ = _script_host(tmp_path, nvidia=True, modprobe_tool=True, minors=(0, 3))
    assert res.returncode == 0, res.stderr
    assert calls == ["nvidia-modprobe -c 255", "nvidia-modprobe -c 0", "nvidia-modprobe -c 3",
                     "nvidia-modprobe -u -c 0"]
    assert "nodes for 2 GPU(s)" in res.stdout


def test_prepare_script_falls_back_to_modprobe_and_mknod(tmp_path):
    res, calls, devfs = _script_host(tmp_path, nvidia=True, modprobe_tool=False, minors=(0, 1))
    assert res.returncode == 0, res.stderr
    assert calls == ["modprobe nvidia", f"mknod -m 666 {devfs}/nvidiactl c 195 255",
                     f"mknod -m 666 {devfs}/nvidia0 c 195 0", f"mknod -m 666 {devfs}/nvidia1 c 195 1",
                     "modprobe nvidia-uvm", f"mknod -m 666 {devfs}/nvidia-uvm c 508 0"]
    assert "nvidia-modprobe not found" in res.stdout


def test_prepare_script_does_nothing_without_an_nvidia_device(tmp_path):
    res, calls, _ = _script_host(tmp_path, nvidia=False, modprobe_tool=True)
    assert res.returncode == 0 and calls == []
    assert "no NVIDIA PCI device" in res.stdout


def test_prepare_script_fails_when_uvm_does_not_register(tmp_path):
    res, calls, _ = _script_host(tmp_path, nvidia=True, modprobe_tool=False, minors=(0,), register_uvm=False)
    assert res.returncode == 1 and "nvidia-uvm is not in" in res.stderr
    assert calls[-1] == "modprobe nvidia-uvm"
