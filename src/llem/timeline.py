"""Placing energy on the calendar: clock hours (so that hourly carbon intensity applies)."""

from __future__ import annotations

from llem.units import NS_PER_S

HOUR_NS = 3600 * NS_PER_S


def split_by_hour(start_ns: int, end_ns: int, energy_uj: int) -> dict[int, int]:
    """Split an interval's energy over the UTC clock hours it spans, in proportion to time.

    Args:
        start_ns, end_ns: the interval on the wall clock (epoch nanoseconds).
        energy_uj: its energy.

    Returns:
        ``{hour_start_epoch_s: energy_uj}``, integers that add up exactly to ``energy_uj``
        (the rounding remainder goes to the last hour).
    """
    if end_ns <= start_ns:
        hour = (start_ns // HOUR_NS) * 3600
        return {hour: energy_uj} if energy_uj else {}
    out: dict[int, int] = {}
    total_ns = end_ns - start_ns
    t, given = start_ns, 0
    while t < end_ns:
        hour_start = (t // HOUR_NS) * HOUR_NS
        seg_end = min(end_ns, hour_start + HOUR_NS)
        share = energy_uj * (seg_end - t) // total_ns
        key = hour_start // NS_PER_S
        out[key] = out.get(key, 0) + share
        given += share
        t = seg_end
    out[key] += energy_uj - given
    return out
