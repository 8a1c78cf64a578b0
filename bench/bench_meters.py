#!/usr/bin/env python3
"""Sampler tick with a node meter: HPE Cray EX pm_counters plus 8 AMD GPUs through amdsmi.

Setup: a pm_counters tree of the tests (node, cpu, memory, 4 accel counters; the accels are
not read because amdsmi measures the GPUs), 8 GPUs served by the fake libamd_smi.so of the
tests through the real ``amdsmi`` package and the real amdsmi sensor, the platform residual,
and the node store on local disk (one SQLite commit per tick). The fake library re-reads its
state file on every call, which the real one does not do: that cost is measured separately
and printed, so that llem's share can be told apart.

Usage: python bench/bench_meters.py [--ticks N]   (prints JSON; docs/performance.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.pmcounters and tests.fakeamdsmi


def per_tick_ms(fn, ticks: int) -> tuple[float, float]:
    # thread_time: the sampler thread's CPU only, not the fake controller's writer thread.
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(ticks):
        fn()
    return (
        1000 * (time.thread_time() - cpu0) / ticks,
        1000 * (time.perf_counter() - wall0) / ticks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ticks", type=int, default=2000)
    args = parser.parse_args()

    from tests.fakeamdsmi.lib import FakeAmdGpu, build, write_state
    from tests.pmcounters import FakePmCounters, PmWriter

    tmp = Path(tempfile.mkdtemp(prefix="llem-bench-meters-"))
    rocm = build(tmp / "rocm")
    state = tmp / "amdsmi.state"
    write_state(
        state,
        [
            FakeAmdGpu(
                f"0000:{0xC1 + i:02x}:00.0",
                f"5bff74bf-0000-1000-80ba-c1f3a1b2c3{i:02x}",
                card=i,
                acc=65536 * 1000 * (i + 1),
                power_w=0,
            )
            for i in range(8)
        ],
    )
    os.environ["ROCM_PATH"] = str(rocm)  # read by amdsmi when it is first imported
    os.environ["FAKE_AMDSMI_STATE"] = str(state)
    pm = FakePmCounters(tmp / "pm_counters")

    from llem.node.store import NodeStore
    from llem.sampler import Sampler
    from llem.sensors import OpenedSensors, meters
    from llem.sensors.amdsmi import AmdSmiSensor
    from llem.sensors.pm_counters import PmCountersSensor

    amd = AmdSmiSensor(check_wait_s=0)
    opened = OpenedSensors([PmCountersSensor(pm.path), amd])
    meters.one_source_per_gpu(opened)
    store = NodeStore(tmp / "state" / "node.db")
    sampler = Sampler(opened.sensors, [store], interval_s=0.1)
    writer = PmWriter(pm, {"energy": 400, "cpu_energy": 150, "memory_energy": 50}, hz=10)
    writer.start()  # the controller's ten updates a second, in a thread of its own
    sampler.start()
    for _ in range(20):
        sampler.tick()
    cpu_ms, wall_ms = per_tick_ms(sampler.tick, args.ticks)
    amd_cpu_ms, _ = per_tick_ms(lambda: amd.read(0), args.ticks)
    pm_sensor = opened.sensors[0]
    pm_cpu_ms, _ = per_tick_ms(lambda: pm_sensor._snapshot(), args.ticks)
    failed = store.query("SELECT COUNT(*) FROM energy WHERE status != 'ok'")[0][0]
    print(
        json.dumps(
            {
                "devices": [d.key for d in sampler.devices],
                "failed_reads": failed,
                "ticks": args.ticks,
                "cpu_ms_per_tick": round(cpu_ms, 3),
                "wall_ms_per_tick": round(wall_ms, 3),
                "amdsmi_read_cpu_ms (8 GPUs, fake library included)": round(amd_cpu_ms, 3),
                "pm_counters_snapshot_cpu_ms": round(pm_cpu_ms, 3),
            },
            indent=2,
        )
    )
    writer.stop()
    opened.close()


if __name__ == "__main__":
    main()
