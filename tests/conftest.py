"""Fixtures shared by several test modules; the builders behind them are in tests/helpers/.

A test module never imports another test module: what two modules share lives here (fixtures)
or in ``tests.helpers`` (plain functions and data).
"""

import time

import pytest

from tests.helpers import acct as acct_data
from tests.helpers import make_ledger


@pytest.fixture
def utc(monkeypatch):
    """Local time is UTC (``TZ``), as the ``llem-acct`` tests' expected times are written."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def live_tmp(tmp_path):
    """A directory in memory for a fake hardware tree whose counters a thread advances while
    llem reads them (``tests.helpers.memory``); removed after the test."""
    from tests.helpers.memory import memory_dir

    with memory_dir(tmp_path) as path:
        yield path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A ledger of ``tests.helpers.acct.JOBS`` and a config naming it; LLEM_CONFIG points at
    the config. Returns the ledger's path."""
    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    ledger = d / "ledger.db"
    make_ledger.write_jobs(ledger, acct_data.JOBS)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(acct_data.CONFIG + f"ledger: {ledger}\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    return ledger


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session (``tests.helpers.postgres``): missing
    binaries fail the tests that need it, they never skip."""
    from tests.helpers.postgres import Server

    try:
        server = Server()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """The connection string of a new, empty database on the session's server."""
    return pg_server.database()
