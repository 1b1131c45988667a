"""htrd inside a batch job (``htrctl run-job``): no systemd, no persistent service.

:class:`JobDaemons` starts one ``htrd`` per GPU the job was granted (one, on
the CPU, when ``gpu.select: cpu``) in the foreground, each with its socket in a
private directory under the job's temporary directory (``$TMPDIR``, which
Slurm's ``job_container/tmpfs`` makes per-job), waits until every one is
ready, and on leaving sends SIGTERM and waits for the drain (SIGKILL past
``stop_timeout``). The children die with this process (``PR_SET_PDEATHSIG``):
a killed job never leaves a daemon holding a GPU.

The GPU comes from what the scheduler granted, never from ``gpu.select``'s
policy: ``CUDA_VISIBLE_DEVICES`` (or ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS``)
is resolved to GPU UUIDs (:func:`resolve_granted`) and handed to each htrd as
``HTR_GPU__SELECT=<uuid>``. Inside a Slurm job that was granted no GPU, a
config that asks for one is an error (the job would otherwise take whatever
GPU of the node looks free -- another job's).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .client import HtrClient
from .errors import (
    ConfigError,
    DaemonError,
    DaemonPermissionError,
    DaemonUnavailableError,
    ExitCode,
    GpuError,
    ModelError,
)

logger = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 600.0
_SOCKET_MAX = 100  # AF_UNIX paths are at most 107 bytes
_NO_DEVICES = ("", "NoDevFiles", "-1")
_EXIT_ERRORS = {int(ExitCode.CONFIG): ConfigError, int(ExitCode.MODEL): ModelError, int(ExitCode.GPU): GpuError}
_SCRUB = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


def granted_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs the scheduler gave this job, as it names them (indices or UUIDs); [] for none."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL"):
        raw = env.get(name)
        if raw is None:
            continue
        if raw.strip() in _NO_DEVICES:
            return []
        return [x.strip() for x in raw.split(",") if x.strip()]
    return []


def resolve_granted(granted: Sequence[str], devs) -> list[str]:
    """Granted GPU names -> UUIDs, given the :class:`~htrctl.gpus.GpuDevice` list this process sees.

    UUIDs pass through. Indices: when the job sees exactly its granted GPUs
    (Slurm's ``ConstrainDevices=yes``), those are the ones; otherwise an index
    is the GPU's position in PCI bus order (the order ``gres.conf``'s
    ``AutoDetect=nvml`` and ``nvidia-smi`` use).
    """
    if all(g.upper().startswith(("GPU-", "MIG-")) for g in granted):
        return list(granted)
    if len(devs) == len(granted):
        return [d.uuid for d in devs]
    out = []
    for g in granted:
        if g.upper().startswith(("GPU-", "MIG-")):
            out.append(g)
            continue
        if not g.isdigit() or int(g) >= len(devs):
            raise GpuError(f"the job was granted GPU {g!r}, which this node does not list",
                           remedy="check the node's gres.conf; GPUs here: "
                                  + ", ".join(f"{d.index}: {d.uuid}" for d in devs))
        out.append(devs[int(g)].uuid)
    return out


def job_gpu_selects(config_select: str, env: Mapping[str, str] | None = None, *, list_gpus=None) -> list[str]:
    """One ``gpu.select`` value per htrd to start: ``["cpu"]``, the granted GPUs' UUIDs, or the config's."""
    env = os.environ if env is None else env
    if str(config_select).strip() == "cpu":
        return ["cpu"]
    granted = granted_gpus(env)
    if not granted:
        if env.get("SLURM_JOB_ID"):
            raise GpuError(
                f"this Slurm job was granted no GPU, and gpu.select is '{config_select}'",
                remedy="submit with --gres=gpu:1 (htrctl slurm script does), or set gpu.select: cpu",
            )
        return [config_select]
    if list_gpus is None:
        from .gpus import list_gpus
    return resolve_granted(granted, list_gpus())


def _job_tmpdir(env: Mapping[str, str]) -> Path:
    """A fresh private (0700) directory for the sockets, under the job's temp dir when the path fits."""
    for base in (env.get("TMPDIR"), "/tmp"):
        if base and os.path.isdir(base) and len(os.fsencode(base)) < _SOCKET_MAX - 40:
            return Path(tempfile.mkdtemp(prefix="htr-job-", dir=base))
    return Path(tempfile.mkdtemp(prefix="htr-job-"))


def die_with_parent() -> None:  # pragma: no cover -- runs in the child between fork and exec
    """``preexec_fn``: the child gets SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class JobDaemons:
    """The job's htrd processes (see the module docstring). A context manager: ``with JobDaemons(...) as sockets:``."""

    def __init__(self, *, config: Path | None, gpu_select: str, drain_timeout_s: float,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S, env: Mapping[str, str] | None = None,
                 htrd: Sequence[str] | None = None, log_level: str | None = None,
                 note=None) -> None:
        self.config = config
        self.env = dict(os.environ if env is None else env)
        self.selects = job_gpu_selects(gpu_select, self.env)
        self.start_timeout = start_timeout
        self.stop_timeout = drain_timeout_s + 15.0
        self.htrd = list(htrd or [sys.executable, "-m", "htrd"])
        self.log_level = log_level
        self.note = note or (lambda msg: sys.stderr.write(msg + "\n"))
        self.dir: Path | None = None
        self.procs: list[subprocess.Popen] = []
        self.sockets: list[Path] = []
        self._stop = threading.Event()

    # -- start ----------------------------------------------------------------------------------------------
    def start(self) -> list[Path]:
        self.dir = _job_tmpdir(self.env)
        for i, select in enumerate(self.selects):
            sock = self.dir / f"htrd-{i}.sock"
            env = {k: v for k, v in self.env.items() if k not in _SCRUB}
            env.update({"HTR_GPU__SELECT": select, "HTR_SOCKET__GROUP": "null", "HTR_SOCKET__MODE": "0o600",
                        "PYTHONUNBUFFERED": "1"})
            argv = [*self.htrd, "--socket", str(sock)]
            if self.config is not None:
                argv += ["--config", str(self.config)]
            if self.log_level:
                argv += ["--log-level", self.log_level]
            self.note(f"htrctl: starting htrd on {select if select == 'cpu' else 'GPU ' + select} (socket {sock})")
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent))
            self.sockets.append(sock)
        t0 = time.monotonic()
        for proc, sock in zip(self.procs, self.sockets):
            self._wait_ready(proc, sock, t0 + self.start_timeout)
        self.note(f"htrctl: {len(self.procs)} htrd ready in {time.monotonic() - t0:.1f} s")
        return list(self.sockets)

    def _wait_ready(self, proc: subprocess.Popen, sock: Path, deadline: float) -> None:
        with HtrClient(sock, timeout=10.0) as client:
            while True:
                rc = proc.poll()
                if rc is not None:
                    cls = _EXIT_ERRORS.get(rc, DaemonUnavailableError)
                    raise cls(f"htrd exited with code {rc} before it was ready", remedy="see its log above")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonUnavailableError(f"htrd was not ready within {self.start_timeout:g} s",
                                                 remedy="raise --start-timeout, or see its log above")
                try:
                    client.wait_ready(min(left, 2.0), stop=self._stop)
                    return
                except DaemonPermissionError:
                    raise
                except DaemonError:
                    continue

    # -- stop -------------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop waiting for readiness (a signal handler may call it)."""
        self._stop.set()

    def stop(self) -> list[int]:
        """SIGTERM every htrd, wait for its drain; SIGKILL past the timeout. Returns the exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        deadline = time.monotonic() + self.stop_timeout
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                logger.warning("htrd (pid %d) did not stop within %.0f s; killing it", p.pid, self.stop_timeout)
                p.kill()
                codes.append(p.wait())
        if self.dir is not None:
            for s in self.sockets:
                s.unlink(missing_ok=True)
            try:
                self.dir.rmdir()
            except OSError:
                pass
        return codes

    def __enter__(self) -> list[Path]:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        codes = self.stop()
        bad = [c for c in codes if c not in (0, -signal.SIGTERM)]
        if bad:
            self.note(f"htrctl: warning: htrd exited with {', '.join(map(str, bad))}")


def run_job(transcribe, *, config: Path | None, gpu_select: str, drain_timeout_s: float,
            start_timeout: float = DEFAULT_START_TIMEOUT_S, log_level: str | None = None, note=None) -> int:
    """Start the job's daemons, call ``transcribe(sockets) -> exit code``, stop them. Returns that code.

    SIGTERM while the daemons start (Slurm cancelling or requeueing the task) stops the wait
    (exit 130); during the transcription the transcriber handles it (only complete outputs remain).
    """
    daemons = JobDaemons(config=config, gpu_select=gpu_select, drain_timeout_s=drain_timeout_s,
                         start_timeout=start_timeout, log_level=log_level, note=note)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, lambda *_: daemons.interrupt())
    try:
        with daemons as sockets:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
                old = None
            return transcribe(sockets)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

