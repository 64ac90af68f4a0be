"""Reading the end of a log file incrementally, following rotation.

A client keeps a cursor ``(inode, position)``.  If the file at the path has a
new inode (it was rotated to ``NAME.1`` and a new one started), the rest of
the old file is read from ``NAME.1`` when that is still the same inode, then
the new file from its start.  A file shorter than the position was truncated
and is read from the start.  Only whole lines are returned; a partial last
line waits for the next poll.  The path always comes from the program
registry, never from a request, and files are opened with
:func:`minard.ops.safefile.open_in`: a symlink planted in the log directory, or
anything but a regular file, is refused (``refused`` in the answer), never
followed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from minard.ops.safefile import UnsafeFile, open_in

log = logging.getLogger("minard.web.logtail")

#: Most bytes returned by one read (the page polls again for more).
CHUNK = 64 * 1024
#: Bytes shown when a page opens: the end of the file.
INITIAL = 32 * 1024


def _read(fd: int, start: int, limit: int) -> tuple[bytes, int]:
    """Whole lines of open file *fd* from *start*, at most *limit* bytes; (data, new position)."""
    data = os.pread(fd, max(0, limit), start)
    cut = data.rfind(b"\n")
    if cut < 0:
        return b"", start
    return data[: cut + 1], start + cut + 1


def _open(path: Path) -> int | None:
    """A descriptor of log file *path* (no symlink, regular file), or None if it is missing.

    Raises :class:`UnsafeFile` for a planted link or a special file.
    """
    try:
        return open_in(path)
    except UnsafeFile:
        log.warning("refusing to show %s: it is a symlink or not a regular file", path)
        raise
    except FileNotFoundError:
        return None


def _refused() -> dict:
    return {"ino": 0, "pos": 0, "text": "", "missing": True, "rotated": False, "refused": True}


def initial(path: Path, size: int = INITIAL) -> dict:
    """The last lines of *path* and the cursor after them."""
    try:
        fd = _open(path)
    except UnsafeFile:
        return _refused()
    if fd is None:
        return {"ino": 0, "pos": 0, "text": "", "missing": True, "rotated": False}
    try:
        st = os.fstat(fd)
        start = max(0, st.st_size - size)
        data, pos = _read(fd, start, st.st_size - start)
    finally:
        os.close(fd)
    if start > 0 and b"\n" in data:
        data = data[data.index(b"\n") + 1:]  # drop the cut first line
    return {"ino": st.st_ino, "pos": pos, "text": data.decode("utf-8", "replace"),
            "missing": False, "rotated": False}


def _rest_of_previous(path: Path, ino: int, pos: int, limit: int) -> bytes:
    """The unread end of the rotated file ``NAME.1`` if it is still the inode *ino*."""
    try:
        fd = _open(path.with_name(path.name + ".1"))
    except UnsafeFile:
        return b""
    if fd is None:
        return b""
    try:
        return _read(fd, pos, limit)[0] if os.fstat(fd).st_ino == ino else b""
    finally:
        os.close(fd)


def follow(path: Path, ino: int, pos: int, limit: int = CHUNK) -> dict:
    """New whole lines of *path* since cursor (*ino*, *pos*), following rotation."""
    if not ino:
        return initial(path)
    try:
        fd = _open(path)
    except UnsafeFile:
        return _refused()
    if fd is None:
        return {"ino": 0, "pos": 0, "text": "", "missing": True, "rotated": bool(ino)}
    try:
        st = os.fstat(fd)
        old_rest = b""
        rotated = False
        if st.st_ino != ino:
            rotated = True
            old_rest = _rest_of_previous(path, ino, pos, limit)
            pos = 0
        elif st.st_size < pos:
            rotated, pos = True, 0
        data, new_pos = _read(fd, pos, max(0, limit - len(old_rest)))
    finally:
        os.close(fd)
    return {"ino": st.st_ino, "pos": new_pos, "text": (old_rest + data).decode("utf-8", "replace"),
            "missing": False, "rotated": rotated}
