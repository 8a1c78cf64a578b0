"""The types that cross the stages: readings turned into intervals, energy rows, events,
job records and job shares. Plain frozen dataclasses; no storage or I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class EnergyRow:
    """The energy of one device over one interval.

    ``energy_uj`` is zero, not missing, when ``kind`` says the step had no data (first read,
    reset, gap) or ``status`` says the read failed: coverage comes from ``kind``/``status``.
    """

    device_key: str
    energy_uj: int
    kind: str
    status: str
    raw_uj: int | None


@dataclass(frozen=True)
class Event:
    ts_ns: int
    kind: str
    detail: str = ""
    device_key: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """One run of a job on this node (a requeued job gets a new run with the same job_id).

    ``gpus`` lists the job's GPUs on this node: first as Slurm gives them (``SLURM_JOB_GPUS``,
    GRES indices as strings), then, from the job's first sampler interval, as the device keys
    of the energy rows (``nvml:GPU-<uuid>``, see ``node.slurm.GpuMap``); an entry without a
    ``:`` is an index that could not be resolved;
    ``state`` goes running -> ended (Epilog) -> sealed (coverage and flags computed) ->
    exported (its slice is in the spool).
    """

    job_id: str
    cluster: str
    node: str
    start_ns: int
    uid: int | None = None
    user: str | None = None
    gid: int | None = None
    account: str | None = None
    partition: str | None = None
    nodelist: str | None = None
    num_nodes: int | None = None
    cpus: int | None = None
    gpus: tuple[str, ...] = ()
    tag: str | None = None
    name: str | None = None
    cgroup: str | None = None
    array_job_id: str | None = None
    array_task_id: str | None = None
    end_ns: int | None = None
    state: str = "running"
    coverage: float | None = None
    flags: tuple[str, ...] = ()
    attribution: str | None = None
    """JSON of the attribution in force for the run: policy, idle powers and their sources."""
    run_id: int | None = None


@dataclass(frozen=True)
class JobShare:
    """A job's share of one device's energy in one interval (see llem.node.attribution)."""

    run_id: int
    device_key: str
    energy_uj: int
    method: str
    share: float


@dataclass(frozen=True)
class StepUse:
    """A job step's CPU time in one interval, out of its job's (see llem.node.attribution):
    the step's part of the job's energy in the interval is ``cpu_ns / job_cpu_ns``."""

    run_id: int
    step: str
    """Slurm's step name: ``batch``, ``extern``, ``0``, ...; ``other``: the steps beyond the
    cap, together."""
    cpu_ns: int
    job_cpu_ns: int
    """The job's CPU time in the interval, at least the sum of its steps' (0: nothing ran)."""


UNATTRIBUTED = "unattributed"
"""Remainder label: energy no job used or held (idle GPUs, processes outside jobs, psys,
rounding)."""
IDLE_UNALLOCATED = "idle_unallocated"
"""Remainder label: the static (idle) part of a shared device that no job's allocation
covers (``hybrid``), and the unallocated part of the platform's static power."""
UNALLOCATED = "unallocated"
"""Remainder label: under ``allocation``, the share of a device no job's allocation covers."""
REMAINDER_LABELS = (UNATTRIBUTED, IDLE_UNALLOCATED, UNALLOCATED)
LABELLED = (IDLE_UNALLOCATED, UNALLOCATED)
"""The labels the node store's remainder rows, the node totals, the slices and the ledger
carry as figures of their own (``<label>_uj``, a part of the remainder's energy); the rest of
the remainder is unattributed."""


class Remainder(NamedTuple):
    """A device's energy in one interval that belongs to no job, and why (its label)."""

    device_key: str
    energy_uj: int
    label: str = UNATTRIBUTED


@dataclass(frozen=True)
class Interval:
    """One sampler interval: wall-clock span, monotonic span, per-device energy, events."""

    sampler_id: str
    start_ns: int
    end_ns: int
    mono_start_ns: int
    mono_end_ns: int
    rows: tuple[EnergyRow, ...]
    events: tuple[Event, ...] = ()
    shares: tuple[JobShare, ...] = ()
    remainder: tuple[Remainder, ...] = ()
    """Energy that belongs to no job, per device and label; with ``shares`` it sums to
    ``rows``."""
    steps: tuple[StepUse, ...] = ()
    """The CPU time of each job step (its own cgroup) in the interval."""
