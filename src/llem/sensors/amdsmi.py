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

Each GPU's source, chosen when the GPUs are opened (the fallback chain; each step that fails
is said in the sensor's notes, and the source kept is recorded with the device as
``attrs["energy_source"]``):

1. the energy counter, checked against the power the GPU reports over a short wait (like
   Zeus): a counter that goes backwards, does not move while the GPU draws power, reads 0
   without moving while no power is reported, or runs at a rate far from the reported power
   is rejected;
2. the socket power of ``amdsmi_get_power_info``, integrated by llem between reads (method
   ``power_poll``);
3. the amdgpu driver's hwmon power file (``power1_average`` or ``power1_input`` under
   ``LLEM_HWMON_ROOT``, found by the GPU's PCI BDF), integrated the same way.

A GPU with none of the three is not a device of its own, unless it is part of a package
below; the sensor says why.

Identity: PCI BDF and UUID; ``minor`` is the DRM render node minus 128 (``renderD128`` is
``minor`` 0), which is the order of Slurm's GRES index when gres.conf lists every GPU by its
render node (``AutoDetect=rsmi`` does).

Packages that report for several GPUs. An MI250X is one package with two dies (GCDs), seen as
two GPUs; only one die reports energy and power, for the whole package (the other's counter
reads 0 and its power "N/A"). An MI300X in a compute partition mode (DPX, QPX, CPX) is seen as
2 to 8 GPUs; only partition 0 reports, for the whole package (the others answer "not
supported"). The GPUs of one package share the board's product serial; within such a group,
when some members report and others do not, the split is:

    each member's energy = (the reporting members' energy) / (number of members)

an equal share, like static power shared by allocation: the firmware gives no per-die figure,
so a job on one die of a busy package pays half the package, never 0 J. Every member is then
one device whose counter is its share, with ``attrs["package_split"]`` saying the package,
its members, the share and which member reports; a job charged through such a device is
flagged ``gpu_package_split``. A group whose members all report is read member by member (no
split); a group where none reports is not measured. Within a package what amdsmi reports wins over
the hwmon files (a silent die or partition may have one reading 0 W, or the package again).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llem.errors import SensorUnavailable
from llem.sensors import hwmon
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


def _power_or_none(lib, handle) -> float | None:
    try:
        return _power_w(lib, handle)
    except Exception:
        return None


COUNTER_SOURCE, SOCKET_POWER, HWMON = "counter", "socket_power", "hwmon"


@dataclass
class _Source:
    """One way of reading one GPU's cumulative energy (microjoules)."""

    kind: str  # counter, socket_power or hwmon
    handle: object
    bdf: str
    path: Path | None = None  # the hwmon power file
    acc_uw_ns: int = 0
    last_ns: int | None = None
    epoch: int = 0

    def name(self) -> str:
        return f"hwmon:{self.path}" if self.kind == HWMON else self.kind

    def read(self, lib, mono_ns: int) -> int:
        if self.kind == COUNTER_SOURCE:
            return energy_uj(*_count(lib, self.handle))
        if self.kind == SOCKET_POWER:
            power = _power_w(lib, self.handle)
            if power is None:
                raise RuntimeError("no socket power reported")
            power_uw = int(power * UJ_PER_J)
        else:
            power_uw = hwmon.read_power_uw(self.path)  # type: ignore[arg-type]
        if self.last_ns is not None and mono_ns > self.last_ns:
            self.acc_uw_ns += power_uw * (mono_ns - self.last_ns)
        self.last_ns = mono_ns
        return self.acc_uw_ns // NS_PER_S

    def failed(self) -> None:
        if self.kind != COUNTER_SOURCE and self.last_ns is not None:
            self.epoch += 1  # power integration restarts: the next step is a gap
        self.last_ns = None


@dataclass
class _Gpu:
    device: Device
    sources: list[_Source]  # its own, or the reporting members of its package
    share: int = 1  # the package's members: the device's energy is the sources' / share


def check_counters(
    lib, handles: Sequence, sleep: Callable[[float], None], wait_s: float
) -> list[str | None]:
    """Why each GPU's energy counter cannot be trusted, or None (checked against power x
    time over one wait shared by all the GPUs)."""
    first: list[tuple[int, float] | str] = []
    for handle in handles:
        try:
            first.append(_count(lib, handle))
        except Exception as e:
            first.append(f"energy counter unreadable: {e}")
    t0 = time.monotonic()
    if any(not isinstance(f, str) for f in first):
        sleep(wait_s)
    elapsed = max(time.monotonic() - t0, 1e-3)
    out: list[str | None] = []
    for handle, got in zip(handles, first):
        if isinstance(got, str):
            out.append(got)
            continue
        try:
            acc1, _ = _count(lib, handle)
        except Exception as e:
            out.append(f"energy counter unreadable: {e}")
            continue
        out.append(_judge(got[0], acc1, got[1], _power_or_none(lib, handle), elapsed, wait_s))
    return out


def check_counter(lib, handle, sleep: Callable[[float], None], wait_s: float) -> str | None:
    """Why one GPU's energy counter cannot be trusted, or None."""
    return check_counters(lib, [handle], sleep, wait_s)[0]


def _judge(
    acc0: int, acc1: int, res: float, power: float | None, elapsed: float, wait_s: float
) -> str | None:
    if acc1 < acc0:
        return f"energy counter went backwards ({acc0} -> {acc1}) within {wait_s} s"
    if acc1 == acc0 and power is not None and power >= STUCK_POWER_W:
        return f"energy counter stuck at {acc0} while the GPU draws {power:.0f} W"
    if acc1 == acc0 == 0 and power is None:
        return "energy counter reads 0 and does not move, and no power is reported"
    if power is not None and power >= 50.0:
        rate_w = (energy_uj(acc1, res) - energy_uj(acc0, res)) / UJ_PER_J / elapsed
        if not power / 3 <= rate_w <= power * 3:
            return (
                f"energy counter rate {rate_w:.0f} W disagrees with the reported power "
                f"{power:.0f} W"
            )
    return None


def _choose(lib, handle, bdf: str, why: str | None, hwmon_files, notes: list[str]):
    """The GPU's source down the fallback chain, or None; each failed step noted."""
    if why is None:
        return _Source(COUNTER_SOURCE, handle, bdf)
    said = [why]
    try:
        power = _power_w(lib, handle)
    except Exception as e:
        power, problem = None, f"socket power unreadable: {e}"
    else:
        problem = "no socket power reported"
    if power is not None:
        notes.append(f"amdsmi {bdf}: {why}; measured by integrating its socket power instead")
        return _Source(SOCKET_POWER, handle, bdf)
    said.append(problem)
    path = hwmon_files.get(bdf.lower())
    if path is not None:
        try:
            hwmon.read_power_uw(path)
        except Exception as e:
            said.append(str(e))
        else:
            notes.append(
                f"amdsmi {bdf}: {'; '.join(said)}; measured by integrating the amdgpu "
                f"hwmon power {path} instead"
            )
            return _Source(HWMON, handle, bdf, path=path)
    else:
        said.append(f"no amdgpu hwmon power file for {bdf} under {hwmon.root()}")
    notes.append(f"amdsmi {bdf}: {'; '.join(said)}")
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
        if isinstance(info.get("drm_card"), int):
            attrs["drm_card"] = info["drm_card"]
    except Exception:
        log.debug("amdsmi: no enumeration info", exc_info=True)
    try:
        board = lib.amdsmi_get_gpu_board_info(handle)
        serial = str(board.get("product_serial") or "")
        if serial and serial != "N/A":
            attrs["serial"] = serial
        if board.get("product_name") not in (None, "", "N/A"):
            attrs["product"] = str(board["product_name"])
    except Exception:
        log.debug("amdsmi: no board info", exc_info=True)
    try:
        part = lib.amdsmi_get_gpu_kfd_info(handle).get("current_partition_id")
        if isinstance(part, int):
            attrs["partition"] = part
    except Exception:
        log.debug("amdsmi: no KFD info", exc_info=True)
    return attrs


def packages(ids: Sequence[dict]) -> dict[int, list[int]]:
    """GPU -> the GPUs of its package (two or more sharing a board serial: MI250X dies,
    MI300X partitions); GPUs alone in their package are not in it."""
    by_serial: dict[str, list[int]] = {}
    for i, a in enumerate(ids):
        if "serial" in a:
            by_serial.setdefault(str(a["serial"]), []).append(i)
    return {i: g for g in by_serial.values() if len(g) > 1 for i in g}


def _reporters(members: list[int], sources: dict) -> list[int]:
    """The members with a source. In a package, what amdsmi reports wins over the hwmon
    files: a silent die or partition may have one reading 0 W, or the package again."""
    found = [j for j in members if sources[j] is not None]
    by_amdsmi = [j for j in found if sources[j].kind != HWMON]
    return by_amdsmi if len(members) > 1 and by_amdsmi else found


class AmdSmiSensor:
    """Every AMD GPU amdsmi sees (or those selected), each as one device.

    Args:
        select: keep only these GPUs (UUIDs, BDFs or minor numbers as strings); the other
            members of their packages are still read when they report for them.
        sleep, check_wait_s: the start check's wait (injected in tests).
        hwmon_root: where the amdgpu hwmon files are (default ``LLEM_HWMON_ROOT``).

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
        hwmon_root: str | os.PathLike | None = None,
    ) -> None:
        self.lib = lib = load()
        self.notes: list[str] = []
        try:
            lib.amdsmi_init(lib.AmdSmiInitFlags.INIT_AMD_GPUS)
            handles = lib.amdsmi_get_processor_handles()
        except Exception as e:
            raise SensorUnavailable(f"amdsmi_init failed: {e}") from None
        wanted = None if select is None else {str(s) for s in select}
        try:
            self._gpus = self._open(lib, handles, wanted, sleep, check_wait_s, hwmon_root)
        except Exception as e:
            self.close()
            raise SensorUnavailable(f"amdsmi: cannot identify the GPUs: {e}") from None
        if not self._gpus:
            self.close()
            raise SensorUnavailable(
                ("amdsmi sees no AMD GPU" if not handles else "amdsmi: no GPU can be measured")
                if wanted is None
                else f"amdsmi: none of the GPUs {sorted(wanted)} found or measurable"
            )

    def _open(self, lib, handles, wanted, sleep, wait_s, hwmon_root) -> list[_Gpu]:
        ids = [_identity(lib, h) for h in handles]
        chosen = [
            i
            for i, a in enumerate(ids)
            if wanted is None or {str(a.get(k)) for k in ("uuid", "bdf", "minor")} & wanted
        ]
        package = packages(ids)
        needed = sorted({j for i in chosen for j in package.get(i, [i])})
        whys = check_counters(lib, [handles[i] for i in needed], sleep, wait_s)
        files = hwmon.amdgpu_power_files(Path(hwmon_root) if hwmon_root else hwmon.root())
        sources = {
            i: _choose(lib, handles[i], str(ids[i]["bdf"]), why, files, self.notes)
            for i, why in zip(needed, whys)
        }
        gpus = []
        for i in chosen:
            members = package.get(i, [i])
            gpu = self._gpu(ids, i, members, _reporters(members, sources), sources)
            if gpu is not None:
                gpus.append(gpu)
        return gpus

    def _gpu(self, ids, i: int, members: list[int], reporters: list[int], sources) -> _Gpu | None:
        """GPU ``i`` read by its own source, or as its share of its package's reporters."""
        attrs = dict(ids[i], counter_unit_uj=f"{EXACT_NUM}/{EXACT_DEN}")
        if not reporters:
            self.notes.append(
                f"amdsmi {ids[i]['bdf']}: not measured (neither it nor another GPU of "
                "its package reports energy or power)"
            )
            return None
        if i in reporters and len(reporters) == len(members):
            own = sources[i]
            attrs["energy_source"] = own.name()
            return _Gpu(self._device(attrs, own.kind == COUNTER_SOURCE), [own])
        via = [sources[j] for j in reporters]
        attrs["energy_source"] = ",".join(s.name() for s in via)
        attrs["package_split"] = {
            "package": ids[i]["serial"],
            "product": ids[i].get("product"),
            "members": [str(ids[j]["bdf"]) for j in members],
            "reporting": [str(ids[j]["bdf"]) for j in reporters],
            "share": f"1/{len(members)}",
        }
        self.notes.append(
            f"amdsmi {ids[i]['bdf']}: charged 1/{len(members)} of package "
            f"{ids[i]['serial']} ({ids[i].get('product') or 'AMD GPU'}), whose energy "
            f"only {', '.join(str(ids[j]['bdf']) for j in reporters)} reports"
        )
        counter = all(s.kind == COUNTER_SOURCE for s in via)
        return _Gpu(self._device(attrs, counter), via, len(members))

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

    def read(self, mono_ns: int) -> list[Reading]:
        out = []
        done: dict[int, tuple[int, int] | Exception] = {}  # each source read once a tick
        for gpu in self._gpus:
            total, epochs, error = 0, [], None
            for src in gpu.sources:
                got = done.get(id(src))
                if got is None:
                    try:
                        got = (src.read(self.lib, mono_ns), src.epoch)
                    except Exception as e:
                        src.failed()
                        got = e
                    done[id(src)] = got
                if isinstance(got, Exception):
                    error = got
                    break
                total += got[0]
                epochs.append(got[1])
            if error is not None:
                out.append(Reading(gpu.device.key, None, mono_ns, ERROR, f"amdsmi: {error}"))
                continue
            epoch = epochs[0] if len(epochs) == 1 else tuple(epochs)
            out.append(Reading(gpu.device.key, total // gpu.share, mono_ns, OK, epoch=epoch))
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
