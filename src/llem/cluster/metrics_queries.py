"""Every SQL statement that ``llem metrics`` runs against the cluster ledger.

Read-only, like :mod:`llem.cluster.acct_queries`: the ledger is opened with
:func:`llem.cluster.acct_queries.open_ledger` and only ``SELECT`` statements run, through
:meth:`llem.cluster.ledger.Ledger.query`.
"""

from __future__ import annotations

from typing import NamedTuple


class HourEnergy(NamedTuple):
    account: str
    partition: str
    source: str
    hour_s: int
    energy_uj: int


def energy_by_account_hour(ledger, cluster: str) -> list[HourEnergy]:
    """Energy of every job node run of ``cluster`` per account, partition, source and hour.

    Jobs with no account or partition get ``''``. The hourly split is what carbon needs.
    """
    rows = ledger.query(
        "SELECT COALESCE(jn.account, ''), COALESCE(jn.partition, ''), e.source, e.hour_s, "
        "SUM(e.energy_uj) FROM job_energy e JOIN job_nodes jn ON jn.id = e.job_node_id "
        "WHERE jn.cluster = ? GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        (cluster,),
    )
    return [HourEnergy(*r) for r in rows]


def job_runs_by_status(ledger, cluster: str) -> dict[str, int]:
    """Job runs of ``cluster`` per status (complete, pending, incomplete)."""
    return dict(
        ledger.query(
            "SELECT status, COUNT(*) FROM job_runs WHERE cluster = ? GROUP BY status", (cluster,)
        )
    )


def quarantined_slices(ledger) -> int:
    """Slices the aggregator refused, as logged in the ledger (one per file and content)."""
    return ledger.query("SELECT COUNT(*) FROM quarantine")[0][0]
