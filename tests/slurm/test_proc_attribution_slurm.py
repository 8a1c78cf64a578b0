"""Attribution without job cgroups (``proctrack/linuxproc``) on a real Slurm: the attack of
issue 20 item 4 replayed with real slurmstepd processes.

Bob starts ``env SLURM_JOB_ID=<Alice's job> busy-loop`` on Alice's node, outside any job.
Alice's job sleeps; Carol's (here: Alice's second) job burns one CPU for comparison. The
sampler must credit the busy loop to no job, and flag both jobs ``proc_tree``.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from .harness import TEST_USER, TEST_USER2
from .llem_site import SYSTEM_PYTHON, Site, burn

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    c = slurm_module_cluster_factory(
        nodes=1,
        gpus_per_node=1,
        name="llemproc",
        node_prefix="p",
        port_base=17650,
        start=False,
        use_cgroups=False,
    )
    site.install_hooks(c, ("prolog", "epilog"))
    c.start()
    return c


def cpu_energy(site, node, run_id) -> int:
    db = site.store(node)
    try:
        return db.execute(
            "SELECT COALESCE(SUM(j.energy_uj), 0) FROM job_energy j JOIN devices d "
            "ON d.key = j.device_key WHERE j.run_id = ? AND d.component = 'cpu' "
            "AND j.method = 'cpu_time'",  # its use; the static part goes by allocation
            (run_id,),
        ).fetchone()[0]
    finally:
        db.close()


def test_a_forged_slurm_job_id_is_not_billed_to_the_job(cluster, site):
    node = cluster.nodes[0]
    env = site.user_env
    idle = cluster.submit(["-w", node, "-n1", "--wrap", "sleep 8"], user=TEST_USER, env=env)
    busy = cluster.submit(["-w", node, "-n1", "--wrap", burn(6)], user=TEST_USER, env=env)
    deadline = time.monotonic() + 30
    while cluster.job_info(idle).get("JobState") != "RUNNING":
        assert time.monotonic() < deadline, cluster.job_info(idle)
        time.sleep(0.2)
    # Bob's busy loop, outside any job, claiming to be Alice's sleeping job.
    loop = "import time; t = time.time() + 6; any(iter(lambda: time.time() > t, True))"
    attack = subprocess.Popen(
        [
            "runuser",
            "-u",
            TEST_USER2,
            "--",
            "env",
            f"SLURM_JOB_ID={idle}",
            SYSTEM_PYTHON,
            "-c",
            loop,
        ]
    )
    # And a process of Bob's that calls itself Alice's slurmstepd, with a busy child.
    spawn = f"import subprocess; subprocess.call([{SYSTEM_PYTHON!r}, '-c', {loop!r}])"
    forged = subprocess.Popen(
        [
            "runuser",
            "-u",
            TEST_USER2,
            "--",
            "bash",
            "-c",
            f'exec -a "$0" {SYSTEM_PYTHON} -c "$1"',
            f"slurmstepd: [{idle}.0]",
            spawn,
        ]
    )
    try:
        assert cluster.wait_job(idle, timeout=60) == "COMPLETED"
        assert cluster.wait_job(busy, timeout=60) == "COMPLETED"
    finally:
        attack.wait(timeout=30)
        forged.wait(timeout=30)
    i = site.wait_sealed(node, idle)
    b = site.wait_sealed(node, busy)
    e_idle, e_busy = cpu_energy(site, node, i[0]), cpu_energy(site, node, b[0])
    # The honest job's one busy CPU is credited; the sleeping job gets next to nothing,
    # though two busy loops claimed to be it.
    assert e_busy > 0
    assert e_idle < e_busy / 5, (e_idle, e_busy)
    for row in (i, b):
        assert "proc_tree" in json.loads(row[3]), row
