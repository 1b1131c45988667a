"""The section "service": the running daemon as a user meets it -- units installed/enabled/active
(when systemd runs), the socket's owner, group and mode, readiness within a timeout, and whether
what the daemon reports (model digest, GPU UUID, model dir) matches the configuration."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import stat
from pathlib import Path

from .. import systemd
from ..errors import ServiceError
from .findings import FAIL, OK, WARN, Context, Finding
from .units import find_unit, read_service_environment

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 3.0
SYSTEMCTL_TIMEOUT_S = 3.0


def _systemctl(ctx: Context, *args: str) -> tuple[int, str] | None:
    """(exit status, output) of systemctl; None where systemd does not run here."""
    exe = ctx.paths.systemctl and shutil.which(ctx.paths.systemctl)
    if not exe or not systemd.booted(ctx.paths.systemd_booted_marker):
        return None
    try:
        p = systemd.systemctl(*args, check=False, timeout=SYSTEMCTL_TIMEOUT_S, exe=exe,
                              marker=ctx.paths.systemd_booted_marker)
    except ServiceError as exc:
        return (-1, exc.message)
    return p.returncode, (p.stdout or p.stderr).strip()


def _units(ctx: Context) -> list[Finding]:
    svc, sock = ctx.paths.service_unit, ctx.paths.socket_unit
    svc_path, sock_path = find_unit(ctx.paths, svc), find_unit(ctx.paths, sock)
    if svc_path is None:
        return [Finding("service.units", WARN, f"{svc} is not installed",
                        remedy="htrctl service install (then systemctl enable --now htr.socket)")]
    data = {"service": str(svc_path), "socket": str(sock_path) if sock_path else None}
    enabled = _systemctl(ctx, "is-enabled", svc, sock)
    if enabled is None:
        return [Finding("service.units", OK, f"{svc} installed at {svc_path}; systemd is not running here, "
                        "so enabled/active were not checked", data=data)]
    active = _systemctl(ctx, "is-active", svc, sock) or (-1, "")
    states_en = enabled[1].split()
    states_ac = active[1].split()
    data.update({"enabled": states_en, "active": states_ac})
    svc_active = states_ac[0] if states_ac else "unknown"
    sock_active = states_ac[1] if len(states_ac) > 1 else "unknown"
    if svc_active == "failed":
        return [Finding("service.units", FAIL, f"{svc} has failed", remedy=f"journalctl -u {svc} -n 50; "
                        "fix what it says, then systemctl restart " + svc, data=data)]
    if svc_active != "active" and sock_active != "active":
        return [Finding("service.units", WARN, f"{svc} is {svc_active} and {sock} is {sock_active}: nothing serves",
                        remedy=f"systemctl enable --now {sock}", data=data)]
    return [Finding("service.units", OK, f"{svc}: {svc_active} ({'/'.join(states_en)}); {sock}: {sock_active}",
                    data=data)]


def socket_path(ctx: Context) -> Path:
    senv = ctx.service_env()
    override = senv.env.get("HTR_SOCKET__PATH") if senv.installed else None
    return Path(override) if override else Path(ctx.settings.socket.path)


def _expected_owner(ctx: Context) -> tuple[str | None, str | None]:
    """(user, group) the socket should have: from htr.socket's SocketUser/Group, else the config."""
    sock_unit = find_unit(ctx.paths, ctx.paths.socket_unit)
    user = group = None
    if sock_unit is not None:
        try:
            for line in sock_unit.read_text(encoding="utf-8").splitlines():
                k, _, v = line.strip().partition("=")
                if k == "SocketUser":
                    user = v.strip() or None
                elif k == "SocketGroup":
                    group = v.strip() or None
        except OSError:
            pass
    if group is None or "@" in group:
        group = ctx.settings.socket.group
    if user and "@" in user:
        user = None
    return user, group


def _name(fn, ident: int) -> str:
    try:
        return fn(ident)[0]
    except KeyError:
        return str(ident)


def _socket(ctx: Context, path: Path) -> list[Finding]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Finding("service.socket", FAIL, f"socket {path} does not exist: the daemon is not listening",
                        remedy="systemctl enable --now htr.socket (or start htrd)", data={"path": str(path)})]
    except PermissionError:
        return [Finding("service.socket", WARN, f"socket {path}: permission denied to look at it",
                        remedy="run doctor as root or as a member of the socket's group", data={"path": str(path)})]
    if not stat.S_ISSOCK(st.st_mode):
        return [Finding("service.socket", FAIL, f"{path} exists but is not a socket",
                        remedy=f"remove it (rm {path}) and restart the service", data={"path": str(path)})]
    mode = stat.S_IMODE(st.st_mode)
    owner, group = _name(pwd.getpwuid, st.st_uid), _name(grp.getgrgid, st.st_gid)
    want_user, want_group = _expected_owner(ctx)
    want_mode = ctx.settings.socket.mode
    data = {"path": str(path), "mode": oct(mode), "owner": owner, "group": group,
            "expected": {"mode": oct(want_mode), "owner": want_user, "group": want_group}}
    problems = []
    if mode & 0o007:
        problems.append(f"mode {oct(mode)} lets every user talk to the daemon")
    elif mode != want_mode:
        problems.append(f"mode {oct(mode)}, expected {oct(want_mode)}")
    if want_group and group != want_group:
        problems.append(f"group {group}, expected {want_group}")
    if want_user and owner != want_user:
        problems.append(f"owner {owner}, expected {want_user}")
    if problems:
        sev = FAIL if mode & 0o007 else WARN
        return [Finding("service.socket", sev, f"socket {path}: " + "; ".join(problems),
                        remedy="check socket.group/socket.mode and htr.socket (SocketGroup=, SocketMode=), then "
                        "restart htr.socket", data=data)]
    return [Finding("service.socket", OK, f"socket {path} ({owner}:{group}, {oct(mode)})", data=data)]


def _get(path: Path, url_path: str):
    import httpx

    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://htrd", timeout=READY_TIMEOUT_S) as c:
        return c.get(url_path)


def _daemon(ctx: Context, path: Path) -> list[Finding]:
    import httpx

    from .. import protocol as P

    try:
        r = _get(path, P.PATH_READY)
    except httpx.TimeoutException:
        return [Finding("service.ready", FAIL, f"the daemon did not answer within {READY_TIMEOUT_S:g} s on {path}",
                        remedy="journalctl -u htr.service -n 50; a stuck daemon is restarted by its watchdog")]
    except (httpx.HTTPError, OSError) as exc:
        return [Finding("service.ready", FAIL, f"cannot talk to the daemon on {path}: {exc}",
                        remedy="systemctl status htr.service; journalctl -u htr.service -n 50")]
    try:
        body = r.json()
    except ValueError:
        body = {}
    state = body.get("state", "?") if isinstance(body, dict) else "?"
    out = []
    if r.status_code == 200:
        out.append(Finding("service.ready", OK, f"the daemon is ready ({state})", data={"state": state}))
    elif state in (P.STARTING, P.LOADING, P.WARMING):
        out.append(Finding("service.ready", WARN, f"the daemon is {state} (not ready yet)",
                           remedy="wait; htrctl status --wait", data={"state": state, "http": r.status_code}))
    else:
        out.append(Finding("service.ready", FAIL, f"the daemon answers but is {state}: {body.get('detail') or ''}".strip(),
                           remedy="journalctl -u htr.service -n 50", data={"state": state, "http": r.status_code}))
    try:
        st = _get(path, P.PATH_STATUS).json()
    except (httpx.HTTPError, OSError, ValueError) as exc:
        out.append(Finding("service.match", WARN, f"status endpoint unreadable: {exc}"))
        return out
    out.append(_match(ctx, st))
    return out


def _match(ctx: Context, st: dict) -> Finding:
    s = ctx.settings
    mismatches = []
    model_dir = Path(s.model.dir)
    from ..manifest import ManifestFormatError, read_manifest

    try:  # the model's digest, computed the one way htrd computes it (content only)
        got = read_manifest(model_dir)
        want_digest = got[1] if got else None
    except (OSError, ManifestFormatError):
        want_digest = None
    got_digest = st.get("manifest_digest")
    if want_digest and got_digest and want_digest != got_digest:
        mismatches.append(f"serves manifest {got_digest[:12]}, the directory has {want_digest[:12]} "
                          "(the model changed since it loaded)")
    if st.get("model_dir") and Path(st["model_dir"]).resolve() != model_dir.resolve():
        mismatches.append(f"serves {st['model_dir']}, the config says {model_dir}")
    gpu = st.get("gpu") or {}
    got_uuid = gpu.get("uuid")
    want_uuid = s.gpu.select if s.gpu.select.upper().startswith("GPU-") else None
    if want_uuid and got_uuid and got_uuid.lower() != want_uuid.lower():
        mismatches.append(f"runs on {got_uuid}, gpu.select is {want_uuid}")
    if s.gpu.select != "cpu" and gpu.get("device") == "cpu":
        mismatches.append("runs on the CPU although gpu.select asks for a GPU")
    data = {"manifest_digest": got_digest, "expected_manifest_digest": want_digest, "gpu": gpu,
            "model_dir": st.get("model_dir"), "version": st.get("version")}
    if mismatches:
        return Finding("service.match", FAIL, "the running daemon does not match the config: " + "; ".join(mismatches),
                       remedy="systemctl restart htr.service (after fixing the config if needed)", data=data)
    return Finding("service.match", OK, f"the daemon serves {st.get('model_dir')} (manifest "
                   f"{str(got_digest or '-')[:12]}) on {got_uuid or gpu.get('device')}", data=data)


def _socket_group(ctx: Context) -> list[Finding]:
    from ..config import host_problems

    # Before `service install` (which creates the group) it is a step still to do, not a fault.
    sev = FAIL if ctx.service_env().installed else WARN
    return [Finding("service.socket_group", sev, p.message, remedy=p.remedy,
                    data={"group": ctx.settings.socket.group}) for p in host_problems(ctx.settings)]


def check(ctx: Context) -> list[Finding]:
    out = _units(ctx) + _socket_group(ctx)
    path = socket_path(ctx)
    sock = _socket(ctx, path)
    if not path.exists() and not ctx.service_env().installed:
        sock[0].severity = WARN  # nothing installed yet: not set up, rather than broken
    out.extend(sock)
    try:
        is_sock = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_sock = False
    if is_sock:
        out.extend(_daemon(ctx, path))
    return out


__all__ = ["check", "read_service_environment", "socket_path"]
