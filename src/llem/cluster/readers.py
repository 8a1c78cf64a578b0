"""Reading and checking spool files, in the aggregator or in reader processes beside it.

:func:`read_candidate` opens one spool file without following links, checks its owner, mode
and size, decodes and validates it, and turns a good slice into the ledger's rows
(:func:`llem.cluster.ledger.prepare`). It never raises for a bad file: ``reason`` says why.

That work is most of a pass's CPU time, so :func:`read_all` hands it to reader processes
(:func:`main`) when the spool is large, while the aggregator only writes the ledger. A reader
is a fresh, isolated interpreter (``-I``, run from ``/``) started with ``close_fds``: it holds
neither the aggregator's lock nor its database, it refuses to run code other than the
aggregator's (:func:`wire_fingerprint`), and it leaves on its own when the aggregator dies
(end of its input, or a broken output pipe). Results come back in spool order, whatever the
number of readers, as :mod:`marshal` data (plain values only, nothing that runs code). If a
reader fails, the rest of the pass is read in the aggregator itself.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import marshal
import os
import queue
import re
import stat
import struct
import subprocess
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import llem
from llem import slices
from llem.cluster.ledger import Prepared, digest, prepare

log = logging.getLogger(__name__)

MAX_SLICE_BYTES = 64 * 1024 * 1024
CHUNK = 64
"""Slices per message to and from a reader process."""
AHEAD_SLICES = 1024
"""Slices the readers together may have read ahead of the merge: more than one merge batch,
so that they keep reading while a batch is written (and a bound on memory)."""
MIN_SLICES_PER_READER = 500
"""Below this many slices per reader, starting one (~60 ms) costs more than it saves."""
MAX_READERS = 4
MAX_REASON_CHARS = 500
"""A quarantine reason is about the file, never a copy of it."""
_FRAME = struct.Struct("<Q")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class Candidate:
    """One spool file, read and judged."""

    path: str
    prepared: Prepared | None = None
    sha: str = ""
    reason: str | None = None
    newer: str | None = None
    owner_uid: int | None = None
    size: int | None = None
    gone: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def to_wire(self) -> tuple:
        return (
            self.path,
            self.prepared,
            self.sha,
            self.reason,
            self.newer,
            self.owner_uid,
            self.size,
            self.gone,
        )

    @classmethod
    def from_wire(cls, wire: tuple) -> Candidate:
        path, prepared, sha, reason, newer, owner_uid, size, gone = wire
        return cls(path, prepared, sha, reason, newer, owner_uid, size, gone)


# -- one file ----------------------------------------------------------------------------------


def read_candidate(
    path: str | os.PathLike, *, euid: int | None = None, header_uids: frozenset[int] = frozenset()
) -> Candidate:
    """Read and check one spool file; never raises for a bad file (``reason`` says why).

    Args:
        path: the file.
        euid: the aggregator's effective uid (default: this process's).
        header_uids: owners besides root whose *header* slices are accepted (slurmctld's
            EpilogSlurmctld runs as SlurmctldUser).
    """
    euid = os.geteuid() if euid is None else euid
    cand = Candidate(os.fspath(path))
    raw = b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        cand.gone = True
        return cand
    except OSError as e:
        cand.reason = (
            "a symlink, refused" if e.errno == errno.ELOOP else f"cannot open: {e.strerror}"
        )
        return cand
    try:
        st = os.fstat(fd)
        cand.owner_uid, cand.size = st.st_uid, st.st_size
        trusted = header_uids if cand.name.startswith("header.") else frozenset()
        cand.reason = _check_file(st, euid, trusted)
        if cand.reason is None:
            raw = _read_all(fd, st.st_size)
    finally:
        os.close(fd)
    cand.sha = digest(raw)
    if cand.reason is None:
        _judge(cand, raw)
    return cand


def _check_file(st: os.stat_result, euid: int, trusted: frozenset[int]) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if euid == 0 and st.st_uid != 0 and st.st_uid not in trusted:
        return (
            f"owned by uid {st.st_uid}, not root: slices come only from root's Epilog "
            "(dropped by a user?)"
        )
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


def _judge(cand: Candidate, raw: bytes) -> None:
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        cand.reason = "corrupt: not UTF-8"
        return
    except json.JSONDecodeError as e:
        # A string left open reached the end of the data (json reports where it started).
        near_end = e.pos >= len(raw.rstrip()) - 1 or e.msg.startswith("Unterminated string")
        cand.reason = (
            f"truncated: JSON ends early ({e.msg} at byte {e.pos})"
            if near_end
            else f"corrupt: not JSON ({e.msg} at byte {e.pos})"
        )
        return
    except RecursionError:
        cand.reason = "corrupt: JSON nested too deeply"
        return
    except ValueError as e:  # not JSONDecodeError: Python's limit on integer digits
        cand.reason = f"corrupt: a number too long to read ({str(e).split(':')[0]})"
        return
    if _SURROGATE_ESCAPE.search(raw):
        # Text that is not Unicode (a job name made of bytes that are not UTF-8, escaped by
        # the exporter as lone surrogates) cannot be stored: each such character becomes
        # U+FFFD, and the job's energy is kept.
        data = slices.replace_lone_surrogates(data)
    try:
        slices.validate(data)
        slices.check_name_matches(cand.name, data)
        cand.prepared = prepare(data, cand.sha)
    except slices.NewerSchema as e:
        cand.newer = str(e)
    except slices.SliceError as e:
        cand.reason = f"foreign or impossible: {e}"
    except (LookupError, TypeError, ValueError, OverflowError) as e:
        # validate() should have refused it; never let one slice stop every pass
        cand.reason = f"cannot be stored: {type(e).__name__}: {e}"
    except Exception as e:  # RecursionError, MemoryError's kin: still this file's fault
        cand.reason = f"cannot be checked: {type(e).__name__}: {e}"
    if cand.reason is not None and len(cand.reason) > MAX_REASON_CHARS:
        cand.reason = cand.reason[: MAX_REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cycle collector for a pass.

    A pass builds millions of small, acyclic containers (decoded slices and their rows),
    which are freed by reference counting alone; left on, the collector keeps rescanning the
    live batch and costs a third of the time of decoding and unmarshalling.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# -- many files --------------------------------------------------------------------------------


def reader_count(setting: str | int, n_slices: int, cpus: int | None = None) -> int:
    """How many reader processes a pass of ``n_slices`` gets.

    ``setting`` is ``aggregate.readers``: ``"auto"`` (one fewer than the CPUs this process
    may use, at most :data:`MAX_READERS`, and none for a small pass) or a number (0: read in
    the aggregator).
    """
    if setting != "auto":
        return min(int(setting), max(1, -(-n_slices // CHUNK))) if n_slices else 0
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(0, min(cpus - 1, MAX_READERS, n_slices // MIN_SLICES_PER_READER))


def read_all(
    paths: list[str | os.PathLike],
    *,
    readers: int = 0,
    header_uids: frozenset[int] = frozenset(),
    ahead: int = AHEAD_SLICES,
) -> Iterator[Candidate]:
    """Read and judge ``paths``, yielding candidates in the same order.

    Args:
        paths: spool files.
        readers: reader processes to use (0: read here).
        header_uids: see :func:`read_candidate`.
        ahead: how many slices the readers may have ready before they are taken.
    """
    names = [os.fspath(p) for p in paths]
    chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
    done = 0
    if readers > 0 and chunks:
        pool = None
        try:
            pool = _Pool(readers, chunks, header_uids, ahead)
            for number in range(len(chunks)):
                yield from pool.result(number)
                done = number + 1
        except _ReaderFailed as e:
            log.warning("%s; reading the rest of the spool in the aggregator", e)
        finally:
            if pool is not None:
                pool.close()
    for chunk in chunks[done:]:
        for path in chunk:
            yield read_candidate(path, header_uids=header_uids)


class _ReaderFailed(Exception):
    pass


class _Pool:
    """Reader processes, each given every n-th chunk; results are taken back in order."""

    def __init__(
        self, n: int, chunks: list[list[str]], header_uids: frozenset[int], ahead: int
    ) -> None:
        self.stop = threading.Event()
        self.readers: list[_Reader] = []
        per_reader = max(2, -(-ahead // (CHUNK * n)))
        try:
            for k in range(n):
                self.readers.append(_Reader(chunks[k::n], header_uids, self.stop, per_reader))
        except Exception as e:  # OSError, or a thread that cannot start
            self.close()
            raise _ReaderFailed(f"cannot start a reader process: {e}") from e

    def result(self, number: int) -> list[Candidate]:
        reader = self.readers[number % len(self.readers)]
        item = reader.results.get()
        if item is None:
            try:
                status = reader.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                status = None
            raise _ReaderFailed(f"reader process {reader.proc.pid} ended early (status {status})")
        if isinstance(item, str):
            raise _ReaderFailed(f"reader process {reader.proc.pid} {item}")
        return item

    def close(self) -> None:
        self.stop.set()
        for reader in self.readers:
            reader.close()


# How a reader starts: isolated (-I: no PYTHON* variables, no user site, not the current
# folder on sys.path, run from /), with the aggregator's own llem folder appended to the path
# so that it finds llem even when only the aggregator's sys.path had it.
_BOOT = (
    "import sys; sys.path.append(sys.argv[1]); "
    f"from {__name__} import main; sys.exit(main(sys.argv[2:]))"
)


class _Reader:
    def __init__(
        self,
        chunks: list[list[str]],
        header_uids: frozenset[int],
        stop: threading.Event,
        ahead: int,
    ) -> None:
        if not sys.executable:
            raise OSError("no Python interpreter path (sys.executable is empty)")
        package_root = str(Path(llem.__file__).resolve().parent.parent)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                _BOOT,
                package_root,
                wire_fingerprint(),
                ",".join(str(u) for u in sorted(header_uids)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
            close_fds=True,
        )
        self.stop = stop
        # a chunk's candidates, a failure's words, or None at the end
        self.results: queue.Queue[list[Candidate] | str | None] = queue.Queue(maxsize=ahead)
        self.threads = [
            threading.Thread(
                target=self._send, args=(chunks,), daemon=True, name="llem-reader-send"
            ),
            threading.Thread(target=self._receive, daemon=True, name="llem-reader-receive"),
        ]
        for thread in self.threads:
            thread.start()

    def _send(self, chunks: list[list[str]]) -> None:
        assert self.proc.stdin is not None
        try:
            for chunk in chunks:
                if self.stop.is_set():
                    break
                _write_frame(self.proc.stdin, marshal.dumps(chunk))
        except (OSError, ValueError):  # the reader died or was closed: _receive says so
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _receive(self) -> None:
        """Read the reader's frames and turn each into its candidates here, in this thread:
        the aggregator's own thread waits for the database much of the time (without the
        GIL), and unmarshalling meanwhile takes that much off the pass's longest chain."""
        assert self.proc.stdout is not None
        while not self.stop.is_set():
            try:
                frame = _read_frame(self.proc.stdout)
            except (OSError, ValueError):
                frame = None
            item = None if frame is None else _candidates(frame)
            while not self.stop.is_set():
                try:
                    self.results.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if not isinstance(item, list):
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for thread in self.threads:
            thread.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


def _candidates(frame: bytes) -> list[Candidate] | str:
    """A reader's frame as its candidates, or why it cannot be used. Never raises: it runs
    in the receiving thread, and a thread that died would leave the aggregator waiting for
    its next result, with the lock held, for ever."""
    try:
        status, payload = marshal.loads(frame)
        if status == "ok":
            return [Candidate.from_wire(w) for w in payload]
    except Exception as e:  # noqa: BLE001 - any shape of garbage: the aggregator reads on
        return f"sent garbage: {e}"
    return f"failed: {payload}"


def _write_frame(out: BinaryIO, payload: bytes) -> None:
    out.write(_FRAME.pack(len(payload)))
    out.write(payload)
    out.flush()


def _read_frame(inp: BinaryIO) -> bytes | None:
    head = _read_exactly(inp, _FRAME.size)
    if head is None:
        return None
    body = _read_exactly(inp, _FRAME.unpack(head)[0])
    if body is None:
        raise ValueError("frame cut short")
    return body


def _read_exactly(inp: BinaryIO, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        part = inp.read(n - got)
        if not part:
            if got:
                raise ValueError("frame cut short")
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# -- the reader process ------------------------------------------------------------------------


def wire_fingerprint() -> str:
    """A digest of the code that makes and reads what readers send (bytecode and constants).

    The aggregator passes its own to each reader, which refuses to work with a different one:
    after an upgrade in place, a long-running ``llem aggregate --watch`` still runs the old
    code while a new reader would load the new, and their rows might not line up.
    """
    from llem.cluster import ledger

    digest_ = hashlib.sha256()
    for code in (
        *(f.__code__ for f in ledger.PREPARE_CODE),
        Candidate.to_wire.__code__,
        Candidate.from_wire.__func__.__code__,
        read_candidate.__code__,
        _judge.__code__,
    ):
        _code_digest(code, digest_)
    digest_.update(
        repr((ledger._INSERT_JOB_NODE, ledger._RUN_COLUMNS, ledger.SCHEMA_VERSION)).encode()
    )
    return digest_.hexdigest()[:16]


def _code_digest(code: types.CodeType, into: Any) -> None:
    into.update(code.co_code)
    into.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, into)
        elif isinstance(const, frozenset):  # its order varies with the hash seed
            into.update(repr(sorted(map(repr, const))).encode())
        else:
            into.update(repr(const).encode())


def main(argv: list[str] | None = None) -> int:
    """A reader process: ``main([FINGERPRINT, UIDS])`` (see :func:`serve`).

    FINGERPRINT is the aggregator's :func:`wire_fingerprint` (exit 3 if it differs); UIDS are
    the owners besides root whose header slices are accepted, comma-separated.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the aggregator's to handle
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != wire_fingerprint():
        print(
            f"{__name__}: this llem ({wire_fingerprint()}) is not the aggregator's "
            f"({argv[0] if argv else 'none'}); it reads the spool itself",
            file=sys.stderr,
        )
        return 3
    uids = argv[1] if len(argv) > 1 else ""
    header_uids = frozenset(int(u) for u in uids.split(",") if u)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the result stream
    gc.disable()  # see no_cyclic_gc
    return serve(inp, out, header_uids=header_uids, euid=os.geteuid())


def serve(inp: BinaryIO, out: BinaryIO, *, header_uids: frozenset[int], euid: int) -> int:
    """Answer frames of paths with frames of candidates until the input ends.

    Each input frame is a marshalled list of paths; each output frame is
    ``("ok", [candidate, ...])`` in the same order, or ``("error", traceback)`` when reading
    failed for a reason that is not the file's (a bug: the aggregator reads that chunk itself
    and reports it). Returns 0 at the end of the input, 1 when the output is closed (the
    aggregator is gone) or the input is cut mid-frame.
    """
    try:
        while (frame := _read_frame(inp)) is not None:
            try:
                answer = (
                    "ok",
                    [
                        read_candidate(p, euid=euid, header_uids=header_uids).to_wire()
                        for p in marshal.loads(frame)
                    ],
                )
            except Exception:
                answer = ("error", traceback.format_exc(limit=8))
            _write_frame(out, marshal.dumps(answer))
    except (BrokenPipeError, ValueError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
