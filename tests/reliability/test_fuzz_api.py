"""Fuzzing, bounded in time.

- The HTTP API from its own OpenAPI schema: schemathesis generates requests for every operation of the
  schema the running daemon serves at ``/openapi.json``; they are sent to the REAL daemon over its Unix
  socket (a ``requests`` adapter that connects to the socket: schemathesis's own transport, a different
  address family). Every answer must be a non-5xx that conforms to the schema (status documented or a
  protocol 4xx, body matching, the error envelope on every error), and the daemon stays ready.
- The image path: hypothesis mutates real PNG/JPEG/TIFF/WebP files (flipped bytes, truncation, inserted
  and deleted runs, spliced headers) and feeds them to ``htrd.images.decode_image``: each either decodes to
  RGB pages within the pixel limit or raises ``ApiError`` with a 4xx -- never another exception.
"""

from __future__ import annotations

import collections
import socket
import time
import warnings

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from . import hostile as H

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

API_FUZZ_SECONDS = 40.0
IMAGE_FUZZ_SECONDS = 20.0


# ----------------------------------------------------------------------------------- requests over a UDS
def uds_session(sock_path):
    """A requests.Session whose every connection goes to the Unix socket *sock_path*."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    class UnixConnection(HTTPConnection):
        def connect(self):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 60.0)
            s.connect(str(sock_path))
            self.sock = s

    class UnixPool(HTTPConnectionPool):
        ConnectionCls = UnixConnection

    class UnixAdapter(HTTPAdapter):
        def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
            return UnixPool("htr", maxsize=4)

        def get_connection(self, url, proxies=None):  # older requests
            return UnixPool("htr", maxsize=4)

    s = requests.Session()
    s.trust_env = False  # no proxies from the environment
    s.mount("http://", UnixAdapter())
    return s


def _envelope_on_errors(response) -> str | None:
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:120]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not err.get("type") or not err.get("message"):
        return f"{response.status_code} without the error envelope: {response.text[:160]}"
    return None


def test_schemathesis_against_the_daemon_over_its_socket(shared_daemon, record):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the 'test' extra")
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    doc = httpx.Client(transport=httpx.HTTPTransport(uds=str(shared_daemon.socket_path)),
                       base_url="http://htr").get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    session = uds_session(shared_daemon.socket_path)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 6, [o.label for o in ops]
    statuses: dict[str, collections.Counter] = {}
    failures: list[str] = []
    with_input = [op for op in ops if op.method.upper() != "GET"]  # GETs without parameters: a few examples
    per_op = API_FUZZ_SECONDS / max(1, len(with_input))
    sent = 0
    for op in ops:
        counter = statuses.setdefault(op.label, collections.Counter())
        stop_at = time.monotonic() + (per_op if op in with_input else 5.0)

        @settings(max_examples=2000 if op in with_input else 10, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            nonlocal sent
            if time.monotonic() > stop_at:
                return  # the time for this operation is spent
            response = case.call(base_url="http://htr", session=session, timeout=60)
            sent += 1
            counter[response.status_code] += 1
            problem = _envelope_on_errors(response)
            checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
            if response.status_code not in (405, 408, 413, 415, 422):  # protocol answers any endpoint may give
                checks.append(status_code_conformance)
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # noqa: BLE001 -- collected and reported below, with the request
                problem = problem or f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if problem:
                failures.append(f"{op.label}: {problem}\n    {case.as_curl_command()[:300]}")

        run()
    ready = shared_daemon.get("/v1/ready").status_code
    total = collections.Counter()
    for c in statuses.values():
        total.update(c)
    record("fuzz", "schemathesis: HTTP API from its OpenAPI schema", tool=f"schemathesis {schemathesis.__version__}",
           target="the running htrd over its Unix socket (requests adapter)", examples=sent,
           operations=len(ops), seconds=API_FUZZ_SECONDS,
           statuses={str(k): v for k, v in sorted(total.items())},
           per_operation={k: {str(s): n for s, n in sorted(v.items())} for k, v in statuses.items()},
           failures=len(failures), ready_after=(ready == 200))
    assert sent >= 100, statuses
    assert not failures, "\n".join(failures[:10])
    assert ready == 200


# ----------------------------------------------------------------------------------- the image path
def _seeds() -> list[bytes]:
    img = H.line_image((96, 24))
    return [
        H.encode(img, "PNG"),
        H.encode(img.convert("L"), "PNG"),
        H.encode(img.convert("P"), "PNG", transparency=0),
        H.encode(img, "JPEG", quality=70),
        H.encode(img.convert("CMYK"), "JPEG"),
        H.encode(img, "TIFF", compression="tiff_lzw"),
        H.multipage_tiff(3, (24, 8)),
        H.encode(img.convert("I;16"), "TIFF"),
        H.encode(img, "WEBP"),
        H.png_declaring(50_000, 50_000),
        H.tiff_declaring(64, 64),
        H.jpeg_declaring(30_000, 30_000),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup_header", "int32"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "dup_header":
            data[at:at] = data[:min(64, len(data))]
        elif op == "int32":  # a length or dimension field gone wild
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00",
                                                    b"\x00\x01\x00\x00"]))
    return bytes(data)


def test_hypothesis_mutated_images_through_decode_image(record):
    from htrd.api_errors import ApiError
    from htrd.images import decode_image

    max_pixels = 4_000_000
    outcomes: collections.Counter = collections.Counter()
    unexpected: list[str] = []
    stop_at = time.monotonic() + IMAGE_FUZZ_SECONDS

    @settings(max_examples=5000, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(data=st.one_of(mutated(), st.binary(max_size=512)))
    def run(data):
        if time.monotonic() > stop_at:
            return
        try:
            # as in htrd (warnings are log lines there, not errors as under pytest's filterwarnings=error)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pages = decode_image(data, max_pixels=max_pixels, max_pages=16)
            if caught:
                outcomes["decoded with a library warning"] += 1
                return
        except ApiError as err:
            if not 400 <= err.status < 500:
                unexpected.append(f"ApiError {err.status} {err.type}: {err.message[:120]}")
            outcomes[f"{err.status} {err.type}"] += 1
            return
        except Exception as exc:  # noqa: BLE001 -- the finding this test exists for
            unexpected.append(f"{type(exc).__name__}: {str(exc)[:160]} (input {data[:24].hex()}..., {len(data)} B)")
            outcomes["other exception"] += 1
            return
        for p in pages:
            assert p.image.mode == "RGB" and p.image.size[0] * p.image.size[1] <= max_pixels
        outcomes["decoded"] += 1

    run()
    n = sum(outcomes.values())
    record("fuzz", "hypothesis: mutated images through decode_image", tool="hypothesis",
           target="htrd.images.decode_image (in process)", examples=n, seconds=IMAGE_FUZZ_SECONDS,
           statuses=dict(sorted(outcomes.items())), failures=len(unexpected), ready_after=None)
    assert n >= 500, outcomes
    assert not unexpected, "\n".join(unexpected[:10])
