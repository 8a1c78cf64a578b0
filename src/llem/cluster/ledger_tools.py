"""Moving and checking a ledger, on either backend: ``llem ledger copy`` and ``llem ledger check``.

:func:`copy_ledger` copies every table of one ledger into another (SQLite to PostgreSQL, or
back), in primary-key order, a chunk per transaction, each row inserted unless its key is
there already: a copy stopped anywhere resumes from the last key the destination holds, and
copying again changes nothing. Job node ids are kept, so the rows that name them need no
mapping; the destination must therefore be empty, or a copy of the same source. At the end
the row counts of both ledgers are compared table by table.

:func:`check_ledger` verifies what every merge keeps true: each job node's energy equals its
hourly rows, each run's totals equal its job nodes', and nothing points at a row that is not
there, and that the report's roll-ups (:mod:`llem.cluster.rollups`) equal a rebuild from the
raw energy rows. The copy carries the roll-ups as it carries every table (a source from before
``_v8_report_rollups`` has none: the destination's migration filled them from nothing, so
:func:`copy_ledger` rebuilds them after copying such a source).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llem.cluster import rollups
from llem.errors import LedgerError

CHUNK_ROWS = 20_000
TABLES = (
    ("devices", ("cluster", "node", "device_key")),
    ("job_nodes", ("id",)),
    ("job_energy", ("job_node_id", "device_key", "hour_s", "method")),
    ("job_node_totals", ("job_node_id", "device_key")),
    ("windows", ("job_node_id", "name", "step_id", "start_ns")),
    ("job_power", ("job_node_id",)),
    ("job_steps", ("job_node_id", "step")),
    ("job_node_hours", ("job_node_id", "hour_s")),
    ("job_node_gpus", ("job_node_id", "device_key")),
    ("job_headers", ("cluster", "job_id", "end_ns")),
    ("job_runs", ("cluster", "job_id", "run_start_ns")),
    ("node_hours", ("cluster", "node", "hour_s", "device_key")),
    ("quarantine", ("file", "digest")),
    ("slurm_jobs", ("cluster", "job_id", "start_ns")),
    ("slurm_checks", ("cluster", "job_id")),
)
"""The ledger's tables in the order they are copied (job nodes before the rows naming them),
with their primary keys. A table the source does not have yet (a ledger before the migration
that made it) copies as empty; columns only one side has (such as the windows' ``work`` before
``_v4_work_and_power``) are left out of the copy."""
SOURCE_KEY = "copied_from"


@dataclass
class CopyResult:
    copied: dict[str, int] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _q(column: str) -> str:
    return f'"{column}"' if column == "user" else column


def _count(ledger, table: str) -> int:
    return ledger.query(f"SELECT COUNT(*) FROM {table}")[0][0]


def _meta(ledger, key: str) -> str | None:
    rows = ledger.query("SELECT value FROM meta WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def copy_ledger(
    src,
    dst,
    *,
    source_name: str,
    progress: Callable[[str, int, int], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> CopyResult:
    """Copy the open ledger ``src`` into the open, writable ledger ``dst``.

    Args:
        src: the source (read-only is enough).
        dst: the destination, empty or an earlier (maybe interrupted) copy of ``source_name``.
        source_name: what names the source (its path or connection string, without password),
            recorded in the destination's ``meta`` so that a resumed copy is recognised.
        progress: called with (table, rows done, rows in the table) after each chunk.

    Raises:
        LedgerError: the destination holds another ledger's rows, or the final counts differ.
    """
    t0 = time.monotonic()
    result = CopyResult()
    marker = _meta(dst, SOURCE_KEY)
    if marker is None:
        if any(_count(dst, table) for table, _ in TABLES):
            raise LedgerError(
                "the destination ledger is not empty and is not a copy of this source; "
                "copy into a new ledger"
            )
        dst.write([("INSERT INTO meta VALUES (?, ?)", [(SOURCE_KEY, source_name)])])
    elif marker != source_name:
        raise LedgerError(f"the destination ledger is a copy of {marker}, not of {source_name}")
    for table, key in TABLES:
        if not src.columns(table):
            result.copied[table] = 0
            continue
        total = _count(src, table)
        columns = [c for c in src.columns(table) if c in set(dst.columns(table))]
        cols = ", ".join(_q(c) for c in columns)
        keys = ", ".join(_q(c) for c in key)
        last = dst.query(f"SELECT {keys} FROM {table} ORDER BY {keys} DESC LIMIT 1")
        done = _count(dst, table)
        copied = 0
        after = tuple(last[0]) if last else None
        while True:
            where = f"WHERE ({keys}) >= ({', '.join('?' * len(key))})" if after else ""
            rows = src.query(
                f"SELECT {cols} FROM {table} {where} ORDER BY {keys} LIMIT {chunk_rows}",
                after or (),
            )
            if not rows:
                break
            copied += dst.insert_missing(table, columns, rows)
            key_at = [columns.index(k) for k in key]
            new_after = tuple(rows[-1][i] for i in key_at)
            if progress is not None:
                progress(table, min(total, done + copied), total)
            if len(rows) < chunk_rows or new_after == after:
                break
            after = new_after
        result.copied[table] = copied
    if not src.columns(rollups.HOURS_TABLE) and dst.columns(rollups.HOURS_TABLE):
        dst.rebuild_rollups()  # a source from before the roll-ups: made from the rows copied
    dst.after_copy()
    for table, _ in TABLES:
        result.counts[table] = (
            _count(src, table) if src.columns(table) else 0,
            _count(dst, table),
        )
    rebuilt = set() if src.columns(rollups.HOURS_TABLE) else set(rollups.TABLES)
    wrong = {t: c for t, c in result.counts.items() if c[0] != c[1] and t not in rebuilt}
    if wrong:
        raise LedgerError(
            "row counts differ after the copy: "
            + ", ".join(f"{t} {a} in the source, {b} in the copy" for t, (a, b) in wrong.items())
        )
    result.elapsed_s = time.monotonic() - t0
    return result


# -- invariants ------------------------------------------------------------------------------

CHECKS = (
    (
        "job node energy differs from its hourly rows",
        "SELECT jn.cluster, jn.job_id, jn.node FROM job_nodes jn LEFT JOIN "
        "(SELECT job_node_id, SUM(energy_uj) AS uj FROM job_energy GROUP BY job_node_id) e "
        "ON e.job_node_id = jn.id WHERE jn.start_ns >= :cut_ns "
        "AND jn.energy_uj != COALESCE(e.uj, 0)",
    ),
    (
        "run totals differ from its job nodes'",
        "SELECT r.cluster, r.job_id, r.run_start_ns FROM job_runs r LEFT JOIN "
        "(SELECT cluster, job_id, run_start_ns, SUM(energy_uj) AS uj, COUNT(DISTINCT node) AS n "
        "FROM job_nodes GROUP BY cluster, job_id, run_start_ns) jn "
        "ON jn.cluster = r.cluster AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns "
        "WHERE r.energy_uj != COALESCE(jn.uj, 0) OR r.nodes_reported != COALESCE(jn.n, 0)",
    ),
    (
        "job node belongs to no run",
        "SELECT jn.cluster, jn.job_id, jn.node FROM job_nodes jn WHERE NOT EXISTS "
        "(SELECT 1 FROM job_runs r WHERE r.cluster = jn.cluster AND r.job_id = jn.job_id "
        "AND r.run_start_ns = jn.run_start_ns)",
    ),
    (
        "hourly energy row of no job node",
        "SELECT e.job_node_id, e.device_key, e.hour_s FROM job_energy e WHERE NOT EXISTS "
        "(SELECT 1 FROM job_nodes jn WHERE jn.id = e.job_node_id)",
    ),
    (
        "device total of no job node",
        "SELECT t.job_node_id, t.device_key, 0 FROM job_node_totals t WHERE NOT EXISTS "
        "(SELECT 1 FROM job_nodes jn WHERE jn.id = t.job_node_id)",
    ),
    (
        "window of no job node",
        "SELECT w.job_node_id, w.name, w.start_ns FROM windows w WHERE NOT EXISTS "
        "(SELECT 1 FROM job_nodes jn WHERE jn.id = w.job_node_id)",
    ),
    (
        "power series of no job node",
        "SELECT p.job_node_id, p.step_s, 0 FROM job_power p WHERE NOT EXISTS "
        "(SELECT 1 FROM job_nodes jn WHERE jn.id = p.job_node_id)",
    ),
    (
        "step of no job node",
        "SELECT s.job_node_id, s.step, 0 FROM job_steps s WHERE NOT EXISTS "
        "(SELECT 1 FROM job_nodes jn WHERE jn.id = s.job_node_id)",
    ),
    (
        "energy row of a device the node never described",
        "SELECT jn.node, e.device_key, MIN(e.hour_s) FROM job_energy e "
        "JOIN job_nodes jn ON jn.id = e.job_node_id WHERE NOT EXISTS "
        "(SELECT 1 FROM devices d WHERE d.cluster = jn.cluster AND d.node = jn.node "
        "AND d.device_key = e.device_key) GROUP BY jn.node, e.device_key",
    ),
)
"""(problem, SQL naming the rows that have it); ``:cut_ns``: hourly rows dropped by retention
before this time are not expected."""
NEEDS = {"power series of no job node": "job_power", "step of no job node": "job_steps"}
"""Checks of a table a ledger before its migration lacks (skipped there)."""
MAX_NAMED = 20


def run_figure_checks(ledger) -> list[tuple[str, str]]:
    """(problem, SQL) pairs: runs and job nodes whose figures that ``llem report`` reads
    instead of the job nodes and GPU roll-ups (``report_queries.INSIDE``, ``NOT_IDLE``)
    differ from a recomputation; for the columns the ledger has (schema 10 and 11)."""
    d = ledger.dialect
    gpus = d.json_length("gpus")
    out = []
    if ledger.has_column("job_runs", "node_ns"):
        out.append(
            (
                "run node time, GPU time or energy by component differs from its job nodes'",
                "SELECT r.cluster, r.job_id, r.run_start_ns FROM job_runs r LEFT JOIN "
                "(SELECT cluster, job_id, run_start_ns, SUM(end_ns - start_ns) AS node_ns, "
                f"SUM({gpus} * (end_ns - start_ns)) AS gpu_ns, SUM(cpu_energy_uj) AS cpu, "
                "SUM(dram_energy_uj) AS dram, SUM(gpu_energy_uj) AS gpu, "
                "SUM(other_energy_uj) AS other, SUM(estimated_energy_uj) AS est "
                "FROM job_nodes GROUP BY cluster, job_id, run_start_ns) jn "
                "ON jn.cluster = r.cluster AND jn.job_id = r.job_id "
                "AND jn.run_start_ns = r.run_start_ns "
                "WHERE r.node_ns != COALESCE(jn.node_ns, 0) OR r.gpu_ns != COALESCE(jn.gpu_ns, 0) "
                "OR r.cpu_energy_uj != COALESCE(jn.cpu, 0) "
                "OR r.dram_energy_uj != COALESCE(jn.dram, 0) "
                "OR r.gpu_energy_uj != COALESCE(jn.gpu, 0) "
                "OR r.other_energy_uj != COALESCE(jn.other, 0) "
                "OR r.estimated_energy_uj != COALESCE(jn.est, 0)",
            )
        )
    if ledger.has_column("job_runs", "gpu_floor_w"):
        double = "REAL" if d.name == "sqlite" else "DOUBLE PRECISION"
        resolved = (
            f"(SELECT COUNT(*) FROM {d.json_items('gpus', 'g')} "
            f"WHERE {d.position(chr(39) + ':' + chr(39), 'g.value')} > 0)"
        )
        out.append(
            (
                "run GPU counts or least GPU power differ from its job nodes'",
                "SELECT r.cluster, r.job_id, r.run_start_ns FROM job_runs r LEFT JOIN "
                f"(SELECT cluster, job_id, run_start_ns, SUM({gpus}) AS n, "
                f"SUM({gpus} - {resolved}) AS unresolved, "
                "MIN(CASE WHEN gpu_min_uj IS NOT NULL AND end_ns > start_ns "
                f"THEN CAST(gpu_min_uj * 1000 AS {double}) "
                f"/ CAST(end_ns - start_ns AS {double}) END) AS floor "
                "FROM job_nodes GROUP BY cluster, job_id, run_start_ns) jn "
                "ON jn.cluster = r.cluster AND jn.job_id = r.job_id "
                "AND jn.run_start_ns = r.run_start_ns "
                "WHERE r.gpu_count != COALESCE(jn.n, 0) "
                "OR r.unresolved_gpus != COALESCE(jn.unresolved, 0) "
                f"OR r.gpu_floor_w {d.distinct} jn.floor",
            )
        )
        out.append(
            (
                "job node least GPU energy differs from its GPU roll-up rows",
                "SELECT jn.cluster, jn.job_id, jn.node FROM job_nodes jn "
                f"WHERE jn.gpu_min_uj {d.distinct} (SELECT MIN(COALESCE(x.energy_uj, 0)) "
                f"FROM {d.json_items('jn.gpus', 'g')} LEFT JOIN job_node_gpus x "
                "ON x.job_node_id = jn.id AND x.device_key = g.value "
                f"WHERE {d.position(chr(39) + ':' + chr(39), 'g.value')} > 0)",
            )
        )
    return out


def check_ledger(
    ledger,
    *,
    cut_ns: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """The ledger's broken invariants, one line each (at most :data:`MAX_NAMED` rows named
    per problem); an empty list when it is sound.

    ``progress``: called with (checks done, checks in all, the next check's problem) before
    each check, and once more at the end with an empty problem; each check is one statement
    over a whole table (minutes on a ledger of ten million jobs).
    """
    problems = []
    has_rollups = bool(ledger.columns(rollups.HOURS_TABLE))
    checks = [*CHECKS, *(rollups.checks(ledger.dialect) if has_rollups else ())]
    checks += run_figure_checks(ledger)
    checks = [
        (problem, sql)
        for problem, sql in checks
        if problem not in NEEDS or ledger.columns(NEEDS[problem])
    ]
    for done, (problem, sql) in enumerate(checks):
        if progress is not None:
            progress(done, len(checks), problem)
        rows = ledger.query(sql, {"cut_ns": cut_ns} if ":cut_ns" in sql else ())
        if rows:
            named = "; ".join(" ".join(str(v) for v in r) for r in rows[:MAX_NAMED])
            more = f" (and {len(rows) - MAX_NAMED} more)" if len(rows) > MAX_NAMED else ""
            problems.append(f"{len(rows)} x {problem}: {named}{more}")
    if progress is not None:
        progress(len(checks), len(checks), "")
    return problems
