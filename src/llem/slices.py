"""The slice schema: what a node (or slurmctld) hands to the cluster ledger.

A slice is one JSON object with ``"schema": "llem.slice/2"`` and a ``kind``:

``job``
    one run of one job on one node: the job's metadata, its energy per device and UTC clock
    hour with provenance, its windows, and the node's own totals over the job's span.
    Natural key: (cluster, job_id, node, start_ns).
``node``
    hourly totals of one node per device: measured, attributed to jobs, unattributed
    remainder, and how many intervals had no data. Natural key per row: (cluster, node,
    hour_s, device); a later export of a partial hour (larger ``as_of_ns``) replaces it.
``header``
    what slurmctld knows of a job when it ends (EpilogSlurmctld): name, nodelist, account,
    user, exit code. Natural key: (cluster, job_id, end_ns).

Energies are integers in microjoules, times integers in nanoseconds since the epoch, hours
the epoch second of the UTC hour's start.

Version 2 (issue 18) adds, to job slices only and all optional: ``work`` and ``unit`` in a
window (the work it did) and ``merged`` (how many overlapping windows of one name, step and
unit it stands for, their energy counted once), and ``power``, the job's coarse power series (one point per device
per ``step_s``, at most :data:`MAX_POWER_POINTS`). A version 1 slice is a version 2 slice
without them, so older slices still validate and merge. Also optional (issue 19, no new
version: a slice without it is what it was): ``steps``, the job's Slurm steps on this node
(``batch``, ``extern``, ``0``, ...; ``other`` for the steps beyond the node's cap), each with
its span, CPU time and energy per device, a part of the job's split by the step's CPU time
(docs/methodology.md, "Steps"): per device, the steps together never exceed the job. :func:`validate` says precisely what is wrong with
a slice; a newer schema raises :class:`NewerSchema` instead, since it is not damage but a
sign that this llem must be upgraded.
"""

from __future__ import annotations

import json
import operator
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llem.errors import LedgerError
from llem.model import LABELLED

SCHEMA = "llem.slice/2"
SCHEMA_PREFIX = "llem.slice/"
SCHEMA_VERSION = 2
KINDS = ("job", "node", "header")

# Names that may appear in a file name: admin-controlled identifiers only (cluster, node, job
# id). Anything a user chooses (job name, tag, window name) lives inside the JSON.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""The one rule for identifiers that name files, folders and rows: cluster names, node names,
job ids. The characters Slurm allows in node names (letters, digits, ``.``, ``_``, ``-``), plus
``+`` of heterogeneous job ids; never a ``/``, never starting with ``.`` (no ``..``, no hidden
file), at most 128 characters. Checked once where a name enters llem (``node.slurm``,
``NodePaths``, slice validation) with this same rule; see :func:`check_identifier`."""
SAFE_NAME = re.compile(rf"^{IDENTIFIER.pattern}\Z")
IDENTIFIER_RULE = (
    "letters, digits, '.', '_', '+', '-', not starting with one of '._+-', at most 128"
)
_IN_FILE_NAME_DOT = "%2E"
"""How a dot inside an identifier is written in a spool file name, whose parts dots separate."""

COMPONENTS = ("cpu", "dram", "gpu", "psys", "platform", "other")
SOURCES = ("measured", "estimated")
JOB_STATES = ("running", "ended", "sealed", "exported")
WINDOW_STATUSES = ("open", "closed", "abandoned")
MIN_TS_NS = 946_684_800 * 10**9  # 2000-01-01: a clock before that is broken
MAX_TS_NS = 4_102_444_800 * 10**9  # 2100-01-01
# 100 kW for an hour on one device: beyond any real device, so a sign of garbage.
MAX_DEVICE_HOUR_UJ = 100_000 * 3600 * 10**6
MAX_POWER_POINTS = 20_000
"""The most points of a job slice's power series (all devices together): the node widens the
step (1 min, 2 min, 5 min, ...) until the series fits."""
MAX_STEPS = 65
"""The most steps of a job slice: the node's 64 per job run, and ``other`` for the rest."""
STEP_NAME = re.compile(r"[A-Za-z0-9_+]{1,32}")
"""A step's name: Slurm's (``batch``, ``extern``, ``interactive``, ``0``, ``1``...) or
``other``."""
MAX_UNIT_CHARS = 32
"""The longest unit of work of a window (``tokens``, ``samples``, any word)."""
MAX_WORK = 1e18
"""The largest work count a window may carry: a count beyond it is a bug, not work."""


class SliceError(ValueError):
    """A slice is damaged or foreign; the message is the precise reason."""


class NewerSchema(SliceError):
    """A slice written by a newer llem: upgrade the aggregator, do not quarantine."""


INT64_MAX = 2**63 - 1
"""The largest integer SQLite stores: anything beyond is damage, not data."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    """``repr(value)``, cut short: a reason names the value, it does not copy a huge one."""
    if type(value) is str and len(value) <= _REPR.maxstring:
        # the common case (device keys, in every slice's checks): reprlib gives repr(value)
        # whenever that fits, and costs several times more to say so
        shown = repr(value)
        if len(shown) <= _REPR.maxstring:
            return shown
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit, say
        return f"<{type(value).__name__}>"


def _is_int(value: Any) -> bool:
    return type(value) is int and -INT64_MAX - 1 <= value <= INT64_MAX


def _need(obj: Mapping, key: str, where: str) -> Any:
    if key not in obj:
        raise SliceError(f"{where}: missing '{key}'")
    return obj[key]


def _str(obj: Mapping, key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key) if optional else _need(obj, key, where)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise SliceError(f"{where}: '{key}' must be a non-empty string, got {_show(value)}")
    return value


def is_identifier(value: Any) -> bool:
    """Whether ``value`` is a string that follows :data:`IDENTIFIER`."""
    return type(value) is str and IDENTIFIER.fullmatch(value) is not None


def check_identifier(what: str, value: Any) -> str:
    """Return ``value`` if it is an identifier (see :data:`IDENTIFIER`).

    Raises:
        SliceError: (a ValueError) it is not; the message names ``what`` and the rule.
    """
    if not is_identifier(value):
        raise SliceError(
            f"{what} {_show(value)} has characters outside [A-Za-z0-9._+-] or "
            f"breaks the rule for names ({IDENTIFIER_RULE})"
        )
    return value


def _safe(obj: Mapping, key: str, where: str) -> str:
    return check_identifier(f"{where}: '{key}'", _str(obj, key, where))


def _ts(obj: Mapping, key: str, where: str, *, optional: bool = False) -> int | None:
    value = obj.get(key) if optional else _need(obj, key, where)
    if value is None and optional:
        return None
    if not _is_int(value) or not MIN_TS_NS <= value <= MAX_TS_NS:
        raise SliceError(
            f"{where}: '{key}' must be epoch nanoseconds (2000-2100), got {_show(value)}"
        )
    return value


# Optional job fields, each a string (or integer) or null: anything else could not be stored.
JOB_TEXT = (
    "array_job_id",
    "array_task_id",
    "user",
    "account",
    "partition",
    "nodelist",
    "name",
    "tag",
    "state",
)
JOB_INTS = ("uid", "gid", "num_nodes", "cpus")
HEADER_TEXT = (
    "array_job_id",
    "array_task_id",
    "user",
    "account",
    "partition",
    "nodelist",
    "name",
    "state",
)
HEADER_INTS = (
    "uid",
    "num_nodes",
    "exit_code",
    "signal",
    "derived_exit_code",
    "derived_signal",
)


def _optional_fields(job: Mapping, text: tuple[str, ...], ints: tuple[str, ...]) -> None:
    for key in text:
        value = job.get(key)
        if value is not None and type(value) is not str:
            raise SliceError(f"job: '{key}' must be a string or null, got {_show(value)}")
    for key in ints:
        value = job.get(key)
        if value is not None and not _is_int(value):
            raise SliceError(f"job: '{key}' must be an integer or null, got {_show(value)}")


def _energy(value: Any, where: str, limit_uj: int | None = None) -> int:
    if type(value) is not int:
        raise SliceError(f"{where}: energy must be an integer of microjoules, got {_show(value)}")
    if value < 0:
        raise SliceError(f"{where}: negative energy {value} uJ")
    limit_uj = INT64_MAX if limit_uj is None else limit_uj
    if value > limit_uj:
        raise SliceError(f"{where}: impossible energy {value} uJ (more than {limit_uj})")
    return value


def _hour(value: Any, where: str) -> int:
    if not _is_int(value) or value % 3600 or not MIN_TS_NS <= value * 10**9 <= MAX_TS_NS:
        raise SliceError(
            f"{where}: hour must be the epoch second of a UTC hour, got {_show(value)}"
        )
    return value


def _span(start_ns: int, end_ns: int | None, where: str) -> None:
    if end_ns is not None and end_ns < start_ns:
        raise SliceError(f"{where}: end before start ({end_ns} < {start_ns})")


def check_schema(data: Any) -> None:
    """Raise SliceError unless ``data`` is a slice of a schema version this llem reads.

    Raises:
        NewerSchema: a later ``llem.slice/N``; the admin must upgrade llem.
        SliceError: not a slice, or an unknown schema.
    """
    if not isinstance(data, dict):
        raise SliceError("not a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise SliceError(f"foreign file: schema is {_show(schema)}, not {_show(SCHEMA)}")
    version = schema[len(SCHEMA_PREFIX) :]
    if not version.isdigit():
        raise SliceError(f"foreign file: schema {_show(schema)} has no version number")
    if int(version) > SCHEMA_VERSION:
        raise NewerSchema(
            f"schema {_show(schema)} is newer than this llem reads ({SCHEMA}); upgrade llem on the "
            "aggregator (the slice is left in the spool)"
        )
    if int(version) < 1:
        raise SliceError(f"foreign file: unknown schema {_show(schema)}")


def validate(data: Any) -> dict:
    """Check a parsed slice completely; return it unchanged.

    Raises:
        NewerSchema, SliceError: see :func:`check_schema`; SliceError names the field and the
            value that is wrong.
    """
    check_schema(data)
    kind = data.get("kind")
    if kind not in KINDS:
        raise SliceError(f"unknown slice kind {_show(kind)} (expected one of {', '.join(KINDS)})")
    _safe(data, "cluster", "slice")
    _ts(data, "created_ns", "slice")
    if kind == "header":
        _validate_header(data)
        return data
    _safe(data, "node", "slice")
    devices = _validate_devices(data)
    if kind == "job":
        _validate_job(data, devices)
    else:
        _validate_node(data, devices)
    return data


def _validate_devices(data: Mapping) -> dict:
    devices = _need(data, "devices", "slice")
    if not isinstance(devices, dict):
        raise SliceError("slice: 'devices' must be an object of device key -> description")
    for key, dev in devices.items():
        where = f"device {_show(key)}"
        if not isinstance(dev, dict):
            raise SliceError(f"{where}: must be an object")
        if dev.get("component") not in COMPONENTS:
            raise SliceError(f"{where}: unknown component {_show(dev.get('component'))}")
        if dev.get("source") not in SOURCES:
            raise SliceError(
                f"{where}: source must be measured or estimated, got {_show(dev.get('source'))}"
            )
        _str(dev, "sensor", where)
        _str(dev, "method", where)
        if dev.get("name") is not None and type(dev["name"]) is not str:
            raise SliceError(f"{where}: 'name' must be a string or null, got {_show(dev['name'])}")
    return devices


def _validate_job(data: Mapping, devices: Mapping) -> None:
    job = _need(data, "job", "slice")
    if not isinstance(job, dict):
        raise SliceError("slice: 'job' must be an object")
    start_ns, end_ns = _validate_job_fields(job)
    first_hour, last_hour = start_ns // 10**9 // 3600 * 3600, end_ns // 10**9 // 3600 * 3600
    _validate_energy(_need(data, "energy", "slice"), devices, first_hour, last_hour)
    windows = data.get("windows", [])
    if not isinstance(windows, list):
        raise SliceError(f"slice: 'windows' must be a list, got {_show(windows)}")
    for i, win in enumerate(windows):
        _validate_window(win, f"windows[{i}]")
    dropped = data.get("windows_dropped", 0)  # windows beyond the slice's cap, counted
    if not _is_int(dropped) or not 0 <= dropped < 2**63:
        raise SliceError(f"slice: 'windows_dropped' must be a count, got {_show(dropped)}")
    _validate_node_totals(_need(data, "node_totals", "slice"), devices)
    if "steps" in data:
        _validate_steps(data["steps"], data["energy"], devices)
    if "power" in data:
        _validate_power(data["power"], devices, start_ns, end_ns)


def _validate_steps(steps: Any, energy: list, devices: Mapping) -> None:
    """The job's steps: ``[{step, start_ns, end_ns, cpu_ns, energy: {device: uj}}, ...]``,
    distinct names, and per device the steps' energy at most the job's."""
    if not isinstance(steps, list):
        raise SliceError("slice: 'steps' must be a list")
    if len(steps) > MAX_STEPS:
        raise SliceError(f"slice: {len(steps)} steps, more than {MAX_STEPS}")
    job: dict[str, int] = {}
    for row in energy:
        job[row["device"]] = job.get(row["device"], 0) + row["energy_uj"]
    seen: set[str] = set()
    used: dict[str, int] = {}
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(step, dict):
            raise SliceError(f"{where}: must be an object")
        name = step.get("step")
        if type(name) is not str or not STEP_NAME.fullmatch(name):
            raise SliceError(f"{where}: 'step' must be a step name, got {_show(name)}")
        if name in seen:
            raise SliceError(f"{where}: step {name!r} twice")
        seen.add(name)
        _span(_ts(step, "start_ns", where), _ts(step, "end_ns", where), where)
        cpu = step.get("cpu_ns")
        if not _is_int(cpu) or cpu < 0:
            raise SliceError(f"{where}: 'cpu_ns' must be a count, got {_show(cpu)}")
        by_device = step.get("energy")
        if not isinstance(by_device, dict):
            raise SliceError(f"{where}: 'energy' must be an object of device -> uJ")
        for key, value in by_device.items():
            if key not in devices:
                raise SliceError(f"{where}: unknown device {_show(key)}")
            _energy(value, f"{where}.energy[{_show(key)}]")
            used[key] = used.get(key, 0) + value
    for key, uj in used.items():
        if uj > job.get(key, 0):
            raise SliceError(f"steps: {uj} uJ of {_show(key)}, more than the job's")


def _validate_power(power: Any, devices: Mapping, start_ns: int, end_ns: int) -> None:
    """The job's coarse power series: ``{"step_s": S, "points": [{t_s, device, energy_uj,
    span_ms}, ...]}``, a point being the energy a device used in the bucket starting at
    ``t_s`` (epoch seconds, a multiple of S) over ``span_ms`` of data."""
    if not isinstance(power, dict):
        raise SliceError("slice: 'power' must be an object")
    step = power.get("step_s")
    if not _is_int(step) or not 1 <= step <= 86400:
        raise SliceError(f"power: 'step_s' must be seconds (1 to 86400), got {_show(step)}")
    points = power.get("points")
    if not isinstance(points, list):
        raise SliceError("power: 'points' must be a list")
    if len(points) > MAX_POWER_POINTS:
        raise SliceError(f"power: {len(points)} points, more than {MAX_POWER_POINTS}")
    # A bucket may start before the job: the intervals overlapping its start count whole.
    first, last = start_ns // 10**9 - step - 3600, end_ns // 10**9 + step
    for i, p in enumerate(points):
        where = f"power.points[{i}]"
        if not isinstance(p, dict):
            raise SliceError(f"{where}: must be an object")
        if not _known(p.get("device"), devices):
            raise SliceError(f"{where}: device {_show(p.get('device'))} is not in 'devices'")
        t_s = p.get("t_s")
        if not _is_int(t_s) or t_s % step or not first <= t_s <= last:
            raise SliceError(
                f"{where}: 't_s' must be a step start within the job, got {_show(t_s)}"
            )
        span = p.get("span_ms")
        if not _is_int(span) or not 0 < span <= step * 1000:
            raise SliceError(f"{where}: 'span_ms' must be within the step, got {_show(span)}")
        _energy(p.get("energy_uj"), f"{where}.energy_uj", MAX_DEVICE_HOUR_UJ)


def _validate_job_fields(job: Mapping) -> tuple[int, int]:
    """Check a job slice's ``job`` object; return its start and end (ns)."""
    _safe(job, "job_id", "job")
    start_ns = _ts(job, "start_ns", "job")
    end_ns = _ts(job, "end_ns", "job")
    _span(start_ns, end_ns, "job")
    _optional_fields(job, JOB_TEXT, JOB_INTS)
    coverage = job.get("coverage")
    if coverage is not None and (type(coverage) not in (int, float) or not 0 <= coverage <= 1):
        raise SliceError(f"job: coverage must be between 0 and 1, got {_show(coverage)}")
    num_nodes = job.get("num_nodes")
    if num_nodes is not None and num_nodes < 1:
        raise SliceError(f"job: num_nodes must be a positive integer, got {_show(num_nodes)}")
    state = job.get("state")
    if state is not None and state not in JOB_STATES:
        raise SliceError(f"job: unknown state {_show(state)}")
    for key in ("flags", "gpus"):
        items = job.get(key, [])
        if not isinstance(items, list) or not all(type(i) is str for i in items):
            raise SliceError(f"job: '{key}' must be a list of strings, got {_show(items)}")
    _validate_attribution(job.get("attribution"))
    return start_ns, end_ns


ATTRIBUTION_POLICIES = ("exclusive", "hybrid", "use", "allocation")


def _validate_attribution(value: Any) -> None:
    """The optional ``job.attribution`` object: its policy, and idle powers in watts."""
    if value is None:
        return
    if not isinstance(value, dict) or value.get("policy") not in ATTRIBUTION_POLICIES:
        raise SliceError(
            f"job: 'attribution' must be an object with a policy among "
            f"{', '.join(ATTRIBUTION_POLICIES)}, got {str(value)[:200]!r}"
        )
    idle = value.get("idle_w", {})
    if not isinstance(idle, dict) or not all(
        isinstance(v, dict)
        and type(v.get("w")) in (int, float)
        and v["w"] >= 0
        and type(v.get("source")) is str
        for v in idle.values()
    ):
        raise SliceError(
            f"job: 'attribution.idle_w' must map devices to {{w, source}}, got {str(idle)[:200]!r}"
        )


def _validate_energy(rows: Any, devices: Mapping, first_hour: int, last_hour: int) -> None:
    """Check a job slice's energy rows: known devices, hours within the job, sane energy."""
    if not isinstance(rows, list):
        raise SliceError("slice: 'energy' must be a list")
    # Fast path for valid rows (tens per slice, millions per pass); the slow path names the
    # first row that is wrong and what is wrong with it.
    try:
        for device, hour, method, uj in map(_ENERGY_FIELDS, rows):
            if not (
                type(device) is str
                and device in devices
                and type(hour) is int
                and first_hour <= hour <= last_hour
                and not hour % 3600
                and type(uj) is int
                and 0 <= uj <= MAX_DEVICE_HOUR_UJ
                and type(method) is str
                and method
            ):
                raise LookupError
    except (LookupError, TypeError):
        for i, row in enumerate(rows):
            _energy_row(row, f"energy[{i}]", devices, first_hour, last_hour)


def _validate_node_totals(totals: Any, devices: Mapping) -> None:
    """Check the node's own totals over the job's span, per device."""
    if not isinstance(totals, dict):
        raise SliceError("slice: 'node_totals' must be an object")
    for key, row in totals.items():
        if not _node_total_is_valid(key, row, devices):  # fast path; else say what is wrong
            _node_total_row(key, row, devices)


REMAINDER_PART_FIELDS = tuple(f"{label}_uj" for label in LABELLED)
"""Optional parts of ``remainder_uj`` by label (node totals and node hours): absent in slices
written before the labels existed, which the ledger keeps as NULL (not known)."""


def _remainder_parts(row: Mapping, remainder: int, where: str) -> None:
    """The labelled parts of a remainder: absent, or energies that fit in it (the hourly
    split rounds each figure on its own: a few uJ of slack, as for attributed + remainder)."""
    for field in REMAINDER_PART_FIELDS:
        if field in row and _energy(row[field], f"{where}.{field}") > remainder + 1000:
            raise SliceError(
                f"{where}: {field} ({row[field]} uJ) exceeds remainder_uj ({remainder} uJ)"
            )


def _node_total_is_valid(key: Any, row: Any, devices: Mapping) -> bool:
    if key not in devices or type(row) is not dict:
        return False
    try:
        m, a, r = _TOTAL_FIELDS(row)
    except KeyError:
        return False
    gaps = row.get("gap_intervals", 0)
    if not (
        type(m) is int
        and type(a) is int
        and type(r) is int
        and type(gaps) is int
        and 0 <= min(m, a, r, gaps)
        and max(m, a, r, gaps) <= INT64_MAX
    ):
        return False
    try:
        _remainder_parts(row, r, "")
    except SliceError:
        return False
    return True


def _node_total_row(key: Any, row: Any, devices: Mapping) -> None:
    where = f"node_totals[{_show(key)}]"
    if key not in devices or not isinstance(row, dict):
        raise SliceError(f"{where}: unknown device or not an object")
    for field in ("measured_uj", "attributed_uj", "remainder_uj"):
        _energy(row.get(field), f"{where}.{field}")
    _remainder_parts(row, row["remainder_uj"], where)
    gaps = row.get("gap_intervals", 0)
    if not _is_int(gaps) or gaps < 0:
        raise SliceError(
            f"{where}: 'gap_intervals' must be a non-negative integer, got {_show(gaps)}"
        )


def _known(device: Any, devices: Mapping) -> bool:
    return type(device) is str and device in devices


_ENERGY_FIELDS = operator.itemgetter("device", "hour_s", "method", "energy_uj")
_TOTAL_FIELDS = operator.itemgetter("measured_uj", "attributed_uj", "remainder_uj")


def _energy_row(row: Any, where: str, devices: Mapping, first_hour: int, last_hour: int) -> None:
    if not isinstance(row, dict):
        raise SliceError(f"{where}: must be an object")
    if not _known(row.get("device"), devices):
        raise SliceError(f"{where}: device {_show(row.get('device'))} is not in 'devices'")
    hour = _hour(row.get("hour_s"), where)
    if not first_hour <= hour <= last_hour:
        raise SliceError(f"{where}: hour {hour} outside the job's span")
    _energy(row.get("energy_uj"), where, MAX_DEVICE_HOUR_UJ)
    _str(row, "method", where)


def _validate_window(win: Any, where: str) -> None:
    if not isinstance(win, dict):
        raise SliceError(f"{where}: must be an object")
    _str(win, "name", where)
    step_id = win.get("step_id")
    if step_id is not None and type(step_id) is not str:
        raise SliceError(f"{where}: 'step_id' must be a string or null, got {_show(step_id)}")
    start_ns = _ts(win, "start_ns", where)
    _span(start_ns, _ts(win, "end_ns", where, optional=True), where)
    if win.get("status") not in WINDOW_STATUSES:
        raise SliceError(f"{where}: unknown status {_show(win.get('status'))}")
    work, unit = win.get("work"), win.get("unit")
    if work is not None and (type(work) not in (int, float) or not 0 <= work <= MAX_WORK):
        raise SliceError(f"{where}: 'work' must be a count (0 to {MAX_WORK:g}), got {_show(work)}")
    if unit is not None and (
        type(unit) is not str or not 0 < len(unit) <= MAX_UNIT_CHARS or not unit.isprintable()
    ):
        raise SliceError(
            f"{where}: 'unit' must be a word of at most {MAX_UNIT_CHARS} characters, "
            f"got {_show(unit)}"
        )
    merged = win.get("merged", 1)
    if not _is_int(merged) or merged < 1:
        raise SliceError(f"{where}: 'merged' must be a count of windows, got {_show(merged)}")
    energy = win.get("energy") or {}
    if not isinstance(energy, dict):
        raise SliceError(f"{where}: 'energy' must be an object of device -> uJ")
    for key, value in energy.items():
        _energy(value, f"{where}.energy[{_show(key)}]")


def _validate_node(data: Mapping, devices: Mapping) -> None:
    _ts(data, "as_of_ns", "slice")
    _hour(data.get("from_hour_s"), "slice.from_hour_s")
    rows = _need(data, "hours", "slice")
    if not isinstance(rows, list):
        raise SliceError("slice: 'hours' must be a list")
    for i, row in enumerate(rows):
        where = f"hours[{i}]"
        if not isinstance(row, dict):
            raise SliceError(f"{where}: must be an object")
        if not _known(row.get("device"), devices):
            raise SliceError(f"{where}: device {_show(row.get('device'))} is not in 'devices'")
        _hour(row.get("hour_s"), where)
        measured = _energy(row.get("measured_uj"), f"{where}.measured_uj", MAX_DEVICE_HOUR_UJ)
        attributed = _energy(row.get("attributed_uj"), f"{where}.attributed_uj")
        remainder = _energy(row.get("remainder_uj"), f"{where}.remainder_uj")
        if attributed + remainder > measured + 1000:
            raise SliceError(
                f"{where}: attributed + remainder ({attributed + remainder} uJ) "
                f"exceeds measured ({measured} uJ)"
            )
        _remainder_parts(row, remainder, where)
        for field in ("intervals", "gap_intervals", "covered_ns"):
            value = row.get(field)
            if not _is_int(value) or value < 0:
                raise SliceError(f"{where}: '{field}' must be a non-negative integer")
        if row["covered_ns"] > 3600 * 10**9 + 10**9:
            raise SliceError(f"{where}: covered_ns exceeds one hour")


def _validate_header(data: Mapping) -> None:
    job = _need(data, "job", "slice")
    if not isinstance(job, dict):
        raise SliceError("slice: 'job' must be an object")
    _safe(job, "job_id", "job")
    end_ns = _ts(job, "end_ns", "job")
    start_ns = _ts(job, "start_ns", "job", optional=True)
    if start_ns is not None:
        _span(start_ns, end_ns, "job")
    _optional_fields(job, HEADER_TEXT, HEADER_INTS)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(value: Any) -> Any:
    """``value`` with every string's lone surrogates (text that is not Unicode) as U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {replace_lone_surrogates(k): replace_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(v) for v in value]
    return value


def file_name(data: Mapping) -> str:
    """The spool file name of a validated slice: admin-controlled identifiers only.

    ``<kind>.<cluster>.<node>.<key>.<created_ns>.json``, a dot inside a part written ``%2E``;
    the node of a header slice is ``ctld``. Nothing a user chooses (job name, tag, window
    names) ever appears in it.
    """
    kind = data["kind"]
    node = data.get("node", "ctld") if kind != "header" else "ctld"
    if kind == "job":
        key = f"{data['job']['job_id']}-{data['job']['start_ns']}"
    elif kind == "header":
        key = f"{data['job']['job_id']}-{data['job']['end_ns']}"
    else:
        key = f"{data['from_hour_s']}-{data['as_of_ns']}"
    for part in (data["cluster"], node):
        if not is_identifier(part):
            raise SliceError(f"unsafe name {_show(part)} for a file name")
    parts = (kind, data["cluster"], node, key, str(data["created_ns"]))
    return ".".join(p.replace(".", _IN_FILE_NAME_DOT) for p in parts) + ".json"


def parse_file_name(name: str) -> dict[str, str]:
    """The parts of a slice file name; raise SliceError for a name llem never writes.

    A dot inside an identifier (node ``n1.example``) is written ``%2E`` in the file name.
    """
    parts = name.split(".")
    if len(parts) != 6 or parts[-1] != "json" or parts[0] not in KINDS:
        raise SliceError(
            f"file name {_show(name)} is not a slice name "
            "(<kind>.<cluster>.<node>.<key>.<created_ns>.json)"
        )
    parts = [p.replace(_IN_FILE_NAME_DOT, ".") for p in parts]
    return {
        "kind": parts[0],
        "cluster": parts[1],
        "node": parts[2],
        "key": parts[3],
        "created_ns": parts[4],
    }


def check_name_matches(name: str, data: Mapping) -> None:
    """Refuse a slice whose content does not match its file name (kind, cluster, node).

    Raises:
        SliceError: a mismatch, named precisely.
    """
    parts = parse_file_name(name)
    expected_node = "ctld" if data["kind"] == "header" else data["node"]
    for field, value in (
        ("kind", data["kind"]),
        ("cluster", data["cluster"]),
        ("node", expected_node),
    ):
        if parts[field] != value:
            raise SliceError(
                f"{field} {_show(value)} in the slice does not match "
                f"{_show(parts[field])} "
                f"in its file name"
            )


# -- the spool ------------------------------------------------------------------------------


def encode(data: dict) -> bytes:
    """A slice as compact, key-sorted UTF-8 JSON (the same slice gives the same bytes)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def check_spool_dir(path: Path, *, create: bool = True) -> Path:
    """Make sure the spool is a real directory that no ordinary user can write into.

    Raises:
        LedgerError: a symlink, not a directory, writable by others, or cannot be created.
    """
    from llem.fsutil import dir_problem

    problem = dir_problem(
        path, create_mode=0o700 if create else None, group_write_ok=True, owner_check=False
    )
    if problem is None:
        return path
    if problem.startswith(("cannot be used", "permission denied")):
        raise LedgerError(f"{path}: cannot use the spool: {problem.split(': ', 1)[-1]}")
    extra = "; anyone could drop slices there" if "writable" in problem else ""
    raise LedgerError(f"{path}: the spool {problem}{extra}")


def checked(data: dict) -> dict:
    """A slice about to leave its producer, validated as the aggregator will validate it.

    Raises:
        LedgerError: the slice is invalid (a bug in the producer: refuse to ship it).
    """
    try:
        return validate(data)
    except SliceError as e:
        raise LedgerError(f"refusing to export an invalid slice: {e}") from e
