"""Command-line interfaces: thin click commands over the library."""

from __future__ import annotations


def argument_parser(prog: str, description: str, epilog: str | None = None):
    """An argparse parser for the commands that start before click is imported (the Slurm
    hooks' ``llem prolog``/``epilog``/``epilog-slurmctld`` and ``llem sampler``), whose help
    reads like click's: ``Usage: ...``, ``-h``/``--help``.
    """
    import argparse

    class Formatter(argparse.HelpFormatter):
        def add_usage(self, usage, actions, groups, prefix=None):
            super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)

    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=Formatter
    )
