#!/usr/bin/env python3
"""Time the ledger gateway's reads on PostgreSQL with and without row-level security.

    python bench/bench_rls.py [--jobs 50000] [--repeat 30]

A ledger of ``--jobs`` generated jobs (``tests/helpers/make_ledger.py``: 200 users in 40
accounts, 60 days) on a throwaway PostgreSQL server (``tests/helpers/postgres.py``), made
private by ``llem ledger init --roles``. Each query runs as the ledger's owner (a superuser:
no policy applies) and as a login of ``llem_gateway`` with the caller set per transaction
(``PgLedger.as_caller``), the gateway's own restriction in both; median and p95 in ms:

* ``llem job``: :func:`llem.cluster.job_queries.load_job` of a busy user's job;
* ``llem-acct``: :func:`llem.cluster.acct_queries.select_runs` of that user's last 30 days;
* the same 30 days for a coordinator of one account, and for an admin (every run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers
try:
    import llem  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from llem.cluster.acct_queries import RunFilter, Visibility, select_runs  # noqa: E402
from llem.cluster.job_queries import load_job  # noqa: E402
from llem.cluster.pg_ledger import PgLedger  # noqa: E402
from tests.helpers import make_ledger  # noqa: E402
from tests.helpers.postgres import Server  # noqa: E402

NOW_S = 1_780_000_000


def timed(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm the caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    import psycopg

    server = Server()
    try:
        url = server.database("rls")
        print(f"writing {args.jobs:,} jobs ...", flush=True)
        jobs = make_ledger.generate(args.jobs, seed=3, now_s=NOW_S, days=60, cluster="c1")
        make_ledger.write_jobs_pg(url, jobs)
        with PgLedger(url) as led:
            led.grant_roles()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE ROLE gw LOGIN IN ROLE llem_gateway")
        gw_url = url.replace("llem_test@", "gw@")
        with PgLedger(url, readonly=True) as owner:
            ((uid, account, job_id),) = owner.query(
                "SELECT uid, MIN(account), MAX(job_id) FROM job_runs GROUP BY uid "
                "ORDER BY COUNT(*) DESC LIMIT 1"
            )
        start_ns = (NOW_S - 30 * 86400) * 10**9
        user = Visibility(uid=uid)
        coord = Visibility(uid=uid, accounts=(account,))
        cases = (
            ("llem job (user)", user, lambda led, v: load_job(led, "c1", job_id, v)),
            (
                "llem-acct 30 days (user)",
                user,
                lambda led, v: select_runs(led, RunFilter(start_ns=start_ns, visible=v)),
            ),
            (
                "llem-acct 30 days (coordinator)",
                coord,
                lambda led, v: select_runs(led, RunFilter(start_ns=start_ns, visible=v)),
            ),
            (
                "llem-acct 30 days (admin)",
                None,
                lambda led, v: select_runs(led, RunFilter(start_ns=start_ns, visible=v)),
            ),
        )
        print(f"| query ({args.jobs:,} jobs) | rows | no RLS (owner) | RLS (llem_gateway) |")
        print("|---|---|---|---|")
        with PgLedger(url, readonly=True) as owner, PgLedger(gw_url, readonly=True) as gw:
            for name, visible, body in cases:
                rows = body(owner, visible)
                n = len(rows) if isinstance(rows, list) else len(rows.nodes)

                def as_gw(body=body, visible=visible):
                    args_ = (None, (), True) if visible is None else (visible.uid, visible.accounts)
                    with gw.as_caller(*args_):
                        return body(gw, visible)

                got = as_gw()
                assert (len(got) if isinstance(got, list) else len(got.nodes)) == n, name
                plain = timed(lambda body=body, visible=visible: body(owner, visible), args.repeat)
                rls = timed(as_gw, args.repeat)
                print(
                    f"| {name} | {n:,} | {plain[0]:.1f} (p95 {plain[1]:.1f}) "
                    f"| {rls[0]:.1f} (p95 {rls[1]:.1f}) |",
                    flush=True,
                )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
