"""``htrd``: the daemon's lifecycle.

config -> pin one GPU (before torch is imported) -> quick-verify the model
directory -> open the socket (systemd's fd 3, or bind the configured path) ->
serve HTTP (uvicorn, in a thread) while the model loads and warms up in
another thread -> ``READY=1`` -> serve -> SIGTERM: drain, exit 0.

The main thread runs the :class:`~htrd.supervisor.Supervisor` (signals,
sd_notify, watchdog). Exit codes come from :class:`htrctl.errors.ExitCode`:
78 config, 65 model, 69 GPU, 86 watchdog, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from htrctl import __version__
from htrctl.errors import ConfigError, ExitCode, GpuError, HtrError, ModelMissingError, require
from htrctl.logs import setup_logging, under_journald

from .sock import identity, open_socket

logger = logging.getLogger("htrd")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="htrd", description="The handwritten-text-recognition daemon (one GPU, Unix socket).")
    p.add_argument("--config", "-c", help="config file (default: $HTR_CONFIG, /etc/htr/htr.yaml)")
    p.add_argument("--socket", help="Unix socket path (overrides socket.path; ignored under socket activation)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                   help="overrides log.level")
    p.add_argument("--version", action="version", version=f"htrd {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console script ``htrd``. Never returns: exits with the documented code."""
    args = parse_args(argv)
    journald = under_journald()
    setup_logging(args.log_level or "INFO", journald=journald)
    logging.captureWarnings(True)  # library warnings become log lines, not raw stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub are imported: never a download
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = run(args, journald=journald)
    except HtrError as exc:
        logger.error("%s", exc.one_line())
        code = int(exc.exit_code)
    except Exception:  # noqa: BLE001 -- a bug: log the traceback, exit non-zero (systemd restarts)
        logger.exception("htrd failed")
        code = int(ExitCode.FAILURE)
    _exit(code)


def _exit(code: int) -> None:
    logger.info("exiting with code %d", code)
    logging.shutdown()
    sys.stderr.flush()
    # os._exit: a hung generate (watchdog) or a half-finished import must not keep the process alive.
    os._exit(code)


def run(args: argparse.Namespace, *, journald: bool = False) -> int:
    from htrctl.config import load_settings

    settings = load_settings(args.config)
    if args.socket:
        settings.socket.path = Path(args.socket)
    setup_logging(args.log_level or settings.log.level, journald=journald)
    logging.getLogger("PIL").setLevel(logging.INFO)  # its DEBUG lines dump image chunk names per request
    logger.info("htrd %s starting (pid %d, config %s)", __version__, os.getpid(), settings.source)

    from .faults import Faults

    try:
        faults = Faults.from_env()
    except ValueError as exc:
        raise ConfigError(str(exc), remedy="HTR_TEST_FAULTS is for tests only; unset it") from None

    gpu, device = pin_gpu(settings)
    manifest_digest = verify_model(settings)
    activated = os.environ.get("LISTEN_PID", "") == str(os.getpid()) and bool(os.environ.get("LISTEN_FDS"))
    sock = open_socket(settings)
    bound = None if activated else identity(Path(settings.socket.path))

    require("fastapi", "daemon", "htrd")
    require("uvicorn", "daemon", "htrd")
    require("prometheus_client", "daemon", "htrd")
    import uvicorn

    from .api import create_app
    from .engine import Engine
    from .heap import PauseWatch, freeze_loaded_heap
    from .metrics import Metrics
    from .runtime import Daemon
    from .server import peercred_protocol
    from .state import LOADING, READY, WARMING, DaemonState
    from .supervisor import Supervisor

    state = DaemonState()
    metrics = Metrics(settings.limits.batch_sizes)
    pauses = PauseWatch(metrics).install()
    engine = Engine(settings, device=device, faults=faults, state=state, metrics=metrics)
    daemon = Daemon(settings=settings, state=state, metrics=metrics, engine=engine, faults=faults, gpu=gpu,
                    manifest_digest=manifest_digest)
    app = create_app(daemon)
    config = uvicorn.Config(
        app,
        http=peercred_protocol(settings.limits.read_timeout_s),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="htrd-http", daemon=True)
    supervisor = Supervisor(daemon, server=server, server_thread=server_thread)
    supervisor.install_signal_handlers()  # before anything else runs: SIGTERM is always a drain
    server_thread.start()
    from .sockwatch import SocketWatch

    watch = SocketWatch(server, sock, Path(settings.socket.path), mode=settings.socket.mode,
                        group=settings.socket.group, activated=activated)
    watch.start()  # a deleted socket file is bound again

    def load() -> None:
        try:
            state.set(LOADING, "loading the model")
            engine.load(progress=state.set_detail)
            state.set(WARMING, "warming up")
            engine.warm_up(progress=state.set_detail)
            freeze_loaded_heap(metrics)  # before serving: no full collection walks the loaded model again
            pauses.serving()
            engine.start()
            if state.set(READY, None):
                supervisor.events.put(("ready", None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the supervisor, which exits with its code
            supervisor.events.put(("load_failed", exc))

    threading.Thread(target=load, name="htrd-load", daemon=True).start()
    code = supervisor.run()
    watch.stop()  # before the file goes: the watch must not bind it again
    if bound is not None and identity(Path(settings.socket.path)) == bound:
        Path(settings.socket.path).unlink(missing_ok=True)  # ours, not a successor's: leave no stale file
    return code


# -- GPU -------------------------------------------------------------------------------------------------------
def pin_gpu(settings):
    """Select the one device and pin it (CUDA_VISIBLE_DEVICES=<UUID>) before torch is imported."""
    if "torch" in sys.modules:  # pinning after torch initialised CUDA would be silently ignored
        raise GpuError("internal: torch was imported before the GPU was pinned")
    select = settings.gpu.select
    if select == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU was asked for: no GPU is touched
        logger.info("device: cpu (gpu.select: cpu)")
        return None, "cpu"
    from htrctl.doctor.placement import serving_kv_bytes
    from htrctl.gpus import select_gpu
    from htrctl.modeldir import model_footprint

    weights = model_footprint(Path(settings.model.dir), settings.model.variant)["weights_bytes"]
    required = weights + serving_kv_bytes(settings) + int(settings.gpu.min_free_headroom_gib * 1024**3)
    gpu = select_gpu(select, required_bytes=required)
    if gpu is None:
        raise GpuError(f"gpu.select '{select}' selected no GPU")
    from htrctl.devnodes import preflight

    preflight(gpu)  # the device nodes CUDA opens: a clear exit 69 now instead of "CUDA unknown error" later
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu.uuid
    logger.info("device: cuda:0 = %s (pinned with CUDA_VISIBLE_DEVICES)", gpu.describe())
    return gpu, "cuda:0"


# -- model directory ----------------------------------------------------------------------------------------------
def verify_model(settings) -> str | None:
    """Quick (or full) verification before loading; returns the manifest digest."""
    d = Path(settings.model.dir)
    mode = settings.model.verify_on_start
    if not d.is_dir():
        raise ModelMissingError(f"model directory {d} does not exist",
                                remedy=f"provision it: htrctl provision SOURCE {d} (or fix model.dir)")
    if mode == "off":
        logger.warning("model.verify_on_start is off: the directory %s is not checked", d)
        return None
    from htrctl.verify import ERROR, INFO, verify_model_dir

    report = verify_model_dir(d, quick=(mode == "quick"))
    for f in report.findings:
        if f.severity != ERROR:
            logger.log(logging.INFO if f.severity == INFO else logging.WARNING, "model directory: %s: %s (%s)",
                       f.path, f.problem, f.remedy)
    report.raise_for_problems()
    logger.info("model directory %s verified (%s, manifest %s)", d, mode, (report.manifest_digest or "none")[:12])
    return report.manifest_digest
