"""``llem job JOBID``: one job in words and pictures.

:func:`build` turns what the ledger holds of one run (:mod:`llem.cluster.job_queries`) into
a plain dict (the ``--json`` object); :func:`render_text` prints it for a terminal (with a
power sparkline), :func:`render_png` draws the power timeline (matplotlib) and
:func:`render_html` writes one self-contained page (inline SVG, every text escaped).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Mapping
from typing import Any

from llem.safetext import safe_text
from llem.units import NS_PER_S, UJ_PER_J, format_energy_j

SCHEMA = "llem.job/1"
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60
IDLE_MARGIN = 1.15
"""A GPU counts as idle in a step when its mean power is at most its idle power x this."""
IDLE_MARGIN_W = 5.0

FLAG_WORDS = {
    "gap": "some moments have no data (a counter reset, a lost device, or coverage under "
    "99 %): their energy is missing, not guessed",
    "sampler_restart": "the node's sampler restarted during the job; the time it was down "
    "is not measured",
    "estimated": "part of the energy is estimated from a power model (no energy counter for "
    "some device)",
    "end_estimated": "the node did not record the job's end; its last data marks the end",
    "windows_dropped": "the job opened more windows than one slice carries; the rest were "
    "counted, not kept",
    "clock_jump": "the node's wall clock jumped during the job; durations use the monotonic clock",
    "attribution_error": "attribution failed for some intervals: their energy went to the "
    "node's unattributed remainder, not to the job",
    "shorter_than_meter_window": "the job was shorter than the power meter's averaging "
    "window: the meter cannot resolve it",
    "allocation_unknown": "Slurm did not say which CPUs the job held: it was charged by use",
    "proc_tree": "the node has no job cgroups: the job's processes were found by their "
    "process tree",
    "gpu_index_assumed_minor": "the job's GPUs were matched to devices by their minor number "
    "(an assumption)",
    "gpu_unresolved": "some of the job's GPUs could not be matched to a device",
}
POLICY_WORDS = {
    "exclusive": "the job held the node alone: all of the node's energy",
    "hybrid": "a shared node: idle power by allocation, the rest by use",
    "use": "a shared node: charged by use",
    "allocation": "a shared node: charged by allocation",
}


def _iso(ts_ns: int | None) -> str | None:
    if ts_ns is None:
        return None
    return (
        dt.datetime.fromtimestamp(ts_ns / NS_PER_S, dt.timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def _source(energy_uj: int, estimated_uj: int) -> str:
    if energy_uj <= 0:
        return "none"
    if estimated_uj <= 0:
        return "measured"
    return "estimated" if estimated_uj >= energy_uj else "mixed"


def _timeline(power: list[tuple], keys: set[tuple[str, str]] | None = None) -> list[list]:
    """[[t_s, watts], ...]: the mean power of each step, summed over the series' devices."""
    totals: dict[int, float] = {}
    for node, key, t_s, _step, uj, span_ms in power:
        if keys is not None and (node, key) not in keys:
            continue
        totals[t_s] = totals.get(t_s, 0.0) + uj / UJ_PER_J / (span_ms / 1000)
    return [[t, round(w, 3)] for t, w in sorted(totals.items())]


def gpu_idle(
    watts: list[float], key: str, configured: Mapping[str, float] | None
) -> tuple[float | None, str | None]:
    """The idle power of one GPU and where it comes from: ``attribution.idle_w`` of the
    configuration (its device key, else ``gpu``); else, when the GPU worked at some point of
    the job (its highest step at least twice its lowest), its lowest step; else unknown."""
    configured = configured or {}
    for name in (key, "gpu"):
        if configured.get(name) is not None:
            return float(configured[name]), "configured (attribution.idle_w)"
    if watts and min(watts) > 0 and max(watts) >= 2 * min(watts):
        return min(watts), "its lowest step in this job"
    return None, None


def build(
    data,
    carbon=None,
    carbon_error: str | None = None,
    idle_w: Mapping[str, float] | None = None,
) -> dict:
    """The view of one run (the ``llem job --json`` object).

    Args:
        data: :class:`llem.cluster.job_queries.JobData`.
        carbon: :class:`llem.acct.co2e.Carbon`, or None (``carbon_error`` says why).
        idle_w: the configuration's ``attribution.idle_w`` (GPU idle powers), if any.
    """
    from llem.acct.rows import work_basis

    run = data.run
    end_ns = run["run_end_ns"] or run["run_start_ns"]
    elapsed_s = max(0.0, (end_ns - run["run_start_ns"]) / NS_PER_S)
    energy_j = run["energy_uj"] / UJ_PER_J
    power = data.power
    gpu_keys = set()
    nodes = []
    gpu_idle_j = 0.0
    gpu_idle_known = False
    policies = set()
    for jn in data.nodes:
        span_s = max(0.0, (jn.end_ns - jn.start_ns) / NS_PER_S)
        node_uj = sum(d["energy_uj"] for d in jn.devices.values())
        policy = (jn.attribution or {}).get("policy")
        policies.add(policy or "")
        devices = []
        for key, d in sorted(jn.devices.items(), key=lambda kv: (kv[1]["component"], kv[0])):
            entry = {
                "component": d["component"],
                "device": d["name"],
                "energy_j": round(d["energy_uj"] / UJ_PER_J, 3),
                "source": d["source"],
                "sensor": d["sensor"],
            }
            if d["component"] == "gpu":
                gpu_keys.add((jn.node, key))
                steps = [
                    (uj / UJ_PER_J, uj / UJ_PER_J / (span_ms / 1000))
                    for n, k, _t, _s, uj, span_ms in power
                    if n == jn.node and k == key
                ]
                idle, basis = gpu_idle([w for _, w in steps], key, idle_w)
                if idle is not None:
                    gpu_idle_known = True
                    limit = idle * IDLE_MARGIN + IDLE_MARGIN_W
                    idle_j = sum(j for j, w in steps if w <= limit)
                    entry["idle_power_w"] = round(idle, 3)
                    entry["idle_power_basis"] = basis
                    entry["idle_energy_j"] = round(idle_j, 3)
                    gpu_idle_j += idle_j
            devices.append(entry)
        node_line = _timeline(power, {(jn.node, k) for k in jn.devices})
        nodes.append(
            {
                "node": jn.node,
                "start": _iso(jn.start_ns),
                "end": _iso(jn.end_ns),
                "energy_j": round(node_uj / UJ_PER_J, 3),
                "average_power_w": round(node_uj / UJ_PER_J / span_s, 2) if span_s else None,
                "peak_power_w": max((w for _, w in node_line), default=None),
                "coverage": jn.coverage,
                "attribution": policy,
                "attribution_words": POLICY_WORDS.get(policy or "", None),
                "flags": jn.flags,
                "devices": devices,
            }
        )
    timeline = _timeline(power)
    step_s = power[0][3] if power else None
    gpu_line = _timeline(power, gpu_keys) if gpu_keys else []
    flags = sorted({f for n in data.nodes for f in n.flags})
    explained = []
    if run["coverage"] is not None:
        explained.append(
            f"data covered {run['coverage'] * 100:.1f} % of the job's wall time"
            + ("" if run["coverage"] >= 0.99 else ": the rest is missing, not guessed")
        )
    if run["status"] == "pending":
        explained.append("not every node of the job has reported yet: the figures may grow")
    elif run["status"] == "incomplete":
        explained.append(
            f"nodes {', '.join(data_list(run['missing_nodes']))} never reported: their energy "
            "is missing"
        )
    explained += [f"{f}: {FLAG_WORDS.get(f, 'see docs/methodology.md')}" for f in flags]
    if data.runs > 1:
        explained.append(f"the job ran {data.runs} times (requeued): this is its latest run")
    windows = _windows(data, policies, work_basis)
    co2e_g = None
    carbon_info: dict[str, Any] = {"reason": carbon_error} if carbon_error else {}
    if carbon is not None:
        by_hour = {h: uj / UJ_PER_J for h, uj in data.hourly_uj.items()}
        gpu_hours = run["gpu_seconds"] / 3600
        node_hours = len(data.nodes) * elapsed_s / 3600
        try:
            co2e_g, intensity = carbon.grams(energy_j, gpu_hours, node_hours, by_hour or None)
        except (ValueError, LookupError) as e:
            carbon_info = {"reason": f"carbon: {e}"}
        else:
            carbon_info = {
                **carbon.info,
                "intensity_g_per_kwh": round(intensity, 3),
                "years": carbon.years(),
                "provenance": carbon.footer(),
            }
            for w in windows:
                if w["work"] and energy_j > 0 and w["unit"] not in (None, "mixed"):
                    w["co2e_per_unit_g"] = co2e_g * (w["energy_j"] / energy_j) / w["work"]
    return {
        "schema": SCHEMA,
        "cluster": run["cluster"],
        "job_id": run["job_id"],
        "array": [run["array_job_id"], run["array_task_id"]] if run["array_job_id"] else None,
        "name": run["name"],
        "user": run["user"],
        "account": run["account"],
        "partition": run["partition"],
        "state": run["state"],
        "exit_code": run["exit_code"],
        "status": run["status"],
        "start": _iso(run["run_start_ns"]),
        "end": _iso(run["run_end_ns"]),
        "elapsed_s": round(elapsed_s, 3),
        "energy_j": round(energy_j, 3),
        "source": _source(run["energy_uj"], run["estimated_energy_uj"]),
        "average_power_w": round(energy_j / elapsed_s, 2) if elapsed_s else None,
        "peak_power_w": max((w for _, w in timeline), default=None),
        "coverage": run["coverage"],
        "flags": flags,
        "explained": explained,
        "gpu_idle_energy_j": round(gpu_idle_j, 3) if gpu_idle_known else None,
        "co2e_g": None if co2e_g is None else round(co2e_g, 3),
        "carbon": carbon_info,
        "nodes": nodes,
        "windows": windows,
        "timeline": {"step_s": step_s, "watts": timeline, "gpu_watts": gpu_line},
    }


def data_list(text: Any) -> list[str]:
    import json

    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _windows(data, policies: set[str], work_basis) -> list[dict]:
    """The job's windows, each name and step merged over nodes (as ``llem-acct``)."""
    components = {
        (jn.node, key): (d["component"], d["source"])
        for jn in data.nodes
        for key, d in jn.devices.items()
    }
    merged: dict[tuple, dict] = {}
    for w in data.windows:
        m = merged.setdefault(
            (w["name"], w["step_id"]),
            {
                "name": w["name"],
                "step_id": w["step_id"] or None,
                "start_ns": w["start_ns"],
                "end_ns": w["end_ns"],
                "nodes": set(),
                "uj": 0,
                "gpu_uj": 0,
                "estimated_uj": 0,
                "work": None,
                "units": set(),
                "status": w["status"],
            },
        )
        m["start_ns"] = min(m["start_ns"], w["start_ns"])
        m["end_ns"] = None if None in (m["end_ns"], w["end_ns"]) else max(m["end_ns"], w["end_ns"])
        m["nodes"].add(w["node"])
        if w["status"] != "closed":
            m["status"] = w["status"]
        for key, uj in w["energy"].items():
            component, source = components.get((w["node"], key), ("other", "measured"))
            m["uj"] += uj
            m["gpu_uj"] += uj if component == "gpu" else 0
            m["estimated_uj"] += uj if source == "estimated" else 0
        if w["work"] is not None:
            m["work"] = (m["work"] or 0.0) + w["work"]
            m["units"].add(w["unit"] or "units")
    out = []
    attribution = ",".join(sorted(policies - {""}))
    for m in merged.values():
        unit = None if not m["units"] else (m["units"].pop() if len(m["units"]) == 1 else "mixed")
        energy_j = m["uj"] / UJ_PER_J
        per_unit = m["work"] and unit != "mixed"
        end = m["end_ns"] if m["end_ns"] is not None else m["start_ns"]
        out.append(
            {
                "name": m["name"],
                "step_id": m["step_id"],
                "status": m["status"],
                "start": _iso(m["start_ns"]),
                "duration_s": round((end - m["start_ns"]) / NS_PER_S, 3),
                "nodes": sorted(m["nodes"]),
                "energy_j": round(energy_j, 3),
                "gpu_energy_j": round(m["gpu_uj"] / UJ_PER_J, 3),
                "work": m["work"],
                "unit": unit,
                "energy_per_unit_j": energy_j / m["work"] if per_unit else None,
                "gpu_energy_per_unit_j": (m["gpu_uj"] / UJ_PER_J / m["work"])
                if per_unit and m["gpu_uj"]
                else None,
                "co2e_per_unit_g": None,
                "per_unit_basis": work_basis(attribution, m["uj"], m["estimated_uj"])
                if per_unit
                else None,
            }
        )
    return out


# -- text -------------------------------------------------------------------------------------


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """Eight-level bars of ``values`` (the mean of each of at most ``width`` buckets)."""
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := values[math.floor(i * size) : math.floor((i + 1) * size)] or [0.0])
        ]
    top = max(values)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(7, int(v / top * 7.999))] for v in values)


def format_count(value: float) -> str:
    """``1,000,000`` for a whole count, else six significant digits."""
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.6g}"


def _watts(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f} W"


def render_text(view: Mapping) -> str:
    """The job for a terminal; every name goes through :func:`llem.safetext.safe_text`."""
    v = view
    array = f" (array task {v['array'][0]}_{v['array'][1]})" if v.get("array") else ""
    lines = [
        f"Job {v['job_id']}{array} '{v['name'] or ''}' of {v['user'] or '?'} "
        f"(account {v['account'] or '-'}, partition {v['partition'] or '-'}) on cluster "
        f"{v['cluster']}",
        f"  {v['state'] or 'UNKNOWN'}, exit code {v['exit_code']}, {v['start']} to "
        f"{v['end'] or 'still running'}, {v['elapsed_s'] / 3600:.2f} h on "
        f"{len(v['nodes'])} node(s)",
        f"  energy {format_energy_j(v['energy_j'])} ({v['source']}), average "
        f"{_watts(v['average_power_w'])}, peak {_watts(v['peak_power_w'])}"
        + (f" (highest {v['timeline']['step_s']} s mean)" if v["timeline"]["step_s"] else ""),
    ]
    if v["gpu_idle_energy_j"] is not None:
        share = v["gpu_idle_energy_j"] / v["energy_j"] * 100 if v["energy_j"] else 0.0
        lines.append(
            f"  allocated GPUs while idle: {format_energy_j(v['gpu_idle_energy_j'])} "
            f"({share:.1f} % of the job's energy; a GPU counts as idle in a "
            f"{v['timeline']['step_s']} s step at most {IDLE_MARGIN:g} x its idle power "
            f"+ {IDLE_MARGIN_W:g} W)"
        )
    elif any(d["component"] == "gpu" for n in v["nodes"] for d in n["devices"]):
        lines.append(
            "  allocated GPUs while idle: unknown (no idle power configured in "
            "attribution.idle_w, and the GPUs never changed state during the job)"
        )
    if v["co2e_g"] is None:
        lines.append(f"  CO2e n/a: {v['carbon'].get('reason', 'no carbon factors')}")
    else:
        provenance = v["carbon"]["provenance"].removeprefix("CO2e: ")
        lines.append(f"  CO2e {v['co2e_g']:,.1f} g: {provenance}")
    line = v["timeline"]["watts"]
    if line:
        lines.append("")
        lines.append(
            f"  power {sparkline([w for _, w in line])}  0 to {max(w for _, w in line):,.0f} W, "
            f"one bar per {max(1, len(line) // SPARK_WIDTH) * v['timeline']['step_s']} s"
        )
        if v["timeline"]["gpu_watts"]:
            gpu = v["timeline"]["gpu_watts"]
            lines.append(
                f"  GPUs  {sparkline([w for _, w in gpu])}  0 to {max(w for _, w in gpu):,.0f} W"
            )
    else:
        lines.append("  no power timeline in the ledger for this job (written by llem 0.1+ nodes)")
    lines.append("")
    lines.append("  by node and device:")
    for n in v["nodes"]:
        lines.append(
            f"    {n['node']}: {format_energy_j(n['energy_j'])}, average "
            f"{_watts(n['average_power_w'])}, peak {_watts(n['peak_power_w'])}, coverage "
            + ("n/a" if n["coverage"] is None else f"{n['coverage'] * 100:.1f} %")
            + (f"; {n['attribution_words']}" if n["attribution_words"] else "")
        )
        for d in n["devices"]:
            idle = f", idle {format_energy_j(d['idle_energy_j'])}" if "idle_energy_j" in d else ""
            lines.append(
                f"      {d['component']:<8} {d['device']:<14} {format_energy_j(d['energy_j']):>14}"
                f"  {d['source']}, {d['sensor']}{idle}"
            )
    if v["windows"]:
        lines.append("")
        lines.append("  windows:")
        for w in v["windows"]:
            per = ""
            if w["work"] is not None:
                per = f", {format_count(w['work'])} {w['unit']}"
                if w["energy_per_unit_j"] is not None:
                    per += f": {w['energy_per_unit_j']:.4g} J/unit ({w['per_unit_basis']})"
                    if w["gpu_energy_per_unit_j"] is not None:
                        per += f", GPUs {w['gpu_energy_per_unit_j']:.4g} J/unit"
            lines.append(
                f"    {w['name']}: {w['duration_s']:,.1f} s, {format_energy_j(w['energy_j'])}"
                f" [{w['status']}]{per}"
            )
    if v["explained"]:
        lines.append("")
        lines.append("  what to know:")
        lines += [f"    - {text}" for text in v["explained"]]
    return "\n".join(safe_text(line) for line in lines) + "\n"


# -- pictures ---------------------------------------------------------------------------------


def render_png(view: Mapping) -> bytes:
    """The power timeline as a PNG (matplotlib; ``pip install 'llem[report]'``)."""
    from llem.report.plots import _png, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    line = view["timeline"]["watts"]
    start = line[0][0] if line else 0
    if line:
        ax.step(
            [(t - start) / 60 for t, _ in line],
            [w for _, w in line],
            where="post",
            color="#1b1b1b",
            label="job (all devices)",
        )
    gpu = view["timeline"]["gpu_watts"]
    if gpu:
        ax.step(
            [(t - start) / 60 for t, _ in gpu],
            [w for _, w in gpu],
            where="post",
            color="#2f5d8a",
            linestyle="--",
            label="GPUs",
        )
    ax.set_xlabel("minutes since the first point")
    ax.set_ylabel("power (W)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Job {view['job_id']}: power, {view['timeline']['step_s'] or '-'} s means")
    if line or gpu:
        ax.legend(loc="upper right", frameon=False)
    return _png(fig)


def _svg(line: list[list], width: int = 720, height: int = 180) -> str:
    if not line:
        return "<p>No power timeline in the ledger for this job.</p>"
    t0, t1 = line[0][0], max(line[-1][0], line[0][0] + 1)
    top = max(w for _, w in line) or 1.0
    points = " ".join(
        f"{(t - t0) / (t1 - t0) * (width - 50) + 45:.1f},{height - 20 - w / top * (height - 30):.1f}"
        for t, w in line
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="power timeline">'
        f'<polyline fill="none" stroke="#1b1b1b" stroke-width="1.5" points="{points}"/>'
        f'<text x="2" y="14" font-size="11">{top:,.0f} W</text>'
        f'<text x="2" y="{height - 22}" font-size="11">0 W</text>'
        f'<text x="45" y="{height - 4}" font-size="11">start</text>'
        f'<text x="{width - 40}" y="{height - 4}" font-size="11">end</text></svg>'
    )


def render_html(view: Mapping) -> str:
    """One self-contained page: the summary, the timeline (inline SVG) and the tables."""
    e = html.escape
    text = e(render_text(view))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>llem job {e(str(view['job_id']))}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{white-space:pre-wrap}</style></head><body>"
        f"<h1>Job {e(str(view['job_id']))}: {e(str(view['name'] or ''))}</h1>"
        f"<h2>Power</h2>{_svg(view['timeline']['watts'])}"
        f"<h2>Summary</h2><pre>{text}</pre></body></html>\n"
    )
