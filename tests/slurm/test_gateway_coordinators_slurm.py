"""Account coordinators read from the real ``sacctmgr`` by a real ``llem serve``.

A cluster with slurmdbd and MariaDB; accounts, users and a coordinator made with the real
``sacctmgr`` (A in physics and chem, B in physics, bio and physics' sub-account hep, COORD
coordinator of physics); a private ledger built by ``llem aggregate`` from the jobs' slices
(:data:`JOBS`); a gateway with ``gateway.coordinators_from_slurm: true`` and no coordinator in
its configuration. Run under the machine's Slurm-test lock::

    flock /tmp/llem-slurm-tests.lock .venv/bin/python -m pytest tests/slurm/test_gateway_coordinators_slurm.py -q
"""

from __future__ import annotations

import pytest

from llem.gateway.privacy import SACCTMGR, parse_sacctmgr_coordinators
from tests.helpers.acct import CONFIG
from tests.helpers.gateway import ADMIN_GROUP, COORD, SERVICE, SINCE, A, B, Site

pytestmark = pytest.mark.slurm

FIELDS = ("-X", "-P", "-n", "-o", "JobID,User,Account")
JOBS = (
    ("101", A, "physics"),
    ("102", A, "chem"),
    ("201", B, "physics"),
    ("202", B, "bio"),
    ("203", B, "hep"),
)


class SlurmSite(Site):
    """The gateway site, with Slurm's client configuration in the gateway's environment."""

    slurm_conf = ""

    def service_env(self) -> dict[str, str]:
        return {**super().service_env(), "SLURM_CONF": self.slurm_conf}


@pytest.fixture(scope="module")
def cluster(slurm_module_cluster_factory, slurm_available):
    from .harness import missing_accounting_requirements

    problems = missing_accounting_requirements()
    if problems:
        pytest.skip("slurmdbd or MariaDB missing: " + "; ".join(problems))
    return slurm_module_cluster_factory(
        nodes=1, name="llemcoord", node_prefix="k", port_base=17600, accounting=True
    )


def gw(site) -> tuple[str, ...]:
    """``llem-acct`` options: every user's jobs (as far as the caller may see) through ``site``'s
    gateway."""
    return ("-a", "--ledger", str(site.socket), *SINCE)


def sacctmgr(cluster, *args: str, user: str | None = None) -> str:
    r = cluster.run([SACCTMGR, *args], user=user, timeout=30)
    assert r.returncode == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def site(cluster):
    s = SlurmSite(JOBS)
    try:
        add = ("-i", "add")
        for account in ("physics", "chem", "bio", "ops"):
            sacctmgr(cluster, *add, "account", account, f"cluster={cluster.name}")
        sacctmgr(cluster, *add, "account", "hep", "parent=physics", f"cluster={cluster.name}")
        for user, accounts in ((A, "physics,chem"), (B, "physics,bio,hep"), (COORD, "ops")):
            sacctmgr(cluster, *add, "user", user, f"account={accounts}", f"cluster={cluster.name}")
        sacctmgr(cluster, *add, "coordinator", "account=physics", f"names={COORD}")
        s.slurm_conf = str(cluster.conf_path)
        s.config.write_text(
            CONFIG
            + f"ledger: {s.ledger}\n"
            + "gateway:\n"
            + f"  socket: {s.socket}\n"
            + f"  admin_groups: {ADMIN_GROUP}\n"
            + "  coordinators_from_slurm: true\n"
        )
        s.start()
        yield s
    finally:
        s.close()


def test_sacctmgr_real_output_parses_to_the_coordinators(cluster, site):
    """The exact command the gateway runs, as root and as a plain user, on Slurm's answer."""
    from .harness import TEST_USER

    for user in (None, TEST_USER):
        text = sacctmgr(
            cluster, "-nP", "show", "account", "withcoord", "format=Account,Coordinators", user=user
        )
        # Slurm's own rule: a coordinator of physics coordinates its sub-account hep too.
        assert parse_sacctmgr_coordinators(text) == {"hep": (COORD,), "physics": (COORD,)}, text


def test_the_coordinator_sees_exactly_the_physics_jobs(site):
    """physics and, as Slurm says, its sub-account hep; nothing of chem or bio."""
    r = site.acct(COORD, *gw(site), *FIELDS)
    assert r.returncode == 0, r.stderr + site.log.read_text()
    assert r.stdout.splitlines() == [
        "101|llemt-a|physics",
        "201|llemt-b|physics",
        "203|llemt-b|hep",
    ]
    r = site.acct(COORD, *gw(site), "--totals", "account", "-P", "-n")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split("|")[0] for line in r.stdout.splitlines()) == ["hep", "physics"]


def test_a_plain_user_sees_only_their_own_jobs(site):
    r = site.acct(A, *gw(site), *FIELDS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["101|llemt-a|physics", "102|llemt-a|chem"]
    r = site.acct(A, *gw(site), "--totals", "account", "-P", "-n")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split("|")[0] for line in r.stdout.splitlines()) == ["chem", "physics"]
    r = site.acct(B, *gw(site), *FIELDS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["201|llemt-b|physics", "202|llemt-b|bio", "203|llemt-b|hep"]


def test_the_gateway_log_names_no_sacctmgr_failure(site):
    site.acct(COORD, *gw(site), *FIELDS)
    assert "cannot read coordinators" not in site.log.read_text()


def test_with_private_accounts_the_gateway_reads_no_coordinators_and_says_why(cluster, site):
    """slurmdbd's ``PrivateData=accounts`` refuses the listing to a user who coordinates none,
    such as the gateway's: the lookup fails closed (no coordinator) and the log says why."""
    conf = cluster.conf_path.with_name("slurmdbd.conf")
    before = conf.read_text()
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from llem.config import load\n"
        "from llem.gateway.privacy import Policy\n"
        "print(Policy(load()).coordinators())\n"
    )
    try:
        cluster.stop_slurmdbd()
        conf.write_text(before + "PrivateData=accounts\n")
        cluster.start_slurmdbd()
        cmd = ("-nP", "show", "account", "withcoord", "format=Account,Coordinators")
        coordinator = sacctmgr(cluster, *cmd, user=COORD)
        assert parse_sacctmgr_coordinators(coordinator) == {"hep": (COORD,), "physics": (COORD,)}
        r = site.as_user(SERVICE, code, env=site.service_env())
        assert r.returncode == 0, r.stderr
        assert r.stdout == "{}\n"
        assert "cannot read coordinators from sacctmgr: sacctmgr: error: Access/permission" in (
            r.stderr
        )
        assert "PrivateData=accounts" in r.stderr
    finally:
        cluster.stop_slurmdbd()
        conf.write_text(before)
        cluster.start_slurmdbd()
