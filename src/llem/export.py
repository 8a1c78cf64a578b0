"""From the node store to the spool: job and node slices, outbox and bounded delivery.

The Epilog calls :func:`export_and_deliver` for each finished job run. A slice is first
written to the node-local outbox (temporary name, fsync, rename), which never depends on the
shared filesystem; then a detached grandchild process moves the outbox into ``spool_dir``
while the caller waits at most ``timeout_s`` (1 s). A spool that is down, full or hung
therefore never holds the Epilog longer than that: the slices stay in the outbox and the
next :func:`flush_outbox` (a later Epilog, the sampler) sends them. Only one flusher runs at
a time per outbox (flock), so a hung spool does not pile up blocked processes.

Only reads go to the node store (``store.query``), apart from marking a run exported and
:func:`prune_node_store`, which deletes what the ledger already holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from llem import __version__, slices
from llem.config import Config
from llem.errors import LedgerError, StoreError
from llem.store.node import NodeStore, ensure_private_dir
from llem.timeline import HOUR_NS, split_by_hour
from llem.units import NS_PER_S

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 1.0
NODE_MARK_FILE = "node-export.json"
_NO_DATA_KINDS = ("first", "reset", "gap")


# -- paths -----------------------------------------------------------------------------------


def outbox_dir(config: Config) -> Path:
    """The node-local outbox (default ``STATE_DIR/outbox``)."""
    return Path(config.aggregate.outbox_dir or Path(config.state_dir) / "outbox")


def check_spool_dir(path: Path, *, create: bool = True) -> Path:
    """Make sure the spool is a real directory that no ordinary user can write into.

    Raises:
        LedgerError: a symlink, not a directory, writable by others, or cannot be created.
    """
    from llem.safedir import dir_problem

    problem = dir_problem(path, create_mode=0o700 if create else None, group_write_ok=True,
                          owner_check=False)
    if problem is None:
        return path
    if problem.startswith(("cannot be used", "permission denied")):
        raise LedgerError(f"{path}: cannot use the spool: {problem.split(': ', 1)[-1]}")
    extra = "; anyone could drop slices there" if "writable" in problem else ""
    raise LedgerError(f"{path}: the spool {problem}{extra}")


def write_atomic(directory: Path, name: str, data: bytes, mode: int = 0o640) -> Path:
    """Write ``directory/name`` under a temporary name, fsync, rename, fsync the directory.

    The temporary name starts with a dot, which readers of the spool and outbox skip.
    ``O_EXCL | O_NOFOLLOW``: never written through a planted file or symlink.
    """
    final = directory / name
    tmp = directory / f".tmp.{os.getpid()}.{time.monotonic_ns()}.{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)
    return final


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def encode(data: dict) -> bytes:
    """A slice as compact, key-sorted UTF-8 JSON (the same slice gives the same bytes)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# -- job slices ------------------------------------------------------------------------------


def _devices(store: NodeStore, keys: Iterable[str] | None = None) -> dict[str, dict]:
    rows = store.query("SELECT key, component, name, sensor, source, method FROM devices")
    wanted = None if keys is None else set(keys)
    out = {}
    for key, component, name, sensor, source, method in rows:
        if wanted is not None and key not in wanted:
            continue
        out[key] = {"component": component if component in slices.COMPONENTS else "other",
                    "name": name, "sensor": sensor, "source": source, "method": method}
    return out


def _job_energy(store: NodeStore, run_id: int) -> list[dict]:
    """The run's energy per device, UTC hour and attribution method."""
    totals: dict[tuple[str, int, str], int] = {}
    rows = store.query(
        "SELECT je.device_key, je.method, i.start_ns, i.end_ns, je.energy_uj "
        "FROM job_energy je JOIN intervals i ON i.id = je.interval_id WHERE je.run_id = ?",
        (run_id,),
    )
    for device, method, start_ns, end_ns, energy_uj in rows:
        for hour_s, part_uj in split_by_hour(start_ns, end_ns, energy_uj).items():
            key = (device, hour_s, method)
            totals[key] = totals.get(key, 0) + part_uj
    return [{"device": d, "hour_s": h, "method": m, "energy_uj": uj}
            for (d, h, m), uj in sorted(totals.items())]


def _windows(store: NodeStore, run_id: int) -> list[dict]:
    rows = store.query(
        "SELECT name, step_id, start_ns, end_ns, status, energy FROM windows WHERE run_id = ? "
        "ORDER BY start_ns, id", (run_id,))
    out = []
    for name, step_id, start_ns, end_ns, status, energy in rows:
        try:
            energy_map = {str(k): int(v) for k, v in json.loads(energy or "{}").items()}
        except (ValueError, TypeError, AttributeError):
            energy_map = {}
        out.append({"name": name, "step_id": step_id, "start_ns": start_ns, "end_ns": end_ns,
                    "status": status, "energy": energy_map})
    return out


def _node_totals(store: NodeStore, start_ns: int, end_ns: int) -> dict[str, dict]:
    """The node's own measured, attributed and unattributed energy over a span.

    Intervals are counted whole when they overlap the span (the sampler's intervals are a few
    seconds; the job's own prolog and epilog bound it).
    """
    span = "SELECT id FROM intervals WHERE end_ns > ? AND start_ns < ?"
    params = (start_ns, end_ns)
    out: dict[str, dict] = {}
    where = f"WHERE interval_id IN ({span})"
    queries = (
        ("measured_uj", f"SELECT device_key, SUM(energy_uj) FROM energy {where} "
                        "GROUP BY device_key"),
        ("attributed_uj", f"SELECT device_key, SUM(energy_uj) FROM job_energy {where} "
                          "GROUP BY device_key"),
        ("remainder_uj", f"SELECT device_key, SUM(energy_uj) FROM remainder {where} "
                         "GROUP BY device_key"),
        ("gap_intervals", f"SELECT device_key, COUNT(*) FROM energy {where} AND "
                          f"(kind IN {_NO_DATA_KINDS} OR status != 'ok') GROUP BY device_key"),
    )
    for field_name, sql in queries:
        for device, value in store.query(sql, params):
            row = out.setdefault(device, {"measured_uj": 0, "attributed_uj": 0,
                                          "remainder_uj": 0, "gap_intervals": 0})
            row[field_name] = int(value or 0)
    return out


def _job_meta(job) -> dict:
    return {
        "job_id": job.job_id, "array_job_id": job.array_job_id,
        "array_task_id": job.array_task_id, "user": job.user, "uid": job.uid, "gid": job.gid,
        "account": job.account, "partition": job.partition, "nodelist": job.nodelist,
        "num_nodes": job.num_nodes, "cpus": job.cpus, "gpus": list(job.gpus), "tag": job.tag,
        "name": job.name, "start_ns": job.start_ns, "end_ns": job.end_ns, "state": job.state,
        "coverage": job.coverage, "flags": list(job.flags),
    }


def export_job(store: NodeStore, run_id: int, config: Config, *,
               now_ns: int | None = None) -> dict:
    """Build the job slice of one job run on this node.

    Args:
        store: the node store holding the run.
        run_id: the run (``jobs.run_id``).
        config: for the cluster name (the run's own cluster wins when set).
        now_ns: the slice's creation time (default: now); also the run's end when the run
            has none yet (flagged ``end_estimated``).

    Returns:
        A validated ``llem.slice/1`` job slice.

    Raises:
        LedgerError: no such run, or the data does not make a valid slice.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    found = store.jobs("run_id = ?", (run_id,))
    if not found:
        raise LedgerError(f"{store.path}: no job run {run_id}")
    job = found[0]
    meta = _job_meta(job)
    if job.end_ns is None:
        last = store.query("SELECT MAX(i.end_ns) FROM job_energy je JOIN intervals i "
                           "ON i.id = je.interval_id WHERE je.run_id = ?", (run_id,))[0][0]
        meta["end_ns"] = max(job.start_ns, last or now_ns)
        meta["flags"] = sorted(set(meta["flags"]) | {"end_estimated"})
    energy = _job_energy(store, run_id)
    totals = _node_totals(store, job.start_ns, meta["end_ns"])
    used = {r["device"] for r in energy} | set(totals)
    data = {
        "schema": slices.SCHEMA, "kind": "job", "cluster": job.cluster or config.cluster,
        "node": job.node, "created_ns": now_ns,
        "producer": {"llem": __version__, "host": socket.gethostname()},
        "job": meta, "devices": _devices(store, used), "energy": energy,
        "windows": _windows(store, run_id), "node_totals": totals,
    }
    return _checked(data)


def _checked(data: dict) -> dict:
    try:
        return slices.validate(data)
    except slices.SliceError as e:
        raise LedgerError(f"refusing to export an invalid slice: {e}") from e


# -- node slices -----------------------------------------------------------------------------


def export_node(store: NodeStore, config: Config, node: str, *, since_ns: int,
                until_ns: int | None = None, now_ns: int | None = None) -> dict | None:
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
    rows = store.query(
        "SELECT i.id, i.start_ns, i.end_ns, e.device_key, e.energy_uj, e.kind, e.status, "
        "COALESCE(r.energy_uj, 0), "
        "(SELECT COALESCE(SUM(je.energy_uj), 0) FROM job_energy je "
        " WHERE je.interval_id = i.id AND je.device_key = e.device_key) "
        "FROM intervals i JOIN energy e ON e.interval_id = i.id "
        "LEFT JOIN remainder r ON r.interval_id = i.id AND r.device_key = e.device_key "
        "WHERE i.end_ns > ? AND i.start_ns < ?",
        (from_ns, until_ns),
    )
    if not rows:
        return None
    hours: dict[tuple[int, str], dict] = {}
    as_of_ns = 0
    for _, start_ns, end_ns, device, energy_uj, kind, status, rem_uj, att_uj in rows:
        as_of_ns = max(as_of_ns, end_ns)
        no_data = kind in _NO_DATA_KINDS or status != "ok"
        for field_name, value in (("measured_uj", energy_uj), ("attributed_uj", att_uj),
                                  ("remainder_uj", rem_uj)):
            for hour_s, part in split_by_hour(start_ns, end_ns, value).items():
                _hour_row(hours, hour_s, device)[field_name] += part
        for hour_s, span_ns in _time_by_hour(start_ns, end_ns).items():
            row = _hour_row(hours, hour_s, device)
            row["intervals"] += 1
            row["gap_intervals"] += int(no_data)
            row["covered_ns"] += 0 if no_data else span_ns
    hour_rows = [row for (hour_s, _), row in sorted(hours.items()) if hour_s * NS_PER_S >= from_ns]
    data = {
        "schema": slices.SCHEMA, "kind": "node", "cluster": config.cluster, "node": node,
        "created_ns": now_ns, "producer": {"llem": __version__, "host": socket.gethostname()},
        "from_hour_s": from_ns // NS_PER_S, "as_of_ns": as_of_ns,
        "devices": _devices(store, {r["device"] for r in hour_rows}), "hours": hour_rows,
    }
    return _checked(data)


def _hour_row(hours: dict, hour_s: int, device: str) -> dict:
    row = hours.get((hour_s, device))
    if row is None:
        row = hours[(hour_s, device)] = {
            "hour_s": hour_s, "device": device, "measured_uj": 0, "attributed_uj": 0,
            "remainder_uj": 0, "intervals": 0, "gap_intervals": 0, "covered_ns": 0}
    return row


def _time_by_hour(start_ns: int, end_ns: int) -> dict[int, int]:
    out: dict[int, int] = {}
    t = start_ns
    if end_ns <= start_ns:
        return {start_ns // HOUR_NS * 3600: 0}
    while t < end_ns:
        hour_start = t // HOUR_NS * HOUR_NS
        seg_end = min(end_ns, hour_start + HOUR_NS)
        out[hour_start // NS_PER_S] = out.get(hour_start // NS_PER_S, 0) + seg_end - t
        t = seg_end
    return out


def export_node_since_last(store: NodeStore, config: Config, node: str, *,
                           now_ns: int | None = None) -> Path | None:
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
        first = store.query("SELECT MIN(start_ns) FROM intervals")[0][0]
        if first is None:
            return None
        retention_ns = int(config.aggregate.node_retention_days * 86400 * NS_PER_S)
        since_ns = max(first, now_ns - retention_ns)
    data = export_node(store, config, node, since_ns=since_ns, now_ns=now_ns)
    if data is None:
        return None
    path = deliver(config, data)
    ensure_private_dir(mark.parent)
    write_atomic(mark.parent, mark.name, json.dumps({"as_of_ns": data["as_of_ns"]}).encode(),
                 0o600)
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


@dataclass
class FlushResult:
    """What one flush achieved within its time bound."""

    sent: list[str] = field(default_factory=list)
    pending: int = 0
    timed_out: bool = False
    error: str | None = None


def deliver(config: Config, data: dict, *, timeout_s: float = DELIVERY_TIMEOUT_S) -> Path:
    """Put a slice in the outbox, then try to move the outbox to the spool within ``timeout_s``.

    Returns:
        The slice's path in the outbox (it may already have been moved to the spool).

    Raises:
        LedgerError: the outbox (node-local) cannot be written; spool trouble never raises.
    """
    name = slices.file_name(data)
    try:
        outbox = ensure_private_dir(outbox_dir(config), 0o700)
        path = write_atomic(outbox, name, encode(data), 0o600)
    except (OSError, StoreError) as e:
        raise LedgerError(f"cannot write the slice {name} to the outbox: {e}") from e
    log.info("slice %s written to the outbox %s", name, outbox)
    flush_outbox(config, timeout_s=timeout_s)
    return path


def export_and_deliver(store: NodeStore, run_id: int, config: Config, *,
                       now_ns: int | None = None) -> Path:
    """What the Epilog calls for a finished run: build, deliver, mark the run exported."""
    data = export_job(store, run_id, config, now_ns=now_ns)
    path = deliver(config, data)
    store.update_job(run_id, state="exported", exported_ns=data["created_ns"])
    return path


def pending_slices(config: Config) -> list[Path]:
    """Slices still in the outbox, oldest name first."""
    try:
        names = os.listdir(outbox_dir(config))
    except FileNotFoundError:
        return []
    return sorted(outbox_dir(config) / n for n in names if n.endswith(".json")
                  and not n.startswith("."))


def flush_outbox(config: Config, *, timeout_s: float = DELIVERY_TIMEOUT_S) -> FlushResult:
    """Move the outbox's slices into the spool, waiting at most ``timeout_s``.

    The copying happens in a detached grandchild process that the caller never waits on
    beyond the bound: a hung NFS write blocks that process, not the Epilog. Each slice is
    written to the spool under a temporary name, fsynced, renamed, and only then removed
    from the outbox (a crash in between leaves a duplicate, which the ledger ignores).
    """
    result = FlushResult(pending=len(pending_slices(config)))
    if not result.pending:
        return result
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child: detach the worker and leave at once
        os.close(read_fd)
        try:
            os.setsid()
            if os.fork() == 0:
                _detach_fds(write_fd)
                _flush_worker(config, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    _collect(read_fd, timeout_s, result)
    os.close(read_fd)
    result.pending = len(pending_slices(config))
    if result.timed_out:
        log.warning("spool %s did not answer within %.1f s; %d slice(s) wait in the outbox",
                    config.spool_dir, timeout_s, result.pending)
    elif result.error:
        log.warning("spool %s: %s; %d slice(s) wait in the outbox", config.spool_dir,
                    result.error, result.pending)
    return result


def _detach_fds(keep_fd: int) -> None:
    """In the delivery grandchild: hold none of the caller's files open.

    slurmd reads the Epilog's output until every holder closes it, and a caller's locks live
    as long as any inherited descriptor: a grandchild hung on the spool must hold neither.
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 65536)


def _collect(read_fd: int, timeout_s: float, result: FlushResult) -> None:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            result.timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if not ready:
            result.timed_out = True
            break
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf += chunk
    for line in buf.decode(errors="replace").splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "sent":
            result.sent.append(rest)
        elif tag == "error":
            result.error = rest
    if not result.timed_out and buf and not buf.endswith(b"done\n") and result.error is None:
        result.error = "the delivery process ended early"


def _flush_worker(config: Config, write_fd: int) -> None:
    """The grandchild: move every outbox slice to the spool; report on ``write_fd``."""
    def say(line: str) -> None:
        try:
            os.write(write_fd, (line + "\n").encode())
        except OSError:
            pass  # the caller stopped listening after its bound; carry on regardless

    try:
        outbox = outbox_dir(config)
        lock_fd = os.open(outbox / ".flush.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say("error another delivery is still running (the spool may be hung)")
            return
        spool = check_spool_dir(Path(config.spool_dir))
        for path in pending_slices(config):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            write_atomic(spool, path.name, data, 0o640)
            _unlink_quietly(path)
            say(f"sent {path.name}")
        say("done")
    except LedgerError as e:
        say(f"error {e}")
    except OSError as e:
        reason = "the spool is full" if e.errno == errno.ENOSPC else (
            "the spool is read-only" if e.errno == errno.EROFS else f"{e.strerror or e}")
        say(f"error {reason}")
    except BaseException as e:  # noqa: BLE001 - a worker must never raise into a fork
        say(f"error {e!r}")


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
    counts: dict[str, int] = {}
    db = store.db
    try:
        db.execute("BEGIN IMMEDIATE")
        runs = [r for (r,) in db.execute(
            "SELECT run_id FROM jobs WHERE state = 'exported' AND end_ns IS NOT NULL "
            "AND end_ns < ?", (older_than_ns,))]
        # Keep intervals that an unexported run still needs, whatever their age.
        keep_from = db.execute(
            "SELECT MIN(start_ns) FROM jobs WHERE state != 'exported'").fetchone()[0]
        cut_ns = older_than_ns if keep_from is None else min(older_than_ns, keep_from)
        old = "SELECT id FROM intervals WHERE end_ns < ?"
        marks = ",".join("?" * len(runs))
        steps = [
            ("windows", f"DELETE FROM windows WHERE run_id IN ({marks})", runs),
            ("job_energy", f"DELETE FROM job_energy WHERE run_id IN ({marks})", runs),
            ("jobs", f"DELETE FROM jobs WHERE run_id IN ({marks})", runs),
            ("job_energy_old", f"DELETE FROM job_energy WHERE interval_id IN ({old})", [cut_ns]),
            ("remainder", f"DELETE FROM remainder WHERE interval_id IN ({old})", [cut_ns]),
            ("energy", f"DELETE FROM energy WHERE interval_id IN ({old})", [cut_ns]),
            ("intervals", "DELETE FROM intervals WHERE end_ns < ?", [cut_ns]),
            ("events", "DELETE FROM events WHERE ts_ns < ?", [cut_ns]),
        ]
        for table, sql, params in steps:
            if params:
                counts[table] = db.execute(sql, params).rowcount
        db.execute("COMMIT")
    except Exception as e:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise StoreError(f"{store.path}: pruning failed: {e}") from e
    log.info("pruned the node store %s: %s", store.path, counts)
    return counts


def prune_by_config(store: NodeStore, config: Config, *, now_ns: int | None = None) -> dict:
    """:func:`prune_node_store` with the cut at ``aggregate.node_retention_days`` ago."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    days_ns = int(config.aggregate.node_retention_days * 86400 * NS_PER_S)
    return prune_node_store(store, now_ns - days_ns)


# -- job headers from EpilogSlurmctld ----------------------------------------------------------


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = (env.get(name) or "").strip()
    try:
        return int(value)
    except ValueError:
        return None


def _exit_parts(env: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(exit code, signal) from SLURM_JOB_EXIT_CODE2 (``E:S``) or the raw wait status."""
    code2 = (env.get("SLURM_JOB_EXIT_CODE2") or "").strip()
    exit_s, sep, sig_s = code2.partition(":")
    if sep and exit_s.isdigit() and sig_s.isdigit():
        return int(exit_s), int(sig_s)
    status = _env_int(env, "SLURM_JOB_EXIT_CODE")
    if status is None or status < 0:
        return None, None
    if os.WIFSIGNALED(status):
        return 0, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


def _count_nodes(nodelist: str | None) -> int | None:
    try:
        return len(slices.expand_hostlist(nodelist)) or None if nodelist else None
    except ValueError:
        log.warning("cannot expand the nodelist %r", nodelist)
        return None


def derive_state(exit_code: int | None, signal: int | None, derived_ec: int | None) -> str:
    """What the header can honestly say of the job's end.

    EpilogSlurmctld is not given the job state, only the batch script's wait status and the
    highest step exit code, so: ``COMPLETED`` (0, no signal, no failed step), ``FAILED``
    (non-zero exit), ``SIGNALED`` (killed by a signal: cancelled, timed out, out of memory or
    node failure, which slurmctld does not tell apart here; sacct does) or ``UNKNOWN``.
    """
    if exit_code is None:
        return "UNKNOWN"
    if signal:
        return "SIGNALED"
    if exit_code != 0 or (derived_ec or 0) != 0:
        return "FAILED"
    return "COMPLETED"


def header_slice_from_env(env: Mapping[str, str], cluster: str, *,
                          now_ns: int | None = None) -> dict:
    """The job header slice from EpilogSlurmctld's environment.

    Uses SLURM_JOB_ID, SLURM_JOB_NAME, SLURM_JOB_NODELIST, SLURM_JOB_ACCOUNT, SLURM_JOB_USER,
    SLURM_JOB_UID, SLURM_JOB_PARTITION, SLURM_JOB_EXIT_CODE (wait status) or
    SLURM_JOB_EXIT_CODE2 (``exit:signal``), SLURM_JOB_DERIVED_EC, SLURM_CLUSTER_NAME (wins over
    ``cluster``), SLURM_ARRAY_JOB_ID/SLURM_ARRAY_TASK_ID, and SLURM_JOB_START_TIME /
    SLURM_JOB_END_TIME (epoch seconds) where this Slurm sets them; otherwise the end is now.

    Raises:
        LedgerError: no usable SLURM_JOB_ID or cluster name.
    """
    env = slices.replace_lone_surrogates(dict(env))  # a job name of non-UTF-8 bytes
    now_ns = time.time_ns() if now_ns is None else now_ns
    start_s = _env_int(env, "SLURM_JOB_START_TIME")
    end_s = _env_int(env, "SLURM_JOB_END_TIME")
    exit_code, signal = _exit_parts(env)
    derived = (env.get("SLURM_JOB_DERIVED_EC") or "").partition(":")[0]
    derived_ec = int(derived) if derived.strip().isdigit() else None
    nodelist = (env.get("SLURM_JOB_NODELIST") or "").strip() or None
    job = {
        "job_id": (env.get("SLURM_JOB_ID") or "").strip(),
        "name": env.get("SLURM_JOB_NAME"), "user": env.get("SLURM_JOB_USER"),
        "uid": _env_int(env, "SLURM_JOB_UID"), "account": env.get("SLURM_JOB_ACCOUNT"),
        "partition": env.get("SLURM_JOB_PARTITION"), "nodelist": nodelist,
        "num_nodes": _count_nodes(nodelist),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "start_ns": start_s * NS_PER_S if start_s else None,
        "end_ns": end_s * NS_PER_S if end_s else now_ns,
        "exit_code": exit_code, "signal": signal, "derived_exit_code": derived_ec,
        "state": derive_state(exit_code, signal, derived_ec),
    }
    data = {"schema": slices.SCHEMA, "kind": "header",
            "cluster": (env.get("SLURM_CLUSTER_NAME") or "").strip() or cluster,
            "created_ns": now_ns, "producer": {"llem": __version__,
                                               "host": socket.gethostname()},
            "job": job}
    return _checked(data)


def write_header(config: Config, env: Mapping[str, str] | None = None) -> Path:
    """EpilogSlurmctld's entry point: build the header slice and deliver it (bounded)."""
    env = os.environ if env is None else env
    return deliver(config, header_slice_from_env(env, config.cluster))
