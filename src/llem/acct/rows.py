"""``llem-acct``'s rows: ledger rows into raw field values (joules, seconds, epoch ns), the
selection sacct makes (latest run of a requeued job, ``-j JOB.STEP``), a job's window rows
after it, and ``--totals`` rows. All SQL is in :mod:`llem.cluster.acct_queries`.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from llem.acct.co2e import add_carbon
from llem.acct.fields import TOTAL_KEYS, WORK_FIELD_NAMES
from llem.cluster.acct_queries import TOTAL_COLUMNS, WINDOW_COLUMNS, JobSpec
from llem.hostlist import compress_hostlist
from llem.units import NS_PER_S, UJ_PER_J

if TYPE_CHECKING:
    from llem.acct.co2e import Carbon
    from llem.acct.options import AcctOptions


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


def exit_text(code: int | None, signal: int | None) -> str | None:
    """sacct's ``N:S``; None when unknown."""
    if code is None:
        return None
    return f"{code}:{signal or 0}"


def state_text(state: str | None, cancelled_by: int | None) -> str:
    """The State field as sacct writes it: ``CANCELLED by UID`` names who cancelled."""
    if state == "CANCELLED" and cancelled_by is not None:
        return f"CANCELLED by {cancelled_by}"
    return state or "UNKNOWN"


NO_VAL = 0xFFFFFFFE
"""Slurm's array_task_id of a job that is not an array task (for sacct's row order)."""


def _int_or(text: str | None, default: int) -> int:
    return int(text) if text is not None and str(text).isdigit() else default


def sacct_order(row: Mapping[str, Any]) -> tuple:
    """sacct's row order: submit time, then array job id, array task id, job id (and, for
    runs of one job, their start; then the cluster and job id text, so that the order is
    total)."""
    array_job, array_task = row["_array"]
    cluster, job_id, start_ns = row["_key"]
    submit_ns = row["Submit"]
    return (
        submit_ns if submit_ns is not None else start_ns,
        _int_or(array_job, 0),
        _int_or(array_task, NO_VAL),
        _int_or(job_id, 0),
        start_ns,
        cluster,
        job_id,
    )


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """The raw field values (joules, seconds, epoch ns) of one ``job_runs`` row.

    Start, End and Elapsed are Slurm's where its accounting gave them (sacct's, to the
    second), else the nodes' (the Prolog's start, the last Epilog's end).
    """
    start_ns = run.get("slurm_start_ns") or run["run_start_ns"]
    end_ns = run.get("slurm_end_ns") or run["run_end_ns"]
    if run.get("slurm_start_ns") and not run.get("slurm_end_ns"):
        end_ns = run["run_end_ns"]
    elapsed_s = max(0, (end_ns or start_ns) - start_ns) / NS_PER_S
    if run.get("slurm_start_ns") and run.get("slurm_end_ns"):
        elapsed_s = round(elapsed_s)
    energy_j = run["energy_uj"] / UJ_PER_J
    row = {
        "JobID": job_id_text(run["job_id"], run["array_job_id"], run["array_task_id"]),
        "JobIDRaw": run["job_id"],
        "JobName": run["name"],
        "Cluster": run["cluster"],
        "User": run["user"],
        "Account": run["account"],
        "Partition": run["partition"],
        "State": state_text(run["state"], run.get("cancelled_by")),
        "ExitCode": exit_text(run.get("exit_code"), run.get("signal")),
        "DerivedExitCode": exit_text(run.get("derived_exit_code"), run.get("derived_signal")),
        "Submit": run.get("submit_ns"),
        "Eligible": run.get("eligible_ns"),
        "Start": start_ns,
        "End": end_ns,
        "Elapsed": elapsed_s,
        "ElapsedRaw": int(elapsed_s),
        "Timelimit": run.get("timelimit"),
        "TimelimitRaw": run.get("timelimit_min"),
        "AllocCPUS": run.get("alloc_cpus"),
        "AllocTRES": run.get("alloc_tres"),
        "ReqMem": run.get("req_mem"),
        "QOS": run.get("qos"),
        "NNodes": run["num_nodes"],
        "NodeList": run["nodelist"],
        "AllocGPUs": round(run["gpu_seconds"] / elapsed_s) if elapsed_s else 0,
        "ConsumedEnergy": energy_j,
        "ConsumedEnergyRaw": round(energy_j),
        "CPUEnergy": run["cpu_energy_uj"] / UJ_PER_J,
        "DRAMEnergy": run["dram_energy_uj"] / UJ_PER_J,
        "GPUEnergy": run["gpu_energy_uj"] / UJ_PER_J,
        "PlatformEnergy": run["other_energy_uj"] / UJ_PER_J,  # jobs' only 'other': platform
        "PlatformShare": platform_share(run["other_energy_uj"], run["energy_uj"]),
        "AvePower": energy_j / elapsed_s if elapsed_s else None,
        "EnergySource": energy_source(run["energy_uj"], run["estimated_energy_uj"]),
        "Coverage": run["coverage"],
        "Tag": run["tag"],
        "Attribution": ",".join(sorted(set((run.get("attribution") or "").split(",")) - {""}))
        or None,
        "_gpu_hours": run["gpu_seconds"] / 3600,
        "_node_hours": (run["num_nodes"] or 0) * elapsed_s / 3600,
        "_key": (run["cluster"], run["job_id"], run["run_start_ns"]),
        "_array": (run["array_job_id"], run["array_task_id"]),
    }
    row["_order"] = sacct_order(row)
    return row


RUN_KEY_COLUMNS = frozenset(
    {
        "cluster",
        "job_id",
        "run_start_ns",
        "run_end_ns",
        "array_job_id",
        "array_task_id",
        "submit_ns",
        "slurm_start_ns",
        "slurm_end_ns",
        "energy_uj",
        "gpu_seconds",
        "num_nodes",
    }
)
"""The ledger columns every job row reads: its key, sacct's order and selection, its times
and what its CO2e is priced from."""

FIELD_RUN_COLUMNS: dict[str, tuple[str, ...]] = {
    "JobID": (),
    "JobIDRaw": (),
    "JobName": ("name",),
    "Cluster": (),
    "User": ("user",),
    "Account": ("account",),
    "Partition": ("partition",),
    "State": ("state", "cancelled_by"),
    "ExitCode": ("exit_code", "signal"),
    "DerivedExitCode": ("derived_exit_code", "derived_signal"),
    "Submit": (),
    "Eligible": ("eligible_ns",),
    "Start": (),
    "End": (),
    "Elapsed": (),
    "ElapsedRaw": (),
    "Timelimit": ("timelimit",),
    "TimelimitRaw": ("timelimit_min",),
    "AllocCPUS": ("alloc_cpus",),
    "AllocTRES": ("alloc_tres",),
    "ReqMem": ("req_mem",),
    "QOS": ("qos",),
    "NNodes": (),
    "NodeList": ("nodelist",),
    "AllocGPUs": (),
    "ConsumedEnergy": (),
    "ConsumedEnergyRaw": (),
    "CPUEnergy": ("cpu_energy_uj",),
    "DRAMEnergy": ("dram_energy_uj",),
    "GPUEnergy": ("gpu_energy_uj",),
    "PlatformEnergy": ("other_energy_uj",),
    "PlatformShare": ("other_energy_uj",),
    "AvePower": (),
    "EnergySource": ("estimated_energy_uj",),
    "Coverage": ("coverage",),
    "CarbonIntensity": (),
    "CO2e": (),
    "Tag": ("tag",),
    "Attribution": ("attribution",),
}
"""The ledger columns (besides :data:`RUN_KEY_COLUMNS`) each shown field of a job row, and of
the window and step rows under it, is made from. The work fields are not here: they read
everything."""


def run_columns_for(fields: Iterable[str] | None) -> frozenset[str] | None:
    """The ledger columns that rows showing ``fields`` need (None: all of them, for None or
    a field not in :data:`FIELD_RUN_COLUMNS`)."""
    if fields is None:
        return None
    out = set(RUN_KEY_COLUMNS)
    for name in fields:
        columns = FIELD_RUN_COLUMNS.get(name)
        if columns is None:
            return None
        out.update(columns)
    return frozenset(out)


SLIM_FIELDS = frozenset(
    {
        "JobID",
        "JobIDRaw",
        "JobName",
        "Cluster",
        "User",
        "Account",
        "Partition",
        "State",
        "Submit",
        "Start",
        "End",
        "Elapsed",
        "ElapsedRaw",
        "NNodes",
        "ConsumedEnergy",
        "EnergySource",
        "CO2e",
        "CarbonIntensity",
        "Tag",
        "Coverage",
    }
)
"""Fields of :func:`run_rows`' slim rows: the default format's, and those the rest of the
selection reads (sacct's order, ``-T``, CO2e, the parent of a window or step row)."""


def run_rows(runs: Sequence[tuple], slim: bool = False) -> list[dict[str, Any]]:
    """:func:`run_row` of many ``job_runs`` rows given as tuples of :data:`RUN_COLUMNS`, the
    same dicts built without a dict per ledger row nor a call per field (a month of a large
    cluster is 80,000 rows and more: this loop is most of ``llem-acct -a``'s time).

    ``slim``: only the fields of :data:`SLIM_FIELDS` (and the private ones), for output that
    shows no other (the renderers read absent fields as None).
    """
    out = []
    append = out.append
    for (
        cluster,
        job_id,
        run_start_ns,
        run_end_ns,
        array_job_id,
        array_task_id,
        user,
        _uid,
        account,
        partition,
        name,
        tag,
        nodelist,
        num_nodes,
        state,
        _status,
        energy_uj,
        cpu_energy_uj,
        dram_energy_uj,
        gpu_energy_uj,
        other_energy_uj,
        estimated_energy_uj,
        gpu_seconds,
        coverage,
        exit_code,
        signal,
        derived_exit_code,
        derived_signal,
        submit_ns,
        eligible_ns,
        slurm_start_ns,
        slurm_end_ns,
        timelimit,
        timelimit_min,
        qos,
        alloc_cpus,
        alloc_tres,
        req_mem,
        cancelled_by,
        _state_source,
        attribution,
    ) in runs:
        start_ns = slurm_start_ns or run_start_ns
        end_ns = slurm_end_ns or run_end_ns
        elapsed_s = max(0, (end_ns or start_ns) - start_ns) / NS_PER_S
        if slurm_start_ns and slurm_end_ns:
            elapsed_s = round(elapsed_s)
        energy_j = energy_uj / UJ_PER_J
        if energy_uj <= 0:
            source = "none"
        elif estimated_energy_uj <= 0:
            source = "measured"
        else:
            source = "estimated" if estimated_energy_uj >= energy_uj else "mixed"
        order = (
            submit_ns if submit_ns is not None else run_start_ns,
            int(array_job_id) if array_job_id is not None and str(array_job_id).isdigit() else 0,
            int(array_task_id)
            if array_task_id is not None and str(array_task_id).isdigit()
            else NO_VAL,
            int(job_id) if job_id is not None and str(job_id).isdigit() else 0,
            run_start_ns,
            cluster,
            job_id,
        )
        if slim:
            append(
                {
                    "JobID": f"{array_job_id}_{array_task_id}"
                    if array_job_id and array_task_id is not None
                    else job_id,
                    "JobIDRaw": job_id,
                    "JobName": name,
                    "Cluster": cluster,
                    "User": user,
                    "Account": account,
                    "Partition": partition,
                    "State": f"CANCELLED by {cancelled_by}"
                    if state == "CANCELLED" and cancelled_by is not None
                    else state or "UNKNOWN",
                    "Submit": submit_ns,
                    "Start": start_ns,
                    "End": end_ns,
                    "Elapsed": elapsed_s,
                    "ElapsedRaw": int(elapsed_s),
                    "NNodes": num_nodes,
                    "ConsumedEnergy": energy_j,
                    "EnergySource": source,
                    "Coverage": coverage,
                    "Tag": tag,
                    "_gpu_hours": gpu_seconds / 3600,
                    "_node_hours": (num_nodes or 0) * elapsed_s / 3600,
                    "_key": (cluster, job_id, run_start_ns),
                    "_array": (array_job_id, array_task_id),
                    "_order": order,
                }
            )
            continue
        if attribution:
            policies = set(attribution.split(","))
            policies.discard("")
            attribution = ",".join(sorted(policies)) or None
        else:
            attribution = None
        append(
            {
                "JobID": f"{array_job_id}_{array_task_id}"
                if array_job_id and array_task_id is not None
                else job_id,
                "JobIDRaw": job_id,
                "JobName": name,
                "Cluster": cluster,
                "User": user,
                "Account": account,
                "Partition": partition,
                "State": f"CANCELLED by {cancelled_by}"
                if state == "CANCELLED" and cancelled_by is not None
                else state or "UNKNOWN",
                "ExitCode": None if exit_code is None else f"{exit_code}:{signal or 0}",
                "DerivedExitCode": None
                if derived_exit_code is None
                else f"{derived_exit_code}:{derived_signal or 0}",
                "Submit": submit_ns,
                "Eligible": eligible_ns,
                "Start": start_ns,
                "End": end_ns,
                "Elapsed": elapsed_s,
                "ElapsedRaw": int(elapsed_s),
                "Timelimit": timelimit,
                "TimelimitRaw": timelimit_min,
                "AllocCPUS": alloc_cpus,
                "AllocTRES": alloc_tres,
                "ReqMem": req_mem,
                "QOS": qos,
                "NNodes": num_nodes,
                "NodeList": nodelist,
                "AllocGPUs": round(gpu_seconds / elapsed_s) if elapsed_s else 0,
                "ConsumedEnergy": energy_j,
                "ConsumedEnergyRaw": round(energy_j),
                "CPUEnergy": cpu_energy_uj / UJ_PER_J,
                "DRAMEnergy": dram_energy_uj / UJ_PER_J,
                "GPUEnergy": gpu_energy_uj / UJ_PER_J,
                "PlatformEnergy": other_energy_uj / UJ_PER_J,
                "PlatformShare": other_energy_uj / energy_uj
                if other_energy_uj > 0 and energy_uj > 0
                else None,
                "AvePower": energy_j / elapsed_s if elapsed_s else None,
                "EnergySource": source,
                "Coverage": coverage,
                "Tag": tag,
                "Attribution": attribution,
                "_gpu_hours": gpu_seconds / 3600,
                "_node_hours": (num_nodes or 0) * elapsed_s / 3600,
                "_key": (cluster, job_id, run_start_ns),
                "_array": (array_job_id, array_task_id),
                "_order": order,
            }
        )
    return out


def platform_share(platform_uj: int, energy_uj: int) -> float | None:
    """The platform's part of the energy; None where there is none (no node meter)."""
    return platform_uj / energy_uj if platform_uj > 0 and energy_uj > 0 else None


def window_rows(
    windows: Sequence[tuple],
    devices: Mapping[tuple, tuple[str, str]],
    parents: Mapping[tuple, dict],
) -> list[dict[str, Any]]:
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
        m = merged.setdefault(
            key,
            {
                "start": w["start_ns"],
                "end": w["end_ns"],
                "nodes": [],
                "by": {"cpu": 0, "dram": 0, "gpu": 0, "platform": 0},
                "energy": 0,
                "estimated": 0,
                "gpus": 0,
                "status": w["status"],
                "work": None,
                "units": set(),
            },
        )
        if w.get("work") is not None:
            m["work"] = (m["work"] or 0.0) + w["work"]
            m["units"].add(w.get("unit") or "units")
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
        elapsed_s = max(0, end - m["start"]) / NS_PER_S
        energy_j = m["energy"] / UJ_PER_J
        label = name or step_id
        out.append(
            {
                **{k: parent[k] for k in ("Cluster", "User", "Account", "Partition", "Tag")},
                "JobID": f"{parent['JobID']}.{label}",
                "JobIDRaw": f"{job_id}.{label}",
                "JobName": name,
                "State": m["status"],
                "Start": m["start"],
                "End": m["end"],
                "Elapsed": elapsed_s,
                "ElapsedRaw": int(elapsed_s),
                "NNodes": len(set(m["nodes"])),
                "NodeList": compress_hostlist(sorted(set(m["nodes"]))),
                "AllocGPUs": m["gpus"],
                "ConsumedEnergy": energy_j,
                "ConsumedEnergyRaw": round(energy_j),
                "CPUEnergy": m["by"]["cpu"] / UJ_PER_J,
                "DRAMEnergy": m["by"]["dram"] / UJ_PER_J,
                "GPUEnergy": m["by"]["gpu"] / UJ_PER_J,
                "PlatformEnergy": m["by"]["platform"] / UJ_PER_J,
                "PlatformShare": platform_share(m["by"]["platform"], m["energy"]),
                "AvePower": energy_j / elapsed_s if elapsed_s else None,
                "EnergySource": energy_source(m["energy"], m["estimated"]),
                "Coverage": None,
                "Work": m["work"],
                "WorkUnit": _unit_of(m["units"]),
                "WorkBasis": work_basis(parent.get("Attribution"), m["energy"], m["estimated"])
                if m["work"] is not None
                else None,
                "_work_energy": (energy_j, m["by"]["gpu"] / UJ_PER_J),
                "_gpu_hours": m["gpus"] * elapsed_s / 3600,
                "_node_hours": len(set(m["nodes"])) * elapsed_s / 3600,
                "_key": None,
                "_step_id": step_id,
                "_parent": (cluster, job_id, run_start_ns),
                "_hour": m["start"] // NS_PER_S // 3600 * 3600,
            }
        )
    return out


def step_rows(
    steps: Sequence[tuple],
    devices: Mapping[tuple, tuple[str, str]],
    parents: Mapping[tuple, dict],
) -> list[dict[str, Any]]:
    """One row per Slurm step of a run (its nodes merged), as sacct lists them: ``J.batch``,
    ``J.extern``, ``J.0``... (rows of :func:`llem.cluster.acct_queries.select_steps`). The
    step's name is its JobName (sacct shows the command of a numbered step: the ledger does
    not keep it); its coverage is its run's, whose intervals it was split from."""
    out = window_rows(steps, devices, parents)
    for row in out:
        row["JobName"] = row["_step_id"]
        row["Coverage"] = parents[row["_parent"]]["Coverage"]
    return out


def _unit_of(units: set[str]) -> str | None:
    """The unit of a sum of work: the one unit, ``mixed`` (no per-unit figure), or None."""
    if not units:
        return None
    return next(iter(units)) if len(units) == 1 else "mixed"


def work_basis(attribution: str | None, energy_uj: float, estimated_uj: float) -> str:
    """How a per-unit figure was obtained: ``estimated`` or ``mixed`` when some energy is
    estimated; ``measured`` when every node was the job's alone (exclusive: the node's
    counters); otherwise ``attributed``, a proportional share of a shared node's energy."""
    source = energy_source(int(energy_uj), int(estimated_uj))
    if source in ("estimated", "mixed"):
        return source
    policies = set((attribution or "").split(",")) - {""}
    return "measured" if policies == {"exclusive"} else "attributed"


def add_per_work(rows: list[dict]) -> None:
    """Fill ``EnergyPerWork``, ``GPUEnergyPerWork`` and ``CO2ePerWork`` of rows that carry
    work in one unit (``_work_energy``: the joules, all and GPU, of the work's windows;
    ``_work_co2e``: their grams, else the row's ``CO2e``)."""
    for row in rows:
        work, energy = row.get("Work"), row.get("_work_energy")
        if not work or energy is None or row.get("WorkUnit") in (None, "mixed"):
            row.setdefault("EnergyPerWork", None)
            row.setdefault("GPUEnergyPerWork", None)
            row.setdefault("CO2ePerWork", None)
            continue
        row["EnergyPerWork"] = energy[0] / work
        row["GPUEnergyPerWork"] = energy[1] / work
        co2e = row.get("_work_co2e", row.get("CO2e"))
        row["CO2ePerWork"] = None if co2e is None else co2e / work


def add_job_work(runs: list[dict], steps: list[dict]) -> None:
    """A job row's work: the sum over its windows that carry work, and their energy."""
    by_parent: dict[tuple, list[dict]] = {}
    for step in steps:
        if step.get("Work") is not None:
            by_parent.setdefault(step["_parent"], []).append(step)
    for run in runs:
        mine = by_parent.get(run["_key"], [])
        if not mine:
            continue
        run["Work"] = sum(s["Work"] for s in mine)
        run["WorkUnit"] = _unit_of({s["WorkUnit"] for s in mine})
        run["_work_energy"] = (
            sum(s["_work_energy"][0] for s in mine),
            sum(s["_work_energy"][1] for s in mine),
        )
        co2e = [s.get("CO2e") for s in mine]
        run["_work_co2e"] = None if None in co2e else sum(co2e)
        run["WorkBasis"] = _combined_basis({s["WorkBasis"] for s in mine})


def _combined_basis(bases: set[str]) -> str:
    if len(bases) == 1:
        return next(iter(bases))
    if bases & {"estimated", "mixed"}:
        return "mixed"
    return "attributed"


def total_row(by: str, values: Sequence) -> dict[str, Any]:
    """The raw field values of one ``--totals`` group (a row of :data:`TOTAL_COLUMNS`)."""
    t = dict(zip(TOTAL_COLUMNS, values))
    elapsed_s = (t["elapsed_ns"] or 0) / NS_PER_S
    energy_j = (t["energy_uj"] or 0) / UJ_PER_J
    return {
        TOTAL_KEYS[by]: t["key"],
        "NJobs": t["njobs"],
        "Elapsed": elapsed_s,
        "NodeHours": (t["node_ns"] or 0) / NS_PER_S / 3600,
        "GPUHours": (t["gpu_seconds"] or 0) / 3600,
        "ConsumedEnergy": energy_j,
        "ConsumedEnergyRaw": round(energy_j),
        "CPUEnergy": (t["cpu_energy_uj"] or 0) / UJ_PER_J,
        "DRAMEnergy": (t["dram_energy_uj"] or 0) / UJ_PER_J,
        "GPUEnergy": (t["gpu_energy_uj"] or 0) / UJ_PER_J,
        "PlatformEnergy": (t["other_energy_uj"] or 0) / UJ_PER_J,
        "PlatformShare": platform_share(t["other_energy_uj"] or 0, t["energy_uj"] or 0),
        "AvePower": energy_j / elapsed_s if elapsed_s else None,
        "EnergySource": energy_source(t["energy_uj"] or 0, t["estimated_energy_uj"] or 0),
        "Coverage": (t["covered_ns"] / t["coverage_ns"]) if t["coverage_ns"] else None,
        "_gpu_hours": (t["gpu_seconds"] or 0) / 3600,
        "_node_hours": (t["node_ns"] or 0) / NS_PER_S / 3600,
        "_key": t["key"],
    }


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
        if not spec.step or (
            window is not None and spec.step in (window["JobName"], window["_step_id"])
        ):
            return True
    return False


def truncate(row: dict, start_ns: int | None, end_ns: int | None) -> None:
    """``-T``: the row's start and end cut to the window, and its elapsed time with them."""
    if start_ns is not None and row["Start"] is not None and row["Start"] < start_ns:
        row["Start"] = start_ns
    if end_ns is not None and row["End"] is not None and row["End"] > end_ns:
        row["End"] = end_ns
    if row["Start"] is not None and row["End"] is not None:
        row["Elapsed"] = max(0, row["End"] - row["Start"]) / NS_PER_S
        row["ElapsedRaw"] = int(row["Elapsed"])


def latest_runs(runs: list[dict]) -> list[dict]:
    """Only the latest run of each job among ``runs`` (sacct without ``-D``), order kept."""
    latest: dict[tuple[str, str], int] = {}
    for run in runs:
        cluster, job_id, start_ns = run["_key"]
        if start_ns > latest.get((cluster, job_id), -1):
            latest[(cluster, job_id)] = start_ns
    if len(latest) == len(runs):  # no job ran twice
        return list(runs)
    return [run for run in runs if latest[run["_key"][:2]] == run["_key"][2]]


def select_rows(
    ledger, opts: AcctOptions, carbon: Carbon | None, fields: Iterable[str] | None = None
) -> list[dict]:
    """Job rows (and their window rows, unless ``-X``), in sacct's order: a job, then its
    steps. With ``fields`` (names), only those need to be right: the ledger columns no
    other field needs are not read (:func:`run_columns_for`)."""
    from llem.cluster import acct_queries as q

    shown = None if fields is None else set(fields)
    slim = shown is not None and shown <= SLIM_FIELDS
    runs = run_rows(q.select_runs(ledger, opts.filter, run_columns_for(shown), ordered=False), slim)
    if not opts.duplicates:
        runs = latest_runs(runs)
    runs.sort(key=itemgetter("_order"))  # sacct_order, computed by run_rows
    if opts.truncate:
        for run in runs:
            truncate(run, opts.filter.start_ns, opts.filter.end_ns)
    hourly = None
    if (
        carbon is not None
        and not carbon.constant
        and runs
        and not (carbon.by_year_only and all(carbon.year_hour(r) is not None for r in runs))
    ):
        hourly = {}
        for cluster, job_id, run_start_ns, hour_s, uj in q.hourly_energy(
            ledger, opts.filter, "run"
        ):
            hourly.setdefault((cluster, job_id, run_start_ns), {})[hour_s] = uj / UJ_PER_J
    add_carbon(runs, carbon, hourly)
    specs = opts.filter.jobs
    wants_work = bool({c.field.name for c in opts.columns} & WORK_FIELD_NAMES) or (
        opts.mode == "json" and not opts.fields_given
    )
    if not runs or (opts.allocations and not wants_work):
        if not slim:  # (slim rows show no work field: None, as absent)
            add_per_work(runs)
        if specs is None or not any(s.step for s in specs):
            return runs
        return [run for run in runs if _shown(specs, run, None)]
    parents = {r["_key"]: r for r in runs}
    windows = q.select_windows(ledger, list(parents))
    slurm_steps = [] if opts.allocations else q.select_steps(ledger, list(parents))
    steps: list[dict] = []
    if slurm_steps:
        devices = q.device_components(ledger, {(s[0], s[10]) for s in slurm_steps})
        slurm = step_rows(slurm_steps, devices, parents)
        add_carbon(slurm, carbon)
        add_per_work(slurm)
        steps += [s for s in slurm if _shown(specs, parents[s["_parent"]], s)]
    if windows:
        devices = q.device_components(ledger, {(w[0], w[10]) for w in windows})
        named = window_rows(windows, devices, parents)
        add_carbon(named, carbon)
        add_job_work(runs, named)
        add_per_work(named)
        steps += [w for w in named if _shown(specs, parents[w["_parent"]], w)]
    add_per_work(runs)
    if opts.allocations:
        return [run for run in runs if _shown(specs, run, None)]
    by_parent: dict[tuple, list[dict]] = {}
    for step in steps:
        by_parent.setdefault(step["_parent"], []).append(step)
    out = []
    for run in runs:
        if _shown(specs, run, None):
            out.append(run)
        out += by_parent.get(run["_key"], [])
    return out


def window_total_rows(ledger, opts: AcctOptions, carbon: Carbon | None) -> list[dict]:
    """``--totals window``: one row per window name (and unit of work) across the runs
    matching the selection (every run, as the other totals)."""
    from llem.cluster import acct_queries as q

    runs = run_rows(q.select_runs(ledger, opts.filter))
    parents = {r["_key"]: r for r in runs}
    windows = q.select_windows(ledger, list(parents)) if parents else []
    if not windows:
        return []
    devices = q.device_components(ledger, {(w[0], w[10]) for w in windows})
    steps = window_rows(windows, devices, parents)
    add_carbon(steps, carbon)
    groups: dict[tuple, list[dict]] = {}
    for step in steps:
        groups.setdefault((step["JobName"] or "", step["WorkUnit"] or ""), []).append(step)
    out = []
    for (name, _), members in sorted(groups.items()):
        energy_j = sum(m["ConsumedEnergy"] for m in members)
        estimated = [m for m in members if m["EnergySource"] in ("estimated", "mixed")]
        elapsed_s = sum(m["Elapsed"] for m in members)
        co2e = [m["CO2e"] for m in members]
        with_work = [m for m in members if m["Work"] is not None]
        row = {
            "Window": name,
            "NJobs": len({m["_parent"] for m in members}),
            "Elapsed": elapsed_s,
            "NodeHours": sum(m["_node_hours"] for m in members),
            "GPUHours": sum(m["_gpu_hours"] for m in members),
            "ConsumedEnergy": energy_j,
            "ConsumedEnergyRaw": round(energy_j),
            "CPUEnergy": sum(m["CPUEnergy"] for m in members),
            "DRAMEnergy": sum(m["DRAMEnergy"] for m in members),
            "GPUEnergy": sum(m["GPUEnergy"] for m in members),
            "PlatformEnergy": sum(m["PlatformEnergy"] for m in members),
            "PlatformShare": platform_share(sum(m["PlatformEnergy"] for m in members), energy_j),
            "AvePower": energy_j / elapsed_s if elapsed_s else None,
            "EnergySource": (
                "none"
                if energy_j <= 0
                else "measured"
                if not estimated
                else "estimated"
                if len(estimated) == len(members)
                else "mixed"
            ),
            "Coverage": None,
            "CO2e": None if None in co2e else sum(co2e),
            "CarbonIntensity": None,
            "Work": sum(m["Work"] for m in with_work) if with_work else None,
            "WorkUnit": _unit_of({m["WorkUnit"] for m in with_work}),
            "WorkBasis": _combined_basis({m["WorkBasis"] for m in with_work})
            if with_work
            else None,
            "_work_energy": (
                sum(m["_work_energy"][0] for m in with_work),
                sum(m["_work_energy"][1] for m in with_work),
            ),
            "_work_co2e": None
            if any(m["CO2e"] is None for m in with_work)
            else sum(m["CO2e"] for m in with_work),
            "_key": name,
        }
        if row["CO2e"] is not None and energy_j > 0:
            intensities = [m["CarbonIntensity"] for m in members if m["CarbonIntensity"]]
            row["CarbonIntensity"] = (
                sum(m["CarbonIntensity"] * m["ConsumedEnergy"] for m in members) / energy_j
                if len(intensities) == len(members)
                else None
            )
        out.append(row)
    add_per_work(out)
    return out


def total_rows(ledger, opts: AcctOptions, carbon: Carbon | None) -> list[dict]:
    """One row per group of ``--totals``."""
    from llem.cluster import acct_queries as q

    if opts.totals_by == "window":
        return window_total_rows(ledger, opts, carbon)
    rows = [
        total_row(opts.totals_by, r) for r in q.select_totals(ledger, opts.filter, opts.totals_by)
    ]
    hourly = None
    if carbon is not None and not carbon.constant and rows:
        hourly = {}
        if carbon.by_year_only:
            # a run inside one UTC year counts with its total, as on the job rows: summed
            # by group and year in SQL, not read hour by hour
            for key, hour_s, uj in q.energy_by_year(ledger, opts.filter, opts.totals_by):
                by_hour = hourly.setdefault(key, {})
                by_hour[hour_s] = by_hour.get(hour_s, 0.0) + uj / UJ_PER_J
        else:
            for key, hour_s, uj in q.hourly_energy(ledger, opts.filter, opts.totals_by):
                hourly.setdefault(key, {})[hour_s] = uj / UJ_PER_J
    add_carbon(rows, carbon, hourly)
    return rows


COLUMN_FIELDS = SLIM_FIELDS | {
    "Eligible",
    "Timelimit",
    "TimelimitRaw",
    "AllocCPUS",
    "AllocTRES",
    "ReqMem",
    "QOS",
    "NodeList",
}
"""Fields :func:`select_columns` makes: the slim rows' and plain ledger columns."""

_PLAIN = {
    "JobIDRaw": "job_id",
    "JobName": "name",
    "Cluster": "cluster",
    "User": "user",
    "Account": "account",
    "Partition": "partition",
    "Submit": "submit_ns",
    "NNodes": "num_nodes",
    "Coverage": "coverage",
    "Tag": "tag",
    "Eligible": "eligible_ns",
    "Timelimit": "timelimit",
    "TimelimitRaw": "timelimit_min",
    "AllocCPUS": "alloc_cpus",
    "AllocTRES": "alloc_tres",
    "ReqMem": "req_mem",
    "QOS": "qos",
    "NodeList": "nodelist",
}


class RunColumns:
    """Job rows held by column: field name -> the list of its raw values (what
    :func:`run_rows`' dicts hold), for :func:`llem.acct.render.render_parsable`."""

    def __init__(self, values: dict[str, list], n: int) -> None:
        self.values = values
        self.n = n

    def __len__(self) -> int:
        return self.n


def columns_apply(opts: AcctOptions, carbon: Carbon | None, fields: Iterable[str]) -> bool:
    """Whether :func:`select_columns` gives what :func:`select_rows` does for ``opts``: job
    rows only (``-X``), no ``-j JOB.STEP`` nor ``--truncate``, CO2e of a constant factor,
    and only fields of :data:`COLUMN_FIELDS`."""
    specs = opts.filter.jobs
    return (
        opts.allocations
        and not opts.truncate
        and (specs is None or not any(s.step for s in specs))
        and (carbon is None or carbon.constant)
        and set(fields) <= COLUMN_FIELDS
    )


def select_columns(
    ledger, opts: AcctOptions, carbon: Carbon | None, fields: Iterable[str]
) -> RunColumns:
    """:func:`select_rows`' job rows for ``fields`` by column (where :func:`columns_apply`):
    the same values in the same order, without a dict per run (a month of a large cluster is
    80,000 runs and more). Only the ledger columns the fields need are read."""
    from llem.cluster import acct_queries as q

    fields = list(dict.fromkeys(fields))
    needed = run_columns_for(fields) or frozenset()
    read = [c for c in q.RUN_COLUMNS if c in needed]
    # the tuples made here hold no cycle: the collector's passes over them (a third of
    # the time of fetching 80,000 runs) find nothing
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run_columns(ledger, opts, carbon, fields, read, needed)
    finally:
        if collecting:
            gc.enable()


def _run_columns(ledger, opts, carbon, fields, read, needed) -> RunColumns:
    from llem.cluster import acct_queries as q

    runs = q.select_runs(ledger, opts.filter, needed, ordered=False, padded=False)
    col = dict(zip(read, zip(*runs))) if runs else {c: () for c in read}
    kept: Iterable[int] = range(len(runs))
    pairs = list(zip(col["cluster"], col["job_id"]))
    if not opts.duplicates and len(set(pairs)) != len(pairs):
        # some job ran twice: its latest run only (latest_runs)
        twice = {p for p, count in Counter(pairs).items() if count > 1}
        starts = col["run_start_ns"]
        latest: dict[tuple, int] = {}
        for i, p in enumerate(pairs):
            if p in twice and starts[i] > latest.get(p, -1):
                latest[p] = starts[i]
        kept = [i for i, p in enumerate(pairs) if p not in twice or latest[p] == starts[i]]

    def number(text, default):
        return int(text) if text is not None and str(text).isdigit() else default

    # sacct's order (run_rows' _order), as one list of keys
    keys = [
        (
            rs if sub is None else sub,
            0 if aj is None else number(aj, 0),
            NO_VAL if at is None else number(at, NO_VAL),
            int(j) if j.__class__ is str and j.isdigit() else number(j, 0),
            rs,
            cl,
            j,
        )
        for sub, aj, at, j, rs, cl in zip(
            col["submit_ns"],
            col["array_job_id"],
            col["array_task_id"],
            col["job_id"],
            col["run_start_ns"],
            col["cluster"],
        )
    ]
    order = sorted(kept, key=keys.__getitem__)
    n = len(order)
    if order != list(range(len(runs))):  # (rows in order, then by column: fewer scattered reads)
        runs = [runs[i] for i in order]
        col = dict(zip(read, zip(*runs))) if runs else {c: () for c in read}
    values: dict[str, list] = {}
    elapsed = [
        round(max(0, ((se or re) or s) - s) / NS_PER_S)
        if ss and se
        else max(0, ((se or re) or s) - s) / NS_PER_S
        for ss, se, rs, re in zip(
            col["slurm_start_ns"], col["slurm_end_ns"], col["run_start_ns"], col["run_end_ns"]
        )
        for s in (ss or rs,)
    ]
    energy = [uj / UJ_PER_J for uj in col["energy_uj"]]
    for name in fields:
        if name in _PLAIN:
            values[name] = list(col[_PLAIN[name]])
        elif name == "JobID":
            values[name] = [
                f"{a}_{t}" if a and t is not None else j
                for j, a, t in zip(col["job_id"], col["array_job_id"], col["array_task_id"])
            ]
        elif name == "State":
            values[name] = [
                f"CANCELLED by {by}" if s == "CANCELLED" and by is not None else s or "UNKNOWN"
                for s, by in zip(col["state"], col["cancelled_by"])
            ]
        elif name == "Start":
            values[name] = [s or r for s, r in zip(col["slurm_start_ns"], col["run_start_ns"])]
        elif name == "End":
            values[name] = [e or r for e, r in zip(col["slurm_end_ns"], col["run_end_ns"])]
        elif name == "Elapsed":
            values[name] = elapsed
        elif name == "ElapsedRaw":
            values[name] = [int(e) for e in elapsed]
        elif name == "ConsumedEnergy":
            values[name] = energy
        elif name == "EnergySource":
            values[name] = [
                "none" if e <= 0 else "measured" if x <= 0 else "estimated" if x >= e else "mixed"
                for e, x in zip(col["energy_uj"], col["estimated_energy_uj"])
            ]
    if carbon is not None:
        gpu_hours: list[float] = []  # (read only when the embodied CO2e is added)
        node_hours: list[float] = []
        if carbon.factors.embodied_enabled:
            gpu_hours = [s / 3600 for s in col["gpu_seconds"]]
            node_hours = [(nn or 0) * e / 3600 for nn, e in zip(col["num_nodes"], elapsed)]
        values["CO2e"], g_per_kwh = carbon.constant_column(energy, gpu_hours, node_hours)
        values["CarbonIntensity"] = [g_per_kwh] * n
    else:
        values["CO2e"] = values["CarbonIntensity"] = [None] * n
    return RunColumns(values, n)
