"""The Python API inside real Slurm jobs (issue 18): a job's ``llem.window`` windows, with
their work, go through the node sampler's socket, reach the ledger, and ``llem-acct`` shows
them with their energy per unit; two ranks' overlapping windows count the energy once;
``llem job`` shows the job with its power timeline to its owner and to no one else."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from .harness import TEST_USER, TEST_USER2
from .llem_site import SYSTEM_PYTHON, Site

pytestmark = pytest.mark.slurm

PROGRAM = """
import json, os, sys, time
import llem

out = sys.argv[1]
if sys.argv[2] == "single":
    with llem.window("train", unit="tokens") as w:
        t = time.time() + 2.0
        while time.time() < t:
            pass
        w.add(4096)
    with llem.window("eval"):
        time.sleep(1.0)
    name = "train"
else:
    with llem.window("ranks", unit="samples") as w:
        time.sleep(2.0)
        w.add(100)
    name = "rank" + os.environ["SLURM_PROCID"]
with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(w.result.to_dict(), f)
"""


@pytest.fixture(scope="module")
def site():
    s = Site()
    # The job's owner reads the ledger file here (privacy: none, as before issue 15); the
    # private ledger and llem job through the gateway are tested in tests/test_gateway.py.
    s.config.write_text(s.config.read_text() + "privacy: none\n")
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=1,
        gpus_per_node=2,
        name="llemapi",
        node_prefix="w",
        port_base=17700,
    )


def aggregate(site, job: str) -> None:
    """``llem aggregate --once`` until the job's run has its header (from the controller)."""
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    deadline = time.monotonic() + 30
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
        db = sqlite3.connect(f"file:{site.base / 'state' / 'ledger.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT name FROM job_runs WHERE job_id = ?", (job,)).fetchone()
        finally:
            db.close()
        if (row and row[0]) or time.monotonic() > deadline:
            return
        time.sleep(1)


def test_python_windows_reach_acct_with_work_and_llem_job_shows_the_timeline(cluster, site):
    node = cluster.nodes[0]
    program = site.base / "program.py"
    program.write_text(PROGRAM)
    program.chmod(0o644)
    out = site.out
    script = f"""#!/bin/bash
#SBATCH -w {node}
#SBATCH -n 2
#SBATCH --gres=gpu:1
#SBATCH -J api-job
{SYSTEM_PYTHON} {program} {out} single
srun -n2 {SYSTEM_PYTHON} {program} {out} ranks
"""
    job = cluster.submit([], user=TEST_USER, script=script, env=site.user_env)
    state = cluster.wait_job(job, timeout=90)
    assert state == "COMPLETED", cluster.logs()
    train = json.loads((out / "train.json").read_text())
    assert train["scope"] == "job" and train["window_id"] > 0, train["notes"]
    assert train["work"] == 4096 and train["unit"] == "tokens"
    assert train["energy_j"] > 0
    assert train["energy_per_unit_j"] == pytest.approx(train["energy_j"] / 4096)
    assert train["gpu_energy_per_unit_j"] is not None  # the job's fake GPU
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert all(r["scope"] == "job" and r["work"] == 100 for r in ranks)

    deadline = time.monotonic() + 30
    while site.wait_sealed(node, job)[1] != "exported" and time.monotonic() < deadline:
        time.sleep(0.2)
    aggregate(site, job)
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    acct = subprocess.run(
        [sys.executable, "-m", "llem.cli.acct", "-M", cluster.name, "-j", job, "-P", "-o",
         "JobID,JobName,Work,WorkUnit,EnergyPerWork,GPUEnergyPerWork,WorkBasis,ConsumedEnergyRaw"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert acct.returncode == 0, acct.stderr
    rows = {line.split("|")[0]: line.split("|") for line in acct.stdout.splitlines()[1:]}
    assert f"{job}.train" in rows, acct.stdout + acct.stderr
    assert rows[f"{job}.train"][2:4] == ["4096", "tokens"], acct.stdout
    assert float(rows[f"{job}.train"][4]) == pytest.approx(train["energy_per_unit_j"], rel=1e-3)
    assert rows[f"{job}.train"][6] in ("attributed", "measured")
    assert rows[f"{job}.eval"][2] == ""  # a window without work has no per-unit figure
    # The two ranks' overlapping windows: their work added, the job's energy counted once.
    ranks_row = rows[f"{job}.ranks"]
    assert ranks_row[2:4] == ["200", "samples"], acct.stdout
    assert float(ranks_row[7]) < sum(r["energy_j"] for r in ranks) * 0.9
    assert float(ranks_row[7]) >= max(r["energy_j"] for r in ranks) * 0.9

    # The ledger shares its folder with the node stores here (0700, root's); on a real site
    # it lives in a folder users may traverse (docs/ledger.md, Permissions).
    site.state_dir.chmod(0o711)
    view = cluster.run(
        [SYSTEM_PYTHON, "-m", "llem.cli.main", "job", job, "--json"],
        user=TEST_USER,
        env=site.user_env,
    )
    assert view.returncode == 0, view.stderr
    data = json.loads(view.stdout)
    assert data["name"] == "api-job" and data["energy_j"] > 0
    assert data["timeline"]["step_s"] == 60 and data["timeline"]["watts"]
    assert data["timeline"]["gpu_watts"]
    windows = {w["name"]: w for w in data["windows"]}
    assert windows["train"]["work"] == 4096 and windows["train"]["energy_per_unit_j"] > 0
    assert data["co2e_g"] > 0 and data["carbon"]["region"] == "FR"
    text = cluster.run(
        [SYSTEM_PYTHON, "-m", "llem.cli.main", "job", job], user=TEST_USER, env=site.user_env
    )
    assert text.returncode == 0, text.stderr
    assert any(line.strip().startswith("power ") for line in text.stdout.splitlines())
    assert "train:" in text.stdout and "4,096 tokens" in text.stdout
    other = cluster.run(
        [SYSTEM_PYTHON, "-m", "llem.cli.main", "job", job], user=TEST_USER2, env=site.user_env
    )
    assert other.returncode == 1 and "llem job shows a user their own jobs" in other.stderr
