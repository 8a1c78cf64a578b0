"""The node's CPUs for allocation shares (issue 13): Slurm's figure from slurm.conf, in the
units of the job's own (SLURM_JOB_CPUS_PER_NODE), before the kernel's count of logical CPUs.
A node whose slurm.conf counts cores (CPUs=4 on 8 hardware threads) must see a job holding
its 4 CPUs as exclusive, not as half the node."""

import json
import os

from llem.model import EnergyRow, Interval, JobRecord
from llem.node.attribution import JobAttributor
from llem.node.slurm import slurm_conf_node_cpus, slurm_node_cpus
from llem.node.store import NodeStore
from llem.sensors.base import Device

PKG = Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter")
S = 10**9

CONF = """\
# a site's slurm.conf (the parts llem reads)
ClusterName=c
NodeName=DEFAULT Sockets=2 CoresPerSocket=8 ThreadsPerCore=2 RealMemory=1000
NodeName=gpu[01-04] Gres=gpu:4
NodeName=big1 CPUs=128 RealMemory=2000
NodeName=DEFAULT CPUs=4
NodeName=n[1-2],x1 RealMemory=1000  # CPUs=4 from the DEFAULT line before
NodeName=bare RealMemory=1000 Sockets=1
PartitionName=all Nodes=ALL
"""


def test_cpus_from_the_node_line_its_defaults_or_its_topology():
    assert slurm_conf_node_cpus(CONF, "big1") == 128
    assert slurm_conf_node_cpus(CONF, "gpu03") == 2 * 8 * 2  # derived as slurmctld does
    assert slurm_conf_node_cpus(CONF, "n2") == 4 and slurm_conf_node_cpus(CONF, "x1") == 4
    assert slurm_conf_node_cpus(CONF, "nowhere") is None
    assert slurm_conf_node_cpus("NodeName=a RealMemory=10\n", "a") is None  # slurmd counts


def test_a_slurm_conf_others_may_write_is_not_believed(tmp_path):
    path = tmp_path / "slurm.conf"
    path.write_text(CONF)
    path.chmod(0o644)
    assert slurm_node_cpus(path, "big1") == 128
    path.chmod(0o666)
    assert slurm_node_cpus(path, "big1") is None
    assert slurm_node_cpus(None, "big1") is None
    assert slurm_node_cpus(tmp_path / "missing.conf", "big1") is None


def _proc(tmp_path, threads):
    proc = tmp_path / "proc"
    proc.mkdir()
    lines = ["cpu  100 0 100 1000 0 0 0 0 0 0"]
    lines += [f"cpu{i} 25 0 25 250 0 0 0 0 0 0" for i in range(threads)]
    (proc / "stat").write_text("\n".join(lines) + "\n")
    (proc / "meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")
    return proc


def _charge(tmp_path, slurm_conf):
    store = NodeStore(tmp_path / "node.db")
    store.register_devices([PKG], 0)
    run = store.add_job(JobRecord("9", "c", "n1", start_ns=S, cpus=4))
    attributor = JobAttributor(
        store,
        "n1",
        [PKG],
        0,
        proc_root=_proc(tmp_path, threads=8),
        cgroup_root=str(tmp_path / "cg"),
        policy="hybrid",
        slurm_conf=slurm_conf,
    )
    out = attributor(Interval("s", S, 2 * S, 0, 0, (EnergyRow(PKG.key, 40, "ok", "ok", 40),)))
    record = json.loads(store.run(run).attribution)
    store.close()
    return out, record


def test_slurms_cpus_make_a_job_holding_them_all_exclusive(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(CONF)
    os.chmod(conf, 0o644)
    out, record = _charge(tmp_path, conf)
    assert [(s.energy_uj, s.method) for s in out.shares] == [(40, "exclusive")]
    assert record["node_cpus"] == 4 and record["node_cpus_source"] == "slurm.conf"


def test_without_slurms_figure_the_kernels_count_is_used_and_said(tmp_path):
    out, record = _charge(tmp_path, None)
    # 4 of the 8 threads /proc/stat lists: not exclusive.
    assert {s.method for s in out.shares} != {"exclusive"}
    assert record["node_cpus"] == 8 and record["node_cpus_source"] == "/proc/stat"
