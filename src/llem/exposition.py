"""Prometheus text exposition: the catalogue of every metric llem exports, and its writer.

Every metric llem exports is declared once, here, with its type, labels and help text; the
node writer (:mod:`llem.node.metrics`) and the cluster writer (:mod:`llem.cluster.metrics`)
can only emit what is declared, ``docs/metrics.md`` documents each of them and the tests
check the shipped Grafana dashboards against :data:`ALL` (not against a hand-written list).

Naming follows Prometheus's rules: the ``llem_`` prefix, base units in the name (joules,
watts, grams, seconds), ``_total`` for counters, times as Unix timestamps rather than ages,
and labels whose values are bounded (devices of a node, running jobs, accounts); job identity
beyond the job id lives in one ``llem_job_info`` series per running job.

Textfiles are written the way node_exporter's textfile collector asks: no timestamps in the
file, a temporary name that does not end in ``.prom`` (the collector reads every ``*.prom``
file, hidden ones included), then ``rename`` into place, so a scrape sees the old file or the
new one, never half of one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llem.errors import LlemError

COUNTER = "counter"
GAUGE = "gauge"


@dataclass(frozen=True)
class Metric:
    """One metric family.

    Attributes:
        name: the full name, ``_total`` included for counters.
        type: ``counter`` or ``gauge``.
        labels: the label names of every series, in the order they are written.
        help: one line: what it measures, in which unit.
        scope: ``node`` (node sampler, on every compute node) or ``cluster`` (``llem
            metrics`` on the admin node).
    """

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    scope: str


def _m(name: str, type_: str, labels: str, help_: str, scope: str) -> Metric:
    return Metric(name, type_, tuple(labels.split()) if labels else (), help_, scope)


NODE_METRICS: tuple[Metric, ...] = (
    _m(
        "llem_node_energy_joules_total",
        COUNTER,
        "node device component source",
        "Energy measured (or estimated, see source) on one device of the node, in joules, "
        "as held in the node store.",
        "node",
    ),
    _m(
        "llem_node_power_watts",
        GAUGE,
        "node device component source",
        "Mean power of one device over the last sampler interval, in watts.",
        "node",
    ),
    _m(
        "llem_node_running_jobs",
        GAUGE,
        "node",
        "Jobs running on the node, as the node sampler sees them.",
        "node",
    ),
    _m(
        "llem_job_energy_joules_total",
        COUNTER,
        "node jobid component source",
        "Energy attributed so far to a running job on this node, per component, in joules; "
        "the series goes away when the job's Epilog has run.",
        "node",
    ),
    _m(
        "llem_job_info",
        GAUGE,
        "node jobid user account partition",
        "Always 1: who a running job belongs to (join on jobid).",
        "node",
    ),
    _m(
        "llem_sampler_start_time_seconds",
        GAUGE,
        "node",
        "When the node sampler started, Unix time in seconds.",
        "node",
    ),
    _m(
        "llem_sampler_last_tick_timestamp_seconds",
        GAUGE,
        "node",
        "End of the last interval the node sampler stored, Unix time in seconds.",
        "node",
    ),
    _m(
        "llem_sampler_interval_seconds",
        GAUGE,
        "node",
        "The sampler's configured interval between two reads, in seconds.",
        "node",
    ),
    _m(
        "llem_sampler_intervals_total",
        COUNTER,
        "node",
        "Intervals the node sampler stored since it started.",
        "node",
    ),
    _m(
        "llem_sampler_gaps_total",
        COUNTER,
        "node device",
        "Intervals with no energy for a device since the sampler started (failed read, "
        "counter reset, implausible step).",
        "node",
    ),
    _m(
        "llem_sampler_sensor_errors_total",
        COUNTER,
        "node device",
        "Failed reads of a device since the sampler started (error or device lost).",
        "node",
    ),
)

CLUSTER_METRICS: tuple[Metric, ...] = (
    _m(
        "llem_account_energy_joules_total",
        COUNTER,
        "cluster account partition source",
        "Energy of finished jobs merged into the ledger, per account and partition, in "
        "joules; source says measured or estimated.",
        "cluster",
    ),
    _m(
        "llem_account_co2e_grams_total",
        COUNTER,
        "cluster account partition",
        "Operational emissions of that energy (energy x PUE x grid intensity of each hour), "
        "in grams CO2e; llem_carbon_info names the factors.",
        "cluster",
    ),
    _m(
        "llem_carbon_info",
        GAUGE,
        "region source year basis pue",
        "Always 1: the grid intensity source and PUE behind llem_account_co2e_grams_total.",
        "cluster",
    ),
    _m(
        "llem_ledger_jobs",
        GAUGE,
        "cluster status",
        "Job runs in the ledger by status (complete, pending, incomplete).",
        "cluster",
    ),
    _m(
        "llem_aggregate_last_pass_timestamp_seconds",
        GAUGE,
        "",
        "When the last llem aggregate pass ended, Unix time in seconds.",
        "cluster",
    ),
    _m(
        "llem_aggregate_last_pass_duration_seconds",
        GAUGE,
        "",
        "How long the last llem aggregate pass took, in seconds.",
        "cluster",
    ),
    _m("llem_aggregate_passes_total", COUNTER, "", "llem aggregate passes recorded.", "cluster"),
    _m(
        "llem_aggregate_slices_merged_total",
        COUNTER,
        "",
        "Slices merged into the ledger by recorded passes (re-merges that changed nothing "
        "not counted).",
        "cluster",
    ),
    _m(
        "llem_aggregate_slices_quarantined_total",
        COUNTER,
        "",
        "Slices refused and quarantined, as logged in the ledger.",
        "cluster",
    ),
    _m(
        "llem_spool_slices",
        GAUGE,
        "",
        "Slices waiting in the spool for the next aggregate pass.",
        "cluster",
    ),
    _m(
        "llem_spool_oldest_slice_timestamp_seconds",
        GAUGE,
        "",
        "Modification time of the oldest slice waiting in the spool, Unix time in seconds "
        "(absent when the spool is empty).",
        "cluster",
    ),
)

ALL: Mapping[str, Metric] = {m.name: m for m in NODE_METRICS + CLUSTER_METRICS}
"""Every metric llem exports, by name."""


def escape(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Series = Sequence[tuple[Sequence[str], float]]


class Exposition:
    """Collects families in catalogue order and renders the text format (version 0.0.4)."""

    CACHE_MAX = 4096

    def __init__(
        self, catalogue: Iterable[Metric] = ALL.values(), cache: dict | None = None
    ) -> None:
        self._known = {m.name: m for m in catalogue}
        self._parts: list[str] = []
        self._cache = cache if cache is not None else {}
        """Rendered headers and series prefixes, kept between renders by a caller that
        writes the same series every interval (the node sampler); bounded."""
        if len(self._cache) > self.CACHE_MAX:
            self._cache.clear()

    def add(self, name: str, series: Series) -> None:
        """Add a family; each series is (label values in the declared order, value).

        A family without series is written as HELP and TYPE only. Undeclared names and wrong
        label counts raise ``ValueError``: nothing reaches a file that the catalogue (and so
        the documentation and the dashboard test) does not know.
        """
        cache = self._cache
        header = cache.get(name)
        if header is None:
            metric = self._known.get(name)
            if metric is None:
                raise ValueError(f"metric {name} is not in llem's catalogue (llem.exposition)")
            header = cache[name] = (
                f"# HELP {name} {metric.help}\n# TYPE {name} {metric.type}",
                metric.labels,
            )
        text, labels = header
        lines = [text]
        for values, value in series:
            key = (name, *values)
            prefix = cache.get(key)
            if prefix is None:
                if len(values) != len(labels):
                    raise ValueError(
                        f"{name}: {len(values)} label values for labels {', '.join(labels)}"
                    )
                pairs = ",".join(f'{k}="{escape(str(v))}"' for k, v in zip(labels, values))
                prefix = cache[key] = f"{name}{{{pairs}}} " if labels else f"{name} "
            lines.append(prefix + _number(value))
        self._parts.append("\n".join(lines))

    def text(self) -> str:
        return "\n".join(self._parts) + "\n" if self._parts else ""


def textfile_dir_problem(directory: Path) -> str | None:
    """Why llem must not write into ``directory`` (another user controls it), or None."""
    from llem.fsutil import dir_problem

    return dir_problem(directory)


def write_textfile(directory: Path, name: str, text: str, mode: int = 0o644) -> Path:
    """Write ``directory/name`` atomically for node_exporter's textfile collector.

    The temporary name starts with a dot and does not end in ``.prom``: the collector reads
    every ``*.prom`` file. No fsync: a crash loses a file that the next tick rewrites, and
    an fsync would cost more than the rest of a sampler tick.

    Raises:
        LlemError: the directory is missing, or another user controls it.
        OSError: the write itself failed.
    """
    problem = textfile_dir_problem(directory)
    if problem is not None:
        raise LlemError(f"metrics textfile directory {directory}: {problem}; not written")
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, directory / name)
    except BaseException:
        _unlink(tmp)
        raise
    return directory / name


def remove_textfile(directory: Path, name: str) -> None:
    _unlink(directory / name)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
