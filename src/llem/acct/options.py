"""``llem-acct``'s command line as data: sacct's time, job, state and list syntax, and
:class:`AcctOptions`, the one object that flows past the CLI (:func:`build_options`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
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
# Unit words after now+/-N, longest first: Slurm's (seconds, minutes, hours, days, weeks,
# singular or plural) and the abbreviations llem-acct has always taken (s, min, h, d, w).
_DELTA_UNITS = tuple(sorted(((w, m) for w, m in _UNITS_S.items() if w), key=lambda u: -len(u[0])))
_NAMED_HOURS = {"midnight": 0, "noon": 12, "fika": 15, "teatime": 16}
TIME_FORMS = (
    "YYYY-MM-DD[THH:MM[:SS]], MMDD[YY], MM/DD[/YY], MM.DD[.YY], HH:MM[:SS] [AM|PM], "
    "MMDD-HH:MM, YYYY-MM-DD-HH:MM, now[{+|-}N[seconds|minutes|hours|days|weeks]], today, "
    "tomorrow, midnight, noon, fika, teatime, uts<epoch>"
)


class _Bad(ValueError):
    pass


def _delta(t: str, i: int) -> tuple[int, int]:
    """``now``'s ``+N[unit]``/``-N[unit]`` from ``t[i]`` (the sign): (seconds, next index)."""
    count, digits, j = 0, 0, i + 1
    while j < len(t):
        if t[j].isspace():
            j += 1
            continue
        unit = next(((w, m) for w, m in _DELTA_UNITS if t.startswith(w, j)), None)
        if unit is not None:
            count *= unit[1]
            j += len(unit[0])
            break
        if not t[j].isdigit():
            raise _Bad(f"unexpected '{t[j]}' after now{t[i]}")
        count = count * 10 + int(t[j])
        digits += 1
        j += 1
    if not digits:
        raise _Bad(f"no number after now{t[i]}")
    return (-count if t[i] == "-" else count), j


def _clock(t: str, i: int) -> tuple[tuple[int, int, int], int]:
    """``H[H]:MM[:SS][ ][am|pm]`` at ``t[i]``: ((hour, minute, second), next index)."""
    m = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(am|pm)?").match(t, i)
    if not m:
        raise _Bad("bad time of day")
    hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise _Bad("hour, minute or second out of range")
    if m.group(4) == "pm":
        hour = 12 if hour == 12 else hour + 12
        if hour > 23:
            raise _Bad("hour out of range for pm")
    elif m.group(4) == "am":
        if hour > 12:
            raise _Bad("hour out of range for am")
        hour = 0 if hour == 12 else hour
    return (hour, minute, second), m.end()


def _date(t: str, i: int) -> tuple[tuple[int | None, int, int], int]:
    """``YYYY-MM-DD`` or ``MM[./]DD[./][YY]`` at ``t[i]``: ((year or None, month, day), next)."""
    m = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})").match(t, i)
    if m and t[i + 4 : i + 5] == "-" and len(t) >= i + 8 and t[i + 7 : i + 8] == "-":
        year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
        end = m.end()
    else:
        m = re.compile(r"(\d{1,2})[./]?(\d{1,2})[./]?(\d{2})?").match(t, i)
        if not m:
            raise _Bad("bad date")
        month, day = int(m.group(1)), int(m.group(2))
        year = 2000 + int(m.group(3)) if m.group(3) else None
        end = m.end()
        if end < len(t) and t[end].isdigit():
            raise _Bad("a year has two digits here")
    if not 1 <= month <= 12 or not 1 <= day <= 31:
        raise _Bad("month or day out of range")
    return (year, month, day), end


def parse_time(text: str, now: datetime, option: str = "-S/--starttime") -> datetime:
    """sacct's time syntax (Slurm's ``parse_time`` with ``past`` set), in local time.

    ``now`` is naive local time. The text is read as Slurm reads it: blanks, ``-`` and ``T``
    between parts are skipped; each part is a word (``today``, ``tomorrow``, ``midnight``,
    ``noon``, ``fika`` (15:00), ``teatime`` (16:00), ``now[{+|-}N[unit]]`` with units
    ``seconds`` (default), ``minutes``, ``hours``, ``days``, ``weeks``), a time of day
    ``HH:MM[:SS]`` with an optional ``AM``/``PM``, or a date ``YYYY-MM-DD`` or
    ``MM[/.]DD[[/.]YY]``; ``uts<epoch>`` is a Unix time. A date without a year is this
    year's, or last year's when its month is still to come (sacct looks back); a time
    without a date is today's; a date without a time is its midnight.

    Raises:
        AcctUsageError: anything else, or an impossible date.
    """
    t = text.strip().lower()
    try:
        if not t:
            raise _Bad("empty")
        if t.startswith("uts"):
            if not re.fullmatch(r"uts\d+", t) or int(t[3:]) < 1000000:
                raise _Bad("uts wants a Unix time of at least 1000000")
            return datetime.fromtimestamp(int(t[3:]))
        clock: tuple[int, int, int] | None = None
        date: tuple[int | None, int, int] | None = None
        i = 0
        while i < len(t):
            c = t[i]
            word = next(
                (w for w in ("today", "tomorrow", "now", *_NAMED_HOURS) if t.startswith(w, i)),
                None,
            )
            if word is None and (c.isspace() or c in "-t"):
                i += 1
                continue
            if word in ("today", "tomorrow"):
                day = now + timedelta(days=1 if word == "tomorrow" else 0)
                date = (day.year, day.month, day.day)
                i += len(word)
            elif word in _NAMED_HOURS:
                clock = (_NAMED_HOURS[word], 0, 0)
                i += len(word)
            elif word == "now":
                j = i + 3
                while j < len(t) and t[j].isspace():
                    j += 1
                seconds = 0
                if j < len(t):
                    if t[j] not in "+-":
                        raise _Bad(f"unexpected '{t[j]}' after now")
                    seconds, j = _delta(t, j)
                moment = now.replace(microsecond=0) + timedelta(seconds=seconds)
                date = (moment.year, moment.month, moment.day)
                clock = (moment.hour, moment.minute, moment.second)
                i = j
            elif c.isdigit():
                if t[i + 1 : i + 2] == ":" or t[i + 2 : i + 3] == ":":
                    clock, i = _clock(t, i)
                else:
                    date, i = _date(t, i)
            else:
                raise _Bad(f"unexpected '{text.strip()[i:]}'")
        if clock is None and date is None:
            return datetime.fromtimestamp(0)
        if date is None:
            date = (now.year, now.month, now.day)
        year, month, day = date
        if year is None:
            year = now.year - 1 if month > now.month else now.year
        hour, minute, second = clock or (0, 0, 0)
        return datetime(year, month, day, hour, minute, second)
    except ValueError as e:
        raise AcctUsageError(option, f"invalid time '{text}': {e} (use {TIME_FORMS})") from None


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


JOB_STATES = {
    "BF": "BOOT_FAIL",
    "CA": "CANCELLED",
    "CD": "COMPLETED",
    "DL": "DEADLINE",
    "F": "FAILED",
    "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY",
    "PD": "PENDING",
    "PR": "PREEMPTED",
    "R": "RUNNING",
    "RQ": "REQUEUED",
    "RS": "RESIZING",
    "RV": "REVOKED",
    "S": "SUSPENDED",
    "TO": "TIMEOUT",
}
"""sacct's state abbreviations and names (``-s``)."""
STATE_ALIASES = {**JOB_STATES, **{name: name for name in JOB_STATES.values()}, "UNKNOWN": "UNKNOWN"}


def parse_states(text: str) -> tuple[str, ...]:
    """``-s``: sacct state names or abbreviations (case-insensitive), as full names.

    ``UNKNOWN`` (not a sacct state) selects runs whose end only EpilogSlurmctld saw (no
    Slurm accounting): a clean exit there may be a completion, a cancel or a time-out.

    Raises:
        AcctUsageError: an unknown state.
    """
    out = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        if item not in STATE_ALIASES:
            known = ", ".join(f"{name}/{abbr}" for abbr, name in sorted(JOB_STATES.items()))
            raise AcctUsageError("-s/--state", f"unknown state '{item}' (known: {known}, UNKNOWN)")
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
        truncate: ``-T``: start and end cut to the window (elapsed too).
        noconvert: ``--noconvert``: numbers without K/M/G suffixes.
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
    truncate: bool = False
    noconvert: bool = False


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
    groups: str | None = None,
    qos: str | None = None,
    timelimit_min: str | None = None,
    timelimit_max: str | None = None,
    truncate: bool = False,
    noconvert: bool = False,
    env: Mapping[str, str] | None = None,
) -> AcctOptions:
    """Turn the raw option values into :class:`AcctOptions`, with sacct's defaults.

    Defaults as sacct 22.05 (``slurmdb_job_cond_def_start_end``): without ``-s`` and
    ``-j``, ``-S`` is 00:00 today and ``-E`` now; with ``-j`` only, Epoch 0 to now; with
    ``-s`` only, ``-S`` is now and ``-E`` is ``-S`` (so ``-s CD`` alone asks for jobs that
    end this very second); with ``-j`` and ``-s``, Epoch 0 and ``-E`` is ``-S`` when ``-S``
    is given, else now. Without ``-a``, ``-u``, ``-j`` or ``-N`` a user sees their own runs
    (root: everyone's). ``cluster`` is the configured cluster: the default of ``-M``
    (``default``, the unconfigured value, and ``-M all`` select every cluster). ``env``
    (default ``os.environ``) gives ``SACCT_FORMAT``.

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
    state_list = parse_states(states) if states is not None else None
    start, end = _time_window(
        now,
        since=since,
        starttime=starttime,
        endtime=endtime,
        jobs=job_specs is not None,
        states=bool(state_list),
    )
    nodes = _node_list(nodelist)
    if env is None:
        env = os.environ
    if fmt is None and totals_by is None and (env.get("SACCT_FORMAT") or "").strip():
        fmt = env["SACCT_FORMAT"]
    units = _energy_unit(units)
    f = RunFilter(
        clusters=_cluster_list(clusters, cluster),
        users=_user_list(
            users,
            allusers=allusers,
            # sacct: -j or -N without -u means every user
            own_only=job_specs is None and nodes is None and not is_root,
            current_user=current_user,
        ),
        accounts=split_list(accounts),
        partitions=split_list(partitions),
        states=state_list or None,
        start_ns=_to_ns(start),
        end_ns=_to_ns(end),
        jobs=job_specs,
        nodes=nodes,
        names=split_list(names),
        window="state" if state_list else ("submit" if job_specs is not None else "eligible"),
        groups=_group_list(groups),
        qos=split_list(qos),
        timelimit_min=_minutes(timelimit_min, "-k/--timelimit-min"),
        timelimit_max=_minutes(timelimit_max, "-K/--timelimit-max"),
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
        truncate=truncate,
        noconvert=noconvert,
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
    jobs: bool,
    states: bool,
) -> tuple[datetime, datetime]:
    """(start, end) in local time, with sacct's defaults (see :func:`build_options`);
    ``--since`` stands for ``-S now-DURATION``."""
    now = now.replace(microsecond=0)
    start = end = None
    if since is not None:
        start = now - parse_since(since)
    elif starttime is not None:
        start = parse_time(starttime, now)
    if endtime is not None:
        end = parse_time(endtime, now, "-E/--endtime")
    epoch = datetime.fromtimestamp(0)
    if states:
        if start is None and not jobs:
            start = now
        if end is None:
            end = start if start is not None else now
        start = epoch if start is None else start
    else:
        if start is None:
            start = epoch if jobs else now.replace(hour=0, minute=0, second=0)
        if end is None:
            end = now
    if end < start:
        raise AcctUsageError(
            "-E/--endtime", f"end {end:%Y-%m-%dT%H:%M:%S} is before start {start:%Y-%m-%dT%H:%M:%S}"
        )
    return start, end


def _group_list(groups: str | None) -> tuple[int, ...] | None:
    """``-g``'s groups (names or gids) as gids."""
    if groups is None:
        return None
    import grp

    out = []
    for item in split_list(groups) or ():
        if item.isdigit():
            out.append(int(item))
            continue
        try:
            out.append(grp.getgrnam(item).gr_gid)
        except KeyError:
            raise AcctUsageError("-g/--gid", f"no group '{item}' on this host") from None
    return tuple(out)


def _minutes(text: str | None, option: str) -> int | None:
    """A time limit as Slurm writes it (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``)
    in minutes, seconds rounded up as Slurm's ``time_str2mins`` does."""
    if text is None:
        return None
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise AcctUsageError(option, f"invalid time limit '{text}' (use [D-]HH:MM:SS or MM)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:
        hours, minutes, seconds = a, b, c
    elif b is not None:
        hours, minutes, seconds = 0, a, b
    else:
        hours, minutes, seconds = 0, a, 0
    total = ((days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise AcctUsageError(option, f"invalid time limit '{text}'")
    return total


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
