"""`llem doctor` on a node with a meter: the source chosen for each device, the platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.pmcounters import FakePmCounters
from tests.powercap import FakePowercap


def test_doctor_says_which_source_measures_what_and_the_platform(tmp_path):
    pm = FakePmCounters(tmp_path / "pm")
    pc = FakePowercap(tmp_path / "pc")
    pc.add_socket(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env.update(
        LLEM_CONFIG="/dev/null",
        LLEM_PM_COUNTERS_ROOT=str(pm.path),
        LLEM_POWERCAP_ROOT=str(pc.path),
        LLEM_HWMON_ROOT=str(tmp_path / "none"),
    )
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    report = json.loads(r.stdout)
    assert report["coverage"]["platform"].startswith("measured (pm_counters:node minus")
    assert any(s.startswith("rapl: not read: pm_counters") for s in report["sources"])
    pm_probe = next(s for s in report["sensors"] if s["sensor"] == "pm_counters")
    assert pm_probe["available"] and len(pm_probe["devices"]) == 7
    r = subprocess.run(
        [sys.executable, "-m", "llem.cli.main", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "platform measured (pm_counters:node minus the parts)" in r.stdout
    assert "source: rapl: not read" in r.stdout
