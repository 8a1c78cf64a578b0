"""llem.acct as a library: sacct time syntax, formats, carbon paths, the statement's numbers;
and llem-acct over a ledger filled by the real aggregator."""

import json
import sqlite3
from datetime import datetime

import pytest

from llem import carbon
from llem.acct import (
    AcctUsageError,
    format_elapsed,
    format_energy,
    parse_format,
    parse_jobs,
    parse_since,
    parse_time,
    resolve_carbon,
)
from llem.carbon.statement import format_co2e, format_kwh
from llem.cluster.acct_queries import JobSpec
from llem.config import load
from llem.hostlist import compress_hostlist
from tests.helpers import acct as acct_data
from tests.helpers import make_ledger
from tests.helpers.acct import CONFIG, WHOLE, T, acct_run

pytestmark = pytest.mark.usefixtures("utc")

NOW = datetime(2026, 3, 2, 15, 30, 45)


@pytest.mark.parametrize(
    "text, want",
    [
        ("2026-01-05", datetime(2026, 1, 5)),
        ("2026-01-05T07:08", datetime(2026, 1, 5, 7, 8)),
        ("2026-01-05T07:08:09", datetime(2026, 1, 5, 7, 8, 9)),
        ("0105", datetime(2026, 1, 5)),
        ("010525", datetime(2025, 1, 5)),
        ("1/5", datetime(2026, 1, 5)),
        ("01/05/25", datetime(2025, 1, 5)),
        ("1.5.25", datetime(2025, 1, 5)),
        ("08:15", datetime(2026, 3, 2, 8, 15)),
        ("now", datetime(2026, 3, 2, 15, 30, 45)),
        ("now-3", datetime(2026, 3, 2, 15, 30, 42)),
        ("now-2hours", datetime(2026, 3, 2, 13, 30, 45)),
        ("now-1days", datetime(2026, 3, 1, 15, 30, 45)),
        ("now-1week", datetime(2026, 2, 23, 15, 30, 45)),
        ("now+10minutes", datetime(2026, 3, 2, 15, 40, 45)),
        ("today", datetime(2026, 3, 2)),
        ("midnight", datetime(2026, 3, 2)),
        ("noon", datetime(2026, 3, 2, 12)),
        ("teatime", datetime(2026, 3, 2, 16)),
        ("fika", datetime(2026, 3, 2, 15)),
        ("NOW-1DAYS", datetime(2026, 3, 1, 15, 30, 45)),
    ],
)
def test_sacct_time_syntax(text, want):
    assert parse_time(text, NOW) == want


@pytest.mark.parametrize(
    "text", ["yesterday", "2026-13-01", "now-3fortnights", "25:00", "1/32", "2026-1-5", ""]
)
def test_bad_times(text):
    with pytest.raises(AcctUsageError):
        parse_time(text, NOW)


def test_since_jobs_formats_and_hostlists():
    assert parse_since("30d").days == 30 and parse_since("12h").seconds == 12 * 3600
    assert parse_since("2w").days == 14 and parse_since("90m").seconds == 5400
    for bad in ("0d", "3", "d", "3y", "-3d"):
        with pytest.raises(AcctUsageError):
            parse_since(bad)
    assert parse_jobs("12,13.train,14_2,15_3.0") == (
        JobSpec("12"),
        JobSpec("13", None, "train"),
        JobSpec("14", "2"),
        JobSpec("15", "3", "0"),
    )
    assert [c.width for c in parse_format("jobid%20,co2e%-6,consumedenergy")] == [20, -6, 14]
    assert [c.field.name for c in parse_format(None, "account")][:2] == ["Account", "NJobs"]
    with pytest.raises(AcctUsageError, match="bad width"):
        parse_format("JobID%x")
    with pytest.raises(AcctUsageError, match="unknown field 'JobID'"):
        parse_format("Account,JobID", "account")
    # Slurm's convert_num_unit2 (divisor 1000): whole values without decimals
    assert [format_energy(v) for v in (0, 999.4, 1000, 1234.5, 15_984_000, 2.5e9, 7e12)] == [
        "0",
        "999",
        "1K",
        "1.23K",
        "15.98M",
        "2.50G",
        "7T",
    ]
    assert (format_energy(16_000), format_energy(16_500)) == ("16K", "16.50K")
    assert format_energy(16_500, convert=False) == "16500"
    assert format_energy(15_984_000, "G") == "0.02G"
    assert [format_elapsed(s) for s in (0, 59, 3600, 86400 + 3661)] == [
        "00:00:00",
        "00:00:59",
        "01:00:00",
        "1-01:01:01",
    ]
    assert compress_hostlist(["n1", "n2", "n3", "n5", "gpu01", "gpu02"]) == "gpu[01-02],n[1-3,5]"


def _hourly_by_run(ledger_path):
    db = sqlite3.connect(ledger_path)
    rows = db.execute(
        "SELECT jn.job_id, e.hour_s, SUM(e.energy_uj) FROM job_nodes jn JOIN job_energy e "
        "ON e.job_node_id = jn.id GROUP BY 1, 2"
    ).fetchall()
    db.close()
    out = {}
    for job_id, hour, uj in rows:
        out.setdefault(job_id, {})[hour] = uj / 1e6
    return out


def test_constant_fast_path_equals_carbon_emissions(env, tmp_path):
    cfg = load()
    c = resolve_carbon(cfg)
    assert c.constant
    for by_hour in _hourly_by_run(env).values():
        energy = sum(by_hour.values())
        grams, intensity = c.grams(energy, 1.5, 2.0)
        assert grams == pytest.approx(carbon.emissions(cfg, by_hour, 1.5, 2.0).co2e_g)
        assert intensity == 400


def test_embodied_is_included_and_named(env, tmp_path, monkeypatch):
    cfg_path = tmp_path / "emb.yaml"
    cfg_path.write_text(CONFIG + f"ledger: {env}\nembodied:\n  enabled: true\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg_path))
    cfg = load()
    by_hour = _hourly_by_run(env)["5001"]
    want = carbon.emissions(cfg, by_hour, gpu_hours=16.0, node_hours=4.0).co2e_g
    _, out, _ = acct_run(*WHOLE, "-j", "5001", "-X", "--json", "-o", "JobID,CO2e")
    assert json.loads(out)["jobs"][0]["CO2e"] == pytest.approx(want, abs=1e-3)
    assert json.loads(out)["carbon"]["embodied"] == "2.85 g per GPU-hour, 47.53 g per node-hour"
    _, out, _ = acct_run(*WHOLE)
    assert out.splitlines()[-1].endswith(
        "PUE 1.2; embodied included (2.85 g per GPU-hour, 47.53 g per node-hour)."
    )


def _hourly_config(tmp_path, env, pue="1.3"):
    series = tmp_path / "hourly.csv"
    lines = ["timestamp,g_co2e_per_kwh"]
    for i in range(48):
        hour = T - 10 * 3600 + i * 3600
        lines.append(
            datetime.utcfromtimestamp(hour).strftime("%Y-%m-%dT%H:%M:%SZ") + f",{100 + 10 * i}"
        )
    series.write_text("\n".join(lines) + "\n")
    cfg_path = tmp_path / "hourly.yaml"
    cfg_path.write_text(
        f"cluster: c1\nledger: {env}\ncarbon:\n  region: DE\n"
        f"  intensity_file: {series}\n  pue: {pue}\n"
    )
    return cfg_path, {T - 10 * 3600 + i * 3600: 100 + 10 * i for i in range(48)}


def test_hourly_intensity_per_job_and_totals_equal_a_direct_sum(env, tmp_path, monkeypatch):
    cfg_path, intensity = _hourly_config(tmp_path, env)
    monkeypatch.setenv("LLEM_CONFIG", str(cfg_path))
    hourly = _hourly_by_run(env)
    direct = {
        job: sum(j / 3.6e6 * 1.3 * intensity[h] for h, j in by_hour.items())
        for job, by_hour in hourly.items()
    }
    _, out, _ = acct_run(*WHOLE, "-X", "--json", "-o", "JobIDRaw,CO2e,CarbonIntensity")
    doc = json.loads(out)
    got = {j["JobIDRaw"]: j["CO2e"] for j in doc["jobs"]}
    assert got == pytest.approx(direct, abs=1e-3)
    assert doc["carbon"]["hourly_source"]
    # 5001 ran 10:00-12:00 (hours 10 and 11 of the series: 200 and 210 g/kWh)
    assert doc["jobs"][0]["CarbonIntensity"] == 205.0
    _, out, _ = acct_run(*WHOLE, "--totals", "user", "--json", "-o", "User,CO2e")
    totals = {t["User"]: t["CO2e"] for t in json.loads(out)["totals"]}
    assert totals == pytest.approx(
        {"alice": direct["5001"] + direct["5003"], "bob": direct["5010"]}, abs=1e-3
    )


def test_statement_numbers_equal_a_direct_sum_over_the_ledger(env):
    status, out, err = acct_run(*WHOLE, "--statement")
    assert status == 0, err
    db = sqlite3.connect(env)
    total_j = db.execute("SELECT SUM(energy_uj) FROM job_energy").fetchone()[0] / 1e6
    gpu_j = (
        db.execute("SELECT SUM(energy_uj) FROM job_energy WHERE component = 'gpu'").fetchone()[0]
        / 1e6
    )
    est_j = (
        db.execute("SELECT SUM(energy_uj) FROM job_energy WHERE source = 'estimated'").fetchone()[0]
        / 1e6
    )
    db.close()
    kwh = total_j / 3.6e6
    assert out.startswith(
        "The 3 job run(s) (cluster c1, from 2026-03-01T00:00:00 to 2026-03-03T00:00:00) used "
        f"{format_kwh(kwh)} of electricity at the hardware (GPU {gpu_j / 3.6e6:,.3f} kWh, "
    )
    assert f"{100 * est_j / total_j:.1f} % was estimated" in out
    assert (
        f"PUE) of 1.20 and a grid carbon intensity of 400.0 gCO2e/kWh (configured constant "
        f"(carbon.intensity_g_per_kwh); data year n/a; unspecified basis; region DE), this "
        f"corresponds to {format_co2e(kwh * 1.2 * 400)} of operational emissions."
    ) in out
    assert "4 node(s) of cluster c1 (16.0 GPU-hours, 4.6 node-hours)" in out


def test_statement_with_hourly_intensity_and_filters(env, tmp_path, monkeypatch):
    cfg_path, intensity = _hourly_config(tmp_path, env, pue="1.0")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg_path))
    _, out, _ = acct_run(*WHOLE, "-u", "alice", "--statement")
    hourly = _hourly_by_run(env)
    grams = sum(
        j / 3.6e6 * intensity[h] for job in ("5001", "5003") for h, j in hourly[job].items()
    )
    assert out.startswith("The 2 job run(s) (user alice, cluster c1, ")
    assert f"corresponds to {format_co2e(grams)} of operational emissions" in out
    _, out, _ = acct_run("-u", "nobody", "--statement")
    assert out.startswith("No jobs match (user nobody")


def test_windows_of_a_ledger_filled_by_the_aggregator(tmp_path, monkeypatch):
    from llem.cluster.ledger import Ledger
    from tests.helpers.ledger import merge
    from tests.helpers.nodes import job_slices

    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    with Ledger(d / "ledger.db") as ledger:
        merge(ledger, job_slices(tmp_path, "100"))
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nledger: {d / 'ledger.db'}\ncarbon:\n  intensity_g_per_kwh: 300\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    status, out, err = acct_run(
        "-j",
        "100",
        "-P",
        "-o",
        "JobID,User,NNodes,NodeList,AllocGPUs,GPUEnergy,CPUEnergy,"
        "ConsumedEnergyRaw,EnergySource,State",
    )
    assert status == 0, err
    assert out == (
        "JobID|User|NNodes|NodeList|AllocGPUs|GPUEnergy|CPUEnergy|ConsumedEnergyRaw|"
        "EnergySource|State\n"
        "100|alice|3|n[1-3]|3|2.70M|648K|3402000|measured|UNKNOWN\n"
        "100.epoch 1|alice|3|n[1-3]|3|405|0|405|measured|closed\n"
    )


def test_rows_built_in_one_loop_equal_run_row(env):
    """``run_rows`` (the fast loop of ``llem-acct``) builds exactly ``run_row``'s dicts, for
    every run of the ledger and with every column read."""
    from llem.acct.rows import run_row, run_rows
    from llem.cluster import acct_queries as q

    with q.open_ledger(env) as led:
        runs = q.select_runs(led, q.RunFilter())
    assert len(runs) >= 3
    assert run_rows(runs) == [run_row(dict(zip(q.RUN_COLUMNS, r))) for r in runs]
    # the odd values too: no Slurm times, a cancel by uid, no exit code, no attribution
    odd = [dict(zip(q.RUN_COLUMNS, r)) for r in runs[:2]]
    odd[0].update(state="CANCELLED", cancelled_by=1001, slurm_start_ns=None, attribution=None)
    odd[1].update(exit_code=None, energy_uj=0, attribution="use,,exclusive,use")
    assert run_rows([tuple(r.values()) for r in odd]) == [run_row(r) for r in odd]


@pytest.mark.parametrize(
    "fields",
    [
        ("JobID", "State", "CO2e"),
        ("JobID", "JobName", "User", "Account", "Partition", "State", "Elapsed", "NNodes"),
        ("JobID", "ExitCode", "NodeList", "Attribution", "Coverage", "PlatformShare"),
    ],
)
def test_only_the_columns_the_fields_need_are_read(env, fields):
    """``select_runs`` with a set of columns returns the same values for those (and for the
    key, order and pricing columns every row reads), None or 0 for the others; and the rows
    built from them show the same fields as rows built from every column."""
    from llem.acct.rows import run_columns_for, run_rows
    from llem.cluster import acct_queries as q

    with q.open_ledger(env) as led:
        full = q.select_runs(led, q.RunFilter())
        wanted = run_columns_for(fields)
        assert (
            wanted is not None
            and "job_id" in wanted
            and "attribution" not in wanted
            or ("Attribution" in fields)
        )
        some = q.select_runs(led, q.RunFilter(), wanted, ordered=False)
    assert len(some) == len(full)
    by_key = {r[:3]: r for r in some}
    for row in full:
        got = by_key[row[:3]]
        for i, column in enumerate(q.RUN_COLUMNS):
            if column in wanted:
                assert got[i] == row[i], column
            else:
                assert got[i] == (0 if column in q.ZERO_RUN_COLUMNS else None), column
    shown = {r["_key"]: {f: r.get(f) for f in fields} for r in run_rows(some)}
    assert shown == {r["_key"]: {f: r.get(f) for f in fields} for r in run_rows(full)}


def test_a_field_not_mapped_reads_every_column():
    from llem.acct.fields import FIELDS, WORK_FIELD_NAMES
    from llem.acct.rows import FIELD_RUN_COLUMNS, run_columns_for

    assert run_columns_for(None) is None
    assert run_columns_for(["JobID", "Work"]) is None  # work: windows and attribution
    # every job field is either mapped or a work field (a new field must be added there)
    assert set(FIELDS) == set(FIELD_RUN_COLUMNS) | WORK_FIELD_NAMES


def test_slim_rows_hold_the_same_values_as_full_rows(env):
    """``run_rows(slim=True)`` (output showing only :data:`SLIM_FIELDS`) has those fields and
    the private ones with the full rows' values, and no other."""
    from llem.acct.rows import SLIM_FIELDS, run_rows
    from llem.cluster import acct_queries as q

    with q.open_ledger(env) as led:
        runs = q.select_runs(led, q.RunFilter())
    full, slim = run_rows(runs), run_rows(runs, slim=True)
    carbon = {"CO2e", "CarbonIntensity"}  # added by add_carbon
    for f, s in zip(full, slim, strict=True):
        assert set(s) == (SLIM_FIELDS - carbon) | {k for k in f if k.startswith("_")}
        assert s == {k: f[k] for k in s}


# Jobs for the by-column path: hostile names (a delimiter, a newline, terminal escapes), NULL
# fields (no tag, no Slurm facts, no array), a cancel by uid, an array task, a job run twice
# (requeued: only its latest run shows without -D) and a job with no energy.
HOSTILE = "evil|x\n\x1b]0;pwned\x07\x1b[2J;"
COLUMN_JOBS = [
    *acct_data.JOBS,
    acct_data.job("6001", HOSTILE, "a|b", "p;q", T + 600, T + 4000, ["c0003"], name=HOSTILE),
    acct_data.job("6002", "carol", "chem", "cpu", T + 700, T + 800, ["c0004"], tag=HOSTILE),
    acct_data.job("6003", "carol", "chem", "cpu", T + 900, T + 1900, ["c0004"], state="FAILED"),
    acct_data.job(
        "6003",
        "carol",
        "chem",
        "cpu",
        T + 2000,
        T + 2500,
        ["c0004"],
        state="CANCELLED",
        slurm={
            "submit_s": T + 850,
            "slurm_start_s": T + 2001,
            "slurm_end_s": T + 2499,
            "cancelled_by": 1001,
            "qos": "high|er",
            "req_mem": "4G",
            "alloc_cpus": 8,
        },
    ),
    acct_data.job("6004", "dave", "phys", "gpu", T + 50, T + 50, ["g0009"], cpu_w=0, dram_w=0),
    acct_data.job("6006", "dave", "phys", "gpu", T + 60, T + 999, ["g0009"], array=("6005", "3")),
]
COLUMN_CASES = [
    ("-X", "-P"),
    ("-X", "-p"),
    ("-X", "-P", "-D"),
    ("-X", "-p", "-n", "--delimiter", ";"),
    ("-X", "-P", "--delimiter", "0"),
    ("-X", "-P", "-u", "carol"),
    ("-X", "-P", "-j", "6003,5009_1"),
    ("-X", "-P", "--units", "K"),
    ("-X", "-P", "--noconvert", "-D"),
    (
        "-X",
        "-p",
        "-D",
        "-o",
        "JobID,JobIDRaw,JobName,Cluster,User,Account,Partition,State,Submit,Eligible,Start,"
        "End,Elapsed,ElapsedRaw,Timelimit,TimelimitRaw,AllocCPUS,AllocTRES,ReqMem,QOS,NNodes,"
        "NodeList,ConsumedEnergy,EnergySource,Coverage,Tag,CO2e,CarbonIntensity",
    ),
    ("-X", "-P", "-o", "JobID,State"),  # no carbon at all
    ("-X", "-P", "-A", "nosuchaccount"),  # no run
]


def _both_paths(ledger, args, monkeypatch):
    """llem-acct's output for ``args`` by column and by row (the by-column path turned off),
    and how many times the by-column path ran."""
    import llem.acct as lib

    calls = []
    real = lib.select_columns
    monkeypatch.setattr(lib, "select_columns", lambda *a: calls.append(a) or real(*a))
    by_column = acct_data.acct_run(*WHOLE, *args, "--ledger", ledger)
    with monkeypatch.context() as m:
        m.setattr(lib, "columns_apply", lambda *a: False)
        by_row = acct_data.acct_run(*WHOLE, *args, "--ledger", ledger)
    return by_column, by_row, len(calls)


def _check_column_cases(ledger, monkeypatch):
    shown = 0
    for args in COLUMN_CASES:
        by_column, by_row, calls = _both_paths(ledger, args, monkeypatch)
        assert by_column == by_row, args
        assert calls == 1, args  # the by-column path was taken
        shown += by_column[1].count("\n")
    out = _both_paths(ledger, ("-X", "-P", "-o", "JobID,JobName"), monkeypatch)[0][1]
    # escaped: one row, two fields; the requeued job once; 8 jobs
    assert "\n6001|evil\\x7cx\\n\\x1b]0;pwned\\x07\\x1b[2J;\n" in out
    assert len(out.splitlines()) == 1 + 8 and out.count("\n6003|") == 1
    return shown


def test_rows_by_column_print_the_same_bytes(tmp_path, monkeypatch):
    """-X with -p/-P and plain fields is printed from rows held by column
    (``rows.select_columns``): byte for byte what the rows built as dicts give, for hostile
    names, NULL fields, a requeued job, arrays, other delimiters and units."""
    ledger = tmp_path / "ledger.db"
    make_ledger.write_jobs(ledger, COLUMN_JOBS)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(acct_data.CONFIG.replace("  region: DE\n", ""))  # a constant factor
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    assert _check_column_cases(str(ledger), monkeypatch) > 60


@pytest.mark.postgres
def test_rows_by_column_print_the_same_bytes_on_postgresql(tmp_path, monkeypatch, pg_server):
    """The same on PostgreSQL, the ledger copied by ``llem ledger copy``."""
    from llem.cli.ledger import ledger as ledger_cli
    from llem.cli.main import run

    ledger = tmp_path / "ledger.db"
    make_ledger.write_jobs(ledger, COLUMN_JOBS)
    url = pg_server.database("bycolumn")
    assert run(ledger_cli, ["copy", str(ledger), url], prog_name="llem ledger") == 0
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(acct_data.CONFIG.replace("  region: DE\n", ""))
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    on_pg = _check_column_cases(url, monkeypatch)
    assert on_pg == _check_column_cases(str(ledger), monkeypatch)
    for args in COLUMN_CASES:
        a = acct_data.acct_run(*WHOLE, *args, "--ledger", str(ledger))
        assert a == acct_data.acct_run(*WHOLE, *args, "--ledger", url), args
