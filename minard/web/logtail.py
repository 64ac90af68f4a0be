"""Reading the end of a log file incrementally, following rotation.

A client keeps a cursor ``(inode, position)``.  If the file at the path has a
new inode (it was rotated to ``NAME.1`` and a new one started), the rest of
the old file is read from ``NAME.1`` when that is still the same inode, then
the new file from its start.  A file shorter than the position was truncated
and is read from the start.  Only whole lines are returned; a partial last
line waits for the next poll.  The path always comes from the program
registry, never from a request.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Most bytes returned by one read (the page polls again for more).
CHUNK = 64 * 1024
#: Bytes shown when a page opens: the end of the file.
INITIAL = 32 * 1024


def _read(path: Path, start: int, limit: int) -> tuple[bytes, int]:
    """Whole lines of *path* from *start*, at most *limit* bytes; (data, new position)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(limit)
    cut = data.rfind(b"\n")
    if cut < 0:
        return b"", start
    return data[: cut + 1], start + cut + 1


def initial(path: Path, size: int = INITIAL) -> dict:
    """The last lines of *path* and the cursor after them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"ino": 0, "pos": 0, "text": "", "missing": True, "rotated": False}
    start = max(0, st.st_size - size)
    data, pos = _read(path, start, st.st_size - start)
    if start > 0 and b"\n" in data:
        data = data[data.index(b"\n") + 1:]  # drop the cut first line
    return {"ino": st.st_ino, "pos": pos, "text": data.decode("utf-8", "replace"),
            "missing": False, "rotated": False}


def follow(path: Path, ino: int, pos: int, limit: int = CHUNK) -> dict:
    """New whole lines of *path* since cursor (*ino*, *pos*), following rotation."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"ino": 0, "pos": 0, "text": "", "missing": True, "rotated": bool(ino)}
    if not ino:
        return initial(path)
    old_rest = b""
    rotated = False
    if st.st_ino != ino:
        rotated = True
        previous = path.with_name(path.name + ".1")
        try:
            if os.stat(previous).st_ino == ino:
                old_rest, _ = _read(previous, pos, limit)
        except FileNotFoundError:
            pass
        pos = 0
    elif st.st_size < pos:
        rotated, pos = True, 0
    data, new_pos = _read(path, pos, max(0, limit - len(old_rest)))
    return {"ino": st.st_ino, "pos": new_pos, "text": (old_rest + data).decode("utf-8", "replace"),
            "missing": False, "rotated": rotated}
