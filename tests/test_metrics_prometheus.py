"""Node metrics end to end: the real node sampler (started by `llem prolog`, fake powercap
tree) writes the textfile, Debian's real node_exporter serves it and the real Prometheus
scrapes it on the loopback; what Prometheus answers must be what the node store holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llem import config as config_mod
from llem.node.daemon import sampler_pid
from llem.node.metrics import textfile_name
from llem.node.store import NodeStore
from llem.paths import NodePaths
from tests.powercap import FakePowercap
from tests.promstack import Stack, promtool_check_metrics, stop, wait_for

NODE = "m1"
JOB = "4242"
STEPD = (
    "import signal, subprocess, sys\np = subprocess.Popen(sys.argv[1:])\n"
    "signal.signal(signal.SIGTERM, lambda *_: (p.terminate(), p.wait(), sys.exit(0)))\n"
    "sys.exit(p.wait())"
)
"""A parent process that stands for the job's slurmstepd and ends its child with itself."""
INTERVAL_S = 1.0


def _env(tmp_path: Path, powercap: FakePowercap, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLEM_", "SLURM_", "SPANK_", "SLURMD_"))
    }
    env.update(
        LLEM_CONFIG=str(tmp_path / "llem.yaml"),
        LLEM_POWERCAP_ROOT=str(powercap.path),
        SLURMD_NODENAME=NODE,
        SLURM_JOB_ID=JOB,
        SLURM_JOB_UID=str(os.getuid()),
        SLURM_JOB_USER="alice",
        SLURM_JOB_ACCOUNT="physics",
        SLURM_JOB_PARTITION="cpu",
        SLURM_CLUSTER_NAME="test",
    )
    env.update(extra)
    return env


def _hook(kind: str, env: dict[str, str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


class Load:
    """Advances the fake RAPL counters (about 50 W package, 5 W DRAM) until stopped."""

    def __init__(self, powercap: FakePowercap) -> None:
        self.powercap = powercap
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.1):
            self.powercap.advance("intel-rapl:0", 5_000_000)
            self.powercap.advance("intel-rapl:0:1", 500_000)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def _cumulative(store: NodeStore, sql: str, params: tuple) -> list[tuple[int, int]]:
    """(interval end_ns, running total in uJ) over the store's intervals, in order."""
    out, total = [], 0
    for end_ns, uj in store.query(sql, params):
        total += uj
        out.append((end_ns, total))
    return out


def _check_within_one_interval(sample: list, history: list[tuple[int, int]], what: str) -> None:
    """Prometheus's value is the store's total as of an interval at most one interval old."""
    scrape_s, value = float(sample[0]), float(sample[1])
    matches = [end_ns for end_ns, uj in history if abs(uj / 1e6 - value) < 1e-6]
    assert matches, f"{what}: Prometheus has {value} J, never a total of the node store"
    matched_end_s = max(matches) / 1e9
    later = [end for end, _ in history if matched_end_s < end / 1e9 <= scrape_s]
    assert len(later) <= 1, (
        f"{what}: Prometheus's value is {len(later)} intervals behind the "
        "node store at the time of the scrape"
    )


@pytest.fixture
def node(tmp_path):
    powercap = FakePowercap(tmp_path / "powercap")
    powercap.add_zone("0", "package-0", 1_000_000_000)
    powercap.add_zone("0:1", "dram", 100_000_000)
    textfiles = tmp_path / "textfile"
    textfiles.mkdir(mode=0o755)
    (tmp_path / "llem.yaml").write_text(
        f"cluster: test\nstate_dir: {tmp_path / 'state'}\nrun_dir: {tmp_path / 'run'}\n"
        f"spool_dir: {tmp_path / 'spool'}\nsensors: [rapl]\n"
        f"sampler:\n  interval_s: {INTERVAL_S}\n  linger_s: 600\n  nice: 0\n"
        f"metrics:\n  textfile_dir: {textfiles}\n"
    )
    env = _env(tmp_path, powercap)
    paths = NodePaths.of(config_mod.load(env=env), NODE)
    burner = None
    try:
        with Load(powercap):
            _hook("prolog", env)
            # A process of the job, under a stand-in for its slurmstepd (without cgroups, the
            # job's processes are the tree under it: docs/security.md): the job gets a share
            # of the package by its CPU time.
            burner = subprocess.Popen(
                [
                    f"slurmstepd: [{JOB}.batch]",
                    "-c",
                    STEPD,
                    sys.executable,
                    "-c",
                    "import time\nt=time.time()+60\nwhile time.time()<t: pass",
                ],
                executable=sys.executable,
                env=env,
            )
            yield env, paths, textfiles / textfile_name(NODE)
    finally:
        if burner is not None:
            stop(burner)
        pid = sampler_pid(paths)
        if pid and pid > 0:
            os.kill(pid, signal.SIGTERM)
            wait_for("the node sampler to exit", lambda: sampler_pid(paths) is None, 10)


def test_prometheus_sees_the_node_store(node, tmp_path):
    env, paths, textfile = node
    wait_for(
        "the textfile with the job",
        lambda: textfile.exists() and f'jobid="{JOB}"' in textfile.read_text(),
        20,
    )
    lint = promtool_check_metrics(textfile.read_text())
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint

    with Stack(tmp_path / "textfile", tmp_path / "prom") as stack:
        job_q = f'llem_job_energy_joules_total{{node="{NODE}",jobid="{JOB}",component="cpu"}}'
        job = wait_for(
            "the job's CPU energy in Prometheus",
            lambda: [r for r in stack.query(job_q) if float(r["value"][1]) > 0],
            30,
        )
        nodes = stack.query(f'llem_node_energy_joules_total{{node="{NODE}"}}')
        info = stack.query(f'llem_job_info{{jobid="{JOB}"}}')
        age = stack.query(f'time() - llem_sampler_last_tick_timestamp_seconds{{node="{NODE}"}}')

        with NodeStore(paths.store, readonly=True) as store:
            for series in nodes:
                key = series["metric"]["device"]
                history = _cumulative(
                    store,
                    "SELECT i.end_ns, e.energy_uj FROM energy e JOIN intervals i "
                    "ON i.id = e.interval_id WHERE e.device_key = ? ORDER BY i.id",
                    (key,),
                )
                _check_within_one_interval(series["value"], history, key)
            run_id = store.query("SELECT run_id FROM jobs WHERE job_id = ?", (JOB,))[0][0]
            history = _cumulative(
                store,
                "SELECT i.end_ns, SUM(j.energy_uj) FROM job_energy j JOIN intervals i "
                "ON i.id = j.interval_id JOIN devices d ON d.key = j.device_key "
                "WHERE j.run_id = ? AND d.component = 'cpu' GROUP BY i.id ORDER BY i.id",
                (run_id,),
            )
            _check_within_one_interval(job[0]["value"], history, "job cpu")
        assert {s["metric"]["component"] for s in nodes} == {"cpu", "dram"}
        assert all(s["metric"]["source"] == "measured" for s in nodes)
        assert info and info[0]["metric"]["account"] == "physics"
        assert info[0]["metric"]["user"] == "alice"
        assert 0 <= float(age[0]["value"][1]) < 3 * INTERVAL_S + 2
        # node_exporter read the file without complaint (it also refuses timestamps).
        assert stack.query("node_textfile_scrape_error")[0]["value"][1] == "0"

        # The Epilog ends the job: its series leave the file, and Prometheus marks them stale.
        _hook("epilog", env)
        wait_for(
            "the job's series to go",
            lambda: not stack.query(job_q) and not stack.query(f'llem_job_info{{jobid="{JOB}"}}'),
            20,
        )
        assert stack.query(f'llem_node_running_jobs{{node="{NODE}"}}')[0]["value"][1] == "0"
        assert stack.query(f'llem_node_energy_joules_total{{node="{NODE}"}}')
