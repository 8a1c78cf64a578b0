"""The cluster ledger on PostgreSQL, for large sites (``ledger: postgresql://...``).

:class:`PgLedger` has the methods of :class:`llem.cluster.ledger.Ledger` that the
aggregator, ``llem-acct``, ``llem report`` and ``llem metrics`` call, with the same results:
the same rows from the same slices (``canonical_dump`` compares them), the same answers to
the query modules' SQL (:mod:`llem.cluster.dialect` holds the few differences).

Merging a batch is one transaction:

1. the batch is reduced in Python to what a one-by-one merge would keep (the newest export
   of each job node, the newest row of each node hour, the last description of each device);
2. rows are loaded with binary ``COPY`` into temporary staging tables, then moved with
   ``INSERT ... SELECT ... ON CONFLICT`` on the natural keys (a newer export of a job node
   deletes the older one first, and its energy, totals, windows and power series);
3. before the job nodes go in, the runs of the jobs they change are computed from the rows
   already there and the new ones (:func:`llem.cluster.ledger.group_runs`, the same code as
   on SQLite), so that each job node is inserted with its run's start; the jobs' ``job_runs``
   rows are then replaced;
4. the energy, totals, windows, power series and steps of the job nodes just inserted are copied
   straight into their tables (their job node ids are new, so nothing can conflict), and a
   row is added to ``merges``.

The month partitions that the batch's hours need are created first (``CREATE TABLE ... PARTITION
OF``, idempotent). ``psycopg`` (``pip install 'llem[postgresql]'``) is imported only here, and
only when such a ledger is configured.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llem.cluster import pg_schema, rollups
from llem.cluster.dialect import POSTGRESQL, pg_params
from llem.cluster.ledger import (
    _INSERT_JOB_NODE,
    _RUN_COLUMNS,
    ACCOUNTING_CANDIDATES,
    CANONICAL_QUERIES,
    DEFER_CHECK,
    SAVE_CHECK,
    LedgerCommon,
    MergeStats,
    Prepared,
    QuarantineEntry,
    group_runs,
    summarize_run,
    upsert_slurm_job,
)
from llem.errors import LedgerError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'llem[postgresql]'"
LOCK_CLASS = 0x6C6C656D  # 'llem'
AGGREGATE_LOCK = 1
"""Advisory lock (``LOCK_CLASS``, this) held by an aggregator for its whole pass."""
MIGRATE_LOCK = 2
CLIENT_CHECK_MS = 1000
"""How often a backend checks, during a statement, that its client is still there."""
CONNECT_TIMEOUT_S = 10
ANALYZE_FIRST = 2000
"""Slices merged by a session before its first ``ANALYZE`` of the job tables."""
_JOB_NODE_COLUMNS = tuple(
    c.strip().strip('"')
    for c in _INSERT_JOB_NODE[_INSERT_JOB_NODE.index("(") + 1 : _INSERT_JOB_NODE.index(")")].split(
        ","
    )
)
"""The columns of a prepared job node row: those of the SQLite ledger's insert, so that a
column added there (and to both schemas) needs nothing here."""
_ENERGY_COLUMNS = (
    "job_node_id",
    "device_key",
    "hour_s",
    "method",
    "component",
    "source",
    "sensor",
    "energy_uj",
)
_TOTAL_COLUMNS = (
    "job_node_id",
    "device_key",
    "measured_uj",
    "attributed_uj",
    "remainder_uj",
    "gap_intervals",
    "idle_unallocated_uj",
    "unallocated_uj",
)
_WINDOW_COLUMNS = (
    "job_node_id",
    "name",
    "step_id",
    "start_ns",
    "end_ns",
    "status",
    "energy_uj",
    "energy",
    "work",
    "unit",
)
_POWER_COLUMNS = ("job_node_id", "step_s", "devices", "points")
_STEP_COLUMNS = ("job_node_id", "step", "start_ns", "end_ns", "cpu_ns", "energy_uj", "energy")
_STAGES = {
    "stage_job_nodes": "job_nodes",
    "stage_headers": "job_headers",
    "stage_node_hours": "node_hours",
    "stage_devices": "devices",
}
"""Staging tables: the job nodes' columns of a prepared row and their run's start; every
column of the others, in order (SQLite's inserts of those rows name no columns either)."""
_JOB_NODE_TABLES = (
    "job_energy",
    "job_node_totals",
    "windows",
    "job_power",
    "job_steps",
    "job_node_hours",
    "job_node_gpus",
)
"""The tables whose rows name a job node (deleted with it: no foreign keys, pg_schema)."""
_PG_TYPES = {"bigint": "int8", "text": "text", "double precision": "float8", "integer": "int4"}
REGROUP_CHUNK = 5000


def is_postgres(spec: str | os.PathLike) -> bool:
    """Whether a ``ledger:`` setting names a PostgreSQL ledger (URL or libpq service)."""
    text = str(spec).strip()
    return text.startswith(("postgresql://", "postgres://", "service="))


def check_spec(spec: str) -> None:
    """Refuse a ledger setting that carries a password: llem's config is world-readable."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return
    try:
        params = conninfo_to_dict(spec)
    except Exception as e:  # psycopg.ProgrammingError: not a connection string
        raise LedgerError(f"ledger: not a PostgreSQL connection string: {e}") from None
    if params.get("password"):
        raise LedgerError(
            "ledger: the PostgreSQL connection string holds a password; llem's configuration "
            "is readable by every user. Use ~/.pgpass, PGPASSFILE, peer, GSSAPI or "
            "certificate authentication instead (docs/ledger.md, PostgreSQL)"
        )


def caller_spec(spec: str, uid: int | None, accounts: Sequence[str] = (), admin=False) -> str:
    """``spec`` with the gateway's caller set for the whole session (libpq ``options``:
    ``-c llem.uid=...``): for a request read on several connections at once (``llem report``
    in the gateway), each opened again from the ledger's connection string. The one-
    connection queries set the caller per transaction instead (:meth:`PgLedger.as_caller`)."""
    from urllib.parse import quote

    values = (
        ("llem.uid", "" if uid is None else str(int(uid))),
        ("llem.accounts", pg_schema.accounts_literal(accounts)),
        ("llem.admin", "on" if admin else "off"),
    )
    options = " ".join(
        f"-c {name}=" + value.replace("\\", "\\\\").replace(" ", "\\ ") for name, value in values
    )
    if spec.startswith(("postgresql://", "postgres://")):
        return spec + ("&" if "?" in spec else "?") + "options=" + quote(options, safe="")
    return spec + " options='" + options.replace("\\", "\\\\").replace("'", "\\'") + "'"


def redact(spec: str) -> str:
    """The connection string as it may be printed (no password, in case one slipped in)."""
    import re

    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", spec))


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise LedgerError(
            f"the ledger is on PostgreSQL but the psycopg driver is not installed: {INSTALL_HINT}"
        ) from None
    return psycopg


def local_zone() -> str:
    """The local time zone's name, for the session's ``TimeZone`` (``llem-acct``'s days and
    months are local, as on SQLite)."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz:
        marker = "zoneinfo/"
        return tz[tz.index(marker) + len(marker) :] if marker in tz else tz
    try:
        link = os.readlink("/etc/localtime")
    except OSError:
        return "UTC"
    marker = "zoneinfo/"
    return link[link.index(marker) + len(marker) :] if marker in link else "UTC"


class PgLedger(LedgerCommon):
    """The cluster ledger on PostgreSQL.

    Args:
        spec: a libpq URL (``postgresql://host/db``) or ``service=NAME``; never a password.
        readonly: for readers: never creates or migrates (the schema must be there).
        migrate: for writers: bring the schema to :data:`pg_schema.SCHEMA_VERSION` (False:
            refuse a ledger that needs it, as ``llem ledger check`` does).

    Raises:
        LedgerError: no driver, cannot connect, not initialised (readers), or a schema newer
            than this llem.
    """

    dialect = POSTGRESQL

    def __init__(self, spec: str, *, readonly: bool = False, migrate: bool = True, **_: Any):
        self.path = spec  # what the report's side connections open again
        self.spec = spec
        self.readonly = readonly
        check_spec(spec)
        psycopg = _psycopg()
        self._errors = psycopg.Error
        from psycopg.conninfo import conninfo_to_dict

        options = {"autocommit": True, "application_name": "llem"}
        if "connect_timeout" not in conninfo_to_dict(spec):
            options["connect_timeout"] = CONNECT_TIMEOUT_S  # libpq's default is to wait forever
        try:
            self.db = psycopg.connect(spec, **options)
        except psycopg.Error as e:
            raise LedgerError(f"{redact(spec)}: cannot connect to the ledger: {e}") from None
        _register_loaders(self.db)
        self._session_setup()
        if not readonly:
            self._act_as_writer()
        self._partitions: set[str] = set()
        self._stages_made = False
        self._copy_types: dict[str, list[str]] = {}
        self._table_columns: dict[str, tuple[str, ...]] = {}
        self._merged, self._analyze_at = 0, ANALYZE_FIRST
        self._query_cache: dict[str, str] = {}
        version = self.schema_version()
        if version > pg_schema.SCHEMA_VERSION:
            self.close()
            raise LedgerError(
                f"{redact(spec)}: ledger schema {version} is newer than this llem knows "
                f"({pg_schema.SCHEMA_VERSION}); upgrade llem"
            )
        if version < pg_schema.SCHEMA_VERSION:
            if readonly or not migrate:
                self.close()
                if version == 0:
                    raise LedgerError(
                        f"{redact(spec)}: no ledger in this database yet; run 'llem ledger "
                        "init' (or 'llem aggregate --once') as the ledger's owner"
                    )
                raise LedgerError(
                    f"{redact(spec)}: the ledger needs migrating: run 'llem ledger migrate'"
                )
            self.migrate()

    # -- connection ------------------------------------------------------------------------

    def _session_setup(self) -> None:
        try:
            self.db.execute("SELECT set_config('TimeZone', %s, false)", (local_zone(),))
        except self._errors as e:
            log.warning("cannot use the local time zone in the ledger session (%s); UTC", e)
            self.db.execute("SET TimeZone = 'UTC'")
        # No JIT compilation: llem's statements run once each, and on a large ledger their
        # cost estimates pass jit_inline_above_cost, so PostgreSQL spent 0.1-0.7 s compiling
        # each of the report's queries that then ran in 0.4 s (docs/performance.md).
        #
        # A client killed mid-statement (an aggregator's SIGKILL, a login node's crash) leaves
        # its backend running the statement to the end, with the session's advisory lock held,
        # so the next aggregator finds the ledger "busy". PostgreSQL 14+ checks the socket
        # during a statement when asked (Linux: POLLRDHUP) and ends such a session within a
        # second.
        sets = "SET jit = off"
        if self.db.info.server_version >= 140000:
            sets += f"; SET client_connection_check_interval = {CLIENT_CHECK_MS}"
        self.db.execute(sets)

    @contextmanager
    def _txn(self):
        if self.readonly:
            raise LedgerError(f"{redact(self.spec)}: opened read-only")
        try:
            with self.db.transaction(), self.db.cursor() as cur:
                yield cur
        except self._errors as e:
            self._forget()
            raise LedgerError(f"{redact(self.spec)}: ledger write failed: {e}") from e
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        """What a rolled-back transaction may have undone: partitions and staging tables it
        created."""
        self._partitions.clear()
        self._stages_made = False

    def schema_version(self) -> int:
        row = self.db.execute(
            "SELECT to_regclass('meta') IS NOT NULL, to_regclass('job_runs') IS NOT NULL"
        ).fetchone()
        if not row[0]:
            if row[1]:
                raise LedgerError(f"{redact(self.spec)}: a job_runs table but no llem schema")
            return 0
        got = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(got[0]) if got else 0

    def migrate(self) -> tuple[int, int]:
        """Apply the missing migrations in one transaction; return (from, to) versions.

        Under a session advisory lock taken before the transaction begins: a transaction that
        began before another writer's migration committed might not see its tables.
        """
        self.db.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))
        try:
            with self._txn() as cur:
                before = self.schema_version()
                for number in range(before, pg_schema.SCHEMA_VERSION):
                    pg_schema.MIGRATIONS[number](cur)
                cur.execute(
                    "INSERT INTO meta VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(pg_schema.SCHEMA_VERSION),),
                )
        finally:
            try:
                self.db.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))
            except self._errors:  # the session is gone, and the lock with it
                pass
        return before, pg_schema.SCHEMA_VERSION

    def grant_roles(self) -> None:
        """Create ``llem_writer`` and ``llem_reader`` and give them the ledger's tables
        (month partitions included)."""
        with self._txn() as cur:
            for statement in pg_schema.role_statements(self.tables(partitions=True)):
                cur.execute(statement)

    @contextmanager
    def as_caller(self, uid: int | None, accounts: Sequence[str] = (), admin: bool = False):
        """One transaction in which row-level security sees the gateway's caller: the
        settings the policies read (:data:`pg_schema.CALLER_SETTINGS`) are set with ``SET
        LOCAL`` semantics (``set_config(..., true)``), so they end with the transaction and
        never outlive the request. Queries made inside run in it."""
        try:
            with self.db.transaction():
                self.db.execute(
                    "SELECT set_config('llem.uid', %s, true), "
                    "set_config('llem.accounts', %s, true), set_config('llem.admin', %s, true)",
                    (
                        "" if uid is None else str(int(uid)),
                        pg_schema.accounts_literal(accounts),
                        "on" if admin else "off",
                    ),
                )
                yield self
        except self._errors as e:
            raise LedgerError(f"{redact(self.spec)}: query failed: {e}") from e

    def row_security(self) -> str | None:
        """Why row-level security would not restrict this login, or None when it does
        (the gateway says so when it starts; docs/ledger.md, "Row-level security")."""
        (superuser, bypass, owner, reader, gateway, enabled) = (
            self.db.execute(
                "SELECT r.rolsuper, r.rolbypassrls, "
                "pg_has_role(current_user, t.tableowner, 'MEMBER'), "
                "pg_has_role(current_user, %s, 'MEMBER'), "
                "pg_has_role(current_user, %s, 'MEMBER'), c.relrowsecurity "
                "FROM pg_roles r, pg_tables t JOIN pg_class c ON c.oid = to_regclass('job_runs') "
                "WHERE r.rolname = current_user AND t.schemaname = current_schema() "
                "AND t.tablename = 'job_runs'",
                (pg_schema.READER_ROLE, pg_schema.GATEWAY_ROLE),
            ).fetchone()
            or (None,) * 6
        )
        if not enabled:
            return "the ledger has no row-level security (run 'llem ledger init --roles')"
        if superuser:
            return "this login is a superuser (superusers bypass row-level security)"
        if bypass:
            return "this login has BYPASSRLS"
        if owner:
            return "this login owns the ledger's tables (owners bypass row-level security)"
        if reader:
            return f"this login is a member of {pg_schema.READER_ROLE}, which sees every row"
        if not gateway:
            return f"this login is not a member of {pg_schema.GATEWAY_ROLE}"
        return None

    def _act_as_writer(self) -> None:
        """A member of ``llem_writer`` writes as it when the role owns the ledger (``llem
        ledger init --roles``), so that the partitions it creates belong to the role
        (aggregators on other hosts, with other logins, may drop them later)."""
        row = self.db.execute(
            "SELECT current_user <> %s AND pg_has_role(%s, 'MEMBER') FROM pg_tables "
            "WHERE schemaname = current_schema() AND tablename = 'job_runs' "
            "AND tableowner = %s",
            (pg_schema.WRITER_ROLE,) * 3,
        ).fetchone()
        if row and row[0]:
            self.db.execute(f"SET ROLE {pg_schema.WRITER_ROLE}")

    def tables(self, *, partitions: bool = False) -> list[str]:
        """The ledger's tables (month partitions only when asked)."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
                "AND (%s OR NOT c.relispartition) ORDER BY 1",
                (partitions,),
            )
        ]

    # -- advisory lock -----------------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the aggregators' advisory lock for this session (released when it ends)."""
        return self.db.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, AGGREGATE_LOCK)
        ).fetchone()[0]

    def unlock(self) -> None:
        self.db.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, AGGREGATE_LOCK))

    def lock_holder(self) -> str:
        """Who holds the aggregators' lock, for an admin: backend pid, host, state, since.

        Empty when nobody does (any more) or when this role may not see it.
        """
        try:
            rows = self.db.execute(
                "SELECT a.pid, a.client_addr::text, a.client_hostname, a.state, "
                "a.backend_start, a.application_name FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s "
                "AND l.objid = %s AND l.objsubid = 2",
                (LOCK_CLASS, AGGREGATE_LOCK),
            ).fetchall()
        except self._errors:
            return ""
        if not rows:
            return ""
        pid, addr, host, state, since, app = rows[0]
        where = host or addr or "a local socket"
        when = f", connected {since:%Y-%m-%d %H:%M:%S %Z}" if since is not None else ""
        return f"backend pid {pid} ({app or 'no name'} from {where}, {state or 'unknown'}{when})"

    # -- merging ---------------------------------------------------------------------------

    def merge_prepared(
        self,
        items: Iterable[Prepared],
        *,
        now_ns: int,
        grace_s: float,
        quarantined: Iterable[QuarantineEntry] = (),
    ) -> MergeStats:
        """Merge slices already turned into rows, and log refused ones, in one transaction."""
        items = list(items)
        quarantined = list(quarantined)
        stats = MergeStats()
        jobs: dict[tuple, Prepared] = {}
        hours: dict[tuple, tuple] = {}
        devices: dict[tuple, tuple] = {}
        headers: dict[tuple, tuple] = {}
        for item in items:
            kind = item[0]
            if kind == "job":
                key = item[5][:4]
                best = jobs.get(key)
                if best is None or (item[2], item[3]) > (best[2], best[3]):
                    jobs[key] = item
                for row in item[4]:
                    devices[row[:3]] = row
            elif kind == "node":
                for row in item[1]:
                    devices[row[:3]] = row
                for row in item[2]:
                    key = row[:4]
                    best = hours.get(key)
                    if best is None or _hour_rank(row) > _hour_rank(best):
                        hours[key] = row
            else:
                headers.setdefault(item[2][:3], item[2])
        with self._txn() as cur:
            self._stages(cur)
            self._need_partitions(cur, jobs.values(), hours.values())
            if devices:
                self._copy(cur, "stage_devices", devices.values())
                cur.execute(
                    "INSERT INTO devices SELECT * FROM stage_devices "
                    "ON CONFLICT (cluster, node, device_key) DO UPDATE SET "
                    "component = excluded.component, name = excluded.name, "
                    "sensor = excluded.sensor, source = excluded.source, method = excluded.method "
                    "WHERE (devices.component, devices.name, devices.sensor, devices.source, "
                    "devices.method) IS DISTINCT FROM (excluded.component, excluded.name, "
                    "excluded.sensor, excluded.source, excluded.method)"
                )
            new_hours = self._merge_hours(cur, hours)
            new_headers = self._merge_headers(cur, headers)
            plan = self._plan_runs(cur, jobs, new_headers, now_ns, grace_s)
            new_nodes = self._merge_job_nodes(cur, jobs, plan)
            touched: set[tuple[str, str]] = set()
            for item in items:
                kind = item[0]
                if kind == "job":
                    key = item[5][:4]
                    changed = key in new_nodes and jobs[key] is item
                elif kind == "node":
                    changed = any(row[:4] in new_hours and hours[row[:4]] is row for row in item[2])
                else:
                    changed = item[2][:3] in new_headers and headers[item[2][:3]] is item[2]
                stats.merged += int(changed)
                stats.unchanged += int(not changed)
                if changed and kind != "node":
                    touched.add(item[1])
            if quarantined:
                cur.executemany(
                    "INSERT INTO quarantine VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [
                        (e.file, e.digest, e.reason, e.owner_uid, e.size, e.ts_ns)
                        for e in quarantined
                    ],
                )
            if new_nodes == plan.inserted and not plan.raced:
                self._write_runs(cur, plan)
            else:  # another writer got in between (none takes the lock): from the table
                log.info("job nodes changed during the merge; runs recomputed from the table")
                self._regroup(cur, touched, now_ns, grace_s)
            stats.jobs_touched = touched
            if items or quarantined:
                cur.execute(
                    "INSERT INTO merges (ts_ns, host, slices, jobs) VALUES (%s, %s, %s, %s)",
                    (time.time_ns(), socket.gethostname(), len(items), len(touched)),
                )
        self._analyze_as_it_grows(len(items))
        return stats

    def _analyze_as_it_grows(self, merged: int) -> None:
        """``ANALYZE`` the job tables after each doubling of what this session merged.

        Autovacuum analyzes a table a minute or more after it grew; meanwhile the planner
        takes a fresh ledger for an empty one and scans every run of the cluster to replace
        a batch's runs (the cost of a pass grew with the square of its size). A few hundred
        milliseconds, a handful of times in a long pass.
        """
        self._merged += merged
        if self._merged < self._analyze_at:
            return
        self._analyze_at = 2 * self._merged
        try:
            self.db.execute("ANALYZE job_runs, job_nodes, job_headers")
        except self._errors as e:  # statistics are an optimisation: never fail a pass
            log.info("ANALYZE of the job tables: %s", e)

    def _stages(self, cur) -> None:
        if self._stages_made:
            return
        for stage, table in _STAGES.items():
            columns = self._stage_columns(table)
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                f"SELECT {_cols(columns)} FROM {table} WITH NO DATA"
            )
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_moved (id BIGINT, run_start_ns BIGINT) "
            "ON COMMIT DELETE ROWS"
        )
        self._stages_made = True

    def _stage_columns(self, table: str) -> tuple[str, ...]:
        if table == "job_nodes":
            return (*_JOB_NODE_COLUMNS, "run_start_ns")
        if table not in self._table_columns:
            self._table_columns[table] = tuple(self.columns(table))
        return self._table_columns[table]

    def _copy(self, cur, table: str, rows: Iterable[Sequence], columns: Sequence[str] = ()) -> int:
        """Binary ``COPY`` of ``rows`` into ``table`` (all its columns, or ``columns``)."""
        key = f"{table}:{','.join(columns)}"
        types = self._copy_types.get(key)
        if types is None:
            found = dict(
                cur.execute(
                    "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
                    "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 "
                    "AND NOT a.attisdropped ORDER BY a.attnum",
                    (table,),
                ).fetchall()
            )
            names = list(columns) or list(found)
            types = [_PG_TYPES[found[n]] for n in names]
            self._copy_types[key] = types
        target = f"{table} ({_cols(columns)})" if columns else table
        n = 0
        with cur.copy(f"COPY {target} FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
                n += 1
        return n

    def _need_partitions(self, cur, jobs: Iterable[Prepared], hours: Iterable[tuple]) -> None:
        needed = {
            "job_energy": {row[1] for item in jobs for row in item[6]},
            "node_hours": {row[2] for row in hours},
        }
        months: dict[str, tuple[str, int]] = {}
        for table, hour_set in needed.items():
            seen_days: set[int] = set()
            for hour_s in hour_set:
                day = hour_s // 86400
                if day in seen_days:
                    continue
                seen_days.add(day)
                name = pg_schema.partition_name(table, hour_s)
                if name not in self._partitions:
                    months[name] = (table, hour_s)
        if not months:
            return
        existing = {
            r[0]
            for r in cur.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent IN ('job_energy'::regclass, 'node_hours'::regclass)"
            )
        }
        for name, (table, hour_s) in sorted(months.items()):
            if name not in existing:
                cur.execute(pg_schema.partition_ddl(table, hour_s))
        self._partitions |= existing | set(months)

    def _plan_runs(self, cur, jobs, new_headers, now_ns: int, grace_s: float) -> _RunPlan:
        """The runs of the jobs this batch changes, computed before its job nodes go in.

        Which staged job nodes will be inserted (new, or newer than the one there) is read
        from the table; their runs are then known, so that they are inserted with their
        ``run_start_ns`` instead of updated after (an ``UPDATE`` rewrites the whole row).
        """
        plan = _RunPlan()
        candidates = {key[:2] for key in jobs} | {h[:2] for h in new_headers}
        if not candidates:
            return plan
        wanted = (*self._NODE_COLS, "created_ns", "digest")
        existing = self._rows_of(cur, "job_nodes", wanted, candidates)
        nodes: dict[tuple[str, str], dict[tuple, dict]] = {
            job: {(n["node"], n["start_ns"]): n for n in rows} for job, rows in existing.items()
        }
        for key, item in jobs.items():
            old = nodes[key[:2]].get(key[2:])
            if old is None or (old["created_ns"], old["digest"]) < (item[2], item[3]):
                plan.inserted.add(key)
                if old is not None:
                    plan.replaced.append(old["id"])
                new = dict(zip(_JOB_NODE_COLUMNS, item[5]))
                new.update(id=None, run_start_ns=None, key=key)
                nodes[key[:2]][key[2:]] = new
        plan.touched = {k[:2] for k in plan.inserted} | {h[:2] for h in new_headers}
        headers = self._rows_of(cur, "job_headers", self._HEADER_COLS, plan.touched)
        accounted = self._rows_of(cur, "slurm_jobs", self._SLURM_COLS, plan.touched)
        for job in sorted(plan.touched):
            for run in group_runs(list(nodes[job].values()), headers[job], accounted[job]):
                row = summarize_run(run, now_ns, grace_s)
                plan.runs.append((*job, *[row[c] for c in _RUN_COLUMNS]))
                start = row["run_start_ns"]
                for n in run["nodes"]:
                    if n["id"] is None:
                        plan.run_starts[n["key"]] = start
                    elif n["run_start_ns"] != start:
                        plan.moved.append((n["id"], start))
        return plan

    def _rows_of(self, cur, table, columns, jobs: set[tuple[str, str]]) -> dict:
        """``table``'s rows of these (cluster, job_id)s as dicts of ``columns``."""
        out: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
        by_cluster: dict[str, list[str]] = {}
        for cluster, job_id in jobs:
            by_cluster.setdefault(cluster, []).append(job_id)
        for cluster, ids in sorted(by_cluster.items()):
            for job_id, rows in self._rows_by_job(cur, table, columns, cluster, ids).items():
                out[(cluster, job_id)] = rows
        return out

    def _write_runs(self, cur, plan: _RunPlan) -> None:
        by_cluster: dict[str, list[str]] = {}
        for cluster, job_id in plan.touched:
            by_cluster.setdefault(cluster, []).append(job_id)
        for cluster, ids in sorted(by_cluster.items()):
            cur.execute(
                "DELETE FROM job_runs WHERE cluster = %s AND job_id = ANY(%s)", (cluster, ids)
            )
        self._copy(cur, "job_runs", plan.runs, ("cluster", "job_id", *_RUN_COLUMNS))
        if plan.moved:
            self._copy(cur, "stage_moved", plan.moved)
            cur.execute(
                "UPDATE job_nodes j SET run_start_ns = m.run_start_ns FROM stage_moved m "
                "WHERE j.id = m.id"
            )

    def _merge_job_nodes(self, cur, jobs: dict[tuple, Prepared], plan: _RunPlan) -> set[tuple]:
        """Insert the newest export of each job node (with its run's start, when known);
        return the keys inserted (new or newer).

        An older export of the same job node goes first, with its energy, totals, windows
        and series: those the plan found, by id (a join of the staged rows with every job
        node cost a scan of the table per batch, which grew with the ledger during a
        pass). Should the insert still meet a row the plan did not see (a writer without
        the lock got in between), the older ones are found by that join and the insert is
        done again; the runs are then recomputed from the table (``plan.raced``).
        """
        if not jobs:
            return set()
        self._copy(
            cur,
            "stage_job_nodes",
            ((*item[5], plan.run_starts.get(key)) for key, item in jobs.items()),
        )
        replaced = []
        if plan.replaced:
            cur.execute("DELETE FROM job_nodes WHERE id = ANY(%s) RETURNING id", (plan.replaced,))
            replaced = [r[0] for r in cur.fetchall()]
        ids = self._insert_job_nodes(cur)
        if set(ids) != plan.inserted:
            plan.raced = True
            cur.execute(
                "DELETE FROM job_nodes j USING stage_job_nodes s WHERE j.cluster = s.cluster "
                "AND j.job_id = s.job_id AND j.node = s.node AND j.start_ns = s.start_ns "
                "AND (j.created_ns, j.digest) < (s.created_ns, s.digest) RETURNING j.id"
            )
            replaced += [r[0] for r in cur.fetchall()]
            ids.update(self._insert_job_nodes(cur))
        if replaced:
            for table in _JOB_NODE_TABLES:
                cur.execute(f"DELETE FROM {table} WHERE job_node_id = ANY(%s)", (replaced,))
        if not ids:
            return set()
        energy, totals, windows, power, steps = [], [], [], [], []
        for key, node_id in ids.items():
            item = jobs[key]
            rows = item[6]
            if len({(r[0], r[1], r[2]) for r in rows}) == len(rows):
                energy += [(node_id, *r) for r in rows]
            else:  # as SQLite: the first row's description, energies of one key summed
                summed: dict[tuple, list] = {}
                for device, hour_s, method, component, source, sensor, uj in rows:
                    row = summed.get((device, hour_s, method))
                    if row is None:
                        summed[(device, hour_s, method)] = [
                            node_id,
                            device,
                            hour_s,
                            method,
                            component,
                            source,
                            sensor,
                            uj,
                        ]
                    else:
                        row[7] += uj
                energy += summed.values()
            totals += [(node_id, *t) for t in item[7]]
            last = {(w[0], w[1], w[2]): w for w in item[8]}  # INSERT OR REPLACE: the last wins
            windows += [(node_id, *w) for w in last.values()]
            if item[9]:
                power.append((node_id, *item[9]))
            steps += [(node_id, *row) for row in item[10]]
        self._copy(cur, "job_energy", energy, _ENERGY_COLUMNS)
        self._rollup_job_nodes(cur, ids, jobs)
        self._copy(cur, "job_node_totals", totals, _TOTAL_COLUMNS)
        if windows:
            self._copy(cur, "windows", windows, _WINDOW_COLUMNS)
        if power:
            self._copy(cur, "job_power", power, _POWER_COLUMNS)
        if steps:
            self._copy(cur, "job_steps", steps, _STEP_COLUMNS)
        return set(ids)

    def _rollup_job_nodes(self, cur, ids: dict[tuple, int], jobs: dict[tuple, Prepared]) -> None:
        """The report's roll-up rows of the job nodes just inserted (``ids``: key -> job node
        id), made from their energy rows by ``prepare`` (:func:`llem.cluster.rollups.rows_of`),
        by ``COPY``; a replaced job node's are deleted with it (:data:`_JOB_NODE_TABLES`)."""
        hours, gpus = [], []
        for key, node_id in ids.items():
            item = jobs[key]
            hours += [(node_id, *r) for r in item[11]]
            gpus += [(node_id, *r) for r in item[12]]
        if hours:
            # the months of job_energy's partitions these hours went into (days: fewer names)
            self._ensure_partitions(cur, "job_node_hours", {r[1] - r[1] % 86400 for r in hours})
            self._copy(cur, "job_node_hours", hours, rollups.HOURS_COLUMNS)
        if gpus:
            self._copy(cur, "job_node_gpus", gpus, rollups.GPUS_COLUMNS)

    def rebuild_rollups(self) -> None:
        """Refill the report's roll-ups from every energy row (``make_ledger``, repairs)."""
        with self._txn() as cur:
            pairs = []
            for table, name, _ in self.partitions():
                if table == "job_energy":
                    hour_s = pg_schema.parse_partition(name)[1]
                    self._ensure_partitions(cur, "job_node_hours", {hour_s})
                    pairs.append((name, pg_schema.partition_name("job_node_hours", hour_s)))
            rollups.rebuild_pg(cur, pairs)

    @staticmethod
    def _insert_job_nodes(cur) -> dict[tuple, int]:
        """The staged job nodes whose key is not in the table yet, inserted: {key: id}."""
        columns = _cols((*_JOB_NODE_COLUMNS, "run_start_ns"))
        cur.execute(
            f"INSERT INTO job_nodes ({columns}) SELECT {columns} FROM stage_job_nodes "
            "ON CONFLICT (cluster, job_id, node, start_ns) DO NOTHING "
            "RETURNING id, cluster, job_id, node, start_ns"
        )
        return {tuple(r[1:]): r[0] for r in cur.fetchall()}

    def _merge_hours(self, cur, hours: dict[tuple, tuple]) -> set[tuple]:
        if not hours:
            return set()
        self._copy(cur, "stage_node_hours", hours.values())
        columns = self._stage_columns("node_hours")
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns[4:])
        cur.execute(
            f"INSERT INTO node_hours ({_cols(columns)}) SELECT * FROM stage_node_hours "
            f"ON CONFLICT (cluster, node, hour_s, device_key) DO UPDATE SET {updates} "
            "WHERE (excluded.as_of_ns, excluded.measured_uj, excluded.attributed_uj, "
            "excluded.remainder_uj) > (node_hours.as_of_ns, node_hours.measured_uj, "
            "node_hours.attributed_uj, node_hours.remainder_uj) "
            "RETURNING cluster, node, hour_s, device_key"
        )
        return {tuple(r) for r in cur.fetchall()}

    def _merge_headers(self, cur, headers: dict[tuple, tuple]) -> set[tuple]:
        if not headers:
            return set()
        self._copy(cur, "stage_headers", headers.values())
        cur.execute(
            f"INSERT INTO job_headers ({_cols(self._stage_columns('job_headers'))}) "
            "SELECT * FROM stage_headers "
            "ON CONFLICT DO NOTHING RETURNING cluster, job_id, end_ns"
        )
        return {tuple(r) for r in cur.fetchall()}

    def _regroup(self, cur, jobs: Iterable[tuple[str, str]], now_ns: int, grace_s: float) -> None:
        """Recompute these jobs' runs from their node runs and headers (as on SQLite)."""
        by_cluster: dict[str, list[str]] = {}
        for cluster, job_id in jobs:
            by_cluster.setdefault(cluster, []).append(job_id)
        for cluster, ids in sorted(by_cluster.items()):
            ids.sort()
            for i in range(0, len(ids), REGROUP_CHUNK):
                self._regroup_chunk(cur, cluster, ids[i : i + REGROUP_CHUNK], now_ns, grace_s)

    def _regroup_chunk(self, cur, cluster: str, part: list[str], now_ns, grace_s) -> None:
        nodes = self._rows_by_job(cur, "job_nodes", self._NODE_COLS, cluster, part)
        headers = self._rows_by_job(cur, "job_headers", self._HEADER_COLS, cluster, part)
        accounted = self._rows_by_job(cur, "slurm_jobs", self._SLURM_COLS, cluster, part)
        cur.execute("DELETE FROM job_runs WHERE cluster = %s AND job_id = ANY(%s)", (cluster, part))
        rows, moved = [], []
        for job_id in part:
            for run in group_runs(nodes[job_id], headers[job_id], accounted[job_id]):
                row = summarize_run(run, now_ns, grace_s)
                rows.append((cluster, job_id, *[row[c] for c in _RUN_COLUMNS]))
                start = row["run_start_ns"]
                moved += [(n["id"], start) for n in run["nodes"] if n["run_start_ns"] != start]
        self._copy(cur, "job_runs", rows, ("cluster", "job_id", *_RUN_COLUMNS))
        if moved:
            self._copy(cur, "stage_moved", moved)
            cur.execute(
                "UPDATE job_nodes j SET run_start_ns = m.run_start_ns FROM stage_moved m "
                "WHERE j.id = m.id"
            )

    @staticmethod
    def _rows_by_job(cur, table, columns, cluster, job_ids) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {job_id: [] for job_id in job_ids}
        for r in cur.execute(
            f"SELECT job_id, {_cols(columns)} FROM {table} WHERE cluster = %s AND job_id = ANY(%s)",
            (cluster, job_ids),
        ):
            out[r[0]].append(dict(zip(columns, r[1:])))
        return out

    def mark_incomplete(self, now_ns: int, grace_s: float) -> int:
        cut_ns = now_ns - int(grace_s * 1e9)
        with self._txn() as cur:
            cur.execute(
                "UPDATE job_runs SET status = 'incomplete' WHERE status = 'pending' "
                "AND run_end_ns < %s",
                (cut_ns,),
            )
            return cur.rowcount

    # -- Slurm's accounting (the SQLite ledger's statements and rules) -------------------------

    def accounting_candidates(
        self, *, ended_before_ns: int, now_ns: int, max_tries: int, limit: int
    ) -> list[tuple[str, str]]:
        """As :meth:`Ledger.accounting_candidates`."""
        return self.query(ACCOUNTING_CANDIDATES, (ended_before_ns, now_ns, max_tries, limit))

    def store_accounting(
        self,
        cluster: str,
        records: Iterable[Sequence],
        asked: Iterable[str],
        *,
        now_ns: int,
        retry_ns: Callable[[int], int],
        grace_s: float,
    ) -> int:
        """As :meth:`Ledger.store_accounting`: Slurm's records stored, the jobs asked about
        regrouped, the tries noted, in one transaction; returns the records new or changed."""
        records = [tuple(r) for r in records]
        asked = sorted(set(asked))
        upsert = pg_params(upsert_slurm_job(self.dialect))
        with self._txn() as cur:
            self._stages(cur)
            changed = 0
            for r in records:
                cur.execute(upsert, (*r, now_ns))
                changed += cur.rowcount
            self._regroup(cur, {(cluster, j) for j in asked}, now_ns, grace_s)
            cur.execute(
                "SELECT DISTINCT job_id FROM job_runs WHERE cluster = %s AND job_id = ANY(%s) "
                "AND accounted = 0",
                (cluster, asked),
            )
            waiting = sorted(r[0] for r in cur.fetchall())
            done = sorted(set(asked) - set(waiting))
            if done:  # every run has its record: a later run (a requeue) is asked at once
                cur.execute(
                    "DELETE FROM slurm_checks WHERE cluster = %s AND job_id = ANY(%s)",
                    (cluster, done),
                )
            if waiting:
                cur.execute(
                    "SELECT job_id, tries FROM slurm_checks WHERE cluster = %s "
                    "AND job_id = ANY(%s)",
                    (cluster, waiting),
                )
                tries = dict(cur.fetchall())
                rows = []
                for job_id in waiting:
                    n = tries.get(job_id, 0) + 1
                    rows.append((cluster, job_id, n, now_ns + retry_ns(n)))
                cur.executemany(pg_params(SAVE_CHECK), rows)
        return changed

    def defer_accounting(self, cluster: str, job_ids: Iterable[str], next_ns: int) -> None:
        """As :meth:`Ledger.defer_accounting`."""
        rows = [(cluster, j, next_ns) for j in sorted(set(job_ids))]
        with self._txn() as cur:
            cur.executemany(pg_params(DEFER_CHECK), rows)

    # -- copying (llem ledger copy) ------------------------------------------------------------

    def write(self, statements) -> None:
        """Run (statement, rows) pairs in one transaction (``?`` parameters)."""
        with self._txn() as cur:
            for sql, rows in statements:
                cur.executemany(pg_params(sql), list(rows))

    def insert_missing(self, table: str, columns: Sequence[str], rows: Sequence[Sequence]) -> int:
        """``COPY`` the rows into a staging table, then insert those whose key is new."""
        stage = f"copy_{table}"
        with self._txn() as cur:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                f"SELECT {_cols(columns)} FROM {table} WITH NO DATA"
            )
            if table in pg_schema.PARTITIONED:
                at = columns.index("hour_s")
                self._ensure_partitions(cur, table, {r[at] for r in rows})
            self._copy(cur, stage, rows, columns)
            cur.execute(
                f"INSERT INTO {table} ({_cols(columns)}) SELECT {_cols(columns)} FROM {stage} "
                "ON CONFLICT DO NOTHING"
            )
            return cur.rowcount

    def after_copy(self) -> None:
        """Identity columns continue after the ids copied; statistics for the planner."""
        with self._txn() as cur:
            for table in ("job_nodes", "job_runs"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
        self.db.execute("ANALYZE")

    def _ensure_partitions(self, cur, table: str, hours: Iterable[int]) -> None:
        names = {pg_schema.partition_name(table, h): h for h in hours}
        for name, hour_s in sorted(names.items()):
            if name not in self._partitions:
                cur.execute(pg_schema.partition_ddl(table, hour_s))
                self._partitions.add(name)

    # -- retention and partitions -----------------------------------------------------------

    def partitions(self) -> list[tuple[str, str, int]]:
        """(table, partition, estimated rows) of every month partition, oldest first."""
        rows = self.db.execute(
            "SELECT p.relname, c.relname, GREATEST(c.reltuples, 0)::bigint FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname IN ('job_energy', 'node_hours', 'job_node_hours') AND p.relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()) ORDER BY 2"
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def apply_retention(self, months: int, now_s: float | None = None) -> list[str]:
        """Drop the month partitions older than ``months`` whole months; return their names."""
        now_s = int(time.time() if now_s is None else now_s)
        names = pg_schema.expired_partitions((p[1] for p in self.partitions()), now_s, months)
        if names:
            with self._txn() as cur:
                for name in names:
                    cur.execute(f"DROP TABLE IF EXISTS {name}")
            self._partitions -= set(names)
            log.info("retention (%d months): dropped %s", months, ", ".join(names))
        return names

    def retention_cut_s(self, months: int | None, now_s: float | None = None) -> int | None:
        if not months:
            return None
        return pg_schema.retention_cut_s(int(time.time() if now_s is None else now_s), months)

    # -- reading -----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence | dict = (), *, binary: bool = False) -> list[tuple]:
        """Run a query written for both backends (``?`` / ``:name`` parameters).

        ``binary``: the server sends the rows in binary, not as text: the same Python values
        (integers, floats, strings, ``Decimal``), without formatting every number as text
        and parsing it back. For the report's large reads: the 822,579 runs of a month of
        the 10,000,000-job ledger in 1.5-1.8 s of client CPU instead of 2.2-2.7 s
        (``docs/performance.md``)."""
        translated = self._query_cache.get(sql)
        if translated is None:
            translated = self._query_cache[sql] = pg_params(sql)
        try:
            # always with parameters, so that psycopg turns the doubled % back into one
            cur = self.db.execute(translated, params if params else (), binary=binary)
            return cur.fetchall() if cur.description is not None else []
        except self._errors as e:
            raise LedgerError(f"{redact(self.spec)}: query failed: {e}") from e

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        try:
            with self.db.cursor() as cur:
                cur.executemany(pg_params(sql), list(rows))
        except self._errors as e:
            raise LedgerError(f"{redact(self.spec)}: query failed: {e}") from e

    def has_column(self, table: str, column: str) -> bool:
        return bool(
            self.db.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
                "AND NOT attisdropped",
                (table, column),
            ).fetchone()
        )

    def has_index(self, name: str) -> bool:
        return bool(self.db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0])

    def sees_every_run(self) -> bool:
        """Whether this connection sees every run of ``job_runs``: row-level security does not
        restrict it (the owner, a superuser), or its policy shows it all (``llem_reader``, or
        the gateway's login for an admin caller). False for the gateway's login for a user or
        coordinator, and with no caller set."""
        (sees,) = self.db.execute(
            "SELECT NOT row_security_active('job_runs') "
            "OR COALESCE(current_setting('llem.admin', true), '') = 'on' "
            "OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s "
            "AND pg_has_role(current_user, oid, 'MEMBER'))",
            (pg_schema.READER_ROLE,),
        ).fetchone()
        return bool(sees)

    def columns(self, table: str) -> list[str]:
        """The table's columns in order, without those only this backend has."""
        extra = pg_schema.EXTRA_COLUMNS.get(table, ())
        return [
            r[0]
            for r in self.db.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (table,),
            )
            if r[0] not in extra
        ]

    def job_runs(self, job_id: str | None = None, cluster: str | None = None) -> list[dict]:
        where, params = [], []
        if job_id is not None:
            where.append("job_id = %s")
            params.append(job_id)
        if cluster is not None:
            where.append("cluster = %s")
            params.append(cluster)
        names = self.columns("job_runs")
        cur = self.db.execute(
            f"SELECT {_cols(names)} FROM job_runs WHERE {' AND '.join(where) or 'TRUE'} "
            "ORDER BY run_start_ns DESC, cluster, job_id",
            params,
        )
        out = [dict(zip(names, r)) for r in cur.fetchall()]
        for run in out:
            run["missing_nodes"] = json.loads(run["missing_nodes"])
        return out

    def canonical_queries(self) -> dict[str, str]:
        out = dict(CANONICAL_QUERIES)
        for table, sql in CANONICAL_QUERIES.items():
            if sql == f"SELECT * FROM {table}":
                out[table] = f"SELECT {_cols(self.columns(table))} FROM {table}"
        return out

    def canonical_dump(self) -> str:
        """The ledger's facts as sorted JSON lines, comparable with an SQLite ledger's."""
        lines = []
        for table, sql in self.canonical_queries().items():
            rows = sorted(json.dumps(list(r)) for r in self.query(sql))
            lines.append(f"# {table} {len(rows)}")
            lines.extend(rows)
        return "\n".join(lines) + "\n"

    def integrity_check(self) -> str:
        self.db.execute("SELECT 1").fetchall()
        return "ok"

    def size_bytes(self) -> int:
        """Bytes of the ledger's tables, partitions, indexes and TOAST on disk."""
        return self.db.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        ).fetchone()[0]

    def server_version(self) -> str:
        return self.db.execute("SHOW server_version").fetchone()[0]

    def last_merge(self) -> dict | None:
        row = self.db.execute(
            "SELECT ts_ns, host, slices, jobs FROM merges ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return dict(zip(("ts_ns", "host", "slices", "jobs"), row)) if row else None

    def close(self) -> None:
        try:
            self.db.close()
        except Exception:  # already broken: nothing to release
            pass


@dataclass
class _RunPlan:
    """What :meth:`PgLedger._plan_runs` decided for one batch."""

    inserted: set = field(default_factory=set)
    """Keys of the staged job nodes that go in."""
    touched: set = field(default_factory=set)
    """(cluster, job_id) whose runs change."""
    runs: list = field(default_factory=list)
    """Their new ``job_runs`` rows."""
    run_starts: dict = field(default_factory=dict)
    """Run start of each job node going in, by key."""
    moved: list = field(default_factory=list)
    """(id, run start) of job nodes already there whose run changed."""
    replaced: list = field(default_factory=list)
    """Ids of the job nodes there that a newer export in the batch replaces."""
    raced: bool = False
    """The table changed between the plan and the insert: runs come from the table."""


def _hour_rank(row: tuple) -> tuple:
    """What decides between two rows of one node hour (as the SQLite upsert's WHERE)."""
    return (row[12], row[6], row[7], row[8])


def _cols(columns: Iterable[str]) -> str:
    return ", ".join(f'"{c}"' if c == "user" else c for c in columns)


def _register_loaders(conn) -> None:
    """``numeric`` (what ``SUM`` of ``BIGINT`` gives) as int when whole, else float: the
    Python types SQLite gives for the same sums."""
    from psycopg.adapt import Loader

    class NumericLoader(Loader):
        def load(self, data):
            text = bytes(data).decode()
            if "." in text or "e" in text or "N" in text:
                return float(text)
            return int(text)

    conn.adapters.register_loader("numeric", NumericLoader)
