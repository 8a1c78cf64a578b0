#!/usr/bin/env python3
"""The /proc fallback's cost per sampler tick (nodes without job cgroups): ProcScanner on a
synthetic /proc tree shaped like a busy compute node, and on this machine's own /proc.

The synthetic node: ``--kthreads`` kernel threads, ``--daemons`` root daemons, and ``--jobs``
jobs of ``--procs`` user processes each, every job under its own root slurmstepd.

Usage: python bench/bench_proc_scan.py [--kthreads 400] [--daemons 100] [--jobs 16]
       [--procs 64] [--ticks 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llem.node.usage import ProcScanner  # noqa: E402


def _proc(root: Path, pid: int, ppid: int, uid: int, title: bytes) -> None:
    d = root / str(pid)
    d.mkdir()
    fields = ["S", ppid, pid, pid, 0, -1, 0, 0, 0, 0, 0, 100, 10, 0, 0, 20, 0, 1, 0, pid, 0, 50]
    (d / "stat").write_text(f"{pid} (p) " + " ".join(map(str, fields)) + "\n")
    (d / "status").write_text(f"Name:\tp\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(title)


def synthetic(root: Path, kthreads: int, daemons: int, jobs: int, procs: int) -> dict:
    _proc(root, 1, 0, 0, b"/sbin/init\0")
    _proc(root, 2, 0, 0, b"")
    pid = 3
    for _ in range(kthreads):
        _proc(root, pid, 2, 0, b"")
        pid += 1
    for _ in range(daemons):
        _proc(root, pid, 1, 0, b"/usr/sbin/daemon\0")
        pid += 1
    owners = {}
    for j in range(jobs):
        job_id, uid = str(1000 + j), 5000 + j
        owners[job_id] = uid
        stepd = pid
        _proc(root, stepd, 1, 0, f"slurmstepd: [{job_id}.batch]".encode())
        pid += 1
        for _ in range(procs):
            _proc(root, pid, stepd, uid, b"python\0train.py\0")
            pid += 1
    return owners


def per_tick_ms(scanner: ProcScanner, owners: dict, ticks: int) -> list[float]:
    scanner.usage_by_job(owners)  # the first tick fills the caches
    out = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        scanner.usage_by_job(owners)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kthreads", type=int, default=400)
    p.add_argument("--daemons", type=int, default=100)
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--procs", type=int, default=64)
    p.add_argument("--ticks", type=int, default=50)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        owners = synthetic(Path(d), args.kthreads, args.daemons, args.jobs, args.procs)
        n = 2 + args.kthreads + args.daemons + args.jobs * (args.procs + 1)
        times = per_tick_ms(ProcScanner(d, trusted_uids=frozenset({0})), owners, args.ticks)
        print(
            f"synthetic /proc, {n} processes, {args.jobs} jobs: median "
            f"{statistics.median(times):.1f} ms/tick, max {max(times):.1f} ms"
        )
    real = sum(1 for x in Path("/proc").iterdir() if x.name.isdigit())
    times = per_tick_ms(ProcScanner("/proc"), {"1": 0}, args.ticks)
    print(
        f"this machine's /proc, {real} processes: median {statistics.median(times):.1f} "
        f"ms/tick, max {max(times):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
