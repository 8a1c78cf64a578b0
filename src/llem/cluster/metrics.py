"""Cluster metrics from the ledger, for Prometheus (``llem metrics``).

Run on the admin node, next to ``llem aggregate`` (a timer, or cron), it writes a textfile for
the admin node's node_exporter (or prints it): energy and operational CO2e of finished jobs
per account and partition, as counters that grow as the aggregator merges slices; the
ledger's job runs by status; and the aggregator's health (last pass, slices merged and
quarantined, the spool's backlog and the time of its oldest slice).

Emissions are computed here as ``llem-acct`` computes them: each hour's energy x PUE x the
grid intensity of that hour, from the configured tables or intensity file; an online
provider is never called (hours it would cover get the annual figure). ``llem_carbon_info``
names the source, year, basis and PUE. A change of factors recomputes the whole counter,
which Prometheus then sees as a reset.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from llem.exposition import Exposition

UJ_PER_J = 1_000_000


@dataclass(frozen=True)
class SpoolState:
    slices: int
    oldest_mtime_s: float | None


def spool_state(spool: Path) -> SpoolState:
    """Slices waiting at the top of the spool, listed as the aggregator lists them (dot
    files are still being written; archive and quarantine are folders), and the oldest."""
    from llem.cluster.aggregate import SKIP_DIRS

    count, oldest = 0, None
    try:
        with os.scandir(spool) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in SKIP_DIRS:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue
                count += 1
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
    except FileNotFoundError:
        pass
    return SpoolState(count, oldest)


def cluster_exposition(config, ledger, spool: SpoolState, passes) -> str:
    """The text exposition of the cluster metrics."""
    from llem import carbon
    from llem.cluster import metrics_queries as q

    cluster = config.cluster
    energy: dict[tuple[str, str, str], int] = {}
    hourly: dict[tuple[str, str], dict[int, float]] = {}
    for row in q.energy_by_account_hour(ledger, cluster):
        key = (row.account, row.partition, row.source)
        energy[key] = energy.get(key, 0) + row.energy_uj
        hours = hourly.setdefault((row.account, row.partition), {})
        hours[row.hour_s] = hours.get(row.hour_s, 0.0) + row.energy_uj / UJ_PER_J
    model = carbon.resolve(config)
    co2e = {
        key: carbon.operational(hours, model, config.carbon.pue)[0] for key, hours in hourly.items()
    }
    pue = config.carbon.pue
    pue_text = f"{float(pue):g}" if not isinstance(pue, dict) else "by month"
    annual = model.annual
    source = annual.source + (f"; hourly: {model.hourly.source}" if model.hourly else "")

    out = Exposition()
    out.add(
        "llem_account_energy_joules_total",
        [((cluster, a, p, s), uj / UJ_PER_J) for (a, p, s), uj in sorted(energy.items())],
    )
    out.add(
        "llem_account_co2e_grams_total",
        [((cluster, a, p), round(g, 6)) for (a, p), g in sorted(co2e.items())],
    )
    out.add(
        "llem_carbon_info", [((model.region, source, str(annual.year), annual.basis, pue_text), 1)]
    )
    by_status = q.job_runs_by_status(ledger, cluster)
    out.add(
        "llem_ledger_jobs",
        [((cluster, s), by_status.get(s, 0)) for s in ("complete", "pending", "incomplete")],
    )
    if passes is not None:
        out.add("llem_aggregate_last_pass_timestamp_seconds", [((), passes.last_end_s)])
        out.add("llem_aggregate_last_pass_duration_seconds", [((), passes.last_duration_s)])
        out.add("llem_aggregate_passes_total", [((), passes.passes_total)])
        out.add("llem_aggregate_slices_merged_total", [((), passes.merged_total)])
    out.add("llem_aggregate_slices_quarantined_total", [((), q.quarantined_slices(ledger))])
    out.add("llem_spool_slices", [((), spool.slices)])
    if spool.oldest_mtime_s is not None:
        out.add("llem_spool_oldest_slice_timestamp_seconds", [((), round(spool.oldest_mtime_s, 3))])
    return out.text()


def collect(config, ledger_path: str | os.PathLike | None = None) -> str:
    """Open the ledger read-only and build the exposition.

    Raises:
        LedgerError: no ledger, unreadable, or a newer schema.
        ConfigError: an unknown carbon region or a bad intensity file.
    """
    from llem.cluster.acct_queries import open_ledger
    from llem.cluster.pass_status import read_pass_status

    spool = spool_state(Path(config.spool_dir))
    ledger = open_ledger(ledger_path or config.ledger)
    try:
        return cluster_exposition(config, ledger, spool, read_pass_status(config))
    finally:
        ledger.close()
