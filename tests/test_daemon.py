"""The node daemon in-process: NodeDaemon in a thread, against folders under tmp_path.

Jobs come in the way Slurm's hooks bring them: registrations written by the production
``write_registration`` from a Prolog/Epilog-like environment. The sensors are fakes whose
counters move each time the sampler reads them, together with a fake ``/proc`` and job cgroup,
so the attribution has real figures to split. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llem import slices
from llem.node.daemon import sampler_pid
from llem.node.windows import WindowError, close_window, open_window
from llem.paths import outbox_dir
from tests.helpers.daemon import (
    JOB_CPU_SHARE,
    NODE,
    PACKAGE_UJ_PER_READ,
    Daemon,
    process_env,
    slurm_env,
    wait_for,
)


@pytest.fixture
def node(tmp_path):
    running = Daemon(tmp_path, linger_s=600.0)
    yield running
    running.stop()


def test_registered_job_gets_energy_and_jobs_plus_remainder_equal_the_node(node):
    node.node.add_job_cgroup("101")
    node.prolog("101")
    node.start()
    wait_for(lambda: node.job_intervals("101") >= 3, "three intervals with job energy")
    node.stop()

    # Every interval and device: what the jobs got plus the remainder is what was measured.
    rows = node.query(
        "SELECT e.interval_id, e.device_key, e.energy_uj, "
        "(SELECT COALESCE(SUM(r.energy_uj), 0) FROM remainder r "
        " WHERE r.interval_id = e.interval_id AND r.device_key = e.device_key), "
        "(SELECT COALESCE(SUM(je.energy_uj), 0) FROM job_energy je "
        " WHERE je.interval_id = e.interval_id AND je.device_key = e.device_key) "
        "FROM energy e"
    )
    assert {device for _, device, *_ in rows} == {"fake:package", "fake:dram"}
    assert len(rows) >= 6
    for interval_id, device, measured, remainder, jobs in rows:
        assert jobs + remainder == measured, (interval_id, device)
    # The job's share follows its cgroup: 0.6 of the busy CPU time, 1 GiB of 4 GiB in use.
    shares = dict(
        node.query(
            "SELECT device_key, GROUP_CONCAT(DISTINCT share) FROM job_energy GROUP BY device_key"
        )
    )
    assert shares == {"fake:package": str(JOB_CPU_SHARE), "fake:dram": "0.25"}
    package = node.query(
        "SELECT DISTINCT energy_uj FROM job_energy WHERE device_key = 'fake:package'"
    )
    assert package == [(int(PACKAGE_UJ_PER_READ * JOB_CPU_SHARE),)]
    assert node.query("SELECT SUM(energy_uj) FROM remainder")[0][0] > 0
    assert node.query("SELECT uid, user, cpus, state FROM jobs") == [(1000, "alice", 4, "running")]


def test_window_over_the_socket_as_root_carries_energy(node):
    if os.geteuid() != 0:
        pytest.skip("the window request must come from root")
    node.node.add_job_cgroup("102")
    node.prolog("102")
    node.start()
    env = slurm_env("102")
    opened = open_window(node.paths.socket, env, "epoch 1")
    start_interval = node.query(
        "SELECT start_mono_ns FROM windows WHERE id = ?", (opened["window_id"],)
    )[0][0]
    wait_for(
        lambda: (
            node.query(
                "SELECT COUNT(*) FROM job_energy WHERE interval_id > ? "
                "AND device_key = 'fake:package'",
                (start_interval,),
            )[0][0]
            >= 2
        ),
        "two intervals of job energy inside the window",
    )
    closed = close_window(node.paths.socket, env, opened["window_id"])

    assert closed["window_id"] == opened["window_id"]
    assert closed["energy_uj"]["fake:package"] >= 2 * int(PACKAGE_UJ_PER_READ * JOB_CPU_SHARE)
    status, energy, end_interval = node.query(
        "SELECT status, energy, end_mono_ns FROM windows WHERE id = ?", (opened["window_id"],)
    )[0]
    assert status == "closed"
    assert json.loads(energy) == closed["energy_uj"]
    # The window holds exactly the job's energy of the intervals it spans.
    inside = dict(
        node.query(
            "SELECT device_key, SUM(energy_uj) FROM job_energy WHERE interval_id > ? "
            "AND interval_id <= ? GROUP BY device_key",
            (start_interval, end_interval),
        )
    )
    assert closed["energy_uj"] == inside
    with pytest.raises(WindowError, match="already closed"):
        close_window(node.paths.socket, env, opened["window_id"])


def test_window_for_a_job_that_is_not_running_is_refused(node):
    node.prolog("103")
    node.start()
    with pytest.raises(WindowError, match="job 999 is not running on this node"):
        open_window(node.paths.socket, slurm_env("999"), "x")
    node.epilog("103")
    wait_for(lambda: node.job_state("103") in ("sealed", "exported"), "job 103 sealed")
    with pytest.raises(WindowError, match="job 103 is not running on this node"):
        open_window(node.paths.socket, slurm_env("103"), "late")
    assert node.query("SELECT COUNT(*) FROM windows") == [(0,)]


def test_ended_job_is_sealed_and_its_slice_validates(node):
    node.start()  # a job that comes to a running sampler: every moment of it is measured
    node.node.add_job_cgroup("104")
    node.prolog("104")
    wait_for(lambda: node.job_intervals("104") >= 2, "job energy")
    node.epilog("104")
    wait_for(lambda: node.job_state("104") == "exported", "job 104 exported")

    found = [
        p
        for d in (Path(node.config.spool_dir), outbox_dir(node.config))
        if d.is_dir()
        for p in d.glob("*.json")
        if slices.parse_file_name(p.name)["kind"] == "job"
    ]
    assert len(found) == 1, found
    data = slices.validate(json.loads(found[0].read_bytes()))
    assert data["job"]["job_id"] == "104"
    assert data["job"]["user"] == "alice"
    assert data["job"]["end_ns"] is not None
    energy_uj = sum(row["energy_uj"] for row in data["energy"])
    assert (
        energy_uj
        == node.query(
            "SELECT SUM(je.energy_uj) FROM job_energy je JOIN jobs j "
            "ON j.run_id = je.run_id WHERE j.job_id = '104'"
        )[0][0]
    )
    assert energy_uj > 0
    coverage, flags = node.query("SELECT coverage, flags FROM jobs WHERE job_id = '104'")[0]
    assert (coverage, json.loads(flags)) == (1.0, [])
    assert data["job"]["coverage"] == 1.0


def test_second_daemon_for_the_node_leaves_at_once(node):
    node.prolog("105")
    node.start()
    assert node.make().run() == 0  # returns: the node's sampler lock is held
    assert node.thread.is_alive()
    assert sampler_pid(node.paths) == os.getpid()


def test_daemon_leaves_after_linger_and_releases_the_lock(tmp_path):
    linger_s = 1.0
    node = Daemon(tmp_path, linger_s=linger_s)
    try:
        node.prolog("106")
        node.start()
        assert sampler_pid(node.paths) == os.getpid()
        node.epilog("106")
        node.join()
    finally:
        node.stop()
    assert node.status == [0]
    assert not node.paths.pid_file.exists()
    assert not node.paths.socket.exists()
    assert sampler_pid(node.paths) is None
    # It stayed for the linger after the last job was done, by its own clock.
    exported_ns = node.query("SELECT exported_ns FROM jobs WHERE job_id = '106'")[0][0]
    stop_ns = node.query("SELECT MAX(ts_ns) FROM events WHERE kind = 'sampler_stop'")[0][0]
    assert stop_ns - exported_ns >= linger_s * 1e9
    # The lock is free for the next Prolog's sampler.
    successor = node.make()
    assert successor.acquire_lock()
    successor.release_lock()


def test_restart_after_a_crash_at_a_commit_point_is_recorded_on_the_job(tmp_path):
    """The node sampler dies right after its 3rd committed interval (a deterministic crash
    point, see tests/crash_sampler.py) with a job running; the next sampler takes over."""
    from tests.crash_sampler import CRASH_EXIT

    node = Daemon(tmp_path, linger_s=600.0)
    node.prolog("107")
    env = process_env(node, LLEM_TEST_CRASH_AFTER_COMMITS="3")
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.crash_sampler", "--node", NODE, "--interval", "0.1"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == CRASH_EXIT, crashed.stderr
    assert node.paths.pid_file.exists()  # stale: the crash left it
    assert sampler_pid(node.paths) is None  # but the lock died with the process
    assert node.query("SELECT COUNT(*) FROM intervals") == [(3,)]
    try:
        node.start()
        node.epilog("107")
        wait_for(lambda: node.job_state("107") == "exported", "job 107 exported")
    finally:
        node.stop()
    with node.store() as store:
        assert store.integrity_check() == "ok"
    assert sampler_pid(node.paths) is None
    assert "sampler_restart" in json.loads(
        node.query("SELECT flags FROM jobs WHERE job_id = '107'")[0][0]
    )
    starts = node.query("SELECT kind FROM events WHERE kind LIKE 'sampler_%' ORDER BY id")
    assert starts == [
        ("sampler_start",),
        ("sampler_restart",),
        ("sampler_start",),
        ("sampler_stop",),
    ]
    assert "sampler restarted with jobs running" in node.paths.problems.read_text()


def test_a_leaving_sampler_never_removes_its_successors_socket(tmp_path, monkeypatch):
    """A sampler that leaves (idle past linger_s) lets the lock go; a Prolog's new sampler
    takes it at once and listens on the same path. The one leaving used to remove the socket
    file after letting the lock go, i.e. the successor's: the successor then served no
    windows for its whole life. Replayed: the successor takes the lock in that instant."""
    import fcntl
    import socket

    import llem.node.daemon as daemon_mod

    def socket_inode(path):
        return os.lstat(path).st_ino if path.exists() else None

    node = Daemon(tmp_path, linger_s=0.5)
    successor = node.make()
    real_pending = daemon_mod.pending
    seen: dict = {}

    def pending(jobs):
        out = real_pending(jobs)
        if not out and seen.get("armed") and "inode" not in seen:
            try:  # the lock is free: leave() has let it go, the successor takes it now
                fcntl.flock(node.daemon.lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(node.daemon.lock_fd, fcntl.LOCK_UN)
            except OSError:
                return out
            assert successor.acquire_lock()
            seen["inode"] = socket_inode(node.paths.socket)
        return out

    monkeypatch.setattr(daemon_mod, "pending", pending)
    try:
        node.prolog("106")
        node.start()
        seen["armed"] = True
        node.epilog("106")
        node.join()
        assert "inode" in seen, "the successor never got the lock while the first one left"
        # the successor's socket is still there, and it is the successor's
        assert socket_inode(node.paths.socket) == seen["inode"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(node.paths.socket))
    finally:
        node.stop()
        successor.shutdown()
    assert not node.paths.socket.exists()  # and the successor removes its own when it stops


def test_the_cold_prolog_does_not_wait_for_a_sampler_that_died_at_its_start(tmp_path):
    """A sampler that cannot start (broken llem, a bad sensor) leaves at once: the Prolog
    that spawned it must not wait out its whole budget for a socket that will never come."""
    import time

    from llem.node.daemon import wait_until_serving
    from llem.paths import NodePaths

    paths = NodePaths("n1", tmp_path / "run" / "n1", tmp_path / "node-n1.db")
    paths.run.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t0 = time.monotonic()
    assert wait_until_serving(paths, dead.pid, timeout_s=5.0) is False
    assert time.monotonic() - t0 < 1.0
