"""Test ledgers for ``llem report``, built as production builds them.

Every job is sampled into a real node store (``tests.helpers.nodes.build_store``), exported as
a job slice (``export_job``) and the node's hourly totals as a node slice (``export_node``),
checked with ``slices.validate`` and merged into a real ledger. Accounts, users, partitions
and tags are set on the exported slice (the node store fixture has one account), and an
"estimated" job has its devices marked as the estimate model marks them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llem import slices
from llem.cluster.ledger import Ledger, digest
from llem.config import CarbonConfig, Config
from llem.node.export import export_job, export_node
from tests.helpers.nodes import S, build_store, node_config


def utc_ns(text: str) -> int:
    """'2023-11-14 21:30' (UTC) -> epoch ns."""
    dt = datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * S


@dataclass(frozen=True)
class Job:
    job_id: str
    node: str
    start: str  # UTC 'YYYY-MM-DD HH:MM'
    seconds: int
    user: str = "alice"
    account: str = "physics"
    partition: str = "gpu"
    tag: str | None = "exp-1"
    gpu_w: float = 250.0
    cpu_w: float = 100.0
    estimated: bool = False
    platform_w: float = 0.0  # a node meter reading the parts plus this: the platform residual


def job_and_node_slices(tmp_path: Path, job: Job) -> list[dict]:
    store_path = tmp_path / "stores" / f"{job.job_id}-{job.node}" / "node.db"
    start_ns = utc_ns(job.start)
    store, run_id = build_store(
        store_path,
        node=job.node,
        job_id=job.job_id,
        start_ns=start_ns,
        seconds=job.seconds,
        step_s=300,
        nodelist=job.node,
        user=job.user,
        name=f"job-{job.job_id}",
        cpu_uw=int(job.cpu_w * 1e6),
        gpu_uw=int(job.gpu_w * 1e6),
        platform_uw=int(job.platform_w * 1e6),
    )
    cfg = node_config(tmp_path, job.node)
    end_ns = start_ns + job.seconds * S
    data = export_job(store, run_id, cfg, now_ns=end_ns + S)
    node = export_node(store, cfg, job.node, since_ns=start_ns, until_ns=end_ns, now_ns=end_ns + S)
    store.close()
    data["job"].update(account=job.account, partition=job.partition, tag=job.tag, num_nodes=1)
    out = [data, node]
    if job.estimated:
        for d in out:
            for dev in d["devices"].values():
                dev.update(source="estimated", sensor="estimate", method="model")
    for d in out:
        slices.validate(d)
    return out


def build_ledger(tmp_path: Path, jobs: list[Job], name: str = "ledger.db") -> Path:
    """Merge the slices of ``jobs`` into a new ledger; return its path."""
    path = tmp_path / "ledger" / name
    items = []
    for job in jobs:
        for d in job_and_node_slices(tmp_path, job):
            items.append((d, digest(json.dumps(d, sort_keys=True).encode())))
    with Ledger(path) as ledger:
        ledger.merge(items, now_ns=utc_ns("2024-02-01 00:00"), grace_s=3600.0)
    return path


# November 2023 (the report month), with a job crossing into December and one in October.
NOVEMBER = [
    Job("101", "n1", "2023-11-02 08:00", 3 * 3600, "alice", "physics", "gpu", "exp-1"),
    Job("102", "n2", "2023-11-02 09:30", 2 * 3600, "bob", "physics", "gpu", "exp-2"),
    Job("103", "n3", "2023-11-10 12:00", 4 * 3600, "carol", "chemistry", "gpu", None),
    Job(
        "104", "n4", "2023-11-15 00:00", 6 * 3600, "dave", "biology", "gpu-long", "fold", gpu_w=35.0
    ),  # allocated GPU idle all along: waste
    Job(
        "105",
        "n5",
        "2023-11-20 18:00",
        3600,
        "carol",
        "chemistry",
        "cpu",
        None,
        gpu_w=0.0,
        cpu_w=150.0,
    ),
    Job("106", "n6", "2023-11-30 23:00", 2 * 3600, "alice", "physics", "gpu", "exp-1"),
    Job("090", "n7", "2023-10-20 10:00", 2 * 3600, "alice", "physics", "gpu", "exp-1"),
]
ESTIMATED = [
    Job("201", "n1", "2023-11-03 10:00", 2 * 3600, "erin", "astro", estimated=True),
    Job("202", "n2", "2023-11-04 10:00", 3600, "frank", "astro", estimated=True),
]


def report_config(ledger: Path, region: str = "DE", pue: float = 1.2, **carbon) -> Config:
    return Config(
        cluster="c1", ledger=str(ledger), carbon=CarbonConfig(region=region, pue=pue, **carbon)
    )


def write_yaml(path: Path, ledger: Path, region: str = "DE", pue: float = 1.2) -> Path:
    path.write_text(f"cluster: c1\nledger: {ledger}\ncarbon:\n  region: {region}\n  pue: {pue}\n")
    return path
