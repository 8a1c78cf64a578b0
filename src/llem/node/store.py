"""The node store: node-local SQLite in ``state_dir``, written by root processes only.

WAL mode, one transaction per sampler interval (all devices of the interval in one batch), so
a writer killed with SIGKILL loses at most the interval it was writing and leaves a database
that opens and passes ``PRAGMA integrity_check``. ``synchronous=NORMAL`` is safe against
process death in WAL mode; a power cut may lose the last committed intervals, not the file.

The store uses the standard library's ``sqlite3`` rather than sqlite-utils: the sampler starts
on every job and sqlite-utils costs ~90 ms of imports (measured) against ~6 ms.

Schema changes are migrations, applied in order inside one transaction and tracked with
``PRAGMA user_version``. A newer schema than this llem knows is refused, never rewritten
(:mod:`llem.sqlite` opens and migrates both the node store and the ledger).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from llem.errors import StoreError
from llem.fsutil import ensure_private_dir
from llem.model import LABELLED, Event, Interval, JobRecord, Remainder
from llem.sensors.base import Device
from llem.sqlite import Database, Messages, open_database, run_script

log = logging.getLogger(__name__)


def _v1(db: sqlite3.Connection) -> None:
    run_script(
        db,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE devices (
            key TEXT PRIMARY KEY,
            component TEXT NOT NULL,
            name TEXT NOT NULL,
            sensor TEXT NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('measured', 'estimated')),
            method TEXT NOT NULL,
            max_range_uj INTEGER,
            attrs TEXT NOT NULL DEFAULT '{}',
            first_seen_ns INTEGER NOT NULL
        );
        CREATE TABLE intervals (
            id INTEGER PRIMARY KEY,
            sampler_id TEXT NOT NULL,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER NOT NULL,
            mono_start_ns INTEGER NOT NULL,
            mono_end_ns INTEGER NOT NULL,
            CHECK (end_ns >= start_ns AND mono_end_ns >= mono_start_ns)
        );
        CREATE INDEX intervals_by_time ON intervals (start_ns);
        CREATE TABLE energy (
            interval_id INTEGER NOT NULL REFERENCES intervals (id),
            device_key TEXT NOT NULL REFERENCES devices (key),
            energy_uj INTEGER NOT NULL CHECK (energy_uj >= 0),
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            raw_uj INTEGER,
            PRIMARY KEY (interval_id, device_key)
        ) WITHOUT ROWID;
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts_ns INTEGER NOT NULL,
            kind TEXT NOT NULL,
            device_key TEXT,
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX events_by_time ON events (ts_ns);
        """,
    )


def _v2(db: sqlite3.Connection) -> None:
    """Jobs on the node, their attributed energy, the unattributed remainder, windows."""
    run_script(
        db,
        """
        CREATE TABLE jobs (
            run_id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL,
            array_job_id TEXT,
            array_task_id TEXT,
            cluster TEXT NOT NULL,
            node TEXT NOT NULL,
            uid INTEGER,
            user TEXT,
            gid INTEGER,
            account TEXT,
            partition TEXT,
            nodelist TEXT,
            num_nodes INTEGER,
            cpus INTEGER,
            gpus TEXT NOT NULL DEFAULT '[]',
            tag TEXT,
            name TEXT,
            cgroup TEXT,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER,
            state TEXT NOT NULL DEFAULT 'running'
                CHECK (state IN ('running', 'ended', 'sealed', 'exported')),
            coverage REAL,
            flags TEXT NOT NULL DEFAULT '[]',
            exported_ns INTEGER,
            UNIQUE (job_id, start_ns)
        );
        CREATE INDEX jobs_by_state ON jobs (state);
        CREATE TABLE job_energy (
            interval_id INTEGER NOT NULL REFERENCES intervals (id),
            run_id INTEGER NOT NULL REFERENCES jobs (run_id),
            device_key TEXT NOT NULL REFERENCES devices (key),
            energy_uj INTEGER NOT NULL CHECK (energy_uj >= 0),
            method TEXT NOT NULL,
            share REAL NOT NULL CHECK (share >= 0 AND share <= 1),
            PRIMARY KEY (run_id, interval_id, device_key)
        ) WITHOUT ROWID;
        CREATE TABLE remainder (
            interval_id INTEGER NOT NULL REFERENCES intervals (id),
            device_key TEXT NOT NULL REFERENCES devices (key),
            energy_uj INTEGER NOT NULL CHECK (energy_uj >= 0),
            PRIMARY KEY (interval_id, device_key)
        ) WITHOUT ROWID;
        CREATE TABLE windows (
            id INTEGER PRIMARY KEY,
            run_id INTEGER REFERENCES jobs (run_id),
            job_id TEXT,
            step_id TEXT,
            name TEXT NOT NULL,
            uid INTEGER,
            pid INTEGER,
            start_ns INTEGER NOT NULL,
            end_ns INTEGER,
            start_mono_ns INTEGER NOT NULL,
            end_mono_ns INTEGER,
            counters_start TEXT NOT NULL DEFAULT '{}',
            counters_end TEXT,
            energy TEXT,
            status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'abandoned'))
        );
        CREATE INDEX windows_by_run ON windows (run_id);
        """,
    )


def _v3(db: sqlite3.Connection) -> None:
    """Attribution policy (issue 13): a job's static and dynamic shares of one device in one
    interval are two rows (the method joins the key); the policy and idle powers in force
    are kept with the job; the idle power learned per device survives restarts."""
    run_script(
        db,
        """
        CREATE TABLE job_energy_v3 (
            interval_id INTEGER NOT NULL REFERENCES intervals (id),
            run_id INTEGER NOT NULL REFERENCES jobs (run_id),
            device_key TEXT NOT NULL REFERENCES devices (key),
            energy_uj INTEGER NOT NULL CHECK (energy_uj >= 0),
            method TEXT NOT NULL,
            share REAL NOT NULL CHECK (share >= 0 AND share <= 1),
            PRIMARY KEY (run_id, interval_id, device_key, method)
        ) WITHOUT ROWID;
        INSERT INTO job_energy_v3 SELECT interval_id, run_id, device_key, energy_uj, method,
            share FROM job_energy;
        DROP TABLE job_energy;
        ALTER TABLE job_energy_v3 RENAME TO job_energy;
        ALTER TABLE jobs ADD COLUMN attribution TEXT;
        CREATE TABLE idle_power (
            device_key TEXT PRIMARY KEY,
            power_mw INTEGER NOT NULL CHECK (power_mw >= 0),
            samples INTEGER NOT NULL CHECK (samples >= 0),
            updated_ns INTEGER NOT NULL
        ) WITHOUT ROWID;
        """,
    )


def _v4_window_work(db: sqlite3.Connection) -> None:
    """The work a window did (issue 18): a count and its unit (tokens, samples, ...), sent
    by the window's owner when it closes the window."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(windows)")}
    if "work" not in columns:
        db.execute("ALTER TABLE windows ADD COLUMN work REAL")
    if "unit" not in columns:
        db.execute("ALTER TABLE windows ADD COLUMN unit TEXT")


def _v5_remainder_labels(db: sqlite3.Connection) -> None:
    """Why energy is in the remainder (issue 13): the parts of a device's remainder in one
    interval that carry a label of their own (``idle_unallocated``, ``unallocated``; see
    llem.model), as columns of its row; the rest of ``energy_uj`` is unattributed. Rows
    written before the labels existed have 0 in both: all of their remainder is unattributed.
    Adding columns with a constant default rewrites nothing: the migration costs the same on a
    store of a month of intervals as on an empty one (the Prolog may be the one to run it)."""
    have = {r[1] for r in db.execute("PRAGMA table_info(remainder)")}
    for label in LABELLED:
        if f"{label}_uj" not in have:
            db.execute(
                f"ALTER TABLE remainder ADD COLUMN {label}_uj INTEGER NOT NULL DEFAULT 0 "
                f"CHECK ({label}_uj >= 0)"
            )


def _v6_step_use(db: sqlite3.Connection) -> None:
    """Per-step use (issue 19): each job step's CPU time in each interval, from the step's own
    cgroup, and the job's in the same interval (at least the steps' sum), by which the job's
    energy of the interval is split between its steps at export. A new table: costs nothing
    on a store of a month of intervals."""
    db.execute(
        """
        CREATE TABLE IF NOT EXISTS step_use (
            run_id INTEGER NOT NULL REFERENCES jobs (run_id),
            interval_id INTEGER NOT NULL REFERENCES intervals (id),
            step TEXT NOT NULL,
            cpu_ns INTEGER NOT NULL CHECK (cpu_ns >= 0),
            job_cpu_ns INTEGER NOT NULL CHECK (job_cpu_ns >= cpu_ns),
            PRIMARY KEY (run_id, interval_id, step)
        ) WITHOUT ROWID
        """
    )


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (
    _v1,
    _v2,
    _v3,
    _v4_window_work,
    _v5_remainder_labels,
    _v6_step_use,
)
SCHEMA_VERSION = len(MIGRATIONS)

DATABASE = Database(
    migrations=MIGRATIONS,
    readable_from=SCHEMA_VERSION,
    file_mode=0o640,
    prepare_dir=ensure_private_dir,
    busy_timeout_s=5.0,
    pragmas=("PRAGMA busy_timeout = 5000", "PRAGMA foreign_keys = ON"),
    write_pragmas=("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL"),
    error=StoreError,
    messages=Messages(
        not_a_database="{path}: not a usable SQLite database: {error}",
        cannot_open="{path}: cannot open the node store: {error}",
        newer="{path}: schema version {version} is newer than this llem knows ({known}); "
        "upgrade llem on this node",
        needs_migrating="{path}: schema version {version} needs migrating first",
        migration_failed="{path}: migrating the node store failed: {error}",
    ),
)
"""How the node store is opened: private directory, mode 0640, WAL (see the module doc)."""


JOB_COLUMNS = (
    "job_id",
    "array_job_id",
    "array_task_id",
    "cluster",
    "node",
    "uid",
    "user",
    "gid",
    "account",
    "partition",
    "nodelist",
    "num_nodes",
    "cpus",
    "gpus",
    "tag",
    "name",
    "cgroup",
    "start_ns",
    "end_ns",
    "state",
    "coverage",
    "flags",
    "attribution",
)


def _job_from_row(row: Sequence) -> JobRecord:
    values = dict(zip(("run_id",) + JOB_COLUMNS, row))
    values["gpus"] = tuple(json.loads(values["gpus"] or "[]"))
    values["flags"] = tuple(json.loads(values["flags"] or "[]"))
    return JobRecord(**values)


_PART_COLUMNS = ", ".join(f"{label}_uj" for label in LABELLED)


def _remainder_rows(remainder) -> list[tuple]:
    """One row per device: (device_key, energy_uj, then each labelled part), from the
    interval's remainder entries (several labels per device)."""
    rows: dict[str, list[int]] = {}
    for entry in remainder:
        key, uj, label = Remainder(*entry)
        row = rows.setdefault(key, [0] * (1 + len(LABELLED)))
        row[0] += uj
        if label in LABELLED:
            row[1 + LABELLED.index(label)] += uj
    return [(key, *row) for key, row in rows.items()]


NO_DATA_KINDS = ("first", "reset", "gap")
"""Energy row kinds that carry no measurement (a baseline, a counter reset, a gap)."""


def _prune_steps(runs: list[int], cut_ns: int) -> list[tuple[str, str, list[int]]]:
    """The deletes of :meth:`NodeStore.prune`, children before parents."""
    old = "SELECT id FROM intervals WHERE end_ns < ?"
    marks = ",".join("?" * len(runs))
    return [
        ("windows", f"DELETE FROM windows WHERE run_id IN ({marks})", runs),
        ("step_use", f"DELETE FROM step_use WHERE run_id IN ({marks})", runs),
        ("job_energy", f"DELETE FROM job_energy WHERE run_id IN ({marks})", runs),
        ("jobs", f"DELETE FROM jobs WHERE run_id IN ({marks})", runs),
        ("job_energy_old", f"DELETE FROM job_energy WHERE interval_id IN ({old})", [cut_ns]),
        ("remainder", f"DELETE FROM remainder WHERE interval_id IN ({old})", [cut_ns]),
        ("step_use_old", f"DELETE FROM step_use WHERE interval_id IN ({old})", [cut_ns]),
        ("energy", f"DELETE FROM energy WHERE interval_id IN ({old})", [cut_ns]),
        ("intervals", "DELETE FROM intervals WHERE end_ns < ?", [cut_ns]),
        ("events", "DELETE FROM events WHERE ts_ns < ?", [cut_ns]),
    ]


INT64_MAX = 2**63 - 1


def _step_order(step: dict) -> tuple:
    """sacct's order of steps: ``batch`` and ``extern`` first, numbered steps by number."""
    name = step["step"]
    if name.isdigit():
        return (1, int(name), "")
    return (0 if name in ("batch", "extern", "interactive") else 2, 0, name)


def _int64(value: int | None) -> int | None:
    """SQLite integers are signed 64-bit; a raw counter beyond that is garbage, kept as NULL."""
    return value if value is not None and value <= INT64_MAX else None


class NodeStore:
    """The node-local SQLite store.

    Args:
        path: the database file; created (with its directory) when absent.
        readonly: open for reading only (``llem doctor``, reports); never creates or migrates.

    Raises:
        StoreError: the file cannot be opened, is not a database, is corrupt, or has a newer
            schema than this llem.
    """

    after_commit: Callable[[int], object] | None = None
    """Called with the interval's id once :meth:`write` has committed it. Tests set it on an
    instance to crash or stop the writer exactly after the Nth committed interval."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.db = open_database(self.path, DATABASE, readonly=readonly)
        self._known_devices: set[str] = set()

    # -- writing ---------------------------------------------------------------------------

    def register_devices(self, devices: Iterable[Device], ts_ns: int) -> None:
        rows = [
            (
                d.key,
                d.component,
                d.name,
                d.sensor,
                d.source,
                d.method,
                d.max_range_uj,
                json.dumps(dict(d.attrs), sort_keys=True, default=str),
                ts_ns,
            )
            for d in devices
        ]
        self._write(
            lambda: self.db.executemany(
                "INSERT OR IGNORE INTO devices (key, component, name, sensor, source, method, "
                "max_range_uj, attrs, first_seen_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        )
        self._known_devices.update(r[0] for r in rows)

    def write(self, interval: Interval) -> int:
        """Write one interval, its energy rows and events in one transaction; return its id."""
        result: list[int] = []

        def txn() -> None:
            cur = self.db.execute(
                "INSERT INTO intervals (sampler_id, start_ns, end_ns, mono_start_ns, mono_end_ns)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    interval.sampler_id,
                    interval.start_ns,
                    interval.end_ns,
                    interval.mono_start_ns,
                    interval.mono_end_ns,
                ),
            )
            interval_id = cur.lastrowid
            self.db.executemany(
                "INSERT INTO energy (interval_id, device_key, energy_uj, kind, status, raw_uj) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (interval_id, r.device_key, r.energy_uj, r.kind, r.status, _int64(r.raw_uj))
                    for r in interval.rows
                ],
            )
            if interval.shares:
                self.db.executemany(
                    "INSERT INTO job_energy (interval_id, run_id, device_key, energy_uj, method,"
                    " share) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (interval_id, j.run_id, j.device_key, j.energy_uj, j.method, j.share)
                        for j in interval.shares
                    ],
                )
            if interval.remainder:
                self.db.executemany(
                    f"INSERT INTO remainder (interval_id, device_key, energy_uj, {_PART_COLUMNS}) "
                    f"VALUES (?, ?, ?, {', '.join('?' * len(LABELLED))})",
                    [(interval_id, *row) for row in _remainder_rows(interval.remainder)],
                )
            if interval.steps:
                self.db.executemany(
                    "INSERT INTO step_use (run_id, interval_id, step, cpu_ns, job_cpu_ns) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (u.run_id, interval_id, u.step, u.cpu_ns, u.job_cpu_ns)
                        for u in interval.steps
                    ],
                )
            self._insert_events(interval.events)
            result.append(interval_id)

        self._write(txn)
        if self.after_commit is not None:
            self.after_commit(result[0])
        return result[0]

    def add_events(self, events: Iterable[Event]) -> None:
        events = list(events)
        if events:
            self._write(lambda: self._insert_events(events))

    def _insert_events(self, events: Iterable[Event]) -> None:
        self.db.executemany(
            "INSERT INTO events (ts_ns, kind, device_key, detail) VALUES (?, ?, ?, ?)",
            [(e.ts_ns, e.kind, e.device_key, e.detail) for e in events],
        )

    def _write(self, body: Callable[[], object]) -> None:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            body()
            self.db.execute("COMMIT")
        except BaseException as e:
            # Whatever broke the body, the transaction must not stay open: the next write
            # would fail on BEGIN.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.DatabaseError):
                raise StoreError(f"{self.path}: write failed: {e}") from e
            raise

    # -- jobs --------------------------------------------------------------------------------

    def add_job(self, job: JobRecord) -> int:
        """Record a job run (idempotent on job_id and start_ns); return its run_id."""
        values = [getattr(job, c) for c in JOB_COLUMNS]
        values[JOB_COLUMNS.index("gpus")] = json.dumps(list(job.gpus))
        values[JOB_COLUMNS.index("flags")] = json.dumps(list(job.flags))
        out: list[int] = []

        def txn() -> None:
            self.db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(JOB_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(JOB_COLUMNS))})",
                values,
            )
            out.append(
                self.db.execute(
                    "SELECT run_id FROM jobs WHERE job_id = ? AND start_ns = ?",
                    (job.job_id, job.start_ns),
                ).fetchone()[0]
            )

        self._write(txn)
        return out[0]

    def _select_jobs(self, where: str, params: Sequence = ()) -> list[JobRecord]:
        rows = self.query(
            f"SELECT run_id, {', '.join(JOB_COLUMNS)} FROM jobs WHERE {where} ORDER BY run_id",
            params,
        )
        return [_job_from_row(r) for r in rows]

    def jobs(self) -> list[JobRecord]:
        """Every job run in the store, oldest first."""
        return self._select_jobs("1")

    def run(self, run_id: int) -> JobRecord | None:
        """One job run, or None when the store has no such run."""
        found = self._select_jobs("run_id = ?", (run_id,))
        return found[0] if found else None

    def running_jobs(self) -> list[JobRecord]:
        return self._select_jobs("state = 'running'")

    def runs_of(self, job_id: str, state: str) -> list[JobRecord]:
        """The runs of one Slurm job in one state (a requeued job has several runs)."""
        return self._select_jobs("job_id = ? AND state = ?", (job_id, state))

    def runs_ended_by(self, up_to_ns: int) -> list[JobRecord]:
        """Ended (not yet sealed) runs whose end lies at or before ``up_to_ns``."""
        return self._select_jobs("state = 'ended' AND end_ns <= ?", (up_to_ns,))

    def runs_active_since(self, start_ns: int) -> list[JobRecord]:
        """Runs that use the node in an interval starting at ``start_ns``: running ones, and
        ended ones whose end falls in or after it."""
        return self._select_jobs(
            "state = 'running' OR (state = 'ended' AND end_ns >= ?)", (start_ns,)
        )

    def unsealed_job_count(self) -> int:
        """Runs still running or ended but not yet sealed: the sampler has work while > 0."""
        return self.query("SELECT COUNT(*) FROM jobs WHERE state IN ('running', 'ended')")[0][0]

    def update_job(self, run_id: int, **fields: object) -> None:
        """Set columns of a job run (``gpus``/``flags`` given as sequences)."""
        for key in fields:
            if key not in JOB_COLUMNS and key != "exported_ns":
                raise ValueError(f"unknown job column {key}")
        values = [json.dumps(list(v)) if k in ("gpus", "flags") else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._write(
            lambda: self.db.execute(f"UPDATE jobs SET {sets} WHERE run_id = ?", (*values, run_id))
        )

    def idle_powers(self) -> dict[str, tuple[int, int]]:
        """Learned idle power per device: (milliwatts, idle samples behind it)."""
        return {
            k: (mw, n)
            for k, mw, n in self.query("SELECT device_key, power_mw, samples FROM idle_power")
        }

    def save_idle_power(self, device_key: str, power_mw: int, samples: int, ts_ns: int) -> None:
        """Keep a learned idle power (see :mod:`llem.node.idle`)."""
        self._write(
            lambda: self.db.execute(
                "INSERT INTO idle_power (device_key, power_mw, samples, updated_ns) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (device_key) DO UPDATE SET "
                "power_mw = excluded.power_mw, samples = excluded.samples, "
                "updated_ns = excluded.updated_ns",
                (device_key, power_mw, samples, ts_ns),
            )
        )

    # -- reading ---------------------------------------------------------------------------

    def integrity_check(self) -> str:
        """``ok``, or what SQLite found wrong."""
        try:
            rows = self.db.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as e:
            return str(e)
        return "; ".join(r[0] for r in rows)

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: query failed: {e}") from e

    def energy_by_device(self) -> dict[str, int]:
        """Total measured energy per device over the whole store (microjoules)."""
        return dict(self.query("SELECT device_key, SUM(energy_uj) FROM energy GROUP BY device_key"))

    def devices(self) -> dict[str, dict[str, str]]:
        """Every device the store knows: key -> component, name, sensor, source, method."""
        rows = self.query("SELECT key, component, name, sensor, source, method FROM devices")
        return {
            key: {
                "component": component,
                "name": name,
                "sensor": sensor,
                "source": source,
                "method": method,
            }
            for key, component, name, sensor, source, method in rows
        }

    # -- intervals ---------------------------------------------------------------------------

    def first_interval_start_ns(self) -> int | None:
        return self.query("SELECT MIN(start_ns) FROM intervals")[0][0]

    def last_interval_end_ns(self) -> int | None:
        return self.query("SELECT MAX(end_ns) FROM intervals")[0][0]

    def last_interval_id(self, sampler_id: str) -> int | None:
        """The id of the latest interval written by one sampler run."""
        return self.query("SELECT MAX(id) FROM intervals WHERE sampler_id = ?", (sampler_id,))[0][0]

    def interval_spans(self, start_ns: int, end_ns: int) -> list[tuple[int, int]]:
        """(start_ns, end_ns) of the intervals overlapping a span, in time order."""
        return self.query(
            "SELECT start_ns, end_ns FROM intervals WHERE end_ns > ? AND start_ns < ? "
            "ORDER BY start_ns",
            (start_ns, end_ns),
        )

    def covered_spans(self, start_ns: int, end_ns: int, run_id: int) -> list[tuple[int, int]]:
        """(start_ns, end_ns) of the intervals overlapping a span in which every device the run
        draws energy from had data (see :meth:`covered_ns_between`), in time order."""
        lost, params = self._lost_in_interval(run_id)
        return self.query(
            "SELECT i.start_ns, i.end_ns FROM intervals i WHERE i.end_ns > ? AND i.start_ns < ? "
            f"AND NOT {lost} ORDER BY i.start_ns",
            (start_ns, end_ns, *params),
        )

    def covered_ns_between(self, after_id: int, up_to_id: int, run_id: int) -> int:
        """Wall time of the intervals with ``after_id < id <= up_to_id`` in which every device
        the run draws energy from had data: an interval where one of them had a gap, a reset
        or a read error is not covered (a window's coverage never claims lost data). For a
        run that drew no energy, an interval is covered when some device had data."""
        lost, params = self._lost_in_interval(run_id)
        return self.query(
            "SELECT COALESCE(SUM(i.end_ns - i.start_ns), 0) FROM intervals i "
            f"WHERE i.id > ? AND i.id <= ? AND NOT {lost}",
            (after_id, up_to_id, *params),
        )[0][0]

    def _lost_in_interval(self, run_id: int) -> tuple[str, tuple]:
        """SQL (the interval as ``i``) and its parameters: a device the run draws energy from
        had no data in the interval; for a run that drew none (an idle job), no device had
        data. One index look-up per interval."""
        devices = tuple(
            d
            for (d,) in self.query(
                "SELECT DISTINCT device_key FROM job_energy WHERE run_id = ?", (run_id,)
            )
        )
        if not devices:
            return (
                "NOT EXISTS (SELECT 1 FROM energy e WHERE e.interval_id = i.id AND "
                f"e.kind NOT IN {NO_DATA_KINDS} AND e.status = 'ok')",
                (),
            )
        return (
            "EXISTS (SELECT 1 FROM energy e WHERE e.interval_id = i.id AND "
            f"(e.kind IN {NO_DATA_KINDS} OR e.status != 'ok') AND "
            f"e.device_key IN ({', '.join('?' * len(devices))}))",
            devices,
        )

    def event_kinds_between(self, start_ns: int, end_ns: int) -> set[str]:
        return {
            k
            for (k,) in self.query(
                "SELECT DISTINCT kind FROM events WHERE ts_ns >= ? AND ts_ns <= ?",
                (start_ns, end_ns),
            )
        }

    # -- a run's energy ------------------------------------------------------------------------

    def run_energy_rows(self, run_id: int) -> list[tuple[str, str, int, int, int]]:
        """(device_key, method, interval start_ns, interval end_ns, energy_uj) of a run."""
        return self.query(
            "SELECT je.device_key, je.method, i.start_ns, i.end_ns, je.energy_uj "
            "FROM job_energy je JOIN intervals i ON i.id = je.interval_id WHERE je.run_id = ?",
            (run_id,),
        )

    def run_energy_between(self, run_id: int, after_id: int, up_to_id: int) -> dict[str, int]:
        """A run's energy per device over the intervals with ``after_id < id <= up_to_id``."""
        return dict(
            self.query(
                "SELECT device_key, SUM(energy_uj) FROM job_energy WHERE run_id = ? AND "
                "interval_id > ? AND interval_id <= ? GROUP BY device_key",
                (run_id, after_id, up_to_id),
            )
        )

    def run_energy_by_device(self, run_id: int) -> dict[str, int]:
        """A run's energy so far per device."""
        return {
            k: int(v)
            for k, v in self.query(
                "SELECT device_key, SUM(energy_uj) FROM job_energy WHERE run_id = ? "
                "GROUP BY device_key",
                (run_id,),
            )
        }

    def running_job_labels(self) -> list[tuple[int, str, str, str, str, str]]:
        """(run_id, job_id, user, account, partition, gpus JSON) of the running runs, '' for
        what is unknown (the metrics' labels)."""
        return self.query(
            "SELECT run_id, job_id, COALESCE(user, ''), COALESCE(account, ''), "
            "COALESCE(partition, ''), gpus FROM jobs WHERE state = 'running' ORDER BY run_id"
        )

    def meter_window_ms(self) -> int | None:
        """The longest averaging window of the node's power meters (hwmon), if any."""
        windows = []
        for (attrs,) in self.query("SELECT attrs FROM devices WHERE sensor = 'hwmon'"):
            try:
                value = json.loads(attrs).get("averaging_window_ms")
            except (ValueError, AttributeError):
                continue
            if isinstance(value, int) and value > 0:
                windows.append(value)
        return max(windows, default=None)

    def run_split_devices(self, run_id: int) -> list[str]:
        """The devices that gave the run energy as a share of a package (``package_split``:
        an MI250X die, an MI300X partition)."""
        return [
            key
            for key, attrs in self.query(
                "SELECT d.key, d.attrs FROM devices d WHERE d.key IN "
                "(SELECT DISTINCT device_key FROM job_energy WHERE run_id = ?)",
                (run_id,),
            )
            if '"package_split"' in attrs
        ]

    def run_last_data_ns(self, run_id: int) -> int | None:
        """The end of the last interval that gave the run energy."""
        return self.query(
            "SELECT MAX(i.end_ns) FROM job_energy je JOIN intervals i "
            "ON i.id = je.interval_id WHERE je.run_id = ?",
            (run_id,),
        )[0][0]

    def run_sources(self, run_id: int) -> set[str]:
        """``measured`` / ``estimated``: the sources of the devices that gave the run energy."""
        return {
            s
            for (s,) in self.query(
                "SELECT DISTINCT d.source FROM job_energy j JOIN devices d ON d.key = j.device_key "
                "WHERE j.run_id = ?",
                (run_id,),
            )
        }

    # -- the node's energy ---------------------------------------------------------------------

    def device_totals(self, start_ns: int, end_ns: int) -> dict[str, dict[str, int]]:
        """Per device: measured, attributed and remainder energy, the parts of the remainder
        with a label of their own (``<label>_uj`` for each of llem.model.LABELLED), and
        intervals without data, over the intervals that overlap a span (counted whole)."""
        where = "WHERE interval_id IN (SELECT id FROM intervals WHERE end_ns > ? AND start_ns < ?)"
        queries = (
            (
                "measured_uj",
                f"SELECT device_key, SUM(energy_uj) FROM energy {where} GROUP BY device_key",
            ),
            (
                "attributed_uj",
                f"SELECT device_key, SUM(energy_uj) FROM job_energy {where} GROUP BY device_key",
            ),
            (
                "remainder_uj",
                f"SELECT device_key, SUM(energy_uj) FROM remainder {where} GROUP BY device_key",
            ),
            (
                "gap_intervals",
                f"SELECT device_key, COUNT(*) FROM energy {where} AND "
                f"(kind IN {NO_DATA_KINDS} OR status != 'ok') GROUP BY device_key",
            ),
        ) + tuple(
            (
                f"{label}_uj",
                f"SELECT device_key, SUM({label}_uj) FROM remainder {where} GROUP BY device_key",
            )
            for label in LABELLED
        )
        zero = dict.fromkeys(
            ("measured_uj", "attributed_uj", "remainder_uj", "gap_intervals")
            + tuple(f"{label}_uj" for label in LABELLED),
            0,
        )
        out: dict[str, dict[str, int]] = {}
        for field_name, sql in queries:
            for device, value in self.query(sql, (start_ns, end_ns)):
                row = out.setdefault(device, dict(zero))
                row[field_name] = int(value or 0)
        return out

    def device_interval_rows(self, from_ns: int, until_ns: int) -> list[tuple]:
        """One row per interval overlapping the span and device: (interval id, start_ns,
        end_ns, device_key, measured energy_uj, kind, status, remainder_uj, attributed_uj,
        then the remainder of each label of llem.model.LABELLED)."""
        labelled = "".join(f", COALESCE(r.{label}_uj, 0)" for label in LABELLED)
        return self.query(
            "SELECT i.id, i.start_ns, i.end_ns, e.device_key, e.energy_uj, e.kind, e.status, "
            "COALESCE(r.energy_uj, 0), "
            "(SELECT COALESCE(SUM(je.energy_uj), 0) FROM job_energy je "
            " WHERE je.interval_id = i.id AND je.device_key = e.device_key)"
            f"{labelled} "
            "FROM intervals i JOIN energy e ON e.interval_id = i.id "
            "LEFT JOIN remainder r ON r.interval_id = i.id AND r.device_key = e.device_key "
            "WHERE i.end_ns > ? AND i.start_ns < ?",
            (from_ns, until_ns),
        )

    # -- windows -------------------------------------------------------------------------------

    def open_window(
        self,
        run_id: int,
        job_id: str,
        step_id: str | None,
        name: str,
        uid: int,
        pid: int,
        start_ns: int,
        start_interval_id: int,
        counters: Mapping[str, int],
    ) -> int:
        """Record an open window; return its id. ``start_mono_ns`` holds the interval id the
        window starts after."""
        out: list[int] = []
        self._write(
            lambda: out.append(
                self.db.execute(
                    "INSERT INTO windows (run_id, job_id, step_id, name, uid, pid, start_ns, "
                    "start_mono_ns, counters_start, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
                    (
                        run_id,
                        job_id,
                        step_id,
                        name,
                        uid,
                        pid,
                        start_ns,
                        start_interval_id,
                        json.dumps(dict(counters)),
                    ),
                ).lastrowid
            )
        )
        return out[0]

    def window(self, window_id: object) -> tuple[int, int, int, str, int] | None:
        """(run_id, uid, start interval id, status, start_ns) of a window, or None."""
        rows = self.query(
            "SELECT run_id, uid, start_mono_ns, status, start_ns FROM windows WHERE id = ?",
            (window_id,),
        )
        return rows[0] if rows else None

    def close_window(
        self,
        window_id: int,
        end_ns: int,
        end_interval_id: int,
        counters: Mapping[str, int],
        energy: Mapping[str, int],
        work: float | None = None,
        unit: str | None = None,
    ) -> None:
        """Close a window; ``work`` and ``unit``: the work it did, when its owner said."""
        self._write(
            lambda: self.db.execute(
                "UPDATE windows SET end_ns = ?, end_mono_ns = ?, counters_end = ?, energy = ?, "
                "work = ?, unit = ?, status = 'closed' WHERE id = ?",
                (
                    end_ns,
                    end_interval_id,
                    json.dumps(dict(counters)),
                    json.dumps(dict(energy), sort_keys=True),
                    work,
                    unit,
                    window_id,
                ),
            )
        )

    def window_count(self, run_id: int) -> int:
        """How many windows a run has (open or not)."""
        return self.query("SELECT COUNT(*) FROM windows WHERE run_id = ?", (run_id,))[0][0]

    def window_counts_of_running(self) -> dict[int, int]:
        """run_id -> number of windows, for the running runs that have any."""
        return dict(
            self.query(
                "SELECT w.run_id, COUNT(*) FROM windows w JOIN jobs j ON j.run_id = w.run_id "
                "WHERE j.state = 'running' GROUP BY w.run_id"
            )
        )

    def run_windows(self, run_id: int) -> list[tuple]:
        """(name, step_id, start_ns, end_ns, status, energy JSON, work, unit, start interval
        id, end interval id) of a run's windows."""
        return self.query(
            "SELECT name, step_id, start_ns, end_ns, status, energy, work, unit, start_mono_ns, "
            "end_mono_ns FROM windows "
            "WHERE run_id = ? ORDER BY start_ns, id",
            (run_id,),
        )

    def run_steps(self, run_id: int) -> list[dict]:
        """A run's steps, each with its span (the intervals it was seen in), CPU time and
        energy per device: in each interval, the job's energy of each device times the
        step's CPU time over the job's (floored), so that the steps never hold more than the
        job. An interval in which the job used no CPU time gives its steps nothing."""
        steps: dict[str, dict] = {}
        for step, cpu_ns, start_ns, end_ns in self.query(
            "SELECT s.step, s.cpu_ns, i.start_ns, i.end_ns FROM step_use s "
            "JOIN intervals i ON i.id = s.interval_id WHERE s.run_id = ?",
            (run_id,),
        ):
            entry = steps.setdefault(
                step, {"step": step, "start_ns": start_ns, "end_ns": end_ns, "cpu_ns": 0}
            )
            entry["start_ns"] = min(entry["start_ns"], start_ns)
            entry["end_ns"] = max(entry["end_ns"], end_ns)
            entry["cpu_ns"] += cpu_ns
        energy: dict[str, dict[str, int]] = {}
        # Summed in SQL (a day of 1 s intervals is 10^5 rows per step and device): each
        # interval's part truncated (floor), the ratio in floating point to keep the product
        # within 64 bits; what that rounding could add beyond the job is taken back below.
        for step, device, uj in self.query(
            "SELECT s.step, e.device_key, SUM(CAST(e.uj * (CAST(s.cpu_ns AS REAL) / "
            "s.job_cpu_ns) AS INTEGER)) FROM step_use s JOIN (SELECT interval_id, device_key, "
            "SUM(energy_uj) AS uj FROM job_energy WHERE run_id = ? "
            "GROUP BY interval_id, device_key) e ON e.interval_id = s.interval_id "
            "WHERE s.run_id = ? AND s.cpu_ns > 0 GROUP BY s.step, e.device_key",
            (run_id, run_id),
        ):
            energy.setdefault(step, {})[device] = max(0, uj)
        job = self.run_energy_by_device(run_id)
        for device, total in job.items():
            holders = sorted((by[device], step) for step, by in energy.items() if device in by)
            excess = sum(uj for uj, _ in holders) - total
            if excess > 0 and holders:  # never more than the job: the largest step gives back
                energy[holders[-1][1]][device] = max(0, holders[-1][0] - excess)
        for step, entry in steps.items():
            entry["energy"] = dict(sorted(energy.get(step, {}).items()))
        return sorted(steps.values(), key=_step_order)

    # -- retention -----------------------------------------------------------------------------

    def prune(self, older_than_ns: int) -> dict[str, int]:
        """Delete exported runs that ended before ``older_than_ns`` and data older than it that
        no unexported run needs, in one transaction; return the rows deleted per table."""
        counts: dict[str, int] = {}

        def txn() -> None:
            runs = [
                r
                for (r,) in self.db.execute(
                    "SELECT run_id FROM jobs WHERE state = 'exported' AND end_ns IS NOT NULL "
                    "AND end_ns < ?",
                    (older_than_ns,),
                )
            ]
            # Keep intervals that an unexported run still needs, whatever their age.
            keep_from = self.db.execute(
                "SELECT MIN(start_ns) FROM jobs WHERE state != 'exported'"
            ).fetchone()[0]
            cut_ns = older_than_ns if keep_from is None else min(older_than_ns, keep_from)
            for table, sql, params in _prune_steps(runs, cut_ns):
                if params:
                    counts[table] = self.db.execute(sql, params).rowcount

        try:
            self._write(txn)
        except StoreError as e:
            raise StoreError(f"{self.path}: pruning failed: {e.__cause__ or e}") from e
        return counts

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> NodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_or_quarantine(path: str | os.PathLike) -> tuple[NodeStore, Path | None]:
    """Open the node store; a corrupt file is moved aside (kept, never deleted) and replaced.

    Returns:
        The store and, when the old file was quarantined, where it now lies.
    """
    path = Path(path)
    try:
        store = NodeStore(path)
        if store.db.execute("PRAGMA quick_check").fetchone()[0] == "ok":
            return store, None
        store.close()
    except StoreError as e:
        if "newer than this llem" in str(e) or not path.exists():
            raise
    except sqlite3.DatabaseError:
        pass
    moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(moved) + suffix))
    log.error("node store %s was corrupt; moved to %s and started anew", path, moved)
    store = NodeStore(path)
    store.add_events(
        [Event(time.time_ns(), "store_quarantined", f"corrupt store moved to {moved}")]
    )
    return store, moved
