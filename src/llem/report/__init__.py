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
import importlib.util
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from llem.errors import LlemError

if TYPE_CHECKING:
    from llem.report.frames import Period, Report

INSTALL_HINT = "pip install 'llem[report]'"


class ReportDependencyError(LlemError):
    """pandas or matplotlib is missing."""


def require(*modules: str, load: bool = True) -> None:
    """Import ``modules`` or raise :class:`ReportDependencyError` naming the extra.

    ``load`` False only checks that they are installed (no import: pandas and matplotlib
    take about a second of CPU, which :func:`build_report` spends beside the ledger's
    queries); an import that fails later raises the same error (:func:`_imported`).
    """
    missing = [name for name in modules if not (_imported(name) if load else _installed(name))]
    if missing:
        raise ReportDependencyError(f"llem report needs {' and '.join(missing)}: {INSTALL_HINT}")


def _imported(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: blocked (its import raises)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def preload_plots():
    """Import the plotting side (matplotlib's pyplot, numpy, pandas: about a second of CPU)
    in a background thread, so that it overlaps the ledger queries (SQLite and PostgreSQL
    release the GIL while a query runs). Returns the thread: join it before plotting or
    leaving."""
    import threading

    def load() -> None:
        try:
            from llem.report import plots

            plots._pyplot()
        except Exception:  # noqa: BLE001 - the first plot imports it again and says why
            pass

    thread = threading.Thread(target=load, name="llem-import-plots", daemon=True)
    thread.start()
    return thread


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
    prepare: Callable[[Any], None] | None = None,
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
        prepare: called with each connection that the report opens for itself (its side
            reads, on the ledger's path) before it reads: ``llem serve`` bounds their time
            as it bounds ``ledger``'s (a caller's report must not outlast the gateway's
            ``query_timeout_s`` on any connection).

    Raises:
        ConfigError: the carbon configuration cannot be resolved (unknown region, ...).
        LedgerError: the ledger cannot be read.
    """
    require("pandas", load=False)
    from llem import carbon
    from llem.cluster import report_queries as q
    from llem.report.period import previous_period

    idle_w = q.DEFAULT_IDLE_W if idle_w is None else idle_w
    previous = previous_period(period)
    hours = previous.hours() + period.hours() if with_previous else period.hours()
    resolved = carbon.factors(config, model, hours=hours)
    # the report sums energy x factor in SQL (the energy per run and day, the only statement
    # that reads temp.factors): the per-hour factors and embodied rates come from
    # llem.carbon, as every other CO2e figure
    g_per_uj = resolved.g_per_uj_by_hour(hours)
    start_ns, end_ns = period.start_ns, period.end_ns

    # Every read but the runs runs in its own read-only connection and thread (SQLite and
    # PostgreSQL release the GIL while a query runs), longest first, while this thread
    # reads the runs and then imports pandas: the queries and the imports overlap instead
    # of following each other.
    def previous_sums_of(conn) -> dict:
        return q.period_totals(
            conn,
            previous.start_ns,
            previous.end_ns,
            idle_w,
            account,
            rollups=rollups,
            g_per_uj_by_hour=g_per_uj,
        )

    # the runs inside one day of one factor have their energy rows made from the runs' read
    # (frames.energy_frame), not read a second time
    apart = q.uses_run_spans(ledger, rollups)
    # and the runs without a possibly idle GPU have their idle-GPU rows made from it too
    # (frames.idle_frame)
    idle_apart = apart and q.uses_gpu_floor(ledger, rollups)

    def energy_of(conn) -> list[tuple]:
        q.load_hour_factors(conn, g_per_uj)
        return q.energy_by_run_day(
            conn, start_ns, end_ns, account, rollups=rollups, fast_apart=apart
        )

    def idle_of(conn) -> list[tuple]:
        return q.idle_gpus(
            conn, start_ns, end_ns, idle_w, account, rollups=rollups, fast_apart=idle_apart
        )

    def node_rows_of(conn) -> tuple:
        return q.node_hours(conn, start_ns, end_ns), q.job_nodes_in_period(conn, start_ns, end_ns)

    reads = {"previous": previous_sums_of} if with_previous else {}
    reads.update(energy=energy_of, idle=idle_of)
    if account is None:
        reads["nodes"] = node_rows_of
    # two side reads at a time: on the 10,000,000-job PostgreSQL ledger (every statement with
    # PostgreSQL's own parallel workers, two cores) all four at once took 74 s, two 70-74 s
    # (mean 72), one 80 s; on SQLite (1,000,000 jobs) two, three and four gave 4.2-4.8 s
    with ThreadPoolExecutor(max_workers=2) as pool:
        side = {
            name: pool.submit(_own_connection, ledger.path, read, prepare)
            for name, read in reads.items()
        }
        try:
            run_rows = q.runs(
                ledger,
                start_ns,
                end_ns,
                account,
                rollups=rollups,
                fast_energy=apart,
                idle_w=idle_w if idle_apart else None,
            )
            frames = _frames()
            factors = frames.Factors(g_per_uj, resolved.gpu_g_per_hour, resolved.node_g_per_hour)
            # each query's frame is made once: the jobs frame and the daily series share them
            fast = (q.FAST_COLUMNS if apart else ()) + (q.FAST_IDLE_COLUMNS if idle_apart else ())
            runs = frames.records(run_rows, q.RUN_COLUMNS + fast, frames.NUMBERS)
            del run_rows
            if apart:
                energy = frames.energy_frame(
                    side["energy"].result(), runs, q.uniform_days(g_per_uj)
                )
            else:
                energy = frames.records(side["energy"].result(), q.ENERGY_COLUMNS)
            if idle_apart:
                idle = frames.idle_frame(side["idle"].result(), runs)
            else:
                idle = frames.records(side["idle"].result(), q.IDLE_COLUMNS)
            runs = runs.drop(columns=list(fast))
            jobs = frames.jobs_frame(runs, energy, idle, factors)
            totals = frames.totals(jobs)
            carbon_fields = _carbon_fields(
                ledger, config, resolved, period, account, energy, totals, rollups
            )
            previous_totals = (
                frames.totals_of_sums(side["previous"].result(), factors) if with_previous else {}
            )
            recon = None
            if account is None:
                node_rows, job_nodes = side["nodes"].result()
                recon = frames.reconciliation(node_rows, job_nodes, totals["energy_kwh"])
        finally:
            for future in side.values():
                future.cancel()
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


def _own_connection(path, body, prepare=None):
    from llem.cluster import report_queries as q

    with q.open_readonly(path) as conn:
        if prepare is not None:
            prepare(conn)
        return body(conn)


def _frames():
    """:mod:`llem.report.frames` (which imports pandas), or the error naming the extra."""
    try:
        from llem.report import frames
    except ImportError:
        require("pandas")  # says which module is missing
        raise
    return frames


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
