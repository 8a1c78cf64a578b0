"""Export: job and node slices from a real node store, outbox and bounded spool delivery.

The node stores come from ``tests.helpers.nodes``.
"""

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from llem import slices
from llem.cluster.header import header_slice_from_env, write_header
from llem.errors import LedgerError
from llem.model import EnergyRow, Interval, JobRecord
from llem.node import export
from llem.node.export import export_and_deliver, export_job, export_node, prune_node_store
from llem.node.outbox import deliver, flush_outbox, pending_slices
from llem.node.store import NodeStore
from llem.paths import outbox_dir
from llem.slices import encode
from tests.helpers.nobody import python_for_nobody
from tests.helpers.nodes import (
    ENV,
    T0,
    S,
    add_intervals,
    build_store,
    job_slices,
    node_config,
)

# -- job slices ------------------------------------------------------------------------------


def test_job_slice_energy_per_device_and_clock_hour(tmp_path):
    store, run_id = build_store(tmp_path / "s" / "node.db")
    data = export_job(store, run_id, node_config(tmp_path), now_ns=T0 + 5 * 3600 * S)
    assert data["schema"] == slices.SCHEMA and data["kind"] == "job"
    assert (data["cluster"], data["node"], data["job"]["job_id"], data["job"]["start_ns"]) == (
        "c1",
        "n1",
        "100",
        T0 + 1800 * S,
    )
    by = {(r["device"], r["hour_s"]): r for r in data["energy"]}
    h0, h1 = T0 // S, T0 // S + 3600
    # 21:30-22:00 and 22:00-22:30: half the hour's energy in each clock hour.
    assert by[("nvml:GPU-a", h0)]["energy_uj"] == 250_000_000 * 1800
    assert by[("nvml:GPU-a", h1)]["energy_uj"] == 250_000_000 * 1800
    assert by[("nvml:GPU-a", h0)]["method"] == "gpu_allocation"
    assert by[("rapl:package-0", h0)]["energy_uj"] == 60_000_000 * 1800
    assert data["devices"]["nvml:GPU-a"] == {
        "component": "gpu",
        "name": "gpu0",
        "sensor": "nvml",
        "source": "measured",
        "method": "counter",
    }
    assert data["windows"] == [
        {
            "name": "epoch 1",
            "step_id": "0",
            "start_ns": T0 + 1860 * S,
            "end_ns": T0 + 2400 * S,
            "status": "closed",
            "energy": {"nvml:GPU-a": 135_000_000},
        }
    ]
    assert data["job"]["name"] == "train; rm -rf /" and data["job"]["coverage"] == 1.0


def test_node_totals_reconcile_measured_attributed_remainder(tmp_path):
    store, run_id = build_store(tmp_path / "s" / "node.db")
    data = export_job(store, run_id, node_config(tmp_path))
    for key, t in data["node_totals"].items():
        assert t["attributed_uj"] + t["remainder_uj"] == t["measured_uj"], key
    assert data["node_totals"]["rapl:package-0"]["measured_uj"] == 100_000_000 * 3600
    job_sum = sum(r["energy_uj"] for r in data["energy"] if r["device"] == "rapl:package-0")
    assert job_sum == data["node_totals"]["rapl:package-0"]["attributed_uj"]


def test_file_name_has_no_user_controlled_characters(tmp_path):
    store, run_id = build_store(tmp_path / "s" / "node.db", name="../../etc/x y", user="bob")
    data = export_job(store, run_id, node_config(tmp_path))
    name = slices.file_name(data)
    assert name == f"job.c1.n1.100-{T0 + 1800 * S}.{data['created_ns']}.json"
    assert "/" not in name and "bob" not in name and "x y" not in name


def test_run_without_end_is_exported_with_a_flag(tmp_path):
    store, run_id = build_store(tmp_path / "s" / "node.db", end=False)
    data = export_job(store, run_id, node_config(tmp_path))
    assert data["job"]["end_ns"] == T0 + 5400 * S
    assert "end_estimated" in data["job"]["flags"]


def test_unknown_run_is_an_error(tmp_path):
    store, _ = build_store(tmp_path / "s" / "node.db")
    with pytest.raises(LedgerError, match="no job run 99"):
        export_job(store, 99, node_config(tmp_path))


# -- node slices -----------------------------------------------------------------------------


def test_node_slice_hourly_totals_with_gaps(tmp_path):
    store, _ = build_store(tmp_path / "s" / "node.db")
    store.write(
        Interval(
            "s",
            T0 + 5400 * S,
            T0 + 5460 * S,
            100,
            101,
            (EnergyRow("rapl:package-0", 0, "reset", "ok", None),),
        )
    )
    data = export_node(store, node_config(tmp_path), "n1", since_ns=T0, now_ns=T0 + 7200 * S)
    rows = {(r["hour_s"], r["device"]): r for r in data["hours"]}
    h0, h1 = T0 // S, T0 // S + 3600
    assert rows[(h0, "rapl:package-0")]["measured_uj"] == 100_000_000 * 1800
    assert rows[(h0, "rapl:package-0")]["intervals"] == 30
    r1 = rows[(h1, "rapl:package-0")]
    assert (r1["intervals"], r1["gap_intervals"]) == (31, 1)
    assert r1["covered_ns"] == 1800 * S
    for r in data["hours"]:
        assert r["attributed_uj"] + r["remainder_uj"] == r["measured_uj"]
    assert data["as_of_ns"] == T0 + 5460 * S


def test_node_export_since_last_moves_its_mark(tmp_path):
    cfg = node_config(tmp_path)
    store, _ = build_store(tmp_path / "state" / "n1" / "node.db")
    first = export.export_node_since_last(store, cfg, "n1", now_ns=T0 + 4000 * S)
    assert first is not None
    sent = sorted(p.name for p in Path(cfg.spool_dir).iterdir())
    assert len(sent) == 1 and sent[0].startswith("node.c1.n1.")
    add_intervals(store, 1, T0 + 5400 * S, 600, 60, first_id=1000)
    export.export_node_since_last(store, cfg, "n1", now_ns=T0 + 6100 * S)
    second = json.loads(sorted(Path(cfg.spool_dir).glob("node.*"))[-1].read_bytes())
    # The second export starts at the hour where the first stopped (partial), not before.
    assert second["from_hour_s"] == T0 // S + 3600


# -- delivery --------------------------------------------------------------------------------


def test_deliver_puts_the_slice_in_the_spool_atomically(tmp_path):
    cfg = node_config(tmp_path)
    store, run_id = build_store(tmp_path / "state" / "n1" / "node.db")
    path = export_and_deliver(store, run_id, cfg)
    spool = Path(cfg.spool_dir)
    files = os.listdir(spool)
    assert files == [path.name]
    assert json.loads((spool / path.name).read_bytes())["job"]["job_id"] == "100"
    assert pending_slices(cfg) == []
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(outbox_dir(cfg)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool / path.name).st_mode) == 0o640
    assert store.run(run_id).state == "exported"


def test_spool_writable_by_others_is_refused_and_the_slice_waits(tmp_path):
    cfg = node_config(tmp_path)
    spool = Path(cfg.spool_dir)
    spool.mkdir()
    os.chmod(spool, 0o777)
    deliver(cfg, job_slices(tmp_path, nodes=("n1",))[0])
    assert os.listdir(spool) == []
    assert len(pending_slices(cfg)) == 1
    result = flush_outbox(cfg)
    assert "writable by others" in result.error and result.pending == 1
    os.chmod(spool, 0o750)
    assert flush_outbox(cfg).pending == 0
    assert len(os.listdir(spool)) == 1


def test_symlinked_spool_is_refused(tmp_path):
    cfg = node_config(tmp_path)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", cfg.spool_dir)
    deliver(cfg, job_slices(tmp_path, nodes=("n1",))[0])
    assert os.listdir(tmp_path / "elsewhere") == []
    assert "not a real directory" in flush_outbox(cfg).error


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextmanager
def mounted_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_spool_keeps_the_slice_in_the_outbox(tmp_path):
    if not _can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    cfg = node_config(tmp_path)
    with mounted_tmpfs(Path(cfg.spool_dir), "64k") as spool:
        filler = spool / ".filler"
        with open(filler, "wb") as f:
            try:
                f.write(b"x" * 200_000)
            except OSError:
                pass
        data = job_slices(tmp_path, nodes=("n1",))[0]
        t0 = time.monotonic()
        deliver(cfg, data)
        assert time.monotonic() - t0 < 1.5
        assert [p.name for p in pending_slices(cfg)] == [slices.file_name(data)]
        assert [n for n in os.listdir(spool) if not n.startswith(".filler")] == []
        assert "full" in flush_outbox(cfg).error
        filler.unlink()
        assert flush_outbox(cfg).pending == 0
        assert os.listdir(spool) == [slices.file_name(data)]


def test_read_only_spool_keeps_the_slice_in_the_outbox(tmp_path):
    cfg = node_config(tmp_path)
    data = job_slices(tmp_path, nodes=("n1",))[0]
    if not _can_mount():  # a non-root user is held back by the directory's mode
        spool = Path(cfg.spool_dir)
        spool.mkdir(mode=0o500)
        deliver(cfg, data)
        assert len(pending_slices(cfg)) == 1 and os.listdir(spool) == []
        return
    with mounted_tmpfs(Path(cfg.spool_dir), "1m") as spool:
        subprocess.run(["mount", "-o", "remount,ro", str(spool)], check=True)
        deliver(cfg, data)
        assert len(pending_slices(cfg)) == 1
        assert "read-only" in flush_outbox(cfg).error
        subprocess.run(["mount", "-o", "remount,rw", str(spool)], check=True)
        assert flush_outbox(cfg).pending == 0
        assert os.listdir(spool) == [slices.file_name(data)]


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root run is covered by the test above")
def test_spool_without_write_permission_as_a_non_root_delivery(tmp_path, request):
    """Root ignores modes, so the unwritable spool is tried by a child running as nobody."""
    # pytest's tmp_path lies under a 0700 folder of root's: use one that nobody can reach.
    root = Path(tempfile.mkdtemp(prefix="llem-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    python = python_for_nobody(root)
    if python is None:
        pytest.skip("no Python that uid 65534 can run llem with")
    spool = root / "spool"
    spool.mkdir(mode=0o755)  # root's, not writable by nobody
    state = root / "nobody-state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    data = job_slices(tmp_path, nodes=("n1",))[0]
    code = (
        "import json, sys, time\n"
        "from llem.config import Config\n"
        "from llem.node.outbox import deliver, pending_slices\n"
        f"cfg = Config(cluster='c1', state_dir={str(state)!r}, spool_dir={str(spool)!r})\n"
        "t0 = time.monotonic()\n"
        "deliver(cfg, json.loads(sys.argv[1]))\n"
        "print(len(pending_slices(cfg)), round(time.monotonic() - t0, 2))\n"
    )
    proc = subprocess.run(
        [python[0], "-c", code, json.dumps(data)],
        user=65534,
        group=65534,
        capture_output=True,
        text=True,
        timeout=60,
        env=python[1],
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    pending, elapsed = proc.stdout.split()
    assert pending == "1" and float(elapsed) < 1.5
    assert os.listdir(spool) == []


@contextmanager
def frozen_filesystem(tmp_path):
    """An ext4 loop mount frozen with fsfreeze: every write blocks, like a hung NFS server."""
    if os.geteuid() != 0 or not shutil.which("fsfreeze") or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, fsfreeze and mkfs.ext4")
    mnt = Path(f"/tmp/llem-freeze-{os.getpid()}")
    image = Path(f"{mnt}.img")
    mnt.mkdir(exist_ok=True)
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True).returncode:
        pytest.skip("mkfs.ext4 failed")
    if subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True
    ).returncode:
        image.unlink()
        pytest.skip("cannot loop-mount here")
    spool = mnt / "spool"
    spool.mkdir(mode=0o700)
    frozen = False
    try:

        def freeze():
            nonlocal frozen
            subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
            frozen = True

        def thaw():
            nonlocal frozen
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=False)
            frozen = False

        yield spool, freeze, thaw
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=False)
        time.sleep(0.5)  # let the released delivery process finish before unmounting
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        image.unlink(missing_ok=True)
        mnt.rmdir()


def test_hung_spool_never_blocks_delivery_beyond_a_second(tmp_path):
    with frozen_filesystem(tmp_path) as (spool, freeze, thaw):
        cfg = replace(node_config(tmp_path), spool_dir=str(spool))
        data = job_slices(tmp_path, nodes=("n1",))[0]
        freeze()
        # As slurmd runs an Epilog: output on pipes that must reach EOF, although the delivery
        # process it started is hung on the spool (it must not hold the Epilog's stdout).
        code = (
            "import json, sys, time\nfrom llem.config import Config\n"
            "from llem.node.outbox import deliver\nt0 = time.monotonic()\n"
            "deliver(Config(**json.loads(sys.argv[1])), json.loads(sys.argv[2]))\n"
            "print(round(time.monotonic() - t0, 3))"
        )
        args = json.dumps({"cluster": "c1", "state_dir": cfg.state_dir, "spool_dir": cfg.spool_dir})
        t0 = time.monotonic()
        proc = subprocess.run(
            [os.sys.executable, "-c", code, args, json.dumps(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - t0 < 2.5, "the Epilog's pipes stayed open"
        assert proc.returncode == 0, proc.stderr
        assert float(proc.stdout) < 1.5
        assert len(pending_slices(cfg)) == 1
        t0 = time.monotonic()
        second = flush_outbox(cfg)  # a later Epilog while the first delivery is still hung
        assert time.monotonic() - t0 < 1.5
        assert second.pending == 1 and "another delivery" in second.error
        thaw()
        deadline = time.monotonic() + 10
        while pending_slices(cfg) and time.monotonic() < deadline:
            time.sleep(0.1)  # the hung delivery resumes by itself once the spool answers
        assert pending_slices(cfg) == []
        assert os.listdir(spool) == [slices.file_name(data)]


# -- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, state, exit_code, sig, derived",
    [
        # Slurm 22.05 gives 0:0 for completed, cancelled and timed-out jobs alike: UNKNOWN,
        # never a guessed COMPLETED (only sacct tells them apart).
        ({}, "UNKNOWN", 0, 0, (0, 0)),
        ({"SLURM_JOB_EXIT_CODE": str(3 << 8)}, "FAILED", 3, 0, (0, 0)),
        # a batch script killed by a signal: sacct says FAILED 0:9
        ({"SLURM_JOB_EXIT_CODE": "9"}, "FAILED", 0, 9, (0, 0)),
        ({"SLURM_JOB_EXIT_CODE2": "0:15"}, "FAILED", 0, 15, (0, 0)),
        # exit 0 after a failed step: sacct says COMPLETED with derived 1:0; 22.05 passes the
        # derived code as a raw wait status (256), other versions as E:S
        ({"SLURM_JOB_DERIVED_EC": "256"}, "UNKNOWN", 0, 0, (1, 0)),
        ({"SLURM_JOB_DERIVED_EC": "2:0"}, "UNKNOWN", 0, 0, (2, 0)),
        ({"SLURM_JOB_DERIVED_EC": "9"}, "UNKNOWN", 0, 0, (0, 9)),
        ({"SLURM_JOB_DERIVED_EC": "x"}, "UNKNOWN", 0, 0, (None, None)),
        ({"SLURM_JOB_EXIT_CODE": ""}, "UNKNOWN", None, None, (0, 0)),
    ],
)
def test_header_from_epilog_slurmctld_env(extra, state, exit_code, sig, derived):
    env = {"SLURM_JOB_DERIVED_EC": "0", **ENV, **extra}
    data = header_slice_from_env(env, "other", now_ns=T0)
    job = data["job"]
    assert data["cluster"] == "c1" and data["kind"] == "header"
    assert (job["state"], job["exit_code"], job["signal"]) == (state, exit_code, sig)
    assert (job["derived_exit_code"], job["derived_signal"]) == derived
    assert (job["job_id"], job["name"], job["num_nodes"], job["end_ns"]) == (
        "4242",
        "my job",
        3,
        T0,
    )


def test_header_uses_start_and_end_times_when_slurm_gives_them():
    env = {
        **ENV,
        "SLURM_JOB_START_TIME": str(T0 // S),
        "SLURM_JOB_END_TIME": str(T0 // S + 60),
        "SLURM_ARRAY_JOB_ID": "4240",
        "SLURM_ARRAY_TASK_ID": "2",
    }
    job = header_slice_from_env(env, "c1", now_ns=T0 + 999 * S)["job"]
    assert (job["start_ns"], job["end_ns"]) == (T0, T0 + 60 * S)
    assert (job["array_job_id"], job["array_task_id"]) == ("4240", "2")


def test_header_without_a_job_id_is_refused():
    with pytest.raises(LedgerError, match="job_id"):
        header_slice_from_env({**ENV, "SLURM_JOB_ID": "../x"}, "c1")


def test_write_header_delivers_to_the_spool(tmp_path):
    cfg = node_config(tmp_path, node="ctld")
    path = write_header(cfg, ENV)
    assert path.name.startswith("header.c1.ctld.4242-")
    assert os.listdir(cfg.spool_dir) == [path.name]


# -- retention -------------------------------------------------------------------------------


def test_prune_drops_only_exported_old_data(tmp_path):
    store, run_id = build_store(tmp_path / "s" / "node.db")
    other = store.add_job(JobRecord(job_id="101", cluster="c1", node="n1", start_ns=T0 + 20000 * S))
    add_intervals(store, other, T0 + 20000 * S, 600, 60, first_id=500)
    cut = T0 + 10000 * S
    assert prune_node_store(store, cut).get("jobs", 0) == 0  # sealed, not exported: kept
    store.update_job(run_id, state="exported", exported_ns=T0 + 5400 * S)
    counts = prune_node_store(store, cut)
    assert counts["jobs"] == 1 and counts["intervals"] == 60
    assert [j.job_id for j in store.jobs()] == ["101"]
    assert store.query("SELECT COUNT(*) FROM intervals")[0][0] == 10
    assert store.integrity_check() == "ok"
    assert store.query("PRAGMA foreign_key_check") == []


def test_job_names_of_non_utf8_bytes_are_kept_as_replacement_characters(tmp_path):
    """Python holds environment bytes that are not UTF-8 as lone surrogates, which SQLite
    and strict JSON readers refuse: the node store and the header get U+FFFD instead, and the
    job is still measured."""
    from llem.node.slurm import job_from_env

    raw = os.fsdecode(b"r\xe9sum\xe9 \xf0\x9f\x98\x80")  # Latin-1 bytes, then a real emoji
    env = {**ENV, "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": raw}
    job = job_from_env(env, "c1", T0, ())
    with NodeStore(tmp_path / "node.db") as store:
        store.add_job(job)
    assert job.name == "r\ufffdsum\ufffd \U0001f600"
    header = header_slice_from_env(env, "c1", now_ns=T0 + 60 * S)
    assert header["job"]["name"] == job.name
    encode(header).decode("utf-8")  # strict UTF-8: no surrogate escapes in the file
    slices.validate(header)


def test_a_concurrent_flush_is_waited_for_not_reported_as_a_hung_spool(tmp_path):
    # llem demo printed "another delivery is still running (the spool may be hung)" whenever
    # two deliveries into one outbox overlapped by a few milliseconds (issue 13, part 5).
    import fcntl
    import threading

    cfg = node_config(tmp_path)
    data = job_slices(tmp_path, nodes=("n1",))[0]
    outbox = outbox_dir(cfg)
    outbox.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(outbox / ".flush.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another flush, busy for 0.3 s
    threading.Timer(0.3, lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN)).start()
    try:
        export_and_deliver_result = deliver(cfg, data, timeout_s=1.0)
        assert export_and_deliver_result.name == slices.file_name(data)
        assert pending_slices(cfg) == []
        assert os.listdir(cfg.spool_dir) == [slices.file_name(data)]
    finally:
        os.close(lock_fd)
