"""The human-readable report: grouped by section, one line per finding, remedies indented."""

from __future__ import annotations

import textwrap

from .findings import FAIL, OK, WARN, DoctorReport

_MARK = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}
# ANSI SGR colours of the marks and the verdict (only when the caller asks: a terminal, no NO_COLOR).
_COLOUR = {OK: "32", WARN: "33;1", FAIL: "31;1"}


def _paint(text: str, severity: str, color: bool) -> str:
    return f"\033[{_COLOUR[severity]}m{text}\033[0m" if color else text
TITLES = {"driver": "Driver and GPUs", "topology": "Topology", "p2p": "Peer-to-peer test", "host": "Host",
          "placement": "Placement", "model": "Model", "service": "Service"}


def render_table(report: DoctorReport, *, width: int = 100, verbose: bool = False, color: bool = False) -> str:
    """The report as text. Without *verbose*, ok findings show their message only; *color* for a terminal."""
    lines: list[str] = []
    for section in report.sections:
        fs = [f for f in report.findings if f.section == section]
        lines.append(f"{TITLES.get(section, section)}  ({report.timings.get(section, 0.0):.2f} s)")
        for f in fs:
            head = f"  {_MARK[f.severity]}  {f.id:<26} "
            body = textwrap.wrap(f.message, width=max(40, width - len(head)), break_on_hyphens=False) or [""]
            lines.append(f"  {_paint(_MARK[f.severity], f.severity, color)}  {f.id:<26} " + body[0])
            lines.extend(" " * len(head) + b for b in body[1:])
            if f.remedy and (f.severity != OK or verbose):
                for i, b in enumerate(textwrap.wrap(f.remedy, width=max(40, width - len(head) - 3), break_on_hyphens=False)):
                    lines.append(" " * len(head) + ("-> " if i == 0 else "   ") + b)
        lines.append("")
    c = {s: report.count(s) for s in (OK, WARN, FAIL)}
    verdict = {OK: "all checks passed", WARN: "warnings", FAIL: "FAILED"}[report.worst]
    lines.append(f"{_paint(verdict, report.worst, color)}: {c[OK]} ok, {c[WARN]} warning(s), {c[FAIL]} failure(s) in {report.duration_s:.1f} s "
                 f"(exit {report.exit_code})")
    if report.recommendation:
        lines.append(f"recommended GPU: {report.recommendation['uuid']} (gpu.select; --write-config writes it)")
    return "\n".join(lines) + "\n"
