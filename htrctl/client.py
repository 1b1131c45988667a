"""HTTP over the Unix socket to ``htrd`` (httpx with a UDS transport).

Every failure becomes an :class:`htrctl.errors.DaemonError` subclass whose
message says what happened and whose remedy says what to do:

- socket missing / connection refused -> :class:`DaemonUnavailableError`
  (the daemon is not running, or is restarting: retryable);
- permission denied on the socket -> :class:`DaemonPermissionError` naming the
  socket's group and ``sudo usermod -aG <group> $USER``;
- 503 ``not_ready`` -> :class:`DaemonNotReadyError` carrying the state;
- 503 ``queue_full`` -> :class:`DaemonBusyError` (retryable, ``Retry-After``);
- connection reset mid-request (daemon restarted) -> :class:`DaemonUnavailableError`;
- 4xx and per-request 5xx -> :class:`RequestError` with the daemon's message.

:func:`is_retryable` says which of them a long run should retry with backoff.
The module imports no torch and no pydantic-heavy daemon code: ``htrctl
transcribe`` starts fast.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from . import protocol as P
from . import systemd
from .errors import (
    DaemonBusyError,
    DaemonError,
    DaemonNotReadyError,
    DaemonPermissionError,
    DaemonTimeoutError,
    DaemonUnavailableError,
    RequestError,
    ServiceError,
)
from .units.render import SERVICE

logger = logging.getLogger(__name__)

START_REMEDY = "start it: sudo systemctl start htr.socket htr.service (or htrd --config ...); check: htrctl doctor"
DEFAULT_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0


def is_retryable(exc: BaseException) -> bool:
    """True for the failures a restart or a moment's wait cures (not per-file errors)."""
    return isinstance(exc, (DaemonUnavailableError, DaemonNotReadyError, DaemonBusyError))


def _errno_of(exc: BaseException) -> int | None:
    """The OSError errno somewhere in an httpx exception's cause chain."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno
        for arg in getattr(cur, "args", ()):
            if isinstance(arg, OSError) and arg.errno is not None:
                return arg.errno
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


# Groups no one should be told to join to reach a socket.
PRIVILEGED_GROUPS = frozenset({"root", "0", "wheel", "sudo", "admin", "adm", "shadow", "disk", "docker"})


def _group_of(path: Path) -> str:
    try:
        gid = path.stat().st_gid
    except OSError:
        return "htr"
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _blocking_dir(path: Path) -> Path:
    """The first directory on the way to *path* this process may not enter."""
    for parent in reversed(path.absolute().parents):
        if not os.access(parent, os.X_OK):
            return parent
    return path


def permission_error(socket_path: Path) -> DaemonPermissionError:
    group = _group_of(socket_path)
    try:
        mode = stat.filemode(socket_path.stat().st_mode)
    except OSError:
        mode = "?"
    if group in PRIVILEGED_GROUPS:  # joining root (or wheel...) is never the fix
        remedy = (f"the socket belongs to group '{group}': give it a group of its own (socket.group: htr in the "
                  "config, SocketGroup=htr in htr.socket; `sudo htrctl service install` sets both), then "
                  "sudo usermod -aG htr $USER and log out and in again")
    else:
        remedy = f"join the socket's group: sudo usermod -aG {group} $USER, then log out and in again"
    return DaemonPermissionError(
        f"permission denied on {'the daemon socket ' if not socket_path.is_dir() else ''}{socket_path}"
        f" (group '{group}', mode {mode})",
        remedy=remedy,
        detail={"socket": str(socket_path), "group": group},
    )


def unavailable_error(socket_path: Path, why: str) -> DaemonUnavailableError:
    return DaemonUnavailableError(
        f"htrd is not running: {why}", remedy=START_REMEDY, detail={"socket": str(socket_path)}
    )


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


class HtrClient:
    """A client of one ``htrd`` over its Unix socket. Thread-safe (one pooled httpx client)."""

    def __init__(
        self,
        socket_path: str | os.PathLike,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        max_connections: int = 16,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        transport = httpx.HTTPTransport(
            uds=str(self.socket_path),
            retries=0,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._http = httpx.Client(
            transport=transport,
            base_url=P.BASE_URL,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )

    # -- lifecycle ---------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HtrClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HtrClient({str(self.socket_path)!r})"

    # -- the one place requests are made and failures translated ----------
    def _request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> httpx.Response:
        try:
            exists = self.socket_path.exists()
        except PermissionError:  # a directory on the way is not ours to enter
            raise permission_error(_blocking_dir(self.socket_path)) from None
        if not exists:
            raise unavailable_error(self.socket_path, f"no socket at {self.socket_path}")
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        try:
            return self._http.request(method, path, **kw)
        except httpx.ConnectError as exc:
            code = _errno_of(exc)
            if code in (errno.EACCES, errno.EPERM):
                raise permission_error(self.socket_path) from exc
            if code == errno.ENOENT:
                raise unavailable_error(self.socket_path, f"no socket at {self.socket_path}") from exc
            if code == errno.ECONNREFUSED:
                raise unavailable_error(
                    self.socket_path,
                    f"{self.socket_path} refuses connections (stopped or restarting)",
                ) from exc
            raise unavailable_error(self.socket_path, f"cannot connect to {self.socket_path}: {exc}") from exc
        except httpx.TimeoutException as exc:
            limit = timeout if timeout is not None else self.timeout
            if isinstance(exc, httpx.ConnectTimeout) or isinstance(exc, httpx.PoolTimeout):
                raise unavailable_error(self.socket_path, f"{self.socket_path} does not accept connections") from exc
            raise DaemonTimeoutError(
                f"no answer from htrd within {limit:g} s",
                remedy="raise --timeout, or check the daemon: htrctl status",
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # The connection died under the request: the daemon exited or restarted.
            raise DaemonUnavailableError(
                f"connection to htrd lost ({type(exc).__name__}: {exc or 'reset'}): the daemon stopped or restarted",
                remedy=START_REMEDY,
                detail={"socket": str(self.socket_path)},
            ) from exc

    def _raise_for(self, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        etype, message, detail = "internal", resp.text.strip()[:300] or resp.reason_phrase, None
        try:  # lenient: an error type this client does not know yet is still shown
            body = json.loads(resp.content)["error"]
            etype = str(body.get("type") or etype)
            message = str(body.get("message") or message)
            detail = body.get("detail")
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        info = {"status": resp.status_code, "type": etype, "detail": detail, "retry_after": _retry_after(resp)}
        if resp.status_code == 503 and etype == "not_ready":
            state = detail.get("state") if isinstance(detail, dict) else None
            info["state"] = state or "not ready"
            raise DaemonNotReadyError(
                f"htrd is not ready (state: {info['state']}): {message}",
                remedy="wait for it: --wait SECONDS; watch: htrctl status",
                detail=info,
            )
        if resp.status_code == 503:
            raise DaemonBusyError(
                f"htrd is busy ({etype}): {message}", remedy="retry later or lower --concurrency", detail=info
            )
        if resp.status_code == 504:
            raise DaemonTimeoutError(f"htrd: {message}", remedy="raise limits.request_deadline_s", detail=info)
        raise RequestError(f"htrd refused the request ({resp.status_code} {etype}): {message}", detail=info)

    # -- endpoints -----------------------------------------------------------
    def live(self) -> bool:
        return self._request("GET", P.PATH_LIVE, timeout=CONNECT_TIMEOUT_S).status_code == 200

    def ready(self) -> P.ReadyResponse:
        """The readiness state (200 when ready, 503 with the state otherwise)."""
        resp = self._request("GET", P.PATH_READY, timeout=CONNECT_TIMEOUT_S)
        try:
            return P.ReadyResponse.model_validate_json(resp.content)
        except ValueError:
            pass
        self._raise_for(resp)
        raise DaemonError(f"unexpected answer from {P.PATH_READY}: {resp.status_code} {resp.text[:200]}")

    def status(self) -> P.StatusResponse:
        resp = self._request("GET", P.PATH_STATUS, timeout=min(self.timeout, 10.0))
        self._raise_for(resp)
        return P.StatusResponse.model_validate_json(resp.content)

    def transcribe(
        self,
        image: bytes,
        *,
        max_new_tokens: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> P.TranscribeResponse:
        """One image (multi-page TIFF: one result per page)."""
        body = self._post_images(P.PATH_TRANSCRIBE, max_new_tokens, request_id, timeout, content=image,
                                 headers={"Content-Type": "application/octet-stream"})
        return P.TranscribeResponse.model_validate_json(body)

    def transcribe_batch(
        self,
        images: Sequence[tuple[str, bytes]],
        *,
        max_new_tokens: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> P.BatchResponse:
        """Several images in one request; each item carries its results or its own error."""
        files = [(P.BATCH_PART_NAME, (name, data, "application/octet-stream")) for name, data in images]
        body = self._post_images(P.PATH_TRANSCRIBE_BATCH, max_new_tokens, request_id, timeout, files=files)
        return P.BatchResponse.model_validate_json(body)

    def _post_images(self, path: str, max_new_tokens: int | None, request_id: str | None, timeout: float | None,
                     *, headers: dict[str, str] | None = None, **body: Any) -> bytes:
        """POST images to a transcription endpoint with its options; the answer's JSON (a refusal raised)."""
        params = {"max_new_tokens": max_new_tokens} if max_new_tokens else None
        headers = {**({P.HEADER_REQUEST_ID: request_id} if request_id else {}), **(headers or {})}
        resp = self._request("POST", path, params=params, headers=headers or None, timeout=timeout, **body)
        self._raise_for(resp)
        return resp.content

    def wait_ready(
        self,
        timeout: float,
        *,
        on_state: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        max_interval: float = 1.0,
        wait_if_down: bool = True,
    ) -> P.ReadyResponse:
        """Poll readiness with bounded backoff until ready or *timeout* seconds pass.

        *on_state* is called whenever the observed state changes ("loading",
        "warming", "no socket", ...). A permission error is raised at once;
        the last unavailable/not-ready error is raised (with the state) on timeout.
        ``wait_if_down=False`` waits only for a daemon that answers (loading,
        warming): one that is not running at all is reported at once.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        interval = 0.05
        last_state = None
        last_exc: DaemonError | None = None
        while True:
            try:
                r = self.ready()
                state = r.state
                if state == P.READY:
                    if on_state and last_state != state:
                        on_state(state)
                    return r
                last_exc = DaemonNotReadyError(
                    f"htrd is not ready (state: {state})" + (f": {r.detail}" if r.detail else ""),
                    remedy="wait longer (--wait SECONDS) or look at the daemon's log: journalctl -u htr.service",
                    detail={"state": state},
                )
            except DaemonPermissionError:
                raise
            except DaemonNotReadyError as exc:
                state, last_exc = (exc.detail or {}).get("state", "not ready"), exc
            except DaemonUnavailableError as exc:
                if not wait_if_down:
                    raise
                state, last_exc = "down", exc
            if on_state and state != last_state:
                on_state(state)
            last_state = state
            if state == P.FAILED:
                raise DaemonNotReadyError(
                    "htrd failed to start (state: failed)",
                    remedy="see its log: journalctl -u htr.service; check: htrctl doctor",
                    detail={"state": state},
                )
            now = time.monotonic()
            if now >= deadline:
                assert last_exc is not None
                if timeout > 0 and isinstance(last_exc, DaemonNotReadyError):
                    last_exc.message = f"{last_exc.message}; still not ready after waiting {timeout:g} s"
                raise last_exc
            pause = min(interval, deadline - now)
            if stop is not None:
                if stop.wait(pause):
                    raise KeyboardInterrupt
            else:
                threading.Event().wait(pause)
            interval = min(interval * 2, max_interval)


# What `htrctl status` shows of the unit.
UNIT_STATE_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "ExecMainStatus",
                         "ActiveEnterTimestamp")


def systemd_unit_state(unit: str = SERVICE, *, timeout: float = 5.0) -> dict[str, Any]:
    """``systemctl show`` of *unit*; ``{"available": False, "reason": ...}`` where systemctl does not work."""
    try:
        props = systemd.show(unit, UNIT_STATE_PROPERTIES, timeout=timeout)
    except ServiceError as exc:
        return {"unit": unit, "available": False, "reason": exc.message}
    return {"unit": unit, "available": True, **props}


class StatusReport:
    """The daemon's status (or why it could not be read) and the systemd unit's state."""

    def __init__(self, socket_path: str, daemon: dict | None, error: DaemonError | None, systemd: dict) -> None:
        self.socket = socket_path
        self.daemon = daemon
        self.error = error
        self.systemd = systemd

    def to_dict(self) -> dict[str, Any]:
        return {
            "socket": self.socket,
            "daemon": self.daemon,
            "error": self.error.to_dict() if self.error else None,
            "systemd": self.systemd,
        }


def gather_status(socket_path: str | os.PathLike, *, timeout: float = 10.0, unit: str = SERVICE) -> StatusReport:
    """What ``htrctl status`` shows. A daemon error is kept in ``.error``, not raised."""
    daemon, error = None, None
    with HtrClient(socket_path, timeout=timeout) as client:
        try:
            daemon = client.status().model_dump(mode="json")
        except DaemonError as exc:
            error = exc
    return StatusReport(str(socket_path), daemon, error, systemd_unit_state(unit))
