"""GPU identity on a real Slurm (issue 13): Slurm's GPU index -> device keys, end to end.

The node's two fake GPU files are swapped: ``nvidia0`` is the character device 195:1 and
``nvidia1`` is 195:0, so Slurm's index (the order of the GRES records) is not the minor
number. The fake NVML GPU of minor 0 draws 300 W and that of minor 1 40 W.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from .harness import TEST_USER
from .llem_site import Site

pytestmark = pytest.mark.slurm

GPU_W = (300.0, 40.0)  # by minor number


@pytest.fixture(scope="module")
def site():
    s = Site(gpu_w=GPU_W)
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=1,
        gpus_per_node=2,
        gpu_minors=(1, 0),
        name="llemgpu",
        node_prefix="g",
        port_base=17500,
    )


def run_job(cluster, site, args):
    job = cluster.submit(args, user=TEST_USER, env=site.user_env)
    assert cluster.wait_job(job, timeout=60) == "COMPLETED", cluster.logs()
    return job


def gpu_power_w(site, node, run_id):
    """Average power of each GPU charged to the run, by device key."""
    db = site.store(node)
    try:
        return {
            key: uj / ns * 1e3
            for key, uj, ns in db.execute(
                "SELECT j.device_key, SUM(j.energy_uj), SUM(iv.end_ns - iv.start_ns) "
                "FROM job_energy j JOIN devices d ON d.key = j.device_key "
                "JOIN intervals iv ON iv.id = j.interval_id "
                "WHERE j.run_id = ? AND d.component = 'gpu' GROUP BY j.device_key",
                (run_id,),
            )
        }
    finally:
        db.close()


def test_slurm_index_zero_is_the_gpu_its_gres_record_names(cluster, site):
    """SLURM_JOB_GPUS=0 is nvidia0, minor 1 (40 W), not minor 0 (300 W)."""
    node = cluster.nodes[0]
    job = run_job(cluster, site, ["-w", node, "--gres=gpu:1", "--wrap", "sleep 2"])
    run_id, _, _, flags, gpus = site.wait_sealed(node, job)[:5]
    assert json.loads(gpus) == ["nvml:GPU-llemtest-1"]
    assert "gpu_index_assumed_minor" not in json.loads(flags)
    power = gpu_power_w(site, node, run_id)
    assert list(power) == ["nvml:GPU-llemtest-1"]
    assert power["nvml:GPU-llemtest-1"] == pytest.approx(40.0, rel=0.3)


def aggregate(site):
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "aggregate", "--once", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_report_waste_on_a_ledger_built_by_prolog_sampler_epilog(cluster, site, tmp_path):
    """The issue's repro: one job, a 300 W and a 40 W GPU. The report must call the 40 W
    one idle (and only it), with its energy as idle energy."""
    from llem.cluster import report_queries as rq
    from llem.cluster.ledger import Ledger

    node = cluster.nodes[0]
    job = run_job(cluster, site, ["-w", node, "--gres=gpu:2", "--wrap", "sleep 4"])
    deadline = time.monotonic() + 30
    while site.wait_sealed(node, job)[1] != "exported" and time.monotonic() < deadline:
        time.sleep(0.2)
    ledger_path = site.state_dir / "ledger.db"
    deadline = time.monotonic() + 30
    while True:
        aggregate(site)
        db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
        row = db.execute(
            "SELECT n.gpus, n.start_ns, n.end_ns FROM job_nodes n WHERE n.job_id = ?", (job,)
        ).fetchone()
        db.close()
        if row or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert row, f"job {job} not in the ledger"
    assert sorted(json.loads(row[0])) == ["nvml:GPU-llemtest-0", "nvml:GPU-llemtest-1"]
    span_s = (row[2] - row[1]) / 1e9
    with Ledger(ledger_path, readonly=True) as ledger:
        idle = {r[0]: r for r in rq.idle_gpus(ledger, 0, 2**62, 100.0)}
    ours = [r for r in idle.values() if r[2] == 2]
    assert len(ours) == 1, idle
    _, n_idle, allocated, idle_uj, idle_s, unresolved = ours[0]
    assert (n_idle, allocated, unresolved) == (1, 2, 0)
    assert idle_uj / 1e6 == pytest.approx(40.0 * span_s, rel=0.3)
    assert idle_s == pytest.approx(span_s, rel=0.01)
    # and through `llem report` itself
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    out = tmp_path / "rep"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llem.cli.main",
            "report",
            "monthly",
            "--since",
            "2000-01-01",
            "--until",
            "2100-01-01",
            "--format",
            "json",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(next(out.glob("*.json")).read_text())
    rows = [r for recs in data["waste"].values() for r in recs if r.get("job_id") == job]
    assert rows, data["waste"]
    assert (rows[0]["idle_gpus"], rows[0]["allocated_gpus"]) == (1, 2)
    assert rows[0]["idle_kwh"] * 3.6e6 == pytest.approx(40.0 * span_s, rel=0.3)
    assert data["totals"]["idle_kwh"] > 0 and data["totals"]["unresolved_gpus"] == 0
