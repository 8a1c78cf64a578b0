"""Named windows of ``llem wrap`` inside a Slurm job, kept by the node sampler.

The user's process cannot read root-only counters or write the root-owned store; it asks the
node's sampler over its Unix socket, which checks who is asking (SO_PEERCRED).

The socket is reachable by every user of the node, so the server treats each request as
hostile (``docs/security.md``, "The window server"): connections are capped per uid and in
all, a request must arrive whole within :data:`REQUEST_DEADLINE_S` and within
:data:`MAX_REQUEST_BYTES`, it is checked (op, job, owner, process) before it may wake the
sampler, the readings that requests force are rate-limited per job and spaced, and a job
holds at most :data:`MAX_WINDOWS_PER_JOB` windows with names of at most
:data:`MAX_NAME_CHARS` characters. An ``accept()`` error (out of descriptors, memory or
buffers) is logged and backed off; the server keeps accepting.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from llem.errors import LlemError
from llem.slices import MAX_UNIT_CHARS, MAX_WORK
from llem.sockserve import (
    ConnectionCaps,
    Refused,
    accept_forever,
    peer_cred,
    read_line,
    start_thread,
)

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0

# -- the limits (documented in docs/security.md; the client stays inside them) ---------------
MAX_REQUEST_BYTES = 4096
"""A request is one JSON line of at most this many bytes."""
REQUEST_DEADLINE_S = 5.0
"""The whole request must arrive within this time of the connection's accept."""
ANSWER_WAIT_S = 8.0
"""How long a request waits for the sampler's reading that answers it."""
MAX_CONNECTIONS = 64
"""Connections served at once, all peers together (one thread each)."""
MAX_CONNECTIONS_PER_UID = 8
"""Connections served at once for one uid; root is counted like any other uid."""
MAX_WINDOWS_PER_JOB = 1000
"""Windows one job run may open on one node."""
MAX_NAME_CHARS = 128
"""The longest window name."""
MAX_STEP_CHARS = 32
DEFAULT_UNIT = "units"
"""The unit of a work count given without one."""
FORCED_READS_PER_JOB_S = 1.0
"""Readings one job's requests may force per second; more requests share them."""
MIN_READ_SPACING_S = 0.25
"""A forced reading comes at least this long after the last reading and before the next
regular one: reads closer than that could only turn a counter's update steps into gaps."""


INTERNAL_ERROR = "the node sampler could not serve this request (its log has the reason)"
"""What a peer is told when serving its request failed inside the sampler: never the
exception's text, which can name root's paths."""


class WindowError(LlemError):
    """The node sampler refused or could not be reached."""


def socket_path(run_dir: str, env: Mapping[str, str]) -> Path | None:
    node = env.get("SLURMD_NODENAME")
    if not node or "/" in node or node.startswith("."):
        return None
    return Path(run_dir) / node / "sampler.sock"


def listen_socket(path: Path) -> socket.socket:
    """The window server's listening socket at ``path`` (a stale one replaced), open to every
    user: each request is checked when it is served.

    The node sampler makes it as soon as it holds the node's lock, before it opens its
    sensors (which can take seconds), and the cold Prolog waits for that. A job that starts
    meanwhile connects at once and waits in the backlog for its answer, where it used to find
    no socket and measure standalone (seen in a real-Slurm test: the first job's window).
    """
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # any user may connect; each request is checked
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_inode(path: Path) -> int | None:
    """The inode of the file at ``path`` (None when there is none): a listener removes the
    socket file only while it is still its own, never a successor's made at the same path."""
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _unlink_if_ours(path: Path, inode: int | None) -> None:
    if inode is not None and _socket_inode(path) == inode:
        try:
            path.unlink()
        except OSError:
            pass


def _exchange(path: Path, message: dict, timeout_s: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall((json.dumps(message) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def request(
    path: Path,
    message: dict,
    timeout_s: float = TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Send one request, return the sampler's answer; WindowError when refused or unreachable.

    A server that is busy (its connection caps are reached) is asked again, with a growing
    pause, until ``timeout_s`` has passed.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        try:
            data = _exchange(path, message, max(0.1, deadline - time.monotonic()))
        except OSError as e:
            # The reason, never the socket's path: llem doctor names it for the admin.
            reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or "failed"
            raise WindowError(f"node sampler not reachable ({reason})") from e
        try:
            answer = json.loads(data.decode())
        except ValueError as e:
            raise WindowError("node sampler gave a malformed answer") from e
        if not isinstance(answer, dict):
            raise WindowError("node sampler gave a malformed answer")
        if answer.get("busy") and time.monotonic() + pause < deadline:
            sleep(pause)
            pause = min(1.0, pause * 2)
            continue
        if not answer.get("ok"):
            raise WindowError(f"node sampler refused: {answer.get('error', 'no reason given')}")
        return answer


def open_window(path: Path, env: Mapping[str, str], name: str | None) -> dict:
    name = name or "window"
    if len(name) > MAX_NAME_CHARS:
        raise WindowError(
            f"window names are at most {MAX_NAME_CHARS} characters (this one has {len(name)})"
        )
    return request(
        path,
        {
            "op": "open",
            "job_id": env.get("SLURM_JOB_ID", ""),
            "step_id": env.get("SLURM_STEP_ID"),
            "name": name,
            "pid": os.getpid(),
        },
    )


def check_work(work: object, unit: object) -> tuple[float | None, str | None]:
    """The work of a window, checked: a finite count in [0, MAX_WORK] (or None) and a unit
    of at most MAX_UNIT_CHARS printable characters (``units`` when only a count is given).

    Raises:
        ValueError: the count or the unit is not acceptable; the message says why.
    """
    if work is not None:
        if type(work) not in (int, float) or not (0 <= work <= MAX_WORK):  # NaN fails too
            raise ValueError(f"work must be a count between 0 and {MAX_WORK:g}")
        work = float(work)
    if unit is not None:
        if (
            type(unit) is not str
            or not 0 < len(unit) <= MAX_UNIT_CHARS
            or not unit.isprintable()
            or unit.strip() != unit
        ):
            raise ValueError(
                f"the unit of work must be a word of at most {MAX_UNIT_CHARS} printable characters"
            )
    elif work is not None:
        unit = DEFAULT_UNIT
    return work, unit  # type: ignore[return-value]


def close_window(
    path: Path,
    env: Mapping[str, str],
    window_id: int,
    work: float | None = None,
    unit: str | None = None,
) -> dict:
    """Close a window; ``work`` and ``unit``, when given, are kept with it (issue 18)."""
    message: dict = {"op": "close", "job_id": env.get("SLURM_JOB_ID", ""), "window_id": window_id}
    try:
        work, unit = check_work(work, unit)
    except ValueError as e:
        raise WindowError(str(e)) from e
    if work is not None:
        message["work"] = work
    if unit is not None:
        message["unit"] = unit
    return request(path, message)


def ping(path: Path, timeout_s: float = 2.0) -> dict:
    """Ask the server whether it answers (it does not wake the sampler); WindowError if not."""
    return request(path, {"op": "ping"}, timeout_s=timeout_s)


# -- the server side, in the node sampler ----------------------------------------------------


def check_request(message: object) -> dict:
    """The request's fields, checked and normalised; Refused with the reason otherwise."""
    if not isinstance(message, dict):
        raise Refused("bad request: not a JSON object")
    op = message.get("op")
    if op not in ("open", "close"):
        raise Refused(f"unknown op {str(op)[:20]!r}")
    job_id = message.get("job_id")
    if not isinstance(job_id, str) or not job_id.isdigit() or len(job_id) > 20:
        raise Refused("job_id must be a Slurm job id")
    out = {"op": op, "job_id": job_id}
    if op == "open":
        name = message.get("name", "window") or "window"
        if not isinstance(name, str):
            raise Refused("the window name must be a string")
        if len(name) > MAX_NAME_CHARS:
            raise Refused(f"window names are at most {MAX_NAME_CHARS} characters")
        step = message.get("step_id")
        if step is not None and (type(step) not in (str, int) or len(str(step)) > MAX_STEP_CHARS):
            raise Refused("step_id must be a Slurm step id")
        out["name"] = name
        out["step_id"] = None if step in (None, "") else str(step)
    else:
        window_id = message.get("window_id")
        if type(window_id) is not int or not 0 < window_id < 2**63:
            raise Refused("window_id must be a window id")
        out["window_id"] = window_id
        try:
            out["work"], out["unit"] = check_work(message.get("work"), message.get("unit"))
        except ValueError as e:
            raise Refused(str(e)) from None
    return out


class _Job:
    """What the server thread knows of a running job, between two readings."""

    __slots__ = ("uid", "windows")

    def __init__(self, uid: int | None, windows: int) -> None:
        self.uid = uid
        self.windows = windows


class WindowServer:
    """``llem wrap`` inside a job opens and closes named windows over a Unix socket.

    Each connection is served by a thread of its own, within the caps. The peer is checked
    with SO_PEERCRED, in that thread, before anything else happens: the job's owner (or root),
    and where the node puts jobs in cgroups, a process inside the job's cgroup. Only then is
    the request queued for the sampler's thread (one SQLite writer), which checks it again and
    answers it after its next reading; the reading is forced only within the rate limits.

    Args:
        path: the socket.
        sampler: the sampler (its ``wake`` event; ``next_deadline_ns`` when it has one).
        store: the node store (read and written in the sampler's thread only).
        ingest_pending: called when a request names a job not registered yet.
        pending_job: whether a job's start registration waits to be taken in.
        monotonic_s: the clock of the limits.
        sock: the listening socket, when made beforehand (:func:`listen_socket`); else
            :meth:`start` makes it.
    """

    def __init__(
        self,
        path: Path,
        sampler,
        store,
        ingest_pending=None,
        pending_job: Callable[[str], bool] | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
        sock: socket.socket | None = None,
    ) -> None:
        self.path = path
        self.sampler = sampler
        self.store = store
        self.ingest_pending = ingest_pending
        self.pending_job = pending_job
        self.monotonic_s = monotonic_s
        self.requests: queue.Queue = queue.Queue()
        self._sock: socket.socket | None = sock  # made early by the sampler, or by start()
        self._inode = _socket_inode(path) if sock is not None else None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._caps = ConnectionCaps(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_UID)
        self._planned_at: float | None = None
        self._last_forced: dict[str, float] = {}
        self._last_read_s = float("-inf")
        self.forced_reads = 0

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self.refresh_jobs()
        if self._sock is None:
            self._sock = listen_socket(self.path)
            self._inode = _socket_inode(self.path)
        self._thread = threading.Thread(target=self._serve, name="llem-windows", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file, if it is still this server's (closing
        twice, or after a successor bound the path, removes nothing of the successor's)."""
        self._closing.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self._sock.close()
            except OSError:
                pass
        _unlink_if_ours(self.path, self._inode)
        self._inode = None
        while True:  # nobody waits forever on a sampler that is going away
            try:
                _, reply = self.requests.get_nowait()
            except queue.Empty:
                break
            reply.put({"ok": False, "error": "the node sampler is stopping"})

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the accept loop -------------------------------------------------------------------

    def _serve(self) -> None:
        accept_forever(self._sock, self._admit, self._closing, "window server")  # type: ignore[arg-type]

    def _admit(self, conn: socket.socket, _address: object = None) -> None:
        """Serve the connection in a thread of its own, or refuse it at once (caps reached)."""
        try:
            pid, uid, _gid = peer_cred(conn)
        except OSError:
            conn.close()
            return
        if not self._caps.admit(uid):
            conn.setblocking(False)
            self._reply(
                conn, {"ok": False, "busy": True, "error": "too many connections; try again"}
            )
            conn.close()
            return
        if not start_thread(lambda: self._handle(conn, pid, uid), "llem-window"):
            # no thread to be had: the peer is refused like a busy one
            self._caps.release(uid)
            conn.close()

    # -- one connection --------------------------------------------------------------------

    def _handle(self, conn: socket.socket, pid: int, uid: int) -> None:
        try:
            with conn:
                self._reply(conn, self._serve_one(conn, pid, uid))
        finally:
            self._caps.release(uid)

    def _serve_one(self, conn: socket.socket, pid: int, uid: int) -> dict:
        try:
            message = json.loads(self._read_request(conn).decode("utf-8"))
            if isinstance(message, dict) and message.get("op") == "ping":
                return {"ok": True, "op": "ping"}
            request = check_request(message)
            self._admissible(pid, uid, request)
        except Refused as e:
            return {"ok": False, "error": str(e)}
        except (OSError, ValueError) as e:
            # The peer gets a fixed text; the exception's own (a decoder's, an OS error's)
            # stays in root's log.
            log.debug("window server: bad request from uid %d: %s", uid, e)
            return {"ok": False, "error": "bad request: not one line of JSON"}
        except RecursionError:  # JSON nested deeper than the parser goes
            return {"ok": False, "error": "bad request: nested too deep"}
        reply: queue.Queue = queue.Queue(maxsize=1)
        self.requests.put(((pid, uid, request), reply))
        self._ask_for_reading(request["job_id"], reply)
        try:
            return reply.get(timeout=ANSWER_WAIT_S)
        except queue.Empty:
            return {"ok": False, "error": "the node sampler did not answer in time"}

    def _read_request(self, conn: socket.socket) -> bytes:
        """One line, whole within the deadline (not a timeout re-armed by each byte)."""
        return read_line(
            conn,
            max_bytes=MAX_REQUEST_BYTES,
            deadline_s=REQUEST_DEADLINE_S,
            monotonic_s=self.monotonic_s,
        )

    def _admissible(self, pid: int, uid: int, request: dict) -> None:
        """Refuse a request the peer may not make, from what the server thread knows."""
        job_id = request["job_id"]
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            if self.pending_job is not None and self.pending_job(job_id):
                return  # its Prolog just ran: the sampler's thread takes it in and checks
            raise Refused(f"job {job_id} is not running on this node")
        refusal = _peer_refusal(pid, uid, job_id, job.uid)
        if refusal is not None:
            raise Refused(refusal)
        if request["op"] == "open" and job.windows >= MAX_WINDOWS_PER_JOB:
            raise Refused(
                f"job {job_id} has {MAX_WINDOWS_PER_JOB} windows on this node, "
                "the most one job may open"
            )

    def _ask_for_reading(self, job_id: str, reply: queue.Queue) -> None:
        """Wake the sampler for the request, within the rate limits.

        Every queued request is answered after the next reading, whoever caused it. So a
        request wakes the sampler only when no wake is planned yet, no sooner than
        :data:`FORCED_READS_PER_JOB_S` allows for its job and :data:`MIN_READ_SPACING_S`
        after the last reading, and not at all when the regular reading comes first.
        """
        with self._lock:
            now = self.monotonic_s()
            if self._planned_at is not None:
                return
            at = max(
                now,
                self._last_read_s + MIN_READ_SPACING_S,
                self._last_forced.get(job_id, float("-inf")) + 1 / FORCED_READS_PER_JOB_S,
            )
            next_regular = getattr(self.sampler, "next_deadline_ns", None)
            if next_regular is not None and next_regular / 1e9 - at < MIN_READ_SPACING_S:
                return  # the regular reading answers it
            self._planned_at = at
            self._last_forced[job_id] = at
        self._closing.wait(max(0.0, at - now))
        with self._lock:
            self._planned_at = None
            answered = reply.full()
        if not answered:
            self.forced_reads += 1
            self.sampler.wake.set()

    @staticmethod
    def _reply(conn: socket.socket, answer: dict) -> None:
        try:
            conn.sendall((json.dumps(answer) + "\n").encode())
        except OSError:
            pass

    # -- in the sampler's thread, after each reading ----------------------------------------

    def refresh_jobs(self) -> None:
        """What the server thread checks requests against: running jobs and their windows."""
        counts = self.store.window_counts_of_running()
        jobs: dict[str, _Job] = {}
        for run in self.store.running_jobs():
            known = jobs.get(run.job_id)
            windows = counts.get(run.run_id, 0)
            if known is None or windows > known.windows:
                jobs[run.job_id] = _Job(run.uid, windows)
        with self._lock:
            self._jobs = jobs

    def process(self, interval_id: int, interval) -> None:
        with self._lock:
            self._last_read_s = self.monotonic_s()
        while True:
            try:
                (pid, uid, request), reply = self.requests.get_nowait()
            except queue.Empty:
                break
            try:
                reply.put(self._answer(pid, uid, request, interval_id, interval))
            except Exception:  # one bad request must not stop the sampler
                # The detail (an exception naming the store's path, say) is root's: the log.
                log.exception("window request of uid %d failed: %r", uid, request)
                reply.put({"ok": False, "error": INTERNAL_ERROR})
        self.refresh_jobs()

    def _answer(self, pid: int, uid: int, request: dict, interval_id: int, interval) -> dict:
        try:
            request = check_request(request)
        except Refused as e:
            return {"ok": False, "error": str(e)}
        job_id = request["job_id"]
        job = self._running_run(job_id)
        if job is None:
            return {"ok": False, "error": f"job {job_id} is not running on this node"}
        refusal = _peer_refusal(pid, uid, job.job_id, job.uid)
        if refusal is not None:
            return {"ok": False, "error": refusal}
        if request["op"] == "open":
            return self._open(pid, uid, request, job, interval_id, interval)
        return self._close(uid, request, job, interval_id, interval)

    def _running_run(self, job_id: str):
        """The job's latest running run; a job whose Prolog just ran is ingested first."""
        runs = self.store.runs_of(job_id, "running")
        if not runs and self.ingest_pending is not None:
            self.ingest_pending()
            runs = self.store.runs_of(job_id, "running")
        return max(runs, key=lambda r: r.start_ns) if runs else None

    def _open(self, pid: int, uid: int, request: dict, job, interval_id: int, interval) -> dict:
        if self.store.window_count(job.run_id) >= MAX_WINDOWS_PER_JOB:
            return {
                "ok": False,
                "error": f"job {job.job_id} has {MAX_WINDOWS_PER_JOB} windows "
                "on this node, the most one job may open",
            }
        window_id = self.store.open_window(
            job.run_id,
            job.job_id,
            request["step_id"],
            request["name"],
            uid,
            pid,
            interval.end_ns,
            interval_id,
            _raw_counters(interval),
        )
        with self._lock:
            known = self._jobs.get(job.job_id)
            if known is not None:
                known.windows += 1
        return {"ok": True, "window_id": window_id, "start_ns": interval.end_ns}

    def _close(self, uid: int, request: dict, job, interval_id: int, interval) -> dict:
        window_id = request["window_id"]
        found = self.store.window(window_id)
        if found is None or found[0] != job.run_id:
            return {"ok": False, "error": f"no window {window_id} in job {job.job_id}"}
        run_id, owner, start_interval, status, start_ns = found
        if uid != 0 and uid != owner:
            return {"ok": False, "error": "permission denied: not your window"}
        if status != "open":
            return {"ok": False, "error": f"window {window_id} is already {status}"}
        energy = self.store.run_energy_between(run_id, start_interval, interval_id)
        self.store.close_window(
            window_id,
            interval.end_ns,
            interval_id,
            _raw_counters(interval),
            energy,
            request.get("work"),
            request.get("unit"),
        )
        covered_ns = self.store.covered_ns_between(start_interval, interval_id, run_id)
        span_ns = max(1, interval.end_ns - start_ns)
        return {
            "ok": True,
            "window_id": window_id,
            "start_ns": start_ns,
            "end_ns": interval.end_ns,
            "energy_uj": energy,
            "devices": self._devices_of(energy),
            "coverage": round(min(1.0, covered_ns / span_ns), 4),
            "work": request.get("work"),
            "unit": request.get("unit"),
            "policy": _policy(getattr(job, "attribution", None)),
        }

    def _devices_of(self, energy: dict[str, int]) -> dict[str, dict]:
        return {
            key: {
                "component": d["component"],
                "device": d["name"],
                "source": d["source"],
                "sensor": d["sensor"],
                "method": d["method"],
            }
            for key, d in self.store.devices().items()
            if key in energy
        }


def _peer_refusal(pid: int, uid: int, job_id: str, job_uid: int | None) -> str | None:
    """Why the peer may not use the job's windows, or None: root, or the job's owner from a
    process inside the job's cgroup (where the node has job cgroups)."""
    from llem.node.usage import pid_in_job_cgroup

    if uid == 0:
        return None
    if uid != job_uid:
        return f"permission denied: job {job_id} is not yours"
    if pid_in_job_cgroup(pid, job_id) is False:
        return f"permission denied: process {pid} is not in job {job_id}"
    return None


def _policy(attribution: str | None) -> str | None:
    """The attribution policy of a run (``exclusive``, ``hybrid``...), or None."""
    try:
        value = json.loads(attribution) if attribution else None
    except ValueError:
        return None
    return value.get("policy") if isinstance(value, dict) else None


def _raw_counters(interval) -> dict[str, int]:
    return {r.device_key: r.raw_uj for r in interval.rows if r.raw_uj is not None}
