#!/usr/bin/env python3
"""The Prolog hook's own time, without Slurm: the bash fast path (a live sampler takes the
registration) and the Python slow path (`llem prolog` starts a sampler: the first job after
an idle period). Runs slurm/prolog.sh as slurmd would (no PATH, no HOME) against a temp site.

Usage: python bench/bench_prolog.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hook(defaults: Path, job: int) -> float:
    env = {
        "SLURM_JOB_ID": str(job),
        "SLURMD_NODENAME": "b1",
        "SLURM_JOB_UID": "0",
        "SLURM_JOB_USER": "root",
        "LLEM_DEFAULTS_FILE": str(defaults),
    }
    t0 = time.perf_counter()
    subprocess.run(["/bin/bash", str(ROOT / "slurm" / "prolog.sh")], env=env, check=True)
    return (time.perf_counter() - t0) * 1000


def stop_sampler(run_dir: Path) -> None:
    try:
        pid = int((run_dir / "b1" / "sampler.pid").read_text())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)
    lock = run_dir / "b1" / "sampler.lock"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # gone once its lock is free
        if subprocess.run(["/usr/bin/flock", "-n", str(lock), "/bin/true"]).returncode == 0:
            return
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    llem_bin = Path(sys.executable).with_name("llem")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        run_dir = base / "run"
        (base / "llem.yaml").write_text(
            f"state_dir: {base / 'state'}\nrun_dir: {run_dir}\nsampler:\n  interval_s: 10\n"
            "  linger_s: 3600\n"
        )
        defaults = base / "default-llem"
        defaults.write_text(
            f"LLEM_BIN={llem_bin}\nLLEM_CONFIG={base / 'llem.yaml'}\nLLEM_RUN_DIR={run_dir}\n"
        )
        cold, warm = [], []
        job = 1
        for _ in range(args.runs):
            stop_sampler(run_dir)
            cold.append(hook(defaults, job))
            job += 1
            time.sleep(0.3)  # let the new sampler settle
            for _ in range(3):
                warm.append(hook(defaults, job))
                job += 1
        stop_sampler(run_dir)
    print(f"Prolog hook (slurm/prolog.sh) wall time, {args.runs} cold and {len(warm)} warm runs")
    print(
        f"  live sampler (bash fast path): median {statistics.median(warm):.1f} ms, "
        f"max {max(warm):.1f} ms"
    )
    print(
        f"  no sampler (llem prolog starts one): median {statistics.median(cold):.1f} ms, "
        f"max {max(cold):.1f} ms"
    )


if __name__ == "__main__":
    main()
