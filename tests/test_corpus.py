"""Replay the shared third-party request corpus against the bundled server.

Every case of ``tests/corpus`` (a copy of the team's ``shared/corpus``:
gunicorn, llhttp and http-desync-guardian material; see its README) goes
to a live server over a real loopback socket, one test per case, as the
exact bytes of its ``.http`` file in one send. The
app (:class:`corpus_support.Recorder`) records what each call saw and the
test compares that with the case's JSON:

* ``accept``: each request reaches the app, in order, with exactly the
  expected method, target (``RAW_URI``; ``PATH_INFO`` percent-decoded as PEP
  3333 asks; ``QUERY_STRING``), protocol, header variables and body, and is
  answered 200. desync-guardian cases send the header section only: a request
  with a body length reaches the app, which then waits for the body, and
  nothing is answered.
* ``4xx-or-close``: a 4xx (501 where the case is about a transfer coding,
  505 where the version is not 1.0/1.1) and a close, or a close alone; the
  app sees none of it (only requests that were complete before it).
* ``wait-for-more-data``: the complete requests before it are answered and
  then nothing for a while, the app never sees the incomplete one; when the
  client then ends its input, the server closes without answering.
* ``accept-or-4xx`` (and the one ``server-specific`` upgrade case): either
  of the above, never a 5xx.

After every case a normal request on a new connection must succeed, and the
server must have logged no error. Where asyncapp deliberately differs from a
case, :data:`DIFFERENCES` says what it does instead and why (one line each);
the case still runs and asserts that behaviour. A few gunicorn cases that
lower or raise gunicorn's limits run on a server with the equivalent
asyncapp limits (:data:`CASE_SETTINGS`). The counts go to
``test-artifacts/corpus-summary.json`` and the terminal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import pytest
from corpus_support import QUIET, WAIT, RawConnection, Record, Recorder, probe

from asyncapp.server.run import Server
from asyncapp.testing import live_server

pytestmark = pytest.mark.timeout(60)

#: A copy of the team's shared corpus (``shared/corpus``), vendored so that a
#: clean clone tests against it; tests/corpus/README.md says where it came from.
CORPUS = Path(__file__).resolve().parent / "corpus"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
#: The number of cases the corpus README announces.
CASE_COUNT = 387

GROUPS = {
    "gunicorn-requests/valid": "gunicorn-valid",
    "gunicorn-requests/invalid": "gunicorn-invalid",
    "llhttp": "llhttp",
    "desync-guardian": "desync-guardian",
    # Our own chunk-extension cases (RFC 9112 7.1.1), in gunicorn-valid's JSON format.
    "asyncapp-chunked": "asyncapp-chunked",
}

# -- where asyncapp differs, on purpose ----------------------------------------------

NO_HOST = "HTTP/1.1 without Host: 400, as RFC 9112 3.2 requires"
UNDERSCORE = "header names with '_' are dropped (Content_Length would pose as CONTENT_LENGTH)"
STREAMED = "bodies stream: the app gets the head at once and waits for the body (no 4xx)"
GET_BODY = (
    "GET/HEAD content is framed by CL/TE like any request (RFC 9112 6.3), so no desync: " + STREAMED
)
LIMITS = "gunicorn's own size limit; asyncapp's max_* defaults (docs/server.md) allow this"
PROXY = "PROXY protocol is not supported (no such setting): the PROXY line is a bad request"
OBS_FOLD = "obs-fold is refused with 400 (RFC 9112 5.2 allows it; llhttp strict)"
METHOD = "llhttp knows registered methods only; any other method token gets 400"
TE_PARAM = "transfer-coding parameters on chunked are refused (llhttp strict; RFC 9112 7)"
CONNECT = "CONNECT (authority-form) is not supported: 501"
BAD_TARGET = "raw non-ASCII bytes or an empty target are not a valid request-target: 400"
TRAILER = "no Host; with one, Content-Type as a trailer still gets 400 (RFC 9110 6.5.1)"

#: Case id -> (what asyncapp does, why). "accept": served like a valid case;
#: "wait"/"wait-body": waits for more bytes (the app already has the head
#: with "wait-body"), then closes when the client's input ends; a number:
#: exactly that status, then close; "no-host": 400 for the first HTTP/1.1
#: request without Host (those before it are served), and with
#: ``Host: corpus`` added to each such request the case passes as its JSON
#: expects, so what the case is about is still tested ("no-host:400": with
#: Host it gets that status, for the reason given).
DIFFERENCES: dict[str, tuple[str | int, str]] = {
    # gunicorn, valid
    "gunicorn-requests/valid/004": ("no-host", NO_HOST),
    "gunicorn-requests/valid/005": ("no-host", NO_HOST),
    "gunicorn-requests/valid/006": ("no-host", NO_HOST),
    "gunicorn-requests/valid/007": ("no-host", NO_HOST),
    "gunicorn-requests/valid/009": (400, "TE identity + CL: 400, as RFC 9112 6.3 requires"),
    "gunicorn-requests/valid/010": ("no-host", NO_HOST),
    "gunicorn-requests/valid/011": ("no-host", NO_HOST),
    "gunicorn-requests/valid/012": ("no-host:400", TRAILER),
    "gunicorn-requests/valid/013": ("no-host", NO_HOST),
    "gunicorn-requests/valid/014": ("no-host", NO_HOST),
    "gunicorn-requests/valid/018": ("no-host", NO_HOST),
    "gunicorn-requests/valid/021": ("no-host", NO_HOST),
    "gunicorn-requests/valid/022": ("no-host", NO_HOST),
    "gunicorn-requests/valid/023": ("no-host", NO_HOST),
    "gunicorn-requests/valid/025": ("no-host", NO_HOST),
    "gunicorn-requests/valid/025_line": ("no-host", NO_HOST),
    "gunicorn-requests/valid/027": (400, BAD_TARGET),
    "gunicorn-requests/valid/028": (
        400,
        "whitespace before ':' gets 400, as RFC 9112 5.1 requires",
    ),
    "gunicorn-requests/valid/029": ("no-host", NO_HOST),
    "gunicorn-requests/valid/030": ("no-host", NO_HOST),
    "gunicorn-requests/valid/031": (400, METHOD),
    "gunicorn-requests/valid/031compat": (400, METHOD),
    "gunicorn-requests/valid/031compat2": (400, METHOD),
    "gunicorn-requests/valid/040_compat": ("accept", UNDERSCORE),
    "gunicorn-requests/valid/099": ("wait-body", "fixture quirk: CL 17914 but 8599 bytes sent"),
    "gunicorn-requests/valid/100": ("no-host", NO_HOST),
    "gunicorn-requests/valid/compat_obs_fold": (400, OBS_FOLD),
    "gunicorn-requests/valid/compat_obs_fold_huge": (400, OBS_FOLD),
    "gunicorn-requests/valid/pp_01": (400, PROXY),
    "gunicorn-requests/valid/pp_02": (400, PROXY),
    "gunicorn-requests/valid/pp_04": (400, PROXY),
    "gunicorn-requests/valid/pp_05": (400, PROXY),
    "gunicorn-requests/valid/rfc9112_target_authority_connect_01": (501, CONNECT),
    "gunicorn-requests/valid/rfc9112_target_authority_ipv6_01": (501, CONNECT),
    # gunicorn, invalid
    "gunicorn-requests/invalid/001": ("wait", "a head cut short: asyncapp waits (408 in time)"),
    "gunicorn-requests/invalid/006": ("accept", LIMITS),
    "gunicorn-requests/invalid/008": ("accept", LIMITS),
    "gunicorn-requests/invalid/040": ("accept", UNDERSCORE),
    "gunicorn-requests/invalid/limit_header_default_01": ("accept", LIMITS),
    "gunicorn-requests/invalid/rfc9112_chunked_missing_final_crlf_01": ("wait-body", STREAMED),
    # llhttp
    "llhttp/connection__setting-flag-on-close-followed-by-tab": ("no-host", NO_HOST),
    "llhttp/content-length__content-length-with-follow-up-headers": ("no-host", NO_HOST),
    "llhttp/content-length__content-length-with-zeroes": ("no-host", NO_HOST),
    "llhttp/content-length__spaces-in-content-length-surrounding": ("no-host", NO_HOST),
    "llhttp/content-length__tabs-in-content-length-surrounding": ("no-host", NO_HOST),
    "llhttp/pipelining__should-parse-multiple-events": ("no-host", NO_HOST),
    "llhttp/sample__255-ascii-in-header-value": ("no-host", NO_HOST),
    "llhttp/sample__extended-characters": ("no-host", NO_HOST),
    "llhttp/sample__no-http-version": (505, "HTTP/0.9 is not served: 505"),
    "llhttp/sample__prefix-newline": ("no-host", NO_HOST),
    "llhttp/sample__request-starting-with-crlf": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__chunk-extensions-quoting": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__chunk-extensions": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__parse-chunks-with-lowercase-size": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__parse-chunks-with-uppercase-size": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__parsing-and-setting-flag": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__post-with-chunked-as-last-transfer-encoding": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__post-with-chunked-as-last-transfer-encoding-multiple-headers": (
        "no-host",
        NO_HOST,
    ),
    "llhttp/transfer-encoding__post-with-transfer-encoding-chunked": ("no-host", NO_HOST),
    "llhttp/transfer-encoding__trailing-headers": ("no-host:400", TRAILER),
    "llhttp/transfer-encoding__two-chunks-and-triple-zero-prefixed-end-chunk": ("no-host", NO_HOST),
    # desync-guardian
    "desync-guardian/ambiguous__08-transfer-encoding-with-underscore": ("accept", UNDERSCORE),
    "desync-guardian/ambiguous__09-content-length-with-underscore": ("accept", UNDERSCORE),
    "desync-guardian/ambiguous__13-get-with-a-body-and-content-length": ("accept", GET_BODY),
    "desync-guardian/ambiguous__14-get-with-a-body-and-transfer-encoding": ("accept", GET_BODY),
    "desync-guardian/ambiguous__15-head-with-a-body-and-content-length": ("accept", GET_BODY),
    "desync-guardian/ambiguous__16-head-with-a-body-and-transfer-encoding": ("accept", GET_BODY),
    "desync-guardian/ambiguous__31-transfer-encoding-with-multiple-hyphens": (
        "accept",
        "Transfer---Encoding is just another field name (HTTP_TRANSFER___ENCODING), no framing",
    ),
    "desync-guardian/ambiguous__32-transfer-encoding-with-multiple-delimiters": (
        "accept",
        UNDERSCORE,
    ),
    "desync-guardian/more-compliant-tests__10-te-with-custom-parameters-ok": (400, TE_PARAM),
    "desync-guardian/real-life-test-cases__01-has-a-cl-in-get": ("accept", GET_BODY),
    "desync-guardian/real-life-test-cases__02-has-a-te-in-get": ("accept", GET_BODY),
    "desync-guardian/rfc-compliant__05-valid-custom-header-with-tchar-in-name-and-obs-text": (
        "accept",
        UNDERSCORE,
    ),
    "desync-guardian/rfc-compliant__06-valid-custom-header-with-underscore-in-name": (
        "accept",
        UNDERSCORE,
    ),
    "desync-guardian/rfc-compliant__11-transfer-encoding-with-a-param-chunked-custom-param": (
        400,
        TE_PARAM,
    ),
    "desync-guardian/rfc-compliant__13-international-in-uri": (400, BAD_TARGET),
    "desync-guardian/rfc-compliant__14-empty-uri": (400, BAD_TARGET),
}

#: Cases that lower or raise one of gunicorn's limits: the same limit in
#: asyncapp's terms (gunicorn counts a field line with ": " and CRLF).
CASE_SETTINGS: dict[str, dict[str, Any]] = {
    "gunicorn-requests/invalid/010": {"max_header_size": 10 - 4},
    "gunicorn-requests/invalid/011": {"max_header_count": 2},
    "gunicorn-requests/invalid/012": {"max_header_size": 98 - 4},
    "gunicorn-requests/valid/024": {"max_request_line": 8200, "max_header_size": 8210 - 4},
    "gunicorn-requests/valid/026": {"max_header_size": 8210 - 4},
}


# -- the cases -------------------------------------------------------------------------


@dataclass
class Want:
    """One request as the app must see it (strings are latin-1 wire text)."""

    method: str
    uri: str
    path: str
    query: str
    version: str
    #: None: not compared (built from the raw bytes, not from the JSON).
    headers: list[tuple[str, str]] | None
    #: None: the body was not sent (desync-guardian sends the head only).
    body: bytes | None


@dataclass
class Case:
    id: str
    group: str
    meta: dict[str, Any]
    data: bytes

    @property
    def expect(self) -> str:
        return str(self.meta["expect"])


def _load() -> list[Case]:
    cases = []
    for meta_path in sorted(CORPUS.rglob("*.json")):
        rel = meta_path.relative_to(CORPUS).with_suffix("")
        group = GROUPS[str(rel.parent)]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cases.append(Case(str(rel), group, meta, meta_path.with_suffix(".http").read_bytes()))
    return cases


CASES = _load() if CORPUS.is_dir() else []


def _wire(text: str, group: str) -> str:
    """A JSON string as the latin-1 text of its wire bytes."""
    if group.startswith("gunicorn"):
        return text  # gunicorn's expectations are latin-1 decodings already
    return text.encode("utf-8").decode("latin-1")  # llhttp/desync: UTF-8 on the wire


def _split_target(uri: str) -> tuple[str, str]:
    target = uri.partition("#")[0]
    if target.startswith("/") or target == "*":
        path, _, query = target.partition("?")
        return path, query
    parts = urlsplit(target)
    return parts.path or "/", parts.query


def _body(message: dict[str, Any]) -> bytes:
    if message.get("body_encoding") == "base64":
        return base64.b64decode(message["body"])
    return str(message.get("body", "")).encode("utf-8")


def wants(case: Case) -> list[Want]:
    """The requests of an accept (or either) case, from its JSON."""
    meta, group = case.meta, case.group
    if group in ("gunicorn-valid", "asyncapp-chunked"):
        return [
            Want(
                r["method"],
                r["uri"],
                r["path"],
                r["query"],
                r["version"].removeprefix("HTTP/"),
                [(n, v) for n, v in r["headers"]],
                _body(r),
            )
            for r in meta["requests"]
        ]
    if group == "llhttp":
        result = []
        for message in meta["messages"][: meta["messages_completed"]]:
            uri = _wire(message["url"], group)
            path, query = _split_target(uri)
            result.append(
                Want(
                    message["method"],
                    uri,
                    path,
                    query,
                    message.get("version", "0.9"),
                    [(_wire(n, group), _wire(v, group)) for n, v in message["headers"]],
                    _body(message),
                )
            )
        return result
    if group == "desync-guardian":
        uri = _wire(meta["uri"], group)
        path, query = _split_target(uri)
        headers = [("Host", "example.com")] if meta.get("host_header_added") else []
        headers += [(_wire(n, group), _wire(v, group)) for n, v in meta["headers"]]
        version = meta["version"].removeprefix("HTTP/") or "0.9"
        return [Want(meta["method"], uri, path, query, version, headers, None)]
    return [want_from_raw(case.data)]


def want_from_raw(data: bytes) -> Want:
    """Method, target and body of a lone request, read off its bytes."""
    head, _, rest = data.lstrip(b"\r\n").partition(b"\r\n\r\n")
    method, uri, version = head.split(b"\r\n")[0].decode("latin-1").split(" ")
    match = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.IGNORECASE)
    body = rest[: int(match.group(1))] if match else b""
    path, query = _split_target(uri)
    return Want(method, uri, path, query, version.removeprefix("HTTP/"), None, body)


def environ_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """What the header variables of the environ must be (PEP 3333, CGI)."""
    result: dict[str, str] = {}
    for name, value in headers:
        if "_" in name:
            continue  # dropped by the server (see DIFFERENCES where it matters)
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = value.strip(" \t")  # optional whitespace is not part of a value
        if key in result:
            result[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            result[key] = value
    return result


def body_pending(want: Want) -> bool:
    """A head-only request whose header section announces a body."""
    if want.body is not None or want.headers is None:
        return False
    for name, value in want.headers:
        lname = name.lower()
        if lname == "transfer-encoding":
            return True
        if lname == "content-length" and value.strip(" \t").isdigit() and int(value) > 0:
            return True
    return False


def check_record(record: Record, want: Want, case: Case) -> None:
    where = f"{case.id}: request {want.method} {want.uri!r}"
    assert record.method == want.method, where
    assert record.raw_uri == want.uri, where
    path = unquote_to_bytes(want.path.encode("latin-1")).decode("latin-1")
    assert record.path_info == path, where
    assert record.query == want.query, where
    version = want.version if want.version in ("1.0", "1.1") else "1.1"  # 1.x served as 1.1
    assert record.protocol == f"HTTP/{version}", where
    if want.headers is not None:
        assert record.headers == environ_headers(want.headers), where
    if body_pending(want):
        assert not record.body_complete and not record.body, f"{where}: body not sent yet"
    else:
        assert record.body_complete, f"{where}: body not read to the end"
        assert bytes(record.body) == (want.body or b""), where


# -- the checks --------------------------------------------------------------------------


def allowed_errors(case: Case) -> set[int]:
    allowed = set(range(400, 500))
    if b"transfer-encoding" in case.data.lower():
        allowed.add(501)  # RFC 9112 6.1: an unknown transfer coding
    first = case.data.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    if not re.search(rb" HTTP/1\.[01]\Z", first):
        allowed.add(505)
    return allowed


def run_accept(address: Any, recorder: Recorder, case: Case, requests: list[Want]) -> None:
    with RawConnection(address) as conn:
        conn.send(case.data)
        pending = [w for w in requests if body_pending(w)]
        answered = len(requests) - len(pending)
        assert recorder.wait_for(lambda: len(recorder.for_port(conn.port)) >= len(requests)), (
            f"{case.id}: the app saw {len(recorder.for_port(conn.port))} of "
            f"{len(requests)} requests; server said {conn.statuses} closed={conn.closed}"
        )
        assert conn.wait_until(lambda: len(conn.replies) >= answered), (
            f"{case.id}: {conn.statuses} answered, {answered} expected"
        )
        conn.silent(QUIET)  # anything more would be a reply too many
        records = recorder.for_port(conn.port)
        assert len(records) == len(requests), f"{case.id}: the app saw {len(records)} requests"
        for record, want in zip(records, requests, strict=True):
            check_record(record, want, case)
        assert conn.statuses == [200] * answered, f"{case.id}: {conn.statuses}"


def run_reject(
    address: Any, recorder: Recorder, case: Case, before: list[Want], status: int | None = None
) -> None:
    """``status``: that exact answer; None: any allowed error, or a close alone."""
    with RawConnection(address) as conn:
        conn.send(case.data)
        assert conn.wait_closed(), (
            f"{case.id}: no close within {WAIT} s (stalled); answered {conn.statuses}"
        )
        records = recorder.for_port(conn.port)
        assert len(records) <= len(before), (
            f"{case.id}: the app saw a rejected request: {records[len(before) :]}"
        )
        for record, want in zip(records, before, strict=False):
            check_record(record, want, case)
        served = len(records)
        assert conn.statuses[:served] == [200] * served, f"{case.id}: {conn.statuses}"
        errors = conn.statuses[served:]
        if status is not None:
            assert errors == [status], f"{case.id}: answered {conn.statuses}, want {status}"
        else:
            assert len(errors) <= 1, f"{case.id}: {conn.statuses}"
            assert set(errors) <= allowed_errors(case), f"{case.id}: answered {conn.statuses}"
        REJECTIONS[case.id] = str(errors[0]) if errors else "close"


def run_wait(
    address: Any, recorder: Recorder, case: Case, before: list[Want], head_seen: bool
) -> None:
    """Complete requests answered, then silence; a close at the end of input."""
    with RawConnection(address) as conn:
        conn.send(case.data)
        seen = len(before) + head_seen
        assert recorder.wait_for(lambda: len(recorder.for_port(conn.port)) >= seen)
        assert conn.wait_until(lambda: len(conn.replies) >= len(before))
        assert conn.silent(QUIET), f"{case.id}: answered {conn.statuses} closed={conn.closed}"
        assert not conn.closed, f"{case.id}: closed instead of waiting"
        records = recorder.for_port(conn.port)
        assert len(records) == seen, f"{case.id}: the app saw {len(records)} requests"
        for record, want in zip(records, before, strict=False):
            check_record(record, want, case)
        if head_seen:
            assert not records[-1].body_complete, f"{case.id}: the body cannot be complete"
        assert conn.statuses == [200] * len(before), f"{case.id}: {conn.statuses}"
        conn.shutdown()
        assert conn.wait_closed(), f"{case.id}: no close after the end of the client's input"
        assert conn.statuses == [200] * len(before), f"{case.id}: answered an incomplete request"


def run_either(address: Any, recorder: Recorder, case: Case, requests: list[Want]) -> str:
    with RawConnection(address) as conn:
        conn.send(case.data)
        conn.wait_until(lambda: bool(recorder.for_port(conn.port) or conn.replies or conn.closed))
        if not recorder.for_port(conn.port):
            conn.wait_closed()
            assert conn.closed, f"{case.id}: neither served nor closed: {conn.statuses}"
            assert len(conn.statuses) <= 1, f"{case.id}: {conn.statuses}"
            assert set(conn.statuses) <= allowed_errors(case), f"{case.id}: {conn.statuses}"
            return "refused"
    run_accept(address, recorder, case, requests)
    return "served"


# -- fixtures and the test ------------------------------------------------------------------

OUTCOMES: dict[str, str] = {}
#: Case id -> how it was refused: the status, or "close" without one.
REJECTIONS: dict[str, str] = {}
#: Case id -> what asyncapp did with an accept-or-4xx case.
EITHER: dict[str, str] = {}


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Server, Recorder]]:
    recorder = Recorder()
    # forwarded_allow_ips="": the corpus checks what reaches the app as the
    # client sent it (X-Forwarded-For included); tests/test_proxy_headers.py
    # checks what trusting a proxy changes.
    with live_server(recorder, shutdown_grace=1.0, forwarded_allow_ips="") as server:
        yield server, recorder


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not OUTCOMES:
        return
    counts = Counter(OUTCOMES.values())
    by_group: dict[str, Counter[str]] = {}
    for case in CASES:
        if case.id in OUTCOMES:
            by_group.setdefault(case.group, Counter())[OUTCOMES[case.id]] += 1
    report = {
        "corpus": str(CORPUS),
        "cases": len(CASES),
        "run": len(OUTCOMES),
        "passed_as_expected": counts["expected"],
        "deliberate_differences": counts["difference"],
        "not_passed": len(CASES) - len(OUTCOMES),
        "by_group": {group: dict(c) for group, c in sorted(by_group.items())},
        "refused_with": dict(sorted(Counter(REJECTIONS.values()).items())),
        "accept_or_4xx": dict(sorted(EITHER.items())),
        "differences": {
            case_id: {"asyncapp": str(outcome), "why": why}
            for case_id, (outcome, why) in sorted(DIFFERENCES.items())
        },
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "corpus-summary.json").write_text(json.dumps(report, indent=2) + "\n")
    line = (
        f"corpus: {counts['expected']} passed as expected, {counts['difference']} "
        f"deliberate differences, {len(CASES) - len(OUTCOMES)} not passed "
        f"(of {len(CASES)}); see test-artifacts/corpus-summary.json"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line)


def test_corpus_is_there_and_complete() -> None:
    assert CORPUS.is_dir(), f"the shared corpus is missing: expected it at {CORPUS}"
    assert len(CASES) == CASE_COUNT, f"{len(CASES)} cases in {CORPUS}, the README says {CASE_COUNT}"
    for case in CASES:
        assert (CORPUS / f"{case.id}.http").is_file(), case.id
    unknown = set(DIFFERENCES) | set(CASE_SETTINGS)
    unknown -= {case.id for case in CASES}
    assert not unknown, f"DIFFERENCES/CASE_SETTINGS name unknown cases: {sorted(unknown)}"


@pytest.mark.parametrize("case", CASES or [None], ids=[c.id for c in CASES] or ["missing"])
def test_case(
    case: Case | None, shared: tuple[Server, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    assert case is not None, f"the shared corpus is missing: expected it at {CORPUS}"
    caplog.set_level(logging.INFO, logger="asyncapp")
    settings = CASE_SETTINGS.get(case.id)
    if settings is None:
        server, recorder = shared
        recorder.clear()  # client ports are reused from one test to the next
        replay(server.address, recorder, case)
        assert probe(server.address) == 200, f"{case.id}: not serving afterwards"
    else:
        recorder = Recorder()
        settings.setdefault("forwarded_allow_ips", "")
        with live_server(recorder, shutdown_grace=1.0, **settings) as server:
            replay(server.address, recorder, case)
            assert probe(server.address) == 200, f"{case.id}: not serving afterwards"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"{case.id}: the server logged errors: {errors}"
    OUTCOMES[case.id] = "difference" if case.id in DIFFERENCES else "expected"


def replay(address: Any, recorder: Recorder, case: Case) -> None:
    expect = case.expect
    if case.id in DIFFERENCES:
        outcome = DIFFERENCES[case.id][0]
        before = completed_before(case)
        if isinstance(outcome, int):
            run_reject(address, recorder, case, before, status=outcome)
        elif outcome == "accept":
            run_accept(address, recorder, case, wants(case))
        elif outcome in ("wait", "wait-body"):
            run_wait(address, recorder, case, before, head_seen=outcome == "wait-body")
        elif outcome.startswith("no-host"):
            hosted_status = outcome.partition(":")[2]
            run_no_host(address, recorder, case, int(hosted_status) if hosted_status else None)
        else:
            raise AssertionError(f"{case.id}: unknown outcome {outcome!r}")
        return
    if case.group == "gunicorn-valid" or expect == "accept":
        requests = wants(case)
        underscore = [n for w in requests for n, _ in w.headers or () if "_" in n]
        assert not underscore, f"{case.id} expects {underscore}: list it in DIFFERENCES"
        run_accept(address, recorder, case, requests)
    elif expect == "4xx-or-close":
        run_reject(address, recorder, case, completed_before(case))
    elif expect == "wait-for-more-data":
        run_wait(address, recorder, case, completed_before(case), head_seen(case))
    elif expect == "accept-or-4xx" or expect.startswith("server-specific"):
        EITHER[case.id] = run_either(address, recorder, case, wants(case))
    else:
        raise AssertionError(f"{case.id}: unknown expectation {expect!r}")


def completed_before(case: Case) -> list[Want]:
    """Requests complete before the one a reject/wait case is about (llhttp)."""
    if case.group != "llhttp":
        return []
    return wants(case)


def head_seen(case: Case) -> bool:
    """An llhttp case whose incomplete message has a complete head."""
    return any(
        not m["complete"] and "llhttp_headers_complete" in m for m in case.meta.get("messages", ())
    )


def request_lines(case: Case) -> list[tuple[bytes, bool]]:
    """(request line with its CRLF, needs Host) for every request in the JSON."""
    if case.group == "gunicorn-valid":
        messages = [
            (r["method"], r["uri"], r["version"], r["headers"]) for r in case.meta["requests"]
        ]
    else:
        messages = [
            (m["method"], _wire(m["url"], case.group), "HTTP/" + m["version"], m["headers"])
            for m in case.meta["messages"]
        ]
    return [
        (
            f"{method} {uri} {version}\r\n".encode("latin-1"),
            version == "HTTP/1.1" and not any(n.lower() == "host" for n, _ in headers),
        )
        for method, uri, version, headers in messages
    ]


def run_no_host(
    address: Any, recorder: Recorder, case: Case, hosted_status: int | None = None
) -> None:
    """400 at the first HTTP/1.1 request without Host; with Host, as the JSON says.

    ``hosted_status``: with Host, this answer instead (a deliberate difference).
    """
    requests = wants(case)
    lines = request_lines(case)
    missing = [index for index, (_, needs_host) in enumerate(lines) if needs_host]
    assert missing, f"{case.id}: every request has a Host header"
    run_reject(address, recorder, case, requests[: missing[0]], status=400)
    # The same bytes with a Host header after each such request line.
    data = case.data
    position = 0
    for index, (line, needs_host) in enumerate(lines):
        found = data.find(line, position)
        assert found >= 0, f"{case.id}: request line {line!r} not found"
        position = found + len(line)
        if needs_host:
            data = data[:position] + HOST + data[position:]
            position += len(HOST)
            if index < len(requests):
                requests[index].headers = [("Host", "corpus"), *(requests[index].headers or ())]
    hosted = Case(case.id + " (Host added)", case.group, case.meta, data)
    if hosted_status is not None:
        run_reject(address, recorder, hosted, requests[: missing[0]], status=hosted_status)
    elif case.expect == "accept":
        run_accept(address, recorder, hosted, requests)
    else:
        assert case.expect == "wait-for-more-data", case.expect
        run_wait(address, recorder, hosted, requests, head_seen(case))


HOST = b"Host: corpus\r\n"
