"""``llem-acct --statement``: the citable paragraph over the selected runs, and the short
phrase that names a selection in messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llem.acct.options import spec_text
from llem.cluster.acct_queries import TOTAL_COLUMNS
from llem.units import NS_PER_S, UJ_PER_J

if TYPE_CHECKING:
    from llem.acct.options import AcctOptions


def from_epoch(start) -> bool:
    """The window starts at sacct's Epoch 0 (``-j`` alone): it has no start worth naming."""
    return start is not None and start.timestamp() <= 0


def describe_selection(opts: AcctOptions) -> str:
    """A short phrase for messages: ``user alice, 2026-11-01T00:00:00 to now``."""
    f = opts.filter
    parts = []
    for label, values in (
        ("user", f.users),
        ("account", f.accounts),
        ("partition", f.partitions),
        ("state", f.states),
        ("cluster", f.clusters),
        ("node", f.nodes),
    ):
        if values is not None:
            parts.append(f"{label} {','.join(values)}")
    if f.jobs is not None:
        parts.append("job " + ",".join(spec_text(s) for s in f.jobs))
    start, end = opts.window
    if from_epoch(start):
        parts.append(f"up to {end:%Y-%m-%dT%H:%M:%S}")
    elif start is not None:
        parts.append(f"from {start:%Y-%m-%dT%H:%M:%S} to {end:%Y-%m-%dT%H:%M:%S}")
    return ", ".join(parts) or "all jobs"


def describe_window(opts: AcctOptions) -> str:
    """sacct's ``-v`` line: ``Jobs Eligible in the time window from ... to ...``."""
    f = opts.filter
    what = ",".join(f.states) if f.states else "Eligible"
    start, end = opts.window
    if start is None or end is None:
        return f"Jobs {what} at any time"
    begin = "Epoch 0" if from_epoch(start) else start.strftime("%a %b %d %H:%M:%S %Y")
    finish = end.strftime("%a %b %d %H:%M:%S %Y")
    if begin == finish:
        return f"Jobs {what} at the time instant {finish}"
    return f"Jobs {what} in the time window from {begin} to {finish}"


def statement_text(ledger, opts: AcctOptions, config) -> str:
    """The citable paragraph (:func:`llem.carbon.statement`) over the selected runs.

    Energy per clock hour comes from ``job_energy`` (so hourly intensity and monthly PUE
    apply), energy per component and measured/estimated from the runs' totals.
    """
    from llem import carbon
    from llem.cluster import acct_queries as q

    totals = [dict(zip(TOTAL_COLUMNS, r)) for r in q.select_totals(ledger, opts.filter, "month")]
    if not totals:
        return (
            f"No jobs match ({describe_selection(opts)}): nothing to state. Widen the "
            "window with -S or --since, or use -a for all users."
        )
    s = {k: sum((t[k] or 0) for t in totals) for k in TOTAL_COLUMNS[1:]}
    by_hour = {h: uj / UJ_PER_J for h, uj in q.hourly_energy(ledger, opts.filter)}
    gpu_hours = s["gpu_seconds"] / 3600
    node_hours = s["node_ns"] / NS_PER_S / 3600
    em = carbon.emissions(config, by_hour, gpu_hours, node_hours)
    components = {
        "GPU": s["gpu_energy_uj"] / UJ_PER_J,
        "CPU": s["cpu_energy_uj"] / UJ_PER_J,
        "DRAM": s["dram_energy_uj"] / UJ_PER_J,
    }
    if s["other_energy_uj"]:
        components["other"] = s["other_energy_uj"] / UJ_PER_J
    nodes = q.run_nodes(ledger, opts.filter)
    clusters = sorted({c for c, _ in nodes})
    hardware = (
        f"{len(nodes)} node(s) of cluster {', '.join(clusters) or 'n/a'} "
        f"({gpu_hours:,.1f} GPU-hours, {node_hours:,.1f} node-hours)"
    )
    return carbon.statement(
        energy_j_by_component=components,
        measured_j=(s["energy_uj"] - s["estimated_energy_uj"]) / UJ_PER_J,
        estimated_j=s["estimated_energy_uj"] / UJ_PER_J,
        hardware=hardware,
        co2e_g=em.co2e_g,
        operational_g=em.operational_g,
        embodied_g=em.embodied_g,
        carbon=em.carbon,
        subject=f"The {s['njobs']} job run(s) ({describe_selection(opts)})",
    )
