"""An event that a signal handler may set: no lock is taken, a pipe wakes the waiter.

Python runs a signal handler in the main thread between two bytecodes of whatever that thread
was doing, including inside ``threading.Event.set`` or ``Event.wait``, which hold the event's
lock (a ``threading.Condition``). A handler that calls ``Event.set`` there waits for a lock
its own thread holds, forever. Two SIGUSR1 from two Epilogs a few microseconds apart did
exactly that to a node sampler: the second handler ran inside the first one's ``Event.set``,
the sampler hung, and no job on the node was sealed again (tests/test_wakeup.py replays it).

:class:`SignalSafeEvent` keeps the event's state in a plain attribute (one assignment, no
lock) and wakes a waiter by writing a byte to a non-blocking pipe, which is safe at any point
in any thread. The pipe is made by the first waiter, so an event that is only set and read
holds no file descriptor.
"""

from __future__ import annotations

import os
import select
import threading
import time


class SignalSafeEvent:
    """``threading.Event``'s ``set``, ``clear``, ``is_set`` and ``wait``; ``set`` may be called
    from a signal handler, and from any thread.

    Two ``set`` calls that race a ``clear`` may count as one wake-up, as with
    ``threading.Event``; a waiter never misses a ``set`` made after it started waiting.
    """

    def __init__(self) -> None:
        self._flag = False
        self._r = -1
        self._w = -1
        self._make_pipe = threading.Lock()  # waiters only: never taken by set()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        w = self._w
        if w >= 0:
            try:
                os.write(w, b"\0")
            except OSError:  # full (a wake-up is pending already) or closed at exit
                pass

    def clear(self) -> None:
        self._flag = False
        self._drain()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or until ``timeout`` seconds passed; return whether it is set."""
        if self._flag:
            return True
        if self._r < 0:
            with self._make_pipe:
                if self._r < 0:
                    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    self._r, self._w = r, w  # set() writes from here on; the flag is
                    # checked again below, so a set() just before this is not lost
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                self._drain()  # stale bytes of a set() that a clear() undid: no busy loop
        return True

    def _drain(self) -> None:
        r = self._r
        if r < 0:
            return
        try:
            while os.read(r, 4096):
                pass
        except OSError:  # empty (BlockingIOError), or closed
            pass

    def __del__(self) -> None:
        # Only once nothing can call set() any more: a descriptor closed earlier could be
        # reused by another file, which set() would then write into.
        for fd in (self._r, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
