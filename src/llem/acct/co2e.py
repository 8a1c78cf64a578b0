"""CO2e of ``llem-acct``'s rows: the configured factors resolved once (:class:`Carbon`) and
applied to every row (:func:`add_carbon`). The carbon tables load only when a carbon figure
is shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from llem.units import J_PER_KWH


@dataclass
class Carbon:
    """The configured emission factors, resolved once, and how to apply them fast.

    When the intensity is one annual figure and the PUE a constant, every joule has the same
    factor and a row's emissions need only its total energy; otherwise the hourly energy of
    each row goes through :func:`llem.carbon.emissions`.
    """

    config: Any
    model: Any
    constant: bool
    g_per_kwh: float
    pue: Any
    gpu_g_per_hour: float = 0.0
    node_g_per_hour: float = 0.0
    info: dict = field(default_factory=dict)

    def grams(self, energy_j: float, gpu_hours: float, node_hours: float,
              energy_j_by_hour: Mapping[int, float] | None = None) -> tuple[float, float]:
        """(grams CO2e, grid gCO2e/kWh applied) of one row."""
        if self.constant or not energy_j_by_hour:
            pue = self.pue if self.constant else self._nominal_pue(energy_j_by_hour)
            grams = energy_j / J_PER_KWH * pue * self.g_per_kwh
            return grams + gpu_hours * self.gpu_g_per_hour + \
                node_hours * self.node_g_per_hour, self.g_per_kwh
        from llem import carbon

        em = carbon.emissions(self.config, energy_j_by_hour, gpu_hours, node_hours,
                              model=self.model)
        return em.co2e_g, em.carbon["intensity_g_per_kwh"]

    def _nominal_pue(self, energy_j_by_hour: Mapping[int, float] | None) -> float:
        from llem import carbon

        if not isinstance(self.pue, Mapping):
            return float(self.pue)
        return carbon.pue_for_month(self.pue, time.strftime("%Y-%m", time.gmtime(
            min(energy_j_by_hour) if energy_j_by_hour else time.time())))

    def footer(self) -> str:
        """One line naming the intensity's source, year and the PUE."""
        i = self.info
        text = (f"CO2e: grid intensity {i['intensity_g_per_kwh']:g} gCO2e/kWh ({i['source']}; "
                f"year {i['year']}; {i['basis']} basis; region {i['region']})")
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
    from collections.abc import Mapping as _Mapping

    from llem import carbon
    from llem.carbon.emissions import embodied_g_per_hour

    model = carbon.resolve(config)
    pue = config.carbon.pue
    constant = model.hourly is None and not isinstance(pue, _Mapping)
    annual = model.annual
    emb = config.embodied
    gpu_rate = node_rate = 0.0
    embodied_text = None
    if emb.enabled:
        gpu_rate = embodied_g_per_hour(emb.gpu_kgco2e, emb.gpu_lifetime_years)
        node_rate = embodied_g_per_hour(emb.node_kgco2e, emb.node_lifetime_years)
        embodied_text = f"{gpu_rate:.2f} g per GPU-hour, {node_rate:.2f} g per node-hour"
    pue_text = (f"{float(pue):g}" if not isinstance(pue, _Mapping) else
                "by month (" + ", ".join(f"{m}: {v:g}" for m, v in sorted(pue.items())) + ")")
    info = {
        "region": model.region, "intensity_g_per_kwh": annual.g_per_kwh,
        "source": annual.source, "year": annual.year, "basis": annual.basis,
        "pue": pue_text if isinstance(pue, _Mapping) else float(pue),
        "hourly_source": model.hourly.source if model.hourly is not None else None,
        "embodied": embodied_text, "region_is_default": model.is_default_region,
    }
    return Carbon(config=config, model=model, constant=constant, g_per_kwh=annual.g_per_kwh,
                  pue=pue, gpu_g_per_hour=gpu_rate, node_g_per_hour=node_rate, info=info)



def add_carbon(rows: list[dict], carbon: Carbon | None,
               hourly: Mapping[Any, Mapping[int, float]] | None = None) -> None:
    """Fill ``CO2e`` (grams) and ``CarbonIntensity`` of rows in place.

    Args:
        rows: raw rows.
        carbon: the factors; None leaves the fields empty.
        hourly: row ``_key`` -> joules per hour, needed only when the factors vary by hour.
    """
    for row in rows:
        if carbon is None:
            row["CO2e"] = row["CarbonIntensity"] = None
            continue
        by_hour = None
        if not carbon.constant:
            if row.get("_key") is not None and hourly is not None:
                by_hour = hourly.get(row["_key"])
            elif row.get("_hour") is not None:
                by_hour = {row["_hour"]: row["ConsumedEnergy"]}
        row["CO2e"], row["CarbonIntensity"] = carbon.grams(
            row["ConsumedEnergy"], row["_gpu_hours"], row["_node_hours"], by_hour)

