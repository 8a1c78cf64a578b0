"""The estimate model: synthetic energy counters where no hardware counter exists.

Used for the CPU packages and the DRAM of nodes without RAPL (or with RAPL hidden, as in
many VMs and containers). Every device it offers is marked ``source="estimated"`` and
``method="model"``. The model (docs/estimate-model.md gives the basis of every constant):

* CPU, per package: ``P_w = tdp_w * (idle_fraction + (1 - idle_fraction) * u)``, with ``u``
  the node-wide CPU utilisation (0..1) over the interval, from ``/proc/stat`` deltas.
* DRAM, one device: ``P_w = memory_w_per_gb * GiB in use``, with memory in use
  ``MemTotal - MemAvailable`` from ``/proc/meminfo``, averaged over the two ends of the
  interval.

The sensor integrates that power over the ``mono_ns`` the sampler passes to :meth:`read`
into an integer microjoule counter per device. The first read returns 0 and sets the
baseline; energy accrues from the second read on. The counter never wraps.

TDP of a package: ``estimate.cpu_tdp_w`` from the configuration when set, else the row of
``share/cpu_tdp.csv`` whose normalised model name matches ``/proc/cpuinfo``'s ``model name``,
scaled down when the package shows fewer cores than the part has (a VM), else a per-core
fallback (the median TDP per core of the table's rows, times the package's cores, capped at
the table's largest TDP), which the device says in ``attrs``.

The module imports only the standard library and reads ``/proc`` itself (no psutil), so the
sampler and ``llem doctor`` start fast.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llem.config import EstimateConfig
from llem.errors import SensorUnavailable
from llem.sensors.base import ERROR, ESTIMATED, MODEL, Device, Probe, Reading
from llem.units import NS_PER_S, UJ_PER_J

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

NAME = "estimate"
SUPPORTED_COMPONENTS = ("cpu", "dram")
BYTES_PER_GIB = 1024**3
TDP_TABLE_NAME = "cpu_tdp.csv"
UNKNOWN_MODEL = "unknown"
# The fallback's figures from the shipped table (median TDP/cores, largest TDP), for when the
# table cannot be read; tests check that they still agree with share/cpu_tdp.csv.
BUILTIN_W_PER_CORE = 8.33
BUILTIN_MAX_TDP_W = 500.0

# Words that name the vendor or the kind of part but not the part itself; dropping them lets
# "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz" and the table's "xeon gold 6248" meet.
_NOISE_WORDS = frozenset({"intel", "amd", "cpu", "processor"})
_TRADEMARK = re.compile(r"\((?:r|tm|c)\)|[®™]")
_FREQUENCY = re.compile(r"@.*$")
_GENERATION = re.compile(r"\b\d+(?:st|nd|rd|th)\s+gen\b")
_CORE_COUNT = re.compile(r"\b\d+-cores?\b")


@dataclass(frozen=True)
class TdpRow:
    """One row of the TDP table.

    Attributes:
        vendor: ``Intel`` or ``AMD``.
        model: the vendor's name of the part, e.g. ``Xeon Gold 6248``.
        match: the normalised model name this row matches (see :func:`normalise_model`).
        tdp_w: thermal design power of one package in watts, as published by the vendor.
        cores: physical cores per package.
        source: the vendor specification the figure comes from.
    """

    vendor: str
    model: str
    match: str
    tdp_w: float
    cores: int
    source: str


@dataclass(frozen=True)
class TdpChoice:
    """The TDP figure used for each CPU package and where it came from.

    Attributes:
        tdp_w: watts per package.
        source: ``config``, ``table: <source>`` or ``fallback: <basis>``.
        fallback: True when no configured or published figure was found.
    """

    tdp_w: float
    source: str
    fallback: bool = False


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about the CPU packages.

    Attributes:
        model_name: the first ``model name`` line, or ``unknown`` (arm64 has none).
        sockets: distinct ``physical id`` values, or 1 when there are none.
        cores_per_package: ``cpu cores`` of the first processor, or the number of logical
            CPUs divided by the sockets when that line is missing.
    """

    model_name: str
    sockets: int
    cores_per_package: int


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``, in clock ticks.

    Attributes:
        busy_ticks: user + nice + system + irq + softirq (guest time is already in user/nice).
        total_ticks: busy + idle + iowait + steal.
    """

    busy_ticks: int
    total_ticks: int


# --- TDP table -------------------------------------------------------------------------------


def normalise_model(model_name: str) -> str:
    """Reduce a CPU model name to the key the TDP table is matched on.

    Lower-cases, drops trademarks, the ``@ frequency`` suffix, "Nth Gen", "N-Core", and the
    words intel, amd, cpu and processor, and collapses white space.

    Examples:
        ``Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz`` -> ``xeon gold 6248``;
        ``AMD EPYC 7742 64-Core Processor`` -> ``epyc 7742``.

    Args:
        model_name: the ``model name`` field of ``/proc/cpuinfo`` (or a table ``match``).

    Returns:
        The normalised key; empty for an empty or noise-only name.
    """
    text = _TRADEMARK.sub(" ", model_name.lower())
    text = _FREQUENCY.sub(" ", text)
    text = _GENERATION.sub(" ", text)
    text = _CORE_COUNT.sub(" ", text)
    return " ".join(word for word in text.split() if word not in _NOISE_WORDS)


def default_tdp_table() -> Traversable:
    """Where the shipped table lives: ``llem.share/cpu_tdp.csv``."""
    from importlib.resources import files  # only when the shipped table is needed

    return files("llem.share") / TDP_TABLE_NAME


def load_tdp_table(path: str | os.PathLike | None = None) -> dict[str, TdpRow]:
    """Read the TDP table into a mapping of normalised model name to row.

    Args:
        path: a CSV with columns ``vendor,model,match,tdp_w,cores,source``; default the
            shipped ``share/cpu_tdp.csv``.

    Returns:
        Rows by their normalised ``match`` key. Rows with a blank key or a non-positive or
        unparsable ``tdp_w``/``cores`` are skipped with a warning; of two rows with the same
        key, the later one wins, with a warning.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not UTF-8 text.
        csv.Error: the file is not CSV.
    """
    source = default_tdp_table() if path is None else Path(path)
    with source.open(encoding="utf-8", newline="") as handle:
        return _parse_tdp_rows(csv.DictReader(handle), str(path or TDP_TABLE_NAME))


def _parse_tdp_rows(records: Iterable[dict[str, str]], where: str) -> dict[str, TdpRow]:
    table: dict[str, TdpRow] = {}
    for line, record in enumerate(records, start=2):
        try:
            row = TdpRow(
                vendor=record["vendor"].strip(),
                model=record["model"].strip(),
                match=normalise_model(record["match"]),
                tdp_w=float(record["tdp_w"]),
                cores=int(record["cores"]),
                source=record["source"].strip(),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("%s:%d: skipped a malformed TDP row: %s", where, line, e)
            continue
        if not row.match or row.tdp_w <= 0 or row.cores <= 0:
            log.warning(
                "%s:%d: skipped a TDP row with no key or a non-positive figure", where, line
            )
            continue
        if row.match in table:
            log.warning("%s:%d: a second row for %r replaces the first", where, line, row.match)
        table[row.match] = row
    return table


def cpu_model_tdp(
    model_name: str, tdp_table: str | os.PathLike | None = None
) -> tuple[float, str] | None:
    """Look a CPU model up in the TDP table.

    Args:
        model_name: as in ``/proc/cpuinfo``, e.g. ``AMD EPYC 7742 64-Core Processor``.
        tdp_table: a table path; default the shipped one.

    Returns:
        ``(tdp_w, source)`` for one package, or None when the model is not in the table.
    """
    row = load_tdp_table(tdp_table).get(normalise_model(model_name))
    return None if row is None else (row.tdp_w, row.source)


def fallback_w_per_core(table: dict[str, TdpRow]) -> float:
    """The fallback's watts per core: the median of ``tdp_w / cores`` over the table.

    Raises:
        ValueError: the table is empty.
    """
    if not table:
        raise ValueError("the TDP table has no rows: no basis for a per-core fallback")
    ratios = sorted(row.tdp_w / row.cores for row in table.values())
    middle = len(ratios) // 2
    if len(ratios) % 2:
        return ratios[middle]
    return (ratios[middle - 1] + ratios[middle]) / 2


def choose_tdp(cpu: CpuInfo, config: EstimateConfig, table: dict[str, TdpRow]) -> TdpChoice:
    """Pick the TDP of one package: the configuration, else the table, else the fallback.

    * ``config``: ``estimate.cpu_tdp_w``, used as it is.
    * ``table``: the published TDP of the part. When the package shows fewer cores than the
      part has (a VM, or cores disabled in firmware), the TDP is scaled by the share of cores
      visible, so that a 4-core VM on a 64-core host is not charged the whole package.
    * ``fallback``: ``median(tdp_w / cores) * cores_per_package``, capped at the table's
      largest TDP.
    """
    if config.cpu_tdp_w is not None:
        return TdpChoice(float(config.cpu_tdp_w), "config")
    row = table.get(normalise_model(cpu.model_name))
    if row is not None:
        if 0 < cpu.cores_per_package < row.cores:
            scaled_w = round(row.tdp_w * cpu.cores_per_package / row.cores, 2)
            note = f", scaled to the {cpu.cores_per_package} of {row.cores} cores visible"
            return TdpChoice(scaled_w, f"table: {row.source}{note}")
        return TdpChoice(row.tdp_w, f"table: {row.source}")
    if table:
        per_core_w = fallback_w_per_core(table)
        high_w = max(r.tdp_w for r in table.values())
        why = f"median TDP/cores of {len(table)} table rows"
    else:
        per_core_w, high_w = BUILTIN_W_PER_CORE, BUILTIN_MAX_TDP_W
        why = "built-in figure, the TDP table could not be read"
    tdp_w = min(per_core_w * cpu.cores_per_package, high_w)
    basis = f"{per_core_w:.2f} W/core ({why}) x {cpu.cores_per_package} cores, at most {high_w:g} W"
    return TdpChoice(round(tdp_w, 2), f"fallback: {basis}", fallback=True)


# --- /proc parsing ---------------------------------------------------------------------------


def _read_text(proc_root: Path, name: str) -> str:
    return (proc_root / name).read_text(encoding="ascii", errors="replace")


def parse_cpuinfo(text: str, logical_cpus: int | None = None) -> CpuInfo:
    """Model name, socket count and cores per package from ``/proc/cpuinfo`` text.

    Args:
        text: the file's content.
        logical_cpus: the number of logical CPUs, used when ``cpu cores`` is missing;
            default the number of ``processor`` entries.
    """
    model = ""
    physical_ids: set[str] = set()
    cores: int | None = None
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value
        elif key == "physical id":
            physical_ids.add(value)
        elif key == "cpu cores" and cores is None and value.isdigit():
            cores = int(value)
    sockets = max(len(physical_ids), 1)
    if not cores:
        logical = logical_cpus if logical_cpus else processors
        cores = max(logical // sockets, 1)
    return CpuInfo(model or UNKNOWN_MODEL, sockets, cores)


def parse_stat(text: str) -> CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``.

    Raises:
        ValueError: no ``cpu`` line, fewer than four fields, or a non-integer field.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(f) for f in fields[1:9]]
            if len(ticks) < 4 or min(ticks) < 0:
                raise ValueError(f"/proc/stat: malformed cpu line {line!r}")
            ticks += [0] * (8 - len(ticks))
            user, nice, system, idle, iowait, irq, softirq, steal = ticks
            busy = user + nice + system + irq + softirq
            return CpuTimes(busy, busy + idle + iowait + steal)
    raise ValueError("/proc/stat: no aggregate cpu line")


def count_logical_cpus(stat_text: str) -> int:
    """The number of ``cpuN`` lines of ``/proc/stat``."""
    return sum(1 for line in stat_text.splitlines() if re.match(r"cpu\d+\s", line))


def parse_meminfo(text: str) -> tuple[int, int]:
    """``(total_bytes, used_bytes)`` from ``/proc/meminfo``; used is MemTotal - MemAvailable.

    Raises:
        ValueError: MemTotal or MemAvailable is missing or not a number.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in ("MemTotal", "MemAvailable"):
            number = rest.split()
            if not number:
                raise ValueError(f"/proc/meminfo: {key} has no value")
            values[key] = int(number[0]) * 1024  # the kernel's "kB" is KiB
    if "MemTotal" not in values or "MemAvailable" not in values:
        raise ValueError("/proc/meminfo: MemTotal or MemAvailable missing")
    total = values["MemTotal"]
    return total, min(max(total - values["MemAvailable"], 0), total)


STALL_GRACE_NS = 500_000_000
"""Reads of /proc/stat closer than this that see no tick are not a stall."""


def utilisation(prev: CpuTimes, cur: CpuTimes) -> float:
    """Share of CPU time spent busy between two ``/proc/stat`` samples, in 0..1.

    Raises:
        ValueError: the counters did not advance or went backwards.
    """
    total = cur.total_ticks - prev.total_ticks
    busy = cur.busy_ticks - prev.busy_ticks
    if total <= 0 or busy < 0:
        raise ValueError("/proc/stat cpu counters did not advance (or went backwards)")
    return min(max(busy / total, 0.0), 1.0)


def cpu_power_w(tdp_w: float, idle_fraction: float, utilisation_0_1: float) -> float:
    """Model power of one package: ``tdp_w * (idle + (1 - idle) * u)``."""
    return tdp_w * (idle_fraction + (1.0 - idle_fraction) * utilisation_0_1)


def dram_power_w(memory_w_per_gb: float, used_bytes: float) -> float:
    """Model DRAM power: ``memory_w_per_gb * GiB in use``."""
    return memory_w_per_gb * used_bytes / BYTES_PER_GIB


# --- the sensor ------------------------------------------------------------------------------


class _Counter:
    """An integer microjoule counter fed with float energy; the sub-microjoule rest carries."""

    def __init__(self) -> None:
        self.energy_uj = 0
        self._rest_uj = 0.0

    def add(self, energy_uj: float) -> None:
        exact = energy_uj + self._rest_uj
        whole = round(exact)
        self._rest_uj = exact - whole
        self.energy_uj += whole


@functools.cache
def _warn_fallback(model: str, tdp_w: float, source: str) -> None:
    """Once per process and CPU model: a program that opens the sensor twice (``llem doctor``
    does) logs the same warning once."""
    log.warning(
        "estimate: CPU model %r is not in the TDP table; using %.1f W (%s)", model, tdp_w, source
    )


class EstimateSensor:
    """Model-based CPU package and DRAM energy counters (``source="estimated"``).

    Args:
        config: the ``estimate`` section of the configuration (TDP override, idle fraction,
            DRAM W/GB); default :class:`EstimateConfig` defaults.
        components: which of ``cpu`` and ``dram`` to estimate; the sampler asks only for
            those that have no RAPL counter.
        proc_root: the procfs to read (``stat``, ``meminfo``, ``cpuinfo``); tests pass a tree.
        tdp_table: a TDP table path; default the shipped ``share/cpu_tdp.csv``.

    Raises:
        ValueError: an unknown component, or none.
        SensorUnavailable: the ``/proc`` files the requested components need cannot be read
            or parsed when the sensor is opened.
    """

    name = NAME

    def __init__(
        self,
        config: EstimateConfig | None = None,
        *,
        components: Sequence[str] = SUPPORTED_COMPONENTS,
        proc_root: str | os.PathLike = "/proc",
        tdp_table: str | os.PathLike | None = None,
    ) -> None:
        unknown = [c for c in components if c not in SUPPORTED_COMPONENTS]
        if unknown or not components:
            raise ValueError(
                f"estimate sensor components must be among {SUPPORTED_COMPONENTS},"
                f" got {tuple(components)!r}"
            )
        self._config = config or EstimateConfig()
        self._proc = Path(proc_root)
        self._components = tuple(dict.fromkeys(components))
        self._devices: list[Device] = []
        self.cpu: CpuInfo | None = None
        self.tdp: TdpChoice | None = None
        self._cpu_keys: list[str] = []
        self._cpu_counters: dict[str, _Counter] = {}
        self._cpu_prev: tuple[int, CpuTimes] | None = None
        self._dram_key: str | None = None
        self._dram_counter = _Counter()
        self._dram_prev: tuple[int, int] | None = None
        if "cpu" in self._components:
            self._open_cpu(tdp_table)
        if "dram" in self._components:
            self._open_dram()

    # -- opening --

    def _open_cpu(self, tdp_table: str | os.PathLike | None) -> None:
        try:
            stat_text = _read_text(self._proc, "stat")
            parse_stat(stat_text)
        except (OSError, ValueError) as e:
            raise SensorUnavailable(f"estimate: cannot read {self._proc / 'stat'}: {e}") from e
        try:
            cpuinfo_text = _read_text(self._proc, "cpuinfo")
        except OSError as e:
            log.warning("estimate: cannot read %s (%s); assuming 1 package", e.filename, e)
            cpuinfo_text = ""
        self.cpu = parse_cpuinfo(cpuinfo_text, count_logical_cpus(stat_text))
        memory_total_bytes = self._memory_total_bytes()
        table = self._table(tdp_table)
        self.tdp = choose_tdp(self.cpu, self._config, table)
        if self.tdp.fallback:
            _warn_fallback(self.cpu.model_name, self.tdp.tdp_w, self.tdp.source)
        for socket in range(self.cpu.sockets):
            key = f"estimate:cpu-{socket}"
            self._cpu_keys.append(key)
            self._cpu_counters[key] = _Counter()
            self._devices.append(
                Device(
                    key=key,
                    component="cpu",
                    name=f"package-{socket}",
                    sensor=NAME,
                    source=ESTIMATED,
                    method=MODEL,
                    max_range_uj=None,
                    max_power_w=self.tdp.tdp_w or None,
                    attrs={
                        "socket": socket,
                        "model_name": self.cpu.model_name,
                        "tdp_w": self.tdp.tdp_w,
                        "tdp_source": self.tdp.source,
                        "tdp_fallback": self.tdp.fallback,
                        "sockets": self.cpu.sockets,
                        "cores_per_package": self.cpu.cores_per_package,
                        "idle_fraction": self._config.cpu_idle_fraction,
                        "memory_total_bytes": memory_total_bytes,
                    },
                )
            )

    def _memory_total_bytes(self) -> int | None:
        """MemTotal for the devices' identity; None when /proc/meminfo cannot say."""
        try:
            return parse_meminfo(_read_text(self._proc, "meminfo"))[0]
        except (OSError, ValueError):
            return None

    def _table(self, tdp_table: str | os.PathLike | None) -> dict[str, TdpRow]:
        if self._config.cpu_tdp_w is not None:
            return {}
        try:
            return load_tdp_table(tdp_table)
        except (OSError, ValueError, csv.Error) as e:
            log.warning("estimate: cannot read the TDP table (%s); using the fallback", e)
            return {}

    def _open_dram(self) -> None:
        try:
            total_bytes, _ = parse_meminfo(_read_text(self._proc, "meminfo"))
        except (OSError, ValueError) as e:
            raise SensorUnavailable(f"estimate: cannot read {self._proc / 'meminfo'}: {e}") from e
        self._dram_key = "estimate:dram"
        self._devices.append(
            Device(
                key=self._dram_key,
                component="dram",
                name="dram",
                sensor=NAME,
                source=ESTIMATED,
                method=MODEL,
                max_range_uj=None,
                max_power_w=dram_power_w(self._config.memory_w_per_gb, total_bytes) or None,
                attrs={
                    "memory_total_bytes": total_bytes,
                    "memory_w_per_gb": self._config.memory_w_per_gb,
                    "gb": "GiB (2**30 bytes)",
                },
            )
        )

    # -- the protocol --

    def devices(self) -> Sequence[Device]:
        """The CPU package devices (one per socket) and/or the DRAM device."""
        return tuple(self._devices)

    def read(self, mono_ns: int) -> list[Reading]:
        """Advance every synthetic counter to ``mono_ns`` and read it.

        Never raises for a ``/proc`` problem: the affected devices get ``status="error"``
        and keep their baseline, so the next good read accounts for the whole span.

        Args:
            mono_ns: the sampler's monotonic clock; energy accrues over its steps.
        """
        readings: list[Reading] = []
        if self._cpu_keys:
            readings += self._read_cpu(mono_ns)
        if self._dram_key is not None:
            readings.append(self._read_dram(mono_ns))
        return readings

    def close(self) -> None:
        """Nothing to release: every read opens and closes its files."""

    # -- reading --

    def _read_cpu(self, mono_ns: int) -> list[Reading]:
        try:
            times = parse_stat(_read_text(self._proc, "stat"))
        except (OSError, ValueError) as e:
            return self._errors(self._cpu_keys, mono_ns, f"reading /proc/stat: {e}")
        prev = self._cpu_prev
        if prev is None:
            self._cpu_prev = (mono_ns, times)
            return self._oks(mono_ns)
        prev_ns, prev_times = prev
        elapsed_ns = mono_ns - prev_ns
        if elapsed_ns < 0:
            return self._errors(self._cpu_keys, mono_ns, "the clock went backwards")
        if elapsed_ns == 0:
            return self._oks(mono_ns)  # no time, no energy; keep the baseline
        try:
            u = utilisation(prev_times, times)
        except ValueError as e:
            if elapsed_ns < STALL_GRACE_NS and times.total_ticks == prev_times.total_ticks:
                # /proc/stat moves in clock ticks (10 ms): reads closer than that (an extra
                # reading for a window or an Epilog) see no change. Keep the baseline; the next
                # read covers this span too.
                return self._oks(mono_ns)
            # No utilisation can be known for this span: restart the baseline here.
            self._cpu_prev = (mono_ns, times)
            log.warning("estimate: %s; %.1f s not estimated", e, elapsed_ns / NS_PER_S)
            return self._errors(self._cpu_keys, mono_ns, str(e))
        assert self.tdp is not None
        power_w = cpu_power_w(self.tdp.tdp_w, self._config.cpu_idle_fraction, u)
        energy_uj = power_w * elapsed_ns / (NS_PER_S / UJ_PER_J)
        for key in self._cpu_keys:
            self._cpu_counters[key].add(energy_uj)
        self._cpu_prev = (mono_ns, times)
        return self._oks(mono_ns)

    def _oks(self, mono_ns: int) -> list[Reading]:
        return [Reading(k, self._cpu_counters[k].energy_uj, mono_ns) for k in self._cpu_keys]

    def _read_dram(self, mono_ns: int) -> Reading:
        key = self._dram_key
        assert key is not None
        try:
            _, used_bytes = parse_meminfo(_read_text(self._proc, "meminfo"))
        except (OSError, ValueError) as e:
            return self._errors([key], mono_ns, f"reading /proc/meminfo: {e}")[0]
        prev = self._dram_prev
        if prev is not None:
            prev_ns, prev_used = prev
            elapsed_ns = mono_ns - prev_ns
            if elapsed_ns < 0:
                return self._errors([key], mono_ns, "the clock went backwards")[0]
            if elapsed_ns == 0:
                return Reading(key, self._dram_counter.energy_uj, mono_ns)
            mean_used = (prev_used + used_bytes) / 2  # trapezoid over the interval
            power_w = dram_power_w(self._config.memory_w_per_gb, mean_used)
            self._dram_counter.add(power_w * elapsed_ns / (NS_PER_S / UJ_PER_J))
        self._dram_prev = (mono_ns, used_bytes)
        return Reading(key, self._dram_counter.energy_uj, mono_ns)

    @staticmethod
    def _errors(keys: Sequence[str], mono_ns: int, why: str) -> list[Reading]:
        return [Reading(k, None, mono_ns, status=ERROR, error=why) for k in keys]


def probe(
    proc_root: str | os.PathLike = "/proc",
    config: EstimateConfig | None = None,
    tdp_table: str | os.PathLike | None = None,
) -> Probe:
    """What ``llem doctor`` shows for the estimate model.

    Available wherever ``/proc/stat`` (CPU) or ``/proc/meminfo`` (DRAM) can be read. The
    notes name the CPU model, the TDP figure and its source, and the DRAM figure.

    Args:
        proc_root: the procfs to read.
        config: the ``estimate`` section; default its defaults.
        tdp_table: a TDP table path; default the shipped one.
    """
    config = config or EstimateConfig()
    devices: list[Device] = []
    problems: list[str] = []
    notes: list[str] = []
    for component in SUPPORTED_COMPONENTS:
        try:
            sensor = EstimateSensor(
                config, components=(component,), proc_root=proc_root, tdp_table=tdp_table
            )
        except SensorUnavailable as e:
            problems.append(f"{e} (is /proc mounted?)")
            continue
        devices += sensor.devices()
        if sensor.cpu is not None and sensor.tdp is not None:
            notes.append(
                f"CPU model {sensor.cpu.model_name!r}, {sensor.cpu.sockets} package(s) of"
                f" {sensor.cpu.cores_per_package} cores; TDP {sensor.tdp.tdp_w:g} W per package"
                f" from {sensor.tdp.source}; idle fraction {config.cpu_idle_fraction:g}"
            )
            if sensor.tdp.fallback:
                notes.append(
                    "the CPU model is not in share/cpu_tdp.csv: set estimate.cpu_tdp_w to the"
                    " published TDP for a better estimate"
                )
        if component == "dram":
            notes.append(f"DRAM: {config.memory_w_per_gb:g} W per GiB in use (Green Algorithms)")
        sensor.close()
    notes.append("every figure of this sensor is estimated, not measured")
    return Probe(
        sensor=NAME,
        available=bool(devices),
        devices=tuple(devices),
        problems=tuple(problems),
        notes=tuple(notes),
    )
