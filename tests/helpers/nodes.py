"""Node stores and the slices exported from them, for the export, ledger, aggregate, reader,
acct and report tests.

``build_store`` fills a real node store; ``job_slices`` exports one job slice per node of a
multi-node job; ``ENV`` is the EpilogSlurmctld environment of a job header.
"""

import json
from pathlib import Path

from llem import slices
from llem.config import AggregateConfig, Config
from llem.fsutil import write_atomic
from llem.model import EnergyRow, Interval, JobRecord, JobShare
from llem.node.export import export_job
from llem.node.store import NodeStore
from llem.sensors.base import Device
from llem.slices import encode

S = 10**9
# 2023-11-14 21:00:00 UTC: an hour boundary, so tests can cross the next one on purpose.
T0 = 1_699_995_600 * S
assert T0 % (3600 * S) == 0

DEVICES = (
    Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter"),
    Device("rapl:dram-0", "dram", "dram-0", "rapl", "measured", "counter"),
    Device("nvml:GPU-a", "gpu", "gpu0", "nvml", "measured", "counter"),
)


def node_config(tmp_path, node="n1", **aggregate) -> Config:
    """A config whose node-local state, spool and ledger live under tmp_path."""
    return Config(
        cluster="c1", state_dir=str(tmp_path / "state" / node),
        spool_dir=str(tmp_path / "spool"), ledger=str(tmp_path / "ledger" / "ledger.db"),
        aggregate=AggregateConfig(**aggregate),
    )


def build_store(path, node="n1", job_id="100", start_ns=T0 + 1800 * S, seconds=3600,
                step_s=60, nodelist="n[1-3]", user="alice", name="train; rm -rf /",
                cpu_uw=100_000_000, gpu_uw=250_000_000, windows=True,
                end=True) -> tuple[NodeStore, int]:
    """A node store with one job run on ``node``, sampled every ``step_s`` seconds.

    Per interval: the CPU package draws ``cpu_uw`` microwatts, 60 % attributed to the job;
    DRAM 10 W, half attributed; the GPU ``gpu_uw``, all to the job. The default run starts
    at 21:30 and lasts an hour, so its energy falls in two clock hours.
    """
    store = NodeStore(path)
    store.register_devices(DEVICES, start_ns)
    run_id = store.add_job(JobRecord(
        job_id=job_id, cluster="c1", node=node, start_ns=start_ns, uid=1000, user=user,
        account="physics", partition="gpu", nodelist=nodelist, num_nodes=3, cpus=8,
        gpus=("nvml:GPU-a",), tag="exp-1", name=name))
    add_intervals(store, run_id, start_ns, seconds, step_s, cpu_uw, gpu_uw)
    if windows:
        store.db.execute(
            "INSERT INTO windows (run_id, job_id, step_id, name, start_ns, end_ns, "
            "start_mono_ns, end_mono_ns, energy, status) VALUES (?, ?, '0', 'epoch 1', ?, ?, "
            "0, 1, ?, 'closed')",
            (run_id, job_id, start_ns + 60 * S, start_ns + 600 * S,
             json.dumps({"nvml:GPU-a": 135_000_000})))
    if end:
        store.update_job(run_id, end_ns=start_ns + seconds * S, state="sealed", coverage=1.0)
    return store, run_id


def add_intervals(store, run_id, start_ns, seconds, step_s, cpu_uw=100_000_000,
                  gpu_uw=250_000_000, first_id=0):
    for i in range(seconds // step_s):
        a = start_ns + i * step_s * S
        b = a + step_s * S
        cpu, dram, gpu = cpu_uw * step_s, 10_000_000 * step_s, gpu_uw * step_s
        shares = [JobShare(run_id, "rapl:package-0", cpu * 6 // 10, "cpu_time", 0.6),
                  JobShare(run_id, "rapl:dram-0", dram // 2, "memory_share", 0.5),
                  JobShare(run_id, "nvml:GPU-a", gpu, "gpu_allocation", 1.0)]
        store.write(Interval(
            "s", a, b, first_id + i, first_id + i + 1,
            (EnergyRow("rapl:package-0", cpu, "ok", "ok", None),
             EnergyRow("rapl:dram-0", dram, "ok", "ok", None),
             EnergyRow("nvml:GPU-a", gpu, "ok", "ok", None)),
            shares=tuple(shares),
            remainder=(("rapl:package-0", cpu - cpu * 6 // 10), ("rapl:dram-0", dram - dram // 2),
                       ("nvml:GPU-a", 0))))


def spool_slice(config: Config, data: dict) -> Path:
    """Drop a slice straight into the spool as the Epilog's delivery would."""
    spool = slices.check_spool_dir(Path(config.spool_dir))
    return write_atomic(spool, slices.file_name(data), encode(data), 0o640)


def job_slices(tmp_path, job_id="100", nodes=("n1", "n2", "n3"), **kwargs) -> list[dict]:
    """One job slice per node of a multi-node job, each from its own real node store."""
    out = []
    for i, node in enumerate(nodes):
        store, run_id = build_store(tmp_path / f"store-{job_id}-{node}" / "node.db", node=node,
                                    job_id=job_id, **kwargs)
        out.append(export_job(store, run_id, node_config(tmp_path, node),
                              now_ns=T0 + 10 * 3600 * S + i))
        store.close()
    return out


# The EpilogSlurmctld environment of a job (its header slice).
ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "my job", "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_JOB_ACCOUNT": "physics", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1000",
    "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_EXIT_CODE": "0", "SLURM_JOB_DERIVED_EC": "0",
    "SLURM_CLUSTER_NAME": "c1",
}
