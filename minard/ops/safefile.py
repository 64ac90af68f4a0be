"""Opening log files without following symlinks or leaving their directory.

The log server appends to ``log_dir/NAME.log`` and the website shows log
files to anonymous visitors.  Anyone who can create a file in a log directory
could otherwise plant ``NAME.log -> /etc/shadow`` (or a key file) and have it
served, or appended to.  Every open here:

- resolves the directory with :func:`os.path.realpath` and refuses a file
  whose directory is not *base* or below it;
- opens the name relative to that directory's descriptor with ``O_NOFOLLOW``
  (a symlink as the last component fails with ``ELOOP``), so the check and
  the open see the same directory;
- refuses anything that is not a regular file (FIFOs would block a reader).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

#: Mode of log files created here (group may read: the logs group of a production install).
LOG_MODE = 0o640


class UnsafeFile(OSError):
    """The path is a symlink, not a regular file, or outside its log directory."""


def _inside(path: str, base: str) -> bool:
    """True if *path* is *base* or below it (both already resolved)."""
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def open_in(path: str | os.PathLike, base: str | os.PathLike | None = None,
            flags: int = os.O_RDONLY, mode: int = LOG_MODE) -> int:
    """A descriptor of regular file *path*, which must lie in *base* (default: its own directory).

    Raises :class:`FileNotFoundError` when it does not exist (and *flags*
    does not create it) and :class:`UnsafeFile` for a symlink, a non-regular
    file or a directory outside *base*.
    """
    path = Path(path)
    parent = os.path.realpath(path.parent)
    if base is not None and not _inside(parent, os.path.realpath(base)):
        raise UnsafeFile(errno.EPERM, "outside the log directory", str(path))
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFile(errno.ELOOP, "a symbolic link", str(path)) from None
            raise
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(errno.EPERM, "not a regular file", str(path))
    os.set_blocking(fd, True)
    return fd


def lstat_in(path: str | os.PathLike, base: str | os.PathLike | None = None) -> os.stat_result:
    """fstat of :func:`open_in` (*path* read-only): the file's own inode, never a link target's."""
    fd = open_in(path, base)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)
