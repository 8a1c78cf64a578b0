"""The report's roll-ups: sums of ``job_energy`` kept beside it at merge time, on both backends.

``llem report`` sums a month's energy rows (one per device, clock hour and method of every
job node): on a large ledger that is tens of millions of rows a month. Two smaller tables
hold what the report needs of them, defined by the SQL below (:func:`hours_select`,
:func:`gpus_select`):

* ``job_node_hours``: per job node and clock hour, the energy by component (CPU, DRAM, GPU,
  other), the estimated part and the total. The devices collapse, the clock hour stays, so
  the per-hour carbon factors apply as on the raw rows (operational CO2e is a per-hour sum).
* ``job_node_gpus``: per job node and allocated GPU (a device key listed in the job node's
  ``gpus``), its energy over the whole job on that node and its first and last clock hour,
  for the idle-GPU judgement (a GPU is judged over the whole job on its node; its energy
  inside a period is the total when its hours all lie in the period, else the raw rows').

Both are keyed by the job node and change only with it: a merge that inserts a job node
inserts its roll-up rows from its energy rows (:func:`rows_of`, on the rows the merge holds),
and a job node replaced by a newer export takes its roll-up rows with it
(SQLite: ``ON DELETE CASCADE``; PostgreSQL: the merge's delete of the rows that name a
replaced job node). A slice merged again changes nothing, so nothing is counted twice;
runs regrouped (a requeue, a late header) do not touch them, as they name no run. The same
SELECTs fill them in the migration (a site upgrading keeps its history), rebuild them
(:func:`rebuild_sqlite`, ``PgLedger.rebuild_rollups``, ``tests/helpers/make_ledger.py``) and
check them (:func:`checks`, ``llem ledger check``): roll-ups equal a rebuild from the raw rows,
which is what proves the merge's :func:`rows_of` gives what the SQL gives.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from llem.cluster.dialect import POSTGRESQL, SQLITE, Dialect

HOURS_TABLE = "job_node_hours"
GPUS_TABLE = "job_node_gpus"
TABLES = (HOURS_TABLE, GPUS_TABLE)
HOURS_COLUMNS = (
    "job_node_id",
    "hour_s",
    "energy_uj",
    "cpu_uj",
    "dram_uj",
    "gpu_uj",
    "other_uj",
    "estimated_uj",
)
GPUS_COLUMNS = ("job_node_id", "device_key", "energy_uj", "first_hour_s", "last_hour_s")


def hours_select(where: str = "1 = 1") -> str:
    """``job_node_hours``' rows computed from ``job_energy e`` rows matching ``where``."""
    return f"""
        SELECT e.job_node_id AS job_node_id, e.hour_s AS hour_s, SUM(e.energy_uj) AS energy_uj,
               SUM(CASE WHEN e.component = 'cpu' THEN e.energy_uj ELSE 0 END) AS cpu_uj,
               SUM(CASE WHEN e.component = 'dram' THEN e.energy_uj ELSE 0 END) AS dram_uj,
               SUM(CASE WHEN e.component = 'gpu' THEN e.energy_uj ELSE 0 END) AS gpu_uj,
               SUM(CASE WHEN e.component NOT IN ('cpu', 'dram', 'gpu')
                        THEN e.energy_uj ELSE 0 END) AS other_uj,
               SUM(CASE WHEN e.source = 'estimated' THEN e.energy_uj ELSE 0 END)
                   AS estimated_uj
        FROM job_energy e WHERE {where}
        GROUP BY e.job_node_id, e.hour_s
    """


def gpus_select(dialect: Dialect, where: str = "1 = 1") -> str:
    """``job_node_gpus``' rows computed from the job nodes ``jn`` and their energy rows ``e``
    matching ``where``: the rows of the devices the job node lists among its GPUs."""
    return f"""
        SELECT e.job_node_id AS job_node_id, e.device_key AS device_key,
               SUM(e.energy_uj) AS energy_uj, MIN(e.hour_s) AS first_hour_s,
               MAX(e.hour_s) AS last_hour_s
        FROM job_nodes jn {dialect.fixed_join} job_energy e ON e.job_node_id = jn.id
        WHERE {where} AND EXISTS (SELECT 1 FROM {dialect.json_items("jn.gpus", "g")}
                                  WHERE g.value = e.device_key)
        GROUP BY e.job_node_id, e.device_key
    """


def insert_sql(table: str, select: str) -> str:
    """``INSERT`` of ``select``'s rows into a roll-up (or a month partition of one)."""
    columns = GPUS_COLUMNS if table == GPUS_TABLE else HOURS_COLUMNS
    return f"INSERT INTO {table} ({', '.join(columns)}) {select}"


_PART = {"cpu": 1, "dram": 2, "gpu": 3}


def rows_of(energy, gpus: Iterable[str]) -> tuple[list[list], list[list]]:
    """The roll-up rows of one job node from its energy rows as ``ledger.prepare`` makes them
    ((device, hour_s, method, component, source, sensor, energy_uj), in any order, duplicate
    keys included: the ledger sums those) and its allocated GPUs (the job's ``gpus``):
    (``job_node_hours`` rows, ``job_node_gpus`` rows), each without the leading
    ``job_node_id``.

    Row by row in Python on the rows at hand, in the reader processes: computing them back
    from the table was a quarter of the merge's time. It gives what :func:`hours_select` and
    :func:`gpus_select` give (``llem ledger check`` and the tests compare them)."""

    hours: dict[int, list] = {}
    gpus = set(gpus)
    by_gpu: dict[str, list] = {}
    for device, hour_s, _method, component, source, _sensor, uj in energy:
        row = hours.get(hour_s)
        if row is None:
            row = hours[hour_s] = [hour_s, 0, 0, 0, 0, 0, 0]
        row[1] += uj
        row[1 + _PART.get(component, 4)] += uj
        if source == "estimated":
            row[6] += uj
        if device in gpus:
            g = by_gpu.get(device)
            if g is None:
                by_gpu[device] = [device, uj, hour_s, hour_s]
            else:
                g[1] += uj
                g[2] = min(g[2], hour_s)
                g[3] = max(g[3], hour_s)
    return list(hours.values()), list(by_gpu.values())


# -- SQLite ----------------------------------------------------------------------------------

SQLITE_DDL = """
    CREATE TABLE IF NOT EXISTS job_node_hours (
        job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
        hour_s INTEGER NOT NULL, energy_uj INTEGER NOT NULL, cpu_uj INTEGER NOT NULL,
        dram_uj INTEGER NOT NULL, gpu_uj INTEGER NOT NULL, other_uj INTEGER NOT NULL,
        estimated_uj INTEGER NOT NULL,
        PRIMARY KEY (job_node_id, hour_s)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS job_node_gpus (
        job_node_id INTEGER NOT NULL REFERENCES job_nodes (id) ON DELETE CASCADE,
        device_key TEXT NOT NULL, energy_uj INTEGER NOT NULL,
        first_hour_s INTEGER NOT NULL, last_hour_s INTEGER NOT NULL,
        PRIMARY KEY (job_node_id, device_key)
    ) WITHOUT ROWID;
"""

SQLITE_MERGE = (
    "INSERT INTO job_node_hours VALUES (last_insert_rowid(), ?, ?, ?, ?, ?, ?, ?)",
    "INSERT INTO job_node_gpus VALUES (last_insert_rowid(), ?, ?, ?, ?)",
)
"""The roll-up rows of the job node just inserted (``last_insert_rowid()``: inserts into
``WITHOUT ROWID`` tables, as these, leave it alone), from :func:`rows_of`."""


def rebuild_sqlite(db: sqlite3.Connection) -> None:
    """Empty and refill both roll-ups from every job node's energy rows (set-based)."""
    for table in TABLES:
        db.execute(f"DELETE FROM {table}")
    db.execute(insert_sql(HOURS_TABLE, hours_select()))
    db.execute(insert_sql(GPUS_TABLE, gpus_select(SQLITE)))


# -- PostgreSQL ------------------------------------------------------------------------------


def pg_ddl(text: str) -> str:
    """The PostgreSQL tables: ``job_node_hours`` partitioned by month on ``hour_s`` as
    ``job_energy`` is (retention drops its partitions with ``job_energy``'s), no foreign
    keys (the merge deletes a replaced job node's rows, as for ``job_energy``)."""
    return f"""
        CREATE TABLE IF NOT EXISTS job_node_hours (
            job_node_id BIGINT NOT NULL, hour_s BIGINT NOT NULL, energy_uj BIGINT NOT NULL,
            cpu_uj BIGINT NOT NULL, dram_uj BIGINT NOT NULL, gpu_uj BIGINT NOT NULL,
            other_uj BIGINT NOT NULL, estimated_uj BIGINT NOT NULL,
            PRIMARY KEY (job_node_id, hour_s)
        ) PARTITION BY RANGE (hour_s);
        CREATE TABLE IF NOT EXISTS job_node_gpus (
            job_node_id BIGINT NOT NULL, device_key {text} NOT NULL,
            energy_uj BIGINT NOT NULL, first_hour_s BIGINT NOT NULL,
            last_hour_s BIGINT NOT NULL,
            PRIMARY KEY (job_node_id, device_key)
        );
    """


def rebuild_pg(cur, month_partitions: list[tuple[str, str]]) -> None:
    """Empty and refill both roll-ups on PostgreSQL: ``job_node_hours`` month by month (each
    ``job_energy`` partition into its twin, already created: ``month_partitions`` holds
    (job_energy partition, job_node_hours partition) pairs), ``job_node_gpus`` at once."""
    cur.execute("TRUNCATE job_node_hours, job_node_gpus")
    for energy_part, hours_part in month_partitions:
        cur.execute(
            insert_sql(hours_part, hours_select()).replace(
                "FROM job_energy e", f"FROM {energy_part} e"
            )
        )
    cur.execute(insert_sql(GPUS_TABLE, gpus_select(POSTGRESQL)))


# -- checks (llem ledger check) ------------------------------------------------------------------


def checks(dialect: Dialect) -> tuple[tuple[str, str], ...]:
    """(problem, SQL naming the rows that have it): roll-up rows of no job node, and roll-ups
    that differ from a rebuild.

    Job nodes that started before ``:cut_ns`` (hourly rows dropped by retention) are not
    checked: their GPU totals keep the dropped hours."""
    hours_cols = ", ".join(f"h.{c}" for c in HOURS_COLUMNS)
    gpus_cols = ", ".join(f"x.{c}" for c in GPUS_COLUMNS)
    kept = "SELECT id FROM job_nodes WHERE start_ns >= :cut_ns"
    rebuilt_hours = hours_select(f"e.job_node_id IN ({kept})")
    rebuilt_gpus = gpus_select(dialect, "jn.start_ns >= :cut_ns")
    kept_hours = f"SELECT {hours_cols} FROM job_node_hours h WHERE h.job_node_id IN ({kept})"
    kept_gpus = f"SELECT {gpus_cols} FROM job_node_gpus x WHERE x.job_node_id IN ({kept})"
    return (
        (
            "hourly roll-up row of no job node",
            "SELECT h.job_node_id, h.hour_s, 0 FROM job_node_hours h WHERE NOT EXISTS "
            "(SELECT 1 FROM job_nodes jn WHERE jn.id = h.job_node_id)",
        ),
        (
            "GPU roll-up row of no job node",
            "SELECT x.job_node_id, x.device_key, 0 FROM job_node_gpus x WHERE NOT EXISTS "
            "(SELECT 1 FROM job_nodes jn WHERE jn.id = x.job_node_id)",
        ),
        (
            "hourly roll-up row differs from a rebuild from job_energy",
            f"SELECT d.job_node_id, d.hour_s, d.energy_uj FROM ({kept_hours} EXCEPT "
            f"{rebuilt_hours}) d UNION ALL SELECT d.job_node_id, d.hour_s, d.energy_uj "
            f"FROM ({rebuilt_hours} EXCEPT {kept_hours}) d",
        ),
        (
            "GPU roll-up row differs from a rebuild from job_energy",
            f"SELECT d.job_node_id, d.device_key, d.energy_uj FROM ({kept_gpus} EXCEPT "
            f"{rebuilt_gpus}) d UNION ALL SELECT d.job_node_id, d.device_key, d.energy_uj "
            f"FROM ({rebuilt_gpus} EXCEPT {kept_gpus}) d",
        ),
    )
