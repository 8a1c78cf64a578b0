"""Module names that live in strings: each must still name a module that imports.

A module moved or renamed breaks no import statement when its name lives in a string (a
``python -m`` command line, a lazy command table, the reader processes' boot code, the
package list of pyproject.toml), and what breaks then is often silent: a sampler that never
starts, readers that fail and leave the aggregator to read alone.
"""

import importlib
import importlib.util
import marshal
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llem
from llem.cluster import readers

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "bench", "slurm")
# "-m", "llem.x" in an argument list, or -m llem.x inside one string (a shell command)
DASH_M = re.compile(r"""["']-m["'],\s*["'](llem(?:\.\w+)+)["']|-m\s+(llem(?:\.\w+)+)""")


def _dash_m_modules() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix not in (".py", ".sh") or "__pycache__" in path.parts:
                continue
            for match in DASH_M.finditer(path.read_text(encoding="utf-8")):
                name = match.group(1) or match.group(2)
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_dash_m_module_imports_and_runs_as_main():
    found = _dash_m_modules()
    # the sampler's spawn (node/daemon.py) and the CLI's own: the scan must see them
    assert {"llem.cli.sampler", "llem.cli.main", "llem.cli.acct"} <= set(found), found
    for name, where in sorted(found.items()):
        module = importlib.import_module(name)  # ImportError names the module
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in source, (
            f"{name} (python -m in {', '.join(where)}) does nothing when run as a script"
        )


def _entry(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_every_command_table_entry_and_console_script_resolves():
    from llem.cli import main

    for table in (main.COMMANDS, main.FAST_COMMANDS):
        for name, spec in table.items():
            assert callable(_entry(spec)), (name, spec)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = project["project"]["scripts"]
    assert set(scripts) == {"llem", "llem-acct"}
    for name, spec in scripts.items():
        assert callable(_entry(spec)), (name, spec)


def test_pyproject_lists_every_package():
    """A package missing from ``packages`` is left out of the wheel, not out of the tests."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(project["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    packages = {
        ".".join(init.parent.relative_to(src).parts) for init in (src / "llem").rglob("__init__.py")
    }
    assert "llem.cluster" in packages
    assert packages - listed == set(), "add these to [tool.setuptools] packages"


def test_reader_boot_code_starts_a_reader_in_a_fresh_isolated_interpreter():
    """The boot code (``_BOOT``) that the aggregator runs with ``python -I -c`` from ``/``.

    When it fails, the aggregator only logs a warning and reads the spool itself, so no
    aggregate test would notice.
    """
    assert importlib.util.find_spec(readers.__name__) is not None
    package_root = str(Path(llem.__file__).resolve().parent.parent)
    frame = marshal.dumps([])  # one chunk of no paths: answered by ("ok", [])
    request = readers._FRAME.pack(len(frame)) + frame
    proc = subprocess.run(
        [sys.executable, "-I", "-c", readers._BOOT, package_root, readers.wire_fingerprint(), ""],
        input=request,
        capture_output=True,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    (size,) = readers._FRAME.unpack(proc.stdout[: readers._FRAME.size])
    assert marshal.loads(proc.stdout[readers._FRAME.size : readers._FRAME.size + size]) == (
        "ok",
        [],
    )
