"""``llem wrap [--name NAME] [--json] [--output FILE] -- CMD ...``"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from llem import config as config_mod
from llem.errors import LlemError
from llem.safetext import safe_text
from llem.sampler import Sampler
from llem.sensors import open_sensors
from llem.units import format_energy_j
from llem.wrap import (
    Accumulator,
    ChildRunner,
    accumulator_of_window,
    add_work,
    carbon_for,
    exit_status,
    result,
    run_sampler_thread,
)


def render_summary(res: dict) -> str:
    name = f"'{res['name']}'" if res["name"] else "command"
    lines = [
        f"llem: {name} ran {res['duration_s']:.2f} s, exit status {res['exit_code']}",
    ]
    if not res["components"]:
        lines.append("  no energy data: no sensor could be opened (see 'llem doctor')")
    else:
        power = res["average_power_w"]
        power_s = f", average {power:.1f} W" if power is not None else ""
        lines.append(
            f"  energy {format_energy_j(res['energy_j'])}{power_s} ({res['source']}; "
            + (
                "the job's attributed share of the node)"
                if res["scope"] == "job"
                else "whole node while the command ran, not only the command)"
            )
        )
        width = max(len(c["device"]) for c in res["components"])
        for c in res["components"]:
            how = f"{c['source']}, {c['sensor']} {c['method'].replace('_', ' ')}"
            extra = "  (not added: overlaps others)" if c["component"] == "psys" else ""
            if c.get("package_split"):  # an MI250X die, an MI300X partition
                extra = f"  ({c['package_split']['share']} of its package, which only "
                extra += f"{', '.join(c['package_split']['reporting'])} reports)"
            lines.append(
                f"  {c['component']:<4} {c['device']:<{width}} {format_energy_j(c['energy_j']):>12}"
                f"  {how}, coverage {c['coverage'] * 100:.0f}%{extra}"
            )
    lines.extend(work_lines(res))
    carbon = res["carbon"]
    if res["co2e_g"] is None:
        lines.append(f"  CO2e n/a: {carbon.get('reason', 'no intensity')}")
    else:
        embodied = carbon.get("embodied") or {}
        extra = ", embodied included" if embodied.get("enabled") else ""
        lines.append(
            f"  CO2e {res['co2e_g']:.3f} g at {carbon['intensity_g_per_kwh']:.1f} gCO2e/kWh "
            f"(region {carbon['region']}: {carbon['source']}, {carbon['year']}, "
            f"{carbon['basis']}), PUE {carbon['pue']}{extra}"
        )
    for event in res["events"]:
        lines.append(f"  event: {event['kind']} {event['device'] or ''} {event['detail']}".rstrip())
    for note in res["notes"]:
        lines.append(f"  note: {note}")
    # The window name, the command and texts from the node sampler are not ours: made safe.
    return "\n".join(safe_text(line) for line in lines)


def work_lines(res: dict) -> list[str]:
    """The summary's line on the work and the energy per unit, when work was given."""
    if res.get("work") is None:
        return []
    unit = res.get("unit") or "units"
    line = f"  work {res['work']:.6g} {unit}"
    if res.get("energy_per_unit_j") is not None:
        scope = "the job's share" if res["scope"] == "job" else "whole node"
        line += (
            f": {format_per_unit(res['energy_per_unit_j'])} per {singular(unit)} "
            f"({scope}, {res['per_unit_basis']})"
        )
        if res.get("gpu_energy_per_unit_j") is not None:
            line += f", GPUs only {format_per_unit(res['gpu_energy_per_unit_j'])}"
        if res.get("co2e_per_unit_g") is not None:
            line += f", {res['co2e_per_unit_g']:.4g} gCO2e per {singular(unit)}"
    return [line]


def format_per_unit(joules: float) -> str:
    """``0.412 J``, ``3.1 mJ``, ``12.5 kJ``: joules per unit with an SI prefix."""
    for factor, prefix in ((1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u")):
        if abs(joules) >= factor:
            return f"{joules / factor:.4g} {prefix}J"
    return f"{joules:.3g} J"


def singular(unit: str) -> str:
    """``tokens`` -> ``token`` (the plural an English unit most often has), else as is."""
    return unit[:-1] if len(unit) > 3 and unit.endswith("s") and not unit.endswith("ss") else unit


def _emit(res: dict, as_json: bool, output: Path | None, quiet: bool) -> None:
    if not quiet:
        click.echo(render_summary(res), err=True)
    text = json.dumps(res)
    if output is not None:
        _write_output(output, text + "\n")
    if as_json:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _job_window(
    ctx: click.Context,
    config: config_mod.Config,
    path: Path,
    window: dict,
    name: str | None,
    as_json: bool,
    output: Path | None,
    quiet: bool,
    command: tuple[str, ...],
    work: _Work,
) -> None:
    """Run CMD inside a named window that the node sampler keeps for this job."""
    from llem.node.windows import WindowError, close_window

    runner = ChildRunner(command)
    t0 = time.monotonic()
    try:
        runner.start()
    except OSError as e:
        status = 127 if isinstance(e, FileNotFoundError) else 126
        click.echo(f"llem wrap: {safe_text(command[0])}: {e.strerror}", err=True)
        _close_quietly(path, window)
        ctx.exit(status)
    try:
        returncode = runner.wait()
    finally:
        duration_s = time.monotonic() - t0
        runner.restore()
    notes = [
        f"window {window['window_id']} of Slurm job {os.environ.get('SLURM_JOB_ID')} "
        f"on node {os.environ.get('SLURMD_NODENAME')}: the job's attributed share"
    ]
    count, unit = work.get(notes)
    try:
        closed = close_window(path, os.environ, window["window_id"], count, unit)
    except WindowError as e:
        notes.append(f"{e}: the window's energy is unknown")
        closed = {"start_ns": window["start_ns"], "end_ns": window["start_ns"], "coverage": 0.0}
    acc = accumulator_of_window(closed)
    carbon, co2e_g, carbon_notes = carbon_for(config, acc, duration_s)
    res = result(
        acc,
        name=name,
        command=command,
        exit_code=exit_status(returncode),
        duration_s=duration_s,
        carbon=carbon,
        co2e_g=co2e_g,
        notes=notes + carbon_notes,
    )
    res["scope"] = "job"
    res["coverage"] = closed.get("coverage")
    add_work(res, count, unit, closed.get("policy"))
    res["window_id"] = window["window_id"]
    _emit(res, as_json, output, quiet)
    ctx.exit(exit_status(returncode))


class _Work:
    """The work of ``--work``/``--unit``/``--work-file``, read once the command has ended."""

    def __init__(self, count: float | None, unit: str | None, path: Path | None) -> None:
        self.count, self.unit, self.path = count, unit, path

    def get(self, notes: list[str]) -> tuple[float | None, str | None]:
        """(count, unit); a count file that is missing or unreadable is a note, not an
        error: the measurement is kept without its work."""
        from llem.node.windows import check_work

        count, unit = self.count, self.unit
        if self.path is not None:
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")[:200].split()
                count = float(text[0])
                if len(text) > 1 and unit is None:
                    unit = text[1]
            except (OSError, ValueError, IndexError) as e:
                what = e.strerror if isinstance(e, OSError) else "no number in it"
                notes.append(f"work file {self.path}: {what}; the work is unknown")
                return None, None
        try:
            return check_work(count, unit)
        except ValueError as e:
            notes.append(f"work: {e}; the work is left out")
            return None, None


def _close_quietly(path: Path, window: dict) -> None:
    from llem.node.windows import WindowError, close_window

    try:
        close_window(path, os.environ, window["window_id"])
    except WindowError:
        pass


def _write_output(path: Path, text: str) -> None:
    from llem.fsutil import write_atomic

    try:  # 0o666: the umask decides, as for any file the user writes
        write_atomic(path.parent, path.name, text.encode(), 0o666)
    except OSError as e:
        raise LlemError(f"{path}: cannot write the output file: {e.strerror or e}") from e


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False},
)
@click.option("--name", "-n", help="A name for this measurement window (at most 128 characters).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON object to this file.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds between sensor reads (default: the smaller of 1 s and sampler.interval_s).",
)
@click.option(
    "--work",
    type=click.FloatRange(min=0),
    default=None,
    help="The work the command does (a count: tokens, samples, ...): the summary gives the "
    "energy per unit.",
)
@click.option(
    "--unit",
    default=None,
    help="The unit of the work (tokens, samples, steps, requests or any word; default units).",
)
@click.option(
    "--work-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file the command writes its work count into ('N' or 'N UNIT'), read when it ends.",
)
@click.option("--quiet", "-q", is_flag=True, help="No summary on stderr.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def wrap(
    ctx: click.Context,
    name: str | None,
    as_json: bool,
    output: Path | None,
    interval: float | None,
    work: float | None,
    unit: str | None,
    work_file: Path | None,
    quiet: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND and report the energy used while it ran.

    Exits with COMMAND's exit status (128+N when it is killed by signal N). The summary goes
    to stderr; --json prints one object to stdout.

    \b
    Examples:
      llem wrap --name train -- python train.py --epochs 3
      llem wrap --name gen --work-file n.txt --unit tokens -- python gen.py --count-to n.txt
    """
    if work is not None and work_file is not None:
        raise click.UsageError("--work and --work-file: give one of them")
    from llem.node.windows import check_work

    try:
        check_work(work, unit)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--unit") from None
    work_of = _Work(work, unit, work_file)
    config = config_mod.load()
    notes: list[str] = []
    if os.environ.get("SLURM_JOB_ID"):
        from llem.node.windows import WindowError, open_window, socket_path

        path = socket_path(config.run_dir, os.environ)
        try:
            if path is None:
                raise WindowError("SLURMD_NODENAME is not set")
            window = open_window(path, os.environ, name)
        except WindowError as e:
            notes.append(
                f"inside Slurm job {os.environ['SLURM_JOB_ID']}: {e}; measured "
                "standalone instead (the whole node, not the job's share)"
            )
        else:
            _job_window(ctx, config, path, window, name, as_json, output, quiet, command, work_of)
    interval_s = interval if interval is not None else min(1.0, config.sampler.interval_s)
    opened = open_sensors(config)
    notes += opened.notes
    acc = Accumulator()
    sampler = Sampler(opened.sensors, [acc], interval_s=interval_s)
    sampler.start()
    runner = ChildRunner(command)
    t0 = time.monotonic()
    try:
        runner.start()
    except FileNotFoundError:
        opened.close()
        click.echo(f"llem wrap: {safe_text(command[0])}: command not found", err=True)
        ctx.exit(127)
    except PermissionError:
        opened.close()
        click.echo(f"llem wrap: {safe_text(command[0])}: permission denied", err=True)
        ctx.exit(126)
    thread = run_sampler_thread(sampler)
    try:
        returncode = runner.wait()
    finally:
        duration_s = time.monotonic() - t0
        sampler.stop()
        thread.join(timeout=10)
        runner.restore()
        opened.close()
    count, work_unit = work_of.get(notes)
    carbon, co2e_g, carbon_notes = carbon_for(config, acc, duration_s)
    res = result(
        acc,
        name=name,
        command=command,
        exit_code=exit_status(returncode),
        duration_s=duration_s,
        carbon=carbon,
        co2e_g=co2e_g,
        notes=notes + carbon_notes,
    )
    add_work(res, count, work_unit)
    _emit(res, as_json, output, quiet)
    ctx.exit(exit_status(returncode))
