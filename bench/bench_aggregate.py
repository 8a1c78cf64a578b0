#!/usr/bin/env python3
"""Aggregation rate: slices and jobs merged per second, a pass with nothing new, ledger size.

Generates a spool with bench/make_spool.py (default 100 nodes x 100 job slices each = 10,000
job slices, plus one node slice of 24 hours per node), then, for each repetition, copies it
into a fresh spool, flushes it to disk (``sync``: on a cluster the Epilogs wrote the slices
long before the pass) and times ``aggregate_once`` on a fresh ledger; then a second pass over
an empty spool and a re-merge of the same slices (all unchanged, the idempotence path).

With ``--postgres`` the ledger is on PostgreSQL: a throwaway server made with ``initdb`` in a
temporary folder (Debian's binaries, PostgreSQL's durable defaults: fsync and synchronous
commit on), or the server of ``--postgres-url`` (an empty database). Ledger bytes are then
the tables', partitions' and indexes' on disk (``pg_total_relation_size``).

Usage: python bench/bench_aggregate.py [--nodes N] [--jobs M] [--batch B] [--repeat R]
           [--processed archive|delete] [--readers auto|K] [--template DIR]
           [--postgres [--pg-settings '-c name=value ...'] | --postgres-url URL]
           [--first-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from llem.cluster.aggregate import aggregate_once  # noqa: E402
from llem.config import AggregateConfig, Config  # noqa: E402
from tests.helpers.make_spool import make_spool  # noqa: E402


def ledger_bytes(path: str) -> int:
    from llem.cluster.pg_ledger import PgLedger, is_postgres

    if is_postgres(path):
        with PgLedger(path, readonly=True) as led:
            return led.size_bytes()
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def cpu_s() -> tuple[float, float]:
    """CPU seconds of this process and of its finished children (the reader processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def server_cpu_s(server) -> float:
    """CPU seconds of the throwaway PostgreSQL server so far: its processes alive now (their
    working folder is its data folder) and, through the postmaster's count of its reaped
    children, the backends that have ended (an aggregator's, once its pass closed it)."""
    if server is None:
        return 0.0
    data = os.path.realpath(server.data)
    with open(os.path.join(data, "postmaster.pid")) as f:
        postmaster = f.readline().strip()
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd") != data:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone, or not ours to read
            continue
        total += int(fields[11]) + int(fields[12])
        if pid == postmaster:
            total += int(fields[13]) + int(fields[14])
    return total / os.sysconf("SC_CLK_TCK")


def template_spool(path: Path, nodes: int, jobs: int) -> dict[str, int]:
    """Generate the spool once; reuse it when a previous run left it (``--template``)."""
    marker = path / ".counts"
    if marker.exists():
        job_slices, n_jobs, node_slices = map(int, marker.read_text().split())
        return {"job_slices": job_slices, "jobs": n_jobs, "node_slices": node_slices}
    t0 = time.perf_counter()
    counts = make_spool(path, nodes, jobs)
    marker.write_text(f"{counts['job_slices']} {counts['jobs']} {counts['node_slices']}\n")
    print(
        f"generated {counts['job_slices']} job slices ({counts['jobs']} jobs) and "
        f"{counts['node_slices']} node slices in {time.perf_counter() - t0:.1f} s"
    )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=100, help="job slices per node")
    parser.add_argument(
        "--batch",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="aggregate.batch_size (auto: 500 on SQLite, 2000 on PostgreSQL)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="first passes to time")
    parser.add_argument(
        "--processed",
        choices=("archive", "delete"),
        default="archive",
        help="what becomes of merged slices (default: archive, as shipped)",
    )
    parser.add_argument("--readers", default="auto", help="aggregate.readers (auto or K)")
    parser.add_argument(
        "--template", type=Path, help="keep the generated spool here and reuse it in later runs"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="ledger on a throwaway PostgreSQL server"
    )
    parser.add_argument("--postgres-url", help="ledger on this (empty) PostgreSQL database")
    parser.add_argument(
        "--pg-settings",
        default="",
        help="server settings for --postgres, as '-c name=value ...' (docs/admin-install.md)",
    )
    parser.add_argument(
        "--first-only", action="store_true", help="time first passes only (no second pass)"
    )
    args = parser.parse_args()
    readers = args.readers if args.readers == "auto" else int(args.readers)
    server = None
    if args.postgres and not args.postgres_url:
        from tests.helpers.postgres import Server

        server = Server(durable=True, settings=args.pg_settings)
    try:
        _run(args, readers, server)
    finally:
        if server is not None:
            server.stop()


def _ledger(run: Path, args, server, rep: int) -> str:
    if server is not None:
        return server.database(f"bench{rep}")
    if args.postgres_url:
        return args.postgres_url
    return str(run / "ledger" / "ledger.db")


def _run(args, readers, server) -> None:
    with tempfile.TemporaryDirectory(prefix="llem-bench-") as tmp:
        root = Path(tmp)
        template = args.template or root / "template"
        counts = template_spool(template, args.nodes, args.jobs)
        total = counts["job_slices"] + counts["node_slices"]
        size = sum(e.stat().st_size for e in os.scandir(template) if e.name.endswith(".json"))
        print(
            f"spool: {total} slices, {size / 1e6:.1f} MB; processed: {args.processed}, "
            f"readers: {readers}, batch: {args.batch}, CPUs: {os.cpu_count()}, ledger: "
            + ("PostgreSQL" if server or args.postgres_url else "SQLite")
            + (f" ({args.pg_settings or 'default settings'})" if server else "")
        )
        rates = []
        for rep in range(args.repeat):
            run = root / f"run{rep}"
            cfg = Config(
                cluster="bench",
                state_dir=str(run / "state"),
                spool_dir=str(run / "spool"),
                ledger=_ledger(run, args, server, rep),
                aggregate=AggregateConfig(
                    processed=args.processed, batch_size=args.batch, readers=readers
                ),
            )
            shutil.copytree(template, cfg.spool_dir, ignore=shutil.ignore_patterns(".counts"))
            os.sync()
            (me0, kids0), db0, load0 = cpu_s(), server_cpu_s(server), os.getloadavg()[0]
            res = aggregate_once(cfg)
            (me1, kids1), db1 = cpu_s(), server_cpu_s(server)
            assert res.merged == total, (res.merged, total)
            rates.append(res.merged / res.elapsed_s)
            print(
                f"first pass: {res.merged} slices in {res.elapsed_s:.2f} s = {rates[-1]:,.0f} "
                f"slices/s, {res.jobs / res.elapsed_s:,.0f} jobs/s ({res.jobs} jobs, "
                f"{len(res.quarantined)} quarantined); CPU: aggregator {me1 - me0:.1f} s, "
                f"readers {kids1 - kids0:.1f} s"
                + (f", server {db1 - db0:.1f} s" if server else "")
                + f"; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after"
            )
            if rep < args.repeat - 1:
                shutil.rmtree(run)
        if args.repeat > 1:
            print(
                f"first pass over {args.repeat} runs: best {max(rates):,.0f}, median "
                f"{statistics.median(rates):,.0f}, worst {min(rates):,.0f} slices/s"
            )
        if args.first_only:
            return
        res2 = aggregate_once(cfg)
        print(f"second pass, nothing new: {res2.elapsed_s * 1000:.0f} ms")
        size = ledger_bytes(cfg.ledger)
        shutil.rmtree(cfg.spool_dir)
        shutil.copytree(template, cfg.spool_dir, ignore=shutil.ignore_patterns(".counts"))
        os.sync()
        res3 = aggregate_once(cfg)
        print(
            f"same slices again (all unchanged): {res3.unchanged} in {res3.elapsed_s:.2f} s ="
            f" {res3.unchanged / res3.elapsed_s:,.0f} slices/s"
        )
        print(
            f"ledger: {size / 1e6:.1f} MB, {size / res.jobs:,.0f} bytes per job, "
            f"{size / counts['job_slices']:,.0f} bytes per job slice"
        )


if __name__ == "__main__":
    main()
