"""The few pieces of SQL that differ between the ledger's backends.

The query modules (:mod:`llem.cluster.acct_queries`, :mod:`llem.cluster.report_queries`,
:mod:`llem.cluster.metrics_queries`) write one statement per question, in the SQL both
SQLite and PostgreSQL accept, and take from the ledger's :class:`Dialect` only what the two
spell differently: local dates, JSON, ``GREATEST``/``LEAST``, the join that fixes SQLite's
join order, the run's row id, null-safe inequality (Slurm's accounting records, in
:func:`llem.cluster.ledger.upsert_slurm_job`). Parameters are written SQLite's way (``?``
and ``:name``); the PostgreSQL ledger translates them (:func:`pg_params`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    name: str
    fixed_join: str
    """A join whose order the planner keeps (SQLite: ``CROSS JOIN``, which takes ``ON``)."""
    greatest: str
    least: str
    run_id: str
    """The row id of ``job_runs r``."""
    temp: str
    """Prefix of a temporary table."""
    distinct: str
    """Null-safe inequality of two values or rows (SQLite: ``IS NOT``)."""
    _day: str
    _month: str
    _policies: str
    _json_length: str
    _json_items: str
    _position: str
    _node_runs: str

    def day(self, ns: str) -> str:
        """Local date ``YYYY-MM-DD`` of a time in ns (text)."""
        return self._day.format(ns=ns)

    def month(self, ns: str) -> str:
        """Local month ``YYYY-MM`` of a time in ns (text)."""
        return self._month.format(ns=ns)

    def policies(self, attribution: str) -> str:
        """Aggregate: the distinct ``policy`` of JSON texts, comma-separated."""
        return self._policies.format(x=attribution)

    def json_length(self, text: str) -> str:
        """Length of a JSON array held as text."""
        return self._json_length.format(x=text)

    def json_items(self, text: str, alias: str) -> str:
        """A table of the items of a JSON array of strings held as text, column ``value``."""
        return self._json_items.format(x=text, a=alias)

    def any_text(self, column: str) -> str:
        """``column`` (text) equal to an item of one list parameter (:meth:`list_param`): one
        statement for any number of values, each looked up through the column's index.

        On PostgreSQL, ``= ANY(array)`` of thousands of items is planned as a filter of a
        sequential scan; a sub-query of ``unnest`` is planned as a nested loop over the
        index (EXPLAIN on 1,000,000 jobs, docs/performance.md)."""
        if self.name == "sqlite":
            return f"{column} IN (SELECT value FROM json_each(?))"
        return f"{column} IN (SELECT unnest(?::text[]))"

    def list_param(self, values: list) -> object:
        """The parameter of :meth:`any_text`: JSON text for SQLite, an array for
        PostgreSQL."""
        if self.name == "sqlite":
            import json

            return json.dumps(values)
        return values

    def node_runs(self) -> str:
        """``LEFT JOIN`` of the statement's runs ``r`` to their node runs ``job_nodes jn``
        (by the run's key; a run without node runs stays, with NULLs), run by run through
        job_nodes' unique key (cluster, job_id, ...).

        PostgreSQL's planner, left to itself, hashed the whole of job_nodes (every node run
        of the ledger's history) to join one month's runs: on the 10,000,000-job ledger the
        report's runs query took 31 s that way and 9.5-11.6 s run by run (822,000 runs,
        14.4 million node runs; EXPLAIN ANALYZE, docs/performance.md). The LATERAL sub-query
        with ``OFFSET 0``, which the planner does not flatten, keeps the look-ups, whose cost
        grows with the period, not with the history. Not for statements that go on to look
        up roll-up rows per node run: there the hash join's parallel workers share those
        look-ups (report_queries' node runs CTE)."""
        return self._node_runs

    def position(self, needle: str, text: str) -> str:
        """1-based position of ``needle`` in ``text``, 0 when absent."""
        return self._position.format(n=needle, x=text)


RUN_OF_NODE = "jn.cluster = r.cluster AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns"
"""A node run ``jn`` of the run ``r``."""

SQLITE = Dialect(
    name="sqlite",
    fixed_join="CROSS JOIN",
    greatest="MAX",
    least="MIN",
    run_id="r.rowid",
    temp="temp.",
    distinct="IS NOT",
    _day="date({ns} / 1000000000, 'unixepoch', 'localtime')",
    _month="strftime('%Y-%m', {ns} / 1000000000, 'unixepoch', 'localtime')",
    _policies="group_concat(DISTINCT json_extract({x}, '$.policy'))",
    _json_length="json_array_length({x})",
    _json_items="json_each({x}) {a}",
    _position="instr({x}, {n})",
    _node_runs=f"LEFT JOIN job_nodes jn ON {RUN_OF_NODE}",
)

POSTGRESQL = Dialect(
    name="postgresql",
    fixed_join="JOIN",
    greatest="GREATEST",
    least="LEAST",
    run_id="r.id",
    temp="pg_temp.",
    distinct="IS DISTINCT FROM",
    # the session's TimeZone is the client's local zone (see pg_ledger.local_zone)
    _day="to_char(to_timestamp({ns} / 1000000000), 'YYYY-MM-DD')",
    _month="to_char(to_timestamp({ns} / 1000000000), 'YYYY-MM')",
    _policies="string_agg(DISTINCT ({x})::json ->> 'policy', ',')",
    _json_length="json_array_length(({x})::json)",
    _json_items="json_array_elements_text(({x})::json) AS {a}(value)",
    _position="strpos({x}, {n})",
    _node_runs=(
        f"LEFT JOIN LATERAL (SELECT * FROM job_nodes jn WHERE {RUN_OF_NODE} OFFSET 0) jn ON TRUE"
    ),
)

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def pg_params(sql: str) -> str:
    """SQLite's ``?`` and ``:name`` parameters as psycopg's ``%s`` and ``%(name)s``.

    The query modules' SQL has no ``?`` or ``:word`` inside string literals; a ``%`` (as in
    ``LIKE 'a%'`` or a date format) is doubled.
    """
    sql = sql.replace("%", "%%").replace("?", "%s")
    return _NAMED.sub(r"%(\1)s", sql)


SIGNIFICANT_DIGITS = 12


def settled(rows: list[tuple], *columns: int) -> list[tuple]:
    """Rows with the float sums in ``columns`` rounded to :data:`SIGNIFICANT_DIGITS`
    significant digits.

    A sum of floats depends on the order its rows are added in, which each database chooses
    (and SQLite and PostgreSQL choose differently); rounded far below any figure's
    precision, both backends give the same number. Sums of integers need nothing.
    """
    out = []
    for row in rows:
        row = list(row)
        for i in columns:
            if isinstance(row[i], float):
                row[i] = settle(row[i])
        out.append(tuple(row))
    return out


_SETTLE = f"{{:.{SIGNIFICANT_DIGITS}g}}".format


def settle(value: float) -> float:
    """A float sum rounded as :func:`settled` rounds it."""
    return float(_SETTLE(value))


def settle_all(values: Iterable[float]) -> list[float]:
    """:func:`settle` of each float (a quarter faster than calling it on each)."""
    return list(map(float, map(_SETTLE, values)))
