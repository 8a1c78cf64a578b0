"""``llem carbon``: the grid carbon intensities llem ships, with their provenance.

Thin commands over :mod:`llem.carbon`: they parse, call the library and render. An unknown
region is a :class:`llem.errors.ConfigError`, which the main entry prints as ``Error: ...``
with exit status 1.
"""

from __future__ import annotations

import json

import click

from llem.carbon import tables
from llem.errors import ConfigError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def intensity_object(row: tables.AnnualIntensity) -> dict[str, object]:
    """A table row as JSON, with the field names of the ``carbon`` object of ``llem wrap``."""
    return {
        "region": row.region,
        "intensity_g_per_kwh": row.g_per_kwh,
        "source": row.source,
        "year": row.year,
        "basis": row.basis,
        "licence": row.licence,
        "name": row.name,
        "kind": row.kind,
        "aliases": list(row.aliases),
    }


@click.group("carbon", context_settings=CONTEXT_SETTINGS)
def carbon() -> None:
    """Grid carbon intensity: the shipped tables and where their figures come from."""


@carbon.command("intensity", context_settings=CONTEXT_SETTINGS)
@click.argument("region")
@click.option("--year", "-y", metavar="YEAR", help="Data year (default: the latest shipped).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def intensity(region: str, year: str | None, as_json: bool) -> None:
    """Show the annual intensity of REGION with its source, year, basis and licence.

    REGION is an ISO 3166-1 alpha-2 or alpha-3 country code (DE, DEU), a US state (US-CA), an
    eGRID subregion code, a Google Cloud region (gcp:europe-west1 or europe-west1), or WORLD;
    case does not matter. With --year, a year the tables lack gets the nearest earlier year's
    figure (as llem prices energy of that year), and says so.
    """
    row, note = _row_for(region, year)
    years = sorted(tables.rows_by_year(row.region))
    if as_json:
        obj = intensity_object(row)
        obj["requested_year"] = year
        obj["year_note"] = note
        obj["years"] = years
        click.echo(json.dumps(obj))
        return
    click.echo(f"{row.region} ({row.name}): {row.g_per_kwh:g} gCO2e/kWh")
    click.echo(f"  year:    {row.year}" + (f" ({note})" if note else ""))
    click.echo(f"  years:   {', '.join(str(y) for y in years) or row.year}")
    click.echo(f"  basis:   {row.basis}")
    click.echo(f"  source:  {row.source}")
    click.echo(f"  licence: {row.licence}")


def _row_for(region: str, year: str | None) -> tuple[tables.AnnualIntensity, str | None]:
    """The row for ``year`` (exact, else the nearest earlier shipped year, with a note)."""
    if year is None or not year.strip().isdigit():
        return tables.lookup(region, year), None
    wanted = int(year)
    by_year = tables.rows_by_year(region)
    if wanted in by_year:
        return by_year[wanted], None
    earlier = [y for y in by_year if y < wanted]
    if not earlier:
        if not by_year:
            return tables.lookup(region, year), None  # the table's own error
        first = min(by_year)
        code = by_year[first].region
        have = ", ".join(str(y) for y in sorted(by_year))
        raise ConfigError(
            f"no figure of {code} for {wanted} is available: the shipped sources carry {code} "
            f"for {have} only, and earlier years could not be sourced (share/carbon/SOURCES.md;"
            f" a site with the full Our World in Data export can add them with build_tables.py)."
            f" Energy used in {wanted} is priced with the {first} figure, shown as "
            f"'{first} for {wanted}'."
        )
    used = max(earlier)
    return by_year[used], (
        f"{wanted} not shipped: nearest earlier year {used}, as llem prices energy used in {wanted}"
    )


@carbon.command("regions", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def regions(as_json: bool) -> None:
    """List every shipped region with its intensity, year, basis and source."""
    rows = tables.load_tables()
    if as_json:
        click.echo(json.dumps([intensity_object(r) for r in rows]))
        return
    click.echo(f"{'REGION':<28} {'gCO2e/kWh':>10}  {'YEAR':<9}  {'BASIS':<9}  NAME")
    for r in rows:
        click.echo(f"{r.region:<28} {r.g_per_kwh:>10g}  {r.year:<9}  {r.basis:<9}  {r.name}")
    click.echo("")
    click.echo("Sources (share/carbon/SOURCES.md has the details):")
    seen: dict[tuple[str, str, str], int] = {}
    for r in rows:
        key = (r.kind, r.source, r.licence)
        seen[key] = seen.get(key, 0) + 1
    for (kind, source, licence), count in seen.items():
        click.echo(f"  {count:>3} {kind} row(s): {source}; licence: {licence}")
    if not any(r.kind == "eGRID subregion" for r in rows):
        click.echo("  eGRID subregions: not shipped (no honest offline source; see SOURCES.md)")
