"""Who sees what (llem.gateway.privacy), and the SQL restriction it adds to every query."""

from __future__ import annotations

import os
import pwd
import subprocess

from llem.cluster.acct_queries import RunFilter, Visibility, select_runs
from llem.cluster.ledger import Ledger
from llem.config import Config, GatewayConfig
from llem.gateway.privacy import Caller, Policy, parse_sacctmgr_coordinators
from tests.helpers import make_ledger
from tests.helpers.acct import JOBS

SACCTMGR_OUT = "physics|carol,dave\nchem|\nbio|erin\n"
"""``sacctmgr -nP show account withcoord format=Account,Coordinators`` (Slurm 22.05)."""


def policy(run=None, clock=None, **gateway) -> Policy:
    cfg = Config(gateway=GatewayConfig(**gateway))
    kwargs = {"run": run} if run else {}
    if clock:
        kwargs["monotonic_s"] = clock
    return Policy(cfg, **kwargs)


def test_sacctmgr_coordinators_are_parsed():
    assert parse_sacctmgr_coordinators(SACCTMGR_OUT) == {
        "physics": ("carol", "dave"),
        "bio": ("erin",),
    }


def test_roles():
    p = policy(admins="alice,1234", coordinators={"physics": ("carol",)}, slurm_user="slurm")
    assert p.role(Caller(0, 0, "root")).visible is None
    assert p.role(Caller(5, 5, "slurm")).name == "admin"
    assert p.role(Caller(7, 7, "alice")).name == "admin"
    assert p.role(Caller(1234, 7, "zed")).name == "admin"
    carol = p.role(Caller(8, 8, "carol"))
    assert carol.name == "coordinator" and carol.visible == Visibility(8, ("physics",))
    assert p.role(Caller(9, 9, "bob")).visible == Visibility(9, ())
    nobody = Policy(Config(privacy="none"))
    assert nobody.role(Caller(9, 9, "bob")).visible is None


def test_admin_groups_count_supplementary_groups():
    me = pwd.getpwuid(os.getuid())
    groups = os.getgrouplist(me.pw_name, me.pw_gid)
    import grp

    name = grp.getgrgid(groups[0]).gr_name
    assert policy(admin_groups=name).is_admin(Caller(99999, me.pw_gid, me.pw_name))
    assert not policy(admin_groups="no-such-group-x").is_admin(Caller(99999, 12345, "zz"))


def test_sacctmgr_answers_are_cached_and_failures_keep_the_last_answer(caplog):
    calls = []
    now = [0.0]

    def run(cmd):
        calls.append(cmd)
        if len(calls) == 2:
            raise subprocess.CalledProcessError(1, cmd, "", "sacctmgr: error: slurmdbd down")
        return SACCTMGR_OUT

    p = policy(run=run, clock=lambda: now[0], coordinators_from_slurm=True)
    assert p.role(Caller(8, 8, "dave")).visible.accounts == ("physics",)
    now[0] = 100
    assert p.role(Caller(8, 8, "erin")).visible.accounts == ("bio",)
    assert len(calls) == 1  # cached
    now[0] = 400
    assert p.role(Caller(8, 8, "erin")).visible.accounts == ("bio",)  # failed: last answer kept
    assert "cannot read coordinators from sacctmgr: sacctmgr: error: slurmdbd down" in caplog.text
    assert calls[0][:3] == ["/usr/bin/sacctmgr", "-nP", "show"]


def test_the_restriction_selects_own_runs_and_coordinated_accounts(tmp_path):
    path = tmp_path / "ledger.db"
    jobs = [dict(j) for j in JOBS]
    jobs[1]["uid"] = 2000  # bob
    make_ledger.write_jobs(path, jobs)
    with Ledger(path, readonly=True) as ledger:

        def ids(visible):
            return [r[1] for r in select_runs(ledger, RunFilter(visible=visible))]

        assert ids(None) == ["5001", "5010", "5003"]
        assert ids(Visibility(1000)) == ["5001", "5003"]
        assert ids(Visibility(2000)) == ["5010"]
        assert ids(Visibility(3000, ("chem",))) == ["5010"]
        assert ids(Visibility(1000, ("chem",))) == ["5001", "5010", "5003"]
