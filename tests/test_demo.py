"""`llem demo`: the whole pipeline on this machine, without Slurm or root."""

import sqlite3
import subprocess
import sys


def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    base = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "demo", "--dir", str(base)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merged" in r.stdout and "Next, try:" in r.stdout
    # shown with llem-acct: totals per user, then every job and its windows
    assert "NJobs" in r.stdout and "104.compute" in r.stdout and "CO2e: grid intensity" in r.stdout
    db = sqlite3.connect(base / "ledger.db")
    runs = {
        row[0]: row[1:]
        for row in db.execute(
            "SELECT job_id, status, name, user, energy_uj, cpu_energy_uj, coverage FROM job_runs"
        )
    }
    assert set(runs) == {"101", "102", "103", "104"}
    assert all(v[0] == "complete" for v in runs.values())
    assert runs["101"][1:3] == ("cpu-heavy", "alice")
    # A normal run warns about nothing (it used to say the spool "may be hung").
    assert "WARNING" not in r.stdout + r.stderr
    # Under the default hybrid rule the idle job sharing the node pays its CPU's share of
    # the idle power and nothing else; the CPU-heavy one pays that and the power it adds.
    methods = {}
    for job_id, method, uj in db.execute(
        "SELECT n.job_id, e.method, SUM(e.energy_uj) FROM job_energy e JOIN job_nodes n "
        "ON n.id = e.job_node_id WHERE e.component = 'cpu' GROUP BY n.job_id, e.method"
    ):
        methods.setdefault(job_id, {})[method] = uj
    assert set(methods["102"]) <= {"idle_allocation", "cpu_time"}
    assert methods["102"]["idle_allocation"] > 0
    assert methods["101"]["idle_allocation"] > 0 and methods["101"]["cpu_time"] > 0
    assert methods["101"]["cpu_time"] > 5 * methods["102"].get("cpu_time", 0)
    policies = {
        p for (p,) in db.execute("SELECT json_extract(attribution, '$.policy') FROM job_nodes")
    }
    assert policies == {"hybrid"}
    assert "Attribution" in r.stdout and "Units: ConsumedEnergy" in r.stdout
    nodes = db.execute("SELECT COUNT(DISTINCT node) FROM job_nodes WHERE job_id = '103'")
    assert nodes.fetchone()[0] == 2
    windows = dict(db.execute("SELECT name, status FROM windows"))
    assert windows == {"prepare": "closed", "compute": "closed"}
    db.close()


def test_demo_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "x").write_text("mine")
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "not empty" in r.stderr
