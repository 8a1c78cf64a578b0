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
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llem import slices
from llem.config import SamplerConfig
from llem.errors import StoreError
from llem.node.daemon import NodeDaemon, sampler_pid
from llem.node.jobs import write_registration
from llem.node.store import NodeStore
from llem.node.usage import CLK_TCK
from llem.node.windows import WindowError, close_window, open_window
from llem.paths import NodePaths, outbox_dir
from llem.sensors import OpenedSensors
from tests.fakes import FakeSensor
from tests.helpers.nodes import node_config

NODE = "n1"
INTERVAL_S = 0.2
WAIT_S = 30.0  # generous: the test machine is small and shared

PACKAGE_UJ_PER_READ = 1_000_000
DRAM_UJ_PER_READ = 200_000
JOB_CPU_SHARE = 0.6  # of the node's busy CPU time, per read
GIB = 1 << 30


def slurm_env(job_id: str, uid: int = 1000, user: str = "alice") -> dict[str, str]:
    """What slurmd puts in the Prolog and Epilog environment (Slurm 22.05)."""
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(uid), "SLURM_JOB_GID": str(uid),
        "SLURM_JOB_USER": user, "SLURM_JOB_ACCOUNT": "physics", "SLURM_JOB_PARTITION": "cpu",
        "SLURM_CLUSTER_NAME": "c1", "SLURMD_NODENAME": NODE, "SLURM_NODELIST": NODE,
        "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_CPUS_PER_NODE": "4",
    }


class BusyNode:
    """A node whose counters all move each time the sampler reads them.

    Per read: the package draws 1 J and DRAM 0.2 J; the node's CPUs are busy for 1 s, of which
    each job cgroup present takes 0.6 s; each job holds 1 GiB of the node's 4 GiB in use.
    """

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"
        self.jobs = self.cgroup / "system.slice" / "slurmstepd.scope"
        self.proc.mkdir(parents=True)
        self.jobs.mkdir(parents=True)
        self.busy_ticks = 0
        (self.proc / "meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
        self._write_stat()
        self.dram = FakeSensor({"dram": 0}, component="dram", name="fake-dram")
        self.package = _AdvancingSensor({"package": 0}, name="fake-package", node=self)

    def add_job_cgroup(self, job_id: str) -> None:
        """What the job's extern step does after the Prolog: its cgroup appears."""
        # Built aside and renamed in: the sampler's thread may be reading the tree meanwhile.
        path = self.cgroup / f".job_{job_id}"
        path.mkdir()
        (path / "memory.current").write_text(f"{GIB}\n")
        (path / "cpu.stat").write_text("usage_usec 0\n")
        path.rename(self.jobs / f"job_{job_id}")

    def advance(self) -> None:
        self.busy_ticks += CLK_TCK
        self._write_stat()
        for job in self.jobs.iterdir():
            stat = job / "cpu.stat"
            usec = int(stat.read_text().split()[1]) + int(JOB_CPU_SHARE * 1_000_000)
            stat.write_text(f"usage_usec {usec}\n")
        self.dram.counters["dram"] += DRAM_UJ_PER_READ

    def _write_stat(self) -> None:
        (self.proc / "stat").write_text(f"cpu  {self.busy_ticks} 0 0 1000 0 0 0 0 0 0\n")

    def open_sensors(self, config, env) -> OpenedSensors:
        return OpenedSensors([self.package, self.dram], ["fake node"])


class _AdvancingSensor(FakeSensor):
    def __init__(self, counters, name, node: BusyNode) -> None:
        super().__init__(counters, name=name)
        self.node = node

    def read(self, mono_ns: int):
        self.counters["package"] += PACKAGE_UJ_PER_READ
        self.node.advance()  # the package is read first: DRAM and usage move in step
        return super().read(mono_ns)


class Daemon:
    """A NodeDaemon running in a thread; ``stop()`` ends it however the test went."""

    def __init__(self, tmp_path: Path, linger_s: float) -> None:
        self.config = replace(
            node_config(tmp_path, NODE), run_dir=str(tmp_path / "run"),
            sampler=SamplerConfig(interval_s=INTERVAL_S, linger_s=linger_s, nice=0))
        self.paths = NodePaths.of(self.config, NODE)
        self.paths.ensure()
        self.node = BusyNode(tmp_path / "node")
        self.daemon: NodeDaemon | None = None
        self.thread: threading.Thread | None = None
        self.status: list[int] = []

    def make(self) -> NodeDaemon:
        return NodeDaemon(self.config, NODE, env={}, open_sensors=self.node.open_sensors,
                          proc_root=self.node.proc, cgroup_root=str(self.node.cgroup))

    def start(self) -> None:
        self.daemon = self.make()
        self.thread = threading.Thread(target=lambda: self.status.append(self.daemon.run()),
                                       name="node-daemon", daemon=True)
        self.thread.start()
        # Up once it wrote an interval: its socket is bound by then (a crashed predecessor's
        # socket file may still lie there, refusing connections).
        wait_for(self.wrote_an_interval, "the daemon's first interval")

    def wrote_an_interval(self) -> bool:
        try:
            return bool(self.query("SELECT COUNT(*) FROM intervals WHERE sampler_id LIKE ?",
                                   (f"{NODE}-{os.getpid()}-%",))[0][0])
        except StoreError:  # not there yet, or not migrated yet
            return False

    def prolog(self, job_id: str, **env) -> None:
        write_registration(self.paths.jobs, "start", slurm_env(job_id, **env))
        if self.daemon is not None:
            self.daemon.wake()  # what the hook's SIGUSR1 does

    def epilog(self, job_id: str) -> None:
        write_registration(self.paths.jobs, "end", slurm_env(job_id))
        if self.daemon is not None:
            self.daemon.wake()

    def store(self) -> NodeStore:
        return NodeStore(self.paths.store, readonly=True)

    def query(self, sql: str, params=()) -> list[tuple]:
        with self.store() as store:
            return store.query(sql, params)

    def job_state(self, job_id: str) -> str | None:
        rows = self.query("SELECT state FROM jobs WHERE job_id = ?", (job_id,))
        return rows[-1][0] if rows else None

    def job_intervals(self, job_id: str) -> int:
        return self.query(
            "SELECT COUNT(DISTINCT je.interval_id) FROM job_energy je JOIN jobs j "
            "ON j.run_id = je.run_id WHERE j.job_id = ?", (job_id,))[0][0]

    def join(self, timeout_s: float = WAIT_S) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the daemon did not exit in time"

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.daemon.terminate()
            self.thread.join(WAIT_S)


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    """Poll ``predicate`` until it returns something true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


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
        "SELECT e.interval_id, e.device_key, e.energy_uj, COALESCE(r.energy_uj, 0), "
        "(SELECT COALESCE(SUM(je.energy_uj), 0) FROM job_energy je "
        " WHERE je.interval_id = e.interval_id AND je.device_key = e.device_key) "
        "FROM energy e LEFT JOIN remainder r "
        "ON r.interval_id = e.interval_id AND r.device_key = e.device_key")
    assert {device for _, device, *_ in rows} == {"fake:package", "fake:dram"}
    assert len(rows) >= 6
    for interval_id, device, measured, remainder, jobs in rows:
        assert jobs + remainder == measured, (interval_id, device)
    # The job's share follows its cgroup: 0.6 of the busy CPU time, 1 GiB of 4 GiB in use.
    shares = dict(node.query(
        "SELECT device_key, GROUP_CONCAT(DISTINCT share) FROM job_energy GROUP BY device_key"))
    assert shares == {"fake:package": str(JOB_CPU_SHARE), "fake:dram": "0.25"}
    package = node.query("SELECT DISTINCT energy_uj FROM job_energy "
                         "WHERE device_key = 'fake:package'")
    assert package == [(int(PACKAGE_UJ_PER_READ * JOB_CPU_SHARE),)]
    assert node.query("SELECT SUM(energy_uj) FROM remainder")[0][0] > 0
    assert node.query("SELECT uid, user, cpus, state FROM jobs") == [
        (1000, "alice", 4, "running")]


def test_window_over_the_socket_as_root_carries_energy(node):
    if os.geteuid() != 0:
        pytest.skip("the window request must come from root")
    node.node.add_job_cgroup("102")
    node.prolog("102")
    node.start()
    env = slurm_env("102")
    opened = open_window(node.paths.socket, env, "epoch 1")
    start_interval = node.query("SELECT start_mono_ns FROM windows WHERE id = ?",
                                (opened["window_id"],))[0][0]
    wait_for(lambda: node.query("SELECT COUNT(*) FROM job_energy WHERE interval_id > ? "
                                "AND device_key = 'fake:package'", (start_interval,))[0][0] >= 2,
             "two intervals of job energy inside the window")
    closed = close_window(node.paths.socket, env, opened["window_id"])

    assert closed["window_id"] == opened["window_id"]
    assert closed["energy_uj"]["fake:package"] >= 2 * int(PACKAGE_UJ_PER_READ * JOB_CPU_SHARE)
    status, energy, end_interval = node.query(
        "SELECT status, energy, end_mono_ns FROM windows WHERE id = ?",
        (opened["window_id"],))[0]
    assert status == "closed"
    assert json.loads(energy) == closed["energy_uj"]
    # The window holds exactly the job's energy of the intervals it spans.
    inside = dict(node.query(
        "SELECT device_key, SUM(energy_uj) FROM job_energy WHERE interval_id > ? "
        "AND interval_id <= ? GROUP BY device_key", (start_interval, end_interval)))
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

    found = [p for d in (Path(node.config.spool_dir), outbox_dir(node.config)) if d.is_dir()
             for p in d.glob("*.json") if slices.parse_file_name(p.name)["kind"] == "job"]
    assert len(found) == 1, found
    data = slices.validate(json.loads(found[0].read_bytes()))
    assert data["job"]["job_id"] == "104"
    assert data["job"]["user"] == "alice"
    assert data["job"]["end_ns"] is not None
    energy_uj = sum(row["energy_uj"] for row in data["energy"])
    assert energy_uj == node.query("SELECT SUM(je.energy_uj) FROM job_energy je JOIN jobs j "
                                   "ON j.run_id = je.run_id WHERE j.job_id = '104'")[0][0]
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
    from tests.powercap import FakePowercap

    node = Daemon(tmp_path, linger_s=600.0)
    tree = FakePowercap(tmp_path / "powercap")
    tree.add_socket(0)
    node.prolog("107")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(LLEM_CONFIG="/dev/null", LLEM_POWERCAP_ROOT=str(tree.path), LLEM_SENSORS="rapl",
               LLEM_CLUSTER="c1", LLEM_STATE_DIR=node.config.state_dir,
               LLEM_SPOOL_DIR=node.config.spool_dir, LLEM_RUN_DIR=node.config.run_dir,
               LLEM_SAMPLER_NICE="0", LLEM_TEST_CRASH_AFTER_COMMITS="3")
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.crash_sampler", "--node", NODE, "--interval", "0.1"],
        env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=60)
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
        node.query("SELECT flags FROM jobs WHERE job_id = '107'")[0][0])
    starts = node.query("SELECT kind FROM events WHERE kind LIKE 'sampler_%' ORDER BY id")
    assert starts == [("sampler_start",), ("sampler_restart",), ("sampler_start",),
                      ("sampler_stop",)]
    assert "sampler restarted with jobs running" in node.paths.problems.read_text()
