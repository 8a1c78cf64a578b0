"""Opening the node meters, and one source per physical device.

Called by :func:`llem.sensors.open_sensors`. The choices, each recorded as a note:

* pm_counters (a node meter and its parts from one controller) is opened first; when it
  measures the CPUs, RAPL is not read (the same packages twice).
* an hwmon meter (ACPI power meter, Grace Hopper modules) is read only when pm_counters gives
  no node meter: one meter per node.
* the BMC (IPMI DCMI, :mod:`llem.sensors.ipmi`) is read only when neither gives a meter: it
  is the slowest and coarsest of the three.
* GPUs: a vendor library (NVML) that sees GPUs is preferred to pm_counters' ``accelN``
  counters (per-GPU identity by UUID and minor number, finer resolution), which are then not
  read; without one, the accel counters measure the GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

from llem.errors import SensorPermissionError, SensorUnavailable


def open_meters(
    wanted: tuple[str, ...], explicit: bool, env: Mapping[str, str], out, ipmi_config=None
) -> set[str]:
    """Open pm_counters, hwmon and the BMC as asked; return the components they measure."""
    measured: set[str] = set()
    has_meter = False
    if "pm_counters" in wanted:
        from llem.sensors import pm_counters

        try:
            sensor = pm_counters.PmCountersSensor(pm_counters.root(env))
        except SensorUnavailable as e:
            if explicit:
                raise
            out.notes.append(f"pm_counters: {e}")
        else:
            out.sensors.append(sensor)
            measured |= {d.component for d in sensor.devices()}
            has_meter = any(d.component == "psys" for d in sensor.devices())
    if "hwmon" in wanted:
        from llem.sensors import hwmon

        if has_meter:
            out.notes.append(
                "hwmon: power meters not read: pm_counters is this node's meter "
                "(one meter per node)"
            )
        else:
            measured |= _open_hwmon(hwmon, explicit, env, out)
            has_meter = any(
                d.component == "psys" for s in out.sensors if s.name == "hwmon" for d in s.devices()
            )
    if "ipmi" in wanted and ipmi_config is not None:
        if has_meter:
            out.notes.append("ipmi: the BMC is not read: this node has a finer node meter")
            return measured
        from llem.sensors import ipmi

        try:
            sensor = ipmi.open_from_config(ipmi_config)
        except SensorUnavailable as e:
            if explicit:
                raise
            out.notes.append(f"ipmi: {e}")
        else:
            out.sensors.append(sensor)
            out.notes.extend(sensor.notes)
    return measured


def _open_hwmon(hwmon, explicit: bool, env: Mapping[str, str], out) -> set[str]:
    measured: set[str] = set()
    try:
        sensor = hwmon.HwmonSensor(hwmon.root(env))
    except (SensorUnavailable, SensorPermissionError) as e:
        if explicit:
            raise
        out.notes.append(f"hwmon: {e}")
    else:
        out.sensors.append(sensor)
        out.notes.extend(sensor.notes)
        measured |= {d.component for d in sensor.devices() if d.component != "psys"}
    return measured


def one_source_per_gpu(out) -> None:
    """Drop pm_counters' accel counters when a vendor library measures the GPUs."""
    vendor = [
        s
        for s in out.sensors
        if s.name in ("nvml", "amdsmi") and any(d.component == "gpu" for d in s.devices())
    ]
    if not vendor:
        return
    for sensor in out.sensors:
        if sensor.name == "pm_counters":
            sensor.drop(
                "gpu", f"the GPUs are measured by {vendor[0].name} (one source per physical device)"
            )
            out.notes.extend(sensor.notes)
