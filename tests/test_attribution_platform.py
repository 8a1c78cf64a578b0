"""The platform residual's attribution: static power by allocation, and the invariant."""

from hypothesis import given, settings
from hypothesis import strategies as st

from llem.model import EnergyRow
from llem.node.attribution import (
    PLATFORM_ALLOCATION,
    PLATFORM_CPU_TIME,
    JobLoad,
    NodeLoad,
    attribute,
)
from llem.sensors.base import Device

DEVICES = {
    "pm_counters:node": Device(
        "pm_counters:node",
        "psys",
        "node",
        "pm_counters",
        "measured",
        "counter",
        attrs={"meter": "node"},
    ),
    "pm_counters:cpu": Device(
        "pm_counters:cpu", "cpu", "cpu", "pm_counters", "measured", "counter"
    ),
    "pm_counters:memory": Device(
        "pm_counters:memory", "dram", "memory", "pm_counters", "measured", "counter"
    ),
    "pm_counters:accel0": Device(
        "pm_counters:accel0", "gpu", "accel0", "pm_counters", "measured", "counter"
    ),
    "platform:node": Device(
        "platform:node", "platform", "platform", "platform", "measured", "residual"
    ),
}


def row(key, uj):
    return EnergyRow(key, uj, "ok", "ok", None)


def by(shares):
    return {(s.run_id, s.device_key): (s.energy_uj, s.method) for s in shares}


def test_platform_by_allocated_cpus_unallocated_part_to_the_remainder():
    jobs = [JobLoad(1, alloc_cpus=16, cpu_ns=1), JobLoad(2, alloc_cpus=32, cpu_ns=10**9)]
    shares, rest = attribute([row("platform:node", 1280)], DEVICES, jobs, NodeLoad(cpus=128))
    assert by(shares) == {
        (1, "platform:node"): (160, PLATFORM_ALLOCATION),
        (2, "platform:node"): (320, PLATFORM_ALLOCATION),
    }
    assert rest == [("platform:node", 800, "idle_unallocated")]


def test_an_exclusive_job_carries_the_whole_platform():
    shares, rest = attribute(
        [row("platform:node", 999)], DEVICES, [JobLoad(7, alloc_cpus=128)], NodeLoad(cpus=128)
    )
    assert by(shares) == {(7, "platform:node"): (999, PLATFORM_ALLOCATION)}
    assert rest == []


def test_unknown_allocation_falls_back_to_cpu_time_like_a_package():
    jobs = [JobLoad(1, cpu_ns=300), JobLoad(2, cpu_ns=100, alloc_cpus=4)]
    shares, rest = attribute(
        [row("platform:node", 1000)], DEVICES, jobs, NodeLoad(busy_cpu_ns=500, cpus=8)
    )
    assert by(shares) == {
        (1, "platform:node"): (600, PLATFORM_CPU_TIME),
        (2, "platform:node"): (200, PLATFORM_CPU_TIME),
    }
    assert rest == [("platform:node", 200, "unattributed")]


def test_the_node_meter_is_never_charged_to_jobs():
    shares, rest = attribute(
        [row("pm_counters:node", 5000)],
        DEVICES,
        [JobLoad(1, alloc_cpus=8, cpu_ns=10)],
        NodeLoad(10, 10, 8),
    )
    assert shares == [] and rest == [("pm_counters:node", 5000, "unattributed")]


@settings(max_examples=400, deadline=None)
@given(
    energies=st.lists(
        st.integers(min_value=0, max_value=10**12), min_size=len(DEVICES), max_size=len(DEVICES)
    ),
    jobs=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 10**12)),
            st.one_of(st.none(), st.integers(0, 10**12)),
            st.one_of(st.none(), st.integers(0, 512)),
            st.booleans(),
        ),
        max_size=6,
    ),
    busy=st.one_of(st.none(), st.integers(0, 10**13)),
    mem=st.one_of(st.none(), st.integers(0, 10**13)),
    cpus=st.one_of(st.none(), st.integers(0, 256)),
)
def test_invariant_jobs_plus_remainder_equal_the_node_for_every_device(
    energies, jobs, busy, mem, cpus
):
    rows = [row(k, e) for k, e in zip(DEVICES, energies)]
    loads = [
        JobLoad(i + 1, ("pm_counters:accel0",) if gpu else (), c, m, a)
        for i, (c, m, a, gpu) in enumerate(jobs)
    ]
    shares, rest = attribute(rows, DEVICES, loads, NodeLoad(busy, mem, cpus))
    for r in rows:
        got = sum(s.energy_uj for s in shares if s.device_key == r.device_key)
        left = sum(uj for k, uj, _ in rest if k == r.device_key)
        assert got + left == r.energy_uj
    # The unallocated part of the platform's static power is labelled as such; by CPU time
    # (an allocation unknown), what is left is unattributed.
    platform = {label for k, _, label in rest if k == "platform:node"}
    if cpus and loads and all(j.alloc_cpus is not None for j in loads):
        assert platform <= {"idle_unallocated"}
    else:
        assert platform <= {"unattributed"}
    assert all(s.energy_uj >= 0 and 0 <= s.share <= 1 for s in shares)
    assert not any(s.device_key == "pm_counters:node" for s in shares)


def test_the_node_attributor_knows_the_platform_device_from_the_sensors_devices(tmp_path):
    from llem.node.attribution import JobAttributor

    sensors_devices = [d for k, d in DEVICES.items() if k != "platform:node"]
    attributor = JobAttributor(
        None, "n1", sensors_devices, 0, proc_root=tmp_path, cgroup_root=str(tmp_path)
    )
    assert attributor.devices["platform:node"].component == "platform"
    shares, rest = attribute(
        [row("platform:node", 10)], attributor.devices, [JobLoad(1, alloc_cpus=1)], NodeLoad(cpus=1)
    )
    assert by(shares) == {(1, "platform:node"): (10, PLATFORM_ALLOCATION)}
