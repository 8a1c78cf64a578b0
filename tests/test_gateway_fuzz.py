"""Fuzz the gateway's request parser with hypothesis: whatever the bytes, the parser returns a
checked request or refuses with a short reason; it never raises anything else.

Inputs: valid requests made by the client's own code (:func:`llem.gateway.wire.request_text`
of requests built from ``llem-acct``'s options) mutated at every key (values replaced by
other JSON: wrong types, huge and negative numbers, lone surrogates, NUL, nesting; keys
removed or added), raw JSON that Python cannot build (4,301-digit integers, nesting 5,000
deep, ``NaN``, ``1e999``), and arbitrary bytes. The same inputs go to a live gateway (in a
thread, on a Unix socket) at the end: it answers each and keeps serving.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llem.acct import build_options
from llem.gateway import wire
from llem.sockserve import Refused

RAW_TOKENS = ["1" * 4301, "[" * 5000 + "]" * 5000, "NaN", "1e999", "-1e999", '"\\ud800"']


def _valid_requests() -> list[str]:
    now = datetime(2026, 3, 5, 8, 0)
    out = []
    for raw in (
        {},
        {"allusers": True, "since": "30d", "totals": "account"},
        {"jobs": "5001,5009_1,5001.train", "states": "CD,F", "nodelist": "n[1-3]"},
        {"users": "alice,1000", "accounts": "physics", "partitions": "gpu", "names": "x"},
        {"statement": True, "starttime": "2026-01-01"},
    ):
        opts = build_options(
            ledger="/x", cluster="c1", current_user="alice", is_root=False, now=now, **raw
        )
        out.append(
            wire.request_text(
                wire.Request(
                    op="acct",
                    cluster="c1",
                    filter=opts.filter,
                    totals_by=opts.totals_by,
                    statement=opts.statement,
                    fields=tuple(c.field.name for c in opts.columns),
                )
            )
        )
    out.append(
        wire.request_text(
            wire.Request(
                op="report",
                cluster="c1",
                report=wire.ReportRequest(1, 2, "2026-03", "month", "physics", 100.0, 20, "json"),
            )
        )
    )
    for job in (wire.JobRequest("5001"), wire.JobRequest("5009_1", "c2")):
        out.append(wire.request_text(wire.Request(op="job", cluster="c1", job=job)))
    return out


VALID = _valid_requests()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["\ud800", "\x00", "a" * 300, "COMPLETED", "acct", "user"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@st.composite
def mutated(draw) -> str:
    doc = json.loads(draw(st.sampled_from(VALID)))
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths))
    how = draw(st.sampled_from(["replace", "delete", "add", "raw"]))
    if how == "delete" and path:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return json.dumps(doc)
    if how == "add":
        target = doc if not isinstance(doc.get("filter"), dict) else doc["filter"]
        target[draw(st.text(max_size=10))] = draw(json_values)
        return json.dumps(doc)
    if how == "raw":
        text = json.dumps(_set(doc, path, "\x00RAW\x00"))
        return text.replace('"\\u0000RAW\\u0000"', draw(st.sampled_from(RAW_TOKENS)))
    return json.dumps(_set(doc, path, draw(json_values)))


def _outcome(text: str) -> str:
    try:
        request = wire.parse_request(text)
    except Refused as e:
        assert len(str(e)) < 300, str(e)
        return "refused"
    assert isinstance(request, wire.Request)
    return "parsed"


def test_the_valid_requests_parse_back_to_what_was_sent():
    for text in VALID:
        request = wire.parse_request(text)
        assert wire.request_text(request) == text


@pytest.mark.parametrize(
    "text",
    [
        # found by the live test below: a list where the totals key goes raised TypeError
        '{"op": "acct", "totals_by": ["account"]}',
        '{"op": ["acct"]}',
        '{"op": {"acct": 1}}',
        '{"op": "acct", "filter": {"jobs": [["1", null, null, 4]]}}',
        '{"op": "acct", "filter": {"states": ["SLEEPING"]}}',
        '{"op": "acct", "filter": {"start_ns": true}}',
        '{"op": "acct", "filter": {"users": ["a\u0000b"]}}',
        '{"op": "acct", "filter": {"users": ["\ud800"]}}',
        '{"op": "acct", "filter": {"jobs": [["\u0661", null, null]]}}',
        '{"op": "job"}',
        '{"op": "job", "job": {"id": "../1"}}',
        '{"op": "job", "job": {"id": "1", "cluster": ""}}',
        '{"op": "job", "job": {"id": "1", "user": "root"}}',
        '{"op": "job", "job": {"id": ["1"]}}',
    ],
)
def test_replayed_bad_requests_are_refused(text):
    with pytest.raises(Refused):
        wire.parse_request(text)


def _report_of(years: int) -> str:
    end_ns = int(years * 365.25 * 86400) * 10**9
    return json.dumps(
        {
            "op": "report",
            "report": {
                "start_ns": 0,
                "end_ns": end_ns,
                "label": "x",
                "kind": "range",
                "idle_w": 100,
                "top": 20,
                "format": "json",
            },
        }
    )


def test_a_report_of_more_than_40_years_is_refused_before_any_work():
    """Replays a 146-year report: its 2.5 million hourly carbon factors were built (7.7 s of
    CPU, 290 MB) before the query's time bound applied."""
    assert wire.parse_request(_report_of(40)).report.end_ns == _report_of_ns(40)
    for years in (41, 146):
        with pytest.raises(Refused, match="a report covers at most 40 years"):
            wire.parse_request(_report_of(years))


def _report_of_ns(years: int) -> int:
    return json.loads(_report_of(years))["report"]["end_ns"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_a_mutated_request_is_parsed_or_refused_never_raises(text):
    _outcome(text)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_arbitrary_bytes_in_the_envelope_are_refused_never_raise(data):
    try:
        envelope = wire.parse_envelope(data)
    except Refused:
        return
    _outcome(envelope.request_text)


@pytest.fixture
def gateway(tmp_path):
    from llem.cluster.ledger import Ledger
    from llem.config import Config
    from llem.gateway.server import Gateway

    ledger = tmp_path / "ledger.db"
    Ledger(ledger).close()
    gw = Gateway(Config(cluster="c1", ledger=str(ledger)), socket_path=str(tmp_path / "gw.sock"))
    gw.start()
    yield gw
    gw.close()


def _ask(path, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return json.loads(out)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_live_gateway_answers_every_mutated_request_and_keeps_serving(gateway, data):
    text = data.draw(mutated())
    answer = _ask(gateway.socket_path, wire.encode_envelope(text, None))
    assert set(answer) >= {"ok"}
    assert answer["ok"] or isinstance(answer["error"], str)
    ping = _ask(gateway.socket_path, wire.encode_envelope('{"op": "ping"}', None))
    assert ping["ok"] and ping["identity"]["role"] == "admin"  # root, as the test runs
