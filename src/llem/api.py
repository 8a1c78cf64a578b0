"""The Python API: ``llem.window``, ``llem.measured``, ``llem.begin_window``/``end_window``.

A window measures the energy used while a block of code runs, with the work it did::

    with llem.window("train", unit="tokens") as w:
        for batch in loader:
            ...
            w.add(batch.numel())
    print(w.result.energy_per_unit_j)

Inside a Slurm job (``SLURM_JOB_ID`` set) a window is opened and closed by the node's llem
sampler over its socket, exactly as ``srun llem wrap --name`` does (same socket, same checks
by the sampler): its energy is the job's attributed share and it reaches the ledger with the
job, work included. Outside Slurm (or when no sampler answers, said in ``notes``) the process
reads the same sensors as ``llem wrap`` from one background thread, shared by all its
windows; the figures are the whole node's, and each closed window is appended to the local
history (``llem history``, :mod:`llem.history`).

Nothing is imported or started until a window opens (``import llem`` stays cheap). Windows
nest, overlap and may be used from several threads; a forked child (``multiprocessing``,
``torchrun`` ranks) measures its own windows. The sampler thread stops when the last window
closes, and at interpreter exit; a window left open at exit is closed and recorded, and one
whose block raised is closed with a note.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from llem.errors import LlemError

__all__ = [
    "Measurement",
    "Window",
    "WindowStateError",
    "begin_window",
    "end_window",
    "measured",
    "window",
]

MAX_NAME_CHARS = 128  # node.windows.MAX_NAME_CHARS: the same rule in and outside a job
READ_WAIT_S = 5.0
"""How long a window waits for the reading that opens or closes it (outside Slurm)."""


class WindowStateError(LlemError):
    """A window used out of order: stopped twice, ``end_window`` of a window not begun."""


# -- the result ---------------------------------------------------------------------------------


class Measurement:
    """The result of a closed window: the ``llem wrap --json`` object, as attributes.

    Attributes (as in docs/user-guide.md, "llem wrap --json"): ``name``, ``start``, ``end``,
    ``duration_s``, ``energy_j``, ``components`` (one dict per device: ``component``,
    ``device``, ``energy_j``, ``source``, ``sensor``, ``method``, ``coverage``), ``source``,
    ``coverage``, ``scope`` (``node``: the whole machine; ``job``: the job's share),
    ``work``, ``unit``, ``energy_per_unit_j``, ``gpu_energy_per_unit_j``, ``co2e_g``,
    ``co2e_per_unit_g``, ``per_unit_basis``, ``carbon`` (intensity, its source, year,
    basis, region, PUE), ``notes``.

    The shape of Zeus's ``Measurement`` too: ``time`` (s), ``gpu_energy``, ``cpu_energy`` and
    ``dram_energy`` (joules by device index) and ``total_energy``.
    """

    def __init__(self, data: dict) -> None:
        self._data = data

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        """The same keys as ``llem wrap --json`` (a copy)."""
        import copy

        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        d = self._data
        work = f", work={d['work']:g} {d['unit']}" if d.get("work") is not None else ""
        return (
            f"Measurement(name={d['name']!r}, duration_s={d['duration_s']:.3f}, "
            f"energy_j={d['energy_j']:.3f}, source={d['source']!r}, scope={d['scope']!r}{work})"
        )

    # -- Zeus's shape ----------------------------------------------------------------------

    @property
    def time(self) -> float:
        return self._data["duration_s"]

    @property
    def total_energy(self) -> float:
        return self._data["energy_j"]

    def _by_index(self, component: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for i, c in enumerate(c for c in self._data["components"] if c["component"] == component):
            m = re.search(r"(\d+)$", c["device"] or "")
            index = int(m.group(1)) if m else i
            out[index] = out.get(index, 0.0) + c["energy_j"]
        return out

    @property
    def gpu_energy(self) -> dict[int, float]:
        return self._by_index("gpu")

    @property
    def cpu_energy(self) -> dict[int, float] | None:
        return self._by_index("cpu") or None

    @property
    def dram_energy(self) -> dict[int, float] | None:
        return self._by_index("dram") or None


# -- the in-process meter (outside Slurm) -------------------------------------------------------


class _Snapshot:
    __slots__ = ("devices", "by_hour", "mono_ns", "events", "wall_ns")

    def __init__(self, devices, by_hour, mono_ns, events, wall_ns) -> None:
        self.devices, self.by_hour, self.mono_ns = devices, by_hour, mono_ns
        self.events, self.wall_ns = events, wall_ns


class _Meter:
    """One sampler thread per process, shared by its windows, with cumulative totals."""

    def __init__(self) -> None:
        from llem import config as config_mod
        from llem.sensors import open_sensors

        self.config = config_mod.load()
        self.opened = open_sensors(self.config)
        self.notes = list(self.opened.notes)
        self.interval_s = min(1.0, self.config.sampler.interval_s)
        self.cond = threading.Condition()
        self.lifecycle = threading.Lock()
        """Held while a window opens or closes: a sampler never starts while the previous
        one is still taking its final reading into the same totals."""
        self.users = 0
        self.sampler = None
        self.thread: threading.Thread | None = None
        self.devices: dict = {}  # key -> Device
        self.totals: dict[str, list[int]] = {}  # key -> [energy_uj, covered_ns, gaps]
        self.by_hour: dict[int, int] = {}
        self.mono_ns = 0
        self.events: list = []
        self.wall_ns = 0
        self.last_mono_end = 0

    # -- the sink --------------------------------------------------------------------------

    def register_devices(self, devices, ts_ns: int) -> None:
        with self.cond:
            for d in devices:
                self.devices.setdefault(d.key, d)
                self.totals.setdefault(d.key, [0, 0, 0])
            self.wall_ns = ts_ns

    def write(self, interval) -> None:
        from llem.units import OK, WRAP, split_by_hour

        with self.cond:
            length = interval.mono_end_ns - interval.mono_start_ns
            self.mono_ns += length
            self.wall_ns = interval.end_ns
            self.events.extend(interval.events)
            for row in interval.rows:
                total = self.totals.setdefault(row.device_key, [0, 0, 0])
                if row.status == OK and row.kind in (OK, WRAP):
                    total[0] += row.energy_uj
                    total[1] += length
                    if self.devices[row.device_key].component != "psys":
                        for hour, uj in split_by_hour(
                            interval.start_ns, interval.end_ns, row.energy_uj
                        ).items():
                            self.by_hour[hour] = self.by_hour.get(hour, 0) + uj
                else:
                    total[2] += 1
            self.last_mono_end = interval.mono_end_ns
            self.cond.notify_all()

    # -- windows ---------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            {k: tuple(v) for k, v in self.totals.items()},
            dict(self.by_hour),
            self.mono_ns,
            len(self.events),
            self.wall_ns,
        )

    def acquire(self) -> _Snapshot:
        """A window opens: start the thread (its baseline reading) or take a reading now."""
        from llem.sampler import Sampler

        with self.lifecycle, self.cond:
            if self.users == 0:
                self.sampler = Sampler(self.opened.sensors, [self], interval_s=self.interval_s)
                self.sampler.start()
                self.thread = threading.Thread(
                    target=self._run, args=(self.sampler,), name="llem-window-sampler", daemon=True
                )
                self.thread.start()
                self.users = 1
                return self._snapshot()
            self.users += 1
            return self._read_now()

    def release(self) -> _Snapshot:
        """A window closes: take a reading now; the last one stops the thread."""
        with self.lifecycle:
            with self.cond:
                self.users -= 1
                if self.users > 0:
                    return self._read_now()
                sampler, thread = self.sampler, self.thread
                self.sampler = self.thread = None
            sampler.stop()  # its final reading closes the window
            thread.join(timeout=READ_WAIT_S * 2)
            with self.cond:
                return self._snapshot()

    def _read_now(self) -> _Snapshot:
        """Wake the sampler and wait (holding the condition) for a reading taken after now."""
        asked = time.monotonic_ns()
        self.sampler.wake.set()
        deadline = time.monotonic() + READ_WAIT_S
        while self.last_mono_end < asked and time.monotonic() < deadline:
            self.cond.wait(0.05)
        return self._snapshot()

    @staticmethod
    def _run(sampler) -> None:
        try:
            sampler.run()
        except Exception:  # noqa: BLE001 - a broken sensor must not kill the program
            import logging

            logging.getLogger(__name__).exception("llem: the window sampler failed")

    def close(self) -> None:
        with self.cond:
            sampler, thread = self.sampler, self.thread
            self.sampler = self.thread = None
            self.users = 0
        if sampler is not None:
            sampler.stop()
            if thread is not None:
                thread.join(timeout=READ_WAIT_S * 2)
        self.opened.close()

    def accumulator(self, a: _Snapshot, b: _Snapshot):
        from llem.wrap import Accumulator, DeviceTotal

        acc = Accumulator()
        for key, end in b.devices.items():
            start = a.devices.get(key, (0, 0, 0))
            acc.devices[key] = DeviceTotal(
                self.devices[key], end[0] - start[0], end[1] - start[1], end[2] - start[2]
            )
        for hour, uj in b.by_hour.items():
            part = uj - a.by_hour.get(hour, 0)
            if part:
                acc.by_hour_uj[hour] = part
        acc.mono_ns = b.mono_ns - a.mono_ns
        acc.start_ns, acc.end_ns = a.wall_ns, b.wall_ns
        with self.cond:
            acc.events = list(self.events[a.events : b.events])
        return acc


_meter: _Meter | None = None
_meter_lock = threading.Lock()
_open: weakref.WeakSet = weakref.WeakSet()
_named: dict[str, Window] = {}
_named_lock = threading.Lock()


def _get_meter() -> _Meter:
    global _meter
    with _meter_lock:
        if _meter is None:
            _meter = _Meter()
        return _meter


def _at_exit() -> None:
    """Close the windows left open (their results recorded), then stop the sampler."""
    for w in list(_open):
        try:
            w.stop(note="closed at interpreter exit")
        except Exception:  # noqa: BLE001, S110 - exit goes on whatever happens
            pass
    if _meter is not None:
        _meter.close()


def _after_fork_in_child() -> None:
    """A forked child has no sampler thread and none of its parent's windows: it measures
    its own, with a fresh meter."""
    global _meter, _meter_lock, _named_lock
    _meter = None
    _meter_lock = threading.Lock()
    _named_lock = threading.Lock()
    _named.clear()
    for w in list(_open):
        w._forked = True
    _open.clear()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the window ---------------------------------------------------------------------------------


def _rank() -> int | None:
    """This process's rank among its job's or launcher's processes, when it has one."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


class Window:
    """A measurement window; see :func:`window`.

    Thread-safe: :meth:`add` may be called from any thread. :meth:`start` and :meth:`stop`
    once each (a window is not reused).
    """

    def __init__(
        self,
        name: str = "window",
        unit: str | None = None,
        *,
        work: float | None = None,
        record: bool = True,
    ) -> None:
        name = name or "window"
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"window names are strings of at most {MAX_NAME_CHARS} characters")
        if unit is not None:
            from llem.node.windows import check_work

            check_work(None, unit)  # ValueError: the same rule in and outside a job
        self.name = name
        self.unit = unit
        self.record = record
        self._work = None if work is None else self._checked(work)
        self._lock = threading.Lock()
        self._state = "new"
        self._forked = False
        self.result: Measurement | None = None
        """The measurement, once the window is closed."""
        self._job: tuple | None = None
        self._snapshot: _Snapshot | None = None
        self._notes: list[str] = []
        self._t0 = 0.0
        self._pid = os.getpid()

    @staticmethod
    def _checked(n: float) -> float:
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            raise ValueError(f"work must be a finite count >= 0, got {n!r}")
        return float(n)

    def add(self, n: float = 1) -> None:
        """Count ``n`` more units of work (tokens, samples...) done in this window."""
        n = self._checked(n)
        with self._lock:
            self._work = (self._work or 0.0) + n

    @property
    def work(self) -> float | None:
        return self._work

    # -- open and close --------------------------------------------------------------------

    def start(self) -> Window:
        with self._lock:
            if self._state != "new":
                raise WindowStateError(f"window {self.name!r} was already started")
            self._state = "open"
        self._t0 = time.monotonic()
        try:
            if os.environ.get("SLURM_JOB_ID"):
                self._job = self._open_in_job()
            if self._job is None:
                self._snapshot = _get_meter().acquire()
        except BaseException:
            with self._lock:
                self._state = "new"  # nothing was opened: the window may be started again
            raise
        _open.add(self)
        return self

    def _open_in_job(self) -> tuple | None:
        from llem import config as config_mod
        from llem.node.windows import WindowError, open_window, socket_path

        self._config = config_mod.load()
        path = socket_path(self._config.run_dir, os.environ)
        try:
            if path is None:
                raise WindowError("SLURMD_NODENAME is not set")
            return path, open_window(path, os.environ, self.name)
        except WindowError as e:
            self._notes.append(
                f"inside Slurm job {os.environ['SLURM_JOB_ID']}: {e}; measured standalone "
                "instead (the whole node, not the job's share)"
            )
            return None

    def stop(self, *, note: str | None = None) -> Measurement:
        """Close the window and return its measurement (also in :attr:`result`)."""
        with self._lock:
            if self._state != "open":
                raise WindowStateError(f"window {self.name!r} is not open")
            if self._forked or self._pid != os.getpid():
                self._state = "closed"
                raise WindowStateError(
                    f"window {self.name!r} was opened in another process (before a fork)"
                )
            self._state = "closed"
            work = self._work
        _open.discard(self)
        duration_s = time.monotonic() - self._t0
        if note:
            self._notes.append(note)
        unit = self.unit
        if work is not None and unit is None:
            unit = "units"
        if self._job is not None:
            res = self._close_in_job(duration_s, work, unit)
        else:
            res = self._close_local(duration_s, work, unit)
        self.result = Measurement(res)
        if self._job is None and self.record:
            from llem.history import append

            try:
                append(res)
            except OSError as e:
                res["notes"].append(f"not recorded in the history: {e.strerror or e}")
        return self.result

    def _close_in_job(self, duration_s: float, work: float | None, unit: str | None) -> dict:
        from llem.node.windows import WindowError, close_window
        from llem.wrap import accumulator_of_window, add_work, carbon_for, result

        path, opened = self._job  # type: ignore[misc]
        notes = [
            f"window {opened['window_id']} of Slurm job {os.environ.get('SLURM_JOB_ID')} on "
            f"node {os.environ.get('SLURMD_NODENAME')}: the job's attributed share",
            *self._notes,
        ]
        try:
            closed = close_window(path, os.environ, opened["window_id"], work, unit)
        except WindowError as e:
            notes.append(f"{e}: the window's energy is unknown")
            closed = {"start_ns": opened["start_ns"], "end_ns": opened["start_ns"], "coverage": 0}
        acc = accumulator_of_window(closed)
        carbon, co2e_g, carbon_notes = carbon_for(self._config, acc, duration_s)
        res = result(
            acc,
            name=self.name,
            command=list(sys.argv),
            exit_code=None,
            duration_s=duration_s,
            carbon=carbon,
            co2e_g=co2e_g,
            notes=notes + carbon_notes,
        )
        res["scope"] = "job"
        res["coverage"] = closed.get("coverage")
        res["window_id"] = opened["window_id"]
        return add_work(res, work, unit, closed.get("policy"))

    def _close_local(self, duration_s: float, work: float | None, unit: str | None) -> dict:
        from llem.wrap import add_work, carbon_for, result

        meter = _get_meter()
        end = meter.release()
        acc = meter.accumulator(self._snapshot, end)  # type: ignore[arg-type]
        if acc.mono_ns > 0:  # the span between the readings that opened and closed it
            duration_s = acc.mono_ns / 1e9
        carbon, co2e_g, carbon_notes = carbon_for(meter.config, acc, duration_s)
        res = result(
            acc,
            name=self.name,
            command=list(sys.argv),
            exit_code=None,
            duration_s=duration_s,
            carbon=carbon,
            co2e_g=co2e_g,
            notes=meter.notes + self._notes + carbon_notes,
        )
        res["pid"] = os.getpid()
        res["rank"] = _rank()
        return add_work(res, work, unit)

    def __enter__(self) -> Window:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        note = None
        if exc_type is not None:
            note = f"the block raised {exc_type.__name__}: the window closed there"
        if self._state != "open":
            return False
        if exc_type is None:
            self.stop()
            return False
        try:  # the block's own exception goes on, whatever closing the window meets
            self.stop(note=note)
        except Exception as e:  # noqa: BLE001
            import logging

            logging.getLogger(__name__).warning("llem: window %r not measured: %s", self.name, e)
        return False


def window(name: str = "window", unit: str | None = None, *, work: float | None = None) -> Window:
    """A window measuring the energy of a ``with`` block; count work with ``w.add(n)``.

    Args:
        name: the window's name (at most 128 characters): in ``llem-acct`` as ``JOB.NAME``.
        unit: the unit of the work (``tokens``, ``samples``, any word).
        work: the work, when known up front (``add`` counts on from it).
    """
    return Window(name, unit, work=work)


def measured(
    name: str | Callable | None = None,
    unit: str | None = None,
    *,
    work: Callable[[Any], float] | None = None,
):
    """Decorate a function so that each call is a window (named after the function unless
    ``name`` is given); ``work(result)`` gives the work a call did. The last measurement is
    in ``f.last_measurement``. ``@llem.measured`` works without parentheses too."""

    def decorate(func: Callable) -> Callable:
        label = name if isinstance(name, str) else func.__qualname__

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            w = Window(label, unit)
            with w:
                out = func(*args, **kwargs)
                if work is not None:
                    w.add(work(out))
            wrapper.last_measurement = w.result  # type: ignore[attr-defined]
            return out

        wrapper.last_measurement = None  # type: ignore[attr-defined]
        return wrapper

    if callable(name):
        return decorate(name)
    return decorate


def _synchronize_cuda() -> None:
    """Wait for the GPU work queued so far (Zeus's ``sync_execution``), when PyTorch is in
    use: CUDA runs asynchronously, and queued kernels belong to the window that queued them."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001, S110 - a broken CUDA setup must not lose the window
        pass


def begin_window(name: str, unit: str | None = None, sync_execution: bool = True) -> Window:
    """Open a named window (Zeus's ``begin_window``); one window per name at a time in a
    process. ``sync_execution``: first wait for queued GPU work (PyTorch), as Zeus does."""
    if sync_execution:
        _synchronize_cuda()
    w = Window(name, unit)
    with _named_lock:
        if name in _named:
            raise WindowStateError(f"window {name!r} is already open")
        _named[name] = w
    try:
        return w.start()
    except BaseException:
        with _named_lock:
            _named.pop(name, None)
        raise


def end_window(
    name: str, work: float | None = None, sync_execution: bool = True, cancel: bool = False
) -> Measurement:
    """Close the window ``name`` opened by :func:`begin_window` and return its measurement;
    ``work``, when given, is added to the window's work. As in Zeus, ``sync_execution``
    waits for queued GPU work first, and ``cancel`` closes the window without recording it
    in the local history (inside a job the node sampler has it already: it stays in the
    ledger, like any window)."""
    with _named_lock:
        w = _named.pop(name, None)
    if w is None:
        raise WindowStateError(f"no window {name!r} was begun in this process")
    if sync_execution:
        _synchronize_cuda()
    if work is not None:
        w.add(work)
    if cancel:
        w.record = False
    return w.stop()
