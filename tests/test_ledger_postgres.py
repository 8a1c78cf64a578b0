"""The ledger on a real PostgreSQL server: schema, migrations, merges equal to SQLite's,
partitions and retention, connection strings, the driver's absence."""

import copy
import json
import random
import subprocess
import sys

import pytest

from llem import slices
from llem.cluster import pg_schema
from llem.cluster.header import header_slice_from_env
from llem.cluster.ledger import SCHEMA_VERSION, Ledger, digest
from llem.cluster.pg_ledger import PgLedger, is_postgres
from llem.errors import LedgerError
from tests.helpers.ledger import NOW, merge
from tests.helpers.make_spool import make_spool
from tests.helpers.nodes import ENV, T0, S, job_slices

pytestmark = pytest.mark.postgres


def both(tmp_path, pg_url, name="l"):
    return Ledger(tmp_path / f"{name}.db"), PgLedger(pg_url)


def test_schema_is_the_sqlite_schema_table_by_table_column_by_column(tmp_path, pg_url):
    """A column added to one backend's migrations and not the other's fails here."""
    assert pg_schema.SCHEMA_VERSION == SCHEMA_VERSION
    sq, pg = both(tmp_path, pg_url)
    with sq, pg:
        sqlite_tables = {
            r[0]
            for r in sq.query("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")
        }
        assert set(pg.tables()) - set(pg_schema.EXTRA_TABLES) == sqlite_tables
        for table in sorted(sqlite_tables):
            assert pg.columns(table) == sq.columns(table), table
        assert pg.schema_version() == SCHEMA_VERSION


def test_migrations_run_once_and_a_newer_schema_is_refused(pg_url):
    with PgLedger(pg_url) as led:
        assert led.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
        led.db.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(99),))
    with pytest.raises(LedgerError, match="newer than this llem"):
        PgLedger(pg_url)


def test_a_reader_refuses_a_database_without_a_ledger(pg_server):
    url = pg_server.database("empty")
    with pytest.raises(LedgerError, match="llem ledger init"):
        PgLedger(url, readonly=True)
    with PgLedger(url) as led:  # a writer creates it, as on SQLite
        assert led.schema_version() == SCHEMA_VERSION


@pytest.mark.parametrize(
    "spec",
    ["postgresql://llem:secret@db/ledger", "host=db dbname=ledger password=secret"],
)
def test_a_password_in_the_configuration_is_refused(spec):
    text = spec if spec.startswith("postgresql") else "service=x " + spec
    with pytest.raises(LedgerError, match="holds a password") as info:
        PgLedger(text)
    assert "secret" not in str(info.value)


def test_which_settings_are_postgresql():
    assert is_postgres("postgresql://db/ledger") and is_postgres("service=llem")
    assert not is_postgres("/var/lib/llem/ledger.db") and not is_postgres("postgres.db")


def test_without_psycopg_the_error_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from llem.cluster.pg_ledger import PgLedger\n"
        "from llem.errors import LedgerError\n"
        "try:\n    PgLedger('postgresql:///x')\n"
        "except LedgerError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'llem[postgresql]'" in out.stdout


def test_sqlite_ledgers_never_import_psycopg(tmp_path):
    code = (
        "import sys\nfrom llem.cluster.ledger import open_ledger\n"
        f"open_ledger({str(tmp_path / 'l.db')!r}).close()\n"
        "from llem.cluster import acct_queries, report_queries, aggregate\n"
        "print('psycopg' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- merges: the same ledger as SQLite ------------------------------------------------------------


def _same_merges(tmp_path, pg_url, batches, name="l", **kwargs) -> str:
    sq, pg = both(tmp_path, pg_url, name)
    with sq, pg:
        stats = []
        for batch in batches:
            a, b = merge(sq, batch, **kwargs), merge(pg, batch, **kwargs)
            stats.append((a.jobs_touched, b.jobs_touched))
        assert pg.canonical_dump() == sq.canonical_dump()
        for a, b in stats:
            assert a == b
        return pg.canonical_dump()


def test_merging_in_any_order_and_twice_gives_the_sqlite_ledger(tmp_path, pg_server):
    items = job_slices(tmp_path, "100") + job_slices(
        tmp_path, "101", nodes=("n1", "n2"), nodelist="n[1-2]"
    )
    items.append(header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 5401 * S))
    dumps = set()
    for n, order in enumerate([items, items[::-1], items[2:] + items[:2]]):
        dumps.add(_same_merges(tmp_path, pg_server.database(), [order, order], f"a{n}"))
        dumps.add(_same_merges(tmp_path, pg_server.database(), [[i] for i in order], f"b{n}"))
    assert len(dumps) == 1
    assert "# job_energy 0" not in dumps.pop()


def test_a_newer_export_replaces_the_run_in_one_batch_or_two(tmp_path, pg_server):
    """With its windows' work and its power series: the older export's go with it."""
    old = job_slices(tmp_path, "100", nodes=("n1",), work=1000.0, unit="tokens")[0]
    new = copy.deepcopy(old)
    new["created_ns"] += 1
    for row in new["energy"]:
        row["energy_uj"] //= 2
    for point in new["power"]["points"]:
        point["energy_uj"] //= 2
    new["windows"][0]["work"] = 1500.0
    for n, batches in enumerate(([[old, new]], [[new, old]], [[old], [new]], [[new], [old]])):
        dump = _same_merges(tmp_path, pg_server.database(), batches, f"r{n}")
        assert f'"n1", {old["job"]["start_ns"]}' in dump
        assert "# job_power 1\n" in dump and "# windows 1\n" in dump
        assert '1500.0, "tokens"]' in dump and "1000.0" not in dump
    with PgLedger(pg_server.url(f"ledger_{pg_server.count}")) as pg:
        assert pg.job_runs("100")[0]["gpu_energy_uj"] == 250_000_000 * 3600 // 2
        ((points,),) = pg.query("SELECT points FROM job_power")
        half = old["power"]["points"][0]["energy_uj"] // 2
        assert json.loads(points)[0][2] == half


def test_node_hours_keep_the_latest_export_and_headers_win(tmp_path, pg_server):
    n1, n2, n3 = job_slices(tmp_path, "100")
    header = header_slice_from_env(
        {**ENV, "SLURM_JOB_ID": "100", "SLURM_JOB_NAME": "real", "SLURM_JOB_EXIT_CODE": "256"},
        "c1",
        now_ns=T0 + 5402 * S,
    )
    _same_merges(
        tmp_path,
        pg_server.database(),
        [[header], [n1, n2], [n3, n3, header]],
        "h",
        now_ns=T0 + 5403 * S,
    )


def test_a_spool_merged_in_batches_gives_the_sqlite_ledger(tmp_path, pg_url):
    spool = tmp_path / "spool"
    make_spool(spool, nodes=12, jobs=6, seed=3)
    items = []
    for path in sorted(spool.iterdir()):
        raw = path.read_bytes()
        items.append((slices.validate(json.loads(raw)), digest(raw)))
    random.Random(5).shuffle(items)
    sq, pg = both(tmp_path, pg_url)
    with sq, pg:
        for i in range(0, len(items), 17):
            for led in (sq, pg):
                led.merge(items[i : i + 17], now_ns=NOW, grace_s=3600.0)
        assert pg.canonical_dump() == sq.canonical_dump()
        assert pg.query("SELECT COUNT(*) FROM job_runs") == sq.query(
            "SELECT COUNT(*) FROM job_runs"
        )
        parts = {p[1] for p in pg.partitions()}
        assert parts >= {pg_schema.partition_name(t, T0 // S) for t in pg_schema.PARTITIONED}


# -- partitions and retention --------------------------------------------------------------------


def test_retention_drops_whole_months_only(tmp_path, pg_url):
    month = 31 * 86400 * S
    items = []
    for k in range(4):  # four jobs, one a month
        items += job_slices(tmp_path / str(k), str(200 + k), nodes=("n1",), start_ns=T0 + k * month)
    with PgLedger(pg_url) as pg:
        merge(pg, items, now_ns=T0 + 5 * month)
        before = [p[1] for p in pg.partitions() if p[0] == "job_energy"]
        assert len(before) == 4
        now_s = (T0 + 3 * month) // S  # keep the month of job 203 and the two before it
        dropped = pg.apply_retention(2, now_s)
        assert sorted(dropped) == sorted(
            pg_schema.partition_name(t, T0 // S) for t in ("job_energy",)
        )
        assert pg.query("SELECT COUNT(*) FROM job_runs") == [(4,)]  # runs and totals stay
        assert {
            r[0]
            for r in pg.query(
                "SELECT DISTINCT jn.job_id FROM job_energy e JOIN "
                "job_nodes jn ON jn.id = e.job_node_id"
            )
        } == {
            "201",
            "202",
            "203",
        }
        assert pg.apply_retention(2, now_s) == []


def test_partition_names_and_cuts():
    t = 1_700_000_000  # 2023-11-14
    assert pg_schema.partition_name("node_hours", t) == "node_hours_p202311"
    assert pg_schema.parse_partition("node_hours_p202311") == ("node_hours", 1_698_796_800)
    assert pg_schema.retention_cut_s(t, 1) == 1_696_118_400  # 2023-10-01
    assert pg_schema.expired_partitions(
        ["job_energy_p202309", "job_energy_p202310", "job_energy_p202311", "meta"], t, 1
    ) == ["job_energy_p202309"]


def test_repeated_energy_rows_of_one_slice_add_up_as_on_sqlite(tmp_path, pg_url):
    (data,) = job_slices(tmp_path, "100", nodes=("n1",))
    data["energy"].append(dict(data["energy"][0]))  # the same device, hour and method twice
    data["windows"].append(dict(data["windows"][0], status="ended"))  # the last one wins
    _same_merges(tmp_path, pg_url, [[data]], "dup")


def test_a_failed_batch_leaves_nothing_and_the_next_one_merges(tmp_path, pg_url):
    from llem.cluster.ledger import prepare

    good = job_slices(tmp_path, "100")
    bad = copy.deepcopy(good[0])
    bad["job"]["job_id"] = "666"
    bad["energy"][0]["energy_uj"] = -1  # what validation refuses; the database too
    raw = json.dumps(bad, sort_keys=True).encode()
    with PgLedger(pg_url) as pg, Ledger(tmp_path / "l.db") as sq:
        with pytest.raises(LedgerError, match="ledger write failed"):
            pg.merge_prepared([prepare(bad, digest(raw))], now_ns=NOW, grace_s=3600.0)
        assert pg.query("SELECT COUNT(*) FROM job_nodes") == [(0,)]
        merge(pg, good)
        merge(sq, good)
        assert pg.canonical_dump() == sq.canonical_dump()


def test_runs_are_recomputed_from_the_table_when_the_plan_missed(tmp_path, pg_url, monkeypatch):
    """Another writer (none takes the lock, e.g. a copy into a live ledger) inserting between
    the plan and the insert: the runs come from the table instead."""
    plan_runs = PgLedger._plan_runs

    def missed(self, *args):
        plan = plan_runs(self, *args)
        plan.inserted = set(list(plan.inserted)[1:])
        return plan

    monkeypatch.setattr(PgLedger, "_plan_runs", missed)
    items = job_slices(tmp_path, "100") + job_slices(tmp_path, "101", nodes=("n1",))
    _same_merges(tmp_path, pg_url, [items[:2], items[2:]], "missed")


def test_the_bench_generator_writes_the_same_ledger_on_both(tmp_path, pg_url):
    from llem.cluster.ledger_tools import check_ledger
    from tests.helpers import make_ledger

    jobs = list(make_ledger.generate(300, seed=4, now_s=1_780_000_000, days=60))
    path = tmp_path / "lib" / "ledger.db"
    path.parent.mkdir(mode=0o755)
    assert make_ledger.write_jobs(path, jobs) == make_ledger.write_jobs_pg(pg_url, jobs) == 300
    sq, pg = Ledger(path, readonly=True), PgLedger(pg_url, readonly=True)
    with sq, pg:
        assert pg.canonical_dump() == sq.canonical_dump()
        assert check_ledger(pg) == [] and check_ledger(sq) == []


def test_steps_merge_and_are_replaced_as_on_sqlite(tmp_path, pg_server):
    """A job's Slurm steps (issue 19): merged as on SQLite, beside a slice without steps;
    a newer export of the run replaces its steps."""
    steps = {"batch": 1, "0": 3}
    old = job_slices(tmp_path, "100", nodes=("n1",), steps=steps)[0]
    new = copy.deepcopy(old)
    new["created_ns"] += 1
    new["steps"] = new["steps"][:1]
    plain = job_slices(tmp_path, "101", nodes=("n1",))[0]
    for n, batches in enumerate(([[old, plain]], [[old], [new, plain]], [[new, old, plain]])):
        dump = _same_merges(tmp_path, pg_server.database(), batches, f"s{n}")
        assert f"# job_steps {2 if n == 0 else 1}\n" in dump


def test_a_migration_under_roles_gives_the_reader_its_new_table(pg_server, tmp_path):
    """A ledger made by ``llem ledger init --roles`` before ``_v4_work_and_power``: the
    aggregator's login migrates it as ``llem_writer``, and a reader may read ``job_power``
    (``llem job`` on a login node) without another ``GRANT``."""
    import psycopg

    from llem.cli.ledger import ledger as ledger_cli
    from llem.cli.main import run
    from llem.cluster.ledger import MIGRATIONS, _v4_work_and_power

    url = pg_server.database("rolesmig")
    assert run(ledger_cli, ["init", "--roles", "--ledger", url], prog_name="llem ledger") == 0
    before = MIGRATIONS.index(_v4_work_and_power)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE job_power")
        conn.execute("ALTER TABLE windows DROP COLUMN work, DROP COLUMN unit")
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(before),))
        for role, group in (("migrator", "llem_writer"), ("carol", "llem_reader")):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE {group}")
    with PgLedger(url.replace("llem_test@", "migrator@")) as led:  # migrates, then merges
        assert led.schema_version() == SCHEMA_VERSION
        merge(led, job_slices(tmp_path, "100", work=7.0, unit="tokens"))
    with PgLedger(url.replace("llem_test@", "carol@"), readonly=True) as led:
        assert led.query("SELECT COUNT(*) FROM job_power") == [(3,)]
        assert led.query("SELECT DISTINCT work, unit FROM windows") == [(7.0, "tokens")]
        ((owner,),) = led.query("SELECT tableowner FROM pg_tables WHERE tablename = 'job_power'")
        assert owner == "llem_writer"
