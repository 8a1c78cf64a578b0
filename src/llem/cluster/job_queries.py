"""The SQL of ``llem job JOBID``: one job run, its nodes, devices, windows and power series.

Read-only, the same SQL on both backends (:mod:`llem.cluster.dialect`); every list comes
out in an order of its own values, never in the order a database happened to return rows.
On a ledger not yet migrated to ``_v4_work_and_power`` the windows have no work
and there is no power series (the view says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

RUN_FIELDS = (
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
    "status",
    "missing_nodes",
    "energy_uj",
    "estimated_energy_uj",
    "gpu_seconds",
    "coverage",
)


@dataclass
class JobNode:
    """One node of the run: its span, coverage, flags, attribution and devices."""

    node: str
    start_ns: int
    end_ns: int
    coverage: float | None
    flags: list[str]
    gpus: list[str]
    attribution: dict | None
    devices: dict[str, dict] = field(default_factory=dict)
    """device key -> {component, name, source, sensor, energy_uj, methods: {method: uJ}}."""


@dataclass
class JobData:
    """What the ledger holds of one job run."""

    run: dict
    runs: int
    nodes: list[JobNode]
    windows: list[dict]
    power: list[tuple[str, str, int, int, int, int]]
    """(node, device key, t_s, step_s, energy_uj, span_ms), by time."""
    has_power_table: bool
    hourly_uj: dict[int, int] = field(default_factory=dict)
    """The run's energy per UTC hour (epoch second of the hour), all nodes."""


def _columns(names) -> str:
    """Column names for SQL: ``user`` quoted (in PostgreSQL, bare ``user`` is the session's
    login, not the column)."""
    return ", ".join(f'"{n}"' if n == "user" else n for n in names)


def _has(ledger, table: str, column: str | None = None) -> bool:
    """Whether the ledger (SQLite or PostgreSQL) has the table, or its column."""
    if column is None:
        return bool(ledger.columns(table))
    return ledger.has_column(table, column)


def _visible(visible) -> tuple[str, tuple]:
    """`` AND (...)``: the runs ``visible`` (a :class:`llem.cluster.acct_queries.Visibility`)
    lets the caller see, as in ``llem-acct`` through the gateway; nothing for None."""
    if visible is None:
        return "", ()
    sql = "uid = ?"
    if visible.accounts:
        sql += f" OR account IN ({', '.join('?' * len(visible.accounts))})"
    return f" AND ({sql})", (visible.uid, *visible.accounts)


def job_ids_of_array(ledger, cluster: str, job_id: str, visible=None) -> str:
    """``123_4`` (an array task) -> the task's own job id, when the ledger knows it."""
    if "_" not in job_id:
        return job_id
    array, task = job_id.split("_", 1)
    restrict, params = _visible(visible)
    rows = ledger.query(
        "SELECT job_id FROM job_runs WHERE cluster = ? AND array_job_id = ? AND array_task_id = ?"
        f"{restrict} ORDER BY run_start_ns DESC LIMIT 1",
        (cluster, array, task, *params),
    )
    return rows[0][0] if rows else job_id


def clusters_of_job(ledger, job_id: str, visible=None) -> list[str]:
    """The clusters whose ledger rows hold a job ``job_id`` (or array task ``A_T``); with
    ``visible``, only where the caller may see it."""
    restrict, params = _visible(visible)
    if "_" in job_id:
        array, task = job_id.split("_", 1)
        rows = ledger.query(
            "SELECT DISTINCT cluster FROM job_runs WHERE array_job_id = ? AND array_task_id = ?"
            + restrict,
            (array, task, *params),
        )
    else:
        rows = ledger.query(
            "SELECT DISTINCT cluster FROM job_runs WHERE job_id = ?" + restrict,
            (job_id, *params),
        )
    return sorted(r[0] for r in rows)


def load_job(ledger, cluster: str, job_id: str, visible=None) -> JobData | None:
    """The latest run of ``job_id`` on ``cluster`` with its nodes, windows and power series;
    None when the ledger has no such job (with ``visible``, a
    :class:`llem.cluster.acct_queries.Visibility`: none the caller may see; the gateway's
    privacy, the same rule as ``llem-acct``'s)."""
    job_id = job_ids_of_array(ledger, cluster, job_id, visible)
    restrict, params = _visible(visible)
    runs = ledger.query(
        f"SELECT {_columns(RUN_FIELDS)} FROM job_runs WHERE cluster = ? AND job_id = ?"
        f"{restrict} ORDER BY run_start_ns DESC",
        (cluster, job_id, *params),
    )
    if not runs:
        return None
    run = dict(zip(RUN_FIELDS, runs[0]))
    has_attribution = _has(ledger, "job_nodes", "attribution")
    rows = ledger.query(
        "SELECT id, node, start_ns, end_ns, coverage, flags, gpus, "
        + ("attribution" if has_attribution else "NULL")
        + " FROM job_nodes WHERE cluster = ? AND job_id = ? AND run_start_ns = ? ORDER BY node",
        (cluster, job_id, run["run_start_ns"]),
    )
    nodes: list[JobNode] = []
    ids: dict[int, JobNode] = {}
    for jid, node, start_ns, end_ns, coverage, flags, gpus, attribution in rows:
        jn = JobNode(
            node,
            start_ns,
            end_ns,
            coverage,
            _json_list(flags),
            _json_list(gpus),
            _json_dict(attribution),
        )
        nodes.append(jn)
        ids[jid] = jn
    if not ids:
        return JobData(run, len(runs), [], [], [], _has(ledger, "job_power"))
    marks = ", ".join("?" * len(ids))
    described = {
        (node, key): (component, name, source, sensor)
        for node, key, component, name, source, sensor in ledger.query(
            "SELECT node, device_key, component, name, source, sensor FROM devices "
            f"WHERE cluster = ? AND node IN ({', '.join('?' * len(nodes))})",
            (cluster, *[n.node for n in nodes]),
        )
    }
    for jid, key, method, component, source, sensor, uj in ledger.query(
        # one description per (device, method): the smallest, on either backend
        "SELECT job_node_id, device_key, method, MIN(component), MIN(source), MIN(sensor), "
        f"SUM(energy_uj) FROM job_energy WHERE job_node_id IN ({marks}) GROUP BY 1, 2, 3 "
        "ORDER BY 1, 2, 3",
        tuple(ids),
    ):
        jn = ids[jid]
        name = described.get((jn.node, key), (None, key))[1] or key
        dev = jn.devices.setdefault(
            key,
            {
                "component": component,
                "name": name,
                "source": source,
                "sensor": sensor,
                "energy_uj": 0,
                "methods": {},
            },
        )
        dev["energy_uj"] += uj
        dev["methods"][method] = dev["methods"].get(method, 0) + uj
    has_work = _has(ledger, "windows", "work")
    windows = [
        {
            "node": ids[jid].node,
            "name": name,
            "step_id": step_id,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "status": status,
            "energy_uj": energy_uj,
            "energy": _json_dict(energy) or {},
            "work": work,
            "unit": unit,
        }
        for jid, name, step_id, start_ns, end_ns, status, energy_uj, energy, work, unit in (
            ledger.query(
                "SELECT job_node_id, name, step_id, start_ns, end_ns, status, energy_uj, energy, "
                + ("work, unit" if has_work else "NULL, NULL")
                + f" FROM windows WHERE job_node_id IN ({marks})",
                tuple(ids),
            )
        )
    ]
    windows.sort(key=lambda w: (w["start_ns"], w["name"], w["step_id"], w["node"]))
    power: list = []
    has_power = _has(ledger, "job_power")
    if has_power:
        for jid, step_s, devices, points in ledger.query(
            f"SELECT job_node_id, step_s, devices, points FROM job_power WHERE job_node_id IN ({marks})",
            tuple(ids),
        ):
            keys = _json_list(devices)
            for point in _json_list(points):
                try:
                    t_s, i, uj, span_ms = point
                    power.append((ids[jid].node, keys[i], int(t_s), step_s, int(uj), int(span_ms)))
                except (ValueError, TypeError, IndexError):
                    continue  # a damaged point is left out, not guessed
        power.sort(key=lambda p: (p[2], p[0], p[1]))
    hourly = dict(
        ledger.query(
            f"SELECT hour_s, SUM(energy_uj) FROM job_energy WHERE job_node_id IN ({marks}) "
            "GROUP BY hour_s ORDER BY hour_s",
            tuple(ids),
        )
    )
    return JobData(run, len(runs), nodes, windows, power, has_power, hourly)


def _json_list(text: str | None) -> list:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _json_dict(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
