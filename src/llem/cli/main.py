"""The ``llem`` command.

Subcommands are imported only when used, so that ``llem sampler`` and the Prolog path do not
pay for the report or accounting code. Library errors become ``Error: ...`` on stderr with
exit status 1 here, in one place; ``--debug`` (or ``LLEM_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from llem import __version__
from llem.errors import LlemError

# name -> "module:attribute"; add a command here and in its own module.
COMMANDS = {
    "wrap": "llem.cli.wrap:wrap",
    "doctor": "llem.cli.doctor:doctor",
    "sampler": "llem.cli.sampler:sampler",
    "carbon": "llem.cli.carbon:carbon",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="llem")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """llem: energy and carbon accounting for Slurm jobs and any command."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def run(command: click.Command, argv: list[str] | None = None, prog_name: str = "llem") -> int:
    """Run a click command with llem's error handling; return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LLEM_DEBUG") == "1"
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


def main() -> None:
    sys.exit(run(cli))


if __name__ == "__main__":
    main()
