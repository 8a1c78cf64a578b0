"""``llem prolog`` and ``llem epilog``: called by slurm/prolog.sh and slurm/epilog.sh as root.

They never fail the job: whatever breaks is logged (stderr, which the shell wrapper sends to
syslog, and the node's problems.log that `llem doctor` shows) and the exit status is 0.
They import only what they need (no click): they run on every job start and end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Mapping

log = logging.getLogger("llem.slurm")

FINAL_READING_WAIT_S = 1.0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _guarded(kind: str, body, env: Mapping[str, str]) -> int:
    """Run the hook; any failure is logged and recorded, never returned to Slurm."""
    _setup_logging()
    t0 = time.perf_counter()
    try:
        body(env)
    except Exception as e:  # noqa: BLE001 - nothing may escape into slurmd
        message = f"llem {kind} job {env.get('SLURM_JOB_ID', '?')}: {type(e).__name__}: {e}"
        log.error("%s", message)
        _record(env, message)
    log.info("llem %s job %s done in %.1f ms", kind, env.get("SLURM_JOB_ID", "?"),
             (time.perf_counter() - t0) * 1000)
    return 0


def _record(env: Mapping[str, str], message: str) -> None:
    try:
        from llem import config as config_mod
        from llem.nodesampler import NodePaths, record_problem
        from llem.slurm import node_name

        try:
            config = config_mod.load(env=env)
        except Exception:  # noqa: BLE001 - a bad config is the likely cause itself
            config = config_mod.Config()
        record_problem(NodePaths.of(config, node_name(env)), message)
    except Exception:  # noqa: BLE001
        pass


def _ensure_sampler(paths, node: str, env: Mapping[str, str]) -> None:
    from llem.nodesampler import sampler_pid, spawn_sampler

    if sampler_pid(paths) is None:
        pid = spawn_sampler(node, env)
        log.info("llem: started the node sampler for %s (pid %d)", node, pid)


def prolog_body(env: Mapping[str, str]) -> None:
    from llem import config as config_mod
    from llem.nodesampler import NodePaths, locked
    from llem.slurm import gpu_minors, job_from_env, node_name
    from llem.store.node import NodeStore

    config = config_mod.load(env=env)
    node = node_name(env)
    job = job_from_env(env, config.cluster, time.time_ns(), gpu_minors(env))
    paths = NodePaths.of(config, node)
    paths.ensure()
    with locked(paths.node_lock):
        with NodeStore(paths.store) as store:
            run_id = store.add_job(job)
        _ensure_sampler(paths, node, env)
    log.info("llem prolog: job %s run %d on %s registered", job.job_id, run_id, node)


def epilog_body(env: Mapping[str, str]) -> None:
    from llem import config as config_mod
    from llem.nodesampler import NodePaths, locked, sampler_pid
    from llem.slurm import gpu_minors, job_from_env, job_id_from_env, node_name
    from llem.store.node import NodeStore

    config = config_mod.load(env=env)
    node = node_name(env)
    job_id = job_id_from_env(env)
    paths = NodePaths.of(config, node)
    paths.ensure()
    end_ns = time.time_ns()
    flags: list[str] = []
    with locked(paths.node_lock):
        with NodeStore(paths.store) as store:
            runs = store.jobs("job_id = ? AND state = 'running'", (job_id,))
            if runs:
                run = max(runs, key=lambda r: r.start_ns)
            else:
                # The Prolog did not register it (llem broken then, or installed mid-job):
                # keep a record so that the ledger knows this job ran without data.
                run_id = store.add_job(job_from_env(env, config.cluster, end_ns,
                                                    gpu_minors(env)))
                run = store.jobs("run_id = ?", (run_id,))[0]
                flags.append("no_prolog")
            store.update_job(run.run_id, end_ns=end_ns, state="ended")
        pid = sampler_pid(paths)
    if pid and pid > 0:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pid = None
    with NodeStore(paths.store) as store:
        if not (pid and pid > 0 and _wait_final_reading(store, end_ns)):
            flags.append("no_final_reading")
        coverage, seen = seal_figures(store, run.run_id, run.start_ns, end_ns)
        store.update_job(run.run_id, state="sealed", coverage=coverage,
                         flags=sorted(set(flags) | seen))
    with locked(paths.node_lock):
        with NodeStore(paths.store) as store:
            others = store.running_jobs()
        if others:
            _ensure_sampler(paths, node, env)  # a sampler that died is restarted for them
    log.info("llem epilog: job %s sealed on %s, coverage %.3f, flags %s", job_id, node,
             coverage, ",".join(sorted(set(flags) | seen)) or "none")


def _wait_final_reading(store, end_ns: int) -> bool:
    deadline = time.monotonic() + FINAL_READING_WAIT_S
    while time.monotonic() < deadline:
        last = store.query("SELECT MAX(end_ns) FROM intervals")[0][0]
        if last is not None and last >= end_ns:
            return True
        time.sleep(0.01)
    return False


def seal_figures(store, run_id: int, start_ns: int, end_ns: int) -> tuple[float, set[str]]:
    """Coverage (share of the job's wall time inside sampler intervals) and flags."""
    span = max(1, end_ns - start_ns)
    rows = store.query(
        "SELECT start_ns, end_ns FROM intervals WHERE end_ns > ? AND start_ns < ? ORDER BY start_ns",
        (start_ns, end_ns))
    covered, cursor = 0, start_ns
    for s, e in rows:
        s, e = max(s, cursor, start_ns), min(e, end_ns)
        if e > s:
            covered += e - s
            cursor = e
    coverage = round(min(1.0, covered / span), 4)
    flags: set[str] = set()
    kinds = {k for (k,) in store.query(
        "SELECT DISTINCT kind FROM events WHERE ts_ns >= ? AND ts_ns <= ?", (start_ns, end_ns))}
    if "sampler_restart" in kinds:
        flags.add("sampler_restart")
    if kinds & {"counter_reset", "counter_gap", "device_lost"} or coverage < 0.99:
        flags.add("gap")
    if "attribution_error" in kinds:
        flags.add("attribution_error")
    if "clock_jump" in kinds:
        flags.add("clock_jump")
    sources = {s for (s,) in store.query(
        "SELECT DISTINCT d.source FROM job_energy j JOIN devices d ON d.key = j.device_key "
        "WHERE j.run_id = ?", (run_id,))}
    if "estimated" in sources:
        flags.add("estimated")
    return coverage, flags


def prolog_main(argv: list[str] | None = None) -> int:
    """llem prolog: register the job and make sure the node sampler runs (Slurm Prolog)."""
    return _guarded("prolog", prolog_body, os.environ)


def epilog_main(argv: list[str] | None = None) -> int:
    """llem epilog: final reading, seal and export the job's data (Slurm Epilog)."""
    return _guarded("epilog", epilog_body, os.environ)
