from hypothesis import given, settings
from hypothesis import strategies as st

from llem.model import EnergyRow
from llem.node.attribution import JobLoad, NodeLoad, attribute
from llem.sensors.base import Device

DEVICES = {
    "rapl:package-0": Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter"),
    "rapl:package-1": Device("rapl:package-1", "cpu", "package-1", "rapl", "measured", "counter"),
    "rapl:dram-0": Device("rapl:dram-0", "dram", "dram-0", "rapl", "measured", "counter"),
    "nvml:GPU-a": Device("nvml:GPU-a", "gpu", "gpu0", "nvml", "measured", "counter"),
    "nvml:GPU-b": Device("nvml:GPU-b", "gpu", "gpu1", "nvml", "measured", "counter"),
    "estimate:dram": Device("estimate:dram", "dram", "dram", "estimate", "estimated", "model"),
}


def row(key, uj):
    return EnergyRow(key, uj, "ok", "ok", uj)


def by(shares):
    return {(s.run_id, s.device_key): (s.energy_uj, s.method) for s in shares}


def test_gpu_goes_to_its_job_and_unallocated_gpu_to_the_remainder():
    shares, rest = attribute(
        [row("nvml:GPU-a", 1000), row("nvml:GPU-b", 300)],
        DEVICES,
        [JobLoad(1, gpus=("nvml:GPU-a",))],
        NodeLoad(),
    )
    assert by(shares) == {(1, "nvml:GPU-a"): (1000, "gpu_allocation")}
    assert rest == [("nvml:GPU-b", 300, "unattributed")]


def test_shared_gpu_split_equally():
    shares, rest = attribute(
        [row("nvml:GPU-a", 1001)],
        DEVICES,
        [JobLoad(1, gpus=("nvml:GPU-a",)), JobLoad(2, gpus=("nvml:GPU-a",))],
        NodeLoad(),
    )
    assert by(shares) == {
        (1, "nvml:GPU-a"): (500, "gpu_shared"),
        (2, "nvml:GPU-a"): (500, "gpu_shared"),
    }
    assert rest == [("nvml:GPU-a", 1, "unattributed")]


def test_cpu_split_by_cpu_time_over_node_busy_time():
    shares, rest = attribute(
        [row("rapl:package-0", 10_000)],
        DEVICES,
        [JobLoad(1, cpu_ns=3_000), JobLoad(2, cpu_ns=1_000)],
        NodeLoad(busy_cpu_ns=5_000),
    )
    assert by(shares) == {
        (1, "rapl:package-0"): (6000, "cpu_time"),
        (2, "rapl:package-0"): (2000, "cpu_time"),
    }
    assert rest == [
        ("rapl:package-0", 2000, "unattributed")
    ]  # the busy time of processes outside jobs


def test_idle_node_energy_is_remainder():
    shares, rest = attribute(
        [row("rapl:package-0", 500)], DEVICES, [JobLoad(1, cpu_ns=0)], NodeLoad(busy_cpu_ns=0)
    )
    assert shares == [] and rest == [("rapl:package-0", 500, "unattributed")]


def test_jobs_never_get_more_than_everything_when_accounting_disagrees():
    shares, rest = attribute(
        [row("rapl:package-0", 900)],
        DEVICES,
        [JobLoad(1, cpu_ns=600), JobLoad(2, cpu_ns=300)],
        NodeLoad(busy_cpu_ns=500),
    )
    assert sum(s.energy_uj for s in shares) == 900 and rest == []


def test_dram_by_memory_share_measured_or_estimated():
    for key in ("rapl:dram-0", "estimate:dram"):
        shares, rest = attribute(
            [row(key, 1000)],
            DEVICES,
            [JobLoad(1, memory_bytes=2 * 2**30)],
            NodeLoad(used_memory_bytes=8 * 2**30),
        )
        assert by(shares) == {(1, key): (250, "memory_share")}
        assert rest == [(key, 750, "unattributed")]


def test_no_jobs_everything_is_remainder():
    rows = [row(k, 77) for k in DEVICES]
    shares, rest = attribute(rows, DEVICES, [], NodeLoad(busy_cpu_ns=10, used_memory_bytes=10))
    assert shares == [] and sorted(rest) == sorted((k, 77, "unattributed") for k in DEVICES)


@settings(max_examples=400, deadline=None)
@given(
    energies=st.lists(
        st.integers(min_value=0, max_value=10**12), min_size=len(DEVICES), max_size=len(DEVICES)
    ),
    jobs=st.lists(
        st.tuples(
            st.integers(0, 10**12),
            st.integers(0, 10**12),
            st.sets(st.sampled_from(["nvml:GPU-a", "nvml:GPU-b"])),
        ),
        max_size=6,
    ),
    busy=st.one_of(st.none(), st.integers(0, 10**13)),
    mem=st.one_of(st.none(), st.integers(0, 10**13)),
)
def test_invariant_shares_plus_remainder_equal_the_node_energy(energies, jobs, busy, mem):
    rows = [row(k, e) for k, e in zip(DEVICES, energies)]
    loads = [JobLoad(i + 1, tuple(sorted(g)), c, m) for i, (c, m, g) in enumerate(jobs)]
    shares, rest = attribute(rows, DEVICES, loads, NodeLoad(busy, mem))
    for r in rows:
        got = sum(s.energy_uj for s in shares if s.device_key == r.device_key)
        left = sum(uj for k, uj, _ in rest if k == r.device_key)
        assert got + left == r.energy_uj
        assert all(s.energy_uj >= 0 and 0 <= s.share <= 1 for s in shares)
