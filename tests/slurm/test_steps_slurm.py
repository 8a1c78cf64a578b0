"""Per-step energy (issue 19) on a real Slurm: a batch job with two ``srun`` steps on a node
with Slurm's cgroup plugins shows ``J.batch``, ``J.extern``, ``J.0`` and ``J.1`` in llem-acct,
each with its part of the job's energy by the CPU time of its own cgroup; ``-X`` hides them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from .llem_site import Site, burn

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=1,
        gpus_per_node=2,
        name="llemsteps",
        node_prefix="k",
        port_base=17600,
    )


def _acct(site, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", "llem.cli.acct", "-a", "-L", "-S", "now-1hours", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_srun_steps_show_with_their_energy(cluster, site):
    if not cluster.use_cgroups:
        pytest.skip("no cgroup v1 freezer here: Slurm runs without step cgroups")
    (node,) = cluster.nodes
    # step 0 burns a CPU for 3 s, step 1 for 1 s; the batch script only waits for them
    script = f"srun -n1 {burn(3)}; srun -n1 {burn(1)}; sleep 1"
    job = cluster.submit(["-w", node, "-n1", "--wrap", script], env=site.user_env)
    assert cluster.wait_job(job, timeout=90) == "COMPLETED"
    site.wait_sealed(node, job)
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    deadline = time.monotonic() + 40
    while True:
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = _acct(site, "-j", job, "-P", "-n", "-o", "JobID,JobName,ConsumedEnergyRaw,State")
        assert r.returncode == 0, r.stderr
        rows = [line.split("|") for line in r.stdout.splitlines()]
        if len(rows) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(r.stdout)
    ids = [row[0] for row in rows]
    assert ids == [job, f"{job}.batch", f"{job}.extern", f"{job}.0", f"{job}.1"], r.stdout
    energy = {row[0]: int(row[2]) for row in rows}
    steps = [energy[i] for i in ids[1:]]
    assert sum(steps) <= energy[job]
    # the burning steps hold most of the job's energy, the longer burn more than the shorter
    assert energy[f"{job}.0"] > energy[f"{job}.1"] > 0
    assert energy[f"{job}.0"] > 3 * energy[f"{job}.batch"]
    assert energy[f"{job}.0"] + energy[f"{job}.1"] > energy[job] / 2
    assert [row[1] for row in rows[1:]] == ["batch", "extern", "0", "1"]

    r = _acct(site, "-j", job, "-X", "-P", "-n", "-o", "JobID")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [job]
