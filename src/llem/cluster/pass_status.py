"""What the aggregator's passes did, kept for monitoring (``llem metrics``).

Each pass of ``llem aggregate`` rewrites one small JSON file beside the ledger,
``<ledger>.passes.json``, while it still holds the aggregate lock: when the last pass ended,
how long it took, what it merged and quarantined, and running totals over all passes. It is
written atomically (temporary name, rename); losing it loses only monitoring history, never
data, and a failure to write it is logged and never fails the pass.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassStatus:
    last_end_s: float
    last_duration_s: float
    last_merged: int
    last_quarantined: int
    passes_total: int
    merged_total: int


def status_path(config) -> Path:
    """Beside an SQLite ledger; in the state folder of the aggregator's host for a
    PostgreSQL ledger (which has no folder)."""
    from llem.cluster.pg_ledger import is_postgres

    if is_postgres(config.ledger):
        return Path(config.state_dir) / "ledger.passes.json"
    ledger = Path(config.ledger)
    return ledger.with_name(ledger.name + ".passes.json")


def read_pass_status(config) -> PassStatus | None:
    """The recorded status, or None when no pass was recorded (or the file is unreadable)."""
    try:
        data = json.loads(status_path(config).read_text())
        return PassStatus(**{k: data[k] for k in PassStatus.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_pass(config, result, duration_s: float, now_s: float | None = None) -> None:
    """Add one pass to the record (never raises)."""
    from llem.fsutil import write_atomic

    try:
        before = read_pass_status(config)
        status = PassStatus(
            last_end_s=round(time.time() if now_s is None else now_s, 3),
            last_duration_s=round(duration_s, 6),
            last_merged=result.merged,
            last_quarantined=len(result.quarantined),
            passes_total=(before.passes_total if before else 0) + 1,
            merged_total=(before.merged_total if before else 0) + result.merged,
        )
        path = status_path(config)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(
            path.parent, path.name, json.dumps(status.__dict__, sort_keys=True).encode(), mode=0o644
        )
    except Exception as e:  # noqa: BLE001 - monitoring must not fail a merge
        log.warning("could not record the aggregate pass for monitoring: %s", e)
