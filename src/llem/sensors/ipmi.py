"""The node's power from its BMC over IPMI DCMI (``Get Power Reading``), a node meter.

Optional (``ipmi.enabled``, or ``ipmi`` named in ``sensors``) and read only where no other
node meter is (pm_counters, an ACPI power meter: :mod:`llem.sensors.meters`). The BMC is
asked through FreeIPMI's ``ipmi-dcmi --get-system-power-statistics`` or ``ipmitool dcmi power
reading``; in-band (the local BMC through ``/dev/ipmi0``) both need root, and ``ipmi.args``
points them at a LAN BMC instead.

BMCs are slow (tens of milliseconds to seconds a read) and some hang, so the sampler's tick
never waits for one: a thread of the sensor asks the BMC every ``ipmi.poll_s`` seconds and
keeps the latest answer; :meth:`IpmiSensor.read` only takes it. Each tick's interval is
charged at the latest power (``power_poll``, a synthetic counter like the hwmon meters'). A
failed read, a read killed after ``ipmi.timeout_s``, or an answer older than three polls
(plus the BMC's own answer time) ends the series: that tick is an error and the next good
one starts a new epoch, a recorded gap; power is never carried across a failure.

Only the instantaneous power is used (ipmitool's ``Instantaneous power reading``, FreeIPMI's
``Current Power``), never the BMC's minimum, maximum or average over its statistics period
(a long-run figure that would smear other jobs' power into this one's). A reading whose
state says the measurement is not active is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llem.errors import SensorReadError, SensorUnavailable
from llem.sensors.base import ERROR, MEASURED, OK, POWER_POLL, Device, Probe, Reading
from llem.units import NS_PER_S, UJ_PER_J

log = logging.getLogger(__name__)

TOOLS = ("ipmi-dcmi", "ipmitool")
# Root runs the tool: found on the system's folders only, never on an inherited PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
METER_MAX_POWER_W = 20_000.0
STALE_POLLS = 3
MAX_OUTPUT = 64 * 1024
DEVICE_KEY = "ipmi:bmc"

_IPMITOOL_W = re.compile(r"^\s*Instantaneous power reading:\s*(\d+)\s*Watts", re.M)
_IPMITOOL_STATE = re.compile(r"Power reading state is:\s*(\w+)")
_FREEIPMI_W = re.compile(r"^Current Power\s*:\s*(\d+)\s*Watts", re.M)
_FREEIPMI_STATE = re.compile(r"^Power Measurement\s*:\s*(.+?)\s*$", re.M)


def command(tool: str, path: str, args: Sequence[str]) -> list[str]:
    """The command line asking one power reading."""
    if tool == "ipmi-dcmi":
        return [path, *args, "--get-system-power-statistics"]
    return [path, *args, "dcmi", "power", "reading"]


def parse(tool: str, text: str) -> float:
    """The instantaneous power in watts from the tool's output.

    Raises:
        SensorReadError: no reading, or the BMC says its measurement is not active.
    """
    if tool == "ipmi-dcmi":
        watts, state, active = _FREEIPMI_W.search(text), _FREEIPMI_STATE.search(text), "Active"
    else:
        watts, state, active = _IPMITOOL_W.search(text), _IPMITOOL_STATE.search(text), "activated"
    if watts is None:
        first = " ".join(text.split())[:120]
        raise SensorReadError(f"{tool}: no power reading in its output ({first!r})")
    if state is not None and state.group(1) != active:
        raise SensorReadError(
            f"{tool}: the BMC's power measurement is not active ({state.group(1)!r})"
        )
    return float(watts.group(1))


def find_tool(tool: str) -> tuple[str, str]:
    """(name, absolute path) of the tool to run.

    Raises:
        SensorUnavailable: not installed.
    """
    names = TOOLS if tool == "auto" else (tool,)
    for name in names:
        path = shutil.which(name, path=SYSTEM_PATH)
        if path:
            return name, path
    raise SensorUnavailable(
        "neither FreeIPMI's ipmi-dcmi nor ipmitool is installed (apt-get install freeipmi-tools)"
        if tool == "auto"
        else f"{tool} is not installed in {SYSTEM_PATH}"
    )


def bmc_device(tool: str, poll_s: float, lan: bool) -> Device:
    """The BMC's meter: a whole-node ``psys`` device, its provenance in ``attrs``."""
    return Device(
        key=DEVICE_KEY,
        component="psys",
        name="bmc",
        sensor="ipmi",
        source=MEASURED,
        method=POWER_POLL,
        max_range_uj=None,
        max_power_w=METER_MAX_POWER_W,
        attrs={
            "meter": "node",
            "tool": tool,
            "reading": "DCMI Get Power Reading: instantaneous power",
            "poll_s": poll_s,
            "bmc": "lan" if lan else "in-band",
        },
    )


@dataclass
class _Sample:
    watts: float
    at: float  # the sensor's clock when the answer came
    took_s: float  # how long the BMC took


class IpmiSensor:
    """The BMC's power as one ``psys`` node-meter device, read by a thread.

    Args:
        tool: ``auto``, ``ipmi-dcmi`` or ``ipmitool``.
        args: words put before the tool's command (a LAN BMC's address and credentials).
        poll_s, timeout_s: the thread's pace and the longest a read may take.
        clock: the sensor's own clock for the answers' age (the sampler's may be a test's).
        start: start the thread (tests drive :meth:`poll_once` themselves when False).

    Raises:
        SensorUnavailable: no tool, or the first reading failed (the reason said).
    """

    name = "ipmi"

    def __init__(
        self,
        tool: str = "auto",
        args: Sequence[str] | str = (),
        *,
        poll_s: float = 1.0,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        self.tool, self.path = find_tool(tool)
        self.args = shlex.split(args) if isinstance(args, str) else list(args)
        self.poll_s, self.timeout_s, self.clock = poll_s, timeout_s, clock
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._sample: _Sample | None = None
        self._error: str | None = None
        self.reads = 0  # BMC reads done (tests, doctor)
        try:
            first = self._ask()
        except SensorReadError as e:
            raise SensorUnavailable(f"no DCMI power reading from the BMC: {e}") from None
        self._sample = first
        self._device = bmc_device(self.tool, poll_s, lan=bool(self.args))
        self.notes.append(
            f"ipmi: the BMC answered {first.watts:.0f} W in {first.took_s * 1e3:.0f} ms "
            f"through {self.tool}; read every {poll_s:g} s in a thread"
        )
        self._acc_uw_ns = 0
        self._last_ns: int | None = None
        self._epoch = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="llem-ipmi", daemon=True)
            self._thread.start()

    # -- the thread's side ---------------------------------------------------------------------

    def _ask(self) -> _Sample:
        """One reading from the BMC (blocks up to timeout_s)."""
        t0 = self.clock()
        try:
            proc = subprocess.Popen(
                command(self.tool, self.path, self.args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"PATH": SYSTEM_PATH, "LC_ALL": "C", **_passthrough()},
            )
        except OSError as e:
            raise SensorReadError(f"{self.tool}: cannot run: {e.strerror or e}") from None
        self._proc = proc
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SensorReadError(
                f"the BMC did not answer within {self.timeout_s:g} s ({self.tool} killed)"
            ) from None
        finally:
            self._proc = None
        self.reads += 1
        text = out[:MAX_OUTPUT].decode("utf-8", "replace")
        if proc.returncode != 0:
            said = " ".join(err[:MAX_OUTPUT].decode("utf-8", "replace").split())[:200]
            said = said or " ".join(text.split())[:200]
            raise SensorReadError(f"{self.tool} exited {proc.returncode}: {said}")
        return _Sample(parse(self.tool, text), self.clock(), self.clock() - t0)

    def poll_once(self) -> None:
        """Ask the BMC once and keep the answer or the failure."""
        try:
            sample = self._ask()
        except SensorReadError as e:
            with self._lock:
                self._sample, self._error = None, str(e)
            return
        with self._lock:
            self._sample, self._error = sample, None

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = self.clock()
            self.poll_once()
            if self._stop.wait(max(0.0, self.poll_s - (self.clock() - t0))):
                return

    # -- the tick's side -----------------------------------------------------------------------

    def devices(self) -> Sequence[Device]:
        return [self._device]

    def read(self, mono_ns: int) -> list[Reading]:
        """The latest answer, integrated over the tick; never waits for the BMC."""
        with self._lock:
            sample, error = self._sample, self._error
        why = error
        if sample is not None:
            age = self.clock() - sample.at
            if age > STALE_POLLS * self.poll_s + sample.took_s:
                why = f"no answer from the BMC for {age:.1f} s (a slow or hung BMC)"
        elif why is None:
            why = "no reading from the BMC yet"
        if why is not None:
            if self._last_ns is not None:
                self._epoch += 1  # the next good read starts a new series: a gap
            self._last_ns = None
            return [Reading(DEVICE_KEY, None, mono_ns, ERROR, why)]
        assert sample is not None
        if self._last_ns is not None and mono_ns > self._last_ns:
            self._acc_uw_ns += int(sample.watts * UJ_PER_J) * (mono_ns - self._last_ns)
        self._last_ns = mono_ns
        return [Reading(DEVICE_KEY, self._acc_uw_ns // NS_PER_S, mono_ns, OK, epoch=self._epoch)]

    def close(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None:
            try:
                proc.kill()  # a hung BMC read: the sampler does not wait for it
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def _passthrough() -> dict[str, str]:
    """ipmitool's -E reads the LAN password from IPMI_PASSWORD: kept, never logged."""
    value = os.environ.get("IPMI_PASSWORD")
    return {"IPMI_PASSWORD": value} if value else {}


def open_from_config(ipmi_config) -> IpmiSensor:
    """The sensor as ``ipmi.*`` configures it."""
    return IpmiSensor(
        ipmi_config.tool,
        ipmi_config.args,
        poll_s=ipmi_config.poll_s,
        timeout_s=ipmi_config.timeout_s,
    )


def probe(ipmi_config) -> Probe:
    """What the BMC can measure here, and exactly why not (asks it once when enabled)."""
    if not ipmi_config.enabled:
        return Probe(
            "ipmi",
            False,
            (),
            (
                "not enabled (ipmi.enabled: false): BMC power over IPMI DCMI is read only "
                "where asked, as it needs root and a BMC answers slowly",
            ),
        )
    if not ipmi_config.args and os.geteuid() != 0:
        hint = " (the local BMC's /dev/ipmi0 is root's; the node sampler runs as root)"
    else:
        hint = ""
    try:
        sensor = IpmiSensor(
            ipmi_config.tool,
            ipmi_config.args,
            poll_s=ipmi_config.poll_s,
            timeout_s=ipmi_config.timeout_s,
            start=False,
        )
    except SensorUnavailable as e:
        return Probe("ipmi", False, (), (str(e) + hint,))
    return Probe("ipmi", True, tuple(sensor.devices()), (), tuple(sensor.notes))
