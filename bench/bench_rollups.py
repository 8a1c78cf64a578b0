#!/usr/bin/env python3
"""Merge-time cost of the report's roll-ups (``llem.cluster.rollups``), per slice, both backends.

Generates a spool with bench/make_spool.py (``--nodes`` x ``--jobs`` job slices plus one node
slice per node), prepares every slice once, then merges them in batches of ``--batch`` into a
fresh ledger, timing the whole merge and, separately, the roll-up hook inside it
(``Ledger._rollup_job_node``, ``PgLedger._rollup_job_nodes``). With ``--postgres`` the same on
a throwaway PostgreSQL server (``tests/helpers/postgres.py``).

Usage: python bench/bench_rollups.py [--nodes 200] [--jobs 20] [--batch 500] [--postgres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from llem.cluster.ledger import Ledger, digest, prepare  # noqa: E402
from llem.cluster.pg_ledger import PgLedger  # noqa: E402
from tests.helpers.make_spool import make_spool  # noqa: E402


def _items(spool: Path) -> list:
    out = []
    for path in sorted(spool.iterdir()):
        if path.suffix == ".json":
            data = path.read_bytes()
            import json

            out.append(prepare(json.loads(data), digest(data)))
    return out


def _timed(cls, name: str, spent: list[float]):
    hook = getattr(cls, name)

    def wrapper(self, *a, **k):
        t = time.perf_counter()
        try:
            return hook(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(cls, name, wrapper)
    return hook


def run(ledger, items: list, batch: int, cls, hook: str) -> tuple[float, float]:
    spent = [0.0]
    original = _timed(cls, hook, spent)
    try:
        t = time.perf_counter()
        for i in range(0, len(items), batch):
            ledger.merge_prepared(items[i : i + batch], now_ns=2**62, grace_s=3600.0)
        return time.perf_counter() - t, spent[0]
    finally:
        setattr(cls, hook, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llem-bench-rollups-"))
    counts = make_spool(work / "spool", args.nodes, args.jobs)
    items = _items(work / "spool")
    print(f"spool: {counts}; {len(items)} slices", flush=True)
    targets = [("SQLite", lambda: Ledger(work / "ledger.db"), Ledger, "_rollup_job_node")]
    server = None
    if args.postgres:
        from tests.helpers.postgres import Server

        server = Server(durable=True)
        url = server.database("rollups")
        targets.append(("PostgreSQL", lambda: PgLedger(url), PgLedger, "_rollup_job_nodes"))
    try:
        for backend, open_, cls, hook in targets:
            with open_() as ledger:
                total, spent = run(ledger, items, args.batch, cls, hook)
            n = len(items)
            print(
                f"{backend}: {n} slices merged in {total:.2f} s ({n / total:,.0f} slices/s); "
                f"roll-ups {spent:.2f} s ({spent / total * 100:.1f} % of the merge, "
                f"{spent / n * 1e6:.0f} us per slice)",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
