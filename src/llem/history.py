"""The local history of Python API windows measured outside Slurm (``llem history``).

One JSON object per line (the ``llem wrap --json`` object of the window, plus ``pid`` and
``rank``), appended by :func:`append` under an exclusive lock so that the processes of one
program (``multiprocessing``, ``torchrun`` ranks) never interleave their lines. The file is
the user's own: ``$LLEM_HISTORY``, else ``$XDG_DATA_HOME/llem/history.jsonl`` (by default
``~/.local/share/llem/history.jsonl``), created 0600 in a 0700 directory. Reading skips a
damaged line (and counts it) instead of failing: a line cut by a crash loses that line only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

MAX_LINE_BYTES = 64 * 1024
"""A history line longer than this is cut to its figures (events and notes dropped)."""
MAX_EVENTS = 20


def history_path() -> Path:
    """Where the history is: ``$LLEM_HISTORY``, else under ``$XDG_DATA_HOME``."""
    explicit = os.environ.get("LLEM_HISTORY")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "llem" / "history.jsonl"


def _line(res: dict) -> bytes:
    entry = dict(res)
    entry["events"] = list(entry.get("events", []))[:MAX_EVENTS]
    text = json.dumps(entry, separators=(",", ":"))
    if len(text) >= MAX_LINE_BYTES:
        entry["events"], entry["notes"] = [], ["notes and events left out: too long"]
        entry["command"] = entry.get("command", [])[:1]
        text = json.dumps(entry, separators=(",", ":"))
    return (text + "\n").encode()


def append(res: dict, path: Path | None = None) -> Path:
    """Append one window's result to the history; return the file's path.

    Raises:
        OSError: the history cannot be written (the caller keeps the result and says so).
    """
    import fcntl

    path = history_path() if path is None else path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = _line(res)
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
    return path


def read(path: Path | None = None) -> tuple[list[dict], int]:
    """All entries, oldest first, and how many lines were damaged (skipped)."""
    path = history_path() if path is None else path
    entries, damaged = [], 0
    try:
        with open(path, "rb") as f:
            for line in _lines(f):
                try:
                    entry = json.loads(line)
                except ValueError:
                    damaged += 1
                    continue
                if _usable(entry):
                    entries.append(entry)
                else:
                    damaged += 1
    except FileNotFoundError:
        pass
    return entries, damaged


def _lines(f) -> Iterator[bytes]:
    for line in f:
        if len(line) > MAX_LINE_BYTES * 2:
            yield b"{"  # damaged on purpose: counted, not parsed
            continue
        if line.strip():
            yield line


def _usable(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    return (
        isinstance(entry.get("name"), (str, type(None)))
        and isinstance(entry.get("start"), (str, type(None)))
        and type(entry.get("duration_s")) in (int, float)
        and type(entry.get("energy_j")) in (int, float)
        and isinstance(entry.get("components"), list)
        and all(isinstance(c, dict) for c in entry["components"])
    )
