"""``llem aggregate`` into a real PostgreSQL ledger: SIGKILL at random points, two aggregators
at once, the advisory lock, retention after a pass, ``llem ledger`` and ``llem doctor``."""

import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from llem.cluster.aggregate import LedgerBusy, aggregate_once
from llem.cluster.ledger import MIGRATIONS, Ledger, _v4_work_and_power
from llem.cluster.ledger_tools import check_ledger, copy_ledger
from llem.cluster.pg_ledger import PgLedger
from llem.config import AggregateConfig
from llem.errors import LedgerError
from tests.helpers.aggregate import aggregate_cli, template_spool
from tests.helpers.ledger import merge
from tests.helpers.nodes import T0, S, job_slices, node_config

pytestmark = pytest.mark.postgres


def _fresh(tmp_path, template, name, ledger, readers=0):
    root = tmp_path / name
    root.mkdir()
    cfg = replace(
        node_config(root, "admin"),
        ledger=ledger,
        aggregate=AggregateConfig(grace_s=10**9, batch_size=4, readers=readers),
    )
    shutil.copytree(template, cfg.spool_dir)
    os.chmod(cfg.spool_dir, 0o700)
    return cfg


def _spool_left(cfg) -> int:
    return len([n for n in os.listdir(cfg.spool_dir) if n not in ("archive", "quarantine")])


def _dump(spec) -> str:
    cls = PgLedger if str(spec).startswith("postgresql") else Ledger
    with cls(spec, readonly=True) as led:
        return led.canonical_dump()


def test_sigkill_at_random_points_then_rerun_gives_the_clean_ledger(tmp_path, pg_server):
    template, items = template_spool(tmp_path)
    total = len(items) + 1
    clean = _fresh(tmp_path, template, "clean", pg_server.database("clean"))
    t0 = time.monotonic()
    proc = aggregate_cli(clean, "--once")
    assert proc.returncode == 0, proc.stderr
    clean_s = time.monotonic() - t0
    expected = _dump(clean.ledger)
    assert "# job_runs 100" in expected and "# quarantine 1" in expected
    on_sqlite = _fresh(tmp_path, template, "sqlite", str(tmp_path / "sqlite" / "ledger.db"))
    assert aggregate_cli(on_sqlite, "--once").returncode == 0
    assert _dump(on_sqlite.ledger) == expected  # the same facts as on SQLite
    rng = random.Random(7)
    killed_mid_merge = 0
    runs = 12
    for run in range(runs):
        cfg = _fresh(tmp_path, template, f"run{run}", pg_server.database("kill"), readers=run % 2)
        proc = aggregate_cli(cfg, "--once", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if run % 3 == 0:  # anywhere: start-up, connection, lock, reading, merging
            time.sleep(rng.uniform(0.0, clean_s))
        else:  # somewhere in the merge
            while proc.poll() is None and _spool_left(cfg) == total:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.5 * clean_s))
        proc.kill()  # SIGKILL
        proc.wait(10)
        killed_mid_merge += 0 < _spool_left(cfg) < total
        # As the next pass from cron: it waits for the killed one's session to go (its
        # backend may still be finishing the statement it was running).
        rerun = aggregate_cli(cfg, "--once", "--wait", "30")
        assert rerun.returncode == 0, rerun.stderr
        assert "nothing done" not in rerun.stderr
        assert _dump(cfg.ledger) == expected, f"run {run}: ledger differs after a kill"
        with PgLedger(cfg.ledger, readonly=True) as led:
            assert check_ledger(led) == []
        assert _spool_left(cfg) == 0
    print(f"clean run {clean_s:.2f} s; {killed_mid_merge} of {runs} kills landed mid-merge")
    assert killed_mid_merge >= 4, "the kills rarely landed inside a merge"


def test_two_aggregators_at_once_merge_once(tmp_path, pg_server):
    template, _ = template_spool(tmp_path)
    clean = _fresh(tmp_path, template, "clean", pg_server.database("clean"))
    assert aggregate_cli(clean, "--once").returncode == 0
    cfg = _fresh(tmp_path, template, "both", pg_server.database("both"))
    procs = [
        aggregate_cli(
            cfg, "--once", "--wait", "60", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    merged = sorted(int(out.split()[1]) for out, _ in outs)
    assert merged == [0, 301]  # the second found the spool already merged
    assert _dump(cfg.ledger) == _dump(clean.ledger)


def test_the_advisory_lock_keeps_a_second_aggregator_out(tmp_path, pg_url):
    cfg = replace(node_config(tmp_path, "admin"), ledger=pg_url)
    os.makedirs(cfg.spool_dir, mode=0o700)
    with PgLedger(pg_url) as other:  # an aggregator on another host
        assert other.try_lock()
        with pytest.raises(LedgerBusy, match="another llem aggregate") as busy:
            aggregate_once(cfg, wait_s=0.3)
        pid = other.query("SELECT pg_backend_pid()")[0][0]
        assert f"backend pid {pid} (llem from a local socket, idle, connected " in str(busy.value)
    assert aggregate_once(cfg).merged == 0  # its session ended: the lock went with it


_HOLD_AND_SLEEP = """
import sys
from llem.cluster.pg_ledger import PgLedger
led = PgLedger(sys.argv[1])
assert led.try_lock()
led.db.execute("SET application_name = 'x\\x1b[31m'")
print("held", flush=True)
led.db.execute("SELECT pg_sleep(120)")
"""


def test_a_killed_aggregator_mid_statement_frees_the_lock_within_seconds(tmp_path, pg_url):
    """Replays the flake of stop 27: the killed aggregator's backend went on with its statement,
    its session and so the advisory lock with it, and the next pass found the ledger busy."""
    cfg = replace(node_config(tmp_path, "admin"), ledger=pg_url)
    os.makedirs(cfg.spool_dir, mode=0o700)
    PgLedger(pg_url).close()  # initialised
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_SLEEP, pg_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LedgerBusy) as busy:
            aggregate_once(cfg, wait_s=0.3)
        # PostgreSQL keeps application_name printable (ESC becomes ?), safe_text besides
        assert "(x?[31m from a local socket, active, connected" in str(busy.value)
        holder.kill()  # SIGKILL, its backend 120 s into nothing
        holder.wait(10)
        t0 = time.monotonic()
        assert aggregate_once(cfg, wait_s=60).merged == 0
        freed_s = time.monotonic() - t0
    finally:
        holder.kill()
    assert freed_s < 10, f"the lock was held {freed_s:.1f} s after its client died"


def test_retention_after_a_pass(tmp_path, pg_url):
    month = 31 * 86400 * S
    cfg = replace(node_config(tmp_path, "admin"), ledger=pg_url, ledger_retention_months=1)
    os.makedirs(cfg.spool_dir, mode=0o700)
    with PgLedger(pg_url) as led:
        for k in range(3):
            merge(
                led,
                job_slices(tmp_path / str(k), str(300 + k), nodes=("n1",), start_ns=T0 + k * month),
            )
    aggregate_once(cfg, now_ns=T0 + 2 * month)
    with PgLedger(pg_url, readonly=True) as led:
        months = sorted(p[1][-6:] for p in led.partitions() if p[0] == "job_energy")
        assert len(months) == 2  # the month of now and the one before
        assert led.query("SELECT COUNT(*) FROM job_runs") == [(3,)]
        assert check_ledger(led, cut_ns=led.retention_cut_s(1, (T0 + 2 * month) / S) * S) == []
        assert check_ledger(led) != []  # without the cut, the dropped rows are missed


# -- llem ledger copy / check ---------------------------------------------------------------------


def test_copy_both_ways_resumes_and_changes_nothing_twice(tmp_path, pg_server):
    template, _ = template_spool(tmp_path)
    src = _fresh(tmp_path, template, "src", str(tmp_path / "src" / "ledger.db"))
    assert aggregate_cli(src, "--once").returncode == 0
    pg = pg_server.database("copy")
    seen = []
    with Ledger(src.ledger, readonly=True) as a, PgLedger(pg) as b:
        # interrupted: the first chunks of job_energy went in, then the copy died
        calls = []

        def die_in_energy(table, done, total):
            calls.append(table)
            if table == "job_energy" and calls.count(table) == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            copy_ledger(a, b, source_name="src", progress=die_in_energy, chunk_rows=500)
        res = copy_ledger(
            a, b, source_name="src", progress=lambda *p: seen.append(p), chunk_rows=500
        )
        assert 0 < res.copied["job_energy"] < res.counts["job_energy"][0]  # resumed
        assert res.copied["job_nodes"] == 0
        again = copy_ledger(a, b, source_name="src", chunk_rows=500)
        assert set(again.copied.values()) == {0}
        with pytest.raises(LedgerError, match="a copy of src"):
            copy_ledger(a, b, source_name="elsewhere")
    assert seen[-1][1] == seen[-1][2]
    assert res.counts["job_power"] == (300, 300) and res.counts["windows"] == (300, 300)
    assert _dump(pg) == _dump(src.ledger)
    assert _dump(pg).count('2500.0, "tokens"]') == 300  # the windows' work came along
    back = tmp_path / "back" / "ledger.db"
    back.parent.mkdir(mode=0o755)
    with PgLedger(pg, readonly=True) as a, Ledger(back) as b:
        copy_ledger(a, b, source_name=pg)
    assert _dump(back) == _dump(src.ledger)
    # the copy is a working ledger: the aggregator carries on merging into it
    with PgLedger(pg) as b:
        merge(b, job_slices(tmp_path / "more", "9999"))
        assert check_ledger(b) == []


def test_copy_of_a_ledger_from_before_work_and_power(tmp_path, pg_url):
    """A source not yet migrated to _v4_work_and_power (read-only: never migrated by the
    copy): its windows arrive without work, and no power series."""
    import sqlite3

    path = tmp_path / "old" / "ledger.db"
    path.parent.mkdir(mode=0o755)
    with Ledger(path) as led:
        merge(led, job_slices(tmp_path, "100", work=10.0, unit="tokens"))
    db = sqlite3.connect(path)  # the ledger as llem left it before that migration
    db.executescript(
        "DROP TABLE job_power; ALTER TABLE windows DROP COLUMN work; "
        "ALTER TABLE windows DROP COLUMN unit; "
        f"PRAGMA user_version = {MIGRATIONS.index(_v4_work_and_power)}"
    )
    db.close()
    with Ledger(path, readonly=True) as a, PgLedger(pg_url) as b:
        res = copy_ledger(a, b, source_name=str(path))
        assert res.counts["job_power"] == (0, 0) and res.counts["windows"] == (3, 3)
        assert b.query("SELECT DISTINCT work, unit FROM windows") == [(None, None)]
        assert check_ledger(a) == [] and check_ledger(b) == []


def test_check_names_broken_invariants_on_either_backend(tmp_path, pg_url):
    items = job_slices(tmp_path, "100")
    for led in (Ledger(tmp_path / "l.db"), PgLedger(pg_url)):
        with led:
            merge(led, items)
            assert check_ledger(led) == []
            led.write([("UPDATE job_runs SET energy_uj = energy_uj + ?", [(1,)])])
            led.write([("DELETE FROM job_energy WHERE hour_s = ?", [(T0 // S,)])])
            problems = check_ledger(led)
            assert [p.split(":")[0] for p in problems][:2] == [
                "3 x job node energy differs from its hourly rows",
                "1 x run totals differ from its job nodes'",
            ]
            # the report's roll-ups still hold the deleted rows: drift from a rebuild
            assert [p.split(":")[0].split(" x ")[1] for p in problems[2:]] == [
                "hourly roll-up row differs from a rebuild from job_energy",
                "GPU roll-up row differs from a rebuild from job_energy",
            ]
    with PgLedger(pg_url) as led:  # no foreign keys on PostgreSQL: an orphan can exist
        led.write([("DELETE FROM job_nodes WHERE node = ?", [("n1",)])])
        problems = [p.split(":")[0] for p in check_ledger(led)]
        assert "1 x power series of no job node" in problems
        assert "1 x window of no job node" in problems
        assert any(p.endswith("hourly roll-up row of no job node") for p in problems)
        assert any(p.endswith("GPU roll-up row of no job node") for p in problems)


def test_llem_ledger_init_with_roles_and_a_reader_that_cannot_write(pg_server, tmp_path):
    import psycopg

    from llem.cli.ledger import ledger as ledger_cli
    from llem.cli.main import run

    url = pg_server.database("roles")
    assert run(ledger_cli, ["init", "--roles", "--ledger", url], prog_name="llem ledger") == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS alice")
        conn.execute("CREATE ROLE alice LOGIN IN ROLE llem_reader")
        owners = {
            r[0]
            for r in conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
        }
        assert owners == {"llem_writer"}
        conn.execute("DROP ROLE IF EXISTS aggregator")
        conn.execute("CREATE ROLE aggregator LOGIN IN ROLE llem_writer")
    # the aggregator's login merges; the month partitions it creates belong to llem_writer
    with PgLedger(url.replace("llem_test@", "aggregator@")) as led:
        merge(led, job_slices(tmp_path, "100"))
    assert run(ledger_cli, ["check", "--ledger", url], prog_name="llem ledger") == 0
    with PgLedger(url.replace("llem_test@", "aggregator@")) as led:
        assert led.apply_retention(1, (T0 + 400 * 86400 * S) / S)  # and it may drop them
        merge(led, job_slices(tmp_path / "b", "101"))
    with psycopg.connect(url, autocommit=True) as conn:
        owners = {
            r[0]
            for r in conn.execute(
                "SELECT tableowner FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename LIKE '%%_p2%%'"
            )
        }
        assert owners == {"llem_writer"}
    reader = url.replace("llem_test@", "alice@")
    with PgLedger(reader, readonly=True) as led:
        assert led.query("SELECT COUNT(*) FROM job_runs") == [(2,)]
        with pytest.raises(LedgerError, match="permission denied"):
            led.query("DELETE FROM job_runs")


def test_doctor_shows_backend_schema_partitions_and_last_merge(tmp_path, pg_url, monkeypatch):
    from llem.cli.doctor import diagnose, render

    with PgLedger(pg_url) as led:
        merge(led, job_slices(tmp_path, "100"))
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nstate_dir: {tmp_path / 'state'}\nledger: {pg_url}\n")
    report = diagnose({"LLEM_CONFIG": str(cfg), "PATH": os.environ["PATH"]})
    info = report["ledger"]
    assert info["backend"] == "postgresql" and info["version"].startswith("15")
    assert info["schema"] >= 3 and info["job_runs"] == 1
    # node_hours' only when the job's node slice came; the report's hourly roll-up's always
    assert {p["table"] for p in info["partitions"]} - {"node_hours"} == {
        "job_energy",
        "job_node_hours",
    }
    text = render(report)
    assert "backend postgresql 15" in text and "last merge" in text and "month partition" in text


def test_batch_size_auto_merges_larger_batches_into_postgresql(tmp_path, pg_server):
    """``aggregate.batch_size: auto``: 2,000 slices a transaction on PostgreSQL (its server
    spends less per slice in larger ones), 500 on SQLite; the same ledger either way."""
    from tests.helpers.make_spool import make_spool

    template = tmp_path / "template"
    counts = make_spool(template, 4, 150)
    total = counts["job_slices"] + counts["node_slices"]
    assert 500 < total < 1000
    commits, dumps = {}, {}
    for name, ledger in (
        ("postgresql", pg_server.database("auto")),
        ("sqlite", str(tmp_path / "sqlite" / "ledger.db")),
    ):
        cfg = _fresh(tmp_path, template, name, ledger)
        cfg = replace(cfg, aggregate=replace(cfg.aggregate, batch_size="auto"))
        batches: list[int] = []
        res = aggregate_once(cfg, after_commit=batches.append, accounting=False)
        assert res.merged == total and _spool_left(cfg) == 0
        commits[name], dumps[name] = len(batches), _dump(cfg.ledger)
    assert commits == {"postgresql": 1, "sqlite": 2}
    assert dumps["postgresql"] == dumps["sqlite"]
