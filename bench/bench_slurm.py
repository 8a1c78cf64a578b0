#!/usr/bin/env python3
"""Job start latency with and without the llem Prolog, and the node sampler's CPU use with 16
concurrent jobs, on a real local Slurm (the test harness; needs root and Slurm installed by
scripts/install-slurm.sh).

Latency: two clusters run side by side, identical but for the Prolog (llem's slurm/prolog.sh
vs none); `srun -w NODE true` alternates between them (paired runs) and the median of the
differences is the added latency. Sampler: 16 `sleep` jobs share one node, the sampler reads
every 1 s, and its CPU time over a window is divided by the window.

Usage: python bench/bench_slurm.py [--pairs N] [--window S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.slurm.harness import SlurmCluster, ensure_user, missing_requirements  # noqa: E402
from tests.slurm.llem_site import Site  # noqa: E402


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def timed_srun(cluster: SlurmCluster, node: str, env: dict) -> float:
    t0 = time.perf_counter()
    r = cluster.srun(["-w", node, "true"], env=env)
    if r.returncode != 0:
        raise SystemExit(f"srun failed: {r.output}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--window", type=float, default=30.0)
    args = ap.parse_args()
    problems = missing_requirements()
    if problems:
        raise SystemExit("cannot run: " + "; ".join(problems))
    ensure_user("llemtest")
    site = Site()
    site.write_config(
        f"cluster: bench\nstate_dir: {site.state_dir}\nrun_dir: {site.run_dir}\n"
        f"spool_dir: {site.spool_dir}\nsampler:\n  interval_s: 1.0\n  linger_s: 3600\n")
    site.hw.start()
    with_llem = SlurmCluster(nodes=1, gpus_per_node=2, cpus_per_node=16, name="benchllem",
                             node_prefix="bl", port_base=17500)
    without = SlurmCluster(nodes=1, gpus_per_node=2, cpus_per_node=16, name="benchnone",
                           node_prefix="bn", port_base=17600)
    try:
        with_llem.prepare()
        with_llem.prolog = site.hook("prolog")
        with_llem.epilog = site.hook("epilog")
        with_llem.start()
        without.start()
        env = site.user_env
        for cluster, node in ((with_llem, "bl1"), (without, "bn1")):  # warm-up
            for _ in range(3):
                timed_srun(cluster, node, env)
        diffs, on, off = [], [], []
        for _ in range(args.pairs):
            a = timed_srun(with_llem, "bl1", env)
            b = timed_srun(without, "bn1", env)
            on.append(a)
            off.append(b)
            diffs.append(a - b)
        print(f"job start latency, srun -w NODE true, {args.pairs} paired runs")
        print(f"  with the llem Prolog/Epilog: median {statistics.median(on) * 1000:.1f} ms")
        print(f"  without:                     median {statistics.median(off) * 1000:.1f} ms")
        print(f"  added (median of pair differences): {statistics.median(diffs) * 1000:.1f} ms")

        jobs = [with_llem.submit(["-w", "bl1", "-n1", "--wrap", "sleep 600"], env=env)
                for _ in range(16)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = with_llem.run(["squeue", "-h", "-t", "R", "-o", "%i"]).stdout.split()
            if len(running) >= 16:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the 16 jobs did not all start")
        time.sleep(3)
        pid = site.sampler_pid("bl1")
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        time.sleep(args.window)
        t1, c1 = time.monotonic(), cpu_ticks(pid)
        import os

        share = (c1 - c0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
        db = site.store("bl1")
        n_jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
        db.close()
        print(f"node sampler, {n_jobs} running jobs on the node, interval 1 s, "
              f"{args.window:.0f} s window")
        print(f"  CPU: {share * 100:.3f} % of one core, RSS {rss / 1024:.1f} MiB")
        with_llem.run(["scancel", *jobs])
    finally:
        with_llem.stop()
        without.stop()
        site.cleanup()


if __name__ == "__main__":
    main()
