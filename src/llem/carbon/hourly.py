"""Hourly intensity series: the ``carbon.intensity_file`` format, its checks, and the cache.

File format (docs/carbon.md has the full rules)::

    timestamp,g_co2e_per_kwh,region
    2024-03-31T00:00:00Z,182.5,GB
    2024-03-31T01:00:00Z,175.0,GB

* Line 1 is a header. Column 1 holds the start of each hour; its name contains ``time`` or
  ``date``. Column 2 holds gCO2e/kWh; a name that says kg, lb, t or MWh is refused. An
  optional column 3 named ``region`` (or ``zone``) holds a region code. Lines starting with
  ``#`` and blank lines are skipped.
* Timestamps are ISO 8601 in UTC: ``Z`` or ``+00:00``. Other offsets are refused (local
  times invite DST duplicates and gaps). Naive times are refused unless the timestamp column's
  name contains ``utc`` (``timestamp_utc``, ``Datetime (UTC)``), which declares them UTC.
  Every timestamp is the start of an hour.
* Per region, rows are sorted, without duplicates, and without gaps (a missing hour inside
  the file is an error: fill it, or end the file there). Hours before or after the file fall
  back to the annual figure and are flagged.
* Values lie in [0, 2000] gCO2e/kWh (the most carbon-intensive grids are about 1,100); a
  series whose every value is below 1 is refused as probably kgCO2e/kWh.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from llem.errors import ConfigError

SECONDS_PER_HOUR = 3600
MAX_G_PER_KWH = 2000.0
KG_SUSPECT_BELOW_G_PER_KWH = 1.0
_BAD_UNIT_WORDS = ("kg", "lb", "mwh", "tco2", "tonne")


@dataclass(frozen=True)
class HourlySeries:
    """Hourly intensities keyed by the UTC epoch second of each hour's start.

    Attributes:
        g_per_kwh_by_hour: hour start (UTC epoch seconds) -> gCO2e/kWh.
        source: where the series comes from (a file path, a provider).
        region: the region of the rows used, or None when the file has no region column.
        basis: ``lifecycle``, ``direct`` or ``unspecified``.
    """

    g_per_kwh_by_hour: Mapping[int, float] = field(default_factory=dict)
    source: str = ""
    region: str | None = None
    basis: str = "unspecified"

    def __len__(self) -> int:
        return len(self.g_per_kwh_by_hour)


def hour_start(ts: float | datetime) -> int:
    """UTC epoch seconds of the start of the clock hour that contains ``ts``.

    Raises:
        ValueError: ``ts`` is a naive datetime (its time zone is unknown).
    """
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError(f"naive datetime {ts.isoformat()}: give a time zone (UTC)")
        ts = ts.timestamp()
    return math.floor(ts / SECONDS_PER_HOUR) * SECONDS_PER_HOUR


def energy_by_hour(start_s: float, end_s: float, energy_j: float) -> dict[int, float]:
    """Spread energy used evenly over [start_s, end_s) across the UTC clock hours it touches.

    For a job or an interval whose power is taken as constant; finer intervals give finer
    results. Keys are hour starts (UTC epoch seconds), values joules; their sum is
    ``energy_j``.

    Raises:
        ValueError: ``end_s`` before ``start_s``, or negative energy.
    """
    if end_s < start_s or energy_j < 0:
        raise ValueError(f"bad interval [{start_s}, {end_s}) or energy {energy_j} J")
    if end_s == start_s:
        return {hour_start(start_s): float(energy_j)} if energy_j else {}
    out: dict[int, float] = {}
    hour = hour_start(start_s)
    while hour < end_s:
        overlap = min(end_s, hour + SECONDS_PER_HOUR) - max(start_s, hour)
        if overlap > 0:
            out[hour] = energy_j * overlap / (end_s - start_s)
        hour += SECONDS_PER_HOUR
    return out


def iso_hour(epoch_s: int) -> str:
    """``2024-03-31T01:00:00Z`` for an epoch second."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc_timestamp(text: str, naive_is_utc: bool = False) -> int:
    """Epoch seconds of an ISO 8601 UTC timestamp.

    Raises:
        ValueError: unreadable, a non-UTC offset, or naive while ``naive_is_utc`` is False. The
            message says which.
    """
    raw = text.strip()
    iso = raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"cannot read timestamp '{raw}' (want ISO 8601 in UTC, e.g. 2024-03-31T01:00:00Z)"
        ) from None
    if when.tzinfo is None:
        if not naive_is_utc:
            raise ValueError(
                f"timestamp '{raw}' has no time zone: write UTC with 'Z' or '+00:00' (or name "
                "the column 'timestamp_utc' to declare naive times UTC)"
            )
        when = when.replace(tzinfo=timezone.utc)
    offset = when.utcoffset()
    if offset != timedelta(0):
        raise ValueError(
            f"timestamp '{raw}' has UTC offset {when.strftime('%z')}: llem wants UTC "
            "(convert the series to UTC; local times repeat or skip hours at DST changes)"
        )
    return int(when.timestamp())


def _check_header(header: list[str], where: str) -> tuple[bool, bool]:
    """(naive_is_utc, has_region) from the header; raises on a wrong layout or unit."""
    if len(header) not in (2, 3):
        raise ConfigError(
            f"{where}, line 1: want a header 'timestamp,g_co2e_per_kwh[,region]', got "
            f"{len(header)} column(s): {','.join(header)}"
        )
    time_col = header[0].strip().lower()
    if "time" not in time_col and "date" not in time_col:
        raise ConfigError(
            f"{where}, line 1: the first line must be a header whose first column is the "
            f"timestamp (e.g. 'timestamp,g_co2e_per_kwh'), got '{header[0]}'"
        )
    unit = header[1].strip().lower().replace(" ", "")
    for word in _BAD_UNIT_WORDS:
        if word in unit:
            raise ConfigError(
                f"{where}, line 1: column '{header[1]}' looks like it is not in gCO2e/kWh "
                f"('{word}'); convert the values to grams per kWh"
            )
    has_region = len(header) == 3
    if has_region and header[2].strip().lower() not in ("region", "zone"):
        raise ConfigError(f"{where}, line 1: third column must be 'region', got '{header[2]}'")
    return "utc" in time_col, has_region


def _value(text: str, where: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}, line {line}: '{text}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}, line {line}: '{text}' is not a finite number")
    if value < 0:
        raise ConfigError(f"{where}, line {line}: negative intensity {value} gCO2e/kWh")
    if value > MAX_G_PER_KWH:
        raise ConfigError(
            f"{where}, line {line}: {value} gCO2e/kWh is above the plausible maximum of "
            f"{MAX_G_PER_KWH:.0f} (lb/MWh, or mg/kWh?); llem wants gCO2e/kWh"
        )
    return value


def parse_hourly(
    text: str,
    where: str,
    region: str | Iterable[str] | None = None,
    *,
    allow_gaps: bool = False,
    basis: str = "unspecified",
) -> HourlySeries:
    """Parse and check an hourly intensity CSV.

    Args:
        text: the file's content.
        where: the file's name, used in every error message.
        region: the configured region and its aliases; rows of other regions are ignored.
            None: the file must hold one region only (or none).
        allow_gaps: accept missing hours inside the series (the provider cache, which holds
            whatever ranges were fetched).
        basis: the basis to record for the series.

    Raises:
        ConfigError: naming the file and line: a wrong header or unit, an unreadable,
            non-UTC or naive timestamp, one that is not on the hour, an unsorted, duplicate
            or missing hour, a bad, negative or implausible value, or no usable rows.
    """
    lines = [
        (n, row)
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1)
        if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
    ]
    if not lines:
        raise ConfigError(f"{where}: empty file: want a header and hourly rows")
    _, header = lines[0]  # comment lines may come before the header
    naive_is_utc, has_region = _check_header(header, where)
    wanted = {region.upper()} if isinstance(region, str) else None
    if region is not None and not isinstance(region, str):
        wanted = {r.upper() for r in region}

    per_region: dict[str, list[tuple[int, int, float]]] = {}
    for line, row in lines[1:]:
        if len(row) != len(header):
            raise ConfigError(
                f"{where}, line {line}: {len(row)} column(s), the header has {len(header)}"
            )
        code = row[2].strip() if has_region else ""
        if wanted is not None and has_region and code.upper() not in wanted:
            continue
        try:
            ts = parse_utc_timestamp(row[0], naive_is_utc)
        except ValueError as e:
            raise ConfigError(f"{where}, line {line}: {e}") from None
        if ts % SECONDS_PER_HOUR:
            raise ConfigError(
                f"{where}, line {line}: '{row[0].strip()}' is not the start of an hour "
                "(llem wants one row per clock hour)"
            )
        per_region.setdefault(code, []).append((line, ts, _value(row[1].strip(), where, line)))

    if not per_region:
        if wanted is not None and has_region:
            raise ConfigError(f"{where}: no rows for region {'/'.join(sorted(wanted))}")
        raise ConfigError(f"{where}: no data rows after the header")
    if len(per_region) > 1:
        raise ConfigError(
            f"{where}: rows of several regions ({', '.join(sorted(per_region))}); set "
            "carbon.region to choose one"
        )
    ((code, rows),) = per_region.items()
    series = _check_sequence(rows, where, allow_gaps)
    _check_units(rows, where)
    return HourlySeries(series, source=where, region=code or None, basis=basis)


def _check_sequence(
    rows: list[tuple[int, int, float]], where: str, allow_gaps: bool
) -> dict[int, float]:
    series: dict[int, float] = {}
    first_line: dict[int, int] = {}
    prev_line, prev_ts = None, None
    for line, ts, value in rows:
        if ts in first_line:
            raise ConfigError(
                f"{where}, line {line}: duplicate hour {iso_hour(ts)} (first at line "
                f"{first_line[ts]})"
            )
        if prev_ts is not None and ts < prev_ts:
            raise ConfigError(
                f"{where}, line {line}: {iso_hour(ts)} comes after {iso_hour(prev_ts)} (line "
                f"{prev_line}): the rows must be sorted by time"
            )
        if prev_ts is not None and not allow_gaps and ts - prev_ts > SECONDS_PER_HOUR:
            missing = (ts - prev_ts) // SECONDS_PER_HOUR - 1
            raise ConfigError(
                f"{where}, line {line}: gap of {missing} hour(s) after {iso_hour(prev_ts)} "
                f"(line {prev_line}), first missing {iso_hour(prev_ts + SECONDS_PER_HOUR)}: "
                "fill the missing hours, or end the file before the gap"
            )
        series[ts] = value
        first_line[ts] = line
        prev_line, prev_ts = line, ts
    return series


def _check_units(rows: list[tuple[int, int, float]], where: str) -> None:
    top = max(value for _, _, value in rows)
    if 0 < top < KG_SUSPECT_BELOW_G_PER_KWH:
        raise ConfigError(
            f"{where}, line {rows[0][0]}: every value is below {KG_SUSPECT_BELOW_G_PER_KWH:g} "
            f"(highest {top:g}): that looks like kgCO2e/kWh; llem wants gCO2e/kWh (x1000). A "
            "grid this clean is better given as carbon.intensity_g_per_kwh"
        )


def read_hourly_file(
    path: str | os.PathLike,
    region: str | Iterable[str] | None = None,
    *,
    basis: str = "unspecified",
) -> HourlySeries:
    """Read and check ``carbon.intensity_file`` (see :func:`parse_hourly`).

    Raises:
        ConfigError: the file cannot be read, or any check fails.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: carbon.intensity_file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read carbon.intensity_file: {e}") from e
    return parse_hourly(text, str(path), region, basis=basis)


# --- the provider cache: one file per provider and zone, in the same CSV format -----------


def cache_path(cache_dir: str | os.PathLike, provider: str, zone: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in zone or "national")
    return Path(cache_dir) / f"{provider}_{safe}.csv"


def read_cache(path: Path) -> dict[int, float]:
    """The cached hours of one provider and zone; empty when there is no cache file yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return dict(parse_hourly(text, str(path), allow_gaps=True).g_per_kwh_by_hour)


def write_cache(path: Path, g_per_kwh_by_hour: Mapping[int, float], merge: bool = True) -> None:
    """Merge hours into a cache file, atomically (write a temporary file, then rename).

    Raises:
        ConfigError: the existing cache file is unreadable and ``merge`` is True.
        OSError: the file cannot be written.
    """
    from llem.fsutil import write_atomic

    merged = {**(read_cache(path) if merge else {}), **g_per_kwh_by_hour}
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,g_co2e_per_kwh\n"]
    lines += [f"{iso_hour(ts)},{merged[ts]!r}\n" for ts in sorted(merged)]
    write_atomic(path.parent, path.name, "".join(lines).encode(), 0o644)
