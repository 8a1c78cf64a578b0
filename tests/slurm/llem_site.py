"""A node "site" for llem under the test harness: config, fake RAPL and NVML hardware that
advance at known powers, Prolog/Epilog wrappers around the real slurm/*.sh, and a copy of
llem that the unprivileged job users can import with the system Python."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.fakenvml import lib as fakenvml
from tests.helpers.memory import memory_tempdir
from tests.powercap import FakePowercap

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"

PACKAGE_W = 40.0
DRAM_W = 4.0
GPU_W = (100.0, 300.0)  # minor 0, minor 1
# Real bash 4.x binaries to run the hooks under as well (colon-separated paths), see
# tests/test_slurm_scripts.py. Not an LLEM_* name: llem refuses unknown LLEM_* variables,
# and the llem processes of the tests inherit the environment.
OLD_BASHES = [b for b in os.environ.get("TEST_OLD_BASH", "").split(":") if b]


class Hardware:
    """Counters advanced by a thread at fixed powers: RAPL (uJ, wraps) and NVML (mJ).

    The fake NVML library is built under ``base``; the files the thread rewrites (the powercap
    tree, NVML's state) live under ``live``, a directory in memory (tests.helpers.memory).
    """

    def __init__(self, base: Path, live: Path, gpu_w: tuple[float, ...] = GPU_W) -> None:
        self.gpu_w = gpu_w
        self.powercap = FakePowercap(live / "powercap")
        self.powercap.add_zone("0", "package-0", 0, max_range_uj=2**32)
        self.powercap.add_zone("0:0", "dram", 0, max_range_uj=2**32)
        self.nvml_dir = fakenvml.build(base / "nvml")
        self.nvml_state = live / "nvml.state"
        self.gpus = [
            fakenvml.FakeGpu(uuid=f"GPU-llemtest-{i}", minor=i, power_mw=int(w * 1000))
            for i, w in enumerate(gpu_w)
        ]
        self._energy_mj = [0.0 for _ in self.gpus]
        self.max_gap_s = 0.0
        fakenvml.write_state(self.nvml_state, self.gpus)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            dt = now - last
            last = now
            # The longest time the counters stood still (0.05 s when all is well): a test whose
            # energy is off names it, so that a stalled fake is not taken for llem's error.
            self.max_gap_s = max(self.max_gap_s, dt)
            self.powercap.advance("intel-rapl:0", int(PACKAGE_W * dt * 1e6))
            self.powercap.advance("intel-rapl:0:0", int(DRAM_W * dt * 1e6))
            for i, gpu in enumerate(self.gpus):
                self._energy_mj[i] += self.gpu_w[i] * dt * 1000
                gpu.energy_mj = int(self._energy_mj[i])
            fakenvml.write_state(self.nvml_state, self.gpus)


def _copy_module(name: str, dest: Path) -> None:
    module = __import__(name)
    path = Path(module.__file__)
    if path.name == "__init__.py":
        shutil.copytree(
            path.parent,
            dest / path.parent.name,
            ignore=shutil.ignore_patterns("__pycache__"),
            dirs_exist_ok=True,
        )
    else:
        shutil.copy2(path, dest / path.name)


class Site:
    def __init__(self, gpu_w: tuple[float, ...] = GPU_W) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="llem-site-"))
        os.chmod(self.base, 0o755)
        # The live counters in memory, beside base: see tests.helpers.memory.
        self.live = memory_tempdir("llem-site-live-", fallback=self.base)
        self.hw = Hardware(self.base / "hw", self.live / "hw", gpu_w)
        self.config = self.base / "llem.yaml"
        self.defaults = self.base / "default-llem"
        self.userlib = self.base / "userlib"
        self.out = self.base / "out"
        self.state_dir = self.base / "state"
        self.run_dir = self.base / "run"
        self.spool_dir = self.base / "spool"
        self.write_config()
        self.llem_bin = self._llem_bin()
        self.write_defaults()
        self._user_copy()
        self.out.mkdir()
        os.chmod(self.out, 0o1777)
        for p in [self.base, *self.base.rglob("*"), self.live, *self.live.rglob("*")]:
            if p.is_dir() and not p.is_symlink() and p != self.out:
                p.chmod(p.stat().st_mode | 0o755)
            elif p.is_file():
                p.chmod(p.stat().st_mode | 0o444)

    def write_config(self, text: str | None = None) -> None:
        self.config.write_text(
            text
            if text is not None
            else (
                f"cluster: llemtest\nstate_dir: {self.state_dir}\nrun_dir: {self.run_dir}\n"
                f"spool_dir: {self.spool_dir}\nledger: {self.state_dir / 'ledger.db'}\n"
                "sampler:\n  interval_s: 0.5\n  linger_s: 0\ncarbon:\n  region: FR\n"
            )
        )
        self.config.chmod(0o644)

    def write_defaults(self, **override: str) -> None:
        values = {
            "LLEM_BIN": str(self.llem_bin),
            "LLEM_CONFIG": str(self.config),
            "LLEM_RUN_DIR": str(self.run_dir),
            "LLEM_POWERCAP_ROOT": str(self.hw.powercap.path),
            "LLEM_TIMEOUT": "20",
        }
        values.update(override)
        self.defaults.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def _llem_bin(self) -> Path:
        beside = Path(sys.executable).with_name("llem")
        if beside.exists():
            return beside
        script = self.base / "llem-bin"
        script.write_text(f'#!/bin/sh\nexec {sys.executable} -m llem.cli.main "$@"\n')
        script.chmod(0o755)
        return script

    def _user_copy(self) -> None:
        """llem and its pure-Python needs, importable by any user with the system Python."""
        self.userlib.mkdir()
        shutil.copytree(
            REPO / "src" / "llem",
            self.userlib / "llem",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        shutil.copytree(
            REPO / "share",
            self.userlib / "llem" / "share",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for name in ("click", "yaml", "pynvml"):
            _copy_module(name, self.userlib)
        try:
            _copy_module("_yaml", self.userlib)
        except ImportError:
            pass

    def install_hooks(self, cluster, kinds=("prolog", "epilog", "epilog-slurmctld")) -> None:
        """Make ``cluster`` run this site's hooks (before ``cluster.start()``)."""
        for kind in kinds:
            setattr(cluster, kind.replace("-", "_"), self.hook(kind))

    def started_cluster(self, factory, **kwargs):
        """A cluster from ``factory`` (``slurm_module_cluster_factory``) that runs this
        site's hooks, started."""
        cluster = factory(**kwargs, start=False)
        self.install_hooks(cluster)
        cluster.start()
        return cluster

    def hook(self, kind: str, bash: str = "/bin/bash", no_epochrealtime: bool = False) -> Path:
        """A wrapper that gives the real slurm/<kind>.sh this site's settings.

        ``bash`` runs the script; ``no_epochrealtime`` unsets $EPOCHREALTIME before the
        script's first line (through BASH_ENV), as on bash 4. Calling it again rewrites the
        wrapper in place (atomically): slurmd reads it at every job.
        """
        path = self.base / f"{kind}-wrapper.sh"
        bash_env = ""
        if no_epochrealtime:
            env_file = self.base / "no-epochrealtime.sh"
            env_file.write_text("unset EPOCHREALTIME\n")
            env_file.chmod(0o644)
            bash_env = f"export BASH_ENV={env_file}\n"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            "#!/bin/bash\n"
            f"export LLEM_DEFAULTS_FILE={self.defaults}\n"
            f"export LD_LIBRARY_PATH={self.hw.nvml_dir}\n"
            f"export FAKE_NVML_STATE={self.hw.nvml_state}\n"
            f"{bash_env}"
            f"exec {bash} {REPO / 'slurm' / (kind + '.sh')}\n"
        )
        tmp.chmod(0o755)
        os.replace(tmp, path)
        return path

    @property
    def user_env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": str(self.userlib),
            "LLEM_CONFIG": str(self.config),
            "LLEM_POWERCAP_ROOT": str(self.hw.powercap.path),
        }

    def wrap_cmd(self) -> str:
        return f"{SYSTEM_PYTHON} -m llem.cli.main wrap"

    def store(self, node: str) -> sqlite3.Connection:
        return sqlite3.connect(
            f"file:{self.state_dir / f'node-{node}.db'}?mode=ro", uri=True, timeout=10
        )

    def sampler_pid(self, node: str) -> int | None:
        try:
            return int((self.run_dir / node / "sampler.pid").read_text())
        except (OSError, ValueError):
            return None

    def wait_sealed(self, node: str, job_id: str, timeout: float = 30) -> tuple:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                db = self.store(node)
                row = db.execute(
                    "SELECT run_id, state, coverage, flags, gpus, start_ns, end_ns "
                    "FROM jobs WHERE job_id = ? ORDER BY run_id DESC",
                    (job_id,),
                ).fetchone()
                db.close()
                if row and row[1] in ("sealed", "exported"):
                    return row
            except sqlite3.Error:
                pass
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} not sealed on {node} within {timeout} s\n" + self.diagnose(node, job_id)
        )

    def diagnose(self, node: str, job_id: str) -> str:
        """What the node's sampler and store say about a job, for a failed test's message."""
        lines = []
        pid = self.sampler_pid(node)
        alive = pid is not None and Path(f"/proc/{pid}").exists()
        lines.append(f"sampler pid {pid} ({'running' if alive else 'not running'})")
        if alive:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                lines.append(
                    f"sampler state {stat[0]}, utime+stime {int(stat[11]) + int(stat[12])}"
                )
            except (OSError, IndexError, ValueError):
                pass
        try:
            db = self.store(node)
            try:
                lines.append(
                    "job rows: "
                    + repr(
                        db.execute(
                            "SELECT run_id, state, start_ns, end_ns FROM jobs WHERE job_id = ?",
                            (job_id,),
                        ).fetchall()
                    )
                )
                lines.append(
                    "last interval: "
                    + repr(db.execute("SELECT max(id), max(end_ns) FROM intervals").fetchone())
                    + f" (now {time.time_ns()})"
                )
            finally:
                db.close()
        except sqlite3.Error as e:
            lines.append(f"store: {e}")
        jobs_dir = self.run_dir / node / "jobs"
        try:
            lines.append(f"job requests: {sorted(p.name for p in jobs_dir.iterdir())}")
        except OSError as e:
            lines.append(f"job requests: {e}")
        try:
            log = (self.run_dir / node / "sampler.log").read_text(errors="replace")
            lines.append("sampler.log (last 30 lines):\n" + "\n".join(log.splitlines()[-30:]))
        except OSError as e:
            lines.append(f"sampler.log: {e}")
        return "\n".join(lines)

    def cleanup(self) -> None:
        self.hw.stop()
        for node_dir in self.run_dir.glob("*"):
            pid = self.sampler_pid(node_dir.name)
            if pid:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        if os.environ.get("LLEM_KEEP_SITE"):
            print(f"llem site kept at {self.base} (live counters at {self.live})")
            return
        shutil.rmtree(self.live, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def burn(seconds: float) -> str:
    """A one-line shell command that keeps one CPU busy for ``seconds``."""
    return (
        f"{SYSTEM_PYTHON} -c 'import time; t = time.time() + {seconds}; "
        "any(iter(lambda: time.time() > t, True))'"
    )


def is_executable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXOTH)
