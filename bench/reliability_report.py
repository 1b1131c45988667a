"""Render docs/RELIABILITY.md from the reliability suite's results.

    .venv/bin/python -m pytest tests/reliability                     # writes .cache/reliability/results.json
    .venv/bin/python bench/reliability_report.py                     # -> docs/RELIABILITY.md

Every row comes from a record the suite wrote while it ran (tests/reliability/conftest.py: ``record``),
with the outcome of the test that wrote it. Nothing here is typed by hand except the headings.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / ".cache" / "reliability" / "results.json"
DEFAULT_OUT = REPO / "docs" / "RELIABILITY.md"

MARK = {"passed": "pass", "failed": "**FAIL**", "skipped": "skipped", "not run": "not run"}


def clean(value) -> str:
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    s = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "<tmp>/", s)
    s = re.sub(r"/tmp/htr-rel-[^/\s]+/", "<tmp>/", s)
    s = s.replace(str(REPO) + "/", "")
    return s.replace("|", "\\|").replace("\n", " ").strip()


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(clean(c) if c is not None else "" for c in row) + " |" for row in rows]
    return out


def render(data: dict) -> str:
    recs = data.get("records", [])
    by = collections.defaultdict(list)
    for r in recs:
        by[r["section"]].append(r)
    tests = data.get("tests", {})
    outcomes = collections.Counter(t["outcome"] for t in tests.values())
    m = data.get("machine", {})
    L: list[str] = [
        "# Reliability and security",
        "",
        "Produced by the reliability suite (`tests/reliability/`, run by CI) and rendered by",
        "`bench/reliability_report.py` from the results it wrote; every row is an observation of a real",
        "process: htrd on the demo model on the CPU, over its Unix socket, with `htrctl` as the client.",
        "",
        f"Run: {data.get('generated_at')} at commit `{data.get('commit')}`, {m.get('cpus')} CPUs "
        f"({m.get('platform')}, Python {m.get('python')}){', under CI' if m.get('ci') else ''}; "
        f"{len(tests)} tests: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) + ".",
        "",
        "Regenerate: `.venv/bin/python -m pytest tests/reliability` (add `HTR_LOAD_REQUESTS=10000` for the",
        "full load), then `.venv/bin/python bench/reliability_report.py`.",
        "",
    ]

    failed = sorted(k for k, t in tests.items() if t["outcome"] == "failed")
    if failed:
        L += ["**Failed in this run** (their rows below may be missing or partial):", ""]
        L += [f"- `{k}`" for k in failed] + [""]

    # ----------------------------------------------------------------------------------------- faults
    L += ["## Faults", "",
          "Each fault is injected into a running process; the row gives what a client saw, what the daemon did,",
          "how service came back, and the end state of an `htrctl transcribe` run over the same inputs (every",
          "output present exactly once, no temp files). Where systemd would restart the daemon",
          "(`Restart=on-failure`), the test restarts it.", ""]
    L += table(["fault", "injected", "the client saw", "observed", "recovery", "outputs", "result"],
               [[r["name"], r.get("injected"), r.get("client_saw"), r.get("observed"), r.get("recovery"),
                 r.get("outputs"), MARK.get(r["outcome"], r["outcome"])] for r in by["faults"]])
    L.append("")

    # ---------------------------------------------------------------------------------------- hostile
    hostile = by["hostile"]
    L += ["## Hostile input", "",
          f"{len(hostile)} hostile inputs, each sent to the running daemon; after each one `/v1/ready` must still",
          "answer 200. Valid images in odd pixel modes are transcribed (that is the right answer); everything",
          "else gets a 4xx with a message in the error envelope (raw malformed HTTP gets uvicorn's plain 400, or",
          "for well-formed oddities the normal answer), or, for slow clients, a closed connection or 408.", ""]
    cats = collections.OrderedDict()
    for r in hostile:
        cats.setdefault(r["category"], []).append(r)
    rows = []
    for cat, rs in cats.items():
        answers = collections.Counter(str(r.get("status") or "closed") for r in rs)
        ready = all(r.get("ready_after") for r in rs)
        ok = all(r["outcome"] == "passed" for r in rs)
        rows.append([cat, len(rs), ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
                     "yes" if ready else "NO", "pass" if ok else "**FAIL**"])
    rows.append(["**all**", len(hostile), ", ".join(f"{k}: {v}" for k, v in sorted(collections.Counter(
        str(r.get("status") or "closed") for r in hostile).items())), "", ""])
    L += table(["category", "inputs", "answers (HTTP status: count)", "ready after each", "result"], rows)
    L += ["", "<details><summary>Every hostile input and its answer</summary>", ""]
    L += table(["category", "input", "bytes", "status", "type", "message"],
               [[r["category"], r["name"], r.get("bytes"), r.get("status") or "closed", r.get("type"),
                 r.get("message")] for r in hostile])
    L += ["", "</details>", ""]

    # ----------------------------------------------------------------------------------------- memory
    L += ["## Memory per request", "",
          "A request is admitted on what its image headers declare, before a pixel is decoded: its pixels against",
          "`limits.max_request_pixels` (413) and, with every other request in flight, against",
          "`limits.max_pixels_in_flight` (503 + Retry-After); both default to a share of the host's memory at",
          "64 bytes per pixel (`htrd.budget`). Peak RSS is the daemon's `VmHWM` over its idle RSS, reset before",
          "the request; the bound is the request's (or the in-flight) pixels at 64 B/px.", ""]
    rows = []
    for r in by["memory"]:
        lim = r.get("limits", {})
        lims = "/".join(f"{lim.get(k, 0) / 1e6:.4g}" for k in ("image", "request", "in_flight"))
        if "statuses" in r:
            observed = (f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} in {r.get('seconds')} s; "
                        f"peak {r.get('peak_over_idle_mib')} MiB over idle ({r.get('idle_rss_mib')} MiB); RSS "
                        f"{r['rss'][0]['rss_mib']} -> {r['rss'][-1]['rss_mib']} MiB ({r['rss_growth_pct']:+.2f} %)")
        elif "peak_over_idle_mib" in r:
            observed = (f"{r.get('parts')} part(s), {r.get('pixels', 0) / 1e6:g} Mpx in {r.get('body_bytes')} bytes: "
                        f"peak {r['peak_over_idle_mib']} MiB over idle ({r.get('idle_rss_mib')} MiB), "
                        f"{r.get('bytes_per_pixel')} B/px, {r.get('seconds')} s; one image more: "
                        f"{r.get('one_more_image')}")
        else:
            observed = f"{r.get('status')} (Retry-After {r.get('retry_after')}): {r.get('message')}"
        rows.append([r["name"], lims, observed, f"{r['bound_mib']} MiB" if r.get("bound_mib") else "",
                     MARK.get(r["outcome"], r["outcome"])])
    L += table(["case", "limits, Mpx (image/request/in flight)", "observed", "bound", "result"], rows)
    L.append("")

    # ------------------------------------------------------------------------------------------- fuzz
    L += ["## Fuzzing", ""]
    L += table(["fuzzer", "target", "examples", "bounded to", "answers", "failures", "result"],
               [[r["tool"] + ": " + r["name"].split(": ", 1)[-1], r.get("target"), r.get("examples"),
                 f"{r.get('seconds')} s", ", ".join(f"{k}: {v}" for k, v in r.get("statuses", {}).items()),
                 r.get("failures"), MARK.get(r["outcome"], r["outcome"])] for r in by["fuzz"]])
    L.append("")

    # --------------------------------------------------------------------------------------- security
    L += ["## Security", ""]
    L += table(["property", "how it is checked", "observed", "result"],
               [[r["name"], r.get("check"), r.get("observed"), MARK.get(r["outcome"], r["outcome"])]
                for r in by["security"]])
    L.append("")

    # ------------------------------------------------------------------------------------------- load
    L += ["## Load", ""]
    for r in by["load"]:
        lat = r["latency_s"]
        L += table(["figure", "value"], [
            ["requests / concurrent clients", f"{r['requests']} / {r['concurrency']}"],
            ["answers (HTTP status: count)", ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())],
            ["lost or hung", f"{r['requests'] - sum(r['statuses'].values())} (the daemon counted "
                             f"{r['daemon_counters']['requests']} requests)"],
            ["duration / throughput", f"{r['seconds']} s / {r['throughput_rps']} requests/s"],
            ["latency p50 / p95 / p99 / max", f"{lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']} s"],
            ["daemon RSS at 1,000 answers -> at the end", f"{r['rss_first_thousand_mib']} MiB -> "
                                                          f"{r['rss_last_mib']} MiB ({r['rss_growth_pct']:+.2f} %, "
                                                          "limit +10 %)"],
            ["batches / mean batch size", f"{r['daemon_counters']['batches']} / "
                                          f"{r['daemon_counters']['images'] / max(1, r['daemon_counters']['batches']):.1f}"],
            ["daemon settings", f"batch sizes {r['config']['limits']['batch_sizes']}, queue "
                                f"{r['config']['limits']['queue_length']}, max_new_tokens "
                                f"{r['config']['generation']['max_new_tokens']}, deadline "
                                f"{r['config']['limits']['request_deadline_s']} s"],
            ["machine load (1 min) at the end", r.get("load_avg_1m")],
            ["result", MARK.get(r["outcome"], r["outcome"])],
        ])
        series = r.get("rss", [])
        step = max(1, len(series) // 10)
        L += ["", "RSS of the daemon over the run (answers: MiB): "
              + ", ".join(f"{s['answered']}: {s['rss_mib']}" for s in series[::step] + ([series[-1]] if series and
                                                                                      series[-1] not in series[::step]
                                                                                      else [])), ""]
    if not by["load"]:
        L += ["(no load run recorded)", ""]
    return "\n".join(L).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    try:
        data = json.loads(Path(a.results).read_text())
    except FileNotFoundError:
        print(f"no results at {a.results}: run `.venv/bin/python -m pytest tests/reliability` first", file=sys.stderr)
        return 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data))
    print(f"wrote {out} ({len(data.get('records', []))} records)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
