"""Every path llem uses, derived from the config in one place.

Per node name (several slurmd may share a host), under ``run_dir``:
``<node>/sampler.lock`` (held by the live sampler for its whole life: the liveness test that
no stale pid file or late-reaped zombie can fool), ``<node>/sampler.pid``, ``<node>/node.lock``
(serialises Prolog, Epilog and the sampler's decision to exit), ``<node>/sampler.sock``,
``<node>/jobs/`` (registrations from the hooks), ``<node>/problems.log``; the node store is
``state_dir/node-<node>.db``; the outbox ``state_dir/outbox``; the aggregator's ``archive`` and
``quarantine`` folders sit in the spool unless configured elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llem.config import Config


@dataclass(frozen=True)
class NodePaths:
    node: str
    run: Path
    store: Path

    @classmethod
    def of(cls, config: Config, node: str) -> NodePaths:
        """The paths of ``node``.

        Raises:
            ValueError: the node name breaks :data:`llem.slices.IDENTIFIER` (``..``, ``/``):
                the same rule as everywhere, so that no name reaches a path unchecked.
        """
        from llem.slices import check_identifier

        check_identifier("node name", node)
        return cls(node, Path(config.run_dir) / node, Path(config.state_dir) / f"node-{node}.db")

    @property
    def sampler_lock(self) -> Path:
        return self.run / "sampler.lock"

    @property
    def pid_file(self) -> Path:
        return self.run / "sampler.pid"

    @property
    def node_lock(self) -> Path:
        return self.run / "node.lock"

    @property
    def socket(self) -> Path:
        return self.run / "sampler.sock"

    @property
    def problems(self) -> Path:
        return self.run / "problems.log"

    @property
    def jobs(self) -> Path:
        """Registrations dropped by the Slurm hooks (root only)."""
        return self.run / "jobs"

    def ensure(self) -> None:
        """Create the run folder: root-owned, traversable (users reach the socket)."""
        from llem.fsutil import ensure_private_dir

        ensure_private_dir(self.run.parent, mode=0o755)
        ensure_private_dir(self.run, mode=0o755)
        os.chmod(self.run, 0o755)
        ensure_private_dir(self.jobs, mode=0o700)


def outbox_dir(config: Config) -> Path:
    """The node-local outbox (default ``STATE_DIR/outbox``)."""
    return Path(config.aggregate.outbox_dir or Path(config.state_dir) / "outbox")


def archive_dir(config: Config) -> Path:
    return Path(config.aggregate.archive_dir or Path(config.spool_dir) / "archive")


def quarantine_dir(config: Config) -> Path:
    return Path(config.aggregate.quarantine_dir or Path(config.spool_dir) / "quarantine")
