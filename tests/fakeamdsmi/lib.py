"""Build the fake libamd_smi.so and write the state file it reads on every call.

The real ``amdsmi`` package binds every function it wraps when it is imported, so the fake
must export them all: ``fake_amd_smi.c`` implements the calls llem makes, and the others are
generated from the installed package's own ``amdsmi_wrapper.py`` as stubs that answer
AMDSMI_STATUS_NOT_SUPPORTED (a newer amdsmi with new symbols still loads). ``ROCM_PATH`` set to
the build folder makes the package load ``ROCM_PATH/lib/libamd_smi.so`` first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_amd_smi.c")
CFLAGS = ("-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-O2")
_BOUND = re.compile(r"_libraries\['libamd_smi\.so'\]\.(\w+)")
_DEFINED = re.compile(r"^(?:int|void)\s+(\w+)\(", re.M)


class GccMissing(RuntimeError):
    """No gcc on PATH: the fake library cannot be built."""


def wrapper_symbols() -> list[str]:
    """Every symbol the installed amdsmi package binds at import, read from its source."""
    spec = importlib.util.find_spec("amdsmi")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the amdsmi package is not installed (pip install amdsmi)")
    text = (Path(spec.origin).parent / "amdsmi_wrapper.py").read_text()
    return sorted(set(_BOUND.findall(text)))


def build(out_dir: Path) -> Path:
    """Compile the fake library; returns the folder to use as ``ROCM_PATH``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GccMissing("gcc not found on PATH; cannot build the fake libamd_smi.so")
    lib = out_dir / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    defined = set(_DEFINED.findall(SOURCE.read_text()))
    stubs = out_dir / "stubs.c"
    stubs.write_text(
        "".join(
            f"int {name}(void) {{ return 2; }}\n"
            for name in wrapper_symbols()
            if name not in defined
        )
    )
    subprocess.run(
        [gcc, *CFLAGS, "-o", str(lib / "libamd_smi.so"), str(SOURCE), str(stubs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out_dir


@dataclass
class FakeAmdGpu:
    """One GPU of the fake library, in its units (accumulator ticks, watts)."""

    bdf: str
    uuid: str
    card: int
    acc: int = 0
    res: float = 15.3
    power_w: int = 0
    error: int = 0  # answered by amdsmi_get_energy_count
    perror: int = 0  # answered by amdsmi_get_power_info
    serial: str = ""  # the board's product serial (shared by the dies/partitions of one GPU)
    part: int = 0  # the KFD partition id
    product: str = ""
    kind: str = "plain"  # plain, mi250x or mi300x: see fake_amd_smi.c

    def line(self) -> str:
        words = [
            f"gpu bdf={self.bdf} uuid={self.uuid} card={self.card} acc={self.acc}",
            f"res={self.res} power_w={self.power_w} error={self.error} perror={self.perror}",
            f"part={self.part} kind={self.kind}",
        ]
        if self.serial:
            words.append(f"serial={self.serial}")
        if self.product:
            words.append(f"product={self.product.replace(' ', '_')}")
        return " ".join(words)


def write_state(path: Path, gpus: Iterable[FakeAmdGpu], *, init_error: int = 0) -> None:
    """Write the state file atomically, so that a read never sees half of it."""
    lines = [f"init_error={init_error}", *(g.line() for g in gpus)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
