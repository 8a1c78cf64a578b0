"""``llem carbon``: the grid carbon intensities llem ships, with their provenance.

Thin commands over :mod:`llem.carbon`: they parse, call the library and render. An unknown
region is a :class:`llem.errors.ConfigError`, which the main entry prints as ``Error: ...``
with exit status 1.
"""

from __future__ import annotations

import json

import click

from llem.carbon import tables

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
    case does not matter.
    """
    row = tables.lookup(region, year)
    if as_json:
        click.echo(json.dumps(intensity_object(row)))
        return
    click.echo(f"{row.region} ({row.name}): {row.g_per_kwh:g} gCO2e/kWh")
    click.echo(f"  year:    {row.year}")
    click.echo(f"  basis:   {row.basis}")
    click.echo(f"  source:  {row.source}")
    click.echo(f"  licence: {row.licence}")


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
