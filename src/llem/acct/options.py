"""``llem-acct``'s command line as data: sacct's time, job, state and list syntax, and
:class:`AcctOptions`, the one object that flows past the CLI (:func:`build_options`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from llem.acct.errors import AcctUsageError
from llem.acct.fields import ENERGY_PREFIXES, TOTAL_KEYS, Column, parse_format
from llem.cluster.acct_queries import JobSpec, RunFilter
from llem.units import NS_PER_S

# -- sacct's syntax --------------------------------------------------------------------------

_UNITS_S = {
    "": 1,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_NAMED_HOURS = {"midnight": 0, "noon": 12, "fika": 15, "teatime": 16}


def parse_time(text: str, now: datetime, option: str = "-S/--starttime") -> datetime:
    """sacct's time syntax, in local time (``now`` is naive local time).

    Accepted: ``YYYY-MM-DD[THH:MM[:SS]]``, ``MMDD[YY]``, ``MM/DD[/YY]``, ``MM.DD[.YY]``,
    ``HH:MM[:SS]`` (today), ``now[{+|-}N[units]]`` (units: seconds (default), minutes, hours,
    days, weeks), ``today``, ``midnight`` (today 00:00), ``noon``, ``fika`` (15:00),
    ``teatime`` (16:00).

    Raises:
        AcctUsageError: anything else, or an impossible date.
    """
    t = text.strip().lower()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        if t in ("today", "midnight"):
            return today
        if t in _NAMED_HOURS:
            return today.replace(hour=_NAMED_HOURS[t])
        m = re.fullmatch(r"now(?:([+-])(\d+)([a-z]*))?", t)
        if m:
            if not m.group(1):
                return now.replace(microsecond=0)
            if m.group(3) not in _UNITS_S:
                raise ValueError(f"unknown unit '{m.group(3)}'")
            delta = timedelta(seconds=int(m.group(2)) * _UNITS_S[m.group(3)])
            return (now + delta if m.group(1) == "+" else now - delta).replace(microsecond=0)
        m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})(?:t(\d{1,2}):(\d{2})(?::(\d{2}))?)?", t)
        if m:
            y, mo, d, hh, mm, ss = (int(g) if g else 0 for g in m.groups())
            return datetime(y, mo, d, hh, mm, ss)
        m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", t)
        if m:
            return today.replace(
                hour=int(m.group(1)), minute=int(m.group(2)), second=int(m.group(3) or 0)
            )
        m = (
            re.fullmatch(r"(\d{2})(\d{2})(\d{2})?", t)
            or re.fullmatch(r"(\d{1,2})/(\d{1,2})(?:/(\d{2}))?", t)
            or re.fullmatch(r"(\d{1,2})\.(\d{1,2})(?:\.(\d{2}))?", t)
        )
        if m:
            year = 2000 + int(m.group(3)) if m.group(3) else now.year
            return datetime(year, int(m.group(1)), int(m.group(2)))
    except ValueError as e:
        raise AcctUsageError(option, f"invalid time '{text}': {e}") from None
    raise AcctUsageError(
        option,
        f"invalid time '{text}' (use YYYY-MM-DD[THH:MM[:SS]], MMDD[YY], HH:MM, "
        "now[-N[units]], today or midnight)",
    )


def parse_since(text: str) -> timedelta:
    """``--since``: ``30d``, ``12h``, ``2w``, ``90m`` (minutes), ``45s``.

    Raises:
        AcctUsageError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        raise AcctUsageError("--since", f"invalid duration '{text}' (use e.g. 30d, 12h, 2w, 90m)")
    return timedelta(seconds=int(m.group(1)) * _UNITS_S[m.group(2)])


def parse_jobs(text: str) -> tuple[JobSpec, ...]:
    """``-j``: comma-separated ``JOB``, ``JOB.STEP`` (step id or window name), ``JOB_TASK``.

    Raises:
        AcctUsageError: an item that is none of these.
    """
    specs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:_(\d+))?(?:\.(.+))?", item)
        if not m:
            raise AcctUsageError(
                "-j/--jobs", f"invalid job id '{item}' (use JOB, JOB.STEP or JOB_TASK)"
            )
        specs.append(JobSpec(m.group(1), m.group(2), m.group(3)))
    if not specs:
        raise AcctUsageError("-j/--jobs", "no job ids given")
    return tuple(specs)


STATE_ALIASES = {
    "CD": "COMPLETED",
    "COMPLETED": "COMPLETED",
    "F": "FAILED",
    "FAILED": "FAILED",
    "SIGNALED": "SIGNALED",
    "CA": "SIGNALED",
    "CANCELLED": "SIGNALED",
    "TO": "SIGNALED",
    "TIMEOUT": "SIGNALED",
    "OOM": "SIGNALED",
    "OUT_OF_MEMORY": "SIGNALED",
    "NF": "SIGNALED",
    "NODE_FAIL": "SIGNALED",
    "PR": "SIGNALED",
    "PREEMPTED": "SIGNALED",
    "UNKNOWN": "UNKNOWN",
}


def parse_states(text: str) -> tuple[str, ...]:
    """``-s``: sacct state names or abbreviations, mapped to the states the ledger knows.

    CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL and PREEMPTED select ``SIGNALED`` jobs (the
    ledger's header cannot tell them apart, see docs/ledger.md).

    Raises:
        AcctUsageError: an unknown state, or a state of jobs that have not ended.
    """
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        if item not in STATE_ALIASES:
            raise AcctUsageError(
                "-s/--state",
                f"unknown or unsupported state '{item}': the "
                "ledger holds ended jobs (COMPLETED/CD, FAILED/F, SIGNALED, "
                "CANCELLED/CA, TIMEOUT/TO, OUT_OF_MEMORY/OOM, NODE_FAIL/NF, "
                "PREEMPTED/PR, UNKNOWN)",
            )
        if STATE_ALIASES[item] not in out:
            out.append(STATE_ALIASES[item])
    return tuple(out)


def split_list(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option value into a tuple; None stays None."""
    if text is None:
        return None
    return tuple(item.strip() for item in text.split(",") if item.strip())


def spec_text(spec: JobSpec) -> str:
    """A ``-j`` item as text again: ``JOB``, ``JOB_TASK``, ``JOB.STEP``."""
    text = spec.job_id + (f"_{spec.task_id}" if spec.task_id is not None else "")
    return text + (f".{spec.step}" if spec.step else "")


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcctOptions:
    """Everything the command line says, parsed; the only thing that flows past the CLI.

    Attributes:
        ledger: the ledger's path.
        filter: the run selection.
        allocations: ``-X``: no step (window) rows.
        duplicates: ``-D``: every run of a requeued job, not only its latest.
        columns: the fields to show.
        mode: ``table``, ``parsable`` (``-p``), ``parsable2`` (``-P``) or ``json``.
        delimiter: of parsable output.
        noheader: ``-n``.
        units: ``--units`` (K, M, G, T, P) for energies, or None for automatic.
        totals_by: ``-T`` key, or None.
        statement: ``--statement``.
        window: (start, end) as local datetimes for messages (None where open).
        fields_given: whether ``-o`` was given (JSON then shows only those fields).
    """

    ledger: str
    filter: RunFilter
    allocations: bool = False
    duplicates: bool = False
    columns: tuple[Column, ...] = ()
    mode: str = "table"
    delimiter: str = "|"
    noheader: bool = False
    units: str | None = None
    totals_by: str | None = None
    statement: bool = False
    window: tuple[datetime | None, datetime | None] = (None, None)
    fields_given: bool = False


def build_options(
    *,
    ledger: str,
    cluster: str,
    current_user: str,
    is_root: bool,
    now: datetime,
    jobs: str | None = None,
    users: str | None = None,
    allusers: bool = False,
    accounts: str | None = None,
    partitions: str | None = None,
    states: str | None = None,
    starttime: str | None = None,
    endtime: str | None = None,
    since: str | None = None,
    nodelist: str | None = None,
    allocations: bool = False,
    fmt: str | None = None,
    noheader: bool = False,
    parsable: bool = False,
    parsable2: bool = False,
    delimiter: str | None = None,
    as_json: bool = False,
    units: str | None = None,
    clusters: str | None = None,
    totals: str | None = None,
    statement: bool = False,
    names: str | None = None,
    duplicates: bool = False,
) -> AcctOptions:
    """Turn the raw option values into :class:`AcctOptions`, with sacct's defaults.

    Defaults as sacct: without ``-S`` and ``-j``, runs since 00:00 today; ``-E`` defaults
    to now; without ``-a``, ``-u`` or ``-j`` a user sees their own runs (root: everyone's).
    ``cluster`` is the configured cluster: the default of ``-M`` (``default``, the
    unconfigured value, and ``-M all`` select every cluster).

    Raises:
        AcctUsageError: a bad value or a bad combination.
    """
    _check_combinations(
        since=since,
        starttime=starttime,
        parsable=parsable,
        parsable2=parsable2,
        as_json=as_json,
        statement=statement,
        totals=totals,
        fmt=fmt,
    )
    totals_by = _totals_key(totals)
    job_specs = parse_jobs(jobs) if jobs is not None else None
    start, end = _time_window(
        now, since=since, starttime=starttime, endtime=endtime, default_today=job_specs is None
    )
    nodes = _node_list(nodelist)
    units = _energy_unit(units)
    f = RunFilter(
        clusters=_cluster_list(clusters, cluster),
        users=_user_list(
            users,
            allusers=allusers,
            own_only=job_specs is None and not is_root,
            current_user=current_user,
        ),
        accounts=split_list(accounts),
        partitions=split_list(partitions),
        states=parse_states(states) if states is not None else None,
        start_ns=_to_ns(start),
        end_ns=_to_ns(end),
        jobs=job_specs,
        nodes=nodes,
        names=split_list(names),
    )
    mode = "json" if as_json else "parsable" if parsable else "parsable2" if parsable2 else "table"
    return AcctOptions(
        ledger=ledger,
        filter=f,
        allocations=allocations,
        duplicates=duplicates,
        columns=tuple(parse_format(fmt, totals_by)),
        mode=mode,
        delimiter="|" if delimiter is None else delimiter,
        noheader=noheader,
        units=units,
        totals_by=totals_by,
        statement=statement,
        window=(start, end),
        fields_given=fmt is not None,
    )


def _check_combinations(
    *, since, starttime, parsable, parsable2, as_json, statement, totals, fmt
) -> None:
    """Options that exclude each other."""
    if since is not None and starttime is not None:
        raise AcctUsageError("--since", "give either --since or -S/--starttime, not both")
    if sum(map(bool, (parsable, parsable2, as_json))) > 1:
        raise AcctUsageError("--json", "give only one of -p, -P and --json")
    if statement and (totals or as_json or parsable or parsable2 or fmt):
        raise AcctUsageError(
            "--statement", "--statement takes filters only (no -o, -p, -P, --json or -T)"
        )


def _totals_key(totals: str | None) -> str | None:
    """``-T``'s key, lower case, or None."""
    if totals is None:
        return None
    if totals.lower() not in TOTAL_KEYS:
        raise AcctUsageError(
            "-T/--totals", f"unknown key '{totals}' (use one of {', '.join(TOTAL_KEYS)})"
        )
    return totals.lower()


def _time_window(
    now: datetime,
    *,
    since: str | None,
    starttime: str | None,
    endtime: str | None,
    default_today: bool,
) -> tuple[datetime | None, datetime | None]:
    """(start, end) in local time: ``--since`` or ``-S`` (else 00:00 today, unless ``-j``),
    and ``-E`` (else now, when there is a start)."""
    start = end = None
    if since is not None:
        start = now.replace(microsecond=0) - parse_since(since)
    elif starttime is not None:
        start = parse_time(starttime, now)
    elif default_today:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if endtime is not None:
        end = parse_time(endtime, now, "-E/--endtime")
    elif start is not None:
        end = now.replace(microsecond=0)
    if start is not None and end is not None and end < start:
        raise AcctUsageError(
            "-E/--endtime", f"end {end:%Y-%m-%dT%H:%M:%S} is before start {start:%Y-%m-%dT%H:%M:%S}"
        )
    return start, end


def _user_list(
    users: str | None, *, allusers: bool, own_only: bool, current_user: str
) -> tuple[str, ...] | None:
    """``-u``'s users; by default the caller's own (``own_only``: no ``-j``, not root);
    everyone's with ``-a``."""
    if users is None:
        return None if allusers or not own_only else (current_user,)
    return split_list(users)


def _cluster_list(clusters: str | None, configured: str) -> tuple[str, ...] | None:
    """``-M``'s clusters; by default the configured one; None (every cluster) for ``all`` or
    an unconfigured cluster."""
    cluster_list = split_list(clusters)
    if cluster_list is None:
        return None if configured == "default" else (configured,)
    if "all" in (c.lower() for c in cluster_list):
        return None
    return cluster_list


def _node_list(nodelist: str | None) -> tuple[str, ...] | None:
    """``-N``'s hostlist, expanded."""
    if nodelist is None:
        return None
    from llem.hostlist import expand_hostlist

    try:
        return tuple(expand_hostlist(nodelist))
    except ValueError as e:
        raise AcctUsageError("-N/--nodelist", f"invalid node list '{nodelist}': {e}") from None


def _energy_unit(units: str | None) -> str | None:
    """``--units``, upper case: one of K, M, G, T, P."""
    if units is None:
        return None
    if units.upper() not in ENERGY_PREFIXES[1:]:
        raise AcctUsageError("--units", f"invalid unit '{units.upper()}' (use K, M, G, T or P)")
    return units.upper()


def _to_ns(moment: datetime | None) -> int | None:
    return None if moment is None else int(time.mktime(moment.timetuple())) * NS_PER_S
