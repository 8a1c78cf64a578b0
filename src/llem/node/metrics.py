"""Live node metrics for Prometheus, through node_exporter's textfile collector.

Off by default. With ``metrics.textfile_dir`` set, the node sampler calls
:meth:`NodeMetrics.on_interval` once per interval, after the interval is in the node store;
it writes ``llem_node_<NODE>.prom`` there (atomically: see :mod:`llem.exposition`) with

* the node's energy counters per device (``llem_node_energy_joules_total``): the node
  store's totals when the sampler started, plus every interval since, so they equal what the
  store holds; and each device's mean power over the last interval;
* the energy attributed so far to each *running* job per component
  (``llem_job_energy_joules_total``) and one ``llem_job_info`` series per running job: a job
  leaves the file at the first tick after its Epilog, so the number of series is bounded by
  the jobs the node runs at once;
* the sampler's health: last tick, start time, interval, gaps and sensor errors.

With ``metrics.dcgm_job_mapping_dir`` set it also keeps the directory that
``dcgm-exporter --hpc-job-mapping-dir`` reads: one file per GPU, named by its NVML index,
listing the ids of the running jobs allocated to that GPU, one per line.

Cost (``bench/bench_metrics.py``): in the sampler's thread, one indexed query of the running
jobs per tick (one more per job when it is first seen) and the text, its series' label
strings cached between ticks; the write and the rename run in a writer thread
(:class:`BackgroundWriter`), so the filesystem never holds the sampling. A failure is logged
once and never stops the sampling.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llem.exposition import Exposition, write_textfile
from llem.fsutil import dir_problem
from llem.sensors.base import OK, Device
from llem.units import FIRST, GAP, RESET

log = logging.getLogger(__name__)

UJ_PER_J = 1_000_000
NS_PER_S = 1_000_000_000


class BackgroundWriter:
    """Runs the latest submitted write in a thread of its own, so that the sampler never
    waits on the filesystem (a rename on a busy ext4 journal takes milliseconds; a hung
    network mount, forever). Only the newest write waits: a slow disk drops intermediate
    files, never piles them up. At exit it waits a bounded time for the last one.
    """

    EXIT_WAIT_S = 1.0

    def __init__(
        self, on_error: Callable[[Exception], None], on_success: Callable[[], None]
    ) -> None:
        self._on_error = on_error
        self._on_success = on_success
        self._cond = threading.Condition()
        self._pending: Callable[[], None] | None = None
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="llem-metrics", daemon=True)
        self._thread.start()
        atexit.register(self.flush, self.EXIT_WAIT_S)

    def submit(self, write: Callable[[], None]) -> None:
        with self._cond:
            self._pending = write
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                write, self._pending = self._pending, None
                self._busy = True
            try:
                write()
                self._on_success()
            except Exception as e:  # noqa: BLE001 - logged by the owner
                self._on_error(e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """True once nothing is pending or being written; False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


def textfile_name(node: str) -> str:
    """The node's file in the textfile directory (several slurmd may share a host)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node)
    return f"llem_node_{safe}.prom"


class NodeMetrics:
    """Per-interval exporter of one node sampler's figures.

    Args:
        store: the node store (read: running jobs, energy totals at start).
        node: the Slurm node name.
        devices: the sampler's devices.
        interval_s: the sampler's interval.
        textfile_dir: where node_exporter's textfile collector reads; None: no textfile.
        dcgm_mapping_dir: dcgm-exporter's job-mapping directory; None: not kept.
        clock: wall-clock seconds (injected in tests).
    """

    def __init__(
        self,
        store,
        node: str,
        devices: Sequence[Device],
        interval_s: float,
        textfile_dir: str | os.PathLike | None,
        dcgm_mapping_dir: str | os.PathLike | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.node = node
        self.devices = {d.key: d for d in devices}
        self.interval_s = interval_s
        self.textfile_dir = Path(textfile_dir) if textfile_dir else None
        self.dcgm_dir = Path(dcgm_mapping_dir) if dcgm_mapping_dir else None
        self.clock = clock
        self.started_s = clock()
        self.file = textfile_name(node)
        self.node_uj: dict[str, int] = {k: 0 for k in self.devices}
        self.power_w: dict[str, float] = {}
        self.job_uj: dict[int, dict[str, int]] = {}
        self.jobs: dict[int, tuple[str, str, str, str]] = {}
        self.gaps = {k: 0 for k in self.devices}
        self.errors = {k: 0 for k in self.devices}
        self.intervals = 0
        self.last_tick_s: float | None = None
        self._failing = False
        self._dcgm_written: dict[str, str] = {}
        self._render_cache: dict = {}
        self._writer: BackgroundWriter | None = None
        if self.enabled:
            # Once, before the first interval: the counters go on from the store's totals.
            try:
                totals = store.energy_by_device()
                self.node_uj = {k: int(totals.get(k) or 0) for k in self.devices}
            except Exception as e:  # noqa: BLE001 - start from 0 (a counter reset), sample on
                log.warning(
                    "metrics: the store's totals could not be read (%s); the energy "
                    "counters start at 0",
                    e,
                )
        gpus = [d for d in devices if d.component == "gpu"]
        # Job records name their GPUs by device key once the sampler resolved Slurm's index
        # (at the job's first interval): dcgm-exporter's files are named by NVML index.
        self._gpu_index = {
            d.key: str(d.attrs.get("index")) for d in gpus if d.attrs.get("index") is not None
        }

    @classmethod
    def from_config(
        cls, config, store, node: str, devices: Sequence[Device], interval_s: float
    ) -> NodeMetrics:
        metrics = getattr(config, "metrics", None)
        return cls(
            store,
            node,
            devices,
            interval_s,
            getattr(metrics, "textfile_dir", None),
            getattr(metrics, "dcgm_job_mapping_dir", None),
        )

    @property
    def enabled(self) -> bool:
        return self.textfile_dir is not None or self.dcgm_dir is not None

    # -- the sampler's call ----------------------------------------------------------------

    def on_interval(self, interval) -> None:
        """Take in one stored interval and hand the files to the writer; never raises."""
        if not self.enabled:
            return
        try:
            running = self._running()
            self.update(interval, running)
            text = self.render() if self.textfile_dir is not None else None
        except Exception as e:  # noqa: BLE001 - metrics never stop the sampling
            self._failed(e)
            return
        if self._writer is None:
            self._writer = BackgroundWriter(self._failed, self._worked)
        self._writer.submit(lambda: self._write(text, running))

    def _write(self, text: str | None, running: Sequence[tuple]) -> None:
        if text is not None:
            write_textfile(self.textfile_dir, self.file, text)
        if self.dcgm_dir is not None:
            self.write_dcgm_mapping(running)

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait (at most ``timeout_s``) until what was handed over is written."""
        return self._writer is None or self._writer.flush(timeout_s)

    def _failed(self, e: Exception) -> None:
        if not self._failing:
            log.warning(
                "metrics: not written: %s: %s (logged once until it works again)",
                type(e).__name__,
                e,
            )
            self._failing = True

    def _worked(self) -> None:
        if self._failing:
            log.info("metrics: writing works again")
            self._failing = False

    def _running(self) -> list[tuple[int, str, str, str, str, str]]:
        """(run_id, job_id, user, account, partition, gpus JSON) of the running jobs."""
        return self.store.running_job_labels()

    # -- state -----------------------------------------------------------------------------

    def update(self, interval, running: Sequence[tuple]) -> None:
        """Add one interval (already in the store) to the counters."""
        self.intervals += 1
        self.last_tick_s = interval.end_ns / NS_PER_S
        seconds = (interval.mono_end_ns - interval.mono_start_ns) / NS_PER_S
        power: dict[str, float] = {}
        for row in interval.rows:
            if row.device_key not in self.devices:
                continue
            if row.status != OK:
                self.errors[row.device_key] += 1
            if row.status != OK or row.kind in (GAP, RESET):
                self.gaps[row.device_key] += 1
                continue
            self.node_uj[row.device_key] += row.energy_uj
            if row.kind != FIRST and seconds > 0:
                power[row.device_key] = row.energy_uj / UJ_PER_J / seconds
        self.power_w = power
        live = {r[0] for r in running}
        self.job_uj = {k: v for k, v in self.job_uj.items() if k in live}
        for share in interval.shares:
            totals = self.job_uj.get(share.run_id)
            if totals is not None:
                totals[share.device_key] = totals.get(share.device_key, 0) + share.energy_uj
        for run_id, *_ in running:
            if run_id not in self.job_uj:  # first seen: what the store holds, this interval in
                self.job_uj[run_id] = self.store.run_energy_by_device(run_id)
        self.jobs = {r[0]: (r[1], r[2], r[3], r[4]) for r in running}

    # -- output ----------------------------------------------------------------------------

    def render(self) -> str:
        """The textfile's content: every node metric of the catalogue, no timestamps."""
        node = self.node
        out = Exposition(cache=self._render_cache)
        devs = self.devices
        out.add(
            "llem_node_energy_joules_total",
            [
                ((node, k, d.component, d.source), self.node_uj[k] / UJ_PER_J)
                for k, d in devs.items()
            ],
        )
        out.add(
            "llem_node_power_watts",
            [((node, k, devs[k].component, devs[k].source), w) for k, w in self.power_w.items()],
        )
        out.add("llem_node_running_jobs", [((node,), len(self.jobs))])
        job_series = []
        # Every component of the node, from 0: a job just started is there, and its counters
        # never appear out of nothing (Prometheus's advice for labelled counters).
        zero = {(d.component, d.source): 0 for d in devs.values()}
        for run_id, (job_id, *_rest) in self.jobs.items():
            by_comp = dict(zero)
            for key, uj in self.job_uj.get(run_id, {}).items():
                d = devs.get(key)
                comp = (d.component, d.source) if d else ("other", "measured")
                by_comp[comp] = by_comp.get(comp, 0) + uj
            job_series += [
                ((node, job_id, c, s), uj / UJ_PER_J) for (c, s), uj in sorted(by_comp.items())
            ]
        out.add("llem_job_energy_joules_total", job_series)
        out.add("llem_job_info", [((node,) + info, 1) for info in self.jobs.values()])
        out.add("llem_sampler_start_time_seconds", [((node,), round(self.started_s, 3))])
        if self.last_tick_s is not None:
            out.add(
                "llem_sampler_last_tick_timestamp_seconds", [((node,), round(self.last_tick_s, 3))]
            )
        out.add("llem_sampler_interval_seconds", [((node,), float(self.interval_s))])
        out.add("llem_sampler_intervals_total", [((node,), self.intervals)])
        out.add("llem_sampler_gaps_total", [((node, k), n) for k, n in self.gaps.items()])
        out.add(
            "llem_sampler_sensor_errors_total", [((node, k), n) for k, n in self.errors.items()]
        )
        return out.text()

    def write_dcgm_mapping(self, running: Sequence[tuple]) -> None:
        """One file per GPU (its NVML index) listing the running jobs that hold it."""
        import json

        problem = dir_problem(self.dcgm_dir)
        if problem is not None:
            raise OSError(f"dcgm job-mapping directory {self.dcgm_dir}: {problem}")
        wanted: dict[str, list[str]] = {i: [] for i in self._gpu_index.values()}
        for _, job_id, _u, _a, _p, gpus in running:
            for key in json.loads(gpus or "[]"):
                index = self._gpu_index.get(str(key))
                if index is not None:
                    wanted[index].append(job_id)
        for index, jobs in wanted.items():
            text = "".join(f"{j}\n" for j in jobs)
            if self._dcgm_written.get(index) != text:
                write_textfile(self.dcgm_dir, index, text)
                self._dcgm_written[index] = text
