#!/usr/bin/env python3
"""Build a realistic cluster ledger fast (``tests/helpers/make_ledger.py`` has the generator).

python bench/make_ledger.py --jobs 1000000 --out /tmp/ledger.db [--seed 1] [--days 365]
python bench/make_ledger.py --jobs 1000000 --out postgresql:///bench   # an empty database
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.helpers
try:
    import llem  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
from llem.cluster.pg_ledger import PgLedger, is_postgres  # noqa: E402
from tests.helpers.make_ledger import generate, write_jobs, write_jobs_pg  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, required=True, help="number of jobs")
    parser.add_argument("--out", required=True, help="ledger file to create (must not exist)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--days", type=int, default=365, help="days of history (default 365)")
    parser.add_argument("--now", type=int, default=None, help="epoch second of 'now'")
    args = parser.parse_args(argv)
    pg = is_postgres(args.out)
    if not pg and os.path.exists(args.out):
        parser.error(f"{args.out} exists; remove it first")
    t0 = time.perf_counter()
    jobs = generate(args.jobs, seed=args.seed, now_s=args.now, days=args.days)
    n = (write_jobs_pg if pg else write_jobs)(args.out, jobs)
    elapsed = time.perf_counter() - t0
    if pg:
        with PgLedger(args.out, readonly=True) as led:
            size = led.size_bytes()
    else:
        size = os.path.getsize(args.out)
    print(
        f"{n} jobs in {elapsed:.1f} s ({n / elapsed:,.0f} jobs/s), ledger "
        f"{size / 1e6:,.0f} MB ({size / max(n, 1):,.0f} B/job): {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
