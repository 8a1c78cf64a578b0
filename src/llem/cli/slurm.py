"""``llem prolog``, ``llem epilog``, ``llem epilog-slurmctld``: entry points of the Slurm hooks'
slow path (:mod:`llem.node.hooks`). No click: they start on every job."""

from __future__ import annotations

import os

from llem.node.hooks import _guarded, epilog_body, prolog_body, slurmctld_epilog_body


def slurmctld_epilog_main(argv: list[str] | None = None) -> int:
    """llem epilog-slurmctld: the job's name, nodelist and final state for the ledger."""
    return _guarded("epilog-slurmctld", slurmctld_epilog_body, os.environ)


def prolog_main(argv: list[str] | None = None) -> int:
    """llem prolog: register the job and make sure the node sampler runs (Slurm Prolog)."""
    return _guarded("prolog", prolog_body, os.environ)


def epilog_main(argv: list[str] | None = None) -> int:
    """llem epilog: the job's final reading, sealing and export (Slurm Epilog)."""
    return _guarded("epilog", epilog_body, os.environ)
