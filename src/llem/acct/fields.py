"""``llem-acct`` output fields: the catalogue, ``-o`` parsing and ``-e`` (helpformat).

A :class:`Field` says how a value is shown (its ``kind``), :class:`Column` is a field with the
width ``-o`` gave it. Job rows use :data:`FIELDS`, ``--totals`` rows :data:`TOTAL_FIELDS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from llem.acct.errors import AcctUsageError


@dataclass(frozen=True)
class Field:
    """One output field: its name, default width, kind (how it is shown) and description."""

    name: str
    width: int
    kind: str
    help: str


WORK_FIELDS: tuple[Field, ...] = (
    Field("Work", 10, "count", "work done in the windows (llem.window, wrap --work)"),
    Field("WorkUnit", 8, "str", "unit of Work: tokens, samples, steps, ..."),
    Field(
        "EnergyPerWork",
        13,
        "perwork",
        "joules per unit of work: all components of the windows that carry work",
    ),
    Field(
        "GPUEnergyPerWork",
        16,
        "perwork",
        "joules per unit of work, GPUs only (the ML.ENERGY scope)",
    ),
    Field("CO2ePerWork", 11, "perwork", "grams CO2e per unit of work"),
    Field(
        "WorkBasis",
        10,
        "str",
        "how the per-work energy was obtained: measured (whole node, exclusive), "
        "attributed (a proportional share of a shared node), estimated, mixed",
    ),
)
"""Work and energy per unit of work (issue 18): on window rows, on a job's row (its windows
that carry work) and in ``--totals window``."""

FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field("JobID", -12, "str", "job id; array tasks as JOB_TASK, windows (steps) as JOB.NAME"),
        Field("JobIDRaw", -12, "str", "the job's own Slurm job id (array tasks too)"),
        Field("JobName", 10, "str", "job name; for a window, its name"),
        Field("Cluster", 10, "str", "cluster name"),
        Field("User", 9, "str", "user name"),
        Field("Account", 10, "str", "account"),
        Field("Partition", 10, "str", "partition"),
        Field(
            "State",
            10,
            "str",
            "Slurm's state (COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, "
            "PREEMPTED, REQUEUED, ...) from its accounting; UNKNOWN where only "
            "EpilogSlurmctld saw the end (exit 0:0); windows: closed/open/abandoned",
        ),
        Field("ExitCode", 8, "str", "the batch script's exit code and signal, N:S"),
        Field(
            "DerivedExitCode", 15, "str", "the highest exit code (and signal) of the job's steps"
        ),
        Field("Submit", 19, "time", "submit time (local time; Slurm's accounting)"),
        Field("Eligible", 19, "time", "when the job became eligible (Slurm's accounting)"),
        Field("Start", 19, "time", "start (local time)"),
        Field("End", 19, "time", "end (local time)"),
        Field("Elapsed", 10, "elapsed", "wall time, [DD-]HH:MM:SS"),
        Field("ElapsedRaw", 10, "int", "wall time in seconds"),
        Field("Timelimit", 10, "str", "time limit as Slurm shows it (Slurm's accounting)"),
        Field("TimelimitRaw", 10, "int", "time limit in minutes (Slurm's accounting)"),
        Field("AllocCPUS", 10, "int", "CPUs allocated (Slurm's accounting)"),
        Field("AllocTRES", 10, "str", "trackable resources allocated (Slurm's accounting)"),
        Field("ReqMem", 10, "str", "memory requested (Slurm's accounting)"),
        Field("QOS", 10, "str", "quality of service (Slurm's accounting)"),
        Field("NNodes", 8, "int", "number of nodes"),
        Field("NodeList", 15, "str", "nodes (Slurm hostlist)"),
        Field("AllocGPUs", 9, "int", "GPUs allocated (GPU-seconds / wall time)"),
        Field(
            "ConsumedEnergy",
            14,
            "energy",
            "energy of all components, joules with K/M/G/T/P (x1000) suffixes",
        ),
        Field("ConsumedEnergyRaw", 17, "int", "energy of all components in joules"),
        Field("CPUEnergy", 10, "energy", "CPU package energy, joules (suffixed)"),
        Field("DRAMEnergy", 10, "energy", "DRAM energy, joules (suffixed)"),
        Field("GPUEnergy", 10, "energy", "GPU energy, joules (suffixed)"),
        Field(
            "PlatformEnergy", 14, "energy", "node meter minus CPU, DRAM, GPUs, joules (suffixed)"
        ),
        Field(
            "PlatformShare",
            13,
            "percent",
            "PlatformEnergy / ConsumedEnergy; blank without a node meter",
        ),
        Field("AvePower", 10, "watts", "mean power, watts (energy / elapsed)"),
        Field("EnergySource", 12, "str", "measured, estimated, mixed (or none: no energy)"),
        Field("Coverage", 8, "percent", "share of the wall time with data"),
        Field("CarbonIntensity", 15, "intensity", "grid intensity applied, gCO2e/kWh"),
        Field(
            "CO2e",
            10,
            "co2e",
            "emissions: energy x PUE x intensity (+ embodied when enabled), g/kg/t CO2e",
        ),
        Field("Tag", 10, "str", "the job's llem tag"),
        Field(
            "Attribution",
            11,
            "str",
            "how shared-node energy was charged: exclusive (the whole "
            "node), hybrid (idle power by allocation + use), use, "
            "allocation",
        ),
        *WORK_FIELDS,
    )
}

TOTAL_FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
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
        Field("PlatformShare", 13, "percent", FIELDS["PlatformShare"].help),
        Field("AvePower", 10, "watts", "mean power over the summed wall time, watts"),
        Field("EnergySource", 12, "str", FIELDS["EnergySource"].help),
        Field("Coverage", 8, "percent", "time-weighted share of wall time with data"),
        Field("CarbonIntensity", 15, "intensity", FIELDS["CarbonIntensity"].help),
        Field("CO2e", 10, "co2e", FIELDS["CO2e"].help),
        Field("Window", -12, "str", "window name (--totals window)"),
        *(Field(f.name, f.width, f.kind, f.help + " (--totals window)") for f in WORK_FIELDS),
    )
}

TOTAL_KEYS = {
    "user": "User",
    "account": "Account",
    "partition": "Partition",
    "tag": "Tag",
    "day": "Day",
    "month": "Month",
    "window": "Window",
}
DEFAULT_FORMAT = (
    "JobID",
    "JobName",
    "User",
    "Account",
    "Partition",
    "State",
    "Elapsed",
    "NNodes",
    "ConsumedEnergy",
    "EnergySource",
    "CO2e",
)
DEFAULT_TOTALS_FORMAT = (
    "NJobs",
    "Elapsed",
    "GPUHours",
    "ConsumedEnergy",
    "GPUEnergy",
    "EnergySource",
    "CO2e",
)
DEFAULT_WINDOW_TOTALS_FORMAT = (
    "NJobs",
    "Elapsed",
    "ConsumedEnergy",
    "GPUEnergy",
    "Work",
    "WorkUnit",
    "EnergyPerWork",
    "GPUEnergyPerWork",
    "WorkBasis",
    "CO2e",
)
CARBON_FIELDS = frozenset({"CarbonIntensity", "CO2e", "CO2ePerWork"})
WORK_FIELD_NAMES = frozenset(f.name for f in WORK_FIELDS)
ENERGY_PREFIXES = ("", "K", "M", "G", "T", "P")  # --units, and the suffixes of energy fields


BRIEF_FORMAT = "jobid,state,exitcode"
"""``-b``'s fields (sacct's BRIEF_FIELDS)."""
LONG_FORMAT = (
    "jobid,jobidraw,jobname,partition,alloccpus,elapsed,state,exitcode,reqmem,consumedenergy,"
    "alloctres"
)
"""``-l``'s fields: those of sacct's LONG_FIELDS that the ledger has (the others are task
statistics llem does not keep), in sacct's order."""


@dataclass(frozen=True)
class Column:
    """A field of the output with its width (negative: left-justified, as in sacct)."""

    field: Field
    width: int


def _lookup(name: str, catalogue: Mapping[str, Field]) -> Field:
    """A field by its name or the start of it, case-insensitive, as sacct: the first name
    in alphabetical order that starts with ``name`` (``elap`` is Elapsed, ``exit``
    ExitCode)."""
    lower = name.lower()
    for known in sorted(catalogue, key=str.lower):
        if known.lower().startswith(lower):
            return catalogue[known]
    import difflib  # only for the error message

    near = difflib.get_close_matches(name, list(catalogue), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise AcctUsageError("-o/--format", f"unknown field '{name}'{hint} (llem-acct -e lists them)")


def parse_format(text: str | None, totals_by: str | None = None) -> list[Column]:
    """``-o`` text (``JobID,JobName%30,CO2e%-8``) into columns; default when None.

    As sacct: field names are case-insensitive and may be cut short (the first field in
    alphabetical order that starts so); ``ALL`` (or ``A``, ``AL``) is every field;
    ``%N`` sets the width and right-justifies, ``%-N`` left-justifies; without ``%`` a
    field keeps its own width and justification (JobID and JobIDRaw: left). A field named
    twice has its last width in both places, as in sacct.

    Raises:
        AcctUsageError: an unknown field, or a bad width.
    """
    catalogue = TOTAL_FIELDS if totals_by else FIELDS
    if text is None:
        default = DEFAULT_WINDOW_TOTALS_FORMAT if totals_by == "window" else DEFAULT_TOTALS_FORMAT
        names = ((TOTAL_KEYS[totals_by],) + default) if totals_by else DEFAULT_FORMAT
        return [Column(catalogue[n], catalogue[n].width) for n in names]
    columns = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, pct, width = item.partition("%")
        n = None
        if pct:
            if not re.fullmatch(r"-?\d+", width) or int(width) == 0:
                raise AcctUsageError("-o/--format", f"bad width '%{width}' of field {name}")
            n = int(width)
        if name and "all".startswith(name.lower()):
            picked = list(catalogue.values())
        else:
            picked = [_lookup(name, catalogue)]
        columns += [Column(f, f.width if n is None else n) for f in picked]
    if not columns:
        raise AcctUsageError("-o/--format", "no fields given")
    # sacct keeps one width per field: a field named twice takes its last width everywhere
    last = {c.field.name: c.width for c in columns}
    return [Column(c.field, last[c.field.name]) for c in columns]


def helpformat(totals: bool = False) -> str:
    """The field names, four to a line, like ``sacct -e``; then what each one means."""
    catalogue = TOTAL_FIELDS if totals else FIELDS
    names = list(catalogue)
    lines = [
        "".join(f"{n:<20}" for n in names[i : i + 4]).rstrip() for i in range(0, len(names), 4)
    ]
    lines.append("")
    lines += [f"{f.name:<18} {f.help}" for f in catalogue.values()]
    return "\n".join(lines) + "\n"
