"""``llem-acct`` as a library: options, sacct time syntax, fields, rows, totals, formatting.

Pure functions (no printing): the click command in :mod:`llem.cli.acct` parses the command
line into :class:`AcctOptions`, and :func:`report` turns options and a ledger into the text
to print. All SQL lives in :mod:`llem.cluster.acct_queries`. Nothing heavy is imported here;
the carbon tables load only when a carbon figure is shown.

Units: the ledger keeps microjoules and nanoseconds; rows carry joules (``ConsumedEnergyRaw``
is joules, as in sacct), seconds and grams CO2e.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping, Sequence

from llem.cluster.acct_queries import (
    RUN_COLUMNS,
    TOTAL_COLUMNS,
    WINDOW_COLUMNS,
    JobSpec,
    RunFilter,
)
from llem.hostlist import compress_hostlist

JSON_SCHEMA = "llem.acct/1"
S = 10**9
UJ_PER_J = 10**6
J_PER_KWH = 3_600_000.0


class AcctUsageError(ValueError):
    """A bad value on the command line (becomes a usage error, exit status 2).

    Attributes:
        option: the option the value belongs to, e.g. ``-o/--format``.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


# -- fields ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One output field: its name, default width, kind (how it is shown) and description."""

    name: str
    width: int
    kind: str
    help: str


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("JobID", -12, "str", "job id; array tasks as JOB_TASK, windows (steps) as JOB.NAME"),
    Field("JobIDRaw", -12, "str", "the job's own Slurm job id (array tasks too)"),
    Field("JobName", 10, "str", "job name; for a window, its name"),
    Field("Cluster", 10, "str", "cluster name"),
    Field("User", 9, "str", "user name"),
    Field("Account", 10, "str", "account"),
    Field("Partition", 10, "str", "partition"),
    Field("State", 10, "str", "COMPLETED, FAILED, SIGNALED or UNKNOWN; windows: closed/open/"
                              "abandoned"),
    Field("Start", 19, "time", "start (local time)"),
    Field("End", 19, "time", "end (local time)"),
    Field("Elapsed", 10, "elapsed", "wall time, [DD-]HH:MM:SS"),
    Field("NNodes", 8, "int", "number of nodes"),
    Field("NodeList", 15, "str", "nodes (Slurm hostlist)"),
    Field("AllocGPUs", 9, "int", "GPUs allocated (GPU-seconds / wall time)"),
    Field("ConsumedEnergy", 14, "energy", "energy of all components, joules with K/M/G/T/P "
                                          "(x1000) suffixes"),
    Field("ConsumedEnergyRaw", 17, "int", "energy of all components in joules"),
    Field("CPUEnergy", 10, "energy", "CPU package energy, joules (suffixed)"),
    Field("DRAMEnergy", 10, "energy", "DRAM energy, joules (suffixed)"),
    Field("GPUEnergy", 10, "energy", "GPU energy, joules (suffixed)"),
    Field("PlatformEnergy", 14, "energy", "node meter minus CPU, DRAM, GPUs, joules (suffixed)"),
    Field("AvePower", 10, "watts", "mean power, watts (energy / elapsed)"),
    Field("EnergySource", 12, "str", "measured, estimated, mixed (or none: no energy)"),
    Field("Coverage", 8, "percent", "share of the wall time with data"),
    Field("CarbonIntensity", 15, "intensity", "grid intensity applied, gCO2e/kWh"),
    Field("CO2e", 10, "co2e", "emissions: energy x PUE x intensity (+ embodied when "
                              "enabled), g/kg/t CO2e"),
    Field("Tag", 10, "str", "the job's llem tag"),
)}

TOTAL_FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("User", 9, "str", "user name (--totals user)"),
    Field("Account", 10, "str", "account (--totals account)"),
    Field("Partition", 10, "str", "partition (--totals partition)"),
    Field("Tag", 10, "str", "tag (--totals tag)"),
    Field("Day", 10, "str", "day the runs started, local time (--totals day)"),
    Field("Month", 7, "str", "month the runs started, local time (--totals month)"),
    Field("NJobs", 8, "int", "number of job runs"),
    Field("Elapsed", 13, "elapsed", "summed wall time of the runs"),
    Field("NodeHours", 10, "float1", "nodes x wall time, hours"),
    Field("GPUHours", 10, "float1", "GPU-hours"),
    Field("ConsumedEnergy", 14, "energy", FIELDS["ConsumedEnergy"].help),
    Field("ConsumedEnergyRaw", 17, "int", FIELDS["ConsumedEnergyRaw"].help),
    Field("CPUEnergy", 10, "energy", FIELDS["CPUEnergy"].help),
    Field("DRAMEnergy", 10, "energy", FIELDS["DRAMEnergy"].help),
    Field("GPUEnergy", 10, "energy", FIELDS["GPUEnergy"].help),
    Field("PlatformEnergy", 14, "energy", FIELDS["PlatformEnergy"].help),
    Field("AvePower", 10, "watts", "mean power over the summed wall time, watts"),
    Field("EnergySource", 12, "str", FIELDS["EnergySource"].help),
    Field("Coverage", 8, "percent", "time-weighted share of wall time with data"),
    Field("CarbonIntensity", 15, "intensity", FIELDS["CarbonIntensity"].help),
    Field("CO2e", 10, "co2e", FIELDS["CO2e"].help),
)}

TOTAL_KEYS = {"user": "User", "account": "Account", "partition": "Partition", "tag": "Tag",
              "day": "Day", "month": "Month"}
DEFAULT_FORMAT = ("JobID", "JobName", "User", "Account", "Partition", "State", "Elapsed",
                  "NNodes", "ConsumedEnergy", "EnergySource", "CO2e")
DEFAULT_TOTALS_FORMAT = ("NJobs", "Elapsed", "GPUHours", "ConsumedEnergy", "GPUEnergy",
                         "EnergySource", "CO2e")
CARBON_FIELDS = frozenset({"CarbonIntensity", "CO2e"})


@dataclass(frozen=True)
class Column:
    """A field of the output with its width (negative: left-justified, as in sacct)."""

    field: Field
    width: int


def _lookup(name: str, catalogue: Mapping[str, Field]) -> Field:
    for known in catalogue:
        if known.lower() == name.lower():
            return catalogue[known]
    import difflib  # only for the error message

    near = difflib.get_close_matches(name, list(catalogue), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise AcctUsageError("-o/--format", f"unknown field '{name}'{hint} (llem-acct -e lists them)")


def parse_format(text: str | None, totals_by: str | None = None) -> list[Column]:
    """``-o`` text (``JobID,JobName%30,CO2e%-8``) into columns; default when None.

    Field names are case-insensitive, as in sacct. ``%N`` sets the width; ``%-N``
    left-justifies (JobID and JobIDRaw are always left-justified, as in sacct).

    Raises:
        AcctUsageError: an unknown field, or a bad width.
    """
    catalogue = TOTAL_FIELDS if totals_by else FIELDS
    if text is None:
        names = ((TOTAL_KEYS[totals_by],) + DEFAULT_TOTALS_FORMAT) if totals_by \
            else DEFAULT_FORMAT
        return [Column(catalogue[n], catalogue[n].width) for n in names]
    columns = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, width = item.partition("%")
        f = _lookup(name, catalogue)
        if width:
            if not re.fullmatch(r"-?\d+", width) or int(width) == 0:
                raise AcctUsageError("-o/--format", f"bad width '%{width}' of field {f.name}")
            n = int(width)
            columns.append(Column(f, -abs(n) if f.width < 0 else n))
        else:
            columns.append(Column(f, f.width))
    if not columns:
        raise AcctUsageError("-o/--format", "no fields given")
    return columns


def helpformat(totals: bool = False) -> str:
    """The field names, four to a line, like ``sacct -e``; then what each one means."""
    catalogue = TOTAL_FIELDS if totals else FIELDS
    names = list(catalogue)
    lines = ["".join(f"{n:<20}" for n in names[i:i + 4]).rstrip()
             for i in range(0, len(names), 4)]
    lines.append("")
    lines += [f"{f.name:<18} {f.help}" for f in catalogue.values()]
    return "\n".join(lines) + "\n"


# -- time ------------------------------------------------------------------------------------

_UNITS_S = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
            "mins": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600,
            "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
            "weeks": 604800}
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
            return today.replace(hour=int(m.group(1)), minute=int(m.group(2)),
                                 second=int(m.group(3) or 0))
        m = (re.fullmatch(r"(\d{2})(\d{2})(\d{2})?", t)
             or re.fullmatch(r"(\d{1,2})/(\d{1,2})(?:/(\d{2}))?", t)
             or re.fullmatch(r"(\d{1,2})\.(\d{1,2})(?:\.(\d{2}))?", t))
        if m:
            year = 2000 + int(m.group(3)) if m.group(3) else now.year
            return datetime(year, int(m.group(1)), int(m.group(2)))
    except ValueError as e:
        raise AcctUsageError(option, f"invalid time '{text}': {e}") from None
    raise AcctUsageError(
        option, f"invalid time '{text}' (use YYYY-MM-DD[THH:MM[:SS]], MMDD[YY], HH:MM, "
                "now[-N[units]], today or midnight)")


def parse_since(text: str) -> timedelta:
    """``--since``: ``30d``, ``12h``, ``2w``, ``90m`` (minutes), ``45s``.

    Raises:
        AcctUsageError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        raise AcctUsageError("--since", f"invalid duration '{text}' (use e.g. 30d, 12h, 2w, "
                                        "90m)")
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
            raise AcctUsageError("-j/--jobs", f"invalid job id '{item}' (use JOB, JOB.STEP or "
                                              "JOB_TASK)")
        specs.append(JobSpec(m.group(1), m.group(2), m.group(3)))
    if not specs:
        raise AcctUsageError("-j/--jobs", "no job ids given")
    return tuple(specs)


STATE_ALIASES = {
    "CD": "COMPLETED", "COMPLETED": "COMPLETED", "F": "FAILED", "FAILED": "FAILED",
    "SIGNALED": "SIGNALED", "CA": "SIGNALED", "CANCELLED": "SIGNALED", "TO": "SIGNALED",
    "TIMEOUT": "SIGNALED", "OOM": "SIGNALED", "OUT_OF_MEMORY": "SIGNALED", "NF": "SIGNALED",
    "NODE_FAIL": "SIGNALED", "PR": "SIGNALED", "PREEMPTED": "SIGNALED", "UNKNOWN": "UNKNOWN",
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
            raise AcctUsageError("-s/--state", f"unknown or unsupported state '{item}': the "
                                 "ledger holds ended jobs (COMPLETED/CD, FAILED/F, SIGNALED, "
                                 "CANCELLED/CA, TIMEOUT/TO, OUT_OF_MEMORY/OOM, NODE_FAIL/NF, "
                                 "PREEMPTED/PR, UNKNOWN)")
        if STATE_ALIASES[item] not in out:
            out.append(STATE_ALIASES[item])
    return tuple(out)


def split_list(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option value into a tuple; None stays None."""
    if text is None:
        return None
    return tuple(item.strip() for item in text.split(",") if item.strip())


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


def build_options(*, ledger: str, cluster: str, current_user: str, is_root: bool,
                  now: datetime, jobs: str | None = None, users: str | None = None,
                  allusers: bool = False, accounts: str | None = None,
                  partitions: str | None = None, states: str | None = None,
                  starttime: str | None = None, endtime: str | None = None,
                  since: str | None = None, nodelist: str | None = None,
                  allocations: bool = False, fmt: str | None = None, noheader: bool = False,
                  parsable: bool = False, parsable2: bool = False, delimiter: str | None = None,
                  as_json: bool = False, units: str | None = None, clusters: str | None = None,
                  totals: str | None = None, statement: bool = False, names: str | None = None,
                  duplicates: bool = False) -> AcctOptions:
    """Turn the raw option values into :class:`AcctOptions`, with sacct's defaults.

    Defaults as sacct: without ``-S`` and ``-j``, runs since 00:00 today; ``-E`` defaults
    to now; without ``-a``, ``-u`` or ``-j`` a user sees their own runs (root: everyone's).
    ``cluster`` is the configured cluster: the default of ``-M`` (``default``, the
    unconfigured value, and ``-M all`` select every cluster).

    Raises:
        AcctUsageError: a bad value or a bad combination.
    """
    if since is not None and starttime is not None:
        raise AcctUsageError("--since", "give either --since or -S/--starttime, not both")
    if sum(map(bool, (parsable, parsable2, as_json))) > 1:
        raise AcctUsageError("--json", "give only one of -p, -P and --json")
    if statement and (totals or as_json or parsable or parsable2 or fmt):
        raise AcctUsageError("--statement", "--statement takes filters only (no -o, -p, -P, "
                                            "--json or -T)")
    totals_by = None
    if totals is not None:
        totals_by = totals.lower()
        if totals_by not in TOTAL_KEYS:
            raise AcctUsageError("-T/--totals", f"unknown key '{totals}' (use one of "
                                                f"{', '.join(TOTAL_KEYS)})")
    job_specs = parse_jobs(jobs) if jobs is not None else None
    start = end = None
    if since is not None:
        start = now.replace(microsecond=0) - parse_since(since)
    elif starttime is not None:
        start = parse_time(starttime, now)
    elif job_specs is None:
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if endtime is not None:
        end = parse_time(endtime, now, "-E/--endtime")
    elif start is not None:
        end = now.replace(microsecond=0)
    if start is not None and end is not None and end < start:
        raise AcctUsageError("-E/--endtime", f"end {end:%Y-%m-%dT%H:%M:%S} is before start "
                                             f"{start:%Y-%m-%dT%H:%M:%S}")
    user_list = split_list(users)
    if user_list is None and not allusers and job_specs is None and not is_root:
        user_list = (current_user,)
    if allusers and users is None:
        user_list = None
    cluster_list = split_list(clusters)
    if cluster_list is None:
        cluster_list = None if cluster == "default" else (cluster,)
    elif "all" in (c.lower() for c in cluster_list):
        cluster_list = None
    node_list = None
    if nodelist is not None:
        from llem.hostlist import expand_hostlist

        try:
            node_list = tuple(expand_hostlist(nodelist))
        except ValueError as e:
            raise AcctUsageError("-N/--nodelist", f"invalid node list '{nodelist}': {e}") \
                from None
    if units is not None:
        units = units.upper()
        if units not in ENERGY_PREFIXES[1:]:
            raise AcctUsageError("--units", f"invalid unit '{units}' (use K, M, G, T or P)")
    f = RunFilter(
        clusters=cluster_list, users=user_list, accounts=split_list(accounts),
        partitions=split_list(partitions),
        states=parse_states(states) if states is not None else None,
        start_ns=_to_ns(start), end_ns=_to_ns(end), jobs=job_specs, nodes=node_list,
        names=split_list(names))
    mode = "json" if as_json else "parsable" if parsable else "parsable2" if parsable2 \
        else "table"
    return AcctOptions(
        ledger=ledger, filter=f, allocations=allocations, duplicates=duplicates,
        columns=tuple(parse_format(fmt, totals_by)), mode=mode,
        delimiter="|" if delimiter is None else delimiter, noheader=noheader, units=units,
        totals_by=totals_by, statement=statement, window=(start, end),
        fields_given=fmt is not None)


def _to_ns(moment: datetime | None) -> int | None:
    return None if moment is None else int(time.mktime(moment.timetuple())) * S


# -- carbon ----------------------------------------------------------------------------------


@dataclass
class Carbon:
    """The configured emission factors, resolved once, and how to apply them fast.

    When the intensity is one annual figure and the PUE a constant, every joule has the same
    factor and a row's emissions need only its total energy; otherwise the hourly energy of
    each row goes through :func:`llem.carbon.emissions`.
    """

    config: Any
    model: Any
    constant: bool
    g_per_kwh: float
    pue: Any
    gpu_g_per_hour: float = 0.0
    node_g_per_hour: float = 0.0
    info: dict = field(default_factory=dict)

    def grams(self, energy_j: float, gpu_hours: float, node_hours: float,
              energy_j_by_hour: Mapping[int, float] | None = None) -> tuple[float, float]:
        """(grams CO2e, grid gCO2e/kWh applied) of one row."""
        if self.constant or not energy_j_by_hour:
            pue = self.pue if self.constant else self._nominal_pue(energy_j_by_hour)
            grams = energy_j / J_PER_KWH * pue * self.g_per_kwh
            return grams + gpu_hours * self.gpu_g_per_hour + \
                node_hours * self.node_g_per_hour, self.g_per_kwh
        from llem import carbon

        em = carbon.emissions(self.config, energy_j_by_hour, gpu_hours, node_hours,
                              model=self.model)
        return em.co2e_g, em.carbon["intensity_g_per_kwh"]

    def _nominal_pue(self, energy_j_by_hour: Mapping[int, float] | None) -> float:
        from llem import carbon

        if not isinstance(self.pue, Mapping):
            return float(self.pue)
        return carbon.pue_for_month(self.pue, time.strftime("%Y-%m", time.gmtime(
            min(energy_j_by_hour) if energy_j_by_hour else time.time())))

    def footer(self) -> str:
        """One line naming the intensity's source, year and the PUE."""
        i = self.info
        text = (f"CO2e: grid intensity {i['intensity_g_per_kwh']:g} gCO2e/kWh ({i['source']}; "
                f"year {i['year']}; {i['basis']} basis; region {i['region']})")
        if i.get("hourly_source"):
            text += f", hourly where available ({i['hourly_source']})"
        text += f"; PUE {i['pue']}"
        if i.get("embodied"):
            text += f"; embodied included ({i['embodied']})"
        return text + "."


def resolve_carbon(config) -> Carbon:
    """Resolve ``config``'s carbon factors (imports :mod:`llem.carbon` on first use).

    Raises:
        ConfigError: an unknown region or a bad intensity file.
    """
    from collections.abc import Mapping as _Mapping

    from llem import carbon
    from llem.carbon.emissions import embodied_g_per_hour

    model = carbon.resolve(config)
    pue = config.carbon.pue
    constant = model.hourly is None and not isinstance(pue, _Mapping)
    annual = model.annual
    emb = config.embodied
    gpu_rate = node_rate = 0.0
    embodied_text = None
    if emb.enabled:
        gpu_rate = embodied_g_per_hour(emb.gpu_kgco2e, emb.gpu_lifetime_years)
        node_rate = embodied_g_per_hour(emb.node_kgco2e, emb.node_lifetime_years)
        embodied_text = f"{gpu_rate:.2f} g per GPU-hour, {node_rate:.2f} g per node-hour"
    pue_text = (f"{float(pue):g}" if not isinstance(pue, _Mapping) else
                "by month (" + ", ".join(f"{m}: {v:g}" for m, v in sorted(pue.items())) + ")")
    info = {
        "region": model.region, "intensity_g_per_kwh": annual.g_per_kwh,
        "source": annual.source, "year": annual.year, "basis": annual.basis,
        "pue": pue_text if isinstance(pue, _Mapping) else float(pue),
        "hourly_source": model.hourly.source if model.hourly is not None else None,
        "embodied": embodied_text, "region_is_default": model.is_default_region,
    }
    return Carbon(config=config, model=model, constant=constant, g_per_kwh=annual.g_per_kwh,
                  pue=pue, gpu_g_per_hour=gpu_rate, node_g_per_hour=node_rate, info=info)


# -- rows ------------------------------------------------------------------------------------


def energy_source(energy_uj: int, estimated_uj: int) -> str:
    """``measured``, ``estimated``, ``mixed``, or ``none`` when there is no energy at all."""
    if energy_uj <= 0:
        return "none"
    if estimated_uj <= 0:
        return "measured"
    return "estimated" if estimated_uj >= energy_uj else "mixed"


def job_id_text(job_id: str, array_job_id: str | None, array_task_id: str | None) -> str:
    """sacct's JobID: ``ARRAY_TASK`` for array tasks, else the job id."""
    if array_job_id and array_task_id is not None:
        return f"{array_job_id}_{array_task_id}"
    return job_id


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """The raw field values (joules, seconds, epoch ns) of one ``job_runs`` row."""
    elapsed_s = max(0, (run["run_end_ns"] or run["run_start_ns"]) - run["run_start_ns"]) / S
    energy_j = run["energy_uj"] / UJ_PER_J
    return {
        "JobID": job_id_text(run["job_id"], run["array_job_id"], run["array_task_id"]),
        "JobIDRaw": run["job_id"], "JobName": run["name"], "Cluster": run["cluster"],
        "User": run["user"], "Account": run["account"], "Partition": run["partition"],
        "State": run["state"] or "UNKNOWN", "Start": run["run_start_ns"],
        "End": run["run_end_ns"], "Elapsed": elapsed_s, "NNodes": run["num_nodes"],
        "NodeList": run["nodelist"],
        "AllocGPUs": round(run["gpu_seconds"] / elapsed_s) if elapsed_s else 0,
        "ConsumedEnergy": energy_j, "ConsumedEnergyRaw": round(energy_j),
        "CPUEnergy": run["cpu_energy_uj"] / UJ_PER_J,
        "DRAMEnergy": run["dram_energy_uj"] / UJ_PER_J,
        "GPUEnergy": run["gpu_energy_uj"] / UJ_PER_J,
        "PlatformEnergy": run["other_energy_uj"] / UJ_PER_J,  # jobs' only 'other': platform
        "AvePower": energy_j / elapsed_s if elapsed_s else None,
        "EnergySource": energy_source(run["energy_uj"], run["estimated_energy_uj"]),
        "Coverage": run["coverage"], "Tag": run["tag"],
        "_gpu_hours": run["gpu_seconds"] / 3600,
        "_node_hours": (run["num_nodes"] or 0) * elapsed_s / 3600,
        "_key": (run["cluster"], run["job_id"], run["run_start_ns"]),
        "_array": (run["array_job_id"], run["array_task_id"]),
    }


def window_rows(windows: Sequence[tuple], devices: Mapping[tuple, tuple[str, str]],
                parents: Mapping[tuple, dict]) -> list[dict[str, Any]]:
    """One row per named window of a run (its nodes merged), like sacct's step rows.

    Args:
        windows: rows of :data:`WINDOW_COLUMNS` (one per node of a window).
        devices: (cluster, node, device_key) -> (component, source).
        parents: run key -> the run's row (for user, account, partition, ids).
    """
    merged: dict[tuple, dict] = {}
    for w in windows:
        w = dict(zip(WINDOW_COLUMNS, w))
        key = (w["cluster"], w["job_id"], w["run_start_ns"], w["name"], w["step_id"])
        m = merged.setdefault(key, {"start": w["start_ns"], "end": w["end_ns"], "nodes": [],
                                    "by": {"cpu": 0, "dram": 0, "gpu": 0, "platform": 0},
                                    "energy": 0,
                                    "estimated": 0, "gpus": 0, "status": w["status"]})
        m["start"] = min(m["start"], w["start_ns"])
        if w["end_ns"] is None or m["end"] is None:
            m["end"] = None
        else:
            m["end"] = max(m["end"], w["end_ns"])
        m["nodes"].append(w["node"])
        if w["status"] != "closed":
            m["status"] = w["status"]
        for device, uj in json.loads(w["energy"] or "{}").items():
            component, source = devices.get((w["cluster"], w["node"], device), ("other", ""))
            m["energy"] += uj
            if component in m["by"]:
                m["by"][component] += uj
            if component == "gpu":
                m["gpus"] += 1
            if source == "estimated":
                m["estimated"] += uj
    out = []
    for (cluster, job_id, run_start_ns, name, step_id), m in merged.items():
        parent = parents[(cluster, job_id, run_start_ns)]
        end = m["end"] if m["end"] is not None else m["start"]
        elapsed_s = max(0, end - m["start"]) / S
        energy_j = m["energy"] / UJ_PER_J
        label = name or step_id
        out.append({
            **{k: parent[k] for k in ("Cluster", "User", "Account", "Partition", "Tag")},
            "JobID": f"{parent['JobID']}.{label}", "JobIDRaw": f"{job_id}.{label}",
            "JobName": name, "State": m["status"], "Start": m["start"], "End": m["end"],
            "Elapsed": elapsed_s, "NNodes": len(set(m["nodes"])),
            "NodeList": compress_hostlist(sorted(set(m["nodes"]))), "AllocGPUs": m["gpus"],
            "ConsumedEnergy": energy_j, "ConsumedEnergyRaw": round(energy_j),
            "CPUEnergy": m["by"]["cpu"] / UJ_PER_J, "DRAMEnergy": m["by"]["dram"] / UJ_PER_J,
            "GPUEnergy": m["by"]["gpu"] / UJ_PER_J,
            "PlatformEnergy": m["by"]["platform"] / UJ_PER_J,
            "AvePower": energy_j / elapsed_s if elapsed_s else None,
            "EnergySource": energy_source(m["energy"], m["estimated"]), "Coverage": None,
            "_gpu_hours": m["gpus"] * elapsed_s / 3600,
            "_node_hours": len(set(m["nodes"])) * elapsed_s / 3600,
            "_key": None, "_step_id": step_id, "_parent": (cluster, job_id, run_start_ns),
            "_hour": m["start"] // S // 3600 * 3600,
        })
    return out


def total_row(by: str, values: Sequence) -> dict[str, Any]:
    """The raw field values of one ``--totals`` group (a row of :data:`TOTAL_COLUMNS`)."""
    t = dict(zip(TOTAL_COLUMNS, values))
    elapsed_s = (t["elapsed_ns"] or 0) / S
    energy_j = (t["energy_uj"] or 0) / UJ_PER_J
    return {
        TOTAL_KEYS[by]: t["key"], "NJobs": t["njobs"], "Elapsed": elapsed_s,
        "NodeHours": (t["node_ns"] or 0) / S / 3600, "GPUHours": (t["gpu_seconds"] or 0) / 3600,
        "ConsumedEnergy": energy_j, "ConsumedEnergyRaw": round(energy_j),
        "CPUEnergy": (t["cpu_energy_uj"] or 0) / UJ_PER_J,
        "DRAMEnergy": (t["dram_energy_uj"] or 0) / UJ_PER_J,
        "GPUEnergy": (t["gpu_energy_uj"] or 0) / UJ_PER_J,
        "PlatformEnergy": (t["other_energy_uj"] or 0) / UJ_PER_J,
        "AvePower": energy_j / elapsed_s if elapsed_s else None,
        "EnergySource": energy_source(t["energy_uj"] or 0, t["estimated_energy_uj"] or 0),
        "Coverage": (t["covered_ns"] / t["coverage_ns"]) if t["coverage_ns"] else None,
        "_gpu_hours": (t["gpu_seconds"] or 0) / 3600,
        "_node_hours": (t["node_ns"] or 0) / S / 3600, "_key": t["key"],
    }


def add_carbon(rows: list[dict], carbon: Carbon | None,
               hourly: Mapping[Any, Mapping[int, float]] | None = None) -> None:
    """Fill ``CO2e`` (grams) and ``CarbonIntensity`` of rows in place.

    Args:
        rows: raw rows.
        carbon: the factors; None leaves the fields empty.
        hourly: row ``_key`` -> joules per hour, needed only when the factors vary by hour.
    """
    for row in rows:
        if carbon is None:
            row["CO2e"] = row["CarbonIntensity"] = None
            continue
        by_hour = None
        if not carbon.constant:
            if row.get("_key") is not None and hourly is not None:
                by_hour = hourly.get(row["_key"])
            elif row.get("_hour") is not None:
                by_hour = {row["_hour"]: row["ConsumedEnergy"]}
        row["CO2e"], row["CarbonIntensity"] = carbon.grams(
            row["ConsumedEnergy"], row["_gpu_hours"], row["_node_hours"], by_hour)


# -- formatting ------------------------------------------------------------------------------

ENERGY_PREFIXES = ("", "K", "M", "G", "T", "P")


def format_energy(joules: float | None, units: str | None = None) -> str:
    """sacct's way with ConsumedEnergy: ``850``, ``12.34K``, ``1.50M`` (x1000 steps).

    With ``units`` (K, M, G, T, P) every value is shown in that unit.
    """
    if joules is None:
        return ""
    value = float(joules)
    if units:
        index = ENERGY_PREFIXES.index(units)
    else:
        index = 0
        while abs(value) >= 1000 ** (index + 1) and index < len(ENERGY_PREFIXES) - 1:
            index += 1
    value /= 1000 ** index
    if index == 0:
        return str(round(value))
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
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def format_time(ts_ns: int | None) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in local time (sacct's default); ``Unknown`` when absent."""
    if ts_ns is None:
        return "Unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts_ns // S))


def _formatter(kind: str, units: str | None):
    """value -> text for a field kind (None -> empty, or ``Unknown`` for times)."""
    simple = {
        "energy": lambda v: format_energy(v, units), "time": format_time,
        "elapsed": format_elapsed, "watts": "{:.1f}".format, "intensity": "{:.1f}".format,
        "float1": "{:.1f}".format, "percent": lambda v: f"{v * 100:.1f}%",
        "co2e": format_co2e,
    }.get(kind, str)
    empty = "Unknown" if kind == "time" else ""
    return lambda v: empty if v is None else simple(v)


def _text(value: Any, kind: str, units: str | None) -> str:
    return _formatter(kind, units)(value)


def _cell(text: str, width: int) -> str:
    size = abs(width)
    if len(text) > size:
        text = text[:size - 1] + "+"
    return text.ljust(size) if width < 0 else text.rjust(size)


def render_table(columns: Sequence[Column], rows: Sequence[dict], *, noheader: bool,
                 units: str | None) -> str:
    """sacct's fixed-width table: right-justified cells (``%-N``, and JobID: left; headers
    always right), ``+`` marks a cut, one space after every cell, dashes under the header."""
    lines = []
    if not noheader:
        # sacct cuts header names without a '+' and right-justifies them
        lines.append("".join(c.field.name[:abs(c.width)].rjust(abs(c.width)) + " "
                             for c in columns))
        lines.append("".join("-" * abs(c.width) + " " for c in columns))
    cols = [(c.field.name, _formatter(c.field.kind, units), c.width) for c in columns]
    for row in rows:
        lines.append("".join([_cell(fmt(row.get(name)), width) + " "
                              for name, fmt, width in cols]))
    return "".join(line + "\n" for line in lines)


def render_parsable(columns: Sequence[Column], rows: Sequence[dict], *, noheader: bool,
                    units: str | None, delimiter: str, trailing: bool) -> str:
    """``-p`` (a delimiter after every field) and ``-P`` (between fields only), as sacct."""
    end = delimiter if trailing else ""
    lines = []
    if not noheader:
        lines.append(delimiter.join(c.field.name for c in columns) + end)
    cols = [(c.field.name, _formatter(c.field.kind, units)) for c in columns]
    for row in rows:
        lines.append(delimiter.join([fmt(row.get(name)) for name, fmt in cols]) + end)
    return "".join(line + "\n" for line in lines)


def _json_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "time":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value // S))
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
    return value


def render_json(columns: Sequence[Column], rows: Sequence[dict], *, opts: AcctOptions,
                carbon: Carbon | None, generated_ns: int) -> str:
    """The ``--json`` document (schema :data:`JSON_SCHEMA`, see docs/acct-json.md)."""
    start, end = opts.window
    f = opts.filter
    doc: dict[str, Any] = {
        "schema": JSON_SCHEMA,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(generated_ns // S)),
        "query": {
            "start": _iso_local(start), "end": _iso_local(end),
            "clusters": list(f.clusters) if f.clusters is not None else None,
            "users": list(f.users) if f.users is not None else None,
            "accounts": list(f.accounts) if f.accounts is not None else None,
            "partitions": list(f.partitions) if f.partitions is not None else None,
            "states": list(f.states) if f.states is not None else None,
            "nodes": list(f.nodes) if f.nodes is not None else None,
            "jobs": [_spec_text(s) for s in f.jobs] if f.jobs is not None else None,
            "totals_by": opts.totals_by,
        },
        "units": {"energy": "J", "power": "W", "time": "s", "co2e": "g",
                  "carbon_intensity": "gCO2e/kWh", "coverage": "fraction"},
        "carbon": _json_carbon(carbon),
        "fields": [c.field.name for c in columns],
    }
    doc["totals" if opts.totals_by else "jobs"] = [
        {c.field.name: _json_value(row.get(c.field.name), c.field.kind) for c in columns}
        for row in rows]
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def _json_carbon(carbon: Carbon | None) -> dict | None:
    if carbon is None:
        return None
    i = carbon.info
    return {"region": i["region"], "intensity_g_per_kwh": i["intensity_g_per_kwh"],
            "source": i["source"], "year": i["year"], "basis": i["basis"], "pue": i["pue"],
            "hourly_source": i["hourly_source"], "embodied": i["embodied"],
            "region_is_default": i["region_is_default"]}


def _iso_local(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone().isoformat(timespec="seconds")


def _spec_text(spec: JobSpec) -> str:
    text = spec.job_id + (f"_{spec.task_id}" if spec.task_id is not None else "")
    return text + (f".{spec.step}" if spec.step else "")


def describe_selection(opts: AcctOptions) -> str:
    """A short phrase for messages: ``user alice, 2026-11-01T00:00:00 to now``."""
    f = opts.filter
    parts = []
    for label, values in (("user", f.users), ("account", f.accounts),
                          ("partition", f.partitions), ("state", f.states),
                          ("cluster", f.clusters), ("node", f.nodes)):
        if values is not None:
            parts.append(f"{label} {','.join(values)}")
    if f.jobs is not None:
        parts.append("job " + ",".join(_spec_text(s) for s in f.jobs))
    start, end = opts.window
    if start is not None:
        parts.append(f"from {start:%Y-%m-%dT%H:%M:%S} to {end:%Y-%m-%dT%H:%M:%S}")
    return ", ".join(parts) or "all jobs"


# -- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What to print: ``stdout`` text, ``notes`` for stderr, and the exit status."""

    stdout: str
    notes: tuple[str, ...] = ()
    status: int = 0


def _spec_matches(spec: JobSpec, run: dict) -> bool:
    """Whether a ``-j`` item names this run (its job id, its array, or its array task)."""
    if spec.task_id is not None:
        return run["_array"] == (spec.job_id, spec.task_id)
    return spec.job_id in (run["JobIDRaw"], run["_array"][0])


def _shown(specs: tuple[JobSpec, ...] | None, run: dict, window: dict | None) -> bool:
    """sacct's rule: ``-j 12`` shows job 12 and its steps, ``-j 12.train`` only that step."""
    if specs is None or not any(s.step for s in specs):
        return True
    for spec in specs:
        if not _spec_matches(spec, run):
            continue
        if not spec.step or (window is not None
                             and spec.step in (window["JobName"], window["_step_id"])):
            return True
    return False


def latest_runs(runs: list[dict]) -> list[dict]:
    """Only the latest run of each job among ``runs`` (sacct without ``-D``), order kept."""
    latest: dict[tuple[str, str], int] = {}
    for run in runs:
        cluster, job_id, start_ns = run["_key"]
        if start_ns > latest.get((cluster, job_id), -1):
            latest[(cluster, job_id)] = start_ns
    return [run for run in runs if latest[run["_key"][:2]] == run["_key"][2]]


def select_rows(ledger, opts: AcctOptions, carbon: Carbon | None) -> list[dict]:
    """Job rows (and their window rows, unless ``-X``), in sacct's order: a job, then its
    steps."""
    from llem.cluster import acct_queries as q

    runs = [run_row(dict(zip(RUN_COLUMNS, r))) for r in q.select_runs(ledger, opts.filter)]
    if not opts.duplicates:
        runs = latest_runs(runs)
    hourly = None
    if carbon is not None and not carbon.constant and runs:
        hourly = {}
        for cluster, job_id, run_start_ns, hour_s, uj in q.hourly_energy(
                ledger, opts.filter, "run"):
            hourly.setdefault((cluster, job_id, run_start_ns), {})[hour_s] = uj / UJ_PER_J
    add_carbon(runs, carbon, hourly)
    specs = opts.filter.jobs
    if opts.allocations or not runs:
        return [run for run in runs if _shown(specs, run, None)]
    parents = {r["_key"]: r for r in runs}
    windows = q.select_windows(ledger, list(parents))
    steps: list[dict] = []
    if windows:
        devices = q.device_components(ledger, {(w[0], w[10]) for w in windows})
        steps = [w for w in window_rows(windows, devices, parents)
                 if _shown(specs, parents[w["_parent"]], w)]
        add_carbon(steps, carbon)
    by_parent: dict[tuple, list[dict]] = {}
    for step in steps:
        by_parent.setdefault(step["_parent"], []).append(step)
    out = []
    for run in runs:
        if _shown(specs, run, None):
            out.append(run)
        out += by_parent.get(run["_key"], [])
    return out


def total_rows(ledger, opts: AcctOptions, carbon: Carbon | None) -> list[dict]:
    """One row per group of ``--totals``."""
    from llem.cluster import acct_queries as q

    rows = [total_row(opts.totals_by, r)
            for r in q.select_totals(ledger, opts.filter, opts.totals_by)]
    hourly = None
    if carbon is not None and not carbon.constant and rows:
        hourly = {}
        for key, hour_s, uj in q.hourly_energy(ledger, opts.filter, opts.totals_by):
            hourly.setdefault(key, {})[hour_s] = uj / UJ_PER_J
    add_carbon(rows, carbon, hourly)
    return rows


def report(ledger, opts: AcctOptions, config, now_ns: int | None = None) -> Report:
    """The text ``llem-acct`` prints for ``opts``.

    Raises:
        ConfigError: the carbon configuration cannot be resolved.
        LedgerError: a query failed.
    """
    if opts.statement:
        return Report(statement_text(ledger, opts, config) + "\n")
    names = {c.field.name for c in opts.columns}
    needs_carbon = bool(names & CARBON_FIELDS) or (opts.mode == "json" and not opts.fields_given)
    carbon = resolve_carbon(config) if needs_carbon else None
    rows = total_rows(ledger, opts, carbon) if opts.totals_by else \
        select_rows(ledger, opts, carbon)
    now_ns = time.time_ns() if now_ns is None else now_ns
    columns = opts.columns
    notes: list[str] = []
    if opts.mode == "json":
        if not opts.fields_given:
            catalogue = TOTAL_FIELDS if opts.totals_by else FIELDS
            names_all = ((TOTAL_KEYS[opts.totals_by],) if opts.totals_by else ()) + tuple(
                n for n in catalogue if n not in TOTAL_KEYS.values() or not opts.totals_by)
            columns = tuple(Column(catalogue[n], catalogue[n].width) for n in names_all)
        return Report(render_json(columns, rows, opts=opts, carbon=carbon, generated_ns=now_ns))
    if opts.mode == "table":
        text = render_table(columns, rows, noheader=opts.noheader, units=opts.units)
        if carbon is not None and rows:
            text += carbon.footer() + "\n"
    else:
        text = render_parsable(columns, rows, noheader=opts.noheader, units=opts.units,
                               delimiter=opts.delimiter, trailing=opts.mode == "parsable")
        if carbon is not None and rows:
            notes.append(carbon.footer())
    if not rows:
        notes.append(f"llem-acct: no jobs match ({describe_selection(opts)}); widen the window "
                     "with -S or --since, or use -a for all users")
    return Report(text, tuple(notes))


def statement_text(ledger, opts: AcctOptions, config) -> str:
    """The citable paragraph (:func:`llem.carbon.statement`) over the selected runs.

    Energy per clock hour comes from ``job_energy`` (so hourly intensity and monthly PUE
    apply), energy per component and measured/estimated from the runs' totals.
    """
    from llem import carbon
    from llem.cluster import acct_queries as q

    totals = [dict(zip(TOTAL_COLUMNS, r)) for r in q.select_totals(ledger, opts.filter, "month")]
    if not totals:
        return (f"No jobs match ({describe_selection(opts)}): nothing to state. Widen the "
                "window with -S or --since, or use -a for all users.")
    s = {k: sum((t[k] or 0) for t in totals) for k in TOTAL_COLUMNS[1:]}
    by_hour = {h: uj / UJ_PER_J for h, uj in q.hourly_energy(ledger, opts.filter)}
    gpu_hours = s["gpu_seconds"] / 3600
    node_hours = s["node_ns"] / S / 3600
    em = carbon.emissions(config, by_hour, gpu_hours, node_hours)
    components = {"GPU": s["gpu_energy_uj"] / UJ_PER_J, "CPU": s["cpu_energy_uj"] / UJ_PER_J,
                  "DRAM": s["dram_energy_uj"] / UJ_PER_J}
    if s["other_energy_uj"]:
        components["other"] = s["other_energy_uj"] / UJ_PER_J
    nodes = q.run_nodes(ledger, opts.filter)
    clusters = sorted({c for c, _ in nodes})
    hardware = (f"{len(nodes)} node(s) of cluster {', '.join(clusters) or 'n/a'} "
                f"({gpu_hours:,.1f} GPU-hours, {node_hours:,.1f} node-hours)")
    return carbon.statement(
        energy_j_by_component=components,
        measured_j=(s["energy_uj"] - s["estimated_energy_uj"]) / UJ_PER_J,
        estimated_j=s["estimated_energy_uj"] / UJ_PER_J, hardware=hardware,
        co2e_g=em.co2e_g, operational_g=em.operational_g, embodied_g=em.embodied_g,
        carbon=em.carbon, subject=f"The {s['njobs']} job run(s) ({describe_selection(opts)})")


__all__ = [
    "AcctOptions", "AcctUsageError", "Carbon", "Column", "FIELDS", "JSON_SCHEMA", "Report",
    "TOTAL_FIELDS", "build_options", "format_elapsed", "format_energy", "helpformat",
    "parse_format", "parse_jobs", "parse_since", "parse_time", "report", "resolve_carbon",
]
