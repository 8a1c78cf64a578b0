"""Asking the gateway: what ``llem-acct`` and ``llem doctor`` do when ``ledger:`` names it.

``ledger: llem://HOST[:PORT]`` (TCP; each request carries a MUNGE credential bound to it) or
the path of the gateway's Unix socket (``/run/llem-gateway/gateway.sock`` on the ledger host;
the kernel tells the gateway who you are).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from dataclasses import dataclass

from llem.errors import LlemError
from llem.gateway import wire

SCHEME = "llem://"
TIMEOUT_S = 120.0
"""How long a client waits for an answer (queries are bounded by the gateway)."""
BUSY_RETRY_S = 30.0
"""How long a client retries a busy gateway, with a growing pause."""
MAX_ANSWER_BYTES = 256 * 1024 * 1024


class GatewayError(LlemError):
    """The gateway cannot be reached, refused the request, or answered nonsense."""


class _Reset(GatewayError):
    """The gateway reset the connection before answering (its caps were reached)."""


@dataclass(frozen=True)
class Target:
    """Where the gateway listens: a Unix socket ``path``, or TCP ``host`` and ``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return self.path if self.path else f"{SCHEME}{self.host}:{self.port}"


def target_of(ledger: str) -> Target | None:
    """The gateway that ``ledger`` names, or None for a ledger file (or a database URL)."""
    from llem.gateway.wire import DEFAULT_PORT, parse_listen

    if ledger.startswith(SCHEME):
        rest = ledger[len(SCHEME) :].rstrip("/")
        if rest.startswith("/"):  # llem:///run/llem-gateway/gateway.sock
            return Target(path=rest)
        try:
            host, port = parse_listen(rest) if rest else ("", DEFAULT_PORT)
        except ValueError as e:
            raise GatewayError(f"bad gateway address {ledger!r}: {e}") from None
        if not rest or not host or host == "0.0.0.0":
            raise GatewayError(f"bad gateway address {ledger!r}: use llem://HOST[:PORT]")
        return Target(host=host, port=port)
    try:
        if stat.S_ISSOCK(os.stat(ledger).st_mode):
            return Target(path=ledger)
    except OSError:
        if ledger.endswith(".sock"):  # a gateway that is down, not a missing ledger file
            return Target(path=ledger)
    return None


def target_for(ledger: str, socket_path: str | None) -> Target | None:
    """The gateway to ask for ``ledger``: the one it names (:func:`target_of`), or, when it is
    a ledger file this user cannot read (private: 0640 to the ledger's group) and the local
    gateway's socket ``socket_path`` (``gateway.socket``) exists, that socket. None: read the
    ledger itself (where an unreadable file gets the error that says how to use the
    gateway)."""
    target = target_of(ledger)
    if target is not None or not socket_path:
        return target
    from llem.cluster.pg_ledger import is_postgres

    if is_postgres(ledger) or not os.path.exists(ledger) or os.access(ledger, os.R_OK):
        return None
    try:
        if stat.S_ISSOCK(os.stat(socket_path).st_mode):
            return Target(path=socket_path)
    except OSError:
        pass
    return None


def ask(
    target: Target,
    request: wire.Request,
    *,
    munge_socket: str | None = None,
    timeout_s: float = TIMEOUT_S,
) -> dict:
    """Send one request and return the gateway's answer (``ok`` true).

    A busy gateway is asked again, with a growing pause, for up to :data:`BUSY_RETRY_S`.

    Raises:
        GatewayError: unreachable, refused (with the gateway's reason), or a bad answer.
    """
    text = wire.request_text(request)
    deadline = time.monotonic() + BUSY_RETRY_S
    pause = 0.05
    while True:
        cred = None
        if target.path is None:
            cred = _credential(text, munge_socket)
        try:
            answer = _exchange(target, wire.encode_envelope(text, cred), timeout_s)
        except _Reset as e:  # refused over its caps before our request was read: busy
            if time.monotonic() + pause >= deadline:
                raise GatewayError(str(e)) from None
            answer = {"ok": False, "busy": True}
        if answer.get("busy") and time.monotonic() + pause < deadline:
            time.sleep(pause)
            pause = min(2.0, pause * 2)
            continue
        if not answer.get("ok"):
            raise GatewayError(f"the gateway at {target} refused: {answer.get('error', '?')}")
        return answer


def _credential(text: str, munge_socket: str | None) -> str:
    from llem import munge

    try:
        return munge.encode(wire.request_digest(text), munge_socket)
    except munge.MungeError as e:
        raise GatewayError(
            f"cannot make a MUNGE credential for the gateway: {e}. munged must run on this "
            "node with the cluster's key (systemctl status munge)"
        ) from None


def _exchange(target: Target, data: bytes, timeout_s: float) -> dict:
    try:
        if target.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(target.path)
        else:
            sock = socket.create_connection((target.host, target.port), timeout=min(10, timeout_s))
            sock.settimeout(timeout_s)
    except OSError as e:
        raise GatewayError(
            f"the gateway at {target} is not reachable ({e.strerror or e}): is 'llem serve' "
            "running on the ledger host? (systemctl status llem-gateway; docs/admin-install.md)"
        ) from None
    with sock:
        try:
            sock.sendall(data)
            chunks = []
            size = 0
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise GatewayError(f"the gateway at {target} sent too large an answer")
                if chunk.endswith(b"\n"):
                    break
        except TimeoutError:
            raise GatewayError(
                f"the gateway at {target} did not answer within {timeout_s:g} s"
            ) from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise _Reset(
                f"the connection to the gateway at {target} failed: {e.strerror or e}"
            ) from None
        except OSError as e:
            raise GatewayError(
                f"the connection to the gateway at {target} failed: {e.strerror or e}"
            ) from None
    raw = b"".join(chunks)
    try:
        answer = json.loads(raw.decode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise GatewayError(
            f"the gateway at {target} gave a malformed answer: {raw[:80]!r}"
            if raw
            else f"the gateway at {target} closed the connection without an answer"
        )
    return answer
