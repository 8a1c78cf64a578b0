"""Sensors and their discovery.

``auto`` opens RAPL where a package counter can be read, NVML where a driver and GPUs exist,
and the estimate model for whatever CPU or DRAM has no counter, so that every component the
node has is either measured or estimated, never silently missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llem.config import Config
from llem.errors import ConfigError, SensorPermissionError, SensorUnavailable
from llem.sensors import meters
from llem.sensors.base import Probe, Sensor

log = logging.getLogger(__name__)

AUTO = ("pm_counters", "hwmon", "rapl", "nvml", "amdsmi", "estimate")


@dataclass
class OpenedSensors:
    sensors: list[Sensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for s in self.sensors:
            try:
                s.close()
            except Exception:
                log.exception("closing sensor %s", s.name)


def open_sensors(
    config: Config,
    *,
    env: Mapping[str, str] | None = None,
    proc_root: str | os.PathLike = "/proc",
    gpus: Iterable[str] | None = None,
) -> OpenedSensors:
    """Open the sensors the configuration asks for.

    Args:
        config: the configuration (``sensors``: ``auto`` or a list).
        env: environment for ``LLEM_POWERCAP_ROOT`` / ``LLEM_HWMON_ROOT`` (default os.environ).
        proc_root: the /proc tree for the estimate model.
        gpus: restrict NVML to these GPUs (UUIDs or minor numbers), e.g. a job's allocation.

    Raises:
        SensorUnavailable / SensorPermissionError: a sensor named explicitly cannot be opened.
    """
    from llem.sensors import rapl

    env = os.environ if env is None else env
    wanted = AUTO if config.sensors == "auto" else tuple(config.sensors)
    if config.sensors == "auto" and config.ipmi.enabled:
        wanted = ("ipmi", *wanted)
    explicit = config.sensors != "auto"
    out = OpenedSensors()
    measured_components: set[str] = set()

    # Node meters first: pm_counters' parts are read by one controller at the instant of its
    # node meter, so they are preferred to RAPL for the platform residual (llem.sensors.meters).
    meter_parts = meters.open_meters(wanted, explicit, env, out, config.ipmi)
    measured_components |= meter_parts
    if "rapl" in wanted and "cpu" in meter_parts:
        out.notes.append(
            "rapl: not read: pm_counters measures this node's CPUs and memory "
            "(one source per physical device)"
        )
        wanted = tuple(w for w in wanted if w != "rapl")

    if "rapl" in wanted:
        try:
            sensor = rapl.RaplSensor(rapl.powercap_root(env), rapl.hwmon_root(env))
            out.sensors.append(sensor)
            out.notes.extend(sensor.notes)
            measured_components |= {d.component for d in sensor.devices()}
        except (SensorUnavailable, SensorPermissionError) as e:
            if explicit:
                raise
            out.notes.append(f"rapl: {e}")

    if "nvml" in wanted:
        try:
            from llem.sensors import nvml

            out.sensors.append(nvml.NvmlSensor(select=gpus))
        except SensorUnavailable as e:
            if explicit:
                raise
            out.notes.append(f"nvml: {e}")
        except SensorPermissionError as e:
            if explicit:
                raise
            out.notes.append(f"nvml: {e}")

    if "amdsmi" in wanted:
        try:
            from llem.sensors import amdsmi

            sensor = amdsmi.AmdSmiSensor(select=gpus)
            out.sensors.append(sensor)
            out.notes.extend(sensor.notes)
        except SensorUnavailable as e:
            if explicit:
                raise
            out.notes.append(f"amdsmi: {e}")

    meters.one_source_per_gpu(out)

    if "estimate" in wanted:
        missing = tuple(c for c in ("cpu", "dram") if c not in measured_components)
        if missing:
            from llem.sensors import estimate

            try:
                out.sensors.append(
                    estimate.EstimateSensor(
                        config.estimate, components=missing, proc_root=proc_root
                    )
                )
                out.notes.append(
                    f"estimate: {', '.join(missing)} estimated by the model (no counter)"
                )
            except (SensorUnavailable, OSError) as e:
                if explicit:
                    raise ConfigError(f"estimate sensor: {e}") from e
                out.notes.append(f"estimate: {e}")
    return out


def probe_all(
    config: Config,
    env: Mapping[str, str] | None = None,
    proc_root: str | os.PathLike = "/proc",
) -> list[Probe]:
    """Every sensor's probe, for ``llem doctor``."""
    from llem.sensors import amdsmi, estimate, hwmon, ipmi, nvml, pm_counters, rapl

    env = os.environ if env is None else env
    return [
        rapl.probe(rapl.powercap_root(env), rapl.hwmon_root(env)),
        nvml.probe(),
        amdsmi.probe(),
        pm_counters.probe(pm_counters.root(env)),
        hwmon.probe(hwmon.root(env)),
        ipmi.probe(config.ipmi),
        estimate.probe(proc_root=Path(proc_root), config=config.estimate),
    ]
