"""The ``llem`` command.

Subcommands are imported only when used, so that ``llem sampler`` and the Prolog path do not
pay for the report or accounting code; the commands in FAST_COMMANDS are dispatched before
click is even imported. Library errors become ``Error: ...`` on stderr with exit status 1
here, in one place; ``--debug`` (or ``LLEM_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> "module:attribute"; add a command here and in its own module.
COMMANDS = {
    "wrap": "llem.cli.wrap:wrap",
    "doctor": "llem.cli.doctor:doctor",
    "carbon": "llem.cli.carbon:carbon",
    "aggregate": "llem.cli.aggregate:aggregate",
    "ledger": "llem.cli.ledger:ledger",
    "demo": "llem.cli.demo:demo",
    "acct": "llem.cli.acct:acct",
    "report": "llem.cli.report:report",
    "metrics": "llem.cli.metrics:metrics",
    "history": "llem.cli.history:history",
    "job": "llem.cli.job:job",
}
# Commands on the job start-up path: argparse-based, dispatched before click is imported.
# They are listed in `llem --help` through small click shims.
FAST_COMMANDS = {
    "sampler": "llem.cli.sampler:main",
    "prolog": "llem.cli.slurm:prolog_main",
    "epilog": "llem.cli.slurm:epilog_main",
    "epilog-slurmctld": "llem.cli.slurm:slurmctld_epilog_main",
}


def _fast_dispatch(argv: list[str]) -> int | None:
    if argv and argv[0] in FAST_COMMANDS:
        module, attr = FAST_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), attr)(argv[1:])
    return None


def main() -> None:
    status = _fast_dispatch(sys.argv[1:])
    if status is None:
        status = run(_cli(), sys.argv[1:])
    sys.exit(status)


def _cli():
    import click

    from llem import __version__

    class LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(set(super().list_commands(ctx)) | set(COMMANDS) | set(FAST_COMMANDS))

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            if name in COMMANDS:
                module, attr = COMMANDS[name].split(":")
                return getattr(importlib.import_module(module), attr)
            if name in FAST_COMMANDS:
                return _fast_shim(name)
            return super().get_command(ctx, name)

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "-V", "--version", prog_name="llem")
    @click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
    def cli(debug: bool) -> None:
        """llem: energy and carbon accounting for Slurm jobs and any command."""

    return cli


def _fast_shim(name: str):
    import click

    module, attr = FAST_COMMANDS[name].split(":")
    doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]

    # Every argument, -h/--help included, goes to the fast command: it answers them itself.
    @click.command(name, context_settings={"ignore_unknown_options": True, "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def shim(args: tuple[str, ...]) -> None:
        sys.exit(getattr(importlib.import_module(module), attr)(list(args)))

    shim.help = doc.split(":", 1)[-1].strip() if ":" in doc else doc
    return shim


def run(command, argv: list[str] | None = None, prog_name: str = "llem") -> int:
    """Run a click command with llem's error handling; return the exit status."""
    import logging

    import click

    from llem.errors import LlemError

    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("LLEM_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="llem: %(levelname)s: %(message)s"
    )
    try:
        result = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except LlemError as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


def __getattr__(name: str):
    # `llem.cli.main.cli` is the click group, built on first use so that importing this
    # module for the fast path does not import click.
    if name == "cli":
        return _cli()
    raise AttributeError(name)


if __name__ == "__main__":
    main()
