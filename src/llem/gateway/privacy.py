"""Who may see which runs: Slurm's ``PrivateData=jobs,usage``, enforced by the gateway.

The caller's identity comes from the kernel (``SO_PEERCRED``) or munged (a MUNGE
credential), never from the request. From it and the configuration:

* admins see every run: root, ``gateway.slurm_user``, ``gateway.admins`` and members of
  ``gateway.admin_groups``;
* account coordinators see every run of their accounts (``gateway.coordinators``, and with
  ``gateway.coordinators_from_slurm`` what ``sacctmgr`` says, cached for
  :data:`COORDINATORS_TTL_S`);
* everyone else sees their own runs.

Totals (``--totals``, ``--statement``) sum only what the caller may see, so a user's totals
are over their own jobs, a coordinator's over their accounts'. ``privacy: none`` lets everyone
see everything, as before the gateway.
"""

from __future__ import annotations

import grp
import logging
import pwd
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llem.cluster.acct_queries import Visibility
from llem.safetext import safe_text

log = logging.getLogger(__name__)

COORDINATORS_TTL_S = 300.0
SACCTMGR = "/usr/bin/sacctmgr"
SACCTMGR_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the kernel or munged says; ``user`` from the gateway's passwd."""

    uid: int
    gid: int
    user: str

    @classmethod
    def of(cls, uid: int, gid: int) -> Caller:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(uid, gid, name)


@dataclass(frozen=True)
class Role:
    """What a caller may see: ``visible`` None means everything.

    Attributes:
        name: ``admin``, ``coordinator``, ``user`` (or ``everyone`` with privacy none).
        visible: the restriction added to every query.
    """

    name: str
    visible: Visibility | None

    def describe(self) -> str:
        if self.visible is None:
            return "every job" if self.name != "everyone" else "every job (privacy: none)"
        if self.visible.accounts:
            return f"your own jobs and those of account(s) {', '.join(self.visible.accounts)}"
        return "your own jobs"


def parse_sacctmgr_coordinators(text: str) -> dict[str, tuple[str, ...]]:
    """``sacctmgr -nP show account withcoord format=Account,Coordinators`` -> account ->
    coordinators (the second field is comma-separated; empty for none)."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        account, sep, coords = line.partition("|")
        if not sep or not account.strip():
            continue
        users = tuple(u.strip() for u in coords.strip().rstrip("|").split(",") if u.strip())
        if users:
            out[account.strip()] = users
    return out


class Policy:
    """Roles from the configuration (and Slurm's coordinators, cached).

    Args:
        config: the gateway host's :class:`llem.config.Config`.
        run: runs ``sacctmgr`` (tests inject it); returns its stdout.
        monotonic_s: the cache's clock.
    """

    def __init__(
        self,
        config,
        run: Callable[[list[str]], str] | None = None,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        g = config.gateway
        self.private = config.privacy != "none"
        self.admin_users = {u.strip() for u in g.admins.split(",") if u.strip()}
        self.admin_groups = {x.strip() for x in g.admin_groups.split(",") if x.strip()}
        self.slurm_user = g.slurm_user
        self.configured = dict(g.coordinators or {})
        self.from_slurm = g.coordinators_from_slurm
        self._run = run or _run_sacctmgr
        self._clock = monotonic_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, tuple[str, ...]]] | None = None

    def role(self, caller: Caller) -> Role:
        if not self.private:
            return Role("everyone", None)
        if self.is_admin(caller):
            return Role("admin", None)
        accounts = tuple(
            sorted(
                account
                for account, users in self.coordinators().items()
                if caller.user in users or str(caller.uid) in users
            )
        )
        return Role(
            "coordinator" if accounts else "user", Visibility(uid=caller.uid, accounts=accounts)
        )

    def is_admin(self, caller: Caller) -> bool:
        if caller.uid == 0 or caller.user == self.slurm_user:
            return True
        if caller.user in self.admin_users or str(caller.uid) in self.admin_users:
            return True
        if not self.admin_groups:
            return False
        try:
            gids = set(os_grouplist(caller.user, caller.gid))
        except (KeyError, OSError):
            gids = {caller.gid}
        for name in self.admin_groups:
            try:
                if grp.getgrnam(name).gr_gid in gids:
                    return True
            except KeyError:
                continue
        return False

    def coordinators(self) -> dict[str, tuple[str, ...]]:
        merged = {a: tuple(u) for a, u in self.configured.items()}
        if self.from_slurm:
            for account, users in self._slurm_coordinators().items():
                merged[account] = tuple(sorted(set(merged.get(account, ())) | set(users)))
        return merged

    def _slurm_coordinators(self) -> dict[str, tuple[str, ...]]:
        """sacctmgr's answer, cached; on failure the last good answer (or none), logged."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < COORDINATORS_TTL_S:
                return self._cached[1]
            try:
                text = self._run(
                    [SACCTMGR, "-nP", "show", "account", "withcoord", "format=Account,Coordinators"]
                )
                found = parse_sacctmgr_coordinators(text)
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("gateway: cannot read coordinators from sacctmgr: %s", _failure(e))
                found = self._cached[1] if self._cached is not None else {}
            self._cached = (now, found)
            return found


def _failure(e: OSError | subprocess.SubprocessError) -> str:
    """Why sacctmgr gave no answer, with its own words (escaped, bounded) and, for a refusal,
    the likely cause: slurmdbd's ``PrivateData=accounts`` hides the accounts from a user who
    coordinates none (as the gateway's user; checked with Slurm 22.05)."""
    if not isinstance(e, subprocess.CalledProcessError):
        return safe_text(e)
    said = " ".join((e.stderr or "").split())[:300] or f"exit status {e.returncode}"
    why = safe_text(said)
    if "permission denied" in said.lower():
        why += (
            " (slurmdbd's PrivateData=accounts hides accounts from this user:"
            " list the coordinators in gateway.coordinators)"
        )
    return why


def os_grouplist(user: str, gid: int) -> list[int]:
    import os

    return os.getgrouplist(user, gid)


def _run_sacctmgr(cmd: list[str]) -> str:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=SACCTMGR_TIMEOUT_S, check=True
    ).stdout
