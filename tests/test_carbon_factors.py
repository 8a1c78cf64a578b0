"""One computation of CO2e: the factors of :func:`llem.carbon.factors` are what
``carbon.emissions`` (``llem wrap``, ``llem-acct --statement``), ``llem-acct``'s rows and
``llem report`` (a factor per microjoule, summed in SQL) apply; they must agree."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from llem import carbon
from llem.acct import resolve_carbon
from llem.config import from_mapping
from llem.units import UJ_PER_J

KWH_J = 3.6e6


def hour(y, m, d, h):
    return int(datetime(y, m, d, h, tzinfo=timezone.utc).timestamp())


# Hours on both sides of a PUE month change, inside and outside the hourly series.
ENERGY_J = {
    hour(2026, 1, 31, 22): 2.5 * KWH_J,
    hour(2026, 1, 31, 23): 0.7 * KWH_J,
    hour(2026, 2, 1, 0): 1.1 * KWH_J,
    hour(2026, 2, 1, 5): 4.0 * KWH_J,
}
SERIES = {
    hour(2026, 1, 31, 22): 120.0,
    hour(2026, 1, 31, 23): 480.0,
    hour(2026, 2, 1, 0): 260.0,
}  # 2026-02-01T05 is not in it: the annual figure
PUE = {"2026-01": 1.4, "2026-02": 1.15}


def _hourly_config(tmp_path, embodied=True):
    series = tmp_path / "hourly.csv"
    series.write_text(
        "timestamp,g_co2e_per_kwh\n"
        + "".join(
            f"{datetime.fromtimestamp(h, timezone.utc):%Y-%m-%dT%H:%M:%SZ},{g}\n"
            for h, g in SERIES.items()
        )
    )
    return from_mapping(
        {
            "carbon": {"region": "DE", "intensity_file": str(series), "pue": PUE},
            "embodied": {"enabled": embodied},
        }
    )


def test_report_factor_per_microjoule_is_intensity_times_pue_of_that_hour(tmp_path):
    config = _hourly_config(tmp_path)
    f = carbon.factors(config)
    annual = carbon.lookup("DE").g_per_kwh
    for h, pue in ((hour(2026, 1, 31, 22), 1.4), (hour(2026, 2, 1, 0), 1.15)):
        assert f.g_per_uj(h) == pytest.approx(SERIES[h] * pue / 3.6e12, rel=1e-15)
    assert f.g_per_uj(hour(2026, 2, 1, 5)) == pytest.approx(annual * 1.15 / 3.6e12, rel=1e-15)
    # summed the way the report's SQL sums it, it is emissions()'s operational figure
    summed = sum(j * UJ_PER_J * f.g_per_uj(h) for h, j in ENERGY_J.items())
    assert summed == pytest.approx(carbon.emissions(config, ENERGY_J).operational_g, rel=1e-12)
    want = 2.5 * 1.4 * 120 + 0.7 * 1.4 * 480 + 1.1 * 1.15 * 260 + 4.0 * 1.15 * annual
    assert summed == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("shape", ["hourly", "pue-by-month", "year-tables", "constant"])
def test_factors_of_many_hours_at_once_equal_hour_by_hour(tmp_path, shape):
    """The report's per-month shortcut (g_per_uj_by_hour) gives each hour's own factor:
    across month and year changes, inside and outside the hourly series, in any order."""
    config = {
        "hourly": _hourly_config(tmp_path),
        "pue-by-month": from_mapping({"carbon": {"region": "FR", "pue": PUE}}),
        "year-tables": from_mapping({"carbon": {"region": "DE", "pue": 1.3}}),
        "constant": from_mapping({"carbon": {"intensity_g_per_kwh": 312.5, "pue": 1.2}}),
    }[shape]
    f = carbon.factors(config)
    first = hour(2026, 1, 1, 0) if isinstance(f.pue, dict) else hour(2019, 12, 31, 20)
    hours = list(range(first, hour(2026, 3, 2, 3), 3600))
    one_by_one = {h: f.g_per_uj(h) for h in hours}
    assert f.g_per_uj_by_hour(hours) == one_by_one
    assert f.g_per_uj_by_hour(reversed(hours)) == one_by_one
    assert f.g_per_uj_by_hour(hours[::7] + hours[3::5]) == {
        h: one_by_one[h] for h in hours[::7] + hours[3::5]
    }
    assert len(set(one_by_one.values())) > (1 if shape != "constant" else 0)


def test_acct_rows_apply_the_same_figures_as_emissions(tmp_path):
    config = _hourly_config(tmp_path)
    c = resolve_carbon(config)
    assert not c.constant
    em = carbon.emissions(config, ENERGY_J, 2.0, 1.0)
    grams, intensity = c.grams(sum(ENERGY_J.values()), 2.0, 1.0, ENERGY_J)
    assert (grams, intensity) == (em.co2e_g, em.carbon["intensity_g_per_kwh"])
    assert em.embodied_g == pytest.approx(2.0 * 150_000 / (6 * 8766) + 2_500_000 / (6 * 8766))

    constant = from_mapping(
        {
            "carbon": {"region": "FR", "intensity_g_per_kwh": 55.0, "pue": 1.3},
            "embodied": {"enabled": True},
        }
    )
    c = resolve_carbon(constant)
    assert c.constant
    grams, intensity = c.grams(sum(ENERGY_J.values()), 2.0, 1.0)
    want = carbon.emissions(constant, ENERGY_J, 2.0, 1.0).co2e_g
    assert intensity == 55.0 and grams == pytest.approx(want, rel=1e-12)


def test_embodied_rates_and_their_absence(tmp_path):
    f = carbon.factors(_hourly_config(tmp_path))
    assert f.gpu_g_per_hour == carbon.embodied_g_per_hour(150, 6)
    assert f.node_g_per_hour == carbon.embodied_g_per_hour(2500, 6)
    assert f.embodied_g(3.0, 0.5) == 3.0 * f.gpu_g_per_hour + 0.5 * f.node_g_per_hour
    off = carbon.factors(_hourly_config(tmp_path, embodied=False))
    assert (off.gpu_g_per_hour, off.node_g_per_hour, off.embodied_g(3.0, 0.5)) == (0, 0, 0)
    with pytest.raises(ValueError, match="negative device hours"):
        f.embodied_g(-1.0, 0.0)


def test_operational_g_is_energy_times_pue_times_intensity():
    assert carbon.operational_g(2 * KWH_J, 1.25, 400.0) == pytest.approx(1000.0, rel=1e-15)
    assert carbon.operational_g(0.0, 1.25, 400.0) == 0.0
