#!/usr/bin/env python3
"""Time each read of ``llem report monthly`` alone, one after the other, on a ledger.

For each statement group the report runs (the month's runs, the energy per run and day, the
idle GPUs, the nodes that ran a job, the previous period's sums) it prints the wall time, this
process's CPU and, with ``--pgdata``, the CPU of the PostgreSQL server behind it (postmaster
and every backend and parallel worker, from ``/proc``: the server must run on this host and be
readable). The report runs these reads at the same time on two cores, so its wall time is
about the sum of all CPU over two, not the longest read: this is where to look for what to
cut (``docs/performance.md``).

The carbon factors are those of the configuration in effect (``LLEM_CONFIG``), as the
report's: the previous period is read differently for an annual intensity and an hourly series.

Usage: python bench/bench_report_reads.py --ledger PATH|URL --month YYYY-MM [--pgdata DIR]
           [--repeat R] [--account A]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llem import carbon  # noqa: E402
from llem import config as config_mod  # noqa: E402
from llem.cluster import report_queries as q  # noqa: E402
from llem.report.period import month_period, previous_period  # noqa: E402


def server_cpu_s(pgdata: Path | None) -> float:
    """CPU seconds of the server's processes so far (children that ended included)."""
    if pgdata is None:
        return 0.0
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: counted in the postmaster's reaped children
        pid = int(stat.parent.name)
        if pid != postmaster and int(fields[1]) != postmaster:  # fields[1]: the parent
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == postmaster:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return total / tick


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ledger", required=True, help="SQLite path or postgresql:// URL")
    ap.add_argument("--month", required=True, help="YYYY-MM")
    ap.add_argument("--pgdata", type=Path, help="the PostgreSQL server's data directory")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--account")
    args = ap.parse_args()

    # the carbon factors of the configuration in effect (LLEM_CONFIG, as the report's): an
    # annual intensity and an hourly series read the previous period differently
    config = dataclasses.replace(config_mod.load(), ledger=args.ledger)
    period = month_period(args.month)
    previous = previous_period(period)
    hours = previous.hours() + period.hours()
    g_per_uj = carbon.factors(config, None, hours=hours).g_per_uj_by_hour(hours)
    s, e, account = period.start_ns, period.end_ns, args.account
    with q.open_readonly(args.ledger) as ledger:
        apart = q.uses_run_spans(ledger)
        q.load_hour_factors(ledger, g_per_uj)
        reads = {
            "runs": lambda: q.runs(ledger, s, e, account, fast_energy=apart),
            "energy": lambda: q.energy_by_run_day(ledger, s, e, account, fast_apart=apart),
            "idle": lambda: q.idle_gpus(ledger, s, e, q.DEFAULT_IDLE_W, account),
            "nodes": lambda: (q.node_hours(ledger, s, e), q.job_nodes_in_period(ledger, s, e)),
            "previous": lambda: q.period_totals(
                ledger,
                previous.start_ns,
                previous.end_ns,
                q.DEFAULT_IDLE_W,
                account,
                g_per_uj_by_hour=g_per_uj,
            ),
        }
        print(f"{'read':10s} {'wall s':>7s} {'client':>7s} {'server':>7s} {'rows':>9s}")
        for _ in range(args.repeat):
            sums = [0.0, 0.0, 0.0]
            for name, read in reads.items():
                server, cpu, wall = (
                    server_cpu_s(args.pgdata),
                    time.process_time(),
                    time.perf_counter(),
                )
                rows = read()
                wall = time.perf_counter() - wall
                cpu = time.process_time() - cpu
                server = server_cpu_s(args.pgdata) - server
                n = sum(map(len, rows)) if isinstance(rows, tuple) else len(rows)
                print(f"{name:10s} {wall:7.2f} {cpu:7.2f} {server:7.2f} {n:9,d}")
                for i, v in enumerate((wall, cpu, server)):
                    sums[i] += v
            print(f"{'all':10s} {sums[0]:7.2f} {sums[1]:7.2f} {sums[2]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
