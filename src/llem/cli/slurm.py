"""``llem prolog``, ``llem epilog``, ``llem epilog-slurmctld``: entry points of the Slurm hooks'
slow path (:mod:`llem.node.hooks`). No click: they start on every job. ``-h``/``--help`` is
answered before anything else runs; any other argument is refused (the hooks pass none)."""

from __future__ import annotations

import os

from llem.node.hooks import _guarded, epilog_body, prolog_body, slurmctld_epilog_body

_HOW_RUN = {
    "prolog": "Slurm's Prolog runs it, as root, through slurm/prolog.sh",
    "epilog": "Slurm's Epilog runs it, as root, through slurm/epilog.sh",
    "epilog-slurmctld": "Slurm's EpilogSlurmctld runs it, as root on the controller, through "
    "slurm/epilog-slurmctld.sh",
}


def _parse_args(kind: str, main, argv: list[str] | None) -> None:
    """Answer ``-h``/``--help`` (exit 0) and refuse any other argument (exit 2), before the
    hook does anything. The hooks pass no argument: that path costs no argparse import."""
    if not argv:
        return
    from llem.cli import argument_parser

    summary = (main.__doc__ or "").split(":", 1)[-1].strip()
    argument_parser(
        prog=f"llem {kind}",
        description=summary[:1].upper() + summary[1:],
        epilog=f"{_HOW_RUN[kind]}, with the job's Slurm variables in its environment, and "
        "takes no argument. It then always exits 0; problems go to stderr and to the "
        "node's problems.log (llem doctor).",
    ).parse_args(argv)


def slurmctld_epilog_main(argv: list[str] | None = None) -> int:
    """llem epilog-slurmctld: the job's name, nodelist and final state for the ledger."""
    _parse_args("epilog-slurmctld", slurmctld_epilog_main, argv)
    return _guarded("epilog-slurmctld", slurmctld_epilog_body, os.environ)


def prolog_main(argv: list[str] | None = None) -> int:
    """llem prolog: register the job and make sure the node sampler runs (Slurm Prolog)."""
    _parse_args("prolog", prolog_main, argv)
    return _guarded("prolog", prolog_body, os.environ)


def epilog_main(argv: list[str] | None = None) -> int:
    """llem epilog: the job's final reading, sealing and export (Slurm Epilog)."""
    _parse_args("epilog", epilog_main, argv)
    return _guarded("epilog", epilog_body, os.environ)
