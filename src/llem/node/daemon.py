"""The node sampler: one process per Slurm node name, serving every job on the node.

The first Prolog starts it (detached: double fork, ``setsid``, stdio to /dev/null, readiness
through a pipe), later Prologs only register their jobs in the node store, which the sampler
reads every interval. It splits each interval's energy among the running jobs
(:mod:`llem.node.attribution`), serves ``llem wrap`` windows over a Unix socket, and exits (after
``sampler.linger_s``) once no job is left.

Paths, per node name (several slurmd may share a host), under ``run_dir``:
``<node>/sampler.lock`` (held by the live sampler for its whole life: the liveness test that
no stale pid file or late-reaped zombie can fool), ``<node>/sampler.pid``, ``<node>/node.lock``
(serialises Prolog, Epilog and the sampler's decision to exit), ``<node>/sampler.sock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Mapping

from llem.config import Config
from llem.errors import LlemError
from llem.fsutil import detach, locked
from llem.node.attribution import JobAttributor
from llem.node.windows import WindowServer
from llem.paths import NodePaths

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

PROBLEMS_KEEP = 200  # lines kept in problems.log


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
    if detach(write_fd):  # pragma: no cover - the sampler-to-be
        try:
            os.chdir("/")
            os.umask(0o027)
            os.write(write_fd, str(os.getpid()).encode())
            os.close(write_fd)
            os.execve(argv[0], argv, child_env)
        finally:
            os._exit(127)
    os.close(write_fd)
    try:
        import select

        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        data = os.read(read_fd, 32) if ready else b""
    finally:
        os.close(read_fd)
    if not data:
        raise LlemError("the sampler did not report its start in time")
    return int(data)


# -- the sampler process -----------------------------------------------------------------


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
        from llem.node.export import export_job
        from llem.node.outbox import deliver

        def export() -> None:
            data = export_job(self.store, run.run_id, self.config)
            deliver(self.config, data, timeout_s=self.DELIVERY_TIMEOUT_S)
            self.store.update_job(run.run_id, state="exported", exported_ns=data["created_ns"])

        self._guard(f"export of job {run.job_id}", export)

    def tick(self) -> None:
        from llem.node.export import export_node_since_last, prune_by_config
        from llem.node.outbox import flush_outbox, pending_slices

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


def run_node_sampler(config: Config, node: str, interval_s: float | None = None,
                     env: Mapping[str, str] | None = None) -> int:
    """The body of ``llem sampler --node NODE --daemon``; returns the exit status."""
    from llem.model import Event
    from llem.node.jobs import finalize_ended, ingest, pending
    from llem.node.store import open_or_quarantine
    from llem.sampler import Sampler
    from llem.sensors import open_sensors

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
    from llem.node.metrics import NodeMetrics  # textfile for node_exporter (docs/metrics.md)
    metrics = NodeMetrics.from_config(config, store, node, devices, sampler.interval_s)

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
        metrics.on_interval(interval)  # textfile for node_exporter; never raises
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
