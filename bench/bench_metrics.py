#!/usr/bin/env python3
"""What the Prometheus textfile adds to a node sampler tick, with 16 running jobs.

Setup: a real node store on local disk holding 16 running jobs; a sampler over a real
powercap tree of 2 sockets (package + dram) and 8 GPU devices (the tests' fake sensor: its
cost is not what is measured); each interval's energy is attributed to the 16 jobs (every
job a share of each package and dram, each of 8 jobs one GPU) and written to the store, as the
node sampler does. Then the metrics writer takes each interval in (one query of the running
jobs, the counters, the text, a write and a rename into a textfile directory on local disk).

Figures: the CPU the textfile adds per tick (the whole process, so the writer thread's work
counts), how long the sampler thread is held by the call (update and render; the write and
rename run in the writer thread), the writer's time per file, and the size of the file.

Usage: python bench/bench_metrics.py [--ticks N]   (prints figures; docs/performance.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.powercap and tests.fakes

JOBS = 16


def setup(tmp: Path):
    from llem.model import JobRecord, JobShare
    from llem.node.metrics import NodeMetrics
    from llem.node.store import NodeStore
    from llem.sampler import Sampler
    from llem.sensors.rapl import RaplSensor
    from tests.fakes import FakeSensor
    from tests.powercap import FakePowercap

    pc = FakePowercap(tmp / "powercap")
    pc.add_socket(0)
    pc.add_socket(1)
    gpus = FakeSensor({f"gpu{i}": 0 for i in range(8)}, component="gpu")
    sensors = [RaplSensor(pc.path, hwmon=tmp / "none"), gpus]
    store = NodeStore(tmp / "state" / "node.db")
    run_ids = [
        store.add_job(
            JobRecord(
                str(1000 + i),
                "c",
                "n1",
                1,
                uid=1000 + i,
                user=f"user{i}",
                account=f"acct{i % 4}",
                partition="p",
            )
        )
        for i in range(JOBS)
    ]
    devices: list = []

    def attribute(interval):
        shares = []
        for row in interval.rows:
            if row.energy_uj <= 0:
                continue
            if row.device_key.startswith("fake:gpu"):
                i = int(row.device_key[8:])
                shares.append(
                    JobShare(run_ids[i], row.device_key, row.energy_uj, "gpu_allocation", 1.0)
                )
            else:
                part = row.energy_uj // (JOBS + 1)
                shares += [
                    JobShare(r, row.device_key, part, "cpu_time", 1 / (JOBS + 1)) for r in run_ids
                ]
        return replace(interval, shares=tuple(shares))

    sampler = Sampler(sensors, [store], interval_s=0.1, attribute=attribute)
    devices = sampler.devices
    textfiles = tmp / "textfile"
    textfiles.mkdir(mode=0o755)
    metrics = NodeMetrics(store, "n1", devices, 10.0, textfiles)

    def advance() -> None:
        for zone in ("intel-rapl:0", "intel-rapl:1"):
            pc.advance(zone, 1_000_000)
        for k in gpus.counters:
            gpus.counters[k] += 3_000_000

    return sampler, metrics, advance, textfiles


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(ticks: int, where: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        sampler, metrics, advance, textfiles = setup(Path(tmp))
        sampler.start()
        for _ in range(20):  # warm-up, and every job seen once
            advance()
            metrics.on_interval(sampler.tick())
            metrics.flush(5.0)
        tick_cpu, added_cpu, call_wall, write_wall = [], [], [], []
        for _ in range(ticks):
            advance()
            c0 = time.process_time()  # the whole process: the writer thread's work counts
            interval = sampler.tick()
            c1, w0 = time.process_time(), time.perf_counter()
            metrics.on_interval(interval)
            w1 = time.perf_counter()
            metrics.flush(5.0)  # ticks are seconds apart in production: no write dropped
            c2, w2 = time.process_time(), time.perf_counter()
            tick_cpu.append(c1 - c0)
            added_cpu.append(c2 - c1)
            call_wall.append(w1 - w0)
            write_wall.append(w2 - w1)
        text = (textfiles / "llem_node_n1.prom").read_text()
        return {
            "tick": tick_cpu,
            "added": added_cpu,
            "call": call_wall,
            "write": write_wall,
            "bytes": len(text.encode()),
            "lines": text.count("\n"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument(
        "--dir", default=None, help="folder for the store and textfile (default: the temp folder)"
    )
    args = parser.parse_args()
    ms = 1000.0
    on = run(args.ticks, args.dir)
    fs = os.popen(f"df -T {args.dir or tempfile.gettempdir()} | tail -1").read().split()[1]
    mean = statistics.fmean
    print(
        f"ticks: {args.ticks}, running jobs: {JOBS}, store and textfile on {fs}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"sampler tick CPU without the metrics call: mean {mean(on['tick']) * ms:.3f} ms")
    print(
        f"added CPU per tick (sampler and writer threads): mean {mean(on['added']) * ms:.3f} "
        f"ms, median {statistics.median(on['added']) * ms:.3f} ms"
    )
    print(
        f"sampler thread held by the metrics call: median "
        f"{statistics.median(on['call']) * ms:.3f} ms, p99 {pct(on['call'], 0.99) * ms:.3f} ms"
    )
    print(
        f"writer thread, write + rename: median {statistics.median(on['write']) * ms:.3f} ms, "
        f"p99 {pct(on['write'], 0.99) * ms:.3f} ms"
    )
    print(f"textfile: {on['bytes']} bytes, {on['lines']} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
