"""``llem metrics``: cluster metrics from a ledger built by the real aggregator from slices
exported by real node stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llem.cluster.aggregate import aggregate_once
from llem.cluster.ledger import Ledger
from llem.cluster.metrics import collect
from llem.cluster.pass_status import read_pass_status, status_path
from tests.helpers.metrics import NOW, config, parse
from tests.helpers.nodes import job_slices, spool_slice
from tests.promstack import promtool_check_metrics


def write_yaml(tmp_path, cfg) -> Path:
    path = tmp_path / "llem.yaml"
    path.write_text(
        f"cluster: {cfg.cluster}\nspool_dir: {cfg.spool_dir}\nledger: {cfg.ledger}\n"
        "carbon:\n  region: DE\n  intensity_g_per_kwh: 400\n  pue: 1.5\n"
    )
    return path


def test_energy_and_co2e_per_account_match_the_ledger(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    for data in job_slices(tmp_path, "200", nodes=("n4",), nodelist="n4", user="bob"):
        data["job"]["account"] = "chem"
        spool_slice(cfg, data)
    assert aggregate_once(cfg, now_ns=NOW).merged == 4
    got = parse(collect(cfg))
    with Ledger(cfg.ledger, readonly=True) as ledger:
        runs = {r["job_id"]: r for r in ledger.job_runs()}
    physics = runs["100"]["energy_uj"] / 1e6
    chem = runs["200"]["energy_uj"] / 1e6
    assert physics > 0 and chem > 0
    key = (
        "llem_account_energy_joules_total",
        (("account", "physics"), ("cluster", "c1"), ("partition", "gpu"), ("source", "measured")),
    )
    assert got[key] == physics
    chem_key = (
        "llem_account_energy_joules_total",
        (("account", "chem"), ("cluster", "c1"), ("partition", "gpu"), ("source", "measured")),
    )
    assert got[chem_key] == chem
    co2e = got[
        (
            "llem_account_co2e_grams_total",
            (("account", "physics"), ("cluster", "c1"), ("partition", "gpu")),
        )
    ]
    assert abs(co2e - physics / 3.6e6 * 1.5 * 400) < 1e-6
    info = [k for k in got if k[0] == "llem_carbon_info"]
    assert info and dict(info[0][1])["pue"] == "1.5"
    assert "configured constant" in dict(info[0][1])["source"]
    assert got[("llem_ledger_jobs", (("cluster", "c1"), ("status", "complete")))] == 2


def test_aggregator_health_and_spool_backlog(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    aggregate_once(cfg, now_ns=NOW)  # nothing new: merged stays, passes grow
    status = read_pass_status(cfg)
    assert (status.passes_total, status.merged_total, status.last_merged) == (2, 3, 0)
    bad = Path(cfg.spool_dir) / "job-c1-999-n1-1.json"
    bad.write_bytes(b"{not json")
    os.chmod(bad, 0o640)
    aggregate_once(cfg, now_ns=NOW)
    late = spool_slice(cfg, job_slices(tmp_path, "300", nodes=("n1",))[0])
    os.utime(late, (1_700_000_000, 1_700_000_000))
    got = parse(collect(cfg))
    assert got[("llem_aggregate_passes_total", ())] == 3
    assert got[("llem_aggregate_slices_merged_total", ())] == 3
    assert got[("llem_aggregate_slices_quarantined_total", ())] == 1
    assert got[("llem_spool_slices", ())] == 1
    assert got[("llem_spool_oldest_slice_timestamp_seconds", ())] == 1_700_000_000
    assert 0 < got[("llem_aggregate_last_pass_duration_seconds", ())] < 60
    assert got[("llem_aggregate_last_pass_timestamp_seconds", ())] == status_path_time(cfg)


def status_path_time(cfg) -> float:
    return read_pass_status(cfg).last_end_s


def test_no_pass_recorded_and_empty_spool_leave_those_series_out(tmp_path):
    cfg = config(tmp_path)
    Path(cfg.spool_dir).mkdir(mode=0o700)
    Ledger(cfg.ledger).close()
    text = collect(cfg)
    assert "llem_aggregate_last_pass_timestamp_seconds" not in text
    assert "llem_spool_oldest_slice_timestamp_seconds " not in text
    assert parse(text)[("llem_spool_slices", ())] == 0
    assert not status_path(cfg).exists()


def _llem(args, tmp_path, cfg_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env["LLEM_CONFIG"] = str(cfg_path)
    return subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "metrics", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_cli_textfile_passes_promtool(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    cfg_path = write_yaml(tmp_path, cfg)
    out = tmp_path / "textfile"
    out.mkdir(mode=0o755)
    r = _llem(["--textfile", str(out / "llem_cluster.prom")], tmp_path, cfg_path)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    text = (out / "llem_cluster.prom").read_text()
    assert text == collect(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["llem_cluster.prom"]
    lint = promtool_check_metrics(text)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint
    r = _llem([], tmp_path, cfg_path)
    assert r.returncode == 0 and r.stdout == text


def test_cli_errors_and_help_without_side_effects(tmp_path):
    cfg = config(tmp_path)
    cfg_path = write_yaml(tmp_path, cfg)
    before = sorted(p.name for p in tmp_path.iterdir())
    for flag in ("-h", "--help"):
        r = _llem([flag], tmp_path, cfg_path)
        assert r.returncode == 0 and "Usage: llem metrics" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ledger, no spool made
    r = _llem([], tmp_path, cfg_path)
    assert r.returncode == 1 and r.stderr.startswith("Error: no ledger at"), r.stderr
    Ledger(cfg.ledger).close()
    r = _llem(["--textfile", str(tmp_path / "x.txt")], tmp_path, cfg_path)
    assert r.returncode == 1 and "ending in .prom" in r.stderr
    os.chmod(tmp_path, 0o777)
    try:
        r = _llem(["--textfile", str(tmp_path / "x.prom")], tmp_path, cfg_path)
    finally:
        os.chmod(tmp_path, 0o755)
    assert r.returncode == 1 and "writable by group or others" in r.stderr
    assert not (tmp_path / "x.prom").exists()
