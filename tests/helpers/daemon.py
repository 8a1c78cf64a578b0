"""The node daemon in-process, for the tests of the daemon and of its window server.

A :class:`Daemon` is the production NodeDaemon in a thread, against folders under a test's
directory. Jobs come in the way Slurm's hooks bring them: registrations written by the
production ``write_registration`` from a Prolog/Epilog-like environment. The sensors are
fakes whose counters move each time the sampler reads them, together with a fake ``/proc`` and
job cgroup, so the attribution has real figures to split. Every wait polls with a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from llem.config import AttributionConfig, SamplerConfig
from llem.errors import StoreError
from llem.node.daemon import NodeDaemon
from llem.node.jobs import write_registration
from llem.node.store import NodeStore
from llem.node.usage import CLK_TCK
from llem.paths import NodePaths
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
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_UID": str(uid),
        "SLURM_JOB_GID": str(uid),
        "SLURM_JOB_USER": user,
        "SLURM_JOB_ACCOUNT": "physics",
        "SLURM_JOB_PARTITION": "cpu",
        "SLURM_CLUSTER_NAME": "c1",
        "SLURMD_NODENAME": NODE,
        "SLURM_NODELIST": NODE,
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_CPUS_PER_NODE": "4",
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
        (self.proc / "stat").write_text(
            f"cpu  {self.busy_ticks} 0 0 1000 0 0 0 0 0 0\n"
            + "".join(f"cpu{i} 0 0 0 0 0 0 0 0 0 0\n" for i in range(8))
        )  # an 8-CPU node

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
            node_config(tmp_path, NODE),
            run_dir=str(tmp_path / "run"),
            sampler=SamplerConfig(interval_s=INTERVAL_S, linger_s=linger_s, nice=0),
            # The figures below are the use rule's; the policies have tests of their own.
            attribution=AttributionConfig(policy="use"),
        )
        self.root = tmp_path
        self.paths = NodePaths.of(self.config, NODE)
        self.paths.ensure()
        self.node = BusyNode(tmp_path / "node")
        self.daemon: NodeDaemon | None = None
        self.thread: threading.Thread | None = None
        self.status: list[int] = []

    def make(self) -> NodeDaemon:
        return NodeDaemon(
            self.config,
            NODE,
            env={},
            open_sensors=self.node.open_sensors,
            proc_root=self.node.proc,
            cgroup_root=str(self.node.cgroup),
        )

    def start(self) -> None:
        self.daemon = self.make()
        self.thread = threading.Thread(
            target=lambda: self.status.append(self.daemon.run()), name="node-daemon", daemon=True
        )
        self.thread.start()
        # Up once it wrote an interval: its socket is bound by then (a crashed predecessor's
        # socket file may still lie there, refusing connections).
        wait_for(self.wrote_an_interval, "the daemon's first interval")

    def wrote_an_interval(self) -> bool:
        try:
            return bool(
                self.query(
                    "SELECT COUNT(*) FROM intervals WHERE sampler_id LIKE ?",
                    (f"{NODE}-{os.getpid()}-%",),
                )[0][0]
            )
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
            "ON j.run_id = je.run_id WHERE j.job_id = ?",
            (job_id,),
        )[0][0]

    def join(self, timeout_s: float = WAIT_S) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the daemon did not exit in time"

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.daemon.terminate()
            self.thread.join(WAIT_S)


def process_env(node: Daemon, **extra: str) -> dict[str, str]:
    """The environment of a real ``llem sampler --node NODE`` process for ``node``'s folders,
    on a RAPL tree made here (one socket, counters that stay put)."""
    from tests.powercap import FakePowercap

    tree = FakePowercap(node.root / "powercap")
    tree.add_socket(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_POWERCAP_ROOT=str(tree.path),
        LLEM_SENSORS="rapl",
        LLEM_CLUSTER="c1",
        LLEM_STATE_DIR=node.config.state_dir,
        LLEM_SPOOL_DIR=node.config.spool_dir,
        LLEM_RUN_DIR=node.config.run_dir,
        LLEM_SAMPLER_NICE="0",
        **extra,
    )
    return env


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
