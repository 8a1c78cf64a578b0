"""Directories llem writes into must not be under another user's control.

One check for every such place (node store, run folder, outbox, spool, ledger folder): no
symlink, a real directory, owned by this user or root, and not writable by others (nor by the
group, where the place asks for it). Callers wrap the answer in their own error type.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def dir_problem(path: Path, *, create_mode: int | None = None, group_write_ok: bool = False,
                owner_check: bool = True) -> str | None:
    """What is wrong with ``path`` as a directory to write into, or None when it is fine.

    Args:
        path: the directory.
        create_mode: create it (and missing parents) with this mode when absent; None: do not.
        group_write_ok: accept a group-writable directory (a shared spool).
        owner_check: require it to be owned by this user or root.
    """
    try:
        if create_mode is not None:
            path.mkdir(mode=create_mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"cannot be used: {e.strerror or e}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "is not a real directory (a symlink or a file)"
    euid = os.geteuid()
    if owner_check and st.st_uid not in (euid, 0):
        return (f"is owned by uid {st.st_uid}, not by this user (uid {euid}) or root: another "
                "user controls it")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not group_write_ok):
        who = "others" if group_write_ok else "group or others"
        fix = "o-w" if group_write_ok else "go-w"
        return f"is writable by {who} (mode {mode:o}); fix with 'chmod {fix} {path}'"
    return None
