"""llem's Prolog, Epilog, node sampler and `srun llem wrap` on a real local Slurm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from .harness import TEST_USER, TEST_USER2
from .llem_site import GPU_W, OLD_BASHES, REPO, Site, burn

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    c = slurm_module_cluster_factory(
        nodes=3, gpus_per_node=2, name="llemsite", node_prefix="s", port_base=17300, start=False
    )
    site.install_hooks(c)
    # The llem SPANK plugin, so that --energy-tag reaches the ledger.
    build = subprocess.run(
        ["make", "-C", str(REPO / "spank"), "all"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    so = c.prepare() / "llem.so"
    shutil.copy(REPO / "spank" / "llem.so", so)
    so.chmod(0o755)
    c.plugstack = [f"optional {so}"]
    c.start()
    return c


def submit(cluster, site, args, script=None, user=TEST_USER):
    return cluster.submit(args, user=user, script=script, env=site.user_env)


def finished(cluster, job, timeout=60):
    state = cluster.wait_job(job, timeout=timeout)
    assert cluster.drained_nodes() == {}, cluster.logs()
    if state not in ("COMPLETED", "CANCELLED", "TIMEOUT"):
        outputs = sorted(cluster.work_dir.glob(f"slurm-{job.split('_')[0]}*.out"))
        text = "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in outputs)
        print(f"job {job} ended {state}; output:\n{text}")
    return state


def job_rows(site, node, job):
    db = site.store(node)
    try:
        return db.execute(
            "SELECT run_id, state, coverage, flags FROM jobs WHERE job_id = ?", (job,)
        ).fetchall()
    finally:
        db.close()


def energy_by_component(site, node, run_id):
    db = site.store(node)
    try:
        return dict(
            db.execute(
                "SELECT d.component, SUM(j.energy_uj) FROM job_energy j JOIN devices d "
                "ON d.key = j.device_key WHERE j.run_id = ? GROUP BY d.component",
                (run_id,),
            )
        )
    finally:
        db.close()


def test_batch_srun_array_and_multinode_jobs_all_have_data(cluster, site):
    n1, n2, n3 = cluster.nodes
    batch = submit(cluster, site, ["-w", n1, "--wrap", burn(1.5)])
    array = submit(cluster, site, ["-w", n2, "--array=1-2", "--wrap", "sleep 1"])
    multi = submit(cluster, site, ["-N2", "-w", f"{n2},{n3}", "--wrap", f"srun {burn(1.5)}"])
    r = cluster.srun(["-w", n3, "sleep", "1"], env=site.user_env)
    assert r.returncode == 0, r.output
    for job in (batch, multi):
        assert finished(cluster, job) == "COMPLETED"
    for task in (f"{array}_1", f"{array}_2"):
        assert finished(cluster, task) == "COMPLETED"
    run_id, _, coverage, flags = site.wait_sealed(n1, batch)[:4]
    assert coverage > 0.5
    assert "proc_tree" not in json.loads(flags)  # a node with job cgroups never guesses
    energy = energy_by_component(site, n1, run_id)
    assert energy.get("cpu", 0) > 0 and energy.get("dram", 0) > 0
    for node in (n2, n3):
        run_id = site.wait_sealed(node, multi)[0]
        assert energy_by_component(site, node, run_id).get("cpu", 0) > 0, node
    # Array tasks run as jobs of their own ids (the slurmd Prolog is not told the array's id:
    # the EpilogSlurmctld header carries it to the ledger), each registered and sealed.
    ids = [cluster.job_info(f"{array}_{task}")["JobId"] for task in (1, 2)]
    assert len(set(ids)) == 2, ids
    for job_id in ids:
        site.wait_sealed(n2, job_id)
    # The srun job (no batch script) was tracked too.
    db = site.store(n3)
    assert (
        db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('sealed', 'exported')").fetchone()[0]
        >= 2
    )
    db.close()


def test_shared_node_gpus_and_cpu_split_and_invariant(cluster, site):
    node = cluster.nodes[0]
    busy = submit(cluster, site, ["-w", node, "-n1", "--gres=gpu:1", "--wrap", burn(4)])
    idle = submit(cluster, site, ["-w", node, "-n1", "--gres=gpu:1", "--wrap", "sleep 4"])
    assert finished(cluster, busy) == "COMPLETED"
    assert finished(cluster, idle) == "COMPLETED"
    b = site.wait_sealed(node, busy)
    i = site.wait_sealed(node, idle)
    gpus_b, gpus_i = json.loads(b[4]), json.loads(i[4])
    assert len(gpus_b) == 1 and len(gpus_i) == 1 and gpus_b != gpus_i
    db = site.store(node)
    try:
        per_job = {}
        for run_id, key in ((b[0], gpus_b[0]), (i[0], gpus_i[0])):
            rows = db.execute(
                "SELECT d.attrs, SUM(j.energy_uj), SUM(iv.end_ns - iv.start_ns) FROM job_energy j "
                "JOIN devices d ON d.key = j.device_key JOIN intervals iv ON iv.id = j.interval_id "
                "WHERE j.run_id = ? AND d.component = 'gpu' GROUP BY d.key",
                (run_id,),
            ).fetchall()
            assert len(rows) == 1, rows  # only its own GPU
            attrs, energy_uj, span_ns = rows[0]
            minor = json.loads(attrs)["minor"]
            assert key == f"nvml:GPU-llemtest-{minor}"  # the job names the GPU by device key
            power_w = energy_uj / span_ns * 1e3
            assert power_w == pytest.approx(GPU_W[minor], rel=0.3)
            per_job[run_id] = energy_by_component(site, node, run_id)
        # By use (the default hybrid rule's dynamic part): the busy job far more than the idle
        # one, which pays its share of the idle power (tests/slurm/test_attribution_slurm.py).
        use = dict(
            db.execute(
                "SELECT run_id, SUM(energy_uj) FROM job_energy WHERE method = "
                "'cpu_time' GROUP BY run_id"
            )
        )
        assert use.get(b[0], 0) > 3 * use.get(i[0], 0)
        assert per_job[b[0]]["cpu"] > per_job[i[0]].get("cpu", 0)
        # The invariant, interval by interval and device by device.
        bad = db.execute(
            "SELECT e.interval_id, e.device_key, e.energy_uj, "
            "COALESCE((SELECT SUM(energy_uj) FROM job_energy j WHERE j.interval_id = e.interval_id"
            " AND j.device_key = e.device_key), 0) + COALESCE((SELECT SUM(energy_uj) FROM remainder r"
            " WHERE r.interval_id = e.interval_id AND r.device_key = e.device_key), 0) AS parts "
            "FROM energy e WHERE e.energy_uj != parts"
        ).fetchall()
        assert bad == []
        assert db.execute("SELECT COUNT(*) FROM job_energy").fetchone()[0] > 0
    finally:
        db.close()


def test_wrap_windows_nested_parallel_and_refused_for_another_user(cluster, site):
    node = cluster.nodes[1]
    w = site.wrap_cmd()
    out = site.out
    script = f"""#!/bin/bash
#SBATCH -w {node}
#SBATCH -n 2
srun -n1 --overlap {w} --name outer --output {out}/outer.json -- \\
    {w} --name inner --output {out}/inner.json -- {burn(1.5)}
srun -n1 --overlap {w} --name left --output {out}/left.json -- sleep 1.5 &
srun -n1 --overlap {w} --name right --output {out}/right.json -- sleep 1.5 &
wait
sleep 3
"""
    job = submit(cluster, site, [], script=script)
    # While the job sleeps at its end, another user tries to open a window in it.
    deadline = time.monotonic() + 40
    while not (out / "right.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    intruder = cluster.run(
        [
            "/usr/bin/python3",
            "-m",
            "llem.cli.main",
            "wrap",
            "--json",
            "--name",
            "intrude",
            "--",
            "true",
        ],
        user=TEST_USER2,
        env={**site.user_env, "SLURM_JOB_ID": job, "SLURMD_NODENAME": node},
    )
    assert finished(cluster, job) == "COMPLETED"
    assert intruder.returncode == 0
    assert "permission denied" in intruder.stderr and "not yours" in intruder.stderr
    assert json.loads(intruder.stdout)["scope"] == "node"  # fell back to standalone
    windows = {
        n: json.loads((out / f"{n}.json").read_text()) for n in ("outer", "inner", "left", "right")
    }
    for name, res in windows.items():
        assert res["scope"] == "job" and res["exit_code"] == 0, (name, res)
        assert res["window_id"] > 0
    assert windows["inner"]["energy_j"] > 0
    assert windows["outer"]["energy_j"] >= windows["inner"]["energy_j"]
    run_id = site.wait_sealed(node, job)[0]
    db = site.store(node)
    rows = db.execute(
        "SELECT name, step_id, status, uid FROM windows WHERE run_id = ? ORDER BY id", (run_id,)
    ).fetchall()
    db.close()
    names = sorted(r[0] for r in rows)
    assert names == ["inner", "left", "outer", "right"]
    assert all(r[2] == "closed" for r in rows)
    steps = {r[0]: r[1] for r in rows}
    assert steps["left"] != steps["right"]
    assert "intrude" not in names


def test_scancel_time_out_and_sigterm_ignoring_job_are_sealed(cluster, site):
    node = cluster.nodes[2]
    cancelled = submit(cluster, site, ["-w", node, "--wrap", "sleep 60"])
    stubborn = submit(
        cluster, site, ["-w", node, "--wrap", "trap '' TERM; while true; do sleep 0.2; done"]
    )
    timed_out = submit(cluster, site, ["-w", node, "--time=1", "--wrap", "sleep 300"])
    time.sleep(3)
    cluster.run(["scancel", cancelled, stubborn])
    assert finished(cluster, cancelled) == "CANCELLED"
    assert finished(cluster, stubborn) == "CANCELLED"
    assert finished(cluster, timed_out, timeout=150) == "TIMEOUT"
    for job in (cancelled, stubborn, timed_out):
        run_id, _, coverage, flags = site.wait_sealed(node, job)[:4]
        assert coverage > 0.5, (job, coverage, flags)
        assert energy_by_component(site, node, run_id).get("cpu", 0) >= 0


def test_sampler_killed_mid_job_gap_recorded_and_restarted(cluster, site):
    node = cluster.nodes[2]
    first = submit(cluster, site, ["-w", node, "--wrap", "sleep 5"])
    deadline = time.monotonic() + 20
    while site.sampler_pid(node) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = site.sampler_pid(node)
    assert pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    second = submit(cluster, site, ["-w", node, "--wrap", "sleep 1"])
    assert finished(cluster, second) == "COMPLETED"
    assert finished(cluster, first) == "COMPLETED"
    flags = json.loads(site.wait_sealed(node, first)[3])
    assert "sampler_restart" in flags and "gap" in flags
    db = site.store(node)
    kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE kind = 'sampler_restart'")]
    db.close()
    assert kinds


@pytest.mark.parametrize("bash", ["/bin/bash", *OLD_BASHES])
def test_hooks_without_epochrealtime_record_every_job(cluster, site, bash):
    """bash 4 (EL7, EL8) has no $EPOCHREALTIME: the hooks' fast path must still date the
    registrations it hands to the node sampler, or the sampler cannot take the job."""
    node = cluster.nodes[1]
    bad = site.run_dir / node / "jobs" / "bad"
    bad_before = set(os.listdir(bad)) if bad.exists() else set()
    for kind in ("prolog", "epilog"):
        site.hook(kind, bash=bash, no_epochrealtime=True)
    try:
        first = submit(cluster, site, ["-w", node, "-n1", "--wrap", "sleep 4"])
        deadline = time.monotonic() + 20
        while site.sampler_pid(node) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert site.sampler_pid(node)
        # The sampler is alive: this job's Prolog, and both Epilogs, take the fast path.
        second = submit(cluster, site, ["-w", node, "-n1", "--wrap", "sleep 1"])
        assert finished(cluster, second) == "COMPLETED"
        assert finished(cluster, first) == "COMPLETED"
        for job in (first, second):
            coverage, flags = site.wait_sealed(node, job)[2:4]
            assert "time_from_mtime" not in json.loads(flags), (job, flags)
            assert "no_prolog" not in json.loads(flags), (job, flags)
            assert coverage > 0.5, (job, coverage, flags)
        assert (set(os.listdir(bad)) if bad.exists() else set()) == bad_before
    finally:
        for kind in ("prolog", "epilog"):
            site.hook(kind)


@pytest.mark.parametrize(
    "breakage", ["bad_config", "unwritable_state_dir", "not_importable", "missing_binary"]
)
def test_broken_llem_never_drains_the_node(cluster, site, breakage):
    node = cluster.nodes[0]
    try:
        if breakage == "bad_config":
            site.write_config("sampler: [unclosed\n")
        elif breakage == "unwritable_state_dir":
            site.write_config(f"state_dir: /proc/llem\nrun_dir: {site.run_dir}\n")
        elif breakage == "not_importable":
            broken = site.base / "broken-llem"
            broken.write_text("#!/bin/sh\nexec /usr/bin/python3 -c 'import llem_missing'\n")
            broken.chmod(0o755)
            site.write_defaults(LLEM_BIN=str(broken))
        else:
            site.write_defaults(LLEM_BIN="/nonexistent/llem")
        job = submit(cluster, site, ["-w", node, "--wrap", "echo ran"])
        assert finished(cluster, job) == "COMPLETED"
        assert cluster.drained_nodes() == {}
    finally:
        site.write_config()
        site.write_defaults()


def test_end_to_end_epilogs_export_and_the_ledger_holds_every_job(cluster, site):
    """Jobs run, Epilogs export through the outbox to the spool, `llem aggregate` merges."""
    import sqlite3
    import subprocess
    import sys

    n1, n2, n3 = cluster.nodes
    multi = submit(
        cluster,
        site,
        [
            "-N3",
            "-w",
            f"{n1},{n2},{n3}",
            "-J",
            "e2e-multi",
            "--energy-tag=exp2",
            "--wrap",
            f"srun {burn(1.0)}",
        ],
    )
    single = submit(
        cluster,
        site,
        ["-w", n2, "-J", "e2e-single", "--gres=gpu:1"],
        script="#!/bin/bash\n#SBATCH --energy-tag=exp3\nsleep 1\n",
    )
    r = cluster.srun(
        ["-w", n1, "--energy-tag=exp1", "-J", "e2e-srun", "sh", "-c", "echo $SLURM_JOB_ID"],
        env=site.user_env,
    )
    assert r.returncode == 0, r.output
    srun_job = r.stdout.strip()
    assert srun_job.isdigit(), r.output
    assert finished(cluster, multi) == "COMPLETED"
    assert finished(cluster, single) == "COMPLETED"
    for node, job in ((n1, multi), (n2, multi), (n3, multi), (n1, srun_job)):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = site.wait_sealed(node, job)
            if row[1] == "exported":
                break
            time.sleep(0.2)
        assert row[1] == "exported", (node, job, row, site.diagnose(node, job))
    env = {**os.environ, "LLEM_CONFIG": str(site.config)}
    env.pop("LLEM_POWERCAP_ROOT", None)
    deadline = time.monotonic() + 30
    while True:  # the header slice comes from the controller, a moment after the job
        r = subprocess.run(
            [sys.executable, "-m", "llem.cli.main", "aggregate", "--once", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        db = sqlite3.connect(f"file:{site.base / 'state' / 'ledger.db'}?mode=ro", uri=True)
        runs = {
            job: db.execute("SELECT status, name FROM job_runs WHERE job_id = ?", (job,)).fetchone()
            for job in (multi, single)
        }
        # The srun job's run too: its tag comes with its node slice (exported above).
        srun_run = db.execute(
            "SELECT status FROM job_runs WHERE job_id = ?", (srun_job,)
        ).fetchone()
        done = all(r and r[1] for r in runs.values()) and srun_run == ("complete",)
        if done or time.monotonic() > deadline:
            break
        db.close()
        time.sleep(1)
    try:
        assert runs[multi] == ("complete", "e2e-multi"), runs
        assert runs[single] == ("complete", "e2e-single"), runs
        tags = dict(db.execute("SELECT name, tag FROM job_runs WHERE name LIKE 'e2e-%'"))
        assert tags == {"e2e-multi": "exp2", "e2e-single": "exp3", "e2e-srun": "exp1"}, tags
        per_node = dict(
            db.execute(
                "SELECT n.node, SUM(e.energy_uj) FROM job_nodes n JOIN job_energy e "
                "ON e.job_node_id = n.id WHERE n.job_id = ? GROUP BY n.node",
                (multi,),
            )
        )
        assert set(per_node) == {n1, n2, n3} and all(v > 0 for v in per_node.values())
        gpu = db.execute(
            "SELECT SUM(e.energy_uj) FROM job_nodes n JOIN job_energy e ON e.job_node_id = n.id"
            " WHERE n.job_id = ? AND e.component = 'gpu'",
            (single,),
        ).fetchone()[0]
        assert gpu and gpu > 0
    finally:
        db.close()
