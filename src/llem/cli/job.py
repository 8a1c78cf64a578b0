"""``llem job JOBID``: one job's energy by node and device, power timeline, windows, CO2e."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from llem.errors import LlemError
from llem.safetext import safe_text


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def refusal(run: dict, uid: int, user: str) -> str | None:
    """Why ``user`` (``uid``) may not see the run, or None: its owner (by uid or name) and
    root may. (Whoever reads the ledger file could read the run anyway: a convenience, not a
    privacy boundary; the gateway is that boundary, docs/security.md.)"""
    if uid == 0 or run.get("uid") == uid or (run.get("user") and run["user"] == user):
        return None
    return (
        f"job {safe_text(run['job_id'])} is {safe_text(run.get('user') or '?')}'s: llem job "
        "shows a user their own jobs (root: every job)"
    )


def _write(path: Path, data: bytes) -> None:
    from llem.fsutil import write_atomic

    try:  # 0o666: the umask decides, as for any file the user writes
        write_atomic(path.parent, path.name, data, 0o666)
    except OSError as e:
        raise LlemError(f"{path}: cannot write: {e.strerror or e}") from e


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job_id")
@click.option("--cluster", "-M", help="The job's cluster (default: this cluster).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (llem.job/1) on stdout.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the power timeline into this PNG file (needs llem[report]).",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML page of the job.",
)
@click.option(
    "--ledger",
    type=click.Path(dir_okay=False),
    help="The ledger, or the gateway that serves it (its socket's path, or llem://HOST[:PORT]).",
)
def job(
    job_id: str,
    cluster: str | None,
    as_json: bool,
    plot: Path | None,
    html_file: Path | None,
    ledger: str | None,
) -> None:
    """Show one job: energy by node and device, average and peak power, the energy of
    its GPUs while idle, coverage and flags in plain words, CO2e with its provenance,
    its windows with energy per unit of work, and a power timeline.

    JOBID is a Slurm job id or an array task (1234_7); the latest run of a requeued job is
    shown. A user sees their own jobs; root sees every job. Through the ledger gateway
    ('ledger: llem://HOST', its socket, or when the ledger file is private and the gateway's
    socket is here) coordinators see their accounts' jobs and admins every job.

    \b
    Examples:
      llem job 1234
      llem job 1234 --plot power.png --html job.html
    """
    from llem import config as config_mod
    from llem.gateway import client
    from llem.report import jobview
    from llem.slices import is_identifier

    if not is_identifier(job_id):
        raise click.BadParameter("a Slurm job id such as 1234 or 1234_7", param_hint="JOBID")
    cfg = config_mod.load()
    target = client.target_for(str(ledger or cfg.ledger), cfg.gateway.socket)
    if target is not None:
        view = _remote_view(target, cfg, job_id, cluster)
    else:
        view = _local_view(cfg, job_id, cluster, ledger)
    if plot is not None:
        from llem.report import require

        require("matplotlib")
        _write(plot, jobview.render_png(view))
    if html_file is not None:
        _write(html_file, jobview.render_html(view).encode())
    if as_json:
        sys.stdout.write(json.dumps(view) + "\n")
    else:
        sys.stdout.write(jobview.render_text(view))
    sys.stdout.flush()


def _remote_view(target, cfg, job_id: str, cluster: str | None) -> dict:
    """The job's ``llem.job/1`` view from the gateway (which decides what the caller may
    see, and builds the view with the ledger host's carbon settings)."""
    from llem.gateway import client, wire

    request = wire.Request(op="job", cluster=cfg.cluster, job=wire.JobRequest(job_id, cluster))
    answer = client.ask(target, request, munge_socket=cfg.gateway.munge_socket)
    view = answer.get("view")
    if not isinstance(view, dict) or view.get("schema") != "llem.job/1":
        raise LlemError(f"the gateway at {target} did not answer with a llem.job/1 document")
    return view


def _local_view(cfg, job_id: str, cluster: str | None, ledger: str | None) -> dict:
    """The job's view from a ledger this user reads (its owner or root may see it)."""
    from llem.cluster.acct_queries import open_ledger
    from llem.cluster.job_queries import clusters_of_job, load_job
    from llem.report import jobview

    explicit = cluster is not None
    cluster = cluster or cfg.cluster
    with open_ledger(ledger or cfg.ledger) as led:
        data = load_job(led, cluster, job_id)
        if data is None and not explicit:
            # This cluster has no such job: one other cluster of the ledger may (a shared
            # ledger, or a cluster named differently in Slurm and in the configuration).
            others = clusters_of_job(led, job_id)
            if len(others) == 1:
                cluster = others[0]
                data = load_job(led, cluster, job_id)
            elif len(others) > 1:
                raise LlemError(
                    f"job {safe_text(job_id)} is on clusters {safe_text(', '.join(others))}: "
                    "choose one with --cluster"
                )
    if data is None:
        raise LlemError(
            f"no job {safe_text(job_id)} on cluster {safe_text(cluster)} in the ledger (it "
            "reaches the ledger after its Epilog and the next aggregation pass)"
        )
    refused = refusal(data.run, os.getuid(), _current_user())
    if refused is not None:
        raise LlemError(refused)
    carbon = carbon_error = None
    try:
        from llem.acct.co2e import resolve_carbon

        carbon = resolve_carbon(cfg)
    except (LlemError, ValueError) as e:
        carbon_error = f"carbon: {e}"
    return jobview.build(data, carbon, carbon_error, cfg.attribution.idle_w)
