"""``llem serve``: the read-only ledger gateway.

Runs as an unprivileged user (``llem``) that may read the ledger; listens on a Unix socket
(peers identified by ``SO_PEERCRED``) and, when configured, on TCP (each request carries a
MUNGE credential bound to it). Every connection is hostile until checked
(``docs/security.md``, "The ledger gateway"): connections are capped per peer and in all, a
request must arrive whole within :data:`REQUEST_DEADLINE_S` and :data:`wire.MAX_REQUEST_BYTES`,
queries run a few at a time (:data:`MAX_QUERIES`, :data:`MAX_QUERIES_PER_UID`) within
``gateway.query_timeout_s``, and an answer larger than :data:`MAX_ANSWER_BYTES` or not read
within :data:`ANSWER_DEADLINE_S` is cut. Each refusal is answered with its reason and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from llem.gateway import wire
from llem.gateway.privacy import Caller, Policy, Role
from llem.sockserve import (
    ConnectionCaps,
    Refused,
    accept_forever,
    peer_cred,
    read_line,
    send_within,
    start_thread,
)

log = logging.getLogger(__name__)

# -- the limits (documented in docs/security.md) ---------------------------------------------
REQUEST_DEADLINE_S = 10.0
"""The whole request must arrive within this time of the connection's accept."""
MAX_CONNECTIONS = 256
"""Connections served at once, all peers together (one thread each)."""
MAX_CONNECTIONS_PER_PEER = 32
"""Connections served at once for one uid (Unix socket)."""
MAX_CONNECTIONS_PER_ADDRESS = 128
"""Connections served at once from one address (TCP): a login node's users share it, and
who they are is known only once the request's credential is checked."""
MAX_QUERIES = 4
"""Queries running at once; more wait for a slot."""
MAX_QUERIES_PER_UID = 2
"""Queries of one uid running at once."""
QUERY_SLOT_WAIT_S = 30.0
"""How long a query waits for a slot before the client is told the gateway is busy."""
MAX_ANSWER_BYTES = 128 * 1024 * 1024
"""The largest answer; a larger one is refused with a hint to narrow the query."""
ANSWER_DEADLINE_S = 60.0
"""The client must read the whole answer within this time."""
REPLAY_CACHE_MAX = 100_000
"""Credentials remembered (until they expire) by the gateway's own replay check."""
DEFAULT_PORT = wire.DEFAULT_PORT
parse_listen = wire.parse_listen


class _Slots:
    """At most ``total`` queries at once, ``per_uid`` of one uid; waiters wait in turn."""

    def __init__(self, total: int, per_uid: int) -> None:
        self.total = total
        self.per_uid = per_uid
        self._cond = threading.Condition()
        self._running: dict[int, int] = {}

    def acquire(self, uid: int, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        with self._cond:
            while (
                sum(self._running.values()) >= self.total
                or self._running.get(uid, 0) >= self.per_uid
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._running[uid] = self._running.get(uid, 0) + 1
            return True

    def release(self, uid: int) -> None:
        with self._cond:
            left = self._running.get(uid, 1) - 1
            if left:
                self._running[uid] = left
            else:
                self._running.pop(uid, None)
            self._cond.notify_all()


class _ReplayCache:
    """Credentials already used, kept until they expire: a replay is refused even where
    munged's own cache forgot it (munged restarted, or another munged decoded it)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def first_use(self, cred: str, expires_s: float) -> bool:
        key = hashlib.sha256(cred.encode("ascii", "replace")).digest()
        now = self._clock()
        with self._lock:
            if key in self._seen and self._seen[key] >= now:
                return False
            if len(self._seen) >= REPLAY_CACHE_MAX:
                self._seen = {k: t for k, t in self._seen.items() if t >= now}
                if len(self._seen) >= REPLAY_CACHE_MAX:  # all still valid: drop the oldest
                    for k in sorted(self._seen, key=self._seen.get)[: REPLAY_CACHE_MAX // 10]:
                        del self._seen[k]
            self._seen[key] = expires_s
            return True


class Gateway:
    """The gateway's sockets and threads.

    Args:
        config: the ledger host's configuration (ledger, privacy, gateway, carbon).
        socket_path: the Unix socket (None: none).
        listen: (host, port) for TCP (None: none).
        policy: who sees what (default: from ``config``).
    """

    def __init__(
        self,
        config,
        *,
        socket_path: str | None,
        listen: tuple[str, int] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.ledger_path = config.ledger
        self.socket_path = Path(socket_path) if socket_path else None
        self.listen = listen
        self.policy = policy or Policy(config)
        self.caps = ConnectionCaps(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER)
        self.tcp_caps = ConnectionCaps(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS)
        self.slots = _Slots(MAX_QUERIES, MAX_QUERIES_PER_UID)
        self.replays = _ReplayCache()
        self.closing = threading.Event()
        self.served = 0
        self.refused = 0
        self._socks: list[socket.socket] = []
        self.tcp_address: tuple[str, int] | None = None

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.socket_path is not None:
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o666)  # anyone may ask; each request is checked
            sock.listen(128)
            self._socks.append(sock)
            start_thread(
                lambda: accept_forever(sock, self._admit_unix, self.closing, "gateway"),
                "llem-gateway-unix",
            )
        if self.listen is not None:
            host, port = self.listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            tcp.listen(128)
            self.tcp_address = tcp.getsockname()[:2]
            self._socks.append(tcp)
            start_thread(
                lambda: accept_forever(tcp, self._admit_tcp, self.closing, "gateway"),
                "llem-gateway-tcp",
            )

    def close(self) -> None:
        self.closing.set()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self.socket_path is not None:
            try:
                self.socket_path.unlink()
            except OSError:
                pass

    # -- admission -------------------------------------------------------------------------

    def _admit_unix(self, conn: socket.socket, _address: object) -> None:
        try:
            pid, uid, gid = peer_cred(conn)
        except OSError:
            conn.close()
            return
        self._admit(self.caps, conn, uid, f"uid {uid} (pid {pid})", Caller.of(uid, gid))

    def _admit_tcp(self, conn: socket.socket, address) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        self._admit(self.tcp_caps, conn, host, f"{host}:{address[1]}", None)

    def _admit(
        self, caps: ConnectionCaps, conn: socket.socket, key, peer: str, caller: Caller | None
    ) -> None:
        if not caps.admit(key):
            _busy(conn)
            return
        handle = lambda: self._handle(caps, conn, key, peer, caller)  # noqa: E731
        if not start_thread(handle, "llem-gateway-conn"):
            caps.release(key)
            _busy(conn)

    # -- one connection --------------------------------------------------------------------

    def _handle(
        self, caps: ConnectionCaps, conn: socket.socket, key, peer: str, caller: Caller | None
    ) -> None:
        try:
            with conn:
                answer = self._serve_one(conn, peer, caller)
                data = (json.dumps(answer, ensure_ascii=False) + "\n").encode(
                    "utf-8", "surrogatepass"
                )
                if len(data) > MAX_ANSWER_BYTES:
                    answer = {
                        "ok": False,
                        "error": f"the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB; "
                        "narrow the query (-S/-E, -u, -A, -j) or use --totals",
                    }
                    data = (json.dumps(answer) + "\n").encode()
                if not send_within(conn, data, ANSWER_DEADLINE_S):
                    log.warning("gateway: %s did not read its answer; cut", peer)
        except Exception:  # noqa: BLE001 - one connection never stops the gateway
            log.exception("gateway: serving %s failed", peer)
        finally:
            caps.release(key)

    def _serve_one(self, conn: socket.socket, peer: str, caller: Caller | None) -> dict:
        try:
            line = read_line(conn, max_bytes=wire.MAX_REQUEST_BYTES, deadline_s=REQUEST_DEADLINE_S)
            envelope = wire.parse_envelope(line)
            if caller is None:
                caller = self._munge_caller(envelope)
            request = wire.parse_request(envelope.request_text)
            self._check_cluster(request)
        except Refused as e:
            self.refused += 1
            log.warning("gateway: refused %s: %s", peer, e)
            return {"ok": False, "error": str(e)}
        except OSError as e:
            return {"ok": False, "error": f"bad request: {e}"}
        except Exception:  # noqa: BLE001 - a parser bug: refused, logged, never fatal
            self.refused += 1
            log.exception("gateway: refused %s: a request the parser could not check", peer)
            return {"ok": False, "error": "bad request: it could not be checked"}
        role = self.policy.role(caller)
        identity = {
            "user": caller.user,
            "uid": caller.uid,
            "role": role.name,
            "sees": role.describe(),
            "privacy": self.config.privacy,
        }
        if request.op in ("ping", "whoami"):
            return {"ok": True, "op": request.op, "identity": identity}
        if not self.slots.acquire(caller.uid, QUERY_SLOT_WAIT_S):
            log.warning(
                "gateway: %s (%s): no query slot within %g s", peer, caller.user, QUERY_SLOT_WAIT_S
            )
            return {"ok": False, "busy": True, "error": "the gateway is busy; try again"}
        if request.op == "report":
            refusal = _report_refusal(request.report, role)
            if refusal is not None:
                log.warning("gateway: refused %s (%s): %s", peer, caller.user, refusal)
                return {"ok": False, "error": refusal, "identity": identity}
        t0 = time.monotonic()
        try:
            if request.op == "report":
                answer = self._report(request.report, role)
            elif request.op == "job":
                answer = self._job(request, role)
            else:
                answer = self._query(request, role, caller)
        finally:
            self.slots.release(caller.uid)
        self.served += 1
        log.info(
            "gateway: %s (%s, %s): %s in %.0f ms",
            peer,
            caller.user,
            role.name,
            "refused" if not answer.get("ok") else "answered",
            (time.monotonic() - t0) * 1000,
        )
        answer["identity"] = identity
        return answer

    def _munge_caller(self, envelope: wire.Envelope) -> Caller:
        """The remote caller, from a MUNGE credential bound to this request."""
        from llem import munge

        if envelope.cred is None:
            raise Refused("requests over TCP need a MUNGE credential (is munge installed?)")
        try:
            cred = munge.decode(envelope.cred, self.config.gateway.munge_socket)
        except munge.MungeError as e:
            if e.code == munge.EMUNGE_CRED_REPLAYED:
                raise Refused(
                    "credential refused: replayed (a credential serves one request)"
                ) from None
            if e.code == munge.EMUNGE_CRED_EXPIRED:
                raise Refused("credential refused: expired") from None
            if e.code == munge.EMUNGE_CRED_REWOUND:
                raise Refused("credential refused: made in the future (clock skew?)") from None
            if e.code in (munge.EMUNGE_SOCKET, munge.EMUNGE_TIMEOUT, 0):
                log.error("gateway: munged unavailable: %s", e)
                raise Refused(
                    "the gateway cannot check credentials now (munged); try again"
                ) from None
            raise Refused(
                f"credential refused: {e} (not made with this cluster's MUNGE key?)"
            ) from None
        if cred.payload != wire.request_digest(envelope.request_text):
            raise Refused("credential refused: it was made for another request")
        if not self.replays.first_use(envelope.cred, cred.encode_time_s + cred.ttl_s):
            raise Refused("credential refused: replayed (a credential serves one request)")
        return Caller.of(cred.uid, cred.gid)

    def _check_cluster(self, request: wire.Request) -> None:
        ours = self.config.cluster
        if request.cluster is not None and "default" not in (ours, request.cluster):
            if request.cluster != ours:
                raise Refused(f"this gateway serves cluster {ours}, not {request.cluster[:64]!r}")

    # -- the query -------------------------------------------------------------------------

    def _spec_for(self, role: Role):
        """The ledger's connection string with the caller set for the session, for requests
        read on several connections (PostgreSQL: row-level security; the file otherwise)."""
        from llem.cluster.pg_ledger import caller_spec, is_postgres

        if not is_postgres(self.ledger_path):
            return self.ledger_path
        if role.visible is None:
            return caller_spec(str(self.ledger_path), None, admin=True)
        return caller_spec(str(self.ledger_path), role.visible.uid, role.visible.accounts)

    def _report(self, req: wire.ReportRequest, role: Role) -> dict:
        """``llem report`` in the gateway: the rendered text (html with its plots inside)."""
        from llem.cluster import report_queries
        from llem.errors import LlemError
        from llem.report import build_report
        from llem.report.period import Period

        period = Period(req.start_ns, req.end_ns, req.label, req.kind)
        deadline = time.monotonic() + self.config.gateway.query_timeout_s
        try:
            with report_queries.open_readonly(self._spec_for(role)) as ledger:
                timeout_s = self.config.gateway.query_timeout_s
                _bound_time(ledger, deadline, timeout_s)
                rep = build_report(
                    ledger,
                    self.config,
                    period,
                    account=req.account,
                    idle_w=req.idle_w,
                    top_n=req.top,
                    # the report's side connections too, not only this one
                    prepare=lambda conn: _bound_time(conn, deadline, timeout_s),
                )
            text = _render_report(rep, req.format)
        except Exception as e:  # noqa: BLE001
            if _timed_out(e):  # a LedgerError on PostgreSQL: its text names the database
                return {
                    "ok": False,
                    "error": "the report ran longer than "
                    f"{self.config.gateway.query_timeout_s:g} s",
                }
            if isinstance(e, LlemError):
                return {"ok": False, "error": str(e)}
            log.exception("gateway: report failed")
            return {"ok": False, "error": f"the report failed: {type(e).__name__}: {e}"}
        return {"ok": True, "text": text, "empty": bool(rep.empty)}

    def _job(self, request: wire.Request, role: Role) -> dict:
        """``llem job`` in the gateway: the ``llem.job/1`` view of a run the caller may see
        (its owner, a coordinator of its account, an admin), built with this host's carbon and
        idle-power settings. A job the caller may not see is answered as one the ledger does
        not have: its existence is not disclosed."""
        from llem.cluster import acct_queries
        from llem.cluster.job_queries import clusters_of_job, load_job
        from llem.errors import LlemError
        from llem.report import jobview
        from llem.safetext import safe_text

        req = request.job
        cluster = req.cluster or request.cluster or self.config.cluster
        visible = role.visible
        deadline = time.monotonic() + self.config.gateway.query_timeout_s
        try:
            with (
                acct_queries.open_ledger(self.ledger_path) as ledger,
                _as_caller(ledger, role),
            ):
                _bound_time(ledger, deadline, self.config.gateway.query_timeout_s)
                data = load_job(ledger, cluster, req.job_id, visible)
                if data is None and req.cluster is None:
                    others = clusters_of_job(ledger, req.job_id, visible)
                    if len(others) == 1:
                        cluster = others[0]
                        data = load_job(ledger, cluster, req.job_id, visible)
                    elif len(others) > 1:
                        return {
                            "ok": False,
                            "error": f"job {safe_text(req.job_id)} is on clusters "
                            f"{safe_text(', '.join(others))}: choose one with --cluster",
                        }
        except Exception as e:  # noqa: BLE001
            if _timed_out(e):  # a LedgerError on PostgreSQL: its text names the database
                return {
                    "ok": False,
                    "error": f"the query ran longer than {self.config.gateway.query_timeout_s:g} s",
                }
            if isinstance(e, LlemError):
                return {"ok": False, "error": str(e)}
            log.exception("gateway: job query failed")
            return {"ok": False, "error": f"the query failed: {type(e).__name__}"}
        if data is None:
            where = f"no job {safe_text(req.job_id)} on cluster {safe_text(cluster)}"
            if visible is not None:
                return {
                    "ok": False,
                    "error": f"{where} among the jobs you may see (privacy: the gateway shows "
                    f"you {role.describe()})",
                }
            return {
                "ok": False,
                "error": f"{where} in the ledger (it reaches the ledger after its Epilog and "
                "the next aggregation pass)",
            }
        carbon = carbon_error = None
        try:
            from llem.acct.co2e import resolve_carbon

            carbon = resolve_carbon(self.config)
        except (LlemError, ValueError) as e:
            carbon_error = f"carbon: {e}"
        return {
            "ok": True,
            "view": jobview.build(data, carbon, carbon_error, self.config.attribution.idle_w),
        }

    def _query(self, request: wire.Request, role: Role, caller: Caller) -> dict:
        from llem import acct
        from llem.cluster import acct_queries
        from llem.errors import LlemError

        f = replace(request.filter, visible=role.visible)
        opts = acct.AcctOptions(
            ledger=self.ledger_path,
            filter=f,
            allocations=request.allocations,
            duplicates=request.duplicates,
            columns=acct.all_columns(request.totals_by),
            mode="json",
            totals_by=request.totals_by,
            statement=request.statement,
            truncate=request.truncate,
            window=(_local(f.start_ns), _local(f.end_ns)),
            fields_given=request.fields is not None,
        )
        want_carbon = request.fields is None or bool(set(request.fields) & acct.CARBON_FIELDS)
        deadline = time.monotonic() + self.config.gateway.query_timeout_s
        try:
            with (
                acct_queries.open_ledger(self.ledger_path) as ledger,
                _as_caller(ledger, role),
            ):
                _bound_time(ledger, deadline, self.config.gateway.query_timeout_s)
                answer = acct.gateway_answer(ledger, opts, self.config, want_carbon)
        except Exception as e:  # noqa: BLE001
            if _timed_out(e):  # a LedgerError on PostgreSQL: its text names the database
                return {
                    "ok": False,
                    "error": f"the query ran longer than {self.config.gateway.query_timeout_s:g} s; "
                    "narrow it (-S/-E, -u, -A, -j)",
                }
            if isinstance(e, LlemError):
                return {"ok": False, "error": str(e)}
            log.exception("gateway: query failed")
            return {"ok": False, "error": f"the query failed: {type(e).__name__}"}
        notes = []
        if role.visible is not None and _asks_beyond(request, caller):
            notes.append(f"llem-acct: privacy: the gateway shows you {role.describe()}")
        return {"ok": True, **answer, "notes": notes}


def _report_refusal(report: wire.ReportRequest, role: Role) -> str | None:
    """Reports are cluster-wide: admins get any; a coordinator the statement of an account
    they coordinate; a user none (``privacy: none``: everyone, as before)."""
    if role.visible is None:
        return None
    if report.account is not None and report.account in role.visible.accounts:
        return None
    if role.visible.accounts:
        return (
            "privacy: you may have the statement of "
            + ", ".join(f"account {a}" for a in role.visible.accounts)
            + " ('llem report account ACCOUNT'), not this report"
        )
    return "privacy: reports are for admins and account coordinators; use llem-acct for your jobs"


def _busy(conn: socket.socket) -> None:
    """Refuse a connection over the caps at once, without a thread: take what the peer has
    already sent (closing over unread data would reset the connection and lose the answer),
    say busy, close. The client asks again after a pause."""
    try:
        conn.setblocking(False)
        try:
            conn.recv(wire.MAX_REQUEST_BYTES)
        except OSError:
            pass
        conn.send(b'{"ok": false, "busy": true, "error": "too many connections; try again"}\n')
    except OSError:
        pass
    finally:
        conn.close()


def _asks_beyond(request: wire.Request, caller: Caller) -> bool:
    """Whether the request may reach beyond the caller's own jobs (-a, -u, -j, -A)."""
    users = request.filter.users
    return users is None or not set(users) <= {caller.user, str(caller.uid)}


def _as_caller(ledger, role: Role):
    """On PostgreSQL, the transaction in which row-level security sees the caller (their uid
    and coordinated accounts; admins, and everyone with ``privacy: none``, see all): the
    database enforces the same visibility as the queries' own restriction (defence in
    depth, docs/ledger.md). Nothing on SQLite, a file the gateway alone reads."""
    from contextlib import nullcontext

    if not hasattr(ledger, "as_caller"):
        return nullcontext(ledger)
    if role.visible is None:
        return ledger.as_caller(None, (), admin=True)
    return ledger.as_caller(role.visible.uid, role.visible.accounts)


def row_security_line(ledger_path) -> str | None:
    """The gateway's start-up line about row-level security on a PostgreSQL ledger (None on
    SQLite): on, or why not (a warning: the queries' own restriction still applies)."""
    from llem.cluster import acct_queries
    from llem.cluster.pg_ledger import is_postgres
    from llem.errors import LlemError

    if not is_postgres(ledger_path):
        return None
    try:
        with acct_queries.open_ledger(ledger_path) as ledger:
            why = ledger.row_security()
    except LlemError as e:
        return f"gateway: row-level security: cannot check ({e})"
    if why is None:
        return "gateway: row-level security: on (the database shows each caller their rows)"
    return f"gateway: row-level security: OFF: {why}; the gateway's own restriction applies"


def _timed_out(e: Exception) -> bool:
    """Whether ``e`` is a statement stopped by :func:`_bound_time` (SQLite's interrupt,
    PostgreSQL's statement timeout)."""
    return "interrupted" in str(e) or "statement timeout" in str(e)


def _bound_time(ledger, deadline: float, timeout_s: float) -> None:
    """Stop the ledger's queries past ``deadline``: SQLite's progress handler, PostgreSQL's
    ``statement_timeout`` (per statement)."""
    db = getattr(ledger, "db", None)
    if hasattr(db, "set_progress_handler"):
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    else:
        ledger.query(
            "SELECT set_config('statement_timeout', ?, false)", [str(int(timeout_s * 1000))]
        )


def _render_report(rep, fmt: str) -> str:
    from llem.report import render

    if fmt == "html":
        from llem.report import plots

        return render.to_html(rep, plots.make_plots(rep))
    return {"md": render.to_markdown, "csv": render.to_csv, "json": render.to_json}[fmt](rep)


def _local(ns: int | None) -> datetime | None:
    return None if ns is None else datetime.fromtimestamp(ns // 10**9)
