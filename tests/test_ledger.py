"""The ledger: idempotent merges, runs, completeness, hostlists, schema checks, readers."""

import copy
import os
import sqlite3
import stat

import pytest

from llem import slices
from llem.cluster.header import header_slice_from_env
from llem.cluster.ledger import SCHEMA_VERSION, Ledger, group_runs
from llem.errors import LedgerError
from llem.hostlist import expand_hostlist
from llem.slices import SliceError
from tests.helpers.ledger import GRACE_S, NOW, merge
from tests.helpers.nodes import ENV, T0, S, job_slices

# -- hostlists -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3,5],gpu[01-02]", ["n1", "n2", "n3", "n5", "gpu01", "gpu02"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node[008-011]", ["node008", "node009", "node010", "node011"]),
        ("a,b,a", ["a", "b"]),
        ("n[9-10]-ib", ["n9-ib", "n10-ib"]),
        ("", []),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[3-1]", "n[a-b]", "n[[1]]", "n[1-]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


# -- schema and files ------------------------------------------------------------------------


def test_ledger_is_wal_with_documented_modes(tmp_path):
    path = tmp_path / "l" / "ledger.db"
    with Ledger(path) as ledger:
        assert ledger.query("PRAGMA journal_mode") == [("wal",)]
        assert ledger.integrity_check() == "ok"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


def test_newer_ledger_schema_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(LedgerError, match="upgrade llem"):
        Ledger(path)


ACCT_INDEXES = {"job_runs_by_user_end", "job_runs_by_account_end"}


def _indexes_and_version(path):
    db = sqlite3.connect(path)
    names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    return version, names


def test_an_old_ledger_is_read_as_it_is_and_migrated_by_the_next_writer(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
        dump = ledger.canonical_dump()
    version, names = _indexes_and_version(path)
    assert version == SCHEMA_VERSION and ACCT_INDEXES <= names
    db = sqlite3.connect(path)  # schema 1, as llem before the acct indexes left it
    db.executescript(
        "DROP INDEX job_runs_by_user_end; DROP INDEX job_runs_by_account_end; "
        "PRAGMA user_version = 1"
    )
    db.close()

    def state():  # a WAL-mode reader may create the -wal/-shm SQLite needs, nothing else
        return (
            path.read_bytes(),
            path.stat().st_mtime_ns,
            sorted(n for n in os.listdir(tmp_path) if not n.endswith(("-wal", "-shm"))),
        )

    before = state()
    with Ledger(path, readonly=True) as ledger:
        assert ledger.canonical_dump() == dump
        assert [r["job_id"] for r in ledger.job_runs()] == ["100"]
    assert state() == before
    with Ledger(path) as ledger:
        assert ledger.canonical_dump() == dump
    version, names = _indexes_and_version(path)
    assert version == SCHEMA_VERSION and ACCT_INDEXES <= names


def test_a_reader_refuses_a_ledger_older_than_it_reads(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")
    db.close()
    with pytest.raises(LedgerError, match="needs migrating by llem aggregate"):
        Ledger(path, readonly=True)


def test_symlinked_ledger_is_refused(tmp_path):
    os.symlink("/etc/hostname", tmp_path / "ledger.db")
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "ledger.db")


def test_ledger_in_a_directory_writable_by_others_is_refused(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(LedgerError, match="writable by group or others"):
        Ledger(tmp_path / "open" / "ledger.db")


# -- merging ---------------------------------------------------------------------------------


def test_merge_twice_and_in_another_order_gives_the_same_ledger(tmp_path):
    items = job_slices(tmp_path, "100") + job_slices(
        tmp_path, "101", nodes=("n1", "n2"), nodelist="n[1-2]"
    )
    header = header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 5401 * S)
    items.append(header)
    dumps = []
    for n, order in enumerate([items, items[::-1], items[2:] + items[:2]]):
        with Ledger(tmp_path / f"l{n}" / "ledger.db") as ledger:
            merge(ledger, order)
            once = ledger.canonical_dump()
            stats = merge(ledger, order)
            assert stats.merged == 0 and stats.unchanged == len(order)
            assert ledger.canonical_dump() == once
            dumps.append(once)
    assert dumps[0] == dumps[1] == dumps[2]
    assert "# job_energy 0" not in dumps[0]


def test_job_run_totals_and_energy_per_node(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
        (run,) = ledger.job_runs("100")
        assert run["status"] == "complete" and run["nodes_reported"] == 3
        assert run["gpu_energy_uj"] == 3 * 250_000_000 * 3600
        assert run["cpu_energy_uj"] == 3 * 60_000_000 * 3600
        assert (
            run["energy_uj"] == run["gpu_energy_uj"] + run["cpu_energy_uj"] + run["dram_energy_uj"]
        )
        assert run["gpu_seconds"] == 3 * 3600.0
        assert run["user"] == "alice" and run["tag"] == "exp-1"
        assert ledger.job_energy_by_node("c1", "100") == {
            n: (250_000_000 + 60_000_000 + 5_000_000) * 3600 for n in ("n1", "n2", "n3")
        }
        hours = ledger.query("SELECT DISTINCT hour_s FROM job_energy ORDER BY hour_s")
        assert hours == [(T0 // S,), (T0 // S + 3600,)]


def test_a_newer_export_of_the_same_run_replaces_it(tmp_path):
    old = job_slices(tmp_path, "100", nodes=("n1",))[0]
    new = copy.deepcopy(old)
    new["created_ns"] += 1
    for row in new["energy"]:
        row["energy_uj"] //= 2
    for order in ([old, new], [new, old]):
        with Ledger(tmp_path / f"l{order[0] is old}.db") as ledger:
            merge(ledger, order)
            assert ledger.query("SELECT COUNT(*) FROM job_nodes") == [(1,)]
            assert ledger.job_runs("100")[0]["gpu_energy_uj"] == 250_000_000 * 3600 // 2
            # The replaced run's rows went with it; the new ones belong to the new job node.
            assert ledger.query("SELECT SUM(energy_uj), COUNT(*) FROM job_energy") == [
                (sum(r["energy_uj"] for r in new["energy"]), len(new["energy"]))
            ]
            for table, count in (
                ("job_energy", len(new["energy"])),
                ("job_node_totals", len(new["node_totals"])),
                ("windows", len(new["windows"])),
            ):
                assert count > 0
                assert ledger.query(
                    f"SELECT COUNT(*) FROM {table} t JOIN job_nodes n ON n.id = t.job_node_id"
                ) == [(count,)], table


def test_node_hour_keeps_the_latest_export(tmp_path):
    def node_slice(as_of_ns, measured):
        return {
            "schema": slices.SCHEMA,
            "kind": "node",
            "cluster": "c1",
            "node": "n1",
            "created_ns": as_of_ns,
            "from_hour_s": T0 // S,
            "as_of_ns": as_of_ns,
            "devices": {
                "rapl:package-0": {
                    "component": "cpu",
                    "name": "p0",
                    "sensor": "rapl",
                    "source": "measured",
                    "method": "counter",
                }
            },
            "hours": [
                {
                    "hour_s": T0 // S,
                    "device": "rapl:package-0",
                    "measured_uj": measured,
                    "attributed_uj": measured // 2,
                    "remainder_uj": measured // 2,
                    "intervals": 3,
                    "gap_intervals": 0,
                    "covered_ns": 180 * S,
                }
            ],
        }

    partial, full = node_slice(T0 + 600 * S, 1000), node_slice(T0 + 3600 * S, 6000)
    for order in ([partial, full], [full, partial]):
        with Ledger(tmp_path / f"n{order[0] is full}.db") as ledger:
            merge(ledger, [slices.validate(s) for s in order])
            assert ledger.query("SELECT measured_uj, as_of_ns FROM node_hours") == [
                (6000, T0 + 3600 * S)
            ]


# -- runs and completeness -------------------------------------------------------------------


def test_requeued_job_keeps_both_runs(tmp_path):
    first = job_slices(tmp_path / "a", "100", seconds=600)
    second = job_slices(tmp_path / "b", "100", start_ns=T0 + 7200 * S, seconds=600)
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, second[:1] + first + second[1:])
        runs = ledger.job_runs("100")
        assert [r["run_start_ns"] for r in runs] == [T0 + 7200 * S, T0 + 1800 * S]
        assert all(r["status"] == "complete" and r["nodes_reported"] == 3 for r in runs)


@pytest.mark.parametrize("late", [False, True])
def test_third_node_late_or_never(tmp_path, late):
    n1, n2, n3 = job_slices(tmp_path, "100")
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, [n1, n2], now_ns=T0 + 5400 * S + 60 * S)
        (run,) = ledger.job_runs("100")
        assert run["status"] == "pending" and run["missing_nodes"] == ["n3"]
        later = T0 + 5400 * S + int(GRACE_S * S) + S
        ledger.mark_incomplete(later, GRACE_S)
        (run,) = ledger.job_runs("100")
        assert run["status"] == "incomplete" and run["missing_nodes"] == ["n3"]
        if late:
            merge(ledger, [n3], now_ns=later + 3600 * S)
            (run,) = ledger.job_runs("100")
            assert run["status"] == "complete" and run["missing_nodes"] == []


def test_node_reporting_twice_changes_nothing(tmp_path):
    n1, n2, n3 = job_slices(tmp_path, "100")
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, [n1, n2, n3])
        before = ledger.canonical_dump()
        merge(ledger, [n3, n3])
        assert ledger.canonical_dump() == before


def test_header_fields_win_and_header_alone_is_pending(tmp_path):
    header = header_slice_from_env(
        {
            **ENV,
            "SLURM_JOB_ID": "100",
            "SLURM_JOB_NAME": "real",
            "SLURM_JOB_EXIT_CODE": str(1 << 8),
        },
        "c1",
        now_ns=T0 + 5402 * S,
    )
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, [header], now_ns=T0 + 5403 * S)
        (run,) = ledger.job_runs("100")
        assert run["status"] == "pending" and run["missing_nodes"] == ["n1", "n2", "n3"]
        merge(ledger, job_slices(tmp_path, "100"), now_ns=T0 + 5403 * S)
        (run,) = ledger.job_runs("100")
        assert (run["name"], run["state"], run["exit_code"], run["has_header"]) == (
            "real",
            "FAILED",
            1,
            1,
        )
        assert run["status"] == "complete"


def test_headers_without_their_nodes_sharing_a_start_make_one_run(tmp_path):
    """A header re-sent (no end time from Slurm: "now" each time), or one with a start and
    one without ending at that start, used to give two runs with the same key."""
    first = header_slice_from_env({**ENV, "SLURM_JOB_ID": "300"}, "c1", now_ns=T0 + 60 * S)
    first["job"]["start_ns"] = T0
    again = copy.deepcopy(first)
    again["job"]["end_ns"] += 5 * S
    no_start = copy.deepcopy(first)
    no_start["job"].update(start_ns=None, end_ns=first["job"]["start_ns"])
    for order in ([first, again, no_start], [no_start, again, first]):
        with Ledger(tmp_path / f"h{order[0] is first}.db") as ledger:
            merge(ledger, order)
            (run,) = ledger.job_runs("300")
            assert run["run_end_ns"] == again["job"]["end_ns"] and run["has_header"] == 1


def test_group_runs_is_order_independent():
    nodes = [
        {"id": i, "node": f"n{i % 3}", "start_ns": T0 + s * S, "end_ns": T0 + (s + 10) * S}
        for i, s in enumerate([0, 1, 2, 13, 14, 15])
    ]
    # The first run's header comes 1 s after its last node, the same second the requeued run
    # starts: it still belongs to the first run.
    headers = [
        {"end_ns": T0 + 13 * S, "start_ns": None},
        {"end_ns": T0 + 26 * S, "start_ns": None},
        {"end_ns": T0 + 5000 * S, "start_ns": None},
    ]
    a = group_runs(nodes, headers)
    b = group_runs(nodes[::-1], headers[::-1])
    assert [(r["start_ns"], r["header"]["end_ns"], len(r["nodes"])) for r in a] == [
        (T0, T0 + 13 * S, 3),
        (T0 + 13 * S, T0 + 26 * S, 3),
        (T0 + 5000 * S, T0 + 5000 * S, 0),
    ]
    assert [[n["id"] for n in r["nodes"]] for r in a] == [[n["id"] for n in r["nodes"]] for r in b]


# -- validation ------------------------------------------------------------------------------


def _job(tmp_path):
    return job_slices(tmp_path, "100", nodes=("n1",))[0]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["energy"][0].update(energy_uj=-5), "negative energy"),
        (lambda d: d["job"].update(end_ns=d["job"]["start_ns"] - 1), "end before start"),
        (lambda d: d["energy"][0].update(energy_uj=10**30), "impossible energy"),
        (lambda d: d["energy"][0].update(hour_s=d["energy"][0]["hour_s"] + 86400), "outside"),
        (lambda d: d["energy"][0].update(device="nvml:GPU-z"), "not in 'devices'"),
        (lambda d: d["job"].update(job_id="1/../2"), "characters outside"),
        (lambda d: d.update(node="n 1"), "characters outside"),
        (lambda d: d.update(schema="other/1"), "foreign file"),
        (lambda d: d["job"].update(coverage=1.5), "coverage"),
        (lambda d: d["devices"]["nvml:GPU-a"].update(source="guessed"), "source"),
        (lambda d: d.pop("node_totals"), "missing 'node_totals'"),
        # Well-formed JSON of the wrong type, which SQLite could not store (or would store as
        # text in an integer column): refused here, or it would stop every later pass.
        (lambda d: d["job"].update(cpus={"a": 1}), "'cpus' must be an integer"),
        (lambda d: d["job"].update(uid="1000"), "'uid' must be an integer"),
        (lambda d: d["job"].update(num_nodes=True), "'num_nodes' must be an integer"),
        (lambda d: d["job"].update(state=["sealed"]), "'state' must be a string"),
        (lambda d: d["job"].update(state="lost"), "unknown state"),
        (lambda d: d["job"].update(array_task_id=3), "'array_task_id' must be a string"),
        (lambda d: d["job"].update(gpus=[{"x": 1}, {"y": 2}]), "'gpus' must be a list of strings"),
        (lambda d: d["job"].update(flags="partial"), "'flags' must be a list of strings"),
        (lambda d: d["windows"][0].update(step_id=0), "'step_id' must be a string"),
    ],
)
def test_validation_names_the_problem(tmp_path, damage, message):
    data = _job(tmp_path)
    damage(data)
    with pytest.raises(SliceError, match=message):
        slices.validate(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["job"].update(nodelist=["n1"]), "'nodelist' must be a string"),
        (lambda d: d["job"].update(num_nodes="3"), "'num_nodes' must be an integer"),
        (lambda d: d["job"].update(state={"a": 1}), "'state' must be a string"),
        (lambda d: d["job"].update(exit_code=1.5), "'exit_code' must be an integer"),
    ],
)
def test_header_validation_names_the_problem(damage, message):
    data = header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 60 * S)
    slices.validate(data)
    damage(data)
    with pytest.raises(SliceError, match=message):
        slices.validate(data)


def test_newer_schema_is_its_own_error(tmp_path):
    data = _job(tmp_path)
    data["schema"] = f"llem.slice/{slices.SCHEMA_VERSION + 1}"
    with pytest.raises(slices.NewerSchema, match="upgrade llem"):
        slices.validate(data)


# -- background checkpoints ------------------------------------------------------------------


def test_background_checkpoints_give_the_same_ledger_and_stop_with_it(tmp_path):
    import threading

    def names():
        return [t.name for t in threading.enumerate() if t.name == "llem-ledger-checkpoint"]

    items = []
    for j in range(20):
        for data in job_slices(tmp_path / f"g{j}", str(100 + j)):
            data["job"]["job_id"] = str(100 + j)
            items.append(data)
    dumps = []
    for background in (False, True):
        path = tmp_path / f"ledger-{background}.db"
        with Ledger(path, background_checkpoint=background) as ledger:
            assert len(names()) == int(background)
            for k in range(0, len(items), 6):
                merge(ledger, items[k : k + 6])
            dumps.append(ledger.canonical_dump())
        assert names() == []
        # closed: checkpointed to an empty WAL, kept (with -shm) for readers, still WAL mode
        assert os.path.getsize(f"{path}-wal") == 0 and os.path.exists(f"{path}-shm")
        with Ledger(path, readonly=True) as ledger:
            assert ledger.integrity_check() == "ok"
            assert ledger.query("PRAGMA journal_mode") == [("wal",)]
    assert dumps[0] == dumps[1] and "# job_runs 20" in dumps[0]


# -- readers ---------------------------------------------------------------------------------


def test_readers_are_not_blocked_by_a_merge_in_progress(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
        ledger.db.execute("BEGIN IMMEDIATE")  # a merge holding the write lock
        ledger.db.execute("DELETE FROM job_runs")
        reader = Ledger(path, readonly=True)
        reader.db.execute("PRAGMA busy_timeout = 0")
        assert reader.query("SELECT COUNT(*) FROM job_runs") == [(1,)]
        ledger.db.execute("ROLLBACK")
        reader.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another user")
def test_a_user_reads_the_ledger_during_and_between_merges(request):
    """Read-only users cannot create -wal/-shm: between merges the ledger keeps them."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from tests.helpers.nobody import python_for_nobody

    root = Path(tempfile.mkdtemp(prefix="llem-reader-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    python = python_for_nobody(root)
    if python is None:
        pytest.skip("no Python that uid 65534 can run llem with")
    path = root / "ledger" / "ledger.db"
    code = (
        "from llem.cluster.ledger import Ledger\n"
        f"print(Ledger({str(path)!r}, readonly=True).query('SELECT COUNT(*) FROM meta')[0][0])"
    )

    def read() -> str:
        proc = subprocess.run(
            [python[0], "-c", code],
            user=65534,
            group=65534,
            env=python[1],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    writer = Ledger(path)
    writer.db.execute("BEGIN IMMEDIATE")
    writer.db.execute("INSERT INTO meta VALUES ('x', '1')")
    assert read() == "1"  # a merge in progress: the committed state
    writer.db.execute("COMMIT")
    assert read() == "2"
    writer.close()
    assert read() == "2"  # no writer: -wal/-shm kept, still readable


# -- damage anywhere -------------------------------------------------------------------------


def _paths(value, prefix=()):
    """Every place in a JSON document, as a path of keys and indexes."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@pytest.mark.parametrize("kind", ["job", "header", "node"])
def test_any_damage_is_refused_or_merges_cleanly(tmp_path, kind):
    """Replace one value anywhere with something of another type: validation refuses it with
    SliceError, or the ledger stores it; nothing else may happen (a crash would stop every
    later pass on that slice)."""
    import random

    if kind == "job":
        base = _job(tmp_path)
    elif kind == "header":
        base = header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 60 * S)
    else:
        base = {
            "schema": slices.SCHEMA,
            "kind": "node",
            "cluster": "c1",
            "node": "n1",
            "created_ns": T0 + 7200 * S,
            "from_hour_s": T0 // S // 3600 * 3600,
            "as_of_ns": T0 + 7200 * S,
            "devices": _job(tmp_path)["devices"],
            "hours": [
                {
                    "device": "nvml:GPU-a",
                    "hour_s": T0 // S // 3600 * 3600,
                    "measured_uj": 10**9,
                    "attributed_uj": 5 * 10**8,
                    "remainder_uj": 5 * 10**8,
                    "intervals": 60,
                    "gap_intervals": 0,
                    "covered_ns": 3600 * S,
                }
            ],
        }
    slices.validate(base)
    places = [p for p in _paths(base) if p]
    odd = [None, True, -1, 0, 1.5, 2**70, "", "x", "1/..", [], [1], {}, {"a": 1}, ["a", "b"]]
    rng = random.Random(7)
    refused = merged = 0
    with Ledger(tmp_path / "fuzz.db") as ledger:
        for n in range(400):
            data = copy.deepcopy(base)
            place = rng.choice(places)
            parent = data
            for key in place[:-1]:
                parent = parent[key]
            if rng.random() < 0.15 and isinstance(parent, dict):
                del parent[place[-1]]
            else:
                parent[place[-1]] = copy.deepcopy(rng.choice(odd))
            try:
                slices.validate(data)
            except SliceError:
                refused += 1
                continue
            ledger.merge([(data, f"{n:064x}")], now_ns=NOW, grace_s=GRACE_S)
            merged += 1
        assert ledger.integrity_check() == "ok"
    assert refused > 100 and merged > 10, (refused, merged)
