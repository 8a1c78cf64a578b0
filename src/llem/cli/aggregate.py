"""``llem aggregate``: merge the spool's slices into the cluster ledger."""

from __future__ import annotations

import json
import signal
import sys

import click

from llem import config as config_mod


def _summary(res) -> str:
    text = (
        f"merged {res.merged} slice(s), {res.unchanged} already in the ledger, "
        f"{len(res.quarantined)} quarantined, {res.jobs} job(s) updated, "
        f"{res.incomplete} marked incomplete, in {res.elapsed_s:.2f} s"
    )
    acc = res.accounting
    if acc is not None and acc.error:
        text += f"; sacct failed ({acc.error}): job states from Slurm in a later pass"
    elif acc is not None and acc.asked:
        text += f"; sacct: {acc.asked} job(s) asked, {acc.records} record(s) stored"
    return text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--once",
    "mode",
    flag_value="once",
    default=True,
    help="One pass over the spool, then exit (cron, systemd timer). The default.",
)
@click.option("--watch", "mode", flag_value="watch", help="Keep merging, every --every seconds.")
@click.option(
    "--every",
    "every_s",
    type=click.FloatRange(min=0.5),
    default=30.0,
    show_default=True,
    help="Seconds between passes in --watch mode.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for another aggregator's lock before giving up.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the pass summary as JSON.")
@click.option("--debug", is_flag=True, hidden=True)
def aggregate(mode: str, every_s: float, wait_s: float, as_json: bool, debug: bool) -> int:
    """Merge job and node slices from the spool into the cluster ledger.

    Idempotent: a slice merged twice changes nothing. Bad slices go to the quarantine folder
    with a reason; slices from a newer llem stay in the spool (exit status 1). After merging,
    Slurm's accounting (sacct, per aggregate.sacct) is asked for the final state of the jobs
    merged, within aggregate.sacct_timeout_s; when it fails, the jobs are asked again later.
    """
    from llem.cluster.aggregate import LedgerBusy, aggregate_once, watch

    cfg = config_mod.load()
    if mode == "watch":
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

        def report(res) -> None:
            acc = res.accounting
            if res.merged or res.quarantined or res.newer or (acc and (acc.error or acc.asked)):
                click.echo(_summary(res), err=True)

        try:
            watch(cfg, every_s, stop=lambda: bool(stopping), on_pass=report)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        res = aggregate_once(cfg, wait_s=wait_s)
    except LedgerBusy as e:
        click.echo(f"llem aggregate: {e}", err=True)
        return 0
    if as_json:
        click.echo(
            json.dumps(
                {
                    "merged": res.merged,
                    "unchanged": res.unchanged,
                    "quarantined": [{"file": f, "reason": r} for f, r in res.quarantined],
                    "newer_schema": res.newer,
                    "jobs": res.jobs,
                    "incomplete": res.incomplete,
                    "elapsed_s": round(res.elapsed_s, 3),
                    "sacct": None
                    if res.accounting is None
                    else {
                        "asked": res.accounting.asked,
                        "records": res.accounting.records,
                        "calls": res.accounting.calls,
                        "error": res.accounting.error,
                        "skipped": res.accounting.skipped,
                    },
                },
                sort_keys=True,
            )
        )
    else:
        click.echo(_summary(res))
    for name, reason in res.quarantined:
        click.echo(f"quarantined {name}: {reason}", err=True)
    if res.newer:
        click.echo(
            f"Error: {len(res.newer)} slice(s) come from a newer llem "
            f"({', '.join(res.newer[:3])}{'...' if len(res.newer) > 3 else ''}); "
            "upgrade llem on this host; they stay in the spool",
            err=True,
        )
        return 1
    return 0


def main() -> None:
    from llem.cli.main import run

    sys.exit(run(aggregate, prog_name="llem aggregate"))
