"""Pure functions: ledger rows (tuples from :mod:`llem.cluster.report_queries`) -> frames.

Nothing here reads the ledger, the configuration or the clock, and nothing prints: every
figure of a report is computed once here, and :mod:`llem.report.render` only formats it, so
the same numbers appear in every format.

Units live in column names: ``_kwh``, ``_kg`` (CO2e), ``_h`` (hours), ``_w`` (watts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd

from llem.cluster import report_queries as q
from llem.cluster.dialect import settle_all
from llem.report.period import (  # noqa: F401 - API
    Period,
    _iso,
    month_period,
    previous_period,
    range_period,
)
from llem.units import UJ_PER_KWH

GROUP_KEYS = ("account", "user", "partition", "tag")
DEFAULT_IDLE_W = q.DEFAULT_IDLE_W
IDLE_DEFINITION = (
    "a GPU allocated to a job counts as idle when its average power over the job's time on "
    "its node (its measured or estimated energy divided by that time) stayed below {w:g} W; "
    "waste is the energy such GPUs drew inside the period. Idle power of data-centre GPUs is "
    "about 30-90 W (A100, H100), busy power 200-700 W."
)
NONE_LABEL = q.NONE_LABEL


@dataclass(frozen=True)
class Factors:
    """Carbon factors the report applies: per-hour grams per microjoule and embodied rates."""

    g_per_uj_by_hour: Mapping[int, float]
    embodied_gpu_g_per_h: float = 0.0
    embodied_node_g_per_h: float = 0.0


NUMBERS: Mapping[str, type] = {
    **dict.fromkeys(
        (
            "run_id",
            "run_start_ns",
            "run_end_ns",
            "num_nodes",
            *q.FAST_COLUMNS,
            *q.FAST_IDLE_COLUMNS,
        ),
        np.int64,
    ),
    **dict.fromkeys(("coverage", "overlap_s", "node_s", "gpu_s"), np.float64),
}
"""The numeric columns of ``report_queries.runs`` by the type their SQL gives them
(``BIGINT``, ``DOUBLE PRECISION``): :func:`records` makes them without looking at each value."""


def records(
    rows: Sequence[tuple] | pd.DataFrame,
    columns: Sequence[str],
    numbers: Mapping[str, type] | None = None,
) -> pd.DataFrame:
    """Rows of a query as a frame with its columns; a frame made already is passed through
    (the report builds each query's frame once and hands it to every function here).

    ``numbers`` (column -> numpy type, :data:`NUMBERS`): the columns that the query types
    as integers or floats, each read straight into an array of that type; a NULL in an
    integer column, and every other column, is left to pandas as ``from_records`` does: the
    same frame, made in 2.2 s against 2.7 s for a month's 822,710 runs of the
    10,000,000-job ledger.
    """
    if isinstance(rows, pd.DataFrame):
        return rows
    if not numbers or not rows:
        return pd.DataFrame.from_records(rows, columns=columns)
    n = len(rows)
    data: dict[str, Any] = {}
    for i, name in enumerate(columns):
        kind = numbers.get(name)
        if kind is not None:
            try:
                data[name] = np.fromiter(map(itemgetter(i), rows), dtype=kind, count=n)
                continue
            except (TypeError, ValueError):  # a NULL in an integer column
                pass
        column = np.empty(n, dtype=object)
        column[:] = list(map(itemgetter(i), rows))
        data[name] = pd.Series(column).infer_objects()
    return pd.DataFrame(data, copy=False)


def energy_frame(
    node_rows: Sequence[tuple], runs: pd.DataFrame, g_per_uj_by_day: Mapping[int, float]
) -> pd.DataFrame:
    """The frame of every row of ``report_queries.energy_by_run_day`` (same rows, values,
    dtypes and order) from its rows read with ``fast_apart`` and the runs frame read with
    ``fast_energy`` (``runs``' :data:`~llem.cluster.report_queries.FAST_COLUMNS`).

    The runs inside the period and one UTC day of one carbon factor (``g_per_uj_by_day``:
    ``report_queries.uniform_days`` of the factors loaded for the read) get one row each,
    computed as the SQL computes it: their totals, and their energy times the day's factor
    (a float product, rounded as the read rounds it: ``dialect.settle_all``). Making them
    here instead of fetching them saves reading the month's runs twice: on the
    10,000,000-job PostgreSQL ledger 770,000 of the month's 872,000 rows
    (``docs/performance.md``).
    """
    parts = [records(node_rows, q.ENERGY_COLUMNS)]
    if len(runs):
        day = runs["fast_day_s"]
        g = day.map(g_per_uj_by_day).to_numpy(dtype=np.float64)
        keep = ~np.isnan(g) & (runs["fast_energy_uj"].to_numpy() > 0)
        fast = {"run_id": runs["run_id"].to_numpy()[keep], "day_s": day.to_numpy()[keep]}
        for column in q.ENERGY_COLUMNS[2:-1]:
            fast[column] = runs[f"fast_{column}"].to_numpy()[keep]
        product = fast["energy_uj"].astype(np.float64) * g[keep]
        fast["operational_g"] = np.array(settle_all(product.tolist()), dtype=np.float64)
        parts.append(pd.DataFrame(fast))
    out = _joined(parts, q.ENERGY_COLUMNS)
    # the order of energy_by_run_day's rows: by every value but the run id
    return out.sort_values(list(q.ENERGY_COLUMNS[1:]), kind="stable").reset_index(drop=True)


def idle_frame(idle_rows: Sequence[tuple], runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``report_queries.idle_gpus`` (the same row per run; :func:`jobs_frame`
    joins them by run id, in any order) from its rows read with ``fast_apart`` and the runs
    frame read with ``idle_w`` (``runs``' :data:`~llem.cluster.report_queries.FAST_IDLE_COLUMNS`).

    A run with GPUs of which none may be idle (``report_queries.NOT_IDLE``) gets the row the
    read would give it: no idle GPU, no idle energy or time, its allocated and unresolved
    GPUs from ``job_runs``.
    """
    parts = [records(idle_rows, q.IDLE_COLUMNS)]
    if len(runs):
        allocated = runs["fast_allocated_gpus"].to_numpy()
        keep = allocated >= 0
        n = int(keep.sum())
        parts.append(
            pd.DataFrame(
                {
                    "run_id": runs["run_id"].to_numpy()[keep],
                    "idle_gpus": np.zeros(n, dtype=np.int64),
                    "allocated_gpus": allocated[keep],
                    "idle_energy_uj": np.zeros(n, dtype=np.int64),
                    "idle_gpu_s": np.zeros(n, dtype=np.float64),
                    "unresolved_gpus": runs["fast_unresolved_gpus"].to_numpy()[keep],
                }
            )
        )
    return _joined(parts, q.IDLE_COLUMNS)


def _joined(parts: Sequence[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """The rows of ``parts`` one after the other (the empty ones left out, so that their
    dtypes do not change the others'); an empty frame of ``columns`` when all are empty."""
    parts = [part for part in parts if len(part)]
    if not parts:
        return records([], columns)
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


# -- jobs --------------------------------------------------------------------------------------


def jobs_frame(
    run_rows: Sequence[tuple] | pd.DataFrame,
    energy_rows: Sequence[tuple] | pd.DataFrame,
    idle_rows: Sequence[tuple] | pd.DataFrame,
    factors: Factors,
) -> pd.DataFrame:
    """One row per job run overlapping the period, with its figures inside the period."""
    runs = records(run_rows, q.RUN_COLUMNS)
    energy = records(energy_rows, q.ENERGY_COLUMNS)
    idle = records(idle_rows, q.IDLE_COLUMNS)
    sums = energy.drop(columns="day_s").groupby("run_id").sum()
    jobs = (
        runs.set_index("run_id").join(sums, how="left").join(idle.set_index("run_id"), how="left")
    )
    numeric = [c for c in q.ENERGY_COLUMNS[2:]] + list(q.IDLE_COLUMNS[1:])
    jobs[numeric] = jobs[numeric].fillna(0)
    # user, account, partition and tag come named already (NONE_LABEL: report_queries.runs)
    out = pd.DataFrame(index=jobs.index)
    for col in (
        "cluster",
        "job_id",
        "user",
        "account",
        "partition",
        "tag",
        "name",
        "state",
        "status",
        "run_start_ns",
        "run_end_ns",
        "num_nodes",
    ):
        out[col] = jobs[col]
    out["energy_kwh"] = jobs["energy_uj"] / UJ_PER_KWH
    for comp in ("cpu", "dram", "gpu", "other"):
        out[f"{comp}_kwh"] = jobs[f"{comp}_uj"] / UJ_PER_KWH
    out["estimated_kwh"] = jobs["estimated_uj"] / UJ_PER_KWH
    out["gpu_h"] = jobs["gpu_s"] / 3600.0
    out["node_h"] = jobs["node_s"] / 3600.0
    out["overlap_h"] = jobs["overlap_s"] / 3600.0
    out["coverage"] = jobs["coverage"]
    out["operational_kg"] = jobs["operational_g"] / 1000.0
    out["embodied_kg"] = (
        out["gpu_h"] * factors.embodied_gpu_g_per_h + out["node_h"] * factors.embodied_node_g_per_h
    ) / 1000.0
    out["co2e_kg"] = out["operational_kg"] + out["embodied_kg"]
    out["kwh_per_gpu_h"] = (out["energy_kwh"] / out["gpu_h"]).where(out["gpu_h"] > 0)
    out["allocated_gpus"] = jobs["allocated_gpus"].astype(int)
    out["idle_gpus"] = jobs["idle_gpus"].astype(int)
    out["idle_kwh"] = jobs["idle_energy_uj"] / UJ_PER_KWH
    out["idle_gpu_h"] = jobs["idle_gpu_s"] / 3600.0
    out["unresolved_gpus"] = jobs["unresolved_gpus"].astype(int)
    return out.reset_index(drop=True)


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def coverage_of(jobs: pd.DataFrame) -> float | None:
    """Time-weighted coverage (share of the jobs' wall time with data), over known values."""
    known = jobs[jobs["coverage"].notna() & (jobs["overlap_h"] > 0)]
    weight = float(known["overlap_h"].sum())
    if not weight:
        return None
    return float((known["coverage"] * known["overlap_h"]).sum() / weight)


def totals(jobs: pd.DataFrame) -> dict[str, Any]:
    """The period's totals over all jobs."""
    total = float(jobs["energy_kwh"].sum())
    estimated = float(jobs["estimated_kwh"].sum())
    gpu_h = float(jobs["gpu_h"].sum())
    return {
        "energy_kwh": total,
        "cpu_kwh": float(jobs["cpu_kwh"].sum()),
        "dram_kwh": float(jobs["dram_kwh"].sum()),
        "gpu_kwh": float(jobs["gpu_kwh"].sum()),
        "other_kwh": float(jobs["other_kwh"].sum()),
        # Jobs' only "other" energy is the platform: what a node meter sees beyond the parts.
        "platform_share": _share(float(jobs["other_kwh"].sum()), total)
        if float(jobs["other_kwh"].sum()) > 0
        else None,
        "platform_jobs": int((jobs["other_kwh"] > 0).sum()),
        "measured_kwh": total - estimated,
        "estimated_kwh": estimated,
        "measured_share": _share(total - estimated, total),
        "operational_kg": float(jobs["operational_kg"].sum()),
        "embodied_kg": float(jobs["embodied_kg"].sum()),
        "co2e_kg": float(jobs["co2e_kg"].sum()),
        "jobs": len(jobs),
        "users": int(jobs["user"].nunique()),
        "accounts": int(jobs["account"].nunique()),
        "gpu_h": gpu_h,
        "node_h": float(jobs["node_h"].sum()),
        "kwh_per_gpu_h": (
            float(jobs.loc[jobs["gpu_h"] > 0, "energy_kwh"].sum()) / gpu_h if gpu_h > 0 else None
        ),
        "coverage": coverage_of(jobs),
        "idle_kwh": float(jobs["idle_kwh"].sum()),
        "idle_gpu_h": float(jobs["idle_gpu_h"].sum()),
        "unresolved_gpus": int(jobs["unresolved_gpus"].sum()),
        "incomplete_jobs": int((jobs["status"] != "complete").sum()),
    }


NS_PER_H = 3600 * 10**9


def totals_of_sums(sums: Mapping[str, Any], factors: Factors) -> dict[str, Any]:
    """:func:`totals`' figures from a period's integer sums
    (:func:`llem.cluster.report_queries.period_totals`), no per-run rows.

    Each energy figure is its integer microjoules converted once (not a sum of per-run
    floats: the same up to the last digits, and the same on both backends); operational
    CO2e is, for each carbon factor of the period's hours, the integer energy of its hours
    times that factor, added in the factors' order. So it does not depend on which hour of
    one factor a run's energy is counted in (``period_totals`` counts a run read whole from
    ``job_runs`` in the hour it started): the same float either way.
    """
    hours = sums["energy_by_hour"]
    uj = [sum(row[i] for row in hours) for i in range(1, len(q.PERIOD_SUMS) + 1)]
    energy, cpu, dram, gpu, other, estimated, gpu_runs_energy = uj
    g_per_uj = factors.g_per_uj_by_hour
    by_factor: dict[float, int] = {}
    for row in hours:
        g = g_per_uj.get(row[0], 0.0)
        by_factor[g] = by_factor.get(g, 0) + row[1]
    operational_g = 0.0
    for g in sorted(by_factor):
        operational_g += by_factor[g] * g
    gpu_h = sums["gpu_ns"] / NS_PER_H
    node_h = sums["node_ns"] / NS_PER_H
    operational = operational_g / 1000.0
    embodied = (
        gpu_h * factors.embodied_gpu_g_per_h + node_h * factors.embodied_node_g_per_h
    ) / 1000.0
    weight = sum(ns for _, ns in sums["coverage"])
    total = energy / UJ_PER_KWH
    return {
        "energy_kwh": total,
        "cpu_kwh": cpu / UJ_PER_KWH,
        "dram_kwh": dram / UJ_PER_KWH,
        "gpu_kwh": gpu / UJ_PER_KWH,
        "other_kwh": other / UJ_PER_KWH,
        "platform_share": _share(other / UJ_PER_KWH, total) if other > 0 else None,
        "platform_jobs": sums["platform_runs"],
        "measured_kwh": (energy - estimated) / UJ_PER_KWH,
        "estimated_kwh": estimated / UJ_PER_KWH,
        "measured_share": _share((energy - estimated) / UJ_PER_KWH, total),
        "operational_kg": operational,
        "embodied_kg": embodied,
        "co2e_kg": operational + embodied,
        "jobs": sums["runs"],
        "users": sums["users"],
        "accounts": sums["accounts"],
        "gpu_h": gpu_h,
        "node_h": node_h,
        "kwh_per_gpu_h": gpu_runs_energy / UJ_PER_KWH / gpu_h if gpu_h > 0 else None,
        "coverage": (sum(c * ns for c, ns in sums["coverage"]) / weight if weight else None),
        "idle_kwh": sums["idle_uj"] / UJ_PER_KWH,
        "idle_gpu_h": sums["idle_gpu_ns"] / NS_PER_H,
        "unresolved_gpus": sums["unresolved_gpus"],
        "incomplete_jobs": sums["incomplete_runs"],
    }


def by_group(jobs: pd.DataFrame, key: str) -> pd.DataFrame:
    """Energy, CO2e, GPU-hours and energy per GPU-hour per value of ``key``, largest first."""
    cols = [
        "energy_kwh",
        "gpu_kwh",
        "other_kwh",
        "estimated_kwh",
        "operational_kg",
        "embodied_kg",
        "co2e_kg",
        "gpu_h",
    ]
    if jobs.empty:
        return pd.DataFrame(
            columns=[
                key,
                "jobs",
                *(c for c in cols if c not in ("estimated_kwh", "other_kwh")),
                "kwh_per_gpu_h",
                "energy_share",
                "measured_share",
                "platform_share",
            ]
        )
    # grouped by the key's integer codes, made once (a groupby on the names themselves
    # factorizes them every time: most of this function's time on 850,000 jobs); the groups
    # and the rows in each come in the same order, so the sums are the same
    codes, labels = pd.factorize(jobs[key], sort=False)
    g = jobs[cols].groupby(codes, sort=False)
    out = g.sum()
    out.insert(0, "jobs", g.size())
    with_gpus = jobs["gpu_h"].to_numpy() > 0
    gpu_energy = jobs["energy_kwh"][with_gpus].groupby(codes[with_gpus]).sum()
    out["kwh_per_gpu_h"] = (gpu_energy.reindex(out.index) / out["gpu_h"]).where(out["gpu_h"] > 0)
    out.index = pd.Index(labels.take(out.index.to_numpy()), name=key)
    total = out["energy_kwh"].sum()
    out["energy_share"] = out["energy_kwh"] / total if total > 0 else 0.0
    out["measured_share"] = (1 - out["estimated_kwh"] / out["energy_kwh"]).where(
        out["energy_kwh"] > 0
    )
    # The platform (node meter minus the parts) in the group's energy; None where no job of
    # the group ran on a node with a meter.
    out["platform_share"] = (out["other_kwh"] / out["energy_kwh"]).where(
        (out["energy_kwh"] > 0) & (out["other_kwh"] > 0)
    )
    out = out.drop(columns=["estimated_kwh", "other_kwh"]).reset_index()
    return out.sort_values(["energy_kwh", key], ascending=[False, True]).reset_index(drop=True)


def top_jobs(jobs: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """The ``n`` jobs with most energy in the period, with their ``llem-acct -j`` command."""
    cols = [
        "job_id",
        "user",
        "account",
        "partition",
        "name",
        "energy_kwh",
        "gpu_kwh",
        "co2e_kg",
        "gpu_h",
        "kwh_per_gpu_h",
        "start",
        "state",
        "command",
    ]
    if jobs.empty:
        return pd.DataFrame(columns=cols)
    if 0 < n < len(jobs):
        # only the jobs that can be among the n largest (ties at the n-th included) are
        # sorted: a sort of every job by energy and id took 2 s on 850,000 jobs
        jobs = jobs[jobs["energy_kwh"] >= jobs["energy_kwh"].nlargest(n, keep="all").min()]
    top = jobs.sort_values(["energy_kwh", "job_id"], ascending=[False, True]).head(n).copy()
    top["start"] = [_iso(ns) for ns in top["run_start_ns"]]
    top["command"] = [f"llem-acct -j {j}" for j in top["job_id"]]
    top["state"] = top["state"].fillna(top["status"])
    return top[cols].reset_index(drop=True)


def waste(jobs: pd.DataFrame, n: int = 20) -> dict[str, pd.DataFrame]:
    """Idle-GPU energy per job (top ``n``), per user and per account."""
    wasted = jobs[jobs["idle_gpus"] > 0]
    out: dict[str, pd.DataFrame] = {}
    job_cols = [
        "job_id",
        "user",
        "account",
        "idle_gpus",
        "allocated_gpus",
        "idle_kwh",
        "idle_gpu_h",
        "gpu_kwh",
        "command",
    ]
    top = (
        wasted.sort_values(["idle_kwh", "idle_gpu_h", "job_id"], ascending=[False, False, True])
        .head(n)
        .copy()
    )
    top["command"] = [f"llem-acct -j {j}" for j in top["job_id"]]
    out["jobs"] = top[job_cols].reset_index(drop=True)
    for key in ("user", "account"):
        cols = [key, "jobs", "idle_gpu_h", "idle_kwh", "gpu_kwh", "idle_share"]
        if wasted.empty:
            out[key] = pd.DataFrame(columns=cols)
            continue
        g = wasted.groupby(key)
        frame = g[["idle_gpu_h", "idle_kwh"]].sum()
        frame.insert(0, "jobs", g.size())
        gpu = jobs.groupby(key)["gpu_kwh"].sum().reindex(frame.index)
        frame["gpu_kwh"] = gpu
        frame["idle_share"] = (frame["idle_kwh"] / gpu).where(gpu > 0)
        out[key] = (
            frame.reset_index()
            .sort_values(["idle_kwh", "idle_gpu_h", key], ascending=[False, False, True])
            .reset_index(drop=True)[cols]
        )
    return out


def daily(
    energy_rows: Sequence[tuple] | pd.DataFrame, jobs_runs: Sequence[tuple] | pd.DataFrame
) -> pd.DataFrame:
    """Energy and operational CO2e per UTC day and account (for the stacked plot)."""
    energy = records(energy_rows, q.ENERGY_COLUMNS)
    if energy.empty:
        return pd.DataFrame(columns=["day", "account", "energy_kwh", "operational_kg"])
    runs = records(jobs_runs, q.RUN_COLUMNS)
    accounts = runs["account"]  # named in SQL (NONE_LABEL: report_queries.runs)
    # each energy row's account by its run id, in the energy rows' order (as a left merge)
    account = energy["run_id"].map(pd.Series(accounts.to_numpy(), index=runs["run_id"]))
    g = (
        energy[["day_s", "energy_uj", "operational_g"]]
        .assign(account=account)
        .groupby(["day_s", "account"])[["energy_uj", "operational_g"]]
        .sum()
        .reset_index()
    )
    g["day"] = pd.to_datetime(g["day_s"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    g["energy_kwh"] = g["energy_uj"] / UJ_PER_KWH
    g["operational_kg"] = g["operational_g"] / 1000.0
    return (
        g[["day", "account", "energy_kwh", "operational_kg"]]
        .sort_values(["day", "account"])
        .reset_index(drop=True)
    )


def gpu_energy_distribution(jobs: pd.DataFrame) -> dict[str, Any]:
    """Quantiles of energy per GPU-hour over jobs with GPUs (kWh per GPU-hour)."""
    values = jobs["kwh_per_gpu_h"].dropna()
    values = values[jobs.loc[values.index, "gpu_h"] > 0]
    if values.empty:
        return {"jobs": 0}
    qs = values.quantile([0.1, 0.5, 0.9])
    return {
        "jobs": len(values),
        "p10": float(qs[0.1]),
        "median": float(qs[0.5]),
        "p90": float(qs[0.9]),
        "max": float(values.max()),
    }


# -- reconciliation ------------------------------------------------------------------------------


def _part_kwh(nodes: pd.DataFrame, column: str) -> float | None:
    values = pd.to_numeric(nodes[column], errors="coerce").dropna()
    return None if values.empty else float(values.sum()) / UJ_PER_KWH


def reconciliation(
    node_rows: Sequence[tuple], job_nodes: Sequence[str], jobs_kwh: float
) -> dict[str, Any]:
    """Node energy measured vs attributed to jobs vs the unattributed remainder, and gaps.

    ``node_rows`` come from the nodes' own hourly totals (``node_hours``); ``job_nodes`` are
    the nodes that ran the period's jobs and ``jobs_kwh`` the jobs' energy in the ledger.
    ``attributed_kwh`` (what the nodes attributed to all jobs) above ``jobs_kwh`` (what job
    slices delivered) means job slices not merged yet.
    """
    nodes = pd.DataFrame.from_records(node_rows, columns=q.NODE_HOUR_COLUMNS)
    by_component = (
        nodes.groupby("component")[["measured_uj", "attributed_uj", "remainder_uj"]].sum()
        / UJ_PER_KWH
    )
    by_component.columns = ["measured_kwh", "attributed_kwh", "remainder_kwh"]
    counted = nodes[nodes["component"] != "psys"]  # a whole-node meter overlaps the parts
    measured = float(counted["measured_uj"].sum()) / UJ_PER_KWH
    per_node = nodes.groupby("node").agg(
        hours=("hours", "max"),
        gap_intervals=("gap_intervals", "sum"),
        intervals=("intervals", "sum"),
        covered_ns=("covered_ns", "sum"),
        device_hours=("device_hours", "sum"),
        measured_uj=("measured_uj", "sum"),
    )
    per_node["covered_share"] = per_node["covered_ns"] / (per_node["device_hours"] * 3600e9)
    # Samplers run while jobs run, so hours without jobs are not covered: only recorded gaps
    # (counter resets, missed intervals) mark a node here; the covered share is shown beside.
    gaps = per_node[per_node["gap_intervals"] > 0]
    gaps = gaps.reset_index()[["node", "hours", "gap_intervals", "intervals", "covered_share"]]
    without = sorted(set(job_nodes) - set(per_node.index))
    return {
        "measured_kwh": measured,
        "attributed_kwh": float(counted["attributed_uj"].sum()) / UJ_PER_KWH,
        "remainder_kwh": float(counted["remainder_uj"].sum()) / UJ_PER_KWH,
        # Parts of the remainder by label; None where no node reported them (older slices).
        "idle_unallocated_kwh": _part_kwh(counted, "idle_unallocated_uj"),
        "unallocated_kwh": _part_kwh(counted, "unallocated_uj"),
        "jobs_kwh": jobs_kwh,
        "nodes": len(per_node),
        "by_component": by_component.reset_index(),
        "nodes_with_gaps": gaps.sort_values(
            ["gap_intervals", "node"], ascending=[False, True]
        ).reset_index(drop=True),
        "nodes_without_totals": without,
    }


# -- change against the previous period ---------------------------------------------------------

CHANGE_KEYS = (
    ("energy_kwh", "Energy (kWh)"),
    ("co2e_kg", "CO2e (kg)"),
    ("jobs", "Jobs"),
    ("gpu_h", "GPU-hours"),
    ("kwh_per_gpu_h", "kWh per GPU-hour"),
    ("idle_kwh", "Idle-GPU energy (kWh)"),
    ("measured_share", "Measured share"),
)


def change(current: Mapping[str, Any], previous: Mapping[str, Any]) -> pd.DataFrame:
    """Current vs previous totals, with the relative change (None where undefined)."""
    rows = []
    for key, label in CHANGE_KEYS:
        cur, prev = current.get(key), previous.get(key)
        rel = None
        if cur is not None and prev not in (None, 0) and not _nan(prev):
            rel = (cur - prev) / abs(prev)
        rows.append({"figure": label, "key": key, "previous": prev, "current": cur, "change": rel})
    return pd.DataFrame(rows, dtype=object)


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Report:
    """Every figure of one report; renderers only format these."""

    period: Period
    previous: Period
    cluster: str
    account: str | None
    totals: dict[str, Any]
    carbon: dict[str, Any]
    groups: dict[str, pd.DataFrame]
    top_jobs: pd.DataFrame
    waste: dict[str, pd.DataFrame]
    idle_w: float
    daily: pd.DataFrame
    gpu_energy: dict[str, Any]
    kwh_per_gpu_h: pd.Series
    reconciliation: dict[str, Any] | None
    change: pd.DataFrame
    previous_totals: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.totals["jobs"] == 0 and not (
            self.reconciliation and self.reconciliation["nodes"]
        )

    @property
    def idle_definition(self) -> str:
        return IDLE_DEFINITION.format(w=self.idle_w)


def notes_for(totals: Mapping[str, Any], carbon: Mapping[str, Any]) -> list[str]:
    """What the reader must know to trust the figures."""
    notes = []
    if totals["jobs"] and totals["measured_share"] == 0:
        notes.append(
            "All job energy in this period is estimated (no energy counters were "
            "available: the estimate model of docs/estimate-model.md); measured "
            "share 0 %."
        )
    elif totals["measured_share"] is not None and totals["measured_share"] < 1:
        notes.append(
            f"{(1 - totals['measured_share']) * 100:.1f} % of the job energy is "
            "estimated, not measured."
        )
    if totals.get("platform_share"):
        notes.append(
            f"{totals['platform_share'] * 100:.1f} % of the job energy is the platform: what "
            "a node meter (pm_counters, an ACPI power meter, the BMC) measures beyond CPU, "
            "DRAM and GPUs (fans, NICs, disks, power-supply losses), charged like static "
            f"power by allocation ({totals['platform_jobs']} of {totals['jobs']} job "
            "run(s) ran on nodes with a meter; jobs on nodes without one carry no platform "
            "energy, so their figures are below wall-plug energy)."
        )
    if totals["incomplete_jobs"]:
        notes.append(
            f"{totals['incomplete_jobs']} job run(s) are pending or incomplete "
            "(some nodes have not reported yet): their energy may still grow."
        )
    if totals.get("unresolved_gpus"):
        notes.append(
            f"{totals['unresolved_gpus']} allocated GPU(s) are known only by Slurm's "
            "index, not by device (slices from before llem resolved GPU identity, "
            "or a node without its gres.conf): they are not judged idle or busy."
        )
    notes.extend(carbon.get("notes") or [])
    return notes
