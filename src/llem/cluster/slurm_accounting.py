"""Slurm's accounting as the authority for job facts: ``sacct`` reconciled into the ledger.

EpilogSlurmctld cannot tell a completed job from a cancelled or timed-out one (Slurm 22.05
gives it exit code ``0:0`` for all three), nor does it know submit and eligible times, the
time limit or the allocation. Where the admin host can run ``sacct`` (slurmdbd configured),
``llem aggregate`` asks it about the jobs it merged, after each pass:

* batched (``aggregate.sacct_batch`` jobs per ``sacct -j`` call) and bounded in time
  (``aggregate.sacct_timeout_s`` for all the calls of a pass together);
* only jobs that ended ``aggregate.sacct_settle_s`` ago (slurmdbd records a job's end a
  moment after it), and none that Slurm has already answered for;
* a job whose record is not there yet (or not final) is asked again later, with a growing
  delay (one minute, doubling, at most a day), :data:`MAX_TRIES` times at most;
* when ``sacct`` fails (slurmdbd down, a time-out) the jobs are left for a later pass and the
  pass goes on: merging never waits for Slurm's accounting.

Slurm's record wins over the header for the state, exit code and derived exit code; it adds
submit and eligible times, Slurm's own start and end, the time limit, AllocCPUS, AllocTRES
and ReqMem (see docs/ledger.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llem.config import Config
from llem.units import NS_PER_S

log = logging.getLogger(__name__)

MAX_TRIES = 12
"""How many times a job is asked about before llem stops asking (about two weeks)."""
FAILURE_RETRY_S = 300.0
"""How long jobs wait after ``sacct`` itself failed (slurmdbd down) before the next try."""
CANDIDATES_PER_PASS = 20000
"""At most this many jobs are asked about in one pass (the rest in the next ones)."""

SACCT_FIELDS = (
    "JobIDRaw",
    "State",
    "ExitCode",
    "DerivedExitCode",
    "Submit",
    "Eligible",
    "Start",
    "End",
    "Timelimit",
    "TimelimitRaw",
    "AllocCPUS",
    "AllocTRES",
    "ReqMem",
    "QOS",
)
"""The fields asked of ``sacct``, in order."""

FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REQUEUED",
        "REVOKED",
        "TIMEOUT",
    }
)
"""States after which a run's record no longer changes (REQUEUED: a run that ended in a
requeue; the job's next run has a record of its own)."""


@dataclass
class ReconcileResult:
    """What one reconciliation did."""

    asked: int = 0
    """Jobs asked about."""
    records: int = 0
    """Records of runs new or changed in the ledger."""
    calls: int = 0
    error: str | None = None
    """Why ``sacct`` failed (the jobs are asked again later), or None."""
    skipped: str | None = None
    """Why nothing was asked (``sacct`` off or absent), or None."""
    deferred: list[str] = field(default_factory=list)


SLURM_CONF_PATHS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf")
"""Where ``auto`` looks for a Slurm configuration when ``SLURM_CONF`` is not set."""


def sacct_path(config: Config) -> str | None:
    """The ``sacct`` to run: ``aggregate.sacct`` (a path); for ``auto``, ``sacct`` from PATH
    on a host with a Slurm configuration (``SLURM_CONF``, or one of
    :data:`SLURM_CONF_PATHS`); else None. A configless Slurm host names sacct's path."""
    setting = config.aggregate.sacct
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    conf = os.environ.get("SLURM_CONF")
    if not any(os.path.isfile(p) for p in ([conf] if conf else SLURM_CONF_PATHS)):
        return None
    return shutil.which("sacct")


def retry_delay_ns(tries: int) -> int:
    """How long after its ``tries``-th unanswered try a job is asked again."""
    return int(min(60 * 2 ** max(0, tries - 1), 86400) * NS_PER_S)


def _epoch_ns(text: str) -> int | None:
    text = text.strip()
    return int(text) * NS_PER_S if text.isdigit() else None


def _exit_pair(text: str) -> tuple[int | None, int | None]:
    exit_s, sep, sig_s = text.strip().partition(":")
    if sep and exit_s.isdigit() and sig_s.isdigit():
        return int(exit_s), int(sig_s)
    return None, None


def parse_sacct(text: str, cluster: str) -> list[tuple]:
    """``sacct -P -n`` lines of :data:`SACCT_FIELDS` (times as epoch seconds) into rows of
    ``slurm_jobs`` (without ``checked_ns``): final states of runs that started only."""
    rows = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_FIELDS):
            continue
        values = dict(zip(SACCT_FIELDS, parts))
        job_id = values["JobIDRaw"].strip()
        words = values["State"].split()  # "CANCELLED by 1001": who cancelled it
        state = (words or [""])[0].rstrip("+")
        by = words[2] if len(words) == 3 and words[1] == "by" and words[2].isdigit() else None
        start_ns = _epoch_ns(values["Start"])
        if not job_id.isdigit() or state not in FINAL_STATES or start_ns is None:
            continue
        exit_code, signal = _exit_pair(values["ExitCode"])
        derived, derived_signal = _exit_pair(values["DerivedExitCode"])
        cpus = values["AllocCPUS"].strip()
        raw_limit = values["TimelimitRaw"].strip()  # minutes, or UNLIMITED, Partition_Limit
        rows.append(
            (
                cluster,
                job_id,
                start_ns,
                _epoch_ns(values["End"]),
                _epoch_ns(values["Submit"]),
                _epoch_ns(values["Eligible"]),
                state,
                exit_code,
                signal,
                derived,
                derived_signal,
                values["Timelimit"].strip() or None,
                int(raw_limit) if raw_limit.isdigit() else None,
                int(cpus) if cpus.isdigit() else None,
                values["AllocTRES"].strip() or None,
                values["ReqMem"].strip() or None,
                values["QOS"].strip() or None,
                int(by) if by is not None else None,
            )
        )
    return rows


def run_sacct(
    sacct: str, cluster: str, job_ids: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess:
    """One ``sacct`` call for these jobs (allocations only, every run of a requeued job).

    Raises:
        OSError: sacct cannot be started.
        subprocess.TimeoutExpired: it did not answer within ``timeout_s``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SACCT_", "SLURM_TIME"))}
    env["SLURM_TIME_FORMAT"] = "%s"  # epoch seconds: no time zone to guess
    cmd = [
        sacct,
        "--allocations",
        "--duplicates",
        "--noheader",
        "--parsable2",
        "--delimiter=|",
        f"--clusters={cluster}",
        f"--format={','.join(SACCT_FIELDS)}",
        f"--jobs={','.join(job_ids)}",
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def reconcile(config: Config, ledger, *, now_ns: int | None = None) -> ReconcileResult:
    """Ask ``sacct`` about the ledger's jobs that Slurm has not answered for yet, and store
    its records (see the module's docstring). Never raises for a ``sacct`` problem."""
    result = ReconcileResult()
    sacct = sacct_path(config)
    if sacct is None:
        result.skipped = (
            "aggregate.sacct is off" if config.aggregate.sacct == "off" else ("no sacct on PATH")
        )
        return result
    now_ns = time.time_ns() if now_ns is None else now_ns
    settle_ns = int(config.aggregate.sacct_settle_s * NS_PER_S)
    candidates = ledger.accounting_candidates(
        ended_before_ns=now_ns - settle_ns,
        now_ns=now_ns,
        max_tries=MAX_TRIES,
        limit=CANDIDATES_PER_PASS,
    )
    if not candidates:
        return result
    by_cluster: dict[str, list[str]] = {}
    not_slurm: dict[str, list[str]] = {}
    for cluster, job_id in candidates:
        # Only Slurm's job ids reach sacct's command line (a slice's id is any identifier).
        target = by_cluster if job_id.isdigit() else not_slurm
        target.setdefault(cluster, []).append(job_id)
    for cluster, job_ids in sorted(not_slurm.items()):
        ledger.store_accounting(
            cluster,
            [],
            job_ids,
            now_ns=now_ns,
            retry_ns=retry_delay_ns,
            grace_s=config.aggregate.grace_s,
        )
    deadline = time.monotonic() + config.aggregate.sacct_timeout_s
    batch = max(1, config.aggregate.sacct_batch)
    for cluster, job_ids in sorted(by_cluster.items()):
        for i in range(0, len(job_ids), batch):
            part = job_ids[i : i + batch]
            left = deadline - time.monotonic()
            if left <= 0:
                log.info(
                    "sacct: time budget spent; %d job(s) left for the next pass", len(job_ids) - i
                )
                return result
            error = _ask(config, ledger, sacct, cluster, part, left, now_ns, result)
            if error is not None:
                result.error = error
                _defer_rest(ledger, by_cluster, cluster, job_ids[i:], now_ns)
                log.warning(
                    "sacct failed (%s); Slurm's job states will be fetched in a later pass",
                    error,
                )
                return result
    return result


def _ask(
    config: Config,
    ledger,
    sacct: str,
    cluster: str,
    job_ids: list[str],
    timeout_s: float,
    now_ns: int,
    result: ReconcileResult,
) -> str | None:
    """One call and its records stored; returns why sacct failed, or None."""
    result.calls += 1
    try:
        proc = run_sacct(sacct, cluster, job_ids, timeout_s)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:.0f} s"
    except OSError as e:
        return f"cannot run {sacct}: {e}"
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split())[:300] or f"exit status {proc.returncode}"
        return message
    rows = parse_sacct(proc.stdout, cluster)
    result.asked += len(job_ids)
    result.records += ledger.store_accounting(
        cluster,
        rows,
        job_ids,
        now_ns=now_ns,
        retry_ns=retry_delay_ns,
        grace_s=config.aggregate.grace_s,
    )
    return None


def _defer_rest(
    ledger,
    by_cluster: dict[str, list[str]],
    failed_cluster: str,
    failed_rest: Iterable[str],
    now_ns: int,
) -> None:
    """sacct failed: every job not asked yet waits :data:`FAILURE_RETRY_S`."""
    next_ns = now_ns + int(FAILURE_RETRY_S * NS_PER_S)
    started = False
    for cluster, job_ids in sorted(by_cluster.items()):
        if cluster == failed_cluster:
            started = True
            ledger.defer_accounting(cluster, failed_rest, next_ns)
        elif started:
            ledger.defer_accounting(cluster, job_ids, next_ns)
