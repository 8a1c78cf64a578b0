"""The Slurm hook scripts: shellcheck-clean, and exit 0 whatever breaks, fast."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"prolog.sh", "epilog.sh", "llem-hook.sh"} <= names


@pytest.mark.skipif(shutil.which("shellcheck") is None and not os.environ.get("CI"),
                    reason="shellcheck not installed (scripts/install-slurm.sh installs it)")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", "-x", "-P", str(REPO / "slurm"), *map(str, SCRIPTS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def run_hook(kind, tmp_path, defaults: str, extra_env=None):
    dfile = tmp_path / "default-llem"
    dfile.write_text(defaults)
    env = {"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "t1", "LLEM_DEFAULTS_FILE": str(dfile),
           **(extra_env or {})}  # no PATH, no HOME: as slurmd runs it
    t0 = time.monotonic()
    r = subprocess.run(["/bin/bash", str(REPO / "slurm" / f"{kind}.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("kind", ["prolog", "epilog"])
@pytest.mark.parametrize("defaults", [
    "LLEM_BIN=/nonexistent/llem\n",
    "LLEM_BIN=/bin/false\n",
    "this is not a settings file $(touch /tmp/llem-pwned)\nexit 1\n",
    "LLEM_BIN={slow}\nLLEM_TIMEOUT=1\n",
    "LLEM_BIN=/bin/true\nLLEM_TIMEOUT=abc\n",
    "LLEM_BAD-KEY=1\n",
])
def test_hook_exits_0_whatever_breaks(kind, tmp_path, defaults):
    slow = tmp_path / "slow-llem"
    slow.write_text("#!/bin/sh\nexec /bin/sleep 30\n")  # a hung llem
    slow.chmod(0o755)
    r, elapsed = run_hook(kind, tmp_path, defaults.replace("{slow}", str(slow)))
    assert r.returncode == 0, r.stderr
    assert not Path("/tmp/llem-pwned").exists()  # the settings file is never executed
    assert elapsed < 5


def test_hook_runs_llem_with_the_settings(tmp_path):
    seen = tmp_path / "seen"
    fake = tmp_path / "fake-llem"
    fake.write_text(f"#!/bin/sh\necho \"$1 $LLEM_CONFIG $LLEM_POWERCAP_ROOT\" > {seen}\n")
    fake.chmod(0o755)
    r, _ = run_hook("prolog", tmp_path,
                    f"LLEM_BIN={fake}\nLLEM_CONFIG=\"/etc/x.yaml\"\nLLEM_POWERCAP_ROOT=/p\n")
    assert r.returncode == 0
    assert seen.read_text().strip() == "prolog /etc/x.yaml /p"


def test_python_and_bash_record_the_same_variables():
    import re

    from llem.node.jobs import JOB_VARS

    text = (REPO / "slurm" / "llem-hook.sh").read_text()
    block = text[text.index("LLEM_JOB_VARS=("):text.index(")", text.index("LLEM_JOB_VARS=("))]
    assert tuple(re.findall(r"[A-Z_]+", block.split("(", 1)[1])) == JOB_VARS
