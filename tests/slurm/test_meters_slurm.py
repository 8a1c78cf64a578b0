"""A real Slurm node with fake AMD GPUs (the real amdsmi package loading the tests' fake
libamd_smi.so) and an HPE Cray EX pm_counters node meter: jobs are charged their own GPUs'
energy and a share of the platform residual, and jobs + remainder = node holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .llem_site import burn
from .meter_site import MeterSite

pytestmark = pytest.mark.slurm

AMD_W = (120.0, 280.0)  # GPU minor 0 (renderD128), minor 1


@pytest.fixture(scope="module")
def site():
    s = MeterSite(watts=AMD_W)
    s.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=1,
        gpus_per_node=2,
        name="llemmeters",
        node_prefix="m",
        port_base=17400,
    )


def test_jobs_on_amd_gpus_get_their_own_gpu_and_a_platform_share(cluster, site):
    node = cluster.nodes[0]
    env = site.user_env
    jobs = [
        cluster.submit(["-w", node, "-n1", "--gres=gpu:1", "--wrap", burn(4)], env=env)
        for _ in range(2)
    ]
    for job in jobs:
        assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.logs()
    assert cluster.drained_nodes() == {}
    rows = [site.wait_sealed(node, job) for job in jobs]
    db = site.store(node)
    try:
        devices = {
            key: (component, sensor, json.loads(attrs))
            for key, component, sensor, attrs in db.execute(
                "SELECT key, component, sensor, attrs FROM devices"
            )
        }
        sensors = {key: sensor for key, (_, sensor, _) in devices.items()}
        assert sorted(k for k, (c, _, _) in devices.items() if c == "gpu") == [
            "amdsmi:5bff74bf-0000-1000-80ba-000000000000",
            "amdsmi:5bff74bf-0000-1000-80ba-000000000001",
        ]
        assert "pm_counters:accel0" not in sensors  # one source per GPU: amdsmi's
        assert devices["platform:node"][0] == "platform"
        minors = set()
        for run_id, *_, gpus_json, _, _ in rows:
            (stored,) = json.loads(gpus_json)  # a device key: the sampler resolved the index
            gpu = db.execute(
                "SELECT d.key, SUM(j.energy_uj), SUM(iv.end_ns - iv.start_ns) FROM job_energy j "
                "JOIN devices d ON d.key = j.device_key JOIN intervals iv ON iv.id = "
                "j.interval_id WHERE j.run_id = ? AND d.component = 'gpu' GROUP BY d.key",
                (run_id,),
            ).fetchall()
            assert len(gpu) == 1, gpu  # its own GPU only
            key, energy_uj, span_ns = gpu[0]
            assert key == stored  # the job names its GPU the way its energy rows do
            minor = devices[key][2]["minor"]
            minors.add(str(minor))
            assert energy_uj / span_ns * 1e3 == pytest.approx(AMD_W[int(minor)], rel=0.3)
            platform = db.execute(
                "SELECT SUM(energy_uj), MIN(method) FROM job_energy WHERE run_id = ? AND "
                "device_key = 'platform:node'",
                (run_id,),
            ).fetchone()
            assert platform[0] and platform[0] > 0 and platform[1] == "platform_allocation"
        assert minors == {"0", "1"}
        # Platform = meter - cpu - memory - GPUs (amdsmi), about 900-200-60-400 = 240 W.
        meter, plat = (
            db.execute(
                "SELECT SUM(energy_uj) FROM energy WHERE device_key = ? AND kind = 'ok'", (k,)
            ).fetchone()[0]
            for k in ("pm_counters:node", "platform:node")
        )
        assert meter > 0 and 0 < plat < meter
        bad = db.execute(
            "SELECT e.interval_id, e.device_key, e.energy_uj, "
            "COALESCE((SELECT SUM(energy_uj) FROM job_energy j WHERE j.interval_id = e.interval_id"
            " AND j.device_key = e.device_key), 0) + COALESCE((SELECT SUM(energy_uj) FROM remainder r"
            " WHERE r.interval_id = e.interval_id AND r.device_key = e.device_key), 0) AS parts "
            "FROM energy e WHERE e.energy_uj != parts"
        ).fetchall()
        assert bad == []
        platform_by_job = {
            job: db.execute(
                "SELECT SUM(energy_uj) FROM job_energy WHERE run_id = ? AND device_key = "
                "'platform:node'",
                (row[0],),
            ).fetchone()[0]
            for job, row in zip(jobs, rows)
        }
    finally:
        db.close()
    # Through the Epilog's export, `llem aggregate` and `llem-acct`: PlatformEnergy.
    for job in jobs:
        deadline = time.monotonic() + 30
        while site.wait_sealed(node, job)[1] != "exported" and time.monotonic() < deadline:
            time.sleep(0.2)
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    deadline = time.monotonic() + 30
    while True:  # the header slice comes from the controller, a moment after the job
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "llem.cli.main",
                "acct",
                "-j",
                ",".join(jobs),
                "-X",
                "-L",
                "--json",
                "-o",
                "JobID,PlatformEnergy,GPUEnergy",
            ],
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
        assert got[job]["PlatformEnergy"] == pytest.approx(platform_by_job[job] / 1e6, abs=1)
        assert got[job]["GPUEnergy"] > 0
