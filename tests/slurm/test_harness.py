"""The harness itself, on a real local Slurm: jobs run, Prolog/Epilog see what SLURM-LAB says."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .harness import REGISTRY_DIR, TEST_USER, TEST_USER2, SlurmCluster, _alive, _Registry

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]

# What the Prolog and Epilog get from slurmd 22.05 for every job (SLURM-LAB.md).
PROLOG_VARS = {
    "SLURM_JOB_ID",
    "SLURM_JOB_UID",
    "SLURM_JOB_GID",
    "SLURM_JOB_USER",
    "SLURM_JOB_PARTITION",
    "SLURM_CLUSTER_NAME",
    "SLURMD_NODENAME",
    "SLURM_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_JOB_CPUS_PER_NODE",
    "SLURM_JOB_WORK_DIR",
}


def _assert_healthy(cluster: SlurmCluster) -> None:
    assert cluster.drained_nodes() == {}, cluster.logs()


def test_batch_job_runs_as_the_test_user(slurm_cluster):
    job = slurm_cluster.submit(["--output=batch-%j.out", "--wrap", "/usr/bin/id -un"])
    assert slurm_cluster.wait_job(job) == "COMPLETED"
    out = (slurm_cluster.work_dir / f"batch-{job}.out").read_text()
    assert out.strip() == TEST_USER
    _assert_healthy(slurm_cluster)


def test_srun_job_runs_as_the_second_user(slurm_cluster):
    res = slurm_cluster.srun(["/usr/bin/id", "-un"], user=TEST_USER2)
    assert res.returncode == 0, res.output
    assert res.stdout.strip() == TEST_USER2
    _assert_healthy(slurm_cluster)


def test_multi_node_job_and_prolog_on_every_node(slurm_cluster):
    job = slurm_cluster.submit(
        ["-N2", "--output=multi-%j.out", "--wrap", "srun /usr/bin/printenv SLURMD_NODENAME"]
    )
    assert slurm_cluster.wait_job(job) == "COMPLETED"
    ran_on = sorted((slurm_cluster.work_dir / f"multi-{job}.out").read_text().split())
    assert len(ran_on) == 2 and len(set(ran_on)) == 2
    assert set(ran_on) <= set(slurm_cluster.nodes)

    prologs = slurm_cluster.env_dumps("prolog", job)
    epilogs = slurm_cluster.env_dumps("epilog", job)
    assert sorted(prologs) == ran_on  # PrologFlags=Alloc: every allocated node
    assert sorted(epilogs) == ran_on
    uid = str(pwd.getpwnam(TEST_USER).pw_uid)
    for node, env in {**prologs, **{f"epilog:{k}": v for k, v in epilogs.items()}}.items():
        missing = PROLOG_VARS - env.keys()
        assert not missing, f"{node}: {sorted(missing)}"
        assert env["SLURM_JOB_ID"] == job
        assert env["SLURM_JOB_USER"] == TEST_USER
        assert env["SLURM_JOB_NUM_NODES"] == "2"
        assert env["SLURM_CLUSTER_NAME"] == slurm_cluster.name
        assert "PATH" not in env  # scripts must use absolute paths
        assert env["SLURM_JOB_UID"] == uid
    assert {env["SLURMD_NODENAME"] for env in prologs.values()} == set(ran_on)
    _assert_healthy(slurm_cluster)


def test_two_gpu_jobs_on_one_node_get_different_gpus(slurm_cluster):
    node = slurm_cluster.nodes[0]
    jobs = [
        slurm_cluster.submit(
            [
                f"--nodelist={node}",
                "--gres=gpu:1",
                "--output=gpu-%j.out",
                "--wrap",
                "/usr/bin/printenv SLURM_JOB_GPUS; /bin/sleep 1",
            ]
        )
        for _ in range(2)
    ]
    for job in jobs:
        assert slurm_cluster.wait_job(job) == "COMPLETED"
    gpus = [slurm_cluster.env_dumps("prolog", job)[node]["SLURM_JOB_GPUS"] for job in jobs]
    assert sorted(gpus) == ["0", "1"]
    in_job = [(slurm_cluster.work_dir / f"gpu-{job}.out").read_text().strip() for job in jobs]
    assert in_job == gpus
    _assert_healthy(slurm_cluster)


def test_factory_cluster_with_its_own_prolog(slurm_cluster_factory):
    cluster = slurm_cluster_factory(nodes=2, start=False)
    cluster.prepare()
    marker = cluster.dumps_dir
    cluster.prolog = cluster.write_script(
        "prolog.sh",
        f'#!/bin/sh\n/usr/bin/touch "{marker}/ran.$SLURMD_NODENAME.$SLURM_JOB_ID"\nexit 0\n',
    )
    cluster.start()
    assert cluster.startup_s is not None and cluster.startup_s < 10
    job = cluster.submit(["-N2", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert sorted(p.name for p in marker.glob("ran.*")) == [f"ran.{n}.{job}" for n in cluster.nodes]
    _assert_healthy(cluster)


def test_epilog_slurmctld_sees_job_name_and_nodelist(slurm_cluster_factory):
    cluster = slurm_cluster_factory(nodes=2, start=False)
    cluster.epilog_slurmctld = cluster.write_env_dump_script("epilog-ctld")
    cluster.start()
    job = cluster.submit(["-N2", "--job-name=train-42", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    deadline = time.monotonic() + 10  # runs on the controller, after the job's end
    while not cluster.env_dumps("epilog-ctld", job) and time.monotonic() < deadline:
        time.sleep(0.1)
    env = cluster.env_dumps("epilog-ctld", job)["ctld"]
    assert env["SLURM_JOB_NAME"] == "train-42"
    assert env["SLURM_JOB_NODELIST"] == f"{cluster.node_prefix}[1-2]"
    assert env["SLURM_JOB_USER"] == TEST_USER


def test_extra_conf_and_env_reach_slurm(slurm_cluster_factory):
    cluster = slurm_cluster_factory(
        nodes=1, extra_conf=["KillWait=7"], env={"LLEM_HARNESS_PROBE": "from-harness"}
    )
    config = cluster.run(["scontrol", "show", "config"]).stdout
    assert any(line.split() == ["KillWait", "=", "7", "sec"] for line in config.splitlines())
    res = cluster.srun(["/usr/bin/printenv", "LLEM_HARNESS_PROBE"])
    assert res.stdout.strip() == "from-harness", res.output


def test_cluster_without_cgroups(slurm_cluster_factory):
    """The proctrack/linuxproc fallback for hosts without the cgroup v1 freezer."""
    cluster = slurm_cluster_factory(nodes=2, gpus_per_node=1, use_cgroups=False)
    config = cluster.run(["scontrol", "show", "config"]).stdout
    assert "proctrack/linuxproc" in config
    res = cluster.srun(["-N2", "--gres=gpu:1", "/usr/bin/printenv", "CUDA_VISIBLE_DEVICES"])
    assert res.returncode == 0, res.output
    assert res.stdout.split() == ["0", "0"]
    _assert_healthy(cluster)


def test_a_failing_prolog_drains_the_node_and_the_harness_sees_it(slurm_cluster_factory):
    """The "no node drained" assertion used everywhere can fail."""
    cluster = slurm_cluster_factory(nodes=1, start=False)
    cluster.prolog = cluster.write_script("prolog.sh", "#!/bin/sh\nexit 1\n")
    cluster.start()
    cluster.submit(["--wrap", "/bin/true"])
    deadline = time.monotonic() + 20
    while not cluster.drained_nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    drained = cluster.drained_nodes()
    assert list(drained) == cluster.nodes, cluster.logs()
    assert "prolog" in drained[cluster.nodes[0]].lower()


def test_a_crashed_run_leaves_nothing_behind(slurm_available, tmp_path):
    """Daemons of a killed test process are stopped by the next cluster start."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                sys.path.insert(0, {str(Path(__file__).parent)!r})
                from harness import SlurmCluster
                c = SlurmCluster(nodes=1, name="llemcrash", node_prefix="c", port_base=17900)
                c.start()
                print(" ".join(str(p.pid) for p in c._daemons.values()), flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    entries = list(REGISTRY_DIR.glob("llem-slurm-llemcrash-*.json"))
    assert len(entries) == 1

    with SlurmCluster(nodes=1, name="llemafter", node_prefix="a", port_base=17950):
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
        assert not entries[0].exists()


def test_unregistered_harness_daemons_are_stopped_too(slurm_available):
    """A daemon whose registry entry got lost (killed between spawn and write) still goes."""
    c = SlurmCluster(nodes=1, name="llemlost", node_prefix="l", port_base=17800).start()
    pids = [p.pid for p in c._daemons.values()]
    try:
        _Registry.remove(c.base_dir.name)
        _Registry.reap_stale()
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            for proc in c._daemons.values():
                proc.poll()  # our children: reap them, or they linger as zombies
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        c.stop()


@pytest.fixture
def _skip_when_probing():
    # Skips in setup, as slurm_available does where Slurm is missing.
    if os.environ.get("LLEM_HARNESS_SKIP_PROBE") == "1":
        pytest.skip("probe skip")


def test_skip_probe(_skip_when_probing):
    """Passes on its own; skips only when run by the test below."""


def test_ci_turns_a_skipped_slurm_test_into_a_failure():
    def run_probe(ci: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["LLEM_HARNESS_SKIP_PROBE"] = "1"
        if ci is not None:
            env["CI"] = ci
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"{Path(__file__).relative_to(REPO)}::test_skip_probe",
            ],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    in_ci = run_probe("true")
    assert in_ci.returncode == 1, in_ci.stdout + in_ci.stderr
    assert "1 error" in in_ci.stdout  # the skip happened in setup, so it is an error
    assert "skipped with CI=true" in in_ci.stdout

    outside_ci = run_probe(None)
    assert outside_ci.returncode == 0, outside_ci.stdout + outside_ci.stderr
    assert "1 skipped" in outside_ci.stdout
