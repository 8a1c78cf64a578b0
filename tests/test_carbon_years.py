"""Carbon intensity by year (issue 13, part 4): each hour of energy is priced with its own
year's figure, or the nearest earlier year's (flagged in the year label)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from llem import carbon
from llem.acct.co2e import resolve_carbon
from llem.carbon import tables
from llem.config import from_mapping
from llem.units import J_PER_KWH


def hour(year: int, month: int = 6) -> int:
    return int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())


def de_config(**carbon_keys):
    return from_mapping({"carbon": {"region": "DE", "pue": 1.0, **carbon_keys}})


def g(year: int) -> float:
    return tables.lookup("DE", year).g_per_kwh


def test_the_shipped_years_differ():
    years = tables.rows_by_year("DE")
    assert {2021, 2023, 2024} <= set(years)
    assert len({r.g_per_kwh for r in years.values()}) == len(years)


@pytest.mark.parametrize(
    ("year", "used", "label"),
    [
        (2021, 2021, "2021"),
        (2022, 2021, "2021 for 2022"),
        (2023, 2023, "2023"),
        (2024, 2024, "2024"),
        (2026, 2024, "2024 for 2026"),
        (2019, 2021, "2021 for 2019"),
    ],
)
def test_each_hour_gets_its_years_figure_or_the_nearest_earlier(year, used, label):
    model = carbon.resolve(de_config())
    hi = model.for_hour(hour(year))
    assert (hi.g_per_kwh, hi.year) == (g(used), label)


def test_emissions_sum_each_years_energy_at_that_years_figure():
    by_hour = {hour(2021): J_PER_KWH, hour(2024): 2 * J_PER_KWH}
    em = carbon.emissions(de_config(), by_hour)
    assert em.operational_g == pytest.approx(g(2021) + 2 * g(2024))
    assert em.carbon["year"] == "2024; 2021"  # most energy first
    assert em.grams_by_year == pytest.approx({"2021": g(2021), "2024": 2 * g(2024)})
    assert not carbon.factors(de_config()).constant  # a row needs its hours


def test_a_constant_still_is_one_figure_for_every_year():
    f = carbon.factors(de_config(intensity_g_per_kwh=100))
    assert f.constant
    assert f.model.for_hour(hour(2021)).g_per_kwh == f.model.for_hour(hour(2026)).g_per_kwh


def test_acct_footer_names_the_years_the_rows_were_priced_with():
    c = resolve_carbon(de_config())
    c.grams(J_PER_KWH, 0, 0, {hour(2023): J_PER_KWH})
    c.grams(3 * J_PER_KWH, 0, 0, {hour(2026): 3 * J_PER_KWH})
    assert "year 2024 for 2026; 2023;" in c.footer()


def test_llem_acct_and_statement_price_each_year_and_name_the_years(tmp_path, monkeypatch):
    """Through the real ledger writer and llem-acct: a 2023 job and a 2024 job in DE."""
    import json

    from tests.helpers import make_ledger
    from tests.helpers.acct import acct_run, job

    t23, t24 = hour(2023, 3), hour(2024, 3)
    ledger = tmp_path / "ledger.db"
    make_ledger.write_jobs(
        ledger,
        [
            job(
                "7001", "alice", "physics", "cpu", t23, t23 + 3600, ["c0001"], cpu_w=900, dram_w=100
            ),
            job(
                "7002", "alice", "physics", "cpu", t24, t24 + 3600, ["c0001"], cpu_w=900, dram_w=100
            ),
        ],
    )
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nledger: {ledger}\ncarbon:\n  region: DE\n  pue: 1.0\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    window = ("-a", "-S", "2023-01-01", "-E", "2025-01-01")
    status, out, err = acct_run(*window, "--json", "-o", "JobID,ConsumedEnergyRaw,CO2e")
    assert status == 0, err
    doc = json.loads(out)
    co2e = {j["JobID"]: j["CO2e"] for j in doc["jobs"]}
    assert co2e["7001"] == pytest.approx(g(2023), rel=1e-3)  # 1 kWh each
    assert co2e["7002"] == pytest.approx(g(2024), rel=1e-3)
    assert doc["carbon"]["year"] in ("2023; 2024", "2024; 2023")
    assert doc["carbon"]["intensity_by_year"] == {"2023": g(2023), "2024": g(2024)}
    status, out, err = acct_run(*window)
    assert status == 0, err
    assert f"grid intensity {g(2023):g} (2023), {g(2024):g} (2024) gCO2e/kWh" in out
    status, out, err = acct_run(*window, "--statement")
    assert status == 0, err
    assert "data year 2023; 2024;" in out or "data year 2024; 2023;" in out


def test_totals_price_runs_of_one_year_from_their_total_and_new_years_runs_by_hour(
    tmp_path, monkeypatch
):
    """``--totals`` with figures by year: a run inside one UTC year counts with its total
    at its year's figure (summed in SQL by group and year), a run over a new year with its
    energy by hour; the CO2e equals a direct sum over the ledger's hours, and the sum of the
    job rows."""
    import json
    import sqlite3

    from tests.helpers import make_ledger
    from tests.helpers.acct import acct_run, job

    t23, t24 = hour(2023, 3), hour(2024, 3)
    eve = int(datetime(2023, 12, 31, 22, tzinfo=timezone.utc).timestamp())
    ledger = tmp_path / "ledger.db"
    make_ledger.write_jobs(
        ledger,
        [
            job("7001", "alice", "physics", "cpu", t23, t23 + 3600, ["c0001"], cpu_w=900),
            job("7002", "alice", "physics", "cpu", t24, t24 + 7200, ["c0001"], cpu_w=500),
            job("7003", "bob", "physics", "cpu", eve, eve + 4 * 3600, ["c0002"], cpu_w=900),
            job("7004", "bob", "chem", "cpu", t24, t24 + 3600, ["c0003"], cpu_w=300),
        ],
    )
    db = sqlite3.connect(ledger)
    hours = db.execute(
        "SELECT r.user, e.hour_s, SUM(e.energy_uj) FROM job_runs r JOIN job_nodes jn ON "
        "jn.cluster = r.cluster AND jn.job_id = r.job_id AND jn.run_start_ns = r.run_start_ns "
        "JOIN job_energy e ON e.job_node_id = jn.id GROUP BY 1, 2"
    ).fetchall()
    db.close()
    by_user: dict[str, dict[int, float]] = {}
    for user, hour_s, uj in hours:
        by_user.setdefault(user, {})[hour_s] = uj / 1e6
    assert len({h for h in by_user["bob"] if h < hour(2024, 1)}) == 2  # the new year's run
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nledger: {ledger}\ncarbon:\n  region: DE\n  pue: 1.0\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    window = ("-a", "-S", "2023-01-01", "-E", "2025-01-01")
    status, out, err = acct_run(*window, "--totals", "user", "--json", "-o", "User,CO2e")
    assert status == 0, err
    totals = {t["User"]: t["CO2e"] for t in json.loads(out)["totals"]}
    config = de_config()
    for user, by_hour in by_user.items():
        assert totals[user] == pytest.approx(carbon.emissions(config, by_hour).co2e_g, abs=1e-3)
    status, out, err = acct_run(*window, "--json", "-o", "JobID,User,CO2e")
    assert status == 0, err
    jobs = json.loads(out)["jobs"]
    for user in by_user:
        assert totals[user] == pytest.approx(sum(j["CO2e"] for j in jobs if j["User"] == user))
    # the new year's run priced with one year's figure would be wrong: the test would see it
    whole = {hour(2023, 12): sum(by_user["bob"].values())}
    assert abs(totals["bob"] - carbon.emissions(config, whole).co2e_g) > 1
