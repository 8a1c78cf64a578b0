"""Hourly intensity files: every bad CSV, and a job across midnight and a DST change."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from llem import carbon
from llem.carbon.hourly import energy_by_hour, parse_hourly, read_hourly_file
from llem.config import CarbonConfig, Config
from llem.errors import ConfigError

H = 3600
# 2024-03-30T22:00:00Z: Europe/London switches from GMT to BST at 2024-03-31T01:00:00Z.
T22 = int(datetime(2024, 3, 30, 22, tzinfo=timezone.utc).timestamp())

GOOD = """\
timestamp,g_co2e_per_kwh
2024-03-30T22:00:00Z,100
2024-03-30T23:00:00Z,200
2024-03-31T00:00:00Z,300
2024-03-31T01:00:00+00:00,400
2024-03-31T02:00:00Z,500
"""


def test_a_good_file_parses():
    series = parse_hourly(GOOD, "f.csv")
    assert dict(series.g_per_kwh_by_hour) == {
        T22: 100.0, T22 + H: 200.0, T22 + 2 * H: 300.0, T22 + 3 * H: 400.0, T22 + 4 * H: 500.0
    }  # fmt: skip
    assert series.source == "f.csv"


def test_naive_times_are_utc_when_the_header_says_so():
    text = "timestamp_utc,g_co2e_per_kwh\n2024-03-30 22:00:00,100\n2024-03-30 23:00,200\n"
    assert list(parse_hourly(text, "f.csv").g_per_kwh_by_hour) == [T22, T22 + H]


def test_comments_and_blank_lines_are_skipped():
    text = "# from the grid operator\ntimestamp,g_co2e_per_kwh\n\n2024-03-30T22:00Z,100\n"
    assert list(parse_hourly(text, "f.csv").g_per_kwh_by_hour) == [T22]


def test_region_column_selects_the_configured_region():
    text = (
        "timestamp,g_co2e_per_kwh,region\n"
        "2024-03-30T22:00Z,100,GB\n2024-03-30T22:00Z,300,FR\n2024-03-30T23:00Z,110,GB\n"
    )
    series = parse_hourly(text, "f.csv", {"GB", "GBR"})
    assert dict(series.g_per_kwh_by_hour) == {T22: 100.0, T22 + H: 110.0}
    assert series.region == "GB"


BAD = [
    ("", "f.csv: empty file"),
    ("2024-03-30T22:00Z,100\n", "f.csv, line 1: the first line must be a header"),
    ("timestamp,kg_co2e_per_kwh\n2024-03-30T22:00Z,0.1\n", "f.csv, line 1: column 'kg_co2e"),
    ("timestamp,lb_per_mwh\n2024-03-30T22:00Z,700\n", "f.csv, line 1: column 'lb_per_mwh'"),
    ("timestamp,g,region,x\n", "f.csv, line 1: want a header"),
    ("timestamp,g\n2024-03-30T22:00Z,100,GB\n", "f.csv, line 2: 3 column(s), the header has 2"),
    ("timestamp,g\nyesterday,100\n", "f.csv, line 2: cannot read timestamp 'yesterday'"),
    ("timestamp,g\n2024-03-30T22:00:00,100\n", "f.csv, line 2: timestamp '2024-03-30T22:00:00' has no time zone"),
    ("timestamp,g\n2024-03-31T03:00:00+01:00,100\n", "f.csv, line 2: timestamp '2024-03-31T03:00:00+01:00' has UTC offset +0100"),
    ("timestamp,g\n2024-03-30T22:30:00Z,100\n", "f.csv, line 2: '2024-03-30T22:30:00Z' is not the start of an hour"),
    ("timestamp,g\n2024-03-30T23:00Z,100\n2024-03-30T22:00Z,100\n", "f.csv, line 3: 2024-03-30T22:00:00Z comes after 2024-03-30T23:00:00Z (line 2): the rows must be sorted"),
    ("timestamp,g\n2024-03-30T22:00Z,100\n2024-03-30T22:00Z,120\n", "f.csv, line 3: duplicate hour 2024-03-30T22:00:00Z (first at line 2)"),
    ("timestamp,g\n2024-03-30T22:00Z,100\n2024-03-31T01:00Z,120\n", "f.csv, line 3: gap of 2 hour(s) after 2024-03-30T22:00:00Z (line 2), first missing 2024-03-30T23:00:00Z"),
    ("timestamp,g\n2024-03-30T22:00Z,abc\n", "f.csv, line 2: 'abc' is not a number"),
    ("timestamp,g\n2024-03-30T22:00Z,nan\n", "f.csv, line 2: 'nan' is not a finite number"),
    ("timestamp,g\n2024-03-30T22:00Z,-5\n", "f.csv, line 2: negative intensity -5.0"),
    ("timestamp,g\n2024-03-30T22:00Z,2500\n", "f.csv, line 2: 2500.0 gCO2e/kWh is above the plausible maximum of 2000"),
    ("timestamp,g\n2024-03-30T22:00Z,0.21\n2024-03-30T23:00Z,0.35\n", "f.csv, line 2: every value is below 1 (highest 0.35): that looks like kgCO2e/kWh"),
    ("timestamp,g,region\n2024-03-30T22:00Z,100,GB\n2024-03-30T22:00Z,50,FR\n", "f.csv: rows of several regions (FR, GB)"),
    ("timestamp,g,color\n2024-03-30T22:00Z,100,x\n", "f.csv, line 1: third column must be 'region'"),
    ("timestamp,g\n", "f.csv: no data rows after the header"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_every_bad_file_is_refused_naming_file_and_line(text, message):
    with pytest.raises(ConfigError) as e:
        parse_hourly(text, "f.csv")
    assert message in str(e.value)


def test_a_local_time_series_repeats_an_hour_when_clocks_go_back():
    # Europe/London, 2024-10-27: 01:00-02:00 local happens twice. Written as naive local
    # times under a header that declares UTC, the repeated hour is caught as a duplicate.
    text = (
        "timestamp_utc,g_co2e_per_kwh\n"
        "2024-10-27 00:00,150\n2024-10-27 01:00,140\n2024-10-27 01:00,145\n"
    )
    with pytest.raises(ConfigError, match="line 4: duplicate hour 2024-10-27T01:00:00Z"):
        parse_hourly(text, "local.csv")


def test_configured_region_absent_from_the_file():
    text = "timestamp,g,region\n2024-03-30T22:00Z,100,FR\n"
    with pytest.raises(ConfigError, match="f.csv: no rows for region GB"):
        parse_hourly(text, "f.csv", "GB")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="carbon.intensity_file not found"):
        read_hourly_file(tmp_path / "nope.csv")


def test_energy_by_hour_splits_at_clock_hours_and_keeps_the_total():
    split = energy_by_hour(T22 + 1800, T22 + 4 * H + 1800, 4 * 3.6e6)
    assert split == {
        T22: 1.8e6, T22 + H: 3.6e6, T22 + 2 * H: 3.6e6, T22 + 3 * H: 3.6e6, T22 + 4 * H: 1.8e6
    }  # fmt: skip
    assert sum(split.values()) == pytest.approx(4 * 3.6e6)
    with pytest.raises(ValueError):
        energy_by_hour(10, 5, 1.0)


def _london(*args, fold=0):
    try:
        from zoneinfo import ZoneInfo

        return datetime(*args, tzinfo=ZoneInfo("Europe/London"), fold=fold).timestamp()
    except (
        ImportError,
        KeyError,
        OSError,
        ValueError,
    ):  # no time-zone data on this machine: the UTC figures below still hold
        return None


def test_job_across_midnight_and_the_spring_dst_change(tmp_path):
    """A 1 kW job from 22:30 GMT on 30 March to 03:30 BST on 31 March 2024 (Europe/London).

    Local clocks show 5 hours; it ran 4 (01:00 GMT became 02:00 BST). Its energy by UTC hour
    is 0.5, 1, 1, 1, 0.5 kWh, against 100, 200, 300, 400, 500 gCO2e/kWh, with PUE 1.5.
    """
    start_s, end_s = T22 + 1800, T22 + 4 * H + 1800
    local_start, local_end = _london(2024, 3, 30, 22, 30), _london(2024, 3, 31, 3, 30)
    if local_start is not None:
        assert (local_start, local_end) == (start_s, end_s)
    path = tmp_path / "hourly.csv"
    path.write_text(GOOD, encoding="utf-8")
    config = Config(carbon=CarbonConfig(region="GB", intensity_file=str(path), pue=1.5))
    energy = energy_by_hour(start_s, end_s, 4 * 3.6e6)  # 4 kWh

    result = carbon.emissions(config, energy)

    operational_g = 1.5 * (0.5 * 100 + 200 + 300 + 400 + 0.5 * 500)  # 1800 g
    assert result.operational_g == pytest.approx(operational_g)
    assert result.energy_kwh == pytest.approx(4.0)
    assert result.carbon["intensity_g_per_kwh"] == pytest.approx(300.0)  # 1800 / (4 x 1.5)
    assert result.carbon["hourly_coverage"] == 1.0
    assert result.carbon["fallback_hours"] == 0
    assert result.carbon["source"] == str(path)
    assert result.carbon["year"] == "2024"


def test_hours_outside_the_file_fall_back_to_the_annual_figure_and_are_flagged(tmp_path):
    path = tmp_path / "hourly.csv"
    path.write_text(GOOD, encoding="utf-8")
    config = Config(carbon=CarbonConfig(region="GB", intensity_file=str(path)))
    model = carbon.resolve(config)
    inside = model.for_hour(T22 + 2 * H + 59)
    assert (inside.g_per_kwh, inside.flagged_fallback) == (300.0, False)
    outside = model.for_hour(T22 + 5 * H)
    assert outside.flagged_fallback is True
    assert outside.g_per_kwh == carbon.lookup("GB").g_per_kwh
    assert "Our World in Data" in outside.source

    result = carbon.emissions(config, {T22 + 4 * H: 3.6e6, T22 + 5 * H: 3.6e6})  # 1 + 1 kWh
    gb = carbon.lookup("GB").g_per_kwh
    assert result.operational_g == pytest.approx(500 + gb)
    assert result.carbon["fallback_hours"] == 1
    assert result.carbon["hourly_coverage"] == 0.5
    assert result.carbon["source"].count(";") >= 1  # both sources are named
    assert result.carbon["year"] == "2024"


def test_job_across_midnight_and_the_autumn_dst_change(tmp_path):
    """23:30 BST on 26 October to 01:30 GMT on 27 October 2024: 3 hours, the clock shows 2.

    01:30 happens twice that night (BST, then GMT); the job ends at the second (fold=1).
    """
    t = int(datetime(2024, 10, 26, 22, tzinfo=timezone.utc).timestamp())
    start_s, end_s = t + 1800, t + 3 * H + 1800  # 22:30 UTC to 01:30 UTC
    local_start, local_end = _london(2024, 10, 26, 23, 30), _london(2024, 10, 27, 1, 30, fold=1)
    if local_start is not None:
        assert (local_start, local_end) == (start_s, end_s)
    path = tmp_path / "hourly.csv"
    path.write_text(
        "timestamp,g_co2e_per_kwh\n"
        "2024-10-26T22:00:00Z,210\n2024-10-26T23:00:00Z,190\n"
        "2024-10-27T00:00:00Z,170\n2024-10-27T01:00:00Z,150\n",
        encoding="utf-8",
    )
    config = Config(carbon=CarbonConfig(region="GB", intensity_file=str(path)))
    result = carbon.emissions(config, energy_by_hour(start_s, end_s, 3 * 3.6e6))  # 1 kW, 3 h
    assert result.energy_kwh == pytest.approx(3.0)
    assert result.operational_g == pytest.approx(0.5 * 210 + 190 + 170 + 0.5 * 150)
    assert result.carbon["fallback_hours"] == 0
