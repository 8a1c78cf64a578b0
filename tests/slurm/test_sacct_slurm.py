"""llem-acct against the real sacct: Slurm with slurmdbd and MariaDB, llem's real hooks.

One cluster with accounting for the module (the harness starts MariaDB in a temp datadir and
slurmdbd on it). Jobs that end every way a job ends (completed, failed, cancelled, timed out,
killed by its own signal, a failed step, requeued, array tasks, one that pended) run through
llem's Prolog, Epilog and EpilogSlurmctld; ``llem aggregate`` merges their slices and asks
sacct; then llem-acct and sacct are compared field by field, filter by filter, and as text.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

from .harness import TEST_USER
from .llem_site import Site

pytestmark = pytest.mark.slurm

FIELDS = "JobID,State,ExitCode,DerivedExitCode,Start,End,Elapsed,Submit"


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site, slurm_available):
    from .harness import missing_accounting_requirements

    problems = missing_accounting_requirements()
    if problems:
        pytest.skip("slurmdbd or MariaDB missing: " + "; ".join(problems))
    return site.started_cluster(
        slurm_module_cluster_factory,
        nodes=2,
        cpus_per_node=8,  # sleeping jobs: all of them at once, none waits for a CPU
        name="llemacct",
        node_prefix="q",
        port_base=17500,
        accounting=True,
    )


def _submit(cluster, site, args):
    return cluster.submit(args, user=TEST_USER, env=site.user_env)


def _wait_running(cluster, job, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.job_info(job).get("JobState") == "RUNNING":
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job} never ran: {cluster.job_info(job)}")


def _aggregate(cluster, site) -> dict:
    env = {
        **os.environ,
        "LLEM_CONFIG": str(site.config),
        "SLURM_CONF": str(cluster.conf_path),
    }
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
    import json

    return json.loads(r.stdout)


def _acct(cluster, site, *args) -> str:
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    for name in ("SACCT_FORMAT", "SLURM_TIME_FORMAT"):
        env.pop(name, None)
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.acct", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _sacct(cluster, *args) -> str:
    r = cluster.sacct(list(args))
    assert r.returncode == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def jobs(cluster, site):
    """Every kind of end, merged into the ledger and reconciled with sacct."""
    n1, n2 = cluster.nodes
    site.write_config(
        f"cluster: {cluster.name}\nstate_dir: {site.state_dir}\nrun_dir: {site.run_dir}\n"
        f"spool_dir: {site.spool_dir}\nledger: {site.state_dir / 'ledger.db'}\n"
        "sampler:\n  interval_s: 0.5\n  linger_s: 0\ncarbon:\n  region: FR\n"
        "aggregate:\n  sacct: /usr/bin/sacct\n  sacct_settle_s: 0\n"
    )
    t0 = time.time()
    j = {}
    j["timeout"] = _submit(cluster, site, ["-w", n2, "--time=1", "--wrap", "sleep 300"])
    # a job that holds n1 whole for a while, so that the next one pends behind it
    j["blocker"] = _submit(cluster, site, ["-w", n1, "--exclusive", "--wrap", "sleep 6"])
    j["pended"] = _submit(cluster, site, ["-w", n1, "--wrap", "sleep 1"])
    j["completed"] = _submit(cluster, site, ["-w", n2, "--wrap", "sleep 1"])
    j["failed"] = _submit(cluster, site, ["-w", n2, "--wrap", "exit 3"])
    j["selfkilled"] = _submit(cluster, site, ["-w", n2, "--wrap", "kill -9 $$"])
    j["stepfailed"] = _submit(cluster, site, ["-w", n2, "--wrap", "srun /bin/false; exit 0"])
    j["cancelled"] = _submit(cluster, site, ["-w", n2, "--wrap", "sleep 120"])
    j["requeued"] = _submit(cluster, site, ["-w", n2, "--requeue", "--wrap", "sleep 4"])
    array = _submit(cluster, site, ["-w", n2, "--array=1-2", "--wrap", "sleep 1"])
    _wait_running(cluster, j["cancelled"])
    _wait_running(cluster, j["requeued"])
    time.sleep(1.5)
    assert cluster.run(["scancel", j["cancelled"]]).returncode == 0
    r = cluster.run(["scontrol", "requeue", j["requeued"]])
    assert r.returncode == 0, r.output
    # A requeued job waits two minutes before it may start again: let it go now.
    deadline = time.monotonic() + 30
    while cluster.job_info(j["requeued"]).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, cluster.job_info(j["requeued"])
        time.sleep(0.2)
    r = cluster.run(["scontrol", "update", f"JobId={j['requeued']}", "StartTime=now"])
    assert r.returncode == 0, r.output
    for key in ("blocker", "pended", "completed", "failed", "selfkilled", "stepfailed"):
        cluster.wait_job(j[key], timeout=60)
    cluster.wait_job(j["cancelled"], timeout=60)
    cluster.wait_job(f"{array}_1", timeout=60)
    cluster.wait_job(f"{array}_2", timeout=60)
    cluster.wait_job(j["requeued"], timeout=150)
    cluster.wait_job(j["timeout"], timeout=150)
    tasks = [cluster.job_info(f"{array}_{t}")["JobId"] for t in (1, 2)]
    all_ids = [*j.values(), *tasks]
    deadline = time.monotonic() + 90
    ledger = site.state_dir / "ledger.db"
    while True:
        res = _aggregate(cluster, site)
        if res["sacct"] and res["sacct"]["calls"]:
            print(f"pass asking sacct: {res['elapsed_s']} s, {res['sacct']}")
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT job_id, accounted, has_header, status FROM job_runs WHERE job_id IN "
                f"({','.join('?' * len(all_ids))})",
                all_ids,
            ).fetchall()
        finally:
            db.close()
        # every run of every job: all its nodes in, its header, Slurm's record
        ready = {r[0] for r in rows} == set(all_ids) and all(
            r[1:] == (1, 1, "complete") for r in rows
        )
        runs_of_requeued = sum(r[0] == j["requeued"] for r in rows)
        if (ready and runs_of_requeued == 2) or time.monotonic() > deadline:
            break
        time.sleep(2)
    if not (ready and runs_of_requeued == 2):
        print("rows:", rows, "\nrequeued:", _explain(ledger, j["requeued"]))
    assert ready and runs_of_requeued == 2
    return {"ids": j, "array": array, "tasks": tasks, "all": all_ids, "t0": t0}


def _explain(ledger, job_id: str) -> dict:
    """What the ledger holds of a job, for a failure's message."""
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return {
            table: db.execute(f"SELECT {cols} FROM {table} WHERE job_id = ?", (job_id,)).fetchall()
            for table, cols in (
                ("job_runs", "run_start_ns, run_end_ns, state, accounted, has_header, status"),
                ("job_nodes", "node, start_ns, end_ns, run_start_ns"),
                ("job_headers", "start_ns, end_ns, state"),
                ("slurm_jobs", "start_ns, end_ns, state"),
                ("slurm_checks", "tries, next_ns"),
            )
        }
    finally:
        db.close()


def _rows(text: str) -> list[list[str]]:
    return [line.split("|") for line in text.splitlines() if line]


def test_states_and_exit_codes_match_sacct_field_by_field(cluster, site, jobs):
    ids = ",".join(jobs["all"])
    for extra in ((), ("-D",)):
        mine = _rows(_acct(cluster, site, "-X", "-P", "-n", "-o", FIELDS, "-j", ids, *extra))
        theirs = _rows(_sacct(cluster, "-X", "-P", "-n", "-o", FIELDS, "-j", ids, *extra))
        assert mine == theirs, (extra, mine, theirs)
    states = {r[0]: r[1] for r in mine}
    j = jobs["ids"]
    assert states[j["completed"]] == "COMPLETED"
    assert states[j["failed"]] == "FAILED"
    assert states[j["selfkilled"]] == "FAILED"
    assert states[j["cancelled"]] == "CANCELLED by 0"  # root's scancel
    assert states[j["timeout"]] == "TIMEOUT"
    assert states[j["stepfailed"]] == "COMPLETED"
    assert "REQUEUED" in [r[1] for r in mine if r[0] == j["requeued"]]
    exits = {r[0]: r[2] for r in mine}
    assert (exits[j["failed"]], exits[j["selfkilled"]]) == ("3:0", "0:9")
    assert {f"{jobs['array']}_1", f"{jobs['array']}_2"} <= set(states)


def test_filters_select_the_jobs_sacct_selects(cluster, site, jobs):
    ids = set(jobs["all"])
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(jobs["t0"] - 5))
    n1 = cluster.nodes[0]

    def both(*args):
        a = {r[0] for r in _rows(_acct(cluster, site, "-X", "-P", "-n", "-o", "JobIDRaw", *args))}
        b = {r[0] for r in _rows(_sacct(cluster, "-X", "-P", "-n", "-o", "JobIDRaw", *args))}
        return a & ids, b & ids

    for states in ("CA", "TO", "CD", "F", "CA,TO", "RQ"):
        mine, theirs = both("-a", "-s", states, "-S", start, "-E", "now")
        assert mine == theirs, (states, mine, theirs)
        assert mine, states
    mine, theirs = both("-N", n1, "-S", start)
    assert mine == theirs and jobs["ids"]["pended"] in mine
    # A window while the job pended, before it started: sacct counts it (eligible time).
    db = sqlite3.connect(f"file:{site.state_dir / 'ledger.db'}?mode=ro", uri=True)
    eligible_ns, start_ns = db.execute(
        "SELECT eligible_ns, slurm_start_ns FROM job_runs WHERE job_id = ?",
        (jobs["ids"]["pended"],),
    ).fetchone()
    db.close()
    assert start_ns - eligible_ns >= 2 * 10**9, "the job did not pend"
    window = [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(eligible_ns // 10**9 + 1)),
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start_ns // 10**9 - 1)),
    ]
    mine, theirs = both("-a", "-S", window[0], "-E", window[1])
    assert mine == theirs and jobs["ids"]["pended"] in mine
    # -s alone asks for jobs ending this very second: none of ours
    mine, theirs = both("-a", "-s", "CD")
    assert mine == theirs == set()


def test_table_layout_is_sacct_s(cluster, site, jobs):
    j = jobs["ids"]
    ids = ",".join(
        j[k] for k in ("completed", "failed", "timeout", "stepfailed", "pended", "cancelled")
    )
    fmt = (
        "JobID,JobIDRaw%-5,State%6,ExitCode%3,DerivedExitCode,Start%10,End,Elapsed%4,"
        "ElapsedRaw%2,Submit%-12,AllocCPUS%1,Timelimit%4,JobID%-3"
    )
    for f in (fmt, "jobid,elap,exit,st%20"):
        mine = _acct(cluster, site, "-X", "-j", ids, "-o", f)
        theirs = _sacct(cluster, "-X", "-j", ids, "-o", f)
        assert mine == theirs, f"\n{mine}\n{theirs}"


@pytest.fixture(scope="module")
def pg_ledger(cluster, site, jobs, pg_server):
    """The same slices (the first ledger's archive, copied into a new spool) aggregated into
    a PostgreSQL ledger by ``llem aggregate``, which asks the same sacct; its URL."""
    import shutil
    import stat

    url = pg_server.database("sacct")
    spool = site.base / "spool-pg"
    spool.mkdir()
    st = site.spool_dir.stat()
    os.chown(spool, st.st_uid, st.st_gid)
    os.chmod(spool, stat.S_IMODE(st.st_mode))
    for path in sorted((site.spool_dir / "archive").rglob("*")):
        if path.is_file():
            shutil.copy2(path, spool / path.name)
    state = site.base / "state-pg"
    state.mkdir(mode=0o755)
    config = site.base / "llem-pg.yaml"
    config.write_text(
        f"cluster: {cluster.name}\nstate_dir: {state}\nrun_dir: {site.run_dir}\n"
        f"spool_dir: {spool}\nledger: {url}\ncarbon:\n  region: FR\n"
        "aggregate:\n  sacct: /usr/bin/sacct\n  sacct_settle_s: 0\n"
    )
    config.chmod(0o644)
    env = {**os.environ, "LLEM_CONFIG": str(config), "SLURM_CONF": str(cluster.conf_path)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    from llem.cluster.pg_ledger import PgLedger

    for _ in range(3):  # one pass should do; sacct may be slow to answer under load
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        with PgLedger(url, readonly=True) as led:
            rows = led.query(
                "SELECT job_id, accounted, has_header, status FROM job_runs WHERE job_id IN "
                f"({','.join('?' * len(jobs['all']))})",
                jobs["all"],
            )
        if {r[0] for r in rows} == set(jobs["all"]) and all(
            r[1:] == (1, 1, "complete") for r in rows
        ):
            break
    assert sum(r[0] == jobs["ids"]["requeued"] for r in rows) == 2, rows
    assert all(r[1:] == (1, 1, "complete") for r in rows), rows
    return url


def test_a_postgresql_ledger_gets_the_same_facts_from_sacct(cluster, site, jobs, pg_ledger):
    """The accounting step on PostgreSQL: llem-acct on that ledger says what sacct says, and
    what llem-acct says on the SQLite ledger, field by field and filter by filter."""
    ids = ",".join(jobs["all"])
    fields = f"{FIELDS},Eligible,Timelimit,AllocCPUS,AllocTRES,ReqMem,QOS"
    for extra in ((), ("-D",)):
        args = ("-X", "-P", "-n", "-o", fields, "-j", ids, *extra)
        on_pg = _acct(cluster, site, *args, "--ledger", pg_ledger)
        assert on_pg == _acct(cluster, site, *args), extra
        mine = [r[: len(FIELDS.split(","))] for r in _rows(on_pg)]
        theirs = _rows(_sacct(cluster, "-X", "-P", "-n", "-o", FIELDS, "-j", ids, *extra))
        assert mine == theirs, (extra, mine, theirs)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(jobs["t0"] - 5))
    for states in ("CA", "TO", "CD", "F", "RQ"):
        args = ("-X", "-P", "-n", "-o", "JobIDRaw", "-a", "-s", states, "-S", start, "-E", "now")
        mine = {r[0] for r in _rows(_acct(cluster, site, *args, "--ledger", pg_ledger))}
        theirs = {r[0] for r in _rows(_sacct(cluster, *args))}
        assert mine & set(jobs["all"]) == theirs & set(jobs["all"]) != set(), states


def test_without_slurmdbd_the_pass_goes_on_and_asks_later(cluster, site, jobs):
    """slurmdbd down: the job is merged with its header's state, sacct's failure is said,
    and the job waits for a later pass (not counted as a try)."""
    cluster.stop_slurmdbd()
    db_path = site.state_dir / "ledger.db"
    try:
        job = _submit(cluster, site, ["-w", cluster.nodes[0], "--wrap", "exit 5"])
        assert cluster.wait_job(job, timeout=60) == "FAILED"
        deadline = time.monotonic() + 60
        while True:
            t = time.monotonic()
            res = _aggregate(cluster, site)
            assert time.monotonic() - t < 60
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            run = db.execute(
                "SELECT state, exit_code, accounted, has_header, state_source FROM job_runs "
                "WHERE job_id = ?",
                (job,),
            ).fetchone()
            check = db.execute(
                "SELECT tries, next_ns FROM slurm_checks WHERE job_id = ?", (job,)
            ).fetchone()
            db.close()
            if (run and run[3]) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert run == ("FAILED", 5, 0, 1, "header"), run
        assert res["sacct"]["error"], res
        assert check is not None and check[0] == 0 and check[1] > time.time_ns(), check
    finally:
        cluster.start_slurmdbd()
