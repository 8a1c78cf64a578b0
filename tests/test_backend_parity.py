"""Above the storage layer every command behaves identically on SQLite and PostgreSQL.

One spool (real node stores -> job, node and header slices, with windows that did work and
each node's power series) is aggregated by ``llem aggregate``'s own code into an SQLite
ledger and into a PostgreSQL one, and each ledger's due jobs get Slurm's accounting records
(sacct's lines: every end state, exit codes, submit, eligible, time limit, TRES; one job
without its record, asked again later) through the ledger's own accounting step; the ``llem-acct`` tests' ledger is copied into PostgreSQL
by ``llem ledger copy``. The ``llem-acct`` matrix (``tests.helpers.acct.FILTERS``, every
output form, the work fields, ``--totals`` by every key including ``window``, in two time
zones, ``--statement``), ``llem job`` (text and JSON, every job) and ``llem report``
(monthly and per account, every text format and the CSV files) run against both ledgers of
each pair; outputs must be equal, byte for byte.
"""

import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llem import slices
from llem.cli.main import run
from llem.cli.report import report as report_cli
from llem.cluster.aggregate import aggregate_once
from llem.cluster.header import header_slice_from_env
from llem.cluster.ledger import Ledger, open_ledger
from llem.cluster.pg_ledger import PgLedger
from llem.cluster.slurm_accounting import (
    CANDIDATES_PER_PASS,
    MAX_TRIES,
    SACCT_FIELDS,
    parse_sacct,
    retry_delay_ns,
)
from llem.config import AggregateConfig
from llem.slices import encode
from tests.helpers import acct as acct_data
from tests.helpers import make_ledger
from tests.helpers.make_spool import make_spool
from tests.helpers.nodes import ENV, T0, S, job_slices, node_config
from tests.helpers.report_data import ESTIMATED, NOVEMBER, job_and_node_slices

pytestmark = pytest.mark.postgres

NOW = T0 + 40 * 86400 * S
ALL_TIME = ("-S", "2023-10-01", "-E", "2024-01-31")
FIELDS = (
    "JobID,JobIDRaw,JobName,User,UID,Account,Partition,Cluster,State,Start,End,Elapsed,"
    "NNodes,NodeList,AllocGPUs,Tag,ConsumedEnergy,ConsumedEnergyRaw,CPUEnergy,DRAMEnergy,"
    "GPUEnergy,OtherEnergy,EstimatedEnergy,EnergySource,Coverage,AveWatts,CarbonIntensity,CO2e,"
    "Attribution"
)
SLURM_FIELDS = (
    "JobID,State,ExitCode,DerivedExitCode,Submit,Eligible,Start,End,Timelimit,AllocCPUS,"
    "AllocTRES,ReqMem,QOS"
)
PER_WORK = "Work,WorkUnit,EnergyPerWork,GPUEnergyPerWork,CO2ePerWork,WorkBasis"
WORK_FIELDS = f"JobID,JobName,{PER_WORK}"


def _spool(root: Path) -> Path:
    template = root / "template"
    template.mkdir()
    items = []
    for job in NOVEMBER + ESTIMATED:
        items += job_and_node_slices(root / "stores", job)
    # three nodes, each with a window of 1000.5 tokens and its power series
    items += job_slices(root / "multi", "100", work=1000.5, unit="tokens")
    items += job_slices(
        root / "pair", "101", nodes=("n1", "n2"), nodelist="n[1-2]", work=64, unit="samples"
    )
    items += job_slices(root / "plain", "102", nodes=("n4",), nodelist="n4")  # no work
    items.append(header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 5401 * S))
    for data in items:
        (template / slices.file_name(data)).write_bytes(encode(data))
    make_spool(template, nodes=8, jobs=3, seed=2)
    return template


def _aggregated(root: Path, template: Path, ledger: str | None):
    root.mkdir()
    # sacct is asked below, with Slurm's recorded answers, not of whatever Slurm this host has
    aggregate = AggregateConfig(grace_s=3600.0, batch_size=25, sacct="off")
    cfg = replace(node_config(root, "admin"), aggregate=aggregate)
    if ledger is not None:
        cfg = replace(cfg, ledger=ledger)
    shutil.copytree(template, cfg.spool_dir)
    os.chmod(cfg.spool_dir, 0o700)
    res = aggregate_once(cfg, now_ns=NOW)
    assert res.merged > 0 and not res.quarantined
    return cfg.ledger


# sacct's answer for a job, by its place among the jobs due: state, ExitCode, DerivedExitCode,
# Timelimit, TimelimitRaw; None: no record yet (slurmdbd behind), asked again later.
ENDS = (
    ("COMPLETED", "0:0", "0:0", "UNLIMITED", "UNLIMITED"),
    ("CANCELLED by 1001", "0:15", "0:0", "02:00:00", "120"),
    ("TIMEOUT", "0:0", "0:0", "01:00:00", "60"),
    ("FAILED", "3:0", "3:0", "1-00:00:00", "1440"),
    ("OUT_OF_MEMORY", "0:125", "0:0", "Partition_Limit", "Partition_Limit"),
    ("CANCELLED by 0", "0:9", "2:0", "00:30:00", "30"),
    None,
)


def _sacct_lines(ledger, job_ids: list[str]) -> str:
    """What ``sacct -X -D -P -n`` prints of these jobs' runs (times as epoch seconds), from
    the runs the ledger holds: one end per job, by its place in :data:`ENDS`."""
    lines = []
    for n, job_id in enumerate(job_ids):
        end = ENDS[n % len(ENDS)]
        if end is None:
            continue
        state, exit_code, derived, limit, raw = end
        for job_run in sorted(ledger.job_runs(job_id), key=lambda r: r["run_start_ns"]):
            start = job_run["run_start_ns"] // S
            values = {
                "JobIDRaw": job_id,
                "State": state,
                "ExitCode": exit_code,
                "DerivedExitCode": derived,
                "Submit": str(start - 300 - n),
                "Eligible": str(start - 60 - n % 7),
                "Start": str(start),
                "End": str(-(-job_run["run_end_ns"] // S)),
                "Timelimit": limit,
                "TimelimitRaw": raw,
                "AllocCPUS": str(8 * (n % 3 + 1)),
                "AllocTRES": f"billing={n % 5 + 1},cpu={8 * (n % 3 + 1)},mem=16G,node=1",
                "ReqMem": "16G",
                "QOS": "normal" if n % 2 else "high",
            }
            lines.append("|".join(values[f] for f in SACCT_FIELDS))
    return "\n".join(lines) + "\n"


def _account(spec: str) -> list[tuple[str, str]]:
    """The accounting step of ``llem aggregate`` (:func:`slurm_accounting.reconcile`'s
    ledger calls) with sacct's answers for the due jobs; returns the jobs that were due."""
    with open_ledger(spec) as ledger:
        due = ledger.accounting_candidates(
            ended_before_ns=NOW, now_ns=NOW, max_tries=MAX_TRIES, limit=CANDIDATES_PER_PASS
        )
        job_ids = [job_id for _, job_id in due]
        stored = ledger.store_accounting(
            "c1",
            parse_sacct(_sacct_lines(ledger, job_ids), "c1"),
            job_ids,
            now_ns=NOW,
            retry_ns=retry_delay_ns,
            grace_s=3600.0,
        )
        assert stored >= len(job_ids) // 2
    return due


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, pg_server):
    """{name: (sqlite ledger, postgresql ledger)} holding the same facts."""
    root = tmp_path_factory.mktemp("parity")
    template = _spool(root)
    spooled = (
        _aggregated(root / "sqlite", template, None),
        _aggregated(root / "pg", template, pg_server.database("spool")),
    )
    due = [_account(spec) for spec in spooled]
    assert due[0] == due[1] and len(due[0]) >= 10
    acct_db = root / "acct" / "ledger.db"
    acct_db.parent.mkdir(mode=0o755)
    make_ledger.write_jobs(acct_db, acct_data.JOBS)
    copied = pg_server.database("acct")
    status = run(_ledger_cli(), ["copy", str(acct_db), copied], prog_name="llem ledger")
    assert status == 0
    return {"spool": spooled, "acct": (str(acct_db), copied)}


def _ledger_cli():
    from llem.cli.ledger import ledger

    return ledger


def _dump(spec: str) -> str:
    cls = PgLedger if spec.startswith("postgresql") else Ledger
    with cls(spec, readonly=True) as led:
        return led.canonical_dump()


@pytest.mark.parametrize("pair", ["spool", "acct"])
def test_both_ledgers_hold_the_same_facts(pairs, pair):
    sqlite, pg = pairs[pair]
    dump = _dump(sqlite)
    assert dump == _dump(pg)
    assert "# job_runs 0" not in dump and "# job_energy 0" not in dump
    if pair == "spool":  # windows with work and power series went through the merge
        assert '1000.5, "tokens"]' in dump and '64.0, "samples"]' in dump
        assert "# job_power 0" not in dump
        # Slurm's records, paired with the runs; the jobs still waiting for theirs
        assert "# slurm_jobs 0" not in dump and '"TIMEOUT"' in dump
        checks = []
        for spec in (sqlite, pg):
            with open_ledger(spec, readonly=True) as led:
                checks.append(
                    sorted(led.query("SELECT * FROM slurm_checks"))
                    + sorted(
                        led.query(
                            "SELECT state_source, accounted, COUNT(*) FROM job_runs "
                            "GROUP BY state_source, accounted"
                        ),
                        key=repr,
                    )
                )
        assert checks[0] == checks[1]
        assert (1, NOW + retry_delay_ns(1)) in [c[2:] for c in checks[0] if len(c) == 4]
        assert ("slurm", 1) in [c[:2] for c in checks[0] if len(c) == 3]


def _acct_matrix() -> list[tuple[str, ...]]:
    base = ("-a", *ALL_TIME)
    out = []
    for args, _ in acct_data.FILTERS:
        selection = ("-a", *args) if "-j" in args or "-S" in args or "-E" in args else base + args
        out.append((*selection, "-P", "-n", "-o", "JobID"))
    out += [
        base,
        (*base, "-X"),
        (*base, "-D", "-p", "-o", FIELDS),
        (*base, "-X", "-P", "-o", FIELDS),
        (*base, "--json", "-o", FIELDS),
        (*base, "-u", "alice", "-P", "-o", FIELDS),
        (*base, "-A", "physics", "--json"),
        (*base, "-N", "n[1-3]", "-P"),
        (*base, "-j", "100.train", "-P", "-o", FIELDS),
        (*base, "--statement"),
        (*base, "-A", "physics", "--statement"),
        (*base, "-s", "F", "-P"),
        (*base, "-s", "CA", "-P", "-o", SLURM_FIELDS),
        (*base, "-s", "TO", "-P", "-o", SLURM_FIELDS),
        (*base, "-s", "OOM,CD", "-D", "-P", "-o", SLURM_FIELDS),
        (*base, "-X", "-o", SLURM_FIELDS),
        (*base, "-X", "--json", "-o", SLURM_FIELDS),
        (*base, "--units", "K", "-X"),
        (*base, "-P", "-o", WORK_FIELDS),
        (*base, "-X", "--json", "-o", WORK_FIELDS),
        (*base, "-j", "100", "-P", "-o", WORK_FIELDS),
        ("-a", "-S", "2023-11-10", "-E", "2023-11-16", "-P", "-o", FIELDS),
    ]
    out.append((*base, "--totals", "window", "-P", "-o", f"Window,NJobs,ConsumedEnergy,{PER_WORK}"))
    for key in ("user", "account", "partition", "tag", "day", "month", "window"):
        out.append((*base, "--totals", key, "-P"))
        out.append((*base, "--totals", key, "--json"))
    return out


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
@pytest.mark.parametrize("pair", ["spool", "acct"])
def test_llem_acct_says_the_same_on_both(pairs, pair, zone, monkeypatch, tmp_path):
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(acct_data.CONFIG)
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        sqlite, pg = pairs[pair]
        matrix = _acct_matrix()
        if pair == "acct":  # the acct tests' jobs are in March 2026
            matrix = [
                tuple("2026-03-01" if a == "2023-10-01" else a for a in args) for args in matrix
            ]
            matrix = [tuple("2026-03-31" if a == "2024-01-31" else a for a in m) for m in matrix]
        nonempty, work, slurm = 0, [], {}
        for args in matrix:
            a = _timeless(acct_data.acct_run(*args, "--ledger", sqlite))
            b = _timeless(acct_data.acct_run(*args, "--ledger", pg))
            assert a == b, f"llem-acct {' '.join(args)}"
            nonempty += a[0] == 0 and len(a[1].splitlines()) > 1
            if PER_WORK in ",".join(args):
                work.append(a[1])
            if SLURM_FIELDS in args and "-s" in args:
                slurm[args[args.index("-s") + 1]] = a[1]
        assert nonempty >= 15, "most of the matrix selected nothing"
        if pair == "spool":  # the work fields and --totals window had work to show
            assert all("tokens" in out for out in work) and len(work) == 4
            assert sum("samples" in out for out in work) == 3  # not in -j 100
            # Slurm's facts, stored by the accounting step, selected and shown alike
            assert "CANCELLED by 1001|0:15|0:0|" in slurm["CA"] and "|02:00:00|" in slurm["CA"]
            assert "|TIMEOUT|0:0|0:0|" in slurm["TO"] and "mem=16G" in slurm["TO"]
            assert "OUT_OF_MEMORY|0:125" in slurm["OOM,CD"] and "COMPLETED" in slurm["OOM,CD"]
    finally:
        monkeypatch.undo()
        time.tzset()


NOW_END = re.compile(r"(no jobs match \(.* to )[0-9T:-]+\)")
GENERATED = re.compile(r'"generated_at": "[^"]*"')


def _timeless(result: tuple) -> tuple:
    """The output without its time of generation, nor the "now" that ends a window by
    default (``-j`` alone: Epoch to now); two runs may straddle a second."""
    return tuple(
        NOW_END.sub(r"\1<now>)", GENERATED.sub('"generated_at": "-"', r))
        if isinstance(r, str)
        else r
        for r in result
    )


def _report(args, monkeypatch, tmp_path, ledger) -> tuple[int, str, str]:
    cfg = tmp_path / "llem.yaml"
    cfg.write_text("cluster: c1\ncarbon:\n  region: DE\n  pue: 1.2\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    status = run(report_cli, [*args, "--ledger", ledger], prog_name="llem report")
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "args",
    [
        ["monthly", "--month", "2023-11", "--format", "md"],
        ["monthly", "--month", "2023-11", "--format", "json", "--idle-w", "50"],
        ["monthly", "--since", "2023-11-01", "--until", "2023-11-15", "--format", "md"],
        ["account", "physics", "--month", "2023-11", "--format", "md"],
        ["account", "astro", "--month", "2023-11", "--format", "json"],
        ["monthly", "--month", "2023-12", "--format", "md"],
    ],
)
def test_llem_report_says_the_same_on_both(pairs, args, monkeypatch, tmp_path):
    sqlite, pg = pairs["spool"]
    a = _timeless(_report(args, monkeypatch, tmp_path, sqlite))
    b = _timeless(_report(args, monkeypatch, tmp_path, pg))
    assert a[0] == 0 and len(a[1]) > 500
    assert a == b, _diff(a[1], b[1])


def _diff(a: str, b: str) -> str:
    import difflib

    return "\n".join(list(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm=""))[:40])


def test_llem_report_csv_files_are_the_same_on_both(pairs, monkeypatch, tmp_path):
    folders = []
    for n, ledger in enumerate(pairs["spool"]):
        out = tmp_path / f"out{n}"
        args = ["monthly", "--month", "2023-11", "--format", "csv", "--out", str(out)]
        assert _report(args, monkeypatch, tmp_path, ledger)[0] == 0
        folders.append({p.name: p.read_bytes() for p in sorted(out.rglob("*.csv"))})
    assert folders[0] == folders[1] and len(folders[0]) >= 7
    totals = json.dumps(sorted(folders[0]))
    assert "totals.csv" in totals


def test_llem_metrics_queries_answer_the_same_on_both(pairs):
    from llem.cluster import acct_queries, metrics_queries

    answers = []
    for spec in pairs["spool"]:
        with acct_queries.open_ledger(spec) as led:
            answers.append(
                (
                    metrics_queries.energy_by_account_hour(led, "c1"),
                    metrics_queries.job_runs_by_status(led, "c1"),
                    metrics_queries.quarantined_slices(led),
                    acct_queries.clusters(led),
                )
            )
    assert answers[0] == answers[1]
    assert answers[0][0] and answers[0][1]


def _job_run(*args):
    from click.testing import CliRunner

    from llem.cli.job import job as job_cli

    result = {}
    with CliRunner().isolation() as streams:
        result["status"] = run(job_cli, list(args), prog_name="llem job")
        return result["status"], streams[0].getvalue().decode(), streams[1].getvalue().decode()


def test_llem_job_says_the_same_on_both(pairs, monkeypatch, tmp_path):
    """Every job of the spool, in words and in JSON: nodes, devices, windows with their work
    and energy per unit, the power timeline, CO2e."""
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(acct_data.CONFIG)
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    sqlite, pg = pairs["spool"]
    with Ledger(sqlite, readonly=True) as led:
        jobs = sorted({r[0] for r in led.query("SELECT job_id FROM job_runs")})
    assert len(jobs) >= 10
    timelines = per_unit = 0
    for job_id in jobs:
        for form in ((), ("--json",)):
            a = _job_run(job_id, *form, "--ledger", sqlite)
            b = _job_run(job_id, *form, "--ledger", pg)
            assert a[0] == 0, a[2]
            assert a == b, f"llem job {job_id} {' '.join(form)}\n" + _diff(a[1], b[1])
        view = json.loads(a[1])
        timelines += bool(view["timeline"]["watts"])
        per_unit += any(w["energy_per_unit_j"] for w in view["windows"])
    assert timelines >= 3 and per_unit >= 2
