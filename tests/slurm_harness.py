"""A real, private Slurm cluster of one node on this machine: munged + slurmctld + slurmd.

Everything lives in one directory (config, key, state, spool, logs, sockets) and
uses its own ports; the system's /etc/slurm and /etc/munge are not touched.
Clients find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`)::

    with SlurmCluster(tmp_dir) as c:          # waits until the node is idle (bounded polling)
        job = c.sbatch(script_text)
        c.wait_job(job, timeout=300)          # until every task has left the queue

Needs ``munged``, ``slurmctld``, ``slurmd`` and the clients from the Debian
packages ``munge slurmctld slurmd slurm-client`` (``make system-deps``), and
root (slurmd starts job steps as the submitting user).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from helpers import free_port, stop_process, wait_until

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sacct")
START_TIMEOUT_S = 60.0


def missing_binaries() -> list[str]:
    return [b for b in BINARIES[:-1] if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path, *, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # -- setup ------------------------------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(
            f"""# a private one-node cluster for the tests (tests/slurm_harness.py)
ClusterName=htrtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=300
SchedulerParameters=defer_batch
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env(),
                                            start_new_session=True)
        log.close()

    def start(self) -> SlurmCluster:
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        wait_until(lambda: self._alive("munged") and self.munge_socket.exists(), 30, "munged's socket", interval=0.2)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        wait_until(self._node_idle, START_TIMEOUT_S, "the Slurm node to be idle", interval=0.2)
        return self

    def _alive(self, name: str) -> bool:
        p = self.procs[name]
        if p.poll() is not None:
            raise AssertionError(f"{name} exited with {p.returncode}:\n{self.logs()}")
        return True

    def _node_idle(self) -> bool:
        for name in self.procs:
            self._alive(name)
        r = self.run(["scontrol", "show", "node", self.node, "-o"], check=False)
        return r.returncode == 0 and "State=IDLE" in r.stdout

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"--- {f.name} ---\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    # -- using it ---------------------------------------------------------------------------------------
    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, env=kw.pop("env", self.env()), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr}\n{self.logs()}")
        return r

    def sbatch(self, script: Path, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        r = self.run(["sbatch", "--parsable", *args, str(script)], env=env or self.env(), cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def tasks(self, job: str) -> dict[str, str]:
        """``{"<job>_<task>": state}`` of the job's tasks still known to slurmctld (MinJobAge keeps ended ones)."""
        r = self.run(["squeue", "-h", "-r", "-t", "all", "-j", job, "-o", "%i %T"], check=False)
        out = {}
        for line in r.stdout.split("\n"):
            if line.strip():
                jid, state = line.split()
                out[jid] = state
        return out

    def job_info(self, job_id: str) -> dict[str, str]:
        r = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        info = {}
        for tok in r.stdout.split():
            k, _, v = tok.partition("=")
            info[k] = v
        return info

    def wait_job(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until no task of *job* is pending or running; returns the final states."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}

        def ended():
            t = self.tasks(job)
            return t if t and not (set(t.values()) & active) else None

        try:
            return wait_until(ended, timeout, f"job {job} to end", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.tasks(job)}\n{self.logs()}") from None

    # -- teardown ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                stop_process(self.procs[name], 30, group=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
