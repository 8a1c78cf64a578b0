#!/usr/bin/env python3
"""Job start latency with and without the llem Prolog, and the node sampler's CPU use with 16
concurrent jobs, on a real local Slurm (the test harness; needs root and Slurm installed by
scripts/install-slurm.sh).

Latency: clusters run side by side, identical but for their Prolog/Epilog: llem's
slurm/prolog.sh and epilog.sh; trivial scripts that only `exit 0`; and none. `srun -w NODE
true` alternates between them (paired runs); the median of the differences between llem and
the trivial scripts is what llem adds (Slurm itself adds the trivial scripts' cost to any site
that has a Prolog and an Epilog at all). Sampler: 16 `sleep` jobs share one node, the sampler reads
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
        f"spool_dir: {site.spool_dir}\nsampler:\n  interval_s: 1.0\n  linger_s: 3600\n"
    )
    site.hw.start()
    with_llem = SlurmCluster(
        nodes=1,
        gpus_per_node=2,
        cpus_per_node=16,
        name="benchllem",
        node_prefix="bl",
        port_base=17500,
    )
    trivial = SlurmCluster(
        nodes=1,
        gpus_per_node=2,
        cpus_per_node=16,
        name="benchtriv",
        node_prefix="bt",
        port_base=17600,
    )
    without = SlurmCluster(
        nodes=1,
        gpus_per_node=2,
        cpus_per_node=16,
        name="benchnone",
        node_prefix="bn",
        port_base=17700,
    )
    clusters = {"llem": (with_llem, "bl1"), "trivial": (trivial, "bt1"), "none": (without, "bn1")}
    try:
        with_llem.prepare()
        with_llem.prolog = site.hook("prolog")
        with_llem.epilog = site.hook("epilog")
        with_llem.start()
        trivial.prepare()
        trivial.prolog = trivial.write_script("prolog.sh", "#!/bin/bash\nexit 0\n")
        trivial.epilog = trivial.write_script("epilog.sh", "#!/bin/bash\nexit 0\n")
        trivial.start()
        without.start()
        env = site.user_env
        for cluster, node in clusters.values():  # warm-up
            for _ in range(3):
                timed_srun(cluster, node, env)
        times: dict[str, list[float]] = {k: [] for k in clusters}
        for _ in range(args.pairs):
            for name, (cluster, node) in clusters.items():
                times[name].append(timed_srun(cluster, node, env))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        added = statistics.median(a - b for a, b in zip(times["llem"], times["trivial"])) * 1000
        slurm_cost = (
            statistics.median(a - b for a, b in zip(times["trivial"], times["none"])) * 1000
        )
        print(f"job start latency, srun -w NODE true, {args.pairs} paired runs")
        print(f"  llem Prolog/Epilog:            median {med['llem']:.1f} ms")
        print(f"  trivial Prolog/Epilog (exit 0): median {med['trivial']:.1f} ms")
        print(f"  no Prolog/Epilog:              median {med['none']:.1f} ms")
        print(f"  added by llem (llem - trivial, median of paired differences): {added:.1f} ms")
        print(f"  Slurm's own cost of having a Prolog/Epilog (trivial - none): {slurm_cost:.1f} ms")

        jobs = [
            with_llem.submit(["-w", "bl1", "-n1", "--wrap", "sleep 600"], env=env)
            for _ in range(16)
        ]
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
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        db = site.store("bl1")
        n_jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
        db.close()
        print(
            f"node sampler, {n_jobs} running jobs on the node, interval 1 s, "
            f"{args.window:.0f} s window"
        )
        print(f"  CPU: {share * 100:.3f} % of one core, RSS {rss / 1024:.1f} MiB")
        with_llem.run(["scancel", *jobs])
    finally:
        for cluster, _ in clusters.values():
            cluster.stop()
        site.cleanup()


if __name__ == "__main__":
    main()
