"""``llem-acct`` as a library: the click command in :mod:`llem.cli.acct` parses the command line
into :class:`AcctOptions` (:func:`build_options`), and :func:`report` turns options and a
ledger into the text to print. Pure functions, no printing; all SQL lives in
:mod:`llem.cluster.acct_queries`. Nothing heavy is imported here; the carbon tables load only
when a carbon figure is shown.

The modules follow the data:

* :mod:`~llem.acct.fields`: the output fields, ``-o`` and ``-e``;
* :mod:`~llem.acct.options`: sacct's syntax (times, jobs, states) and :class:`AcctOptions`;
* :mod:`~llem.acct.rows`: ledger rows into raw values, sacct's selection, totals;
* :mod:`~llem.acct.co2e`: CO2e of the rows (through :mod:`llem.carbon`);
* :mod:`~llem.acct.render`: the table, ``-p``/``-P`` and ``--json``;
* :mod:`~llem.acct.statement`: ``--statement``, and how a selection is named in messages.

Units: the ledger keeps microjoules and nanoseconds; rows carry joules (``ConsumedEnergyRaw``
is joules, as in sacct), seconds and grams CO2e.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from llem.acct.co2e import Carbon, add_carbon, resolve_carbon
from llem.acct.errors import AcctUsageError
from llem.acct.fields import (
    BRIEF_FORMAT,
    CARBON_FIELDS,
    FIELDS,
    LONG_FORMAT,
    TOTAL_FIELDS,
    TOTAL_KEYS,
    Column,
    Field,
    helpformat,
    parse_format,
)
from llem.acct.options import (
    AcctOptions,
    build_options,
    parse_jobs,
    parse_since,
    parse_states,
    parse_time,
    split_list,
)
from llem.acct.render import (
    JSON_SCHEMA,
    format_co2e,
    format_elapsed,
    format_energy,
    format_time,
    json_document,
    render_json,
    render_parsable,
    render_table,
    rows_of_document,
    time_format,
)
from llem.acct.rows import (
    columns_apply,
    latest_runs,
    run_row,
    select_columns,
    select_rows,
    total_row,
    total_rows,
    window_rows,
)
from llem.acct.statement import describe_selection, describe_window, from_epoch, statement_text
from llem.errors import LlemError


@dataclass(frozen=True)
class Report:
    """What to print: ``stdout`` text, ``notes`` for stderr, and the exit status."""

    stdout: str
    notes: tuple[str, ...] = ()
    status: int = 0


def report(ledger, opts: AcctOptions, config, now_ns: int | None = None) -> Report:
    """The text ``llem-acct`` prints for ``opts``.

    Raises:
        ConfigError: the carbon configuration cannot be resolved.
        LedgerError: a query failed.
    """
    if opts.statement:
        return Report(statement_text(ledger, opts, config) + "\n")
    carbon = resolve_carbon(config) if needs_carbon(opts) else None
    columns = opts.columns
    if opts.mode == "json" and not opts.fields_given:
        columns = all_columns(opts.totals_by)
    names = [c.field.name for c in columns]
    if opts.totals_by:
        rows = total_rows(ledger, opts, carbon)
    elif opts.mode in ("parsable", "parsable2") and columns_apply(opts, carbon, names):
        rows = select_columns(ledger, opts, carbon, names)  # the same rows, by column
    else:
        rows = select_rows(ledger, opts, carbon, names)
    now_ns = time.time_ns() if now_ns is None else now_ns
    if opts.mode == "json":
        return Report(render_json(columns, rows, opts=opts, carbon=carbon, generated_ns=now_ns))
    return _render(opts, columns, rows, carbon.footer() if carbon is not None else None)


def gateway_answer(ledger, opts: AcctOptions, config, want_carbon: bool) -> dict:
    """What the gateway answers for ``opts`` (already restricted to what the caller may see):
    the ``llem.acct/1`` document with every field, unrounded, and the carbon footer; or the
    statement's text."""
    if opts.statement:
        return {"statement": statement_text(ledger, opts, config)}
    carbon = resolve_carbon(config) if want_carbon else None
    rows = total_rows(ledger, opts, carbon) if opts.totals_by else select_rows(ledger, opts, carbon)
    doc = json_document(
        all_columns(opts.totals_by),
        rows,
        opts=opts,
        carbon=carbon,
        generated_ns=time.time_ns(),
        precise=True,
    )
    return {"document": doc, "footer": carbon.footer() if carbon is not None and rows else None}


def report_from_answer(
    answer: dict, opts: AcctOptions, notes: tuple[str, ...] = (), now_ns: int | None = None
) -> Report:
    """The text ``llem-acct`` prints for a gateway's answer: exactly what :func:`report`
    prints for the same rows of a local ledger."""
    if opts.statement:
        return Report(str(answer.get("statement", "")) + "\n", notes)
    doc = answer.get("document")
    if not isinstance(doc, dict) or doc.get("schema") != JSON_SCHEMA:
        raise LlemError("the gateway's answer is not a llem.acct/1 document")
    rows = rows_of_document(doc, all_columns(opts.totals_by))
    if opts.mode == "json":
        columns = opts.columns if opts.fields_given else all_columns(opts.totals_by)
        now_ns = time.time_ns() if now_ns is None else now_ns
        out = json_document(columns, rows, opts=opts, carbon=None, generated_ns=now_ns)
        out["carbon"] = doc.get("carbon")
        return Report(json.dumps(out, indent=2, sort_keys=False) + "\n", notes)
    return _render(opts, opts.columns, rows, answer.get("footer"), notes)


def all_columns(totals_by: str | None) -> tuple[Column, ...]:
    """Every field (``--json`` without ``-o``): the totals key first with ``--totals``."""
    catalogue = TOTAL_FIELDS if totals_by else FIELDS
    names_all = ((TOTAL_KEYS[totals_by],) if totals_by else ()) + tuple(
        n for n in catalogue if n not in TOTAL_KEYS.values() or not totals_by
    )
    return tuple(Column(catalogue[n], catalogue[n].width) for n in names_all)


def needs_carbon(opts: AcctOptions) -> bool:
    """Whether the shown fields need CO2e (every field does, in ``--json`` without ``-o``)."""
    names = {c.field.name for c in opts.columns}
    return bool(names & CARBON_FIELDS) or (opts.mode == "json" and not opts.fields_given)


def _render(
    opts: AcctOptions, columns, rows: list[dict], footer: str | None, notes: tuple = ()
) -> Report:
    """The table or ``-p``/``-P`` text of rows, the carbon footer and the notes."""
    notes = list(notes)
    time_fmt = time_format()
    convert = not opts.noconvert
    if opts.mode == "table":
        text = render_table(
            columns,
            rows,
            noheader=opts.noheader,
            units=opts.units,
            time_fmt=time_fmt,
            convert=convert,
        )
        if footer is not None and rows:
            text += footer + "\n"
    else:
        text = render_parsable(
            columns,
            rows,
            noheader=opts.noheader,
            units=opts.units,
            delimiter=opts.delimiter,
            trailing=opts.mode == "parsable",
            time_fmt=time_fmt,
            convert=convert,
        )
        if footer is not None and rows:
            notes.append(footer)
    if not rows:
        f = opts.filter
        if f.jobs is not None and f.users is None and from_epoch(opts.window[0]):
            # -j alone (sacct: Epoch 0, every user): widening would change nothing
            hint = "a job is in the ledger once llem aggregate has merged it after it ended"
            if f.clusters is not None:
                hint += "; -L looks in every cluster"
        else:
            hint = "widen the window with -S or --since, or use -a for all users"
        notes.append(f"llem-acct: no jobs match ({describe_selection(opts)}); {hint}")
    return Report(text, tuple(notes))


__all__ = [
    "BRIEF_FORMAT",
    "CARBON_FIELDS",
    "LONG_FORMAT",
    "describe_window",
    "FIELDS",
    "JSON_SCHEMA",
    "TOTAL_FIELDS",
    "TOTAL_KEYS",
    "AcctOptions",
    "AcctUsageError",
    "Carbon",
    "Column",
    "Field",
    "Report",
    "add_carbon",
    "build_options",
    "describe_selection",
    "format_co2e",
    "format_elapsed",
    "format_energy",
    "format_time",
    "helpformat",
    "latest_runs",
    "parse_format",
    "parse_jobs",
    "parse_since",
    "parse_states",
    "parse_time",
    "render_json",
    "render_parsable",
    "render_table",
    "report",
    "resolve_carbon",
    "run_row",
    "select_rows",
    "split_list",
    "statement_text",
    "total_row",
    "total_rows",
    "window_rows",
]
