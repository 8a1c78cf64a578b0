"""Pure helpers for counters and units.

Storage keeps integers (microjoules, nanoseconds); conversions happen only when showing.
"""

from __future__ import annotations

from dataclasses import dataclass

# The unit constants of llem, as integers: ``//`` and ``%`` stay exact, and ``/`` is true
# division all the same (``x / J_PER_KWH`` equals ``x / 3_600_000.0`` for any x below 2**53).
UJ_PER_J = 1_000_000
J_PER_KWH = 3_600_000
UJ_PER_KWH = UJ_PER_J * J_PER_KWH
NS_PER_S = 1_000_000_000

# What a counter step was judged to be.
OK = "ok"  # plain forward step
FIRST = "first"  # no previous value: the start of a series, no energy yet
WRAP = "wrap"  # went backwards inside a known range: wrapped once
RESET = "reset"  # went backwards with no known range (driver reload, reboot): a gap
GAP = "gap"  # the step cannot be trusted (too long, or implies impossible power): a gap

KINDS = (OK, FIRST, WRAP, RESET, GAP)


@dataclass(frozen=True)
class CounterDelta:
    """The energy between two counter reads and what kind of step it was.

    Attributes:
        delta: counter units (e.g. microjoules) consumed between the two reads, never negative;
            zero for FIRST, RESET and GAP steps, whose energy is unknown, not zero.
        kind: one of OK, FIRST, WRAP, RESET, GAP.
    """

    delta: int
    kind: str

    @property
    def has_data(self) -> bool:
        """True when ``delta`` is a real measurement of the interval."""
        return self.kind in (OK, WRAP)


def counter_delta(
    prev: int | None,
    cur: int,
    max_range: int | None = None,
    *,
    elapsed_s: float | None = None,
    max_power_w: float | None = None,
) -> CounterDelta:
    """Energy consumed between two reads of a monotonic, possibly wrapping, energy counter.

    The counter is in microjoules when ``max_power_w`` is used (the plausibility bound is
    ``max_power_w * elapsed_s * 1e6`` units).

    Args:
        prev: the previous raw counter value, or None at the start of a series.
        cur: the current raw counter value.
        max_range: the value at which the counter wraps back to zero (RAPL's
            ``max_energy_range_uj``), or None when unknown (NVML's counter, which only resets).
        elapsed_s: time between the two reads, from a monotonic clock.
        max_power_w: the most the device can draw; with ``elapsed_s`` it bounds a plausible step
            and tells when the reads are too far apart to rule out several wraps.

    Returns:
        A CounterDelta whose ``delta`` is never negative and never more than one counter range.

    Raises:
        ValueError: a counter value is negative or ``max_range`` is not positive.
    """
    if cur < 0 or (prev is not None and prev < 0):
        raise ValueError(f"energy counters are never negative (prev={prev}, cur={cur})")
    if max_range is not None and max_range <= 0:
        raise ValueError(f"max_range must be positive, got {max_range}")
    if prev is None:
        return CounterDelta(0, FIRST)

    bound = None
    if elapsed_s is not None and max_power_w is not None:
        if elapsed_s < 0:
            return CounterDelta(0, GAP)
        bound = max_power_w * elapsed_s * UJ_PER_J

    if cur >= prev:
        delta, kind = cur - prev, OK
    elif max_range is not None and prev <= max_range and cur <= max_range:
        delta, kind = max_range - prev + cur, WRAP
    else:
        return CounterDelta(0, RESET)

    if max_range is not None:
        if delta > max_range:
            return CounterDelta(0, GAP)
        # Reads further apart than one full range at maximum power may hide extra wraps.
        if bound is not None and bound > max_range:
            return CounterDelta(0, GAP)
    if bound is not None and delta > bound:
        # A backwards step that looked like a wrap but implies impossible power is a reset;
        # a forward jump that does is a counter we cannot trust for this interval.
        return CounterDelta(0, RESET if kind == WRAP else GAP)
    return CounterDelta(delta, kind)


def uj_to_j(energy_uj: int | float) -> float:
    return energy_uj / UJ_PER_J


def j_to_kwh(energy_j: float) -> float:
    return energy_j / J_PER_KWH


def uj_to_kwh(energy_uj: int | float) -> float:
    return energy_uj / UJ_PER_KWH


def format_energy_j(energy_j: float) -> str:
    """Human-readable energy: J, kJ, MJ, with kWh beside large figures."""
    if energy_j < 1_000:
        return f"{energy_j:.1f} J"
    if energy_j < 1_000_000:
        return f"{energy_j / 1_000:.2f} kJ"
    return f"{energy_j / 1_000_000:.2f} MJ ({j_to_kwh(energy_j):.3f} kWh)"


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


def split_by_step(start_ns: int, end_ns: int, energy_uj: int, step_s: int) -> list[tuple]:
    """Split an interval over the ``step_s``-second buckets (epoch-aligned) it spans.

    Returns:
        ``[(bucket_start_epoch_s, energy_uj, span_ns), ...]``: energies in proportion to
        time that add up exactly to ``energy_uj``, and the interval's time in each bucket.
    """
    step_ns = step_s * NS_PER_S
    if end_ns <= start_ns:
        return [((start_ns // step_ns) * step_s, energy_uj, 0)]
    out: list[tuple] = []
    total_ns = end_ns - start_ns
    t, given = start_ns, 0
    while t < end_ns:
        bucket = (t // step_ns) * step_ns
        seg_end = min(end_ns, bucket + step_ns)
        share = energy_uj * (seg_end - t) // total_ns
        out.append([bucket // NS_PER_S, share, seg_end - t])
        given += share
        t = seg_end
    out[-1][1] += energy_uj - given
    return [tuple(x) for x in out]
