"""Spool -> ledger: read, check, merge, then archive or delete; quarantine what is bad.

One pass (:func:`aggregate_once`) under an exclusive lock (``flock`` on ``LEDGER.lock``):

1. list the spool (top level only; names starting with a dot are files still being
   written, folders such as ``archive`` and ``quarantine`` are skipped);
2. read each slice without following links and check it: owner (root only when the
   aggregator runs as root), size, JSON, schema, values, name against content;
3. merge a batch of good slices and log the bad ones in one ledger transaction;
4. only after that commit: move the merged files to the archive (or delete them) and the bad
   ones to the quarantine folder, with a ``.reason`` file beside each.

A kill at any point leaves every slice either still in the spool (merged again on the next
pass, which changes nothing: merging is idempotent) or already merged. A slice written by a
newer llem is left in place and reported, so that the admin upgrades instead of losing it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import pwd
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llem import slices
from llem.config import Config
from llem.errors import LedgerError
from llem.export import check_spool_dir, write_atomic
from llem.store.ledger import Ledger, QuarantineEntry, digest

log = logging.getLogger(__name__)

MAX_SLICE_BYTES = 64 * 1024 * 1024
SKIP_DIRS = ("archive", "quarantine")
STALE_TMP_S = 3600.0



class LedgerBusy(LedgerError):
    """Another ``llem aggregate`` holds the lock."""


@dataclass
class AggregateResult:
    """What one pass did."""

    merged: int = 0
    unchanged: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    newer: list[str] = field(default_factory=list)
    jobs: int = 0
    incomplete: int = 0
    elapsed_s: float = 0.0


def archive_dir(config: Config) -> Path:
    return Path(config.aggregate.archive_dir or Path(config.spool_dir) / "archive")


def quarantine_dir(config: Config) -> Path:
    return Path(config.aggregate.quarantine_dir or Path(config.spool_dir) / "quarantine")


# -- lock --------------------------------------------------------------------------------------


class AggregateLock:
    """An exclusive ``flock`` on a file beside the ledger; released when the process dies.

    Args:
        ledger_path: the ledger; the lock is ``<ledger>.lock``.
        wait_s: how long to wait for another aggregator; 0 gives up at once.

    Raises:
        LedgerBusy: still held by another process after ``wait_s``.
    """

    def __init__(self, ledger_path: str | os.PathLike, wait_s: float = 0.0) -> None:
        self.path = Path(f"{ledger_path}.lock")
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> "AggregateLock":
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LedgerBusy(f"another llem aggregate holds {self.path}; nothing done "
                                     "(it will merge these slices)") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- reading slices ----------------------------------------------------------------------------


@dataclass
class Candidate:
    """One spool file, read and judged."""

    path: Path
    raw: bytes = b""
    data: dict | None = None
    sha: str = ""
    reason: str | None = None
    newer: str | None = None
    owner_uid: int | None = None
    size: int | None = None
    gone: bool = False


def list_spool(spool: Path, *, now_s: float | None = None) -> list[Path]:
    """Slice files at the top of the spool, in name order.

    Temporary files (``.tmp.*``) older than :data:`STALE_TMP_S` were left by a delivery that
    died half-way (its outbox copy is still there and will be sent again): removed.
    """
    now_s = time.time() if now_s is None else now_s
    out = []
    with os.scandir(spool) as entries:
        for entry in entries:
            if entry.name.startswith(".tmp."):
                _sweep_stale(entry, now_s)
                continue
            if entry.name.startswith(".") or entry.name in SKIP_DIRS:
                continue
            if entry.is_dir(follow_symlinks=False):
                continue
            out.append(entry.name)
    return [spool / name for name in sorted(out)]  # sorting strings: Paths compare slowly


def _uids(names: str) -> frozenset[int]:
    """Uids of a comma-separated list of user names or numbers; unknown names are skipped."""
    out = set()
    for name in (n.strip() for n in names.split(",")):
        if name.isdigit():
            out.add(int(name))
        elif name:
            try:
                out.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                log.warning("aggregate.header_owners: no user %r on this host", name)
    return frozenset(out)


def _sweep_stale(entry: os.DirEntry, now_s: float) -> None:
    try:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and now_s - st.st_mtime > STALE_TMP_S:
            os.unlink(entry.path)
            log.info("removed %s, left by a delivery that died half-way", entry.path)
    except OSError:
        pass


def read_candidate(path: Path, *, euid: int | None = None,
                   header_uids: frozenset[int] = frozenset()) -> Candidate:
    """Read and check one spool file; never raises for a bad file (``reason`` says why).

    Args:
        path: the file.
        euid: the aggregator's effective uid (default: this process's).
        header_uids: owners besides root whose *header* slices are accepted (slurmctld's
            EpilogSlurmctld runs as SlurmctldUser).
    """
    euid = os.geteuid() if euid is None else euid
    cand = Candidate(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        cand.gone = True
        return cand
    except OSError as e:
        cand.reason = ("a symlink, refused" if e.errno == errno.ELOOP
                       else f"cannot open: {e.strerror}")
        return cand
    try:
        st = os.fstat(fd)
        cand.owner_uid, cand.size = st.st_uid, st.st_size
        trusted = header_uids if path.name.startswith("header.") else frozenset()
        cand.reason = _check_file(st, euid, trusted)
        if cand.reason is None:
            cand.raw = _read_all(fd, st.st_size)
    finally:
        os.close(fd)
    cand.sha = digest(cand.raw)
    if cand.reason is None:
        _judge(cand)
    cand.raw = b""  # parsed; do not keep a batch of raw files in memory
    return cand


def _check_file(st: os.stat_result, euid: int, trusted: frozenset[int]) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if euid == 0 and st.st_uid != 0 and st.st_uid not in trusted:
        return (f"owned by uid {st.st_uid}, not root: slices come only from root's Epilog "
                "(dropped by a user?)")
    if st.st_mode & stat.S_IWOTH:
        return "writable by others"
    if st.st_size > MAX_SLICE_BYTES:
        return f"too large ({st.st_size} bytes)"
    if st.st_size == 0:
        return "empty (truncated)"
    return None


def _read_all(fd: int, size: int) -> bytes:
    chunks, total = [], 0
    while total <= size:
        chunk = os.read(fd, max(size - total, 0) + 1)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _judge(cand: Candidate) -> None:
    try:
        data = json.loads(cand.raw)
    except UnicodeDecodeError:
        cand.reason = "corrupt: not UTF-8"
        return
    except json.JSONDecodeError as e:
        near_end = e.pos >= len(cand.raw.rstrip()) - 1
        cand.reason = (f"truncated: JSON ends early ({e.msg} at byte {e.pos})" if near_end
                       else f"corrupt: not JSON ({e.msg} at byte {e.pos})")
        return
    try:
        slices.validate(data)
        slices.check_name_matches(cand.path.name, data)
    except slices.NewerSchema as e:
        cand.newer = str(e)
        return
    except slices.SliceError as e:
        cand.reason = f"foreign or impossible: {e}"
        return
    cand.data = data


# -- one pass ----------------------------------------------------------------------------------


def aggregate_once(config: Config, *, now_ns: int | None = None, wait_s: float = 0.0,
                   batch_size: int | None = None,
                   after_commit: Callable[[int], None] | None = None) -> AggregateResult:
    """Merge everything in the spool into the ledger, once.

    Args:
        config: spool, ledger, archive, quarantine and grace settings.
        now_ns: the time that decides grace periods (default now).
        wait_s: how long to wait for another aggregator's lock.
        batch_size: slices per ledger transaction (default ``aggregate.batch_size``).
        after_commit: called with the batch number after each commit (tests).

    Raises:
        LedgerBusy: another aggregator holds the lock.
        LedgerError: the spool or ledger cannot be used.
    """
    t0 = time.monotonic()
    now_ns = time.time_ns() if now_ns is None else now_ns
    spool = check_spool_dir(Path(config.spool_dir))
    result = AggregateResult()
    batch_size = max(1, batch_size or config.aggregate.batch_size)
    jobs: set = set()
    with AggregateLock(config.ledger, wait_s), Ledger(config.ledger) as ledger:
        header_uids = _uids(config.aggregate.header_owners)
        candidates = (read_candidate(p, header_uids=header_uids) for p in list_spool(spool))
        for number in itertools.count():
            batch = list(itertools.islice(candidates, batch_size))
            if not batch:
                break
            jobs |= _merge_batch(config, ledger, batch, now_ns, result)
            if after_commit is not None:
                after_commit(number)
        result.incomplete = ledger.mark_incomplete(now_ns, config.aggregate.grace_s)
    result.jobs = len(jobs)
    result.elapsed_s = time.monotonic() - t0
    return result


def _merge_batch(config: Config, ledger: Ledger, batch: list[Candidate], now_ns: int,
                 result: AggregateResult) -> set:
    good, bad = [], []
    for cand in batch:
        if cand.gone:
            continue
        if cand.newer:
            result.newer.append(cand.path.name)
            log.error("%s: %s", cand.path, cand.newer)
        elif cand.reason:
            bad.append(cand)
        else:
            good.append(cand)
    entries = [QuarantineEntry(c.path.name, c.sha, c.reason or "", c.owner_uid, c.size, now_ns)
               for c in bad]
    stats = ledger.merge([(c.data, c.sha) for c in good], now_ns=now_ns,
                         grace_s=config.aggregate.grace_s, quarantined=entries)
    # Only now, with the merge committed, do files leave the spool.
    for cand in good:
        _dispose(config, cand.path, now_ns)
    for cand in bad:
        _quarantine(config, cand)
    result.merged += stats.merged
    result.unchanged += stats.unchanged
    result.quarantined += [(c.path.name, c.reason or "") for c in bad]
    return stats.jobs_touched


def _dispose(config: Config, path: Path, now_ns: int) -> None:
    if config.aggregate.processed == "delete":
        _unlink(path)
        return
    day = time.strftime("%Y-%m-%d", time.gmtime(now_ns // 10**9))
    target = archive_dir(config) / day
    _private_dir(target)
    os.replace(path, target / path.name)


def _quarantine(config: Config, cand: Candidate) -> None:
    target = quarantine_dir(config)
    _private_dir(target)
    log.warning("quarantined %s: %s", cand.path.name, cand.reason)
    reason = {"file": cand.path.name, "reason": cand.reason, "owner_uid": cand.owner_uid,
              "size": cand.size, "sha256": cand.sha, "ts_ns": time.time_ns()}
    # A name llem never wrote may be too long for a ".reason" beside it: fall back to its hash.
    reason_name = cand.path.name + ".reason"
    if len(reason_name.encode()) > 255:
        reason_name = f"sha256-{cand.sha}.reason"
    try:
        write_atomic(target, reason_name,
                     (json.dumps(reason, sort_keys=True) + "\n").encode(), 0o640)
        os.replace(cand.path, target / cand.path.name)
    except FileNotFoundError:
        pass
    except OSError as e:  # the ledger has logged it; the file stays and is retried next pass
        log.error("cannot move %s to the quarantine %s: %s", cand.path, target, e)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWOTH:
        raise LedgerError(f"{path}: not a private directory; refusing to move slices there")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def watch(config: Config, every_s: float, *, stop: Callable[[], bool] = lambda: False,
          on_pass: Callable[[AggregateResult], None] | None = None) -> None:
    """Aggregate every ``every_s`` seconds until ``stop()`` says so."""
    while not stop():
        try:
            res = aggregate_once(config, wait_s=every_s)
            if on_pass is not None:
                on_pass(res)
        except LedgerBusy as e:
            log.info("%s", e)
        except LedgerError as e:  # a spool or ledger problem: say so, and try again later
            log.error("%s", e)
        deadline = time.monotonic() + every_s
        while not stop() and time.monotonic() < deadline:
            time.sleep(min(0.2, every_s))


# -- reports -----------------------------------------------------------------------------------


def quarantine_report(config: Config) -> list[dict]:
    """The quarantined slices, for ``llem doctor``: file, reason, owner, size, when.

    Read from the ``.reason`` files in the quarantine folder, so that it works without
    opening the ledger (and on any host that sees the spool).
    """
    folder = quarantine_dir(config)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".reason"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            info = json.loads((folder / name).read_text())
        except (OSError, ValueError) as e:
            info = {"file": name[: -len(".reason")], "reason": f"unreadable reason file: {e}"}
        info["path"] = str(folder / info.get("file", name[: -len(".reason")]))
        out.append(info)
    return out
