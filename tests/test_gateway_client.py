"""Which ``ledger:`` values name the gateway, and what a client says when it is not there."""

from __future__ import annotations

import socket

import pytest

from llem.gateway.client import GatewayError, Target, ask, target_of
from llem.gateway.wire import Request, parse_listen


def test_gateway_addresses(tmp_path):
    assert target_of("llem://admin01") == Target(host="admin01", port=6880)
    assert target_of("llem://admin01:7000") == Target(host="admin01", port=7000)
    assert target_of("llem://[::1]:7000") == Target(host="::1", port=7000)
    assert target_of("llem:///run/llem-gateway/gateway.sock") == Target(
        path="/run/llem-gateway/gateway.sock"
    )
    assert target_of(str(tmp_path / "ledger.db")) is None  # a ledger file (or none yet)
    assert target_of(str(tmp_path / "gone.sock")) == Target(path=str(tmp_path / "gone.sock"))
    live = tmp_path / "live"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(live))
        assert target_of(str(live)) == Target(path=str(live))
    for bad in ("llem://", "llem://host:99999", "llem://host:x"):
        with pytest.raises(GatewayError, match="bad gateway address"):
            target_of(bad)
    assert parse_listen("0.0.0.0:6880") == ("0.0.0.0", 6880)
    assert parse_listen(":7000") == ("0.0.0.0", 7000)


def test_no_gateway_at_the_socket_is_a_clear_error(tmp_path):
    with pytest.raises(GatewayError, match=r"is not reachable \(No such file or directory\): is "):
        ask(Target(path=str(tmp_path / "gateway.sock")), Request(op="ping"))


def test_a_gateway_that_answers_nonsense_is_a_clear_error(tmp_path):
    import threading

    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(GatewayError, match="gave a malformed answer"):
        ask(Target(path=str(path)), Request(op="ping"))
    t.join()
    server.close()


def test_sacct_selection_rules_travel_in_the_request():
    """What llem-acct's options put in the run filter (sacct's time windows, -g, -q, -k/-K)
    and -T reach the gateway as they left the client; nonsense in them is refused."""
    from llem.cluster.acct_queries import RunFilter
    from llem.gateway.wire import parse_request, request_text
    from llem.sockserve import Refused

    f = RunFilter(
        start_ns=1,
        end_ns=2,
        window="state",
        groups=(0, 1000),
        qos=("normal",),
        timelimit_min=60,
        timelimit_max=120,
    )
    sent = Request(op="acct", filter=f, truncate=True)
    got = parse_request(request_text(sent))
    assert got.filter == f
    assert got.truncate is True
    for bad in (
        '{"op": "acct", "filter": {"window": "ever"}}',
        '{"op": "acct", "filter": {"groups": [-1]}}',
        '{"op": "acct", "filter": {"groups": ["wheel"]}}',
        '{"op": "acct", "filter": {"timelimit_min": 1.5}}',
        '{"op": "acct", "truncate": 1}',
    ):
        with pytest.raises(Refused):
            parse_request(bad)
