"""Per-step energy (issue 19, item 4): each Slurm step's CPU time read from its own cgroup
under the job's by the sampler's real code, the job's energy split by it in the node store,
the steps carried by the job slice, merged into the ledger and listed by llem-acct as sacct
lists them (``J.batch``, ``J.extern``, ``J.0``), hidden by ``-X``.

The cgroup trees are the kernel's layouts (v2 from ``tests.helpers.nodes``, v1 here); the
energy is attributed by ``JobAttributor`` and exported by ``export_job``."""

import copy
import json

import pytest

from llem import slices
from llem.cluster.ledger import SCHEMA_VERSION, Ledger
from llem.node.attribution import MAX_STEPS_PER_JOB, STEPS_CAPPED_FLAG
from llem.node.export import export_job
from llem.node.usage import CgroupLocator
from tests.helpers.acct import acct_run
from tests.helpers.ledger import merge
from tests.helpers.nodes import T0, S, build_store, job_slices, node_config

STEPS = {"batch": 1, "extern": 0, "0": 3}
"""The job's steps and their weights in its CPU time: the batch script a quarter, the srun
step three quarters, the extern step idle."""


def _job_energy(data: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in data["energy"]:
        total[row["device"]] = total.get(row["device"], 0) + row["energy_uj"]
    return total


def _slice(tmp_path, steps=STEPS, **kwargs) -> dict:
    store, run_id = build_store(tmp_path / "node" / "node.db", steps=steps, **kwargs)
    try:
        return export_job(store, run_id, node_config(tmp_path), now_ns=T0 + 10 * 3600 * S)
    finally:
        store.close()


def test_step_cpu_of_a_cgroup_v2_and_v1_tree(tmp_path):
    v2 = tmp_path / "v2"
    job = v2 / "system.slice" / "slurmstepd.scope" / "job_7"
    for name, usec in (("step_batch", 5), ("step_0", 7), ("step_extern", 0)):
        (job / name).mkdir(parents=True)
        (job / name / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec 1\n")
    (job / "cpu.stat").write_text("usage_usec 20\n")
    (job / "step_1").mkdir()  # just made: no counter yet, left out
    (job / "user").mkdir()  # not a step folder
    (job / "step_a b").mkdir()  # not a name Slurm gives: not a step
    (job / "step_a b" / "cpu.stat").write_text("usage_usec 99\n")
    assert CgroupLocator(v2).step_cpu("7", 1000, "n1") == {
        "batch": 5000,
        "0": 7000,
        "extern": 0,
    }
    assert CgroupLocator(v2).step_cpu("8", 1000, "n1") is None  # no job cgroup (yet)

    v1 = tmp_path / "v1"
    job = v1 / "cpuacct" / "slurm_n1" / "uid_1000" / "job_7"
    for name, ns in (("step_batch", 11), ("step_2", 13)):
        (job / name).mkdir(parents=True)
        (job / name / "cpuacct.usage").write_text(f"{ns}\n")
    (job / "cpuacct.usage").write_text("30\n")
    assert CgroupLocator(v1).step_cpu("7", 1000, "n1") == {"batch": 11, "2": 13}


def test_steps_split_the_job_energy_by_cpu_time(tmp_path):
    data = _slice(tmp_path)
    steps = {s["step"]: s for s in data["steps"]}
    assert [s["step"] for s in data["steps"]] == ["batch", "extern", "0"]  # sacct's order
    job = _job_energy(data)
    assert set(steps["0"]["energy"]) == set(job)  # every device, the GPU included
    for device, uj in job.items():
        batch, zero = steps["batch"]["energy"][device], steps["0"]["energy"][device]
        assert batch + zero <= uj
        assert uj - (batch + zero) <= 2 * 60  # floors only: one uJ per interval and step
        assert abs(3 * batch - zero) <= 3 * 60
    assert steps["extern"]["energy"] == {} and steps["extern"]["cpu_ns"] == 0
    assert steps["0"]["cpu_ns"] == 3 * steps["batch"]["cpu_ns"] > 0
    assert steps["batch"]["start_ns"] == data["job"]["start_ns"]
    assert steps["batch"]["end_ns"] == data["job"]["end_ns"]


def test_steps_beyond_the_cap_are_other_and_flagged(tmp_path):
    many = {str(i): 1 for i in range(MAX_STEPS_PER_JOB + 6)}
    data = _slice(tmp_path, steps=many, seconds=300)
    names = [s["step"] for s in data["steps"]]
    assert len(names) == MAX_STEPS_PER_JOB + 1 == slices.MAX_STEPS
    assert names[-1] == "other" and names[:3] == ["0", "1", "2"]
    other = data["steps"][-1]
    assert other["cpu_ns"] == 6 * data["steps"][0]["cpu_ns"]
    assert STEPS_CAPPED_FLAG in data["job"]["flags"]
    job = _job_energy(data)
    for device, uj in job.items():
        assert sum(s["energy"].get(device, 0) for s in data["steps"]) <= uj


def test_a_job_without_step_cgroups_has_no_steps(tmp_path):
    data = _slice(tmp_path, steps=None)
    assert "steps" not in data
    slices.validate(data)


def test_slice_steps_are_checked(tmp_path):
    data = _slice(tmp_path)
    slices.validate(data)
    old = copy.deepcopy(data)
    del old["steps"]  # a slice of an llem without steps still validates
    slices.validate(old)
    for damage, reason in (
        (lambda d: d["steps"][0]["energy"].update({"rapl:package-0": 10**15}), "more than"),
        (lambda d: d["steps"][0].update(step="../x"), "step name"),
        (lambda d: d["steps"].append(d["steps"][0]), "twice"),
        (lambda d: d["steps"][0]["energy"].update({"nope": 1}), "unknown device"),
        (lambda d: d["steps"][0].update(cpu_ns=-1), "cpu_ns"),
        (lambda d: d.update(steps=d["steps"] * 30), "more than 65"),
    ):
        bad = copy.deepcopy(data)
        damage(bad)
        with pytest.raises(slices.SliceError, match=reason):
            slices.validate(bad)


def _acct_ledger(tmp_path, monkeypatch, slices_):
    d = tmp_path / "lib"
    d.mkdir(mode=0o755)
    with Ledger(d / "ledger.db") as ledger:
        merge(ledger, slices_)
        assert ledger.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        rows = ledger.query("SELECT step, energy_uj, energy FROM job_steps ORDER BY step")
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"cluster: c1\nledger: {d / 'ledger.db'}\ncarbon:\n  intensity_g_per_kwh: 300\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    return rows


def test_acct_lists_steps_below_the_job_and_x_hides_them(tmp_path, monkeypatch):
    rows = _acct_ledger(tmp_path, monkeypatch, job_slices(tmp_path, "100", steps=STEPS))
    assert len(rows) == 9  # three steps on three nodes
    assert all(uj == sum(json.loads(e).values()) for _, uj, e in rows)
    fields = "JobID,JobName,NNodes,ConsumedEnergyRaw,EnergySource,State"
    status, out, err = acct_run("-j", "100", "-P", "-o", fields)
    assert status == 0, err
    lines = out.splitlines()
    assert [line.split("|")[0] for line in lines] == [
        "JobID",
        "100",
        "100.batch",
        "100.extern",
        "100.0",
        "100.epoch 1",
    ]
    energy = {line.split("|")[0]: int(line.split("|")[3]) for line in lines[1:]}
    assert energy["100.batch"] + energy["100.extern"] + energy["100.0"] <= energy["100"]
    assert energy["100.0"] > 2 * energy["100.batch"] > 0
    assert lines[2].split("|")[1:] == [
        "batch",
        "3",
        str(energy["100.batch"]),
        "measured",
        "UNKNOWN",
    ]

    status, out, err = acct_run("-j", "100", "-X", "-P", "-o", "JobID")
    assert status == 0, err
    assert out.splitlines() == ["JobID", "100"]

    status, out, err = acct_run("-j", "100.0", "-P", "-n", "-o", "JobID,ConsumedEnergyRaw")
    assert status == 0, err
    # step 0, and the named window that ran in it (``-j J.STEP`` matches a window's step)
    assert out.splitlines() == [f"100.0|{energy['100.0']}", "100.epoch 1|405"]


def test_older_slices_merge_beside_slices_with_steps(tmp_path, monkeypatch):
    old = job_slices(tmp_path, "101")
    assert all("steps" not in d for d in old)
    rows = _acct_ledger(tmp_path, monkeypatch, old + job_slices(tmp_path, "102", steps=STEPS))
    assert len(rows) == 9
    status, out, err = acct_run("-j", "101,102", "-P", "-n", "-o", "JobID")
    assert status == 0, err
    assert out.splitlines() == [
        "101",
        "101.epoch 1",
        "102",
        "102.batch",
        "102.extern",
        "102.0",
        "102.epoch 1",
    ]


def test_a_sampler_restarted_mid_job_counts_steps_from_its_first_reading(tmp_path):
    from tests.helpers.nodes import add_intervals

    start = T0 + 1800 * S
    store, run_id = build_store(
        tmp_path / "node" / "node.db", start_ns=start, seconds=600, end=False, steps=STEPS
    )
    try:
        # a new sampler (started after the job) reads the steps' counters, already high
        add_intervals(store, run_id, start + 900 * S, 600, 60, first_id=100, steps=STEPS)
        per_interval = store.query(
            "SELECT cpu_ns FROM step_use WHERE run_id = ? AND step = 'batch' ORDER BY interval_id",
            (run_id,),
        )
    finally:
        store.close()
    # 60 s x 60 % of the node x a quarter, every interval of both samplers: the second
    # sampler's first reading was a baseline, not 600 s of the step's past
    assert per_interval == [(9 * S,)] * 20


def test_retention_prunes_the_steps_with_their_run(tmp_path):
    store, run_id = build_store(tmp_path / "node" / "node.db", seconds=600, steps=STEPS)
    try:
        store.update_job(run_id, state="exported")
        counts = store.prune(T0 + 100 * 3600 * S)
        assert counts["step_use"] == 3 * 10 and counts["jobs"] == 1
        assert store.query("SELECT COUNT(*) FROM step_use") == [(0,)]
    finally:
        store.close()
