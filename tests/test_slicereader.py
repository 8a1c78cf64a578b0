"""Reader processes: the same candidates as reading in the aggregator, failures, protocol."""

import io
import logging
import marshal
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llem import slices
from llem.cluster import readers as slicereader
from llem.cluster.ledger import Ledger
from llem.cluster.readers import Candidate, read_all, read_candidate, reader_count, serve
from llem.fsutil import write_atomic
from llem.slices import encode
from tests.helpers.make_spool import make_spool
from tests.helpers.nodes import job_slices, node_config


def _spool(tmp_path) -> list[str]:
    """Good job slices of three jobs, and one of each kind of file a reader must judge."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    for job in ("100", "101", "102"):
        for data in job_slices(tmp_path / f"gen{job}", job):
            data["job"]["job_id"] = job
            write_atomic(spool, slices.file_name(data), encode(data))
    newer = job_slices(tmp_path / "gen-newer", "103", nodes=("n1",))[0]
    newer["schema"] = "llem.slice/9"
    write_atomic(spool, "job.c1.n1.103-1.2.json", encode(newer))
    write_atomic(spool, "job.c1.n2.104-1.2.json", b'{"schema": "llem.slice/1", "ki')
    os.symlink("/etc/passwd", spool / "job.c1.n3.105-1.2.json")
    paths = sorted(str(p) for p in spool.iterdir())
    return paths + [str(spool / "job.c1.n4.106-1.2.json")]  # listed, then gone


def _wire(cands) -> list[tuple]:
    return [c.to_wire() for c in cands]


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_readers_give_exactly_what_reading_here_gives(tmp_path, monkeypatch, readers):
    monkeypatch.setattr(slicereader, "CHUNK", 2)  # several chunks for each reader
    paths = _spool(tmp_path)
    here = list(read_all(paths, readers=0))
    assert len(here) == len(paths) == 13
    kinds = [(c.prepared is not None, bool(c.reason), bool(c.newer), c.gone) for c in here]
    assert kinds.count((True, False, False, False)) == 9
    assert (False, True, False, False) in kinds and (False, False, True, False) in kinds
    assert (False, False, False, True) in kinds
    assert _wire(read_all(paths, readers=readers, ahead=2)) == _wire(here)


def test_readers_are_isolated_from_the_current_folder(tmp_path, monkeypatch, caplog):
    """A llem package (or a json module) planted in the folder the aggregator runs from is
    never imported by a reader."""
    paths = _spool(tmp_path)
    planted = tmp_path / "planted"
    (planted / "llem").mkdir(parents=True)
    marker = tmp_path / "imported"
    for name in ("llem/__init__.py", "json.py"):
        (planted / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        got = _wire(read_all(paths, readers=1))
    assert not marker.exists()
    assert caplog.records == []  # the reader did the work: nothing fell back
    monkeypatch.undo()
    assert got == _wire(read_all(paths, readers=0))


def test_a_reader_with_other_code_refuses_and_the_aggregator_reads(tmp_path, monkeypatch, caplog):
    """After an upgrade in place, a new reader must not feed an old aggregator."""
    paths = _spool(tmp_path)
    expected = _wire(read_all(paths, readers=0))
    monkeypatch.setattr(slicereader, "wire_fingerprint", lambda: "0123456789abcdef")
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        assert _wire(read_all(paths, readers=1)) == expected
    assert any("ended early (status 3)" in r.message for r in caplog.records)


def test_fingerprint_is_the_same_in_another_process():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from llem.cluster.readers import wire_fingerprint; print(wire_fingerprint())",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )
    assert out.stdout.strip() == slicereader.wire_fingerprint()


def test_candidates_survive_the_trip_between_processes(tmp_path):
    path = _spool(tmp_path)[0]
    cand = read_candidate(path)
    assert Candidate.from_wire(marshal.loads(marshal.dumps(cand.to_wire()))) == cand


def _reader_children(parent: psutil.Process | None = None) -> list[psutil.Process]:
    out = []
    for child in (parent or psutil.Process()).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "llem.cluster.readers" in " ".join(
                child.cmdline()
            ):
                out.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return out


def test_a_reader_that_dies_mid_pass_is_replaced_by_reading_here(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(slicereader, "CHUNK", 2)
    make_spool(tmp_path / "spool", nodes=20, jobs=20)  # more than the pipe holds
    paths = sorted(str(p) for p in (tmp_path / "spool").iterdir())
    expected = _wire(read_all(paths, readers=0))
    cands = read_all(paths, readers=1, ahead=2)
    got = [next(cands).to_wire()]
    (child,) = _reader_children()
    child.kill()
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        got += _wire(cands)
    assert got == expected
    assert any(
        "ended early" in r.message
        and "reading the rest of the spool in the aggregator" in r.message
        for r in caplog.records
    )
    assert _reader_children() == []


def test_readers_are_stopped_when_the_pass_stops_early(tmp_path, monkeypatch):
    monkeypatch.setattr(slicereader, "CHUNK", 2)
    make_spool(tmp_path / "spool", nodes=20, jobs=20)  # more than the pipes hold
    cands = read_all(sorted(str(p) for p in (tmp_path / "spool").iterdir()), readers=2, ahead=2)
    next(cands)
    assert len(_reader_children()) == 2
    cands.close()  # the aggregator failed, or was interrupted
    assert _reader_children() == []


def test_reader_that_cannot_start_falls_back_to_reading_here(tmp_path, monkeypatch, caplog):
    paths = _spool(tmp_path)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        assert _wire(read_all(paths, readers=1)) == _wire(read_all(paths, readers=0))
    assert any("cannot start a reader process" in r.message for r in caplog.records)


def test_serve_answers_in_order_reports_bugs_and_ends_with_its_input(tmp_path):
    paths = _spool(tmp_path)
    frames = [marshal.dumps(paths[:2]), marshal.dumps(42), marshal.dumps(paths[-1:])]
    inp = io.BytesIO(b"".join(slicereader._FRAME.pack(len(f)) + f for f in frames))
    out = io.BytesIO()
    assert serve(inp, out, header_uids=frozenset(), euid=os.geteuid()) == 0
    out.seek(0)
    answers = []
    while (frame := slicereader._read_frame(out)) is not None:
        answers.append(marshal.loads(frame))
    assert answers[0] == ("ok", [read_candidate(p).to_wire() for p in paths[:2]])
    assert answers[1][0] == "error" and "TypeError" in answers[1][1]
    assert answers[2] == ("ok", [read_candidate(paths[-1]).to_wire()])


def test_serve_stops_on_a_frame_cut_short():
    inp = io.BytesIO(slicereader._FRAME.pack(100) + b"abc")
    assert serve(inp, io.BytesIO(), header_uids=frozenset(), euid=0) == 1


@pytest.mark.parametrize(
    "setting, slices, cpus, expected",
    [
        ("auto", 100_000, 1, 0),  # one CPU: reading in the aggregator is all there is
        ("auto", 100_000, 2, 1),
        ("auto", 100_000, 16, 4),  # at most four: the single writer cannot keep up with more
        ("auto", 400, 16, 0),  # a small pass: starting a reader costs more than it saves
        ("auto", 1_200, 16, 2),
        (0, 100_000, 16, 0),
        (3, 100_000, 2, 3),  # the admin's number wins over the CPU count
        (3, 100, 16, 2),  # but no more readers than chunks
        (2, 0, 16, 0),
    ],
)
def test_reader_count(setting, slices, cpus, expected):
    assert reader_count(setting, slices, cpus) == expected


# -- the aggregator with readers -----------------------------------------------------------


def _config_file(tmp_path, readers) -> tuple[object, Path]:
    cfg = node_config(tmp_path, "admin")
    path = tmp_path / "llem.yaml"
    path.write_text(
        f"cluster: {cfg.cluster}\nstate_dir: {cfg.state_dir}\n"
        f"spool_dir: {cfg.spool_dir}\nledger: {cfg.ledger}\n"
        f"aggregate:\n  processed: delete\n  batch_size: 50\n  readers: {readers}\n"
    )
    return cfg, path


def _aggregate_cli(config_path: Path, **popen):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env["LLEM_CONFIG"] = str(config_path)
    cmd = [sys.executable, "-c", "from llem.cli.main import main; main()", "aggregate", "--once"]
    return subprocess.Popen(cmd, env=env, **popen)


def test_readers_leave_when_the_aggregator_is_killed(tmp_path):
    cfg, path = _config_file(tmp_path, 2)
    counts = make_spool(Path(cfg.spool_dir), nodes=40, jobs=50)
    total = counts["job_slices"] + counts["node_slices"]
    proc = _aggregate_cli(path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    aggregator = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    readers = []
    while time.monotonic() < deadline and len(readers) < 2 and proc.poll() is None:
        readers = _reader_children(aggregator)
        time.sleep(0.01)
    assert len(readers) == 2, "the aggregator started no readers"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(readers, timeout=10)
    assert alive == [], "reader processes outlived the aggregator"
    # Nothing is held: a new pass merges everything at once.
    rerun = _aggregate_cli(path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert os.listdir(cfg.spool_dir) == []
    with Ledger(cfg.ledger, readonly=True) as ledger:
        assert (
            ledger.query("SELECT COUNT(*) FROM job_nodes")[0][0]
            + ledger.query("SELECT COUNT(DISTINCT node) FROM node_hours")[0][0]
            == total
        )
        assert ledger.query("SELECT COUNT(DISTINCT job_id) FROM job_runs")[0][0] == counts["jobs"]
        assert ledger.integrity_check() == "ok"


def test_a_pass_with_readers_gives_the_ledger_of_a_pass_without(tmp_path):
    from dataclasses import replace

    from llem.cluster.aggregate import aggregate_once

    dumps = []
    for readers in (0, 2):
        root = tmp_path / f"r{readers}"
        cfg = node_config(root, "admin")
        cfg = replace(cfg, aggregate=replace(cfg.aggregate, readers=readers, batch_size=64))
        counts = make_spool(Path(cfg.spool_dir), nodes=12, jobs=60, seed=3)
        (Path(cfg.spool_dir) / "job.c1.n1.9-9.9.json").write_bytes(b'{"schema": "llem.sl')
        res = aggregate_once(cfg)
        assert len(res.quarantined) == 1
        assert res.merged == counts["job_slices"] + counts["node_slices"]
        with Ledger(cfg.ledger, readonly=True) as ledger:
            dumps.append(ledger.canonical_dump())
    assert dumps[0] == dumps[1]


def test_a_reader_that_sends_garbage_is_replaced_by_reading_here(tmp_path, monkeypatch, caplog):
    """A frame that does not unmarshal into candidates (decoded in the receiving thread)
    stops the readers; the aggregator reads the rest itself and loses nothing."""
    monkeypatch.setattr(slicereader, "CHUNK", 2)
    make_spool(tmp_path / "spool", nodes=5, jobs=4)
    paths = sorted(str(p) for p in (tmp_path / "spool").iterdir())
    expected = _wire(read_all(paths, readers=0))
    real = slicereader._candidates
    frames = []

    def second_is_garbage(frame):
        frames.append(frame)
        return real(b"\x00garbage" if len(frames) == 2 else frame)

    monkeypatch.setattr(slicereader, "_candidates", second_is_garbage)
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        assert _wire(read_all(paths, readers=1)) == expected
    assert any(
        "sent garbage" in r.message and "reading the rest of the spool" in r.message
        for r in caplog.records
    )
    assert _reader_children() == []


def test_a_frame_that_breaks_decoding_in_any_way_never_leaves_the_aggregator_waiting(
    tmp_path, monkeypatch, caplog
):
    """Whatever decoding a frame raises, the receiving thread hands the failure over (a
    thread that died would leave the aggregator waiting for ever, with its lock held)."""
    import threading
    import types

    make_spool(tmp_path / "spool", nodes=5, jobs=4)
    paths = sorted(str(p) for p in (tmp_path / "spool").iterdir())
    expected = _wire(read_all(paths, readers=0))
    calls = []

    def breaks_once(data):
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return marshal.loads(data)

    monkeypatch.setattr(
        slicereader, "marshal", types.SimpleNamespace(dumps=marshal.dumps, loads=breaks_once)
    )
    got = []
    with caplog.at_level(logging.WARNING, logger="llem.cluster.readers"):
        thread = threading.Thread(target=lambda: got.append(_wire(read_all(paths, readers=1))))
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the pass waits for a result that never comes"
    assert got == [expected]
    assert any("sent garbage: unexpected" in r.message for r in caplog.records)
