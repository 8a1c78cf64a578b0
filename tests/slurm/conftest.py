"""Fixtures for tests against a real local Slurm (see harness.py and docs in its docstring).

- ``slurm_cluster`` (session): 3 nodes, 2 fake GPUs each; its Prolog and Epilog dump their
  environment (``slurm_cluster.env_dumps("prolog", job_id)``).
- ``slurm_cluster_factory`` (function) and ``slurm_module_cluster_factory`` (module): build
  clusters with your own options (``prolog=``, ``epilog=``, ``plugstack=``, ...); they are
  stopped when the test (or the module) ends.

Every test here carries ``@pytest.mark.slurm``. Without Slurm or without root they skip;
with ``CI=true`` in the environment such a skip is reported as a failure instead.
"""

from __future__ import annotations

import os

import pytest

from .harness import (
    TEST_USER,
    TEST_USER2,
    ClusterFactory,
    SlurmCluster,
    ensure_user,
    missing_requirements,
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("slurm") is None:
        return
    if report.skipped and _in_ci() and not hasattr(report, "wasxfail"):
        # In CI a real-Slurm test must run: a skip would hide a broken installation.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"slurm test skipped with CI=true (a skip is a failure in CI): {reason}"
    elif report.failed and SlurmCluster.running:
        for cluster in SlurmCluster.running:
            report.sections.append((f"slurm logs of cluster {cluster.name}", cluster.logs()))


@pytest.fixture(scope="session")
def slurm_available() -> None:
    """Skip unless a real cluster can run here; create the test users."""
    problems = missing_requirements()
    if problems:
        pytest.skip("real Slurm unavailable: " + "; ".join(problems))
    ensure_user(TEST_USER)
    ensure_user(TEST_USER2)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_available) -> SlurmCluster:
    """A running 3-node cluster with 2 fake GPUs a node, shared by the whole session."""
    cluster = SlurmCluster(nodes=3, gpus_per_node=2, name="llemtest", node_prefix="n")
    try:
        cluster.prepare()
        cluster.prolog = cluster.write_env_dump_script("prolog")
        cluster.epilog = cluster.write_env_dump_script("epilog")
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_cluster_factory(slurm_available) -> ClusterFactory:
    """``factory(**SlurmCluster kwargs)`` -> a started cluster, stopped after the test."""
    factory = ClusterFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def slurm_module_cluster_factory(slurm_available) -> ClusterFactory:
    """Like ``slurm_cluster_factory``, but the clusters live until the module ends."""
    factory = ClusterFactory()
    try:
        yield factory
    finally:
        factory.close()
