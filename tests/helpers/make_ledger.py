"""Build a realistic cluster ledger fast, for the acct tests and ``bench/bench_acct.py``.

``bench/make_ledger.py`` is its command line:

    python bench/make_ledger.py --jobs 1000000 --out /tmp/ledger.db [--seed 1] [--days 365]

The ledger is created by :class:`llem.cluster.ledger.Ledger`, so its schema is the real one;
rows are then written directly (``executemany``, one transaction per 20,000 jobs, journal
off) instead of through slices and ``llem aggregate``, which would take hours for a million
jobs. The schema's indexes are dropped during the load and re-created from their own SQL at
the end, then ``ANALYZE`` runs, as ``llem aggregate`` leaves no statistics.

What the jobs look like: 200 users in 40 accounts; partitions ``gpu`` (4 GPUs per node, 45 %
of jobs), ``cpu`` (40 %), ``bigmem`` (10 %), ``debug`` (5 %); 80 % one-node jobs, the rest 2,
4 or 8 nodes; wall times from 2 minutes to 2 days (median about 40 minutes); 10 % array
tasks; 10 % with one or two named windows (``train``, ``eval``); 20 % tagged; 5 % on nodes
without RAPL (CPU and DRAM estimated); states 80 % COMPLETED, 12 % FAILED, 5 % CANCELLED, 3 % TIMEOUT; a
year of history. Per node and clock hour: one ``job_energy`` row per CPU package, DRAM and
allocated GPU, summing exactly to the run's totals. ``job_node_totals``, ``node_hours`` and
``job_headers`` are left empty (``llem-acct`` does not read them). The report's roll-ups
(``llem.cluster.rollups``) are filled by production code: ``rollups.rebuild_sqlite`` after
the load (SQLite), ``PgLedger.rebuild_rollups`` (PostgreSQL): the migration's SQL.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time

from llem.cluster import rollups
from llem.cluster.ledger import Ledger

S = 10**9
UJ = 10**6
BATCH_JOBS = 20_000
GPUS_PER_NODE = 4
PARTITIONS = (("gpu", 0.45), ("cpu", 0.40), ("bigmem", 0.10), ("debug", 0.05))
NODE_PREFIX = {"gpu": ("g", 400), "cpu": ("c", 800), "bigmem": ("m", 40), "debug": ("d", 8)}


RUN_COLUMNS = (
    "cluster",
    "job_id",
    "run_start_ns",
    "run_end_ns",
    "array_job_id",
    "array_task_id",
    "user",
    "uid",
    "account",
    "partition",
    "name",
    "tag",
    "nodelist",
    "num_nodes",
    "state",
    "exit_code",
    "signal",
    "derived_exit_code",
    "has_header",
    "status",
    "nodes_reported",
    "missing_nodes",
    "energy_uj",
    "cpu_energy_uj",
    "dram_energy_uj",
    "gpu_energy_uj",
    "other_energy_uj",
    "estimated_energy_uj",
    "gpu_seconds",
    "coverage",
    "node_ns",
    "gpu_ns",
    "gpu_count",
    "unresolved_gpus",
    "gpu_floor_w",
)
"""The ``job_runs`` columns a run's row fills, in order (the others keep their defaults)."""
SLURM_KEYS = (
    "submit_s",
    "eligible_s",
    "slurm_start_s",
    "slurm_end_s",
    "exit_code",
    "signal",
    "derived_exit_code",
    "derived_signal",
    "timelimit",
    "timelimit_min",
    "qos",
    "alloc_cpus",
    "alloc_tres",
    "req_mem",
    "cancelled_by",
)
"""The keys of a job's optional ``slurm`` dict: what Slurm's accounting said of the run
(times in epoch seconds), as ``llem aggregate`` stores it from sacct."""
SLURM_UPDATE = (
    "UPDATE job_runs SET submit_ns = ?, eligible_ns = ?, slurm_start_ns = ?, slurm_end_ns = ?, "
    "exit_code = ?, signal = ?, derived_exit_code = ?, derived_signal = ?, timelimit = ?, "
    "timelimit_min = ?, qos = ?, alloc_cpus = ?, alloc_tres = ?, req_mem = ?, cancelled_by = ?, "
    "state_source = 'slurm', accounted = 1 WHERE cluster = ? AND job_id = ? AND run_start_ns = ?"
)
"""A run's Slurm facts (values of :data:`SLURM_KEYS`, then its key), as the aggregator
stores them from sacct."""


class Writer:
    """Accumulates the rows of jobs and writes them in batches.

    A job is a dict: ``cluster``, ``job_id``, ``array_job_id``, ``array_task_id``, ``user``,
    ``uid``, ``account``, ``partition``, ``name``, ``tag``, ``state``, ``start_s``, ``end_s``,
    ``nodes`` (names), ``gpus_per_node``, ``cpu_w``, ``dram_w``, ``gpu_w`` (per GPU; integer
    watts), ``estimated`` (CPU and DRAM from the model), ``coverage``, ``windows`` (list of
    ``(name, step_id, start_s, end_s)``), and optionally ``slurm`` (a dict of
    :data:`SLURM_KEYS`: the run as Slurm's accounting knows it).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.next_id = (db.execute("SELECT MAX(id) FROM job_nodes").fetchone()[0] or 0) + 1
        self.runs: list[tuple] = []
        self.nodes: list[tuple] = []
        self.energy: list[tuple] = []
        self.windows: list[tuple] = []
        self.devices: dict[tuple, tuple] = {}
        self.slurm: list[tuple] = []

    def add(self, job: dict) -> None:
        start_s, end_s = job["start_s"], job["end_s"]
        cluster, estimated = job["cluster"], job["estimated"]
        src = "estimated" if estimated else "measured"
        totals = {"cpu": 0, "dram": 0, "gpu": 0}
        for node in job["nodes"]:
            job_node_id = self.next_id
            self.next_id += 1
            devices = [
                (
                    "rapl:package-0" if not estimated else "estimate:cpu",
                    "cpu",
                    job["cpu_w"],
                    src,
                    "rapl" if not estimated else "estimate",
                ),
                (
                    "rapl:dram-0" if not estimated else "estimate:dram",
                    "dram",
                    job["dram_w"],
                    src,
                    "rapl" if not estimated else "estimate",
                ),
            ]
            devices += [
                (f"nvml:GPU-{node}-{i}", "gpu", job["gpu_w"], "measured", "nvml")
                for i in range(job["gpus_per_node"])
            ]
            node_by = {"cpu": 0, "dram": 0, "gpu": 0}
            hour = start_s // 3600 * 3600
            while hour < end_s:
                overlap = min(end_s, hour + 3600) - max(start_s, hour)
                for key, component, watts, source, sensor in devices:
                    uj = overlap * watts * UJ
                    node_by[component] += uj
                    self.energy.append(
                        (job_node_id, key, hour, "counter", component, source, sensor, uj)
                    )
                hour += 3600
            for key, component, _, source, sensor in devices:
                dkey = (cluster, node, key)
                if dkey not in self.devices:
                    self.devices[dkey] = (
                        cluster,
                        node,
                        key,
                        component,
                        key.split(":")[-1],
                        sensor,
                        source,
                        "counter",
                    )
            node_total = sum(node_by.values())
            # every GPU of the node draws gpu_w: the least-used one's energy (the merge's)
            gpu_min_uj = (end_s - start_s) * job["gpu_w"] * UJ if job["gpus_per_node"] else None
            # the GPUs' device keys, as the sampler stores them (the energy rows' names)
            gpus = json.dumps(sorted(f"nvml:GPU-{node}-{i}" for i in range(job["gpus_per_node"])))
            self.nodes.append(
                (
                    job_node_id,
                    cluster,
                    job["job_id"],
                    node,
                    start_s * S,
                    end_s * S,
                    start_s * S,
                    job["array_job_id"],
                    job["array_task_id"],
                    job["user"],
                    job["uid"],
                    job["uid"],
                    job["account"],
                    job["partition"],
                    job["nodelist"],
                    len(job["nodes"]),
                    32,
                    gpus,
                    job["tag"],
                    job["name"],
                    "exported",
                    job["coverage"],
                    "[]",
                    node_total,
                    node_by["cpu"],
                    node_by["dram"],
                    node_by["gpu"],
                    0,
                    node_by["cpu"] + node_by["dram"] if estimated else 0,
                    end_s * S,
                    f"bench-{job['job_id']}-{node}",
                    gpu_min_uj,
                )
            )
            for name, step_id, w_start, w_end in job["windows"]:
                energy = {key: (w_end - w_start) * watts * UJ for key, _, watts, _, _ in devices}
                self.windows.append(
                    (
                        job_node_id,
                        name,
                        step_id,
                        w_start * S,
                        w_end * S,
                        "closed",
                        sum(energy.values()),
                        json.dumps(energy, sort_keys=True),
                    )
                )
            for k in totals:
                totals[k] += node_by[k]
        total = sum(totals.values())
        n = len(job["nodes"])
        self.runs.append(
            (
                cluster,
                job["job_id"],
                start_s * S,
                end_s * S,
                job["array_job_id"],
                job["array_task_id"],
                job["user"],
                job["uid"],
                job["account"],
                job["partition"],
                job["name"],
                job["tag"],
                job["nodelist"],
                n,
                job["state"],
                0 if job["state"] == "COMPLETED" else 1,
                None,
                0,
                1,
                "complete",
                n,
                "[]",
                total,
                totals["cpu"],
                totals["dram"],
                totals["gpu"],
                0,
                totals["cpu"] + totals["dram"] if estimated else 0,
                float(n * job["gpus_per_node"] * (end_s - start_s)),
                job["coverage"],
                n * (end_s - start_s) * S,
                n * job["gpus_per_node"] * (end_s - start_s) * S,
                n * job["gpus_per_node"],
                0,
                float(gpu_min_uj * 1000) / float((end_s - start_s) * S)
                if gpu_min_uj is not None and end_s > start_s
                else None,
            )
        )
        slurm = job.get("slurm")
        if slurm:
            values = [slurm.get(k) for k in SLURM_KEYS]
            values[:4] = [v * S if v is not None else None for v in values[:4]]
            self.slurm.append((*values, cluster, job["job_id"], start_s * S))

    def flush(self) -> None:
        db = self.db
        db.execute("BEGIN")
        db.executemany(
            f"INSERT INTO job_runs ({', '.join(RUN_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
            [r[: len(RUN_COLUMNS)] for r in self.runs],
        )
        if self.slurm:
            db.executemany(SLURM_UPDATE, self.slurm)
        db.executemany(
            "INSERT INTO job_nodes (id, cluster, job_id, node, start_ns, end_ns, run_start_ns, "
            "array_job_id, array_task_id, user, uid, gid, account, partition, nodelist, "
            "num_nodes, cpus, gpus, tag, name, node_state, coverage, flags, energy_uj, "
            "cpu_energy_uj, dram_energy_uj, gpu_energy_uj, other_energy_uj, "
            f"estimated_energy_uj, created_ns, digest, gpu_min_uj) VALUES ({', '.join('?' * 32)})",
            self.nodes,
        )
        db.executemany("INSERT INTO job_energy VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.energy)
        db.executemany(
            "INSERT INTO windows (job_node_id, name, step_id, start_ns, end_ns, status, "
            "energy_uj, energy) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self.windows,
        )
        db.executemany(
            "INSERT OR IGNORE INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            list(self.devices.values()),
        )
        db.execute("COMMIT")
        self.runs, self.nodes, self.energy, self.windows = [], [], [], []
        self.devices = {}
        self.slurm = []


def nodelist(nodes: list[str]) -> str:
    prefix = nodes[0].rstrip("0123456789")
    numbers = [n[len(prefix) :] for n in nodes]
    if len(nodes) == 1:
        return nodes[0]
    return f"{prefix}[{numbers[0]}-{numbers[-1]}]"  # consecutive nodes


def generate(
    n_jobs: int, *, seed: int = 1, now_s: int | None = None, days: int = 365, cluster: str = "bench"
):
    """Yield ``n_jobs`` job dicts (see :class:`Writer`), in order of start time."""
    rng = random.Random(seed)
    now_s = int(time.time()) if now_s is None else now_s
    first_s = now_s - days * 86400
    users = [f"u{i:03d}" for i in range(200)]
    accounts = [f"proj{i:02d}" for i in range(40)]
    user_accounts = {u: [accounts[i % 40], accounts[(i * 7 + 3) % 40]] for i, u in enumerate(users)}
    # Some users run much more than others (Zipf-like), as on real clusters.
    weights = [1.0 / (1 + i) ** 0.8 for i in range(len(users))]
    starts = sorted(rng.randrange(first_s, now_s - 120) for _ in range(n_jobs))
    names = ("train", "eval", "preprocess", "sim", "md-run", "bash", "jupyter", "render")
    parts = [p for p, _ in PARTITIONS]
    part_w = [w for _, w in PARTITIONS]
    job_id = 1_000_000
    array_left, array_of, task = 0, None, 0
    for start_s in starts:
        job_id += 1
        user = rng.choices(users, weights)[0]
        partition = rng.choices(parts, part_w)[0]
        duration = int(min(172_800, max(120, rng.lognormvariate(7.8, 1.3))))
        if partition == "debug":
            duration = min(duration, 1800)
        end_s = min(start_s + duration, now_s)
        n_nodes = rng.choices((1, 2, 4, 8), (0.80, 0.10, 0.07, 0.03))[0]
        prefix, count = NODE_PREFIX[partition]
        if partition in ("bigmem", "debug"):
            n_nodes = 1
        first = rng.randrange(1, count - n_nodes + 2)
        nodes = [f"{prefix}{i:04d}" for i in range(first, first + n_nodes)]
        gpus = 0
        if partition == "gpu":
            gpus = GPUS_PER_NODE if n_nodes > 1 else rng.choice((1, 2, 4))
        if array_left:
            array_left -= 1
            task += 1
        elif rng.random() < 0.02:
            array_left, array_of, task = 4, str(job_id), 0
        else:
            array_of = None
        windows = []
        if rng.random() < 0.10 and end_s - start_s > 600:
            mid = start_s + (end_s - start_s) * 2 // 3
            windows.append(("train", "0", start_s + 60, mid))
            if rng.random() < 0.5:
                windows.append(("eval", "1", mid, end_s - 30))
        yield {
            "cluster": cluster,
            "job_id": str(job_id),
            "array_job_id": array_of,
            "array_task_id": str(task) if array_of else None,
            "user": user,
            "uid": 10_000 + int(user[1:]),
            "account": rng.choice(user_accounts[user]),
            "partition": partition,
            "name": rng.choice(names),
            "tag": f"exp-{rng.randrange(50)}" if rng.random() < 0.2 else None,
            "state": rng.choices(
                ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (0.80, 0.12, 0.05, 0.03)
            )[0],
            "start_s": start_s,
            "end_s": max(end_s, start_s + 60),
            "nodes": nodes,
            "nodelist": nodelist(nodes),
            "gpus_per_node": gpus,
            "cpu_w": rng.randrange(60, 260),
            "dram_w": rng.randrange(8, 30),
            "gpu_w": rng.randrange(80, 400),
            "estimated": rng.random() < 0.05,
            "coverage": round(rng.uniform(0.97, 1.0), 4),
            "windows": windows,
        }


def write_jobs(path: str | os.PathLike, jobs, *, bulk: bool = True) -> int:
    """Create the ledger at ``path`` with the Ledger class and write ``jobs`` into it.

    Args:
        path: the ledger file (created when absent).
        jobs: an iterable of job dicts (see :class:`Writer`).
        bulk: drop the indexes during the load, journal off, then re-create them and run
            ``ANALYZE`` (a fresh ledger); False writes into the indexed ledger as it is.

    Returns:
        The number of jobs written.
    """
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    indexes = []
    if bulk:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -262144")
        indexes = [
            r
            for r in db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        ]
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
    writer = Writer(db)
    n = 0
    for job in jobs:
        writer.add(job)
        n += 1
        if n % BATCH_JOBS == 0:
            writer.flush()
    writer.flush()
    rollups.rebuild_sqlite(db)  # the report's roll-ups, by the migration's own SQL
    for _, sql in indexes:
        db.execute(sql)
    if bulk:
        db.execute("ANALYZE")
        db.execute("PRAGMA journal_mode = DELETE")
    db.close()
    return n


class PgWriter(Writer):
    """:class:`Writer` for a PostgreSQL ledger: each batch by binary ``COPY`` in one
    transaction, month partitions created as the rows need them."""

    def __init__(self, ledger) -> None:
        self.ledger = ledger
        self.next_id = (ledger.query("SELECT MAX(id) FROM job_nodes")[0][0] or 0) + 1
        self.runs, self.nodes, self.energy, self.windows = [], [], [], []
        self.devices = {}
        self.slurm = []

    def flush(self) -> None:
        led = self.ledger
        with led._txn() as cur:
            led._ensure_partitions(cur, "job_energy", {r[2] for r in self.energy})
            led._copy(cur, "job_runs", [r[: len(RUN_COLUMNS)] for r in self.runs], RUN_COLUMNS)
            if self.slurm:
                cur.executemany(SLURM_UPDATE.replace("?", "%s"), self.slurm)
            led._copy(cur, "job_nodes", self.nodes, PG_NODE_COLUMNS)
            led._copy(
                cur,
                "job_energy",
                self.energy,
                ("job_node_id", "device_key", "hour_s", "method", "component", "source")
                + ("sensor", "energy_uj"),
            )
            led._copy(
                cur,
                "windows",
                self.windows,
                ("job_node_id", "name", "step_id", "start_ns", "end_ns", "status", "energy_uj")
                + ("energy",),
            )
            cur.executemany(
                "INSERT INTO devices VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                list(self.devices.values()),
            )
        self.runs, self.nodes, self.energy, self.windows = [], [], [], []
        self.devices = {}


PG_NODE_COLUMNS = (
    "id",
    "cluster",
    "job_id",
    "node",
    "start_ns",
    "end_ns",
    "run_start_ns",
    "array_job_id",
    "array_task_id",
    "user",
    "uid",
    "gid",
    "account",
    "partition",
    "nodelist",
    "num_nodes",
    "cpus",
    "gpus",
    "tag",
    "name",
    "node_state",
    "coverage",
    "flags",
    "energy_uj",
    "cpu_energy_uj",
    "dram_energy_uj",
    "gpu_energy_uj",
    "other_energy_uj",
    "estimated_energy_uj",
    "created_ns",
    "digest",
    "gpu_min_uj",
)
"""The columns of :class:`Writer`'s job node rows."""


def write_jobs_pg(url: str, jobs) -> int:
    """:func:`write_jobs` for a PostgreSQL ledger (``url``): schema by ``PgLedger``, rows by
    ``COPY`` (indexes kept), then the identity columns and planner statistics brought up to
    date."""
    from llem.cluster.pg_ledger import PgLedger

    with PgLedger(url) as ledger:
        writer = PgWriter(ledger)
        n = 0
        for job in jobs:
            writer.add(job)
            n += 1
            if n % BATCH_JOBS == 0:
                writer.flush()
        writer.flush()
        ledger.rebuild_rollups()  # the report's roll-ups, by the migration's own SQL
        ledger.after_copy()
    return n
