"""``llem report``: totals against the ledger itself, waste, reconciliation, formats, CLI.

Ledgers are built from real node stores -> job and node slices -> merge (see
``tests/helpers/report_data.py``); expected figures come from direct SQL over the ledger or from
the sampling parameters, never from the report's own code.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest

from llem import carbon
from llem.cli.main import run
from llem.cli.report import report as report_cli
from llem.cluster import report_queries as q
from llem.report import build_report, frames, plots, render
from tests.helpers.report_data import (
    ESTIMATED,
    NOVEMBER,
    Job,
    build_ledger,
    report_config,
    utc_ns,
    write_yaml,
)

UJ_PER_KWH = 3.6e12
NOV = frames.month_period("2023-11")
DE_G_PER_KWH = carbon.lookup("DE", 2023).g_per_kwh  # energy of 2023: 2023's figure


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    return build_ledger(tmp_path_factory.mktemp("report"), NOVEMBER)


@pytest.fixture(scope="module")
def nov(ledger_path):
    with q.open_readonly(ledger_path) as ledger:
        return build_report(ledger, report_config(ledger_path), NOV)


def sql(path, text, params=()):
    with q.open_readonly(path) as ledger:
        return ledger.query(text, params)


def md_rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table line, without tabulate's padding."""
    return [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in md.splitlines()
        if line.startswith("|")
    ]


def md_table(md: str, heading: str) -> list[str]:
    """The lines of the table under ``## heading``."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def cli(args, monkeypatch, tmp_path, ledger, region="DE"):
    """Run ``llem report ARGS`` in-process; return (status, stdout, stderr)."""
    monkeypatch.setenv("LLEM_CONFIG", str(write_yaml(tmp_path / "llem.yaml", ledger, region)))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    status = run(report_cli, args, prog_name="llem report")
    return status, out.getvalue(), err.getvalue()


# -- totals against the ledger ---------------------------------------------------------------------


def test_totals_equal_a_direct_sum_over_the_ledger(ledger_path, nov):
    start_s, end_s = NOV.start_ns // 10**9, NOV.end_ns // 10**9
    rows = dict(
        sql(
            ledger_path,
            "SELECT component, SUM(energy_uj) FROM job_energy "
            "WHERE hour_s >= ? AND hour_s < ? GROUP BY component",
            (start_s, end_s),
        )
    )
    total_uj = sum(rows.values())
    t = nov.totals
    assert t["energy_kwh"] == pytest.approx(total_uj / UJ_PER_KWH, rel=1e-12)
    for comp in ("cpu", "dram", "gpu"):
        assert t[f"{comp}_kwh"] == pytest.approx(rows[comp] / UJ_PER_KWH, rel=1e-12)
    # CO2e straight from the shipped DE figure and the configured PUE.
    assert t["operational_kg"] == pytest.approx(
        total_uj / UJ_PER_KWH * 1.2 * DE_G_PER_KWH / 1000, rel=1e-9
    )
    assert t["co2e_kg"] == t["operational_kg"] + t["embodied_kg"]
    # ...and the same figure as carbon.emissions() over the hourly totals.
    assert nov.carbon["operational_kg_check"] == pytest.approx(t["operational_kg"], rel=1e-9)
    # GPU-hours: GPUs x time inside the month, per node run.
    (gpu_s,) = sql(
        ledger_path,
        "SELECT SUM(json_array_length(gpus) * "
        "(MIN(end_ns, ?) - MAX(start_ns, ?)) / 1e9) FROM job_nodes "
        "WHERE end_ns > ? AND start_ns < ?",
        (NOV.end_ns, NOV.start_ns, NOV.start_ns, NOV.end_ns),
    )[0]
    assert t["gpu_h"] == pytest.approx(gpu_s / 3600)
    (jobs,) = sql(
        ledger_path,
        "SELECT COUNT(*) FROM job_runs WHERE run_end_ns > ? AND run_start_ns < ?",
        (NOV.start_ns, NOV.end_ns),
    )[0]
    assert t["jobs"] == jobs == 6


def test_sampled_power_comes_back_as_energy(nov):
    # Job 101: 3 h at GPU 250 W, CPU package 100 W of which 60 % attributed, DRAM 10 W half.
    top = nov.top_jobs.set_index("job_id")
    assert top.loc["101", "gpu_kwh"] == pytest.approx(0.75)
    assert top.loc["101", "energy_kwh"] == pytest.approx(3 * (0.25 + 0.06 + 0.005))
    assert top.loc["101", "kwh_per_gpu_h"] == pytest.approx(0.315)
    assert top.loc["101", "command"] == "llem-acct -j 101"


def test_a_job_across_the_month_end_is_split_by_clock_hour(ledger_path, nov):
    with q.open_readonly(ledger_path) as ledger:
        dec = build_report(ledger, report_config(ledger_path), frames.month_period("2023-12"))
    nov106 = nov.top_jobs.set_index("job_id").loc["106", "energy_kwh"]
    dec106 = dec.top_jobs.set_index("job_id").loc["106", "energy_kwh"]
    assert nov106 == pytest.approx(dec106) == pytest.approx(0.315)
    assert dec.totals["jobs"] == 1 and dec.totals["gpu_h"] == pytest.approx(1.0)


def test_groups_add_up_to_the_totals(nov):
    for key in frames.GROUP_KEYS:
        g = nov.groups[key]
        assert g["energy_kwh"].sum() == pytest.approx(nov.totals["energy_kwh"])
        assert g["co2e_kg"].sum() == pytest.approx(nov.totals["co2e_kg"])
        assert g["gpu_h"].sum() == pytest.approx(nov.totals["gpu_h"])
        assert g["jobs"].sum() == nov.totals["jobs"]
    acct = nov.groups["account"].set_index("account")
    assert list(acct.index) == ["physics", "chemistry", "biology"]  # largest first
    assert acct.loc["physics", "jobs"] == 3
    assert "(none)" in set(nov.groups["tag"]["tag"])


def test_measured_share_and_coverage_of_measured_data(nov):
    assert nov.totals["measured_share"] == 1.0
    assert nov.totals["coverage"] == pytest.approx(1.0)
    assert not any("estimated" in n for n in nov.notes)


def test_change_against_the_previous_month(nov):
    change = nov.change.set_index("key")
    assert nov.previous.label == "2023-10"
    assert change.loc["jobs", "previous"] == 1 and change.loc["jobs", "current"] == 6
    assert change.loc["energy_kwh", "previous"] == pytest.approx(0.63)
    assert change.loc["energy_kwh", "change"] == pytest.approx(nov.totals["energy_kwh"] / 0.63 - 1)
    assert change.loc["idle_kwh", "change"] is None  # 0 before: no relative change


def test_previous_period_of_a_range_and_of_january():
    assert frames.previous_period(frames.month_period("2024-01")).label == "2023-12"
    from datetime import datetime

    p = frames.range_period(datetime(2023, 11, 10), datetime(2023, 11, 17))
    prev = frames.previous_period(p)
    assert (prev.start_ns, prev.end_ns) == (utc_ns("2023-11-03 00:00"), p.start_ns)


# -- waste -----------------------------------------------------------------------------------------


def test_idle_gpus_are_waste_with_the_threshold_stated(nov):
    jobs = nov.waste["jobs"].set_index("job_id")
    assert "104" in jobs.index  # 35 W all along
    assert jobs.loc["104", "idle_gpu_h"] == pytest.approx(6.0)
    assert nov.waste["account"].iloc[0]["account"] == "biology"
    assert "below 100 W" in nov.idle_definition
    assert nov.totals["idle_kwh"] == pytest.approx(nov.waste["account"]["idle_kwh"].sum())


def test_idle_gpus_are_judged_by_their_own_energy(nov):
    jobs = nov.waste["jobs"].set_index("job_id")
    assert "101" not in jobs.index  # 250 W
    assert jobs.loc["104", "idle_kwh"] == pytest.approx(6 * 0.035)
    assert nov.waste["account"].iloc[0]["idle_share"] == pytest.approx(1.0)


def test_idle_threshold_is_a_parameter(ledger_path):
    with q.open_readonly(ledger_path) as ledger:
        r = build_report(ledger, report_config(ledger_path), NOV, idle_w=30.0)
    assert "below 30 W" in r.idle_definition


def test_a_gpu_above_the_threshold_is_not_idle(ledger_path):
    with q.open_readonly(ledger_path) as ledger:
        r = build_report(ledger, report_config(ledger_path), NOV, idle_w=30.0)
    assert "104" not in set(r.waste["jobs"]["job_id"])


# -- reconciliation --------------------------------------------------------------------------------


def test_reconciliation_from_the_nodes_hourly_totals(ledger_path, nov):
    r = nov.reconciliation
    start_s, end_s = NOV.start_ns // 10**9, NOV.end_ns // 10**9
    measured, _attributed, remainder = sql(
        ledger_path,
        "SELECT SUM(measured_uj), SUM(attributed_uj), SUM(remainder_uj) "
        "FROM node_hours WHERE hour_s >= ? AND hour_s < ?",
        (start_s, end_s),
    )[0]
    assert r["measured_kwh"] == pytest.approx(measured / UJ_PER_KWH)
    assert r["attributed_kwh"] + r["remainder_kwh"] == pytest.approx(r["measured_kwh"])
    assert r["remainder_kwh"] == pytest.approx(remainder / UJ_PER_KWH)
    # The jobs' slices delivered everything the nodes attributed: nothing missing.
    assert r["jobs_kwh"] == pytest.approx(r["attributed_kwh"])
    assert r["nodes"] == 6 and r["nodes_without_totals"] == []
    assert r["nodes_with_gaps"].empty


def test_nodes_with_gaps_and_without_hourly_totals_are_named():
    nodes = [
        # The last two: the labelled parts of the remainder, unknown (slices from before them).
        ("n1", "gpu", "measured", 100, 80, 20, 60, 3, 3000 * 10**9, 1, 1, None, None),
        ("n2", "gpu", "measured", 100, 100, 0, 60, 0, 3600 * 10**9, 1, 1, None, None),
    ]
    r = frames.reconciliation(nodes, ["n1", "n9"], 85 / 3.6e12)
    assert r["idle_unallocated_kwh"] is None and r["unallocated_kwh"] is None
    assert list(r["nodes_with_gaps"]["node"]) == ["n1"]
    assert r["nodes_with_gaps"].iloc[0]["covered_share"] == pytest.approx(3000 / 3600)
    assert r["nodes_without_totals"] == ["n9"]


# -- estimated, empty, account ---------------------------------------------------------------------


def test_a_month_of_only_estimated_data_says_so(tmp_path):
    path = build_ledger(tmp_path, ESTIMATED)
    with q.open_readonly(path) as ledger:
        r = build_report(ledger, report_config(path), NOV)
    assert r.totals["measured_share"] == 0.0
    assert (
        r.totals["estimated_kwh"] == pytest.approx(r.totals["energy_kwh"])
        and r.totals["energy_kwh"] > 0
    )
    assert any("All job energy in this period is estimated" in n for n in r.notes)
    md = render.to_markdown(r)
    assert "measured share 0 %" in md and ["Measured share of energy", "0.0 %"] in md_rows(md)


def test_an_empty_month_is_clear_and_exits_0(ledger_path, monkeypatch, tmp_path):
    status, out, err = cli(
        ["monthly", "--month", "2023-06", "--format", "md"], monkeypatch, tmp_path, ledger_path
    )
    assert status == 0
    assert "no data in" in err and "2023-06" in err
    assert "**No data**" in out
    status, out, _ = cli(
        ["monthly", "--month", "2023-06", "--format", "json"], monkeypatch, tmp_path, ledger_path
    )
    data = json.loads(out)
    assert data["empty"] is True and data["totals"]["jobs"] == 0
    assert data["totals"]["energy_kwh"] == 0


def test_an_empty_month_in_html_has_no_plots(ledger_path, monkeypatch, tmp_path):
    status, _out, _err = cli(
        ["monthly", "--month", "2023-06", "--out", str(tmp_path / "o")],
        monkeypatch,
        tmp_path,
        ledger_path,
    )
    assert status == 0
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files == ["llem-report-c1-2023-06.html"]
    assert "No data" in (tmp_path / "o" / files[0]).read_text()


def test_an_unknown_region_is_a_clear_error(ledger_path, monkeypatch, tmp_path):
    status, out, err = cli(
        ["monthly", "--month", "2023-11", "--format", "md"],
        monkeypatch,
        tmp_path,
        ledger_path,
        region="Atlantis",
    )
    assert status == 1
    assert err.startswith("Error: ") and "Atlantis" in err
    assert "Traceback" not in err and out == ""


def test_an_account_statement_holds_only_that_account(ledger_path, monkeypatch, tmp_path):
    with q.open_readonly(ledger_path) as ledger:
        r = build_report(ledger, report_config(ledger_path), NOV, account="physics")
    (uj,) = sql(
        ledger_path,
        "SELECT SUM(e.energy_uj) FROM job_energy e JOIN job_nodes jn "
        "ON jn.id = e.job_node_id JOIN job_runs r ON r.cluster = "
        "jn.cluster AND r.job_id = jn.job_id AND r.run_start_ns = "
        "jn.run_start_ns WHERE r.account = 'physics' AND e.hour_s >= ? "
        "AND e.hour_s < ?",
        (NOV.start_ns // 10**9, NOV.end_ns // 10**9),
    )[0]
    assert r.totals["energy_kwh"] == pytest.approx(uj / UJ_PER_KWH)
    assert set(r.groups["user"]["user"]) == {"alice", "bob"}
    assert r.reconciliation is None
    status, out, _err = cli(
        ["account", "physics", "--month", "2023-11", "--format", "md"],
        monkeypatch,
        tmp_path,
        ledger_path,
    )
    assert status == 0
    assert out.startswith("# Energy statement: account physics, 2023-11")
    assert "chemistry" not in out and "## By account" not in out


# -- formats agree ---------------------------------------------------------------------------------


def test_every_format_shows_the_same_numbers(nov):
    data = json.loads(render.to_json(nov))
    assert data["schema"] == "llem.report/1"
    assert data["totals"]["energy_kwh"] == nov.totals["energy_kwh"]
    tables = render.to_csv_tables(nov)
    totals = pd.read_csv(io.StringIO(tables["totals.csv"])).set_index("key")
    assert float(totals.loc["energy_kwh", "value"]) == nov.totals["energy_kwh"]
    assert float(totals.loc["co2e_kg", "value"]) == nov.totals["co2e_kg"]
    by_user = pd.read_csv(io.StringIO(tables["by_user.csv"]))
    assert by_user["energy_kwh"].tolist() == pytest.approx(
        [u["energy_kwh"] for u in data["groups"]["user"]]
    )
    md = render.to_markdown(nov)
    assert ["Energy, all components (kWh)", render.fmt(nov.totals["energy_kwh"])] in md_rows(md)
    html_text = render.to_html(nov, {})
    assert render.fmt(nov.totals["energy_kwh"]) in html_text


def test_markdown_tables_are_aligned_with_numbers_on_the_right(nov):
    lines = md_table(render.to_markdown(nov), "By user")
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in plain text
    header, separator = md_rows("\n".join(lines[:2]))
    align = dict(zip(header, separator))
    assert align["user"] == ":" + "-" * (len(align["user"]) - 1)  # names left
    assert align["energy kWh"].endswith("-:") and align["jobs"].endswith("-:")  # numbers right
    users = [row[0] for row in md_rows("\n".join(lines[2:]))]
    assert users == list(nov.groups["user"]["user"])
    assert md_rows("\n".join(md_table(render.to_markdown(nov), "Totals")))[3] == [
        "CPU (kWh)",
        render.fmt(nov.totals["cpu_kwh"]),
    ]
    assert "|   CPU (kWh) " in render.to_markdown(nov)  # sub-rows keep their indent


def test_a_pipe_in_a_name_stays_inside_its_cell(tmp_path):
    path = build_ledger(
        tmp_path,
        [Job("301", "n1", "2023-11-02 08:00", 3600, "eve|ops", "ops & <b>sec</b>", "gpu", "a|b")],
    )
    with q.open_readonly(path) as ledger:
        r = build_report(ledger, report_config(path), NOV, with_previous=False)
    md = render.to_markdown(r)
    (header, _, row) = md_rows("\n".join(md_table(md, "By user")))
    assert len(row) == len(header) and row[0] == "eve\\|ops"
    assert md_rows("\n".join(md_table(md, "By tag")))[2][0] == "a\\|b"


def test_every_co2e_figure_names_its_intensity_source_year_and_pue(nov):
    line = render.carbon_line(nov)
    for part in (
        f"{DE_G_PER_KWH:g} gCO2e/kWh",
        "region DE",
        "Ember via Our World in Data",
        "year 2023",
        "PUE 1.2",
    ):
        assert part in line
    assert line in render.to_markdown(nov)
    data = render.to_dict(nov)
    assert {"region", "intensity_g_per_kwh", "source", "year", "pue"} <= set(data["carbon"])


def test_hourly_intensity_applies_hour_by_hour(tmp_path):
    jobs = [Job("301", "n1", "2023-11-02 08:30", 2 * 3600)]
    path = build_ledger(tmp_path, jobs)
    series = tmp_path / "hourly.csv"
    series.write_text(
        "timestamp,g_co2e_per_kwh\n2023-11-02T08:00:00Z,100\n"
        "2023-11-02T09:00:00Z,200\n2023-11-02T10:00:00Z,400\n"
    )
    cfg = report_config(path, intensity_file=str(series))
    with q.open_readonly(path) as ledger:
        r = build_report(ledger, cfg, NOV, with_previous=False)
    per_hour = 0.315  # kWh per full hour (GPU 250 W + CPU 60 W + DRAM 5 W)
    expected_kg = 1.2 * per_hour * (0.5 * 100 + 200 + 0.5 * 400) / 1000
    assert r.totals["operational_kg"] == pytest.approx(expected_kg)
    assert r.carbon["operational_kg_check"] == pytest.approx(expected_kg)
    assert r.carbon["source"] == str(series)


def test_embodied_share_when_enabled(ledger_path):
    from dataclasses import replace

    from llem.config import EmbodiedConfig

    cfg = replace(report_config(ledger_path), embodied=EmbodiedConfig(enabled=True))
    with q.open_readonly(ledger_path) as ledger:
        r = build_report(ledger, cfg, NOV, with_previous=False)
    gpu_g_h = 150_000 / (6 * 8766)
    node_g_h = 2_500_000 / (6 * 8766)
    assert r.totals["embodied_kg"] == pytest.approx(
        (r.totals["gpu_h"] * gpu_g_h + r.totals["node_h"] * node_g_h) / 1000
    )
    assert "embodied:" in render.carbon_line(r)


# -- CLI -------------------------------------------------------------------------------------------


def test_html_with_plots_is_one_self_contained_file(ledger_path, monkeypatch, tmp_path):
    out_dir = tmp_path / "out"
    status, _out, err = cli(
        ["monthly", "--month", "2023-11", "--out", str(out_dir)], monkeypatch, tmp_path, ledger_path
    )
    assert status == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(
        ["llem-report-c1-2023-11.html"]
        + [
            f"llem-report-c1-2023-11-{n}"
            for n in (
                "daily_energy_co2e_by_account.png",
                "top_users.png",
                "energy_per_gpu_hour.png",
                "waste_by_account.png",
            )
        ]
    )
    text = (out_dir / "llem-report-c1-2023-11.html").read_text()
    assert text.count("src='data:image/png;base64,") == 4
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for name in names:
        if name.endswith(".png"):
            assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "account, expected",
    [
        (
            None,
            [
                "totals",
                "daily_energy_co2e_by_account.png",
                "by_account",
                "by_user",
                "top_users.png",
                "by_partition",
                "by_tag",
                "top_jobs",
                "Energy per GPU-hour",
                "energy_per_gpu_hour.png",
                "waste_jobs",
                "waste_users",
                "waste_accounts",
                "waste_by_account.png",
                "reconciliation",
                "reconciliation_components",
                "nodes_with_gaps",
                "change",
            ],
        ),
        # A statement has no waste-by-account table: the waste plot goes above its users' waste.
        (
            "biology",
            [
                "totals",
                "daily_energy_co2e_by_account.png",
                "by_user",
                "top_users.png",
                "by_partition",
                "by_tag",
                "top_jobs",
                "Energy per GPU-hour",
                "energy_per_gpu_hour.png",
                "waste_jobs",
                "waste_users",
                "waste_by_account.png",
                "change",
            ],
        ),
    ],
)
def test_each_plot_sits_above_its_table_in_html(ledger_path, account, expected):
    with q.open_readonly(ledger_path) as ledger:
        rep = build_report(ledger, report_config(ledger_path), NOV, account=account)
    page = render.to_html(rep, plots.make_plots(rep))
    found = re.findall(r"<h2 id='(\w+)'>|<h2>([^<]+)</h2>|<img alt='([\w.]+)'", page)
    assert ["".join(groups) for groups in found] == expected


def test_a_plot_without_a_place_still_shows_at_the_end(nov):
    page = render.to_html(nov, {"other.png": b"\x89PNG\r\n\x1a\n"})
    assert page.count("<img ") == 1
    assert (
        page.index("id='change'")
        < page.index("<img alt='other.png'")
        < page.index("Generated by llem report")
    )
    assert "<figcaption>other.png</figcaption>" in page


def test_csv_and_json_files(ledger_path, monkeypatch, tmp_path):
    status, out, _ = cli(
        ["monthly", "--month", "2023-11", "--format", "csv", "--out", str(tmp_path / "c")],
        monkeypatch,
        tmp_path,
        ledger_path,
    )
    assert status == 0
    folder = tmp_path / "c" / "llem-report-c1-2023-11"
    assert {
        "totals.csv",
        "by_account.csv",
        "top_jobs.csv",
        "waste_jobs.csv",
        "reconciliation.csv",
        "daily.csv",
        "change.csv",
    } <= {p.name for p in folder.iterdir()}
    status, out, _ = cli(
        ["monthly", "--since", "2023-11-01", "--until", "2023-11-11", "--format", "json"],
        monkeypatch,
        tmp_path,
        ledger_path,
    )
    data = json.loads(out)
    assert data["period"]["label"] == "2023-11-01..2023-11-11"
    assert {j["job_id"] for j in data["top_jobs"]} == {"101", "102", "103"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["monthly"], "give --month YYYY-MM"),
        (["monthly", "--month", "2023-13"], "month must be YYYY-MM"),
        (["monthly", "--month", "2023-11", "--since", "2023-11-01"], "not both"),
        (["monthly", "--since", "2023-11-02", "--until", "2023-11-01"], "must be after"),
        (["monthly", "--month", "2023-11", "--format", "pdf"], "pdf"),
    ],
)
def test_bad_options_exit_2(ledger_path, monkeypatch, tmp_path, args, message):
    status, _, err = cli(args, monkeypatch, tmp_path, ledger_path)
    assert status == 2 and message in err


def test_a_missing_ledger_is_a_clear_error(monkeypatch, tmp_path):
    status, _, err = cli(
        ["monthly", "--month", "2023-11", "--format", "md"],
        monkeypatch,
        tmp_path,
        tmp_path / "nope.db",
    )
    assert status == 1 and err.startswith("Error: ") and "nope.db" in err


@pytest.mark.parametrize("args", [["--help"], ["monthly", "-h"], ["account", "--help"]])
def test_help(args, monkeypatch, tmp_path, ledger_path):
    status, out, _ = cli(args, monkeypatch, tmp_path, ledger_path)
    assert status == 0 and "Usage:" in out


def test_report_is_listed_by_llem():
    res = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "report" in res.stdout


@pytest.mark.parametrize(
    "blocked, fmt, missing",
    [
        (("pandas", "matplotlib"), "html", "pandas and matplotlib"),
        (("tabulate",), "md", "tabulate"),
        (("jinja2",), "html", "jinja2"),
    ],
)
def test_without_pandas_the_error_names_the_extra(ledger_path, tmp_path, blocked, fmt, missing):
    # A real process in which these modules cannot be imported.
    code = (
        "import sys; "
        + "".join(f"sys.modules[{m!r}] = None; " for m in blocked)
        + "from llem.cli.main import main; sys.argv = ['llem', 'report', 'monthly', "
        f"'--month', '2023-11', '--format', {fmt!r}]; main()"
    )
    env = {
        "LLEM_CONFIG": str(write_yaml(tmp_path / "llem.yaml", ledger_path)),
        "PATH": "/usr/bin:/bin",
    }
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 1
    assert res.stderr.strip() == (f"Error: llem report needs {missing}: pip install 'llem[report]'")


def test_the_node_side_never_imports_pandas_or_matplotlib():
    code = (
        "import sys, llem.cli.main, llem.cli.slurm, llem.cli.sampler, llem.node.export; "
        "print('pandas' in sys.modules, 'matplotlib' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_plots_are_png_with_units(nov):
    pngs = plots.make_plots(nov)
    assert set(pngs) == {
        "daily_energy_co2e_by_account.png",
        "top_users.png",
        "energy_per_gpu_hour.png",
        "waste_by_account.png",
    }
    assert all(p[:4] == b"\x89PNG" for p in pngs.values())
    assert plots.make_plots(nov) == pngs  # reproducible bytes


def _plots_in_a_fresh_process(tmp_path, report, body: str) -> dict:
    """Run ``body`` (which prints one JSON line) in a new Python process holding ``report``
    as ``rep``: a fork must not be tried from the test process, where other tests' threads
    may still run."""
    path = tmp_path / "report.pickle"
    path.write_bytes(pickle.dumps(report))
    head = (
        "import json, os, pickle, sys, threading\n"
        "from llem.report import plots\n"
        "rep = pickle.loads(open(sys.argv[1], 'rb').read())\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", head + textwrap.dedent(body), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_plots_drawn_in_a_forked_child_are_the_same_bytes(nov, tmp_path):
    # a process of one thread (the CLI's): the default forks, and gives the serial bytes
    got = _plots_in_a_fresh_process(
        tmp_path,
        nov,
        """
        serial = plots.make_plots(rep, fork=False)
        forks = []
        real_fork = os.fork

        def counted_fork():
            forks.append(1)
            return real_fork()

        os.fork = counted_fork
        threads = threading.active_count()
        forked = plots.make_plots(rep)
        print(json.dumps({
            "threads": threads,
            "same": forked == serial,
            "order": list(forked) == list(serial),
            "files": len(serial),
            "forks": len(forks),
        }))
        """,
    )
    assert got == {"threads": 1, "same": True, "order": True, "files": 4, "forks": 1}


def test_a_plot_child_that_fails_has_its_plots_drawn_in_the_parent(nov, tmp_path):
    got = _plots_in_a_fresh_process(
        tmp_path,
        nov,
        """
        serial = plots.make_plots(rep, fork=False)
        parent = os.getpid()
        real = plots.daily_by_account

        def fails_in_child(report):
            if os.getpid() != parent:
                raise RuntimeError("child broken")
            return real(report)

        name = "daily_energy_co2e_by_account.png"
        plots.PLOTS = tuple(
            (n, fails_in_child if n == name else d, h) for n, d, h in plots.PLOTS
        )
        print(json.dumps({"same": plots.make_plots(rep, fork=True) == serial}))
        """,
    )
    assert got == {"same": True}


def test_plots_are_not_forked_beside_other_threads(nov, monkeypatch):
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked beside another thread"))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert set(plots.make_plots(nov)) == set(plots.make_plots(nov, fork=False))
    finally:
        stop.set()
        other.join()


def test_the_queries_module_holds_the_sql():
    # The report package itself never writes SQL.
    for name in ("frames.py", "render.py", "plots.py", "__init__.py"):
        text = (Path(frames.__file__).parent / name).read_text()
        assert "SELECT" not in text and "FROM job_" not in text


def test_long_tables_are_cut_in_md_and_html_but_whole_in_csv(nov, monkeypatch):
    monkeypatch.setattr(render, "MAX_ROWS", 2)
    md = render.to_markdown(nov)
    assert "... and 2 more rows (every row is in the csv and json formats)" in md  # 4 users
    assert "and 2 more rows" in render.to_html(nov, {})
    users = pd.read_csv(io.StringIO(render.to_csv_tables(nov)["by_user.csv"]))
    assert len(users) == 4


def test_report_and_llem_acct_agree(ledger_path, monkeypatch, tmp_path):
    """Over a period that holds every job whole, the report's totals per account and in all
    equal llem-acct's totals for the same period (energy and CO2e)."""
    config_file = write_yaml(tmp_path / "llem.yaml", ledger_path)
    from datetime import datetime

    period = frames.range_period(datetime(2023, 10, 1), datetime(2024, 1, 1))
    with q.open_readonly(ledger_path) as ledger:
        rep = build_report(ledger, report_config(ledger_path), period)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llem.cli.acct",
            "--ledger",
            str(ledger_path),
            "-a",
            "-M",
            "all",
            "-S",
            "2023-10-01T00:00",
            "-E",
            "2024-01-01T00:00",
            "--totals",
            "account",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "LLEM_CONFIG": str(config_file)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    acct = {row["Account"]: row for row in json.loads(r.stdout)["totals"]}
    by_account = rep.groups["account"].set_index("account")
    assert set(acct) == set(by_account.index)
    for account, row in acct.items():
        assert by_account.loc[account, "energy_kwh"] == pytest.approx(
            row["ConsumedEnergyRaw"] / 3.6e6, rel=1e-9
        ), account
        assert by_account.loc[account, "co2e_kg"] * 1000 == pytest.approx(row["CO2e"], rel=1e-6), (
            account
        )
    assert rep.totals["energy_kwh"] == pytest.approx(
        sum(row["ConsumedEnergyRaw"] for row in acct.values()) / 3.6e6, rel=1e-9
    )
