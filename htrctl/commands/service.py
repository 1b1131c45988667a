"""``htrctl service install|uninstall|status|logs|restart``: htrd under systemd."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import emit_json, globals_of, info

service_app = typer.Typer(help="Install and manage htrd's systemd units (htr.socket, htr.service, htr@GPU).",
                          no_args_is_help=True)

_INSTANCE = typer.Option(None, "--instance", "-i", help="a replica: the GPU of htr@GPU.service (UUID or index)")


@service_app.command("install")
def install_cmd(
    ctx: typer.Context,
    enable: bool = typer.Option(False, "--enable", help="enable the socket and the service (the model loads at boot)"),
    start: bool = typer.Option(False, "--start", help="start the socket now; the first request starts the daemon"),
    replica: list[str] = typer.Option(
        [], "--replica", help="enable/start htr@GPU instead of htr (repeat: one replica per GPU, UUID or index)"
    ),
    user: str = typer.Option("htr", "--user", help="the service's system user (created when missing)"),
    group: str = typer.Option("htr", "--group", help="its group; members may use the socket"),
    htrd: Optional[Path] = typer.Option(None, "--htrd", help="the htrd executable (default: this environment's)"),
    root: Optional[Path] = typer.Option(
        None, "--root", help="write everything under this directory; no users, no systemctl (for images and tests)"
    ),
    unit_dir: Optional[Path] = typer.Option(None, "--unit-dir", help="where the units go (default /etc/systemd/system)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the rendered units and the plan; change nothing"),
    json_out: bool = typer.Option(False, "--json", help="the result as JSON"),
) -> None:
    """Render the units with this installation's paths and install them. Idempotent."""
    from ..units.installer import install

    g = globals_of(ctx)
    res = install(
        config=g.config, htrd=htrd, user=user, group=group, root=root, unit_dir=unit_dir,
        enable=enable, start=start, replicas=replica, dry_run=dry_run,
    )
    if json_out:
        data = res.to_dict()
        if dry_run:
            data["units"] = res.units
        emit_json(data)
        return
    if dry_run:
        for name, text in res.units.items():
            typer.echo(f"# ==> {res.unit_dir / name} <==")
            typer.echo(text)
    for a in res.actions:
        info(a.line(), quiet=g.quiet)
    info(res.summary())


@service_app.command("uninstall")
def uninstall_cmd(
    ctx: typer.Context,
    root: Optional[Path] = typer.Option(None, "--root", help="remove from under this directory (no systemctl)"),
    unit_dir: Optional[Path] = typer.Option(None, "--unit-dir", help="where the units are"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would happen"),
    json_out: bool = typer.Option(False, "--json", help="the result as JSON"),
) -> None:
    """Stop, disable and remove the units. Keeps the config, the state, the model and the user."""
    from ..units.installer import uninstall

    res = uninstall(root=root, unit_dir=unit_dir, dry_run=dry_run)
    if json_out:
        emit_json(res.to_dict())
        return
    for a in res.actions:
        info(a.line(), quiet=globals_of(ctx).quiet)


@service_app.command("status")
def status_cmd(
    ctx: typer.Context,
    instance: Optional[str] = _INSTANCE,
    json_out: bool = typer.Option(False, "--json", help="the result as JSON"),
) -> None:
    """The service's and the socket's state as systemd sees them (exit 3 when not running)."""
    from ..units.control import status

    st = status(instance=instance, config=globals_of(ctx).config)
    if json_out:
        emit_json(st.to_dict())
    else:
        s, k = st.service, st.socket
        typer.echo(f"service  {s.get('Id', 'htr')}: {s.get('ActiveState')} ({s.get('SubState')})"
                   f"  result={s.get('Result')}  restarts={s.get('NRestarts')}  pid={s.get('MainPID')}")
        if s.get("StatusText"):
            typer.echo(f"         status: {s['StatusText']}")
        if s.get("ExecMainStatus") not in (None, "", "0"):
            typer.echo(f"         last exit status: {s['ExecMainStatus']}")
        typer.echo(f"socket   {k.get('ActiveState')} ({k.get('SubState')})  enabled={k.get('UnitFileState')}")
        if st.config_error:
            typer.echo(f"config   {st.config_error}")
        if st.units_current is False:
            typer.echo("units    differ from this installation: run `htrctl service install`")
    raise typer.Exit(int(st.exit_code()))


@service_app.command("logs")
def logs_cmd(
    instance: Optional[str] = _INSTANCE,
    lines: int = typer.Option(100, "--lines", "-n", help="how many of the latest lines"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines"),
    since: Optional[str] = typer.Option(None, "--since", help="e.g. '10 min ago', 'today'"),
) -> None:
    """The daemon's and the socket's journal (journalctl -u)."""
    from ..units.control import logs

    raise typer.Exit(logs(instance=instance, lines=lines, follow=follow, since=since))


@service_app.command("restart")
def restart_cmd(
    instance: Optional[str] = _INSTANCE,
    no_block: bool = typer.Option(False, "--no-block", help="return at once instead of waiting for READY"),
) -> None:
    """Restart the daemon: in-flight requests finish first; new ones wait on the socket."""
    from ..units.control import restart

    st = restart(instance=instance, no_block=no_block)
    typer.echo(f"{st.service.get('ActiveState')} ({st.service.get('SubState')})"
               + (f": {st.service['StatusText']}" if st.service.get("StatusText") else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(service_app, name="service")
