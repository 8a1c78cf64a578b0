"""Every command answers -h and --help, and does nothing else.

The commands are found by walking the click tree of ``llem`` (the commands that bypass click
for start-up speed appear there as shims), and the console scripts from the installed
package's entry points: a new command is covered without touching this file. Each runs in a
subprocess through the real entry point, with a temporary HOME and a config whose every
directory lies in a temporary folder that must stay empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import distribution

import click
import pytest

from llem.cli.main import COMMANDS, FAST_COMMANDS, cli


def command_paths(command: click.Command, path: tuple[str, ...] = ()):
    """Every command and subcommand under ``command``, as argument tuples."""
    yield path
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1] if path else "llem")
        for name in command.list_commands(ctx):
            yield from command_paths(command.get_command(ctx, name), (*path, name))


def console_scripts() -> dict[str, str]:
    return {
        ep.name: ep.value
        for ep in distribution("llem").entry_points
        if ep.group == "console_scripts"
    }


LLEM_PATHS = list(command_paths(cli))
INVOCATIONS = [("llem", path) for path in LLEM_PATHS] + [
    (script, ()) for script in sorted(console_scripts()) if script != "llem"
]


def test_the_walk_finds_every_command():
    top = {path[0] for path in LLEM_PATHS if len(path) == 1}
    assert set(COMMANDS) | set(FAST_COMMANDS) <= top
    assert any(len(path) == 2 for path in LLEM_PATHS)  # subcommands are walked too
    assert "llem-acct" in console_scripts()


def entry_point_argv(script: str) -> list[str]:
    """Run a console script as its installed wrapper does, with this interpreter."""
    module, attr = console_scripts()[script].split(":")
    return [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {script!r}; from {module} import {attr}; {attr}()",
    ]


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_help(argv: list[str], tmp_path) -> None:
    """Run ``argv``; assert exit 0, a usage text, and no file written anywhere it could."""
    home, data, cwd = tmp_path / "home", tmp_path / "data", tmp_path / "cwd"
    for folder in (home, data, cwd):
        folder.mkdir()
    config = tmp_path / "llem.yaml"
    config.write_text(
        f"state_dir: {data / 'state'}\nrun_dir: {data / 'run'}\n"
        f"spool_dir: {data / 'spool'}\nledger: {data / 'ledger.db'}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLEM_", "SLURM", "SPANK_"))}
    env.update(HOME=str(home), LLEM_CONFIG=str(config), SLURMD_NODENAME="t1")
    r = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Usage" in r.stdout, r.stdout + r.stderr
    for folder in (data, home, cwd):
        assert files_under(folder) == [], f"{argv[3:]} wrote in {folder}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize(
    "script,path", INVOCATIONS, ids=[" ".join((s, *p)) for s, p in INVOCATIONS]
)
def test_help_prints_usage_and_has_no_side_effects(script, path, flag, tmp_path):
    run_help([*entry_point_argv(script), *path, flag], tmp_path)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("name", sorted(FAST_COMMANDS))
def test_help_of_a_fast_command_reached_through_click(name, flag, tmp_path):
    """``llem --debug prolog -h`` goes through click's shim, not the fast dispatch."""
    run_help([*entry_point_argv("llem"), "--debug", name, flag], tmp_path)
