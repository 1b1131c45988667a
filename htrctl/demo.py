"""``htrctl demo``: the main job end to end on the tiny demo model, on any machine.

1. build the demo model (cached in the work directory): a base at the root and
   a LoRA adapter in ``final_model/`` whose config names its base by the hub id
   ``Qwen/Qwen3-VL-8B-Instruct`` -- the incident's trap;
2. provision it into ``<workdir>/model`` -- the hub-id base is resolved to the
   local copy, never downloaded (``HF_HUB_OFFLINE=1`` throughout);
3. verify the provisioned directory against its manifest;
4. run ``doctor`` (on a CPU host its GPU section says plainly there is no GPU);
5. start ``htrd`` as a child process on a private socket in the work directory
   (``gpu.select: cpu``), wait until it is ready;
6. transcribe the sample images shipped in ``htrctl/data/samples`` through the
   real client, print the results and timings;
7. stop the daemon with SIGTERM and wait for its clean exit.

The demo model's weights are random: the text it prints is noise. The demo
proves the pipeline, not the recognition.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DemoError, HtrError

logger = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
HONEST_LINE = (
    "NOTE: the demo model's weights are random, so the text above is noise. "
    "The demo proves the pipeline (provision, verify, doctor, serve, transcribe), not the recognition."
)
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes; keep a margin


def _terminate(proc: subprocess.Popen) -> bool:
    """SIGTERM a running *proc* and wait for its exit; False when it had to be killed after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "htrctl" / "demo"


def _htrd_command() -> list[str]:
    exe = Path(sys.executable).parent / "htrd"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from htrd.app import main; sys.exit(main())"]


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class Demo:
    def __init__(self, workdir: Path | None, *, say: Callable[[str], None]) -> None:
        self.workdir = Path(workdir) if workdir else default_workdir()
        self.say = say
        self.report: dict[str, Any] = {"workdir": str(self.workdir), "steps": {}}
        self._t0 = time.monotonic()
        self._tmp_sock_dir: str | None = None

    def _step(self, name: str, t: float, **data: Any) -> None:
        data["seconds"] = round(time.monotonic() - t, 3)
        self.report["steps"][name] = data

    # -- 1 ---------------------------------------------------------------------------------------
    def build(self) -> tuple[Path, Path]:
        """The demo model, then the incident's situation: the adapter alone arrives from the
        workstation (``incoming/final_model``); this server has a copy of the base (``local-base``)."""
        from .demo_model import ADAPTER_DIRNAME, build_demo_model

        t = time.monotonic()
        built = self.workdir / "demo-model"
        cached = (built / ".htr-demo-version").is_file()
        self.say(f"[1/7] demo model: {'cached' if cached else 'building'} at {built} (tiny Qwen3-VL + LoRA)")
        with warnings.catch_warnings():  # the builder's library chatter is not the demo's output
            warnings.simplefilter("ignore", FutureWarning)
            try:
                from transformers.utils import logging as tf_logging

                tf_logging.disable_progress_bar()
            except ImportError:
                pass
            build_demo_model(built)
        incoming, base = self.workdir / "incoming", self.workdir / "local-base"
        for d in (incoming, base):
            shutil.rmtree(d, ignore_errors=True)
        _link_tree(built / ADAPTER_DIRNAME, incoming / ADAPTER_DIRNAME)
        _link_tree(built, base, skip=(ADAPTER_DIRNAME, ".htr-demo-version"))
        cfg = json.loads((incoming / ADAPTER_DIRNAME / "adapter_config.json").read_text())
        hub_id = cfg.get("base_model_name_or_path")
        self.say(f"      as in the incident, only the adapter arrived: {incoming}/{ADAPTER_DIRNAME}/")
        self.say(f"      its adapter_config.json names the base by hub id {hub_id!r}: a plain from_pretrained() "
                 "would start downloading it (17 GB for the real model)")
        self._step("build", t, demo_model=str(built), cached=cached, incoming=str(incoming),
                   local_base=str(base), adapter_base=hub_id)
        return incoming, base

    # -- 2 ---------------------------------------------------------------------------------------
    def provision(self, incoming: Path, base: Path) -> Path:
        from .demo_model import ADAPTER_DIRNAME
        from .provision import provision

        t = time.monotonic()
        dest = self.workdir / "model"
        self.say(f"[2/7] provision {incoming} -> {dest} (downloads not allowed, HF_HUB_OFFLINE=1)")
        trap: str | None = None
        try:  # without a local base: a named error at once, never a download
            provision(str(incoming), str(self.workdir / "model-without-base"), dry_run=True, progress=False)
            trap = None
        except HtrError as exc:
            trap = exc.one_line()
            self.say(f"      without --base: refused at once, nothing downloaded: {exc.message}")
        result = provision(str(incoming), str(dest), base=str(base), allow_download=False, progress=False)
        res = result.to_dict()
        cfg = json.loads((dest / ADAPTER_DIRNAME / "adapter_config.json").read_text())
        hub_id = cfg.get("base_model_name_or_path")
        self.say(f"      with --base {base}: the hub id {hub_id!r} resolved to the local copy {result.base}; "
                 f"0 bytes downloaded")
        self.say(f"      {result.summary()}")
        self._step("provision", t, dest=str(dest), hub_id=hub_id, resolved_base=result.base,
                   without_base_error=trap, result=res)
        return dest

    # -- 3 ---------------------------------------------------------------------------------------
    def verify(self, dest: Path) -> str | None:
        from .verify import verify_model_dir

        t = time.monotonic()
        rep = verify_model_dir(dest)
        rep.raise_for_problems()
        digest = rep.manifest_digest
        self.say(f"[3/7] verify: ok, every file matches htr-manifest.json (sha256 {(digest or '-')[:16]}…)")
        self._step("verify", t, ok=rep.ok, manifest_digest=digest)
        return digest

    # -- 4 ---------------------------------------------------------------------------------------
    def doctor(self, settings) -> None:
        from .doctor import run_doctor

        t = time.monotonic()
        self.say("[4/7] doctor:")
        # The service section is left out: the demo runs htrd as its own child, not under systemd.
        from .doctor import SECTIONS

        rep = run_doctor(settings, sections=[s for s in SECTIONS if s != "service"], p2p=False)
        data = rep.to_dict()
        try:
            from .doctor.render import render_table

            text = render_table(rep, width=110)
        except ImportError:
            text = "\n".join(f"{f.severity} {f.id}: {f.message}" for f in rep.findings)
        for line in text.splitlines():
            self.say(f"      {line}")
        self._step("doctor", t, exit_code=int(getattr(rep, "exit_code", 0)), report=data)

    # -- 5 ---------------------------------------------------------------------------------------
    def _socket_path(self) -> Path:
        sock = self.workdir / "run" / "htr.sock"
        if len(str(sock)) > _SUN_PATH_MAX:  # too long for a Unix socket: a private dir in /tmp
            self._tmp_sock_dir = tempfile.mkdtemp(prefix="htr-demo-")
            sock = Path(self._tmp_sock_dir) / "htr.sock"
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return sock

    def write_config(self, dest: Path) -> tuple[Path, Path]:
        sock = self._socket_path()
        cfg = self.workdir / "htr-demo.yaml"
        cfg.write_text(
            "# written by `htrctl demo`: the demo model on CPU, a private socket\n"
            f"model: {{dir: {json.dumps(str(dest))}, dtype: float32, verify_on_start: quick}}\n"
            "gpu: {select: cpu}\n"
            f"socket: {{path: {json.dumps(str(sock))}, group: null, mode: 0o600}}\n"
            "limits: {batch_sizes: [1, 2, 4], queue_length: 64, request_deadline_s: 120}\n"
            "generation: {max_new_tokens: 24}\n"
            "log: {level: INFO}\n"
        )
        return cfg, sock

    def start_daemon(self, cfg: Path) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / "htrd.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HTR_") or k == "HTR_TEST_FAULTS"}
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
        cmd = [*_htrd_command(), "--config", str(cfg)]
        self.say(f"[5/7] start htrd (foreground child, CPU): {' '.join(cmd)}  (log: {log})")
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env)
        return proc, log

    def wait_ready(self, proc: subprocess.Popen, sock: Path, log: Path) -> float:
        from .client import HtrClient
        from .errors import DaemonError, DaemonPermissionError

        t = time.monotonic()
        deadline = t + READY_TIMEOUT_S
        last = None
        with HtrClient(sock, timeout=10.0) as client:
            while True:
                if proc.poll() is not None:
                    raise DemoError(
                        f"htrd exited with code {proc.returncode} before it was ready",
                        remedy=f"see its log {log}:\n{_log_tail(log)}",
                    )
                try:
                    client.wait_ready(1.0, on_state=lambda s: None)
                    break
                except DaemonPermissionError:
                    raise
                except DaemonError as exc:
                    state = (exc.detail or {}).get("state") if isinstance(exc.detail, dict) else None
                    state = state or "starting (no socket yet)"
                    if state != last:
                        self.say(f"      state: {state}")
                        last = state
                if time.monotonic() > deadline:
                    raise DemoError(f"htrd not ready after {READY_TIMEOUT_S:g} s", remedy=f"see its log {log}")
            status = client.status()
        secs = time.monotonic() - t
        self.say(f"      ready in {secs:.1f} s: pid {status.pid}, device {status.gpu.device}, "
                 f"variant {status.model_variant}, manifest sha256 {(status.manifest_digest or '-')[:16]}…")
        self._step("serve", t, pid=status.pid, socket=str(sock), status=status.model_dump(mode="json"))
        return secs

    # -- 6 ---------------------------------------------------------------------------------------
    def transcribe(self, sock: Path) -> dict:
        from .transcribe import TranscribeOptions, Transcriber

        t = time.monotonic()
        self.say(f"[6/7] transcribe {SAMPLES_DIR} through the client (htrctl transcribe):")
        opts = TranscribeOptions(
            inputs=[str(SAMPLES_DIR)], sockets=[sock], fmt="json", concurrency=4, timeout=120.0,
            retry_for=10.0, progress=False, quiet=True,
        )
        job = Transcriber(opts, stdout=io.StringIO(), stderr=sys.stderr, collect=True)
        summary = job.run()
        for rec in summary.results:
            name = Path(rec["input"]).name
            if "error" in rec:
                self.say(f"      {name:<14} ERROR {rec['error']['message']}")
                continue
            for p in rec["pages"]:
                tm = p["timings"]
                text = p["text"].replace("\n", " ")
                text = text if len(text) <= 40 else text[:39] + "…"
                self.say(
                    f"      {name:<14} p{p['page']}  {text!r:<44} {p['tokens']:>3} tok  batch {p['batch_size']}  "
                    f"generate {tm['generate_ms']:.0f} ms  total {tm['total_ms']:.0f} ms  (client {rec['client_ms']:.0f} ms)"
                )
        self.say(f"      {summary.line()}")
        self.say(HONEST_LINE)
        if summary.failed or summary.not_done:
            raise DemoError(f"{summary.failed + summary.not_done} sample(s) failed to transcribe",
                            remedy="see the lines above and the daemon's log")
        self._step("transcribe", t, summary=summary.to_dict(), results=summary.results)
        return summary.to_dict()

    # -- 7 ---------------------------------------------------------------------------------------
    def stop(self, proc: subprocess.Popen, log: Path) -> int:
        t = time.monotonic()
        if not _terminate(proc):
            raise DemoError(f"htrd did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM (killed)",
                            remedy=f"see its log {log}")
        self.say(f"[7/7] stopped htrd (SIGTERM): exit code {proc.returncode} in {time.monotonic() - t:.1f} s")
        self._step("stop", t, exit_code=proc.returncode)
        if proc.returncode != 0:
            raise DemoError(f"htrd exited with code {proc.returncode} on SIGTERM", remedy=f"see its log {log}")
        return proc.returncode

    def run(self) -> dict[str, Any]:
        from .config import load_settings

        os.environ["HF_HUB_OFFLINE"] = "1"  # provably no download in any step
        self.workdir.mkdir(parents=True, exist_ok=True)
        incoming, base = self.build()
        dest = self.provision(incoming, base)
        self.verify(dest)
        cfg, sock = self.write_config(dest)
        settings = load_settings(cfg, env={})
        self.doctor(settings)
        proc, log = self.start_daemon(cfg)
        try:
            self.wait_ready(proc, sock, log)
            self.transcribe(sock)
            self.stop(proc, log)
        finally:
            _terminate(proc)  # after an error or Ctrl-C above: never leave the child behind
            if self._tmp_sock_dir:
                shutil.rmtree(self._tmp_sock_dir, ignore_errors=True)
        total = time.monotonic() - self._t0
        self.report["seconds"] = round(total, 3)
        self.report["ok"] = True
        self.say(f"demo finished in {total:.1f} s")
        return self.report


def _link_tree(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Hard-link (or copy across file systems) *src* into *dst*, leaving out top-level *skip* names."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if rel.parts[0] in skip or not p.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def run_demo(workdir: Path | None = None, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns a JSON-able report."""
    return Demo(workdir, say=say).run()
