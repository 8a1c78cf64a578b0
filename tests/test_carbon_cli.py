"""``llem carbon``: exact output, JSON contract, help, and errors through the main entry."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llem.carbon import tables
from llem.cli.carbon import carbon as carbon_group
from llem.cli.main import cli, run

DE_TEXT = """\
DE (Germany): 344.14 gCO2e/kWh
  year:    2024
  years:   2021, 2023, 2024
  basis:   lifecycle
  source:  Ember via Our World in Data
  licence: CC BY 4.0
"""
FR_JSON = (
    '{"region": "FR", "intensity_g_per_kwh": 44.179, "source": "Ember via Our World in Data", '
    '"year": "2024", "basis": "lifecycle", "licence": "CC BY 4.0", '
    '"name": "France", "kind": "country", "aliases": ["FRA"], "requested_year": null, '
    '"year_note": null, "years": [2021, 2023, 2024]}\n'
)


def invoke(*args):
    return CliRunner().invoke(cli, ["carbon", *args], catch_exceptions=False)


def test_intensity_text_output_is_exact():
    result = invoke("intensity", "de")
    assert result.exit_code == 0
    assert result.output == DE_TEXT


def test_intensity_json_output_is_exact():
    result = invoke("intensity", "FRA", "--json")
    assert result.exit_code == 0
    assert result.output == FR_JSON
    # The leading fields are those of the carbon object of 'llem wrap --json'.
    assert list(json.loads(result.output))[:5] == [
        "region", "intensity_g_per_kwh", "source", "year", "basis",
    ]  # fmt: skip


def test_intensity_of_a_us_state_and_a_cloud_region_with_year():
    result = invoke("intensity", "us-tx", "--year", "2023")
    assert result.output.splitlines()[0] == "US-TX (Texas): 349.801 gCO2e/kWh"
    assert "  basis:   direct" in result.output
    result = invoke("intensity", "gcp:us-central1", "--json")
    data = json.loads(result.output)
    assert (data["intensity_g_per_kwh"], data["year"]) == (430.0, "2023")


def test_regions_lists_every_shipped_row_with_sources():
    result = invoke("regions")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "REGION                        gCO2e/kWh  YEAR       BASIS      NAME"
    assert "DE                               344.14  2024       lifecycle  Germany" in lines
    assert lines.index("") == 1 + 725  # header, 725 rows, blank line
    assert "  555 country row(s): Ember via Our World in Data; licence: CC BY 4.0" in lines
    assert any(
        line.startswith("   27 eGRID subregion row(s): US EPA eGRID2023 subregion")
        for line in lines
    )
    assert not any("not shipped" in line for line in lines)


def test_regions_json():
    data = json.loads(invoke("regions", "--json").output)
    # 213 countries in 555 country-years, 51 states in 2 eGRID editions, 27 eGRID
    # subregions, 40 GCP, world
    assert len(data) == 725
    assert {d["basis"] for d in data} == {"lifecycle", "direct"}


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("sub", [[], ["intensity"], ["regions"]])
def test_help_everywhere(sub, flag):
    result = invoke(*sub, flag)
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")


def test_every_command_has_help_text():
    for name, command in carbon_group.commands.items():
        assert command.help and len(command.help) > 20, name


def test_unknown_region_is_error_exit_1(capsys):
    assert run(cli, ["carbon", "intensity", "Germny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: unknown carbon region 'Germny'; close matches: DE")


def test_a_year_before_every_shipped_one_is_reported_not_available_exit_1(capsys):
    """Years the sources llem could reach do not carry are not invented: the answer says
    which years are shipped, why no earlier one is, and how energy of that year is priced."""
    years = sorted(tables.rows_by_year("DE"))
    assert run(cli, ["carbon", "intensity", "DE", "--year", "2019"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "Error: no figure of DE for 2019 is available: the shipped sources carry DE for "
        f"{', '.join(map(str, years))} only, and earlier years could not be sourced "
        "(share/carbon/SOURCES.md; a site with the full Our World in Data export can add them "
        f"with build_tables.py). Energy used in 2019 is priced with the {years[0]} figure, "
        f"shown as '{years[0]} for 2019'.\n"
    )
    # The pricing says the same.
    from llem import carbon
    from llem.config import CarbonConfig, Config

    model = carbon.resolve(Config(carbon=CarbonConfig(region="DE")))
    assert model.for_hour(1_546_300_800).year == f"{years[0]} for 2019"  # 2019-01-01


def test_every_shipped_year_answers(capsys):
    for region in ("DE", "US-CA", "FR"):
        for year, row in tables.rows_by_year(region).items():
            assert run(cli, ["carbon", "intensity", region, "--year", str(year)]) == 0
            out = capsys.readouterr().out
            assert f"  year:    {year}\n" in out and f"{row.g_per_kwh:g} gCO2e/kWh" in out


def test_missing_argument_is_usage_error_exit_2(capsys):
    assert run(cli, ["carbon", "intensity"]) == 2


def test_every_command_is_documented():
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "carbon.md").read_text("utf-8")
    for name in carbon_group.commands:
        assert f"llem carbon {name}" in docs, name


def test_installed_entry_point_prints_error_and_exits_1():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "carbon", "intensity", "atlantis"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: unknown carbon region 'atlantis'")
    assert "Traceback" not in proc.stderr


def test_every_shipped_year_answers_and_a_missing_one_takes_the_nearest_earlier():
    from llem.carbon import tables

    for row in tables.load_tables():
        result = invoke("intensity", row.region, "--year", row.year, "--json")
        assert result.exit_code == 0, (row.region, row.year)
        data = json.loads(result.output)
        assert (data["year"], data["intensity_g_per_kwh"]) == (row.year, row.g_per_kwh)
    data = json.loads(invoke("intensity", "DE", "--year", "2022", "--json").output)
    assert (data["year"], data["intensity_g_per_kwh"]) == ("2021", 352.423)
    assert "nearest earlier year 2021" in data["year_note"]
    text = invoke("intensity", "DE", "--year", "2022").output
    assert "  year:    2021 (2022 not shipped: nearest earlier year 2021" in text
