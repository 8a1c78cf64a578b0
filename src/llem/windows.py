"""The client side of ``llem wrap`` inside a Slurm job: named windows kept by the node sampler.

The user's process cannot read root-only counters or write the root-owned store; it asks the
node's sampler over its Unix socket, which checks who is asking (SO_PEERCRED).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Mapping

from llem.errors import LlemError

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
