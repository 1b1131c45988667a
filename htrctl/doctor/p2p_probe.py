"""The real peer-to-peer test, run as a child process: ``python -m htrctl.doctor.p2p_probe``.

It is the only part of doctor that imports torch, and it runs under a hard
timeout in its parent (:mod:`htrctl.doctor.p2p`): a copy that hangs -- the
incident's failure -- kills this process, never doctor.

For every ordered GPU pair (src, dst) it copies a buffer device to device and a
non-contiguous view of it, checks both against the source (a result of zeros is
told apart from other mismatches), and times the device-to-device copy against
the same copy staged through pinned host memory. It prints one JSON object per
line on stdout, flushed, so the parent knows which pair was in flight when it
had to kill the probe:

    {"event": "start", "devices": [{"index", "uuid", "name"}], "torch": "...", "fake": false}
    {"event": "pair-start", "src": 0, "dst": 1}
    {"event": "pair", "src": 0, "dst": 1, "ok": true, "problem": null, "d2d_gbps": ..., ...}
    {"event": "done"}
    {"event": "error", "kind": "no-torch" | "no-cuda" | "exception", "message": "..."}

Indices are CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the parent sets it),
i.e. PCI bus order, the same as :func:`htrctl.gpus.list_gpus`.

**For tests** (``HTR_NVML_FAKE`` set): no torch; the devices are the snapshot's
GPUs, and its ``probe`` section tells a pair's copy to ``hang``, return
``zeros`` or a ``mismatch``; the check below then runs on those bytes exactly
as it does on data copied back from a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

MIB = 1024 * 1024


def emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def classify(src: bytes | memoryview, dst: bytes | memoryview) -> str | None:
    """None when *dst* equals *src*; "zeros" when *dst* is all zero; else "mismatch"."""
    if bytes(src) == bytes(dst):
        return None
    if not any(bytes(dst)):
        return "zeros"
    return "mismatch"


def _pattern(nbytes: int) -> bytes:
    # a non-zero, position-dependent pattern (so zeros and shifted copies are both caught)
    block = bytes((i * 7 + 1) % 251 + 1 for i in range(4096))
    return (block * (nbytes // len(block) + 1))[:nbytes]


# --------------------------------------------------------------------------- fake (tests)


def run_fake(snapshot_path: str, pairs: list[tuple[int, int]], size_mib: int) -> int:
    from ..gpus import devices_from_snapshot
    from ..nvml import load_fake, snapshot_from_dict

    doc = load_fake(snapshot_path)
    devs = devices_from_snapshot(snapshot_from_dict(doc, snapshot_path))
    probe = doc.get("probe") or {}
    if probe.get("hang_at_start"):
        threading.Event().wait()  # CUDA initialisation that never returns (a wedged driver)
    if probe.get("torch") is False:
        emit(event="error", kind="no-torch", message="No module named 'torch'")
        return 3
    emit(event="start", fake=True, torch=probe.get("torch_version", "fake"),
         devices=[{"index": d.index, "uuid": d.uuid, "name": d.name} for d in devs])
    behaviour = probe.get("pairs") or {}
    recorded = {(r["src"], r["dst"]): r for r in (doc.get("p2p_probe") or {}).get("pairs", [])}
    src = _pattern(min(size_mib, 4) * MIB)
    for a, b in pairs:
        emit(event="pair-start", src=a, dst=b)
        how = behaviour.get(f"{a}-{b}", behaviour.get(f"{a}->{b}", "ok"))
        if how == "hang":
            threading.Event().wait()  # a peer copy that never completes, like the incident's
        t0 = time.perf_counter()
        if how == "zeros":
            dst = bytes(len(src))
        elif how == "mismatch":
            dst = src[:-1] + bytes([src[-1] ^ 0xFF])
        else:
            dst = bytes(bytearray(src))
        elapsed = max(time.perf_counter() - t0, 1e-9)
        problem = classify(src, dst)
        rec = recorded.get((a, b), {})
        emit(event="pair", src=a, dst=b, ok=problem is None, problem=problem, noncontig_problem=problem,
             d2d_gbps=rec.get("d2d_gbps", round(len(src) / elapsed / 1e9, 2)),
             host_gbps=rec.get("host_gbps"), can_access_peer=rec.get("can_access_peer"), bytes=len(src))
    emit(event="done")
    return 0


# --------------------------------------------------------------------------- real GPUs


def run_torch(pairs: list[tuple[int, int]] | None, size_mib: int, reps: int) -> int:
    try:
        import torch
    except ImportError as exc:
        emit(event="error", kind="no-torch", message=str(exc))
        return 3
    if not torch.cuda.is_available():
        emit(event="error", kind="no-cuda", message="torch.cuda.is_available() is False "
             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return 4
    n = torch.cuda.device_count()
    devices = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        uuid = str(getattr(p, "uuid", "") or "")
        devices.append({"index": i, "uuid": uuid if uuid.startswith(("GPU-", "MIG-")) or not uuid else f"GPU-{uuid}",
                        "name": p.name})
    emit(event="start", fake=False, torch=torch.__version__, cuda=torch.version.cuda, devices=devices)
    if pairs is None:
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    elems = size_mib * MIB // 4
    cols = 1024
    for a, b in pairs:
        emit(event="pair-start", src=a, dst=b)
        da, db = torch.device("cuda", a), torch.device("cuda", b)
        # distinct, non-zero values everywhere: zeros and misplaced blocks both show
        src = torch.arange(1, elems + 1, dtype=torch.int32, device=da)
        ref = src.cpu()

        def sync() -> None:
            torch.cuda.synchronize(da)
            torch.cuda.synchronize(db)

        dst = src.to(db)  # warm-up (peer access set-up)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            dst = src.to(db)
        sync()
        d2d = time.perf_counter() - t0
        got = dst.cpu()
        problem = None if torch.equal(got, ref) else ("zeros" if not bool(got.any()) else "mismatch")
        # non-contiguous: every other column of a 2-D view
        view = src.view(-1, cols)[:, ::2]
        nc = view.to(db)
        sync()
        got_nc = nc.cpu()
        ref_nc = ref.view(-1, cols)[:, ::2]
        nc_problem = None if torch.equal(got_nc, ref_nc) else ("zeros" if not bool(got_nc.any()) else "mismatch")
        # the same bytes staged through pinned host memory
        host = torch.empty(elems, dtype=torch.int32, pin_memory=True)
        dst2 = torch.empty(elems, dtype=torch.int32, device=db)
        host.copy_(src)
        dst2.copy_(host)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            host.copy_(src)
            dst2.copy_(host)
        sync()
        staged = time.perf_counter() - t0
        nbytes = elems * 4 * reps
        emit(event="pair", src=a, dst=b, ok=problem is None and nc_problem is None, problem=problem,
             noncontig_problem=nc_problem, d2d_gbps=round(nbytes / d2d / 1e9, 2),
             host_gbps=round(nbytes / staged / 1e9, 2), can_access_peer=bool(torch.cuda.can_device_access_peer(a, b)),
             bytes=elems * 4)
        del src, dst, nc, host, dst2, ref, got, got_nc
        torch.cuda.empty_cache()
    emit(event="done")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m htrctl.doctor.p2p_probe", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="", help="'0-1,1-0' (default: every ordered pair)")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    pairs = None
    if args.pairs:
        pairs = [tuple(int(x) for x in p.split("-")) for p in args.pairs.split(",")]
    try:
        fake = os.environ.get("HTR_NVML_FAKE")
        if fake:
            if pairs is None:
                from ..gpus import devices_from_snapshot
                from ..nvml import load_fake, snapshot_from_dict

                n = len(devices_from_snapshot(snapshot_from_dict(load_fake(fake), fake)))
                pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
            return run_fake(fake, pairs, args.size_mib)
        return run_torch(pairs, args.size_mib, max(1, args.reps))
    except Exception as exc:  # reported to the parent as a finding, with the message
        emit(event="error", kind="exception", message=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
