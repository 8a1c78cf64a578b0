"""``llem-acct`` on runs that Slurm's accounting has answered for: sacct's windows, states,
fields, flags and layout (Slurm 22.05's rules; the real sacct is compared in
tests/slurm/test_sacct_slurm.py)."""

import pytest

from tests.helpers import make_ledger
from tests.helpers.acct import CONFIG, H, T, acct_run, job

pytestmark = pytest.mark.usefixtures("utc")


def _slurm(submit, eligible, start, end, state_exit=(0, 0), derived=(0, 0), **more):
    return {
        "submit_s": submit,
        "eligible_s": eligible,
        "slurm_start_s": start,
        "slurm_end_s": end,
        "exit_code": state_exit[0],
        "signal": state_exit[1],
        "derived_exit_code": derived[0],
        "derived_signal": derived[1],
        "timelimit": more.get("timelimit", "01:00:00"),
        "timelimit_min": more.get("timelimit_min", 60),
        "qos": more.get("qos", "normal"),
        "alloc_cpus": more.get("alloc_cpus", 4),
        "alloc_tres": "billing=4,cpu=4,node=1",
        "req_mem": "1000M",
        "cancelled_by": more.get("cancelled_by"),
    }


# 6001 pended from T to T+2h, then ran to T+3h; 6002 was cancelled; 6003 submitted first but
# its id is later; 6004 timed out with a 10 minute limit, in the low QOS.
JOBS = [
    job(
        "6001",
        "alice",
        "physics",
        "cpu",
        T + 2 * H,
        T + 3 * H,
        ["c0001"],
        name="pended",
        slurm=_slurm(T, T, T + 2 * H, T + 3 * H - 2, derived=(1, 0)),
    ),
    job(
        "6002",
        "alice",
        "physics",
        "cpu",
        T + 4 * H,
        T + 4 * H + 600,
        ["c0002"],
        state="CANCELLED",
        name="cancelled",
        slurm=_slurm(
            T + 4 * H - 30, T + 4 * H - 30, T + 4 * H, T + 4 * H + 599, (0, 15), cancelled_by=1001
        ),
    ),
    job(
        "6003",
        "bob",
        "chem",
        "cpu",
        T + 5 * H,
        T + 5 * H + 60,
        ["c0002"],
        state="FAILED",
        name="first",
        slurm=_slurm(T - H, T - H, T + 5 * H, T + 5 * H + 59, (3, 0)),
    ),
    job(
        "6004",
        "bob",
        "chem",
        "cpu",
        T + 6 * H,
        T + 6 * H + 660,
        ["c0003"],
        state="TIMEOUT",
        name="slow",
        slurm=_slurm(
            T + 6 * H,
            T + 6 * H,
            T + 6 * H,
            T + 6 * H + 650,
            timelimit="00:10:00",
            timelimit_min=10,
            qos="low",
        ),
    ),
]


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    path = d / "ledger.db"
    make_ledger.write_jobs(path, JOBS)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(CONFIG + f"ledger: {path}\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    for name in ("SACCT_FORMAT", "SLURM_TIME_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    return path


def ids(*args):
    status, out, err = acct_run("-a", "-X", "-P", "-n", "-o", "JobID", *args)
    assert status == 0, err
    return out.split()


def test_windows_are_sacct_s(ledger):
    # a window while 6001 and 6003 only pended: sacct counts them (eligible before -E, ended
    # after -S), in submit order
    assert ids("-S", "2026-03-01T10:30", "-E", "2026-03-01T11:00") == ["6003", "6001"]
    assert ids("-S", "2026-03-01T08:30", "-E", "2026-03-01T09:00") == []  # not eligible yet
    # -s: by end time within the window, per state
    assert ids("-s", "CA", "-S", "2026-03-01T14:00", "-E", "2026-03-01T14:10") == ["6002"]
    assert ids("-s", "CA", "-S", "2026-03-01T14:00", "-E", "2026-03-01T14:09") == []
    assert ids("-s", "CD,TO", "-S", "2026-03-01", "-E", "2026-03-02") == ["6001", "6004"]
    # R: every job that ran during the window, whatever its state
    assert ids("-s", "R", "-S", "2026-03-01T14:05", "-E", "2026-03-01T15:30") == [
        "6003",  # submitted first
        "6002",
    ]
    # -s alone: jobs ending now; -j alone: Epoch 0 to now, by submit time
    assert ids("-s", "F") == []
    assert ids("-j", "6003,6004") == ["6003", "6004"]


def test_rows_in_submit_order_and_sacct_s_fields(ledger):
    status, out, _ = acct_run(
        "-a",
        "-X",
        "-P",
        "-S",
        "2026-03-01",
        "-E",
        "2026-03-02",
        "-o",
        "JobID,State,ExitCode,DerivedExitCode,Submit,Eligible,ElapsedRaw,Timelimit,"
        "TimelimitRaw,AllocCPUS,AllocTRES,ReqMem,QOS",
    )
    assert status == 0
    assert out.splitlines() == [
        "JobID|State|ExitCode|DerivedExitCode|Submit|Eligible|ElapsedRaw|Timelimit|"
        "TimelimitRaw|AllocCPUS|AllocTRES|ReqMem|QOS",
        "6003|FAILED|3:0|0:0|2026-03-01T09:00:00|2026-03-01T09:00:00|59|01:00:00|60|4|"
        "billing=4,cpu=4,node=1|1000M|normal",
        "6001|COMPLETED|0:0|1:0|2026-03-01T10:00:00|2026-03-01T10:00:00|3598|01:00:00|60|4|"
        "billing=4,cpu=4,node=1|1000M|normal",
        "6002|CANCELLED by 1001|0:15|0:0|2026-03-01T13:59:30|2026-03-01T13:59:30|599|01:00:00|60|4|"
        "billing=4,cpu=4,node=1|1000M|normal",
        "6004|TIMEOUT|0:0|0:0|2026-03-01T16:00:00|2026-03-01T16:00:00|650|00:10:00|10|4|"
        "billing=4,cpu=4,node=1|1000M|low",
    ]


def test_limits_qos_groups_and_truncation(ledger):
    window = ("-S", "2026-03-01", "-E", "2026-03-02")
    assert ids(*window, "-k", "10") == ["6004"]
    assert ids(*window, "-k", "5", "-K", "60") == ["6003", "6001", "6002", "6004"]
    assert ids(*window, "-q", "low") == ["6004"]
    assert ids(*window, "-g", "1000") == ["6003", "6001", "6002", "6004"]
    assert ids(*window, "-g", "4242") == []
    status, out, _ = acct_run(
        "-a",
        "-X",
        "-P",
        "-n",
        "-T",
        "-S",
        "2026-03-01T12:30",
        "-E",
        "2026-03-01T14:05",
        "-o",
        "JobID,Start,End,Elapsed",
        "-s",
        "R",
    )
    assert out.splitlines() == [
        "6001|2026-03-01T12:30:00|2026-03-01T12:59:58|00:29:58",
        "6002|2026-03-01T14:00:00|2026-03-01T14:05:00|00:05:00",
    ]


def test_field_names_format_sources_and_time_format(ledger, monkeypatch):
    window = ("-a", "-X", "-S", "2026-03-01", "-E", "2026-03-02", "-j", "6004")
    _, out, _ = acct_run(*window, "-P", "-o", "jobid,elap,exit")
    assert out.splitlines()[0] == "JobID|Elapsed|ExitCode"
    _, out, _ = acct_run(*window, "-P", "-o", "jobid", "-o", "state", "-b")
    assert out.splitlines()[0] == "JobID|State|JobID|State|ExitCode"
    _, out, _ = acct_run(*window, "-P", "-o", "ALL")
    assert out.splitlines()[0].startswith("JobID|JobIDRaw|JobName|")
    monkeypatch.setenv("SACCT_FORMAT", "jobid,qos")
    _, out, _ = acct_run(*window, "-P", "-n")
    assert out == "6004|low\n"
    monkeypatch.setenv("SLURM_TIME_FORMAT", "%d.%m. %H:%M")
    _, out, _ = acct_run(*window, "-P", "-n", "-o", "Start")
    assert out == "01.03. 16:00\n"
    status, _, err = acct_run(*window, "-l", "-o", "jobid")
    assert status == 2 and "exclude each other" in err
    status, _, err = acct_run(*window, "-v", "-n")
    assert "Jobs Eligible in the time window from" in err


def test_table_cuts_as_sacct(ledger):
    _, out, _ = acct_run(
        "-a", "-X", "-j", "6002", "-o", "JobID%3,State%6,Start%10,Elapsed%4,ElapsedRaw%1,JobName%-4"
    )
    assert out.splitlines() == [
        "Job  State      Start Elap E JobN ",
        "--- ------ ---------- ---- - ---- ",
        # strings cut with '+', times cut without, elapsed and numbers never
        "60+ CANCE+ 2026-03-01 00:09:59 599 can+ ",
    ]


def test_a_ledger_not_yet_migrated_is_read_with_the_nodes_times(ledger):
    """Readers may come before the aggregator's migration: without the accounting columns
    the windows use the nodes' times and Slurm-only fields are empty."""
    import sqlite3

    from llem.cluster.acct_queries import SLURM_RUN_COLUMNS
    from llem.cluster.ledger import MIGRATIONS, _v6_slurm_accounting

    db = sqlite3.connect(ledger)
    db.execute("DROP INDEX job_runs_unaccounted")
    for column in (*SLURM_RUN_COLUMNS, "accounted"):
        db.execute(f"ALTER TABLE job_runs DROP COLUMN {column}")
    db.execute("DROP TABLE slurm_jobs")
    db.execute("DROP TABLE slurm_checks")
    db.execute("ALTER TABLE job_headers DROP COLUMN derived_signal")
    db.execute(f"PRAGMA user_version = {MIGRATIONS.index(_v6_slurm_accounting)}")
    db.commit()
    db.close()
    status, out, err = acct_run(
        "-a",
        "-X",
        "-P",
        "-n",
        "-S",
        "2026-03-01",
        "-E",
        "2026-03-02",
        "-o",
        "JobID,State,Submit,Start,QOS",
    )
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "6001|COMPLETED|Unknown|2026-03-01T12:00:00|",
        "6002|CANCELLED|Unknown|2026-03-01T14:00:00|",
        "6003|FAILED|Unknown|2026-03-01T15:00:00|",
        "6004|TIMEOUT|Unknown|2026-03-01T16:00:00|",
    ]
    # the pending-time window needs Slurm's eligible time: the nodes' start stands in
    assert ids("-S", "2026-03-01T10:30", "-E", "2026-03-01T11:00") == []
    assert ids("-S", "2026-03-01", "-E", "2026-03-02", "-q", "low") == []
