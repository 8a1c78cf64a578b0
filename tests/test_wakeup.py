"""SignalSafeEvent (llem.wakeup): set from signal handlers without ever deadlocking.

The failure it fixes: a node sampler woken by SIGUSR1 (each Prolog and Epilog sends one) took
a second SIGUSR1 while its handler was inside ``threading.Event.set``; the nested handler
waited for the event's lock, held by the same thread, and the sampler hung with every job on
the node unsealed (seen in the Slurm tests: two shared-node jobs ending together). The storms
below replay it: with ``threading.Event`` in place of SignalSafeEvent the child below hangs in
each of three tries within 3 s, and so does a real node sampler.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llem.errors import StoreError
from llem.wakeup import SignalSafeEvent
from tests.helpers.daemon import NODE, WAIT_S, Daemon, process_env, wait_for

REPO = Path(__file__).resolve().parents[1]

# Another process sends SIGUSR1 to PID as fast as it can: the signals arrive at any bytecode
# of the receiver, inside its handlers too (a thread of the receiver could not: it would need
# the receiver's GIL to send).
STORM = "import os, signal, sys\npid = int(sys.argv[1])\nwhile True:\n    os.kill(pid, signal.SIGUSR1)\n"  # fmt: skip


def storm(pid: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STORM, str(pid)])


def state_of(node: Daemon, job_id: str) -> str | None:
    try:
        return node.job_state(job_id)
    except StoreError:  # the sampler has not made its store yet
        return None


def test_set_wait_clear_and_is_set_behave_like_threading_event():
    ev = SignalSafeEvent()
    assert not ev.is_set()
    t0 = time.monotonic()
    assert ev.wait(0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 2
    ev.set()
    ev.set()  # twice: still one state
    assert ev.is_set() and ev.wait(0) is True and ev.wait() is True
    ev.clear()
    assert not ev.is_set() and ev.wait(0.01) is False


def test_a_set_from_another_thread_wakes_a_waiter_at_once():
    ev = SignalSafeEvent()
    ev.wait(0.001)  # the pipe exists: the set below writes to it
    timer = threading.Timer(0.3, ev.set)
    timer.start()
    t0 = time.monotonic()
    assert ev.wait(20) is True
    assert time.monotonic() - t0 < 5
    timer.join()


def test_a_set_undone_by_clear_leaves_no_busy_wait():
    """The byte of a set() that a clear() raced stays in the pipe: the next wait must not spin
    on it until its timeout."""
    ev = SignalSafeEvent()
    ev.wait(0.001)
    ev.set()
    ev._flag = False  # a clear() that ran between set()'s flag and its write
    cpu0 = time.process_time()
    assert ev.wait(0.5) is False
    assert time.process_time() - cpu0 < 0.25


def test_a_storm_of_signals_never_deadlocks_a_waiting_thread(tmp_path):
    """The main thread waits and clears while its SIGUSR1 handler sets the event under a storm:
    it finishes its 3 s and counts wake-ups."""
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(
            f"""
            import signal, subprocess, sys, time
            from llem.wakeup import SignalSafeEvent

            ev = SignalSafeEvent()
            signal.signal(signal.SIGUSR1, lambda s, f: ev.set())
            sender = subprocess.Popen([sys.executable, "-c", {STORM!r}, str(__import__("os").getpid())])
            woken, end = 0, time.monotonic() + 3
            try:
                while time.monotonic() < end:
                    if ev.wait(0.01):
                        ev.clear()
                        woken += 1
            finally:
                sender.kill()
                sender.wait()
            print(woken)
            """
        )
    )
    r = subprocess.run(
        [sys.executable, str(child)], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0


def test_a_node_sampler_under_a_sigusr1_storm_seals_its_job_and_stops_on_sigterm(tmp_path):
    """The real ``llem sampler --node`` process with its real signal handlers: a storm of the
    hooks' SIGUSR1 while its job ends. It must still seal and export the job, and stop after
    a final reading on SIGTERM."""
    node = Daemon(tmp_path, linger_s=600.0)
    node.prolog("108")
    env = process_env(node)
    sampler = subprocess.Popen(
        [sys.executable, "-m", "llem.cli.sampler", "--node", NODE, "--interval", "0.1"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sender = None
    try:
        wait_for(lambda: state_of(node, "108") == "running", "job 108 taken in")
        sender = storm(sampler.pid)
        time.sleep(1.0)
        node.epilog("108")  # the hook's SIGUSR1 is lost in the storm; the storm wakes it
        time.sleep(1.0)
        sender.kill()
        sender.wait()
        sender = None
        assert sampler.poll() is None, sampler.stderr.read()
        wait_for(lambda: node.job_state("108") == "exported", "job 108 exported")
        intervals = node.query("SELECT COUNT(*) FROM intervals")[0][0]
        sampler.send_signal(signal.SIGTERM)
        try:
            rc = sampler.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the node sampler did not stop on SIGTERM after the storm")
        assert rc == 0, sampler.stderr.read()
        # Its final reading was recorded on the way out.
        assert node.query("SELECT COUNT(*) FROM intervals")[0][0] > intervals
        assert node.query("SELECT COUNT(*) FROM events WHERE kind = 'sampler_stop'") == [(1,)]
    finally:
        if sender is not None:
            sender.kill()
            sender.wait()
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()


def start_sampler(node: Daemon) -> subprocess.Popen:
    """A real ``llem sampler --node`` process, returned the moment its pid file names it
    (the lock is held: from then on the hooks signal it)."""
    sampler = subprocess.Popen(
        [sys.executable, "-m", "llem.cli.sampler", "--node", NODE, "--interval", "0.1"],
        env=process_env(node),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and sampler.poll() is None:
        try:
            if int(node.paths.pid_file.read_text()) == sampler.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.001)
    return sampler


def test_a_sigusr1_as_soon_as_the_pid_file_names_a_new_sampler_does_not_kill_it(tmp_path):
    """A second job's hook signals the sampler named by the pid file the moment the lock is
    held. The first sampler of the node was still opening its store and sensors then, with
    SIGUSR1 at its default action (end the process): it died, and the jobs of the node went
    unmeasured (seen in test_llem_slurm: an srun job started beside a batch job)."""
    node = Daemon(tmp_path, linger_s=600.0)
    node.prolog("109")
    sampler = start_sampler(node)
    try:
        # What each of many hooks does, from the first moment it may.
        for _ in range(50):
            if sampler.poll() is not None:
                break
            sampler.send_signal(signal.SIGUSR1)
            time.sleep(0.002)
        wait_for(lambda: state_of(node, "109") == "running", "job 109 taken in")
        assert sampler.poll() is None, (sampler.returncode, sampler.stderr.read())
        node.epilog("109")
        sampler.send_signal(signal.SIGUSR1)
        wait_for(lambda: node.job_state("109") == "exported", "job 109 exported")
        sampler.send_signal(signal.SIGTERM)
        assert sampler.wait(WAIT_S) == 0, sampler.stderr.read()
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()


def test_sigterm_before_the_sampler_is_running_stops_it_after_one_reading(tmp_path):
    """The handlers are in place from the start; a SIGTERM that comes while the store and
    sensors are being opened is not lost: the sampler takes its reading and leaves."""
    node = Daemon(tmp_path, linger_s=600.0)
    node.prolog("110")
    sampler = start_sampler(node)
    try:
        sampler.send_signal(signal.SIGTERM)
        assert sampler.wait(WAIT_S) == 0, sampler.stderr.read()
        assert node.query("SELECT COUNT(*) FROM events WHERE kind = 'sampler_stop'") == [(1,)]
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
