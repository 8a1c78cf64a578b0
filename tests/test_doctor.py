import json
import os
import subprocess
import sys
import threading

from llem.cli.main import COMMANDS, FAST_COMMANDS
from tests.powercap import FakePowercap

LLEM = [sys.executable, "-m", "llem.cli.main"]


def doctor(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(env_extra)
    return subprocess.run(
        LLEM + ["doctor", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_node_with_nothing_to_read(tmp_path):
    r = doctor(
        {
            "LLEM_CONFIG": "/dev/null",
            "LLEM_POWERCAP_ROOT": str(tmp_path / "none"),
            "LLEM_HWMON_ROOT": str(tmp_path / "none"),
        }
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rapl: not available" in out and "does not exist: no powercap interface" in out
    assert "nvml: not available" in out and "no NVIDIA driver" in out
    assert "cpu   estimated" in out and "gpu   none" in out
    assert "state_dir /var/lib/llem" in out


def test_json_and_a_measured_node(tmp_path):
    pc = FakePowercap(tmp_path / "pc")
    pc.add_socket(0)
    r = doctor(
        {
            "LLEM_CONFIG": "/dev/null",
            "LLEM_POWERCAP_ROOT": str(pc.path),
            "LLEM_STATE_DIR": str(tmp_path / "state"),
        },
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["coverage"]["cpu"] == "measured (rapl)"
    rapl = next(s for s in report["sensors"] if s["sensor"] == "rapl")
    assert [d["key"] for d in rapl["devices"]] == ["rapl:package-0", "rapl:dram-0"]
    assert report["paths"]["state_dir"]["path"] == str(tmp_path / "state")


def test_invalid_config_is_shown_and_exits_1(tmp_path):
    cfg = tmp_path / "llem.yaml"
    cfg.write_text("sampler:\n  intervl_s: 3\n")
    r = doctor({"LLEM_CONFIG": str(cfg), "LLEM_POWERCAP_ROOT": str(tmp_path / "none")})
    assert r.returncode == 1
    assert "did you mean 'sampler.interval_s'" in r.stdout
    assert "Traceback" not in r.stderr


def test_group_help_lists_every_command():
    """Every command llem dispatches, the fast (argparse) ones included, is listed by
    ``llem --help`` and answers ``-h`` through the installed entry point; except the Slurm
    hooks, which ignore their arguments and would run as a Prolog/Epilog (a bug)."""
    r = subprocess.run(LLEM + ["--help"], capture_output=True, text=True, timeout=60)
    listed = {
        line.split()[0]
        for line in r.stdout.split("Commands:", 1)[1].splitlines()
        if line.startswith("  ") and line.split()
    }
    assert listed == set(COMMANDS) | set(FAST_COMMANDS)
    for command in sorted(listed - {"prolog", "epilog", "epilog-slurmctld"}):
        h = subprocess.run(LLEM + [command, "-h"], capture_output=True, text=True, timeout=60)
        assert h.returncode == 0 and "usage" in h.stdout.lower(), command


def test_hook_run_dir_mismatch_and_recent_problems(tmp_path):
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nstate_dir: {tmp_path / 'state'}\n")
    defaults = tmp_path / "default-llem"
    defaults.write_text("LLEM_BIN=/opt/llem/bin/llem\n")  # no LLEM_RUN_DIR: /run/llem
    (tmp_path / "run" / "t9").mkdir(parents=True)
    (tmp_path / "run" / "t9" / "problems.log").write_text("2026-01-01 llem prolog job 5: boom\n")
    r = doctor(
        {
            "LLEM_CONFIG": str(cfg),
            "LLEM_DEFAULTS_FILE": str(defaults),
            "SLURMD_NODENAME": "t9",
            "LLEM_POWERCAP_ROOT": str(tmp_path / "none"),
        }
    )
    assert r.returncode == 0, r.stderr
    assert f"set LLEM_RUN_DIR={tmp_path / 'run'} in {defaults}" in r.stdout
    assert "problem: 2026-01-01 llem prolog job 5: boom" in r.stdout


def test_quarantined_slices_are_listed(tmp_path):
    import json as _json

    spool = tmp_path / "spool"
    q = spool / "quarantine"
    q.mkdir(parents=True)
    (q / "bad.json").write_text("{truncated")
    (q / "bad.json.reason").write_text(
        _json.dumps({"file": "bad.json", "reason": "not JSON: truncated"})
    )
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(f"spool_dir: {spool}\nstate_dir: {tmp_path / 'state'}\n")
    r = doctor({"LLEM_CONFIG": str(cfg), "LLEM_POWERCAP_ROOT": str(tmp_path / "none")})
    assert r.returncode == 0, r.stderr
    assert f"quarantined: {q / 'bad.json'}: not JSON: truncated" in r.stdout
    assert "1 slice(s) in quarantine" in r.stdout


def test_attribution_policy_and_idle_powers_in_force(tmp_path):
    from llem.node.store import NodeStore

    pc = FakePowercap(tmp_path / "pc")
    pc.add_socket(0)
    state = tmp_path / "state"
    with NodeStore(state / "node-n9.db") as store:  # what the node sampler learned
        store.save_idle_power("rapl:dram-0", 3_500, 240, 1)
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(
        f"state_dir: {state}\nattribution:\n  policy: allocation\n  idle_w:\n    cpu: 42\n"
    )
    slurm_conf = tmp_path / "slurm.conf"
    slurm_conf.write_text("NodeName=n[8-9] CPUs=48 RealMemory=1000\n")
    slurm_conf.chmod(0o644)
    env = {
        "LLEM_CONFIG": str(cfg),
        "LLEM_POWERCAP_ROOT": str(pc.path),
        "SLURMD_NODENAME": "n9",
        "SLURM_CONF": str(slurm_conf),
    }
    r = doctor(env)
    assert r.returncode == 0, r.stderr
    assert "Attribution: policy allocation" in r.stdout
    assert f"node CPUs for allocation shares: 48 (slurm.conf ({slurm_conf}))" in r.stdout
    assert "idle power rapl:package-0: 42.0 W (config)" in r.stdout
    assert "idle power rapl:dram-0: 3.5 W (learned, 240 idle samples)" in r.stdout
    report = json.loads(doctor(env, "--json").stdout)
    assert report["attribution"]["idle_w"]["rapl:dram-0"] == {
        "w": 3.5,
        "source": "learned",
        "samples": 240,
    }


def test_a_live_sampler_without_a_recent_reading_is_reported_stuck(tmp_path):
    """What a hung sampler leaves (see tests/test_wakeup.py): the node's lock held by a live
    process, a store whose last reading is old. Its readings were written by the real node
    daemon, on a wall clock two hours behind."""
    import time

    from llem.node.daemon import NodeDaemon
    from tests.helpers.daemon import NODE, Daemon, wait_for

    class TwoHoursAgo:
        def monotonic_ns(self) -> int:
            return time.monotonic_ns()

        def time_ns(self) -> int:
            return time.time_ns() - 7200 * 10**9

    node = Daemon(tmp_path, linger_s=600.0)
    node.prolog("301")
    old = NodeDaemon(
        node.config,
        NODE,
        env={},
        open_sensors=node.node.open_sensors,
        clock=TwoHoursAgo(),
        proc_root=node.node.proc,
        cgroup_root=str(node.node.cgroup),
    )
    node.daemon = old
    node.thread = threading.Thread(target=old.run, daemon=True)
    node.thread.start()
    wait_for(node.wrote_an_interval, "the daemon's first interval")
    node.stop()
    cfg = tmp_path / "llem.yaml"
    cfg.write_text(
        f"cluster: c1\nstate_dir: {node.config.state_dir}\nrun_dir: {node.config.run_dir}\n"
        f"spool_dir: {node.config.spool_dir}\nsampler:\n  interval_s: 0.2\n"
    )
    env = {"LLEM_CONFIG": str(cfg), "SLURMD_NODENAME": NODE, "LLEM_POWERCAP_ROOT": "/nonexistent"}
    # As the daemon that stopped above, a sampler that still holds the lock: this process.
    hung = node.make()
    assert hung.acquire_lock()
    try:
        r = doctor(env, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["node_sampler"]["pid"] == os.getpid()
        assert 7100 < report["node_sampler"]["last_reading_s"] < 7300
        stuck = [p for p in report["problems"] if "it is stuck" in p]
        assert len(stuck) == 1 and f"kill {os.getpid()}" in stuck[0], report["problems"]
        text = doctor(env).stdout
        assert "last reading ended" in text and "it is stuck" in text
    finally:
        hung.release_lock()
    # A sampler whose readings are current is not: the same node with a normal clock.
    node.start()
    try:
        # Its own first reading (node.start saw the earlier daemon's, of this same process).
        wait_for(
            lambda: node.query("SELECT MAX(end_ns) FROM intervals")[0][0] > time.time_ns() - 10**10,
            "a current reading",
        )
        report = json.loads(doctor(env, "--json").stdout)
        assert report["node_sampler"]["pid"] == os.getpid()
        assert report["node_sampler"]["last_reading_s"] < 30
        assert not [p for p in report["problems"] if "stuck" in p], report["problems"]
    finally:
        node.stop()
