"""From the node store to slices: job slices (Epilog, sampler) and node slices (sampler).

The Epilog calls :func:`export_and_deliver` for each finished job run: the slice goes to the
node-local outbox and on to the spool within a time bound (:mod:`llem.node.outbox`). The node
store is only read here (its named queries, :class:`~llem.node.store.NodeStore`), apart from
marking a run exported and :func:`prune_node_store`, which deletes what the ledger already
holds.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from llem import __version__, slices
from llem.config import Config
from llem.errors import LedgerError
from llem.fsutil import ensure_private_dir, write_atomic
from llem.model import LABELLED
from llem.node.outbox import deliver
from llem.node.store import NO_DATA_KINDS, NodeStore
from llem.node.windows import MAX_NAME_CHARS, MAX_STEP_CHARS, MAX_WINDOWS_PER_JOB
from llem.units import HOUR_NS, NS_PER_S, split_by_hour, split_by_step

log = logging.getLogger(__name__)

NODE_MARK_FILE = "node-export.json"


# -- job slices ------------------------------------------------------------------------------


def _devices(store: NodeStore, keys: Iterable[str] | None = None) -> dict[str, dict]:
    wanted = None if keys is None else set(keys)
    out = {}
    for key, device in store.devices().items():
        if wanted is not None and key not in wanted:
            continue
        component = device["component"]
        out[key] = {
            "component": component if component in slices.COMPONENTS else "other",
            "name": device["name"],
            "sensor": device["sensor"],
            "source": device["source"],
            "method": device["method"],
        }
    return out


def _job_energy(rows: list[tuple]) -> list[dict]:
    """The run's energy per device, UTC hour and attribution method, from its energy rows
    (``store.run_energy_rows``)."""
    totals: dict[tuple[str, int, str], int] = {}
    for device, method, start_ns, end_ns, energy_uj in rows:
        for hour_s, part_uj in split_by_hour(start_ns, end_ns, energy_uj).items():
            key = (device, hour_s, method)
            totals[key] = totals.get(key, 0) + part_uj
    return [
        {"device": d, "hour_s": h, "method": m, "energy_uj": uj}
        for (d, h, m), uj in sorted(totals.items())
    ]


SLICE_WINDOWS_MAX = MAX_WINDOWS_PER_JOB
"""The most windows one job slice carries; the rest are counted in ``windows_dropped``."""
SLICE_WINDOWS_MAX_BYTES = 8 * 1024 * 1024
"""The most bytes (JSON) the windows of one job slice take, far below the aggregator's
limit on a slice (``MAX_SLICE_BYTES`` in cluster/readers.py): a job always reaches the
ledger, whatever its store holds."""


def _windows(store: NodeStore, run_id: int) -> tuple[list[dict], int]:
    """The run's windows for its slice, first opened first, within the slice's bounds;
    and how many were left out.

    Closed windows of one name, step and unit whose spans overlap (the ranks of a
    ``torchrun`` on this node, each with its own ``llem.window``) become one window: its
    energy is the job's over the union of their spans, counted once, its work the sum of
    theirs, and ``merged`` says how many there were."""
    out: list[dict] = []
    size = dropped = 0
    for win in _merged(store, run_id, store.run_windows(run_id)):
        win_bytes = len(json.dumps(win)) + 2
        if len(out) >= SLICE_WINDOWS_MAX or size + win_bytes > SLICE_WINDOWS_MAX_BYTES:
            dropped += 1
            continue
        size += win_bytes
        out.append(win)
    return out, dropped


def _window_entry(row: tuple) -> dict:
    name, step_id, start_ns, end_ns, status, energy, work, unit = row[:8]
    try:
        energy_map = {str(k): int(v) for k, v in json.loads(energy or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        energy_map = {}
    win = {
        "name": str(name)[:MAX_NAME_CHARS],
        "step_id": None if step_id is None else str(step_id)[:MAX_STEP_CHARS],
        "start_ns": start_ns,
        "end_ns": end_ns,
        "status": status,
        "energy": energy_map,
    }
    if work is not None:
        win["work"] = float(work)
    if unit is not None:
        win["unit"] = str(unit)[: slices.MAX_UNIT_CHARS]
    return win


def _merged(store: NodeStore, run_id: int, rows: list[tuple]) -> list[dict]:
    """The window entries, overlapping closed windows of one (name, step, unit) merged."""
    groups: dict[tuple, list[tuple]] = {}
    entries: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        if row[4] == "closed" and row[8] is not None and row[9] is not None:
            groups.setdefault((row[0], row[1], row[7]), []).append((i, row))
        else:
            entries.append((i, _window_entry(row)))
    for members in groups.values():
        members.sort(key=lambda m: (m[1][8], m[1][9]))
        cluster: list[tuple[int, tuple]] = []
        reach = None
        for member in members + [None]:  # type: ignore[list-item]
            if member is not None and (reach is None or member[1][8] < reach):
                cluster.append(member)
                reach = max(reach or 0, member[1][9])
                continue
            if cluster:
                entries.append((cluster[0][0], _merge(store, run_id, cluster)))
            cluster = [member] if member is not None else []
            reach = member[1][9] if member is not None else None
    return [entry for _, entry in sorted(entries, key=lambda e: e[0])]


def _merge(store: NodeStore, run_id: int, cluster: list[tuple[int, tuple]]) -> dict:
    if len(cluster) == 1:
        return _window_entry(cluster[0][1])
    rows = [row for _, row in cluster]
    win = _window_entry(rows[0])
    first = min(r[8] for r in rows)
    last = max(r[9] for r in rows)
    win["start_ns"] = min(r[2] for r in rows)
    win["end_ns"] = max(r[3] for r in rows)
    win["energy"] = {k: int(v) for k, v in store.run_energy_between(run_id, first, last).items()}
    works = [r[6] for r in rows if r[6] is not None]
    if works:
        win["work"] = float(sum(works))
    win["merged"] = len(rows)
    return win


POWER_STEPS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
"""The steps a power series may take: one minute, widened until the series fits."""


def _power_series(rows: list[tuple]) -> dict | None:
    """The run's coarse power series from its energy rows (``store.run_energy_rows``): its
    attributed energy per device per step (one minute, or the first wider step with at most
    ``slices.MAX_POWER_POINTS`` points), and the time each point had data. None when the
    run has no energy rows."""
    if not rows:
        return None
    devices = {r[0] for r in rows}
    first = min(r[2] for r in rows) // NS_PER_S
    last = max(r[3] for r in rows) // NS_PER_S
    for step in POWER_STEPS_S:
        if ((last - first) // step + 2) * len(devices) <= slices.MAX_POWER_POINTS:
            break
    step_ns = step * NS_PER_S
    energy: dict[tuple[str, int], int] = {}
    spans: dict[tuple[str, int], int] = {}
    seen: set[tuple[str, int]] = set()  # (device, interval start): a span counts once
    for device, _method, start_ns, end_ns, energy_uj in rows:
        counted = (device, start_ns) in seen
        if not counted:
            seen.add((device, start_ns))
        bucket = start_ns // step_ns
        if end_ns <= (bucket + 1) * step_ns:  # the usual case: the interval is in one step
            key = (device, bucket * step)
            energy[key] = energy.get(key, 0) + energy_uj
            if not counted:
                spans[key] = spans.get(key, 0) + end_ns - start_ns
            continue
        for t_s, part_uj, span_ns in split_by_step(start_ns, end_ns, energy_uj, step):
            key = (device, t_s)
            energy[key] = energy.get(key, 0) + part_uj
            if not counted:
                spans[key] = spans.get(key, 0) + span_ns
    points = []
    for (device, t_s), uj in sorted(energy.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        span_ms = min(step * 1000, spans.get((device, t_s), 0) // 10**6)
        if span_ms > 0:
            points.append({"t_s": t_s, "device": device, "energy_uj": uj, "span_ms": span_ms})
    return {"step_s": step, "points": points[: slices.MAX_POWER_POINTS]}


def _job_meta(job) -> dict:
    return {
        "job_id": job.job_id,
        "array_job_id": job.array_job_id,
        "array_task_id": job.array_task_id,
        "user": job.user,
        "uid": job.uid,
        "gid": job.gid,
        "account": job.account,
        "partition": job.partition,
        "nodelist": job.nodelist,
        "num_nodes": job.num_nodes,
        "cpus": job.cpus,
        "gpus": list(job.gpus),
        "tag": job.tag,
        "name": job.name,
        "start_ns": job.start_ns,
        "end_ns": job.end_ns,
        "state": job.state,
        "coverage": job.coverage,
        "flags": list(job.flags),
        **_attribution(job.attribution),
    }


def _attribution(text: str | None) -> dict:
    """The run's attribution record (policy, allocation, idle powers), when it has one."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        value = None
    return {"attribution": value} if isinstance(value, dict) else {}


def export_job(store: NodeStore, run_id: int, config: Config, *, now_ns: int | None = None) -> dict:
    """Build the job slice of one job run on this node.

    Args:
        store: the node store holding the run.
        run_id: the run (``jobs.run_id``).
        config: for the cluster name (the run's own cluster wins when set).
        now_ns: the slice's creation time (default: now); also the run's end when the run
            has none yet (flagged ``end_estimated``).

    Returns:
        A validated ``llem.slice/2`` job slice.

    Raises:
        LedgerError: no such run, or the data does not make a valid slice.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    job = store.run(run_id)
    if job is None:
        raise LedgerError(f"{store.path}: no job run {run_id}")
    meta = _job_meta(job)
    if job.end_ns is None:
        last = store.run_last_data_ns(run_id)
        meta["end_ns"] = max(job.start_ns, last or now_ns)
        meta["flags"] = sorted(set(meta["flags"]) | {"end_estimated"})
    rows = store.run_energy_rows(run_id)
    energy = _job_energy(rows)
    # Intervals overlapping the run count whole: they are a few seconds, and the run's own
    # Prolog and Epilog bound it.
    totals = store.device_totals(job.start_ns, meta["end_ns"])
    used = {r["device"] for r in energy} | set(totals)
    windows, windows_dropped = _windows(store, run_id)
    if windows_dropped:
        meta["flags"] = sorted(set(meta["flags"]) | {"windows_dropped"})
        log.warning(
            "job %s: %d window(s) left out of its slice (at most %d, %d bytes)",
            job.job_id,
            windows_dropped,
            SLICE_WINDOWS_MAX,
            SLICE_WINDOWS_MAX_BYTES,
        )
    power = _power_series(rows)
    if power is not None:
        used |= {p["device"] for p in power["points"]}
    data = {
        "schema": slices.SCHEMA,
        "kind": "job",
        "cluster": job.cluster or config.cluster,
        "node": job.node,
        "created_ns": now_ns,
        "producer": {"llem": __version__, "host": socket.gethostname()},
        "job": meta,
        "devices": _devices(store, used),
        "energy": energy,
        "windows": windows,
        "node_totals": totals,
    }
    if windows_dropped:
        data["windows_dropped"] = windows_dropped
    if power is not None:
        data["power"] = power
    steps = store.run_steps(run_id)
    if steps:
        data["steps"] = steps
    return slices.checked(data)


# -- node slices -----------------------------------------------------------------------------


def export_node(
    store: NodeStore,
    config: Config,
    node: str,
    *,
    since_ns: int,
    until_ns: int | None = None,
    now_ns: int | None = None,
) -> dict | None:
    """Build the node slice: hourly totals per device from the hour of ``since_ns`` on.

    Every hour in the range is recomputed whole from all intervals that overlap it, so a later
    export of a partial hour replaces the earlier one (the ledger keeps the larger
    ``as_of_ns``).

    Returns:
        The slice, or None when there are no intervals in the range.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    until_ns = now_ns if until_ns is None else until_ns
    from_ns = since_ns // HOUR_NS * HOUR_NS
    rows = store.device_interval_rows(from_ns, until_ns)
    if not rows:
        return None
    hours: dict[tuple[int, str], dict] = {}
    as_of_ns = 0
    for _, start_ns, end_ns, device, energy_uj, kind, status, rem_uj, att_uj, *labelled in rows:
        as_of_ns = max(as_of_ns, end_ns)
        no_data = kind in NO_DATA_KINDS or status != "ok"
        for field_name, value in (
            ("measured_uj", energy_uj),
            ("attributed_uj", att_uj),
            ("remainder_uj", rem_uj),
            *((f"{label}_uj", uj) for label, uj in zip(LABELLED, labelled, strict=True)),
        ):
            for hour_s, part in split_by_hour(start_ns, end_ns, value).items():
                _hour_row(hours, hour_s, device)[field_name] += part
        # The interval's time by clock hour (a zero-length interval still counts in its hour).
        spans = split_by_hour(start_ns, end_ns, end_ns - start_ns) or {
            start_ns // HOUR_NS * 3600: 0
        }
        for hour_s, span_ns in spans.items():
            row = _hour_row(hours, hour_s, device)
            row["intervals"] += 1
            row["gap_intervals"] += int(no_data)
            row["covered_ns"] += 0 if no_data else span_ns
    hour_rows = [row for (hour_s, _), row in sorted(hours.items()) if hour_s * NS_PER_S >= from_ns]
    data = {
        "schema": slices.SCHEMA,
        "kind": "node",
        "cluster": config.cluster,
        "node": node,
        "created_ns": now_ns,
        "producer": {"llem": __version__, "host": socket.gethostname()},
        "from_hour_s": from_ns // NS_PER_S,
        "as_of_ns": as_of_ns,
        "devices": _devices(store, {r["device"] for r in hour_rows}),
        "hours": hour_rows,
    }
    return slices.checked(data)


def _hour_row(hours: dict, hour_s: int, device: str) -> dict:
    row = hours.get((hour_s, device))
    if row is None:
        row = hours[(hour_s, device)] = {
            "hour_s": hour_s,
            "device": device,
            "measured_uj": 0,
            "attributed_uj": 0,
            "remainder_uj": 0,
            **{f"{label}_uj": 0 for label in LABELLED},
            "intervals": 0,
            "gap_intervals": 0,
            "covered_ns": 0,
        }
    return row


def export_node_since_last(
    store: NodeStore, config: Config, node: str, *, now_ns: int | None = None
) -> Path | None:
    """Export the node's hours since the last node export and deliver them.

    The mark (the hour the last export reached, which was partial) lives in
    ``STATE_DIR/node-export.json``; it moves on only once the slice is in the outbox.

    Returns:
        The slice's path in the outbox, or None when there was nothing to export.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    mark = Path(config.state_dir) / NODE_MARK_FILE
    since_ns = _read_mark(mark)
    if since_ns is None:
        first = store.first_interval_start_ns()
        if first is None:
            return None
        retention_ns = int(config.aggregate.node_retention_days * 86400 * NS_PER_S)
        since_ns = max(first, now_ns - retention_ns)
    data = export_node(store, config, node, since_ns=since_ns, now_ns=now_ns)
    if data is None:
        return None
    path = deliver(config, data)
    ensure_private_dir(mark.parent)
    write_atomic(mark.parent, mark.name, json.dumps({"as_of_ns": data["as_of_ns"]}).encode(), 0o600)
    return path


def _read_mark(mark: Path) -> int | None:
    try:
        return int(json.loads(mark.read_text())["as_of_ns"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable node export mark (%s); exporting from the start", mark, e)
        return None


# -- delivery --------------------------------------------------------------------------------


def export_and_deliver(
    store: NodeStore, run_id: int, config: Config, *, now_ns: int | None = None
) -> Path:
    """What the Epilog calls for a finished run: build, deliver, mark the run exported."""
    data = export_job(store, run_id, config, now_ns=now_ns)
    path = deliver(config, data)
    store.update_job(run_id, state="exported", exported_ns=data["created_ns"])
    return path


# -- node store retention --------------------------------------------------------------------


def prune_node_store(store: NodeStore, older_than_ns: int) -> dict[str, int]:
    """Delete what the ledger already holds and is older than ``older_than_ns``.

    Only runs that are ``exported`` and ended before the cut lose their attributed energy,
    windows and row; intervals (with their energy and remainder) go when they ended before
    the cut and no run that is not yet exported still needs them. Running jobs are never
    touched.

    Returns:
        Rows deleted per table.
    """
    counts = store.prune(older_than_ns)
    log.info("pruned the node store %s: %s", store.path, counts)
    return counts


def prune_by_config(store: NodeStore, config: Config, *, now_ns: int | None = None) -> dict:
    """:func:`prune_node_store` with the cut at ``aggregate.node_retention_days`` ago."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    days_ns = int(config.aggregate.node_retention_days * 86400 * NS_PER_S)
    return prune_node_store(store, now_ns - days_ns)
