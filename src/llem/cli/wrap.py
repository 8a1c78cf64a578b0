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
from llem.wrap import Accumulator, ChildRunner, exit_status, result, run_sampler_thread


def carbon_for(
    config: config_mod.Config, acc: Accumulator, duration_s: float
) -> tuple[dict, float | None, list[str]]:
    """The carbon object and CO2e of the window; (carbon, co2e_g, notes).

    A carbon problem (an unknown region, a bad intensity file) never loses the measurement:
    the energy is still reported, with ``co2e_g`` null and the reason.
    """
    from llem import carbon
    from llem.errors import LlemError

    unknown = {
        "region": config.carbon.region,
        "intensity_g_per_kwh": None,
        "source": None,
        "year": None,
        "basis": None,
        "pue": None,
    }
    if not acc.devices:
        return {**unknown, "reason": "no energy was measured"}, None, []
    energy_j = {hour: uj / 1e6 for hour, uj in acc.by_hour_uj.items()}
    n_gpus = sum(1 for t in acc.devices.values() if t.device.component == "gpu")
    hours = duration_s / 3600
    try:
        result = carbon.emissions(config, energy_j, gpu_hours=n_gpus * hours, node_hours=hours)
    except (LlemError, ValueError) as e:
        return {**unknown, "reason": f"carbon: {e}"}, None, [f"carbon: {e}"]
    return result.carbon, result.co2e_g, list(result.carbon.get("notes", []))


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
) -> None:
    """Run CMD inside a named window that the node sampler keeps for this job."""
    from llem.node.windows import WindowError, close_window
    from llem.sensors.base import Device
    from llem.units import split_by_hour
    from llem.wrap import DeviceTotal

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
    acc = Accumulator()
    try:
        closed = close_window(path, os.environ, window["window_id"])
    except WindowError as e:
        notes.append(f"{e}: the window's energy is unknown")
        closed = {
            "start_ns": window["start_ns"],
            "end_ns": window["start_ns"],
            "energy_uj": {},
            "devices": {},
            "coverage": 0.0,
        }
    span_ns = max(1, closed["end_ns"] - closed["start_ns"])
    acc.start_ns, acc.end_ns, acc.mono_ns = closed["start_ns"], closed["end_ns"], span_ns
    for key, meta in closed["devices"].items():
        dev = Device(
            key, meta["component"], meta["device"], meta["sensor"], meta["source"], meta["method"]
        )
        uj = int(closed["energy_uj"].get(key, 0))
        acc.devices[key] = DeviceTotal(dev, uj, int(closed["coverage"] * span_ns))
        for hour, part in split_by_hour(closed["start_ns"], closed["end_ns"], uj).items():
            acc.by_hour_uj[hour] = acc.by_hour_uj.get(hour, 0) + part
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
    res["window_id"] = window["window_id"]
    _emit(res, as_json, output, quiet)
    ctx.exit(exit_status(returncode))


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
@click.option("--quiet", "-q", is_flag=True, help="No summary on stderr.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def wrap(
    ctx: click.Context,
    name: str | None,
    as_json: bool,
    output: Path | None,
    interval: float | None,
    quiet: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND and report the energy used while it ran.

    Exits with COMMAND's exit status (128+N when it is killed by signal N). The summary goes
    to stderr; --json prints one object to stdout.

    \b
    Example:
      llem wrap --name train -- python train.py --epochs 3
    """
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
            _job_window(ctx, config, path, window, name, as_json, output, quiet, command)
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
    _emit(res, as_json, output, quiet)
    ctx.exit(exit_status(returncode))
