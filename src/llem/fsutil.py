"""Files and directories that root processes write: one implementation of each safe way.

- :func:`dir_problem` / :func:`ensure_private_dir`: a directory llem writes into must not be
  under another user's control (no symlink, a real directory, owned by this user or root,
  not writable by others, nor by the group where the place asks for it).
- :func:`file_problem`: a file written by root (a database) is a regular file owned by this
  user or root and writable by nobody else.
- :func:`write_atomic`: temporary name, ``O_EXCL | O_NOFOLLOW``, fsync, rename, fsync dir.
- :func:`locked`: an exclusive flock with a time bound.
- :func:`detach`: fork, setsid, fork again, stdio to /dev/null, descriptors closed: a process
  that outlives its caller's process group (slurmd kills the Prolog's) and holds none of its
  files.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llem.errors import LlemError, StoreError


def dir_problem(
    path: Path,
    *,
    create_mode: int | None = None,
    group_write_ok: bool = False,
    owner_check: bool = True,
) -> str | None:
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
        return (
            f"is owned by uid {st.st_uid}, not by this user (uid {euid}) or root: another "
            "user controls it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not group_write_ok):
        who = "others" if group_write_ok else "group or others"
        fix = "o-w" if group_write_ok else "go-w"
        return f"is writable by {who} (mode {mode:o}); fix with 'chmod {fix} {path}'"
    return None


def file_problem(st: os.stat_result, *, euid: int | None = None) -> str | None:
    """What is wrong with a file that a root process writes (a database, its ``-wal`` and
    ``-shm``), from its ``lstat``/``fstat``, or None when it is fine.

    It must be a regular file, owned by this user or root, and writable by nobody else: a
    file another user owns or may write could have been forged or swapped in by them.
    """
    euid = os.geteuid() if euid is None else euid
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (euid, 0):
        return (
            f"is owned by uid {st.st_uid}, not by this user (uid {euid}) or root: another "
            "user may have forged or swapped it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "fix with 'chmod go-w'"
        )
    return None


def ensure_private_dir(path: Path, mode: int = 0o750) -> Path:
    """Create ``path`` if needed and refuse one that another user controls.

    Raises:
        StoreError: the path is a symlink, not a directory, owned by another non-root user, or
            writable by group or others.
    """
    from llem.fsutil import dir_problem

    problem = dir_problem(path, create_mode=mode)
    if problem is not None:
        raise StoreError(f"{path}: {problem}; refusing to use it")
    return path


def write_atomic(directory: Path, name: str, data: bytes, mode: int = 0o640) -> Path:
    """Write ``directory/name`` under a temporary name, fsync, rename, fsync the directory.

    The temporary name starts with a dot, which readers of the spool and outbox skip.
    ``O_EXCL | O_NOFOLLOW``: never written through a planted file or symlink.
    """
    final = directory / name
    tmp = directory / f".tmp.{os.getpid()}.{time.monotonic_ns()}.{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)
    return final


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def locked(
    path: Path,
    timeout_s: float = 10.0,
    *,
    poll_s: float = 0.005,
    busy: Callable[[], Exception] | None = None,
) -> Iterator[int]:
    """An exclusive flock on ``path``, waiting at most ``timeout_s`` (0: one try).

    Yields the lock file's descriptor; the lock goes with it (and with the process).

    Raises:
        LlemError, or what ``busy()`` returns: still held by another process at the deadline.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    if busy is not None:
                        raise busy() from None
                    raise LlemError(
                        f"{path}: lock held by another process for {timeout_s} s"
                    ) from None
                time.sleep(poll_s)
        yield fd
    finally:
        os.close(fd)


def detach(keep_fd: int) -> bool:
    """Fork a grandchild in a session of its own that holds none of the caller's files.

    fork, ``setsid``, fork again; in the grandchild stdio goes to /dev/null and every other
    descriptor but ``keep_fd`` is closed. slurmd reads a hook's output until every holder
    closes it and kills the hook's process group when it exits, and a caller's locks live as
    long as any inherited descriptor: a detached process escapes all three.

    Returns:
        True in the grandchild, which must end with ``os._exit`` or ``exec``; False in the
        caller, once the intermediate child has been reaped.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, keep_fd)
            os.closerange(keep_fd + 1, 65536)
            return True
        except BaseException:
            os._exit(127)
    os.waitpid(pid, 0)
    return False
