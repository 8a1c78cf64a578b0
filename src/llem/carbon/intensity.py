"""Which intensity applies to which hour: the configured model and its resolution.

Order of precedence, for each clock hour:

1. an hourly figure from ``carbon.intensity_file`` or the online provider's cache;
2. else the annual figure: ``carbon.intensity_g_per_kwh`` when set, else the shipped table's
   row for ``carbon.region``, else the world default (and then says so).

An hour that had to use step 2 while an hourly series was configured is flagged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from llem.carbon import tables
from llem.carbon.hourly import HourlySeries, hour_start, read_hourly_file
from llem.errors import ConfigError

log = logging.getLogger(__name__)

CONSTANT_SOURCE = "configured constant (carbon.intensity_g_per_kwh)"
DEFAULT_NOTE = "default: no carbon.region configured"
UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class HourIntensity:
    """The intensity that applies to one clock hour, with its provenance.

    Attributes:
        g_per_kwh: grams CO2e per kWh.
        source: where the figure comes from.
        flagged_fallback: True when an hourly series was configured but did not cover this
            hour, so the annual figure was used.
        year: data year (``2024``, a span ``2021-2023``, or ``n/a`` for a constant); for an
            hour of a year the table lacks, the figure's year and the hour's (``2024 for
            2025``): the nearest earlier year was used.
        basis: ``lifecycle``, ``direct`` or ``unspecified``.
    """

    g_per_kwh: float
    source: str
    flagged_fallback: bool = False
    year: str = ""
    basis: str = UNSPECIFIED


@dataclass(frozen=True)
class IntensityModel:
    """The resolved intensity configuration: an optional hourly series over an annual figure.

    Attributes:
        region: the canonical region code (``WORLD`` for the default, or the configured text
            when only a constant is given).
        annual: the annual figure used for hours without an hourly one.
        hourly: the hourly series, or None.
        is_default_region: True when no region was configured and the world figure applies.
        notes: what the user should know (provider failures, the default region).
        licence: the licence of the annual figure, when it comes from a table.
        by_year: the region's annual figure of every shipped year (data year -> figure),
            when the annual figure comes from a table; each hour then gets its own year's.
    """

    region: str
    annual: HourIntensity
    hourly: HourlySeries | None = None
    is_default_region: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    licence: str = ""
    by_year: tuple[tuple[int, HourIntensity], ...] = ()

    @functools.cached_property
    def _by_year_map(self) -> dict[int, HourIntensity]:
        return dict(self.by_year)

    @property
    def varies_by_year(self) -> bool:
        """Whether hours of different years may get different annual figures."""
        return len({hi.g_per_kwh for _, hi in self.by_year}) > 1

    def annual_for(self, hour: int) -> HourIntensity:
        """The annual figure of the hour's UTC year: its own year's, or the nearest earlier
        year's (the year label then says so: ``2024 for 2025``)."""
        if not self.by_year:
            return self.annual
        year = time.gmtime(hour).tm_year
        by_year = self._by_year_map
        if year in by_year:
            return by_year[year]
        earlier = [y for y in by_year if y < year]
        used = by_year[max(earlier) if earlier else min(by_year)]
        return replace(used, year=f"{used.year} for {year}")

    def for_hour(self, hour_start_utc: float | datetime) -> HourIntensity:
        """The intensity of the clock hour containing ``hour_start_utc`` (epoch s, or aware)."""
        hour = hour_start(hour_start_utc)
        if self.hourly is not None:
            value = self.hourly.g_per_kwh_by_hour.get(hour)
            if value is not None:
                year = str(datetime.fromtimestamp(hour, tz=timezone.utc).year)
                return HourIntensity(value, self.hourly.source, False, year, self.hourly.basis)
            return replace(self.annual_for(hour), flagged_fallback=True)
        return self.annual_for(hour)


def _annual_from_table(row: tables.AnnualIntensity, default: bool) -> HourIntensity:
    source = f"{row.source}; {DEFAULT_NOTE}" if default else row.source
    return HourIntensity(row.g_per_kwh, source, False, row.year, row.basis)


def _check_basis(basis: str | None) -> str:
    if basis is None:
        return UNSPECIFIED
    if basis not in tables.BASES:
        raise ConfigError(f"carbon.intensity_basis must be 'lifecycle' or 'direct', got '{basis}'")
    return basis


def resolve(
    config,
    *,
    hours: Iterable[int] = (),
    cache_dir: str | None = None,
    share_dir: str | None = None,
    provider_get=None,
) -> IntensityModel:
    """Resolve ``config.carbon`` into an IntensityModel.

    Args:
        config: a :class:`llem.config.Config` (or anything with a ``carbon`` attribute).
        hours: hour starts (UTC epoch s) the caller will ask for; an online provider, when
            configured, is asked for these (nothing is fetched when empty).
        cache_dir: directory of the provider's file cache; None keeps it in memory.
        share_dir: a directory of tables instead of the shipped ones (tests, packagers).
        provider_get: the provider's HTTP GET function (injectable; default urllib).

    Returns:
        The model. Provider failures do not raise; they appear in ``notes``.

    Raises:
        ConfigError: unknown region (with close matches), a bad intensity file, an unknown
            provider or a missing token, a bad intensity_basis.
    """
    carbon = config.carbon
    basis = _check_basis(getattr(carbon, "intensity_basis", None))
    row = _configured_row(carbon, share_dir)
    notes: list[str] = []
    by_year: tuple[tuple[int, HourIntensity], ...] = ()
    if carbon.intensity_g_per_kwh is not None:
        g = float(carbon.intensity_g_per_kwh)
        annual = HourIntensity(g, CONSTANT_SOURCE, False, "n/a", basis)
        region, default, licence = (row.region if row else carbon.region or "n/a"), False, ""
    elif row is not None:
        annual, region, default, licence = (
            _annual_from_table(row, False),
            row.region,
            False,
            row.licence,
        )
        by_year = tuple(
            (y, _annual_from_table(r, False))
            for y, r in sorted(tables.rows_by_year(row.region, directory=share_dir).items())
        )
    else:
        world = tables.world(directory=share_dir)
        annual, region, default, licence = (
            _annual_from_table(world, True),
            world.region,
            True,
            world.licence,
        )
        notes.append(
            f"no carbon.region configured: using the world default ({world.g_per_kwh:g} "
            f"gCO2e/kWh, {world.year})"
        )

    hourly = None
    if carbon.intensity_file:
        names = {row.region, *row.aliases} if row else set()
        names |= {carbon.region} if carbon.region else set()
        hourly = read_hourly_file(carbon.intensity_file, names or None, basis=basis)
    elif carbon.provider:
        from llem.carbon import providers  # urllib and json only when a provider is set
        from llem.config import SecretUnavailable

        try:  # issue 20: the token may live in a file only root and admins read
            token = carbon.token() if hasattr(carbon, "token") else carbon.provider_token
        except SecretUnavailable as e:
            notes.append(f"{e}: the online provider is not used, the annual table is")
            return IntensityModel(region, annual, None, default, tuple(notes), licence)
        result = providers.lookup_hours(
            carbon.provider,
            getattr(carbon, "provider_zone", None) or carbon.region,
            hours,
            cache_dir=cache_dir,
            token=token,
            url=getattr(carbon, "provider_url", None),
            timeout_s=getattr(carbon, "provider_timeout_s", 10.0),
            **({"get": provider_get} if provider_get else {}),
        )
        hourly = result.series
        notes.extend(result.notes)
    return IntensityModel(region, annual, hourly, default, tuple(notes), licence, by_year)


def _configured_row(carbon, share_dir: str | None) -> tables.AnnualIntensity | None:
    """The table row of ``carbon.region``; None without a region, or for a mere label."""
    if not carbon.region:
        return None
    try:
        return tables.lookup(carbon.region, directory=share_dir)
    except ConfigError:
        if carbon.intensity_g_per_kwh is None:
            raise
        return None  # with a constant the region is only a label: any code is accepted
