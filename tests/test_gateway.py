"""The ledger gateway on its Unix socket, end to end (root only: real users, a real ``llem
serve`` process as its own unprivileged user, a private ledger built by ``llem aggregate``).

Over TCP with real MUNGE credentials: tests/slurm/test_gateway_munge_slurm.py. The request
parser's fuzz test: tests/test_gateway_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.helpers.gateway import ADMIN, COORD, SINCE, A, B, Site

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")

FIELDS = ("-X", "-P", "-n", "-o", "JobID,User,Account")
UNTIL = ("-E", "2030-01-01")


@pytest.fixture(scope="module")
def site():
    s = Site()
    s.start("--socket", str(s.socket))
    yield s
    s.close()


def jobs_seen(site: Site, user: str, *args: str) -> list[str]:
    r = site.acct(user, "--ledger", str(site.socket), *SINCE, *FIELDS, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_each_user_sees_what_privacy_allows(site):
    assert jobs_seen(site, A, "-a") == ["101|llemt-a|physics", "102|llemt-a|chem"]
    assert jobs_seen(site, B, "-a") == ["201|llemt-b|physics", "202|llemt-b|bio"]
    # asking for another user's jobs by name or by job id gives nothing of theirs
    assert jobs_seen(site, A, "-u", B) == []
    assert jobs_seen(site, A, "-j", "201,202") == []
    assert jobs_seen(site, COORD, "-a") == ["101|llemt-a|physics", "201|llemt-b|physics"]
    assert jobs_seen(site, ADMIN, "-a") == [
        "101|llemt-a|physics",
        "102|llemt-a|chem",
        "201|llemt-b|physics",
        "202|llemt-b|bio",
    ]
    r = site.acct(A, "--ledger", str(site.socket), "-a", *SINCE)
    assert "privacy: the gateway shows you your own jobs" in r.stderr


def test_totals_sum_only_what_the_caller_may_see(site):
    def totals(user):
        r = site.acct(
            user,
            "--ledger",
            str(site.socket),
            "-a",
            *SINCE,
            "--totals",
            "account",
            "-P",
            "-n",
            "-o",
            "Account,NJobs",
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    assert totals(A) == ["chem|1", "physics|1"]
    assert totals(COORD) == ["physics|2"]
    assert totals(ADMIN) == ["bio|1", "chem|1", "physics|2"]
    r = site.acct(A, "--ledger", str(site.socket), "-a", *SINCE, "--statement")
    assert r.returncode == 0 and "The 2 job run(s)" in r.stdout, r.stdout + r.stderr


def test_the_gateway_renders_exactly_as_a_local_ledger(site):
    """An admin through the gateway and root on the ledger file get the same bytes."""
    for args in (
        ("-a",),
        ("-a", "-p", "-o", "JobID,Start,End,Elapsed,ConsumedEnergy,AvePower,CO2e,Coverage"),
        ("-a", "--totals", "user"),
        ("-a", "--units", "K", "-X"),
        ("-a", "--statement"),
        # sacct's selection rules travel in the request: a state window, -T, time limits,
        # groups, QOS, and numbers without suffixes are the same through the gateway
        ("-a", "-s", "CD,F,CA,TO", "-T", "-o", "JobID,State,Submit,Start,End,Elapsed,ExitCode"),
        ("-a", "-k", "1", "-K", "100000", "--noconvert"),
        ("-a", "-g", "0", "-q", "normal"),
    ):
        remote = site.acct(ADMIN, "--ledger", str(site.socket), *SINCE, *UNTIL, *args)
        local = site.acct("root", "--ledger", str(site.ledger), *SINCE, *UNTIL, *args)
        assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
        assert remote.stdout == local.stdout, args
        assert remote.stderr == local.stderr, args
    remote = site.acct(ADMIN, "--ledger", str(site.socket), *SINCE, *UNTIL, "-a", "--json")
    local = site.acct("root", "--ledger", str(site.ledger), *SINCE, *UNTIL, "-a", "--json")
    r, lo = json.loads(remote.stdout), json.loads(local.stdout)
    r.pop("generated_at"), lo.pop("generated_at")
    assert r == lo
    assert len(r["jobs"]) >= 4


def test_reports_through_the_gateway_for_admins_and_coordinators_only(site):
    def report(user, *args, ledger=None):
        code = "import sys; sys.argv[0] = 'llem'; from llem.cli.main import main; main()"
        env = site.service_env() if ledger else None  # the local report needs pandas
        ledger = ledger or str(site.socket)
        return site.as_user(
            user,
            code,
            "report",
            *args,
            "--ledger",
            ledger,
            "--format",
            "json",
            "--since",
            "2000-01-01",
            "--until",
            "2030-01-01",
            env=env,
        )

    remote = report(ADMIN, "monthly")
    local = report("root", "monthly", ledger=str(site.ledger))
    if "pandas" in local.stderr:
        pytest.skip("no report extra here")
    assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
    r, lo = json.loads(remote.stdout), json.loads(local.stdout)
    assert r == lo and r["totals"]["jobs"] == 4
    r = report(COORD, "account", "physics")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["jobs"] == 2
    r = report(COORD, "account", "chem")
    assert (
        r.returncode == 1 and "privacy: you may have the statement of account physics" in r.stderr
    )
    r = report(A, "monthly")
    assert r.returncode == 1
    assert "privacy: reports are for admins and account coordinators" in r.stderr


@pytest.mark.postgres
def test_privacy_on_a_postgresql_ledger(site, pg_server):
    """The same ledger copied into PostgreSQL by ``llem ledger copy``'s code, made private by
    ``llem ledger init --roles`` and served by a second gateway whose login is a member of
    ``llem_gateway`` (row-level security on): the same rows for each role, the same bytes as
    the SQLite gateway, for llem-acct, llem job and reports."""
    import psycopg

    from llem.cluster.pg_ledger import PgLedger
    from tests.helpers.postgres import copy_into

    url, _ = copy_into(pg_server, site.ledger, "gateway")
    with PgLedger(url) as led:
        led.grant_roles()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS llemt_gateway")
        conn.execute("CREATE ROLE llemt_gateway LOGIN IN ROLE llem_gateway")
    url = url.replace("llem_test@", "llemt_gateway@")
    sock = site.socket.parent / "pg.sock"
    log = site.root / "pg.log"
    proc, line = site.spawn("--socket", str(sock), "--ledger", url, log=log)
    try:
        assert "(privacy: jobs,usage)" in line
        deadline = time.monotonic() + 10
        while "row-level security" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "gateway: row-level security: on" in log.read_text()

        def seen(user, *args):
            r = site.acct(user, "--ledger", str(sock), *SINCE, *FIELDS, *args)
            assert r.returncode == 0, r.stderr
            return r.stdout.splitlines()

        assert seen(A, "-a") == ["101|llemt-a|physics", "102|llemt-a|chem"]
        assert seen(B, "-j", "101,102") == []
        assert seen(COORD, "-a") == ["101|llemt-a|physics", "201|llemt-b|physics"]
        assert len(seen(ADMIN, "-a")) == 4
        for args in (("-a",), ("-a", "--totals", "account"), ("-a", "--statement")):
            on_pg = site.acct(COORD, "--ledger", str(sock), *SINCE, *UNTIL, *args)
            on_file = site.acct(COORD, "--ledger", str(site.socket), *SINCE, *UNTIL, *args)
            assert on_pg.returncode == on_file.returncode == 0, on_pg.stderr
            assert (on_pg.stdout, on_pg.stderr) == (on_file.stdout, on_file.stderr), args
        # llem job: the same view from either backend, the same refusal
        for user, job in ((A, "101"), (COORD, "201"), (A, "201")):
            on_pg = llem_job(site, user, job, "--ledger", str(sock))
            on_file = llem_job(site, user, job, "--ledger", str(site.socket))
            assert (on_pg.returncode, on_pg.stdout, on_pg.stderr) == (
                on_file.returncode,
                on_file.stdout,
                on_file.stderr.replace(str(site.socket), str(sock)),
            ), (user, job)
        # reports read on three connections at once: each carries the caller
        for user, args in ((ADMIN, ("monthly",)), (COORD, ("account", "physics"))):
            on_pg, on_file = (
                site.as_user(
                    user,
                    "import sys; sys.argv[0] = 'llem'; from llem.cli.main import main; main()",
                    "report",
                    *args,
                    "--ledger",
                    str(where),
                    "--format",
                    "json",
                    "--since",
                    "2000-01-01",
                    "--until",
                    "2030-01-01",
                )
                for where in (sock, site.socket)
            )
            assert on_pg.returncode == on_file.returncode == 0, on_pg.stderr + on_file.stderr
            assert json.loads(on_pg.stdout) == json.loads(on_file.stdout), args
    finally:
        proc.terminate()
        proc.wait(15)


def llem_job(site: Site, user: str, *args: str, env=None) -> subprocess.CompletedProcess:
    """``llem job ARGS`` run as ``user``."""
    code = "import sys; sys.argv[0] = 'llem'; from llem.cli.main import main; main()"
    return site.as_user(user, code, "job", *args, env=env)


def test_llem_job_through_the_gateway_shows_what_privacy_allows_as_a_local_ledger_would(site):
    """The owner, the account's coordinator and an admin get through the gateway exactly what
    root prints from the ledger file (text with its sparkline, JSON, HTML); another user is
    refused without learning whether the job exists."""
    sock = ("--ledger", str(site.socket))
    local = {
        job: llem_job(site, "root", job, "--ledger", str(site.ledger))
        for job in ("101", "201", "202")
    }
    for r in local.values():
        assert r.returncode == 0, r.stderr
    assert "power" in local["101"].stdout and any(c in local["101"].stdout for c in "▁▂▃▄▅▆▇█")
    for user, job in ((A, "101"), (COORD, "201"), (ADMIN, "202"), (B, "202")):
        r = llem_job(site, user, job, *sock)
        assert r.returncode == 0, (user, job, r.stderr)
        assert (r.stdout, r.stderr) == (local[job].stdout, local[job].stderr), (user, job)
    remote = llem_job(site, A, "101", *sock, "--json")
    lo = llem_job(site, "root", "101", "--ledger", str(site.ledger), "--json")
    assert remote.returncode == lo.returncode == 0, remote.stderr + lo.stderr
    assert json.loads(remote.stdout) == json.loads(lo.stdout)
    assert json.loads(remote.stdout)["user"] == A
    # refused: another user's job, and a coordinator's job outside their accounts, answered
    # as a job the ledger does not have
    for user, job in ((A, "201"), (B, "101"), (COORD, "202")):
        r = llem_job(site, user, job, *sock)
        assert r.returncode == 1 and r.stdout == "", (user, job, r.stdout)
        assert f"no job {job} on cluster c1 among the jobs you may see" in r.stderr, r.stderr
        assert "privacy: the gateway shows you your own jobs" in r.stderr
    r = llem_job(site, ADMIN, "999", *sock)
    assert r.returncode == 1 and "no job 999 on cluster c1 in the ledger" in r.stderr
    assert "refused" in site.log.read_text()


def test_llem_job_goes_through_the_local_gateway_when_the_ledger_is_private(site):
    """A's configuration names the ledger file, which A cannot read: ``llem job`` asks the
    gateway's socket (``gateway.socket``); ``--html`` and ``--plot`` are made by the client
    from the answer, the same page as root's from the file."""
    out = site.root / "job-out"
    out.mkdir()
    shutil.chown(out, A)
    r = llem_job(site, A, "102", "--html", str(out / "a.html"))
    assert r.returncode == 0, r.stderr
    lo = llem_job(site, "root", "102", "--ledger", str(site.ledger), "--html", str(out / "r.html"))
    assert lo.returncode == 0, lo.stderr
    assert r.stdout == lo.stdout
    page = (out / "a.html").read_text()
    assert page == (out / "r.html").read_text() and "<svg" in page
    env = {**site.service_env(), "MPLCONFIGDIR": str(out)}
    r = llem_job(site, A, "102", "--plot", str(out / "a.png"), env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "a.png").read_bytes().startswith(b"\x89PNG")
    # and the gateway down: the private ledger's hint, not a traceback
    site.stop(signal.SIGTERM)
    try:
        r = llem_job(site, A, "102")
        assert r.returncode == 1 and "permission denied reading the ledger" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        site.start("--socket", str(site.socket))


def test_a_user_cannot_read_the_ledger_file_and_is_told_to_use_the_gateway(site):
    import grp

    from tests.helpers.gateway import LEDGER_GROUP

    for name in (site.ledger, f"{site.ledger}-wal", f"{site.ledger}-shm"):  # by llem aggregate
        st = os.stat(name)
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, grp.getgrnam(LEDGER_GROUP).gr_gid)
    r = site.as_user(A, "import sys; open(sys.argv[1], 'rb')", str(site.ledger))
    assert r.returncode == 1 and "PermissionError" in r.stderr
    r = site.acct(A, "--ledger", str(site.ledger), "-a", *SINCE)
    assert r.returncode == 1
    assert "permission denied reading the ledger: it is private" in r.stderr
    assert "ledger: llem://LEDGER_HOST" in r.stderr


def test_slow_and_silent_clients_do_not_block_others(site):
    """B holds more silent connections than a peer may have; A is served meanwhile."""
    hold = (
        "import socket, sys, time\n"
        "held = []\n"
        "for _ in range(40):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); held.append(s)\n"
        "    time.sleep(0.01)\n"
        "busy = 0\n"
        "for s in held[32:]:\n"
        "    s.settimeout(5); busy += b'\"busy\": true' in s.recv(4096)\n"
        "print('held', busy, flush=True); time.sleep(6)\n"
    )
    import subprocess

    holder = subprocess.Popen(
        [site.python, "-c", hold, str(site.socket)],
        user=site.uid[B],
        group=site.gid[B],
        env=site.env_for(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # the 8 over the per-uid cap of 32 were answered busy at once, without a thread
        assert holder.stdout.readline().strip() == "held 8"
        t0 = time.monotonic()
        assert jobs_seen(site, A) == ["101|llemt-a|physics", "102|llemt-a|chem"]
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()


def test_the_replay_cache_and_query_slots():
    from llem.gateway.server import _ReplayCache, _Slots

    now = [1000.0]
    cache = _ReplayCache(clock=lambda: now[0])
    assert cache.first_use("MUNGE:abc:", 1300)
    assert not cache.first_use("MUNGE:abc:", 1300)  # even if munged forgot it
    now[0] = 1301
    assert cache.first_use("MUNGE:abc:", 1600)  # expired entries are forgotten
    slots = _Slots(total=3, per_uid=2)
    assert slots.acquire(1, 0) and slots.acquire(1, 0)
    assert not slots.acquire(1, 0.05)  # a third of uid 1 waits, then gives up
    assert slots.acquire(2, 0)  # another uid still gets one
    assert not slots.acquire(3, 0.05)  # all 3 taken
    slots.release(1)
    assert slots.acquire(3, 0)


def _raw(site: Site, data: bytes, timeout: float = 20) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(site.socket))
        s.sendall(data)
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return json.loads(out)


def test_malformed_oversized_and_late_requests_are_refused_and_logged(site):
    from llem.gateway.wire import MAX_REQUEST_BYTES

    assert _raw(site, b"\xff\xfe not json\n")["error"].startswith("bad request: not JSON")
    assert _raw(site, b'{"v": 1, "request": "[[[[["}\n')["error"].startswith("bad request")
    assert _raw(site, b'{"v": 9, "request": "{}"}\n')["error"].startswith(
        "unsupported protocol version"
    )
    req = json.dumps({"op": "acct", "filter": {"users": "x"}})
    assert (
        "must be a list"
        in _raw(site, (json.dumps({"v": 1, "request": req}) + "\n").encode())["error"]
    )
    big = b"x" * (MAX_REQUEST_BYTES + 10)
    assert _raw(site, big)["error"] == f"requests are at most {MAX_REQUEST_BYTES} bytes"
    t0 = time.monotonic()
    late = _raw(site, b'{"v": 1, ')  # and then nothing
    assert late["error"] == "the request did not arrive within 10 s"
    assert 9 < time.monotonic() - t0 < 15
    log = site.log.read_text()
    assert "gateway: refused uid 0" in log and "requests are at most" in log
    assert jobs_seen(site, A) == ["101|llemt-a|physics", "102|llemt-a|chem"]  # still serving


def test_fifty_concurrent_clients_are_all_served(site):
    from llem.cluster.acct_queries import RunFilter
    from llem.gateway import client, wire

    target = client.Target(path=str(site.socket))
    request = wire.Request(
        op="acct", cluster="c1", filter=RunFilter(start_ns=0), allocations=True, fields=("JobID",)
    )
    results: list = []

    def one():
        try:
            results.append(len(client.ask(target, request)["document"]["jobs"]))
        except Exception as e:  # noqa: BLE001
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [4] * 50  # root is an admin: all four jobs, fifty times


def test_the_gateway_down_is_a_clear_error(site):
    site.stop(signal.SIGTERM)
    try:
        r = site.acct(A, "--ledger", str(site.socket), "-a", *SINCE)
        assert r.returncode == 1
        assert "Error: the gateway at" in r.stderr and "is not reachable" in r.stderr
        assert "is 'llem serve' running on the ledger host?" in r.stderr
    finally:
        site.start("--socket", str(site.socket))
    assert jobs_seen(site, A) == ["101|llemt-a|physics", "102|llemt-a|chem"]


def test_serve_refuses_root(site):
    r = site.as_user("root", "from llem.cli.main import main; main()", "serve", "--no-socket")
    assert r.returncode != 0
    r = site.as_user(
        "root",
        "import sys; sys.argv[0] = 'llem'; from llem.cli.main import main; main()",
        "serve",
        "--socket",
        str(site.root / "x.sock"),
    )
    assert r.returncode == 1 and "llem serve runs as root" in r.stderr
