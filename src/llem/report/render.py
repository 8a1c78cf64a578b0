"""Render a :class:`~llem.report.frames.Report` as Markdown, CSV, JSON or one HTML file.

Renderers only format: every number comes from the Report, so the formats agree. JSON and
CSV carry full precision; Markdown and HTML round for reading.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from typing import Any, NamedTuple

import pandas as pd

from llem.report.frames import Report
from llem.safetext import markdown_cell, safe_text

JSON_SCHEMA = "llem.report/1"

TOTAL_ROWS = (
    ("energy_kwh", "Energy, all components (kWh)"),
    ("cpu_kwh", "  CPU (kWh)"),
    ("dram_kwh", "  DRAM (kWh)"),
    ("gpu_kwh", "  GPU (kWh)"),
    ("other_kwh", "  platform: node meter minus the parts (kWh)"),
    ("platform_share", "Platform share of energy (nodes with a meter)"),
    ("operational_kg", "CO2e operational (kg)"),
    ("embodied_kg", "CO2e embodied (kg)"),
    ("co2e_kg", "CO2e total (kg)"),
    ("jobs", "Job runs"),
    ("users", "Users"),
    ("accounts", "Accounts"),
    ("gpu_h", "GPU-hours"),
    ("node_h", "Node-hours"),
    ("kwh_per_gpu_h", "kWh per GPU-hour"),
    ("measured_share", "Measured share of energy"),
    ("coverage", "Coverage (time with data)"),
    ("idle_kwh", "Idle-GPU energy (kWh)"),
    ("idle_gpu_h", "Idle GPU-hours"),
)
SHARE_KEYS = {
    "measured_share",
    "coverage",
    "energy_share",
    "idle_share",
    "covered_share",
    "change",
    "platform_share",
}
HEADERS = {
    "jobs": "jobs",
    "energy_kwh": "energy kWh",
    "gpu_kwh": "GPU kWh",
    "co2e_kg": "CO2e kg",
    "operational_kg": "operational kg",
    "embodied_kg": "embodied kg",
    "gpu_h": "GPU-h",
    "kwh_per_gpu_h": "kWh/GPU-h",
    "energy_share": "share",
    "measured_share": "measured",
    "platform_share": "platform",
    "idle_gpus": "idle GPUs",
    "allocated_gpus": "GPUs",
    "idle_kwh": "idle kWh",
    "idle_gpu_h": "idle GPU-h",
    "idle_share": "idle share of GPU kWh",
    "covered_share": "covered",
    "gap_intervals": "gap intervals",
    "measured_kwh": "measured kWh",
    "attributed_kwh": "attributed kWh",
    "remainder_kwh": "remainder kWh",
    "idle_unallocated_kwh": "idle unallocated kWh",
    "unallocated_kwh": "unallocated kWh",
}


def fmt(value: Any, key: str = "") -> str:
    """A value for reading: shares as %, floats with 3 significant decimals, None as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in SHARE_KEYS:
        return f"{value * 100:+.1f} %" if key == "change" else f"{value * 100:.1f} %"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.1f}"
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def carbon_line(report: Report) -> str:
    """The provenance that every CO2e figure carries."""
    c = report.carbon
    text = (
        f"CO2e uses grid intensity {c.get('intensity_g_per_kwh')} gCO2e/kWh for region "
        f"{c.get('region')} (source: {c.get('source')}; year {c.get('year')}; basis "
        f"{c.get('basis')}) and PUE {c.get('pue')}"
    )
    if c.get("pue_by_month"):
        text += f" (by month: {c['pue_by_month']})"
    emb = c.get("embodied")
    text += (
        f"; embodied: {emb['source']}."
        if emb
        else "; embodied emissions not included (embodied.enabled is off)."
    )
    return text


def title(report: Report) -> str:
    who = f"account {report.account}" if report.account else f"cluster {report.cluster}"
    kind = "Energy statement" if report.account else "Energy and emissions report"
    return f"{kind}: {who}, {report.period.label}"


def period_line(report: Report) -> str:
    return (
        f"Period {report.period.start_iso} to {report.period.end_iso} (end excluded); "
        f"previous: {report.previous.label}."
    )


def _table_specs(report: Report) -> list[tuple[str, str, pd.DataFrame]]:
    """(id, heading, frame) of every table, in reading order."""
    specs = [("totals", "Totals", totals_frame(report))]
    names = {
        "account": "By account",
        "user": "By user",
        "partition": "By partition",
        "tag": "By tag",
    }
    for key, heading in names.items():
        if report.account and key == "account":
            continue
        specs.append((f"by_{key}", heading, report.groups[key]))
    specs.append(("top_jobs", "Top jobs by energy", report.top_jobs))
    specs.append(("waste_jobs", "Waste: jobs with idle GPUs", report.waste["jobs"]))
    specs.append(("waste_users", "Waste by user", report.waste["user"]))
    if not report.account:
        specs.append(("waste_accounts", "Waste by account", report.waste["account"]))
    if report.reconciliation:
        r = report.reconciliation
        specs.append(("reconciliation", "Reconciliation", reconciliation_frame(report)))
        specs.append(
            ("reconciliation_components", "Reconciliation by component", r["by_component"])
        )
        specs.append(("nodes_with_gaps", "Nodes with gaps", r["nodes_with_gaps"]))
    specs.append(("change", f"Change against {report.previous.label}", report.change))
    return specs


def totals_frame(report: Report) -> pd.DataFrame:
    rows = [
        {"figure": label, "key": key, "value": report.totals.get(key)} for key, label in TOTAL_ROWS
    ]
    c = report.carbon
    for key in ("region", "intensity_g_per_kwh", "source", "year", "basis", "pue"):
        # Shown as given (344.14, not 344.1): the factors are quoted, not measured.
        rows.append({"figure": f"carbon {key}", "key": f"carbon_{key}", "value": str(c.get(key))})
    rows.append({"figure": "idle threshold (W per GPU)", "key": "idle_w", "value": report.idle_w})
    return pd.DataFrame(rows)


def reconciliation_frame(report: Report) -> pd.DataFrame:
    r = report.reconciliation
    rows = [
        ("Node energy measured (kWh)", "measured_kwh"),
        ("Attributed to jobs by the nodes (kWh)", "attributed_kwh"),
        ("Remainder, no job's (kWh)", "remainder_kwh"),
        ("  of which idle power no job's allocation covers (kWh)", "idle_unallocated_kwh"),
        ("  of which unallocated share, policy allocation (kWh)", "unallocated_kwh"),
        ("Job energy in the ledger (kWh)", "jobs_kwh"),
        ("Nodes reporting hourly totals", "nodes"),
    ]
    out = [{"figure": label, "key": key, "value": r[key]} for label, key in rows]
    out.append(
        {
            "figure": "Nodes with job energy but no hourly totals",
            "key": "without",
            "value": ", ".join(r["nodes_without_totals"]) or "none",
        }
    )
    return pd.DataFrame(out)


# -- JSON ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return value


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def to_dict(report: Report) -> dict:
    """The report as plain data (full precision), the JSON format's content."""
    out = {
        "schema": JSON_SCHEMA,
        "cluster": report.cluster,
        "account": report.account,
        "period": {
            "label": report.period.label,
            "start": report.period.start_iso,
            "end": report.period.end_iso,
            "start_ns": report.period.start_ns,
            "end_ns": report.period.end_ns,
        },
        "previous_period": report.previous.label,
        "empty": report.empty,
        "totals": {k: _plain(v) for k, v in report.totals.items()},
        "carbon": {k: v for k, v in report.carbon.items() if k != "operational_kg_check"},
        "idle_threshold_w": report.idle_w,
        "idle_definition": report.idle_definition,
        "groups": {k: _records(v) for k, v in report.groups.items()},
        "top_jobs": _records(report.top_jobs),
        "waste": {k: _records(v) for k, v in report.waste.items()},
        "daily": _records(report.daily),
        "energy_per_gpu_hour": report.gpu_energy,
        "change": _records(report.change),
        "previous_totals": {k: _plain(v) for k, v in report.previous_totals.items()},
        "notes": report.notes,
    }
    if report.reconciliation:
        r = dict(report.reconciliation)
        r["by_component"] = _records(r["by_component"])
        r["nodes_with_gaps"] = _records(r["nodes_with_gaps"])
        out["reconciliation"] = r
    return out


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, sort_keys=True, default=str) + "\n"


# -- CSV ----------------------------------------------------------------------------------------


def _csv(frame: pd.DataFrame) -> str:
    """CSV through pandas (the csv module's minimal quoting: a delimiter, quote or line break
    in a value is quoted), with every text cell made safe first (names are users' own: no
    control character reaches whoever views the file, see llem.safetext)."""
    texts = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if texts:
        frame = frame.copy()
        for c in texts:
            frame[c] = frame[c].map(lambda v: safe_text(v) if isinstance(v, str) else v)
    return frame.to_csv(index=False, lineterminator="\n")


def to_csv_tables(report: Report) -> dict[str, str]:
    """File name -> CSV text, one file per table (full precision)."""
    out = {}
    for ident, _, frame in _table_specs(report):
        out[f"{ident}.csv"] = _csv(frame)
    out["daily.csv"] = _csv(report.daily)
    return out


def to_csv(report: Report) -> str:
    """All tables in one stream, each introduced by a ``# table`` comment line."""
    buf = io.StringIO()
    for name, text in to_csv_tables(report).items():
        buf.write(f"# {name[:-4]}\n{text}\n")
    return buf.getvalue()


# -- Markdown -----------------------------------------------------------------------------------


MAX_ROWS = 50
"""Rows of a table shown in md and html; CSV and JSON carry every row."""


def _more(frame: pd.DataFrame) -> str:
    extra = len(frame) - MAX_ROWS
    return (
        f"... and {extra:,} more rows (every row is in the csv and json formats)"
        if extra > 0
        else ""
    )


VALUE_COLUMNS = ("value", "previous", "current")
"""Columns whose format follows the row's ``key`` (a share, a count...), not the column's."""


def _columns(frame: pd.DataFrame) -> list[str]:
    """The columns shown: all but ``key``, which only names the row for machines."""
    return [c for c in frame.columns if c != "key"]


def _texts(records: list[dict], cols: list[str]) -> list[list[str]]:
    """Every row's cells of ``cols`` as read (:func:`fmt`)."""
    out = []
    for row in records:
        key = row.get("key", "")
        out.append([fmt(row[c], key if c in VALUE_COLUMNS else c) for c in cols])
    return out


def _md_table(frame: pd.DataFrame) -> str:
    """A GitHub pipe table (through tabulate, as pandas' ``to_markdown``): numbers right."""
    if frame.empty:
        return "_none_\n"
    from tabulate import tabulate

    more = _more(frame)
    frame = frame.head(MAX_ROWS)
    cols = _columns(frame)
    align = ["right" if pd.api.types.is_numeric_dtype(frame[c]) else "left" for c in cols]
    # Names are users' own: a "|" would end the cell, markup or a control character would
    # reach the reader (llem.safetext.markdown_cell).
    texts = _texts(frame.to_dict("records"), cols)
    cells = [[markdown_cell(text) for text in row] for row in texts]
    # Cells are already formatted: no number parsing; keep the indent of sub-rows (CPU...).
    table = tabulate(
        cells,
        headers=[HEADERS.get(c, c) for c in cols],
        tablefmt="pipe",
        colalign=align,
        disable_numparse=True,
        preserve_whitespace=True,
    )
    return table + "\n" + (f"\n{more}\n" if more else "")


def to_markdown(report: Report, plot_files: list[str] = ()) -> str:
    parts = [
        f"# {markdown_cell(title(report))}\n",
        period_line(report) + "\n",
        markdown_cell(carbon_line(report)) + "\n",
    ]
    if report.empty:
        parts.append(
            f"**No data**: the ledger holds no job or node energy for {report.period.label}.\n"
        )
    for note in report.notes:
        parts.append(f"> {markdown_cell(note)}\n")
    for ident, heading, frame in _table_specs(report):
        parts.append(f"## {heading}\n")
        if ident.startswith("waste"):
            parts.append(f"Idle GPU: {report.idle_definition}\n")
        parts.append(_md_table(frame))
    g = report.gpu_energy
    if g.get("jobs"):
        parts.append("## Energy per GPU-hour\n")
        parts.append(
            f"Over {g['jobs']:,} GPU jobs: p10 {g['p10']:.3f}, median "
            f"{g['median']:.3f}, p90 {g['p90']:.3f}, max {g['max']:.3f} kWh per "
            "GPU-hour.\n"
        )
    for name in plot_files:
        parts.append(f"![{name}]({name})\n")
    return "\n".join(parts)


# -- HTML ---------------------------------------------------------------------------------------
#
# The page is the jinja2 template templates/report.html (with templates/report.css), rendered
# with autoescape on: job, user and account names are users' own text, and every value is
# escaped where the template inserts it, never by hand here. This part only prepares plain
# data: which tables, in which order, which plot goes beside which table.

PLOT_CAPTIONS = {
    "daily_energy_co2e_by_account.png": "Daily energy (kWh) and operational CO2e (kg) stacked "
    "by account",
    "top_users.png": "Top users by energy (kWh)",
    "energy_per_gpu_hour.png": "Distribution of energy per GPU-hour over GPU jobs",
    "waste_by_account.png": "Energy of idle allocated GPUs by account (kWh)",
}
GPU_PLOT = "energy_per_gpu_hour.png"
"""Shown after the top jobs, under a heading of its own."""


def to_html(report: Report, plots: dict[str, bytes]) -> str:
    """One self-contained HTML file: plots embedded as base64 PNG, no external resource."""
    return _template().render(_html_context(report, plots))


@functools.cache
def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("llem.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html")


def _html_context(report: Report, plots: dict[str, bytes]) -> dict[str, Any]:
    """Everything the template shows, as plain data (strings, lists, dicts)."""
    figures = {name: _figure(name, data) for name, data in plots.items()}
    beside = _plots_beside(report)
    sections = [
        _section(
            report,
            ident,
            heading,
            frame,
            figures.get(beside.get(ident)),
            figures.get(GPU_PLOT) if ident == "top_jobs" else None,
        )
        for ident, heading, frame in _table_specs(report)
    ]
    placed = {s["figure"]["name"] for s in sections if s["figure"]}
    placed |= {s["after"]["figure"]["name"] for s in sections if s["after"]}
    return {
        "title": title(report),
        "period_line": period_line(report),
        "carbon_line": carbon_line(report),
        "empty": report.empty,
        "period_label": report.period.label,
        "notes": report.notes,
        "kpis": _kpis(report),
        "sections": sections,
        "other_figures": [f for name, f in figures.items() if name not in placed],
    }


def _section(
    report: Report,
    ident: str,
    heading: str,
    frame: pd.DataFrame,
    figure: dict | None,
    gpu_figure: dict | None,
) -> dict[str, Any]:
    """One table with its heading, the plot above it and what follows it."""
    return {
        "ident": ident,
        "heading": heading,
        "figure": figure,
        "idle_definition": report.idle_definition if ident == "waste_jobs" else None,
        "table": _html_table(frame),
        "after": {"heading": "Energy per GPU-hour", "figure": gpu_figure} if gpu_figure else None,
    }


def _plots_beside(report: Report) -> dict[str, str]:
    """Table id -> the plot shown above that table."""
    # A statement has no waste-by-account table: its waste plot goes with its users' waste.
    waste = "waste_users" if report.account else "waste_accounts"
    return {
        "totals": "daily_energy_co2e_by_account.png",
        "by_user": "top_users.png",
        waste: "waste_by_account.png",
    }


def _kpis(report: Report) -> list[tuple[str, str]]:
    """The headline figures shown as boxes above the tables."""
    t = report.totals
    return [
        ("Energy", fmt(t["energy_kwh"]) + " kWh"),
        ("CO2e", fmt(t["co2e_kg"]) + " kg"),
        ("Jobs", fmt(t["jobs"])),
        ("GPU-hours", fmt(t["gpu_h"])),
        ("Measured", fmt(t["measured_share"], "measured_share")),
        ("Idle-GPU energy", fmt(t["idle_kwh"]) + " kWh"),
    ]


class Cell(NamedTuple):
    """One table cell of the HTML page (a tuple: the template reads many thousands)."""

    text: str
    numeric: bool  # right-aligned, tabular figures
    code: bool  # a command to copy, shown as code


def _html_table(frame: pd.DataFrame) -> dict[str, Any]:
    """Headers, rows of cells and the cut-off note of one table (no rows: "none")."""
    more = _more(frame)
    frame = frame.head(MAX_ROWS)
    cols = _columns(frame)
    records = frame.to_dict("records")
    rows = [
        [Cell(text, _is_number(record[c]), c == "command") for c, text in zip(cols, texts)]
        for record, texts in zip(records, _texts(records, cols))
    ]
    return {"headers": [HEADERS.get(c, c) for c in cols], "rows": rows, "more": more}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure(name: str, png: bytes) -> dict[str, str]:
    return {
        "name": name,
        "data": base64.b64encode(png).decode("ascii"),
        "caption": PLOT_CAPTIONS.get(name, name),
    }
