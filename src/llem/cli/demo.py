"""``llem demo``: the whole pipeline on this machine, no Slurm and no root needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

UNITS = (
    "Units: ConsumedEnergy and GPUEnergy in joules, as sacct shows them (K = thousand J, M =\n"
    "million J; 3.6M J = 1 kWh); AvePower in watts. Attribution: how the node's energy was\n"
    "split (hybrid: each job pays its CPUs' share of the idle power plus the power its work\n"
    "adds, so the idle job 102 is not free; exclusive: a job holding the whole node pays all\n"
    "of it; see docs/methodology.md)."
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dir",
    "base",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the demo's config, stores, spool and ledger (default: a new "
    "temporary folder, kept so that you can explore it).",
)
def demo(base: Path | None) -> None:
    """Run simulated jobs through the real sampler, export, aggregate, and show the result.

    Four small jobs of simulated users run on two simulated nodes of this machine: a
    CPU-heavy one and an idle one sharing a node, a two-node job, and one with named
    windows. It takes about 15 seconds.
    """
    from llem.demo import Demo, default_dir

    if base is not None and base.exists() and any(base.iterdir()):
        raise click.UsageError(f"{base} is not empty; give a new or empty folder")
    base = base or default_dir()
    Demo(base, say=lambda line: click.echo(line)).run()
    ledger = base / "ledger.db"
    click.echo("")
    for args in (
        ["-a", "--totals", "user"],
        [
            "-a",
            "-o",
            "JobID,JobName,User,NNodes,Elapsed,ConsumedEnergy,AvePower,EnergySource,"
            "Attribution,Coverage,CO2e",
        ],
    ):
        cmd = ["llem-acct", "--ledger", str(ledger), "-S", "today", *args]
        click.echo("$ " + " ".join(cmd))
        subprocess.run([sys.executable, "-m", "llem.cli.acct", *cmd[1:]], check=False)
        click.echo("")
    click.echo(UNITS)
    click.echo("")
    tries = [
        (f"llem-acct --ledger {ledger} -a -S today", "every job and its windows"),
        (f"llem-acct --ledger {ledger} -a -S today --json", "the same as JSON"),
        ("llem wrap -- YOUR COMMAND", "measure any command"),
        ("llem doctor", "what this machine measures, and why not"),
        (f"rm -r {base}", "when done"),
    ]
    width = max(len(cmd) for cmd, _ in tries)
    click.echo("Next, try:")
    for cmd, why in tries:
        click.echo(f"  {cmd:<{width}}  # {why}")
