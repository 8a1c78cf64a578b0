"""Running ``llem aggregate`` as cron does (a subprocess through the real entry point), and the
spool of the crash-safety tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

from llem import slices
from llem.cluster.header import header_slice_from_env
from llem.slices import encode
from tests.helpers.nodes import ENV, T0, S, job_slices


def write_yaml(cfg, path: Path) -> Path:
    agg = cfg.aggregate
    path.write_text(
        f"cluster: {cfg.cluster}\nstate_dir: {cfg.state_dir}\nspool_dir: {cfg.spool_dir}\n"
        f"ledger: {cfg.ledger}\naggregate:\n  grace_s: {agg.grace_s}\n"
        f"  processed: {agg.processed}\n  batch_size: {agg.batch_size}\n"
        f"  readers: {agg.readers}\n"
    )
    return path


def aggregate_cli(cfg, *args, **popen):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env["LLEM_CONFIG"] = str(write_yaml(cfg, Path(cfg.spool_dir).parent / "llem.yaml"))
    cmd = [sys.executable, "-c", "from llem.cli.main import main; main()", "aggregate", *args]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def template_spool(tmp_path) -> tuple[Path, list]:
    """300 job slices of 100 three-node jobs (each node with its power series and a window
    that did work), a header and a truncated file."""
    template = tmp_path / "template"
    template.mkdir()
    base = job_slices(tmp_path / "gen", "1", work=2500.0, unit="tokens")
    items = []
    for j in range(100):
        for data in base:
            d = json.loads(json.dumps(data))
            d["job"]["job_id"] = str(1000 + j)
            d["job"]["start_ns"] += j * 7200 * S
            d["job"]["end_ns"] += j * 7200 * S
            for row in d["energy"]:
                row["hour_s"] += j * 7200
            for w in d["windows"]:
                w["start_ns"] += j * 7200 * S
                w["end_ns"] += j * 7200 * S
            for point in d.get("power", {}).get("points", []):
                point["t_s"] += j * 7200
            items.append(d)
    items.append(header_slice_from_env({**ENV, "SLURM_JOB_ID": "1000"}, "c1", now_ns=T0 + 5401 * S))
    for d in items:
        (template / slices.file_name(d)).write_bytes(encode(d))
    (template / "job.c1.n1.9-9.9.json").write_bytes(b'{"schema": "llem.slice/1", "ki')
    return template, items
