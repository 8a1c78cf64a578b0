"""Carbon accounting: intensity data with provenance, hourly series, PUE, embodied emissions.

The public API that the rest of llem calls::

    from llem import carbon

    model = carbon.resolve(config)                 # raises ConfigError for an unknown region
    model.for_hour(hour_start_utc)                 # -> HourIntensity(g_per_kwh, source, ...)
    result = carbon.emissions(config, {hour_start_utc: energy_j, ...}, gpu_hours=8.0)
    f = carbon.factors(config)                     # the factors, resolved once (Factors)
    result.co2e_g, result.carbon                   # grams CO2e; the factors used
    carbon.lookup("DE")                            # a shipped annual figure
    carbon.statement(...)                          # a citable paragraph

Only the standard library is imported here; the online providers (urllib) load on first use.
"""

from llem.carbon.emissions import (
    Emissions,
    Factors,
    embodied_g_per_hour,
    emissions,
    factors,
    operational,
    operational_g,
    pue_for_month,
)
from llem.carbon.hourly import (
    HourlySeries,
    energy_by_hour,
    hour_start,
    parse_hourly,
    read_hourly_file,
)
from llem.carbon.intensity import HourIntensity, IntensityModel, resolve
from llem.carbon.statement import CITATION_BIBTEX, how_to_cite, statement
from llem.carbon.tables import AnnualIntensity, load_tables, lookup

__all__ = [
    "CITATION_BIBTEX",
    "AnnualIntensity",
    "Emissions",
    "Factors",
    "HourIntensity",
    "HourlySeries",
    "IntensityModel",
    "embodied_g_per_hour",
    "emissions",
    "energy_by_hour",
    "factors",
    "hour_start",
    "how_to_cite",
    "load_tables",
    "lookup",
    "operational",
    "operational_g",
    "parse_hourly",
    "pue_for_month",
    "read_hourly_file",
    "resolve",
    "statement",
]
