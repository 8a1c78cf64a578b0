#!/usr/bin/env python3
"""Per-step energy's cost (issue 19): reading the step cgroups of one job per sampler tick
(``CgroupLocator.step_cpu`` on a cgroup v2 tree of ``--steps`` steps), and the export's
split of a job's energy between its steps (``NodeStore.run_steps``) for a job of
``--intervals`` intervals with three steps, against the same job without steps.

Usage: python bench/bench_steps.py [--steps 3,64] [--reads 1000] [--intervals 3600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from llem.node.export import export_job  # noqa: E402
from llem.node.usage import CgroupLocator  # noqa: E402
from tests.helpers.nodes import T0, S, build_store, node_config  # noqa: E402


def step_reads(steps: int, reads: int) -> float:
    """Milliseconds per read of ``steps`` step cgroups."""
    root = Path(tempfile.mkdtemp(prefix="llem-bench-steps-"))
    job = root / "system.slice" / "slurmstepd.scope" / "job_7"
    job.mkdir(parents=True)
    (job / "cpu.stat").write_text("usage_usec 1\n")
    for i in range(steps):
        (job / f"step_{i}").mkdir()
        (job / f"step_{i}" / "cpu.stat").write_text("usage_usec 5\n")
    locator = CgroupLocator(root)
    t = time.perf_counter()
    for _ in range(reads):
        locator.step_cpu("7", 1000, "n1")
    return (time.perf_counter() - t) * 1000 / reads


def export_cost(intervals: int, steps) -> tuple[float, float, int]:
    """(export ms, run_steps ms, step_use rows) of a job of ``intervals`` 1 s intervals."""
    d = Path(tempfile.mkdtemp(prefix="llem-bench-steps-"))
    store, run_id = build_store(d / "s" / "node.db", seconds=intervals, step_s=1, steps=steps)
    try:
        t = time.perf_counter()
        export_job(store, run_id, node_config(d), now_ns=T0 + 10 * 3600 * S)
        export_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        store.run_steps(run_id)
        split_ms = (time.perf_counter() - t) * 1000
        rows = store.query("SELECT COUNT(*) FROM step_use")[0][0]
    finally:
        store.close()
    return export_ms, split_ms, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="3,64")
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--intervals", type=int, default=3600)
    args = ap.parse_args()
    for n in (int(x) for x in args.steps.split(",")):
        print(f"step cgroups read per tick, {n} steps: {step_reads(n, args.reads):.3f} ms")
    for label, steps in (("no steps", None), ("3 steps", {"batch": 1, "extern": 0, "0": 3})):
        export_ms, split_ms, rows = export_cost(args.intervals, steps)
        print(
            f"export of a {args.intervals}-interval job, {label}: {export_ms:.0f} ms "
            f"(the steps' split {split_ms:.0f} ms, {rows} step_use rows)"
        )


if __name__ == "__main__":
    main()
