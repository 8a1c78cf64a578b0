"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temporary folder, started as an
unprivileged user (uid 65534 when the tests run as root: PostgreSQL refuses to run as root),
listening only on a Unix socket in that folder.

The binaries are Debian's (``scripts/install-postgresql.sh``): a missing one is a test
failure, never a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "llem_test"


def bin_dir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: Debian's newest, else ``PATH``'s."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Server:
    """One server: :meth:`database` gives a fresh database's connection string."""

    def __init__(self, *, durable: bool = False, settings: str = "") -> None:
        """``durable``: PostgreSQL's defaults (fsync, synchronous commit, full page writes),
        for benchmarks; the tests turn them off. ``settings``: more ``-c name=value``."""
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, postgres) not found: run "
                "scripts/install-postgresql.sh as root (apt-get install postgresql)"
            )
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="llem-pg-"))
        self.uid = 65534 if os.geteuid() == 0 else None
        if self.uid is not None:
            os.chown(self.root, self.uid, self.uid)
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.socket_dir = str(self.root)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-k {self.socket_dir} -c listen_addresses='' -c max_connections=60 "
            + ("" if durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off ")
            + settings,
            "start",
        )
        self.count = 0

    def _run(self, program: str, *args: str) -> None:
        out = subprocess.run(
            [str(self.bin / program), *args],
            user=self.uid,
            group=self.uid,
            cwd=self.root,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{program} failed: {out.stdout}{out.stderr}")

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}"

    def database(self, prefix: str = "ledger") -> str:
        """A new, empty database; its connection string."""
        import psycopg

        self.count += 1
        name = f"{prefix}_{self.count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.root, ignore_errors=True)


def copy_into(server: Server, sqlite_path, name: str = "copy") -> tuple[str, dict]:
    """Copy an SQLite ledger into a new database of ``server`` with ``llem ledger copy``'s code
    (for the benchmarks); return its connection string and what the copy measured."""
    from llem.cluster.ledger import Ledger
    from llem.cluster.ledger_tools import copy_ledger
    from llem.cluster.pg_ledger import PgLedger

    url = server.database(name)
    t0 = time.perf_counter()
    last = [t0]

    def progress(table: str, done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 15:
            last[0] = time.perf_counter()
            print(f"  copying {table}: {done:,}/{total:,} rows", flush=True)

    with Ledger(sqlite_path, readonly=True) as src, PgLedger(url) as dst:
        res = copy_ledger(src, dst, source_name=str(sqlite_path), progress=progress)
        size = dst.size_bytes()
    elapsed = time.perf_counter() - t0
    return url, {
        "rows": sum(n for n, _ in res.counts.values()),
        "jobs": res.counts["job_runs"][0],
        "seconds": elapsed,
        "bytes": size,
        "sqlite_bytes": os.path.getsize(sqlite_path),
    }
