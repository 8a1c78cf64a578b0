"""The client side of ``llem wrap`` inside a Slurm job: named windows kept by the node sampler.

The user's process cannot read root-only counters or write the root-owned store; it asks the
node's sampler over its Unix socket, which checks who is asking (SO_PEERCRED).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Mapping

from llem.errors import LlemError

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class WindowError(LlemError):
    """The node sampler refused or could not be reached."""


def socket_path(run_dir: str, env: Mapping[str, str]) -> Path | None:
    node = env.get("SLURMD_NODENAME")
    if not node or "/" in node or node.startswith("."):
        return None
    return Path(run_dir) / node / "sampler.sock"


def request(path: Path, message: dict, timeout_s: float = TIMEOUT_S) -> dict:
    """Send one request, return the sampler's answer; WindowError when refused or unreachable."""
    try:
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
    except OSError as e:
        raise WindowError(f"node sampler not reachable at {path}: {e.strerror or e}") from e
    try:
        answer = json.loads(data.decode())
    except ValueError as e:
        raise WindowError(f"node sampler gave a malformed answer: {data[:80]!r}") from e
    if not answer.get("ok"):
        raise WindowError(f"node sampler refused: {answer.get('error', 'no reason given')}")
    return answer


def open_window(path: Path, env: Mapping[str, str], name: str | None) -> dict:
    return request(path, {
        "op": "open",
        "job_id": env.get("SLURM_JOB_ID", ""),
        "step_id": env.get("SLURM_STEP_ID"),
        "name": name or "window",
        "pid": os.getpid(),
    })


def close_window(path: Path, env: Mapping[str, str], window_id: int) -> dict:
    return request(path, {"op": "close", "job_id": env.get("SLURM_JOB_ID", ""),
                          "window_id": window_id})


# -- the server side, in the node sampler ----------------------------------------------------


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
        op = request.get("op")
        job_id = str(request.get("job_id", ""))
        if op not in ("open", "close"):
            return {"ok": False, "error": f"unknown op {op!r}"}
        if not job_id.isdigit():
            return {"ok": False, "error": "job_id must be a Slurm job id"}
        job = self._running_run(job_id)
        if job is None:
            return {"ok": False, "error": f"job {job_id} is not running on this node"}
        refusal = _peer_refusal(pid, uid, job)
        if refusal is not None:
            return {"ok": False, "error": refusal}
        if op == "open":
            return self._open(pid, uid, request, job, interval_id, interval)
        return self._close(uid, request, job, interval_id, interval)

    def _running_run(self, job_id: str):
        """The job's latest running run; a job whose Prolog just ran is ingested first."""
        runs = self.store.runs_of(job_id, "running")
        if not runs and self.ingest_pending is not None:
            self.ingest_pending()
            runs = self.store.runs_of(job_id, "running")
        return max(runs, key=lambda r: r.start_ns) if runs else None

    def _open(self, pid: int, uid: int, request: dict, job, interval_id: int,
              interval) -> dict:
        name = str(request.get("name") or "window")[:128]
        step = request.get("step_id")
        step = None if step in (None, "") else str(step)[:32]
        window_id = self.store.open_window(job.run_id, job.job_id, step, name, uid, pid,
                                           interval.end_ns, interval_id,
                                           _raw_counters(interval))
        return {"ok": True, "window_id": window_id, "start_ns": interval.end_ns}

    def _close(self, uid: int, request: dict, job, interval_id: int, interval) -> dict:
        window_id = request.get("window_id")
        found = self.store.window(window_id)
        if found is None or found[0] != job.run_id:
            return {"ok": False, "error": f"no window {window_id} in job {job.job_id}"}
        run_id, owner, start_interval, status, start_ns = found
        if uid != 0 and uid != owner:
            return {"ok": False, "error": "permission denied: not your window"}
        if status != "open":
            return {"ok": False, "error": f"window {window_id} is already {status}"}
        energy = self.store.run_energy_between(run_id, start_interval, interval_id)
        self.store.close_window(window_id, interval.end_ns, interval_id,
                                _raw_counters(interval), energy)
        covered_ns = self.store.covered_ns_between(start_interval, interval_id)
        span_ns = max(1, interval.end_ns - start_ns)
        return {"ok": True, "window_id": window_id, "start_ns": start_ns,
                "end_ns": interval.end_ns, "energy_uj": energy,
                "devices": self._devices_of(energy),
                "coverage": round(min(1.0, covered_ns / span_ns), 4)}

    def _devices_of(self, energy: dict[str, int]) -> dict[str, dict]:
        return {key: {"component": d["component"], "device": d["name"], "source": d["source"],
                      "sensor": d["sensor"], "method": d["method"]}
                for key, d in self.store.devices().items() if key in energy}


def _peer_refusal(pid: int, uid: int, job) -> str | None:
    """Why the peer may not use the job's windows, or None: root, or the job's owner from a
    process inside the job's cgroup (where the node has job cgroups)."""
    from llem.node.usage import pid_in_job_cgroup

    if uid == 0:
        return None
    if uid != job.uid:
        return f"permission denied: job {job.job_id} is not yours"
    if pid_in_job_cgroup(pid, job.job_id) is False:
        return f"permission denied: process {pid} is not in job {job.job_id}"
    return None


def _raw_counters(interval) -> dict[str, int]:
    return {r.device_key: r.raw_uj for r in interval.rows if r.raw_uj is not None}
