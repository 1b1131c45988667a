"""Capture everything doctor reads from NVML on this host, as a replayable snapshot.

    python -m htrctl.doctor.capture > snapshot.json          # on a GPU host
    HTR_NVML_FAKE=snapshot.json htrctl doctor                 # replays it anywhere (tests)

The document holds the NVML snapshot (``nvml``: the same dataclasses
:func:`htrctl.nvml.read_host` returns), the text of ``nvidia-smi`` and
``nvidia-smi topo -m`` / ``-p2p r`` for humans, torch's build, and -- unless
``--no-p2p`` -- the real P2P probe's per-pair results (``p2p_probe``), which the
fake probe replays as bandwidth figures. Captured hosts live in
``tests/data/gpu-hosts/``. No host name, serial number or process name is recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import time

from ..errors import GpuError
from ..nvml import SNAPSHOT_SCHEMA, read_host


def _smi(*args: str, timeout: float = 15.0) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<nvidia-smi {' '.join(args)} failed: {exc}>"
    return p.stdout if p.returncode == 0 else f"<exit {p.returncode}> {p.stdout}{p.stderr}"


def capture(*, p2p: bool = True, p2p_timeout: float = 120.0) -> dict:
    from .driver import torch_build

    doc: dict = {"schema": SNAPSHOT_SCHEMA, "captured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "captured_by": "python -m htrctl.doctor.capture"}
    t0 = time.monotonic()
    try:
        snap = read_host(timeout=30.0)
    except GpuError as exc:
        doc["init_error"] = exc.message
        doc["description"] = "a host without a usable NVIDIA driver"
        return doc
    doc["nvml_read_s"] = round(time.monotonic() - t0, 3)
    nv = snap.to_dict()
    nv.pop("source", None)
    for g in nv["gpus"]:
        for p in g.get("processes", []):
            p["name"] = None
    doc["nvml"] = nv
    names = sorted({g.name or "?" for g in snap.gpus})
    doc["description"] = (f"{len(snap.gpus)}x {', '.join(names)}, driver {snap.driver_version}, "
                          f"CUDA {snap.cuda_driver_version_str}")
    doc["nvidia_smi"] = _smi()
    doc["nvidia_smi_topo_m"] = _smi("topo", "-m")
    doc["nvidia_smi_topo_p2p_r"] = _smi("topo", "-p2p", "r")
    doc["torch"] = torch_build()
    if p2p and len(snap.gpus) > 1:
        from .p2p import run_probe

        res = run_probe(timeout=p2p_timeout)
        pairs = [e for e in res["events"] if e.get("event") == "pair"]
        start = next((e for e in res["events"] if e.get("event") == "start"), {})
        doc["p2p_probe"] = {"elapsed_s": round(res["elapsed_s"], 2), "timed_out": res["timed_out"],
                            "returncode": res["returncode"], "devices": start.get("devices"),
                            "torch": start.get("torch"), "pairs": pairs,
                            "errors": [e for e in res["events"] if e.get("event") == "error"],
                            "stderr_tail": res["stderr"][-500:] if res["returncode"] else ""}
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m htrctl.doctor.capture", description=__doc__.splitlines()[0])
    ap.add_argument("--no-p2p", action="store_true", help="do not run the real P2P probe")
    ap.add_argument("--p2p-timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    doc = capture(p2p=not args.no_p2p, p2p_timeout=args.p2p_timeout)
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    return 0 if "nvml" in doc else 1


if __name__ == "__main__":
    sys.exit(main())
