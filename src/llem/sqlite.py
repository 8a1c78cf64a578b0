"""Opening and migrating llem's SQLite databases: the node store and the cluster ledger.

Both follow one discipline, implemented here once:

* a writer opens the file with ``O_NOFOLLOW`` (never through a symlink), creating it with the
  database's mode in a directory checked first, and refuses the file, its ``-wal`` or its
  ``-shm`` when another user owns them or may write them (a forged or swapped database); a
  reader opens it with ``mode=ro`` and never creates, migrates or otherwise writes anything;
* schema changes are migrations, numbered by ``PRAGMA user_version``, applied in order inside
  one ``BEGIN IMMEDIATE`` transaction (whole or not at all), the version re-read under the
  write lock since another process may have migrated meanwhile;
* a schema newer than this llem knows is refused, never rewritten.

What differs between the databases (migrations, pragmas, modes, time-outs, the error class
and its messages) is described by a :class:`Database`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Migration = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Messages:
    """The error messages of one database, as ``str.format`` templates.

    Each may use ``{path}``; ``{error}`` is the underlying error's text, ``{version}`` the
    file's schema version and ``{known}`` the newest this llem knows.
    """

    not_a_database: str
    cannot_open: str
    newer: str
    needs_migrating: str
    migration_failed: str
    untrusted: str = "{path}: {problem}; refusing to use it"
    busy: str = "{path}: locked by another process ({error}); try again later"


@dataclass(frozen=True)
class Database:
    """How one kind of llem database is opened and migrated.

    Attributes:
        migrations: migration ``n`` brings the schema from version ``n`` to ``n + 1``.
        readable_from: the oldest schema version a read-only open accepts (the oldest that
            the read code understands); older ones must be migrated by a writer first.
        file_mode: mode of a newly created file.
        prepare_dir: checks (and creates) the file's directory before a writer opens it;
            raises the database's own error when it may not be used.
        busy_timeout_s: how long a statement waits for another connection's lock.
        pragmas: run on every connection, in order.
        write_pragmas: run first on a connection that may write, in order.
        error: the exception class raised for every failure.
        messages: its messages.
    """

    migrations: Sequence[Migration]
    readable_from: int
    file_mode: int
    prepare_dir: Callable[[Path], object]
    busy_timeout_s: float
    pragmas: Sequence[str]
    write_pragmas: Sequence[str]
    error: type[Exception]
    messages: Messages

    @property
    def version(self) -> int:
        """The schema version this llem writes."""
        return len(self.migrations)


def run_script(db: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the caller's transaction.

    ``executescript()`` would COMMIT a migration's transaction half-way: statement by
    statement, a migration applies whole or not at all.
    """
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def open_database(path: Path, spec: Database, *, readonly: bool) -> sqlite3.Connection:
    """Open (and, for a writer, create and migrate) the database at ``path``.

    The connection is in autocommit mode (``isolation_level=None``): callers open their own
    transactions.

    Raises:
        spec.error: cannot create or open the file, not a database, a schema newer than
            :attr:`Database.version`, or (read-only) one older than ``readable_from``.
    """
    db, version = _connect(path, spec, readonly=readonly)
    try:
        _check_version(path, spec, version, readonly=readonly)
        if version < spec.version and not readonly:
            _migrate(db, path, spec)
    except BaseException:
        db.close()
        raise
    return db


def _connect(path: Path, spec: Database, *, readonly: bool) -> tuple[sqlite3.Connection, int]:
    msg = spec.messages
    try:
        if readonly:
            db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=spec.busy_timeout_s
            )
        else:
            spec.prepare_dir(path.parent)
            _check_files(path, spec)
            db = sqlite3.connect(path, isolation_level=None, timeout=spec.busy_timeout_s)
    except sqlite3.DatabaseError as e:
        raise spec.error(msg.not_a_database.format(path=path, error=e)) from e
    except OSError as e:
        raise spec.error(msg.cannot_open.format(path=path, error=e.strerror or e)) from e
    try:
        for pragma in (() if readonly else tuple(spec.write_pragmas)) + tuple(spec.pragmas):
            db.execute(pragma)
        return db, schema_version(db)
    except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "locking protocol" not in str(e):
            db.close()
            raise spec.error(msg.not_a_database.format(path=path, error=e)) from e
        holders = lock_holders(path)  # before closing, which may delete a locked -shm
        db.close()
        raise spec.error(
            msg.busy.format(path=path, error=e)
            + (f" (locks on it held by {holders})" if holders else "")
        ) from e
    except sqlite3.DatabaseError as e:
        db.close()
        raise spec.error(msg.not_a_database.format(path=path, error=e)) from e


def _check_files(path: Path, spec: Database) -> None:
    """Create the database file if absent; refuse it, its ``-wal`` or its ``-shm`` when
    another user owns or may write them (see :func:`llem.fsutil.file_problem`).

    The directory has been checked first (no one else may write it), so the names cannot
    change between these checks and SQLite's own opens.
    """
    from llem.fsutil import file_problem

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, spec.file_mode)
    try:
        problems = [(path, file_problem(os.fstat(fd)))]
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        try:
            problems.append((Path(f"{path}{suffix}"), file_problem(os.lstat(f"{path}{suffix}"))))
        except FileNotFoundError:
            pass
    for name, problem in problems:
        if problem is not None:
            raise spec.error(spec.messages.untrusted.format(path=name, problem=problem))


def lock_holders(path: Path) -> str:
    """Who holds POSIX locks on the database, its ``-wal`` or its ``-shm``, from
    ``/proc/locks``: "pid P (uid U), ..." (empty where none, or not Linux).

    Any user who may read the files can lock them with ``fcntl`` and make writers wait; an
    admin needs the culprit's name, not SQLite's "database is locked".
    """
    wanted = set()
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            st = os.stat(name)
        except OSError:
            continue
        wanted.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    pids = set()
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if (
                    len(fields) >= 6
                    and fields[1] != "->"
                    and fields[5] in wanted
                    and fields[4].isdigit()
                ):
                    pids.add(int(fields[4]))
    except OSError:
        return ""
    out = []
    for pid in sorted(pids - {os.getpid()}):
        try:
            out.append(f"pid {pid} (uid {os.stat(f'/proc/{pid}').st_uid})")
        except OSError:
            out.append(f"pid {pid}")
    return ", ".join(out)


def _check_version(path: Path, spec: Database, version: int, *, readonly: bool) -> None:
    msg = spec.messages
    if version > spec.version:
        raise spec.error(msg.newer.format(path=path, version=version, known=spec.version))
    if readonly and version < spec.readable_from:
        raise spec.error(msg.needs_migrating.format(path=path, version=version, known=spec.version))


def _migrate(db: sqlite3.Connection, path: Path, spec: Database) -> None:
    try:
        db.execute("BEGIN IMMEDIATE")
        version = schema_version(db)  # under the write lock: someone may have migrated
        _check_version(path, spec, version, readonly=False)
        for number in range(version, spec.version):
            spec.migrations[number](db)
        db.execute(f"PRAGMA user_version = {spec.version}")
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('created_ns', ?)",
            (str(time.time_ns()),),
        )
        db.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        _rollback(db)
        raise spec.error(spec.messages.migration_failed.format(path=path, error=e)) from e
    except BaseException:
        _rollback(db)
        raise


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        db.execute("ROLLBACK")
