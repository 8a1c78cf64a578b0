"""A real, local Slurm cluster for tests: munge, one slurmctld and N slurmd on this machine.

Built from the facts in ``shared/SLURM-LAB.md`` (Debian 12, Slurm 22.05, root, no systemd):
every node is one ``slurmd -N nX`` (Slurm's multiple-slurmd mode, all on 127.0.0.1 with ports
``port_base+1 ..``), so everything node-local must be keyed on ``SLURMD_NODENAME``.

Usage::

    with SlurmCluster(nodes=2, gpus_per_node=2, prolog=path) as cluster:
        job_id = cluster.submit(["--wrap", "true"])
        assert cluster.wait_job(job_id) == "COMPLETED"
        assert cluster.drained_nodes() == {}

Daemons run in the foreground (``-D``) as children of the test process and are stopped by
PID; every running cluster is recorded under :data:`REGISTRY_DIR` so that a later run kills
what a crashed run left behind. Clusters that run at the same time need their own node names
and ports (:class:`ClusterFactory` hands them out).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

SBIN = Path("/usr/sbin")
SLURMCTLD = SBIN / "slurmctld"
SLURMD = SBIN / "slurmd"
MUNGED = SBIN / "munged"
SLURMDBD = SBIN / "slurmdbd"
MARIADBD = SBIN / "mariadbd"
MARIADB_INSTALL_DB = Path("/usr/bin/mariadb-install-db")
MARIADB_CLIENT = Path("/usr/bin/mariadb")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
SPANK_HEADER = Path("/usr/include/slurm/spank.h")
# proctrack/cgroup needs the v1 freezer here (SLURM-LAB.md); elsewhere fall back to linuxproc.
CGROUP_V1_FREEZER = Path("/sys/fs/cgroup/freezer")

REGISTRY_DIR = Path("/run/llem-slurm-harness")
TEST_USER = "llemtest"
TEST_USER2 = "llemtest2"

# Final Slurm job states: wait_job() stops polling at any of these.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class HarnessError(RuntimeError):
    """The cluster could not be started, or a command against it failed."""


def missing_requirements() -> list[str]:
    """Why a real cluster cannot run here; empty when it can.

    Returns:
        Human-readable reasons (not root, a missing executable or header).
    """
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not root")
    for path in (SLURMCTLD, SLURMD, MUNGED, SBIN / "runuser", Path("/usr/bin/sbatch")):
        if not path.exists():
            reasons.append(f"{path} missing (run scripts/install-slurm.sh)")
    return reasons


def missing_accounting_requirements() -> list[str]:
    """Why a cluster with slurmdbd and MariaDB cannot run here; empty when it can."""
    reasons = missing_requirements()
    for path in (SLURMDBD, MARIADBD, MARIADB_INSTALL_DB, MARIADB_CLIENT, Path("/usr/bin/sacct")):
        if not path.exists():
            reasons.append(f"{path} missing (run scripts/install-slurm.sh)")
    if not list(Path("/usr/lib").glob("*/slurm-wlm/accounting_storage_mysql.so")):
        reasons.append("accounting_storage_mysql.so missing (package slurm-wlm-mysql-plugin)")
    return reasons


# --------------------------------------------------------------------------- users


def ensure_user(name: str) -> pwd.struct_passwd:
    """Create an unprivileged local user (with a home) if it does not exist yet.

    Args:
        name: the login name, for example :data:`TEST_USER`.

    Returns:
        The user's passwd entry.
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    _run(["/usr/sbin/useradd", "--create-home", "--shell", "/bin/bash", name], timeout=30)
    return pwd.getpwnam(name)


# --------------------------------------------------------------------------- munge


def _munge_works() -> bool:
    try:
        cred = subprocess.run(
            ["/usr/bin/munge", "-n"], capture_output=True, timeout=5, check=True
        ).stdout
        subprocess.run(["/usr/bin/unmunge"], input=cred, capture_output=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


class _Munge:
    """munged shared by every cluster of this process; stopped by whoever started it."""

    users = 0
    started_pid: int | None = None

    @classmethod
    def acquire(cls) -> None:
        if not _munge_works():
            cls._start()
        cls.users += 1

    @classmethod
    def _start(cls) -> None:
        if not MUNGE_KEY.exists():
            _run(["/usr/sbin/mungekey", "--create", f"--keyfile={MUNGE_KEY}"], timeout=30)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        pid_file = MUNGE_SOCKET_DIR / "munged.pid"
        # --force: a stale socket from a killed munged must not stop the start.
        _run(["/usr/sbin/runuser", "-u", "munge", "--", str(MUNGED), "--force"], timeout=30)
        deadline = time.monotonic() + 10
        while not _munge_works():
            if time.monotonic() > deadline:
                raise HarnessError("munged started but munge -n | unmunge still fails")
            time.sleep(0.05)
        cls.started_pid = int(pid_file.read_text().strip())
        _Registry.write("munged", MUNGE_SOCKET_DIR, [cls.started_pid])

    @classmethod
    def release(cls) -> None:
        cls.users = max(0, cls.users - 1)
        if cls.users or cls.started_pid is None:
            return
        _terminate_pids([cls.started_pid], own_children=False)
        cls.started_pid = None
        _Registry.remove("munged")


# --------------------------------------------------------------------------- processes


def _run(cmd: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if proc.returncode != 0:
        raise HarnessError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat, or None when the PID is gone.

    ``kill -0`` is not enough here: PID 1 of this sandbox reaps orphans late (SLURM-LAB.md).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return None


def _terminate_pids(pids: Iterable[int], own_children: bool, grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; reaps them when they are our children."""
    pids = [p for p in pids if _alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while True:
        if own_children:
            for pid in pids:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if own_children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


class _Registry:
    """Files under /run naming each running cluster's daemons, for crash clean-up.

    One file per cluster directory (``base_dir.name`` is unique), so that concurrent runs
    never overwrite each other's entry.
    """

    @staticmethod
    def _path(key: str) -> Path:
        return REGISTRY_DIR / f"{key}.json"

    @classmethod
    def write(cls, key: str, base_dir: Path, pids: Sequence[int]) -> None:
        REGISTRY_DIR.mkdir(mode=0o700, exist_ok=True)
        entry = {
            "owner_pid": os.getpid(),
            "owner_cmdline": _cmdline(os.getpid()),
            "base_dir": str(base_dir),
            "daemons": [{"pid": p, "cmdline": _cmdline(p)} for p in pids],
        }
        tmp = cls._path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        tmp.rename(cls._path(key))

    @classmethod
    def remove(cls, key: str) -> None:
        cls._path(key).unlink(missing_ok=True)

    @classmethod
    def reap_stale(cls) -> list[str]:
        """Kill what crashed runs left behind; returns what was done.

        First the daemons of every entry whose owning process is gone; then any slurmctld
        or slurmd reading a harness ``slurm.conf`` (under ``llem-slurm-*``) that no live
        entry names (left by a run killed between spawn and registry write, or by an entry
        lost some other way). Daemons of a real, site-configured Slurm never match.
        """
        done = []
        live_pids: set[int] = set()
        for path in sorted(REGISTRY_DIR.glob("*.json")) if REGISTRY_DIR.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            owner = entry.get("owner_pid")
            if owner and _alive(owner) and _cmdline(owner) == entry.get("owner_cmdline"):
                # A live run owns it (maybe this very process): leave it alone.
                live_pids.update(d["pid"] for d in entry.get("daemons", []))
                continue
            # Only kill a PID whose command line is still the one recorded: PIDs get reused.
            stale = [
                d["pid"]
                for d in entry.get("daemons", [])
                if _alive(d["pid"]) and _cmdline(d["pid"]) == d["cmdline"]
            ]
            _terminate_pids(stale, own_children=False)
            base_dir = Path(entry.get("base_dir", ""))
            if base_dir.name.startswith("llem-slurm-"):
                shutil.rmtree(base_dir, ignore_errors=True)
            path.unlink(missing_ok=True)
            done.append(f"{path.stem}: killed stale pids {stale}")
        orphans = [pid for pid in _harness_daemon_pids() if pid not in live_pids]
        if orphans:
            _terminate_pids(orphans, own_children=False)
            done.append(f"killed unregistered harness daemons {orphans}")
        return done


def _harness_daemon_pids() -> list[int]:
    """PIDs of slurmctld/slurmd processes started by this harness (any run)."""
    marker = f" -f {tempfile.gettempdir()}/llem-slurm-"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        cmdline = _cmdline(int(proc.name)) or ""
        if cmdline.startswith((f"{SLURMCTLD} ", f"{SLURMD} ")) and marker in cmdline:
            pids.append(int(proc.name))
    return [p for p in pids if _alive(p)]


# --------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class CommandResult:
    """What a client command (sbatch, srun, ...) returned."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class SlurmCluster:
    """A local Slurm cluster: munged, slurmctld and ``nodes`` slurmd, all stopped by PID.

    Args:
        nodes: number of slurmd (nodes ``{node_prefix}1 .. {node_prefix}N``).
        gpus_per_node: fake GPUs per node (``/dev/nvidiaN``-like char devices ``c 195 N`` in
            the temp dir, ``gres.conf`` with ``AutoDetect=off`` and ``Type=fake``).
        cpus_per_node: CPUs each node declares (all nodes share the real cores).
        gpu_minors: the minor number of each fake GPU file ``nvidia0``, ``nvidia1``, ...
            (default: its own number); other values make a node whose Slurm GPU index is
            not the minor number.
        prolog, epilog, epilog_slurmctld, prolog_slurmctld: absolute script paths, or None.
        plugstack: lines of ``plugstack.conf`` (for example ``optional /abs/llem.so k=v``).
        extra_conf: extra ``slurm.conf`` lines, appended last (later keys win).
        env: extra environment for the daemons and the client commands. Note that slurmd
            gives the Prolog/Epilog an environment of its own, without these.
        use_cgroups: ``proctrack/cgroup``, ``task/cgroup`` and ``jobacct_gather/cgroup``
            (True), or ``proctrack/linuxproc`` without a task plugin (False); None: cgroups
            where the cgroup v1 freezer exists.
        name: cluster name (``ClusterName``, ``SLURM_CLUSTER_NAME``).
        node_prefix: node names are this plus 1..N. Clusters running at the same time need
            different prefixes (cgroups are per node name) and different ports.
        port_base: slurmd ports are ``port_base+1 .. port_base+N``; slurmctld listens on
            ``port_base``.
        base_dir: where to put everything; a fresh ``/tmp/llem-slurm-*`` when None.
        keep_dir: keep ``base_dir`` after :meth:`stop` (for debugging).
        accounting: also run slurmdbd on a MariaDB of its own (a fresh datadir under
            ``base_dir``, listening on 127.0.0.1 only), with
            ``AccountingStorageType=accounting_storage/slurmdbd``, so that ``sacct`` works.
            MariaDB listens on ``port_base+90``, slurmdbd on ``port_base+91``. Costs about
            3 s more at start: only tests that need ``sacct`` ask for it.
    """

    #: Clusters started and not yet stopped in this process (for failure reports).
    running: ClassVar[list[SlurmCluster]] = []

    #: The one partition, holding every node.
    partition = "debug"

    def __init__(
        self,
        nodes: int = 3,
        gpus_per_node: int = 0,
        cpus_per_node: int = 2,
        gpu_minors: Sequence[int] | None = None,
        prolog: str | os.PathLike | None = None,
        epilog: str | os.PathLike | None = None,
        epilog_slurmctld: str | os.PathLike | None = None,
        prolog_slurmctld: str | os.PathLike | None = None,
        plugstack: Sequence[str] = (),
        extra_conf: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        use_cgroups: bool | None = None,
        name: str = "llemtest",
        node_prefix: str = "n",
        port_base: int = 17000,
        base_dir: str | os.PathLike | None = None,
        keep_dir: bool = False,
        accounting: bool = False,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.node_count = nodes
        self.gpus_per_node = gpus_per_node
        self.gpu_minors = list(gpu_minors) if gpu_minors else list(range(gpus_per_node))
        self.cpus_per_node = cpus_per_node
        self.prolog = prolog
        self.epilog = epilog
        self.epilog_slurmctld = epilog_slurmctld
        self.prolog_slurmctld = prolog_slurmctld
        self.plugstack = list(plugstack)
        self.extra_conf = list(extra_conf)
        self.extra_env = dict(env or {})
        self.use_cgroups = CGROUP_V1_FREEZER.is_dir() if use_cgroups is None else use_cgroups
        self.name = name
        self.node_prefix = node_prefix
        self.port_base = port_base
        self._base_dir_arg = base_dir
        self.keep_dir = keep_dir
        self.accounting = accounting
        self.base_dir: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}
        self._munge_acquired = False
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ paths

    @property
    def nodes(self) -> list[str]:
        """Node names, in order."""
        return [f"{self.node_prefix}{i}" for i in range(1, self.node_count + 1)]

    @property
    def conf_path(self) -> Path:
        """The slurm.conf; every client command needs ``SLURM_CONF`` pointing here."""
        return self._dir / "etc" / "slurm.conf"

    @property
    def plugstack_path(self) -> Path:
        return self._dir / "etc" / "plugstack.conf"

    @property
    def work_dir(self) -> Path:
        """A world-writable (sticky) directory where jobs run and write their output."""
        return self._dir / "work"

    @property
    def scripts_dir(self) -> Path:
        """Where tests may put Prolog/Epilog scripts (root-owned, not writable by users)."""
        return self._dir / "scripts"

    @property
    def dumps_dir(self) -> Path:
        """Where :meth:`write_env_dump_script` scripts write (root-owned)."""
        return self._dir / "dumps"

    @property
    def log_dir(self) -> Path:
        return self._dir / "log"

    @property
    def gpu_dev_dir(self) -> Path:
        return self._dir / "dev"

    @property
    def _dir(self) -> Path:
        if self.base_dir is None:
            raise HarnessError("cluster directories exist only after prepare() or start()")
        return self.base_dir

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands: ours, plus ``SLURM_CONF`` and the extra env."""
        env = dict(os.environ)
        # Keep the test process' Slurm context (if pytest runs inside a job) out of ours.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SPANK_")):
                del env[key]
        env.update(self.extra_env)
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def prepare(self) -> Path:
        """Create the directories and write the configuration; returns ``base_dir``.

        Called by :meth:`start`; call it earlier to write scripts into :attr:`scripts_dir`
        before the daemons start (:meth:`start` rewrites the configuration from the
        attributes, so ``cluster.prolog = path`` between the two is enough).
        """
        if self.base_dir is not None:
            return self.base_dir
        if self._base_dir_arg is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=f"llem-slurm-{self.name}-"))
        else:
            self.base_dir = Path(self._base_dir_arg)
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)  # jobs' users must traverse it to reach work/
        for sub in ("etc", "log", "state", "spool", "run", "scripts", "dumps"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        for node in self.nodes:
            (self.base_dir / "spool" / node).mkdir(exist_ok=True)
        self.work_dir.mkdir(exist_ok=True)
        self.work_dir.chmod(0o1777)
        self._make_fake_gpus()
        self.write_config()
        return self.base_dir

    def start(self, timeout_s: float = 30.0) -> SlurmCluster:
        """Start munged (if needed), slurmctld and the slurmd; wait until all nodes are idle.

        Raises:
            HarnessError: a daemon died or the nodes did not become idle; the message holds
                the daemons' logs. Everything started so far is stopped first.
        """
        problems = missing_accounting_requirements() if self.accounting else missing_requirements()
        if problems:
            raise HarnessError("cannot start a Slurm cluster: " + "; ".join(problems))
        t0 = time.monotonic()
        _Registry.reap_stale()
        self.prepare()
        self.write_config()  # options may have changed since prepare()
        try:
            _Munge.acquire()
            self._munge_acquired = True
            if self.accounting:
                self._start_accounting(timeout_s)
            self._spawn("slurmctld", [str(SLURMCTLD), "-D", "-i", "-f", str(self.conf_path)])
            self._wait_for(self._controller_up, timeout_s, "slurmctld to answer")
            for node in self.nodes:
                self._spawn(node, [str(SLURMD), "-D", "-f", str(self.conf_path), "-N", node])
            self._wait_for(self._all_idle, timeout_s, "all nodes to become idle")
        except BaseException as exc:  # no daemon left behind, even on Ctrl-C
            logs = self.logs()
            self.stop()
            if not isinstance(exc, Exception):
                raise
            raise HarnessError(f"cluster {self.name} did not start: {exc}\n{logs}") from exc
        self.startup_s = time.monotonic() - t0
        SlurmCluster.running.append(self)
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID, release munged, remove the temp dir.

        Safe to call twice and after a failed start.
        """
        if self in SlurmCluster.running:
            SlurmCluster.running.remove(self)
        if self._daemons and self._daemon_alive("slurmctld"):
            self.cancel_all()
        # slurmd first, so that no node is still reporting to a dying controller; then the
        # controller, then slurmdbd (which the controller reports to), then its database.
        last = ("slurmctld", "slurmdbd", "mariadbd")
        node_procs = [p for n, p in self._daemons.items() if n not in last]
        _terminate_pids([p.pid for p in node_procs], own_children=True)
        for key in last:
            if key in self._daemons:
                _terminate_pids([self._daemons[key].pid], own_children=True, grace_s=10.0)
        for proc in self._daemons.values():
            proc.poll()
        self._daemons.clear()
        if self.base_dir is not None:
            _Registry.remove(self.base_dir.name)
        if self._munge_acquired:
            _Munge.release()
            self._munge_acquired = False
        if self.base_dir is not None and not self.keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    # ------------------------------------------------------------------ accounting

    @property
    def mariadb_port(self) -> int:
        return self.port_base + 90

    @property
    def dbd_port(self) -> int:
        return self.port_base + 91

    @property
    def _db_socket(self) -> Path:
        return self._dir / "run" / "mariadb.sock"

    def _start_accounting(self, timeout_s: float) -> None:
        """MariaDB in a fresh datadir, a user for slurmdbd, slurmdbd, and the cluster's row."""
        datadir = self._dir / "mariadb"
        if not (datadir / "mysql").is_dir():
            _run(
                [
                    str(MARIADB_INSTALL_DB),
                    "--no-defaults",
                    f"--datadir={datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                timeout=120,
            )
        self._spawn(
            "mariadbd",
            [
                str(MARIADBD),
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                f"--socket={self._db_socket}",
                f"--port={self.mariadb_port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self._dir / 'run' / 'mariadbd.pid'}",
                f"--log-error={self.log_dir / 'mariadbd.log'}",
                "--innodb-buffer-pool-size=32M",
                # slurmdbd's tables need a lock wait longer than the default on a slow host
                "--innodb-lock-wait-timeout=900",
                "--skip-log-bin",
            ],
        )
        self._wait_for(self._mariadb_up, timeout_s, "MariaDB to answer")
        password = "llem-" + os.urandom(8).hex()
        self._mariadb_sql(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
            "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1'"
        )
        conf = self.conf_path.with_name("slurmdbd.conf")
        conf.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    "DebugLevel=info",
                    f"LogFile={self.log_dir / 'slurmdbd.log'}",
                    f"PidFile={self._dir / 'run' / 'slurmdbd.pid'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.mariadb_port}",
                    "StorageUser=slurm",
                    f"StoragePass={password}",
                    f"StorageLoc=slurm_acct_{self.name}",
                ]
            )
            + "\n"
        )
        # slurmdbd refuses a slurmdbd.conf that others may read, or not owned by SlurmUser.
        conf.chmod(0o600)
        os.chown(conf, 0, 0)
        # slurmdbd finds slurmdbd.conf beside the file SLURM_CONF names.
        self._spawn("slurmdbd", [str(SLURMDBD), "-D"])
        self._wait_for(self._dbd_up, timeout_s, "slurmdbd to answer")
        res = self.run(["sacctmgr", "-i", "add", "cluster", self.name], timeout=30)
        if res.returncode != 0 and "already exists" not in res.output.lower():
            raise HarnessError(f"sacctmgr add cluster {self.name} failed: {res.output}")

    def _mariadb_sql(self, sql: str) -> str:
        return _run(
            [
                str(MARIADB_CLIENT),
                "--no-defaults",
                f"--socket={self._db_socket}",
                "-u",
                "root",
                "-N",
                "-e",
                sql,
            ],
            timeout=30,
        ).stdout

    def _mariadb_up(self) -> bool:
        try:
            self._mariadb_sql("SELECT 1")
        except (HarnessError, subprocess.TimeoutExpired):
            return False
        return True

    def _dbd_up(self) -> bool:
        return self.run(["sacctmgr", "-n", "list", "cluster"], timeout=10).returncode == 0

    def stop_slurmdbd(self) -> None:
        """Stop slurmdbd (only): ``sacct`` then fails, as when the accounting host is down."""
        proc = self._daemons.pop("slurmdbd", None)
        if proc is not None:
            _terminate_pids([proc.pid], own_children=True, grace_s=10.0)
            _Registry.write(self._dir.name, self._dir, [p.pid for p in self._daemons.values()])

    def start_slurmdbd(self, timeout_s: float = 30.0) -> None:
        """Start slurmdbd again after :meth:`stop_slurmdbd`."""
        self._spawn("slurmdbd", [str(SLURMDBD), "-D"])
        self._wait_for(self._dbd_up, timeout_s, "slurmdbd to answer")

    def sacct(self, args: Sequence[str], timeout: float = 30) -> CommandResult:
        """``sacct ARGS`` as root (every user's jobs need ``-a``)."""
        return self.run(["sacct", *args], timeout=timeout)

    def _spawn(self, key: str, cmd: list[str]) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["SLURM_CONF"] = str(self.conf_path)
        # Our own session: a Ctrl-C in the terminal reaches pytest, which then stops us.
        with open(self.log_dir / f"{key}.stdout", "ab") as log:
            self._daemons[key] = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=str(self._dir),
            )
        _Registry.write(self._dir.name, self._dir, [p.pid for p in self._daemons.values()])

    def _daemon_alive(self, key: str) -> bool:
        proc = self._daemons.get(key)
        return proc is not None and proc.poll() is None

    def _wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            dead = [k for k in self._daemons if not self._daemon_alive(k)]
            if dead:
                raise HarnessError(f"daemon(s) {dead} exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.1)

    def _controller_up(self) -> bool:
        return self.run(["scontrol", "ping"], timeout=5).returncode == 0

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == self.node_count and all(s == "idle" for s in states.values())

    def cancel_all(self, timeout_s: float = 15) -> None:
        """``scancel`` every job and wait (bounded) until the queue is empty."""
        self.run(["scancel", "--full", f"--partition={self.partition}"], timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            res = self.run(["squeue", "-h", "-o", "%i"], timeout=10)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.2)

    # ------------------------------------------------------------------ configuration

    def _make_fake_gpus(self) -> None:
        if not self.gpus_per_node:
            return
        self.gpu_dev_dir.mkdir(exist_ok=True)
        for i in range(self.gpus_per_node):
            dev = self.gpu_dev_dir / f"nvidia{i}"
            if not dev.exists():
                os.mknod(
                    dev,
                    0o666 | 0o020000,  # S_IFCHR
                    os.makedev(195, self.gpu_minors[i]),
                )

    def write_config(self) -> None:
        """(Re)write slurm.conf, cgroup.conf, gres.conf and plugstack.conf from the options.

        Clients read them at every command; the daemons only at start (or ``scontrol
        reconfigure``).
        """
        d = self._dir
        nodes = f"{self.node_prefix}[1-{self.node_count}]" if self.node_count > 1 else self.nodes[0]
        ports = (
            f"[{self.port_base + 1}-{self.port_base + self.node_count}]"
            if self.node_count > 1
            else str(self.port_base + 1)
        )
        gres = f" Gres=gpu:fake:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            f"ClusterName={self.name}",
            # slurmctld compares this with its own short host name.
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={self.port_base}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d / 'log' / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "PrologFlags=Alloc,Contain",
            "PrologEpilogTimeout=60",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            # Fast tests: short waits everywhere.
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=2",
            "MinJobAge=300",
            "SchedulerParameters=batch_sched_delay=0",
            "MailProg=/bin/true",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool' / '%n'}",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={self.plugstack_path}",
        ]
        if self.accounting:
            lines += [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={self.dbd_port}",
                "JobAcctGatherFrequency=5",
            ]
        else:
            lines.append("AccountingStorageType=accounting_storage/none")
        if self.use_cgroups:
            lines += [
                "ProctrackType=proctrack/cgroup",
                "TaskPlugin=task/cgroup",
                "JobAcctGatherType=jobacct_gather/cgroup",
            ]
        else:
            lines += [
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/linux",
            ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
        for key, value in (
            ("Prolog", self.prolog),
            ("Epilog", self.epilog),
            ("PrologSlurmctld", self.prolog_slurmctld),
            ("EpilogSlurmctld", self.epilog_slurmctld),
        ):
            if value is not None:
                lines.append(f"{key}={Path(value).resolve()}")
        lines += [
            (
                f"NodeName={nodes} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} "
                f"CPUs={self.cpus_per_node} RealMemory=1000{gres} State=UNKNOWN"
            ),
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            *self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        (d / "etc" / "cgroup.conf").write_text("CgroupAutomount=yes\nConstrainCores=no\n")
        if self.gpus_per_node:
            last = self.gpus_per_node - 1
            files = f"nvidia[0-{last}]" if last else "nvidia0"
            (d / "etc" / "gres.conf").write_text(
                "AutoDetect=off\n"
                f"NodeName={nodes} Name=gpu Type=fake File={self.gpu_dev_dir / files}\n"
            )
        self.write_plugstack(self.plugstack)

    def write_plugstack(self, lines: Sequence[str]) -> None:
        """Replace plugstack.conf. Clients (srun, sbatch) read it at every command."""
        self.plugstack = list(lines)
        self.plugstack_path.write_text("".join(f"{line}\n" for line in self.plugstack))

    # ------------------------------------------------------------------ commands

    def run(
        self,
        args: Sequence[str],
        user: str | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> CommandResult:
        """Run a Slurm client command (or anything) with ``SLURM_CONF`` set.

        Args:
            args: the command, for example ``["squeue", "-h"]``.
            user: run as this user through ``runuser -u USER -- env ...``; root when None.
            env: extra variables for this command only.
            cwd: working directory; :attr:`work_dir` when None.
        """
        full_env = self.env
        full_env.update(env or {})
        cmd = list(args)
        if user is not None:
            # runuser keeps the environment except HOME/SHELL/USER/LOGNAME; pass the
            # Slurm-relevant part explicitly so it survives any PAM env reset.
            passed = [
                f"{k}={v}"
                for k, v in full_env.items()
                if k == "SLURM_CONF" or k in self.extra_env or (env and k in env)
            ]
            cmd = ["/usr/sbin/runuser", "-u", user, "--", "/usr/bin/env", *passed, *cmd]
        proc = subprocess.run(
            cmd,
            check=False,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=str(cwd or self.work_dir),
        )
        return CommandResult(tuple(cmd), proc.returncode, proc.stdout, proc.stderr)

    def submit(
        self,
        args: Sequence[str] = (),
        user: str = TEST_USER,
        script: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> str | CommandResult:
        """``sbatch --parsable`` as ``user`` in :attr:`work_dir`.

        Args:
            args: sbatch arguments, e.g. ``["-N2", "--wrap", "hostname"]``.
            script: the batch script's text (read from stdin), instead of ``--wrap``.
            check: raise on failure and return the job id; when False return the
                :class:`CommandResult` (for tests of refused submissions).

        Returns:
            The job id as a string (``check=True``), else the command's result.
        """
        res = self.run(
            ["sbatch", "--parsable", f"--chdir={self.work_dir}", *args],
            user=user,
            env=env,
            input=script,
        )
        if not check:
            return res
        if res.returncode != 0:
            raise HarnessError(f"sbatch {list(args)} failed ({res.returncode}):\n{res.output}")
        return res.stdout.strip().split(";")[0]

    def srun(
        self,
        args: Sequence[str],
        user: str = TEST_USER,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> CommandResult:
        """``srun ARGS`` as ``user`` in :attr:`work_dir`; returns its result (no check)."""
        return self.run(
            ["srun", f"--chdir={self.work_dir}", *args], user=user, env=env, timeout=timeout
        )

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty once the controller forgot the job)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=10)
        if res.returncode != 0:
            return {}
        info = {}
        for token in res.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def wait_job(self, job_id: str, timeout: float = 30) -> str:
        """Wait until the job reaches a final state and its Epilog has finished.

        Returns:
            The final state, e.g. ``COMPLETED``.

        Raises:
            HarnessError: not finished in time (with the job record and the logs).
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            # COMPLETING means an Epilog still runs somewhere; wait for it to end too.
            if state in FINAL_STATES and not self._job_completing(job_id):
                return state
            time.sleep(0.1)
        raise HarnessError(f"job {job_id} not finished after {timeout} s: {info}\n{self.logs()}")

    def _job_completing(self, job_id: str) -> bool:
        res = self.run(["squeue", "-h", "-t", "CG", "-j", str(job_id), "-o", "%i"], timeout=10)
        return bool(res.stdout.strip())

    def queued_jobs(self) -> list[str]:
        """Ids of the jobs that are pending, running or suspended (not those completing)."""
        res = self.run(["squeue", "-h", "-o", "%i %t"], timeout=10)
        return [line.split()[0] for line in res.stdout.splitlines() if line.split()[1:] != ["CG"]]

    def node_states(self) -> dict[str, str]:
        """Node name -> lower-case sinfo state (``idle``, ``mixed``, ``drained``, ...)."""
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
        states = {}
        for line in res.stdout.splitlines():
            node, _, state = line.partition(" ")
            states[node] = state.strip().lower()
        return states

    def drained_nodes(self) -> dict[str, str]:
        """Nodes that are drained, draining, down or failing, with the reason Slurm gives."""
        bad = ("drain", "down", "fail", "not_responding", "unknown")
        res = self.run(["sinfo", "-h", "-N", "-o", "%N|%T|%E"], timeout=10)
        out = {}
        for line in res.stdout.splitlines():
            node, state, reason = (line.split("|") + ["", ""])[:3]
            if any(b in state.lower() for b in bad):
                out[node] = f"{state}: {reason}"
        return out

    # ------------------------------------------------------------------ Prolog/Epilog helpers

    def write_script(self, name: str, text: str) -> Path:
        """Write an executable root-owned script into :attr:`scripts_dir`; returns its path."""
        path = self.prepare() / "scripts" / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def write_env_dump_script(self, kind: str) -> Path:
        """A Prolog/Epilog that writes its environment to ``dumps/KIND.NODE.JOBID.env``.

        ``KIND`` is a free label (``prolog``, ``epilog``, ...). Uses absolute paths only:
        Slurm gives Prolog and Epilog no PATH. Read the files with :meth:`env_dumps`.
        """
        dumps = self.prepare() / "dumps"
        node = "${SLURMD_NODENAME:-ctld}"
        return self.write_script(
            f"{kind}.sh",
            "#!/bin/sh\n"
            f'out="{dumps}/{kind}.{node}.$SLURM_JOB_ID.env"\n'
            '/usr/bin/env -0 > "$out.tmp" && /bin/mv "$out.tmp" "$out"\n'
            "exit 0\n",
        )

    def env_dumps(self, kind: str, job_id: str) -> dict[str, dict[str, str]]:
        """Node name -> environment written by :meth:`write_env_dump_script` for a job."""
        out = {}
        for path in sorted(self.dumps_dir.glob(f"{kind}.*.{job_id}.env")):
            node = path.name[len(kind) + 1 : -len(f".{job_id}.env")]
            entries = path.read_bytes().decode().split("\0")
            out[node] = dict(e.split("=", 1) for e in entries if "=" in e)
        return out

    # ------------------------------------------------------------------ diagnostics

    def logs(self, tail_lines: int = 60) -> str:
        """The last lines of every daemon log, for a test failure's output."""
        if self.base_dir is None or not self.log_dir.is_dir():
            return "(no logs)"
        chunks = []
        for path in sorted(self.log_dir.iterdir()):
            # A daemon's stdout repeats its log file; it matters only when that is missing
            # (a daemon that died before opening it).
            log_file = "slurmctld.log" if path.stem == "slurmctld" else f"slurmd-{path.stem}.log"
            if path.suffix == ".stdout" and (self.log_dir / log_file).is_file():
                continue
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if lines:
                chunks.append(f"----- {path.name} (last {tail_lines} lines)")
                chunks.extend(lines[-tail_lines:])
        return "\n".join(chunks) or "(logs empty)"


class ClusterFactory:
    """Starts clusters that can run beside each other, and stops them all in :meth:`close`.

    Each cluster gets its own name, node names and ports (cgroups are per node name, ports
    per machine): cluster ``k`` is named ``llemf{k}``, its nodes ``f{k}n1 ..``, and its
    slurmctld listens on ``17000 + 100 * k``. Use ``cluster.nodes``, never literal names.
    """

    _counter = 0

    def __init__(self) -> None:
        self.clusters: list[SlurmCluster] = []

    def __call__(self, start: bool = True, **kwargs) -> SlurmCluster:
        """A new cluster; ``kwargs`` as for :class:`SlurmCluster`.

        Args:
            start: start it now; pass False to :meth:`SlurmCluster.prepare` it, write
                scripts into it, then call :meth:`SlurmCluster.start` yourself.
        """
        ClusterFactory._counter += 1
        k = ClusterFactory._counter
        kwargs.setdefault("name", f"llemf{k}")
        kwargs.setdefault("node_prefix", f"f{k}n")
        kwargs.setdefault("port_base", 17000 + 100 * k)
        cluster = SlurmCluster(**kwargs)
        self.clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    def close(self) -> None:
        """Stop every cluster this factory made."""
        while self.clusters:
            self.clusters.pop().stop()
