#!/usr/bin/env python3
"""Time ``llem report monthly`` (html, with plots) on a ledger, and say how big it is.

Without ``--ledger``, or with a ``--ledger`` path that does not exist yet, a ledger is built
first: ``--jobs`` jobs shaped like ``bench/make_spool.py``'s (1-4 nodes of 2 CPU packages,
2 DRAM zones and 4 GPUs, 0.2-6 h, 1-2 windows, one job in 8 with idle GPUs) packed on
``jobs / 170`` nodes from 2024-02-15, so that March 2024 is a full month and February holds
the previous one; merged through ``Ledger.merge`` in batches, as ``llem aggregate`` merges, plus
each node's hourly totals. Building is the slow part (about 1,000 jobs/s); a big ledger from
``bench/make_ledger.py`` can be given with ``--ledger PATH --month YYYY-MM``.

With ``--postgres`` the ledger is then copied (``llem ledger copy``'s code) into a throwaway
PostgreSQL server made with ``initdb`` and the report is timed on both backends.

With ``--raw`` the in-process report is also timed from the raw energy rows, without the
roll-ups kept at merge time (``llem.cluster.rollups``), for the comparison.

Usage: python bench/bench_report.py [--jobs N] [--ledger PATH|URL] [--month 2024-03] [--repeat R]
           [--postgres] [--raw]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from llem import slices  # noqa: E402
from llem.cluster.ledger import Ledger, digest  # noqa: E402
from tests.helpers import make_spool  # noqa: E402

T0 = int(datetime(2024, 2, 15, tzinfo=timezone.utc).timestamp())
JOBS_PER_NODE = 170
S = 10**9


def build(path: Path, jobs: int, seed: int = 1) -> dict[str, int]:
    """Merge ``jobs`` generated jobs (and their nodes' hourly totals) into a new ledger."""
    rng = random.Random(seed)
    nodes = max(4, jobs // JOBS_PER_NODE)
    clock = [T0] * nodes
    batch: list[tuple[dict, str]] = []
    counts = {"jobs": 0, "job_slices": 0, "node_slices": 0, "nodes": nodes}
    t = time.perf_counter()
    with Ledger(path) as ledger:

        def flush() -> None:
            ledger.merge(batch, now_ns=(T0 + 90 * 86400) * S, grace_s=3600.0)
            batch.clear()

        for job_id in range(1, jobs + 1):
            n_nodes = rng.choice((1, 1, 2, 4))
            first = rng.randrange(0, nodes - n_nodes + 1)
            start_s = max(clock[first : first + n_nodes]) + rng.randint(1, 600)
            hours = rng.uniform(0.2, 6.0)
            idle = job_id % 8 == 0
            for data in make_spool.job_slices(job_id, first, n_nodes, start_s, hours, rng):
                data["job"]["partition"] = ("gpu", "gpu", "gpu-long", "debug")[job_id % 4]
                data["job"]["tag"] = (None, "llm", "md", "cfd")[job_id % 4]
                if idle:  # allocated GPUs near idle power: waste
                    for row in data["energy"]:
                        if row["device"].startswith("nvml:"):
                            row["energy_uj"] //= 8
                    _fix_totals(data)
                slices.validate(data)
                batch.append((data, digest(json.dumps(data, sort_keys=True).encode())))
                counts["job_slices"] += 1
            for k in range(first, first + n_nodes):
                clock[k] = start_s + int(hours * 3600) + 1
            counts["jobs"] += 1
            if len(batch) >= 500:
                flush()
        last_hour = max(clock) // 3600 * 3600 + 3600
        for node in range(nodes):
            data = make_spool.node_slice(node, T0, (last_hour - T0) // 3600)
            data["cluster"] = "bench"
            batch.append((data, digest(json.dumps(data, sort_keys=True).encode())))
            counts["node_slices"] += 1
            if len(batch) >= 50:
                flush()
        flush()
    counts["build_s"] = round(time.perf_counter() - t, 1)
    return counts


def _fix_totals(data: dict) -> None:
    for key, tot in data["node_totals"].items():
        att = sum(r["energy_uj"] for r in data["energy"] if r["device"] == key)
        tot.update(attributed_uj=att, measured_uj=att + tot["remainder_uj"])


def ledger_size(path: Path, month: str) -> dict:
    from llem.cluster import report_queries as q
    from llem.report import frames

    p = frames.month_period(month)
    with q.open_readonly(path) as ledger:

        def count(sql, *a):
            return ledger.query(sql, a)[0][0]

        size = ledger.size_bytes() if hasattr(ledger, "size_bytes") else os.path.getsize(path)
        return {
            "file_mb": round(size / 2**20, 1),
            "job_runs": count("SELECT COUNT(*) FROM job_runs"),
            "job_runs_in_month": count(
                "SELECT COUNT(*) FROM job_runs WHERE run_end_ns >= ? AND run_start_ns < ?",
                p.start_ns,
                p.end_ns,
            ),
            "job_nodes": count("SELECT COUNT(*) FROM job_nodes"),
            "job_energy_rows": count("SELECT COUNT(*) FROM job_energy"),
            "node_hours_rows": count("SELECT COUNT(*) FROM node_hours"),
        }


def time_in_process(path: Path, month: str, rollups: bool = True) -> dict[str, float]:
    from llem.cluster import report_queries as q
    from llem.config import CarbonConfig, Config
    from llem.report import build_report, frames, plots, render

    cfg = Config(cluster="bench", ledger=str(path), carbon=CarbonConfig(region="DE", pue=1.3))
    t0 = time.perf_counter()
    with q.open_readonly(path) as ledger:
        rep = build_report(ledger, cfg, frames.month_period(month), rollups=rollups)
    t1 = time.perf_counter()
    pngs = plots.make_plots(rep)
    t2 = time.perf_counter()
    page = render.to_html(rep, pngs)
    t3 = time.perf_counter()
    return {
        "queries_and_frames_s": t1 - t0,
        "plots_s": t2 - t1,
        "html_s": t3 - t2,
        "html_kb": len(page) / 1024,
        "jobs_in_report": rep.totals["jobs"],
        "energy_kwh": rep.totals["energy_kwh"],
    }


def time_cli(path: Path, month: str, out: Path) -> float:
    cfg = out / "llem.yaml"
    cfg.write_text(f"cluster: bench\nledger: {path}\ncarbon:\n  region: DE\n  pue: 1.3\n")
    env = dict(os.environ, LLEM_CONFIG=str(cfg))
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "llem.cli.main",
            "report",
            "monthly",
            "--month",
            month,
            "--format",
            "html",
            "--out",
            str(out / "html"),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs to generate")
    parser.add_argument(
        "--ledger",
        help="reuse this ledger (a file, built when absent, or a PostgreSQL URL)",
    )
    parser.add_argument("--month", default="2024-03")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="also time it on PostgreSQL")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="also time the in-process report from the raw energy rows (no roll-ups)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llem-bench-report-"))
    from llem.cluster.pg_ledger import is_postgres

    if args.ledger and is_postgres(args.ledger):
        # an existing PostgreSQL ledger (bench/make_ledger.py --out postgresql://...)
        if args.postgres:
            parser.error("--postgres copies a SQLite ledger; --ledger is PostgreSQL already")
        targets = [("PostgreSQL", args.ledger)]
    else:
        path = Path(args.ledger) if args.ledger else work / "ledger.db"
        if not path.exists():
            print(f"building {path}: {args.jobs:,} jobs ...", flush=True)
            print("built:", build(path, args.jobs), flush=True)
        targets = [("SQLite", path)]
    server = None
    if args.postgres:
        from tests.helpers.postgres import Server, copy_into

        server = Server(durable=True, settings="-c shared_buffers=512MB")
        url, m = copy_into(server, path, "report")
        print(f"copied into PostgreSQL in {m['seconds']:.0f} s ({m['rows']:,} rows)", flush=True)
        targets.append(("PostgreSQL", url))
    try:
        for backend, ledger in targets:
            print(f"-- {backend}", flush=True)
            _time(args, ledger, work)
    finally:
        if server is not None:
            server.stop()


def _time(args, path, work: Path) -> None:
    print("ledger:", json.dumps(ledger_size(path, args.month)), flush=True)
    for i in range(args.repeat):
        parts = time_in_process(path, args.month)
        cli_s = time_cli(path, args.month, work)
        print(
            f"run {i + 1}: llem report monthly --month {args.month} --format html "
            f"(CLI, new process, incl. imports): {cli_s:.2f} s; in-process: queries+frames "
            f"{parts['queries_and_frames_s']:.2f} s, plots {parts['plots_s']:.2f} s, html "
            f"{parts['html_s']:.2f} s ({parts['html_kb']:.0f} kB); "
            f"{parts['jobs_in_report']:,} jobs, {parts['energy_kwh']:,.0f} kWh",
            flush=True,
        )
        if args.raw:
            raw = time_in_process(path, args.month, rollups=False)
            print(
                f"run {i + 1}, raw energy rows (no roll-ups), in-process: queries+frames "
                f"{raw['queries_and_frames_s']:.2f} s, plots {raw['plots_s']:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
