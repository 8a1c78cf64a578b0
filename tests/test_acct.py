"""``llem-acct``: exact output of the table, -p, -P, --json and --totals; filters; errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llem.cli.acct import acct
from llem.cluster import ledger as ledger_mod
from tests.helpers import ROOT, make_ledger
from tests.helpers.acct import CONFIG, FILTERS, JOBS, WHOLE, H, T, acct_run, job

pytestmark = pytest.mark.usefixtures("utc")

TABLE = """\
JobID           JobName      User    Account  Partition      State    Elapsed   NNodes ConsumedEnergy EnergySource       CO2e 
------------ ---------- --------- ---------- ---------- ---------- ---------- -------- -------------- ------------ ---------- 
5001              train     alice    physics        gpu  COMPLETED   02:00:00        2         15.98M     measured    2.131kg 
5001.train        train     alice    physics        gpu     closed   01:00:00        2          7.99M     measured    1.066kg 
5009_1              sim       bob       chem        cpu     FAILED   00:30:00        1           396K    estimated      52.8g 
5003               prep     alice    physics        cpu  COMPLETED   00:05:00        1         16.50K     measured       2.2g 
CO2e: grid intensity 400 gCO2e/kWh (configured constant (carbon.intensity_g_per_kwh); year n/a; unspecified basis; region DE); PUE 1.2.
"""


def test_default_table_exact(env):
    status, out, err = acct_run(*WHOLE)
    assert (status, err) == (0, "")
    assert out == TABLE


def test_parsable_with_trailing_delimiter_and_parsable2_without(env):
    fields = ("-o", "JobID,JobIDRaw,User,Start,End,ConsumedEnergyRaw,GPUEnergy,CO2e")
    status, out, err = acct_run(*WHOLE, "-X", "-p", *fields)
    assert status == 0
    assert out == (
        "JobID|JobIDRaw|User|Start|End|ConsumedEnergyRaw|GPUEnergy|CO2e|\n"
        "5001|5001|alice|2026-03-01T10:00:00|2026-03-01T12:00:00|15984000|14.40M|2.131kg|\n"
        "5009_1|5010|bob|2026-03-01T13:00:00|2026-03-01T13:30:00|396000|0|52.8g|\n"
        "5003|5003|alice|2026-03-02T09:00:00|2026-03-02T09:05:00|16500|0|2.2g|\n"
    )
    assert err.startswith("CO2e: grid intensity 400 gCO2e/kWh (configured constant")
    status, out, _ = acct_run(
        *WHOLE, "-X", "-P", "-n", "--delimiter", ";", "-o", "JobID,ConsumedEnergyRaw,EnergySource"
    )
    assert out == "5001;15984000;measured\n5009_1;396000;estimated\n5003;16500;measured\n"


def test_widths_truncation_and_units(env):
    status, out, _ = acct_run(
        *WHOLE, "-X", "-o", "JobID%4,User%-8,ConsumedEnergy%9", "--units", "K"
    )
    # sacct's print_fields: %N right-justifies (JobID too), %-N left, headers alike;
    # energies whole when exact (15984K), else with two decimals
    assert out == (
        "JobI User     ConsumedE \n"
        "---- -------- --------- \n"
        "5001 alice       15984K \n"
        "500+ bob           396K \n"
        "5003 alice       16.50K \n"
    )


def test_json_exact(env):
    status, out, err = acct_run(
        *WHOLE,
        "-j",
        "5001",
        "--json",
        "-o",
        "JobID,JobName,Start,Elapsed,ConsumedEnergyRaw,GPUEnergy,"
        "EnergySource,Coverage,CarbonIntensity,CO2e",
    )
    assert status == 0 and err == ""
    doc = json.loads(out)
    doc["generated_at"] = "X"
    assert doc == {
        "schema": "llem.acct/1",
        "generated_at": "X",
        "query": {
            "start": "2026-03-01T00:00:00+00:00",
            "end": "2026-03-03T00:00:00+00:00",
            "clusters": ["c1"],
            "users": None,
            "accounts": None,
            "partitions": None,
            "states": None,
            "nodes": None,
            "jobs": ["5001"],
            "totals_by": None,
        },
        "units": {
            "energy": "J",
            "power": "W",
            "time": "s",
            "co2e": "g",
            "carbon_intensity": "gCO2e/kWh",
            "coverage": "fraction",
        },
        "carbon": {
            "region": "DE",
            "intensity_g_per_kwh": 400.0,
            "source": "configured constant (carbon.intensity_g_per_kwh)",
            "year": "n/a",
            "basis": "unspecified",
            "pue": 1.2,
            "hourly_source": None,
            "embodied": None,
            "region_is_default": False,
            "intensity_by_year": {"n/a": 400.0},
        },
        "fields": [
            "JobID",
            "JobName",
            "Start",
            "Elapsed",
            "ConsumedEnergyRaw",
            "GPUEnergy",
            "EnergySource",
            "Coverage",
            "CarbonIntensity",
            "CO2e",
        ],
        "jobs": [
            {
                "JobID": "5001",
                "JobName": "train",
                "Start": "2026-03-01T10:00:00Z",
                "Elapsed": 7200,
                "ConsumedEnergyRaw": 15984000,
                "GPUEnergy": 14400000.0,
                "EnergySource": "measured",
                "Coverage": 1.0,
                "CarbonIntensity": 400.0,
                "CO2e": 2131.2,
            },
            {
                "JobID": "5001.train",
                "JobName": "train",
                "Start": "2026-03-01T10:10:00Z",
                "Elapsed": 3600,
                "ConsumedEnergyRaw": 7992000,
                "GPUEnergy": 7200000.0,
                "EnergySource": "measured",
                "Coverage": None,
                "CarbonIntensity": 400.0,
                "CO2e": 1065.6,
            },
        ],
    }


def test_json_without_format_has_every_field(env):
    _, out, _ = acct_run(*WHOLE, "-X", "--json")
    doc = json.loads(out)
    from llem.acct import FIELDS

    assert doc["fields"] == list(FIELDS)
    assert [j["JobIDRaw"] for j in doc["jobs"]] == ["5001", "5010", "5003"]
    assert doc["jobs"][1]["JobID"] == "5009_1" and doc["jobs"][1]["AllocGPUs"] == 0


def test_totals_per_user_account_day(env):
    _, out, _ = acct_run(*WHOLE, "--totals", "user", "-P")
    assert out == (
        "User|NJobs|Elapsed|GPUHours|ConsumedEnergy|GPUEnergy|EnergySource|CO2e\n"
        "alice|2|02:05:00|16.0|16.00M|14.40M|measured|2.133kg\n"
        "bob|1|00:30:00|0.0|396K|0|estimated|52.8g\n"
    )
    _, out, _ = acct_run(
        *WHOLE, "--totals", "day", "-P", "-o", "Day,NJobs,ConsumedEnergyRaw,Coverage"
    )
    assert out == (
        "Day|NJobs|ConsumedEnergyRaw|Coverage\n"
        "2026-03-01|2|16380000|100.0%\n2026-03-02|1|16500|100.0%\n"
    )
    _, out, _ = acct_run(*WHOLE, "--totals", "month", "--json", "-o", "Month,NJobs,CO2e")
    doc = json.loads(out)
    assert doc["totals"] == [{"Month": "2026-03", "NJobs": 3, "CO2e": 2186.2}]
    _, out, _ = acct_run(*WHOLE, "--totals", "account")
    assert out.splitlines()[2].split() == [
        "chem",
        "1",
        "00:30:00",
        "0.0",
        "396K",
        "0",
        "estimated",
        "52.8g",
    ]
    assert out.splitlines()[-1].startswith("CO2e: grid intensity 400")


@pytest.mark.parametrize("args, ids", FILTERS)
def test_filters(env, args, ids):
    base = ["-a", "-S", "2026-03-01", "-E", "2026-03-03"]
    for opt in ("-S", "-E"):
        if opt in args:
            i = base.index(opt)
            del base[i : i + 2]
    if "-j" in args:
        base = ["-a"]
    _, out, _ = acct_run(*base, *args, "-P", "-n", "-o", "JobID")
    assert out.split() == ids


def test_without_a_you_see_your_own_jobs_root_sees_all():
    from datetime import datetime

    from llem.acct import build_options

    now = datetime(2026, 3, 2, 12, 0, 5)
    common = dict(ledger="l.db", cluster="default", now=now)
    opts = build_options(current_user="carol", is_root=False, **common)
    assert opts.filter.users == ("carol",) and opts.filter.clusters is None
    assert opts.window == (datetime(2026, 3, 2), datetime(2026, 3, 2, 12, 0, 5))
    assert build_options(current_user="root", is_root=True, **common).filter.users is None
    assert (
        build_options(current_user="carol", is_root=False, allusers=True, **common).filter.users
        is None
    )
    opts = build_options(current_user="carol", is_root=False, jobs="12", **common)
    # sacct: -j alone means Epoch 0 to now, and every user's jobs; so does -N
    assert opts.filter.users is None and opts.window == (datetime.fromtimestamp(0), now)
    opts = build_options(current_user="carol", is_root=False, nodelist="n1", **common)
    assert opts.filter.users is None and opts.window == (datetime(2026, 3, 2), now)
    # -s alone: -S is now and -E is -S (jobs ending this very second), as sacct
    opts = build_options(current_user="carol", is_root=False, states="CD", **common)
    assert opts.window == (now, now) and opts.filter.window == "state"
    opts = build_options(
        current_user="carol", is_root=False, states="CD", starttime="2026-03-01", **common
    )
    assert opts.window == (datetime(2026, 3, 1), datetime(2026, 3, 1))
    opts = build_options(current_user="carol", is_root=False, since="2w", **common)
    assert opts.window[0] == datetime(2026, 2, 16, 12, 0, 5)


def test_empty_result_says_so_and_exits_0(env):
    status, out, err = acct_run("-u", "nobody", "-S", "2026-03-01", "-E", "2026-03-03")
    assert status == 0
    assert out.splitlines()[0].split()[0] == "JobID" and len(out.splitlines()) == 2
    assert err == (
        "llem-acct: no jobs match (user nobody, cluster c1, from 2026-03-01T00:00:00 "
        "to 2026-03-03T00:00:00); widen the window with -S or --since, or use -a "
        "for all users\n"
    )


def test_jobs_alone_are_named_up_to_now_not_from_1970(env):
    """-j alone selects from Epoch 0, as sacct; the selection's phrase (messages, --statement)
    says "up to", never "from 1970-01-01" (seen in a statement on the GPU machine)."""
    status, _, err = acct_run("-j", "424242")
    assert status == 0
    assert err.startswith("llem-acct: no jobs match (cluster c1, job 424242, up to 20"), err
    assert "1970" not in err
    # -j alone already means every user and all time: the hint says where jobs come from
    assert err.endswith(
        "; a job is in the ledger once llem aggregate has merged it after it ended; "
        "-L looks in every cluster\n"
    ), err
    # -j with a user: -a would widen it; -L given: no need to name it
    _, _, err = acct_run("-j", "424242", "-u", "nobody")
    assert err.endswith("widen the window with -S or --since, or use -a for all users\n"), err
    _, _, err = acct_run("-j", "424242", "-L")
    assert err.endswith("has merged it after it ended\n"), err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("-o", "JobID,Enrgy"),
            "Invalid value for '-o/--format': unknown field 'Enrgy'; did you mean",
        ),
        (
            ("-S", "yesterday-ish"),
            "Invalid value for '-S/--starttime': invalid time 'yesterday-ish'",
        ),
        (
            ("-S", "2026-02-30"),
            "Invalid value for '-S/--starttime': invalid time '2026-02-30': "
            "day is out of range for month",
        ),
        (("--since", "3x"), "Invalid value for '--since': invalid duration '3x'"),
        (("--since", "3d", "-S", "today"), "give either --since or -S/--starttime"),
        (("-s", "XY"), "unknown state 'XY'"),
        (("-j", "abc"), "invalid job id 'abc'"),
        (("--totals", "node"), "unknown key 'node'"),
        (("--units", "X"), "invalid unit 'X'"),
        (("--bogus",), "No such option '--bogus'"),
        (("-E", "2026-01-01", "-S", "2026-02-01"), "is before start"),
        (("-p", "--json"), "give only one of -p, -P and --json"),
    ],
)
def test_usage_errors_exit_2(env, args, message):
    status, out, err = acct_run(*args)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_missing_and_unreadable_ledger_exit_1(tmp_path, env):
    status, out, err = acct_run("--ledger", str(tmp_path / "none.db"))
    assert status == 1
    assert err == (
        f"Error: no ledger at {tmp_path / 'none.db'}. Set 'ledger:' in the llem "
        "configuration (or LLEM_LEDGER), or pass --ledger PATH; on a new "
        "installation run 'llem aggregate --once' first\n"
    )
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    status, _, err = acct_run("--ledger", str(junk))
    assert status == 1 and err.startswith(f"Error: {junk}: not a usable ledger database")
    if os.getuid() != 0:
        env.chmod(0o000)
        try:
            status, _, err = acct_run("-a")
        finally:
            env.chmod(0o644)
        assert status == 1 and "permission denied reading the ledger: it is private" in err


def test_helpformat_lists_every_field(env):
    from llem.acct import FIELDS, TOTAL_FIELDS

    status, out, _ = acct_run("-e")
    assert status == 0
    assert out.splitlines()[0] == (
        "JobID               JobIDRaw            JobName             Cluster"
    )
    jobs, totals = out.split("\nWith --totals:\n")
    for text, catalogue in ((jobs, FIELDS), (totals, TOTAL_FIELDS)):
        grid, descriptions = text.split("\n\n")
        assert grid.split() == list(catalogue)
        for field in catalogue.values():
            assert f"{field.name:<18} {field.help}" in descriptions.splitlines(), field.name


def _mentions(text: str, flag: str) -> bool:
    """``flag`` as a whole word: ``--parsable`` is not found in ``--parsable2``."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_console_script_subprocess_debug_and_llem_acct(env):
    exe = [sys.executable, "-c", "from llem.cli.acct import main; main()"]
    envv = {**os.environ, "TZ": "UTC"}
    r = subprocess.run(exe + list(WHOLE), capture_output=True, text=True, env=envv, timeout=60)
    assert r.returncode == 0 and r.stdout == TABLE
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "acct", *WHOLE],
        capture_output=True,
        text=True,
        env=envv,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout == TABLE
    r = subprocess.run(
        exe + ["--ledger", "/nonexistent/l.db"],
        capture_output=True,
        text=True,
        env=envv,
        timeout=60,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = subprocess.run(
        exe + ["--ledger", "/nonexistent/l.db", "--debug"],
        capture_output=True,
        text=True,
        env=envv,
        timeout=60,
    )
    assert r.returncode == 1 and "Traceback" in r.stderr and "LedgerError" in r.stderr


def test_help_and_docs_name_every_flag_and_field():
    import click

    r = CliRunner().invoke(acct, ["-h"])
    assert r.exit_code == 0
    docs = (ROOT / "docs" / "acct.md").read_text("utf-8")
    params = [p for p in acct.get_params(click.Context(acct)) if isinstance(p, click.Option)]
    flags = [flag for p in params for flag in (*p.opts, *p.secondary_opts)]
    assert len(flags) > 40  # every option, each with its short and long name
    for flag in flags:
        assert _mentions(r.output, flag), flag
        assert _mentions(docs, flag), flag
    from llem.acct import FIELDS, TOTAL_FIELDS, TOTAL_KEYS

    for name in list(FIELDS) + list(TOTAL_FIELDS):
        assert f"`{name}`" in docs, name
    totals_help = next(p.help for p in params if "--totals" in p.opts)
    for key in TOTAL_KEYS:  # the keys -T accepts, in its help and its docs
        assert re.search(rf"\b{key}\b", totals_help) and f"`{key}`" in docs, key
    assert "llem.acct/1" in (ROOT / "docs" / "acct-json.md").read_text("utf-8")


def test_llem_lists_acct_and_import_path_is_light():
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "acct" in r.stdout
    code = (
        "import sys, llem.cli.acct, llem.acct, llem.cluster.acct_queries; "
        "print(sorted(m for m in ('pandas', 'numpy', 'llem.carbon', 'llem.cluster.ledger', "
        "'yaml') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]"  # carbon, the ledger and YAML load only when used


def test_requeued_job_latest_run_unless_duplicates(tmp_path, monkeypatch):
    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    ledger = d / "ledger.db"
    make_ledger.write_jobs(
        ledger,
        [
            job("7000", "alice", "physics", "cpu", T, T + 600, ["c0001"], state="REQUEUED"),
            job("7000", "alice", "physics", "cpu", T + H, T + H + 900, ["c0002"]),
        ],
    )
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(CONFIG + f"ledger: {ledger}\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    fields = ("-P", "-n", "-o", "JobID,State,NodeList,ConsumedEnergyRaw")
    _, out, _ = acct_run(*WHOLE, *fields)
    assert out == "7000|COMPLETED|c0002|99000\n"
    _, out, _ = acct_run(*WHOLE, "-D", *fields)
    assert out == "7000|REQUEUED|c0001|66000\n7000|COMPLETED|c0002|99000\n"
    _, out, _ = acct_run(
        *WHOLE, "--totals", "user", "-P", "-n", "-o", "User,NJobs,ConsumedEnergyRaw"
    )
    assert out == "alice|2|165000\n"  # totals count the energy of every run


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run llem-acct as another user")
def test_a_user_reads_an_old_root_ledger_and_writes_nothing(request, tmp_path):
    """A user runs llem-acct on a root-owned 0644 ledger of the previous schema (before the
    indexes by run end): it reads, and writes nothing; the next write open migrates it."""
    import shutil
    import sqlite3
    import tempfile

    import click
    import yaml

    from llem.cluster.ledger import Ledger
    from tests.helpers.nobody import python_for_nobody

    root = Path(tempfile.mkdtemp(prefix="llem-acct-reader-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    python = python_for_nobody(root)
    if python is None:
        pytest.skip("no Python that uid 65534 can run llem with")
    for module in (click, yaml):  # world-readable copies beside llem's
        dest = root / "src" / module.__name__
        if not dest.exists():
            shutil.copytree(
                Path(module.__file__).parent,
                dest,
                ignore=shutil.ignore_patterns("__pycache__", "*.so"),
            )
    if not (root / "src" / "llem" / "share").exists():  # installed as llem.share
        shutil.copytree(
            ROOT / "share",
            root / "src" / "llem" / "share",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    for path in [root / "src", *(root / "src").rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    python = (python[0], {**python[1], "PYTHONPATH": str(root / "src")})
    (root / "ledger").mkdir(mode=0o755)
    ledger = root / "ledger" / "ledger.db"
    make_ledger.write_jobs(ledger, JOBS)
    db = sqlite3.connect(ledger)  # as llem before schema 2 left it
    db.executescript(
        "DROP INDEX job_runs_by_user_end; DROP INDEX job_runs_by_account_end; "
        "PRAGMA user_version = 1"
    )
    db.close()
    cfg = root / "llem.yaml"
    cfg.write_text(CONFIG + f"ledger: {ledger}\n")
    cfg.chmod(0o644)
    before = ledger.stat().st_mtime_ns
    env = {**python[1], "LLEM_CONFIG": str(cfg), "TZ": "UTC"}
    r = subprocess.run(
        [python[0], "-c", "from llem.cli.acct import main; main()", *WHOLE],
        user=65534,
        group=65534,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == TABLE
    assert ledger.stat().st_mtime_ns == before
    assert sorted(os.listdir(ledger.parent)) == ["ledger.db"]

    def schema():
        db = sqlite3.connect(ledger)
        names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.close()
        return version, {"job_runs_by_user_end", "job_runs_by_account_end"} & names

    assert schema() == (1, set())
    r = subprocess.run(
        [python[0], "-c", "from llem.cli.acct import main; main()", "-X"],
        user=65534,
        group=65534,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0 and "no jobs match (user " in r.stderr  # nobody sees only nobody
    assert schema() == (1, set())
    Ledger(ledger).close()  # the next write open (llem aggregate) adds them
    assert schema() == (
        ledger_mod.SCHEMA_VERSION,
        {"job_runs_by_user_end", "job_runs_by_account_end"},
    )
