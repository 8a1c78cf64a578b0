"""A node whose Slurm name has a dot (``d.rack1``), on a real local Slurm (issue 20).

Before, such a node was measured by the Prolog and the sampler, and then every export of it
was refused (slice file names are dot-separated): its jobs never reached the ledger.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from .harness import TEST_USER
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
        name="llemdot",
        node_prefix="d.rack",
        port_base=17350,
    )


def test_a_job_on_a_node_with_a_dot_is_measured_exported_and_merged(cluster, site):
    (node,) = cluster.nodes
    assert node == "d.rack1"
    job = cluster.submit(
        ["-w", node, "-J", "dotted", "--gres=gpu:1", "--wrap", burn(1.0)],
        user=TEST_USER,
        env=site.user_env,
    )
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    assert cluster.drained_nodes() == {}, cluster.logs()
    deadline = time.monotonic() + 30
    while True:
        row = site.wait_sealed(node, job)
        if row[1] == "exported" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert row[1] == "exported", row
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    deadline = time.monotonic() + 30
    while True:  # the header slice comes from the controller, a moment after the job
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        db = sqlite3.connect(f"file:{site.base / 'state' / 'ledger.db'}?mode=ro", uri=True)
        run = db.execute(
            "SELECT status, name, nodelist FROM job_runs WHERE job_id = ?", (job,)
        ).fetchone()
        nodes = db.execute(
            "SELECT node, energy_uj FROM job_nodes WHERE job_id = ?", (job,)
        ).fetchall()
        quarantined = db.execute("SELECT file, reason FROM quarantine").fetchall()
        db.close()
        if (run and run[1]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert quarantined == []
    assert run == ("complete", "dotted", node), run
    assert [n for n, _ in nodes] == [node] and nodes[0][1] > 0, nodes
