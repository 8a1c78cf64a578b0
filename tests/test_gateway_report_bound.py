"""A report asked of the gateway reads the ledger on several connections (the previous
month's sums, the energy per run and day, the idle GPUs and the nodes' totals each on one of
its own). The gateway's time bound (``gateway.query_timeout_s``) must hold on every one of
them: once it held only on the first, and a caller's report kept the others' statements
running as long as they took, holding the gateway's query slot and the database.

The attack is replayed by making one side read slow (a statement that runs for a minute or more
unbounded) and asking for the report through the gateway's own code path."""

from __future__ import annotations

import time

import pytest

from llem.cluster import report_queries
from llem.config import Config, GatewayConfig
from llem.gateway import wire
from llem.gateway.privacy import Role
from llem.gateway.server import Gateway
from llem.report.period import month_period
from tests.helpers import make_ledger

NOW_S = 1_780_000_000  # 2026-05-28
BOUND_S = 0.5
SLOW = {
    # each runs for a minute or more unless the bound stops it
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 500000000) SELECT COUNT(*) FROM c",
    "postgresql": "SELECT pg_sleep(90)",
}


def _ledger(backend: str, tmp_path, pg_server) -> str:
    jobs = list(make_ledger.generate(200, seed=5, now_s=NOW_S, days=60, cluster="c1"))
    if backend == "sqlite":
        path = str(tmp_path / "ledger.db")
        make_ledger.write_jobs(path, jobs)
        return path
    url = pg_server.database()
    make_ledger.write_jobs_pg(url, jobs)
    return url


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_slow_side_read_of_a_report_is_stopped_at_the_gateways_bound(
    backend, tmp_path, monkeypatch, request
):
    pg_server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    ledger = _ledger(backend, tmp_path, pg_server)
    started = []

    def slow_previous_month(conn, *args, **kwargs):
        started.append(time.monotonic())
        conn.query(SLOW[backend])
        raise AssertionError("the slow statement was not stopped")

    # the previous month's sums: a read on a connection of the report's own
    monkeypatch.setattr(report_queries, "period_totals", slow_previous_month)
    gw = Gateway(
        Config(cluster="c1", ledger=ledger, gateway=GatewayConfig(query_timeout_s=BOUND_S)),
        socket_path=None,
    )
    period = month_period("2026-05")
    req = wire.ReportRequest(
        period.start_ns, period.end_ns, period.label, period.kind, None, 100.0, 20, "json"
    )
    t0 = time.monotonic()
    answer = gw._report(req, Role("admin", None))
    elapsed = time.monotonic() - t0
    assert started, "the side read did not run"
    assert answer["ok"] is False
    # the gateway's words, not the database's error (on PostgreSQL it names the database)
    assert answer["error"] == "the report ran longer than 0.5 s"
    # stopped by the bound, not when the statement ends
    assert elapsed < 20, elapsed


def test_the_report_prepares_every_connection_it_opens(tmp_path):
    """build_report hands each of its own connections to ``prepare`` before reading."""
    from llem.report import build_report

    path = str(tmp_path / "ledger.db")
    make_ledger.write_jobs(
        path, make_ledger.generate(50, seed=2, now_s=NOW_S, days=40, cluster="c1")
    )
    prepared = []
    with report_queries.open_readonly(path) as ledger:
        build_report(
            ledger,
            Config(cluster="c1", ledger=path),
            month_period("2026-05"),
            prepare=prepared.append,
        )
    # the previous month, the energy per run and day, the idle GPUs, the nodes' totals
    assert len(prepared) == 4
    assert len({id(c) for c in prepared}) == 4 and all(c is not ledger for c in prepared)
