"""Tests against a real local Slurm (marker ``slurm``), and the harness that runs it.

Needs root and Slurm 22.05 (``scripts/install-slurm.sh`` installs it on Debian 12). Without
them the tests skip; with ``CI=true`` a skip of a ``slurm`` test is a failure.

Writing a new test (put it in this directory, so that its fixtures and hooks apply)::

    import pytest

    pytestmark = pytest.mark.slurm

    def test_something(slurm_cluster):             # shared: 3 nodes x 2 fake GPUs
        job = slurm_cluster.submit(["-N2", "--wrap", "/bin/true"])   # as llemtest
        assert slurm_cluster.wait_job(job) == "COMPLETED"
        env = slurm_cluster.env_dumps("prolog", job)   # node -> Prolog environment
        assert slurm_cluster.drained_nodes() == {}

    def test_my_prolog(slurm_cluster_factory):      # a cluster of your own
        cluster = slurm_cluster_factory(nodes=2, gpus_per_node=2, start=False)
        cluster.prolog = cluster.write_script("prolog.sh", "#!/bin/bash\\n...\\nexit 0\\n")
        cluster.epilog = "/abs/path/to/repo/slurm/epilog.sh"
        cluster.start()                             # ~0.3 s; stopped after the test
        ...

See :class:`harness.SlurmCluster` for the options (``nodes``, ``gpus_per_node``,
``cpus_per_node``, ``prolog``, ``epilog``, ``prolog_slurmctld``, ``epilog_slurmctld``,
``plugstack``, ``extra_conf``, ``env``) and helpers (``submit``, ``srun``, ``run``,
``wait_job``, ``job_info``, ``queued_jobs``, ``cancel_all``, ``node_states``,
``drained_nodes``, ``write_script``, ``write_env_dump_script``, ``env_dumps``,
``write_plugstack``, ``logs``).
"""
