"""Report plots as PNG bytes (matplotlib, Agg backend: no display needed).

Readable without colour: stacked series carry hatches as well as colours, bars carry their
values as direct labels, and every axis names its unit.
"""

from __future__ import annotations

import io
import marshal
import math
import os
import threading
import time

import numpy as np

from llem.report.frames import Report

HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo", "---", "+++", "***", "|||")
GREYS = (
    "#1b1b1b",
    "#4d4d4d",
    "#7a7a7a",
    "#a6a6a6",
    "#cfcfcf",
    "#2f5d8a",
    "#8a5d2f",
    "#5d8a2f",
    "#8a2f5d",
    "#e0e0e0",
)
MAX_STACK = 7
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(
        buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None}
    )  # no version stamp: reproducible bytes
    _pyplot().close(fig)
    return buf.getvalue()


def _num(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3f}"


def _label_bars(ax, bars) -> None:
    for bar in bars:
        w = bar.get_width()
        ax.annotate(
            _num(w),
            (w, bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )


def daily_by_account(report: Report) -> bytes:
    """Daily energy (kWh) and operational CO2e (kg) stacked by account."""
    plt = _pyplot()
    d = report.daily
    totals = d.groupby("account")["energy_kwh"].sum().sort_values(ascending=False)
    keep = list(totals.index[:MAX_STACK])
    d = d.assign(account=d["account"].where(d["account"].isin(keep), "other accounts"))
    order = keep + (["other accounts"] if len(totals) > MAX_STACK else [])
    days = _days(report)
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for ax, col, unit in (
        (axes[0], "energy_kwh", "energy (kWh)"),
        (axes[1], "operational_kg", "operational CO2e (kg)"),
    ):
        pivot = d.pivot_table(
            index="day", columns="account", values=col, aggfunc="sum", fill_value=0.0
        ).reindex(index=days, columns=order, fill_value=0.0)
        # One stepped polygon per account (not one bar per day and account): 20x faster
        # to draw on a month with many accounts, and the same picture.
        n = len(pivot.index)
        x = np.repeat(np.arange(n + 1), 2)[1:-1] - 0.5
        bottom = np.zeros(n)
        for i, acct in enumerate(order):
            vals = pivot[acct].to_numpy(dtype=float)
            ax.fill_between(
                x,
                np.repeat(bottom, 2),
                np.repeat(bottom + vals, 2),
                label=acct,
                facecolor=GREYS[i % len(GREYS)],
                hatch=HATCHES[i % len(HATCHES)],
                edgecolor="black",
                linewidth=0.4,
            )
            bottom = bottom + vals
        x = range(n)
        ax.set_ylabel(unit)
        top = float(bottom.max()) if len(bottom) else 0.0
        ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(list(x))
        ax.set_xticklabels([day[5:] for day in pivot.index], rotation=90, fontsize=7)
    axes[0].set_title(f"Daily energy and CO2e by account, {report.period.label} (UTC days)")
    handles, labels = axes[0].get_legend_handles_labels()  # legend top-down = stack
    axes[0].legend(
        handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0)
    )
    axes[1].set_xlabel("day (MM-DD)")
    c = report.carbon
    axes[1].set_title(
        f"CO2e at {c.get('intensity_g_per_kwh', 0):g} gCO2e/kWh "
        f"({c.get('region')}, {c.get('year')}), PUE {c.get('pue')}",
        fontsize=8,
    )
    return _png(fig)


def _days(report: Report) -> list[str]:
    """Every UTC day of the period (so that days without jobs show as gaps), YYYY-MM-DD."""
    first = report.period.start_ns // 10**9 // 86400
    last = (report.period.end_ns // 10**9 - 1) // 86400
    days = [time.strftime("%Y-%m-%d", time.gmtime(d * 86400)) for d in range(first, last + 1)]
    return sorted(set(days) | set(report.daily["day"]))


def top_users(report: Report, n: int = 15) -> bytes:
    """Energy of the top users (kWh), horizontal bars with their values."""
    plt = _pyplot()
    users = report.groups["user"].head(n).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(users) + 1.5))
    bars = ax.barh(
        users["user"].astype(str),
        users["energy_kwh"],
        color="#7a7a7a",
        edgecolor="black",
        hatch="//",
    )
    _label_bars(ax, bars)
    ax.set_xlabel("energy (kWh)")
    ax.set_title(f"Top {len(users)} users by energy, {report.period.label}")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    return _png(fig)


def gpu_energy_distribution(report: Report) -> bytes:
    """Histogram of energy per GPU-hour over jobs with GPUs (kWh per GPU-hour)."""
    plt = _pyplot()
    values = report.kwh_per_gpu_h
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist(values, bins=40, color="#a6a6a6", edgecolor="black", hatch="..")
    g = report.gpu_energy
    for key, style in (("p10", ":"), ("median", "-"), ("p90", "--")):
        ax.axvline(
            g[key],
            color="black",
            linestyle=style,
            linewidth=1.4,
            label=f"{key} {g[key]:.3f} kWh/GPU-h",
        )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("energy per GPU-hour (kWh per GPU-hour, all components)")
    ax.set_ylabel("jobs")
    ax.set_title(f"Energy per GPU-hour over {g['jobs']:,} GPU jobs, {report.period.label}")
    return _png(fig)


def waste_by_account(report: Report, n: int = 15) -> bytes:
    """Idle-GPU energy per account (kWh), with the idle threshold in the title."""
    plt = _pyplot()
    w = report.waste["account"].head(n).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(w) + 1.5))
    bars = ax.barh(
        w["account"].astype(str), w["idle_kwh"], color="#4d4d4d", edgecolor="black", hatch="xx"
    )
    for bar, share in zip(bars, w["idle_share"]):
        text = _num(bar.get_width()) + (
            f" ({share * 100:.0f} % of GPU energy)"
            if share is not None and not math.isnan(share)
            else ""
        )
        ax.annotate(
            text,
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("energy of idle allocated GPUs (kWh)")
    ax.set_title(
        f"Idle-GPU energy by account, {report.period.label} "
        f"(idle: average < {report.idle_w:g} W per GPU)"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.35)
    return _png(fig)


PLOTS = (
    ("daily_energy_co2e_by_account.png", daily_by_account, lambda r: not r.daily.empty),
    ("top_users.png", top_users, lambda r: not r.groups["user"].empty),
    ("energy_per_gpu_hour.png", gpu_energy_distribution, lambda r: bool(r.gpu_energy.get("jobs"))),
    ("waste_by_account.png", waste_by_account, lambda r: not r.waste["account"].empty),
)
"""Every plot: its file name, the function that draws it, and whether a report has its data."""


def make_plots(report: Report, *, fork: bool | None = None) -> dict[str, bytes]:
    """File name -> PNG bytes of every plot that has data.

    ``fork`` (default: where the process has one thread and ``os.fork``): the daily plot,
    the longest to draw, is drawn in a forked child while this process draws the others
    (matplotlib holds the GIL while it draws: threads would take turns). The report is
    made by then, so the child has its figures without any copy; it sends the PNG bytes
    back through a pipe. The bytes are the same either way; a child that fails or dies has
    its plots drawn here. Never forked beside other threads (``llem serve``'s): a fork
    copies only the calling thread, and a lock another thread held stays held in the child.
    """
    if report.empty:
        return {}
    wanted = [(name, draw) for name, draw, has in PLOTS if has(report)]
    if fork is None:
        fork = hasattr(os, "fork") and threading.active_count() == 1
    drawn: dict[str, bytes] = {}
    if fork and len(wanted) > 1:
        drawn = _in_child(report, wanted[:1], lambda: _draw(report, wanted[1:]))
    return {name: drawn[name] if name in drawn else draw(report) for name, draw in wanted}


def _draw(report: Report, wanted) -> dict[str, bytes]:
    return {name: draw(report) for name, draw in wanted}


def _in_child(report: Report, wanted, meanwhile) -> dict[str, bytes]:
    """``wanted`` drawn in a forked child while ``meanwhile()`` runs here; both results in
    one dict (the child's missing where it failed: the caller draws them)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return meanwhile()
    if pid == 0:  # the child: draw, send, leave without running any exit handler
        code = 1
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(marshal.dumps(_draw(report, wanted)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        out = meanwhile()
    finally:
        with os.fdopen(read_fd, "rb") as pipe:
            sent = pipe.read()  # to the child's end: its bytes are ours to parse
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return out
    try:
        got = marshal.loads(sent)  # our own child's dict of str -> bytes
    except (EOFError, ValueError, TypeError):
        return out
    names = {name for name, _ in wanted}
    if isinstance(got, dict):
        out.update((k, v) for k, v in got.items() if k in names and isinstance(v, bytes))
    return out
