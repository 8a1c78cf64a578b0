"""llem.sqlite: one way to open and migrate the node store and the ledger."""

import os
import sqlite3

import pytest

from llem.sqlite import Database, Messages, open_database, run_script


class DbError(Exception):
    pass


MESSAGES = Messages(
    not_a_database="{path}: not a database: {error}",
    cannot_open="{path}: cannot open: {error}",
    newer="{path}: schema {version} is newer than {known}",
    needs_migrating="{path}: schema {version} needs migrating",
    migration_failed="{path}: migration failed: {error}",
)


def _v1(db):
    run_script(
        db,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); CREATE TABLE t (x INTEGER)",
    )


def _v2(db):
    run_script(db, "CREATE INDEX t_by_x ON t (x)")


def spec(*migrations, readable_from=None, prepare_dir=lambda path: None):
    return Database(
        migrations=migrations,
        readable_from=len(migrations) if readable_from is None else readable_from,
        file_mode=0o600,
        prepare_dir=prepare_dir,
        busy_timeout_s=1.0,
        pragmas=("PRAGMA foreign_keys = ON",),
        write_pragmas=("PRAGMA journal_mode = WAL",),
        error=DbError,
        messages=MESSAGES,
    )


def names(path):
    db = sqlite3.connect(path)
    try:
        return {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()


def user_version(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def test_a_writer_creates_and_migrates_in_order(tmp_path):
    path = tmp_path / "x.db"
    db = open_database(path, spec(_v1, _v2), readonly=False)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert db.execute("SELECT key FROM meta").fetchall() == [("created_ns",)]
    db.close()
    assert user_version(path) == 2 and {"t", "t_by_x"} <= names(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_a_later_writer_applies_only_the_new_migrations(tmp_path):
    path = tmp_path / "x.db"
    open_database(path, spec(_v1), readonly=False).close()
    db = open_database(path, spec(_v1, _v2), readonly=False)  # _v1 again would fail
    db.close()
    assert user_version(path) == 2 and "t_by_x" in names(path)


def test_a_failing_migration_applies_nothing(tmp_path):
    path = tmp_path / "x.db"

    def broken(db):
        run_script(db, "CREATE TABLE half (x INTEGER); CREATE TABLE t (y INTEGER)")

    with pytest.raises(DbError, match="migration failed: .*already exists"):
        open_database(path, spec(_v1, broken), readonly=False)
    assert user_version(path) == 0 and names(path) == set()


def test_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "x.db"
    open_database(path, spec(_v1, _v2), readonly=False).close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(DbError, match=r"schema 2 is newer than 1"):
            open_database(path, spec(_v1), readonly=readonly)
    assert path.read_bytes() == before


def test_a_reader_reads_an_older_readable_schema_and_writes_nothing(tmp_path):
    path = tmp_path / "x.db"
    db = open_database(path, spec(_v1), readonly=False)
    db.execute("PRAGMA journal_mode = DELETE")  # as older llem left the ledger between passes
    db.close()
    before = (path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))
    db = open_database(path, spec(_v1, _v2, readable_from=1), readonly=True)
    assert db.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("CREATE INDEX t_by_x ON t (x)")
    db.close()
    assert (path.read_bytes(), path.stat().st_mtime_ns, sorted(os.listdir(tmp_path))) == before
    assert user_version(path) == 1 and "t_by_x" not in names(path)


def test_a_reader_refuses_a_schema_it_cannot_read(tmp_path):
    path = tmp_path / "x.db"
    open_database(path, spec(_v1), readonly=False).close()
    with pytest.raises(DbError, match="schema 1 needs migrating"):
        open_database(path, spec(_v1, _v2), readonly=True)
    assert user_version(path) == 1
    with pytest.raises(DbError, match="not a database"):  # a reader never creates
        open_database(tmp_path / "absent.db", spec(_v1), readonly=True)
    assert not (tmp_path / "absent.db").exists()


def test_a_symlink_or_a_bad_directory_is_refused_before_anything_is_created(tmp_path):
    target = tmp_path / "target"
    os.symlink(target, tmp_path / "link.db")
    with pytest.raises(DbError, match="cannot open: Too many levels of symbolic links"):
        open_database(tmp_path / "link.db", spec(_v1), readonly=False)
    assert not target.exists()

    def refuse(directory):
        raise DbError(f"{directory}: refused")

    with pytest.raises(DbError, match="refused"):
        open_database(tmp_path / "x.db", spec(_v1, prepare_dir=refuse), readonly=False)
    assert not (tmp_path / "x.db").exists()


def test_garbage_is_not_a_database(tmp_path):
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not a database" * 100)
    for readonly in (False, True):
        with pytest.raises(DbError, match="not a database: file is not a database"):
            open_database(path, spec(_v1), readonly=readonly)
    assert path.read_bytes() == b"this is not a database" * 100
