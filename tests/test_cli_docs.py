"""Every ``llem`` command has help, answers ``-h`` and ``--help``, and is documented with
every one of its options.

The commands and options are read from the click tree itself, never listed here, so that a
new command or flag without docs fails. ``llem acct`` (``llem-acct``) is left to
tests/test_acct.py, which checks its flags and fields against docs/acct.md.
"""

import re

import click
import pytest
from click.testing import CliRunner

from llem.cli.main import COMMANDS, _cli
from tests.helpers import ROOT

PAGES = {p.name: p.read_text("utf-8") for p in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]}
OWN_DOC_TEST = {"llem acct"}
# The Slurm hook commands ignore their arguments and run the hook, as root here: `-h` would
# register a job (it should print help; reported, not fixed here). Never run them bare.
HOOKS = {"llem prolog", "llem epilog", "llem epilog-slurmctld"}


def _walk(cmd: click.Command, path: tuple[str, ...], ctx: click.Context):
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            yield from _walk(cmd.get_command(ctx, name), (*path, name), ctx)


def _commands() -> dict[str, click.Command]:
    cli = _cli()
    return dict(_walk(cli, ("llem",), click.Context(cli)))


COMMAND_TREE = _commands()
# The commands users run (the fast hook commands are called by slurm/*.sh, not by people).
USER_COMMANDS = {path: cmd for path, cmd in COMMAND_TREE.items()
                 if path == "llem" or path.split()[1] in COMMANDS}


def _named(text: str, words: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(words)}(?![\w-])", text) is not None


def _options(cmd: click.Command) -> list[str]:
    return [o for p in cmd.params if isinstance(p, click.Option) and not p.hidden
            for o in (*p.opts, *p.secondary_opts)]


@pytest.mark.parametrize("path", sorted(set(COMMAND_TREE) - HOOKS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_answers_help(path, flag):
    args = path.split()[1:]
    result = CliRunner().invoke(COMMAND_TREE["llem"], [*args, flag])
    assert result.exit_code == 0, result.output
    assert result.output.lower().startswith("usage:"), result.output
    assert (COMMAND_TREE[path].help or "").strip(), f"{path} has no help text"


@pytest.mark.parametrize("path", sorted(set(USER_COMMANDS) - OWN_DOC_TEST))
def test_every_command_and_option_is_documented(path):
    cmd = USER_COMMANDS[path]
    pages = [name for name, text in PAGES.items() if _named(text, path)]
    assert pages, f"no page of docs/ or README.md names '{path}'"
    missing = [o for o in _options(cmd) if not any(_named(PAGES[p], o) for p in pages)]
    assert missing == [], f"{path}: options not in {', '.join(sorted(pages))}"
