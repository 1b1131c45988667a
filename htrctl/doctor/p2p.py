"""A real peer-to-peer test between every GPU pair, in a child process under a hard timeout.

The driver's P2P status (topology section) says what *should* work; this runs
:mod:`htrctl.doctor.p2p_probe` and reports what does. A copy that does not
finish in time, or that arrives as zeros or different bytes, is a failure with
:data:`~htrctl.doctor.findings.P2P_REMEDY` -- the incident's host said "P2P OK"
and hung in ``generate()``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .findings import FAIL, OK, P2P_REMEDY, WARN, Context, Finding
from .topology import pairs_by_bus_index

logger = logging.getLogger(__name__)


def run_probe(*, timeout: float, size_mib: int = 256, reps: int = 3, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the probe; returns {"events": [...], "timed_out": bool, "returncode", "stderr", "elapsed_s"}."""
    child_env = dict(os.environ if env is None else env)
    child_env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA indices = PCI bus order = htrctl.gpus indices
    child_env.pop("CUDA_VISIBLE_DEVICES", None)  # test every GPU, whatever the admin's shell hides
    child_env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "htrctl.doctor.p2p_probe", "--size-mib", str(size_mib), "--reps", str(reps)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=child_env, start_new_session=True, text=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # stuck in the driver (D state): give up on it, report what we have
            out, err = "", "the probe could not be killed (stuck in the driver)"
            for stream in (proc.stdout, proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
    events = []
    for line in (out or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                logger.debug("p2p probe: unparsable line %r", line)
    return {"events": events, "timed_out": timed_out, "returncode": proc.returncode,
            "stderr": (err or "")[-2000:], "elapsed_s": time.monotonic() - t0}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def check(ctx: Context) -> list[Finding]:
    devs = ctx.devices()
    if len(devs) < 2:
        return [Finding("p2p", OK, f"{len(devs)} GPU(s): no peer-to-peer path to test", data={"gpus": len(devs)})]
    if not ctx.p2p:
        return [Finding("p2p", OK, "skipped: the real P2P test was not run (--no-p2p)", data={"skipped": True})]
    driver_ok = {}
    for i, j, p in pairs_by_bus_index(ctx):
        driver_ok[(i, j)] = driver_ok[(j, i)] = p.p2p_name("read") == "OK"
        driver_ok.setdefault(("link", i, j), p.link)
    env = dict(ctx.env)
    res = run_probe(timeout=ctx.p2p_timeout, env=env)
    events = res["events"]
    start = next((e for e in events if e.get("event") == "start"), None)
    error = next((e for e in events if e.get("event") == "error"), None)
    summary = {"elapsed_s": round(res["elapsed_s"], 2), "timed_out": res["timed_out"],
               "returncode": res["returncode"], "timeout_s": ctx.p2p_timeout,
               "torch": (start or {}).get("torch"), "fake": (start or {}).get("fake")}
    if error and error.get("kind") == "no-torch":
        return [Finding("p2p", WARN, "the P2P test needs torch, which is not installed here",
                        remedy="run doctor in the daemon's environment (the 'model' extra), or pip install "
                        "'htrctl[model]'", data=summary)]
    if error and error.get("kind") == "no-cuda":
        return [Finding("p2p", FAIL, f"the P2P test cannot use CUDA: {error.get('message')}",
                        remedy="install a CUDA build of torch that matches the driver", data=summary)]
    if start is None:
        why = "did not start within" if res["timed_out"] else f"exited with {res['returncode']} before starting:"
        last = (res["stderr"].strip().splitlines() or [""])[-1]
        return [Finding("p2p", FAIL, f"the P2P probe {why} {ctx.p2p_timeout:g} s {last}".rstrip(),
                        remedy="check `nvidia-smi` and dmesg (Xid); " + P2P_REMEDY, data=summary)]
    # map probe indices (CUDA, PCI order) to our devices by UUID where the probe knows them
    uuid_by_probe = {d["index"]: d.get("uuid") for d in start.get("devices", [])}
    our = {d.uuid: d.index for d in devs}
    idx = {pi: our.get(u, pi) for pi, u in uuid_by_probe.items()}
    out: list[Finding] = []
    done = set()
    in_flight = None
    for e in events:
        if e.get("event") == "pair-start":
            in_flight = (e["src"], e["dst"])
        elif e.get("event") == "pair":
            in_flight = None
            a, b = idx.get(e["src"], e["src"]), idx.get(e["dst"], e["dst"])
            done.add((a, b))
            out.append(_pair_finding(a, b, e, driver_ok))
    if in_flight is not None:
        a, b = idx.get(in_flight[0], in_flight[0]), idx.get(in_flight[1], in_flight[1])
        said = " although the driver reports P2P OK" if driver_ok.get((a, b)) else ""
        what = (f"did not finish within {ctx.p2p_timeout:g} s (hung){said}" if res["timed_out"]
                else f"crashed the probe (exit {res['returncode']}){said}: "
                + ((error or {}).get("message") or (res["stderr"].strip().splitlines() or [""])[-1]))
        ctx.p2p_failed_pairs.add((min(a, b), max(a, b)))
        out.append(Finding(f"p2p.{a}-{b}", FAIL, f"GPU {a} -> GPU {b}: the peer copy {what}", remedy=P2P_REMEDY,
                           data={"src": a, "dst": b, "problem": "hang" if res["timed_out"] else "crash",
                                 "driver_p2p_ok": driver_ok.get((a, b)), **summary}))
        done.add((a, b))
    n = len(devs)
    untested = [(a, b) for a in range(n) for b in range(n) if a != b and (a, b) not in done]
    if untested and (in_flight is not None or res["timed_out"] or error):
        out.append(Finding("p2p.untested", WARN,
                           f"{len(untested)} GPU pair(s) not tested after the probe stopped: "
                           + ", ".join(f"{a}->{b}" for a, b in untested),
                           remedy="fix the failing pair first, then rerun", data={"pairs": untested}))
    elif error and not out:
        out.append(Finding("p2p", FAIL, f"the P2P probe failed: {error.get('message')}", remedy=P2P_REMEDY,
                           data=summary))
    out.insert(0, Finding("p2p", OK if not any(f.severity == FAIL for f in out) else FAIL,
                          f"P2P test: {sum(1 for f in out if f.id.startswith('p2p.') and f.severity == OK)} of "
                          f"{n * (n - 1)} ordered pairs copied correctly in {res['elapsed_s']:.1f} s",
                          remedy=P2P_REMEDY if any(f.severity == FAIL for f in out) else None, data=summary))
    ctx.p2p_results = [f.data for f in out[1:]]
    return out


def _pair_finding(a: int, b: int, e: dict, driver_ok: dict) -> Finding:
    data = {"src": a, "dst": b, "problem": e.get("problem"), "noncontig_problem": e.get("noncontig_problem"),
            "d2d_gbps": e.get("d2d_gbps"), "host_gbps": e.get("host_gbps"), "can_access_peer": e.get("can_access_peer"),
            "driver_p2p_ok": driver_ok.get((a, b)), "bytes": e.get("bytes")}
    speed = f"{e.get('d2d_gbps')} GB/s device to device"
    if e.get("host_gbps") is not None:
        speed += f" (through host memory: {e.get('host_gbps')} GB/s)"
    problem = e.get("problem") or e.get("noncontig_problem")
    if problem:
        which = "the copy" if e.get("problem") else "the non-contiguous copy"
        said = " although the driver reports P2P OK" if driver_ok.get((a, b)) else ""
        got = "only zeros" if problem == "zeros" else "different bytes than the source"
        return Finding(f"p2p.{a}-{b}", FAIL, f"GPU {a} -> GPU {b}: {which} returned {got}{said}",
                       remedy=P2P_REMEDY, data=data)
    d2d, host = e.get("d2d_gbps"), e.get("host_gbps")
    if d2d and host and d2d < 0.5 * host:
        return Finding(f"p2p.{a}-{b}", WARN, f"GPU {a} -> GPU {b}: data correct but {speed}: the peer path is "
                       "slower than going through host memory", remedy="keep the model on one GPU; " + P2P_REMEDY,
                       data=data)
    return Finding(f"p2p.{a}-{b}", OK, f"GPU {a} -> GPU {b}: data correct (also non-contiguous), {speed}", data=data)
