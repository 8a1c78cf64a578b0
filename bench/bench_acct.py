#!/usr/bin/env python3
"""Time ``llem-acct`` on a large ledger, as a user feels it (interpreter start included).

    python bench/bench_acct.py --ledger /tmp/bench/ledger.db        # an existing ledger
    python bench/bench_acct.py --jobs 1000000 --dir /tmp/bench      # build one first
    python bench/bench_acct.py --ledger postgresql://...            # a PostgreSQL ledger

Figures printed (wall seconds, best and median of ``--repeat`` runs, each a fresh process):

* ``llem-acct --user U --since 30d`` for a median user and for the busiest user of the
  last 30 days (target: under 0.3 s for a user);
* ``llem-acct -a --since 30d --totals account`` (target: under 1 s);
* ``llem-acct -a --since 30d -X -P`` (every job of the month, for scale);
* the import time of the ``llem-acct`` path (``python -X importtime``), the interpreter's own
  start for comparison, and a check that no heavy module (pandas, numpy) is imported.

Before timing, the ledger is opened once for writing, as ``llem aggregate`` opens it: a ledger
of an older schema gets its migrations then (schema 2 adds the two indexes by run end that
``--since`` uses); the time that took is printed too.
``PYTHONDONTWRITEBYTECODE`` is removed from the children's environment so that they use
compiled bytecode, as an installed llem does.

With ``--postgres`` the same ledger is then copied (``llem ledger copy``'s code, timed) into a
throwaway PostgreSQL server made with ``initdb`` (Debian's binaries, default settings but
``shared_buffers`` of ``--pg-shared-buffers``), and every command is timed on both backends;
the ledger's bytes per job on each are printed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAVY = ("pandas", "numpy", "matplotlib", "scipy")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("LLEM_CONFIG", str(HERE / "acct-bench.yaml"))
    return env


def _acct_cmd() -> list[str]:
    script = Path(sys.executable).with_name("llem-acct")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llem.cli.acct"]


def timed(cmd: list[str], repeat: int) -> tuple[float, float, int]:
    """(best, median) wall seconds over ``repeat`` fresh processes, and the output's lines."""
    times, lines = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        lines = r.stdout.count("\n")
    return min(times), statistics.median(times), lines


def import_times(cmd: list[str]) -> tuple[float, list[tuple[float, str]], list[str]]:
    """Run ``cmd`` (python arguments) under ``-X importtime``.

    Returns:
        (ms of every top-level import but the interpreter's own start-up (site, encodings),
        the five slowest top-level imports as (ms, name), heavy modules seen).
    """
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, env=_env()
    )
    top: list[tuple[float, str]] = []
    heavy = set()
    in_startup = True
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if name.strip().split(".")[0] in HEAVY:
            heavy.add(name.strip())
        if name.startswith("  "):  # nested
            continue
        if in_startup and name.strip() == "site":
            in_startup = False
            continue
        if not in_startup:
            top.append((int(cumulative) / 1000, name.strip()))
    return sum(ms for ms, _ in top), sorted(top, reverse=True)[:5], sorted(heavy)


def start_ms(repeat: int = 5) -> float:
    best = min(timed([sys.executable, "-c", "pass"], 1)[0] for _ in range(repeat))
    return best * 1000


def users_by_jobs(ledger: str, start_ns: int) -> list[tuple[str, int]]:
    from llem.cluster.pg_ledger import is_postgres

    if is_postgres(ledger):
        from llem.cluster.pg_ledger import PgLedger

        with PgLedger(ledger, readonly=True) as led:
            rows = led.query(
                'SELECT "user", COUNT(*) FROM job_runs WHERE run_end_ns >= :s '
                'GROUP BY "user" ORDER BY 2, 1',
                {"s": start_ns},
            )
            total = led.query("SELECT COUNT(*) FROM job_runs")[0][0]
        return [tuple(r) for r in rows], total
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT user, COUNT(*) FROM job_runs WHERE run_end_ns >= ? GROUP BY user ORDER BY 2",
        (start_ns,),
    ).fetchall()
    total = db.execute("SELECT COUNT(*) FROM job_runs").fetchone()[0]
    db.close()
    return rows, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", help="an existing ledger")
    parser.add_argument("--jobs", type=int, help="build a ledger of this many jobs first")
    parser.add_argument(
        "--dir",
        default="/tmp/llem-bench-acct",
        help="where to build it (a directory not writable by others)",
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--postgres", action="store_true", help="also copy it into PostgreSQL and time both"
    )
    parser.add_argument("--pg-shared-buffers", default="512MB")
    args = parser.parse_args(argv)
    if args.ledger is None:
        if not args.jobs:
            parser.error("give --ledger PATH or --jobs N")
        sys.path.insert(0, str(HERE.parent))  # for tests.helpers
        from tests.helpers import make_ledger

        os.makedirs(args.dir, mode=0o755, exist_ok=True)
        args.ledger = os.path.join(args.dir, f"ledger-{args.jobs}.db")
        if not os.path.exists(args.ledger):
            t0 = time.perf_counter()
            make_ledger.write_jobs(args.ledger, make_ledger.generate(args.jobs))
            print(f"built {args.jobs:,} jobs in {time.perf_counter() - t0:.1f} s")
    from llem.cluster.ledger import Ledger
    from llem.cluster.pg_ledger import PgLedger, is_postgres
    from llem.errors import LedgerError

    if is_postgres(args.ledger):  # an existing PostgreSQL ledger: time it as it is
        if args.postgres:
            parser.error("--postgres copies an SQLite ledger; this one is PostgreSQL already")
        t0 = time.perf_counter()
        with PgLedger(args.ledger) as led:  # migrates, as the next `llem aggregate` would
            version, size = led.schema_version(), led.size_bytes()
        print(f"ledger schema {version}, migrated, after {time.perf_counter() - t0:.2f} s")
        month_ns = (int(time.time()) - 30 * 86400) * 10**9
        users, total = users_by_jobs(args.ledger, month_ns)
        print(
            f"ledger: PostgreSQL: {total:,} job runs, {size / 1e6:,.0f} MB "
            f"({size / max(total, 1):,.0f} bytes per run); "
            f"{sum(n for _, n in users):,} runs in the last 30 days, {len(users)} users"
        )
        _time_cases(args, "PostgreSQL", args.ledger, users)
        return 0
    t0 = time.perf_counter()
    try:
        Ledger(args.ledger).close()  # migrates, as the next `llem aggregate` would
        state = "migrated"
    except LedgerError as e:
        state = f"NOT migrated ({e})"
    db = sqlite3.connect(f"file:{args.ledger}?mode=ro", uri=True)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    print(f"ledger schema {version}, {state}, after {time.perf_counter() - t0:.2f} s")
    month_ns = (int(time.time()) - 30 * 86400) * 10**9
    users, total = users_by_jobs(args.ledger, month_ns)
    size_mb = os.path.getsize(args.ledger) / 1e6
    print(
        f"ledger: {args.ledger}: {total:,} job runs, {size_mb:,.0f} MB; "
        f"{sum(n for _, n in users):,} runs in the last 30 days, {len(users)} users"
    )
    if not users:
        raise SystemExit(
            "no runs ended in the last 30 days: build the ledger with a recent "
            "--now (make_ledger.py's default is the current time)"
        )
    ledgers = [("SQLite", args.ledger)]
    server = None
    if args.postgres:
        server, url = _to_postgres(args)
        ledgers.append(("PostgreSQL", url))
    try:
        for backend, ledger in ledgers:
            _time_cases(args, backend, ledger, users)
    finally:
        if server is not None:
            server.stop()
    return 0


def _to_postgres(args):
    sys.path.insert(0, str(HERE.parent))  # for tests.helpers
    from tests.helpers.postgres import Server, copy_into

    server = Server(durable=True, settings=f"-c shared_buffers={args.pg_shared_buffers}")
    url, m = copy_into(server, args.ledger, "acct")
    print(
        f"copied into PostgreSQL: {m['rows']:,} rows in {m['seconds']:.0f} s "
        f"({m['rows'] / m['seconds']:,.0f} rows/s, {m['jobs'] / m['seconds']:,.0f} jobs/s); "
        f"{m['bytes'] / 1e6:,.0f} MB, {m['bytes'] / m['jobs']:,.0f} bytes per job "
        f"(SQLite: {m['sqlite_bytes'] / m['jobs']:,.0f})"
    )
    return server, url


def _time_cases(args, backend: str, ledger: str, users) -> None:
    print(f"-- {backend}")
    acct = _acct_cmd() + ["--ledger", ledger]
    median_user, median_n = users[len(users) // 2]
    busiest, busiest_n = users[-1]
    cases = [
        (
            f"--user {median_user} --since 30d (median user, {median_n} runs)",
            ["--user", median_user, "--since", "30d"],
            0.3,
        ),
        (
            f"--user {busiest} --since 30d (busiest user, {busiest_n} runs)",
            ["--user", busiest, "--since", "30d"],
            None,
        ),
        ("-a --since 30d --totals account", ["-a", "--since", "30d", "--totals", "account"], 1.0),
        ("-a --since 30d -X -P (every run)", ["-a", "--since", "30d", "-X", "-P"], None),
    ]
    print(f"{'command':<58} {'best s':>7} {'median s':>8} {'lines':>7}  target")
    for label, extra, target in cases:
        best, med, lines = timed(acct + extra, args.repeat)
        verdict = (
            "" if target is None else (f"< {target} s " + ("ok" if med < target else "MISSED"))
        )
        print(f"{'llem-acct ' + label:<58} {best:7.3f} {med:8.3f} {lines:7d}  {verdict}")
    if backend != "SQLite":
        return
    ms, _, heavy = import_times(["-c", "import llem.cli.acct"])
    print(f"import llem.cli.acct (the console script's import): {ms:.1f} ms")
    ms, slowest, heavy_run = import_times(
        ["-m", "llem.cli.acct", "--ledger", ledger, "--user", median_user, "--since", "30d"]
    )
    print(
        f"every import of a whole `llem-acct --user U --since 30d` run: {ms:.1f} ms; slowest: "
        + ", ".join(f"{name} {t:.1f} ms" for t, name in slowest)
    )
    print(
        f"interpreter start (python -c pass): {start_ms():.0f} ms; heavy modules imported: "
        f"{', '.join(sorted(set(heavy) | set(heavy_run))) or 'none'}"
    )


if __name__ == "__main__":
    sys.exit(main())
