"""Every SQL statement ``llem report`` runs on the cluster ledger (read-only).

The report reads the ledger through :meth:`Ledger.query` on a read-only connection and
never changes the schema. A period is ``[start_ns, end_ns)``; energy rows are picked by their
clock hour (``hour_s`` in ``[start_s, end_s)``), reached through ``job_runs`` (time index) and
``job_nodes`` (unique key prefix), as ``docs/ledger.md`` describes: ``job_energy`` has no
``hour_s`` index on purpose.

Carbon factors are per clock hour (grid intensity x PUE of the hour's month): they are loaded
into a TEMP table (the temp schema is writable even on a read-only connection) so that
operational CO2e is summed inside the same pass over the energy rows.

Queries return plain tuples with the column names in ``*_COLUMNS``; turning them into frames
is :mod:`llem.report.frames`' job.
"""

from __future__ import annotations

from collections.abc import Mapping

from llem.cluster.dialect import RUN_OF_NODE, settled
from llem.cluster.ledger import Ledger

HOUR_S = 3600
DAY_S = 86400
DEFAULT_IDLE_W = 100.0
"""Watts below which a GPU's average power over its job counts as idle (``--idle-w``)."""

# Runs that overlap the period, joined to their node runs. CROSS JOIN fixes SQLite's join
# order (runs by time index -> node runs by key -> energy rows by primary key): left to itself
# the planner scans all of job_energy, which grows with the ledger's whole history. On
# PostgreSQL the node runs are left to the planner here (a parallel hash join over job_nodes
# on the 10,000,000-job ledger; run by run, as in :func:`runs`, the look-ups of the GPU and
# hourly roll-ups that follow ran in one process instead of three: 33-36 s against 18 s for
# the idle GPUs, docs/performance.md).
_NODES_CTE = """
    nodes AS (
        SELECT jn.id AS node_id, {run_id} AS run_id, jn.node AS node, jn.gpus AS gpus,
               jn.start_ns AS start_ns, jn.end_ns AS end_ns, r.cluster AS cluster,
               r.job_id AS job_id, r.run_start_ns AS run_start_ns,
               {greatest}(0, {least}(jn.end_ns, :end_ns) - {greatest}(jn.start_ns, :start_ns))
                   AS overlap_ns
        FROM job_runs r
        {join}
        WHERE r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {account_filter}
    )
"""
SECONDS = "CAST(1e9 AS DOUBLE PRECISION)"
"""Nanoseconds per second, as a float on both backends (PostgreSQL's 1e9 is numeric).

Times are summed in integer nanoseconds and divided once, and rows come in an order both
backends share (the runs' natural keys, or the rows' values), so that both backends (which
add rows up in different orders) give the same floats; the one sum of floats left
(operational CO2e) is :func:`llem.cluster.dialect.settled`."""


HOUR_NS = HOUR_S * 10**9
DAY_NS = DAY_S * 10**9
INSIDE = (
    "(r.run_start_ns >= :start_ns AND r.run_end_ns <= :end_ns "
    f"AND r.run_start_ns / {HOUR_NS} * {HOUR_S} >= :start_s "
    f"AND r.run_end_ns / {HOUR_NS} * {HOUR_S} < :end_s)"
)
"""The run ``r`` lies inside the period: its job nodes, and every clock hour they may have
energy in (a slice's hours run from its start's hour to its end's, both included:
``llem.slices``), lie in it. Such a run's figures in the period are its whole figures, kept
in ``job_runs`` by every regroup (energy by component, ``node_ns``, ``gpu_ns``): the report
reads them there instead of looking up its job nodes and their hourly roll-up rows. Only the
runs across the period's bounds (3,447 of the 822,301 runs of a month of the
10,000,000-job ledger) are looked up."""
ONE_DAY = f"(r.run_start_ns / {DAY_NS} = r.run_end_ns / {DAY_NS})"
"""Every clock hour the run ``r`` may have energy in lies in the UTC day of its start."""


def _fast(ledger) -> str:
    """The runs whose energy per UTC day, with its operational CO2e, is read from ``job_runs``:
    inside the period, inside one UTC day whose carbon factor is the same in every hour
    (``temp.day_factors``, :func:`load_hour_factors`)."""
    return (
        f"({INSIDE} AND {ONE_DAY} AND r.run_start_ns / {DAY_NS} * {DAY_S} IN "
        f"(SELECT day_s FROM {ledger.dialect.temp}day_factors))"
    )


def uses_run_spans(ledger: Ledger, rollups: bool = True) -> bool:
    """Whether runs inside the period are read from ``job_runs`` alone (:data:`INSIDE`): the
    roll-ups asked for, and a ledger with ``job_runs.node_ns`` (schema 10)."""
    return rollups and ledger.has_column("job_runs", "node_ns")


def _node_ns(ledger, rollups: bool) -> tuple[str, str]:
    """(node time, GPU time) of the run ``r`` inside the period, integer nanoseconds: from
    ``job_runs`` for a run :data:`INSIDE` it, else from its job nodes' overlaps with it."""
    d = ledger.dialect
    overlap = (
        f"{d.greatest}(0, {d.least}(jn.end_ns, :end_ns) - {d.greatest}(jn.start_ns, :start_ns))"
    )
    of_nodes = f"(SELECT COALESCE(SUM({{x}}), 0) FROM job_nodes jn WHERE {RUN_OF_NODE})"
    node = of_nodes.format(x=overlap)
    gpu = of_nodes.format(x=f"{d.json_length('jn.gpus')} * {overlap}")
    if uses_run_spans(ledger, rollups):
        node = f"CASE WHEN {INSIDE} THEN r.node_ns ELSE {node} END"
        gpu = f"CASE WHEN {INSIDE} THEN r.gpu_ns ELSE {gpu} END"
    return node, gpu


def _nodes_cte(ledger, account_filter: str, *, exclude: str = "") -> str:
    """The ``nodes`` CTE; ``exclude``: a condition on the run ``r`` whose runs are left out
    (the caller reads them from ``job_runs``). The few runs left then have their node runs
    looked up run by run (on PostgreSQL; the hash join over every job node is for a whole
    period's runs)."""
    d = ledger.dialect
    join = f"{d.fixed_join} job_nodes jn ON {RUN_OF_NODE}"
    if exclude:
        account_filter += f" AND NOT {exclude}"
        if d.name == "postgresql":
            join = d.node_runs().replace("LEFT JOIN LATERAL", "JOIN LATERAL", 1)
    return _NODES_CTE.format(
        run_id=d.run_id,
        greatest=d.greatest,
        least=d.least,
        join=join,
        account_filter=account_filter,
    )


def run_start_floor(ledger: Ledger, start_ns: int) -> int | None:
    """A start that every run overlapping a period from ``start_ns`` on starts after:
    ``start_ns`` less the ledger's longest run (one step of ``job_runs_by_length``, schema
    12); None for a ledger without that index (not migrated yet: ``MAX`` would read every
    run) or without a run.

    Every run ending after ``start_ns`` that is at most that long starts after it. The
    period's runs are then found through the start-time index, from the floor to the
    period's end, instead of every run that ends after its start: for a month that is not
    the ledger's last (the change table's previous month) the runs of every later month as
    well (1,790,000 index entries for October's 850,381 runs on the 10,000,000-job bench
    ledger). A very long run makes the floor early and the planner keeps the end-time index.

    None too for a connection that row-level security restricts to some runs (the gateway's
    login for a user or a coordinator, :meth:`~llem.cluster.pg_ledger.PgLedger.sees_every_run`):
    ``MAX`` then walks the index from the longest run down, checking the policy at each
    entry, until a run the caller may see, and for a caller who sees few or none, that is
    the whole index (41-52 s on the 10,000,000-job ledger for a coordinator of an account
    without runs, past the gateway's ``query_timeout_s``: docs/security.md). Such a report
    is read as before schema 12, from the end-time index.
    """
    if not ledger.has_index("job_runs_by_length") or not ledger.sees_every_run():
        return None
    (longest,), *_ = ledger.query("SELECT MAX(run_end_ns - run_start_ns) FROM job_runs")
    return None if longest is None else start_ns - int(longest)


def _period(start_ns: int, end_ns: int) -> dict:
    """The period's bounds in ns and in whole seconds (the hours' keys)."""
    return {
        "start_ns": start_ns,
        "end_ns": end_ns,
        "start_s": start_ns // 10**9,
        "end_s": -(-end_ns // 10**9),
    }


def _params(ledger: Ledger, start_ns: int, end_ns: int, account: str | None) -> tuple[dict, str]:
    """The period's parameters, and the conditions on the run ``r`` that follow
    ``r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns``: its start after
    :func:`run_start_floor`, its account."""
    params = _period(start_ns, end_ns)
    filt = ""
    floor = run_start_floor(ledger, start_ns)
    if floor is not None:
        params["floor_ns"] = floor
        filt = "AND r.run_start_ns > :floor_ns"
    if account is not None:
        params["account"] = account
        filt += " AND r.account = :account"
    return params, filt


def open_readonly(path) -> Ledger:
    """The ledger opened for reading only (never created, never migrated): a file (SQLite)
    or a PostgreSQL connection string.

    Memory-mapped reads on SQLite (up to 4 GiB of the file): the report reads the period's
    rows through primary keys, scattered over the file; mmap saves a copy per page (~25 %).
    """
    from llem.cluster.ledger import open_ledger

    ledger = open_ledger(path, readonly=True)
    if ledger.dialect.name == "sqlite":
        ledger.query("PRAGMA mmap_size = 4294967296")
    return ledger


def uniform_days(g_per_uj_by_hour: Mapping[int, float]) -> dict[int, float]:
    """The UTC days whose given hours all have the same carbon factor (an annual intensity:
    every day; an hourly series: usually none), with that factor, in day order."""
    days: dict[int, float | None] = {}
    for hour_s, g in g_per_uj_by_hour.items():
        day = hour_s - hour_s % DAY_S
        if day not in days:
            days[day] = g
        elif days[day] != g:
            days[day] = None
    return {day: g for day, g in sorted(days.items()) if g is not None}


def load_day_factors(ledger: Ledger, g_per_uj_by_hour: Mapping[int, float]) -> None:
    """(Re)load into temp.day_factors the days of :func:`uniform_days`: a run inside such a
    day has its operational CO2e computed from its total (:func:`_fast`), the same figure as
    its hours' sum up to the last bits of a float."""
    d = ledger.dialect
    ledger.query(
        "CREATE TEMP TABLE IF NOT EXISTS day_factors "
        "(day_s BIGINT PRIMARY KEY, g_per_uj DOUBLE PRECISION NOT NULL)"
    )
    ledger.query(f"DELETE FROM {d.temp}day_factors")
    rows = list(uniform_days(g_per_uj_by_hour).items())
    if rows:
        ledger.executemany(f"INSERT INTO {d.temp}day_factors VALUES (?, ?)", rows)


def load_hour_factors(ledger: Ledger, g_per_uj_by_hour: Mapping[int, float]) -> None:
    """(Re)load the per-hour carbon factors (grams CO2e per microjoule) into temp.factors,
    and the days of one factor into temp.day_factors (:func:`load_day_factors`)."""
    load_day_factors(ledger, g_per_uj_by_hour)
    ledger.query(
        "CREATE TEMP TABLE IF NOT EXISTS factors "
        "(hour_s BIGINT PRIMARY KEY, g_per_uj DOUBLE PRECISION NOT NULL)"
    )
    ledger.query(f"DELETE FROM {ledger.dialect.temp}factors")
    rows = sorted(g_per_uj_by_hour.items())
    if ledger.dialect.name == "postgresql":
        # one statement of two arrays (bounded by statement_timeout, as every read of the
        # gateway): 702,720 hours (the gateway's longest report and its previous period) in
        # 2.2 s, against 6.4 s of one INSERT per row
        ledger.query(
            f"INSERT INTO {ledger.dialect.temp}factors "
            "SELECT * FROM unnest(?::bigint[], ?::double precision[])",
            [[h for h, _ in rows], [g for _, g in rows]],
        )
        return
    ledger.executemany(f"INSERT INTO {ledger.dialect.temp}factors VALUES (?, ?)", rows)


NONE_LABEL = "(none)"
"""The name the report gives a missing or empty user, account, partition or tag."""


def _named(column: str) -> str:
    """``column`` with a missing or empty name as :data:`NONE_LABEL` (in SQL: a pass over
    text the server makes anyway, where pandas took 0.55 s for four columns of a month's
    822,579 runs on the 10M-job ledger)."""
    return f"COALESCE(NULLIF({column}, ''), '{NONE_LABEL}')"


RUN_COLUMNS = (
    "run_id",
    "cluster",
    "job_id",
    "run_start_ns",
    "run_end_ns",
    "user",
    "account",
    "partition",
    "tag",
    "name",
    "state",
    "status",
    "coverage",
    "num_nodes",
    "overlap_s",
    "node_s",
    "gpu_s",
)


FAST_COLUMNS = (
    "fast_day_s",
    "fast_energy_uj",
    "fast_cpu_uj",
    "fast_dram_uj",
    "fast_gpu_uj",
    "fast_other_uj",
    "fast_estimated_uj",
)
"""The columns that :func:`runs` adds with ``fast_energy``: the UTC day of a run inside the
period and one UTC day (:data:`INSIDE`, :data:`ONE_DAY`; -1 for any other run) and the run's
energy totals from ``job_runs`` (whole-run figures: its energy in the period only for such a
run). ``llem.report.frames.energy_frame`` makes those runs' energy rows from them."""

FAST_IDLE_COLUMNS = ("fast_allocated_gpus", "fast_unresolved_gpus")
"""The columns that :func:`runs` adds with ``idle_w``: a run of :data:`NOT_IDLE` with GPUs
has its allocated and unresolved GPUs here (``job_runs.gpu_count``, ``unresolved_gpus``;
-1 and 0 for any other run), which is its whole row of :func:`idle_gpus` (no idle GPU).
``llem.report.frames.idle_frame`` makes those rows, and ``idle_gpus(..., fast_apart=True)``
leaves them out: on the 10,000,000-job bench ledger 344,339 of a month's 370,266 rows,
which that read fetched, and sorted on disk, a second time."""


def runs(
    ledger: Ledger,
    start_ns: int,
    end_ns: int,
    account: str | None = None,
    *,
    rollups: bool = True,
    fast_energy: bool = False,
    idle_w: float | None = None,
) -> list[tuple]:
    """One row per job run overlapping the period, with its node- and GPU-seconds in it
    (a missing or empty user, account, partition or tag named :data:`NONE_LABEL`).

    One pass over the runs in their key order: a run inside the period has its node- and
    GPU-seconds in ``job_runs`` (:data:`INSIDE`); only a run across the period's bounds looks
    up its node runs (``rollups=False``: every run does, for the comparison).

    ``fast_energy`` (with :func:`uses_run_spans` only): each row also carries
    :data:`FAST_COLUMNS`, so that the report reads the month's runs once, not a second time
    for the energy of the runs inside one day (``energy_by_run_day(..., fast_apart=True)``).

    ``idle_w`` (with ``fast_energy`` and :func:`uses_gpu_floor` only): each row also carries
    :data:`FAST_IDLE_COLUMNS` at that idle threshold, for ``idle_gpus(..., fast_apart=True)``.
    """
    params, filt = _params(ledger, start_ns, end_ns, account)
    d = ledger.dialect
    node_ns, gpu_ns = _node_ns(ledger, rollups)
    fast = ""
    if fast_energy:
        if not uses_run_spans(ledger, rollups):
            raise ValueError("fast_energy needs the run spans of job_runs (uses_run_spans)")
        fast = (
            f", CASE WHEN {INSIDE} AND {ONE_DAY} THEN r.run_start_ns / {DAY_NS} * {DAY_S} "
            "ELSE -1 END, r.energy_uj, r.cpu_energy_uj, r.dram_energy_uj, r.gpu_energy_uj, "
            "r.other_energy_uj, r.estimated_energy_uj"
        )
        if idle_w is not None:
            if not uses_gpu_floor(ledger, rollups):
                raise ValueError("idle_w needs job_runs.gpu_floor_w (uses_gpu_floor)")
            params["idle_w"] = idle_w
            fast += (
                f", CASE WHEN r.gpu_count > 0 AND {NOT_IDLE} THEN r.gpu_count ELSE -1 END, "
                f"CASE WHEN r.gpu_count > 0 AND {NOT_IDLE} THEN r.unresolved_gpus ELSE 0 END"
            )
    elif idle_w is not None:
        raise ValueError("idle_w goes with fast_energy")
    return ledger.query(
        f"""
        SELECT {d.run_id}, r.cluster, r.job_id, r.run_start_ns, r.run_end_ns,
               {_named("r.user")}, {_named("r.account")}, {_named("r.partition")},
               {_named("r.tag")}, r.name, r.state, r.status, r.coverage,
               r.num_nodes, {d.greatest}(0, {d.least}(r.run_end_ns, :end_ns)
                   - {d.greatest}(r.run_start_ns, :start_ns)) / {SECONDS},
               {node_ns} / {SECONDS}, {gpu_ns} / {SECONDS}{fast}
        FROM job_runs r
        WHERE r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {filt}
        ORDER BY r.cluster, r.job_id, r.run_start_ns
    """,
        params,
        binary=True,
    )


ENERGY_COLUMNS = (
    "run_id",
    "day_s",
    "energy_uj",
    "cpu_uj",
    "dram_uj",
    "gpu_uj",
    "other_uj",
    "estimated_uj",
    "operational_g",
)


def uses_rollups(ledger: Ledger, rollups: bool = True) -> bool:
    """Whether the report reads the roll-ups (:mod:`llem.cluster.rollups`): asked for, and
    the ledger has them (a ledger ``llem aggregate`` has not migrated yet has not)."""
    return rollups and ledger.has_column("job_node_hours", "hour_s")


def _energy_source(ledger: Ledger, rollups: bool, few: bool = False) -> tuple[str, str]:
    """(FROM clause of the hourly energy ``e`` of the job nodes ``n``, its energy columns).

    From the roll-up, one row per job node and hour; from the raw rows, one per device,
    hour and method: the same integer sums either way.

    ``few``: ``n`` holds only the node runs of the runs across the period's bounds. On
    PostgreSQL their rows are then looked up node run by node run: the planner, which
    cannot tell how few they are, hashed the month's every hourly roll-up row to join them
    (3,079,474 rows for 5,037 node runs: 1.8 s against 0.1 s on the 10,000,000-job ledger).
    """
    join = ledger.dialect.fixed_join
    if uses_rollups(ledger, rollups):
        source = f"{join} job_node_hours e ON e.job_node_id = n.node_id"
        if few and ledger.dialect.name == "postgresql":
            source = (
                "JOIN LATERAL (SELECT * FROM job_node_hours e WHERE e.job_node_id = n.node_id "
                "AND e.hour_s >= :start_s AND e.hour_s < :end_s OFFSET 0) e ON TRUE"
            )
        return (
            source,
            "SUM(e.energy_uj) AS energy_uj, SUM(e.cpu_uj) AS cpu_uj, SUM(e.dram_uj) AS dram_uj, "
            "SUM(e.gpu_uj) AS gpu_uj, SUM(e.other_uj) AS other_uj, "
            "SUM(e.estimated_uj) AS estimated_uj",
        )
    return (
        f"{join} job_energy e ON e.job_node_id = n.node_id",
        """SUM(e.energy_uj) AS energy_uj,
               SUM(CASE WHEN e.component = 'cpu' THEN e.energy_uj ELSE 0 END) AS cpu_uj,
               SUM(CASE WHEN e.component = 'dram' THEN e.energy_uj ELSE 0 END) AS dram_uj,
               SUM(CASE WHEN e.component = 'gpu' THEN e.energy_uj ELSE 0 END) AS gpu_uj,
               SUM(CASE WHEN e.component NOT IN ('cpu', 'dram', 'gpu')
                        THEN e.energy_uj ELSE 0 END) AS other_uj,
               SUM(CASE WHEN e.source = 'estimated' THEN e.energy_uj ELSE 0 END)
                   AS estimated_uj""",
    )


def energy_by_run_day(
    ledger: Ledger,
    start_ns: int,
    end_ns: int,
    account: str | None = None,
    *,
    rollups: bool = True,
    fast_apart: bool = False,
) -> list[tuple]:
    """Energy of each run per UTC day of the period, by component, with operational CO2e.

    Needs :func:`load_hour_factors` first; an hour without a factor counts 0 g (the caller
    loads every hour of the period). A run inside one UTC day of one carbon factor
    (:func:`_fast`) is read from its totals in ``job_runs``; the others from the hourly
    roll-ups of their node runs. ``rollups=False`` sums the raw energy rows of every run
    instead (``llem ledger check`` and the tests compare the two). A run and day without
    energy gives no row.

    ``fast_apart``: leave out the runs of :func:`_fast`, whose rows the caller makes from
    :func:`runs`' ``fast_energy`` columns (``llem.report.frames.energy_frame``): about 90 %
    of a month's rows, which this read would fetch, round and sort a second time.
    """
    params, filt = _params(ledger, start_ns, end_ns, account)
    source, sums = _energy_source(ledger, rollups)
    d = ledger.dialect
    fast = _fast(ledger) if uses_run_spans(ledger, rollups) else ""
    # A day of one factor (temp.day_factors: every day of an annual intensity) has its CO2e
    # as its integer energy times that factor, as a run read from its totals has: one
    # product, whatever order the rows come in. A sum of per-hour products depends on that
    # order, which the plan chooses: with a plan read through another index, 59 of a
    # month's 101,447 rows (the 10,000,000-job ledger) changed in the 12th digit that
    # settled() keeps. Only days of several factors (an hourly series) still add products.
    rows = ledger.query(
        f"""
        WITH {_nodes_cte(ledger, filt, exclude=fast)},
        days AS (
            SELECT n.run_id AS run_id, e.hour_s - e.hour_s % {DAY_S} AS day_s, {sums},
                   SUM(e.energy_uj * COALESCE(f.g_per_uj, 0)) AS by_hour_g
            FROM nodes n
            {source}
            LEFT JOIN {d.temp}factors f ON f.hour_s = e.hour_s
            WHERE e.hour_s >= :start_s AND e.hour_s < :end_s
            GROUP BY n.run_id, day_s
        )
        SELECT s.run_id, s.day_s, s.energy_uj, s.cpu_uj, s.dram_uj, s.gpu_uj, s.other_uj,
               s.estimated_uj,
               CASE WHEN df.g_per_uj IS NULL THEN s.by_hour_g
                    ELSE CAST(s.energy_uj AS DOUBLE PRECISION) * df.g_per_uj END
        FROM days s LEFT JOIN {d.temp}day_factors df ON df.day_s = s.day_s
    """,
        params,
    )
    if fast and not fast_apart:
        # the runs inside one day of one factor, from their totals
        rows += ledger.query(
            f"""
            SELECT {d.run_id}, r.run_start_ns / {DAY_NS} * {DAY_S}, r.energy_uj,
                   r.cpu_energy_uj, r.dram_energy_uj, r.gpu_energy_uj, r.other_energy_uj,
                   r.estimated_energy_uj, r.energy_uj * df.g_per_uj
            FROM job_runs r
            {d.fixed_join} {d.temp}day_factors df
                ON df.day_s = r.run_start_ns / {DAY_NS} * {DAY_S}
            WHERE r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {filt}
              AND {INSIDE} AND {ONE_DAY} AND r.energy_uj > 0
        """,
            params,
        )
    # a run and day of no energy (hourly rows of 0 uJ) gives no row, whichever way it is read
    rows = [row for row in rows if row[2]]
    # In an order of values, not of row ids (which differ between backends); rows equal in
    # every value but the run id add up the same in any order.
    return sorted(settled(rows, 8), key=lambda r: r[1:])


def energy_by_hour(
    ledger: Ledger,
    start_ns: int,
    end_ns: int,
    account: str | None = None,
    *,
    rollups: bool = True,
) -> list[tuple]:
    """(hour_s, energy_uj) of the jobs' energy over the period, for the carbon provenance."""
    params, filt = _params(ledger, start_ns, end_ns, account)
    source, _ = _energy_source(ledger, rollups)
    return ledger.query(
        f"""
        WITH {_nodes_cte(ledger, filt)}
        SELECT e.hour_s, SUM(e.energy_uj) FROM nodes n
        {source}
        WHERE e.hour_s >= :start_s AND e.hour_s < :end_s
        GROUP BY e.hour_s ORDER BY e.hour_s
    """,
        params,
    )


IDLE_COLUMNS = (
    "run_id",
    "idle_gpus",
    "allocated_gpus",
    "idle_energy_uj",
    "idle_gpu_s",
    "unresolved_gpus",
)


def idle_gpus(
    ledger: Ledger,
    start_ns: int,
    end_ns: int,
    idle_w: float,
    account: str | None = None,
    *,
    rollups: bool = True,
    fast_apart: bool = False,
) -> list[tuple]:
    """Per run: allocated GPUs whose average power over the job on that node was below
    ``idle_w`` watts, their energy inside the period (uJ) and their GPU-seconds in it.

    A GPU is judged over the whole job on its node (not only the part inside the period), so
    that a job crossing the month's end is judged once, the same way in both months. Only
    GPUs named by device key (``nvml:GPU-...``, as the energy rows) are judged; an entry
    without one (a Slurm index the node could not resolve, or a slice from before llem
    resolved them) is counted in ``unresolved_gpus``, never called idle.

    From the roll-up ``job_node_gpus`` (one row per job node and GPU: its total and its first
    and last hour), the energy inside the period is the total when all its hours lie in the
    period; only the GPUs of job nodes that cross the period's bounds read raw rows.

    ``fast_apart`` (with :func:`uses_gpu_floor` only): leave out the runs of :data:`NOT_IDLE`,
    whose rows the caller makes from :func:`runs`' ``idle_w`` columns
    (``llem.report.frames.idle_frame``).
    """
    if fast_apart and not uses_gpu_floor(ledger, rollups):
        raise ValueError("fast_apart needs job_runs.gpu_floor_w (uses_gpu_floor)")
    params, filt = _params(ledger, start_ns, end_ns, account)
    params["idle_w"] = idle_w
    return ledger.query(_idle_sql(ledger, filt, rollups, apart=fast_apart), params)


IDLE_MARGIN = 1.000001
"""A run whose least-used GPU averaged ``idle_w`` times this or more is judged without
reading its GPUs: the margin covers the float rounding between ``gpu_floor_w`` and the
judgement's own arithmetic, so that no GPU is judged differently either way."""


def uses_gpu_floor(ledger: Ledger, rollups: bool = True) -> bool:
    """Whether runs without a possibly idle GPU are judged from ``job_runs`` alone (the
    roll-ups asked for, and a ledger with ``job_runs.gpu_floor_w``: schema 11)."""
    return rollups and ledger.has_column("job_runs", "gpu_floor_w")


NOT_IDLE = f"({INSIDE} AND (r.gpu_floor_w IS NULL OR r.gpu_floor_w >= :idle_w * {IDLE_MARGIN}))"
"""The run ``r`` lies inside the period and none of its GPUs averaged less than the idle
threshold over its job node: none is idle (``job_runs.gpu_floor_w``), its row of
:func:`idle_gpus` is its counts from ``job_runs``."""


def _idle_sql(
    ledger: Ledger, filt: str, rollups: bool, totals: bool = False, apart: bool = False
) -> str:
    """The idle-GPU statement of :func:`idle_gpus`; ``totals``: one row of the period's
    integer sums (idle energy in uJ, idle GPU time in ns, unresolved GPUs) instead of one
    row per run; ``apart``: without the rows of the runs of :data:`NOT_IDLE`.

    With schema 11, only runs that may have an idle GPU (or cross the period's bounds) have
    their GPUs read; the others (:data:`NOT_IDLE`: 88 % of a month's runs with GPUs on the
    bench ledger) give their counts from ``job_runs``."""
    d = ledger.dialect
    in_period = (
        "(SELECT COALESCE(SUM(e.energy_uj), 0) FROM job_energy e "
        "WHERE e.job_node_id = {node} AND e.device_key = {device} "
        "AND e.hour_s >= :start_s AND e.hour_s < :end_s)"
    )
    source = f"nodes n, {d.json_items('n.gpus', 'g')}"
    if uses_rollups(ledger, rollups):
        # one look-up per GPU (a LEFT JOIN in an order both backends read the same way)
        source = (
            f"nodes n CROSS JOIN {d.json_items('n.gpus', 'g')} LEFT JOIN job_node_gpus x "
            "ON x.job_node_id = n.node_id AND x.device_key = g.value"
        )
        raw = in_period.format(node="x.job_node_id", device="x.device_key")
        gpu_sums = f"""
                   COALESCE(x.energy_uj, 0) AS total_uj,
                   CASE WHEN x.energy_uj IS NULL THEN 0
                        WHEN x.first_hour_s >= :start_s AND x.last_hour_s < :end_s
                        THEN x.energy_uj ELSE {raw} END AS period_uj,"""
    else:
        gpu_sums = f"""
                   (SELECT COALESCE(SUM(e.energy_uj), 0) FROM job_energy e
                     WHERE e.job_node_id = n.node_id AND e.device_key = g.value) AS total_uj,
                   {in_period.format(node="n.node_id", device="g.value")} AS period_uj,"""
    floor = uses_gpu_floor(ledger, rollups)
    per_run = """
        SELECT run_id, cluster, job_id, run_start_ns, SUM(idle) AS idle_gpus,
               COUNT(*) AS allocated, SUM(CASE WHEN idle = 1 THEN period_uj ELSE 0 END) AS idle_uj,
               SUM(CASE WHEN idle = 1 THEN overlap_ns ELSE 0 END) AS idle_ns,
               SUM(1 - resolved) AS unresolved
        FROM judged GROUP BY run_id, cluster, job_id, run_start_ns"""
    if floor and not apart:
        per_run += f"""
        UNION ALL
        SELECT {d.run_id}, r.cluster, r.job_id, r.run_start_ns, 0, r.gpu_count, 0, 0,
               r.unresolved_gpus
        FROM job_runs r
        WHERE r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {filt}
          AND r.gpu_count > 0 AND {NOT_IDLE}"""
    if totals:
        last = """
        SELECT SUM(idle_uj), SUM(idle_ns), SUM(unresolved) FROM per_run"""
    else:
        last = f"""
        SELECT run_id, idle_gpus, allocated, idle_uj, idle_ns / {SECONDS}, unresolved
        FROM per_run ORDER BY cluster, job_id, run_start_ns"""
    return f"""
        WITH {_nodes_cte(ledger, filt, exclude=NOT_IDLE if floor else "")},
        gpu AS (
            SELECT n.run_id, n.cluster, n.job_id, n.run_start_ns, n.overlap_ns,
                   (n.end_ns - n.start_ns) / {SECONDS} AS span_s,{gpu_sums}
                   CASE WHEN {d.position("':'", "g.value")} > 0 THEN 1 ELSE 0 END
                       AS resolved
            FROM {source}
        ),
        judged AS (
            SELECT *, CASE WHEN resolved = 1 AND total_uj < :idle_w * span_s * 1000000
                           THEN 1 ELSE 0 END AS idle
            FROM gpu
        ),
        per_run AS ({per_run}
        ){last}
    """


NODE_HOUR_COLUMNS = (
    "node",
    "component",
    "source",
    "measured_uj",
    "attributed_uj",
    "remainder_uj",
    "intervals",
    "gap_intervals",
    "covered_ns",
    "hours",
    "device_hours",
    "idle_unallocated_uj",
    "unallocated_uj",
)


def node_hours(ledger: Ledger, start_ns: int, end_ns: int) -> list[tuple]:
    """The nodes' own hourly totals over the period, per node and component.

    Walks the primary key node by node (cluster, node, hour range): through the
    ``node_hours_by_hour`` index every row is a random look-up into the table, 10x slower.
    """
    params = _period(start_ns, end_ns)  # no run is read: no floor to look up
    # The labelled parts of the remainder: NULL in rows merged from older slices (SUM skips
    # them), and absent from a ledger that ``llem aggregate`` has not migrated yet.
    labelled = ", ".join(
        f"SUM(h.{c})" if ledger.has_column("node_hours", c) else "NULL"
        for c in ("idle_unallocated_uj", "unallocated_uj")
    )
    return ledger.query(
        f"""
        SELECT h.node, h.component, h.source, SUM(h.measured_uj), SUM(h.attributed_uj),
               SUM(h.remainder_uj), SUM(h.intervals), SUM(h.gap_intervals),
               SUM(h.covered_ns), COUNT(DISTINCT h.hour_s), COUNT(*), {labelled}
        FROM (SELECT DISTINCT cluster, node FROM devices) d
        {ledger.dialect.fixed_join} node_hours h ON h.cluster = d.cluster AND h.node = d.node
             AND h.hour_s >= :start_s AND h.hour_s < :end_s
        GROUP BY h.node, h.component, h.source
        ORDER BY h.node, h.component, h.source
    """,
        params,
    )


def job_nodes_in_period(ledger: Ledger, start_ns: int, end_ns: int) -> list[str]:
    """Nodes that ran a job overlapping the period: the nodes with a node run whose time
    overlaps it.

    A run is its node runs grouped (``ledger.group_runs``: it starts with its first and ends
    with its last), so such a node run belongs to a run overlapping the period and starts no
    earlier than the earliest of those runs (``first``, from ``job_runs``). Each node is then
    looked up through ``job_nodes_by_node`` (node, start_ns) among its node runs starting
    between ``first`` and the period's end, latest first: a node that ran a job in the
    period usually answers at the first it reads, and one that did not reads only its node
    runs of that span, never its whole history. The distinct nodes come one index step each.
    On the 10,000,000-job PostgreSQL ledger 0.3 s, against 2.2 s (4 s of the server's CPU)
    for a join of the period's runs to their node runs (``docs/performance.md``).
    """
    params, filt = _params(ledger, start_ns, end_ns, None)
    return [
        r[0]
        for r in ledger.query(
            f"""
        WITH RECURSIVE nodes(node) AS (
            SELECT MIN(node) FROM job_nodes
            UNION ALL
            SELECT (SELECT MIN(jn.node) FROM job_nodes jn WHERE jn.node > nodes.node)
            FROM nodes WHERE nodes.node IS NOT NULL
        ),
        bound AS (
            -- "+ 0": not the time index read from the ledger's first run until one ends
            -- in the period (9,008,081 runs on the 10M ledger), but the period's runs
            SELECT MIN(r.run_start_ns + 0) AS first
            FROM job_runs r WHERE r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {filt}
        )
        SELECT n.node FROM nodes n
        WHERE n.node IS NOT NULL AND (
            SELECT 1 FROM job_nodes jn
            WHERE jn.node = n.node AND jn.start_ns >= (SELECT first FROM bound)
              AND jn.start_ns < :end_ns AND jn.end_ns > :start_ns AND jn.end_ns > jn.start_ns
            ORDER BY jn.node DESC, jn.start_ns DESC LIMIT 1
        ) IS NOT NULL
        ORDER BY n.node
    """,
            params,
        )
    ]


# -- a period's totals by aggregates (the change table's previous period) ---------------------

PERIOD_SUMS = (
    "energy_uj",
    "cpu_uj",
    "dram_uj",
    "gpu_uj",
    "other_uj",
    "estimated_uj",
    "gpu_runs_energy_uj",
)
"""The integer sums per clock hour of :func:`period_totals`' ``energy_by_hour``."""


def _one_factor(g_per_uj_by_hour: Mapping[int, float], start_s: int, end_s: int) -> bool:
    """Whether every clock hour in ``[start_s, end_s)`` (the hours that a run :data:`INSIDE`
    the period may have energy in) has a carbon factor, the same in every one: an annual
    intensity over a month, whose PUE is one figure."""
    first = -(-start_s // HOUR_S) * HOUR_S
    factors = {g_per_uj_by_hour.get(hour_s) for hour_s in range(first, end_s, HOUR_S)}
    return len(factors) == 1 and None not in factors


def period_totals(
    ledger: Ledger,
    start_ns: int,
    end_ns: int,
    idle_w: float,
    account: str | None = None,
    *,
    rollups: bool = True,
    g_per_uj_by_hour: Mapping[int, float] | None = None,
) -> dict:
    """The period's totals over all its runs as integer sums, no per-run row fetched.

    Returns a dict: ``runs``, ``users``, ``accounts`` (distinct, a missing or empty name
    counting as one), ``incomplete_runs``, ``node_ns``, ``gpu_ns`` (integer nanoseconds),
    ``coverage`` (sorted ``(coverage, overlap_ns)`` pairs: the runs' time inside the period
    per coverage value, for the time-weighted coverage), ``energy_by_hour`` (sorted
    ``(hour_s, *PERIOD_SUMS)``: integer microjoules per clock hour, for CO2e with each
    hour's factor), ``platform_runs`` (runs with energy of another component than cpu, dram
    and gpu), ``idle_uj``, ``idle_gpu_ns`` and ``unresolved_gpus``.

    ``g_per_uj_by_hour``: the carbon factors the caller applies to ``energy_by_hour``. With
    them, a run inside one UTC day of one factor (:func:`_fast`) is read from its totals in
    ``job_runs`` and counted whole in the hour it started (the same CO2e: every hour of its
    day has that factor), and where every hour of the period has the same factor
    (:func:`_one_factor`: a month of an annual intensity), so is every run inside the
    period: only the runs across its bounds are summed from their node runs' roll-ups (on
    the 10,000,000-job ledger 3,400 runs of a month instead of 52,000). Without them every
    run's energy is summed from the roll-ups hour by hour.

    Every figure is an integer sum or count: both backends give the same numbers whatever
    order they add rows in, and a float is made once from each (by the caller).
    """
    params, filt = _params(ledger, start_ns, end_ns, account)
    d = ledger.dialect
    out: dict = {}
    runs_where = f"r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns {filt}"
    # the distinct (user, account) pairs first, then the names among them: a hash of a few
    # hundred pairs instead of sorting every run's names twice (on a month of the 10M-job
    # PostgreSQL ledger 0.52 s against 1.09 s)
    (count, users, accounts), *_ = ledger.query(
        f"""
        SELECT COALESCE(SUM(runs), 0), COUNT(DISTINCT user_name), COUNT(DISTINCT account_name)
        FROM (SELECT {_named("r.user")} AS user_name, {_named("r.account")} AS account_name,
                     COUNT(*) AS runs
              FROM job_runs r WHERE {runs_where}
              GROUP BY {_named("r.user")}, {_named("r.account")}) pairs
    """,
        params,
    )
    out.update(runs=int(count), users=int(users), accounts=int(accounts))
    node_ns, gpu_ns = _node_ns(ledger, rollups)
    by_coverage = ledger.query(
        f"""
        WITH per_run AS (
            SELECT r.coverage AS coverage, r.status AS status,
                   {d.greatest}(0, {d.least}(r.run_end_ns, :end_ns)
                       - {d.greatest}(r.run_start_ns, :start_ns)) AS overlap_ns,
                   {node_ns} AS node_ns, {gpu_ns} AS gpu_ns
            FROM job_runs r
            WHERE {runs_where}
        )
        SELECT coverage, SUM(overlap_ns), SUM(node_ns), SUM(gpu_ns),
               SUM(CASE WHEN status = 'complete' THEN 0 ELSE 1 END)
        FROM per_run GROUP BY coverage
    """,
        params,
    )
    out["node_ns"] = sum(int(r[2]) for r in by_coverage)
    out["gpu_ns"] = sum(int(r[3]) for r in by_coverage)
    out["incomplete_runs"] = sum(int(r[4]) for r in by_coverage)
    out["coverage"] = sorted((r[0], int(r[1])) for r in by_coverage if r[0] is not None)

    fast, whole_period = "", False
    if g_per_uj_by_hour is not None and uses_run_spans(ledger, rollups):
        # every hour a run inside the period may have energy in has the same factor: every
        # such run is read whole, and only the runs across the period's bounds are summed
        whole_period = _one_factor(g_per_uj_by_hour, params["start_s"], params["end_s"])
        if whole_period:
            fast = INSIDE
        else:
            load_day_factors(ledger, g_per_uj_by_hour)
            fast = _fast(ledger)
    source, sums = _energy_source(ledger, rollups, few=whole_period)
    other = (
        "e.other_uj"
        if uses_rollups(ledger, rollups)
        else ("CASE WHEN e.component NOT IN ('cpu', 'dram', 'gpu') THEN e.energy_uj ELSE 0 END")
    )
    nodes = _nodes_cte(ledger, filt, exclude=fast)
    hours = ledger.query(
        f"""
        WITH {nodes},
        flagged AS (
            -- a run's GPU flag beside each of its node runs (a window, not a join of the
            -- CTE with its own aggregate: PostgreSQL estimates the CTE at one row and
            -- nested-looped that join, 850,000 x 400,000 on a 10,000,000-job ledger)
            SELECT node_id, CASE WHEN SUM({d.json_length("gpus")} * overlap_ns)
                                 OVER (PARTITION BY run_id) > 0 THEN 1 ELSE 0 END AS gpu_run
            FROM nodes
        )
        SELECT e.hour_s, {sums},
               SUM(CASE WHEN n.gpu_run = 1 THEN e.energy_uj ELSE 0 END)
        FROM flagged n
        {source}
        WHERE e.hour_s >= :start_s AND e.hour_s < :end_s
        GROUP BY e.hour_s
    """,
        params,
    )
    if fast:
        hours += ledger.query(
            f"""
            SELECT r.run_start_ns / {HOUR_NS} * {HOUR_S}, SUM(r.energy_uj),
                   SUM(r.cpu_energy_uj), SUM(r.dram_energy_uj), SUM(r.gpu_energy_uj),
                   SUM(r.other_energy_uj), SUM(r.estimated_energy_uj),
                   SUM(CASE WHEN r.gpu_ns > 0 THEN r.energy_uj ELSE 0 END)
            FROM job_runs r
            WHERE {runs_where} AND {fast}
            GROUP BY r.run_start_ns / {HOUR_NS} * {HOUR_S}
        """,
            params,
        )
    by_hour: dict[int, list[int]] = {}
    for row in hours:
        values = [int(v) for v in row[1:]]
        have = by_hour.get(int(row[0]))
        by_hour[int(row[0])] = values if have is None else [a + b for a, b in zip(have, values)]
    out["energy_by_hour"] = sorted((hour, *values) for hour, values in by_hour.items())
    out["platform_runs"] = 0
    if sum(row[PERIOD_SUMS.index("other_uj") + 1] for row in out["energy_by_hour"]):
        # a second pass, only where some run has platform energy (rows are never negative)
        (platform,), *_ = ledger.query(
            f"""
            WITH {nodes}
            SELECT COUNT(DISTINCT n.run_id) FROM nodes n
            {source}
            WHERE e.hour_s >= :start_s AND e.hour_s < :end_s AND {other} > 0
        """,
            params,
        )
        out["platform_runs"] = int(platform)
        if fast:
            (platform,), *_ = ledger.query(
                f"SELECT COUNT(*) FROM job_runs r WHERE {runs_where} AND {fast} "
                "AND r.other_energy_uj > 0",
                params,
            )
            out["platform_runs"] += int(platform)
    (idle_uj, idle_ns, unresolved), *_ = ledger.query(
        _idle_sql(ledger, filt, rollups, totals=True), {**params, "idle_w": idle_w}
    )
    out.update(
        idle_uj=int(idle_uj or 0),
        idle_gpu_ns=int(idle_ns or 0),
        unresolved_gpus=int(unresolved or 0),
    )
    return out
