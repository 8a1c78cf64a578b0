"""What llem's socket servers share: each connection is hostile until checked.

Two servers take requests from users: the node sampler's window server
(:mod:`llem.node.windows`, root, one per compute node) and the ledger gateway
(:mod:`llem.cluster.gateway`, ``llem serve``, on the ledger host). Both serve each connection
in a thread of its own within caps per peer and in all (:class:`ConnectionCaps`), read a
request whole within a deadline and a size (:func:`read_line`), answer within a deadline
(:func:`send_within`), and keep accepting after ``accept()`` errors (:func:`accept_forever`).
The limits themselves are each server's own (``docs/security.md``).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

ACCEPT_BACKOFF_S = (0.05, 2.0)
"""First and longest pause after a failed ``accept()``."""


class Refused(Exception):
    """A request refused before any work; the message goes back to the peer."""


def peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a Unix socket's peer, from the kernel (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class ConnectionCaps:
    """Connections served at once: at most ``per_peer`` for one peer key (a uid, an address)
    and ``total`` in all. A peer over its cap cannot take the others' places."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._active: dict[Hashable, int] = {}
        self._active_total = 0

    def admit(self, key: Hashable) -> bool:
        with self._lock:
            if self._active_total >= self.total or self._active.get(key, 0) >= self.per_peer:
                return False
            self._active_total += 1
            self._active[key] = self._active.get(key, 0) + 1
            return True

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._active_total -= 1
            left = self._active.get(key, 1) - 1
            if left:
                self._active[key] = left
            else:
                self._active.pop(key, None)

    @property
    def active(self) -> int:
        with self._lock:
            return self._active_total


def read_line(
    conn: socket.socket,
    *,
    max_bytes: int,
    deadline_s: float,
    monotonic_s: Callable[[], float] = time.monotonic,
) -> bytes:
    """One request line, whole within ``deadline_s`` of now (a deadline for the whole request,
    not a timeout that each byte re-arms) and at most ``max_bytes``; Refused otherwise."""
    deadline = monotonic_s() + deadline_s
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - monotonic_s()
        if left <= 0:
            raise Refused(f"the request did not arrive within {deadline_s:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(min(65536, max_bytes + 1 - len(data)))
        except TimeoutError:
            raise Refused(f"the request did not arrive within {deadline_s:g} s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > max_bytes:
            raise Refused(f"requests are at most {max_bytes} bytes")
    return data


def send_within(conn: socket.socket, data: bytes, deadline_s: float) -> bool:
    """Send ``data`` within ``deadline_s`` (a peer that stops reading is cut); False when it
    could not be sent whole."""
    deadline = time.monotonic() + deadline_s
    view = memoryview(data)
    try:
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            conn.settimeout(left)
            sent = conn.send(view[: 1 << 20])
            view = view[sent:]
    except OSError:
        return False
    return True


def accept_forever(
    sock: socket.socket,
    admit: Callable[[socket.socket, object], None],
    closing: threading.Event,
    name: str,
) -> None:
    """Accept connections until ``closing`` is set, handing each to ``admit(conn, address)``.

    An ``accept()`` error (no descriptors, no memory or buffers, an aborted connection) is
    logged, the first and then every 100th, and the loop pauses (50 ms, doubling to 2 s) and
    accepts again; no error ends it. ``admit`` raising closes that connection only.
    """
    pause = 0.0
    errors = 0
    while not closing.is_set():
        try:
            conn, address = sock.accept()
        except OSError as e:
            if closing.is_set():
                return
            pause = min(ACCEPT_BACKOFF_S[1], max(ACCEPT_BACKOFF_S[0], pause * 2))
            errors += 1
            # The first error and then every 100th: a flood must not flood the log.
            if errors == 1 or errors % 100 == 0:
                log.warning(
                    "%s: accept() failed (%s; %d so far); retrying in %.2f s",
                    name,
                    os.strerror(e.errno) if e.errno else e,
                    errors,
                    pause,
                )
            closing.wait(pause)
            continue
        except Exception:  # noqa: BLE001 - never a silently dead server
            log.exception("%s: accept failed", name)
            closing.wait(ACCEPT_BACKOFF_S[1])
            continue
        pause = 0.0
        try:
            admit(conn, address)
        except Exception:  # noqa: BLE001
            log.exception("%s: could not serve a connection", name)
            conn.close()


def start_thread(target: Callable[[], None], name: str) -> bool:
    """Start a daemon thread; False when none can be had (the caller refuses the peer)."""
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:
        return False
    return True
