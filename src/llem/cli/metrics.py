"""``llem metrics``: the cluster's metrics from the ledger, for Prometheus."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--textfile",
    "textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the metrics to this .prom file atomically (node_exporter's textfile "
    "directory) instead of printing them.",
)
@click.option(
    "--ledger",
    "ledger",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ledger (default: 'ledger' of the configuration).",
)
@click.option("--debug", is_flag=True, hidden=True)
def metrics(textfile: Path | None, ledger: Path | None, debug: bool) -> int:
    """Energy and CO2e per account and partition, and the aggregator's health, from the
    cluster ledger, in Prometheus's text format (docs/metrics.md).

    Run it on the admin node after each `llem aggregate` pass (a timer or cron), with
    --textfile in node_exporter's textfile directory. Read-only on the ledger.
    """
    from llem import config as config_mod
    from llem.cluster.metrics import collect
    from llem.errors import LlemError

    cfg = config_mod.load()
    text = collect(cfg, ledger)
    if textfile is None:
        click.echo(text, nl=False)
        return 0
    if textfile.suffix != ".prom":
        raise LlemError(f"{textfile}: node_exporter reads only files ending in .prom")
    from llem.exposition import write_textfile

    write_textfile(textfile.parent, textfile.name, text)
    return 0


def main() -> None:
    from llem.cli.main import run

    sys.exit(run(metrics, prog_name="llem metrics"))
