"""Emissions as pure functions of stored energy and the configured factors.

    operational_g = sum over clock hours h of energy_kWh(h) x PUE(month of h) x intensity(h)
    embodied_g    = gpu_hours x gpu_kgCO2e x 1000 / (gpu_lifetime_years x 8766 h)
                  + node_hours x node_kgCO2e x 1000 / (node_lifetime_years x 8766 h)

This module is the one place that computes them: :class:`Factors` holds a configuration's
factors resolved once, :func:`operational_g` is the arithmetic of one hour, and
:func:`emissions` applies them to energy by clock hour with provenance. ``llem wrap``,
``llem-acct`` (its rows and ``--statement``) and ``llem report`` (which sums
:meth:`Factors.g_per_uj` in SQL) all go through them.

Energy is the stored truth; emissions are computed whenever they are shown, so a corrected
factor changes old reports, and every result carries the factors it used (``carbon``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from llem.carbon.hourly import SECONDS_PER_HOUR
from llem.carbon.intensity import IntensityModel, resolve
from llem.errors import ConfigError
from llem.units import J_PER_KWH, UJ_PER_KWH

HOURS_PER_YEAR = 365.25 * 24  # a lifetime in years is amortised over calendar hours
EMBODIED_DEFAULTS_SOURCE = (
    "defaults: 150 kgCO2e per GPU and 2500 kgCO2e per node over 6 years, from Luccioni et "
    "al. 2022 (BLOOM); see docs/carbon.md"
)


@dataclass(frozen=True)
class Emissions:
    """Emissions of some energy use, with the factors that produced them.

    Attributes:
        co2e_g: operational plus embodied, grams CO2e.
        operational_g: from electricity: energy x PUE x grid intensity, grams CO2e.
        embodied_g: the amortised share of manufacturing, grams CO2e (0 when disabled).
        energy_kwh: the IT energy the computation was given.
        facility_energy_kwh: energy x PUE.
        carbon: the factors as ``llem wrap --json`` prints them: ``region``,
            ``intensity_g_per_kwh`` (energy-weighted mean actually applied), ``source``,
            ``year``, ``basis``, ``pue``, then ``licence``, ``hourly_coverage``,
            ``fallback_hours``, ``region_is_default``, ``pue_by_month``, ``embodied``,
            ``notes``.
        grams_by_year: operational grams by the data year of the intensity applied (the
            ``year`` labels of :class:`HourIntensity`).
    """

    co2e_g: float
    operational_g: float
    embodied_g: float
    energy_kwh: float
    facility_energy_kwh: float
    carbon: dict[str, Any]
    grams_by_year: dict[str, float] = field(default_factory=dict)


def month_of(hour_start_utc: int) -> str:
    """``YYYY-MM`` of a UTC epoch second."""
    return datetime.fromtimestamp(hour_start_utc, tz=timezone.utc).strftime("%Y-%m")


def _month_bounds(epoch_s: int) -> tuple[int, int]:
    """[start, end) in epoch seconds of the UTC month of ``epoch_s``."""
    t = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    start = datetime(t.year, t.month, 1, tzinfo=timezone.utc)
    return int(start.timestamp()), int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())


def pue_for_month(pue: float | Mapping[str, float], month: str) -> float:
    """The PUE of a month.

    A constant applies to every month. With a mapping of ``YYYY-MM`` to PUE, the month's own
    value applies, else the latest earlier month's (PUE is measured in arrears and carried
    forward until the next measurement).

    Raises:
        ConfigError: the month is before the first month of the mapping, or the mapping is
            empty.
    """
    if not isinstance(pue, Mapping):
        return float(pue)
    if month in pue:
        return float(pue[month])
    earlier = [m for m in pue if m <= month]
    if not earlier:
        first = min(pue) if pue else "none"
        raise ConfigError(
            f"carbon.pue has no value for {month} or any earlier month (first: {first})"
        )
    return float(pue[max(earlier)])


def embodied_g_per_hour(kgco2e: float, lifetime_years: float) -> float:
    """Grams CO2e per hour of a device's manufacturing footprint amortised over its life.

    Raises:
        ConfigError: the lifetime is not positive.
    """
    if lifetime_years <= 0:
        raise ConfigError(f"embodied lifetime must be positive, got {lifetime_years} years")
    return kgco2e * 1000.0 / (lifetime_years * HOURS_PER_YEAR)


def operational_g(energy_j: float, pue: float, g_per_kwh: float) -> float:
    """Grams CO2e of IT energy used in one hour: energy (kWh) x PUE x grid intensity."""
    return energy_j / J_PER_KWH * pue * g_per_kwh


@dataclass(frozen=True)
class Factors:
    """A configuration's emission factors, resolved once.

    Attributes:
        model: the grid intensity: an annual figure, and an hourly series where configured.
        pue: a constant, or ``YYYY-MM`` -> PUE (see :func:`pue_for_month`).
        embodied_config: the ``embodied`` configuration section.
        gpu_g_per_hour: embodied grams CO2e per GPU-hour (0 when disabled).
        node_g_per_hour: embodied grams CO2e per node-hour (0 when disabled).
    """

    model: IntensityModel
    pue: float | Mapping[str, float]
    embodied_config: Any = None
    gpu_g_per_hour: float = 0.0
    node_g_per_hour: float = 0.0

    @property
    def constant(self) -> bool:
        """Whether every hour has the same factor (annual intensity, constant PUE): then a
        total energy needs no split by hour."""
        return (
            self.model.hourly is None
            and not self.model.varies_by_year
            and not isinstance(self.pue, Mapping)
        )

    @property
    def embodied_enabled(self) -> bool:
        return self.embodied_config is not None and bool(self.embodied_config.enabled)

    def pue_of_month(self, month: str) -> float:
        """The PUE of a ``YYYY-MM`` month (see :func:`pue_for_month`)."""
        return pue_for_month(self.pue, month)

    def of_hour(self, hour_start_utc: int) -> tuple[Any, float]:
        """(HourIntensity, PUE) that apply to the clock hour starting at ``hour_start_utc``."""
        return self.model.for_hour(hour_start_utc), self.pue_of_month(month_of(hour_start_utc))

    def g_per_uj(self, hour_start_utc: int) -> float:
        """Grams CO2e per microjoule of IT energy in that hour, intensity x PUE / 3.6e12: the
        factor of :func:`operational_g` for sums that run elsewhere (``llem report`` in SQL)."""
        hi, pue = self.of_hour(hour_start_utc)
        return hi.g_per_kwh * pue / UJ_PER_KWH

    def g_per_uj_by_hour(self, hours: Iterable[int]) -> dict[int, float]:
        """:meth:`g_per_uj` of each of ``hours`` (UTC hour starts), computed once
        per calendar month for every hour without an hourly intensity of its own: the
        annual figure changes by year and the PUE by month, so within a month such hours
        share one factor (a 30-year report's 263,000 hours: 2.3 s of CPU hour by hour)."""
        series = self.model.hourly.g_per_kwh_by_hour if self.model.hourly is not None else {}
        out: dict[int, float] = {}
        month_start = month_end = 0
        month_g = 0.0
        for hour in hours:
            if hour in series:
                out[hour] = self.g_per_uj(hour)
                continue
            if not month_start <= hour < month_end:
                month_start, month_end = _month_bounds(hour)
                hi = self.model.annual_for(hour)
                month_g = hi.g_per_kwh * self.pue_of_month(month_of(hour)) / UJ_PER_KWH
            out[hour] = month_g
        return out

    def embodied_g(self, gpu_hours: float, node_hours: float) -> float:
        """Embodied grams CO2e of GPU-hours and node-hours (0 when disabled)."""
        if not self.embodied_enabled:
            return 0.0
        if gpu_hours < 0 or node_hours < 0:
            raise ValueError(f"negative device hours: gpu {gpu_hours}, node {node_hours}")
        return gpu_hours * self.gpu_g_per_hour + node_hours * self.node_g_per_hour


def factors(config, model: IntensityModel | None = None, **resolve_kwargs) -> Factors:
    """Resolve ``config``'s factors (the intensity model unless ``model`` is given).

    Args:
        config: a :class:`llem.config.Config`.
        model: an already resolved intensity model.
        resolve_kwargs: passed to :func:`llem.carbon.resolve` (``hours``, ``cache_dir``,
            ``share_dir``).

    Raises:
        ConfigError: an unknown region, a bad intensity file, a lifetime that is not positive.
    """
    if model is None:
        model = resolve(config, **resolve_kwargs)
    emb = config.embodied
    gpu = node = 0.0
    if emb.enabled:
        gpu = embodied_g_per_hour(emb.gpu_kgco2e, emb.gpu_lifetime_years)
        node = embodied_g_per_hour(emb.node_kgco2e, emb.node_lifetime_years)
    return Factors(model, config.carbon.pue, emb, gpu, node)


def embodied(f: Factors, gpu_hours: float, node_hours: float) -> tuple[float, dict | None]:
    """(grams CO2e, description) of the embodied share; (0, None) when disabled."""
    if not f.embodied_enabled:
        return 0.0, None
    grams = f.embodied_g(gpu_hours, node_hours)
    embodied_config = f.embodied_config
    return grams, {
        "gpu_g_per_hour": round(f.gpu_g_per_hour, 4),
        "node_g_per_hour": round(f.node_g_per_hour, 4),
        "gpu_hours": gpu_hours,
        "node_hours": node_hours,
        "source": (
            f"{embodied_config.gpu_kgco2e:g} kgCO2e per GPU over "
            f"{embodied_config.gpu_lifetime_years:g} years, {embodied_config.node_kgco2e:g} "
            f"kgCO2e per node over {embodied_config.node_lifetime_years:g} years, amortised "
            f"over calendar hours ({EMBODIED_DEFAULTS_SOURCE})"
        ),
    }


def _nominal_pue(
    pue: float | Mapping[str, float], energy_j_by_hour: Mapping[int, float]
) -> float | None:
    """The PUE to show when no energy was used: the first hour's month's, or the constant."""
    if not isinstance(pue, Mapping):
        return float(pue)
    return pue_for_month(pue, month_of(min(energy_j_by_hour))) if energy_j_by_hour else None


def _joined(weights: dict[str, float]) -> str:
    """Distinct labels, the one carrying most energy first."""
    return "; ".join(k for k, _ in sorted(weights.items(), key=lambda kv: -kv[1]))


def operational(
    energy_j_by_hour: Mapping[int, float],
    model: IntensityModel,
    pue: float | Mapping[str, float],
) -> tuple[float, float, float, dict[str, Any]]:
    """(operational_g, energy_kwh, facility_kwh, carbon fields) of hourly energy.

    Raises:
        ValueError: a key that is not the start of a UTC hour, or a negative or non-finite
            energy.
    """
    f = Factors(model, pue)
    grams = energy_kwh = facility_kwh = covered_kwh = 0.0
    fallback_hours = 0
    sources: dict[str, float] = {}
    years: dict[str, float] = {}
    grams_by_year: dict[str, float] = {}
    bases: dict[str, float] = {}
    pue_used: dict[str, float] = {}
    for hour in sorted(energy_j_by_hour):
        energy_j = energy_j_by_hour[hour]
        if hour % SECONDS_PER_HOUR:
            raise ValueError(f"energy key {hour} is not the start of a UTC hour")
        if not math.isfinite(energy_j) or energy_j < 0:
            raise ValueError(f"energy of hour {hour} is {energy_j} J")
        hi, hour_pue = f.of_hour(hour)
        pue_used[month_of(hour)] = hour_pue
        hour_g = operational_g(energy_j, hour_pue, hi.g_per_kwh)
        grams += hour_g
        grams_by_year[hi.year] = grams_by_year.get(hi.year, 0.0) + hour_g
        kwh = energy_j / J_PER_KWH
        facility = kwh * hour_pue
        energy_kwh += kwh
        facility_kwh += facility
        if kwh > 0 and hi.flagged_fallback:
            fallback_hours += 1
        if not hi.flagged_fallback:
            covered_kwh += facility
        for bucket, key in ((sources, hi.source), (years, hi.year), (bases, hi.basis)):
            bucket[key] = bucket.get(key, 0.0) + facility
    if facility_kwh > 0:
        intensity = grams / facility_kwh
        mean_pue = facility_kwh / energy_kwh
    else:
        intensity = model.annual.g_per_kwh
        mean_pue = _nominal_pue(pue, energy_j_by_hour)
    annual = model.annual
    fields: dict[str, Any] = {
        "region": model.region,
        "intensity_g_per_kwh": round(intensity, 3),
        "source": _joined(sources) if sources else annual.source,
        "year": _joined(years) if years else annual.year,
        "basis": _joined(bases) if bases else annual.basis,
        "pue": round(mean_pue, 4) if mean_pue is not None else None,
        "licence": model.licence,
        "hourly_coverage": None,
        "fallback_hours": fallback_hours,
        "region_is_default": model.is_default_region,
        "grams_by_year": grams_by_year,
    }
    if model.hourly is not None:
        share = covered_kwh / facility_kwh if facility_kwh > 0 else 0.0
        fields["hourly_coverage"] = round(share, 4)
    if isinstance(pue, Mapping):
        fields["pue_by_month"] = dict(sorted(pue_used.items()))
    return grams, energy_kwh, facility_kwh, fields


def emissions(
    config,
    energy_j_by_hour: Mapping[int, float],
    gpu_hours: float = 0.0,
    node_hours: float = 0.0,
    *,
    model: IntensityModel | None = None,
    cache_dir: str | None = None,
    share_dir: str | None = None,
    resolved: Factors | None = None,
) -> Emissions:
    """Emissions of energy used over clock hours, under ``config``'s factors.

    Args:
        config: a :class:`llem.config.Config`: ``carbon`` gives region, intensity and PUE;
            ``embodied`` the embodied factors.
        energy_j_by_hour: UTC epoch second of each hour's start -> joules used in that hour.
        gpu_hours: GPU-hours of the use (number of GPUs x hours), for the embodied share.
        node_hours: node-hours of the use, for the embodied share.
        model: an already resolved IntensityModel (default: ``resolve(config, ...)``).
        resolved: already resolved factors (:func:`factors`); ``model`` is then ignored.
        cache_dir: directory of the online provider's cache, when one is configured.
        share_dir: a directory of tables instead of the shipped ones.

    Raises:
        ConfigError: an unknown region, a bad intensity file, a PUE month not covered.
        ValueError: a key that is not an hour start, or a negative energy.
    """
    if resolved is None:
        resolved = factors(
            config, model, hours=list(energy_j_by_hour), cache_dir=cache_dir, share_dir=share_dir
        )
    model = resolved.model
    grams, energy_kwh, facility_kwh, fields = operational(energy_j_by_hour, model, resolved.pue)
    embodied_grams, embodied_fields = embodied(resolved, gpu_hours, node_hours)
    fields["embodied"] = embodied_fields
    fields["notes"] = list(model.notes)
    grams_by_year = fields.pop("grams_by_year")
    return Emissions(
        co2e_g=grams + embodied_grams,
        operational_g=grams,
        embodied_g=embodied_grams,
        energy_kwh=energy_kwh,
        facility_energy_kwh=facility_kwh,
        carbon=fields,
        grams_by_year=grams_by_year,
    )
