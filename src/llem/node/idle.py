"""Idle power of each device: configured, learned by the node sampler, or modelled.

The ``hybrid`` attribution policy (see :mod:`llem.node.attribution`) splits a device's
energy into a static part (its idle power x the interval) shared by allocation and a dynamic
rest shared by use. The idle power of a device comes from, in this order:

1. ``config``: ``attribution.idle_w``, keyed by device key (``rapl:package-0``) or by
   component (``cpu``, ``dram``);
2. ``learned``: a low quantile (:data:`QUANTILE`) of the device's power in intervals in which
   no job ran on the node, once :data:`MIN_SAMPLES` such intervals were seen; kept in the
   node store (``idle_power``) with its sample count, so that it survives restarts;
3. ``model``: the estimate model's idle fraction x TDP (a CPU package whose TDP is known:
   estimated packages carry it, measured ones their ``max_power_w``);
4. none: no static part (the device is shared by use alone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from llem.units import OK

QUANTILE = 0.1
"""The learned idle power is this quantile of idle-interval powers (low, not the minimum:
one odd reading must not set it)."""
MIN_SAMPLES = 20
"""Idle intervals needed before a learned figure is used."""
WINDOW = 512
"""Recent idle samples kept per device (bounded memory, follows slow drift)."""
SAVE_EVERY = 30
"""A learned figure is written to the node store every this many new samples."""


@dataclass(frozen=True)
class IdlePower:
    """The idle power in force for one device."""

    power_mw: int
    source: str
    """``config``, ``learned`` or ``model``."""
    samples: int = 0
    """Idle intervals behind a learned figure."""


def quantile(values: Sequence[int], q: float) -> int:
    """The lower ``q`` quantile of ``values`` (nearest rank, no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def configured_mw(idle_w: Mapping[str, float] | None, key: str, component: str) -> int | None:
    """The configured idle power of a device (by key, else by component), milliwatts."""
    if not idle_w:
        return None
    watts = idle_w.get(key, idle_w.get(component))
    return None if watts is None else int(round(float(watts) * 1000))


def model_mw(device, idle_fraction: float, tdp_w: float | None = None) -> int | None:
    """The estimate model's idle power of a CPU package: idle fraction x TDP.

    Estimated packages carry their TDP; for a measured one ``tdp_w`` is the model's TDP of
    this CPU (:func:`package_tdp_w`). ``max_power_w`` is a plausibility bound, not a TDP.
    """
    if device.component != "cpu":
        return None
    attrs = device.attrs or {}
    tdp_w = attrs.get("tdp_w") or tdp_w
    fraction = attrs.get("idle_fraction", idle_fraction)
    if not tdp_w:
        return None
    return int(round(float(tdp_w) * float(fraction) * 1000))


def package_tdp_w(estimate_config, proc_root="/proc") -> float | None:
    """The estimate model's TDP of one package of this node (config, table or fallback)."""
    from pathlib import Path

    from llem.sensors import estimate

    try:
        proc = Path(proc_root)
        stat_text = (proc / "stat").read_text()
        try:
            cpuinfo = (proc / "cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
        cpu = estimate.parse_cpuinfo(cpuinfo, estimate.count_logical_cpus(stat_text))
        try:
            table = estimate.load_tdp_table()
        except Exception:  # noqa: BLE001 - the fallback figure needs no table
            table = {}
        return estimate.choose_tdp(cpu, estimate_config, table).tdp_w or None
    except (OSError, ValueError):
        return None


class IdleLearner:
    """Learns, keeps and resolves the idle power of the node's CPU and DRAM devices.

    Args:
        devices: the node's devices.
        store: the node store (``idle_powers()`` / ``save_idle_power()``), or None.
        idle_w: ``attribution.idle_w`` (per device key or component), or None.
        idle_fraction: ``estimate.cpu_idle_fraction``, for the model fallback.
        tdp_w: the model's TDP of a package, for measured packages (:func:`package_tdp_w`).
    """

    def __init__(
        self,
        devices: Iterable,
        store=None,
        idle_w: Mapping[str, float] | None = None,
        idle_fraction: float = 0.3,
        tdp_w: float | None = None,
    ) -> None:
        self.devices = {d.key: d for d in devices if d.component in ("cpu", "dram")}
        self.tdp_w = tdp_w
        self.store = store
        self.idle_w = dict(idle_w or {})
        self.idle_fraction = idle_fraction
        self._saved: dict[str, tuple[int, int]] = {}
        if store is not None:
            self._saved = {k: v for k, v in store.idle_powers().items() if k in self.devices}
        self._recent: dict[str, list[int]] = {k: [] for k in self.devices}
        self._new: dict[str, int] = {k: 0 for k in self.devices}

    def observe(self, rows, interval_ns: int, ts_ns: int, jobs_running: bool) -> None:
        """Take one interval's readings; only intervals in which no job ran teach."""
        if jobs_running or interval_ns <= 0:
            return
        for row in rows:
            if row.device_key not in self.devices or row.kind != OK or row.status != "ok":
                continue
            recent = self._recent[row.device_key]
            recent.append(row.energy_uj * 1_000_000 // interval_ns)  # uJ/ns -> mW
            if len(recent) > WINDOW:
                del recent[0]
            self._new[row.device_key] += 1
            if self._new[row.device_key] % SAVE_EVERY == 0:
                self._save(row.device_key, ts_ns)

    def _learned(self, key: str) -> tuple[int, int] | None:
        saved_mw, saved_n = self._saved.get(key, (0, 0))
        recent = self._recent.get(key) or []
        total = saved_n + self._new.get(key, 0)
        if len(recent) >= MIN_SAMPLES:
            return quantile(recent, QUANTILE), total
        if saved_n >= MIN_SAMPLES:
            return saved_mw, total
        return None

    def _save(self, key: str, ts_ns: int) -> None:
        learned = self._learned(key)
        if learned is None or self.store is None:
            return
        try:
            self.store.save_idle_power(key, learned[0], learned[1], ts_ns)
        except Exception:  # noqa: BLE001 - learning must never stop the sampler
            return
        self._saved[key] = learned
        self._new[key] = 0
        self._recent[key] = self._recent[key][-WINDOW:]

    def resolve(self) -> dict[str, IdlePower]:
        """The idle power in force for each CPU and DRAM device that has one."""
        out = {}
        for key, device in self.devices.items():
            mw = configured_mw(self.idle_w, key, device.component)
            if mw is not None:
                out[key] = IdlePower(mw, "config")
                continue
            learned = self._learned(key)
            if learned is not None:
                out[key] = IdlePower(learned[0], "learned", learned[1])
                continue
            mw = model_mw(device, self.idle_fraction, self.tdp_w)
            if mw is not None:
                out[key] = IdlePower(mw, "model")
        return out
