"""``llem report``: monthly and per-account energy and emissions reports from the ledger.

Three layers: :mod:`llem.cluster.report_queries` (all SQL), :mod:`llem.report.frames` (pure:
rows -> frames and totals) and :mod:`llem.report.render` / :mod:`llem.report.plots` (formats).
:func:`build_report` ties them: it reads the ledger and the carbon factors once and returns a
:class:`~llem.report.frames.Report` that every format renders.

pandas and matplotlib are optional (``pip install 'llem[report]'``); the compute nodes never
import this package. :func:`require` turns their absence into a clear error.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from llem.errors import LlemError

if TYPE_CHECKING:
    from llem.report.frames import Period, Report

INSTALL_HINT = "pip install 'llem[report]'"


class ReportDependencyError(LlemError):
    """pandas or matplotlib is missing."""


def require(*modules: str) -> None:
    """Import ``modules`` or raise :class:`ReportDependencyError` naming the extra."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ReportDependencyError(f"llem report needs {' and '.join(missing)}: {INSTALL_HINT}")


def build_report(
    ledger,
    config,
    period: Period,
    *,
    account: str | None = None,
    idle_w: float | None = None,
    top_n: int = 20,
    model=None,
    with_previous: bool = True,
    rollups: bool = True,
) -> Report:
    """Compute a report of ``period`` from an open ledger.

    Args:
        ledger: a :class:`llem.cluster.ledger.Ledger` (read-only is enough).
        config: a :class:`llem.config.Config` (carbon and embodied factors, cluster name).
        period: the period; ``frames.month_period`` or ``frames.range_period``.
        account: restrict to one account (per-account statement); no reconciliation then.
        idle_w: idle GPU threshold in watts (default ``frames.DEFAULT_IDLE_W``).
        top_n: rows of the top-jobs and waste tables.
        model: a resolved carbon IntensityModel (default: resolved from ``config``).
        with_previous: also compute the previous period's totals for the change table.
        rollups: read the roll-ups kept at merge time (``llem.cluster.rollups``) where the
            ledger has them; False sums the raw energy rows (the same report, slower: the
            tests and ``bench/bench_report.py --raw`` compare the two).

    Raises:
        ConfigError: the carbon configuration cannot be resolved (unknown region, ...).
        LedgerError: the ledger cannot be read.
    """
    require("pandas")
    from llem import carbon
    from llem.cluster import report_queries as q
    from llem.report import frames

    idle_w = frames.DEFAULT_IDLE_W if idle_w is None else idle_w
    previous = frames.previous_period(period)
    hours = previous.hours() + period.hours() if with_previous else period.hours()
    resolved = carbon.factors(config, model, hours=hours)
    # the report sums energy x factor in SQL: the per-hour factors and embodied rates come
    # from llem.carbon, as every other CO2e figure
    factors = frames.Factors(
        {h: resolved.g_per_uj(h) for h in hours}, resolved.gpu_g_per_hour, resolved.node_g_per_hour
    )
    q.load_hour_factors(ledger, factors.g_per_uj_by_hour)

    # The previous period and the nodes' hourly totals are independent reads: each runs in
    # its own read-only connection and thread (sqlite3 releases the GIL while a query runs),
    # beside the current period's queries on the caller's connection.
    def previous_totals_of(conn) -> dict:
        q.load_hour_factors(conn, factors.g_per_uj_by_hour)
        sums = q.period_totals(
            conn, previous.start_ns, previous.end_ns, idle_w, account, rollups=rollups
        )
        return frames.totals_of_sums(sums, factors)

    def node_rows_of(conn) -> tuple:
        return (
            q.node_hours(conn, period.start_ns, period.end_ns),
            q.job_nodes_in_period(conn, period.start_ns, period.end_ns),
        )

    side = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        if with_previous:
            side["previous"] = pool.submit(_own_connection, ledger.path, previous_totals_of)
        if account is None:
            side["nodes"] = pool.submit(_own_connection, ledger.path, node_rows_of)
        jobs, runs, energy = _jobs(ledger, period, account, idle_w, factors, rollups)
        totals = frames.totals(jobs)
        carbon_fields = _carbon_fields(
            ledger, config, resolved, period, account, energy, totals, rollups
        )
        previous_totals = side["previous"].result() if with_previous else {}
        recon = None
        if account is None:
            node_rows, job_nodes = side["nodes"].result()
            recon = frames.reconciliation(node_rows, job_nodes, totals["energy_kwh"])
    gpu_values = jobs.loc[jobs["gpu_h"] > 0, "kwh_per_gpu_h"].dropna()
    return frames.Report(
        period=period,
        previous=previous,
        cluster=config.cluster,
        account=account,
        totals=totals,
        carbon=carbon_fields,
        groups={key: frames.by_group(jobs, key) for key in frames.GROUP_KEYS},
        top_jobs=frames.top_jobs(jobs, top_n),
        waste=frames.waste(jobs, top_n),
        idle_w=idle_w,
        daily=frames.daily(energy, runs),
        gpu_energy=frames.gpu_energy_distribution(jobs),
        kwh_per_gpu_h=gpu_values.reset_index(drop=True),
        reconciliation=recon,
        change=frames.change(totals, previous_totals),
        previous_totals=previous_totals,
        notes=frames.notes_for(totals, carbon_fields),
    )


def _own_connection(path, body):
    from llem.cluster import report_queries as q

    with q.open_readonly(path) as conn:
        return body(conn)


def _jobs(ledger, period, account, idle_w, factors, rollups=True):
    from llem.cluster import report_queries as q
    from llem.report import frames

    runs = frames.records(
        q.runs(ledger, period.start_ns, period.end_ns, account),
        q.RUN_COLUMNS,
    )
    energy = frames.records(
        q.energy_by_run_day(ledger, period.start_ns, period.end_ns, account, rollups=rollups),
        q.ENERGY_COLUMNS,
    )
    idle = q.idle_gpus(ledger, period.start_ns, period.end_ns, idle_w, account, rollups=rollups)
    # each query's frame is made once: the jobs frame and the daily series share them
    return frames.jobs_frame(runs, energy, idle, factors), runs, energy


def _carbon_fields(ledger, config, resolved, period, account, energy, totals, rollups=True) -> dict:
    """The factors used (region, intensity, source, year, basis, PUE), via carbon.emissions.

    With only an annual intensity, the factors are the same in every hour of a day (PUE
    changes by month, and a UTC day lies in one month), so the day totals already at hand
    give the same provenance; an hourly series needs the hourly totals (one more pass).
    """
    from llem import carbon
    from llem.cluster import report_queries as q

    if resolved.model.hourly is None:
        by_hour: dict[int, float] = {}
        # the energy frame's rows in order, as Python ints (the same float sums as before)
        for day_s, uj in zip(energy["day_s"].tolist(), energy["energy_uj"].tolist()):
            by_hour[day_s] = by_hour.get(day_s, 0.0) + uj / 1e6
    else:
        by_hour = {
            h: uj / 1e6
            for h, uj in q.energy_by_hour(
                ledger, period.start_ns, period.end_ns, account, rollups=rollups
            )
        }
    result = carbon.emissions(
        config, by_hour, gpu_hours=totals["gpu_h"], node_hours=totals["node_h"], resolved=resolved
    )
    fields = dict(result.carbon)
    fields["operational_kg_check"] = result.operational_g / 1000.0
    return fields
