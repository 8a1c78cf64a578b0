#!/usr/bin/env python3
"""Time ``llem-acct`` through the ledger gateway against the same query on the ledger file.

    python bench/gateway.py [--jobs 20000] [--repeat 50] [--clients 50] [--munge]

A ledger of ``--jobs`` jobs (``tests/helpers/make_ledger.py``: 200 users, a year) is served
by a real ``llem serve`` process on a Unix socket (and on TCP with ``--munge``, where munged
runs). Figures printed (milliseconds; library level, the interpreter's start excluded, as it
is the same either way):

* a median user's jobs of the last 30 days, and ``-a --totals account`` of the last 30 days:
  on the ledger file (``llem.acct.report``) and through the gateway (the request, the query in
  the gateway, the answer, ``report_from_answer``), median and p95 of ``--repeat`` runs; the
  difference is the gateway's added latency (target: under 20 ms on the local socket);
* ``--clients`` clients at once, each asking ``--per-client`` times: errors (target: none),
  median, p95 and worst latency, and queries per second.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers
try:
    import llem  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from llem import acct as lib  # noqa: E402
from llem import config as config_mod  # noqa: E402
from llem.cluster import acct_queries  # noqa: E402
from llem.gateway import client, wire  # noqa: E402


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values) * 1000:6.1f} ms, p95 {p95 * 1000:6.1f} ms"


def _request(opts) -> wire.Request:
    return wire.Request(
        op="acct",
        cluster="default",
        filter=opts.filter,
        allocations=opts.allocations,
        totals_by=opts.totals_by,
        fields=tuple(c.field.name for c in opts.columns),
    )


def _start_gateway(cfg_path: Path, sock: Path, listen: str | None, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "llem.cli.main", "serve", "--socket", str(sock), "--allow-root"]
    if listen:
        args += ["--listen", listen]
    out = open(log, "wb")  # noqa: SIM115 - the process holds it
    proc = subprocess.Popen(
        args, env={**os.environ, "LLEM_CONFIG": str(cfg_path)}, stdout=out, stderr=out
    )
    deadline = time.monotonic() + 30
    while "gateway: serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"llem serve did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=10)
    parser.add_argument("--munge", action="store_true", help="also over TCP with MUNGE")
    args = parser.parse_args(argv)
    from tests.helpers import make_ledger

    tmp = Path(tempfile.mkdtemp(prefix="llem-bench-gw-"))
    ledger = tmp / "ledger.db"
    t0 = time.perf_counter()
    make_ledger.write_jobs(ledger, make_ledger.generate(args.jobs, seed=1, days=365))
    print(f"ledger: {args.jobs} jobs in {time.perf_counter() - t0:.1f} s")
    cfg_path = tmp / "llem.yaml"
    cfg_path.write_text(
        f"ledger: {ledger}\ncarbon:\n  region: DE\n  intensity_g_per_kwh: 400\n  pue: 1.2\n"
    )
    os.environ["LLEM_CONFIG"] = str(cfg_path)
    cfg = config_mod.load()
    with acct_queries.open_ledger(ledger) as led:
        users = [
            u for (u,) in led.query("SELECT user FROM job_runs GROUP BY user ORDER BY COUNT(*)")
        ]
    median_user = users[len(users) // 2]
    now = datetime.now()
    queries = {
        f"user {median_user} --since 30d": lib.build_options(
            ledger=str(ledger),
            cluster="default",
            current_user=median_user,
            is_root=False,
            now=now,
            since="30d",
        ),
        "-a --since 30d --totals account": lib.build_options(
            ledger=str(ledger),
            cluster="default",
            current_user="root",
            is_root=True,
            now=now,
            since="30d",
            allusers=True,
            totals="account",
        ),
    }
    sock = tmp / "gateway.sock"
    listen = "127.0.0.1:0" if args.munge else None
    log = tmp / "gateway.log"
    proc = _start_gateway(cfg_path, sock, listen, log)
    targets = {"unix socket": client.Target(path=str(sock))}
    if args.munge:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        targets["tcp + munge"] = client.Target(host="127.0.0.1", port=port)
    try:
        for name, opts in queries.items():
            local, lines = [], 0
            for _ in range(args.repeat):
                t = time.perf_counter()
                with acct_queries.open_ledger(ledger) as led:
                    text = lib.report(led, opts, cfg).stdout
                local.append(time.perf_counter() - t)
                lines = text.count("\n")
            print(f"{name} ({lines} lines)")
            print(f"  ledger file      {_ms(local)}")
            for tname, target in targets.items():
                remote = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    answer = client.ask(
                        target, _request(opts), munge_socket=cfg.gateway.munge_socket
                    )
                    out = lib.report_from_answer(answer, opts).stdout
                    remote.append(time.perf_counter() - t)
                    assert out == text, "the gateway's output differs from the ledger file's"
                added = (statistics.median(remote) - statistics.median(local)) * 1000
                print(f"  {tname:<16} {_ms(remote)}; added {added:5.1f} ms")
        opts = queries[f"user {median_user} --since 30d"]
        for tname, target in targets.items():
            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()

            def one(target=target, latencies=latencies, errors=errors, lock=lock) -> None:
                for _ in range(args.per_client):
                    t = time.perf_counter()
                    try:
                        client.ask(target, _request(opts), munge_socket=cfg.gateway.munge_socket)
                    except Exception as e:  # noqa: BLE001
                        with lock:
                            errors.append(str(e))
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t)

            threads = [threading.Thread(target=one) for _ in range(args.clients)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            print(
                f"{args.clients} clients x {args.per_client} queries ({tname}): "
                f"{len(errors)} errors, {_ms(latencies)}, worst {max(latencies) * 1000:.0f} ms, "
                f"{len(latencies) / wall:.0f} queries/s"
            )
            for err in errors[:3]:
                print(f"  error: {err}")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
