"""The ledger gateway over TCP with real MUNGE credentials (munged of the Slurm harness).

Run under the machine's Slurm-test lock (munged is shared)::

    flock /tmp/llem-slurm-tests.lock .venv/bin/python -m pytest tests/slurm/test_gateway_munge_slurm.py -q

Each credential is made by the user's own process (libmunge through llem.munge), so munged
vouches for that user; the test, as root, then replays, tampers with or reuses it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.gateway import ADMIN, SINCE, A, B, Site

from .harness import _Munge, missing_requirements

pytestmark = pytest.mark.slurm

FIELDS = ("-X", "-P", "-n", "-o", "JobID,User,Account")
MAKE = (
    "import sys\n"
    "from llem import munge\n"
    "from llem.cluster.acct_queries import RunFilter\n"
    "from llem.gateway import wire\n"
    "ttl = int(sys.argv[2]) if len(sys.argv) > 2 else None\n"
    "text = wire.request_text(wire.Request(op='acct', cluster=sys.argv[1],"
    " filter=RunFilter(start_ns=0), allocations=True, fields=('JobID', 'User')))\n"
    "print(text); print(munge.encode(wire.request_digest(text), ttl_s=ttl))\n"
)


@pytest.fixture(scope="module")
def site():
    problems = missing_requirements()
    if problems:
        pytest.skip("real munge unavailable: " + "; ".join(problems))
    _Munge.acquire()
    s = Site()
    try:
        line = s.start("--socket", str(s.socket), "--listen", "127.0.0.1:0")
        s.port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        yield s
    finally:
        s.close()
        _Munge.release()


def made_by(site: Site, user: str, cluster: str = "c1", ttl: int | None = None) -> tuple[str, str]:
    """(request text, credential) made by ``user``'s own process."""
    args = [cluster] + ([str(ttl)] if ttl is not None else [])
    r = site.as_user(user, MAKE, *args)
    assert r.returncode == 0, r.stderr
    text, cred = r.stdout.splitlines()
    return text, cred


def send(site: Site, text: str, cred: str | None) -> dict:
    from llem.gateway.wire import encode_envelope

    with socket.create_connection(("127.0.0.1", site.port), timeout=20) as s:
        s.sendall(encode_envelope(text, cred))
        out = b""
        while not out.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return json.loads(out)


def test_llem_acct_from_a_login_node_sees_what_privacy_allows(site):
    url = f"llem://127.0.0.1:{site.port}"
    r = site.acct(A, "--ledger", url, "-a", *SINCE, *FIELDS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["101|llemt-a|physics", "102|llemt-a|chem"]
    r = site.acct(ADMIN, "--ledger", url, "-a", *SINCE, *FIELDS)
    assert [line.split("|")[0] for line in r.stdout.splitlines()] == ["101", "102", "201", "202"]


def test_a_credential_serves_one_request_only(site):
    text, cred = made_by(site, A)
    first = send(site, text, cred)
    assert first["ok"] and first["identity"]["user"] == A
    assert {row["User"] for row in first["document"]["jobs"]} == {A}
    again = send(site, text, cred)
    assert again == {"ok": False, "error": again["error"]}
    assert again["error"].startswith("credential refused: replayed")


def test_a_credential_bound_to_another_request_is_refused(site):
    text, cred = made_by(site, A)
    other = text.replace('"users":null', f'"users":["{B}"]')
    assert other != text
    answer = send(site, other, cred)
    assert answer["error"] == "credential refused: it was made for another request"


def test_tampered_expired_foreign_and_missing_credentials_are_refused(site):
    text, cred = made_by(site, A)
    middle = len(cred) // 2
    forged = cred[:middle] + ("A" if cred[middle] != "A" else "B") + cred[middle + 1 :]
    answer = send(site, text, forged)
    assert answer["error"].startswith("credential refused: munge: Invalid credential")
    text, cred = made_by(site, A, ttl=1)
    time.sleep(2.5)
    assert send(site, text, cred)["error"] == "credential refused: expired"
    text, cred = made_by(site, A, cluster="elsewhere")
    assert send(site, text, cred)["error"] == "this gateway serves cluster c1, not 'elsewhere'"
    assert send(site, text, None)["error"].startswith("requests over TCP need a MUNGE credential")
    log = site.log.read_text()
    for reason in ("replayed", "expired", "Invalid credential", "not 'elsewhere'"):
        assert re.search(rf"gateway: refused 127\.0\.0\.1:\d+: .*{reason}", log), reason


@pytest.fixture
def other_cluster_munged(tmp_path_factory):
    """A second munged with a key of its own: another cluster's MUNGE."""
    import os
    import shutil
    import subprocess

    d = Path(tempfile.mkdtemp(prefix="llem-munge-other-"))
    os.chmod(d, 0o755)
    shutil.chown(d, "munge", "munge")
    key = d / "munge.key"
    subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    sock = d / "munge.socket"
    args = [
        f"--socket={sock}",
        f"--key-file={key}",
        f"--pid-file={d / 'munged.pid'}",
        f"--seed-file={d / 'seed'}",
        f"--log-file={d / 'munged.log'}",
        "--force",
    ]
    subprocess.run(
        ["/usr/sbin/runuser", "-u", "munge", "--", "/usr/sbin/munged", *args],
        check=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock
    pid = int((d / "munged.pid").read_text().strip())
    os.kill(pid, 15)
    shutil.rmtree(d, ignore_errors=True)


def test_a_credential_of_another_cluster_is_refused(site, other_cluster_munged):
    os.chmod(other_cluster_munged.parent, 0o755)
    code = MAKE.replace("ttl_s=ttl)", f"ttl_s=ttl, socket_path={str(other_cluster_munged)!r})")
    r = site.as_user(A, code, "c1")
    assert r.returncode == 0, r.stderr
    text, cred = r.stdout.splitlines()
    answer = send(site, text, cred)
    assert answer["error"].startswith("credential refused: munge: Invalid credential")
    assert "not made with this cluster's MUNGE key?" in answer["error"]


def test_doctor_checks_the_path_to_the_gateway(site):
    url = f"llem://127.0.0.1:{site.port}"
    code = "import sys; sys.argv[0] = 'llem'; from llem.cli.main import main; main()"
    r = site.as_user(A, code, "doctor", LLEM_LEDGER=url)
    assert r.returncode == 0, r.stderr
    assert f"Ledger gateway: {url} (tcp+munge)" in r.stdout
    assert "munge: works" in r.stdout
    assert f"you are {A} (uid {site.uid[A]}), user: you see your own jobs" in r.stdout
    r = site.as_user(A, code, "doctor", LLEM_LEDGER="llem://127.0.0.1:1")
    assert "gateway: the gateway at llem://127.0.0.1:1 is not reachable" in r.stdout
