"""``llem-acct`` (also ``llem acct``): sacct-style energy and emissions from the cluster ledger.

The command parses sacct's flags into one :class:`llem.acct.AcctOptions`, asks
:func:`llem.acct.report` for the text and prints it. Usage errors (an unknown flag or field,
a bad time) exit 2, library errors (no ledger, a bad carbon configuration) exit 1 through
:func:`llem.cli.main.run`; an empty result says so on stderr and exits 0.
"""

from __future__ import annotations

import functools
import os
import sys
from datetime import datetime

import click

from llem import acct as lib

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _filter_options(fn):
    """sacct's selection flags, with sacct's letters and meanings."""
    opts = [
        click.option(
            "-j",
            "--jobs",
            metavar="JOB[.STEP|_TASK][,...]",
            help="Only these jobs: JOB, JOB.STEP (a step or window name), array task "
            "JOB_TASK. No default time window then, and every user's jobs.",
        ),
        click.option(
            "-u",
            "--user",
            "--uid",
            "users",
            metavar="USER[,...]",
            help="Only these users (names or uids). Default: yourself.",
        ),
        click.option("-a", "--allusers", is_flag=True, help="Every user's jobs."),
        click.option("-A", "--accounts", metavar="ACCOUNT[,...]", help="Only these accounts."),
        click.option(
            "-r", "--partition", "partitions", metavar="PART[,...]", help="Only these partitions."
        ),
        click.option(
            "-s",
            "--state",
            "states",
            metavar="STATE[,...]",
            help="Only jobs that ended in the window in these states: CD, F, CA, TO, OOM, "
            "NF, PR, RQ, DL, BF (or their names; R: jobs that ran in the window, PD: jobs "
            "pending in it), UNKNOWN (no Slurm accounting, exit 0:0). Without -S, only jobs "
            "ending now (as sacct).",
        ),
        click.option(
            "-S",
            "--starttime",
            metavar="TIME",
            help="Jobs eligible before -E that ended at or after TIME (with -s: that "
            "ended between -S and -E). Default 00:00 today (Epoch with -j; now with -s). "
            "TIME: YYYY-MM-DD[THH:MM[:SS]], MMDD[YY], MM/DD[/YY], HH:MM[:SS] [AM|PM], "
            "MMDD-HH:MM, now[{+|-}N[seconds|minutes|hours|days|weeks]], today, tomorrow, "
            "midnight, noon, uts<epoch>.",
        ),
        click.option(
            "-E",
            "--endtime",
            metavar="TIME",
            help="End of the window. Default now (with -s: -S).",
        ),
        click.option(
            "--since", metavar="DURATION", help="Shorthand for -S now-DURATION: 30d, 12h, 2w, 90m."
        ),
        click.option("--name", "names", metavar="NAME[,...]", help="Only jobs with these names."),
        click.option(
            "-N",
            "--nodelist",
            metavar="HOSTLIST",
            help="Jobs that ran on any of these nodes (n[1-4],gpu01); every user's.",
        ),
        click.option(
            "-g", "--gid", "--group", "groups", metavar="GROUP[,...]", help="Only these groups."
        ),
        click.option(
            "-q", "--qos", metavar="QOS[,...]", help="Only these QOS (Slurm's accounting)."
        ),
        click.option(
            "-k",
            "--timelimit-min",
            metavar="TIME",
            help="Only jobs with this time limit (with -K: at least this one).",
        ),
        click.option(
            "-K",
            "--timelimit-max",
            metavar="TIME",
            help="With -k: only jobs with a time limit at most this one.",
        ),
        click.option(
            "-M",
            "--clusters",
            metavar="CLUSTER[,...]|all",
            help="Only these clusters. Default: the configured cluster (all when "
            "none is configured).",
        ),
        click.option("-L", "--allclusters", is_flag=True, help="Every cluster (= -M all)."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def _output_options(fn):
    """sacct's output flags, then llem's own."""
    opts = [
        click.option(
            "-X", "--allocations", is_flag=True, help="Only the jobs, no step (window) rows."
        ),
        click.option(
            "-o",
            "--format",
            "fmt",
            multiple=True,
            metavar="FIELD[%WIDTH][,...]",
            help="Fields to show (-e lists them; names may be cut short; ALL: every one); "
            "%WIDTH sets a width, %-WIDTH left-justifies. Given twice, both lists. "
            "Default: $SACCT_FORMAT, else llem-acct's own.",
        ),
        click.option("-b", "--brief", is_flag=True, help="Only JobID, State, ExitCode."),
        click.option(
            "-l",
            "--long",
            "long_",
            is_flag=True,
            help="sacct's long field list (the fields the ledger has).",
        ),
        click.option(
            "-T",
            "--truncate",
            is_flag=True,
            help="Cut start and end (and elapsed) to the -S/-E window.",
        ),
        click.option(
            "--noconvert", is_flag=True, help="Energies in plain joules, no K/M/G suffixes."
        ),
        click.option(
            "-c",
            "--completion",
            is_flag=True,
            help="Accepted for sacct's sake: the ledger holds completion and accounting data "
            "alike.",
        ),
        click.option(
            "-v",
            "--verbose",
            count=True,
            help="Say which time window and states were asked for (on stderr).",
        ),
        click.option(
            "-D",
            "--duplicates",
            is_flag=True,
            help="Every run of a requeued job (default: only its latest run).",
        ),
        click.option("-e", "--helpformat", is_flag=True, help="List the fields and exit."),
        click.option("-n", "--noheader", is_flag=True, help="No header lines."),
        click.option(
            "-p",
            "--parsable",
            is_flag=True,
            help="Fields separated by '|', with a '|' at the end of each line.",
        ),
        click.option(
            "-P", "--parsable2", is_flag=True, help="Fields separated by '|', nothing at the end."
        ),
        click.option("--delimiter", metavar="TEXT", help="Separator for -p and -P."),
        click.option(
            "--json", "as_json", is_flag=True, help="JSON (schema llem.acct/1, docs/acct-json.md)."
        ),
        click.option(
            "--units", metavar="[KMGTP]", help="Show energies in this unit (K = kJ, M = MJ, ...)."
        ),
        click.option(
            "--totals",
            metavar="BY",
            help="One row per user, account, partition, tag, day or month (of the "
            "runs' start), or per window name (with its work and energy per unit), "
            "instead of one per job.",
        ),
        click.option(
            "--statement",
            is_flag=True,
            help="Print a citable paragraph on the energy and emissions of the selected jobs.",
        ),
        click.option(
            "--ledger",
            metavar="PATH|llem://HOST[:PORT]",
            help="The cluster ledger, or the gateway that serves it (its socket's path, or "
            "llem://HOST[:PORT]) (default: 'ledger' in the llem configuration).",
        ),
        click.option("--debug", is_flag=True, help="Show tracebacks of errors."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


@click.command("acct", context_settings=CONTEXT)
@_filter_options
@_output_options
@click.version_option(None, "-V", "--version", package_name="llem", prog_name="llem-acct")
def acct(
    helpformat: bool,
    ledger: str | None,
    debug: bool,
    allclusters: bool,
    clusters: str | None,
    fmt: tuple[str, ...],
    brief: bool,
    long_: bool,
    completion: bool,
    verbose: int,
    **raw,
) -> int:
    """Energy and CO2e of Slurm jobs, the sacct way.

    Reads the cluster ledger written by 'llem aggregate'. Without -a you see your own jobs;
    without -S or -j, the jobs since 00:00 today. Examples:

    \b
      llem-acct --since 30d
      llem-acct -j 1234 -o JobID,Elapsed,GPUEnergy,CO2e
      llem-acct -a --since 30d --totals account
      llem-acct --since 7d --totals window
      llem-acct -S 2026-01-01 -E 2026-03-31 --statement
    """
    if helpformat:
        click.echo(lib.helpformat(), nl=False)
        click.echo("\nWith --totals:")
        click.echo(lib.helpformat(totals=True), nl=False)
        return 0
    from llem import config as config_mod
    from llem.cluster import acct_queries

    del completion  # one source: the ledger
    if long_ and fmt:
        raise click.UsageError("-o/--format and -l/--long exclude each other, as in sacct")
    fields = (
        list(fmt) + ([lib.BRIEF_FORMAT] if brief else []) + ([lib.LONG_FORMAT] if long_ else [])
    )
    cfg = config_mod.load()
    try:
        opts = lib.build_options(
            fmt=",".join(fields) if fields else None,
            ledger=ledger or cfg.ledger,
            cluster=cfg.cluster,
            current_user=_current_user(),
            is_root=os.getuid() == 0,
            now=datetime.now(),
            clusters="all" if allclusters else clusters,
            **raw,
        )
    except lib.AcctUsageError as e:
        raise click.BadParameter(str(e), param_hint=f"'{e.option}'") from None
    if verbose:
        click.echo(f"llem-acct: {lib.describe_window(opts)}", err=True)
    out = _remote_report(opts, cfg)
    if out is None:
        with acct_queries.open_ledger(opts.ledger) as led:
            out = lib.report(led, opts, cfg)
    sys.stdout.write(out.stdout)
    sys.stdout.flush()
    for note in out.notes:
        click.echo(note, err=True)
    return out.status


def _remote_report(opts, cfg):
    """The report through the gateway when the ledger names one (None otherwise)."""
    if opts.ledger.startswith(("postgresql://", "postgres://", "service=")):
        return None  # a database, never a gateway: no need to import the client (12 ms)
    from llem.gateway import client, wire

    target = client.target_of(opts.ledger)
    if target is None:
        return None
    request = wire.Request(
        op="acct",
        cluster=cfg.cluster,
        filter=opts.filter,
        allocations=opts.allocations,
        duplicates=opts.duplicates,
        totals_by=opts.totals_by,
        statement=opts.statement,
        truncate=opts.truncate,
        fields=None
        if opts.mode == "json" and not opts.fields_given
        else tuple(c.field.name for c in opts.columns),
    )
    answer = client.ask(target, request, munge_socket=cfg.gateway.munge_socket)
    notes = tuple(str(n) for n in answer.get("notes") or ())
    return lib.report_from_answer(answer, opts, notes)


def main() -> None:
    """The ``llem-acct`` console script."""
    from llem.cli.main import run

    sys.exit(run(acct, prog_name="llem-acct"))


if __name__ == "__main__":
    main()
