"""Work per window through the real node sampler (issue 18): the Python API inside a job,
the window socket's checks on work, the node store, the job slice (``llem.slice/2``: work,
merged ranks, power series), the ledger and ``llem-acct``. The daemon is the real one
(tests/helpers/daemon.py) with fake sensors at the hardware seam."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llem import slices
from llem.cluster.ledger import Ledger, digest
from llem.node.windows import WindowError, close_window, open_window, request
from llem.paths import outbox_dir
from tests.helpers.acct import acct_run
from tests.helpers.daemon import Daemon, slurm_env, wait_for

JOB = "104"


@pytest.fixture
def node(tmp_path):
    running = Daemon(tmp_path, linger_s=600.0)
    yield running
    running.stop()


def running_job(node, job_id: str = JOB) -> None:
    node.node.add_job_cgroup(job_id)
    node.prolog(job_id)
    node.start()
    wait_for(lambda: node.job_intervals(job_id) >= 2, "job energy")


def job_slice(node, job_id: str = JOB) -> dict:
    node.epilog(job_id)
    wait_for(lambda: node.job_state(job_id) == "exported", f"job {job_id} exported")
    found = [
        p
        for d in (Path(node.config.spool_dir), outbox_dir(node.config))
        if d.is_dir()
        for p in d.glob("job.*.json")
    ]
    assert len(found) == 1, found
    return slices.validate(json.loads(found[0].read_bytes()))


def into_ledger(tmp_path, data: dict) -> Path:
    path = tmp_path / "lib" / "ledger.db"
    path.parent.mkdir(mode=0o755)
    with Ledger(path) as ledger:
        ledger.merge([(data, digest(slices.encode(data)))], now_ns=time.time_ns(), grace_s=3600.0)
    return path


API_SCRIPT = """
import json, time
import llem

with llem.window("train", unit="tokens") as w:
    time.sleep(0.6)
    w.add(3000)
    w.add(1000)
with llem.window("eval"):
    time.sleep(0.3)
print(json.dumps(w.result.to_dict()))
"""


def test_python_windows_in_a_job_reach_the_ledger_and_acct_with_work(node, tmp_path, monkeypatch):
    running_job(node)
    env = {
        **slurm_env(JOB),
        "PATH": "/usr/bin:/bin",
        "LLEM_CONFIG": "/dev/null",
        "LLEM_RUN_DIR": node.config.run_dir,
    }
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(API_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["scope"] == "job" and res["window_id"] > 0, res["notes"]
    assert res["work"] == 4000 and res["unit"] == "tokens"
    assert res["energy_j"] > 0 and res["energy_per_unit_j"] == pytest.approx(res["energy_j"] / 4000)
    assert res["per_unit_basis"] == "attributed"  # the daemon's policy is 'use': a share
    stored = node.query("SELECT name, work, unit, status FROM windows ORDER BY id")
    assert stored == [("train", 4000.0, "tokens", "closed"), ("eval", None, None, "closed")]

    data = job_slice(node)
    assert data["schema"] == slices.SCHEMA
    train = next(w for w in data["windows"] if w["name"] == "train")
    assert (train["work"], train["unit"]) == (4000.0, "tokens")
    assert sum(train["energy"].values()) == round(res["energy_j"] * 1e6)
    # The power series holds the job's energy, every joule of it, once.
    power = data["power"]
    assert power["step_s"] == 60 and power["points"]
    assert sum(p["energy_uj"] for p in power["points"]) == sum(
        e["energy_uj"] for e in data["energy"]
    )

    ledger = into_ledger(tmp_path, data)
    monkeypatch.setenv("LLEM_CONFIG", "/dev/null")
    status, out, err = acct_run(
        "--ledger", str(ledger), "-j", JOB, "-P", "-o",
        "JobID,JobName,Work,WorkUnit,EnergyPerWork,WorkBasis,ConsumedEnergy",
    )  # fmt: skip
    assert status == 0, err
    rows = [line.split("|") for line in out.splitlines()[1:]]
    by_id = {row[0]: row for row in rows}
    assert by_id[f"{JOB}.train"][2:4] == ["4000", "tokens"]
    assert float(by_id[f"{JOB}.train"][4]) == pytest.approx(res["energy_per_unit_j"], rel=1e-3)
    assert by_id[f"{JOB}.train"][5] == "attributed"
    assert by_id[f"{JOB}.eval"][2:5] == ["", "", ""]
    assert by_id[JOB][2:4] == ["4000", "tokens"]  # the job: its windows that carry work
    status, out, err = acct_run("--ledger", str(ledger), "-j", JOB, "--totals", "window", "-P")
    assert status == 0, err
    header, *lines = out.splitlines()
    assert header.split("|")[:2] == ["Window", "NJobs"]
    windows = {line.split("|")[0]: dict(zip(header.split("|"), line.split("|"))) for line in lines}
    assert set(windows) == {"eval", "train"}
    assert windows["train"]["Work"] == "4000" and windows["train"]["NJobs"] == "1"


def test_wrap_in_a_job_sends_its_work_with_the_window(node):
    running_job(node)
    env = {
        **slurm_env(JOB),
        "PATH": "/usr/bin:/bin",
        "LLEM_CONFIG": "/dev/null",
        "LLEM_RUN_DIR": node.config.run_dir,
    }
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "wrap", "--json", "--name", "eval",
         "--work", "500", "--unit", "samples", "--", "sleep", "0.5"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["scope"] == "job" and (res["work"], res["unit"]) == (500, "samples")
    assert res["per_unit_basis"] == "attributed" and res["coverage"] is not None
    assert node.query("SELECT name, work, unit FROM windows") == [("eval", 500.0, "samples")]
    assert "per sample (the job's share, attributed)" in r.stderr


def test_overlapping_windows_of_ranks_count_the_energy_once_and_add_the_work(node):
    running_job(node)
    env = slurm_env(JOB)
    a = open_window(node.paths.socket, env, "step")
    b = open_window(node.paths.socket, env, "step")
    wait_for(lambda: node.job_intervals(JOB) >= 6, "more job energy")
    ca = close_window(node.paths.socket, env, a["window_id"], 100, "samples")
    cb = close_window(node.paths.socket, env, b["window_id"], 60, "samples")
    alone = open_window(node.paths.socket, env, "step")  # after both: not merged with them
    close_window(node.paths.socket, env, alone["window_id"], 5, "samples")
    data = job_slice(node)
    steps = [w for w in data["windows"] if w["name"] == "step"]
    assert len(steps) == 2
    merged = next(w for w in steps if w.get("merged"))
    assert merged["merged"] == 2 and merged["work"] == 160
    # The energy of the union of the two spans: no more than the longer's plus the rest.
    union = sum(merged["energy"].values())
    assert max(sum(ca["energy_uj"].values()), sum(cb["energy_uj"].values())) <= union
    assert union < sum(ca["energy_uj"].values()) + sum(cb["energy_uj"].values())
    other = next(w for w in steps if not w.get("merged"))
    assert other["work"] == 5


@pytest.mark.parametrize(
    ("work", "unit", "why"),
    [
        (-1, "tokens", "work must be a count"),
        (float("nan"), "tokens", "work must be a count"),
        (1e19, "tokens", "work must be a count"),
        (True, "tokens", "work must be a count"),
        (10, "x" * 33, "unit of work must be a word"),
        (10, "tok\nens", "unit of work must be a word"),
        (10, 7, "unit of work must be a word"),
    ],
)
def test_the_socket_refuses_bad_work_and_keeps_the_window_open(node, work, unit, why):
    running_job(node)
    env = slurm_env(JOB)
    opened = open_window(node.paths.socket, env, "w")
    message = {"op": "close", "job_id": JOB, "window_id": opened["window_id"]}
    message.update(work=work, unit=unit)
    with pytest.raises(WindowError, match=why):
        request(node.paths.socket, message)  # the raw request: the client checks it too
    assert node.query("SELECT status, work FROM windows") == [("open", None)]
    closed = close_window(node.paths.socket, env, opened["window_id"], 2, "samples")
    assert (closed["work"], closed["unit"]) == (2.0, "samples")


def _as_version_1(data: dict) -> dict:
    """The slice as llem wrote it before issue 18 (``llem.slice/1``: no work, no power)."""
    old = json.loads(json.dumps(data))
    old["schema"] = "llem.slice/1"
    old.pop("power", None)
    for w in old.get("windows", []):
        for key in ("work", "unit", "merged"):
            w.pop(key, None)
    return old


def test_a_ledger_before_work_is_read_as_it_is_then_migrated_and_v1_slices_still_merge(
    tmp_path, monkeypatch
):
    from tests.helpers.ledger import merge
    from tests.helpers.nodes import job_slices

    old, new = job_slices(tmp_path, "100", nodes=("n1",)), job_slices(tmp_path, "101", ("n1",))
    path = tmp_path / "lib" / "ledger.db"
    path.parent.mkdir(mode=0o755)
    with Ledger(path) as ledger:
        merge(ledger, [_as_version_1(old[0])])
    # The ledger as llem left it before migration _v4_work_and_power.
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE job_power; ALTER TABLE windows DROP COLUMN work; "
        "ALTER TABLE windows DROP COLUMN unit; PRAGMA user_version = 3"
    )
    db.close()
    monkeypatch.setenv("LLEM_CONFIG", "/dev/null")
    fields = "JobID,Work,WorkUnit,EnergyPerWork"
    status, out, err = acct_run("--ledger", str(path), "-M", "c1", "-j", "100", "-P", "-o", fields)
    assert status == 0, err  # read as it is: windows without work
    assert out.splitlines()[1:] == ["100|||", "100.epoch 1|||"]
    with Ledger(path) as ledger:  # the next writer migrates
        merge(ledger, new)
        ((job_id, points),) = ledger.query(
            "SELECT jn.job_id, jp.points FROM job_power jp JOIN job_nodes jn "
            "ON jn.id = jp.job_node_id"
        )  # none for the version 1 slice
        assert job_id == "101" and len(json.loads(points)) == 180
        assert ledger.query("SELECT work FROM windows") == [(None,), (None,)]
    status, out, err = acct_run("--ledger", str(path), "-M", "c1", "-j", "101", "-P", "-o", fields)
    assert status == 0, err
