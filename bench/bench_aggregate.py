#!/usr/bin/env python3
"""Aggregation rate: slices and jobs merged per second, a pass with nothing new, ledger size.

Generates a spool with bench/make_spool.py (default 100 nodes x 100 job slices each = 10,000
job slices, plus one node slice of 24 hours per node), then times ``aggregate_once`` on a
fresh ledger, a second pass over an empty spool, and a re-merge of the same slices (all
unchanged, the idempotence path). Runs in well under two minutes on 2 cores.

Usage: python bench/bench_aggregate.py [--nodes N] [--jobs M] [--batch B]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_spool import make_spool

from llem.aggregate import aggregate_once
from llem.config import AggregateConfig, Config


def ledger_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=100, help="job slices per node")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llem-bench-") as tmp:
        root = Path(tmp)
        template = root / "template"
        t0 = time.perf_counter()
        counts = make_spool(template, args.nodes, args.jobs)
        total = counts["job_slices"] + counts["node_slices"]
        print(f"generated {counts['job_slices']} job slices ({counts['jobs']} jobs) and "
              f"{counts['node_slices']} node slices in {time.perf_counter() - t0:.1f} s; "
              f"spool {sum(p.stat().st_size for p in template.iterdir()) / 1e6:.1f} MB")
        cfg = Config(cluster="bench", state_dir=str(root / "state"),
                     spool_dir=str(root / "spool"), ledger=str(root / "ledger" / "ledger.db"),
                     aggregate=AggregateConfig(processed="delete", batch_size=args.batch))
        shutil.copytree(template, cfg.spool_dir)
        res = aggregate_once(cfg)
        print(f"first pass: {res.merged} slices in {res.elapsed_s:.2f} s = "
              f"{res.merged / res.elapsed_s:,.0f} slices/s, {res.jobs / res.elapsed_s:,.0f} "
              f"jobs/s ({res.jobs} jobs, {len(res.quarantined)} quarantined)")
        assert res.merged == total, (res.merged, total)
        res2 = aggregate_once(cfg)
        print(f"second pass, nothing new: {res2.elapsed_s * 1000:.0f} ms")
        shutil.rmtree(cfg.spool_dir)
        shutil.copytree(template, cfg.spool_dir)
        res3 = aggregate_once(cfg)
        print(f"same slices again (all unchanged): {res3.unchanged} in {res3.elapsed_s:.2f} s ="
              f" {res3.unchanged / res3.elapsed_s:,.0f} slices/s")
        size = ledger_bytes(cfg.ledger)
        print(f"ledger: {size / 1e6:.1f} MB, {size / res.jobs:,.0f} bytes per job, "
              f"{size / counts['job_slices']:,.0f} bytes per job slice")


if __name__ == "__main__":
    main()
