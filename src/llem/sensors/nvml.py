"""NVIDIA GPUs through NVML: one cumulative energy counter per GPU, in microjoules.

This is the only module in llem that imports ``pynvml`` (package ``nvidia-ml-py``), and it
does so inside functions, so that importing it costs nothing on nodes without GPUs and on
the Prolog path.

Energy comes from ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver was
loaded; Volta and newer). Where a GPU has no such counter, the sensor polls
``nvmlDeviceGetPowerUsage`` (milliwatts) at every :meth:`NvmlSensor.read` and integrates it
with the trapezoid rule into a synthetic counter (``method="power_poll"``, still measured).

GPUs are identified by UUID and by minor number (``/dev/nvidiaN``), which is what Slurm's GRES
index means. The NVML index follows PCI bus order, while the driver hands out minor numbers
as it probes the boards, so the two may differ: the NVML index never selects a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from llem.errors import LlemError, SensorPermissionError, SensorReadError, SensorUnavailable
from llem.sensors.base import (
    COUNTER,
    ERROR,
    LOST,
    MEASURED,
    OK,
    POWER_POLL,
    Device,
    Probe,
    Reading,
)

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger(__name__)

SENSOR = "nvml"
UJ_PER_MJ = 1_000
MW_PER_W = 1_000
# mW x ns = 1e-12 J = 1e-6 uJ; the trapezoid halves the sum of both ends.
_MW_NS_X2_PER_UJ = 2 * 1_000_000
# The enforced power limit is what the board may draw on average; short peaks go above it.
DEFAULT_POWER_MARGIN = 1.5

T = TypeVar("T")


class _NotSupported(SensorReadError):
    """NVML has no such query for this GPU or driver (NOT_SUPPORTED, FUNCTION_NOT_FOUND)."""


class _GpuLost(SensorReadError):
    """The GPU fell off the bus (GPU_IS_LOST); it needs a reset or a reboot."""


def _pynvml() -> ModuleType:
    """Import pynvml on first use; importing it does not load the driver library."""
    import pynvml

    return pynvml


# --- error mapping ---------------------------------------------------------------------------


def _llem_error(e: Exception, what: str) -> LlemError:
    """The llem error for a ``pynvml.NVMLError``, by its code.

    Args:
        e: the NVMLError raised by pynvml.
        what: what was being done, for the message (``"gpu0 (GPU-...) energy"``).
    """
    nv = _pynvml()
    code = getattr(e, "value", None)
    if code == nv.NVML_ERROR_LIBRARY_NOT_FOUND:
        return SensorUnavailable("no NVIDIA driver: libnvidia-ml.so.1 not found")
    if code == nv.NVML_ERROR_DRIVER_NOT_LOADED:
        return SensorUnavailable("no NVIDIA driver: the nvidia kernel module is not loaded")
    if code == nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return SensorUnavailable(
            "NVIDIA driver mismatch: libnvidia-ml.so.1 does not match the loaded kernel module"
            " (reload the driver or reboot after an upgrade)"
        )
    if code == nv.NVML_ERROR_NO_PERMISSION:
        return SensorPermissionError(
            f"{what}: no permission (run as root, or check /dev/nvidia* and the device cgroup)"
        )
    if code == nv.NVML_ERROR_GPU_IS_LOST:
        return _GpuLost(f"{what}: GPU is lost (fell off the bus; needs a reset or reboot)")
    if code in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_FUNCTION_NOT_FOUND):
        return _NotSupported(f"{what}: not supported by this GPU or driver ({e})")
    return SensorReadError(f"{what}: NVML error {code}: {e}")


@contextmanager
def _nvml_errors(what: str) -> Iterator[None]:
    """Turn any ``pynvml.NVMLError`` raised inside into the llem error for its code."""
    nv = _pynvml()
    try:
        yield
    except nv.NVMLError as e:
        raise _llem_error(e, what) from e


def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Call one pynvml function, with its errors mapped."""
    with _nvml_errors(what):
        return fn(*args)


def _optional(what: str, fn: Callable[..., T], *args: Any) -> T | None:
    """Call a pynvml function whose answer is nice to have; None where it fails."""
    try:
        return _call(what, fn, *args)
    except (SensorReadError, SensorPermissionError) as e:
        log.debug("%s", e)
        return None


def _was_unknown(e: BaseException) -> bool:
    return getattr(e.__cause__, "value", None) == _pynvml().NVML_ERROR_UNKNOWN


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# --- power polling -----------------------------------------------------------------------------


class PowerIntegrator:
    """A synthetic energy counter: power samples integrated with the trapezoid rule.

    The sum is kept exactly, as an integer in milliwatt-nanoseconds times two, so that no
    rounding accumulates over a long job; only the counter shown is floored to microjoules.
    """

    def __init__(self) -> None:
        self._mw_ns_x2 = 0
        self._last_power_mw: int | None = None
        self._last_mono_ns: int | None = None

    def add(self, power_mw: int, mono_ns: int) -> int:
        """Add one power sample and return the counter.

        Args:
            power_mw: the instantaneous power in milliwatts.
            mono_ns: when it was sampled, on a monotonic clock.

        Returns:
            The cumulative energy in microjoules since the first sample (0 at the first).
        """
        if self._last_mono_ns is not None and self._last_power_mw is not None:
            elapsed_ns = mono_ns - self._last_mono_ns
            # A clock that does not move forward adds nothing; the sample still counts.
            if elapsed_ns > 0:
                self._mw_ns_x2 += (self._last_power_mw + power_mw) * elapsed_ns
        self._last_power_mw, self._last_mono_ns = power_mw, mono_ns
        return self.energy_uj

    @property
    def energy_uj(self) -> int:
        """The counter in microjoules."""
        return self._mw_ns_x2 // _MW_NS_X2_PER_UJ

    def restart(self) -> None:
        """Start again from zero, as a hardware counter does after a driver reload."""
        self._mw_ns_x2, self._last_power_mw, self._last_mono_ns = 0, None, None


# --- one GPU -----------------------------------------------------------------------------------


@dataclass
class _Gpu:
    """What the sensor holds for one GPU it reads."""

    device: Device
    handle: Any
    uuid: str
    minor: int | None
    index: int
    integrator: PowerIntegrator | None = None  # only for power-polled GPUs
    status: str = OK
    lost: bool = False

    @property
    def label(self) -> str:
        return f"{self.device.name} ({self.uuid})"


@dataclass
class _Discovery:
    gpus: list[_Gpu] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    permission_denied: bool = False


def _has_energy_counter(handle: Any, what: str) -> bool:
    """True when the GPU has a total-energy counter (Volta and newer)."""
    nv = _pynvml()
    try:
        _call(f"{what} energy", nv.nvmlDeviceGetTotalEnergyConsumption, handle)
    except _NotSupported:
        return False
    except SensorReadError as e:
        # Lost or failing now: assume the counter; the reads will tell what goes on.
        log.warning("%s; assuming it has an energy counter", e)
    return True


def _max_power_w(handle: Any, what: str, margin: float) -> float | None:
    limit_mw = _optional(f"{what} power limit", _pynvml().nvmlDeviceGetEnforcedPowerLimit, handle)
    if not limit_mw:
        return None
    return limit_mw / MW_PER_W * margin


def _pci_bus_id(handle: Any, what: str) -> str | None:
    info = _optional(f"{what} PCI info", _pynvml().nvmlDeviceGetPciInfo, handle)
    bus_id = getattr(info, "busId", None)
    return _text(bus_id) if bus_id else None


def _open_gpu(index: int, power_margin: float) -> _Gpu:
    """Identify the GPU at one NVML index and decide how to read it."""
    nv = _pynvml()
    what = f"GPU at NVML index {index}"
    handle = _call(what, nv.nvmlDeviceGetHandleByIndex, index)
    uuid = _text(_call(f"{what} UUID", nv.nvmlDeviceGetUUID, handle))
    try:
        minor: int | None = _call(f"{what} minor number", nv.nvmlDeviceGetMinorNumber, handle)
    except _NotSupported:
        minor = None
    product = _optional(f"{what} name", nv.nvmlDeviceGetName, handle)
    bus_id = _pci_bus_id(handle, what)
    counter = _has_energy_counter(handle, what)

    attrs: dict[str, object] = {"uuid": uuid, "minor": minor, "index": index}
    if product is not None:
        attrs["product"] = _text(product)
    if bus_id is not None:
        attrs["pci_bus_id"] = bus_id
    device = Device(
        key=f"{SENSOR}:{uuid}",
        component="gpu",
        name=f"gpu{minor}" if minor is not None else f"gpu-{uuid}",
        sensor=SENSOR,
        source=MEASURED,
        method=COUNTER if counter else POWER_POLL,
        max_range_uj=None,  # never wraps in practice; resets on driver reload
        max_power_w=_max_power_w(handle, what, power_margin),
        attrs=attrs,
    )
    integrator = None if counter else PowerIntegrator()
    return _Gpu(device, handle, uuid, minor, index, integrator)


def _discover(power_margin: float) -> _Discovery:
    """Every GPU NVML can open; those it cannot are skipped with a problem sentence."""
    nv = _pynvml()
    found = _Discovery()
    count = _call("counting GPUs", nv.nvmlDeviceGetCount)
    for index in range(count):
        try:
            found.gpus.append(_open_gpu(index, power_margin))
        except (SensorReadError, SensorPermissionError) as e:
            log.warning("skipping GPU: %s", e)
            found.problems.append(f"skipped: {e}")
            found.permission_denied |= isinstance(e, SensorPermissionError)
    found.gpus.sort(key=lambda g: (g.minor is None, g.minor or 0, g.index))
    return found


# --- selection ---------------------------------------------------------------------------------


def _matches(gpu: _Gpu, wanted: str) -> bool:
    """True when ``wanted`` names this GPU: a minor number or a UUID, never the NVML index."""
    if wanted.isdigit():
        return gpu.minor is not None and gpu.minor == int(wanted)
    return gpu.uuid.lower() == wanted.lower()


def _select(found: _Discovery, select: Iterable[str] | None) -> list[_Gpu]:
    """The GPUs named by ``select`` (all when None), each once, in the order found.

    Raises:
        SensorUnavailable: no GPU at all, or a selected GPU is not on this node.
        SensorPermissionError: a selected GPU is missing and some GPUs could not be opened
            for lack of permission.
    """
    if select is None:
        if not found.gpus:
            detail = "; ".join(found.problems)
            raise SensorUnavailable("NVML found no GPU" + (f" ({detail})" if detail else ""))
        return list(found.gpus)
    if isinstance(select, str):
        raise TypeError("select takes a list of UUIDs or minor numbers, not one string")
    wanted = [str(s).strip() for s in select]
    missing = [w for w in wanted if not any(_matches(g, w) for g in found.gpus)]
    if missing:
        raise _missing_error(found, missing)
    return [g for g in found.gpus if any(_matches(g, w) for w in wanted)]


def _missing_error(found: _Discovery, missing: list[str]) -> LlemError:
    present = ", ".join(f"minor {g.minor} = {g.uuid}" for g in found.gpus) or "none"
    message = f"selected GPU {', '.join(missing)} not present on this node (found: {present})"
    if found.problems:
        message += "; " + "; ".join(found.problems)
    if found.permission_denied:
        return SensorPermissionError(message)
    return SensorUnavailable(message)


# --- the sensor --------------------------------------------------------------------------------


def _init() -> None:
    """nvmlInit, with every failure that means "no usable driver" as SensorUnavailable."""
    try:
        _call("nvmlInit", _pynvml().nvmlInit)
    except _NotSupported as e:
        raise SensorUnavailable(f"NVIDIA driver too old for llem: {e}") from e


def _shutdown() -> None:
    try:
        _call("nvmlShutdown", _pynvml().nvmlShutdown)
    except LlemError as e:
        log.warning("%s", e)


class NvmlSensor:
    """Energy counters of the NVIDIA GPUs on this node (or of the selected ones).

    Opening initialises NVML and fixes the devices; :meth:`close` shuts NVML down. Usable as
    a context manager.

    Attributes:
        name: ``"nvml"``.
        driver_version: the NVIDIA driver version, or None if NVML did not say.
        problems: sentences about GPUs that could not be opened and were skipped.
    """

    name = SENSOR

    def __init__(
        self,
        select: Iterable[str] | None = None,
        *,
        power_margin: float = DEFAULT_POWER_MARGIN,
    ) -> None:
        """Open NVML and the GPUs to read.

        Args:
            select: UUIDs (``GPU-...``) or minor numbers (``"3"`` for ``/dev/nvidia3``, what
                Slurm's GRES index means) of the GPUs to read; None reads every GPU. Never
                NVML indices.
            power_margin: ``max_power_w`` is the enforced power limit times this.

        Raises:
            SensorUnavailable: no NVIDIA driver or library, no GPU, or a selected GPU is not
                on this node.
            SensorPermissionError: NVML or a selected GPU may not be opened by this process.
            SensorReadError: NVML failed in another way while opening.
        """
        _init()
        try:
            self.driver_version = _optional("driver version", _pynvml().nvmlSystemGetDriverVersion)
            found = _discover(power_margin)
            self._gpus = _select(found, select)
        except BaseException:
            _shutdown()
            raise
        self.problems = tuple(found.problems)
        self._closed = False
        for gpu in self._gpus:
            log.debug("reading %s by %s", gpu.label, gpu.device.method)

    def devices(self) -> Sequence[Device]:
        """The GPUs this sensor reads, in minor-number order."""
        return tuple(gpu.device for gpu in self._gpus)

    def read(self, mono_ns: int) -> list[Reading]:
        """Read every GPU once; one GPU's failure becomes its Reading's status.

        Args:
            mono_ns: the monotonic time of this read; power-polled GPUs integrate over it.
        """
        return [self._read_gpu(gpu, mono_ns) for gpu in self._gpus]

    def close(self) -> None:
        """Shut NVML down; closing twice does nothing."""
        if not self._closed:
            self._closed = True
            _shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_gpu(self, gpu: _Gpu, mono_ns: int) -> Reading:
        key = gpu.device.key
        try:
            energy_uj = self._energy_uj(gpu, mono_ns)
        except LlemError as e:
            lost = isinstance(e, _GpuLost) or (gpu.lost and _was_unknown(e))
            return self._failed(gpu, mono_ns, LOST if lost else ERROR, str(e))
        except Exception as e:  # a bug or a ctypes surprise must not stop the other GPUs
            log.exception("%s: unexpected failure", gpu.label)
            return self._failed(gpu, mono_ns, ERROR, f"{gpu.label}: {e!r}")
        if gpu.status != OK:
            log.warning("%s: readable again", gpu.label)
        gpu.status, gpu.lost = OK, False
        return Reading(key, energy_uj, mono_ns)

    def _energy_uj(self, gpu: _Gpu, mono_ns: int) -> int:
        nv = _pynvml()
        if gpu.integrator is None:
            energy_mj = _call(
                f"{gpu.label} energy", nv.nvmlDeviceGetTotalEnergyConsumption, gpu.handle
            )
            return int(energy_mj) * UJ_PER_MJ
        power_mw = _call(f"{gpu.label} power", nv.nvmlDeviceGetPowerUsage, gpu.handle)
        return gpu.integrator.add(int(power_mw), mono_ns)

    def _failed(self, gpu: _Gpu, mono_ns: int, status: str, message: str) -> Reading:
        if status != gpu.status:
            log.warning("%s", message)
        gpu.status = status
        if status == LOST:
            gpu.lost = True
            # What a lost GPU drew is unknown: restart the synthetic counter, a reset (a gap).
            if gpu.integrator is not None:
                gpu.integrator.restart()
        # A transient error keeps the last power sample: the next one bridges the interval.
        return Reading(gpu.device.key, None, mono_ns, status, message)


# --- llem doctor -------------------------------------------------------------------------------


def _describe(device: Device) -> str:
    attrs = device.attrs
    how = (
        "energy counter"
        if device.method == COUNTER
        else "no energy counter, power polled and integrated by llem"
    )
    product = attrs.get("product", "unknown product")
    return (
        f"{device.name}: {product}, {attrs['uuid']}, minor {attrs['minor']}, "
        f"NVML index {attrs['index']}: {how}"
    )


def probe(select: Iterable[str] | None = None) -> Probe:
    """What ``llem doctor`` shows for NVIDIA GPUs: which can be read, how, and if not, why.

    Opens the sensor, reads every GPU once and closes it. Never raises for a missing driver,
    a missing GPU or a failing read: those become ``problems``.

    Args:
        select: as for :class:`NvmlSensor`; None looks at every GPU.
    """
    try:
        sensor = NvmlSensor(select)
    except LlemError as e:
        return Probe(SENSOR, available=False, problems=(str(e),))
    with sensor:
        readings = sensor.read(time.monotonic_ns())
        devices = tuple(sensor.devices())
        driver = sensor.driver_version
        problems = list(sensor.problems)
    problems += [r.error or f"{r.device_key}: {r.status}" for r in readings if r.status != OK]
    notes = [f"NVIDIA driver {_text(driver)}"] if driver else []
    notes += [_describe(d) for d in devices]
    return Probe(
        SENSOR,
        available=any(r.status == OK for r in readings),
        devices=devices,
        problems=tuple(problems),
        notes=tuple(notes),
    )
