"""The wire's names (readiness states, error types) are defined once, in htrctl.protocol, and the daemon's
state machine and error answers use exactly those."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from htrctl import protocol as P


def test_the_state_machine_has_a_row_for_every_protocol_state_and_no_other():
    from htrd.state import _ALLOWED, DaemonState

    assert set(_ALLOWED) == set(P.STATES)
    assert all(targets <= set(P.STATES) for targets in _ALLOWED.values())
    assert DaemonState().state == P.STATES[0] == P.STARTING


def test_a_state_outside_the_protocol_is_refused_on_the_wire():
    assert P.ReadyResponse(state=P.WARMING).state == "warming"
    with pytest.raises(ValidationError):
        P.ReadyResponse(state="booting")


def test_an_api_error_is_answered_with_its_types_status():
    from htrd.api_errors import ApiError

    assert {t: ApiError(t, "x").status for t in P.ERROR_STATUS} == P.ERROR_STATUS
    assert ApiError("queue_full", "x").status == 503 and ApiError("bad_request", "x", status=405).status == 405
    with pytest.raises(ValidationError):
        ApiError("no_such_type", "x").body()
