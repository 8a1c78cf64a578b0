"""Slurm's accounting in the ledger: sacct's records, their pairing with runs, the retries,
the migration of old headers, and a pass that goes on when sacct fails; on both backends
(SQLite, and a real PostgreSQL server: ``ledger`` and ``spec`` are parametrized).

The comparison with the real sacct (slurmdbd and MariaDB) is tests/slurm/test_sacct_slurm.py.
"""

import sqlite3
import time

import pytest

from llem.cluster import ledger as ledger_mod
from llem.cluster import pg_schema
from llem.cluster.header import header_slice_from_env
from llem.cluster.ledger import group_runs, open_ledger
from llem.cluster.slurm_accounting import (
    MAX_TRIES,
    SACCT_FIELDS,
    parse_sacct,
    reconcile,
    retry_delay_ns,
)
from llem.config import from_mapping
from tests.helpers.ledger import NOW, merge
from tests.helpers.nodes import ENV, T0, S, job_slices

# sacct -X -D -n -P -o <SACCT_FIELDS> with SLURM_TIME_FORMAT=%s, as Slurm 22.05 prints it
# (the values of the jobs of tests/slurm/test_sacct_slurm.py).
START = (T0 + 1800 * S) // S
SACCT_OUT = (
    f"100|COMPLETED|0:0|1:0|{START - 9}|{START - 9}|{START}|{START + 3600}|UNLIMITED|"
    "UNLIMITED|8|billing=8,cpu=8,node=3|1000M|normal\n"
    f"101|CANCELLED by 1001|0:15|0:0|{START - 5}|{START - 5}|{START}|{START + 60}|00:10:00|"
    "10|1|billing=1,cpu=1,node=1|1000M|normal\n"
    f"102|RUNNING|0:0|0:0|{START}|{START}|{START}|Unknown|UNLIMITED|UNLIMITED|1|cpu=1|1000M|"
    "normal\n"
    f"103|CANCELLED by 0|0:0|0:0|{START}|{START}|Unknown|{START + 5}|UNLIMITED|UNLIMITED|0||"
    "1000M|normal\n"
    "not|a|line\n"
)


def test_parse_sacct_keeps_final_states_of_runs_that_started():
    assert len(SACCT_FIELDS) == len(SACCT_OUT.splitlines()[0].split("|"))
    rows = parse_sacct(SACCT_OUT, "c1")
    assert [r[:3] for r in rows] == [("c1", "100", START * S), ("c1", "101", START * S)]
    first = dict(zip(ledger_mod.SLURM_JOB_COLUMNS, rows[0]))
    assert first["state"] == "COMPLETED"
    assert (first["exit_code"], first["signal"]) == (0, 0)
    assert (first["derived_exit_code"], first["derived_signal"]) == (1, 0)
    assert (first["submit_ns"], first["end_ns"]) == ((START - 9) * S, (START + 3600) * S)
    assert (first["timelimit"], first["timelimit_min"], first["alloc_cpus"]) == (
        "UNLIMITED",
        None,
        8,
    )
    second = dict(zip(ledger_mod.SLURM_JOB_COLUMNS, rows[1]))
    assert (second["state"], second["signal"], second["timelimit_min"]) == ("CANCELLED", 15, 10)
    assert (first["cancelled_by"], second["cancelled_by"]) == (None, 1001)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def spec(request, tmp_path):
    """A new ledger's ``ledger:`` setting: an SQLite file, or a database on the test server."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    (tmp_path / "lib").mkdir(mode=0o755)
    return str(tmp_path / "lib" / "ledger.db")


def _header(job_id, exit_code="0", now_ns=T0 + 5402 * S):
    env = {**ENV, "SLURM_JOB_ID": job_id, "SLURM_JOB_EXIT_CODE": exit_code}
    return header_slice_from_env(env, "c1", now_ns=now_ns)


def test_slurm_s_record_wins_over_the_header_and_the_job_is_forgotten(tmp_path, spec):
    slices = job_slices(tmp_path, "100")
    with open_ledger(spec) as ledger:
        merge(ledger, [*slices, _header("100")])
        (run,) = ledger.job_runs("100")
        # exit 0:0 alone: completed, cancelled or timed out (Slurm 22.05)
        assert (run["state"], run["state_source"], run["accounted"]) == ("UNKNOWN", "header", 0)
        assert ledger.accounting_candidates(
            ended_before_ns=NOW, now_ns=NOW, max_tries=MAX_TRIES, limit=10
        ) == [("c1", "100")]
        stored = ledger.store_accounting(
            "c1",
            parse_sacct(SACCT_OUT, "c1"),
            ["100"],
            now_ns=NOW,
            retry_ns=retry_delay_ns,
            grace_s=3600,
        )
        assert stored == 2
        (run,) = ledger.job_runs("100")
        assert (run["state"], run["state_source"], run["accounted"]) == ("COMPLETED", "slurm", 1)
        assert (run["derived_exit_code"], run["submit_ns"]) == (1, (START - 9) * S)
        assert run["alloc_tres"] == "billing=8,cpu=8,node=3"
        assert ledger.query("SELECT COUNT(*) FROM slurm_checks") == [(0,)]
        assert (
            ledger.accounting_candidates(
                ended_before_ns=NOW, now_ns=NOW, max_tries=MAX_TRIES, limit=10
            )
            == []
        )
        before = ledger.canonical_dump()
        merge(ledger, slices)  # the same slices again: the same ledger
        assert ledger.canonical_dump() == before


def test_a_job_without_its_record_is_asked_again_later_and_given_up(tmp_path, spec):
    with open_ledger(spec) as ledger:
        merge(ledger, job_slices(tmp_path, "200"))
        now = NOW
        for tries in range(1, MAX_TRIES + 1):
            due = ledger.accounting_candidates(
                ended_before_ns=now, now_ns=now, max_tries=MAX_TRIES, limit=10
            )
            assert due == [("c1", "200")], tries
            ledger.store_accounting(
                "c1", [], ["200"], now_ns=now, retry_ns=retry_delay_ns, grace_s=3600
            )
            # not again before the delay, which grows up to a day
            assert not ledger.accounting_candidates(
                ended_before_ns=now, now_ns=now + retry_delay_ns(tries) - 1, max_tries=99, limit=9
            )
            now += retry_delay_ns(tries)
        assert retry_delay_ns(1) == 60 * S and retry_delay_ns(30) == 86400 * S
        assert not ledger.accounting_candidates(
            ended_before_ns=now, now_ns=now, max_tries=MAX_TRIES, limit=10
        )


def test_requeued_runs_pair_up_with_their_records_in_turn():
    """As seen on Slurm 22.05: the nodes' starts of a requeued job lag Slurm's by seconds,
    so that both records are nearest the first run; each still finds its own."""
    nodes = [
        {
            "id": 1,
            "node": "q2",
            "start_ns": T0 + 2_180 * S // 1000,
            "end_ns": T0 + 2_440 * S // 1000,
        },
        {
            "id": 2,
            "node": "q2",
            "start_ns": T0 + 7_520 * S // 1000,
            "end_ns": T0 + 7_520 * S // 1000,
        },
    ]
    records = [
        {"start_ns": T0, "end_ns": T0 + S, "state": "REQUEUED"},
        {"start_ns": T0 + 3 * S, "end_ns": T0 + 7 * S, "state": "COMPLETED"},
    ]
    for order in (records, records[::-1]):
        runs = group_runs(nodes, [], order)
        assert [r["slurm"]["state"] for r in runs] == ["REQUEUED", "COMPLETED"]


def _config(tmp_path, spec, **aggregate):
    return from_mapping(
        {
            "cluster": "c1",
            "spool_dir": str(tmp_path / "spool"),
            "ledger": spec,
            "aggregate": aggregate,
        }
    )


def test_a_failing_sacct_defers_the_jobs_and_never_fails(tmp_path, spec):
    config = _config(tmp_path, spec, sacct="/bin/false", sacct_settle_s=0)
    with open_ledger(config.ledger) as ledger:
        merge(ledger, job_slices(tmp_path, "300"))
        t = time.monotonic()
        res = reconcile(config, ledger, now_ns=NOW)
        assert time.monotonic() - t < 10
        assert res.error and res.calls == 1 and res.asked == 0
        (tries, next_ns) = ledger.query("SELECT tries, next_ns FROM slurm_checks")[0]
        assert tries == 0 and next_ns > NOW  # not a try: slurmdbd was not there to answer
        assert reconcile(config, ledger, now_ns=NOW).calls == 0  # not before then
        (run,) = ledger.job_runs("300")
        assert run["accounted"] == 0
    # an id that is not Slurm's (only a header could bring one) never reaches sacct's
    # command line; it counts as a try
    with open_ledger(config.ledger) as ledger:
        merge(ledger, [_header("x-1", now_ns=NOW - 60 * S)])
        res = reconcile(config, ledger, now_ns=NOW + 3600 * S)
        assert res.calls == 1  # job 300 again, alone
        assert ledger.query("SELECT tries FROM slurm_checks WHERE job_id = 'x-1'") == [(1,)]
    off = _config(tmp_path, spec, sacct="off")
    with open_ledger(off.ledger) as ledger:
        assert reconcile(off, ledger, now_ns=NOW).skipped == "aggregate.sacct is off"


@pytest.mark.parametrize("value", ["sacct", "", "auto "])
def test_sacct_setting_is_checked(tmp_path, value):
    from llem.errors import ConfigError

    with pytest.raises(ConfigError, match="aggregate.sacct"):
        _config(tmp_path, str(tmp_path / "ledger.db"), sacct=value)


def test_old_headers_are_corrected_by_the_migration(tmp_path):
    """A ledger of the schema before the accounting migration, with headers as llem wrote them before: COMPLETED guessed from
    exit 0:0, SIGNALED, and a derived exit code kept as a raw wait status."""
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path, isolation_level=None)
    before = ledger_mod.MIGRATIONS.index(ledger_mod._v6_slurm_accounting)
    for migration in ledger_mod.MIGRATIONS[:before]:
        migration(db)
    db.execute(f"PRAGMA user_version = {before}")
    for job_id, state, derived in (
        ("1", "COMPLETED", 256),
        ("2", "SIGNALED", 0),
        ("3", "FAILED", 3),
    ):
        db.execute(
            "INSERT INTO job_headers (cluster, job_id, end_ns, state, exit_code, signal, "
            "derived_exit_code) VALUES ('c1', ?, ?, ?, 0, 0, ?)",
            (job_id, T0, state, derived),
        )
        db.execute(
            "INSERT INTO job_runs (cluster, job_id, run_start_ns, run_end_ns, state, "
            "derived_exit_code, has_header, status, nodes_reported) "
            "VALUES ('c1', ?, ?, ?, ?, ?, 1, 'complete', 0)",
            (job_id, T0, T0, state, derived),
        )
    db.close()
    with open_ledger(path) as ledger:
        runs = {r["job_id"]: r for r in ledger.job_runs()}
        assert {j: (r["state"], r["derived_exit_code"]) for j, r in runs.items()} == {
            "1": ("UNKNOWN", 1),
            "2": ("FAILED", 0),
            "3": ("FAILED", 3),
        }
        assert {r["state_source"] for r in runs.values()} == {"header"}
        assert ledger.query("SELECT state FROM job_headers ORDER BY job_id") == [
            ("UNKNOWN",),
            ("FAILED",),
            ("FAILED",),
        ]


def test_a_header_merged_after_slurm_s_record_keeps_slurm_s_facts(tmp_path, spec):
    """The header may come after sacct answered (its nodes' slices came first): the run is
    recomputed by the merge, with Slurm's record still its state's source."""
    with open_ledger(spec) as ledger:
        merge(ledger, job_slices(tmp_path, "101"))
        records = parse_sacct(SACCT_OUT, "c1")
        ledger.store_accounting(
            "c1", records, ["101"], now_ns=NOW, retry_ns=retry_delay_ns, grace_s=3600
        )
        merge(ledger, [_header("101", exit_code="0")])
        (run,) = ledger.job_runs("101")
        assert (run["state"], run["state_source"], run["accounted"]) == ("CANCELLED", "slurm", 1)
        assert (run["has_header"], run["signal"], run["cancelled_by"]) == (1, 15, 1001)
        assert (run["timelimit"], run["timelimit_min"], run["eligible_ns"]) == (
            "00:10:00",
            10,
            (START - 5) * S,
        )


def _requeue_sacct(job_id: str, runs: list[tuple[int, int, str]]) -> str:
    """sacct's lines (``-D``: one per run) of a requeued job, as Slurm 22.05 prints them."""
    return "".join(
        f"{job_id}|{state}|0:0|0:0|{START - 30}|{start - 1}|{start}|{end}|00:30:00|30|1|"
        "billing=1,cpu=1,node=1|1000M|normal\n"
        for start, end, state in runs
    )


def test_a_requeued_job_s_runs_get_their_records_and_a_new_run_is_asked_at_once(tmp_path, spec):
    one = {"nodes": ("n1",), "nodelist": "n1", "seconds": 600}
    first = job_slices(tmp_path / "a", "400", **one)
    second = job_slices(tmp_path / "b", "400", start_ns=T0 + 3000 * S, **one)
    third = job_slices(tmp_path / "c", "400", start_ns=T0 + 4200 * S, **one)
    runs = [(START, START + 600, "REQUEUED"), (START + 1200, START + 1800, "COMPLETED")]
    with open_ledger(spec) as ledger:
        merge(ledger, [*first, *second])
        due = ledger.accounting_candidates(ended_before_ns=NOW, now_ns=NOW, max_tries=12, limit=9)
        assert due == [("c1", "400")]
        records = parse_sacct(_requeue_sacct("400", runs[:1]), "c1")
        ledger.store_accounting(
            "c1", records, ["400"], now_ns=NOW, retry_ns=retry_delay_ns, grace_s=3600
        )
        # the second run has no record yet: asked again after a minute
        assert ledger.query("SELECT tries, next_ns FROM slurm_checks") == [(1, NOW + 60 * S)]
        later = NOW + 60 * S
        records = parse_sacct(_requeue_sacct("400", runs), "c1")
        stored = ledger.store_accounting(
            "c1", records, ["400"], now_ns=later, retry_ns=retry_delay_ns, grace_s=3600
        )
        assert stored == 1  # the first record again, unchanged: not counted
        got = sorted(
            (r["run_start_ns"], r["state"], r["accounted"]) for r in ledger.job_runs("400")
        )
        assert got == [(START * S, "REQUEUED", 1), ((START + 1200) * S, "COMPLETED", 1)]
        assert ledger.query("SELECT COUNT(*) FROM slurm_checks") == [(0,)]
        merge(ledger, third)  # requeued once more: the new run is asked about at once
        due = ledger.accounting_candidates(
            ended_before_ns=later, now_ns=later, max_tries=12, limit=9
        )
        assert due == [("c1", "400")]
        states = sorted((r["run_start_ns"], r["state"]) for r in ledger.job_runs("400"))
        assert [s for _, s in states] == ["REQUEUED", "COMPLETED", None]


@pytest.mark.postgres
def test_old_headers_are_corrected_by_the_postgresql_migration(pg_url):
    """The PostgreSQL twin of the migration test below: the same rows, the same result."""
    import psycopg

    before = pg_schema.MIGRATIONS.index(pg_schema._v6_slurm_accounting)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            for migration in pg_schema.MIGRATIONS[:before]:
                migration(cur)
            cur.execute("INSERT INTO meta VALUES ('schema_version', %s)", (str(before),))
            for job_id, state, derived in (
                ("1", "COMPLETED", 256),
                ("2", "SIGNALED", 0),
                ("3", "FAILED", 3),
            ):
                cur.execute(
                    "INSERT INTO job_headers (cluster, job_id, end_ns, state, exit_code, "
                    "signal, derived_exit_code) VALUES ('c1', %s, %s, %s, 0, 0, %s)",
                    (job_id, T0, state, derived),
                )
                cur.execute(
                    "INSERT INTO job_runs (cluster, job_id, run_start_ns, run_end_ns, state, "
                    "derived_exit_code, has_header, status, nodes_reported) "
                    "VALUES ('c1', %s, %s, %s, %s, %s, 1, 'complete', 0)",
                    (job_id, T0, T0, state, derived),
                )
    with open_ledger(pg_url) as ledger:
        runs = {r["job_id"]: r for r in ledger.job_runs()}
        assert {j: (r["state"], r["derived_exit_code"]) for j, r in runs.items()} == {
            "1": ("UNKNOWN", 1),
            "2": ("FAILED", 0),
            "3": ("FAILED", 3),
        }
        assert {r["state_source"] for r in runs.values()} == {"header"}
        assert ledger.query("SELECT state FROM job_headers ORDER BY job_id") == [
            ("UNKNOWN",),
            ("FAILED",),
            ("FAILED",),
        ]


@pytest.mark.postgres
def test_llem_ledger_copy_carries_slurm_s_records_and_the_tries(tmp_path, pg_url):
    """An SQLite ledger moved to PostgreSQL keeps Slurm's records (a run recomputed after
    the copy keeps Slurm's facts) and the jobs still waiting for theirs (not asked sooner)."""
    from llem.cluster.ledger_tools import copy_ledger

    path = tmp_path / "ledger.db"
    with open_ledger(path) as ledger:
        merge(ledger, [*job_slices(tmp_path, "101"), *job_slices(tmp_path / "b", "200")])
        for job_id in ("101", "200"):  # sacct knows 101, not (yet) 200
            ledger.store_accounting(
                "c1",
                parse_sacct(SACCT_OUT, "c1"),
                [job_id],
                now_ns=NOW,
                retry_ns=retry_delay_ns,
                grace_s=3600,
            )
    with open_ledger(path, readonly=True) as src, open_ledger(pg_url) as dst:
        res = copy_ledger(src, dst, source_name=str(path))
        assert res.counts["slurm_jobs"] == (2, 2) and res.counts["slurm_checks"] == (1, 1)
        assert dst.canonical_dump() == src.canonical_dump()
        assert dst.query("SELECT * FROM slurm_checks") == src.query("SELECT * FROM slurm_checks")
        merge(dst, [_header("101")])  # regrouped on PostgreSQL: Slurm's record still wins
        (run,) = dst.job_runs("101")
        assert (run["state"], run["state_source"], run["has_header"]) == ("CANCELLED", "slurm", 1)
        assert not dst.accounting_candidates(
            ended_before_ns=NOW, now_ns=NOW, max_tries=MAX_TRIES, limit=10
        )
