"""The report's roll-ups (``llem.cluster.rollups``): kept exactly by the merge on both backends,
filled by the migration from a ledger's history, checked by ``llem ledger check``, and giving
the same report, byte for byte, as the raw energy rows.

Ledgers are built by production code: slices exported from real node stores and merged
(``tests.helpers.report_data``, ``tests.helpers.nodes``), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime

import pandas as pd
import pytest

from llem.cluster import ledger as ledger_mod
from llem.cluster import pg_schema
from llem.cluster import report_queries as q
from llem.cluster.ledger import Ledger, digest
from llem.cluster.ledger_tools import check_ledger, copy_ledger
from llem.cluster.pg_ledger import PgLedger
from llem.report import build_report, frames, render
from tests.helpers.ledger import merge
from tests.helpers.nodes import GPU_KEY, T0, S, job_slices
from tests.helpers.report_data import (
    ESTIMATED,
    NOVEMBER,
    Job,
    build_ledger,
    job_and_node_slices,
    report_config,
    utc_ns,
)

CROSSING = [  # a GPU job over the month's end, a busy one and an idle one (waste), 2 days long
    Job("301", "n8", "2023-10-31 20:00", 8 * 3600, "erin", "astro", gpu_w=30.0),
    Job("302", "n9", "2023-11-29 12:00", 40 * 3600, "frank", "astro", gpu_w=300.0),
]
MIDNIGHT = [  # inside November, across a midnight: its energy per day from its hours
    Job("303", "n7", "2023-11-20 20:00", 8 * 3600, "erin", "astro"),
]
PLATFORM = [  # a node meter reading 80 W beyond the parts: "other" energy (the platform)
    Job("401", "n4", "2023-11-12 08:00", 3600, "gina", "bio", platform_w=80.0),
]
PERIODS = [
    frames.month_period("2023-11"),
    frames.month_period("2023-12"),
    # bounds inside a clock hour and a day: job nodes that cross them read the raw rows
    frames.range_period(datetime(2023, 11, 1, 6, 30), datetime(2023, 11, 30, 13, 45)),
]


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    return build_ledger(
        tmp_path_factory.mktemp("rollups"), NOVEMBER + ESTIMATED + CROSSING + PLATFORM + MIDNIGHT
    )


def _rendered(ledger, path, period, *, rollups: bool, account=None) -> tuple[str, ...]:
    rep = build_report(ledger, report_config(path), period, account=account, rollups=rollups)
    return render.to_markdown(rep), render.to_json(rep), render.to_csv(rep)


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
@pytest.mark.parametrize("account", [None, "astro"])
def test_report_from_rollups_is_byte_identical_to_the_raw_rows(ledger_path, period, account):
    with q.open_readonly(ledger_path) as ledger:
        assert q.uses_rollups(ledger)
        fast = _rendered(ledger, ledger_path, period, rollups=True, account=account)
        slow = _rendered(ledger, ledger_path, period, rollups=False, account=account)
    assert fast == slow
    assert "astro" in fast[0]  # the crossing jobs are in every period's report


def test_every_query_gives_the_raw_rows_answer(ledger_path):
    """Each roll-up query against its raw-row twin (not only the rounded report)."""
    period = frames.month_period("2023-11")
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as ledger:
        q.load_hour_factors(ledger, {h: 1e-7 * (1 + h % 7) for h in period.hours()})
        for f in (
            lambda r: q.energy_by_run_day(ledger, s, e, rollups=r),
            lambda r: q.energy_by_hour(ledger, s, e, rollups=r),
            lambda r: q.idle_gpus(ledger, s, e, 100.0, rollups=r),
        ):
            fast, slow = f(True), f(False)
            assert fast == slow and fast
        idle = q.idle_gpus(ledger, s, e, 100.0)
        assert any(row[1] > 0 for row in idle)  # job 104 and 301 idle: judged from roll-ups


@pytest.mark.parametrize("rollups", [True, False], ids=["rollups", "raw"])
@pytest.mark.parametrize("account", [None, "astro"])
@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_a_periods_totals_from_sql_sums_match_the_jobs_frame(ledger_path, period, account, rollups):
    """The previous period's totals (the change table) come from integer sums in SQL, no
    per-run rows: the same figures as the jobs frame's, to the last digits of a float."""
    s, e = period.start_ns, period.end_ns
    factors = frames.Factors({h: 1e-7 * (1 + h // 3600 % 7) for h in period.hours()}, 3.0, 7.0)
    with q.open_readonly(ledger_path) as ledger:
        q.load_hour_factors(ledger, factors.g_per_uj_by_hour)
        sums = q.period_totals(ledger, s, e, 100.0, account, rollups=rollups)
        jobs = frames.jobs_frame(
            q.runs(ledger, s, e, account),
            q.energy_by_run_day(ledger, s, e, account, rollups=rollups),
            q.idle_gpus(ledger, s, e, 100.0, account, rollups=rollups),
            factors,
        )
    new, old = frames.totals_of_sums(sums, factors), frames.totals(jobs)
    assert new.keys() == old.keys()
    for key, value in old.items():
        if isinstance(value, float):
            assert new[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        else:
            assert new[key] == value and type(new[key]) is type(value), key
    assert old["jobs"] > 0
    if period.label == "2023-11":  # every kind of figure is there to compare
        assert old["idle_kwh"] > 0 and old["estimated_kwh"] > 0 and old["coverage"] > 0
        assert old["platform_jobs"] == (1 if account is None else 0)


def test_rollups_hold_fewer_rows_than_the_energy_rows(ledger_path):
    with q.open_readonly(ledger_path) as ledger:
        (hours,) = ledger.query("SELECT COUNT(*) FROM job_node_hours")[0]
        (energy,) = ledger.query("SELECT COUNT(*) FROM job_energy")[0]
        (gpus,) = ledger.query("SELECT COUNT(*) FROM job_node_gpus")[0]
        assert 0 < hours < energy and gpus > 0
        assert check_ledger(ledger) == []


def _dump(ledger) -> str:
    return ledger.canonical_dump()


def test_merge_keeps_rollups_equal_to_a_rebuild(tmp_path):
    """Re-merged slices count once; a newer export replaces its job node's roll-ups; a
    requeued job's two runs keep theirs; a rebuild from the raw rows changes nothing."""
    old = job_slices(tmp_path / "a", "100", nodes=("n1", "n2"))
    newer = copy.deepcopy(old[0])
    newer["created_ns"] += 1
    for row in newer["energy"]:
        row["energy_uj"] //= 3
    requeued = job_slices(tmp_path / "b", "100", start_ns=T0 + 7200 * S, seconds=600)
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, old)
        first = _dump(ledger)
        merge(ledger, old)  # the same slices again
        assert _dump(ledger) == first
        merge(ledger, [newer] + requeued)
        assert check_ledger(ledger) == []
        (hours,) = ledger.query(
            "SELECT SUM(h.energy_uj) FROM job_node_hours h JOIN job_nodes jn "
            "ON jn.id = h.job_node_id WHERE jn.node = 'n1' AND jn.start_ns = ?",
            (newer["job"]["start_ns"],),
        )[0]
        assert hours == sum(r["energy_uj"] for r in newer["energy"])
        kept = _dump(ledger)
        assert "job_node_hours" in kept and "job_node_gpus" in kept
        ledger.rebuild_rollups()
        assert _dump(ledger) == kept


def test_check_names_a_drifted_rollup(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
        assert check_ledger(ledger) == []
        ledger.write([("UPDATE job_node_hours SET gpu_uj = gpu_uj + ?", [(1,)])])
        ledger.write([("DELETE FROM job_node_gpus WHERE device_key = ?", [(GPU_KEY,)])])
        problems = check_ledger(ledger)
    assert any("hourly roll-up row differs" in p for p in problems), problems
    assert any("GPU roll-up row differs" in p for p in problems), problems


def test_check_says_which_check_runs_on_a_terminal_and_nothing_in_cron(tmp_path):
    """``llem ledger check`` runs one statement per invariant over whole tables (minutes on a
    ledger of ten million jobs): on a terminal it says which check runs; off one (cron, a
    pipe) its stderr stays empty."""
    import os
    import pty
    import subprocess
    import sys

    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
        seen: list[tuple[int, int, str]] = []
        assert check_ledger(ledger, progress=lambda *a: seen.append(a)) == []
    total = seen[0][1]
    assert [s[0] for s in seen] == list(range(total + 1)) and {s[1] for s in seen} == {total}
    assert all(s[2] for s in seen[:-1]) and seen[-1][2] == ""
    assert "window of no job node" in {s[2] for s in seen}

    cmd = [sys.executable, "-m", "llem.cli.main", "ledger", "check", "--ledger", str(path)]
    config = tmp_path / "llem.yaml"
    config.write_text(f"cluster: test\nledger: {path}\n")
    env = dict(os.environ, LLEM_CONFIG=str(config))
    piped = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "" and "ok (" in piped.stdout
    main, term = pty.openpty()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=term, env=env, timeout=120)
        os.close(term)
        term = -1
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
        if term != -1:
            os.close(term)
    assert proc.returncode == 0
    text = shown.decode()
    assert f"0/{total} checks" in text and f"{total}/{total} checks" in text, text
    assert "window of no job node" in text


def _migration(migrations):
    (mig,) = [m for m in migrations if m.__name__.endswith("_report_rollups")]
    return mig


def test_migration_fills_rollups_from_the_history(ledger_path, tmp_path):
    """A site upgrading keeps its history: the migration's backfill gives the roll-ups the
    merge kept."""
    path = tmp_path / "copy.db"
    path.write_bytes(ledger_path.read_bytes())
    with Ledger(path) as ledger:
        merged = _dump(ledger)

        def upgrade() -> None:
            ledger.db.execute("DROP TABLE job_node_hours")
            ledger.db.execute("DROP TABLE job_node_gpus")
            _migration(ledger_mod.MIGRATIONS)(ledger.db)

        ledger._txn(upgrade)
        assert _dump(ledger) == merged
        assert check_ledger(ledger) == []


@pytest.mark.postgres
def test_postgres_merge_and_migration_keep_the_same_rollups(ledger_path, pg_server, tmp_path):
    """The same slices merged into PostgreSQL give SQLite's roll-ups (natural keys); a
    newer export replaces them; the PostgreSQL migration's backfill and ``llem ledger copy``
    give them too, and the report reads them there byte-identical to the raw rows."""
    items = []
    for job in NOVEMBER + CROSSING:
        for d in job_and_node_slices(tmp_path, job):
            items.append((d, digest(json.dumps(d, sort_keys=True).encode())))
    url = pg_server.database("rollups_merge")
    with PgLedger(url) as pg, Ledger(tmp_path / "twin.db") as lite:
        for led in (pg, lite):
            led.merge(items, now_ns=utc_ns("2024-02-01 00:00"), grace_s=3600.0)
            led.merge(items, now_ns=utc_ns("2024-02-01 00:00"), grace_s=3600.0)
        assert pg.canonical_dump() == lite.canonical_dump()
        assert check_ledger(pg) == []
        newer = copy.deepcopy(items[0][0])
        newer["created_ns"] += 1
        for row in newer["energy"]:
            row["energy_uj"] //= 3
        for led in (pg, lite):
            led.merge([(newer, "x" * 64)], now_ns=utc_ns("2024-02-01 00:00"), grace_s=3600.0)
        assert pg.canonical_dump() == lite.canonical_dump()
        assert check_ledger(pg) == []
        merged = pg.canonical_dump()
        with pg._txn() as cur:
            cur.execute("DROP TABLE job_node_hours, job_node_gpus")
            _migration(pg_schema.MIGRATIONS)(cur)
        assert pg.canonical_dump() == merged
        pg.rebuild_rollups()
        assert pg.canonical_dump() == merged
        period = frames.month_period("2023-11")
        fast = _rendered(pg, ledger_path, period, rollups=True)
        assert fast == _rendered(pg, ledger_path, period, rollups=False)
        assert fast == _rendered(lite, ledger_path, period, rollups=True)
    copy_url = pg_server.database("rollups_copy")
    with q.open_readonly(ledger_path) as src, PgLedger(copy_url) as dst:
        copy_ledger(src, dst, source_name=str(ledger_path))
        assert check_ledger(dst) == []
        assert dst.query("SELECT COUNT(*) FROM job_node_hours") == src.query(
            "SELECT COUNT(*) FROM job_node_hours"
        )


# -- runs inside the period, read from job_runs (schema 10) ---------------------------------


def _constant_factors(period) -> dict[int, float]:
    """An annual intensity's factors: one per month, so every day has one."""
    return {h: 2.5e-7 for h in period.hours()}


def _inside_and_fast(ledger, period) -> tuple[int, int, int]:
    """(runs, runs inside the period, runs read whole from job_runs) of the period."""
    params = {
        "start_ns": period.start_ns,
        "end_ns": period.end_ns,
        "start_s": period.start_ns // S,
        "end_s": -(-period.end_ns // S),
    }
    where = "r.run_end_ns > :start_ns AND r.run_start_ns < :end_ns"
    return tuple(
        ledger.query(f"SELECT COUNT(*) FROM job_runs r WHERE {where} AND {cond}", params)[0][0]
        for cond in ("1 = 1", q.INSIDE, q._fast(ledger))
    )


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_runs_inside_the_period_give_what_their_rollups_give(ledger_path, period):
    """With one carbon factor per day (an annual intensity), a run inside the period and one
    UTC day is read whole from ``job_runs``: per run, per day and in the period's sums the
    same figures as its job nodes and hourly roll-ups (CO2e to a float's last digits)."""
    s, e = period.start_ns, period.end_ns
    factors = _constant_factors(period)
    with q.open_readonly(ledger_path) as ledger:
        assert q.uses_run_spans(ledger)
        q.load_hour_factors(ledger, factors)
        runs, inside, fast = _inside_and_fast(ledger, period)
        assert fast <= inside < runs  # the crossing jobs are not inside any period
        assert fast > 0 or period.label == "2023-12"  # December holds only a crossing job
        assert q.runs(ledger, s, e) == q.runs(ledger, s, e, rollups=False)
        by_day = q.energy_by_run_day(ledger, s, e)
        raw = q.energy_by_run_day(ledger, s, e, rollups=False)
        assert [r[:8] for r in by_day] == [r[:8] for r in raw] and by_day
        assert [r[8] for r in by_day] == pytest.approx([r[8] for r in raw], rel=1e-12)
        with_factors = q.period_totals(ledger, s, e, 100.0, g_per_uj_by_hour=factors)
        hourly = q.period_totals(ledger, s, e, 100.0, rollups=False)
    assert with_factors.keys() == hourly.keys()
    for key in with_factors:
        if key != "energy_by_hour":
            assert with_factors[key] == hourly[key], key
    # one factor in every hour: each run inside the period is read whole (not only those
    # inside one day), and CO2e is the same float however the energy is spread over hours
    assert q._one_factor(factors, s // S, -(-e // S))
    f = frames.Factors(factors, 3.0, 7.0)
    assert frames.totals_of_sums(with_factors, f) == frames.totals_of_sums(hourly, f)


def test_a_factor_missing_in_one_hour_is_not_one_factor():
    period = frames.month_period("2023-11")
    s, e = period.start_ns // S, -(-period.end_ns // S)
    factors = _constant_factors(period)
    assert q._one_factor(factors, s, e)
    assert not q._one_factor({**factors, s + 7200: 1e-7}, s, e)
    del factors[e - 3600]
    assert not q._one_factor(factors, s, e)


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_the_nodes_that_ran_a_job_are_those_of_the_runs_node_runs(ledger_path, period):
    """``job_nodes_in_period`` walks the nodes one by one; it names the nodes that a join of
    the period's runs to their node runs names (a node run with time in the period)."""
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as ledger:
        joined = ledger.query(
            "SELECT DISTINCT jn.node FROM job_runs r JOIN job_nodes jn ON jn.cluster = r.cluster "
            "AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns "
            "WHERE r.run_end_ns > ? AND r.run_start_ns < ? "
            "AND MIN(jn.end_ns, ?) > MAX(jn.start_ns, ?) ORDER BY jn.node",
            (s, e, e, s),
        )
        every = ledger.query("SELECT DISTINCT node FROM job_nodes")
        assert q.job_nodes_in_period(ledger, s, e) == [n for (n,) in joined]
    if period.label == "2023-12":
        assert 0 < len(joined) < len(every)  # only the job across the month's end ran


def _hourly_factors(period) -> dict[int, float]:
    """An hourly series: no day has one factor, so no run is read whole."""
    return {h: 1e-7 * (1 + h // 3600 % 7) for h in period.hours()}


@pytest.mark.parametrize("hourly", [False, True], ids=["annual", "hourly"])
@pytest.mark.parametrize("account", [None, "astro"])
@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_the_energy_frame_made_from_the_runs_read_is_the_energy_read(
    ledger_path, period, account, hourly
):
    """The report reads the month's runs once: the energy rows of the runs inside one day of
    one factor are made from the runs' own row (``runs(fast_energy=True)``), the others read
    (``energy_by_run_day(fast_apart=True)``). The frame is the one of every row read, to the
    last bit of every float, in the same order and with the same dtypes."""
    s, e = period.start_ns, period.end_ns
    # an annual factor with every bit of a float used: the products are rounded as the
    # read's sums are (dialect.settle)
    factors = _hourly_factors(period) if hourly else dict.fromkeys(period.hours(), 1e-6 / 3)
    with q.open_readonly(ledger_path) as ledger:
        q.load_hour_factors(ledger, factors)
        whole = frames.records(q.energy_by_run_day(ledger, s, e, account), q.ENERGY_COLUMNS)
        read = q.energy_by_run_day(ledger, s, e, account, fast_apart=True)
        runs = q.runs(ledger, s, e, account, fast_energy=True)
        assert [row[: len(q.RUN_COLUMNS)] for row in runs] == q.runs(ledger, s, e, account)
        with pytest.raises(ValueError, match="run spans"):
            q.runs(ledger, s, e, account, rollups=False, fast_energy=True)
    made = frames.energy_frame(
        read, frames.records(runs, q.RUN_COLUMNS + q.FAST_COLUMNS), q.uniform_days(factors)
    )
    # The same rows in the same order, to the last bit; only rows equal in every value but
    # their run id may come in another order (energy_by_run_day leaves that order open: it
    # differs between the backends too), which changes no sum.
    pd.testing.assert_frame_equal(
        made.drop(columns="run_id"), whole.drop(columns="run_id"), check_exact=True
    )
    everything = list(q.ENERGY_COLUMNS)
    pd.testing.assert_frame_equal(
        made.sort_values(everything).reset_index(drop=True),
        whole.sort_values(everything).reset_index(drop=True),
        check_exact=True,
    )
    assert len(whole)
    if hourly or period.label == "2023-12":  # December holds only a crossing job
        assert len(read) == len(whole)
    else:
        assert len(read) < len(whole)  # most rows made from the runs


def test_a_run_inside_the_period_is_read_from_job_runs_and_checked(ledger_path, tmp_path):
    """The fast path really reads ``job_runs``: a run whose stored figures drift shows the
    drift in the report's queries (and not in the raw rows'), and ``llem ledger check``
    names it."""
    path = tmp_path / "drift.db"
    path.write_bytes(ledger_path.read_bytes())
    period = frames.month_period("2023-11")
    s, e = period.start_ns, period.end_ns
    with Ledger(path) as ledger:
        params = {"start_ns": s, "end_ns": e, "start_s": s // S, "end_s": e // S}
        (cluster, job_id, start), *_ = ledger.query(
            "SELECT r.cluster, r.job_id, r.run_start_ns FROM job_runs r "
            f"WHERE {q.INSIDE} AND r.gpu_ns > 0 ORDER BY r.job_id",
            params,
        )
        ledger.write(
            [
                (
                    "UPDATE job_runs SET gpu_ns = gpu_ns + ?, cpu_energy_uj = cpu_energy_uj + 1 "
                    "WHERE cluster = ? AND job_id = ? AND run_start_ns = ?",
                    [(3600 * S, cluster, job_id, start)],
                )
            ]
        )
        problems = check_ledger(ledger)
    assert len(problems) == 1 and "GPU time" in problems[0] and job_id in problems[0], problems
    with q.open_readonly(path) as ledger:
        q.load_hour_factors(ledger, _constant_factors(period))
        fast = {r[2]: r for r in q.runs(ledger, s, e)}
        slow = {r[2]: r for r in q.runs(ledger, s, e, rollups=False)}
        assert fast[job_id][-1] == slow[job_id][-1] + 3600.0
        cpu = {r[0]: r[3] for r in q.energy_by_run_day(ledger, s, e)}
        raw = {r[0]: r[3] for r in q.energy_by_run_day(ledger, s, e, rollups=False)}
    assert sum(cpu.values()) == sum(raw.values()) + 1


def _run_spans(led) -> list[tuple]:
    return led.query(
        "SELECT cluster, job_id, run_start_ns, node_ns, gpu_ns FROM job_runs "
        "ORDER BY cluster, job_id, run_start_ns"
    )


def test_migration_fills_run_spans_as_the_merge_does(ledger_path, tmp_path):
    path = tmp_path / "copy.db"
    path.write_bytes(ledger_path.read_bytes())
    (migration,) = [m for m in ledger_mod.MIGRATIONS if m.__name__ == "_v10_run_spans"]
    with Ledger(path) as ledger:
        merged = _run_spans(ledger)
        assert any(r[4] > 0 for r in merged) and all(r[3] > 0 for r in merged)
        ledger.write([("UPDATE job_runs SET node_ns = ?, gpu_ns = ?", [(0, 0)])])
        ledger._txn(lambda: migration(ledger.db))
        assert _run_spans(ledger) == merged
        assert check_ledger(ledger) == []


@pytest.mark.postgres
def test_postgres_migration_fills_run_figures_and_reads_them(ledger_path, pg_server):
    """``llem ledger copy`` carries ``node_ns``, ``gpu_ns`` and the GPU floors; the
    PostgreSQL migrations compute them as the merge did; the report's queries give SQLite's
    answers."""
    url = pg_server.database("run_spans")
    (migration,) = [m for m in pg_schema.MIGRATIONS if m.__name__ == "_v10_run_spans"]
    (floors,) = [m for m in pg_schema.MIGRATIONS if m.__name__ == "_v11_idle_floor"]
    period = frames.month_period("2023-11")
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as src, PgLedger(url) as pg:
        copy_ledger(src, pg, source_name=str(ledger_path))
        merged = _run_spans(src)
        assert _run_spans(pg) == merged
        dump = pg.canonical_dump()
        indexes = pg.query(
            "SELECT tablename, indexname, indexdef FROM pg_indexes "
            "WHERE tablename IN ('job_runs', 'job_nodes') ORDER BY 1, 2"
        )
        assert len(indexes) >= 12  # the runs' ten and the job nodes' (made again after)
        with pg._txn() as cur:
            cur.execute("UPDATE job_runs SET node_ns = 0, gpu_ns = 0")
            migration(cur)
            cur.execute("UPDATE job_nodes SET gpu_min_uj = NULL")
            cur.execute("UPDATE job_runs SET gpu_count = 0, gpu_floor_w = NULL")
            floors(cur)
        assert _run_spans(pg) == merged and pg.canonical_dump() == dump
        assert (
            pg.query(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE tablename IN ('job_runs', 'job_nodes') ORDER BY 1, 2"
            )
            == indexes
        )
        assert check_ledger(pg) == []
        for led in (src, pg):
            q.load_hour_factors(led, _constant_factors(period))
        assert q.runs(pg, s, e) == q.runs(src, s, e)
        assert q.energy_by_run_day(pg, s, e) == q.energy_by_run_day(src, s, e)
        assert q.runs(pg, s, e, fast_energy=True) == q.runs(src, s, e, fast_energy=True)
        assert q.energy_by_run_day(pg, s, e, fast_apart=True) == q.energy_by_run_day(
            src, s, e, fast_apart=True
        )
        assert q.idle_gpus(pg, s, e, 100.0) == q.idle_gpus(src, s, e, 100.0)
        assert q.runs(pg, s, e, fast_energy=True, idle_w=100.0) == q.runs(
            src, s, e, fast_energy=True, idle_w=100.0
        )
        assert q.idle_gpus(pg, s, e, 100.0, fast_apart=True) == q.idle_gpus(
            src, s, e, 100.0, fast_apart=True
        )
        assert q.period_totals(
            pg, s, e, 100.0, g_per_uj_by_hour=_constant_factors(period)
        ) == q.period_totals(src, s, e, 100.0, g_per_uj_by_hour=_constant_factors(period))


def test_idle_gpus_are_judged_only_in_runs_that_may_have_one(ledger_path, tmp_path):
    """Schema 11: a run inside the period whose least-used GPU averaged at least the idle
    threshold gives its row from ``job_runs``; the idle ones (jobs 104 and 301) are still
    judged from their GPUs. A run whose stored floor lies is believed (so the fast path is
    what the report reads) and ``llem ledger check`` names it."""
    period = frames.month_period("2023-11")
    s, e = period.start_ns, period.end_ns
    params = {"start_ns": s, "end_ns": e, "start_s": s // S, "end_s": e // S, "idle_w": 100.0}
    with q.open_readonly(ledger_path) as ledger:
        assert q.uses_gpu_floor(ledger)
        skipped = ledger.query(
            f"SELECT r.job_id FROM job_runs r WHERE r.gpu_count > 0 AND {q.NOT_IDLE}", params
        )
        idle = q.idle_gpus(ledger, s, e, 100.0)
        assert idle == q.idle_gpus(ledger, s, e, 100.0, rollups=False)
        # every threshold: below every GPU, above every GPU, between them
        for watts in (0.0, 50.0, 250.0, 1e6):
            assert q.idle_gpus(ledger, s, e, watts) == q.idle_gpus(
                ledger, s, e, watts, rollups=False
            )
    idle_jobs = {r[0] for r in idle if r[1] > 0}
    assert skipped and not idle_jobs & {r[0] for r in skipped}
    path = tmp_path / "floor.db"
    path.write_bytes(ledger_path.read_bytes())
    with Ledger(path) as ledger:
        (run_id, job_id), *_ = ledger.query(
            "SELECT r.rowid, r.job_id FROM job_runs r WHERE r.gpu_floor_w < 100 AND "
            f"{q.INSIDE} ORDER BY r.job_id",
            params,
        )
        ledger.write([("UPDATE job_runs SET gpu_floor_w = 1e9 WHERE rowid = ?", [(run_id,)])])
        problems = check_ledger(ledger)
        assert len(problems) == 1 and "least GPU power" in problems[0], problems
        assert job_id in problems[0]
        before = {r[0]: r for r in idle}
        after = {r[0]: r for r in q.idle_gpus(ledger, s, e, 100.0)}
    assert before[run_id][1] > 0 and after[run_id][1] == 0


@pytest.mark.parametrize("watts", [0.0, 50.0, 100.0, 250.0, 1e6])
@pytest.mark.parametrize("account", [None, "astro"])
@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_the_idle_frame_made_from_the_runs_read_is_the_idle_read(
    ledger_path, period, account, watts
):
    """The runs with GPUs of which none may be idle (``NOT_IDLE``) have their idle-GPU row
    made from the runs' own row (``runs(idle_w=...)``), the others read
    (``idle_gpus(fast_apart=True)``): the same row for every run as the whole read, at every
    threshold (below every GPU, between them, above every GPU), and so the same jobs frame."""
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as ledger:
        q.load_hour_factors(ledger, _constant_factors(period))
        whole = q.idle_gpus(ledger, s, e, watts, account)
        read = q.idle_gpus(ledger, s, e, watts, account, fast_apart=True)
        runs = q.runs(ledger, s, e, account, fast_energy=True, idle_w=watts)
        assert [row[: len(q.RUN_COLUMNS) + len(q.FAST_COLUMNS)] for row in runs] == q.runs(
            ledger, s, e, account, fast_energy=True
        )
        energy = q.energy_by_run_day(ledger, s, e, account)
        with pytest.raises(ValueError, match="fast_energy"):
            q.runs(ledger, s, e, account, idle_w=watts)
        with pytest.raises(ValueError, match="gpu_floor_w"):
            q.idle_gpus(ledger, s, e, watts, account, rollups=False, fast_apart=True)
    columns = q.RUN_COLUMNS + q.FAST_COLUMNS + q.FAST_IDLE_COLUMNS
    made = frames.idle_frame(read, frames.records(runs, columns, frames.NUMBERS))
    by_run = {row[0]: row for row in whole}
    assert sorted(made.itertuples(index=False, name=None)) == sorted(by_run.values())
    assert len(made) == len(whole)
    if period.label == "2023-11" and watts <= 100.0:  # the test GPUs draw 30-300 W
        assert len(read) < len(whole)  # rows made from the runs
    factors = frames.Factors(_constant_factors(period))
    plain = frames.records(runs, columns).drop(columns=list(q.FAST_COLUMNS + q.FAST_IDLE_COLUMNS))
    pd.testing.assert_frame_equal(
        frames.jobs_frame(plain, energy, made, factors),
        frames.jobs_frame(plain, energy, whole, factors),
        check_exact=True,
    )


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_the_runs_frame_made_by_column_type_is_pandas_own(ledger_path, period):
    """``frames.records`` with the runs' column types gives ``from_records``' frame: values,
    dtypes, NaN, on the real rows and with a NULL put in each column in turn."""
    s, e = period.start_ns, period.end_ns
    columns = q.RUN_COLUMNS + q.FAST_COLUMNS + q.FAST_IDLE_COLUMNS
    with q.open_readonly(ledger_path) as ledger:
        rows = q.runs(ledger, s, e, fast_energy=True, idle_w=100.0)
    assert rows
    cases = [rows] + [
        [tuple(None if j == k else v for j, v in enumerate(rows[0]))] + rows[1:]
        for k in range(len(columns))
    ]
    for case in cases:
        pd.testing.assert_frame_equal(
            frames.records(case, columns, frames.NUMBERS),
            pd.DataFrame.from_records(case, columns=columns),
            check_exact=True,
        )
    assert frames.records([], columns, frames.NUMBERS).empty


def test_migration_fills_gpu_floors_as_the_merge_does(ledger_path, tmp_path):
    path = tmp_path / "copy.db"
    path.write_bytes(ledger_path.read_bytes())
    (migration,) = [m for m in ledger_mod.MIGRATIONS if m.__name__ == "_v11_idle_floor"]
    with Ledger(path) as ledger:
        merged = _dump(ledger)
        assert ledger.query("SELECT COUNT(*) FROM job_runs WHERE gpu_floor_w > 0")[0][0] > 0
        ledger.write(
            [
                ("UPDATE job_nodes SET gpu_min_uj = NULL", [()]),
                (
                    "UPDATE job_runs SET gpu_count = 0, unresolved_gpus = 0, gpu_floor_w = NULL",
                    [()],
                ),
            ]
        )
        assert _dump(ledger) != merged
        ledger._txn(lambda: migration(ledger.db))
        assert _dump(ledger) == merged
        assert check_ledger(ledger) == []


def test_a_node_with_one_idle_and_one_busy_gpu_is_judged_from_its_gpus(tmp_path):
    """The floor is the least-used GPU's: a job node whose second GPU idled beside a busy
    one is never taken for a busy run. The slice is a real export with a second GPU added
    as a two-GPU node exports it (its device, energy rows and totals, 1 % of the first's)."""
    first = job_slices(tmp_path, "100", nodes=("n1",))
    data = copy.deepcopy(first[0])
    second = GPU_KEY.replace("GPU-a", "GPU-b")
    data["devices"][second] = dict(data["devices"][GPU_KEY], name="gpu1")
    data["energy"] += [
        dict(row, device=second, energy_uj=row["energy_uj"] // 100)
        for row in data["energy"]
        if row["device"] == GPU_KEY
    ]
    totals = data["node_totals"][GPU_KEY]
    data["node_totals"][second] = {
        k: v // 100 if isinstance(v, int) else v for k, v in totals.items()
    }
    data["job"]["gpus"] = [GPU_KEY, second]
    busy = sum(r["energy_uj"] for r in data["energy"] if r["device"] == GPU_KEY)
    span_s = (data["job"]["end_ns"] - data["job"]["start_ns"]) / S
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, [data])
        assert check_ledger(ledger) == []
        assert ledger.query("SELECT gpu_min_uj FROM job_nodes") == [(busy // 100,)]
        (count, floor), *_ = ledger.query("SELECT gpu_count, gpu_floor_w FROM job_runs")
        assert count == 2 and floor == pytest.approx(busy / 100 / span_s / 1e6, rel=1e-9)
        start = data["job"]["start_ns"] - 86400 * S
        end = data["job"]["end_ns"] + 86400 * S
        for watts in (floor / 2, floor * 10, busy / span_s / 1e6 * 2):
            fast = q.idle_gpus(ledger, start, end, watts)
            assert fast == q.idle_gpus(ledger, start, end, watts, rollups=False)
            assert fast[0][1:3] == ((0 if watts < floor else 1 if watts < 50 else 2), 2)


# -- the runs' start floor (schema 12) -------------------------------------------------------


def _without_length_index(ledger_path, tmp_path):
    """A copy of the ledger as schema 11 left it: no ``job_runs_by_length``."""
    path = tmp_path / "schema11.db"
    path.write_bytes(ledger_path.read_bytes())
    with Ledger(path) as ledger:
        ledger.write([("DROP INDEX job_runs_by_length", [()])])
    return path


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
def test_the_start_floor_is_the_periods_start_less_the_longest_run(ledger_path, period):
    """Every run overlapping the period starts after the floor; the floor is one step of the
    run-length index (SQLite's plan searches it: no scan of the runs), and no later than
    needed: the longest run (302, 40 h over November's end) starts just after it in
    December."""
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as ledger:
        assert ledger.has_index("job_runs_by_length")
        floor = q.run_start_floor(ledger, s)
        runs = ledger.query("SELECT run_start_ns, run_end_ns FROM job_runs")
        plan = " ".join(
            row[-1]
            for row in ledger.query(
                "EXPLAIN QUERY PLAN SELECT MAX(run_end_ns - run_start_ns) FROM job_runs"
            )
        )
    assert floor == s - max(end - start for start, end in runs)
    overlapping = [start for start, end in runs if end > s and start < e]
    assert overlapping and all(start > floor for start in overlapping)
    assert plan == "SEARCH job_runs USING INDEX job_runs_by_length", plan
    if period.label == "2023-12":
        assert min(overlapping) - floor == 4 * 3600 * S  # 302: 40 h from Nov 29 12:00


def test_no_floor_without_the_index_or_without_a_run(ledger_path, tmp_path):
    """A ledger not migrated yet (``MAX`` would read every run) and an empty one give none:
    the report then reads every run that ends after the period's start, as before."""
    s = frames.month_period("2023-11").start_ns
    with q.open_readonly(_without_length_index(ledger_path, tmp_path)) as ledger:
        assert not ledger.has_index("job_runs_by_length")
        assert q.run_start_floor(ledger, s) is None
    with Ledger(tmp_path / "empty.db") as ledger:
        assert ledger.has_index("job_runs_by_length")
        assert q.run_start_floor(ledger, s) is None
        assert q.runs(ledger, s, s + 86400 * S) == []


@pytest.mark.parametrize("period", PERIODS, ids=lambda p: p.label)
@pytest.mark.parametrize("account", [None, "astro"])
def test_the_report_is_the_same_with_the_floor_and_without(ledger_path, tmp_path, period, account):
    """The floor only narrows the index range the runs are found in: the report (jobs
    across the period's start included: 301 into November, 302 into December) is the one of
    a ledger without the index, byte for byte, from the roll-ups and from the raw rows."""
    plain = _without_length_index(ledger_path, tmp_path)
    for rollups in (True, False):
        with q.open_readonly(ledger_path) as ledger:
            assert q.run_start_floor(ledger, period.start_ns) is not None
            with_floor = _rendered(ledger, ledger_path, period, rollups=rollups, account=account)
        with q.open_readonly(plain) as ledger:
            without = _rendered(ledger, ledger_path, period, rollups=rollups, account=account)
        assert with_floor == without
        assert "erin" in with_floor[0] or "frank" in with_floor[0]


def test_migration_12_indexes_the_run_lengths(ledger_path, tmp_path):
    """A schema-11 ledger opened by a writer (``llem aggregate``, ``llem ledger migrate``)
    gets the index; nothing else changes."""
    path = _without_length_index(ledger_path, tmp_path)
    with Ledger(path) as ledger:
        dump = _dump(ledger)
        ledger.write([("PRAGMA user_version = 11", [()])])
    with Ledger(path) as ledger:
        assert ledger.query("PRAGMA user_version") == [(ledger_mod.SCHEMA_VERSION,)]
        assert ledger_mod.SCHEMA_VERSION == 12
        assert ledger.has_index("job_runs_by_length")
        assert _dump(ledger) == dump
        assert check_ledger(ledger) == []


@pytest.mark.postgres
def test_postgres_floor_and_migration_12(ledger_path, pg_server):
    """PostgreSQL's ledger has the index from its schema and from the migration, and gives
    SQLite's floor and answers with it."""
    url = pg_server.database("run_length")
    (migration,) = [m for m in pg_schema.MIGRATIONS if m.__name__ == "_v12_run_length"]
    period = frames.month_period("2023-12")
    s, e = period.start_ns, period.end_ns
    with q.open_readonly(ledger_path) as src, PgLedger(url) as pg:
        copy_ledger(src, pg, source_name=str(ledger_path))
        assert pg.has_index("job_runs_by_length") and not pg.has_index("no_such_index")
        floor = q.run_start_floor(pg, s)
        assert floor == q.run_start_floor(src, s) is not None
        for led in (src, pg):
            q.load_hour_factors(led, _constant_factors(period))
        runs = q.runs(pg, s, e)
        assert runs == q.runs(src, s, e) and runs  # 302, across November's end
        with pg._txn() as cur:
            cur.execute("DROP INDEX job_runs_by_length")
        assert q.run_start_floor(pg, s) is None
        assert q.runs(pg, s, e) == runs
        with pg._txn() as cur:
            migration(cur)
        assert q.run_start_floor(pg, s) == floor


@pytest.mark.parametrize("rollups", [True, False], ids=["rollups", "raw"])
def test_a_days_co2e_of_one_factor_is_its_energy_times_that_factor(
    ledger_path, rollups, monkeypatch
):
    """A day of one factor: CO2e is its integer energy times the factor, one product, as
    for a run read whole: the same float, to the last bit before any rounding, whatever
    order the database adds the hours in. A day of an hourly series still adds each hour's
    product."""
    monkeypatch.setattr(q, "settled", lambda rows, *columns: rows)  # every bit compared
    period = frames.month_period("2023-11")
    s, e = period.start_ns, period.end_ns
    g = 1e-6 / 3  # every bit of the float used
    with q.open_readonly(ledger_path) as ledger:
        q.load_hour_factors(ledger, dict.fromkeys(period.hours(), g))
        annual = q.energy_by_run_day(ledger, s, e, rollups=rollups)
        hourly_factors = _hourly_factors(period)
        q.load_hour_factors(ledger, hourly_factors)
        hourly = q.energy_by_run_day(ledger, s, e, rollups=rollups)
        by_hour = ledger.query(
            "SELECT hour_s, SUM(energy_uj) FROM job_energy "
            "WHERE hour_s >= ? AND hour_s < ? GROUP BY hour_s",
            (s // S, e // S),
        )
    assert annual and all(row[8] == float(row[2]) * g for row in annual)
    total = sum(energy * hourly_factors[hour] for hour, energy in by_hour)
    assert sum(row[8] for row in hourly) == pytest.approx(total, rel=1e-12)
    assert sum(row[8] for row in hourly) != pytest.approx(sum(row[2] for row in hourly) * g)
