"""The ledger generator of bench/make_ledger.py (tests/helpers/make_ledger.py) writes a
consistent ledger with the real schema; bench_acct.py runs."""

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from llem.cluster.ledger import SCHEMA_VERSION, Ledger
from tests.helpers import ROOT, make_ledger
from tests.helpers.acct import acct_run

pytestmark = pytest.mark.usefixtures("utc")

NOW_S = 1_780_000_000


def build(tmp_path, n=400, now_s=NOW_S):
    d = tmp_path / "b"
    d.mkdir(mode=0o755)
    path = d / "ledger.db"
    assert make_ledger.write_jobs(path, make_ledger.generate(n, seed=3, now_s=now_s, days=60)) == n
    return path


def test_generated_ledger_is_consistent_and_has_the_real_schema(tmp_path):
    path = build(tmp_path)
    with Ledger(path, readonly=True) as ledger:
        assert ledger.query("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert ledger.integrity_check() == "ok"
    db = sqlite3.connect(path)
    q = lambda sql: db.execute(sql).fetchall()  # noqa: E731
    # the runs' totals are the sums of their hourly rows and of their nodes
    assert q(
        "SELECT COUNT(*) FROM job_runs r WHERE energy_uj != (SELECT SUM(e.energy_uj) FROM "
        "job_nodes jn JOIN job_energy e ON e.job_node_id = jn.id WHERE jn.cluster = "
        "r.cluster AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns)"
    ) == [(0,)]
    assert q(
        "SELECT COUNT(*) FROM job_runs r WHERE num_nodes != (SELECT COUNT(*) FROM "
        "job_nodes jn WHERE jn.job_id = r.job_id)"
    ) == [(0,)]
    assert q(
        "SELECT COUNT(*) FROM job_runs r WHERE energy_uj != cpu_energy_uj + "
        "dram_energy_uj + gpu_energy_uj + other_energy_uj"
    ) == [(0,)]
    names = {r[0] for r in q("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"job_runs_by_user", "job_runs_by_end", "job_nodes_by_node"} <= names
    users, accounts, parts = q(
        "SELECT COUNT(DISTINCT user), COUNT(DISTINCT account), "
        "COUNT(DISTINCT partition) FROM job_runs"
    )[0]
    assert users > 50 and accounts > 20 and parts == 4
    assert q("SELECT COUNT(*) FROM windows")[0][0] > 0
    assert q("SELECT COUNT(*) FROM job_runs WHERE num_nodes > 1")[0][0] > 0
    assert q("SELECT COUNT(*) FROM job_runs WHERE estimated_energy_uj > 0")[0][0] > 0
    assert q("SELECT COUNT(*) FROM job_runs WHERE array_task_id IS NOT NULL")[0][0] > 0
    db.close()


def test_acct_totals_equal_sql_sums_on_the_generated_ledger(tmp_path, monkeypatch):
    path = build(tmp_path)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text("carbon:\n  intensity_g_per_kwh: 100\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    window = ("--ledger", str(path), "-a", "-S", "2000-01-01", "-E", "2100-01-01")
    status, out, err = acct_run(
        *window, "--totals", "account", "--json", "-o", "Account,NJobs,ConsumedEnergyRaw,CO2e"
    )
    assert status == 0, err
    db = sqlite3.connect(path)
    want = {
        a: (n, e)
        for a, n, e in db.execute(
            "SELECT account, COUNT(*), SUM(energy_uj) FROM job_runs GROUP BY account"
        )
    }
    db.close()
    got = json.loads(out)["totals"]
    assert {t["Account"]: (t["NJobs"], t["ConsumedEnergyRaw"]) for t in got} == {
        a: (n, round(e / 1e6)) for a, (n, e) in want.items()
    }
    for t in got:
        assert abs(t["CO2e"] - t["ConsumedEnergyRaw"] / 3.6e6 * 100) < 0.01
    status, out, _ = acct_run(*window, "-X", "-P", "-n", "-o", "JobIDRaw")
    assert len(out.split()) == 400


def test_bench_acct_runs_and_prints_its_figures(tmp_path):
    path = build(tmp_path, 300, now_s=int(time.time()))  # the bench looks at the last 30 days
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_acct.py"),
            "--ledger",
            str(path),
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for text in (
        "--user",
        "--totals account",
        "import llem.cli.acct",
        "heavy modules imported: none",
    ):
        assert text in r.stdout, text  # the figures depend on the machine


def test_the_generated_ledger_names_job_gpus_as_its_energy_rows_do(tmp_path):
    """Issue 13: job gpus were 'GPU-node-i' while the rows were 'nvml:GPU-node-i', so the
    report called every GPU idle with 0 kWh of idle energy."""
    from llem.cluster import report_queries as rq

    path = build(tmp_path)
    with Ledger(path, readonly=True) as ledger:
        rows = rq.idle_gpus(ledger, 0, 2**62, 100.0)
    idle = sum(r[1] for r in rows)
    allocated = sum(r[2] for r in rows)
    assert 0 < idle < allocated  # gpu_w is 80-400 W: some below 100 W, most above
    assert sum(r[3] for r in rows) > 0 and sum(r[5] for r in rows) == 0
