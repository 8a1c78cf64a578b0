"""Generate a spool of realistic slices: multi-node GPU jobs with windows, plus node hours.

Each job runs on 1 to 4 consecutive nodes (so ``n[0012-0015]`` style nodelists), 1 to 6
hours, on nodes of 2 CPU packages, 2 DRAM zones and 4 GPUs (8 devices); one or two named
windows per job; plus one node slice per node with its hourly totals. Files are written
exactly as the Epilog's delivery writes them (``llem.fsutil.write_atomic``).

Used by the aggregate and reader tests and by ``bench/make_spool.py`` (its command line),
``bench/bench_aggregate.py`` and ``bench/bench_report.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

from llem import slices
from llem.fsutil import write_atomic
from llem.slices import encode

S = 10**9
T0 = 1_700_000_000 // 3600 * 3600
DEVICES = {
    **{
        f"rapl:package-{i}": {
            "component": "cpu",
            "name": f"package-{i}",
            "sensor": "rapl",
            "source": "measured",
            "method": "counter",
        }
        for i in range(2)
    },
    **{
        f"rapl:dram-{i}": {
            "component": "dram",
            "name": f"dram-{i}",
            "sensor": "rapl",
            "source": "measured",
            "method": "counter",
        }
        for i in range(2)
    },
    **{
        f"nvml:GPU-{i:04x}": {
            "component": "gpu",
            "name": f"gpu{i}",
            "sensor": "nvml",
            "source": "measured",
            "method": "counter",
        }
        for i in range(4)
    },
}
# What the Prolog records of a job's GPUs: Slurm's indices, the /dev/nvidiaN minor numbers.
GPU_KEYS = [f"nvml:GPU-{i:04x}" for i in range(4)]  # as the sampler names a job's GPUs
METHODS = {"cpu": "cpu_time", "dram": "memory_share", "gpu": "gpu_allocation"}
POWER_W = {"cpu": 180, "dram": 20, "gpu": 300}


def node_name(i: int) -> str:
    return f"n{i:04d}"


def job_slices(
    job_id: int, first_node: int, n_nodes: int, start_s: int, hours: float, rng: random.Random
) -> list[dict]:
    end_s = start_s + int(hours * 3600)
    nodelist = (
        f"n[{first_node:04d}-{first_node + n_nodes - 1:04d}]"
        if n_nodes > 1
        else node_name(first_node)
    )
    out = []
    for k in range(n_nodes):
        node = node_name(first_node + k)
        energy = []
        for key, dev in DEVICES.items():
            comp = dev["component"]
            for hour in range(start_s // 3600 * 3600, end_s, 3600):
                seconds = min(end_s, hour + 3600) - max(start_s, hour)
                uj = int(POWER_W[comp] * rng.uniform(0.3, 1.0) * seconds * 1e6)
                energy.append(
                    {"device": key, "hour_s": hour, "method": METHODS[comp], "energy_uj": uj}
                )
        totals = {}
        for key in DEVICES:
            att = sum(r["energy_uj"] for r in energy if r["device"] == key)
            totals[key] = {
                "measured_uj": att + 10**6,
                "attributed_uj": att,
                "remainder_uj": 10**6,
                "gap_intervals": 0,
            }
        windows = [
            {
                "name": f"epoch {w}",
                "step_id": "0",
                "start_ns": (start_s + w * 60) * S,
                "end_ns": (start_s + w * 60 + 30) * S,
                "status": "closed",
                "energy": {"nvml:GPU-0000": 9_000_000},
            }
            for w in range(rng.randint(1, 2))
        ]
        out.append(
            {
                "schema": slices.SCHEMA,
                "kind": "job",
                "cluster": "bench",
                "node": node,
                "created_ns": end_s * S + k,
                "producer": {"llem": "bench", "host": node},
                "job": {
                    "job_id": str(job_id),
                    "array_job_id": None,
                    "array_task_id": None,
                    "user": f"user{job_id % 97}",
                    "uid": 1000 + job_id % 97,
                    "gid": 1000,
                    "account": f"acct{job_id % 13}",
                    "partition": "gpu",
                    "nodelist": nodelist,
                    "num_nodes": n_nodes,
                    "cpus": 64,
                    "gpus": GPU_KEYS,
                    "tag": None,
                    "name": f"train-{job_id}",
                    "start_ns": start_s * S + k * 1000,
                    "end_ns": end_s * S,
                    "state": "sealed",
                    "coverage": 1.0,
                    "flags": [],
                },
                "devices": DEVICES,
                "energy": energy,
                "windows": windows,
                "node_totals": totals,
            }
        )
    return out


def node_slice(node: int, first_hour_s: int, hours: int) -> dict:
    rows = []
    for h in range(hours):
        for key, dev in DEVICES.items():
            measured = POWER_W[dev["component"]] * 3600 * 10**6
            rows.append(
                {
                    "hour_s": first_hour_s + h * 3600,
                    "device": key,
                    "measured_uj": measured,
                    "attributed_uj": measured * 3 // 4,
                    "remainder_uj": measured - measured * 3 // 4,
                    "intervals": 360,
                    "gap_intervals": 0,
                    "covered_ns": 3600 * S,
                }
            )
    as_of = (first_hour_s + hours * 3600) * S
    return {
        "schema": slices.SCHEMA,
        "kind": "node",
        "cluster": "bench",
        "node": node_name(node),
        "created_ns": as_of,
        "from_hour_s": first_hour_s,
        "as_of_ns": as_of,
        "devices": DEVICES,
        "hours": rows,
        "producer": {"llem": "bench", "host": node_name(node)},
    }


def make_spool(out: Path, nodes: int, jobs: int, seed: int = 1) -> dict[str, int]:
    """Write about ``nodes * jobs`` job slices and ``nodes`` node slices into ``out``."""
    rng = random.Random(seed)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    counts = {"job_slices": 0, "jobs": 0, "node_slices": 0}
    clock = [T0] * nodes  # each node's next free second
    target = nodes * jobs
    job_id = 1
    while counts["job_slices"] < target:
        n_nodes = rng.choice((1, 1, 2, 4))
        first = rng.randrange(0, nodes - n_nodes + 1)
        start_s = max(clock[first : first + n_nodes]) + rng.randint(1, 600)
        hours = rng.uniform(0.2, 6.0)
        for data in job_slices(job_id, first, n_nodes, start_s, hours, rng):
            write_atomic(out, slices.file_name(data), encode(data))
            counts["job_slices"] += 1
        for k in range(first, first + n_nodes):
            clock[k] = start_s + int(hours * 3600) + 1
        counts["jobs"] += 1
        job_id += 1
    for node in range(nodes):
        data = node_slice(node, T0, 24)
        write_atomic(out, slices.file_name(data), encode(data))
        counts["node_slices"] += 1
    return counts
