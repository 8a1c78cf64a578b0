#!/usr/bin/env python3
"""Sampler cost per tick, sampler memory, and the import time of the sampler's entry point.

Setup: a powercap tree of 2 sockets (package + dram each) in a temp dir, and 8 GPUs served by
the fake libnvidia-ml.so.1 of the tests (real pynvml, real NVML sensor code). The fake library
re-reads its state file on every call, which a real driver does not do: its own cost is
measured separately and printed, so the llem share can be told apart.

Usage: python bench/bench_sampler.py [--ticks N]   (prints figures; docs/performance.md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.powercap and tests.fakenvml


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def measure_ticks(ticks: int, with_gpus: bool, tmp: Path) -> dict:
    """Runs in a child process (LD_LIBRARY_PATH must be set before start for the fake NVML)."""
    from llem.node.store import NodeStore
    from llem.sampler import Sampler
    from llem.sensors.rapl import RaplSensor
    from tests.powercap import FakePowercap

    pc = FakePowercap(tmp / "powercap")
    pc.add_socket(0)
    pc.add_socket(1)
    sensors = [RaplSensor(pc.path, hwmon=tmp / "none")]
    if with_gpus:
        from llem.sensors.nvml import NvmlSensor

        sensors.append(NvmlSensor())
    store = NodeStore(tmp / "state" / "node.db")
    sampler = Sampler(sensors, [store], interval_s=0.1)
    sampler.start()
    for _ in range(20):  # warm-up
        sampler.tick()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(ticks):
        sampler.tick()
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    devices = len(sampler.devices)
    fake_cost = 0.0
    if with_gpus:
        nvml = sensors[1]
        t0 = time.process_time()
        for _ in range(ticks):
            nvml.read(0)
        fake_cost = (time.process_time() - t0) / ticks
    return {
        "devices": devices,
        "cpu_ms_per_tick": 1000 * cpu / ticks,
        "wall_ms_per_tick": 1000 * wall / ticks,
        "nvml_read_ms_per_tick": 1000 * fake_cost,
        "rss_mib": rss_kib("VmRSS") / 1024,
        "peak_rss_mib": rss_kib("VmHWM") / 1024,
    }


def import_time_ms(module_code: str, runs: int = 21) -> tuple[float, float]:
    """(min, median) wall time of `python -c CODE` minus that of `python -c pass`, in ms.

    The minimum is the figure least disturbed by other load on the machine.
    """

    def times(code: str) -> list[float]:
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            out.append(time.perf_counter() - t0)
        return out

    base, full = times("pass"), times(module_code)
    return (
        1000 * (min(full) - min(base)),
        1000 * (statistics.median(full) - statistics.median(base)),
    )


def importtime_tree(module: str) -> int:
    """Cumulative microseconds of `module` from `python -X importtime`."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--child", choices=["rapl", "gpus"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(measure_ticks(args.ticks, args.child == "gpus", Path(tmp))))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LLEM_CONFIG="/dev/null")
        for kind in ("rapl", "gpus"):
            if kind == "gpus":
                try:
                    from tests.fakenvml import lib as fakenvml
                except ImportError:
                    print("fake NVML not available: GPU case skipped")
                    continue
                libdir = fakenvml.build(Path(tmp) / "lib")
                state = Path(tmp) / "nvml.state"
                fakenvml.write_state(
                    state,
                    [
                        fakenvml.FakeGpu(
                            uuid=f"GPU-bench-{i:04d}", minor=i, energy_mj=1000 * i, power_mw=250_000
                        )
                        for i in range(8)
                    ],
                )
                env.update(LD_LIBRARY_PATH=str(libdir), FAKE_NVML_STATE=str(state))
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--ticks", str(args.ticks)],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode != 0:
                print(out.stderr)
                raise SystemExit(f"benchmark child {kind} failed")
            results[kind] = json.loads(out.stdout)

    print(f"sampler tick, {args.ticks} ticks, node store on local disk, one commit per tick")
    for kind, r in results.items():
        label = "2 sockets (package+dram)" + (" + 8 GPUs (fake NVML)" if kind == "gpus" else "")
        print(f"  {label}: {r['devices']} devices")
        print(
            f"    CPU per tick     {r['cpu_ms_per_tick']:.3f} ms  (wall {r['wall_ms_per_tick']:.3f} ms)"
        )
        if kind == "gpus":
            print(
                f"    of which NVML reads {r['nvml_read_ms_per_tick']:.3f} ms (the fake "
                "library re-reads its state file on each call)"
            )
        print(f"    RSS              {r['rss_mib']:.1f} MiB (peak {r['peak_rss_mib']:.1f} MiB)")
    entry = "llem.cli.sampler"
    print("import time of the sampler entry point")
    print(f"  python -X importtime, {entry} cumulative: {importtime_tree(entry) / 1000:.1f} ms")
    path = "import llem.cli.sampler, llem.sampler, llem.sensors, llem.sensors.rapl, llem.node.store"
    low, mid = import_time_ms(path)
    print(
        f"  whole sampler path (entry, loop, rapl, store), wall over bare python: "
        f"min {low:.1f} ms, median {mid:.1f} ms"
    )
    print(
        f"  pynvml, loaded only on nodes that probe GPUs: {importtime_tree('pynvml') / 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
