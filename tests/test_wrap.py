"""`llem wrap` on real processes: exit codes, signals, the JSON contract, exact energies."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT
from tests.powercap import DEFAULT_RANGE_UJ, FakePowercap

LLEM = [sys.executable, "-m", "llem.cli.main"]


def env_for(tree=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLEM_")}
    env["LLEM_CONFIG"] = "/dev/null"
    if tree is not None:
        env["LLEM_POWERCAP_ROOT"] = str(tree.path)
        env["LLEM_SENSORS"] = "rapl"
    env.update(extra)
    return env


def wrap(args, tree=None, **kw):
    return subprocess.run(
        LLEM + ["wrap", *args], capture_output=True, text=True, env=env_for(tree), timeout=60, **kw
    )


@pytest.fixture
def tree(live_tmp):
    pc = FakePowercap(live_tmp / "pc")
    pc.add_socket(0, energy_uj=1_000_000)
    pc.add_socket(1, energy_uj=2_000_000)
    return pc


def burner(tree, steps):
    """A child that advances the fake counters itself while it runs: the energy is known."""
    paths = {k: str(p) for k, p in tree.zones.items()}
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        zones = {{k: Path(v) for k, v in {paths!r}.items()}}
        for name, delta in {steps!r}:
            f = zones[name] / "energy_uj"
            rng = int((zones[name] / "max_energy_range_uj").read_text())
            f.write_text(str((int(f.read_text()) + delta) % rng))
            time.sleep(0.15)
    """)
    return [sys.executable, "-c", code]


def test_exact_energy_against_a_powercap_tree_with_a_wrap(tree):
    tree.set("intel-rapl:0", DEFAULT_RANGE_UJ - 2_000_000)  # package-0 will wrap mid-run
    steps = [
        ("intel-rapl:0", 1_500_000),
        ("intel-rapl:0", 1_500_000),
        ("intel-rapl:1", 4_000_000),
        ("intel-rapl:0:1", 250_000),
    ]
    r = wrap(["--json", "--interval", "0.1", "--name", "t1", "--", *burner(tree, steps)], tree)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    energy = {c["device"]: c["energy_j"] for c in out["components"]}
    assert energy == {"package-0": 3.0, "package-1": 4.0, "dram-0": 0.25, "dram-1": 0.0}
    assert out["energy_j"] == 7.25
    assert out["source"] == "measured"
    assert all(c["source"] == "measured" and c["coverage"] == 1.0 for c in out["components"])
    assert out["name"] == "t1"
    assert "package-0" in r.stderr and "measured" in r.stderr


JSON_TYPES = {
    "string": str,
    "int": int,
    "float": (int, float),
    "list": list,
    "object": dict,
    "null": type(None),
    "list of strings": list,
}


def documented_wrap_schema() -> dict[str, tuple[str, str]]:
    """The ``llem.wrap/1`` table of docs/user-guide.md: key -> (type, meaning)."""
    text = (ROOT / "docs" / "user-guide.md").read_text("utf-8")
    table = text.split("Schema `llem.wrap/1`:", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            for key in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                rows[key] = (cells[1], cells[2])
    return rows


def test_json_follows_the_documented_schema(tree):
    r = wrap(["--json", "--", "true"], tree)
    out = json.loads(r.stdout)
    assert out["schema"] == "llem.wrap/1"
    schema = documented_wrap_schema()
    assert set(out) <= set(schema), "undocumented keys"
    for key, (kind, meaning) in schema.items():
        if key not in out:
            assert meaning.startswith("only with"), f"{key} is documented but missing"
            continue
        types = tuple(JSON_TYPES[t.strip()] for t in kind.split(" or "))
        assert isinstance(out[key], types) and not isinstance(out[key], bool), (key, kind)
    for c in out["components"]:
        assert set(c) >= {"component", "device", "energy_j", "source"}
        assert c["component"] in ("cpu", "dram", "gpu", "psys")
        assert c["source"] in ("measured", "estimated")
    assert set(out["carbon"]) >= {"region", "intensity_g_per_kwh", "source", "year", "pue"}
    if out["co2e_g"] is None:
        assert "co2e" in r.stderr.lower() or "CO2e" in r.stderr


def test_output_file(tree, tmp_path):
    target = tmp_path / "w.json"
    r = wrap(["--output", str(target), "--", "true"], tree)
    assert r.returncode == 0 and r.stdout == ""
    assert json.loads(target.read_text())["exit_code"] == 0


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_code_is_the_commands(tree, code):
    r = wrap(["--", sys.executable, "-c", f"raise SystemExit({code})"], tree)
    assert r.returncode == code


def test_killed_by_signal_exits_128_plus_n(tree):
    r = wrap(
        [
            "--json",
            "--",
            sys.executable,
            "-c",
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        ],
        tree,
    )
    assert r.returncode == 128 + signal.SIGKILL
    assert json.loads(r.stdout)["exit_code"] == 137


def test_command_not_found(tree):
    r = wrap(["--", "no-such-command-llem"], tree)
    assert r.returncode == 127 and "command not found" in r.stderr


def test_sigterm_is_forwarded_to_the_command(tree, tmp_path):
    marker = tmp_path / "got-term"
    child = textwrap.dedent(f"""
        import signal, sys, time, pathlib
        def on_term(signum, frame):
            pathlib.Path({str(marker)!r}).write_text("term")
            sys.exit(42)
        signal.signal(signal.SIGTERM, on_term)
        pathlib.Path({str(marker)!r} + ".ready").write_text("")
        time.sleep(30)
    """)
    proc = subprocess.Popen(
        LLEM + ["wrap", "--json", "--", sys.executable, "-c", child],
        env=env_for(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "got-term.ready").exists():
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert marker.read_text() == "term"
    assert proc.returncode == 42
    assert json.loads(out)["exit_code"] == 42


def test_no_sensor_at_all_still_runs_the_command(tmp_path):
    env = env_for(LLEM_POWERCAP_ROOT=str(tmp_path / "none"), LLEM_SENSORS="rapl")
    r = subprocess.run(
        LLEM + ["wrap", "--", "true"], capture_output=True, text=True, env=env, timeout=60
    )
    # rapl named explicitly but absent: a clear error, exit 1, no traceback
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


def test_no_counters_means_estimated_and_said_so(tmp_path):
    env = env_for(LLEM_POWERCAP_ROOT=str(tmp_path / "none"))
    r = subprocess.run(
        LLEM
        + ["wrap", "--json", "--", sys.executable, "-c", "sum(i * i for i in range(2 * 10**6))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["source"] == "estimated"
    assert {c["component"] for c in out["components"]} == {"cpu", "dram"}
    assert all(c["source"] == "estimated" and c["method"] == "model" for c in out["components"])
    assert out["energy_j"] > 0
    assert "estimated" in r.stderr and "no RAPL package" in r.stderr


def test_emissions_follow_the_named_region_and_pue(tree, tmp_path):
    cfg = tmp_path / "llem.yaml"
    cfg.write_text("carbon:\n  region: FR\n  pue: 1.5\n")
    steps = [("intel-rapl:0", 36_000_000)]  # 36 J = 0.00001 kWh
    env = env_for(tree, LLEM_CONFIG=str(cfg))
    r = subprocess.run(
        LLEM + ["wrap", "--json", "--", *burner(tree, steps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    out = json.loads(r.stdout)
    assert out["energy_j"] == 36.0
    assert out["carbon"]["region"] == "FR" and out["carbon"]["pue"] == 1.5
    # energy of this year is priced with this year's figure, or the nearest earlier one's
    from datetime import datetime, timezone

    from llem.carbon import tables

    this_year = datetime.now(timezone.utc).year
    by_year = tables.rows_by_year("FR")
    used = max(y for y in by_year if y <= this_year)
    fr = by_year[used]
    label = fr.year if used == this_year else f"{fr.year} for {this_year}"
    assert out["carbon"]["year"] == label and out["carbon"]["basis"] == fr.basis
    assert out["co2e_g"] == pytest.approx(36 / 3.6e6 * 1.5 * fr.g_per_kwh, rel=1e-6)
    assert "region FR" in r.stderr and "PUE 1.5" in r.stderr


def test_unknown_region_keeps_the_measurement(tree):
    env = env_for(tree, LLEM_CARBON_REGION="Atlantis")
    r = subprocess.run(
        LLEM + ["wrap", "--json", "--", sys.executable, "-c", "raise SystemExit(4)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 4
    out = json.loads(r.stdout)
    assert out["co2e_g"] is None and "unknown carbon region 'Atlantis'" in out["carbon"]["reason"]
    assert out["components"]


def test_work_file_gives_the_energy_per_unit_at_a_known_power(tree, tmp_path):
    from tests.powercap import ConstantPower

    count = tmp_path / "n.txt"
    command = [sys.executable, "-c", f"import time; time.sleep(1.5); open({str(count)!r}, 'w').write('3000 tokens')"]  # fmt: skip
    with ConstantPower(tree, {"intel-rapl:0": 40.0}):
        r = wrap(["--json", "--interval", "0.1", "--work-file", str(count), "--", *command], tree)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["work"] == 3000 and out["unit"] == "tokens"
    assert out["energy_per_unit_j"] == pytest.approx(out["energy_j"] / 3000)
    # The command's time at 40 W, give or take the sampler's edges (0.1 s reads).
    assert out["energy_j"] == pytest.approx(40.0 * out["duration_s"], rel=0.1)
    assert out["per_unit_basis"] == "measured" and out["gpu_energy_per_unit_j"] is None
    assert "work 3,000 tokens" in r.stderr or "work 3000 tokens" in r.stderr
    assert "per token (whole node, measured)" in r.stderr


def test_work_problems_are_notes_or_usage_errors(tree, tmp_path):
    missing = wrap(["--json", "--work-file", str(tmp_path / "none"), "--", "true"], tree)
    assert missing.returncode == 0
    out = json.loads(missing.stdout)
    assert out["work"] is None and out["energy_j"] >= 0  # the measurement is kept
    assert any("work file" in n and "the work is unknown" in n for n in out["notes"])
    both = wrap(["--work", "1", "--work-file", str(tmp_path / "n"), "--", "true"], tree)
    assert both.returncode == 2 and "give one of them" in both.stderr
    bad = wrap(["--work", "5", "--unit", "x" * 33, "--", "true"], tree)
    assert bad.returncode == 2 and "unit of work" in bad.stderr
    given = wrap(["--json", "--work", "10", "--", "true"], tree)
    assert json.loads(given.stdout)["unit"] == "units"
