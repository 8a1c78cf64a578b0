#!/usr/bin/env python3
"""What a real NVIDIA driver gives llem: call cost, how often the figures change, and how far
power polling is from the energy counter. Run it on a GPU node (docs/nvml.md has the figures).

Without a driver it says so and exits 0. It reads GPU 0 (``--gpu N`` for another) through the
real ``pynvml`` and llem's own ``NvmlSensor``:

1. **Call cost**: wall and CPU time of ``nvmlDeviceGetTotalEnergyConsumption``,
   ``nvmlDeviceGetPowerUsage`` and one ``NvmlSensor.read()`` (all the node's GPUs), the
   sampler's per-tick GPU work.
2. **Update interval**: a thread polls the energy counter and the power every ``--poll-ms``
   milliseconds and notes when each value changes. A counter that changes every 20 ms
   resolves windows of tens of ms; a power figure that changes once a second is what power
   polling (``method="power_poll"``) integrates.
3. **Power polling against the counter** (``--load``, needs PyTorch with CUDA): phases of
   idle, full bf16 matrix products and bursts (on/off at several periods). For each phase the
   energy from the counter is compared with the trapezoid of the polled power at 0.1 s and 1 s
   (the sampler's default interval), for ``nvmlDeviceGetPowerUsage`` and, where the driver
   has it, the instantaneous field ``NVML_FI_DEV_POWER_INSTANT``.

Usage: python bench/bench_nvml.py [--gpu N] [--load] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT (nvml.h, driver 530 and later)


def _ms(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {
        "n": len(s),
        "median_ms": round(statistics.median(s) * 1e3, 3),
        "p10_ms": round(s[len(s) // 10] * 1e3, 3),
        "p90_ms": round(s[len(s) * 9 // 10] * 1e3, 3),
        "min_ms": round(s[0] * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
    }


def call_cost(fn, n: int) -> dict:
    for _ in range(20):
        fn()
    walls = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    out = _ms(walls)
    out["cpu_us_per_call"] = round(cpu / n * 1e6, 1)
    return out


class Poller(threading.Thread):
    """Polls energy (mJ), power (mW) and instant power (mW) of one GPU as fast as asked."""

    def __init__(self, nv, handle, period_s: float) -> None:
        super().__init__(daemon=True)
        self.nv, self.h, self.period_s = nv, handle, period_s
        self.rows: list[tuple[float, int, int, int | None]] = []
        self.stop = threading.Event()
        self.instant_ok = True

    def _instant(self) -> int | None:
        if not self.instant_ok:
            return None
        try:
            v = self.nv.nvmlDeviceGetFieldValues(self.h, [FI_POWER_INSTANT])[0]
            if v.nvmlReturn != 0:
                self.instant_ok = False
                return None
            return int(v.value.uiVal)
        except Exception:  # noqa: BLE001 - an older driver or binding: no instant field
            self.instant_ok = False
            return None

    def run(self) -> None:
        nv, h = self.nv, self.h
        nxt = time.perf_counter()
        while not self.stop.is_set():
            t = time.perf_counter()
            e = nv.nvmlDeviceGetTotalEnergyConsumption(h)
            p = nv.nvmlDeviceGetPowerUsage(h)
            self.rows.append((t, int(e), int(p), self._instant()))
            nxt += self.period_s
            delay = nxt - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.perf_counter()


def change_intervals(rows, col: int, t0: float, t1: float) -> list[float]:
    out, last_t, last_v = [], None, None
    for r in rows:
        if not t0 <= r[0] <= t1 or r[col] is None:
            continue
        if last_v is not None and r[col] != last_v:
            if last_t is not None:
                out.append(r[0] - last_t)
            last_t = r[0]
        last_v = r[col]
    return out


def trapezoid_j(rows, col: int, t0: float, t1: float, step_s: float) -> float | None:
    """Energy (J) from the power column sampled every step_s from the fast poll's rows."""
    picked, nxt = [], t0
    for r in rows:
        if r[0] >= nxt and r[0] <= t1 and r[col] is not None:
            picked.append((r[0], r[col]))
            nxt += step_s
    if len(picked) < 2:
        return None
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2e3 for a, b in zip(picked, picked[1:]))


def counter_j(rows, t0: float, t1: float) -> tuple[float, float] | None:
    inside = [r for r in rows if t0 <= r[0] <= t1]
    if len(inside) < 2:
        return None
    return (inside[-1][1] - inside[0][1]) / 1e3, inside[-1][0] - inside[0][0]


def run_phases(torch, dev, phases) -> list[tuple[str, float, float, float]]:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    marks = []
    for name, seconds, period_s, duty in phases:
        t0 = time.perf_counter()
        flops = 0.0
        while time.perf_counter() - t0 < seconds:
            if period_s is None:  # idle
                time.sleep(0.05)
                continue
            on_until = time.perf_counter() + period_s * duty
            while time.perf_counter() < on_until:
                for _ in range(8):
                    a @ b
                flops += 8 * 2 * 8192**3
                torch.cuda.synchronize()
            if duty < 1:
                time.sleep(period_s * (1 - duty))
        torch.cuda.synchronize()
        marks.append((name, t0, time.perf_counter(), flops))
    return marks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to read")
    ap.add_argument("--calls", type=int, default=2000, help="calls timed per NVML function")
    ap.add_argument("--poll-ms", type=float, default=2.0, help="fast poll period (ms)")
    ap.add_argument("--load", action="store_true", help="run GPU phases with PyTorch")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()

    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver is an answer, not a failure
        print(f"no NVIDIA driver here ({e}); nothing to measure")
        return 0
    from llem.sensors.nvml import NvmlSensor

    h = nv.nvmlDeviceGetHandleByIndex(args.gpu)

    def opt(fn, *a):
        try:
            return fn(*a)
        except nv.NVMLError as e:
            return f"({e})"

    fig: dict = {
        "driver": opt(nv.nvmlSystemGetDriverVersion),
        "nvml": opt(nv.nvmlSystemGetNVMLVersion),
        "gpu": opt(nv.nvmlDeviceGetName, h),
        "gpus": opt(nv.nvmlDeviceGetCount),
        "power_limit_mw": opt(nv.nvmlDeviceGetEnforcedPowerLimit, h),
    }
    print(json.dumps(fig))

    with NvmlSensor() as sensor:
        fig["cost"] = {
            "energy_counter": call_cost(
                lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h), args.calls
            ),
            "power_usage": call_cost(lambda: nv.nvmlDeviceGetPowerUsage(h), args.calls),
            "NvmlSensor.read (all GPUs)": call_cost(
                lambda: sensor.read(time.monotonic_ns()), args.calls
            ),
        }
    for k, v in fig["cost"].items():
        print(f"cost {k}: {v}")

    poller = Poller(nv, h, args.poll_ms / 1e3)
    poller.start()
    t0 = time.perf_counter()
    time.sleep(3.0)
    fig["idle_update"] = {
        "energy_counter": _ms(change_intervals(poller.rows, 1, t0, time.perf_counter())),
        "power_usage": _ms(change_intervals(poller.rows, 2, t0, time.perf_counter())),
        "power_instant": _ms(change_intervals(poller.rows, 3, t0, time.perf_counter())),
    }
    print(f"update intervals, idle: {fig['idle_update']}")

    if args.load:
        import torch

        dev = torch.device(f"cuda:{args.gpu}")
        phases = [
            ("idle", 4.0, None, 0),
            ("full", 10.0, 1.0, 1.0),
            ("burst 2 s on/off", 12.0, 4.0, 0.5),
            ("burst 0.5 s on/off", 10.0, 1.0, 0.5),
            ("burst 0.1 s on/off", 10.0, 0.2, 0.5),
            ("burst 0.02 s on/off", 10.0, 0.04, 0.5),
            ("idle after", 4.0, None, 0),
        ]
        marks = run_phases(torch, dev, phases)
        rows = poller.rows
        fig["phases"] = []
        for name, a, b, flops in marks:
            c = counter_j(rows, a, b)
            if c is None:
                continue
            cj, span = c
            ph = {
                "phase": name,
                "seconds": round(span, 2),
                "counter_j": round(cj, 1),
                "mean_power_w": round(cj / span, 1),
                "tflop_s": round(flops / (b - a) / 1e12, 1),
                "counter_update": _ms(change_intervals(rows, 1, a, b)),
                "power_update": _ms(change_intervals(rows, 2, a, b)),
            }
            for col, label in ((2, "usage"), (3, "instant")):
                for step in (0.1, 1.0):
                    tj = trapezoid_j(rows, col, a, b, step)
                    if tj is not None and cj > 0:
                        ph[f"poll_{label}_{step}s_vs_counter_pct"] = round((tj / cj - 1) * 100, 2)
            fig["phases"].append(ph)
            print(f"phase {json.dumps(ph)}")
    poller.stop.set()
    poller.join()
    nv.nvmlShutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
