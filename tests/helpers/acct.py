"""The ``llem-acct`` tests' jobs, configuration and in-process runner.

The ledger of ``JOBS`` is written by ``tests.helpers.make_ledger``; the ``env`` fixture of
``tests/conftest.py`` builds it and points ``LLEM_CONFIG`` at ``CONFIG``.
"""

from click.testing import CliRunner

from llem.cli.acct import acct
from llem.cli.main import run
from tests.helpers import make_ledger

H = 3600
T = 1_772_359_200  # 2026-03-01T10:00:00Z
CONFIG = """cluster: c1
carbon:
  region: DE
  intensity_g_per_kwh: 400
  pue: 1.2
"""


def job(
    job_id,
    user,
    account,
    partition,
    start_s,
    end_s,
    nodes,
    *,
    gpus=0,
    cpu_w=100,
    dram_w=10,
    gpu_w=250,
    estimated=False,
    state="COMPLETED",
    windows=(),
    tag=None,
    array=None,
    name="train",
    cluster="c1",
    slurm=None,
):
    return {
        "cluster": cluster,
        "job_id": job_id,
        "array_job_id": array[0] if array else None,
        "array_task_id": array[1] if array else None,
        "user": user,
        "uid": 1000,
        "account": account,
        "partition": partition,
        "name": name,
        "tag": tag,
        "state": state,
        "start_s": start_s,
        "end_s": end_s,
        "nodes": list(nodes),
        "nodelist": make_ledger.nodelist(list(nodes)),
        "gpus_per_node": gpus,
        "cpu_w": cpu_w,
        "dram_w": dram_w,
        "gpu_w": gpu_w,
        "estimated": estimated,
        "coverage": 1.0,
        "windows": list(windows),
        "slurm": slurm,
    }


JOBS = [
    # 2 nodes x 2 h x (100 + 10 + 4 x 250 W) = 15,984,000 J
    job(
        "5001",
        "alice",
        "physics",
        "gpu",
        T,
        T + 2 * H,
        ["g0001", "g0002"],
        gpus=4,
        windows=[("train", "0", T + 600, T + 600 + H)],
    ),
    # array task 5009_1: 30 min x 220 W = 396,000 J, estimated
    job(
        "5010",
        "bob",
        "chem",
        "cpu",
        T + 3 * H,
        T + 3 * H + 1800,
        ["c0001"],
        cpu_w=200,
        dram_w=20,
        estimated=True,
        state="FAILED",
        array=("5009", "1"),
        name="sim",
    ),
    # next day: 300 s x 55 W = 16,500 J
    job(
        "5003",
        "alice",
        "physics",
        "cpu",
        T + 23 * H,
        T + 23 * H + 300,
        ["c0002"],
        cpu_w=50,
        dram_w=5,
        tag="exp-1",
        name="prep",
    ),
]


def acct_run(*args):
    """Run the command as llem-acct does (errors through llem.cli.main.run)."""
    runner = CliRunner()
    result = {}

    def body():
        result["status"] = run(acct, list(args), prog_name="llem-acct")

    with runner.isolation() as streams:  # (stdout, stderr, mixed output) in click 8.2
        body()
        return result["status"], streams[0].getvalue().decode(), streams[1].getvalue().decode()


WHOLE = ("-a", "-S", "2026-03-01", "-E", "2026-03-03")


FILTERS = [
    (("-u", "bob"), ["5009_1"]),
    (("-A", "physics", "-X"), ["5001", "5003"]),
    (("-r", "gpu"), ["5001", "5001.train"]),
    (("-s", "F"), ["5009_1"]),
    (("-s", "CD", "-X"), ["5001", "5003"]),
    (("-N", "g[0002-0003]", "-X"), ["5001"]),
    (("-j", "5009_1"), ["5009_1"]),
    (("-j", "5009"), ["5009_1"]),
    (("-j", "5001.train"), ["5001.train"]),
    (("-j", "5001.0"), ["5001.train"]),
    (("-j", "5001", "-X"), ["5001"]),
    (("-j", "5001.train,5003"), ["5001.train", "5003"]),
    (("-j", "5001.train", "-X"), []),
    (("-j", "5009_1.0"), []),
    (("-j", "5009_2"), []),
    (("-j", "5001.nope"), []),
    (("-S", "2026-03-01T14:00", "-X"), ["5003"]),
    (("-E", "0301", "-S", "022826"), []),
    (("-E", "2026-03-01T12:30"), ["5001", "5001.train"]),
    (("-M", "other"), []),
    (("--name", "sim,prep"), ["5009_1", "5003"]),
]
"""Selections of ``llem-acct`` and the job ids each selects from ``JOBS`` (``-P -n -o JobID``,
within ``WHOLE`` unless the selection sets its own times or jobs)."""
