"""The slow path of the Slurm hooks, as root: ``llem prolog``, ``llem epilog`` and
``llem epilog-slurmctld``.

slurm/llem-hook.sh handles the common case in bash (a registration file and a signal to the
live node sampler). These run when no sampler is alive: they take the registration into the
node store themselves, start the sampler (Prolog), or seal the job without it (Epilog). They
also work when called directly, without a registration file.

They never fail the job: whatever breaks is logged (stderr, which the hook sends to syslog,
and the node's problems.log that `llem doctor` shows) and the exit status is 0. They import
only what they need (no click).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("llem.slurm")

PROLOG_BUDGET_S = 8.0
"""The cold Prolog stops waiting for the new sampler this long after it began (the hook's own
limit, LLEM_TIMEOUT, is 10 s by default)."""


def _guarded(kind: str, body, env: Mapping[str, str]) -> int:
    """Run the hook; any failure is logged and recorded, never returned to Slurm."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    try:
        body(env)
    except Exception as e:  # noqa: BLE001 - nothing may escape into slurmd
        message = f"llem {kind} job {env.get('SLURM_JOB_ID', '?')}: {type(e).__name__}: {e}"
        log.error("%s", message)
        _record(env, message)
    log.info(
        "llem %s job %s done in %.1f ms",
        kind,
        env.get("SLURM_JOB_ID", "?"),
        (time.perf_counter() - t0) * 1000,
    )
    return 0


def _record(env: Mapping[str, str], message: str) -> None:
    try:
        from llem import config as config_mod
        from llem.node.daemon import record_problem
        from llem.node.slurm import node_name
        from llem.paths import NodePaths

        try:
            config = config_mod.load(env=env)
        except Exception:  # noqa: BLE001 - a bad config is the likely cause itself
            config = config_mod.Config()
        record_problem(NodePaths.of(config, node_name(env)), message)
    except Exception:  # noqa: BLE001
        pass


def _context(env: Mapping[str, str]):
    from llem import config as config_mod
    from llem.node.slurm import job_id_from_env, node_name
    from llem.paths import NodePaths

    config = config_mod.load(env=env)
    node = node_name(env)
    paths = NodePaths.of(config, node)
    paths.ensure()
    return config, node, paths, job_id_from_env(env)


def prolog_body(env: Mapping[str, str]) -> None:
    from llem.fsutil import locked
    from llem.node.daemon import SERVING_WAIT_S, sampler_pid, spawn_sampler, wait_until_serving
    from llem.node.jobs import ingest
    from llem.node.slurm import gpu_indices, job_from_env
    from llem.node.store import NodeStore

    started = time.monotonic()
    config, node, paths, job_id = _context(env)
    spawned = None
    with locked(paths.node_lock):
        with NodeStore(paths.store) as store:
            ingest(store, paths.jobs, config.cluster, node)
            if not store.runs_of(job_id, "running"):
                store.add_job(job_from_env(env, config.cluster, time.time_ns(), gpu_indices(env)))
        if sampler_pid(paths) is None:
            spawned = spawn_sampler(node, env)
            log.info("llem: started the node sampler for %s (pid %d)", node, spawned)
    # Outside the node lock: the job's windows need the new sampler's socket before the job
    # starts, or they find none and are measured standalone.
    # Within the Prolog's budget (the hook kills llem after LLEM_TIMEOUT, 10 s by default);
    # the job is registered already, so running out only costs its first windows.
    budget = max(0.5, min(SERVING_WAIT_S, PROLOG_BUDGET_S - (time.monotonic() - started)))
    if spawned is not None and not wait_until_serving(paths, spawned, budget):
        log.warning(
            "llem prolog: the node sampler (pid %d) did not listen on its window socket "
            "within %g s; job %s starts anyway",
            spawned,
            budget,
            job_id,
        )
    log.info("llem prolog: job %s registered on %s", job_id, node)


def epilog_body(env: Mapping[str, str]) -> None:
    from llem.fsutil import locked
    from llem.node.daemon import sampler_pid, spawn_sampler
    from llem.node.jobs import end_job, ingest, seal
    from llem.node.store import NodeStore

    config, node, paths, job_id = _context(env)
    with locked(paths.node_lock):
        with NodeStore(paths.store) as store:
            ingest(store, paths.jobs, config.cluster, node)
            ended = store.runs_of(job_id, "ended")
            run = (
                max(ended, key=lambda r: r.start_ns)
                if ended
                else end_job(store, dict(env), config.cluster, time.time_ns())
            )
            pid = sampler_pid(paths)
            if pid and pid > 0:
                os.kill(pid, signal.SIGUSR1)  # it takes the final reading and seals the job
                log.info("llem epilog: job %s handed to the node sampler (pid %d)", job_id, pid)
                return
            run = seal(store, run, {"no_final_reading"})
            _export(store, run, config)
            others = store.running_jobs()
        if others:  # the sampler died while jobs run: restart it for them
            spawn_sampler(node, env)
            log.info("llem: restarted the node sampler for %s", node)
    log.info("llem epilog: job %s sealed on %s without a sampler", job_id, node)


def _export(store, run, config) -> None:
    from llem.node.export import export_and_deliver

    try:
        export_and_deliver(store, run.run_id, config)
    except Exception as e:  # noqa: BLE001 - the job is sealed; a later Epilog retries the outbox
        log.error("llem epilog: export of job %s failed: %s", run.job_id, e)


def slurmctld_epilog_body(env: Mapping[str, str]) -> None:
    from llem import config as config_mod
    from llem.cluster.header import write_header

    config = config_mod.load(env=env)
    path = write_header(config, env)
    log.info(
        "llem epilog-slurmctld: header of job %s written (%s)", env.get("SLURM_JOB_ID"), path.name
    )
