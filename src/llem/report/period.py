"""A report's period, without pandas: the gateway's clients compute it (``llem report``
through ``llem serve`` needs no report extra on the login node)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

HOUR_S = 3600


@dataclass(frozen=True)
class Period:
    """A half-open UTC period ``[start_ns, end_ns)`` with a label (``2026-10``)."""

    start_ns: int
    end_ns: int
    label: str
    kind: str = "month"  # or "range"

    @property
    def start_iso(self) -> str:
        return _iso(self.start_ns)

    @property
    def end_iso(self) -> str:
        return _iso(self.end_ns)

    def hours(self) -> list[int]:
        """UTC hour starts (epoch s) of every clock hour the period touches."""
        first = self.start_ns // 10**9 // HOUR_S * HOUR_S
        return list(range(first, -(-self.end_ns // 10**9), HOUR_S))


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def month_period(month: str) -> Period:
    """The calendar month ``YYYY-MM`` (UTC).

    Raises:
        ValueError: not a ``YYYY-MM`` month.
    """
    try:
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"month must be YYYY-MM, got {month!r}") from None
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return Period(int(start.timestamp()) * 10**9, int(end.timestamp()) * 10**9, month)


def range_period(since: datetime, until: datetime) -> Period:
    """Any period; naive datetimes are taken as UTC.

    Raises:
        ValueError: until is not after since.
    """
    since, until = (d if d.tzinfo else d.replace(tzinfo=timezone.utc) for d in (since, until))
    if until <= since:
        raise ValueError(
            f"--until ({until:%Y-%m-%d %H:%M}) must be after --since ({since:%Y-%m-%d %H:%M})"
        )
    label = f"{since:%Y-%m-%d}..{until:%Y-%m-%d}"
    return Period(int(since.timestamp() * 1e9), int(until.timestamp() * 1e9), label, "range")


def previous_period(period: Period) -> Period:
    """The calendar month before a month; the same length just before any other period."""
    if period.kind == "month":
        start = datetime.fromtimestamp(period.start_ns // 10**9, tz=timezone.utc)
        prev = (
            start.replace(year=start.year - 1, month=12)
            if start.month == 1
            else start.replace(month=start.month - 1)
        )
        return month_period(prev.strftime("%Y-%m"))
    length = period.end_ns - period.start_ns
    start, end = period.start_ns - length, period.start_ns
    return Period(start, end, f"{_iso(start)[:10]}..{_iso(end)[:10]}", "range")
