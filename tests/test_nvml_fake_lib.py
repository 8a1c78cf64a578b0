"""The NVML sensor end to end: real pynvml, real ctypes, a fake ``libnvidia-ml.so.1``.

The dynamic loader reads ``LD_LIBRARY_PATH`` when a process starts, so the sensor runs in a
child Python that answers one JSON request per line on stdin; the test changes the fake
driver's state file between requests.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import llem
from llem import units
from tests.fakenvml.lib import FakeGpu, GccMissing, build, write_state

S = 1_000_000_000  # ns
REPLY_TIMEOUT_S = 30

CHILD = r"""
import dataclasses, json, sys
from llem.errors import LlemError
from llem.sensors import nvml

sensor = None
for line in sys.stdin:
    request = json.loads(line)
    op = request["op"]
    try:
        if op == "open":
            sensor = nvml.NvmlSensor(request.get("select"))
            reply = {"devices": [dataclasses.asdict(d) for d in sensor.devices()],
                     "driver": sensor.driver_version}
        elif op == "read":
            reply = {"readings": [dataclasses.asdict(r) for r in sensor.read(request["mono_ns"])]}
        elif op == "probe":
            reply = {"probe": dataclasses.asdict(nvml.probe(request.get("select")))}
        elif op == "close":
            sensor.close()
            reply = {}
        else:
            reply = {"bad_op": op}
    except LlemError as e:
        reply = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(reply), flush=True)
"""


class Child:
    """A Python process running the NVML sensor against the library in ``lib_dir``."""

    def __init__(self, lib_dir: Path, state: Path) -> None:
        src = str(Path(llem.__file__).resolve().parents[1])
        env = dict(os.environ)
        env.update(
            LD_LIBRARY_PATH=str(lib_dir),
            FAKE_NVML_STATE=str(state),
            PYTHONPATH=os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise AssertionError(f"no reply to {op!r}; child stderr:\n{self.stderr}")
        return json.loads(line)

    def read(self, mono_ns: int) -> list[dict[str, Any]]:
        reply = self.ask("read", mono_ns=mono_ns)
        assert "readings" in reply, reply
        return reply["readings"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=REPLY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture(scope="session")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake library, built once per session."""
    try:
        return build(tmp_path_factory.mktemp("fakenvml"))
    except GccMissing as e:
        pytest.skip(str(e))
    except subprocess.CalledProcessError as e:
        pytest.fail(f"fake_nvml.c does not build:\n{e.stderr}")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "nvml-state"


@pytest.fixture
def child(lib_dir: Path, state: Path) -> Iterator[Callable[..., Child]]:
    """Start children against the fake library; each is stopped after the test."""
    started: list[Child] = []

    def start(library_dir: Path = lib_dir) -> Child:
        started.append(Child(library_dir, state))
        return started[-1]

    yield start
    for c in started:
        c.stop()
        assert "Traceback" not in c.stderr, c.stderr


UUIDS = [f"GPU-{n}{n}{n}{n}{n}{n}{n}{n}-0000-1111-2222-333333333333" for n in "abcd"]


def four_gpus() -> list[FakeGpu]:
    """Four GPUs in NVML index order, with minors 3, 1, 0, 2."""
    return [
        FakeGpu(UUIDS[0], minor=3, energy_mj=100, power_mw=310_000),
        FakeGpu(UUIDS[1], minor=1, energy_mj=200, power_mw=320_000),
        FakeGpu(UUIDS[2], minor=0, energy_mj=300, power_mw=330_000),
        FakeGpu(UUIDS[3], minor=2, energy_mj=400, power_mw=340_000),
    ]


def energy_by_minor(gpus: list[FakeGpu]) -> list[int]:
    return [g.energy_mj * 1000 for g in sorted(gpus, key=lambda g: g.minor)]


def test_several_gpus_through_the_real_pynvml(child: Callable[..., Child], state: Path) -> None:
    gpus = four_gpus()
    write_state(state, gpus)
    c = child()
    opened = c.ask("open")
    assert opened["driver"] == "550.54.15"
    assert [d["name"] for d in opened["devices"]] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    gpu0 = opened["devices"][0]
    assert gpu0["key"] == f"nvml:{UUIDS[2]}"
    assert gpu0["method"] == "counter"
    assert gpu0["max_power_w"] == 600.0
    assert gpu0["attrs"] == {
        "uuid": UUIDS[2],
        "minor": 0,
        "index": 2,
        "product": "NVIDIA A100-SXM4-80GB",
        "pci_bus_id": "00000000:07:00.0",
    }
    first = c.read(1 * S)
    assert [r["energy_uj"] for r in first] == energy_by_minor(gpus)
    assert {r["status"] for r in first} == {"ok"}
    for g in gpus:
        g.energy_mj += 1_500
    write_state(state, gpus)
    second = c.read(2 * S)
    steps = [units.counter_delta(a["energy_uj"], b["energy_uj"]) for a, b in zip(first, second)]
    assert [(s.delta, s.kind) for s in steps] == [(1_500_000, units.OK)] * 4
    assert c.ask("close") == {}


def test_counter_reset_after_driver_reload(child: Callable[..., Child], state: Path) -> None:
    gpus = four_gpus()
    gpus[0].energy_mj = 987_654_321
    write_state(state, gpus)
    c = child()
    c.ask("open")
    before = c.read(1 * S)
    for g in gpus:
        g.energy_mj = 5  # the driver was reloaded: every counter starts again
    write_state(state, gpus)
    after = c.read(2 * S)
    kinds = [
        units.counter_delta(a["energy_uj"], b["energy_uj"]).kind for a, b in zip(before, after)
    ]
    assert kinds == [units.RESET] * 4
    assert [r["energy_uj"] for r in after] == [5_000] * 4


def test_lost_gpu_while_the_others_go_on(child: Callable[..., Child], state: Path) -> None:
    gpus = four_gpus()
    write_state(state, gpus)
    c = child()
    c.ask("open")
    c.read(1 * S)
    gpus[1].lost = True  # minor 1
    for g in gpus:
        g.energy_mj += 10
    write_state(state, gpus)
    readings = c.read(2 * S)
    assert [r["status"] for r in readings] == ["ok", "lost", "ok", "ok"]
    assert readings[1]["energy_uj"] is None
    assert readings[1]["device_key"] == f"nvml:{UUIDS[1]}"
    assert "GPU is lost" in readings[1]["error"]
    assert [r["energy_uj"] for i, r in enumerate(readings) if i != 1] == [310_000, 410_000, 110_000]
    probe = c.ask("probe")["probe"]  # a fresh open: the lost GPU cannot be opened
    assert probe["available"] is True
    assert len(probe["devices"]) == 3
    assert any("NVML index 1: GPU is lost" in p for p in probe["problems"])


def test_gpu_without_energy_counter_is_power_polled(
    child: Callable[..., Child], state: Path
) -> None:
    gpus = [
        FakeGpu(UUIDS[0], minor=0, energy_mj=1_000, power_mw=200_000),
        FakeGpu(UUIDS[1], minor=1, name="Tesla P100-PCIE-16GB", power_mw=100_000),
    ]
    gpus[1].energy_supported = False
    write_state(state, gpus)
    c = child()
    opened = c.ask("open")
    assert [d["method"] for d in opened["devices"]] == ["counter", "power_poll"]
    assert [d["source"] for d in opened["devices"]] == ["measured", "measured"]
    polled = []
    for mono_ns, power_mw in [(10 * S, 100_000), (12 * S, 150_000), (13 * S, 150_000)]:
        gpus[1].power_mw = power_mw
        write_state(state, gpus)
        polled.append(c.read(mono_ns)[1]["energy_uj"])
    # (100 W + 150 W) / 2 x 2 s = 250 J, then 150 W x 1 s = 150 J.
    assert polled == [0, 250_000_000, 400_000_000]
    notes = c.ask("probe")["probe"]["notes"]
    assert any("gpu1: Tesla P100-PCIE-16GB" in n and "power polled" in n for n in notes)


def test_read_error_code_is_an_error_reading(child: Callable[..., Child], state: Path) -> None:
    gpus = four_gpus()
    gpus[3].error = 10  # NVML_ERROR_TIMEOUT on minor 2
    write_state(state, gpus)
    c = child()
    c.ask("open")
    readings = c.read(1 * S)
    assert [r["status"] for r in readings] == ["ok", "ok", "error", "ok"]
    assert readings[2]["error"].endswith("NVML error 10: Timeout")


def test_select_by_minor_and_uuid(child: Callable[..., Child], state: Path) -> None:
    write_state(state, four_gpus())
    c = child()
    opened = c.ask("open", select=["2", UUIDS[0]])
    assert [(d["attrs"]["minor"], d["attrs"]["index"]) for d in opened["devices"]] == [
        (2, 3),
        (3, 0),
    ]
    assert len(c.read(1 * S)) == 2


def test_unknown_selected_gpu(child: Callable[..., Child], state: Path) -> None:
    write_state(state, four_gpus())
    reply = child().ask("open", select=["0", "9"])
    assert reply["error"] == "SensorUnavailable"
    assert reply["message"].startswith("selected GPU 9 not present on this node")


def test_driver_not_loaded(child: Callable[..., Child], state: Path) -> None:
    write_state(state, four_gpus(), init_error=9)
    c = child()
    assert c.ask("open")["error"] == "SensorUnavailable"
    probe = c.ask("probe")["probe"]
    assert probe["available"] is False
    assert probe["problems"] == ["no NVIDIA driver: the nvidia kernel module is not loaded"]


def test_no_library_means_no_gpus(child: Callable[..., Child], state: Path, tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real libnvidia-ml is installed: its absence cannot be simulated here")
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    c = child(empty)
    reply = c.ask("open")
    assert reply == {
        "error": "SensorUnavailable",
        "message": "no NVIDIA driver: libnvidia-ml.so.1 not found",
    }
    probe = c.ask("probe")["probe"]
    assert probe == {
        "sensor": "nvml",
        "available": False,
        "devices": [],
        "problems": ["no NVIDIA driver: libnvidia-ml.so.1 not found"],
        "notes": [],
    }


def test_bench_nvml_runs_on_the_fake_driver_and_says_when_there_is_none(
    lib_dir: Path, state: Path, tmp_path: Path
) -> None:
    """bench/bench_nvml.py is run by hand on GPU nodes (docs/nvml.md): it must not rot here.
    Through the real pynvml on the fake library it times the calls and writes its figures;
    with no library it says so and exits 0."""
    write_state(state, [FakeGpu(uuid=UUIDS[0], minor=0, energy_mj=5_000, power_mw=250_000)])
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_nvml.py"
    out = tmp_path / "nvml.json"
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), FAKE_NVML_STATE=str(state))
    run = subprocess.run(
        [sys.executable, str(bench), "--calls", "50", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    figures = json.loads(out.read_text())
    assert figures["gpus"] == 1 and figures["power_limit_mw"] == 400_000
    assert set(figures["cost"]) == {
        "energy_counter",
        "power_usage",
        "NvmlSensor.read (all GPUs)",
    }
    assert all(c["n"] == 50 and c["median_ms"] >= 0 for c in figures["cost"].values())
    assert "update intervals, idle" in run.stdout

    if ctypes.util.find_library("nvidia-ml"):
        return  # a real driver here: its absence cannot be simulated
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    none = subprocess.run(
        [sys.executable, str(bench)],
        capture_output=True,
        text=True,
        env=dict(os.environ, LD_LIBRARY_PATH=str(empty)),
        timeout=60,
    )
    assert none.returncode == 0, none.stderr
    assert none.stdout.startswith("no NVIDIA driver here")
