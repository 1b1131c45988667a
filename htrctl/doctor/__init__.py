"""``htrctl doctor``: check the machine before anything loads.

One module per family of checks (``driver``, ``topology``, ``p2p``, ``host``,
``placement``, ``model``; the section ``service`` is ``daemon.py``); each returns findings (id, severity
ok/warn/fail, message, remedy, data). :func:`run_doctor` runs the selected
sections and never raises for a broken host: a check that crashes becomes a
``fail`` finding naming it. Nothing here imports torch; the real P2P test runs
torch in a child process (:mod:`htrctl.doctor.p2p_probe`) under a hard timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from .findings import FAIL, OK, P2P_REMEDY, WARN, Context, DoctorPaths, DoctorReport, Finding
from .render import render_table

logger = logging.getLogger(__name__)

SECTIONS = ("driver", "topology", "p2p", "host", "placement", "model", "service")
ALIASES = {"gpus": "driver", "gpu": "driver", "nvml": "driver", "topo": "topology", "peer": "p2p", "daemon": "service"}
# A section's module, where its name is not the section's: "service" checks the running daemon
# (its units, socket and answers); htrctl.units installs the units, htrd's state is the daemon's own.
MODULES = {"service": "daemon"}


def normalize_sections(sections: Iterable[str] | None) -> list[str]:
    if not sections:
        return list(SECTIONS)
    wanted = []
    for s in sections:
        for part in str(s).split(","):
            name = ALIASES.get(part.strip().lower(), part.strip().lower())
            if not name:
                continue
            if name not in SECTIONS:
                from .. import errors

                raise getattr(errors, "UsageError", errors.HtrError)(f"unknown doctor section '{part}'", remedy="choose from: " + ", ".join(SECTIONS))
            if name not in wanted:
                wanted.append(name)
    return [s for s in SECTIONS if s in wanted]


def run_doctor(settings, *, sections: Iterable[str] | None = None, p2p: bool = True, p2p_timeout: float = 30.0,
               paths: DoctorPaths | None = None, env: dict[str, str] | None = None,
               nvml_timeout: float = 10.0) -> DoctorReport:
    """Run the checks of *sections* (default: all) and return the report.

    *paths* and *env* point the host/service checks elsewhere (tests); the NVML
    backend follows ``HTR_NVML_FAKE`` (see :mod:`htrctl.nvml`).
    """
    import importlib

    names = normalize_sections(sections)
    ctx = Context(settings, paths=paths, p2p=p2p, p2p_timeout=p2p_timeout, nvml_timeout=nvml_timeout, env=env)
    t0 = time.monotonic()
    findings: list[Finding] = []
    timings: dict[str, float] = {}
    for name in names:
        ts = time.monotonic()
        try:
            mod = importlib.import_module(f"{__name__}.{MODULES.get(name, name)}")
            got = mod.check(ctx)
        except Exception as exc:  # a crashing check is a finding, never a traceback
            logger.debug("doctor section %s crashed", name, exc_info=True)
            got = [Finding(f"{name}.crashed", FAIL, f"the {name} check crashed: {type(exc).__name__}: {exc}",
                           remedy="rerun with --debug and report it")]
        for f in got:
            f.section = name
        findings.extend(got)
        timings[name] = time.monotonic() - ts
    return DoctorReport(findings=findings, sections=names, duration_s=time.monotonic() - t0,
                        recommendation=ctx.recommendation, timings=timings)


__all__ = ["FAIL", "OK", "P2P_REMEDY", "SECTIONS", "WARN", "DoctorPaths", "DoctorReport", "Finding",
           "normalize_sections", "render_table", "run_doctor"]
