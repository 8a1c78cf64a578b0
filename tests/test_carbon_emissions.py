"""Emissions arithmetic: PUE per month, embodied shares, defaults and the carbon object."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem import carbon
from llem.carbon.emissions import HOURS_PER_YEAR, pue_for_month
from llem.config import CarbonConfig, Config, EmbodiedConfig, from_mapping
from llem.errors import ConfigError

H = 3600
KWH_J = 3.6e6


def hour(y, m, d, h):
    return int(datetime(y, m, d, h, tzinfo=timezone.utc).timestamp())


CARBON_KEYS = ["region", "intensity_g_per_kwh", "source", "year", "basis", "pue"]


def test_constant_intensity_and_constant_pue():
    config = Config(carbon=CarbonConfig(region="FR", intensity_g_per_kwh=100.0, pue=1.25))
    result = carbon.emissions(config, {hour(2024, 1, 1, 0): 2 * KWH_J, hour(2024, 1, 1, 1): KWH_J})
    assert result.operational_g == pytest.approx(3 * 1.25 * 100)
    assert result.embodied_g == 0.0
    assert result.co2e_g == result.operational_g
    assert result.facility_energy_kwh == pytest.approx(3.75)
    assert list(result.carbon)[:6] == CARBON_KEYS
    assert result.carbon["region"] == "FR"
    assert result.carbon["source"] == "configured constant (carbon.intensity_g_per_kwh)"
    assert (result.carbon["year"], result.carbon["basis"], result.carbon["pue"]) == (
        "n/a", "unspecified", 1.25,
    )  # fmt: skip


def test_table_region_figure():
    config = Config(carbon=CarbonConfig(region="deu"))
    result = carbon.emissions(config, {hour(2024, 6, 1, 12): 10 * KWH_J})
    assert result.operational_g == pytest.approx(10 * 344.14)
    assert result.carbon == {
        "region": "DE",
        "intensity_g_per_kwh": 344.14,
        "source": "Ember via Our World in Data",
        "year": "2024",
        "basis": "lifecycle",
        "pue": 1.0,
        "licence": "CC BY 4.0",
        "hourly_coverage": None,
        "fallback_hours": 0,
        "region_is_default": False,
        "embodied": None,
        "notes": [],
    }


def test_pue_per_month_applies_by_utc_month_and_carries_forward():
    pue = {"2024-01": 1.5, "2024-03": 1.2}
    assert pue_for_month(pue, "2024-01") == 1.5
    assert pue_for_month(pue, "2024-02") == 1.5  # carried forward
    assert pue_for_month(pue, "2024-03") == 1.2
    assert pue_for_month(pue, "2025-07") == 1.2
    with pytest.raises(ConfigError, match="no value for 2023-12 or any earlier month"):
        pue_for_month(pue, "2023-12")

    config = Config(carbon=CarbonConfig(region="FR", intensity_g_per_kwh=200.0, pue=pue))
    # 23:00 UTC on 29 Feb is February (1.5); 00:00 UTC on 1 March is March (1.2).
    energy = {hour(2024, 2, 29, 23): KWH_J, hour(2024, 3, 1, 0): 3 * KWH_J}
    result = carbon.emissions(config, energy)
    assert result.operational_g == pytest.approx(200 * (1 * 1.5 + 3 * 1.2))
    assert result.facility_energy_kwh == pytest.approx(5.1)
    assert result.carbon["pue"] == pytest.approx(5.1 / 4)
    assert result.carbon["pue_by_month"] == {"2024-02": 1.5, "2024-03": 1.2}


def test_pue_mapping_from_yaml_shaped_config():
    config = from_mapping({"carbon": {"region": "SE", "pue": {"2024-05": 1.1}}})
    result = carbon.emissions(config, {hour(2024, 5, 2, 3): KWH_J})
    assert result.operational_g == pytest.approx(1.1 * carbon.lookup("SE").g_per_kwh)


def test_embodied_arithmetic():
    assert carbon.embodied_g_per_hour(150, 6) == pytest.approx(150_000 / (6 * 8766))
    assert HOURS_PER_YEAR == 8766
    config = Config(
        carbon=CarbonConfig(region="FR", intensity_g_per_kwh=50.0),
        embodied=EmbodiedConfig(enabled=True),
    )
    result = carbon.emissions(config, {hour(2024, 1, 1, 0): KWH_J}, gpu_hours=8.0, node_hours=2.0)
    gpu_g = 8 * 150_000 / (6 * 8766)  # 22.815 g
    node_g = 2 * 2_500_000 / (6 * 8766)  # 95.064 g
    assert result.embodied_g == pytest.approx(gpu_g + node_g)
    assert result.embodied_g == pytest.approx(117.879, abs=1e-3)
    assert result.operational_g == pytest.approx(50.0)
    assert result.co2e_g == pytest.approx(50.0 + gpu_g + node_g)
    detail = result.carbon["embodied"]
    assert detail["gpu_g_per_hour"] == pytest.approx(2.8519, abs=1e-4)
    assert detail["node_g_per_hour"] == pytest.approx(47.5321, abs=1e-4)
    assert "Luccioni et al. 2022" in detail["source"]


def test_embodied_is_off_by_default_and_custom_lifetimes_count():
    config = Config(carbon=CarbonConfig(intensity_g_per_kwh=0.0))
    assert carbon.emissions(config, {}, gpu_hours=100.0).embodied_g == 0.0
    config = Config(
        carbon=CarbonConfig(intensity_g_per_kwh=0.0),
        embodied=EmbodiedConfig(enabled=True, gpu_kgco2e=300.0, gpu_lifetime_years=4.0),
    )
    result = carbon.emissions(config, {}, gpu_hours=1.0)
    assert result.embodied_g == pytest.approx(300_000 / (4 * 8766))


def test_no_region_uses_the_world_default_and_says_so():
    result = carbon.emissions(Config(), {hour(2024, 1, 1, 0): KWH_J})
    world = carbon.lookup("WORLD")
    assert result.operational_g == pytest.approx(world.g_per_kwh)
    assert result.carbon["region"] == "WORLD"
    assert result.carbon["region_is_default"] is True
    assert "default: no carbon.region configured" in result.carbon["source"]
    assert result.carbon["year"] == world.year == "2021-2023"
    assert result.carbon["notes"]


def test_no_energy_still_names_the_factors():
    result = carbon.emissions(Config(carbon=CarbonConfig(region="NO", pue=1.3)), {})
    assert result.co2e_g == 0.0
    assert result.carbon["intensity_g_per_kwh"] == carbon.lookup("NO").g_per_kwh
    assert result.carbon["pue"] == 1.3


def test_unknown_region_raises_config_error():
    with pytest.raises(ConfigError, match="unknown carbon region 'XYZZY'"):
        carbon.resolve(Config(carbon=CarbonConfig(region="XYZZY")))


def test_a_constant_accepts_any_region_label():
    model = carbon.resolve(Config(carbon=CarbonConfig(region="site-7", intensity_g_per_kwh=42.0)))
    assert (model.region, model.for_hour(0).g_per_kwh) == ("site-7", 42.0)


def test_bad_basis_and_bad_keys():
    with pytest.raises(ConfigError, match="carbon.intensity_basis"):
        carbon.resolve(Config(carbon=CarbonConfig(intensity_basis="marginal")))
    config = Config(carbon=CarbonConfig(region="FR"))
    with pytest.raises(ValueError, match="not the start of a UTC hour"):
        carbon.emissions(config, {hour(2024, 1, 1, 0) + 60: 1.0})
    with pytest.raises(ValueError):
        carbon.emissions(config, {hour(2024, 1, 1, 0): -1.0})


def test_for_hour_floors_to_the_clock_hour_and_takes_aware_datetimes():
    model = carbon.resolve(Config(carbon=CarbonConfig(region="FR")))
    when = datetime(2024, 3, 31, 1, 59, tzinfo=timezone.utc)
    assert model.for_hour(when) == model.for_hour(hour(2024, 3, 31, 1))
    with pytest.raises(ValueError, match="naive"):
        model.for_hour(datetime(2024, 3, 31, 1))


@settings(max_examples=60, deadline=None)
@given(
    start_s=st.integers(min_value=1_600_000_000, max_value=1_800_000_000),
    duration_s=st.integers(min_value=1, max_value=3 * 24 * 3600),
    energy_j=st.floats(min_value=0, max_value=1e10, allow_nan=False),
    g_per_kwh=st.floats(min_value=0, max_value=1500, allow_nan=False),
    pue=st.floats(min_value=1.0, max_value=3.0, allow_nan=False),
)
def test_emissions_are_energy_times_pue_times_a_constant_intensity(
    start_s, duration_s, energy_j, g_per_kwh, pue
):
    energy = carbon.energy_by_hour(start_s, start_s + duration_s, energy_j)
    assert all(h % H == 0 for h in energy)
    assert sum(energy.values()) == pytest.approx(energy_j, rel=1e-9, abs=1e-6)
    config = Config(carbon=CarbonConfig(intensity_g_per_kwh=g_per_kwh, pue=pue))
    result = carbon.emissions(config, energy)
    assert result.operational_g == pytest.approx(
        energy_j / KWH_J * pue * g_per_kwh, rel=1e-9, abs=1e-6
    )
    json.dumps(result.carbon)  # the carbon object is plain JSON
