"""The Slurm hook scripts: shellcheck-clean, and exit 0 whatever breaks, fast."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
# The hooks must run on bash 4.2 and later (EL7, EL8). TEST_OLD_BASH (colon-separated
# paths of real bash 4.x binaries, e.g. built from bash's release tags) runs them under those
# too; /bin/bash always.
BASHES = ["/bin/bash", *(b for b in os.environ.get("TEST_OLD_BASH", "").split(":") if b)]


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"prolog.sh", "epilog.sh", "llem-hook.sh"} <= names


@pytest.mark.skipif(
    shutil.which("shellcheck") is None and not os.environ.get("CI"),
    reason="shellcheck not installed (scripts/install-slurm.sh installs it)",
)
def test_shellcheck_clean():
    r = subprocess.run(
        ["shellcheck", "-x", "-P", str(REPO / "slurm"), *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def run_hook(kind, tmp_path, defaults: str, extra_env=None, bash="/bin/bash"):
    dfile = tmp_path / "default-llem"
    dfile.write_text(defaults)
    env = {
        "SLURM_JOB_ID": "42",
        "SLURMD_NODENAME": "t1",
        "LLEM_DEFAULTS_FILE": str(dfile),
        **(extra_env or {}),
    }  # no PATH, no HOME: as slurmd runs it
    t0 = time.monotonic()
    r = subprocess.run(
        [bash, str(REPO / "slurm" / f"{kind}.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return r, time.monotonic() - t0


@pytest.mark.parametrize("bash", BASHES)
@pytest.mark.parametrize("kind", ["prolog", "epilog"])
@pytest.mark.parametrize(
    "defaults",
    [
        "LLEM_BIN=/nonexistent/llem\n",
        "LLEM_BIN=/bin/false\n",
        "this is not a settings file $(touch /tmp/llem-pwned)\nexit 1\n",
        "LLEM_BIN={slow}\nLLEM_TIMEOUT=1\n",
        "LLEM_BIN=/bin/true\nLLEM_TIMEOUT=abc\n",
        "LLEM_BAD-KEY=1\n",
    ],
)
def test_hook_exits_0_whatever_breaks(kind, tmp_path, defaults, bash):
    slow = tmp_path / "slow-llem"
    slow.write_text("#!/bin/sh\nexec /bin/sleep 30\n")  # a hung llem
    slow.chmod(0o755)
    r, elapsed = run_hook(kind, tmp_path, defaults.replace("{slow}", str(slow)), bash=bash)
    assert r.returncode == 0, r.stderr
    assert not Path("/tmp/llem-pwned").exists()  # the settings file is never executed
    assert elapsed < 5


@pytest.mark.parametrize("bash", BASHES)
def test_hook_runs_llem_with_the_settings(tmp_path, bash):
    seen = tmp_path / "seen"
    fake = tmp_path / "fake-llem"
    fake.write_text(f'#!/bin/sh\necho "$1 $LLEM_CONFIG $LLEM_POWERCAP_ROOT" > {seen}\n')
    fake.chmod(0o755)
    r, _ = run_hook(
        "prolog",
        tmp_path,
        f'LLEM_BIN={fake}\nLLEM_CONFIG="/etc/x.yaml"\nLLEM_POWERCAP_ROOT=/p\n',
        bash=bash,
    )
    assert r.returncode == 0
    assert seen.read_text().strip() == "prolog /etc/x.yaml /p"


def test_python_and_bash_record_the_same_variables():
    import re

    from llem.node.jobs import JOB_VARS

    text = (REPO / "slurm" / "llem-hook.sh").read_text()
    block = text[text.index("LLEM_JOB_VARS=(") : text.index(")", text.index("LLEM_JOB_VARS=("))]
    assert tuple(re.findall(r"[A-Z_]+", block.split("(", 1)[1])) == JOB_VARS


# -- bash 4 (EL7, EL8): no $EPOCHREALTIME --------------------------------------------------
# bash 4 has no $EPOCHREALTIME; on bash 5, `unset EPOCHREALTIME` takes its special meaning
# away, which is how these tests run the hooks as bash 4 would. BASH_ENV is read by a
# non-interactive bash before the script, so the scripts run exactly as slurmd runs them.
# With TEST_OLD_BASH, they also run under real bash 4.x binaries (see BASHES).


@pytest.fixture
def live_sampler(tmp_path):
    """RUN_DIR/t1 as a live node sampler leaves it: jobs/, sampler.lock held, sampler.pid.

    The process holding the lock stands in for the sampler: it ignores SIGUSR1 (the wake-up),
    and the test ingests the registrations as the sampler would.
    """
    import sys

    node_dir = tmp_path / "run" / "t1"
    (node_dir / "jobs").mkdir(parents=True, mode=0o700)
    code = (
        "import fcntl, os, signal, sys\n"
        "fd = os.open(sys.argv[1] + '/sampler.lock', os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
        "open(sys.argv[1] + '/sampler.pid', 'w').write(f'{os.getpid()}\\n')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(node_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield node_dir
    finally:
        proc.stdin.close()
        proc.wait(10)


def run_hook_as_bash4(kind, tmp_path, defaults, bash="/bin/bash", env_extra=None):
    bash_env = tmp_path / "no-epochrealtime.sh"
    bash_env.write_text("unset EPOCHREALTIME\n")
    dfile = tmp_path / "default-llem"
    dfile.write_text(defaults)
    env = {
        "SLURM_JOB_ID": "42",
        "SLURMD_NODENAME": "t1",
        "SLURM_JOB_UID": "1000",
        "SLURM_JOB_USER": "alice",
        "LLEM_DEFAULTS_FILE": str(dfile),
        "BASH_ENV": str(bash_env),
        **(env_extra or {}),
    }
    return subprocess.run(
        [bash, str(REPO / "slurm" / f"{kind}.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("bash", BASHES)
def test_hooks_without_epochrealtime_hand_a_dated_job_to_the_sampler(bash, tmp_path, live_sampler):
    from llem.node.jobs import ingest
    from llem.node.store import NodeStore

    seen = tmp_path / "llem-ran"
    fake = tmp_path / "fake-llem"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {seen}\n')
    fake.chmod(0o755)
    defaults = f"LLEM_BIN={fake}\nLLEM_RUN_DIR={tmp_path / 'run'}\n"
    jobs = live_sampler / "jobs"
    with NodeStore(tmp_path / "node.db") as store:
        before_ns = time.time_ns()
        r = run_hook_as_bash4("prolog", tmp_path, defaults, bash)
        assert r.returncode == 0, r.stderr
        assert ingest(store, jobs, "c", "t1") == [("42", "start")]
        r = run_hook_as_bash4("epilog", tmp_path, defaults, bash)
        assert r.returncode == 0, r.stderr
        assert ingest(store, jobs, "c", "t1") == [("42", "end")]
        after_ns = time.time_ns()
        (run,) = store.jobs()
    assert not seen.exists()  # the fast path took both: llem was not needed
    assert not (jobs / "bad").exists()
    assert (run.state, run.user, run.uid, run.flags) == ("ended", "alice", 1000, ())
    # Microseconds from the hook's own clock, not whole seconds.
    assert before_ns - 1000 <= run.start_ns <= run.end_ns <= after_ns
    assert run.start_ns % 1_000_000_000 or run.end_ns % 1_000_000_000


@pytest.mark.parametrize("bash", BASHES)
@pytest.mark.parametrize("kind", ["prolog", "epilog"])
def test_hook_with_no_clock_leaves_the_job_to_llem(kind, tmp_path, live_sampler, bash):
    """No microsecond clock at all: nothing is written, and `llem KIND` takes the job."""
    seen = tmp_path / "llem-ran"
    fake = tmp_path / "fake-llem"
    fake.write_text(f'#!/bin/sh\necho "$1 $SLURM_JOB_ID" >> {seen}\n')
    fake.chmod(0o755)
    dfile = tmp_path / "default-llem"
    dfile.write_text(f"LLEM_BIN={fake}\nLLEM_RUN_DIR={tmp_path / 'run'}\n")
    # The hook as prolog.sh runs it, with its clock broken (a date without %N, say).
    script = (
        f". {REPO / 'slurm' / 'llem-hook.sh'} && "
        f"llem_now_us() {{ now=; return 1; }} && llem_hook {kind}"
    )
    r = subprocess.run(
        [bash, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "t1", "LLEM_DEFAULTS_FILE": str(dfile)},
    )
    assert r.returncode == 0, r.stderr
    assert seen.read_text() == f"{kind} 42\n"
    assert sorted(p.name for p in (live_sampler / "jobs").iterdir()) == []


def test_a_cold_prolog_returns_once_the_new_sampler_listens_for_windows(tmp_path):
    """The first job after an idle period: the real Prolog starts the node sampler, and the
    job starts as soon as the Prolog returns. A window the job opens at once must reach the
    sampler (and wait for its sensors to open), not find no socket and be measured
    standalone: a real-Slurm test saw exactly that (the first job's Python window got scope
    "node", "node sampler not reachable")."""
    import signal
    import socket
    import sys

    from llem.node.windows import ping

    if os.geteuid() != 0:
        pytest.skip("the Prolog runs as root (it starts the root sampler)")
    run_dir = tmp_path / "run"
    config = tmp_path / "llem.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nrun_dir: {run_dir}\nspool_dir: {tmp_path / 'spool'}\n"
        "sensors: [estimate]\nsampler:\n  interval_s: 10\n  linger_s: 600\n"
    )
    dfile = tmp_path / "default-llem"
    dfile.write_text(
        f"LLEM_BIN={Path(sys.executable).with_name('llem')}\nLLEM_CONFIG={config}\n"
        f"LLEM_RUN_DIR={run_dir}\n"
    )
    env = {
        "SLURM_JOB_ID": "77",
        "SLURMD_NODENAME": "t1",
        "SLURM_JOB_UID": "0",
        "SLURM_JOB_USER": "root",
        "LLEM_DEFAULTS_FILE": str(dfile),
    }
    sock_path = run_dir / "t1" / "sampler.sock"
    r = subprocess.run(
        ["/bin/bash", str(REPO / "slurm" / "prolog.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert r.returncode == 0, r.stderr
        # at once, as the job's first window would: the socket is there and listening
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
        assert ping(sock_path, timeout_s=30)["ok"]
    finally:
        # The sampler serves job 77 until its Epilog, which never comes: stop it, also when
        # the test failed before its pid file was written.
        from llem.node.daemon import sampler_pid
        from llem.paths import NodePaths

        paths = NodePaths("t1", run_dir / "t1", tmp_path / "state" / "node-t1.db")
        deadline = time.monotonic() + 20
        pid = sampler_pid(paths)
        while pid is not None and pid <= 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            pid = sampler_pid(paths)
        if pid:
            os.kill(pid, signal.SIGTERM)
            while sampler_pid(paths) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
