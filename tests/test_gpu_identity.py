"""Slurm's GPU index -> the device keys of the energy rows (llem.node.slurm.GpuMap)."""

from __future__ import annotations

import os

import pytest

from llem.model import EnergyRow, Interval, JobRecord
from llem.node.attribution import JobAttributor
from llem.node.slurm import (
    GPU_INDEX_ASSUMED_MINOR,
    GPU_UNRESOLVED,
    GpuMap,
    gres_gpu_files,
    is_device_key,
)
from llem.node.store import NodeStore
from llem.sensors.base import Device


def gpu(minor: int, index: int, bus: str) -> Device:
    """A GPU as the NVML sensor describes it; NVML's index follows PCI order."""
    return Device(
        key=f"nvml:GPU-m{minor}",
        component="gpu",
        name=f"gpu{minor}",
        sensor="nvml",
        source="measured",
        method="counter",
        attrs={"uuid": f"GPU-m{minor}", "minor": minor, "index": index, "pci_bus_id": bus},
    )


# A node whose minor numbers are not in PCI order: NVML index 0 (bus 07) is /dev/nvidia2.
NODE = [gpu(2, 0, "00000000:07:00.0"), gpu(0, 1, "00000000:0A:00.0"), gpu(1, 2, "00000000:0C:00.0")]


def conf(tmp_path, text):
    path = tmp_path / "gres.conf"
    path.write_text(text)
    path.chmod(0o644)
    return path


def by_name(path: str) -> int:
    """/dev/nvidiaN files whose device node is minor N (the usual case)."""
    return int(path.rsplit("nvidia", 1)[1])


def test_autodetect_numbers_the_gpus_by_device_file_not_by_pci_order(tmp_path):
    path = conf(tmp_path, "AutoDetect=nvml\n")
    m = GpuMap(NODE, "n1", path, minor_of=by_name)
    # Slurm index 0 is /dev/nvidia0 (minor 0), which NVML calls index 1.
    assert m.resolve(("0", "2")) == (("nvml:GPU-m0", "nvml:GPU-m2"), ())
    assert "AutoDetect" in m.source


def test_explicit_records_keep_the_file_order_and_skip_other_nodes(tmp_path):
    path = conf(
        tmp_path,
        "AutoDetect=off\n"
        "NodeName=other Name=gpu File=/dev/nvidia[0-2]\n"
        "NodeName=n[1-4] Name=gpu Type=a100 File=/dev/nvidia2  # the fast one\n"
        "NodeName=n[1-4] Name=gpu Type=a100 File=/dev/nvidia[0-1]\n",
    )
    assert gres_gpu_files(path.read_text(), "n1") == (
        ["/dev/nvidia2", "/dev/nvidia0", "/dev/nvidia1"],
        False,
    )
    m = GpuMap(NODE, "n1", path, minor_of=by_name)
    assert m.resolve(("0",)) == (("nvml:GPU-m2",), ())
    assert m.resolve(("1", "2")) == (("nvml:GPU-m0", "nvml:GPU-m1"), ())


def test_autodetect_with_records_sorts_them_by_the_files_number(tmp_path):
    path = conf(
        tmp_path, "AutoDetect=nvml\nName=gpu File=/dev/nvidia10\nName=gpu File=/dev/nvidia[2,0]\n"
    )
    assert gres_gpu_files(path.read_text(), "n1")[0] == [
        "/dev/nvidia0",
        "/dev/nvidia2",
        "/dev/nvidia10",
    ]


def test_the_device_node_decides_the_minor_not_its_name(tmp_path):
    """A file called nvidia0 that is the character device 195:1 is minor 1."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    devs = tmp_path / "dev"
    devs.mkdir()
    for name, minor in (("nvidia0", 1), ("nvidia1", 0)):
        os.mknod(devs / name, 0o600 | 0o020000, os.makedev(195, minor))
    path = conf(tmp_path, f"Name=gpu File={devs}/nvidia[0-1]\n")
    two = [gpu(0, 0, "a"), gpu(1, 1, "b")]
    assert GpuMap(two, "n1", path).resolve(("0", "1")) == (("nvml:GPU-m1", "nvml:GPU-m0"), ())


def test_no_records_means_index_equals_minor_flagged(tmp_path):
    for gres in (None, tmp_path / "missing.conf", conf(tmp_path, "# nothing for GPUs\n")):
        m = GpuMap(NODE, "n1", gres)
        assert m.resolve(("2",)) == (("nvml:GPU-m2",), (GPU_INDEX_ASSUMED_MINOR,))


def test_a_gres_conf_others_may_write_is_not_believed(tmp_path):
    path = conf(tmp_path, "Name=gpu File=/dev/nvidia[2,0,1]\n")
    assert GpuMap(NODE, "n1", path, minor_of=by_name).resolve(("0",))[0] == ("nvml:GPU-m2",)
    path.chmod(0o666)
    assert GpuMap(NODE, "n1", path, minor_of=by_name).resolve(("0",)) == (
        ("nvml:GPU-m0",),
        (GPU_INDEX_ASSUMED_MINOR,),
    )


def test_an_index_naming_no_gpu_here_stays_and_is_flagged(tmp_path):
    path = conf(tmp_path, "Name=gpu File=/dev/nvidia[0-1]\n")
    keys, flags = GpuMap(NODE, "n1", path, minor_of=by_name).resolve(("1", "7", "nvml:GPU-x"))
    assert keys == ("nvml:GPU-m1", "7", "nvml:GPU-x") and flags == (GPU_UNRESOLVED,)
    assert [is_device_key(k) for k in keys] == [True, False, True]


def test_the_attributor_stores_the_keys_and_flags_at_the_first_interval(tmp_path):
    path = conf(tmp_path, "AutoDetect=off\nName=gpu File=/dev/nvidia[2,0,1]\n")
    with NodeStore(tmp_path / "node.db") as store:
        run = store.add_job(JobRecord("7", "c", "n1", 1_000, gpus=("0", "1"), flags=("x",)))
        att = JobAttributor(store, "n1", NODE, 0, proc_root=tmp_path, gres_conf=path)
        att.gpu_map = GpuMap(NODE, "n1", path, minor_of=by_name)
        rows = tuple(
            EnergyRow(d.key, 1_000_000 * (i + 1), "delta", "ok", None) for i, d in enumerate(NODE)
        )
        out = att(Interval("s", 2_000, 3_000, 0, 1_000, rows))
        assert store.run(run).gpus == ("nvml:GPU-m2", "nvml:GPU-m0")
        assert store.run(run).flags == ("x",)
        got = {(s.device_key, s.energy_uj) for s in out.shares}
        assert got == {("nvml:GPU-m2", 1_000_000), ("nvml:GPU-m0", 2_000_000)}
        assert out.remainder == (("nvml:GPU-m1", 3_000_000, "unattributed"),)


def test_the_sampler_keeps_slurmds_config_path_and_drops_the_jobs_variables():
    from llem.node.daemon import _clean_env

    env = _clean_env(
        {
            "SLURM_CONF": "/etc/slurm/slurm.conf",
            "SLURM_JOB_GPUS": "0",
            "CUDA_VISIBLE_DEVICES": "0",
            "PATH": "/bin",
        }
    )
    assert env == {"SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/bin"}


def amd(minor: int) -> Device:
    """An AMD GPU as the amdsmi sensor describes it: minor = its render node - 128."""
    return Device(
        key=f"amdsmi:uuid-{minor}",
        component="gpu",
        name=f"gpu{minor}",
        sensor="amdsmi",
        source="measured",
        method="counter",
        attrs={"uuid": f"uuid-{minor}", "minor": minor, "bdf": f"0000:c{minor}:00.0"},
    )


def test_amd_render_nodes_in_gres_conf_resolve_to_the_amdsmi_devices(tmp_path):
    """gres.conf lists AMD GPUs by DRM render node (/dev/dri/renderD128 is char 226:128, the
    amdsmi sensor's minor 0): the device's own numbers decide, not the file names."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    devs = tmp_path / "dri"
    devs.mkdir()
    for name, minor in (("renderD128", 129), ("renderD129", 128)):
        os.mknod(devs / name, 0o600 | 0o020000, os.makedev(226, minor))
    path = conf(tmp_path, f"Name=gpu File={devs}/renderD[128-129]\n")
    two = [amd(0), amd(1)]
    assert GpuMap(two, "n1", path).resolve(("0", "1")) == (("amdsmi:uuid-1", "amdsmi:uuid-0"), ())


def test_a_drm_card_node_is_taken_to_its_render_node_through_sysfs(tmp_path):
    """/dev/dri/card1 (226:1) whose GPU's render node is renderD128: GPU 0 (card0 being a
    BMC's VGA without a render node)."""
    from llem.node.slurm import _device_minor

    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    card = tmp_path / "card1"
    os.mknod(card, 0o600 | 0o020000, os.makedev(226, 1))
    sysfs = tmp_path / "sys"
    drm = sysfs / "dev" / "char" / "226:1" / "device" / "drm"
    (drm / "card1").mkdir(parents=True)
    (drm / "renderD128").mkdir()
    assert _device_minor(str(card), sys_root=str(sysfs)) == 0
    assert _device_minor(str(card), sys_root=str(tmp_path / "nosys")) is None  # unknown: unresolved
