"""Node metrics on a real local Slurm: the sampler started by the real Prolog writes the job
into node_exporter's textfile and dcgm-exporter's job mapping while it runs, and takes it out
after the Epilog (here the sampler then exits at once: linger_s 0, its last write included)."""

from __future__ import annotations

import re
import time

import pytest

from tests.promstack import promtool_check_metrics

from .harness import TEST_USER
from .llem_site import Site, burn

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.textfiles = s.base / "textfile"
    s.dcgm = s.base / "dcgm"
    for d in (s.textfiles, s.dcgm):
        d.mkdir(mode=0o755)
    s.write_config(
        f"cluster: llemtest\nstate_dir: {s.state_dir}\nrun_dir: {s.run_dir}\n"
        f"spool_dir: {s.spool_dir}\nledger: {s.state_dir / 'ledger.db'}\n"
        "sampler:\n  interval_s: 0.5\n  linger_s: 0\n"
        f"metrics:\n  textfile_dir: {s.textfiles}\n  dcgm_job_mapping_dir: {s.dcgm}\n"
    )
    s.hw.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, site):
    c = slurm_module_cluster_factory(
        nodes=1, gpus_per_node=2, name="llemmetrics", node_prefix="p", port_base=17400, start=False
    )
    site.install_hooks(c, ("prolog", "epilog"))
    c.start()
    return c


def _poll(what, check, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def test_a_running_job_is_in_the_textfile_and_the_gpu_mapping_until_its_epilog(cluster, site):
    node = cluster.nodes[0]
    # The job runs until the test has seen it in the textfile and the mapping (at most 60 s):
    # a job of fixed length could end before a sampler slow to start on a loaded machine
    # showed it, and the mapping would be empty again by the time the test looked.
    release = site.out / "release-metrics-job"
    wait = f"for i in $(seq 600); do [ -e {release} ] && break; sleep 0.1; done"
    job = cluster.submit(
        ["-w", node, "-n1", "--gres=gpu:1", "--wrap", f"{burn(1)}; {wait}"],
        user=TEST_USER,
        env=site.user_env,
    )
    textfile = site.textfiles / f"llem_node_{node}.prom"
    gpu_energy = re.compile(
        rf'llem_job_energy_joules_total{{node="{node}",jobid="{job}",'
        r'component="gpu",source="measured"} ([0-9.e+]+)'
    )

    def job_has_gpu_energy():
        m = gpu_energy.search(_read(textfile))
        return m and float(m.group(1)) > 0 and m

    _poll("the job's GPU energy in the textfile", job_has_gpu_energy, 30)
    text = textfile.read_text()
    assert f'llem_job_info{{node="{node}",jobid="{job}",user="{TEST_USER}"' in text
    assert f'llem_node_running_jobs{{node="{node}"}} 1' in text
    lint = promtool_check_metrics(text)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint
    mapping = _poll(
        "the GPU job mapping",
        lambda: [p.name for p in site.dcgm.iterdir() if _read(p) == f"{job}\n"],
        10,
    )
    assert len(mapping) == 1 and mapping[0] in ("0", "1")

    release.touch()
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    _poll(
        "the job to leave the textfile",
        lambda: textfile.exists() and f'jobid="{job}"' not in _read(textfile),
        20,
    )
    assert f'llem_node_running_jobs{{node="{node}"}} 0' in textfile.read_text()
    _poll("the GPU job mapping to empty", lambda: _read(site.dcgm / mapping[0]) == "", 10)
