"""An interpreter that the unprivileged uid 65534 (nobody) can run llem with, for the tests of
what a user may and may not do (root only)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def python_for_nobody(root: Path) -> tuple[str, dict] | None:
    """An interpreter and environment in which uid 65534 can import llem.node.export, or None.

    This interpreter may live under /root; the system one with a world-readable copy of
    the package does as well (llem.node.export needs nothing outside the standard library).
    """
    import llem

    src = root / "src"
    shutil.copytree(
        Path(llem.__file__).parent, src / "llem", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in [src, *src.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    for exe, env in ((sys.executable, {}), ("/usr/bin/python3", {"PYTHONPATH": str(src)})):
        env = {**os.environ, "HOME": "/tmp", **env}
        try:
            ok = (
                subprocess.run(
                    [exe, "-c", "import llem.node.export"],
                    user=65534,
                    group=65534,
                    env=env,
                    capture_output=True,
                    timeout=60,
                    cwd="/",
                ).returncode
                == 0
            )
        except OSError:
            ok = False
        if ok:
            return exe, env
    return None
