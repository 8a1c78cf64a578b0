"""``llem report``: monthly admin reports and per-account statements from the cluster ledger.

Thin commands: options become one :class:`ReportOptions`, the library computes a Report, and
the chosen format is written. pandas and matplotlib are imported only when a report is built.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click

from llem import config as config_mod

FORMATS = ("html", "md", "csv", "json")


@dataclass(frozen=True)
class ReportOptions:
    """Every option of a report command, parsed; only this flows on."""

    month: str | None
    since: datetime | None
    until: datetime | None
    fmt: str
    out: Path | None
    ledger: str | None
    idle_w: float
    top: int
    account: str | None = None


def report_options(func):
    """The options shared by ``monthly`` and ``account``."""
    decorators = [
        click.option("--month", metavar="YYYY-MM", help="Calendar month (UTC)."),
        click.option(
            "--since",
            type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M"]),
            help="Start of any period (UTC, included); with --until.",
        ),
        click.option(
            "--until",
            type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M"]),
            help="End of the period (UTC, excluded).",
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(FORMATS),
            default="html",
            show_default=True,
            help="Output format.",
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            help="Directory for the report files (created). Default: html into the "
            "current directory; md, csv and json to standard output.",
        ),
        click.option(
            "--ledger",
            help="Ledger path, or the gateway (llem://HOST[:PORT] or its socket) (default: "
            "the config's `ledger`).",
        ),
        click.option(
            "--idle-w",
            type=click.FloatRange(min=0),
            default=100.0,
            show_default=True,
            help="A GPU whose average power over its job stayed below this many "
            "watts counts as idle (waste).",
        ),
        click.option(
            "--top",
            type=click.IntRange(min=1),
            default=20,
            show_default=True,
            help="Rows in the top-jobs and waste tables.",
        ),
        click.option("--debug", is_flag=True, hidden=True),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def report() -> None:
    """Energy and emissions reports from the cluster ledger (tables and plots).

    Needs the report extra: pip install 'llem[report]'.
    """


@report.command(context_settings={"help_option_names": ["-h", "--help"]})
@report_options
def monthly(**kwargs) -> int:
    """The cluster's report for a month (--month) or any period (--since/--until).

    Totals, by account/user/partition/tag, top jobs, idle-GPU waste, node reconciliation and
    the change against the previous period, with plots in html.
    """
    kwargs.pop("debug", None)
    return _run(ReportOptions(**kwargs))


@report.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("account_name", metavar="ACCOUNT")
@report_options
def account(account_name: str, **kwargs) -> int:
    """A statement for one Slurm account (for its PI): its jobs, users, waste and CO2e."""
    kwargs.pop("debug", None)
    return _run(ReportOptions(**kwargs, account=account_name))


def _period(opts: ReportOptions):
    from llem.report import period as frames

    if opts.month and (opts.since or opts.until):
        raise click.UsageError("give either --month or --since/--until, not both")
    if opts.month:
        try:
            return frames.month_period(opts.month)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--month") from None
    if opts.since and opts.until:
        try:
            return frames.range_period(opts.since, opts.until)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--until") from None
    raise click.UsageError("give --month YYYY-MM, or both --since and --until")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "report"


def _run(opts: ReportOptions) -> int:
    cfg = config_mod.load()
    ledger_path = opts.ledger or cfg.ledger
    from llem.gateway import client

    target = client.target_of(ledger_path)
    if target is not None:
        return _run_remote(opts, cfg, target)
    from llem.report import require

    require(*_modules(opts), load=False)  # imported beside the queries (build_report)
    from llem.cluster import report_queries as q
    from llem.report import build_report, preload_plots

    period = _period(opts)
    # pyplot, numpy and pandas imported while the queries run (they wait on the ledger anyway)
    importing = preload_plots() if _wants_plots(opts) else None
    try:
        with q.open_readonly(ledger_path) as ledger:
            rep = build_report(
                ledger, cfg, period, account=opts.account, idle_w=opts.idle_w, top_n=opts.top
            )
    finally:
        if importing is not None:
            importing.join()
    from llem.report import plots, render

    if rep.empty:
        who = f" for account {opts.account}" if opts.account else ""
        click.echo(f"llem report: no data in {ledger_path}{who} for {period.label}", err=True)
    kind = f"statement-{_safe(opts.account)}" if opts.account else f"report-{_safe(cfg.cluster)}"
    base = f"llem-{kind}-{_safe(period.label.replace('..', '_to_'))}"
    _write(rep, opts, base, render, plots)
    return 0


def _run_remote(opts: ReportOptions, cfg, target) -> int:
    """The report made by the ledger gateway (its host needs the report extra); md and csv
    to standard output, json too, html written as one file (plots inside)."""
    from llem.errors import LlemError
    from llem.gateway import client, wire

    if opts.out is not None and opts.fmt in ("md", "csv"):
        raise LlemError(
            "through the gateway, md and csv go to standard output (no --out); "
            "use --format html or json with --out"
        )
    period = _period(opts)
    request = wire.Request(
        op="report",
        cluster=cfg.cluster,
        report=wire.ReportRequest(
            period.start_ns,
            period.end_ns,
            period.label,
            period.kind,
            opts.account,
            opts.idle_w,
            opts.top,
            opts.fmt,
        ),
    )
    answer = client.ask(target, request, munge_socket=cfg.gateway.munge_socket)
    if answer.get("empty"):
        who = f" for account {opts.account}" if opts.account else ""
        click.echo(f"llem report: no data in {target}{who} for {period.label}", err=True)
    text = str(answer.get("text", ""))
    if opts.fmt != "html" and opts.out is None:
        click.echo(text, nl=False)
        return 0
    kind = f"statement-{_safe(opts.account)}" if opts.account else f"report-{_safe(cfg.cluster)}"
    base = f"llem-{kind}-{_safe(period.label.replace('..', '_to_'))}"
    out = _checked_dir(opts.out or Path("."))
    click.echo(str(_save(out / f"{base}.{opts.fmt}", text.encode())))
    return 0


def _wants_plots(opts: ReportOptions) -> bool:
    return opts.fmt == "html" or (opts.fmt == "md" and opts.out is not None)


def _modules(opts: ReportOptions) -> tuple[str, ...]:
    """The optional modules (the report extra) that the chosen format needs."""
    needs = ["pandas"]
    if _wants_plots(opts):
        needs.append("matplotlib")
    if opts.fmt == "md":
        needs.append("tabulate")
    if opts.fmt == "html":
        needs.append("jinja2")
    return tuple(needs)


def _write(rep, opts: ReportOptions, base: str, render, plots) -> None:
    if opts.out is None and opts.fmt != "html":
        text = {
            "md": lambda: render.to_markdown(rep),
            "csv": lambda: render.to_csv(rep),
            "json": lambda: render.to_json(rep),
        }[opts.fmt]()
        click.echo(text, nl=False)
        return
    out = _checked_dir(opts.out or Path("."))
    written = []
    if opts.fmt == "csv":
        folder = _checked_dir(out / base)
        for name, text in render.to_csv_tables(rep).items():
            written.append(_save(folder / name, text.encode()))
    elif opts.fmt == "json":
        written.append(_save(out / f"{base}.json", render.to_json(rep).encode()))
    else:
        pngs = plots.make_plots(rep)
        for name, data in pngs.items():
            written.append(_save(out / f"{base}-{name}", data))
        if opts.fmt == "md":
            text = render.to_markdown(rep, [f"{base}-{n}" for n in pngs])
            written.append(_save(out / f"{base}.md", text.encode()))
        else:
            written.append(_save(out / f"{base}.html", render.to_html(rep, pngs).encode()))
    for path in written:
        click.echo(str(path))


def _checked_dir(path: Path) -> Path:
    """``path``, created if absent (0755), refused when another user controls it (a
    symlink, someone else's directory, writable by group or others): reports are often
    written by root."""
    from llem.errors import LlemError
    from llem.fsutil import dir_problem

    problem = dir_problem(path, create_mode=0o755)
    if problem is not None:
        raise LlemError(f"{path}: {problem}; refusing to write the report there")
    return path


def _save(path: Path, data: bytes) -> Path:
    """Write through a fresh ``O_EXCL | O_NOFOLLOW`` temporary file in the same (checked)
    directory, then rename: never through a file or symlink someone planted."""
    from llem.fsutil import write_atomic

    return write_atomic(path.parent, path.name, data, 0o644)


def main() -> None:
    from llem.cli.main import run

    sys.exit(run(report, prog_name="llem report"))
