import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llem.errors import StoreError
from llem.model import EnergyRow, Interval
from llem.node import store as node
from llem.node.store import NodeStore, open_or_quarantine
from tests.powercap import FakePowercap


def interval(i, rows=(("d", 5),)):
    return Interval(
        "s", i * 10, i * 10 + 10, i, i + 1, tuple(EnergyRow(k, e, "ok", "ok", e) for k, e in rows)
    )


def test_fresh_store_is_wal_and_migrated(tmp_path):
    with NodeStore(tmp_path / "s" / "n.db") as store:
        assert store.query("PRAGMA journal_mode") == [("wal",)]
        assert store.query("PRAGMA user_version") == [(node.SCHEMA_VERSION,)]
        assert store.integrity_check() == "ok"
    assert oct(os.stat(tmp_path / "s").st_mode & 0o777) == "0o750"
    assert oct(os.stat(tmp_path / "s" / "n.db").st_mode & 0o777) == "0o640"


def test_reopen_keeps_data(tmp_path):
    from llem.sensors.base import Device

    dev = Device("d", "cpu", "d", "fake", "measured", "counter")
    with NodeStore(tmp_path / "n.db") as s:
        s.register_devices([dev], 1)
        s.write(interval(1))
    with NodeStore(tmp_path / "n.db") as s:
        assert s.energy_by_device() == {"d": 5}


def test_negative_energy_is_refused_by_the_schema(tmp_path):
    from llem.sensors.base import Device

    with NodeStore(tmp_path / "n.db") as s:
        s.register_devices([Device("d", "cpu", "d", "fake", "measured", "counter")], 1)
        with pytest.raises(StoreError):
            s.write(interval(1, rows=(("d", -1),)))
        assert s.query("SELECT COUNT(*) FROM intervals") == [(0,)]  # the whole batch rolled back


def test_newer_schema_is_refused_not_rewritten(tmp_path):
    path = tmp_path / "n.db"
    NodeStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer than this llem"):
        NodeStore(path)
    with pytest.raises(StoreError):
        open_or_quarantine(path)
    assert path.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_store_is_quarantined_and_kept(tmp_path, damage):
    path = tmp_path / "n.db"
    from llem.sensors.base import Device

    with NodeStore(path) as s:
        s.register_devices([Device("d", "cpu", "d", "fake", "measured", "counter")], 1)
        for i in range(200):
            s.write(interval(i))
        s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        path.write_bytes(data[: len(data) // 2])
    store, moved = open_or_quarantine(path)
    assert moved is not None and moved.exists()
    kept = b"this is not a databa" if damage == "garbage" else data[:20]
    assert moved.read_bytes()[:20] == kept
    assert store.integrity_check() == "ok"
    assert store.query("SELECT kind FROM events") == [("store_quarantined",)]


def test_refuses_a_state_dir_writable_by_others(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(StoreError, match="writable by group or others"):
        NodeStore(d / "n.db")


def test_refuses_a_symlinked_state_dir(tmp_path):
    (tmp_path / "real").mkdir(mode=0o750)
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(StoreError, match="symlink"):
        NodeStore(tmp_path / "link" / "n.db")


def test_refuses_a_symlink_in_place_of_the_database(tmp_path):
    (tmp_path / "state").mkdir(mode=0o750)
    os.symlink("/etc/passwd", tmp_path / "state" / "n.db")
    with pytest.raises(StoreError):
        NodeStore(tmp_path / "state" / "n.db")


def _sampler_env(tree):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_POWERCAP_ROOT=str(tree.path),
        LLEM_SENSORS="rapl",
        LLEM_CONFIG="/dev/null",
        PYTHONUNBUFFERED="1",
    )
    return env


ROOT = Path(__file__).resolve().parent.parent


def _start_sampler(tree, store_path, interval_s, module="llem.cli.sampler", **env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            "--interval",
            str(interval_s),
            "--store",
            str(store_path),
            "-v",
        ],
        env={**_sampler_env(tree), **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_intervals(path, n, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
                count = db.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
                db.close()
                if count >= n:
                    return
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"sampler wrote fewer than {n} intervals in {timeout} s")


def _assert_whole(store):
    assert store.integrity_check() == "ok"
    # Each interval is whole: an interval row always has its energy rows.
    assert store.query(
        "SELECT COUNT(*) FROM intervals i WHERE NOT EXISTS "
        "(SELECT 1 FROM energy e WHERE e.interval_id = i.id)"
    ) == [(0,)]


@pytest.mark.parametrize(
    "commits, point", [(1, "commit"), (4, "commit"), (1, "next-write"), (4, "next-write")]
)
def test_crash_at_a_commit_point_loses_at_most_the_interval_in_flight(tmp_path, commits, point):
    from tests.crash_sampler import CRASH_EXIT

    tree = FakePowercap(tmp_path / "pc")
    tree.add_socket(0)
    path = tmp_path / "state" / "n.db"
    proc = _start_sampler(
        tree,
        path,
        0.1,
        module="tests.crash_sampler",
        LLEM_TEST_CRASH_AFTER_COMMITS=str(commits),
        LLEM_TEST_CRASH_POINT=point,
    )
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == CRASH_EXIT, output
    with NodeStore(path) as store:
        _assert_whole(store)
        # Every committed interval is there; at "next-write" the one in flight is lost.
        assert store.query("SELECT COUNT(*) FROM intervals") == [(commits,)]
        devices = store.query("SELECT COUNT(*) FROM devices")[0][0]
        assert store.query("SELECT COUNT(*) FROM energy") == [(commits * devices,)]
    # The next sampler carries on in the same store.
    proc = _start_sampler(tree, path, 0.1)
    try:
        _wait_for_intervals(path, commits + 1)
    finally:
        proc.terminate()
        proc.wait(10)
    with NodeStore(path) as store:
        _assert_whole(store)


def test_sigkill_at_a_random_moment_loses_at_most_one_interval(tmp_path):
    # The one randomized kill: the deterministic points above cover the known places.
    tree = FakePowercap(tmp_path / "pc")
    tree.add_socket(0)
    path = tmp_path / "state" / "n.db"
    interval_s = 0.2
    proc = _start_sampler(tree, path, interval_s)
    try:
        _wait_for_intervals(path, 2)
        time.sleep(random.uniform(0, 1.0))
        for _ in range(3):
            tree.advance("intel-rapl:0", 1_000_000)
        kill_wall_ns = time.time_ns()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = NodeStore(path)
    _assert_whole(store)
    last_end_ns = store.query("SELECT MAX(end_ns) FROM intervals")[0][0]
    # Everything up to one interval before the kill is on disk (plus scheduling slack on a
    # loaded 2-core machine).
    assert kill_wall_ns - last_end_ns <= (interval_s + 0.3) * 1e9


def test_sigterm_flushes_and_exits_within_a_second(tmp_path):
    tree = FakePowercap(tmp_path / "pc")
    tree.add_socket(0)
    path = tmp_path / "state" / "n.db"
    proc = _start_sampler(tree, path, 10.0)  # long interval: the final reading must flush it
    watchdog = threading.Timer(30, proc.kill)  # bounds the read below: EOF at the latest
    watchdog.start()
    try:
        for line in proc.stdout:  # the loop is running once it says so
            if "sampling" in line:
                break
        watchdog.cancel()
        time.sleep(0.3)
        tree.advance("intel-rapl:0", 5_000_000)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(5)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert elapsed < 1.0
    with NodeStore(path) as store:
        assert store.energy_by_device()["rapl:package-0"] == 5_000_000
