"""``llem-acct``'s output: sacct's fixed-width table, ``-p``/``-P`` and the ``--json`` document,
and how each kind of field is shown (energy with K/M/G suffixes, CO2e, elapsed, times).

Pure: rows of raw values (joules, seconds, epoch ns, grams) in, text out.
"""

from __future__ import annotations

import json
import os
import string
import time
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any

from llem.acct.fields import ENERGY_PREFIXES, Column
from llem.acct.options import spec_text
from llem.safetext import safe_text, safe_texts
from llem.units import NS_PER_S

if TYPE_CHECKING:
    from llem.acct.co2e import Carbon
    from llem.acct.options import AcctOptions

JSON_SCHEMA = "llem.acct/1"


def format_energy(joules: float | None, units: str | None = None, convert: bool = True) -> str:
    """sacct's way with ConsumedEnergy (Slurm's ``convert_num_unit2``, divisor 1000): whole
    joules, divided by 1000 while at least 1000; a whole result without decimals (``16K``),
    else two (``16.50K``). ``850``, ``0``.

    With ``units`` (K, M, G, T, P) every value is shown in that unit; ``convert`` False
    (``--noconvert``) shows plain joules.
    """
    if joules is None:
        return ""
    value = float(round(joules))
    if value == 0:
        return "0"
    index = 0
    if units:
        index = ENERGY_PREFIXES.index(units)
        value /= 1000**index
    elif convert:
        while abs(value) >= 1000 and index < len(ENERGY_PREFIXES) - 1:
            value /= 1000
            index += 1
    if value == int(value):
        return f"{int(value)}{ENERGY_PREFIXES[index]}"
    return f"{value:.2f}{ENERGY_PREFIXES[index]}"


def format_co2e(grams: float | None) -> str:
    """``812.3g``, ``1.234kg``, ``2.500t``."""
    if grams is None:
        return ""
    if grams >= 1e6:
        return f"{grams / 1e6:.3f}t"
    if grams >= 1000:
        return f"{grams / 1000:.3f}kg"
    return f"{grams:.1f}g"


def format_elapsed(seconds: float | None) -> str:
    """``[DD-]HH:MM:SS``, as sacct."""
    if seconds is None:
        return ""
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    # %-formatting: a third less time than an f-string of three :02d (80,000 rows a month)
    if days:
        return "%d-%02d:%02d:%02d" % (days, hours, rest // 60, rest % 60)  # noqa: UP031
    return "%02d:%02d:%02d" % (hours, rest // 60, rest % 60)  # noqa: UP031


def time_format(env: Mapping[str, str] | None = None) -> str:
    """The strftime format of times, from ``SLURM_TIME_FORMAT`` as sacct reads it:
    ``standard`` (or unset) is ``%Y-%m-%dT%H:%M:%S``, ``relative`` is sacct's relative
    form, any other text with a ``%`` (under 32 characters) a strftime format."""
    fmt = (os.environ if env is None else env).get("SLURM_TIME_FORMAT") or ""
    if not fmt or fmt == "standard" or "%" not in fmt and fmt != "relative" or len(fmt) >= 32:
        return STANDARD_TIME
    return fmt


STANDARD_TIME = "%Y-%m-%dT%H:%M:%S"


def _relative(when: time.struct_time, now_s: float | None = None) -> str:
    """sacct's ``relative`` format: by distance in days from today."""
    today = time.localtime(time.time() if now_s is None else now_s)
    distance = (
        date(when.tm_year, when.tm_mon, when.tm_mday)
        - date(today.tm_year, today.tm_mon, today.tm_mday)
    ).days
    if distance == -1:
        return time.strftime("Ystday %H:%M", when)
    if distance == 0:
        return time.strftime("%H:%M:%S", when)
    if distance == 1:
        return time.strftime("Tomorr %H:%M", when)
    if abs(distance) > 365:
        return f"{when.tm_mday} " + time.strftime("%b %Y", when)
    if distance < -1 or distance > 6:
        return f"{when.tm_mday} " + time.strftime("%b %H:%M", when)
    return time.strftime("%a %H:%M", when)


def format_time(ts_ns: int | None, fmt: str = STANDARD_TIME) -> str:
    """A time in local time (``fmt``: see :func:`time_format`); ``Unknown`` when absent."""
    if ts_ns is None:
        return "Unknown"
    when = time.localtime(ts_ns // NS_PER_S)
    if fmt == "relative":
        return _relative(when)
    return time.strftime(fmt, when)


_OUR_TEXT = frozenset(
    {
        "energy",
        "time",
        "elapsed",
        "watts",
        "intensity",
        "float1",
        "percent",
        "co2e",
        "count",
        "perwork",
    }
)
"""Kinds whose text llem writes itself from a number: made of :data:`_OUR_CHARS` only, so
they need escaping only when the delimiter uses one of those."""
_OUR_CHARS = frozenset(string.ascii_letters + string.digits + ".:-+% ")


def _formatter(
    kind: str, units: str | None, delimiter: str = "", tfmt: str = STANDARD_TIME, convert=True
):
    """value -> text for a field kind (None -> empty, or ``Unknown`` for times); every
    text is made safe (:func:`llem.safetext.safe_text`): names are chosen by users."""
    simple = {
        "energy": lambda v: format_energy(v, units, convert),
        "time": lambda v: format_time(v, tfmt),
        "elapsed": format_elapsed,
        "watts": "{:.1f}".format,
        "intensity": "{:.1f}".format,
        "float1": "{:.1f}".format,
        "percent": lambda v: f"{v * 100:.1f}%",
        "co2e": format_co2e,
        "count": "{:.6g}".format,
        "perwork": "{:.4g}".format,
    }.get(kind, str)
    empty = "Unknown" if kind == "time" else ""
    if kind == "time" and tfmt != STANDARD_TIME:
        return lambda v: empty if v is None else safe_text(simple(v), delimiter)
    if kind in _OUR_TEXT and not set(delimiter) & _OUR_CHARS:
        return lambda v: empty if v is None else simple(v)
    return lambda v: empty if v is None else safe_text(simple(v), delimiter)


_NEVER_CUT = frozenset({"int", "elapsed"})
"""Kinds sacct prints whole however narrow the column (numbers, elapsed times)."""


def _cell(text: str, width: int, kind: str) -> str:
    """One cell as sacct's ``print_fields``: text longer than the column is cut with a
    ``+`` in its last place, times are cut without one, numbers and elapsed times never."""
    size = abs(width)
    if len(text) > size and kind not in _NEVER_CUT:
        text = text[:size] if kind == "time" else text[: size - 1] + "+"
    return text.ljust(size) if width < 0 else text.rjust(size)


def render_table(
    columns: Sequence[Column],
    rows: Sequence[dict],
    *,
    noheader: bool,
    units: str | None,
    time_fmt: str = STANDARD_TIME,
    convert: bool = True,
) -> str:
    """sacct's fixed-width table: right-justified cells and headers (``%-N``, JobID and
    JobIDRaw: left), cut as :func:`_cell` says (headers without ``+``), one space after
    every cell, dashes under the header."""
    lines = []
    if not noheader:
        lines.append(
            "".join(
                (name.ljust if c.width < 0 else name.rjust)(abs(c.width)) + " "
                for c in columns
                for name in (c.field.name[: abs(c.width)],)
            )
        )
        lines.append("".join("-" * abs(c.width) + " " for c in columns))
    if rows:
        # column by column, as render_parsable: one format, escape and pad per column
        texts = _columns_texts(columns, rows, units, "", time_fmt, convert)
        cells = [_cells(t, c.width, c.field.kind) for t, c in zip(texts, columns)]
        lines += (" ".join(row) + " " for row in zip(*cells))
    return "".join(line + "\n" for line in lines)


def _cells(texts: list[str], width: int, kind: str) -> list[str]:
    """:func:`_cell` of each text of one column."""
    size = abs(width)
    if kind not in _NEVER_CUT:
        texts = [_cell(t, width, kind) if len(t) > size else t for t in texts]
    return list(map(str.ljust if width < 0 else str.rjust, texts, repeat(size)))


def render_parsable(
    columns: Sequence[Column],
    rows: Sequence[dict],
    *,
    noheader: bool,
    units: str | None,
    delimiter: str,
    trailing: bool,
    time_fmt: str = STANDARD_TIME,
    convert: bool = True,
) -> str:
    """``-p`` (a delimiter after every field) and ``-P`` (between fields only), as sacct;
    unlike sacct, a value's characters that occur in the delimiter are escaped (``\\x7c``),
    so that a name can never add a field or a row.

    ``rows``: dicts, or an object with ``values`` (field name -> list of values) and a
    length (:class:`llem.acct.rows.RunColumns`).
    """
    end = delimiter if trailing else ""
    lines = []
    if not noheader:
        lines.append(delimiter.join(c.field.name for c in columns) + end)
    if rows:
        texts = _columns_texts(columns, rows, units, delimiter, time_fmt, convert)
        lines += (
            map(delimiter.join, zip(*texts))
            if not end
            else (delimiter.join(cells) + end for cells in zip(*texts))
        )
    return "\n".join(lines) + "\n" if lines else ""


def _columns_texts(
    columns: Sequence[Column], rows, units: str | None, delimiter: str, tfmt: str, convert: bool
) -> list[list[str]]:
    """Each column's texts (:func:`_column_texts`), column by column: a month of a large
    cluster is 80,000 rows and more. ``rows``: dicts, or rows held by column (an object
    with ``values``, :class:`llem.acct.rows.RunColumns`)."""
    by_column = getattr(rows, "values", None)
    return [
        _column_texts(
            list(map(dict.get, rows, repeat(c.field.name)))
            if by_column is None
            else by_column.get(c.field.name) or [None] * len(rows),
            c.field.kind,
            units,
            delimiter,
            tfmt,
            convert,
        )
        for c in columns
    ]


def _column_texts(
    values: list, kind: str, units: str | None, delimiter: str, tfmt: str, convert: bool
) -> list[str]:
    """The texts of one column's values, as :func:`_formatter`'s; values shown as ``str()``
    (names, counts) are made safe with one search over the whole column."""
    if kind in _OUR_TEXT and not set(delimiter) & _OUR_CHARS:
        # these formats give "" for None and need no escaping: no wrapper per value
        if kind == "elapsed":
            return [format_elapsed(v) for v in values]
        if kind == "co2e":
            return [format_co2e(v) for v in values]
        if kind == "energy":
            return [format_energy(v, units, convert) for v in values]
    if kind in _OUR_TEXT:  # a format of its own; the other kinds are str()
        return list(map(_formatter(kind, units, delimiter, tfmt, convert), values))
    if set(map(type, values)) != {str}:  # (else the values are their texts already)
        values = ["" if v is None else v if v.__class__ is str else str(v) for v in values]
    return safe_texts(values, delimiter)


def _json_value(value: Any, kind: str, precise: bool = False) -> Any:
    if value is None:
        return None
    if kind == "time":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value // NS_PER_S))
    if precise:  # the gateway's answers: the client rounds as it shows them
        return value
    if kind == "elapsed":
        return int(round(value))
    if kind == "energy":
        return round(value, 3)
    if kind in ("watts", "intensity", "float1"):
        return round(value, 3)
    if kind == "co2e":
        return round(value, 3)
    if kind == "percent":
        return round(value, 4)
    if kind in ("count", "perwork"):
        return float(f"{value:.6g}")
    return value


def render_json(
    columns: Sequence[Column],
    rows: Sequence[dict],
    *,
    opts: AcctOptions,
    carbon: Carbon | None,
    generated_ns: int,
) -> str:
    """The ``--json`` document (schema :data:`JSON_SCHEMA`, see docs/acct-json.md)."""
    doc = json_document(columns, rows, opts=opts, carbon=carbon, generated_ns=generated_ns)
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def json_document(
    columns: Sequence[Column],
    rows: Sequence[dict],
    *,
    opts: AcctOptions,
    carbon: Carbon | None,
    generated_ns: int,
    precise: bool = False,
) -> dict[str, Any]:
    """The ``--json`` document as a dict; ``precise`` keeps numbers unrounded (the gateway's
    answers, which the client rounds as a local ledger's rows)."""
    start, end = opts.window
    f = opts.filter
    doc: dict[str, Any] = {
        "schema": JSON_SCHEMA,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(generated_ns // NS_PER_S)),
        "query": {
            "start": _iso_local(start),
            "end": _iso_local(end),
            "clusters": list(f.clusters) if f.clusters is not None else None,
            "users": list(f.users) if f.users is not None else None,
            "accounts": list(f.accounts) if f.accounts is not None else None,
            "partitions": list(f.partitions) if f.partitions is not None else None,
            "states": list(f.states) if f.states is not None else None,
            "nodes": list(f.nodes) if f.nodes is not None else None,
            "jobs": [spec_text(s) for s in f.jobs] if f.jobs is not None else None,
            "totals_by": opts.totals_by,
        },
        "units": {
            "energy": "J",
            "power": "W",
            "time": "s",
            "co2e": "g",
            "carbon_intensity": "gCO2e/kWh",
            "coverage": "fraction",
        },
        "carbon": _json_carbon(carbon),
        "fields": [c.field.name for c in columns],
    }
    doc["totals" if opts.totals_by else "jobs"] = [
        {c.field.name: _json_value(row.get(c.field.name), c.field.kind, precise) for c in columns}
        for row in rows
    ]
    return doc


def rows_of_document(doc: dict[str, Any], columns: Sequence[Column]) -> list[dict[str, Any]]:
    """A ``llem.acct/1`` document's rows as raw values again (times to epoch ns), for the
    table, ``-p``/``-P`` and ``--json`` renderers."""
    import calendar

    kinds = {c.field.name: c.field.kind for c in columns}
    out = []
    for row in doc.get("totals") if "totals" in doc else doc.get("jobs", []):
        raw = dict(row)
        for name, value in row.items():
            if kinds.get(name) == "time" and isinstance(value, str):
                moment = time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
                raw[name] = calendar.timegm(moment) * NS_PER_S
        out.append(raw)
    return out


def _json_carbon(carbon: Carbon | None) -> dict | None:
    if carbon is None:
        return None
    i = carbon.info
    return {
        "region": i["region"],
        "intensity_g_per_kwh": i["intensity_g_per_kwh"],
        "source": i["source"],
        "year": carbon.years(),
        "basis": i["basis"],
        "pue": i["pue"],
        "hourly_source": i["hourly_source"],
        "embodied": i["embodied"],
        "region_is_default": i["region_is_default"],
        "intensity_by_year": {
            y: carbon.figures[y] for y in sorted(carbon.years_used) if y in carbon.figures
        },
    }


def _iso_local(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone().isoformat(timespec="seconds")
