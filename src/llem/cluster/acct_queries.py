"""Every SQL statement that ``llem-acct`` runs against the cluster ledger.

Read-only: the ledger is opened with :class:`llem.cluster.ledger.Ledger` (``readonly=True``)
and only ``SELECT`` statements go through :meth:`Ledger.query`. The indexes they use are the
ledger's own (its migrations); on a ledger not yet migrated by ``llem aggregate`` the queries
are as correct, only slower on large ledgers.

Selections are described by :class:`RunFilter` (built by :mod:`llem.acct` from the command
line) and turned into one ``WHERE`` clause over ``job_runs`` by :func:`where_clause`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from llem.cluster.dialect import settled
from llem.errors import LedgerError

log = logging.getLogger(__name__)

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
    "status",
    "energy_uj",
    "cpu_energy_uj",
    "dram_energy_uj",
    "gpu_energy_uj",
    "other_energy_uj",
    "estimated_energy_uj",
    "gpu_seconds",
    "coverage",
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
    "attribution",
)
"""The columns of :func:`select_runs`' rows, in order: ``job_runs``'s (None for those a ledger
not yet migrated by ``llem aggregate`` lacks), then the attribution policies of the run's
nodes (comma-separated; None before ledger migration 3)."""

SLURM_RUN_COLUMNS = frozenset(
    {
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
    }
)
"""``job_runs`` columns added by the ledger migration for Slurm's accounting."""

STARTED = "COALESCE(r.slurm_start_ns, r.run_start_ns)"
ENDED = "COALESCE(r.slurm_end_ns, r.run_end_ns)"
ELIGIBLE = "COALESCE(r.eligible_ns, r.slurm_start_ns, r.run_start_ns)"
SUBMITTED = "COALESCE(r.submit_ns, r.eligible_ns, r.slurm_start_ns, r.run_start_ns)"
"""A run's times as sacct knows them: Slurm's own where it told us, else the nodes'."""
INDEX_SLACK_NS = 3600 * 10**9
"""The nodes' end of a run (``run_end_ns``, indexed) is never this much before Slurm's, nor
their start (``run_start_ns``, indexed) this much after Slurm's: a window on Slurm's times is
first narrowed with the indexes, this much wider."""


def _attribution_sql(ledger) -> str:
    policies = ledger.dialect.policies("n.attribution")
    return (
        f"(SELECT {policies} FROM job_nodes n WHERE n.cluster = r.cluster "
        "AND n.job_id = r.job_id AND n.run_start_ns = r.run_start_ns)"
    )


WINDOW_COLUMNS = (
    "cluster",
    "job_id",
    "run_start_ns",
    "name",
    "step_id",
    "start_ns",
    "end_ns",
    "status",
    "nodes",
    "energy_uj",
    "node",
    "energy",
    "work",
    "unit",
)
"""The columns of :func:`select_windows`' rows, in order (one row per node of a window;
``work`` and ``unit`` None before ledger migration ``_v4_work_and_power``)."""

TOTAL_COLUMNS = (
    "key",
    "njobs",
    "elapsed_ns",
    "energy_uj",
    "cpu_energy_uj",
    "dram_energy_uj",
    "gpu_energy_uj",
    "other_energy_uj",
    "estimated_energy_uj",
    "gpu_seconds",
    "node_ns",
    "covered_ns",
    "coverage_ns",
)
"""The columns of :func:`select_totals`' rows, in order."""

GROUP_KEYS = ("user", "account", "partition", "tag", "day", "month")
"""The ``--totals`` keys; days and months are those of the run's start, local time."""


def group_key(ledger, by: str) -> str:
    """SQL of a ``--totals`` key (a member of :data:`GROUP_KEYS`)."""
    if by == "day":
        return ledger.dialect.day("r.run_start_ns")
    if by == "month":
        return ledger.dialect.month("r.run_start_ns")
    if by not in GROUP_KEYS:
        raise KeyError(by)
    return f"COALESCE(r.{by}, '')"


CHUNK = 400  # bound parameters per IN list, well under SQLite's limit


@dataclass(frozen=True)
class JobSpec:
    """One item of ``-j``: ``1234``, ``1234.train`` (a step or window), ``1234_7`` (array)."""

    job_id: str
    task_id: str | None = None
    step: str | None = None


@dataclass(frozen=True)
class Visibility:
    """The runs a caller may see when privacy applies (the gateway sets it, never a client).

    Attributes:
        uid: the caller's own runs (by uid, as Slurm recorded the job's owner).
        accounts: accounts the caller coordinates: every run of these is visible too.
    """

    uid: int
    accounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunFilter:
    """Which runs of ``job_runs`` to select; None means no restriction.

    The time window is sacct's (``as_mysql_jobacct_process.c`` in Slurm 22.05), by
    ``window``:

    * ``eligible`` (no ``-s``, no ``-j``): runs eligible before ``end_ns`` that ended at or
      after ``start_ns`` (pending time counts);
    * ``submit`` (``-j`` without ``-s``): runs submitted before ``end_ns`` that ended at or
      after ``start_ns``;
    * ``state`` (``-s``): per state, runs in that state that *ended* within
      [``start_ns``, ``end_ns``]; ``RUNNING``: runs that ran during the window, whatever
      their state; ``PENDING``: runs eligible before ``end_ns`` that started after
      ``start_ns``.

    Attributes:
        clusters: cluster names.
        users: user names; numeric items match the uid.
        accounts: account names.
        partitions: partition names.
        states: sacct state names (``COMPLETED``, ``CANCELLED``, ..., ``UNKNOWN``).
        start_ns: the window's start (ns since the epoch).
        end_ns: the window's end.
        jobs: job ids, array tasks (the step part is applied by the caller).
        nodes: host names; runs with at least one of them.
        names: job names.
        window: ``eligible``, ``submit``, ``state`` or ``overlap`` (runs that ended at or
            after ``start_ns`` and started at or before ``end_ns``).
        groups: gids; runs whose job ran under one of them.
        qos: QOS names (known from Slurm's accounting only).
        timelimit_min, timelimit_max: minutes; as sacct, ``-k`` alone selects runs with that
            very time limit, with ``-K`` the range; ``-K`` alone selects nothing less.
        visible: what privacy lets the caller see (None: everything).
    """

    clusters: tuple[str, ...] | None = None
    users: tuple[str, ...] | None = None
    accounts: tuple[str, ...] | None = None
    partitions: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    jobs: tuple[JobSpec, ...] | None = None
    nodes: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    window: str = "overlap"
    groups: tuple[int, ...] | None = None
    qos: tuple[str, ...] | None = None
    timelimit_min: int | None = None
    timelimit_max: int | None = None
    visible: Visibility | None = None


def open_ledger(path: str | os.PathLike):
    """Open the ledger read-only, with a message that says what to do when that fails.

    ``path`` is a file (SQLite) or a PostgreSQL connection string (``postgresql://...``,
    ``service=NAME``).

    Raises:
        LedgerError: no such file, not readable, not a ledger, or a newer schema.
    """
    from llem.cluster.ledger import Ledger
    from llem.cluster.pg_ledger import PgLedger, is_postgres

    if is_postgres(path):
        ledger = PgLedger(str(path), readonly=True)
        ledger.query("SELECT 1 FROM job_runs LIMIT 1")
        return ledger
    path = Path(path)
    if not path.exists():
        raise LedgerError(
            f"no ledger at {path}. Set 'ledger:' in the llem configuration (or LLEM_LEDGER), or "
            "pass --ledger PATH; on a new installation run 'llem aggregate --once' first"
        )
    if not os.access(path, os.R_OK):
        raise LedgerError(
            f"{path}: permission denied reading the ledger: it is private (only its group "
            "reads it). Ask the ledger gateway instead: set 'ledger: llem://LEDGER_HOST' in "
            "the llem configuration, or LLEM_LEDGER=llem://LEDGER_HOST, or pass --ledger "
            "llem://LEDGER_HOST (on the ledger host itself: --ledger "
            "/run/llem-gateway/gateway.sock). See docs/acct.md, 'Through the gateway'"
        )
    ledger = Ledger(path, readonly=True)
    try:
        ledger.db.execute("SELECT 1 FROM job_runs LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        ledger.close()
        raise LedgerError(f"{path}: not a usable ledger: {e}") from e
    return ledger


def _in(column: str, values: Sequence, params: list) -> str:
    params.extend(values)
    return f"{column} IN ({', '.join('?' * len(values))})"


def where_clause(f: RunFilter) -> tuple[str, list]:
    """The ``WHERE`` clause (over ``job_runs r``) and its parameters."""
    where: list[str] = []
    params: list = []
    if f.clusters is not None:
        where.append(_in("r.cluster", f.clusters, params))
    if f.users is not None:
        names = [u for u in f.users if not u.isdigit()]
        uids = [int(u) for u in f.users if u.isdigit()]
        either = []
        if names:
            either.append(_in("r.user", names, params))
        if uids:
            either.append(_in("r.uid", uids, params))
        where.append(f"({' OR '.join(either)})")
    if f.accounts is not None:
        where.append(_in("r.account", f.accounts, params))
    if f.partitions is not None:
        where.append(_in("r.partition", f.partitions, params))
    if f.names is not None:
        where.append(_in("r.name", f.names, params))
    if f.states is not None and f.window != "state":
        where.append(_in("COALESCE(r.state, 'UNKNOWN')", f.states, params))
    where += _window(f, params)
    if f.qos is not None:
        where.append(_in("r.qos", f.qos, params))
    if f.timelimit_min is not None:
        if f.timelimit_max is not None:
            where.append("r.timelimit_min BETWEEN ? AND ?")
            params += [f.timelimit_min, f.timelimit_max]
        else:
            where.append("r.timelimit_min = ?")
            params.append(f.timelimit_min)
    if f.groups is not None:
        where.append(
            "EXISTS (SELECT 1 FROM job_nodes jn WHERE jn.cluster = r.cluster AND "
            "jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns AND "
            + _in("jn.gid", f.groups, params)
            + ")"
        )
    if f.jobs is not None:
        either = []
        for spec in f.jobs:
            if spec.task_id is not None:
                either.append("(r.array_job_id = ? AND r.array_task_id = ?)")
                params += [spec.job_id, spec.task_id]
            else:
                either.append("(r.job_id = ? OR r.array_job_id = ?)")
                params += [spec.job_id, spec.job_id]
        where.append(f"({' OR '.join(either)})")
    if f.nodes is not None:
        where.append(
            "EXISTS (SELECT 1 FROM job_nodes jn WHERE jn.cluster = r.cluster AND "
            "jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns AND "
            + _in("jn.node", f.nodes, params)
            + ")"
        )
    if f.visible is not None:
        either = ["r.uid = ?"]
        params.append(f.visible.uid)
        if f.visible.accounts:
            either.append(_in("r.account", f.visible.accounts, params))
        where.append(f"({' OR '.join(either)})")
    return " AND ".join(where) or "TRUE", params


def _window(f: RunFilter, params: list) -> list[str]:
    """The time window's conditions (see :class:`RunFilter`)."""
    start, end = f.start_ns, f.end_ns
    out = []
    if start is not None:
        # The index on run_end_ns narrows first; the exact test is on Slurm's end.
        out.append("r.run_end_ns >= ?")
        params.append(start - INDEX_SLACK_NS)
    if f.window == "overlap" or (f.window == "state" and f.states is None):
        if start is not None:
            out.append(f"{ENDED} >= ?")
            params.append(start)
        if end is not None:
            # and the index on run_start_ns bounds the other side (the nodes' start is never
            # this much after Slurm's): a window in the past reads its own runs, not every
            # run since
            out.append("r.run_start_ns <= ?")
            params.append(end + INDEX_SLACK_NS)
            out.append(f"{STARTED} <= ?")
            params.append(end)
        return out
    if f.window in ("eligible", "submit"):
        begin = ELIGIBLE if f.window == "eligible" else SUBMITTED
        if end is not None:
            out.append(f"{begin} < ?")
            params.append(end)
        if start is not None:
            out.append(f"{ENDED} >= ?")
            params.append(start)
        return out
    either = []
    for state in f.states or ():
        if start is None and end is None:
            either.append("COALESCE(r.state, 'UNKNOWN') = ?")
            params.append(state)
        elif state == "RUNNING":
            either.append(f"({ENDED} > ? AND {STARTED} < ?)")
            params += [start or 0, end if end is not None else 2**62]
        elif state == "PENDING":
            either.append(f"({STARTED} > ? AND {ELIGIBLE} < ?)")
            params += [start or 0, end if end is not None else 2**62]
        else:
            either.append(f"(COALESCE(r.state, 'UNKNOWN') = ? AND {ENDED} BETWEEN ? AND ?)")
            params += [state, start or 0, end if end is not None else 2**62]
    out.append(f"({' OR '.join(either) or '1 = 0'})")
    return out


ZERO_RUN_COLUMNS = frozenset(
    {
        "energy_uj",
        "cpu_energy_uj",
        "dram_energy_uj",
        "gpu_energy_uj",
        "other_energy_uj",
        "estimated_energy_uj",
        "gpu_seconds",
    }
)
"""Columns that are never NULL (``NOT NULL DEFAULT 0``): 0 stands for them when not read
(:func:`select_runs`)."""


def run_columns_sql(ledger, columns: Sequence[str] = RUN_COLUMNS) -> str:
    """The select list of ``columns`` (of :data:`RUN_COLUMNS`) over ``job_runs r`` for this
    ledger: NULL for the columns a ledger not yet migrated lacks."""
    cols = []
    for c in columns:
        if c == "attribution":
            has_column = ledger.has_column("job_nodes", "attribution")
            cols.append(_attribution_sql(ledger) if has_column else "NULL")
        elif c not in SLURM_RUN_COLUMNS or ledger.has_column("job_runs", c):
            cols.append(f"r.{c}")
        else:
            cols.append("NULL")
    return ", ".join(cols)


def select_runs(
    ledger,
    f: RunFilter,
    columns: Collection[str] | None = None,
    ordered: bool = True,
    padded: bool = True,
) -> list[tuple]:
    """Runs matching ``f``, oldest start first (in no order unless ``ordered``), as tuples of
    :data:`RUN_COLUMNS`.

    With ``columns`` (names of :data:`RUN_COLUMNS`) only those are read, and None, or 0 for
    :data:`ZERO_RUN_COLUMNS`, stands for the others: a month of a large cluster is 80,000
    rows and more, and every value the database hands over costs (padding the tuples here
    costs less than reading NULLs). Not ``padded``: the tuples hold only the columns read,
    in :data:`RUN_COLUMNS`' order (for callers that read them by column).
    """
    where, params = where_clause(f)
    if not _has_slurm_columns(ledger):
        if f.qos is not None or f.timelimit_min is not None:
            return []  # only Slurm's accounting knows them
        where = _unmigrated(where)
    read = RUN_COLUMNS if columns is None else [c for c in RUN_COLUMNS if c in columns]
    order = " ORDER BY r.run_start_ns, r.cluster, r.job_id" if ordered else ""
    rows = ledger.query(
        f"SELECT {run_columns_sql(ledger, read)} FROM job_runs r WHERE {where}{order}", params
    )
    if len(read) == len(RUN_COLUMNS) or not padded:
        return rows
    rest = [c for c in RUN_COLUMNS if c not in columns]
    pad = tuple(0 if c in ZERO_RUN_COLUMNS else None for c in rest)
    at = {c: i for i, c in enumerate([*read, *rest])}
    shape = itemgetter(*(at[c] for c in RUN_COLUMNS))
    return [shape(r + pad) for r in rows]


def _where_for(ledger, f: RunFilter) -> tuple[str, list]:
    where, params = where_clause(f)
    if not _has_slurm_columns(ledger):
        if f.qos is not None or f.timelimit_min is not None:
            return "1 = 0", []
        where = _unmigrated(where)
    return where, params


def _has_slurm_columns(ledger) -> bool:
    return ledger.has_column("job_runs", "submit_ns")


def _unmigrated(where: str) -> str:
    """``where`` for a ledger without the accounting columns: the nodes' times only."""
    for expr, plain in (
        (STARTED, "r.run_start_ns"),
        (ENDED, "r.run_end_ns"),
        (ELIGIBLE, "r.run_start_ns"),
        (SUBMITTED, "r.run_start_ns"),
    ):
        where = where.replace(expr, plain)
    return where


def _chunks(items: Sequence, size: int = CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def select_windows(ledger, runs: Sequence[tuple[str, str, int]]) -> list[tuple]:
    """The named windows (steps) of runs given as (cluster, job_id, run_start_ns).

    One row per node of each window, as tuples of :data:`WINDOW_COLUMNS` (``nodes`` is 1;
    ``energy`` the JSON of energy per device). Ordered by start.
    """
    wanted = set(runs)
    by_cluster: dict[str, list[str]] = {}
    for cluster, job_id, _ in wanted:
        by_cluster.setdefault(cluster, []).append(job_id)
    out = []
    has_work = ledger.has_column("windows", "work")
    work = "w.work, w.unit" if has_work else "NULL, NULL"
    ids = ledger.dialect.any_text("jn.job_id")
    for cluster, job_ids in by_cluster.items():
        # one statement per cluster: the job ids as one list parameter
        rows = ledger.query(
            "SELECT jn.cluster, jn.job_id, jn.run_start_ns, w.name, w.step_id, w.start_ns,"
            f" w.end_ns, w.status, 1, w.energy_uj, jn.node, w.energy, {work} FROM job_nodes jn "
            f"JOIN windows w ON w.job_node_id = jn.id WHERE jn.cluster = ? AND {ids}",
            [cluster, ledger.dialect.list_param(sorted(set(job_ids)))],
        )
        out += [r for r in rows if (r[0], r[1], r[2]) in wanted]
    out.sort(key=lambda r: (r[5], r[3], r[10]))
    return out


STEP_STATE = "UNKNOWN"
"""The state of a step row: the ledger keeps no step's state (sacct has it)."""


def select_steps(ledger, runs: Sequence[tuple[str, str, int]]) -> list[tuple]:
    """The Slurm steps (``batch``, ``extern``, ``0``, ...) of runs given as (cluster, job_id,
    run_start_ns), shaped as :func:`select_windows`' rows (:data:`WINDOW_COLUMNS`): one row
    per node of each step, ``name`` empty, ``step_id`` the step, ``status``
    :data:`STEP_STATE`, ``work`` and ``unit`` None. None on a ledger before ``_v7_job_steps``.
    """
    if not ledger.has_column("job_steps", "step"):
        return []
    wanted = set(runs)
    by_cluster: dict[str, list[str]] = {}
    for cluster, job_id, _ in wanted:
        by_cluster.setdefault(cluster, []).append(job_id)
    out = []
    ids = ledger.dialect.any_text("jn.job_id")
    for cluster, job_ids in by_cluster.items():
        rows = ledger.query(
            "SELECT jn.cluster, jn.job_id, jn.run_start_ns, '', s.step, s.start_ns, "
            f"s.end_ns, '{STEP_STATE}', 1, s.energy_uj, jn.node, s.energy, NULL, NULL "
            "FROM job_nodes jn JOIN job_steps s ON s.job_node_id = jn.id "
            f"WHERE jn.cluster = ? AND {ids}",
            [cluster, ledger.dialect.list_param(sorted(set(job_ids)))],
        )
        out += [r for r in rows if (r[0], r[1], r[2]) in wanted]
    out.sort(key=lambda r: (r[0], r[1], r[2], step_order(r[4]), r[10]))
    return out


def step_order(step: str) -> tuple:
    """sacct's order of a job's steps: ``batch``, ``extern`` (and ``interactive``), then the
    numbered steps by number, then anything else (``other``)."""
    if step.isdigit():
        return (1, int(step), "")
    return (0 if step in ("batch", "extern", "interactive") else 2, 0, step)


def device_components(ledger, nodes: Iterable[tuple[str, str]]) -> dict[tuple, tuple[str, str]]:
    """(cluster, node, device_key) -> (component, source) for the given (cluster, node)s."""
    by_cluster: dict[str, set[str]] = {}
    for cluster, node in nodes:
        by_cluster.setdefault(cluster, set()).add(node)
    out = {}
    for cluster, names in by_cluster.items():
        for chunk in _chunks(sorted(names)):
            for node, key, component, source in ledger.query(
                "SELECT node, device_key, component, source FROM devices WHERE cluster = ? "
                f"AND node IN ({', '.join('?' * len(chunk))})",
                [cluster, *chunk],
            ):
                out[(cluster, node, key)] = (component, source)
    return out


def select_totals(ledger, f: RunFilter, by: str) -> list[tuple]:
    """Sums over the runs matching ``f`` grouped by ``by`` (a member of :data:`GROUP_KEYS`).

    Rows are tuples of :data:`TOTAL_COLUMNS`, ordered by key: ``elapsed_ns`` is the sum of
    the runs' wall times, ``node_ns`` of nodes x wall time, ``covered_ns`` of coverage x wall
    time over the runs that have a coverage, whose wall time sums to ``coverage_ns``.
    """
    where, params = _where_for(ledger, f)
    span = "(r.run_end_ns - r.run_start_ns)"
    rows = ledger.query(
        f"SELECT {group_key(ledger, by)} AS k, COUNT(*), SUM({span}), SUM(r.energy_uj), "
        "SUM(r.cpu_energy_uj), SUM(r.dram_energy_uj), SUM(r.gpu_energy_uj), "
        "SUM(r.other_energy_uj), SUM(r.estimated_energy_uj), SUM(r.gpu_seconds), "
        f"SUM(COALESCE(r.num_nodes, 0) * {span}), SUM(r.coverage * {span}), "
        f"SUM(CASE WHEN r.coverage IS NOT NULL THEN {span} ELSE 0 END) "
        f"FROM job_runs r WHERE {where} GROUP BY k ORDER BY k",
        params,
    )
    return settled(rows, 9, 11)


def hourly_energy(
    ledger, f: RunFilter, group: str | None = None, extra: tuple[str, list] | None = None
) -> list[tuple]:
    """Attributed energy per clock hour of the runs matching ``f``.

    Args:
        ledger: the open ledger.
        f: the selection.
        group: None for one series over all runs (rows ``(hour_s, energy_uj)``); ``"run"``
            for one per run (rows ``(cluster, job_id, run_start_ns, hour_s, energy_uj)``); or
            a member of :data:`GROUP_KEYS` (rows ``(key, hour_s, energy_uj)``).
        extra: one more condition over ``job_runs r`` and its parameters.
    """
    where, params = _where_for(ledger, f)
    if extra is not None:
        where = f"{where} AND {extra[0]}"
        params = [*params, *extra[1]]
    if group is None:
        keys, n = "", 0
    elif group == "run":
        keys, n = "r.cluster, r.job_id, r.run_start_ns, ", 3
    else:
        keys, n = f"{group_key(ledger, group)}, ", 1
    groups = ", ".join(str(i) for i in range(1, n + 2))
    return ledger.query(
        f"SELECT {keys}e.hour_s, SUM(e.energy_uj) FROM job_runs r "
        f"{ledger.dialect.fixed_join} job_nodes jn ON jn.cluster = r.cluster AND jn.job_id = r.job_id "
        "AND jn.run_start_ns = r.run_start_ns "
        f"JOIN job_energy e ON e.job_node_id = jn.id WHERE {where} "
        f"GROUP BY {groups} ORDER BY {groups}",
        params,
    )


def energy_by_year(ledger, f: RunFilter, group: str) -> list[tuple]:
    """Energy of the runs matching ``f`` for carbon figures that change only with the year:
    rows ``(key, hour_s, energy_uj)`` by ``group`` (a member of :data:`GROUP_KEYS`), where
    the runs that start and end in one UTC year count with their total (``hour_s`` is then
    that year's first hour), and the few that span a new year with their energy by hour.

    Two aggregates in SQL, whatever the number of runs: the first reads ``job_runs`` only,
    the second joins the hourly energy of the runs that span a year (none in most windows).
    """
    import calendar
    import time

    first = time.gmtime(f.start_ns // 10**9 if f.start_ns is not None else 0).tm_year - 1
    last = time.gmtime(max(time.time(), (f.end_ns or 0) / 10**9)).tm_year + 1
    starts = [calendar.timegm((y, 1, 1, 0, 0, 0)) for y in range(max(first, 1970), last + 1)]

    def year_of(expr: str, params: list) -> str:
        """Which of ``starts`` the time is in: 1 for the first year, 0 before it, and
        ``len(starts)`` after the last (an open end)."""
        whens = []
        for i in range(len(starts), 0, -1):
            whens.append(f"WHEN {expr} >= ? THEN {i}")
            params.append(starts[i - 1] * 10**9)
        return f"(CASE {' '.join(whens)} ELSE 0 END)"

    def one_year(params: list) -> str:
        start = year_of("r.run_start_ns", params)
        end = year_of("r.run_end_ns", params)
        start_again = year_of("r.run_start_ns", params)
        params.append(len(starts) - 1)
        return f"(r.run_end_ns IS NOT NULL AND {start} = {end} AND {start_again} BETWEEN 1 AND ?)"

    where, params = _where_for(ledger, f)
    key = group_key(ledger, group)
    # the year in the select list (0: not one year), not in WHERE, whose estimate would
    # make PostgreSQL sort every run instead of hashing a few groups
    select_params: list = []
    cond = one_year(select_params)
    year = year_of("r.run_start_ns", select_params)
    totals = ledger.query(
        f"SELECT {key}, CASE WHEN {cond} THEN {year} ELSE 0 END, SUM(r.energy_uj) "
        f"FROM job_runs r WHERE {where} GROUP BY 1, 2",
        [*select_params, *params],
    )
    out = [(k, starts[i - 1], uj) for k, i, uj in totals if i]
    spanning_params: list = []
    spanning = f"NOT {one_year(spanning_params)}"
    return out + hourly_energy(ledger, f, group, (spanning, spanning_params))


def run_nodes(ledger, f: RunFilter) -> list[tuple[str, str]]:
    """Distinct (cluster, node) of the runs matching ``f`` (for the statement's hardware)."""
    where, params = _where_for(ledger, f)
    return ledger.query(
        # CROSS JOIN keeps job_runs outermost: left free, the planner scans all of job_nodes
        # in node order to save a sort (13 s instead of 0.2 s on a million jobs).
        f"SELECT DISTINCT jn.cluster, jn.node FROM job_runs r {ledger.dialect.fixed_join} "
        "job_nodes jn "
        "ON jn.cluster = r.cluster AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns"
        f" WHERE {where} ORDER BY 1, 2",
        params,
    )


def clusters(ledger) -> list[str]:
    """The clusters that have runs in the ledger."""
    return [r[0] for r in ledger.query("SELECT DISTINCT cluster FROM job_runs ORDER BY 1")]
