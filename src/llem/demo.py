"""``llem demo``: the whole pipeline on embedded defaults, with no Slurm and no root.

Two simulated nodes each get a real node sampler (the same code as on a cluster), which
reads whatever this machine has (RAPL, NVML, or the estimate model). Real local workloads
run as simulated jobs of simulated users: a CPU-heavy job and an idle one sharing a node, a
two-node job, and a job with named `llem wrap` windows. Their Prolog/Epilog registrations
are written the way slurm/llem-hook.sh writes them; the samplers attribute, seal and export
the jobs; `llem aggregate` merges the slices into a ledger; `llem-acct` shows it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llem.errors import LlemError

NODES = ("demo-n1", "demo-n2")


@dataclass
class DemoJob:
    job_id: str
    name: str
    user: str
    account: str
    partition: str
    nodes: tuple[str, ...]
    commands: Callable[[Demo, DemoJob, str], list[list[str]]]
    procs: list[subprocess.Popen] = field(default_factory=list)


def _burn(seconds: float) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import time; t = time.time() + {seconds}; any(iter(lambda: time.time() > t, True))",
    ]


def _sleep(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def _wrap(name: str, cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "llem.cli.main", "wrap", "--quiet", "--name", name, "--", *cmd]


_STEPD = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _start_in_step(job_id: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Run ``cmd`` under a stand-in for the job's slurmstepd (a parent process titled
    ``slurmstepd: [JOB.batch]``, of the sampler's own user): without job cgroups, the sampler
    credits a job only with the process tree under its slurmstepd (docs/security.md)."""
    return subprocess.Popen(
        [f"slurmstepd: [{job_id}.batch]", "-c", _STEPD, *cmd],
        executable=sys.executable,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _windows_job(demo: Demo, job: DemoJob, node: str) -> list[list[str]]:
    script = (
        "import subprocess, sys\n"
        f"subprocess.run({_wrap('prepare', _sleep(1.0))!r}, check=True)\n"
        f"subprocess.run({_wrap('compute', _burn(2.0))!r}, check=True)\n"
    )
    return [[sys.executable, "-c", script]]


JOBS = (
    DemoJob(
        "101", "cpu-heavy", "alice", "physics", "cpu", ("demo-n1",), lambda d, j, n: [_burn(4.0)]
    ),
    DemoJob("102", "idle", "bob", "biology", "cpu", ("demo-n1",), lambda d, j, n: [_sleep(4.0)]),
    DemoJob("103", "two-nodes", "carol", "physics", "cpu", NODES, lambda d, j, n: [_burn(3.0)]),
    DemoJob("104", "with-windows", "alice", "biology", "cpu", ("demo-n2",), _windows_job),
)


class Demo:
    def __init__(self, base: Path, say: Callable[[str], None] = print) -> None:
        self.base = base
        self.say = say
        self.config_path = base / "llem.yaml"
        self.uid = os.getuid()
        self.user = pwd.getpwuid(self.uid).pw_name

    # -- set-up ----------------------------------------------------------------------------

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.config_path.write_text(
            "cluster: demo\n"
            f"state_dir: {self.base / 'state'}\n"
            f"run_dir: {self.base / 'run'}\n"
            f"spool_dir: {self.base / 'spool'}\n"
            f"ledger: {self.base / 'ledger.db'}\n"
            # The demo stops its samplers itself; they must not leave before the first job.
            "sampler:\n  interval_s: 0.5\n  linger_s: 120\n"
        )

    @property
    def env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SPANK_"))
        }
        env["LLEM_CONFIG"] = str(self.config_path)
        return env

    def config(self):
        from llem import config as config_mod

        return config_mod.load(env=self.env)

    def start_samplers(self) -> None:
        from llem.node.daemon import sampler_pid, spawn_sampler
        from llem.paths import NodePaths

        config = self.config()
        for node in NODES:
            paths = NodePaths.of(config, node)
            paths.ensure()
            spawn_sampler(node, self.env)
        deadline = time.monotonic() + 20
        for node in NODES:
            paths = NodePaths.of(config, node)
            while not paths.socket.exists() or not sampler_pid(paths):
                if time.monotonic() > deadline:
                    raise LlemError(
                        f"the demo's sampler for {node} did not start; see "
                        f"{paths.run / 'sampler.log'}"
                    )
                time.sleep(0.05)

    def _wake(self, node: str) -> None:
        from llem.node.daemon import sampler_pid
        from llem.paths import NodePaths

        pid = sampler_pid(NodePaths.of(self.config(), node))
        if pid and pid > 0:
            os.kill(pid, signal.SIGUSR1)

    def _job_env(self, job: DemoJob, node: str) -> dict[str, str]:
        return {
            **self.env,
            "SLURM_JOB_ID": job.job_id,
            "SLURM_JOB_UID": str(self.uid),
            "SLURM_JOB_USER": job.user,
            "SLURM_JOB_ACCOUNT": job.account,
            "SLURM_JOB_PARTITION": job.partition,
            "SLURM_CLUSTER_NAME": "demo",
            "SLURMD_NODENAME": node,
            "SLURM_NODELIST": ",".join(job.nodes),
            "SLURM_JOB_NUM_NODES": str(len(job.nodes)),
            "SLURM_JOB_NAME": job.name,
            # One CPU each: the jobs share the node, and the idle one pays its reservation.
            "SLURM_JOB_CPUS_PER_NODE": "1",
        }

    # -- jobs --------------------------------------------------------------------------------

    def start_job(self, job: DemoJob) -> None:
        from llem.node.jobs import write_registration
        from llem.paths import NodePaths

        config = self.config()
        for node in job.nodes:
            env = self._job_env(job, node)
            write_registration(NodePaths.of(config, node).jobs, "start", env)
            self._wake(node)
        time.sleep(0.2)  # the sampler registers the job at its next reading
        for node in job.nodes:
            env = self._job_env(job, node)
            for cmd in job.commands(self, job, node):
                job.procs.append(_start_in_step(job.job_id, cmd, env))

    def end_job(self, job: DemoJob) -> None:
        from llem.cluster.header import write_header
        from llem.node.jobs import write_registration
        from llem.paths import NodePaths

        status = 0
        for proc in job.procs:
            status = max(status, proc.wait())
        config = self.config()
        for node in job.nodes:
            write_registration(NodePaths.of(config, node).jobs, "end", self._job_env(job, node))
            self._wake(node)
        header_env = {
            **self._job_env(job, job.nodes[0]),
            "SLURM_JOB_NODELIST": ",".join(job.nodes),
            "SLURM_JOB_EXIT_CODE": str(status << 8),
        }
        write_header(config, header_env)

    def wait_exported(self, timeout_s: float = 30.0) -> None:
        from llem.node.store import NodeStore
        from llem.paths import NodePaths

        config = self.config()
        deadline = time.monotonic() + timeout_s
        for node in NODES:
            expected = {job.job_id for job in JOBS if node in job.nodes}
            with NodeStore(NodePaths.of(config, node).store, readonly=True) as store:
                while expected - {
                    j for (j,) in store.query("SELECT job_id FROM jobs WHERE state = 'exported'")
                }:
                    if time.monotonic() > deadline:
                        raise LlemError(
                            f"jobs on {node} were not exported in {timeout_s} s; "
                            f"see {NodePaths.of(config, node).run / 'sampler.log'}"
                        )
                    self._wake(node)
                    time.sleep(0.1)

    def flush(self, timeout_s: float = 20.0) -> None:
        """Wait until every slice has left the outbox for the spool."""
        from llem.node.outbox import flush_outbox, pending_slices

        config = self.config()
        deadline = time.monotonic() + timeout_s
        while pending_slices(config):
            if time.monotonic() > deadline:
                raise LlemError(f"slices still wait in the outbox after {timeout_s} s")
            flush_outbox(config, timeout_s=2.0)
            time.sleep(0.05)

    def stop_samplers(self) -> None:
        from llem.node.daemon import sampler_pid
        from llem.paths import NodePaths

        config = self.config()
        for node in NODES:
            pid = sampler_pid(NodePaths.of(config, node))
            if pid and pid > 0:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def aggregate(self):
        from llem.cluster.aggregate import aggregate_once

        return aggregate_once(self.config())

    # -- the whole thing ---------------------------------------------------------------------

    def run(self) -> None:
        t0 = time.monotonic()
        self.write_config()
        self.say(
            f"llem demo in {self.base} (simulated cluster 'demo', nodes "
            f"{', '.join(NODES)}; every job runs as {self.user})"
        )
        self.start_samplers()
        self.say(
            "  node samplers started: they read what this machine has "
            "('llem doctor' says what that is)"
        )
        try:
            first, second = JOBS[:3], JOBS[3:]
            for job in first:
                self.start_job(job)
                self.say(
                    f"  job {job.job_id} {job.name:<12} {job.user:<6} on "
                    f"{','.join(job.nodes)} started"
                )
            for job in second:
                self.start_job(job)
                self.say(
                    f"  job {job.job_id} {job.name:<12} {job.user:<6} on "
                    f"{','.join(job.nodes)} started (windows 'prepare' and 'compute')"
                )
            for job in JOBS:
                self.end_job(job)
                self.say(f"  job {job.job_id} ended")
            self.wait_exported()
            self.flush()
            self.say("  samplers sealed and exported every job to the spool")
        finally:
            self.stop_samplers()
        result = self.aggregate()
        self.say(
            f"  llem aggregate merged {result.merged} slices: {result.jobs} jobs in "
            f"{self.base / 'ledger.db'} ({time.monotonic() - t0:.1f} s in all)"
        )


def default_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="llem-demo-"))


def clear(base: Path) -> None:
    if base.exists():
        shutil.rmtree(base)
