"""The citable statement: its numbers, units and provenance, and the citation text."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

import llem
from llem import carbon
from llem.carbon.statement import (
    CITATION_AUTHOR,
    CITATION_LICENSE,
    CITATION_TITLE,
    CITATION_YEAR,
    format_co2e,
    format_kwh,
)
from llem.config import CarbonConfig, Config, EmbodiedConfig

KWH_J = 3.6e6
T0 = int(datetime(2024, 5, 1, tzinfo=timezone.utc).timestamp())


def _result():
    config = Config(
        carbon=CarbonConfig(region="DE", pue=1.2), embodied=EmbodiedConfig(enabled=True)
    )
    energy = {T0: 6 * KWH_J, T0 + 3600: 6.5 * KWH_J}  # 12.5 kWh
    return carbon.emissions(config, energy, gpu_hours=8.0, node_hours=2.0)


def _statement(result, **kw):
    args = {
        "energy_j_by_component": {"GPU": 10 * KWH_J, "CPU": 2 * KWH_J, "DRAM": 0.5 * KWH_J},
        "measured_j": 11.5 * KWH_J,
        "estimated_j": 1 * KWH_J,
        "hardware": "4 x NVIDIA A100-SXM4-80GB, 2 x AMD EPYC 7763",
        "co2e_g": result.co2e_g,
        "operational_g": result.operational_g,
        "embodied_g": result.embodied_g,
        "carbon": result.carbon,
    }
    args.update(kw)
    return carbon.statement(**args)


def test_statement_numbers():
    result = _result()
    # 12.5 kWh x 1.2 x 344.14 g/kWh = 5162.1 g
    assert result.operational_g == pytest.approx(5162.1)
    text = _statement(result)
    assert text.startswith(
        "The computations used 12.500 kWh (45.00 MJ) of electricity at the hardware "
        "(GPU 10.000 kWh, CPU 2.000 kWh, DRAM 0.500 kWh) on 4 x NVIDIA A100-SXM4-80GB, "
        f"2 x AMD EPYC 7763, as accounted by llem {llem.__version__}. "
    )
    assert "92.0 % was measured with hardware energy counters (NVML, RAPL)" in text
    assert "8.0 % was estimated from a power model" in text
    assert (
        "With a power usage effectiveness (PUE) of 1.20 and a grid carbon intensity of "
        "344.1 gCO2e/kWh (Ember via Our World in Data; data year 2024; "
        "lifecycle basis; region DE), this corresponds to 5.162 kgCO2e of operational emissions, "
        "plus 117.9 gCO2e of embodied (manufacturing) emissions (2.85 gCO2e per GPU-hour, "
        "47.53 gCO2e per node-hour), 5.280 kgCO2e in total."
    ) in text
    assert text.endswith("Energy and emissions were accounted with llem (llem developers, 2026).")


def test_statement_flags_fallback_and_default_region():
    result = carbon.emissions(Config(), {T0: 0.25 * KWH_J})
    carbon_fields = dict(result.carbon, fallback_hours=3)
    text = _statement(
        result,
        energy_j_by_component={"GPU": 0.25 * KWH_J},
        measured_j=0.25 * KWH_J,
        estimated_j=0.0,
        carbon=carbon_fields,
    )
    assert "0.250 kWh (0.90 MJ)" in text
    assert "100.0 % was measured" in text
    assert f"this corresponds to {result.operational_g:.1f} gCO2e of operational" in text
    assert "For 3 hour(s) not covered by the hourly intensity series" in text
    assert "No grid region was configured, so a world-average intensity was used" in text
    assert "embodied" not in text


def test_measured_and_estimated_must_add_up():
    with pytest.raises(ValueError, match="measured"):
        _statement(_result(), measured_j=5 * KWH_J, estimated_j=1 * KWH_J)


def test_formatters():
    assert format_co2e(999.94) == "999.9 gCO2e"
    assert format_co2e(1234.5) == "1.234 kgCO2e"
    assert format_kwh(1.0) == "1.000 kWh (3.60 MJ)"


def test_how_to_cite_matches_citation_cff():
    cff = yaml.safe_load((Path(__file__).parents[1] / "CITATION.cff").read_text("utf-8"))
    pref = cff["preferred-citation"]
    assert cff["title"] == pref["title"] == CITATION_TITLE
    assert cff["version"] == pref["version"] == llem.__version__
    assert cff["authors"] == pref["authors"] == [{"name": CITATION_AUTHOR}]
    assert pref["year"] == CITATION_YEAR
    assert cff["license"] == CITATION_LICENSE
    text = carbon.how_to_cite()
    assert f"title   = {{{{{cff['title']}}}}}" in text
    assert f"version = {{{cff['version']}}}" in text
    assert f"year    = {{{pref['year']}}}" in text
    assert text.startswith(
        f"Please cite llem as: llem developers (2026). {cff['title']}, version {cff['version']}."
    )
