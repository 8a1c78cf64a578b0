"""Unprivileged local users and groups for tests of what users may and may not do (root only),
and an interpreter they can run llem's commands with (llem, click and yaml copied where they
can read them: the test venv may live under /root)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.nobody import python_for_nobody


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["/usr/sbin/groupadd", "--system", name], check=True, timeout=30)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """A local user without a home (created if missing), member of ``groups``."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["/usr/sbin/useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            timeout=30,
        )
        entry = pwd.getpwnam(name)
    for group in groups:
        ensure_group(group)
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["/usr/sbin/usermod", "-a", "-G", group, name], check=True, timeout=30)
    return entry


def python_for_users(root: Path) -> tuple[str, dict] | None:
    """An interpreter and environment with which any user can run ``llem`` and ``llem-acct``
    (llem, click and yaml in a world-readable folder under ``root``), or None."""
    import click
    import pynvml
    import yaml

    python = python_for_nobody(root)
    if python is None:
        return None
    src = root / "src"
    for module in (click, yaml, pynvml):
        origin = Path(module.__file__)
        if origin.name != "__init__.py":  # a single-file module
            shutil.copy(origin, src / origin.name)
            continue
        dest = src / module.__name__
        if not dest.exists():
            shutil.copytree(
                origin.parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so")
            )
    if not (src / "llem" / "share").exists():  # installed as llem.share
        shutil.copytree(
            ROOT / "share", src / "llem" / "share", ignore=shutil.ignore_patterns("__pycache__")
        )
    for path in [src, *src.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return python[0], {**python[1], "PYTHONPATH": str(src)}
