"""The attribution policies of issue 13: exclusive, hybrid (idle by allocation + use), use,
allocation; the exact invariant for every policy; the idle learner; allocations read from
job cgroups; the policy recorded with the job."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem.model import REMAINDER_LABELS, EnergyRow, Interval, JobRecord
from llem.node.attribution import POLICIES, JobAttributor, JobLoad, NodeLoad, attribute, static_uj
from llem.node.idle import MIN_SAMPLES, IdleLearner, IdlePower, quantile
from llem.node.store import NodeStore
from llem.node.usage import CgroupLocator, cgroup_allocation, parse_cpu_list
from llem.sensors.base import Device

PKG = Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter")
DRAM = Device("rapl:dram-0", "dram", "dram-0", "rapl", "measured", "counter")
GPU = Device("nvml:GPU-a", "gpu", "gpu0", "nvml", "measured", "counter", attrs={"minor": 0})
PSYS = Device("rapl:psys", "psys", "psys", "rapl", "measured", "counter")
DEVICES = {d.key: d for d in (PKG, DRAM, GPU, PSYS)}
SECOND = 10**9
GiB = 2**30


def row(key, uj):
    return EnergyRow(key, uj, "ok", "ok", uj)


def charged(shares):
    out = {}
    for s in shares:
        out[(s.run_id, s.device_key, s.method)] = (
            out.get((s.run_id, s.device_key, s.method), 0) + s.energy_uj
        )
    return out


def test_idle_job_on_a_shared_node_is_charged_its_reservation_under_hybrid():
    # 10 s of a 40 W package (400 J) with 30 W idle: 300 J static, 100 J dynamic. Two 1-CPU
    # jobs on a 4-CPU node: each gets 75 J of the static part; the busy one (all the busy
    # CPU time) also the 100 J dynamic; the two unallocated CPUs' 150 J stay with the node,
    # labelled idle_unallocated.
    jobs = [JobLoad(1, cpu_ns=10 * SECOND, alloc_cpus=1), JobLoad(2, cpu_ns=0, alloc_cpus=1)]
    node = NodeLoad(busy_cpu_ns=10 * SECOND, cpus=4)
    shares, rest = attribute(
        [row(PKG.key, 400_000_000)],
        DEVICES,
        jobs,
        node,
        policy="hybrid",
        idle_mw={PKG.key: 30_000},
        interval_ns=10 * SECOND,
    )
    assert charged(shares) == {
        (1, PKG.key, "idle_allocation"): 75_000_000,
        (1, PKG.key, "cpu_time"): 100_000_000,
        (2, PKG.key, "idle_allocation"): 75_000_000,
    }
    assert rest == [(PKG.key, 150_000_000, "idle_unallocated")]


def test_use_policy_is_todays_rule_and_leaves_the_idle_job_nothing():
    jobs = [JobLoad(1, cpu_ns=10 * SECOND, alloc_cpus=1), JobLoad(2, cpu_ns=0, alloc_cpus=1)]
    shares, rest = attribute(
        [row(PKG.key, 400)],
        DEVICES,
        jobs,
        NodeLoad(busy_cpu_ns=10 * SECOND, cpus=4),
        policy="use",
        idle_mw={PKG.key: 30_000},
        interval_ns=10 * SECOND,
    )
    assert charged(shares) == {(1, PKG.key, "cpu_time"): 400}
    assert rest == []


def test_allocation_policy_splits_by_cpus_and_memory():
    jobs = [
        JobLoad(1, alloc_cpus=3, alloc_memory_bytes=GiB),
        JobLoad(2, alloc_cpus=1, alloc_memory_bytes=3 * GiB),
    ]
    shares, rest = attribute(
        [row(PKG.key, 800), row(DRAM.key, 80)],
        DEVICES,
        jobs,
        NodeLoad(cpus=8, memory_bytes=8 * GiB),
        policy="allocation",
    )
    assert charged(shares) == {
        (1, PKG.key, "cpu_allocation"): 300,
        (2, PKG.key, "cpu_allocation"): 100,
        (1, DRAM.key, "memory_allocation"): 10,
        (2, DRAM.key, "memory_allocation"): 30,
    }
    assert rest == [(PKG.key, 400, "unallocated"), (DRAM.key, 40, "unallocated")]


def test_exclusive_job_takes_every_device_of_the_node():
    rows = [row(PKG.key, 400), row(DRAM.key, 40), row(GPU.key, 1000), row(PSYS.key, 50)]
    shares, rest = attribute(
        rows,
        DEVICES,
        [JobLoad(7, cpu_ns=0, alloc_cpus=4, exclusive=True)],
        NodeLoad(busy_cpu_ns=SECOND, cpus=4),
        policy="hybrid",
    )
    assert charged(shares) == {
        (7, k, "exclusive"): uj for k, uj in ((PKG.key, 400), (DRAM.key, 40), (GPU.key, 1000))
    }
    # psys (a whole-node meter, or RAPL's platform domain) overlaps the parts: never added,
    # so it stays in the remainder under an exclusive job too.
    assert rest == [(PSYS.key, 50, "unattributed")]


def test_unknown_allocation_falls_back_to_use():
    jobs = [JobLoad(1, cpu_ns=SECOND, alloc_cpus=None), JobLoad(2, cpu_ns=0, alloc_cpus=1)]
    shares, rest = attribute(
        [row(PKG.key, 100)],
        DEVICES,
        jobs,
        NodeLoad(busy_cpu_ns=SECOND, cpus=4),
        policy="hybrid",
        idle_mw={PKG.key: 10_000},
        interval_ns=SECOND,
    )
    assert charged(shares) == {(1, PKG.key, "cpu_time"): 100}


def test_static_part_never_exceeds_the_interval_energy():
    assert static_uj(50_000, SECOND, 20_000_000) == 20_000_000  # 50 W idle, 20 J measured
    assert static_uj(10_000, SECOND, 20_000_000) == 10_000_000
    assert static_uj(None, SECOND, 5) == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        attribute([], DEVICES, [], NodeLoad(), policy="fair")


job_loads = st.lists(
    st.builds(
        JobLoad,
        run_id=st.integers(1, 10**6),
        gpus=st.sampled_from([(), (GPU.key,)]),
        cpu_ns=st.none() | st.integers(-5, 10**12),
        memory_bytes=st.none() | st.integers(0, 10**12),
        alloc_cpus=st.sampled_from([None, 1, 2, 4, 64]) | st.integers(0, 256),
        alloc_memory_bytes=st.sampled_from([None, GiB]) | st.integers(0, 10**12),
        exclusive=st.sampled_from([False] * 5 + [True]),
    ),
    max_size=6,
    unique_by=lambda j: j.run_id,
)


@settings(max_examples=600, deadline=None)
@given(
    energies=st.fixed_dictionaries({k: st.integers(0, 10**13) for k in DEVICES}),
    jobs=job_loads,
    node=st.builds(
        NodeLoad,
        busy_cpu_ns=st.none() | st.integers(0, 10**12),
        used_memory_bytes=st.none() | st.integers(0, 10**12),
        cpus=st.sampled_from([None, 2, 64]) | st.integers(0, 256),
        memory_bytes=st.none() | st.integers(0, 10**12),
    ),
    policy=st.sampled_from(POLICIES),
    idle=st.dictionaries(st.sampled_from(sorted(DEVICES)), st.integers(0, 10**7)),
    interval_ns=st.integers(0, 60 * SECOND),
)
def test_invariant_is_exact_for_every_policy(energies, jobs, node, policy, idle, interval_ns):
    rows = [row(k, uj) for k, uj in energies.items()]
    shares, rest = attribute(
        rows, DEVICES, jobs, node, policy=policy, idle_mw=idle, interval_ns=interval_ns
    )
    for key, uj in energies.items():
        parts = [s.energy_uj for s in shares if s.device_key == key]
        assert all(p >= 0 for p in parts)
        assert sum(parts) + sum(r.energy_uj for r in rest if r.device_key == key) == uj
        assert all(0 <= s.share <= 1 for s in shares)
    assert all(r.energy_uj > 0 and r.label in REMAINDER_LABELS for r in rest)
    assert len({(r.device_key, r.label) for r in rest}) == len(rest)  # the store's key
    labels = {r.label for r in rest}
    if any(j.exclusive for j in jobs):
        assert {s.method for s in shares} <= {"exclusive"}
        assert labels <= {"unattributed"}
    if policy != "allocation":
        assert "unallocated" not in labels
    if policy != "hybrid":
        assert "idle_unallocated" not in labels
    # Under hybrid, the idle_unallocated part of a package or DRAM is exactly its static part
    # less what the jobs' allocations took of it.
    for r in rest:
        if r.label == "idle_unallocated":
            static = static_uj(idle.get(r.device_key), interval_ns, energies[r.device_key])
            took = sum(
                s.energy_uj
                for s in shares
                if s.device_key == r.device_key and s.method == "idle_allocation"
            )
            assert r.energy_uj == static - took


def test_quantile_is_low_and_ignores_one_odd_reading():
    assert quantile([100] * 9 + [1], 0.1) == 100
    assert quantile([5, 1, 3], 0.0) == 1


def _idle_rows(mw, seconds=1):
    return [row(PKG.key, mw * seconds * 1000)]


def test_idle_power_is_learned_while_no_job_runs_and_kept_across_restarts(tmp_path):
    store = NodeStore(tmp_path / "node.db")
    learner = IdleLearner([PKG, DRAM], store)
    assert learner.resolve() == {}  # nothing known: no static part
    for i in range(MIN_SAMPLES * 3):
        learner.observe(_idle_rows(20_000 + (i % 5) * 1000), SECOND, i, jobs_running=False)
        learner.observe(_idle_rows(90_000), SECOND, i, jobs_running=True)  # jobs: ignored
    got = learner.resolve()[PKG.key]
    assert got.source == "learned" and got.samples == MIN_SAMPLES * 3
    assert 20_000 <= got.power_mw <= 21_000
    store.close()
    again = IdleLearner([PKG, DRAM], NodeStore(tmp_path / "node.db"))
    assert again.resolve()[PKG.key] == IdlePower(got.power_mw, "learned", MIN_SAMPLES * 3)


def test_configured_idle_power_wins_and_the_model_is_the_last_resort():
    estimated = Device(
        "estimate:package-0",
        "cpu",
        "package-0",
        "estimate",
        "estimated",
        "model",
        attrs={"tdp_w": 100.0, "idle_fraction": 0.3},
    )
    learner = IdleLearner([PKG, DRAM, estimated], None, {"cpu": 25, DRAM.key: 2.5})
    got = learner.resolve()
    assert got[PKG.key] == IdlePower(25_000, "config")
    assert got[DRAM.key] == IdlePower(2_500, "config")
    got = IdleLearner([estimated, DRAM]).resolve()
    assert got == {estimated.key: IdlePower(30_000, "model")}
    # A measured package: the model's TDP of this CPU, never its plausibility bound.
    bounded = Device(PKG.key, "cpu", "package-0", "rapl", "measured", "counter", max_power_w=1000.0)
    assert IdleLearner([bounded]).resolve() == {}
    assert IdleLearner([bounded], tdp_w=200.0).resolve() == {PKG.key: IdlePower(60_000, "model")}


def test_cpu_lists_and_cgroup_allocations_v1_and_v2(tmp_path):
    assert parse_cpu_list("0-3,8,10-11\n") == 7
    assert parse_cpu_list("") is None and parse_cpu_list("x") is None
    root = tmp_path / "cg"
    job = root / "cpuacct" / "slurm_n1" / "uid_1000" / "job_5"
    job.mkdir(parents=True)
    (job / "cpuacct.usage").write_text("0\n")
    cpuset = root / "cpuset" / "slurm_n1" / "uid_1000" / "job_5"
    cpuset.mkdir(parents=True)
    (cpuset / "cpuset.effective_cpus").write_text("2-3\n")
    mem = root / "memory" / "slurm_n1" / "uid_1000" / "job_5"
    mem.mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text(str(4 * GiB))
    assert cgroup_allocation(CgroupLocator(root), "5", 1000, "n1") == (2, 4 * GiB)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert cgroup_allocation(CgroupLocator(root), "5", 1000, "n1") == (2, None)
    v2 = root / "system.slice" / "slurmstepd.scope" / "job_6"
    v2.mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 5\n")
    (v2 / "cpuset.cpus.effective").write_text("0-15\n")
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_allocation(CgroupLocator(root), "6", None, "n1") == (16, None)
    (v2 / "memory.max").write_text(f"{GiB}\n")
    assert cgroup_allocation(CgroupLocator(root), "6", None, "n1") == (16, GiB)
    assert cgroup_allocation(CgroupLocator(root), "7", None, "n1") == (None, None)


def _proc(tmp_path, cpus=4):
    proc = tmp_path / "proc"
    proc.mkdir()
    lines = ["cpu  100 0 100 1000 0 0 0 0 0 0"]
    lines += [f"cpu{i} 25 0 25 250 0 0 0 0 0 0" for i in range(cpus)]
    (proc / "stat").write_text("\n".join(lines) + "\n")
    (proc / "meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
    return proc


def _interval(start_s, end_s, uj):
    return Interval("s", start_s * SECOND, end_s * SECOND, 0, 0, (row(PKG.key, uj),))


def test_the_attributor_charges_an_exclusive_job_everything_and_records_the_policy(tmp_path):
    store = NodeStore(tmp_path / "node.db")
    store.register_devices([PKG], 0)
    run = store.add_job(JobRecord("9", "c", "n1", start_ns=SECOND, cpus=4))
    attributor = JobAttributor(
        store,
        "n1",
        [PKG],
        0,
        proc_root=_proc(tmp_path),
        cgroup_root=str(tmp_path / "cg"),
        policy="hybrid",
    )
    out = attributor(_interval(1, 2, 40_000_000))
    assert [(s.run_id, s.energy_uj, s.method) for s in out.shares] == [
        (run, 40_000_000, "exclusive")
    ]
    record = json.loads(store.run(run).attribution)
    assert record["policy"] == "exclusive" and record["cpus"] == 4 and record["node_cpus"] == 4


def test_the_attributor_records_hybrid_idle_powers_and_flags_unknown_allocations(tmp_path):
    store = NodeStore(tmp_path / "node.db")
    store.register_devices([PKG], 0)
    known = store.add_job(JobRecord("10", "c", "n1", start_ns=SECOND, cpus=1))
    unknown = store.add_job(JobRecord("11", "c", "n1", start_ns=SECOND))
    attributor = JobAttributor(
        store,
        "n1",
        [PKG],
        0,
        proc_root=_proc(tmp_path),
        cgroup_root=str(tmp_path / "cg"),
        policy="hybrid",
        idle=IdleLearner([PKG], store, {"cpu": 30}),
    )
    attributor(_interval(1, 2, 40_000_000))
    record = json.loads(store.run(known).attribution)
    assert record["policy"] == "hybrid" and record["allocation_unknown"] is False
    assert record["idle_w"] == {PKG.key: {"w": 30.0, "source": "config", "samples": 0}}
    assert json.loads(store.run(unknown).attribution)["allocation_unknown"] is True


def test_the_policy_travels_from_the_node_store_to_llem_acct(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from llem import slices
    from llem.cli.acct import acct
    from llem.cluster.ledger import Ledger, digest
    from llem.node.export import export_job
    from tests.helpers.nodes import build_store, node_config

    items = []
    for i, (node, policy) in enumerate((("n1", "exclusive"), ("n2", "hybrid"))):
        store, run_id = build_store(tmp_path / node / "node.db", node=node, job_id="77")
        record = {
            "policy": policy,
            "idle_w": {PKG.key: {"w": 30.0, "source": "learned", "samples": 40}},
        }
        store.update_job(run_id, attribution=json.dumps(record))
        data = export_job(store, run_id, node_config(tmp_path, node), now_ns=10**18 + i)
        store.close()
        assert data["job"]["attribution"] == record
        items.append((data, digest(slices.encode(data))))
    bad = dict(items[0][0], job=dict(items[0][0]["job"], attribution={"policy": "free"}))
    with pytest.raises(slices.SliceError, match="attribution"):
        slices.validate(bad)
    ledger_path = tmp_path / "ledger.db"
    with Ledger(ledger_path) as ledger:
        ledger.merge(items, now_ns=10**18 + 5, grace_s=0)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"ledger: {ledger_path}\n")
    monkeypatch.setenv("LLEM_CONFIG", str(cfg))
    result = CliRunner().invoke(
        acct, ["-a", "-S", "2000-01-01", "-X", "-P", "-n", "-o", "JobID,Attribution"]
    )
    assert result.output == "77|exclusive,hybrid\n", result.output
