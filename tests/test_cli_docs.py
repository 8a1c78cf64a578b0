"""Every ``llem`` command has help text and is documented with every one of its options.
(That each answers ``-h``/``--help`` without side effects: tests/test_cli_help.py.)

The commands and options are read from the click tree itself, never listed here, so that a
new command or flag without docs fails. ``llem acct`` (``llem-acct``) is left to
tests/test_acct.py, which checks its flags and fields against docs/acct.md.
"""

import re

import click
import pytest

from llem.cli.main import COMMANDS, _cli
from tests.helpers import ROOT

PAGES = {p.name: p.read_text("utf-8") for p in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]}
OWN_DOC_TEST = {"llem acct"}


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
USER_COMMANDS = {
    path: cmd for path, cmd in COMMAND_TREE.items() if path == "llem" or path.split()[1] in COMMANDS
}


def _named(text: str, words: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(words)}(?![\w-])", text) is not None


def _options(cmd: click.Command) -> list[str]:
    return [
        o
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden
        for o in (*p.opts, *p.secondary_opts)
    ]


@pytest.mark.parametrize("path", sorted(COMMAND_TREE))
def test_every_command_has_help_text(path):
    assert (COMMAND_TREE[path].help or "").strip(), f"{path} has no help text"


@pytest.mark.parametrize("path", sorted(set(USER_COMMANDS) - OWN_DOC_TEST))
def test_every_command_and_option_is_documented(path):
    cmd = USER_COMMANDS[path]
    pages = [name for name, text in PAGES.items() if _named(text, path)]
    assert pages, f"no page of docs/ or README.md names '{path}'"
    missing = [o for o in _options(cmd) if not any(_named(PAGES[p], o) for p in pages)]
    assert missing == [], f"{path}: options not in {', '.join(sorted(pages))}"
