"""``llem ledger``: create, migrate, copy and check the cluster ledger (SQLite or PostgreSQL)."""

from __future__ import annotations

import sys

import click

from llem import config as config_mod
from llem.errors import LedgerError

_LEDGER_HELP = (
    "The ledger: a path (SQLite) or a PostgreSQL connection string (postgresql://..., "
    "service=NAME). Default: 'ledger' in the llem configuration."
)


def _spec(ledger: str | None) -> str:
    return ledger or config_mod.load().ledger


def _shown(spec: str) -> str:
    from llem.cluster.pg_ledger import redact
    from llem.safetext import safe_text as safe

    return safe(redact(str(spec)))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def ledger() -> None:
    """Create, migrate, copy and check the cluster ledger (docs/ledger.md)."""


class _StatusLine:
    """One line of progress on stderr, rewritten in place, shown only on a terminal: a run
    from cron or into a pipe prints nothing but its result."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.tty:
            click.echo(f"\r{text}\x1b[K", err=True, nl=False)

    def end(self) -> None:
        if self.tty:
            click.echo("", err=True)


@ledger.command()
@click.option("--ledger", "spec", help=_LEDGER_HELP)
@click.option(
    "--roles",
    is_flag=True,
    help="PostgreSQL: also create the roles llem_writer (owns the tables: the aggregator), "
    "llem_reader (SELECT only: admins, reports) and llem_gateway (llem serve's login: "
    "row-level security shows it only its caller's rows) and give them the ledger.",
)
def init(spec: str | None, roles: bool) -> int:
    """Create the ledger's schema (or bring it up to date). Run as the database's owner."""
    from llem.cluster.ledger import SCHEMA_VERSION, open_ledger
    from llem.cluster.pg_ledger import is_postgres

    spec = _spec(spec)
    if roles and not is_postgres(spec):
        raise click.UsageError("--roles is for a PostgreSQL ledger; an SQLite ledger is a file")
    with open_ledger(spec) as led:
        if roles:
            led.grant_roles()
    click.echo(f"ledger {_shown(spec)}: schema {SCHEMA_VERSION}" + (", roles granted" * roles))
    return 0


@ledger.command()
@click.option("--ledger", "spec", help=_LEDGER_HELP)
def migrate(spec: str | None) -> int:
    """Apply the schema migrations this llem knows (llem aggregate does it too)."""
    from llem.cluster.ledger import SCHEMA_VERSION, open_ledger

    spec = _spec(spec)
    with open_ledger(spec):
        pass
    click.echo(f"ledger {_shown(spec)}: schema {SCHEMA_VERSION}")
    return 0


@ledger.command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--chunk",
    type=click.IntRange(min=100),
    default=20_000,
    show_default=True,
    help="Rows per transaction.",
)
def copy(src: str, dst: str, chunk: int) -> int:
    """Copy the ledger SRC into DST (SQLite to PostgreSQL, or back).

    DST is created when absent and must be empty, or an earlier copy of SRC: an interrupted
    copy resumes where it stopped, and copying again changes nothing. Stop the aggregator
    first. The row counts of both ledgers are compared at the end (exit status 1 if they
    differ).
    """
    import os

    from llem.cluster.ledger import open_ledger
    from llem.cluster.ledger_tools import copy_ledger
    from llem.cluster.pg_ledger import is_postgres, redact

    status = _StatusLine()

    def progress(table: str, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        status.show(f"{table:<16} {done:>12,}/{total:,} rows {pct:5.1f} %")

    with open_ledger(src, readonly=True) as source, open_ledger(dst) as target:
        res = copy_ledger(
            source,
            target,
            source_name=redact(src) if is_postgres(src) else os.path.realpath(src),
            progress=progress,
            chunk_rows=chunk,
        )
    status.end()
    for table, (n, _) in res.counts.items():
        click.echo(f"{table:<16} {n:>12,} rows ({res.copied[table]:,} copied now)")
    click.echo(f"copied {_shown(src)} to {_shown(dst)} in {res.elapsed_s:.1f} s; counts match")
    return 0


@ledger.command()
@click.option("--ledger", "spec", help=_LEDGER_HELP)
def check(spec: str | None) -> int:
    """Verify the ledger's invariants: job node energy = its hourly rows, run totals = its
    nodes', no orphan rows. Exit status 1 when one is broken."""
    import time

    from llem.cluster.acct_queries import open_ledger
    from llem.cluster.ledger_tools import check_ledger

    cfg = config_mod.load()
    spec = spec or cfg.ledger
    status = _StatusLine()
    started = time.monotonic()

    def progress(done: int, total: int, problem: str) -> None:
        # which check runs, and for how long so far
        now = f"{done}/{total} checks, {time.monotonic() - started:.0f} s"
        status.show(f"{now}{': ' + problem if problem else ''}")

    with open_ledger(spec) as led:
        cut = (
            led.retention_cut_s(cfg.ledger_retention_months)
            if hasattr(led, "retention_cut_s")
            else None
        )
        problems = check_ledger(led, cut_ns=(cut or 0) * 10**9, progress=progress)
        runs = led.query("SELECT COUNT(*) FROM job_runs")[0][0]
    status.end()
    if problems:
        from llem.safetext import safe_text as safe

        for line in problems:
            click.echo(safe(line), err=True)
        raise LedgerError(f"ledger {_shown(spec)}: {len(problems)} invariant(s) broken")
    click.echo(f"ledger {_shown(spec)}: ok ({runs:,} job runs)")
    return 0
