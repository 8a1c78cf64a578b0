#!/usr/bin/env python3
"""The Python API's costs: ``import llem`` (wall over a bare interpreter, and what
``-X importtime`` says), the first window (its imports and opening the sensors), and a
window opened and closed while another is open (two forced readings), on a powercap tree of
two sockets (the tests' fake: the same sysfs files as a real one).

Usage: python bench/bench_api.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.powercap import FakePowercap  # noqa: E402 - the fake sysfs tree

WINDOWS = """
import time
t0 = time.perf_counter()
import llem
t1 = time.perf_counter()
with llem.window("first"):
    t2 = time.perf_counter()
    pass
t3 = time.perf_counter()
with llem.window("outer"):
    times = []
    for _ in range(20):
        a = time.perf_counter()
        with llem.window("inner"):
            pass
        times.append(time.perf_counter() - a)
times.sort()
print(f"{(t1 - t0) * 1000:.2f} {(t2 - t1) * 1000:.1f} {(t3 - t2) * 1000:.1f} "
      f"{times[len(times) // 2] * 1000:.1f}")
"""


def wall_ms(code: str, env: dict, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        r = subprocess.run(
            [sys.executable, "-c", f"import time; t=time.perf_counter(); {code}; "
             "print((time.perf_counter()-t)*1000)"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        out.append(float(r.stdout.split()[-1]))
    return out


def importtime_ms(env: dict) -> float:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import llem"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| llem$", line.strip())
        if m:
            return int(m.group(1)) / 1000
    raise RuntimeError("no llem line in -X importtime output")


def export_costs() -> tuple[float, float, int]:
    """ms to build a job slice's power series and its hourly energy from the energy rows of
    a 24 h job on 12 devices sampled every 10 s (two attribution methods per device)."""
    import time

    from llem.node import export

    t0_ns = 1_699_995_600 * 10**9
    rows = [
        (f"dev{d}", method, t0_ns + i * 10 * 10**9, t0_ns + (i + 1) * 10 * 10**9, 1_000_000)
        for i in range(8640)
        for d in range(12)
        for method in ("idle_allocation", "cpu_time")
    ]
    a = time.perf_counter()
    power = export._power_series(rows)
    b = time.perf_counter()
    export._job_energy(rows)
    c = time.perf_counter()
    return (b - a) * 1000, (c - b) * 1000, len(power["points"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pc = FakePowercap(Path(tmp) / "pc")
        pc.add_socket(0)
        pc.add_socket(1)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLEM_", "SLURM"))}
        env.update(
            LLEM_CONFIG="/dev/null",
            LLEM_POWERCAP_ROOT=str(pc.path),
            LLEM_SENSORS="rapl",
            LLEM_HISTORY=str(Path(tmp) / "history.jsonl"),
        )
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
        bare = wall_ms("pass", env, args.runs)
        with_llem = wall_ms("import llem", env, args.runs)
        over = [a - b for a, b in zip(sorted(with_llem), sorted(bare))]
        print(f"import llem in a fresh interpreter, over a bare statement, min/median of "
              f"{args.runs}: {min(over):.2f} / {statistics.median(over):.2f} ms")  # fmt: skip
        print(f"python -X importtime, llem cumulative: {importtime_ms(env):.2f} ms")
        rows = []
        for _ in range(max(3, args.runs // 4)):
            r = subprocess.run(
                [sys.executable, "-c", WINDOWS], env=env, capture_output=True, text=True, check=True
            )
            rows.append([float(x) for x in r.stdout.split()])
        med = [statistics.median(col) for col in zip(*rows)]
        print(f"import llem measured inside the program: {med[0]:.2f} ms (median)")
        print(f"first window opened (API import, config, sensors, thread): {med[1]:.1f} ms")
        print(f"first window closed (last reading, carbon tables, history line): {med[2]:.1f} ms")
        print(f"a nested window opened and closed (two forced readings): {med[3]:.1f} ms")
    power_ms, hours_ms, points = export_costs()
    print(
        f"job slice of a 24 h job, 12 devices, 10 s intervals (207,360 energy rows): power "
        f"series {power_ms:.0f} ms ({points} points), energy by hour {hours_ms:.0f} ms"
    )


if __name__ == "__main__":
    main()
