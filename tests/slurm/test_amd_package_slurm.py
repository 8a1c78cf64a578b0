"""A real Slurm node with one fake MI250X (two dies seen as two GPUs; only the first reports,
for the whole package, as the real one does): a job on either die is charged half the
package, never 0 J, and flagged ``gpu_package_split`` through the Epilog's export into
``llem-acct``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .llem_site import burn
from .meter_site import MeterSite, mi250x

pytestmark = pytest.mark.slurm

PACKAGE_W = 400.0  # what the reporting die's counter says: the whole MI250X


@pytest.fixture(scope="module")
def site():
    s = MeterSite(watts=(PACKAGE_W, 0.0), make=mi250x)
    s.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=1,
        gpus_per_node=2,
        name="llemmi250",
        node_prefix="x",
        port_base=17450,
    )


def test_each_die_is_charged_half_its_package_never_0_j(cluster, site):
    node = cluster.nodes[0]
    jobs = [
        cluster.submit(["-w", node, "-n1", "--gres=gpu:1", "--wrap", burn(4)], env=site.user_env)
        for _ in range(2)
    ]
    for job in jobs:
        assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.logs()
    rows = [site.wait_sealed(node, job) for job in jobs]
    db = site.store(node)
    try:
        devices = {
            key: json.loads(attrs)
            for key, attrs in db.execute("SELECT key, attrs FROM devices WHERE component = 'gpu'")
        }
        assert len(devices) == 2
        for attrs in devices.values():
            split = attrs["package_split"]
            assert split["share"] == "1/2" and split["reporting"] == ["0000:c1:00.0"]
        minors = set()
        for run_id, _, _, flags, *_ in rows:
            assert "gpu_package_split" in json.loads(flags)
            ((key, energy_uj, span_ns),) = db.execute(
                "SELECT j.device_key, SUM(j.energy_uj), SUM(iv.end_ns - iv.start_ns) "
                "FROM job_energy j JOIN devices d ON d.key = j.device_key JOIN intervals iv "
                "ON iv.id = j.interval_id WHERE j.run_id = ? AND d.component = 'gpu' "
                "GROUP BY j.device_key",
                (run_id,),
            ).fetchall()
            minors.add(devices[key]["minor"])
            # Half the package whichever die: the silent die's job is not charged 0 J.
            assert energy_uj / span_ns * 1e3 == pytest.approx(PACKAGE_W / 2, rel=0.3)
        assert minors == {0, 1}
    finally:
        db.close()
    for job in jobs:
        deadline = time.monotonic() + 30
        while site.wait_sealed(node, job)[1] != "exported" and time.monotonic() < deadline:
            time.sleep(0.2)
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "acct", "-j", ",".join(jobs), "-X", "-M", "all"]
            + ["--json", "-o", "JobID,GPUEnergy,Elapsed"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        got = {j["JobID"]: j for j in json.loads(r.stdout)["jobs"]}
        if set(got) == set(jobs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(got) == set(jobs), r.stdout
    for job in jobs:
        assert got[job]["GPUEnergy"] > 0
