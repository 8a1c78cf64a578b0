"""The cluster ledger: every SQL statement on the ledger lives in this module.

SQLite in WAL mode by default: readers (``llem-acct``, ``llem report``) are never blocked by
a merge, which commits one short transaction per batch of slices. A server database can
later stand behind the same :class:`Ledger` methods without touching the CLI.

Merging is idempotent on natural keys, never on file names:

* a job run on a node: (cluster, job_id, node, start_ns); a re-export of the same run replaces
  it when it is newer (larger ``created_ns``, ties broken by the slice's digest), so merging
  slices twice or in any order gives the same ledger;
* a node hour: (cluster, node, hour_s, device); the row with the larger ``as_of_ns`` wins;
* a job header: (cluster, job_id, end_ns).

``job_runs`` (one row per run of a job across its nodes, with summary totals) is derived:
after each merge touching a job, its runs are recomputed from its node runs and headers (see
:func:`group_runs`), so the result depends on the set of slices, not their order.

The schema is documented in ``docs/ledger.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llem import slices
from llem.cluster import rollups
from llem.cluster.dialect import SQLITE, Dialect
from llem.errors import LedgerError
from llem.hostlist import expand_hostlist
from llem.sqlite import Database, Messages, open_database, run_script

log = logging.getLogger(__name__)

LEDGER_MODE = 0o644
"""Mode of a ledger created by :class:`Ledger` itself; ``llem aggregate`` sets the private mode
(:data:`PRIVATE_MODE`) unless ``privacy: none`` (:func:`set_access`)."""
PRIVATE_MODE = 0o640
HEADER_SLACK_NS = 5 * 10**9
"""Clock skew allowed between slurmctld (header end time) and the nodes (run start)."""
HEADER_AFTER_NS = 600 * 10**9
"""How long after its nodes' Epilogs slurmctld's EpilogSlurmctld may still run."""

_HEADER_ROW = (
    "cluster",
    "job_id",
    "end_ns",
    "start_ns",
    "array_job_id",
    "array_task_id",
    "user",
    "uid",
    "account",
    "partition",
    "name",
    "nodelist",
    "num_nodes",
    "state",
    "exit_code",
    "signal",
    "derived_exit_code",
    "derived_signal",
)
"""The columns of a header's row (see :func:`prepare`), in order."""
SLURM_JOB_COLUMNS = (
    "cluster",
    "job_id",
    "start_ns",
    "end_ns",
    "submit_ns",
    "eligible_ns",
    "state",
    "exit_code",
    "signal",
    "derived_exit_code",
    "derived_signal",
    "timelimit",
    "timelimit_min",
    "alloc_cpus",
    "alloc_tres",
    "req_mem",
    "qos",
    "cancelled_by",
    "checked_ns",
)
"""The columns of ``slurm_jobs``, in order."""

# Slurm's accounting, in the SQL both backends take (``?`` parameters; the PostgreSQL ledger
# translates them): the same candidates, records, tries and delays on both.
ACCOUNTING_CANDIDATES = (
    "SELECT r.cluster, r.job_id FROM job_runs r LEFT JOIN slurm_checks c "
    "ON c.cluster = r.cluster AND c.job_id = r.job_id "
    "WHERE r.accounted = 0 AND r.run_end_ns <= ? "
    "AND (c.next_ns IS NULL OR (c.next_ns <= ? AND c.tries < ?)) "
    "GROUP BY r.cluster, r.job_id ORDER BY MIN(r.run_end_ns), r.cluster, r.job_id LIMIT ?"
)
"""Jobs due for a (re)try: ended before, a run unconfirmed, not given up; oldest end first
(ties by key, so that both backends choose the same jobs when a pass cannot take all)."""
UNACCOUNTED_RUN = (
    "SELECT 1 FROM job_runs WHERE cluster = ? AND job_id = ? AND accounted = 0 LIMIT 1"
)
FORGET_CHECK = "DELETE FROM slurm_checks WHERE cluster = ? AND job_id = ?"
CHECK_TRIES = "SELECT tries FROM slurm_checks WHERE cluster = ? AND job_id = ?"
SAVE_CHECK = (
    "INSERT INTO slurm_checks VALUES (?, ?, ?, ?) ON CONFLICT (cluster, job_id) "
    "DO UPDATE SET tries = excluded.tries, next_ns = excluded.next_ns"
)
DEFER_CHECK = (
    "INSERT INTO slurm_checks VALUES (?, ?, 0, ?) ON CONFLICT (cluster, job_id) "
    "DO UPDATE SET next_ns = excluded.next_ns"
)
"""A try that does not count (sacct failed): only the delay."""


def upsert_slurm_job(dialect: Dialect) -> str:
    """Insert a record of ``slurm_jobs`` (its columns' values, ``checked_ns`` last), or
    update the one of that run when a fact changed (one change counted, none when equal)."""
    facts = SLURM_JOB_COLUMNS[3:-1]
    return (
        f"INSERT INTO slurm_jobs ({', '.join(SLURM_JOB_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(SLURM_JOB_COLUMNS))}) "
        "ON CONFLICT (cluster, job_id, start_ns) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in facts)
        + f" WHERE ({', '.join(f'slurm_jobs.{c}' for c in facts)}) {dialect.distinct} "
        f"({', '.join(f'excluded.{c}' for c in facts)})"
    )


def _v1(db: sqlite3.Connection) -> None:
    run_script(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE devices (
            cluster TEXT NOT NULL, node TEXT NOT NULL, device_key TEXT NOT NULL,
            component TEXT NOT NULL, name TEXT, sensor TEXT NOT NULL,
            source TEXT NOT NULL, method TEXT NOT NULL,
            PRIMARY KEY (cluster, node, device_key)
        ) WITHOUT ROWID;
        CREATE TABLE job_runs (
            cluster TEXT NOT NULL, job_id TEXT NOT NULL, run_start_ns INTEGER NOT NULL,
            run_end_ns INTEGER, array_job_id TEXT, array_task_id TEXT,
            user TEXT, uid INTEGER, account TEXT, partition TEXT, name TEXT, tag TEXT,
            nodelist TEXT, num_nodes INTEGER,
            state TEXT, exit_code INTEGER, signal INTEGER, derived_exit_code INTEGER,
            has_header INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'incomplete')),
            nodes_reported INTEGER NOT NULL, missing_nodes TEXT NOT NULL DEFAULT '[]',
            energy_uj INTEGER NOT NULL DEFAULT 0, cpu_energy_uj INTEGER NOT NULL DEFAULT 0,
            dram_energy_uj INTEGER NOT NULL DEFAULT 0, gpu_energy_uj INTEGER NOT NULL DEFAULT 0,
            other_energy_uj INTEGER NOT NULL DEFAULT 0,
            estimated_energy_uj INTEGER NOT NULL DEFAULT 0,
            gpu_seconds REAL NOT NULL DEFAULT 0, coverage REAL,
            PRIMARY KEY (cluster, job_id, run_start_ns)
        );
        CREATE INDEX job_runs_by_user ON job_runs (user, run_start_ns);
        CREATE INDEX job_runs_by_account ON job_runs (account, run_start_ns);
        CREATE INDEX job_runs_by_time ON job_runs (run_start_ns);
        CREATE INDEX job_runs_by_end ON job_runs (run_end_ns);
        CREATE INDEX job_runs_pending ON job_runs (status) WHERE status != 'complete';
        CREATE TABLE job_nodes (
            id INTEGER PRIMARY KEY,
            cluster TEXT NOT NULL, job_id TEXT NOT NULL, node TEXT NOT NULL,
            start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, run_start_ns INTEGER,
            array_job_id TEXT, array_task_id TEXT, user TEXT, uid INTEGER, gid INTEGER,
            account TEXT, partition TEXT, nodelist TEXT, num_nodes INTEGER, cpus INTEGER,
            gpus TEXT NOT NULL DEFAULT '[]', tag TEXT, name TEXT, node_state TEXT,
            coverage REAL, flags TEXT NOT NULL DEFAULT '[]',
            energy_uj INTEGER NOT NULL, cpu_energy_uj INTEGER NOT NULL,
            dram_energy_uj INTEGER NOT NULL, gpu_energy_uj INTEGER NOT NULL,
            other_energy_uj INTEGER NOT NULL, estimated_energy_uj INTEGER NOT NULL,
            created_ns INTEGER NOT NULL, digest TEXT NOT NULL,
            UNIQUE (cluster, job_id, node, start_ns)
        );
        CREATE INDEX job_nodes_by_node ON job_nodes (node, start_ns);
        CREATE TABLE job_energy (
            job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
            device_key TEXT NOT NULL, hour_s INTEGER NOT NULL, method TEXT NOT NULL,
            component TEXT NOT NULL, source TEXT NOT NULL, sensor TEXT NOT NULL,
            energy_uj INTEGER NOT NULL CHECK (energy_uj >= 0),
            PRIMARY KEY (job_node_id, device_key, hour_s, method)
        ) WITHOUT ROWID;
        CREATE TABLE job_node_totals (
            job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
            device_key TEXT NOT NULL,
            measured_uj INTEGER NOT NULL, attributed_uj INTEGER NOT NULL,
            remainder_uj INTEGER NOT NULL, gap_intervals INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job_node_id, device_key)
        ) WITHOUT ROWID;
        CREATE TABLE windows (
            job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
            name TEXT NOT NULL, step_id TEXT NOT NULL DEFAULT '', start_ns INTEGER NOT NULL,
            end_ns INTEGER, status TEXT NOT NULL, energy_uj INTEGER NOT NULL DEFAULT 0,
            energy TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (job_node_id, name, step_id, start_ns)
        ) WITHOUT ROWID;
        CREATE TABLE job_headers (
            cluster TEXT NOT NULL, job_id TEXT NOT NULL, end_ns INTEGER NOT NULL,
            start_ns INTEGER, array_job_id TEXT, array_task_id TEXT, user TEXT, uid INTEGER,
            account TEXT, partition TEXT, name TEXT, nodelist TEXT, num_nodes INTEGER,
            state TEXT, exit_code INTEGER, signal INTEGER, derived_exit_code INTEGER,
            PRIMARY KEY (cluster, job_id, end_ns)
        ) WITHOUT ROWID;
        CREATE TABLE node_hours (
            cluster TEXT NOT NULL, node TEXT NOT NULL, hour_s INTEGER NOT NULL,
            device_key TEXT NOT NULL, component TEXT NOT NULL, source TEXT NOT NULL,
            measured_uj INTEGER NOT NULL, attributed_uj INTEGER NOT NULL,
            remainder_uj INTEGER NOT NULL, intervals INTEGER NOT NULL,
            gap_intervals INTEGER NOT NULL, covered_ns INTEGER NOT NULL,
            as_of_ns INTEGER NOT NULL,
            PRIMARY KEY (cluster, node, hour_s, device_key)
        ) WITHOUT ROWID;
        CREATE INDEX node_hours_by_hour ON node_hours (hour_s);
        CREATE TABLE quarantine (
            file TEXT NOT NULL, digest TEXT NOT NULL, reason TEXT NOT NULL,
            owner_uid INTEGER, size INTEGER, ts_ns INTEGER NOT NULL,
            PRIMARY KEY (file, digest)
        )
    """,
    )


ENERGY_COLUMNS = (
    "energy_uj",
    "cpu_energy_uj",
    "dram_energy_uj",
    "gpu_energy_uj",
    "other_energy_uj",
    "estimated_energy_uj",
)


def _v2(db: sqlite3.Connection) -> None:
    """Indexes for ``llem-acct``'s time windows (they used to be added by its first run).

    ``--user U --since 30d`` asks for runs that *ended* after the start of the window: the
    (user, run_start_ns) index cannot bound that, (user, run_end_ns) can.
    """
    run_script(
        db,
        """
        CREATE INDEX IF NOT EXISTS job_runs_by_user_end ON job_runs (user, run_end_ns);
        CREATE INDEX IF NOT EXISTS job_runs_by_account_end ON job_runs (account, run_end_ns)
    """,
    )


def _v3(db: sqlite3.Connection) -> None:
    """The attribution in force for each job on each node (policy, allocation, idle powers),
    as the slice's ``job.attribution`` JSON (issue 13)."""
    if not any(r[1] == "attribution" for r in db.execute("PRAGMA table_info(job_nodes)")):
        db.execute("ALTER TABLE job_nodes ADD COLUMN attribution TEXT")


def _v4_work_and_power(db: sqlite3.Connection) -> None:
    """Work per window (a count and its unit) and each job node's coarse power series (one
    point per device per step, ``llem.slice/2``; issue 18): one row per job node, the points
    as compact JSON (``[[t_s, device index, energy_uj, span_ms], ...]`` with the device keys
    listed once), so that a million jobs make a million rows, not a billion."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(windows)")}
    if "work" not in columns:
        db.execute("ALTER TABLE windows ADD COLUMN work REAL")
    if "unit" not in columns:
        db.execute("ALTER TABLE windows ADD COLUMN unit TEXT")
    db.execute(
        """
        CREATE TABLE IF NOT EXISTS job_power (
            job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
            step_s INTEGER NOT NULL, devices TEXT NOT NULL, points TEXT NOT NULL,
            PRIMARY KEY (job_node_id)
        ) WITHOUT ROWID
        """
    )


def _v5_remainder_labels(db: sqlite3.Connection) -> None:
    """The parts of a node's remainder with a label of their own (issue 13): the static part
    no job's allocation covers (``idle_unallocated_uj``) and, under the ``allocation``
    policy, the unallocated share (``unallocated_uj``), in node hours and job node totals.
    NULL: not known (merged from a slice written before the labels existed)."""
    for table in ("node_hours", "job_node_totals"):
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for column in ("idle_unallocated_uj", "unallocated_uj"):
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER")


def _v6_slurm_accounting(db: sqlite3.Connection) -> None:
    """Slurm's accounting (``sacct``) as the authority for job facts (issue 19).

    ``slurm_jobs``: one row per run of a job as slurmdbd records it (``sacct -X -D``), keyed
    by its start; ``slurm_checks``: when each job was last asked about, for the retries.
    ``job_runs`` gains the facts only Slurm knows (submit, eligible, time limit, allocation,
    derived signal), where its state came from, and Slurm's own start and end.

    Existing headers are corrected: on Slurm 22.05 EpilogSlurmctld sees exit code 0:0 for a
    cancelled or timed-out job, so a header's ``COMPLETED`` was a guess (now ``UNKNOWN``);
    ``SIGNALED`` becomes sacct's ``FAILED``; a derived exit code stored as a raw wait status
    (a multiple of 256) becomes the exit code.
    """
    run_script(
        db,
        """
        CREATE TABLE IF NOT EXISTS slurm_jobs (
            cluster TEXT NOT NULL, job_id TEXT NOT NULL, start_ns INTEGER NOT NULL,
            end_ns INTEGER, submit_ns INTEGER, eligible_ns INTEGER, state TEXT NOT NULL,
            exit_code INTEGER, signal INTEGER, derived_exit_code INTEGER, derived_signal INTEGER,
            timelimit TEXT, timelimit_min INTEGER, alloc_cpus INTEGER, alloc_tres TEXT,
            req_mem TEXT, qos TEXT, cancelled_by INTEGER, checked_ns INTEGER NOT NULL,
            PRIMARY KEY (cluster, job_id, start_ns)
        );
        CREATE TABLE IF NOT EXISTS slurm_checks (
            cluster TEXT NOT NULL, job_id TEXT NOT NULL, tries INTEGER NOT NULL,
            next_ns INTEGER NOT NULL,
            PRIMARY KEY (cluster, job_id)
        )
    """,
    )
    have = {r[1] for r in db.execute("PRAGMA table_info(job_runs)")}
    for column, decl in (
        ("derived_signal", "INTEGER"),
        ("submit_ns", "INTEGER"),
        ("eligible_ns", "INTEGER"),
        ("slurm_start_ns", "INTEGER"),
        ("slurm_end_ns", "INTEGER"),
        ("timelimit", "TEXT"),
        ("timelimit_min", "INTEGER"),
        ("qos", "TEXT"),
        ("alloc_cpus", "INTEGER"),
        ("alloc_tres", "TEXT"),
        ("req_mem", "TEXT"),
        ("cancelled_by", "INTEGER"),
        ("state_source", "TEXT"),
        ("accounted", "INTEGER NOT NULL DEFAULT 0"),
    ):
        if column not in have:
            db.execute(f"ALTER TABLE job_runs ADD COLUMN {column} {decl}")
    have = {r[1] for r in db.execute("PRAGMA table_info(job_headers)")}
    if "derived_signal" not in have:
        db.execute("ALTER TABLE job_headers ADD COLUMN derived_signal INTEGER")
    run_script(
        db,
        """
        CREATE INDEX IF NOT EXISTS job_runs_unaccounted ON job_runs (run_end_ns)
            WHERE accounted = 0;
        UPDATE job_headers SET derived_exit_code = derived_exit_code / 256
            WHERE derived_exit_code >= 256 AND derived_exit_code % 256 = 0;
        UPDATE job_runs SET derived_exit_code = derived_exit_code / 256
            WHERE derived_exit_code >= 256 AND derived_exit_code % 256 = 0;
        UPDATE job_headers SET state = 'UNKNOWN' WHERE state = 'COMPLETED';
        UPDATE job_runs SET state = 'UNKNOWN' WHERE state = 'COMPLETED';
        UPDATE job_headers SET state = 'FAILED' WHERE state = 'SIGNALED';
        UPDATE job_runs SET state = 'FAILED' WHERE state = 'SIGNALED';
        UPDATE job_runs SET state_source = 'header' WHERE has_header = 1
    """,
    )


def _v7_job_steps(db: sqlite3.Connection) -> None:
    """Per-step energy (issue 19): the Slurm steps of each job node (``batch``, ``extern``,
    ``0``, ...; ``other`` for the steps beyond the node's cap) with their span, CPU time and
    energy per device (JSON, as windows keep theirs; ``energy_uj`` its sum), a part of the
    job node's energy split by the step's CPU time. A new table: costs nothing on a big
    ledger; job nodes merged before it have no steps."""
    db.execute(
        """
        CREATE TABLE IF NOT EXISTS job_steps (
            job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
            step TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
            cpu_ns INTEGER NOT NULL, energy_uj INTEGER NOT NULL, energy TEXT NOT NULL,
            PRIMARY KEY (job_node_id, step)
        ) WITHOUT ROWID
        """
    )


def _v8_report_rollups(db: sqlite3.Connection) -> None:
    """The report's roll-ups (issue 14), ``llem.cluster.rollups``: ``job_node_hours`` (per
    job node and clock hour, energy by component) and ``job_node_gpus`` (per job node and
    allocated GPU, its energy and first and last hour), filled from the energy rows already
    merged by one ``INSERT ... SELECT ... GROUP BY`` each, then kept by every merge."""
    run_script(db, rollups.SQLITE_DDL)
    rollups.rebuild_sqlite(db)


def _v9_planner_statistics(db: sqlite3.Connection) -> None:
    """Nothing on SQLite: its planner takes an equality on the leading columns of a unique
    index (job nodes by cluster and job id) without statistics. The PostgreSQL twin fixes
    that planner's estimate of distinct job ids (:mod:`llem.cluster.pg_schema`)."""


RUN_SPAN_SQL = """
    UPDATE job_runs SET node_ns = s.node_ns, gpu_ns = s.gpu_ns
    FROM (SELECT jn.cluster AS cluster, jn.job_id AS job_id, jn.run_start_ns AS run_start_ns,
                 SUM(jn.end_ns - jn.start_ns) AS node_ns,
                 SUM({json_length} * (jn.end_ns - jn.start_ns)) AS gpu_ns
          FROM job_nodes jn GROUP BY jn.cluster, jn.job_id, jn.run_start_ns) s
    WHERE job_runs.cluster = s.cluster AND job_runs.job_id = s.job_id
      AND job_runs.run_start_ns = s.run_start_ns
"""
"""Fills ``job_runs.node_ns`` and ``gpu_ns`` from the job nodes (``_v10_run_spans``); a run
without job nodes (a header alone) keeps 0."""


def _v10_run_spans(db: sqlite3.Connection) -> None:
    """A run's node time and GPU time (``node_ns``: the sum of its job nodes' spans;
    ``gpu_ns``: each span times the node's allocated GPUs), integers kept by every regroup
    (:func:`summarize_run`), so that ``llem report`` reads a run that lies inside its period
    from ``job_runs`` alone instead of looking up its job nodes (issue 14: the runs of a
    month of a 10,000,000-job ledger). Filled from the job nodes here."""
    have = {r[1] for r in db.execute("PRAGMA table_info(job_runs)")}
    for column in ("node_ns", "gpu_ns"):
        if column not in have:
            db.execute(f"ALTER TABLE job_runs ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    db.execute(RUN_SPAN_SQL.format(json_length="json_array_length(jn.gpus)"))


GPU_MIN_SQL = """
    UPDATE job_nodes SET gpu_min_uj = (
        SELECT MIN(COALESCE(x.energy_uj, 0)) FROM {items}
        LEFT JOIN job_node_gpus x ON x.job_node_id = job_nodes.id AND x.device_key = g.value
        WHERE {resolved})
    WHERE gpus != '[]'
"""
"""Fills ``job_nodes.gpu_min_uj`` from the GPU roll-up (``_v11_idle_floor``)."""
GPU_FLOOR_SQL = """
    UPDATE job_runs SET gpu_count = s.gpu_count, unresolved_gpus = s.unresolved,
                        gpu_floor_w = s.floor
    FROM (SELECT jn.cluster AS cluster, jn.job_id AS job_id, jn.run_start_ns AS run_start_ns,
                 SUM({length}) AS gpu_count, SUM({length} - {resolved_count}) AS unresolved,
                 MIN(CASE WHEN jn.gpu_min_uj IS NOT NULL AND jn.end_ns > jn.start_ns
                          THEN CAST(jn.gpu_min_uj * 1000 AS {double})
                               / CAST(jn.end_ns - jn.start_ns AS {double}) END) AS floor
          FROM job_nodes jn WHERE jn.gpus != '[]'
          GROUP BY jn.cluster, jn.job_id, jn.run_start_ns) s
    WHERE job_runs.cluster = s.cluster AND job_runs.job_id = s.job_id
      AND job_runs.run_start_ns = s.run_start_ns
"""
"""Fills ``job_runs.gpu_count``, ``unresolved_gpus`` and ``gpu_floor_w`` from the job
nodes (``_v11_idle_floor``), as :func:`_node_figures` computes them."""


def _v11_idle_floor(db: sqlite3.Connection) -> None:
    """What the report needs to judge idle GPUs only where one may be (issue 14): the job
    node's least GPU energy (``job_nodes.gpu_min_uj``), and per run its GPUs, those known
    only by index, and its least-used GPU's average power (``job_runs.gpu_count``,
    ``unresolved_gpus``, ``gpu_floor_w``). Filled from the GPU roll-up and the job nodes."""
    have = {r[1] for r in db.execute("PRAGMA table_info(job_nodes)")}
    if "gpu_min_uj" not in have:
        db.execute("ALTER TABLE job_nodes ADD COLUMN gpu_min_uj INTEGER")
    have = {r[1] for r in db.execute("PRAGMA table_info(job_runs)")}
    for column, decl in (
        ("gpu_count", "INTEGER NOT NULL DEFAULT 0"),
        ("unresolved_gpus", "INTEGER NOT NULL DEFAULT 0"),
        ("gpu_floor_w", "REAL"),
    ):
        if column not in have:
            db.execute(f"ALTER TABLE job_runs ADD COLUMN {column} {decl}")
    db.execute(
        GPU_MIN_SQL.format(items="json_each(job_nodes.gpus) g", resolved="instr(g.value, ':') > 0")
    )
    db.execute(
        GPU_FLOOR_SQL.format(
            length="json_array_length(jn.gpus)",
            resolved_count="(SELECT COUNT(*) FROM json_each(jn.gpus) g "
            "WHERE instr(g.value, ':') > 0)",
            double="REAL",
        )
    )


RUN_LENGTH_INDEX = (
    "CREATE INDEX IF NOT EXISTS job_runs_by_length ON job_runs ((run_end_ns - run_start_ns))"
)
"""Each run's length, indexed (``_v12_run_length``): ``MAX(run_end_ns - run_start_ns)`` is
then one index step, the longest run in the ledger. A run overlapping a period that starts
at ``S`` started after ``S`` less that length, so the report finds the runs across a
period's start through the start-time index from there, instead of every run that ends
after ``S`` (``llem.cluster.report_queries.run_start_floor``). The expression cannot
overflow: run times are checked to lie in 2000-2100 (``llem.slices``)."""


def _v12_run_length(db: sqlite3.Connection) -> None:
    """:data:`RUN_LENGTH_INDEX` (issue 14: a month of a 10,000,000-job ledger that is not
    its last read every run ending after the month's start, 1,790,000 index entries for
    850,000 runs)."""
    db.execute(RUN_LENGTH_INDEX)


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (
    _v1,
    _v2,
    _v3,
    _v4_work_and_power,
    _v5_remainder_labels,
    _v6_slurm_accounting,
    _v7_job_steps,
    _v8_report_rollups,
    _v9_planner_statistics,
    _v10_run_spans,
    _v11_idle_floor,
    _v12_run_length,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _check_parent(path: Path) -> None:
    from llem.fsutil import dir_problem

    # Not even the group may write here: a group member could swap in a forged ledger (or
    # -wal) that root's aggregator would then extend and every report would trust.
    problem = dir_problem(path, create_mode=0o755)
    if problem is not None:
        raise LedgerError(
            f"{path}: the ledger's directory {problem}; refusing to write the ledger there"
        )


DATABASE = Database(
    migrations=MIGRATIONS,
    readable_from=1,
    file_mode=LEDGER_MODE,
    prepare_dir=_check_parent,
    busy_timeout_s=30.0,
    pragmas=("PRAGMA foreign_keys = ON", "PRAGMA busy_timeout = 30000"),
    # Merges touch the job tables' right edges and their indexes: a 64 MB page cache keeps
    # them in memory (the default 2 MB thrashes past ~1e5 jobs).
    write_pragmas=(
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA cache_size = -65536",
    ),
    error=LedgerError,
    messages=Messages(
        not_a_database="{path}: not a usable ledger database: {error}",
        cannot_open="{path}: cannot open the ledger: {error}",
        newer="{path}: ledger schema {version} is newer than this llem knows ({known}); "
        "upgrade llem",
        needs_migrating="{path}: the ledger needs migrating by llem aggregate",
        migration_failed="{path}: ledger write failed: {error}",
        # WAL mode for good (see Ledger.close): only a ledger left in rollback-journal mode by
        # an older llem, with a reader in, can still make a writer wait, once.
        busy="{path}: the ledger is locked ({error}): a reader holds it in rollback-journal "
        "mode (as earlier versions of llem left it; the next pass switches it to WAL for "
        "good), or a process locks its files directly",
    ),
)
"""How the ledger is opened: mode 0644 in a directory only root writes, WAL while writing.

``readable_from``: the migrations after the first add indexes only, so a reader (who never
writes) reads a ledger that ``llem aggregate`` has not migrated yet as it is.
"""

# Columns compared by the canonical dump: natural keys and data, never row ids or times of
# merging, so that two ledgers holding the same facts dump the same.
_NODE_KEY = "jn.cluster, jn.job_id, jn.node, jn.start_ns"
CANONICAL_QUERIES = {
    "devices": "SELECT * FROM devices",
    "job_runs": "SELECT * FROM job_runs",
    "job_nodes": "SELECT cluster, job_id, node, start_ns, end_ns, run_start_ns, array_job_id, "
    'array_task_id, "user", uid, gid, account, partition, nodelist, num_nodes, cpus, '
    "gpus, tag, name, node_state, coverage, flags, energy_uj, cpu_energy_uj, "
    "dram_energy_uj, gpu_energy_uj, other_energy_uj, estimated_energy_uj, "
    "created_ns, digest FROM job_nodes",
    "job_energy": f"SELECT {_NODE_KEY}, e.device_key, e.hour_s, e.method, e.component, "
    "e.source, e.sensor, e.energy_uj FROM job_energy e JOIN job_nodes jn "
    "ON jn.id = e.job_node_id",
    "job_node_totals": f"SELECT {_NODE_KEY}, t.device_key, t.measured_uj, t.attributed_uj, "
    "t.remainder_uj, t.gap_intervals, t.idle_unallocated_uj, t.unallocated_uj "
    "FROM job_node_totals t "
    "JOIN job_nodes jn ON jn.id = t.job_node_id",
    "windows": f"SELECT {_NODE_KEY}, w.name, w.step_id, w.start_ns, w.end_ns, w.status, "
    "w.energy_uj, w.energy, w.work, w.unit FROM windows w JOIN job_nodes jn "
    "ON jn.id = w.job_node_id",
    "job_power": f"SELECT {_NODE_KEY}, p.step_s, p.devices, p.points "
    "FROM job_power p JOIN job_nodes jn ON jn.id = p.job_node_id",
    "job_steps": f"SELECT {_NODE_KEY}, s.step, s.start_ns, s.end_ns, s.cpu_ns, s.energy_uj, "
    "s.energy FROM job_steps s JOIN job_nodes jn ON jn.id = s.job_node_id",
    "job_node_hours": f"SELECT {_NODE_KEY}, h.hour_s, h.energy_uj, h.cpu_uj, h.dram_uj, "
    "h.gpu_uj, h.other_uj, h.estimated_uj FROM job_node_hours h "
    "JOIN job_nodes jn ON jn.id = h.job_node_id",
    "job_node_gpus": f"SELECT {_NODE_KEY}, x.device_key, x.energy_uj, x.first_hour_s, "
    "x.last_hour_s FROM job_node_gpus x JOIN job_nodes jn ON jn.id = x.job_node_id",
    "job_headers": "SELECT * FROM job_headers",
    "slurm_jobs": "SELECT cluster, job_id, start_ns, end_ns, submit_ns, eligible_ns, state, "
    "exit_code, signal, derived_exit_code, derived_signal, timelimit, timelimit_min, alloc_cpus, "
    "alloc_tres, req_mem, qos, cancelled_by FROM slurm_jobs",
    "node_hours": "SELECT * FROM node_hours",
    "quarantine": "SELECT file, digest, reason, owner_uid, size FROM quarantine",
}


@dataclass(frozen=True)
class QuarantineEntry:
    """A slice refused by the aggregator, as logged in the ledger."""

    file: str
    digest: str
    reason: str
    owner_uid: int | None
    size: int | None
    ts_ns: int


@dataclass
class MergeStats:
    """What one :meth:`Ledger.merge` did."""

    merged: int = 0
    unchanged: int = 0
    jobs_touched: set = field(default_factory=set)


def digest(data: bytes) -> str:
    """The SHA-256 of a slice's bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def open_ledger(spec: str | os.PathLike, *, readonly: bool = False, **options: Any):
    """The ledger that a ``ledger:`` setting names: :class:`Ledger` for a path (SQLite),
    :class:`llem.cluster.pg_ledger.PgLedger` for a ``postgresql://`` URL or ``service=NAME``
    (psycopg is imported only then). ``options`` go to the SQLite ledger only."""
    from llem.cluster.pg_ledger import is_postgres

    if is_postgres(spec):
        from llem.cluster.pg_ledger import PgLedger

        return PgLedger(str(spec), readonly=readonly)
    return Ledger(spec, readonly=readonly, **options)


HEADER_COLUMNS = (
    "cluster",
    "job_id",
    "end_ns",
    "start_ns",
    "array_job_id",
    "array_task_id",
    "user",
    "uid",
    "account",
    "partition",
    "name",
    "nodelist",
    "num_nodes",
    "state",
    "exit_code",
    "signal",
    "derived_exit_code",
    "derived_signal",
)
"""The columns of a job header that runs are computed from (``group_runs``, ``summarize_run``)."""


class LedgerCommon:
    """What both ledger backends do the same way above their SQL (:class:`Ledger` on SQLite,
    ``pg_ledger.PgLedger`` on PostgreSQL): each provides ``merge_prepared``, ``query`` (with
    ``?`` placeholders) and ``close``."""

    # the columns a job's runs are recomputed from
    _NODE_COLS = (
        "id",
        "node",
        "start_ns",
        "end_ns",
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
        "gpus",
        "coverage",
        "run_start_ns",
        "gpu_min_uj",
    ) + ENERGY_COLUMNS
    _HEADER_COLS = HEADER_COLUMNS[2:]
    _SLURM_COLS = SLURM_JOB_COLUMNS[2:]

    def merge(
        self,
        items: Iterable[tuple[dict, str]],
        *,
        now_ns: int,
        grace_s: float,
        quarantined: Iterable[QuarantineEntry] = (),
    ) -> MergeStats:
        """Merge validated slices (with their digests) and log refused ones, in one transaction.

        Args:
            items: (slice, digest of its bytes) pairs, already validated.
            now_ns: the time that decides whether a pending job is past its grace period.
            grace_s: how long a run waits for missing nodes before it is incomplete.
            quarantined: refused slices to log.
        """
        return self.merge_prepared(
            (prepare(data, sha) for data, sha in items),
            now_ns=now_ns,
            grace_s=grace_s,
            quarantined=quarantined,
        )

    def job_energy_by_node(self, cluster: str, job_id: str) -> dict[str, int]:
        """Total attributed energy per node of a job (all runs), microjoules."""
        return dict(
            self.query(
                "SELECT jn.node, SUM(e.energy_uj) FROM job_energy e JOIN job_nodes jn "
                "ON jn.id = e.job_node_id WHERE jn.cluster = ? AND jn.job_id = ? GROUP BY jn.node",
                (cluster, job_id),
            )
        )

    def quarantine_log(self) -> list[QuarantineEntry]:
        """Every slice refused so far, oldest first."""
        return [
            QuarantineEntry(*r)
            for r in self.query(
                "SELECT file, digest, reason, owner_uid, size, ts_ns FROM quarantine "
                "ORDER BY ts_ns, file"
            )
        ]

    def __enter__(self) -> LedgerCommon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ledger(LedgerCommon):
    """The cluster ledger (SQLite).

    Args:
        path: the database file; created (mode 0644, directory 0755) when absent.
        readonly: open for reading only (``llem-acct``, ``llem report``); never creates.
        background_checkpoint: copy the WAL into the database in a thread of its own after
            each commit (``llem aggregate``), instead of in the committing call.

    Raises:
        LedgerError: cannot open or create it, a symlink in its place, not a database, or a
            schema newer than this llem.
    """

    dialect = SQLITE

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        readonly: bool = False,
        background_checkpoint: bool = False,
        file_mode: int = LEDGER_MODE,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.file_mode = file_mode
        self._devices_seen: set[tuple] = set()
        self._checkpointer: _Checkpointer | None = None
        try:
            spec = DATABASE if file_mode == LEDGER_MODE else replace(DATABASE, file_mode=file_mode)
            self.db = open_database(self.path, spec, readonly=readonly)
        except LedgerError:
            if not readonly and _checked_ledger(self.path):
                keep_wal_files(
                    self.path, file_mode
                )  # a failed open may have deleted them: users need them
            raise
        if background_checkpoint and not readonly:
            # The committing connection checkpoints only if the thread falls far behind.
            self.db.execute(f"PRAGMA wal_autocheckpoint = {_Checkpointer.FALLBACK_PAGES}")
            self._checkpointer = _Checkpointer(self.path)

    def _txn(self, body: Callable[[], Any]) -> Any:
        if self.readonly:
            raise LedgerError(f"{self.path}: opened read-only")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            out = body()
            self.db.execute("COMMIT")
            if self._checkpointer is not None:
                self._checkpointer.poke()
            return out
        except sqlite3.DatabaseError as e:
            self._rollback()
            raise LedgerError(f"{self.path}: ledger write failed: {e}") from e
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        self._devices_seen.clear()
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # -- merging -----------------------------------------------------------------------------

    def merge_prepared(
        self,
        items: Iterable[Prepared],
        *,
        now_ns: int,
        grace_s: float,
        quarantined: Iterable[QuarantineEntry] = (),
    ) -> MergeStats:
        """:meth:`merge` for slices already turned into rows by :func:`prepare`.

        The aggregator prepares slices in reader processes, so that this process only writes.
        """
        stats = MergeStats()

        def body() -> None:
            touched: set[tuple[str, str]] = set()
            for item in items:
                kind = item[0]
                if kind == "job":
                    changed = self._merge_job(item)
                elif kind == "node":
                    changed = self._merge_node(item)
                else:
                    changed = self._merge_header(item)
                stats.merged += int(changed)
                stats.unchanged += int(not changed)
                if changed and kind != "node":
                    touched.add(item[1])
            for entry in quarantined:
                self.db.execute(
                    "INSERT OR IGNORE INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        entry.file,
                        entry.digest,
                        entry.reason,
                        entry.owner_uid,
                        entry.size,
                        entry.ts_ns,
                    ),
                )
            self._regroup(touched, now_ns, grace_s)
            stats.jobs_touched = touched

        self._txn(body)
        return stats

    def _upsert_devices(self, rows: tuple) -> None:
        # Nodes send the same devices in every slice: skip what this connection already wrote
        # (a rolled-back transaction clears the cache, see _txn).
        if rows in self._devices_seen:
            return
        self._devices_seen.add(rows)
        self.db.executemany(
            "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cluster, node, device_key) DO UPDATE SET component = excluded.component,"
            " name = excluded.name, sensor = excluded.sensor, source = excluded.source, "
            "method = excluded.method",
            rows,
        )

    def _merge_job(self, item: Prepared) -> bool:
        (
            _,
            _,
            created_ns,
            sha,
            devices,
            job_node,
            energy,
            totals,
            windows,
            power,
            steps,
            hours,
            gpus,
        ) = item
        if not self.db.execute(_INSERT_JOB_NODE + _NEW_RUN_ONLY, job_node).rowcount:
            row = self.db.execute(
                "SELECT id, created_ns, digest FROM job_nodes WHERE cluster = ? AND job_id = ? "
                "AND node = ? AND start_ns = ?",
                job_node[:4],
            ).fetchone()
            if (row[1], row[2]) >= (created_ns, sha):
                return False  # the same slice again, or an older export of the run
            self.db.execute("DELETE FROM job_nodes WHERE id = ?", (row[0],))
            self.db.execute(_INSERT_JOB_NODE, job_node)
        # The rows below name their job node by last_insert_rowid(), the job_nodes row just
        # inserted: inserts into WITHOUT ROWID tables (these, and devices) leave it alone, and
        # it saves rebuilding every row with the id in Python.
        self._upsert_devices(devices)
        self.db.executemany(
            "INSERT INTO job_energy VALUES (last_insert_rowid(), ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET energy_uj = energy_uj + excluded.energy_uj",
            energy,
        )
        self.db.executemany(rollups.SQLITE_MERGE[0], hours)
        if gpus:
            self.db.executemany(rollups.SQLITE_MERGE[1], gpus)
        self.db.executemany(
            "INSERT INTO job_node_totals (job_node_id, device_key, measured_uj, attributed_uj, "
            "remainder_uj, gap_intervals, idle_unallocated_uj, unallocated_uj) "
            "VALUES (last_insert_rowid(), ?, ?, ?, ?, ?, ?, ?)",
            totals,
        )
        if windows:
            self.db.executemany(
                "INSERT OR REPLACE INTO windows (job_node_id, name, step_id, start_ns, end_ns, "
                "status, energy_uj, energy, work, unit) "
                "VALUES (last_insert_rowid(), ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                windows,
            )
        if power:
            self.db.execute("INSERT INTO job_power VALUES (last_insert_rowid(), ?, ?, ?)", power)
        if steps:
            self.db.executemany(
                "INSERT INTO job_steps (job_node_id, step, start_ns, end_ns, cpu_ns, energy_uj, "
                "energy) VALUES (last_insert_rowid(), ?, ?, ?, ?, ?, ?)",
                steps,
            )
        return True

    def rebuild_rollups(self) -> None:
        """Refill the report's roll-ups from every energy row (``make_ledger``, repairs)."""
        self._txn(lambda: rollups.rebuild_sqlite(self.db))

    def _merge_node(self, item: Prepared) -> bool:
        _, devices, hours = item
        self._upsert_devices(devices)
        before = self.db.total_changes
        self.db.executemany(
            "INSERT INTO node_hours (cluster, node, hour_s, device_key, component, source, "
            "measured_uj, attributed_uj, remainder_uj, intervals, gap_intervals, covered_ns, "
            "as_of_ns, idle_unallocated_uj, unallocated_uj) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (cluster, node, hour_s, device_key) DO UPDATE SET "
            "component = excluded.component, source = excluded.source, "
            "measured_uj = excluded.measured_uj, attributed_uj = excluded.attributed_uj, "
            "remainder_uj = excluded.remainder_uj, intervals = excluded.intervals, "
            "idle_unallocated_uj = excluded.idle_unallocated_uj, "
            "unallocated_uj = excluded.unallocated_uj, "
            "gap_intervals = excluded.gap_intervals, covered_ns = excluded.covered_ns, "
            "as_of_ns = excluded.as_of_ns "
            "WHERE (excluded.as_of_ns, excluded.measured_uj, excluded.attributed_uj, "
            "excluded.remainder_uj) > (node_hours.as_of_ns, node_hours.measured_uj, "
            "node_hours.attributed_uj, node_hours.remainder_uj)",
            hours,
        )
        return self.db.total_changes - before > 0

    def _merge_header(self, item: Prepared) -> bool:
        cur = self.db.execute(
            f"INSERT OR IGNORE INTO job_headers ({', '.join(_HEADER_ROW)}) "
            f"VALUES ({', '.join('?' * len(_HEADER_ROW))})",
            item[2],
        )
        return cur.rowcount > 0

    # -- runs and completeness ---------------------------------------------------------------

    _REGROUP_CHUNK = 500

    def _regroup(self, jobs: Iterable[tuple[str, str]], now_ns: int, grace_s: float) -> None:
        """Recompute these jobs' runs from their node runs and headers (order-independent).

        Jobs are read and rewritten a few hundred at a time, not one by one: a batch of
        slices touches hundreds of jobs, and per-statement overhead was most of the cost.
        """
        by_cluster: dict[str, list[str]] = {}
        for cluster, job_id in jobs:
            by_cluster.setdefault(cluster, []).append(job_id)
        for cluster, ids in sorted(by_cluster.items()):
            ids.sort()
            for i in range(0, len(ids), self._REGROUP_CHUNK):
                self._regroup_chunk(cluster, ids[i : i + self._REGROUP_CHUNK], now_ns, grace_s)

    def _regroup_chunk(self, cluster: str, part: list[str], now_ns: int, grace_s: float) -> None:
        where = f"cluster = ? AND job_id IN ({', '.join('?' * len(part))})"
        nodes = self._rows_by_job("job_nodes", self._NODE_COLS, where, cluster, part)
        headers = self._rows_by_job("job_headers", self._HEADER_COLS, where, cluster, part)
        accounted = self._rows_by_job("slurm_jobs", self._SLURM_COLS, where, cluster, part)
        self.db.execute(f"DELETE FROM job_runs WHERE {where}", (cluster, *part))
        rows, moved = [], []
        for job_id in part:
            for run in group_runs(nodes[job_id], headers[job_id], accounted[job_id]):
                row = summarize_run(run, now_ns, grace_s)
                rows.append((cluster, job_id, *[row[c] for c in _RUN_COLUMNS]))
                start = row["run_start_ns"]
                moved += [(start, n["id"]) for n in run["nodes"] if n["run_start_ns"] != start]
        self.db.executemany(_INSERT_JOB_RUN, rows)
        self.db.executemany("UPDATE job_nodes SET run_start_ns = ? WHERE id = ?", moved)

    def _rows_by_job(
        self, table: str, columns: tuple[str, ...], where: str, cluster: str, job_ids: list[str]
    ) -> dict[str, list[dict]]:
        """``table``'s rows of these jobs as dicts of ``columns``, by job id."""
        out: dict[str, list[dict]] = {job_id: [] for job_id in job_ids}
        for r in self.db.execute(
            f"SELECT job_id, {', '.join(columns)} FROM {table} WHERE {where}", (cluster, *job_ids)
        ):
            out[r[0]].append(dict(zip(columns, r[1:])))
        return out

    def mark_incomplete(self, now_ns: int, grace_s: float) -> int:
        """Runs still pending past their grace period become incomplete; return how many."""
        cut_ns = now_ns - int(grace_s * 1e9)
        return self._txn(
            lambda: (
                self.db.execute(
                    "UPDATE job_runs SET status = 'incomplete' WHERE status = 'pending' "
                    "AND run_end_ns < ?",
                    (cut_ns,),
                ).rowcount
            )
        )

    # -- Slurm's accounting ------------------------------------------------------------------

    def accounting_candidates(
        self, *, ended_before_ns: int, now_ns: int, max_tries: int, limit: int
    ) -> list[tuple[str, str]]:
        """(cluster, job_id) of jobs with a run Slurm's accounting has not confirmed yet,
        that ended before ``ended_before_ns`` and are due for a (re)try; oldest end first."""
        return self.query(ACCOUNTING_CANDIDATES, (ended_before_ns, now_ns, max_tries, limit))

    def store_accounting(
        self,
        cluster: str,
        records: Iterable[Sequence],
        asked: Iterable[str],
        *,
        now_ns: int,
        retry_ns: Callable[[int], int],
        grace_s: float,
    ) -> int:
        """Store Slurm's records (rows of :data:`SLURM_JOB_COLUMNS` without ``checked_ns``)
        of the jobs ``asked`` about, note the try, and recompute those jobs' runs.

        A job asked about is tried again ``retry_ns(tries)`` later while one of its runs has
        no record (slurmdbd may not have it yet); a job whose runs all have theirs is
        forgotten, so that a later run of it (a requeue) is asked about in the next pass.
        Returns how many records were new or changed.
        """
        records = [tuple(r) for r in records]
        asked = sorted(set(asked))
        upsert = upsert_slurm_job(self.dialect)

        def body() -> int:
            changed = 0
            for r in records:
                before = self.db.total_changes
                self.db.execute(upsert, (*r, now_ns))
                changed += self.db.total_changes - before
            self._regroup({(cluster, j) for j in asked}, now_ns, grace_s)
            for job_id in asked:
                key = (cluster, job_id)
                if not self.db.execute(UNACCOUNTED_RUN, key).fetchone():
                    # every run has its record: a later run (a requeue) is asked about at once
                    self.db.execute(FORGET_CHECK, key)
                    continue
                tries = self.db.execute(CHECK_TRIES, key).fetchone()
                n = (tries[0] if tries else 0) + 1
                self.db.execute(SAVE_CHECK, (*key, n, now_ns + retry_ns(n)))
            return changed

        return self._txn(body)

    def defer_accounting(self, cluster: str, job_ids: Iterable[str], next_ns: int) -> None:
        """Ask about these jobs again no sooner than ``next_ns`` (sacct failed: slurmdbd down),
        without counting a try."""
        rows = [(cluster, j, next_ns) for j in sorted(set(job_ids))]
        self._txn(lambda: self.db.executemany(DEFER_CHECK, rows))

    # -- reading -----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence = (), *, binary: bool = False) -> list[tuple]:
        """Run a read-only query (the place where report and acct SQL will grow).

        ``binary``: fetch the rows in PostgreSQL's binary format (:meth:`PgLedger.query`);
        SQLite hands Python values over as they are, so nothing changes here."""
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: query failed: {e}") from e

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        """Run one statement for many rows (temporary tables of the read-only queries)."""
        try:
            self.db.executemany(sql, rows)
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: query failed: {e}") from e

    def has_column(self, table: str, column: str) -> bool:
        return column in self.columns(table)

    def has_index(self, name: str) -> bool:
        return bool(
            self.query("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
        )

    def sees_every_run(self) -> bool:
        """Whether this connection sees every run: always on SQLite (no row-level security;
        :meth:`llem.cluster.pg_ledger.PgLedger.sees_every_run`)."""
        return True

    # -- copying (llem ledger copy) ------------------------------------------------------------

    def write(self, statements: Sequence[tuple[str, Sequence[Sequence]]]) -> None:
        """Run (statement, rows) pairs in one transaction."""
        self._txn(lambda: [self.db.executemany(sql, rows) for sql, rows in statements])

    def insert_missing(self, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> int:
        """Insert the rows whose key the table does not hold yet; return how many."""
        cols = ", ".join(f'"{c}"' if c == "user" else c for c in columns)

        def body() -> int:
            before = self.db.total_changes
            self.db.executemany(
                f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({', '.join('?' * len(columns))})",
                rows,
            )
            return self.db.total_changes - before

        return self._txn(body)

    def after_copy(self) -> None:
        """Nothing to do on SQLite (row ids follow the largest one)."""

    def columns(self, table: str) -> list[str]:
        """The table's columns, in order."""
        return [r[1] for r in self.query(f"PRAGMA table_info({table})")]

    def job_runs(self, job_id: str | None = None, cluster: str | None = None) -> list[dict]:
        """Job runs as dicts (``missing_nodes`` decoded), newest first."""
        where, params = [], []
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if cluster is not None:
            where.append("cluster = ?")
            params.append(cluster)
        cur = self.db.execute(
            f"SELECT * FROM job_runs WHERE {' AND '.join(where) or '1'} "
            "ORDER BY run_start_ns DESC, cluster, job_id",
            params,
        )
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r)) for r in cur.fetchall()]
        for run in out:
            run["missing_nodes"] = json.loads(run["missing_nodes"])
        return out

    def canonical_dump(self) -> str:
        """The ledger's facts as sorted JSON lines: equal dumps mean equal ledgers."""
        lines = []
        for table, sql in CANONICAL_QUERIES.items():
            rows = sorted(json.dumps(list(r)) for r in self.db.execute(sql))
            lines.append(f"# {table} {len(rows)}")
            lines.extend(rows)
        return "\n".join(lines) + "\n"

    def integrity_check(self) -> str:
        return "; ".join(r[0] for r in self.db.execute("PRAGMA integrity_check"))

    def close(self) -> None:
        """Close, leaving the ledger in WAL mode with its ``-wal`` and ``-shm`` files in place.

        The ledger stays in WAL mode for good, so that no reader can ever stop a merge: in
        rollback-journal mode a reader's open transaction holds a lock that every write (and
        the switch back to WAL) must wait for, and a user holding ``BEGIN; SELECT`` stalled
        ``llem aggregate`` until "database is locked" (issue 20).

        A user who may not write the ledger's directory can open a WAL database only while
        its ``-wal`` and ``-shm`` exist, and SQLite deletes them when the last connection
        closes. So a writer checkpoints what it can without waiting (``TRUNCATE`` with no
        busy wait: the WAL shrinks to nothing unless a reader is in), then closes while a
        read-only connection of its own is open (SQLite deletes the files only under an
        exclusive lock, which neither the writer, with the reader open, nor the read-only
        connection can take), and finally makes sure both files exist.
        """
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        keeper = None
        if not self.readonly and not self.db.in_transaction:
            try:
                self.db.execute("PRAGMA busy_timeout = 0")
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as e:  # a reader is in: the WAL stays as it is meanwhile
                log.debug("%s: no final checkpoint: %s", self.path, e)
            keeper = _wal_keeper(self.path)
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        if keeper is not None:
            keeper.close()
        if not self.readonly:
            keep_wal_files(self.path, self.file_mode)


def _wal_keeper(path: Path) -> sqlite3.Connection | None:
    """A read-only connection that has opened the WAL (see :meth:`Ledger.close`)."""
    try:
        keeper = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=0)
        keeper.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return keeper
    except sqlite3.Error as e:
        log.debug("%s: no read-only connection to keep the WAL files: %s", path, e)
        return None


def _checked_ledger(path: Path) -> bool:
    """Whether the ledger and its directory pass the writer's checks (nothing is written
    beside a ledger that was refused)."""
    from llem.fsutil import dir_problem, file_problem

    try:
        return dir_problem(path.parent) is None and file_problem(os.lstat(path)) is None
    except OSError:
        return False


def set_access(path: str | os.PathLike, *, private: bool, group: str | None) -> None:
    """The ledger's, ``-wal``'s and ``-shm``'s mode and group: 0640 and ``group`` when
    ``private`` (users ask the gateway), 0644 otherwise (``privacy: none``).

    Opened without following links (the directory is checked before any write); a group that
    does not exist leaves the files' group as it is (logged once per call).
    """
    mode = PRIVATE_MODE if private else LEDGER_MODE
    gid = None
    if private and group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            # A demo or a site without the group: only the owner (root) reads it then.
            log.info(
                "%s: no group %r (aggregate.ledger_group): the ledger keeps its group", path, group
            )
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: cannot set its mode: %s", name, e)
            continue
        try:
            if gid is not None and os.fstat(fd).st_gid != gid:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        except OSError as e:
            log.warning("%s: cannot set its mode and group: %s", name, e)
        finally:
            os.close(fd)


def keep_wal_files(path: str | os.PathLike, mode: int = LEDGER_MODE) -> None:
    """Create the ledger's ``-wal`` and ``-shm`` (empty, ``mode``) when absent.

    Empty files are what SQLite itself leaves when it cannot delete them: a WAL with no
    frames, and a wal-index that the next connection rebuilds. ``O_EXCL | O_NOFOLLOW`` in
    the ledger's checked directory: nothing is written through a planted name.
    """
    for suffix in ("-wal", "-shm"):
        try:
            fd = os.open(
                f"{path}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode
            )
        except FileExistsError:
            continue
        except OSError as e:
            log.warning(
                "%s%s: cannot create it (users without write access to the ledger's "
                "directory cannot read the ledger without it): %s",
                path,
                suffix,
                e,
            )
            continue
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


Prepared = tuple
"""A slice as rows (see :func:`prepare`): plain tuples, lists and scalars only, so that reader
processes can hand it over with :mod:`marshal`."""

_INSERT_JOB_NODE = (
    "INSERT INTO job_nodes (cluster, job_id, node, start_ns, end_ns, array_job_id, "
    'array_task_id, "user", uid, gid, account, partition, nodelist, num_nodes, cpus, gpus, tag, '
    "name, node_state, coverage, flags, energy_uj, cpu_energy_uj, dram_energy_uj, "
    "gpu_energy_uj, other_energy_uj, estimated_energy_uj, created_ns, digest, attribution, "
    f"gpu_min_uj) VALUES ({', '.join('?' * 31)})"
)
_NEW_RUN_ONLY = " ON CONFLICT (cluster, job_id, node, start_ns) DO NOTHING"
_SORTED_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(..., sort_keys=True), reused


_RUN_COLUMNS = (
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
    "derived_signal",
    "submit_ns",
    "eligible_ns",
    "slurm_start_ns",
    "slurm_end_ns",
    "timelimit",
    "timelimit_min",
    "qos",
    "alloc_cpus",
    "alloc_tres",
    "req_mem",
    "cancelled_by",
    "state_source",
    "accounted",
    "has_header",
    "status",
    "nodes_reported",
    "missing_nodes",
    *ENERGY_COLUMNS,
    "gpu_seconds",
    "coverage",
    "node_ns",
    "gpu_ns",
    "gpu_count",
    "unresolved_gpus",
    "gpu_floor_w",
)
"""The columns :func:`summarize_run` fills, in its order."""
_INSERT_JOB_RUN = (
    f"INSERT INTO job_runs (cluster, job_id, {', '.join(_RUN_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (2 + len(_RUN_COLUMNS)))})"
)


def prepare(data: dict, sha: str) -> Prepared:
    """A validated slice (see :func:`llem.slices.validate`) as the rows the ledger stores.

    Pure (no database), so that it runs in the aggregator's reader processes:

    * job: ``("job", (cluster, job_id), created_ns, digest, device rows, job_nodes row (its
      first four values are the natural key), job_energy rows, job_node_totals rows, windows
      rows, the job_power row or None, job_steps rows, job_node_hours rows, job_node_gpus
      rows)``, the last seven without their ``job_node_id``; the two roll-ups
      (:func:`llem.cluster.rollups.rows_of`) are made here, in the reader processes, not in
      the aggregator, whose single thread bounds a pass;
    * node: ``("node", device rows, node_hours rows)``;
    * header: ``("header", (cluster, job_id), job_headers row)``.
    """
    kind = data["kind"]
    if kind == "header":
        return _prepare_header(data)
    if kind == "node":
        return _prepare_node(data)
    return _prepare_job(data, sha)


def _prepare_header(data: dict) -> Prepared:
    cluster, job = data["cluster"], data["job"]
    return (
        "header",
        (cluster, job["job_id"]),
        (
            cluster,
            job["job_id"],
            job["end_ns"],
            job.get("start_ns"),
            job.get("array_job_id"),
            job.get("array_task_id"),
            job.get("user"),
            job.get("uid"),
            job.get("account"),
            job.get("partition"),
            job.get("name"),
            job.get("nodelist"),
            job.get("num_nodes"),
            job.get("state"),
            job.get("exit_code"),
            job.get("signal"),
            job.get("derived_exit_code"),
            job.get("derived_signal"),
        ),
    )


def _device_rows(data: dict) -> tuple:
    cluster, node = data["cluster"], data["node"]
    return tuple(
        (cluster, node, key, d["component"], d.get("name"), d["sensor"], d["source"], d["method"])
        for key, d in sorted(data["devices"].items())
    )


def _prepare_node(data: dict) -> Prepared:
    cluster, node, devices, as_of_ns = (
        data["cluster"],
        data["node"],
        data["devices"],
        data["as_of_ns"],
    )
    return (
        "node",
        _device_rows(data),
        [
            (
                cluster,
                node,
                r["hour_s"],
                r["device"],
                devices[r["device"]]["component"],
                devices[r["device"]]["source"],
                r["measured_uj"],
                r["attributed_uj"],
                r["remainder_uj"],
                r["intervals"],
                r["gap_intervals"],
                r["covered_ns"],
                as_of_ns,
                r.get("idle_unallocated_uj"),
                r.get("unallocated_uj"),
            )
            for r in data["hours"]
        ],
    )


def _prepare_job(data: dict, sha: str) -> Prepared:
    cluster, node, devices, job = data["cluster"], data["node"], data["devices"], data["job"]
    job_id = job["job_id"]
    device_rows = _device_rows(data)
    job_node = (
        cluster,
        job_id,
        node,
        job["start_ns"],
        job["end_ns"],
        job.get("array_job_id"),
        job.get("array_task_id"),
        job.get("user"),
        job.get("uid"),
        job.get("gid"),
        job.get("account"),
        job.get("partition"),
        job.get("nodelist"),
        job.get("num_nodes"),
        job.get("cpus"),
        json.dumps(sorted(job.get("gpus") or [])),
        job.get("tag"),
        job.get("name"),
        job.get("state"),
        job.get("coverage"),
        json.dumps(sorted(job.get("flags") or [])),
        *_component_totals(data),
        data["created_ns"],
        sha,
        _SORTED_JSON.encode(job["attribution"]) if job.get("attribution") else None,
        _gpu_min_uj(data),
    )
    described = {key: (d["component"], d["source"], d["sensor"]) for key, d in devices.items()}
    energy = [
        (r["device"], r["hour_s"], r["method"], *described[r["device"]], r["energy_uj"])
        for r in data["energy"]
    ]
    totals = [
        (
            key,
            t["measured_uj"],
            t["attributed_uj"],
            t["remainder_uj"],
            t.get("gap_intervals", 0),
            t.get("idle_unallocated_uj"),
            t.get("unallocated_uj"),
        )
        for key, t in data["node_totals"].items()
    ]
    hours, gpus = rollups.rows_of(energy, job.get("gpus") or ())
    return (
        "job",
        (cluster, job_id),
        data["created_ns"],
        sha,
        device_rows,
        job_node,
        energy,
        totals,
        _window_rows(data),
        _power_rows(data),
        _step_rows(data),
        hours,
        gpus,
    )


def _window_rows(data: dict) -> list[tuple]:
    windows = [
        (
            w["name"],
            w.get("step_id") or "",
            w["start_ns"],
            w.get("end_ns"),
            w["status"],
            sum((w.get("energy") or {}).values()),
            _SORTED_JSON.encode(w.get("energy") or {}),
            None if w.get("work") is None else float(w["work"]),
            w.get("unit"),
        )
        for w in data.get("windows", [])
    ]
    if any(w[5] > slices.INT64_MAX for w in windows):
        raise slices.SliceError("a window's energy is beyond what the ledger stores")
    return windows


def _step_rows(data: dict) -> list[tuple]:
    """The job node's ``job_steps`` rows (without its id): step, span, CPU time, energy
    (sum, and per device as sorted JSON); none for a slice without steps."""
    steps = [
        (
            s["step"],
            s["start_ns"],
            s["end_ns"],
            s["cpu_ns"],
            sum(s["energy"].values()),
            _SORTED_JSON.encode(s["energy"]),
        )
        for s in data.get("steps", [])
    ]
    if any(s[4] > slices.INT64_MAX for s in steps):
        raise slices.SliceError("a step's energy is beyond what the ledger stores")
    return steps


def _power_rows(data: dict) -> tuple | None:
    """The job node's ``job_power`` row (without its id): step, device keys, compact points;
    None for a slice without a series (``llem.slice/1``, or no energy)."""
    power = data.get("power")
    if not power or not power["points"]:
        return None
    keys = sorted({p["device"] for p in power["points"]})
    index = {k: i for i, k in enumerate(keys)}
    points = [[p["t_s"], index[p["device"]], p["energy_uj"], p["span_ms"]] for p in power["points"]]
    return (
        power["step_s"],
        json.dumps(keys, separators=(",", ":")),
        json.dumps(points, separators=(",", ":")),
    )


def _gpu_min_uj(data: dict) -> int | None:
    """The energy of the job node's least-used GPU: the least over the allocated GPUs known
    by device key (``nvml:GPU-...``; a GPU without energy rows drew 0), None without any.
    Its run's ``gpu_floor_w`` comes from it: the report judges idle GPUs only in runs where
    one may be (``report_queries.idle_gpus``)."""
    resolved = {g for g in data["job"].get("gpus") or () if ":" in g}
    if not resolved:
        return None
    by = dict.fromkeys(resolved, 0)
    for row in data["energy"]:
        if row["device"] in by:
            by[row["device"]] += row["energy_uj"]
    return min(by.values())


def _component_totals(data: dict) -> tuple[int, ...]:
    """A job slice's energy in the order of :data:`ENERGY_COLUMNS`."""
    devices = data["devices"]
    by: dict[str, int] = {"cpu": 0, "dram": 0, "gpu": 0, "other": 0, "estimated": 0}
    for row in data["energy"]:
        dev = devices[row["device"]]
        comp = dev["component"]
        by[comp if comp in ("cpu", "dram", "gpu") else "other"] += row["energy_uj"]
        if dev["source"] == "estimated":
            by["estimated"] += row["energy_uj"]
    total = by["cpu"] + by["dram"] + by["gpu"] + by["other"]
    if total > slices.INT64_MAX:
        raise slices.SliceError(f"energy total {total} uJ is beyond what the ledger stores")
    return total, by["cpu"], by["dram"], by["gpu"], by["other"], by["estimated"]


PREPARE_CODE = (
    prepare,
    _prepare_header,
    _device_rows,
    _prepare_node,
    _prepare_job,
    _gpu_min_uj,
    _window_rows,
    _power_rows,
    _step_rows,
    _component_totals,
)
"""The functions whose code makes the rows that reader processes hand over (see
:func:`llem.cluster.readers.wire_fingerprint`)."""


class _Checkpointer:
    """Copies committed WAL frames into the database from a thread with its own connection.

    A checkpoint is a few milliseconds of copying per batch; SQLite runs it beside the writer
    (``PASSIVE``: it never blocks the writer or readers), and the sqlite3 module lets go of the
    GIL meanwhile, so the aggregator's next batch does not wait for it.
    """

    FALLBACK_PAGES = 65536
    """WAL pages (256 MB at 4 KB) after which the writer checkpoints itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="llem-ledger-checkpoint")
        self.thread.start()

    def poke(self) -> None:
        self.wake.set()

    def close(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
        except sqlite3.Error as e:
            log.debug("%s: no background checkpoints: %s", self.path, e)
            return
        try:
            while True:
                self.wake.wait()
                self.wake.clear()
                if self.stopping:
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as e:  # the writer's own checkpoints still run
                    log.debug("%s: background checkpoint: %s", self.path, e)
        finally:
            db.close()


def group_runs(
    nodes: list[dict], headers: list[dict], accounted: Sequence[dict] = ()
) -> list[dict]:
    """Group a job's node runs into runs of the job, and attach each header to its run.

    Node runs that overlap in time belong to one run (all nodes of an allocation run
    together); a requeued or restarted job starts after every node of the previous run has
    ended, so it opens a new run. A header goes to the run that starts at the header's start
    when slurmctld gave one, else to the run whose end is nearest the header's end among the
    runs that started before it and ended at most :data:`HEADER_AFTER_NS` before it; a header
    with no run stands alone (its nodes have not reported yet). Slurm's own record of a run
    (``accounted``, rows of ``slurm_jobs``) goes to the run that starts within
    :data:`HEADER_SLACK_NS` of its start, or whose span holds it; records of runs no node
    reported are left out. Pure: the same node runs and headers give the same runs in any
    order.
    """
    runs: list[dict] = []
    for node in sorted(nodes, key=lambda n: (n["start_ns"], n["node"], n["end_ns"])):
        if runs and node["start_ns"] <= runs[-1]["end_ns"]:
            runs[-1]["nodes"].append(node)
            runs[-1]["end_ns"] = max(runs[-1]["end_ns"], node["end_ns"])
        else:
            runs.append(
                {
                    "start_ns": node["start_ns"],
                    "end_ns": node["end_ns"],
                    "nodes": [node],
                    "header": None,
                }
            )
    orphans = []
    # A total order, so that headers with equal ends give the same result in any order.
    for header in sorted(
        headers, key=lambda h: (h["end_ns"], json.dumps(h, sort_keys=True, default=str))
    ):
        target = _run_of_header(runs, header)
        if target is None:
            orphans.append(header)
        elif target["header"] is None or target["header"]["end_ns"] < header["end_ns"]:
            target["header"] = header
    # Headers with no run yet, by their start (the run's key). Two with one start (a re-sent
    # header, or one with and one without a start) are one run: the later, in sorted order.
    alone: dict[int, dict] = {}
    for header in orphans:
        start = header["start_ns"] if header["start_ns"] is not None else header["end_ns"]
        alone[start] = {
            "start_ns": start,
            "end_ns": header["end_ns"],
            "nodes": [],
            "header": header,
        }
    runs += alone.values()
    runs.sort(key=lambda r: r["start_ns"])
    for run in runs:
        run["slurm"] = None
    for record in sorted(accounted, key=lambda a: (a["start_ns"], a["end_ns"] or 0)):
        target = _run_of_record([r for r in runs if r["slurm"] is None], record)
        if target is not None:
            target["slurm"] = record
    return runs


def _run_of_record(free: list[dict], record: dict) -> dict | None:
    """The run (among those without a record yet) that Slurm's record of a run belongs to:
    the nearest start within :data:`HEADER_SLACK_NS` of the record's start, else the first
    that started during the record's span (give or take the slack). Records are placed in
    order of their start, so that a requeued job's runs pair up in turn even when the
    nodes' starts lag Slurm's by a few seconds."""
    start = record["start_ns"]
    near = [r for r in free if abs(r["start_ns"] - start) <= HEADER_SLACK_NS]
    if near:
        return min(near, key=lambda r: (abs(r["start_ns"] - start), r["start_ns"]))
    end = record["end_ns"] if record["end_ns"] is not None else start
    for run in free:
        if start - HEADER_SLACK_NS <= run["start_ns"] <= end + HEADER_SLACK_NS:
            return run
    return None


def _run_of_header(runs: list[dict], header: dict) -> dict | None:
    if header["start_ns"] is not None:
        for run in runs:
            if abs(run["start_ns"] - header["start_ns"]) <= HEADER_SLACK_NS:
                return run
    end_ns = header["end_ns"]
    candidates = [
        r
        for r in runs
        if r["start_ns"] - HEADER_SLACK_NS <= end_ns <= r["end_ns"] + HEADER_AFTER_NS
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (abs(r["end_ns"] - end_ns), r["start_ns"]))


def summarize_run(run: dict, now_ns: int, grace_s: float) -> dict:
    """The ``job_runs`` row of one run: header fields first, node fields where it has none;
    Slurm's accounting record, where there is one, for the job's end (state, exit codes)."""
    header = run["header"] or {}
    slurm = run.get("slurm") or {}
    nodes = run["nodes"]
    first = nodes[0] if nodes else {}

    def pick(key: str) -> Any:
        value = header.get(key)
        if value is None:
            value = next((n[key] for n in nodes if n.get(key) is not None), None)
        return value

    nodelist = pick("nodelist")
    reported = sorted({n["node"] for n in nodes})
    missing, num_nodes, complete = _completeness(nodelist, reported, pick)
    end_ns = max([run["end_ns"]] + ([header["end_ns"]] if header else []))
    status = (
        "complete" if complete else ("incomplete" if now_ns - end_ns > grace_s * 1e9 else "pending")
    )
    coverage = _coverage(nodes)
    return {
        "run_start_ns": run["start_ns"],
        "run_end_ns": end_ns,
        "array_job_id": pick("array_job_id"),
        "array_task_id": pick("array_task_id"),
        "user": pick("user"),
        "uid": pick("uid"),
        "account": pick("account"),
        "partition": pick("partition"),
        "name": pick("name"),
        "tag": first.get("tag"),
        "nodelist": nodelist,
        "num_nodes": num_nodes,
        **_end_facts(header, slurm),
        "has_header": int(bool(header)),
        "status": status,
        "nodes_reported": len(reported),
        "missing_nodes": json.dumps(missing),
        **_energy_totals(nodes),
        "coverage": round(coverage, 6) if coverage is not None else None,
        **_node_figures(nodes),
    }


def _end_facts(header: dict, slurm: dict) -> dict:
    """State, exit codes and Slurm-only facts of a run: Slurm's accounting record when there
    is one (the authority), else what EpilogSlurmctld's header knew."""
    source = slurm or header
    return {
        "state": source.get("state"),
        "exit_code": source.get("exit_code"),
        "signal": source.get("signal"),
        "derived_exit_code": source.get("derived_exit_code"),
        "derived_signal": source.get("derived_signal"),
        "submit_ns": slurm.get("submit_ns"),
        "eligible_ns": slurm.get("eligible_ns"),
        "slurm_start_ns": slurm.get("start_ns"),
        "slurm_end_ns": slurm.get("end_ns"),
        "timelimit": slurm.get("timelimit"),
        "timelimit_min": slurm.get("timelimit_min"),
        "qos": slurm.get("qos"),
        "alloc_cpus": slurm.get("alloc_cpus"),
        "alloc_tres": slurm.get("alloc_tres"),
        "req_mem": slurm.get("req_mem"),
        "cancelled_by": slurm.get("cancelled_by"),
        "state_source": "slurm" if slurm else ("header" if header else None),
        "accounted": int(bool(slurm)),
    }


def _completeness(
    nodelist: str | None, reported: list[str], pick: Callable[[str], Any]
) -> tuple[list[str], int | None, bool]:
    """(missing nodes, number of nodes, complete?) of a run that ``reported`` nodes sent.

    The nodelist (header or nodes) says which nodes to expect; without one, only how many
    (``num_nodes``) can be checked.
    """
    expected = _expected_nodes(nodelist)
    if expected is not None:
        missing = sorted(set(expected) - set(reported))
        return missing, len(expected), not missing
    num_nodes = pick("num_nodes")
    return [], num_nodes, num_nodes is not None and len(reported) >= num_nodes


def _energy_totals(nodes: list[dict]) -> dict[str, int]:
    """The run's energy per :data:`ENERGY_COLUMNS`, saturated at 64 bits.

    Each node's energy fits in 64 bits (see prepare); thousands of absurd ones together might
    not, and SQLite would refuse the row: saturate, and say so.
    """
    totals = {col: sum(n[col] for n in nodes) for col in ENERGY_COLUMNS}
    for col, value in totals.items():
        if value > slices.INT64_MAX:
            log.warning(
                "run of %d node(s): %s %d uJ is beyond 64 bits; stored as %d",
                len(nodes),
                col,
                value,
                slices.INT64_MAX,
            )
            totals[col] = slices.INT64_MAX
    return totals


def _node_figures(nodes: list[dict]) -> dict[str, Any]:
    """What a run sums from its job nodes beyond energy, in one pass over their GPUs:

    * ``gpu_seconds`` (float, 3 decimals: ``llem-acct``'s), ``node_ns`` and ``gpu_ns`` (the
      spans, and spans times allocated GPUs, integer ns: the report reads them for a run
      inside its period, ``report_queries.INSIDE``);
    * ``gpu_count`` (allocated GPUs), ``unresolved_gpus`` (those known only by Slurm's
      index, no device key) and ``gpu_floor_w``: the average power in watts of the
      least-used GPU known by key over its job node's span (None without such a GPU on a
      node of non-zero span). No GPU of a run whose floor is at or above the report's idle
      threshold can be idle, so the report judges them without reading their GPUs
      (``report_queries.NOT_IDLE``). The float is made as the migration's SQL makes it
      (``GPU_FLOOR_SQL``), so that both give the same.
    """
    gpu_seconds = 0.0
    node_ns = gpu_ns = count = unresolved = 0
    floor = None
    for n in nodes:
        gpus = json.loads(n["gpus"] or "[]")
        span = n["end_ns"] - n["start_ns"]
        gpu_seconds += len(gpus) * span / 1e9
        node_ns += span
        gpu_ns += len(gpus) * span
        count += len(gpus)
        unresolved += sum(1 for g in gpus if ":" not in g)
        if n.get("gpu_min_uj") is not None and span > 0:
            watts = float(n["gpu_min_uj"] * 1000) / float(span)
            floor = watts if floor is None else min(floor, watts)
    return {
        "gpu_seconds": round(gpu_seconds, 3),
        "node_ns": min(node_ns, slices.INT64_MAX),
        "gpu_ns": min(gpu_ns, slices.INT64_MAX),
        "gpu_count": count,
        "unresolved_gpus": unresolved,
        "gpu_floor_w": floor,
    }


def _coverage(nodes: list[dict]) -> float | None:
    """The nodes' coverage weighted by their durations; None when no node has one."""
    durations = [(n["end_ns"] - n["start_ns"], n["coverage"]) for n in nodes]
    weight = sum(d for d, c in durations if c is not None)
    return (sum(d * c for d, c in durations if c is not None) / weight) if weight else None


def _expected_nodes(nodelist: str | None) -> list[str] | None:
    if not nodelist:
        return None
    try:
        return expand_hostlist(nodelist)
    except ValueError as e:
        log.warning("cannot expand the nodelist %r: %s", nodelist, e)
        return None
