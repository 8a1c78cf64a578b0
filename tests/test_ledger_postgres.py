"""The ledger on a real PostgreSQL server: schema, migrations, merges equal to SQLite's,
partitions and retention, connection strings, the driver's absence."""

import copy
import dataclasses
import json
import random
import re
import subprocess
import sys
import time

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
            pg_schema.partition_name(t, T0 // S) for t in ("job_energy", "job_node_hours")
        )  # the report's hourly roll-up goes with the energy rows it sums
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


# -- row-level security (llem ledger init --roles): the gateway's login sees its caller's rows


def _rls_ledger(pg_server, tmp_path, n_jobs: int):
    """A ledger of ``n_jobs`` generated jobs (200 users, 40 accounts) and two jobs merged
    from real node stores (uid 7001's job 100 in physics and uid 7002's job 101 in chem, with
    windows, power series and node hours), made private by ``llem ledger init --roles``;
    returns (the owner's URL, the gateway login's URL)."""
    import psycopg

    from llem.cli.ledger import ledger as ledger_cli
    from llem.cli.main import run
    from llem.node.export import export_node
    from tests.helpers import make_ledger
    from tests.helpers.nodes import build_store, node_config

    url = pg_server.database("rls")
    jobs = list(make_ledger.generate(n_jobs, seed=7, now_s=1_780_000_000, days=60, cluster="c1"))
    assert make_ledger.write_jobs_pg(url, jobs) == n_jobs
    with PgLedger(url) as led:
        for job_id, uid, account in (("100", 7001, "physics"), ("101", 7002, "chem")):
            data = job_slices(tmp_path / job_id, job_id, nodes=("n1", "n2"), windows=True)
            for d in data:
                d["job"].update(uid=uid, account=account)
            merge(led, data)
        store, _ = build_store(tmp_path / "hours" / "node.db")
        merge(led, [export_node(store, node_config(tmp_path), "n1", since_ns=T0, now_ns=NOW)])
        store.close()
        led.after_copy()
    for _ in range(2):  # run again (after an upgrade) it replaces the policies
        assert run(ledger_cli, ["init", "--roles", "--ledger", url], prog_name="llem ledger") == 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS gw")
        conn.execute("CREATE ROLE gw LOGIN IN ROLE llem_gateway")
    return url, url.replace("llem_test@", "gw@")


def _count(led, sql, params=()):
    return led.query(sql, params)[0][0]


def test_row_level_security_shows_the_gateway_only_its_callers_rows(pg_server, tmp_path):
    """Queries with no WHERE restriction at all, as the gateway's login with the caller set
    as the gateway sets it: user 7001 gets their own rows of every job table, a coordinator
    adds their account's, an admin all; node-level tables are for admins; with no caller set
    (or after the transaction) nothing; month partitions are not the gateway's to read."""
    owner_url, gw_url = _rls_ledger(pg_server, tmp_path, 300)
    tables = ("job_runs", "job_nodes", "job_energy", "windows", "job_power", "job_node_totals")
    with PgLedger(owner_url, readonly=True) as owner:
        assert owner.row_security() == (
            "this login is a superuser (superusers bypass row-level security)"
        )
        total = {t: _count(owner, f"SELECT COUNT(*) FROM {t}") for t in (*tables, "node_hours")}

        def own(table, where):  # the rows of the runs matching ``where``, counted as owner
            if table == "job_runs":
                return _count(owner, f"SELECT COUNT(*) FROM job_runs r WHERE {where}")
            nodes = (
                "SELECT jn.id FROM job_nodes jn JOIN job_runs r USING (cluster, job_id) "
                f"WHERE r.run_start_ns = jn.run_start_ns AND {where}"
            )
            if table == "job_nodes":
                return _count(owner, f"SELECT COUNT(*) FROM ({nodes}) x")
            return _count(owner, f"SELECT COUNT(*) FROM {table} WHERE job_node_id IN ({nodes})")

        mine = {t: own(t, "r.uid = 7001") for t in tables}
        coord = {t: own(t, "(r.uid = 7001 OR r.account = 'proj03')") for t in tables}
        ((user_uid, user_runs),) = owner.query(
            "SELECT uid, COUNT(*) FROM job_runs GROUP BY uid ORDER BY 2 DESC, 1 LIMIT 1"
        )
    assert all(mine[t] > 0 for t in tables) and all(total[t] > mine[t] for t in tables)
    assert coord["job_runs"] > mine["job_runs"] and total["node_hours"] > 0
    with PgLedger(gw_url, readonly=True) as gw:
        assert gw.row_security() is None
        for t in (*tables, "node_hours", "quarantine"):  # nobody set: nothing
            assert _count(gw, f"SELECT COUNT(*) FROM {t}") == 0, t
        assert _count(gw, "SELECT COUNT(*) FROM devices") > 0  # the nodes' hardware
        with gw.as_caller(7001):
            assert {t: _count(gw, f"SELECT COUNT(*) FROM {t}") for t in tables} == mine
            assert gw.query("SELECT DISTINCT uid, account FROM job_runs") == [(7001, "physics")]
            assert _count(gw, "SELECT COUNT(*) FROM node_hours") == 0
        with gw.as_caller(7001, ["proj03", 'we"ird \\ acc']):
            assert {t: _count(gw, f"SELECT COUNT(*) FROM {t}") for t in tables} == coord
        with gw.as_caller(user_uid):
            assert _count(gw, "SELECT COUNT(*) FROM job_runs") == user_runs
        with gw.as_caller(None, admin=True):
            assert {t: _count(gw, f"SELECT COUNT(*) FROM {t}") for t in tables} == {
                t: total[t] for t in tables
            }
            assert _count(gw, "SELECT COUNT(*) FROM node_hours") == total["node_hours"]
        assert _count(gw, "SELECT COUNT(*) FROM job_runs") == 0  # the caller ended with it
        (partition,) = gw.query(
            "SELECT relname FROM pg_class WHERE relispartition AND relkind = 'r' "
            "AND relname LIKE 'job_energy_p%' LIMIT 1"
        )[0]
        with pytest.raises(LedgerError, match="permission denied"):
            gw.query(f"SELECT COUNT(*) FROM {partition}")
        with pytest.raises(LedgerError, match="permission denied"):
            gw.query("DELETE FROM job_runs")
    # the same caller on every connection of a request (llem report's side connections)
    from llem.cluster.pg_ledger import caller_spec

    with PgLedger(caller_spec(gw_url, 7001, ["x y", "z'"]), readonly=True) as gw:
        assert gw.query("SELECT DISTINCT uid FROM job_runs") == [(7001,)]
        assert gw.query("SELECT current_setting('llem.accounts')") == [('{"x y","z\'"}',)]


def _plan(led, sql, params=()):
    return "\n".join(r[0] for r in led.query("EXPLAIN " + sql, params))


def test_a_caller_row_security_restricts_gets_no_start_floor(pg_server, tmp_path):
    """Replays a coordinator's statement of an account without runs through the gateway's
    login: the report's start floor (``MAX`` of the run lengths, down the length index)
    walked every index entry past the policy, 41-52 s on the 10M-job ledger, for each of the
    report's statements. Such a caller gets no floor (the reads of before schema 12), and
    the report is the one read with the floor by a login that sees every run; the owner,
    ``llem_reader`` and the gateway for an admin keep it."""
    import psycopg

    from llem.cluster import report_queries as q
    from llem.cluster.pg_ledger import caller_spec
    from llem.report import build_report, render
    from llem.report.period import month_period
    from tests.helpers.report_data import report_config

    owner_url, gw_url = _rls_ledger(pg_server, tmp_path, 2_000)
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS rd")
        conn.execute("CREATE ROLE rd LOGIN IN ROLE llem_reader")
    reader_url = owner_url.replace("llem_test@", "rd@")
    with PgLedger(owner_url, readonly=True) as owner:
        ((last_ns, account),) = owner.query(
            "SELECT MAX(run_end_ns), MIN(account) FROM job_runs WHERE account LIKE 'proj%'"
        )
    period = month_period(time.strftime("%Y-%m", time.gmtime(last_ns // S - 40 * 86400)))
    with PgLedger(owner_url, readonly=True) as owner:
        floor = q.run_start_floor(owner, period.start_ns)
    assert floor is not None and floor < period.start_ns
    sees_all = [
        reader_url,
        caller_spec(gw_url, None, (), admin=True),
    ]
    for spec in sees_all:
        with PgLedger(spec, readonly=True) as led:
            assert led.sees_every_run()
            assert q.run_start_floor(led, period.start_ns) == floor
    restricted = [
        gw_url,  # no caller set: no run at all
        caller_spec(gw_url, 7001),
        caller_spec(gw_url, None, ["no-such-account"]),
        caller_spec(gw_url, None, [account]),
    ]
    for spec in restricted:
        with PgLedger(spec, readonly=True) as led:
            assert not led.sees_every_run()
            assert q.run_start_floor(led, period.start_ns) is None
            assert "floor_ns" not in q._params(led, period.start_ns, period.end_ns, None)[0]
    config = report_config(tmp_path / "unused.db")
    texts = []
    for spec in (caller_spec(gw_url, None, [account]), owner_url):
        with q.open_readonly(spec) as led:
            rep = build_report(led, config, period, account=account)
        texts.append(render.to_json(rep))
    assert texts[0] == texts[1] and rep.totals["jobs"] > 0


def test_row_level_security_keeps_the_indexes(pg_server, tmp_path):
    """On a ledger of 20,000 runs, a user's queries through the gateway's login keep their
    indexes: ``llem job``'s run and energy look-ups and ``llem-acct``'s time window, and the
    policies' own look-ups go by primary key; no table is read whole."""
    from llem.cluster.acct_queries import RunFilter, Visibility, where_clause
    from llem.cluster.job_queries import RUN_FIELDS, _columns

    owner_url, gw_url = _rls_ledger(pg_server, tmp_path, 20_000)
    with PgLedger(owner_url, readonly=True) as owner:
        ((job_id, start_ns, end_ns),) = owner.query(
            "SELECT job_id, run_start_ns, run_end_ns FROM job_runs WHERE uid = 10000 "
            "ORDER BY run_start_ns LIMIT 1"
        )
        ids = [r[0] for r in owner.query("SELECT id FROM job_nodes WHERE job_id = ?", (job_id,))]
    with PgLedger(gw_url, readonly=True) as gw, gw.as_caller(10000):
        run_plan = _plan(
            gw,
            f"SELECT {_columns(RUN_FIELDS)} FROM job_runs WHERE cluster = ? AND job_id = ? "
            "ORDER BY run_start_ns DESC",
            ("c1", job_id),
        )
        assert "job_runs_pkey" in run_plan and "Seq Scan" not in run_plan, run_plan
        marks = ", ".join("?" * len(ids))
        energy_plan = _plan(
            gw,
            "SELECT job_node_id, device_key, method, SUM(energy_uj) FROM job_energy "
            f"WHERE job_node_id IN ({marks}) GROUP BY 1, 2, 3",
            ids,
        )
        assert "Seq Scan" not in energy_plan, energy_plan
        # the policies' look-ups: the job node by its key, its run by an index of job_runs
        assert "Index Scan using job_nodes_pkey on job_nodes" in energy_plan, energy_plan
        assert re.search(r"Index Scan using job_runs_\w+ on job_runs r", energy_plan), energy_plan
        # llem-acct's restriction, as the gateway builds it, for a day around that run
        where, params = where_clause(
            RunFilter(
                start_ns=start_ns - 43_200 * S,
                end_ns=end_ns + 43_200 * S,
                visible=Visibility(10000),
            )
        )
        window_plan = _plan(gw, f"SELECT r.job_id FROM job_runs r WHERE {where}", params)
        assert "Seq Scan" not in window_plan and "job_runs_by_" in window_plan, window_plan
        assert gw.query(
            "SELECT COUNT(*) FROM job_runs WHERE cluster = ? AND job_id = ?", ("c1", job_id)
        ) == [(1,)]


def test_a_gateway_whose_own_restriction_is_dropped_still_shows_only_the_callers_rows(
    pg_server, tmp_path, monkeypatch
):
    """A real gateway on the row-level-secured ledger, with its query-side restriction
    removed (as a bug would): a user's ``llem-acct -a`` still gets only their jobs, and
    ``llem job`` of another user's job still finds nothing, because the database applies
    the caller the gateway names per transaction."""
    from llem.cluster import acct_queries, job_queries
    from llem.config import Config
    from llem.gateway import client, wire
    from llem.gateway.privacy import Role
    from llem.gateway.server import Gateway, row_security_line

    owner_url, gw_url = _rls_ledger(pg_server, tmp_path, 300)
    with PgLedger(owner_url, readonly=True) as owner:
        others = owner.query("SELECT job_id FROM job_runs WHERE uid <> 10000 LIMIT 1")[0][0]
        mine = sorted(
            r[0]
            for r in owner.query(
                "SELECT COALESCE(array_job_id || '_' || array_task_id, job_id) FROM job_runs "
                "WHERE uid = 10000"
            )
        )
    assert row_security_line(gw_url).startswith("gateway: row-level security: on")
    assert "OFF: this login is a superuser" in row_security_line(owner_url)

    class OneUser:  # the caller is uid 10000, whoever connects
        def role(self, caller):
            return Role("user", acct_queries.Visibility(uid=10000))

    real_where = acct_queries.where_clause
    monkeypatch.setattr(
        acct_queries, "where_clause", lambda f: real_where(dataclasses.replace(f, visible=None))
    )
    monkeypatch.setattr(job_queries, "_visible", lambda visible: ("", ()))
    gw = Gateway(
        Config(cluster="c1", ledger=gw_url),
        socket_path=str(tmp_path / "gw.sock"),
        policy=OneUser(),
    )
    gw.start()
    try:
        target = client.Target(path=str(tmp_path / "gw.sock"))
        request = wire.Request(
            op="acct",
            cluster="c1",
            filter=acct_queries.RunFilter(start_ns=0),
            allocations=True,
            fields=("JobID",),
        )
        jobs = client.ask(target, request)["document"]["jobs"]
        assert sorted(j["JobID"] for j in jobs) == mine and mine
        answer = client.ask(target, wire.Request("job", "c1", job=wire.JobRequest(mine[0])))
        assert answer["view"]["user"] == "u000" and mine[0].startswith(answer["view"]["job_id"])
        with pytest.raises(client.GatewayError, match=f"no job {others} on cluster c1 among"):
            client.ask(target, wire.Request("job", "c1", job=wire.JobRequest(others)))
    finally:
        gw.close()
    # and without row-level security (the owner's login) the dropped restriction would leak
    gw = Gateway(
        Config(cluster="c1", ledger=owner_url),
        socket_path=str(tmp_path / "owner.sock"),
        policy=OneUser(),
    )
    gw.start()
    try:
        target = client.Target(path=str(tmp_path / "owner.sock"))
        jobs = client.ask(target, request)["document"]["jobs"]
        assert len(jobs) > len(mine)
    finally:
        gw.close()


def test_every_table_of_job_rows_has_a_row_security_policy(pg_server):
    """A table added to the ledger that holds a job's rows (by ``job_node_id``, or a run's
    ``uid``) must be in row-level security's lists, or the gateway's role would be refused
    it (no grant) or, granted, see every user's rows (job_steps was missed once)."""
    from llem.cluster import pg_schema

    url = pg_server.database("rls_tables")
    with PgLedger(url) as led:
        by_node = {
            t
            for (t,) in led.query(
                "SELECT c.table_name FROM information_schema.columns c JOIN pg_class k "
                "ON k.relname = c.table_name WHERE c.table_schema = 'public' "
                "AND c.column_name = 'job_node_id' AND NOT k.relispartition"
            )
        }
        by_uid = {
            t
            for (t,) in led.query(
                "SELECT c.table_name FROM information_schema.columns c JOIN pg_class k "
                "ON k.relname = c.table_name WHERE c.table_schema = 'public' "
                "AND c.column_name = 'uid' AND NOT k.relispartition"
            )
        }
    assert by_node == set(pg_schema.RLS_JOB_NODE_TABLES)
    assert by_uid == {*pg_schema.RLS_RUN_TABLES, "job_nodes"}  # job_nodes: as its run is


def test_an_older_export_committed_by_another_writer_mid_batch_is_still_replaced(
    tmp_path, pg_server, caplog
):
    """A writer without the aggregators' lock commits an older export of a job node after
    this batch planned its runs: the newer export still replaces it (its energy with it),
    and the runs are recomputed from the table; the ledger is SQLite's."""
    from llem.cluster.ledger import prepare
    from llem.cluster.pg_ledger import _JOB_NODE_COLUMNS, _cols

    old = job_slices(tmp_path, "100", nodes=("n1",))[0]
    new = copy.deepcopy(old)
    new["created_ns"] += 1
    for row in new["energy"]:
        row["energy_uj"] //= 2
    sq, pg = both(tmp_path, pg_server.database(), "race")
    with sq, pg, PgLedger(pg.spec) as other:
        merge(sq, [old])
        merge(sq, [new])
        plan = pg._plan_runs

        def plan_then_another_writer(*args, **kwargs):
            result = plan(*args, **kwargs)
            row = prepare(old, digest(json.dumps(old, sort_keys=True).encode()))[5]
            other.db.execute(
                f"INSERT INTO job_nodes ({_cols(_JOB_NODE_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(row))})",
                row,
            )
            return result

        pg._plan_runs = plan_then_another_writer
        with caplog.at_level("INFO", logger="llem.cluster.pg_ledger"):
            merge(pg, [new])
        assert "runs recomputed from the table" in caplog.text
        assert pg.canonical_dump() == sq.canonical_dump()


def _rows_per_job_id(led) -> float:
    plan = led.query("EXPLAIN SELECT id FROM job_nodes WHERE cluster = 'x' AND job_id = '1'")
    return float(re.search(r"rows=(\d+)", plan[0][0]).group(1))


def test_the_planner_expects_a_few_job_nodes_per_job_id_whatever_analyze_samples(pg_url):
    """ANALYZE's sample sees nearly every job id once and its estimate of distinct ids stops
    growing with the table: on 10,000,000 jobs it expected 27 job nodes per id and planned
    llem-acct's windows of a user's 2,000 jobs as a scan of every window. The migration
    (_v9_planner_statistics) fixes the estimate as a fraction of the rows, which every later
    ANALYZE keeps; a small sample (statistics target 1: 300 rows) cannot undo it."""
    from tests.helpers import make_ledger

    make_ledger.write_jobs_pg(
        pg_url, make_ledger.generate(3000, seed=5, now_s=1_780_000_000, days=60)
    )
    with PgLedger(pg_url) as led:
        (options,), *_ = led.query(
            "SELECT attoptions FROM pg_attribute "
            "WHERE attrelid = 'job_nodes'::regclass AND attname = 'job_id'"
        )
        assert options == ["n_distinct=-0.5"]
        led.query("ALTER TABLE job_nodes ALTER COLUMN job_id SET STATISTICS 1")
        led.query("ANALYZE job_nodes")
        assert _rows_per_job_id(led) <= 3
