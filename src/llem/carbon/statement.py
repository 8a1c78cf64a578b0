"""A short, citable paragraph on the energy and emissions of some computations.

Pure: aggregate numbers in, text out. Units are spelt out (kWh, MJ, gCO2e or kgCO2e per the
figure's size), and the paragraph says how much energy was measured and how much estimated,
which intensity (source, year, basis, region) and which PUE produced the emissions, and how
to cite llem. The text of :func:`how_to_cite` matches ``CITATION.cff``.
"""

from __future__ import annotations

from collections.abc import Mapping

from llem import __version__
from llem.units import J_PER_KWH

CITATION_TITLE = "llem: energy and carbon accounting for Slurm clusters"
CITATION_AUTHOR = "llem developers"
CITATION_YEAR = 2026
CITATION_LICENSE = "Apache-2.0"
CITATION_BIBTEX = f"""@software{{llem,
  author  = {{{{{CITATION_AUTHOR}}}}},
  title   = {{{{{CITATION_TITLE}}}}},
  version = {{{__version__}}},
  year    = {{{CITATION_YEAR}}},
  license = {{{CITATION_LICENSE}}}
}}"""

SHARE_TOLERANCE = 0.005  # measured + estimated may differ from the total by 0.5 % (rounding)


def format_kwh(energy_kwh: float) -> str:
    """``12.346 kWh (44.44 MJ)``: kWh with the SI energy unit beside it."""
    return f"{energy_kwh:,.3f} kWh ({energy_kwh * 3.6:,.2f} MJ)"


def format_co2e(grams: float) -> str:
    """``1.234 kgCO2e`` from 1 kg up, else ``123.4 gCO2e``."""
    if grams >= 1000:
        return f"{grams / 1000:,.3f} kgCO2e"
    return f"{grams:,.1f} gCO2e"


def how_to_cite(version: str = __version__) -> str:
    """How to cite llem: one sentence and the BibTeX entry (as in CITATION.cff)."""
    bibtex = CITATION_BIBTEX.replace(f"version = {{{__version__}}}", f"version = {{{version}}}")
    return (
        f"Please cite llem as: {CITATION_AUTHOR} ({CITATION_YEAR}). {CITATION_TITLE}, version "
        f"{version}. Software, {CITATION_LICENSE}.\n\n{bibtex}"
    )


def statement(
    *,
    energy_j_by_component: Mapping[str, float],
    measured_j: float,
    estimated_j: float,
    hardware: str,
    co2e_g: float,
    operational_g: float,
    embodied_g: float,
    carbon: Mapping[str, object],
    subject: str = "The computations",
    version: str = __version__,
) -> str:
    """The paragraph.

    Args:
        energy_j_by_component: joules per component, e.g. ``{"GPU": ..., "CPU": ...}``; the
            total energy is their sum.
        measured_j: joules read from hardware energy counters (NVML, RAPL).
        estimated_j: joules estimated from a model (TDP and utilisation).
        hardware: a description, e.g. ``"4 x NVIDIA A100-SXM4-80GB, 2 x AMD EPYC 7763"``.
        co2e_g: operational plus embodied emissions, grams CO2e.
        operational_g: operational emissions, grams CO2e.
        embodied_g: embodied emissions, grams CO2e (0 when not included).
        carbon: the factors, as in :attr:`llem.carbon.Emissions.carbon`: ``region``,
            ``intensity_g_per_kwh``, ``source``, ``year``, ``basis``, ``pue``, and optionally
            ``fallback_hours``, ``hourly_coverage``, ``region_is_default``, ``embodied``.
        subject: what is described, e.g. ``"The 42 jobs of project X in March 2025"``.
        version: the llem version to name.

    Raises:
        ValueError: negative figures, or measured + estimated not equal to the total.
    """
    total_j = float(sum(energy_j_by_component.values()))
    if min([total_j, measured_j, estimated_j, *energy_j_by_component.values()]) < 0:
        raise ValueError("energy figures may not be negative")
    if abs(measured_j + estimated_j - total_j) > SHARE_TOLERANCE * max(total_j, 1.0):
        raise ValueError(
            f"measured ({measured_j} J) + estimated ({estimated_j} J) != total ({total_j} J)"
        )
    total_kwh = total_j / J_PER_KWH
    parts = ", ".join(
        f"{name} {energy_j / J_PER_KWH:,.3f} kWh"
        for name, energy_j in energy_j_by_component.items()
    )
    measured_pct = 100.0 * measured_j / total_j if total_j else 0.0
    estimated_pct = 100.0 * estimated_j / total_j if total_j else 0.0
    sentences = [
        (
            f"{subject} used {format_kwh(total_kwh)} of electricity at the hardware ({parts}) on "
            f"{hardware}, as accounted by llem {version}."
        ),
        (
            f"Of this energy, {measured_pct:.1f} % was measured with hardware energy counters "
            f"(NVML, RAPL) and {estimated_pct:.1f} % was estimated from a power model (TDP and "
            "utilisation)."
        ),
        f"With a power usage effectiveness (PUE) of {_pue(carbon.get('pue'))} and a grid carbon "
        f"intensity of {float(carbon['intensity_g_per_kwh']):,.1f} gCO2e/kWh "
        f"({carbon['source']}; data year {carbon['year']}; {carbon['basis']} basis; region "
        f"{carbon['region']}), this corresponds to {format_co2e(operational_g)} of operational "
        "emissions" + _embodied(embodied_g, co2e_g, carbon) + ".",
    ]
    fallback = int(carbon.get("fallback_hours") or 0)
    if fallback:
        sentences.append(
            f"For {fallback} hour(s) not covered by the hourly intensity series the annual "
            "figure was used."
        )
    if carbon.get("region_is_default"):
        sentences.append(
            "No grid region was configured, so a world-average intensity was used; the "
            "figure is indicative only."
        )
    sentences.append(
        f"Energy and emissions were accounted with llem ({CITATION_AUTHOR}, {CITATION_YEAR})."
    )
    return " ".join(sentences)


def _pue(pue: object) -> str:
    return "n/a" if pue is None else f"{float(pue):.2f}"


def _embodied(embodied_g: float, co2e_g: float, carbon: Mapping[str, object]) -> str:
    if not embodied_g:
        return ""
    detail = carbon.get("embodied") or {}
    rates = ""
    if isinstance(detail, Mapping) and "gpu_g_per_hour" in detail:
        rates = (
            f" ({float(detail['gpu_g_per_hour']):.2f} gCO2e per GPU-hour, "
            f"{float(detail['node_g_per_hour']):.2f} gCO2e per node-hour)"
        )
    return (
        f", plus {format_co2e(embodied_g)} of embodied (manufacturing) emissions{rates}, "
        f"{format_co2e(co2e_g)} in total"
    )
