"""Delivery from the node to the spool: the node-local outbox and a bounded move.

A slice is first written to the node-local outbox (temporary name, fsync, rename), which never
depends on the shared filesystem; then a detached grandchild process moves the outbox into
``spool_dir`` while the caller waits at most ``timeout_s`` (1 s). A spool that is down, full or
hung therefore never holds the Epilog longer than that: the slices stay in the outbox and the
next :func:`flush_outbox` (a later Epilog, the sampler) sends them. Only one flusher runs at
a time per outbox (flock), so a hung spool does not pile up blocked processes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path

from llem import slices
from llem.config import Config
from llem.errors import LedgerError, StoreError
from llem.fsutil import _unlink_quietly, detach, ensure_private_dir, write_atomic
from llem.paths import outbox_dir

log = logging.getLogger(__name__)


DELIVERY_TIMEOUT_S = 1.0


@dataclass
class FlushResult:
    """What one flush achieved within its time bound."""

    sent: list[str] = field(default_factory=list)
    pending: int = 0
    timed_out: bool = False
    error: str | None = None


def deliver(config: Config, data: dict, *, timeout_s: float = DELIVERY_TIMEOUT_S) -> Path:
    """Put a slice in the outbox, then try to move the outbox to the spool within ``timeout_s``.

    Returns:
        The slice's path in the outbox (it may already have been moved to the spool).

    Raises:
        LedgerError: the outbox (node-local) cannot be written; spool trouble never raises.
    """
    name = slices.file_name(data)
    try:
        outbox = ensure_private_dir(outbox_dir(config), 0o700)
        path = write_atomic(outbox, name, slices.encode(data), 0o600)
    except (OSError, StoreError) as e:
        raise LedgerError(f"cannot write the slice {name} to the outbox: {e}") from e
    log.info("slice %s written to the outbox %s", name, outbox)
    flush_outbox(config, timeout_s=timeout_s)
    return path


def pending_slices(config: Config) -> list[Path]:
    """Slices still in the outbox, oldest name first."""
    try:
        names = os.listdir(outbox_dir(config))
    except FileNotFoundError:
        return []
    return sorted(
        outbox_dir(config) / n for n in names if n.endswith(".json") and not n.startswith(".")
    )


def flush_outbox(config: Config, *, timeout_s: float = DELIVERY_TIMEOUT_S) -> FlushResult:
    """Move the outbox's slices into the spool, waiting at most ``timeout_s``.

    The copying happens in a detached grandchild process that the caller never waits on
    beyond the bound: a hung NFS write blocks that process, not the Epilog. Each slice is
    written to the spool under a temporary name, fsynced, renamed, and only then removed
    from the outbox (a crash in between leaves a duplicate, which the ledger ignores).
    """
    result = FlushResult(pending=len(pending_slices(config)))
    if not result.pending:
        return result
    read_fd, write_fd = os.pipe()
    if detach(write_fd):  # pragma: no cover - the delivery grandchild
        try:
            # Another flush of the same outbox (the sampler's, a header's) usually ends in
            # milliseconds: wait for it within the caller's bound rather than give up at once.
            _flush_worker(config, write_fd, lock_wait_s=max(0.0, timeout_s - 0.2))
        finally:
            os._exit(0)
    os.close(write_fd)
    _collect(read_fd, timeout_s, result)
    os.close(read_fd)
    result.pending = len(pending_slices(config))
    if result.timed_out:
        log.warning(
            "spool %s did not answer within %.1f s; %d slice(s) wait in the outbox",
            config.spool_dir,
            timeout_s,
            result.pending,
        )
    elif result.error:
        log.warning(
            "spool %s: %s; %d slice(s) wait in the outbox",
            config.spool_dir,
            result.error,
            result.pending,
        )
    return result


def _collect(read_fd: int, timeout_s: float, result: FlushResult) -> None:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            result.timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if not ready:
            result.timed_out = True
            break
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf += chunk
    for line in buf.decode(errors="replace").splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "sent":
            result.sent.append(rest)
        elif tag == "error":
            result.error = rest
    if not result.timed_out and buf and not buf.endswith(b"done\n") and result.error is None:
        result.error = "the delivery process ended early"


def _lock_within(lock_fd: int, wait_s: float) -> bool:
    """Take the outbox's flush lock, waiting at most ``wait_s`` for another flush to end."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _flush_worker(config: Config, write_fd: int, lock_wait_s: float = 0.0) -> None:
    """The grandchild: move every outbox slice to the spool; report on ``write_fd``."""

    def say(line: str) -> None:
        try:
            os.write(write_fd, (line + "\n").encode())
        except OSError:
            pass  # the caller stopped listening after its bound; carry on regardless

    try:
        outbox = outbox_dir(config)
        lock_fd = os.open(outbox / ".flush.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if not _lock_within(lock_fd, lock_wait_s):
            say("error another delivery is still running (the spool may be hung)")
            return
        spool = slices.check_spool_dir(Path(config.spool_dir))
        for path in pending_slices(config):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            write_atomic(spool, path.name, data, 0o640)
            _unlink_quietly(path)
            say(f"sent {path.name}")
        say("done")
    except LedgerError as e:
        say(f"error {e}")
    except OSError as e:
        reason = (
            "the spool is full"
            if e.errno == errno.ENOSPC
            else ("the spool is read-only" if e.errno == errno.EROFS else f"{e.strerror or e}")
        )
        say(f"error {reason}")
    except BaseException as e:  # noqa: BLE001 - a worker must never raise into a fork
        say(f"error {e!r}")
