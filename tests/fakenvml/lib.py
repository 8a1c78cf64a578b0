"""Build the fake NVML library and write the state file it reads on every call.

The library is ``fake_nvml.c`` next to this file, built with gcc as ``libnvidia-ml.so.1`` so
that pynvml's ``CDLL("libnvidia-ml.so.1")`` finds it through ``LD_LIBRARY_PATH``. Its GPUs
come from the file named by ``FAKE_NVML_STATE`` (format in ``fake_nvml.c``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
CFLAGS = ("-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-O2")


class GccMissing(RuntimeError):
    """No gcc on PATH: the fake library cannot be built."""


def build(out_dir: Path) -> Path:
    """Compile the fake library into ``out_dir``.

    Returns:
        The directory holding ``libnvidia-ml.so.1``, for ``LD_LIBRARY_PATH``.

    Raises:
        GccMissing: gcc is not installed.
        subprocess.CalledProcessError: the C source does not compile warning-free.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GccMissing("gcc not found on PATH; cannot build the fake libnvidia-ml.so.1")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    subprocess.run(
        [gcc, *CFLAGS, "-o", str(target), str(SOURCE)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out_dir


@dataclass
class FakeGpu:
    """One GPU of the fake driver, in its units (mJ, mW)."""

    uuid: str
    minor: int
    name: str = "NVIDIA A100-SXM4-80GB"
    energy_mj: int = 0
    power_mw: int = 0
    power_limit_mw: int = 400_000
    energy_supported: bool = True
    lost: bool = False
    error: int = 0  # an NVML return code for energy and power reads
    bus_id: str = ""

    def line(self) -> str:
        """This GPU as a line of the state file (``name=`` last: it takes the rest)."""
        fields = {
            "uuid": self.uuid,
            "minor": self.minor,
            "energy_mj": self.energy_mj,
            "power_mw": self.power_mw,
            "power_limit_mw": self.power_limit_mw,
            "energy": int(self.energy_supported),
            "lost": int(self.lost),
            "error": self.error,
            "busid": self.bus_id or f"00000000:{0x07 + self.minor:02X}:00.0",
        }
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"gpu {text} name={self.name}"


def write_state(
    path: Path,
    gpus: Iterable[FakeGpu],
    *,
    driver: str = "550.54.15",
    init_error: int = 0,
) -> None:
    """Write the state file atomically, so that a read never sees half of it.

    Args:
        path: the file ``FAKE_NVML_STATE`` names.
        gpus: the GPUs, in NVML index order.
        driver: what ``nvmlSystemGetDriverVersion`` answers.
        init_error: the code ``nvmlInit`` returns (0: success).
    """
    lines = [f"driver={driver}", f"init_error={init_error}", *(g.line() for g in gpus)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
