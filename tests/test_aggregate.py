"""``llem aggregate``: spool to ledger, bad slices, ownership, lock, archive, CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llem import slices
from llem.cluster.aggregate import AggregateLock, LedgerBusy, aggregate_once, quarantine_report
from llem.cluster.header import header_slice_from_env
from llem.cluster.ledger import Ledger
from llem.config import AggregateConfig
from llem.errors import LedgerError
from llem.fsutil import write_atomic
from llem.paths import archive_dir, quarantine_dir
from llem.slices import encode
from tests.helpers.aggregate import aggregate_cli as _cli
from tests.helpers.aggregate import template_spool as _template_spool
from tests.helpers.make_spool import make_spool
from tests.helpers.nodes import ENV, T0, S, job_slices, node_config, spool_slice

NOW = T0 + 10 * 3600 * S


def config(tmp_path, **aggregate):
    return node_config(tmp_path, "admin", **aggregate)


def dump(cfg) -> str:
    with Ledger(cfg.ledger, readonly=True) as ledger:
        return ledger.canonical_dump()


def test_once_merges_the_spool_and_archives_by_date(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    res = aggregate_once(cfg, now_ns=NOW)
    assert (res.merged, res.jobs, res.quarantined) == (3, 1, [])
    assert [n for n in os.listdir(cfg.spool_dir) if n != "archive"] == []
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW // S))
    assert len(os.listdir(archive_dir(cfg) / day)) == 3
    with Ledger(cfg.ledger, readonly=True) as ledger:
        (run,) = ledger.job_runs("100")
        assert run["status"] == "complete"
        assert set(ledger.job_energy_by_node("c1", "100")) == {"n1", "n2", "n3"}


def test_delete_mode_and_a_second_pass_with_nothing_new(tmp_path):
    cfg = config(tmp_path, processed="delete")
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    assert os.listdir(cfg.spool_dir) == []
    before = dump(cfg)
    res = aggregate_once(cfg, now_ns=NOW)
    assert res.merged == 0 and dump(cfg) == before


def test_the_same_slices_again_change_nothing(tmp_path):
    cfg = config(tmp_path)
    items = job_slices(tmp_path, "100")
    for data in items:
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    before = dump(cfg)
    for data in items[::-1]:  # re-delivered (e.g. an outbox retry after a lost rename)
        spool_slice(cfg, data)
    res = aggregate_once(cfg, now_ns=NOW)
    assert (res.merged, res.unchanged) == (0, 3)
    assert dump(cfg) == before


def test_completeness_third_node_late(tmp_path):
    cfg = config(tmp_path, grace_s=600)
    n1, n2, n3 = job_slices(tmp_path, "100")
    spool_slice(cfg, n1)
    spool_slice(cfg, n2)
    end_ns = n1["job"]["end_ns"]
    aggregate_once(cfg, now_ns=end_ns + 60 * S)
    with Ledger(cfg.ledger, readonly=True) as ledger:
        assert ledger.job_runs("100")[0]["status"] == "pending"
    res = aggregate_once(cfg, now_ns=end_ns + 700 * S)  # nothing new, grace over
    assert res.incomplete == 1
    with Ledger(cfg.ledger, readonly=True) as ledger:
        run = ledger.job_runs("100")[0]
        assert (run["status"], run["missing_nodes"]) == ("incomplete", ["n3"])
    spool_slice(cfg, n3)
    aggregate_once(cfg, now_ns=end_ns + 7200 * S)
    with Ledger(cfg.ledger, readonly=True) as ledger:
        run = ledger.job_runs("100")[0]
        assert (run["status"], run["missing_nodes"], run["nodes_reported"]) == ("complete", [], 3)


def test_header_slice_through_the_spool(tmp_path):
    cfg = config(tmp_path)
    spool_slice(
        cfg, header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 5401 * S)
    )
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    with Ledger(cfg.ledger, readonly=True) as ledger:
        (run,) = ledger.job_runs("100")
        # exit 0:0 alone cannot tell COMPLETED from CANCELLED or TIMEOUT (Slurm 22.05)
        assert (run["has_header"], run["state"], run["name"]) == (1, "UNKNOWN", "my job")


# -- bad slices ------------------------------------------------------------------------------


def _bad(tmp_path, kind):
    """(file name, bytes) of one bad slice of the given kind."""
    good = job_slices(tmp_path, "100", nodes=("n1",))[0]
    name = slices.file_name(good)
    raw = encode(good)
    if kind == "truncated":
        return name, raw[: len(raw) // 2]
    if kind == "corrupt":
        return name, b"\x00\xff" * 50
    if kind == "not_json":
        return name, b"{this is not json}"
    if kind == "empty":
        return name, b""
    if kind == "wrong_schema":
        good["schema"] = "something/1"
    elif kind == "node_mismatch":
        return name.replace(".n1.", ".n7."), raw
    elif kind == "negative":
        good["energy"][0]["energy_uj"] = -1
    elif kind == "end_before_start":
        good["job"]["end_ns"] = good["job"]["start_ns"] - S
    elif kind == "impossible":
        good["node_totals"]["nvml:GPU-a"]["measured_uj"] = "lots"
    elif kind == "bad_name":
        return "notes.txt", raw
    elif kind == "wrong_type":
        good["job"]["cpus"] = {"count": 8}
    elif kind == "window_sum":
        good["windows"][0]["energy"] = {"nvml:GPU-a": 2**63 - 1, "rapl:package-0": 1}
    elif kind == "nested":
        return name, b'{"schema": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return name, encode(good)


BAD_KINDS = [
    "truncated",
    "corrupt",
    "not_json",
    "empty",
    "wrong_schema",
    "node_mismatch",
    "negative",
    "end_before_start",
    "impossible",
    "bad_name",
    "wrong_type",
    "nested",
    "window_sum",
]
REASONS = {
    "truncated": "truncated",
    "corrupt": "corrupt",
    "not_json": "corrupt",
    "empty": "empty",
    "wrong_schema": "foreign file",
    "node_mismatch": "does not match",
    "negative": "negative energy",
    "end_before_start": "end before start",
    "impossible": "integer",
    "bad_name": "not a slice name",
    "wrong_type": "'cpus' must be an integer",
    "nested": "nested too deeply",
    "window_sum": "beyond what the ledger stores",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_slice_is_quarantined_and_the_rest_goes_on(tmp_path, kind, caplog):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path / "good", "200"):
        spool_slice(cfg, data)
    name, raw = _bad(tmp_path, kind)
    write_atomic(Path(cfg.spool_dir), name, raw)
    res = aggregate_once(cfg, now_ns=NOW)
    assert res.merged == 3
    assert [n for n, _ in res.quarantined] == [name]
    assert REASONS[kind] in res.quarantined[0][1]
    assert (quarantine_dir(cfg) / name).exists()
    assert not (Path(cfg.spool_dir) / name).exists()
    report = quarantine_report(cfg)
    assert [r["file"] for r in report] == [name] and REASONS[kind] in report[0]["reason"]
    assert any(name in r.message and "quarantined" in r.message for r in caplog.records)
    with Ledger(cfg.ledger, readonly=True) as ledger:
        assert [e.file for e in ledger.quarantine_log()] == [name]
        assert ledger.job_runs("200")[0]["status"] == "complete"


def test_text_that_is_not_unicode_is_replaced_and_the_job_kept(tmp_path):
    """A job name of bytes that are not UTF-8 reaches the slice as lone surrogates, which
    SQLite cannot store: the name gets U+FFFD, the job and its energy are merged."""
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        data["job"]["name"] = "r\u00e9sum\udce9 \U0001f600"
        data["windows"][0]["name"] = "step\udcff"
        spool_slice(cfg, data)
    res = aggregate_once(cfg, now_ns=NOW)
    assert (res.merged, res.quarantined) == (3, [])
    with Ledger(cfg.ledger, readonly=True) as ledger:
        (run,) = ledger.job_runs("100")
        assert run["name"] == "r\u00e9sum\ufffd \U0001f600" and run["status"] == "complete"
        assert {r[0] for r in ledger.query("SELECT name FROM windows")} >= {"step\ufffd"}


def test_newer_schema_is_left_in_place_with_a_clear_error(tmp_path):
    cfg = config(tmp_path)
    data = job_slices(tmp_path, "100", nodes=("n1",))[0]
    data["schema"] = "llem.slice/7"
    path = spool_slice(cfg, data)
    proc = _cli(cfg, "--once")
    assert proc.returncode == 1
    assert "newer llem" in proc.stderr and "upgrade llem" in proc.stderr
    assert path.exists() and quarantine_report(cfg) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is checked when aggregating as root")
def test_slice_dropped_by_a_non_root_user_is_refused(tmp_path):
    cfg = config(tmp_path)
    data = job_slices(tmp_path, "100", nodes=("n1",))[0]
    path = spool_slice(cfg, data)
    os.chown(path, 1000, 1000)
    res = aggregate_once(cfg, now_ns=NOW)
    assert res.merged == 0
    assert "owned by uid 1000, not root" in res.quarantined[0][1]
    with Ledger(cfg.ledger, readonly=True) as ledger:
        assert ledger.job_runs() == []


def test_symlink_in_the_spool_is_refused(tmp_path):
    cfg = config(tmp_path)
    target = tmp_path / "elsewhere.json"
    target.write_bytes(encode(job_slices(tmp_path, "100", nodes=("n1",))[0]))
    Path(cfg.spool_dir).mkdir(mode=0o700)
    os.symlink(target, Path(cfg.spool_dir) / "job.c1.n1.100-1.1.json")
    res = aggregate_once(cfg, now_ns=NOW)
    assert "symlink" in res.quarantined[0][1]
    assert target.exists()


def test_spool_writable_by_others_is_refused(tmp_path):
    cfg = config(tmp_path)
    Path(cfg.spool_dir).mkdir()
    os.chmod(cfg.spool_dir, 0o777)
    with pytest.raises(Exception, match="writable by others"):
        aggregate_once(cfg)


# -- lock ------------------------------------------------------------------------------------


def test_second_aggregator_exits_cleanly_or_waits(tmp_path):
    cfg = config(tmp_path)
    spool_slice(cfg, job_slices(tmp_path, "100", nodes=("n1",))[0])
    Path(cfg.ledger).parent.mkdir(parents=True, exist_ok=True)
    with AggregateLock(cfg.ledger):
        with pytest.raises(LedgerBusy, match="another llem aggregate"):
            aggregate_once(cfg)
        proc = _cli(cfg, "--once")
        assert proc.returncode == 0 and "another llem aggregate holds" in proc.stderr
    lock = AggregateLock(cfg.ledger).__enter__()
    threading.Timer(0.3, lock.__exit__).start()
    res = aggregate_once(cfg, wait_s=5)  # waits for the first, then merges
    assert res.merged == 1


# -- CLI -------------------------------------------------------------------------------------


def test_cli_once_json_summary(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    proc = _cli(cfg, "--once", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["merged"], out["jobs"], out["quarantined"]) == (3, 1, [])


def test_cli_help():
    proc = subprocess.run(
        [sys.executable, "-c", "from llem.cli.main import main; main()", "aggregate", "-h"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--watch" in proc.stdout and "--once" in proc.stdout


def test_cli_watch_merges_new_slices_and_stops_on_sigterm(tmp_path):
    cfg = config(tmp_path)
    Path(cfg.spool_dir).mkdir(mode=0o700)
    proc = _cli(
        cfg, "--watch", "--every", "0.5", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for data in job_slices(tmp_path, "100"):
            spool_slice(cfg, data)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with Ledger(cfg.ledger, readonly=True) as ledger:
                    if ledger.job_runs("100") and ledger.job_runs("100")[0]["nodes_reported"] == 3:
                        break
            except LedgerError:
                pass  # not there yet, or being created by the first pass (schema not written)
            time.sleep(0.2)
        else:
            raise AssertionError("watch mode did not merge the slices")
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- crash safety ----------------------------------------------------------------------------


def _fresh(tmp_path, template, name, readers=0) -> object:
    root = tmp_path / name
    root.mkdir()
    cfg = replace(
        node_config(root, "admin"),
        aggregate=AggregateConfig(grace_s=10**9, batch_size=4, readers=readers),
    )
    shutil.copytree(template, cfg.spool_dir)
    os.chmod(cfg.spool_dir, 0o700)
    return cfg


def _spool_left(cfg) -> int:
    return len([n for n in os.listdir(cfg.spool_dir) if n not in ("archive", "quarantine")])


def _run_until_merging(cfg, total: int) -> tuple[subprocess.Popen, float, float]:
    """Start a pass; return it, the seconds until its first batch left the spool, and then."""
    t0 = time.monotonic()
    proc = _cli(cfg, "--once", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and _spool_left(cfg) == total:
        time.sleep(0.002)
    return proc, time.monotonic() - t0, t0


@pytest.mark.parametrize("readers", [0, 2])
def test_sigkill_at_random_points_then_rerun_gives_the_clean_ledger(tmp_path, readers):
    import random

    template, items = _template_spool(tmp_path)
    total = len(items) + 1
    clean = _fresh(tmp_path, template, "clean", readers)
    proc, first_batch_s, t0 = _run_until_merging(clean, total)
    assert proc.wait(120) == 0
    clean_s = time.monotonic() - t0
    expected = dump(clean)
    assert "# job_runs 100" in expected and "# quarantine 1" in expected
    merging_s = max(0.05, clean_s - first_batch_s)
    rng = random.Random(4)
    killed_mid_merge = 0
    for run in range(20):
        cfg = _fresh(tmp_path, template, f"run{run}", readers)
        if run % 4 == 0:  # anywhere: start-up, lock, reading, merging
            proc = _cli(cfg, "--once", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.0, clean_s))
        else:  # somewhere in the merge, which is most of the pass on a big spool
            proc, _, _ = _run_until_merging(cfg, total)
            time.sleep(rng.uniform(0.0, 0.7 * merging_s))
        proc.kill()  # SIGKILL
        proc.wait(10)
        killed_mid_merge += 0 < _spool_left(cfg) < total
        rerun = _cli(cfg, "--once")
        assert rerun.returncode == 0, rerun.stderr
        assert dump(cfg) == expected, f"run {run}: ledger differs after a kill"
        with Ledger(cfg.ledger, readonly=True) as ledger:
            assert ledger.integrity_check() == "ok"
        assert _spool_left(cfg) == 0
    print(
        f"clean run {clean_s:.2f} s (merging {merging_s:.2f} s); {killed_mid_merge} of 20 "
        "kills landed mid-merge"
    )
    assert killed_mid_merge >= 8, "the kills rarely landed inside a merge"


def test_two_aggregators_at_once_give_the_clean_ledger(tmp_path):
    template, _ = _template_spool(tmp_path)
    clean = _fresh(tmp_path, template, "clean")
    assert _cli(clean, "--once").returncode == 0
    cfg = _fresh(tmp_path, template, "both")
    procs = [
        _cli(
            cfg, "--once", "--wait", "60", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    merged = sorted(int(out.split()[1]) for out, _ in outs)
    assert merged[0] == 0 and merged[1] == 301  # the second found the spool already merged
    assert dump(cfg) == dump(clean)


def test_watch_survives_a_broken_spool(tmp_path, caplog):
    from llem.cluster.aggregate import watch

    cfg = config(tmp_path)
    Path(cfg.spool_dir).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.spool_dir).write_text("not a directory")
    passes = []
    watch(cfg, 0.5, stop=lambda: len(caplog.records) >= 2, on_pass=passes.append)
    assert passes == [] and "cannot use the spool" in caplog.records[0].message


def test_cli_text_summary_and_busy_message(tmp_path):
    cfg = config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    proc = _cli(cfg, "--once")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        r"merged 3 slice\(s\), 0 already in the ledger, 0 quarantined, "
        r"1 job\(s\) updated, 0 marked incomplete, in \d+\.\d\d s\n",
        proc.stdout,
    )
    with AggregateLock(cfg.ledger):
        proc = _cli(cfg, "--once")
    assert (proc.returncode, proc.stdout) == (0, "")
    assert proc.stderr == (
        f"llem aggregate: another llem aggregate holds {cfg.ledger}.lock; "
        "nothing done (it will merge these slices)\n"
    )


def test_bench_generator_makes_mergeable_slices(tmp_path):
    cfg = config(tmp_path)
    counts = make_spool(Path(cfg.spool_dir), nodes=8, jobs=5)
    res = aggregate_once(cfg)
    assert res.merged == counts["job_slices"] + counts["node_slices"]
    assert res.quarantined == [] and res.jobs == counts["jobs"]


def test_stale_temporary_files_are_swept_fresh_ones_kept(tmp_path):
    cfg = config(tmp_path)
    spool = Path(cfg.spool_dir)
    spool.mkdir(mode=0o700)
    stale, fresh = spool / ".tmp.1.2.job.c1.n1.x.json", spool / ".tmp.3.4.job.c1.n1.y.json"
    stale.write_bytes(b"{half")
    fresh.write_bytes(b"{being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    res = aggregate_once(cfg)
    assert res.quarantined == [] and not stale.exists() and fresh.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is checked when aggregating as root")
def test_header_owned_by_the_slurm_user_is_accepted_job_slice_is_not(tmp_path):
    cfg = config(tmp_path, header_owners="4242")
    header = spool_slice(
        cfg, header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 5401 * S)
    )
    job = spool_slice(cfg, job_slices(tmp_path, "100", nodes=("n1",))[0])
    os.chown(header, 4242, 4242)
    os.chown(job, 4242, 4242)
    res = aggregate_once(cfg, now_ns=NOW)
    assert res.merged == 1
    assert [n for n, _ in res.quarantined] == [job.name]
