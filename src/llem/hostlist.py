"""Slurm hostlists: ``n[1-3,5],gpu07`` <-> ``["n1", "n2", "n3", "n5", "gpu07"]``."""

from __future__ import annotations

import re
from collections.abc import Sequence


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm hostlist syntax into host names, in order, without duplicates.

    ``n[1-3,5],gpu[01-02]`` -> n1 n2 n3 n5 gpu01 gpu02; several bracket groups in one name
    multiply (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2); zero padding is kept from the range's
    first bound.

    Raises:
        ValueError: unbalanced brackets, an empty or reversed range, or more than a million
            names (a typo, not a cluster).
    """
    out: list[str] = []
    seen: set[str] = set()
    for part in _split_top(hostlist.strip()):
        for host in _expand_one(part):
            if host not in seen:
                seen.add(host)
                out.append(host)
    return out


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        if ch in ", " and depth == 0:
            if cur:
                parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    if cur:
        parts.append("".join(cur))
    return parts


def _expand_one(pattern: str) -> list[str]:
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    head, body, tail = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    tails = _expand_one(tail)
    out = []
    for item in _range_items(body, pattern):
        out.extend(head + item + t for t in tails)
        if len(out) > 1_000_000:
            raise ValueError(f"hostlist {pattern!r} expands to more than a million names")
    return out


def _range_items(body: str, pattern: str) -> list[str]:
    items: list[str] = []
    for piece in body.split(","):
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {piece!r} in hostlist {pattern!r}")
        if not sep:
            items.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"reversed range {piece!r} in hostlist {pattern!r}")
        if int(hi) - int(lo) > 1_000_000:
            raise ValueError(f"range {piece!r} in hostlist {pattern!r} is too large")
        width = len(lo) if lo.startswith("0") else 0
        items.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return items


def compress_hostlist(nodes: Sequence[str]) -> str:
    """Slurm hostlist of host names: ``n[1-3,5],gpu01`` (zero padding kept)."""
    groups: dict[tuple[str, int], list[int]] = {}
    plain = []
    for node in nodes:
        m = re.fullmatch(r"(.*?)(\d+)", node)
        if m:
            groups.setdefault((m.group(1), len(m.group(2))), []).append(int(m.group(2)))
        else:
            plain.append(node)
    parts = list(plain)
    for (prefix, digits), numbers in sorted(groups.items()):
        numbers = sorted(set(numbers))
        if len(numbers) == 1:
            parts.append(f"{prefix}{numbers[0]:0{digits}d}")
            continue
        ranges, first = [], numbers[0]
        for prev, cur in zip(numbers, numbers[1:] + [None]):
            if cur != prev + 1 if cur is not None else True:
                ranges.append(
                    f"{first:0{digits}d}"
                    if first == prev
                    else f"{first:0{digits}d}-{prev:0{digits}d}"
                )
                first = cur
        parts.append(f"{prefix}[{','.join(ranges)}]")
    return ",".join(parts)
