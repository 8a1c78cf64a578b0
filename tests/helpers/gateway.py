"""A ledger gateway site for tests (root only): unprivileged users, a private ledger built by
``llem aggregate`` from real job slices, and a real ``llem serve`` process run as its own
unprivileged user.

Users: ``A`` and ``B`` (plain users), ``COORD`` (coordinator of account physics), ``ADMIN``
(member of the admin group), ``SERVICE`` (the gateway's user, in the ledger's group).
Jobs: A has 101 (physics) and 102 (chem); B has 201 (physics) and 202 (bio).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from llem import slices
from llem.cluster.aggregate import aggregate_once
from tests.helpers.acct import CONFIG
from tests.helpers.nodes import job_slices, node_config, spool_slice
from tests.helpers.users import ensure_group, ensure_user, python_for_users

A, B, COORD, ADMIN, SERVICE = "llemt-a", "llemt-b", "llemt-coord", "llemt-admin", "llemt-svc"
LEDGER_GROUP = "llemt-gw"
ADMIN_GROUP = "llemt-admins"
JOBS = (("101", A, "physics"), ("102", A, "chem"), ("201", B, "physics"), ("202", B, "bio"))
SINCE = ("-S", "2000-01-01")


class Site:
    """Users, the ledger, the config and the interpreter; :meth:`start` runs a gateway.

    Args:
        jobs: (job id, user, account) of the ledger's jobs.
    """

    def __init__(self, jobs: tuple[tuple[str, str, str], ...] = JOBS) -> None:
        self.jobs = jobs
        self.root = Path(tempfile.mkdtemp(prefix="llem-gw-"))
        os.chmod(self.root, 0o755)
        ensure_group(LEDGER_GROUP)
        ensure_group(ADMIN_GROUP)
        self.pw = {
            name: ensure_user(name, groups)
            for name, groups in (
                (A, ()),
                (B, ()),
                (COORD, ()),
                (ADMIN, (ADMIN_GROUP,)),
                (SERVICE, (LEDGER_GROUP,)),
            )
        }
        self.uid = {name: pw.pw_uid for name, pw in self.pw.items()}
        self.gid = {name: pw.pw_gid for name, pw in self.pw.items()}
        python = python_for_users(self.root)
        if python is None:
            raise RuntimeError("no Python that unprivileged users can run llem with")
        self.python, self.env = python
        self.ledger = self._build_ledger()
        self.socket = self.root / "run" / "gateway.sock"
        self.socket.parent.mkdir()
        shutil.chown(self.socket.parent, SERVICE)
        (self.root / "mpl").mkdir()
        shutil.chown(self.root / "mpl", SERVICE)
        self.config = self.root / "llem.yaml"
        self.config.write_text(
            CONFIG
            + f"ledger: {self.ledger}\n"
            + "gateway:\n"
            + f"  socket: {self.socket}\n"
            + f"  admin_groups: {ADMIN_GROUP}\n"
            + f"  coordinators: {{physics: [{COORD}]}}\n"
        )
        self.config.chmod(0o644)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "gateway.log"

    def _build_ledger(self) -> Path:
        """The jobs' slices, as Epilogs deliver them, merged by ``llem aggregate``."""
        cfg = replace(
            node_config(self.root / "site"),
            aggregate=replace(node_config(self.root).aggregate, ledger_group=LEDGER_GROUP),
        )
        Path(cfg.ledger).parent.mkdir(parents=True, mode=0o755)
        os.chmod(self.root / "site", 0o755)
        for job_id, user, account in self.jobs:
            data = job_slices(self.root / "src" / job_id, job_id, nodes=("n1",), user=user)[0]
            data["job"].update(uid=self.uid[user], gid=self.gid[user], account=account)
            slices.validate(data)
            spool_slice(cfg, data)
        result = aggregate_once(cfg)
        assert result.merged == len(self.jobs), result
        return Path(cfg.ledger)

    def env_for(self, **extra: str) -> dict[str, str]:
        return {**self.env, "LLEM_CONFIG": str(self.config), "TZ": "UTC", **extra}

    def service_env(self) -> dict[str, str]:
        """The gateway's environment: the test venv's packages after llem's copy, so that it
        can build reports (pandas, matplotlib) where the venv is readable to others."""
        import sysconfig

        env = self.env_for(MPLCONFIGDIR=str(self.root / "mpl"))
        env["PYTHONPATH"] += os.pathsep + sysconfig.get_paths()["purelib"]
        return env

    def start(self, *args: str) -> str:
        """Start ``llem serve`` as SERVICE; returns its 'serving' log line."""
        self.proc, line = self.spawn(*args)
        return line

    def spawn(self, *args: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
        """Another ``llem serve ARGS`` as SERVICE, logging to ``log``: (process, 'serving'
        line). The caller stops it."""
        log = log or self.log
        seen = log.stat().st_size if log.exists() else 0
        out = open(log, "ab")  # noqa: SIM115 - the process holds it
        proc = subprocess.Popen(
            [self.python, "-m", "llem.cli.main", "serve", *args],
            user=self.uid[SERVICE],
            group=self.gid[SERVICE],
            extra_groups=[ensure_group(LEDGER_GROUP)],
            env=self.service_env(),
            stdout=out,
            stderr=out,
            cwd="/",
        )
        out.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.findall(r"gateway: serving .*", log.read_text()[seen:])
            if found:
                return proc, found[-1]
            if proc.poll() is not None:
                raise RuntimeError(f"llem serve exited: {log.read_text()}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"llem serve did not start: {log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def acct(self, user: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``llem-acct ARGS`` run as ``user``."""
        return self.as_user(user, "from llem.cli.acct import main; main()", *args, timeout=timeout)

    def as_user(
        self, user: str, code: str, *args: str, timeout: float = 120, env=None, **extra_env
    ):
        return subprocess.run(
            [self.python, "-c", code, *args],
            user=self.uid[user] if user != "root" else 0,
            group=self.gid[user] if user != "root" else 0,
            extra_groups=[],
            env={**(env or self.env_for()), **extra_env},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
