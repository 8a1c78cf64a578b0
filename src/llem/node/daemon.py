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
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from llem.config import Config
from llem.errors import LlemError
from llem.fsutil import detach, locked
from llem.model import Event
from llem.node.attribution import JobAttributor
from llem.node.idle import IdleLearner, package_tdp_w
from llem.node.jobs import finalize_ended, ingest, pending
from llem.node.slurm import gres_conf_path, slurm_conf_path
from llem.node.store import open_or_quarantine
from llem.node.windows import WindowServer, listen_socket
from llem.paths import NodePaths
from llem.sampler import Clock, Sampler, SystemClock
from llem.wakeup import SignalSafeEvent

if TYPE_CHECKING:
    import socket

    from llem.sensors import OpenedSensors

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
        fd = os.open(
            paths.sampler_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
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
    # SLURM_CONF is slurmd's own (it names the node's gres.conf), not the job's.
    out = {k: v for k, v in env.items() if not k.startswith(drop) or k == "SLURM_CONF"}
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


SERVING_WAIT_S = 5.0
"""How long the cold Prolog waits for the sampler it spawned to hold the node's lock and
listen on its window socket (Python's start and llem's imports: 0.1-0.3 s, more on a loaded
node). The hook's own limit (LLEM_TIMEOUT, 10 s) is above it."""


def _gone(pid: int) -> bool:
    """No process ``pid``, or only its zombie (a container whose first process reaps nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def wait_until_serving(paths: NodePaths, pid: int, timeout_s: float = SERVING_WAIT_S) -> bool:
    """Wait until the sampler ``pid`` (just spawned) listens on its window socket, or another
    sampler that does holds the lock instead (two Prologs spawned one each; the later one
    left). Its pid file is written after its socket listens. False when neither happened
    within ``timeout_s``: the job starts anyway, and its first windows may then be measured
    standalone (each says so in its notes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = sampler_pid(paths)
        if live == pid:
            return True
        if _gone(pid):
            if live is None:
                return False  # it died and nobody holds the lock: nothing to wait for
            if live > 0:
                return True  # another sampler won the lock and serves
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


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

    Args:
        store, config, paths: the node's.
        monotonic_s: the clock the chores are paced by (seconds).
    """

    NODE_EXPORT_EVERY_S = 300.0
    FLUSH_EVERY_S = 60.0
    PRUNE_EVERY_S = 86400.0
    DELIVERY_TIMEOUT_S = 0.5

    def __init__(
        self,
        store,
        config: Config,
        paths: NodePaths,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.paths = paths
        self.monotonic_s = monotonic_s
        now = monotonic_s()
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

        now = self.monotonic_s()
        if now >= self._next_node_export:
            self._next_node_export = now + self.NODE_EXPORT_EVERY_S
            self._guard(
                "node export",
                lambda: export_node_since_last(self.store, self.config, self.paths.node),
            )
        if now >= self._next_flush:
            self._next_flush = now + self.FLUSH_EVERY_S
            if pending_slices(self.config):
                self._guard(
                    "outbox flush",
                    lambda: flush_outbox(self.config, timeout_s=self.DELIVERY_TIMEOUT_S),
                )
        if now >= self._next_prune:
            self._next_prune = now + self.PRUNE_EVERY_S
            self._guard("pruning", lambda: prune_by_config(self.store, self.config))


def _open_sensors(config: Config, env: Mapping[str, str]) -> OpenedSensors:
    from llem.sensors import open_sensors

    return open_sensors(config, env=env)


class NodeDaemon:
    """The node sampler of one Slurm node name, the body of ``llem sampler --node NODE``.

    :meth:`run` reads as its life: take the node's sampler lock (or leave at once: another
    sampler serves the node), open the node store and note a restart in the middle of jobs,
    open the sensors, then sample, serving windows and sealing and exporting ended jobs after
    each reading, until told to stop or until no job has been left for ``sampler.linger_s``;
    then leave by the exit protocol (:meth:`leave`), which loses no registration written
    meanwhile.

    Args:
        config: the configuration (paths, interval, linger, niceness).
        node: the Slurm node name.
        interval_s: seconds between readings (default ``sampler.interval_s``).
        env: the environment the sensors read (default ``os.environ``).
        open_sensors: ``(config, env) -> OpenedSensors`` (default: the configured sensors).
        clock: wall and monotonic time for the readings, the linger and the chores.
        handle_signals: install the SIGTERM/SIGINT/SIGUSR1 handlers (main thread only).
        proc_root: the /proc tree the attribution reads.
        cgroup_root: the cgroup tree the attribution reads (default /sys/fs/cgroup).
    """

    def __init__(
        self,
        config: Config,
        node: str,
        *,
        interval_s: float | None = None,
        env: Mapping[str, str] | None = None,
        open_sensors: Callable[[Config, Mapping[str, str]], OpenedSensors] = _open_sensors,
        clock: Clock | None = None,
        handle_signals: bool = False,
        proc_root: str | os.PathLike = "/proc",
        cgroup_root: str | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.paths = NodePaths.of(config, node)
        self.interval_s = interval_s or config.sampler.interval_s
        self.env = os.environ if env is None else env
        self._open_sensors = open_sensors
        self.clock = clock or SystemClock()
        self.handle_signals = handle_signals
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.terminating = SignalSafeEvent()  # set by SIGTERM's handler: see llem.wakeup
        self.lock_fd = -1
        self.started_ns = 0
        self.store = None
        self.sensors: OpenedSensors | None = None
        self.sampler: Sampler | None = None
        self.windows: WindowServer | None = None
        self.early_socket: socket.socket | None = None
        self.chores: Housekeeping | None = None
        self._idle_since: float | None = None

    def run(self) -> int:
        """Serve the node until the sampler may leave; return the exit status."""
        # The handlers first: once the pid file names this process, a hook may send SIGUSR1
        # (another job starts or ends), and SIGUSR1's default action ends the process. With
        # the handlers installed only after the sensors were open, a second job starting
        # within those few hundred milliseconds killed the new sampler (replayed in
        # tests/test_wakeup.py).
        if self.handle_signals:
            self.install_signal_handlers()
        if not self.acquire_lock():
            log.info("a sampler for %s is already running", self.node)
            return 0
        try:
            self.open_store()
            self.note_start()
            self.lower_priority()
            self.open_sensors()
            self.sample()
        finally:
            self.shutdown()
        return 0

    # -- start ---------------------------------------------------------------------------------

    def acquire_lock(self) -> bool:
        """Take the node's sampler lock (held for the whole life) and write the pid file;
        False when another sampler holds it."""
        self.paths.ensure()
        fd = os.open(
            self.paths.sampler_lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        # The window socket before the pid file: once the pid file names this process, the
        # cold Prolog lets the job start, and the job's windows find a socket to wait on while
        # the sensors open (llem.node.windows.listen_socket).
        try:
            self.early_socket = listen_socket(self.paths.socket)
        except OSError as e:
            log.warning(
                "window socket %s: %s (made again when sampling starts)", self.paths.socket, e
            )
        try:
            self.paths.pid_file.write_text(f"{os.getpid()}\n")
        except BaseException:
            self._close_early_socket()
            raise
        return True

    def _close_early_socket(self) -> None:
        """The socket made in :meth:`acquire_lock`, never handed to a window server; the
        sampler lock is still ours, so the file at its path is ours too."""
        if self.early_socket is not None:
            self.early_socket.close()
            self.early_socket = None
            self.paths.socket.unlink(missing_ok=True)

    def open_store(self) -> None:
        """Open the node store; a corrupt one is moved aside and recorded as a problem."""
        self.store, moved = open_or_quarantine(self.paths.store)
        if moved is not None:
            record_problem(self.paths, f"corrupt node store moved to {moved}")

    def note_start(self) -> None:
        """Take in waiting registrations and record the start; jobs that were running when
        the last sampler stopped have a gap, recorded as a restart event and a problem."""
        self.started_ns = self.clock.time_ns()
        last_ns = self.store.last_interval_end_ns()
        self.take_registrations()
        running = self.store.running_jobs()
        if running and last_ns is not None:
            gap_s = (self.started_ns - last_ns) / 1e9
            self.store.add_events(
                [
                    Event(
                        self.started_ns,
                        "sampler_restart",
                        f"no data for {gap_s:.1f} s before this start; jobs "
                        f"{','.join(j.job_id for j in running)}",
                    )
                ]
            )
            record_problem(self.paths, f"sampler restarted with jobs running; gap of {gap_s:.1f} s")
        self.store.add_events([Event(self.started_ns, "sampler_start", f"pid {os.getpid()}")])

    def lower_priority(self) -> None:
        try:
            os.nice(self.config.sampler.nice)
        except OSError:
            pass

    def open_sensors(self) -> None:
        """Open the sensors and build the sampler, its attribution, the window server and
        the chores around them."""
        self.sensors = self._open_sensors(self.config, self.env)
        for note in self.sensors.notes:
            log.info("%s", note)
        devices = [d for s in self.sensors.sensors for d in s.devices()]
        attributor = JobAttributor(
            self.store,
            self.node,
            devices,
            self.started_ns,
            proc_root=self.proc_root,
            cgroup_root=self.cgroup_root,
            policy=self.config.attribution.policy,
            idle=IdleLearner(
                devices,
                self.store,
                self.config.attribution.idle_w,
                self.config.estimate.cpu_idle_fraction,
                package_tdp_w(self.config.estimate, self.proc_root),
            ),
            gres_conf=gres_conf_path(self.env),
            slurm_conf=slurm_conf_path(self.env),
        )
        self.sampler = Sampler(
            self.sensors.sensors,
            [self.store],
            clock=self.clock,
            interval_s=self.interval_s,
            sampler_id=f"{self.node}-{os.getpid()}-{self.started_ns}",
            attribute=attributor,
        )
        self.windows = self._window_server(self.early_socket)
        self.early_socket = None  # the window server's now: it closes it
        self.chores = Housekeeping(
            self.store, self.config, self.paths, lambda: self.clock.monotonic_ns() / 1e9
        )
        from llem.node.metrics import NodeMetrics  # textfile for node_exporter (docs/metrics.md)

        # The sampler's devices: the sensors' and, with a node meter, the platform residual.
        self.metrics = NodeMetrics.from_config(
            self.config, self.store, self.node, self.sampler.devices, self.sampler.interval_s
        )

    def _window_server(self, sock=None) -> WindowServer:
        return WindowServer(
            self.paths.socket,
            self.sampler,
            self.store,
            self.take_registrations,
            pending_job=self.job_is_pending,
            monotonic_s=lambda: self.clock.monotonic_ns() / 1e9,
            sock=sock,
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: stop after a final reading; SIGUSR1 (a hook handed a job
        over): take a reading now."""
        signal.signal(signal.SIGTERM, lambda s, f: self.terminate())
        signal.signal(signal.SIGINT, lambda s, f: self.terminate())
        signal.signal(signal.SIGUSR1, lambda s, f: self.wake())

    # -- sampling ------------------------------------------------------------------------------

    def sample(self) -> None:
        """Sample until told to stop, or until idle and allowed out by :meth:`leave`."""
        self.windows.start()
        self.sampler.start()
        if self.terminating.is_set():  # SIGTERM before the sampler existed: one reading, out
            self.sampler.stop()
        while True:
            self.sampler.run(on_interval=self.on_interval)
            if self.terminating.is_set() or self.leave():
                return

    def on_interval(self, interval) -> None:
        """After each reading: answer window requests, seal and export jobs that ended
        before it, do the chores, take in new registrations, and watch for idleness."""
        interval_id = self.store.last_interval_id(self.sampler.sampler_id)
        self.windows.process(interval_id, interval)
        # Jobs that ended before this reading are complete: seal them. Then take in new
        # registrations; an ended job asks for its final reading at once.
        for run in finalize_ended(self.store, interval.end_ns):
            self.chores.job_sealed(run)
        self.chores.tick()
        if any(kind == "end" for _, kind in self.take_registrations()):
            self.wake()
        self.metrics.on_interval(interval)  # textfile for node_exporter; never raises
        self.watch_idle()

    def take_registrations(self) -> list[tuple[str, str]]:
        """Move the hooks' waiting registrations into the store; return what was taken."""
        taken = ingest(self.store, self.paths.jobs, self.config.cluster, self.node)
        if taken and self.windows is not None:
            self.windows.refresh_jobs()  # requests are checked against the running jobs
        return taken

    def job_is_pending(self, job_id: str) -> bool:
        """Whether a job's start registration waits to be taken in (its Prolog just ran)."""
        return (self.paths.jobs / f"{job_id}.start").exists()

    def watch_idle(self) -> None:
        """Stop the sampler once no job has been left for ``sampler.linger_s``."""
        now_s = self.clock.monotonic_ns() / 1e9
        if self.store.unsealed_job_count():
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now_s
        linger_s = self.config.sampler.linger_s
        if self._idle_since is not None and now_s - self._idle_since >= linger_s:
            self.sampler.stop()

    def wake(self) -> None:
        """Take a reading now (safe from a signal handler)."""
        if self.sampler is not None:
            self.sampler.wake.set()

    def terminate(self) -> None:
        """Take a final reading and stop (safe from a signal handler)."""
        self.terminating.set()
        if self.sampler is not None:
            self.sampler.stop()

    # -- the exit protocol ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(pending(self.paths.jobs)) or self.store.unsealed_job_count() > 0

    def leave(self) -> bool:
        """Give up the sampler lock unless work came in; True once given up.

        A hook writes its registration first and then looks at the sampler lock: whatever it
        wrote before we release the lock, we see here, under the node lock; what it wrote
        just after, we see in the jobs folder and take the lock back for, unless a new sampler
        has it already.
        """
        with locked(self.paths.node_lock):
            if self.has_work():
                self.resume()
                return False
            # The socket and the pid file go while the sampler lock is still ours: a successor
            # makes its own as soon as it holds the lock, and removing ours after that would
            # remove its (the same paths).
            self.windows.close()
            self._remove_pid_file()
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        if pending(self.paths.jobs):
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                self.serve_again()
                self.resume()
                return False
        self.release_lock()
        return True

    def serve_again(self) -> None:
        """The lock taken back after :meth:`leave` let it go: a new window socket, then the
        pid file (in that order, as at the start)."""
        try:
            self.windows = self._window_server()
            self.windows.start()
        except OSError as e:
            log.error("window socket %s: %s; windows are measured standalone", self.paths.socket, e)
            record_problem(self.paths, f"window socket not made again: {e}")
        self.paths.pid_file.write_text(f"{os.getpid()}\n")

    def resume(self) -> None:
        self.sampler.stopping.clear()
        self._idle_since = None

    # -- end -----------------------------------------------------------------------------------

    def release_lock(self) -> None:
        """Remove the pid file (when still ours) and let go of the sampler lock."""
        if self.lock_fd < 0:
            return
        self._remove_pid_file()
        os.close(self.lock_fd)
        self.lock_fd = -1

    def _remove_pid_file(self) -> None:
        if _pid_is_mine(self.paths):
            self.paths.pid_file.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Close whatever was opened, record the stop, and let go of the lock."""
        if self.windows is not None:
            self.windows.close()
        self._close_early_socket()  # stopped before the sensors were open
        if self.sampler is not None:
            self.store.add_events(
                [Event(self.clock.time_ns(), "sampler_stop", f"pid {os.getpid()}")]
            )
        if self.sensors is not None:
            self.sensors.close()
        if self.store is not None:
            self.store.close()
        self.release_lock()


def run_node_sampler(
    config: Config, node: str, interval_s: float | None = None, env: Mapping[str, str] | None = None
) -> int:
    """The body of ``llem sampler --node NODE --daemon``; returns the exit status."""
    return NodeDaemon(config, node, interval_s=interval_s, env=env, handle_signals=True).run()
