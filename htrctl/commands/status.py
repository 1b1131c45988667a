"""``htrctl status``: the daemon's state, model, GPU, queue, counters; the systemd unit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..units.render import SERVICE
from ._common import emit_json, globals_of


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _uptime(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _engine_line(e: dict) -> list[str]:
    """How the daemon decodes (an older htrd's status has no engine section: no line)."""
    if not e.get("generator"):
        return []
    line = f"engine:    {e['generator']} generator, {e.get('slots_occupied') or 0}/{e.get('slots')} slots decoding"
    if e.get("avg_occupied_slots") is not None:
        line += f" (average {e['avg_occupied_slots']:g})"
    if e.get("kv_cache_bytes"):
        line += f", KV cache {_size(e['kv_cache_bytes'])}"
    if e.get("decode_attention"):
        line += f", {e['decode_attention']} decode attention"
    if e.get("mlp_activation"):
        line += f", {e['mlp_activation']} MLP activation"
    if e.get("preprocess_ms_per_image") is not None:
        line += (f", preprocessing {e['preprocess_ms_per_image']:g} ms/image on {e.get('preprocess_workers')} "
                 f"{'worker processes' if e.get('preprocess_in') == 'processes' else 'workers'}")
        if e.get("preprocess_restarts"):
            line += f" (started anew {e['preprocess_restarts']}x: one died -- see htrd's log)"
    return [line]


def render(report) -> str:
    lines = []
    d = report.daemon
    if d is not None:
        gpu = d["gpu"]
        gpu_s = gpu["device"] + (f" {gpu['name']}" if gpu.get("name") else "") + (f" ({gpu['uuid']})" if gpu.get("uuid") else "")
        if gpu.get("memory_total_bytes"):
            gpu_s += f", {_size(gpu.get('memory_allocated_bytes'))} allocated of {_size(gpu['memory_total_bytes'])}"
        c = d["counters"]
        lines += [
            f"daemon:    {d['state']}" + (f" ({d['detail']})" if d.get("detail") else "")
            + f"  pid {d['pid']}, up {_uptime(d['uptime_s'])}, htrd {d['version']}",
            f"socket:    {report.socket}",
            f"model:     {d['model_dir']}" + (f" [{d['model_variant']}]" if d.get("model_variant") else ""),
            f"manifest:  sha256 {d['manifest_digest'] or '- (none)'}",
            f"gpu:       {gpu_s}",
            f"queue:     {d['queue_depth']}/{d['queue_capacity']} waiting, {d['in_flight']} in flight;"
            f" batch sizes {d['batch_sizes']}",
            *_engine_line(d.get("engine") or {}),
            f"counters:  {c['requests']} requests, {c['images']} images, {c['batches']} batches,"
            f" {c['generated_tokens']} tokens, {c['errors']} errors, {c['rejected_queue_full']} rejected (queue full),"
            f" {c['deadline_exceeded']} past deadline",
        ]
    else:
        lines += [f"daemon:    unreachable ({report.error.message})", f"socket:    {report.socket}"]
    sd = report.systemd
    if sd.get("available"):
        lines.append(
            f"systemd:   {sd['unit']}: {sd.get('ActiveState', '?')} ({sd.get('SubState', '?')}),"
            f" load {sd.get('LoadState', '?')}, restarts {sd.get('NRestarts', '?')}, main pid {sd.get('MainPID', '?')}"
        )
    else:
        lines.append(f"systemd:   {sd['unit']}: not available ({sd.get('reason')})")
    return "\n".join(lines)


def status(
    ctx: typer.Context,
    socket: Optional[str] = typer.Option(None, "--socket", "-s", help="daemon socket (default: socket.path)"),
    unit: str = typer.Option(SERVICE, "--unit", help="the systemd unit to report"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show the daemon's state, model and manifest digest, GPU, queue, counters, uptime and the unit's state.

    Exit 0 when the daemon answers, 75 when it does not (77: permission denied).
    """
    from ..client import gather_status

    sock = Path(socket) if socket else globals_of(ctx).settings().socket.path
    report = gather_status(sock, unit=unit)
    if json_out:
        emit_json(report.to_dict())
    else:
        typer.echo(render(report))
    if report.error is not None:
        raise report.error


def register(app: typer.Typer) -> None:
    app.command("status")(status)
