"""The node sampler: one process per Slurm node name, serving every job on the node.

The first Prolog starts it (detached: double fork, ``setsid``, stdio to /dev/null, readiness
through a pipe), later Prologs only register their jobs in the node store, which the sampler
reads every interval. It splits each interval's energy among the running jobs
(:mod:`llem.attribution`), serves ``llem wrap`` windows over a Unix socket, and exits (after
``sampler.linger_s``) once no job is left.

Paths, per node name (several slurmd may share a host), under ``run_dir``:
``<node>/sampler.lock`` (held by the live sampler for its whole life: the liveness test that
no stale pid file or late-reaped zombie can fool), ``<node>/sampler.pid``, ``<node>/node.lock``
(serialises Prolog, Epilog and the sampler's decision to exit), ``<node>/sampler.sock``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

from llem.config import Config
from llem.errors import LlemError

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

PROBLEMS_KEEP = 200  # lines kept in problems.log


@dataclass(frozen=True)
class NodePaths:
    node: str
    run: Path
    store: Path

    @classmethod
    def of(cls, config: Config, node: str) -> "NodePaths":
        return cls(node, Path(config.run_dir) / node, Path(config.state_dir) / f"node-{node}.db")

    @property
    def sampler_lock(self) -> Path:
        return self.run / "sampler.lock"

    @property
    def pid_file(self) -> Path:
        return self.run / "sampler.pid"

    @property
    def node_lock(self) -> Path:
        return self.run / "node.lock"

    @property
    def socket(self) -> Path:
        return self.run / "sampler.sock"

    @property
    def problems(self) -> Path:
        return self.run / "problems.log"

    @property
    def jobs(self) -> Path:
        """Registrations dropped by the Slurm hooks (root only)."""
        return self.run / "jobs"

    def ensure(self) -> None:
        """Create the run folder: root-owned, traversable (users reach the socket)."""
        from llem.store.node import ensure_private_dir

        ensure_private_dir(self.run.parent, mode=0o755)
        ensure_private_dir(self.run, mode=0o755)
        os.chmod(self.run, 0o755)
        ensure_private_dir(self.jobs, mode=0o700)


def record_problem(paths: NodePaths, message: str) -> None:
    """Keep a problem where `llem doctor` shows it (never raises)."""
    try:
        paths.run.mkdir(parents=True, exist_ok=True)
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {message}\n"
        with open(paths.problems, "a") as f:
            f.write(line)
        lines = paths.problems.read_text().splitlines(keepends=True)
        if len(lines) > PROBLEMS_KEEP * 2:
            paths.problems.write_text("".join(lines[-PROBLEMS_KEEP:]))
    except OSError:
        pass


@contextmanager
def locked(path: Path, timeout_s: float = 10.0) -> Iterator[int]:
    """An exclusive flock on ``path``, waiting at most ``timeout_s``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LlemError(f"{path}: lock held by another process for {timeout_s} s")
                time.sleep(0.005)
        yield fd
    finally:
        os.close(fd)


def sampler_pid(paths: NodePaths) -> int | None:
    """The live sampler's pid, or None when no sampler holds the node's sampler lock."""
    try:
        fd = os.open(paths.sampler_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        try:
            return int(paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return -1  # alive, pid file not written yet
    finally:
        os.close(fd)


def _clean_env(env: Mapping[str, str]) -> dict[str, str]:
    """The sampler serves every job: none of one job's variables go with it."""
    drop = ("SLURM_", "SPANK_", "CUDA_", "SLURMD_")
    out = {k: v for k, v in env.items() if not k.startswith(drop)}
    out.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return out


def spawn_sampler(node: str, env: Mapping[str, str], timeout_s: float = 2.0) -> int:
    """Start a detached sampler for ``node``; return its pid once it exists.

    fork, setsid, fork again, chdir /, stdio to /dev/null, every other descriptor closed, the
    grandchild's pid reported through a pipe, then exec. slurmd kills the Prolog's process
    group when the Prolog exits: the sampler is in a session of its own by then.
    """
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "llem.cli.sampler", "--node", node, "--daemon"]
    child_env = _clean_env(env)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            os.chdir("/")
            os.umask(0o027)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, 65536)
            os.write(write_fd, str(os.getpid()).encode())
            os.close(write_fd)
            os.execve(argv[0], argv, child_env)
        finally:
            os._exit(127)
    os.close(write_fd)
    try:
        os.waitpid(pid, 0)
        import select

        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        data = os.read(read_fd, 32) if ready else b""
    finally:
        os.close(read_fd)
    if not data:
        raise LlemError("the sampler did not report its start in time")
    return int(data)


# -- the sampler process -----------------------------------------------------------------


class JobAttributor:
    """Reads the jobs' use of the node each interval and applies :func:`attribute`."""

    def __init__(self, store, node: str, devices, started_ns: int,
                 proc_root: str | os.PathLike = "/proc", cgroup_root: str | None = None) -> None:
        from llem.slurm import CgroupLocator, ProcScanner

        self.store = store
        self.node = node
        self.devices = {d.key: d for d in devices}
        self.gpu_by_minor = {str(d.attrs.get("minor")): d.key for d in devices
                             if d.component == "gpu" and d.attrs.get("minor") is not None}
        self.started_ns = started_ns
        self.proc = Path(proc_root)
        self.locator = CgroupLocator(Path(cgroup_root)) if cgroup_root else CgroupLocator()
        self.scanner = ProcScanner(proc_root)
        self._cpu_prev: dict[int, int] = {}
        self._busy_prev: int | None = None
        self.cgroups: dict[int, str] = {}

    def _node_busy_ns(self) -> int | None:
        try:
            fields = (self.proc / "stat").read_text().split("\n", 1)[0].split()
            ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))  # user nice system irq softirq
        except (OSError, ValueError, IndexError):
            return None
        from llem.slurm import CLK_TCK

        return ticks * 1_000_000_000 // CLK_TCK

    def _node_used_memory(self) -> int | None:
        try:
            info = {}
            for line in (self.proc / "meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
            return info["MemTotal"] - info["MemAvailable"]
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def __call__(self, interval):
        from llem.attribution import JobLoad, NodeLoad, attribute

        jobs = self.store.jobs("state = 'running' OR (state = 'ended' AND end_ns >= ?)",
                               (interval.start_ns,))
        busy = self._node_busy_ns()
        busy_delta = None if busy is None or self._busy_prev is None else busy - self._busy_prev
        self._busy_prev = busy
        loads = []
        proc_usage = None
        for job in jobs:
            usage = self.locator.usage(job.job_id, job.uid, self.node)
            if usage is None:
                if proc_usage is None:
                    proc_usage = self.scanner.usage_by_job({j.job_id for j in jobs})
                usage = proc_usage.get(job.job_id)
            else:
                self.cgroups[job.run_id] = usage.source
            cpu_delta = None
            if usage is not None and usage.cpu_ns is not None:
                prev = self._cpu_prev.get(job.run_id)
                if prev is None:
                    # A cgroup born after this sampler started counts from zero; otherwise
                    # (the sampler restarted mid-job) the first reading is only a baseline.
                    prev = 0 if job.start_ns >= self.started_ns else usage.cpu_ns
                cpu_delta = max(0, usage.cpu_ns - prev)
                self._cpu_prev[job.run_id] = usage.cpu_ns
            gpus = tuple(self.gpu_by_minor[m] for m in job.gpus if m in self.gpu_by_minor)
            loads.append(JobLoad(job.run_id, gpus, cpu_delta,
                                 usage.memory_bytes if usage else None))
        live = {j.run_id for j in jobs}
        self._cpu_prev = {k: v for k, v in self._cpu_prev.items() if k in live}
        shares, rest = attribute(interval.rows, self.devices, loads,
                                 NodeLoad(busy_delta, self._node_used_memory()))
        return replace(interval, shares=tuple(shares), remainder=tuple(rest))


class WindowServer:
    """``llem wrap`` inside a job opens and closes named windows over a Unix socket.

    The peer is checked with SO_PEERCRED: the job's owner (or root), and where the node puts
    jobs in cgroups, a process inside the job's cgroup. Requests are answered after the
    sampler took a reading, in the sampler's own thread (one SQLite writer).
    """

    def __init__(self, path: Path, sampler, store, ingest_pending=None) -> None:
        import queue

        self.path = path
        self.sampler = sampler
        self.store = store
        self.ingest_pending = ingest_pending
        """Called when a request names a job not registered yet (its Prolog just ran)."""
        self.requests: queue.Queue = queue.Queue()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        import socket

        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o666)  # any user may connect; each request is checked
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="llem-windows", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        try:
            self.path.unlink()
        except OSError:
            pass
        import queue

        while True:  # nobody waits forever on a sampler that is going away
            try:
                _, reply = self.requests.get_nowait()
            except queue.Empty:
                break
            reply.put({"ok": False, "error": "the node sampler is stopping"})

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()  # type: ignore[union-attr]
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        import queue
        import socket
        import struct

        with conn:
            conn.settimeout(10)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                pid, uid, _gid = struct.unpack("3i", creds)
                data = b""
                while not data.endswith(b"\n") and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data.decode("utf-8"))
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
            except (OSError, ValueError) as e:
                self._reply(conn, {"ok": False, "error": f"bad request: {e}"})
                return
            reply: queue.Queue = queue.Queue(maxsize=1)
            self.requests.put(((pid, uid, request), reply))
            self.sampler.wake.set()
            try:
                answer = reply.get(timeout=8)
            except queue.Empty:
                answer = {"ok": False, "error": "the node sampler did not answer in time"}
            self._reply(conn, answer)

    @staticmethod
    def _reply(conn: socket.socket, answer: dict) -> None:
        try:
            conn.sendall((json.dumps(answer) + "\n").encode())
        except OSError:
            pass

    # -- in the sampler's thread, after each reading ----------------------------------------

    def process(self, interval_id: int, interval) -> None:
        import queue

        while True:
            try:
                (pid, uid, request), reply = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put(self._answer(pid, uid, request, interval_id, interval))
            except Exception as e:  # one bad request must not stop the sampler
                log.exception("window request failed")
                reply.put({"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _answer(self, pid: int, uid: int, request: dict, interval_id: int, interval) -> dict:
        from llem.slurm import pid_in_job_cgroup

        op = request.get("op")
        job_id = str(request.get("job_id", ""))
        if op not in ("open", "close"):
            return {"ok": False, "error": f"unknown op {op!r}"}
        if not job_id.isdigit():
            return {"ok": False, "error": "job_id must be a Slurm job id"}
        runs = self.store.jobs("job_id = ? AND state = 'running'", (job_id,))
        if not runs and self.ingest_pending is not None:
            self.ingest_pending()
            runs = self.store.jobs("job_id = ? AND state = 'running'", (job_id,))
        if not runs:
            return {"ok": False, "error": f"job {job_id} is not running on this node"}
        job = max(runs, key=lambda r: r.start_ns)
        if uid != 0 and uid != job.uid:
            return {"ok": False, "error": f"permission denied: job {job_id} is not yours"}
        if uid != 0 and pid_in_job_cgroup(pid, job_id) is False:
            return {"ok": False, "error": f"permission denied: process {pid} is not in job "
                                          f"{job_id}"}
        if op == "open":
            name = str(request.get("name") or "window")[:128]
            step = request.get("step_id")
            step = None if step in (None, "") else str(step)[:32]
            cur = self.store.db.execute(
                "INSERT INTO windows (run_id, job_id, step_id, name, uid, pid, start_ns, "
                "start_mono_ns, counters_start, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
                (job.run_id, job_id, step, name, uid, pid, interval.end_ns, interval_id,
                 json.dumps(_raw_counters(interval))),
            )
            return {"ok": True, "window_id": cur.lastrowid, "start_ns": interval.end_ns}
        window_id = request.get("window_id")
        row = self.store.query(
            "SELECT run_id, uid, start_mono_ns, status FROM windows WHERE id = ?", (window_id,))
        if not row or row[0][0] != job.run_id:
            return {"ok": False, "error": f"no window {window_id} in job {job_id}"}
        run_id, owner, start_interval, status = row[0]
        if uid != 0 and uid != owner:
            return {"ok": False, "error": "permission denied: not your window"}
        if status != "open":
            return {"ok": False, "error": f"window {window_id} is already {status}"}
        energy = dict(self.store.query(
            "SELECT device_key, SUM(energy_uj) FROM job_energy WHERE run_id = ? AND "
            "interval_id > ? AND interval_id <= ? GROUP BY device_key",
            (run_id, start_interval, interval_id)))
        self.store.db.execute(
            "UPDATE windows SET end_ns = ?, end_mono_ns = ?, counters_end = ?, energy = ?, "
            "status = 'closed' WHERE id = ?",
            (interval.end_ns, interval_id, json.dumps(_raw_counters(interval)),
             json.dumps(energy, sort_keys=True), window_id),
        )
        devices = {
            key: {"component": c, "device": n, "source": src, "sensor": sen, "method": m}
            for key, c, n, src, sen, m in self.store.query(
                "SELECT key, component, name, source, sensor, method FROM devices")
            if key in energy
        }
        start_ns = self.store.query("SELECT start_ns FROM windows WHERE id = ?",
                                    (window_id,))[0][0]
        covered_ns = self.store.query(
            "SELECT COALESCE(SUM(end_ns - start_ns), 0) FROM intervals WHERE id > ? AND id <= ?",
            (start_interval, interval_id))[0][0]
        span_ns = max(1, interval.end_ns - start_ns)
        return {"ok": True, "window_id": window_id, "start_ns": start_ns,
                "end_ns": interval.end_ns, "energy_uj": energy, "devices": devices,
                "coverage": round(min(1.0, covered_ns / span_ns), 4)}


def _pid_is_mine(paths: NodePaths) -> bool:
    try:
        return int(paths.pid_file.read_text()) == os.getpid()
    except (OSError, ValueError):
        return False


class Housekeeping:
    """The sampler's chores between readings: export sealed jobs and the node's hours to the
    spool (through the node-local outbox, bounded in time), retry the outbox, prune old data.

    A failure is logged and recorded for `llem doctor`; it never stops the sampling.
    """

    NODE_EXPORT_EVERY_S = 300.0
    FLUSH_EVERY_S = 60.0
    PRUNE_EVERY_S = 86400.0
    DELIVERY_TIMEOUT_S = 0.5

    def __init__(self, store, config: Config, paths: "NodePaths") -> None:
        self.store = store
        self.config = config
        self.paths = paths
        now = time.monotonic()
        self._next_node_export = now + 5.0
        self._next_flush = now + self.FLUSH_EVERY_S
        self._next_prune = now + 60.0

    def _guard(self, what: str, body) -> None:
        try:
            body()
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", what)
            record_problem(self.paths, f"sampler: {what} failed: {type(e).__name__}: {e}")

    def job_sealed(self, run) -> None:
        from llem.export import export_job, deliver

        def export() -> None:
            data = export_job(self.store, run.run_id, self.config)
            deliver(self.config, data, timeout_s=self.DELIVERY_TIMEOUT_S)
            self.store.update_job(run.run_id, state="exported", exported_ns=data["created_ns"])

        self._guard(f"export of job {run.job_id}", export)

    def tick(self) -> None:
        from llem.export import export_node_since_last, flush_outbox, pending_slices, prune_by_config

        now = time.monotonic()
        if now >= self._next_node_export:
            self._next_node_export = now + self.NODE_EXPORT_EVERY_S
            self._guard("node export", lambda: export_node_since_last(
                self.store, self.config, self.paths.node))
        if now >= self._next_flush:
            self._next_flush = now + self.FLUSH_EVERY_S
            if pending_slices(self.config):
                self._guard("outbox flush", lambda: flush_outbox(
                    self.config, timeout_s=self.DELIVERY_TIMEOUT_S))
        if now >= self._next_prune:
            self._next_prune = now + self.PRUNE_EVERY_S
            self._guard("pruning", lambda: prune_by_config(self.store, self.config))


def _raw_counters(interval) -> dict[str, int]:
    return {r.device_key: r.raw_uj for r in interval.rows if r.raw_uj is not None}


def run_node_sampler(config: Config, node: str, interval_s: float | None = None,
                     env: Mapping[str, str] | None = None) -> int:
    """The body of ``llem sampler --node NODE --daemon``; returns the exit status."""
    from llem.nodejobs import finalize_ended, ingest, pending
    from llem.sampler import Sampler
    from llem.sensors import open_sensors
    from llem.store.node import Event, open_or_quarantine

    env = os.environ if env is None else env
    paths = NodePaths.of(config, node)
    paths.ensure()
    lock_fd = os.open(paths.sampler_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        log.info("a sampler for %s is already running", node)
        return 0
    paths.pid_file.write_text(f"{os.getpid()}\n")
    store, moved = open_or_quarantine(paths.store)
    if moved is not None:
        record_problem(paths, f"corrupt node store moved to {moved}")
    started_ns = time.time_ns()
    last = store.query("SELECT MAX(end_ns) FROM intervals")[0][0]
    ingest(store, paths.jobs, config.cluster, node)
    running = store.running_jobs()
    if running and last is not None:
        gap_s = (started_ns - last) / 1e9
        store.add_events([Event(started_ns, "sampler_restart",
                                f"no data for {gap_s:.1f} s before this start; jobs "
                                f"{','.join(j.job_id for j in running)}")])
        record_problem(paths, f"sampler restarted with jobs running; gap of {gap_s:.1f} s")
    store.add_events([Event(started_ns, "sampler_start", f"pid {os.getpid()}")])
    try:
        os.nice(config.sampler.nice)
    except OSError:
        pass
    opened = open_sensors(config, env=env)
    for note in opened.notes:
        log.info("%s", note)
    devices = [d for s in opened.sensors for d in s.devices()]
    attributor = JobAttributor(store, node, devices, started_ns)
    sampler = Sampler(opened.sensors, [store],
                      interval_s=interval_s or config.sampler.interval_s,
                      sampler_id=f"{node}-{os.getpid()}-{started_ns}", attribute=attributor)
    windows = WindowServer(paths.socket, sampler, store,
                           lambda: ingest(store, paths.jobs, config.cluster, node))
    idle_since: list[float | None] = [None]
    terminate = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        terminate.set()
        sampler.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda s, f: sampler.wake.set())

    cluster = config.cluster
    chores = Housekeeping(store, config, paths)

    def on_interval(interval) -> None:
        interval_id = store.query("SELECT MAX(id) FROM intervals WHERE sampler_id = ?",
                                  (sampler.sampler_id,))[0][0]
        windows.process(interval_id, interval)
        # Jobs that ended before this reading are complete: seal them. Then take in new
        # registrations; an ended job asks for its final reading at once.
        for run in finalize_ended(store, interval.end_ns):
            chores.job_sealed(run)
        chores.tick()
        ingested = ingest(store, paths.jobs, cluster, node)
        if any(kind == "end" for _, kind in ingested):
            sampler.wake.set()
        busy = store.query("SELECT COUNT(*) FROM jobs WHERE state IN ('running', 'ended')")[0][0]
        if busy:
            idle_since[0] = None
        elif idle_since[0] is None:
            idle_since[0] = time.monotonic()
        if idle_since[0] is not None and time.monotonic() - idle_since[0] >= config.sampler.linger_s:
            sampler.stop()

    def has_work() -> bool:
        return bool(pending(paths.jobs)) or store.query(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('running', 'ended')")[0][0] > 0

    try:
        windows.start()
        sampler.start()
        while True:
            sampler.run(on_interval=on_interval)
            if terminate.is_set():
                break
            # Exit protocol. A hook writes its registration first and then looks at the
            # sampler lock: whatever it wrote before we release the lock, we see below.
            with locked(paths.node_lock):
                if has_work():
                    sampler.stopping.clear()
                    idle_since[0] = None
                    continue
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            if pending(paths.jobs):
                try:  # written while we let go: take the lock back unless another has it
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    sampler.stopping.clear()
                    idle_since[0] = None
                    continue
                except BlockingIOError:
                    pass
            windows.close()
            if _pid_is_mine(paths):
                paths.pid_file.unlink(missing_ok=True)
            os.close(lock_fd)
            lock_fd = -1
            break
    finally:
        windows.close()
        store.add_events([Event(time.time_ns(), "sampler_stop", f"pid {os.getpid()}")])
        opened.close()
        store.close()
        if lock_fd >= 0:
            if _pid_is_mine(paths):
                paths.pid_file.unlink(missing_ok=True)
            os.close(lock_fd)
    return 0
