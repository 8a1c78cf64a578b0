"""``llem history``: the Python API's windows measured outside Slurm on this machine."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import click

from llem.errors import LlemError
from llem.safetext import safe_text
from llem.units import format_energy_j

COMPONENT_NAMES = {"cpu": "CPU", "dram": "DRAM", "gpu": "GPU", "platform": "platform"}


def _epoch_s(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def select(
    entries: list[dict], name: str | None, since_s: float | None, last: int | None
) -> list[dict]:
    """The entries of ``name`` (all when None) that started after ``since_s``, the last
    ``last`` of them."""
    out = [
        e
        for e in entries
        if (name is None or e.get("name") == name)
        and (since_s is None or (_epoch_s(e.get("start")) or 0) >= since_s)
    ]
    return out[-last:] if last else out


def render_table(entries: list[dict]) -> str:
    header = (
        f"{'Start':<19} {'Name':<16} {'Duration':>9} {'Energy':>12} {'Source':<9} "
        f"{'Cov':>4} {'Work':>10} {'J/unit':>10} {'CO2e g':>9}"
    )
    lines = [header, "-" * len(header)]
    for e in entries:
        start = _epoch_s(e.get("start"))
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)) if start else "Unknown"
        cov = e.get("coverage")
        work = e.get("work")
        per = e.get("energy_per_unit_j")
        co2e = e.get("co2e_g")
        name = (e.get("name") or "")[:16]
        lines.append(
            f"{when:<19} {name:<16} {e['duration_s']:>8.1f}s "
            f"{format_energy_j(e['energy_j']):>12} {(e.get('source') or 'none'):<9} "
            f"{'' if cov is None else f'{cov * 100:.0f}%':>4} "
            f"{'' if work is None else f'{work:.4g}':>10} "
            f"{'' if per is None else f'{per:.4g}':>10} "
            f"{'' if co2e is None else f'{co2e:.3f}':>9}"
        )
    return "\n".join(safe_text(line) for line in lines) + "\n"


def counted_shares(entries: list[dict]) -> list[float]:
    """The share of each entry's energy a total may add: outside Slurm every window sees the
    whole node, so the time a window shares with windows counted before it (nested windows,
    the windows of other processes or ranks at the same time) is counted once. An entry's
    energy is taken as spread evenly over its span."""
    spans = []
    for e in entries:
        start = _epoch_s(e.get("start"))
        end = _epoch_s(e.get("end"))
        spans.append(None if start is None or end is None or end <= start else (start, end))
    order = sorted(
        range(len(entries)),
        key=lambda i: (spans[i] is None, -(spans[i][1] - spans[i][0]) if spans[i] else 0),
    )
    covered: list[tuple[float, float]] = []
    shares = [1.0] * len(entries)
    for i in order:  # the longest first: an outer window counts whole, the inner ones not
        if spans[i] is None:
            continue
        start, end = spans[i]
        overlap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in covered)
        shares[i] = max(0.0, 1.0 - overlap / (end - start))
        covered = _union(covered + [(start, end)])
    return shares


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def statement_text(entries: list[dict], config) -> str:
    """The citable paragraph (``llem.carbon.statement``) over the selected windows, the
    time windows share counted once (:func:`counted_shares`)."""
    from llem import carbon
    from llem.units import NS_PER_S, split_by_hour

    shares = counted_shares(entries)
    by_component: dict[str, float] = {}
    measured = estimated = 0.0
    by_hour: dict[int, float] = {}
    devices: set[tuple[str, str]] = set()
    gpu_hours = node_hours = 0.0
    for e, share in zip(entries, shares):
        hours = e["duration_s"] / 3600 * share
        node_hours += hours
        start = _epoch_s(e.get("start")) or 0.0
        end = _epoch_s(e.get("end")) or start
        for c in e["components"]:
            if c.get("component") == "psys":
                continue
            joules = float(c.get("energy_j") or 0.0) * share
            label = COMPONENT_NAMES.get(c.get("component"), "other")
            by_component[label] = by_component.get(label, 0.0) + joules
            if c.get("source") == "estimated":
                estimated += joules
            else:
                measured += joules
            devices.add((str(c.get("component")), str(c.get("device"))))
            if c.get("component") == "gpu":
                gpu_hours += hours
            for hour, uj in split_by_hour(
                int(start * NS_PER_S), int(end * NS_PER_S), int(joules * 1e6)
            ).items():
                by_hour[hour] = by_hour.get(hour, 0.0) + uj / 1e6
    if not by_hour:
        raise LlemError("no energy in the selected windows: nothing to state")
    em = carbon.emissions(config, by_hour, gpu_hours=gpu_hours, node_hours=node_hours)
    kinds: dict[str, int] = {}
    for component, _ in devices:
        kinds[component] = kinds.get(component, 0) + 1
    hardware = "this machine (" + ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) + ")"
    names = sorted({e.get("name") or "window" for e in entries})
    subject = f"The {len(entries)} measured window(s) ({', '.join(names)})"
    text = carbon.statement(
        energy_j_by_component=by_component,
        measured_j=measured,
        estimated_j=estimated,
        hardware=hardware,
        co2e_g=em.co2e_g,
        operational_g=em.operational_g,
        embodied_g=em.embodied_g,
        carbon=em.carbon,
        subject=subject,
    )
    if any(share < 0.999 for share in shares):
        text += (
            " Windows that ran at the same time (nested, or in parallel processes) measured "
            "the same node: their shared time is counted once."
        )
    work = [e for e in entries if e.get("work")]
    units = {e.get("unit") for e in work}
    if work and len(units) == 1:
        total_work = sum(e["work"] for e in work)
        total_j = sum(e["energy_j"] * sh for e, sh in zip(entries, shares) if e.get("work"))
        text += (
            f" The work was {total_work:,.6g} {units.pop()}: {total_j / total_work:.4g} J "
            "per unit, whole-node energy."
        )
    return safe_text(text)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", "-n", help="Only the windows of this name.")
@click.option("--since", help="Only windows that started within this long: 30d, 12h, 90m.")
@click.option("--last", type=click.IntRange(min=1), help="Only the last N windows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, as recorded.")
@click.option("--statement", is_flag=True, help="A citable paragraph over the selected windows.")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The history file (default: $LLEM_HISTORY or ~/.local/share/llem/history.jsonl).",
)
def history(
    name: str | None,
    since: str | None,
    last: int | None,
    as_json: bool,
    statement: bool,
    path: Path | None,
) -> None:
    """List the windows the Python API measured outside Slurm on this machine.

    Each ``llem.window`` closed outside a Slurm job is appended to a history file of the
    user's own; inside a job the windows go to the cluster's ledger instead (llem-acct).

    \b
    Examples:
      llem history --last 20
      llem history --name train --since 7d --statement
    """
    from llem import history as history_mod

    since_s = None
    if since is not None:
        from llem.acct.errors import AcctUsageError
        from llem.acct.options import parse_since

        try:
            since_s = time.time() - parse_since(since).total_seconds()
        except AcctUsageError as e:
            raise click.BadParameter(str(e), param_hint="--since") from None
    entries, damaged = history_mod.read(path)
    chosen = select(entries, name, since_s, last)
    if damaged:
        click.echo(f"llem history: {damaged} damaged line(s) skipped", err=True)
    if statement:
        from llem import config as config_mod

        click.echo(statement_text(chosen, config_mod.load()))
        return
    if as_json:
        for e in chosen:
            click.echo(json.dumps(e))
        return
    if not chosen:
        where = path or history_mod.history_path()
        click.echo(f"llem history: no windows recorded in {safe_text(str(where))}", err=True)
        return
    click.echo(render_table(chosen), nl=False)
