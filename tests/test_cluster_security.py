"""Hostile local users against the aggregator, the ledger and the config (issue 20).

Each test replays an attack that worked before its fix: a forged ledger swapped in by a
group member (item 9), a reader stalling ``llem aggregate`` (item 6), a config file another
user may write loaded by root, secrets that had to be world-readable (item 10).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llem import slices
from llem.cluster.aggregate import aggregate_once
from llem.cluster.ledger import Ledger
from llem.errors import LedgerError, StoreError
from llem.fsutil import write_atomic
from llem.slices import encode, file_name
from tests.helpers.nodes import T0, S, job_slices, node_config

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def shared_tmp(request) -> Path:
    """A temporary folder other users can traverse (pytest's own is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="llem-sec-"))
    os.chmod(path, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def as_nobody(code: str, cwd: Path | str = "/") -> subprocess.CompletedProcess:
    """Run Python ``code`` as uid/gid 65534 with the system interpreter (stdlib only)."""
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-c", code],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )


def spool_one_job(config, tmp: Path, job_id: str = "100", node: str = "n1") -> str:
    spool = Path(config.spool_dir)
    spool.mkdir(mode=0o700, exist_ok=True)
    data = job_slices(tmp / f"src-{job_id}", job_id, nodes=(node,))[0]
    write_atomic(spool, file_name(data), encode(data))
    return file_name(data)


# -- item 9: the ledger's directory and files ------------------------------------------------


def test_a_group_writable_ledger_directory_is_refused(tmp_path):
    config = node_config(tmp_path)
    ledger_dir = Path(config.ledger).parent
    ledger_dir.mkdir(mode=0o755)
    os.chmod(ledger_dir, 0o775)
    spool_one_job(config, tmp_path)
    with pytest.raises(LedgerError, match="writable by group or others.*chmod go-w"):
        aggregate_once(config)
    with pytest.raises(LedgerError, match="writable by group or others"):
        Ledger(config.ledger)
    assert not Path(config.ledger).exists()  # refused before anything was written
    os.chmod(ledger_dir, 0o755)
    assert aggregate_once(config).merged == 1


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_ledger_file_writable_by_group_or_others_is_refused(tmp_path, suffix):
    path = tmp_path / "ledger" / "ledger.db"
    Ledger(path).close()
    target = Path(f"{path}{suffix}")
    target.touch()
    os.chmod(target, 0o664)
    with pytest.raises(LedgerError, match=f"{target}: is writable by group or others"):
        Ledger(path)
    os.chmod(target, 0o644)
    Ledger(path).close()


@root_only
def test_a_forged_ledger_swapped_in_by_a_group_member_is_refused(shared_tmp):
    """The attack: the ledger's directory is group-writable (root:65534, 0775); a member of
    that group builds a ledger of their own and renames it over the real one. Before the
    fix, root's aggregator went on merging into the forged file. (privacy: none, a 0644
    ledger, so that the attacker can copy it into a plausible forgery.)"""
    config = replace(node_config(shared_tmp), privacy="none")
    ledger = Path(config.ledger)
    ledger.parent.mkdir(mode=0o755)
    spool_one_job(config, shared_tmp, "100")
    assert aggregate_once(config).merged == 1
    os.chown(ledger.parent, 0, NOBODY)
    os.chmod(ledger.parent, 0o775)
    forge = (
        "import os, sqlite3\n"
        f"src = sqlite3.connect({str(ledger)!r}); dst = sqlite3.connect('forged.db')\n"
        'src.backup(dst); dst.execute("UPDATE job_runs SET energy_uj = 1"); dst.commit()\n'
        "dst.execute('PRAGMA journal_mode = DELETE'); dst.close()\n"
        f"os.rename('forged.db', {str(ledger)!r})\n"
    )
    proc = as_nobody(forge, cwd=ledger.parent)
    assert proc.returncode == 0, proc.stderr
    assert ledger.stat().st_uid == NOBODY  # the swap worked
    waiting = spool_one_job(config, shared_tmp, "200")
    with pytest.raises(LedgerError, match="ledger's directory is writable by group"):
        aggregate_once(config)
    # The admin closes the directory; the forged file is still there, and still refused.
    os.chmod(ledger.parent, 0o755)
    with pytest.raises(LedgerError, match=f"{ledger}: is owned by uid {NOBODY}"):
        aggregate_once(config)
    assert waiting in os.listdir(config.spool_dir)  # nothing left the spool


@root_only
@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_wal_or_shm_owned_by_another_user_is_refused(tmp_path, suffix):
    path = tmp_path / "ledger" / "ledger.db"
    Ledger(path).close()
    planted = Path(f"{path}{suffix}")
    planted.unlink(missing_ok=True)
    planted.write_bytes(b"")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(LedgerError, match=f"is owned by uid {NOBODY}"):
        Ledger(path)


def test_a_node_store_owned_by_another_user_is_refused_too(tmp_path):
    """The check lives in llem.sqlite, so the node store (root-only) gets it as well."""
    from llem.node.store import NodeStore

    path = tmp_path / "state" / "node.db"
    NodeStore(path).close()
    os.chmod(path, 0o666)
    with pytest.raises(StoreError, match="writable by group or others"):
        NodeStore(path)


# -- item 6: readers cannot stall the aggregator ---------------------------------------------


READER = """
import sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True, isolation_level=None,
                     timeout=0)
count = "SELECT COUNT(*) FROM job_runs"
db.execute("BEGIN")
print(db.execute(count).fetchone()[0], flush=True)  # a read transaction, held open
sys.stdin.readline()
print(db.execute(count).fetchone()[0], flush=True)  # the same snapshot
db.execute("COMMIT")
print(db.execute(count).fetchone()[0], flush=True)  # the merges since
"""


class HeldReader:
    """A second process holding ``BEGIN; SELECT ...`` open on the ledger: as uid 65534 (a
    user who may not write the ledger's directory) when root, else as this user."""

    def __init__(self, ledger: Path) -> None:
        exe, user = ("/usr/bin/python3", NOBODY) if os.geteuid() == 0 else (os.sys.executable, None)
        self.proc = subprocess.Popen(
            [exe, "-I", "-c", READER, str(ledger)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            user=user,
            group=user,
        )
        self.first = self._line()

    def _line(self) -> int:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the reader failed: {self.proc.stderr.read()}")
        return int(line)

    def finish(self) -> tuple[int, int]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        out = self._line(), self._line()
        assert self.proc.wait(timeout=30) == 0
        return out


def _timed_pass(config, **kwargs):
    t0 = time.monotonic()
    result = aggregate_once(config, **kwargs)
    return result, time.monotonic() - t0


@pytest.mark.parametrize("opened", ["between passes", "during a pass"])
def test_a_reader_holding_a_transaction_cannot_stall_aggregate(shared_tmp, opened):
    """The attack: a user holds ``BEGIN; SELECT`` open on the ledger. Before the fix the
    ledger was left in rollback-journal mode between passes, and the next pass waited for
    the reader's lock until "database is locked" (30 s), on every pass."""
    # privacy: none: users read the ledger file themselves (0644), as before the gateway
    config = replace(node_config(shared_tmp), privacy="none")
    ledger = Path(config.ledger)
    ledger.parent.mkdir(mode=0o755)
    spool_one_job(config, shared_tmp, "100")
    readers = []
    if opened == "during a pass":
        spool_one_job(config, shared_tmp, "101", node="n2")
        aggregate_once(
            config,
            batch_size=1,
            after_commit=lambda n: n == 0 and readers.append(HeldReader(ledger)),
        )
        expected_first = 1
    else:
        aggregate_once(config)
        readers.append(HeldReader(ledger))
        expected_first = 1
    reader = readers[0]
    assert reader.first == expected_first
    for job_id in ("200", "300"):  # two passes while the reader holds its snapshot
        spool_one_job(config, shared_tmp, job_id)
        result, elapsed_s = _timed_pass(config)
        assert result.merged == 1 and elapsed_s < 5, (result, elapsed_s)
    total = 4 if opened == "during a pass" else 3
    assert reader.finish() == (expected_first, total)
    # No writer, no reader: a user can still open the ledger, which is still in WAL mode.
    fresh = HeldReader(ledger)
    assert fresh.finish() == (total, total)
    with Ledger(ledger, readonly=True) as view:
        assert view.query("PRAGMA journal_mode") == [("wal",)]


def test_a_ledger_left_in_rollback_mode_by_an_older_llem_says_why_it_waits(tmp_path):
    """The one case a writer can still wait: the first switch to WAL of an old ledger."""
    path = tmp_path / "ledger" / "ledger.db"
    Ledger(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = DELETE")
    db.execute("BEGIN")
    db.execute("SELECT COUNT(*) FROM meta").fetchall()
    from llem.cluster import ledger as ledger_module

    spec = ledger_module.DATABASE
    quick = type(spec)(
        **{**spec.__dict__, "busy_timeout_s": 0.1, "pragmas": ("PRAGMA foreign_keys = ON",)}
    )
    from llem.sqlite import open_database

    with pytest.raises(LedgerError, match="rollback-journal mode"):
        open_database(path, quick, readonly=False)
    db.execute("COMMIT")
    db.close()
    with Ledger(path) as ledger:
        assert ledger.query("PRAGMA journal_mode") == [("wal",)]


# -- item 10: identifiers, one rule everywhere -----------------------------------------------


@pytest.mark.parametrize(
    "name, ok",
    [
        ("n1.example", True),
        ("gpu-01_a", True),
        ("n1", True),
        ("N9.rack-2.site", True),
        (".hidden", False),
        ("..", False),
        ("n1/../x", False),
        ("n 1", False),
        ("n1\n", False),
        ("", False),
        ("-n1", False),
        ("n" * 129, False),
        ("nöd", False),
        ("n1;rm", False),
    ],
)
def test_one_identifier_rule_at_every_edge(tmp_path, name, ok):
    """node.slurm.node_name, NodePaths and slice validation apply the same rule."""
    from llem.node.slurm import node_name
    from llem.paths import NodePaths

    config = node_config(tmp_path)
    data = copy.deepcopy(_one_job(tmp_path))
    data["node"] = name
    edges = [
        lambda: NodePaths.of(config, name),
        lambda: slices.validate(data),
        lambda: slices.check_identifier("cluster", name),
    ]
    if name:  # no SLURMD_NODENAME at all: the host name, outside Slurm
        edges.append(lambda: node_name({"SLURMD_NODENAME": name}))
    for edge in edges:
        if ok:
            edge()
        else:
            with pytest.raises(ValueError, match="characters outside|non-empty"):
                edge()


@functools.lru_cache(maxsize=1)
def _job_template() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="llem-sec-job-"))
    try:
        return job_slices(tmp, "100", nodes=("n1",))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one_job(_tmp_path) -> dict:
    return _job_template()


def test_a_job_on_a_node_with_a_dot_is_exported_and_merged(tmp_path):
    """Before, ``n1.example`` was measured but every export of it was refused (the slice
    file name's parts are separated by dots). Production path: a real node store on node
    n1.example, export_job, the outbox's delivery to the spool, one aggregate pass."""
    from llem.node.export import export_job
    from llem.node.outbox import deliver
    from llem.node.slurm import node_name
    from tests.helpers.nodes import build_store

    node = node_name({"SLURMD_NODENAME": "n1.example"})
    config = node_config(tmp_path, node=node)
    Path(config.spool_dir).mkdir(mode=0o700)
    store, run_id = build_store(
        tmp_path / "store" / "node.db", node=node, job_id="4242", nodelist="n1.example"
    )
    data = export_job(store, run_id, config, now_ns=T0 + 10 * 3600 * S)
    store.close()
    deliver(config, data)
    names = os.listdir(config.spool_dir)
    assert names == [f"job.c1.n1%2Eexample.4242-{T0 + 1800 * S}.{data['created_ns']}.json"]
    assert slices.parse_file_name(names[0])["node"] == "n1.example"
    result = aggregate_once(config)
    assert (result.merged, result.quarantined) == (1, [])
    with Ledger(config.ledger, readonly=True) as ledger:
        runs = ledger.job_runs("4242")
        assert [(r["status"], r["nodes_reported"]) for r in runs] == [("complete", 1)]
        assert ledger.job_energy_by_node("c1", "4242").keys() == {"n1.example"}


def test_a_file_name_that_lies_about_a_dotted_node_is_refused(tmp_path):
    data = copy.deepcopy(_one_job(tmp_path))
    data["node"] = "n1.example"
    with pytest.raises(slices.SliceError, match="does not match"):
        slices.check_name_matches(slices.file_name(data).replace("n1%2Eexample", "n2"), data)
    slices.check_name_matches(slices.file_name(data), data)


# -- item 10: the config file and its secrets ------------------------------------------------


def _write_config(path: Path, text: str, owner: int = 0, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chown(path, owner, owner) if os.geteuid() == 0 else None
    os.chmod(path, mode)
    return path


@root_only
@pytest.mark.parametrize(
    "owner, mode, refused",
    [
        (NOBODY, 0o666, "owned by uid 65534, not root"),  # the attack: root loaded this file
        (NOBODY, 0o644, "owned by uid 65534, not root"),
        (0, 0o664, "writable by group or others"),
        (0, 0o646, "writable by group or others"),
        (0, 0o644, None),
        (0, 0o600, None),
    ],
)
def test_root_refuses_a_config_file_another_user_could_write(tmp_path, owner, mode, refused):
    from llem import config
    from llem.errors import ConfigError

    path = _write_config(tmp_path / "llem.yaml", f"spool_dir: {tmp_path}/spool\n", owner, mode)
    if refused is None:
        assert config.load(path, env={}).spool_dir == f"{tmp_path}/spool"
        return
    with pytest.raises(ConfigError, match=f"{path}: the config file is {refused}.*runs as root"):
        config.load(path, env={})
    with pytest.raises(ConfigError, match=refused):
        config.load(env={"LLEM_CONFIG": str(path)})


def test_a_cluster_name_follows_the_identifier_rule(tmp_path):
    from llem import config
    from llem.errors import ConfigError

    path = _write_config(tmp_path / "llem.yaml", "cluster: ../etc\n")
    with pytest.raises(ConfigError, match="'cluster' '../etc' has characters outside"):
        config.load(path, env={})
    assert (
        config.load(_write_config(path, "cluster: hpc.example\n"), env={}).cluster == "hpc.example"
    )


@root_only
def test_the_provider_token_lives_in_a_root_only_file_and_users_still_run(shared_tmp):
    """Before, the token had to sit in the world-readable config, since llem-acct refused
    an unreadable config. Now: carbon.provider_token_file, mode 0600; root reads the token
    when it asks the provider; a user loads the same config, is told the token is for
    admins only, and gets the annual table."""
    from llem import config
    from llem.errors import ConfigError
    from tests.helpers.nobody import python_for_nobody as _python_for_nobody

    token = _write_config(shared_tmp / "provider-token", "secret-token\n", 0, 0o600)
    path = _write_config(
        shared_tmp / "llem.yaml",
        f"carbon:\n  region: DE\n  provider: electricitymaps\n  provider_token_file: {token}\n",
    )
    assert config.load(path, env={}).carbon.token() == "secret-token"

    python = _python_for_nobody(shared_tmp)
    if python is None:
        pytest.skip("no Python that uid 65534 can run llem with")
    import llem.share

    share = shared_tmp / "src" / "llem" / "share"  # the intensity tables, for that copy
    if not share.exists():
        shutil.copytree(
            Path(llem.share.__file__).parent, share, ignore=shutil.ignore_patterns("__pycache__")
        )
        for p in [share, *share.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    code = (
        "from llem import config\n"
        "from llem.carbon.intensity import resolve\n"
        f"cfg = config.load({str(path)!r}, env={{}})\n"
        "try:\n    cfg.carbon.token()\nexcept config.SecretUnavailable as e:\n    print(e)\n"
        "def get(*a, **k):\n    raise AssertionError('no request without the token')\n"
        "model = resolve(cfg, hours=[1700000000 // 3600 * 3600], provider_get=get)\n"
        "print(model.notes[-1])\n"
    )
    proc = subprocess.run(
        [python[0], "-c", code],
        user=NOBODY,
        group=NOBODY,
        env=python[1],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"carbon.provider_token_file {token} is readable by root and admins only"
    assert "the online provider is not used, the annual table is" in lines[1]

    os.chmod(token, 0o644)  # a secret every user can read is refused, not used
    with pytest.raises(ConfigError, match="readable or writable by others"):
        config.load(path, env={}).carbon.token()


@root_only
def test_a_user_locking_the_ledger_files_directly_is_named(shared_tmp):
    """The limit that remains while users read the ledger file themselves: a POSIX read lock
    taken with fcntl on the -shm's write-lock byte (no SQLite involved) makes writes fail.
    The pass fails (the slice stays in the spool, nothing is lost) and names the culprit."""
    # privacy: none: users read the ledger file themselves (0644), as before the gateway
    config = replace(node_config(shared_tmp), privacy="none")
    ledger = Path(config.ledger)
    ledger.parent.mkdir(mode=0o755)
    spool_one_job(config, shared_tmp, "100")
    aggregate_once(config)
    locker = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1] + '-shm', os.O_RDONLY)\n"
            "fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 120)\n"
            "print('locked', flush=True); time.sleep(120)\n",
            str(ledger),
        ],
        stdout=subprocess.PIPE,
        text=True,
        user=NOBODY,
        group=NOBODY,
        cwd="/",
    )
    try:
        assert locker.stdout.readline() == "locked\n"
        waiting = spool_one_job(config, shared_tmp, "200")
        with pytest.raises(LedgerError, match=rf"held by pid {locker.pid} \(uid {NOBODY}\)"):
            aggregate_once(config)
        assert HeldReader(ledger).finish() == (1, 1)  # users still read it meanwhile
    finally:
        locker.kill()
        locker.wait()
    assert waiting in os.listdir(config.spool_dir)
    assert aggregate_once(config).merged == 1
