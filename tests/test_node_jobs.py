"""Job registrations from the Slurm hooks (llem.node.jobs): none may lose its job."""

import json
import os

import pytest

from llem.node.jobs import end_job, ingest, write_registration
from llem.node.store import NodeStore

ENV = {
    "SLURM_JOB_ID": "7",
    "SLURMD_NODENAME": "t1",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_USER": "alice",
    "SLURM_JOB_GPUS": "1",
}
MTIME_NS = 1_790_000_000_123_456_789
START_NS = 1_789_999_000_000_000_000


@pytest.fixture
def node(tmp_path):
    jobs = tmp_path / "run" / "t1" / "jobs"
    jobs.mkdir(parents=True, mode=0o700)
    with NodeStore(tmp_path / "node.db") as store:
        yield store, jobs


def hook_file(jobs, name, records):
    """A registration as the hook writes it, with a known mtime."""
    path = jobs / name
    path.write_bytes(b"".join(r.encode() + b"\0" for r in records))
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


def env_records(event_us):
    return ([] if event_us is None else [f"LLEM_EVENT_US={event_us}"]) + [
        f"{k}={v}" for k, v in ENV.items()
    ]


def test_a_dated_registration_is_taken_as_it_is(node):
    store, jobs = node
    write_registration(jobs, "start", ENV, at_ns=5_000_000_000)
    write_registration(jobs, "end", ENV, at_ns=9_000_000_000)
    assert ingest(store, jobs, "c", "t1") == [("7", "start"), ("7", "end")]
    (run,) = store.jobs()
    assert (run.start_ns, run.end_ns, run.state, run.flags) == (
        5_000_000_000,
        9_000_000_000,
        "ended",
        (),
    )
    assert os.listdir(jobs) == []


@pytest.mark.parametrize("event_us", ["", None, "17.5", "abc"])
def test_a_start_without_a_usable_time_is_dated_by_its_mtime(node, event_us):
    """A hook on a bash without $EPOCHREALTIME wrote LLEM_EVENT_US= (empty): the job is
    recorded all the same, at the file's mtime, and says so."""
    store, jobs = node
    hook_file(jobs, "7.start", env_records(event_us))
    assert ingest(store, jobs, "c", "t1") == [("7", "start")]
    (run,) = store.jobs()
    assert (run.job_id, run.user, run.uid, run.gpus, run.state) == (
        "7",
        "alice",
        1000,
        ("1",),
        "running",
    )
    assert run.start_ns == MTIME_NS
    assert run.flags == ("time_from_mtime",)
    assert os.listdir(jobs) == []  # taken, not moved to bad/


def test_an_end_without_a_usable_time_is_dated_by_its_mtime(node):
    store, jobs = node
    write_registration(jobs, "start", ENV, at_ns=START_NS)
    hook_file(jobs, "7.end", env_records(""))
    assert ingest(store, jobs, "c", "t1") == [("7", "start"), ("7", "end")]
    (run,) = store.jobs()
    assert (run.start_ns, run.end_ns, run.state) == (START_NS, MTIME_NS, "ended")
    assert run.flags == ("time_from_mtime",)
    assert os.listdir(jobs) == []


def test_end_job_keeps_the_runs_flags_and_adds_new_ones_once(node):
    store, _ = node
    end_job(store, dict(ENV), "c", 10, ["time_from_mtime"])  # no Prolog: a run of its own
    (run,) = store.jobs()
    assert run.flags == ("no_prolog", "time_from_mtime")


@pytest.mark.parametrize(
    "content",
    [
        b"not a registration",
        b"LLEM_EVENT_US=1\0SLURM_JOB_ID=8\0",  # another job's file
        b"LLEM_EVENT_US=1\0SLURM_JOB_ID=7\0SLURMD_NODENAME=../x\0",  # unusable node name
    ],
)
def test_a_registration_that_does_not_parse_is_kept_in_bad_and_reported(node, content):
    store, jobs = node
    (jobs / "7.start").write_bytes(content)
    assert ingest(store, jobs, "c", "t1") == []
    assert store.jobs() == []
    (kept,) = (jobs / "bad").iterdir()
    assert kept.name.startswith("7.start.") and kept.read_bytes() == content
    problems = (jobs.parent / "problems.log").read_text()
    assert "bad job registration 7.start" in problems


def test_flags_reach_the_store_as_json(node):
    store, jobs = node
    hook_file(jobs, "7.start", env_records(""))
    ingest(store, jobs, "c", "t1")
    (flags,) = store.query("SELECT flags FROM jobs")[0]
    assert json.loads(flags) == ["time_from_mtime"]
