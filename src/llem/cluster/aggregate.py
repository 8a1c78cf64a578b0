"""Spool -> ledger: read, check, merge, then archive or delete; quarantine what is bad.

One pass (:func:`aggregate_once`) under an exclusive lock (``flock`` on ``LEDGER.lock``; on a
PostgreSQL ledger, an advisory lock of the database, so that aggregators on several hosts
never merge at once):

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

import contextlib
import itertools
import json
import logging
import os
import pwd
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llem.cluster.ledger import DATABASE as LEDGER_DATABASE
from llem.cluster.ledger import LEDGER_MODE, PRIVATE_MODE, Ledger, QuarantineEntry, set_access
from llem.cluster.pass_status import record_pass
from llem.cluster.pg_ledger import PgLedger, is_postgres
from llem.cluster.readers import Candidate, no_cyclic_gc, read_all, reader_count
from llem.cluster.slurm_accounting import ReconcileResult, reconcile
from llem.config import Config
from llem.errors import LedgerError
from llem.fsutil import locked, write_atomic
from llem.paths import archive_dir, quarantine_dir
from llem.safetext import safe_text
from llem.slices import check_spool_dir

log = logging.getLogger(__name__)

SKIP_DIRS = ("archive", "quarantine")
BATCH_SQLITE = 500
BATCH_POSTGRES = 2000
"""``aggregate.batch_size: auto`` per backend: on PostgreSQL, batches of 2,000 took the
server's CPU per slice down by about 18 % against 500 (docs/performance.md)."""
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
    accounting: ReconcileResult | None = None
    """What asking Slurm's accounting (``sacct``) did, or None when it was not asked."""


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

    def __enter__(self) -> AggregateLock:
        LEDGER_DATABASE.prepare_dir(self.path.parent)  # the ledger's own checks, first
        self._held = locked(
            self.path,
            self.wait_s,
            poll_s=0.1,
            busy=lambda: LedgerBusy(
                f"another llem aggregate holds {self.path}; nothing done (it will merge these "
                "slices)"
            ),
        )
        fd = self._held.__enter__()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.fd = None
            self._held.__exit__(None, None, None)


class PgAggregateLock:
    """The PostgreSQL ledger's advisory lock: one aggregator at a time on any host.

    Held by the ledger's session for the whole pass; PostgreSQL releases it when the session
    ends, a killed aggregator's included.

    Raises:
        LedgerBusy: still held by another session after ``wait_s``.
    """

    def __init__(self, ledger: PgLedger, wait_s: float = 0.0) -> None:
        self.ledger = ledger
        self.wait_s = wait_s

    def __enter__(self) -> PgAggregateLock:
        deadline = time.monotonic() + self.wait_s
        while not self.ledger.try_lock():
            if time.monotonic() >= deadline:
                holder = self.ledger.lock_holder()
                raise LedgerBusy(
                    "another llem aggregate holds the PostgreSQL ledger's lock"
                    + (f" ({safe_text(holder)})" if holder else "")
                    + "; nothing done (it will merge these slices)"
                )
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ledger.unlock()
        except Exception:  # the session is gone, and the lock with it
            pass


# -- reading slices ----------------------------------------------------------------------------


def list_spool(spool: Path, *, now_s: float | None = None) -> list[str]:
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
    return [os.path.join(spool, name) for name in sorted(out)]  # strings: Paths are slow


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


# -- one pass ----------------------------------------------------------------------------------


def aggregate_once(
    config: Config,
    *,
    now_ns: int | None = None,
    wait_s: float = 0.0,
    batch_size: int | None = None,
    after_commit: Callable[[int], None] | None = None,
    accounting: bool = True,
) -> AggregateResult:
    """Merge everything in the spool into the ledger, once; then reconcile the merged jobs
    with Slurm's accounting (:mod:`llem.cluster.slurm_accounting`), bounded in time.

    Args:
        config: spool, ledger, archive, quarantine and grace settings.
        now_ns: the time that decides grace periods (default now).
        wait_s: how long to wait for another aggregator's lock.
        batch_size: slices per ledger transaction (default ``aggregate.batch_size``).
        after_commit: called with the batch number after each commit (tests).
        accounting: ask ``sacct`` (per ``aggregate.sacct``) after merging.

    Raises:
        LedgerBusy: another aggregator holds the lock.
        LedgerError: the spool or ledger cannot be used.
    """
    t0 = time.monotonic()
    now_ns = time.time_ns() if now_ns is None else now_ns
    spool = check_spool_dir(Path(config.spool_dir))
    result = AggregateResult()
    jobs: set = set()
    private = config.privacy != "none"
    sqlite_file = not is_postgres(config.ledger)
    batch_size = max(1, batch_size or _batch_size(config.aggregate.batch_size, sqlite_file))
    with contextlib.ExitStack() as stack:
        if not sqlite_file:
            ledger = stack.enter_context(PgLedger(config.ledger))
            stack.enter_context(PgAggregateLock(ledger, wait_s))
            stack.enter_context(no_cyclic_gc())
        else:
            stack.enter_context(AggregateLock(config.ledger, wait_s))
            stack.enter_context(no_cyclic_gc())
            ledger = stack.enter_context(
                Ledger(
                    config.ledger,
                    background_checkpoint=True,
                    file_mode=PRIVATE_MODE if private else LEDGER_MODE,
                )
            )
        disposer = stack.enter_context(_Disposer(config, now_ns))
        paths = list_spool(spool)
        readers = reader_count(config.aggregate.readers, len(paths))
        candidates = read_all(
            paths,
            readers=readers,
            header_uids=_uids(config.aggregate.header_owners),
            ahead=2 * batch_size,
        )
        with contextlib.closing(candidates):
            for number in itertools.count():
                batch = list(itertools.islice(candidates, batch_size))
                if not batch:
                    break
                jobs |= _merge_batch(config, ledger, disposer, batch, now_ns, result)
                if after_commit is not None:
                    after_commit(number)
        result.incomplete = ledger.mark_incomplete(now_ns, config.aggregate.grace_s)
        if config.ledger_retention_months and isinstance(ledger, PgLedger):
            ledger.apply_retention(config.ledger_retention_months, now_ns / 1e9)
        if accounting:
            result.accounting = _reconcile(config, ledger, now_ns)
        record_pass(config, result, time.monotonic() - t0)  # for `llem metrics`
        if sqlite_file:
            set_access(config.ledger, private=private, group=config.aggregate.ledger_group)
    if sqlite_file:  # again once closed: the -wal and -shm that closing keeps for readers
        set_access(config.ledger, private=private, group=config.aggregate.ledger_group)
    result.jobs = len(jobs)
    result.elapsed_s = time.monotonic() - t0
    return result


def _batch_size(setting: str | int, sqlite_file: bool) -> int:
    """``aggregate.batch_size``, with 'auto' made a number for the ledger's backend."""
    if setting == "auto":
        return BATCH_SQLITE if sqlite_file else BATCH_POSTGRES
    return int(setting)


def _reconcile(config: Config, ledger: Ledger, now_ns: int) -> ReconcileResult:
    """Slurm's accounting after the merge, on either ledger (SQLite or PostgreSQL): its
    failures are logged, never the pass's."""
    try:
        return reconcile(config, ledger, now_ns=now_ns)
    except LedgerError as e:  # the merge is committed; the next pass asks again
        log.error("storing Slurm's accounting records failed: %s", e)
        return ReconcileResult(error=str(e))


def _merge_batch(
    config: Config,
    ledger: Ledger,
    disposer: _Disposer,
    batch: list[Candidate],
    now_ns: int,
    result: AggregateResult,
) -> set:
    good, bad = [], []
    for cand in batch:
        if cand.gone:
            continue
        if cand.newer:
            result.newer.append(cand.name)
            log.error("%s: %s", cand.path, cand.newer)
        elif cand.reason:
            bad.append(cand)
        else:
            good.append(cand)
    entries = [
        QuarantineEntry(c.name, c.sha, c.reason or "", c.owner_uid, c.size, now_ns) for c in bad
    ]
    stats = ledger.merge_prepared(
        [c.prepared for c in good],
        now_ns=now_ns,
        grace_s=config.aggregate.grace_s,
        quarantined=entries,
    )
    # Only now, with the merge committed, do files leave the spool.
    disposer.put([cand.path for cand in good])
    for cand in bad:
        _quarantine(config, cand)
    result.merged += stats.merged
    result.unchanged += stats.unchanged
    result.quarantined += [(c.name, c.reason or "") for c in bad]
    return stats.jobs_touched


class _Disposer:
    """Archives or deletes merged slices in a thread, each batch after its commit.

    Renaming and unlinking are system calls that let go of the GIL, so the next batch is
    merged meanwhile. Leaving the ``with`` waits until every batch is disposed of, and raises
    the first error (the files concerned stay in the spool; merging them again changes
    nothing).
    """

    def __init__(self, config: Config, now_ns: int) -> None:
        self.config, self.now_ns = config, now_ns
        self.batches: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="llem-dispose")

    def __enter__(self) -> _Disposer:
        self.thread.start()
        return self

    def put(self, paths: list[str]) -> None:
        if self.error is not None:
            raise self.error
        self.batches.put(paths)

    def _run(self) -> None:
        while (paths := self.batches.get()) is not None:
            if self.error is None:
                try:
                    _dispose(self.config, paths, self.now_ns)
                except (OSError, LedgerError) as e:
                    self.error = e

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        self.batches.put(None)
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error


def _dispose(config: Config, paths: list[str], now_ns: int) -> None:
    if config.aggregate.processed == "delete":
        for path in paths:
            _unlink(path)
        return
    day = time.strftime("%Y-%m-%d", time.gmtime(now_ns // 10**9))
    target = archive_dir(config) / day
    _private_dir(target)
    for path in paths:
        try:
            os.replace(path, target / os.path.basename(path))
        except FileNotFoundError:  # already gone: nothing to keep
            pass


def _quarantine(config: Config, cand: Candidate) -> None:
    target = quarantine_dir(config)
    _private_dir(target)
    log.warning("quarantined %s: %s", cand.name, cand.reason)
    reason = {
        "file": cand.name,
        "reason": cand.reason,
        "owner_uid": cand.owner_uid,
        "size": cand.size,
        "sha256": cand.sha,
        "ts_ns": time.time_ns(),
    }
    # A name llem never wrote may be too long for a ".reason" beside it: fall back to its hash.
    reason_name = cand.name + ".reason"
    if len(reason_name.encode()) > 255:
        reason_name = f"sha256-{cand.sha}.reason"
    try:
        write_atomic(
            target, reason_name, (json.dumps(reason, sort_keys=True) + "\n").encode(), 0o640
        )
        os.replace(cand.path, target / cand.name)
    except FileNotFoundError:
        pass
    except OSError as e:  # the ledger has logged it; the file stays and is retried next pass
        log.error("cannot move %s to the quarantine %s: %s", cand.path, target, e)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWOTH:
        raise LedgerError(f"{path}: not a private directory; refusing to move slices there")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def watch(
    config: Config,
    every_s: float,
    *,
    stop: Callable[[], bool] = lambda: False,
    on_pass: Callable[[AggregateResult], None] | None = None,
) -> None:
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
