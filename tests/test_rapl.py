import os
from pathlib import Path

import pytest

from llem.errors import SensorPermissionError, SensorUnavailable
from llem.sensors import rapl
from llem.sensors.base import ERROR, MEASURED, OK
from llem.units import WRAP, counter_delta
from tests.powercap import DEFAULT_RANGE_UJ, FakePowercap


@pytest.fixture
def tree(tmp_path):
    pc = FakePowercap(tmp_path / "powercap")
    pc.add_socket(0, energy_uj=1_000_000)
    pc.add_socket(1, energy_uj=2_000_000)
    return pc


def keys(sensor):
    return [d.key for d in sensor.devices()]


def test_two_sockets_with_dram(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "nohwmon")
    assert keys(s) == ["rapl:package-0", "rapl:package-1", "rapl:dram-0", "rapl:dram-1"]
    assert all(d.source == MEASURED and d.max_range_uj == DEFAULT_RANGE_UJ for d in s.devices())
    values = {r.device_key: r.energy_uj for r in s.read(1)}
    assert values == {
        "rapl:package-0": 1_000_000,
        "rapl:package-1": 2_000_000,
        "rapl:dram-0": 100_000,
        "rapl:dram-1": 200_000,
    }


def test_core_and_psys_are_never_added(tmp_path):
    pc = FakePowercap(tmp_path)
    pc.add_socket(0)
    pc.add_zone("1", "psys", 5)
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert keys(s) == ["rapl:package-0", "rapl:dram-0"]
    assert any("psys" in n for n in s.notes)


def test_nested_tree_without_flat_links(tmp_path):
    pc = FakePowercap(tmp_path, flat_links=False)
    pc.add_socket(0)
    s = rapl.RaplSensor(pc.devices, hwmon=tmp_path / "none")
    assert keys(s) == ["rapl:package-0", "rapl:dram-0"]


def test_mmio_duplicate_of_a_package_is_not_counted_twice(tmp_path):
    pc = FakePowercap(tmp_path)
    pc.add_socket(0)
    pc.add_zone("0", "package-0", 7, control="intel-rapl-mmio")
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert keys(s) == ["rapl:package-0", "rapl:dram-0"]
    assert s.devices()[0].attrs["layout"] == "intel-rapl"


def test_mmio_package_alone_is_used(tmp_path):
    pc = FakePowercap(tmp_path)
    pc.add_zone("0", "package-0", 7, control="intel-rapl-mmio")
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert keys(s) == ["rapl:package-0"]


def test_multi_die_packages_keep_distinct_names(tmp_path):
    pc = FakePowercap(tmp_path)
    pc.add_zone("0", "package-0-die-0")
    pc.add_zone("0:0", "dram")
    pc.add_zone("1", "package-0-die-1")
    pc.add_zone("1:0", "dram")
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert keys(s) == [
        "rapl:package-0-die-0",
        "rapl:package-0-die-1",
        "rapl:dram-0-die-0",
        "rapl:dram-0-die-1",
    ]


def test_amd_layout_without_dram(tmp_path):
    # Zen on Linux >= 5.11: same driver, package zones with a core subzone, no dram.
    pc = FakePowercap(tmp_path)
    pc.add_zone("0", "package-0", 10)
    pc.add_zone("0:0", "core", 5)
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert keys(s) == ["rapl:package-0"]


def test_amd_energy_hwmon_layout(tmp_path):
    hw = tmp_path / "hwmon" / "hwmon3"
    hw.mkdir(parents=True)
    (hw / "name").write_text("amd_energy\n")
    (hw / "energy1_label").write_text("Ecore000\n")
    (hw / "energy1_input").write_text("111\n")
    (hw / "energy65_label").write_text("Esocket0\n")
    (hw / "energy65_input").write_text("123456\n")
    (hw / "energy66_label").write_text("Esocket1\n")
    (hw / "energy66_input").write_text("654321\n")
    s = rapl.RaplSensor(tmp_path / "no-powercap", hwmon=tmp_path / "hwmon")
    assert keys(s) == ["rapl:package-0", "rapl:package-1"]
    assert [r.energy_uj for r in s.read(0)] == [123456, 654321]
    assert s.devices()[0].max_range_uj is None


def test_wrap_in_the_middle_of_a_window(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "none")
    dev = {d.key: d for d in s.devices()}
    tree.set("intel-rapl:0", DEFAULT_RANGE_UJ - 1_000_000)
    first = {r.device_key: r.energy_uj for r in s.read(0)}
    tree.advance("intel-rapl:0", 3_000_000)  # wraps
    second = {r.device_key: r.energy_uj for r in s.read(10**9)}
    assert second["rapl:package-0"] == 2_000_000
    d = counter_delta(
        first["rapl:package-0"],
        second["rapl:package-0"],
        dev["rapl:package-0"].max_range_uj,
        elapsed_s=1.0,
        max_power_w=dev["rapl:package-0"].max_power_w,
    )
    assert (d.kind, d.delta) == (WRAP, 3_000_000)


def test_garbage_in_the_counter_file_is_an_error_reading_not_an_exception(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "none")
    tree.set("intel-rapl:1", "garbage\x00")
    readings = {r.device_key: r for r in s.read(5)}
    assert readings["rapl:package-1"].status == ERROR
    assert "not an integer" in readings["rapl:package-1"].error
    assert readings["rapl:package-0"].status == OK


def test_negative_counter_is_an_error(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "none")
    tree.set("intel-rapl:0", -5)
    r = s.read(0)[0]
    assert r.status == ERROR and r.energy_uj is None


def test_counter_file_vanishing_is_an_error_reading(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "none")
    (tree.zones["intel-rapl:0:1"] / "energy_uj").unlink()
    readings = {r.device_key: r for r in s.read(0)}
    assert readings["rapl:dram-0"].status == ERROR


def test_bad_max_range_means_no_wrap_handling(tmp_path):
    pc = FakePowercap(tmp_path)
    pc.add_zone("0", "package-0", 1, max_range_uj="junk")
    s = rapl.RaplSensor(pc.path, hwmon=tmp_path / "none")
    assert s.devices()[0].max_range_uj is None


def test_no_tree_is_unavailable(tmp_path):
    with pytest.raises(SensorUnavailable):
        rapl.RaplSensor(tmp_path / "nothing", hwmon=tmp_path / "none")
    p = rapl.probe(tmp_path / "nothing", hwmon=tmp_path / "none")
    assert not p.available and "does not exist" in p.problems[0]


def test_components_filter(tree):
    s = rapl.RaplSensor(tree.path, hwmon=tree.root / "none", components=("dram",))
    assert keys(s) == ["rapl:dram-0", "rapl:dram-1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_energy_uj_explains_cve_2020_8694(tree):
    for zone in tree.zones.values():
        os.chmod(zone / "energy_uj", 0o000)
    with pytest.raises(SensorPermissionError) as e:
        rapl.RaplSensor(tree.path, hwmon=tree.root / "none")
    assert "CVE-2020-8694" in str(e.value)


def test_root_only_energy_uj_seen_by_an_unprivileged_user():
    """The kernel's 0400 root:root energy_uj, read by 'nobody': the real permission path."""
    import shutil
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user; see the test above")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 readable by other users")
    top = Path(tempfile.mkdtemp(prefix="llem-perm-"))
    try:
        # Everything the child needs, world-readable: the package and the tree.
        shutil.copytree(
            Path(rapl.__file__).resolve().parents[1],
            top / "src" / "llem",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        pc = FakePowercap(top / "powercap")
        pc.add_socket(0)
        for p in [top, *top.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        for zone in pc.zones.values():
            os.chmod(zone / "energy_uj", 0o400)
        code = (
            "from llem.sensors import rapl;"
            f"p = rapl.probe({str(pc.path)!r}, {str(top / 'none')!r});"
            "print(p.available); print(p.problems[0])"
        )
        out = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={"PYTHONPATH": str(top / "src"), "PATH": "/usr/bin:/bin"},
            user=65534,
            group=65534,
        )
    finally:
        shutil.rmtree(top)
    assert out.returncode == 0, out.stderr
    available, problem = out.stdout.splitlines()
    assert available == "False"
    assert "permission denied" in problem and "CVE-2020-8694" in problem
