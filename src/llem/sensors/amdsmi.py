"""AMD GPU energy through AMD's ``amdsmi`` Python package (``pip install 'llem[amd]'``).

The only module that imports ``amdsmi``. The package loads ``libamd_smi.so`` (from ROCm's
``amd-smi-lib``: ``$ROCM_PATH/lib``, the linker's path, ``/opt/rocm/lib``) when it is
imported; without the library it prints to stdout and fails with a ``KeyError``. The import
is therefore guarded: stdout captured, any exception turned into "not available" with the
reason, never a traceback or stray output in ``llem wrap --json``.

Energy: ``amdsmi_get_energy_count`` returns a cumulative accumulator and its resolution. The
library reports the resolution as 15.3 uJ, which is the rounded 2^-16 J = 15.2587890625 uJ;
llem keeps the raw accumulator and applies the exact unit (the rounded one over-counts by
0.27 %). Any other reported resolution is used as reported. The accumulator is 64 bits: a
step backwards is a reset (driver reload), a recorded gap.

When the GPUs are opened the counter is checked against the power the GPU reports over a
short wait (like Zeus): a counter that goes backwards, or does not move while the GPU draws
power, is rejected and the GPU is measured by integrating its socket power instead (method
``power_poll``, said with the device).

Identity: PCI BDF and UUID; ``minor`` is the DRM render node minus 128 (``renderD128`` is
``minor`` 0), which is the order of Slurm's GRES index when gres.conf lists every GPU by its
render node (``AutoDetect=rsmi`` does). Not done: MI250X (one of two dies reports power) and
MI300X partitions (only partition 0 reports): such GPUs are read as they report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from llem.errors import SensorUnavailable
from llem.sensors.base import COUNTER, ERROR, MEASURED, OK, POWER_POLL, Device, Probe, Reading
from llem.units import NS_PER_S, UJ_PER_J

log = logging.getLogger(__name__)

ROUNDED_RESOLUTION_UJ = 15.3
# 2^-16 J in microjoules = 1e6 / 65536 = 15625 / 1024.
EXACT_NUM, EXACT_DEN = 15625, 1024
GPU_MAX_POWER_W = 1500.0
CHECK_WAIT_S = 0.25
# Drawing at least this much, a counter that does not move is stuck.
STUCK_POWER_W = 5.0

INSTALL_HELP = (
    "install ROCm's amd-smi-lib (it provides libamd_smi.so) or set ROCM_PATH to the "
    "ROCm folder that holds lib/libamd_smi.so"
)


def load():
    """Import ``amdsmi`` quietly.

    Raises:
        SensorUnavailable: the package is missing, or it cannot load ``libamd_smi.so``.
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import amdsmi
    except ModuleNotFoundError as e:
        if e.name == "amdsmi":
            raise SensorUnavailable(
                "the amdsmi package is not installed (pip install 'llem[amd]')"
            ) from None
        raise SensorUnavailable(f"amdsmi cannot be imported: {e}") from None
    except Exception as e:  # the package fails with KeyError/OSError without its library
        said = " ".join(printed.getvalue().split())[:200]
        raise SensorUnavailable(
            f"amdsmi cannot load libamd_smi.so ({said or type(e).__name__ + ': ' + str(e)}); "
            + INSTALL_HELP
        ) from None
    return amdsmi


def energy_uj(accumulator: int, resolution_uj: float) -> int:
    """The accumulator in microjoules with the exact unit when the library says 15.3."""
    if abs(resolution_uj - ROUNDED_RESOLUTION_UJ) < 0.01:
        return accumulator * EXACT_NUM // EXACT_DEN
    return int(accumulator * resolution_uj)


def _count(lib, handle) -> tuple[int, float]:
    got = lib.amdsmi_get_energy_count(handle)
    # amdsmi 6.0 named the accumulator 'power'; later releases 'energy_accumulator'.
    acc = got.get("energy_accumulator", got.get("power"))
    return int(acc), float(got["counter_resolution"])


def _power_w(lib, handle) -> float | None:
    info = lib.amdsmi_get_power_info(handle)
    for key in ("current_socket_power", "average_socket_power", "socket_power"):
        value = info.get(key)
        if isinstance(value, (int, float)) and value != 0xFFFF:
            return float(value)
    return None


@dataclass
class _Gpu:
    handle: object
    device: Device
    counter: bool  # the energy counter passed the start check
    acc_uw_ns: int = 0
    last_ns: int | None = None
    epoch: int = 0


def check_counter(lib, handle, sleep: Callable[[float], None], wait_s: float) -> str | None:
    """Why the energy counter cannot be trusted, or None (checked against power x time)."""
    try:
        acc0, res = _count(lib, handle)
        t0 = time.monotonic()
        sleep(wait_s)
        acc1, _ = _count(lib, handle)
        elapsed = max(time.monotonic() - t0, 1e-3)
        power = _power_w(lib, handle)
    except Exception as e:
        return f"energy counter unreadable: {e}"
    if acc1 < acc0:
        return f"energy counter went backwards ({acc0} -> {acc1}) within {wait_s} s"
    if acc1 == acc0 and power is not None and power >= STUCK_POWER_W:
        return f"energy counter stuck at {acc0} while the GPU draws {power:.0f} W"
    if power is not None and power >= 50.0:
        rate_w = (energy_uj(acc1, res) - energy_uj(acc0, res)) / UJ_PER_J / elapsed
        if not power / 3 <= rate_w <= power * 3:
            return (
                f"energy counter rate {rate_w:.0f} W disagrees with the reported power "
                f"{power:.0f} W"
            )
    return None


def _identity(lib, handle) -> dict:
    attrs: dict[str, object] = {
        "bdf": lib.amdsmi_get_gpu_device_bdf(handle),
        "uuid": lib.amdsmi_get_gpu_device_uuid(handle),
    }
    try:
        info = lib.amdsmi_get_gpu_enumeration_info(handle)
        render = info.get("drm_render")
        if isinstance(render, int) and render >= 128:
            attrs["minor"] = render - 128
        elif isinstance(info.get("drm_card"), int):
            attrs["minor"] = info["drm_card"]
    except Exception:
        log.debug("amdsmi: no enumeration info", exc_info=True)
    return attrs


class AmdSmiSensor:
    """Every AMD GPU amdsmi sees (or those selected), each as one device.

    Args:
        select: keep only these GPUs (UUIDs, BDFs or minor numbers as strings).
        sleep, check_wait_s: the start check's wait (injected in tests).

    Raises:
        SensorUnavailable: no package, no library, no GPU, or amdsmi_init failed.
    """

    name = "amdsmi"

    def __init__(
        self,
        select: Iterable[str] | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        check_wait_s: float = CHECK_WAIT_S,
    ) -> None:
        self.lib = lib = load()
        self.notes: list[str] = []
        try:
            lib.amdsmi_init(lib.AmdSmiInitFlags.INIT_AMD_GPUS)
            handles = lib.amdsmi_get_processor_handles()
        except Exception as e:
            raise SensorUnavailable(f"amdsmi_init failed: {e}") from None
        wanted = None if select is None else {str(s) for s in select}
        self._gpus: list[_Gpu] = []
        try:
            for handle in handles:
                attrs = _identity(lib, handle)
                names = {str(attrs.get(k)) for k in ("uuid", "bdf", "minor")}
                if wanted is not None and not names & wanted:
                    continue
                why = check_counter(lib, handle, sleep, check_wait_s)
                if why is not None:
                    self.notes.append(
                        f"amdsmi {attrs['bdf']}: {why}; measured by integrating "
                        "its socket power instead"
                    )
                attrs["counter_unit_uj"] = f"{EXACT_NUM}/{EXACT_DEN}"
                self._gpus.append(_Gpu(handle, self._device(attrs, why is None), why is None))
        except Exception as e:
            self.close()
            raise SensorUnavailable(f"amdsmi: cannot identify the GPUs: {e}") from None
        if not self._gpus:
            self.close()
            raise SensorUnavailable(
                "amdsmi sees no AMD GPU"
                if wanted is None
                else f"amdsmi: none of the GPUs {sorted(wanted)} found"
            )

    def _device(self, attrs: dict, counter: bool) -> Device:
        minor = attrs.get("minor")
        return Device(
            key=f"amdsmi:{attrs['uuid']}",
            component="gpu",
            name=f"gpu{minor}" if minor is not None else str(attrs["bdf"]),
            sensor="amdsmi",
            source=MEASURED,
            method=COUNTER if counter else POWER_POLL,
            max_range_uj=None,
            max_power_w=GPU_MAX_POWER_W,
            attrs=attrs,
        )

    def devices(self) -> Sequence[Device]:
        return [g.device for g in self._gpus]

    def _read_one(self, gpu: _Gpu, mono_ns: int) -> Reading:
        key = gpu.device.key
        if gpu.counter:
            acc, res = _count(self.lib, gpu.handle)
            return Reading(key, energy_uj(acc, res), mono_ns, OK)
        power = _power_w(self.lib, gpu.handle)
        if power is None:
            raise RuntimeError("no socket power reported")
        if gpu.last_ns is not None and mono_ns > gpu.last_ns:
            gpu.acc_uw_ns += int(power * UJ_PER_J) * (mono_ns - gpu.last_ns)
        gpu.last_ns = mono_ns
        return Reading(key, gpu.acc_uw_ns // NS_PER_S, mono_ns, OK, epoch=gpu.epoch)

    def read(self, mono_ns: int) -> list[Reading]:
        out = []
        for gpu in self._gpus:
            try:
                out.append(self._read_one(gpu, mono_ns))
            except Exception as e:
                if not gpu.counter and gpu.last_ns is not None:
                    gpu.epoch += 1  # power integration restarts: the next step is a gap
                gpu.last_ns = None
                out.append(Reading(gpu.device.key, None, mono_ns, ERROR, f"amdsmi: {e}"))
        return out

    def close(self) -> None:
        try:
            self.lib.amdsmi_shut_down()
        except Exception:
            log.debug("amdsmi_shut_down failed", exc_info=True)


def probe() -> Probe:
    """What amdsmi can measure here, and exactly why not."""
    try:
        sensor = AmdSmiSensor(check_wait_s=0.05)
    except SensorUnavailable as e:
        return Probe("amdsmi", False, (), (str(e),))
    try:
        problems = [r.error or r.device_key for r in sensor.read(0) if r.status != OK]
        return Probe("amdsmi", True, tuple(sensor.devices()), tuple(problems), tuple(sensor.notes))
    finally:
        sensor.close()
