"""The shipped annual intensity tables (``share/carbon/*.csv``) and region look-up.

Tables are read with the csv module on first use and kept per directory. A region is looked
up by its code, case-insensitively: ISO 3166-1 alpha-2 or alpha-3, ``US-XX``, an eGRID
subregion code, ``gcp:<region>`` or a bare Google Cloud region name, or ``WORLD``.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llem.errors import ConfigError

TABLE_FILES = (
    ("countries.csv", "country"),
    ("us_states.csv", "US state"),
    ("egrid_subregions.csv", "eGRID subregion"),
    ("cloud_regions.csv", "cloud region"),
    ("world.csv", "world"),
)
COLUMNS = ("region", "aliases", "name", "g_co2e_per_kwh", "year", "basis", "source", "licence")
BASES = ("lifecycle", "direct")
WORLD = "WORLD"

# Codes only (never figures): recognised so that a missing table is reported as missing,
# not as an unknown region. See share/carbon/SOURCES.md.
EGRID_SUBREGIONS = (
    "AKGD", "AKMS", "AZNM", "CAMX", "ERCT", "FRCC", "HIMS", "HIOA", "MROE", "MROW", "NEWE",
    "NWPP", "NYCW", "NYLI", "NYUP", "PRMS", "RFCE", "RFCM", "RFCW", "RMPA", "SPNO", "SPSO",
    "SRMV", "SRMW", "SRSO", "SRTV", "SRVC",
)  # fmt: skip


@dataclass(frozen=True)
class AnnualIntensity:
    """One row of a shipped table: an annual average intensity with its provenance.

    Attributes:
        region: canonical code (``FR``, ``US-CA``, ``gcp:europe-west1``, ``WORLD``).
        name: human-readable name.
        g_per_kwh: grams CO2e per kWh of electricity.
        year: data year, or a span ``YYYY-YYYY`` for rows derived from several years.
        basis: ``lifecycle`` or ``direct``.
        source: where the figure comes from.
        licence: the licence of the data.
        kind: which table the row is from (``country``, ``US state``, ...).
        aliases: other accepted codes (alpha-3, bare cloud region name).
    """

    region: str
    name: str
    g_per_kwh: float
    year: str
    basis: str
    source: str
    licence: str
    kind: str
    aliases: tuple[str, ...] = ()


def share_dir() -> Path | None:
    """``$LLEM_SHARE_DIR/carbon`` (or ``$LLEM_SHARE_DIR`` itself) when set, else None."""
    override = os.environ.get("LLEM_SHARE_DIR")
    if not override:
        return None
    base = Path(override)
    return base / "carbon" if (base / "carbon").is_dir() else base


def _read_text(name: str, directory: str | None) -> tuple[str, str] | None:
    """(text, where) of a table file, or None when it does not exist.

    A file in ``directory`` takes the place of the shipped file of the same name; the other
    shipped files stay in use (so a site can add ``egrid_subregions.csv`` alone).
    """
    if directory is not None:
        path = Path(directory) / name
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
    from importlib.resources import files  # only when tables are really needed

    resource = files("llem.share.carbon").joinpath(name)
    if not resource.is_file():
        return None
    return resource.read_text(encoding="utf-8"), f"llem.share.carbon/{name}"


def parse_table(text: str, where: str, kind: str) -> list[AnnualIntensity]:
    """Parse one table's CSV text, checking every row.

    Raises:
        ConfigError: a missing column, a bad figure, or a basis other than lifecycle/direct.
    """
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ConfigError(f"{where}: missing column(s) {', '.join(missing)}")
    rows = []
    for rec in reader:
        line = reader.line_num
        try:
            g = float(rec["g_co2e_per_kwh"])
        except ValueError:
            raise ConfigError(
                f"{where}, line {line}: bad g_co2e_per_kwh {rec['g_co2e_per_kwh']!r}"
            ) from None
        if not 0 <= g < 5000 or rec["basis"] not in BASES or not rec["region"]:
            raise ConfigError(f"{where}, line {line}: bad row {rec}")
        rows.append(
            AnnualIntensity(
                region=rec["region"],
                name=rec["name"],
                g_per_kwh=g,
                year=rec["year"],
                basis=rec["basis"],
                source=rec["source"],
                licence=rec["licence"],
                kind=kind,
                aliases=tuple(a for a in rec["aliases"].split() if a),
            )
        )
    return rows


@functools.lru_cache(maxsize=4)
def _load(directory: str | None) -> tuple[AnnualIntensity, ...]:
    rows: list[AnnualIntensity] = []
    for name, kind in TABLE_FILES:
        found = _read_text(name, directory)
        if found is not None:
            rows += parse_table(found[0], found[1], kind)
    return tuple(rows)


def load_tables(directory: str | os.PathLike | None = None) -> tuple[AnnualIntensity, ...]:
    """Every row; files in ``directory`` (or ``$LLEM_SHARE_DIR``) replace shipped ones."""
    if directory is None:
        override = share_dir()
        directory = str(override) if override else None
    return _load(None if directory is None else str(directory))


def _index(rows: Iterable[AnnualIntensity]) -> dict[str, list[AnnualIntensity]]:
    index: dict[str, list[AnnualIntensity]] = {}
    for row in rows:
        for code in (row.region, *row.aliases):
            index.setdefault(code.upper(), []).append(row)
    return index


def lookup(
    region: str, year: str | int | None = None, directory: str | os.PathLike | None = None
) -> AnnualIntensity:
    """The annual figure of a region: the given year's row, else the latest one.

    Args:
        region: any accepted code, case-insensitive.
        year: a data year (``2023``) or span as written in the table; None for the latest.
        directory: a directory whose tables replace the shipped ones of the same name.

    Raises:
        ConfigError: the region is unknown (with close matches), has no shipped figure (eGRID
            subregions), or has no row for ``year``.
    """
    code = region.strip().upper()
    rows = _index(load_tables(directory)).get(code)
    if not rows:
        raise _unknown_region(region, directory)
    if year is None:
        return max(rows, key=lambda r: r.year)
    wanted = str(year).strip()
    for row in rows:
        if row.year == wanted:
            return row
    have = ", ".join(sorted({r.year for r in rows}))
    raise ConfigError(f"region '{rows[0].region}' has no figure for year {wanted} (have: {have})")


def first_year(row: AnnualIntensity) -> int | None:
    """The row's data year as a number (the first of a span ``2021-2023``), or None."""
    head = row.year.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def rows_by_year(
    region: str, directory: str | os.PathLike | None = None
) -> dict[int, AnnualIntensity]:
    """Every shipped year of a region: data year -> row (a span counts as its first year).

    Raises:
        ConfigError: the region is unknown.
    """
    rows = _index(load_tables(directory)).get(region.strip().upper())
    if not rows:
        raise _unknown_region(region, directory)
    out: dict[int, AnnualIntensity] = {}
    for row in rows:
        year = first_year(row)
        if year is not None:
            out.setdefault(year, row)
    return out


def _unknown_region(region: str, directory: str | os.PathLike | None) -> ConfigError:
    code = region.strip().upper()
    if code in EGRID_SUBREGIONS:
        return ConfigError(
            f"eGRID subregion '{code}' is recognised but llem ships no figure for it (see "
            "share/carbon/SOURCES.md: add egrid_subregions.csv from EPA's eGRID workbook), "
            "or set carbon.intensity_g_per_kwh, or use the US state (e.g. 'US-CA')"
        )
    rows = load_tables(directory)
    names = {}
    for row in rows:
        for code_ in (row.region, *row.aliases):
            names[code_.upper()] = code_
        names[row.name.upper()] = row.region
    near = difflib.get_close_matches(code, list(names), n=5, cutoff=0.6)
    suggestions = list(dict.fromkeys(names[n] for n in near))
    hint = f"; close matches: {', '.join(suggestions)}" if suggestions else ""
    return ConfigError(
        f"unknown carbon region '{region}'{hint} (codes: ISO 3166-1 alpha-2 or alpha-3, US-XX, "
        "gcp:<region>; 'llem carbon regions' lists them)"
    )


def world(directory: str | os.PathLike | None = None) -> AnnualIntensity:
    """The default used when no region is configured: the world row."""
    return lookup(WORLD, directory=directory)
