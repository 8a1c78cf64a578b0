"""Reports never add a whole-node meter (psys) to the parts it overlaps."""

import json

import pytest

from llem.report.frames import reconciliation

UJ_PER_KWH = 3_600_000_000_000


def row(node, component, measured_kwh, attributed_kwh, remainder_kwh, idle_unallocated_kwh=0.0):
    return (
        node,
        component,
        "measured",
        int(measured_kwh * UJ_PER_KWH),
        int(attributed_kwh * UJ_PER_KWH),
        int(remainder_kwh * UJ_PER_KWH),
        10,
        0,
        3600 * 10**9,
        1,
        1,
        int(idle_unallocated_kwh * UJ_PER_KWH),
        0,
    )


def test_the_node_meter_is_shown_but_not_added():
    rows = [
        row("n1", "cpu", 2.0, 1.5, 0.5, 0.25),
        row("n1", "gpu", 4.0, 4.0, 0.0),
        row("n1", "platform", 1.0, 0.5, 0.5, 0.5),
        row("n1", "psys", 7.0, 0.0, 7.0),
    ]
    rec = reconciliation(rows, ["n1"], 6.0)
    assert rec["measured_kwh"] == 7.0  # the meter's energy, once: parts + platform
    assert rec["attributed_kwh"] == 6.0
    assert rec["remainder_kwh"] == 1.0
    assert rec["idle_unallocated_kwh"] == 0.75 and rec["unallocated_kwh"] == 0.0
    components = set(rec["by_component"]["component"])
    assert components == {"cpu", "gpu", "platform", "psys"}


# -- the platform share, end to end from node stores with a meter ------------------------------


PLATFORM_JOBS = (
    ("301", "n1", "2023-11-02 08:00", 3600, "alice", "physics", 80.0),
    ("302", "n2", "2023-11-03 08:00", 3600, "bob", "physics", 80.0),
    ("303", "n3", "2023-11-04 08:00", 3600, "carol", "chemistry", 0.0),
)


@pytest.fixture(scope="module")
def meter_ledger(tmp_path_factory):
    from tests.helpers.report_data import Job, build_ledger

    jobs = [Job(*j[:6], platform_w=j[6]) for j in PLATFORM_JOBS]
    return build_ledger(tmp_path_factory.mktemp("meters"), jobs)


def test_reports_show_the_platform_share_of_nodes_with_a_meter(meter_ledger):
    """Two jobs on nodes with an ACPI power meter (80 W beyond the parts: the sampler's
    platform residual, charged by allocation), one on a node without a meter: the report
    gives the platform's kWh and share, per account too, and says how many jobs carry it."""
    import re

    from llem.cluster import report_queries as q
    from llem.report import build_report, frames, render
    from tests.helpers.report_data import report_config

    ledger = meter_ledger
    with q.open_readonly(ledger) as db:
        report = build_report(db, report_config(ledger), frames.month_period("2023-11"))
        (platform_uj,) = db.query(
            "SELECT SUM(other_energy_uj) FROM job_runs"  # the ledger's sum, not the report's
        )[0]
        (total_uj,) = db.query("SELECT SUM(energy_uj) FROM job_runs")[0]
    t = report.totals
    assert platform_uj > 0
    assert t["other_kwh"] == pytest.approx(platform_uj / UJ_PER_KWH)
    assert t["platform_share"] == pytest.approx(platform_uj / total_uj)
    assert t["platform_jobs"] == 2
    by_account = report.groups["account"].set_index("account")
    assert (
        by_account.loc["chemistry", "platform_share"]
        != by_account.loc["chemistry", "platform_share"]
    )  # NaN: no meter where chemistry ran
    assert by_account.loc["physics", "platform_share"] > 0
    note = next(n for n in report.notes if "is the platform" in n)
    assert "2 of 3 job run(s) ran on nodes with a meter" in note
    md = render.to_markdown(report)
    share = re.search(r"Platform share of energy \(nodes with a meter\)\s*\|\s*([\d.]+) %", md)
    assert share and float(share.group(1)) == pytest.approx(t["platform_share"] * 100, abs=0.1)
    assert "platform: node meter minus the parts (kWh)" in md
    assert render.to_dict(report)["totals"]["platform_share"] == pytest.approx(t["platform_share"])


def test_llem_acct_shows_the_platform_share(meter_ledger, tmp_path, monkeypatch):
    from llem.cluster import report_queries as q
    from tests.helpers.acct import acct_run

    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nledger: {meter_ledger}\ncarbon:\n  region: DE\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    with q.open_readonly(meter_ledger) as db:
        expected = {
            job: other / energy if other else None
            for job, other, energy in db.query(
                "SELECT job_id, other_energy_uj, energy_uj FROM job_runs"
            )
        }
    status, out, err = acct_run(
        "-a", "-S", "2023-11-01", "-E", "2023-12-01", "-X", "--json",
        "-o", "JobID,PlatformEnergy,PlatformShare",
    )  # fmt: skip
    assert status == 0, err
    got = {j["JobID"]: j["PlatformShare"] for j in json.loads(out)["jobs"]}
    assert got.keys() == expected.keys() == {"301", "302", "303"}
    assert got["303"] is None  # no node meter: blank, not 0 %
    for job in ("301", "302"):
        assert got[job] == pytest.approx(expected[job], abs=1e-4) and got[job] > 0
    status, out, _ = acct_run(
        "-a", "-S", "2023-11-01", "-E", "2023-12-01", "--totals", "account", "-P",
        "-o", "Account,PlatformShare",
    )  # fmt: skip
    rows = dict(line.split("|") for line in out.splitlines()[1:])
    assert rows["chemistry"] == ""
    physics = (sum(expected[j] for j in ("301", "302")) / 2) * 100  # equal energies
    assert float(rows["physics"].rstrip("%")) == pytest.approx(physics, abs=0.15)
