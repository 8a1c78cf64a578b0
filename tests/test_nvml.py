"""The NVML sensor against the real pynvml, its functions patched one by one.

Errors are real ``pynvml.NVMLError(code)`` objects, which build the right subclasses without
a driver; pynvml's function-pointer lookup is patched to fail loudly, so that no call can
reach a real driver unnoticed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

import llem
from llem import units
from llem.errors import SensorPermissionError, SensorReadError, SensorUnavailable
from llem.sensors import nvml
from llem.sensors.base import COUNTER, ERROR, LOST, MEASURED, OK, POWER_POLL, Device, Reading

S = 1_000_000_000  # ns


@dataclass
class FakeGpu:
    """One GPU as the patched pynvml functions see it (mJ, mW), also its own handle."""

    uuid: str
    minor: int
    name: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 0
    power_mw: int = 0
    power_limit_mw: int | None = 700_000
    bus_id: bytes | None = b"00000000:18:00.0"
    energy_supported: bool = True
    lost: bool = False
    errors: dict[str, int] = field(default_factory=dict)  # pynvml function name -> code


class FakeNvml:
    """The driver behind the patched functions; tests change it between reads."""

    def __init__(self) -> None:
        self.gpus: list[FakeGpu] = []
        self.init_error: int | None = None
        self.driver = "550.54.15"
        self.calls: list[str] = []
        self.initialised = 0

    def add(self, *gpus: FakeGpu) -> FakeNvml:
        self.gpus.extend(gpus)
        return self

    def count(self, name: str) -> int:
        return self.calls.count(name)


def _raise(code: int) -> None:
    raise pynvml.NVMLError(code)


def _device_call(fake: FakeNvml, name: str, answer):
    """A patched per-GPU pynvml function: lost and injected errors first, then ``answer``."""

    def call(handle: FakeGpu):
        fake.calls.append(name)
        if handle.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in handle.errors:
            _raise(handle.errors[name])
        return answer(handle)

    return call


def _energy(gpu: FakeGpu) -> int:
    if not gpu.energy_supported:
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return gpu.energy_mj


def _power_limit(gpu: FakeGpu) -> int:
    if gpu.power_limit_mw is None:
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return gpu.power_limit_mw


def _pci(gpu: FakeGpu):
    if gpu.bus_id is None:
        _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
    return SimpleNamespace(busId=gpu.bus_id)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """Patch every pynvml function the sensor uses, one by one, onto a FakeNvml."""
    fake = FakeNvml()

    def unpatched(name: str):
        raise AssertionError(f"unpatched NVML call reached the library: {name}")

    def init() -> None:
        fake.calls.append("nvmlInit")
        if fake.init_error is not None:
            _raise(fake.init_error)
        fake.initialised += 1

    def shutdown() -> None:
        fake.calls.append("nvmlShutdown")
        if fake.initialised == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        fake.initialised -= 1

    def handle_by_index(index: int) -> FakeGpu:
        fake.calls.append("nvmlDeviceGetHandleByIndex")
        if index >= len(fake.gpus):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = fake.gpus[index]
        if gpu.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex" in gpu.errors:
            _raise(gpu.errors["nvmlDeviceGetHandleByIndex"])
        return gpu

    patches = {
        "_nvmlGetFunctionPointer": unpatched,
        "nvmlErrorString": lambda code: f"NVML error string {code}",
        "nvmlInit": init,
        "nvmlShutdown": shutdown,
        "nvmlSystemGetDriverVersion": lambda: fake.driver,
        "nvmlDeviceGetCount": lambda: len(fake.gpus),
        "nvmlDeviceGetHandleByIndex": handle_by_index,
    }
    per_gpu = {
        "nvmlDeviceGetUUID": lambda g: g.uuid,
        "nvmlDeviceGetMinorNumber": lambda g: g.minor,
        "nvmlDeviceGetName": lambda g: g.name,
        "nvmlDeviceGetPciInfo": _pci,
        "nvmlDeviceGetEnforcedPowerLimit": _power_limit,
        "nvmlDeviceGetTotalEnergyConsumption": _energy,
        "nvmlDeviceGetPowerUsage": lambda g: g.power_mw,
    }
    for name, answer in per_gpu.items():
        patches[name] = _device_call(fake, name, answer)
    for name, fn in patches.items():
        assert hasattr(pynvml, name), f"pynvml has no {name}: the sensor's calls are stale"
        monkeypatch.setattr(pynvml, name, fn)
    return fake


UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
UUID_C = "GPU-cccccccc-1111-2222-3333-444444444444"


def three_gpus(fake: FakeNvml) -> FakeNvml:
    """Three GPUs whose NVML index order (0, 1, 2) differs from their minors (2, 0, 1)."""
    return fake.add(
        FakeGpu(UUID_A, minor=2, energy_mj=1_000),
        FakeGpu(UUID_B, minor=0, energy_mj=2_000),
        FakeGpu(UUID_C, minor=1, energy_mj=3_000),
    )


def by_key(readings: list[Reading]) -> dict[str, Reading]:
    return {r.device_key: r for r in readings}


# --- opening, identity, units ------------------------------------------------------------


def test_devices_identify_gpus_by_uuid_and_minor(fake: FakeNvml) -> None:
    three_gpus(fake)
    with nvml.NvmlSensor() as sensor:
        devices = sensor.devices()
    assert [d.name for d in devices] == ["gpu0", "gpu1", "gpu2"]
    assert devices[0] == Device(
        key=f"nvml:{UUID_B}",
        component="gpu",
        name="gpu0",
        sensor="nvml",
        source=MEASURED,
        method=COUNTER,
        max_range_uj=None,
        max_power_w=700 * 1.5,
        attrs={
            "uuid": UUID_B,
            "minor": 0,
            "index": 1,
            "product": "NVIDIA H100 80GB HBM3",
            "pci_bus_id": "00000000:18:00.0",
        },
    )
    assert sensor.name == "nvml"
    assert sensor.driver_version == "550.54.15"


def test_energy_is_millijoules_times_1000(fake: FakeNvml) -> None:
    three_gpus(fake)
    with nvml.NvmlSensor() as sensor:
        first = by_key(sensor.read(5 * S))
        fake.gpus[1].energy_mj += 250  # 0.25 J on minor 0
        second = by_key(sensor.read(6 * S))
    key = f"nvml:{UUID_B}"
    assert first[key] == Reading(key, 2_000_000, 5 * S)
    assert second[key] == Reading(key, 2_250_000, 6 * S)
    step = units.counter_delta(first[key].energy_uj, second[key].energy_uj, None)
    assert (step.delta, step.kind) == (250_000, units.OK)
    assert [r.energy_uj for r in sensor.read(7 * S)] == [2_250_000, 3_000_000, 1_000_000]


def test_counter_going_back_is_a_reset(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=0, energy_mj=9_000_000))
    with nvml.NvmlSensor() as sensor:
        (before,) = sensor.read(1 * S)
        fake.gpus[0].energy_mj = 40  # driver reloaded
        (after,) = sensor.read(2 * S)
    step = units.counter_delta(before.energy_uj, after.energy_uj, sensor.devices()[0].max_range_uj)
    assert (after.status, after.energy_uj, step.kind) == (OK, 40_000, units.RESET)


def test_optional_attributes_are_left_out_when_not_supported(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=0, power_limit_mw=None, bus_id=None))
    fake.gpus[0].errors["nvmlDeviceGetName"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with nvml.NvmlSensor() as sensor:
        (device,) = sensor.devices()
    assert device.max_power_w is None
    assert device.attrs == {"uuid": UUID_A, "minor": 0, "index": 0}


def test_close_shuts_nvml_down_once(fake: FakeNvml) -> None:
    three_gpus(fake)
    sensor = nvml.NvmlSensor()
    sensor.close()
    sensor.close()
    assert fake.count("nvmlInit") == fake.count("nvmlShutdown") == 1


def test_importing_the_module_does_not_import_pynvml() -> None:
    code = "import sys, llem.sensors.nvml; assert 'pynvml' not in sys.modules, 'eager import'"
    src = str(Path(llem.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- selection ---------------------------------------------------------------------------


def test_select_by_minor_number_not_nvml_index(fake: FakeNvml) -> None:
    three_gpus(fake)
    with nvml.NvmlSensor(select=["0", "2"]) as sensor:
        devices = sensor.devices()
    # Minor 0 is at NVML index 1, minor 2 at index 0.
    assert [(d.attrs["minor"], d.attrs["index"]) for d in devices] == [(0, 1), (2, 0)]
    assert [d.attrs["uuid"] for d in devices] == [UUID_B, UUID_A]


def test_select_by_uuid_any_case_and_once(fake: FakeNvml) -> None:
    three_gpus(fake)
    with nvml.NvmlSensor(select=[UUID_C.upper(), "1", UUID_C]) as sensor:
        assert [d.key for d in sensor.devices()] == [f"nvml:{UUID_C}"]


def test_unknown_selected_gpu_is_an_error_naming_it(fake: FakeNvml) -> None:
    three_gpus(fake)
    with pytest.raises(SensorUnavailable, match=r"selected GPU 7, GPU-nope not present") as e:
        nvml.NvmlSensor(select=["1", "7", "GPU-nope"])
    assert f"minor 0 = {UUID_B}" in str(e.value)
    assert fake.count("nvmlShutdown") == 1  # nothing left open


def test_nvml_index_alone_never_selects(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=4))
    with pytest.raises(SensorUnavailable, match="selected GPU 0 not present"):
        nvml.NvmlSensor(select=["0"])  # NVML index 0 exists, minor 0 does not


def test_select_one_string_is_refused(fake: FakeNvml) -> None:
    three_gpus(fake)
    with pytest.raises(TypeError, match="list"):
        nvml.NvmlSensor(select="0,1")


# --- power polling -----------------------------------------------------------------------


def test_no_energy_counter_falls_back_to_power_polling(fake: FakeNvml) -> None:
    fake.add(
        FakeGpu(UUID_A, minor=0, energy_supported=False, power_mw=100_000),
        FakeGpu(UUID_B, minor=1, energy_mj=10),
    )
    with nvml.NvmlSensor() as sensor:
        assert [d.method for d in sensor.devices()] == [POWER_POLL, COUNTER]
        assert {d.source for d in sensor.devices()} == {MEASURED}
        energy_calls_at_open = fake.count("nvmlDeviceGetTotalEnergyConsumption")
        readings = [sensor.read(0)[0]]
        fake.gpus[0].power_mw = 300_000
        readings.append(sensor.read(1 * S)[0])  # (100 W + 300 W) / 2 x 1 s = 200 J
        readings.append(sensor.read(3 * S)[0])  # 300 W x 2 s = 600 J
        fake.gpus[0].power_mw = 0
        readings.append(sensor.read(3 * S + S // 2)[0])  # (300 W + 0 W) / 2 x 0.5 s = 75 J
    assert [r.energy_uj for r in readings] == [0, 200_000_000, 800_000_000, 875_000_000]
    assert {r.status for r in readings} == {OK}
    # Decided once at open: the reads never ask the counter of the polled GPU again.
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == energy_calls_at_open + 4


def test_missing_energy_function_also_falls_back(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=0))
    fake.gpus[0].errors["nvmlDeviceGetTotalEnergyConsumption"] = (
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    )
    with nvml.NvmlSensor() as sensor:
        assert sensor.devices()[0].method == POWER_POLL


def test_power_integrator_keeps_sub_microjoule_remainders() -> None:
    integrator = nvml.PowerIntegrator()
    # 750 mW over 1 us is 0.75 uJ a step: the counter floors, the sum does not.
    counters = [integrator.add(750, t * 1_000) for t in range(5)]
    assert counters == [0, 0, 1, 2, 3]


def test_power_integrator_ignores_time_that_does_not_advance() -> None:
    integrator = nvml.PowerIntegrator()
    integrator.add(1_000, 10 * S)
    assert integrator.add(5_000_000, 10 * S) == 0
    assert integrator.add(5_000_000, 9 * S) == 0
    assert integrator.add(5_000_000, 10 * S) == 5_000_000_000  # 5 kW x 1 s from the last


def test_transient_power_error_is_bridged(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=0, energy_supported=False, power_mw=200_000))
    with nvml.NvmlSensor() as sensor:
        sensor.read(0)
        fake.gpus[0].errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_TIMEOUT
        (failed,) = sensor.read(1 * S)
        del fake.gpus[0].errors["nvmlDeviceGetPowerUsage"]
        (back,) = sensor.read(2 * S)
    assert (failed.status, failed.energy_uj) == (ERROR, None)
    assert (back.status, back.energy_uj) == (OK, 400_000_000)


# --- errors ------------------------------------------------------------------------------


def test_gpu_lost_mid_run_while_the_others_go_on(fake: FakeNvml) -> None:
    three_gpus(fake)
    lost_key = f"nvml:{UUID_C}"  # minor 1
    with nvml.NvmlSensor() as sensor:
        sensor.read(1 * S)
        fake.gpus[2].lost = True
        for gpu in fake.gpus:
            gpu.energy_mj += 100
        second = by_key(sensor.read(2 * S))
        fake.gpus[2].lost = False
        fake.gpus[2].errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_UNKNOWN
        third = by_key(sensor.read(3 * S))
    assert second[lost_key].status == LOST
    assert second[lost_key].energy_uj is None
    assert "gpu1" in second[lost_key].error and "GPU is lost" in second[lost_key].error
    assert second[f"nvml:{UUID_A}"] == Reading(f"nvml:{UUID_A}", 1_100_000, 2 * S)
    assert second[f"nvml:{UUID_B}"] == Reading(f"nvml:{UUID_B}", 2_100_000, 2 * S)
    # NVML says UNKNOWN for a GPU that was lost: still lost.
    assert third[lost_key].status == LOST
    assert [r.status for r in third.values()].count(OK) == 2


def test_unknown_error_on_a_healthy_gpu_is_an_error(fake: FakeNvml) -> None:
    three_gpus(fake)
    fake.gpus[0].errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_UNKNOWN
    with nvml.NvmlSensor() as sensor:
        readings = by_key(sensor.read(1 * S))
    bad = readings[f"nvml:{UUID_A}"]
    assert (bad.status, bad.energy_uj) == (ERROR, None)
    assert "gpu2" in bad.error and "Unknown Error" in bad.error


def test_lost_power_polled_gpu_restarts_its_counter(fake: FakeNvml) -> None:
    fake.add(FakeGpu(UUID_A, minor=0, energy_supported=False, power_mw=100_000))
    with nvml.NvmlSensor() as sensor:
        sensor.read(0)
        (before,) = sensor.read(1 * S)
        fake.gpus[0].lost = True
        (lost,) = sensor.read(2 * S)
        fake.gpus[0].lost = False
        (after,) = sensor.read(3 * S)
    assert (before.energy_uj, lost.status, after.energy_uj) == (100_000_000, LOST, 0)
    assert units.counter_delta(before.energy_uj, after.energy_uj).kind == units.RESET


def test_other_error_codes_become_error_readings(fake: FakeNvml) -> None:
    three_gpus(fake)
    fake.gpus[1].errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_TIMEOUT
    with nvml.NvmlSensor() as sensor:
        readings = by_key(sensor.read(1 * S))
        del fake.gpus[1].errors["nvmlDeviceGetTotalEnergyConsumption"]
        again = by_key(sensor.read(2 * S))
    bad = readings[f"nvml:{UUID_B}"]
    assert (bad.status, bad.energy_uj) == (ERROR, None)
    assert bad.error == f"gpu0 ({UUID_B}) energy: NVML error 10: Timeout"
    assert again[f"nvml:{UUID_B}"].status == OK


def test_unexpected_exception_in_one_gpu_does_not_stop_read(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_gpus(fake)
    energy = pynvml.nvmlDeviceGetTotalEnergyConsumption

    def broken(handle: FakeGpu) -> int:
        if handle.minor == 2:
            raise RuntimeError("ctypes surprise")
        return energy(handle)

    with nvml.NvmlSensor() as sensor:
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", broken)
        readings = sensor.read(1 * S)
    assert [r.status for r in readings] == [OK, OK, ERROR]
    assert "ctypes surprise" in readings[2].error


def test_no_permission_at_init(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(SensorPermissionError, match="no permission") as e:
        nvml.NvmlSensor()
    assert isinstance(e.value.__cause__, pynvml.NVMLError_NoPermission)
    probe = nvml.probe()
    assert not probe.available
    assert "no permission" in probe.problems[0]


def test_no_permission_on_read_is_an_error_reading(fake: FakeNvml) -> None:
    three_gpus(fake)
    with nvml.NvmlSensor() as sensor:
        fake.gpus[0].errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NO_PERMISSION
        readings = by_key(sensor.read(1 * S))
    assert readings[f"nvml:{UUID_A}"].status == ERROR
    assert "no permission" in readings[f"nvml:{UUID_A}"].error


def test_gpu_we_may_not_open_is_skipped_unless_selected(fake: FakeNvml) -> None:
    three_gpus(fake)
    # Inside a job's device cgroup, NVML refuses the GPUs of other jobs.
    fake.gpus[0].errors["nvmlDeviceGetHandleByIndex"] = pynvml.NVML_ERROR_NO_PERMISSION
    with nvml.NvmlSensor() as sensor:
        assert [d.name for d in sensor.devices()] == ["gpu0", "gpu1"]
        assert "GPU at NVML index 0: no permission" in sensor.problems[0]
    with pytest.raises(SensorPermissionError, match="selected GPU 2 not present"):
        nvml.NvmlSensor(select=["2"])


def test_driver_not_loaded_means_no_gpus(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(SensorUnavailable, match="no NVIDIA driver") as e:
        nvml.NvmlSensor()
    assert isinstance(e.value.__cause__, pynvml.NVMLError_DriverNotLoaded)
    probe = nvml.probe()
    assert (probe.available, probe.devices) == (False, ())
    assert probe.problems == ("no NVIDIA driver: the nvidia kernel module is not loaded",)


def test_library_not_found_means_no_gpus(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    probe = nvml.probe()
    assert not probe.available
    assert probe.problems == ("no NVIDIA driver: libnvidia-ml.so.1 not found",)


def test_driver_without_gpus(fake: FakeNvml) -> None:
    with pytest.raises(SensorUnavailable, match="NVML found no GPU"):
        nvml.NvmlSensor()
    assert fake.count("nvmlShutdown") == 1


def test_error_mapping_raises_from_the_nvml_error() -> None:
    with pytest.raises(SensorReadError) as e, nvml._nvml_errors("gpu0 energy"):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_CORRUPTED_INFOROM)
    assert str(e.value) == "gpu0 energy: NVML error 14: Corrupted infoROM"
    assert isinstance(e.value.__cause__, pynvml.NVMLError_CorruptedInforom)


# --- probe -------------------------------------------------------------------------------


def test_probe_lists_gpus_and_how_each_is_read(fake: FakeNvml) -> None:
    three_gpus(fake)
    fake.gpus[2].energy_supported = False
    probe = nvml.probe()
    assert probe.available
    assert [d.name for d in probe.devices] == ["gpu0", "gpu1", "gpu2"]
    assert probe.problems == ()
    assert probe.notes == (
        "NVIDIA driver 550.54.15",
        f"gpu0: NVIDIA H100 80GB HBM3, {UUID_B}, minor 0, NVML index 1: energy counter",
        (
            f"gpu1: NVIDIA H100 80GB HBM3, {UUID_C}, minor 1, NVML index 2: "
            "no energy counter, power polled and integrated by llem"
        ),
        f"gpu2: NVIDIA H100 80GB HBM3, {UUID_A}, minor 2, NVML index 0: energy counter",
    )
    assert fake.count("nvmlInit") == fake.count("nvmlShutdown") == 1


def test_probe_reports_a_lost_gpu(fake: FakeNvml) -> None:
    three_gpus(fake)
    fake.gpus[0].lost = True
    probe = nvml.probe()
    assert probe.available  # the two others can be read
    assert len(probe.devices) == 2
    assert "GPU at NVML index 0: GPU is lost" in probe.problems[0]


# --- the real driver ---------------------------------------------------------------------


@pytest.mark.gpu
def test_real_driver_reads_every_gpu() -> None:
    try:
        sensor = nvml.NvmlSensor()
    except SensorUnavailable as e:
        pytest.skip(f"no NVIDIA driver or GPU here: {e}")
    with sensor:
        first = sensor.read(time.monotonic_ns())
        time.sleep(0.2)
        second = sensor.read(time.monotonic_ns())
    assert sensor.devices()
    assert all(r.status == OK for r in first + second), [r.error for r in first + second]
    for a, b in zip(first, second):
        assert b.energy_uj >= a.energy_uj
