"""CO2e of ``llem-acct``'s rows: the configured factors resolved once (:class:`Carbon`) and
applied to every row (:func:`add_carbon`). The carbon tables load only when a carbon figure
is shown.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llem.carbon.emissions import Factors


@dataclass(frozen=True)
class Carbon:
    """The configured emission factors (:class:`llem.carbon.Factors`), resolved once, and
    how ``llem-acct`` applies them to a row.

    When the intensity is one annual figure and the PUE a constant, every joule has the same
    factor and a row's emissions need only its total energy; otherwise the hourly energy of
    each row goes through :func:`llem.carbon.emissions`.

    Attributes:
        config: the configuration the factors come from.
        factors: the factors.
        info: the factors as the footer and the JSON ``carbon`` object name them.
    """

    config: Any
    factors: Factors
    info: dict = field(default_factory=dict)
    years_used: dict = field(default_factory=dict)
    """Data year label -> grams of CO2e priced with it, over the rows shown so far."""
    figures: dict = field(default_factory=dict)
    """Data year label -> the gCO2e/kWh of that label."""

    def years(self) -> str:
        """The data years the shown rows were priced with, most CO2e first (``2024; 2023``;
        ``2024 for 2025`` marks a year the table lacks, priced with the nearest earlier)."""
        if not self.years_used:
            return str(self.info["year"])
        return "; ".join(k for k, _ in sorted(self.years_used.items(), key=lambda kv: -kv[1]))

    @cached_property
    def constant(self) -> bool:
        """Whether a row's total energy is enough (the same factor in every hour)."""
        return self.factors.constant

    @cached_property
    def by_year_only(self) -> bool:
        """Whether the factor changes only with the year (a table region's figures, constant
        PUE, no hourly series): then a row inside one UTC year needs only its total."""
        f = self.factors
        return f.model.hourly is None and f.model.varies_by_year and not isinstance(f.pue, Mapping)

    def year_hour(self, row: Mapping) -> int | None:
        """An hour of the row's one UTC year (its start hour), or None when the row spans
        years (or has no start): such a row needs its energy by hour."""
        start_ns, end_ns = row.get("Start"), row.get("End")
        if not isinstance(start_ns, int):
            return None
        end_ns = end_ns if isinstance(end_ns, int) else time.time_ns()
        start_s, end_s = start_ns // 10**9, max(start_ns, end_ns) // 10**9
        if time.gmtime(start_s).tm_year != time.gmtime(end_s).tm_year:
            return None
        return start_s - start_s % 3600

    def grams(
        self,
        energy_j: float,
        gpu_hours: float,
        node_hours: float,
        energy_j_by_hour: Mapping[int, float] | None = None,
    ) -> tuple[float, float]:
        """(grams CO2e, grid gCO2e/kWh applied) of one row."""
        from llem.carbon.emissions import emissions, operational_g

        f = self.factors
        if self.constant or not energy_j_by_hour:
            g_per_kwh = f.model.annual.g_per_kwh
            grams = operational_g(energy_j, self._nominal_pue(energy_j_by_hour), g_per_kwh)
            self._count_year(f.model.annual.year, grams, g_per_kwh)
            return grams + f.embodied_g(gpu_hours, node_hours), g_per_kwh
        if self.by_year_only and len(energy_j_by_hour) == 1:
            ((hour, joules),) = energy_j_by_hour.items()
            hi = f.model.for_hour(hour)
            grams = operational_g(joules, f.pue, hi.g_per_kwh)
            self._count_year(hi.year, grams, hi.g_per_kwh)
            return grams + f.embodied_g(gpu_hours, node_hours), hi.g_per_kwh
        em = emissions(self.config, energy_j_by_hour, gpu_hours, node_hours, resolved=f)
        if f.model.hourly is None:
            for hour in energy_j_by_hour:
                hi = f.model.for_hour(hour)
                self.figures[hi.year] = hi.g_per_kwh
        for year, grams in em.grams_by_year.items():
            self._count_year(year, grams)
        return em.co2e_g, em.carbon["intensity_g_per_kwh"]

    def add_constant(self, rows: list[dict]) -> None:
        """:func:`add_carbon` when every hour has the same factor: what :meth:`grams` gives
        each row from its total energy, in one loop (no call per row)."""
        from llem.units import J_PER_KWH

        if not rows:
            return
        f = self.factors
        annual = f.model.annual
        g_per_kwh, pue, year = annual.g_per_kwh, f.pue, annual.year
        embodied = f.embodied_g if f.embodied_enabled else None
        used = self.years_used.get(year, 0.0)
        for row in rows:
            grams = row["ConsumedEnergy"] / J_PER_KWH * pue * g_per_kwh
            used += grams
            row["CO2e"] = grams + (
                0.0 if embodied is None else embodied(row["_gpu_hours"], row["_node_hours"])
            )
            row["CarbonIntensity"] = g_per_kwh
        self.years_used[year] = used
        self.figures[year] = g_per_kwh

    def constant_column(
        self, energy_j: list[float], gpu_hours: list[float], node_hours: list[float]
    ) -> tuple[list[float], float]:
        """:meth:`add_constant` by column: the CO2e of each run (same arithmetic, same order
        of the year's sum) and the factor, for rows held by column."""
        from llem.units import J_PER_KWH

        f = self.factors
        annual = f.model.annual
        g_per_kwh, pue, year = annual.g_per_kwh, f.pue, annual.year
        if not energy_j:
            return [], g_per_kwh
        grams = [e / J_PER_KWH * pue * g_per_kwh for e in energy_j]
        used = self.years_used.get(year, 0.0)
        for g in grams:
            used += g
        if f.embodied_enabled:
            embodied = f.embodied_g
            grams = [g + embodied(gh, nh) for g, gh, nh in zip(grams, gpu_hours, node_hours)]
        else:
            grams = [g + 0.0 for g in grams]
        self.years_used[year] = used
        self.figures[year] = g_per_kwh
        return grams, g_per_kwh

    def _count_year(self, year: str, grams: float, g_per_kwh: float | None = None) -> None:
        self.years_used[year] = self.years_used.get(year, 0.0) + grams
        if g_per_kwh is not None:
            self.figures[year] = g_per_kwh

    def intensity_text(self) -> str:
        """``344.14 gCO2e/kWh``, or the figure of each year used (``380.95 (2023), 344.14
        (2024) gCO2e/kWh``) when the rows were priced with several years' figures."""
        used = [y for y in self.years_used if y in self.figures]
        if len(used) <= 1 or len({self.figures[y] for y in used}) <= 1:
            return f"{self.info['intensity_g_per_kwh']:g} gCO2e/kWh"
        parts = [f"{self.figures[y]:g} ({y})" for y in sorted(used)]
        return ", ".join(parts) + " gCO2e/kWh"

    def _nominal_pue(self, energy_j_by_hour: Mapping[int, float] | None) -> float:
        """The PUE of the first hour's month (of this month when there is no hour)."""
        if self.constant:
            return self.factors.pue
        return self.factors.pue_of_month(
            time.strftime(
                "%Y-%m", time.gmtime(min(energy_j_by_hour) if energy_j_by_hour else time.time())
            )
        )

    def footer(self) -> str:
        """One line naming the intensity's source, year and the PUE."""
        i = self.info
        text = (
            f"CO2e: grid intensity {self.intensity_text()} ({i['source']}; "
            f"year {self.years()}; {i['basis']} basis; region {i['region']})"
        )
        if i.get("hourly_source"):
            text += f", hourly where available ({i['hourly_source']})"
        text += f"; PUE {i['pue']}"
        if i.get("embodied"):
            text += f"; embodied included ({i['embodied']})"
        return text + "."


def resolve_carbon(config) -> Carbon:
    """Resolve ``config``'s carbon factors (imports :mod:`llem.carbon` on first use).

    Raises:
        ConfigError: an unknown region or a bad intensity file.
    """
    from llem import carbon

    f = carbon.factors(config)
    model, pue, annual = f.model, f.pue, f.model.annual
    embodied_text = None
    if f.embodied_enabled:
        embodied_text = (
            f"{f.gpu_g_per_hour:.2f} g per GPU-hour, {f.node_g_per_hour:.2f} g per node-hour"
        )
    pue_text = (
        f"{float(pue):g}"
        if not isinstance(pue, Mapping)
        else "by month (" + ", ".join(f"{m}: {v:g}" for m, v in sorted(pue.items())) + ")"
    )
    info = {
        "region": model.region,
        "intensity_g_per_kwh": annual.g_per_kwh,
        "source": annual.source,
        "year": annual.year,
        "basis": annual.basis,
        "pue": pue_text if isinstance(pue, Mapping) else float(pue),
        "hourly_source": model.hourly.source if model.hourly is not None else None,
        "embodied": embodied_text,
        "region_is_default": model.is_default_region,
    }
    return Carbon(config=config, factors=f, info=info)


def add_carbon(
    rows: list[dict], carbon: Carbon | None, hourly: Mapping[Any, Mapping[int, float]] | None = None
) -> None:
    """Fill ``CO2e`` (grams) and ``CarbonIntensity`` of rows in place.

    Args:
        rows: raw rows.
        carbon: the factors; None leaves the fields empty.
        hourly: row ``_key`` -> joules per hour, needed only when the factors vary by hour.
    """
    if carbon is not None and carbon.constant:
        carbon.add_constant(rows)
        return
    for row in rows:
        if carbon is None:
            row["CO2e"] = row["CarbonIntensity"] = None
            continue
        by_hour = None
        year_hour = carbon.year_hour(row) if carbon.by_year_only else None
        if not carbon.constant:
            if row.get("_hour") is not None:
                by_hour = {row["_hour"]: row["ConsumedEnergy"]}
            elif year_hour is not None:
                by_hour = {year_hour: row["ConsumedEnergy"]}
            elif row.get("_key") is not None and hourly is not None:
                by_hour = hourly.get(row["_key"])
        row["CO2e"], row["CarbonIntensity"] = carbon.grams(
            row["ConsumedEnergy"], row["_gpu_hours"], row["_node_hours"], by_hour
        )
