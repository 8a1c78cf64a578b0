"""Directories in memory (``/dev/shm``) for the fake hardware trees that a writer updates live.

sysfs, NVML and a node controller serve their counters from memory. On a disk file system a
fake's update (a file written and renamed over the old one, a folder swapped in) can stall
while the machine writes heavily: a writer is throttled when dirty pages pile up, and a rename
over a file starts its writeback. Measured on the CI machine type under an fsync-heavy load: a
write-and-rename every 50 ms took 7 ms at the median and 118 ms at the 99th percentile in
/tmp, and under 1 ms at the 99th in /dev/shm (tmpfs has no writeback). A stalled fake shows
llem counters as they were some time earlier, which real hardware never does. Every fake whose
counters advance while llem reads them keeps its live files in one of these directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SHM = Path("/dev/shm")


def memory_tempdir(prefix: str, fallback: Path | None = None) -> Path:
    """A new directory (mode 0755) in ``/dev/shm``, or in ``fallback`` (else the default
    temporary directory) where there is no usable ``/dev/shm``. The caller removes it."""
    parent = SHM if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK) else fallback
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def memory_dir(fallback: Path, prefix: str = "llem-live-") -> Iterator[Path]:
    """:func:`memory_tempdir` for the length of a ``with`` block, removed afterwards."""
    path = memory_tempdir(prefix, fallback)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
