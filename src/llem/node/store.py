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
from pathlib import Path
from typing import Callable, Iterable, Sequence

from llem.errors import StoreError
from llem.fsutil import ensure_private_dir
from llem.model import Event, Interval, JobRecord
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
        """
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


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_v1, _v2)
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
    "job_id", "array_job_id", "array_task_id", "cluster", "node", "uid", "user", "gid",
    "account", "partition", "nodelist", "num_nodes", "cpus", "gpus", "tag", "name", "cgroup",
    "start_ns", "end_ns", "state", "coverage", "flags",
)


def _job_from_row(row: Sequence) -> JobRecord:
    values = dict(zip(("run_id",) + JOB_COLUMNS, row))
    values["gpus"] = tuple(json.loads(values["gpus"] or "[]"))
    values["flags"] = tuple(json.loads(values["flags"] or "[]"))
    return JobRecord(**values)


INT64_MAX = 2**63 - 1


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

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.db = open_database(self.path, DATABASE, readonly=readonly)
        self._known_devices: set[str] = set()

    # -- writing ---------------------------------------------------------------------------

    def register_devices(self, devices: Iterable[Device], ts_ns: int) -> None:
        rows = [
            (d.key, d.component, d.name, d.sensor, d.source, d.method, d.max_range_uj,
             json.dumps(dict(d.attrs), sort_keys=True, default=str), ts_ns)
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
                (interval.sampler_id, interval.start_ns, interval.end_ns,
                 interval.mono_start_ns, interval.mono_end_ns),
            )
            interval_id = cur.lastrowid
            self.db.executemany(
                "INSERT INTO energy (interval_id, device_key, energy_uj, kind, status, raw_uj) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(interval_id, r.device_key, r.energy_uj, r.kind, r.status, _int64(r.raw_uj))
                 for r in interval.rows],
            )
            if interval.shares:
                self.db.executemany(
                    "INSERT INTO job_energy (interval_id, run_id, device_key, energy_uj, method,"
                    " share) VALUES (?, ?, ?, ?, ?, ?)",
                    [(interval_id, j.run_id, j.device_key, j.energy_uj, j.method, j.share)
                     for j in interval.shares],
                )
            if interval.remainder:
                self.db.executemany(
                    "INSERT INTO remainder (interval_id, device_key, energy_uj) VALUES (?, ?, ?)",
                    [(interval_id, key, uj) for key, uj in interval.remainder],
                )
            self._insert_events(interval.events)
            result.append(interval_id)

        self._write(txn)
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
        except sqlite3.DatabaseError as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: write failed: {e}") from e

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
            out.append(self.db.execute(
                "SELECT run_id FROM jobs WHERE job_id = ? AND start_ns = ?",
                (job.job_id, job.start_ns),
            ).fetchone()[0])

        self._write(txn)
        return out[0]

    def jobs(self, where: str = "1", params: Sequence = ()) -> list[JobRecord]:
        rows = self.query(
            f"SELECT run_id, {', '.join(JOB_COLUMNS)} FROM jobs WHERE {where} ORDER BY run_id",
            params,
        )
        return [_job_from_row(r) for r in rows]

    def running_jobs(self) -> list[JobRecord]:
        return self.jobs("state = 'running'")

    def latest_run(self, job_id: str) -> JobRecord | None:
        found = self.jobs("job_id = ?", (job_id,))
        return max(found, key=lambda j: j.start_ns) if found else None

    def update_job(self, run_id: int, **fields: object) -> None:
        """Set columns of a job run (``gpus``/``flags`` given as sequences)."""
        for key in fields:
            if key not in JOB_COLUMNS and key != "exported_ns":
                raise ValueError(f"unknown job column {key}")
        values = [json.dumps(list(v)) if k in ("gpus", "flags") else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._write(lambda: self.db.execute(
            f"UPDATE jobs SET {sets} WHERE run_id = ?", (*values, run_id)))

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

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> "NodeStore":
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
    store.add_events([Event(time.time_ns(), "store_quarantined", f"corrupt store moved to {moved}")])
    return store, moved
