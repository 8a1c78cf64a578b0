"""The llem SPANK plugin (spank/llem.c) on a real local Slurm: issue 8.

The tag is checked where srun/sbatch/salloc run and reaches Prolog and Epilog as
``SPANK_LLEM_ENERGY_TAG``; nothing the plugin does on the job side may fail a job or
drain a node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import SPANK_HEADER, TEST_USER, SlurmCluster

pytestmark = pytest.mark.slurm

SPANK_DIR = Path(__file__).resolve().parents[2] / "spank"
TAG_VAR = "SPANK_LLEM_ENERGY_TAG"
INVALID_MESSAGE = "llem: invalid --energy-tag"


@pytest.fixture(scope="module")
def build_tools() -> None:
    """Skip (a failure in CI) unless spank.h and the build tools are installed."""
    missing = [
        tool
        for tool in (str(SPANK_HEADER), "/usr/bin/make", "/usr/bin/nm")
        if not Path(tool).exists()
    ]
    if shutil.which(os.environ.get("CC", "cc")) is None:
        missing.append("a C compiler")
    if missing:
        pytest.skip(f"cannot build the SPANK plugin: missing {', '.join(missing)}")


def _make(*targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-C", str(SPANK_DIR), *targets],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def spank_cluster(slurm_module_cluster_factory, build_tools) -> SlurmCluster:
    """Two nodes, the plugin loaded `optional`, Prolog and Epilog dumping their environment.

    The plugin is built from spank/ and copied into the cluster's directory, which the
    test users can read (srun and sbatch load it as the submitting user).
    """
    res = _make("all")
    assert res.returncode == 0, res.stdout + res.stderr
    cluster = slurm_module_cluster_factory(nodes=2, start=False)
    so = cluster.prepare() / "llem.so"
    shutil.copy(SPANK_DIR / "llem.so", so)
    so.chmod(0o755)
    cluster.prolog = cluster.write_env_dump_script("prolog")
    cluster.epilog = cluster.write_env_dump_script("epilog")
    cluster.plugstack = [f"optional {so}"]
    cluster.start()
    return cluster


@pytest.fixture
def plugin_so(spank_cluster) -> Path:
    return spank_cluster.base_dir / "llem.so"


@pytest.fixture
def cluster(spank_cluster, plugin_so) -> SlurmCluster:
    """The module's cluster; after the test: no job left, plugstack.conf back to the default."""
    yield spank_cluster
    spank_cluster.cancel_all()  # a job wrongly accepted must not fail the next tests
    spank_cluster.write_plugstack([f"optional {plugin_so}"])
    assert spank_cluster.drained_nodes() == {}, spank_cluster.logs()


def _tags(cluster: SlurmCluster, job_id: str) -> dict[str, set[str | None]]:
    """What Prolog and Epilog saw as the tag, over all the job's nodes."""
    return {
        kind: {env.get(TAG_VAR) for env in cluster.env_dumps(kind, job_id).values()}
        for kind in ("prolog", "epilog")
    }


def _last_job_id(cluster: SlurmCluster) -> str:
    res = cluster.run(["scontrol", "show", "job", "-o"], timeout=10)
    ids = [int(tok.split("=")[1]) for tok in res.stdout.split() if tok.startswith("JobId=")]
    return str(max(ids))


# ----------------------------------------------------------------------------- build


def test_make_check_passes(build_tools):
    res = _make("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exports exactly" in res.stdout


def test_make_install_honours_destdir_and_paths(build_tools, tmp_path):
    res = _make(
        "install",
        f"DESTDIR={tmp_path}",
        "prefix=/opt/llem",
        "libdir=/opt/llem/lib64",
        "plugindir=/opt/llem/lib64/slurm",
        "sysconfdir=/opt/llem/etc",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "opt/llem/lib64/slurm/llem.so").is_file()
    snippet = (tmp_path / "opt/llem/etc/slurm/plugstack.conf.d/llem.conf").read_text()
    assert "optional /opt/llem/lib64/slurm/llem.so" in snippet


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("command", ["srun", "sbatch", "salloc"])
def test_help_shows_the_option(cluster, command):
    res = cluster.run([command, "--help"], user=TEST_USER)
    assert res.returncode == 0, res.output
    assert "--energy-tag=TAG" in res.stdout


def test_srun_tag_reaches_prolog_epilog_and_the_job(cluster):
    res = cluster.srun(["-N2", "--energy-tag=exp1", "/usr/bin/printenv", "LLEM_ENERGY_TAG"])
    assert res.returncode == 0, res.output
    assert res.stdout.split() == ["exp1", "exp1"]
    job = _last_job_id(cluster)
    cluster.wait_job(job)
    assert len(cluster.env_dumps("prolog", job)) == 2  # both nodes
    assert _tags(cluster, job) == {"prolog": {"exp1"}, "epilog": {"exp1"}}


def test_sbatch_tag_reaches_prolog_and_epilog(cluster):
    job = cluster.submit(["--energy-tag=exp2", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job) == {"prolog": {"exp2"}, "epilog": {"exp2"}}


def test_sbatch_directive_tag_reaches_prolog_and_epilog(cluster):
    script = "#!/bin/sh\n#SBATCH --energy-tag=exp3\n#SBATCH -N2\n/bin/true\n"
    job = cluster.submit(script=script)
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job) == {"prolog": {"exp3"}, "epilog": {"exp3"}}


def test_salloc_tag_reaches_prolog_and_epilog(cluster):
    res = cluster.run(["salloc", "--energy-tag=exp4", "/bin/true"], user=TEST_USER)
    assert res.returncode == 0, res.output
    job = _last_job_id(cluster)
    cluster.wait_job(job)
    assert _tags(cluster, job) == {"prolog": {"exp4"}, "epilog": {"exp4"}}


def test_environment_variable_is_the_fallback(cluster):
    job = cluster.submit(["--wrap", "/bin/true"], env={"LLEM_ENERGY_TAG": "from-env"})
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {"from-env"}

    job = cluster.submit(
        ["--energy-tag=from-option", "--wrap", "/bin/true"], env={"LLEM_ENERGY_TAG": "from-env"}
    )
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {"from-option"}


def test_no_tag_no_variable(cluster):
    job = cluster.submit(["--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job) == {"prolog": {None}, "epilog": {None}}


@pytest.mark.parametrize("tag", ["bad tag", "semi;colon", "", "x" * 65, "ünï", "a/b", "$(id)"])
def test_invalid_tag_is_refused_at_submission(cluster, tag):
    before = cluster.queued_jobs()
    res = cluster.submit([f"--energy-tag={tag}", "--hold", "--wrap", "/bin/true"], check=False)
    assert res.returncode != 0
    assert INVALID_MESSAGE in res.stderr
    assert "1 to 64 letters, digits" in res.stderr
    assert cluster.queued_jobs() == before == []

    res = cluster.srun([f"--energy-tag={tag}", "/bin/true"])
    assert res.returncode != 0
    assert INVALID_MESSAGE in res.stderr
    assert cluster.queued_jobs() == []


def test_longest_valid_tag_is_accepted(cluster):
    tag = "A-z_0.9" + "x" * 57
    assert len(tag) == 64
    job = cluster.submit([f"--energy-tag={tag}", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {tag}


# ----------------------------------------------------------------------------- plugin arguments


def test_default_tag_applies_when_none_given(cluster, plugin_so):
    cluster.write_plugstack([f"optional {plugin_so} default_tag=site-default"])
    job = cluster.submit(["--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {"site-default"}
    job = cluster.submit(["--energy-tag=mine", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {"mine"}


def test_required_tag_refuses_a_job_without_a_tag(cluster, plugin_so):
    # Slurm ignores errors of an `optional` plugin's callbacks: enforcing needs `required`.
    cluster.write_plugstack([f"required {plugin_so} required_tag=1"])
    res = cluster.submit(["--hold", "--wrap", "/bin/true"], check=False)
    assert res.returncode != 0
    assert "requires an energy tag" in res.stderr
    res = cluster.srun(["/bin/true"])
    assert res.returncode != 0
    assert "requires an energy tag" in res.stderr
    assert cluster.queued_jobs() == []

    job = cluster.submit(["--energy-tag=ok", "--wrap", "/bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    # srun steps inside a tagged job need no tag of their own
    job = cluster.submit(["--energy-tag=ok2", "--wrap", "srun /bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"


def test_invalid_environment_tag_with_an_optional_plugin_is_reported_and_dropped(cluster):
    res = cluster.srun(["/bin/true"], env={"LLEM_ENERGY_TAG": "no good"})
    assert "invalid LLEM_ENERGY_TAG='no good'" in res.stderr
    assert res.returncode == 0, res.output  # optional: Slurm ignores the plugin's error
    job = cluster.submit(["--wrap", "/bin/true"], env={"LLEM_ENERGY_TAG": "no good"})
    assert cluster.wait_job(job) == "COMPLETED"
    assert _tags(cluster, job)["prolog"] == {None}


def test_invalid_environment_tag_is_refused_with_a_required_plugin(cluster, plugin_so):
    cluster.write_plugstack([f"required {plugin_so}"])
    res = cluster.submit(
        ["--hold", "--wrap", "/bin/true"], env={"LLEM_ENERGY_TAG": "no good"}, check=False
    )
    assert res.returncode != 0
    assert "invalid LLEM_ENERGY_TAG='no good'" in res.stderr
    assert cluster.queued_jobs() == []


@pytest.mark.parametrize(
    "args, message",
    [
        ("colour=blue", "unknown plugin argument 'colour=blue'"),
        ("required_tag=2", "required_tag='2': expected 0 or 1"),
        ("required_tag=1x", "required_tag='1x': expected 0 or 1"),
        ("required_tag=", "required_tag='': expected 0 or 1"),
        ("default_tag=a b", "plugin argument 'b' is not key=value"),
        ("default_tag=a;b", "default_tag='a;b'"),
        ("verbose", "plugin argument 'verbose' is not key=value"),
    ],
)
def test_bad_plugin_arguments_are_reported(cluster, plugin_so, args, message):
    cluster.write_plugstack([f"optional {plugin_so} {args}"])
    res = cluster.srun(["/bin/true"])
    assert message in res.stderr
    # `optional`: reported, but the job runs and no node suffers.
    assert res.returncode == 0, res.output

    cluster.write_plugstack([f"required {plugin_so} {args}"])
    res = cluster.submit(["--hold", "--wrap", "/bin/true"], check=False)
    assert res.returncode != 0
    assert message in res.stderr
    assert cluster.queued_jobs() == []


def test_job_side_never_fails_on_bad_arguments(cluster, plugin_so):
    """The plugstack.conf the nodes read is broken: jobs still run, nodes stay up."""
    cluster.write_plugstack([f"optional {plugin_so} required_tag=1"])
    job = cluster.submit(["--energy-tag=t", "-N2", "--wrap", "/bin/sleep 1"])
    # What slurmstepd (batch and extern steps) and the Prolog's SPANK run will read:
    cluster.write_plugstack([f"required {plugin_so} colour=blue required_tag=maybe"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert cluster.drained_nodes() == {}


# ----------------------------------------------------------------------------- plugin absent


@pytest.mark.parametrize("kind", ["missing", "broken"])
def test_optional_plugin_missing_or_broken_leaves_jobs_running(
    slurm_cluster_factory, tmp_path, kind
):
    cluster = slurm_cluster_factory(nodes=2, start=False)
    so = cluster.prepare() / "llem.so"
    if kind == "broken":
        so.write_bytes(b"\x7fELF not really a shared object\n")
        so.chmod(0o755)
    cluster.plugstack = [f"optional {so}"]
    cluster.start()

    res = cluster.srun(["-N2", "/bin/true"])
    assert res.returncode == 0, res.output
    job = cluster.submit(["-N2", "--wrap", "srun /bin/true"])
    assert cluster.wait_job(job) == "COMPLETED"
    assert cluster.drained_nodes() == {}
    assert set(cluster.node_states().values()) == {"idle"}
