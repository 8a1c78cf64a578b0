"""Attribution without job cgroups (``proctrack/linuxproc``): only facts a user cannot forge.

The /proc tree is a fake at the real interface (``stat``, ``status``, ``cmdline``, ``environ``
under a temp dir), read by the real :class:`~llem.node.usage.ProcScanner` and, end to end, by
the daemon's :class:`~llem.node.attribution.JobAttributor` writing to a real node store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llem.model import EnergyRow, Interval, JobRecord
from llem.node.attribution import PROC_TREE_FLAG, JobAttributor
from llem.node.store import NodeStore
from llem.node.usage import CLK_TCK, ProcScanner
from llem.sensors.base import Device

ALICE, BOB = 1000, 2000
NS_PER_TICK = 1_000_000_000 // CLK_TCK
PAGE = os.sysconf("SC_PAGE_SIZE")


class FakeProc:
    """A /proc tree: processes with a parent, a uid, CPU ticks, a title and an environment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.busy_ticks = 0
        self.set_node_busy(0)
        (root / "meminfo").write_text("MemTotal: 8388608 kB\nMemAvailable: 4194304 kB\n")

    def set_node_busy(self, ticks: int) -> None:
        self.busy_ticks = ticks
        (self.root / "stat").write_text(f"cpu  {ticks} 0 0 1000 0 0 0 0 0 0\n")

    def add(
        self,
        pid: int,
        ppid: int,
        uid: int,
        ticks: int = 0,
        *,
        title: str = "",
        env: dict | None = None,
        rss_pages: int = 10,
        comm: str = "proc",
    ) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        self.set_ticks(pid, ppid, ticks, rss_pages, comm)
        (d / "status").write_text(
            f"Name:\t{comm}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )
        (d / "cmdline").write_bytes(
            title.encode().replace(b" ", b"\0") + b"\0"
            if title and not title.startswith("slurmstepd:")
            else title.encode()
        )
        env = env or {}
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))

    def set_ticks(
        self, pid: int, ppid: int, ticks: int, rss_pages: int = 10, comm: str = "proc"
    ) -> None:
        # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime cutime cstime priority nice threads itreal starttime vsize rss
        fields = [
            "S",
            ppid,
            pid,
            pid,
            0,
            -1,
            0,
            0,
            0,
            0,
            0,
            ticks,
            0,
            0,
            0,
            20,
            0,
            1,
            0,
            pid * 7,
            0,
            rss_pages,
        ]
        (self.root / str(pid) / "stat").write_text(
            f"{pid} ({comm}) " + " ".join(map(str, fields)) + "\n"
        )


def cluster_node(root: Path) -> FakeProc:
    """Alice's job 100 and Bob's job 200 on one node, and Bob's attack on Alice's job.

    * 10 ``slurmstepd: [100.batch]`` (root) -> 11 bash (alice, 100 ticks) -> 12 python
      (alice, 500 ticks) -> 13 a root helper the job started (setuid, 50 ticks);
    * 30 ``slurmstepd: [200.batch]`` (root) -> 31 bash (bob, 70 ticks);
    * Bob's attack: 40 a busy loop outside any job, started with ``SLURM_JOB_ID=100``
      (9000 ticks), and 41 a process of his that calls itself ``slurmstepd: [100.0]``
      (uid bob) -> 42 another busy loop (8000 ticks).
    """
    proc = FakeProc(root)
    proc.add(1, 0, 0, title="/sbin/init", comm="systemd")
    proc.add(10, 1, 0, 3, title="slurmstepd: [100.batch]", comm="slurmstepd")
    proc.add(
        11,
        10,
        ALICE,
        100,
        title="/bin/bash /var/spool/slurmd/job00100/slurm_script",
        env={"SLURM_JOB_ID": "100"},
        comm="bash",
    )
    proc.add(
        12,
        11,
        ALICE,
        500,
        title="python train.py",
        env={"SLURM_JOB_ID": "100"},
        rss_pages=1000,
        comm="python",
    )
    proc.add(13, 12, 0, 50, title="/usr/bin/sudo-helper", comm="helper")
    proc.add(30, 1, 0, 2, title="slurmstepd: [200.batch]", comm="slurmstepd")
    proc.add(31, 30, BOB, 70, title="/bin/bash script", env={"SLURM_JOB_ID": "200"}, comm="bash")
    proc.add(40, 1, BOB, 9000, title="busy-loop", env={"SLURM_JOB_ID": "100"}, comm="busy")
    proc.add(41, 1, BOB, 1, title="slurmstepd: [100.0]", comm="slurmstepd")
    proc.add(42, 41, BOB, 8000, title="busy-loop", env={"SLURM_JOB_ID": "100"}, comm="busy")
    return proc


def test_a_forged_slurm_job_id_or_title_gets_no_credit(tmp_path):
    cluster_node(tmp_path / "proc")
    usage = ProcScanner(tmp_path / "proc").usage_by_job({"100": ALICE, "200": BOB})
    # Alice: bash and python only (not Bob's 9000 + 8000 ticks, not the root helper).
    assert usage["100"].cpu_ns == (100 + 500) * NS_PER_TICK
    assert usage["100"].memory_bytes == (10 + 1000) * PAGE
    assert usage["100"].source == "proc-tree"
    # Bob's job gets what ran in it, no more.
    assert usage["200"].cpu_ns == 70 * NS_PER_TICK


def test_descendants_of_the_step_count_and_what_leaves_the_tree_does_not(tmp_path):
    proc = cluster_node(tmp_path / "proc")
    # srun step 0 of job 100, with a grandchild; and a daemon that double-forked away.
    proc.add(50, 1, 0, 1, title="slurmstepd: [100.0]", comm="slurmstepd")
    proc.add(51, 50, ALICE, 30, title="python worker.py", comm="python")
    proc.add(52, 51, ALICE, 20, title="python worker.py", comm="python")
    proc.add(60, 1, ALICE, 999, title="nohup server", env={"SLURM_JOB_ID": "100"})
    usage = ProcScanner(proc.root).usage_by_job({"100": ALICE})
    assert usage["100"].cpu_ns == (100 + 500 + 30 + 20) * NS_PER_TICK


def test_a_job_without_slurmstepd_yet_has_nothing_and_the_title_is_read_again(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(1, 0, 0, title="/sbin/init")
    proc.add(10, 1, 0, 1, title="/usr/sbin/slurmstepd", comm="slurmstepd")
    proc.add(11, 10, ALICE, 40, title="bash", comm="bash")
    scanner = ProcScanner(proc.root)
    assert scanner.usage_by_job({"100": ALICE})["100"].cpu_ns == 0
    # slurmstepd sets its title once started: the same process is now the job's.
    (proc.root / "10" / "cmdline").write_bytes(b"slurmstepd: [100.extern]")
    assert scanner.usage_by_job({"100": ALICE})["100"].cpu_ns == 40 * NS_PER_TICK


def test_slurmstepds_child_is_counted_once_it_becomes_the_user(tmp_path):
    proc = cluster_node(tmp_path / "proc")
    # slurmstepd forks: the child is root's and carries its parent's title until it drops
    # to the job's user and execs the user's program.
    proc.add(14, 10, 0, 5, title="slurmstepd: [100.batch]", comm="slurmstepd")
    scanner = ProcScanner(proc.root)
    assert scanner.usage_by_job({"100": ALICE})["100"].cpu_ns == 600 * NS_PER_TICK
    proc.add(14, 10, ALICE, 80, title="python step.py", comm="python")
    assert scanner.usage_by_job({"100": ALICE})["100"].cpu_ns == 680 * NS_PER_TICK


def test_an_unknown_owner_lets_the_tree_alone_decide(tmp_path):
    cluster_node(tmp_path / "proc")
    usage = ProcScanner(tmp_path / "proc").usage_by_job({"100": None})
    assert usage["100"].cpu_ns == (100 + 500 + 50) * NS_PER_TICK


# -- end to end: the daemon's attributor on a real node store ---------------------------------

CPU = Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter")
S = 10**9
T0 = 1_700_000_000 * S


@pytest.fixture
def node(tmp_path):
    proc = cluster_node(tmp_path / "proc")
    (tmp_path / "cgroup").mkdir()  # a node with no job cgroups
    store = NodeStore(tmp_path / "node.db")
    store.register_devices([CPU], T0)
    runs = {}
    for job_id, uid, user in (("100", ALICE, "alice"), ("200", BOB, "bob")):
        runs[job_id] = store.add_job(
            JobRecord(job_id=job_id, cluster="c1", node="n1", start_ns=T0, uid=uid, user=user)
        )
    attributor = JobAttributor(
        store, "n1", [CPU], T0 - S, proc_root=proc.root, cgroup_root=str(tmp_path / "cgroup")
    )
    yield proc, store, runs, attributor
    store.close()


def interval(i: int, energy_uj: int) -> Interval:
    return Interval(
        "s",
        T0 + i * S,
        T0 + (i + 1) * S,
        i,
        i + 1,
        (EnergyRow("rapl:package-0", energy_uj, "ok", "ok", None),),
    )


def test_bobs_busy_loop_is_not_billed_to_alice_and_the_guess_is_flagged(node):
    proc, store, runs, attributor = node
    attributor(interval(0, 0))  # the baseline of /proc/stat
    # One second: everything's CPU time moves; the node was busy for all of it.
    for pid, ticks in (
        (11, 100 + 10),
        (12, 500 + 30),
        (31, 70 + 5),
        (40, 9000 + 40),
        (42, 8000 + 15),
    ):
        ppid = {11: 10, 12: 11, 31: 30, 40: 1, 42: 41}[pid]
        proc.set_ticks(pid, ppid, ticks)
    proc.set_node_busy(100)
    out = attributor(interval(1, 1_000_000))
    share = {s.run_id: s.energy_uj for s in out.shares}
    # Of the node's 100 busy ticks, Alice's tree used 10 + 30 and Bob's job 5: Bob's 40 + 15
    # ticks outside his job (SLURM_JOB_ID=100, a forged title) are the node's remainder.
    assert share == {runs["100"]: 400_000, runs["200"]: 50_000}
    assert sum(r.energy_uj for r in out.remainder) == 550_000
    for job_id in ("100", "200"):
        assert PROC_TREE_FLAG in store.run(runs[job_id]).flags


def test_the_second_interval_credits_only_the_trees_delta(node):
    proc, store, runs, attributor = node
    attributor(interval(0, 0))
    proc.set_node_busy(1000)
    attributor(interval(1, 1_000_000))
    proc.set_ticks(40, 1, 9000 + 60)  # only Bob's forged busy loop runs
    proc.set_ticks(42, 41, 8000 + 40)
    proc.set_node_busy(1100)
    out = attributor(interval(2, 1_000_000))
    assert {s.run_id for s in out.shares if s.energy_uj} == set()
    assert sum(r.energy_uj for r in out.remainder) == 1_000_000
